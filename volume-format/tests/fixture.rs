//! Format compatibility: `fixtures/v1/` holds a golden image and a clone written by format
//! version 1. Every later version must keep opening them and reading the same bytes. To write
//! the fixture again (only when a format version is added, never to make this test pass):
//! `STREAMER_WRITE_FIXTURE=1 cargo test -p volume-format --test fixture`.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use volume_format::{FileStorage, ImageInfo, Layer, Volume, check, image};

const IMAGE_SIZE: usize = (64 << 10) + 100;
const VOLUME_SIZE: u64 = 256 << 10;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

fn image_bytes() -> Vec<u8> {
    (0..IMAGE_SIZE).map(|i| (i * 13 % 251) as u8).collect()
}

/// What the volume must read as.
fn expected() -> Vec<u8> {
    let mut m = vec![0u8; VOLUME_SIZE as usize];
    m[..IMAGE_SIZE].copy_from_slice(&image_bytes());
    m[4096..8192].fill(0x11);
    m[10_000..10_019].copy_from_slice(b"streamer fixture v1");
    m[20_000..30_000].fill(0);
    m[200_000..205_000].fill(0x22);
    m[0..10].fill(0x33);
    m
}

fn storage(name: &str, create: bool) -> FileStorage {
    let f: File = OpenOptions::new()
        .read(true)
        .write(create)
        .create(create)
        .truncate(create)
        .open(dir().join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    FileStorage::new(f).unwrap()
}

fn write_fixture() {
    use volume_format::Storage;
    std::fs::create_dir_all(dir()).unwrap();
    let mut raw = storage("golden.raw", true);
    raw.write_at(0, &image_bytes()).unwrap();
    raw.sync().unwrap();
    let info = image::seal(&mut raw, *b"fixture-image-v1", |_| {}).unwrap();
    info.store(&mut storage("golden.meta", true)).unwrap();
    let mut v = Volume::create(
        storage("clone.meta", true),
        storage("clone.data", true),
        Some((raw, info.image_ref())),
        VOLUME_SIZE,
        *b"fixture-volume-1",
        *b"fixture-gen-0001",
    )
    .unwrap();
    v.write(4096, &[0x11; 4096]).unwrap();
    v.write(10_000, b"streamer fixture v1").unwrap();
    v.write_zeroes(20_000, 10_000).unwrap();
    v.write(200_000, &[0x22; 5000]).unwrap();
    v.flush().unwrap();
    v.begin_epoch(3, *b"fixture-gen-0002").unwrap();
    v.write(0, &[0x33; 10]).unwrap();
    v.flush().unwrap();
    v.close().unwrap();
}

#[test]
fn version_1_fixture_still_reads() {
    if std::env::var_os("STREAMER_WRITE_FIXTURE").is_some() {
        write_fixture();
    }
    let info = ImageInfo::load(&mut storage("golden.meta", false)).unwrap();
    assert_eq!(&info.id, b"fixture-image-v1");
    assert!(
        image::verify(&mut storage("golden.raw", false), &info, |_| {})
            .unwrap()
            .ok()
    );
    let (mut meta, mut data) = (storage("clone.meta", false), storage("clone.data", false));
    let r = check(&mut meta, &mut data, false);
    // A git checkout fills the data file's holes with real zeroes, which the checker sees as
    // leaked space; anything else would be corruption.
    assert!(r.errors.is_empty(), "{r:?}");
    for &(off, len) in &r.leaks {
        let mut buf = vec![0u8; len as usize];
        volume_format::Storage::read_at(&mut data, off, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0), "leak at {off} holds data");
    }
    let mut v = Volume::open(
        meta,
        data,
        Some((storage("golden.raw", false), info.image_ref())),
    )
    .unwrap();
    let mut got = vec![0u8; VOLUME_SIZE as usize];
    v.read(0, &mut got).unwrap();
    assert!(got == expected(), "the fixture reads differently");
    let sb = v.state().superblock();
    assert_eq!((sb.epoch, &sb.generation), (3, b"fixture-gen-0002"));
    let ext = v.block_status(0, VOLUME_SIZE).unwrap();
    assert_eq!(
        ext.last().unwrap().layer,
        Layer::None,
        "past the image: no layer"
    );
}
