//! Volumes' personalities (issue 22): set, replaced or removed as a whole, validated, and never
//! two volumes with one address.

use std::io::Write;
use std::sync::Arc;

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::info::{HeldAddress, IpPoolInfo};
use super::{Node, NodeError, SEED_EXPORT_PREFIX};
use crate::personality::ippool::{IpPool, POOL_REF};
use crate::personality::{Personality, seed};
use crate::target::{BlockTarget, Export, FileTarget};

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
        let record = match personality {
            None => None,
            Some(mut p) => {
                p.validate()
                    .map_err(|e| NodeError::Invalid(format!("personality: {e}")))?;
                // Every other volume's addresses: none may be taken twice, and pools hand out
                // only what none of them holds.
                let mut taken: BTreeSet<IpAddr> = BTreeSet::new();
                let mine: BTreeSet<IpAddr> = p.addresses().into_iter().collect();
                for (other, theirs) in self.held_addresses(Some(name)) {
                    if mine.contains(&theirs) {
                        return Err(NodeError::Invalid(format!(
                            "personality: {theirs} is already the address of volume {other:?}"
                        )));
                    }
                    taken.insert(theirs);
                }
                taken.extend(mine);
                self.hand_out(&mut p, &mut taken)?;
                p.validate()
                    .map_err(|e| NodeError::Invalid(format!("personality: {e}")))?;
                p.instance_id =
                    format!("i-{}", volume_format::image::hex(&crate::pool::random_id()));
                Some(serde_json::to_vec_pretty(&p).expect("a personality serialises"))
            }
        };
        self.pool.set_personality(name, record.as_deref())?;
        self.withdraw_seed(name);
        if let Some(bytes) = &record {
            let p: Personality = serde_json::from_slice(bytes).expect("just serialised");
            self.serve_seed(name, &p)?;
        }
        self.volume_info(name)
    }

    /// Exports `p`'s NoCloud seed as `seed/NAME`: built in memory (a sealed memfd; it is
    /// derived data, made again from the record at every start) and served read-only.
    pub(super) fn serve_seed(&self, name: &str, p: &Personality) -> Result<(), NodeError> {
        let io = |e: std::io::Error| NodeError::Io(format!("building volume {name:?}'s seed: {e}"));
        let bytes = seed::image(&p.nocloud()).map_err(io)?;
        let fd = rustix::fs::memfd_create(
            format!("streamer-seed-{name}"),
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
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
        self.exports
            .add(Export {
                name: export.clone(),
                description: format!("cloud-init NoCloud seed of volume {name} (read-only)"),
                target: target.clone() as Arc<dyn BlockTarget>,
                max_payload_bytes: self.limits.max_payload_bytes,
            })
            .map_err(|_| NodeError::InUse(format!("an export named {export:?} already exists")))?;
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

    /// Every address held by a volume's personality, with the volume (but `except`'s).
    fn held_addresses(&self, except: Option<&str>) -> Vec<(String, IpAddr)> {
        let mut out = Vec::new();
        for v in self.pool.volumes() {
            if Some(v.name.as_str()) == except {
                continue;
            }
            if let Some(p) = self.personality_of(&v.name) {
                out.extend(p.addresses().into_iter().map(|a| (v.name.clone(), a)));
            }
        }
        out
    }

    /// Replaces each `pool:NAME` address of `p` with the pool's next free address (lowest
    /// first), and gives the link the pool's gateway and name servers where it names none.
    fn hand_out(&self, p: &mut Personality, taken: &mut BTreeSet<IpAddr>) -> Result<(), NodeError> {
        let pools = self.load_ip_pools()?;
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
                let Some(addr) = pool.next_free(taken) else {
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

    fn load_ip_pools(&self) -> Result<Vec<IpPool>, NodeError> {
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
        let taken: BTreeSet<IpAddr> = held.iter().map(|(_, a)| *a).collect();
        let in_range: Vec<HeldAddress> = held
            .iter()
            .filter(|(_, a)| pool.used(&BTreeSet::from([*a])) == 1)
            .map(|(v, a)| HeldAddress {
                address: *a,
                volume: v.clone(),
            })
            .collect();
        debug_assert_eq!(in_range.len(), pool.used(&taken));
        IpPoolInfo {
            size: u64::try_from(pool.size()).unwrap_or(u64::MAX),
            held: in_range,
            pool,
        }
    }

    pub fn ip_pools(&self) -> Result<Vec<IpPoolInfo>, NodeError> {
        let _one_at_a_time = self.personalities.lock();
        let held = self.held_addresses(None);
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
        Ok(self.ip_pool_info(pool, &self.held_addresses(None)))
    }

    /// Deletes IP pool `name`; refused while a volume holds one of its addresses.
    pub fn delete_ip_pool(&self, name: &str) -> Result<(), NodeError> {
        let _one_at_a_time = self.personalities.lock();
        let Some(pool) = self.load_ip_pools()?.into_iter().find(|p| p.name == name) else {
            return Err(NodeError::NotFound(format!("no IP pool {name:?}")));
        };
        let info = self.ip_pool_info(pool, &self.held_addresses(None));
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
