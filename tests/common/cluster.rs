//! The pair's test harness: a real etcd on free loopback ports, `streamer serve` nodes of pair
//! `p1`, and network namespaces whose links the tests cut with nftables. Shared by `pair.rs`
//! and `mirror.rs`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{BIN, Scratch, Server, run_with_status};

/// A network namespace of the test's own, loopback up, deleted at drop (after everything in it
/// was stopped: declare it first). Links inside it are cut with nftables rules of its own, so
/// no other test's traffic is touched.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("st-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The prefix that runs a program inside the namespace (it execs: the pid is the program's).
    pub fn wrapper(&self) -> Vec<&str> {
        vec!["ip", "netns", "exec", &self.name]
    }

    pub fn run(&self, cmd: &[&str]) -> std::process::Output {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd:?} in {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Drops every TCP segment to or from these ports inside the namespace.
    pub fn cut(&self, ports: &[u16]) {
        let set = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let set = format!("{{ {set} }}");
        self.run(&["nft", "add", "table", "inet", "streamer_cut"]);
        self.run(&[
            "nft",
            "add chain inet streamer_cut input { type filter hook input priority 0 ; }",
        ]);
        for dir in ["dport", "sport"] {
            self.run(&[
                "nft",
                "add",
                "rule",
                "inet",
                "streamer_cut",
                "input",
                "tcp",
                dir,
                &set,
                "drop",
            ]);
        }
    }

    pub fn heal(&self) {
        self.run(&["nft", "delete", "table", "inet", "streamer_cut"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An etcd of the test's own: loopback, free ports, a data directory in a scratch dir; killed
/// at drop.
pub struct Etcd {
    pub child: Option<Child>,
    pub url: String,
    /// Runs inside this namespace (its loopback), if any.
    pub netns: Option<String>,
    pub _dir: Scratch,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_in(None)
    }

    pub fn start_in(netns: Option<&Netns>) -> Etcd {
        let dir = Scratch::new("etcd");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let log = std::fs::File::create(dir.path("etcd.log")).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, "etcd"]);
                c
            }
            None => Command::new("etcd"),
        };
        let child = cmd
            .arg("--data-dir")
            .arg(dir.path("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd (Debian etcd-server) is installed");
        let etcd = Etcd {
            child: Some(child),
            url,
            netns: netns.map(|n| n.name.clone()),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !etcd.healthy() {
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    pub fn healthy(&self) -> bool {
        let addr = self.url.trim_start_matches("http://");
        if let Some(ns) = &self.netns {
            // The namespace's loopback is out of the test's reach: ask from inside it.
            let (host, port) = addr.split_once(':').unwrap();
            let script = format!(
                "exec 3<>/dev/tcp/{host}/{port} && printf 'GET /health HTTP/1.0\\r\\n\\r\\n' >&3 \
                 && timeout 2 cat <&3"
            );
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "bash", "-c", &script])
                .output()
                .unwrap();
            return String::from_utf8_lossy(&out.stdout).contains("\"health\":\"true\"");
        }
        let Ok(mut s) = TcpStream::connect(addr) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        r.contains("\"health\":\"true\"")
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node of pair `p1`: its own scratch dir and pool.
pub struct Node {
    pub server: Server,
    pub dir: Scratch,
}

pub fn node_args<'a>(
    dir: &'a Scratch,
    pool: &'a str,
    name: &'a str,
    etcd: &'a str,
    lease: &'a str,
) -> Vec<String> {
    vec![
        "--data-dir".into(),
        dir.path(pool).to_str().unwrap().into(),
        "--node".into(),
        name.into(),
        "--pair".into(),
        "p1".into(),
        "--etcd".into(),
        etcd.into(),
        "--peer-listen".into(),
        "127.0.0.1:0".into(),
        "--lease".into(),
        lease.into(),
        "--peer-timeout".into(),
        "2".into(),
    ]
}

impl Node {
    /// A node inside `ns`, its peer link on a fixed port (the namespace is the test's own).
    pub fn start_in_netns(ns: &Netns, name: &str, etcd: &Etcd, peer_port: u16) -> Node {
        let dir = Scratch::new(&format!("ns-node-{name}"));
        let mut args = node_args(&dir, "pool", name, &etcd.url, "5");
        let at = args.iter().position(|a| a == "127.0.0.1:0").unwrap();
        args[at] = format!("127.0.0.1:{peer_port}");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Server::start_as(&dir, &ns.wrapper(), &args);
        Node { server, dir }
    }

    pub fn start(name: &str, etcd: &Etcd, lease: &str) -> Node {
        let dir = Scratch::new(&format!("node-{name}"));
        Node::start_in(dir, name, etcd, lease)
    }

    pub fn start_in(dir: Scratch, name: &str, etcd: &Etcd, lease: &str) -> Node {
        Node::start_with(dir, name, etcd, lease, &[])
    }

    /// `start_in` with more `serve` arguments.
    pub fn start_with(dir: Scratch, name: &str, etcd: &Etcd, lease: &str, extra: &[&str]) -> Node {
        let mut args = node_args(&dir, "pool", name, &etcd.url, lease);
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Server::start(&dir, &args);
        Node { server, dir }
    }

    pub fn mgmt(&self) -> String {
        self.dir.path("pool/streamer.sock").to_str().unwrap().into()
    }

    /// `streamer pair status --json` of this node.
    pub fn pair_status(&self) -> serde_json::Value {
        let out = run_with_status(
            BIN,
            &["pair", "status", "--json", "--mgmt-socket", &self.mgmt()],
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "pair status: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    pub fn alerts(&self) -> Vec<String> {
        let out = run_with_status(BIN, &["status", "--json", "--mgmt-socket", &self.mgmt()]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    }

    /// The peer address the node printed (`peer tcp ADDR`), from its pair record.
    pub fn peer_addr(&self) -> String {
        let s = self.pair_status();
        let me = s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["this_node"] == true)
            .expect("this node is listed")
            .clone();
        me["peer_addr"].as_str().unwrap().to_string()
    }
}

/// Polls `f` until it holds, at most `secs` seconds; panics with `what` otherwise.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "waited {secs}s for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn node_up(status: &serde_json::Value, name: &str) -> Option<bool> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == name)
        .map(|n| n["up"] == true)
}

pub fn link_up(status: &serde_json::Value) -> bool {
    status["link"]["up"] == true
}
