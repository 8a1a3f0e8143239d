//! `Storage` on a real file: positioned reads and writes, `fallocate` hole punching,
//! `SEEK_DATA`/`SEEK_HOLE` and `fdatasync`. Used by the checker, the pool's management work and
//! the tests that run on a real file system; the data path drives the same files through io_uring.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, PosixFadviseAdvice, fallocate, posix_fadvise};
use nix::unistd::{Whence, lseek};

use crate::storage::Storage;

pub struct FileStorage {
    file: File,
    len: u64,
}

impl FileStorage {
    pub fn new(file: File) -> io::Result<FileStorage> {
        let len = file.metadata()?.len();
        Ok(FileStorage { file, len })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn into_file(self) -> File {
        self.file
    }
}

fn to_io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn off(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc_einval()))
}

/// What a `fallocate` did: the file system may not have the mode at all.
enum Done {
    Yes,
    Unsupported,
}

const PUNCH: FallocateFlags =
    FallocateFlags::FALLOC_FL_PUNCH_HOLE.union(FallocateFlags::FALLOC_FL_KEEP_SIZE);
const ZERO_RANGE: FallocateFlags =
    FallocateFlags::FALLOC_FL_ZERO_RANGE.union(FallocateFlags::FALLOC_FL_KEEP_SIZE);

impl FileStorage {
    /// `fallocate(mode)` over `[offset, offset+len)`; `Unsupported` where this file system
    /// cannot ("this cannot be done here" is for the caller to work around, not a failure).
    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<Done> {
        if len == 0 {
            return Ok(Done::Yes);
        }
        match fallocate(&self.file, mode, off(offset)?, off(len)?) {
            Ok(()) => Ok(Done::Yes),
            Err(e) if unsupported(e) => Ok(Done::Unsupported),
            Err(e) => Err(to_io(e)),
        }
    }

    /// Writes zeroes over the data in `[offset, offset+len)`, leaving its holes alone (all of
    /// it, where the file system cannot say where its holes are).
    fn zero_data_in(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (Ok(data), Ok(_)) = (self.seek_data(pos), self.seek_hole(pos)) else {
                return crate::storage::write_zeroes(self, pos, end - pos);
            };
            let Some(data) = data.filter(|&d| d < end) else {
                return Ok(());
            };
            let hole = self.seek_hole(data)?.clamp(data + 1, end);
            crate::storage::write_zeroes(self, data, hole - data)?;
            pos = hole;
        }
        Ok(())
    }
}

/// `fallocate` errors that mean "this file system cannot", not "this failed".
fn unsupported(e: Errno) -> bool {
    matches!(e, Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL)
}

const fn libc_einval() -> i32 {
    22
}

impl Storage for FileStorage {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0); // past the end: zeroes
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        self.len = self.len.max(offset + data.len() as u64);
        Ok(())
    }

    fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // Where there is no hole punching (a FUSE file system without fallocate) the range
        // must still read as zeroes, so they are written, over its data only (a hole already
        // reads as zeroes: a discard of a whole sparse disk must not allocate all of it).
        // Nothing is freed.
        match self.fallocate(PUNCH, offset, len)? {
            Done::Yes => Ok(()),
            Done::Unsupported => self.zero_data_in(offset, len),
        }
    }

    fn frees_space(&mut self) -> bool {
        // A punch at the end of the file, which holds no data there: refused where the file
        // system has no hole punching.
        let at = self.len.div_ceil(4096) * 4096;
        !matches!(self.fallocate(PUNCH, at, 4096), Ok(Done::Unsupported))
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(ZERO_RANGE, offset, len)? {
            Done::Yes => Ok(()),
            Done::Unsupported => crate::storage::write_zeroes(self, offset, len),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.len = len;
        Ok(())
    }

    fn write_behind(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // On Linux, DONTNEED starts writeback of the range's dirty pages (WB_SYNC_NONE, submitted
        // from this thread, so a lowered priority applies) and drops its clean pages. The block
        // queue throttles the submission when the disk falls behind.
        posix_fadvise(
            &self.file,
            off(offset)?,
            off(len)?,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .map_err(to_io)
    }

    fn seek_data(&mut self, offset: u64) -> io::Result<Option<u64>> {
        if offset >= self.len {
            return Ok(None);
        }
        match lseek(&self.file, off(offset)?, Whence::SeekData) {
            Ok(pos) => Ok(Some(pos as u64)),
            Err(Errno::ENXIO) => Ok(None),
            Err(e) => Err(to_io(e)),
        }
    }

    fn seek_hole(&mut self, offset: u64) -> io::Result<u64> {
        if offset >= self.len {
            return Ok(self.len);
        }
        match lseek(&self.file, off(offset)?, Whence::SeekHole) {
            Ok(pos) => Ok(pos as u64),
            Err(Errno::ENXIO) => Ok(self.len),
            Err(e) => Err(to_io(e)),
        }
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

/// Allocates the metadata file's map slots for a volume of `size` bytes (without changing the
/// file's length), so a commit on a full file system still finds its slots: a full pool fails
/// data writes with ENOSPC but never a commit.
/// Gives back what `reserve_metadata` allocated past the end of `meta`, after the change it was
/// for failed (truncating a file to its own length frees its blocks past the end).
pub fn release_metadata_reserve(meta: &File) -> io::Result<()> {
    meta.set_len(meta.metadata()?.len())
}

///
/// A file system that cannot allocate ahead (no `fallocate`, as FUSE pass-throughs) gets no
/// reservation rather than no volume: there, and only there, a commit on a full file system
/// can fail with ENOSPC (SPEC.md §7).
pub fn reserve_metadata(meta: &File, size: u64) -> io::Result<()> {
    let len = crate::layout::meta_file_bytes(size);
    match nix::fcntl::fallocate(
        meta,
        nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        0,
        i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(27))?,
    ) {
        Ok(()) => Ok(()),
        Err(e) if unsupported(e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
