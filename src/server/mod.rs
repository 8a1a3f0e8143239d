//! `streamer serve`: opens the exports, binds the listeners, runs the acceptor and the engine, and
//! shuts everything down cleanly on SIGTERM/SIGINT.

mod export_spec;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::socket::{setsockopt, sockopt};

pub use export_spec::{ExportSpec, validate_export_name};

use crate::engine::{Engine, EngineConfig, Incoming, Transport};
use crate::mgmt::server::{Access, MgmtServer};
use crate::node::{Node, NodeLimits};
use crate::target::{CacheMode, Committers, Export, Exports, FileTarget};

/// The node's pool and management socket.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub dir: PathBuf,
    pub mgmt_socket: PathBuf,
    pub admin_gid: Option<u32>,
    /// Bytes per second bulk commands may stream while clients do I/O (0: unpaced).
    pub bulk_rate: u64,
    /// Longest an import's pipe may send nothing.
    pub import_idle: Duration,
    /// Clean block map pages each served volume keeps in memory.
    pub map_cache_pages: usize,
    /// Create the pool directory if it does not exist (asked for, or the default directory).
    pub create: bool,
}

/// Everything `streamer serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// `None`: raw --export files only, no pool and no management socket.
    pub pool: Option<PoolConfig>,
    pub listen: Vec<SocketAddr>,
    pub socket: Option<PathBuf>,
    pub exports: Vec<ExportSpec>,
    pub cache: CacheMode,
    pub max_connections: usize,
    pub engine: EngineConfig,
    /// The mirrored pair this node joins (`--etcd`); `None`: a node alone.
    pub pair: Option<crate::cluster::PairConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("opening export {name:?} at {path}: {source}")]
    OpeningExport {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("export {0:?} is given twice")]
    DuplicateExport(String),
    #[error("listening on {addr}: {source}")]
    Listening { addr: String, source: io::Error },
    #[error("starting the I/O engine: {0}")]
    StartingEngine(io::Error),
    #[error("setting up signals: {0}")]
    Signals(nix::Error),
    #[error("opening the pool in {dir}: {message}")]
    Pool { dir: PathBuf, message: String },
    #[error("joining the pair: {0}")]
    Pair(String),
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Drop for Listener {
    /// A Unix socket's file goes with its listener, also when start-up fails after the bind.
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// SO_SNDBUF asked for accepted Unix connections (the kernel doubles it for its bookkeeping):
/// room for a few 1 MiB replies, the most TCP's autotuning gives a loopback connection.
const UNIX_SEND_BUFFER_BYTES: usize = 2 << 20;

impl Listener {
    fn accept(&self) -> io::Result<Incoming> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                // Replies are small and latency-bound; never wait to coalesce them.
                s.set_nodelay(true)?;
                s.set_nonblocking(false)?;
                Ok(Incoming {
                    fd: OwnedFd::from(s),
                    peer: peer.to_string(),
                    transport: Transport::Tcp,
                })
            }
            Listener::Unix(l, path) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                // A Unix stream socket has no autotuning: a sender may queue only its
                // SO_SNDBUF (208 KiB by default), so a 1 MiB read reply would leave in five
                // partial sends, each a ring round trip and a wake-up of both sides. TCP grows
                // to tcp_wmem's maximum (4 MiB) by itself; give Unix clients the same room.
                // The kernel caps the value at net.core.wmem_max; failing is harmless.
                if let Err(e) = setsockopt(&s, sockopt::SndBuf, &UNIX_SEND_BUFFER_BYTES) {
                    tracing::debug!("SO_SNDBUF on a Unix connection: {e}");
                }
                Ok(Incoming {
                    fd: OwnedFd::from(s),
                    peer: format!("unix:{}", path.display()),
                    transport: Transport::Unix,
                })
            }
        }
    }
}

fn open_exports(cfg: &ServeConfig) -> Result<Exports, ServeError> {
    let exports = Exports::default();
    for spec in &cfg.exports {
        if exports.contains(&spec.name) {
            return Err(ServeError::DuplicateExport(spec.name.clone()));
        }
        let target = FileTarget::open(&spec.path, spec.read_only, cfg.cache).map_err(|source| {
            ServeError::OpeningExport {
                name: spec.name.clone(),
                path: spec.path.clone(),
                source,
            }
        })?;
        let added = exports.add(Export {
            name: spec.name.clone(),
            description: format!("raw file {}", spec.path.display()),
            target: Arc::new(target),
            max_payload_bytes: cfg.engine.max_payload_bytes,
        });
        if added.is_err() {
            return Err(ServeError::DuplicateExport(spec.name.clone()));
        }
    }
    Ok(exports)
}

/// Committer threads shared by every volume (each runs one volume's commit at a time).
const COMMIT_THREADS: usize = 4;

/// Opens the pool, exports its volumes and images, and starts the management socket.
fn start_node(
    p: &PoolConfig,
    exports: &Arc<Exports>,
    committers: &Arc<Committers>,
    max_payload_bytes: u32,
) -> Result<(Arc<Node>, MgmtServer), ServeError> {
    let pool_err = |e: String| ServeError::Pool {
        dir: p.dir.clone(),
        message: e,
    };
    // The pool belongs to the node's user (Pool::open refuses one that does not).
    let owner_uid = rustix::process::geteuid().as_raw();
    let node = Arc::new(
        Node::open(
            &p.dir,
            exports.clone(),
            committers.clone(),
            NodeLimits {
                max_payload_bytes,
                bulk_rate: p.bulk_rate,
                import_idle: p.import_idle,
                map_cache_pages: p.map_cache_pages,
                create_pool: p.create,
            },
        )
        .map_err(|e| pool_err(e.to_string()))?,
    );
    let access = Access {
        owner_uid,
        admin_gid: p.admin_gid,
    };
    // Members of the admin group need to pass through the pool directory to reach a socket
    // inside it, and need nothing else there.
    if let Some(gid) = p.admin_gid
        && p.mgmt_socket.parent() == Some(p.dir.as_path())
    {
        node.pool_dir().grant_search(gid).map_err(|e| {
            pool_err(format!(
                "giving the admin group (gid {gid}) access to the management socket in the \
                 pool directory: {e}; put the socket elsewhere with --mgmt-socket"
            ))
        })?;
    }
    let mgmt = MgmtServer::start(node.clone(), &p.mgmt_socket, access).map_err(|source| {
        ServeError::Listening {
            addr: p.mgmt_socket.display().to_string(),
            source,
        }
    })?;
    Ok((node, mgmt))
}

fn bind(cfg: &ServeConfig) -> Result<Vec<Listener>, ServeError> {
    let mut listeners = Vec::new();
    for addr in &cfg.listen {
        let l = TcpListener::bind(addr).map_err(|source| ServeError::Listening {
            addr: addr.to_string(),
            source,
        })?;
        listeners.push(Listener::Tcp(l));
    }
    if let Some(path) = &cfg.socket {
        // A socket file left by an earlier run would make bind fail; anything else is kept.
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(path);
        }
        let l = UnixListener::bind(path).map_err(|source| ServeError::Listening {
            addr: path.display().to_string(),
            source,
        })?;
        listeners.push(Listener::Unix(l, path.clone()));
    }
    for l in &listeners {
        let r = match l {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        };
        r.map_err(|source| ServeError::Listening {
            addr: "listener".into(),
            source,
        })?;
    }
    Ok(listeners)
}

/// Signals that stop the node, always through the clean shutdown (their default action would
/// end it at once: nothing committed, a stale socket, space leaked).
const STOP_SIGNALS: [Signal; 3] = [Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT];
/// Signals the node takes and logs without stopping: SIGHUP comes when the terminal or SSH
/// session that started it closes (there is nothing to reload yet); SIGUSR1/2 are kept for later.
const IGNORED_SIGNALS: [Signal; 3] = [Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2];

/// Runs the server until SIGTERM, SIGINT or SIGQUIT, then shuts down cleanly.
pub fn serve(cfg: ServeConfig) -> Result<(), ServeError> {
    // Block the signals before any thread starts, so every thread inherits the mask and the
    // main thread alone takes them with sigwait.
    let mut signals = SigSet::empty();
    for s in STOP_SIGNALS.iter().chain(&IGNORED_SIGNALS) {
        signals.add(*s);
    }
    signals.thread_block().map_err(ServeError::Signals)?;

    let exports = Arc::new(open_exports(&cfg)?);
    let committers = Committers::start(COMMIT_THREADS).map_err(ServeError::StartingEngine)?;
    // The pair first: a node that may not join (its name taken, the pair full, etcd out of
    // reach) stops before it creates or touches its pool.
    let pair = match &cfg.pair {
        Some(pc) => Some(join_pair(pc)?),
        None => None,
    };
    let (node, mgmt) = match &cfg.pool {
        None => (None, None),
        Some(p) => {
            let (node, mgmt) = start_node(p, &exports, &committers, cfg.engine.max_payload_bytes)?;
            (Some(node), Some(mgmt))
        }
    };
    let mut peer_banner = None;
    if let (Some((handle, addr)), Some(node)) = (pair, &node) {
        node.set_pair(handle);
        peer_banner = Some(addr);
    }
    let listeners = bind(&cfg)?;
    let engine = Arc::new(
        Engine::start(cfg.engine.clone(), exports.clone()).map_err(ServeError::StartingEngine)?,
    );
    // Each I/O worker gets its data link to the peer from the link's dialer (and a new one
    // whenever its link died).
    if let Some(node) = &node {
        let e = engine.clone();
        node.start_data_links(
            engine.workers(),
            Box::new(move |w, link| e.attach_peer(w, link)),
        );
    }

    // Everything that serves exists before "ready" is announced: scripts and tests that see it
    // can connect at once and observe a fully started process.
    let mut banner = Vec::new();
    for l in &listeners {
        let _ = match l {
            Listener::Tcp(l) => writeln!(
                banner,
                "listening tcp {}",
                l.local_addr().map_or("?".into(), |a| a.to_string())
            ),
            Listener::Unix(_, p) => writeln!(banner, "listening unix {}", p.display()),
        };
    }
    let stop = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
            .map_err(|e| ServeError::StartingEngine(e.into()))?,
    );
    let acceptor = {
        let engine = engine.clone();
        let stop = stop.clone();
        let max = cfg.max_connections;
        std::thread::Builder::new()
            .name("streamer-accept".into())
            .spawn(move || accept_loop(&listeners, &engine, &stop, max))
            .map_err(ServeError::StartingEngine)?
    };

    if let Some(m) = &mgmt {
        let _ = writeln!(banner, "management unix {}", m.path().display());
    }
    if let Some(addr) = peer_banner {
        let _ = writeln!(banner, "peer tcp {addr}");
    }
    let mut out = io::stdout().lock();
    let _ = out.write_all(&banner);
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    drop(out);
    tracing::info!(
        exports = exports.len(),
        threads = cfg.engine.threads,
        "serving"
    );

    let signal = loop {
        let signal = signals.wait().map_err(ServeError::Signals)?;
        if STOP_SIGNALS.contains(&signal) {
            break signal;
        }
        tracing::warn!(%signal, "received and ignored: the node keeps running (stop it with SIGTERM)");
    };
    tracing::info!(%signal, "stopping: no new connections; finishing requests in flight");
    let _ = nix::unistd::write(stop.as_fd(), &1u64.to_ne_bytes());
    let _ = acceptor.join();
    if let Some(m) = mgmt {
        m.stop();
    }
    // Long commands end now, undone (an import is not published), and their clients are told.
    if let Some(node) = &node {
        node.jobs
            .cancel_all("the node is stopping", Duration::from_secs(10));
    }
    // The dialer lets go of the engine before it shuts down.
    if let Some(node) = &node {
        node.stop_data_links();
    }
    if let Ok(engine) = Arc::try_unwrap(engine) {
        engine.shutdown();
    }
    // Drained: the peer sees this node leave now rather than when its lease runs out, and its
    // data links stop writing the replicas here before they are synced and the committers stop.
    if let Some(node) = &node {
        node.leave_pair();
    }
    let mut all_synced = true;
    for (name, target) in exports.snapshot() {
        if let Err(err) = target.sync() {
            tracing::error!(export = %name, "final flush failed: {err}");
            all_synced = false;
        }
    }
    // Requests parked on a commit were answered while the engine drained; none wait now.
    committers.stop();
    if let Some(node) = &node
        && all_synced
    {
        node.stopped_cleanly();
    }
    drop(node);
    if let Some(path) = &cfg.socket {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Binds the peer link, joins the pair in etcd (advertising the bound address) and starts the
/// link; returns it and its address.
fn join_pair(
    pc: &crate::cluster::PairConfig,
) -> Result<(crate::node::PairHandle, SocketAddr), ServeError> {
    let listener = TcpListener::bind(pc.peer_listen).map_err(|source| ServeError::Listening {
        addr: format!("{} (--peer-listen)", pc.peer_listen),
        source,
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| ServeError::Pair(e.to_string()))?;
    let mut pc = pc.clone();
    pc.peer_listen = local;
    let cluster =
        Arc::new(crate::cluster::Cluster::join(pc).map_err(|e| ServeError::Pair(e.to_string()))?);
    let link = crate::peer::link::PeerLink::start(listener, cluster.clone())
        .map_err(|e| ServeError::Pair(format!("starting the peer link: {e}")))?;
    Ok((crate::node::PairHandle::new(cluster, link), local))
}

fn accept_loop(listeners: &[Listener], engine: &Engine, stop: &EventFd, max_connections: usize) {
    loop {
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| match l {
                Listener::Tcp(l) => PollFd::new(l.as_fd(), PollFlags::POLLIN),
                Listener::Unix(l, _) => PollFd::new(l.as_fd(), PollFlags::POLLIN),
            })
            .collect();
        fds.push(PollFd::new(stop.as_fd(), PollFlags::POLLIN));
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("poll on listeners failed: {e}");
                return;
            }
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        if ready[listeners.len()] {
            return;
        }
        for (l, _) in listeners.iter().zip(ready).filter(|(_, r)| *r) {
            loop {
                match l.accept() {
                    Ok(incoming) => {
                        if engine.connections() >= max_connections {
                            tracing::warn!(peer = %incoming.peer, max_connections, "connection refused: at the connection limit");
                            continue; // dropping `incoming` closes it
                        }
                        engine.dispatch(incoming);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        break;
                    }
                }
            }
        }
    }
}
