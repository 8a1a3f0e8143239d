//! The connection state machine, driven without a kernel ring: a recording ring takes its
//! submissions and the harness completes them the way the test chooses (a byte at a time, out of
//! order, short, or not yet), playing an NBD client on the other side.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Conn, Io};
use crate::engine::ring::Tag;
use crate::engine::ring::fake::{FakeRing, Op};
use crate::engine::{EngineConfig, Incoming, Transport};
use crate::nbd::wire::*;
use crate::target::{CacheMode, Export, Exports, FileTarget};

const EXPORT_BYTES: u64 = 1 << 20;

/// How the harness completes file I/O.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FileOrder {
    /// As submitted.
    InOrder,
    /// The newest first.
    Reversed,
    /// Not at all, until the test says (`release_file`).
    Held,
}

struct Harness {
    conn: Option<Box<Conn>>,
    io: Io<FakeRing>,
    exports: Arc<Exports>,
    /// Submitted, not yet completed.
    pending: VecDeque<Op>,
    /// Bytes the client sent that the server has not received.
    to_server: VecDeque<u8>,
    from_server: Vec<u8>,
    read_pos: usize,
    recv_chunk: usize,
    send_chunk: usize,
    file_order: FileOrder,
    /// Every read or write of a file moves at most this many bytes.
    short: Option<u32>,
    /// The client hung up: receives complete with 0 once `to_server` is empty.
    hung_up: bool,
    path: PathBuf,
    /// Most buffer bytes the worker's account ever held.
    peak_buffer_bytes: u64,
    _client_end: UnixStream,
}

impl Harness {
    fn new(name: &str, cfg: EngineConfig) -> Harness {
        let path = std::env::temp_dir().join(format!(
            "streamer-conn-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(EXPORT_BYTES).unwrap();
        let target = FileTarget::open(&path, false, CacheMode::Buffered).unwrap();
        let exports = Arc::new(Exports::default());
        assert!(
            exports
                .add(Export {
                    name: "disk".into(),
                    description: String::new(),
                    target: Arc::new(target),
                    max_payload_bytes: cfg.max_payload_bytes,
                })
                .is_ok()
        );
        // A real socket the connection may shut down; no byte ever passes through it.
        let (ours, theirs) = UnixStream::pair().unwrap();
        let incoming = Incoming {
            fd: OwnedFd::from(ours),
            peer: "test".into(),
            transport: Transport::Unix,
        };
        let mut io = Io::new(FakeRing::default(), &cfg);
        let mut conn = Box::new(Conn::new(0, 1, incoming, &cfg));
        conn.begin(&mut io);
        Harness {
            conn: Some(conn),
            io,
            exports,
            pending: VecDeque::new(),
            to_server: VecDeque::new(),
            from_server: Vec::new(),
            read_pos: 0,
            recv_chunk: usize::MAX,
            send_chunk: usize::MAX,
            file_order: FileOrder::InOrder,
            short: None,
            hung_up: false,
            path,
            peak_buffer_bytes: 0,
            _client_end: theirs,
        }
    }

    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("the connection is not finished")
    }

    fn client_sends(&mut self, bytes: &[u8]) {
        self.to_server.extend(bytes);
    }

    /// Completes whatever can be completed, round after round, as the worker's loop would,
    /// until nothing moves. Returns whether the connection finished (and was freed).
    fn run(&mut self) -> bool {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return true;
            };
            self.pending.extend(self.io.ring.ops.drain(..));
            let mut done = Vec::new();
            let mut keep = VecDeque::new();
            let mut files: Vec<Op> = Vec::new();
            // A closing connection shut its socket down: its receive ends, as the kernel's would.
            let closing = conn.closing.is_some();
            for op in self.pending.drain(..) {
                match op {
                    Op::Recv { .. } if !self.to_server.is_empty() => {
                        let n = self.to_server.len().min(self.recv_chunk);
                        let bytes: Vec<u8> = self.to_server.drain(..n).collect();
                        let got = op.recv(&bytes);
                        // What the receive had no room for stays with the client.
                        for &b in bytes[got as usize..].iter().rev() {
                            self.to_server.push_front(b);
                        }
                        done.push((op.ud(), got));
                    }
                    Op::Recv { .. } if self.hung_up || closing => done.push((op.ud(), 0)),
                    Op::Recv { .. } => keep.push_back(op),
                    Op::Send { .. } | Op::SendMsg { .. } => {
                        let bytes = op.sent(self.send_chunk);
                        self.from_server.extend_from_slice(&bytes);
                        done.push((op.ud(), bytes.len() as i32));
                    }
                    Op::File { .. } => files.push(op),
                }
            }
            match self.file_order {
                FileOrder::Held => keep.extend(files),
                FileOrder::InOrder => {
                    done.extend(files.iter().map(|op| (op.ud(), op.run_file(self.short))))
                }
                FileOrder::Reversed => done.extend(
                    files
                        .iter()
                        .rev()
                        .map(|op| (op.ud(), op.run_file(self.short))),
                ),
            }
            self.pending = keep;
            if done.is_empty() {
                return false;
            }
            for (ud, res) in done {
                assert_ne!(ud.tag, Tag::Splice, "no splicing over a Unix socket");
                conn.complete(&mut self.io, &self.exports, ud, res);
            }
            conn.flush(&mut self.io);
            for _ in std::mem::take(&mut self.io.memory_waiters) {
                conn.resume_for_memory(&mut self.io, &self.exports);
            }
            self.peak_buffer_bytes = self.peak_buffer_bytes.max(self.io.buffer_bytes);
            if conn.is_finished() {
                let conn = self.conn.take().expect("checked above");
                conn.finish(&mut self.io, &self.exports);
                assert_eq!(
                    self.io.buffer_bytes, 0,
                    "buffers leaked by a finished connection"
                );
                assert_eq!(self.io.ahead_bytes, 0, "read-ahead leaked");
                assert!(
                    self.pending.is_empty(),
                    "a finished connection left operations"
                );
                return true;
            }
        }
    }

    /// Lets held file I/O complete (in order) from now on.
    fn release_file(&mut self) {
        self.file_order = FileOrder::InOrder;
    }

    fn server_bytes(&mut self, n: usize) -> Vec<u8> {
        assert!(
            self.from_server.len() - self.read_pos >= n,
            "the server sent {} bytes, the client wants {n}",
            self.from_server.len() - self.read_pos
        );
        let b = self.from_server[self.read_pos..self.read_pos + n].to_vec();
        self.read_pos += n;
        b
    }

    fn server_u32(&mut self) -> u32 {
        u32::from_be_bytes(self.server_bytes(4).try_into().unwrap())
    }

    fn server_u64(&mut self) -> u64 {
        u64::from_be_bytes(self.server_bytes(8).try_into().unwrap())
    }

    /// Negotiates export `disk` with `NBD_OPT_GO` (simple replies) and checks the answer.
    fn negotiate(&mut self) {
        let mut c = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        c.extend(IHAVEOPT.to_be_bytes());
        c.extend(OPT_GO.to_be_bytes());
        let name = b"disk";
        c.extend((4 + name.len() as u32 + 2).to_be_bytes());
        c.extend((name.len() as u32).to_be_bytes());
        c.extend(name);
        c.extend(0u16.to_be_bytes());
        self.client_sends(&c);
        assert!(!self.run());
        assert_eq!(self.server_u64(), NBD_MAGIC);
        assert_eq!(self.server_u64(), IHAVEOPT);
        self.server_bytes(2);
        let mut size = None;
        loop {
            assert_eq!(self.server_u64(), OPTION_REPLY_MAGIC);
            assert_eq!(self.server_u32(), OPT_GO);
            let kind = self.server_u32();
            let len = self.server_u32() as usize;
            let data = self.server_bytes(len);
            match kind {
                REP_ACK => break,
                REP_INFO if data[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                other => panic!("option reply {other:#x}"),
            }
        }
        assert_eq!(size, Some(EXPORT_BYTES));
    }

    fn request(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend(flags.to_be_bytes());
        r.extend(cmd.to_be_bytes());
        r.extend(cookie.to_be_bytes());
        r.extend(offset.to_be_bytes());
        r.extend(len.to_be_bytes());
        r.extend(data);
        self.client_sends(&r);
    }

    /// Every simple reply sent so far: cookie to (error, data). `read_lens` says which cookies
    /// were reads and how long (their data follows a successful reply). Each cookie must be
    /// answered once.
    fn replies(&mut self, read_lens: &BTreeMap<u64, u32>) -> BTreeMap<u64, (u32, Vec<u8>)> {
        let mut out = BTreeMap::new();
        while self.read_pos < self.from_server.len() {
            assert_eq!(self.server_u32(), SIMPLE_REPLY_MAGIC);
            let error = self.server_u32();
            let cookie = self.server_u64();
            let data = match read_lens.get(&cookie) {
                Some(&n) if error == 0 => self.server_bytes(n as usize),
                _ => Vec::new(),
            };
            assert!(
                out.insert(cookie, (error, data)).is_none(),
                "cookie {cookie} answered twice"
            );
        }
        out
    }

    fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let all = std::fs::read(&self.path).unwrap();
        all[offset as usize..offset as usize + len].to_vec()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

fn cfg() -> EngineConfig {
    EngineConfig {
        threads: 1,
        pool_cache_bytes: 1 << 20,
        ..EngineConfig::default()
    }
}

/// Negotiation, a write whose payload arrives a byte at a time, a flush and a read, all with
/// every receive one byte and every send one byte: each is answered once, with the right data,
/// and DISC closes the connection with nothing leaked.
#[test]
fn requests_split_at_every_byte_are_answered_in_full() {
    let mut h = Harness::new("bytes", cfg());
    h.recv_chunk = 1;
    h.send_chunk = 1;
    h.negotiate();
    let data = pattern(1, 8192);
    h.request(CMD_WRITE, 0, 1, 4096, 8192, &data);
    h.request(CMD_FLUSH, 0, 2, 0, 0, &[]);
    h.request(CMD_READ, 0, 3, 4096, 8192, &[]);
    assert!(!h.run());
    let r = h.replies(&BTreeMap::from([(3, 8192)]));
    assert_eq!(r.len(), 3);
    assert_eq!(r[&1].0, 0);
    assert_eq!(r[&2].0, 0);
    assert_eq!(r[&3], (0, data.clone()));
    assert_eq!(h.file_bytes(4096, 8192), data);
    h.request(CMD_DISC, 0, 4, 0, 0, &[]);
    assert!(h.run(), "DISC closes the connection");
}

/// Sixteen reads in flight whose file I/O completes newest first: each request gets its own
/// data under its own cookie, once.
#[test]
fn completions_in_any_order_answer_each_request_once() {
    let mut h = Harness::new("order", cfg());
    h.negotiate();
    let all = pattern(7, EXPORT_BYTES as usize);
    std::fs::write(&h.path, &all).unwrap();
    h.file_order = FileOrder::Reversed;
    let mut lens = BTreeMap::new();
    for i in 0..16u64 {
        h.request(CMD_READ, 0, 100 + i, i * 12288, 4096, &[]);
        lens.insert(100 + i, 4096);
    }
    assert!(!h.run());
    let r = h.replies(&lens);
    assert_eq!(r.len(), 16);
    for i in 0..16u64 {
        let at = (i * 12288) as usize;
        assert_eq!(r[&(100 + i)], (0, all[at..at + 4096].to_vec()), "read {i}");
    }
}

/// Reads and writes that the file moves only 1000 bytes at a time are resumed where they
/// stopped until whole.
#[test]
fn short_transfers_resume_where_they_stopped() {
    let mut h = Harness::new("short", cfg());
    h.negotiate();
    h.short = Some(1000);
    let data = pattern(3, 65536);
    h.request(CMD_WRITE, 0, 1, 65536, 65536, &data);
    assert!(!h.run());
    h.request(CMD_READ, 0, 2, 65536, 65536, &[]);
    assert!(!h.run());
    let r = h.replies(&BTreeMap::from([(2, 65536)]));
    assert_eq!(r[&1].0, 0);
    assert_eq!(r[&2], (0, data.clone()));
    assert_eq!(h.file_bytes(65536, 65536), data);
}

/// A request with a bad magic closes the connection; a write still in the kernel's hands keeps
/// it (and its buffer) alive until its completion, and is never answered.
#[test]
fn a_bad_request_closes_and_memory_stays_until_the_kernel_is_done() {
    let mut h = Harness::new("magic", cfg());
    h.negotiate();
    h.file_order = FileOrder::Held;
    h.request(CMD_WRITE, 0, 1, 0, 4096, &pattern(5, 4096));
    h.client_sends(&[0xde; 28]);
    assert!(!h.run());
    assert!(h.conn().closing.is_some(), "a bad magic closes");
    assert!(
        h.io.buffer_bytes > 0,
        "the write's buffer is still the kernel's"
    );
    h.release_file();
    assert!(h.run(), "freed once the write completed");
    assert!(
        h.replies(&BTreeMap::new()).is_empty(),
        "nothing answered after closing"
    );
}

/// A write the protocol refuses (past the end of the export) is answered only after its
/// payload has been consumed, which arrives in pieces; the request after it is served.
#[test]
fn a_refused_write_skips_its_payload_before_its_error() {
    let mut h = Harness::new("refused", cfg());
    h.negotiate();
    h.recv_chunk = 100;
    let payload = pattern(9, 4096);
    h.request(CMD_WRITE, 0, 1, EXPORT_BYTES, 4096, &payload);
    h.request(CMD_READ, 0, 2, 0, 512, &[]);
    assert!(!h.run());
    let r = h.replies(&BTreeMap::from([(2, 512)]));
    assert_ne!(r[&1].0, 0, "a write past the end fails");
    assert_eq!(
        r[&2],
        (0, vec![0; 512]),
        "the payload was not taken for a request"
    );
    assert_eq!(h.file_bytes(0, 4096), vec![0; 4096], "nothing written");
}

/// With the worker's memory for four 16 KiB writes, sixteen sent at once never hold more, and
/// all are answered once the file lets them finish.
#[test]
fn the_worker_budget_holds_requests_back_and_lets_them_through() {
    let mut c = cfg();
    c.max_payload_bytes = 16 << 10;
    c.max_buffer_bytes = 64 << 10;
    let mut h = Harness::new("budget", c);
    assert_eq!(h.io.buffer_limit, 64 << 10);
    h.negotiate();
    h.file_order = FileOrder::Held;
    for i in 0..16u64 {
        h.request(CMD_WRITE, 0, i, i * 16384, 16384, &pattern(i, 16384));
    }
    assert!(!h.run());
    assert!(h.io.buffer_bytes <= 64 << 10);
    assert!(h.conn().stalled, "the fifth write waits for memory");
    h.release_file();
    assert!(!h.run());
    assert!(
        h.peak_buffer_bytes <= 64 << 10,
        "peak {}",
        h.peak_buffer_bytes
    );
    let r = h.replies(&BTreeMap::new());
    assert_eq!(r.len(), 16);
    assert!(r.values().all(|(e, _)| *e == 0));
    for i in 0..16u64 {
        assert_eq!(
            h.file_bytes(i * 16384, 16384),
            pattern(i, 16384),
            "write {i}"
        );
    }
}

/// A client that hangs up in the middle of a payload: the connection closes, frees the
/// half-received write's buffer, and writes nothing of it.
#[test]
fn a_hang_up_mid_payload_writes_nothing_and_frees_everything() {
    let mut h = Harness::new("hangup", cfg());
    h.negotiate();
    let data = pattern(11, 8192);
    h.request(CMD_WRITE, 0, 1, 0, 8192, &data[..3000]);
    assert!(!h.run());
    h.hung_up = true;
    assert!(h.run());
    assert_eq!(h.file_bytes(0, 8192), vec![0; 8192]);
}

/// A plan's links reach the ring I/O by I/O: a WRITE_ZEROES with FUA on a file is a zeroing
/// linked to the flush that makes it durable (the flush must not run first), and the reply
/// waits for both.
#[test]
fn linked_ios_of_a_plan_reach_the_ring_linked() {
    let mut h = Harness::new("linked", cfg());
    h.negotiate();
    std::fs::write(&h.path, pattern(2, EXPORT_BYTES as usize)).unwrap();
    h.file_order = FileOrder::Held;
    h.request(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 1, 8192, 8192, &[]);
    assert!(!h.run());
    let links: Vec<bool> = h
        .pending
        .iter()
        .filter_map(|op| match op {
            Op::File { link, .. } => Some(*link),
            _ => None,
        })
        .collect();
    assert!(links.len() >= 2, "a zeroing and its flush: {links:?}");
    assert!(links[..links.len() - 1].iter().all(|l| *l), "{links:?}");
    assert!(!links[links.len() - 1], "the last I/O ends the run");
    assert!(
        h.replies(&BTreeMap::new()).is_empty(),
        "no reply before the flush"
    );
    h.release_file();
    assert!(!h.run());
    assert_eq!(h.replies(&BTreeMap::new())[&1].0, 0);
    assert_eq!(h.file_bytes(8192, 8192), vec![0; 8192]);
}
