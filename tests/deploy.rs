//! `streamer deploy PLAN` (issue 22) through the real binary: a hundred servers from one plan,
//! a second run that changes nothing, a changed plan that updates every personality and keeps
//! every address, a bad entry that stops the whole plan (or, with --skip-bad, only itself), a
//! dry run, and kill -9 of the node in the middle of a deployment.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::time::Instant;

use common::{BIN, Scratch, Server};

fn cli(dir: &Scratch, args: &[&str]) -> Output {
    let sock = dir.path("pool/streamer.sock");
    Command::new("timeout")
        .args(["-k", "5", "120", BIN])
        .args(args)
        .arg("--mgmt-socket")
        .arg(&sock)
        .output()
        .expect("run streamer")
}

fn ok(dir: &Scratch, args: &[&str]) -> String {
    let out = cli(dir, args);
    assert!(
        out.status.success(),
        "streamer {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A deploy that fails: its report (stdout) and stderr.
fn fails(dir: &Scratch, args: &[&str]) -> (String, String) {
    let out = cli(dir, args);
    assert!(!out.status.success(), "streamer {args:?} succeeded");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn start(dir: &Scratch) -> Server {
    let pool = dir.path("pool");
    Server::start(dir, &["--data-dir", pool.to_str().unwrap()])
}

/// An image `g` and an IP pool `rack1` of 400 addresses.
fn prepare(dir: &Scratch) {
    let img = dir.path("g.img");
    std::fs::write(&img, vec![0x5a; 1 << 20]).unwrap();
    ok(dir, &["image", "import", "g", img.to_str().unwrap()]);
    ok(
        dir,
        &[
            "ippool",
            "create",
            "rack1",
            "--subnet",
            "10.1.0.0/16",
            "--first",
            "10.1.0.10",
            "--last",
            "10.1.1.153",
            "--gateway",
            "10.1.0.1",
            "--dns",
            "10.1.0.53",
        ],
    );
}

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGqT0Vb5Q6p0n0Jw9cQ2x1y2z3a4b5c6d7e8f9g0h1i2 ops";

/// A plan of `count` web servers taking pool addresses, and one database with a static one.
fn plan(count: u32, extra: &str) -> String {
    format!(
        r#"
image = "g"
[defaults]
fqdn = "{{hostname}}.rack1.example.com"
ssh_authorized_keys = ["{KEY}"]
{extra}
[[defaults.interfaces]]
name = "eno1"
addresses = ["pool:rack1"]

[[servers]]
name = "web-{{index:03}}"
count = {count}
[[servers.interfaces]]
name = "eno1"
mac = "52:54:00:01:{{index/256:02x}}:{{index%256:02x}}"

[[servers]]
name = "db-01"
hostname = "database"
[[servers.interfaces]]
name = "eno1"
mac = "52:54:00:02:00:01"
addresses = ["10.1.9.1/16"]
gateway = "10.1.0.1"
"#
    )
}

/// Every volume's (name, instance id, addresses).
fn personalities(dir: &Scratch) -> Vec<(String, String, Vec<String>)> {
    let vols = json(&ok(dir, &["volume", "list", "--json"]));
    let mut out = Vec::new();
    for v in vols.as_array().unwrap() {
        let name = v["name"].as_str().unwrap().to_string();
        let show = json(&ok(dir, &["volume", "show", &name, "--json"]));
        let p = &show["personality"];
        if !p.is_object() {
            out.push((name, String::new(), vec![]));
            continue;
        }
        let addrs = p["interfaces"][0]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        out.push((name, p["instance_id"].as_str().unwrap().to_string(), addrs));
    }
    out
}

fn assert_unique_addresses(p: &[(String, String, Vec<String>)]) {
    let all: Vec<&String> = p.iter().flat_map(|x| x.2.iter()).collect();
    let set: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(set.len(), all.len(), "an address held twice: {p:?}");
}

#[test]
fn a_plan_deploys_a_hundred_servers_and_a_second_run_changes_nothing() {
    let dir = Scratch::new("deploy");
    let server = start(&dir);
    prepare(&dir);
    let file = dir.path("plan.toml");
    std::fs::write(&file, plan(100, "")).unwrap();
    let f = file.to_str().unwrap();

    // A dry run says what it would do and makes nothing.
    let dry = ok(&dir, &["deploy", f, "--dry-run"]);
    assert!(
        dry.starts_with(&format!(
            "deploy {f}: 101 to create, 0 to update, 0 unchanged: a dry run"
        )),
        "{dry}"
    );
    assert_eq!(json(&ok(&dir, &["volume", "list", "--json"])), json("[]"));

    let t = Instant::now();
    let report = json(&ok(&dir, &["deploy", f, "--json"]));
    let took = t.elapsed();
    eprintln!("deploy of 101 servers with personalities: {took:?}");
    assert_eq!(report["applied"], true);
    let servers = report["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 101);
    assert!(servers.iter().all(|s| s["action"] == "create"), "{report}");
    assert_eq!(servers[0]["name"], "web-001");
    assert_eq!(servers[0]["addresses"], json(r#"["10.1.0.10"]"#));
    assert_eq!(servers[100]["name"], "db-01");

    let first = personalities(&dir);
    assert_eq!(first.len(), 101);
    assert_unique_addresses(&first);
    let web7 = json(&ok(&dir, &["volume", "show", "web-007", "--json"]));
    let p = &web7["personality"];
    assert_eq!(p["hostname"], "web-007");
    assert_eq!(p["fqdn"], "web-007.rack1.example.com");
    assert_eq!(p["interfaces"][0]["mac"], "52:54:00:01:00:07");
    assert_eq!(p["interfaces"][0]["gateway"], "10.1.0.1");
    assert_eq!(web7["image"], "g");
    let db = json(&ok(&dir, &["volume", "show", "db-01", "--json"]));
    assert_eq!(db["personality"]["hostname"], "database");
    assert_eq!(db["personality"]["fqdn"], "database.rack1.example.com");
    // Each server's seed is exported. (Over the Unix socket: libnbd sends the last piece of its
    // LIST_META_CONTEXT option with MSG_MORE, so over TCP each export's info waits 200 ms for
    // the kernel to give up on the cork, with any server.)
    let exports = Command::new("nbdinfo")
        .args(["--list", "--json"])
        .arg(server.unix_uri(""))
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&exports.stdout);
    assert!(listed.contains("\"seed/web-100\""), "{listed}");

    // The same plan again: nothing changes, not even an instance id.
    let again = ok(&dir, &["deploy", f]);
    assert!(
        again.contains("0 created, 0 updated, 101 unchanged"),
        "{again}"
    );
    assert_eq!(personalities(&dir), first);

    // A changed default updates every personality (new instance ids) and keeps every address.
    std::fs::write(
        &file,
        plan(100, "[defaults.cloud_config]\ntimezone = \"UTC\""),
    )
    .unwrap();
    let changed = ok(&dir, &["deploy", f]);
    assert!(
        changed.contains("0 created, 101 updated, 0 unchanged"),
        "{changed}"
    );
    let second = personalities(&dir);
    for (a, b) in first.iter().zip(&second) {
        assert_eq!((&a.0, &a.2), (&b.0, &b.2), "a server was renumbered");
        assert_ne!(a.1, b.1, "{}: the same instance id after a change", a.0);
    }

    // Two more servers: only they are made, with the next free addresses.
    std::fs::write(
        &file,
        plan(102, "[defaults.cloud_config]\ntimezone = \"UTC\""),
    )
    .unwrap();
    let more = json(&ok(&dir, &["deploy", f, "--json"]));
    let made: Vec<(&str, &str)> = more["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["action"] == "create")
        .map(|s| {
            (
                s["name"].as_str().unwrap(),
                s["addresses"][0].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(made, [("web-101", "10.1.0.110"), ("web-102", "10.1.0.111")]);
    assert_unique_addresses(&personalities(&dir));
    server.stop();
}

#[test]
fn a_bad_entry_stops_the_plan_unless_skip_bad() {
    let dir = Scratch::new("deploy-bad");
    let server = start(&dir);
    prepare(&dir);
    ok(&dir, &["volume", "create", "taken", "--size", "8M"]);
    let file = dir.path("plan.toml");
    let text = format!(
        r#"
image = "g"
[[servers]]
name = "good-{{index}}"
count = 3
[[servers]]
name = "bad_host"
[[servers]]
name = "typo"
hostnme = "x"
[[servers]]
name = "other-image"
image = "nope"
[[servers]]
name = "taken"
[[servers]]
name = "a1"
[[servers.interfaces]]
name = "eth0"
addresses = ["10.1.9.9/16"]
[[servers]]
name = "a2"
ssh_authorized_keys = ["{KEY}"]
[[servers.interfaces]]
name = "eth0"
addresses = ["10.1.9.9/16"]
"#
    );
    std::fs::write(&file, &text).unwrap();
    let f = file.to_str().unwrap();
    let (out, _) = fails(&dir, &["deploy", f]);
    assert!(
        out.contains("4 to create, 0 to update, 0 unchanged, 5 refused: nothing was made"),
        "{out}"
    );
    for says in [
        "servers[1] refused: servers[1].hostname: \"bad_host\" is not a host name",
        "servers[2] refused: servers[2].hostnme: unknown field `hostnme`",
        "servers[3] refused: image \"nope\" does not exist",
        "servers[4] refused: volume \"taken\" exists as a blank volume, the plan says image \"g\"",
        "servers[6] refused: personality: 10.1.9.9 is already the address of volume \"a1\"",
    ] {
        assert!(out.contains(says), "{says:?} not in\n{out}");
    }
    let vols = json(&ok(&dir, &["volume", "list", "--json"]));
    assert_eq!(vols.as_array().unwrap().len(), 1, "{vols}");

    // --json: the same report, for scripts.
    let (out, _) = fails(&dir, &["deploy", f, "--json"]);
    let r = json(&out);
    assert_eq!(r["applied"], false);
    assert_eq!(r["servers"][3]["action"], "refused");
    assert_eq!(r["servers"][3]["entry"], "servers[1]");

    // --skip-bad: the good ones are made, the bad ones still refused (and the exit code says so).
    let (out, _) = fails(&dir, &["deploy", f, "--skip-bad"]);
    assert!(
        out.contains("4 created, 0 updated, 0 unchanged, 5 refused"),
        "{out}"
    );
    let vols = json(&ok(&dir, &["volume", "list", "--json"]));
    let names: Vec<&str> = vols
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a1", "good-1", "good-2", "good-3", "taken"]);

    // A pool that runs out: the server past its last address is refused by name, and
    // nothing of the plan is made.
    ok(
        &dir,
        &[
            "ippool",
            "create",
            "tiny",
            "--subnet",
            "10.7.0.0/24",
            "--first",
            "10.7.0.10",
            "--last",
            "10.7.0.11",
        ],
    );
    std::fs::write(
        &file,
        "image = \"g\"\n[[servers]]\nname = \"t-{index}\"\ncount = 3\n\
         [[servers.interfaces]]\nname = \"eth0\"\naddresses = [\"pool:tiny\"]\n",
    )
    .unwrap();
    let (out, _) = fails(&dir, &["deploy", f]);
    assert!(
        out.contains("servers[0] #3 refused: personality: interfaces[0].addresses[0]: IP pool \"tiny\" has no free address (all 2 are held)"),
        "{out}"
    );
    assert!(out.contains("nothing was made"), "{out}");
    let vols = json(&ok(&dir, &["volume", "list", "--json"]));
    assert_eq!(vols.as_array().unwrap().len(), 5, "{vols}");

    // A file that is not a plan at all.
    std::fs::write(&file, "image = \n").unwrap();
    let (_, err) = fails(&dir, &["deploy", f]);
    assert!(
        err.contains("streamer: plan: TOML parse error at line 1"),
        "{err}"
    );
    std::fs::write(&file, "servers = []\n").unwrap();
    let (_, err) = fails(&dir, &["deploy", f]);
    assert!(
        err.contains("plan: servers: the plan names no servers"),
        "{err}"
    );
    server.stop();
}

/// kill -9 of the node while it deploys 300 servers, at a random moment, three times: every
/// volume there has its whole personality, no address is held twice, and running the plan
/// again makes the rest, leaving the made ones as they are.
#[test]
fn kill_9_in_the_middle_of_a_deployment_and_run_it_again() {
    let dir = Scratch::new("deploy-kill9");
    let mut seed: u64 = 0x2545_f491;
    let mut rand = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let file = dir.path("plan.toml");
    std::fs::write(&file, plan(300, "")).unwrap();
    let f = file.to_str().unwrap().to_string();
    let mut before: Vec<(String, String, Vec<String>)> = vec![];
    for round in 0..3 {
        let mut server = start(&dir);
        if round == 0 {
            prepare(&dir);
        }
        let sock = dir.path("pool/streamer.sock");
        let ff = f.clone();
        let deploy = std::thread::spawn(move || {
            Command::new(BIN)
                .args(["deploy", &ff, "--mgmt-socket"])
                .arg(&sock)
                .output()
                .unwrap()
        });
        std::thread::sleep(std::time::Duration::from_millis(50 + rand(400)));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(server.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = server.child.take().unwrap().wait();
        let out = deploy.join().unwrap();
        eprintln!(
            "round {round}: {}",
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
        );

        let server = start(&dir);
        let now = personalities(&dir);
        eprintln!("round {round}: {} volumes after kill -9", now.len());
        assert_unique_addresses(&now);
        for (name, id, addrs) in &now {
            assert!(id.starts_with("i-"), "{name} has no personality");
            assert_eq!(addrs.len(), 1, "{name}");
        }
        // What an earlier round made is untouched.
        for b in &before {
            assert!(now.contains(b), "{b:?} changed");
        }
        before = now;
        server.stop();
    }
    let server = start(&dir);
    let out = ok(&dir, &["deploy", &f]);
    assert!(out.contains("unchanged"), "{out}");
    let all = personalities(&dir);
    assert_eq!(all.len(), 301);
    assert_unique_addresses(&all);
    for b in &before {
        assert!(all.contains(b), "{b:?} changed by the final run");
    }
    let again = ok(&dir, &["deploy", &f]);
    assert!(
        again.contains("0 created, 0 updated, 301 unchanged"),
        "{again}"
    );
    server.stop();
}

/// `volume redeploy`: a server gets a fresh clone of another image under its name, with its
/// personality (its addresses, a new instance id); refused while a client is connected unless
/// --force; --keep-previous keeps the old volume, data and all, without the personality.
#[test]
fn a_redeploy_gives_a_server_a_new_os_and_keeps_its_personality() {
    let dir = Scratch::new("redeploy");
    let server = start(&dir);
    prepare(&dir);
    let h = dir.path("h.img");
    std::fs::write(&h, vec![0xa5; 2 << 20]).unwrap();
    ok(&dir, &["image", "import", "h", h.to_str().unwrap()]);
    let file = dir.path("plan.toml");
    std::fs::write(&file, plan(2, "")).unwrap();
    ok(&dir, &["deploy", file.to_str().unwrap()]);
    let before = json(&ok(&dir, &["volume", "show", "web-001", "--json"]));
    let uri = server.unix_uri("web-001");
    let nbdsh = |script: &str| {
        Command::new("timeout")
            .args([
                "30",
                "/usr/bin/python3",
                "-m",
                "nbd",
                "-u",
                &uri,
                "-c",
                script,
            ])
            .output()
            .unwrap()
    };
    let w = nbdsh("h.pwrite(b'own data' * 512, 0); h.flush()");
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));

    // A connected client: refused, then disconnected by --force.
    let mut client = Command::new("timeout")
        .args([
            "30",
            "/usr/bin/python3",
            "-m",
            "nbd",
            "-u",
            &uri,
            "-c",
            "import time\nwhile True: h.pread(512, 0); time.sleep(0.05)",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (_, err) = fails(&dir, &["volume", "redeploy", "web-001", "--image", "h"]);
    assert!(err.contains("has 1 connected client(s)"), "{err}");
    assert!(err.contains("--force"), "{err}");
    let after = json(&ok(
        &dir,
        &[
            "volume",
            "redeploy",
            "web-001",
            "--image",
            "h",
            "--force",
            "--keep-previous",
            "--json",
        ],
    ));
    // The client was disconnected: its next read failed.
    let status = client.wait().unwrap();
    assert!(
        !status.success() && status.code() != Some(124),
        "{status:?}"
    );
    assert_eq!(after["image"], "h");
    assert_eq!(after["size"], 2 << 20, "the larger image's size");
    let (p0, p1) = (&before["personality"], &after["personality"]);
    assert_eq!(p0["hostname"], p1["hostname"]);
    assert_eq!(p0["interfaces"], p1["interfaces"], "the same addresses");
    assert_ne!(p0["instance_id"], p1["instance_id"]);
    let read = |export: &str| {
        let out = Command::new("timeout")
            .args([
                "30",
                "/usr/bin/python3",
                "-m",
                "nbd",
                "-u",
                &server.unix_uri(export),
                "-c",
            ])
            .arg("import sys; sys.stdout.buffer.write(h.pread(8, 0))")
            .output()
            .unwrap();
        out.stdout
    };
    assert_eq!(read("web-001"), vec![0xa5; 8], "a fresh clone of h");
    assert_eq!(read("web-001.previous"), b"own data", "the old volume kept");
    let prev = json(&ok(&dir, &["volume", "show", "web-001.previous", "--json"]));
    assert_eq!(prev["image"], "g");
    assert!(prev["personality"].is_null(), "{prev}");
    assert_unique_addresses(&personalities(&dir));

    // The plan now names another image for web-001: deploy refuses and points at redeploy.
    let (out, _) = fails(&dir, &["deploy", file.to_str().unwrap()]);
    assert!(out.contains("volume redeploy web-001 --image g"), "{out}");

    // A second --keep-previous finds the first kept volume.
    let (_, err) = fails(
        &dir,
        &[
            "volume",
            "redeploy",
            "web-001",
            "--image",
            "g",
            "--keep-previous",
        ],
    );
    assert!(err.contains("\"web-001.previous\" exists"), "{err}");
    // Without it, the old volume goes; the server's data is the image's again.
    ok(&dir, &["volume", "redeploy", "web-001", "--image", "g"]);
    assert_eq!(read("web-001"), vec![0x5a; 8]);
    let (_, err) = fails(&dir, &["volume", "redeploy", "nope", "--image", "g"]);
    assert!(err.contains("nope"), "{err}");
    let (_, err) = fails(&dir, &["volume", "redeploy", "web-002", "--image", "nope"]);
    assert!(err.contains("nope"), "{err}");
    server.stop();
}
