//! streamer's on-disk volume format: every byte of it. `SPEC.md` beside this crate is the
//! specification; the constants in `layout` are tied to it by compile-time asserts.
//!
//! No sockets, no io_uring, no threads, no `unsafe`. The pure core (`VolumeState`) plans I/O and
//! applies its completions, so an io_uring engine can drive it; `Volume` drives the same core
//! synchronously over the `Storage` trait, for management work, the checker and the tests.
#![forbid(unsafe_code)]

pub mod check;
pub mod error;
pub mod file;
pub mod image;
pub mod layout;
pub mod map;
pub mod slot;
pub mod state;
pub mod storage;
pub mod superblock;
pub mod volume;

pub use check::{CheckReport, check};
pub use error::FormatError;
pub use file::FileStorage;
pub use image::{ImageInfo, ImageRef, ImageWriter, Sealer};
pub use map::{BlockMap, BlockState};
pub use state::{Commit, Piece, VolumeState};
pub use storage::{Fate, MemFile, Storage};
pub use superblock::Superblock;
pub use volume::{Extent, Layer, Volume, VolumeError, VolumeStat, Zeroing, write_commit};
