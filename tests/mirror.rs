//! The pair's mirrored data path (issue 23): a volume created on both nodes, every write on
//! both before it is acknowledged, the replica's checks on what the peer link brings. Real
//! `streamer serve` processes, a real etcd, real NBD clients (fio, nbdcopy, python libnbd),
//! kill -9. Every wait is bounded.

#[path = "common/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cluster::{Etcd, Node, wait_until};
use common::{BIN, Scratch, data_file, run, run_with, run_with_status, stdout};
use streamer::peer::wire::{self, Header, Hello, Kind};

/// `streamer ARGS --mgmt-socket` of `node`.
fn cli(node: &Node, args: &[&str]) -> String {
    let mut a = args.to_vec();
    let sock = node.mgmt();
    a.extend(["--mgmt-socket", &sock]);
    stdout(&run(BIN, &a))
}

/// Like `cli`, expecting a refusal: its message.
fn cli_fails(node: &Node, args: &[&str]) -> String {
    let mut a = args.to_vec();
    let sock = node.mgmt();
    a.extend(["--mgmt-socket", &sock]);
    let out = run_with(BIN, &a, true);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Two nodes of pair p1 with their link up and the same golden image `g` (16 MiB) on both.
fn pair_with_image(etcd: &Etcd, scratch: &Scratch) -> (Node, Node) {
    pair_with(etcd, scratch, "5", &[])
}

/// `pair_with_image` with a presence lease of `lease` seconds and more `serve` arguments.
fn pair_with(etcd: &Etcd, scratch: &Scratch, lease: &str, extra: &[&str]) -> (Node, Node) {
    let a = Node::start_with(Scratch::new("node-a"), "a", etcd, lease, extra);
    let b = Node::start_with(Scratch::new("node-b"), "b", etcd, lease, extra);
    wait_until(20, "both links up", || {
        cluster::link_up(&a.pair_status()) && cluster::link_up(&b.pair_status())
    });
    let raw = scratch.path("g.raw");
    data_file(&raw, 16 << 20, 7);
    // Imported on a: it lands on b too.
    cli(&a, &["image", "import", "g", raw.to_str().unwrap()]);
    wait_until(30, "the image on b", || {
        cli(&b, &["image", "list"]).contains("g ")
    });
    (a, b)
}

/// The data bytes the last resync in a node's log sent (its "resync sent" line).
fn resync_payload(log: &str) -> u64 {
    resync_field(log, "payload_bytes")
}

/// A field of the last "resync sent" line in a node's log: `payload_bytes` (data sent) or
/// `blocks_bytes` (the bitmap's blocks read, compared or sent).
fn resync_field(log: &str, field: &str) -> u64 {
    let sent = log
        .lines()
        .rfind(|l| l.contains("resync sent"))
        .unwrap_or_else(|| panic!("no resync in the log:\n{log}"));
    sent.split(&format!("{field}="))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{sent}"))
}

/// The whole export, read with nbdcopy.
fn contents(node: &Node, export: &str, scratch: &Scratch, tag: &str) -> Vec<u8> {
    let out = scratch.path(tag);
    run(
        "nbdcopy",
        &[&node.server.uri(export), out.to_str().unwrap()],
    );
    std::fs::read(out).unwrap()
}

fn fio_verify(uri: &str, jobs: &str, runtime: &str) {
    fio_verify_at(uri, jobs, runtime, 0);
}

/// `fio_verify` of the 8 MiB areas from `offset` on.
fn fio_verify_at(uri: &str, jobs: &str, runtime: &str, offset: u64) {
    let out = run(
        "fio",
        &[
            "--name=mirror",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k,64k",
            "--iodepth=16",
            &format!("--numjobs={jobs}"),
            &format!("--offset={offset}"),
            "--offset_increment=8M",
            "--size=8M",
            &format!("--runtime={runtime}"),
            "--time_based",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--verify_fatal=1",
            "--do_verify=1",
            // A flush at the end: the peer's copy is durable, nothing waits for its flush.
            "--end_fsync=1",
            "--group_reporting",
        ],
    );
    let text = stdout(&out);
    assert!(
        text.contains("err= 0") && !text.contains("verify:"),
        "{text}"
    );
}

#[test]
fn a_volume_lives_on_both_nodes_and_every_write_reaches_both() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-both");
    let (a, b) = pair_with_image(&etcd, &scratch);

    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    // The replica exists on b at once, from the same image.
    assert!(cli(&b, &["volume", "list"]).contains("v1"));
    assert_eq!(
        contents(&a, "v1", &scratch, "a0"),
        contents(&b, "v1", &scratch, "b0")
    );

    // Two clients on the owner, 4 KiB and 64 KiB writes, verified by fio.
    fio_verify(&a.server.uri("v1"), "2", "4");
    // The replica holds the same bytes: it applied every write before the owner answered.
    let (ca, cb) = (
        contents(&a, "v1", &scratch, "a1"),
        contents(&b, "v1", &scratch, "b1"),
    );
    assert!(ca == cb, "the replicas differ after fio");
    assert!(ca != contents(&a, "image/g", &scratch, "g"), "fio wrote");
    // The online verify says so too (on the owner; the replica's node refuses).
    let out = cli(&a, &["volume", "verify", "v1"]);
    assert!(
        out.contains("v1: ok, the two copies are identical"),
        "{out}"
    );
    let e = cli_fails(&b, &["volume", "verify", "v1"]);
    assert!(e.contains("run it on its owner"), "{e}");

    // Trims and zeroes travel too (python libnbd: trim, zero with and without NO_HOLE).
    let code = "import nbd, sys\n\
                h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                h.trim(1 << 20, 0)\n\
                h.zero(65536, 3 << 20)\n\
                h.zero(8192, 5 << 20, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)\n\
                h.pwrite(b'x' * 4096, 7 << 20, nbd.CMD_FLAG_FUA)\n\
                h.flush()\n\
                print('ok')\n";
    let out = stdout(&run("/usr/bin/python3", &["-c", code, &a.server.uri("v1")]));
    assert_eq!(out.trim(), "ok");
    let (ca, cb) = (
        contents(&a, "v1", &scratch, "a2"),
        contents(&b, "v1", &scratch, "b2"),
    );
    assert!(ca == cb, "the replicas differ after trims and zeroes");
    assert!(ca[(3 << 20)..(3 << 20) + 65536].iter().all(|&x| x == 0));
    assert_eq!(&ca[7 << 20..(7 << 20) + 4096], &[b'x'; 4096][..]);

    // The other node serves the whole device too: its reads are its replica's, its changes
    // forwarded to the owner, which orders them with its own clients' (docs/pair.md §8).
    // Clients on both nodes at once, each verifying its half of the volume.
    let info = stdout(&run("nbdinfo", &["--json", &b.server.uri("v1")]));
    assert!(info.contains("\"is_read_only\": false"), "{info}");
    std::thread::scope(|s| {
        s.spawn(|| fio_verify_at(&a.server.uri("v1"), "1", "3", 0));
        s.spawn(|| fio_verify_at(&b.server.uri("v1"), "1", "3", 8 << 20));
    });
    let out = stdout(&run("/usr/bin/python3", &["-c", code, &b.server.uri("v1")]));
    assert_eq!(out.trim(), "ok");
    let (ca, cb) = (
        contents(&a, "v1", &scratch, "a5"),
        contents(&b, "v1", &scratch, "b5"),
    );
    assert!(ca == cb, "the replicas differ after writes on both nodes");
    assert_eq!(&cb[7 << 20..(7 << 20) + 4096], &[b'x'; 4096][..]);
    let out = cli(&a, &["volume", "verify", "v1"]);
    assert!(out.contains("identical"), "{out}");

    // Both nodes know the name: neither can create it again.
    let e = cli_fails(&b, &["volume", "create", "v1", "--image", "g"]);
    assert!(e.contains("already"), "{e}");
    // Delete belongs to the owner, and takes both copies.
    let e = cli_fails(&b, &["volume", "delete", "v1"]);
    assert!(e.contains("node a owns volume \"v1\""), "{e}");
    cli(&a, &["volume", "delete", "v1"]);
    assert!(!cli(&a, &["volume", "list"]).contains("v1"));
    wait_until(10, "the replica deleted", || {
        !cli(&b, &["volume", "list"]).contains("v1")
    });

    // A volume b owns is mirrored to a: the pair is active-active.
    cli(&b, &["volume", "create", "v2", "--image", "g"]);
    fio_verify(&b.server.uri("v2"), "1", "2");
    assert!(
        contents(&a, "v2", &scratch, "a3") == contents(&b, "v2", &scratch, "b3"),
        "the replicas of v2 differ"
    );
    // Both stop cleanly, and start again serving the same roles.
    let dir_a = a.dir;
    let dir_b = b.dir;
    a.server.stop();
    b.server.stop();
    let a = Node::start_in(dir_a, "a", &etcd, "5");
    let b = Node::start_in(dir_b, "b", &etcd, "5");
    wait_until(20, "both links up again", || {
        cluster::link_up(&a.pair_status()) && cluster::link_up(&b.pair_status())
    });
    fio_verify(&b.server.uri("v2"), "1", "2");
    assert!(
        contents(&a, "v2", &scratch, "a4") == contents(&b, "v2", &scratch, "b4"),
        "the replicas of v2 differ after a restart"
    );
    b.server.stop();
    a.server.stop();
}

#[test]
fn a_volume_is_not_created_without_the_peer() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-nopeer");
    let (a, b) = pair_with_image(&etcd, &scratch);
    b.server.stop();
    wait_until(20, "the link down", || !cluster::link_up(&a.pair_status()));
    let e = cli_fails(&a, &["volume", "create", "v1", "--image", "g"]);
    assert!(e.contains("a pair volume is made on both nodes"), "{e}");
    assert!(!cli(&a, &["volume", "list"]).contains("v1"));
    a.server.stop();
}

/// A python libnbd client of `uri` that writes 4 KiB at 0 and flushes, says "ready", waits for
/// a line on stdin, then writes 4 KiB at 4096 and flushes and reports how that went and how
/// long it took, and reads block 0 back.
const WRITER: &str = "import nbd, sys, time, errno\n\
    h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
    h.pwrite(b'a' * 4096, 0); h.flush()\n\
    print('ready', flush=True)\n\
    sys.stdin.readline()\n\
    t = time.time()\n\
    try:\n\
    \x20   h.pwrite(b'b' * 4096, 4096); h.flush(); print('acknowledged', round(time.time() - t))\n\
    except nbd.Error as e:\n\
    \x20   print('failed', e.errnum == errno.EIO, round(time.time() - t))\n\
    print('read', h.pread(4096, 0) == b'a' * 4096)\n";

/// Runs WRITER on `uri`; `between` runs after "ready" and before the second write. Returns the
/// lines the client printed after "ready".
fn write_across(uri: &str, between: impl FnOnce()) -> Vec<String> {
    let mut child = std::process::Command::new("timeout")
        .args(["60", "/usr/bin/python3", "-c", WRITER, uri])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut line = [0u8; 6];
    out.read_exact(&mut line).unwrap();
    assert_eq!(&line, b"ready\n");
    between();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    child.wait().unwrap();
    rest.lines().map(str::to_owned).collect()
}

fn kill9(server: &mut common::Server) {
    let pid = nix::unistd::Pid::from_raw(server.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until(10, "the process gone", || !server.alive());
}

/// With the peer killed, the owner records the peer's replica stale in etcd and then
/// acknowledges writes alone (degraded), within the peer timeout; the blocks written are kept
/// in the volume's peer dirty bitmap, which survives a restart of the owner; the returning
/// peer refuses reads of its stale replica instead of serving old data.
#[test]
fn a_dead_peer_degrades_the_volume_and_writes_go_on() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-degrade");
    let (a, mut b) = pair_with_image(&etcd, &scratch);
    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    let lines = write_across(&a.server.uri("v1"), || kill9(&mut b.server));
    assert!(lines[0].starts_with("acknowledged"), "{lines:?}");
    // The peer timeout is 2 s (node_args); a tick and etcd add a few.
    let secs: u64 = lines[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(secs <= 10, "the write waited {secs} s");
    assert_eq!(lines[1], "read True");
    let alerts = a.alerts().join("\n");
    assert!(alerts.contains("volume v1 degraded since"), "{alerts}");
    let s = a.pair_status();
    let v = &s["volumes"][0];
    assert_eq!(
        (v["name"].as_str(), v["role"].as_str(), v["state"].as_str()),
        (Some("v1"), Some("owner"), Some("degraded")),
        "{s}"
    );
    assert!(v["out_of_sync_bytes"].as_u64().unwrap() >= 4096, "{s}");
    // More writes, acknowledged here alone, all in the bitmap (fio verifies them).
    fio_verify(&a.server.uri("v1"), "1", "2");

    // The owner restarts degraded: the bitmap is in the volume, not in memory. (Its resync
    // crawls at 1 byte/s, so the returning peer is seen stale below.)
    let dir_a = a.dir;
    a.server.stop();
    let a = Node::start_with(dir_a, "a", &etcd, "5", &["--resync-rate", "1"]);
    let alerts = a.alerts().join("\n");
    assert!(alerts.contains("volume v1 degraded since"), "{alerts}");
    assert!(!alerts.contains(" 0 B to resync"), "{alerts}");
    let lines = write_across(&a.server.uri("v1"), || {});
    assert!(lines[0].starts_with("acknowledged"), "{lines:?}");

    // The peer returns (once its lease let go of its name): its replica is stale, and reads
    // of it are refused.
    wait_until(20, "b's presence expired", || {
        cluster::node_up(&a.pair_status(), "b") == Some(false)
    });
    let b = Node::start_in(b.dir, "b", &etcd, "5");
    wait_until(20, "the link up", || cluster::link_up(&b.pair_status()));
    let code = "import nbd, sys, errno\n\
                h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                try:\n\
                \x20   h.pread(4096, 0); print('served')\n\
                except nbd.Error as e:\n\
                \x20   print('refused', e.errnum == errno.EIO)\n";
    let out = stdout(&run("/usr/bin/python3", &["-c", code, &b.server.uri("v1")]));
    assert_eq!(out.trim(), "refused True");
    let alerts = b.alerts().join("\n");
    assert!(
        alerts.contains("volume v1: this node's copy is stale"),
        "{alerts}"
    );
    b.server.stop();
    a.server.stop();
}

/// With the peer and etcd both gone, the owner cannot record the peer stale: writes fail
/// (`EIO`) rather than being acknowledged on one node unknown to the pair; reads go on.
#[test]
fn without_etcd_a_dead_peer_fails_writes() {
    let mut etcd = Etcd::start();
    let scratch = Scratch::new("mirror-noetcd");
    let (a, mut b) = pair_with_image(&etcd, &scratch);
    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    let lines = write_across(&a.server.uri("v1"), || {
        etcd.kill();
        kill9(&mut b.server);
    });
    assert!(lines[0].starts_with("failed True"), "{lines:?}");
    let secs: u64 = lines[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(secs <= 30, "the write waited {secs} s");
    assert_eq!(lines[1], "read True");
    let alerts = a.alerts().join("\n");
    assert!(alerts.contains("could not be recorded stale"), "{alerts}");
    a.server.stop();
}

/// What arrives on a data link is checked before a byte is written: a stranger's frames, a bad
/// payload checksum, an unknown volume id, a write past the end, and a fencing token below the
/// highest the replica has seen are all refused, and the replica's bytes do not change.
#[test]
fn the_replica_refuses_bad_frames_and_old_tokens() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-hostile");
    let (a, b) = pair_with_image(&etcd, &scratch);
    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    let before = contents(&b, "v1", &scratch, "b0");
    let peer = b.peer_addr();

    // A data link as node a would open one (link 9: no worker of a has that number).
    let connect = |peer: &str| {
        let mut s = TcpStream::connect(peer).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let hello = Hello {
            version: wire::VERSION,
            pair: "p1".into(),
            from: "a".into(),
            to: "b".into(),
            link: 9,
        }
        .encode();
        let h = Header::request(Kind::Hello, 1).with_payload(&hello);
        s.write_all(&h.encode()).unwrap();
        s.write_all(&hello).unwrap();
        let mut r = [0u8; 64];
        s.read_exact(&mut r).unwrap();
        assert_eq!(Header::decode(&r).unwrap().unwrap().status, 0);
        s
    };
    let write = |s: &mut TcpStream, token: u64, id: u32, offset: u64, data: &[u8]| {
        let h = Header {
            token,
            sequence: 1,
            offset,
            range: data.len() as u64,
            handle: id,
            ..Header::request(Kind::Write, 2)
        }
        .with_payload(data);
        s.write_all(&h.encode()).unwrap();
        s.write_all(data).unwrap();
        let mut r = [0u8; 64];
        s.read_exact(&mut r).unwrap();
        Header::decode(&r).unwrap().unwrap().status
    };
    let id = 1; // the pair's first volume
    let mut s = connect(&peer);
    // An unknown volume, and a range past the end: refused, the link goes on.
    assert_eq!(write(&mut s, 1, 77, 0, &[1; 4096]), libc::ENOENT as u16);
    assert_eq!(
        write(&mut s, 1, id, 16 << 20, &[1; 4096]),
        libc::EINVAL as u16
    );
    // A new owner's token (3) is recorded; the old owner's (1) is fenced from then on.
    assert_eq!(write(&mut s, 3, id, 0, &[3; 4096]), 0);
    assert_eq!(write(&mut s, 1, id, 8192, &[1; 4096]), libc::ESTALE as u16);
    // A payload that does not match its checksum ends the link; nothing of it is written.
    let data = [9u8; 4096];
    let mut h = Header {
        token: 3,
        sequence: 2,
        offset: 4096,
        range: 4096,
        handle: id,
        ..Header::request(Kind::Write, 3)
    }
    .with_payload(&data);
    h.payload_crc ^= 1;
    s.write_all(&h.encode()).unwrap();
    s.write_all(&data).unwrap();
    let mut r = [0u8; 1];
    assert!(matches!(s.read(&mut r), Ok(0) | Err(_)), "the link ends");

    let after = contents(&b, "v1", &scratch, "b1");
    assert_eq!(
        &after[..4096],
        &[3u8; 4096][..],
        "the fresh token's write landed"
    );
    assert_eq!(&after[4096..], &before[4096..], "nothing else changed");
    // The token survives a restart of the replica: still fenced.
    let dir_b = b.dir;
    b.server.stop();
    let b = Node::start_in(dir_b, "b", &etcd, "5");
    wait_until(20, "b's link up", || cluster::link_up(&b.pair_status()));
    let peer = b.peer_addr();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        // The replica is served once b rejoined; until then frames get ENOENT.
        let mut s = connect(&peer);
        if write(&mut s, 3, id, 0, &[3; 4096]) == 0 {
            break s;
        }
        assert!(Instant::now() < deadline, "b serves its replica again");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(write(&mut s, 2, id, 8192, &[2; 4096]), libc::ESTALE as u16);
    let log = b.server.log();
    assert!(log.contains("fencing token 2"), "the refusal is logged");
    drop(s);
    b.server.stop();
    a.server.stop();
}

/// The returning peer gets only what changed while it was gone: the owner resyncs the blocks
/// of its bitmap (data as WRITE, trimmed ranges as ZERO without bytes), then records the
/// replica in sync; the replicas are equal byte for byte, the peer serves reads again, and
/// writes are mirrored again.
#[test]
fn the_returning_peer_is_resynced_with_only_what_changed() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-resync");
    let (a, mut b) = pair_with_image(&etcd, &scratch);
    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    fio_verify(&a.server.uri("v1"), "1", "2");
    kill9(&mut b.server);
    // While b is gone: 3 MiB of data in three places and a 2 MiB trim, acknowledged alone.
    let code = "import nbd, sys\n\
                h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                for i, off in enumerate([1 << 20, 6 << 20, 11 << 20]):\n\
                \x20   h.pwrite(bytes([i + 1]) * (1 << 20), off)\n\
                h.trim(2 << 20, 13 << 20)\n\
                h.flush()\n\
                print('ok')\n";
    let out = stdout(&run("/usr/bin/python3", &["-c", code, &a.server.uri("v1")]));
    assert_eq!(out.trim(), "ok");
    let alerts = a.alerts().join("\n");
    assert!(alerts.contains("volume v1 degraded since"), "{alerts}");
    assert!(alerts.contains("5.00 MiB to resync"), "{alerts}");

    wait_until(20, "b's presence expired", || {
        cluster::node_up(&a.pair_status(), "b") == Some(false)
    });
    let b = Node::start_in(b.dir, "b", &etcd, "5");
    wait_until(60, "the resync done", || {
        let alerts = a.alerts().join("\n");
        !alerts.contains("volume v1") && cluster::link_up(&a.pair_status())
    });
    let log = a.server.log();
    let payload = resync_payload(&log);
    // Only the 3 MiB written travel as data; the trimmed 2 MiB as ZERO frames.
    assert_eq!(payload, 3 << 20, "{log}");
    wait_until(10, "b serves reads again", || {
        stdout(&run_with_status(
            "nbdinfo",
            &["--can", "read", &b.server.uri("v1")],
        ))
        .is_empty()
            && contents_ok(&b, "v1")
    });
    assert!(
        contents(&a, "v1", &scratch, "a") == contents(&b, "v1", &scratch, "b"),
        "the replicas differ after the resync"
    );
    let s = a.pair_status();
    assert_eq!(s["volumes"][0]["state"], "in_sync", "{s}");
    let s = b.pair_status();
    assert_eq!(
        (
            s["volumes"][0]["role"].as_str(),
            s["volumes"][0]["state"].as_str()
        ),
        (Some("replica"), Some("in_sync")),
        "{s}"
    );
    // Mirrored again: a write on a reaches b.
    fio_verify(&a.server.uri("v1"), "1", "1");
    assert!(
        contents(&a, "v1", &scratch, "a2") == contents(&b, "v1", &scratch, "b2"),
        "the replicas differ after writes in sync again"
    );
    b.server.stop();
    a.server.stop();
}

/// Whether a read of the whole export succeeds.
fn contents_ok(node: &Node, export: &str) -> bool {
    run_with_status("nbdcopy", &[&node.server.uri(export), "null:"])
        .status
        .success()
}

/// Kill -9 of either node in the middle of a resync, again and again: each restart resumes
/// from the bitmap (nothing is lost, nothing sent twice matters), and the replicas end equal.
/// The resync is slowed to 4 MiB/s so the kills land inside it.
#[test]
fn a_resync_killed_at_random_points_resumes_and_ends_equal() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-resync-kill");
    let slow = ["--resync-rate", "4M"];
    let (a, mut b) = pair_with(&etcd, &scratch, "2", &slow);
    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    kill9(&mut b.server);
    // 12 MiB written alone: about 3 s of resync at 4 MiB/s.
    let code = "import nbd, sys, os\n\
                h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                h.pwrite(os.urandom(12 << 20), 2 << 20)\n\
                h.flush()\n\
                print('ok')\n";
    let out = stdout(&run("/usr/bin/python3", &["-c", code, &a.server.uri("v1")]));
    assert_eq!(out.trim(), "ok");
    let (mut a, mut b) = (a, b);
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..4 {
        // Bring back whichever is down, wait for the resync to be under way, kill a node.
        if !b.server.alive() {
            wait_until(20, "b's presence expired", || {
                cluster::node_up(&a.pair_status(), "b") == Some(false)
            });
            b = Node::start_with(b.dir, "b", &etcd, "2", &slow);
        }
        if !a.server.alive() {
            wait_until(20, "a's presence expired", || {
                cluster::node_up(&b.pair_status(), "a") == Some(false)
            });
            a = Node::start_with(a.dir, "a", &etcd, "2", &slow);
        }
        wait_until(30, "the resync under way", || {
            a.alerts().iter().any(|x| x.contains("volume v1 resyncing"))
        });
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(200 + rng % 1200));
        if a.alerts().iter().all(|x| !x.contains("volume v1")) {
            break; // done before the kill
        }
        if round % 2 == 0 {
            kill9(&mut b.server);
        } else {
            kill9(&mut a.server);
        }
    }
    if !b.server.alive() {
        wait_until(20, "b's presence expired", || {
            cluster::node_up(&a.pair_status(), "b") == Some(false)
        });
        b = Node::start_with(b.dir, "b", &etcd, "2", &slow);
    }
    if !a.server.alive() {
        wait_until(20, "a's presence expired", || {
            cluster::node_up(&b.pair_status(), "a") == Some(false)
        });
        a = Node::start_with(a.dir, "a", &etcd, "2", &slow);
    }
    wait_until(60, "the resync done", || {
        a.alerts().iter().all(|x| !x.contains("volume v1")) && cluster::link_up(&a.pair_status())
    });
    wait_until(10, "b serves reads again", || contents_ok(&b, "v1"));
    assert!(
        contents(&a, "v1", &scratch, "a") == contents(&b, "v1", &scratch, "b"),
        "the replicas differ after resyncs cut by kill -9"
    );
    b.server.stop();
    a.server.stop();
}

/// A 10 s cut of the link between the nodes (nftables in a network namespace of the test's
/// own) under fio verify: writes stall at most about the peer timeout, go on degraded, and
/// after the link heals the owner resyncs; fio verifies every block it wrote and the replicas
/// end equal.
#[test]
fn a_cut_link_degrades_then_resyncs_under_fio() {
    cut_under_fio("mcut", 10);
}

/// The same with a 120 s cut: fio's 20 s end inside it, more writes land alone two minutes in,
/// then the link heals and the owner resyncs.
#[test]
fn a_two_minute_cut_degrades_then_resyncs() {
    cut_under_fio("mcut2", 120);
}

fn cut_under_fio(tag: &str, cut_secs: u64) {
    let ns = cluster::Netns::new(tag);
    let etcd = Etcd::start_in(Some(&ns));
    let scratch = Scratch::new("mirror-cut");
    // The namespace is the test's own: fixed ports do not collide with another test's.
    let a = Node::start_in_netns(&ns, "a", &etcd, 7101);
    let b = Node::start_in_netns(&ns, "b", &etcd, 7102);
    wait_until(20, "links up", || {
        cluster::link_up(&a.pair_status()) && cluster::link_up(&b.pair_status())
    });
    let raw = scratch.path("g.raw");
    data_file(&raw, 16 << 20, 7);
    cli(&a, &["image", "import", "g", raw.to_str().unwrap()]);
    wait_until(30, "the image on b", || {
        cli(&b, &["image", "list"]).contains("g ")
    });
    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    // fio runs inside the namespace (the nodes listen on its loopback).
    let uri = a.server.uri("v1");
    let mut wrapped: Vec<String> = ns.wrapper().iter().map(|s| s.to_string()).collect();
    wrapped.extend(
        [
            "fio",
            "--name=cut",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=8",
            "--runtime=20",
            "--time_based",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--verify_fatal=1",
            "--do_verify=1",
            "--end_fsync=1",
        ]
        .map(String::from),
    );
    let fio = std::process::Command::new("timeout")
        .arg("180")
        .args(&wrapped)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    ns.cut(&[7101, 7102]);
    wait_until(20, "the volume degraded", || {
        a.alerts()
            .iter()
            .any(|x| x.contains("volume v1 degraded since"))
    });
    let cut_at = Instant::now() - Duration::from_secs(1);
    if cut_secs <= 17 {
        std::thread::sleep(Duration::from_secs(cut_secs).saturating_sub(cut_at.elapsed()));
        ns.heal();
    }
    let out = fio.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("err= 0") && !text.contains("verify:"),
        "{text}"
    );
    if cut_secs > 17 {
        // Still cut: more writes alone near its end, then the link heals.
        std::thread::sleep(Duration::from_secs(cut_secs - 5).saturating_sub(cut_at.elapsed()));
        let mut again: Vec<String> = ns.wrapper().iter().map(|s| s.to_string()).collect();
        again.extend(
            [
                "fio",
                "--name=late",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=64k",
                "--size=16M",
                "--iodepth=4",
                "--runtime=3",
                "--time_based",
                "--verify=crc32c",
                "--verify_state_save=0",
                "--verify_fatal=1",
                "--do_verify=1",
                "--end_fsync=1",
            ]
            .map(String::from),
        );
        let again: Vec<&str> = again.iter().map(String::as_str).collect();
        let text = stdout(&run(again[0], &again[1..]));
        assert!(
            text.contains("err= 0") && !text.contains("verify:"),
            "{text}"
        );
        assert!(
            a.alerts()
                .iter()
                .any(|x| x.contains("volume v1 degraded since")),
            "still degraded near the end of the cut"
        );
        std::thread::sleep(Duration::from_secs(cut_secs).saturating_sub(cut_at.elapsed()));
        ns.heal();
    }
    wait_until(60, "resynced", || {
        a.alerts().iter().all(|x| !x.contains("volume v1")) && cluster::link_up(&a.pair_status())
    });
    let copy = |node: &Node, tag: &str| {
        let out = scratch.path(tag);
        let mut args: Vec<String> = ns.wrapper().iter().map(|s| s.to_string()).collect();
        args.extend([
            "nbdcopy".into(),
            node.server.uri("v1"),
            out.to_str().unwrap().into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(args[0], &args[1..]);
        std::fs::read(out).unwrap()
    };
    wait_until(10, "b serves reads again", || {
        let mut args: Vec<String> = ns.wrapper().iter().map(|s| s.to_string()).collect();
        args.extend(["nbdcopy".into(), b.server.uri("v1"), "null:".into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_with_status(args[0], &args[1..]).status.success()
    });
    assert!(
        copy(&a, "a") == copy(&b, "b"),
        "the replicas differ after the cut"
    );
    b.server.stop();
    a.server.stop();
}

/// Writes 4 KiB blocks 0, 1, 2, ... (block i holds byte i % 251 + 1), flushing after every 8
/// and printing the number of blocks a completed flush covers, until killed.
const LOGGER: &str = "import nbd, sys\n\
    h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
    i = 0\n\
    while i < 4096:\n\
    \x20   h.pwrite(bytes([i % 251 + 1]) * 4096, i * 4096)\n\
    \x20   i += 1\n\
    \x20   if i % 8 == 0:\n\
    \x20       h.flush(); print(i, flush=True)\n";

/// Reads blocks `0..n` of `uri` and checks each holds LOGGER's pattern.
fn check_logged(uri: &str, n: u64) {
    let code = "import nbd, sys\n\
                h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                bad = [i for i in range(int(sys.argv[2])) \
                       if h.pread(4096, i * 4096) != bytes([i % 251 + 1]) * 4096]\n\
                print('bad', bad[:5])\n";
    let out = stdout(&run("/usr/bin/python3", &["-c", code, uri, &n.to_string()]));
    assert_eq!(
        out.trim(),
        "bad []",
        "acknowledged writes missing after promotion"
    );
}

/// Runs LOGGER on `uri` for about `secs` seconds, then `kill` (which kills the owner); returns
/// how many blocks completed flushes acknowledged.
fn log_until_killed(uri: &str, secs: u64, kill: impl FnOnce()) -> u64 {
    use std::io::BufRead;
    let mut child = std::process::Command::new("timeout")
        .args(["120", "/usr/bin/python3", "-c", LOGGER, uri])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let a2 = acked.clone();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Ok(n) = line.trim().parse::<u64>() {
                a2.store(n, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    std::thread::sleep(Duration::from_secs(secs));
    kill();
    let _ = child.wait();
    reader.join().unwrap();
    acked.load(std::sync::atomic::Ordering::SeqCst)
}

/// Kill -9 of the owner under a writer that flushes: `volume promote` on the survivor is
/// refused while the owner is up, accepted once its presence is gone, and every write a flush
/// acknowledged reads back there. The survivor writes on alone; the old owner returns as a
/// stale replica, is resynced whole and ends byte-equal.
#[test]
fn a_dead_owner_is_replaced_by_promotion_and_nothing_acknowledged_is_lost() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-promote");
    let (a, b) = pair_with(&etcd, &scratch, "2", &[]);
    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    let e = cli_fails(&b, &["volume", "promote", "v1"]);
    assert!(e.contains("is up: promoting would make two writers"), "{e}");
    let mut a = a;
    let acked = log_until_killed(&a.server.uri("v1"), 2, || kill9(&mut a.server));
    assert!(
        acked >= 8,
        "the writer got going ({acked} blocks acknowledged)"
    );
    wait_until(20, "a's presence expired", || {
        cluster::node_up(&b.pair_status(), "a") == Some(false)
    });
    cli(&b, &["volume", "promote", "v1"]);
    check_logged(&b.server.uri("v1"), acked);
    // b writes on alone (a is stale now, and down).
    fio_verify(&b.server.uri("v1"), "1", "1");
    let alerts = b.alerts().join("\n");
    assert!(alerts.contains("volume v1 degraded since"), "{alerts}");
    // a returns: not the owner any more; its copy is resynced whole from b.
    let a = Node::start_with(a.dir, "a", &etcd, "2", &[]);
    wait_until(60, "resynced", || {
        b.alerts().iter().all(|x| !x.contains("volume v1")) && cluster::link_up(&b.pair_status())
    });
    wait_until(10, "a serves reads again", || contents_ok(&a, "v1"));
    assert!(
        contents(&a, "v1", &scratch, "a") == contents(&b, "v1", &scratch, "b"),
        "the replicas differ after the returning owner's resync"
    );
    // Mirrored again, now owned by b.
    fio_verify(&b.server.uri("v1"), "1", "1");
    assert!(
        contents(&a, "v1", &scratch, "a2") == contents(&b, "v1", &scratch, "b2"),
        "the replicas differ after writes mirrored from the new owner"
    );
    a.server.stop();
    b.server.stop();
}

/// Writes 1 MiB of `byte` at `at` through `uri` and flushes.
fn write_mib(uri: &str, byte: u8, at: u64) {
    let code = format!(
        "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
         h.pwrite(bytes([{byte}]) * (1 << 20), {at}); h.flush(); print('ok')\n"
    );
    assert_eq!(
        stdout(&run("/usr/bin/python3", &["-c", &code, uri])).trim(),
        "ok"
    );
}

/// The state `pair status` gives volume `name` on `node`.
fn volume_state(node: &Node, name: &str) -> String {
    let v = node.pair_status();
    v["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|x| x["name"] == name))
        .map_or_else(String::new, |x| {
            x["state"].as_str().unwrap_or("").to_owned()
        })
}

/// A partition with writes on both sides: the owner a writes alone (b recorded stale), then
/// dies; the stale survivor b is not promoted without --force; forced, it writes too. When a
/// returns, both nodes find the split brain (their copies' generations both moved on from the
/// one they parted at) and nothing is merged or resynced. a wrote 0xaa at 1 MiB, b 0xbb at
/// 5 MiB.
fn split_brain(etcd: &Etcd, scratch: &Scratch) -> (Node, Node) {
    let (a, mut b) = pair_with(etcd, scratch, "2", &[]);
    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    kill9(&mut b.server);
    write_mib(&a.server.uri("v1"), 0xaa, 1 << 20);
    let mut a = a;
    kill9(&mut a.server);
    // b's own presence (lease 2 s) must expire before b can start again.
    std::thread::sleep(Duration::from_secs(3));
    let b = Node::start_in(b.dir, "b", etcd, "2");
    wait_until(20, "a seen down", || {
        cluster::node_up(&b.pair_status(), "a") == Some(false)
    });
    let e = cli_fails(&b, &["volume", "promote", "v1"]);
    assert!(e.contains("copy of \"v1\" is stale"), "{e}");
    cli(&b, &["volume", "promote", "v1", "--force"]);
    write_mib(&b.server.uri("v1"), 0xbb, 5 << 20);
    let a = Node::start_in(a.dir, "a", etcd, "2");
    wait_until(20, "links up", || cluster::link_up(&a.pair_status()));
    // Both nodes say so, from the generations; a does not serve its copy.
    wait_until(20, "both see the split brain", || {
        let found = |n: &Node| {
            n.alerts()
                .iter()
                .any(|x| x.contains("split brain") && x.contains("both changed since generation"))
        };
        found(&a) && found(&b)
    });
    assert_eq!(volume_state(&b, "v1"), "split_brain");
    assert_eq!(volume_state(&a, "v1"), "split_brain");
    assert!(!contents_ok(&a, "v1"));
    // Nothing is resynced over either side while it lasts.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !b.server.log().contains("resync started"),
        "{}",
        b.server.log()
    );
    (a, b)
}

/// The ends of a resolve: both copies equal, the kept side's write there, the other's gone.
fn resolved(a: &Node, b: &Node, owner: &Node, scratch: &Scratch, kept: (u8, u64), gone: (u8, u64)) {
    wait_until(60, "resynced", || {
        owner.alerts().iter().all(|x| !x.contains("volume v1"))
            && cluster::link_up(&owner.pair_status())
    });
    wait_until(10, "both serve reads", || {
        contents_ok(a, "v1") && contents_ok(b, "v1")
    });
    let (ca, cb) = (
        contents(a, "v1", scratch, "a"),
        contents(b, "v1", scratch, "b"),
    );
    assert!(ca == cb, "the copies differ after the resolve");
    let range = |at: u64| &ca[at as usize..(at + (1 << 20)) as usize];
    assert!(range(kept.1).iter().all(|&x| x == kept.0), "the kept write");
    assert!(
        !range(gone.1).iter().all(|&x| x == gone.0),
        "the discarded write"
    );
    let out = cli(owner, &["volume", "verify", "v1"]);
    assert!(out.contains("identical"), "{out}");
    for n in [a, b] {
        let alerts = n.alerts().join("\n");
        assert!(!alerts.contains("volume v1"), "{alerts}");
    }
}

/// `volume resolve --keep b` (the owner since the forced promotion): a's changes are
/// discarded and its copy resynced from b.
#[test]
fn a_split_brain_resolved_keeping_the_new_owner() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-split-b");
    let (a, b) = split_brain(&etcd, &scratch);
    let e = cli_fails(&a, &["volume", "resolve", "v1", "--keep", "c"]);
    assert!(e.contains("not in the pair"), "{e}");
    cli(&b, &["volume", "resolve", "v1", "--keep", "b"]);
    resolved(&a, &b, &b, &scratch, (0xbb, 5 << 20), (0xaa, 1 << 20));
    a.server.stop();
    b.server.stop();
}

/// `volume resolve --keep a` (the deposed side), run on b: a becomes the owner again with the
/// next fencing token, b stops writing, its changes are discarded, its copy resynced from a.
#[test]
fn a_split_brain_resolved_keeping_the_deposed_side() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-split-a");
    let (a, b) = split_brain(&etcd, &scratch);
    cli(&b, &["volume", "resolve", "v1", "--keep", "a"]);
    resolved(&a, &b, &a, &scratch, (0xaa, 1 << 20), (0xbb, 5 << 20));
    // a owns it: writes there are mirrored to b again.
    write_mib(&a.server.uri("v1"), 0xcc, 9 << 20);
    let out = cli(&a, &["volume", "verify", "v1"]);
    assert!(out.contains("identical"), "{out}");
    a.server.stop();
    b.server.stop();
}

/// Gives the copy of blank volume `name` in `dir`'s pool another generation, with the format's
/// own code (the node is stopped).
fn regenerate(dir: &Scratch, name: &str, g: u8) {
    let open = |f: &str| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path("pool/volumes").join(name).join(f))
            .unwrap();
        volume_format::FileStorage::new(file).unwrap()
    };
    let mut v =
        volume_format::Volume::open(open("volume.meta"), open("volume.data"), None).unwrap();
    v.set_generation([g; 16], false).unwrap();
    v.close().unwrap();
}

/// Puts `value` at `key` through etcd's JSON gateway (a record as an older build wrote it).
fn etcd_put(etcd: &Etcd, key: &str, value: &str) {
    let code = "import base64, json, sys, urllib.request\n\
                b = lambda s: base64.b64encode(s.encode()).decode()\n\
                body = json.dumps({'key': b(sys.argv[2]), 'value': b(sys.argv[3])}).encode()\n\
                urllib.request.urlopen(urllib.request.Request(sys.argv[1] + '/v3/kv/put', body))\n\
                print('ok')\n";
    let out = run("/usr/bin/python3", &["-c", code, &etcd.url, key, value]);
    assert_eq!(stdout(&out).trim(), "ok");
}

/// Copies with no generation in common (here b's copies given another history on disk while
/// b was stopped) are unrelated data: both nodes alert, and the owner's resync does not copy
/// over it, until `volume resolve` picks a side, also for a volume whose owner was in sync
/// (v3: it is then served again, degraded). A volume that is not split has nothing to resolve.
/// A volume recorded by a build before generations (v4: its record names none) has its
/// copies' generations made one by the owner, once, when nothing says they differ.
#[test]
fn unrelated_copies_are_refused_until_resolved() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-unrelated");
    let (a, b) = pair_with(&etcd, &scratch, "2", &[]);
    for v in ["v2", "v3", "v4"] {
        cli(&a, &["volume", "create", v, "--size", "16M"]);
    }
    let e = cli_fails(&b, &["volume", "resolve", "v2", "--keep", "a"]);
    assert!(e.contains("not split"), "{e}");
    let dir_b = b.dir;
    b.server.stop();
    write_mib(&a.server.uri("v2"), 0xcc, 0);
    regenerate(&dir_b, "v2", 0x5a);
    regenerate(&dir_b, "v3", 0x5b);
    regenerate(&dir_b, "v4", 0x5c);
    // v4's record as a build before generations wrote it (the third volume: id 3).
    etcd_put(
        &etcd,
        "/streamer/p1/volumes/v4",
        &format!(
            r#"{{"id":3,"owner":"a","token":1,"image":null,"size":{},"ready":true}}"#,
            16 << 20
        ),
    );
    let b = Node::start_in(dir_b, "b", &etcd, "2");
    wait_until(20, "both see unrelated data", || {
        let found = |n: &Node| {
            n.alerts()
                .iter()
                .filter(|x| x.contains("unrelated data"))
                .count()
        };
        found(&a) == 2 && found(&b) == 2
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(!a.server.log().contains("resync started"));
    assert_eq!(volume_state(&a, "v2"), "unrelated");
    assert_eq!(volume_state(&a, "v4"), "in_sync");
    assert!(a.server.log().contains("the peer's copy took this one's"));
    // v3's owner was in sync: resolved, it is served again degraded and resyncs.
    cli(&a, &["volume", "resolve", "v3", "--keep", "a"]);
    wait_until(60, "v3 resynced", || {
        volume_state(&a, "v3") == "in_sync" && contents_ok(&b, "v3")
    });
    let out = cli(&a, &["volume", "verify", "v3"]);
    assert!(out.contains("identical"), "{out}");
    assert!(
        !contents_ok(&b, "v2"),
        "b serves reads of unrelated data: {}\n{}",
        b.pair_status(),
        b.server.log()
    );
    cli(&a, &["volume", "resolve", "v2", "--keep", "a"]);
    wait_until(60, "resynced", || {
        a.alerts().iter().all(|x| !x.contains("volume v2"))
    });
    wait_until(10, "b serves reads", || contents_ok(&b, "v2"));
    let out = cli(&a, &["volume", "verify", "v2"]);
    assert!(out.contains("identical"), "{out}");
    let cb = contents(&b, "v2", &scratch, "b");
    assert!(cb[..1 << 20].iter().all(|&x| x == 0xcc));
    a.server.stop();
    b.server.stop();
}

/// Kill -9 of the owner under a writer, then the owner restarts (no promotion): writes in
/// flight may have reached one copy and not the other, so the restarted owner records its peer
/// stale before it serves a write and resyncs the extents of its activity log, comparing
/// checksums first: only those 4 MiB extents are read (not the 256 MiB volume), only blocks
/// that differ travel, and the copies end equal.
#[test]
fn an_owner_killed_mid_write_resyncs_its_peer_on_restart() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-owner-crash");
    let (a, b) = pair_with(&etcd, &scratch, "2", &[]);
    cli(
        &a,
        &["volume", "create", "v1", "--image", "g", "--size", "256M"],
    );
    let mut a = a;
    let acked = log_until_killed(&a.server.uri("v1"), 2, || kill9(&mut a.server));
    assert!(acked >= 8, "{acked}");
    wait_until(20, "a's presence expired", || {
        cluster::node_up(&b.pair_status(), "a") == Some(false)
    });
    let a = Node::start_with(a.dir, "a", &etcd, "2", &[]);
    wait_until(60, "resynced", || {
        a.alerts().iter().all(|x| !x.contains("volume v1")) && cluster::link_up(&a.pair_status())
    });
    let log = a.server.log();
    assert!(
        log.contains("stopped uncleanly: the activity log's extents"),
        "{log}"
    );
    let payload = resync_payload(&log);
    // Compared first: at most the blocks in flight at the kill travel.
    assert!(payload < 1 << 20, "{payload}");
    // Only the logged extents were compared: the writer stays in the first 16 MiB.
    let compared = resync_field(&log, "blocks_bytes");
    assert!(compared > 0 && compared <= 16 << 20, "{compared}");
    check_logged(&a.server.uri("v1"), acked);
    let out = cli(&a, &["volume", "verify", "v1"]);
    assert!(out.contains("identical"), "{out}");
    b.server.stop();
    a.server.stop();
}

/// Kill -9 of the replica's node while nothing is being written: no write fails on the
/// owner, yet writes the replica took but had not flushed could be gone (after a power loss).
/// The restarted replica tells its owner, which records it stale and resyncs its activity
/// log's extents, comparing first: only those are read (the writer stayed in the first
/// 16 MiB of a 256 MiB volume), nothing differs here (a kill -9 keeps the page cache), and
/// the copies are identical after.
#[test]
fn a_replica_that_crashed_has_the_logged_extents_resynced() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-replica-crash");
    let (a, mut b) = pair_with(&etcd, &scratch, "2", &[]);
    cli(
        &a,
        &["volume", "create", "v1", "--image", "g", "--size", "256M"],
    );
    for i in 0..4 {
        write_mib(&a.server.uri("v1"), 0x40 + i, u64::from(i) << 22);
    }
    kill9(&mut b.server);
    // b's presence (lease 2 s) must expire before b can start again.
    wait_until(20, "b seen down", || {
        cluster::node_up(&a.pair_status(), "b") == Some(false)
    });
    let b = Node::start_in(b.dir, "b", &etcd, "2");
    wait_until(30, "the owner told and resynced", || {
        let log = a.server.log();
        log.contains("the peer's replica restarted after a crash") && log.contains("resync done")
    });
    wait_until(20, "in sync again", || volume_state(&a, "v1") == "in_sync");
    let log = a.server.log();
    let compared = resync_field(&log, "blocks_bytes");
    assert!(compared > 0 && compared <= 16 << 20, "{compared}");
    assert_eq!(resync_payload(&log), 0, "nothing differed");
    let out = cli(&a, &["volume", "verify", "v1"]);
    assert!(out.contains("identical"), "{out}");
    wait_until(10, "b serves reads", || contents_ok(&b, "v1"));
    a.server.stop();
    b.server.stop();
}

/// Golden images live on both nodes: an import on one lands on the other (its digest checked
/// there), an image imported while the peer was away goes to it when it is back, a capture
/// lands on both, and a delete removes both copies.
#[test]
fn golden_images_live_on_both_nodes() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-images");
    let (a, b) = pair_with_image(&etcd, &scratch);
    let sha = |n: &Node, image: &str| {
        let mut args = vec!["image", "show", image, "--json"];
        let sock = n.mgmt();
        args.extend(["--mgmt-socket", &sock]);
        let v: serde_json::Value = serde_json::from_slice(&run(BIN, &args).stdout).unwrap();
        v["sha256"].as_str().unwrap().to_string()
    };
    assert_eq!(sha(&a, "g"), sha(&b, "g"));
    // b away: an image imported on a meanwhile reaches b once it is back.
    let dir_b = b.dir;
    b.server.stop();
    let raw2 = scratch.path("g2.raw");
    data_file(&raw2, 8 << 20, 9);
    cli(&a, &["image", "import", "g2", raw2.to_str().unwrap()]);
    let b = Node::start_in(dir_b, "b", &etcd, "5");
    wait_until(40, "g2 on b", || {
        cli(&b, &["image", "list"]).contains("g2 ")
    });
    assert_eq!(sha(&a, "g2"), sha(&b, "g2"));
    // A capture of a pair volume lands on both.
    cli(&a, &["volume", "create", "v1", "--image", "g2"]);
    fio_verify(&a.server.uri("v1"), "1", "1");
    cli(&a, &["image", "capture", "cap", "--from", "v1"]);
    wait_until(30, "cap on b", || {
        cli(&b, &["image", "list"]).contains("cap ")
    });
    assert_eq!(sha(&a, "cap"), sha(&b, "cap"));
    // A delete removes both copies.
    cli(&a, &["image", "delete", "cap"]);
    assert!(!cli(&a, &["image", "list"]).contains("cap "));
    wait_until(10, "cap gone from b", || {
        !cli(&b, &["image", "list"]).contains("cap ")
    });
    b.server.stop();
    a.server.stop();
}

/// `volume move` hands a volume to the other node: the old owner's clients are disconnected,
/// the new owner takes writes (mirrored back), the old one serves reads, and it moves back.
#[test]
fn a_volume_moves_between_the_nodes() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-move");
    let (a, b) = pair_with_image(&etcd, &scratch);
    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    fio_verify(&a.server.uri("v1"), "1", "1");
    let e = cli_fails(&b, &["volume", "move", "v1", "--to", "a"]);
    assert!(e.contains("run it on its owner"), "{e}");
    let role = |n: &Node| {
        let s = n.pair_status();
        s["volumes"][0]["role"].as_str().unwrap().to_string()
    };
    // Moved while clients on both nodes write and verify, each its half of the volume: they
    // stay connected, their writes wait for the move, then go on through the new roles (the
    // old owner's forwarded to the new one, the other node's now ordered there). fio fails on
    // any error or wrong byte. Then back again, the same way.
    let moved_under_fio = |from: &Node, to: &str| {
        std::thread::scope(|s| {
            s.spawn(|| fio_verify_at(&a.server.uri("v1"), "1", "6", 0));
            s.spawn(|| fio_verify_at(&b.server.uri("v1"), "1", "6", 8 << 20));
            std::thread::sleep(Duration::from_secs(2));
            cli(from, &["volume", "move", "v1", "--to", to]);
        });
    };
    moved_under_fio(&a, "b");
    assert_eq!(role(&a), "replica");
    wait_until(10, "b owns it", || role(&b) == "owner");
    assert!(
        contents(&a, "v1", &scratch, "a") == contents(&b, "v1", &scratch, "b"),
        "the copies differ after the move"
    );
    moved_under_fio(&b, "a");
    assert_eq!(role(&b), "replica");
    wait_until(10, "a owns it again", || role(&a) == "owner");
    // Neither node served the volume anew: no client was disconnected.
    for n in [&a, &b] {
        assert!(
            !n.server.log().contains("served anew"),
            "{}",
            n.server.log()
        );
    }
    let out = cli(&a, &["volume", "verify", "v1"]);
    assert!(out.contains("identical"), "{out}");
    b.server.stop();
    a.server.stop();
}

/// A node with an existing pool joins a pair: its image goes to the peer, its volume becomes a
/// pair volume (once it has no client) and is copied to the peer comparing first, so only the
/// volume's own blocks travel; the copies end equal and writes are mirrored.
#[test]
fn an_existing_pool_joins_a_pair() {
    let scratch = Scratch::new("mirror-adopt");
    let dir_a = Scratch::new("node-a");
    {
        let single = common::Server::start(
            &dir_a,
            &[
                "--data-dir",
                dir_a.path("pool").to_str().unwrap(),
                "--create",
            ],
        );
        let raw = scratch.path("g.raw");
        data_file(&raw, 16 << 20, 7);
        let sock = dir_a.path("pool/streamer.sock");
        let s = sock.to_str().unwrap();
        run(
            BIN,
            &[
                "image",
                "import",
                "g",
                raw.to_str().unwrap(),
                "--mgmt-socket",
                s,
            ],
        );
        run(
            BIN,
            &["volume", "create", "v1", "--image", "g", "--mgmt-socket", s],
        );
        let code = "import nbd, sys\n\
                    h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                    h.pwrite(b'\\x5a' * (1 << 20), 3 << 20); h.flush(); print('ok')\n";
        let out = stdout(&run("/usr/bin/python3", &["-c", code, &single.uri("v1")]));
        assert_eq!(out.trim(), "ok");
        single.stop();
    }
    let etcd = Etcd::start();
    let a = Node::start_in(dir_a, "a", &etcd, "5");
    let b = Node::start("b", &etcd, "5");
    wait_until(60, "v1 on b and in sync", || {
        cli(&b, &["volume", "list"]).contains("v1 ")
            && a.alerts().iter().all(|x| !x.contains("volume v1"))
    });
    let log = a.server.log();
    let payload = resync_payload(&log);
    // The 1 MiB written, not the 16 MiB volume.
    assert!(payload <= 1 << 20, "{payload}");
    wait_until(10, "b serves reads", || contents_ok(&b, "v1"));
    assert!(
        contents(&a, "v1", &scratch, "a") == contents(&b, "v1", &scratch, "b"),
        "the copies differ after joining"
    );
    fio_verify(&a.server.uri("v1"), "1", "1");
    let out = cli(&a, &["volume", "verify", "v1"]);
    assert!(out.contains("identical"), "{out}");
    b.server.stop();
    a.server.stop();
}

/// Active-active under load: volumes owned by each node, fio verify writing through both
/// owners at once while the other node reads each replica, then every pair of copies equal.
#[test]
fn both_nodes_own_volumes_and_serve_them_at_once() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-both-ways");
    let (a, b) = pair_with_image(&etcd, &scratch);
    cli(&a, &["volume", "create", "va", "--image", "g"]);
    cli(&b, &["volume", "create", "vb", "--image", "g"]);
    let fio = |uri: String| std::thread::spawn(move || fio_verify(&uri, "2", "4"));
    let reads = |uri: String| {
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(4);
            while Instant::now() < deadline {
                run("nbdcopy", &[&uri, "null:"]);
            }
        })
    };
    let jobs = [
        fio(a.server.uri("va")),
        fio(b.server.uri("vb")),
        reads(b.server.uri("va")),
        reads(a.server.uri("vb")),
    ];
    for j in jobs {
        j.join().unwrap();
    }
    for (v, owner) in [("va", &a), ("vb", &b)] {
        let out = cli(owner, &["volume", "verify", v]);
        assert!(out.contains("identical"), "{out}");
        assert!(
            contents(&a, v, &scratch, &format!("{v}-a"))
                == contents(&b, v, &scratch, &format!("{v}-b")),
            "the copies of {v} differ"
        );
    }
    b.server.stop();
    a.server.stop();
}

/// A pair volume's personality lives on both nodes: created with it on the owner, the peer's
/// replica holds it too (and exports its seed); a change on the owner reaches the peer, also
/// one made while the peer was down (sent when the link is back); the peer refuses to change
/// it; and after the owner dies, the promoted survivor has the latest personality and serves
/// its seed.
#[test]
fn a_pair_volumes_personality_is_on_both_nodes_and_survives_a_promotion() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-personality");
    let (mut a, b) = pair_with(&etcd, &scratch, "2", &[]);
    let file = |host: &str| {
        let p = scratch.path(&format!("{host}.toml"));
        std::fs::write(
            &p,
            format!(
                "hostname = \"{host}\"\n[[interfaces]]\nname = \"eth0\"\n\
                 addresses = [\"10.5.0.11/24\"]\n"
            ),
        )
        .unwrap();
        p.to_str().unwrap().to_string()
    };
    let personality = |n: &Node| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&cli(n, &["volume", "show", "v1", "--json"])).unwrap();
        v["personality"].clone()
    };
    let seed_host = |n: &Node, tag: &str| -> String {
        let img = scratch.path(&format!("seed-{tag}.img"));
        let _ = std::fs::remove_file(&img);
        run(
            "nbdcopy",
            &[&n.server.uri("seed/v1"), img.to_str().unwrap()],
        );
        let meta = stdout(&run("mtype", &["-i", img.to_str().unwrap(), "::meta-data"]));
        let v: serde_json::Value = serde_json::from_str(&meta).unwrap();
        v["local-hostname"].as_str().unwrap().to_string()
    };
    cli(
        &a,
        &[
            "volume",
            "create",
            "v1",
            "--image",
            "g",
            "--personality",
            &file("srv-1"),
        ],
    );
    let on_a = personality(&a);
    assert_eq!(on_a["hostname"], "srv-1");
    assert_eq!(
        personality(&b),
        on_a,
        "the replica holds the owner's record, instance id and all"
    );
    assert_eq!(seed_host(&b, "b1"), "srv-1");

    cli(
        &a,
        &["volume", "personality", "v1", "--set", &file("srv-2")],
    );
    assert_eq!(personality(&b)["hostname"], "srv-2");
    let e = cli_fails(
        &b,
        &["volume", "personality", "v1", "--set", &file("srv-x")],
    );
    assert!(e.contains("a pair volume this node does not own"), "{e}");

    // Changed while the peer is down: sent when it is back.
    let mut b = b;
    kill9(&mut b.server);
    cli(
        &a,
        &["volume", "personality", "v1", "--set", &file("srv-3")],
    );
    wait_until(20, "b's presence expired", || {
        cluster::node_up(&a.pair_status(), "b") == Some(false)
    });
    let b = Node::start_with(b.dir, "b", &etcd, "2", &[]);
    wait_until(30, "the new personality on b", || {
        personality(&b)["hostname"] == "srv-3"
    });
    assert_eq!(personality(&b), personality(&a));

    // The owner dies: the promoted survivor keeps the personality and its seed.
    kill9(&mut a.server);
    wait_until(20, "a's presence expired", || {
        cluster::node_up(&b.pair_status(), "a") == Some(false)
    });
    // b's copy went stale while it was down; it is resynced before a dies only if there was
    // time, so the promotion may need --force: what matters here is the personality.
    let promoted = run_with_status(
        BIN,
        &["volume", "promote", "v1", "--mgmt-socket", &b.mgmt()],
    );
    if !promoted.status.success() {
        cli(&b, &["volume", "promote", "v1", "--force"]);
    }
    assert_eq!(personality(&b)["hostname"], "srv-3");
    assert_eq!(seed_host(&b, "b2"), "srv-3");
    // Now b owns it: it changes the personality itself.
    cli(
        &b,
        &["volume", "personality", "v1", "--set", &file("srv-4")],
    );
    assert_eq!(seed_host(&b, "b3"), "srv-4");
    b.server.stop();
}

/// `volume resize` of a pair volume on its owner grows both copies and the etcd record: new
/// connections on either node see the new size, and writes past the old end are mirrored. The
/// other node refuses to resize it.
#[test]
fn a_pair_volume_grows_on_both_nodes() {
    let etcd = Etcd::start();
    let scratch = Scratch::new("mirror-grow");
    let (a, b) = pair_with_image(&etcd, &scratch);
    cli(&a, &["volume", "create", "v1", "--image", "g"]);
    let e = cli_fails(&b, &["volume", "resize", "v1", "32M"]);
    assert!(e.contains("owned by node a: resize it there"), "{e}");
    cli(&a, &["volume", "resize", "v1", "32M"]);
    for n in [&a, &b] {
        let v: serde_json::Value =
            serde_json::from_str(&cli(n, &["volume", "show", "v1", "--json"])).unwrap();
        assert_eq!(v["size"], 32 << 20, "{v}");
        let info = stdout(&run("nbdinfo", &["--size", &n.server.uri("v1")]));
        assert_eq!(info.trim(), (32u64 << 20).to_string());
    }
    // Past the old end, through the owner: on both copies.
    let code = "import nbd, sys\nh = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
                h.pwrite(b'\\x5a' * (4 << 20), 24 << 20); h.flush(); print('ok')\n";
    assert_eq!(
        stdout(&run("/usr/bin/python3", &["-c", code, &a.server.uri("v1")])).trim(),
        "ok"
    );
    let out = cli(&a, &["volume", "verify", "v1"]);
    assert!(out.contains("identical"), "{out}");
    assert!(
        contents(&a, "v1", &scratch, "a") == contents(&b, "v1", &scratch, "b"),
        "the copies differ after writes past the old end"
    );
    let e = cli_fails(&a, &["volume", "resize", "v1", "16M"]);
    assert!(e.contains("only grow"), "{e}");
    a.server.stop();
    b.server.stop();
}
