//! The pair's volumes on this node (`docs/pair.md` §2-§3): created on both nodes, served as a
//! [`Mirror`] by their owner and by the other node as a replica whose copy the peer link
//! writes ([`Replica`]), exported there as a [`Forward`]: reads its own, changes forwarded to
//! the owner.
//!
//! A pair volume has a record beside its files (`pair.json`: the pair, the volume's id in it,
//! the highest fencing token its replica has seen) and one in etcd (`volumes/NAME`: id, owner,
//! token, image, size, ready). Creation, on the node that will own the volume:
//!
//! 1. the etcd record, `ready: false`, with a new id (refused if the pair has the name);
//! 2. the local volume with its `pair.json`, published in one rename;
//! 3. a CONTROL request: the peer makes its replica (the same clone, its own `pair.json`);
//! 4. the etcd record `ready: true`; the volume is served, mirrored.
//!
//! A failure at 2 or 3 undoes what was done (the peer's replica, the local volume, the etcd
//! record). A crash between 1 and 4 leaves a record that is not ready: the owner deletes it
//! and its local volume when it starts; a replica the peer made for it has no record then, is
//! not served, and is named in `status` for the operator to delete.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::{Node, NodeError};
use crate::cluster::VolumeRecord;
use crate::peer::replica::{Replica, Replicas};
use crate::pool::PAIR_RECORD;
use crate::target::{BlockTarget, Degrader, Forward, Mirror, PeerState, VolumeTarget};

/// `pair.json` beside a pair volume's files.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct PairRecord {
    pub pair: String,
    pub id: u32,
    /// The highest fencing token this copy has seen.
    pub token: u64,
}

/// How this node serves a pair volume: as its owner, or as the other node.
pub(super) enum Served {
    Owner(Arc<Mirror>),
    Replica(Arc<Forward>),
}

impl Served {
    pub fn target(self) -> Arc<dyn BlockTarget> {
        match self {
            Served::Owner(m) => m,
            Served::Replica(f) => f,
        }
    }
}

/// The pair volumes this node serves.
#[derive(Default)]
pub(super) struct PairVolumes {
    /// Replicas this node holds for the peer, by id (what the peer's data links write).
    replicas: RwLock<HashMap<u32, Arc<Replica>>>,
    /// Volumes this node owns, by name.
    pub mirrors: Mutex<BTreeMap<String, Arc<Mirror>>>,
    /// What the connections of each served pair volume hold: its role here can change under
    /// them (`switch_role`).
    pub targets: Mutex<HashMap<String, Arc<crate::target::PairTarget>>>,
    /// Local pair volumes not served, with the reason (orphans, volumes of another pair).
    pub unserved: Mutex<BTreeMap<String, String>>,
    /// Names of mirrors whose peer failed, for the degrade thread (`Node::degrade`).
    degrade_tx: Mutex<Option<std::sync::mpsc::Sender<String>>>,
    /// Activity logs with changes waiting, for the activity thread.
    log_tx: Mutex<Option<std::sync::mpsc::Sender<Arc<crate::target::activity::ActivityLog>>>>,
    /// Replicas recorded stale in etcd (their reads refused), by name.
    pub stale: Mutex<HashMap<String, Arc<std::sync::atomic::AtomicBool>>>,
    /// The dialer's count of data links when the peer last fenced this node's links: a new
    /// fence is needed before a resync only if a link was replaced since.
    pub fenced_dials: Mutex<Option<u64>>,
    /// Volumes this node took over with `promote --force` (their peer's record says so).
    pub forced: Mutex<std::collections::BTreeSet<String>>,
    /// Local volumes not yet made pair volumes (`adopt.rs`), and why.
    pub not_adopted: Mutex<BTreeMap<String, String>>,
    /// Resyncs under way, by volume.
    pub progress: Mutex<HashMap<String, super::resync::ResyncProgress>>,
    /// Replicas here that restarted after a crash, by name with their id, until their owner
    /// was told (`replica_crashed`).
    pub replica_crashed: Mutex<BTreeMap<String, u32>>,
    /// Why the copies' generations of a volume could not be compared, while they cannot.
    pub compare_errors: Mutex<HashMap<String, String>>,
    /// Volumes whose copies' generations do not agree as they should (`generations.rs`).
    pub generation_problems: Mutex<BTreeMap<String, super::generations::GenerationProblem>>,
    /// Owned volumes whose personality the peer may not have (a send failed, or the link was
    /// down): sent again by the resync thread while the link is up.
    pub personality_pending: Mutex<std::collections::BTreeSet<String>>,
}

use crate::peer::control::ControlRequest as Control;

/// What the peer link asks of the node (its replicas, its control answers).
pub(crate) struct ReplicaService(pub Weak<Node>);

impl Replicas for ReplicaService {
    fn replica(&self, id: u32) -> Option<Arc<Replica>> {
        self.0
            .upgrade()?
            .pair_volumes
            .replicas
            .read()
            .get(&id)
            .cloned()
    }

    fn receive_image(&self, request: &[u8], src: std::fs::File) -> Result<(), String> {
        let node = self.0.upgrade().ok_or("the node is stopping")?;
        node.receive_image(request, src).map_err(|e| e.to_string())
    }

    fn forwarded(
        &self,
        h: &crate::peer::wire::Header,
        payload: &mut [u8],
        to_replica: &mut crate::peer::replica::ToReplica<'_>,
    ) -> Result<bool, i32> {
        let node = self.0.upgrade().ok_or(libc::ESHUTDOWN)?;
        node.forwarded(h, payload, to_replica)
    }

    fn data_link_ended(&self) {
        // The owner may have given up on this node: ask etcd before serving more reads.
        if let Some(node) = self.0.upgrade() {
            node.refresh_stale();
        }
    }

    fn control(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let node = self.0.upgrade().ok_or("the node is stopping")?;
        let req = Control::decode(request)?;
        match req {
            Control::CreateReplica { name } => node.create_replica(&name),
            Control::DeleteReplica { name, id } => node.delete_replica(&name, id),
            Control::ReplicaInSync { name } => {
                tracing::info!(volume = %name, "the owner says this replica is in sync again");
                node.refresh_stale();
                node.drop_replica_bitmap(&name);
                Ok(())
            }
            Control::DiscardSplitBrain { name } => node.discard_split_brain(&name),
            Control::Generations { name } => {
                let g = node.local_generations(&name).map_err(|e| e.to_string())?;
                return Ok(g.encode());
            }
            Control::AdoptGeneration {
                name,
                id,
                generation,
            } => node.adopt_generation(&name, id, &generation),
            Control::ReplicaCrashed { name, id } => node.peer_replica_crashed(&name, id),
            Control::FlushReplica { name } => node.flush_replica(&name),
            Control::BecameOwner { name } => node.became_owner(&name),
            Control::GrowReplica { name, id, size } => node.grow_replica(&name, id, size),
            Control::SetPersonality { name, id, record } => {
                node.set_replica_personality(&name, id, record.as_deref())
            }
            Control::DeleteImage { name } => {
                let gone = match node.delete_image_here(&name) {
                    Ok(()) => Ok(()),
                    Err(NodeError::Pool(crate::pool::PoolError::NotFound { .. })) => Ok(()),
                    Err(e) => Err(e),
                };
                if gone.is_ok()
                    && let Some((cluster, _)) = node.this_node()
                {
                    let _ = cluster.delete_image_record(&name);
                }
                gone
            }
            Control::Checksums {
                name,
                first,
                blocks,
            } => {
                let crcs = node
                    .block_checksums(&name, first, blocks)
                    .map_err(|e| e.to_string())?;
                return Ok(serde_json::to_vec(&crcs).expect("numbers serialise"));
            }
            // The peer link answers it itself (it owns the data links).
            Control::FenceDataLinks => Err(NodeError::Invalid(
                "fence_data_links is the peer link's to answer".into(),
            )),
            Control::ReplicaStale { name } => {
                tracing::warn!(volume = %name, "the owner recorded this replica stale");
                node.refresh_stale();
                Ok(())
            }
        }
        .map_err(|e| e.to_string())?;
        Ok(b"{}".to_vec())
    }
}

pub(super) fn pair_err(e: crate::cluster::ClusterError) -> NodeError {
    NodeError::Io(format!("the pair's records: {e}"))
}

impl Node {
    /// A change (or flush) a client of the peer's asked of volume `h.handle`, forwarded here
    /// (`docs/pair.md` §8): carried out through this node's mirror exactly as a local client's
    /// (its order, activity log, both copies, degraded mode), its replica part sent by
    /// `to_replica`. Whether that part was done (the peer's copy has the change), or the errno
    /// that refused it: `ENOENT` when this node does not own the volume, `ESTALE` when the
    /// forwarder names another owner's token.
    fn forwarded(
        &self,
        h: &crate::peer::wire::Header,
        payload: &mut [u8],
        to_replica: &mut crate::peer::replica::ToReplica<'_>,
    ) -> Result<bool, i32> {
        let m = self
            .pair_volumes
            .mirrors
            .lock()
            .values()
            .find(|m| m.id() == h.handle)
            .cloned();
        let Some(m) = m else {
            // Expected for what was on its way while the volume moved (the forwarder plans
            // it again on its own new role).
            tracing::info!(
                "refused a forwarded {:?} for volume id {}: this node does not own it",
                h.kind,
                h.handle
            );
            return Err(libc::ENOENT);
        };
        if h.token != m.token() {
            tracing::warn!(
                volume = m.volume().name(),
                "refused a forwarded {:?} with fencing token {}: this owner's is {}",
                h.kind,
                h.token,
                m.token()
            );
            return Err(libc::ESTALE);
        }
        let size = m.geometry().size_bytes;
        if h.kind != crate::peer::wire::Kind::Flush && h.offset + h.range > size {
            return Err(libc::EINVAL);
        }
        let op = crate::peer::replica::target_op(h)?;
        let (mut reached, mut missed) = (0, false);
        let ran = crate::target::blocking::run_with_peer(m.as_ref(), &op, payload, &mut |io, b| {
            let r = to_replica(io, b);
            if r < 0 {
                missed = true;
            } else {
                reached += 1;
            }
            r
        });
        match ran {
            Ok(()) => Ok(reached > 0 && !missed),
            // Fenced by a move while it waited: nothing was done; the forwarder tries again
            // on whatever serves the volume there now.
            Err(crate::target::TargetError::NotOwner(_)) => Err(libc::ESTALE),
            Err(e) => {
                tracing::warn!(
                    volume = m.volume().name(),
                    "a forwarded {:?} failed: {e}",
                    h.kind
                );
                Err(i32::try_from(e.errno().wire()).unwrap_or(libc::EIO))
            }
        }
    }

    /// The volume's `pair.json`, if it is a pair volume.
    pub(super) fn pair_record(&self, name: &str) -> Result<Option<PairRecord>, NodeError> {
        let Some(bytes) = self.pool.volume_record(name, PAIR_RECORD)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| NodeError::Invalid(format!("volume {name:?}'s {PAIR_RECORD}: {e}")))
    }

    /// The mirror of volume `name` when this node owns it; else a refusal that says to run
    /// the command on the owner.
    pub(super) fn owned_mirror(&self, name: &str) -> Result<Arc<Mirror>, NodeError> {
        self.pair_volumes
            .mirrors
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| {
                NodeError::Invalid(format!(
                    "volume {name:?} is not a pair volume this node owns: run it on its owner"
                ))
            })
    }

    pub(super) fn this_node(&self) -> Option<(Arc<crate::cluster::Cluster>, String)> {
        let p = self.pair.lock();
        let c = p.as_ref()?.cluster.clone();
        let me = c.config().node.clone();
        Some((c, me))
    }

    /// What pair volume `name` (its local copy `target`) is exported as: its mirror when this
    /// node owns it, its read-only replica otherwise. Refused when the pair does not know it.
    pub(super) fn pair_target(
        &self,
        name: &str,
        target: &Arc<VolumeTarget>,
        local: &PairRecord,
    ) -> Result<Served, NodeError> {
        let Some((cluster, me)) = self.this_node() else {
            return Err(NodeError::Invalid(format!(
                "volume {name:?} belongs to pair {}: start the node with --etcd to serve it",
                local.pair
            )));
        };
        if cluster.config().pair != local.pair {
            return Err(NodeError::Invalid(format!(
                "volume {name:?} belongs to pair {}, this node is in pair {}",
                local.pair,
                cluster.config().pair
            )));
        }
        let rec = cluster.volume_record(name).map_err(pair_err)?;
        let rec = match rec {
            Some(r) if r.id == local.id => r,
            Some(r) => {
                return Err(NodeError::Invalid(format!(
                    "volume {name:?} is id {} here and id {} in the pair's records: an orphan \
                     of an earlier volume of that name; delete it",
                    local.id, r.id
                )));
            }
            None => {
                return Err(NodeError::Invalid(format!(
                    "volume {name:?} (id {}) is not in the pair's records: an orphan; delete it",
                    local.id
                )));
            }
        };
        if rec.token == 0 {
            return Err(NodeError::Invalid(format!(
                "volume {name:?}'s record in etcd has fencing token 0"
            )));
        }
        if rec.owner == me {
            if local.token > rec.token {
                return Err(NodeError::Invalid(format!(
                    "volume {name:?}: this copy has seen fencing token {}, above the owner's \
                     {}: refusing to write with an older token",
                    local.token, rec.token
                )));
            }
            let mut peer_rec = match cluster.peer().map_err(pair_err)? {
                Some(p) => cluster.replica_record(name, &p.name).map_err(pair_err)?,
                None => None,
            };
            let size = target.geometry().size_bytes;
            // The activity log (`target/activity.rs`): after a crash of this node, every block
            // a change in flight may have reached one copy and not the other lies in a logged
            // extent. No log from before (the volume was owned by a build without one): all.
            let (log_file, log_existed) = self.pool.open_activity_log(name)?;
            let crashed = self.crashed_volumes.lock().contains(name);
            if crashed && !log_existed {
                // Made now for a volume that crashed without one: it says "every extent"
                // until the crash is dealt with, so a failure below (or another crash) cannot
                // leave an empty log that would say "nothing was in flight".
                crate::target::activity::write_overflow(&log_file).map_err(|e| {
                    NodeError::Io(format!("writing the activity log of {name:?}: {e}"))
                })?;
            }
            let logged = crate::target::activity::read(&log_file)
                .map_err(|e| NodeError::Io(format!("reading the activity log of {name:?}: {e}")))?;
            let suspect = match &logged {
                Some(l) => l.ranges(size),
                None => Vec::new(),
            };
            // After a crash, the peer is recorded stale before a write is served, and the
            // suspect extents compared and resent (comparing first: most are equal).
            if peer_rec.is_none() && crashed && !suspect.is_empty() {
                cluster
                    .mark_replica_stale(name, &rec, &target.generation(), false, true)
                    .map_err(|e| {
                        NodeError::Io(format!(
                            "this node stopped uncleanly and cannot record the peer's copy \
                             stale ({e}): not served until it can (restart to retry)"
                        ))
                    })?;
                tracing::warn!(
                    volume = name,
                    extents = suspect.len(),
                    "this node stopped uncleanly: the activity log's extents of the peer's copy \
                     are compared and resynced"
                );
                peer_rec = match cluster.peer().map_err(pair_err)? {
                    Some(p) => cluster.replica_record(name, &p.name).map_err(pair_err)?,
                    None => None,
                };
            }
            // A crash while a resync was ending: the peer may have adopted this copy's
            // generation already; the bitmap counts from it and this copy takes a new one, so
            // what it writes alone now is told apart (`peer/generations.rs`).
            if crashed
                && target.peer_bitmap().is_some()
                && peer_rec.as_ref().is_some_and(|r| r.adopting)
            {
                target
                    .rebase_peer_bitmap()
                    .map_err(|e| NodeError::Io(format!("rebasing the bitmap: {e}")))?;
            }
            // A crash also loses the bits of writes not yet committed, whose data may have
            // reached the disk: a bitmap kept from before gets the suspect extents too.
            if crashed && target.peer_bitmap().is_some() && !suspect.is_empty() {
                cluster.mark_replica_compare(name, &rec).map_err(pair_err)?;
                for &(offset, len) in &suspect {
                    target.mark_peer_dirty(offset, len);
                }
                target
                    .commit_now()
                    .map_err(|e| NodeError::Io(format!("{e}")))?;
            }
            // The peer is stale and this copy keeps no bitmap: after a crash, the suspect
            // extents go to it; otherwise (just promoted, or a stop came between recording
            // the peer stale and starting one) every block does.
            if let Some(r) = &peer_rec
                && target.peer_bitmap().is_none()
            {
                let ranges = if crashed && !r.full && !r.discard {
                    suspect.clone()
                } else {
                    vec![(0, size)]
                };
                target
                    .start_peer_bitmap(&ranges)
                    .map_err(|e| NodeError::Io(format!("starting a resync: {e}")))?;
            }
            // Recorded: the crash is dealt with. Until then the node does not mark a clean
            // stop either.
            self.crashed_volumes.lock().remove(name);
            if peer_rec.as_ref().is_some_and(|r| r.forced) {
                self.pair_volumes.forced.lock().insert(name.to_owned());
            } else {
                self.pair_volumes.forced.lock().remove(name);
            }
            // A volume that keeps a peer bitmap is degraded: since when, etcd says.
            let degraded = target.peer_bitmap().map(|_| {
                let since = peer_rec.as_ref().map_or(0, |r| r.since_unix);
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(since)
            });
            let log = Arc::new(crate::target::activity::ActivityLog::new(log_file, logged));
            let m = Arc::new(Mirror::new(
                target.clone(),
                rec.id,
                rec.token,
                degraded,
                self.degrader(),
                log,
                self.log_writer(),
            ));
            self.pair_volumes
                .mirrors
                .lock()
                .insert(name.to_owned(), m.clone());
            return Ok(Served::Owner(m));
        }
        // `volume resolve` discarded this copy's changes: they go before anything else (again
        // after a crash: dropping them twice is harmless).
        let mine = cluster.replica_record(name, &me).map_err(pair_err)?;
        let discarded = mine.as_ref().is_some_and(|r| r.discard);
        if discarded {
            self.discard_changes(name, target)?;
        }
        // A deposed owner that wrote alone (bits in its bitmap) while another node was promoted
        // past it: a split brain. Its copy is kept apart, not served, never merged. (With the
        // peer up, the generations say so on both nodes too: `generations.rs`.)
        if local.token < rec.token
            && let Some(bits) = target.peer_bitmap()
            && bits > 0
        {
            return Err(NodeError::Invalid(format!(
                "split brain: this node owned it (token {}) and wrote {} alone, and node {} \
                 was promoted since (token {}); nothing is merged: `streamer volume resolve \
                 {name} --keep NODE` keeps one side and discards the other's changes",
                local.token,
                indicatif::HumanBytes(bits * 4096),
                rec.owner,
                rec.token,
            )));
        }
        // A replica's writes in flight at a crash are the owner's to resend when it saw the
        // link die; it is told anyway (`replica_crashed`), since writes it had taken but not
        // flushed may be gone without a write failing.
        // (A discarded copy is resynced whole, comparing every block: nothing to tell.)
        if self.crashed_volumes.lock().remove(name) && !discarded {
            self.pair_volumes
                .replica_crashed
                .lock()
                .insert(name.to_owned(), local.id);
        }
        let weak = self.me.get().cloned().unwrap_or_default();
        let vol = name.to_owned();
        let id = local.id;
        let pair = local.pair.clone();
        let store = Box::new(move |token: u64| {
            let node = weak.upgrade().ok_or("the node is stopping")?;
            let rec = PairRecord {
                pair: pair.clone(),
                id,
                token,
            };
            node.pool
                .set_volume_record(
                    &vol,
                    PAIR_RECORD,
                    Some(&serde_json::to_vec(&rec).expect("a record serialises")),
                )
                .map_err(|e| e.to_string())
        });
        let replica = Arc::new(Replica::new(
            name.to_owned(),
            target.clone(),
            local.token,
            store,
        ));
        self.pair_volumes.replicas.write().insert(local.id, replica);
        let stale = Arc::new(std::sync::atomic::AtomicBool::new(
            mine.is_some()
                || self
                    .pair_volumes
                    .generation_problems
                    .lock()
                    .contains_key(name),
        ));
        self.pair_volumes
            .stale
            .lock()
            .insert(name.to_owned(), stale.clone());
        let link_up = self
            .pair
            .lock()
            .as_ref()
            .and_then(|p| p.link().map(|l| l.up_flag()))
            .unwrap_or_default();
        Ok(Served::Replica(Arc::new(Forward::new(
            target.clone(),
            local.id,
            rec.token,
            stale,
            link_up,
        ))))
    }

    /// The degrader every mirror of this node calls when its peer failed: hands the volume's
    /// name to the degrade thread.
    fn degrader(&self) -> Degrader {
        let tx = self.pair_volumes.degrade_tx.lock().clone();
        Arc::new(move |name: &str| {
            if let Some(tx) = &tx {
                let _ = tx.send(name.to_owned());
            }
        })
    }

    /// The activity-log writer every mirror of this node calls when a change waits for its
    /// log: hands the log to the activity thread.
    fn log_writer(&self) -> crate::target::activity::LogWriter {
        let tx = self.pair_volumes.log_tx.lock().clone();
        Arc::new(move |log| {
            if let Some(tx) = &tx {
                let _ = tx.send(log);
            }
        })
    }

    /// Starts the thread that writes the mirrors' activity logs (`target/activity.rs`): a
    /// `pwrite` and an `fdatasync` per commit, never on an I/O thread.
    pub(super) fn start_activity_thread(&self) {
        let (tx, rx) = std::sync::mpsc::channel::<Arc<crate::target::activity::ActivityLog>>();
        *self.pair_volumes.log_tx.lock() = Some(tx);
        let spawned = std::thread::Builder::new()
            .name("streamer-activity".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Every log that asked meanwhile, once each.
                    let mut logs = vec![first];
                    logs.extend(rx.try_iter());
                    logs.sort_by_key(|l| Arc::as_ptr(l) as usize);
                    logs.dedup_by_key(|l| Arc::as_ptr(l) as usize);
                    for log in logs {
                        if let Err(e) = log.commit() {
                            tracing::error!("{e}");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("starting the activity thread: {e}");
        }
    }

    /// Starts the thread that records peers stale for the mirrors (`docs/pair.md` §4).
    pub(super) fn start_degrade_thread(self: &Arc<Self>) {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        *self.pair_volumes.degrade_tx.lock() = Some(tx);
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("streamer-degrade".into())
            .spawn(move || {
                // Volumes whose last attempt failed: tried again each second while requests
                // or ranges wait.
                let mut retry: Vec<String> = Vec::new();
                loop {
                    let next = rx.recv_timeout(std::time::Duration::from_secs(1));
                    let Some(node) = weak.upgrade() else {
                        return;
                    };
                    let mut names = std::mem::take(&mut retry);
                    match next {
                        Ok(name) => names.push(name),
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    names.sort();
                    names.dedup();
                    for name in names {
                        if !node.degrade(&name) {
                            retry.push(name);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("starting the degrade thread: {e}");
        }
    }

    /// Mirror `name`'s peer failed: record the peer's replica stale in etcd (only while this
    /// node owns the volume with the mirror's token), then start the volume's peer dirty
    /// bitmap with the ranges the peer missed; the mirror's parked requests then complete.
    /// Either failing, they fail.
    /// False when it should be tried again (it failed and work waits).
    fn degrade(&self, name: &str) -> bool {
        let Some(m) = self.pair_volumes.mirrors.lock().get(name).cloned() else {
            return true; // taken offline: its waiters were failed then
        };
        if !matches!(m.peer_state(), PeerState::Degrading) {
            return true;
        }
        let ranges = m.pending_ranges();
        let outcome = (|| {
            let (cluster, me) = self.this_node().ok_or("this node left the pair")?;
            let rec = cluster
                .volume_record(name)
                .map_err(|e| e.to_string())?
                .ok_or("the volume has no record in etcd")?;
            if rec.owner != me || rec.token != m.token() {
                return Err(format!(
                    "node {} owns the volume now (token {})",
                    rec.owner, rec.token
                ));
            }
            cluster
                .mark_replica_stale(name, &rec, &m.volume().generation(), false, false)
                .map_err(|e| e.to_string())?;
            m.volume()
                .start_peer_bitmap(&ranges)
                .map_err(|e| format!("starting the peer dirty bitmap: {e}"))
        })();
        let ok = outcome.is_ok();
        let retry = if ok { Vec::new() } else { ranges };
        m.degrade_done(outcome, &retry);
        if ok {
            // Tell the peer (if it can still hear) that reads of its replica must stop.
            let req = Control::ReplicaStale { name: name.into() }.encode();
            let _ = self.peer_control(&req);
        }
        ok || !m.degrade_pending()
    }

    /// A replica in sync keeps no peer bitmap of its own (one left from when this node owned
    /// the volume, or from a discarded split brain).
    pub(super) fn drop_replica_bitmap(&self, name: &str) {
        let Some(t) = self.served_volume(name) else {
            return;
        };
        if let Err(e) = t.drop_peer_bitmap() {
            tracing::warn!(volume = name, "dropping this replica's old bitmap: {e}");
        }
    }

    /// The control link came up: replicas learn again whether etcd records them stale.
    pub(super) fn refresh_stale(&self) {
        let Some((cluster, me)) = self.this_node() else {
            return;
        };
        let stale: Vec<(String, Arc<std::sync::atomic::AtomicBool>)> = self
            .pair_volumes
            .stale
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, flag) in stale {
            let problem = self
                .pair_volumes
                .generation_problems
                .lock()
                .contains_key(&name);
            if let Ok(r) = cluster.replica_record(&name, &me) {
                flag.store(r.is_some() || problem, std::sync::atomic::Ordering::Release);
            }
        }
    }

    /// The volume left this node's service (offline or deleted): the link no longer writes it.
    /// Serves pair volume `name` as etcd records it now, on the volume already open: the
    /// role its connections go through changes under them (`PairTarget`), they stay connected.
    /// `volume move` on the old owner (fenced, holding the whole volume) and on the new one
    /// (`became_owner`). The old role's registrations go: a mirror (its activity log
    /// abandoned: nothing is in flight) or a replica (its place for the peer's frames).
    pub(super) fn switch_role(&self, name: &str) -> Result<(), NodeError> {
        let pt = self.pair_volumes.targets.lock().get(name).cloned();
        let (Some(pt), Some(target)) = (pt, self.served_volume(name)) else {
            return Err(NodeError::NotFound(format!(
                "pair volume {name:?} is not served here"
            )));
        };
        let local = self.pair_record(name)?.ok_or_else(|| {
            NodeError::NotFound(format!("volume {name:?} has no pair record here"))
        })?;
        let old = self.pair_volumes.mirrors.lock().remove(name);
        self.forget_replica(name);
        let served = self.pair_target(name, &target, &local);
        if let Some(old) = old {
            old.abandon("the volume moved to the other node");
        }
        pt.set_role(served?.target());
        Ok(())
    }

    pub(super) fn forget_pair_volume(&self, name: &str) {
        self.pair_volumes.targets.lock().remove(name);
        if let Some(m) = self.pair_volumes.mirrors.lock().remove(name) {
            m.abandon("the volume was taken out of service");
        }
        self.forget_replica(name);
    }

    /// Volume `name`'s copy here no longer takes the peer's frames as a replica, and its
    /// stale flag goes with it.
    fn forget_replica(&self, name: &str) {
        self.pair_volumes.stale.lock().remove(name);
        self.pair_volumes
            .replicas
            .write()
            .retain(|_, r| r.name != name);
    }

    /// Creates pair volume `name` on both nodes, owned by this one (see the module doc).
    /// `files`: records to publish beside it (its personality).
    pub(super) fn create_pair_volume(
        &self,
        name: &str,
        image: Option<&str>,
        size: Option<u64>,
        personality: Option<&[u8]>,
    ) -> Result<(), NodeError> {
        let Some((cluster, _)) = self.this_node() else {
            unreachable!("only called on a node of a pair");
        };
        self.require_link()?;
        let size = match (size, image) {
            (Some(s), _) => s,
            (None, Some(i)) => self.pool.image(i)?.info.size.max(1).div_ceil(4096) * 4096,
            (None, None) => return Err(NodeError::Invalid("a blank volume needs --size".into())),
        };
        let generation = super::generations::new_generation();
        let rec = cluster
            .create_volume_record(name, image, size, &generation, false)
            .map_err(|e| match e {
                e @ crate::cluster::ClusterError::VolumeExists { .. } => {
                    NodeError::InUse(e.to_string())
                }
                e => pair_err(e),
            })?;
        let undo_record = || {
            if let Err(e) = cluster.delete_volume_record(name) {
                tracing::error!(volume = name, "removing the unfinished record: {e}");
            }
        };
        let local = PairRecord {
            pair: cluster.config().pair.clone(),
            id: rec.id,
            token: rec.token,
        };
        let local_bytes = serde_json::to_vec(&local).expect("a record serialises");
        let mut files: Vec<(&str, &[u8])> = vec![(PAIR_RECORD, &local_bytes)];
        if let Some(p) = personality {
            files.push(("personality.json", p));
        }
        let mut start = super::generations::start_at(generation);
        if let Err(e) =
            self.pool
                .create_volume_with_files(name, image, Some(size), &files, Some(&mut start))
        {
            undo_record();
            return Err(e.into());
        }
        let req = Control::CreateReplica { name: name.into() }.encode();
        let made = self.peer_control(&req).and_then(|_| match personality {
            // The personality goes with the replica, before the volume is ready.
            Some(p) => self.send_personality(name, rec.id, Some(p)),
            None => Ok(()),
        });
        let done = made.and_then(|_| cluster.set_volume_ready(name, &rec).map_err(pair_err));
        if let Err(e) = done {
            let del = Control::DeleteReplica {
                name: name.into(),
                id: rec.id,
            }
            .encode();
            let _ = self.peer_control(&del);
            if let Err(e) = self.pool.delete_volume(name) {
                tracing::error!(volume = name, "removing the unfinished volume: {e}");
            }
            undo_record();
            return Err(NodeError::Io(format!(
                "creating volume {name:?} on the peer: {e}"
            )));
        }
        Ok(())
    }

    fn require_link(&self) -> Result<(), NodeError> {
        let p = self.pair.lock();
        match p.as_ref().map(|p| p.link_state()) {
            Some(crate::peer::link::LinkState::Up { .. }) => Ok(()),
            Some(crate::peer::link::LinkState::Down { reason, .. }) => {
                Err(NodeError::InUse(format!(
                    "the peer is not reachable ({reason}): a pair volume is made on both nodes"
                )))
            }
            None => Err(NodeError::Invalid("this node is not in a pair".into())),
        }
    }

    pub(super) fn peer_control_pub(&self, req: &[u8]) -> Result<Vec<u8>, NodeError> {
        self.peer_control(req)
    }

    fn peer_control(&self, req: &[u8]) -> Result<Vec<u8>, NodeError> {
        let p = self.pair.lock();
        let link = p
            .as_ref()
            .and_then(|p| p.link())
            .ok_or_else(|| NodeError::Invalid("this node is not in a pair".into()))?;
        link.control(req).map_err(NodeError::Io)
    }

    /// The peer asks for its replica of `name`: made as the etcd record says.
    fn create_replica(&self, name: &str) -> Result<(), NodeError> {
        let _busy = self.busy("volume", name)?;
        let Some((cluster, me)) = self.this_node() else {
            return Err(NodeError::Invalid("this node is not in a pair".into()));
        };
        let rec: VolumeRecord = cluster
            .volume_record(name)
            .map_err(pair_err)?
            .ok_or_else(|| NodeError::NotFound(format!("pair volume {name:?} has no record")))?;
        if rec.owner == me {
            return Err(NodeError::Invalid(format!(
                "this node owns {name:?}: it makes no replica of it for the peer"
            )));
        }
        if let Some(local) = self.pair_record(name).ok().flatten()
            && local.id == rec.id
        {
            return Ok(()); // asked again: made already
        }
        if self.pool.volume(name).is_ok() {
            return Err(NodeError::InUse(format!(
                "this node already has a volume named {name:?}"
            )));
        }
        let _cloning = rec.image.as_deref().map(|i| self.cloning(i)).transpose()?;
        let local = PairRecord {
            pair: cluster.config().pair.clone(),
            id: rec.id,
            token: rec.token,
        };
        let bytes = serde_json::to_vec(&local).expect("a record serialises");
        // Both copies start at the record's generation (a record from before generations has
        // none: the replica keeps the random one it is made with).
        let mut start = match rec.generation.as_str() {
            "" => None,
            g => Some(super::generations::start_at(
                crate::peer::generations::parse(g).map_err(NodeError::Invalid)?,
            )),
        };
        self.pool.create_volume_with_files(
            name,
            rec.image.as_deref(),
            Some(rec.size),
            &[(PAIR_RECORD, &bytes)],
            start
                .as_mut()
                .map(|s| s as &mut dyn FnMut(&mut _) -> Result<(), String>),
        )?;
        if let Err(e) = self.serve_volume(name) {
            let _ = self.pool.delete_volume(name);
            return Err(e);
        }
        tracing::info!(volume = name, id = rec.id, owner = %rec.owner, "replica created");
        Ok(())
    }

    /// The peer undoes (or deletes) pair volume `name`: this node's replica goes.
    fn delete_replica(&self, name: &str, id: u32) -> Result<(), NodeError> {
        match self.pair_record(name) {
            Ok(Some(local)) if local.id == id => {}
            _ => return Ok(()), // not here (or another volume of that name): nothing to do
        }
        let _busy = self.busy("volume", name)?;
        self.offline_volume(name, super::Force::Yes)?;
        self.pool.delete_volume(name)?;
        self.pair_volumes.unserved.lock().remove(name);
        self.pair_volumes.generation_problems.lock().remove(name);
        self.served.lock().broken.remove(name);
        tracing::info!(volume = name, id, "replica deleted");
        Ok(())
    }

    /// Deletes pair volume `name` from the pair: refused on the node that does not own it.
    /// The record goes first (the peer stops serving it as a pair volume), then the local
    /// copy, then the peer's.
    pub(super) fn delete_pair_volume(
        &self,
        name: &str,
        local: &PairRecord,
    ) -> Result<(), NodeError> {
        let Some((cluster, me)) = self.this_node() else {
            return Err(NodeError::Invalid(format!(
                "volume {name:?} belongs to pair {}: start the node with --etcd to delete it",
                local.pair
            )));
        };
        match cluster.volume_record(name).map_err(pair_err)? {
            Some(r) if r.id == local.id && r.owner != me => {
                return Err(NodeError::Invalid(format!(
                    "node {} owns volume {name:?}: delete it there",
                    r.owner
                )));
            }
            Some(r) if r.id == local.id => {
                cluster.delete_volume_record(name).map_err(pair_err)?;
            }
            _ => {} // an orphan: only the local copy goes
        }
        let req = Control::DeleteReplica {
            name: name.into(),
            id: local.id,
        }
        .encode();
        if let Err(e) = self.peer_control(&req) {
            tracing::warn!(
                volume = name,
                "the peer's replica stays (an orphan there): {e}"
            );
        }
        Ok(())
    }

    /// At start, on the pair: records this node made but never finished (a crash during
    /// `volume create`) go, with the local volume they name.
    pub(super) fn finish_interrupted_creates(&self) {
        let Some((cluster, me)) = self.this_node() else {
            return;
        };
        let Ok(records) = cluster.volume_records() else {
            return;
        };
        for (name, rec) in records {
            if rec.owner != me || rec.ready {
                continue;
            }
            if let Ok(Some(local)) = self.pair_record(&name)
                && local.id == rec.id
                && rec.adopted
            {
                // An interrupted adoption: the volume was this pool's before; it stays, a
                // volume of this node alone again (it is tried again later).
                tracing::warn!(volume = %name, "undoing an interrupted adoption into the pair");
                if let Err(e) = self.pool.set_volume_record(&name, PAIR_RECORD, None) {
                    tracing::error!(volume = %name, "{e}");
                    continue;
                }
                let del = Control::DeleteReplica {
                    name: name.clone(),
                    id: rec.id,
                }
                .encode();
                let _ = self.peer_control(&del);
                let _ = cluster.delete_volume_record(&name);
                continue;
            }
            tracing::warn!(volume = %name, "removing a volume whose creation was interrupted");
            if let Ok(Some(local)) = self.pair_record(&name)
                && local.id == rec.id
            {
                let _ = self.offline_volume(&name, super::Force::Yes);
                if let Err(e) = self.pool.delete_volume(&name) {
                    tracing::error!(volume = %name, "{e}");
                    continue;
                }
                self.served.lock().broken.remove(&name);
            }
            let _ = cluster.delete_volume_record(&name);
        }
    }

    /// This node's pair volumes for `pair status`.
    pub(super) fn pair_volume_infos(&self) -> Vec<super::info::PairVolumeInfo> {
        use super::info::PairVolumeInfo;
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        };
        let mut out = Vec::new();
        let problems = self.pair_volumes.generation_problems.lock().clone();
        for (name, m) in self.pair_volumes.mirrors.lock().iter() {
            let bits = m.volume().peer_bitmap().unwrap_or(0);
            let (state, since) = match m.peer_state() {
                PeerState::InSync => ("in_sync", None),
                PeerState::Degrading => ("degrading", None),
                PeerState::Degraded { since } => ("degraded", Some(unix(since))),
                PeerState::Resyncing { since } => ("resyncing", Some(unix(since))),
            };
            let progress = self.pair_volumes.progress.lock().get(name).cloned();
            let problem = problems.get(name);
            out.push(PairVolumeInfo {
                name: name.clone(),
                role: "owner".into(),
                state: problem.map_or(state, |p| p.state).into(),
                since_unix: since,
                out_of_sync_bytes: bits * 4096,
                resync_percent: progress.as_ref().map(|p| {
                    (p.done_bytes * 100)
                        .checked_div(p.total_bytes)
                        .unwrap_or(100)
                        .min(100)
                }),
                resync_eta_secs: progress.and_then(|p| p.eta_secs(bits * 4096)),
                reason: problem
                    .map(|p| p.message.clone())
                    .or_else(|| m.degrade_failure().map(|(_, why)| why))
                    .or_else(|| {
                        let e = self.pair_volumes.compare_errors.lock().get(name).cloned()?;
                        Some(format!("the copies' generations not compared: {e}"))
                    }),
            });
        }
        for (name, stale) in self.pair_volumes.stale.lock().iter() {
            let stale = stale.load(std::sync::atomic::Ordering::Acquire);
            let problem = problems.get(name);
            let state = match problem {
                Some(p) => p.state,
                None if stale => "stale",
                None => "in_sync",
            };
            out.push(PairVolumeInfo {
                name: name.clone(),
                role: "replica".into(),
                state: state.into(),
                since_unix: None,
                out_of_sync_bytes: 0,
                resync_percent: None,
                resync_eta_secs: None,
                reason: problem.map(|p| p.message.clone()),
            });
        }
        for (name, why) in self.pair_volumes.unserved.lock().iter() {
            let state = match problems.get(name) {
                Some(p) if p.state == "split_brain" => "split_brain",
                _ => "not_served",
            };
            out.push(PairVolumeInfo {
                name: name.clone(),
                role: "-".into(),
                state: state.into(),
                since_unix: None,
                out_of_sync_bytes: 0,
                resync_percent: None,
                resync_eta_secs: None,
                reason: Some(why.clone()),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Alerts about pair volumes: copies that differ, copies not served.
    pub(super) fn pair_volume_alerts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, m) in self.pair_volumes.mirrors.lock().iter() {
            if self.pair_volumes.forced.lock().contains(name)
                && !matches!(m.peer_state(), PeerState::InSync)
            {
                out.push(format!(
                    "volume {name}: promoted with --force: writes the other node acknowledged \
                     alone are lost; if it wrote while apart it reports a split brain"
                ));
            }
            if let PeerState::Resyncing { .. } = m.peer_state() {
                let left = m.volume().peer_bitmap().unwrap_or(0) * 4096;
                let p = self.pair_volumes.progress.lock().get(name).cloned();
                let done = p.as_ref().map_or(0, |p| {
                    (p.done_bytes * 100)
                        .checked_div(p.total_bytes)
                        .unwrap_or(100)
                        .min(100)
                });
                let eta = p
                    .and_then(|p| p.eta_secs(left))
                    .map_or("unknown".into(), |s| format!("{s} s"));
                out.push(format!(
                    "volume {name} resyncing: {done}%, {} left, ETA {eta}",
                    indicatif::HumanBytes(left)
                ));
            }
            if let PeerState::Degraded { since } = m.peer_state() {
                let blocks = m.volume().peer_bitmap().unwrap_or(0);
                out.push(format!(
                    "volume {name} degraded since {} s ago: the peer's replica is stale, {} to \
                     resync",
                    since.elapsed().map_or(0, |d| d.as_secs()),
                    indicatif::HumanBytes(blocks * 4096)
                ));
            }
            if let Some((_, why)) = m.degrade_failure() {
                out.push(format!(
                    "volume {name}: writes fail: the peer's replica could not be recorded stale \
                     ({why})"
                ));
            }
            if let Some((_, why)) = m.diverged() {
                out.push(format!(
                    "volume {name}: the replicas may differ ({why}): a write failed here after \
                     the peer took it"
                ));
            }
        }
        let problems = self.pair_volumes.generation_problems.lock().clone();
        for (name, p) in &problems {
            out.push(format!("volume {name}: {}", p.message));
        }
        for (name, why) in self.pair_volumes.unserved.lock().iter() {
            if !problems.contains_key(name) {
                out.push(format!("volume {name} not served: {why}"));
            }
        }
        for (name, stale) in self.pair_volumes.stale.lock().iter() {
            if stale.load(std::sync::atomic::Ordering::Acquire) && !problems.contains_key(name) {
                out.push(format!(
                    "volume {name}: this node's copy is stale (the owner wrote without it): reads \
                     here are refused until the owner resyncs it"
                ));
            }
        }
        for (name, why) in self.pair_volumes.not_adopted.lock().iter() {
            out.push(format!("volume {name} is not mirrored yet: it {why}"));
        }
        out
    }
}
