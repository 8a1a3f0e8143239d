//! The control link between the two nodes of a pair: each node listens on `--peer-listen`,
//! dials the other (its address from the pair's members in etcd), introduces itself with HELLO
//! and then PINGs once a second. A peer that answers nothing for `--peer-timeout` is down.
//!
//! This is the liveness and identity check of the link. While it is up, the dialer also keeps
//! one data link per I/O worker (the mirrored operations of the volumes this node owns) and one
//! forwarding link per I/O worker (what this node's clients ask of volumes the peer owns), both
//! handed to the workers' rings (`engine/peer.rs`). What the peer dials in is served here on a
//! thread per connection: control calls, images, data links (applied to the replicas) and
//! forwarding links (carried out as this node's own clients' operations, `docs/pair.md` §8).
//! Control traffic is a frame a second, so plain threads and blocking sockets serve it.
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

use super::replica::{self, Replicas};
use super::wire::{
    self, CONTROL_CALL, CONTROL_LINK, HEADER_BYTES, Header, Hello, Kind, LinkKind,
    MAX_CONTROL_BYTES, WireError,
};
use crate::cluster::Cluster;
use crate::engine::PeerSocket;

/// Where the dialer hands the data links it made: `(worker, link)`; false when the worker is
/// gone.
pub type AttachData = Box<dyn Fn(usize, PeerSocket) -> bool + Send + Sync>;

/// How often the dialer pings the peer (and retries a connection).
const PING_EVERY: Duration = Duration::from_secs(1);
/// Most peer connections served at once: the peer makes one control link and one data link
/// per I/O worker (a new one supersedes the old); the rest is someone else, and gets at most
/// `HELLO_WITHIN` to prove otherwise.
const MAX_INCOMING: usize = 64;
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
    /// Whether the control link is up now (what read-only replicas check on every read).
    up: Arc<AtomicBool>,
    /// Called (on the dialer's thread) each time the control link comes up.
    on_up: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    stop: AtomicBool,
    incoming: AtomicUsize,
    /// The connections being served (to shut down at stop), by id, and their threads.
    served: Mutex<Vec<(u64, TcpStream)>>,
    serving: Mutex<Vec<JoinHandle<()>>>,
    /// The id of the peer's newest accepted connection of each link (control, data link of
    /// worker n): older ones of the same link end.
    current_peer_conn: Mutex<std::collections::HashMap<u16, u64>>,
    /// The data links being served (connection ids), for `fence_data_links`.
    data_ids: Mutex<std::collections::HashSet<u64>>,
    /// This node's replicas and control answers, once the node has opened its pool.
    replicas: std::sync::OnceLock<Arc<dyn Replicas>>,
    /// The data links: the engine's workers, how to hand them a link, and whether each has one.
    data: std::sync::OnceLock<DataLinks>,
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
            self.up
                .store(matches!(new, LinkState::Up { .. }), Ordering::Release);
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
            up: Arc::new(AtomicBool::new(false)),
            on_up: Mutex::new(None),
            stop: AtomicBool::new(false),
            incoming: AtomicUsize::new(0),
            served: Mutex::new(Vec::new()),
            serving: Mutex::new(Vec::new()),
            current_peer_conn: Mutex::new(std::collections::HashMap::new()),
            replicas: std::sync::OnceLock::new(),
            data_ids: Mutex::new(std::collections::HashSet::new()),
            data: std::sync::OnceLock::new(),
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

    /// A flag that is true while the control link is up.
    pub fn up_flag(&self) -> Arc<AtomicBool> {
        self.shared.up.clone()
    }

    /// Calls `f` (on the dialer's thread) each time the control link comes up.
    pub fn on_up(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.shared.on_up.lock() = Some(f);
    }

    /// Serves the peer's data links and control requests from now on (before this, they are
    /// refused with `EAGAIN`: the node is still opening its pool).
    pub fn serve_replicas(&self, replicas: Arc<dyn Replicas>) {
        let _ = self.shared.replicas.set(replicas);
    }

    /// Dials one data link per I/O worker from now on, handing each to `attach`.
    pub fn start_data_links(&self, workers: usize, attach: AttachData) {
        let _ = self.shared.data.set(DataLinks {
            up: (0..workers)
                .map(|_| Arc::new(AtomicBool::new(false)))
                .collect(),
            forward_up: (0..workers)
                .map(|_| Arc::new(AtomicBool::new(false)))
                .collect(),
            dials: AtomicU64::new(0),
            attach: Mutex::new(Some(attach)),
        });
    }

    /// Stops handing data links to the engine (before it shuts down): returns once no hand-off
    /// is under way, and `attach` (with what it holds) is dropped.
    pub fn stop_data_links(&self) {
        if let Some(d) = self.shared.data.get() {
            drop(d.attach.lock().take());
        }
    }

    /// Whether every I/O worker has a data link to the peer now.
    pub fn data_links_up(&self) -> bool {
        self.shared
            .data
            .get()
            .is_some_and(|d| d.up.iter().all(|u| u.load(Ordering::Acquire)))
    }

    /// How many data links the dialer has made so far (a link replaced since a count was
    /// taken shows as a higher count).
    pub fn data_dials(&self) -> u64 {
        self.shared
            .data
            .get()
            .map_or(0, |d| d.dials.load(Ordering::Acquire))
    }

    /// A data link of its own for a resync (blocking; a newer one supersedes it at the peer).
    pub fn resync_connection(&self) -> Result<TcpStream, String> {
        let (s, _) = connect_peer(&self.shared, wire::RESYNC_LINK)?;
        keep_alive(&s, self.shared.timeout);
        s.set_read_timeout(Some(self.shared.timeout.max(Duration::from_secs(30))))
            .map_err(|e| e.to_string())?;
        Ok(s)
    }

    /// Sends golden image `name` (`size` bytes with digest `sha256`, hex) to the peer, which
    /// imports it with its digest checked; returns once it is sealed there, or why not.
    pub fn send_image(
        &self,
        name: &str,
        size: u64,
        sha256: &str,
        src: &mut std::fs::File,
    ) -> Result<(), String> {
        let (mut s, peer) = connect_peer(&self.shared, wire::IMAGE_LINK)?;
        let req = super::control::ImageRequest {
            name: name.into(),
            size,
            sha256: sha256.into(),
        }
        .encode();
        let h = Header::request(Kind::Control, 1).with_payload(&req);
        write_frame(&mut s, &h, &req).map_err(|e| e.to_string())?;
        s.set_write_timeout(None).map_err(|e| e.to_string())?;
        std::io::copy(src, &mut s).map_err(|e| format!("sending the image: {e}"))?;
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        // The peer checks the digest of what it received before it answers.
        let (r, payload) = read_frame_up_to(
            &mut s,
            Instant::now() + Duration::from_secs(600),
            MAX_CONTROL_BYTES,
        )
        .map_err(|e| format!("{peer}: {e}"))?;
        if !r.reply || r.status != 0 {
            return Err(format!(
                "{} refused the image: {}",
                peer,
                String::from_utf8_lossy(&payload)
            ));
        }
        Ok(())
    }

    /// A connection for many CONTROL requests in a row (a verify's checksum requests).
    pub fn control_session(&self) -> Result<ControlSession, String> {
        ControlSession::open(&self.shared)
    }

    /// Sends a CONTROL request to the peer on a connection of its own and returns the answer.
    pub fn control(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        control_call(&self.shared, request)
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
                if shared.incoming.fetch_add(1, Ordering::AcqRel) >= max_incoming(&shared) {
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

/// Most peer connections served at once: the peer's control link, a data link and a
/// forwarding link per I/O worker, a back link per forwarding link, the resync and image links
/// and control calls. Sized from this node's own workers (the peer runs the same build, with
/// the same count as a rule), never below `MAX_INCOMING`.
fn max_incoming(shared: &Shared) -> usize {
    let workers = shared.data.get().map_or(0, |d| d.up.len());
    (16 + 4 * workers).max(MAX_INCOMING)
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
    read_frame_up_to(s, deadline, MAX_CONTROL_PAYLOAD as usize)
}

/// `read_frame` with a payload of at most `max` bytes (a control call's JSON: 64 KiB).
fn read_frame_up_to(
    s: &mut TcpStream,
    deadline: Instant,
    max: usize,
) -> Result<(Header, Vec<u8>), LinkError> {
    let mut h = [0u8; HEADER_BYTES];
    read_by(s, &mut h, deadline)?;
    let header = Header::decode(&h)?.expect("a whole header");
    if header.payload_len as usize > max {
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
    if hello.link != CONTROL_CALL {
        shared.current_peer_conn.lock().insert(hello.link, id);
    }
    let superseded = || {
        hello.link != CONTROL_CALL && shared.current_peer_conn.lock().get(&hello.link) != Some(&id)
    };
    match LinkKind::of(hello.link) {
        LinkKind::Image => return receive_image(s, shared, &hello.from),
        LinkKind::Forward => return serve_forward_link(s, id, &hello, shared, &superseded),
        LinkKind::Data | LinkKind::Control | LinkKind::ControlCall => {}
    }
    if LinkKind::of(hello.link) == LinkKind::Data {
        tracing::info!(peer = %hello.from, link = hello.link, "peer data link connected");
        let Some(replicas) = shared.replicas.get() else {
            return Err(LinkError::Refused(
                "a data link before this node opened its pool".into(),
            ));
        };
        keep_alive(&s, shared.timeout);
        shared.data_ids.lock().insert(id);
        let stop = || shared.stop.load(Ordering::Acquire) || superseded();
        let served = replica::serve_data(&mut s, replicas.as_ref(), &stop);
        shared.data_ids.lock().remove(&id);
        replicas.data_link_ended();
        return served.map_err(|e| LinkError::Refused(format!("data link {}: {e}", hello.link)));
    }
    if hello.link == CONTROL_LINK {
        tracing::info!(peer = %hello.from, "peer connected");
    }
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return Ok(());
        }
        if superseded() {
            return Err(LinkError::Refused(
                "superseded by a newer connection from the peer".into(),
            ));
        }
        // The peer pings every second; twice the timeout of silence ends the connection.
        // A control call may carry a JSON document; the control link pings.
        let most = if hello.link == CONTROL_CALL {
            MAX_CONTROL_BYTES
        } else {
            MAX_CONTROL_PAYLOAD as usize
        };
        let (h, payload) = match read_frame_up_to(&mut s, Instant::now() + shared.timeout * 2, most)
        {
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
            (Kind::Control, false) if is_fence(&payload) => {
                let (status, answer) = match fence_data_links(shared) {
                    Ok(()) => (0, b"{}".to_vec()),
                    Err(why) => (libc::ETIMEDOUT, why.into_bytes()),
                };
                write_frame(
                    &mut s,
                    &h.reply_to(status as u16).with_payload(&answer),
                    &answer,
                )?;
            }
            (Kind::Control, false) => {
                let (status, answer) = match shared.replicas.get() {
                    None => (
                        libc::EAGAIN,
                        b"this node is still opening its pool".to_vec(),
                    ),
                    Some(r) => match r.control(&payload) {
                        Ok(a) => (0, a),
                        Err(why) => (libc::EINVAL, why.into_bytes()),
                    },
                };
                let mut answer = answer;
                answer.truncate(MAX_CONTROL_BYTES);
                write_frame(
                    &mut s,
                    &h.reply_to(status as u16).with_payload(&answer),
                    &answer,
                )?;
            }
            (kind, _) => {
                return Err(LinkError::Refused(format!(
                    "{kind:?} is not served on the control link"
                )));
            }
        }
    }
}

/// A forwarding link (`docs/pair.md` §8): the operations the peer's clients ask of volumes
/// this node owns, each carried out here as a local client's, its part for the peer's replica
/// sent on a data link of this thread's own to the peer (dialed when first needed).
fn serve_forward_link(
    mut s: TcpStream,
    id: u64,
    hello: &Hello,
    shared: &Shared,
    superseded: &dyn Fn() -> bool,
) -> Result<(), LinkError> {
    let Some(replicas) = shared.replicas.get() else {
        return Err(LinkError::Refused(
            "a forwarding link before this node opened its pool".into(),
        ));
    };
    tracing::info!(peer = %hello.from, link = hello.link, "peer forwarding link connected");
    keep_alive(&s, shared.timeout);
    let mut back = BackLink {
        shared,
        peer: hello.from.clone(),
        // A number of this connection's own, not its worker's: a thread still finishing an
        // operation after its forwarding link was replaced must not end the new thread's back
        // link (a newer connection of a link number supersedes the older at the peer).
        link: wire::FORWARDED_DATA_LINK + (id % u64::from(wire::MAX_FORWARD_LINKS)) as u16,
        s: None,
        cookie: 0,
    };
    let stop = || shared.stop.load(Ordering::Acquire) || superseded();
    let served = replica::serve_forwarded(&mut s, replicas.as_ref(), &stop, &mut |op, buf| {
        back.send(op, buf)
    });
    if let Some(b) = back.s.take() {
        let _ = b.shutdown(Shutdown::Both);
    }
    served.map_err(|e| LinkError::Refused(format!("forwarding link {}: {e}", hello.link)))
}

/// The data link on which the owner puts a forwarded operation's part on the forwarder's
/// replica: blocking, one frame and its answer at a time (the forwarding link's thread is
/// serial anyway). Any failure drops the connection: the operation's peer I/O fails as a
/// worker link's would (the mirror degrades), and the next one dials anew.
struct BackLink<'a> {
    shared: &'a Shared,
    /// The node that forwarded (the only one this link may go to).
    peer: String,
    link: u16,
    s: Option<TcpStream>,
    cookie: u64,
}

impl BackLink<'_> {
    fn send(&mut self, op: &crate::target::PeerIo, buf: &[u8]) -> i32 {
        let reused = self.s.is_some();
        let mut sent = self.try_send(op, buf);
        let slow = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            )
        };
        if reused && matches!(sent, Err(LinkError::Io(ref e)) if !slow(e)) {
            // The connection kept from an earlier operation may have been ended meanwhile (the
            // peer fences its data links before each resync): once more on a new one. Safe
            // even if the first reached the replica: the owner holds the range, so nothing
            // newer can land between the two, and the same change applied twice is the same.
            if let Some(s) = self.s.take() {
                let _ = s.shutdown(Shutdown::Both);
            }
            sent = self.try_send(op, buf);
        }
        match sent {
            Ok(res) => res,
            Err(e) => {
                tracing::warn!(peer = %self.peer, link = self.link, "forwarded data link: {e}");
                if let Some(s) = self.s.take() {
                    let _ = s.shutdown(Shutdown::Both);
                }
                // A frame of it may still land on the replica: the next resync fences first.
                self.replaced();
                match e {
                    LinkError::Io(e) if slow(&e) => -libc::ETIMEDOUT,
                    _ => -libc::ENOTCONN,
                }
            }
        }
    }

    /// Counted with the dialer's data links: a resync fences the peer's data links first
    /// whenever one was replaced or failed since the last fence (`Node::fence_peer`).
    fn replaced(&self) {
        if let Some(d) = self.shared.data.get() {
            d.dials.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn try_send(&mut self, op: &crate::target::PeerIo, buf: &[u8]) -> Result<i32, LinkError> {
        if self.s.is_none() {
            let peer = match self.shared.cluster.peer() {
                Ok(Some(p)) if p.name == self.peer => p,
                Ok(_) => {
                    return Err(LinkError::Refused(format!(
                        "node {} is not this pair's other member",
                        self.peer
                    )));
                }
                Err(e) => {
                    return Err(LinkError::Refused(format!(
                        "cannot learn the peer's address: {e}"
                    )));
                }
            };
            let s = connect(
                &peer.name,
                &peer.peer_addr,
                self.shared,
                self.link,
                &mut self.cookie,
            )?;
            keep_alive(&s, self.shared.timeout);
            self.s = Some(s);
            self.replaced();
        }
        let s = self.s.as_mut().expect("connected above");
        let payload = match op.op {
            crate::target::PeerOp::Write => buf
                .get(op.buf_start as usize..)
                .and_then(|b| b.get(..usize::try_from(op.len).ok()?))
                .ok_or_else(|| LinkError::Refused("a write past its buffer".into()))?,
            _ => &[],
        };
        self.cookie += 1;
        let h = Header::data_request(op, self.cookie, payload);
        write_frame(s, &h, payload)?;
        let (r, _) = read_frame(s, Instant::now() + self.shared.timeout)?;
        if !r.reply || r.kind != h.kind || r.cookie != h.cookie || r.flags != 0 {
            return Err(LinkError::Refused(format!(
                "answered {:?} (cookie {}) to {:?} (cookie {})",
                r.kind, r.cookie, h.kind, h.cookie
            )));
        }
        Ok(-i32::from(r.status))
    }
}

/// An image link: its request, its bytes (imported by the node), the answer.
fn receive_image(mut s: TcpStream, shared: &Shared, from: &str) -> Result<(), LinkError> {
    let (h, request) = read_frame_up_to(&mut s, Instant::now() + HELLO_WITHIN, MAX_CONTROL_BYTES)?;
    if h.kind != Kind::Control || h.reply {
        return Err(LinkError::Refused(format!(
            "an image link began with {:?}, not CONTROL",
            h.kind
        )));
    }
    let Some(replicas) = shared.replicas.get() else {
        return Err(LinkError::Refused(
            "an image before this node opened its pool".into(),
        ));
    };
    s.set_read_timeout(None)?;
    let src = std::fs::File::from(std::os::fd::OwnedFd::from(s.try_clone()?));
    tracing::info!(peer = %from, "receiving an image");
    let (status, answer) = match replicas.receive_image(&request, src) {
        Ok(()) => (0, b"{}".to_vec()),
        Err(why) => (libc::EINVAL, why.into_bytes()),
    };
    let mut answer = answer;
    answer.truncate(MAX_CONTROL_BYTES);
    write_frame(
        &mut s,
        &h.reply_to(status as u16).with_payload(&answer),
        &answer,
    )?;
    Ok(())
}

/// Whether a CONTROL request is `{"op": "fence_data_links"}`.
fn is_fence(payload: &[u8]) -> bool {
    super::control::ControlRequest::decode(payload)
        == Ok(super::control::ControlRequest::FenceDataLinks)
}

/// Ends every data link being served and waits (at most 10 s) until their threads are done:
/// no frame the owner sent before it asked can be applied after. The owner asks before a
/// resync (its data links carry nothing while its volumes are degraded) and dials new ones.
fn fence_data_links(shared: &Shared) -> Result<(), String> {
    let ids: Vec<u64> = shared.data_ids.lock().iter().copied().collect();
    for (id, s) in shared.served.lock().iter() {
        if ids.contains(id) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = {
            let live = shared.data_ids.lock();
            ids.iter().filter(|i| live.contains(i)).count()
        };
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{left} data link(s) still applying frames after 10 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// TCP keep-alive on a data link: a peer that vanished (a cut link, no FIN) is found within
/// seconds even when no frame is due.
fn keep_alive(s: &TcpStream, timeout: Duration) {
    use nix::sys::socket::{setsockopt, sockopt};
    let idle = timeout.as_secs().clamp(1, 60) as u32;
    let _ = setsockopt(s, sockopt::KeepAlive, &true);
    let _ = setsockopt(s, sockopt::TcpKeepIdle, &idle);
    let _ = setsockopt(s, sockopt::TcpKeepInterval, &1);
    let _ = setsockopt(s, sockopt::TcpKeepCount, &3);
}

/// The data links the dialer keeps: one per I/O worker, and a forwarding link per I/O worker.
struct DataLinks {
    /// Whether worker n has a live link (it clears the flag when its link dies).
    up: Vec<Arc<AtomicBool>>,
    /// Whether worker n has a live forwarding link.
    forward_up: Vec<Arc<AtomicBool>>,
    /// Data links made so far.
    dials: AtomicU64,
    /// `None` once stopped.
    attach: Mutex<Option<AttachData>>,
}

/// Connects to the peer and says HELLO as `link`; the connected stream, or why not.
fn connect(
    name: &str,
    addr: &str,
    shared: &Shared,
    link: u16,
    cookie: &mut u64,
) -> Result<TcpStream, LinkError> {
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
        link,
    }
    .encode();
    *cookie += 1;
    let h = Header::request(Kind::Hello, *cookie).with_payload(&hello);
    write_frame(&mut s, &h, &hello)?;
    expect_reply(&mut s, &h, shared.timeout)?;
    Ok(s)
}

/// Makes the data links that are missing (workers whose link died, or never had one).
fn dial_data(name: &str, addr: &str, shared: &Shared, cookie: &mut u64) {
    let Some(data) = shared.data.get() else {
        return;
    };
    let mirrored = data.up.iter().enumerate().map(|(w, up)| (w, up, false));
    let forwarding = data
        .forward_up
        .iter()
        .enumerate()
        .map(|(w, up)| (w, up, true));
    for (w, up, forward) in mirrored.chain(forwarding) {
        if up.load(Ordering::Acquire) {
            continue;
        }
        let link = match u16::try_from(w) {
            Ok(w) if w < wire::MAX_FORWARD_LINKS && forward => wire::FORWARD_LINK + w,
            Ok(w) if w + 1 < wire::FORWARD_LINK => w + 1,
            _ => return,
        };
        match connect(name, addr, shared, link, cookie) {
            Ok(s) => {
                keep_alive(&s, shared.timeout);
                let _ = s.set_write_timeout(None);
                up.store(true, Ordering::Release);
                // A forwarded operation may wait on the owner's degraded mode (its own peer
                // timeout, then etcd) before it is answered.
                let timeout = if forward {
                    shared.timeout * 3
                } else {
                    shared.timeout
                };
                let sock = PeerSocket {
                    fd: std::os::fd::OwnedFd::from(s),
                    up: up.clone(),
                    timeout,
                    forward,
                };
                if !forward {
                    data.dials.fetch_add(1, Ordering::AcqRel);
                }
                let attached = data.attach.lock().as_ref().is_some_and(|a| a(w, sock));
                if !attached {
                    up.store(false, Ordering::Release);
                    return;
                }
            }
            Err(e) => {
                tracing::debug!("data link {link} to {name}: {e}");
                return;
            }
        }
    }
}

/// A connection to the peer carrying CONTROL requests one after another.
pub struct ControlSession {
    s: TcpStream,
    peer: String,
    cookie: u64,
    timeout: Duration,
}

impl ControlSession {
    fn open(shared: &Shared) -> Result<ControlSession, String> {
        let (s, peer) = connect_peer(shared, CONTROL_CALL)?;
        Ok(ControlSession {
            s,
            peer,
            cookie: 1, // the HELLO's
            // Control requests may create a volume's replica: seconds, not the ping's budget.
            timeout: shared.timeout.max(Duration::from_secs(30)),
        })
    }

    /// One request: the peer's JSON answer, or its refusal.
    pub fn call(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
        self.cookie += 1;
        let h = Header::request(Kind::Control, self.cookie).with_payload(request);
        write_frame(&mut self.s, &h, request).map_err(|e| e.to_string())?;
        let (r, payload) = read_frame_up_to(
            &mut self.s,
            Instant::now() + self.timeout,
            MAX_CONTROL_BYTES,
        )
        .map_err(|e| format!("{}: {e}", self.peer))?;
        if !r.reply || r.kind != Kind::Control || r.cookie != self.cookie {
            return Err(format!(
                "{} answered {:?} to a control request",
                self.peer, r.kind
            ));
        }
        if r.status != 0 {
            return Err(format!(
                "{}: {}",
                self.peer,
                String::from_utf8_lossy(&payload)
            ));
        }
        Ok(payload)
    }
}

/// Connects to the peer as `link` (its address from etcd): the stream and the peer's name.
fn connect_peer(shared: &Shared, link: u16) -> Result<(TcpStream, String), String> {
    let peer = shared
        .cluster
        .peer()
        .map_err(|e| format!("cannot learn the peer's address: {e}"))?
        .ok_or_else(|| format!("no other node has joined pair {} yet", shared.pair))?;
    let mut cookie = 0;
    let s = connect(&peer.name, &peer.peer_addr, shared, link, &mut cookie)
        .map_err(|e| format!("{} at {}: {e}", peer.name, peer.peer_addr))?;
    Ok((s, peer.name))
}

/// One CONTROL request on a connection of its own (the control link's thread keeps pinging).
fn control_call(shared: &Shared, request: &[u8]) -> Result<Vec<u8>, String> {
    let mut session = ControlSession::open(shared)?;
    let answer = session.call(request);
    let _ = session.s.shutdown(Shutdown::Both);
    answer
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

/// Connects to the peer, says HELLO, then pings until something fails (or the link stops);
/// while the control link is up, keeps a data link per I/O worker.
fn dial(name: &str, addr: &str, shared: &Shared, cookie: &mut u64) -> Result<(), LinkError> {
    let mut s = connect(name, addr, shared, CONTROL_LINK, cookie)?;
    shared.set(LinkState::Up {
        peer: name.into(),
        since: SystemTime::now(),
    });
    if let Some(f) = shared.on_up.lock().as_ref() {
        f();
    }
    loop {
        dial_data(name, addr, shared, cookie);
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
