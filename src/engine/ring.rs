//! The one door to the kernel: a worker's io_uring, what each completion belongs to (the
//! `user_data` codec), and every `unsafe` that hands memory to the kernel.
//!
//! Everything above this file (the event loop in `worker.rs`, the connections in `conn/`, later
//! the peer link) submits through [`Submit`] and learns of completions as decoded [`UserData`].
//! A submission that carries a pointer is an `unsafe fn` whose contract is always the same: the
//! memory stays valid, and is not touched by Rust where the kernel writes it, until the completion
//! with that `user_data` has been reaped. The callers keep that promise by their own bookkeeping
//! (a connection counts its operations in `kernel_ops` and is freed only at zero).
//!
//! Back-pressure: the submission queue is never retried in a loop. An entry (or a linked chain)
//! that does not fit after one submit waits in `backlog`, in order, and goes in at the start of
//! the next round; everything in the backlog belongs to an operation its owner already counts in
//! flight, so its length is bounded by what connections may have in flight.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, Probe, opcode, squeue, types};

use crate::target::{FileIo, ZERO_WRITE_BYTES};

/// What a completion belongs to, packed into the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tag {
    /// The worker's eventfd: new connections or shutdown.
    Wake = 1,
    /// The worker's once-a-second timer.
    Tick = 2,
    Recv = 3,
    Send = 4,
    /// A target I/O of a request's plan.
    Io = 5,
    /// A step of a write payload spliced from the socket into the file (see `conn/splice.rs`).
    Splice = 6,
    /// The worker's peer link (`peer.rs`): a receive of replies, a send of frames.
    PeerRecv = 7,
    PeerSend = 8,
}

/// A completion's owner: tag, connection id (24 bits), slot and sub-operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct UserData {
    pub tag: Tag,
    pub conn: u32,
    pub slot: u16,
    pub sub: u16,
}

/// Most connections a worker may hold: the connection id has 24 bits of `user_data`.
pub(super) const MAX_CONN_ID: u32 = (1 << 24) - 1;

impl UserData {
    pub fn new(tag: Tag, conn: u32, slot: u16, sub: u16) -> UserData {
        UserData {
            tag,
            conn,
            slot,
            sub,
        }
    }

    #[inline]
    pub fn encode(self) -> u64 {
        assert!(
            self.conn <= MAX_CONN_ID,
            "connection id {} too large",
            self.conn
        );
        (self.tag as u64) << 56
            | u64::from(self.conn) << 32
            | u64::from(self.slot) << 16
            | u64::from(self.sub)
    }

    /// `None` for a value no submission made (a kernel or memory bug: logged by the caller).
    pub fn decode(ud: u64) -> Option<UserData> {
        let tag = match ud >> 56 {
            1 => Tag::Wake,
            2 => Tag::Tick,
            3 => Tag::Recv,
            4 => Tag::Send,
            5 => Tag::Io,
            6 => Tag::Splice,
            7 => Tag::PeerRecv,
            8 => Tag::PeerSend,
            _ => return None,
        };
        Some(UserData {
            tag,
            conn: (ud >> 32) as u32 & MAX_CONN_ID,
            slot: (ud >> 16) as u16,
            sub: ud as u16,
        })
    }
}

/// One step of splicing a write payload (see [`Submit::splice_payload`]): socket, pipe ends,
/// bytes to take from the socket, file, offset and bytes to put into it.
pub(super) struct SpliceStep {
    pub sock: RawFd,
    pub pipe_r: RawFd,
    pub pipe_w: RawFd,
    pub take: u32,
    pub fd: RawFd,
    pub offset: u64,
    pub put: u32,
}

/// The submissions a connection makes. [`Ring`] is the kernel's; the connection tests drive the
/// same state machine through a recording ring of their own.
pub(super) trait Submit {
    /// Receives up to `len` bytes from socket `fd` into `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid and untouched by Rust until the completion is reaped.
    unsafe fn recv(&mut self, ud: UserData, fd: RawFd, ptr: *mut u8, len: u32);

    /// Sends `len` bytes at `ptr` on socket `fd`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid and unmodified until the completion is reaped.
    unsafe fn send(&mut self, ud: UserData, fd: RawFd, ptr: *const u8, len: u32);

    /// Sends what `msg`'s iovecs point at on socket `fd`.
    ///
    /// # Safety
    /// `msg`, its iovec array and every buffer it points to must stay valid and unmodified until
    /// the completion is reaped.
    unsafe fn sendmsg(&mut self, ud: UserData, fd: RawFd, msg: *const libc::msghdr);

    /// Submits target I/Os; `buf` is the request buffer their `buf_start` positions refer to.
    /// Each I/O whose `link` is set is linked to the next one (`IO_LINK`: it starts only after
    /// that one succeeded; a failure cancels the rest of the run), and a linked run is queued
    /// whole, so a full queue never splits it (the kernel ends a chain at the last entry of a
    /// submission: a write would run before the fallocate it depends on). The last I/O's
    /// `link` is ignored. `FileIo::Zero` is never submitted (the connection fills those).
    ///
    /// # Safety
    /// For reads and writes, `buf + buf_start .. + len` must stay valid (and, for reads,
    /// untouched by Rust) until each completion is reaped. Descriptors must stay open until then.
    unsafe fn file_ios<'a>(
        &mut self,
        ios: impl Iterator<Item = (UserData, &'a FileIo, bool)>,
        buf: *mut u8,
    );

    /// One step of moving a write payload from socket `sock` into file `fd` at `offset` through a
    /// pipe, as three hard-linked entries: wait until the socket is readable (`ud[0]`), move up
    /// to `take` bytes from it into the pipe (`ud[1]`), then write what the pipe holds, up to
    /// `put` bytes, into the file (`ud[2]`). Hard links, because a short move (the usual case: it
    /// takes what has arrived) would cancel a soft-linked write. Both moves are non-blocking on
    /// the pipe, and the move from the socket only starts once it is readable, so no io-wq worker
    /// ever waits on a slow client. The pipe must be empty (`put` then bounds what the move may
    /// bring). The entries point at no memory; the caller keeps the descriptors open.
    fn splice_payload(&mut self, ud: [UserData; 3], step: &SpliceStep);

    /// Writes up to `len` bytes that the pipe holds into `fd` at `offset` (what is left in the
    /// pipe after a short write).
    fn splice_put(&mut self, ud: UserData, pipe_r: RawFd, fd: RawFd, offset: u64, len: u32);
}

/// Entries in the submission queue; the completion queue holds eight times as many.
pub(super) const RING_ENTRIES: u32 = 1024;

/// Transfers at least this large are handed to io-wq workers (see `Ring::file_entry`).
pub(super) const ASYNC_MIN_BYTES: u32 = 256 * 1024;

/// Every splice: never waits on the pipe, and moves pages by reference where it can.
const SPLICE_FLAGS: u32 = libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE;

/// The zeroes `FileIo::WriteZeroes` writes from. Never written, so any number of writes may read
/// it at once; page-aligned so an `O_DIRECT` descriptor accepts it.
#[repr(C, align(4096))]
struct ZeroBuf([u8; ZERO_WRITE_BYTES as usize]);
static ZEROES: ZeroBuf = ZeroBuf([0; ZERO_WRITE_BYTES as usize]);

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

/// Errors of `io_uring_enter` that lose nothing: interrupted by a signal (`EINTR`), or
/// completions must be reaped before more can be submitted (`EBUSY`). The loop goes on.
pub(super) fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY))
}

/// A worker's io_uring.
pub(super) struct Ring {
    // Closing the ring does not wait for operations in flight (the kernel cancels them later),
    // so nothing they point at may be freed while any is outstanding: connections are freed
    // only at zero `kernel_ops`, and a worker that fails is leaked whole (`Engine::start`).
    ring: IoUring,
    /// Entries (whole linked chains) that found the submission queue full, oldest first.
    backlog: VecDeque<Vec<squeue::Entry>>,
    /// Target I/Os (file and splice) submitted and not yet completed.
    file_ios_in_flight: u32,
    /// A linked run of entries being gathered by `file_ios` (kept to reuse its memory).
    run: Vec<squeue::Entry>,
    /// The eventfd counter is read into here, the timer's period read from here; boxed so their
    /// addresses are stable while the kernel holds them.
    wake_buf: Box<u64>,
    tick: Box<types::Timespec>,
    /// Tests: `push_chain` does not submit to make room, so a full queue goes to the backlog.
    #[cfg(test)]
    hold_submissions: bool,
}

impl Ring {
    pub fn new(tick: std::time::Duration) -> io::Result<Ring> {
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
        Ok(Ring {
            ring,
            backlog: VecDeque::new(),
            file_ios_in_flight: 0,
            run: Vec::with_capacity(crate::target::MAX_PLAN_IOS),
            wake_buf: Box::new(0),
            tick: Box::new(types::Timespec::from(tick)),
            #[cfg(test)]
            hold_submissions: false,
        })
    }

    /// Target I/Os in flight (the loop spins less while a disk may be answering).
    pub fn file_ios_in_flight(&self) -> u32 {
        self.file_ios_in_flight
    }

    /// Counts the completion of a target I/O (tags `Io` and `Splice`).
    pub fn file_io_done(&mut self) {
        assert!(
            self.file_ios_in_flight > 0,
            "a file I/O completed that was not counted in flight"
        );
        self.file_ios_in_flight -= 1;
    }

    /// Reads the eventfd `fd` (its counter lands in the ring's own buffer).
    pub fn arm_wake(&mut self, ud: UserData, fd: RawFd) {
        let ptr = (&mut *self.wake_buf as *mut u64).cast::<u8>();
        let e = opcode::Read::new(types::Fd(fd), ptr, 8).build();
        // SAFETY: `wake_buf` is a box owned by the ring, dropped after it, and never read by
        // Rust; the caller keeps the eventfd open for the ring's life.
        unsafe { self.push(e, ud) }
    }

    /// A timeout of the period given at `new`.
    pub fn arm_tick(&mut self, ud: UserData) {
        let e = opcode::Timeout::new(&*self.tick as *const types::Timespec).build();
        // SAFETY: `tick` is a box owned by the ring, dropped after it, and never changed.
        unsafe { self.push(e, ud) }
    }

    /// Queues what waited in the backlog, as far as the submission queue has room.
    fn drain_backlog(&mut self) {
        while let Some(chain) = self.backlog.front() {
            // SAFETY: the entries were accepted by `push_chain` under its caller's contract,
            // which holds until their completions.
            if unsafe { self.ring.submission().push_multiple(chain) }.is_err() {
                return;
            }
            self.backlog.pop_front();
        }
    }

    /// Submits what is queued, without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        self.drain_backlog();
        self.ring.submit().map(drop)
    }

    /// Submits what is queued and waits for at least one completion.
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        self.drain_backlog();
        self.ring.submit_and_wait(1).map(drop)
    }

    /// Completions are waiting to be reaped.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Nothing needs an `io_uring_enter` before the waiting completions are reaped: no entries
    /// queued or backlogged, and no deferred completion work (the TASKRUN flag).
    pub fn settled(&mut self) -> bool {
        self.backlog.is_empty()
            && self.ring.submission().is_empty()
            && !self.ring.submission().taskrun()
    }

    /// Deferred completion work is waiting for this thread to enter the kernel.
    pub fn taskrun(&mut self) -> bool {
        self.ring.submission().taskrun()
    }

    /// Appends every waiting completion as `(user_data, result)`.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }

    /// # Safety
    /// Every pointer in `entry` must stay valid (and the memory unaliased by Rust writes, for
    /// buffers the kernel fills) until the completion with `ud` is reaped.
    unsafe fn push(&mut self, entry: squeue::Entry, ud: UserData) {
        // SAFETY: forwarded from the caller.
        unsafe { self.push_chain(&[entry.user_data(ud.encode())]) }
    }

    /// Queues entries all at once. Linked entries must go in together (see
    /// `Submit::file_ios`). When the submission queue is full, what is queued is submitted once;
    /// if that does not make room, the entries wait in the backlog (in order) for the next round.
    ///
    /// # Safety
    /// As `push`, for every entry.
    unsafe fn push_chain(&mut self, entries: &[squeue::Entry]) {
        assert!(
            entries.len() <= RING_ENTRIES as usize,
            "a chain longer than the queue"
        );
        if self.backlog.is_empty() {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                return;
            }
            #[cfg(test)]
            let hold = self.hold_submissions;
            #[cfg(not(test))]
            let hold = false;
            if !hold
                && let Err(e) = self.ring.submit()
                && !is_transient(&e)
            {
                tracing::warn!("io_uring submit while queue full: {e}");
            }
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(entries.to_vec());
    }

    /// The entry of one target I/O, counted in flight; `link` chains the next entry to it.
    ///
    /// # Safety
    /// As `Submit::file_ios`: the entry points into `buf` for reads and writes.
    #[inline]
    unsafe fn file_entry(
        &mut self,
        ud: UserData,
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
            FileIo::Peer(_) => unreachable!("peer I/O goes to the peer link"),
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
        e.flags(flags).user_data(ud.encode())
    }

    fn splice_out(pipe_r: RawFd, fd: RawFd, offset: u64, len: u32) -> squeue::Entry {
        // `offset` is below the export size, which fits an i64 (file sizes do).
        opcode::Splice::new(types::Fd(pipe_r), -1, types::Fd(fd), offset as i64, len)
            .flags(SPLICE_FLAGS)
            .build()
    }
}

impl Submit for Ring {
    unsafe fn recv(&mut self, ud: UserData, fd: RawFd, ptr: *mut u8, len: u32) {
        let e = opcode::Recv::new(types::Fd(fd), ptr, len).build();
        // SAFETY: forwarded from the caller.
        unsafe { self.push(e, ud) }
    }

    unsafe fn send(&mut self, ud: UserData, fd: RawFd, ptr: *const u8, len: u32) {
        let e = opcode::Send::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        // SAFETY: forwarded from the caller.
        unsafe { self.push(e, ud) }
    }

    unsafe fn sendmsg(&mut self, ud: UserData, fd: RawFd, msg: *const libc::msghdr) {
        let e = opcode::SendMsg::new(types::Fd(fd), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        // SAFETY: forwarded from the caller.
        unsafe { self.push(e, ud) }
    }

    unsafe fn file_ios<'a>(
        &mut self,
        ios: impl Iterator<Item = (UserData, &'a FileIo, bool)>,
        buf: *mut u8,
    ) {
        let mut ios = ios.peekable();
        while let Some((ud, io, link)) = ios.next() {
            let link = link && ios.peek().is_some();
            // SAFETY: forwarded from the caller.
            let e = unsafe { self.file_entry(ud, io, buf, link) };
            if !link && self.run.is_empty() {
                // The usual case, one I/O on its own: queued without gathering.
                // SAFETY: forwarded from the caller.
                unsafe { self.push_chain(std::slice::from_ref(&e)) };
                continue;
            }
            self.run.push(e);
            if !link {
                // A linked run is queued whole (see `push_chain`).
                let run = std::mem::take(&mut self.run);
                // SAFETY: forwarded from the caller.
                unsafe { self.push_chain(&run) };
                self.run = run;
                self.run.clear();
            }
        }
        debug_assert!(self.run.is_empty(), "the last I/O ends its run");
    }

    fn splice_payload(&mut self, ud: [UserData; 3], step: &SpliceStep) {
        let sock = types::Fd(step.sock);
        let poll = opcode::PollAdd::new(sock, libc::POLLIN as u32)
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(ud[0].encode());
        let take = opcode::Splice::new(sock, -1, types::Fd(step.pipe_w), -1, step.take)
            .flags(SPLICE_FLAGS)
            .build()
            .flags(squeue::Flags::IO_HARDLINK)
            .user_data(ud[1].encode());
        let put =
            Self::splice_out(step.pipe_r, step.fd, step.offset, step.put).user_data(ud[2].encode());
        self.file_ios_in_flight += 3;
        // SAFETY: these entries point at no memory; the caller keeps the descriptors open until
        // their completions.
        unsafe { self.push_chain(&[poll, take, put]) }
    }

    fn splice_put(&mut self, ud: UserData, pipe_r: RawFd, fd: RawFd, offset: u64, len: u32) {
        let e = Self::splice_out(pipe_r, fd, offset, len);
        self.file_ios_in_flight += 1;
        // SAFETY: the entry points at no memory; the caller keeps the descriptors open.
        unsafe { self.push(e, ud) }
    }
}

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

/// Sets the socket's SO_RCVLOWAT: readiness (poll) then needs this many bytes queued. Failure only
/// costs more splice steps (nix has no wrapper for this option).
pub(super) fn set_rcvlowat(fd: RawFd, bytes: u32) {
    let val = bytes.min(i32::MAX as u32) as libc::c_int;
    // SAFETY: `val` is a live c_int and the length passed is its size; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!("SO_RCVLOWAT {bytes}: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
pub(super) mod fake;

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
        let src = include_str!("ring.rs");
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

    #[test]
    fn user_data_round_trips_and_rejects_unknown_tags() {
        for tag in [
            Tag::Wake,
            Tag::Tick,
            Tag::Recv,
            Tag::Send,
            Tag::Io,
            Tag::Splice,
            Tag::PeerRecv,
            Tag::PeerSend,
        ] {
            for (conn, slot, sub) in [(0, 0, 0), (MAX_CONN_ID, u16::MAX, u16::MAX), (77, 3, 9)] {
                let ud = UserData::new(tag, conn, slot, sub);
                assert_eq!(UserData::decode(ud.encode()), Some(ud));
            }
        }
        assert_eq!(UserData::decode(0), None);
        assert_eq!(UserData::decode(9 << 56), None);
        assert_eq!(UserData::decode(u64::MAX), None);
    }

    /// A full submission queue hands entries to the backlog instead of spinning (here the queue
    /// is kept full on purpose), a linked chain that does not fit waits whole, and everything
    /// runs, in order, once the loop submits again.
    #[test]
    fn a_full_submission_queue_backlogs_whole_chains_in_order() {
        let mut ring = Ring::new(std::time::Duration::from_secs(1)).unwrap();
        ring.hold_submissions = true;
        let ud = |i: usize| UserData::new(Tag::Io, 1, 0, i as u16);
        let mut sub = 0;
        for _ in 0..RING_ENTRIES - 1 {
            // SAFETY: a no-op points at no memory.
            unsafe { ring.push(opcode::Nop::new().build(), ud(sub)) };
            sub += 1;
        }
        assert!(ring.backlog.is_empty());
        // Three linked no-ops with one free entry: the chain must not be split.
        let chain: Vec<squeue::Entry> = (0..3)
            .map(|k| {
                let e = opcode::Nop::new().build().user_data(ud(sub + k).encode());
                if k < 2 {
                    e.flags(squeue::Flags::IO_LINK)
                } else {
                    e
                }
            })
            .collect();
        // SAFETY: as above.
        unsafe { ring.push_chain(&chain) };
        sub += 3;
        assert_eq!(ring.backlog.len(), 1, "the chain waits whole");
        // A single entry after it waits behind it, though one entry would fit.
        // SAFETY: as above.
        unsafe { ring.push(opcode::Nop::new().build(), ud(sub)) };
        sub += 1;
        assert_eq!(ring.backlog.len(), 2);
        ring.hold_submissions = false;
        let mut done = Vec::new();
        while done.len() < sub {
            ring.submit_and_wait().unwrap();
            ring.reap(&mut done);
        }
        let subs: Vec<u16> = done
            .iter()
            .map(|&(ud, _)| UserData::decode(ud).unwrap().sub)
            .collect();
        // Every entry ran once; the ones queued before the backlog in order, and the chain's in
        // its order (an entry queued beside a chain may overtake the chain's later links).
        let mut sorted = subs.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..sub as u16).collect::<Vec<_>>());
        let first = RING_ENTRIES as usize - 1;
        assert_eq!(subs[..first], (0..first as u16).collect::<Vec<_>>()[..]);
        let at = |s: usize| subs.iter().position(|&x| x as usize == s).unwrap();
        assert!(at(first) < at(first + 1) && at(first + 1) < at(first + 2));
        assert!(
            done.iter().all(|&(_, res)| res == 0),
            "a chain entry was cancelled"
        );
        assert!(ring.backlog.is_empty());
    }
}
