//! The pair's membership and control link (issue 23): real `streamer serve` processes, a real
//! etcd on loopback ports of its own, kill -9, and hostile bytes on the peer port. Every wait is
//! bounded.

#[path = "common/cluster.rs"]
#[allow(dead_code)]
mod cluster;
mod common;

use cluster::{Etcd, Netns, Node, link_up, node_args, node_up, wait_until};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{BIN, Scratch, Server, run_with_status};
use streamer::peer::wire::{self, Header, Hello, Kind};

#[test]
fn two_nodes_form_a_pair_and_see_each_other() {
    let etcd = Etcd::start();
    let a = Node::start("a", &etcd, "5");
    let b = Node::start("b", &etcd, "5");
    wait_until(15, "both links up", || {
        link_up(&a.pair_status()) && link_up(&b.pair_status())
    });
    for (n, me, other) in [(&a, "a", "b"), (&b, "b", "a")] {
        let s = n.pair_status();
        assert_eq!(s["pair"], "p1");
        assert_eq!(s["node"], me);
        assert_eq!(s["link"]["peer"], other);
        assert_eq!(node_up(&s, "a"), Some(true));
        assert_eq!(node_up(&s, "b"), Some(true));
        assert!(s["etcd_error"].is_null());
        assert!(
            n.alerts()
                .iter()
                .all(|a| !a.contains("peer") && !a.contains("etcd")),
            "{:?}",
            n.alerts()
        );
    }
    // The human form says the same.
    let out = run_with_status(BIN, &["pair", "status", "--mgmt-socket", &a.mgmt()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("peer link:  up to b"), "{text}");
    assert!(text.contains("a (this node)"), "{text}");
    b.server.stop();
    a.server.stop();
}

#[test]
fn a_third_node_and_a_second_process_of_a_node_are_refused() {
    let etcd = Etcd::start();
    let a = Node::start("a", &etcd, "5");
    let _b = Node::start("b", &etcd, "5");
    let a_addr = a.peer_addr();
    let refused = |name: &str| {
        let dir = Scratch::new("refused");
        let args = node_args(&dir, "pool", name, &etcd.url, "5");
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.push("--create");
        let mut full = vec!["serve", "--listen", "127.0.0.1:0"];
        full.extend(args);
        let out = run_with_status(BIN, &full);
        assert!(!out.status.success(), "{name} started");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        // Refused before its pool was made.
        assert!(!dir.path("pool").exists(), "{name} created its pool");
        err
    };
    let err = refused("c");
    assert!(
        err.contains("pair p1 already has two nodes (a and b)"),
        "{err}"
    );
    let err = refused("a");
    assert!(
        err.contains("node a of pair p1 is already running"),
        "{err}"
    );
    // The refused second `a` changed nothing of the running one's record.
    assert_eq!(a.peer_addr(), a_addr);
}

#[test]
fn a_killed_peer_is_seen_down_within_its_lease_and_rejoins() {
    let etcd = Etcd::start();
    let a = Node::start("a", &etcd, "2");
    let b = Node::start("b", &etcd, "2");
    wait_until(15, "link up", || link_up(&a.pair_status()));
    let b_dir = b.dir;
    let mut b_server = b.server;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b_server.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = b_server.child.take().unwrap().wait();
    // The link notices at once (the connection drops); etcd within the 2 s lease.
    wait_until(10, "b down on a", || {
        let s = a.pair_status();
        node_up(&s, "b") == Some(false) && !link_up(&s)
    });
    let alerts = a.alerts();
    assert!(
        alerts.iter().any(|x| x.contains("peer b is down")),
        "{alerts:?}"
    );
    assert!(
        alerts.iter().any(|x| x.contains("peer link down")),
        "{alerts:?}"
    );
    // b comes back with the same pool and name.
    let b = Node::start_in(b_dir, "b", &etcd, "2");
    wait_until(15, "b back", || {
        let s = a.pair_status();
        node_up(&s, "b") == Some(true) && link_up(&s)
    });
    assert!(a.alerts().iter().all(|x| !x.contains("peer")));
    b.server.stop();
    a.server.stop();
}

#[test]
fn a_clean_stop_is_seen_at_once_not_after_the_lease() {
    let etcd = Etcd::start();
    let a = Node::start("a", &etcd, "60");
    let b = Node::start("b", &etcd, "60");
    wait_until(15, "link up", || link_up(&a.pair_status()));
    b.server.stop();
    // Far sooner than the 60 s lease: b withdrew its presence as it stopped.
    wait_until(5, "b down on a", || {
        node_up(&a.pair_status(), "b") == Some(false)
    });
    a.server.stop();
}

/// The node closed the connection (a reset counts; a timeout, i.e. still open, does not).
fn assert_closed(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: answered {n} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: still open ({e})"),
    }
}

fn frame(h: &Header, payload: &[u8]) -> Vec<u8> {
    let mut b = h.encode().to_vec();
    b.extend_from_slice(payload);
    b
}

#[test]
fn the_peer_port_refuses_strangers_and_keeps_serving_its_peer() {
    let etcd = Etcd::start();
    let a = Node::start("a", &etcd, "5");
    let b = Node::start("b", &etcd, "5");
    wait_until(15, "link up", || link_up(&a.pair_status()));
    let addr = a.peer_addr();

    // Garbage: the connection is closed, and the node says why.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0x5a; 200]).unwrap();
    assert_closed(&mut s, "garbage");

    // A well-formed HELLO from another pair: refused with EPERM, then closed.
    let hello = Hello {
        version: wire::VERSION,
        pair: "p2".into(),
        from: "x".into(),
        to: "a".into(),
        link: 0,
    }
    .encode();
    let h = Header::request(Kind::Hello, 7).with_payload(&hello);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&frame(&h, &hello)).unwrap();
    let mut reply = [0u8; wire::HEADER_BYTES];
    s.read_exact(&mut reply).unwrap();
    let r = Header::decode(&reply).unwrap().unwrap();
    assert!(r.reply && r.kind == Kind::Hello && r.cookie == 7);
    assert_eq!(i32::from(r.status), libc::EPERM);
    assert_closed(&mut s, "a refused HELLO");

    // A HELLO whose payload checksum is wrong: nothing is answered.
    let mut bad = frame(
        &Header::request(Kind::Hello, 8).with_payload(&hello),
        &hello,
    );
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&bad).unwrap();
    assert_closed(&mut s, "a bad checksum");

    // A node name that is not the pair's other member: refused, though pair and receiver fit.
    let hello = Hello {
        version: wire::VERSION,
        pair: "p1".into(),
        from: "mallory".into(),
        to: "a".into(),
        link: 0,
    }
    .encode();
    let h = Header::request(Kind::Hello, 9).with_payload(&hello);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&frame(&h, &hello)).unwrap();
    s.read_exact(&mut reply).unwrap();
    let r = Header::decode(&reply).unwrap().unwrap();
    assert_eq!(i32::from(r.status), libc::EPERM);
    assert_closed(&mut s, "a HELLO from a non-member");

    // One that trickles its HELLO: cut off after the HELLO deadline (5 s), not kept.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let started = Instant::now();
    for b in frame(
        &Header::request(Kind::Hello, 10).with_payload(&hello),
        &hello,
    )
    .iter()
    .take(20)
    {
        if s.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_closed(&mut s, "a trickled HELLO");
    assert!(started.elapsed() < Duration::from_secs(12));

    // The strangers cost the pair nothing.
    std::thread::sleep(Duration::from_secs(2));
    assert!(link_up(&b.pair_status()), "{}", b.pair_status());
    let log = a.server.log();
    assert!(log.contains("bad magic"), "{log}");
    assert!(
        log.contains("HELLO refused: it is node x of pair p2"),
        "{log}"
    );
    assert!(log.contains("payload checksum mismatch"), "{log}");
    assert!(log.contains("calls itself mallory, not a member"), "{log}");
    assert!(log.contains("no whole frame in time"), "{log}");
    b.server.stop();
    a.server.stop();
}

#[test]
fn etcd_out_of_reach_is_an_alert_and_refuses_a_start() {
    let mut etcd = Etcd::start();
    let a = Node::start("a", &etcd, "2");
    etcd.kill();
    wait_until(20, "etcd alert", || {
        a.alerts().iter().any(|x| x.contains("etcd unreachable"))
    });
    let s = a.pair_status();
    assert!(s["etcd_error"].is_string(), "{s}");
    // The node goes on serving its pool meanwhile.
    let out = run_with_status(BIN, &["volume", "list", "--mgmt-socket", &a.mgmt()]);
    assert!(out.status.success());

    // A node cannot start without reaching etcd.
    let dir = Scratch::new("no-etcd");
    let args = node_args(&dir, "pool", "b", &etcd.url, "2");
    let mut full: Vec<&str> = vec!["serve", "--listen", "127.0.0.1:0", "--create"];
    full.extend(args.iter().map(String::as_str));
    let out = run_with_status(BIN, &full);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach etcd at"), "{err}");
    a.server.stop();
}

#[test]
fn a_node_without_etcd_is_not_in_a_pair() {
    let dir = Scratch::new("alone");
    let pool = dir.path("pool");
    let server = Server::start(&dir, &["--data-dir", pool.to_str().unwrap()]);
    let sock = dir.path("pool/streamer.sock");
    let out = run_with_status(
        BIN,
        &["pair", "status", "--mgmt-socket", sock.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in a pair"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And its flags are all or nothing.
    let out = run_with_status(BIN, &["serve", "--node", "a", "--data-dir", "/nonexistent"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--etcd"));
    server.stop();
}

/// A link cut (nftables, in a namespace of the test's own) is not a node down: both nodes stay
/// up in etcd, each sees the link down within the peer timeout (no answer, not a refusal), and
/// the link comes back by itself when the cut heals.
#[test]
fn a_cut_link_is_down_while_both_nodes_stay_up_and_heals() {
    let ns = Netns::new("cut");
    let etcd = Etcd::start_in(Some(&ns));
    let a = Node::start_in_netns(&ns, "a", &etcd, 7001);
    let b = Node::start_in_netns(&ns, "b", &etcd, 7002);
    wait_until(15, "links up", || {
        link_up(&a.pair_status()) && link_up(&b.pair_status())
    });
    ns.cut(&[7001, 7002]);
    let cut_at = Instant::now();
    wait_until(15, "both links down", || {
        !link_up(&a.pair_status()) && !link_up(&b.pair_status())
    });
    for n in [&a, &b] {
        let s = n.pair_status();
        let reason = s["link"]["reason"].as_str().unwrap().to_string();
        // No answer (the pings, then the reconnections, time out): not a refusal.
        assert!(
            reason.contains("no answer within the peer timeout") || reason.contains("timed out"),
            "{reason}"
        );
        assert_eq!(node_up(&s, "a"), Some(true), "{s}");
        assert_eq!(node_up(&s, "b"), Some(true), "{s}");
        let alerts = n.alerts();
        assert!(
            alerts.iter().any(|x| x.contains("peer link down")),
            "{alerts:?}"
        );
        assert!(!alerts.iter().any(|x| x.contains("is down:")), "{alerts:?}");
    }
    // A 10 s cut, then the link heals by itself.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(cut_at.elapsed()));
    ns.heal();
    wait_until(20, "links up again", || {
        link_up(&a.pair_status()) && link_up(&b.pair_status())
    });
    b.server.stop();
    a.server.stop();
}
