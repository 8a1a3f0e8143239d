//! Volumes' personalities (issue 22): set, replaced or removed as a whole, validated, and never
//! two volumes with one address.

use std::io::Write;
use std::sync::Arc;

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::info::{HeldAddress, IpPoolInfo};
use super::{Node, NodeError, SEED_EXPORT_PREFIX};
use crate::personality::ippool::{IpPool, POOL_REF};
use crate::personality::{Personality, cidata, seed};
use crate::target::{BlockTarget, Export, FileTarget};

/// Largest personality record (compact JSON): its seed must fit the seed's file system with
/// room to spare.
const MAX_RECORD_BYTES: usize = 64 << 10;

/// A personality checked and completed for storing: its record and its NoCloud documents
/// (their seed image is built when it is served: a plan of thousands of servers must not hold
/// a megabyte per server while it is checked).
pub(super) struct Prepared {
    pub record: Vec<u8>,
    pub docs: crate::personality::NoCloud,
}

/// A golden image's bytes read as a disk.
struct FileDisk {
    file: std::fs::File,
    len: u64,
}

impl cidata::Disk for FileDisk {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }
}

/// A volume read as a disk (to find its `CIDATA` partition).
struct VolumeDisk<'a>(&'a mut volume_format::Volume<volume_format::FileStorage>);

impl cidata::Disk for VolumeDisk<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, buf).map_err(std::io::Error::other)
    }
}

/// Writes `docs` into the volume's `CIDATA` partition, if it has one: only the blocks that
/// change (`personality::cidata`). Unflushed: the caller flushes.
pub(super) fn write_seed_into(
    v: &mut volume_format::Volume<volume_format::FileStorage>,
    docs: &crate::personality::NoCloud,
) -> Result<(), String> {
    let Some((p, blocks)) = cidata::seed_blocks(&mut VolumeDisk(v), docs)? else {
        return Ok(());
    };
    tracing::debug!(how = %p.how, blocks = blocks.len(), "seed written into the volume");
    for (at, b) in blocks {
        v.write(at, &b)
            .map_err(|e| format!("writing the seed into {}: {e}", p.how))?;
    }
    Ok(())
}

impl Node {
    /// Volume `name`'s personality, if it has a readable one (a record that cannot be read is
    /// reported by `set_personality`, which is what replaces it).
    pub(super) fn personality_of(&self, name: &str) -> Option<Personality> {
        let bytes = self.pool.personality(name).ok()??;
        match serde_json::from_slice(&bytes) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(volume = name, "unreadable personality record: {e}");
                None
            }
        }
    }

    /// Gives volume `name` this personality (or none). Validated again here (the request is
    /// outside input), its addresses checked against every other volume's, and a new instance
    /// id set, so the server's first-boot tools run again; stored atomically with the volume.
    pub fn set_personality(
        &self,
        name: &str,
        personality: Option<Box<Personality>>,
    ) -> Result<super::info::VolumeInfo, NodeError> {
        let _busy = self.busy("volume", name)?;
        let _one_at_a_time = self.personalities.lock();
        self.pool.volume(name)?;
        self.personality_changes_here(name)?;
        match personality {
            None => {
                self.pool.set_personality(name, None)?;
                self.withdraw_seed(name);
            }
            Some(p) => {
                let prepared = self.prepare_personality(name, *p)?;
                self.store_personality(name, prepared)?;
            }
        }
        self.share_personality(name);
        self.volume_info(name)
    }

    /// Stores a prepared personality for existing volume `name` (the caller holds it busy and
    /// the personalities' lock): the seed inside the volume if its image has a `CIDATA`
    /// partition, then the record, then the seed export.
    ///
    /// The volume's seed is rewritten with the volume offline, so it is refused, before
    /// anything changes, while a server uses the volume. It is written and flushed before the
    /// record is stored: a failure or a crash between them leaves the old record, so the
    /// change is not done and running it again (the same plan, the same `--set`) does it.
    pub(super) fn store_personality(&self, name: &str, p: Prepared) -> Result<(), NodeError> {
        let inside = self.cidata_of_volume(name)?;
        if let Some(why) = self.seed_rewrite_refusal(name, inside.as_deref()) {
            return Err(NodeError::InUse(why));
        }
        if inside.is_some() {
            self.offline_volume(name, super::Force::No)?;
            let written = self
                .pool
                .open_volume(name)
                .map_err(NodeError::from)
                .and_then(|mut v| {
                    write_seed_into(&mut v, &p.docs).map_err(NodeError::Io)?;
                    v.flush()
                        .and_then(|()| v.close().map(drop))
                        .map_err(|e| NodeError::Io(format!("volume {name:?}: {e}")))
                });
            let served = self.serve_volume(name);
            written?;
            served?;
        }
        self.pool.set_personality(name, Some(&p.record))?;
        // The new seed replaces the old in one step: a server attaching now finds one.
        self.serve_docs(name, &p.docs)
    }

    /// Why the seed inside volume `name` (its image's `CIDATA` partition, `inside`) cannot be
    /// rewritten now: a server uses the volume.
    pub(super) fn seed_rewrite_refusal(&self, name: &str, inside: Option<&str>) -> Option<String> {
        let how = inside?;
        let clients = self
            .served
            .lock()
            .volumes
            .get(name)
            .map_or(0, |t| t.clients());
        (clients > 0).then(|| {
            format!(
                "volume {name:?} has {clients} connected client(s): its seed ({how} of its \
                 image) cannot be rewritten while a server uses it; stop the server first"
            )
        })
    }

    /// How the `CIDATA` partition of volume `name`'s image is known, if it has one and the
    /// volume is a single node's (a pair volume's copies must stay equal: not yet).
    pub(super) fn cidata_of_volume(&self, name: &str) -> Result<Option<String>, NodeError> {
        let Some(image) = self.pool.volume(name)?.image else {
            return Ok(None);
        };
        if self.pair_record(name)?.is_some() {
            return Ok(None);
        }
        self.cidata_of_image(&image)
    }

    /// How the `CIDATA` partition of image `name` is known, if it has one.
    pub(super) fn cidata_of_image(&self, name: &str) -> Result<Option<String>, NodeError> {
        let file = self.pool.open_image_raw(name)?;
        let mut disk = FileDisk {
            len: file
                .metadata()
                .map_err(|e| NodeError::Io(e.to_string()))?
                .len(),
            file,
        };
        cidata::find(&mut disk)
            .map(|p| p.map(|p| p.how))
            .map_err(|e| NodeError::Invalid(format!("image {name:?}: {e}")))
    }

    /// Checks `p` for volume `name` (again: the request is outside input), refuses an address
    /// another volume holds, hands out its pool addresses, and gives it a new instance id. The
    /// caller holds the personalities' lock until the result is stored.
    pub(super) fn prepare_personality(
        &self,
        name: &str,
        p: Personality,
    ) -> Result<Prepared, NodeError> {
        let held = self.held_addresses()?;
        let pools = self.load_ip_pools()?;
        seal(resolve(name, p, &held, &pools)?)
    }

    /// Builds `p`'s seed and exports it (at start, from the stored record).
    pub(super) fn serve_seed_of(&self, name: &str, p: &Personality) -> Result<(), NodeError> {
        self.serve_docs(name, &p.nocloud())
    }

    /// Builds the seed of `docs` and exports it as `seed/NAME`.
    pub(super) fn serve_docs(
        &self,
        name: &str,
        docs: &crate::personality::NoCloud,
    ) -> Result<(), NodeError> {
        let bytes = seed::image(docs)
            .map_err(|e| NodeError::Io(format!("building volume {name:?}'s seed: {e}")))?;
        self.serve_seed(name, bytes)
    }

    /// Exports a NoCloud seed as `seed/NAME`, replacing the one before in one step: kept in
    /// memory (a sealed memfd; it is derived data, made again from the record at every start)
    /// and served read-only.
    pub(super) fn serve_seed(&self, name: &str, bytes: Vec<u8>) -> Result<(), NodeError> {
        let io = |e: std::io::Error| NodeError::Io(format!("building volume {name:?}'s seed: {e}"));
        let memfd = |flags| rustix::fs::memfd_create(format!("streamer-seed-{name}"), flags);
        let base = rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING;
        // Not executable (kernels from 6.3 warn without it; older ones refuse the flag).
        let fd = memfd(base | rustix::fs::MemfdFlags::NOEXEC_SEAL)
            .or_else(|_| memfd(base))
            .map_err(|e| io(e.into()))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&bytes).map_err(io)?;
        // Sealed: nobody, the node included, can change a seed a server may be reading.
        rustix::fs::fcntl_add_seals(
            &file,
            rustix::fs::SealFlags::SHRINK
                | rustix::fs::SealFlags::GROW
                | rustix::fs::SealFlags::WRITE
                | rustix::fs::SealFlags::SEAL,
        )
        .map_err(|e| io(e.into()))?;
        let shown = std::path::PathBuf::from(format!("(seed of volume {name})"));
        let target = Arc::new(FileTarget::from_files(file, None, &shown, true).map_err(io)?);
        let export = format!("{SEED_EXPORT_PREFIX}{name}");
        self.exports.replace(Export {
            name: export,
            description: format!("cloud-init NoCloud seed of volume {name} (read-only)"),
            target: target.clone() as Arc<dyn BlockTarget>,
            max_payload_bytes: self.limits.max_payload_bytes,
        });
        self.served.lock().seeds.insert(name.to_owned(), target);
        Ok(())
    }

    /// Withdraws `seed/NAME` from new connections. A server reading it keeps the seed it
    /// attached (a consistent one) until it disconnects; new connections get the new one.
    pub(super) fn withdraw_seed(&self, name: &str) {
        if self.served.lock().seeds.remove(name).is_some() {
            self.exports.remove(&format!("{SEED_EXPORT_PREFIX}{name}"));
        }
    }

    /// Every address held by a volume's personality, with the volume, damaged volumes
    /// included. Fails closed: a record that cannot be read is an error naming its volume, not
    /// an address set free while a server may still use it.
    pub(super) fn held_addresses(&self) -> Result<Vec<(String, IpAddr)>, NodeError> {
        let mut names: Vec<String> = self.pool.volumes().into_iter().map(|v| v.name).collect();
        names.extend(
            self.pool
                .damaged()
                .into_iter()
                .filter(|(kind, _, _)| *kind == "volume")
                .map(|(_, n, _)| n),
        );
        let mut out = Vec::new();
        for name in names {
            let unreadable = |why: String| {
                NodeError::Io(format!(
                    "volume {name:?}'s personality record cannot be read ({why}): the addresses \
                     it holds are unknown, so none are handed out until it is fixed or the \
                     volume deleted"
                ))
            };
            let Some(bytes) = self
                .pool
                .personality_record(&name)
                .map_err(|e| unreadable(e.to_string()))?
            else {
                continue;
            };
            let p: Personality =
                serde_json::from_slice(&bytes).map_err(|e| unreadable(e.to_string()))?;
            out.extend(p.addresses().into_iter().map(|a| (name.clone(), a)));
        }
        Ok(out)
    }

    pub(super) fn load_ip_pools(&self) -> Result<Vec<IpPool>, NodeError> {
        let mut out = Vec::new();
        for (name, bytes) in self.pool.ip_pools()? {
            let p: IpPool = serde_json::from_slice(&bytes).map_err(|e| {
                NodeError::Io(format!("IP pool {name:?}'s record is unreadable: {e}"))
            })?;
            out.push(p);
        }
        Ok(out)
    }

    fn ip_pool_info(&self, pool: IpPool, held: &[(String, IpAddr)]) -> IpPoolInfo {
        let in_range: Vec<HeldAddress> = held
            .iter()
            .filter(|(_, a)| pool.in_range(*a))
            .map(|(v, a)| HeldAddress {
                address: *a,
                volume: v.clone(),
            })
            .collect();
        IpPoolInfo {
            size: u64::try_from(pool.size()).unwrap_or(u64::MAX),
            held: in_range,
            pool,
        }
    }

    pub fn ip_pools(&self) -> Result<Vec<IpPoolInfo>, NodeError> {
        let _one_at_a_time = self.personalities.lock();
        let held = self.held_addresses()?;
        Ok(self
            .load_ip_pools()?
            .into_iter()
            .map(|p| self.ip_pool_info(p, &held))
            .collect())
    }

    pub fn create_ip_pool(&self, pool: IpPool) -> Result<IpPoolInfo, NodeError> {
        pool.validate()
            .map_err(|e| NodeError::Invalid(format!("IP pool: {e}")))?;
        let _one_at_a_time = self.personalities.lock();
        let record = serde_json::to_vec_pretty(&pool).expect("a pool serialises");
        self.pool.create_ip_pool(&pool.name, &record)?;
        Ok(self.ip_pool_info(pool, &self.held_addresses()?))
    }

    /// Deletes IP pool `name`; refused while a volume holds one of its addresses.
    pub fn delete_ip_pool(&self, name: &str) -> Result<(), NodeError> {
        let _one_at_a_time = self.personalities.lock();
        let Some(pool) = self.load_ip_pools()?.into_iter().find(|p| p.name == name) else {
            return Err(NodeError::NotFound(format!("no IP pool {name:?}")));
        };
        let info = self.ip_pool_info(pool, &self.held_addresses()?);
        if let Some(h) = info.held.first() {
            return Err(NodeError::InUse(format!(
                "IP pool {name:?} has {} address(es) held (volume {:?} holds {}); change those \
                 personalities first",
                info.held.len(),
                h.volume,
                h.address
            )));
        }
        Ok(self.pool.delete_ip_pool(name)?)
    }
}

/// `p` checked for volume `name` against the addresses `held` by volumes (this one's own
/// included: a changed personality keeps its pool addresses, and adding a key must not
/// renumber the server), its `pool:NAME` addresses handed out from `pools`. No instance id yet.
pub(super) fn resolve(
    name: &str,
    mut p: Personality,
    held: &[(String, IpAddr)],
    pools: &[IpPool],
) -> Result<Personality, NodeError> {
    p.validate()
        .map_err(|e| NodeError::Invalid(format!("personality: {e}")))?;
    // Every other volume's addresses: none may be taken twice, and pools hand out only what
    // none of them holds.
    let mut taken: BTreeSet<IpAddr> = BTreeSet::new();
    let mine: BTreeSet<IpAddr> = p.addresses().into_iter().collect();
    let own: Vec<IpAddr> = held
        .iter()
        .filter(|(v, _)| v == name)
        .map(|(_, a)| *a)
        .collect();
    for (other, theirs) in held.iter().filter(|(v, _)| v != name) {
        if mine.contains(theirs) {
            return Err(NodeError::Invalid(format!(
                "personality: {theirs} is already the address of volume {other:?}"
            )));
        }
        taken.insert(*theirs);
    }
    taken.extend(mine);
    hand_out(&mut p, &mut taken, &own, pools)?;
    p.validate()
        .map_err(|e| NodeError::Invalid(format!("personality: {e}")))?;
    Ok(p)
}

/// A resolved personality made ready to store: a new instance id (so the server's first-boot
/// tools run again), its record and its seed.
pub(super) fn seal(mut p: Personality) -> Result<Prepared, NodeError> {
    p.instance_id = format!("i-{}", volume_format::image::hex(&crate::pool::random_id()));
    let record = serde_json::to_vec(&p).expect("a personality serialises");
    if record.len() > MAX_RECORD_BYTES {
        return Err(NodeError::Invalid(format!(
            "personality: {} bytes, more than the {MAX_RECORD_BYTES} a personality may take",
            record.len()
        )));
    }
    // The seed always fits: the documents are a few times the record's 64 KiB at most, and the
    // seed's file system holds 1 MiB.
    Ok(Prepared {
        record,
        docs: p.nocloud(),
    })
}

/// Replaces each `pool:NAME` address of `p` with the pool's next free address (lowest
/// first), and gives the link the pool's gateway and name servers where it names none.
fn hand_out(
    p: &mut Personality,
    taken: &mut BTreeSet<IpAddr>,
    own: &[IpAddr],
    pools: &[IpPool],
) -> Result<(), NodeError> {
    for (field, link) in p.links_mut() {
        for (i, a) in link.addresses.iter_mut().enumerate() {
            let Some(pool_name) = a.strip_prefix(POOL_REF) else {
                continue;
            };
            let f = format!("{field}.addresses[{i}]");
            let Some(pool) = pools.iter().find(|x| x.name == pool_name) else {
                return Err(NodeError::Invalid(format!(
                    "personality: {f}: there is no IP pool {pool_name:?}"
                )));
            };
            // An address of this pool the volume holds already comes first.
            let kept = own
                .iter()
                .find(|ip| pool.in_range(**ip) && !taken.contains(ip))
                .map(|ip| format!("{ip}/{}", pool.net().1));
            let Some(addr) = kept.or_else(|| pool.next_free(taken)) else {
                return Err(NodeError::Invalid(format!(
                    "personality: {f}: IP pool {pool_name:?} has no free address (all {} \
                     are held)",
                    pool.size()
                )));
            };
            let ip = crate::personality::validate_cidr(&addr).expect("the pool's own form");
            taken.insert(ip);
            *a = addr;
            if link.gateway.is_none() {
                link.gateway = pool.gateway;
            }
            if link.dns.is_none() && !pool.dns.is_empty() {
                link.dns = Some(pool.dns.clone());
            }
        }
    }
    Ok(())
}

// ---- personalities of pair volumes -------------------------------------------------------

impl Node {
    /// Sends pair volume `name`'s personality record (or its absence) to the peer's replica.
    pub(super) fn send_personality(
        &self,
        name: &str,
        id: u32,
        record: Option<&[u8]>,
    ) -> Result<(), NodeError> {
        let record = record
            .map(|r| String::from_utf8(r.to_vec()))
            .transpose()
            .map_err(|_| {
                NodeError::Io(format!("volume {name:?}'s personality record is not text"))
            })?;
        let req = crate::peer::control::ControlRequest::SetPersonality {
            name: name.to_owned(),
            id,
            record,
        }
        .try_encode()
        .map_err(|e| NodeError::Invalid(format!("volume {name:?}'s personality: {e}")))?;
        self.peer_control_pub(&req).map(drop)
    }

    /// After this node changed the personality of volume `name`: if it is a pair volume this
    /// node owns, the peer's replica gets it too; if the peer cannot be told now, it is told by
    /// the resync thread once the link is up (`share_personalities`).
    pub(super) fn share_personality(&self, name: &str) {
        let Ok(Some(local)) = self.pair_record(name) else {
            return;
        };
        if !self.pair_volumes.mirrors.lock().contains_key(name) {
            return; // not the owner: the owner's record is the one that counts
        }
        let record = match self.pool.personality_record(name) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(volume = name, "personality not sent to the peer: {e}");
                return;
            }
        };
        if let Err(e) = self.send_personality(name, local.id, record.as_deref()) {
            tracing::warn!(volume = name, "personality not sent to the peer yet: {e}");
            self.pair_volumes
                .personality_pending
                .lock()
                .insert(name.to_owned());
        }
    }

    /// Whether the peer may change this node's copy of pair volume `name`: it is volume `id`
    /// here, and this node does not own it (else `why_not`).
    pub(super) fn peer_may_change(
        &self,
        name: &str,
        id: u32,
        why_not: &str,
    ) -> Result<(), NodeError> {
        let local = self
            .pair_record(name)?
            .ok_or_else(|| NodeError::NotFound(format!("no pair volume {name:?} here")))?;
        if local.id != id {
            return Err(NodeError::Invalid(format!(
                "volume {name:?} here is pair volume {}, not {id}",
                local.id
            )));
        }
        if self.pair_volumes.mirrors.lock().contains_key(name) {
            return Err(NodeError::InUse(format!(
                "this node owns volume {name:?}: {why_not}"
            )));
        }
        Ok(())
    }

    /// Refused when `name` is a pair volume the peer owns: its owner's record is the one both
    /// nodes keep.
    pub(super) fn personality_changes_here(&self, name: &str) -> Result<(), NodeError> {
        if self.pair_record(name)?.is_some() && !self.pair_volumes.mirrors.lock().contains_key(name)
        {
            return Err(NodeError::InUse(format!(
                "volume {name:?} is a pair volume this node does not own: change its \
                 personality on its owner (`streamer pair status` names it), which sends it here"
            )));
        }
        Ok(())
    }

    /// Sends the personalities the peer may have missed (resync thread, link up).
    pub(super) fn share_personalities(&self) {
        let pending: Vec<String> =
            std::mem::take(&mut *self.pair_volumes.personality_pending.lock())
                .into_iter()
                .collect();
        for name in pending {
            self.share_personality(&name);
        }
    }

    /// Every volume this node owns is sent again (the link came up: the peer may have been
    /// away, or replaced).
    pub(super) fn personalities_pending_all(&self) {
        let owned: Vec<String> = self.pair_volumes.mirrors.lock().keys().cloned().collect();
        self.pair_volumes.personality_pending.lock().extend(owned);
    }

    /// The owner of pair volume `name` sends its personality record: kept beside this node's
    /// replica (checked like any outside input), its seed exported here too.
    pub(super) fn set_replica_personality(
        &self,
        name: &str,
        id: u32,
        record: Option<&str>,
    ) -> Result<(), NodeError> {
        self.peer_may_change(name, id, "its personality is changed here")?;
        let _one_at_a_time = self.personalities.lock();
        match record {
            None => {
                self.pool.set_personality(name, None)?;
                self.withdraw_seed(name);
            }
            Some(text) => {
                let p: Personality = serde_json::from_str(text)
                    .map_err(|e| NodeError::Invalid(format!("personality: {e}")))?;
                p.validate()
                    .map_err(|e| NodeError::Invalid(format!("personality: {e}")))?;
                if text.len() > MAX_RECORD_BYTES {
                    return Err(NodeError::Invalid("personality: too large".into()));
                }
                self.pool.set_personality(name, Some(text.as_bytes()))?;
                self.serve_seed_of(name, &p)?;
            }
        }
        tracing::info!(volume = name, "personality from the owner kept");
        Ok(())
    }
}
