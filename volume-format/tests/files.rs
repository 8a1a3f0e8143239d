//! The same volume operations on real files: sparse data files, hole punching, SEEK_DATA block
//! status, the checker reclaiming a real leak, and a golden image that is not a multiple of 4 KiB.

mod common;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use common::*;
use volume_format::{FileStorage, Layer, Storage, Volume, check, image};

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("vf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn open(p: &Path) -> FileStorage {
    let f: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .unwrap();
    FileStorage::new(f).unwrap()
}

#[test]
fn a_clone_on_real_files_is_thin_truthful_and_checkable() {
    let d = dir("real");
    let mut rng = Rng::new(3);
    let size = (5 << 20) + 1000; // not a multiple of 4 KiB
    let mut bytes = vec![0u8; size];
    rng.fill(&mut bytes);
    bytes[(1 << 20)..(2 << 20)].fill(0);
    let mut raw = open(&d.0.join("img.raw"));
    raw.write_at(0, &bytes[..1 << 20]).unwrap();
    raw.write_at(2 << 20, &bytes[2 << 20..]).unwrap();
    raw.sync().unwrap();
    let info = image::seal(&mut raw, rng.id(), |_| {}).unwrap();
    let mut meta_file = open(&d.0.join("img.meta"));
    info.store(&mut meta_file).unwrap();
    assert_eq!(image::ImageInfo::load(&mut meta_file).unwrap(), info);

    let vsize = 64 << 20;
    let mut v = Volume::create(
        open(&d.0.join("v.meta")),
        open(&d.0.join("v.data")),
        Some((open(&d.0.join("img.raw")), info.image_ref())),
        vsize,
        rng.id(),
        rng.id(),
    )
    .unwrap();
    let st = v.stat().unwrap();
    assert!(st.allocated_bytes <= 16 << 10, "fresh clone: {st:?}");

    // Unaligned write across the image tail, a trim over image data, a write past the image.
    v.write(size as u64 - 10, &[0xaa; 30]).unwrap();
    v.trim(0, 8192).unwrap();
    v.write(40 << 20, &[0xbb; 8192]).unwrap();
    v.flush().unwrap();
    let ext = v.block_status(0, vsize).unwrap();
    let at = |off: u64| {
        *ext.iter()
            .find(|e| e.offset <= off && off < e.offset + e.len)
            .unwrap()
    };
    assert_eq!(
        (at(0).layer, at(0).zero),
        (Layer::Volume, true),
        "trimmed: own hole"
    );
    assert_eq!((at(9000).layer, at(9000).zero), (Layer::Image, false));
    assert_eq!(
        (at(1 << 20).layer, at(1 << 20).zero),
        (Layer::Image, true),
        "image hole"
    );
    assert_eq!(
        (at(40 << 20).layer, at(40 << 20).zero),
        (Layer::Volume, false)
    );
    assert_eq!((at(50 << 20).layer, at(50 << 20).zero), (Layer::None, true));
    let mut got = vec![0u8; 40];
    v.read(size as u64 - 20, &mut got).unwrap();
    assert_eq!(&got[..10], &bytes[size - 20..size - 10]);
    assert_eq!(&got[10..], &[0xaa; 30]);

    // A leak, as a crash leaves one: data in a block whose bit is INHERITED.
    let (mut meta, mut data, _) = v.close().unwrap();
    data.write_at(30 << 20, &[0xee; 4096]).unwrap();
    let r = check(&mut meta, &mut data, true);
    assert_eq!(r.leaks, vec![(30 << 20, 4096)], "{r:?}");
    assert!(r.repaired && r.errors.is_empty());
    assert!(check(&mut meta, &mut data, false).clean());
    assert!(
        data.allocated_bytes().unwrap() <= 6 * 4096,
        "only the blocks written"
    );

    // Capture into a new image: flattened, sparse, and its digest matches a plain SHA-256.
    let mut v = Volume::open(
        meta,
        data,
        Some((open(&d.0.join("img.raw")), info.image_ref())),
    )
    .unwrap();
    let mut cap = open(&d.0.join("cap.raw"));
    let ci = v.capture(&mut cap, rng.id(), |_| {}).unwrap();
    assert_eq!(ci.size, vsize);
    assert!(image::verify(&mut cap, &ci, |_| {}).unwrap().ok());
    assert!(
        cap.allocated_bytes().unwrap() < 8 << 20,
        "captured image stays sparse"
    );
}
