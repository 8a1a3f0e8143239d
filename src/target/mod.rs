//! Block targets: what an export is backed by. The NBD engine talks only to [`BlockTarget`]: it asks
//! the target to plan an operation as file I/O, performs that I/O on its ring, and hands the results
//! back until the target says the operation is done. A raw file is one target; thin-clone volumes and
//! mirrored volumes plug in behind the same trait, so the protocol code never knows which it serves.

pub mod activity;
pub mod blocking;
mod file;
mod forward;
mod mirror;
mod pair;
mod volume;

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use file::{CacheMode, FileTarget};
pub use forward::Forward;
pub use mirror::{Degrader, Mirror, PeerState};
pub use pair::PairTarget;
pub use volume::{Committers, VolumeCounters, VolumeTarget};

use crate::nbd::{ExportInfo, ExportLookup, NbdErrno};

/// What a target can do; the engine turns it into NBD transmission flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub size_bytes: u64,
    pub read_only: bool,
    pub can_trim: bool,
    pub can_zero: bool,
    pub can_fast_zero: bool,
    pub can_cache: bool,
    /// Flush on any connection covers writes completed on every connection.
    pub can_multi_conn: bool,
    pub block_min: u32,
    pub block_preferred: u32,
}

/// An operation the engine asks a target to carry out. Offsets and lengths are already checked
/// against the export size by the protocol layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetOp {
    /// Fill the request buffer's first `len` bytes.
    Read {
        offset: u64,
        len: u32,
    },
    /// Write the request buffer's first `len` bytes; `fua`: durable before completion.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    /// `may_trim`: the range may become a hole; `fast`: fail rather than be slow.
    Zero {
        offset: u64,
        len: u64,
        fua: bool,
        may_trim: bool,
        fast: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
}

/// One I/O the engine performs for a target. Buffer positions are relative to the request buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileIo {
    Read {
        fd: RawFd,
        offset: u64,
        buf_start: u32,
        len: u32,
    },
    Write {
        fd: RawFd,
        offset: u64,
        buf_start: u32,
        len: u32,
        dsync: bool,
    },
    Fallocate {
        fd: RawFd,
        offset: u64,
        len: u64,
        mode: i32,
    },
    Fdatasync {
        fd: RawFd,
    },
    Fadvise {
        fd: RawFd,
        offset: u64,
        len: u32,
        advice: i32,
    },
    /// Waits until `fd` (an eventfd or pipe another thread signals) is readable; completes with
    /// the poll mask. How a request parks until work done elsewhere (a group commit) finishes.
    Wait {
        fd: RawFd,
    },
    /// Writes `len` zero bytes (at most [`ZERO_WRITE_BYTES`]) from a zeroed buffer the engine
    /// owns: how WRITE_ZEROES zeroes a range where the file (or device) cannot fallocate.
    WriteZeroes {
        fd: RawFd,
        offset: u64,
        len: u32,
    },
    /// Fills part of the request buffer with zeroes; done by the engine itself, no kernel I/O.
    Zero {
        buf_start: u32,
        len: u32,
    },
    /// An operation sent to the pair's other node on the worker's peer link (`engine/peer.rs`,
    /// `docs/peer-protocol.md`). Completes with 0 once the peer answered that it is done, or
    /// `-errno`: the peer's refusal, `ENOTCONN` when the worker has no link, `ETIMEDOUT` when
    /// the peer did not answer within the peer timeout. A forwarded operation may also
    /// complete with [`PEER_DONE_NOT_ON_REPLICA`]. A target that sends one may be mirrored or
    /// forward to the volume's owner; the engine never knows more than that the other node
    /// takes part.
    Peer(PeerIo),
}

/// The result of a forwarded [`FileIo::Peer`] the owner carried out on its copy but not on
/// this node's replica (it is degraded): this node's copy is stale from then on.
pub const PEER_DONE_NOT_ON_REPLICA: i32 = 1;

/// What a [`FileIo::Peer`] asks of the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIo {
    pub op: PeerOp,
    /// The volume's id in the pair (the same on both nodes).
    pub volume: u32,
    /// The owner's fencing token (`docs/pair.md` §2).
    pub token: u64,
    /// The owner's order of the volume's data operations.
    pub sequence: u64,
    pub offset: u64,
    /// Bytes the operation covers; for a write, the payload: `buf_start..buf_start + len` of
    /// the request buffer.
    pub len: u64,
    pub buf_start: u32,
    pub fua: bool,
    /// For a zeroing: the range must stay allocated.
    pub no_hole: bool,
    /// Asked by a client of this node of a volume the peer owns (`docs/pair.md` §8): it goes
    /// on the worker's forwarding link, and the owner carries it out as its own.
    pub forwarded: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerOp {
    Write,
    Zero,
    Trim,
    Flush,
}

/// Largest [`FileIo::WriteZeroes`]; the engine's zero buffer has this size (aligned for
/// `O_DIRECT`).
pub const ZERO_WRITE_BYTES: u32 = 1 << 20;

/// Most I/Os one phase of an operation may issue.
pub const MAX_PLAN_IOS: usize = 8;

/// Alignment of the memory of every request buffer the engine hands a target (its buffer pool
/// allocates at this alignment): what `O_DIRECT` needs on devices with sectors of up to 4 KiB.
pub const BUFFER_ALIGN: usize = 4096;

/// One phase of an operation: I/Os issued together. Each I/O may be linked to the next one
/// ([`Plan::then`]): the next starts only after it succeeded, and fails with `ECANCELED` if it
/// failed. Unlinked I/Os run concurrently, in no particular order.
///
/// `step` and `cursor` belong to the target: the engine resets them when a new operation starts
/// ([`Plan::begin`]) and never touches them otherwise, so a target with several phases keeps its
/// place there between `plan` and each `complete`.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    ios: [Option<FileIo>; MAX_PLAN_IOS],
    /// Bit `i`: I/O `i` is linked to I/O `i + 1`.
    links: u8,
    len: usize,
    /// Which phase this is, in the target's own numbering.
    pub step: u32,
    /// Where the next phase resumes (e.g. a read's next offset).
    pub cursor: u64,
    /// The state of a target that wraps another (the mirror around a volume), which leaves
    /// `step` and `cursor` to the target it wraps. Reset by [`Plan::begin`] too.
    pub outer: Outer,
    /// The role of a pair volume that planned the operation, which completes it
    /// ([`PairTarget`]: the role may change while it runs). Reset by [`Plan::begin`].
    pub role: Option<Role>,
}

/// A pair volume's role on this node, as [`Plan::role`] holds it.
#[derive(Clone)]
pub struct Role {
    /// How many times the volume's role had changed when this one took over.
    pub generation: u64,
    pub target: Arc<dyn BlockTarget>,
}

impl std::fmt::Debug for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Role")
    }
}

/// A wrapping target's own place in an operation (see [`Plan::outer`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    pub step: u32,
    /// The result of the wrapper's own I/O, once it completed.
    pub result: Option<i32>,
    /// An id the wrapper gave the operation (e.g. its entry among writes in flight).
    pub ticket: u64,
    /// A counter value the wrapper noted when the operation started (the mirror: how many
    /// mirrored changes had completed when a flush was issued).
    pub mark: u64,
    /// The wrapper's own I/O was issued (the mirror: the operation went to the peer too).
    pub sent: bool,
    /// The mirror: the change was admitted by the activity log (it tells the log when done).
    pub logged: bool,
    /// The mirror: the activity log's count when a flush was issued.
    pub log_mark: u64,
}

// `links` has a bit for every I/O a plan may hold.
const _: () = assert!(MAX_PLAN_IOS <= 8);

impl Plan {
    /// Empties the plan and resets the target's step and cursor: a new operation starts.
    pub fn begin(&mut self) {
        self.clear();
        self.step = 0;
        self.cursor = 0;
        self.outer = Outer::default();
        self.role = None;
    }
    /// Empties the plan for the next phase of the same operation (step and cursor stay).
    pub fn clear(&mut self) {
        self.len = 0;
        self.links = 0;
    }
    pub fn is_full(&self) -> bool {
        self.len == MAX_PLAN_IOS
    }
    /// Adds an I/O that runs concurrently with the others.
    #[inline]
    pub fn push(&mut self, io: FileIo) {
        assert!(
            self.len < MAX_PLAN_IOS,
            "a plan holds at most {MAX_PLAN_IOS} I/Os"
        );
        self.ios[self.len] = Some(io);
        self.len += 1;
    }
    /// Adds an I/O that starts only once the one pushed before it succeeded (the first of a
    /// plan simply starts). Only I/Os that complete whole may be linked: the kernel takes a
    /// short read or write for a failure and cancels the rest of the chain, while the engine
    /// would resume the transfer; and zero fills never reach the kernel.
    pub fn then(&mut self, io: FileIo) {
        let whole = |io: &FileIo| {
            matches!(
                io,
                FileIo::Fallocate { .. } | FileIo::Fdatasync { .. } | FileIo::Fadvise { .. }
            )
        };
        if self.len > 0 {
            let prev = self.ios[self.len - 1].as_ref().expect("pushed");
            assert!(
                whole(prev) && whole(&io),
                "only fallocate, fdatasync and fadvise may be linked: {prev:?} then {io:?}"
            );
            self.links |= 1 << (self.len - 1);
        }
        self.push(io);
    }
    /// Whether I/O `i` is linked to the one after it.
    pub fn linked(&self, i: usize) -> bool {
        i + 1 < self.len && self.links & (1 << i) != 0
    }
    pub fn ios(&self) -> impl Iterator<Item = &FileIo> {
        self.ios[..self.len].iter().flatten()
    }
    pub fn get(&self, i: usize) -> Option<&FileIo> {
        self.ios[..self.len].get(i).and_then(Option::as_ref)
    }
    pub fn get_mut(&mut self, i: usize) -> Option<&mut FileIo> {
        self.ios[..self.len].get_mut(i).and_then(Option::as_mut)
    }
    /// Takes the last I/O off the plan (a wrapper's own, before the wrapped target sees it).
    pub fn pop(&mut self) -> Option<FileIo> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        self.links &= !(1 << self.len);
        if self.len > 0 {
            self.links &= !(1 << (self.len - 1));
        }
        self.ios[self.len].take()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a target says after a phase completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Done,
    /// The plan was refilled with another phase.
    Again,
}

/// A failed target operation. Each variant names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("reading at offset {offset}: {source}")]
    Reading { offset: u64, source: io::Error },
    #[error("writing at offset {offset}: {source}")]
    Writing { offset: u64, source: io::Error },
    #[error("flushing to stable storage: {source}")]
    Syncing { source: io::Error },
    #[error("discarding at offset {offset}: {source}")]
    Discarding { offset: u64, source: io::Error },
    #[error("zeroing at offset {offset}: {source}")]
    Zeroing { offset: u64, source: io::Error },
    #[error("querying allocation at offset {offset}: {source}")]
    QueryingAllocation { offset: u64, source: io::Error },
    #[error("zeroing this range would not be faster than writing it")]
    FastZeroUnsupported,
    #[error("an earlier write or flush failed; the export refuses I/O until it is reopened")]
    Latched,
    #[error("the export was withdrawn (its volume is being deleted or taken offline)")]
    Withdrawn,
    /// This node no longer orders the pair volume's writes (it moved to the other node); a
    /// [`PairTarget`] plans the operation again on the volume's new role.
    #[error("{0}")]
    NotOwner(String),
    /// A volume operation failed; `errno` is what a block device would report.
    #[error("{what}: {message}")]
    Volume {
        what: &'static str,
        errno: i32,
        message: String,
    },
}

impl TargetError {
    /// The one place a target error becomes an NBD errno. No `_` arm: a new variant must choose.
    pub fn errno(&self) -> NbdErrno {
        match self {
            TargetError::Reading { source, .. }
            | TargetError::Writing { source, .. }
            | TargetError::Syncing { source }
            | TargetError::Discarding { source, .. }
            | TargetError::Zeroing { source, .. }
            | TargetError::QueryingAllocation { source, .. } => errno_of(source),
            TargetError::FastZeroUnsupported => NbdErrno::NotSup,
            TargetError::Latched | TargetError::Withdrawn | TargetError::NotOwner(_) => {
                NbdErrno::Io
            }
            TargetError::Volume { errno, .. } => errno_of(&io::Error::from_raw_os_error(*errno)),
        }
    }
}

fn errno_of(e: &io::Error) -> NbdErrno {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => NbdErrno::NoSpc,
        Some(libc::EPERM | libc::EROFS | libc::EACCES) => NbdErrno::Perm,
        Some(libc::ENOMEM) => NbdErrno::NoMem,
        Some(libc::EINVAL) => NbdErrno::Inval,
        // Not ENOTSUP: the spec keeps that for WRITE_ZEROES with FAST_ZERO
        // (`FastZeroUnsupported`); a file system that cannot do what was asked is an I/O error.
        _ => NbdErrno::Io,
    }
}

/// Appends a `(length, flags)` extent to a block-status answer, merged into the last one when
/// the flags match (adjacent extents must differ). False when `out` already holds `max` extents
/// and this one could not be merged: the answer is complete.
pub(crate) fn push_extent(out: &mut Vec<(u64, u32)>, max: usize, len: u64, flags: u32) -> bool {
    let full = out.len() >= max;
    match out.last_mut() {
        Some((l, f)) if *f == flags => *l += len,
        _ if full => return false,
        _ => out.push((len, flags)),
    }
    true
}

/// A block device as the engine sees it. Implementations are shared by every worker thread.
pub trait BlockTarget: Send + Sync {
    fn geometry(&self) -> Geometry;
    /// Plans the first phase of `op` into `plan` (which arrives cleared). An empty plan completes
    /// at once.
    fn plan(&self, op: &TargetOp, plan: &mut Plan) -> Result<(), TargetError>;
    /// Every I/O of the phase finished: `results[i]` is I/O `i`'s bytes transferred or `-errno`
    /// (short transfers were already finished by the engine). Returns `Done`, or `Again` with the
    /// next phase planned.
    fn complete(
        &self,
        op: &TargetOp,
        plan: &mut Plan,
        results: &[i32],
    ) -> Result<Progress, TargetError>;
    /// Allocation of `[offset, offset+len)` as `(length, base:allocation flags)` extents, at most
    /// `max_extents` of them, covering at least the first byte.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<(), TargetError>;
    /// Makes everything written durable (blocking; used at shutdown).
    fn sync(&self) -> Result<(), TargetError>;
    /// A connection started using the target (entered transmission); `detach` when it closed.
    fn attach(&self) {}
    fn detach(&self) {}
    /// The export was withdrawn: connections using it are closed (checked about once a second).
    fn revoked(&self) -> bool {
        false
    }
    /// Counts completed data changes (writes, trims, zeroings) from every connection, if the
    /// engine should read ahead of sequential readers on this target. A read-ahead buffer is only
    /// served while the count has not moved since its read was issued, so no read ever returns
    /// data older than a write that completed before it. `None`: no read-ahead (the page cache
    /// already reads ahead, or data can change by paths the engine does not see).
    fn change_count(&self) -> Option<&AtomicU64> {
        None
    }
    /// Whether a large write's payload may go from the connection's socket straight into the file
    /// (splice: socket to pipe to page cache), never passing through a buffer. True only when
    /// every write with a payload plans exactly one [`FileIo::Write`] of the whole payload, from
    /// buffer position 0, on a descriptor without `O_DIRECT`, and planning has no side effects:
    /// the engine plans such a write before its payload has arrived. Targets that must see the
    /// data (copy-on-write volumes, a mirror sending it to its peer) keep the default.
    fn splice_writes(&self) -> bool {
        false
    }
}

/// A named export and the target behind it.
pub struct Export {
    pub name: String,
    pub description: String,
    pub target: Arc<dyn BlockTarget>,
    pub max_payload_bytes: u32,
}

impl Export {
    pub fn info(&self) -> ExportInfo {
        let g = self.target.geometry();
        ExportInfo {
            name: self.name.clone(),
            size_bytes: g.size_bytes,
            description: self.description.clone(),
            read_only: g.read_only,
            can_trim: g.can_trim,
            can_zero: g.can_zero,
            can_fast_zero: g.can_fast_zero,
            can_cache: g.can_cache,
            can_multi_conn: g.can_multi_conn,
            block_min: g.block_min,
            block_preferred: g.block_preferred,
            block_max: self.max_payload_bytes,
        }
    }
}

/// The exports a server offers; volumes come and go while it runs. The default export "" is the
/// only export when there is one. Looked up only at negotiation, never on the I/O path.
#[derive(Default)]
pub struct Exports {
    list: parking_lot::RwLock<Vec<Export>>,
    /// Connections in transmission, by their serial: who uses which export (`status`).
    clients: parking_lot::Mutex<std::collections::BTreeMap<u64, Arc<Client>>>,
}

/// A client connection using an export, as `status` and `volume show` list it. The engine
/// counts its bytes as its requests complete (one connection, one thread: no contention).
pub struct Client {
    pub peer: String,
    pub export: String,
    pub since: std::time::SystemTime,
    pub read_bytes: std::sync::atomic::AtomicU64,
    pub written_bytes: std::sync::atomic::AtomicU64,
}

impl Exports {
    /// A connection started using `export`; it is listed until `client_closed`.
    pub fn client_opened(&self, serial: u64, peer: &str, export: &str) -> Arc<Client> {
        let c = Arc::new(Client {
            peer: peer.to_owned(),
            export: export.to_owned(),
            since: std::time::SystemTime::now(),
            read_bytes: Default::default(),
            written_bytes: Default::default(),
        });
        self.clients.lock().insert(serial, c.clone());
        c
    }

    pub fn client_closed(&self, serial: u64) {
        self.clients.lock().remove(&serial);
    }

    /// The connections in transmission now.
    pub fn clients(&self) -> Vec<Arc<Client>> {
        self.clients.lock().values().cloned().collect()
    }

    /// Adds an export; refused (and handed back) when the name is taken.
    pub fn add(&self, export: Export) -> Result<(), Export> {
        let mut list = self.list.write();
        if list.iter().any(|e| e.name == export.name) {
            return Err(export);
        }
        list.push(export);
        Ok(())
    }

    /// Adds an export, or puts it in place of the one of that name, in one step: a client
    /// negotiating meanwhile finds the old or the new, never none. Connections already using
    /// the old one are untouched.
    pub fn replace(&self, export: Export) {
        let mut list = self.list.write();
        match list.iter_mut().find(|e| e.name == export.name) {
            Some(e) => *e = export,
            None => list.push(export),
        }
    }

    /// Withdraws an export from new negotiations; connections already using it are untouched.
    pub fn remove(&self, name: &str) -> Option<Export> {
        let mut list = self.list.write();
        let i = list.iter().position(|e| e.name == name)?;
        Some(list.remove(i))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.list.read().iter().any(|e| e.name == name)
    }

    pub fn len(&self) -> usize {
        self.list.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(name, target)` of every export, at this moment.
    pub fn snapshot(&self) -> Vec<(String, Arc<dyn BlockTarget>)> {
        self.list
            .read()
            .iter()
            .map(|e| (e.name.clone(), e.target.clone()))
            .collect()
    }
}

impl ExportLookup for Exports {
    type Export = Arc<dyn BlockTarget>;
    fn lookup(&self, name: &str) -> Option<(Self::Export, ExportInfo)> {
        let list = self.list.read();
        let export = if name.is_empty() && list.len() == 1 {
            list.first()
        } else {
            list.iter().find(|e| e.name == name)
        }?;
        Some((export.target.clone(), export.info()))
    }
    fn for_each(&self, f: &mut dyn FnMut(&str, &str)) {
        for e in self.list.read().iter() {
            f(&e.name, &e.description);
        }
    }
    fn count(&self) -> usize {
        self.list.read().len()
    }
}
