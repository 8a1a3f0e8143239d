//! What the node reports about itself and its objects. The management protocol carries these
//! as they are (their serde form is the wire's); the node knows nothing of the protocol.

use serde::{Deserialize, Serialize};

use crate::target::VolumeCounters;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub name: String,
    pub size: u64,
    /// SHA-256 of the image bytes (what `sha256sum` prints for the raw file).
    pub sha256: String,
    pub id: String,
    /// Disk space the image file takes (it is sparse).
    pub allocated_bytes: u64,
    /// Volumes cloned from it.
    pub volumes: Vec<String>,
    /// Connections reading its `image/NAME` export.
    pub clients: usize,
    /// Why the image cannot be used: its metadata is damaged (set aside when the node
    /// started), or its last `image verify` failed (no clones until one passes).
    #[serde(default)]
    pub damaged: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    /// Disk space of its data and metadata files (what it costs beyond its image).
    pub allocated_bytes: u64,
    pub image: Option<String>,
    pub clients: usize,
    /// Whether it is exported now (a volume is unexported while a command works on it, or when
    /// it failed to open).
    pub served: bool,
    /// Set when the volume latched failed after an I/O error.
    pub failed: Option<String>,
    pub counters: VolumeCounters,
    pub generation: String,
    pub epoch: u64,
    pub commit: u64,
    /// Why the volume is not served: its metadata is damaged (or its image is missing), found
    /// when the node started; `volume delete` removes it.
    #[serde(default)]
    pub damaged: Option<String>,
    /// Its client connections.
    #[serde(default)]
    pub connections: Vec<ClientInfo>,
    /// Its personality (hostname, network, keys), if it has one.
    #[serde(default)]
    pub personality: Option<Box<crate::personality::Personality>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyInfo {
    pub name: String,
    pub ok: bool,
    pub sha256: String,
    pub bad_chunks: Vec<u64>,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckInfo {
    pub volumes: Vec<VolumeCheck>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeCheck {
    pub name: String,
    pub ok: bool,
    pub skipped: Option<String>,
    pub errors: Vec<String>,
    pub notes: Vec<String>,
    pub leaks: u64,
    pub leaked_bytes: u64,
    pub repaired: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusInfo {
    pub version: String,
    pub data_dir: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    pub pool: PoolSpace,
    pub images: usize,
    pub volumes: usize,
    pub exports: Vec<String>,
    pub connections: usize,
    pub alerts: Vec<String>,
    /// Long commands under way (import, capture, verify, check).
    #[serde(default)]
    pub jobs: Vec<JobInfo>,
    /// Every NBD client connection in transmission.
    #[serde(default)]
    pub clients: Vec<ClientInfo>,
}

/// An NBD client connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClientInfo {
    /// `ADDR:PORT`, or `unix` for the Unix socket.
    pub peer: String,
    pub export: String,
    /// Connected since (seconds since the Unix epoch), and for how long.
    pub since_unix: u64,
    pub seconds: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
}

/// A long command under way (`streamer cancel ID` ends it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobInfo {
    pub id: u64,
    /// What runs, as a person would say it (`image import debian-12`).
    pub command: String,
    /// Who asked for it.
    pub uid: u32,
    pub seconds: u64,
    pub done_bytes: u64,
    /// `None` while the total is not known (an import from a pipe).
    pub total_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolSpace {
    /// Size and free space of the file system holding the pool.
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// Disk space taken by images and volumes.
    pub used_bytes: u64,
}

/// The pair a node belongs to (`streamer pair status`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PairInfo {
    pub pair: String,
    /// This node.
    pub node: String,
    pub etcd: Vec<String>,
    /// Set while etcd does not answer: why, and since when (seconds since the epoch).
    pub etcd_error: Option<String>,
    pub etcd_failing_since_unix: Option<u64>,
    /// The pair's nodes; empty while etcd does not answer.
    pub nodes: Vec<PairNodeInfo>,
    pub link: LinkInfo,
    /// This node's pair volumes.
    #[serde(default)]
    pub volumes: Vec<PairVolumeInfo>,
}

/// A pair volume as this node serves it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PairVolumeInfo {
    pub name: String,
    /// `owner` (this node orders its writes) or `replica`.
    pub role: String,
    /// Owner: `in_sync`, `degrading`, `degraded`, `resyncing`. Replica: `in_sync` or `stale`.
    /// `not_served` (with `reason`): an orphan, a split brain.
    pub state: String,
    /// Since when the state holds (seconds since the epoch), where known.
    pub since_unix: Option<u64>,
    /// Owner: bytes the peer's copy lacks (the bitmap's blocks).
    pub out_of_sync_bytes: u64,
    /// Resyncing: percent done and seconds left at the rate so far.
    pub resync_percent: Option<u64>,
    pub resync_eta_secs: Option<u64>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PairNodeInfo {
    pub name: String,
    /// Where its peer link listens.
    pub peer_addr: String,
    /// Its presence is in etcd (it runs and keeps its lease alive).
    pub up: bool,
    pub this_node: bool,
    pub pid: Option<u32>,
    pub since_unix: Option<u64>,
}

/// The peer link as this node sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkInfo {
    pub up: bool,
    /// The peer it is connected to (when up).
    pub peer: Option<String>,
    /// Why it is down (when down).
    pub reason: Option<String>,
    /// Up or down since (seconds since the epoch).
    pub since_unix: u64,
}

/// An IP pool and what is handed out of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IpPoolInfo {
    #[serde(flatten)]
    pub pool: crate::personality::ippool::IpPool,
    /// Addresses in the range.
    pub size: u64,
    /// Addresses of the range held by volumes' personalities, with the volume.
    pub held: Vec<HeldAddress>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeldAddress {
    pub address: std::net::IpAddr,
    pub volume: String,
}
