//! A raw file (or block device) served as it is, the way qemu-nbd serves a raw image.
//!
//! In direct mode the file is opened twice: with `O_DIRECT` for requests aligned to the device's
//! logical block size, and through the page cache for the rest, so clients that ignore the
//! advertised minimum block size still work. The kernel keeps the two coherent (a direct read first
//! writes back dirty cached pages in its range; a direct write invalidates them), and `fdatasync`
//! on either descriptor flushes the whole inode, so `FLUSH` covers both paths.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use super::{
    BUFFER_ALIGN, BlockTarget, FileIo, Geometry, Plan, Progress, TargetError, TargetOp,
    ZERO_WRITE_BYTES, push_extent,
};
use crate::nbd::wire::{STATE_HOLE, STATE_ZERO};
use nix::unistd::Whence;

/// How data reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheMode {
    /// `O_DIRECT`: no page cache (qemu-nbd `--cache=none`).
    Direct,
    /// Through the page cache (qemu-nbd `--cache=writeback`).
    Buffered,
}

/// Most extents one BLOCK_STATUS reply describes for a file. Each costs up to two `lseek`
/// calls (`SEEK_DATA`/`SEEK_HOLE` have no io_uring operation) on the I/O thread, which serves
/// every other connection of that thread meanwhile: a client that fragments a file with 4 KiB
/// trims and asks for its whole map must not stall them for long. A reply may describe less than
/// the range asked for; clients ask again from where it ends.
const MAX_SEEK_EXTENTS: usize = 1024;

const PREFERRED_BLOCK_BYTES: u32 = 4096;

pub struct FileTarget {
    /// Page-cache descriptor: unaligned I/O, fallocate, fdatasync, lseek.
    buffered: File,
    /// `O_DIRECT` descriptor in direct mode.
    direct: Option<File>,
    /// Alignment `O_DIRECT` needs (offset, length and buffer address).
    direct_align: u64,
    size_bytes: u64,
    read_only: bool,
    /// `FALLOC_FL_ZERO_RANGE` works on this file system (tmpfs, for one, lacks it).
    zero_range: AtomicBool,
    /// `FALLOC_FL_ZERO_RANGE` is quick here, as `NBD_CMD_FLAG_FAST_ZERO` demands: always on a
    /// regular file (it marks extents unwritten), on a block device only when the device offloads
    /// WRITE ZEROES (otherwise the kernel quietly writes pages of zeroes).
    zero_range_fast: bool,
    /// Buffered mode on a file the kernel can splice into (see `splice_writes`).
    splice_write: bool,
    /// Set by the first failed write or flush: after it, nothing written since the last good flush
    /// can be trusted durable, so every request fails until the export is reopened.
    failed: AtomicBool,
    clients: AtomicUsize,
    revoked: AtomicBool,
    /// Data changes completed through NBD (see `BlockTarget::change_count`), shared by every
    /// target of the same file (see `shared_change_count`).
    changes: Arc<AtomicU64>,
}

impl FileTarget {
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> io::Result<FileTarget> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let buffered = open(false)?;
        let direct = match cache {
            CacheMode::Buffered => None,
            CacheMode::Direct => Some(open(true).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("opening {} with O_DIRECT: {e}", path.display()),
                )
            })?),
        };
        FileTarget::from_files(buffered, direct, path, read_only)
    }

    /// A target over files already open: `buffered` through the page cache and, in direct
    /// mode, `direct` (the same file with `O_DIRECT`). `path` names the file in messages.
    pub fn from_files(
        buffered: File,
        direct: Option<File>,
        path: &Path,
        read_only: bool,
    ) -> io::Result<FileTarget> {
        let changes = shared_change_count(&buffered)?;
        let size_bytes = file_size(&buffered)?;
        let zero_range_fast = zero_range_is_fast(&buffered);
        let splice_write = direct.is_none() && splice_write_works(&buffered);
        let (direct, direct_align) = match direct {
            None => (None, 1),
            Some(f) => {
                let align = direct_alignment(&f, path)?;
                (Some(f), align)
            }
        };
        Ok(FileTarget {
            buffered,
            direct,
            direct_align,
            size_bytes,
            read_only,
            zero_range: AtomicBool::new(true),
            zero_range_fast,
            splice_write,
            failed: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
            revoked: AtomicBool::new(false),
            changes,
        })
    }

    /// The descriptor for a data transfer: direct when aligned, else the page cache.
    fn fd_for(&self, offset: u64, len: u32) -> RawFd {
        match &self.direct {
            Some(f)
                if offset.is_multiple_of(self.direct_align)
                    && u64::from(len).is_multiple_of(self.direct_align) =>
            {
                f.as_raw_fd()
            }
            _ => self.buffered.as_raw_fd(),
        }
    }

    /// Connections using the file now.
    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// Withdraws the export: requests fail and the engine closes its connections.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
    }

    fn latch(&self) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            tracing::error!("write or flush failed: export latched failed until reopened");
        }
    }

    fn plan_zero(&self, offset: u64, len: u64, fua: bool, may_trim: bool, plan: &mut Plan) {
        let fd = self.buffered.as_raw_fd();
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        if may_trim {
            plan.push(FileIo::Fallocate {
                fd,
                offset,
                len,
                mode: libc::FALLOC_FL_PUNCH_HOLE | keep,
            });
        } else if self.zero_range.load(Ordering::Relaxed) {
            plan.push(FileIo::Fallocate {
                fd,
                offset,
                len,
                mode: libc::FALLOC_FL_ZERO_RANGE | keep,
            });
        } else {
            // Punch, then allocate: the range reads as zeroes and stays provisioned.
            plan.push(FileIo::Fallocate {
                fd,
                offset,
                len,
                mode: libc::FALLOC_FL_PUNCH_HOLE | keep,
            });
            plan.then(FileIo::Fallocate {
                fd,
                offset,
                len,
                mode: keep,
            });
        }
        if fua {
            plan.then(FileIo::Fdatasync { fd });
        }
    }

    /// Plans writes of zeroes from `from` on, up to `end` or a full plan; `plan.cursor` says
    /// where the next phase resumes.
    fn plan_zero_writes(&self, from: u64, end: u64, plan: &mut Plan) {
        let mut pos = from;
        while pos < end && !plan.is_full() {
            let len = (end - pos).min(u64::from(ZERO_WRITE_BYTES)) as u32;
            plan.push(FileIo::WriteZeroes {
                fd: self.fd_for(pos, len),
                offset: pos,
                len,
            });
            pos += u64::from(len);
        }
        plan.cursor = pos;
    }
}

impl BlockTarget for FileTarget {
    fn geometry(&self) -> Geometry {
        Geometry {
            size_bytes: self.size_bytes,
            read_only: self.read_only,
            can_trim: true,
            can_zero: true,
            can_fast_zero: true,
            can_cache: self.direct.is_none(),
            can_multi_conn: true,
            block_min: advertised_block_min(self.direct_align, self.size_bytes),
            block_preferred: PREFERRED_BLOCK_BYTES,
        }
    }

    fn plan(&self, op: &TargetOp, plan: &mut Plan) -> Result<(), TargetError> {
        if self.revoked.load(Ordering::Acquire) {
            return Err(TargetError::Withdrawn);
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(TargetError::Latched);
        }
        let fd = self.buffered.as_raw_fd();
        match *op {
            TargetOp::Read { offset, len } => {
                if len > 0 {
                    let fd = self.fd_for(offset, len);
                    plan.push(FileIo::Read {
                        fd,
                        offset,
                        buf_start: 0,
                        len,
                    });
                }
            }
            TargetOp::Write { offset, len, fua } => {
                if len > 0 {
                    let fd = self.fd_for(offset, len);
                    plan.push(FileIo::Write {
                        fd,
                        offset,
                        buf_start: 0,
                        len,
                        dsync: fua,
                    });
                } else if fua {
                    plan.push(FileIo::Fdatasync { fd });
                }
            }
            TargetOp::Flush => plan.push(FileIo::Fdatasync { fd }),
            TargetOp::Trim { offset, len, fua } => {
                if len > 0 {
                    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                    plan.push(FileIo::Fallocate {
                        fd,
                        offset,
                        len,
                        mode,
                    });
                }
                if fua {
                    plan.then(FileIo::Fdatasync { fd });
                }
            }
            TargetOp::Zero {
                offset,
                len,
                fua,
                may_trim,
                fast,
            } => {
                if fast && !may_trim && !self.zero_range_fast {
                    return Err(TargetError::FastZeroUnsupported);
                }
                if len > 0 {
                    self.plan_zero(offset, len, fua, may_trim, plan);
                } else if fua {
                    plan.push(FileIo::Fdatasync { fd });
                }
            }
            TargetOp::Cache { offset, len } => {
                if self.direct.is_none() && len > 0 {
                    let len = len.min(u64::from(u32::MAX)) as u32;
                    plan.push(FileIo::Fadvise {
                        fd,
                        offset,
                        len,
                        advice: libc::POSIX_FADV_WILLNEED,
                    });
                }
            }
        }
        Ok(())
    }

    fn complete(
        &self,
        op: &TargetOp,
        plan: &mut Plan,
        results: &[i32],
    ) -> Result<Progress, TargetError> {
        // The first failure is the cause; linked I/Os after it only report ECANCELED.
        let failure = results.iter().position(|r| *r < 0);
        let Some(i) = failure else {
            // A zeroing by writes goes on until its range is covered, then syncs for FUA.
            if let TargetOp::Zero {
                offset, len, fua, ..
            } = *op
                && let Some(FileIo::WriteZeroes { .. }) = plan.get(0)
            {
                plan.clear();
                if plan.cursor < offset + len {
                    self.plan_zero_writes(plan.cursor, offset + len, plan);
                } else if fua {
                    plan.push(FileIo::Fdatasync {
                        fd: self.buffered.as_raw_fd(),
                    });
                } else {
                    return Ok(Progress::Done);
                }
                return Ok(Progress::Again);
            }
            return Ok(Progress::Done);
        };
        let res = results[i];
        let source = io::Error::from_raw_os_error(-res);
        let unsupported = res == -libc::EOPNOTSUPP;
        // What fallocate says when the file or device cannot do this mode (a block device also
        // answers EINVAL to an unaligned range).
        let cannot_fallocate = matches!(plan.get(i), Some(FileIo::Fallocate { .. }))
            && matches!(-res, libc::EOPNOTSUPP | libc::EINVAL);
        match *op {
            TargetOp::Read { offset, .. } => Err(TargetError::Reading { offset, source }),
            TargetOp::Cache { offset, .. } => Err(TargetError::Reading { offset, source }),
            TargetOp::Write { offset, .. } => {
                self.latch();
                Err(TargetError::Writing { offset, source })
            }
            TargetOp::Flush => {
                self.latch();
                Err(TargetError::Syncing { source })
            }
            TargetOp::Trim { fua, .. } if cannot_fallocate => {
                // TRIM is advisory: where holes cannot be punched the data simply stays. The
                // flush a FUA asks for still runs (it was cancelled with the punch).
                plan.clear();
                if !fua {
                    return Ok(Progress::Done);
                }
                plan.push(FileIo::Fdatasync {
                    fd: self.buffered.as_raw_fd(),
                });
                Ok(Progress::Again)
            }
            TargetOp::Trim { offset, .. } => Err(TargetError::Discarding { offset, source }),
            TargetOp::Zero {
                offset,
                len,
                fua,
                may_trim,
                fast,
            } => {
                if cannot_fallocate && fast {
                    return Err(TargetError::FastZeroUnsupported);
                }
                if unsupported && !may_trim && self.zero_range.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        "file system lacks FALLOC_FL_ZERO_RANGE: zeroing by punch + allocate"
                    );
                    plan.clear();
                    self.plan_zero(offset, len, fua, may_trim, plan);
                    return Ok(Progress::Again);
                }
                if cannot_fallocate {
                    // Without FAST_ZERO the spec does not let WRITE_ZEROES fail for want of a
                    // fast way: write the zeroes.
                    plan.clear();
                    self.plan_zero_writes(offset, offset + len, plan);
                    return Ok(Progress::Again);
                }
                Err(TargetError::Zeroing { offset, source })
            }
        }
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<(), TargetError> {
        let file = &self.buffered;
        let end = offset.saturating_add(len).min(self.size_bytes);
        let mut pos = offset;
        let hole = STATE_HOLE | STATE_ZERO;
        let max_extents = max_extents.min(MAX_SEEK_EXTENTS);
        while pos < end && out.len() < max_extents {
            let data = match seek(file, pos, Whence::SeekData) {
                Ok(d) => d.min(end),
                // ENXIO: no data at or after pos.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => end,
                Err(source) => {
                    return Err(TargetError::QueryingAllocation {
                        offset: pos,
                        source,
                    });
                }
            };
            if data > pos {
                if !push_extent(out, max_extents, data - pos, hole) {
                    break;
                }
                pos = data;
                continue;
            }
            let next_hole = match seek(file, pos, Whence::SeekHole) {
                Ok(h) => h.min(end),
                Err(source) => {
                    return Err(TargetError::QueryingAllocation {
                        offset: pos,
                        source,
                    });
                }
            };
            // SEEK_HOLE never returns pos itself here (pos is in data), but guard against a loop.
            let next_hole = next_hole.max(pos + 1);
            if !push_extent(out, max_extents, next_hole - pos, 0) {
                break;
            }
            pos = next_hole;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), TargetError> {
        if self.read_only {
            return Ok(());
        }
        self.buffered
            .sync_data()
            .map_err(|source| TargetError::Syncing { source })
    }

    fn attach(&self) {
        self.clients.fetch_add(1, Ordering::AcqRel);
    }

    fn detach(&self) {
        self.clients.fetch_sub(1, Ordering::AcqRel);
    }

    fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Direct mode bypasses the kernel's read-ahead, and a sequential reader at queue depth 8
    /// leaves the disk idle between its waves: measured here, fio 1 MiB reads `O_DIRECT` got
    /// 560-880 MB/s at depth 8, 770-1160 MB/s at depth 32. So the engine reads ahead.
    fn change_count(&self) -> Option<&AtomicU64> {
        self.direct.as_ref().map(|_| &*self.changes)
    }

    /// In buffered mode a write is one page-cache write of the payload (see `plan`). In direct
    /// mode aligned writes go to the `O_DIRECT` descriptor, which needs aligned memory that pipe
    /// pages are not. And only where the kernel can splice into the file (`splice_write_works`).
    fn splice_writes(&self) -> bool {
        self.splice_write
    }
}

fn seek(file: &File, pos: u64, whence: Whence) -> io::Result<u64> {
    // SEEK_DATA/SEEK_HOLE move the shared file position, which nothing here uses: every transfer
    // carries its own offset.
    let pos = i64::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    nix::unistd::lseek(file, pos, whence)
        .map(|p| p as u64)
        .map_err(|e| io::Error::from_raw_os_error(e as i32))
}

fn file_size(f: &File) -> io::Result<u64> {
    let meta = f.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // Block devices report 0 in metadata: ask where the end is.
    use std::io::Seek;
    let mut f = f;
    let end = f.seek(io::SeekFrom::End(0))?;
    f.seek(io::SeekFrom::Start(0))?;
    Ok(end)
}

/// Whether `FALLOC_FL_ZERO_RANGE` on `f` is quick (see `FileTarget::zero_range_fast`). For a
/// block device the answer is in sysfs: the device's `write_zeroes_max_bytes` (a partition's
/// queue is its disk's).
fn zero_range_is_fast(f: &File) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(meta) = f.metadata() else {
        return false;
    };
    if !meta.file_type().is_block_device() {
        return true;
    }
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    let dev = format!("/sys/dev/block/{major}:{minor}");
    [format!("{dev}/queue"), format!("{dev}/../queue")]
        .iter()
        .find_map(|q| std::fs::read_to_string(format!("{q}/write_zeroes_max_bytes")).ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|max| max > 0)
}

/// Whether the kernel can splice into `f`: a block device, or a regular file on a file system
/// known to implement `splice_write`. Since Linux 5.10 a file system without it fails the splice
/// with EINVAL, which the engine would answer as a failed write and latch the export; a file
/// system not listed here costs only the buffer path's extra copy.
fn splice_write_works(f: &File) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = f.metadata() else {
        return false;
    };
    if meta.file_type().is_block_device() {
        return true;
    }
    meta.is_file() && nix::sys::statfs::fstatfs(f).is_ok_and(|s| splices_into(s.filesystem_type()))
}

/// File systems whose regular files take `splice_write` (`iter_file_splice_write`) on every
/// kernel that has io_uring's splice.
fn splices_into(fs: nix::sys::statfs::FsType) -> bool {
    use nix::sys::statfs::{
        BTRFS_SUPER_MAGIC, EXT4_SUPER_MAGIC, F2FS_SUPER_MAGIC, TMPFS_MAGIC, XFS_SUPER_MAGIC,
    };
    // ext2 and ext3 share ext4's magic (and its driver).
    [
        EXT4_SUPER_MAGIC,
        XFS_SUPER_MAGIC,
        BTRFS_SUPER_MAGIC,
        F2FS_SUPER_MAGIC,
        TMPFS_MAGIC,
    ]
    .contains(&fs)
}

/// The change counter of the file `f` is (by device and inode), shared by every target of it in
/// this process: the same file exported twice (read-write and read-only) must not serve a
/// read-ahead of one export after a write through the other completed.
fn shared_change_count(f: &File) -> io::Result<Arc<AtomicU64>> {
    use std::collections::HashMap;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Weak;
    /// Counters by (device, inode); an entry lives as long as a target of that file does.
    type ByInode = HashMap<(u64, u64), Weak<AtomicU64>>;
    static BY_INODE: parking_lot::Mutex<Option<ByInode>> = parking_lot::Mutex::new(None);
    let m = f.metadata()?;
    let mut registry = BY_INODE.lock();
    let map = registry.get_or_insert_with(HashMap::new);
    map.retain(|_, w| w.strong_count() > 0);
    let key = (m.dev(), m.ino());
    if let Some(c) = map.get(&key).and_then(Weak::upgrade) {
        return Ok(c);
    }
    let c = Arc::new(AtomicU64::new(0));
    map.insert(key, Arc::downgrade(&c));
    Ok(c)
}

/// The minimum block size to advertise: the `O_DIRECT` alignment, lowered to the largest power of
/// two that divides the export size. The spec says an export's size SHOULD be a multiple of its
/// advertised minimum, or a client that honours it cannot reach the last bytes. Unaligned
/// requests are served anyway (through an aligned bounce), so the lower minimum is still true;
/// it only costs that client a read-modify-write at the tail.
fn advertised_block_min(align: u64, size_bytes: u64) -> u32 {
    let divides_size = 1u64 << size_bytes.trailing_zeros().min(63);
    // The spec's ceiling for a minimum; a request aligned to it but not to a larger direct-I/O
    // alignment goes through the page cache.
    align.min(divides_size).min(MAX_BLOCK_MIN) as u32
}

/// The largest minimum block size the spec allows.
const MAX_BLOCK_MIN: u64 = 1 << 16;

/// The offset and length alignment `O_DIRECT` needs on `f`, as the kernel states it: `statx`
/// with `STATX_DIOALIGN` (Linux 6.1, for the file systems that do direct I/O), else a block
/// device's logical block size, else 4096, which every device with sectors of up to 4 KiB
/// accepts (too large an alignment only sends more requests through the page cache; too small
/// a one fails writes). Never found by trying a read: the kernel answers a direct read of a hole
/// with zeroes without checking alignment, so a sparse image on a disk of 4 KiB sectors once
/// probed as 512, and every 512-aligned write to it then failed with `EINVAL`.
fn direct_alignment(f: &File, path: &Path) -> io::Result<u64> {
    use rustix::fs::{AtFlags, StatxFlags, statx};
    if let Ok(st) = statx(f, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN)
        && StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::DIOALIGN)
    {
        let (offset, mem) = (st.stx_dio_offset_align, st.stx_dio_mem_align);
        if offset == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{} does not support O_DIRECT; use --cache buffered",
                    path.display()
                ),
            ));
        }
        // Request buffers are BUFFER_ALIGN-aligned; a device that needs more cannot take them.
        if mem as usize > BUFFER_ALIGN || !offset.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}: O_DIRECT needs offsets aligned to {offset} and memory to {mem} bytes, \
                     which this server's buffers ({BUFFER_ALIGN}) do not meet; use --cache buffered",
                    path.display()
                ),
            ));
        }
        return Ok(u64::from(offset));
    }
    match rustix::fs::ioctl_blksszget(f) {
        Ok(n) if n.is_power_of_two() => Ok(u64::from(n)),
        _ => Ok(4096),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &Path) -> FileTarget {
        let path = dir.join("disk.raw");
        let f = File::create(&path).unwrap();
        f.set_len(16 << 20).unwrap();
        FileTarget::open(&path, false, CacheMode::Buffered).unwrap()
    }

    #[test]
    fn direct_alignment_comes_from_the_kernel_not_from_a_read_of_a_hole() {
        let dir = scratch("dioalign");
        let path = dir.join("sparse.raw");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        let align = direct_alignment(&f, &path).unwrap();
        assert!(
            align.is_power_of_two() && (512..=4096).contains(&align),
            "{align}"
        );
        // The device's logical block size bounds it from below wherever the kernel reports one.
        let st = rustix::fs::stat(&path).unwrap();
        let sysfs = format!(
            "/sys/dev/block/{}:{}/queue/logical_block_size",
            rustix::fs::major(st.st_dev),
            rustix::fs::minor(st.st_dev)
        );
        if let Ok(lbs) = std::fs::read_to_string(&sysfs) {
            assert!(
                align >= lbs.trim().parse::<u64>().unwrap(),
                "{align} < {lbs}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn advertised_minimum_divides_the_export_size() {
        assert_eq!(advertised_block_min(4096, 16 << 20), 4096);
        assert_eq!(advertised_block_min(512, (3 << 20) + 512), 512);
        assert_eq!(advertised_block_min(4096, (3 << 20) + 512), 512);
        assert_eq!(advertised_block_min(4096, (3 << 20) + 100), 4);
        assert_eq!(advertised_block_min(512, 12345), 1);
        assert_eq!(advertised_block_min(1, 1 << 40), 1);
        assert_eq!(advertised_block_min(4096, 0), 4096);
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("streamer-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Where fallocate cannot zero (EOPNOTSUPP, or EINVAL from a block device), WRITE_ZEROES
    /// without FAST_ZERO writes zeroes over the whole range, phase by phase, then syncs for FUA.
    #[test]
    fn write_zeroes_falls_back_to_writing_zeroes() {
        let dir = scratch("zero-fallback");
        let t = target(&dir);
        let len = 20 * u64::from(ZERO_WRITE_BYTES) / 2 + 4096; // 10 MiB + 4 KiB: two phases
        let op = TargetOp::Zero {
            offset: 512,
            len,
            fua: true,
            may_trim: true,
            fast: false,
        };
        let mut plan = Plan::default();
        t.plan(&op, &mut plan).unwrap();
        let n = plan.len();
        let failed = vec![-libc::EOPNOTSUPP; n];
        assert_eq!(
            t.complete(&op, &mut plan, &failed).unwrap(),
            Progress::Again
        );
        let mut covered = 512;
        let mut phases = 0;
        loop {
            let ios: Vec<FileIo> = plan.ios().copied().collect();
            if let [FileIo::Fdatasync { .. }] = ios[..] {
                break;
            }
            for io in &ios {
                let FileIo::WriteZeroes { offset, len, .. } = *io else {
                    panic!("expected zero writes, got {io:?}");
                };
                assert_eq!(offset, covered, "pieces are consecutive");
                assert!(len <= ZERO_WRITE_BYTES);
                covered += u64::from(len);
            }
            phases += 1;
            let ok: Vec<i32> = ios.iter().map(|_| 1).collect();
            assert_eq!(t.complete(&op, &mut plan, &ok).unwrap(), Progress::Again);
        }
        assert_eq!(covered, 512 + len);
        assert_eq!(phases, 2);
        assert_eq!(t.complete(&op, &mut plan, &[0]).unwrap(), Progress::Done);

        // With FAST_ZERO the answer is "not fast", not a slow zeroing.
        let fast = TargetOp::Zero {
            offset: 0,
            len: 4096,
            fua: false,
            may_trim: true,
            fast: true,
        };
        plan.clear();
        t.plan(&fast, &mut plan).unwrap();
        let err = t
            .complete(&fast, &mut plan, &[-libc::EOPNOTSUPP])
            .unwrap_err();
        assert!(matches!(err, TargetError::FastZeroUnsupported));

        // A regular file zeroes quickly in place; where ZERO_RANGE would write pages (a block
        // device without WRITE ZEROES offload), FAST_ZERO with NO_HOLE is refused up front.
        assert!(t.zero_range_fast);
        let slow = FileTarget {
            zero_range_fast: false,
            ..target(&dir)
        };
        let no_hole = TargetOp::Zero {
            offset: 0,
            len: 4096,
            fua: false,
            may_trim: false,
            fast: true,
        };
        plan.clear();
        assert!(matches!(
            slow.plan(&no_hole, &mut plan),
            Err(TargetError::FastZeroUnsupported)
        ));
        plan.clear();
        slow.plan(&fast, &mut plan).unwrap();

        // TRIM where holes cannot be punched succeeds (advisory), syncing for FUA.
        let trim = TargetOp::Trim {
            offset: 0,
            len: 4096,
            fua: true,
        };
        plan.clear();
        t.plan(&trim, &mut plan).unwrap();
        let r = [-libc::EOPNOTSUPP, -libc::ECANCELED];
        assert_eq!(t.complete(&trim, &mut plan, &r).unwrap(), Progress::Again);
        assert!(matches!(
            plan.ios().collect::<Vec<_>>()[..],
            [FileIo::Fdatasync { .. }]
        ));
        assert_eq!(t.complete(&trim, &mut plan, &[0]).unwrap(), Progress::Done);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `splice_writes` promises the engine that a write plans as one page-cache write of the
    /// whole payload from buffer position 0; direct mode, whose aligned writes need aligned
    /// memory, does not splice.
    #[test]
    fn buffered_writes_plan_as_one_spliceable_write() {
        let dir = scratch("splice");
        let t = target(&dir);
        assert!(t.splice_writes());
        for (offset, len, fua) in [(0, 1 << 20, false), (4097, 300_000, true)] {
            let mut plan = Plan::default();
            t.plan(&TargetOp::Write { offset, len, fua }, &mut plan)
                .unwrap();
            let ios: Vec<_> = plan.ios().copied().collect();
            assert_eq!(
                ios,
                [FileIo::Write {
                    fd: t.buffered.as_raw_fd(),
                    offset,
                    buf_start: 0,
                    len,
                    dsync: fua,
                }]
            );
        }
        let direct = FileTarget::open(&dir.join("disk.raw"), false, CacheMode::Direct)
            .expect("O_DIRECT on the temporary directory (the direct-mode tests need it too)");
        assert!(!direct.splice_writes());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Splicing into a file system without `splice_write` fails with EINVAL, which would fail
    /// the write and latch the export: only known file systems and block devices splice.
    #[test]
    fn splices_only_where_the_kernel_can() {
        use nix::sys::statfs::{FUSE_SUPER_MAGIC, NFS_SUPER_MAGIC, PROC_SUPER_MAGIC, TMPFS_MAGIC};
        assert!(splices_into(TMPFS_MAGIC));
        for other in [FUSE_SUPER_MAGIC, NFS_SUPER_MAGIC, PROC_SUPER_MAGIC] {
            assert!(!splices_into(other));
        }
        assert!(!splice_write_works(
            &File::open("/proc/self/status").unwrap()
        ));
        assert!(!splice_write_works(&File::open("/dev/null").unwrap()));
    }

    /// A file fragmented into more extents than one reply may hold gets a reply that covers a
    /// prefix of the range exactly: `MAX_SEEK_EXTENTS` extents, alternating, no gap; the rest is
    /// asked for again from where it ends.
    #[test]
    fn block_status_of_a_fragmented_file_is_cut_short() {
        use std::os::unix::fs::FileExt;
        let dir = scratch("fragmented");
        let path = dir.join("disk.raw");
        let f = File::create(&path).unwrap();
        let blocks = MAX_SEEK_EXTENTS as u64 + 100; // data blocks, each followed by a hole
        f.set_len(blocks * 8192).unwrap();
        for i in 0..blocks {
            f.write_all_at(&[0xa5; 4096], i * 8192).unwrap();
        }
        f.sync_all().unwrap();
        let t = FileTarget::open(&path, false, CacheMode::Buffered).unwrap();
        let mut out = Vec::new();
        t.block_status(0, blocks * 8192, 16 * 1024, &mut out)
            .unwrap();
        if out.len() == 1 {
            // A file system that does not report holes (the whole file is data): nothing to cut.
            eprintln!("skipped: {} reports no holes", dir.display());
            return;
        }
        assert_eq!(out.len(), MAX_SEEK_EXTENTS);
        for (i, &(len, flags)) in out.iter().enumerate() {
            assert_eq!(len, 4096, "extent {i}");
            let want = if i % 2 == 0 {
                0
            } else {
                STATE_HOLE | STATE_ZERO
            };
            assert_eq!(flags, want, "extent {i}");
        }
        // Asked again from the end of that reply, the map goes on where it stopped.
        let next = MAX_SEEK_EXTENTS as u64 * 4096;
        out.clear();
        t.block_status(next, 8192, 16, &mut out).unwrap();
        assert_eq!(out[0], (4096, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
