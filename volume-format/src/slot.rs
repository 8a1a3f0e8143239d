//! On-disk map page slots (SPEC.md §5): each map page has two 4 KiB slots; a commit writes the
//! slot not holding the page's current version, so a torn write always leaves the current one.
//! A slot carries its page index, the volume id (a misdirected write is caught) and the commit
//! number that wrote it; a crc32c covers all of it.

use crate::error::FormatError;
use crate::layout::*;
use crate::map::Page;

mod at {
    pub const MAGIC: usize = 0;
    pub const PAGE: usize = 8;
    pub const VOLUME_ID: usize = 16;
    pub const SEQ: usize = 32;
    pub const CRC: usize = 56;
    pub const BITS: usize = super::MAP_HEADER_BYTES;
}
const _: () = assert!(at::CRC + 4 <= at::BITS);

/// Byte offset of page `p`'s slot `s` in the metadata file.
pub fn slot_offset(p: u32, s: u8) -> u64 {
    debug_assert!(s < 2);
    MAP_OFFSET + (2 * u64::from(p) + u64::from(s)) * MAP_SLOT_BYTES as u64
}

/// One decoded, checked slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The commit number that wrote it.
    pub seq: u64,
    /// Its checksum: part of the map digest.
    pub crc: u32,
    pub words: Box<Page>,
}

fn crc_of(b: &[u8; MAP_SLOT_BYTES]) -> u32 {
    let mut h = crc32c::crc32c(&b[..at::CRC]);
    h = crc32c::crc32c_append(h, &[0; 4]);
    crc32c::crc32c_append(h, &b[at::CRC + 4..])
}

/// Encodes page `p`'s words as written by commit `seq`. Returns the bytes and their crc.
pub fn encode(p: u32, volume_id: &[u8; 16], seq: u64, words: &Page) -> ([u8; MAP_SLOT_BYTES], u32) {
    let mut b = [0u8; MAP_SLOT_BYTES];
    b[at::MAGIC..at::MAGIC + 8].copy_from_slice(&MAP_MAGIC);
    b[at::PAGE..at::PAGE + 8].copy_from_slice(&u64::from(p).to_le_bytes());
    b[at::VOLUME_ID..at::VOLUME_ID + 16].copy_from_slice(volume_id);
    b[at::SEQ..at::SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    for (chunk, w) in b[at::BITS..].chunks_exact_mut(8).zip(words.iter()) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    let crc = crc_of(&b);
    b[at::CRC..at::CRC + 4].copy_from_slice(&crc.to_le_bytes());
    (b, crc)
}

/// Recomputes the checksum of raw slot bytes (tests and fuzzing forge valid-looking slots).
pub fn reseal(b: &mut [u8; MAP_SLOT_BYTES]) {
    let crc = crc_of(b);
    b[at::CRC..at::CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes slot `s` of page `p`. `Ok(None)`: the slot was never written (all zero).
pub fn decode(
    b: &[u8; MAP_SLOT_BYTES],
    p: u32,
    s: u8,
    volume_id: &[u8; 16],
) -> Result<Option<Slot>, FormatError> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let what = || format!("map page {p} slot {s}");
    if b[at::MAGIC..at::MAGIC + 8] != MAP_MAGIC {
        return Err(FormatError::BadMagic(what()));
    }
    let stored = u32::from_le_bytes(b[at::CRC..at::CRC + 4].try_into().expect("4 bytes"));
    let computed = crc_of(b);
    if stored != computed {
        return Err(FormatError::BadChecksum {
            what: what(),
            stored,
            computed,
        });
    }
    let page = u64::from_le_bytes(b[at::PAGE..at::PAGE + 8].try_into().expect("8 bytes"));
    if page != u64::from(p) {
        return Err(FormatError::invariant(what(), format!("holds page {page}")));
    }
    if b[at::VOLUME_ID..at::VOLUME_ID + 16] != volume_id[..] {
        return Err(FormatError::invariant(what(), "belongs to another volume"));
    }
    if b[at::SEQ + 8..at::CRC]
        .iter()
        .chain(&b[at::CRC + 4..at::BITS])
        .any(|&x| x != 0)
    {
        return Err(FormatError::invariant(
            what(),
            "reserved bytes are not zero",
        ));
    }
    let seq = u64::from_le_bytes(b[at::SEQ..at::SEQ + 8].try_into().expect("8 bytes"));
    if seq == 0 {
        return Err(FormatError::invariant(what(), "commit number zero"));
    }
    let mut words = Box::new([0u64; MAP_PAGE_WORDS]);
    for (w, chunk) in words.iter_mut().zip(b[at::BITS..].chunks_exact(8)) {
        *w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    }
    Ok(Some(Slot {
        seq,
        crc: computed,
        words,
    }))
}

/// One page version's share of the map digest. The digest is the XOR of the shares of every
/// page's current version, so a commit updates it in O(pages it writes).
pub fn digest_share(p: u32, seq: u64, crc: u32) -> u64 {
    // splitmix64 finaliser over the three fields: a good avalanche, no dependency.
    let mut z = u64::from(p)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(seq.rotate_left(32))
        ^ u64::from(crc).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words() -> Box<Page> {
        let mut w = Box::new([0u64; MAP_PAGE_WORDS]);
        w[0] = 0xdead_beef;
        w[MAP_PAGE_WORDS - 1] = 1 << 63;
        w
    }

    #[test]
    fn round_trips_and_an_empty_slot_is_none() {
        let (b, crc) = encode(3, &[5; 16], 9, &words());
        let s = decode(&b, 3, 1, &[5; 16]).unwrap().unwrap();
        assert_eq!((s.seq, s.crc, s.words), (9, crc, words()));
        assert_eq!(decode(&[0; MAP_SLOT_BYTES], 3, 0, &[5; 16]), Ok(None));
    }

    #[test]
    fn every_flipped_byte_and_every_misplacement_is_detected() {
        let (b, _) = encode(3, &[5; 16], 9, &words());
        for i in (0..MAP_SLOT_BYTES).step_by(5) {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(decode(&c, 3, 0, &[5; 16]).is_err(), "flip at {i}");
        }
        assert!(decode(&b, 4, 0, &[5; 16]).is_err(), "another page's slot");
        assert!(decode(&b, 3, 0, &[6; 16]).is_err(), "another volume's slot");
        let mut torn = b;
        torn[2048..].fill(0);
        assert!(decode(&torn, 3, 0, &[5; 16]).is_err(), "torn");
    }

    #[test]
    fn shares_differ_by_page_seq_and_content() {
        let a = digest_share(1, 1, 7);
        assert_ne!(a, digest_share(2, 1, 7));
        assert_ne!(a, digest_share(1, 2, 7));
        assert_ne!(a, digest_share(1, 1, 8));
    }
}
