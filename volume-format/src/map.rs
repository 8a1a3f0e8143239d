//! The block map (SPEC.md §3, §5): one bit per 4 KiB block, INHERITED (0) or OWN (1), kept in
//! pages of 32256 bits that exist in memory only when some bit in them is set. A fresh clone of a 1 TiB
//! image costs one pointer per 128 MiB; a lookup is an index, a word and a bit.

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

pub struct BlockMap {
    blocks: u64,
    pages: Vec<Option<Box<Page>>>,
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
        match &self.pages[p] {
            Some(page) if page[w] >> bit & 1 == 1 => BlockState::Own,
            _ => BlockState::Inherited,
        }
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
            let changed = match (state, &mut self.pages[p]) {
                (BlockState::Inherited, None) => false,
                (BlockState::Inherited, Some(page)) => {
                    let old = page[w];
                    page[w] &= !mask;
                    old != page[w]
                }
                (BlockState::Own, slot) => {
                    let page = slot.get_or_insert_with(|| Box::new([0; MAP_PAGE_WORDS]));
                    let old = page[w];
                    page[w] |= mask;
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

    /// Number of OWN blocks.
    pub fn own_blocks(&self) -> u64 {
        self.pages
            .iter()
            .flatten()
            .map(|p| p.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
            .sum()
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
        match &self.pages[p as usize] {
            Some(page) => **page,
            None => [0; MAP_PAGE_WORDS],
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
        self.pages[idx] = page.iter().any(|&w| w != 0).then(|| Box::new(*page));
        Ok(())
    }

    /// Grows the map to `blocks` (a volume resize); new blocks are INHERITED.
    pub fn grow(&mut self, blocks: u64) {
        assert!(blocks >= self.blocks, "maps only grow");
        let pages = blocks.div_ceil(BLOCKS_PER_MAP_PAGE) as usize;
        self.pages.resize_with(pages, || None);
        self.is_dirty.resize(pages, false);
        self.blocks = blocks;
    }

    /// Pages that hold at least one OWN block.
    pub fn resident_pages(&self) -> usize {
        self.pages.iter().flatten().count()
    }

    /// Bytes of memory the map holds (page table plus resident pages).
    pub fn resident_bytes(&self) -> usize {
        let resident = self.pages.iter().flatten().count();
        self.pages.len() * std::mem::size_of::<Option<Box<Page>>>()
            + self.is_dirty.len()
            + resident * std::mem::size_of::<Page>()
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
            let Some(page) = &self.map.pages[p] else {
                if state == BlockState::Own {
                    break;
                }
                b = ((p as u64) + 1) * BLOCKS_PER_MAP_PAGE; // a whole absent page is INHERITED
                continue;
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
