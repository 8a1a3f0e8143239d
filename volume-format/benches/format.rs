//! volume-format costs: map lookups and updates, read planning, clone creation on a real file
//! system, metadata bytes per volume, and first-write amplification (bytes written to disk per
//! 4 KiB first write to a clone; qcow2 with 64 KiB clusters writes 16x before its metadata).
//!
//! `cargo bench -p volume-format` runs it; the figures that are sizes rather than times are
//! printed before the timings.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use volume_format::{BlockMap, BlockState, ImageRef, MemFile, Storage, Volume, VolumeState};

const GIB: u64 = 1 << 30;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn image(size: u64) -> ImageRef {
    ImageRef {
        id: [1; 16],
        size,
        digest: [2; 32],
    }
}

/// A 100 GiB clone with a quarter of its blocks written in scattered runs.
fn busy_state() -> VolumeState {
    let (mut st, _) =
        VolumeState::create([3; 16], [4; 16], 100 * GIB, Some(image(100 * GIB))).unwrap();
    let blocks = st.map().blocks();
    let mut s = 7u64;
    for _ in 0..200_000 {
        let b = xorshift(&mut s) % (blocks - 64);
        st.mark_own(b, 1 + xorshift(&mut s) % 64);
    }
    st
}

fn map(c: &mut Criterion) {
    let st = busy_state();
    let blocks = st.map().blocks();
    let mut s = 11u64;
    c.bench_function("map lookup (random block, 100 GiB clone)", |b| {
        b.iter(|| black_box(st.state(xorshift(&mut s) % blocks)))
    });
    let mut m = BlockMap::new(blocks);
    c.bench_function("map update (random 4 KiB block OWN)", |b| {
        b.iter(|| m.set(xorshift(&mut s) % blocks, 1, BlockState::Own))
    });
    c.bench_function("read plan (random 4 KiB read)", |b| {
        b.iter(|| {
            let off = (xorshift(&mut s) % blocks) * 4096;
            let mut n = 0;
            st.pieces(off, 4096, |p| n += p.len);
            black_box(n)
        })
    });
    c.bench_function("read plan (1 MiB read)", |b| {
        b.iter(|| {
            let off = (xorshift(&mut s) % (blocks - 256)) * 4096;
            let mut n = 0;
            st.pieces(off, 1 << 20, |p| n += p.len);
            black_box(n)
        })
    });
}

fn clone_creation(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("vf-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("img.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(GIB << 10)
        .unwrap(); // a 1 TiB sparse image
    let mut i = 0u64;
    let open = |p: &std::path::Path| {
        volume_format::FileStorage::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .unwrap(),
        )
        .unwrap()
    };
    let mut g = c.benchmark_group("clone");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("create a clone of a 1 TiB image (files, fsyncs)", |b| {
        b.iter(|| {
            i += 1;
            let meta = open(&dir.join(format!("{i}.meta")));
            let data = open(&dir.join(format!("{i}.data")));
            let img = volume_format::FileStorage::new(std::fs::File::open(&raw).unwrap()).unwrap();
            let v = Volume::create(
                meta,
                data,
                Some((img, image(GIB << 10))),
                GIB << 10,
                [5; 16],
                [6; 16],
            )
            .unwrap();
            black_box(v.size())
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sizes, not times: printed once.
fn costs(_: &mut Criterion) {
    // Metadata per volume.
    for (name, written) in [
        ("fresh clone", 0u64),
        ("one block per 126 MiB map page", 1),
        ("fully written", u64::MAX),
    ] {
        let size = 100 * GIB;
        let (mut st, _) = VolumeState::create([3; 16], [4; 16], size, Some(image(size))).unwrap();
        let blocks = st.map().blocks();
        match written {
            0 => {}
            1 => (0..blocks)
                .step_by(volume_format::layout::BLOCKS_PER_MAP_PAGE as usize)
                .for_each(|b| st.mark_own(b, 1)),
            _ => st.mark_own(0, blocks),
        }
        let pages_on_disk = st.map().resident_pages() as u64;
        println!(
            "metadata, 100 GiB volume, {name}: {} KiB in memory, {} KiB on disk",
            st.memory_bytes() / 1024,
            (8192 + pages_on_disk * 2 * 4096) / 1024
        );
    }
    // First-write amplification.
    for every in [1u64, 16, 256] {
        let mut v = Volume::create(
            MemFile::new(),
            MemFile::new(),
            Some((sized(GIB), image(GIB))),
            GIB,
            [5; 16],
            [6; 16],
        )
        .unwrap();
        let mut s = 5u64;
        let n = 4096u64;
        let started = Instant::now();
        for i in 0..n {
            let b = xorshift(&mut s) % (GIB / 4096);
            v.write(b * 4096, &[0xab; 4096]).unwrap();
            if (i + 1) % every == 0 {
                v.flush().unwrap();
            }
        }
        let elapsed = started.elapsed();
        let (meta, data, img) = v.into_parts();
        let written = meta.bytes_written() + data.bytes_written();
        println!(
            "first-write amplification, flush every {every:>3} writes: {:.2}x ({} data + {} metadata bytes for {} bytes written; {} bytes read from the image; {:?} per write in memory)",
            written as f64 / (n * 4096) as f64,
            data.bytes_written(),
            meta.bytes_written(),
            n * 4096,
            img.unwrap().bytes_read(),
            elapsed / n as u32
        );
    }
}

/// A real file, created if missing, as storage.
fn file(p: &std::path::Path) -> volume_format::FileStorage {
    volume_format::FileStorage::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .unwrap(),
    )
    .unwrap()
}

fn sized(len: u64) -> MemFile {
    let mut f = MemFile::new();
    f.set_len(len).unwrap();
    f
}

/// Reading an untouched clone against reading its golden image directly, on a real file (warm
/// page cache: this measures what the format adds, not the disk).
fn untouched_clone_reads(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("vf-bench-read-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let raw = dir.join("img.raw");
    let size = 256u64 << 20;
    std::fs::write(&raw, vec![0x5au8; size as usize]).unwrap();
    let mut direct = file(&raw);
    let mut vol = Volume::create(
        file(&dir.join("v.meta")),
        file(&dir.join("v.data")),
        Some((file(&raw), image(size))),
        size,
        [5; 16],
        [6; 16],
    )
    .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut g = c.benchmark_group("read 1 MiB");
    let mut pos = 0u64;
    g.bench_function("golden image file directly", |b| {
        b.iter(|| {
            direct.read_at(pos, &mut buf).unwrap();
            pos = (pos + (1 << 20)) % size;
        })
    });
    g.bench_function("untouched clone of it", |b| {
        b.iter(|| {
            vol.read(pos, &mut buf).unwrap();
            pos = (pos + (1 << 20)) % size;
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the bounded map cache costs: a 4 KiB read of a written block whose map page is in
/// memory, against random pages of a map four times the cache, most of which were evicted and
/// are read back from the metadata file (a real file, warm page cache: the read of a 4 KiB slot,
/// its crc32c and the install), on a 2 TiB volume with a block written in each of its 16644
/// map pages.
fn map_cache_misses(c: &mut Criterion) {
    use volume_format::layout::BLOCKS_PER_MAP_PAGE;
    let dir = std::env::temp_dir().join(format!("vf-bench-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let size = 2u64 << 40;
    let mut vol = Volume::create(
        file(&dir.join("v.meta")),
        file(&dir.join("v.data")),
        None,
        size,
        [5; 16],
        [6; 16],
    )
    .unwrap();
    let pages = vol.state().map().pages() as u64;
    for p in 0..pages {
        vol.write(p * BLOCKS_PER_MAP_PAGE * 4096, &[7u8; 4096])
            .unwrap();
    }
    vol.flush().unwrap();
    let mut buf = [0u8; 4096];
    let mut g = c.benchmark_group("4 KiB read of a written block");
    let mut s = 5u64;
    g.bench_function("map page in memory", |b| {
        b.iter(|| {
            let p = xorshift(&mut s) % 8;
            vol.read(p * BLOCKS_PER_MAP_PAGE * 4096, &mut buf).unwrap();
        })
    });
    // The default cache (16 MiB: 4096 pages) on a map four times its size: three reads in four
    // read their page back, and every 512 read-backs a trim scans the map.
    vol.set_cache_pages(4096);
    g.bench_function("random page, 3 in 4 evicted (read back)", |b| {
        b.iter(|| {
            let p = xorshift(&mut s) % pages;
            vol.read(p * BLOCKS_PER_MAP_PAGE * 4096, &mut buf).unwrap();
        })
    });
    g.finish();
    println!(
        "map memory of the 2 TiB volume, every page written: {} KiB with the whole map, {} KiB with a cache of 4096 pages",
        (pages as usize * 4096) >> 10,
        vol.state().memory_bytes() >> 10
    );
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(
    benches,
    costs,
    map,
    clone_creation,
    untouched_clone_reads,
    map_cache_misses
);
criterion_main!(benches);
