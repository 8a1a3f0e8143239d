//! One worker thread: a ring, its connections, and the loop that turns completions into work.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use nix::sys::eventfd::EventFd;

use super::conn::{Conn, Io};
use super::peer::PeerChan;
use super::ring::{ASYNC_MIN_BYTES, MAX_CONN_ID, RING_ENTRIES, Ring, Tag, UserData, is_transient};
use super::{EngineConfig, Inbox};
use crate::target::Exports;

const TICK: Duration = Duration::from_secs(1);
/// Longest spin while file I/O is in flight, whatever `EngineConfig::poll` allows. Measured in
/// direct mode at depth 1 (a disk read of ~200 us): spinning 200 us instead of 50 doubled the
/// CPU per read and gained nothing; the disk's completion is not a wake-up the spin saves.
const FILE_POLL_MAX: Duration = Duration::from_micros(50);

pub(super) struct Worker {
    id: usize,
    io: Io<Ring>,
    cfg: EngineConfig,
    exports: Arc<Exports>,
    conns: Vec<Option<Box<Conn>>>,
    free_ids: Vec<u32>,
    inbox: Receiver<Inbox>,
    wake: Arc<EventFd>,
    open_conns: Arc<AtomicUsize>,
    shutdown: Arc<AtomicBool>,
    shutdown_deadline: Option<Instant>,
    next_serial: u64,
    /// Dead peer links the kernel still holds buffers of (dropped once idle).
    retired_links: Vec<PeerChan>,
    next_link_id: u32,
    /// Request I/Os the peer link completed, waiting to be delivered.
    peer_done: Vec<(UserData, i32)>,
}

impl Worker {
    pub fn new(
        id: usize,
        cfg: EngineConfig,
        exports: Arc<Exports>,
        inbox: Receiver<Inbox>,
        wake: Arc<EventFd>,
        open_conns: Arc<AtomicUsize>,
        shutdown: Arc<AtomicBool>,
    ) -> io::Result<Worker> {
        let ring = Ring::new(TICK)?;
        Ok(Worker {
            id,
            io: Io::new(ring, &cfg),
            cfg,
            exports,
            conns: Vec::new(),
            free_ids: Vec::new(),
            inbox,
            wake,
            open_conns,
            shutdown,
            shutdown_deadline: None,
            next_serial: 0,
            retired_links: Vec::new(),
            next_link_id: 0,
            peer_done: Vec::new(),
        })
    }

    fn arm_wake(&mut self) {
        let fd = self.wake.as_fd().as_raw_fd();
        self.io.ring.arm_wake(UserData::new(Tag::Wake, 0, 0, 0), fd);
    }

    fn arm_tick(&mut self) {
        self.io.ring.arm_tick(UserData::new(Tag::Tick, 0, 0, 0));
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
            let on_file = self.io.ring.file_ios_in_flight() > 0;
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
            let ready = self.io.ring.has_completions() && self.io.ring.settled();
            if !ready {
                match self.io.ring.submit_and_wait() {
                    Ok(_) => {}
                    Err(e) if is_transient(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            let gap = if on_file { &mut gap_file } else { &mut gap_net };
            *gap = (*gap * 7 + waiting_since.elapsed()) / 8;
            completions.clear();
            self.io.ring.reap(&mut completions);
            touched.clear();
            for &(ud, res) in &completions {
                self.complete(ud, res);
            }
            // Request I/Os the peer link completed (its replies, or its failure).
            touched.extend(self.peer_done.iter().map(|(ud, _)| ud.conn));
            self.deliver_peer_done();
            // Frames queued in this round go out in one sendmsg.
            for p in self.io.peers.iter_mut().flatten() {
                p.flush(&mut self.io.ring);
            }
            // Replies that became ready in this round go out now, one sendmsg per connection.
            touched.extend(completions.iter().filter_map(|&(ud, _)| {
                let ud = UserData::decode(ud)?;
                matches!(ud.tag, Tag::Recv | Tag::Send | Tag::Io | Tag::Splice).then_some(ud.conn)
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
            // Requests the memory waiters started may have queued frames too.
            for p in self.io.peers.iter_mut().flatten() {
                p.flush(&mut self.io.ring);
            }
            if completions.iter().any(|&(ud, _)| {
                !matches!(UserData::decode(ud), Some(UserData { tag: Tag::Tick, .. }))
            }) {
                last_busy = Instant::now();
            }
            if self.shutdown_deadline.is_some() && self.conns.iter().all(Option::is_none) {
                // The kernel must give back the peer links' buffers before the worker goes.
                for slot in &mut self.io.peers {
                    if let Some(mut p) = slot.take() {
                        p.kill("the server is stopping".into(), &mut self.peer_done);
                        self.retired_links.push(p);
                    }
                }
                self.retired_links.retain(|p| !p.is_idle());
                if !self.retired_links.is_empty() {
                    continue;
                }
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
        if budget.is_zero() || self.io.ring.has_completions() {
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
            if self.io.ring.has_completions() || self.io.ring.taskrun() {
                break;
            }
            // Yield rather than burn: a client on this CPU (the usual benchmark) runs at once and
            // its request arrives sooner; with nothing else runnable this returns immediately.
            std::thread::yield_now();
        }
        Ok(())
    }

    fn complete(&mut self, raw: u64, res: i32) {
        let Some(ud) = UserData::decode(raw) else {
            tracing::error!(worker = self.id, ud = raw, "completion with unknown tag");
            return;
        };
        match ud.tag {
            Tag::Wake => {
                self.accept_new();
                self.check_shutdown();
                self.arm_wake();
            }
            Tag::Tick => {
                self.on_tick();
                self.arm_tick();
            }
            Tag::PeerRecv | Tag::PeerSend => {
                let chan = match self
                    .io
                    .peers
                    .iter_mut()
                    .flatten()
                    .chain(self.retired_links.iter_mut())
                    .find(|p| p.id == ud.conn)
                {
                    Some(p) => p,
                    None => {
                        tracing::error!(worker = self.id, ?ud, "completion for a missing link");
                        return;
                    }
                };
                chan.complete(&mut self.io.ring, ud.tag, res, &mut self.peer_done);
                self.retire_dead_links();
                self.retired_links.retain(|p| !p.is_idle());
            }
            Tag::Recv | Tag::Send | Tag::Io | Tag::Splice => {
                if matches!(ud.tag, Tag::Io | Tag::Splice) {
                    self.io.ring.file_io_done();
                }
                let Some(conn) = self
                    .conns
                    .get_mut(ud.conn as usize)
                    .and_then(Option::as_mut)
                else {
                    tracing::error!(worker = self.id, ?ud, "completion for a missing connection");
                    return;
                };
                conn.complete(&mut self.io, &self.exports, ud, res);
                self.reap(ud.conn);
            }
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

    /// Hands the peer link's completed request I/Os to their connections.
    fn deliver_peer_done(&mut self) {
        while !self.peer_done.is_empty() {
            let done = std::mem::take(&mut self.peer_done);
            for (ud, res) in done {
                let Some(conn) = self
                    .conns
                    .get_mut(ud.conn as usize)
                    .and_then(Option::as_mut)
                else {
                    tracing::error!(worker = self.id, ?ud, "peer reply for a missing connection");
                    continue;
                };
                conn.complete(&mut self.io, &self.exports, ud, res);
                self.reap(ud.conn);
            }
        }
    }

    /// A new data link to the peer: it replaces the one the worker had (which is killed; its
    /// frames fail and its buffers come back before it is dropped).
    fn attach_peer(&mut self, link: super::PeerSocket) {
        let slot = usize::from(link.forward);
        if let Some(mut old) = self.io.peers[slot].take() {
            old.kill("replaced by a new link".into(), &mut self.peer_done);
            self.retired_links.push(old);
        }
        self.retired_links.retain(|p| !p.is_idle());
        self.next_link_id = (self.next_link_id + 1) & MAX_CONN_ID;
        let mut chan = PeerChan::new(self.next_link_id, link);
        chan.begin(&mut self.io.ring);
        self.io.peers[slot] = Some(chan);
        self.deliver_peer_done();
    }

    /// Dead links wait among the retired ones until the kernel gave their buffers back.
    fn retire_dead_links(&mut self) {
        for slot in &mut self.io.peers {
            if slot.as_ref().is_some_and(PeerChan::is_dead) {
                self.retired_links.push(slot.take().expect("checked"));
            }
        }
    }

    fn accept_new(&mut self) {
        while let Ok(msg) = self.inbox.try_recv() {
            let incoming = match msg {
                Inbox::Conn(c) => c,
                Inbox::Peer(link) => {
                    if self.shutdown_deadline.is_none() {
                        self.attach_peer(link);
                    }
                    continue;
                }
            };
            if self.shutdown_deadline.is_some() {
                self.open_conns.fetch_sub(1, Ordering::Relaxed);
                continue; // dropping the socket closes it
            }
            let cid = match self.free_ids.pop() {
                Some(cid) => cid,
                None if self.conns.len() as u32 <= MAX_CONN_ID => {
                    self.conns.push(None);
                    (self.conns.len() - 1) as u32
                }
                None => {
                    tracing::warn!(worker = self.id, peer = %incoming.peer, "too many connections");
                    self.open_conns.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
            };
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
        for p in self.io.peers.iter_mut().flatten() {
            p.check_timeout(now, &mut self.peer_done);
        }
        self.retire_dead_links();
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
