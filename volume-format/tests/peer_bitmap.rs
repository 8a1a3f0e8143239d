//! The peer dirty bitmap (SPEC.md §10) under crashes: a volume on `MemFile`s keeps a bitmap
//! while random writes, zeroings, flushes and clears (a resync acknowledging blocks) run, and
//! is cut off at random points, inside flushes at every step of the commit protocol too, then
//! power-cut (unsynced metadata writes kept, dropped or torn; data pages any version). After
//! each crash the volume must reopen, still keep its bitmap, and the bitmap must hold every
//! block changed since it started (or since that block was cleared) whose change a completed
//! flush acknowledged: a resync driven by it never misses an acknowledged write.

mod common;

use std::collections::BTreeSet;

use common::*;
use volume_format::{Fate, MemFile, Volume, check};

/// Three windows on three map pages (the bitmap's pages are as far apart).
const WINDOWS: [u64; 3] = [0, 130 << 20, 260 << 20];
const WINDOW: u64 = 1 << 20;
const VOLUME_SIZE: u64 = (260 << 20) + WINDOW;

fn blocks_of(off: u64, len: u64) -> impl Iterator<Item = u64> {
    off / BLOCK..(off + len).div_ceil(BLOCK)
}

fn bits(vol: &Volume<MemFile>) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some((start, count)) = vol.next_peer_dirty(from, u64::MAX) {
        out.extend(start..start + count);
        from = start + count;
    }
    out
}

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

fn scenario(seed: u64, crashes: usize) -> usize {
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
    // Writes before the bitmap starts are the peer's already: not in it.
    vol.write(WINDOWS[1], &[7; 8192]).unwrap();
    vol.flush().unwrap();
    vol.start_peer_bitmap(&[(WINDOWS[2], 100)], [5; 16])
        .unwrap();
    // Blocks a completed flush acknowledged (must be set) and changed since the last flush.
    let mut must: BTreeSet<u64> = blocks_of(WINDOWS[2], 100).collect();
    let mut pending: BTreeSet<u64> = BTreeSet::new();
    let mut mid_flush = 0;
    for crash in 0..crashes {
        let ctx = format!("seed {seed} crash {crash}");
        for _ in 0..1 + rng.below(25) {
            let w = WINDOWS[rng.below(3) as usize];
            let off = w + rng.below(WINDOW - 6 * BLOCK);
            match rng.below(12) {
                0..=5 => {
                    let len = 1 + rng.below(5 * BLOCK);
                    let mut buf = vec![0u8; len as usize];
                    rng.fill(&mut buf);
                    vol.write(off, &buf).unwrap();
                    pending.extend(blocks_of(off, len));
                }
                6..=7 => {
                    let len = 1 + rng.below(5 * BLOCK);
                    vol.write_zeroes(off, len).unwrap();
                    pending.extend(blocks_of(off, len));
                }
                8 => {
                    // The resync made these blocks equal on the peer: their bits go.
                    let first = off / BLOCK;
                    let n = 1 + rng.below(64);
                    vol.clear_peer_dirty(first, n);
                    for b in first..first + n {
                        must.remove(&b);
                        pending.remove(&b);
                    }
                }
                _ => {
                    vol.flush().unwrap();
                    must.append(&mut pending);
                }
            }
        }
        assert_eq!(
            bits(&vol),
            must.union(&pending).copied().collect(),
            "{ctx}: the bits in memory are exactly the blocks changed and not cleared"
        );
        if rng.chance(60) {
            mid_flush += 1;
            let in_meta = rng.chance(80);
            let step = 1 + rng.below(if in_meta { 6 } else { 2 });
            let (meta, data) = vol.files_mut();
            let f = if in_meta { meta } else { data };
            f.fail_from(f.ops() + step, 5);
            if vol.flush().is_ok() {
                must.append(&mut pending);
            }
        }
        let (mut meta, mut data, image) = vol.into_parts();
        cut(&mut meta, &mut rng);
        data.power_cut_pages(|_, n| rng.below(n as u64 + 1) as usize);
        let r = check(&mut meta, &mut data, true);
        assert!(
            r.errors.is_empty(),
            "{ctx}: checker found corruption: {r:?}"
        );
        vol = Volume::open(meta, data, image.map(|i| (i, backing)))
            .unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
        assert!(vol.peer_bitmap(), "{ctx}: the bitmap survives");
        let got = bits(&vol);
        let missed: Vec<_> = must.difference(&got).take(5).collect();
        assert!(
            missed.is_empty(),
            "{ctx}: acknowledged changes missing from the bitmap: {missed:?}"
        );
        // What the bitmap holds now is the baseline (a cleared bit that came back only
        // repeats work).
        must = got;
        pending.clear();
    }
    mid_flush
}

#[test]
fn the_bitmap_never_misses_an_acknowledged_change_across_crashes() {
    let mut cut_flushes = 0;
    for seed in 1..=30 {
        cut_flushes += scenario(seed, 40);
    }
    assert!(cut_flushes > 500, "{cut_flushes}");
}

type Generations = ([u8; 16], Option<[u8; 16]>, [[u8; 16]; 2]);

/// The generation identifiers (SPEC.md §10, generations) under crashes: a volume goes through
/// random starts, rebases and ends of its bitmap and sets of its generation, among writes and
/// flushes, and is cut off inside those commits too, then power-cut (unsynced metadata writes
/// kept, dropped or torn). Each change commits before it returns, so after a power cut the
/// volume has the identifiers of the last change that returned, or (cut inside its commit)
/// those of the one before or of the one cut: never a mix of the two. It keeps a bitmap
/// exactly when they say so, and the bitmap's blocks survive a rebase.
fn generations_scenario(seed: u64, crashes: usize) -> [usize; 3] {
    let mut rng = Rng::new(seed);
    let size: u64 = 64 << 20;
    let mut vol =
        Volume::create(MemFile::new(), data_file(), None, size, rng.id(), rng.id()).unwrap();
    let mut committed: Generations = vol.generations();
    // Changes cut inside their commit, and how many of those the volume had after the crash
    // without (the one before) and with (the one cut).
    let mut outcomes = [0; 3];
    for crash in 0..crashes {
        let ctx = format!("seed {seed} crash {crash}");
        // What the volume may hold after the crash.
        let mut may = vec![committed];
        // Blocks set in the bitmap that a completed commit made durable.
        let mut must: BTreeSet<u64> = bits(&vol);
        for _ in 0..1 + rng.below(10) {
            let cut_here = rng.chance(15);
            if cut_here {
                let (meta, _) = vol.files_mut();
                meta.fail_from(meta.ops() + 1 + rng.below(6), 5);
            }
            let result = match rng.below(6) {
                0 | 1 => {
                    let off = rng.below(size - 8 * BLOCK);
                    let mut buf = vec![0u8; (1 + rng.below(8 * BLOCK)) as usize];
                    rng.fill(&mut buf);
                    vol.write(off, &buf).map(|_| ())
                }
                2 => vol.flush(),
                _ if vol.peer_bitmap() => {
                    if rng.chance(50) {
                        vol.rebase_peer_bitmap(rng.id())
                    } else {
                        vol.clear_peer_dirty(0, size / BLOCK);
                        vol.end_peer_bitmap().map(|ended| assert!(ended, "{ctx}"))
                    }
                }
                _ => {
                    if rng.chance(60) {
                        let extra = [(rng.below(size - BLOCK), 1 + rng.below(64 * BLOCK))];
                        vol.start_peer_bitmap(&extra, rng.id())
                    } else {
                        let g = if rng.chance(10) { [0; 16] } else { rng.id() };
                        vol.set_generation(g, rng.chance(50))
                    }
                }
            };
            match result {
                Ok(()) => {
                    // Committed (a write or flush changes no identifier).
                    committed = vol.generations();
                    may = vec![committed];
                    if !vol.peer_bitmap() {
                        must.clear();
                    }
                    must = must.intersection(&bits(&vol)).copied().collect();
                    if cut_here {
                        break;
                    }
                }
                Err(_) => {
                    assert!(cut_here, "{ctx}: a change failed with no fault injected");
                    if vol.generations() != committed {
                        outcomes[0] += 1;
                        may.push(vol.generations());
                    }
                    break;
                }
            }
        }
        let (mut meta, mut data, _) = vol.into_parts();
        cut(&mut meta, &mut rng);
        data.power_cut_pages(|_, n| rng.below(n as u64 + 1) as usize);
        let r = check(&mut meta, &mut data, true);
        assert!(
            r.errors.is_empty(),
            "{ctx}: checker found corruption: {r:?}"
        );
        vol =
            Volume::open(meta, data, None).unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"));
        let got = vol.generations();
        assert!(
            may.contains(&got),
            "{ctx}: generations {got:?} are none of {may:?}"
        );
        assert_eq!(vol.peer_bitmap(), got.1.is_some(), "{ctx}");
        if may.len() == 2 {
            outcomes[if got == may[0] { 1 } else { 2 }] += 1;
        }
        if got == committed && vol.peer_bitmap() {
            let now = bits(&vol);
            let missed: Vec<_> = must.difference(&now).take(5).collect();
            assert!(missed.is_empty(), "{ctx}: committed bits lost: {missed:?}");
        }
        committed = got;
    }
    outcomes
}

#[test]
fn generations_survive_crashes_whole() {
    let mut total = [0; 3];
    for seed in 1..=40 {
        let o = generations_scenario(seed, 30);
        for i in 0..3 {
            total[i] += o[i];
        }
    }
    // Commits of a change of the identifiers were cut often, and crashes kept the old ones
    // as well as the new ones.
    assert!(total[0] > 50 && total[1] > 10 && total[2] > 10, "{total:?}");
}

/// A bitmap is ended only when empty; ended, it is gone after a reopen, and a new one started
/// later holds only its own changes (an old bitmap's pages on disk are not taken for its).
#[test]
fn an_ended_bitmap_stays_ended_and_a_new_one_starts_empty() {
    let mut rng = Rng::new(5);
    let mut m = Modelled::clone_of(&mut rng, None, 512 << 20);
    m.vol.start_peer_bitmap(&[], [5; 16]).unwrap();
    m.vol.write(40_000 * BLOCK, &[1; 4096]).unwrap();
    m.vol.write(3 * BLOCK, &[1; 4096]).unwrap();
    m.vol.flush().unwrap();
    assert_eq!(m.vol.peer_dirty_blocks(), 2);
    assert!(
        !m.vol.end_peer_bitmap().unwrap(),
        "refused while bits are set"
    );
    m.vol.clear_peer_dirty(0, 50_000);
    assert!(m.vol.end_peer_bitmap().unwrap());
    m.vol.write(90_000 * BLOCK, &[1; 4096]).unwrap();
    let (meta, data, _) = m.vol.into_parts();
    let mut v = Volume::open(meta, data, None).unwrap();
    assert!(!v.peer_bitmap());
    v.start_peer_bitmap(&[], [5; 16]).unwrap();
    v.write(5 * BLOCK, &[2; 4096]).unwrap();
    v.flush().unwrap();
    let (meta, data, _) = v.into_parts();
    let v = Volume::open(meta, data, None).unwrap();
    assert!(v.peer_bitmap());
    assert_eq!(bits(&v), BTreeSet::from([5]));
}

/// Generations (SPEC.md §10): starting a bitmap moves the current generation to the bitmap's
/// and takes the new one in the same commit; ending it puts the bitmap's in the history; a
/// replica sets (adopts) a generation only without a bitmap; all of it survives a reopen.
#[test]
fn generations_move_with_the_bitmap_and_survive_a_reopen() {
    let mut rng = Rng::new(11);
    let mut m = Modelled::clone_of(&mut rng, None, 64 << 20);
    let (g0, b, h) = m.vol.generations();
    assert_eq!((b, h), (None, [[0; 16]; 2]));
    m.vol.start_peer_bitmap(&[], [1; 16]).unwrap();
    assert_eq!(m.vol.generations(), ([1; 16], Some(g0), [[0; 16]; 2]));
    // A second start keeps both (the bitmap and its generation are the first miss's).
    m.vol.start_peer_bitmap(&[], [2; 16]).unwrap();
    assert_eq!(m.vol.generations().0, [1; 16]);
    assert!(m.vol.set_generation([3; 16], true).is_err());
    // Durable at once: the start committed.
    let (meta, data, _) = m.vol.into_parts();
    let mut v = Volume::open(meta, data, None).unwrap();
    assert_eq!(v.generations(), ([1; 16], Some(g0), [[0; 16]; 2]));
    assert!(v.end_peer_bitmap().unwrap());
    assert_eq!(v.generations(), ([1; 16], None, [g0, [0; 16]]));
    v.start_peer_bitmap(&[], [4; 16]).unwrap();
    // The peer adopted 4 before the bitmap ended: rebased, the bitmap counts from 4 and the
    // volume writes on as 7.
    v.rebase_peer_bitmap([7; 16]).unwrap();
    assert_eq!(v.generations(), ([7; 16], Some([4; 16]), [[1; 16], g0]));
    assert!(v.end_peer_bitmap().unwrap());
    assert_eq!(v.generations(), ([7; 16], None, [[4; 16], [1; 16]]));
    v.set_generation([4; 16], false).unwrap();
    // A replica adopting its owner's generation keeps its own in the history; a discard (zero)
    // does not.
    v.set_generation([6; 16], true).unwrap();
    assert_eq!(v.generations(), ([6; 16], None, [[4; 16], [1; 16]]));
    v.set_generation([0; 16], false).unwrap();
    let (meta, data, _) = v.into_parts();
    let v = Volume::open(meta, data, None).unwrap();
    assert_eq!(v.generations(), ([0; 16], None, [[4; 16], [1; 16]]));
}

/// A build that does not know the feature must refuse the volume (its writes would not be
/// recorded in the bitmap): the feature bit is incompatible, and a forged superblock claiming
/// it without its fields is refused by name.
#[test]
fn the_feature_is_incompatible_and_its_fields_are_checked() {
    use volume_format::Superblock;
    use volume_format::layout::INCOMPAT_PEER_DIRTY_BITMAP;
    let mut rng = Rng::new(9);
    let mut m = Modelled::clone_of(&mut rng, None, 64 << 20);
    m.vol.start_peer_bitmap(&[], [5; 16]).unwrap();
    let (mut meta, _, _) = m.vol.into_parts();
    let mut a = [0u8; 4096];
    volume_format::Storage::read_at(&mut meta, 0, &mut a).unwrap();
    let sb = Superblock::decode(&a).unwrap();
    assert!(sb.incompat & INCOMPAT_PEER_DIRTY_BITMAP != 0 && sb.peer_since > 0);
    // The feature without a starting commit.
    a[192..200].copy_from_slice(&0u64.to_le_bytes());
    Superblock::reseal(&mut a);
    let e = Superblock::decode(&a).unwrap_err().to_string();
    assert!(e.contains("peer dirty bitmap"), "{e}");
    // Its fields without the feature.
    let mut b = [0u8; 4096];
    volume_format::Storage::read_at(&mut meta, 0, &mut b).unwrap();
    b[16..24].copy_from_slice(&0u64.to_le_bytes());
    Superblock::reseal(&mut b);
    let e = Superblock::decode(&b).unwrap_err().to_string();
    assert!(e.contains("without the feature"), "{e}");
}
