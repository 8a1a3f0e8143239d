//! The peer link: how the two nodes of a pair talk (`docs/pair.md`, `docs/peer-protocol.md`).
//!
//! `wire` is the protocol's bytes and nothing else, like `nbd/` for NBD: every byte from the
//! other node is decoded and checked there before anything acts on it. `link` is the control
//! link (identity, liveness, control requests) and the dialer of the data links, which the I/O
//! workers drive (`engine/peer.rs`); `replica` applies what arrives on the peer's data links;
//! `generations` compares what the two copies of a volume hold.

pub mod control;
pub mod generations;
pub mod link;
pub mod replica;
pub mod wire;
