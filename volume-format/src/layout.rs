//! Sizes and offsets of the on-disk layout (SPEC.md §5). Derived from one another and pinned.

/// Copy-on-write granularity: one block-map bit per block.
pub const BLOCK_BYTES: u64 = 4096;
/// Each superblock copy occupies one 4 KiB slot: A at 0, B at 4 KiB.
pub const SUPERBLOCK_SLOT_BYTES: usize = 4096;
pub const SUPERBLOCK_A_OFFSET: u64 = 0;
pub const SUPERBLOCK_B_OFFSET: u64 = SUPERBLOCK_SLOT_BYTES as u64;
/// The journal ring starts right after the two superblocks.
pub const JOURNAL_OFFSET: u64 = 2 * SUPERBLOCK_SLOT_BYTES as u64;
pub const DEFAULT_JOURNAL_BYTES: u64 = 4 << 20;
/// A map page holds the bits of this many blocks.
pub const MAP_PAGE_BYTES: usize = 4096;
pub const BLOCKS_PER_MAP_PAGE: u64 = MAP_PAGE_BYTES as u64 * 8;
/// Volume bytes one map page describes (128 MiB).
pub const BYTES_PER_MAP_PAGE: u64 = BLOCKS_PER_MAP_PAGE * BLOCK_BYTES;
/// 64-bit words in a map page.
pub const MAP_PAGE_WORDS: usize = MAP_PAGE_BYTES / 8;

pub const MAGIC: [u8; 8] = *b"STRMVOL1";
pub const FORMAT_VERSION: u32 = 1;

/// Incompatible feature flags known to this version (none yet; see SPEC.md §5).
pub const INCOMPAT_KNOWN: u64 = 0;
/// Reserved: a persistent per-peer dirty bitmap for resync (incompatible when set).
pub const INCOMPAT_PEER_DIRTY_BITMAP: u64 = 1 << 0;
/// Read-only-compatible flags known to this version.
pub const RO_COMPAT_KNOWN: u64 = 0;

const _: () = assert!(BLOCKS_PER_MAP_PAGE == 32768);
const _: () = assert!(BYTES_PER_MAP_PAGE == 128 << 20);
const _: () = assert!(JOURNAL_OFFSET == 8192);
const _: () = assert!(MAP_PAGE_WORDS * 64 == BLOCKS_PER_MAP_PAGE as usize);
const _: () = assert!(
    INCOMPAT_KNOWN & INCOMPAT_PEER_DIRTY_BITMAP == 0,
    "reserved, not yet known"
);
