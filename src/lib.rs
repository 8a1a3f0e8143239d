//! streamer: a userspace block storage server.
//!
//! ```text
//!   clients (nbd-client, qemu, libnbd, fio)           operators: `streamer image|volume|...`
//!        |  TCP / Unix socket                               |  cli/ (clap; manage.rs speaks mgmt/)
//!   server/   listeners, accept, signals, config            v
//!        |  hands each accepted socket to a worker      mgmt/   management socket: protocol,
//!   engine/   one io_uring ring per thread: connections,         server (SO_PEERCRED, jobs), client
//!        |    in-flight slots, buffer budget, the data           |
//!        |    and forwarding links to the peer (peer.rs)         |
//!        |  bytes <-> nbd/ (pure protocol)                       v
//!        |  operations -> target/                        node/   the pool and its exports kept in
//!   nbd/      handshake, requests, replies                       step; long commands as jobs
//!   target/   BlockTarget: raw files, pool volumes, the           |
//!             pair's mirror, the other node's export     pool/   images and volumes on disk, by
//!             (forward.rs: changes to the owner), a              directory descriptor
//!             moved volume's role switch (pair.rs),
//!             the export list; blocking.rs runs a plan
//!             without a ring (the replica side, forwarded operations on the owner); the
//!             mirror's activity log (activity.rs)
//!   peer/     the pair's link between nodes: its wire format (docs/peer-protocol.md), the
//!             control link and dialer (link.rs), the replica side of data links and the owner
//!             side of forwarding links (replica.rs, link.rs),
//!             the copies' generation identifiers and their verdict (generations.rs)
//!   cluster/  the pair's shared state in etcd: members, presence, volume, replica and image
//!             records
//!   node/     ... and, on a pair: pair volumes on both nodes (replicas.rs), degrade and resync
//!             threads (resync.rs), promote/move/resolve (promote.rs), the copies'
//!             generations compared (generations.rs), verify, images on both nodes, an
//!             existing pool joining (adopt.rs)
//!   personality/ servers' personalities as validated data, rendered for cloud-init; IP pools;
//!             deployment plans (plan.rs), applied by node/deploy.rs
//!   volume-format/ (own crate): every on-disk byte of images and volumes; SPEC.md beside it
//! ```
//! Dependencies run downward: `nbd` depends on nothing; `target` only on `nbd::wire` for the one
//! error-to-errno map and on `volume-format`; `engine` drives `nbd` and `target`; `pool` owns the
//! files, `node` the objects and their exports, `mgmt` the socket in front of `node`; `server`
//! wires it all together and `cli` turns the command line into its config.

pub mod cli;
pub mod cluster;
pub mod engine;
pub mod mgmt;
pub mod names;
pub mod nbd;
pub mod node;
pub mod peer;
pub mod personality;
pub mod pool;
pub mod server;
pub mod target;
