//! A worker's end of the data link to the pair's other node (`docs/pair.md` §1, §3).
//!
//! Each I/O worker has at most one TCP connection to the peer, already introduced (HELLO) by
//! the link's dialer thread and handed over through the worker's inbox. Targets reach it with
//! a [`FileIo::Peer`](crate::target::FileIo::Peer) in their plan: the connection asks
//! [`PeerChan::submit`] to send the frame (header and, for a write, the payload straight from
//! the request's buffer), and the worker routes the peer's reply back to the request as that
//! I/O's completion. Everything runs on the worker's ring: no thread hand-off on the write path.
//!
//! Memory: a frame's payload is the request's buffer, which the request holds until its peer
//! I/O completes; that completion is delivered only once the reply arrived **and** the
//! `sendmsg` that carried the frame completed (the kernel reads the buffer until then). The
//! frames' headers and the iovecs of the `sendmsg` in flight live here and are not touched
//! until its completion.
//!
//! Failure: a malformed or unexpected reply, a send or receive error, or a reply that does not
//! come within the peer timeout kills the link. Every frame waiting for an answer then completes
//! with an error (`ETIMEDOUT` or `ENOTCONN`), the socket is shut down, and once the kernel gave
//! back everything it held the channel is dropped; the dialer makes a new one.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::ring::{Submit, Tag, UserData};
use crate::peer::wire::{FLAG_NOT_ON_REPLICA, HEADER_BYTES, Header};
use crate::target::{PeerIo, PeerOp};

/// Receive buffer: replies are bare headers, so this holds hundreds.
const RECV_BYTES: usize = 64 * 1024;
/// Most frames gathered into one `sendmsg` (each is a header and at most one payload).
const MAX_FRAMES_PER_SEND: usize = 128;

/// A link handed to a worker: the connected socket, and the flag it clears when the link is
/// gone (the dialer then makes a new one).
pub struct PeerSocket {
    pub fd: OwnedFd,
    pub up: Arc<AtomicBool>,
    pub timeout: Duration,
    /// A forwarding link (operations this node's clients asked of a volume the peer owns),
    /// not a link carrying this node's mirrored operations.
    pub forward: bool,
}

struct Frame {
    header: [u8; HEADER_BYTES],
    payload: *const u8,
    payload_len: u32,
}

struct Pending {
    /// The request's I/O this frame is: its completion goes there.
    ud: UserData,
    /// The `sendmsg` that carried the frame completed (the kernel no longer reads its payload).
    sent: bool,
    reply: Option<i32>,
    since: Instant,
}

pub(super) struct PeerChan {
    /// Which of the worker's links this is (in its completions' `user_data`): a new link may
    /// start while an old one still waits for the kernel to give its buffers back.
    pub id: u32,
    fd: OwnedFd,
    up: Arc<AtomicBool>,
    timeout: Duration,
    queue: VecDeque<(u64, Frame)>,
    /// The frames of the `sendmsg` in flight (by cookie), its iovecs and header; the kernel's
    /// until its completion.
    sending: Vec<(u64, Frame)>,
    iov: Vec<libc::iovec>,
    /// Boxed: the channel moves (into the worker's retired list) while a `sendmsg` naming
    /// this header may still wait in the submission queue.
    msg: Box<libc::msghdr>,
    /// Bytes of the `sending` frames already sent (a short send resumes there).
    sent_bytes: usize,
    send_in_flight: bool,
    recv_buf: Box<[u8]>,
    recv_have: usize,
    recv_in_flight: bool,
    outstanding: HashMap<u64, Pending>,
    next_cookie: u64,
    /// Why the link is dead; nothing new is sent once it is.
    dead: Option<String>,
    /// The errno frames fail with once it is: `ENOTCONN`, or `ETIMEDOUT` after a timeout.
    fail_with: i32,
}

impl PeerChan {
    pub fn new(id: u32, s: PeerSocket) -> PeerChan {
        PeerChan {
            id,
            fd: s.fd,
            up: s.up,
            timeout: s.timeout,
            queue: VecDeque::new(),
            sending: Vec::new(),
            iov: Vec::with_capacity(2 * MAX_FRAMES_PER_SEND),
            msg: Box::new(super::conn::empty_msghdr()),
            sent_bytes: 0,
            send_in_flight: false,
            recv_buf: vec![0u8; RECV_BYTES].into_boxed_slice(),
            recv_have: 0,
            recv_in_flight: false,
            outstanding: HashMap::new(),
            next_cookie: 0,
            dead: None,
            fail_with: libc::ENOTCONN,
        }
    }

    pub fn is_dead(&self) -> bool {
        self.dead.is_some()
    }

    /// The kernel holds nothing of this channel: it may be dropped (once dead).
    pub fn is_idle(&self) -> bool {
        !self.send_in_flight && !self.recv_in_flight
    }

    /// Starts receiving replies.
    pub fn begin(&mut self, ring: &mut impl Submit) {
        self.arm_recv(ring);
    }

    fn arm_recv(&mut self, ring: &mut impl Submit) {
        if self.recv_in_flight || self.dead.is_some() {
            return;
        }
        let free = &mut self.recv_buf[self.recv_have..];
        let ud = UserData::new(Tag::PeerRecv, self.id, 0, 0);
        // SAFETY: `recv_buf` is owned by this channel, which is dropped only when `is_idle`
        // (no receive in flight); nothing reads or writes its free part meanwhile.
        unsafe {
            ring.recv(
                ud,
                self.fd.as_raw_fd(),
                free.as_mut_ptr(),
                free.len() as u32,
            )
        };
        self.recv_in_flight = true;
    }

    /// Queues `op` for request I/O `ud`, its payload (a write's) at `buf + op.buf_start`.
    /// Returns false when the link is dead: the caller completes the I/O with `ENOTCONN`.
    ///
    /// # Safety
    /// For a write, `buf + buf_start .. + len` must stay valid and unmodified until this I/O's
    /// completion is delivered (the request keeps its buffer while the I/O is counted in
    /// flight).
    pub unsafe fn submit(&mut self, ud: UserData, op: &PeerIo, buf: *const u8) -> bool {
        if self.dead.is_some() {
            return false;
        }
        self.next_cookie += 1;
        let cookie = self.next_cookie;
        let (h, payload, payload_len) = if op.op == PeerOp::Write {
            assert!(
                !buf.is_null() && op.len > 0,
                "a peer write without a payload"
            );
            let len = u32::try_from(op.len).expect("a write payload fits the request buffer");
            // SAFETY: in bounds of the request buffer, by the caller's contract.
            let p = unsafe { buf.add(op.buf_start as usize) };
            // SAFETY: as above; read only, while the request holds the buffer.
            let bytes = unsafe { std::slice::from_raw_parts(p, len as usize) };
            (Header::data_request(op, cookie, bytes), p, len)
        } else {
            (Header::data_request(op, cookie, &[]), std::ptr::null(), 0)
        };
        self.queue.push_back((
            cookie,
            Frame {
                header: h.encode(),
                payload,
                payload_len,
            },
        ));
        self.outstanding.insert(
            cookie,
            Pending {
                ud,
                sent: false,
                reply: None,
                since: Instant::now(),
            },
        );
        true
    }

    /// Sends what is queued, gathered into one `sendmsg`, unless one is in flight (the next
    /// goes when it completes: a stream's bytes must not interleave).
    pub fn flush(&mut self, ring: &mut impl Submit) {
        if self.send_in_flight || self.dead.is_some() || self.queue.is_empty() {
            return;
        }
        debug_assert!(self.sending.is_empty());
        while self.sending.len() < MAX_FRAMES_PER_SEND {
            let Some(f) = self.queue.pop_front() else {
                break;
            };
            self.sending.push(f);
        }
        self.sent_bytes = 0;
        self.submit_send(ring);
    }

    fn submit_send(&mut self, ring: &mut impl Submit) {
        self.iov.clear();
        let mut skip = self.sent_bytes;
        for (_, f) in &self.sending {
            let parts: [(*const u8, usize); 2] = [
                (f.header.as_ptr(), HEADER_BYTES),
                (f.payload, f.payload_len as usize),
            ];
            for (p, n) in parts {
                if n == 0 {
                    continue;
                }
                if skip >= n {
                    skip -= n;
                    continue;
                }
                self.iov.push(libc::iovec {
                    // SAFETY: `skip < n`: within the part.
                    iov_base: unsafe { p.add(skip) } as *mut libc::c_void,
                    iov_len: n - skip,
                });
                skip = 0;
            }
        }
        assert!(!self.iov.is_empty(), "a send with nothing left to send");
        *self.msg = super::conn::empty_msghdr();
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() as _;
        let ud = UserData::new(Tag::PeerSend, self.id, 0, 0);
        // SAFETY: `msg`, `iov` and the headers in `sending` are this channel's and untouched
        // until the completion (`send_in_flight`); the payloads are requests' buffers, held
        // until their I/O completes, which `deliver` allows only after this send completed.
        unsafe { ring.sendmsg(ud, self.fd.as_raw_fd(), &*self.msg) };
        self.send_in_flight = true;
    }

    /// A completion of this channel's: `out` gets the request I/Os it completed.
    pub fn complete(
        &mut self,
        ring: &mut impl Submit,
        tag: Tag,
        res: i32,
        out: &mut Vec<(UserData, i32)>,
    ) {
        match tag {
            Tag::PeerSend => self.on_send(ring, res, out),
            Tag::PeerRecv => self.on_recv(ring, res, out),
            _ => unreachable!("not a peer link completion: {tag:?}"),
        }
    }

    fn on_send(&mut self, ring: &mut impl Submit, res: i32, out: &mut Vec<(UserData, i32)>) {
        assert!(
            self.send_in_flight,
            "a send completion with no send in flight"
        );
        self.send_in_flight = false;
        let total: usize = self
            .sending
            .iter()
            .map(|(_, f)| HEADER_BYTES + f.payload_len as usize)
            .sum();
        if res <= 0 {
            let why = if res == 0 {
                "sending to the peer made no progress".to_string()
            } else {
                format!(
                    "sending to the peer: {}",
                    std::io::Error::from_raw_os_error(-res)
                )
            };
            self.release_sending(out);
            self.kill(why, out);
            return;
        }
        self.sent_bytes += res as usize;
        if self.sent_bytes < total && self.dead.is_none() {
            self.submit_send(ring);
            return;
        }
        self.release_sending(out);
        if self.dead.is_some() {
            // Killed while this send was in flight: its frames fail now.
            self.kill(String::new(), out);
            return;
        }
        self.flush(ring);
    }

    /// The `sendmsg` carrying `sending` is over: their payloads are free again; frames already
    /// answered complete now.
    fn release_sending(&mut self, out: &mut Vec<(UserData, i32)>) {
        for (cookie, _) in self.sending.drain(..) {
            if let Some(p) = self.outstanding.get_mut(&cookie) {
                p.sent = true;
                if let Some(r) = p.reply {
                    out.push((p.ud, r));
                    self.outstanding.remove(&cookie);
                }
            }
        }
    }

    fn on_recv(&mut self, ring: &mut impl Submit, res: i32, out: &mut Vec<(UserData, i32)>) {
        assert!(
            self.recv_in_flight,
            "a receive completion with none in flight"
        );
        self.recv_in_flight = false;
        if self.dead.is_some() {
            return;
        }
        if res <= 0 {
            let why = if res == 0 {
                "the peer closed the link".to_string()
            } else {
                format!(
                    "receiving from the peer: {}",
                    std::io::Error::from_raw_os_error(-res)
                )
            };
            self.kill(why, out);
            return;
        }
        self.recv_have += res as usize;
        let mut at = 0;
        while let Some(b) = self.recv_buf[at..self.recv_have].get(..HEADER_BYTES) {
            let h = match Header::decode(b) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    self.kill(format!("a malformed reply from the peer: {e}"), out);
                    return;
                }
            };
            if let Err(why) = self.on_reply(&h, out) {
                self.kill(why, out);
                return;
            }
            at += HEADER_BYTES;
        }
        self.recv_buf.copy_within(at..self.recv_have, 0);
        self.recv_have -= at;
        self.arm_recv(ring);
    }

    fn on_reply(&mut self, h: &Header, out: &mut Vec<(UserData, i32)>) -> Result<(), String> {
        if !h.reply || h.payload_len != 0 || !h.kind.is_data() {
            return Err(format!(
                "the peer sent {:?} (reply: {}, {} payload bytes) on a data link",
                h.kind, h.reply, h.payload_len
            ));
        }
        let Some(p) = self.outstanding.get_mut(&h.cookie) else {
            return Err(format!(
                "the peer answered cookie {}, which is not waiting",
                h.cookie
            ));
        };
        let res = match h.status {
            0 if h.flags & FLAG_NOT_ON_REPLICA != 0 => crate::target::PEER_DONE_NOT_ON_REPLICA,
            0 => 0,
            errno => -i32::from(errno),
        };
        if p.sent {
            out.push((p.ud, res));
            self.outstanding.remove(&h.cookie);
        } else {
            // Answered before its sendmsg completed (possible: the kernel copied the bytes,
            // the peer answered, and the send's completion is behind this one).
            p.reply = Some(res);
        }
        Ok(())
    }

    /// Kills the link if a frame has waited for its answer longer than the peer timeout.
    pub fn check_timeout(&mut self, now: Instant, out: &mut Vec<(UserData, i32)>) {
        if self.dead.is_some() {
            return;
        }
        let late = self
            .outstanding
            .values()
            .any(|p| now.duration_since(p.since) > self.timeout);
        if late {
            let why = format!(
                "the peer answered nothing for {} ms",
                self.timeout.as_millis()
            );
            self.fail_with = libc::ETIMEDOUT;
            self.kill(why, out);
        }
    }

    /// Ends the link: nothing more is sent; every frame not in a `sendmsg` in flight completes
    /// with an error now, the others when that send completes (after `release_sending`).
    pub fn kill(&mut self, why: String, out: &mut Vec<(UserData, i32)>) {
        if self.dead.is_none() {
            tracing::warn!("peer data link down: {why}");
            self.dead = Some(why);
            self.up.store(false, Ordering::Release);
            // Ends the receive (and a send) in flight; their completions come back as errors.
            let _ =
                nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        let errno = self.fail_with;
        for (cookie, _) in self.queue.drain(..) {
            if let Some(p) = self.outstanding.remove(&cookie) {
                out.push((p.ud, -errno));
            }
        }
        let in_send: Vec<u64> = self.sending.iter().map(|(c, _)| *c).collect();
        self.outstanding.retain(|cookie, p| {
            if in_send.contains(cookie) && !p.sent {
                return true; // completes when its send does
            }
            out.push((p.ud, p.reply.unwrap_or(-errno)));
            false
        });
    }
}

impl Drop for PeerChan {
    fn drop(&mut self) {
        assert!(
            self.is_idle(),
            "a peer link dropped while the kernel holds its buffers"
        );
        self.up.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ring::fake::{FakeRing, Op};
    use crate::peer::wire::Kind;

    fn chan() -> (PeerChan, FakeRing, Arc<AtomicBool>) {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let mut ring = FakeRing::default();
        let mut c = PeerChan::new(
            1,
            PeerSocket {
                fd: OwnedFd::from(a),
                up: up.clone(),
                timeout: Duration::from_millis(50),
                forward: false,
            },
        );
        c.begin(&mut ring);
        (c, ring, up)
    }

    fn write_op(offset: u64, len: u64) -> PeerIo {
        PeerIo {
            op: PeerOp::Write,
            volume: 4,
            token: 2,
            sequence: offset + 1,
            offset,
            len,
            buf_start: 0,
            fua: false,
            no_hole: false,
            forwarded: false,
        }
    }

    fn io_ud(slot: u16) -> UserData {
        UserData::new(Tag::Io, 3, slot, 1)
    }

    /// Takes the recorded operation of kind `want` ("recv" or "send").
    fn take(ring: &mut FakeRing, want: &str) -> Op {
        let i = ring
            .ops
            .iter()
            .position(|o| {
                matches!(
                    (o, want),
                    (Op::Recv { .. }, "recv") | (Op::SendMsg { .. }, "send")
                )
            })
            .unwrap_or_else(|| panic!("no {want} submitted: {:?}", ring.ops));
        ring.ops.remove(i).unwrap()
    }

    /// Ends the test's link the way a worker does: killed, every operation the kernel holds
    /// completed (as cancelled), then dropped idle.
    fn close(mut c: PeerChan, mut ring: FakeRing) {
        let mut out = Vec::new();
        c.kill("the test is over".into(), &mut out);
        while let Some(op) = ring.ops.pop_front() {
            c.complete(&mut ring, op.ud().tag, -libc::ECANCELED, &mut out);
        }
        assert!(c.is_idle());
    }

    fn reply_to(sent: &[u8], status: u16) -> Vec<u8> {
        let h = Header::decode(&sent[..HEADER_BYTES]).unwrap().unwrap();
        h.reply_to(status).encode().to_vec()
    }

    /// Frames go out gathered in one sendmsg, with each write's payload checksummed; a reply
    /// completes its I/O only once the send that carried it completed (the kernel reads the
    /// payload until then), replies split across receives are reassembled, and a refusal's
    /// status is the I/O's errno.
    #[test]
    fn frames_are_gathered_and_replies_complete_their_ios_after_their_send() {
        let (mut c, mut ring, _up) = chan();
        let payload = vec![7u8; 4096];
        let flush = PeerIo {
            op: PeerOp::Flush,
            ..write_op(0, 0)
        };
        // SAFETY: `payload` outlives the channel's use of it (completed below).
        assert!(unsafe { c.submit(io_ud(1), &write_op(8192, 4096), payload.as_ptr()) });
        // SAFETY: a flush has no payload.
        assert!(unsafe { c.submit(io_ud(2), &flush, std::ptr::null()) });
        c.flush(&mut ring);
        let send = take(&mut ring, "send");
        let bytes = send.sent(usize::MAX);
        assert_eq!(bytes.len(), 2 * HEADER_BYTES + 4096);
        let w = Header::decode(&bytes).unwrap().unwrap();
        assert_eq!(
            (w.kind, w.offset, w.range, w.handle, w.token),
            (Kind::Write, 8192, 4096, 4, 2)
        );
        w.check_payload(&bytes[HEADER_BYTES..HEADER_BYTES + 4096])
            .unwrap();
        let f = &bytes[HEADER_BYTES + 4096..];
        assert_eq!(Header::decode(f).unwrap().unwrap().kind, Kind::Flush);

        // Both answered (the flush refused) before the send's completion: nothing completes.
        let mut replies = reply_to(&bytes, 0);
        replies.extend(reply_to(f, libc::EIO as u16));
        let mut out = Vec::new();
        let recv = take(&mut ring, "recv");
        let n = recv.recv(&replies[..100]); // a reply and a half
        c.complete(&mut ring, Tag::PeerRecv, n, &mut out);
        assert!(out.is_empty(), "completed before its send: {out:?}");
        let recv = take(&mut ring, "recv");
        let n = recv.recv(&replies[100..]);
        c.complete(&mut ring, Tag::PeerRecv, n, &mut out);
        assert!(out.is_empty());
        c.complete(&mut ring, Tag::PeerSend, bytes.len() as i32, &mut out);
        out.sort_by_key(|(ud, _)| ud.slot);
        assert_eq!(out, vec![(io_ud(1), 0), (io_ud(2), -libc::EIO)]);
        assert!(!c.is_dead());
        close(c, ring);
    }

    /// A forwarded operation's owner may answer that it did the change but not on this node's
    /// replica: the I/O completes with `PEER_DONE_NOT_ON_REPLICA`, not 0.
    #[test]
    fn a_reply_not_on_this_replica_completes_with_its_own_result() {
        let (mut c, mut ring, _up) = chan();
        let a = vec![1u8; 4096];
        let op = PeerIo {
            forwarded: true,
            ..write_op(0, 4096)
        };
        // SAFETY: `a` outlives the send (completed below).
        assert!(unsafe { c.submit(io_ud(1), &op, a.as_ptr()) });
        c.flush(&mut ring);
        let bytes = take(&mut ring, "send").sent(usize::MAX);
        let mut out = Vec::new();
        c.complete(&mut ring, Tag::PeerSend, bytes.len() as i32, &mut out);
        let mut r = Header::decode(&bytes).unwrap().unwrap().reply_to(0);
        r.flags = crate::peer::wire::FLAG_NOT_ON_REPLICA;
        let recv = take(&mut ring, "recv");
        let n = recv.recv(&r.encode());
        c.complete(&mut ring, Tag::PeerRecv, n, &mut out);
        assert_eq!(
            out,
            vec![(io_ud(1), crate::target::PEER_DONE_NOT_ON_REPLICA)]
        );
        close(c, ring);
    }

    /// A short send resumes where it stopped, and frames queued meanwhile go in the next send,
    /// after it: a stream's bytes never interleave.
    #[test]
    fn a_short_send_resumes_and_later_frames_wait_their_turn() {
        let (mut c, mut ring, _up) = chan();
        let a = vec![1u8; 4096];
        let b = vec![2u8; 4096];
        // SAFETY: the payloads outlive the sends (completed below).
        assert!(unsafe { c.submit(io_ud(1), &write_op(0, 4096), a.as_ptr()) });
        c.flush(&mut ring);
        // SAFETY: as above.
        assert!(unsafe { c.submit(io_ud(2), &write_op(4096, 4096), b.as_ptr()) });
        c.flush(&mut ring); // one send in flight: this waits
        let first = take(&mut ring, "send");
        assert!(!ring.ops.iter().any(|o| matches!(o, Op::SendMsg { .. })));
        let part = first.sent(1000);
        let mut out = Vec::new();
        c.complete(&mut ring, Tag::PeerSend, 1000, &mut out);
        let rest = take(&mut ring, "send").sent(usize::MAX);
        assert_eq!(part.len() + rest.len(), HEADER_BYTES + 4096);
        c.complete(&mut ring, Tag::PeerSend, rest.len() as i32, &mut out);
        let second = take(&mut ring, "send").sent(usize::MAX);
        let h = Header::decode(&second).unwrap().unwrap();
        assert_eq!(h.offset, 4096);
        c.complete(&mut ring, Tag::PeerSend, second.len() as i32, &mut out);
        assert!(out.is_empty(), "nothing answered yet");
        close(c, ring);
    }

    /// A peer that answers nothing within the timeout kills the link: every waiting I/O fails
    /// with ETIMEDOUT (those in a send in flight once it completes), the dialer's flag drops,
    /// and nothing more is accepted.
    #[test]
    fn silence_past_the_timeout_kills_the_link_and_fails_what_waits() {
        let (mut c, mut ring, up) = chan();
        let a = vec![1u8; 4096];
        // SAFETY: `a` outlives the send (completed below).
        assert!(unsafe { c.submit(io_ud(1), &write_op(0, 4096), a.as_ptr()) });
        c.flush(&mut ring);
        let send = take(&mut ring, "send");
        let mut out = Vec::new();
        c.check_timeout(Instant::now() + Duration::from_secs(1), &mut out);
        assert!(c.is_dead());
        assert!(!up.load(Ordering::Acquire));
        assert!(out.is_empty(), "its send is still the kernel's");
        let n = send.sent(usize::MAX).len() as i32;
        c.complete(&mut ring, Tag::PeerSend, n, &mut out);
        assert_eq!(out, vec![(io_ud(1), -libc::ETIMEDOUT)]);
        // SAFETY: refused: nothing is kept.
        assert!(!unsafe { c.submit(io_ud(2), &write_op(0, 4096), a.as_ptr()) });
        let recv = take(&mut ring, "recv");
        assert!(!c.is_idle());
        let _ = recv;
        c.complete(&mut ring, Tag::PeerRecv, -libc::ECONNRESET, &mut out);
        assert!(c.is_idle());
    }

    /// A reply nobody waits for (or any malformed byte) ends the link.
    #[test]
    fn an_unexpected_reply_kills_the_link() {
        let (mut c, mut ring, _up) = chan();
        let stray = Header::request(Kind::Flush, 99);
        let stray = Header {
            token: 1,
            sequence: 1,
            ..stray
        }
        .reply_to(0)
        .encode();
        let recv = take(&mut ring, "recv");
        let n = recv.recv(&stray);
        let mut out = Vec::new();
        c.complete(&mut ring, Tag::PeerRecv, n, &mut out);
        assert!(c.is_dead());
        assert!(c.is_idle());
    }
}
