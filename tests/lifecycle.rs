//! Start-up errors and clean shutdown of the real binary.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn sigterm_with_clients_mid_io_finishes_in_flight_and_exits_zero() {
    let dir = Scratch::new("sigterm");
    let disk = dir.sparse("disk.raw", 64 << 20);
    let spec = format!("disk={}", disk.display());
    let srv = Server::start(&dir, &["--export", &spec]);
    let uri = format!("--uri={}", srv.uri("disk"));
    let mut fio = Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
        ])
        .args(["--size=64m", "--time_based", "--runtime=30", "--numjobs=2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fio");
    std::thread::sleep(Duration::from_millis(1500));
    let log = srv.stop(); // asserts exit status 0 within the bound
    let _ = fio.kill();
    let _ = fio.wait();
    assert!(log.contains("stopping"), "{log}");
    assert!(
        log.contains("server shutting down") || log.contains("disconnected"),
        "{log}"
    );
    assert!(
        !dir.path("nbd.sock").exists(),
        "the Unix socket is removed on exit"
    );
}

#[test]
fn sigint_also_stops_cleanly() {
    let dir = Scratch::new("sigint");
    let disk = dir.sparse("disk.raw", 1 << 20);
    let spec = format!("disk={}", disk.display());
    let mut srv = Server::start(&dir, &["--export", &spec]);
    let pid = nix::unistd::Pid::from_raw(srv.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let mut child = srv.child.take().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {}", srv.log());
}

/// Closing the terminal or SSH session that ran `streamer serve` sent SIGHUP, whose default
/// action ended the node at once (exit 129: no log line, no commit, a stale socket, 128 MiB of
/// a volume leaked on restart). SIGHUP (and SIGUSR1/2) are logged and ignored; SIGQUIT stops the
/// node through the clean shutdown, like SIGTERM: its pool's volumes commit and the socket goes.
#[test]
fn sighup_ends_nothing_and_sigquit_stops_cleanly() {
    use nix::sys::signal::{Signal, kill};
    let dir = Scratch::new("sighup");
    let pool = dir.path("pool");
    let mut srv = Server::start(&dir, &["--data-dir", pool.to_str().unwrap()]);
    let pid = nix::unistd::Pid::from_raw(srv.pid());
    let sock = pool.join("streamer.sock");
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--socket", sock.to_str().unwrap()]);
        run(BIN, &a)
    };
    cli(&["volume", "create", "v", "--size", "64M"]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x33 0 1M", &srv.uri("v")],
    );
    for s in [Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2] {
        kill(pid, s).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(srv.alive(), "a SIGHUP ended the node: {}", srv.log());
    cli(&["status"]);
    assert!(srv.log().contains("SIGHUP"), "{}", srv.log());
    kill(pid, Signal::SIGQUIT).unwrap();
    let mut child = srv.child.take().unwrap();
    let status = child.wait().unwrap();
    let log = srv.log();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!sock.exists(), "the management socket is removed");
    // Everything was committed: a restart finds the data and nothing leaked.
    let srv = Server::start(&dir, &["--data-dir", pool.to_str().unwrap()]);
    run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x33 0 1M", &srv.uri("v")],
    );
    let check = stdout(&cli(&["check"]));
    assert!(check.contains("v: ok"), "{check}");
    srv.stop();
}

fn serve_fails(args: &[&str]) -> String {
    // Bounded: a command line that unexpectedly starts a server is killed, and fails the test.
    let out = Command::new("timeout")
        .args(["-k", "2", "20", BIN, "serve"])
        .args(args)
        .stdout(Stdio::null())
        .output()
        .expect("run streamer");
    assert!(!out.status.success(), "streamer serve {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_command_lines_name_the_problem() {
    let dir = Scratch::new("badcli");
    // Without --export, serve runs the pool; bad pool options fail before anything is created.
    let err = serve_fails(&["--admin-group", "no-such-group-xyz"]);
    assert!(err.contains("no such group"), "{err}");
    let err = serve_fails(&["--data-dir", "/dev/null/pool", "--listen", "127.0.0.1:0"]);
    assert!(err.contains("opening the pool in /dev/null/pool"), "{err}");
    assert!(serve_fails(&["--export", "noequals"]).contains("NAME=PATH"));
    assert!(serve_fails(&["--export", "a/b=/x"]).contains("'/'"));
    let missing = dir.path("missing.raw");
    let spec = format!("disk={}", missing.display());
    let err = serve_fails(&["--listen", "127.0.0.1:0", "--export", &spec]);
    assert!(err.contains("missing.raw"), "{err}");
    assert!(
        serve_fails(&["--export", "a=/dev/null", "--max-request", "12XB"]).contains("not a size")
    );
    // The spec requires unfragmented reads of 64 KiB, so a smaller maximum is refused.
    let err = serve_fails(&["--export", "a=/dev/null", "--max-request", "4K"]);
    assert!(err.contains("between 64K"), "{err}");
    let disk = dir.sparse("d.raw", 4096);
    let (s1, s2) = (
        format!("d={}", disk.display()),
        format!("d={}", disk.display()),
    );
    let err = serve_fails(&["--listen", "127.0.0.1:0", "--export", &s1, "--export", &s2]);
    assert!(err.contains("twice"), "{err}");
    // A port already in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = serve_fails(&["--listen", &addr, "--export", &s1]);
    assert!(err.contains(&addr), "{err}");
}

#[test]
fn ipv6_loopback_listener() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; nothing to test");
        return;
    }
    let dir = Scratch::new("ipv6");
    let disk = dir.sparse("disk.raw", 1 << 20);
    let spec = format!("disk={}", disk.display());
    let srv = Server::start(&dir, &["--listen", "[::1]:0", "--export", &spec]);
    // The harness keeps the last TCP address printed: the IPv6 one.
    assert!(srv.tcp.starts_with("[::1]:"), "{}", srv.tcp);
    let size = stdout(&run("nbdinfo", &["--size", &srv.uri("disk")]));
    assert_eq!(size.trim(), (1 << 20).to_string());
    srv.stop();
}

/// Messages that misled operators: the CLI pointed at the NBD socket ("a reply this client does
/// not understand"), a user who may not manage the node ("Permission denied ... is `streamer
/// serve` running?"), --data-dir naming a file ("File exists (os error 17)"), a failed bind
/// that left a stale management socket, "pool in use" without the pid that holds it,
/// `--threads 0` running one thread, `--size -1` answered with clap's hint, and errors that
/// were not JSON under --json.
#[test]
fn messages_say_what_is_wrong() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("messages");
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pool = dir.path("pool");
    let srv = Server::start(&dir, &["--data-dir", pool.to_str().unwrap()]);
    let mgmt = pool.join("streamer.sock");
    let cli = |args: &[&str]| {
        Command::new("timeout")
            .args(["-k", "2", "20", BIN])
            .args(args)
            .output()
            .unwrap()
    };
    let err = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    // The NBD socket given where the management socket belongs.
    let nbd = dir.path("nbd.sock");
    let out = cli(&["status", "--mgmt-socket", nbd.to_str().unwrap()]);
    assert!(err(&out).contains("is an NBD socket"), "{}", err(&out));
    // A user who may not manage the node.
    let out = as_nobody(BIN, &["status", "--mgmt-socket", mgmt.to_str().unwrap()]);
    assert!(
        err(&out).contains("permission denied (only root, the node's user"),
        "{}",
        err(&out)
    );
    // No socket there (a node with only --export has none).
    let out = cli(&[
        "status",
        "--mgmt-socket",
        dir.path("nothing.sock").to_str().unwrap(),
    ]);
    assert!(
        err(&out).contains("only --export has no management socket"),
        "{}",
        err(&out)
    );
    // Under --json, the error is JSON on stdout.
    let out = cli(&[
        "volume",
        "show",
        "nope",
        "--json",
        "--mgmt-socket",
        mgmt.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "not_found", "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    // The pool in use: the pid that holds it.
    let e = serve_fails(&[
        "--data-dir",
        pool.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        e.contains(&format!("streamer process {}", srv.pid())),
        "{e}"
    );
    // Sizes and counts.
    let out = cli(&[
        "volume",
        "create",
        "v",
        "--size",
        "-1",
        "--mgmt-socket",
        mgmt.to_str().unwrap(),
    ]);
    assert!(err(&out).contains("cannot be negative"), "{}", err(&out));
    let e = serve_fails(&["--export", "a=/dev/null", "--threads", "0"]);
    assert!(e.contains("--threads") && e.contains('0'), "{e}");
    // Larger than the file system can hold (ext4 stops at 16 TiB): the size is the problem.
    let fs = stdout(&run("stat", &["-f", "-c", "%T", pool.to_str().unwrap()]));
    if fs.trim() == "ext2/ext3" {
        let out = cli(&[
            "volume",
            "create",
            "huge",
            "--size",
            "64T",
            "--mgmt-socket",
            mgmt.to_str().unwrap(),
        ]);
        assert!(
            err(&out).contains("the file system cannot hold a volume of"),
            "{}",
            err(&out)
        );
    }
    srv.stop();
    // A mistyped --data-dir: refused, nothing created; --create makes a new pool and says so.
    let typo = dir.path("poool");
    let e = serve_fails(&[
        "--data-dir",
        typo.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(e.contains("does not exist: give --create"), "{e}");
    assert!(!typo.exists());
    let srv = Server::start(&dir, &["--data-dir", typo.to_str().unwrap(), "--create"]);
    assert!(
        srv.log().contains("created a new, empty pool in"),
        "{}",
        srv.log()
    );
    srv.stop();
    // --data-dir naming a file.
    let file = dir.path("a-file");
    std::fs::write(&file, b"x").unwrap();
    let e = serve_fails(&[
        "--data-dir",
        file.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(e.contains("is not a directory"), "{e}");
    // A failed bind leaves no management socket behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = serve_fails(&["--data-dir", pool.to_str().unwrap(), "--listen", &addr]);
    assert!(e.contains(&addr), "{e}");
    assert!(!mgmt.exists(), "a stale management socket was left");
}
