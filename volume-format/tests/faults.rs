//! Fault tests: the Nth operation on the metadata or the data file fails with EIO or ENOSPC, at
//! every step of a workload of writes and flushes. The volume must report the error, refuse to
//! pretend success afterwards, and after the process dies and the volume is reopened the checker
//! must find no corruption (only leaks) and everything flushed before the fault must read back.

mod common;

use common::*;
use volume_format::{MemFile, Volume, VolumeError, check};

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

#[test]
fn every_failing_operation_latches_and_loses_nothing_flushed() {
    let mut rng = Rng::new(31);
    let g = Golden::new(&mut rng, 3 << 20);
    let backing = g.info.image_ref();
    let mut checked = 0;
    for errno in [EIO, ENOSPC] {
        for in_meta in [true, false] {
            for n in 1..=14u64 {
                let mut m = Modelled::clone_of(&mut rng, Some(&g), 300 << 20);
                // Flushed history on two map pages.
                let safe: Vec<(u64, u8)> = vec![(7, 1), (33_000, 2), (40, 3)];
                for &(b, v) in &safe {
                    m.vol.write(b * BLOCK, &[v; 4096]).unwrap();
                }
                m.vol.flush().unwrap();
                {
                    let (meta, data) = m.vol.files_mut();
                    let f: &mut MemFile = if in_meta { meta } else { data };
                    f.fail_from(f.ops() + n, errno);
                }
                // A workload until the fault hits.
                let mut first_error = None;
                let mut failed_op = 0;
                for i in 0..40u64 {
                    failed_op = i % 4;
                    let r = match i % 4 {
                        0 => m.vol.write((100 + i) * BLOCK + 17, &[0xcc; 5000]),
                        1 => m.vol.write_zeroes((50_000 + i) * BLOCK, 3 * BLOCK),
                        2 => m.vol.write((34_000 + i) * BLOCK, &[0xdd; 4096]),
                        _ => m.vol.flush(),
                    };
                    if let Err(e) = r {
                        first_error = Some(e);
                        break;
                    }
                }
                let ctx = format!("errno {errno} meta {in_meta} op {n}");
                let e = first_error.unwrap_or_else(|| panic!("{ctx}: the fault never surfaced"));
                assert_eq!(e.errno(), errno, "{ctx}: {e}");
                if errno == ENOSPC && !in_meta && failed_op != 3 {
                    // A data write without space fails alone and latches nothing; the flush
                    // after it hits the still-failing disk and latches.
                    assert!(!matches!(e, VolumeError::Failed(_)), "{ctx}");
                    assert!(m.vol.flush().is_err(), "{ctx}");
                }
                // Latched: nothing pretends to succeed, reads included only if they need no I/O.
                assert!(
                    matches!(m.vol.flush(), Err(VolumeError::Failed(_))),
                    "{ctx}"
                );
                assert!(
                    matches!(m.vol.write(0, &[1]), Err(VolumeError::Failed(_))),
                    "{ctx}"
                );
                // The process dies; whatever was written may or may not have reached the disk.
                let (mut meta, mut data, image) = m.vol.into_parts();
                let mut r2 = Rng::new(n);
                meta.power_cut(|_| volume_format::Fate::Persist, |_, _| true);
                data.power_cut_pages(|_, v| r2.below(v as u64 + 1) as usize);
                let r = check(&mut meta, &mut data, true);
                assert!(r.errors.is_empty(), "{ctx}: {r:?}");
                let mut v = Volume::open(meta, data, image.map(|i| (i, backing))).unwrap();
                for &(b, val) in &safe {
                    let mut got = [0u8; 4096];
                    v.read(b * BLOCK, &mut got).unwrap();
                    assert_eq!(got, [val; 4096], "{ctx}: flushed block {b}");
                }
                // And the volume works again.
                v.write(0, &[9; 4096]).unwrap();
                v.flush().unwrap();
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 56);
}

#[test]
fn a_failed_image_read_fails_the_request_but_not_the_volume() {
    let mut rng = Rng::new(32);
    let g = Golden::new(&mut rng, 1 << 20);
    let mut broken = g.clone();
    broken.raw.fail_from(broken.raw.ops() + 1, EIO);
    let mut vol = Volume::create(
        MemFile::new(),
        data_file(),
        broken.backing(),
        1 << 20,
        rng.id(),
        rng.id(),
    )
    .unwrap();
    let mut buf = [0u8; 100];
    let e = vol.read(10, &mut buf).unwrap_err();
    assert_eq!(e.errno(), EIO);
    // A whole-block write needs no image read and still works; flush too.
    vol.write(8 * BLOCK, &[1; 4096]).unwrap();
    vol.flush().unwrap();
}

#[test]
fn running_out_of_space_fails_the_write_only_and_writes_work_once_space_is_back() {
    let mut rng = Rng::new(33);
    let g = Golden::new(&mut rng, 1 << 20);
    let mut m = Modelled::clone_of(&mut rng, Some(&g), 4 << 20);
    m.vol.write(3 * BLOCK, &[7; 4096]).unwrap();
    m.vol.flush().unwrap();
    {
        let (_, data) = m.vol.files_mut();
        data.fail_from(data.ops() + 1, ENOSPC);
    }
    // A partial write into an inherited block (copy-up) and a whole-block write both fail.
    assert_eq!(
        m.vol.write(10 * BLOCK + 5, &[1; 100]).unwrap_err().errno(),
        ENOSPC
    );
    assert_eq!(
        m.vol.write(11 * BLOCK, &[1; 4096]).unwrap_err().errno(),
        ENOSPC
    );
    // Space is freed: the volume was never latched.
    {
        let (_, data) = m.vol.files_mut();
        data.fail_from(u64::MAX, ENOSPC);
    }
    let mut got = [0u8; 4096];
    m.vol.read(10 * BLOCK, &mut got).unwrap();
    assert_eq!(&got[..], &g.bytes[10 * BLOCK as usize..11 * BLOCK as usize]);
    m.vol.write(10 * BLOCK + 5, &[1; 100]).unwrap();
    m.vol.flush().unwrap();
    m.vol.read(3 * BLOCK, &mut got).unwrap();
    assert_eq!(got, [7; 4096]);
    m.vol.read(10 * BLOCK, &mut got).unwrap();
    assert_eq!(&got[5..105], &[1; 100]);
}
