//! Sizes and offsets of the on-disk layout (SPEC.md §5). Derived from one another and pinned by
//! compile-time asserts, so the code and the spec cannot drift apart silently.

/// Copy-on-write granularity: one block-map bit per block.
pub const BLOCK_BYTES: u64 = 4096;

// ---- volume metadata file (`V.meta`) ----

/// Each superblock copy occupies one 4 KiB slot: A at 0, B at 4 KiB.
pub const SUPERBLOCK_SLOT_BYTES: usize = 4096;
pub const SUPERBLOCK_A_OFFSET: u64 = 0;
pub const SUPERBLOCK_B_OFFSET: u64 = SUPERBLOCK_SLOT_BYTES as u64;
/// Map page slots start right after the two superblocks: page `p`, slot `s` (0 or 1) lives at
/// `MAP_OFFSET + (2p + s) * MAP_SLOT_BYTES`.
pub const MAP_OFFSET: u64 = 2 * SUPERBLOCK_SLOT_BYTES as u64;
/// One on-disk map page slot: a 64-byte header and the bits.
pub const MAP_SLOT_BYTES: usize = 4096;
pub const MAP_HEADER_BYTES: usize = 64;
/// Bytes of bits in a page, and the 64-bit words they make.
pub const MAP_BITS_BYTES: usize = MAP_SLOT_BYTES - MAP_HEADER_BYTES;
pub const MAP_PAGE_WORDS: usize = MAP_BITS_BYTES / 8;
/// A map page holds the bits of this many blocks (32256: 126 MiB of volume).
pub const BLOCKS_PER_MAP_PAGE: u64 = MAP_BITS_BYTES as u64 * 8;
pub const BYTES_PER_MAP_PAGE: u64 = BLOCKS_PER_MAP_PAGE * BLOCK_BYTES;

/// The metadata file's size once every map page of a `size_bytes` volume has both slots
/// written: what a pool reserves up front so a commit never runs out of space.
pub const fn meta_file_bytes(size_bytes: u64) -> u64 {
    let blocks = size_bytes.div_ceil(BLOCK_BYTES);
    let pages = blocks.div_ceil(BLOCKS_PER_MAP_PAGE);
    MAP_OFFSET + pages * 2 * MAP_SLOT_BYTES as u64
}

pub const MAGIC: [u8; 8] = *b"STRMVOL1";
pub const MAP_MAGIC: [u8; 8] = *b"STRMMAP1";
pub const FORMAT_VERSION: u32 = 1;

/// Incompatible feature flags known to this version (SPEC.md §5, §10).
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_PEER_DIRTY_BITMAP | INCOMPAT_GENERATION_HISTORY;
/// The volume holds a peer dirty bitmap (SPEC.md §10): the blocks written since the pair's
/// other replica last had them. A build that does not know it must not write the volume (its
/// writes would not be recorded), so the bit is incompatible.
pub const INCOMPAT_PEER_DIRTY_BITMAP: u64 = 1 << 0;
/// The superblock holds generation history (SPEC.md §10): the generations a pair replica had
/// before its current one, which decide on reconnect whether two replicas share a past. A
/// build that does not know it would drop the history on its next commit, so incompatible.
pub const INCOMPAT_GENERATION_HISTORY: u64 = 1 << 1;
/// Generations kept in the history.
pub const GENERATION_HISTORY: usize = 2;
/// The peer dirty bitmap's pages are numbered from here (their slots sit at
/// `slot_offset(PEER_PAGE_BASE + q, s)`, far past any block map page: a 64 TiB volume has
/// 532,611 map pages). The metadata file is sparse, so the gap costs nothing.
pub const PEER_PAGE_BASE: u32 = 1 << 20;
/// Where the peer dirty bitmap's slots begin in the metadata file.
pub const PEER_OFFSET: u64 = MAP_OFFSET + 2 * PEER_PAGE_BASE as u64 * MAP_SLOT_BYTES as u64;
/// Read-only-compatible flags known to this version.
pub const RO_COMPAT_KNOWN: u64 = 0;

/// Superblock `flags`: a new epoch began and the next write must first rotate the generation.
pub const FLAG_GENERATION_ARMED: u64 = 1 << 0;
pub const FLAGS_KNOWN: u64 = FLAG_GENERATION_ARMED;

// ---- golden image metadata file (`I.meta`) ----

pub const IMAGE_MAGIC: [u8; 8] = *b"STRMIMG1";
/// The image header; the chunk checksum table follows it.
pub const IMAGE_HEADER_BYTES: usize = 128;
/// Checksum granularity of a golden image (1 MiB chunks, one crc32c each).
pub const IMAGE_CHUNK_SHIFT: u32 = 20;
pub const IMAGE_CHUNK_BYTES: u64 = 1 << IMAGE_CHUNK_SHIFT;

const _: () = assert!(BLOCKS_PER_MAP_PAGE == 32256);
const _: () = assert!(BYTES_PER_MAP_PAGE == 126 << 20);
const _: () = assert!(MAP_OFFSET == 8192);
const _: () = assert!(MAP_BITS_BYTES.is_multiple_of(8));
const _: () = assert!(MAP_PAGE_WORDS * 64 == BLOCKS_PER_MAP_PAGE as usize);
const _: () = assert!(
    MAP_SLOT_BYTES as u64 == BLOCK_BYTES,
    "one slot, one atomic page"
);
// The peer bitmap's page numbers start past the last map page of the largest volume.
const _: () = assert!(
    ((1u64 << 46) / BLOCK_BYTES).div_ceil(BLOCKS_PER_MAP_PAGE) < PEER_PAGE_BASE as u64,
    "peer bitmap pages must not collide with map pages"
);
const _: () = assert!(IMAGE_CHUNK_BYTES.is_multiple_of(BLOCK_BYTES));
