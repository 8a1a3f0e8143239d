//! A pair volume as the node that does **not** own it serves it (`docs/pair.md` §8).
//!
//! One node orders a volume's writes: its owner. A client may still connect to the other node
//! and get the whole device:
//! - **reads** (and block status) are this node's replica's, served while it is current: the
//!   owner acknowledges a change only after this replica applied it, or after recording it
//!   stale in etcd, so a replica not recorded stale, with the link to the owner up, holds every
//!   change a client was told is done. A stale one (or one cut off) refuses (`EIO`) rather than
//!   return older data;
//! - **writes, zeroings, trims and flushes** go to the owner as one [`FileIo::Peer`] flagged
//!   `forwarded`, on the worker's forwarding link. The owner carries each out as its own
//!   client's (its order, its activity log, both copies, its degraded mode) and answers when it
//!   is done, saying whether the change reached this node's replica. If it did not (the owner
//!   is degraded), this replica is marked stale **before** the client hears the write is done,
//!   so the client cannot read back older data than it wrote.
//!
//! The forwarded operation carries the fencing token this node knows for the volume; an owner
//! that holds another (the volume moved meanwhile) refuses it and the client gets `EIO`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::mirror::peer_io_of;
use super::{
    BlockTarget, FileIo, Geometry, PEER_DONE_NOT_ON_REPLICA, Plan, Progress, TargetError, TargetOp,
    VolumeTarget,
};

pub struct Forward {
    inner: Arc<VolumeTarget>,
    /// The volume's id in the pair.
    id: u32,
    /// The owner's fencing token, as this node's records say.
    token: u64,
    /// Forwarded operations so far (the frames' sequence numbers; the owner orders anew).
    sequence: AtomicU64,
    /// This replica missed changes the owner made: reads are refused until a resync ends.
    stale: Arc<AtomicBool>,
    /// Whether the link to the owner is up.
    link_up: Arc<AtomicBool>,
}

impl Forward {
    pub fn new(
        inner: Arc<VolumeTarget>,
        id: u32,
        token: u64,
        stale: Arc<AtomicBool>,
        link_up: Arc<AtomicBool>,
    ) -> Forward {
        Forward {
            inner,
            id,
            token,
            sequence: AtomicU64::new(0),
            stale,
            link_up,
        }
    }

    /// Reads are served only from a copy that is current: not recorded stale (nor found
    /// split from the owner's), and with the link to the owner up.
    fn readable(&self, what: &'static str) -> Result<(), TargetError> {
        if self.stale.load(Ordering::Acquire) {
            return Err(TargetError::Volume {
                what,
                errno: libc::EIO,
                message: "this replica is stale (the owner wrote without it): read from the \
                          owner"
                    .into(),
            });
        }
        if !self.link_up.load(Ordering::Acquire) {
            return Err(TargetError::Volume {
                what,
                errno: libc::EIO,
                message: "the link to the owner is down: this replica may be stale".into(),
            });
        }
        Ok(())
    }

    /// Whether `op` goes to the owner (everything but reads, and empty writes without FUA).
    fn forwarded(op: &TargetOp) -> bool {
        peer_io_of(op).is_some()
    }
}

impl BlockTarget for Forward {
    fn geometry(&self) -> Geometry {
        Geometry {
            // A forwarded zeroing does not carry FAST_ZERO: it is refused instead (below).
            can_fast_zero: false,
            ..self.inner.geometry()
        }
    }

    fn plan(&self, op: &TargetOp, plan: &mut Plan) -> Result<(), TargetError> {
        if matches!(op, TargetOp::Zero { fast: true, .. }) {
            // A client that negotiated fast zeroes on the owner, its volume since moved.
            return Err(TargetError::FastZeroUnsupported);
        }
        let Some(mut io) = peer_io_of(op) else {
            if matches!(op, TargetOp::Read { .. } | TargetOp::Cache { .. }) {
                self.readable("reading")?;
            }
            return self.inner.plan(op, plan);
        };
        io.volume = self.id;
        io.token = self.token;
        io.sequence = self.sequence.fetch_add(1, Ordering::AcqRel) + 1;
        io.forwarded = true;
        plan.push(FileIo::Peer(io));
        Ok(())
    }

    fn complete(
        &self,
        op: &TargetOp,
        plan: &mut Plan,
        results: &[i32],
    ) -> Result<Progress, TargetError> {
        if !Self::forwarded(op) {
            return self.inner.complete(op, plan, results);
        }
        assert_eq!(results.len(), 1, "a forwarded operation is one peer I/O");
        match results[0] {
            0 => {}
            PEER_DONE_NOT_ON_REPLICA => {
                // Before the client hears it is done: it must not read older data here.
                if !self.stale.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        volume = self.inner.name(),
                        "the owner did a forwarded change without this replica: stale until \
                         its resync"
                    );
                }
            }
            r if r == -libc::ESTALE || r == -libc::ENOENT => {
                // The owner refused before it did anything: the volume changed owner (perhaps
                // to this node, which then carries it out itself, `PairTarget`).
                return Err(TargetError::NotOwner(
                    "the owner refused it: the volume changed owner (reconnect)".into(),
                ));
            }
            r => {
                let errno = -r;
                return Err(TargetError::Volume {
                    what: "forwarding to the volume's owner",
                    errno: match errno {
                        libc::ENOSPC | libc::EINVAL => errno,
                        _ => libc::EIO,
                    },
                    message: match errno {
                        libc::ENOTCONN => "no link to the owner".into(),
                        libc::ETIMEDOUT => "the owner did not answer in time".into(),
                        e => std::io::Error::from_raw_os_error(e).to_string(),
                    },
                });
            }
        }
        Ok(Progress::Done)
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<(), TargetError> {
        // Which blocks are holes or zeroes is read too: a stale copy's answer would let a
        // client skip data the owner wrote.
        self.readable("reading the block status")?;
        self.inner.block_status(offset, len, max_extents, out)
    }

    fn sync(&self) -> Result<(), TargetError> {
        self.inner.sync()
    }

    fn attach(&self) {
        self.inner.attach()
    }

    fn detach(&self) {
        self.inner.detach()
    }

    fn revoked(&self) -> bool {
        self.inner.revoked()
    }

    // No read-ahead: the replica changes by writes the engine does not see (the peer link's).
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Pool;
    use crate::target::{Committers, PeerOp};

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn forward(
        tag: &str,
    ) -> (
        Forward,
        Arc<AtomicBool>,
        Arc<AtomicBool>,
        Dir,
        Arc<Committers>,
    ) {
        let d = std::env::temp_dir().join(format!("streamer-fwd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let pool = Pool::open_or_create(&d, true).unwrap();
        pool.create_volume("v", None, Some(1 << 20)).unwrap();
        let committers = Committers::start(1).unwrap();
        let t =
            Arc::new(VolumeTarget::new("v", pool.open_volume("v").unwrap(), &committers).unwrap());
        let stale = Arc::new(AtomicBool::new(false));
        let up = Arc::new(AtomicBool::new(true));
        let f = Forward::new(t, 9, 4, stale.clone(), up.clone());
        (f, stale, up, Dir(d), committers)
    }

    /// Reads and block status are the replica's, and only while it is current (not stale,
    /// link up), since a stale copy's holes would let a client skip data.
    #[test]
    fn a_stale_or_cut_off_replica_refuses_reads_and_block_status() {
        let (f, stale, up, _d, _c) = forward("reads");
        assert!(!f.geometry().read_only);
        let read = TargetOp::Read {
            offset: 0,
            len: 4096,
        };
        let mut out = Vec::new();
        let mut plan = Plan::default();
        plan.begin();
        f.plan(&read, &mut plan).unwrap();
        assert!(!matches!(plan.get(0), Some(FileIo::Peer(_))));
        f.block_status(0, 1 << 20, 16, &mut out).unwrap();
        assert!(!out.is_empty());
        for (s, u) in [(true, true), (false, false)] {
            stale.store(s, Ordering::Release);
            up.store(u, Ordering::Release);
            plan.begin();
            assert!(f.plan(&read, &mut plan).is_err());
            assert!(f.block_status(0, 1 << 20, 16, &mut out).is_err());
        }
    }

    /// Changes and flushes are one forwarded peer I/O each, with the volume's id, the token
    /// this node knows and a rising sequence. The owner's answer decides: done; done without
    /// this replica (it is stale before the client hears); refused (the client gets an error).
    #[test]
    fn changes_go_to_the_owner_and_its_answer_decides() {
        let (f, stale, _up, _d, _c) = forward("changes");
        let ops = [
            (
                TargetOp::Write {
                    offset: 4096,
                    len: 4096,
                    fua: true,
                },
                PeerOp::Write,
            ),
            (
                TargetOp::Zero {
                    offset: 0,
                    len: 8192,
                    fua: false,
                    may_trim: false,
                    fast: false,
                },
                PeerOp::Zero,
            ),
            (
                TargetOp::Trim {
                    offset: 0,
                    len: 8192,
                    fua: false,
                },
                PeerOp::Trim,
            ),
            (TargetOp::Flush, PeerOp::Flush),
        ];
        let mut plan = Plan::default();
        for (seq, (op, kind)) in ops.iter().enumerate() {
            plan.begin();
            f.plan(op, &mut plan).unwrap();
            assert_eq!(plan.len(), 1);
            let Some(FileIo::Peer(io)) = plan.get(0) else {
                panic!("not forwarded: {:?}", plan.get(0));
            };
            assert_eq!(
                (io.op, io.volume, io.token, io.sequence, io.forwarded),
                (*kind, 9, 4, seq as u64 + 1, true)
            );
            assert_eq!(f.complete(op, &mut plan, &[0]).unwrap(), Progress::Done);
        }
        assert!(!stale.load(Ordering::Acquire));
        let (w, _) = &ops[0];
        plan.begin();
        f.plan(w, &mut plan).unwrap();
        assert_eq!(
            f.complete(w, &mut plan, &[PEER_DONE_NOT_ON_REPLICA])
                .unwrap(),
            Progress::Done
        );
        assert!(
            stale.load(Ordering::Acquire),
            "marked stale before the answer"
        );
        plan.begin();
        f.plan(w, &mut plan).unwrap();
        let e = f.complete(w, &mut plan, &[-libc::ESTALE]).unwrap_err();
        assert!(e.to_string().contains("changed owner"), "{e}");
        plan.begin();
        f.plan(w, &mut plan).unwrap();
        let e = f.complete(w, &mut plan, &[-libc::ENOSPC]).unwrap_err();
        assert_eq!(e.errno(), crate::nbd::NbdErrno::NoSpc);
    }
}
