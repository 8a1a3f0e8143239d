//! streamer: a userspace block storage server.
//!
//! ```text
//!   clients (nbd-client, qemu, libnbd, fio)
//!        |  TCP / Unix socket
//!   server/   listeners, accept, signals, exports registry, config
//!        |  hands each accepted socket to a worker
//!   engine/   one io_uring ring per thread: connections, in-flight table, buffer pool
//!        |  bytes <-> nbd/ (pure protocol)        operations -> target/
//!   nbd/      handshake, requests, replies          target/  BlockTarget trait: plans file I/O
//!                                                            (raw file today; volumes, mirrors later)
//! ```
//! Dependencies run downward: `nbd` depends on nothing; `target` only on `nbd::wire` for the one
//! error-to-errno map; `engine` drives both; `server` wires it all together.

pub mod cli;
pub mod engine;
pub mod manage;
pub mod mgmt;
pub mod names;
pub mod nbd;
pub mod node;
pub mod pool;
pub mod server;
pub mod target;
