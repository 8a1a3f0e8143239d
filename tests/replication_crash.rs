//! The replication layer under crashes (issue 23, `docs/pair.md` §3.2 and §9): the owner's
//! `Mirror` and the other node's `Replica`, the code the nodes run, on two real pools in temp
//! dirs, driven by one thread with blocking calls (`target::blocking`), the peer link a
//! function call.
//!
//! A crash of either node drops every write it took since its last completed flush: its
//! volume's files go back to a copy taken when that flush completed (the harshest thing a
//! power cut may do to them; the activity log, which syncs each write of its own, stays). At
//! random points, then:
//! - **the replica crashes**: every block where the copies now differ lies in an extent of the
//!   owner's activity log, which the owner sets in its bitmap when told (`replica_crashed`);
//! - **the owner crashes**: every such block lies in an extent of the log it finds on restart
//!   (which it compares and resends, `pair_target`);
//! - either way every write a completed flush acknowledged is on the copy that crashed.
//!
//! The volumes are 16 GiB and the writes spread over them, so well over 1024 of the 4 MiB
//! extents are written and the log must let clean ones go; the last writes come with no flush,
//! to more than 1024 extents. The rule under test is that an extent leaves the log only once
//! its changes were flushed on both copies (an eviction of the least recently used extents
//! alone fails this test).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use streamer::peer::replica::Replica;
use streamer::peer::wire::Header;
use streamer::pool::Pool;
use streamer::target::activity::{self, ActivityLog, LogWriter};
use streamer::target::{
    Committers, Degrader, Mirror, PeerIo, PeerOp, TargetOp, VolumeTarget, blocking,
};

const SIZE: u64 = 16 << 30;
const BLOCK: u64 = 4096;
const EXTENT: u64 = 4 << 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One node's pool, and the copy of its volume's files taken at its last completed flush.
struct Side {
    dir: PathBuf,
    pool: Pool,
    target: Arc<VolumeTarget>,
}

impl Side {
    fn new(dir: PathBuf, committers: &Committers) -> Side {
        let _ = std::fs::remove_dir_all(&dir);
        let pool = Pool::open_or_create(&dir, true).unwrap();
        pool.create_volume("v", None, Some(SIZE)).unwrap();
        let target = Arc::new(open(&pool, committers));
        let side = Side { dir, pool, target };
        side.snapshot();
        side
    }

    fn files(&self) -> PathBuf {
        self.dir.join("volumes").join("v")
    }

    fn saved(&self) -> PathBuf {
        self.dir.join("at-last-flush")
    }

    /// What a crash goes back to: the volume's files as they are now (a flush just completed).
    fn snapshot(&self) {
        copy_volume(&self.files(), &self.saved());
    }

    /// The crash: every write since the last flush is gone; the volume opened again. Nothing
    /// else may hold the volume's target any more.
    fn crash(self, committers: &Committers) -> Side {
        let Side { dir, pool, target } = self;
        assert_eq!(Arc::strong_count(&target), 1, "the volume is still in use");
        drop(target);
        copy_volume(&dir.join("at-last-flush"), &dir.join("volumes").join("v"));
        let target = Arc::new(open(&pool, committers));
        Side { dir, pool, target }
    }

    fn read(&self, block: u64) -> Vec<u8> {
        let mut buf = vec![0u8; BLOCK as usize];
        let op = TargetOp::Read {
            offset: block * BLOCK,
            len: BLOCK as u32,
        };
        blocking::run(self.target.as_ref(), &op, &mut buf).unwrap();
        buf
    }
}

fn open(pool: &Pool, committers: &Committers) -> VolumeTarget {
    VolumeTarget::new("v", pool.open_volume("v").unwrap(), committers).unwrap()
}

/// Copies a volume's metadata and data files (the data file sparse: `cp` seeks over holes).
fn copy_volume(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["volume.meta", "volume.data"] {
        let st = std::process::Command::new("cp")
            .args(["--sparse=always", "-f"])
            .arg(from.join(f))
            .arg(to.join(f))
            .status()
            .unwrap();
        assert!(st.success(), "cp {f}");
    }
}

/// The content a write of `block` by write number `n` puts there.
fn pattern(block: u64, n: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    for (i, c) in b.chunks_mut(16).enumerate() {
        c[..8].copy_from_slice(&block.to_le_bytes());
        c[8..].copy_from_slice(&(n ^ i as u64).to_le_bytes());
    }
    b
}

fn in_ranges(ranges: &[(u64, u64)], block: u64) -> bool {
    let at = block * BLOCK;
    ranges.iter().any(|&(o, l)| o <= at && at < o + l)
}

/// One run: writes and flushes through the mirror until a crash of `victim` ("owner" or
/// "replica") at a random point after the log began to let extents go. The extents written,
/// and those the log held at the crash.
fn scenario(seed: u64, victim: &str) -> (usize, usize) {
    let ctx = format!("seed {seed}, {victim} crashes");
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let committers = Committers::start(1).unwrap();
    let base = std::env::temp_dir().join(format!("streamer-repl-{}-{seed}", std::process::id()));
    let mut owner = Side::new(base.join("a"), &committers);
    let mut replica = Side::new(base.join("b"), &committers);
    let (log_file, _) = owner.pool.open_activity_log("v").unwrap();
    let log = Arc::new(ActivityLog::new(log_file, None));
    // The node's activity thread, here on the calling thread.
    let writer: LogWriter = Arc::new(|log: Arc<ActivityLog>| log.commit().unwrap());
    let degrader: Degrader = Arc::new(|name: &str| panic!("{name}: the peer never fails here"));
    let mirror = Mirror::new(owner.target.clone(), 1, 1, None, degrader, log, writer);
    // What each written block holds on both now, and what it held at the last flush.
    let mut now: BTreeMap<u64, u64> = BTreeMap::new();
    let mut flushed: BTreeMap<u64, u64> = BTreeMap::new();
    let mut extents = BTreeSet::new();
    // Flushes now and then for the first writes, none in the last ones: more than 1024
    // extents then have changes no flush covers, and the log must keep every one of them
    // (least recently used is not enough).
    let last_flush = 1200;
    let crash_after = 2400 + rng.below(600);
    {
        let peer = Replica::new("v".into(), replica.target.clone(), 1, Box::new(|_| Ok(())));
        let mut cookie = 0;
        let mut send = |io: &PeerIo, buf: &[u8]| {
            cookie += 1;
            let mut payload = match io.op {
                PeerOp::Write => buf[io.buf_start as usize..][..io.len as usize].to_vec(),
                _ => Vec::new(),
            };
            let h = Header::data_request(io, cookie, &payload);
            match peer.apply(&h, &mut payload) {
                Ok(()) => 0,
                Err(errno) => -errno,
            }
        };
        for n in 1..=crash_after {
            if n < last_flush && rng.below(60) == 0 {
                blocking::run_with_peer(&mirror, &TargetOp::Flush, &mut [], &mut send).unwrap();
                owner.snapshot();
                replica.snapshot();
                flushed = now.clone();
                continue;
            }
            let extent = rng.below(SIZE / EXTENT);
            let first = extent * (EXTENT / BLOCK) + rng.below(EXTENT / BLOCK - 4);
            let count = 1 + rng.below(4);
            let mut buf = Vec::new();
            for b in first..first + count {
                buf.extend(pattern(b, n));
                now.insert(b, n);
            }
            extents.insert(extent);
            let op = TargetOp::Write {
                offset: first * BLOCK,
                len: buf.len() as u32,
                fua: false,
            };
            blocking::run_with_peer(&mirror, &op, &mut buf, &mut send)
                .unwrap_or_else(|e| panic!("{ctx}: write {n}: {e}"));
        }
    }
    let logged_at_crash = mirror.activity_log().logged();
    let suspect = match victim {
        "replica" => {
            replica = replica.crash(&committers);
            // Told, the owner sets its log's extents in its bitmap.
            let ranges = mirror.activity_log().logged_ranges(SIZE);
            owner.target.start_peer_bitmap(&ranges).unwrap();
            owner.target.commit_now().unwrap();
            let mut bits = Vec::new();
            let mut from = 0;
            while let Some((start, count)) = owner.target.next_peer_dirty(from, u64::MAX) {
                bits.push((start * BLOCK, count * BLOCK));
                from = start + count;
            }
            bits
        }
        _ => {
            drop(mirror);
            owner = owner.crash(&committers);
            let (file, _) = owner.pool.open_activity_log("v").unwrap();
            let logged = activity::read(&file)
                .unwrap()
                .unwrap_or_else(|| panic!("{ctx}: no activity log"));
            assert!(!logged.overflow, "{ctx}: the log overflowed");
            logged.ranges(SIZE)
        }
    };
    let crashed = if victim == "replica" {
        &replica
    } else {
        &owner
    };
    for (&block, &n) in &now {
        let (a, b) = (owner.read(block), replica.read(block));
        if a != b {
            assert!(
                in_ranges(&suspect, block),
                "{ctx}: block {block} differs between the copies and is in no logged extent"
            );
        }
        let want = flushed
            .get(&block)
            .map_or(vec![0u8; BLOCK as usize], |&m| pattern(block, m));
        let got = crashed.read(block);
        assert!(
            got == want || got == pattern(block, n),
            "{ctx}: block {block} lost the write a flush acknowledged"
        );
    }
    drop(owner);
    drop(replica);
    committers.stop();
    let _ = std::fs::remove_dir_all(&base);
    (extents.len(), logged_at_crash)
}

#[test]
fn a_crash_of_either_node_loses_nothing_the_log_does_not_name() {
    for seed in 1..=3 {
        for victim in ["replica", "owner"] {
            let (written, logged) = scenario(seed, victim);
            // The log had to let extents go: the rule was exercised.
            assert!(
                written > 1100 && logged < written,
                "seed {seed}: {written} extents written, {logged} logged"
            );
        }
    }
}
