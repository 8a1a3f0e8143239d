//! Promotion and split brain (`docs/pair.md` §6-§7): the survivor takes over a pair volume
//! whose owner is gone, and a deposed owner that wrote alone meanwhile is found and kept apart
//! until the operator decides.
//!
//! `volume promote NAME` makes this node the owner, with the next fencing token, only if the
//! owner's presence is gone from etcd (two writers are never made) and etcd does not record
//! this node's copy stale. The old owner's replica is recorded stale, whole: it may hold writes
//! that never reached this node (in flight when it died, unacknowledged), so the resync copies
//! every block to it when it returns. `--force` promotes a stale copy all the same: writes the
//! old owner acknowledged alone are then not here.
//!
//! Split brain: a deposed owner that comes back with bits in its peer dirty bitmap wrote alone
//! while another node was promoted past it (only `--force` allows that). Both nodes say so:
//! their copies' generations both moved on from the one they parted at (`generations.rs`), and
//! the deposed one refuses to serve the volume even with the peer away. Nothing is merged.
//! `volume resolve NAME --keep NODE` keeps either side: the other's changes are discarded
//! (its bitmap and generation dropped) and its copy resynced whole from the kept one, which
//! becomes the owner if it was not.

use crate::peer::control::ControlRequest as Control;

use super::{Force, Node, NodeError};
use crate::pool::PAIR_RECORD;
use crate::target::BlockTarget;

fn etcd(e: crate::cluster::ClusterError) -> NodeError {
    NodeError::Io(format!("the pair's records: {e}"))
}

/// What a command on pair volume `name` starts from.
type PairContext = (
    super::replicas::PairRecord,
    std::sync::Arc<crate::cluster::Cluster>,
    String,
    crate::cluster::VolumeRecord,
);

impl Node {
    /// Volume `name`'s `pair.json`, the pair, this node's name and the volume's etcd record.
    fn pair_context(&self, name: &str) -> Result<PairContext, NodeError> {
        let local = self
            .pair_record(name)?
            .ok_or_else(|| NodeError::Invalid(format!("volume {name:?} is not a pair volume")))?;
        let (cluster, me) = self
            .this_node()
            .ok_or_else(|| NodeError::Invalid("this node is not in a pair".into()))?;
        let rec = cluster
            .volume_record(name)
            .map_err(etcd)?
            .ok_or_else(|| NodeError::NotFound(format!("pair volume {name:?} has no record")))?;
        Ok((local, cluster, me, rec))
    }

    pub fn promote_volume(&self, name: &str, force: bool) -> Result<(), NodeError> {
        let _busy = self.busy("volume", name)?;
        let (local, cluster, me, rec) = self.pair_context(name)?;
        if rec.id != local.id {
            return Err(NodeError::Invalid(format!(
                "volume {name:?} here is not the pair's volume of that name (an orphan)"
            )));
        }
        if rec.owner == me {
            return Err(NodeError::Invalid(format!(
                "this node already owns volume {name:?}"
            )));
        }
        let owner_up = cluster
            .nodes()
            .map_err(etcd)?
            .iter()
            .any(|(m, presence)| m.name == rec.owner && presence.is_some());
        if owner_up {
            return Err(NodeError::InUse(format!(
                "node {} owns volume {name:?} and is up: promoting would make two writers \
                 (stop it first; moving a volume between live nodes is not built yet)",
                rec.owner
            )));
        }
        let stale = cluster.replica_record(name, &me).map_err(etcd)?;
        if let Some(s) = &stale
            && !force
        {
            return Err(NodeError::Invalid(format!(
                "this node's copy of {name:?} is stale: node {} wrote without it since {} \
                 (unix time); promoting it would lose those writes. `--force` promotes it \
                 anyway: writes node {} acknowledged alone are then lost, and if it wrote \
                 while apart it reports a split brain when it returns",
                s.by, s.since_unix, rec.owner
            )));
        }
        if stale.is_some() {
            tracing::warn!(
                volume = name,
                "forced promotion of a stale copy: writes node {} acknowledged alone are lost",
                rec.owner
            );
        }
        let promoted = cluster
            .promote_record(name, &rec, force)
            .map_err(|e| match e {
                crate::cluster::ClusterError::Contended => NodeError::InUse(format!(
                    "volume {name:?}'s records changed meanwhile (its copy here may have been \
                     recorded stale): look again with `pair \
                     status` and retry"
                )),
                e => etcd(e),
            })?;
        let record = super::replicas::PairRecord {
            token: promoted.token,
            ..local
        };
        self.pool.set_volume_record(
            name,
            PAIR_RECORD,
            Some(&serde_json::to_vec(&record).expect("a record serialises")),
        )?;
        tracing::warn!(
            volume = name,
            token = promoted.token,
            "promoted: this node owns the volume now; node {} is stale until resynced",
            rec.owner
        );
        // Served again as its owner: the peer is stale, so the bitmap starts whole.
        self.offline_volume(name, Force::Yes)?;
        self.serve_volume(name)
    }

    /// `volume resolve NAME --keep KEEP`: ends a split brain (or a standoff of unrelated
    /// data) of `name` keeping node `keep`'s copy. Both nodes must be up: the copies'
    /// generations must show the split now. One etcd transaction decides (the other copy
    /// recorded discarded; `keep` made the owner if it is not); then the losing node drops its
    /// changes and serves its copy as a stale replica, the keeper serves the volume as its
    /// owner, and the resync copies every block that differs (both bitmaps' blocks among
    /// them) from the kept copy.
    pub fn resolve_volume(&self, name: &str, keep: &str) -> Result<(), NodeError> {
        let (cluster, me) = self
            .this_node()
            .ok_or_else(|| NodeError::Invalid("this node is not in a pair".into()))?;
        let rec = cluster
            .volume_record(name)
            .map_err(etcd)?
            .ok_or_else(|| NodeError::NotFound(format!("pair volume {name:?} has no record")))?;
        let peer = cluster
            .peer()
            .map_err(etcd)?
            .ok_or_else(|| NodeError::Invalid("the pair has no other node".into()))?
            .name;
        let loser = if keep == me {
            peer.clone()
        } else if keep == peer {
            me.clone()
        } else {
            return Err(NodeError::Invalid(format!(
                "node {keep:?} is not in the pair: its nodes are {me} and {peer}"
            )));
        };
        let verdict = self.check_generations(name).map_err(|e| {
            NodeError::InUse(format!(
                "comparing the two copies of {name:?} needs both nodes ({e}); resolve when \
                 node {peer} is up"
            ))
        })?;
        if !matches!(
            verdict,
            crate::peer::generations::Verdict::SplitBrain { .. }
                | crate::peer::generations::Verdict::Unrelated
        ) {
            return Err(NodeError::Invalid(format!(
                "volume {name:?} is not split ({verdict:?}): there is nothing to resolve"
            )));
        }
        let resolved = cluster
            .resolve_record(name, &rec, keep, &loser)
            .map_err(|e| match e {
                crate::cluster::ClusterError::Contended => NodeError::InUse(format!(
                    "volume {name:?}'s record changed meanwhile: look again with `pair \
                     status` and retry"
                )),
                e => etcd(e),
            })?;
        tracing::warn!(
            volume = name,
            owner = %resolved.owner,
            token = resolved.token,
            "split brain resolved: node {keep}'s copy is kept, node {loser}'s changes are \
             discarded"
        );
        // The loser first (if it owned the volume it stops writing), then the keeper serves
        // it as its owner, degraded (a mirror in sync is served again so). Each step is tried
        // even if the other failed: the records decide, and a node that missed its step takes
        // it when the resync thread next looks (`serve_as_recorded_all`) or when it starts.
        let tell = |req: Vec<u8>| self.peer_control_pub(&req).map(|_| ());
        let lost = if loser == me {
            self.discard_split_brain(name)
        } else {
            tell(Control::DiscardSplitBrain { name: name.into() }.encode())
        };
        let kept = if keep == me {
            self.became_owner(name)
        } else {
            tell(Control::BecameOwner { name: name.into() }.encode())
        };
        lost.and(kept).map_err(|e| {
            NodeError::Io(format!(
                "resolved in etcd, but a node has not acted on it yet ({e}); it does within \
                 seconds (or when it starts)"
            ))
        })
    }

    /// etcd records this node's copy of `name` discarded (`volume resolve`): served again as
    /// what it is now, a stale replica whose changes are dropped as it is served.
    pub(super) fn discard_split_brain(&self, name: &str) -> Result<(), NodeError> {
        let _busy = self.busy("volume", name)?;
        let (local, _, me, rec) = self.pair_context(name)?;
        if !self.is_discarded(name) || rec.owner == me {
            return Err(NodeError::Invalid(format!(
                "etcd does not record this node's copy of {name:?} discarded"
            )));
        }
        let record = super::replicas::PairRecord {
            token: rec.token.max(local.token),
            ..local
        };
        self.pool.set_volume_record(
            name,
            PAIR_RECORD,
            Some(&serde_json::to_vec(&record).expect("a record serialises")),
        )?;
        self.serve_as_recorded(name)
    }
}

impl Node {
    /// Hands pair volume `name` to node `to` (run on its owner, while the peer's copy is in
    /// sync): new writes here are held and then refused, in-flight ones finish, both copies
    /// are committed, etcd names `to` the owner with the next token, this node serves the
    /// volume as a replica and `to` as its owner. Clients here are disconnected (they
    /// reconnect to `to`).
    /// `volume resize` of a pair volume, on its owner while the other copy is in sync: the
    /// peer's replica grows first (so it takes writes past the old end), then the etcd record,
    /// then the caller grows this node's copy. A failure between leaves the peer's copy larger
    /// than the owner's, which nothing writes past; resizing again finishes it.
    pub(super) fn grow_pair_volume(&self, name: &str, size: u64) -> Result<(), NodeError> {
        let (local, cluster, me, rec) = self.pair_context(name)?;
        let m = self.pair_volumes.mirrors.lock().get(name).cloned();
        let Some(m) = m.filter(|_| rec.owner == me) else {
            return Err(NodeError::InUse(format!(
                "volume {name:?} is owned by node {}: resize it there",
                rec.owner
            )));
        };
        if !matches!(m.peer_state(), crate::target::PeerState::InSync) {
            return Err(NodeError::InUse(format!(
                "the other copy of {name:?} is not in sync (see `pair status`): both copies \
                 grow together, so not before its resync ends"
            )));
        }
        if size < rec.size {
            return Err(NodeError::Invalid(format!(
                "volumes only grow: {size} is smaller than the current {}",
                rec.size
            )));
        }
        let peer = cluster
            .peer()
            .map_err(etcd)?
            .ok_or_else(|| NodeError::Invalid("the pair has no other node".into()))?;
        let req = Control::GrowReplica {
            name: name.to_owned(),
            id: local.id,
            size,
        }
        .encode();
        self.peer_control_pub(&req)
            .map_err(|e| NodeError::Io(format!("growing node {}'s copy: {e}", peer.name)))?;
        cluster
            .resize_record(name, &rec, &peer.name, size)
            .map_err(etcd)?;
        Ok(())
    }

    /// The owner grows pair volume `name` (volume `id`): this node's replica first.
    pub(super) fn grow_replica(&self, name: &str, id: u32, size: u64) -> Result<(), NodeError> {
        self.peer_may_change(name, id, "it is resized here")?;
        let _busy = self.busy("volume", name)?;
        self.grow_here(name, size)
    }

    pub fn move_volume(&self, name: &str, to: &str) -> Result<(), NodeError> {
        let (cluster, me) = self
            .this_node()
            .ok_or_else(|| NodeError::Invalid("this node is not in a pair".into()))?;
        let peer = cluster
            .peer()
            .map_err(etcd)?
            .ok_or_else(|| NodeError::Invalid("the pair has no other node".into()))?;
        if to != peer.name {
            return Err(NodeError::Invalid(format!(
                "{to:?} is not the other node of this pair (that is {})",
                peer.name
            )));
        }
        let m = self.owned_mirror(name)?;
        if !matches!(m.peer_state(), crate::target::PeerState::InSync) {
            return Err(NodeError::InUse(format!(
                "node {to}'s copy of {name:?} is not in sync (see `pair status`): it cannot \
                 take the volume over before its resync ends"
            )));
        }
        let _busy = self.busy("volume", name)?;
        let rec = cluster
            .volume_record(name)
            .map_err(etcd)?
            .ok_or_else(|| NodeError::NotFound(format!("pair volume {name:?} has no record")))?;
        if rec.owner != me || rec.token != m.token() {
            return Err(NodeError::InUse(format!(
                "volume {name:?}'s record names node {} (token {})",
                rec.owner, rec.token
            )));
        }
        let local = self.pair_record(name)?.ok_or_else(|| {
            NodeError::NotFound(format!("volume {name:?} has no pair record here"))
        })?;
        // No write in flight from here on; the copies made durable on both nodes.
        let size = m.volume().geometry().size_bytes;
        let held = m.lock_range(0, size);
        m.volume()
            .commit_now()
            .map_err(|e| NodeError::Io(e.to_string()))?;
        let flush = Control::FlushReplica { name: name.into() }.encode();
        self.peer_control_pub(&flush)?;
        let moved = cluster.move_record(name, &rec, to).map_err(|e| match e {
            crate::cluster::ClusterError::Contended => NodeError::InUse(format!(
                "volume {name:?}'s records changed meanwhile (the peer's copy may have been \
                     recorded stale): look again with `pair status`"
            )),
            e => etcd(e),
        })?;
        // Nothing more is written here as the owner. Changes and flushes that come now wait
        // (those waiting for the range too) until the fence below refuses them as moved; the
        // connections' `PairTarget` then plans them again on the role this node takes next.
        let why = format!("volume {name:?} moved to node {to}: reconnect there");
        if m.hold_for_move().is_err() {
            m.fence(&why);
        }
        tracing::info!(
            volume = name,
            to,
            token = moved.token,
            "moved to the other node"
        );
        // This node's copy becomes a replica, on the volume already open: registered before
        // the new owner is told, so its first frames find it. The mirror stays findable until
        // then: changes forwarded to it meanwhile wait, then are refused as moved and the other
        // node carries them out itself.
        let served = self.pair_target(name, m.volume(), &local);
        let req = Control::BecameOwner { name: name.into() }.encode();
        let told = self.peer_control_pub(&req);
        if let Some(old) = self.pair_volumes.mirrors.lock().remove(name) {
            old.abandon("the volume moved to the other node");
        }
        let pt = self.pair_volumes.targets.lock().get(name).cloned();
        match (served, pt) {
            (Ok(role), Some(pt)) => {
                // The connections here stay: what they start (and what waited) goes to the
                // new role, a `Forward` to the new owner.
                pt.set_role(role.target());
                m.fence(&why);
                drop(held);
            }
            (served, _) => {
                let why = served
                    .err()
                    .map_or("no connections' target".into(), |e| e.to_string());
                tracing::warn!(
                    volume = name,
                    "served anew, its clients disconnected: {why}"
                );
                m.fence(&format!(
                    "volume {name:?} moved to node {to}: reconnect there"
                ));
                drop(held);
                self.offline_volume(name, Force::Yes)?;
                self.serve_volume(name)?;
            }
        }
        if let Err(e) = told {
            // It finds out by itself within a second or at its next start (check_ownership
            // works both ways only for owners; a replica re-serves on its next start).
            tracing::warn!(volume = name, "telling node {to} it owns the volume: {e}");
            return Err(NodeError::Io(format!(
                "volume {name:?} is node {to}'s now, but it could not be told: {e} (restart it \
                 to serve the volume as its owner)"
            )));
        }
        Ok(())
    }

    /// `volume move` on the owner: this node's replica of `name` commits what it has.
    pub(super) fn flush_replica(&self, name: &str) -> Result<(), NodeError> {
        let t = self
            .served_volume(name)
            .ok_or_else(|| NodeError::NotFound(format!("volume {name:?} is not served here")))?;
        t.commit_now().map_err(|e| NodeError::Io(e.to_string()))
    }

    /// `volume move` on the old owner, or `volume resolve` keeping this node's copy: this node
    /// owns `name` now. Served again, as its owner.
    pub(super) fn became_owner(&self, name: &str) -> Result<(), NodeError> {
        let _busy = self.busy("volume", name)?;
        let (local, _, me, rec) = self.pair_context(name)?;
        if rec.owner != me {
            return Err(NodeError::Invalid(format!(
                "etcd names node {} the owner of {name:?}, not this node",
                rec.owner
            )));
        }
        // Served already as its owner with this token: degraded (a resolve that kept this
        // node's copy while the other was stale), its resync does the rest; in sync (a resolve
        // keeping the owner's copy), it is served anew below, degraded, its clients
        // disconnected: never a second mirror beside a live one (its own ranges and activity
        // log).
        let owned = self
            .pair_volumes
            .mirrors
            .lock()
            .get(name)
            .filter(|m| m.token() == rec.token)
            .map(|m| m.peer_state());
        if owned
            .as_ref()
            .is_some_and(|s| !matches!(s, crate::target::PeerState::InSync))
        {
            return Ok(());
        }
        let record = super::replicas::PairRecord {
            token: rec.token.max(local.token),
            ..local
        };
        self.pool.set_volume_record(
            name,
            PAIR_RECORD,
            Some(&serde_json::to_vec(&record).expect("a record serialises")),
        )?;
        // On the volume already open, its connections kept (they were forwarding to the old
        // owner; their changes are this node's to order now); served anew if it was not.
        let switched = match owned {
            Some(_) => Err(NodeError::InUse("already its owner".into())),
            None => self.switch_role(name),
        };
        if let Err(e) = switched {
            tracing::info!(volume = name, "served anew: {e}");
            self.serve_as_recorded(name)?;
        }
        tracing::info!(
            volume = name,
            token = rec.token,
            "this node owns the volume now"
        );
        Ok(())
    }
}
