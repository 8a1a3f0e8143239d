//! The control link between the two nodes of a pair: each node listens on `--peer-listen`,
//! dials the other (its address from the pair's members in etcd), introduces itself with HELLO
//! and then PINGs once a second. A peer that answers nothing for `--peer-timeout` is down.
//!
//! This is the liveness and identity check of the link; the replicated data will travel on
//! links of the same protocol driven from the I/O threads' rings (`docs/pair.md` §1). Control
//! traffic is a frame a second, so plain threads and blocking sockets serve it.
//!
//! Everything that arrives is decoded by `wire` before it is acted on; a connection that sends
//! anything but well-formed frames of this pair is logged (with the reason) and closed.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use super::wire::{self, HEADER_BYTES, Header, Hello, Kind, WireError};
use crate::cluster::Cluster;

/// How often the dialer pings the peer (and retries a connection).
const PING_EVERY: Duration = Duration::from_secs(1);
/// Most peer connections served at once: the peer makes one (a new one supersedes the old);
/// the rest is someone else, and gets at most `HELLO_WITHIN` to prove otherwise.
const MAX_INCOMING: usize = 8;
/// A connection must deliver its whole HELLO within this.
const HELLO_WITHIN: Duration = Duration::from_secs(5);
/// Largest frame payload the control link takes (a HELLO is at most 4 + 3 * 256 bytes):
/// nothing is allocated for a stranger's claimed 32 MiB.
const MAX_CONTROL_PAYLOAD: u32 = 1024;

/// The link as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Connected to the peer and answered within the timeout.
    Up { peer: String, since: SystemTime },
    /// Not connected: why, and since when.
    Down { reason: String, since: SystemTime },
}

impl LinkState {
    pub fn stopped() -> LinkState {
        LinkState::Down {
            reason: "the link is stopped".into(),
            since: SystemTime::now(),
        }
    }
}

struct Shared {
    state: Mutex<LinkState>,
    stop: AtomicBool,
    incoming: AtomicUsize,
    /// The connections being served (to shut down at stop), by id, and their threads.
    served: Mutex<Vec<(u64, TcpStream)>>,
    serving: Mutex<Vec<JoinHandle<()>>>,
    /// The id of the peer's newest accepted connection: older ones from it end.
    current_peer_conn: AtomicU64,
    next_id: AtomicU64,
    cluster: Arc<Cluster>,
    node: String,
    pair: String,
    timeout: Duration,
}

impl Shared {
    fn set(&self, new: LinkState) {
        let mut s = self.state.lock();
        let changed = match (&*s, &new) {
            (LinkState::Up { peer: a, .. }, LinkState::Up { peer: b, .. }) => a != b,
            (LinkState::Down { reason: a, .. }, LinkState::Down { reason: b, .. }) => a != b,
            _ => true,
        };
        if changed {
            match &new {
                LinkState::Up { peer, .. } => tracing::info!(peer = %peer, "peer link up"),
                LinkState::Down { reason, .. } => tracing::warn!("peer link down: {reason}"),
            }
            *s = new;
        }
    }

    fn down(&self, reason: String) {
        let since = match &*self.state.lock() {
            LinkState::Down { since, .. } => *since,
            LinkState::Up { .. } => SystemTime::now(),
        };
        self.set(LinkState::Down { reason, since });
    }
}

/// The running link: a listener thread and a dialer thread.
pub struct PeerLink {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    local: SocketAddr,
}

impl PeerLink {
    /// Starts serving the peer on `listener` (bound to `--peer-listen`) and dialing it.
    pub fn start(listener: TcpListener, cluster: Arc<Cluster>) -> io::Result<PeerLink> {
        let cfg = cluster.config().clone();
        let local = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(LinkState::Down {
                reason: "not connected yet".into(),
                since: SystemTime::now(),
            }),
            stop: AtomicBool::new(false),
            incoming: AtomicUsize::new(0),
            served: Mutex::new(Vec::new()),
            serving: Mutex::new(Vec::new()),
            current_peer_conn: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            cluster: cluster.clone(),
            node: cfg.node.clone(),
            pair: cfg.pair.clone(),
            timeout: cfg.peer_timeout,
        });
        let s1 = shared.clone();
        let accept = std::thread::Builder::new()
            .name("streamer-peer-in".into())
            .spawn(move || accept_loop(listener, s1))?;
        let s2 = shared.clone();
        let dial = std::thread::Builder::new()
            .name("streamer-peer-out".into())
            .spawn(move || dial_loop(cluster, s2))?;
        Ok(PeerLink {
            shared,
            threads: vec![accept, dial],
            local,
        })
    }

    pub fn state(&self) -> LinkState {
        self.shared.state.lock().clone()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Stops listening and dialing and ends every connection (the peer sees the link go down
    /// at once); returns when all of the link's threads have.
    pub fn stop(self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
        for (_, s) in self.shared.served.lock().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let serving = std::mem::take(&mut *self.shared.serving.lock());
        for t in serving {
            let _ = t.join();
        }
    }
}

/// Sleeps up to `d`, returning early (true) when the link is stopping.
fn nap(shared: &Shared, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if shared.stop.load(Ordering::Acquire) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    shared.stop.load(Ordering::Acquire)
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, from)) => {
                if shared.incoming.fetch_add(1, Ordering::AcqRel) >= MAX_INCOMING {
                    shared.incoming.fetch_sub(1, Ordering::AcqRel);
                    tracing::warn!(%from, "peer link refused: too many peer connections");
                    continue;
                }
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                if let Ok(c) = stream.try_clone() {
                    shared.served.lock().push((id, c));
                }
                let s = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("streamer-peer-conn".into())
                    .spawn(move || {
                        if let Err(why) = serve_incoming(stream, id, &s) {
                            tracing::warn!(%from, "peer link closed: {why}");
                        }
                        s.served.lock().retain(|(i, _)| *i != id);
                        s.incoming.fetch_sub(1, Ordering::AcqRel);
                    });
                match spawned {
                    Ok(t) => {
                        let mut serving = shared.serving.lock();
                        serving.retain(|t| !t.is_finished());
                        serving.push(t);
                    }
                    Err(e) => {
                        shared.served.lock().retain(|(i, _)| *i != id);
                        shared.incoming.fetch_sub(1, Ordering::AcqRel);
                        tracing::warn!("serving a peer connection: {e}");
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                nap(&shared, Duration::from_millis(100));
            }
            Err(e) => {
                tracing::warn!("accepting a peer connection: {e}");
                nap(&shared, Duration::from_millis(100));
            }
        }
    }
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Refused(String),
}

/// Fills `buf` from `s`, all of it by `deadline` (a per-read timeout alone would let a sender
/// trickling a byte at a time hold the connection forever).
fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut n = 0;
    while n < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no whole frame in time",
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[n..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads one whole frame (header and payload) by `deadline`, checked; the control link takes
/// no payload over `MAX_CONTROL_PAYLOAD`.
fn read_frame(s: &mut TcpStream, deadline: Instant) -> Result<(Header, Vec<u8>), LinkError> {
    let mut h = [0u8; HEADER_BYTES];
    read_by(s, &mut h, deadline)?;
    let header = Header::decode(&h)?.expect("a whole header");
    if header.payload_len > MAX_CONTROL_PAYLOAD {
        return Err(LinkError::Refused(format!(
            "a {:?} frame with a {} byte payload on the control link",
            header.kind, header.payload_len
        )));
    }
    let mut payload = vec![0u8; header.payload_len as usize];
    read_by(s, &mut payload, deadline)?;
    header.check_payload(&payload)?;
    Ok((header, payload))
}

fn write_frame(s: &mut TcpStream, h: &Header, payload: &[u8]) -> io::Result<()> {
    let mut b = h.encode().to_vec();
    b.extend_from_slice(payload);
    s.write_all(&b)
}

/// Serves a connection from the peer: HELLO first (whole within `HELLO_WITHIN`), checked
/// against this pair, this node and the pair's other member, then PINGs. Nothing else is
/// served on the control link. A newer connection from the peer supersedes this one.
fn serve_incoming(mut s: TcpStream, id: u64, shared: &Shared) -> Result<(), LinkError> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(shared.timeout))?;
    let (h, payload) = read_frame(&mut s, Instant::now() + HELLO_WITHIN)?;
    if h.kind != Kind::Hello || h.reply {
        return Err(LinkError::Refused(format!(
            "the first frame was {:?}, not HELLO",
            h.kind
        )));
    }
    let hello = Hello::decode(&payload)?;
    let refusal = if hello.version != wire::VERSION {
        Some((
            libc::EPROTO,
            format!(
                "it speaks protocol version {}, this node {}",
                hello.version,
                wire::VERSION
            ),
        ))
    } else if hello.pair != shared.pair {
        Some((
            libc::EPERM,
            format!(
                "it is node {} of pair {}, this node is in pair {}",
                hello.from, hello.pair, shared.pair
            ),
        ))
    } else if hello.to != shared.node || hello.from == shared.node {
        Some((
            libc::EPERM,
            format!(
                "it is node {} calling node {}; this is node {}",
                hello.from, hello.to, shared.node
            ),
        ))
    } else {
        match shared.cluster.peer() {
            Ok(Some(m)) if m.name == hello.from => None,
            Ok(other) => Some((
                libc::EPERM,
                format!(
                    "it calls itself {}, not a member of pair {} ({})",
                    hello.from,
                    shared.pair,
                    other.map_or("no other member yet".into(), |m| format!(
                        "the other member is {}",
                        m.name
                    ))
                ),
            )),
            Err(e) => Some((
                libc::EAGAIN,
                format!("the pair's members cannot be read from etcd: {e}"),
            )),
        }
    };
    if let Some((errno, why)) = refusal {
        let _ = write_frame(&mut s, &h.reply_to(errno as u16), &[]);
        let _ = s.shutdown(Shutdown::Both);
        return Err(LinkError::Refused(format!("HELLO refused: {why}")));
    }
    write_frame(&mut s, &h.reply_to(0), &[])?;
    shared.current_peer_conn.store(id, Ordering::Release);
    tracing::info!(peer = %hello.from, "peer connected");
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        if shared.current_peer_conn.load(Ordering::Acquire) != id {
            return Err(LinkError::Refused(
                "superseded by a newer connection from the peer".into(),
            ));
        }
        // The peer pings every second; twice the timeout of silence ends the connection.
        let (h, _) = match read_frame(&mut s, Instant::now() + shared.timeout * 2) {
            Ok(f) => f,
            Err(LinkError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(LinkError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(LinkError::Refused(format!(
                    "the peer sent nothing for {} s",
                    (shared.timeout * 2).as_secs()
                )));
            }
            Err(e) => return Err(e),
        };
        match (h.kind, h.reply) {
            (Kind::Ping, false) => write_frame(&mut s, &h.reply_to(0), &[])?,
            (kind, _) => {
                return Err(LinkError::Refused(format!(
                    "{kind:?} is not served on the control link"
                )));
            }
        }
    }
}

fn dial_loop(cluster: Arc<Cluster>, shared: Arc<Shared>) {
    let mut cookie = 0u64;
    while !shared.stop.load(Ordering::Acquire) {
        let peer = match cluster.peer() {
            Ok(Some(p)) => p,
            Ok(None) => {
                shared.down(format!("no other node has joined pair {} yet", shared.pair));
                nap(&shared, PING_EVERY);
                continue;
            }
            Err(e) => {
                shared.down(format!("cannot learn the peer's address: {e}"));
                nap(&shared, PING_EVERY);
                continue;
            }
        };
        let reason = match dial(&peer.name, &peer.peer_addr, &shared, &mut cookie) {
            Ok(()) => continue, // stopping
            Err(e) => format!("{} at {}: {e}", peer.name, peer.peer_addr),
        };
        shared.down(reason);
        nap(&shared, PING_EVERY);
    }
}

/// Connects to the peer, says HELLO, then pings until something fails (or the link stops).
fn dial(name: &str, addr: &str, shared: &Shared, cookie: &mut u64) -> Result<(), LinkError> {
    let target: SocketAddr = addr
        .parse()
        .map_err(|_| LinkError::Refused(format!("{addr:?} is not an address")))?;
    let mut s = TcpStream::connect_timeout(&target, shared.timeout)?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(shared.timeout))?;
    let hello = Hello {
        version: wire::VERSION,
        pair: shared.pair.clone(),
        from: shared.node.clone(),
        to: name.into(),
    }
    .encode();
    *cookie += 1;
    let h = Header::request(Kind::Hello, *cookie).with_payload(&hello);
    write_frame(&mut s, &h, &hello)?;
    expect_reply(&mut s, &h, shared.timeout)?;
    shared.set(LinkState::Up {
        peer: name.into(),
        since: SystemTime::now(),
    });
    loop {
        if nap(shared, PING_EVERY) {
            let _ = s.shutdown(Shutdown::Both);
            return Ok(());
        }
        *cookie += 1;
        let h = Header::request(Kind::Ping, *cookie);
        write_frame(&mut s, &h, &[])?;
        expect_reply(&mut s, &h, shared.timeout)?;
    }
}

/// Reads the reply to `req` within the peer timeout: it must be one, to it, and say done.
fn expect_reply(s: &mut TcpStream, req: &Header, timeout: Duration) -> Result<(), LinkError> {
    let (h, _) = read_frame(s, Instant::now() + timeout).map_err(|e| match e {
        LinkError::Io(e) if e.kind() == io::ErrorKind::TimedOut => LinkError::Refused(
            "no answer within the peer timeout (the peer is slow or gone)".into(),
        ),
        other => other,
    })?;
    if !h.reply || h.kind != req.kind || h.cookie != req.cookie {
        return Err(LinkError::Refused(format!(
            "answered {:?} (cookie {}) to {:?} (cookie {})",
            h.kind, h.cookie, req.kind, req.cookie
        )));
    }
    if h.status != 0 {
        let e = io::Error::from_raw_os_error(i32::from(h.status));
        return Err(LinkError::Refused(format!(
            "the peer refused {:?}: {e}",
            req.kind
        )));
    }
    Ok(())
}
