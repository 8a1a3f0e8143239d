//! Shared harness for integration tests: starts the real `streamer` binary on an ephemeral TCP port
//! and a Unix socket, waits until it says `ready`, and stops it with SIGTERM (checking it exits 0).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_streamer");

/// A small tmpfs mounted at `dir/mnt` (unmounted on drop), so a file system really runs out of
/// space. `size` as mount(8) takes it, e.g. `4m`.
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    pub fn mount(dir: &Scratch, size: &str) -> SmallFs {
        let mnt = dir.path("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        let opts = format!("size={size}");
        run(
            "mount",
            &["-t", "tmpfs", "-o", &opts, "tmpfs", mnt.to_str().unwrap()],
        );
        SmallFs(mnt)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A scratch directory removed at drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "streamer-test-{}-{}-{}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    /// A sparse file of `size` bytes.
    pub fn sparse(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct Server {
    pub child: Option<Child>,
    pub tcp: String,
    pub socket: PathBuf,
    pub stderr_path: PathBuf,
}

impl Server {
    /// Starts `streamer serve --listen 127.0.0.1:0 --socket DIR/nbd.sock EXTRA...`.
    pub fn start(dir: &Scratch, extra: &[&str]) -> Server {
        Server::start_as(dir, &[], extra)
    }

    /// Starts the server through `wrapper` (e.g. `setpriv --reuid=...`), which must exec it
    /// (so that the child's pid is the server's).
    pub fn start_as(dir: &Scratch, wrapper: &[&str], extra: &[&str]) -> Server {
        let socket = dir.path("nbd.sock");
        // One log per server, also when a test starts several in one scratch directory.
        static N: AtomicU32 = AtomicU32::new(0);
        let stderr_path = dir.path(&format!(
            "server-{}-{}.log",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = match wrapper.split_first() {
            None => Command::new(BIN),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
        };
        // Test pools are new directories: a --data-dir gets --create (the refusal of a missing
        // one without it is tested on its own).
        let create = extra.contains(&"--data-dir") && !extra.contains(&"--create");
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0", "--socket"])
            .arg(&socket)
            .args(extra)
            .args(create.then_some("--create"))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .env("STREAMER_LOG", "info");
        let mut child = cmd.spawn().expect("start streamer");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tcp = String::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line == "ready" => break,
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("listening tcp ") {
                        tcp = a.to_string();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "streamer did not become ready; stderr:\n{}",
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
            }
        }
        assert!(!tcp.is_empty(), "server printed no tcp address");
        Server {
            child: Some(child),
            tcp,
            socket,
            stderr_path,
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.tcp, export)
    }
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.socket.display())
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }
    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    /// SIGTERM, then waits (bounded) and asserts a clean exit 0.
    pub fn stop(mut self) -> String {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "streamer did not exit within 30 s of SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log();
        assert!(
            status.success(),
            "streamer exited with {status} after SIGTERM:\n{log}"
        );
        assert!(
            !log.contains("panicked"),
            "server log shows a panic:\n{log}"
        );
        log
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a client command with a time limit; returns its output. Panics with the full output if it
/// fails (unless `expect_fail`).
pub fn run(program: &str, args: &[&str]) -> Output {
    run_with(program, args, false)
}

/// Runs a client command with a time limit and returns its output whatever its status.
pub fn run_with_status(program: &str, args: &[&str]) -> Output {
    client(program, args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn client(program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.arg("-k").arg("5").arg("120").arg(program).args(args);
    // libnbd's Python module exists only for Debian's interpreter.
    cmd.env(
        "PATH",
        format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
    );
    cmd
}

pub fn run_with(program: &str, args: &[&str], expect_fail: bool) -> Output {
    let out = run_with_status(program, args);
    if out.status.success() == expect_fail {
        panic!(
            "{program} {args:?} {} ({}):\nstdout:\n{}\nstderr:\n{}",
            if expect_fail {
                "unexpectedly succeeded"
            } else {
                "failed"
            },
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `program ARGS` as uid 65534 (`nobody`, with only its primary group `nogroup`), bounded in
/// time: the unprivileged user of the permission tests.
pub fn as_nobody(program: &str, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
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

/// Runs `/usr/bin/python3 -c CODE ARGS` in the background and waits for the first line it
/// prints (a script that says when it has done its part, then stays connected).
pub fn python_until_line(code: &str, args: &[&str]) -> (Child, String) {
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(code)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start python3");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().to_owned())
}

/// Runs one of the libnbd scripts in tests/py.
pub fn py(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let mut all = vec![path.to_str().unwrap()];
    all.extend_from_slice(args);
    stdout(&run("/usr/bin/python3", &all))
}

/// Writes a file of `size` bytes of deterministic, non-zero pseudo-random data.
pub fn data_file(path: &Path, size: usize, seed: u64) {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(size);
    std::fs::write(path, v).unwrap();
}
