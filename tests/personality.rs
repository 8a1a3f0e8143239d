//! Volumes' personalities (issue 22) through the real binary: set from a file, shown, replaced
//! with a new instance id, refused with the field and value named, never two volumes with one
//! address, kept across a restart, removed with the volume.

mod common;

use std::process::{Command, Output};

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

fn fails(dir: &Scratch, args: &[&str]) -> String {
    let out = cli(dir, args);
    assert!(!out.status.success(), "streamer {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn show(dir: &Scratch, name: &str) -> serde_json::Value {
    serde_json::from_str(&ok(dir, &["volume", "show", name, "--json"])).unwrap()
}

fn start(dir: &Scratch) -> Server {
    let pool = dir.path("pool");
    Server::start(dir, &["--data-dir", pool.to_str().unwrap()])
}

const WEB1: &str = r#"
hostname = "web-01"
fqdn = "web-01.rack1.example.com"
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGqT0Vb5Q6p0n0Jw9cQ2x1y2z3a4b5c6d7e8f9g0h1i2 ops"]

[dns]
servers = ["10.0.0.53"]

[[interfaces]]
name = "eno1"
mac = "52:54:00:aa:00:01"
addresses = ["10.0.0.11/24"]
gateway = "10.0.0.1"
"#;

#[test]
fn a_personality_is_set_shown_replaced_and_kept() {
    let dir = Scratch::new("personality");
    let server = start(&dir);
    ok(&dir, &["volume", "create", "web-1", "--size", "64M"]);
    ok(&dir, &["volume", "create", "web-2", "--size", "64M"]);
    assert!(show(&dir, "web-1")["personality"].is_null());

    let file = dir.path("web1.toml");
    std::fs::write(&file, WEB1).unwrap();
    ok(
        &dir,
        &[
            "volume",
            "personality",
            "web-1",
            "--set",
            file.to_str().unwrap(),
        ],
    );
    let v = show(&dir, "web-1");
    let p = &v["personality"];
    assert_eq!(p["hostname"], "web-01");
    assert_eq!(p["interfaces"][0]["addresses"][0], "10.0.0.11/24");
    let first_id = p["instance_id"].as_str().unwrap().to_string();
    assert!(
        first_id.starts_with("i-") && first_id.len() > 10,
        "{first_id}"
    );
    let text = ok(&dir, &["volume", "show", "web-1"]);
    assert!(text.contains("web-01.rack1.example.com"), "{text}");
    assert!(text.contains("10.0.0.11"), "{text}");

    // The same file again: a new instance id (first-boot tools run again).
    ok(
        &dir,
        &[
            "volume",
            "personality",
            "web-1",
            "--set",
            file.to_str().unwrap(),
        ],
    );
    let second_id = show(&dir, "web-1")["personality"]["instance_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(first_id, second_id);

    // Another volume may not take the same address; it names the volume that has it.
    let err = fails(
        &dir,
        &[
            "volume",
            "personality",
            "web-2",
            "--set",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("10.0.0.11 is already the address of volume \"web-1\""),
        "{err}"
    );
    assert!(
        show(&dir, "web-2")["personality"].is_null(),
        "nothing stored"
    );

    // A bad file names the field and the value, and changes nothing.
    let bad = dir.path("bad.toml");
    std::fs::write(&bad, WEB1.replace("10.0.0.11/24", "10.0.0.311/24")).unwrap();
    let err = fails(
        &dir,
        &[
            "volume",
            "personality",
            "web-1",
            "--set",
            bad.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("interfaces[0].addresses[0]") && err.contains("10.0.0.311/24"),
        "{err}"
    );
    std::fs::write(
        &bad,
        WEB1.replace("hostname = \"web-01\"", "hostname = \"web_01\""),
    )
    .unwrap();
    let err = fails(
        &dir,
        &[
            "volume",
            "personality",
            "web-1",
            "--set",
            bad.to_str().unwrap(),
        ],
    );
    assert!(err.contains("hostname: \"web_01\""), "{err}");
    assert_eq!(
        show(&dir, "web-1")["personality"]["instance_id"],
        second_id.as_str()
    );

    // A raw request that skips the CLI's checks is validated by the node too.
    let out = Command::new("timeout")
        .args(["-k", "5", "60", "/usr/bin/python3", "-c"])
        .arg(
            r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
req = {"version": 1, "request": {"op": "volume_personality", "name": "web-2",
       "personality": {"hostname": "-bad-"}}}
s.sendall(json.dumps(req).encode() + b"\n")
print(s.makefile().readline())
"#,
        )
        .arg(dir.path("pool/streamer.sock"))
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.contains("\"invalid\"") && reply.contains("-bad-"),
        "{reply}"
    );

    // Kept across a restart.
    server.stop();
    let server = start(&dir);
    assert_eq!(
        show(&dir, "web-1")["personality"]["instance_id"],
        second_id.as_str()
    );

    // Cleared, then set on web-2 (its address is free again).
    ok(&dir, &["volume", "personality", "web-1", "--clear"]);
    assert!(show(&dir, "web-1")["personality"].is_null());
    ok(
        &dir,
        &[
            "volume",
            "personality",
            "web-2",
            "--set",
            file.to_str().unwrap(),
        ],
    );

    // Gone with its volume: a new volume of the same name has none.
    ok(&dir, &["volume", "delete", "web-2"]);
    ok(&dir, &["volume", "create", "web-2", "--size", "64M"]);
    assert!(show(&dir, "web-2")["personality"].is_null());
    server.stop();
}
