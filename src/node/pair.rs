//! The node's side of the pair: its membership (etcd) and its control link, and what
//! `pair status` and the alerts of `status` say about them.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::info::{LinkInfo, PairInfo, PairNodeInfo};
use super::{Node, NodeError};
use crate::cluster::Cluster;
use crate::peer::link::{LinkState, PeerLink};

/// A running pair membership: held by the node until it stops. Dropping it leaves the pair
/// (the link stops, the presence is withdrawn), also when start-up fails after joining, so a
/// failed start never leaves a presence that refuses the next one.
pub struct PairHandle {
    pub cluster: Arc<Cluster>,
    link: Option<PeerLink>,
}

impl PairHandle {
    pub fn new(cluster: Arc<Cluster>, link: PeerLink) -> PairHandle {
        PairHandle {
            cluster,
            link: Some(link),
        }
    }

    pub fn link(&self) -> Option<&PeerLink> {
        self.link.as_ref()
    }

    pub(super) fn link_state(&self) -> LinkState {
        self.link
            .as_ref()
            .map_or(LinkState::stopped(), PeerLink::state)
    }
}

impl Drop for PairHandle {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            link.stop();
        }
        self.cluster.leave();
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Node {
    /// The node joined a pair (`streamer serve --etcd`): the peer link serves this node's
    /// replicas from now on, creations a crash interrupted are undone, and the pair volumes
    /// are served (mirrored where this node owns them).
    pub fn set_pair(self: &Arc<Self>, pair: PairHandle) {
        let _ = self.me.set(Arc::downgrade(self));
        if let Some(link) = pair.link() {
            link.serve_replicas(Arc::new(super::replicas::ReplicaService(Arc::downgrade(
                self,
            ))));
            let weak = Arc::downgrade(self);
            link.on_up(Box::new(move || {
                if let Some(node) = weak.upgrade() {
                    node.refresh_stale();
                }
            }));
        }
        // Before any mirror exists: each takes the degrade thread's sender.
        self.start_degrade_thread();
        self.start_activity_thread();
        *self.pair.lock() = Some(pair);
        self.start_resync_thread();
        self.finish_interrupted_creates();
        let waiting = std::mem::take(&mut *self.pair_volumes.unserved.lock());
        for name in waiting.keys() {
            // The peer may already ask about it (the link is up): one command at a time.
            let Ok(_busy) = self.busy("volume", name) else {
                self.pair_volumes
                    .unserved
                    .lock()
                    .insert(name.clone(), "a command works on it".into());
                continue;
            };
            if let Err(e) = self.serve_volume(name) {
                tracing::error!(volume = %name, "not served: {e}");
                self.pair_volumes
                    .unserved
                    .lock()
                    .insert(name.clone(), e.to_string());
            }
        }
    }

    /// Hands the engine's workers their data links to the peer from now on.
    pub fn start_data_links(&self, workers: usize, attach: crate::peer::link::AttachData) {
        if let Some(link) = self.pair.lock().as_ref().and_then(|p| p.link()) {
            link.start_data_links(workers, attach);
        }
    }

    /// Stops handing data links to the engine (before it shuts down).
    pub fn stop_data_links(&self) {
        if let Some(link) = self.pair.lock().as_ref().and_then(|p| p.link()) {
            link.stop_data_links();
        }
    }

    /// Leaves the pair: the link stops and the node's presence is withdrawn (at shutdown).
    pub fn leave_pair(&self) {
        // Taken out first, dropped after the lock is released: stopping the link joins its
        // threads, which may be asking for the pair (a data link ending refreshes the stale
        // flags).
        let pair = self.pair.lock().take();
        drop(pair);
    }

    pub fn pair_status(&self) -> Result<PairInfo, NodeError> {
        let guard = self.pair.lock();
        let Some(pair) = guard.as_ref() else {
            return Err(NodeError::Invalid(
                "this node is not in a pair (it was started without --etcd)".into(),
            ));
        };
        let cfg = pair.cluster.config();
        let link = match pair.link_state() {
            LinkState::Up { peer, since } => LinkInfo {
                up: true,
                peer: Some(peer),
                reason: None,
                since_unix: unix(since),
            },
            LinkState::Down { reason, since } => LinkInfo {
                up: false,
                peer: None,
                reason: Some(reason),
                since_unix: unix(since),
            },
        };
        let nodes = match pair.cluster.nodes() {
            Ok(list) => list
                .into_iter()
                .map(|(m, presence)| PairNodeInfo {
                    this_node: m.name == cfg.node,
                    up: presence.is_some(),
                    pid: presence.as_ref().map(|p| p.pid),
                    since_unix: presence.as_ref().map(|p| p.since_unix),
                    name: m.name,
                    peer_addr: m.peer_addr,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let failing = pair.cluster.etcd_failing();
        let mut info = PairInfo {
            pair: cfg.pair.clone(),
            node: cfg.node.clone(),
            etcd: cfg.etcd.clone(),
            etcd_error: failing.as_ref().map(|f| f.0.clone()),
            etcd_failing_since_unix: failing.map(|f| unix(f.1)),
            nodes,
            link,
            volumes: Vec::new(),
        };
        drop(guard);
        info.volumes = self.pair_volume_infos();
        Ok(info)
    }

    /// What `status` says about the pair: etcd failing, the peer down, the link down.
    pub(super) fn pair_alerts(&self) -> Vec<String> {
        let guard = self.pair.lock();
        let Some(pair) = guard.as_ref() else {
            return Vec::new();
        };
        let mut alerts = Vec::new();
        if let Some(why) = pair.cluster.presence_lost() {
            alerts.push(format!(
                "this node lost its presence in the pair ({why}): restart it once the other \
                 process is gone"
            ));
        }
        if let Some((why, _)) = pair.cluster.etcd_failing() {
            alerts.push(format!(
                "etcd unreachable ({why}): the pair cannot change state"
            ));
        } else if let Ok(nodes) = pair.cluster.nodes() {
            let me = &pair.cluster.config().node;
            for (m, presence) in &nodes {
                if &m.name != me && presence.is_none() {
                    alerts.push(format!(
                        "peer {} is down: the pair is not redundant",
                        m.name
                    ));
                }
                if &m.name == me
                    && presence
                        .as_ref()
                        .is_none_or(|p| p.pid != std::process::id())
                {
                    alerts.push(
                        "this node's presence is missing from etcd: the peer sees it down".into(),
                    );
                }
            }
            if nodes.iter().all(|(m, _)| &m.name == me) {
                alerts.push(format!(
                    "pair {} has no second node yet: nothing is mirrored",
                    pair.cluster.config().pair
                ));
            }
        }
        if let LinkState::Down { reason, .. } = pair.link_state() {
            alerts.push(format!("peer link down: {reason}"));
        }
        drop(guard);
        alerts.extend(self.pair_volume_alerts());
        alerts
    }
}
