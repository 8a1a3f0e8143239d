//! The pair's volume records in etcd (`docs/pair.md` §2): `volumes/NAME` holds the volume's id
//! in the pair, its owner and fencing token, and what it was made from. Every change is a
//! transaction guarded by the key's revision, so two nodes can never both create a name, take
//! the same id, or both take ownership.

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use super::{Cluster, ClusterError};

/// A volume of the pair, as etcd records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    /// The volume's id in the pair: data frames name the replica by it.
    pub id: u32,
    /// The node that orders the volume's writes.
    pub owner: String,
    /// The fencing token: rises with every change of owner.
    pub token: u64,
    pub image: Option<String>,
    pub size: u64,
    /// False while it is being created: set once both replicas exist.
    pub ready: bool,
    /// The generation (hex) both copies start from (`peer/generations.rs`); empty in records
    /// made before generations were kept (left out of the JSON then, so those records keep
    /// their bytes, which every guarded change compares).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub generation: String,
    /// Made by a pool joining the pair (`node/adopt.rs`): the owner's volume existed before
    /// its record, so an interrupted adoption is undone without deleting it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
}

/// The counter the next volume id comes from.
const NEXT_ID: &str = "next_volume_id";

impl Cluster {
    fn volume_key(&self, name: &str) -> String {
        Self::key(&self.cfg.pair, &format!("volumes/{name}"))
    }

    fn decode_record(key: &str, value: &[u8]) -> Result<VolumeRecord, ClusterError> {
        serde_json::from_slice(value).map_err(|e| ClusterError::Corrupt {
            key: key.to_owned(),
            message: e.to_string(),
        })
    }

    /// Records a new volume owned by this node (`ready: false`), with the next free id and
    /// token 1, whose copies start at `generation`. Refused when the pair already has a volume
    /// of that name.
    pub fn create_volume_record(
        &self,
        name: &str,
        image: Option<&str>,
        size: u64,
        generation: &crate::peer::generations::Generation,
        adopted: bool,
    ) -> Result<VolumeRecord, ClusterError> {
        let generation = volume_format::image::hex(generation);
        let key = self.volume_key(name);
        let counter = Self::key(&self.cfg.pair, NEXT_ID);
        let mut client = self.client.clone();
        let owner = self.cfg.node.clone();
        let pair = self.cfg.pair.clone();
        let image = image.map(str::to_owned);
        let name = name.to_owned();
        let result = self.rt.block_on(async move {
            for _ in 0..16 {
                let c = client.get(counter.clone(), None).await?;
                let (next, rev) = match c.kvs().first() {
                    Some(kv) => {
                        let n: u32 = std::str::from_utf8(kv.value())
                            .ok()
                            .and_then(|s| s.parse().ok())
                            .ok_or_else(|| ClusterError::Corrupt {
                                key: counter.clone(),
                                message: "not a number".into(),
                            })?;
                        (n, kv.mod_revision())
                    }
                    None => (1, 0),
                };
                let rec = VolumeRecord {
                    id: next,
                    owner: owner.clone(),
                    token: 1,
                    image: image.clone(),
                    size,
                    ready: false,
                    generation: generation.clone(),
                    adopted,
                };
                let counter_guard = if rev == 0 {
                    Compare::create_revision(counter.clone(), CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(counter.clone(), CompareOp::Equal, rev)
                };
                let txn = Txn::new()
                    .when([
                        counter_guard,
                        Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    ])
                    .and_then([
                        TxnOp::put(counter.clone(), (next + 1).to_string(), None),
                        TxnOp::put(
                            key.clone(),
                            serde_json::to_vec(&rec).expect("a record serialises"),
                            None,
                        ),
                    ]);
                if client.txn(txn).await?.succeeded() {
                    return Ok(rec);
                }
                if !client.get(key.clone(), None).await?.kvs().is_empty() {
                    return Err(ClusterError::VolumeExists {
                        pair: pair.clone(),
                        name: name.clone(),
                    });
                }
            }
            Err(ClusterError::Contended)
        });
        self.note(&result);
        result
    }

    /// Marks a volume's record ready (both replicas exist), unless it changed meanwhile.
    pub fn set_volume_ready(&self, name: &str, rec: &VolumeRecord) -> Result<(), ClusterError> {
        let key = self.volume_key(name);
        let mut client = self.client.clone();
        let expected = serde_json::to_vec(rec).expect("a record serialises");
        let ready = serde_json::to_vec(&VolumeRecord {
            ready: true,
            ..rec.clone()
        })
        .expect("a record serialises");
        let result = self.rt.block_on(async move {
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, expected)])
                .and_then([TxnOp::put(key.clone(), ready, None)]);
            if client.txn(txn).await?.succeeded() {
                Ok(())
            } else {
                Err(ClusterError::Contended)
            }
        });
        self.note(&result);
        result
    }

    pub fn volume_record(&self, name: &str) -> Result<Option<VolumeRecord>, ClusterError> {
        let key = self.volume_key(name);
        let mut client = self.client.clone();
        let result = self.rt.block_on(async move {
            let r = client.get(key.clone(), None).await?;
            r.kvs()
                .first()
                .map(|kv| Self::decode_record(&key, kv.value()))
                .transpose()
        });
        self.note(&result);
        result
    }

    /// Every volume record of the pair, by name.
    pub fn volume_records(&self) -> Result<BTreeMap<String, VolumeRecord>, ClusterError> {
        let prefix = self.volume_key("");
        let mut client: Client = self.client.clone();
        let result = self.rt.block_on(async move {
            let r = client
                .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await?;
            let mut out = BTreeMap::new();
            for kv in r.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let name = key[prefix.len()..].to_owned();
                out.insert(name, Self::decode_record(&key, kv.value())?);
            }
            Ok(out)
        });
        self.note(&result);
        result
    }

    /// Removes a volume's record (it is gone from the pair).
    pub fn delete_volume_record(&self, name: &str) -> Result<(), ClusterError> {
        let key = self.volume_key(name);
        self.delete_key(key)
    }
}

/// A replica's state, as etcd records it (`replicas/NAME/NODE`); no record means in sync.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// `stale`: it missed writes since `since_unix` (the owner acknowledged them alone).
    pub state: String,
    /// The owner's generation when the replica went stale (hex).
    pub generation: String,
    pub since_unix: u64,
    /// The owner that recorded it, and its fencing token then.
    pub by: String,
    pub token: u64,
    /// The whole replica must be copied (its node was the owner when it was given up on: what
    /// it wrote last may be nowhere else).
    #[serde(default)]
    pub full: bool,
    /// Recorded by a forced promotion: its node may hold writes it acknowledged alone.
    #[serde(default)]
    pub forced: bool,
    /// Recorded by `volume resolve`: this copy's changes are discarded (its node drops its
    /// bitmap and its generation), and the owner resyncs it whole.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discard: bool,
    /// The resync compares checksums before it sends (the bitmap names blocks the peer may
    /// already hold equal: the owner's activity log after its crash).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compare: bool,
    /// The owner asked this copy to adopt its generation (a resync is ending): until the
    /// record goes, the owner's bitmap may count from a generation the peer already holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopting: bool,
}

impl Cluster {
    fn replica_key(&self, name: &str, node: &str) -> String {
        Self::key(&self.cfg.pair, &format!("replicas/{name}/{node}"))
    }

    /// Replica `node` of volume `name`: `None` when in sync (no record).
    pub fn replica_record(
        &self,
        name: &str,
        node: &str,
    ) -> Result<Option<ReplicaRecord>, ClusterError> {
        let key = self.replica_key(name, node);
        let mut client = self.client.clone();
        let result = self.rt.block_on(async move {
            let r = client.get(key.clone(), None).await?;
            r.kvs()
                .first()
                .map(|kv| {
                    serde_json::from_slice(kv.value()).map_err(|e| ClusterError::Corrupt {
                        key: key.clone(),
                        message: e.to_string(),
                    })
                })
                .transpose()
        });
        self.note(&result);
        result
    }

    /// Records the peer's replica of `name` stale, only while the volume's record is still
    /// `owned` (this node the owner, with that token): a deposed owner cannot. The write the
    /// owner then acknowledges alone is known to be missing on the peer before it is
    /// acknowledged (`docs/pair.md` §4).
    pub fn mark_replica_stale(
        &self,
        name: &str,
        owned: &VolumeRecord,
        generation: &str,
        full: bool,
        compare: bool,
    ) -> Result<(), ClusterError> {
        let peer = self
            .peer()?
            .map(|m| m.name)
            .ok_or(ClusterError::Contended)?;
        let vkey = self.volume_key(name);
        let rkey = self.replica_key(name, &peer);
        let expected = serde_json::to_vec(owned).expect("a record serialises");
        let rec = ReplicaRecord {
            state: "stale".into(),
            generation: generation.into(),
            since_unix: super::now_unix(),
            by: self.cfg.node.clone(),
            token: owned.token,
            full,
            forced: false,
            discard: false,
            compare,
            adopting: false,
        };
        let value = serde_json::to_vec(&rec).expect("a record serialises");
        let mut client = self.client.clone();
        let result = self.rt.block_on(async move {
            // An existing stale record stays (its time and generation are the first miss).
            let txn = Txn::new()
                .when([
                    Compare::value(vkey.clone(), CompareOp::Equal, expected),
                    Compare::create_revision(rkey.clone(), CompareOp::Equal, 0),
                ])
                .and_then([TxnOp::put(rkey.clone(), value, None)])
                .or_else([
                    TxnOp::get(vkey.clone(), None),
                    TxnOp::get(rkey.clone(), None),
                ]);
            let r = client.txn(txn).await?;
            if r.succeeded() {
                return Ok(());
            }
            // Failed: either the replica was already stale (fine, if the volume is still ours)
            // or the volume changed owner.
            let now = client.get(vkey.clone(), None).await?;
            let still_ours = now
                .kvs()
                .first()
                .is_some_and(|kv| kv.value() == serde_json::to_vec(owned).expect("serialises"));
            let stale = !client.get(rkey.clone(), None).await?.kvs().is_empty();
            if still_ours && stale {
                Ok(())
            } else {
                Err(ClusterError::Deposed {
                    name: name.to_owned(),
                })
            }
        });
        self.note(&result);
        result
    }
}

impl Cluster {
    /// Removes the peer's stale record of `name` (the resync made its replica equal), only while
    /// the volume's record is still `owned`.
    pub fn mark_replica_in_sync(
        &self,
        name: &str,
        owned: &VolumeRecord,
    ) -> Result<(), ClusterError> {
        let peer = self
            .peer()?
            .map(|m| m.name)
            .ok_or(ClusterError::Contended)?;
        let vkey = self.volume_key(name);
        let rkey = self.replica_key(name, &peer);
        let expected = serde_json::to_vec(owned).expect("a record serialises");
        let mut client = self.client.clone();
        let result = self.rt.block_on(async move {
            let txn = Txn::new()
                .when([Compare::value(vkey, CompareOp::Equal, expected)])
                .and_then([TxnOp::delete(rkey, None)]);
            if client.txn(txn).await?.succeeded() {
                Ok(())
            } else {
                Err(ClusterError::Deposed {
                    name: name.to_owned(),
                })
            }
        });
        self.note(&result);
        result
    }
}

impl Cluster {
    /// Makes this node the owner of `name` with the next fencing token, only while the record
    /// is still `current` and, unless `force`, this node's replica is not recorded stale. The
    /// old owner's replica is recorded stale (whole: what it wrote last may not be here), and
    /// this node's stale record, if forced past, goes.
    pub fn promote_record(
        &self,
        name: &str,
        current: &VolumeRecord,
        force: bool,
    ) -> Result<VolumeRecord, ClusterError> {
        let me = self.cfg.node.clone();
        let vkey = self.volume_key(name);
        let mine = self.replica_key(name, &me);
        let theirs = self.replica_key(name, &current.owner);
        let promoted = VolumeRecord {
            owner: me.clone(),
            token: current.token + 1,
            ..current.clone()
        };
        let stale = ReplicaRecord {
            state: "stale".into(),
            generation: String::new(),
            since_unix: super::now_unix(),
            by: me,
            token: promoted.token,
            full: true,
            forced: force,
            discard: false,
            compare: false,
            adopting: false,
        };
        let expected = serde_json::to_vec(current).expect("a record serialises");
        let mut guards = vec![Compare::value(vkey.clone(), CompareOp::Equal, expected)];
        if !force {
            guards.push(Compare::create_revision(mine.clone(), CompareOp::Equal, 0));
        }
        let txn = Txn::new().when(guards).and_then([
            TxnOp::put(
                vkey,
                serde_json::to_vec(&promoted).expect("a record serialises"),
                None,
            ),
            TxnOp::put(
                theirs,
                serde_json::to_vec(&stale).expect("a record serialises"),
                None,
            ),
            TxnOp::delete(mine, None),
        ]);
        let mut client = self.client.clone();
        let result = self.rt.block_on(async move {
            if client.txn(txn).await?.succeeded() {
                Ok(promoted)
            } else {
                Err(ClusterError::Contended)
            }
        });
        self.note(&result);
        result
    }
}

impl Cluster {
    /// `volume resolve NAME --keep KEEP` (`docs/pair.md` §6): node `loser`'s copy of `name` is
    /// recorded stale with its changes to be discarded, and `keep` is made the owner if it is
    /// not (with the next fencing token; its own stale record goes). One transaction, guarded
    /// by the volume record being still `current`: this is the moment the decision is made;
    /// each node then acts on the records (the loser drops its bitmap and generation, the
    /// owner resyncs it whole).
    pub fn resolve_record(
        &self,
        name: &str,
        current: &VolumeRecord,
        keep: &str,
        loser: &str,
    ) -> Result<VolumeRecord, ClusterError> {
        let resolved = if current.owner == keep {
            current.clone()
        } else {
            VolumeRecord {
                owner: keep.to_owned(),
                token: current.token + 1,
                ..current.clone()
            }
        };
        let vkey = self.volume_key(name);
        let lkey = self.replica_key(name, loser);
        let kkey = self.replica_key(name, keep);
        let forced = self.replica_record(name, loser)?.is_some_and(|r| r.forced);
        let discarded = ReplicaRecord {
            state: "stale".into(),
            generation: String::new(),
            since_unix: super::now_unix(),
            by: keep.to_owned(),
            token: resolved.token,
            full: false,
            forced,
            discard: true,
            compare: false,
            adopting: false,
        };
        let expected = serde_json::to_vec(current).expect("a record serialises");
        let mut client = self.client.clone();
        let result = self.rt.block_on(async move {
            // Also guarded by the keeper's own replica record as read now: two resolves with
            // opposite choices (each writing the other's record discarded) cannot both win,
            // even when one leaves the volume record's bytes as they were.
            let keeper = client.get(kkey.clone(), None).await?;
            let keeper_guard = match keeper.kvs().first() {
                Some(kv) => {
                    Compare::mod_revision(kkey.clone(), CompareOp::Equal, kv.mod_revision())
                }
                None => Compare::create_revision(kkey.clone(), CompareOp::Equal, 0),
            };
            let txn = Txn::new()
                .when([
                    Compare::value(vkey.clone(), CompareOp::Equal, expected),
                    keeper_guard,
                ])
                .and_then([
                    TxnOp::put(
                        vkey,
                        serde_json::to_vec(&resolved).expect("a record serialises"),
                        None,
                    ),
                    TxnOp::put(
                        lkey,
                        serde_json::to_vec(&discarded).expect("a record serialises"),
                        None,
                    ),
                    TxnOp::delete(kkey, None),
                ]);
            if client.txn(txn).await?.succeeded() {
                Ok(resolved)
            } else {
                Err(ClusterError::Contended)
            }
        });
        self.note(&result);
        result
    }
}

impl Cluster {
    /// Marks the peer's stale record of `name` whole (every block to be compared and resent),
    /// while the volume's record is still `owned`.
    pub fn mark_replica_full(&self, name: &str, owned: &VolumeRecord) -> Result<(), ClusterError> {
        self.change_replica_record(name, owned, |r| std::mem::replace(&mut r.full, true))
    }

    /// Marks the peer's stale record of `name` compared (the resync compares checksums before
    /// it sends), while the volume's record is still `owned`.
    pub fn mark_replica_compare(
        &self,
        name: &str,
        owned: &VolumeRecord,
    ) -> Result<(), ClusterError> {
        self.change_replica_record(name, owned, |r| std::mem::replace(&mut r.compare, true))
    }

    /// Notes in the peer's stale record of `name` that it is asked to adopt the owner's
    /// generation, while the volume's record is still `owned`.
    pub fn mark_replica_adopting(
        &self,
        name: &str,
        owned: &VolumeRecord,
    ) -> Result<(), ClusterError> {
        self.change_replica_record(name, owned, |r| std::mem::replace(&mut r.adopting, true))
    }

    /// Applies `change` to the peer's stale record of `name` (none: nothing to do), while the
    /// volume's record is still `owned`. `change` says whether the record already was so.
    fn change_replica_record(
        &self,
        name: &str,
        owned: &VolumeRecord,
        change: impl FnOnce(&mut ReplicaRecord) -> bool,
    ) -> Result<(), ClusterError> {
        let peer = self
            .peer()?
            .map(|m| m.name)
            .ok_or(ClusterError::Contended)?;
        let Some(mut rec) = self.replica_record(name, &peer)? else {
            return Ok(());
        };
        if change(&mut rec) {
            return Ok(());
        }
        let vkey = self.volume_key(name);
        let rkey = self.replica_key(name, &peer);
        let expected = serde_json::to_vec(owned).expect("a record serialises");
        let value = serde_json::to_vec(&rec).expect("a record serialises");
        let mut client = self.client.clone();
        let result = self.rt.block_on(async move {
            let txn = Txn::new()
                .when([Compare::value(vkey, CompareOp::Equal, expected)])
                .and_then([TxnOp::put(rkey, value, None)]);
            if client.txn(txn).await?.succeeded() {
                Ok(())
            } else {
                Err(ClusterError::Deposed {
                    name: name.to_owned(),
                })
            }
        });
        self.note(&result);
        result
    }
}

impl Cluster {
    fn image_key(&self, name: &str, node: &str) -> String {
        Self::key(&self.cfg.pair, &format!("images/{name}/{node}"))
    }

    /// Records that `node` holds image `name` with this digest (hex).
    pub fn put_image_record(&self, name: &str, sha256: &str) -> Result<(), ClusterError> {
        let key = self.image_key(name, &self.cfg.node);
        let value = serde_json::to_vec(&serde_json::json!({ "sha256": sha256 }))
            .expect("a record serialises");
        self.put_key(key, value)
    }

    /// This node no longer holds image `name`.
    pub fn delete_image_record(&self, name: &str) -> Result<(), ClusterError> {
        let key = self.image_key(name, &self.cfg.node);
        self.delete_key(key)
    }

    /// The digest (hex) `node`'s copy of image `name` has, if it holds one.
    pub fn image_record(&self, name: &str, node: &str) -> Result<Option<String>, ClusterError> {
        let key = self.image_key(name, node);
        let mut client = self.client.clone();
        let result = self.rt.block_on(async move {
            let r = client.get(key.clone(), None).await?;
            Ok(r.kvs().first().and_then(|kv| {
                serde_json::from_slice::<serde_json::Value>(kv.value())
                    .ok()?
                    .get("sha256")?
                    .as_str()
                    .map(str::to_owned)
            }))
        });
        self.note(&result);
        result
    }
}

impl Cluster {
    /// Records that image `name` (this digest) was deleted from the pair: a node that holds it
    /// still (it was away) deletes its copy rather than send it back.
    pub fn put_image_tombstone(&self, name: &str, sha256: &str) -> Result<(), ClusterError> {
        let key = self.image_key(name, "_deleted");
        let value = serde_json::to_vec(&serde_json::json!({ "sha256": sha256 }))
            .expect("a record serialises");
        self.put_key(key, value)
    }

    /// The digest of the image of that name deleted from the pair, if any.
    pub fn image_tombstone(&self, name: &str) -> Result<Option<String>, ClusterError> {
        self.image_record(name, "_deleted")
    }

    /// An image of that name is imported again: the tombstone goes.
    pub fn delete_image_tombstone(&self, name: &str) -> Result<(), ClusterError> {
        let key = self.image_key(name, "_deleted");
        self.delete_key(key)
    }
}

impl Cluster {
    /// Hands volume `name` to node `to` with the next fencing token, while the record is still
    /// `current` and the peer's replica is in sync (no stale record).
    /// Records pair volume `name` as `size` bytes, if its record is still `current` and the
    /// other node's copy is not recorded stale (both copies grew).
    pub fn resize_record(
        &self,
        name: &str,
        current: &VolumeRecord,
        other: &str,
        size: u64,
    ) -> Result<VolumeRecord, ClusterError> {
        let grown = VolumeRecord {
            size,
            ..current.clone()
        };
        self.replace_record_in_sync(name, current, other, grown)
    }

    pub fn move_record(
        &self,
        name: &str,
        current: &VolumeRecord,
        to: &str,
    ) -> Result<VolumeRecord, ClusterError> {
        let moved = VolumeRecord {
            owner: to.to_owned(),
            token: current.token + 1,
            ..current.clone()
        };
        self.replace_record_in_sync(name, current, to, moved)
    }

    /// Replaces volume `name`'s record by `new` if it is still `current` and node `other`'s
    /// copy is not recorded stale (its replica record is absent).
    fn replace_record_in_sync(
        &self,
        name: &str,
        current: &VolumeRecord,
        other: &str,
        new: VolumeRecord,
    ) -> Result<VolumeRecord, ClusterError> {
        let vkey = self.volume_key(name);
        let theirs = self.replica_key(name, other);
        let expected = serde_json::to_vec(current).expect("a record serialises");
        let txn = Txn::new()
            .when([
                Compare::value(vkey.clone(), CompareOp::Equal, expected),
                Compare::create_revision(theirs, CompareOp::Equal, 0),
            ])
            .and_then([TxnOp::put(
                vkey,
                serde_json::to_vec(&new).expect("a record serialises"),
                None,
            )]);
        let mut client = self.client.clone();
        let result = self.rt.block_on(async move {
            if client.txn(txn).await?.succeeded() {
                Ok(new)
            } else {
                Err(ClusterError::Contended)
            }
        });
        self.note(&result);
        result
    }
}

impl Cluster {
    /// Puts `value` at `key` (no guard: records only this node writes).
    fn put_key(&self, key: String, value: Vec<u8>) -> Result<(), ClusterError> {
        let mut client = self.client.clone();
        let result = self
            .rt
            .block_on(async move { client.put(key, value, None).await.map(|_| ()) })
            .map_err(ClusterError::from);
        self.note(&result);
        result
    }

    fn delete_key(&self, key: String) -> Result<(), ClusterError> {
        let mut client = self.client.clone();
        let result = self
            .rt
            .block_on(async move { client.delete(key, None).await.map(|_| ()) })
            .map_err(ClusterError::from);
        self.note(&result);
        result
    }
}
