//! A node: the pool, the exports it serves, and every management operation on them.
//!
//! The node keeps the pool's objects and the NBD exports in step: every volume is exported under
//! its name and every golden image read-only as `image/NAME`. An operation that needs a volume
//! closed (delete, capture, check) takes it offline first: the export is withdrawn, the open
//! volume commits and closes, the pool does its work on the closed files, and the volume is
//! opened and exported again (unless it was deleted). Two commands on one object exclude each
//! other (the second is told the object is busy); commands on different objects run at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use volume_format::VolumeError;

use crate::names::validate_name;
use crate::pool::{Expect, ImportSource, Pool, PoolError};
use info::{
    CheckInfo, ClientInfo, ImageInfo, PoolSpace, StatusInfo, VerifyInfo, VolumeCheck, VolumeInfo,
};

mod adopt;
mod deploy;
mod generations;
mod images;
pub mod info;
mod jobs;
mod pace;
mod pair;
mod personality;
mod promote;
mod replicas;
mod resync;
mod verify;
use crate::target::{
    BlockTarget, Committers, Export, Exports, FileTarget, VolumeCounters, VolumeTarget,
};
pub use deploy::{DeployAction, DeployOutcome, DeployReport};
pub use jobs::{Job, JobGuard, Jobs, Liveness, Refused};
use pace::Pacer;
pub use pair::PairHandle;

/// Export name prefix of golden images.
pub const IMAGE_EXPORT_PREFIX: &str = "image/";
/// Export name prefix of personalities' NoCloud seeds.
pub const SEED_EXPORT_PREFIX: &str = "seed/";

/// How long a withdrawn export's clients get to be disconnected.
const DISCONNECT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Io(String),
    /// A long command ended early (`streamer cancel`, or its client went away).
    #[error("{0}")]
    Cancelled(String),
}

#[derive(Default)]
struct Served {
    volumes: BTreeMap<String, Arc<VolumeTarget>>,
    images: BTreeMap<String, Arc<FileTarget>>,
    /// Each personality's NoCloud seed, exported read-only as `seed/NAME`.
    seeds: BTreeMap<String, Arc<FileTarget>>,
    /// Volumes that could not be opened, with the reason (shown as alerts).
    broken: BTreeMap<String, String>,
    /// Images whose bytes could not be opened (a symbolic link in the pool), with the reason.
    broken_images: BTreeMap<String, String>,
    /// Leaked space given back at start-up, one line per volume (shown as alerts until the
    /// next start: the operator should know the node did not stop cleanly).
    reclaimed: Vec<String>,
}

pub struct Node {
    pool: Pool,
    exports: Arc<Exports>,
    committers: Arc<Committers>,
    served: Mutex<Served>,
    busy: Mutex<BTreeSet<String>>,
    /// Clones being created from each image right now (taken under `busy`'s lock): an image
    /// cannot be deleted meanwhile, though many clones of it may be created at once.
    cloning: Mutex<HashMap<String, usize>>,
    limits: NodeLimits,
    started: Instant,
    /// Long commands under way.
    pub jobs: Jobs,
    /// The pair this node belongs to, when started with `--etcd`.
    pair: Mutex<Option<pair::PairHandle>>,
    /// Held while a personality changes: its addresses are checked against every other
    /// volume's, so two changes must not check at once.
    personalities: Mutex<()>,
    /// The pair's volumes as this node serves them (empty on a single node).
    pair_volumes: replicas::PairVolumes,
    /// This node, for what outlives a call (the replicas' token records); set with the pair.
    me: std::sync::OnceLock<std::sync::Weak<Node>>,
    /// Volumes that were open when the node last stopped uncleanly: writes of those it owned
    /// may have been in flight to one copy and not the other (`replicas.rs`); taken when the
    /// volume is first served as its owner.
    crashed_volumes: Mutex<BTreeSet<String>>,
}

/// What the node's exports and commands may use.
#[derive(Debug, Clone, Copy)]
pub struct NodeLimits {
    /// Largest request payload an export advertises.
    pub max_payload_bytes: u32,
    /// Bytes per second bulk commands may stream while clients do I/O (0: unpaced).
    pub bulk_rate: u64,
    /// Longest an import's pipe or socket may send nothing before the import is given up.
    pub import_idle: Duration,
    /// Clean block map pages a served volume keeps in memory (see `Volume::open_with_cache`).
    pub map_cache_pages: usize,
    /// Create the pool directory if it does not exist.
    pub create_pool: bool,
}

/// Whether a command that takes a volume offline disconnects its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Force {
    /// It refuses while clients are connected (capture, check).
    No,
    /// It refuses, and says `--force` would disconnect them (volume delete).
    Offered,
    /// It disconnects them (volume delete --force).
    Yes,
}

/// Marks an object busy for the life of one command.
struct Busy<'a> {
    node: &'a Node,
    key: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.node.busy.lock().remove(&self.key);
    }
}

/// A clone of `image` being created (see `Node::cloning`).
struct Cloning<'a> {
    node: &'a Node,
    image: String,
}

impl Drop for Cloning<'_> {
    fn drop(&mut self) {
        let mut c = self.node.cloning.lock();
        if let Some(n) = c.get_mut(&self.image) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.image);
            }
        }
    }
}

impl Node {
    /// Opens the pool in `dir` and exports every volume and image in it. A volume that fails to
    /// open is left unexported and reported as an alert; the rest are served.
    pub fn open(
        dir: &Path,
        exports: Arc<Exports>,
        committers: Arc<Committers>,
        limits: NodeLimits,
    ) -> Result<Node, NodeError> {
        let pool = Pool::open_or_create(dir, limits.create_pool)?;
        let node = Node {
            pool,
            exports,
            committers,
            served: Mutex::new(Served::default()),
            busy: Mutex::new(BTreeSet::new()),
            cloning: Mutex::new(HashMap::new()),
            limits,
            started: Instant::now(),
            pair: Mutex::new(None),
            personalities: Mutex::new(()),
            jobs: Jobs::default(),
            pair_volumes: replicas::PairVolumes::default(),
            me: std::sync::OnceLock::new(),
            crashed_volumes: Mutex::new(BTreeSet::new()),
        };
        for i in node.pool.images() {
            if let Err(e) = node.serve_image(&i.name) {
                tracing::error!(image = %i.name, "not served: {e}");
                node.served
                    .lock()
                    .broken_images
                    .insert(i.name.clone(), e.to_string());
            }
        }
        // After an unclean stop (kill -9, power cut), data written but never committed is
        // leaked space in the volumes' data files: harmless, but invisible until a check. It
        // is found and given back here, before the volume is served (so no write is in flight
        // to be mistaken for a leak), and said in the log and in `status`.
        let unclean = !node.pool.take_clean_stop()?;
        for v in node.pool.volumes() {
            if unclean {
                node.reclaim_leaks(&v.name);
            }
            // A pair volume is served once the node has joined its pair (`set_pair`).
            if let Ok(Some(r)) = node.pair_record(&v.name) {
                if unclean {
                    node.crashed_volumes.lock().insert(v.name.clone());
                }
                node.pair_volumes.unserved.lock().insert(
                    v.name.clone(),
                    format!(
                        "it belongs to pair {}: start the node with --etcd to serve it",
                        r.pair
                    ),
                );
            } else if let Err(e) = node.serve_volume(&v.name) {
                tracing::error!(volume = %v.name, "not served: {e}");
                node.served
                    .lock()
                    .broken
                    .insert(v.name.clone(), e.to_string());
            }
            if let Some(p) = node.personality_of(&v.name)
                && let Err(e) = node.serve_seed_of(&v.name, &p)
            {
                tracing::error!(volume = %v.name, "seed not served: {e}");
            }
        }
        Ok(node)
    }

    /// The checker over closed volume `name`, freeing what a crash leaked.
    fn reclaim_leaks(&self, name: &str) {
        match self.pool.check_volume(name, true) {
            Ok(r) if r.repaired => {
                let note = format!(
                    "volume {name:?}: {} leaked by an unclean stop was reclaimed at start-up",
                    indicatif::HumanBytes(r.leaked_bytes)
                );
                tracing::warn!("{note}");
                self.served.lock().reclaimed.push(note);
            }
            Ok(r) if !r.errors.is_empty() => {
                tracing::error!(volume = %name, "the checker found: {}", r.errors.join("; "));
            }
            Ok(_) => {}
            Err(e) => tracing::error!(volume = %name, "checking for leaked space: {e}"),
        }
    }

    /// NBD connections in transmission, to export `export` or to any.
    fn clients_of(&self, export: Option<&str>) -> Vec<ClientInfo> {
        let now = std::time::SystemTime::now();
        let mut out: Vec<ClientInfo> = self
            .exports
            .clients()
            .iter()
            .filter(|c| export.is_none_or(|e| c.export == e))
            .map(|c| ClientInfo {
                peer: c.peer.clone(),
                export: c.export.clone(),
                since_unix: c
                    .since
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                seconds: now.duration_since(c.since).map_or(0, |d| d.as_secs()),
                read_bytes: c.read_bytes.load(std::sync::atomic::Ordering::Relaxed),
                written_bytes: c.written_bytes.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| (&a.export, a.since_unix).cmp(&(&b.export, b.since_unix)));
        out
    }

    /// Called once the node has committed and closed everything: the next start need not look
    /// for leaked space.
    pub fn stopped_cleanly(&self) {
        // A pair volume whose crash was never dealt with (its peer could not be recorded
        // stale) keeps the next start unclean, so it is dealt with then.
        if !self.crashed_volumes.lock().is_empty() {
            tracing::warn!("not marking a clean stop: a crashed pair volume was never resynced");
            return;
        }
        // Likewise a replica whose owner was not yet told that it crashed: told next time.
        if !self.pair_volumes.replica_crashed.lock().is_empty() {
            tracing::warn!("not marking a clean stop: an owner was not told its replica crashed");
            return;
        }
        if let Err(e) = self.pool.mark_clean_stop() {
            tracing::warn!("recording the clean stop: {e}");
        }
    }

    pub fn dir(&self) -> &Path {
        self.pool.dir()
    }

    pub fn pool_dir(&self) -> &crate::pool::PoolDir {
        self.pool.pool_dir()
    }

    fn busy(&self, kind: &str, name: &str) -> Result<Busy<'_>, NodeError> {
        let key = format!("{kind}/{name}");
        if !self.busy.lock().insert(key.clone()) {
            return Err(NodeError::InUse(format!(
                "{kind} {name:?} is busy: another command is working on it"
            )));
        }
        Ok(Busy { node: self, key })
    }

    /// Holds `image` while a clone of it is created: refused while another command works on
    /// the image itself (a delete), and makes a delete wait its turn (see `delete_image`).
    fn cloning(&self, image: &str) -> Result<Cloning<'_>, NodeError> {
        let busy = self.busy.lock();
        if busy.contains(&format!("image/{image}")) {
            return Err(NodeError::InUse(format!(
                "image {image:?} is busy: another command is working on it"
            )));
        }
        *self.cloning.lock().entry(image.to_owned()).or_default() += 1;
        drop(busy);
        Ok(Cloning {
            node: self,
            image: image.to_owned(),
        })
    }

    fn serve_volume(&self, name: &str) -> Result<(), NodeError> {
        let vol = self
            .pool
            .open_volume_with_cache(name, self.limits.map_cache_pages)?;
        let target = Arc::new(
            VolumeTarget::new(name, vol, &self.committers)
                .map_err(|e| NodeError::Io(format!("serving volume {name:?}: {e}")))?,
        );
        let description = self.volume_description(name)?;
        let exported: Arc<dyn BlockTarget> = match self.pair_record(name)? {
            Some(local) => {
                let t = self.pair_target(name, &target, &local);
                if t.is_err() {
                    // Not served: its files close with the target.
                    self.forget_pair_volume(name);
                }
                let pt = Arc::new(crate::target::PairTarget::new(target.clone(), t?.target()));
                self.pair_volumes
                    .targets
                    .lock()
                    .insert(name.to_owned(), pt.clone());
                pt
            }
            None => target.clone(),
        };
        self.exports
            .add(Export {
                name: name.to_owned(),
                description,
                target: exported,
                max_payload_bytes: self.limits.max_payload_bytes,
            })
            .map_err(|_| NodeError::InUse(format!("an export named {name:?} already exists")))?;
        let mut s = self.served.lock();
        s.broken.remove(name);
        s.volumes.insert(name.to_owned(), target);
        Ok(())
    }

    /// What a volume's export says of it.
    fn volume_description(&self, name: &str) -> Result<String, NodeError> {
        Ok(match &self.pool.volume(name)?.image {
            Some(i) => format!("volume {name} (clone of {i})"),
            None => format!("volume {name}"),
        })
    }

    /// Volume `name`'s target, if this node serves it.
    pub(super) fn served_volume(&self, name: &str) -> Option<Arc<VolumeTarget>> {
        self.served.lock().volumes.get(name).cloned()
    }

    fn serve_image(&self, name: &str) -> Result<(), NodeError> {
        let raw = self.pool.open_image_raw(name)?;
        let shown = self.pool.dir().join("images").join(name);
        let target = Arc::new(
            FileTarget::from_files(raw, None, &shown, true)
                .map_err(|e| NodeError::Io(format!("serving image {name:?}: {e}")))?,
        );
        let export = format!("{IMAGE_EXPORT_PREFIX}{name}");
        self.exports
            .add(Export {
                name: export.clone(),
                description: format!("golden image {name} (read-only)"),
                target: target.clone() as Arc<dyn BlockTarget>,
                max_payload_bytes: self.limits.max_payload_bytes,
            })
            .map_err(|_| NodeError::InUse(format!("an export named {export:?} already exists")))?;
        self.served.lock().images.insert(name.to_owned(), target);
        Ok(())
    }

    /// Withdraws volume `name` and closes it. Without `force`, refused while clients are
    /// connected (naming `--force` only where the command has it); with it, they are
    /// disconnected first.
    fn offline_volume(&self, name: &str, force: Force) -> Result<(), NodeError> {
        let Some(t) = self.served_volume(name) else {
            return Ok(()); // not open (it failed to open): nothing to close
        };
        let n = t.clients();
        if n > 0 && force != Force::Yes {
            let hint = match force {
                Force::Offered => " (or use --force)",
                Force::No | Force::Yes => "",
            };
            return Err(NodeError::InUse(format!(
                "volume {name:?} has {n} connected client(s); disconnect them first{hint}"
            )));
        }
        self.exports.remove(name);
        t.revoke();
        wait_disconnected(|| t.clients(), name)?;
        self.forget_pair_volume(name);
        self.served.lock().volumes.remove(name);
        if let Err(e) = t.close() {
            tracing::error!(volume = %name, "closing: {e}");
        }
        Ok(())
    }

    /// Withdraws image `name`'s export; refused while clients read it.
    fn offline_image(&self, name: &str) -> Result<Option<Arc<FileTarget>>, NodeError> {
        let Some(t) = self.served.lock().images.get(name).cloned() else {
            return Ok(None);
        };
        let n = t.clients();
        if n > 0 {
            return Err(NodeError::InUse(format!(
                "image {name:?} has {n} client(s) reading its export {IMAGE_EXPORT_PREFIX}{name}"
            )));
        }
        self.exports.remove(&format!("{IMAGE_EXPORT_PREFIX}{name}"));
        t.revoke();
        self.served.lock().images.remove(name);
        Ok(Some(t))
    }

    /// Requests the volumes have served so far: what a bulk command's pacer watches.
    fn data_path_ops(&self) -> u64 {
        self.served
            .lock()
            .volumes
            .values()
            .map(|v| {
                let c = v.counters();
                c.reads + c.writes + c.flushes + c.zeroes
            })
            .sum()
    }

    fn pacer(&self) -> Pacer<impl FnMut() -> u64 + '_> {
        Pacer::new(self.limits.bulk_rate, || self.data_path_ops())
    }

    // ---- images --------------------------------------------------------------------------

    /// Imports a golden image from `src`, the descriptor a client passed: raw bytes, read
    /// through that descriptor only (see `ImportSource::new`). Other formats are converted by
    /// the client before they reach the node, as the client's user: a conversion here would
    /// follow an image's references (a backing file, a data file, vmdk extents) with the node's
    /// permissions.
    pub fn import_image(
        &self,
        name: &str,
        src: File,
        format: Option<&str>,
        expect: &Expect,
        job: &Job,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<ImageInfo, NodeError> {
        validate_name(name).map_err(NodeError::Invalid)?;
        if let Some(fmt) = format.filter(|f| *f != "raw") {
            return Err(NodeError::Invalid(format!(
                "the node imports raw images only, not {fmt:?}: `streamer image import` \
                 converts other formats on the client, with the calling user's permissions"
            )));
        }
        if self.pool.image(name).is_ok() {
            return Err(PoolError::Exists {
                kind: "image",
                name: name.into(),
            }
            .into());
        }
        let _busy = self.busy("image", name)?;
        self.import_raw(name, src, expect, job, progress)?;
        // On a pair: to the peer too (or when it is back).
        self.share_image(name);
        self.image_info(name)
    }

    /// The import itself: the caller holds the image's busy mark (or is the peer link).
    fn import_raw(
        &self,
        name: &str,
        src: File,
        expect: &Expect,
        job: &Job,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<(), NodeError> {
        let total = expect
            .size
            .or_else(|| src.metadata().ok().filter(|m| m.is_file()).map(|m| m.len()));
        let mut src = ImportSource::new(src, self.limits.import_idle)
            .map_err(|e| NodeError::Invalid(format!("cannot import {name:?}: {e}")))?;
        let mut pacer = self.pacer();
        let entry = self
            .pool
            .import_image(name, &mut src, expect, &|| job.check(), |done| {
                pacer.pace(done);
                progress(done, total)
            })
            .map_err(|e| cancelled_or(job, e.into()))?;
        self.serve_image(&entry.name)?;
        Ok(())
    }

    /// An import the peer link asks for (`images.rs`).
    fn import_image_only(
        &self,
        name: &str,
        src: File,
        expect: &Expect,
        job: &Job,
    ) -> Result<(), NodeError> {
        validate_name(name).map_err(NodeError::Invalid)?;
        let _busy = self.busy("image", name)?;
        self.import_raw(name, src, expect, job, &mut |_, _| {})
    }

    pub fn image_info(&self, name: &str) -> Result<ImageInfo, NodeError> {
        if let Some(why) = self.pool.damaged_why("image", name) {
            return Ok(ImageInfo {
                name: name.to_owned(),
                size: 0,
                sha256: String::new(),
                id: String::new(),
                allocated_bytes: self.pool.image_allocated(name),
                volumes: vec![],
                clients: 0,
                damaged: Some(why),
            });
        }
        let e = self.pool.image(name)?;
        let not_served = self.served.lock().broken_images.get(name).cloned();
        let clients = self
            .served
            .lock()
            .images
            .get(name)
            .map_or(0, |t| t.clients());
        Ok(ImageInfo {
            name: e.name.clone(),
            size: e.info.size,
            sha256: volume_format::image::hex(&e.info.digest),
            id: volume_format::image::hex(&e.info.id),
            allocated_bytes: self.pool.image_allocated(name),
            volumes: self.pool.dependents(name),
            clients,
            damaged: e
                .failed_verify
                .map(|why| format!("its last verification failed: {why}"))
                .or(not_served),
        })
    }

    /// Every image, damaged ones included (with why), by name.
    pub fn images(&self) -> Result<Vec<ImageInfo>, NodeError> {
        let mut names: Vec<String> = self.pool.images().into_iter().map(|i| i.name).collect();
        names.extend(self.damaged_names("image"));
        names.sort();
        names.iter().map(|n| self.image_info(n)).collect()
    }

    fn damaged_names(&self, kind: &str) -> Vec<String> {
        self.pool
            .damaged()
            .into_iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, n, _)| n)
            .collect()
    }

    pub fn verify_image(
        &self,
        name: &str,
        job: &Job,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<VerifyInfo, NodeError> {
        let e = self.pool.image(name)?;
        let total = Some(e.info.size);
        let mut pacer = self.pacer();
        let r = match self.pool.verify_image(name, &|| job.check(), |d| {
            pacer.pace(d);
            progress(d, total)
        }) {
            Ok(r) => r,
            Err(err) => {
                let err = cancelled_or(job, err.into());
                // An image that cannot be read back is damaged as surely as one whose digest
                // differs: no clones of it either.
                if !matches!(err, NodeError::Cancelled(_)) {
                    self.record_verify(
                        name,
                        &e.info.id,
                        Some(&format!("reading it failed: {err}")),
                    );
                }
                return Err(err);
            }
        };
        let message = if r.ok() {
            "the image matches its digest".to_owned()
        } else {
            let mut why = Vec::new();
            if !r.size_matches {
                why.push("its size changed".to_owned());
            }
            if !r.digest_matches {
                why.push("its SHA-256 differs".to_owned());
            }
            if !r.bad_chunks.is_empty() {
                why.push(format!(
                    "{} damaged 1 MiB chunk(s), first at {} MiB",
                    r.bad_chunks.len(),
                    r.bad_chunks[0]
                ));
            }
            format!("the image is damaged: {}", why.join(", "))
        };
        // Remembered across restarts: a damaged golden image is an alert, and no server gets
        // a clone of it until a verification passes again.
        if r.ok() {
            if e.failed_verify.is_some() {
                tracing::info!(image = %name, "verified again: clones of it may be made");
            }
            self.record_verify(name, &e.info.id, None);
        } else {
            tracing::error!(image = %name, "{message}; no clones of it until it verifies");
            self.record_verify(name, &e.info.id, Some(&message));
        }
        Ok(VerifyInfo {
            name: name.to_owned(),
            ok: r.ok(),
            sha256: volume_format::image::hex(&e.info.digest),
            bad_chunks: r.bad_chunks.clone(),
            message,
        })
    }

    /// Records a verification's outcome on the image it read: not on one of the same name
    /// imported while it ran (the image `id` differs), not on one deleted meanwhile.
    fn record_verify(&self, name: &str, id: &[u8; 16], failed: Option<&str>) {
        if !self.pool.image(name).is_ok_and(|e| e.info.id == *id) {
            return;
        }
        if let Err(err) = self.pool.set_failed_verify(name, failed) {
            tracing::error!(image = %name, "recording its verification: {err}");
        }
    }

    pub fn delete_image(&self, name: &str) -> Result<(), NodeError> {
        let sha256 = self.image_info(name).map(|i| i.sha256).unwrap_or_default();
        self.delete_image_here(name)?;
        // On a pair: the peer's copy goes too (its record with it).
        self.unshare_image(name, &sha256);
        Ok(())
    }

    /// Deletes image `name` from this node's pool only.
    fn delete_image_here(&self, name: &str) -> Result<(), NodeError> {
        if let Some(r) = self.pool.delete_damaged("image", name) {
            return Ok(r?);
        }
        self.pool.image(name)?;
        let _busy = self.busy("image", name)?;
        // A clone being created is not among the dependents until it is published.
        if self.cloning.lock().get(name).is_some_and(|&n| n > 0) {
            return Err(NodeError::InUse(format!(
                "image {name:?} is being cloned right now"
            )));
        }
        let users = self.pool.dependents(name);
        if !users.is_empty() {
            return Err(PoolError::InUse(format!(
                "image {name:?} has {} volume(s) cloned from it: {}",
                users.len(),
                users.join(", ")
            ))
            .into());
        }
        let was_served = self.offline_image(name)?;
        if let Err(e) = self.pool.delete_image(name) {
            if was_served.is_some() {
                let _ = self.serve_image(name);
            }
            return Err(e.into());
        }
        self.served.lock().broken_images.remove(name);
        Ok(())
    }

    /// Captures volume `from` as a new golden image `name` (refused while it has clients).
    pub fn capture(
        &self,
        name: &str,
        from: &str,
        job: &Job,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<ImageInfo, NodeError> {
        validate_name(name).map_err(NodeError::Invalid)?;
        let v = self.pool.volume(from)?;
        if self.pool.image(name).is_ok() {
            return Err(PoolError::Exists {
                kind: "image",
                name: name.into(),
            }
            .into());
        }
        let _busy_img = self.busy("image", name)?;
        let _busy_vol = self.busy("volume", from)?;
        self.offline_volume(from, Force::No)?;
        let total = Some(v.size);
        let mut pacer = self.pacer();
        let captured = self.pool.capture(name, from, &|| job.check(), |d| {
            pacer.pace(d);
            progress(d, total)
        });
        let reopened = self.serve_volume(from);
        let entry = captured.map_err(|e| cancelled_or(job, e.into()))?;
        reopened?;
        self.serve_image(&entry.name)?;
        self.share_image(name);
        self.image_info(name)
    }

    // ---- volumes -------------------------------------------------------------------------

    pub fn create_volume(
        &self,
        name: &str,
        image: Option<&str>,
        size: Option<u64>,
        personality: Option<Box<crate::personality::Personality>>,
    ) -> Result<VolumeInfo, NodeError> {
        let _busy = self.busy("volume", name)?;
        let _cloning = image.map(|i| self.cloning(i)).transpose()?;
        self.can_create(name, image)?;
        // With a personality: checked and its pool addresses handed out under the personalities'
        // lock, held until the volume and its record are published together.
        let _one_at_a_time = personality.as_ref().map(|_| self.personalities.lock());
        let prepared = match personality {
            Some(p) => Some(self.prepare_personality(name, *p)?),
            None => None,
        };
        self.publish_volume(name, image, size, prepared)?;
        self.volume_info(name)
    }

    /// Whether a volume `name` may be made from `image`: the name is free (no volume, no
    /// export) and the image passed its last verification.
    fn can_create(&self, name: &str, image: Option<&str>) -> Result<(), NodeError> {
        if let Some(i) = image
            && let Ok(e) = self.pool.image(i)
            && let Some(why) = e.failed_verify
        {
            return Err(NodeError::InUse(format!(
                "image {i:?} failed its last verification ({why}): no clones of it until \
                 `streamer image verify {i}` passes (or re-import it)"
            )));
        }
        if self.pool.volume(name).is_ok() {
            return Err(PoolError::Exists {
                kind: "volume",
                name: name.into(),
            }
            .into());
        }
        if self.exports.contains(name) {
            return Err(NodeError::InUse(format!(
                "an export named {name:?} already exists (a --export raw file)"
            )));
        }
        Ok(())
    }

    /// Creates volume `name` with its prepared personality (both or neither), on both nodes
    /// of a pair, and serves it. The caller holds the volume busy, its image cloning and the
    /// personalities' lock.
    fn publish_volume(
        &self,
        name: &str,
        image: Option<&str>,
        size: Option<u64>,
        prepared: Option<personality::Prepared>,
    ) -> Result<(), NodeError> {
        let record = prepared.as_ref().map(|p| p.record.as_slice());
        if self.pair.lock().is_some() {
            self.create_pair_volume(name, image, size, record)?;
        } else {
            let files: Vec<(&str, &[u8])> = record
                .map(|r| (crate::pool::PERSONALITY_FILE, r))
                .into_iter()
                .collect();
            // A clone of an image with a `CIDATA` partition gets its seed written there before
            // it is published.
            let mut seed =
                |v: &mut volume_format::Volume<volume_format::FileStorage>| match &prepared {
                    Some(p) => personality::write_seed_into(v, &p.docs),
                    None => Ok(()),
                };
            let edit: Option<crate::pool::Edit<'_>> =
                (prepared.is_some() && image.is_some()).then_some(&mut seed);
            self.pool
                .create_volume_with_files(name, image, size, &files, edit)?;
        }
        self.serve_volume(name)?;
        if let Some(p) = prepared
            && let Err(e) = self.serve_docs(name, &p.docs)
        {
            // The volume and its record exist; the seed is made again at the next start.
            tracing::error!(volume = name, "seed not served: {e}");
        }
        Ok(())
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo, NodeError> {
        if let Some(why) = self.pool.damaged_why("volume", name) {
            return Ok(VolumeInfo {
                name: name.to_owned(),
                size: 0,
                allocated_bytes: self.pool.volume_allocated(name),
                image: None,
                clients: 0,
                served: false,
                failed: None,
                counters: VolumeCounters::default(),
                generation: String::new(),
                epoch: 0,
                commit: 0,
                damaged: Some(why),
                connections: vec![],
                personality: None,
            });
        }
        let e = self.pool.volume(name)?;
        let t = self.served_volume(name);
        let broken = self.served.lock().broken.get(name).cloned();
        let (allocated_bytes, generation, epoch, commit) = match &t {
            Some(t) => match t.stat() {
                Ok(s) => (
                    s.allocated_bytes,
                    volume_format::image::hex(&s.generation),
                    s.epoch,
                    s.commit,
                ),
                Err(_) => (0, String::new(), 0, 0),
            },
            None => (self.pool.volume_allocated(name), String::new(), 0, 0),
        };
        Ok(VolumeInfo {
            name: e.name,
            size: e.size,
            allocated_bytes,
            image: e.image,
            clients: t.as_ref().map_or(0, |t| t.clients()),
            served: t.is_some(),
            failed: t.as_ref().and_then(|t| t.failure()).or(broken),
            counters: t.as_ref().map(|t| t.counters()).unwrap_or_default(),
            generation,
            epoch,
            commit,
            damaged: None,
            connections: self.clients_of(Some(name)),
            personality: self.personality_of(name).map(Box::new),
        })
    }

    /// Every volume, damaged ones included (with why), by name.
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, NodeError> {
        let mut names: Vec<String> = self.pool.volumes().into_iter().map(|v| v.name).collect();
        names.extend(self.damaged_names("volume"));
        names.sort();
        names.iter().map(|n| self.volume_info(n)).collect()
    }

    /// Grows a volume; connected clients keep the old size, new connections see the new one.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, NodeError> {
        let _busy = self.busy("volume", name)?;
        // Both copies grow together, and the etcd record with them (`grow_pair_volume`).
        if self.pair_record(name)?.is_some() {
            self.grow_pair_volume(name, size)?;
        }
        self.grow_here(name, size)?;
        self.volume_info(name)
    }

    /// Grows this node's copy of volume `name`: served, its connected clients keep the old
    /// size and new connections see the new one.
    fn grow_here(&self, name: &str, size: u64) -> Result<(), NodeError> {
        let t = self.served_volume(name);
        match t {
            Some(t) => {
                t.grow(size).map_err(|e| match e {
                    VolumeError::Invalid(m) => NodeError::Invalid(m),
                    e => NodeError::Io(format!("resizing volume {name:?}: {e}")),
                })?;
                self.pool.note_resized(name, size);
            }
            None => {
                self.pool.resize_volume(name, size)?;
            }
        }
        Ok(())
    }

    pub fn delete_volume(&self, name: &str, force: bool) -> Result<(), NodeError> {
        if let Some(r) = self.pool.delete_damaged("volume", name) {
            return Ok(r?);
        }
        self.pool.volume(name)?;
        let _busy = self.busy("volume", name)?;
        let paired = self.pair_record(name)?;
        if let Some(local) = &paired
            && let Some(why) = self.pair_volumes.unserved.lock().get(name)
            && self.pair.lock().is_none()
        {
            return Err(NodeError::Invalid(format!(
                "volume {name:?} is not served ({why}); a pair volume is deleted from its pair \
                 (pair {})",
                local.pair
            )));
        }
        self.offline_volume(name, if force { Force::Yes } else { Force::Offered })?;
        if let Some(local) = &paired
            && let Err(e) = self.delete_pair_volume(name, local)
        {
            let _ = self.serve_volume(name);
            return Err(e);
        }
        self.pair_volumes.unserved.lock().remove(name);
        self.pair_volumes.generation_problems.lock().remove(name);
        if let Err(e) = self.pool.delete_volume(name) {
            let _ = self.serve_volume(name);
            return Err(e.into());
        }
        self.served.lock().broken.remove(name);
        self.withdraw_seed(name);
        Ok(())
    }

    /// Runs the checker over every volume, each taken offline for its check. Volumes with
    /// clients are skipped (a check of a volume being written would see its writes in flight
    /// as leaks).
    pub fn check(
        &self,
        repair: bool,
        only: Option<&str>,
        job: &Job,
    ) -> Result<CheckInfo, NodeError> {
        let names: Vec<String> = match only {
            Some(name) => vec![self.pool.volume(name)?.name],
            None => self.pool.volumes().into_iter().map(|v| v.name).collect(),
        };
        let mut out = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            job.progress(i as u64, None);
            job.check().map_err(NodeError::Cancelled)?;
            let skip = |why: String| VolumeCheck {
                name: name.clone(),
                ok: true,
                skipped: Some(why),
                errors: vec![],
                notes: vec![],
                leaks: 0,
                leaked_bytes: 0,
                repaired: false,
            };
            let Ok(_busy) = self.busy("volume", &name) else {
                out.push(skip("busy: another command is working on it".into()));
                continue;
            };
            if let Err(e) = self.offline_volume(&name, Force::No) {
                out.push(skip(e.to_string()));
                continue;
            }
            let r = self.pool.check_volume(&name, repair);
            let reopened = self.serve_volume(&name);
            let r = r?;
            let mut errors = r.errors.clone();
            if let Err(e) = reopened {
                errors.push(format!("could not be served again: {e}"));
                self.served
                    .lock()
                    .broken
                    .insert(name.clone(), e.to_string());
            }
            out.push(VolumeCheck {
                name: name.clone(),
                ok: errors.is_empty(),
                skipped: None,
                errors,
                notes: r.notes.clone(),
                leaks: r.leaks.len() as u64,
                leaked_bytes: r.leaked_bytes,
                repaired: r.repaired,
            });
        }
        Ok(CheckInfo { volumes: out })
    }

    pub fn status(&self) -> StatusInfo {
        let dir = self.pool.dir();
        let (capacity_bytes, free_bytes) = match nix::sys::statvfs::statvfs(dir) {
            Ok(s) => (
                s.blocks() * s.fragment_size(),
                s.blocks_available() * s.fragment_size(),
            ),
            Err(_) => (0, 0),
        };
        let images = self.pool.images();
        let volumes = self.pool.volumes();
        let mut used_bytes = 0;
        for i in &images {
            used_bytes += self.pool.image_allocated(&i.name);
        }
        for v in &volumes {
            used_bytes += self.pool.volume_allocated(&v.name);
        }
        let mut alerts = Vec::new();
        for (kind, name, why) in self.pool.damaged() {
            alerts.push(format!(
                "{kind} {name:?} is damaged and not served: {why} (`streamer {kind} delete {name}` removes it)"
            ));
        }
        let s = self.served.lock();
        for (name, why) in &s.broken_images {
            alerts.push(format!("image {name:?} is not served: {why}"));
        }
        alerts.extend(s.reclaimed.iter().cloned());
        for i in &images {
            if let Some(why) = &i.failed_verify {
                alerts.push(format!(
                    "image {:?} failed its last verification ({why}): no clones of it until \
                     `streamer image verify {}` passes",
                    i.name, i.name
                ));
            }
        }
        for (name, why) in &s.broken {
            alerts.push(format!(
                "volume {name:?} is not served: {why} (try `streamer check --repair`)"
            ));
        }
        for (name, t) in &s.volumes {
            if let Some(why) = t.failure() {
                alerts.push(format!("volume {name:?} failed: {why}"));
            }
        }
        alerts.extend(self.pair_alerts());
        if capacity_bytes > 0 && free_bytes * 10 < capacity_bytes {
            alerts.push(format!(
                "pool file system is {}% full",
                100 - free_bytes * 100 / capacity_bytes
            ));
        }
        let connections = s.volumes.values().map(|t| t.clients()).sum::<usize>()
            + s.images.values().map(|t| t.clients()).sum::<usize>();
        drop(s);
        let mut exports: Vec<String> = self
            .exports
            .snapshot()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        exports.sort();
        StatusInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            data_dir: dir.display().to_string(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            pool: PoolSpace {
                capacity_bytes,
                free_bytes,
                used_bytes,
            },
            images: images.len(),
            volumes: volumes.len(),
            exports,
            connections,
            alerts,
            jobs: self.jobs.list(),
            clients: self.clients_of(None),
        }
    }

    /// I/O counters of a served volume (zero when it is not served).
    pub fn counters(&self, name: &str) -> VolumeCounters {
        self.served
            .lock()
            .volumes
            .get(name)
            .map(|t| t.counters())
            .unwrap_or_default()
    }
}

/// A failed long command: `Cancelled` when its job was cancelled (the failure is how the
/// cancel ended the work), logged with what was cleaned up; the error itself otherwise.
fn cancelled_or(job: &Job, e: NodeError) -> NodeError {
    match job.cancelled() {
        Some(why) => {
            tracing::warn!("{why}; nothing was published and its staged data was removed");
            NodeError::Cancelled(why)
        }
        None => e,
    }
}

fn wait_disconnected(clients: impl Fn() -> usize, name: &str) -> Result<(), NodeError> {
    let deadline = Instant::now() + DISCONNECT_WAIT;
    while clients() > 0 {
        if Instant::now() >= deadline {
            return Err(NodeError::InUse(format!(
                "{name:?}: {} client(s) did not disconnect within {}s",
                clients(),
                DISCONNECT_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
