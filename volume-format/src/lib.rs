//! streamer's on-disk volume format: every byte of it. `SPEC.md` beside this crate is the
//! specification; the constants here are tied to it by compile-time asserts.
//!
//! No sockets, no io_uring, no threads, no `unsafe`: this crate encodes, decodes, checks and plans.
//! Work in progress (issue 4): the layout constants, the superblock codec and the block map.
#![forbid(unsafe_code)]

pub mod layout;
pub mod map;
pub mod superblock;

pub use map::{BlockMap, BlockState};
pub use superblock::{FormatError, Superblock};
