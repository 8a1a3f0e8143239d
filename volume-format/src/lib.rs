//! streamer's on-disk volume format: every byte of it. `SPEC.md` beside this crate is the
//! specification; the constants here are tied to it by compile-time asserts.
//!
//! No sockets, no io_uring, no threads, no `unsafe`: this crate encodes, decodes, checks and plans.
//! Work in progress (issue 4): layout constants, the superblock codec, the block map, and the
//! storage trait with an in-memory file that simulates power cuts and faults.
#![forbid(unsafe_code)]

pub mod layout;
pub mod map;
pub mod storage;
pub mod superblock;

pub use map::{BlockMap, BlockState};
pub use storage::{Fate, MemFile, Storage};
pub use superblock::{FormatError, Superblock};
