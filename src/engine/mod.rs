//! The I/O engine: worker threads, one io_uring ring each, serving NBD connections.
//!
//! Every socket receive and send and every file read, write, fallocate and fdatasync goes through a
//! worker's ring. A connection lives on one worker for its whole life; its requests run
//! concurrently and are answered as they complete, in whatever order. All `unsafe` that hands memory
//! to the kernel lives in `ring.rs`; the connection that submits keeps that memory alive until the
//! completion arrives.
//!
//! ```text
//!   mod.rs     Engine: starts workers, hands each accepted socket to the least loaded one
//!   worker.rs  one thread's loop: submit, wait, route each completion to its owner, timers
//!   conn/      one NBD connection's state machine (see its module doc for the parts)
//!   ring.rs    the io_uring, the user_data codec, and every unsafe submission
//!   bufpool.rs aligned request buffers, reused
//! ```
//! Dependencies run one way: worker -> conn -> ring; conn never calls the worker.

mod bufpool;
mod conn;
mod peer;
mod ring;
pub mod sched;
mod worker;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};

pub use bufpool::{BUF_ALIGN, Buf, BufPool};
pub use peer::PeerSocket;

use crate::target::Exports;

/// Limits and sizes of the engine. Every bound on memory or work per client is here.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub threads: usize,
    /// Largest read or write payload (advertised as the maximum block size).
    pub max_payload_bytes: u32,
    /// Requests a connection may have in flight; reading stops while at the limit.
    pub max_inflight: u16,
    /// Buffer bytes a connection may hold in flight; reading stops while above.
    pub max_conn_buffer_bytes: u64,
    /// Request buffer bytes all connections together may hold (each worker gets an equal
    /// share); a connection stops reading until its worker has room. Read-ahead comes on top,
    /// within `read_ahead_total_bytes`.
    pub max_buffer_bytes: u64,
    /// Longest replies may wait for a client that reads none of them before it is cut off.
    pub send_timeout: Duration,
    /// Most bytes read ahead of a sequential reader, on targets that allow it (zero: none).
    pub read_ahead_bytes: u64,
    /// Most bytes read ahead by all connections together; each worker gets an equal share.
    pub read_ahead_total_bytes: u64,
    /// Time a negotiating client may go without sending a whole option.
    pub handshake_timeout: Duration,
    /// Time in-flight requests get to finish on shutdown before connections are cut.
    pub shutdown_grace: Duration,
    /// Buffer bytes each worker keeps for reuse.
    pub pool_cache_bytes: usize,
    /// How long a busy worker spins for the next completion before sleeping (zero: never); at
    /// most `worker::FILE_POLL_MAX` while file I/O is in flight.
    pub poll: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_payload_bytes: 32 << 20,
            max_inflight: 128,
            max_conn_buffer_bytes: 64 << 20,
            max_buffer_bytes: 1 << 30,
            send_timeout: Duration::from_secs(60),
            read_ahead_bytes: 24 << 20,
            read_ahead_total_bytes: 256 << 20,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            pool_cache_bytes: 256 << 20,
            poll: Duration::from_micros(200),
        }
    }
}

/// What a worker's inbox carries.
pub(crate) enum Inbox {
    /// A client connection from the acceptor.
    Conn(Incoming),
    /// A data link to the pair's other node from the link's dialer (`peer.rs`).
    Peer(PeerSocket),
}

/// A socket handed from the acceptor to a worker.
pub struct Incoming {
    pub fd: OwnedFd,
    pub peer: String,
    pub transport: Transport,
}

/// What kind of socket a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Large write payloads are spliced from it into buffered files: its SO_RCVLOWAT holds
    /// readiness back until a whole payload has arrived, so one step moves all of it.
    Tcp,
    /// Payloads always pass through a buffer: a Unix socket's readiness ignores SO_RCVLOWAT and
    /// it holds only what the client's send buffer allows (about 200 KiB), so a 1 MiB payload
    /// would take six splice steps, each a hand-off to io-wq: measured 25% more CPU per 1 MiB
    /// write than the copy it saves.
    Unix,
}

struct WorkerHandle {
    tx: Sender<Inbox>,
    wake: Arc<EventFd>,
    conns: Arc<AtomicUsize>,
    join: JoinHandle<()>,
}

/// The running workers.
pub struct Engine {
    workers: Vec<WorkerHandle>,
    shutdown: Arc<AtomicBool>,
}

impl Engine {
    pub fn start(cfg: EngineConfig, exports: Arc<Exports>) -> io::Result<Engine> {
        assert!(
            cfg.max_payload_bytes as usize <= BufPool::MAX_BYTES,
            "max payload must fit the largest buffer class"
        );
        let shutdown = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for i in 0..cfg.threads.max(1) {
            let (tx, rx) = mpsc::channel();
            let wake = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?);
            let conns = Arc::new(AtomicUsize::new(0));
            // The worker (its ring and raw iovec pointers) is built on its own thread and never
            // leaves it; the result of building it comes back over a channel.
            let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
            let (cfg, exports, wake2, conns2, shutdown2) = (
                cfg.clone(),
                exports.clone(),
                wake.clone(),
                conns.clone(),
                shutdown.clone(),
            );
            let join = std::thread::Builder::new()
                .name(format!("streamer-io-{i}"))
                .spawn(move || {
                    let mut w =
                        match worker::Worker::new(i, cfg, exports, rx, wake2, conns2, shutdown2) {
                            Ok(w) => {
                                let _ = ready_tx.send(Ok(()));
                                w
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        };
                    if let Err(e) = w.run() {
                        tracing::error!(worker = i, "I/O worker stopped: {e}");
                        // Its connections' memory may still be the kernel's (closing a ring
                        // does not wait for what is in flight): leak the worker whole rather
                        // than free memory the kernel may write.
                        std::mem::forget(w);
                    }
                })?;
            ready_rx
                .recv()
                .map_err(|_| io::Error::other("I/O worker died while starting"))??;
            workers.push(WorkerHandle {
                tx,
                wake,
                conns,
                join,
            });
        }
        Ok(Engine { workers, shutdown })
    }

    /// Connections currently open on all workers.
    pub fn connections(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.conns.load(Ordering::Relaxed))
            .sum()
    }

    /// Gives a new connection to the least loaded worker.
    pub fn dispatch(&self, incoming: Incoming) {
        let w = self
            .workers
            .iter()
            .min_by_key(|w| w.conns.load(Ordering::Relaxed))
            .expect("at least one worker");
        w.conns.fetch_add(1, Ordering::Relaxed);
        if w.tx.send(Inbox::Conn(incoming)).is_ok() {
            wake(&w.wake);
        } else {
            w.conns.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Gives worker `w` its data link to the peer (in place of any it had). False when the
    /// worker is gone.
    pub fn attach_peer(&self, w: usize, link: PeerSocket) -> bool {
        let Some(w) = self.workers.get(w) else {
            return false;
        };
        let ok = w.tx.send(Inbox::Peer(link)).is_ok();
        if ok {
            wake(&w.wake);
        }
        ok
    }

    /// Stops every worker: in-flight requests finish (within the grace period), then connections
    /// close. Returns when all workers have exited.
    pub fn shutdown(self) {
        self.shutdown.store(true, Ordering::Release);
        for w in &self.workers {
            wake(&w.wake);
        }
        for w in self.workers {
            let _ = w.join.join();
        }
    }
}

fn wake(efd: &EventFd) {
    if let Err(e) = nix::unistd::write(efd.as_fd(), &1u64.to_ne_bytes()) {
        tracing::warn!("waking worker: {e}");
    }
}
