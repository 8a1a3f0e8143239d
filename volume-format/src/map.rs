//! The block map (SPEC.md §3, §5): one bit per 4 KiB block, INHERITED (0) or OWN (1), kept in
//! pages of 32256 bits that exist in memory only when some bit in them is set. A fresh clone of a 1 TiB
//! image costs one pointer per 128 MiB; a lookup is an index, a word and a bit.
//!
//! A clean page (its bits committed, unchanged since) may be *evicted*: its memory is let go
//! and the committed copy on disk is the only one, until the driver reads it back
//! (`VolumeState::reload_page`). Every use of a page's bits requires it resident and asserts so:
//! an evicted page is never taken for an empty one.

use crate::error::FormatError;
use crate::layout::*;

/// Where a block's contents come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// The backing image at the same offset (zeroes past its end, or for a blank volume).
    Inherited,
    /// The volume's own data file at the same offset (a hole there reads as zeroes).
    Own,
}

/// The bits of one map page.
pub type Page = [u64; MAP_PAGE_WORDS];

/// What the map knows of one page.
enum View<'a> {
    /// No OWN bit, and none on disk that is not also in memory: every block INHERITED.
    Empty,
    Resident(&'a Page),
    /// Committed on disk and not in memory.
    Evicted,
}

pub struct BlockMap {
    blocks: u64,
    /// Resident pages; `None` is an empty page, or an evicted one (`evicted`). Kept apart so a
    /// page costs one pointer (a fresh clone of 1 TiB: 8 KiB of table).
    pages: Vec<Option<Box<Page>>>,
    evicted: Vec<bool>,
    /// OWN bits in all pages, resident or evicted.
    own: u64,
    /// OWN bits of each evicted page (they count in `own` while the page is away).
    evicted_own: std::collections::HashMap<u32, u64>,
    /// Pages held in memory.
    resident: usize,
    /// Pages changed since the last `take_dirty`, in the order first changed.
    dirty: Vec<u32>,
    is_dirty: Vec<bool>,
}

impl BlockMap {
    /// A map of `blocks` blocks, all INHERITED.
    pub fn new(blocks: u64) -> BlockMap {
        let pages = blocks.div_ceil(BLOCKS_PER_MAP_PAGE) as usize;
        BlockMap {
            blocks,
            pages: (0..pages).map(|_| None).collect(),
            evicted: vec![false; pages],
            own: 0,
            evicted_own: std::collections::HashMap::new(),
            resident: 0,
            dirty: Vec::new(),
            is_dirty: vec![false; pages],
        }
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn pages(&self) -> u32 {
        self.pages.len() as u32
    }

    pub fn get(&self, block: u64) -> BlockState {
        assert!(
            block < self.blocks,
            "block {block} beyond the map of {}",
            self.blocks
        );
        let (p, w, bit) = split(block);
        match self.view(p) {
            View::Resident(page) if page[w] >> bit & 1 == 1 => BlockState::Own,
            View::Resident(_) | View::Empty => BlockState::Inherited,
            View::Evicted => panic!("map page {p} is evicted: read it back before use"),
        }
    }

    fn view(&self, p: usize) -> View<'_> {
        match &self.pages[p] {
            Some(page) => View::Resident(page),
            None if self.evicted[p] => View::Evicted,
            None => View::Empty,
        }
    }

    /// Whether page `p` must be read back before its bits are used.
    pub fn is_evicted(&self, p: u32) -> bool {
        self.evicted[p as usize]
    }

    /// Whether page `p` is held in memory.
    pub fn is_resident(&self, p: u32) -> bool {
        self.pages[p as usize].is_some()
    }

    /// Whether page `p` changed since the last `take_dirty`.
    pub fn is_dirty(&self, p: u32) -> bool {
        self.is_dirty[p as usize]
    }

    /// Lets go of a clean resident page's memory; the caller knows its bits are committed on
    /// disk and reads them back (`load_page`) before the page is used again.
    pub fn evict(&mut self, p: u32) {
        assert!(
            !self.is_dirty[p as usize],
            "map page {p} is dirty: it cannot be evicted"
        );
        let Some(page) = self.pages[p as usize].take() else {
            panic!("map page {p} is not resident");
        };
        let bits = page.iter().map(|w| u64::from(w.count_ones())).sum();
        self.evicted_own.insert(p, bits);
        self.evicted[p as usize] = true;
        self.resident -= 1;
    }

    /// Sets `count` blocks from `first` to `state`, marking the pages it changes dirty.
    pub fn set(&mut self, first: u64, count: u64, state: BlockState) {
        let end = first.checked_add(count).expect("range overflow");
        assert!(
            end <= self.blocks,
            "range {first}+{count} beyond the map of {}",
            self.blocks
        );
        let mut b = first;
        while b < end {
            let (p, w, bit) = split(b);
            // Bits of this word covered by the range.
            let n = (64 - bit as u64).min(end - b);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            assert!(
                !self.evicted[p],
                "map page {p} is evicted: read it back before use"
            );
            if self.pages[p].is_none() && state == BlockState::Own {
                self.pages[p] = Some(Box::new([0; MAP_PAGE_WORDS]));
                self.resident += 1;
            }
            let changed = match (state, &mut self.pages[p]) {
                (BlockState::Inherited, None) => false,
                (BlockState::Own, None) => unreachable!("made resident above"),
                (BlockState::Inherited, Some(page)) => {
                    let old = page[w];
                    page[w] &= !mask;
                    self.own -= u64::from((old & !page[w]).count_ones());
                    old != page[w]
                }
                (BlockState::Own, Some(page)) => {
                    let old = page[w];
                    page[w] |= mask;
                    self.own += u64::from((page[w] & !old).count_ones());
                    old != page[w]
                }
            };
            if changed && !self.is_dirty[p] {
                self.is_dirty[p] = true;
                self.dirty.push(p as u32);
            }
            b += n;
        }
    }

    /// Maximal runs of equal state covering `[first, first+count)`: `(start, len, state)`.
    pub fn runs(&self, first: u64, count: u64) -> Runs<'_> {
        let end = first.checked_add(count).expect("range overflow");
        assert!(
            end <= self.blocks,
            "range {first}+{count} beyond the map of {}",
            self.blocks
        );
        Runs {
            map: self,
            pos: first,
            end,
        }
    }

    /// Number of OWN blocks (evicted pages included).
    pub fn own_blocks(&self) -> u64 {
        self.own
    }

    /// Pages changed since the last `take_dirty`.
    pub fn dirty_pages(&self) -> usize {
        self.dirty.len()
    }

    /// Whether any page changed since the last `take_dirty`.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Marks page `p` for the next commit although no bit changed (to overwrite a stale slot).
    pub fn mark_dirty(&mut self, p: u32) {
        if !self.is_dirty[p as usize] {
            self.is_dirty[p as usize] = true;
            self.dirty.push(p);
        }
    }

    /// Pages changed since the last call, for the next commit.
    pub fn take_dirty(&mut self) -> Vec<u32> {
        for &p in &self.dirty {
            self.is_dirty[p as usize] = false;
        }
        std::mem::take(&mut self.dirty)
    }

    /// The bits of page `p` as on disk (`MAP_PAGE_WORDS` little-endian words; bit `i` of the
    /// page is block `p * BLOCKS_PER_MAP_PAGE + i`).
    pub fn page_words(&self, p: u32) -> Page {
        match self.view(p as usize) {
            View::Resident(page) => *page,
            View::Empty => [0; MAP_PAGE_WORDS],
            View::Evicted => panic!("map page {p} is evicted: read it back before use"),
        }
    }

    /// Installs page `p` from checked on-disk words. Bits for blocks past the end of the volume
    /// must be zero: a set one means the page belongs to something else.
    pub fn load_page(&mut self, p: u32, page: &Page) -> Result<(), FormatError> {
        let what = || format!("map page {p}");
        let idx = p as usize;
        if idx >= self.pages.len() {
            return Err(FormatError::invariant(
                what(),
                "beyond the end of the volume",
            ));
        }
        let first = u64::from(p) * BLOCKS_PER_MAP_PAGE;
        let valid = (self.blocks - first).min(BLOCKS_PER_MAP_PAGE);
        for (i, w) in page.iter().enumerate() {
            let base = i as u64 * 64;
            let allowed = if base >= valid {
                0
            } else if valid - base >= 64 {
                u64::MAX
            } else {
                (1u64 << (valid - base)) - 1
            };
            if w & !allowed != 0 {
                return Err(FormatError::invariant(
                    what(),
                    "bits set past the end of the volume",
                ));
            }
        }
        let bits: u64 = page.iter().map(|w| u64::from(w.count_ones())).sum();
        if let Some(old) = self.pages[idx].take() {
            self.own -= old.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
            self.resident -= 1;
        }
        if std::mem::replace(&mut self.evicted[idx], false) {
            self.own -= self.evicted_own.remove(&p).unwrap_or(0);
        }
        self.own += bits;
        if bits > 0 {
            self.pages[idx] = Some(Box::new(*page));
            self.resident += 1;
        }
        Ok(())
    }

    /// Grows the map to `blocks` (a volume resize); new blocks are INHERITED.
    pub fn grow(&mut self, blocks: u64) {
        assert!(blocks >= self.blocks, "maps only grow");
        let pages = blocks.div_ceil(BLOCKS_PER_MAP_PAGE) as usize;
        self.pages.resize_with(pages, || None);
        self.evicted.resize(pages, false);
        self.is_dirty.resize(pages, false);
        self.blocks = blocks;
    }

    /// Pages held in memory.
    pub fn resident_pages(&self) -> usize {
        self.resident
    }

    /// Bytes of memory the map holds (page table plus resident pages).
    pub fn resident_bytes(&self) -> usize {
        self.pages.len() * std::mem::size_of::<Option<Box<Page>>>()
            + self.evicted.len()
            + self.is_dirty.len()
            + self.evicted_own.len() * 2 * std::mem::size_of::<u64>()
            + self.resident * std::mem::size_of::<Page>()
    }
}

fn split(block: u64) -> (usize, usize, u32) {
    let p = (block / BLOCKS_PER_MAP_PAGE) as usize;
    let in_page = block % BLOCKS_PER_MAP_PAGE;
    (p, (in_page / 64) as usize, (in_page % 64) as u32)
}

/// Iterator over runs of equal state; skips absent pages and uniform words whole.
pub struct Runs<'a> {
    map: &'a BlockMap,
    pos: u64,
    end: u64,
}

impl Runs<'_> {
    /// Length of the run of `state` starting at `pos`, up to `end`.
    fn run_len(&self, pos: u64, state: BlockState) -> u64 {
        let mut b = pos;
        while b < self.end {
            let (p, w, bit) = split(b);
            let page = match self.map.view(p) {
                View::Resident(page) => page,
                View::Empty => {
                    if state == BlockState::Own {
                        break;
                    }
                    b = ((p as u64) + 1) * BLOCKS_PER_MAP_PAGE; // a whole empty page is INHERITED
                    continue;
                }
                View::Evicted => panic!("map page {p} is evicted: read it back before use"),
            };
            let word = if state == BlockState::Own {
                !page[w]
            } else {
                page[w]
            };
            // First bit at or after `bit` that differs from `state`.
            let rest = word >> bit;
            if rest == 0 {
                b += 64 - u64::from(bit);
                continue;
            }
            b += u64::from(rest.trailing_zeros());
            break;
        }
        b.min(self.end) - pos
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64, BlockState);
    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let state = self.map.get(self.pos);
        let len = self.run_len(self.pos, state);
        debug_assert!(len > 0);
        let start = self.pos;
        self.pos += len;
        Some((start, len, state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator (no dependency needed for a test).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn matches_a_plain_model_under_random_updates() {
        let blocks = 3 * BLOCKS_PER_MAP_PAGE + 777; // a partial last page
        let mut map = BlockMap::new(blocks);
        let mut model = vec![false; blocks as usize];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..2000 {
            let first = rng.below(blocks);
            let max = (blocks - first).min(if round % 10 == 0 { 100_000 } else { 300 });
            let count = 1 + rng.below(max);
            let own = rng.below(3) != 0;
            map.set(
                first,
                count,
                if own {
                    BlockState::Own
                } else {
                    BlockState::Inherited
                },
            );
            model[first as usize..(first + count) as usize].fill(own);
            // Spot checks and runs over a random window.
            let a = rng.below(blocks);
            let n = 1 + rng.below((blocks - a).min(70_000));
            let mut pos = a;
            for (start, len, state) in map.runs(a, n) {
                assert_eq!(start, pos, "runs are contiguous");
                assert!(len > 0);
                for b in start..start + len {
                    assert_eq!(model[b as usize], state == BlockState::Own, "block {b}");
                }
                // Maximal: the next block (if inside the window) differs.
                if start + len < a + n {
                    assert_ne!(model[(start + len) as usize], state == BlockState::Own);
                }
                pos = start + len;
            }
            assert_eq!(pos, a + n);
        }
        assert_eq!(
            map.own_blocks(),
            model.iter().filter(|&&o| o).count() as u64
        );
    }

    #[test]
    fn pages_round_trip_and_only_changed_pages_are_dirty() {
        let blocks = 2 * BLOCKS_PER_MAP_PAGE + 10;
        let mut map = BlockMap::new(blocks);
        assert!(map.take_dirty().is_empty());
        map.set(5, 3, BlockState::Own);
        map.set(BLOCKS_PER_MAP_PAGE * 2 + 9, 1, BlockState::Own);
        map.set(100, 1, BlockState::Inherited); // no change: not dirty
        assert_eq!(map.take_dirty(), vec![0, 2]);
        assert!(map.take_dirty().is_empty());
        let mut copy = BlockMap::new(blocks);
        for p in 0..map.pages() {
            copy.load_page(p, &map.page_words(p)).unwrap();
        }
        assert_eq!(
            copy.runs(0, blocks).collect::<Vec<_>>(),
            map.runs(0, blocks).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bits_past_the_end_are_refused() {
        let mut map = BlockMap::new(BLOCKS_PER_MAP_PAGE + 10);
        let mut words = [0u64; MAP_PAGE_WORDS];
        words[0] = 1 << 10; // block 10 of page 1: one past the end
        assert!(map.load_page(1, &words).is_err());
        words[0] = 0xff; // blocks 0..8 of page 1: fine
        map.load_page(1, &words).unwrap();
        assert_eq!(map.own_blocks(), 8);
        assert!(map.load_page(2, &words).is_err(), "page beyond the volume");
    }

    #[test]
    fn evicted_pages_keep_their_count_and_come_back_whole() {
        let blocks = 3 * BLOCKS_PER_MAP_PAGE;
        let mut map = BlockMap::new(blocks);
        map.set(10, 100, BlockState::Own);
        map.set(BLOCKS_PER_MAP_PAGE + 5, 7, BlockState::Own);
        map.take_dirty();
        let saved = map.page_words(0);
        map.evict(0);
        assert!(map.is_evicted(0) && !map.is_resident(0));
        assert_eq!((map.own_blocks(), map.resident_pages()), (107, 1));
        assert_eq!(
            map.get(BLOCKS_PER_MAP_PAGE + 5),
            BlockState::Own,
            "other pages serve"
        );
        map.load_page(0, &saved).unwrap();
        assert_eq!((map.own_blocks(), map.resident_pages()), (107, 2));
        assert_eq!(map.runs(0, 200).count(), 3);
        assert!(map.take_dirty().is_empty(), "a page read back is clean");
    }

    #[test]
    #[should_panic(expected = "evicted")]
    fn an_evicted_page_is_never_read_as_empty() {
        let mut map = BlockMap::new(BLOCKS_PER_MAP_PAGE);
        map.set(1, 1, BlockState::Own);
        map.take_dirty();
        map.evict(0);
        map.get(0);
    }

    #[test]
    fn a_fresh_map_of_a_terabyte_is_small() {
        let map = BlockMap::new((1u64 << 40) / 4096);
        assert!(
            map.resident_bytes() < 128 * 1024,
            "{} bytes",
            map.resident_bytes()
        );
        assert_eq!(map.runs(0, map.blocks()).count(), 1);
    }
}
