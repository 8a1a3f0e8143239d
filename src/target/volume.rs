//! A pool volume (a thin clone of a golden image, or a blank volume) served as a block target.
//!
//! The data path runs on the engine's rings: a read is planned from the volume's map as reads of
//! the image file and the data file at the same offsets (both are identity-mapped) and zero
//! fills; a write goes to the data file, and the blocks it covered become the volume's own once
//! it completed. Only the rare partial write to a block still inherited from the image is done
//! synchronously (a 4 KiB copy-up, under the volume's lock), so the ring write never leaves part
//! of a block without its image bytes.
//!
//! `FLUSH` (and `FUA`) is a group commit: the request parks on an eventfd (a `Wait` I/O on the
//! ring) while a committer thread runs one commit for every flush that arrived before it
//! started: plan the map pages, sync the data file, write the pages and superblock copy A with
//! syncs between (volume-format SPEC.md §6). At most one commit per volume is in flight; flushes
//! that arrive meanwhile share the next one. A handful of committer threads serve every volume.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::{Condvar, Mutex};
use volume_format::state::Source;
use volume_format::{FileStorage, Storage, Volume, VolumeError, Zeroing, write_commit};

use super::{BlockTarget, FileIo, Geometry, Plan, Progress, TargetError, TargetOp, push_extent};
use crate::nbd::wire::{STATE_HOLE, STATE_ZERO};

const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Why `begin_or_park` parked a request.
enum Park {
    /// A block to copy up has a write in flight: the eventfd every write's end signals.
    Busy(RawFd),
    /// Too many dirty map pages: the next commit makes room.
    ForRoom,
}

/// `Plan::step` of a write-like request parked until a commit makes room in the block map (every
/// other phase is step 0).
const WAITING_FOR_ROOM: u32 = 1;
/// Most bytes one BLOCK_STATUS reply describes (the client asks again for the rest).
const BLOCK_STATUS_MAX_BYTES: u64 = 1 << 30;

/// Committer threads shared by every volume of a node.
pub struct Committers {
    queue: Arc<CommitQueue>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct CommitQueue {
    state: Mutex<QueueState>,
    cv: Condvar,
}

#[derive(Default)]
struct QueueState {
    /// Volumes with flushes waiting; each is here at most once (`Flushes::scheduled`).
    ready: VecDeque<Arc<Shared>>,
    stop: bool,
}

impl Committers {
    pub fn start(threads: usize) -> io::Result<Arc<Committers>> {
        let queue = Arc::new(CommitQueue {
            state: Mutex::new(QueueState::default()),
            cv: Condvar::new(),
        });
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let q = queue.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("streamer-commit-{i}"))
                    .spawn(move || q.run())?,
            );
        }
        Ok(Arc::new(Committers {
            queue,
            threads: Mutex::new(handles),
        }))
    }

    /// Stops the threads once the queue is empty (after the engine stopped: nothing waits).
    pub fn stop(&self) {
        self.queue.state.lock().stop = true;
        self.queue.cv.notify_all();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Committers {
    fn drop(&mut self) {
        self.stop();
    }
}

impl CommitQueue {
    fn schedule(&self, v: Arc<Shared>) {
        self.state.lock().ready.push_back(v);
        self.cv.notify_one();
    }

    fn run(&self) {
        loop {
            let v = {
                let mut st = self.state.lock();
                loop {
                    if let Some(v) = st.ready.pop_front() {
                        break v;
                    }
                    if st.stop {
                        return;
                    }
                    self.cv.wait(&mut st);
                }
            };
            v.run_commits();
        }
    }
}

/// A request parked until a commit finishes.
struct Waiter {
    efd: EventFd,
    result: Mutex<Option<Result<(), CommitFailed>>>,
}

#[derive(Debug, Clone)]
struct CommitFailed {
    errno: i32,
    message: String,
}

#[derive(Default)]
struct Flushes {
    waiting: Vec<Arc<Waiter>>,
    /// A commit no request waits for: the volume holds more dirty map pages than its cache
    /// (a client writing all over it without flushing).
    background: bool,
    /// The volume is in the committers' queue or being committed.
    scheduled: bool,
}

/// I/O counters of a served volume.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeCounters {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub flushes: u64,
    pub zeroes: u64,
    pub errors: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    flushes: AtomicU64,
    zeroes: AtomicU64,
    errors: AtomicU64,
}

struct Shared {
    name: String,
    vol: Mutex<Volume<FileStorage>>,
    /// The metadata file, written only by commits; its lock is the commit lock (taken before
    /// `vol` when both are held).
    meta: Mutex<FileStorage>,
    /// The data file (a second handle: commits sync it without holding `vol`).
    data: File,
    image: Option<File>,
    size: AtomicU64,
    flushes: Mutex<Flushes>,
    waiters: Mutex<HashMap<RawFd, Arc<Waiter>>>,
    /// Requests parked because a block they must copy up has a whole-block write in flight
    /// (`VolumeError::Busy`), by the eventfd their `Wait` I/O polls. Every write that ends
    /// signals them all; each then plans again.
    parked: Mutex<HashMap<RawFd, EventFd>>,
    committers: Arc<CommitQueue>,
    /// The data file's file system punches holes (so zeroing is metadata work, as fast as a
    /// write or faster); where it does not, FAST_ZERO is refused as the spec asks.
    zeroing_is_fast: bool,
    clients: AtomicUsize,
    revoked: AtomicBool,
    counters: Counters,
}

/// A served volume. Dropping the last handle closes its files.
pub struct VolumeTarget {
    shared: Arc<Shared>,
}

fn volume_error(what: &'static str, e: &VolumeError) -> TargetError {
    TargetError::Volume {
        what,
        errno: e.errno(),
        message: e.to_string(),
    }
}

impl VolumeTarget {
    pub fn new(
        name: &str,
        vol: Volume<FileStorage>,
        committers: &Committers,
    ) -> io::Result<VolumeTarget> {
        let (meta, data, image) = vol.files();
        let zeroing_is_fast = FileStorage::new(data.file().try_clone()?)?.frees_space();
        let meta = FileStorage::new(meta.file().try_clone()?)?;
        let data = data.file().try_clone()?;
        let image = image.map(|i| i.file().try_clone()).transpose()?;
        Ok(VolumeTarget {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                size: AtomicU64::new(vol.size()),
                vol: Mutex::new(vol),
                meta: Mutex::new(meta),
                data,
                image,
                flushes: Mutex::new(Flushes::default()),
                waiters: Mutex::new(HashMap::new()),
                parked: Mutex::new(HashMap::new()),
                committers: committers.queue.clone(),
                zeroing_is_fast,
                clients: AtomicUsize::new(0),
                revoked: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Connections using the volume now.
    pub fn clients(&self) -> usize {
        self.shared.clients.load(Ordering::Acquire)
    }

    /// Withdraws the volume: every request fails from now on, and the engine closes the
    /// connections using it within a tick. Used before the volume is deleted or taken offline.
    pub fn revoke(&self) {
        self.shared.revoked.store(true, Ordering::Release);
    }

    pub fn counters(&self) -> VolumeCounters {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VolumeCounters {
            reads: l(&c.reads),
            writes: l(&c.writes),
            read_bytes: l(&c.read_bytes),
            written_bytes: l(&c.written_bytes),
            flushes: l(&c.flushes),
            zeroes: l(&c.zeroes),
            errors: l(&c.errors),
        }
    }

    /// Space the volume takes on disk (data and metadata files).
    pub fn stat(&self) -> Result<volume_format::VolumeStat, VolumeError> {
        self.shared.vol.lock().stat()
    }

    /// Why the volume latched failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.vol.lock().failure().map(str::to_owned)
    }

    /// Grows the volume to `size` (committed before it returns; new connections see it).
    pub fn grow(&self, size: u64) -> Result<(), VolumeError> {
        let _commit = self.shared.meta.lock();
        let mut vol = self.shared.vol.lock();
        vol.check_grow(size)?;
        if size > vol.size() {
            volume_format::file::reserve_metadata(vol.files().0.file(), size)?;
        }
        if let Err(e) = vol.grow(size) {
            let _ = volume_format::file::release_metadata_reserve(vol.files().0.file());
            return Err(e);
        }
        self.shared.size.store(vol.size(), Ordering::Release);
        Ok(())
    }

    /// Starts the peer dirty bitmap (volume-format SPEC.md §10) with `extra` ranges set (changes
    /// that completed before, which the peer did not take); committed before it returns. The
    /// volume takes a new generation with it (its contents part from the peer's here).
    pub fn start_peer_bitmap(&self, extra: &[(u64, u64)]) -> Result<(), VolumeError> {
        let _commit = self.shared.meta.lock();
        let mut vol = self.shared.vol.lock();
        vol.start_peer_bitmap(extra, crate::pool::random_id())
    }

    /// The peer adopted this copy's generation while its bitmap is kept: the bitmap counts
    /// from it now and the copy takes a new one (committed).
    pub fn rebase_peer_bitmap(&self) -> Result<(), VolumeError> {
        let _commit = self.shared.meta.lock();
        let mut vol = self.shared.vol.lock();
        vol.rebase_peer_bitmap(crate::pool::random_id())
    }

    /// The generation identifiers (volume-format SPEC.md §10): current, the bitmap's, history.
    pub fn generations(&self) -> crate::peer::generations::Generations {
        crate::peer::generations::Generations::of(&self.shared.vol.lock())
    }

    /// Sets the current generation (committed): `keep_old` keeps the old one in the history.
    pub fn set_generation(&self, generation: [u8; 16], keep_old: bool) -> Result<(), VolumeError> {
        let _commit = self.shared.meta.lock();
        let mut vol = self.shared.vol.lock();
        vol.set_generation(generation, keep_old)
    }

    /// Sets the peer dirty bits of a range (a change the peer did not take).
    pub fn mark_peer_dirty(&self, offset: u64, len: u64) {
        self.shared.vol.lock().mark_peer_dirty_range(offset, len);
    }

    /// Commits now (blocking): what changed in memory (peer dirty bits set outside a request)
    /// becomes durable.
    pub fn commit_now(&self) -> Result<(), TargetError> {
        self.shared.commit().map_err(|f| f.into_error("committing"))
    }

    /// Clears the peer dirty bits of the whole blocks of a range (a change both nodes took).
    pub fn clear_peer_dirty_whole(&self, offset: u64, len: u64) {
        let first = offset.div_ceil(4096);
        let end = (offset + len) / 4096;
        if end > first {
            self.shared.vol.lock().clear_peer_dirty(first, end - first);
        }
    }

    /// Clears the peer dirty bits of `count` blocks from `first` (the resync made the peer's
    /// copy equal and durable).
    pub fn clear_peer_dirty(&self, first: u64, count: u64) {
        self.shared.vol.lock().clear_peer_dirty(first, count);
    }

    /// The first run of set peer dirty bits at or after block `from`, at most `max` blocks.
    pub fn next_peer_dirty(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        self.shared.vol.lock().next_peer_dirty(from, max)
    }

    /// Ends the peer dirty bitmap if no bit is set (committed); false otherwise.
    pub fn end_peer_bitmap(&self) -> Result<bool, VolumeError> {
        let _commit = self.shared.meta.lock();
        let mut vol = self.shared.vol.lock();
        vol.end_peer_bitmap()
    }

    /// Drops the peer dirty bitmap, set bits and all (committed): what it named no longer
    /// matters (this copy is a replica now, or its changes were discarded).
    pub fn drop_peer_bitmap(&self) -> Result<(), VolumeError> {
        if self.peer_bitmap().is_none() {
            return Ok(());
        }
        self.clear_peer_dirty(0, self.shared.size.load(Ordering::Acquire).div_ceil(4096));
        self.end_peer_bitmap().map(|_| ())
    }

    /// Whether the volume keeps a peer dirty bitmap, and how many blocks it has set.
    pub fn peer_bitmap(&self) -> Option<u64> {
        let vol = self.shared.vol.lock();
        vol.peer_bitmap().then(|| vol.peer_dirty_blocks())
    }

    /// The volume's generation (hex), what a replica left behind is measured from.
    pub fn generation(&self) -> String {
        volume_format::image::hex(&self.shared.vol.lock().state().superblock().generation)
    }

    /// Commits everything and makes the superblock's second copy durable (before the volume is
    /// closed or taken offline).
    pub fn close(&self) -> Result<(), TargetError> {
        self.shared.commit().map_err(|f| f.into_error("closing"))?;
        self.shared
            .meta
            .lock()
            .sync()
            .map_err(|source| TargetError::Syncing { source })
    }

    fn data_fd(&self) -> RawFd {
        self.shared.data.as_raw_fd()
    }

    fn live(&self) -> Result<(), TargetError> {
        if self.shared.revoked.load(Ordering::Acquire) {
            return Err(TargetError::Withdrawn);
        }
        Ok(())
    }

    /// Plans read pieces of `[from, offset+len)` into `plan` until it is full; `plan.cursor`
    /// says where the next phase resumes.
    fn plan_read(
        &self,
        offset: u64,
        len: u32,
        from: u64,
        plan: &mut Plan,
    ) -> Result<(), TargetError> {
        let mut vol = self.shared.vol.lock();
        if vol.failure().is_some() {
            return Err(TargetError::Latched);
        }
        let end = offset + u64::from(len);
        vol.page_in(from, end - from)
            .map_err(|e| volume_error("reading", &e))?;
        let data_fd = self.data_fd();
        let image_fd = self.shared.image.as_ref().map(AsRawFd::as_raw_fd);
        let mut next = None;
        vol.state().pieces(from, end - from, |p| {
            if next.is_some() {
                return;
            }
            if plan.is_full() {
                next = Some(p.offset);
                return;
            }
            // Pieces lie inside the request, whose length fits in u32.
            let buf_start = (p.offset - offset) as u32;
            let len = p.len as u32;
            plan.push(match (p.source, image_fd) {
                (Source::Data, _) => FileIo::Read {
                    fd: data_fd,
                    offset: p.offset,
                    buf_start,
                    len,
                },
                (Source::Image, Some(fd)) => FileIo::Read {
                    fd,
                    offset: p.offset,
                    buf_start,
                    len,
                },
                // An image piece without an image cannot happen (the volume was opened with
                // its image); zeroes are the safe answer if it ever did.
                (Source::Zero, _) | (Source::Image, None) => FileIo::Zero { buf_start, len },
            });
        });
        plan.cursor = next.unwrap_or(end);
        Ok(())
    }

    /// Parks the request until a commit that started after this call finished.
    fn plan_wait(&self, plan: &mut Plan) -> Result<(), TargetError> {
        let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| TargetError::Syncing { source: e.into() })?;
        let fd = efd.as_fd().as_raw_fd();
        let w = Arc::new(Waiter {
            efd,
            result: Mutex::new(None),
        });
        self.shared.waiters.lock().insert(fd, w.clone());
        let schedule = {
            let mut f = self.shared.flushes.lock();
            f.waiting.push(w);
            !std::mem::replace(&mut f.scheduled, true)
        };
        if schedule {
            self.shared.committers.schedule(self.shared.clone());
        }
        plan.push(FileIo::Wait { fd });
        Ok(())
    }

    /// The outcome of the commit a `Wait` I/O of `plan` waited for (`res`: the poll's result).
    fn wait_result(
        &self,
        plan: &mut Plan,
        res: i32,
        what: &'static str,
    ) -> Result<Progress, TargetError> {
        let Some(&FileIo::Wait { fd }) = plan.get(0) else {
            unreachable!("a wait phase holds one Wait I/O");
        };
        let w = self
            .shared
            .waiters
            .lock()
            .remove(&fd)
            .expect("every Wait I/O has a waiter");
        let r = w.result.lock().take();
        match r {
            Some(Ok(())) => Ok(Progress::Done),
            Some(Err(f)) => Err(f.into_error(what)),
            // The poll ended without the commit (the ring failed it): the request fails; the
            // committer still holds the waiter and signals it harmlessly later.
            None => Err(TargetError::Syncing {
                source: io::Error::from_raw_os_error(if res < 0 { -res } else { libc::EIO }),
            }),
        }
    }

    fn is_wait(plan: &mut Plan) -> bool {
        matches!(plan.get_mut(0), Some(FileIo::Wait { .. }))
    }

    /// Runs the start of a write, WRITE_ZEROES or TRIM (`f`) under the volume's lock, or parks
    /// the request (and returns true): when a block it must copy up has a whole-block write in
    /// flight, `plan` holds a `Wait` I/O that a write's end wakes; when the volume holds more
    /// dirty map pages than its cache allows, the request waits for the commit that cleans
    /// them (`WAITING_FOR_ROOM`), so their memory stays bounded however fast a client writes.
    /// Either way it plans again once woken.
    fn begin_or_park(
        &self,
        plan: &mut Plan,
        what: &'static str,
        f: impl FnOnce(&mut Volume<FileStorage>) -> Result<(), VolumeError>,
    ) -> Result<bool, TargetError> {
        // A write-like request's step says only whether it waits for room.
        plan.step = 0;
        let parked = self.with_write_locks(|v| {
            if v.state().must_wait_for_commit() {
                return Ok(Some(Park::ForRoom));
            }
            match f(v) {
                Ok(()) => Ok(None),
                Err(VolumeError::Busy { .. }) => {
                    // Registered under the volume's lock, which every write's end takes before it
                    // signals: no wake-up is missed.
                    let efd = EventFd::from_value_and_flags(
                        0,
                        EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
                    )
                    .map_err(|e| TargetError::Writing {
                        offset: 0,
                        source: e.into(),
                    })?;
                    let fd = efd.as_fd().as_raw_fd();
                    self.shared.parked.lock().insert(fd, efd);
                    Ok(Some(Park::Busy(fd)))
                }
                Err(e) => Err(volume_error(what, &e)),
            }
        })?;
        match parked {
            None => Ok(false),
            Some(Park::Busy(fd)) => {
                plan.push(FileIo::Wait { fd });
                Ok(true)
            }
            Some(Park::ForRoom) => {
                plan.step = WAITING_FOR_ROOM;
                self.plan_wait(plan)?;
                Ok(true)
            }
        }
    }

    /// Schedules a commit that no request waits for (once: until it runs, more calls do
    /// nothing). Committed map pages are clean, and clean pages can be evicted.
    fn commit_in_background(&self) {
        let schedule = {
            let mut f = self.shared.flushes.lock();
            if f.background {
                return;
            }
            f.background = true;
            !std::mem::replace(&mut f.scheduled, true)
        };
        if schedule {
            self.shared.committers.schedule(self.shared.clone());
        }
    }

    /// A write ended (or failed): every parked request plans again.
    fn wake_parked(&self) {
        for efd in self.shared.parked.lock().values() {
            // The eventfd counter cannot overflow: one write per ended write, read never.
            let _ = efd.write(1);
        }
    }

    /// Runs `f` (the start of a write) under the volume's lock: one lock on the hot path. The
    /// first write of a new epoch commits the new generation first, which needs the commit lock,
    /// taken before the volume's; only then are both taken.
    fn with_write_locks<T>(&self, f: impl FnOnce(&mut Volume<FileStorage>) -> T) -> T {
        let mut vol = self.shared.vol.lock();
        if !vol.generation_armed() {
            return f(&mut vol);
        }
        drop(vol);
        let _commit = self.shared.meta.lock();
        f(&mut self.shared.vol.lock())
    }

    fn count_error(&self) {
        self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
    }
}

impl CommitFailed {
    fn into_error(self, what: &'static str) -> TargetError {
        TargetError::Volume {
            what,
            errno: self.errno,
            message: self.message,
        }
    }
}

impl Shared {
    /// Commits for every waiting flush, batch after batch, until none wait.
    fn run_commits(&self) {
        loop {
            let batch = {
                let mut f = self.flushes.lock();
                if f.waiting.is_empty() && !f.background {
                    f.scheduled = false;
                    return;
                }
                f.background = false;
                std::mem::take(&mut f.waiting)
            };
            let r = self.commit();
            for w in batch {
                *w.result.lock() = Some(r.clone());
                // The eventfd counter cannot overflow with one write per waiter.
                let _ = w.efd.write(1);
            }
        }
    }

    /// One commit: every write completed before it started becomes durable. The map is
    /// snapshotted before the data sync, so a bit never claims data the sync did not cover.
    fn commit(&self) -> Result<(), CommitFailed> {
        let mut meta = self.meta.lock();
        let failed = |what: &str, e: &VolumeError| CommitFailed {
            errno: e.errno(),
            message: format!("{what}: {e}"),
        };
        let planned = self
            .vol
            .lock()
            .begin_commit()
            .map_err(|e| failed("commit", &e))?;
        let synced = self.data.sync_data().map_err(VolumeError::from);
        let written = synced.and_then(|()| match &planned {
            Some(c) => write_commit(&mut *meta, c),
            None => Ok(()),
        });
        let mut vol = self.vol.lock();
        match written {
            Ok(()) => {
                if let Some(c) = planned {
                    vol.end_commit(c);
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(volume = %self.name, "commit failed, volume latched failed: {e}");
                vol.fail(format!("commit failed: {e}"));
                Err(failed("commit", &e))
            }
        }
    }
}

impl BlockTarget for VolumeTarget {
    fn geometry(&self) -> Geometry {
        Geometry {
            size_bytes: self.shared.size.load(Ordering::Acquire),
            read_only: false,
            can_trim: true,
            can_zero: true,
            can_fast_zero: true,
            can_cache: false,
            // A commit covers every write completed before it, on any connection.
            can_multi_conn: true,
            block_min: 1,
            block_preferred: PREFERRED_BLOCK_BYTES,
        }
    }

    fn plan(&self, op: &TargetOp, plan: &mut Plan) -> Result<(), TargetError> {
        self.live()?;
        match *op {
            TargetOp::Read { offset, len } => self.plan_read(offset, len, offset, plan),
            TargetOp::Write { offset, len, fua } => {
                if self.begin_or_park(plan, "writing", |v| v.begin_write(offset, u64::from(len)))? {
                    return Ok(());
                }
                if len > 0 {
                    plan.push(FileIo::Write {
                        fd: self.data_fd(),
                        offset,
                        buf_start: 0,
                        len,
                        dsync: false,
                    });
                } else if fua {
                    self.plan_wait(plan)?;
                }
                Ok(())
            }
            TargetOp::Flush => self.plan_wait(plan),
            TargetOp::Trim { offset, len, fua } => {
                if self.begin_or_park(plan, "zeroing", |v| v.write_zeroes(offset, len))? {
                    return Ok(());
                }
                if fua {
                    self.plan_wait(plan)?;
                }
                Ok(())
            }
            TargetOp::Zero {
                offset,
                len,
                fua,
                may_trim,
                fast,
            } => {
                // FAST_ZERO asks for no slower path than a write: where the data file cannot
                // punch (nor, in practice, zero a range), zeroing writes zeroes.
                if fast && !self.shared.zeroing_is_fast {
                    return Err(TargetError::FastZeroUnsupported);
                }
                // NO_HOLE: the range stays allocated (FALLOC_FL_ZERO_RANGE, or zeroes written
                // where the file system lacks it), never punched, not even for a moment.
                let how = if may_trim {
                    Zeroing::Punch
                } else {
                    Zeroing::Allocate
                };
                if self.begin_or_park(plan, "zeroing", |v| v.zero(offset, len, how))? {
                    return Ok(());
                }
                if fua {
                    self.plan_wait(plan)?;
                }
                Ok(())
            }
            TargetOp::Cache { .. } => Ok(()),
        }
    }

    fn complete(
        &self,
        op: &TargetOp,
        plan: &mut Plan,
        results: &[i32],
    ) -> Result<Progress, TargetError> {
        let c = &self.shared.counters;
        if let Some(&FileIo::Wait { fd }) = plan.get(0)
            && self.shared.parked.lock().remove(&fd).is_some()
        {
            // Woken by a write's end (or the ring ended the poll): plan the operation again.
            plan.clear();
            self.plan(op, plan)?;
            return Ok(Progress::Again);
        }
        let write_like = matches!(
            op,
            TargetOp::Write { .. } | TargetOp::Trim { .. } | TargetOp::Zero { .. }
        );
        if write_like && plan.step == WAITING_FOR_ROOM && Self::is_wait(plan) {
            let res = results.first().copied().unwrap_or(-libc::EIO);
            self.wait_result(plan, res, "making room in the block map")
                .inspect_err(|_| self.count_error())?;
            plan.clear();
            self.plan(op, plan)?;
            return Ok(Progress::Again);
        }
        if Self::is_wait(plan) {
            let what = if matches!(op, TargetOp::Flush) {
                "flushing"
            } else {
                "making a FUA write durable"
            };
            c.flushes.fetch_add(1, Ordering::Relaxed);
            let res = results.first().copied().unwrap_or(-libc::EIO);
            return self
                .wait_result(plan, res, what)
                .inspect_err(|_| self.count_error());
        }
        let failed = results
            .iter()
            .find(|r| **r < 0)
            .map(|r| io::Error::from_raw_os_error(-r));
        match *op {
            TargetOp::Read { offset, len } => {
                if let Some(source) = failed {
                    self.count_error();
                    return Err(TargetError::Reading { offset, source });
                }
                let end = offset + u64::from(len);
                if plan.cursor < end {
                    let from = plan.cursor;
                    plan.clear();
                    self.plan_read(offset, len, from, plan)?;
                    return Ok(Progress::Again);
                }
                c.reads.fetch_add(1, Ordering::Relaxed);
                c.read_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
                Ok(Progress::Done)
            }
            TargetOp::Write { offset, len, fua } => {
                if let Some(source) = failed {
                    self.count_error();
                    // Out of space changed no map bit: the write fails alone (volume-format
                    // `latching_data`). Anything else may have lost page-cache data: latch.
                    {
                        let mut vol = self.shared.vol.lock();
                        vol.cancel_write(offset, u64::from(len));
                        if !matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
                            vol.fail(format!("write at {offset} failed: {source}"));
                        }
                    }
                    self.wake_parked();
                    return Err(TargetError::Writing { offset, source });
                }
                let overfull = {
                    let mut vol = self.shared.vol.lock();
                    vol.end_write(offset, u64::from(len));
                    vol.state().cache_overfull()
                };
                if overfull {
                    self.commit_in_background();
                }
                self.wake_parked();
                c.writes.fetch_add(1, Ordering::Relaxed);
                c.written_bytes.fetch_add(u64::from(len), Ordering::Relaxed);
                if fua {
                    plan.clear();
                    self.plan_wait(plan)?;
                    return Ok(Progress::Again);
                }
                Ok(Progress::Done)
            }
            TargetOp::Zero { offset, .. } | TargetOp::Trim { offset, .. } => {
                if let Some(source) = failed {
                    self.count_error();
                    return Err(TargetError::Zeroing { offset, source });
                }
                c.zeroes.fetch_add(1, Ordering::Relaxed);
                Ok(Progress::Done)
            }
            TargetOp::Flush | TargetOp::Cache { .. } => Ok(Progress::Done),
        }
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<(), TargetError> {
        self.live()?;
        let mut vol = self.shared.vol.lock();
        let end = offset
            .saturating_add(len.min(BLOCK_STATUS_MAX_BYTES))
            .min(vol.size());
        if end <= offset {
            return Ok(());
        }
        let extents = vol
            .block_status(offset, end - offset)
            .map_err(|e| volume_error("querying allocation", &e))?;
        for e in extents {
            let flags = if e.zero { STATE_HOLE | STATE_ZERO } else { 0 };
            if !push_extent(out, max_extents, e.len, flags) {
                break;
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), TargetError> {
        self.close()
    }

    fn attach(&self) {
        self.shared.clients.fetch_add(1, Ordering::AcqRel);
    }

    fn detach(&self) {
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
    }

    fn revoked(&self) -> bool {
        self.shared.revoked.load(Ordering::Acquire)
    }
}
