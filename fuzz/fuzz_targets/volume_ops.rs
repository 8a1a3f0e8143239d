//! Model-based: arbitrary operation sequences on a clone, each read compared with a plain byte
//! vector; flush, reopen and the checker in between.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume_format::{MemFile, Storage, Volume, check, image};

const SIZE: u64 = 256 << 10;

fuzz_target!(|data: &[u8]| {
    let mut raw = MemFile::new();
    let img: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8 | 1).collect();
    raw.write_at(0, &img).unwrap();
    let info = image::seal(&mut raw, [1; 16], |_| {}).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    model[..img.len()].copy_from_slice(&img);
    let mut vol = Volume::create(
        MemFile::new(),
        MemFile::with_tear_unit(4096),
        Some((raw, info.image_ref())),
        SIZE,
        [2; 16],
        [3; 16],
    )
    .unwrap();
    for op in data.chunks(7) {
        if op.len() < 7 {
            break;
        }
        let off = u64::from(u32::from_le_bytes([op[1], op[2], op[3], 0])) % SIZE;
        let len = (u64::from(u16::from_le_bytes([op[4], op[5]])) + 1).min(SIZE - off);
        let (a, b) = (off as usize, (off + len) as usize);
        match op[0] % 6 {
            0 => {
                let buf = vec![op[6]; len as usize];
                vol.write(off, &buf).unwrap();
                model[a..b].copy_from_slice(&buf);
            }
            1 => {
                vol.write_zeroes(off, len).unwrap();
                model[a..b].fill(0);
            }
            2 => {
                let mut got = vec![0u8; len as usize];
                vol.read(off, &mut got).unwrap();
                assert!(got == model[a..b], "read {off}+{len}");
            }
            3 => vol.flush().unwrap(),
            4 => {
                vol.flush().unwrap();
                let (mut meta, mut d, image) = vol.close().unwrap();
                assert!(check(&mut meta, &mut d, false).clean());
                vol = Volume::open(meta, d, image.map(|i| (i, info.image_ref()))).unwrap();
            }
            _ => {
                for e in vol.block_status(off, len).unwrap() {
                    if e.zero {
                        let (x, y) = (e.offset as usize, (e.offset + e.len) as usize);
                        assert!(model[x..y].iter().all(|&z| z == 0));
                    }
                }
            }
        }
    }
    let mut got = vec![0u8; SIZE as usize];
    vol.read(0, &mut got).unwrap();
    assert!(got == model);
});
