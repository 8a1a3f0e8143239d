//! The management socket: who may connect, how a request is read, how a command runs.
//!
//! Every limit is explicit: a request is one line of at most `MAX_REQUEST_BYTES`, it must arrive
//! within `REQUEST_TIMEOUT`, at most `MAX_CLIENTS` commands run at once, and the peer's uid is
//! checked with `SO_PEERCRED` before a byte is read: root, the owner of the data directory, or a
//! member of the admin group. Commands run on their own threads, never on the I/O engine's.

use std::fs::File;
use std::io::{self, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};

use super::protocol::{ErrorKind, MAX_REQUEST_BYTES, Reply, Request, Response, parse_sha256};
use crate::node::{Job, Liveness, Node, NodeError, Refused};
use crate::pool::Expect;

/// Time a client has to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a reply may take to be read by the client before the server gives up on it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Commands running at once for callers other than root; more are refused with a message.
const MAX_CLIENTS: usize = 32;
/// Commands root may run beyond `MAX_CLIENTS`: the admin group filling every slot (stalled
/// imports, say) must not lock root out of the node.
const ROOT_RESERVE: usize = 8;
/// Commands one caller other than root may run at once.
const MAX_PER_UID: usize = 8;
/// Least time between two progress lines.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Who may manage the node.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    /// The owner of the data directory.
    pub owner_uid: u32,
    /// Members of this group (primary or supplementary) may manage it too.
    pub admin_gid: Option<u32>,
}

pub struct MgmtServer {
    path: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl MgmtServer {
    /// Binds `path` (mode 0600, or 0660 owned by the admin group) and starts accepting.
    ///
    /// The socket is bound in a new private directory beside `path`, given its owner and mode
    /// there, and only then renamed into place: it is never reachable with the wrong mode, and
    /// the chown and chmod act on a name no one else can swap for a link. `path`'s directory
    /// must be one only root and the node's user can change.
    pub fn start(node: Arc<Node>, path: &Path, access: Access) -> io::Result<MgmtServer> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the socket path names no file")
        })?;
        crate::pool::check_ancestors(parent, rustix::process::geteuid().as_raw())?;
        match std::fs::symlink_metadata(path) {
            // Left by a server that did not stop cleanly (a live one would hold the pool's
            // lock): the rename below replaces it.
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let private = parent.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&private);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("creating {}: {e}", private.display()))
            })?;
        let staged = private.join("s");
        let bound = (|| {
            let listener = UnixListener::bind(&staged)?;
            let mode = match access.admin_gid {
                Some(gid) => {
                    std::os::unix::fs::chown(&staged, None, Some(gid))?;
                    0o660
                }
                None => 0o600,
            };
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&staged, path)?;
            Ok::<_, io::Error>(listener)
        })();
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_dir(&private);
        let listener = bound.map_err(|e| {
            let why = match e.raw_os_error() {
                Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM) => format!(
                    "{e}: the file system of {} cannot hold a Unix socket; put it on another \
                     with --mgmt-socket",
                    parent.display()
                ),
                _ => e.to_string(),
            };
            io::Error::new(e.kind(), format!("binding {}: {why}", path.display()))
        })?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?);
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("streamer-mgmt".into())
                .spawn(move || accept_loop(&listener, &stop, &node, access))?
        };
        Ok(MgmtServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting; commands already running finish on their own threads.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for MgmtServer {
    /// Also on a start-up that fails after the socket was bound: no stale socket is left.
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Commands running now: in all, and per caller.
#[derive(Default)]
struct Slots {
    total: usize,
    per_uid: std::collections::HashMap<u32, usize>,
}

impl Slots {
    /// Takes a slot for `uid`, or says why not.
    fn take(&mut self, uid: u32) -> Result<(), String> {
        let mine = self.per_uid.get(&uid).copied().unwrap_or(0);
        if uid == 0 {
            if self.total >= MAX_CLIENTS + ROOT_RESERVE {
                return Err(format!(
                    "too many management commands at once (limit {})",
                    MAX_CLIENTS + ROOT_RESERVE
                ));
            }
        } else if mine >= MAX_PER_UID {
            return Err(format!(
                "too many management commands at once for uid {uid} (limit {MAX_PER_UID} per user)"
            ));
        } else if self.total >= MAX_CLIENTS {
            return Err(format!(
                "too many management commands at once (limit {MAX_CLIENTS}; root may still run \
                 {ROOT_RESERVE} more)"
            ));
        }
        self.total += 1;
        self.per_uid.insert(uid, mine + 1);
        Ok(())
    }

    fn give_back(&mut self, uid: u32) {
        let mine = self
            .per_uid
            .get_mut(&uid)
            .expect("a slot taken by this uid");
        assert!(*mine > 0 && self.total > 0, "management slot accounting");
        *mine -= 1;
        if *mine == 0 {
            self.per_uid.remove(&uid);
        }
        self.total -= 1;
    }
}

fn accept_loop(listener: &UnixListener, stop: &EventFd, node: &Arc<Node>, access: Access) {
    let slots = Arc::new(parking_lot::Mutex::new(Slots::default()));
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!("management socket poll failed: {e}");
                return;
            }
        }
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            return;
        }
        loop {
            let mut stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("management accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
            };
            let _ = stream.set_nonblocking(false);
            // Refusals are written with a short timeout: the accept loop must not wait on a
            // peer that does not read.
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let uid = match authorize(&stream, access) {
                Ok(uid) => uid,
                Err(why) => {
                    tracing::warn!("management connection refused: {why}");
                    let _ = send(&mut stream, &error(ErrorKind::Denied, why).into());
                    continue;
                }
            };
            if let Err(why) = slots.lock().take(uid) {
                tracing::warn!(uid, "management connection refused: {why}");
                let _ = send(&mut stream, &error(ErrorKind::InUse, why).into());
                continue;
            }
            let (node, slots2) = (node.clone(), slots.clone());
            let spawned = std::thread::Builder::new()
                .name("streamer-mgmt-cmd".into())
                .spawn(move || {
                    serve_client(stream, &node, uid);
                    slots2.lock().give_back(uid);
                });
            if let Err(e) = spawned {
                slots.lock().give_back(uid);
                tracing::error!("cannot start a management command thread: {e}");
            }
        }
    }
}

/// A command refused before it ran (kept small: it travels in `Result`s).
#[derive(Debug)]
struct Refusal(Box<(ErrorKind, String)>);

impl From<Refusal> for Reply {
    fn from(r: Refusal) -> Reply {
        let (kind, message) = *r.0;
        Reply::Error { kind, message }
    }
}

fn error(kind: ErrorKind, message: String) -> Refusal {
    Refusal(Box::new((kind, message)))
}

fn send(s: &mut UnixStream, r: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)
}

/// Checks the peer's credentials; `Err` holds the refusal.
fn authorize(s: &UnixStream, access: Access) -> Result<u32, String> {
    let cred = rustix::net::sockopt::socket_peercred(s)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let uid = cred.uid.as_raw();
    if uid == 0 || uid == access.owner_uid {
        return Ok(uid);
    }
    if let Some(gid) = access.admin_gid
        && (cred.gid.as_raw() == gid || supplementary_groups(cred.pid.as_raw_pid()).contains(&gid))
    {
        return Ok(uid);
    }
    Err(format!(
        "permission denied: uid {uid} is not root, the owner of the data directory (uid {}){}",
        access.owner_uid,
        match access.admin_gid {
            Some(g) => format!(", or in the admin group (gid {g})"),
            None => String::new(),
        }
    ))
}

/// The supplementary groups of process `pid` (from /proc; empty if it cannot be read).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the request line and any descriptors sent with it.
fn read_request(s: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), Refusal> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut line = Vec::with_capacity(512);
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(error(
                ErrorKind::Invalid,
                format!("no request within {}s", REQUEST_TIMEOUT.as_secs()),
            ));
        }
        let _ = s.set_read_timeout(Some(left));
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            s,
            &mut [IoSliceMut::new(&mut chunk)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(passed) = msg {
                fds.extend(passed);
            }
        }
        let n = match got {
            Ok(m) => m.bytes,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => {
                return Err(error(
                    ErrorKind::Invalid,
                    format!("no request within {}s", REQUEST_TIMEOUT.as_secs()),
                ));
            }
            Err(e) => {
                return Err(error(
                    ErrorKind::Invalid,
                    format!("reading the request: {e}"),
                ));
            }
        };
        if n == 0 {
            return Err(error(
                ErrorKind::Invalid,
                "the connection ended before a whole request line arrived".into(),
            ));
        }
        if let Some(end) = chunk[..n].iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&chunk[..end]);
            if line.len() > MAX_REQUEST_BYTES {
                break;
            }
            return Ok((line, fds));
        }
        line.extend_from_slice(&chunk[..n]);
        if line.len() > MAX_REQUEST_BYTES {
            break;
        }
    }
    Err(error(
        ErrorKind::Invalid,
        format!("request longer than {MAX_REQUEST_BYTES} bytes"),
    ))
}

/// Parses a request line (`protocol::parse_request`) into a refusal on error.
fn parse(line: &[u8]) -> Result<Request, Refusal> {
    super::protocol::parse_request(line).map_err(|m| error(ErrorKind::Invalid, m))
}

/// Runs one authorized caller's command on its own thread.
fn serve_client(mut s: UnixStream, node: &Node, uid: u32) {
    let _ = s.set_write_timeout(Some(REPLY_TIMEOUT));
    let request = match read_request(&s).and_then(|(line, fds)| Ok((parse(&line)?, fds))) {
        Ok(r) => r,
        Err(refusal) => {
            let _ = send(&mut s, &refusal.into());
            return;
        }
    };
    let (request, fds) = request;
    tracing::info!(uid, ?request, "management command");
    let mut last = Instant::now();
    let mut out = s.try_clone();
    // A long command is a job: listed by `status`, cancelled by `streamer cancel` or when this
    // client goes away (the peer's end of the socket closed: the CLI was killed or interrupted).
    let guard = request.job_name().map(|what| {
        let alive: Option<Liveness> = s
            .try_clone()
            .ok()
            .map(|watch| Box::new(move || peer_is_there(&watch)) as Liveness);
        node.jobs.start(&what, uid, alive)
    });
    let detached;
    let job = match &guard {
        Some(g) => &*g.job,
        None => {
            detached = Job::detached("command");
            &detached
        }
    };
    // Progress goes to the job (for `status`) and, a few times a second, to the client.
    let mut progress = |done: u64, total: Option<u64>| {
        job.progress(done, total);
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            if let Ok(o) = out.as_mut() {
                let _ = send(o, &Reply::Progress { done, total });
            }
        }
    };
    let reply = match run(node, request, fds, job, uid, &mut progress) {
        Ok(result) => Reply::Ok {
            result: Box::new(result),
        },
        Err(e) => {
            tracing::info!("management command failed: {e}");
            Reply::Error {
                kind: ErrorKind::from(&e),
                message: e.to_string(),
            }
        }
    };
    let _ = send(&mut s, &reply);
}

/// Whether the client at the other end of `s` is still connected: its end is not closed.
fn peer_is_there(s: &UnixStream) -> bool {
    let mut fds = [PollFd::new(
        s.as_fd(),
        PollFlags::POLLHUP | PollFlags::POLLERR,
    )];
    // HUP comes when the peer closed its socket altogether (a Unix stream socket reports it
    // only then; a script that merely shut down its sending side is still there to hear the
    // answer), ERR when it failed: any event means the client is gone.
    !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Runs one command on the node.
fn run(
    node: &Node,
    request: Request,
    mut fds: Vec<OwnedFd>,
    job: &Job,
    uid: u32,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Response, NodeError> {
    if request.is_bulk() {
        // Each command has a thread of its own, so this lasts exactly as long as the command.
        crate::engine::sched::background_thread();
    }
    match request {
        Request::Status => Ok(Response::Status(node.status())),
        Request::PairStatus => node.pair_status().map(Response::Pair),
        Request::IpPoolCreate { pool } => node
            .create_ip_pool(*pool)
            .map(|p| Response::IpPool(Box::new(p))),
        Request::IpPoolList => node.ip_pools().map(Response::IpPools),
        Request::IpPoolDelete { name } => node
            .delete_ip_pool(&name)
            .map(|()| Response::Deleted { name }),
        Request::VolumePersonality { name, personality } => node
            .set_personality(&name, personality)
            .map(Response::Volume),
        Request::ImageImport {
            name,
            format,
            size,
            sha256,
        } => {
            if fds.len() != 1 {
                return Err(NodeError::Invalid(format!(
                    "image_import needs exactly one file descriptor with the request, got {}",
                    fds.len()
                )));
            }
            let sha256 = sha256
                .as_deref()
                .map(parse_sha256)
                .transpose()
                .map_err(NodeError::Invalid)?;
            let src = File::from(fds.remove(0));
            let expect = Expect { size, sha256 };
            node.import_image(&name, src, format.as_deref(), &expect, job, progress)
                .map(Response::Image)
        }
        Request::ImageList => node.images().map(Response::Images),
        Request::ImageShow { name } => node.image_info(&name).map(Response::Image),
        Request::ImageVerify { name } => node
            .verify_image(&name, job, progress)
            .map(Response::Verify),
        Request::VolumeVerify { name } => node
            .verify_pair_volume(&name, job, progress)
            .map(Response::Verify),
        Request::ImageDelete { name } => node
            .delete_image(&name)
            .map(|()| Response::Deleted { name }),
        Request::ImageCapture { name, from } => node
            .capture(&name, &from, job, progress)
            .map(Response::Image),
        Request::VolumeCreate {
            name,
            image,
            size,
            personality,
        } => node
            .create_volume(&name, image.as_deref(), size, personality)
            .map(Response::Volume),
        Request::Deploy {
            plan,
            skip_bad,
            dry_run,
        } => node
            .deploy(&plan, skip_bad, dry_run, job, progress)
            .map(Response::Deploy),
        Request::VolumeList => node.volumes().map(Response::Volumes),
        Request::VolumeShow { name } => node.volume_info(&name).map(Response::Volume),
        Request::VolumeResize { name, size } => {
            node.resize_volume(&name, size).map(Response::Volume)
        }
        Request::VolumeDelete { name, force } => node
            .delete_volume(&name, force)
            .map(|()| Response::Deleted { name }),
        Request::VolumeRedeploy {
            name,
            image,
            force,
            keep_previous,
        } => node
            .redeploy_volume(&name, &image, force, keep_previous)
            .map(Response::Volume),
        Request::VolumeMove { name, to } => node
            .move_volume(&name, &to)
            .and_then(|()| node.volume_info(&name))
            .map(Response::Volume),
        Request::VolumePromote { name, force } => node
            .promote_volume(&name, force)
            .and_then(|()| node.volume_info(&name))
            .map(Response::Volume),
        Request::VolumeResolve { name, keep } => node
            .resolve_volume(&name, &keep)
            .and_then(|()| node.volume_info(&name))
            .map(Response::Volume),
        Request::Check { repair, name } => node
            .check(repair, name.as_deref(), job)
            .map(Response::Check),
        Request::Cancel { id } => node
            .jobs
            .cancel(id, uid)
            .map(Response::Cancelled)
            .map_err(|r| match r {
                Refused::NoSuchJob => NodeError::NotFound(format!("no command {id} is running")),
                Refused::NotYours { owner } => NodeError::Denied(format!(
                    "command {id} belongs to uid {owner}: only it, root and the node's user \
                     may cancel it"
                )),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_the_problem() {
        let msg = |r: Refusal| r.0.1;
        assert!(msg(parse(b"{not json").unwrap_err()).contains("malformed request"));
        assert!(
            msg(parse(br#"{"version":7,"request":{"op":"status"}}"#).unwrap_err())
                .contains("version 7 is not supported")
        );
        assert!(
            msg(parse(br#"{"request":{"op":"status"}}"#).unwrap_err()).contains("no \"version\"")
        );
        assert!(
            msg(parse(br#"{"version":1,"request":{"op":"volume_create"}}"#).unwrap_err())
                .contains("missing field `name`")
        );
        assert_eq!(
            parse(br#"{"version":1,"request":{"op":"status"}}"#).unwrap(),
            Request::Status
        );
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    /// 32 stalled imports by admin-group users made `status` fail for root.
    #[test]
    fn root_keeps_slots_when_everyone_else_has_taken_theirs() {
        let mut s = Slots::default();
        for i in 0..MAX_PER_UID {
            s.take(1000).unwrap_or_else(|e| panic!("slot {i}: {e}"));
        }
        assert!(s.take(1000).unwrap_err().contains("per user"));
        for uid in 1001..1004 {
            for _ in 0..MAX_PER_UID {
                s.take(uid).unwrap();
            }
        }
        assert_eq!(s.total, MAX_CLIENTS);
        assert!(s.take(1005).unwrap_err().contains("root may still run"));
        for _ in 0..ROOT_RESERVE {
            s.take(0).unwrap();
        }
        assert!(s.take(0).is_err());
        s.give_back(1000);
        // Root's commands count against everyone else's room too.
        s.take(1005).unwrap_err();
        for _ in 0..ROOT_RESERVE {
            s.give_back(0);
        }
        s.take(1005).unwrap();
        assert_eq!(s.total, MAX_CLIENTS);
    }
}
