//! Dispatch: every complete request in the receive buffer is parsed and started on a slot, as far
//! as the connection's and the worker's limits allow; what does not fit waits (the connection
//! stops reading) until a slot or memory frees.

use super::ahead::AHEAD_MIN_BYTES;
use super::splice::Begin;
use super::{Conn, Io, Phase, SlotState};
use crate::engine::ring::Submit;
use crate::nbd::NbdErrno;
use crate::nbd::request::{self, Command, Parse, Rejection};
use crate::nbd::wire::DEFAULT_MAX_PAYLOAD_BYTES;
use crate::target::TargetOp;

impl Conn {
    /// Parses and starts every complete request in the receive buffer, as far as limits allow.
    pub(super) fn process_requests(&mut self, io: &mut Io<impl Submit>) {
        let Phase::Transmission { session, .. } = &self.phase else {
            return;
        };
        let session = *session;
        while self.closing.is_none()
            && !self.disc
            && self.payload_slot.is_none()
            && self.splice_slot.is_none()
        {
            if self.skip_bytes > 0 {
                let take = self.skip_bytes.min((self.rlen - self.rpos) as u64);
                self.rpos += take as usize;
                self.skip_bytes -= take;
                if self.skip_bytes > 0 {
                    break;
                }
            }
            if let Some(sid) = self.skip_reply.take()
                && self.slots[sid as usize].state == SlotState::Replying
            {
                // Its reply was held back (see `enqueue`); the payload is gone now.
                self.sendq.push_back(sid);
            }
            let header = match request::parse_header(&self.rbuf[self.rpos..self.rlen], session.mode)
            {
                Parse::Incomplete => break,
                Parse::BadMagic(m) => {
                    self.close(format!("bad request magic {m:#x}"));
                    return;
                }
                Parse::Header(h, n) => (h, n),
            };
            let (h, n) = header;
            let mut req = match request::decode(&h, &session) {
                Ok(r) => r,
                Err(v) => {
                    self.close(format!("protocol violation: {v}"));
                    return;
                }
            };
            if let Some(why) = self.draining
                && req.outcome != Ok(Command::Disc)
            {
                req.outcome = Err(Rejection {
                    errno: NbdErrno::Shutdown,
                    why,
                });
            }
            if let Ok(Command::Disc) = req.outcome {
                self.rpos += n;
                self.disc = true;
                self.maybe_done();
                return;
            }
            let mut sequential = false;
            if let Ok(Command::Read { offset, len, df }) = req.outcome {
                if let Some(sid) = self.claim_ahead(io, offset, len) {
                    self.rpos += n;
                    self.requests += 1;
                    self.seq_next = offset + u64::from(len);
                    let slot = &mut self.slots[sid as usize];
                    slot.cookie = req.cookie;
                    slot.read_df = Some(df);
                    if slot.state == SlotState::Parked {
                        slot.state = SlotState::Running;
                        self.serve_ahead(io, sid);
                    }
                    self.read_ahead(io, offset + u64::from(len), len);
                    continue;
                }
                // Not the range read ahead: the reader moved elsewhere or changed its size.
                self.drop_ahead(io);
                sequential = offset == self.seq_next && len >= AHEAD_MIN_BYTES;
                self.seq_next = offset + u64::from(len);
            }
            let data_len = match req.outcome {
                Ok(Command::Read { len, .. } | Command::Write { len, .. }) => len,
                _ => 0,
            };
            // A large write whose payload is all still in the socket may bypass the buffers.
            let splice = matches!(req.outcome, Ok(Command::Write { len, .. })
                if self.rlen - self.rpos == n && self.can_splice(len));
            let buf_len = if splice { 0 } else { data_len };
            let over_budget = self.buffer_bytes > 0
                && self.buffer_bytes + u64::from(buf_len) > self.max_buffer_bytes;
            // The worker's share of the node's memory (`--max-memory`): every connection waits
            // for it, even one that holds nothing, or a thousand idle ones could each take a
            // request's worth. A worker holding nothing always lets one request through.
            // Read-ahead not yet claimed has its own bound (`Io::ahead_limit`) and is let go
            // for requests, so it is not counted here.
            let requests_bytes = io.buffer_bytes.saturating_sub(io.ahead_bytes);
            let worker_full = buf_len > 0
                && requests_bytes > 0
                && requests_bytes + u64::from(buf_len) > io.buffer_limit;
            if self.free.is_empty() || over_budget || worker_full {
                // Read-ahead never keeps a request waiting: parked data is let go at once, and
                // read-aheads in flight are released when they complete (which resumes reading).
                if self.drop_ahead(io) {
                    continue;
                }
                self.stalled = true;
                // Memory another connection frees wakes this one (`Worker::wake_memory_waiters`);
                // its own slots and buffers wake it as they are released (`on_send`).
                if worker_full && !self.waiting_memory {
                    self.waiting_memory = true;
                    io.memory_waiters.push(self.cid);
                }
                break;
            }
            self.rpos += n;
            self.requests += 1;
            io.note_request(data_len);
            let sid = self.take_slot(io, req.cookie, req.offset, buf_len);
            let slot = &mut self.slots[sid as usize];
            slot.data_len = data_len;
            let cmd = match req.outcome {
                Ok(cmd) => cmd,
                Err(rejection) => {
                    tracing::debug!(conn = self.serial, why = rejection.why, "request refused");
                    self.skip_bytes = req.payload_bytes;
                    // A payload up to the spec's default maximum is one a client means to send:
                    // the reply waits for it. A larger one comes from a broken client that may
                    // never send it all, and is answered at once (and drained as it comes).
                    if (1..=u64::from(DEFAULT_MAX_PAYLOAD_BYTES)).contains(&self.skip_bytes) {
                        self.skip_reply = Some(sid);
                    }
                    self.reply_error(io, sid, rejection.errno, rejection.why);
                    continue;
                }
            };
            slot.op = match cmd {
                Command::Read { offset, len, df } => {
                    slot.read_df = Some(df);
                    TargetOp::Read { offset, len }
                }
                Command::Write { offset, len, fua } => TargetOp::Write { offset, len, fua },
                Command::Flush => TargetOp::Flush,
                Command::Trim { offset, len, fua } => TargetOp::Trim { offset, len, fua },
                Command::WriteZeroes {
                    offset,
                    len,
                    fua,
                    may_trim,
                    fast,
                } => TargetOp::Zero {
                    offset,
                    len,
                    fua,
                    may_trim,
                    fast,
                },
                Command::Cache { offset, len } => TargetOp::Cache { offset, len },
                Command::BlockStatus {
                    offset,
                    len,
                    req_one,
                } => {
                    self.block_status(io, sid, offset, len, req_one);
                    continue;
                }
                Command::Disc => unreachable!("handled above"),
            };
            // A zero-length write has no payload and no buffer: it goes straight to the target
            // (which does nothing, or only the flush a FUA asks for).
            if let Command::Write { len, .. } = cmd
                && len > 0
            {
                if splice {
                    match self.begin_splice(io, sid, len) {
                        // Nothing more is received until the payload has left the socket.
                        Begin::Spliced => break,
                        Begin::Refused => continue,
                        Begin::Buffered => {}
                    }
                }
                let slot = &mut self.slots[sid as usize];
                let avail = (self.rlen - self.rpos).min(len as usize);
                let buf = slot.buf.as_mut().expect("write has a buffer");
                buf.slice_mut(0, avail)
                    .copy_from_slice(&self.rbuf[self.rpos..self.rpos + avail]);
                self.rpos += avail;
                slot.payload_have = avail as u32;
                if avail < len as usize {
                    slot.state = SlotState::ReceivingPayload;
                    self.payload_slot = Some(sid);
                    break;
                }
            }
            self.start(io, sid);
            if sequential && let Command::Read { offset, len, .. } = cmd {
                self.read_ahead(io, offset + u64::from(len), len);
            }
        }
    }
}
