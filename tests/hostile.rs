//! Hostile and broken clients on raw sockets. Each case gets the spec's reply or a clean disconnect,
//! and after each one the server still serves a well-behaved client.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const FUA: u16 = 1;
const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;
const ENOSPC: u32 = 28;

const EXPORT_BYTES: u64 = 16 << 20;

fn server(dir: &Scratch, extra: &[&str]) -> Server {
    let disk = dir.sparse("disk.raw", EXPORT_BYTES);
    let spec = format!("disk={}", disk.display());
    let mut args = vec!["--export", spec.as_str(), "--handshake-timeout", "2"];
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

/// A compact (28-byte) request header.
fn request_bytes(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

struct Raw(TcpStream);

impl Raw {
    fn connect(srv: &Server) -> Raw {
        let s = TcpStream::connect(&srv.tcp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Raw(s)
    }
    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }
    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.0
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        v
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }
    /// True if the server closes the connection (EOF or reset) within the read timeout.
    fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
    fn greeting(&mut self) {
        assert_eq!(self.u64(), NBD_MAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        assert_eq!(self.u16() & 1, 1, "fixed newstyle");
    }
    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }
    /// Reads one option reply: (option, type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let opt = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        (opt, kind, self.recv(len))
    }
    /// Negotiates `disk` with NBD_OPT_GO; `structured` also negotiates structured replies.
    fn negotiate(srv: &Server, structured: bool) -> Raw {
        let mut c = Raw::connect(srv);
        c.greeting();
        c.send(&3u32.to_be_bytes());
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(c.option_reply().1, REP_ACK);
        }
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&0u16.to_be_bytes());
        c.option(OPT_GO, &go);
        loop {
            let (_, kind, _) = c.option_reply();
            if kind == REP_ACK {
                break;
            }
            assert_eq!(kind, 3, "NBD_REP_INFO before the ACK");
        }
        c
    }
    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&request_bytes(flags, kind, cookie, offset, len));
    }
    /// Reads a simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        (self.u32(), self.u64())
    }
}

/// A good client still gets served: a write and a verified read through qemu-io.
fn still_serves(srv: &Server) {
    let out = stdout(&run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 64k 64k",
            "-c",
            "read -P 0x3c 64k 64k",
            &srv.uri("disk"),
        ],
    ));
    assert!(
        !out.contains("failed") && !out.contains("verification"),
        "{out}"
    );
}

#[test]
fn bad_magic_unknown_flags_and_truncated_options_disconnect_cleanly() {
    let dir = Scratch::new("hostile-handshake");
    let srv = server(&dir, &[]);

    // Bad option magic.
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    c.send(&[0xde; 16]);
    assert!(c.closed_by_server(), "bad option magic must close");
    still_serves(&srv);

    // Unknown client flags.
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.closed_by_server(), "unknown client flags must close");

    // Truncated option: half a header, then the client goes away.
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    c.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(c);

    // Truncated option payload: header promises 100 bytes, 10 arrive, client leaves.
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&100u32.to_be_bytes());
    b.extend_from_slice(&[0; 10]);
    c.send(&b);
    drop(c);

    // Garbage instead of a handshake.
    let mut c = Raw::connect(&srv);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.closed_by_server());

    still_serves(&srv);
    srv.stop();
}

#[test]
fn option_claiming_a_gigabyte_is_refused_and_negotiation_goes_on() {
    let dir = Scratch::new("hostile-bigopt");
    let srv = server(&dir, &[]);
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&b);
    let (opt, kind, _) = c.option_reply();
    assert_eq!((opt, kind), (OPT_GO, REP_ERR_TOO_BIG));
    // The server discards the payload as it comes; a few MiB of it cost it no memory.
    let junk = vec![0u8; 1 << 20];
    for _ in 0..4 {
        c.send(&junk);
    }
    drop(c);
    // An unknown option on a fresh connection: ERR_UNSUP and negotiation continues to GO.
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    c.option(4242, b"xyz");
    assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().1, REP_ACK);
    still_serves(&srv);
    srv.stop();
}

#[test]
fn bad_requests_get_errors_and_the_connection_keeps_working() {
    let dir = Scratch::new("hostile-requests");
    let srv = server(&dir, &[]);
    let mut c = Raw::negotiate(&srv, false);

    c.request(0, 99, 1, 0, 512); // unknown command
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    c.request(0, CMD_READ, 2, 0, u32::MAX); // over the maximum (EOVERFLOW needs structured replies)
    assert_eq!(c.simple_reply(), (EINVAL, 2));
    c.request(0, CMD_READ, 3, EXPORT_BYTES - 100, 4096); // past the end
    assert_eq!(c.simple_reply(), (EINVAL, 3));
    c.request(0, CMD_WRITE, 4, EXPORT_BYTES, 8); // past the end, payload drained
    c.send(&[1; 8]);
    assert_eq!(c.simple_reply(), (ENOSPC, 4));
    c.request(1 << 9, CMD_WRITE, 5, 0, 4); // unknown flag, payload drained
    c.send(&[2; 4]);
    assert_eq!(c.simple_reply(), (EINVAL, 5));

    // Still in sync: write and read back.
    c.request(0, CMD_WRITE, 6, 4096, 4);
    c.send(b"abcd");
    assert_eq!(c.simple_reply(), (0, 6));
    c.request(0, CMD_READ, 7, 4096, 4);
    assert_eq!(c.simple_reply(), (0, 7));
    assert_eq!(c.recv(4), b"abcd");

    // An oversized write is refused at once (EINVAL: the spec keeps EOVERFLOW for reads); its
    // payload is drained as it comes.
    c.request(0, CMD_WRITE, 8, 0, u32::MAX);
    assert_eq!(c.simple_reply(), (EINVAL, 8));
    drop(c);

    // With structured replies an oversized read is EOVERFLOW.
    let mut c = Raw::negotiate(&srv, true);
    c.request(0, CMD_READ, 10, 0, u32::MAX);
    assert_eq!(c.u32(), STRUCTURED_REPLY_MAGIC);
    let (_flags, _kind, cookie, len) = (c.u16(), c.u16(), c.u64(), c.u32());
    assert_eq!(cookie, 10);
    let payload = c.recv(len as usize);
    assert_eq!(
        u32::from_be_bytes(payload[..4].try_into().unwrap()),
        EOVERFLOW
    );
    drop(c);

    // Bad request magic in transmission: disconnect.
    let mut c = Raw::negotiate(&srv, true);
    c.send(&[0x55; 28]);
    assert!(c.closed_by_server());
    still_serves(&srv);
    srv.stop();
}

/// Extended headers with `--max-request` below the spec's default maximum (32 MiB). A client that
/// did not ask for block sizes may assume the default, so a larger write up to 32 MiB is drained
/// and refused with EINVAL (the spec: a stricter server MUST cleanly error what falls outside);
/// a client that agreed to the advertised maximum and breaks it is disconnected.
#[test]
fn extended_write_over_a_lowered_maximum_is_refused_unless_agreed() {
    const OPT_EXTENDED_HEADERS: u32 = 11;
    const INFO_BLOCK_SIZE: u16 = 3;
    const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
    const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;
    const PAYLOAD_LEN: u16 = 1 << 5;
    const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
    let dir = Scratch::new("hostile-ext-max");
    let srv = server(&dir, &["--max-request", "64K"]);
    let negotiate = |ask_sizes: bool| {
        let mut c = Raw::connect(&srv);
        c.greeting();
        c.send(&3u32.to_be_bytes());
        c.option(OPT_EXTENDED_HEADERS, &[]);
        assert_eq!(c.option_reply().1, REP_ACK);
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk");
        if ask_sizes {
            go.extend_from_slice(&1u16.to_be_bytes());
            go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        } else {
            go.extend_from_slice(&0u16.to_be_bytes());
        }
        c.option(OPT_GO, &go);
        while c.option_reply().1 != REP_ACK {}
        c
    };
    let ext_request = |flags: u16, kind: u16, cookie: u64, offset: u64, len: u64| {
        let mut b = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    };
    // Reads one extended reply chunk: (type, cookie, payload).
    let reply = |c: &mut Raw| {
        assert_eq!(c.u32(), EXTENDED_REPLY_MAGIC);
        let (_flags, kind, cookie, _offset, len) = (c.u16(), c.u16(), c.u64(), c.u64(), c.u64());
        (kind, cookie, c.recv(len as usize))
    };

    let mut c = negotiate(false);
    let mut b = ext_request(PAYLOAD_LEN, CMD_WRITE, 1, 0, 128 << 10);
    b.extend_from_slice(&vec![0x5a; 128 << 10]);
    c.send(&b);
    let (kind, cookie, payload) = reply(&mut c);
    assert_eq!((kind, cookie), (REPLY_TYPE_ERROR, 1));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), EINVAL);
    // The payload was drained: the connection is in sync, and nothing was written.
    c.send(&ext_request(0, CMD_READ, 2, 0, 4096));
    let (kind, cookie, payload) = reply(&mut c);
    assert_eq!(cookie, 2);
    assert_ne!(kind, REPLY_TYPE_ERROR, "{payload:?}");
    assert!(!payload.contains(&0x5a));
    drop(c);

    let mut c = negotiate(true);
    let mut b = ext_request(PAYLOAD_LEN, CMD_WRITE, 3, 0, 128 << 10);
    b.extend_from_slice(&vec![0x5a; 128 << 10]);
    let _ = c.0.write_all(&b); // the server may close before taking it all
    assert!(c.closed_by_server());
    still_serves(&srv);
    srv.stop();
}

/// Requests the spec allows though they look odd: zero lengths, FUA on any command, flags on DISC,
/// and a client that does not set the fixed-newstyle flag.
#[test]
fn zero_lengths_fua_everywhere_and_flagged_disc_are_served() {
    let dir = Scratch::new("hostile-edges");
    let srv = server(&dir, &[]);
    let mut c = Raw::negotiate(&srv, false);
    c.request(0, CMD_WRITE, 1, 4096, 0);
    assert_eq!(c.simple_reply(), (0, 1), "zero-length write");
    c.request(FUA, CMD_WRITE, 2, 4096, 0);
    assert_eq!(c.simple_reply(), (0, 2), "zero-length FUA write");
    c.request(0, CMD_READ, 3, 4096, 0);
    assert_eq!(c.simple_reply(), (0, 3), "zero-length read");
    c.request(FUA, CMD_READ, 4, 0, 4);
    assert_eq!(c.simple_reply(), (0, 4), "FUA on a read is accepted");
    c.recv(4);
    c.request(FUA, CMD_FLUSH, 5, 0, 0);
    assert_eq!(c.simple_reply(), (0, 5), "FUA on a flush is accepted");
    c.request(0, CMD_WRITE, 6, 8192, 4);
    c.send(b"wxyz");
    assert_eq!(c.simple_reply(), (0, 6));
    // DISC carrying a flag is still a disconnect: no reply, the connection ends.
    c.request(FUA, CMD_DISC, 7, 0, 0);
    assert!(c.closed_by_server(), "DISC with a flag must close");

    // No fixed-newstyle flag: served as fixed newstyle (the spec lets the server honour it).
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&0u32.to_be_bytes());
    c.option(4242, b"");
    assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_GO, &go);
    while c.option_reply().1 != REP_ACK {}
    c.request(0, CMD_READ, 8, 8192, 4);
    assert_eq!(c.simple_reply(), (0, 8));
    assert_eq!(c.recv(4), b"wxyz");
    drop(c);
    still_serves(&srv);
    srv.stop();
}

/// On SIGTERM a negotiating client gets NBD_REP_ERR_SHUTDOWN for its next option. A connection
/// with a request in flight (here a write whose payload is half sent) finishes it, answers
/// requests that arrive from then on with NBD_ESHUTDOWN, and closes once nothing is in flight
/// (an idle one closes at once). The server then exits 0.
#[test]
fn shutdown_answers_new_options_and_requests_with_shutdown_errors() {
    const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    const OPT_LIST: u32 = 3;
    const ESHUTDOWN: u32 = 108;
    let dir = Scratch::new("hostile-shutdown");
    let mut srv = server(&dir, &[]);
    let mut serving = Raw::negotiate(&srv, false);
    serving.request(0, CMD_WRITE, 1, 0, 8);
    serving.send(b"abcd");
    let mut negotiating = Raw::connect(&srv);
    negotiating.greeting();
    negotiating.send(&3u32.to_be_bytes());
    std::thread::sleep(Duration::from_millis(200));

    let pid = nix::unistd::Pid::from_raw(srv.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    negotiating.option(OPT_LIST, &[]);
    let (opt, kind, _) = negotiating.option_reply();
    assert_eq!((opt, kind), (OPT_LIST, REP_ERR_SHUTDOWN));
    // The rest of the payload and a new request, in one segment; then a write refused while
    // its payload is still coming.
    let mut b = b"efgh".to_vec();
    b.extend(request_bytes(0, CMD_READ, 2, 0, 8));
    b.extend(request_bytes(0, CMD_WRITE, 3, 8, 8));
    b.extend(b"ijkl");
    serving.send(&b);
    let mut replies = [serving.simple_reply(), serving.simple_reply()];
    replies.sort_by_key(|r| r.1);
    assert_eq!(
        replies,
        [(0, 1), (ESHUTDOWN, 2)],
        "write done, read refused"
    );
    // The refusal of the third waits for the rest of its payload (the spec: consume, then
    // fail; a client still sending cannot take a reply), and the connection stays until then.
    serving
        .0
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut early = [0u8; 1];
    let got = serving.0.read(&mut early);
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a reply or close before the payload was in: {got:?}"
    );
    serving.0.set_read_timeout(None).unwrap();
    serving.send(b"mnop");
    assert_eq!(serving.simple_reply(), (ESHUTDOWN, 3));
    assert!(serving.closed_by_server());
    drop(negotiating);

    let mut child = srv.child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}: {}", srv.log());
    let disk = std::fs::read(dir.path("disk.raw")).unwrap();
    assert_eq!(
        &disk[..8],
        b"abcdefgh",
        "the write in flight at SIGTERM is done"
    );
}

#[test]
fn structured_error_chunks_carry_a_message() {
    let dir = Scratch::new("hostile-structured");
    let srv = server(&dir, &[]);
    let mut c = Raw::negotiate(&srv, true);
    c.request(0, CMD_READ, 9, EXPORT_BYTES, 1);
    assert_eq!(c.u32(), STRUCTURED_REPLY_MAGIC);
    let flags = c.u16();
    let kind = c.u16();
    assert_eq!((flags & 1, kind), (1, (1 << 15) + 1), "final ERROR chunk");
    assert_eq!(c.u64(), 9);
    let len = c.u32() as usize;
    let payload = c.recv(len);
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), EINVAL);
    let msg_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    assert!(msg_len > 0 && payload.len() == 6 + msg_len);
    srv.stop();
}

#[test]
fn disc_answers_everything_received_first() {
    let dir = Scratch::new("hostile-disc");
    let srv = server(&dir, &[]);
    let mut c = Raw::negotiate(&srv, false);
    // Many writes, then DISC, all in one burst: every write is answered before the close.
    let mut burst = Vec::new();
    for i in 0..50u64 {
        burst.extend(request_bytes(0, CMD_WRITE, i, i * 4096, 4096));
        burst.extend_from_slice(&[i as u8 + 1; 4096]);
    }
    burst.extend(request_bytes(0, CMD_DISC, 0, 0, 0));
    c.send(&burst);
    let mut cookies: Vec<u64> = (0..50)
        .map(|_| c.simple_reply())
        .map(|(e, k)| {
            assert_eq!(e, 0);
            k
        })
        .collect();
    cookies.sort();
    assert_eq!(cookies, (0..50).collect::<Vec<_>>());
    assert!(c.closed_by_server());
    let log = srv.stop();
    assert!(log.contains("NBD_CMD_DISC"), "{log}");
    let data = std::fs::read(dir.path("disk.raw")).unwrap();
    for i in 0..50usize {
        assert!(
            data[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8 + 1),
            "block {i}"
        );
    }
}

#[test]
fn disconnect_in_the_middle_of_a_write_payload() {
    let dir = Scratch::new("hostile-midwrite");
    let srv = server(&dir, &[]);
    for _ in 0..20 {
        let mut c = Raw::negotiate(&srv, true);
        c.request(0, CMD_WRITE, 1, 0, 1 << 20);
        c.send(&vec![7u8; 300_000]);
        drop(c);
    }
    still_serves(&srv);
    let log = srv.stop();
    assert!(log.contains("in the middle of a write payload"), "{log}");
}

/// Over TCP on a buffered file, a large write's payload is spliced from the socket into the file
/// when its header arrives alone (as after another large write). Cut short, or never finished,
/// it must cost the server nothing: a clean disconnect, and everyone else served.
#[test]
fn spliced_write_payload_cut_short_or_stalled() {
    let dir = Scratch::new("hostile-splice");
    let srv = server(&dir, &[]);
    let one_mib_write = |c: &mut Raw, cookie: u64| {
        c.request(0, CMD_WRITE, cookie, 0, 1 << 20);
        c.send(&vec![cookie as u8; 1 << 20]);
        assert_eq!(c.simple_reply(), (0, cookie));
    };
    // The header alone, then part of the payload or none of it, then gone.
    for sent in [300_000usize, 0] {
        let mut c = Raw::negotiate(&srv, false);
        one_mib_write(&mut c, 1);
        c.request(0, CMD_WRITE, 2, 1 << 20, 1 << 20);
        std::thread::sleep(Duration::from_millis(50));
        c.send(&vec![2u8; sent]);
        std::thread::sleep(Duration::from_millis(50));
        drop(c);
    }
    // Half a payload, then silence, with the connection held open.
    let mut stalled = Raw::negotiate(&srv, false);
    one_mib_write(&mut stalled, 3);
    stalled.request(FUA, CMD_WRITE, 4, 2 << 20, 1 << 20);
    std::thread::sleep(Duration::from_millis(50));
    stalled.send(&vec![4u8; 512 * 1024]);
    still_serves(&srv);
    // A whole spliced write still works next to it, and lands.
    let mut good = Raw::negotiate(&srv, false);
    one_mib_write(&mut good, 5);
    good.request(FUA, CMD_WRITE, 6, 4 << 20, 1 << 20);
    std::thread::sleep(Duration::from_millis(50));
    good.send(&vec![6u8; 1 << 20]);
    assert_eq!(good.simple_reply(), (0, 6));
    drop(good);
    // Shutdown waits its grace for the stalled request, then cuts it off and exits 0.
    let log = srv.stop();
    drop(stalled);
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection closed") && !l.contains("spliced_writes=0"))
        .collect();
    let cut = closed
        .iter()
        .filter(|l| l.contains("in the middle of a write payload"))
        .count();
    assert_eq!(cut, 2, "{log}");
    assert!(
        closed.iter().any(|l| l.contains("grace period expired")),
        "{log}"
    );
    let disk = std::fs::read(dir.path("disk.raw")).unwrap();
    assert!(
        disk[4 << 20..5 << 20].iter().all(|&b| b == 6),
        "spliced write lost"
    );
    assert!(
        disk[..1 << 20].iter().all(|&b| b == 5),
        "buffered write lost"
    );
}

/// A spliced write that the file system cannot hold is answered ENOSPC, its unread payload is
/// skipped, and the connection goes on (the export then refuses writes until reopened, as after
/// any failed write).
#[test]
fn spliced_write_onto_a_full_file_system_gets_enospc() {
    let dir = Scratch::new("hostile-splice-full");
    let fs = SmallFs::mount(&dir, "4m");
    let disk = fs.0.join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(EXPORT_BYTES)
        .unwrap();
    let spec = format!("disk={}", disk.display());
    let srv = Server::start(&dir, &["--export", &spec]);
    let mut c = Raw::negotiate(&srv, false);
    let mut first_error = None;
    for i in 0..8u64 {
        c.request(0, CMD_WRITE, i, i << 20, 1 << 20);
        std::thread::sleep(Duration::from_millis(20));
        c.send(&vec![0xa5; 1 << 20]);
        let (err, cookie) = c.simple_reply();
        assert_eq!(cookie, i);
        if err != 0 {
            first_error = Some(err);
            break;
        }
    }
    assert_eq!(first_error, Some(ENOSPC));
    // The payload was consumed (or skipped): the next request is parsed and answered.
    c.request(0, CMD_READ, 100, 0, 4096);
    let (err, cookie) = c.simple_reply();
    assert_eq!(cookie, 100);
    if err == 0 {
        c.recv(4096);
    }
    c.request(0, CMD_DISC, 101, 0, 0);
    assert!(c.closed_by_server());
    let log = srv.stop();
    assert!(
        log.lines().any(|l| l.contains("connection closed")
            && l.contains("NBD_CMD_DISC")
            && !l.contains("spliced_writes=0")),
        "{log}"
    );
}

#[test]
fn silent_client_is_dropped_after_the_handshake_timeout() {
    let dir = Scratch::new("hostile-silent");
    let srv = server(&dir, &[]);
    let mut c = Raw::connect(&srv);
    c.greeting();
    assert!(
        c.closed_by_server(),
        "a client that sends nothing must be dropped"
    );
    still_serves(&srv);
    let log = srv.stop();
    assert!(log.contains("handshake timed out"), "{log}");
}

fn fd_list(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            format!(
                "{:?} -> {:?}",
                e.file_name(),
                std::fs::read_link(e.path()).ok()
            )
        })
        .collect();
    v.sort();
    v
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn client_that_never_reads_replies_is_bounded_and_others_are_served() {
    let dir = Scratch::new("hostile-noread");
    let srv = server(
        &dir,
        &["--max-inflight", "64", "--max-connection-memory", "16M"],
    );
    let mut c = Raw::negotiate(&srv, false);
    c.0.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    // Ask for 4 GiB of 1 MiB reads and never read a byte back. The server must stop reading
    // requests once its per-connection budget is spent, so our sends eventually block.
    let mut req = Vec::new();
    for i in 0..4096u64 {
        req.extend(request_bytes(0, CMD_READ, i, (i % 16) << 20, 1 << 20));
    }
    let _ = c.0.write_all(&req); // times out once both socket buffers are full
    std::thread::sleep(Duration::from_millis(300));
    still_serves(&srv);
    let rss = rss_kib(srv.pid());
    assert!(rss < 256 * 1024, "server RSS {rss} KiB with a stuck client");
    drop(c);
    still_serves(&srv);
    srv.stop();
}

/// A negotiating client that sends thousands of options and does not read the replies holds a
/// bounded amount of server memory; once it reads, every option has been answered, in order.
#[test]
fn negotiating_client_that_does_not_read_is_bounded_then_answered() {
    const OPT_LIST: u32 = 3;
    const REP_SERVER: u32 = 2;
    const EXPORTS: usize = 64;
    const OPTIONS: usize = 4000;
    let dir = Scratch::new("hostile-optflood");
    // 64 exports with 128-byte names: one LIST reply is over 9 KiB, 4000 of them over 36 MiB.
    let specs: Vec<String> = (0..EXPORTS)
        .map(|i| {
            let path = dir.sparse(&format!("e{i}.raw"), 1 << 20);
            format!("--export={i:0>128}={}", path.display())
        })
        .collect();
    let args: Vec<&str> = specs.iter().map(String::as_str).collect();
    let srv = server(&dir, &args);
    let rss_before = rss_kib(srv.pid());
    let mut c = Raw::connect(&srv);
    c.greeting();
    c.send(&3u32.to_be_bytes());
    let mut options = Vec::new();
    for _ in 0..OPTIONS {
        options.extend(IHAVEOPT.to_be_bytes());
        options.extend(OPT_LIST.to_be_bytes());
        options.extend(0u32.to_be_bytes());
    }
    c.send(&options);
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_kib(srv.pid()).saturating_sub(rss_before);
    assert!(
        grown < 8 * 1024,
        "server RSS grew {grown} KiB for unread option replies"
    );
    still_serves(&srv);
    for i in 0..OPTIONS {
        // The 64 exports and `disk`, each its own SERVER reply, then the ACK.
        let mut names = Vec::new();
        loop {
            let (opt, kind, data) = c.option_reply();
            assert_eq!(opt, OPT_LIST, "option {i}");
            if kind == REP_ACK {
                break;
            }
            assert_eq!(kind, REP_SERVER, "option {i}");
            let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            names.push(data[4..4 + len].to_vec());
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), EXPORTS + 1, "option {i}");
    }
    drop(c);
    still_serves(&srv);
    srv.stop();
}

#[test]
fn hundreds_of_connections_opened_and_dropped_at_once() {
    let dir = Scratch::new("hostile-storm");
    let srv = server(&dir, &["--max-connections", "300"]);
    let fds_before = open_fds(srv.pid());
    let list_before = fd_list(srv.pid());
    for round in 0..3 {
        let mut conns = Vec::new();
        for i in 0..400 {
            match TcpStream::connect(&srv.tcp) {
                Ok(mut s) => {
                    // Some send half a handshake, some nothing.
                    if i % 3 == 0 {
                        let _ = s.write_all(&3u32.to_be_bytes());
                    }
                    conns.push(s);
                }
                Err(e) => panic!("round {round}: connect {i} failed: {e}"),
            }
        }
        drop(conns);
        // Dropped connections are reaped asynchronously; until then a new client may be refused
        // at the limit (correctly). Within a bounded time a good client is served again.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = run_with_status(
                "qemu-io",
                &["-f", "raw", "-c", "read 0 4k", &srv.uri("disk")],
            );
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no service 10 s after the storm"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        still_serves(&srv);
    }
    // Every dropped connection was released: descriptors return to where they started.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(srv.pid()) > fds_before {
        assert!(
            Instant::now() < deadline,
            "descriptors leaked: {list_before:#?} before, {:#?} after",
            fd_list(srv.pid())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Connections over the limit are accepted and closed, and logged.
    let log = srv.stop();
    assert!(log.contains("connection limit"), "{log}");
}

#[test]
fn unix_socket_serves_the_same_export() {
    let dir = Scratch::new("hostile-unix");
    let srv = server(&dir, &[]);
    let mut s = std::os::unix::net::UnixStream::connect(&srv.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"NBDMAGIC");
    s.write_all(&[0xff; 4]).unwrap(); // unknown client flags
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("unknown client flags must close the Unix connection, got {other:?}"),
    }
    let out = stdout(&run(
        "qemu-io",
        &["-f", "raw", "-c", "read 0 4k", &srv.unix_uri("disk")],
    ));
    assert!(out.contains("read 4096/4096"), "{out}");
    srv.stop();
}
