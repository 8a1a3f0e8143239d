//! Crash tests: a volume on `MemFile`s (written and durable contents kept apart) is cut off at
//! random points: between operations, and in the middle of flushes, at every step of the commit
//! protocol (the Nth metadata or data operation fails, as if the machine stopped there). Then a
//! power cut keeps any subset of the unsynced metadata writes, each whole, dropped or torn at
//! 512-byte sectors; each data page changed since the last sync ends as any one of the versions
//! it held (page-cache write-back of whole 4 KiB pages, as SPEC.md §7 assumes). After each crash the volume must
//! reopen with no corruption (leaks allowed, then repaired), every write acknowledged by a
//! completed flush must read back, and every block must read as one of the contents it had since
//! that flush.

mod common;

use common::*;
use volume_format::{Fate, MemFile, Volume, check};

/// The model covers three 1 MiB windows that lie on three different map pages (126 MiB
/// apart), so commits touch several pages and a crash can leave some of them behind.
const WINDOW: u64 = 1 << 20;
const WINDOWS: [u64; 3] = [0, 130 << 20, 260 << 20];
const SIZE: u64 = WINDOW * WINDOWS.len() as u64;
const VOLUME_SIZE: u64 = (260 << 20) + WINDOW;
const BLOCKS: usize = (SIZE / BLOCK) as usize;

/// Volume offset of window-space offset `off`.
fn phys(off: u64) -> u64 {
    WINDOWS[(off / WINDOW) as usize] + off % WINDOW
}

/// A random range of window space that stays inside one window.
fn window_range(rng: &mut Rng, max_len: u64, align: bool) -> (u64, u64) {
    let mut off = rng.below(SIZE);
    if align {
        off -= off % BLOCK;
    }
    let len = (1 + rng.below(max_len)).min(WINDOW - off % WINDOW);
    (off, len)
}

/// Per block: the contents as of the last completed flush, and every contents it took since.
struct Model {
    durable: Vec<Vec<u8>>,
    since: Vec<Vec<Vec<u8>>>,
    current: Vec<u8>,
}

impl Model {
    fn new(initial: Vec<u8>) -> Model {
        let durable = initial.chunks(BLOCK as usize).map(<[u8]>::to_vec).collect();
        Model {
            durable,
            since: vec![Vec::new(); BLOCKS],
            current: initial,
        }
    }

    /// Records a change to `[off, off+len)` of the current contents.
    fn changed(&mut self, off: u64, len: u64) {
        let first = (off / BLOCK) as usize;
        let last = ((off + len - 1) / BLOCK) as usize;
        for b in first..=last {
            let blk = self.current[b * BLOCK as usize..(b + 1) * BLOCK as usize].to_vec();
            self.since[b].push(blk);
        }
    }

    fn flushed(&mut self) {
        for (b, d) in self.durable.iter_mut().enumerate() {
            *d = self.current[b * BLOCK as usize..(b + 1) * BLOCK as usize].to_vec();
        }
        for s in &mut self.since {
            s.clear();
        }
    }

    /// Checks a block read after a crash and adopts it as the new durable state.
    fn judge(&mut self, b: usize, got: &[u8], ctx: &str) {
        let ok = got == self.durable[b] || self.since[b].iter().any(|v| v == got);
        if !ok {
            let diff = |v: &[u8]| v.iter().zip(got).filter(|(a, b)| a != b).count();
            eprintln!(
                "got zero={} diffs: durable {} since {:?}",
                got.iter().all(|&x| x == 0),
                diff(&self.durable[b]),
                self.since[b].iter().map(|v| diff(v)).collect::<Vec<_>>()
            );
        }
        assert!(
            ok,
            "{ctx}: block {b} reads neither its flushed contents nor any later write ({} candidates)",
            1 + self.since[b].len()
        );
        self.current[b * BLOCK as usize..(b + 1) * BLOCK as usize].copy_from_slice(got);
    }
}

/// Cuts the power on a file: each unsynced change persists, drops or tears at random.
fn cut(f: &mut MemFile, rng: &mut Rng) {
    let mut fates = Vec::new();
    for _ in 0..f.unsynced() {
        fates.push(match rng.below(3) {
            0 => Fate::Persist,
            1 => Fate::Drop,
            _ => Fate::Tear,
        });
    }
    let mut r2 = Rng::new(rng.next());
    f.power_cut(|i| fates[i], |_, _| r2.chance(50));
}

/// Cuts the power on a data file: each changed page ends as one of its versions.
fn cut_pages(f: &mut MemFile, rng: &mut Rng) {
    f.power_cut_pages(|_, n| rng.below(n as u64 + 1) as usize);
}

fn scenario(seed: u64, crashes: usize) -> (usize, usize) {
    let mut rng = Rng::new(seed);
    let g = Golden::new(&mut rng, (1 << 20) + 777);
    let backing = g.info.image_ref();
    let mut vol = Volume::create(
        MemFile::new(),
        data_file(),
        g.backing(),
        VOLUME_SIZE,
        rng.id(),
        rng.id(),
    )
    .unwrap();
    let mut initial = vec![0u8; SIZE as usize];
    initial[..WINDOW as usize].copy_from_slice(&g.bytes[..WINDOW as usize]);
    let mut model = Model::new(initial);
    let (mut mid_flush, mut leaks_seen) = (0, 0);
    for crash in 0..crashes {
        let ctx = format!("seed {seed} crash {crash}");
        // A burst of operations with flushes between some of them.
        for _ in 0..1 + rng.below(25) {
            match rng.below(10) {
                0..=5 => {
                    let max = if rng.chance(50) { 64 } else { 5 * BLOCK };
                    let align = rng.chance(40);
                    let (off, len) = window_range(&mut rng, max, align);
                    let mut buf = vec![0u8; len as usize];
                    rng.fill(&mut buf);
                    vol.write(phys(off), &buf).unwrap();
                    model.current[off as usize..(off + len) as usize].copy_from_slice(&buf);
                    model.changed(off, len);
                }
                6..=7 => {
                    let (off, len) = window_range(&mut rng, 8 * BLOCK, false);
                    vol.write_zeroes(phys(off), len).unwrap();
                    model.current[off as usize..(off + len) as usize].fill(0);
                    model.changed(off, len);
                }
                _ => {
                    vol.flush().unwrap();
                    model.flushed();
                }
            }
        }
        // The crash: between operations, or inside a flush at a random step.
        if rng.chance(60) {
            mid_flush += 1;
            let in_meta = rng.chance(70);
            let step = 1 + rng.below(if in_meta { 6 } else { 2 });
            let (meta, data) = vol.files_mut();
            let f = if in_meta { meta } else { data };
            f.fail_from(f.ops() + step, 5);
            match vol.flush() {
                Ok(()) => model.flushed(), // the failure point lay past this flush's I/O
                Err(_) => {
                    // Latched: it must not pretend later success.
                    assert!(vol.flush().is_err() && vol.write(0, &[1]).is_err(), "{ctx}");
                }
            }
        }
        let (mut meta, mut data, image) = vol.into_parts();
        cut(&mut meta, &mut rng);
        cut_pages(&mut data, &mut rng);
        // Reopen: no corruption. Leaks are allowed; repair them and check again.
        let r = check(&mut meta, &mut data, true);
        assert!(
            r.errors.is_empty(),
            "{ctx}: checker found corruption: {r:?}"
        );
        leaks_seen += usize::from(!r.leaks.is_empty());
        let r = check(&mut meta, &mut data, false);
        assert!(r.clean(), "{ctx}: still unclean after repair: {r:?}");
        // Half the time with a one-page map cache: pages (orphans of the cut commit among
        // them) are evicted while loading and read back from their slots.
        let cache = if rng.chance(50) { 1 } else { usize::MAX };
        vol = Volume::open_with_cache(meta, data, image.map(|i| (i, backing)), cache)
            .unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
        let mut got = vec![0u8; SIZE as usize];
        for (w, chunk) in got.chunks_mut(WINDOW as usize).enumerate() {
            vol.read(WINDOWS[w], chunk).unwrap();
        }
        for b in 0..BLOCKS {
            model.judge(b, &got[b * BLOCK as usize..(b + 1) * BLOCK as usize], &ctx);
        }
        model.flushed(); // what survived is the new baseline
    }
    (mid_flush, leaks_seen)
}

#[test]
fn crashes_anywhere_lose_nothing_flushed_and_corrupt_nothing() {
    let mut totals = (0, 0);
    for seed in 1..=40 {
        let (m, l) = scenario(seed, 60);
        totals.0 += m;
        totals.1 += l;
    }
    // The scenarios really did cut flushes and really did leave leaks to repair.
    assert!(totals.0 > 1000, "{totals:?}");
    assert!(totals.1 > 100, "{totals:?}");
}

#[test]
fn a_commit_cut_at_every_single_step_recovers() {
    // Deterministic sweep: one flush with several dirty pages, failed at each metadata and data
    // operation in turn, then every unsynced change dropped, persisted, or torn.
    let mut rng = Rng::new(777);
    for fate in [Fate::Drop, Fate::Persist, Fate::Tear] {
        for step in 1..=8u64 {
            let g = Golden::new(&mut rng, 1 << 20);
            let backing = g.info.image_ref();
            let mut m = Modelled::clone_of(&mut rng, Some(&g), 512 << 20);
            // Writes on three map pages (126 MiB apart) plus a generation change.
            for b in [3u64, 40_000, 90_000] {
                m.vol.write(b * BLOCK, &[b as u8; 4096]).unwrap();
            }
            m.vol.flush().unwrap();
            for b in [4u64, 40_001, 90_001] {
                m.vol.write(b * BLOCK, &[0x5a; 4096]).unwrap();
            }
            let meta = m.vol.files_mut().0;
            meta.fail_from(meta.ops() + step, 5);
            let flushed = m.vol.flush().is_ok();
            let (mut meta, mut data, image) = m.vol.into_parts();
            let mut r2 = Rng::new(step);
            meta.power_cut(|_| fate, |_, _| r2.chance(50));
            data.power_cut_pages(|_, n| match fate {
                Fate::Drop => 0,
                Fate::Persist => n,
                Fate::Tear => r2.below(n as u64 + 1) as usize,
            });
            let r = check(&mut meta, &mut data, true);
            assert!(r.errors.is_empty(), "{fate:?} step {step}: {r:?}");
            let cache = if step % 2 == 0 { 1 } else { usize::MAX };
            let mut v =
                Volume::open_with_cache(meta, data, image.map(|i| (i, backing)), cache).unwrap();
            for b in [3u64, 40_000, 90_000] {
                let mut got = [0u8; 4096];
                v.read(b * BLOCK, &mut got).unwrap();
                assert_eq!(
                    got, [b as u8; 4096],
                    "{fate:?} step {step}: flushed block {b}"
                );
            }
            for b in [4u64, 40_001, 90_001] {
                let mut got = [0u8; 4096];
                v.read(b * BLOCK, &mut got).unwrap();
                let old = g
                    .bytes
                    .get((b * BLOCK) as usize..((b + 1) * BLOCK) as usize);
                let is_old = match old {
                    Some(o) => got[..] == *o,
                    None => got == [0; 4096],
                };
                assert!(
                    is_old || got == [0x5a; 4096],
                    "{fate:?} step {step}: block {b}"
                );
                if flushed {
                    assert_eq!(got, [0x5a; 4096], "{fate:?} step {step}: acknowledged");
                }
            }
        }
    }
}
