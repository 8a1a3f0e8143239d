//! Real guests (issue 22): a small Debian with cloud-init (scripts/guest-image.sh, built from
//! Debian packages), imported as golden images, deployed from a plan, and booted under qemu
//! (TCG) from streamer's exports. Each guest prints one line on its serial console when
//! cloud-init is done (its host name, its addresses, cloud-init's status) and powers off, so
//! every boot ends by itself; qemu is also bounded by `timeout`.
//!
//! - `plain.img` (ext4, the whole disk) boots with its seed export `seed/NAME` as a second
//!   disk; `gpt.img` (GPT, a CIDATA partition) boots alone, its seed written into the clone.
//! - After `volume personality --set` with another host name, the first server boots as the
//!   new name (a new instance id, so cloud-init applies it).
//! - The Linux kernel's own NBD client, in a guest, attaches a volume through a virtio-serial
//!   port whose host side is the node's Unix socket: read, O_DIRECT write and read back, mkfs,
//!   mount, fsck.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::{BIN, Scratch, Server};

/// The guest images, built once per target directory (about two minutes).
fn images() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("guest");
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/guest-image.sh");
            let out = Command::new("timeout")
                .args(["900", "bash", script])
                .arg(&dir)
                .output()
                .expect("run scripts/guest-image.sh");
            assert!(
                out.status.success(),
                "building the guest images: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            dir
        })
        .clone()
}

fn cli(server_dir: &Scratch, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .args(["-k", "5", "300", BIN])
        .args(args)
        .arg("--mgmt-socket")
        .arg(server_dir.path("pool/streamer.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "streamer {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Boots `qemu` with the guest's kernel and `extra` devices; returns the serial console's
/// text. Bounded: the guest powers off by itself; `timeout` ends it otherwise.
fn qemu(dir: &Scratch, tag: &str, root: &str, cmdline: &str, extra: &[String]) -> String {
    let img = images();
    let console = dir.path(&format!("{tag}.console"));
    let status = Command::new("timeout")
        .args(["-k", "5", "420", "qemu-system-x86_64"])
        // No network reaches the guest but the NICs a test adds (no default user network).
        .args([
            "-m",
            "512",
            "-smp",
            "1",
            "-display",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .args(["-serial", &format!("file:{}", console.display())])
        .arg("-kernel")
        .arg(img.join("vmlinuz"))
        .arg("-initrd")
        .arg(img.join("initrd.img"))
        .args([
            "-append",
            &format!("console=ttyS0 root={root} rw quiet modprobe.blacklist=floppy {cmdline}"),
        ])
        .args(extra)
        .status()
        .unwrap();
    let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
    assert!(status.success(), "qemu {tag}: {status:?}\n{}", tail(&text));
    text
}

/// What the guest printed after `tag` on the console, line by line. A line may begin with
/// something else the console printed meanwhile (a getty's `login:` prompt).
fn said<'a>(text: &'a str, tag: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.find(tag).map(|at| l[at + tag.len()..].trim_end()))
        .collect()
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Boots volume `vol` (its root file system on `root`), with its seed export as a second disk
/// if `seed`, a NIC with `mac` and no network; returns its report line.
fn boot(
    server: &Server,
    dir: &Scratch,
    tag: &str,
    vol: &str,
    root: &str,
    seed: bool,
    mac: &str,
) -> String {
    let mut extra = vec![
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio", server.unix_uri(vol)),
        "-netdev".into(),
        "hubport,id=n0,hubid=0".into(),
        "-device".into(),
        format!("virtio-net-pci,netdev=n0,mac={mac}"),
    ];
    if seed {
        extra.push("-drive".into());
        extra.push(format!(
            "file={},format=raw,if=virtio,readonly=on",
            server.unix_uri(&format!("seed/{vol}"))
        ));
    }
    let t = std::time::Instant::now();
    let text = qemu(dir, tag, root, "", &extra);
    let report = said(&text, "STREAMER-REPORT ")
        .pop()
        .map(|r| format!("STREAMER-REPORT {r}"))
        .unwrap_or_else(|| panic!("{tag}: no report on the console\n{}", tail(&text)));
    eprintln!("{tag}: {report} ({:.0?})", t.elapsed());
    report
}

const PLAN: &str = r#"
[defaults]
fqdn = "{hostname}.test.example"

[[servers]]
name = "web-01"
image = "deb"
[[servers.interfaces]]
name = "eno1"
mac = "52:54:00:12:34:01"
addresses = ["10.9.0.21/24"]
gateway = "10.9.0.1"

[[servers]]
name = "web-02"
image = "deb-gpt"
[[servers.interfaces]]
name = "eno1"
mac = "52:54:00:12:34:02"
addresses = ["10.9.0.22/24"]
gateway = "10.9.0.1"
"#;

#[test]
fn deployed_servers_boot_as_themselves() {
    let img = images();
    let dir = Scratch::new("guest");
    let pool = dir.path("pool");
    let server = Server::start(&dir, &["--data-dir", pool.to_str().unwrap()]);
    for (name, file) in [("deb", "plain.img"), ("deb-gpt", "gpt.img")] {
        cli(
            &dir,
            &[
                "image",
                "import",
                name,
                img.join(file).to_str().unwrap(),
                "--format",
                "raw",
            ],
        );
    }
    let plan = dir.path("plan.toml");
    std::fs::write(&plan, PLAN).unwrap();
    let out = cli(&dir, &["deploy", plan.to_str().unwrap()]);
    assert!(out.contains("2 created"), "{out}");

    // The seed as a second disk.
    let r = boot(
        &server,
        &dir,
        "web-01",
        "web-01",
        "/dev/vda",
        true,
        "52:54:00:12:34:01",
    );
    assert!(r.contains("host=web-01 "), "{r}");
    assert!(r.contains("eno1=10.9.0.21/24"), "{r}");
    assert!(r.ends_with("cloud-init=done"), "{r}");

    // The seed inside the clone's CIDATA partition, one disk alone.
    let r = boot(
        &server,
        &dir,
        "web-02",
        "web-02",
        "/dev/vda1",
        false,
        "52:54:00:12:34:02",
    );
    assert!(r.contains("host=web-02 "), "{r}");
    assert!(r.contains("eno1=10.9.0.22/24"), "{r}");
    assert!(r.ends_with("cloud-init=done"), "{r}");

    // A new personality: the server comes up as its new self (a new instance id, so
    // cloud-init applies it), with the same address.
    let p = dir.path("web-01b.toml");
    std::fs::write(
        &p,
        "hostname = \"web-01b\"\nfqdn = \"web-01b.test.example\"\n[[interfaces]]\n\
         name = \"eno1\"\nmac = \"52:54:00:12:34:01\"\naddresses = [\"10.9.0.21/24\"]\n\
         gateway = \"10.9.0.1\"\n",
    )
    .unwrap();
    cli(
        &dir,
        &[
            "volume",
            "personality",
            "web-01",
            "--set",
            p.to_str().unwrap(),
        ],
    );
    let r = boot(
        &server,
        &dir,
        "web-01-again",
        "web-01",
        "/dev/vda",
        true,
        "52:54:00:12:34:01",
    );
    assert!(r.contains("host=web-01b "), "{r}");
    assert!(r.contains("eno1=10.9.0.21/24"), "{r}");
    assert!(r.ends_with("cloud-init=done"), "{r}");
    server.stop();
}

/// The Linux kernel's NBD client (this host has no nbd module; the guest's kernel does),
/// through a virtio-serial port whose host side is the node's Unix socket. qemu connects when
/// it starts, long before the guest's nbd-client speaks: the node runs with a long handshake
/// timeout.
#[test]
fn the_kernel_nbd_client_in_a_guest() {
    let img = images();
    let dir = Scratch::new("guest-kernel");
    let pool = dir.path("pool");
    let server = Server::start(
        &dir,
        &[
            "--data-dir",
            pool.to_str().unwrap(),
            "--handshake-timeout",
            "400",
        ],
    );
    cli(
        &dir,
        &[
            "image",
            "import",
            "deb",
            img.join("plain.img").to_str().unwrap(),
            "--format",
            "raw",
        ],
    );
    cli(&dir, &["volume", "create", "os", "--image", "deb"]);
    cli(&dir, &["volume", "create", "data", "--size", "256M"]);
    let extra: Vec<String> = [
        "-drive".to_string(),
        format!("file={},format=raw,if=virtio", server.unix_uri("os")),
        "-chardev".into(),
        format!("socket,id=c0,path={}", server.socket.display()),
        "-device".into(),
        "virtio-serial-pci".into(),
        "-device".into(),
        "virtserialport,chardev=c0,name=streamer".into(),
    ]
    .into();
    let text = qemu(&dir, "kernel-nbd", "/dev/vda", "streamer.nbd=data", &extra);
    let said = said(&text, "STREAMER-NBD ");
    eprintln!("kernel client: {said:?}");
    assert_eq!(
        said,
        [
            "attached size=268435456",
            "read-ok",
            "direct-ok",
            "mkfs-mount-ok",
            "fsck-ok",
            "reread-ok",
            "detached",
            "end done"
        ],
        "{}",
        tail(&text)
    );
    // What the guest wrote is in the volume: an ext4 file system.
    let copy = dir.path("data.copy");
    common::run(
        "nbdcopy",
        &[&server.unix_uri("data"), copy.to_str().unwrap()],
    );
    let blkid = common::stdout(&common::run("blkid", &[copy.to_str().unwrap()]));
    assert!(blkid.contains("TYPE=\"ext4\""), "{blkid}");
    common::run("e2fsck", &["-n", "-f", copy.to_str().unwrap()]);
    server.stop();
}
