//! Receiving: the one receive a connection keeps armed (into the receive buffer, or straight
//! into a write's buffer for the rest of its payload), and the negotiation phase it feeds.

use std::time::Instant;

use super::{Conn, Io, Phase};
use crate::engine::ring::{Submit, Tag};
use crate::nbd::handshake::Step;
use crate::nbd::request::{self, Session};
use crate::target::Exports;

/// A write payload at least this large that was received straight into its buffer makes the next
/// receive into `rbuf` take one request header only (see `Conn::header_only`).
const LARGE_PAYLOAD_BYTES: u32 = 64 * 1024;

impl Conn {
    pub(super) fn arm_recv(&mut self, io: &mut Io<impl Submit>) {
        if self.recv_armed
            || self.closing.is_some()
            || self.disc
            || self.stalled
            || self.splice_slot.is_some()
        {
            return;
        }
        if self.close_after_send.is_some() {
            return;
        }
        let ud = self.ud(Tag::Recv, 0, 0);
        let fd = self.raw_fd();
        if let Some(sid) = self.payload_slot {
            let slot = &mut self.slots[sid as usize];
            let have = slot.payload_have as usize;
            let want = (slot.data_len - slot.payload_have) as usize;
            let ptr = slot
                .buf
                .as_mut()
                .expect("write slot has a buffer")
                .as_mut_ptr();
            // SAFETY: `have + want <= data_len <= capacity`; the buffer is owned by the slot, which
            // stays in `ReceivingPayload` (untouched) until this receive completes.
            unsafe { io.ring.recv(ud, fd, ptr.add(have), want as u32) };
        } else {
            if self.rpos > 0 {
                self.rbuf.copy_within(self.rpos..self.rlen, 0);
                self.rlen -= self.rpos;
                self.rpos = 0;
            }
            let mut free = self.rbuf.len() - self.rlen;
            debug_assert!(
                free > 0,
                "the receive buffer always has room for a header or option"
            );
            if self.header_only
                && self.rlen == 0
                && let Phase::Transmission { session, .. } = &self.phase
            {
                free = request::header_bytes(session.mode);
            }
            let ptr = self.rbuf[self.rlen..].as_mut_ptr();
            // SAFETY: `rbuf` is a heap buffer never resized; nothing touches `rbuf[rlen..]` until
            // the receive completes (`recv_armed` guards re-arming and compaction).
            unsafe { io.ring.recv(ud, fd, ptr, free as u32) };
        }
        self.recv_armed = true;
        self.kernel_ops += 1;
        // The wait for the client's bytes starts now: time the connection spent stalled on the
        // server's side (no slot, no memory) is not the client's.
        self.last_received = Instant::now();
    }

    pub fn on_recv(&mut self, io: &mut Io<impl Submit>, exports: &Exports, res: i32) {
        self.recv_armed = false;
        if self.closing.is_some() {
            return;
        }
        if res > 0 {
            self.last_received = Instant::now();
        }
        if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                self.arm_recv(io);
            } else {
                let e = std::io::Error::from_raw_os_error(-res);
                self.close(format!("receive failed: {e}"));
            }
            return;
        }
        if res == 0 {
            let reason = match (&self.phase, self.payload_slot.is_some()) {
                (Phase::Handshake(_), _) => "client disconnected during negotiation",
                (_, true) => "client disconnected in the middle of a write payload",
                _ => "client disconnected",
            };
            self.close(reason.into());
            return;
        }
        let n = res as usize;
        if let Some(sid) = self.payload_slot {
            let slot = &mut self.slots[sid as usize];
            slot.payload_have += n as u32;
            if slot.payload_have == slot.data_len {
                self.header_only = slot.data_len >= LARGE_PAYLOAD_BYTES;
                self.payload_slot = None;
                self.start(io, sid);
            }
        } else {
            self.rlen += n;
            self.header_only = false;
        }
        self.process(io, exports);
    }

    pub(super) fn process(&mut self, io: &mut Io<impl Submit>, exports: &Exports) {
        if let Phase::Handshake(hs) = &mut self.phase {
            let (used, step) = hs.advance(
                &self.rbuf[self.rpos..self.rlen],
                exports,
                &mut self.out_next,
            );
            self.rpos += used;
            if let Some(name) = hs.take_unknown_export() {
                tracing::info!(
                    conn = self.serial,
                    peer = %self.peer,
                    "client asked for unknown export {name}"
                );
            }
            // An idle timeout, not a total one: a client listing many exports one option at a
            // time (nbdinfo --list) keeps going as long as each option arrives in time. The
            // number of options is bounded by the handshake itself (MAX_OPTIONS).
            if used > 0 && !hs.shutting_down() {
                self.deadline = Some(Instant::now() + self.handshake_timeout);
            }
            // Replies the client has not read yet paused the handshake: nothing more is received
            // until a send completes and resumes it (`on_send`).
            let mut paused = false;
            match step {
                Step::NeedMore => {}
                Step::Paused => paused = true,
                Step::Close(reason) => {
                    self.close_after_send = Some(format!("negotiation ended: {reason}"));
                }
                Step::Transmission(neg) => {
                    let session = Session {
                        mode: neg.mode,
                        transmission_flags: neg.transmission_flags,
                        size_bytes: neg.info.size_bytes,
                        max_payload_bytes: self.max_payload_bytes,
                        base_allocation: neg.base_allocation,
                        block_min: neg.block_min,
                        sizes_agreed: neg.sizes_agreed,
                    };
                    tracing::info!(
                        conn = self.serial,
                        peer = %self.peer,
                        export = %neg.export_name,
                        mode = ?neg.mode,
                        base_allocation = neg.base_allocation,
                        "connection opened"
                    );
                    self.deadline = None;
                    self.client =
                        Some(exports.client_opened(self.serial, &self.peer, &neg.export_name));
                    neg.export.attach();
                    self.phase = Phase::Transmission {
                        session,
                        target: neg.export,
                        export: neg.export_name,
                    };
                }
            }
            self.try_send(io);
            if self.close_after_send.is_some() {
                self.maybe_done();
                return;
            }
            if paused {
                self.stalled = true;
            }
        }
        if matches!(self.phase, Phase::Transmission { .. }) {
            self.process_requests(io);
        }
        self.arm_recv(io);
    }
}
