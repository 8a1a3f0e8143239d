//! One worker thread: a ring, its connections, and the loop that turns completions into work.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use io_uring::{IoUring, Probe, opcode, squeue, types};
use nix::sys::eventfd::EventFd;

use super::bufpool::BufPool;
use super::conn::Conn;
use super::{EngineConfig, Incoming};
use crate::target::{Exports, FileIo, MAX_PLAN_IOS, ZERO_WRITE_BYTES};

/// What a completion belongs to, packed into the 64-bit `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tag {
    Wake = 1,
    Tick = 2,
    Recv = 3,
    Send = 4,
    Io = 5,
    /// A step of a write payload spliced from the socket into the file (see `Conn::splice_step`).
    Splice = 6,
}

pub(super) fn user_data(tag: Tag, conn: u32, slot: u16, sub: u16) -> u64 {
    debug_assert!(conn < 1 << 24);
    (tag as u64) << 56 | u64::from(conn) << 32 | u64::from(slot) << 16 | u64::from(sub)
}

fn decode(ud: u64) -> (Option<Tag>, u32, u16, u16) {
    let tag = match ud >> 56 {
        1 => Some(Tag::Wake),
        2 => Some(Tag::Tick),
        3 => Some(Tag::Recv),
        4 => Some(Tag::Send),
        5 => Some(Tag::Io),
        6 => Some(Tag::Splice),
        _ => None,
    };
    (
        tag,
        (ud >> 32) as u32 & 0xff_ffff,
        (ud >> 16) as u16,
        ud as u16,
    )
}

/// Errors of `io_uring_enter` that lose nothing: interrupted by a signal (`EINTR`), or
/// completions must be reaped before more can be submitted (`EBUSY`). The loop goes on.
fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY))
}

const RING_ENTRIES: u32 = 1024;

/// Every operation the engine submits, by name: a kernel whose io_uring lacks one is refused at
/// start with the names of what it lacks, instead of failing requests (and latching exports)
/// when the first one is submitted. `every_opcode_submitted_is_probed` keeps this list whole.
const NEEDED_OPCODES: [(u8, &str); 12] = [
    (opcode::Nop::CODE, "Nop"),
    (opcode::Read::CODE, "Read"),
    (opcode::Write::CODE, "Write"),
    (opcode::Recv::CODE, "Recv"),
    (opcode::Send::CODE, "Send"),
    (opcode::SendMsg::CODE, "SendMsg"),
    (opcode::Fsync::CODE, "Fsync"),
    (opcode::Fallocate::CODE, "Fallocate"),
    (opcode::Fadvise::CODE, "Fadvise"),
    (opcode::PollAdd::CODE, "PollAdd"),
    (opcode::Timeout::CODE, "Timeout"),
    (opcode::Splice::CODE, "Splice"),
];

/// Refuses a ring that cannot run every operation the engine submits.
fn check_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let missing: Vec<&str> = NEEDED_OPCODES
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "this kernel's io_uring lacks {}: streamer needs Linux 5.7 or later",
            missing.join(", ")
        ),
    ))
}

/// A worker's buffer memory for requests: its share of the node's budget, never less than two
/// of the largest requests (one can always be received while another is answered). Read-ahead
/// is bounded by its own share (`Io::ahead_limit`) and not counted against this.
fn worker_buffer_limit(cfg: &EngineConfig) -> u64 {
    (cfg.max_buffer_bytes / cfg.threads.max(1) as u64).max(2 * u64::from(cfg.max_payload_bytes))
}

/// Transfers at least this large are handed to io-wq workers (see `file_io`).
const ASYNC_MIN_BYTES: u32 = 256 * 1024;
const TICK: Duration = Duration::from_secs(1);
/// Longest spin while file I/O is in flight, whatever `EngineConfig::poll` allows. Measured in
/// direct mode at depth 1 (a disk read of ~200 us): spinning 200 us instead of 50 doubled the
/// CPU per read and gained nothing; the disk's completion is not a wake-up the spin saves.
const FILE_POLL_MAX: Duration = Duration::from_micros(50);
/// Every splice: never waits on the pipe, and moves pages by reference where it can.
const SPLICE_FLAGS: u32 = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;

/// The zeroes `FileIo::WriteZeroes` writes from. Never written, so any number of writes may read
/// it at once; page-aligned so an `O_DIRECT` descriptor accepts it.
#[repr(C, align(4096))]
struct ZeroBuf([u8; ZERO_WRITE_BYTES as usize]);
static ZEROES: ZeroBuf = ZeroBuf([0; ZERO_WRITE_BYTES as usize]);

/// One step of splicing a write payload (see `Io::splice_payload`): socket, pipe ends, bytes to
/// take from the socket, file, offset and bytes to put into it.
pub(super) struct SpliceStep {
    pub sock: RawFd,
    pub pipe_r: RawFd,
    pub pipe_w: RawFd,
    pub take: u32,
    pub fd: RawFd,
    pub offset: u64,
    pub put: u32,
}

/// The ring and the buffers of one worker. Every submission goes through here.
pub(super) struct Io {
    ring: IoUring,
    pub pool: BufPool,
    /// Target I/Os submitted and not yet completed.
    file_ios_in_flight: u32,
    /// Moving average of the data bytes of the requests this worker received (spinning is for
    /// small ones; see `Worker::run`).
    avg_request_bytes: u64,
    /// Bytes read ahead and not yet asked for, by all of this worker's connections, and the most
    /// there may be (this worker's share of `EngineConfig::read_ahead_total_bytes`).
    pub ahead_bytes: u64,
    pub ahead_limit: u64,
    /// Buffer bytes this worker's connections hold (requests and read-ahead), and the most
    /// requests may hold (`worker_buffer_limit`).
    pub buffer_bytes: u64,
    pub buffer_limit: u64,
    /// Connections that stopped reading until the worker's buffer memory has room again.
    pub memory_waiters: Vec<u32>,
}

impl Io {
    /// # Safety
    /// Every pointer in `entry` must stay valid (and the memory unaliased by Rust writes, for
    /// buffers the kernel fills) until the completion with the entry's `user_data` is reaped.
    unsafe fn push(&mut self, entry: &squeue::Entry) {
        // SAFETY: the caller upholds the validity of `entry`'s pointers until completion.
        unsafe { self.push_chain(std::slice::from_ref(entry)) }
    }

    /// # Safety
    /// `ptr..ptr+len` must stay valid and untouched by Rust until the completion is reaped.
    pub unsafe fn recv(&mut self, ud: u64, fd: RawFd, ptr: *mut u8, len: u32) {
        let e = opcode::Recv::new(types::Fd(fd), ptr, len)
            .build()
            .user_data(ud);
        // SAFETY: forwarded from the caller.
        unsafe { self.push(&e) }
    }

    /// # Safety
    /// `ptr..ptr+len` must stay valid and unmodified until the completion is reaped.
    pub unsafe fn send(&mut self, ud: u64, fd: RawFd, ptr: *const u8, len: u32) {
        let e = opcode::Send::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud);
        // SAFETY: forwarded from the caller.
        unsafe { self.push(&e) }
    }

    /// # Safety
    /// `msg`, its iovec array and every buffer it points to must stay valid and unmodified until the
    /// completion is reaped.
    pub unsafe fn sendmsg(&mut self, ud: u64, fd: RawFd, msg: *const libc::msghdr) {
        let e = opcode::SendMsg::new(types::Fd(fd), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(ud);
        // SAFETY: forwarded from the caller.
        unsafe { self.push(&e) }
    }

    /// One step of moving a write payload from socket `sock` into file `fd` at `offset` through a
    /// pipe, as three hard-linked entries: wait until the socket is readable (`ud[0]`), move up to
    /// `take` bytes from it into the pipe (`ud[1]`), then write what the pipe holds, up to `put`
    /// bytes, into the file (`ud[2]`). Hard links, because a short move (the usual case: it takes
    /// what has arrived) would cancel a soft-linked write. Both moves are non-blocking on the pipe,
    /// and the move from the socket only starts once it is readable, so no io-wq worker ever waits
    /// on a slow client. The pipe must be empty (`put` then bounds what the move may bring).
    pub fn splice_payload(&mut self, ud: [u64; 3], step: &SpliceStep) {
        let sock = types::Fd(step.sock);
        let poll = opcode::PollAdd::new(sock, libc::POLLIN as u32)
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(ud[0]);
        let take = opcode::Splice::new(sock, -1, types::Fd(step.pipe_w), -1, step.take)
            .flags(SPLICE_FLAGS)
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(ud[1]);
        let put = Self::splice_out(step.pipe_r, step.fd, step.offset, step.put).user_data(ud[2]);
        self.file_ios_in_flight += 3;
        // SAFETY: these entries point at no memory; the caller keeps the descriptors open until
        // their completions.
        unsafe { self.push_chain(&[poll, take, put]) }
    }

    /// Queues entries all at once; when the submission queue is full, hands what is queued to
    /// the kernel and retries. Linked entries must go in together: the kernel ends a chain at the
    /// last entry of a submission, so a chain split by a full queue would run its later entries
    /// on their own (a write before the move it depends on, an fdatasync before the fallocate it
    /// makes durable).
    ///
    /// # Safety
    /// As `push`, for every entry.
    unsafe fn push_chain(&mut self, entries: &[squeue::Entry]) {
        debug_assert!(entries.len() <= RING_ENTRIES as usize);
        loop {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                tracing::warn!("io_uring submit while queue full: {e}");
            }
        }
    }

    /// Writes up to `len` bytes that the pipe holds into `fd` at `offset` (what is left in the
    /// pipe after a short write).
    pub fn splice_put(&mut self, ud: u64, pipe_r: RawFd, fd: RawFd, offset: u64, len: u32) {
        let e = Self::splice_out(pipe_r, fd, offset, len).user_data(ud);
        self.file_ios_in_flight += 1;
        // SAFETY: the entry points at no memory; the caller keeps the descriptors open.
        unsafe { self.push(&e) }
    }

    fn splice_out(pipe_r: RawFd, fd: RawFd, offset: u64, len: u32) -> squeue::Entry {
        // `offset` is below the export size, which fits an i64 (file sizes do).
        opcode::Splice::new(types::Fd(pipe_r), -1, types::Fd(fd), offset as i64, len)
            .flags(SPLICE_FLAGS)
            .build()
    }

    /// Counts a request of `bytes` data into the moving average that decides spinning.
    pub fn note_request(&mut self, bytes: u32) {
        self.avg_request_bytes = (self.avg_request_bytes * 7 + u64::from(bytes)) / 8;
    }

    /// Submits one target I/O. `buf` is the request buffer that `buf_start` positions refer to.
    ///
    /// # Safety
    /// For reads and writes, `buf + buf_start .. + len` must stay valid (and, for reads, untouched
    /// by Rust) until the completion is reaped. The descriptor must stay open until then.
    pub unsafe fn file_io(&mut self, ud: u64, io: &FileIo, buf: *mut u8) {
        // SAFETY: forwarded from the caller.
        let e = unsafe { self.file_entry(ud, io, buf, false) };
        // SAFETY: forwarded from the caller.
        unsafe { self.push(&e) }
    }

    /// Submits target I/Os that run one after the other, each only if the one before succeeded
    /// (`IO_LINK`), queued together (see `push_chain`). At most `MAX_PLAN_IOS`.
    ///
    /// # Safety
    /// As `file_io`, for every I/O.
    pub unsafe fn file_chain<'a>(
        &mut self,
        ios: impl Iterator<Item = (u64, &'a FileIo)>,
        buf: *mut u8,
    ) {
        // A fixed array (no allocation per request); the no-ops past `n` are never queued.
        let mut chain = [(); MAX_PLAN_IOS].map(|()| opcode::Nop::new().build());
        let mut n = 0;
        let mut ios = ios.peekable();
        while let Some((ud, io)) = ios.next() {
            assert!(n < MAX_PLAN_IOS, "a chain of more than {MAX_PLAN_IOS} I/Os");
            let link = ios.peek().is_some();
            // SAFETY: forwarded from the caller.
            chain[n] = unsafe { self.file_entry(ud, io, buf, link) };
            n += 1;
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.push_chain(&chain[..n]) }
    }

    /// The entry of one target I/O, counted in flight; `link` chains the next entry to it.
    ///
    /// # Safety
    /// As `file_io`: the entry points into `buf` for reads and writes.
    unsafe fn file_entry(
        &mut self,
        ud: u64,
        io: &FileIo,
        buf: *mut u8,
        link: bool,
    ) -> squeue::Entry {
        let e = match *io {
            FileIo::Read {
                fd,
                offset,
                buf_start,
                len,
            } => {
                // SAFETY: in bounds of the request buffer, by the caller's contract.
                let ptr = unsafe { buf.add(buf_start as usize) };
                opcode::Read::new(types::Fd(fd), ptr, len)
                    .offset(offset)
                    .build()
            }
            FileIo::Write {
                fd,
                offset,
                buf_start,
                len,
                dsync,
            } => {
                // SAFETY: in bounds of the request buffer, by the caller's contract.
                let ptr = unsafe { buf.add(buf_start as usize) };
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(types::Fd(fd), ptr, len)
                    .offset(offset)
                    .rw_flags(flags)
                    .build()
            }
            FileIo::WriteZeroes { fd, offset, len } => {
                let len = len.min(ZERO_WRITE_BYTES);
                // The kernel only reads the static zero buffer, which lives forever.
                opcode::Write::new(types::Fd(fd), ZEROES.0.as_ptr(), len)
                    .offset(offset)
                    .build()
            }
            FileIo::Fallocate {
                fd,
                offset,
                len,
                mode,
            } => opcode::Fallocate::new(types::Fd(fd), len)
                .offset(offset)
                .mode(mode)
                .build(),
            FileIo::Fdatasync { fd } => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            FileIo::Fadvise {
                fd,
                offset,
                len,
                advice,
            } => opcode::Fadvise::new(types::Fd(fd), len as libc::off_t, advice)
                .offset(offset)
                .build(),
            FileIo::Wait { fd } => opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build(),
            FileIo::Zero { .. } => unreachable!("the connection fills zeroes itself"),
        };
        let mut flags = squeue::Flags::empty();
        if link {
            flags |= squeue::Flags::IO_LINK;
        }
        // A large transfer would copy megabytes inline on this thread (page cache <-> buffer)
        // while the socket work waits. Punted to an io-wq worker, the copy runs on another core in
        // parallel with this thread's sends and receives.
        if matches!(*io, FileIo::Read { len, .. } | FileIo::Write { len, .. } if len >= ASYNC_MIN_BYTES)
        {
            flags |= squeue::Flags::ASYNC;
        }
        self.file_ios_in_flight += 1;
        e.flags(flags).user_data(ud)
    }
}

pub(super) struct Worker {
    id: usize,
    io: Io,
    cfg: EngineConfig,
    exports: Arc<Exports>,
    conns: Vec<Option<Box<Conn>>>,
    free_ids: Vec<u32>,
    inbox: Receiver<Incoming>,
    wake: Arc<EventFd>,
    /// The eventfd counter is read into here; boxed so its address is stable while the read is
    /// in flight.
    wake_buf: Box<u64>,
    tick: Box<types::Timespec>,
    open_conns: Arc<AtomicUsize>,
    shutdown: Arc<AtomicBool>,
    shutdown_deadline: Option<Instant>,
    next_serial: u64,
}

impl Worker {
    pub fn new(
        id: usize,
        cfg: EngineConfig,
        exports: Arc<Exports>,
        inbox: Receiver<Incoming>,
        wake: Arc<EventFd>,
        open_conns: Arc<AtomicUsize>,
        shutdown: Arc<AtomicBool>,
    ) -> io::Result<Worker> {
        // One thread submits to this ring, so the kernel may defer completion work to our own
        // io_uring_enter instead of interrupting us; fall back for older kernels.
        let ring = IoUring::builder()
            .setup_cqsize(RING_ENTRIES * 8)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(RING_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(RING_ENTRIES * 8)
                    .build(RING_ENTRIES)
            })?;
        check_opcodes(&ring)?;
        Ok(Worker {
            id,
            io: Io {
                ring,
                pool: BufPool::new(cfg.pool_cache_bytes),
                file_ios_in_flight: 0,
                avg_request_bytes: 0,
                ahead_bytes: 0,
                ahead_limit: cfg.read_ahead_total_bytes / cfg.threads.max(1) as u64,
                buffer_bytes: 0,
                buffer_limit: worker_buffer_limit(&cfg),
                memory_waiters: Vec::new(),
            },
            cfg,
            exports,
            conns: Vec::new(),
            free_ids: Vec::new(),
            inbox,
            wake,
            wake_buf: Box::new(0),
            tick: Box::new(types::Timespec::from(TICK)),
            open_conns,
            shutdown,
            shutdown_deadline: None,
            next_serial: 0,
        })
    }

    fn arm_wake(&mut self) {
        let ptr = (&mut *self.wake_buf as *mut u64).cast::<u8>();
        let e = opcode::Read::new(types::Fd(self.wake.as_fd().as_raw_fd()), ptr, 8)
            .build()
            .user_data(user_data(Tag::Wake, 0, 0, 0));
        // SAFETY: `wake_buf` is a box owned by the worker, which outlives the ring's completions;
        // the eventfd is held by `self.wake`.
        unsafe { self.io.push(&e) }
    }

    fn arm_tick(&mut self) {
        let e = opcode::Timeout::new(&*self.tick as *const types::Timespec)
            .build()
            .user_data(user_data(Tag::Tick, 0, 0, 0));
        // SAFETY: `tick` is a box owned by the worker and never changed.
        unsafe { self.io.push(&e) }
    }

    pub fn run(&mut self) -> io::Result<()> {
        self.arm_wake();
        self.arm_tick();
        let mut completions: Vec<(u64, i32)> = Vec::with_capacity(RING_ENTRIES as usize);
        let mut touched: Vec<u32> = Vec::new();
        let mut last_busy = Instant::now();
        // Moving averages of the time from the end of one round of completions to the next: one
        // for waits with file I/O in flight (a disk may answer in 100 us), one for waits on
        // sockets only (a busy client answers in a few microseconds).
        // `gap_file` starts at zero: until a file wait has been measured, nothing caps the
        // network spin (page-cache reads never wait).
        let mut gap_file = Duration::ZERO;
        let mut gap_net = Duration::from_secs(1);
        loop {
            let waiting_since = Instant::now();
            let on_file = self.io.file_ios_in_flight > 0;
            // A worker whose file waits outlast FILE_POLL_MAX (a disk, not the page cache) also
            // keeps its network spin that short: in direct mode at depth 1 a 200 us spin for the
            // client's next request gained nothing and cost 40% more CPU per read, while on
            // page-cache reads the same spin doubled the rate.
            let (gap, budget) = if on_file {
                (&mut gap_file, self.cfg.poll.min(FILE_POLL_MAX))
            } else if gap_file > FILE_POLL_MAX {
                (&mut gap_net, self.cfg.poll.min(FILE_POLL_MAX))
            } else {
                (&mut gap_net, self.cfg.poll)
            };
            // Spinning pays for small requests, whose latency a sleep and wake-up would double.
            // Requests of hundreds of KiB take longer to copy than a wake-up costs, and a spinning
            // thread takes the CPU from the io-wq workers and the client doing those copies: 1 MiB
            // writes over TCP used 12-25% more CPU per I/O with it, at the same throughput.
            if *gap < budget && self.io.avg_request_bytes < u64::from(ASYNC_MIN_BYTES) {
                self.spin_before_sleep(last_busy, budget)?;
            }
            // A spin that ended on completions already in the queue (often ones its own submit
            // produced inline, such as a page-cache read) needs no further enter; deferred task
            // work (the TASKRUN flag) and unsubmitted entries still do.
            let ready = !self.io.ring.completion().is_empty()
                && self.io.ring.submission().is_empty()
                && !self.io.ring.submission().taskrun();
            if !ready {
                match self.io.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if is_transient(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            let gap = if on_file { &mut gap_file } else { &mut gap_net };
            *gap = (*gap * 7 + waiting_since.elapsed()) / 8;
            completions.clear();
            completions.extend(
                self.io
                    .ring
                    .completion()
                    .map(|c| (c.user_data(), c.result())),
            );
            for &(ud, res) in &completions {
                self.complete(ud, res);
            }
            // Replies that became ready in this round go out now, one sendmsg per connection.
            touched.clear();
            touched.extend(completions.iter().filter_map(|&(ud, _)| {
                let (tag, cid, _, _) = decode(ud);
                matches!(tag, Some(Tag::Recv | Tag::Send | Tag::Io | Tag::Splice)).then_some(cid)
            }));
            touched.sort_unstable();
            touched.dedup();
            for &cid in &touched {
                if let Some(c) = self.conns.get_mut(cid as usize).and_then(Option::as_mut) {
                    c.flush(&mut self.io);
                }
                self.reap(cid);
            }
            self.wake_memory_waiters();
            if completions
                .iter()
                .any(|&(ud, _)| !matches!(decode(ud).0, Some(Tag::Tick)))
            {
                last_busy = Instant::now();
            }
            if self.shutdown_deadline.is_some() && self.conns.iter().all(Option::is_none) {
                tracing::debug!(worker = self.id, "worker drained");
                return Ok(());
            }
        }
    }

    /// Waking a sleeping vCPU costs tens of microseconds here, more than serving a 4 KiB request.
    /// While traffic is dense (something completed within the last millisecond, and completions
    /// have been arriving less than `budget` apart on average), spin for the next completion
    /// before sleeping in the kernel. The budget must cover a client's turn-around (its reply
    /// handled, its next request sent): fio at depth 1 over TCP took 50-100 us here, so a 50 us
    /// spin mostly ran out and slept anyway (8.9k reads/s), while 100-400 us reached 14-15k at
    /// the same CPU per read (the sleep and wake-up it saves cost as much as the spin). When the
    /// next event takes longer than the budget, the average gap grows and the worker sleeps
    /// instead of burning CPU. The spin watches the completion queue and the ring's TASKRUN flag
    /// (set when deferred completion work is waiting for us); an idle server never spins.
    fn spin_before_sleep(&mut self, last_busy: Instant, budget: Duration) -> io::Result<()> {
        if budget.is_zero() || !self.io.ring.completion().is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        if now.duration_since(last_busy) > Duration::from_millis(1) {
            return Ok(());
        }
        match self.io.ring.submit() {
            Ok(_) => {}
            Err(e) if is_transient(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
        while now.elapsed() < budget {
            if !self.io.ring.completion().is_empty() || self.io.ring.submission().taskrun() {
                break;
            }
            // Yield rather than burn: a client on this CPU (the usual benchmark) runs at once and
            // its request arrives sooner; with nothing else runnable this returns immediately.
            std::thread::yield_now();
        }
        Ok(())
    }

    fn complete(&mut self, ud: u64, res: i32) {
        let (tag, cid, slot, sub) = decode(ud);
        match tag {
            Some(Tag::Wake) => {
                self.accept_new();
                self.check_shutdown();
                self.arm_wake();
            }
            Some(Tag::Tick) => {
                self.on_tick();
                self.arm_tick();
            }
            Some(tag @ (Tag::Recv | Tag::Send | Tag::Io | Tag::Splice)) => {
                let Some(conn) = self.conns.get_mut(cid as usize).and_then(Option::as_mut) else {
                    tracing::error!(
                        worker = self.id,
                        cid,
                        ?tag,
                        "completion for a missing connection"
                    );
                    return;
                };
                match tag {
                    Tag::Recv => conn.on_recv(&mut self.io, &self.exports, res),
                    Tag::Send => conn.on_send(&mut self.io, &self.exports, res),
                    Tag::Splice => {
                        self.io.file_ios_in_flight -= 1;
                        conn.on_splice(&mut self.io, slot, sub, res)
                    }
                    _ => {
                        self.io.file_ios_in_flight -= 1;
                        conn.on_io(&mut self.io, slot, sub, res)
                    }
                }
                self.reap(cid);
            }
            None => tracing::error!(worker = self.id, ud, "completion with unknown tag"),
        }
    }

    /// Lets connections that wait for buffer memory read again once some is free, in the order
    /// they started waiting; each takes what its next request needs, and those it does not fit
    /// wait again (waiting for room for a largest request would starve small ones).
    fn wake_memory_waiters(&mut self) {
        let used = self.io.buffer_bytes.saturating_sub(self.io.ahead_bytes);
        if self.io.memory_waiters.is_empty() || used >= self.io.buffer_limit {
            return;
        }
        let waiters = std::mem::take(&mut self.io.memory_waiters);
        for cid in waiters {
            if let Some(c) = self.conns.get_mut(cid as usize).and_then(Option::as_mut) {
                c.resume_for_memory(&mut self.io, &self.exports);
            }
            self.reap(cid);
        }
    }

    /// Frees a connection once it is closing and the kernel holds none of its memory.
    fn reap(&mut self, cid: u32) {
        let done = self.conns[cid as usize]
            .as_ref()
            .is_some_and(|c| c.is_finished());
        if done {
            let conn = self.conns[cid as usize].take().expect("checked above");
            conn.finish(&mut self.io, &self.exports);
            self.free_ids.push(cid);
            self.open_conns.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn accept_new(&mut self) {
        while let Ok(incoming) = self.inbox.try_recv() {
            if self.shutdown_deadline.is_some() {
                self.open_conns.fetch_sub(1, Ordering::Relaxed);
                continue; // dropping the socket closes it
            }
            let cid = self.free_ids.pop().unwrap_or_else(|| {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            });
            self.next_serial += 1;
            let serial = (self.id as u64) << 48 | self.next_serial;
            let mut conn = Box::new(Conn::new(cid, serial, incoming, &self.cfg));
            conn.begin(&mut self.io);
            self.conns[cid as usize] = Some(conn);
            self.reap(cid);
        }
    }

    fn check_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() || !self.shutdown.load(Ordering::Acquire) {
            return;
        }
        self.shutdown_deadline = Some(Instant::now() + self.cfg.shutdown_grace);
        for cid in 0..self.conns.len() {
            if let Some(c) = self.conns[cid].as_mut() {
                c.drain_for_shutdown();
            }
            self.reap(cid as u32);
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let force = self.shutdown_deadline.is_some_and(|d| now >= d);
        for cid in 0..self.conns.len() {
            if let Some(c) = self.conns[cid].as_mut() {
                if force {
                    c.close("server shutdown grace period expired".into());
                } else {
                    c.check_deadline(now);
                }
            }
            self.reap(cid as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_has_every_opcode_the_engine_submits() {
        let ring = IoUring::new(8).unwrap();
        check_opcodes(&ring).unwrap();
    }

    /// A new operation submitted without being added to `NEEDED_OPCODES` would go unprobed.
    #[test]
    fn every_opcode_submitted_is_probed() {
        let src = include_str!("worker.rs");
        let listed: Vec<&str> = NEEDED_OPCODES.iter().map(|(_, n)| *n).collect();
        for used in src.split("opcode::").skip(1) {
            let name: String = used
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            if name.is_empty() || name == "CODE" {
                continue;
            }
            assert!(
                listed.contains(&name.as_str()),
                "opcode::{name} is not probed"
            );
        }
    }
}
