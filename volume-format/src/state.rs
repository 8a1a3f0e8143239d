//! The pure core of an open volume: its superblock, its block map and which on-disk version of
//! each map page is current. It does no I/O. It answers "where do these bytes come from", records
//! which blocks became OWN, and plans commits; whoever drives it (the synchronous `Volume` over
//! the `Storage` trait, or the io_uring engine) performs the I/O and reports back.
//!
//! Commit protocol (SPEC.md §6), in this order, at most one commit in flight:
//! 1. `plan_commit` snapshots the dirty map pages. Only writes that completed before this point
//!    are covered by the commit.
//! 2. The driver `fdatasync`s the data file: every block those bits describe is durable.
//! 3. It writes each planned page to its alternate slot, and copy B of the superblock if B does
//!    not hold the last commit (`Commit::previous`), then `fdatasync`s the metadata file (even
//!    with nothing to write: this makes the previous commit's lazily written copy B durable).
//!    From here on, copy B holds the last commit, so overwriting copy A is safe.
//! 4. It writes the planned superblock to copy A (the commit record) and `fdatasync`s: the
//!    commit is done and may be acknowledged.
//! 5. It writes the same superblock to copy B, not synced: the next commit's first sync (or the
//!    close) makes it durable. With two equal copies, one damaged copy costs nothing.
//! 6. `commit_done` installs the new page versions and the superblock.
//!
//! A failure anywhere leaves the volume to be reopened: the driver latches it failed.

use crate::error::FormatError;
use crate::image::ImageRef;
use crate::layout::*;
use crate::map::{BlockMap, BlockState};
use crate::slot;
use crate::superblock::{MAX_SIZE_BYTES, Superblock};

/// Where a byte range of the volume reads from. Offsets are volume offsets: both files are
/// identity-mapped, so the same offset is used in the image or the data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The backing image at the same offset.
    Image,
    /// The volume's data file at the same offset (holes read as zeroes).
    Data,
    /// Zeroes with no I/O: past the backing image's end, or a blank volume's unwritten blocks.
    Zero,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub source: Source,
}

/// The on-disk version of one map page that is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageVersion {
    slot: u8,
    seq: u64,
    crc: u32,
}

/// One planned commit: write `pages`, sync, write `superblock` to copy A, sync, then to copy B.
pub struct Commit {
    pub seq: u64,
    /// `(offset in the metadata file, slot bytes)`.
    pub pages: Vec<(u64, Box<[u8; MAP_SLOT_BYTES]>)>,
    pub superblock: Box<[u8; SUPERBLOCK_SLOT_BYTES]>,
    /// The last commit's superblock, to write to copy B in step 3 when B lags behind it.
    pub previous: Option<Box<[u8; SUPERBLOCK_SLOT_BYTES]>>,
    versions: Vec<(u32, PageVersion)>,
    sb: Superblock,
}

/// The peer dirty bitmap (SPEC.md §10) while the volume keeps one: a bit per block, set when a
/// write, zeroing or trim of the block completes, cleared when the resync made the peer's copy
/// of it equal. Its pages are committed with the block map's, by the same protocol, and always
/// held in memory (32 KiB per GiB).
struct PeerBitmap {
    map: BlockMap,
    versions: Vec<Option<PageVersion>>,
}

pub struct VolumeState {
    sb: Superblock,
    map: BlockMap,
    peer: Option<PeerBitmap>,
    /// Slots of the peer bitmap's region holding versions of a commit that never completed:
    /// `(page, slot)`. The next commit zeroes them (unless it writes that slot), whether or not
    /// a bitmap is kept then: their number is the one it takes.
    peer_orphans: Vec<(u32, u8)>,
    versions: Vec<Option<PageVersion>>,
    /// The superblock changed (size, epoch, generation) and must be committed.
    sb_dirty: bool,
    /// Slots holding versions of a commit that never completed: `(page, slot)`.
    orphans: Vec<(u32, u8)>,
    /// The last committed superblock's bytes, and the commit copy B holds (0: none valid).
    committed: Box<[u8; SUPERBLOCK_SLOT_BYTES]>,
    b_seq: u64,
    /// Anomalies seen while loading that did not matter (torn or orphaned slots), for the checker.
    notes: Vec<String>,
    /// Most map pages held in memory: clean ones beyond it are evicted, least recently used
    /// first, and read back from their committed slot when used again (`usize::MAX`: all).
    cache_pages: usize,
    /// When each page was last used (a tick of `clock`).
    last_used: Vec<u64>,
    clock: u64,
    /// Pages used at or after this tick belong to the operation under way: never evicted by it.
    op_start: u64,
    /// A planned commit has not completed: the pages it took from the dirty list are in it and
    /// their new versions not yet installed, so no page may be evicted meanwhile.
    commit_in_flight: bool,
    /// Pages of an uncommitted commit's orphans that were evicted while loading: marked dirty
    /// (to be rewritten) once read back.
    orphans_evicted: Vec<u32>,
}

/// Blocks in a volume of `size` bytes.
pub fn blocks_of(size: u64) -> u64 {
    size.div_ceil(BLOCK_BYTES)
}

impl VolumeState {
    /// A new volume's state and the superblock bytes to write (slot A) before it is used.
    pub fn create(
        volume_id: [u8; 16],
        generation: [u8; 16],
        size: u64,
        backing: Option<ImageRef>,
    ) -> Result<(VolumeState, [u8; SUPERBLOCK_SLOT_BYTES]), String> {
        check_size(size, backing.as_ref())?;
        let mut sb = Superblock::new(volume_id, generation, size);
        if let Some(b) = backing {
            if b.id == [0; 16] {
                return Err("a backing image id must not be zero".into());
            }
            sb.backing_id = b.id;
            sb.backing_digest = b.digest;
            sb.backing_size_bytes = b.size;
        }
        let bytes = sb.encode();
        let mut st = VolumeState::empty(sb);
        st.b_seq = 1; // `create` writes both copies
        Ok((st, bytes))
    }

    fn empty(sb: Superblock) -> VolumeState {
        let blocks = blocks_of(sb.size_bytes);
        let map = BlockMap::new(blocks);
        let pages = map.pages() as usize;
        let committed = Box::new(sb.encode());
        let peer = (sb.incompat & INCOMPAT_PEER_DIRTY_BITMAP != 0).then(|| PeerBitmap {
            map: BlockMap::new(blocks),
            versions: vec![None; pages],
        });
        VolumeState {
            sb,
            map,
            peer,
            peer_orphans: Vec::new(),
            versions: vec![None; pages],
            sb_dirty: false,
            orphans: Vec::new(),
            committed,
            b_seq: 0,
            notes: Vec::new(),
            cache_pages: usize::MAX,
            last_used: vec![0; pages],
            clock: 0,
            op_start: 0,
            commit_in_flight: false,
            orphans_evicted: Vec::new(),
        }
    }

    /// Holds at most `pages` map pages in memory (at least one), besides the pages the
    /// operation under way uses and dirty ones; set before the pages are loaded, so loading a
    /// large map never holds all of it.
    pub fn set_cache_pages(&mut self, pages: usize) {
        self.cache_pages = pages.max(1);
    }

    /// Map pages of the byte range `[offset, offset+len)`.
    fn pages_of(&self, offset: u64, len: u64) -> std::ops::Range<u32> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / BLOCK_BYTES / BLOCKS_PER_MAP_PAGE;
        let last = (offset + len - 1) / BLOCK_BYTES / BLOCKS_PER_MAP_PAGE;
        first as u32..(last as u32 + 1).min(self.map.pages())
    }

    /// Pages of `[offset, offset+len)` that must be read back (`reload_page`) before the range
    /// is used; marks the range's pages used now.
    pub fn evicted_pages(&mut self, offset: u64, len: u64) -> Vec<u32> {
        self.op_start = self.clock + 1;
        let mut out = Vec::new();
        for p in self.pages_of(offset, len) {
            self.clock += 1;
            self.last_used[p as usize] = self.clock;
            if self.map.is_evicted(p) {
                out.push(p);
            }
        }
        out
    }

    /// Where the committed version of page `p` sits in the metadata file.
    pub fn page_slot_offset(&self, p: u32) -> u64 {
        let v = self.versions[p as usize].expect("an evicted page has a committed version");
        slot::slot_offset(p, v.slot)
    }

    /// Reads an evicted page back from the slot bytes at `page_slot_offset`, checked against
    /// the version committed: anything else there means the file changed under the volume.
    pub fn reload_page(&mut self, p: u32, bytes: &[u8; MAP_SLOT_BYTES]) -> Result<(), FormatError> {
        assert!(self.map.is_evicted(p), "map page {p} is not evicted");
        let v = self.versions[p as usize].expect("an evicted page has a committed version");
        match slot::decode(bytes, p, v.slot, &self.sb.volume_id) {
            Ok(Some(d)) if d.seq == v.seq && d.crc == v.crc => self.map.load_page(p, &d.words)?,
            _ => {
                return Err(FormatError::invariant(
                    format!("map page {p} slot {}", v.slot),
                    format!(
                        "no longer holds the version committed (commit {}) when the page was \
                         evicted from memory",
                        v.seq
                    ),
                ));
            }
        }
        if let Some(i) = self.orphans_evicted.iter().position(|&o| o == p) {
            self.orphans_evicted.swap_remove(i);
            self.map.mark_dirty(p);
        }
        Ok(())
    }

    /// Dirty pages beyond the cache's size: the driver should commit soon (a client that
    /// writes all over a volume and never flushes would otherwise hold its whole map).
    pub fn cache_overfull(&self) -> bool {
        self.map.dirty_pages() > self.cache_pages
    }

    /// Dirty pages past twice the cache's size: writes should wait for a commit (the
    /// background one `cache_overfull` asks for has not kept up), so the map in memory stays
    /// bounded however fast a client writes.
    pub fn must_wait_for_commit(&self) -> bool {
        self.map.dirty_pages() > self.cache_pages.saturating_mul(2)
    }

    /// Orphaned pages evicted while loading: the driver reads them back right after the load.
    pub fn orphans_to_reload(&self) -> Vec<u32> {
        self.orphans_evicted.clone()
    }

    /// Evicts clean pages, least recently used first, while more than the cache holds are
    /// resident (down to 7/8 of it, so a run of reads back does not scan every time). Returns
    /// how many it evicted.
    pub fn trim_cache(&mut self) -> usize {
        if self.map.resident_pages() <= self.cache_pages || self.commit_in_flight {
            return 0;
        }
        let keep = self.cache_pages - self.cache_pages / 8;
        let mut clean: Vec<(u64, u32)> = (0..self.map.pages())
            .filter(|&p| {
                self.map.is_resident(p)
                    && !self.map.is_dirty(p)
                    && self.versions[p as usize].is_some()
                    && self.last_used[p as usize] < self.op_start
            })
            .map(|p| (self.last_used[p as usize], p))
            .collect();
        clean.sort_unstable();
        let mut evicted = 0;
        for (_, p) in clean {
            if self.map.resident_pages() <= keep {
                break;
            }
            self.map.evict(p);
            evicted += 1;
        }
        evicted
    }

    /// Starts loading from the two superblock slots. Then call `load_page` for every page whose
    /// slots are not both holes, and `finish_load`.
    pub fn begin_load(
        a: &[u8; SUPERBLOCK_SLOT_BYTES],
        b: &[u8; SUPERBLOCK_SLOT_BYTES],
    ) -> Result<VolumeState, FormatError> {
        let sb = Superblock::choose(a, b)?;
        let mut st = VolumeState::empty(sb);
        st.b_seq = Superblock::decode(b).map_or(0, |s| s.sequence);
        for (name, bytes) in [("A", a), ("B", b)] {
            match Superblock::decode(bytes) {
                Ok(s) if s.sequence == st.sb.sequence => {}
                Ok(s) => st.notes.push(format!(
                    "superblock {name}: older copy (commit {})",
                    s.sequence
                )),
                Err(e) => st.notes.push(format!("superblock {name}: not usable: {e}")),
            }
        }
        Ok(st)
    }

    /// Loads page `p` from its two slots: the valid version with the highest commit number not
    /// above the superblock's wins. Newer versions belong to a commit that never completed.
    pub fn load_page(
        &mut self,
        p: u32,
        slots: [&[u8; MAP_SLOT_BYTES]; 2],
    ) -> Result<(), FormatError> {
        let beyond_end = p as usize >= self.versions.len();
        let mut best: Option<(u8, slot::Slot)> = None;
        for (s, bytes) in slots.iter().enumerate() {
            let s = s as u8;
            match slot::decode(bytes, p, s, &self.sb.volume_id) {
                Ok(None) => {}
                // A version from a commit that never completed. It must not outlive the next
                // commit, which takes its number: that commit overwrites it.
                Ok(Some(v)) if v.seq > self.sb.sequence => {
                    self.notes.push(format!(
                        "map page {p} slot {s}: from commit {} that never completed",
                        v.seq
                    ));
                    self.orphans.push((p, s));
                }
                Ok(Some(_)) if beyond_end => {
                    return Err(FormatError::invariant(
                        format!("map page {p} slot {s}"),
                        "a committed map page beyond the end of the volume",
                    ));
                }
                Ok(Some(v)) => {
                    if best.as_ref().is_none_or(|(_, b)| v.seq > b.seq) {
                        if let Some((bs, b)) = best.take() {
                            self.notes.push(format!(
                                "map page {p} slot {bs}: older version (commit {})",
                                b.seq
                            ));
                        }
                        best = Some((s, v));
                    }
                }
                // A torn write of an interrupted commit looks like this; if the slot mattered,
                // the map digest will not match and the volume is refused.
                Err(e) => self.notes.push(format!("not usable: {e}")),
            }
        }
        if let Some((s, v)) = best {
            debug_assert!(!beyond_end);
            self.map.load_page(p, &v.words)?;
            self.versions[p as usize] = Some(PageVersion {
                slot: s,
                seq: v.seq,
                crc: v.crc,
            });
            // A large map is never all in memory at once, not even while it loads.
            if self.map.resident_pages() > self.cache_pages && self.map.is_resident(p) {
                self.map.evict(p);
            }
        }
        Ok(())
    }

    /// Loads peer bitmap page `q` from its two slots (read whether or not the volume keeps a
    /// bitmap: orphans there must be found either way). A version counts if the current bitmap
    /// wrote it (numbered from `peer_since` up to the superblock's commit); older ones belong to
    /// an earlier bitmap and are ignored; newer ones are orphans.
    pub fn load_peer_page(
        &mut self,
        q: u32,
        slots: [&[u8; MAP_SLOT_BYTES]; 2],
    ) -> Result<(), FormatError> {
        let index = PEER_PAGE_BASE + q;
        let since = self.sb.peer_since;
        let mut best: Option<(u8, slot::Slot)> = None;
        for (s, bytes) in slots.iter().enumerate() {
            let s = s as u8;
            match slot::decode(bytes, index, s, &self.sb.volume_id) {
                Ok(None) => {}
                Ok(Some(v)) if v.seq > self.sb.sequence => {
                    self.notes.push(format!(
                        "peer bitmap page {q} slot {s}: from commit {} that never completed",
                        v.seq
                    ));
                    self.peer_orphans.push((q, s));
                }
                Ok(Some(v)) if self.peer.is_none() || v.seq < since => {}
                Ok(Some(v)) => {
                    if best.as_ref().is_none_or(|(_, b)| v.seq > b.seq) {
                        best = Some((s, v));
                    }
                }
                Err(e) => self.notes.push(format!("peer bitmap: not usable: {e}")),
            }
        }
        if let Some((s, v)) = best {
            let peer = self.peer.as_mut().expect("checked above");
            if q as usize >= peer.versions.len() {
                return Err(FormatError::invariant(
                    format!("peer bitmap page {q} slot {s}"),
                    "a committed peer bitmap page beyond the end of the volume",
                ));
            }
            peer.map.load_page(q, &v.words)?;
            peer.versions[q as usize] = Some(PageVersion {
                slot: s,
                seq: v.seq,
                crc: v.crc,
            });
        }
        Ok(())
    }

    /// Checks that the loaded pages are exactly the committed map.
    pub fn finish_load(mut self) -> Result<VolumeState, FormatError> {
        if let Some(peer) = &mut self.peer {
            let digest = peer_digest(&peer.versions);
            if digest != self.sb.peer_digest {
                return Err(FormatError::invariant(
                    "peer dirty bitmap",
                    format!(
                        "digest {digest:#018x} does not match the committed {:#018x}: a \
                         committed bitmap page is missing or damaged",
                        self.sb.peer_digest
                    ),
                ));
            }
            peer.map.take_dirty();
        }
        let digest = self.digest();
        if digest != self.sb.map_digest {
            let detail = if self.notes.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.notes.join("; "))
            };
            return Err(FormatError::invariant(
                "block map",
                format!(
                    "digest {digest:#018x} does not match the committed {:#018x}: a committed map \
                     page is missing or damaged{detail}",
                    self.sb.map_digest
                ),
            ));
        }
        self.map.take_dirty();
        // Orphaned versions are rewritten by the next commit (in range) or zeroed (past the end,
        // from a grow that never committed), before its number can make them look committed.
        let pages = self.map.pages();
        for &(p, _) in &self.orphans {
            if p < pages {
                if self.map.is_evicted(p) {
                    self.orphans_evicted.push(p);
                } else {
                    self.map.mark_dirty(p);
                }
            }
        }
        Ok(self)
    }

    fn digest(&self) -> u64 {
        self.versions
            .iter()
            .enumerate()
            .filter_map(|(p, v)| v.map(|v| slot::digest_share(p as u32, v.seq, v.crc)))
            .fold(0, |a, b| a ^ b)
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn map(&self) -> &BlockMap {
        &self.map
    }

    /// Bytes of memory this state holds: the map and the per-page version table.
    pub fn memory_bytes(&self) -> usize {
        self.map.resident_bytes()
            + self.versions.len() * std::mem::size_of::<Option<PageVersion>>()
            + self.last_used.len() * std::mem::size_of::<u64>()
            + std::mem::size_of::<VolumeState>()
    }

    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    pub fn size(&self) -> u64 {
        self.sb.size_bytes
    }

    pub fn backing(&self) -> Option<ImageRef> {
        (self.sb.backing_id != [0; 16]).then_some(ImageRef {
            id: self.sb.backing_id,
            size: self.sb.backing_size_bytes,
            digest: self.sb.backing_digest,
        })
    }

    /// Blocks that may read image data (the image's last partial block included).
    pub fn image_blocks(&self) -> u64 {
        blocks_of(self.sb.backing_size_bytes)
    }

    pub fn state(&self, block: u64) -> BlockState {
        self.map.get(block)
    }

    /// Records that `count` blocks from `first` now hold their own data (after the write or hole
    /// punch that put it there completed).
    pub fn mark_own(&mut self, first: u64, count: u64) {
        self.map.set(first, count, BlockState::Own);
    }

    /// Calls `f` with the pieces covering `[offset, offset+len)`, in order.
    pub fn pieces(&self, offset: u64, len: u64, mut f: impl FnMut(Piece)) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        let first = offset / BLOCK_BYTES;
        let last = (end - 1) / BLOCK_BYTES;
        let image_end = self.sb.backing_size_bytes;
        for (start, count, state) in self.map.runs(first, last - first + 1) {
            let a = (start * BLOCK_BYTES).max(offset);
            let b = ((start + count) * BLOCK_BYTES).min(end);
            match state {
                BlockState::Own => f(Piece {
                    offset: a,
                    len: b - a,
                    source: Source::Data,
                }),
                BlockState::Inherited => {
                    let split = image_end.clamp(a, b);
                    if split > a {
                        f(Piece {
                            offset: a,
                            len: split - a,
                            source: Source::Image,
                        });
                    }
                    if b > split {
                        f(Piece {
                            offset: split,
                            len: b - split,
                            source: Source::Zero,
                        });
                    }
                }
            }
        }
    }

    // ---- the peer dirty bitmap (SPEC.md §10) ----

    /// Whether the volume keeps a peer dirty bitmap.
    pub fn peer_bitmap(&self) -> bool {
        self.peer.is_some()
    }

    /// Starts a peer dirty bitmap (if none is kept): from now on every completed change sets
    /// its blocks' bits. `peer_generation` records which generation the peer's replica was
    /// left at. Durable with the next commit, which also numbers the bitmap (`peer_since`).
    ///
    /// The volume's generation becomes `next_generation` in the same commit: its contents
    /// start to differ from the peer's now, so the generation the peer was left at (the bitmap
    /// generation) and this one's current generation part here (SPEC.md §10, generations).
    pub fn start_peer_bitmap(&mut self, next_generation: [u8; 16]) {
        if self.peer.is_some() {
            return;
        }
        let blocks = self.map.blocks();
        self.peer = Some(PeerBitmap {
            map: BlockMap::new(blocks),
            versions: vec![None; self.map.pages() as usize],
        });
        self.sb.incompat |= INCOMPAT_PEER_DIRTY_BITMAP;
        self.sb.peer_generation = self.sb.generation;
        self.sb.generation = next_generation;
        self.sb.peer_digest = 0;
        self.sb.peer_since = 0; // set by the commit that makes it durable
        self.sb_dirty = true;
    }

    /// Sets the bits of `count` blocks from `first` (their change completed), if a bitmap is
    /// kept.
    pub fn mark_peer_dirty(&mut self, first: u64, count: u64) {
        if let Some(p) = &mut self.peer {
            let count = count.min(p.map.blocks().saturating_sub(first));
            if count > 0 {
                p.map.set(first, count, BlockState::Own);
            }
        }
    }

    /// Clears the bits of `count` blocks from `first` (the peer's copy of them is equal now).
    pub fn clear_peer_dirty(&mut self, first: u64, count: u64) {
        if let Some(p) = &mut self.peer {
            let count = count.min(p.map.blocks().saturating_sub(first));
            if count > 0 {
                p.map.set(first, count, BlockState::Inherited);
            }
        }
    }

    /// Blocks whose bit is set.
    pub fn peer_dirty_blocks(&self) -> u64 {
        self.peer.as_ref().map_or(0, |p| p.map.own_blocks())
    }

    /// The first run of set bits at or after block `from`, at most `max` blocks long.
    pub fn next_peer_dirty(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let p = self.peer.as_ref()?;
        let blocks = p.map.blocks();
        if from >= blocks {
            return None;
        }
        p.map
            .runs(from, blocks - from)
            .find(|&(_, _, state)| state == BlockState::Own)
            .map(|(start, count, _)| (start, count.min(max)))
    }

    /// Ends the bitmap once no bit is set (the peer is in sync again). Durable with the next
    /// commit. Refused (false) while bits are set.
    pub fn end_peer_bitmap(&mut self) -> bool {
        match &self.peer {
            None => return true,
            Some(p) if p.map.own_blocks() > 0 => return false,
            Some(_) => {}
        }
        self.peer = None;
        self.sb.incompat &= !INCOMPAT_PEER_DIRTY_BITMAP;
        self.sb.peer_since = 0;
        self.sb.peer_digest = 0;
        // The generation the peer was left at becomes history: the peer has this volume's
        // current generation now (it adopted it before the bitmap ended).
        let left_at = std::mem::take(&mut self.sb.peer_generation);
        self.push_history(left_at);
        self.sb_dirty = true;
        true
    }

    /// The peer took this volume's current generation while the bitmap is still kept (a resync
    /// ended on the peer, not yet here): the bitmap now counts from the current generation,
    /// which becomes the bitmap generation (the old one goes to the history), and the volume
    /// takes `next_generation`, so what it writes alone from now on is told apart from what
    /// the peer holds. Refused (false) without a bitmap.
    pub fn rebase_peer_bitmap(&mut self, next_generation: [u8; 16]) -> bool {
        if self.peer.is_none() {
            return false;
        }
        let old = self.sb.peer_generation;
        self.push_history(old);
        self.sb.peer_generation = self.sb.generation;
        self.sb.generation = next_generation;
        self.sb_dirty = true;
        true
    }

    /// Puts `g` at the head of the generation history (unless zero or already there).
    fn push_history(&mut self, g: [u8; 16]) {
        if g == [0; 16] || self.sb.history[0] == g {
            return;
        }
        self.sb.history.rotate_right(1);
        self.sb.history[0] = g;
        self.sb.incompat |= INCOMPAT_GENERATION_HISTORY;
    }

    /// Sets the volume's current generation (durable with the next commit): a replica that
    /// a resync made equal to its owner's copy adopts the owner's generation, its old one
    /// going to the history (`keep_old`); a replica whose changes were discarded sets zero
    /// (no generation: its contents are nobody's until a whole resync). Refused (false) while a
    /// peer dirty bitmap is kept: that generation was this volume's own.
    pub fn set_generation(&mut self, generation: [u8; 16], keep_old: bool) -> bool {
        if self.peer.is_some() {
            return false;
        }
        if self.sb.generation != generation {
            if keep_old {
                let old = self.sb.generation;
                self.push_history(old);
            }
            self.sb.generation = generation;
            self.sb_dirty = true;
        }
        true
    }

    /// The generation history, newest first (zero where none).
    pub fn history(&self) -> [[u8; 16]; GENERATION_HISTORY] {
        self.sb.history
    }

    /// The generation the peer's replica was left at, while a bitmap is kept.
    pub fn peer_generation(&self) -> Option<[u8; 16]> {
        self.peer.as_ref().map(|_| self.sb.peer_generation)
    }

    /// Arms a new epoch: the next write adopts `next_generation` (committed before it is done).
    pub fn begin_epoch(&mut self, epoch: u64, next_generation: [u8; 16]) {
        self.sb.epoch = epoch;
        self.sb.flags |= FLAG_GENERATION_ARMED;
        self.sb.next_generation = next_generation;
        self.sb_dirty = true;
    }

    /// Called before every write: true when this is the first write of an armed epoch, so the
    /// driver must commit the new generation before the write goes to disk.
    pub fn rotate_generation(&mut self) -> bool {
        if self.sb.flags & FLAG_GENERATION_ARMED == 0 {
            return false;
        }
        self.sb.generation = self.sb.next_generation;
        self.sb.next_generation = [0; 16];
        self.sb.flags &= !FLAG_GENERATION_ARMED;
        self.sb_dirty = true;
        true
    }

    /// Grows the volume (the driver extends the data file first).
    pub fn grow(&mut self, size: u64) -> Result<(), String> {
        check_size(size, self.backing().as_ref())?;
        if size < self.sb.size_bytes {
            return Err(format!(
                "volumes only grow: {size} is smaller than the current {}",
                self.sb.size_bytes
            ));
        }
        self.map.grow(blocks_of(size));
        self.versions.resize(self.map.pages() as usize, None);
        if let Some(p) = &mut self.peer {
            p.map.grow(blocks_of(size));
            p.versions.resize(self.map.pages() as usize, None);
        }
        self.last_used.resize(self.map.pages() as usize, 0);
        self.sb.size_bytes = size;
        self.sb_dirty = true;
        Ok(())
    }

    /// Whether a commit has anything to write.
    pub fn needs_commit(&self) -> bool {
        self.sb_dirty
            || self.map.has_dirty()
            || self.peer.as_ref().is_some_and(|p| p.map.has_dirty())
    }

    /// Plans the next commit (step 1 of the protocol), or `None` when nothing changed.
    pub fn plan_commit(&mut self) -> Option<Commit> {
        if !self.needs_commit() && self.orphans.is_empty() && self.peer_orphans.is_empty() {
            return None;
        }
        assert!(
            self.orphans_evicted.is_empty(),
            "orphaned map pages {:?} must be read back before the next commit takes their number",
            self.orphans_evicted
        );
        let seq = self.sb.sequence + 1;
        let mut digest = self.sb.map_digest;
        let mut pages = Vec::new();
        let mut versions = Vec::new();
        for p in self.map.take_dirty() {
            let old = self.versions[p as usize];
            // The slot not holding the current version; for a page with none yet, the slot an
            // orphan sits in (so the orphan is overwritten), else 0.
            let orphan = self.orphans.iter().find(|o| o.0 == p).map(|o| o.1);
            let s = old.map_or(orphan.unwrap_or(0), |v| 1 - v.slot);
            let (bytes, crc) = slot::encode(p, &self.sb.volume_id, seq, &self.map.page_words(p));
            if let Some(v) = old {
                digest ^= slot::digest_share(p, v.seq, v.crc);
            }
            digest ^= slot::digest_share(p, seq, crc);
            pages.push((slot::slot_offset(p, s), Box::new(bytes)));
            versions.push((p, PageVersion { slot: s, seq, crc }));
        }
        let pages_in_range = self.map.pages();
        for &(p, s) in &self.orphans {
            if p >= pages_in_range {
                pages.push((slot::slot_offset(p, s), Box::new([0u8; MAP_SLOT_BYTES])));
            }
        }
        // The peer bitmap's pages, by the same rule, numbered from PEER_PAGE_BASE. A bitmap
        // started since the last commit is numbered from this one.
        let mut peer_digest_now = self.sb.peer_digest;
        let mut written: Vec<(u32, u8)> = Vec::new();
        if let Some(peer) = &mut self.peer {
            if self.sb.peer_since == 0 {
                self.sb.peer_since = seq;
            }
            for q in peer.map.take_dirty() {
                let old = peer.versions[q as usize];
                let s = old.map_or(0, |v| 1 - v.slot);
                let index = PEER_PAGE_BASE + q;
                let (bytes, crc) =
                    slot::encode(index, &self.sb.volume_id, seq, &peer.map.page_words(q));
                if let Some(v) = old {
                    peer_digest_now ^= slot::digest_share(index, v.seq, v.crc);
                }
                peer_digest_now ^= slot::digest_share(index, seq, crc);
                pages.push((slot::slot_offset(index, s), Box::new(bytes)));
                versions.push((index, PageVersion { slot: s, seq, crc }));
                written.push((q, s));
            }
        }
        // Orphans in the peer region are overwritten now: their number is this commit's.
        for &(q, s) in &self.peer_orphans {
            if !written.contains(&(q, s)) {
                let at = slot::slot_offset(PEER_PAGE_BASE + q, s);
                pages.push((at, Box::new([0u8; MAP_SLOT_BYTES])));
            }
        }
        self.sb_dirty = false;
        let mut sb = self.sb.clone();
        sb.sequence = seq;
        sb.map_digest = digest;
        sb.peer_digest = if self.peer.is_some() {
            peer_digest_now
        } else {
            0
        };
        let bytes = Box::new(sb.encode());
        let previous = (self.b_seq != self.sb.sequence).then(|| self.committed.clone());
        self.commit_in_flight = true;
        Some(Commit {
            seq,
            pages,
            superblock: bytes,
            previous,
            versions,
            sb,
        })
    }

    /// Installs a commit whose every step completed (step 5).
    pub fn commit_done(&mut self, c: Commit) {
        for (p, v) in c.versions {
            if p >= PEER_PAGE_BASE {
                // Only into the bitmap this commit wrote: one ended (or ended and started
                // again, numbered from a later commit) after it was planned keeps none.
                if let Some(peer) = &mut self.peer
                    && self.sb.peer_since == c.sb.peer_since
                {
                    peer.versions[(p - PEER_PAGE_BASE) as usize] = Some(v);
                }
                continue;
            }
            self.versions[p as usize] = Some(v);
        }
        if self.peer.is_some() && self.sb.peer_since == c.sb.peer_since {
            self.sb.peer_digest = c.sb.peer_digest;
        }
        self.peer_orphans.clear();
        // Fields changed in memory after planning (a later epoch or size) set `sb_dirty` again
        // and go with the next commit.
        self.sb.sequence = c.sb.sequence;
        self.sb.map_digest = c.sb.map_digest;
        self.committed = c.superblock;
        self.orphans.clear();
        self.b_seq = c.seq; // the driver wrote copy B last
        self.commit_in_flight = false;
    }
}

/// The peer bitmap's digest: as the map's (SPEC.md §6), over its pages' current versions.
fn peer_digest(versions: &[Option<PageVersion>]) -> u64 {
    versions
        .iter()
        .enumerate()
        .filter_map(|(q, v)| v.map(|v| slot::digest_share(PEER_PAGE_BASE + q as u32, v.seq, v.crc)))
        .fold(0, |a, b| a ^ b)
}

fn check_size(size: u64, backing: Option<&ImageRef>) -> Result<(), String> {
    if size == 0 || size > MAX_SIZE_BYTES {
        return Err(format!("size {size} out of range (4 KiB to 64 TiB)"));
    }
    if !size.is_multiple_of(BLOCK_BYTES) {
        return Err(format!("size {size} is not a multiple of 4 KiB"));
    }
    if let Some(b) = backing
        && size < b.size
    {
        return Err(format!(
            "size {size} is smaller than the backing image ({} bytes)",
            b.size
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(size: u64) -> Option<ImageRef> {
        Some(ImageRef {
            id: [1; 16],
            size,
            digest: [2; 32],
        })
    }

    #[test]
    fn pieces_split_at_states_and_the_image_end() {
        let (mut st, _) = VolumeState::create([3; 16], [4; 16], 64 << 10, img(10_000)).unwrap();
        st.mark_own(1, 1);
        let mut got = Vec::new();
        st.pieces(100, 20_000, |p| got.push((p.offset, p.len, p.source)));
        assert_eq!(
            got,
            vec![
                (100, 3996, Source::Image),
                (4096, 4096, Source::Data),
                (8192, 10_000 - 8192, Source::Image),
                (10_000, 20_100 - 10_000, Source::Zero),
            ]
        );
    }

    #[test]
    fn commits_alternate_slots_and_reload_matches() {
        let (mut st, sb0) = VolumeState::create([3; 16], [4; 16], 1 << 30, None).unwrap();
        let mut disk = std::collections::HashMap::new();
        let mut sbs = [sb0, [0; SUPERBLOCK_SLOT_BYTES]];
        for round in 0..3u64 {
            st.mark_own(round * 40_000, 5);
            st.mark_own(100 + round * 10, 1); // page 0 every round
            let c = st.plan_commit().unwrap();
            for (off, bytes) in &c.pages {
                disk.insert(*off, **bytes);
            }
            sbs = [*c.superblock, *c.superblock];
            st.commit_done(c);
            assert!(st.plan_commit().is_none());
        }
        let mut again = VolumeState::begin_load(&sbs[0], &sbs[1]).unwrap();
        for p in 0..again.map().pages() {
            let a = disk
                .get(&slot::slot_offset(p, 0))
                .copied()
                .unwrap_or([0; 4096]);
            let b = disk
                .get(&slot::slot_offset(p, 1))
                .copied()
                .unwrap_or([0; 4096]);
            again.load_page(p, [&a, &b]).unwrap();
        }
        let again = again.finish_load().unwrap();
        assert_eq!(again.map().own_blocks(), 18);
        assert_eq!(again.superblock().sequence, 4);
        // Page 0 was written twice: once per slot.
        assert!(disk.contains_key(&slot::slot_offset(0, 0)));
        assert!(disk.contains_key(&slot::slot_offset(0, 1)));
    }

    /// A grow whose commit never completed leaves map slots past the old end: reopening at the
    /// old size works, and the next commit zeroes them before its number could validate them.
    #[test]
    fn slots_of_an_uncommitted_grow_are_cleared_by_the_next_commit() {
        let (mut st, sb0) = VolumeState::create([3; 16], [4; 16], 4 << 20, None).unwrap();
        st.grow(400 << 20).unwrap();
        st.mark_own(BLOCKS_PER_MAP_PAGE * 2 + 5, 1);
        let c = st.plan_commit().unwrap();
        let mut disk = std::collections::HashMap::new();
        for (off, bytes) in &c.pages {
            disk.insert(*off, **bytes); // the pages made it, the superblock did not
        }
        let load = |disk: &std::collections::HashMap<u64, [u8; 4096]>, a, b| {
            let mut st = VolumeState::begin_load(a, b).unwrap();
            for p in 0..4u32 {
                let get = |s| {
                    disk.get(&slot::slot_offset(p, s))
                        .copied()
                        .unwrap_or([0; 4096])
                };
                st.load_page(p, [&get(0), &get(1)]).unwrap();
            }
            st.finish_load().unwrap()
        };
        let mut again = load(&disk, &sb0, &sb0);
        assert_eq!(again.size(), 4 << 20);
        let c = again.plan_commit().expect("the orphan must be cleared");
        assert!(
            c.pages
                .iter()
                .any(|(off, b)| *off == slot::slot_offset(2, 0) && b.iter().all(|&x| x == 0))
        );
        for (off, bytes) in &c.pages {
            disk.insert(*off, **bytes);
        }
        let sb = *c.superblock;
        again.commit_done(c);
        assert!(again.plan_commit().is_none());
        // Now the committed number has passed the orphan's: it is gone, so this still loads.
        let reloaded = load(&disk, &sb, &sb);
        assert_eq!(reloaded.map().own_blocks(), 0);
    }

    #[test]
    fn sizes_are_checked() {
        assert!(VolumeState::create([3; 16], [4; 16], 0, None).is_err());
        assert!(VolumeState::create([3; 16], [4; 16], 4097, None).is_err());
        assert!(VolumeState::create([3; 16], [4; 16], 4096, img(8192)).is_err());
        let (mut st, _) = VolumeState::create([3; 16], [4; 16], 8192, img(5000)).unwrap();
        assert!(st.grow(4096).is_err());
        st.grow(1 << 40).unwrap();
        assert_eq!(st.map().blocks(), (1 << 40) / 4096);
    }
}
