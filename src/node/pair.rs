//! The node's side of the pair: its membership (etcd) and its control link, and what
//! `pair status` and the alerts of `status` say about them.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::info::{LinkInfo, PairInfo, PairNodeInfo};
use super::{Node, NodeError};
use crate::cluster::Cluster;
use crate::peer::link::{LinkState, PeerLink};

/// A running pair membership: held by the node until it stops.
pub struct PairHandle {
    pub cluster: Arc<Cluster>,
    pub link: PeerLink,
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Node {
    /// The node joined a pair (`streamer serve --etcd`).
    pub fn set_pair(&self, pair: PairHandle) {
        *self.pair.lock() = Some(pair);
    }

    /// Leaves the pair: the link stops and the node's presence is withdrawn (at shutdown).
    pub fn leave_pair(&self) {
        let Some(pair) = self.pair.lock().take() else {
            return;
        };
        pair.link.stop();
        match Arc::try_unwrap(pair.cluster) {
            Ok(c) => c.leave(),
            Err(_) => tracing::warn!("the pair's etcd client is still in use; not withdrawn"),
        }
    }

    pub fn pair_status(&self) -> Result<PairInfo, NodeError> {
        let guard = self.pair.lock();
        let Some(pair) = guard.as_ref() else {
            return Err(NodeError::Invalid(
                "this node is not in a pair (it was started without --etcd)".into(),
            ));
        };
        let cfg = pair.cluster.config();
        let link = match pair.link.state() {
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
        Ok(PairInfo {
            pair: cfg.pair.clone(),
            node: cfg.node.clone(),
            etcd: cfg.etcd.clone(),
            etcd_error: failing.as_ref().map(|f| f.0.clone()),
            etcd_failing_since_unix: failing.map(|f| unix(f.1)),
            nodes,
            link,
        })
    }

    /// What `status` says about the pair: etcd failing, the peer down, the link down.
    pub(super) fn pair_alerts(&self) -> Vec<String> {
        let guard = self.pair.lock();
        let Some(pair) = guard.as_ref() else {
            return Vec::new();
        };
        let mut alerts = Vec::new();
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
            }
            if nodes.iter().all(|(m, _)| &m.name == me) {
                alerts.push(format!(
                    "pair {} has no second node yet: nothing is mirrored",
                    pair.cluster.config().pair
                ));
            }
        }
        if let LinkState::Down { reason, .. } = pair.link.state() {
            alerts.push(format!("peer link down: {reason}"));
        }
        alerts
    }
}
