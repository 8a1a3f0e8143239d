//! The `streamer` command line: `serve`'s options turned into the server's config (here), and
//! the management subcommands, clients of the node's socket (`manage`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

pub mod deploy;
pub mod ippool;
pub mod manage;
pub mod pair;

use crate::engine::EngineConfig;
use crate::server::{ExportSpec, PoolConfig, ServeConfig};
use crate::target::CacheMode;

#[derive(Debug, Parser)]
#[command(
    name = "streamer",
    version,
    about = "Userspace block storage server (NBD over io_uring)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: serve the pool's volumes and images over NBD (and any --export raw files)
    /// until SIGTERM or SIGINT, with the management socket for the commands below.
    Serve(Box<ServeArgs>),
    /// Golden images: import, list, show, verify, delete, capture.
    Image(manage::ImageCmd),
    /// OS volumes: create (thin clone or blank), list, show, resize, delete.
    Volume(manage::VolumeCmd),
    /// The node: pool capacity and use, volumes, exports, connections, alerts.
    Status(manage::StatusCmd),
    /// Run the volume-format checker over every volume of the pool (or one).
    Check(manage::CheckCmd),
    /// End a long command (import, capture, verify, check) that `status` lists as running.
    Cancel(manage::CancelCmd),
    /// The mirrored pair this node belongs to (nodes up or down, the peer link, etcd).
    Pair(pair::PairCmd),
    /// IP pools: subnets whose addresses personalities take with `pool:NAME`.
    Ippool(ippool::IpPoolCmd),
    /// Create (or bring up to date) many servers' volumes and personalities from one plan.
    Deploy(deploy::DeployCmd),
}

/// The system's pool directory: root's default, and the systemd unit's.
pub const SYSTEM_DATA_DIR: &str = "/var/lib/streamer";

/// The pool directory when neither --data-dir nor STREAMER_DATA_DIR is given: the system's for
/// root, the user's own otherwise (`$XDG_DATA_HOME/streamer`, else `~/.local/share/streamer`).
/// Never relative to the current directory: a command run in a directory someone else controls
/// would talk to whatever they made listen there (and hand it the files it imports).
pub fn default_data_dir() -> Result<PathBuf, String> {
    if rustix::process::geteuid().is_root() {
        return Ok(PathBuf::from(SYSTEM_DATA_DIR));
    }
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").and_then(absolute) {
        return Ok(d.join("streamer"));
    }
    if let Some(h) = std::env::var_os("HOME").and_then(absolute) {
        return Ok(h.join(".local/share/streamer"));
    }
    Err("no default pool directory (no HOME); give --data-dir or set STREAMER_DATA_DIR".into())
}

/// Default TCP address when neither --listen nor --socket is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The pool directory (golden images, volumes, the management socket). Used when given
    /// (or STREAMER_DATA_DIR is set), or when no --export is: then /var/lib/streamer for root,
    /// ~/.local/share/streamer for anyone else.
    #[arg(long, env = "STREAMER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Create the pool directory if it does not exist. Without it, a --data-dir (or
    /// STREAMER_DATA_DIR) that does not exist is refused: a typo must not serve a new, empty
    /// pool. The default directory is created on first run.
    #[arg(long)]
    pub create: bool,
    /// The management socket (default DIR/streamer.sock).
    #[arg(long, value_name = "PATH")]
    pub mgmt_socket: Option<PathBuf>,
    /// Members of this group may use the management socket too (it becomes mode 0660).
    #[arg(long, value_name = "GROUP")]
    pub admin_group: Option<String>,
    /// Bytes per second that bulk commands (image import, capture, verify) may stream while
    /// clients are doing I/O; they run at full speed while the volumes are idle. 0: no limit.
    #[arg(long, default_value = "128M", value_parser = parse_bytes, value_name = "RATE")]
    pub bulk_rate: u64,
    /// Seconds an image import from a pipe or socket may receive nothing before it is given up
    /// (its staged bytes removed, its management slot freed).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub import_idle_timeout: u64,
    /// Clean block map each served volume keeps in memory, e.g. 16M (4 KiB of map describes
    /// 126 MiB of volume); least recently used pages beyond it are let go and read back from the
    /// metadata file when needed.
    #[arg(long, default_value = "16M", value_parser = parse_bytes, value_name = "SIZE")]
    pub map_cache: u64,
    /// TCP address to listen on (repeatable; IPv6 as [::1]:10809). Default 127.0.0.1:10809 unless
    /// only --socket is given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Unix socket to listen on.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Raw file or block device to serve (repeatable): NAME=PATH, or NAME=PATH:ro for read-only.
    #[arg(long = "export", value_name = "NAME=PATH[:ro]")]
    pub exports: Vec<ExportSpec>,
    /// direct: O_DIRECT, no page cache (like qemu-nbd --cache=none); buffered: the page cache.
    #[arg(long, value_enum, default_value = "buffered")]
    pub cache: CacheMode,
    /// I/O worker threads, one io_uring ring each, 1 to 256 (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,
    /// Largest read or write request (advertised as the maximum block size), e.g. 32M.
    #[arg(long, default_value = "32M", value_parser = parse_bytes)]
    pub max_request: u64,
    /// Requests in flight per connection before the server stops reading from it.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub max_inflight: u16,
    /// Buffer memory in flight per connection before the server stops reading from it, e.g. 64M.
    #[arg(long, default_value = "64M", value_parser = parse_bytes)]
    pub max_connection_memory: u64,
    /// Buffer memory all connections together may hold for requests in flight, e.g. 1G; a
    /// connection stops reading while its I/O thread's share is used (read-ahead comes on top,
    /// within --read-ahead-memory).
    #[arg(long, default_value = "1G", value_parser = parse_bytes)]
    pub max_memory: u64,
    /// Seconds replies may wait for a client that takes none of them before it is disconnected
    /// (its buffers go back to the clients that read).
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub send_timeout: u64,
    /// Direct mode: most bytes read ahead of a client reading sequentially in pieces of 128 KiB or
    /// more (within half of --max-connection-memory), e.g. 24M; 0 turns read-ahead off.
    #[arg(long, default_value = "24M", value_parser = parse_bytes)]
    pub read_ahead: u64,
    /// Direct mode: most bytes read ahead for all connections together, shared out among the I/O
    /// threads; many sequential readers at once (a boot storm) share it instead of each holding
    /// a full --read-ahead.
    #[arg(long, default_value = "256M", value_parser = parse_bytes)]
    pub read_ahead_memory: u64,
    /// Connections served at once; more are accepted and closed at once.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Microseconds a busy I/O thread spins for the next request before sleeping (0: never);
    /// at most 50 while waiting on the disk. Trades a little CPU for much lower latency at low
    /// queue depth; it should cover a client's turn-around between a reply and its next request.
    #[arg(long, default_value_t = 200, value_name = "MICROSECONDS")]
    pub poll_us: u64,
    /// Seconds a negotiating client may go without sending a whole option.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub handshake_timeout: u64,
    /// etcd endpoints (comma separated, e.g. http://127.0.0.1:2379): the node joins the
    /// mirrored pair --pair as node --node, with its peer link on --peer-listen. Without it the
    /// node runs alone, as before.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',', requires_all = ["node", "pair", "peer_listen"])]
    pub etcd: Vec<String>,
    /// This node's name in its pair (its identity for good; two processes cannot share it).
    #[arg(long, value_name = "NAME", requires = "etcd")]
    pub node: Option<String>,
    /// The pair's name (several pairs may share one etcd).
    #[arg(long, value_name = "NAME", requires = "etcd")]
    pub pair: Option<String>,
    /// The address the peer link listens on, as the other node dials it (port 0: any free port).
    #[arg(long, value_name = "ADDR:PORT", requires = "etcd")]
    pub peer_listen: Option<SocketAddr>,
    /// Seconds the peer may answer nothing before it is taken for gone.
    #[arg(long, default_value_t = 5, value_name = "SECONDS")]
    pub peer_timeout: u64,
    /// Seconds of this node's presence lease in etcd: a node that dies is seen down within it.
    #[arg(long, default_value_t = 5, value_name = "SECONDS")]
    pub lease: u64,
    /// Bytes per second a resync may send to the peer (the blocks written while it was gone).
    /// 0: no limit.
    #[arg(long, default_value = "100M", value_parser = parse_bytes, value_name = "RATE")]
    pub resync_rate: u64,
}

pub fn parse_bytes(s: &str) -> Result<u64, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!("{s:?} is not a size: a size cannot be negative"));
    }
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{s:?} is not a size: {e}"))
}

impl ServeArgs {
    pub fn into_config(self) -> Result<ServeConfig, String> {
        let mut listen = self.listen;
        if listen.is_empty() && self.socket.is_none() {
            listen.push(DEFAULT_LISTEN.parse().expect("valid default address"));
        }
        let (data_dir, create) = match (self.data_dir, self.exports.is_empty()) {
            (Some(d), _) => (Some(d), self.create),
            (None, true) => (Some(default_data_dir()?), true),
            (None, false) => (None, false),
        };
        let pool = match data_dir {
            None => None,
            Some(dir) => {
                let admin_gid = match &self.admin_group {
                    None => None,
                    Some(g) => Some(
                        nix::unistd::Group::from_name(g)
                            .map_err(|e| format!("--admin-group {g:?}: {e}"))?
                            .ok_or_else(|| format!("--admin-group {g:?}: no such group"))?
                            .gid
                            .as_raw(),
                    ),
                };
                Some(PoolConfig {
                    mgmt_socket: self
                        .mgmt_socket
                        .unwrap_or_else(|| dir.join(manage::SOCKET_NAME)),
                    dir,
                    create,
                    admin_gid,
                    bulk_rate: self.bulk_rate,
                    import_idle: Duration::from_secs(self.import_idle_timeout.max(1)),
                    map_cache_pages: usize::try_from(
                        self.map_cache / volume_format::layout::MAP_SLOT_BYTES as u64,
                    )
                    .unwrap_or(usize::MAX)
                    .max(1),
                })
            }
        };
        let max_payload = u32::try_from(self.max_request)
            .ok()
            // The spec: a server MUST serve unfragmented (DF) reads of up to 64 KiB.
            .filter(|m| (65536..=crate::engine::BufPool::MAX_BYTES as u32).contains(m))
            .ok_or_else(|| {
                format!(
                    "--max-request must be between 64K and {}M",
                    crate::engine::BufPool::MAX_BYTES >> 20
                )
            })?;
        let mut engine = EngineConfig {
            max_payload_bytes: max_payload,
            max_inflight: self.max_inflight,
            max_conn_buffer_bytes: self.max_connection_memory.max(u64::from(max_payload)),
            max_buffer_bytes: self.max_memory,
            send_timeout: Duration::from_secs(self.send_timeout.max(1)),
            read_ahead_bytes: self.read_ahead,
            read_ahead_total_bytes: self.read_ahead_memory,
            handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
            poll: Duration::from_micros(self.poll_us.min(10_000)),
            ..EngineConfig::default()
        };
        if let Some(t) = self.threads {
            engine.threads = usize::from(t);
        }
        let pair = match (self.node, self.pair, self.peer_listen) {
            (Some(node), Some(pair), Some(peer_listen)) if !self.etcd.is_empty() => {
                for (flag, name) in [("--node", &node), ("--pair", &pair)] {
                    crate::names::validate_name(name).map_err(|e| format!("{flag}: {e}"))?;
                }
                if peer_listen.ip().is_unspecified() {
                    return Err(format!(
                        "--peer-listen {peer_listen}: give the address the other node dials, \
                         not a wildcard"
                    ));
                }
                if pool.is_none() {
                    return Err("a node of a pair serves a pool: give --data-dir".into());
                }
                Some(crate::cluster::PairConfig {
                    node,
                    pair,
                    etcd: self.etcd,
                    peer_listen,
                    peer_timeout: Duration::from_secs(self.peer_timeout.max(1)),
                    lease_ttl: Duration::from_secs(self.lease.max(1)),
                    resync_rate: self.resync_rate,
                })
            }
            _ => None,
        };
        Ok(ServeConfig {
            pair,
            pool,
            listen,
            socket: self.socket,
            exports: self.exports,
            cache: self.cache,
            max_connections: self.max_connections.max(1),
            engine,
        })
    }
}

/// Parses the command line, runs it, and turns the outcome into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STREAMER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Serve(args) => {
            let cfg = match args.into_config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("streamer serve: {e}");
                    return ExitCode::from(2);
                }
            };
            match crate::server::serve(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("streamer serve: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Image(c) => manage::image(c),
        Command::Volume(c) => manage::volume(c),
        Command::Status(c) => manage::status(c),
        Command::Check(c) => manage::check(c),
        Command::Cancel(c) => manage::cancel(c),
        Command::Pair(c) => pair::pair(c),
        Command::Ippool(c) => ippool::ippool(c),
        Command::Deploy(c) => deploy::deploy(c),
    }
}
