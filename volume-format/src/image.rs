//! Golden images (SPEC.md §2, §5): a raw file, immutable once sealed, and a small metadata file
//! with its identity, size and content digest: a crc32c per 1 MiB chunk (finds which part is
//! damaged) and a SHA-256 of the whole image (the same value `sha256sum` prints for the raw file,
//! so an operator can compare it with the source).

use std::io;

use sha2::{Digest, Sha256};

use crate::error::FormatError;
use crate::layout::*;
use crate::storage::Storage;

/// What a volume records of its backing image, and checks at open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRef {
    pub id: [u8; 16],
    pub size: u64,
    pub digest: [u8; 32],
}

/// A sealed image's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: [u8; 16],
    pub size: u64,
    /// SHA-256 of the image's bytes.
    pub digest: [u8; 32],
    /// crc32c of each 1 MiB chunk (the last one may be short).
    pub chunk_crcs: Vec<u32>,
}

mod at {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const CHUNK_SHIFT: usize = 12;
    pub const ID: usize = 16;
    pub const SIZE: usize = 32;
    pub const DIGEST: usize = 40;
    pub const CHUNKS: usize = 72;
    pub const END: usize = 80;
    pub const CRC: usize = super::IMAGE_HEADER_BYTES - 4;
}

/// Largest image accepted (same bound as a volume's size).
pub const MAX_IMAGE_BYTES: u64 = crate::superblock::MAX_SIZE_BYTES;

impl ImageInfo {
    pub fn image_ref(&self) -> ImageRef {
        ImageRef {
            id: self.id,
            size: self.size,
            digest: self.digest,
        }
    }

    pub fn digest_hex(&self) -> String {
        hex(&self.digest)
    }

    /// The metadata file's bytes: header, chunk table, crc32c of the table.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; IMAGE_HEADER_BYTES];
        b[at::MAGIC..at::MAGIC + 8].copy_from_slice(&IMAGE_MAGIC);
        b[at::VERSION..at::VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[at::CHUNK_SHIFT..at::CHUNK_SHIFT + 4].copy_from_slice(&IMAGE_CHUNK_SHIFT.to_le_bytes());
        b[at::ID..at::ID + 16].copy_from_slice(&self.id);
        b[at::SIZE..at::SIZE + 8].copy_from_slice(&self.size.to_le_bytes());
        b[at::DIGEST..at::DIGEST + 32].copy_from_slice(&self.digest);
        b[at::CHUNKS..at::CHUNKS + 8]
            .copy_from_slice(&(self.chunk_crcs.len() as u64).to_le_bytes());
        let crc = crc32c::crc32c(&b[..at::CRC]);
        b[at::CRC..].copy_from_slice(&crc.to_le_bytes());
        for c in &self.chunk_crcs {
            b.extend_from_slice(&c.to_le_bytes());
        }
        let table_crc = crc32c::crc32c(&b[IMAGE_HEADER_BYTES..]);
        b.extend_from_slice(&table_crc.to_le_bytes());
        b
    }

    /// Decodes and checks a metadata file's bytes.
    pub fn decode(b: &[u8]) -> Result<ImageInfo, FormatError> {
        const WHAT: &str = "image header";
        if b.len() < IMAGE_HEADER_BYTES {
            return Err(FormatError::invariant(WHAT, "file too short"));
        }
        if b[at::MAGIC..at::MAGIC + 8] != IMAGE_MAGIC {
            return Err(FormatError::BadMagic(WHAT.into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let (stored, computed) = (u32_at(at::CRC), crc32c::crc32c(&b[..at::CRC]));
        if stored != computed {
            return Err(FormatError::BadChecksum {
                what: WHAT.into(),
                stored,
                computed,
            });
        }
        let version = u32_at(at::VERSION);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                what: WHAT.into(),
                version,
            });
        }
        if u32_at(at::CHUNK_SHIFT) != IMAGE_CHUNK_SHIFT {
            return Err(FormatError::invariant(WHAT, "unsupported chunk size"));
        }
        if b[at::END..at::CRC].iter().any(|&x| x != 0) {
            return Err(FormatError::invariant(WHAT, "reserved bytes are not zero"));
        }
        let size = u64_at(at::SIZE);
        if size > MAX_IMAGE_BYTES {
            return Err(FormatError::invariant(WHAT, "size out of range"));
        }
        let chunks = u64_at(at::CHUNKS);
        if chunks != size.div_ceil(IMAGE_CHUNK_BYTES) {
            return Err(FormatError::invariant(
                WHAT,
                "chunk count does not match the size",
            ));
        }
        let table_end = (chunks as usize)
            .checked_mul(4)
            .and_then(|t| t.checked_add(IMAGE_HEADER_BYTES))
            .filter(|&e| e.checked_add(4) == Some(b.len()))
            .ok_or_else(|| FormatError::invariant("image chunk table", "wrong length"))?;
        let table = &b[IMAGE_HEADER_BYTES..table_end];
        let (stored, computed) = (u32_at(table_end), crc32c::crc32c(table));
        if stored != computed {
            return Err(FormatError::BadChecksum {
                what: "image chunk table".into(),
                stored,
                computed,
            });
        }
        Ok(ImageInfo {
            id: b[at::ID..at::ID + 16].try_into().expect("16 bytes"),
            size,
            digest: b[at::DIGEST..at::DIGEST + 32].try_into().expect("32 bytes"),
            chunk_crcs: table
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        })
    }

    /// Writes the metadata file and makes it durable.
    pub fn store<S: Storage>(&self, meta: &mut S) -> io::Result<()> {
        let bytes = self.encode();
        meta.set_len(0)?;
        meta.write_at(0, &bytes)?;
        meta.sync()
    }

    /// Reads and checks a metadata file: the header first, then exactly the chunk table it
    /// announces (a hostile or damaged file cannot make this read more than it should).
    pub fn load<S: Storage>(meta: &mut S) -> Result<ImageInfo, crate::VolumeError> {
        let mut header = [0u8; IMAGE_HEADER_BYTES];
        if meta.len() < IMAGE_HEADER_BYTES as u64 {
            return Err(FormatError::invariant("image header", "file too short").into());
        }
        meta.read_at(0, &mut header)?;
        let chunks = u64::from_le_bytes(header[at::CHUNKS..at::CHUNKS + 8].try_into().expect("8"));
        let max_chunks = MAX_IMAGE_BYTES.div_ceil(IMAGE_CHUNK_BYTES);
        let want = IMAGE_HEADER_BYTES as u64 + chunks.min(max_chunks + 1) * 4 + 4;
        if chunks > max_chunks || meta.len() != want {
            // Decode the header alone for the precise reason (checksum, magic, count).
            ImageInfo::decode(&header)?;
            return Err(FormatError::invariant("image chunk table", "wrong length").into());
        }
        let mut b = vec![0u8; want as usize];
        meta.read_at(0, &mut b)?;
        Ok(ImageInfo::decode(&b)?)
    }
}

/// Computes an image's digest and chunk table from its bytes as they stream in (an import from
/// a pipe is sealed on the way in, without reading the result back).
pub struct Sealer {
    sha: Sha256,
    crcs: Vec<u32>,
    chunk_crc: u32,
    chunk_fill: u64,
    size: u64,
}

impl Default for Sealer {
    fn default() -> Sealer {
        Sealer::new()
    }
}

impl Sealer {
    pub fn new() -> Sealer {
        Sealer {
            sha: Sha256::new(),
            crcs: Vec::new(),
            chunk_crc: 0,
            chunk_fill: 0,
            size: 0,
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.sha.update(bytes);
        self.size += bytes.len() as u64;
        while !bytes.is_empty() {
            let n = ((IMAGE_CHUNK_BYTES - self.chunk_fill) as usize).min(bytes.len());
            self.chunk_crc = crc32c::crc32c_append(self.chunk_crc, &bytes[..n]);
            self.chunk_fill += n as u64;
            bytes = &bytes[n..];
            if self.chunk_fill == IMAGE_CHUNK_BYTES {
                self.crcs.push(self.chunk_crc);
                self.chunk_crc = 0;
                self.chunk_fill = 0;
            }
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn finish(mut self, id: [u8; 16]) -> ImageInfo {
        if self.chunk_fill > 0 {
            self.crcs.push(self.chunk_crc);
        }
        ImageInfo {
            id,
            size: self.size,
            digest: self.sha.finalize().into(),
            chunk_crcs: self.crcs,
        }
    }
}

/// Reads a whole raw image and seals it. `progress` gets the bytes done so far.
pub fn seal<S: Storage>(
    raw: &mut S,
    id: [u8; 16],
    mut progress: impl FnMut(u64),
) -> io::Result<ImageInfo> {
    let size = raw.len();
    let mut sealer = Sealer::new();
    let mut buf = vec![0u8; IMAGE_CHUNK_BYTES as usize];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(IMAGE_CHUNK_BYTES) as usize;
        raw.read_at(pos, &mut buf[..n])?;
        sealer.update(&buf[..n]);
        pos += n as u64;
        progress(pos);
    }
    Ok(sealer.finish(id))
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks whose crc32c does not match (index; chunk `i` covers `i` MiB onwards).
    pub bad_chunks: Vec<u64>,
    pub size_matches: bool,
    pub digest_matches: bool,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.bad_chunks.is_empty() && self.size_matches && self.digest_matches
    }
}

/// Re-reads the raw image and compares it with its sealed metadata.
pub fn verify<S: Storage>(
    raw: &mut S,
    info: &ImageInfo,
    progress: impl FnMut(u64),
) -> io::Result<VerifyReport> {
    let now = seal(raw, info.id, progress)?;
    let bad_chunks = info
        .chunk_crcs
        .iter()
        .zip(
            now.chunk_crcs
                .iter()
                .map(Some)
                .chain(std::iter::repeat(None)),
        )
        .enumerate()
        .filter(|(_, (want, got))| Some(*want) != *got)
        .map(|(i, _)| i as u64)
        .collect();
    Ok(VerifyReport {
        bad_chunks,
        size_matches: now.size == info.size,
        digest_matches: now.digest == info.digest,
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemFile;

    fn image(size: usize) -> MemFile {
        let mut f = MemFile::new();
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        f.write_at(0, &bytes).unwrap();
        f
    }

    #[test]
    fn seals_any_size_and_matches_sha256() {
        for size in [0, 1, 4095, (1 << 20) + 17, 3 << 20] {
            let mut raw = image(size);
            let info = seal(&mut raw, [1; 16], |_| {}).unwrap();
            assert_eq!(info.size, size as u64);
            assert_eq!(
                info.chunk_crcs.len() as u64,
                (size as u64).div_ceil(1 << 20)
            );
            let mut bytes = vec![0; size];
            raw.read_at(0, &mut bytes).unwrap();
            assert_eq!(info.digest, <[u8; 32]>::from(Sha256::digest(&bytes)));
            assert_eq!(ImageInfo::decode(&info.encode()), Ok(info.clone()));
            assert!(verify(&mut raw, &info, |_| {}).unwrap().ok());
        }
    }

    #[test]
    fn streaming_in_odd_pieces_gives_the_same_seal() {
        let mut raw = image((2 << 20) + 5);
        let whole = seal(&mut raw, [1; 16], |_| {}).unwrap();
        let mut bytes = vec![0; whole.size as usize];
        raw.read_at(0, &mut bytes).unwrap();
        let mut s = Sealer::new();
        for piece in bytes.chunks(333_333) {
            s.update(piece);
        }
        assert_eq!(s.finish([1; 16]), whole);
    }

    #[test]
    fn verify_names_the_damaged_chunk() {
        let mut raw = image(3 << 20);
        let info = seal(&mut raw, [1; 16], |_| {}).unwrap();
        raw.write_at((1 << 20) + 99, &[0xff]).unwrap();
        let r = verify(&mut raw, &info, |_| {}).unwrap();
        assert_eq!(r.bad_chunks, vec![1]);
        assert!(!r.digest_matches && r.size_matches && !r.ok());
    }

    #[test]
    fn corrupt_metadata_is_refused() {
        let info = seal(&mut image(5000), [1; 16], |_| {}).unwrap();
        let b = info.encode();
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x08;
            assert!(ImageInfo::decode(&c).is_err(), "flip at {i}");
        }
        assert!(ImageInfo::decode(&b[..b.len() - 1]).is_err());
        assert!(ImageInfo::decode(&[]).is_err());
    }
}
