//! A node with an existing pool joins a pair (`docs/pair.md` §1): its golden images go to the
//! peer (`images.rs`), and each of its volumes becomes a pair volume, owned by this node and
//! copied to the peer.
//!
//! A volume is adopted once the peer holds its image and no client is connected to it (its
//! export is replaced, and the engine's connections keep the target they opened): its etcd
//! record (owner this node), its `pair.json`, the peer's replica (a clone of the same image),
//! the peer recorded stale **whole**, the record ready; then it is served as a mirror with a
//! full bitmap and resynced comparing checksums first, so only its own blocks travel (thin:
//! blocks still inherited from the image are equal on both and stay inherited on the peer).
//! Until adopted, a volume is served as before, unmirrored, and `status` says so.

use super::{Force, Node, NodeError};
use crate::peer::control::ControlRequest;
use crate::pool::PAIR_RECORD;

impl Node {
    /// The resync thread's look: adopts the local volumes that are not pair volumes yet.
    pub(super) fn adopt_volumes(&self) {
        let Some((cluster, _)) = self.this_node() else {
            return;
        };
        let Ok(Some(peer)) = cluster.peer() else {
            return;
        };
        for v in self.pool.volumes() {
            if !matches!(self.pair_record(&v.name), Ok(None)) {
                continue;
            }
            let ready = match &v.image {
                None => true,
                Some(i) => {
                    let mine = self.image_info(i).ok().map(|x| x.sha256);
                    let theirs = cluster.image_record(i, &peer.name).ok().flatten();
                    mine.is_some() && mine == theirs
                }
            };
            let clients = self
                .served
                .lock()
                .volumes
                .get(&v.name)
                .map_or(0, |t| t.clients());
            let why = if !ready {
                Some(format!("waits for node {} to hold its image", peer.name))
            } else if clients > 0 {
                Some(format!(
                    "has {clients} client(s): it joins the pair once they disconnect"
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.pair_volumes
                    .not_adopted
                    .lock()
                    .insert(v.name.clone(), why);
                continue;
            }
            match self.adopt(&v.name, v.image.as_deref(), v.size) {
                Ok(()) => {
                    self.pair_volumes.not_adopted.lock().remove(&v.name);
                    tracing::info!(volume = %v.name, "joined the pair: copied to the peer now");
                }
                Err(e) => {
                    tracing::warn!(volume = %v.name, "not mirrored yet: {e}");
                    self.pair_volumes
                        .not_adopted
                        .lock()
                        .insert(v.name.clone(), e.to_string());
                }
            }
        }
    }

    fn adopt(&self, name: &str, image: Option<&str>, size: u64) -> Result<(), NodeError> {
        let _busy = self.busy("volume", name)?;
        let (cluster, _) = self
            .this_node()
            .ok_or_else(|| NodeError::Invalid("this node is not in a pair".into()))?;
        let etcd = |e: crate::cluster::ClusterError| NodeError::Io(e.to_string());
        // The peer's replica starts at this copy's generation (it is behind it, whole).
        let generation = self.local_generations(name)?.current;
        let rec = cluster
            .create_volume_record(name, image, size, &generation, true)
            .map_err(etcd)?;
        let undo = || {
            let _ = cluster.delete_volume_record(name);
        };
        let local = super::replicas::PairRecord {
            pair: cluster.config().pair.clone(),
            id: rec.id,
            token: rec.token,
        };
        let bytes = serde_json::to_vec(&local).expect("a record serialises");
        if let Err(e) = self.pool.set_volume_record(name, PAIR_RECORD, Some(&bytes)) {
            undo();
            return Err(e.into());
        }
        let undo_local = || {
            let _ = self.pool.set_volume_record(name, PAIR_RECORD, None);
            undo();
        };
        let create = ControlRequest::CreateReplica { name: name.into() }.encode();
        let generation = self
            .served
            .lock()
            .volumes
            .get(name)
            .map(|t| t.generation())
            .unwrap_or_default();
        let made = self
            .peer_control_pub(&create)
            .and_then(|_| {
                cluster
                    .mark_replica_stale(name, &rec, &generation, true, false)
                    .map_err(etcd)
            })
            .and_then(|()| cluster.set_volume_ready(name, &rec).map_err(etcd));
        if let Err(e) = made {
            let del = ControlRequest::DeleteReplica {
                name: name.into(),
                id: rec.id,
            }
            .encode();
            let _ = self.peer_control_pub(&del);
            undo_local();
            return Err(e);
        }
        // Served again as a pair volume: a mirror with a full bitmap (the peer is stale). It
        // had no client a moment ago; one that connected since is disconnected.
        self.offline_volume(name, Force::Yes)?;
        self.serve_volume(name)
    }
}
