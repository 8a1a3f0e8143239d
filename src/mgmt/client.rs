//! The client side of the management socket, used by the `streamer` subcommands.

use std::io::{self, BufRead, BufReader, IoSlice, Read};
use std::mem::MaybeUninit;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};

use super::protocol::{
    Envelope, ErrorKind, MAX_REPLY_BYTES, PROTOCOL_VERSION, Reply, Request, Response,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the process listening on {path} runs as uid {uid}, which is neither root, you, nor the \
         owner of that socket and its directory: nothing was sent to it"
    )]
    Untrusted { path: PathBuf, uid: u32 },
    /// No socket could be named (no flag, no environment, no default).
    #[error("{0}")]
    NoSocket(String),
    #[error("cannot reach the streamer node at {}: {}", path.display(), connect_hint(source))]
    Connect { path: PathBuf, source: io::Error },
    #[error(
        "{} is an NBD socket (the data path), not the management socket: give the node's \
         management socket (`serve --mgmt-socket`, by default streamer.sock in its data directory)",
        path.display()
    )]
    NbdSocket { path: PathBuf },
    #[error("talking to the node: {0}")]
    Io(#[from] io::Error),
    #[error(
        "the node closed the connection before it answered (it stopped, or the command was \
         cancelled)"
    )]
    NoReply,
    #[error("the node sent a reply this client does not understand: {0}")]
    Protocol(String),
    /// The node refused or failed the command.
    #[error("{message}")]
    Node { kind: ErrorKind, message: String },
}

impl ClientError {
    /// The kind a script sees under `--json`: the node's own, or what kept the command from it.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Node { kind, .. } => kind.as_str(),
            ClientError::Untrusted { .. } | ClientError::NoSocket(_) => "unreachable",
            ClientError::Connect { .. } | ClientError::NbdSocket { .. } => "unreachable",
            ClientError::Io(_) | ClientError::NoReply | ClientError::Protocol(_) => "io",
        }
    }
}

/// What a failed connect means, in words.
fn connect_hint(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "no such socket (is `streamer serve` running with this data \
             directory? A node started with only --export has no management socket)"
            .into(),
        io::ErrorKind::ConnectionRefused => {
            "nothing listens there (a socket left by a node that is not running)".into()
        }
        io::ErrorKind::PermissionDenied => "permission denied (only root, the node's user and \
             members of its --admin-group may manage it)"
            .into(),
        _ => e.to_string(),
    }
}

/// Checks who listens on `path`: root, the caller's own user, or the user that owns both the
/// socket file and the directory holding it (a node run as its own user, `streamer` under
/// systemd, binds its socket in its pool). A process that merely found a writable place for a
/// socket (a shared directory, someone else's) fails the last test, and is sent nothing: an
/// import hands over an open file.
fn trust_peer(stream: &UnixStream, path: &Path) -> Result<(), ClientError> {
    use std::os::unix::fs::MetadataExt;
    let uid = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| ClientError::Io(e.into()))?
        .uid
        .as_raw();
    if uid == 0 || uid == rustix::process::geteuid().as_raw() {
        return Ok(());
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let owned = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.uid() == uid);
    if owned(path) && owned(dir) {
        return Ok(());
    }
    Err(ClientError::Untrusted {
        path: path.to_owned(),
        uid,
    })
}

/// Sends `request` (with `fd` attached, for an import) and returns the final response; progress
/// lines are handed to `progress` as they arrive.
pub fn call(
    socket: &Path,
    request: Request,
    fd: Option<BorrowedFd<'_>>,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    // Before a byte (or an open file) is sent: is this a node we may trust with it?
    trust_peer(&stream, socket)?;
    let mut line = serde_json::to_vec(&Envelope {
        version: PROTOCOL_VERSION,
        request,
    })
    .map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let mut sent = 0;
    // A node that refuses the caller (SO_PEERCRED) answers and hangs up without reading: the
    // send then fails with EPIPE, but the refusal is waiting to be read, and it is the answer.
    let mut send_failed = None;
    while sent < line.len() {
        // The descriptor rides on the first sendmsg only.
        let n = if sent == 0 {
            sendmsg(
                &stream,
                &[IoSlice::new(&line)],
                &mut control,
                SendFlags::empty(),
            )
        } else {
            sendmsg(
                &stream,
                &[IoSlice::new(&line[sent..])],
                &mut SendAncillaryBuffer::default(),
                SendFlags::empty(),
            )
        };
        match n {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e @ (rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET)) => {
                send_failed = Some(io::Error::from(e));
                break;
            }
            Err(e) => return Err(ClientError::Io(e.into())),
        }
    }
    let mut reader = BufReader::new(stream);
    loop {
        let mut buf = Vec::new();
        let read = (&mut reader)
            .take(MAX_REPLY_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf);
        match (read, send_failed.take()) {
            (Ok(n), _) if n > 0 => {}
            (_, Some(e)) => return Err(ClientError::Io(e)),
            (Ok(_), None) => return Err(ClientError::NoReply),
            (Err(e), None) => return Err(ClientError::Io(e)),
        }
        if buf.len() > MAX_REPLY_BYTES {
            return Err(ClientError::Protocol(format!(
                "a reply longer than {MAX_REPLY_BYTES} bytes"
            )));
        }
        if buf.starts_with(b"NBDMAGIC") {
            return Err(ClientError::NbdSocket {
                path: socket.to_owned(),
            });
        }
        if !buf.ends_with(b"\n") {
            // Cut off mid-line: the node went away while answering.
            return Err(ClientError::NoReply);
        }
        let reply: Reply =
            serde_json::from_slice(&buf).map_err(|e| ClientError::Protocol(e.to_string()))?;
        match reply {
            Reply::Progress { done, total } => progress(done, total),
            Reply::Ok { result } => return Ok(*result),
            Reply::Error { kind, message } => return Err(ClientError::Node { kind, message }),
        }
    }
}
