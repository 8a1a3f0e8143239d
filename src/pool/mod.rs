//! The pool: golden images and volumes in one directory, every change atomic and durable.
//!
//! ```text
//! DIR/images/NAME/   image.raw  image.meta      a sealed golden image
//! DIR/volumes/NAME/  volume.meta  volume.data   a volume (a thin clone, or blank)
//!                    personality.json           its personality, if it has one
//!                    personality.previous.json  a volume kept by a redeploy: its old one
//!                    redeploy.json              a redeploy that keeps the old volume, until done
//!                    pair.json                  a pair volume: its pair, id, highest token seen
//!                    activity.log               a pair volume this node owned: its activity log
//! DIR/ippools/NAME.json                         an IP pool
//! DIR/.staging/ID/   an object being built      removed when the pool opens
//! DIR/.trash/ID/     an object being deleted    removed when the pool opens
//! ```
//!
//! An object exists exactly when its directory has its final name. It is built complete and
//! synced under `.staging`, then renamed into place (`RENAME_NOREPLACE`, so two creators of one
//! name cannot both win) and the parent directory synced. A delete is a rename into `.trash`,
//! synced, then the removal. A `kill -9` at any instant therefore leaves every object either
//! whole or absent, and opening the pool sweeps what was left half-done.
//!
//! A redeploy (a fresh clone under an existing volume's name) swaps the staged clone with the
//! live directory in one `RENAME_EXCHANGE` and deletes the old one. Keeping the old volume takes
//! two renames (old to `NAME.previous`, staged to `NAME`); the staged clone carries a note of
//! both names, synced before the first, and opening the pool finishes a redeploy whose first
//! rename happened (`finish_redeploys`), so the name is never left without a volume.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use volume_format::image::{self, ImageInfo, ImageWriter};
use volume_format::{FileStorage, ImageRef, Storage, Volume, VolumeError, check};

use crate::names::{validate_existing_name, validate_name};

mod dir;
mod source;
pub use dir::{PoolDir, check_ancestors};
pub use source::ImportSource;

use dir::Access;

const IMAGE_RAW: &str = "image.raw";
const IMAGE_META: &str = "image.meta";
const VOLUME_META: &str = "volume.meta";
const VOLUME_DATA: &str = "volume.data";
/// Written when a node stopped cleanly (every volume committed), removed when one starts.
const CLEAN_STOP: &str = ".clean-stop";
/// Beside an image whose last verification failed: why.
const VERIFY_FAILED: &str = "verify-failed";
/// Beside a volume's files: its personality (JSON), when it has one.
const PERSONALITY: &str = "personality.json";
/// The personality record's file name in a volume's directory (for records staged with it).
pub const PERSONALITY_FILE: &str = PERSONALITY;
/// A kept volume's personality after a redeploy (not read as one: its addresses went with the
/// server's name to the new volume).
const PERSONALITY_PREVIOUS: &str = "personality.previous.json";
/// In a redeployed volume's directory until the redeploy that keeps the old one is finished.
const REDEPLOY_NOTE: &str = "redeploy.json";

/// Changes made to a new volume before it is published (a personality's seed written into
/// its `CIDATA` partition): whatever it writes is published with the volume, or not at all.
pub type Edit<'a> = &'a mut dyn FnMut(&mut Volume<FileStorage>) -> Result<(), String>;

/// What a redeploy that keeps the old volume does: `name` becomes the new volume, the old one
/// `keep_as`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct RedeployNote {
    name: String,
    keep_as: String,
}
/// Beside a volume's files, on a node of a pair: the volume's id in the pair and the highest
/// fencing token its replica has seen (JSON; `docs/pair.md` §2).
pub const PAIR_RECORD: &str = "pair.json";
/// The activity log of a pair volume this node owns (`target/activity.rs`).
pub const ACTIVITY_LOG: &str = "activity.log";
/// The IP pools' records, one JSON file each.
const IPPOOLS: &str = "ippools";

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("{0}")]
    Invalid(String),
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name:?} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("{0}")]
    InUse(String),
    /// The command was cancelled (see `Stop`).
    #[error("{0}")]
    Cancelled(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {source}")]
    Volume {
        what: String,
        #[source]
        source: VolumeError,
    },
}

fn io_err(what: impl Into<String>) -> impl Fn(io::Error) -> PoolError {
    let what = what.into();
    move |source| PoolError::Io {
        what: what.clone(),
        source,
    }
}

fn vol_err(what: impl Into<String>) -> impl FnOnce(VolumeError) -> PoolError {
    let what = what.into();
    move |source| PoolError::Volume { what, source }
}

/// Asked between the pieces of a long command: `Err(why)` ends it (a `streamer cancel`, or its
/// client went away), and what it staged is removed instead of published.
pub type Stop<'a> = &'a dyn Fn() -> Result<(), String>;

/// A storage that asks `stop` before every read and write, so that a long copy through
/// volume-format (a capture, a verify) ends at the next piece once its command is cancelled.
struct Stoppable<'a, S> {
    inner: S,
    stop: Stop<'a>,
}

impl<S: Storage> Stoppable<'_, S> {
    fn go_on(&self) -> io::Result<()> {
        (self.stop)().map_err(io::Error::other)
    }
}

impl<S: Storage> Storage for Stoppable<'_, S> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.go_on()?;
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.go_on()?;
        self.inner.write_at(offset, data)
    }
    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.zero_range(offset, len)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn seek_data(&mut self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.seek_data(offset)
    }
    fn seek_hole(&mut self, offset: u64) -> io::Result<u64> {
        self.inner.seek_hole(offset)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
    fn write_behind(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_behind(offset, len)
    }
}

/// What an import must turn out to be; anything else is refused and not published.
#[derive(Debug, Default, Clone, Copy)]
pub struct Expect {
    pub size: Option<u64>,
    pub sha256: Option<[u8; 32]>,
}

/// A golden image as the pool lists it.
#[derive(Debug, Clone)]
pub struct ImageEntry {
    pub name: String,
    pub info: ImageInfo,
    /// Why its last verification failed (`images/NAME/verify-failed`, kept across restarts):
    /// no clones are made of it until a verification passes.
    pub failed_verify: Option<String>,
}

/// A volume as the pool lists it.
#[derive(Debug, Clone)]
pub struct VolumeEntry {
    pub name: String,
    pub size: u64,
    /// The backing image's name, or `None` for a blank volume.
    pub image: Option<String>,
    pub backing: Option<ImageRef>,
}

struct Catalog {
    images: BTreeMap<String, ImageEntry>,
    volumes: BTreeMap<String, VolumeEntry>,
    /// Names being created right now (long imports run without the lock held).
    reserved: BTreeSet<(&'static str, String)>,
    /// Images and volumes found unloadable at open (kind, name) with the reason: left on disk,
    /// never served, their names kept; deleting them is the way out.
    damaged: BTreeMap<(&'static str, String), String>,
}

pub struct Pool {
    dir: PoolDir,
    catalog: Mutex<Catalog>,
    /// An exclusive lock on `DIR/.lock`: one process owns a pool at a time.
    _lock: nix::fcntl::Flock<File>,
}

/// What `Pool::check` found, per volume.
#[derive(Debug, Clone)]
pub struct PoolCheck {
    pub volumes: Vec<(String, volume_format::CheckReport)>,
}

impl Pool {
    /// Opens (creating if needed) the pool in `dir`, sweeping half-done work and loading the
    /// catalog. A volume or image that fails to load is an error naming it: nothing is served
    /// from a pool whose metadata does not check out.
    pub fn open(path: &Path) -> Result<Pool, PoolError> {
        Pool::open_or_create(path, true)
    }

    /// `open`; without `create`, a directory that does not exist is refused (see `PoolDir`).
    pub fn open_or_create(path: &Path, create: bool) -> Result<Pool, PoolError> {
        let dir = PoolDir::open(path, create).map_err(io_err("opening the pool"))?;
        for sub in ["images", "volumes", ".staging", ".trash"] {
            dir.ensure_dir(Path::new(sub))
                .map_err(io_err("preparing the pool"))?;
        }
        let lock_file = dir
            .open_file(Path::new(".lock"), Access::CreateOrOpen)
            .map_err(io_err("locking the pool"))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(mut f, e)| {
                // The holder wrote its pid there when it took the lock.
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                let holder = match pid.trim().parse::<u32>() {
                    Ok(pid) => format!("streamer process {pid}"),
                    Err(_) => "another streamer process".to_owned(),
                };
                PoolError::InUse(format!(
                    "the pool in {} is in use by {holder} ({e})",
                    path.display()
                ))
            })?;
        {
            use std::os::unix::fs::FileExt;
            let f: &File = &lock;
            let _ = f.set_len(0);
            let _ = f.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0);
        }
        match dir.tighten() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                "took group and other permissions off {n} file(s) and directories of the pool \
                 (made by an older version)"
            ),
            Err(e) => return Err(io_err("tightening the pool's permissions")(e)),
        }
        finish_redeploys(&dir)?;
        for sub in [".staging", ".trash"] {
            let names = dir
                .entries(Path::new(sub))
                .map_err(io_err(format!("reading {sub}")))?;
            for n in names {
                dir.remove_all(&Path::new(sub).join(n))
                    .map_err(io_err("sweeping half-done work"))?;
            }
        }
        // One damaged object must not take the node down with it: it is set aside (and
        // reported), and the pool opens with everything else.
        let mut damaged = BTreeMap::new();
        let mut images = BTreeMap::new();
        for name in list_dir(&dir, "images")? {
            match load_image(&dir, &name) {
                Ok(info) => {
                    let failed_verify = read_failed_verify(&dir, &name);
                    images.insert(
                        name.clone(),
                        ImageEntry {
                            name,
                            info,
                            failed_verify,
                        },
                    );
                }
                Err(e) => {
                    tracing::error!(image = %name, "damaged, not served: {e}");
                    damaged.insert(("image", name), e.to_string());
                }
            }
        }
        let mut volumes = BTreeMap::new();
        for name in list_dir(&dir, "volumes")? {
            match load_volume(&dir, &name, &images) {
                Ok(entry) => {
                    volumes.insert(name, entry);
                }
                Err(e) => {
                    tracing::error!(volume = %name, "damaged, not served: {e}");
                    damaged.insert(("volume", name), e.to_string());
                }
            }
        }
        Ok(Pool {
            dir,
            catalog: Mutex::new(Catalog {
                images,
                volumes,
                reserved: BTreeSet::new(),
                damaged,
            }),
            _lock: lock,
        })
    }

    /// Images and volumes set aside at open: (kind, name, why).
    pub fn damaged(&self) -> Vec<(&'static str, String, String)> {
        let c = self.catalog.lock();
        c.damaged
            .iter()
            .map(|((k, n), why)| (*k, n.clone(), why.clone()))
            .collect()
    }

    /// Why `name` (of `kind`) was set aside at open, if it was.
    pub fn damaged_why(&self, kind: &'static str, name: &str) -> Option<String> {
        self.catalog
            .lock()
            .damaged
            .get(&(kind, name.to_owned()))
            .cloned()
    }

    /// Removes a damaged image or volume (moved to the trash like any delete). `None` when
    /// `name` is not a damaged object of that kind.
    pub fn delete_damaged(&self, kind: &'static str, name: &str) -> Option<Result<(), PoolError>> {
        let mut c = self.catalog.lock();
        let key = (kind, name.to_owned());
        if !c.damaged.contains_key(&key) {
            return None;
        }
        let dir = if kind == "image" { "images" } else { "volumes" };
        Some(self.trash(dir, name).map(|()| {
            c.damaged.remove(&key);
        }))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The pool directory, by descriptor.
    pub fn pool_dir(&self) -> &PoolDir {
        &self.dir
    }

    pub fn images(&self) -> Vec<ImageEntry> {
        self.catalog.lock().images.values().cloned().collect()
    }

    pub fn volumes(&self) -> Vec<VolumeEntry> {
        self.catalog.lock().volumes.values().cloned().collect()
    }

    pub fn image(&self, name: &str) -> Result<ImageEntry, PoolError> {
        self.catalog
            .lock()
            .images
            .get(name)
            .cloned()
            .ok_or_else(|| PoolError::NotFound {
                kind: "image",
                name: name.into(),
            })
    }

    pub fn volume(&self, name: &str) -> Result<VolumeEntry, PoolError> {
        self.catalog
            .lock()
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| PoolError::NotFound {
                kind: "volume",
                name: name.into(),
            })
    }

    /// Volumes cloned from image `name`.
    pub fn dependents(&self, name: &str) -> Vec<String> {
        let c = self.catalog.lock();
        c.volumes
            .values()
            .filter(|v| v.image.as_deref() == Some(name))
            .map(|v| v.name.clone())
            .collect()
    }

    fn image_file(name: &str, file: &str) -> PathBuf {
        Path::new("images").join(name).join(file)
    }

    fn volume_file(name: &str, file: &str) -> PathBuf {
        Path::new("volumes").join(name).join(file)
    }

    /// Image `name`'s bytes, opened read-only (to serve them).
    pub fn open_image_raw(&self, name: &str) -> Result<File, PoolError> {
        self.dir
            .open_file(&Self::image_file(name, IMAGE_RAW), Access::Read)
            .map_err(io_err(format!("opening image {name:?}")))
    }

    /// Disk space image `name` takes.
    pub fn image_allocated(&self, name: &str) -> u64 {
        self.dir.allocated(&Self::image_file(name, IMAGE_RAW))
            + self.dir.allocated(&Self::image_file(name, IMAGE_META))
    }

    /// Disk space volume `name` takes.
    pub fn volume_allocated(&self, name: &str) -> u64 {
        self.dir.allocated(&Self::volume_file(name, VOLUME_META))
            + self.dir.allocated(&Self::volume_file(name, VOLUME_DATA))
    }

    /// Claims a name for an object being built; `Reservation` releases it when dropped.
    fn reserve(&self, kind: &'static str, name: &str) -> Result<Reservation<'_>, PoolError> {
        validate_name(name).map_err(PoolError::Invalid)?;
        let mut c = self.catalog.lock();
        let taken = match kind {
            "image" => c.images.contains_key(name),
            _ => c.volumes.contains_key(name),
        } || c.damaged.contains_key(&(kind, name.to_owned()));
        if taken || !c.reserved.insert((kind, name.to_owned())) {
            return Err(PoolError::Exists {
                kind,
                name: name.into(),
            });
        }
        Ok(Reservation {
            pool: self,
            kind,
            name: name.to_owned(),
        })
    }

    /// Records a volume's new size after it was grown while open (served).
    pub fn note_resized(&self, name: &str, size: u64) {
        if let Some(e) = self.catalog.lock().volumes.get_mut(name) {
            e.size = size;
        }
    }

    /// A new directory under `.staging` (its path relative to the pool).
    fn staging(&self) -> Result<PathBuf, PoolError> {
        let p = Path::new(".staging").join(image::hex(&random_id()));
        self.dir
            .create_dir(&p)
            .map_err(io_err("creating a staging directory"))?;
        Ok(p)
    }

    /// Makes a staged object visible under its final name, durably.
    fn publish(&self, staged: &Path, kind_dir: &str, name: &str) -> Result<(), PoolError> {
        self.dir
            .sync_dir(staged)
            .map_err(io_err(format!("publishing {name:?}")))?;
        self.dir
            .rename(staged, &Path::new(kind_dir).join(name), true)
            .map_err(io_err(format!("publishing {name:?}")))?;
        self.dir
            .sync_dir(Path::new(kind_dir))
            .and_then(|()| self.dir.sync_dir(Path::new(".staging")))
            .map_err(io_err(format!("publishing {name:?}")))
    }

    /// Stores a staged image's metadata, publishes it and adds it to the catalog.
    fn publish_image(
        &self,
        staged: Cleanup<'_>,
        name: &str,
        info: ImageInfo,
    ) -> Result<ImageEntry, PoolError> {
        info.store(&mut self.create(&staged.path.join(IMAGE_META))?)
            .map_err(io_err(format!("writing image {name:?} metadata")))?;
        self.publish(&staged.path, "images", name)?;
        staged.disarm();
        let entry = ImageEntry {
            name: name.to_owned(),
            info,
            failed_verify: None,
        };
        self.catalog
            .lock()
            .images
            .insert(name.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Imports a raw image from `src`, sealing it (digest and chunk table) on the way in.
    /// `progress` is called with the bytes copied so far. An image that does not match
    /// `expect` is refused before it is published (the staged bytes are removed).
    pub fn import_image(
        &self,
        name: &str,
        src: &mut dyn Read,
        expect: &Expect,
        stop: Stop<'_>,
        mut progress: impl FnMut(u64),
    ) -> Result<ImageEntry, PoolError> {
        let res = self.reserve("image", name)?;
        let staged = self.staging()?;
        let cleanup = self.cleanup(&staged);
        let mut raw = self.create(&staged.join(IMAGE_RAW))?;
        let write_err = io_err(format!("writing image {name:?}"));
        let mut out = ImageWriter::new(&mut raw).map_err(&write_err)?;
        let mut buf = vec![0u8; image::STREAM_IO_BYTES];
        loop {
            // Whole buffers: fewer writes.
            let mut n = 0;
            while n < buf.len() {
                match src.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err(format!("reading the import of {name:?}"))(e)),
                }
            }
            if n == 0 {
                break;
            }
            out.write(&buf[..n]).map_err(&write_err)?;
            progress(out.written());
            stop().map_err(PoolError::Cancelled)?;
        }
        if out.written() == 0 {
            return Err(PoolError::Invalid(format!(
                "the import of {name:?} is empty"
            )));
        }
        if let Some(want) = expect.size
            && want != out.written()
        {
            return Err(PoolError::Invalid(format!(
                "the import of {name:?} {} {} bytes where {want} were expected: not published",
                if out.written() < want {
                    "ended after"
                } else {
                    "ran to"
                },
                out.written()
            )));
        }
        let info = out
            .finish(random_id())
            .map_err(io_err(format!("syncing image {name:?}")))?;
        if let Some(want) = expect.sha256
            && want != info.digest
        {
            return Err(PoolError::Invalid(format!(
                "the import of {name:?} has SHA-256 {} where {} was expected: not published",
                image::hex(&info.digest),
                image::hex(&want)
            )));
        }
        // The last word before the rename: a client that went away while the image was synced
        // (or a cancel) still publishes nothing.
        stop().map_err(PoolError::Cancelled)?;
        let entry = self.publish_image(cleanup, name, info)?;
        drop(res);
        Ok(entry)
    }

    /// Creates a volume: a thin clone of `image` (size at least the image's, rounded up to
    /// 4 KiB; default the image's size), or blank (`size` required).
    pub fn create_volume(
        &self,
        name: &str,
        image: Option<&str>,
        size: Option<u64>,
    ) -> Result<VolumeEntry, PoolError> {
        self.create_volume_with(name, image, size, None)
    }

    /// `create_volume`, with a personality record published with the volume in the same
    /// rename: after a crash the volume exists with its personality, or not at all.
    pub fn create_volume_with(
        &self,
        name: &str,
        image: Option<&str>,
        size: Option<u64>,
        personality: Option<&[u8]>,
    ) -> Result<VolumeEntry, PoolError> {
        let files: Vec<(&str, &[u8])> = personality.map(|p| (PERSONALITY, p)).into_iter().collect();
        self.create_volume_with_files(name, image, size, &files, None)
    }

    /// `create_volume`, with records (personality, pair record) beside the volume's files,
    /// published with it in the same rename.
    pub fn create_volume_with_files(
        &self,
        name: &str,
        image: Option<&str>,
        size: Option<u64>,
        files: &[(&str, &[u8])],
        edit: Option<Edit<'_>>,
    ) -> Result<VolumeEntry, PoolError> {
        let res = self.reserve("volume", name)?;
        let (staged, cleanup, entry) = self.stage_volume(name, image, size, files, edit)?;
        self.publish(&staged, "volumes", name)?;
        cleanup.disarm();
        self.catalog
            .lock()
            .volumes
            .insert(name.to_owned(), entry.clone());
        drop(res);
        Ok(entry)
    }

    /// A complete new volume `name` (its files synced, `edit` made and flushed first), in a
    /// staging directory removed on drop of the `Cleanup` unless disarmed.
    fn stage_volume(
        &self,
        name: &str,
        image: Option<&str>,
        size: Option<u64>,
        files: &[(&str, &[u8])],
        edit: Option<Edit<'_>>,
    ) -> Result<(PathBuf, Cleanup<'_>, VolumeEntry), PoolError> {
        let backing = match image {
            Some(i) => Some(self.image(i)?),
            None => None,
        };
        let min = backing
            .as_ref()
            .map_or(4096, |b| b.info.size.max(1).div_ceil(4096) * 4096);
        let size = match (size, &backing) {
            (Some(s), _) => s,
            (None, Some(_)) => min,
            (None, None) => {
                return Err(PoolError::Invalid("a blank volume needs --size".into()));
            }
        };
        if size < min {
            return Err(PoolError::Invalid(format!(
                "size {size} is smaller than {} bytes{}",
                min,
                if backing.is_some() {
                    " (the image's size)"
                } else {
                    ""
                }
            )));
        }
        if !size.is_multiple_of(4096) {
            return Err(PoolError::Invalid(format!(
                "size {size} is not a multiple of 4 KiB"
            )));
        }
        let staged = self.staging()?;
        let cleanup = self.cleanup(&staged);
        let backing_storage = match &backing {
            Some(b) => Some((
                self.storage(&Self::image_file(&b.name, IMAGE_RAW), Access::Read)?,
                b.info.image_ref(),
            )),
            None => None,
        };
        let mut v = Volume::create(
            self.create(&staged.join(VOLUME_META))?,
            self.create(&staged.join(VOLUME_DATA))?,
            backing_storage,
            size,
            random_id(),
            random_id(),
        )
        .map_err(|e| match e {
            VolumeError::Invalid(m) => PoolError::Invalid(m),
            e => vol_err(format!("creating volume {name:?}"))(e),
        })?;
        volume_format::file::reserve_metadata(v.files().0.file(), size)
            .map_err(io_err(format!("creating volume {name:?}")))?;
        if let Some(edit) = edit {
            edit(&mut v).map_err(|e| PoolError::Invalid(format!("volume {name:?}: {e}")))?;
            v.flush()
                .map_err(vol_err(format!("creating volume {name:?}")))?;
        }
        v.close()
            .map_err(vol_err(format!("creating volume {name:?}")))?;
        for (file, record) in files {
            let err = io_err(format!("creating volume {name:?}"));
            let mut f = self
                .dir
                .open_file(&staged.join(file), Access::CreateNew)
                .map_err(&err)?;
            std::io::Write::write_all(&mut f, record).map_err(&err)?;
            f.sync_all().map_err(err)?;
        }
        self.dir
            .sync_dir(&staged)
            .map_err(io_err(format!("creating volume {name:?}")))?;
        let entry = VolumeEntry {
            name: name.to_owned(),
            size,
            image: backing.as_ref().map(|b| b.name.clone()),
            backing: backing.map(|b| b.info.image_ref()),
        };
        Ok((staged, cleanup, entry))
    }

    /// Replaces volume `name` (offline: the caller closed it) with a new clone of `image`
    /// holding `files`: the server keeps its name and gets a fresh OS (`volume redeploy`).
    /// Without `keep_as`, the old volume is swapped out in one step (`RENAME_EXCHANGE`) and
    /// deleted. With it, the old volume becomes `keep_as` and the new one `name`, in two
    /// renames a crash can stop between: the staged new volume carries a note of the plan
    /// (`redeploy.json`), and opening the pool finishes it (`finish_redeploys`). The kept
    /// volume's personality is set aside as `personality.previous.json` (no address is held by
    /// two volumes).
    pub fn redeploy_volume(
        &self,
        name: &str,
        image: &str,
        size: Option<u64>,
        files: &[(&str, &[u8])],
        edit: Option<Edit<'_>>,
        keep_as: Option<&str>,
    ) -> Result<VolumeEntry, PoolError> {
        self.volume(name)?;
        let _res = keep_as.map(|k| self.reserve("volume", k)).transpose()?;
        let err = || io_err(format!("redeploying volume {name:?}"));
        let (staged, cleanup, entry) = self.stage_volume(name, Some(image), size, files, edit)?;
        let live = Path::new("volumes").join(name);
        // Each path has one commit point; what follows it cannot undo the redeploy, so a
        // failure there is logged (and finished at the next open), not returned as if nothing
        // had happened.
        let after = |what: &str, r: io::Result<()>| {
            if let Err(e) = r {
                tracing::error!(volume = name, "redeploy done, but {what}: {e}");
            }
        };
        match keep_as {
            None => {
                self.dir.exchange(&staged, &live).map_err(err())?;
                // The old volume is in the staging directory now: gone at the next open if
                // this stops here.
                after(
                    "syncing the pool's directories failed",
                    self.dir
                        .sync_dir(Path::new("volumes"))
                        .and_then(|()| self.dir.sync_dir(Path::new(".staging"))),
                );
                drop(cleanup);
            }
            Some(keep) => {
                let note = serde_json::to_vec(&RedeployNote {
                    name: name.to_owned(),
                    keep_as: keep.to_owned(),
                })
                .expect("a note serialises");
                let mut f = self
                    .dir
                    .open_file(&staged.join(REDEPLOY_NOTE), Access::CreateNew)
                    .map_err(err())?;
                std::io::Write::write_all(&mut f, &note).map_err(err())?;
                f.sync_all().map_err(err())?;
                self.dir.sync_dir(&staged).map_err(err())?;
                self.dir
                    .rename(&live, &Path::new("volumes").join(keep), true)
                    .map_err(err())?;
                // From here a crash is finished at open: the note names both.
                cleanup.disarm();
                let published = self
                    .dir
                    .sync_dir(Path::new("volumes"))
                    .and_then(|()| self.dir.rename(&staged, &live, true))
                    .and_then(|()| self.dir.sync_dir(Path::new("volumes")))
                    .and_then(|()| self.dir.sync_dir(Path::new(".staging")));
                let mut c = self.catalog.lock();
                let mut old = c.volumes.remove(name).expect("checked above");
                old.name = keep.to_owned();
                c.volumes.insert(keep.to_owned(), old);
                if let Err(e) = published {
                    // The old volume is `keep` now; the new one is published at the next open.
                    return Err(err()(io::Error::new(
                        e.kind(),
                        format!("{e} (the node finishes it at its next start)"),
                    )));
                }
                c.volumes.insert(name.to_owned(), entry.clone());
                drop(c);
                after(
                    "setting the kept volume's personality aside failed",
                    self.finish_redeploy(name, keep),
                );
                return Ok(entry);
            }
        }
        self.catalog
            .lock()
            .volumes
            .insert(name.to_owned(), entry.clone());
        Ok(entry)
    }

    /// The last steps of a redeploy that keeps the old volume, once both are published: the
    /// kept volume's personality set aside, then the note removed.
    fn finish_redeploy(&self, name: &str, keep: &str) -> io::Result<()> {
        finish_redeploy(&self.dir, name, keep)
    }

    /// Opens a volume of the pool (its files and its backing image), with its whole block map
    /// in memory (offline work: capture, resize).
    pub fn open_volume(&self, name: &str) -> Result<Volume<FileStorage>, PoolError> {
        self.open_volume_with_cache(name, usize::MAX)
    }

    /// Volume `name`'s current superblock, read from its metadata file without opening the
    /// volume (nothing is written; the volume may be open elsewhere).
    pub fn volume_superblock(&self, name: &str) -> Result<volume_format::Superblock, PoolError> {
        self.volume(name)?;
        let err = io_err(format!("reading volume {name:?}'s superblock"));
        let f = self
            .dir
            .open_file(&Self::volume_file(name, VOLUME_META), Access::Read)
            .map_err(&err)?;
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut a, 0).map_err(&err)?;
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, 4096).map_err(&err)?;
        volume_format::Superblock::choose(&a, &b)
            .map_err(|e| PoolError::Invalid(format!("volume {name:?}'s superblock: {e}")))
    }

    /// Opens a volume holding at most `cache_pages` clean map pages in memory (to serve it).
    pub fn open_volume_with_cache(
        &self,
        name: &str,
        cache_pages: usize,
    ) -> Result<Volume<FileStorage>, PoolError> {
        let entry = self.volume(name)?;
        let backing = match &entry.image {
            Some(i) => Some((
                self.storage(&Self::image_file(i, IMAGE_RAW), Access::Read)?,
                entry.backing.expect("image implies backing"),
            )),
            None => None,
        };
        let meta = self.storage(&Self::volume_file(name, VOLUME_META), Access::ReadWrite)?;
        let data = self.storage(&Self::volume_file(name, VOLUME_DATA), Access::ReadWrite)?;
        Volume::open_with_cache(meta, data, backing, cache_pages)
            .map_err(vol_err(format!("opening volume {name:?}")))
    }

    /// Deletes a volume (the caller has disconnected its clients).
    pub fn delete_volume(&self, name: &str) -> Result<(), PoolError> {
        let mut c = self.catalog.lock();
        if !c.volumes.contains_key(name) {
            return Err(PoolError::NotFound {
                kind: "volume",
                name: name.into(),
            });
        }
        self.trash("volumes", name)?;
        c.volumes.remove(name);
        Ok(())
    }

    /// Deletes a golden image; refused while volumes are cloned from it.
    pub fn delete_image(&self, name: &str) -> Result<(), PoolError> {
        let mut c = self.catalog.lock();
        if !c.images.contains_key(name) {
            return Err(PoolError::NotFound {
                kind: "image",
                name: name.into(),
            });
        }
        let users: Vec<&str> = c
            .volumes
            .values()
            .filter(|v| v.image.as_deref() == Some(name))
            .map(|v| v.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(PoolError::InUse(format!(
                "image {name:?} has {} volume(s) cloned from it: {}",
                users.len(),
                users.join(", ")
            )));
        }
        self.trash("images", name)?;
        c.images.remove(name);
        Ok(())
    }

    fn trash(&self, kind_dir: &str, name: &str) -> Result<(), PoolError> {
        let to = Path::new(".trash").join(image::hex(&random_id()));
        let err = io_err(format!("deleting {name:?}"));
        self.dir
            .rename(&Path::new(kind_dir).join(name), &to, true)
            .map_err(&err)?;
        self.dir.sync_dir(Path::new(kind_dir)).map_err(&err)?;
        self.dir.sync_dir(Path::new(".trash")).map_err(&err)?;
        self.dir.remove_all(&to).map_err(err)
    }

    /// Seals volume `from` (quiesced by the caller) into a new golden image `name`: flattened.
    pub fn capture(
        &self,
        name: &str,
        from: &str,
        stop: Stop<'_>,
        progress: impl FnMut(u64),
    ) -> Result<ImageEntry, PoolError> {
        let res = self.reserve("image", name)?;
        let mut vol = self.open_volume(from)?;
        let staged = self.staging()?;
        let cleanup = self.cleanup(&staged);
        let mut raw = Stoppable {
            inner: self.create(&staged.join(IMAGE_RAW))?,
            stop,
        };
        let info = vol
            .capture(&mut raw, random_id(), progress)
            .map_err(vol_err(format!("capturing volume {from:?}")))?;
        stop().map_err(PoolError::Cancelled)?;
        let entry = self.publish_image(cleanup, name, info)?;
        drop(res);
        Ok(entry)
    }

    /// Grows a volume (new connections see the new size).
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeEntry, PoolError> {
        let mut v = self.open_volume(name)?;
        let refused = |e| match e {
            VolumeError::Invalid(m) => PoolError::Invalid(m),
            e => vol_err(format!("resizing volume {name:?}"))(e),
        };
        // Checked before space is reserved for the new size's metadata, and the reservation
        // given back if the grow fails: a refused size must not leave gigabytes allocated.
        v.check_grow(size).map_err(refused)?;
        volume_format::file::reserve_metadata(v.files().0.file(), size)
            .map_err(io_err(format!("resizing volume {name:?}")))?;
        if let Err(e) = v.grow(size) {
            let _ = volume_format::file::release_metadata_reserve(v.files().0.file());
            return Err(refused(e));
        }
        v.close()
            .map_err(vol_err(format!("resizing volume {name:?}")))?;
        let mut c = self.catalog.lock();
        let e = c.volumes.get_mut(name).ok_or_else(|| PoolError::NotFound {
            kind: "volume",
            name: name.into(),
        })?;
        e.size = size;
        Ok(e.clone())
    }

    /// Whether the last node serving this pool stopped cleanly; the mark is removed, so a
    /// crash of this one is seen by the next.
    /// A mark that cannot be removed is an error: left in place, it would make this node's
    /// crash look like a clean stop to the next start.
    pub fn take_clean_stop(&self) -> Result<bool, PoolError> {
        let was = self.dir.stat(Path::new(CLEAN_STOP)).is_ok();
        if was {
            let err = io_err("removing the clean-stop mark");
            self.dir.remove_all(Path::new(CLEAN_STOP)).map_err(&err)?;
            self.dir.sync_dir(Path::new(".")).map_err(err)?;
        }
        Ok(was)
    }

    /// Marks the pool stopped cleanly (see `take_clean_stop`).
    pub fn mark_clean_stop(&self) -> Result<(), PoolError> {
        let err = io_err("marking the pool stopped cleanly");
        self.dir
            .open_file(Path::new(CLEAN_STOP), Access::CreateOrOpen)
            .map_err(&err)?;
        self.dir.sync_dir(Path::new(".")).map_err(err)
    }

    /// Records the outcome of image `name`'s verification durably: `Some(why)` it failed (no
    /// clones of it until one passes), `None` it passed.
    pub fn set_failed_verify(&self, name: &str, why: Option<&str>) -> Result<(), PoolError> {
        // In memory first: even if the record cannot be written, this node clones no image it
        // found damaged.
        if let Some(e) = self.catalog.lock().images.get_mut(name) {
            e.failed_verify = why.map(str::to_owned);
        }
        let rel = Self::image_file(name, VERIFY_FAILED);
        let err = io_err(format!("recording the verification of image {name:?}"));
        match why {
            Some(why) => {
                let tmp = Self::image_file(name, ".verify-failed.tmp");
                let _ = self.dir.remove_all(&tmp);
                let mut f = self.dir.open_file(&tmp, Access::CreateNew).map_err(&err)?;
                std::io::Write::write_all(&mut f, why.as_bytes()).map_err(&err)?;
                f.sync_all().map_err(&err)?;
                self.dir.rename(&tmp, &rel, false).map_err(&err)?;
            }
            None => self.dir.remove_all(&rel).map_err(&err)?,
        }
        self.dir
            .sync_dir(&Path::new("images").join(name))
            .map_err(err)?;
        Ok(())
    }

    /// Volume `name`'s personality record (JSON), if it has one.
    pub fn personality(&self, name: &str) -> Result<Option<Vec<u8>>, PoolError> {
        self.volume(name)?;
        self.personality_record(name)
    }

    /// Volume `name`'s personality record, for a name the pool listed (a damaged volume's
    /// too: its record still holds its addresses). A record larger than any personality is
    /// refused, not cut short.
    pub fn personality_record(&self, name: &str) -> Result<Option<Vec<u8>>, PoolError> {
        self.volume_record(name, PERSONALITY)
    }

    /// A record beside volume `name`'s files (`file`: `personality.json`, `pair.json`).
    pub fn volume_record(&self, name: &str, file: &str) -> Result<Option<Vec<u8>>, PoolError> {
        validate_existing_name(name).map_err(PoolError::Invalid)?;
        let rel = Self::volume_file(name, file);
        match self.dir.open_file(&rel, Access::Read) {
            Ok(mut f) => {
                let mut b = Vec::new();
                // A record is a few KiB; a huge file is not one of ours.
                (&mut f)
                    .take((1 << 20) + 1)
                    .read_to_end(&mut b)
                    .map_err(io_err(format!("reading volume {name:?}'s {file}")))?;
                if b.len() > 1 << 20 {
                    return Err(PoolError::Invalid(format!(
                        "volume {name:?}'s {file} is larger than 1 MiB"
                    )));
                }
                Ok(Some(b))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("reading volume {name:?}'s {file}"))(e)),
        }
    }

    /// Replaces volume `name`'s personality record (or removes it), atomically and durably: the
    /// new record is written and synced beside the old, renamed over it, and the directory
    /// synced, so a crash leaves the old record or the new, never a mix. It goes with the volume
    /// when the volume is deleted.
    pub fn set_personality(&self, name: &str, record: Option<&[u8]>) -> Result<(), PoolError> {
        self.set_volume_record(name, PERSONALITY, record)
    }

    /// Replaces (or removes) the record `file` beside volume `name`'s files, atomically and
    /// durably, as [`Pool::set_personality`] does.
    pub fn set_volume_record(
        &self,
        name: &str,
        file: &str,
        record: Option<&[u8]>,
    ) -> Result<(), PoolError> {
        self.volume(name)?;
        let rel = Self::volume_file(name, file);
        let err = io_err(format!("recording volume {name:?}'s {file}"));
        match record {
            Some(bytes) => {
                let tmp = Self::volume_file(name, &format!(".{file}.tmp"));
                let _ = self.dir.remove_all(&tmp);
                let mut f = self.dir.open_file(&tmp, Access::CreateNew).map_err(&err)?;
                std::io::Write::write_all(&mut f, bytes).map_err(&err)?;
                f.sync_all().map_err(&err)?;
                self.dir.rename(&tmp, &rel, false).map_err(&err)?;
            }
            None => self.dir.remove_all(&rel).map_err(&err)?,
        }
        self.dir
            .sync_dir(&Path::new("volumes").join(name))
            .map_err(err)
    }

    /// Volume `name`'s activity log file (`activity.log`, `target/activity.rs`), opened for
    /// reading and writing; created (and its directory synced) if missing. True when it
    /// existed.
    pub fn open_activity_log(&self, name: &str) -> Result<(File, bool), PoolError> {
        self.volume(name)?;
        let rel = Self::volume_file(name, ACTIVITY_LOG);
        let err = io_err(format!("opening volume {name:?}'s {ACTIVITY_LOG}"));
        match self.dir.open_file(&rel, Access::ReadWrite) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let f = self
            .dir
            .open_file(&rel, Access::CreateOrOpen)
            .map_err(&err)?;
        self.dir
            .sync_dir(&Path::new("volumes").join(name))
            .map_err(err)?;
        Ok((f, false))
    }

    /// The IP pools' records (JSON), by name.
    pub fn ip_pools(&self) -> Result<Vec<(String, Vec<u8>)>, PoolError> {
        let err = io_err("listing the IP pools".to_string());
        let names = match self.dir.entries(Path::new(IPPOOLS)) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        let mut out = Vec::new();
        for n in names {
            let Some(name) = n.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue; // a temporary file, or not ours
            };
            let mut b = Vec::new();
            let mut f = self
                .dir
                .open_file(&Path::new(IPPOOLS).join(&n), Access::Read)
                .map_err(&err)?;
            (&mut f).take(1 << 20).read_to_end(&mut b).map_err(&err)?;
            out.push((name.to_owned(), b));
        }
        out.sort();
        Ok(out)
    }

    /// Records a new IP pool, atomically (refused if one of that name exists).
    pub fn create_ip_pool(&self, name: &str, record: &[u8]) -> Result<(), PoolError> {
        validate_name(name).map_err(PoolError::Invalid)?;
        let err = io_err(format!("recording IP pool {name:?}"));
        self.dir.ensure_dir(Path::new(IPPOOLS)).map_err(&err)?;
        // The directory's own entry, if it was just made.
        self.dir.sync_dir(Path::new(".")).map_err(&err)?;
        let rel = Path::new(IPPOOLS).join(format!("{name}.json"));
        let tmp = Path::new(IPPOOLS).join(format!(".{name}.tmp"));
        let _ = self.dir.remove_all(&tmp);
        let mut f = self.dir.open_file(&tmp, Access::CreateNew).map_err(&err)?;
        std::io::Write::write_all(&mut f, record).map_err(&err)?;
        f.sync_all().map_err(&err)?;
        match self.dir.rename(&tmp, &rel, true) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = self.dir.remove_all(&tmp);
                return Err(PoolError::Exists {
                    kind: "IP pool",
                    name: name.to_owned(),
                });
            }
            Err(e) => return Err(err(e)),
        }
        self.dir.sync_dir(Path::new(IPPOOLS)).map_err(err)
    }

    /// Removes IP pool `name`'s record.
    pub fn delete_ip_pool(&self, name: &str) -> Result<(), PoolError> {
        let err = io_err(format!("deleting IP pool {name:?}"));
        let rel = Path::new(IPPOOLS).join(format!("{name}.json"));
        self.dir.remove_all(&rel).map_err(&err)?;
        self.dir.sync_dir(Path::new(IPPOOLS)).map_err(err)
    }

    /// Re-reads image `name` and checks it against its digest.
    pub fn verify_image(
        &self,
        name: &str,
        stop: Stop<'_>,
        progress: impl FnMut(u64),
    ) -> Result<image::VerifyReport, PoolError> {
        let entry = self.image(name)?;
        let mut raw = Stoppable {
            inner: self.storage(&Self::image_file(name, IMAGE_RAW), Access::Read)?,
            stop,
        };
        image::verify(&mut raw, &entry.info, progress)
            .map_err(io_err(format!("reading image {name:?}")))
    }

    /// Runs the checker over every volume (closed ones: the caller keeps them unserved).
    pub fn check(&self, repair: bool) -> Result<PoolCheck, PoolError> {
        let mut out = Vec::new();
        for v in self.volumes() {
            out.push((v.name.clone(), self.check_volume(&v.name, repair)?));
        }
        Ok(PoolCheck { volumes: out })
    }

    /// Runs the checker over one closed volume.
    pub fn check_volume(
        &self,
        name: &str,
        repair: bool,
    ) -> Result<volume_format::CheckReport, PoolError> {
        self.volume(name)?;
        let access = if repair {
            Access::ReadWrite
        } else {
            Access::Read
        };
        let mut meta = self.storage(&Self::volume_file(name, VOLUME_META), access)?;
        let mut data = self.storage(&Self::volume_file(name, VOLUME_DATA), access)?;
        Ok(check(&mut meta, &mut data, repair))
    }

    /// Opens a pool file as storage.
    fn storage(&self, rel: &Path, access: Access) -> Result<FileStorage, PoolError> {
        let what = || format!("opening {}", self.dir.path().join(rel).display());
        let f = self.dir.open_file(rel, access).map_err(io_err(what()))?;
        FileStorage::new(f).map_err(io_err(what()))
    }

    /// Creates a new pool file (mode 0600) as storage.
    fn create(&self, rel: &Path) -> Result<FileStorage, PoolError> {
        self.storage(rel, Access::CreateNew)
    }

    /// Removes the staging directory `rel` when dropped, unless disarmed.
    fn cleanup(&self, rel: &Path) -> Cleanup<'_> {
        Cleanup {
            dir: &self.dir,
            path: rel.to_owned(),
        }
    }
}

struct Reservation<'a> {
    pool: &'a Pool,
    kind: &'static str,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.pool
            .catalog
            .lock()
            .reserved
            .remove(&(self.kind, std::mem::take(&mut self.name)));
    }
}

/// Removes a staging directory unless the object was published.
struct Cleanup<'a> {
    dir: &'a PoolDir,
    /// Relative to the pool.
    path: PathBuf,
}

impl Cleanup<'_> {
    fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = self.dir.remove_all(&self.path);
    }
}

fn list_dir(dir: &PoolDir, sub: &str) -> Result<Vec<String>, PoolError> {
    let what = || format!("reading {}", dir.path().join(sub).display());
    let mut names = Vec::new();
    for n in dir.entries(Path::new(sub)).map_err(io_err(what()))? {
        let name = n
            .into_string()
            .map_err(|n| PoolError::Invalid(format!("{}: {n:?} is not a valid name", what())))?;
        validate_existing_name(&name)
            .map_err(|m| PoolError::Invalid(format!("{}: {m}", what())))?;
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// Why image `name`'s last verification failed, if it did.
/// Fails closed: a record that exists but cannot be read still keeps clones away.
fn read_failed_verify(dir: &PoolDir, name: &str) -> Option<String> {
    let rel = Pool::image_file(name, VERIFY_FAILED);
    match dir.open_file(&rel, Access::Read) {
        Ok(f) => {
            let mut why = String::new();
            match f.take(4096).read_to_string(&mut why) {
                Ok(_) => Some(why),
                Err(e) => Some(format!("(its record could not be read: {e})")),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("(its record could not be read: {e})")),
    }
}

/// An image's sealed metadata, checked.
fn load_image(dir: &PoolDir, name: &str) -> Result<ImageInfo, PoolError> {
    let rel = Pool::image_file(name, IMAGE_META);
    let f = dir
        .open_file(&rel, Access::Read)
        .map_err(io_err(format!("image {name:?}")))?;
    let mut meta = FileStorage::new(f).map_err(io_err(format!("image {name:?}")))?;
    ImageInfo::load(&mut meta).map_err(vol_err(format!("image {name:?}")))
}

/// A volume's catalog entry from its superblocks (the block map is loaded when it is opened).
fn load_volume(
    dir: &PoolDir,
    name: &str,
    images: &BTreeMap<String, ImageEntry>,
) -> Result<VolumeEntry, PoolError> {
    let f = dir
        .open_file(&Pool::volume_file(name, VOLUME_META), Access::Read)
        .map_err(io_err(format!("volume {name:?}")))?;
    let mut meta = FileStorage::new(f).map_err(io_err(format!("volume {name:?}")))?;
    let mut a = [0u8; 4096];
    let mut b = [0u8; 4096];
    meta.read_at(0, &mut a)
        .map_err(io_err(format!("volume {name:?}")))?;
    meta.read_at(4096, &mut b)
        .map_err(io_err(format!("volume {name:?}")))?;
    let sb = volume_format::Superblock::choose(&a, &b)
        .map_err(|e| vol_err(format!("volume {name:?}"))(e.into()))?;
    let backing = (sb.backing_id != [0; 16]).then_some(ImageRef {
        id: sb.backing_id,
        size: sb.backing_size_bytes,
        digest: sb.backing_digest,
    });
    let image = match &backing {
        None => None,
        Some(r) => Some(
            images
                .values()
                .find(|i| i.info.image_ref() == *r)
                .map(|i| i.name.clone())
                .ok_or_else(|| {
                    PoolError::Invalid(format!(
                        "volume {name:?}: its golden image {} is missing from the pool",
                        image::hex(&r.id)
                    ))
                })?,
        ),
    };
    Ok(VolumeEntry {
        name: name.to_owned(),
        size: sb.size_bytes,
        image,
        backing,
    })
}

/// 16 random bytes from the kernel, never all zero.
pub fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .expect("/dev/urandom is readable");
    id[0] |= 1;
    id
}

#[cfg(test)]
mod tests;

/// Finishes the redeploys a crash stopped (`Pool::redeploy_volume`): a staged volume with a
/// note whose old volume was already renamed to `keep_as` is published as `name`; a published
/// volume with a note gets its last steps. A staged one whose old volume was not renamed yet
/// is left to the sweep (the redeploy did not happen).
fn finish_redeploys(dir: &PoolDir) -> Result<(), PoolError> {
    let note_of = |d: &Path| -> Option<RedeployNote> {
        let mut f = dir.open_file(&d.join(REDEPLOY_NOTE), Access::Read).ok()?;
        let mut text = String::new();
        f.read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    };
    let err = io_err("finishing an interrupted redeploy");
    let exists = |p: &Path| dir.stat(p).is_ok();
    for s in dir.entries(Path::new(".staging")).map_err(&err)? {
        let staged = Path::new(".staging").join(&s);
        let Some(n) = note_of(&staged) else { continue };
        if crate::names::validate_name(&n.name).is_err()
            || crate::names::validate_name(&n.keep_as).is_err()
        {
            continue;
        }
        let live = Path::new("volumes").join(&n.name);
        if !exists(&live) && exists(&Path::new("volumes").join(&n.keep_as)) {
            tracing::warn!(volume = %n.name, "finishing its redeploy (the node stopped in it)");
            dir.rename(&staged, &live, true).map_err(&err)?;
            dir.sync_dir(Path::new("volumes")).map_err(&err)?;
        }
    }
    for v in dir.entries(Path::new("volumes")).map_err(&err)? {
        let Some(n) = note_of(&Path::new("volumes").join(&v)) else {
            continue;
        };
        if v.to_str() == Some(n.name.as_str()) && crate::names::validate_name(&n.keep_as).is_ok() {
            finish_redeploy(dir, &n.name, &n.keep_as).map_err(&err)?;
        }
    }
    Ok(())
}

fn finish_redeploy(dir: &PoolDir, name: &str, keep: &str) -> io::Result<()> {
    let kept = Path::new("volumes").join(keep);
    match dir.rename(
        &kept.join(PERSONALITY),
        &kept.join(PERSONALITY_PREVIOUS),
        false,
    ) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        r => r?,
    }
    dir.sync_dir(&kept)?;
    let live = Path::new("volumes").join(name);
    dir.remove_file(&live.join(REDEPLOY_NOTE))?;
    dir.sync_dir(&live)
}
