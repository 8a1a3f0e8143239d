//! Opening and checking a volume whose metadata file is arbitrary bytes: never a panic, a hang or
//! a write. The first input byte picks which 4 KiB slots get their checksum recomputed, so the
//! fuzzer gets past the checksums to the invariants behind them. Slots from the seventh on also
//! land in the peer dirty bitmap's region (SPEC.md §10), so its loading is fuzzed too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume_format::layout::PEER_OFFSET;
use volume_format::{MemFile, Storage, Superblock, Volume, check, slot};

fuzz_target!(|data: &[u8]| {
    let Some((&reseal, rest)) = data.split_first() else {
        return;
    };
    let mut meta = MemFile::new();
    for (i, chunk) in rest.chunks(4096).enumerate() {
        let mut page = [0u8; 4096];
        page[..chunk.len()].copy_from_slice(chunk);
        if reseal >> (i % 8) & 1 == 1 {
            if i < 2 {
                Superblock::reseal(&mut page);
            } else {
                slot::reseal(&mut page);
            }
        }
        meta.write_at(i as u64 * 4096, &page).unwrap();
        if i >= 6 {
            meta.write_at(PEER_OFFSET + (i as u64 - 6) * 4096, &page)
                .unwrap();
        }
    }
    let mut data_file = MemFile::new();
    let written = meta.bytes_written();
    if let Ok(mut v) = Volume::open(meta.clone(), data_file.clone(), None) {
        // Whatever opened must serve reads within its size.
        let mut buf = [0u8; 512];
        let _ = v.read(0, &mut buf);
        let _ = v.block_status(0, v.size().min(1 << 20));
    }
    let r = check(&mut meta, &mut data_file, false);
    let _ = r.clean();
    assert_eq!(
        meta.bytes_written(),
        written,
        "opening or checking wrote metadata"
    );
});
