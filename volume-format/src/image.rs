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

/// Streams an image into its raw file, sealing it on the way: zero blocks stay holes, each run
/// of non-zero blocks is one write, and the file is written behind in windows of
/// `WRITE_BEHIND_BYTES` (`Storage::write_behind` on the window just filled starts its writeback;
/// once more on the window before drops its pages, clean by then), so a many-GiB import neither
/// piles up dirty pages nor pushes the served images and volumes out of the page cache.
/// Import and capture both write through it.
pub struct ImageWriter<'a, S: Storage> {
    raw: &'a mut S,
    sealer: Sealer,
    /// Bytes appended so far (the image's size once finished).
    pos: u64,
    /// Start of the window being filled; the window before it, from `behind`, is in writeback.
    window: u64,
    behind: u64,
}

/// Write-behind window: big enough for sequential disk writes, small beside the page cache.
pub const WRITE_BEHIND_BYTES: u64 = 8 << 20;

/// Largest single read or write of the streaming work (import, capture, verify). A kernel built
/// without preemption (PREEMPT_NONE, common on servers) cannot take the CPU from a thread inside
/// one `read`/`write` system call: a 1 MiB copy holds a core for 100 µs or more however low the
/// thread's priority, and a data-path thread waking behind it waits that long. 128 KiB keeps each
/// such span short and the system calls still few.
pub const STREAM_IO_BYTES: usize = 128 << 10;

impl<'a, S: Storage> ImageWriter<'a, S> {
    /// Starts writing at offset 0 of `raw`, truncated to empty first.
    pub fn new(raw: &'a mut S) -> io::Result<ImageWriter<'a, S>> {
        raw.set_len(0)?;
        Ok(ImageWriter {
            raw,
            sealer: Sealer::new(),
            pos: 0,
            window: 0,
            behind: 0,
        })
    }

    /// Appends `bytes`, of any length.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.sealer.update(bytes);
        let block = BLOCK_BYTES as usize;
        let mut i = 0;
        while i < bytes.len() {
            // Blocks are counted from the image's start, so a write that begins mid-block
            // still leaves holes only where whole blocks are zero.
            let skip = block - (self.pos as usize + i) % block;
            let first = (i + skip).min(bytes.len());
            if bytes[i..first].iter().all(|&b| b == 0) {
                i = first;
                continue;
            }
            let mut end = first;
            while end < bytes.len() {
                let next = (end + block).min(bytes.len());
                if bytes[end..next].iter().all(|&b| b == 0) {
                    break;
                }
                end = next;
            }
            for piece in bytes[i..end].chunks(STREAM_IO_BYTES) {
                self.raw.write_at(self.pos + i as u64, piece)?;
                i += piece.len();
            }
        }
        self.pos += bytes.len() as u64;
        if self.pos - self.window >= WRITE_BEHIND_BYTES {
            self.raw.write_behind(self.window, self.pos - self.window)?;
            if self.window > self.behind {
                self.raw
                    .write_behind(self.behind, self.window - self.behind)?;
            }
            self.behind = self.window;
            self.window = self.pos;
        }
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.pos
    }

    /// Sets the file's length (trailing zeroes stay a hole), makes it durable and seals it.
    pub fn finish(self, id: [u8; 16]) -> io::Result<ImageInfo> {
        self.raw.set_len(self.pos)?;
        self.raw.sync()?;
        if self.pos > self.behind {
            self.raw.write_behind(self.behind, self.pos - self.behind)?;
        }
        Ok(self.sealer.finish(id))
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
    let mut buf = vec![0u8; STREAM_IO_BYTES];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(STREAM_IO_BYTES as u64) as usize;
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

    /// Records what an `ImageWriter` does to its file.
    struct Recorder {
        file: MemFile,
        writes: Vec<(u64, usize)>,
        behind: Vec<(u64, u64)>,
    }

    impl Storage for Recorder {
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.file.read_at(offset, buf)
        }
        fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.writes.push((offset, data.len()));
            self.file.write_at(offset, data)
        }
        fn punch_hole(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.file.punch_hole(offset, len)
        }
        fn sync(&mut self) -> io::Result<()> {
            self.file.sync()
        }
        fn len(&self) -> u64 {
            self.file.len()
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }
        fn seek_data(&mut self, offset: u64) -> io::Result<Option<u64>> {
            self.file.seek_data(offset)
        }
        fn seek_hole(&mut self, offset: u64) -> io::Result<u64> {
            self.file.seek_hole(offset)
        }
        fn allocated_bytes(&self) -> io::Result<u64> {
            self.file.allocated_bytes()
        }
        fn write_behind(&mut self, offset: u64, len: u64) -> io::Result<()> {
            self.behind.push((offset, len));
            Ok(())
        }
    }

    #[test]
    fn image_writer_keeps_holes_bounds_writes_and_writes_behind() {
        // 20 MiB + a tail: a zero block at 8 KiB, a zero MiB at 5 MiB, zeroes at the very end.
        let size = (20 << 20) + 6000;
        let mut bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
        bytes[8192..12288].fill(0);
        bytes[5 << 20..6 << 20].fill(0);
        bytes[size - 3000..].fill(0);
        let mut rec = Recorder {
            file: MemFile::new(),
            writes: Vec::new(),
            behind: Vec::new(),
        };
        let mut w = ImageWriter::new(&mut rec).unwrap();
        // Odd pieces, so blocks straddle the calls.
        for piece in bytes.chunks(300_001) {
            w.write(piece).unwrap();
        }
        let info = w.finish([3; 16]).unwrap();

        let mut s = Sealer::new();
        s.update(&bytes);
        assert_eq!(
            info,
            s.finish([3; 16]),
            "the seal covers every byte, zeroes too"
        );
        let mut back = vec![0; size];
        rec.file.read_at(0, &mut back).unwrap();
        assert_eq!(back, bytes);
        assert_eq!(rec.file.len(), size as u64);
        // No write touches a whole zero block, none is longer than STREAM_IO_BYTES.
        for &(off, len) in &rec.writes {
            assert!(len <= STREAM_IO_BYTES, "write of {len} bytes");
            let end = off + len as u64;
            assert!(
                end <= 8192 || off >= 12288,
                "wrote into the zero block: {off}+{len}"
            );
            assert!(
                end <= 5 << 20 || off >= 6 << 20,
                "wrote into the zero MiB: {off}+{len}"
            );
        }
        let written: u64 = rec.writes.iter().map(|w| w.1 as u64).sum();
        assert!(
            written < size as u64 - (1 << 20),
            "zero runs were written: {written}"
        );
        // Write-behind: every window is started, then passed again; together they cover the file.
        let mut covered = 0;
        for &(off, len) in &rec.behind {
            assert!(off <= covered, "a gap before {off}");
            covered = covered.max(off + len);
        }
        assert_eq!(covered, size as u64);
        assert!(rec.behind.len() >= 2 * (size as u64 / WRITE_BEHIND_BYTES) as usize);
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
