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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::{BlockTarget, FileIo, Geometry, Plan, Progress, TargetError, TargetOp, push_extent};
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
    /// Set by the first failed write or flush: after it, nothing written since the last good flush
    /// can be trusted durable, so every request fails until the export is reopened.
    failed: AtomicBool,
    clients: AtomicUsize,
    revoked: AtomicBool,
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
        let size_bytes = file_size(&buffered)?;
        let (direct, direct_align) = match cache {
            CacheMode::Buffered => (None, 1),
            CacheMode::Direct => {
                let f = open(true).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("opening {} with O_DIRECT: {e}", path.display()),
                    )
                })?;
                let align = probe_direct_alignment(&f);
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
            failed: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
            revoked: AtomicBool::new(false),
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
            plan.linked = true;
            plan.push(FileIo::Fallocate {
                fd,
                offset,
                len,
                mode: libc::FALLOC_FL_PUNCH_HOLE | keep,
            });
            plan.push(FileIo::Fallocate {
                fd,
                offset,
                len,
                mode: keep,
            });
        }
        if fua {
            plan.linked = true;
            plan.push(FileIo::Fdatasync { fd });
        }
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
            block_min: self.direct_align as u32,
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
                    plan.linked = true;
                    plan.push(FileIo::Fdatasync { fd });
                }
            }
            TargetOp::Zero {
                offset,
                len,
                fua,
                may_trim,
                ..
            } => {
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
        let Some(&res) = results.iter().find(|r| **r < 0) else {
            return Ok(Progress::Done);
        };
        let source = io::Error::from_raw_os_error(-res);
        let unsupported = res == -libc::EOPNOTSUPP;
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
            TargetOp::Trim { offset, .. } => Err(TargetError::Discarding { offset, source }),
            TargetOp::Zero {
                offset,
                len,
                fua,
                may_trim,
                fast,
            } => {
                if unsupported && fast {
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

/// Smallest alignment `O_DIRECT` accepts on this file: 512 or 4096.
fn probe_direct_alignment(f: &File) -> u64 {
    use std::os::unix::fs::FileExt;
    let layout = std::alloc::Layout::from_size_align(4096, 4096).expect("valid layout");
    let mut buf = AlignedBuf::new(layout);
    for align in [512u64, 4096] {
        match f.read_at(&mut buf.as_mut()[..align as usize], 0) {
            Ok(_) => return align,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(_) => return 4096,
        }
    }
    4096
}

/// A small aligned buffer for the O_DIRECT probe.
struct AlignedBuf(Vec<u8>, usize);

impl AlignedBuf {
    fn new(layout: std::alloc::Layout) -> Self {
        // Over-allocate and slice at an aligned offset: no unsafe needed.
        let v = vec![0u8; layout.size() + layout.align()];
        let start = v.as_ptr().align_offset(layout.align());
        AlignedBuf(v, start)
    }
    fn as_mut(&mut self) -> &mut [u8] {
        let start = self.1;
        &mut self.0[start..start + 4096]
    }
}
