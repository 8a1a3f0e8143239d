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

[user]
name = "admin"
password_hash = "$6$rounds=4096$saltsalt$3MEaFFq3YtJ4ExzvYPtTGlU3CxTtHpPHyk8Fj1tQgnhVvVnSf5Q9M0R3xGK9o2d1vM0Zr0rFPA8nWYQy4vQZ/"

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

    // Its NoCloud seed is exported as seed/web-1: a FAT file system labelled CIDATA that the
    // real tools accept, holding the three documents.
    check_seed(&server, &dir, "web-1", &first_id);

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
    // The seed is made again at start, from the record.
    check_seed(&server, &dir, "web-1", &second_id);

    // Cleared, then set on web-2 (its address is free again).
    ok(&dir, &["volume", "personality", "web-1", "--clear"]);
    assert!(show(&dir, "web-1")["personality"].is_null());
    let list = common::stdout(&common::run("nbdinfo", &["--list", &server.uri("")]));
    assert!(!list.contains("seed/web-1"), "{list}");
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

/// Copies `seed/NAME` out over NBD and checks it with dosfstools and mtools.
fn check_seed(server: &Server, dir: &Scratch, name: &str, instance_id: &str) {
    let img = dir.path(&format!("{name}-seed.img"));
    let _ = std::fs::remove_file(&img);
    common::run(
        "nbdcopy",
        &[&server.uri(&format!("seed/{name}")), img.to_str().unwrap()],
    );
    let img = img.to_str().unwrap();
    common::run("fsck.fat", &["-n", img]);
    let label = common::stdout(&common::run("fatlabel", &[img]));
    assert_eq!(label.trim(), "CIDATA");
    let mtype =
        |file: &str| common::stdout(&common::run("mtype", &["-i", img, &format!("::{file}")]));
    let meta: serde_json::Value = serde_json::from_str(&mtype("meta-data")).unwrap();
    assert_eq!(meta["instance-id"], instance_id);
    assert_eq!(meta["local-hostname"], "web-01");
    let user = mtype("user-data");
    assert!(user.starts_with("#cloud-config\n"), "{user}");
    assert!(user.contains("web-01.rack1.example.com"), "{user}");
    // cloud-init itself accepts the user-data (its schema) and reads the network-config (it
    // converts it to ifupdown's form, with the address and the default route).
    let docs = dir.path(&format!("{name}-docs"));
    let _ = std::fs::remove_dir_all(&docs);
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("user-data"), &user).unwrap();
    std::fs::write(docs.join("network-config"), mtype("network-config")).unwrap();
    let schema = common::stdout(&common::run(
        "cloud-init",
        &[
            "schema",
            "--config-file",
            docs.join("user-data").to_str().unwrap(),
        ],
    ));
    assert!(schema.contains("Valid cloud-config"), "{schema}");
    common::run(
        "cloud-init",
        &[
            "devel",
            "net-convert",
            "--network-data",
            docs.join("network-config").to_str().unwrap(),
            "--kind",
            "yaml",
            "--distro",
            "debian",
            "--output-kind",
            "eni",
            "-d",
            docs.join("out").to_str().unwrap(),
        ],
    );
    let eni =
        std::fs::read_to_string(docs.join("out/etc/network/interfaces.d/50-cloud-init")).unwrap();
    assert!(eni.contains("address 10.0.0.11/24"), "{eni}");
    assert!(eni.contains("default gw 10.0.0.1"), "{eni}");
    let net: serde_json::Value = serde_json::from_str(&mtype("network-config")).unwrap();
    assert_eq!(net["version"], 2);
    assert_eq!(net["ethernets"]["eno1"]["addresses"][0], "10.0.0.11/24");
    assert_eq!(
        net["ethernets"]["eno1"]["match"]["macaddress"],
        "52:54:00:aa:00:01"
    );
}

/// IP pools: addresses handed out lowest first, never twice, freed with the volume (or a new
/// personality), a used-up pool refused by name, a pool with held addresses kept, and all of it
/// across a restart.
#[test]
fn ip_pools_hand_out_each_address_once_and_take_it_back() {
    let dir = Scratch::new("ippool");
    let server = start(&dir);
    let err = fails(
        &dir,
        &[
            "ippool",
            "create",
            "bad",
            "--subnet",
            "10.0.0.5/24",
            "--first",
            "10.0.0.100",
            "--last",
            "10.0.0.102",
        ],
    );
    assert!(
        err.contains("subnet") && err.contains("10.0.0.5/24"),
        "{err}"
    );
    ok(
        &dir,
        &[
            "ippool",
            "create",
            "rack1",
            "--subnet",
            "10.0.0.0/24",
            "--first",
            "10.0.0.100",
            "--last",
            "10.0.0.102",
            "--gateway",
            "10.0.0.1",
            "--dns",
            "10.0.0.53",
        ],
    );
    let file = dir.path("p.toml");
    let set = |vol: &str, host: &str| {
        std::fs::write(
            &file,
            format!(
                "hostname = \"{host}\"\n[[interfaces]]\nname = \"eth0\"\naddresses = [\"pool:rack1\"]\n"
            ),
        )
        .unwrap();
        cli(
            &dir,
            &[
                "volume",
                "personality",
                vol,
                "--set",
                file.to_str().unwrap(),
            ],
        )
    };
    let addr = |vol: &str| {
        show(&dir, vol)["personality"]["interfaces"][0]["addresses"][0]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (i, v) in ["s1", "s2", "s3", "s4"].iter().enumerate() {
        ok(&dir, &["volume", "create", v, "--size", "64M"]);
        let out = set(v, &format!("host-{i}"));
        if i < 3 {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(addr(v), format!("10.0.0.{}/24", 100 + i));
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("IP pool \"rack1\" has no free address (all 3 are held)")
                    && err.contains("interfaces[0].addresses[0]"),
                "{err}"
            );
            assert!(show(&dir, v)["personality"].is_null());
        }
    }
    // The pool's gateway and name servers came with the address.
    let p = &show(&dir, "s1")["personality"]["interfaces"][0];
    assert_eq!(p["gateway"], "10.0.0.1");
    assert_eq!(p["dns"]["servers"][0], "10.0.0.53");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&dir, &["ippool", "list", "--json"])).unwrap();
    assert_eq!(list[0]["held"].as_array().unwrap().len(), 3);

    // A pool with held addresses stays.
    let err = fails(&dir, &["ippool", "delete", "rack1"]);
    assert!(err.contains("3 address(es) held"), "{err}");

    // Deleting a volume frees its address (after a restart too). A personality changed
    // meanwhile keeps its own address rather than moving to the lower one now free; the next
    // volume takes that one.
    ok(&dir, &["volume", "delete", "s2"]);
    server.stop();
    let server = start(&dir);
    assert!(set("s3", "host-2-renamed").status.success());
    assert_eq!(
        addr("s3"),
        "10.0.0.102/24",
        "a changed personality was renumbered"
    );
    assert!(set("s4", "host-3").status.success());
    assert_eq!(addr("s4"), "10.0.0.101/24");
    let text = ok(&dir, &["ippool", "list"]);
    assert!(text.contains("10.0.0.101 held by volume s4"), "{text}");

    // A record that cannot be read holds its addresses still: nothing is handed out (fails
    // closed) and the error names the volume.
    std::fs::write(dir.path("pool/volumes/s1/personality.json"), b"{ torn").unwrap();
    ok(&dir, &["volume", "create", "s5", "--size", "64M"]);
    let out = set("s5", "host-5");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("volume \"s1\"'s personality record cannot be read"),
        "{err}"
    );
    server.stop();
}

/// A volume created with its personality gets both in one step (its seed exported at once); a
/// refused personality creates no volume.
#[test]
fn a_volume_is_created_with_its_personality_or_not_at_all() {
    let dir = Scratch::new("create-with");
    let server = start(&dir);
    let file = dir.path("p.toml");
    std::fs::write(&file, WEB1).unwrap();
    ok(
        &dir,
        &[
            "volume",
            "create",
            "web-1",
            "--size",
            "64M",
            "--personality",
            file.to_str().unwrap(),
        ],
    );
    let v = show(&dir, "web-1");
    assert_eq!(v["personality"]["hostname"], "web-01");
    let list = common::stdout(&common::run("nbdinfo", &["--list", &server.uri("")]));
    assert!(list.contains("seed/web-1"), "{list}");
    // The same address again: refused, and no volume made.
    let err = fails(
        &dir,
        &[
            "volume",
            "create",
            "web-2",
            "--size",
            "64M",
            "--personality",
            file.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("already the address of volume \"web-1\""),
        "{err}"
    );
    let out = cli(&dir, &["volume", "show", "web-2"]);
    assert!(!out.status.success(), "web-2 exists");
    server.stop();
}

/// kill -9 at random moments while personalities change, volumes are created with one and
/// deleted, and addresses come from a pool: after every restart each volume's record reads
/// whole (one of the versions it was given; a torn record would stop every hand-out), every
/// volume created with a personality has it, and no pool address is held twice.
#[test]
fn kill_9_while_personalities_change_leaves_every_record_whole() {
    let dir = Scratch::new("pers-kill9");
    let mut seed: u64 = 0x9e37;
    let mut rand = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    for round in 0..5 {
        let mut server = start(&dir);
        if round == 0 {
            ok(
                &dir,
                &[
                    "ippool",
                    "create",
                    "rack1",
                    "--subnet",
                    "10.9.0.0/16",
                    "--first",
                    "10.9.0.10",
                    "--last",
                    "10.9.3.250",
                ],
            );
        }
        let sock = dir.path("pool/streamer.sock");
        let files = dir.0.clone();
        let burst = std::thread::spawn(move || {
            for k in 0..60 {
                let vol = format!("v{}", k % 4);
                let file = files.join(format!("r{round}-{k}.toml"));
                std::fs::write(
                    &file,
                    format!(
                        "hostname = \"h-{round}-{k}\"\n[[interfaces]]\nname = \"eth0\"\n\
                         addresses = [\"pool:rack1\"]\n"
                    ),
                )
                .unwrap();
                let f = file.to_str().unwrap().to_string();
                let args: Vec<String> = match k % 3 {
                    0 => ["volume", "personality", &vol, "--set", &f]
                        .map(String::from)
                        .into(),
                    1 => {
                        let name = format!("c{round}-{k}");
                        [
                            "volume",
                            "create",
                            &name,
                            "--size",
                            "8M",
                            "--personality",
                            &f,
                        ]
                        .map(String::from)
                        .into()
                    }
                    _ => ["volume", "create", &vol, "--size", "8M"]
                        .map(String::from)
                        .into(),
                };
                let out = Command::new(BIN)
                    .args(&args)
                    .arg("--mgmt-socket")
                    .arg(&sock)
                    .output();
                if out.is_ok_and(|o| String::from_utf8_lossy(&o.stderr).contains("cannot reach")) {
                    return;
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(100 + rand(500)));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(server.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = server.child.take().unwrap().wait();
        burst.join().unwrap();

        let server = start(&dir);
        // Every record reads (a torn one would make this fail closed), and no address twice.
        let pools: serde_json::Value =
            serde_json::from_str(&ok(&dir, &["ippool", "list", "--json"])).unwrap();
        let held = pools[0]["held"].as_array().unwrap();
        let mut addrs: Vec<&str> = held
            .iter()
            .map(|h| h["address"].as_str().unwrap())
            .collect();
        let n = addrs.len();
        addrs.sort_unstable();
        addrs.dedup();
        assert_eq!(addrs.len(), n, "an address held twice: {held:?}");
        let vols: serde_json::Value =
            serde_json::from_str(&ok(&dir, &["volume", "list", "--json"])).unwrap();
        for v in vols.as_array().unwrap() {
            let name = v["name"].as_str().unwrap();
            let p = &show(&dir, name)["personality"];
            if name.starts_with('c') {
                assert!(p.is_object(), "{name} was created without its personality");
            }
            if p.is_object() {
                assert!(p["hostname"].as_str().unwrap().starts_with("h-"), "{p}");
                assert!(p["instance_id"].as_str().unwrap().starts_with("i-"));
            }
        }
        server.stop();
    }
}

/// A 32 MiB golden image with a partition table made by sfdisk: GPT with a root partition and
/// an empty one named CIDATA, or MBR with a FAT file system labelled CIDATA (holding a file of
/// the image's own) at 16 MiB.
fn image_with_cidata(dir: &Scratch, gpt: bool) -> std::path::PathBuf {
    let img = dir.path(if gpt { "gpt.img" } else { "mbr.img" });
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(32 << 20).unwrap();
    drop(f);
    let script = if gpt {
        "label: gpt\nstart=2048, size=16M, type=linux\nstart=34816, size=8M, type=linux, name=CIDATA\n"
    } else {
        "label: dos\nstart=2048, size=14M, type=83\nstart=32768, size=8M, type=c\n"
    };
    let mut child = Command::new("sfdisk")
        .args(["-q", img.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    if !gpt {
        common::run(
            "mkfs.vfat",
            &[
                "-n",
                "CIDATA",
                "--offset=32768",
                img.to_str().unwrap(),
                "8192",
            ],
        );
        let keep = dir.path("keep.txt");
        std::fs::write(&keep, "the image's own file\n").unwrap();
        let at = format!("{}@@{}", img.display(), 32768 * 512);
        common::run("mcopy", &["-i", &at, keep.to_str().unwrap(), "::keep.txt"]);
    }
    img
}

/// The volume's CIDATA partition, copied out of its export (`start` in bytes).
fn partition_of(server: &Server, dir: &Scratch, name: &str, start: u64) -> String {
    let copy = dir.path(&format!("{name}.copy"));
    let _ = std::fs::remove_file(&copy);
    common::run("nbdcopy", &[&server.uri(name), copy.to_str().unwrap()]);
    format!("{}@@{start}", copy.display())
}

/// A golden image with a CIDATA partition (GPT by name, MBR by FAT label): each clone with a
/// personality gets its seed written there before it is published, in a few blocks; a changed
/// personality rewrites it (refused while a server uses the volume); the root partition and
/// the image's own files in the partition are left alone.
#[test]
fn the_seed_is_written_into_a_cidata_partition_of_the_clone() {
    let dir = Scratch::new("pers-cidata");
    let server = start(&dir);
    let file = dir.path("web1.toml");
    std::fs::write(&file, WEB1).unwrap();
    let f = file.to_str().unwrap();
    for (gpt, start) in [(true, 34816u64 * 512), (false, 32768 * 512)] {
        let img = image_with_cidata(&dir, gpt);
        let (image, vol) = if gpt { ("gpt", "g1") } else { ("mbr", "m1") };
        ok(&dir, &["image", "import", image, img.to_str().unwrap()]);
        ok(
            &dir,
            &[
                "volume",
                "create",
                vol,
                "--image",
                image,
                "--personality",
                f,
            ],
        );
        let v = show(&dir, vol);
        let id = v["personality"]["instance_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            v["allocated_bytes"].as_u64().unwrap() < 1 << 20,
            "a few copied-on-write blocks: {v}"
        );
        let part = partition_of(&server, &dir, vol, start);
        let mtype = |file: &str| {
            common::stdout(&common::run("mtype", &["-i", &part, &format!("::{file}")]))
        };
        let meta: serde_json::Value = serde_json::from_str(&mtype("meta-data")).unwrap();
        assert_eq!(meta["instance-id"], id.as_str());
        assert_eq!(meta["local-hostname"], "web-01");
        assert!(mtype("user-data").contains("web-01.rack1.example.com"));
        assert!(mtype("network-config").contains("10.0.0.11/24"));
        if !gpt {
            assert_eq!(mtype("keep.txt"), "the image's own file\n");
        }
        // The file system is sound.
        let raw = dir.path(&format!("{vol}.part"));
        let copy = dir.path(&format!("{vol}.copy"));
        common::run(
            "dd",
            &[
                &format!("if={}", copy.display()),
                &format!("of={}", raw.display()),
                "bs=512",
                &format!("skip={}", start / 512),
                "count=16384",
                "status=none",
            ],
        );
        common::run("fsck.fat", &["-n", raw.to_str().unwrap()]);
        let label = common::stdout(&common::run("fatlabel", &[raw.to_str().unwrap()]));
        assert_eq!(label.trim(), "CIDATA");

        // A new personality is written into the volume too, while no server uses it.
        let file2 = dir.path("web1b.toml");
        std::fs::write(&file2, WEB1.replace("web-01", "web-09")).unwrap();
        let uri = server.unix_uri(vol);
        let mut client = Command::new("timeout")
            .args([
                "20",
                "/usr/bin/python3",
                "-m",
                "nbd",
                "-u",
                &uri,
                "-c",
                "import time; time.sleep(2)",
            ])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(500));
        let err = fails(
            &dir,
            &[
                "volume",
                "personality",
                vol,
                "--set",
                file2.to_str().unwrap(),
            ],
        );
        assert!(
            err.contains("cannot be rewritten while a server uses it"),
            "{err}"
        );
        client.wait().unwrap();
        assert_eq!(show(&dir, vol)["personality"]["instance_id"], id.as_str());
        ok(
            &dir,
            &[
                "volume",
                "personality",
                vol,
                "--set",
                file2.to_str().unwrap(),
            ],
        );
        let part = partition_of(&server, &dir, vol, start);
        let meta = common::stdout(&common::run("mtype", &["-i", &part, "::meta-data"]));
        assert!(meta.contains("web-09"), "{meta}");
        // The image's own bytes outside the partition are the clone's.
        let copy = std::fs::read(dir.path(&format!("{vol}.copy"))).unwrap();
        let orig = std::fs::read(&img).unwrap();
        assert_eq!(copy[..start as usize], orig[..start as usize]);
        ok(&dir, &["volume", "delete", vol]);
    }
    server.stop();
}
