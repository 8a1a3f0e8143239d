//! The management subcommands (`streamer image|volume|status|check|cancel`): parse, send to the
//! node's management socket, print a table (or `--json`), exit non-zero with a one-line reason.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::mgmt::client::{ClientError, call};
use crate::mgmt::protocol::{
    CheckInfo, ClientInfo, ImageInfo, Request, Response, StatusInfo, VerifyInfo, VolumeInfo,
};

/// The management socket's file name inside the data directory.
pub const SOCKET_NAME: &str = "streamer.sock";

/// How to reach the node and how to print.
#[derive(Debug, Args)]
pub struct Conn {
    /// The node's management socket, as `serve --mgmt-socket` names it (default:
    /// $STREAMER_DATA_DIR/streamer.sock, else /var/lib/streamer/streamer.sock for root and
    /// ~/.local/share/streamer/streamer.sock for anyone else). Not the NBD socket.
    #[arg(
        long = "mgmt-socket",
        alias = "socket",
        global = true,
        value_name = "PATH",
        env = "STREAMER_MGMT_SOCKET"
    )]
    pub socket: Option<PathBuf>,
    /// Print the result as JSON (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
}

impl Conn {
    fn path(&self) -> Result<PathBuf, String> {
        if let Some(p) = &self.socket {
            return Ok(p.clone());
        }
        let dir = match std::env::var_os("STREAMER_DATA_DIR") {
            Some(d) => PathBuf::from(d),
            None => super::default_data_dir()?,
        };
        Ok(dir.join(SOCKET_NAME))
    }
}

#[derive(Debug, Args)]
pub struct ImageCmd {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: ImageSub,
}

#[derive(Debug, Subcommand)]
enum ImageSub {
    /// Import a golden image from FILE (raw, or any format qemu-img reads; `-`: raw from stdin).
    Import {
        name: String,
        file: PathBuf,
        /// The file's format (default: what `qemu-img info` detects; stdin is raw). Formats
        /// other than raw are converted here, as you, and sent to the node raw.
        #[arg(long)]
        format: Option<String>,
        /// The image's size (10G, bytes; the virtual size of a converted image): a source
        /// that ends sooner or later is refused and nothing is published.
        #[arg(long, value_parser = super::parse_bytes, allow_hyphen_values = true)]
        size: Option<u64>,
        /// The SHA-256 (64 hex digits) of the image's raw bytes: a mismatch is refused and
        /// nothing is published.
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
    },
    /// List golden images.
    List,
    /// Size, digest and the volumes cloned from an image.
    Show { name: String },
    /// Re-read an image and check it against its digest.
    Verify { name: String },
    /// Delete an image (refused while volumes are cloned from it).
    Delete { name: String },
    /// Capture a volume as a new golden image (flattened; refused while it has clients).
    Capture {
        name: String,
        #[arg(long, value_name = "VOLUME")]
        from: String,
    },
}

#[derive(Debug, Args)]
pub struct VolumeCmd {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: VolumeSub,
}

#[derive(Debug, Subcommand)]
enum VolumeSub {
    /// Create a volume: a thin clone of --image (default size: the image's), or blank (--size).
    Create {
        name: String,
        #[arg(long)]
        image: Option<String>,
        /// Size (10G, 512M, bytes); at least the image's.
        #[arg(long, value_parser = super::parse_bytes, allow_hyphen_values = true)]
        size: Option<u64>,
        /// Its personality (a file as for `volume personality --set`), created with it in one
        /// step: after a crash the volume exists with it, or not at all.
        #[arg(long, value_name = "FILE")]
        personality: Option<PathBuf>,
    },
    /// List volumes: size, disk use, image, clients.
    List,
    /// A volume's details and I/O counters.
    Show { name: String },
    /// Grow a volume (new connections see the new size).
    Resize {
        name: String,
        #[arg(value_parser = super::parse_bytes, allow_hyphen_values = true)]
        size: u64,
    },
    /// Give a server a fresh clone of another golden image, keeping its volume's name and
    /// personality (a new instance id): an OS update. Refused while clients are connected,
    /// unless --force disconnects them.
    Redeploy {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long)]
        force: bool,
        /// Keep the old volume as NAME.previous (for rollback or to copy data from).
        #[arg(long)]
        keep_previous: bool,
    },
    /// Delete a volume (refused while clients are connected, unless --force disconnects them).
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Hand a pair volume to the other node of its pair (run it on the owner): writes here
    /// stop, in-flight ones finish, both copies are flushed, the other node takes over with
    /// the next fencing token. Clients connected here are disconnected: reconnect to the new
    /// owner.
    Move {
        name: String,
        #[arg(long, value_name = "NODE")]
        to: String,
    },
    /// Compare a pair volume's two copies online, block by block (run it on the volume's
    /// owner): the blocks that differ, and how many of them await a resync.
    Verify { name: String },
    /// Make this node the owner of a pair volume whose owner is gone: only if etcd says this
    /// node's copy is up to date, unless --force (which may lose writes the old owner
    /// acknowledged alone, and leaves a split brain for `volume resolve` if it did).
    Promote {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// End a split brain (or unrelated copies) of a pair volume, both nodes up: keep NODE's
    /// copy, discard the other node's changes; NODE becomes the owner if it is not, and the
    /// other copy is resynced whole from it.
    Resolve {
        name: String,
        #[arg(long, value_name = "NODE")]
        keep: String,
    },
    /// Set a volume's personality from FILE (TOML, or JSON; see docs/personality.md), or
    /// remove it (--clear). Each change gives the volume a new instance id.
    Personality {
        name: String,
        #[arg(
            long,
            value_name = "FILE",
            conflicts_with = "clear",
            required_unless_present = "clear"
        )]
        set: Option<PathBuf>,
        #[arg(long)]
        clear: bool,
    },
}

#[derive(Debug, Args)]
pub struct StatusCmd {
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Args)]
pub struct CancelCmd {
    #[command(flatten)]
    conn: Conn,
    /// The command's id, as `streamer status` lists it.
    id: u64,
}

pub fn cancel(c: CancelCmd) -> ExitCode {
    run(&c.conn, Request::Cancel { id: c.id }, None)
}

#[derive(Debug, Args)]
pub struct CheckCmd {
    #[command(flatten)]
    conn: Conn,
    /// Repair what can be repaired (leaked data blocks are freed).
    #[arg(long)]
    repair: bool,
    /// Check this volume only (default: every volume).
    name: Option<String>,
}

/// Says why a command failed and exits 1: one line on stderr, or under `--json` one JSON
/// object on stdout (`{"error": {"kind": KIND, "message": TEXT}}`), so scripts parse one stream.
pub(super) fn fail_kind(conn: &Conn, kind: &str, msg: impl std::fmt::Display) -> ExitCode {
    if conn.json {
        let v = serde_json::json!({ "error": { "kind": kind, "message": msg.to_string() } });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        eprintln!("streamer: {msg}");
    }
    ExitCode::FAILURE
}

/// A command refused before it reached the node (bad arguments, an unreadable file).
pub(super) fn fail(conn: &Conn, msg: impl std::fmt::Display) -> ExitCode {
    fail_kind(conn, "invalid", msg)
}

/// Sends a request, with a progress bar on a terminal for the long ones.
fn request(
    conn: &Conn,
    req: Request,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<Response, ClientError> {
    request_with_bar(
        conn,
        req,
        fd,
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
}

/// Sends a request whose progress (on a terminal) shows as `template` (indicatif's).
pub(super) fn request_with_bar(
    conn: &Conn,
    req: Request,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    template: &str,
) -> Result<Response, ClientError> {
    let bar = (std::io::stderr().is_terminal() && !conn.json).then(|| {
        let b = ProgressBar::hidden();
        b.set_style(ProgressStyle::with_template(template).expect("valid template"));
        b
    });
    let path = conn.path().map_err(ClientError::NoSocket)?;
    let r = call(&path, req, fd, |done, total| {
        if let Some(b) = &bar {
            if b.is_hidden() {
                b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            }
            match total {
                Some(t) => b.set_length(t),
                None => b.set_style(
                    ProgressStyle::with_template("{spinner} {bytes} {bytes_per_sec}")
                        .expect("valid template"),
                ),
            }
            b.set_position(done);
        }
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    r
}

pub(super) fn run(conn: &Conn, req: Request, fd: Option<std::os::fd::BorrowedFd<'_>>) -> ExitCode {
    finish(conn, request(conn, req, fd))
}

/// Prints a command's outcome and picks the exit code.
fn finish(conn: &Conn, result: Result<Response, ClientError>) -> ExitCode {
    match result {
        Ok(resp) => {
            if conn.json {
                println!("{}", json(&resp));
            } else {
                print!("{}", render(&resp));
            }
            match &resp {
                Response::Verify(v) if !v.ok => ExitCode::FAILURE,
                // A skipped volume was not checked: that is not a clean bill of health.
                Response::Check(c) if c.volumes.iter().any(|v| !v.ok || v.skipped.is_some()) => {
                    ExitCode::FAILURE
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(e) => fail_kind(conn, e.kind(), e),
    }
}

pub fn image(c: ImageCmd) -> ExitCode {
    let req = match c.cmd {
        ImageSub::Import {
            name,
            file,
            format,
            size,
            sha256,
        } => return import(&c.conn, name, &file, format, Expected { size, sha256 }),
        ImageSub::List => Request::ImageList,
        ImageSub::Show { name } => Request::ImageShow { name },
        ImageSub::Verify { name } => Request::ImageVerify { name },
        ImageSub::Delete { name } => Request::ImageDelete { name },
        ImageSub::Capture { name, from } => Request::ImageCapture { name, from },
    };
    run(&c.conn, req, None)
}

/// What an import must be (`--size`, `--sha256`).
struct Expected {
    size: Option<u64>,
    sha256: Option<String>,
}

/// Opens the import source here, with the user's own permissions, and passes the open file to
/// the node: the node reads only what the user could read. A format other than raw is
/// converted here too, as the user (see `Conversion`), and reaches the node as raw bytes.
fn import(
    conn: &Conn,
    name: String,
    file: &Path,
    format: Option<String>,
    want: Expected,
) -> ExitCode {
    if let Some(h) = &want.sha256
        && let Err(e) = crate::mgmt::protocol::parse_sha256(h)
    {
        return fail(conn, format!("--sha256: {e}"));
    }
    let raw_request = |name, size| Request::ImageImport {
        name,
        format: None,
        size,
        sha256: want.sha256.clone(),
    };
    if file == Path::new("-") {
        if format.as_deref().is_some_and(|f| f != "raw") {
            return fail(
                conn,
                "stdin can only carry a raw image (other formats need random access)",
            );
        }
        let stdin = std::io::stdin();
        return run(conn, raw_request(name, want.size), Some(stdin.as_fd()));
    }
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) => return fail(conn, format!("cannot read {}: {e}", file.display())),
    };
    match f.metadata() {
        Ok(m) if m.is_dir() => return fail(conn, format!("{} is a directory", file.display())),
        Err(e) => return fail(conn, format!("cannot read {}: {e}", file.display())),
        Ok(_) => {}
    }
    if format.as_deref() == Some("raw") {
        return run(conn, raw_request(name, want.size), Some(f.as_fd()));
    }
    // qemu reads a name with a `:` before its first `/` as a protocol (`nbd:`, `json:`): an
    // absolute path is always a file.
    let file = match std::path::absolute(file) {
        Ok(p) => p,
        Err(e) => return fail(conn, format!("cannot read {}: {e}", file.display())),
    };
    let probe = match probe_image(&file, format.as_deref()) {
        Ok(p) => p,
        Err(e) => return fail(conn, e),
    };
    if probe.format == "raw" {
        return run(conn, raw_request(name, want.size), Some(f.as_fd()));
    }
    if let Some(s) = want.size
        && s != probe.virtual_size
    {
        return fail(
            conn,
            format!(
                "{} is a {} image of {} bytes, not the {s} bytes --size expects",
                file.display(),
                probe.format,
                probe.virtual_size
            ),
        );
    }
    if let Err(e) = check_image(&file, &probe.format) {
        return fail(conn, e);
    }
    let conversion = match Conversion::start(&file, &probe.format) {
        Ok(c) => c,
        Err(e) => return fail(conn, e),
    };
    let result = request(
        conn,
        raw_request(name, Some(probe.virtual_size)),
        Some(conversion.output.as_fd()),
    );
    // The node reads through its own copy of the pipe now; with ours closed, a node that
    // gave up makes the converter fail on its next write instead of blocking forever.
    match conversion.finish(result.is_err()) {
        Err(why) if result.is_err() => {
            fail(conn, format!("converting {} failed: {why}", file.display()))
        }
        _ => finish(conn, result),
    }
}

/// A non-raw image converted on the client as the calling user: `qemu-nbd` opens it read-only
/// (and whatever it refers to: a backing file, a data file, vmdk extents, each with the user's
/// permissions and resolved where the image is), and `nbdcopy` writes it raw into a pipe whose
/// other end goes to the node. The node never opens anything on the image's behalf, and the
/// conversion needs no scratch space.
struct Conversion {
    child: std::process::Child,
    output: std::process::ChildStdout,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Conversion {
    fn start(file: &Path, format: &str) -> Result<Conversion, String> {
        use std::io::Read;
        let mut child = std::process::Command::new("nbdcopy")
            .args([
                "--",
                "[",
                "qemu-nbd",
                "--read-only",
                "--format",
                format,
                "--",
            ])
            .arg(file)
            .args(["]", "-"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run nbdcopy to convert the {format} image ({e}); install \
                     libnbd-bin and qemu-utils, or convert it to raw first"
                )
            })?;
        let output = child.stdout.take().expect("stdout is piped");
        let mut err = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Ok(Conversion {
            child,
            output,
            stderr: Some(stderr),
        })
    }

    /// Closes this end of the pipe, stops the converter if the import failed, and returns
    /// how the converter ended.
    fn finish(mut self, kill: bool) -> Result<(), String> {
        drop(self.output);
        if kill {
            let _ = self.child.kill();
        }
        let status = self.child.wait().map_err(|e| e.to_string())?;
        let msg = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        if status.success() {
            Ok(())
        } else {
            Err(format!("{status}: {}", msg.trim()))
        }
    }
}

/// What `qemu-img info` says of an image.
struct Probe {
    format: String,
    virtual_size: u64,
}

/// The image's format (`format` when given, else what qemu-img detects) and its size.
fn probe_image(file: &Path, format: Option<&str>) -> Result<Probe, String> {
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["info", "--output=json"]);
    if let Some(f) = format {
        cmd.args(["-f", f]);
    }
    let out = cmd.arg(file).output().map_err(|e| {
        format!("cannot run qemu-img to detect the format ({e}); give --format raw for a raw image")
    })?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img cannot read {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("unexpected qemu-img output: {e}"))?;
    let format = v
        .get("format")
        .and_then(|f| f.as_str())
        .map(str::to_owned)
        .ok_or_else(|| "qemu-img did not report a format".to_owned())?;
    let virtual_size = v
        .get("virtual-size")
        .and_then(|f| f.as_u64())
        .ok_or_else(|| "qemu-img did not report a size".to_owned())?;
    Ok(Probe {
        format,
        virtual_size,
    })
}

/// Refuses an image that `qemu-img check` finds damaged: a truncated qcow2 reads as zeroes
/// where its clusters are missing, and would be published as a whole image of them.
fn check_image(file: &Path, format: &str) -> Result<(), String> {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-q", "-f", format])
        .arg(file)
        .output()
        .map_err(|e| format!("cannot run qemu-img check ({e})"))?;
    // 0: clean; 3: leaked clusters only (harmless to a reader); 63: the format has no check.
    match out.status.code() {
        Some(0 | 3 | 63) => Ok(()),
        _ => {
            // One line: the first few of qemu-img's findings.
            let text = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let mut said = lines.iter().take(3).copied().collect::<Vec<_>>().join("; ");
            if lines.len() > 3 {
                said.push_str(&format!("; and {} more", lines.len() - 3));
            }
            Err(format!(
                "{} is damaged ({format}; `qemu-img check` says: {said}): not imported",
                file.display(),
            ))
        }
    }
}

pub fn volume(c: VolumeCmd) -> ExitCode {
    let req = match c.cmd {
        VolumeSub::Create {
            name,
            image,
            size,
            personality,
        } => {
            if image.is_none() && size.is_none() {
                return fail(
                    &c.conn,
                    "a blank volume needs --size (or give --image to clone one)",
                );
            }
            let personality = match personality.map(|p| read_personality(&p)).transpose() {
                Ok(p) => p,
                Err(e) => return fail(&c.conn, e),
            };
            Request::VolumeCreate {
                name,
                image,
                size,
                personality,
            }
        }
        VolumeSub::List => Request::VolumeList,
        VolumeSub::Show { name } => Request::VolumeShow { name },
        VolumeSub::Resize { name, size } => Request::VolumeResize { name, size },
        VolumeSub::Delete { name, force } => Request::VolumeDelete { name, force },
        VolumeSub::Redeploy {
            name,
            image,
            force,
            keep_previous,
        } => Request::VolumeRedeploy {
            name,
            image,
            force,
            keep_previous,
        },
        VolumeSub::Promote { name, force } => Request::VolumePromote { name, force },
        VolumeSub::Verify { name } => Request::VolumeVerify { name },
        VolumeSub::Move { name, to } => Request::VolumeMove { name, to },
        VolumeSub::Resolve { name, keep } => Request::VolumeResolve { name, keep },
        VolumeSub::Personality { name, set, .. } => {
            let personality = match set.map(|p| read_personality(&p)).transpose() {
                Ok(p) => p,
                Err(e) => return fail(&c.conn, e),
            };
            Request::VolumePersonality { name, personality }
        }
    };
    run(&c.conn, req, None)
}

/// Reads and checks a personality file (TOML or JSON); the error names the file and the field.
fn read_personality(path: &Path) -> Result<Box<crate::personality::Personality>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    crate::personality::Personality::parse(&text)
        .map(Box::new)
        .map_err(|e| format!("{}: {e}", path.display()))
}

pub fn status(c: StatusCmd) -> ExitCode {
    run(&c.conn, Request::Status, None)
}

pub fn check(c: CheckCmd) -> ExitCode {
    run(
        &c.conn,
        Request::Check {
            repair: c.repair,
            name: c.name,
        },
        None,
    )
}

// ---- output ----------------------------------------------------------------------------------

fn json(r: &Response) -> String {
    let v = match r {
        Response::Status(x) => serde_json::to_value(x),
        Response::Image(x) => serde_json::to_value(x),
        Response::Images(x) => serde_json::to_value(x),
        Response::Volume(x) => serde_json::to_value(x),
        Response::Volumes(x) => serde_json::to_value(x),
        Response::Verify(x) => serde_json::to_value(x),
        Response::Check(x) => serde_json::to_value(x),
        Response::Deleted { name } => Ok(serde_json::json!({ "deleted": name })),
        Response::Pair(x) => serde_json::to_value(x),
        Response::IpPool(x) => serde_json::to_value(x),
        Response::IpPools(x) => serde_json::to_value(x),
        Response::Cancelled(x) => serde_json::to_value(x),
        Response::Deploy(x) => serde_json::to_value(x),
    };
    serde_json::to_string_pretty(&v.unwrap_or_default()).unwrap_or_default()
}

fn render(r: &Response) -> String {
    match r {
        Response::Status(s) => render_status(s),
        Response::Pair(p) => super::pair::render(p),
        Response::Deploy(d) => super::deploy::render(d, ""),
        Response::IpPool(p) => super::ippool::render(std::slice::from_ref(&**p)),
        Response::IpPools(list) => super::ippool::render(list),
        Response::Image(i) => render_image(i),
        Response::Images(list) => table(
            &[
                "NAME", "SIZE", "DISK", "SHA256", "VOLUMES", "CLIENTS", "STATE",
            ],
            list.iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        HumanBytes(i.size).to_string(),
                        HumanBytes(i.allocated_bytes).to_string(),
                        i.sha256.chars().take(16).collect(),
                        i.volumes.len().to_string(),
                        i.clients.to_string(),
                        image_state(i).into(),
                    ]
                })
                .collect(),
        ),
        Response::Volume(v) => render_volume(v),
        Response::Volumes(list) => table(
            &["NAME", "SIZE", "DISK", "IMAGE", "CLIENTS", "STATE"],
            list.iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        HumanBytes(v.size).to_string(),
                        HumanBytes(v.allocated_bytes).to_string(),
                        v.image.clone().unwrap_or_else(|| "-".into()),
                        v.clients.to_string(),
                        volume_state(v).into(),
                    ]
                })
                .collect(),
        ),
        Response::Verify(v) => render_verify(v),
        Response::Check(c) => render_check(c),
        Response::Deleted { name } => format!("deleted {name}\n"),
        Response::Cancelled(j) => format!("cancelling {} ({})\n", j.id, j.command),
    }
}

fn volume_state(v: &VolumeInfo) -> &'static str {
    match (&v.damaged, &v.failed, v.served) {
        (Some(_), _, _) => "damaged",
        (None, Some(_), _) => "failed",
        (None, None, true) => "served",
        (None, None, false) => "offline",
    }
}

fn image_state(i: &ImageInfo) -> &'static str {
    if i.damaged.is_some() { "damaged" } else { "ok" }
}

/// Left-aligned columns, two spaces apart.
pub(super) fn table(head: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(head.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

pub(super) fn fields(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{:<w$}  {v}\n", format!("{k}:")))
        .collect()
}

fn render_image(i: &ImageInfo) -> String {
    fields(&[
        ("name", i.name.clone()),
        ("size", format!("{} ({} bytes)", HumanBytes(i.size), i.size)),
        ("disk", HumanBytes(i.allocated_bytes).to_string()),
        ("sha256", i.sha256.clone()),
        ("export", format!("image/{}", i.name)),
        (
            "volumes",
            if i.volumes.is_empty() {
                "-".into()
            } else {
                i.volumes.join(", ")
            },
        ),
        ("clients", i.clients.to_string()),
        ("state", image_state(i).into()),
        ("failure", i.damaged.clone().unwrap_or_else(|| "-".into())),
    ])
}

fn render_volume(v: &VolumeInfo) -> String {
    let c = &v.counters;
    let mut rows = vec![
        ("name", v.name.clone()),
        ("size", format!("{} ({} bytes)", HumanBytes(v.size), v.size)),
        ("disk", HumanBytes(v.allocated_bytes).to_string()),
        (
            "image",
            v.image.clone().unwrap_or_else(|| "- (blank)".into()),
        ),
        ("state", volume_state(v).into()),
        (
            "failure",
            v.damaged
                .clone()
                .or_else(|| v.failed.clone())
                .unwrap_or_else(|| "-".into()),
        ),
        ("clients", v.clients.to_string()),
        (
            "reads",
            format!("{} ({})", c.reads, HumanBytes(c.read_bytes)),
        ),
        (
            "writes",
            format!("{} ({})", c.writes, HumanBytes(c.written_bytes)),
        ),
        ("flushes", c.flushes.to_string()),
        ("zeroes", c.zeroes.to_string()),
        ("errors", c.errors.to_string()),
        ("commit", v.commit.to_string()),
        ("generation", v.generation.clone()),
    ];
    // A personality adds its host name, addresses and instance id.
    if let Some(p) = &v.personality {
        let addresses: Vec<String> = p.addresses().iter().map(ToString::to_string).collect();
        rows.push((
            "hostname",
            p.fqdn.clone().unwrap_or_else(|| p.hostname.clone()),
        ));
        rows.push((
            "addresses",
            if addresses.is_empty() {
                "dhcp".into()
            } else {
                addresses.join(", ")
            },
        ));
        rows.push(("instance id", p.instance_id.clone()));
    }
    fields(&rows) + &render_clients(&v.connections)
}

/// One line per client connection: peer, export, how long, bytes each way.
fn render_clients(list: &[ClientInfo]) -> String {
    list.iter()
        .map(|c| {
            format!(
                "  client: {} on {} for {}s, read {}, written {}\n",
                c.peer,
                c.export,
                c.seconds,
                HumanBytes(c.read_bytes),
                HumanBytes(c.written_bytes)
            )
        })
        .collect()
}

fn render_verify(v: &VerifyInfo) -> String {
    format!(
        "{}: {}{}\n",
        v.name,
        if v.ok { "ok, " } else { "" },
        v.message
    )
}

fn render_check(c: &CheckInfo) -> String {
    let mut out = String::new();
    for v in &c.volumes {
        if let Some(why) = &v.skipped {
            out.push_str(&format!("{}: skipped: {why}\n", v.name));
            continue;
        }
        let mut line = format!("{}: {}", v.name, if v.ok { "ok" } else { "CORRUPT" });
        if v.leaks > 0 {
            line.push_str(&format!(
                ", {} leaked range(s) ({}){}",
                v.leaks,
                HumanBytes(v.leaked_bytes),
                if v.repaired { ", freed" } else { "" }
            ));
        }
        out.push_str(&line);
        out.push('\n');
        for e in &v.errors {
            out.push_str(&format!("  error: {e}\n"));
        }
        for n in &v.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
    }
    if c.volumes.is_empty() {
        out.push_str("no volumes\n");
    }
    let skipped: Vec<&str> = c
        .volumes
        .iter()
        .filter(|v| v.skipped.is_some())
        .map(|v| v.name.as_str())
        .collect();
    if !skipped.is_empty() {
        out.push_str(&format!(
            "not checked: {} (check them once their clients are gone: `streamer check NAME`)\n",
            skipped.join(", ")
        ));
    }
    out
}

fn render_status(s: &StatusInfo) -> String {
    let used_fs = s.pool.capacity_bytes.saturating_sub(s.pool.free_bytes);
    let mut out = fields(&[
        ("node", format!("streamer {} (pid {})", s.version, s.pid)),
        ("data dir", s.data_dir.clone()),
        ("uptime", format!("{}s", s.uptime_seconds)),
        (
            "pool",
            format!(
                "{} used by images and volumes; file system {} of {} used, {} free",
                HumanBytes(s.pool.used_bytes),
                HumanBytes(used_fs),
                HumanBytes(s.pool.capacity_bytes),
                HumanBytes(s.pool.free_bytes)
            ),
        ),
        ("images", s.images.to_string()),
        ("volumes", s.volumes.to_string()),
        ("exports", s.exports.len().to_string()),
        ("connections", s.connections.to_string()),
        (
            "alerts",
            if s.alerts.is_empty() {
                "none".into()
            } else {
                s.alerts.len().to_string()
            },
        ),
    ]);
    for a in &s.alerts {
        out.push_str(&format!("  alert: {a}\n"));
    }
    out.push_str(&render_clients(&s.clients));
    if !s.jobs.is_empty() {
        out.push_str(&format!("{:<14}{}\n", "running:", s.jobs.len()));
    }
    for j in &s.jobs {
        let done = match j.total_bytes {
            Some(t) if t > 0 => format!(
                "{} of {} ({}%)",
                HumanBytes(j.done_bytes),
                HumanBytes(t),
                j.done_bytes * 100 / t
            ),
            _ => HumanBytes(j.done_bytes).to_string(),
        };
        out.push_str(&format!(
            "  {}: {} (uid {}, {}s): {done}; `streamer cancel {}` ends it\n",
            j.id, j.command, j.uid, j.seconds, j.id
        ));
    }
    out
}
