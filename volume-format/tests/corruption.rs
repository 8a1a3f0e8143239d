//! Corrupt metadata is detected and refused, never served: flipping any byte of a volume's
//! committed metadata either makes `open` fail with an error naming the structure, or leaves
//! the volume reading exactly what it should (the byte was in an older copy). Also: unknown
//! incompatible features, a different format version, a truncated file, the wrong image.

mod common;

use common::*;
use volume_format::{MemFile, Storage, Volume, VolumeError, layout};

/// A clone with committed changes on three map pages, each page written twice (both slots).
fn sample(rng: &mut Rng, g: &Golden) -> (MemFile, MemFile, Vec<u8>) {
    let mut m = Modelled::clone_of(rng, Some(g), 400 << 20);
    for round in 0..2u8 {
        for b in [1u64, 33_000, 70_000] {
            let off = (b + u64::from(round)) * BLOCK;
            m.vol.write(off, &[round + 1; 4096]).unwrap();
            m.model[off as usize..(off + BLOCK) as usize].fill(round + 1);
        }
        m.vol.flush().unwrap();
    }
    let (meta, data, _) = m.vol.close().unwrap();
    (meta, data, m.model)
}

#[test]
fn any_flipped_metadata_byte_is_refused_or_harmless() {
    let mut rng = Rng::new(41);
    let g = Golden::new(&mut rng, 2 << 20);
    let (meta, data, model) = sample(&mut rng, &g);
    let len = meta.len();
    let (mut refused, mut harmless) = (0, 0);
    let mut pos = 0;
    while pos < len {
        let mut m = meta.clone();
        let mut byte = [0u8];
        m.read_at(pos, &mut byte).unwrap();
        m.write_at(pos, &[byte[0] ^ 0x20]).unwrap();
        match Volume::open(m, data.clone(), g.backing()) {
            Err(e) => {
                refused += 1;
                let msg = e.to_string();
                assert!(
                    msg.contains("superblock") || msg.contains("map"),
                    "byte {pos}: the error names the structure: {msg}"
                );
            }
            Ok(mut v) => {
                harmless += 1;
                // Served: then it must be exactly right.
                for b in [
                    1u64, 2, 3, 33_000, 33_001, 33_002, 70_000, 70_001, 70_002, 500,
                ] {
                    let mut got = [0u8; 4096];
                    v.read(b * BLOCK, &mut got).unwrap();
                    let want = &model[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize];
                    assert!(
                        got[..] == *want,
                        "byte {pos} flipped: block {b} served wrong"
                    );
                }
            }
        }
        // Dense over the superblocks and slot headers, sparser over the bits.
        pos += if pos % 4096 < 256 { 3 } else { 61 };
    }
    assert!(
        refused > 100 && harmless > 100,
        "{refused} refused, {harmless} harmless"
    );
}

#[test]
fn damaging_one_superblock_copy_costs_nothing() {
    let mut rng = Rng::new(42);
    let g = Golden::new(&mut rng, 1 << 20);
    let (meta, data, model) = sample(&mut rng, &g);
    for off in [layout::SUPERBLOCK_A_OFFSET, layout::SUPERBLOCK_B_OFFSET] {
        let mut m = meta.clone();
        m.write_at(off + 100, &[0xff; 8]).unwrap();
        let mut v = Volume::open(m, data.clone(), g.backing()).unwrap();
        let mut got = vec![0u8; 300 * BLOCK as usize];
        v.read(0, &mut got).unwrap();
        assert!(got[..] == model[..got.len()], "copy at {off} damaged");
        assert_eq!(
            v.state().superblock().sequence,
            3,
            "the last commit, not an older one"
        );
    }
}

#[test]
fn newer_formats_and_foreign_files_are_refused_with_a_reason() {
    let mut rng = Rng::new(43);
    let g = Golden::new(&mut rng, 1 << 20);
    let (meta, data, _) = sample(&mut rng, &g);
    let reseal = |m: &mut MemFile, off: u64, at: u64, bytes: &[u8]| {
        let mut b = [0u8; 4096];
        m.read_at(off, &mut b).unwrap();
        b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        let crc = crc32c::crc32c(&b[..4092]);
        b[4092..].copy_from_slice(&crc.to_le_bytes());
        m.write_at(off, &b).unwrap();
    };
    let err = |m: MemFile, backing| match Volume::open(m, data.clone(), backing) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("opened"),
    };
    // An incompatible feature this build does not know, in both copies.
    let mut m = meta.clone();
    for off in [0, 4096] {
        reseal(&mut m, off, 16, &(1u64 << 2).to_le_bytes());
    }
    assert_eq!(layout::INCOMPAT_KNOWN & (1 << 2), 0);
    let e = err(m, g.backing());
    assert!(e.contains("unknown incompatible features 0x4"), "{e}");
    // An unknown read-only-compatible feature: readable, never changed.
    let mut m = meta.clone();
    for off in [0, 4096] {
        reseal(&mut m, off, 24, &1u64.to_le_bytes());
    }
    let mut v = Volume::open(m, data.clone(), g.backing()).unwrap();
    let mut buf = [0u8; 4096];
    v.read(4096, &mut buf).unwrap();
    let e = v.write(0, &[1]).unwrap_err().to_string();
    assert!(e.contains("read-only"), "{e}");
    assert!(v.flush().is_err());
    // A newer format version.
    let mut m = meta.clone();
    for off in [0, 4096] {
        reseal(&mut m, off, 8, &2u32.to_le_bytes());
    }
    assert!(err(m, g.backing()).contains("format version 2"));
    // Truncated: the map pages are gone.
    let mut m = meta.clone();
    m.set_len(8192).unwrap();
    assert!(err(m, g.backing()).contains("block map"));
    // Not a volume at all.
    let mut m = MemFile::new();
    m.write_at(0, b"QFI\xfb qcow2 header, not ours").unwrap();
    assert!(err(m, g.backing()).contains("bad magic"));
    // The wrong golden image.
    let other = Golden::new(&mut rng, 1 << 20);
    let e = Volume::open(meta.clone(), data.clone(), other.backing())
        .err()
        .unwrap();
    assert!(matches!(e, VolumeError::BackingMismatch(_)), "{e}");
    let e = Volume::open(meta, data.clone(), None).err().unwrap();
    assert!(matches!(e, VolumeError::BackingMismatch(_)), "{e}");
}
