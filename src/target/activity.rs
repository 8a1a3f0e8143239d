//! The owner's activity log of a mirrored volume (`docs/pair.md` §3.2): the 4 MiB extents a
//! write, zeroing or trim may be changing, made durable **before** the change is issued to
//! either copy, as DRBD's activity log. After a crash of the owner, the blocks that may differ
//! between the two copies (a change that reached one disk and not the other, or the page cache
//! of one and not the other) all lie in the logged extents, so only those are compared and
//! resent instead of the whole volume.
//!
//! An extent enters the log before its first change; a change to an extent already logged
//! costs nothing. An extent leaves the log only when the log must make room (more than
//! [`SOFT_EXTENTS`] logged) and only if it is **clean**: no change in flight, and every change
//! to it completed before a flush that then completed (on both copies while mirrored; here
//! alone while degraded, where the peer dirty bitmap covers it). Least recently used first. A
//! log that cannot make room grows up to [`HARD_EXTENTS`]; past that it records OVERFLOW
//! (every extent: a crash then compares the whole volume, as without a log).
//!
//! The I/O threads never wait on the disk for it: a change whose extent is not logged parks
//! (a `Wait` on an eventfd of its own, [`ActivityLog::admit`]) and the node's activity thread
//! writes the new log ([`ActivityLog::commit`]: one `pwrite` and one `fdatasync`), then wakes
//! every parked change, which tries again.
//!
//! The file, `activity.log` beside the volume's files: two slots of 64 KiB, written in turn
//! (the slot is the sequence's parity), each:
//!
//! ```text
//! off len
//!   0   8 magic "STRMACT1"
//!   8   8 sequence (> 0): of two valid slots the higher is current
//!  16   4 extent shift (22: 4 MiB extents)
//!  20   4 flags (bit 0: OVERFLOW, every extent)
//!  24   4 count n (at most 8188)
//!  28   4 crc32c of bytes 0..28 followed by the extent list
//!  32  8n extent numbers, strictly ascending
//! ```
//!
//! Crash analysis: a slot is written whole before it is synced, and a change waits for the
//! sync, so the log on disk always holds every extent a change was issued to: a torn or
//! unsynced new slot fails its checksum (or is absent) and the older slot is current, which
//! holds every extent admitted before (those the new one would have dropped among them,
//! since only the new one drops them). Both slots unreadable (a damaged file) counts as
//! OVERFLOW. A missing or empty file: the volume never had a change issued through a log.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;

/// Extents are 4 MiB.
pub const EXTENT_SHIFT: u32 = 22;
pub const EXTENT_BYTES: u64 = 1 << EXTENT_SHIFT;
/// Bytes of one slot.
const SLOT_BYTES: usize = 64 << 10;
const HEADER_BYTES: usize = 32;
/// The most extents a slot holds.
pub const HARD_EXTENTS: usize = (SLOT_BYTES - HEADER_BYTES) / 8;
/// Above this many logged extents, clean ones are dropped (4 GiB of a volume logged).
pub const SOFT_EXTENTS: usize = 1024;
const MAGIC: [u8; 8] = *b"STRMACT1";
const FLAG_OVERFLOW: u32 = 1;

/// A log as read from its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub sequence: u64,
    pub extents: BTreeSet<u64>,
    /// Every extent (the log overflowed, or its file is damaged).
    pub overflow: bool,
}

impl Logged {
    /// The byte ranges of a volume of `size` bytes that the log names.
    pub fn ranges(&self, size: u64) -> Vec<(u64, u64)> {
        if self.overflow {
            return vec![(0, size)];
        }
        // Extents past the end (a damaged or crafted log) name nothing.
        self.extents
            .iter()
            .filter_map(|&x| x.checked_mul(EXTENT_BYTES))
            .filter(|&start| start < size)
            .map(|start| (start, EXTENT_BYTES.min(size - start)))
            .collect()
    }
}

/// Encodes one slot (the used part, a multiple of 4 KiB).
fn encode(sequence: u64, extents: &BTreeSet<u64>, overflow: bool) -> Vec<u8> {
    assert!(extents.len() <= HARD_EXTENTS, "a slot holds the log");
    let used = HEADER_BYTES + 8 * extents.len();
    let mut b = vec![0u8; used.div_ceil(4096) * 4096];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&sequence.to_le_bytes());
    b[16..20].copy_from_slice(&EXTENT_SHIFT.to_le_bytes());
    let flags = if overflow { FLAG_OVERFLOW } else { 0 };
    b[20..24].copy_from_slice(&flags.to_le_bytes());
    b[24..28].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (i, x) in extents.iter().enumerate() {
        b[HEADER_BYTES + 8 * i..HEADER_BYTES + 8 * i + 8].copy_from_slice(&x.to_le_bytes());
    }
    let crc = checksum(&b[..used]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

fn checksum(slot: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&slot[..28]), &slot[HEADER_BYTES..])
}

/// Decodes one slot's bytes (at least its header; the list may be cut short): the log, or
/// what is wrong with it.
pub fn decode(b: &[u8]) -> Result<Logged, String> {
    if b.len() < HEADER_BYTES {
        return Err(format!("{} bytes, less than a header", b.len()));
    }
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    if b[0..8] != MAGIC {
        return Err("not an activity log slot (bad magic)".into());
    }
    let sequence = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    let (shift, flags, count) = (u32_at(16), u32_at(20), u32_at(24) as usize);
    if sequence == 0 {
        return Err("sequence zero".into());
    }
    if shift != EXTENT_SHIFT {
        return Err(format!("extent shift {shift}, not {EXTENT_SHIFT}"));
    }
    if flags & !FLAG_OVERFLOW != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    if count > HARD_EXTENTS || b.len() < HEADER_BYTES + 8 * count {
        return Err(format!("{count} extents do not fit"));
    }
    let used = &b[..HEADER_BYTES + 8 * count];
    if checksum(used) != u32_at(28) {
        return Err("checksum mismatch (a torn or damaged slot)".into());
    }
    let mut extents = BTreeSet::new();
    let mut last = None;
    for chunk in used[HEADER_BYTES..].chunks_exact(8) {
        let x = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        if last.is_some_and(|l| l >= x) {
            return Err("extents not strictly ascending".into());
        }
        last = Some(x);
        extents.insert(x);
    }
    Ok(Logged {
        sequence,
        extents,
        overflow: flags & FLAG_OVERFLOW != 0,
    })
}

/// Reads the log from `file`: `None` when it is empty (no change was ever logged); a
/// damaged log (no valid slot) reads as OVERFLOW.
pub fn read(file: &File) -> std::io::Result<Option<Logged>> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut best: Option<Logged> = None;
    for slot in 0..2u64 {
        let mut b = vec![0u8; SLOT_BYTES];
        let n = read_full(file, &mut b, slot * SLOT_BYTES as u64)?;
        if let Ok(l) = decode(&b[..n])
            && best.as_ref().is_none_or(|x| l.sequence > x.sequence)
        {
            best = Some(l);
        }
    }
    Ok(Some(best.unwrap_or_else(|| {
        tracing::warn!("no valid activity log slot: every extent counts as logged");
        Logged {
            sequence: 0,
            extents: BTreeSet::new(),
            overflow: true,
        }
    })))
}

/// Writes a log that says OVERFLOW (every extent) into an empty `file`, synced: a volume that
/// crashed before it had a log is treated whole until its crash is dealt with.
pub fn write_overflow(file: &File) -> std::io::Result<()> {
    file.write_all_at(&encode(1, &BTreeSet::new(), true), 0)?;
    file.sync_data()
}

/// Reads up to `b.len()` bytes at `offset`, fewer at the end of the file.
fn read_full(file: &File, b: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < b.len() {
        match file.read_at(&mut b[done..], offset + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

#[derive(Default)]
struct State {
    /// Durable in the file, with the tick of their last admission (for least recently used).
    logged: HashMap<u64, u64>,
    /// The file says OVERFLOW: every extent counts as logged.
    overflow: bool,
    /// Extents changes wait for.
    wanted: BTreeSet<u64>,
    /// Changes in flight per extent.
    inflight: HashMap<u64, u32>,
    /// Per extent, the `done` count of its last completed change.
    last_done: HashMap<u64, u64>,
    /// Changes completed so far.
    done: u64,
    /// Every change with a `done` count up to this is durable on the copies that matter.
    durable: u64,
    tick: u64,
    sequence: u64,
    /// Parked changes, by the eventfd their `Wait` polls.
    waiters: HashMap<RawFd, EventFd>,
    /// Why the last write of the log failed (changes that need it fail with it).
    failed: Option<String>,
    /// The volume left service: every change fails with this, and the log is not written
    /// again (a new log of the volume may be writing the file).
    closed: Option<String>,
}

/// A mirrored volume's activity log (see the module doc).
pub struct ActivityLog {
    file: File,
    state: Mutex<State>,
}

/// What `admit` says.
#[derive(Debug)]
pub enum Admit {
    /// Logged: the change may be issued (`done` when it completes).
    Yes,
    /// Not yet: poll this eventfd, then ask again. The caller hands the log to the node's
    /// activity thread.
    Wait(RawFd),
}

impl ActivityLog {
    /// The log in `file`, as `loaded` from it (its extents count as logged).
    pub fn new(file: File, loaded: Option<Logged>) -> ActivityLog {
        let mut st = State::default();
        if let Some(l) = loaded {
            st.sequence = l.sequence;
            st.overflow = l.overflow;
            st.logged = l.extents.into_iter().map(|x| (x, 0)).collect();
        }
        ActivityLog {
            file,
            state: Mutex::new(st),
        }
    }

    fn extents(start: u64, end: u64) -> std::ops::Range<u64> {
        start / EXTENT_BYTES..end.div_ceil(EXTENT_BYTES)
    }

    /// A change of `[start, end)` is about to be issued: `Yes` (counted in flight) when its
    /// extents are logged; else it must wait for the log (`Wait`). `Err` when the last write of
    /// the log failed: the change fails rather than go unlogged (the next one tries again).
    pub fn admit(&self, start: u64, end: u64) -> Result<Admit, String> {
        let mut st = self.state.lock();
        if let Some(why) = &st.closed {
            return Err(why.clone());
        }
        st.tick += 1;
        let tick = st.tick;
        let missing: Vec<u64> = Self::extents(start, end)
            .filter(|x| !st.overflow && !st.logged.contains_key(x))
            .collect();
        if missing.is_empty() {
            for x in Self::extents(start, end) {
                *st.inflight.entry(x).or_default() += 1;
                if let Some(t) = st.logged.get_mut(&x) {
                    *t = tick;
                }
            }
            return Ok(Admit::Yes);
        }
        if let Some(why) = st.failed.take() {
            return Err(why);
        }
        st.wanted.extend(missing);
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| format!("an eventfd to wait for the activity log: {e}"))?;
        let fd = efd.as_fd().as_raw_fd();
        st.waiters.insert(fd, efd);
        Ok(Admit::Wait(fd))
    }

    /// A parked change woke (or was abandoned): forget its eventfd.
    pub fn unpark(&self, fd: RawFd) {
        self.state.lock().waiters.remove(&fd);
    }

    /// An admitted change of `[start, end)` completed (or failed).
    pub fn done(&self, start: u64, end: u64) {
        let mut st = self.state.lock();
        st.done += 1;
        let done = st.done;
        for x in Self::extents(start, end) {
            let n = st
                .inflight
                .get_mut(&x)
                .expect("a change that ends was admitted");
            assert!(*n > 0, "extent {x}: more changes ended than began");
            *n -= 1;
            if *n == 0 {
                st.inflight.remove(&x);
            }
            st.last_done.insert(x, done);
        }
    }

    /// The count a flush notes when it is issued: `flushed` with it once it completed.
    pub fn mark(&self) -> u64 {
        self.state.lock().done
    }

    /// A flush issued at `mark` completed: the changes that completed before it are durable
    /// (their extents may leave the log). True when the log should be rewritten (it
    /// overflowed, and may fit again).
    pub fn flushed(&self, mark: u64) -> bool {
        let mut st = self.state.lock();
        st.durable = st.durable.max(mark);
        let durable = st.durable;
        st.last_done.retain(|_, d| *d > durable);
        st.overflow
    }

    /// Whether `commit` has work: changes wait, or an overflowed log may fit again.
    pub fn wants_commit(&self) -> bool {
        let st = self.state.lock();
        st.closed.is_none() && (!st.wanted.is_empty() || st.overflow)
    }

    /// Writes the log with the wanted extents (dropping clean ones beyond the soft limit),
    /// syncs it, and wakes the parked changes. The node's activity thread calls it; one
    /// commit at a time per log (the caller serialises).
    pub fn commit(&self) -> Result<(), String> {
        let (sequence, extents, overflow, bytes) = {
            let mut st = self.state.lock();
            if st.closed.is_some() || (st.wanted.is_empty() && !st.overflow) {
                return Ok(());
            }
            // What the log holds, what changes wait for, and (after an overflow, when changes
            // were admitted unlisted) every extent with a change in flight or not yet flushed.
            let mut set: BTreeSet<u64> = st.logged.keys().copied().collect();
            set.extend(st.wanted.iter().copied());
            set.extend(st.inflight.keys().copied());
            set.extend(st.last_done.keys().copied());
            if set.len() > SOFT_EXTENTS {
                // Clean extents, least recently used first.
                let mut clean: Vec<(u64, u64)> = st
                    .logged
                    .iter()
                    .filter(|(x, _)| {
                        !st.inflight.contains_key(x)
                            && !st.last_done.contains_key(x)
                            && !st.wanted.contains(x)
                    })
                    .map(|(&x, &t)| (t, x))
                    .collect();
                clean.sort_unstable();
                for (_, x) in clean {
                    if set.len() <= SOFT_EXTENTS {
                        break;
                    }
                    set.remove(&x);
                }
            }
            let overflow = set.len() > HARD_EXTENTS;
            let listed = if overflow {
                BTreeSet::new()
            } else {
                set.clone()
            };
            let sequence = st.sequence + 1;
            let bytes = encode(sequence, &listed, overflow);
            // While the slot is written, only what both the old log and the new one hold
            // counts as logged: a change to an extent this commit drops (or, leaving an
            // overflow, to one it does not list) waits for the next commit. Whether the new
            // slot reaches the disk or not, the log there holds their common part.
            if !overflow {
                st.logged.retain(|x, _| set.contains(x));
                st.overflow = false;
            }
            (sequence, set, overflow, bytes)
        };
        let slot = (sequence % 2) * SLOT_BYTES as u64;
        let written = self
            .file
            .write_all_at(&bytes, slot)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| format!("writing the activity log: {e}"));
        let mut st = self.state.lock();
        match &written {
            Ok(()) => {
                st.sequence = sequence;
                st.overflow = overflow;
                let tick = st.tick;
                let old = std::mem::take(&mut st.logged);
                st.logged = extents
                    .iter()
                    .map(|&x| (x, old.get(&x).copied().unwrap_or(tick)))
                    .collect();
                st.wanted.clear();
            }
            // The next change that needs the log fails with it; the others park again and ask
            // for another commit. What counts as logged stays the common part (above).
            Err(why) => {
                st.failed = Some(why.clone());
                st.wanted.clear();
            }
        }
        for efd in st.waiters.values() {
            // One write per commit, read never: cannot overflow.
            let _ = efd.write(1);
        }
        written
    }

    /// The volume goes out of service: every change from now on fails with `why` (parked ones
    /// wake to it) and the log is never written again.
    pub fn abandon(&self, why: &str) {
        let mut st = self.state.lock();
        st.closed = Some(why.to_owned());
        for efd in st.waiters.values() {
            let _ = efd.write(1);
        }
    }

    /// The byte ranges of a volume of `size` bytes that are logged now (every byte while the
    /// log is in overflow): where a change may not yet be durable on both copies.
    pub fn logged_ranges(&self, size: u64) -> Vec<(u64, u64)> {
        let st = self.state.lock();
        Logged {
            sequence: st.sequence,
            extents: st.logged.keys().copied().collect(),
            overflow: st.overflow,
        }
        .ranges(size)
    }

    /// Extents logged now (for tests and `status`).
    pub fn logged(&self) -> usize {
        let st = self.state.lock();
        if st.overflow {
            usize::MAX
        } else {
            st.logged.len()
        }
    }
}

/// Hands a log whose changes wait to the node's activity thread (from an I/O thread: it
/// must only pass it on).
pub type LogWriter = std::sync::Arc<dyn Fn(std::sync::Arc<ActivityLog>) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A file removed when the guard drops.
    struct Temp(std::path::PathBuf);
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp() -> (Temp, File) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("streamer-al-{}-{n}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (Temp(p), f)
    }

    fn parked(a: Result<Admit, String>) -> RawFd {
        match a.unwrap() {
            Admit::Wait(fd) => fd,
            Admit::Yes => panic!("admitted before it was logged"),
        }
    }

    #[test]
    fn slots_round_trip_and_damage_is_refused() {
        let set: BTreeSet<u64> = [1, 5, 900].into();
        let b = encode(7, &set, false);
        assert_eq!(b.len(), 4096);
        let l = decode(&b).unwrap();
        assert_eq!((l.sequence, &l.extents, l.overflow), (7, &set, false));
        for i in [0, 9, 17, 21, 25, 29, 33] {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(decode(&bad).is_err(), "a flip at {i}");
        }
        // Cut short, and a list not ascending (with a good checksum).
        assert!(decode(&b[..40]).is_err());
        let mut bad = encode(7, &set, false);
        bad[32..40].copy_from_slice(&1000u64.to_le_bytes());
        let crc = checksum(&bad[..HEADER_BYTES + 24]);
        bad[28..32].copy_from_slice(&crc.to_le_bytes());
        assert!(decode(&bad).unwrap_err().contains("ascending"));
        assert_eq!(
            Logged {
                sequence: 1,
                extents: [0, 3].into(),
                overflow: false
            }
            .ranges(3 * EXTENT_BYTES + 4096),
            vec![(0, EXTENT_BYTES), (3 * EXTENT_BYTES, 4096)]
        );
        // An extent past any volume (a crafted log, found by the fuzzer) names nothing.
        let far = Logged {
            sequence: 1,
            extents: [u64::MAX].into(),
            overflow: false,
        };
        assert!(far.ranges(u64::MAX).is_empty());
    }

    /// A change parks until its extent is logged; the log on disk then names it (also after a
    /// torn newer slot); a logged extent costs nothing more.
    #[test]
    fn a_change_waits_for_its_extent_to_be_durable() {
        let (_d, f) = temp();
        let log = ActivityLog::new(f.try_clone().unwrap(), read(&f).unwrap());
        assert_eq!(read(&f).unwrap(), None);
        let fd = parked(log.admit(0, 4096));
        assert!(log.wants_commit());
        log.commit().unwrap();
        log.unpark(fd);
        assert!(matches!(log.admit(0, 4096), Ok(Admit::Yes)));
        assert!(matches!(log.admit(8192, 12288), Ok(Admit::Yes)));
        let on_disk = read(&f).unwrap().unwrap();
        assert_eq!(on_disk.extents, [0].into());
        // A change spanning two extents needs both.
        let fd = parked(log.admit(EXTENT_BYTES - 4096, EXTENT_BYTES + 4096));
        log.commit().unwrap();
        log.unpark(fd);
        assert_eq!(read(&f).unwrap().unwrap().extents, [0, 1].into());
        // The newer slot torn: the older one is current, and it still names extent 0.
        let seq = read(&f).unwrap().unwrap().sequence;
        f.write_all_at(&[0xff; 64], (seq % 2) * SLOT_BYTES as u64)
            .unwrap();
        assert_eq!(read(&f).unwrap().unwrap().extents, [0].into());
        // Both damaged: every extent.
        f.write_all_at(&[0xff; 64], ((seq + 1) % 2) * SLOT_BYTES as u64)
            .unwrap();
        assert!(read(&f).unwrap().unwrap().overflow);
    }

    /// An abandoned log (its volume left service) fails every change, parked or new, and is
    /// never written again; a volume that crashed with no log gets one saying OVERFLOW.
    #[test]
    fn an_abandoned_log_refuses_everything_and_writes_nothing() {
        let (_d, f) = temp();
        let log = ActivityLog::new(f.try_clone().unwrap(), None);
        let _fd = parked(log.admit(0, 4096));
        log.abandon("taken offline");
        assert!(!log.wants_commit());
        log.commit().unwrap();
        assert_eq!(read(&f).unwrap(), None, "nothing written");
        for _ in 0..2 {
            assert_eq!(log.admit(0, 4096).unwrap_err(), "taken offline");
        }
        write_overflow(&f).unwrap();
        assert!(read(&f).unwrap().unwrap().overflow);
    }

    /// Past the soft limit, clean extents leave (least recently used first); one with a change
    /// in flight, or changed since the last completed flush, stays.
    #[test]
    fn only_clean_extents_leave() {
        let (_d, f) = temp();
        let log = ActivityLog::new(f.try_clone().unwrap(), None);
        let n = SOFT_EXTENTS as u64;
        for x in 0..n {
            let fd = parked(log.admit(x * EXTENT_BYTES, x * EXTENT_BYTES + 4096));
            log.commit().unwrap();
            log.unpark(fd);
            assert!(matches!(
                log.admit(x * EXTENT_BYTES, x * EXTENT_BYTES + 4096),
                Ok(Admit::Yes)
            ));
        }
        // Extent 0 stays in flight; the rest complete, and a flush covers all but the last.
        for x in 1..n - 1 {
            log.done(x * EXTENT_BYTES, x * EXTENT_BYTES + 4096);
        }
        let mark = log.mark();
        log.done((n - 1) * EXTENT_BYTES, (n - 1) * EXTENT_BYTES + 4096);
        assert!(!log.flushed(mark));
        // Two new extents: two clean ones leave, the least recently used (1 and 2).
        let fd = parked(log.admit(n * EXTENT_BYTES, (n + 2) * EXTENT_BYTES));
        log.commit().unwrap();
        log.unpark(fd);
        let on_disk = read(&f).unwrap().unwrap().extents;
        assert_eq!(on_disk.len(), SOFT_EXTENTS);
        assert!(on_disk.contains(&0) && on_disk.contains(&(n - 1)));
        assert!(!on_disk.contains(&1) && !on_disk.contains(&2) && on_disk.contains(&3));
        assert!(on_disk.contains(&n) && on_disk.contains(&(n + 1)));
    }

    /// With nothing clean, the log grows to its hard limit and then records OVERFLOW: every
    /// change is admitted at once; a flush lets it shrink again.
    #[test]
    fn a_log_that_cannot_make_room_overflows_then_recovers() {
        let (_d, f) = temp();
        let log = ActivityLog::new(f.try_clone().unwrap(), None);
        let end = (HARD_EXTENTS as u64 + 1) * EXTENT_BYTES;
        let fd = parked(log.admit(0, end));
        log.commit().unwrap();
        log.unpark(fd);
        assert!(read(&f).unwrap().unwrap().overflow);
        assert!(matches!(log.admit(0, end), Ok(Admit::Yes)));
        assert!(matches!(log.admit(end, end + 4096), Ok(Admit::Yes)));
        log.done(0, end);
        log.done(end, end + 4096);
        assert!(log.flushed(log.mark()));
        assert!(log.wants_commit());
        log.commit().unwrap();
        let l = read(&f).unwrap().unwrap();
        assert!(!l.overflow);
        assert!(l.extents.len() <= SOFT_EXTENTS, "{}", l.extents.len());
    }
}
