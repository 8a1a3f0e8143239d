//! The `streamer` command line: clap definitions, turned into subsystem configs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::engine::EngineConfig;
use crate::server::{ExportSpec, ServeConfig};
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
    /// Serve exports over NBD until SIGTERM or SIGINT.
    Serve(ServeArgs),
}

/// Default TCP address when neither --listen nor --socket is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
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
    /// I/O worker threads, one io_uring ring each (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Largest read or write request (advertised as the maximum block size), e.g. 32M.
    #[arg(long, default_value = "32M", value_parser = parse_bytes)]
    pub max_request: u64,
    /// Requests in flight per connection before the server stops reading from it.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub max_inflight: u16,
    /// Buffer memory in flight per connection before the server stops reading from it, e.g. 64M.
    #[arg(long, default_value = "64M", value_parser = parse_bytes)]
    pub max_connection_memory: u64,
    /// Connections served at once; more are accepted and closed at once.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Microseconds a busy I/O thread spins for the next request before sleeping (0: never).
    /// Trades a little CPU for much lower latency at low queue depth.
    #[arg(long, default_value_t = 50, value_name = "MICROSECONDS")]
    pub poll_us: u64,
    /// Seconds a client has to finish negotiation.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub handshake_timeout: u64,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
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
        if self.exports.is_empty() {
            return Err("nothing to serve: give at least one --export NAME=PATH".into());
        }
        let max_payload = u32::try_from(self.max_request)
            .ok()
            .filter(|m| (4096..=crate::engine::BufPool::MAX_BYTES as u32).contains(m))
            .ok_or_else(|| {
                format!(
                    "--max-request must be between 4K and {}M",
                    crate::engine::BufPool::MAX_BYTES >> 20
                )
            })?;
        let mut engine = EngineConfig {
            max_payload_bytes: max_payload,
            max_inflight: self.max_inflight,
            max_conn_buffer_bytes: self.max_connection_memory.max(u64::from(max_payload)),
            handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
            poll: Duration::from_micros(self.poll_us.min(10_000)),
            ..EngineConfig::default()
        };
        if let Some(t) = self.threads {
            engine.threads = t.clamp(1, 256);
        }
        Ok(ServeConfig {
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
    }
}
