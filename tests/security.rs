//! The trust boundaries of docs/security.md, attacked the way the security review did: as an
//! unprivileged member of the admin group (uid 65534 `nobody`, group `nogroup`, switched to
//! with `setpriv`), against the real binary, over real sockets.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const NOBODY: &str = "65534";

fn pool_dir(dir: &Scratch) -> PathBuf {
    dir.path("pool")
}

fn sock(dir: &Scratch) -> PathBuf {
    pool_dir(dir).join("streamer.sock")
}

/// A node whose admin group is `nogroup`, so that `nobody` may manage it.
fn start_node(dir: &Scratch) -> Server {
    Server::start(
        dir,
        &[
            "--data-dir",
            pool_dir(dir).to_str().unwrap(),
            "--admin-group",
            "nogroup",
        ],
    )
}

/// `cmd ARGS` as uid 65534 with only its primary group (nogroup), bounded in time.
fn as_nobody(program: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "timeout",
            "-k",
            "5",
            "120",
            program,
        ])
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .expect("run setpriv")
}

/// A root-only file holding a recognisable secret.
fn secret(dir: &Scratch, size: usize) -> PathBuf {
    let p = dir.path("secret");
    data_file(&p, size, 0x5ec2e7);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Directories a test user must be able to enter.
fn open_up(dir: &Scratch) {
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn image_names(dir: &Scratch) -> Vec<String> {
    let out = run(
        BIN,
        &[
            "image",
            "list",
            "--json",
            "--socket",
            sock(dir).to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Sends one management request with a descriptor of `path` opened with `flags` (as Python's
/// os.open takes them), as uid 65534; returns the reply line.
fn raw_import_as_nobody(dir: &Scratch, path: &Path, flags: &str, request: &str) -> String {
    let script = format!(
        r#"
import os, socket, sys
fd = os.open({path:?}, {flags})
s = socket.socket(socket.AF_UNIX)
s.connect({sock:?})
socket.send_fds(s, [{request:?}.encode() + b"\n"], [fd])
print(s.makefile().readline().strip())
"#,
        path = path.to_str().unwrap(),
        sock = sock(dir).to_str().unwrap(),
    );
    let out = as_nobody("/usr/bin/python3", &["-c", &script]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// An O_PATH descriptor needs no read permission, and the node used to reopen it through
/// /proc/self/fd as root: an admin-group user imported /etc/shadow and read it back over NBD.
/// The node now reads only the descriptor it was given, and refuses one that cannot be read.
#[test]
fn an_o_path_descriptor_imports_nothing() {
    let dir = Scratch::new("opath");
    open_up(&dir);
    let secret = secret(&dir, 64 << 10);
    let server = start_node(&dir);
    let req = r#"{"version":1,"request":{"op":"image_import","name":"shadow","format":null}}"#;
    let reply = raw_import_as_nobody(&dir, &secret, "os.O_PATH", req);
    assert!(
        reply.contains(r#""reply":"error""#) && reply.contains("O_PATH"),
        "{reply}"
    );
    // The same through a format conversion (the old node ran qemu-img on /proc/PID/fd/N).
    let req = r#"{"version":1,"request":{"op":"image_import","name":"shadow","format":"raw"}}"#;
    let reply = raw_import_as_nobody(&dir, &secret, "os.O_PATH", req);
    assert!(reply.contains("O_PATH"), "{reply}");
    let req =
        r#"{"version":1,"request":{"op":"image_import","name":"shadow","format":"host_device"}}"#;
    let reply = raw_import_as_nobody(&dir, &secret, "os.O_PATH", req);
    assert!(reply.contains(r#""reply":"error""#), "{reply}");
    // A write-only descriptor of a file the user may write but not read: refused too.
    let wo = dir.path("write-only");
    std::fs::write(&wo, b"not for reading").unwrap();
    std::fs::set_permissions(&wo, std::fs::Permissions::from_mode(0o622)).unwrap();
    let req = r#"{"version":1,"request":{"op":"image_import","name":"wo","format":null}}"#;
    let reply = raw_import_as_nobody(&dir, &wo, "os.O_WRONLY", req);
    assert!(reply.contains("writing only"), "{reply}");
    assert!(image_names(&dir).is_empty());
    let exports = stdout(&run("nbdinfo", &["--list", &server.uri("")]));
    assert!(!exports.contains("shadow"), "{exports}");
    // What the user may read imports as before.
    let ok = dir.path("readable");
    data_file(&ok, 8192, 3);
    let req = r#"{"version":1,"request":{"op":"image_import","name":"fine","format":null}}"#;
    let reply = raw_import_as_nobody(&dir, &ok, "os.O_RDONLY", req);
    assert!(reply.contains(r#""reply":"ok""#), "{reply}");
    server.stop();
}

/// qemu-img ran in the node, as root, and followed a qcow2's backing file: an admin-group user
/// who could not read a root-only file published it as a golden image anyone could read over
/// NBD. Conversion now runs in the CLI, as the user, so the backing file cannot be opened.
#[test]
fn a_qcow2_backed_by_a_root_only_file_publishes_nothing_of_it() {
    let dir = Scratch::new("backing");
    open_up(&dir);
    let secret = secret(&dir, 1 << 20);
    let q = dir.path("evil.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            secret.to_str().unwrap(),
            "-F",
            "raw",
            q.to_str().unwrap(),
        ],
    );
    std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = start_node(&dir);
    let out = as_nobody(
        BIN,
        &[
            "image",
            "import",
            "evil",
            q.to_str().unwrap(),
            "--socket",
            sock(&dir).to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "imported: {err}");
    assert!(err.contains("Permission denied"), "{err}");
    assert!(image_names(&dir).is_empty());
    // Asked directly, the node converts nothing at all.
    let req = r#"{"version":1,"request":{"op":"image_import","name":"evil","format":"qcow2"}}"#;
    let reply = raw_import_as_nobody(&dir, &q, "os.O_RDONLY", req);
    assert!(reply.contains("raw images only"), "{reply}");
    assert!(image_names(&dir).is_empty());
    // Root, who may read the backing file, gets the whole image (flattened).
    let out = run(
        BIN,
        &[
            "image",
            "import",
            "flat",
            q.to_str().unwrap(),
            "--json",
            "--socket",
            sock(&dir).to_str().unwrap(),
        ],
    );
    let img: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = stdout(&run("sha256sum", &[secret.to_str().unwrap()]));
    assert_eq!(img["sha256"].as_str().unwrap(), &want[..64]);
    server.stop();
}
