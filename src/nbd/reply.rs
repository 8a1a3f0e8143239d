//! Transmission-phase replies. Each encoder appends header bytes to a caller-owned buffer and lists
//! the reply as segments (header bytes, or a range of the request's data buffer), so the driver can
//! send header and data with one vectored send and no copy of the data.

use super::handshake::ReplyMode;
use super::wire::*;

/// Granularity at which read data is checked for zeroes and sent as `OFFSET_HOLE` instead.
pub const HOLE_GRANULE_BYTES: u64 = 4096;

/// Zero runs shorter than this are sent as data: a hole chunk and the data chunk after it cost two
/// chunk headers and a client's chunk handling, worth it when they spare 64 KiB of transfer.
pub const MIN_HOLE_RUN_BYTES: u64 = 64 * 1024;

/// The chunks of one read reply, each emitted when the next is known, so the last one alone
/// carries `REPLY_FLAG_DONE`.
#[derive(Default)]
struct Chunks(Option<(u64, u64, bool)>);

impl Chunks {
    fn push(&mut self, b: &mut ReplyBuilder<'_>, start: u64, end: u64, hole: bool) {
        if let Some(prev) = self.0.replace((start, end, hole)) {
            b.run(prev, 0);
        }
    }

    fn finish(self, b: &mut ReplyBuilder<'_>) {
        if let Some(last) = self.0 {
            b.run(last, REPLY_FLAG_DONE);
        }
    }
}

/// One piece of an encoded reply, in send order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// `len` bytes of the header buffer from `start`.
    Header { start: u32, len: u32 },
    /// `len` bytes of the request's data buffer from `start`.
    Data { start: u32, len: u32 },
}

/// Where a reply is being encoded: header bytes and the segment list, both reused across requests.
pub struct ReplyBuilder<'a> {
    pub mode: ReplyMode,
    pub cookie: u64,
    /// The request's offset (echoed in extended reply headers).
    pub offset: u64,
    pub header: &'a mut Vec<u8>,
    pub segments: &'a mut Vec<Segment>,
}

impl ReplyBuilder<'_> {
    fn push_header(&mut self, bytes: &[u8]) {
        let start = self.header.len() as u32;
        self.header.extend_from_slice(bytes);
        match self.segments.last_mut() {
            // Header bytes that follow header bytes merge into one segment.
            Some(Segment::Header { start: s, len }) if *s + *len == start => {
                *len += bytes.len() as u32;
            }
            _ => self.segments.push(Segment::Header {
                start,
                len: bytes.len() as u32,
            }),
        }
    }

    fn simple(&mut self, error: u32) {
        let mut h = [0u8; SIMPLE_REPLY_BYTES];
        h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&error.to_be_bytes());
        h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        self.push_header(&h);
    }

    /// A structured or extended chunk header.
    fn chunk(&mut self, flags: u16, kind: u16, payload_len: u64) {
        if self.mode == ReplyMode::Extended {
            let mut h = [0u8; EXTENDED_REPLY_BYTES];
            h[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
            h[4..6].copy_from_slice(&flags.to_be_bytes());
            h[6..8].copy_from_slice(&kind.to_be_bytes());
            h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
            h[16..24].copy_from_slice(&self.offset.to_be_bytes());
            h[24..32].copy_from_slice(&payload_len.to_be_bytes());
            self.push_header(&h);
        } else {
            let mut h = [0u8; STRUCTURED_REPLY_BYTES];
            h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            h[4..6].copy_from_slice(&flags.to_be_bytes());
            h[6..8].copy_from_slice(&kind.to_be_bytes());
            h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
            h[16..20].copy_from_slice(&(payload_len as u32).to_be_bytes());
            self.push_header(&h);
        }
    }

    /// Success without data.
    pub fn ok(&mut self) {
        match self.mode {
            // A simple reply is allowed for non-read commands with structured replies too.
            ReplyMode::Simple | ReplyMode::Structured => self.simple(0),
            ReplyMode::Extended => self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0),
        }
    }

    /// An error. Structured and extended sessions get an error chunk carrying `message`.
    pub fn error(&mut self, errno: NbdErrno, message: &str) {
        match self.mode {
            ReplyMode::Simple => self.simple(errno.wire()),
            ReplyMode::Structured | ReplyMode::Extended => {
                // Error strings stay short and whole UTF-8 (the spec asks for UTF-8 text).
                let message = bounded_message(message);
                self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + message.len() as u64);
                self.push_header(&errno.wire().to_be_bytes());
                self.push_header(&(message.len() as u16).to_be_bytes());
                self.push_header(message.as_bytes());
            }
        }
    }

    /// A successful read of `data` (the bytes at `self.offset`). With structured or extended
    /// replies, runs of zeroes go out as `OFFSET_HOLE` chunks instead of data when they cover at
    /// least `MIN_HOLE_RUN_BYTES` of aligned 4 KiB granules, or the whole read; shorter runs stay
    /// in the data around them (the spec asks servers to keep chunks few). `df` asks for a single
    /// chunk.
    pub fn read(&mut self, data: &[u8], df: bool) {
        let len = data.len() as u64;
        if self.mode == ReplyMode::Simple {
            self.simple(0);
            self.data(0, len);
            return;
        }
        if len == 0 {
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
            return;
        }
        if df {
            if is_zero(data) {
                self.hole(self.offset, len, REPLY_FLAG_DONE);
            } else {
                self.data_chunk(0, len, REPLY_FLAG_DONE);
            }
            return;
        }
        // Walk the buffer in granules aligned to the export. `sent` is where the bytes not yet
        // given to a chunk begin; `zeroes` where the current run of zero granules began.
        let mut chunks = Chunks::default();
        let mut sent = 0u64;
        let mut zeroes = None::<u64>;
        let mut pos = 0u64;
        while pos <= len {
            let (zero, next) = if pos == len {
                (false, len + 1) // one step past the end closes the last run
            } else {
                let abs = self.offset + pos;
                let next =
                    ((abs / HOLE_GRANULE_BYTES + 1) * HOLE_GRANULE_BYTES - self.offset).min(len);
                let whole =
                    abs.is_multiple_of(HOLE_GRANULE_BYTES) && next - pos == HOLE_GRANULE_BYTES;
                (whole && is_zero(&data[pos as usize..next as usize]), next)
            };
            if zero {
                zeroes.get_or_insert(pos);
            } else if let Some(from) = zeroes.take()
                && (pos - from >= MIN_HOLE_RUN_BYTES || (from == 0 && pos == len))
            {
                if from > sent {
                    chunks.push(self, sent, from, false);
                }
                chunks.push(self, from, pos, true);
                sent = pos;
            }
            pos = next;
        }
        if sent < len {
            chunks.push(self, sent, len, false);
        }
        chunks.finish(self);
    }

    fn run(&mut self, (start, end, hole): (u64, u64, bool), flags: u16) {
        if hole {
            self.hole(self.offset + start, end - start, flags);
        } else {
            self.data_chunk(start, end - start, flags);
        }
    }

    fn hole(&mut self, abs_offset: u64, len: u64, flags: u16) {
        self.chunk(flags, REPLY_TYPE_OFFSET_HOLE, 12);
        self.push_header(&abs_offset.to_be_bytes());
        self.push_header(&(len as u32).to_be_bytes());
    }

    fn data_chunk(&mut self, start: u64, len: u64, flags: u16) {
        self.chunk(flags, REPLY_TYPE_OFFSET_DATA, 8 + len);
        self.push_header(&(self.offset + start).to_be_bytes());
        self.data(start, len);
    }

    fn data(&mut self, start: u64, len: u64) {
        if len > 0 {
            self.segments.push(Segment::Data {
                start: start as u32,
                len: len as u32,
            });
        }
    }

    /// A block status reply for `base:allocation`: `(length, flags)` extents.
    pub fn block_status(&mut self, context_id: u32, extents: &[(u64, u32)]) {
        if self.mode == ReplyMode::Extended {
            let n = extents.len() as u64;
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * n);
            self.push_header(&context_id.to_be_bytes());
            self.push_header(&(n as u32).to_be_bytes());
            for &(len, flags) in extents {
                self.push_header(&len.to_be_bytes());
                self.push_header(&u64::from(flags).to_be_bytes());
            }
        } else {
            // Without extended headers an extent is at most 4 GiB - 4 KiB (kept aligned). A longer
            // one is cut there and ends the reply: an extent after it would describe the wrong
            // offset, as descriptors are consecutive from the request's offset.
            const MAX_COMPACT_EXTENT: u64 = u32::MAX as u64 & !4095;
            let n = extents
                .iter()
                .position(|&(len, _)| len > MAX_COMPACT_EXTENT)
                .map_or(extents.len(), |i| i + 1);
            self.chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n as u64);
            self.push_header(&context_id.to_be_bytes());
            for &(len, flags) in &extents[..n] {
                self.push_header(&(len.min(MAX_COMPACT_EXTENT) as u32).to_be_bytes());
                self.push_header(&flags.to_be_bytes());
            }
        }
    }
}

/// True when every byte is zero. Sixteen bytes at a time; the compiler vectorises the loop.
pub fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(16);
    let tail = words.remainder();
    tail.iter().all(|&b| b == 0)
        && words
            .into_iter()
            .all(|w| u128::from_ne_bytes(w.try_into().unwrap()) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(
        mode: ReplyMode,
        offset: u64,
        f: impl FnOnce(&mut ReplyBuilder),
    ) -> (Vec<u8>, Vec<Segment>) {
        let mut header = Vec::new();
        let mut segments = Vec::new();
        let mut b = ReplyBuilder {
            mode,
            cookie: 5,
            offset,
            header: &mut header,
            segments: &mut segments,
        };
        f(&mut b);
        (header, segments)
    }

    /// Parses structured chunks back: (flags, type, payload-in-header bytes).
    fn chunk_types(header: &[u8], segments: &[Segment]) -> Vec<(u16, u16)> {
        // Header segments hold chunk headers; walk the concatenated header bytes.
        let mut v = Vec::new();
        let mut pos = 0usize;
        let data_lens: Vec<u32> = segments
            .iter()
            .filter_map(|s| match s {
                Segment::Data { len, .. } => Some(*len),
                _ => None,
            })
            .collect();
        let mut data_i = 0;
        while pos < header.len() {
            assert_eq!(
                u32::from_be_bytes(header[pos..pos + 4].try_into().unwrap()),
                STRUCTURED_REPLY_MAGIC
            );
            let flags = u16::from_be_bytes([header[pos + 4], header[pos + 5]]);
            let kind = u16::from_be_bytes([header[pos + 6], header[pos + 7]]);
            let len = u32::from_be_bytes(header[pos + 16..pos + 20].try_into().unwrap()) as usize;
            v.push((flags, kind));
            pos += 20;
            if kind == REPLY_TYPE_OFFSET_DATA {
                assert_eq!(len, 8 + data_lens[data_i] as usize);
                data_i += 1;
                pos += 8;
            } else {
                pos += len;
            }
        }
        v
    }

    #[test]
    fn simple_read_is_header_then_all_data() {
        let data = vec![0u8; 8192];
        let (h, s) = build(ReplyMode::Simple, 0, |b| b.read(&data, false));
        assert_eq!(h.len(), 16);
        assert_eq!(
            s,
            [
                Segment::Header { start: 0, len: 16 },
                Segment::Data {
                    start: 0,
                    len: 8192
                }
            ]
        );
    }

    #[test]
    fn structured_read_sends_long_zero_runs_as_holes() {
        // Data in granule 0, 16 zero granules (64 KiB), data in the last granule.
        let granule = HOLE_GRANULE_BYTES as usize;
        let mut data = vec![0u8; 18 * granule];
        data[100] = 1;
        data[17 * granule + 5] = 1;
        let (h, s) = build(ReplyMode::Structured, 8192, |b| b.read(&data, false));
        assert_eq!(
            chunk_types(&h, &s),
            [
                (0, REPLY_TYPE_OFFSET_DATA),
                (0, REPLY_TYPE_OFFSET_HOLE),
                (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)
            ]
        );
        // The hole covers granules 1 to 16 at absolute offsets.
        let hole_payload = &h[20 + 8 + 20..20 + 8 + 20 + 12];
        assert_eq!(
            u64::from_be_bytes(hole_payload[..8].try_into().unwrap()),
            8192 + 4096
        );
        assert_eq!(
            u32::from_be_bytes(hole_payload[8..].try_into().unwrap()),
            MIN_HOLE_RUN_BYTES as u32
        );
        // A run that ends the read is a hole too, and carries DONE.
        let data = &data[..17 * granule];
        let (h, s) = build(ReplyMode::Structured, 0, |b| b.read(data, false));
        assert_eq!(
            chunk_types(&h, &s),
            [
                (0, REPLY_TYPE_OFFSET_DATA),
                (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE)
            ]
        );
    }

    #[test]
    fn short_zero_runs_stay_in_one_data_chunk() {
        // Every other granule zero, and 15 zero granules (60 KiB) in the middle: one chunk.
        let granule = HOLE_GRANULE_BYTES as usize;
        let mut data = vec![0u8; 64 * granule];
        for g in (0..64).step_by(2).filter(|g| !(21..35).contains(g)) {
            data[g * granule] = 7;
        }
        let (h, s) = build(ReplyMode::Structured, 0, |b| b.read(&data, false));
        assert_eq!(
            chunk_types(&h, &s),
            [(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)]
        );
        // A read that is all zeroes is one hole, however short.
        let data = vec![0u8; granule];
        let (h, s) = build(ReplyMode::Structured, 4096, |b| b.read(&data, false));
        assert_eq!(
            chunk_types(&h, &s),
            [(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE)]
        );
    }

    #[test]
    fn unaligned_zeroes_stay_data_and_df_is_one_chunk() {
        let data = vec![0u8; 4096];
        let (h, s) = build(ReplyMode::Structured, 100, |b| b.read(&data, false));
        assert_eq!(
            chunk_types(&h, &s),
            [(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)]
        );
        let mut data = vec![0u8; 3 * 4096];
        data[4096] = 9;
        let (h, s) = build(ReplyMode::Structured, 0, |b| b.read(&data, true));
        assert_eq!(
            chunk_types(&h, &s),
            [(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)]
        );
        let data = vec![0u8; 3 * 4096];
        let (h, s) = build(ReplyMode::Structured, 0, |b| b.read(&data, true));
        assert_eq!(
            chunk_types(&h, &s),
            [(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE)]
        );
    }

    #[test]
    fn empty_read_is_a_done_none_chunk() {
        let (h, s) = build(ReplyMode::Structured, 0, |b| b.read(&[], false));
        assert_eq!(chunk_types(&h, &s), [(REPLY_FLAG_DONE, REPLY_TYPE_NONE)]);
    }

    #[test]
    fn extended_headers_echo_offset_and_use_64_bit_lengths() {
        let (h, _) = build(ReplyMode::Extended, 4096, |b| b.ok());
        assert_eq!(h.len(), 32);
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            EXTENDED_REPLY_MAGIC
        );
        assert_eq!(u64::from_be_bytes(h[16..24].try_into().unwrap()), 4096);
        let (h, _) = build(ReplyMode::Extended, 0, |b| {
            b.block_status(1, &[(1 << 33, 3)])
        });
        assert_eq!(
            u16::from_be_bytes([h[6], h[7]]),
            REPLY_TYPE_BLOCK_STATUS_EXT
        );
        assert_eq!(u64::from_be_bytes(h[24..32].try_into().unwrap()), 24);
        assert_eq!(u64::from_be_bytes(h[40..48].try_into().unwrap()), 1 << 33);
    }

    #[test]
    fn a_compact_extent_over_4_gib_is_cut_and_ends_the_reply() {
        let (h, _) = build(ReplyMode::Structured, 0, |b| {
            b.block_status(1, &[(4096, 0), (5 << 30, 3), (4096, 0)])
        });
        // Chunk header (20) + context id (4) + two descriptors of 8 bytes.
        assert_eq!(u32::from_be_bytes(h[16..20].try_into().unwrap()), 4 + 16);
        assert_eq!(h.len(), 20 + 4 + 16);
        let second = u32::from_be_bytes(h[32..36].try_into().unwrap());
        assert_eq!(u64::from(second), u64::from(u32::MAX) & !4095);
    }

    #[test]
    fn errors_carry_a_message_in_structured_mode() {
        let (h, _) = build(ReplyMode::Structured, 0, |b| {
            b.error(NbdErrno::NoSpc, "full")
        });
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes(h[20..24].try_into().unwrap()), 28);
        assert_eq!(&h[26..], b"full");
        let (h, _) = build(ReplyMode::Simple, 0, |b| b.error(NbdErrno::Perm, "ro"));
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 1);
    }

    #[test]
    fn is_zero_checks_every_byte() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[17] = 1;
        assert!(!is_zero(&v));
    }
}
