//! The pair's shared state in etcd (`docs/pair.md` §2): which nodes form the pair, and which of
//! them are up. Only this module speaks to etcd; it runs the client on a runtime thread of its
//! own, so the rest of the node stays synchronous and the I/O threads never wait for etcd.
//!
//! Keys, under `/streamer/PAIR/`:
//! - `members`: the pair's nodes and their peer addresses (JSON, changed by compare-and-swap on
//!   its revision): at most two, and a node's name is its identity for good.
//! - `up/NODE`: the node's presence, on a lease it keeps alive (`--lease` seconds): present while
//!   the node runs, gone within the lease after it dies. Created only if absent, so two
//!   processes can never both be node `NODE`.
//! - `volumes/NAME` and `next_volume_id`: the pair's volumes (`volumes.rs`).

mod volumes;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use volumes::{ReplicaRecord, VolumeRecord};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// How a node joins a pair (`streamer serve --node --pair --etcd --peer-listen`).
#[derive(Debug, Clone)]
pub struct PairConfig {
    pub node: String,
    pub pair: String,
    pub etcd: Vec<String>,
    pub peer_listen: std::net::SocketAddr,
    /// A peer that answers nothing for this long is down (`--peer-timeout`).
    pub peer_timeout: Duration,
    /// The presence lease (`--lease`): a dead node is seen down within it.
    pub lease_ttl: Duration,
    /// Bytes per second a resync may send (`--resync-rate`, 0: no limit).
    pub resync_rate: u64,
}

/// A node of the pair, as `members` records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Where its peer link listens.
    pub peer_addr: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Membership {
    nodes: Vec<Member>,
}

/// A running node's presence record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Presence {
    pub pid: u32,
    pub since_unix: u64,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach etcd at {endpoints}: {source}")]
    Unreachable {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error(
        "pair {pair} already has two nodes ({}); a third cannot join",
        nodes.join(" and ")
    )]
    PairFull { pair: String, nodes: Vec<String> },
    #[error(
        "node {node} of pair {pair} is already running (pid {}, up for {} s); two processes \
         cannot be one node",
        .presence.pid, now_unix().saturating_sub(.presence.since_unix)
    )]
    AlreadyUp {
        node: String,
        pair: String,
        presence: Presence,
    },
    #[error("the pair's record {key} in etcd is not valid: {message}")]
    Corrupt { key: String, message: String },
    #[error("the pair's records in etcd kept changing meanwhile; try again")]
    Contended,
    #[error("pair {pair} already has a volume named {name:?}")]
    VolumeExists { pair: String, name: String },
    #[error("volume {name:?} is no longer this node's (its record in etcd changed)")]
    Deposed { name: String },
    #[error("starting the etcd client's thread: {0}")]
    Runtime(std::io::Error),
}

/// How etcd answered lately (`status` alerts when it does not).
#[derive(Debug, Clone, Default)]
struct Health {
    /// The last failure, and since when etcd has been failing (`None`: answering).
    failing: Option<(String, SystemTime)>,
    /// This node's presence could not be restored after its lease expired (another process
    /// took its name meanwhile): stays until the node restarts.
    presence_lost: Option<String>,
}

/// A node's membership of its pair, held for as long as it runs.
pub struct Cluster {
    cfg: PairConfig,
    rt: tokio::runtime::Runtime,
    client: Client,
    lease: Arc<Mutex<i64>>,
    health: Arc<Mutex<Health>>,
    keepalive: tokio::task::JoinHandle<()>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Cluster {
    fn key(pair: &str, rest: &str) -> String {
        format!("/streamer/{pair}/{rest}")
    }

    /// Joins the pair: records this node among its members (at most two) and its presence on a
    /// lease kept alive from now on. Refused, with the reason, when etcd cannot be reached, the
    /// pair already has two other nodes, or this node is already running elsewhere.
    pub fn join(cfg: PairConfig) -> Result<Cluster, ClusterError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("streamer-etcd")
            .enable_all()
            .build()
            .map_err(ClusterError::Runtime)?;
        // HTTP/2 pings find a dead connection (etcd gone from the network) within seconds.
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let mut client = rt
            .block_on(Client::connect(&cfg.etcd, Some(options)))
            .map_err(|source| ClusterError::Unreachable {
                endpoints: cfg.etcd.join(","),
                source,
            })?;
        let me = Member {
            name: cfg.node.clone(),
            peer_addr: cfg.peer_listen.to_string(),
        };
        // Presence first: only the one process that holds `up/NODE` may change NODE's record
        // (a second process with the same name must not move the first one's address).
        let lease = rt
            .block_on(Self::register(&mut client, &cfg))
            .map_err(|e| unreachable_if_transport(e, &cfg))?;
        if let Err(e) = rt.block_on(Self::add_member(&mut client, &cfg.pair, &me)) {
            let _ = rt.block_on(client.lease_revoke(lease));
            return Err(unreachable_if_transport(e, &cfg));
        }
        let lease = Arc::new(Mutex::new(lease));
        let health = Arc::new(Mutex::new(Health::default()));
        let keepalive = rt.spawn(keep_alive(
            client.clone(),
            cfg.clone(),
            lease.clone(),
            health.clone(),
        ));
        tracing::info!(node = %cfg.node, pair = %cfg.pair, "joined the pair");
        Ok(Cluster {
            cfg,
            rt,
            client,
            lease,
            health,
            keepalive,
        })
    }

    /// Adds `me` to the pair's members (or updates its address), by compare-and-swap.
    async fn add_member(client: &mut Client, pair: &str, me: &Member) -> Result<(), ClusterError> {
        let key = Self::key(pair, "members");
        for _ in 0..8 {
            let (mut m, rev) = Self::members_at(client, pair).await?;
            let full = m.nodes.len() >= 2;
            match m.nodes.iter_mut().find(|n| n.name == me.name) {
                Some(n) if n == me => return Ok(()),
                Some(n) => n.peer_addr = me.peer_addr.clone(),
                None if full => {
                    return Err(ClusterError::PairFull {
                        pair: pair.into(),
                        nodes: m.nodes.iter().map(|n| n.name.clone()).collect(),
                    });
                }
                None => m.nodes.push(me.clone()),
            }
            let value = serde_json::to_vec(&m).expect("membership serialises");
            let guard = if rev == 0 {
                Compare::create_revision(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.clone(), CompareOp::Equal, rev)
            };
            let txn = Txn::new()
                .when([guard])
                .and_then([TxnOp::put(key.clone(), value, None)]);
            if client.txn(txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(ClusterError::Contended)
    }

    /// The members and the revision of their key (0: no key yet).
    async fn members_at(
        client: &mut Client,
        pair: &str,
    ) -> Result<(Membership, i64), ClusterError> {
        let key = Self::key(pair, "members");
        let resp = client.get(key.clone(), None).await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok((Membership::default(), 0));
        };
        let m: Membership =
            serde_json::from_slice(kv.value()).map_err(|e| ClusterError::Corrupt {
                key: key.clone(),
                message: e.to_string(),
            })?;
        Ok((m, kv.mod_revision()))
    }

    /// Grants a lease and creates this node's presence on it, only if no other process holds it.
    async fn register(client: &mut Client, cfg: &PairConfig) -> Result<i64, ClusterError> {
        let ttl = cfg.lease_ttl.as_secs().max(1) as i64;
        let lease = client.lease_grant(ttl, None).await?.id();
        let key = Self::key(&cfg.pair, &format!("up/{}", cfg.node));
        let presence = Presence {
            pid: std::process::id(),
            since_unix: now_unix(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                serde_json::to_vec(&presence).expect("presence serialises"),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            return Ok(lease);
        }
        let _ = client.lease_revoke(lease).await;
        let held = client.get(key.clone(), None).await?;
        let presence = held
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok())
            .unwrap_or(Presence {
                pid: 0,
                since_unix: 0,
                version: "?".into(),
            });
        Err(ClusterError::AlreadyUp {
            node: cfg.node.clone(),
            pair: cfg.pair.clone(),
            presence,
        })
    }

    pub fn config(&self) -> &PairConfig {
        &self.cfg
    }

    /// Every member and, for those up, their presence.
    pub fn nodes(&self) -> Result<Vec<(Member, Option<Presence>)>, ClusterError> {
        let mut client = self.client.clone();
        let pair = self.cfg.pair.clone();
        let result = self.rt.block_on(async move {
            let (m, _) = Self::members_at(&mut client, &pair).await?;
            let up = client
                .get(
                    Self::key(&pair, "up/"),
                    Some(GetOptions::new().with_prefix()),
                )
                .await?;
            let mut out = Vec::new();
            for n in m.nodes {
                let key = Self::key(&pair, &format!("up/{}", n.name));
                let presence = up
                    .kvs()
                    .iter()
                    .find(|kv| kv.key() == key.as_bytes())
                    .and_then(|kv| serde_json::from_slice(kv.value()).ok());
                out.push((n, presence));
            }
            Ok::<_, ClusterError>(out)
        });
        self.note(&result);
        result
    }

    /// The other member of the pair, if one has joined.
    pub fn peer(&self) -> Result<Option<Member>, ClusterError> {
        let mut client = self.client.clone();
        let pair = self.cfg.pair.clone();
        let result = self
            .rt
            .block_on(async move { Self::members_at(&mut client, &pair).await });
        self.note(&result);
        Ok(result?
            .0
            .nodes
            .into_iter()
            .find(|n| n.name != self.cfg.node))
    }

    /// Why etcd is failing and since when, if it is.
    pub fn etcd_failing(&self) -> Option<(String, SystemTime)> {
        self.health.lock().failing.clone()
    }

    /// Why this node no longer holds its presence, if it lost it for good.
    pub fn presence_lost(&self) -> Option<String> {
        self.health.lock().presence_lost.clone()
    }

    fn note<T>(&self, r: &Result<T, ClusterError>) {
        note(&self.health, r.as_ref().err().map(ToString::to_string));
    }

    /// Leaves cleanly: the presence goes at once (the peer sees this node down now, not after
    /// the lease). The runtime stops when the last holder drops it.
    pub fn leave(&self) {
        self.keepalive.abort();
        let mut client = self.client.clone();
        let lease = *self.lease.lock();
        let revoked = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await
        });
        if !matches!(revoked, Ok(Ok(_))) {
            tracing::warn!("could not withdraw this node's presence; it expires with its lease");
        }
    }
}

fn unreachable_if_transport(e: ClusterError, cfg: &PairConfig) -> ClusterError {
    match e {
        ClusterError::Etcd(source) => ClusterError::Unreachable {
            endpoints: cfg.etcd.join(","),
            source,
        },
        other => other,
    }
}

fn note(health: &Mutex<Health>, failure: Option<String>) {
    let mut h = health.lock();
    match failure {
        None => {
            if h.failing.take().is_some() {
                tracing::info!("etcd answers again");
            }
        }
        Some(why) => {
            if h.failing.is_none() {
                tracing::warn!("etcd is failing: {why}");
            }
            let since = h.failing.as_ref().map_or_else(SystemTime::now, |f| f.1);
            h.failing = Some((why, since));
        }
    }
}

/// How a keep-alive stream ended.
enum Ended {
    /// etcd says the lease is gone (it was out of reach for longer than the lease).
    Expired,
    /// The stream closed or went silent (etcd restarted, the connection dropped): the lease
    /// may well be alive; a new stream is opened on it.
    Stream,
}

/// Keeps the presence lease alive, three times per lease. Every answer is awaited at most a
/// period: a silent etcd is noticed then, not when TCP gives up minutes later. A lease that
/// expired is granted again and the presence re-created, unless another process took this
/// node's name meanwhile: then the node says so in every `status` until it restarts.
async fn keep_alive(
    mut client: Client,
    cfg: PairConfig,
    lease: Arc<Mutex<i64>>,
    health: Arc<Mutex<Health>>,
) {
    let period = (cfg.lease_ttl / 3).max(Duration::from_millis(300));
    loop {
        let id = *lease.lock();
        let result = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(id).await?;
            loop {
                keeper.keep_alive().await?;
                match tokio::time::timeout(period, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => note(&health, None),
                    Ok(Ok(Some(_))) => return Ok::<Ended, etcd_client::Error>(Ended::Expired),
                    Ok(Ok(None)) => return Ok(Ended::Stream),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        note(&health, Some("no answer to the lease keep-alive".into()));
                        return Ok(Ended::Stream);
                    }
                }
                tokio::time::sleep(period).await;
            }
        }
        .await;
        match result {
            Ok(Ended::Stream) => {}
            Ok(Ended::Expired) => {
                tracing::warn!("this node's presence lease expired; registering again");
                match Cluster::register(&mut client, &cfg).await {
                    Ok(new) => {
                        *lease.lock() = new;
                        note(&health, None);
                    }
                    Err(e @ ClusterError::AlreadyUp { .. }) => {
                        tracing::error!("this node lost its presence in etcd: {e}");
                        health.lock().presence_lost = Some(e.to_string());
                        return;
                    }
                    Err(e) => {
                        tracing::warn!("registering this node again: {e}");
                        note(&health, Some(e.to_string()));
                    }
                }
            }
            Err(e) => note(&health, Some(e.to_string())),
        }
        tokio::time::sleep(period).await;
    }
}
