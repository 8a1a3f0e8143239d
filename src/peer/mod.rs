//! The peer link: how the two nodes of a pair talk (`docs/pair.md`, `docs/peer-protocol.md`).
//!
//! `wire` is the protocol's bytes and nothing else, like `nbd/` for NBD: every byte from the
//! other node is decoded and checked there before anything acts on it. `link` is the control
//! link: identity (HELLO) and liveness (PING).

pub mod link;
pub mod wire;
