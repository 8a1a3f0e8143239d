//! The volume superblock (SPEC.md §5): encode, decode with every check, and the choice between
//! the two copies.

use crate::error::FormatError;
use crate::layout::*;

/// Where each field lives in the 4 KiB slot (little-endian).
mod at {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const INCOMPAT: usize = 16;
    pub const RO_COMPAT: usize = 24;
    pub const COMPAT: usize = 32;
    pub const VOLUME_ID: usize = 40;
    pub const GENERATION: usize = 56;
    pub const EPOCH: usize = 72;
    pub const SIZE: usize = 80;
    pub const BACKING_ID: usize = 88;
    pub const BACKING_DIGEST: usize = 104;
    pub const BACKING_SIZE: usize = 136;
    pub const MAP_OFFSET: usize = 144;
    pub const MAP_DIGEST: usize = 152;
    pub const SEQUENCE: usize = 160;
    pub const FLAGS: usize = 168;
    pub const NEXT_GENERATION: usize = 176;
    pub const PEER_SINCE: usize = 192;
    pub const PEER_DIGEST: usize = 200;
    pub const PEER_GENERATION: usize = 208;
    pub const HISTORY: usize = 224;
    /// First byte after the fields; the rest of the slot is zero up to the checksum.
    pub const END: usize = 256;
    pub const CRC: usize = super::SUPERBLOCK_SLOT_BYTES - 4;
}

const _: () = assert!(at::END <= at::CRC);

/// Largest virtual size accepted (64 TiB). The in-memory page table is dense over page indices
/// (9 bytes per 126 MiB), so this bound also bounds what opening a volume can allocate (4.7 MiB),
/// whatever a damaged or hostile superblock claims.
pub const MAX_SIZE_BYTES: u64 = 1 << 46;

/// A decoded, checked superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub incompat: u64,
    pub ro_compat: u64,
    pub compat: u64,
    pub volume_id: [u8; 16],
    /// Changes on the first write after a new epoch begins (replication).
    pub generation: [u8; 16],
    pub epoch: u64,
    pub size_bytes: u64,
    /// All zero for a blank volume.
    pub backing_id: [u8; 16],
    pub backing_digest: [u8; 32],
    pub backing_size_bytes: u64,
    pub map_offset: u64,
    /// Digest of the committed map: which version of which page is current (SPEC.md §6).
    pub map_digest: u64,
    /// Commit number: of two valid copies, the higher one is current. Map page versions carry the
    /// commit number that wrote them.
    pub sequence: u64,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// The generation the first write of the current epoch adopts (while `FLAG_GENERATION_ARMED`).
    pub next_generation: [u8; 16],
    /// With `INCOMPAT_PEER_DIRTY_BITMAP` (SPEC.md §10): the commit that started the peer dirty
    /// bitmap (its page versions are numbered from it), the bitmap's digest, and the generation
    /// the peer's replica was left at. All zero without the feature.
    pub peer_since: u64,
    pub peer_digest: u64,
    pub peer_generation: [u8; 16],
    /// With `INCOMPAT_GENERATION_HISTORY` (SPEC.md §10): the generations this volume had
    /// before, newest first (zero where none). All zero without the feature.
    pub history: [[u8; 16]; GENERATION_HISTORY],
}

impl Superblock {
    /// A fresh superblock for a volume of `size_bytes` (backing fields zero: blank).
    pub fn new(volume_id: [u8; 16], generation: [u8; 16], size_bytes: u64) -> Superblock {
        Superblock {
            incompat: 0,
            ro_compat: 0,
            compat: 0,
            volume_id,
            generation,
            epoch: 0,
            size_bytes,
            backing_id: [0; 16],
            backing_digest: [0; 32],
            backing_size_bytes: 0,
            map_offset: MAP_OFFSET,
            map_digest: 0,
            sequence: 1,
            flags: 0,
            next_generation: [0; 16],
            peer_since: 0,
            peer_digest: 0,
            peer_generation: [0; 16],
            history: [[0; 16]; GENERATION_HISTORY],
        }
    }

    fn check(&self) -> Result<(), FormatError> {
        let inv = |ok: bool, what: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(FormatError::invariant("superblock", what))
            }
        };
        inv(
            self.size_bytes > 0 && self.size_bytes <= MAX_SIZE_BYTES,
            "virtual size out of range",
        )?;
        inv(
            self.size_bytes.is_multiple_of(BLOCK_BYTES),
            "virtual size not a multiple of 4 KiB",
        )?;
        inv(
            self.backing_size_bytes <= self.size_bytes,
            "backing image larger than the volume",
        )?;
        inv(
            self.backing_id != [0; 16] || self.backing_size_bytes == 0,
            "blank volume with a backing size",
        )?;
        inv(
            self.map_offset == MAP_OFFSET,
            "map not right after the superblocks",
        )?;
        inv(self.flags & !FLAGS_KNOWN == 0, "unknown flags")?;
        inv(
            self.flags & FLAG_GENERATION_ARMED != 0 || self.next_generation == [0; 16],
            "a next generation without an armed epoch",
        )?;
        inv(self.sequence > 0, "sequence zero")?;
        if self.incompat & INCOMPAT_PEER_DIRTY_BITMAP != 0 {
            inv(
                self.peer_since > 0 && self.peer_since <= self.sequence,
                "a peer dirty bitmap started by no commit, or by a later one",
            )?;
        } else {
            inv(
                self.peer_since == 0 && self.peer_digest == 0 && self.peer_generation == [0; 16],
                "peer dirty bitmap fields without the feature",
            )?;
        }
        let any_history = self.history.iter().any(|g| *g != [0; 16]);
        inv(
            any_history == (self.incompat & INCOMPAT_GENERATION_HISTORY != 0),
            "generation history without the feature, or the feature without history",
        )?;
        Ok(())
    }

    /// Encodes into one slot. Panics if the superblock breaks an invariant: writing it would make
    /// the volume unreadable, which is a bug upstream.
    pub fn encode(&self) -> [u8; SUPERBLOCK_SLOT_BYTES] {
        if let Err(e) = self.check() {
            panic!("refusing to write an invalid superblock: {e}");
        }
        let mut b = [0u8; SUPERBLOCK_SLOT_BYTES];
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        put(at::MAGIC, &MAGIC);
        put(at::VERSION, &FORMAT_VERSION.to_le_bytes());
        put(at::INCOMPAT, &self.incompat.to_le_bytes());
        put(at::RO_COMPAT, &self.ro_compat.to_le_bytes());
        put(at::COMPAT, &self.compat.to_le_bytes());
        put(at::VOLUME_ID, &self.volume_id);
        put(at::GENERATION, &self.generation);
        put(at::EPOCH, &self.epoch.to_le_bytes());
        put(at::SIZE, &self.size_bytes.to_le_bytes());
        put(at::BACKING_ID, &self.backing_id);
        put(at::BACKING_DIGEST, &self.backing_digest);
        put(at::BACKING_SIZE, &self.backing_size_bytes.to_le_bytes());
        put(at::MAP_OFFSET, &self.map_offset.to_le_bytes());
        put(at::MAP_DIGEST, &self.map_digest.to_le_bytes());
        put(at::SEQUENCE, &self.sequence.to_le_bytes());
        put(at::FLAGS, &self.flags.to_le_bytes());
        put(at::NEXT_GENERATION, &self.next_generation);
        put(at::PEER_SINCE, &self.peer_since.to_le_bytes());
        put(at::PEER_DIGEST, &self.peer_digest.to_le_bytes());
        put(at::PEER_GENERATION, &self.peer_generation);
        for (i, g) in self.history.iter().enumerate() {
            put(at::HISTORY + 16 * i, g);
        }
        let crc = crc32c::crc32c(&b[..at::CRC]);
        b[at::CRC..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Recomputes the checksum of raw superblock bytes (tests and fuzzing forge valid-looking
    /// copies with it, to reach the checks behind the checksum).
    pub fn reseal(b: &mut [u8; SUPERBLOCK_SLOT_BYTES]) {
        let crc = crc32c::crc32c(&b[..at::CRC]);
        b[at::CRC..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes one slot, checking magic, checksum, version, features and invariants.
    pub fn decode(b: &[u8; SUPERBLOCK_SLOT_BYTES]) -> Result<Superblock, FormatError> {
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let magic: [u8; 8] = b[at::MAGIC..at::MAGIC + 8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(FormatError::BadMagic("superblock".into()));
        }
        let stored = u32_at(at::CRC);
        let computed = crc32c::crc32c(&b[..at::CRC]);
        if stored != computed {
            return Err(FormatError::BadChecksum {
                what: "superblock".into(),
                stored,
                computed,
            });
        }
        let version = u32_at(at::VERSION);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: "superblock".into(),
                version,
            });
        }
        let incompat = u64_at(at::INCOMPAT);
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(FormatError::UnknownIncompatibleFeatures(
                incompat & !INCOMPAT_KNOWN,
            ));
        }
        if b[at::END..at::CRC]
            .iter()
            .chain(&b[12..16])
            .any(|&x| x != 0)
        {
            return Err(FormatError::invariant(
                "superblock",
                "reserved bytes are not zero",
            ));
        }
        let sb = Superblock {
            incompat,
            ro_compat: u64_at(at::RO_COMPAT),
            compat: u64_at(at::COMPAT),
            volume_id: b[at::VOLUME_ID..at::VOLUME_ID + 16]
                .try_into()
                .expect("16 bytes"),
            generation: b[at::GENERATION..at::GENERATION + 16]
                .try_into()
                .expect("16 bytes"),
            epoch: u64_at(at::EPOCH),
            size_bytes: u64_at(at::SIZE),
            backing_id: b[at::BACKING_ID..at::BACKING_ID + 16]
                .try_into()
                .expect("16 bytes"),
            backing_digest: b[at::BACKING_DIGEST..at::BACKING_DIGEST + 32]
                .try_into()
                .expect("32 bytes"),
            backing_size_bytes: u64_at(at::BACKING_SIZE),
            map_offset: u64_at(at::MAP_OFFSET),
            map_digest: u64_at(at::MAP_DIGEST),
            sequence: u64_at(at::SEQUENCE),
            flags: u64_at(at::FLAGS),
            next_generation: b[at::NEXT_GENERATION..at::NEXT_GENERATION + 16]
                .try_into()
                .expect("16 bytes"),
            peer_since: u64_at(at::PEER_SINCE),
            peer_digest: u64_at(at::PEER_DIGEST),
            peer_generation: b[at::PEER_GENERATION..at::PEER_GENERATION + 16]
                .try_into()
                .expect("16 bytes"),
            history: std::array::from_fn(|i| {
                let at = at::HISTORY + 16 * i;
                b[at..at + 16].try_into().expect("16 bytes")
            }),
        };
        sb.check()?;
        Ok(sb)
    }

    /// The current superblock of the two slots: the valid one with the higher sequence. Read-only
    /// compatible features unknown to this build are reported by `read_only_features`.
    pub fn choose(
        a: &[u8; SUPERBLOCK_SLOT_BYTES],
        b: &[u8; SUPERBLOCK_SLOT_BYTES],
    ) -> Result<Superblock, FormatError> {
        match (Superblock::decode(a), Superblock::decode(b)) {
            (Ok(x), Ok(y)) => Ok(if y.sequence > x.sequence { y } else { x }),
            (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
            (Err(ea), Err(eb)) => Err(FormatError::NoValidSuperblock {
                a: Box::new(ea),
                b: Box::new(eb),
            }),
        }
    }

    /// Read-only-compatible features this build does not know: the volume may be read, not written.
    pub fn read_only_features(&self) -> u64 {
        self.ro_compat & !RO_COMPAT_KNOWN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recomputes the checksum after a test edited raw bytes, so only the edit is judged.
    fn reseal(b: &mut [u8; SUPERBLOCK_SLOT_BYTES]) {
        let crc = crc32c::crc32c(&b[..at::CRC]);
        b[at::CRC..].copy_from_slice(&crc.to_le_bytes());
    }

    fn sample() -> Superblock {
        let mut sb = Superblock::new([7; 16], [9; 16], 10 << 30);
        sb.backing_id = [1; 16];
        sb.backing_digest = [2; 32];
        sb.backing_size_bytes = (8 << 30) + 123;
        sb
    }

    #[test]
    fn round_trips() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
    }

    #[test]
    fn history_round_trips_and_needs_its_feature() {
        let mut sb = sample();
        sb.history = [[3; 16], [0; 16]];
        sb.incompat |= INCOMPAT_GENERATION_HISTORY;
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb.clone()));
        // History bytes without the feature bit, and the bit without history: refused.
        let mut b = sb.encode();
        b[at::INCOMPAT..at::INCOMPAT + 8].copy_from_slice(&0u64.to_le_bytes());
        reseal(&mut b);
        assert!(Superblock::decode(&b).is_err());
        let mut b = sample().encode();
        b[at::INCOMPAT..at::INCOMPAT + 8]
            .copy_from_slice(&INCOMPAT_GENERATION_HISTORY.to_le_bytes());
        reseal(&mut b);
        assert!(Superblock::decode(&b).is_err());
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = sample().encode();
        for i in (0..SUPERBLOCK_SLOT_BYTES).step_by(7) {
            let mut b = bytes;
            b[i] ^= 0x40;
            assert!(
                Superblock::decode(&b).is_err(),
                "flip at {i} went unnoticed"
            );
        }
    }

    #[test]
    fn unknown_incompatible_feature_and_version_are_refused() {
        // A feature bit this build does not know (bit 2): encode bypasses nothing, so set it
        // in raw bytes and re-checksum.
        let unknown = 1u64 << 2;
        assert_eq!(INCOMPAT_KNOWN & unknown, 0);
        let mut b = sample().encode();
        b[at::INCOMPAT..at::INCOMPAT + 8]
            .copy_from_slice(&(unknown | INCOMPAT_KNOWN).to_le_bytes());
        reseal(&mut b);
        assert_eq!(
            Superblock::decode(&b),
            Err(FormatError::UnknownIncompatibleFeatures(unknown))
        );
        let mut b = sample().encode();
        b[at::VERSION..at::VERSION + 4].copy_from_slice(&2u32.to_le_bytes());
        reseal(&mut b);
        assert_eq!(
            Superblock::decode(&b),
            Err(FormatError::UnsupportedVersion {
                what: "superblock".into(),
                version: 2
            })
        );
    }

    #[test]
    fn the_newest_valid_copy_wins_and_a_torn_copy_is_skipped() {
        let mut sb = sample();
        let a = sb.encode();
        sb.sequence = 2;
        sb.epoch = 5;
        let b = sb.encode();
        assert_eq!(Superblock::choose(&a, &b).unwrap().epoch, 5);
        // B torn halfway: A is still current.
        let mut torn = b;
        torn[2048..].fill(0);
        assert_eq!(Superblock::choose(&a, &torn).unwrap().sequence, 1);
        // Both torn: refused, and the error names both.
        let mut torn_a = a;
        torn_a[100] ^= 1;
        let e = Superblock::choose(&torn_a, &torn).unwrap_err();
        assert!(matches!(e, FormatError::NoValidSuperblock { .. }), "{e}");
    }
}
