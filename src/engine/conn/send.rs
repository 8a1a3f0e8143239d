//! Replies and sending: every request is answered exactly once, here; replies that become ready
//! together leave in one `sendmsg`.

use std::time::Instant;

use super::{Conn, Io, MAX_SEND_IOVECS, SlotState};
use crate::engine::ring::{Submit, Tag};
use crate::nbd::NbdErrno;
use crate::nbd::reply::{ReplyBuilder, Segment};
use crate::target::{Exports, TargetError, TargetOp};

impl Conn {
    // ---- replies: every request ends here exactly once ---------------------------------------

    pub(super) fn encode(&mut self, sid: u16, f: impl FnOnce(&mut ReplyBuilder)) {
        let mode = self.mode();
        let slot = &mut self.slots[sid as usize];
        slot.header.clear();
        slot.segments.clear();
        let mut b = ReplyBuilder {
            mode,
            cookie: slot.cookie,
            offset: slot.offset,
            header: &mut slot.header,
            segments: &mut slot.segments,
        };
        f(&mut b);
    }

    pub(super) fn reply_ok(&mut self, io: &mut Io<impl Submit>, sid: u16) {
        let mode = self.mode();
        let slot = &mut self.slots[sid as usize];
        slot.header.clear();
        slot.segments.clear();
        let mut b = ReplyBuilder {
            mode,
            cookie: slot.cookie,
            offset: slot.offset,
            header: &mut slot.header,
            segments: &mut slot.segments,
        };
        if let Some(c) = &self.client {
            let counter = match (slot.read_df, &slot.op) {
                (Some(_), _) => Some(&c.read_bytes),
                (None, TargetOp::Write { .. }) => Some(&c.written_bytes),
                _ => None,
            };
            if let Some(n) = counter {
                n.fetch_add(
                    u64::from(slot.data_len),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        }
        match slot.read_df {
            Some(df) => {
                let len = slot.data_len as usize;
                let data = slot.buf.as_ref().map_or(&[][..], |buf| buf.slice(0, len));
                b.read(data, df);
            }
            None => b.ok(),
        }
        self.enqueue(io, sid);
    }

    pub(super) fn reply_target_error(
        &mut self,
        io: &mut Io<impl Submit>,
        sid: u16,
        e: &TargetError,
    ) {
        let errno = e.errno();
        tracing::warn!(conn = self.serial, errno = ?errno, "request failed: {e}");
        let message = e.to_string();
        self.reply_error(io, sid, errno, &message);
    }

    pub(super) fn reply_error(
        &mut self,
        io: &mut Io<impl Submit>,
        sid: u16,
        errno: NbdErrno,
        message: &str,
    ) {
        self.encode(sid, |b| b.error(errno, message));
        // A failed request sends no data: its buffer goes back now.
        if let Some(b) = self.slots[sid as usize].buf.take() {
            self.refund(io, b.capacity() as u64);
            io.pool.put(b);
        }
        self.enqueue(io, sid);
    }

    pub(super) fn enqueue(&mut self, io: &mut Io<impl Submit>, sid: u16) {
        if self.closing.is_some() {
            self.release(io, sid);
            return;
        }
        let slot = &mut self.slots[sid as usize];
        slot.state = SlotState::Replying;
        slot.reply_len = slot
            .segments
            .iter()
            .map(|s| match *s {
                Segment::Header { len, .. } | Segment::Data { len, .. } => len as usize,
            })
            .sum();
        slot.sent = 0;
        if self.skip_reply == Some(sid) && self.skip_bytes > 0 {
            // Sent once the rest of its payload has been discarded (`process_requests`).
            return;
        }
        self.sendq.push_back(sid);
        // Not sent yet: the worker calls `flush` once it has handled every completion of this
        // round, so replies that become ready together leave in one sendmsg.
    }

    /// Sends what is queued. Called by the worker after each round of completions.
    pub fn flush(&mut self, io: &mut Io<impl Submit>) {
        self.try_send(io);
        self.maybe_done();
    }
    // ---- sending -----------------------------------------------------------------------------

    pub(super) fn try_send(&mut self, io: &mut Io<impl Submit>) {
        if self.send_armed || self.closing.is_some() {
            return;
        }
        let ud = self.ud(Tag::Send, 0, 0);
        let fd = self.raw_fd();
        if self.out.is_empty() && !self.out_next.is_empty() {
            std::mem::swap(&mut self.out, &mut self.out_next);
        }
        if self.out_sent < self.out.len() {
            let rest = &self.out[self.out_sent..];
            // SAFETY: `out` is only swapped or cleared when no send is armed; new output goes to
            // `out_next`. So these bytes stay put until the completion.
            unsafe { io.ring.send(ud, fd, rest.as_ptr(), rest.len() as u32) };
            self.send_armed = true;
            self.send_waiting_since.get_or_insert_with(Instant::now);
            self.kernel_ops += 1;
            return;
        }
        if self.sendq.is_empty() {
            return;
        }
        self.iov.clear();
        'slots: for &sid in &self.sendq {
            let slot = &self.slots[sid as usize];
            let mut skip = slot.sent;
            for seg in &slot.segments {
                let (ptr, len) = match *seg {
                    Segment::Header { start, len } => {
                        (slot.header[start as usize..].as_ptr(), len as usize)
                    }
                    Segment::Data { start, len } => {
                        let b = slot.buf.as_ref().expect("data segment has a buffer");
                        (b.slice(start as usize, len as usize).as_ptr(), len as usize)
                    }
                };
                if skip >= len {
                    skip -= len;
                    continue;
                }
                self.iov.push(libc::iovec {
                    // The kernel only reads through this pointer (sendmsg).
                    iov_base: ptr.wrapping_add(skip) as *mut libc::c_void,
                    iov_len: len - skip,
                });
                skip = 0;
                if self.iov.len() == MAX_SEND_IOVECS {
                    break 'slots;
                }
            }
        }
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len();
        // SAFETY: `msg` is boxed and `iov` is not touched until the completion (`send_armed`);
        // every iovec points into a slot in the send queue (`Replying`: header and buffer are
        // neither modified nor released until the slot leaves the queue after this completion).
        unsafe { io.ring.sendmsg(ud, fd, &*self.msg) };
        self.send_armed = true;
        self.send_waiting_since.get_or_insert_with(Instant::now);
        self.kernel_ops += 1;
    }

    pub fn on_send(&mut self, io: &mut Io<impl Submit>, exports: &Exports, res: i32) {
        self.send_armed = false;
        if self.closing.is_some() {
            return;
        }
        if res < 0 {
            if res == -libc::EINTR || res == -libc::EAGAIN {
                self.try_send(io);
                return;
            }
            let e = std::io::Error::from_raw_os_error(-res);
            self.close(format!("send failed: {e}"));
            return;
        }
        let mut n = res as usize;
        // The client took bytes: no reply is waiting on it until the next send is armed
        // (`try_send`), so a slow reader is never taken for a dead one.
        if n > 0 {
            self.send_waiting_since = None;
        }
        if self.out_sent < self.out.len() {
            self.out_sent += n;
            if self.out_sent == self.out.len() {
                self.out.clear();
                self.out_sent = 0;
            }
        } else {
            while n > 0 {
                let sid = *self.sendq.front().expect("bytes sent imply a queued reply");
                let slot = &mut self.slots[sid as usize];
                let remaining = slot.reply_len - slot.sent;
                if n >= remaining {
                    n -= remaining;
                    self.sendq.pop_front();
                    self.release(io, sid);
                } else {
                    slot.sent += n;
                    n = 0;
                }
            }
        }
        self.try_send(io);
        if self.stalled {
            self.stalled = false;
            self.process(io, exports);
        }
        self.maybe_done();
    }
}

pub(in crate::engine) fn empty_msghdr() -> libc::msghdr {
    libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: std::ptr::null_mut(),
        msg_iovlen: 0,
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    }
}
