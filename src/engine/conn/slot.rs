//! One request in flight: its state, buffer, plan and reply, and how a completion of one of its
//! I/Os is accounted (a short transfer resumes where it stopped).

use super::splice::Splice;
use crate::engine::bufpool::Buf;
use crate::nbd::reply::Segment;
use crate::target::{FileIo, MAX_PLAN_IOS, Plan, TargetOp};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SlotState {
    Free,
    /// A write whose payload is still arriving.
    ReceivingPayload,
    /// Target I/O in flight.
    Running,
    /// Reply encoded, waiting for or in the send queue.
    Replying,
    /// A read-ahead that completed before the client asked for its range: the data waits here.
    Parked,
}

/// A slot reading ahead of a sequential reader (see `Conn::read_ahead`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Ahead {
    /// The target's change count when the read was issued: the data may be served only while
    /// the count is unchanged.
    pub(super) changes: u64,
    /// The connection's read-ahead epoch when issued; an older epoch means the window was dropped
    /// and the slot is released when its read completes.
    pub(super) epoch: u64,
    /// The client's READ of this range has arrived and owns the slot (its cookie is set).
    pub(super) claimed: bool,
}

/// Reply-header capacity a free slot keeps (see `Slot::header`): a simple or structured reply
/// header, or a block status reply of a few hundred extents.
pub(super) const HEADER_KEEP_BYTES: usize = 4096;

/// One request in flight.
pub(super) struct Slot {
    pub(super) state: SlotState,
    pub(super) cookie: u64,
    pub(super) offset: u64,
    pub(super) op: TargetOp,
    pub(super) read_df: Option<bool>,
    /// Set while the slot is a read-ahead (no request of its own until claimed).
    pub(super) ahead: Option<Ahead>,
    pub(super) buf: Option<Buf>,
    /// Data bytes of the request (read length or write payload).
    pub(super) data_len: u32,
    pub(super) payload_have: u32,
    pub(super) plan: Plan,
    /// The plan was made before the payload arrived (a splice candidate): `start` submits it
    /// as it is.
    pub(super) planned: bool,
    pub(super) splice: Option<Splice>,
    pub(super) pending: usize,
    pub(super) results: [i32; MAX_PLAN_IOS],
    /// Reply headers and metadata (a block status reply's extents: up to 256 KiB). Kept for
    /// the next request up to `HEADER_KEEP_BYTES`; a larger one is let go when the slot is, so
    /// a connection does not hold 128 slots' worth of its largest replies.
    pub(super) header: Vec<u8>,
    pub(super) segments: Vec<Segment>,
    pub(super) reply_len: usize,
    pub(super) sent: usize,
}

impl Slot {
    pub(super) fn new() -> Slot {
        Slot {
            state: SlotState::Free,
            cookie: 0,
            offset: 0,
            op: TargetOp::Flush,
            read_df: None,
            ahead: None,
            buf: None,
            data_len: 0,
            payload_have: 0,
            plan: Plan::default(),
            planned: false,
            splice: None,
            pending: 0,
            results: [0; MAX_PLAN_IOS],
            header: Vec::with_capacity(64),
            segments: Vec::with_capacity(4),
            reply_len: 0,
            sent: 0,
        }
    }

    pub(super) fn buf_ptr(&mut self) -> *mut u8 {
        self.buf
            .as_mut()
            .map_or(std::ptr::null_mut(), Buf::as_mut_ptr)
    }

    /// Accounts for a completion of plan I/O `i`: a short read or write resumes where it stopped.
    #[inline]
    pub(super) fn after_io(&mut self, i: usize, res: i32) -> After {
        let Some(file_io) = self.plan.get_mut(i) else {
            return After::Final(res);
        };
        // Reads and writes resume a short transfer where it stopped; a zero write has no
        // request-buffer position to move.
        let (is_read, offset, buf_start, len) = match file_io {
            FileIo::Read {
                offset,
                buf_start,
                len,
                ..
            } => (true, offset, Some(buf_start), len),
            FileIo::Write {
                offset,
                buf_start,
                len,
                ..
            } => (false, offset, Some(buf_start), len),
            FileIo::WriteZeroes { offset, len, .. } => (false, offset, None, len),
            _ => return After::Final(res),
        };
        if res < 0 || res as u32 >= *len {
            return After::Final(res);
        }
        if res == 0 {
            let Some(start) = buf_start.filter(|_| is_read) else {
                return After::Final(-libc::EIO); // a write that makes no progress
            };
            // End of file inside the export (the file shrank): the rest reads as zeroes.
            let (start, n) = (*start as usize, *len as usize);
            if let Some(b) = self.buf.as_mut() {
                b.slice_mut(start, n).fill(0);
            }
            return After::Final(0);
        }
        let done = res as u32;
        *offset += u64::from(done);
        if let Some(b) = buf_start {
            *b += done;
        }
        *len -= done;
        After::Resubmit(*file_io)
    }
}

pub(super) enum After {
    Final(i32),
    Resubmit(FileIo),
}
