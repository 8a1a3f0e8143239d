//! A volume mirrored to the pair's other node (`docs/pair.md` §3), as the owner serves it.
//!
//! `Mirror` wraps the local [`VolumeTarget`]: reads are the volume's; a write, zeroing, trim or
//! flush is planned as the volume's own I/O **plus** a [`FileIo::Peer`] with the same operation,
//! issued together in the first phase, and the request completes only when both did. The peer
//! I/O carries the volume's id in the pair, the owner's fencing token and a sequence number.
//!
//! Order: overlapping writes must land in the same order on both nodes, and the two copies are
//! written concurrently by different machines. So the owner never has two overlapping
//! write-like operations of a volume in flight: one that overlaps a write in flight parks (a
//! `Wait` on an eventfd of its own) until that one ended, then tries again. Non-overlapping
//! operations land in any order on either side, which is the same result.
//!
//! Degraded mode (`docs/pair.md` §4). A request whose peer operation failed is not answered
//! yet: it parks (a `Wait` on an eventfd of its own) while the node records the peer's replica
//! stale in etcd and starts the volume's peer dirty bitmap with the ranges of every such
//! request (the `Degrader`, on a thread of the node's: etcd is never waited for on a ring).
//! Then they complete, and from then on writes go to the volume alone, their blocks set in
//! its bitmap, until a resync. If the peer cannot be recorded stale (etcd out of reach, the
//! volume no longer this node's), the parked requests fail with `EIO`: nothing is acknowledged
//! on one node that the pair does not know is on one node. Data protection before
//! availability.
//!
//! Activity log (`activity.rs`, `docs/pair.md` §3.2): before a change is issued to either
//! copy, its 4 MiB extents are in the volume's durable activity log; one whose extent is not
//! parks (a `Wait`) while the node's activity thread writes the log. After a crash of this
//! node, only the logged extents can differ between the copies.
//!
//! Moved (`volume move`): once fenced, every change refuses with [`TargetError::NotOwner`],
//! which the [`PairTarget`](super::PairTarget) its connections hold takes as the sign to plan
//! it again on the volume's new role here.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::Mutex;

use super::activity::{ActivityLog, Admit, LogWriter};
use super::{
    BlockTarget, FileIo, Geometry, PeerIo, PeerOp, Plan, Progress, TargetError, TargetOp,
    VolumeTarget,
};

/// `Outer::step`: the operation waits for an overlapping write to end.
const WAITING_FOR_RANGE: u32 = 1;
/// `Outer::step`: the operation runs (its peer I/O went with its first phase).
const RUNNING: u32 = 2;
/// `Outer::step`: done here, its peer I/O failed: waits until the peer is recorded stale.
const WAITING_FOR_DEGRADE: u32 = 3;
/// `Outer::step`: done here while degraded, its bit set after its own commit: waits for a
/// commit that makes the bit durable too (a FUA operation or a flush).
const WAITING_FOR_COMMIT: u32 = 4;
/// `Outer::step`: the change waits for its extents to be in the activity log.
const WAITING_FOR_LOG: u32 = 5;
/// `Outer::step`: the change (or flush) waits for the volume's move to end
/// (`Mirror::hold_for_move`), then is refused as moved and planned again on the new role.
const WAITING_FOR_MOVE: u32 = 6;

/// Whether the peer's replica takes this volume's writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerState {
    /// Every write goes to both nodes.
    InSync,
    /// A peer operation failed; the node is recording the peer stale. Requests whose peer
    /// operation failed wait.
    Degrading,
    /// The peer's replica is stale (recorded in etcd): writes are done here alone and their
    /// blocks set in the volume's peer dirty bitmap.
    Degraded { since: SystemTime },
    /// The peer is back and the node copies the bitmap's blocks to it: writes go to both
    /// again, and the whole blocks both took leave the bitmap.
    Resyncing { since: SystemTime },
}

/// What the node does for a mirror whose peer failed: record the peer stale and start the
/// volume's bitmap (`Mirror::pending_ranges`), then call `Mirror::degrade_done`. Called with
/// the volume's name from an I/O thread: it must only hand the work to another thread.
pub type Degrader = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct Degrade {
    state: Option<PeerState>,
    /// Ranges changed here that the peer did not take, to set in the bitmap once it starts.
    pending: Vec<(u64, u64)>,
    /// Parked requests by the eventfd their `Wait` polls, and the outcome each gets.
    waiters: HashMap<RawFd, (EventFd, Option<Result<(), String>>)>,
    /// The last failure to record the peer stale, and when.
    failed: Option<(SystemTime, String)>,
    /// Why writes are refused from now on (the volume moved to the other node), if they are.
    fenced: Option<String>,
    /// While the volume moves: what changes and flushes park on until `fence`.
    moving: Option<EventFd>,
    /// Why the mirror went out of service (`abandon`): a peer failure fails at once then, no
    /// degrade thread would settle it.
    abandoned: Option<String>,
}

/// A range the resync holds against overlapping writes (`Mirror::lock_range`).
pub struct RangeGuard<'a> {
    mirror: &'a Mirror,
    ticket: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut plan = Plan::default();
        plan.outer.ticket = self.ticket;
        self.mirror.release(&mut plan);
    }
}

/// Writes in flight and the requests parked behind them.
#[derive(Default)]
struct InFlight {
    /// `[start, end)` and the ticket of each write-like operation in flight.
    ranges: Vec<(u64, u64, u64)>,
    next_ticket: u64,
    /// Parked requests, by the eventfd their `Wait` polls: every ended write signals them all.
    parked: HashMap<RawFd, EventFd>,
    /// Ranges the resync waits to lock (`Mirror::lock_range`): new writes to them wait behind
    /// it, so a busy volume cannot starve it.
    waiting: Vec<(u64, u64)>,
}

pub struct Mirror {
    inner: Arc<VolumeTarget>,
    /// The volume's id in the pair: the peer names its replica by it.
    id: u32,
    token: AtomicU64,
    sequence: AtomicU64,
    inflight: Mutex<InFlight>,
    diverged: Mutex<Option<(SystemTime, String)>>,
    degrade: Mutex<Degrade>,
    degrader: Degrader,
    /// Mirrored changes completed so far (both nodes answered).
    completions: AtomicU64,
    /// 4 MiB extents changed on both nodes since the peer last completed a flush, with the
    /// `completions` count of their last change: a peer that crashes may lose them, so they
    /// join the bitmap if the peer fails (what DRBD's activity log does for the peer).
    unflushed: Mutex<std::collections::BTreeMap<u64, u64>>,
    /// Peer operations that failed so far (a resync batch whose window saw one keeps its bits).
    peer_failures: AtomicU64,
    /// The extents changes may be in flight in, durable before they are issued.
    log: Arc<ActivityLog>,
    log_writer: LogWriter,
}

/// The peer operation that carries out `op` on the other node (volume, token and sequence
/// left for the caller), or none: reads, and empty writes without FUA, stay here.
pub(super) fn peer_io_of(op: &TargetOp) -> Option<PeerIo> {
    let (op, offset, len, fua, no_hole) = match *op {
        TargetOp::Write { offset, len, fua } if len > 0 => {
            (PeerOp::Write, offset, u64::from(len), fua, false)
        }
        // An empty FUA write asks for durability only.
        TargetOp::Write { fua: true, .. } | TargetOp::Flush => (PeerOp::Flush, 0, 0, false, false),
        TargetOp::Write { .. } => return None,
        TargetOp::Zero {
            offset,
            len,
            fua,
            may_trim,
            ..
        } => (PeerOp::Zero, offset, len, fua, !may_trim),
        TargetOp::Trim { offset, len, fua } => (PeerOp::Trim, offset, len, fua, false),
        TargetOp::Read { .. } | TargetOp::Cache { .. } => return None,
    };
    Some(PeerIo {
        op,
        volume: 0,
        token: 0,
        sequence: 0,
        offset,
        len,
        buf_start: 0,
        fua,
        no_hole,
        forwarded: false,
    })
}

/// Granularity of `Mirror::unflushed`.
const EXTENT_BYTES: u64 = 4 << 20;

impl Mirror {
    /// A mirror of `inner`; `degraded`: the volume keeps a peer bitmap (the peer is stale,
    /// since then). `log`: its activity log, written by `log_writer`'s thread.
    pub fn new(
        inner: Arc<VolumeTarget>,
        id: u32,
        token: u64,
        degraded: Option<SystemTime>,
        degrader: Degrader,
        log: Arc<ActivityLog>,
        log_writer: LogWriter,
    ) -> Mirror {
        assert!(token > 0, "a mirrored volume has a fencing token");
        let state = match degraded {
            Some(since) => PeerState::Degraded { since },
            None => PeerState::InSync,
        };
        Mirror {
            inner,
            id,
            token: AtomicU64::new(token),
            sequence: AtomicU64::new(0),
            inflight: Mutex::new(InFlight::default()),
            diverged: Mutex::new(None),
            degrade: Mutex::new(Degrade {
                state: Some(state),
                ..Degrade::default()
            }),
            degrader,
            completions: AtomicU64::new(0),
            unflushed: Mutex::new(std::collections::BTreeMap::new()),
            peer_failures: AtomicU64::new(0),
            log,
            log_writer,
        }
    }

    /// The volume's activity log.
    pub fn activity_log(&self) -> &Arc<ActivityLog> {
        &self.log
    }

    /// Refuses every write, zeroing, trim and flush from now on (`EIO` with `why`): the volume
    /// is another node's now. Requests already planned finish.
    pub fn fence(&self, why: &str) {
        let mut d = self.degrade.lock();
        d.fenced = Some(why.to_owned());
        if let Some(efd) = &d.moving {
            // Every change parked for the move tries again, and is refused as moved.
            let _ = efd.write(1);
        }
    }

    /// The volume is moving to the other node (`volume move`, its record already changed):
    /// changes and flushes that start from now on wait until `fence`, then are refused as
    /// moved, so the connections' `PairTarget` plans them again on this node's new role
    /// instead of failing them while it is being made.
    pub fn hold_for_move(&self) -> Result<(), TargetError> {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| TargetError::Volume {
                what: "moving",
                errno: libc::EIO,
                message: format!("an eventfd to hold changes: {e}"),
            })?;
        self.degrade.lock().moving.get_or_insert(efd);
        Ok(())
    }

    /// Peer operations that failed so far.
    pub fn peer_failures(&self) -> u64 {
        self.peer_failures.load(Ordering::Acquire)
    }

    /// Degraded to resyncing (the peer is back): true if it was degraded.
    pub fn begin_resync(&self) -> bool {
        let mut d = self.degrade.lock();
        if !matches!(d.state, Some(PeerState::Degraded { .. })) {
            return false;
        }
        d.state = Some(PeerState::Resyncing {
            since: SystemTime::now(),
        });
        true
    }

    /// The resync ended: in sync (the peer's stale record is gone and the bitmap ended), or
    /// degraded again (it stopped). Nothing changes if a peer failure degraded it meanwhile.
    pub fn end_resync(&self, in_sync: bool) {
        let mut d = self.degrade.lock();
        if matches!(d.state, Some(PeerState::Resyncing { .. })) {
            d.state = Some(if in_sync {
                PeerState::InSync
            } else {
                PeerState::Degraded {
                    since: SystemTime::now(),
                }
            });
        }
    }

    /// Holds `[start, end)` against overlapping writes (blocking; for the resync, which must
    /// not send a block a client write is changing): released when the guard drops.
    pub fn lock_range(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            let (fd, polled) = {
                let mut f = self.inflight.lock();
                if !f.ranges.iter().any(|&(s, e, _)| s < end && start < e) {
                    if let Some(i) = f.waiting.iter().position(|&w| w == (start, end)) {
                        f.waiting.swap_remove(i);
                    }
                    f.next_ticket += 1;
                    let ticket = f.next_ticket;
                    f.ranges.push((start, end, ticket));
                    return RangeGuard {
                        mirror: self,
                        ticket,
                    };
                }
                if !f.waiting.contains(&(start, end)) {
                    f.waiting.push((start, end));
                }
                // Parked like a request: the next write to end signals the eventfd (the map
                // holds it; this thread polls a duplicate).
                let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
                    .expect("eventfds can be made");
                let polled = efd.as_fd().try_clone_to_owned().expect("an eventfd dup");
                let fd = efd.as_fd().as_raw_fd();
                f.parked.insert(fd, efd);
                (fd, polled)
            };
            let mut fds = [nix::poll::PollFd::new(
                polled.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
            self.inflight.lock().parked.remove(&fd);
        }
    }

    pub fn token(&self) -> u64 {
        self.token.load(Ordering::Acquire)
    }

    /// The volume's id in the pair.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn peer_state(&self) -> PeerState {
        self.degrade.lock().state.clone().expect("always set")
    }

    /// The last failure to record the peer stale (writes failed then), and when.
    pub fn degrade_failure(&self) -> Option<(SystemTime, String)> {
        self.degrade.lock().failed.clone()
    }

    /// The ranges to set in the bitmap when it starts (taken: the degrader starts the bitmap
    /// with them; `degrade_done` sets any that came meanwhile).
    pub fn pending_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = std::mem::take(&mut self.degrade.lock().pending);
        // Changed on both but never flushed on the peer: a crashed peer may have lost them.
        let size = self.inner.geometry().size_bytes;
        for (x, _) in std::mem::take(&mut *self.unflushed.lock()) {
            let start = x * EXTENT_BYTES;
            out.push((start, EXTENT_BYTES.min(size.saturating_sub(start))));
        }
        out
    }

    /// The degrader's outcome: `Ok` once the peer is recorded stale and the volume's bitmap
    /// started: the ranges that came meanwhile (and the extents the peer had not flushed) are
    /// set and committed, then the parked requests complete. `Err`: they fail, the ranges stay
    /// pending and the volume stays degrading (writes the peer does not take fail) until the
    /// degrader, which tries again, succeeds.
    pub fn degrade_done(&self, outcome: Result<(), String>, retry: &[(u64, u64)]) {
        let outcome = match outcome {
            Ok(()) => self.settle_pending(),
            Err(why) => Err(why),
        };
        let mut d = self.degrade.lock();
        match &outcome {
            Ok(()) => {
                d.state = Some(PeerState::Degraded {
                    since: SystemTime::now(),
                });
                d.failed = None;
                tracing::warn!(
                    volume = self.inner.name(),
                    "degraded: the peer's replica is recorded stale; writes are done here alone"
                );
            }
            Err(why) => {
                tracing::error!(
                    volume = self.inner.name(),
                    "the peer could not be recorded stale ({why}): writes it misses fail"
                );
                d.pending.extend_from_slice(retry);
                d.failed = Some((SystemTime::now(), why.clone()));
            }
        }
        for (efd, result) in d.waiters.values_mut() {
            *result = Some(outcome.clone());
            // One write per waiter, read never: cannot overflow.
            let _ = efd.write(1);
        }
    }

    /// Sets the ranges still pending (and the extents the peer had not flushed) in the bitmap
    /// and commits them, until none is left.
    fn settle_pending(&self) -> Result<(), String> {
        loop {
            let ranges = self.pending_ranges();
            if ranges.is_empty() {
                return Ok(());
            }
            for (offset, len) in ranges {
                self.inner.mark_peer_dirty(offset, len);
            }
            self.inner
                .commit_now()
                .map_err(|e| format!("committing the peer dirty bitmap: {e}"))?;
        }
    }

    /// Ends a resync that left no bit set: with the degrade state held (no degrade can start
    /// meanwhile), checks that it is still resyncing, that no peer operation failed since
    /// `failures` and nothing is pending, then runs `record` (the peer's stale record removed,
    /// the bitmap ended) and, if it succeeded, is in sync. The caller holds the whole volume's
    /// range, so no write is in flight; a flush whose peer operation fails now waits for this.
    pub fn finish_resync(
        &self,
        failures: u64,
        record: impl FnOnce() -> Result<(), String>,
    ) -> Result<bool, String> {
        let mut d = self.degrade.lock();
        if !matches!(d.state, Some(PeerState::Resyncing { .. }))
            || self.peer_failures() != failures
            || !d.pending.is_empty()
        {
            return Ok(false);
        }
        record()?;
        d.state = Some(PeerState::InSync);
        Ok(true)
    }

    /// The node recorded the peer stale and set `ranges` in the bitmap itself (the peer's
    /// replica restarted after a crash): from now on writes are done here alone. A degrade
    /// under way finishes on its own.
    pub fn degraded_now(&self) {
        let mut d = self.degrade.lock();
        if matches!(
            d.state,
            Some(PeerState::InSync | PeerState::Resyncing { .. })
        ) {
            d.state = Some(PeerState::Degraded {
                since: SystemTime::now(),
            });
        }
    }

    /// The volume goes out of service: requests waiting for a degrade fail.
    pub fn abandon(&self, why: &str) {
        let mut d = self.degrade.lock();
        d.abandoned = Some(why.to_owned());
        for (efd, result) in d.waiters.values_mut() {
            *result = Some(Err(why.to_owned()));
            let _ = efd.write(1);
        }
        drop(d);
        self.log.abandon(why);
    }

    /// Whether the degrader should try again (a failed attempt left work waiting).
    pub fn degrade_pending(&self) -> bool {
        let d = self.degrade.lock();
        d.state == Some(PeerState::Degrading) && (!d.pending.is_empty() || !d.waiters.is_empty())
    }

    /// `op` completed on both nodes: its extents wait for the peer's next flush (a flush
    /// clears those that completed before it was issued); while resyncing, the whole blocks it
    /// wrote are equal on both and leave the bitmap. Called while its range is still held.
    fn mirrored(&self, op: &TargetOp, mark: u64) {
        match Self::range(op) {
            Some((start, end)) => {
                let c = self.completions.fetch_add(1, Ordering::AcqRel) + 1;
                let mut u = self.unflushed.lock();
                for x in start / EXTENT_BYTES..end.div_ceil(EXTENT_BYTES) {
                    u.insert(x, c);
                }
                drop(u);
                let d = self.degrade.lock();
                if matches!(d.state, Some(PeerState::Resyncing { .. })) {
                    self.inner.clear_peer_dirty_whole(start, end - start);
                }
            }
            None if matches!(op, TargetOp::Flush) => {
                self.unflushed.lock().retain(|_, c| *c > mark);
            }
            None => {}
        }
    }

    /// The peer did not take `op` (done here): parks the request until the peer is recorded
    /// stale, or, if it already is, sets the range in the bitmap. True when parked.
    fn peer_failed(&self, op: &TargetOp, plan: &mut Plan) -> Result<bool, TargetError> {
        self.peer_failures.fetch_add(1, Ordering::AcqRel);
        let mut d = self.degrade.lock();
        let range = Self::range(op);
        if matches!(d.state, Some(PeerState::Degraded { .. })) {
            drop(d);
            if let Some((start, end)) = range {
                self.inner.mark_peer_dirty(start, end - start);
            }
            // Its own commit (FUA, flush) ran before its bit was set: one more makes the bit
            // as durable as the data it stands for.
            let durable = match *op {
                TargetOp::Write { fua, .. }
                | TargetOp::Zero { fua, .. }
                | TargetOp::Trim { fua, .. } => fua,
                TargetOp::Flush => true,
                TargetOp::Read { .. } | TargetOp::Cache { .. } => false,
            };
            if durable {
                plan.clear();
                plan.step = 0;
                plan.outer.step = WAITING_FOR_COMMIT;
                self.inner.plan(&TargetOp::Flush, plan)?;
                return Ok(true);
            }
            return Ok(false);
        }
        if let Some(why) = &d.abandoned {
            // Out of service: nothing would settle a wait. It stays in the activity log.
            return Err(TargetError::Volume {
                what: "writing",
                errno: libc::EIO,
                message: format!("the peer failed it and {why}"),
            });
        }
        if let Some((start, end)) = range {
            d.pending.push((start, end - start));
        }
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| TargetError::Writing {
                offset: 0,
                source: e.into(),
            })?;
        let fd = efd.as_fd().as_raw_fd();
        d.waiters.insert(fd, (efd, None));
        plan.clear();
        plan.outer.step = WAITING_FOR_DEGRADE;
        plan.push(FileIo::Wait { fd });
        let start = matches!(
            d.state,
            Some(PeerState::InSync | PeerState::Resyncing { .. })
        );
        if start {
            d.state = Some(PeerState::Degrading);
        }
        drop(d);
        if start {
            (self.degrader)(self.inner.name());
        }
        Ok(true)
    }

    pub fn volume(&self) -> &Arc<VolumeTarget> {
        &self.inner
    }

    /// Since when, and why, the replicas may differ (a peer operation failed).
    pub fn diverged(&self) -> Option<(SystemTime, String)> {
        self.diverged.lock().clone()
    }

    fn peer_io(&self, op: &TargetOp) -> Option<PeerIo> {
        let mut io = peer_io_of(op)?;
        io.volume = self.id;
        io.token = self.token.load(Ordering::Acquire);
        io.sequence = self.sequence.fetch_add(1, Ordering::AcqRel) + 1;
        Some(io)
    }

    /// The byte range a write-like operation changes (none for a flush).
    fn range(op: &TargetOp) -> Option<(u64, u64)> {
        match *op {
            TargetOp::Write { offset, len, .. } if len > 0 => {
                Some((offset, offset + u64::from(len)))
            }
            TargetOp::Zero { offset, len, .. } | TargetOp::Trim { offset, len, .. } => {
                Some((offset, offset + len))
            }
            _ => None,
        }
    }

    /// Takes the range for the operation, or parks it (`plan` gets a `Wait`) behind an
    /// overlapping write in flight.
    fn acquire(&self, op: &TargetOp, plan: &mut Plan) -> Result<bool, TargetError> {
        let Some((start, end)) = Self::range(op) else {
            return Ok(true);
        };
        let mut f = self.inflight.lock();
        let busy = f.ranges.iter().any(|&(s, e, _)| s < end && start < e)
            || f.waiting.iter().any(|&(s, e)| s < end && start < e);
        if busy {
            let efd =
                EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(|e| TargetError::Writing {
                        offset: start,
                        source: e.into(),
                    })?;
            let fd = efd.as_fd().as_raw_fd();
            f.parked.insert(fd, efd);
            plan.outer.step = WAITING_FOR_RANGE;
            plan.push(FileIo::Wait { fd });
            return Ok(false);
        }
        f.next_ticket += 1;
        let ticket = f.next_ticket;
        f.ranges.push((start, end, ticket));
        plan.outer.ticket = ticket;
        Ok(true)
    }

    /// An admitted change ended (done or failed): the activity log may let its extents go
    /// once a flush covers it.
    fn log_done(&self, op: &TargetOp, plan: &mut Plan) {
        if std::mem::take(&mut plan.outer.logged)
            && let Some((start, end)) = Self::range(op)
        {
            self.log.done(start, end);
        }
    }

    fn release(&self, plan: &mut Plan) {
        let ticket = std::mem::take(&mut plan.outer.ticket);
        if ticket == 0 {
            return;
        }
        let mut f = self.inflight.lock();
        let before = f.ranges.len();
        f.ranges.retain(|&(_, _, t)| t != ticket);
        assert_eq!(
            f.ranges.len() + 1,
            before,
            "ticket {ticket} was in flight once"
        );
        for efd in f.parked.values() {
            // One write per ended operation, read never: cannot overflow.
            let _ = efd.write(1);
        }
    }

    /// Plans the operation's first phase: the volume's I/O and the peer's, together.
    fn start(&self, op: &TargetOp, plan: &mut Plan) -> Result<(), TargetError> {
        // One look at the state per operation: refused, degraded (no peer I/O), or mirrored. A
        // degrade that completes after this look meets a peer I/O that fails: its bit is set
        // then (`peer_failed`).
        let degraded = {
            let d = self.degrade.lock();
            if let Some(why) = &d.fenced {
                return Err(TargetError::NotOwner(why.clone()));
            }
            if let Some(efd) = &d.moving {
                plan.outer.step = WAITING_FOR_MOVE;
                plan.push(FileIo::Wait {
                    fd: efd.as_fd().as_raw_fd(),
                });
                return Ok(());
            }
            matches!(d.state, Some(PeerState::Degraded { .. }))
        };
        if !self.acquire(op, plan)? {
            return Ok(());
        }
        // Its extents in the activity log before anything is issued (it holds its range while
        // it waits for the log, so overlapping changes wait too).
        if let Some((start, end)) = Self::range(op) {
            match self.log.admit(start, end) {
                Ok(Admit::Yes) => plan.outer.logged = true,
                Ok(Admit::Wait(fd)) => {
                    plan.outer.step = WAITING_FOR_LOG;
                    plan.push(FileIo::Wait { fd });
                    (self.log_writer)(self.log.clone());
                    return Ok(());
                }
                Err(why) => {
                    self.release(plan);
                    return Err(TargetError::Volume {
                        what: "logging the change",
                        errno: libc::EIO,
                        message: why,
                    });
                }
            }
        }
        plan.outer.step = RUNNING;
        plan.outer.result = None;
        plan.outer.sent = false;
        if matches!(op, TargetOp::Flush) {
            plan.outer.log_mark = self.log.mark();
        }
        if let Err(e) = self.inner.plan(op, plan) {
            self.log_done(op, plan);
            self.release(plan);
            return Err(e);
        }
        match self.peer_io(op) {
            Some(p) if !degraded => {
                if p.op == PeerOp::Flush {
                    // Covers every change that completed on both before it is issued.
                    plan.outer.mark = self.completions.load(Ordering::Acquire);
                }
                plan.push(FileIo::Peer(p));
                plan.outer.sent = true;
            }
            _ => plan.outer.result = Some(0),
        }
        Ok(())
    }
}

impl BlockTarget for Mirror {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }

    fn plan(&self, op: &TargetOp, plan: &mut Plan) -> Result<(), TargetError> {
        match op {
            TargetOp::Read { .. } | TargetOp::Cache { .. } => self.inner.plan(op, plan),
            _ => self.start(op, plan),
        }
    }

    fn complete(
        &self,
        op: &TargetOp,
        plan: &mut Plan,
        results: &[i32],
    ) -> Result<Progress, TargetError> {
        if matches!(op, TargetOp::Read { .. } | TargetOp::Cache { .. }) {
            return self.inner.complete(op, plan, results);
        }
        if plan.outer.step == WAITING_FOR_RANGE {
            let Some(&FileIo::Wait { fd }) = plan.get(0) else {
                unreachable!("a range wait holds one Wait I/O");
            };
            self.inflight.lock().parked.remove(&fd);
            plan.clear();
            self.start(op, plan)?;
            return Ok(Progress::Again);
        }
        if plan.outer.step == WAITING_FOR_MOVE {
            // Nothing was issued: planned again (refused as moved once fenced).
            plan.clear();
            self.start(op, plan)?;
            return Ok(Progress::Again);
        }
        if plan.outer.step == WAITING_FOR_LOG {
            let Some(&FileIo::Wait { fd }) = plan.get(0) else {
                unreachable!("a log wait holds one Wait I/O");
            };
            self.log.unpark(fd);
            // Its range is released and taken again (another change to it may go first: each
            // goes to both copies whole, in the same order on both).
            self.release(plan);
            plan.clear();
            self.start(op, plan)?;
            return Ok(Progress::Again);
        }
        if plan.outer.step == WAITING_FOR_DEGRADE {
            let Some(&FileIo::Wait { fd }) = plan.get(0) else {
                unreachable!("a degrade wait holds one Wait I/O");
            };
            let (_, result) = self
                .degrade
                .lock()
                .waiters
                .remove(&fd)
                .expect("every degrade wait has a waiter");
            return match result {
                Some(Ok(())) => {
                    // The peer is recorded stale and the change's bit committed.
                    self.log_done(op, plan);
                    Ok(Progress::Done)
                }
                Some(Err(why)) => Err(TargetError::Volume {
                    what: "recording the peer stale",
                    errno: libc::EIO,
                    message: why,
                }),
                // The poll ended without an outcome (the ring failed it).
                None => Err(TargetError::Volume {
                    what: "recording the peer stale",
                    errno: libc::EIO,
                    message: format!("the wait ended early ({:?})", results.first()),
                }),
            };
        }
        if plan.outer.step == WAITING_FOR_COMMIT {
            return self.inner.complete(&TargetOp::Flush, plan, results);
        }
        assert_eq!(plan.outer.step, RUNNING, "a mirrored operation runs");
        let mut results = results;
        if plan.outer.result.is_none() {
            let peer = plan.pop();
            assert!(
                matches!(peer, Some(FileIo::Peer(_))),
                "the peer I/O is last"
            );
            let (last, rest) = results.split_last().expect("the peer I/O's result");
            plan.outer.result = Some(*last);
            results = rest;
        }
        let local = self.inner.complete(op, plan, results);
        if matches!(local, Ok(Progress::Again)) {
            return Ok(Progress::Again);
        }
        let peer = plan.outer.result.expect("set above");
        // The activity log lets a change's extents go only once nothing can differ because of
        // it: done on both copies (or here alone, degraded, its bit set). One that failed on a
        // copy stays logged; one the peer missed, until its bit is set (below).
        if peer >= 0 && local.is_ok() {
            self.log_done(op, plan);
        }
        // A flush done on every copy that takes writes makes the changes before it durable
        // there: their extents may leave the activity log.
        if matches!(op, TargetOp::Flush)
            && local.is_ok()
            && peer >= 0
            && self.log.flushed(plan.outer.log_mark)
        {
            (self.log_writer)(self.log.clone());
        }
        if peer >= 0 && plan.outer.sent {
            match &local {
                // Both took it: bookkeeping while its range is still held.
                Ok(_) => self.mirrored(op, plan.outer.mark),
                Err(e) => {
                    // The peer took what failed here: the copies may differ in its range.
                    self.diverged.lock().get_or_insert((
                        SystemTime::now(),
                        format!("{op:?} failed here after the peer took it: {e}"),
                    ));
                }
            }
        }
        self.release(plan);
        if peer < 0 {
            let e = std::io::Error::from_raw_os_error(-peer);
            let why = format!("the peer failed {op:?}: {e}");
            if local.is_err() {
                // Failed here too: the client is told so and either content is allowed, but
                // the peer may hold the new one.
                self.diverged
                    .lock()
                    .get_or_insert((SystemTime::now(), why.clone()));
                return local;
            }
            tracing::debug!(volume = self.inner.name(), "{why}");
            let parked = self.peer_failed(op, plan)?;
            // Its bit is set now, unless it waits for the degrade (which settles it then).
            if plan.outer.step != WAITING_FOR_DEGRADE {
                self.log_done(op, plan);
            }
            if parked {
                return Ok(Progress::Again);
            }
        }
        local
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<(), TargetError> {
        self.inner.block_status(offset, len, max_extents, out)
    }

    fn sync(&self) -> Result<(), TargetError> {
        self.inner.sync()
    }

    fn attach(&self) {
        self.inner.attach()
    }

    fn detach(&self) {
        self.inner.detach()
    }

    fn revoked(&self) -> bool {
        self.inner.revoked()
    }

    fn change_count(&self) -> Option<&AtomicU64> {
        self.inner.change_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Pool;
    use crate::target::{Committers, MAX_PLAN_IOS, blocking};

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A mirror over a blank 1 MiB volume of a pool in a temp dir.
    fn mirror(tag: &str) -> (Mirror, Dir, Arc<Committers>) {
        let d = std::env::temp_dir().join(format!("streamer-mirror-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let pool = Pool::open_or_create(&d, true).unwrap();
        pool.create_volume("v", None, Some(1 << 20)).unwrap();
        let vol = pool.open_volume("v").unwrap();
        let committers = Committers::start(1).unwrap();
        let t = Arc::new(VolumeTarget::new("v", vol, &committers).unwrap());
        let degrader: Degrader = Arc::new(|_: &str| {});
        let (file, _) = pool.open_activity_log("v").unwrap();
        // The volume's one extent is logged already (a_change_waits_for_its_log starts empty).
        let logged = crate::target::activity::Logged {
            sequence: 1,
            extents: [0].into(),
            overflow: false,
        };
        let log = Arc::new(ActivityLog::new(file, Some(logged)));
        // The log is written at once, on the calling thread (the node has a thread for it).
        let writer: LogWriter = Arc::new(|log: Arc<ActivityLog>| log.commit().unwrap());
        (
            Mirror::new(t, 9, 4, None, degrader, log, writer),
            Dir(d),
            committers,
        )
    }

    fn peer_ios(plan: &Plan) -> Vec<PeerIo> {
        plan.ios()
            .filter_map(|io| match io {
                FileIo::Peer(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    /// Runs the plan's phases to the end, the peer answering `peer` to every peer I/O.
    fn finish(
        m: &Mirror,
        op: &TargetOp,
        plan: &mut Plan,
        buf: &mut [u8],
        peer: i32,
    ) -> Result<(), TargetError> {
        loop {
            let mut results = [0i32; MAX_PLAN_IOS];
            for (i, io) in plan.ios().enumerate() {
                results[i] = match io {
                    FileIo::Peer(_) => peer,
                    io => blocking::perform(io, buf),
                };
            }
            let n = plan.len();
            match m.complete(op, plan, &results[..n])? {
                Progress::Done => return Ok(()),
                Progress::Again => {}
            }
        }
    }

    /// A write is planned as the volume's write and the peer's, in one phase: same range,
    /// the volume's id in the pair, the fencing token, a rising sequence; FUA goes with it, and
    /// a flush is a flush on both.
    #[test]
    fn writes_and_flushes_go_to_the_volume_and_the_peer_together() {
        let (m, _d, _c) = mirror("plan");
        let mut buf = vec![5u8; 8192];
        let w = TargetOp::Write {
            offset: 4096,
            len: 8192,
            fua: true,
        };
        let mut plan = Plan::default();
        plan.begin();
        m.plan(&w, &mut plan).unwrap();
        let p = peer_ios(&plan);
        assert_eq!(p.len(), 1);
        assert_eq!(
            (
                p[0].op,
                p[0].volume,
                p[0].token,
                p[0].offset,
                p[0].len,
                p[0].fua
            ),
            (PeerOp::Write, 9, 4, 4096, 8192, true)
        );
        assert!(plan.ios().any(|io| matches!(
            io,
            FileIo::Write {
                offset: 4096,
                len: 8192,
                ..
            }
        )));
        finish(&m, &w, &mut plan, &mut buf, 0).unwrap();

        let z = TargetOp::Zero {
            offset: 0,
            len: 4096,
            fua: false,
            may_trim: false,
            fast: false,
        };
        plan.begin();
        m.plan(&z, &mut plan).unwrap();
        let q = peer_ios(&plan);
        assert_eq!((q[0].op, q[0].no_hole), (PeerOp::Zero, true));
        assert!(q[0].sequence > p[0].sequence);
        finish(&m, &z, &mut plan, &mut buf, 0).unwrap();

        plan.begin();
        m.plan(&TargetOp::Flush, &mut plan).unwrap();
        assert_eq!(peer_ios(&plan)[0].op, PeerOp::Flush);
        finish(&m, &TargetOp::Flush, &mut plan, &mut buf, 0).unwrap();

        // Reads are the volume's alone.
        plan.begin();
        m.plan(
            &TargetOp::Read {
                offset: 4096,
                len: 4096,
            },
            &mut plan,
        )
        .unwrap();
        assert!(peer_ios(&plan).is_empty());
        let mut out = vec![0u8; 4096];
        finish(
            &m,
            &TargetOp::Read {
                offset: 4096,
                len: 4096,
            },
            &mut plan,
            &mut out,
            0,
        )
        .unwrap();
        assert_eq!(out, vec![5u8; 4096]);
        assert!(m.diverged().is_none());
    }

    /// A change whose extent is not in the activity log waits (holding its range) until the
    /// log is written, then goes to both copies; the log on disk names its extent.
    #[test]
    fn a_change_waits_for_its_log() {
        let (m0, d, c) = mirror("log");
        let (file, _) = crate::pool::Pool::open_or_create(&d.0, false)
            .unwrap()
            .open_activity_log("v")
            .unwrap();
        file.set_len(0).unwrap();
        let log = Arc::new(ActivityLog::new(file.try_clone().unwrap(), None));
        let writer: LogWriter = Arc::new(|log: Arc<ActivityLog>| log.commit().unwrap());
        let degrader: Degrader = Arc::new(|_: &str| {});
        let m = Mirror::new(m0.volume().clone(), 9, 4, None, degrader, log, writer);
        let w = TargetOp::Write {
            offset: 4096,
            len: 4096,
            fua: false,
        };
        let mut plan = Plan::default();
        plan.begin();
        m.plan(&w, &mut plan).unwrap();
        assert!(matches!(plan.get(0), Some(FileIo::Wait { .. })), "{plan:?}");
        assert!(peer_ios(&plan).is_empty());
        assert_eq!(
            crate::target::activity::read(&file)
                .unwrap()
                .unwrap()
                .extents,
            [0].into()
        );
        let mut buf = vec![3u8; 4096];
        // The wait ends (the log was written): the write and its peer I/O go.
        assert_eq!(m.complete(&w, &mut plan, &[1]).unwrap(), Progress::Again);
        assert_eq!(peer_ios(&plan).len(), 1);
        finish(&m, &w, &mut plan, &mut buf, 0).unwrap();
        drop(c);
    }

    /// While the volume moves, changes and flushes wait; once fenced they are refused as moved
    /// (for the `PairTarget` to plan them again on the new role), having issued nothing.
    #[test]
    fn changes_wait_for_a_move_then_are_refused_as_moved() {
        let (m, _d, _c) = mirror("move");
        m.hold_for_move().unwrap();
        let w = TargetOp::Write {
            offset: 0,
            len: 4096,
            fua: false,
        };
        let mut buf = vec![1u8; 4096];
        let mut plans = Vec::new();
        for op in [w, TargetOp::Flush] {
            let mut plan = Plan::default();
            plan.begin();
            m.plan(&op, &mut plan).unwrap();
            let Some(&FileIo::Wait { fd }) = plan.get(0) else {
                panic!("not parked: {:?}", plan.get(0));
            };
            assert_eq!(plan.len(), 1);
            plans.push((op, plan, fd));
        }
        m.fence("moved to b");
        for (op, mut plan, fd) in plans {
            let r = blocking::perform(&FileIo::Wait { fd }, &mut buf);
            assert!(r > 0, "woken by the fence");
            let e = m.complete(&op, &mut plan, &[r]).unwrap_err();
            assert!(matches!(e, TargetError::NotOwner(_)), "{e}");
        }
        // Nothing held: a write after the fence is refused at once.
        let mut plan = Plan::default();
        plan.begin();
        assert!(matches!(
            m.plan(&w, &mut plan),
            Err(TargetError::NotOwner(_))
        ));
    }

    /// A write the peer did not take is not answered until the peer is recorded stale (the
    /// degrader's outcome): then it succeeds and its blocks are in the volume's bitmap, and
    /// later writes go to the volume alone. If the peer cannot be recorded stale, it fails.
    #[test]
    fn a_write_the_peer_missed_waits_for_the_peer_to_be_recorded_stale() {
        let (m, _d, _c) = mirror("degrade");
        let mut buf = vec![1u8; 8192];
        let w = TargetOp::Write {
            offset: 8192,
            len: 8192,
            fua: false,
        };
        let run_until_parked = |plan: &mut Plan, buf: &mut [u8]| {
            plan.begin();
            m.plan(&w, plan).unwrap();
            let mut results = [0i32; MAX_PLAN_IOS];
            for (i, io) in plan.ios().enumerate() {
                results[i] = match io {
                    FileIo::Peer(_) => -libc::ETIMEDOUT,
                    io => blocking::perform(io, buf),
                };
            }
            let n = plan.len();
            assert_eq!(
                m.complete(&w, plan, &results[..n]).unwrap(),
                Progress::Again
            );
            let Some(&FileIo::Wait { fd }) = plan.get(0) else {
                panic!("parked: {plan:?}");
            };
            fd
        };
        // Recording the peer stale fails (etcd out of reach): the write fails.
        let mut plan = Plan::default();
        let fd = run_until_parked(&mut plan, &mut buf);
        assert_eq!(m.peer_state(), PeerState::Degrading);
        let ranges = m.pending_ranges();
        assert_eq!(ranges, vec![(8192, 8192)]);
        m.degrade_done(Err("etcd is out of reach".into()), &ranges);
        let r = blocking::perform(&FileIo::Wait { fd }, &mut buf);
        let e = m.complete(&w, &mut plan, &[r]).unwrap_err();
        assert_eq!(e.errno(), crate::nbd::NbdErrno::Io);
        assert!(e.to_string().contains("etcd is out of reach"), "{e}");
        // Still degrading: the degrader tries again, and writes the peer misses fail meanwhile.
        assert_eq!(m.peer_state(), PeerState::Degrading);
        assert!(m.degrade_pending());
        // The next attempt succeeds: the write completes, both ranges are in the bitmap.
        let fd = run_until_parked(&mut plan, &mut buf);
        let ranges = m.pending_ranges();
        m.volume().start_peer_bitmap(&ranges).unwrap();
        m.degrade_done(Ok(()), &[]);
        let r = blocking::perform(&FileIo::Wait { fd }, &mut buf);
        assert_eq!(m.complete(&w, &mut plan, &[r]).unwrap(), Progress::Done);
        assert!(matches!(m.peer_state(), PeerState::Degraded { .. }));
        assert_eq!(m.volume().peer_bitmap(), Some(2));
        // Degraded: no peer I/O at all, and the volume sets the bits itself.
        let w2 = TargetOp::Write {
            offset: 65536,
            len: 4096,
            fua: false,
        };
        plan.begin();
        m.plan(&w2, &mut plan).unwrap();
        assert!(peer_ios(&plan).is_empty());
        finish(&m, &w2, &mut plan, &mut buf[..4096], 0).unwrap();
        assert_eq!(m.volume().peer_bitmap(), Some(3));
    }

    /// Overlapping writes never run together (they would land in different orders on the two
    /// nodes): the second parks until the first ended, then runs whole; a write elsewhere runs
    /// meanwhile.
    #[test]
    fn an_overlapping_write_waits_for_the_one_in_flight() {
        let (m, _d, _c) = mirror("overlap");
        let mut buf = vec![1u8; 8192];
        let first = TargetOp::Write {
            offset: 0,
            len: 8192,
            fua: false,
        };
        let second = TargetOp::Write {
            offset: 4096,
            len: 4096,
            fua: false,
        };
        let elsewhere = TargetOp::Trim {
            offset: 65536,
            len: 4096,
            fua: false,
        };
        let (mut p1, mut p2, mut p3) = (Plan::default(), Plan::default(), Plan::default());
        p1.begin();
        m.plan(&first, &mut p1).unwrap();
        p2.begin();
        m.plan(&second, &mut p2).unwrap();
        let Some(&FileIo::Wait { fd }) = p2.get(0) else {
            panic!("the overlapping write parks: {p2:?}");
        };
        assert_eq!(p2.len(), 1);
        p3.begin();
        m.plan(&elsewhere, &mut p3).unwrap();
        assert_eq!(peer_ios(&p3).len(), 1, "a write elsewhere is not held");
        finish(&m, &elsewhere, &mut p3, &mut buf, 0).unwrap();
        // Still parked: its eventfd was signalled by the trim's end, and it plans again into
        // another wait while the first write is in flight.
        let r = blocking::perform(&FileIo::Wait { fd }, &mut buf);
        assert!(r > 0);
        assert_eq!(m.complete(&second, &mut p2, &[r]).unwrap(), Progress::Again);
        assert!(matches!(p2.get(0), Some(FileIo::Wait { .. })) && p2.len() == 1);
        // The first ends: the second runs, peer I/O and all.
        finish(&m, &first, &mut p1, &mut buf, 0).unwrap();
        let Some(&FileIo::Wait { fd }) = p2.get(0) else {
            unreachable!()
        };
        let r = blocking::perform(&FileIo::Wait { fd }, &mut buf);
        assert_eq!(m.complete(&second, &mut p2, &[r]).unwrap(), Progress::Again);
        assert_eq!(peer_ios(&p2).len(), 1);
        finish(&m, &second, &mut p2, &mut buf[..4096], 0).unwrap();
        assert!(m.inflight.lock().ranges.is_empty());
        assert!(m.inflight.lock().parked.is_empty());
    }
}
