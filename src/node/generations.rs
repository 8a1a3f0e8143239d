//! The generations of this node's pair volumes against the peer's (`docs/pair.md` §6,
//! `peer/generations.rs`): compared when the link comes up and before every resync, by both
//! nodes; a split brain, unrelated data, or an owner behind its replica is alerted on the node
//! that finds it, and no resync copies over it.
//!
//! The copies' generations move at four points: the owner's bitmap start (a new current
//! generation, committed with the bitmap), the end of a resync (the peer adopts the owner's
//! current generation, then the owner ends its bitmap), a discard by `volume resolve` (the
//! losing copy drops its bitmap and its generation), and creation (both copies start at the
//! etcd record's generation).

use super::{Force, Node, NodeError};
use crate::peer::control::ControlRequest as Control;
use crate::peer::generations::{Generation, Generations, NONE, Verdict, compare, short};
use crate::target::{BlockTarget, VolumeTarget};

/// A problem the comparison found with a volume's copies, for `status` and `pair status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerationProblem {
    /// `split_brain`, `unrelated`, `behind` (this owner's copy is behind the replica's) or
    /// `ahead` (this replica holds writes the owner lacks).
    pub state: &'static str,
    pub message: String,
}

impl Node {
    /// The generations of this node's copy of `name`: from its served target, or from its
    /// superblock on disk when it is not served (a split brain kept apart): read only, so
    /// it takes no lock and cannot race a command that serves it.
    pub(super) fn local_generations(&self, name: &str) -> Result<Generations, NodeError> {
        if let Some(t) = self.served_volume(name) {
            return Ok(t.generations());
        }
        Ok(Generations::of_superblock(
            &self.pool.volume_superblock(name)?,
        ))
    }

    fn peer_generations(&self, name: &str) -> Result<Generations, NodeError> {
        let req = Control::Generations { name: name.into() }.encode();
        let answer = self.peer_control_pub(&req)?;
        Generations::decode(&answer).map_err(NodeError::Io)
    }

    /// Compares this node's copy of `name` with the peer's, and records (or clears) the
    /// problem the verdict is for this node: `status` alerts it, and a replica with one
    /// refuses reads.
    pub(super) fn check_generations(&self, name: &str) -> Result<Verdict, NodeError> {
        let compared = self
            .local_generations(name)
            .and_then(|mine| Ok((mine, self.peer_generations(name)?)));
        // A comparison that cannot be made holds the resync back: said once per new reason.
        let (mine, theirs) = match compared {
            Ok(both) => {
                self.pair_volumes.compare_errors.lock().remove(name);
                both
            }
            Err(e) => {
                let why = e.to_string();
                let old = self
                    .pair_volumes
                    .compare_errors
                    .lock()
                    .insert(name.to_owned(), why.clone());
                if old.as_ref() != Some(&why) {
                    tracing::warn!(volume = name, "the copies' generations not compared: {why}");
                }
                return Err(e);
            }
        };
        let verdict = self.adopt_legacy(name, &mine, &theirs, compare(&mine, &theirs));
        let peer = self
            .this_node()
            .and_then(|(c, _)| c.peer().ok().flatten())
            .map_or_else(|| "?".to_owned(), |p| p.name);
        let owner = self.pair_volumes.mirrors.lock().contains_key(name);
        let problem = match verdict {
            Verdict::SplitBrain { since } => Some(GenerationProblem {
                state: "split_brain",
                message: format!(
                    "split brain: this node's copy ({mine}) and node {peer}'s ({theirs}) both \
                     changed since generation {}; nothing is merged: `streamer volume resolve \
                     {name} --keep NODE` keeps one side",
                    short(&since)
                ),
            }),
            Verdict::Unrelated => Some(GenerationProblem {
                state: "unrelated",
                message: format!(
                    "unrelated data: this node's copy ({mine}) and node {peer}'s ({theirs}) have \
                     no generation in common; neither is copied over the other: `streamer \
                     volume resolve {name} --keep NODE` keeps one"
                ),
            }),
            Verdict::ThisBehind { .. } if owner => Some(GenerationProblem {
                state: "behind",
                message: format!(
                    "this node owns it, but its copy ({mine}) is behind node {peer}'s \
                     ({theirs}): nothing is resynced over the newer copy"
                ),
            }),
            Verdict::OtherBehind { .. } if !owner && !self.is_discarded(name) => {
                Some(GenerationProblem {
                    state: "ahead",
                    message: format!(
                        "this copy ({mine}) holds writes the owner's ({theirs}, node {peer}) \
                         lacks: it is kept apart, nothing is merged"
                    ),
                })
            }
            _ => None,
        };
        let changed = {
            let mut problems = self.pair_volumes.generation_problems.lock();
            match &problem {
                Some(p) => problems.insert(name.to_owned(), p.clone()).as_ref() != Some(p),
                None => problems.remove(name).is_some(),
            }
        };
        if changed {
            match &problem {
                Some(p) => tracing::error!(volume = name, "{}", p.message),
                None => tracing::info!(volume = name, "the copies' generations agree again"),
            }
            self.refresh_stale();
        }
        Ok(verdict)
    }

    /// A pair volume made before generations were kept (its etcd record names none) has copies
    /// with unrelated random generations. If nothing says they differ (no stale record, no
    /// bitmap, no history on either side), the owner has the peer adopt its generation once:
    /// the copies were mirrored all along.
    fn adopt_legacy(
        &self,
        name: &str,
        mine: &Generations,
        theirs: &Generations,
        verdict: Verdict,
    ) -> Verdict {
        let clean = |g: &Generations| g.bitmap.is_none() && g.history == [NONE; 2];
        if verdict != Verdict::Unrelated || !clean(mine) || !clean(theirs) {
            return verdict;
        }
        let Some(m) = self.pair_volumes.mirrors.lock().get(name).cloned() else {
            return verdict;
        };
        let Some((cluster, _)) = self.this_node() else {
            return verdict;
        };
        let legacy = cluster
            .volume_record(name)
            .ok()
            .flatten()
            .is_some_and(|r| r.generation.is_empty());
        let peer_stale = cluster.peer().ok().flatten().is_none_or(|p| {
            cluster
                .replica_record(name, &p.name)
                .ok()
                .flatten()
                .is_some()
        });
        if !legacy || peer_stale || !matches!(m.peer_state(), crate::target::PeerState::InSync) {
            return verdict;
        }
        let req = Control::AdoptGeneration {
            name: name.into(),
            id: m.id(),
            generation: volume_format::image::hex(&mine.current),
        }
        .encode();
        match self.peer_control_pub(&req) {
            Ok(_) => {
                tracing::info!(
                    volume = name,
                    "a volume from before generations: the peer's copy took this one's"
                );
                Verdict::InSync
            }
            Err(e) => {
                tracing::warn!(
                    volume = name,
                    "the peer adopting this copy's generation: {e}"
                );
                verdict
            }
        }
    }

    /// Compares every pair volume here with the peer's copy (the link just came up), and again
    /// those with a problem (every few seconds, so a resolved one clears).
    pub(super) fn check_all_generations(&self, only_problems: bool) {
        let names: Vec<String> = if only_problems {
            let p = self.pair_volumes.generation_problems.lock();
            p.keys().cloned().collect()
        } else {
            let mut all: Vec<String> = self.pair_volumes.mirrors.lock().keys().cloned().collect();
            all.extend(self.pair_volumes.stale.lock().keys().cloned());
            all.extend(self.pair_volumes.unserved.lock().keys().cloned());
            all
        };
        for name in names {
            if let Err(e) = self.check_generations(&name) {
                tracing::debug!(volume = %name, "comparing generations: {e}");
            }
        }
    }

    /// Whether etcd records this node's copy of `name` discarded by a `volume resolve`.
    pub(super) fn is_discarded(&self, name: &str) -> bool {
        self.this_node().is_some_and(|(c, me)| {
            c.replica_record(name, &me)
                .ok()
                .flatten()
                .is_some_and(|r| r.discard)
        })
    }

    /// Drops this copy's changes as `volume resolve` decided (etcd records it discarded): its
    /// peer dirty bitmap and its generation go (committed), so it is behind whatever the owner
    /// holds and is resynced whole. Its blocks stay as they are until the resync.
    pub(super) fn discard_changes(&self, name: &str, t: &VolumeTarget) -> Result<(), NodeError> {
        t.drop_peer_bitmap()
            .map_err(|e| NodeError::Io(format!("dropping the discarded changes: {e}")))?;
        if t.generations().current != NONE {
            t.set_generation(NONE, false)
                .map_err(|e| NodeError::Io(format!("dropping the discarded generation: {e}")))?;
            tracing::warn!(
                volume = name,
                "this copy's changes are discarded (volume resolve): the owner resyncs it whole"
            );
        }
        // A crash of this copy not yet told to the owner is covered too: the whole resync
        // compares every block. Told late (after that resync), it would degrade the volume
        // once more for nothing.
        self.pair_volumes.replica_crashed.lock().remove(name);
        Ok(())
    }

    /// CONTROL `adopt_generation`: the owner's resync made this replica equal to its copy.
    pub(super) fn adopt_generation(
        &self,
        name: &str,
        id: u32,
        generation: &str,
    ) -> Result<(), NodeError> {
        let g = crate::peer::generations::parse(generation).map_err(NodeError::Invalid)?;
        match self.pair_record(name)? {
            Some(local) if local.id == id => {}
            _ => {
                return Err(NodeError::NotFound(format!(
                    "this node has no replica of pair volume {name:?} (id {id})"
                )));
            }
        }
        if self.pair_volumes.mirrors.lock().contains_key(name) {
            return Err(NodeError::Invalid(format!(
                "this node owns {name:?}: its generation is its own"
            )));
        }
        let t = self.served_volume(name).ok_or_else(|| {
            NodeError::NotFound(format!("this node's replica of {name:?} is not served"))
        })?;
        // A bitmap left from when this node owned the volume is void: its copy is the owner's.
        self.drop_replica_bitmap(name);
        t.set_generation(g, true)
            .map_err(|e| NodeError::Io(format!("adopting the owner's generation: {e}")))?;
        self.pair_volumes.generation_problems.lock().remove(name);
        Ok(())
    }

    /// Takes pair volume `name` out of service and serves it again as etcd says it is now
    /// (owner, replica, discarded replica); a failure leaves it unserved with the reason.
    pub(super) fn serve_as_recorded(&self, name: &str) -> Result<(), NodeError> {
        self.offline_volume(name, Force::Yes)?;
        self.pair_volumes.unserved.lock().remove(name);
        self.served.lock().broken.remove(name);
        self.serve_volume(name).inspect_err(|e| {
            self.pair_volumes
                .unserved
                .lock()
                .insert(name.to_owned(), e.to_string());
        })
    }

    /// CONTROL `replica_crashed` on the owner: the peer's replica of `name` restarted after a
    /// crash, so writes it took but never flushed may be gone (a power loss), though no write
    /// failed here. Before anything else is acknowledged alone, the peer is recorded stale in
    /// etcd (compared: most blocks are equal), the activity log's extents (where every change
    /// not yet flushed on both lies) and those the peer had not flushed are set in the bitmap
    /// and committed; then the mirror is degraded and the resync compares and resends them.
    pub(super) fn peer_replica_crashed(&self, name: &str, id: u32) -> Result<(), NodeError> {
        let m = self.owned_mirror(name)?;
        if m.id() != id {
            return Err(NodeError::NotFound(format!(
                "this node owns pair volume {name:?} as id {}, not {id}",
                m.id()
            )));
        }
        let (cluster, me) = self
            .this_node()
            .ok_or_else(|| NodeError::Invalid("this node is not in a pair".into()))?;
        let etcd = super::replicas::pair_err;
        let rec = cluster
            .volume_record(name)
            .map_err(etcd)?
            .filter(|r| r.owner == me && r.token == m.token())
            .ok_or_else(|| NodeError::InUse(format!("this node no longer owns {name:?}")))?;
        let v = m.volume();
        let size = v.geometry().size_bytes;
        let mut ranges = m.activity_log().logged_ranges(size);
        ranges.extend(m.pending_ranges());
        cluster
            .mark_replica_stale(name, &rec, &v.generation(), false, true)
            .map_err(etcd)?;
        cluster.mark_replica_compare(name, &rec).map_err(etcd)?;
        if v.peer_bitmap().is_none() {
            v.start_peer_bitmap(&ranges)
                .map_err(|e| NodeError::Io(format!("starting the peer dirty bitmap: {e}")))?;
        } else {
            for &(offset, len) in &ranges {
                v.mark_peer_dirty(offset, len);
            }
            v.commit_now()
                .map_err(|e| NodeError::Io(format!("committing the bitmap: {e}")))?;
        }
        m.degraded_now();
        tracing::warn!(
            volume = name,
            ranges = ranges.len(),
            "the peer's replica restarted after a crash: its copy of the activity log's extents \
             is compared and resynced"
        );
        Ok(())
    }

    /// Replicas here that restarted after a crash: their owners are told, once each.
    pub(super) fn tell_replica_crashes(&self) {
        let crashed: Vec<(String, u32)> = self
            .pair_volumes
            .replica_crashed
            .lock()
            .iter()
            .map(|(n, id)| (n.clone(), *id))
            .collect();
        for (name, id) in crashed {
            let req = Control::ReplicaCrashed {
                name: name.clone(),
                id,
            }
            .encode();
            match self.peer_control_pub(&req) {
                Ok(_) => {
                    self.pair_volumes.replica_crashed.lock().remove(&name);
                    tracing::info!(volume = %name, "the owner was told this replica crashed");
                }
                Err(e) => tracing::debug!(volume = %name, "telling the owner of the crash: {e}"),
            }
        }
    }

    /// Pair volumes not served here whose records now say what to do (this node owns them,
    /// or a `volume resolve` discarded this copy) are served as recorded: a node that missed
    /// its step of a resolve, or could not reach etcd when it started, catches up within
    /// seconds.
    pub(super) fn serve_as_recorded_all(&self) {
        let Some((cluster, me)) = self.this_node() else {
            return;
        };
        let names: Vec<String> = self.pair_volumes.unserved.lock().keys().cloned().collect();
        for name in names {
            let (Ok(Some(rec)), Ok(Some(local))) =
                (cluster.volume_record(&name), self.pair_record(&name))
            else {
                continue;
            };
            let discarded = rec.owner != me && self.is_discarded(&name);
            if rec.id != local.id || (rec.owner != me && !discarded) {
                continue;
            }
            let Ok(_busy) = self.busy("volume", &name) else {
                continue;
            };
            match self.serve_as_recorded(&name) {
                Ok(()) => tracing::info!(volume = %name, "served as etcd records it now"),
                Err(e) => tracing::debug!(volume = %name, "still not served: {e}"),
            }
        }
    }

    /// The owner's resync is about to start for `name`: true when it may copy to the peer.
    /// A peer behind by more than the bitmap covers (or discarded) gets every block compared:
    /// the bitmap is set whole and committed before etcd records the resync whole, so a crash
    /// between repeats the marking and nothing else.
    pub(super) fn may_resync(&self, name: &str, m: &crate::target::Mirror) -> bool {
        let verdict = match self.check_generations(name) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(volume = name, "resync waits: comparing generations: {e}");
                return false;
            }
        };
        let Some((cluster, _)) = self.this_node() else {
            return false;
        };
        let peer_rec = cluster
            .peer()
            .ok()
            .flatten()
            .and_then(|p| cluster.replica_record(name, &p.name).ok().flatten());
        match verdict {
            // The peer adopted this copy's generation but the bitmap never ended (a resync
            // that stopped at its very end): the bitmap counts from that generation now.
            Verdict::InSync if m.volume().peer_bitmap().is_some() => {
                match m.volume().rebase_peer_bitmap() {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(volume = name, "rebasing the bitmap: {e}");
                        false
                    }
                }
            }
            Verdict::InSync | Verdict::OtherBehind { whole: false } => true,
            Verdict::OtherBehind { whole: true } => {
                if peer_rec.as_ref().is_some_and(|r| r.full) {
                    return true;
                }
                let Ok(Some(rec)) = cluster.volume_record(name) else {
                    return false;
                };
                let v = m.volume();
                v.mark_peer_dirty(0, v.geometry().size_bytes);
                if let Err(e) = v.commit_now() {
                    tracing::warn!(volume = name, "marking a whole resync: {e}");
                    return false;
                }
                match cluster.mark_replica_full(name, &rec) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(volume = name, "recording a whole resync: {e}");
                        false
                    }
                }
            }
            _ if peer_rec.as_ref().is_some_and(|r| r.discard) => {
                // Resolved, and the peer has not dropped its changes yet: remind it.
                let req = Control::DiscardSplitBrain { name: name.into() }.encode();
                if let Err(e) = self.peer_control_pub(&req) {
                    tracing::debug!(volume = name, "asking the peer to discard: {e}");
                }
                false
            }
            _ => false,
        }
    }
}

/// The generation both copies of a new pair volume start at.
pub(super) fn new_generation() -> Generation {
    crate::pool::random_id()
}

/// Sets a new volume's generation (the `edit` of its creation, before it is published).
pub(super) fn start_at(
    g: Generation,
) -> impl FnMut(&mut volume_format::Volume<volume_format::FileStorage>) -> Result<(), String> {
    move |v| {
        v.set_generation(g, false)
            .map_err(|e| format!("setting its generation: {e}"))
    }
}
