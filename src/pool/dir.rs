//! The pool's directory, reached by descriptor. Every file and directory of the pool is opened,
//! created, renamed and removed beneath one descriptor with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` and the `*at` calls, never by a path the kernel walks again: a symlink
//! planted in the pool (`images/evil/image.raw -> /etc/shadow`, `.staging -> /victim`) is
//! refused, not followed, and nothing outside the pool is touched through it.
//!
//! The directory itself must be one only the node's user can change: owned by it and writable
//! by no one else, in directories owned by root or that user and writable by no one else
//! (a sticky directory such as `/tmp` is fine: others cannot rename or remove what is ours in
//! it). Files are created `0600` and directories `0700`, whatever the umask, and `tighten`
//! brings a pool made by an older version (`0644` files in `0755` directories) in line.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, RenameFlags, ResolveFlags, Stat};

/// Files of the pool: read and write for the node's user only.
const FILE_MODE: u32 = 0o600;
/// Directories of the pool.
const DIR_MODE: u32 = 0o700;

/// How a pool file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
    /// Created read-write; fails if it exists.
    CreateNew,
    /// Created read-write if missing (the lock file).
    CreateOrOpen,
}

pub struct PoolDir {
    fd: OwnedFd,
    path: PathBuf,
    uid: u32,
}

fn resolve() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// `open` errors with the path and, for a symlink in the way, what happened.
fn explain(e: rustix::io::Errno, what: &str, rel: &Path, root: &Path) -> io::Error {
    let p = root.join(rel);
    match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{what} {}: a symbolic link is in the way; the pool follows none",
                p.display()
            ),
        ),
        rustix::io::Errno::NOTDIR => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{what} {}: not a directory (a file, or a symbolic link, which the pool never \
                 follows)",
                p.display()
            ),
        ),
        e => {
            let e = io::Error::from(e);
            io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
        }
    }
}

impl PoolDir {
    /// Opens the pool directory at `path` (with `create`, creating it and its parents if
    /// missing), after checking that no one but the node's user (and root) can change it or
    /// the directories above it.
    pub fn open(path: &Path, create: bool) -> io::Result<PoolDir> {
        let uid = rustix::process::geteuid().as_raw();
        // A bare name's directory is the current one: it is checked like any other.
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if create {
            std::fs::create_dir_all(parent).map_err(|e| {
                io::Error::new(e.kind(), format!("creating {}: {e}", parent.display()))
            })?;
        }
        // From here on the pool is reached through the directories that were checked, not
        // through the path again: a symbolic link on the way (which may sit in a directory
        // someone else can change) is resolved once, and its target is what gets checked.
        let target = if parent.exists() {
            check_ancestors(parent, uid)?;
            let canonical = std::fs::canonicalize(parent)?;
            match path.file_name() {
                Some(name) => canonical.join(name),
                None => std::fs::canonicalize(path)?,
            }
        } else {
            path.to_owned()
        };
        let path_shown = path;
        let path = target.as_path();
        if !create && std::fs::symlink_metadata(path).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} does not exist: give --create to make a new pool there (a mistyped \
                     --data-dir or STREAMER_DATA_DIR would otherwise serve an empty pool)",
                    path.display()
                ),
            ));
        }
        match rustix::fs::mkdirat(CWD, path, Mode::from_raw_mode(DIR_MODE)) {
            Ok(()) => tracing::info!("created a new, empty pool in {}", path.display()),
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("creating {}: {e}", path.display()),
                ));
            }
        }
        let fd = rustix::fs::openat(
            CWD,
            path,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a directory (a symbolic link or a file): a pool must be a \
                     directory of its own",
                    path.display()
                ),
            ),
            e => io::Error::new(
                io::Error::from(e).kind(),
                format!("opening {}: {e}", path.display()),
            ),
        })?;
        let st = rustix::fs::fstat(&fd)?;
        if st.st_uid != uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is owned by uid {}, not by the node's user (uid {uid}): a pool must \
                     belong to the user that serves it",
                    path.display(),
                    st.st_uid
                ),
            ));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is writable by {} (mode {:o}): another user could plant files in the \
                     pool; `chmod go-w` it",
                    path.display(),
                    if st.st_mode & 0o002 != 0 {
                        "everyone"
                    } else {
                        "its group"
                    },
                    st.st_mode & 0o7777
                ),
            ));
        }
        Ok(PoolDir {
            fd,
            // As the operator named it (status shows it).
            path: path_shown.to_owned(),
            uid,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens a file beneath the pool.
    pub fn open_file(&self, rel: &Path, access: Access) -> io::Result<File> {
        let flags = match access {
            Access::Read => OFlags::RDONLY,
            Access::ReadWrite => OFlags::RDWR,
            Access::CreateNew => OFlags::RDWR | OFlags::CREATE | OFlags::EXCL,
            Access::CreateOrOpen => OFlags::RDWR | OFlags::CREATE,
        };
        // openat2 refuses a mode without O_CREAT.
        let mode = if flags.contains(OFlags::CREATE) {
            Mode::from_raw_mode(FILE_MODE)
        } else {
            Mode::empty()
        };
        let fd = rustix::fs::openat2(
            &self.fd,
            rel,
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY,
            mode,
            resolve(),
        )
        .map_err(|e| {
            let what = match access {
                Access::CreateNew | Access::CreateOrOpen => "creating",
                _ => "opening",
            };
            explain(e, what, rel, &self.path)
        })?;
        let f = File::from(fd);
        if matches!(access, Access::Read | Access::ReadWrite) && !f.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", self.path.join(rel).display()),
            ));
        }
        Ok(f)
    }

    /// Opens a directory beneath the pool (`.` for the pool itself).
    fn open_dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        rustix::fs::openat2(
            &self.fd,
            rel,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
            resolve(),
        )
        .map_err(|e| explain(e, "opening", rel, &self.path))
    }

    /// Creates a directory (mode 0700); fails if it exists.
    pub fn create_dir(&self, rel: &Path) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let p = self.open_dir(parent)?;
        rustix::fs::mkdirat(&p, name, Mode::from_raw_mode(DIR_MODE))
            .map_err(|e| explain(e, "creating", rel, &self.path))
    }

    /// Makes sure `rel` is a directory of the pool's own: created if missing; refused if it is
    /// a symlink or anything else, or owned by another user.
    pub fn ensure_dir(&self, rel: &Path) -> io::Result<()> {
        match self.create_dir(rel) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let st = self.stat(rel)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is not a directory (a symbolic link or a file): refused",
                    self.path.join(rel).display()
                ),
            ));
        }
        if st.st_uid != self.uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is owned by uid {}, not by the node's user (uid {})",
                    self.path.join(rel).display(),
                    st.st_uid,
                    self.uid
                ),
            ));
        }
        Ok(())
    }

    /// Renames beneath the pool; with `no_replace`, fails if `to` exists.
    pub fn rename(&self, from: &Path, to: &Path, no_replace: bool) -> io::Result<()> {
        let (fp, fname) = split(from)?;
        let (tp, tname) = split(to)?;
        let (fd, td) = (self.open_dir(fp)?, self.open_dir(tp)?);
        let flags = if no_replace {
            RenameFlags::NOREPLACE
        } else {
            RenameFlags::empty()
        };
        let renamed = match rustix::fs::renameat_with(&fd, fname, &td, tname, flags) {
            // A file system without RENAME_NOREPLACE (FUSE pass-throughs refuse it): no one
            // but this process changes the pool (its directory is the node user's alone, and
            // the pool lock keeps other nodes out), so "check, then rename" is as safe here.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) if no_replace => {
                match rustix::fs::statat(&td, tname, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(_) => Err(rustix::io::Errno::EXIST),
                    Err(rustix::io::Errno::NOENT) => rustix::fs::renameat(&fd, fname, &td, tname),
                    Err(e) => Err(e),
                }
            }
            r => r,
        };
        renamed.map_err(|e| {
            let e = io::Error::from(e);
            io::Error::new(
                e.kind(),
                format!(
                    "renaming {} to {}: {e}",
                    self.path.join(from).display(),
                    self.path.join(to).display()
                ),
            )
        })
    }

    /// Swaps `a` and `b` in one step (`RENAME_EXCHANGE`): both exist before and after.
    pub fn exchange(&self, a: &Path, b: &Path) -> io::Result<()> {
        let (ap, an) = split(a)?;
        let (bp, bn) = split(b)?;
        let (ad, bd) = (self.open_dir(ap)?, self.open_dir(bp)?);
        rustix::fs::renameat_with(&ad, an, &bd, bn, RenameFlags::EXCHANGE).map_err(|e| {
            let e = io::Error::from(e);
            io::Error::new(
                e.kind(),
                format!(
                    "exchanging {} and {}: {e}",
                    self.path.join(a).display(),
                    self.path.join(b).display()
                ),
            )
        })
    }

    /// Removes the file `rel` (not a directory).
    pub fn remove_file(&self, rel: &Path) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let p = self.open_dir(parent)?;
        rustix::fs::unlinkat(&p, name, AtFlags::empty()).map_err(|e| {
            let e = io::Error::from(e);
            io::Error::new(
                e.kind(),
                format!("removing {}: {e}", self.path.join(rel).display()),
            )
        })
    }

    /// Removes `rel` and everything under it, by descriptor: a symlink inside is removed, never
    /// followed.
    pub fn remove_all(&self, rel: &Path) -> io::Result<()> {
        let (parent, name) = split(rel)?;
        let p = self.open_dir(parent)?;
        remove_tree(&p, name).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("removing {}: {e}", self.path.join(rel).display()),
            )
        })
    }

    /// The names in directory `rel`.
    pub fn entries(&self, rel: &Path) -> io::Result<Vec<OsString>> {
        names_in(&self.open_dir(rel)?)
    }

    /// fsyncs directory `rel` (`.` for the pool itself).
    pub fn sync_dir(&self, rel: &Path) -> io::Result<()> {
        let d = self.open_dir(rel)?;
        rustix::fs::fsync(&d).map_err(|e| {
            let e = io::Error::from(e);
            io::Error::new(
                e.kind(),
                format!("syncing {}: {e}", self.path.join(rel).display()),
            )
        })
    }

    /// `lstat` beneath the pool.
    pub fn stat(&self, rel: &Path) -> io::Result<Stat> {
        let (parent, name) = split(rel)?;
        let p = self.open_dir(parent)?;
        rustix::fs::statat(&p, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| explain(e, "reading", rel, &self.path))
    }

    /// Disk space `rel` takes (0 when it cannot be read).
    pub fn allocated(&self, rel: &Path) -> u64 {
        self.stat(rel).map_or(0, |s| s.st_blocks as u64 * 512)
    }

    /// Gives `gid` search (not read) permission on the pool directory: members of the admin
    /// group reach the management socket inside it and nothing else.
    pub fn grant_search(&self, gid: u32) -> io::Result<()> {
        rustix::fs::fchown(&self.fd, None, Some(rustix::fs::Gid::from_raw(gid)))?;
        rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(DIR_MODE | 0o010))?;
        Ok(())
    }

    /// Takes every permission for group and others off the pool's files and directories (a
    /// pool made by an older version had 0644 volumes in 0755 directories: any local user could
    /// read every server's disk). The pool directory keeps group search if it has it.
    pub fn tighten(&self) -> io::Result<usize> {
        let st = rustix::fs::fstat(&self.fd)?;
        let keep = st.st_mode & 0o010;
        let mut changed = 0;
        if st.st_mode & 0o077 & !keep != 0 {
            rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(DIR_MODE | keep))?;
            changed += 1;
        }
        changed += tighten_tree(&self.fd)?;
        Ok(changed)
    }
}

/// Splits `rel` into its parent (`.` when none) and its last component.
fn split(rel: &Path) -> io::Result<(&Path, &std::ffi::OsStr)> {
    let name = rel.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", rel.display()),
        )
    })?;
    let parent = rel
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok((parent, name))
}

/// The names in the open directory `dir`, without `.` and `..`.
fn names_in(dir: &impl AsFd) -> io::Result<Vec<OsString>> {
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let n = e?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(OsString::from_vec(n));
        }
    }
    Ok(names)
}

/// Removes `name` in `dir`, descending into directories by descriptor without following links.
fn remove_tree(dir: &impl AsFd, name: &std::ffi::OsStr) -> io::Result<()> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rustix::fs::unlinkat(dir, name, AtFlags::empty()).map_err(Into::into);
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for n in names_in(&sub)? {
        remove_tree(&sub, &n)?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(Into::into)
}

/// `chmod go-rwx` on everything below `dir` (not following links); returns how many changed.
fn tighten_tree(dir: &impl AsFd) -> io::Result<usize> {
    let mut changed = 0;
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let n = e.file_name();
        if n.to_bytes() == b"." || n.to_bytes() == b".." {
            continue;
        }
        let st = rustix::fs::statat(dir, n, AtFlags::SYMLINK_NOFOLLOW)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let sub = rustix::fs::openat(
                    dir,
                    n,
                    OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
                    Mode::empty(),
                )?;
                if st.st_mode & 0o077 != 0 {
                    rustix::fs::fchmod(&sub, Mode::from_raw_mode(st.st_mode & 0o700))?;
                    changed += 1;
                }
                changed += tighten_tree(&sub)?;
            }
            FileType::RegularFile if st.st_mode & 0o077 != 0 => {
                rustix::fs::chmodat(
                    dir,
                    n,
                    Mode::from_raw_mode(st.st_mode & 0o700),
                    AtFlags::empty(),
                )?;
                changed += 1;
            }
            // Sockets (the management socket keeps the mode it was given), links (never
            // followed, their own mode means nothing) and anything else are left alone.
            _ => {}
        }
    }
    Ok(changed)
}

/// Checks that no one but root and `uid` can change `dir` or any directory above it (a
/// sticky directory writable by others is fine: they cannot rename or remove what is not
/// theirs in it).
pub fn check_ancestors(dir: &Path, uid: u32) -> io::Result<()> {
    let canonical = std::fs::canonicalize(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("resolving {}: {e}", dir.display())))?;
    let mut at = PathBuf::new();
    for c in canonical.components() {
        at.push(c);
        let st = rustix::fs::statat(CWD, &at, AtFlags::empty()).map_err(|e| {
            io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", at.display()))
        })?;
        if st.st_uid != 0 && st.st_uid != uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is owned by uid {}: the node's files must sit in directories that \
                     only root or the node's user (uid {uid}) can change",
                    at.display(),
                    st.st_uid
                ),
            ));
        }
        let sticky = st.st_mode & 0o1000 != 0;
        if st.st_mode & 0o022 != 0 && !sticky {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is writable by other users (mode {:o}): they could swap the node's \
                     files for links; `chmod go-w` it",
                    at.display(),
                    st.st_mode & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("streamer-dir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// `.staging -> /victim` used to have the victim's subdirectories deleted by the sweep.
    #[test]
    fn remove_all_never_follows_a_link() {
        let base = scratch("links");
        let victim = base.join("victim");
        std::fs::create_dir_all(victim.join("keep/deep")).unwrap();
        std::fs::write(victim.join("keep/deep/file"), b"x").unwrap();
        let pool = PoolDir::open(&base.join("pool"), true).unwrap();
        pool.create_dir(Path::new("junk")).unwrap();
        std::os::unix::fs::symlink(&victim, base.join("pool/junk/link")).unwrap();
        std::os::unix::fs::symlink(&victim, base.join("pool/staging-link")).unwrap();
        pool.remove_all(Path::new("junk")).unwrap();
        assert!(!base.join("pool/junk").exists());
        let e = pool.entries(Path::new("staging-link")).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = pool
            .open_file(Path::new("staging-link/keep/deep/file"), Access::Read)
            .unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        pool.remove_all(Path::new("staging-link")).unwrap();
        assert!(victim.join("keep/deep/file").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn opens_refuse_links_and_creates_are_private() {
        let base = scratch("open");
        let pool = PoolDir::open(&base.join("pool"), true).unwrap();
        std::fs::write(base.join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(base.join("outside"), base.join("pool/link")).unwrap();
        let e = pool.open_file(Path::new("link"), Access::Read).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = pool
            .open_file(Path::new("link"), Access::CreateOrOpen)
            .unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = pool
            .open_file(Path::new("../outside"), Access::Read)
            .unwrap_err();
        assert!(
            e.to_string().contains("symbolic link") || e.kind() == io::ErrorKind::PermissionDenied,
            "{e}"
        );
        pool.create_dir(Path::new("d")).unwrap();
        let f = pool.open_file(Path::new("d/f"), Access::CreateNew).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        let d = std::fs::metadata(base.join("pool/d")).unwrap();
        assert_eq!(d.permissions().mode() & 0o777, 0o700);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = scratch("perm");
        std::fs::create_dir_all(base.join("open/pool")).unwrap();
        std::fs::set_permissions(base.join("open"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        let e = PoolDir::open(&base.join("open/pool"), true).err().unwrap();
        assert!(e.to_string().contains("writable by other users"), "{e}");
        std::fs::set_permissions(base.join("open"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        PoolDir::open(&base.join("open/pool"), true).unwrap();
        std::fs::set_permissions(
            base.join("open/pool"),
            std::fs::Permissions::from_mode(0o777),
        )
        .unwrap();
        let e = PoolDir::open(&base.join("open/pool"), true).err().unwrap();
        assert!(e.to_string().contains("writable by everyone"), "{e}");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
