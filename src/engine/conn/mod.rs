//! One NBD connection on a worker's ring: receiving, negotiating, running requests on the target,
//! and sending replies. The state machine is split by concern, each file readable alone:
//!
//! - `mod.rs` (here): the connection's state, its life (accept, deadlines, drain, close, finish),
//!   slots and their buffer accounting, and [`Conn::complete`], where every completion enters;
//! - `slot.rs`: one request in flight and how its I/O results are accounted;
//! - `recv.rs`: receiving bytes and the negotiation phase;
//! - `dispatch.rs`: parsing requests and starting each on a slot, within the limits;
//! - `run.rs`: carrying out a target's plan, phase by phase;
//! - `ahead.rs`: read-ahead for sequential readers;
//! - `splice.rs`: large write payloads moved from the socket into the file without a copy;
//! - `send.rs`: replies (every request is answered there, exactly once) and sending them.
//!
//! Ownership rule: memory handed to the kernel (the receive buffer, a request's data buffer, reply
//! headers, the send iovecs) belongs to the kernel until that operation's completion arrives.
//! `kernel_ops` counts those operations; a connection is freed only when it is closing and the count
//! is zero, so nothing the kernel may still touch is ever freed or reused.
//!
//! Every request is answered exactly once, from `reply_*` through `enqueue`: parse errors, target
//! errors and successes all end there.
//!
//! The connection submits through [`Submit`]: the worker's [`Ring`](super::ring::Ring) in
//! production, a recording ring in `tests.rs`, which drives this state machine without a kernel.

mod ahead;
mod dispatch;
mod recv;
mod run;
mod send;
mod slot;
mod splice;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use super::bufpool::BufPool;
use super::peer::PeerChan;
use super::ring::{Submit, Tag, UserData};
use super::{EngineConfig, Incoming, Transport};
use crate::nbd::ReplyMode;
use crate::nbd::handshake::Handshake;
use crate::nbd::request::Session;
use crate::target::{BlockTarget, Client, Exports};
pub(super) use send::empty_msghdr;
use slot::{HEADER_KEEP_BYTES, Slot, SlotState};
use splice::SplicePipe;

/// What a worker lends its connections: its ring, its buffers, and the memory budgets they share.
pub(super) struct Io<R> {
    pub ring: R,
    pub pool: BufPool,
    /// Moving average of the data bytes of the requests this worker received (spinning is for
    /// small ones; see `Worker::run`).
    pub avg_request_bytes: u64,
    /// Bytes read ahead and not yet asked for, by all of this worker's connections, and the most
    /// there may be (this worker's share of `EngineConfig::read_ahead_total_bytes`).
    pub ahead_bytes: u64,
    pub ahead_limit: u64,
    /// Buffer bytes this worker's connections hold (requests and read-ahead), and the most
    /// requests may hold (`Io::buffer_limit_for`).
    pub buffer_bytes: u64,
    pub buffer_limit: u64,
    /// Connections that stopped reading until the worker's buffer memory has room again.
    pub memory_waiters: Vec<u32>,
    /// The worker's links to the pair's other node, when it has them: `[0]` carries the
    /// mirrored operations of the volumes this node owns, `[1]` the operations forwarded to
    /// the owner of the volumes it does not (`PeerIo::forwarded`). Two links, so that a
    /// forwarded operation waiting on the owner never delays (or times out) a mirrored one.
    pub peers: [Option<PeerChan>; 2],
}

impl<R> Io<R> {
    pub fn new(ring: R, cfg: &EngineConfig) -> Io<R> {
        let threads = cfg.threads.max(1) as u64;
        Io {
            ring,
            pool: BufPool::new(cfg.pool_cache_bytes),
            avg_request_bytes: 0,
            ahead_bytes: 0,
            ahead_limit: cfg.read_ahead_total_bytes / threads,
            // A worker's share of the node's budget, never less than two of the largest requests
            // (one can always be received while another is answered). Read-ahead is bounded by
            // its own share (`ahead_limit`) and not counted against this.
            buffer_limit: (cfg.max_buffer_bytes / threads)
                .max(2 * u64::from(cfg.max_payload_bytes)),
            buffer_bytes: 0,
            memory_waiters: Vec::new(),
            peers: [None, None],
        }
    }

    /// Counts a request of `bytes` data into the moving average that decides spinning.
    pub fn note_request(&mut self, bytes: u32) {
        self.avg_request_bytes = (self.avg_request_bytes * 7 + u64::from(bytes)) / 8;
    }
}

/// Receive buffer: holds the largest option (64 KiB + header) or many small requests.
const RECV_BUFFER_BYTES: usize = 128 * 1024;
/// Most replies gathered into one `sendmsg`, and most iovecs in it.
const MAX_SEND_IOVECS: usize = 256;
/// How long a client still negotiating when the server starts shutting down may go on (its
/// options are answered `NBD_REP_ERR_SHUTDOWN`) before it is disconnected.
const SHUTDOWN_NEGOTIATION_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a connection whose export was withdrawn may take to receive its last replies.
const WITHDRAW_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

enum Phase {
    Handshake(Handshake),
    Transmission {
        session: Session,
        target: Arc<dyn BlockTarget>,
        export: String,
    },
}

pub(super) struct Conn {
    cid: u32,
    serial: u64,
    fd: OwnedFd,
    peer: String,
    transport: Transport,
    phase: Phase,
    deadline: Option<Instant>,
    /// Time a negotiating client gets between options (the deadline moves on with each one).
    handshake_timeout: std::time::Duration,
    max_payload_bytes: u32,
    max_buffer_bytes: u64,
    /// This connection as `status` lists it, once it is in transmission.
    client: Option<Arc<Client>>,
    /// Longest a reply may wait for the client to take any of it (`EngineConfig::send_timeout`).
    send_timeout: std::time::Duration,
    /// Since when replies have waited without the client taking a byte of them.
    send_waiting_since: Option<Instant>,
    /// When the client last sent bytes: a write whose payload stops coming holds its buffer
    /// (up to a whole request's) for as long as the client likes, unless this times out.
    last_received: Instant,
    /// On the worker's list of connections waiting for its buffer memory (`Io::memory_waiters`).
    waiting_memory: bool,
    /// Most bytes read ahead and not yet asked for (`EngineConfig::read_ahead_bytes`).
    ahead_window: u64,

    rbuf: Vec<u8>,
    rpos: usize,
    rlen: usize,
    recv_armed: bool,
    /// Slot whose write payload is received directly into its buffer.
    payload_slot: Option<u16>,
    /// Slot whose write payload is being spliced from the socket (nothing else is received until
    /// all of it has left the socket and the pipe).
    splice_slot: Option<u16>,
    pipe: SplicePipe,
    /// Writes whose payload was spliced (reported when the connection closes).
    spliced_writes: u64,
    /// READs whose range had been read ahead (reported when the connection closes).
    ahead_served: u64,
    /// Payload bytes of a refused request still to be discarded.
    skip_bytes: u64,
    /// The request whose payload is being discarded. Its error reply waits until the payload is
    /// gone: the spec says to consume the payload, then fail, and a client still sending a
    /// payload cannot take a reply for it (libnbd drops the connection on one).
    skip_reply: Option<u16>,
    /// Reading paused: no free slot or too many buffer bytes in flight.
    stalled: bool,
    /// The last request was a large write whose payload went straight into its buffer. Large
    /// writes come in runs (a sequential copy), so the next receive into `rbuf` asks for one
    /// header only: the payload behind it then also lands in its own buffer instead of filling
    /// `rbuf` and being copied out of it (up to 128 KiB of each 1 MiB write, measured 2% of the
    /// server's CPU on 1 MiB buffered writes).
    header_only: bool,

    /// Read-ahead (only where the target offers a change count): where the next READ of a
    /// sequential reader starts, where the read-ahead issued so far ends, and the unclaimed
    /// read-aheads of the current epoch (slots and bytes) and how many of them are parked.
    seq_next: u64,
    ahead_end: u64,
    ahead_epoch: u64,
    ahead_slots: usize,
    ahead_bytes: u64,
    parked: usize,

    /// Raw bytes being sent before any reply (handshake output). Never modified while a send is
    /// armed: new output is staged in `out_next` and swapped in when the kernel is done.
    out: Vec<u8>,
    out_sent: usize,
    out_next: Vec<u8>,
    send_armed: bool,
    sendq: VecDeque<u16>,
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,

    slots: Vec<Slot>,
    free: Vec<u16>,
    buffer_bytes: u64,
    kernel_ops: u32,
    extents: Vec<(u64, u32)>,

    /// Client sent `NBD_CMD_DISC`: finish what was received, then close.
    disc: bool,
    /// Server shutting down or export withdrawn (the reason): finish what was received, answer
    /// new requests `NBD_ESHUTDOWN`, close once nothing is in flight.
    draining: Option<&'static str>,
    /// Close once `out` is sent (negotiation ended).
    close_after_send: Option<String>,
    closing: Option<String>,
    requests: u64,
}

impl Conn {
    pub fn new(cid: u32, serial: u64, incoming: Incoming, cfg: &EngineConfig) -> Conn {
        let max_inflight = cfg.max_inflight.max(1);
        Conn {
            cid,
            serial,
            fd: incoming.fd,
            peer: incoming.peer,
            transport: incoming.transport,
            phase: Phase::Handshake(Handshake::new()),
            deadline: Some(Instant::now() + cfg.handshake_timeout),
            handshake_timeout: cfg.handshake_timeout,
            max_payload_bytes: cfg.max_payload_bytes,
            max_buffer_bytes: cfg.max_conn_buffer_bytes,
            client: None,
            send_timeout: cfg.send_timeout,
            send_waiting_since: None,
            last_received: Instant::now(),
            waiting_memory: false,
            ahead_window: cfg.read_ahead_bytes,
            rbuf: vec![0; RECV_BUFFER_BYTES],
            rpos: 0,
            rlen: 0,
            recv_armed: false,
            payload_slot: None,
            splice_slot: None,
            pipe: SplicePipe::Untried,
            spliced_writes: 0,
            ahead_served: 0,
            skip_bytes: 0,
            skip_reply: None,
            stalled: false,
            header_only: false,
            seq_next: 0,
            ahead_end: 0,
            ahead_epoch: 0,
            ahead_slots: 0,
            ahead_bytes: 0,
            parked: 0,
            out: Vec::with_capacity(256),
            out_sent: 0,
            out_next: Vec::with_capacity(256),
            send_armed: false,
            sendq: VecDeque::with_capacity(max_inflight as usize),
            iov: Vec::with_capacity(MAX_SEND_IOVECS),
            // Points at `iov` only while a send is armed (see `try_send`).
            msg: Box::new(empty_msghdr()),
            slots: (0..max_inflight).map(|_| Slot::new()).collect(),
            free: (0..max_inflight).rev().collect(),
            buffer_bytes: 0,
            kernel_ops: 0,
            extents: Vec::new(),
            disc: false,
            draining: None,
            close_after_send: None,
            closing: None,
            requests: 0,
        }
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends the greeting and starts reading.
    pub fn begin(&mut self, io: &mut Io<impl Submit>) {
        tracing::debug!(conn = self.serial, peer = %self.peer, "connection accepted");
        Handshake::greeting(&mut self.out_next);
        self.try_send(io);
        self.arm_recv(io);
    }

    fn mode(&self) -> ReplyMode {
        match &self.phase {
            Phase::Transmission { session, .. } => session.mode,
            Phase::Handshake(_) => unreachable!("replies only in transmission"),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.closing.is_some() && self.kernel_ops == 0
    }

    /// Releases what the connection holds. Only called when `is_finished`.
    pub fn finish(mut self: Box<Self>, io: &mut Io<impl Submit>, exports: &Exports) {
        if self.client.take().is_some() {
            exports.client_closed(self.serial);
        }
        // Read-ahead still counted here (parked, or in flight when the connection closed) leaves
        // the worker's account with the connection.
        io.ahead_bytes -= self.ahead_bytes;
        for sid in 0..self.slots.len() {
            if let Some(b) = self.slots[sid].buf.take() {
                self.refund(io, b.capacity() as u64);
                io.pool.put(b);
            }
        }
        assert_eq!(
            self.buffer_bytes, 0,
            "buffer accounting of a finished connection"
        );
        let export = match &self.phase {
            Phase::Transmission { export, target, .. } => {
                target.detach();
                export.as_str()
            }
            Phase::Handshake(_) => "-",
        };
        tracing::info!(
            conn = self.serial,
            peer = %self.peer,
            export,
            requests = self.requests,
            spliced_writes = self.spliced_writes,
            read_ahead_served = self.ahead_served,
            reason = self.closing.as_deref().unwrap_or("?"),
            "connection closed"
        );
    }

    /// Starts closing: the socket is shut down so pending receives and sends complete; target I/O
    /// in flight finishes and is released without a reply.
    pub fn close(&mut self, reason: String) {
        if self.closing.is_some() {
            return;
        }
        self.closing = Some(reason);
        let _ = nix::sys::socket::shutdown(self.raw_fd(), nix::sys::socket::Shutdown::Both);
    }

    /// Called on every tick: ends a handshake that took too long, and a connection whose export
    /// was withdrawn (its volume deleted with `--force`).
    pub fn check_deadline(&mut self, now: Instant) {
        if let Some(since) = self.send_waiting_since
            && now.duration_since(since) >= self.send_timeout
        {
            // A client that stops reading its replies holds their buffers for as long as it
            // likes; past the timeout its memory goes back to the clients that read.
            self.close(format!(
                "the client took no reply bytes for {}s",
                self.send_timeout.as_secs()
            ));
            return;
        }
        let payload_pending =
            self.payload_slot.is_some() || self.splice_slot.is_some() || self.skip_bytes > 0;
        if payload_pending && now.duration_since(self.last_received) >= self.send_timeout {
            // A request's payload that stopped coming: its buffer goes back to the clients
            // that send what they announce.
            self.close(format!(
                "the client sent no payload bytes for {}s",
                self.send_timeout.as_secs()
            ));
            return;
        }
        if self.deadline.is_some_and(|d| now >= d) {
            let reason = match &self.phase {
                Phase::Handshake(hs) if hs.shutting_down() => "server shutting down",
                Phase::Handshake(_) => "handshake timed out",
                Phase::Transmission { .. } => "export withdrawn; requests still unanswered",
            };
            self.close(reason.into());
            return;
        }
        if let Phase::Transmission { target, .. } = &self.phase
            && target.revoked()
            && self.draining.is_none()
        {
            // The spec asks a server that ends transmission to let requests in flight finish
            // and to answer new ones NBD_ESHUTDOWN, as a shutdown does (the withdrawn target
            // fails what reaches it with EIO). A client that stops reading is cut off after
            // the grace.
            self.draining = Some("export withdrawn");
            self.deadline = Some(now + WITHDRAW_GRACE);
            self.maybe_done();
        }
    }

    /// The server is shutting down. A negotiating client gets `NBD_REP_ERR_SHUTDOWN` for its
    /// options and a short while to leave. In transmission, requests already received run to
    /// their replies; requests that arrive from now on are answered `NBD_ESHUTDOWN` (the spec's
    /// hint to disconnect); the connection closes once nothing is in flight.
    pub fn drain_for_shutdown(&mut self) {
        match &mut self.phase {
            Phase::Handshake(hs) => {
                hs.shut_down();
                let cap = Instant::now() + SHUTDOWN_NEGOTIATION_GRACE;
                self.deadline = Some(self.deadline.map_or(cap, |d| d.min(cap)));
            }
            Phase::Transmission { .. } => {
                self.draining = Some("server shutting down");
                self.maybe_done();
            }
        }
    }

    /// Every completion of this connection's operations enters here: the operation leaves the
    /// kernel's hands, then the part of the state machine that submitted it goes on.
    pub fn complete(
        &mut self,
        io: &mut Io<impl Submit>,
        exports: &Exports,
        ud: UserData,
        res: i32,
    ) {
        assert!(
            self.kernel_ops > 0,
            "conn {}: a completion ({ud:?}) with no operation counted in flight",
            self.serial
        );
        self.kernel_ops -= 1;
        match ud.tag {
            Tag::Recv => self.on_recv(io, exports, res),
            Tag::Send => self.on_send(io, exports, res),
            Tag::Io => self.on_io(io, ud.slot, ud.sub, res),
            Tag::Splice => self.on_splice(io, ud.slot, ud.sub, res),
            Tag::Wake | Tag::Tick | Tag::PeerRecv | Tag::PeerSend => {
                unreachable!("the worker's own completions")
            }
        }
    }

    /// The `user_data` of an operation of this connection.
    fn ud(&self, tag: Tag, slot: u16, sub: u16) -> UserData {
        UserData::new(tag, self.cid, slot, sub)
    }

    /// Slots with work in flight or a reply to send; parked read-aheads hold only a buffer.
    fn busy_slots(&self) -> usize {
        self.slots.len() - self.free.len() - self.parked
    }

    /// Takes a free slot (the caller checked there is one) for a request or a read-ahead: its
    /// fields reset, with a buffer for `data_len` bytes counted against the connection's budget.
    fn take_slot(
        &mut self,
        io: &mut Io<impl Submit>,
        cookie: u64,
        offset: u64,
        data_len: u32,
    ) -> u16 {
        let sid = self.free.pop().expect("the caller checked for a free slot");
        let slot = &mut self.slots[sid as usize];
        debug_assert_eq!(slot.state, SlotState::Free);
        slot.cookie = cookie;
        slot.offset = offset;
        slot.read_df = None;
        slot.ahead = None;
        slot.data_len = data_len;
        slot.payload_have = 0;
        slot.planned = false;
        slot.splice = None;
        slot.header.clear();
        slot.segments.clear();
        slot.sent = 0;
        if data_len > 0 {
            let buf = io.pool.get(data_len as usize);
            let bytes = buf.capacity() as u64;
            slot.buf = Some(buf);
            self.charge(io, bytes);
        }
        sid
    }

    /// Counts buffer bytes against the connection's budget and its worker's.
    fn charge(&mut self, io: &mut Io<impl Submit>, bytes: u64) {
        self.buffer_bytes += bytes;
        io.buffer_bytes += bytes;
    }

    /// Gives buffer bytes back to both budgets.
    fn refund(&mut self, io: &mut Io<impl Submit>, bytes: u64) {
        assert!(
            self.buffer_bytes >= bytes && io.buffer_bytes >= bytes,
            "buffer accounting: refunding {bytes} of {} (worker {})",
            self.buffer_bytes,
            io.buffer_bytes
        );
        self.buffer_bytes -= bytes;
        io.buffer_bytes -= bytes;
    }

    /// Memory freed elsewhere on the worker: reading resumes if this connection was waiting
    /// for it (it stalls again, and queues again, if there still is not enough).
    pub fn resume_for_memory(&mut self, io: &mut Io<impl Submit>, exports: &Exports) {
        self.waiting_memory = false;
        if self.stalled && self.closing.is_none() {
            self.stalled = false;
            self.process(io, exports);
            self.try_send(io);
            self.maybe_done();
        }
    }

    fn target(&self) -> Arc<dyn BlockTarget> {
        match &self.phase {
            Phase::Transmission { target, .. } => target.clone(),
            Phase::Handshake(_) => unreachable!("requests run only in transmission"),
        }
    }

    fn release(&mut self, io: &mut Io<impl Submit>, sid: u16) {
        if let Some(b) = self.slots[sid as usize].buf.take() {
            self.refund(io, b.capacity() as u64);
            io.pool.put(b);
        }
        let slot = &mut self.slots[sid as usize];
        if slot.header.capacity() > HEADER_KEEP_BYTES {
            slot.header = Vec::with_capacity(HEADER_KEEP_BYTES);
        }
        slot.state = SlotState::Free;
        self.free.push(sid);
    }

    /// Closes when a soft end (negotiation over, `DISC`, shutdown) has nothing left to send.
    fn maybe_done(&mut self) {
        let idle = self.out.is_empty()
            && self.out_next.is_empty()
            && self.sendq.is_empty()
            && !self.send_armed;
        if let Some(reason) = &self.close_after_send {
            if idle {
                let reason = reason.clone();
                self.close(reason);
            }
            return;
        }
        let reason = if self.disc {
            Some("client sent NBD_CMD_DISC")
        } else {
            self.draining
        };
        if let Some(reason) = reason
            && idle
            && self.busy_slots() == 0
        {
            self.close(reason.into());
        }
    }
}
