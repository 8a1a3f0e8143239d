//! Running a request on its target: the target plans a phase of I/O, the connection submits it,
//! gathers the results, and asks the target for the next phase until it says done.

use std::sync::atomic::Ordering;

use super::slot::After;
use super::{Conn, Io, SlotState};
use crate::engine::ring::{Submit, Tag, UserData};
use crate::nbd::NbdErrno;
use crate::nbd::wire::META_BASE_ALLOCATION_ID;
use crate::target::{FileIo, MAX_PLAN_IOS, Progress, TargetOp};

/// Most extents in one block status reply (the spec asks for at most 2^20).
const MAX_EXTENTS: usize = 16 * 1024;

impl Conn {
    // ---- running requests --------------------------------------------------------------------

    pub(super) fn start(&mut self, io: &mut Io<impl Submit>, sid: u16) {
        let target = self.target();
        let slot = &mut self.slots[sid as usize];
        slot.state = SlotState::Running;
        if std::mem::take(&mut slot.planned) {
            self.submit_plan(io, sid);
            return;
        }
        slot.plan.begin();
        match target.plan(&slot.op, &mut slot.plan) {
            Ok(()) => self.submit_plan(io, sid),
            // A read-ahead has no request to answer (unless claimed, and then it is retried as
            // the client's own READ, which answers the error).
            Err(_) if slot.ahead.is_some() => self.ahead_done(io, sid, false),
            Err(e) => self.reply_target_error(io, sid, &e),
        }
    }

    pub(super) fn submit_plan(&mut self, io: &mut Io<impl Submit>, sid: u16) {
        let slot = &mut self.slots[sid as usize];
        let n = slot.plan.len();
        if n == 0 {
            self.phase_done(io, sid);
            return;
        }
        slot.pending = n;
        slot.results = [0; MAX_PLAN_IOS];
        // Zero fills need no kernel: done here, before anything is handed to the ring.
        for i in 0..n {
            if let Some(&FileIo::Zero { buf_start, len }) = slot.plan.get(i) {
                if let Some(b) = slot.buf.as_mut() {
                    b.slice_mut(buf_start as usize, len as usize).fill(0);
                }
                slot.results[i] = len as i32;
                slot.pending -= 1;
            }
        }
        if slot.pending == 0 {
            self.phase_done(io, sid);
            return;
        }
        let buf = slot.buf_ptr();
        let cid = self.cid;
        // Peer I/O goes to the worker's peer link of its kind; without one it fails at once.
        let mut file_ios = slot.pending;
        for i in 0..n {
            if let Some(FileIo::Peer(op)) = slot.plan.get(i) {
                file_ios -= 1;
                let ud = UserData::new(Tag::Io, cid, sid, i as u16);
                // SAFETY: the slot keeps its buffer (and stays `Running`) until this I/O's
                // completion is delivered, which the link does only after its send completed.
                let queued = io.peers[usize::from(op.forwarded)]
                    .as_mut()
                    .is_some_and(|p| unsafe { p.submit(ud, op, buf) });
                if queued {
                    self.kernel_ops += 1;
                } else {
                    slot.results[i] = -libc::ENOTCONN;
                    slot.pending -= 1;
                }
            }
        }
        if slot.pending == 0 {
            self.phase_done(io, sid);
            return;
        }
        if file_ios == 0 {
            return;
        }
        let plan = &slot.plan;
        let ios = plan
            .ios()
            .enumerate()
            .filter(|(_, file_io)| !matches!(file_io, FileIo::Zero { .. } | FileIo::Peer(_)))
            .map(|(i, file_io)| {
                let ud = UserData::new(Tag::Io, cid, sid, i as u16);
                (ud, file_io, plan.linked(i))
            });
        // SAFETY: the slot owns `buf` and stays `Running` (its buffer untouched and not released)
        // until every I/O of the plan has completed; the target, which owns the file descriptors,
        // is kept alive by `self.phase` for the connection's whole life.
        unsafe { io.ring.file_ios(ios, buf) };
        self.kernel_ops += file_ios as u32;
    }

    pub fn on_io(&mut self, io: &mut Io<impl Submit>, sid: u16, sub: u16, res: i32) {
        let slot = &mut self.slots[sid as usize];
        let i = sub as usize;
        let res = match slot.after_io(i, res) {
            After::Final(res) => res,
            After::Resubmit(rest) => {
                let buf = slot.buf_ptr();
                let ud = UserData::new(Tag::Io, self.cid, sid, sub);
                // SAFETY: as in `submit_plan`: the slot keeps its buffer until every completion.
                unsafe { io.ring.file_ios(std::iter::once((ud, &rest, false)), buf) };
                self.kernel_ops += 1;
                return;
            }
        };
        slot.results[i] = res;
        slot.pending -= 1;
        if slot.pending == 0 {
            self.phase_done(io, sid);
        }
    }

    pub(super) fn phase_done(&mut self, io: &mut Io<impl Submit>, sid: u16) {
        let target = self.target();
        let slot = &mut self.slots[sid as usize];
        let n = slot.plan.len();
        let results = slot.results;
        let outcome = target.complete(&slot.op, &mut slot.plan, &results[..n]);
        if !matches!(outcome, Ok(Progress::Again))
            && matches!(
                slot.op,
                TargetOp::Write { .. } | TargetOp::Trim { .. } | TargetOp::Zero { .. }
            )
            && let Some(changes) = target.change_count()
        {
            // Counted before the reply leaves (even for a failure, which may have changed part
            // of the range): a read-ahead issued before this point is not served after it.
            changes.fetch_add(1, Ordering::AcqRel);
        }
        if slot.ahead.is_some() {
            let ok = matches!(outcome, Ok(Progress::Done));
            if ok || outcome.is_err() {
                self.ahead_done(io, sid, ok);
                return;
            }
        }
        match outcome {
            Ok(Progress::Done) => self.reply_ok(io, sid),
            Ok(Progress::Again) => self.submit_plan(io, sid),
            Err(e) => self.reply_target_error(io, sid, &e),
        }
    }

    pub(super) fn block_status(
        &mut self,
        io: &mut Io<impl Submit>,
        sid: u16,
        offset: u64,
        len: u64,
        req_one: bool,
    ) {
        let target = self.target();
        // A chunk's variable part must fit the advertised maximum payload: at most 16 bytes per
        // descriptor (extended), after an 8-byte context id and count.
        let fit = (self.max_payload_bytes.saturating_sub(8) / 16).max(1) as usize;
        let max = if req_one { 1 } else { MAX_EXTENTS.min(fit) };
        let mut extents = std::mem::take(&mut self.extents);
        extents.clear();
        let result = target.block_status(offset, len, max, &mut extents);
        match result {
            Ok(()) if !extents.is_empty() => {
                if req_one {
                    extents.truncate(1);
                    extents[0].0 = extents[0].0.min(len);
                }
                self.encode(sid, |b| b.block_status(META_BASE_ALLOCATION_ID, &extents));
                self.enqueue(io, sid);
            }
            Ok(()) => self.reply_error(io, sid, NbdErrno::Inval, "empty range"),
            Err(e) => self.reply_target_error(io, sid, &e),
        }
        self.extents = extents;
    }
}
