//! A volume driven synchronously over the `Storage` trait: create, open, read, write, zero,
//! trim, flush, stat, block status, grow, epochs and capture. It runs the pure core
//! (`VolumeState`) exactly as the io_uring engine does, so the tests of this driver test the
//! protocol the data path follows.

use std::io;

use crate::error::FormatError;
use crate::image::{ImageInfo, ImageRef, ImageWriter, STREAM_IO_BYTES};
use crate::layout::*;
use crate::map::BlockState;
use crate::state::{Commit, Source, VolumeState};
use crate::storage::Storage;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("corrupt metadata: {0}")]
    Format(#[from] FormatError),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("volume failed after an I/O error ({0}); it must be reopened")]
    Failed(String),
    #[error("range {offset}+{len} is outside the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{0}")]
    Invalid(String),
    #[error("backing image mismatch: {0}")]
    BackingMismatch(String),
    /// A partial write or zero needs to copy up block `block`, which a write in flight covers
    /// whole (see `begin_write`): the caller retries once a write ends (`end_write`).
    #[error("block {block} has a whole-block write in flight")]
    Busy { block: u64 },
}

impl VolumeError {
    /// The file system is full (or the quota reached).
    pub fn is_out_of_space(&self) -> bool {
        const ENOSPC: i32 = 28;
        const EDQUOT: i32 = 122;
        matches!(self, VolumeError::Io(e) if matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT)))
    }

    /// The errno a block device would report for this error.
    pub fn errno(&self) -> i32 {
        const EIO: i32 = 5;
        const EINVAL: i32 = 22;
        const ENOSPC: i32 = 28;
        const EAGAIN: i32 = 11;
        match self {
            VolumeError::Io(e) => e.raw_os_error().unwrap_or(EIO),
            VolumeError::Format(_) | VolumeError::Failed(_) | VolumeError::BackingMismatch(_) => {
                EIO
            }
            VolumeError::OutOfRange { .. } => ENOSPC,
            VolumeError::Invalid(_) => EINVAL,
            VolumeError::Busy { .. } => EAGAIN,
        }
    }
}

/// Which layer holds a range, for block status (`base:allocation` and allocation depth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// The volume's own blocks.
    Volume,
    /// Inherited from the backing image.
    Image,
    /// Neither: past the image's end, or a blank volume's unwritten blocks.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub layer: Layer,
    /// Reads as zeroes (a hole, or no layer).
    pub zero: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStat {
    pub size: u64,
    pub own_blocks: u64,
    /// Disk space of the data and metadata files.
    pub allocated_bytes: u64,
    pub metadata_bytes: u64,
    pub backing: Option<ImageRef>,
    pub generation: [u8; 16],
    pub epoch: u64,
    pub commit: u64,
}

pub struct Volume<S: Storage> {
    meta: S,
    data: S,
    image: Option<S>,
    st: VolumeState,
    /// Set by the first failed write or sync; every later call fails (SPEC.md §7).
    failed: Option<String>,
    /// Blocks `[first, end)` that an engine write between `begin_write` and `end_write` covers
    /// whole, one entry per write (SPEC.md §4, the in-flight set). Their bits stay INHERITED
    /// until the write ends, so a copy-up of one of them meanwhile would put image bytes over
    /// the write's data: such a copy-up waits instead.
    inflight: Vec<(u64, u64)>,
}

impl<S: Storage> Volume<S> {
    /// Creates a volume in empty `meta` and `data` files: a blank one, or a thin clone of
    /// `backing`. O(1) whatever the size: one superblock and a sparse data file.
    pub fn create(
        mut meta: S,
        mut data: S,
        backing: Option<(S, ImageRef)>,
        size: u64,
        volume_id: [u8; 16],
        generation: [u8; 16],
    ) -> Result<Volume<S>, VolumeError> {
        let (image, image_ref) = match backing {
            Some((s, r)) => {
                if s.len() != r.size {
                    return Err(VolumeError::BackingMismatch(format!(
                        "image file holds {} bytes, its metadata says {}",
                        s.len(),
                        r.size
                    )));
                }
                (Some(s), Some(r))
            }
            None => (None, None),
        };
        let (st, sb) = VolumeState::create(volume_id, generation, size, image_ref)
            .map_err(VolumeError::Invalid)?;
        // The data file first: a file system that cannot hold a file this large refuses it
        // (EFBIG; ext4 stops at 16 TiB), which is the caller's choice of size, not an I/O error.
        data.set_len(size).map_err(|e| too_large(size, e))?;
        meta.set_len(0)?;
        meta.write_at(SUPERBLOCK_A_OFFSET, &sb)?;
        meta.write_at(SUPERBLOCK_B_OFFSET, &sb)?;
        meta.sync()?;
        data.sync()?;
        Ok(Volume {
            meta,
            data,
            image,
            st,
            failed: None,
            inflight: Vec::new(),
        })
    }

    /// Opens a volume: the current superblock, the committed map (checked against its digest),
    /// and the backing image it names (checked by id, size and digest).
    pub fn open(
        meta: S,
        data: S,
        backing: Option<(S, ImageRef)>,
    ) -> Result<Volume<S>, VolumeError> {
        Volume::open_with_cache(meta, data, backing, usize::MAX)
    }

    /// `open`, holding at most `cache_pages` map pages in memory (besides dirty ones and those
    /// of the operation under way): clean pages beyond it are evicted, least recently used first,
    /// and read back from the metadata file when used again. Bounds the memory of a volume
    /// whose clients write all over it (32 KiB of map per GiB written to).
    pub fn open_with_cache(
        mut meta: S,
        data: S,
        backing: Option<(S, ImageRef)>,
        cache_pages: usize,
    ) -> Result<Volume<S>, VolumeError> {
        let st = load_state(&mut meta, cache_pages)?;
        let image = match (st.backing(), backing) {
            (None, None) => None,
            (Some(want), Some((s, got))) => {
                if want != got {
                    return Err(VolumeError::BackingMismatch(format!(
                        "the volume was cloned from image {} ({} bytes), not {} ({} bytes)",
                        crate::image::hex(&want.id),
                        want.size,
                        crate::image::hex(&got.id),
                        got.size
                    )));
                }
                if s.len() != want.size {
                    return Err(VolumeError::BackingMismatch(format!(
                        "image file holds {} bytes, the volume expects {}",
                        s.len(),
                        want.size
                    )));
                }
                Some(s)
            }
            (Some(want), None) => {
                return Err(VolumeError::BackingMismatch(format!(
                    "the volume needs image {}",
                    crate::image::hex(&want.id)
                )));
            }
            (None, Some(_)) => {
                return Err(VolumeError::BackingMismatch(
                    "a blank volume was given a backing image".into(),
                ));
            }
        };
        Ok(Volume {
            meta,
            data,
            image,
            st,
            failed: None,
            inflight: Vec::new(),
        })
    }

    pub fn state(&self) -> &VolumeState {
        &self.st
    }

    /// Holds at most `pages` clean map pages in memory from now on (see `open_with_cache`).
    pub fn set_cache_pages(&mut self, pages: usize) {
        self.st.set_cache_pages(pages);
        self.st.trim_cache();
    }

    pub fn size(&self) -> u64 {
        self.st.size()
    }

    /// The metadata and data files, for inspection and fault injection. Writing through them
    /// bypasses the volume.
    pub fn files_mut(&mut self) -> (&mut S, &mut S) {
        (&mut self.meta, &mut self.data)
    }

    /// The metadata, data and backing image files.
    pub fn files(&self) -> (&S, &S, Option<&S>) {
        (&self.meta, &self.data, self.image.as_ref())
    }

    pub fn into_parts(self) -> (S, S, Option<S>) {
        (self.meta, self.data, self.image)
    }

    fn live(&self) -> Result<(), VolumeError> {
        match &self.failed {
            Some(why) => Err(VolumeError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Unknown read-only-compatible features: this build may read the volume, never change it.
    fn writable(&self) -> Result<(), VolumeError> {
        match self.st.superblock().read_only_features() {
            0 => Ok(()),
            f => Err(VolumeError::Invalid(format!(
                "read-only: the volume uses read-only-compatible features {f:#x} this build does \
                 not know"
            ))),
        }
    }

    fn range(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(VolumeError::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    /// Runs `op`, a data-file update (a write, a zeroing): an error latches the volume failed,
    /// except running out of space. A write that found no space changed no map bit and loses
    /// nothing already written (its own range reads as undefined, as a failed write may), so the
    /// volume stays usable and writes succeed again once space is freed.
    fn latching_data<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, VolumeError>,
    ) -> Result<T, VolumeError> {
        self.latching_unless(VolumeError::is_out_of_space, op)
    }

    /// Runs `op`; an error latches the volume failed.
    fn latching<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, VolumeError>,
    ) -> Result<T, VolumeError> {
        self.latching_unless(|_| false, op)
    }

    /// Runs `op` on a live, writable volume; an error latches it failed unless `harmless`.
    fn latching_unless<T>(
        &mut self,
        harmless: impl Fn(&VolumeError) -> bool,
        op: impl FnOnce(&mut Self) -> Result<T, VolumeError>,
    ) -> Result<T, VolumeError> {
        self.live()?;
        self.writable()?;
        let r = op(self);
        if let Err(e) = &r
            && !harmless(e)
        {
            self.failed = Some(e.to_string());
        }
        r
    }

    /// Reads back the evicted map pages of `[offset, offset+len)` (and evicts others past the
    /// cache's size): every use of a range's bits comes after this.
    fn read_back_pages(&mut self, offset: u64, len: u64) -> Result<(), VolumeError> {
        for p in self.st.evicted_pages(offset, len) {
            let mut buf = [0u8; MAP_SLOT_BYTES];
            self.meta.read_at(self.st.page_slot_offset(p), &mut buf)?;
            self.st.reload_page(p, &buf)?;
        }
        self.st.trim_cache();
        Ok(())
    }

    /// Makes the block map of `[offset, offset+len)` resident (reading back evicted pages)
    /// before the engine plans I/O from it (`state().pieces`). A failure (the metadata file
    /// cannot be read, or no longer holds what was committed) latches the volume failed.
    pub fn page_in(&mut self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.live()?;
        let r = self.read_back_pages(offset, len);
        if let Err(e) = &r {
            self.fail(format!("reading back the block map: {e}"));
        }
        r
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.live()?;
        self.range(offset, buf.len() as u64)?;
        self.page_in(offset, buf.len() as u64)?;
        self.read_paged_in(offset, buf)
    }

    /// `read` of a range whose map pages the caller made resident. Never pages in itself: a
    /// read inside another operation (the copy-up of a partial block) must not start a new
    /// operation for the cache, whose trim could evict a page the outer one still uses.
    fn read_paged_in(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        let mut pieces = Vec::new();
        self.st.pieces(offset, buf.len() as u64, |p| pieces.push(p));
        for p in pieces {
            let out = &mut buf[(p.offset - offset) as usize..(p.offset - offset + p.len) as usize];
            match p.source {
                Source::Zero => out.fill(0),
                Source::Data => self.data.read_at(p.offset, out)?,
                Source::Image => self
                    .image
                    .as_mut()
                    .expect("an image piece implies a backing image")
                    .read_at(p.offset, out)?,
            }
        }
        Ok(())
    }

    /// Block `b`'s current contents (for a read-modify-write of a partial block, inside an
    /// operation that paged in its range).
    fn read_block(&mut self, b: u64) -> Result<[u8; BLOCK_BYTES as usize], VolumeError> {
        let mut buf = [0u8; BLOCK_BYTES as usize];
        self.read_paged_in(b * BLOCK_BYTES, &mut buf)?;
        Ok(buf)
    }

    /// Commits the next generation first if this is the first write of an armed epoch.
    fn before_write(&mut self) -> Result<(), VolumeError> {
        if self.st.rotate_generation() {
            self.commit()?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. Whole blocks go straight to the data file (nothing is read
    /// from the image); a partial block that is still INHERITED is copied up first, only that
    /// block. Bits flip once the data is written, and become durable at the next flush.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), VolumeError> {
        self.range(offset, data.len() as u64)?;
        self.page_in(offset, data.len() as u64)?;
        self.latching(|v| v.before_write())?;
        self.latching_data(|v| {
            let end = offset + data.len() as u64;
            let mut pos = offset;
            while pos < end {
                let b = pos / BLOCK_BYTES;
                let b_start = b * BLOCK_BYTES;
                let src = &data[(pos - offset) as usize..];
                if pos == b_start && end - pos >= BLOCK_BYTES {
                    let n = (end - pos) / BLOCK_BYTES;
                    v.data.write_at(pos, &src[..(n * BLOCK_BYTES) as usize])?;
                    v.st.mark_own(b, n);
                    pos += n * BLOCK_BYTES;
                    continue;
                }
                let piece_end = end.min(b_start + BLOCK_BYTES);
                let piece = &src[..(piece_end - pos) as usize];
                if v.st.state(b) == BlockState::Own {
                    v.data.write_at(pos, piece)?;
                } else {
                    let mut block = v.read_block(b)?;
                    let at = (pos - b_start) as usize;
                    block[at..at + piece.len()].copy_from_slice(piece);
                    v.data.write_at(b_start, &block)?;
                    v.st.mark_own(b, 1);
                }
                pos = piece_end;
            }
            Ok(())
        })?;
        self.mark_peer_dirty(offset, data.len() as u64);
        Ok(())
    }

    // ---- the asynchronous data path (the io_uring engine) -------------------------------------
    //
    // The engine writes whole ranges to the data file through its ring. It calls `begin_write`
    // first (under the volume's lock), which copies up the partial INHERITED blocks at either
    // edge synchronously, so the ring write never leaves part of a block without its image
    // bytes; then `end_write` once the write completed, which flips the range's bits. A commit
    // is split the same way: `begin_commit` under the lock, then `write_commit` and the data
    // sync without it, then `end_commit`. The caller allows one commit at a time.

    /// The reason the volume latched failed, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Latches the volume failed (an I/O the engine did for it failed).
    pub fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            self.failed = Some(why);
        }
    }

    /// The first write after `begin_epoch` must commit the new generation first (a synchronous
    /// commit inside `begin_write`); the caller takes its commit lock when this says so.
    pub fn generation_armed(&self) -> bool {
        self.st.superblock().flags & FLAG_GENERATION_ARMED != 0
    }

    /// Checks a write of `[offset, offset+len)`, copies up its partial INHERITED edge blocks, and
    /// records the blocks it covers whole as in flight until `end_write` or `cancel_write`.
    /// `Busy` (nothing done) when an edge block to copy up is covered by a write in flight.
    pub fn begin_write(&mut self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.range(offset, len)?;
        if len == 0 {
            return self.live();
        }
        let end = offset + len;
        self.page_in(offset, len)?;
        self.check_copy_ups(offset, end)?;
        self.latching(|v| v.before_write())?;
        self.latching_data(|v| {
            for b in partial_edges(offset, end) {
                if v.st.state(b) == BlockState::Inherited {
                    let block = v.read_block(b)?;
                    v.data.write_at(b * BLOCK_BYTES, &block)?;
                    v.st.mark_own(b, 1);
                }
            }
            Ok(())
        })?;
        let whole = (offset.div_ceil(BLOCK_BYTES), end / BLOCK_BYTES);
        if whole.0 < whole.1 {
            self.inflight.push(whole);
        }
        Ok(())
    }

    /// `Busy` if a partial edge block of `[offset, end)` still inherited from the image (so to
    /// be copied up) is covered by a write in flight.
    fn check_copy_ups(&self, offset: u64, end: u64) -> Result<(), VolumeError> {
        for b in partial_edges(offset, end) {
            if self.st.state(b) == BlockState::Inherited
                && self.inflight.iter().any(|&(f, e)| (f..e).contains(&b))
            {
                return Err(VolumeError::Busy { block: b });
            }
        }
        Ok(())
    }

    /// The engine's write of `[offset, offset+len)` to the data file completed.
    pub fn end_write(&mut self, offset: u64, len: u64) {
        self.cancel_write(offset, len);
        // The range's pages were read in by `begin_write`, but other requests may have evicted
        // them since; a failure to read them back latches the volume (the write's bits would
        // be lost otherwise).
        if len > 0 && self.failed.is_none() {
            let _ = self.page_in(offset, len);
        }
        if len > 0 && self.failed.is_none() {
            let first = offset / BLOCK_BYTES;
            let last = (offset + len - 1) / BLOCK_BYTES;
            self.st.mark_own(first, last - first + 1);
            self.st.mark_peer_dirty(first, last - first + 1);
        }
    }

    /// The engine's write of `[offset, offset+len)` failed: it is no longer in flight, and its
    /// blocks keep their state.
    pub fn cancel_write(&mut self, offset: u64, len: u64) {
        let whole = (offset.div_ceil(BLOCK_BYTES), (offset + len) / BLOCK_BYTES);
        if let Some(i) = self.inflight.iter().position(|&r| r == whole) {
            self.inflight.swap_remove(i);
        }
    }

    /// The first half of a commit: what to write, or `None` when only the data needs a sync.
    pub fn begin_commit(&mut self) -> Result<Option<Commit>, VolumeError> {
        self.live()?;
        Ok(self.st.plan_commit())
    }

    /// The last half of a commit: `c` is durable.
    pub fn end_commit(&mut self, c: Commit) {
        self.st.commit_done(c);
    }

    /// Makes `[offset, offset+len)` read as zeroes and frees the whole blocks it covers
    /// (WRITE_ZEROES and TRIM both do this: a trimmed range must never read as image data).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.zero(offset, len, Zeroing::Punch)
    }

    /// Makes `[offset, offset+len)` read as zeroes; with `Zeroing::Allocate` (NBD's NO_HOLE)
    /// the whole blocks stay allocated in the data file instead of being freed.
    pub fn zero(&mut self, offset: u64, len: u64, how: Zeroing) -> Result<(), VolumeError> {
        self.range(offset, len)?;
        self.page_in(offset, len)?;
        if len > 0 {
            self.check_copy_ups(offset, offset + len)?;
        }
        self.latching(|v| v.before_write())?;
        self.latching_data(|v| {
            let end = offset + len;
            let image_blocks = v.st.image_blocks();
            let mut pos = offset;
            while pos < end {
                let b = pos / BLOCK_BYTES;
                let b_start = b * BLOCK_BYTES;
                if pos == b_start && end - pos >= BLOCK_BYTES {
                    let n = (end - pos) / BLOCK_BYTES;
                    match how {
                        Zeroing::Punch => {
                            // OWN blocks are punched; INHERITED ones inside the image are
                            // punched and become OWN (a hole of their own); INHERITED ones past
                            // the image already read as zeroes and are left alone (where the
                            // file system cannot punch, "punching" writes zeroes: a discard of
                            // a whole blank disk must not allocate it).
                            let mut pieces = Vec::new();
                            v.st.pieces(pos, n * BLOCK_BYTES, |p| pieces.push(p));
                            for p in pieces {
                                match p.source {
                                    Source::Zero => {}
                                    Source::Data => v.data.punch_hole(p.offset, p.len)?,
                                    Source::Image => {
                                        // Whole blocks: the image's last one may end inside
                                        // a block, whose rest must read as zeroes too.
                                        let first = p.offset / BLOCK_BYTES;
                                        let blocks =
                                            (p.offset + p.len).div_ceil(BLOCK_BYTES) - first;
                                        v.data.punch_hole(
                                            first * BLOCK_BYTES,
                                            blocks * BLOCK_BYTES,
                                        )?;
                                        v.st.mark_own(first, blocks);
                                    }
                                }
                            }
                        }
                        // Allocated zeroes are the volume's own blocks wherever they are.
                        Zeroing::Allocate => {
                            v.data.zero_range(pos, n * BLOCK_BYTES)?;
                            v.st.mark_own(b, n);
                        }
                    }
                    pos += n * BLOCK_BYTES;
                    continue;
                }
                let piece_end = end.min(b_start + BLOCK_BYTES);
                if v.st.state(b) == BlockState::Own {
                    v.data.write_at(pos, &vec![0; (piece_end - pos) as usize])?;
                } else if b < image_blocks || how == Zeroing::Allocate {
                    // (Past the image an INHERITED block reads as zeroes already; NO_HOLE wants
                    // it allocated all the same.)
                    let mut block = v.read_block(b)?;
                    block[(pos - b_start) as usize..(piece_end - b_start) as usize].fill(0);
                    v.data.write_at(b_start, &block)?;
                    v.st.mark_own(b, 1);
                }
                pos = piece_end;
            }
            Ok(())
        })?;
        self.mark_peer_dirty(offset, len);
        Ok(())
    }

    /// Sets the peer dirty bits of the blocks `[offset, offset+len)` touches (after a change
    /// of them completed), if the volume keeps a peer bitmap.
    fn mark_peer_dirty(&mut self, offset: u64, len: u64) {
        if len > 0 {
            let first = offset / BLOCK_BYTES;
            let last = (offset + len - 1) / BLOCK_BYTES;
            self.st.mark_peer_dirty(first, last - first + 1);
        }
    }

    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), VolumeError> {
        self.write_zeroes(offset, len)
    }

    /// Makes every write that completed before it durable (SPEC.md §6).
    pub fn flush(&mut self) -> Result<(), VolumeError> {
        self.latching(|v| v.commit())
    }

    /// The commit protocol of `state`, synchronously. Without map or superblock changes it is
    /// just a data sync.
    fn commit(&mut self) -> Result<(), VolumeError> {
        let plan = self.st.plan_commit();
        self.data.sync()?;
        if let Some(c) = plan {
            self.write_commit(&c)?;
            self.st.commit_done(c);
        }
        Ok(())
    }

    fn write_commit(&mut self, c: &Commit) -> Result<(), VolumeError> {
        write_commit(&mut self.meta, c)
    }

    /// Makes the lazily written superblock copy B durable (on close); flushes nothing else.
    pub fn close(mut self) -> Result<(S, S, Option<S>), VolumeError> {
        self.live()?;
        self.meta.sync()?;
        Ok(self.into_parts())
    }

    /// Checks that the volume may grow to `size` bytes, changing nothing (callers check before
    /// they reserve space for it).
    pub fn check_grow(&self, size: u64) -> Result<(), VolumeError> {
        self.live()?;
        if size < self.size() {
            return Err(VolumeError::Invalid(format!(
                "volumes only grow: {size} is smaller than the current {}",
                self.size()
            )));
        }
        if !size.is_multiple_of(BLOCK_BYTES) || size > crate::superblock::MAX_SIZE_BYTES {
            return Err(VolumeError::Invalid(format!(
                "size {size} is not a multiple of 4 KiB up to 64 TiB"
            )));
        }
        Ok(())
    }

    /// Grows the volume to `size` bytes (committed before it returns).
    pub fn grow(&mut self, size: u64) -> Result<(), VolumeError> {
        self.check_grow(size)?;
        // The data file first, outside the latch: a file system that cannot hold a file this
        // large refuses it (EFBIG; ext4 stops at 16 TiB) and nothing has changed.
        if size > self.data.len() {
            self.data.set_len(size).map_err(|e| too_large(size, e))?;
        }
        self.latching(|v| {
            v.st.grow(size).map_err(VolumeError::Invalid)?;
            v.commit()
        })
    }

    // ---- the peer dirty bitmap (SPEC.md §10) -------------------------------------------------

    /// Starts keeping a peer dirty bitmap (the pair's other replica stopped taking writes):
    /// every change completed from now on sets its blocks' bits, and `extra` (changes that
    /// completed before, which the peer did not take) are set now. Committed before it returns,
    /// so the volume is known to keep one from then on, whatever happens. The volume's
    /// generation becomes `next_generation` in that commit (unless a bitmap is kept already:
    /// then nothing changes but `extra`'s bits).
    pub fn start_peer_bitmap(
        &mut self,
        extra: &[(u64, u64)],
        next_generation: [u8; 16],
    ) -> Result<(), VolumeError> {
        self.live()?;
        self.latching(|v| {
            v.st.start_peer_bitmap(next_generation);
            for &(offset, len) in extra {
                v.mark_peer_dirty(offset, len);
            }
            v.commit()
        })
    }

    /// Sets the bits of `[offset, offset+len)` (a change the peer did not take).
    pub fn mark_peer_dirty_range(&mut self, offset: u64, len: u64) {
        self.mark_peer_dirty(offset, len);
    }

    /// Whether the volume keeps a peer dirty bitmap.
    pub fn peer_bitmap(&self) -> bool {
        self.st.peer_bitmap()
    }

    /// Blocks whose peer dirty bit is set.
    pub fn peer_dirty_blocks(&self) -> u64 {
        self.st.peer_dirty_blocks()
    }

    /// The first run of set bits at or after block `from`, at most `max` blocks.
    pub fn next_peer_dirty(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        self.st.next_peer_dirty(from, max)
    }

    /// Clears the bits of `count` blocks from `first`: the peer's copy of them is equal (and
    /// durable there). Durable here with the next commit; until then a crash sets them again,
    /// which only repeats work.
    pub fn clear_peer_dirty(&mut self, first: u64, count: u64) {
        self.st.clear_peer_dirty(first, count);
    }

    /// Stops keeping the bitmap once no bit is set, committed before it returns. False while
    /// bits are set (nothing changes).
    pub fn end_peer_bitmap(&mut self) -> Result<bool, VolumeError> {
        self.live()?;
        if self.st.peer_dirty_blocks() > 0 {
            return Ok(false);
        }
        self.latching(|v| {
            let ended = v.st.end_peer_bitmap();
            v.commit()?;
            Ok(ended)
        })
    }

    /// The generation the peer's replica was left at, while a bitmap is kept.
    pub fn peer_generation(&self) -> Option<[u8; 16]> {
        self.st.peer_generation()
    }

    /// Sets the current generation, committed before it returns (SPEC.md §10, generations):
    /// `keep_old` puts the old one in the history. Refused while a peer dirty bitmap is kept.
    pub fn set_generation(
        &mut self,
        generation: [u8; 16],
        keep_old: bool,
    ) -> Result<(), VolumeError> {
        self.live()?;
        if self.st.peer_bitmap() {
            return Err(VolumeError::Invalid(
                "the volume keeps a peer dirty bitmap: its generation is its own".into(),
            ));
        }
        self.latching(|v| {
            v.st.set_generation(generation, keep_old);
            v.commit()
        })
    }

    /// `rebase_peer_bitmap` of the state (SPEC.md §10, generations), committed before it
    /// returns. Refused without a peer dirty bitmap.
    pub fn rebase_peer_bitmap(&mut self, next_generation: [u8; 16]) -> Result<(), VolumeError> {
        self.live()?;
        if !self.st.peer_bitmap() {
            return Err(VolumeError::Invalid(
                "the volume keeps no peer dirty bitmap to rebase".into(),
            ));
        }
        self.latching(|v| {
            v.st.rebase_peer_bitmap(next_generation);
            v.commit()
        })
    }

    /// The generation identifiers (SPEC.md §10): current, the bitmap's (while one is kept),
    /// and the history, newest first.
    pub fn generations(&self) -> ([u8; 16], Option<[u8; 16]>, [[u8; 16]; GENERATION_HISTORY]) {
        (
            self.st.superblock().generation,
            self.st.peer_generation(),
            self.st.history(),
        )
    }

    /// Starts a new epoch (replication): the first write after it adopts `next_generation`.
    pub fn begin_epoch(
        &mut self,
        epoch: u64,
        next_generation: [u8; 16],
    ) -> Result<(), VolumeError> {
        self.latching(|v| {
            v.st.begin_epoch(epoch, next_generation);
            v.commit()
        })
    }

    pub fn stat(&self) -> Result<VolumeStat, VolumeError> {
        let sb = self.st.superblock();
        let metadata_bytes = self.meta.allocated_bytes()?;
        Ok(VolumeStat {
            size: sb.size_bytes,
            own_blocks: self.st.map().own_blocks(),
            allocated_bytes: self.data.allocated_bytes()? + metadata_bytes,
            metadata_bytes,
            backing: self.st.backing(),
            generation: sb.generation,
            epoch: sb.epoch,
            commit: sb.sequence,
        })
    }

    /// Extents covering `[offset, offset+len)`: which layer holds each range and whether it
    /// reads as zeroes. Adjacent extents always differ.
    pub fn block_status(&mut self, offset: u64, len: u64) -> Result<Vec<Extent>, VolumeError> {
        self.live()?;
        self.range(offset, len)?;
        self.page_in(offset, len)?;
        let mut pieces = Vec::new();
        self.st.pieces(offset, len, |p| pieces.push(p));
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| match out.last_mut() {
            Some(l) if l.layer == e.layer && l.zero == e.zero && l.offset + l.len == e.offset => {
                l.len += e.len
            }
            _ => out.push(e),
        };
        for p in pieces {
            let (layer, file) = match p.source {
                Source::Zero => {
                    push(Extent {
                        offset: p.offset,
                        len: p.len,
                        layer: Layer::None,
                        zero: true,
                    });
                    continue;
                }
                Source::Data => (Layer::Volume, &mut self.data),
                Source::Image => (
                    Layer::Image,
                    self.image.as_mut().expect("image piece has an image"),
                ),
            };
            let end = p.offset + p.len;
            let mut pos = p.offset;
            while pos < end {
                let data_at = file.seek_data(pos)?.unwrap_or(end).min(end);
                if data_at > pos {
                    push(Extent {
                        offset: pos,
                        len: data_at - pos,
                        layer,
                        zero: true,
                    });
                    pos = data_at;
                    continue;
                }
                let hole_at = file.seek_hole(pos)?.clamp(pos + 1, end);
                push(Extent {
                    offset: pos,
                    len: hole_at - pos,
                    layer,
                    zero: false,
                });
                pos = hole_at;
            }
        }
        Ok(out)
    }

    /// Flattens the volume into `raw` (an empty file) and seals it as a new golden image with
    /// `id`: every byte is copied once, zero runs stay holes, and the digest is computed on the
    /// way (through `ImageWriter`, which also paces the writeback). The volume should be quiesced (no writers) by the caller.
    pub fn capture<T: Storage>(
        &mut self,
        raw: &mut T,
        id: [u8; 16],
        mut progress: impl FnMut(u64),
    ) -> Result<ImageInfo, VolumeError> {
        self.live()?;
        let size = self.size();
        let mut out = ImageWriter::new(raw)?;
        let mut buf = vec![0u8; STREAM_IO_BYTES];
        let mut pos = 0;
        while pos < size {
            let n = (size - pos).min(STREAM_IO_BYTES as u64) as usize;
            self.read(pos, &mut buf[..n])?;
            out.write(&buf[..n])?;
            pos += n as u64;
            progress(pos);
        }
        Ok(out.finish(id)?)
    }
}

/// How `Volume::zero` zeroes whole blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeroing {
    /// Free them (a hole reads as zeroes): WRITE_ZEROES, TRIM.
    Punch,
    /// Keep them allocated: WRITE_ZEROES with NO_HOLE.
    Allocate,
}

/// A data file that could not be made `size` bytes long: the file system's limit (EFBIG) is
/// an unacceptable size, anything else an I/O error.
fn too_large(size: u64, e: std::io::Error) -> VolumeError {
    const EFBIG: i32 = 27;
    match e.raw_os_error() {
        Some(EFBIG) => VolumeError::Invalid(format!(
            "the file system cannot hold a volume of {size} bytes ({e})"
        )),
        _ => VolumeError::Io(e),
    }
}

/// Reads the superblocks and every stored map page (skipping holes) into a checked state.
pub(crate) fn load_state<S: Storage>(
    meta: &mut S,
    cache_pages: usize,
) -> Result<VolumeState, VolumeError> {
    let mut a = [0u8; SUPERBLOCK_SLOT_BYTES];
    let mut b = [0u8; SUPERBLOCK_SLOT_BYTES];
    meta.read_at(SUPERBLOCK_A_OFFSET, &mut a)?;
    meta.read_at(SUPERBLOCK_B_OFFSET, &mut b)?;
    let mut st = VolumeState::begin_load(&a, &b)?;
    st.set_cache_pages(cache_pages);
    // Pages ever written are the ones with allocated slots; a fresh clone has none.
    let pages = written_pages(meta, MAP_OFFSET, PEER_OFFSET)?;
    let peer_pages = written_pages(meta, PEER_OFFSET, u64::MAX)?;
    for p in pages {
        let p = u32::try_from(p).map_err(|_| {
            FormatError::invariant("block map", "metadata file holds a page beyond any volume")
        })?;
        let mut slots = [[0u8; MAP_SLOT_BYTES]; 2];
        for (s, buf) in slots.iter_mut().enumerate() {
            meta.read_at(crate::slot::slot_offset(p, s as u8), buf)?;
        }
        st.load_page(p, [&slots[0], &slots[1]])?;
    }
    for q in peer_pages {
        let q = u32::try_from(q)
            .ok()
            .filter(|&q| q < u32::MAX - PEER_PAGE_BASE)
            .ok_or_else(|| {
                FormatError::invariant("peer dirty bitmap", "a page beyond any volume")
            })?;
        let mut slots = [[0u8; MAP_SLOT_BYTES]; 2];
        for (s, buf) in slots.iter_mut().enumerate() {
            meta.read_at(crate::slot::slot_offset(PEER_PAGE_BASE + q, s as u8), buf)?;
        }
        st.load_peer_page(q, [&slots[0], &slots[1]])?;
    }
    let mut st = st.finish_load()?;
    // Orphans evicted while loading are read back now: the next commit must rewrite them.
    for p in st.orphans_to_reload() {
        let mut buf = [0u8; MAP_SLOT_BYTES];
        meta.read_at(st.page_slot_offset(p), &mut buf)?;
        st.reload_page(p, &buf)?;
    }
    Ok(st)
}

/// The indices (from `from`) of the page slot pairs in `[from, to)` of the metadata file
/// that hold any data: the pages ever written (a fresh clone has none).
fn written_pages<S: Storage>(meta: &mut S, from: u64, to: u64) -> Result<Vec<u64>, VolumeError> {
    let mut pages = Vec::new();
    let mut pos = from;
    while pos < to {
        let Some(d) = meta.seek_data(pos)? else {
            break;
        };
        let d = d.max(from);
        if d >= to {
            break;
        }
        let h = meta.seek_hole(d)?.max(d + 1).min(to);
        let first = (d - from) / (2 * MAP_SLOT_BYTES as u64);
        let last = (h - 1 - from) / (2 * MAP_SLOT_BYTES as u64);
        for p in first..=last {
            if pages.last() != Some(&p) {
                pages.push(p);
            }
        }
        pos = h;
    }
    Ok(pages)
}

/// Writes a planned commit to the metadata file in the order SPEC.md §6 requires: pages (and a
/// lagging copy B), sync, superblock copy A, sync, then copy B lazily. The data file must have
/// been synced after the commit was planned and before this is called.
pub fn write_commit<S: Storage>(meta: &mut S, c: &Commit) -> Result<(), VolumeError> {
    for (off, bytes) in &c.pages {
        meta.write_at(*off, &bytes[..])?;
    }
    if let Some(prev) = &c.previous {
        meta.write_at(SUPERBLOCK_B_OFFSET, &prev[..])?;
    }
    meta.sync()?;
    meta.write_at(SUPERBLOCK_A_OFFSET, &c.superblock[..])?;
    meta.sync()?;
    meta.write_at(SUPERBLOCK_B_OFFSET, &c.superblock[..])?;
    Ok(())
}

/// The blocks at either edge of `[offset, end)` (non-empty) that it covers only in part.
fn partial_edges(offset: u64, end: u64) -> impl Iterator<Item = u64> {
    let head = offset / BLOCK_BYTES;
    let tail = (end - 1) / BLOCK_BYTES;
    let partial = move |b: u64| {
        let b_start = b * BLOCK_BYTES;
        !(offset <= b_start && end >= b_start + BLOCK_BYTES)
    };
    [Some(head), (tail != head).then_some(tail)]
        .into_iter()
        .flatten()
        .filter(move |&b| partial(b))
}
