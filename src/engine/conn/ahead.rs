//! Read-ahead of sequential readers, on targets that offer a change count.

use std::sync::atomic::Ordering;

use super::slot::Ahead;
use super::{Conn, Io, Phase, SlotState};
use crate::engine::ring::Submit;
use crate::target::TargetOp;

/// Reads at least this large that follow each other start read-ahead (see `Conn::read_ahead`).
pub(super) const AHEAD_MIN_BYTES: u32 = 128 * 1024;

impl Conn {
    // ---- read-ahead --------------------------------------------------------------------------
    //
    // In direct mode nothing reads ahead of a sequential reader (the page cache is bypassed), and
    // a client at a fixed depth leaves the disk idle while replies travel and new requests come
    // back. When READs of at least `AHEAD_MIN_BYTES` follow each other, the connection reads the
    // next ranges of the same size into slots of their own, up to `--read-ahead` bytes ahead,
    // within half of its slots, half of its buffer budget and what is left of the worker's
    // read-ahead memory (`Io::ahead_limit`, shared by all its connections). A READ of exactly
    // such a range claims the slot and is answered from it (at once if the data is in, or when it
    // arrives); any other READ drops the window. Data is served only if the target's change count has not
    // moved since the read was issued; otherwise the range is read again, so a write that
    // completed (on any connection) before a READ is always seen by it.

    /// Reads ahead of a sequential reader whose next READ starts at `from`, in pieces of `len`.
    pub(super) fn read_ahead(&mut self, io: &mut Io<impl Submit>, from: u64, len: u32) {
        let (target, size) = match &self.phase {
            Phase::Transmission {
                target, session, ..
            } => (target.clone(), session.size_bytes),
            Phase::Handshake(_) => return,
        };
        let Some(changes) = target.change_count() else {
            return;
        };
        if self.draining.is_some() || self.disc || self.closing.is_some() {
            return;
        }
        let changes = changes.load(Ordering::Acquire);
        let step = u64::from(len);
        let mut pos = from.max(self.ahead_end);
        while self.ahead_bytes + step <= self.ahead_window
            && io.ahead_bytes + step <= io.ahead_limit
            && pos + step <= size
            && self.free.len() > self.slots.len() / 2
            && self.buffer_bytes + step <= self.max_buffer_bytes / 2
        {
            let sid = self.take_slot(io, 0, pos, len);
            let slot = &mut self.slots[sid as usize];
            slot.ahead = Some(Ahead {
                changes,
                epoch: self.ahead_epoch,
                claimed: false,
            });
            slot.op = TargetOp::Read { offset: pos, len };
            self.count_ahead(io, step, true);
            pos += step;
            self.ahead_end = pos;
            self.start(io, sid);
            // A target that refuses at once (latched or withdrawn) frees the slot again, which
            // would let this loop walk the whole export.
            if self.slots[sid as usize].state == SlotState::Free {
                break;
            }
        }
    }

    /// The unclaimed read-ahead of exactly this range, now claimed by the client's READ.
    pub(super) fn claim_ahead(
        &mut self,
        io: &mut Io<impl Submit>,
        offset: u64,
        len: u32,
    ) -> Option<u16> {
        if self.ahead_slots == 0 {
            return None;
        }
        let epoch = self.ahead_epoch;
        let sid = self.slots.iter().position(|s| {
            s.offset == offset
                && s.data_len == len
                && s.ahead.is_some_and(|a| !a.claimed && a.epoch == epoch)
        })?;
        self.ahead_served += 1;
        let slot = &mut self.slots[sid];
        if let Some(a) = slot.ahead.as_mut() {
            a.claimed = true;
        }
        if slot.state == SlotState::Parked {
            self.parked -= 1;
        }
        self.count_ahead(io, u64::from(len), false);
        Some(sid as u16)
    }

    /// Counts one unclaimed read-ahead of `bytes` in or out, on the connection and on its worker
    /// (whose total is the sum over its connections).
    pub(super) fn count_ahead(&mut self, io: &mut Io<impl Submit>, bytes: u64, add: bool) {
        if add {
            self.ahead_slots += 1;
            self.ahead_bytes += bytes;
            io.ahead_bytes += bytes;
        } else {
            self.ahead_slots -= 1;
            self.ahead_bytes -= bytes;
            io.ahead_bytes -= bytes;
        }
    }

    /// Drops the read-ahead window: parked data is released now, reads in flight when they
    /// complete. Returns whether a slot was freed.
    pub(super) fn drop_ahead(&mut self, io: &mut Io<impl Submit>) -> bool {
        // The next window starts from the reader's next READ, even when nothing is outstanding:
        // a reader that read ahead up to the end of the export and wrapped to its start would
        // otherwise find the old end still in place and get no read-ahead again.
        self.ahead_end = 0;
        if self.ahead_slots == 0 {
            return false;
        }
        self.ahead_epoch += 1;
        self.ahead_slots = 0;
        io.ahead_bytes -= self.ahead_bytes;
        self.ahead_bytes = 0;
        let mut freed = false;
        for sid in 0..self.slots.len() {
            if self.slots[sid].state == SlotState::Parked {
                self.slots[sid].ahead = None;
                self.parked -= 1;
                self.release(io, sid as u16);
                freed = true;
            }
        }
        freed
    }

    /// A read-ahead's read completed (`ok`: without error).
    pub(super) fn ahead_done(&mut self, io: &mut Io<impl Submit>, sid: u16, ok: bool) {
        let a = self.slots[sid as usize].ahead.expect("a read-ahead slot");
        if a.claimed {
            if ok {
                self.serve_ahead(io, sid);
            } else {
                // The client's READ gets the real error: read the range again as its own.
                self.slots[sid as usize].ahead = None;
                self.start(io, sid);
            }
            return;
        }
        let current = a.epoch == self.ahead_epoch;
        if ok && current && !self.disc && self.draining.is_none() && self.closing.is_none() {
            self.slots[sid as usize].state = SlotState::Parked;
            self.parked += 1;
            return;
        }
        if current {
            let len = u64::from(self.slots[sid as usize].data_len);
            self.count_ahead(io, len, false);
        }
        self.slots[sid as usize].ahead = None;
        self.release(io, sid);
        if self.stalled && self.closing.is_none() {
            self.stalled = false;
            self.process_requests(io);
            self.arm_recv(io);
        }
    }

    /// Answers a claimed read-ahead whose data is in, if nothing changed since it was read.
    pub(super) fn serve_ahead(&mut self, io: &mut Io<impl Submit>, sid: u16) {
        let target = self.target();
        let slot = &mut self.slots[sid as usize];
        let issued = slot.ahead.take().map(|a| a.changes);
        let now = target.change_count().map(|c| c.load(Ordering::Acquire));
        if issued.is_some() && issued == now {
            self.reply_ok(io, sid);
        } else {
            self.start(io, sid);
        }
    }
}
