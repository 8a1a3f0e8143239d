//! The replica side of the data link: the owner's WRITE, ZERO, TRIM and FLUSH frames applied to
//! this node's copy of the volume (`docs/pair.md` §3, `docs/peer-protocol.md`).
//!
//! A frame is applied only after it was checked whole: the header by `wire`, the payload
//! against its checksum, the volume id against this node's replicas, the range against the
//! volume's size, and the fencing token against the highest this replica has recorded. A
//! higher token is recorded durably before the frame is applied (an owner that took over
//! fences the old one from then on, even across a restart); a lower one is refused (`ESTALE`).
//! The write then goes through the volume's own code ([`target::blocking`]): copy-up, map and
//! commit exactly as a local write, and FUA or FLUSH answer only once durable here.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use parking_lot::Mutex;

use super::wire::{FLAG_FUA, FLAG_NO_HOLE, HEADER_BYTES, Header, Kind};
use crate::target::{BlockTarget, TargetOp, VolumeTarget, blocking};

/// What the node lends the peer link: its replicas, and the answers to control requests.
pub trait Replicas: Send + Sync {
    /// This node's replica of the pair's volume `id`, if it has one.
    fn replica(&self, id: u32) -> Option<Arc<Replica>>;
    /// Answers a CONTROL request (a JSON document) from the peer: the answer, or why not.
    fn control(&self, request: &[u8]) -> Result<Vec<u8>, String>;
    /// A data link from the peer ended.
    fn data_link_ended(&self) {}
    /// Carries out a checked data frame a client of the peer's asked of a volume this node
    /// owns (`docs/pair.md` §8): as this node's own client's, each operation for the peer's
    /// replica done by `to_replica` (the operation, the payload; 0 or `-errno`). Whether the
    /// change reached the peer's replica, or the errno that refused it.
    fn forwarded(
        &self,
        h: &Header,
        payload: &mut [u8],
        to_replica: &mut crate::peer::replica::ToReplica<'_>,
    ) -> Result<bool, i32> {
        let _ = (h, payload, to_replica);
        Err(libc::ENOENT)
    }
    /// The peer sends a golden image (`request`: its name, size and digest as JSON) whose raw
    /// bytes `src` yields until its end: import it (digest checked) or say why not.
    fn receive_image(&self, request: &[u8], src: std::fs::File) -> Result<(), String> {
        let _ = (request, src);
        Err("this node takes no images".into())
    }
}

/// Carries out an owner's operation on the peer's replica (the operation, the request buffer):
/// 0, or `-errno` as the ring would give it.
pub type ToReplica<'a> = dyn FnMut(&crate::target::PeerIo, &[u8]) -> i32 + 'a;

/// What a link of requests does with each checked frame: the reply (status, flags).
type Act<'a> = dyn FnMut(&Header, &mut [u8]) -> Result<Header, DataLinkError> + 'a;

/// Records a replica's new highest token durably (the volume's `pair.json`).
pub type StoreToken = Box<dyn Fn(u64) -> Result<(), String> + Send + Sync>;

/// A volume's copy on this node, as the peer link writes it.
pub struct Replica {
    pub name: String,
    pub target: Arc<VolumeTarget>,
    /// The highest fencing token seen; held while a frame is admitted and while a higher one
    /// is recorded.
    token: Mutex<u64>,
    store: StoreToken,
}

impl Replica {
    pub fn new(name: String, target: Arc<VolumeTarget>, token: u64, store: StoreToken) -> Replica {
        Replica {
            name,
            target,
            token: Mutex::new(token),
            store,
        }
    }

    pub fn token(&self) -> u64 {
        *self.token.lock()
    }

    /// Admits a frame with `token`: refused (`ESTALE`) below the highest recorded; a higher
    /// one is recorded durably first.
    fn admit(&self, token: u64) -> Result<(), i32> {
        let mut t = self.token.lock();
        if token < *t {
            tracing::warn!(
                volume = %self.name,
                "refused a write with fencing token {token}: this replica has seen {}",
                *t
            );
            return Err(libc::ESTALE);
        }
        if token > *t {
            (self.store)(token).map_err(|why| {
                tracing::error!(volume = %self.name, "recording fencing token {token}: {why}");
                libc::EIO
            })?;
            *t = token;
        }
        Ok(())
    }

    /// Applies one checked data frame; `payload` holds a WRITE's data.
    pub fn apply(&self, h: &Header, payload: &mut [u8]) -> Result<(), i32> {
        debug_assert!(h.kind.is_data());
        self.admit(h.token)?;
        let size = self.target.geometry().size_bytes;
        if h.kind != Kind::Flush && h.offset + h.range > size {
            tracing::warn!(
                volume = %self.name,
                "refused {:?} of {} bytes at {}: past the end ({size})",
                h.kind,
                h.range,
                h.offset
            );
            return Err(libc::EINVAL);
        }
        let op = target_op(h)?;
        blocking::run(self.target.as_ref(), &op, payload).map_err(|e| {
            tracing::warn!(volume = %self.name, "applying {:?} from the peer: {e}", h.kind);
            e.errno().wire() as i32
        })
    }
}

/// The operation a checked data frame asks for (`EINVAL`: a write too large for one).
pub fn target_op(h: &Header) -> Result<TargetOp, i32> {
    let fua = h.flags & FLAG_FUA != 0;
    Ok(match h.kind {
        Kind::Write => TargetOp::Write {
            offset: h.offset,
            len: u32::try_from(h.range).map_err(|_| libc::EINVAL)?,
            fua,
        },
        Kind::Zero => TargetOp::Zero {
            offset: h.offset,
            len: h.range,
            fua,
            may_trim: h.flags & FLAG_NO_HOLE == 0,
            fast: false,
        },
        Kind::Trim => TargetOp::Trim {
            offset: h.offset,
            len: h.range,
            fua,
        },
        Kind::Flush => TargetOp::Flush,
        other => unreachable!("{other:?} is not a data operation"),
    })
}

/// Why a data link ended.
#[derive(Debug, thiserror::Error)]
pub enum DataLinkError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Wire(#[from] super::wire::WireError),
    #[error("{0}")]
    Refused(String),
}

/// First size of a data link's receive buffer; it grows to hold the largest frame that came.
const RECV_BYTES: usize = 1 << 20;

/// Serves a data link after its HELLO: applies each frame in order and answers it. Ends at the
/// first malformed frame (nothing of it applied) or when the socket does.
///
/// Frames come in batches (the owner gathers what its worker has into one `sendmsg`): each read
/// takes whatever has arrived, every whole frame in it is applied, and their replies leave in
/// one write before the next read, so a batch costs one wake-up and two system calls on the
/// socket, not four per frame.
pub fn serve_data(
    s: &mut TcpStream,
    replicas: &dyn Replicas,
    stop: &dyn Fn() -> bool,
) -> Result<(), DataLinkError> {
    serve_frames(s, stop, false, &mut |h, payload| {
        Ok(h.reply_to(apply_frame(h, payload, replicas)?))
    })
}

/// Serves a forwarding link after its HELLO (`docs/pair.md` §8): each data frame is carried out
/// by `replicas` as this node's own client's operation, its replica part on the peer by
/// `to_replica`; the reply says whether that part was done. Each reply leaves as soon as its
/// operation is done (one may wait on this node's degraded mode: the next must not wait for
/// it).
pub fn serve_forwarded(
    s: &mut TcpStream,
    replicas: &dyn Replicas,
    stop: &dyn Fn() -> bool,
    to_replica: &mut crate::peer::replica::ToReplica<'_>,
) -> Result<(), DataLinkError> {
    serve_frames(s, stop, true, &mut |h, payload| {
        Ok(match h.kind {
            Kind::Ping => h.reply_to(0),
            kind if kind.is_data() => match replicas.forwarded(h, payload, to_replica) {
                Ok(true) => h.reply_to(0),
                Ok(false) => {
                    let mut r = h.reply_to(0);
                    r.flags = super::wire::FLAG_NOT_ON_REPLICA;
                    r
                }
                Err(errno) => h.reply_to(u16::try_from(errno).unwrap_or(libc::EIO as u16)),
            },
            other => {
                return Err(DataLinkError::Refused(format!(
                    "{other:?} is not served on a forwarding link"
                )));
            }
        })
    })
}

/// The loop of a link of requests: reads what has arrived, carries out each whole frame (`act`
/// gives its reply) once its header and payload are checked, and answers, in one write per
/// read unless `reply_each`.
fn serve_frames(
    s: &mut TcpStream,
    stop: &dyn Fn() -> bool,
    reply_each: bool,
    act: &mut Act<'_>,
) -> Result<(), DataLinkError> {
    s.set_read_timeout(None)?;
    let mut buf = vec![0u8; RECV_BYTES];
    let mut have = 0;
    let mut replies = Vec::with_capacity(64 * HEADER_BYTES);
    loop {
        if stop() {
            return Ok(());
        }
        let n = match s.read(&mut buf[have..]) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        have += n;
        let mut at = 0;
        while let Some(h) = buf[at..have].get(..HEADER_BYTES) {
            // A superseded or fenced link applies nothing more, not even what it has read.
            if stop() {
                return Ok(());
            }
            let header = Header::decode(h)?.expect("a whole header");
            if header.reply {
                return Err(DataLinkError::Refused(format!(
                    "a {:?} reply on a data link, which carries requests",
                    header.kind
                )));
            }
            let end = at + HEADER_BYTES + header.payload_len as usize;
            if end > have {
                // The rest of this frame is still on its way: make room for all of it.
                if end - at > buf.len() {
                    buf.resize(end - at, 0);
                }
                break;
            }
            let payload = &mut buf[at + HEADER_BYTES..end];
            header.check_payload(payload)?;
            let reply = act(&header, payload)?;
            replies.extend_from_slice(&reply.encode());
            at = end;
            if reply_each {
                s.write_all(&replies)?;
                replies.clear();
            }
        }
        if !replies.is_empty() {
            s.write_all(&replies)?;
            replies.clear();
        }
        buf.copy_within(at..have, 0);
        have -= at;
    }
}

/// Applies one checked request frame: the reply's status.
fn apply_frame(
    header: &Header,
    payload: &mut [u8],
    replicas: &dyn Replicas,
) -> Result<u16, DataLinkError> {
    let status = match header.kind {
        Kind::Ping => 0,
        kind if kind.is_data() => match replicas.replica(header.handle) {
            None => {
                tracing::warn!(
                    "refused {kind:?} for volume id {}: no replica of it here",
                    header.handle
                );
                libc::ENOENT
            }
            Some(r) => match r.apply(header, payload) {
                Ok(()) => 0,
                Err(errno) => errno,
            },
        },
        other => {
            return Err(DataLinkError::Refused(format!(
                "{other:?} is not served on a data link"
            )));
        }
    };
    Ok(u16::try_from(status).unwrap_or(libc::EIO as u16))
}
