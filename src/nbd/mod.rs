//! The NBD wire protocol, pure: bytes in, decisions and bytes out. No sockets, no I/O, no clocks,
//! so every parser here can be unit-tested and fuzzed on raw bytes.
//!
//! - `wire`: the numbers of the protocol.
//! - `handshake`: fixed-newstyle option negotiation, ending in an export or a close.
//! - `request`: transmission request headers, validation, the error each bad request gets.
//! - `reply`: simple, structured and extended replies as header bytes plus data segments.

pub mod handshake;
pub mod reply;
pub mod request;
pub mod wire;

pub use handshake::{ExportInfo, ExportLookup, Handshake, Negotiated, ReplyMode, Step};
pub use reply::{ReplyBuilder, Segment};
pub use request::{Command, Parse, Rejection, Request, RequestHeader, Session, Violation};
pub use wire::NbdErrno;
