//! The peer link's bytes (`docs/peer-protocol.md`): frame headers and the payloads of HELLO and
//! OPEN. Pure functions over byte slices, no I/O; every input from the other node passes here
//! first, and any bytes give either a value or an error naming what is wrong (fuzzed by the
//! `peer_frame` target).

/// Bytes of every frame header.
pub const HEADER_BYTES: usize = 64;
/// Magic of every frame.
pub const MAGIC: [u8; 4] = *b"STRP";
/// The protocol version this code speaks.
pub const VERSION: u32 = 1;
/// Largest payload (and largest READ range).
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;

pub const FLAG_FUA: u8 = 1 << 0;
pub const FLAG_NO_HOLE: u8 = 1 << 1;
pub const FLAG_REPLY: u8 = 1 << 7;
/// In the reply to a forwarded data operation (`docs/pair.md` §8): the owner carried it out,
/// but not on the requester's own replica (the owner is degraded): that copy is stale now.
pub const FLAG_NOT_ON_REPLICA: u8 = 1 << 2;

/// What a frame asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Open = 2,
    Write = 3,
    Zero = 4,
    Trim = 5,
    Flush = 6,
    Read = 7,
    Ping = 8,
    Control = 9,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Open,
            3 => Kind::Write,
            4 => Kind::Zero,
            5 => Kind::Trim,
            6 => Kind::Flush,
            7 => Kind::Read,
            8 => Kind::Ping,
            9 => Kind::Control,
            _ => return None,
        })
    }

    /// The flags a request of this kind may carry.
    fn allowed_flags(self) -> u8 {
        match self {
            Kind::Write | Kind::Trim => FLAG_FUA,
            Kind::Zero => FLAG_FUA | FLAG_NO_HOLE,
            Kind::Hello | Kind::Open | Kind::Flush | Kind::Read | Kind::Ping | Kind::Control => 0,
        }
    }

    /// Data operations carry a token and a sequence and name a volume by handle.
    pub fn is_data(self) -> bool {
        matches!(self, Kind::Write | Kind::Zero | Kind::Trim | Kind::Flush)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// FUA / NO_HOLE, without the REPLY bit.
    pub flags: u8,
    pub reply: bool,
    /// Zero in requests; in replies zero or an errno.
    pub status: u16,
    pub cookie: u64,
    pub token: u64,
    pub sequence: u64,
    pub offset: u64,
    pub range: u64,
    pub handle: u32,
    pub payload_len: u32,
    pub payload_crc: u32,
}

/// What is wrong with bytes that claim to be a frame. Any of these ends the link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:02x?}: not a streamer peer")]
    BadMagic([u8; 4]),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("flags {flags:#04x} not allowed on {kind:?}")]
    BadFlags { kind: Kind, flags: u8 },
    #[error("a request with status {0}")]
    StatusInRequest(u16),
    #[error("payload of {0} bytes exceeds the limit")]
    PayloadTooLarge(u32),
    #[error("{kind:?} {what}")]
    Malformed { kind: Kind, what: &'static str },
    #[error("offset {offset} + range {range} overflows")]
    RangeOverflow { offset: u64, range: u64 },
    #[error("payload checksum mismatch (header says {expected:#010x}, payload has {actual:#010x})")]
    PayloadChecksum { expected: u32, actual: u32 },
    #[error("{0}")]
    BadPayload(&'static str),
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl Header {
    /// A request header; the payload checksum is filled by [`Header::with_payload`].
    pub fn request(kind: Kind, cookie: u64) -> Header {
        Header {
            kind,
            flags: 0,
            reply: false,
            status: 0,
            cookie,
            token: 0,
            sequence: 0,
            offset: 0,
            range: 0,
            handle: 0,
            payload_len: 0,
            payload_crc: 0,
        }
    }

    /// The reply to this request: same kind, cookie, handle and place; no payload yet.
    pub fn reply_to(&self, status: u16) -> Header {
        Header {
            flags: 0,
            reply: true,
            status,
            payload_len: 0,
            payload_crc: 0,
            ..*self
        }
    }

    /// The request frame of a data operation: its kind, flags, token, sequence, volume and
    /// range from `op`, and `payload` (a write's, empty otherwise) checksummed.
    pub fn data_request(op: &crate::target::PeerIo, cookie: u64, payload: &[u8]) -> Header {
        use crate::target::PeerOp;
        let (kind, range) = match op.op {
            PeerOp::Write => (Kind::Write, op.len),
            PeerOp::Zero => (Kind::Zero, op.len),
            PeerOp::Trim => (Kind::Trim, op.len),
            PeerOp::Flush => (Kind::Flush, 0),
        };
        let mut h = Header::request(kind, cookie);
        h.token = op.token;
        h.sequence = op.sequence;
        h.handle = op.volume;
        h.offset = if kind == Kind::Flush { 0 } else { op.offset };
        h.range = range;
        if op.fua && kind != Kind::Flush {
            h.flags |= FLAG_FUA;
        }
        if op.no_hole && kind == Kind::Zero {
            h.flags |= FLAG_NO_HOLE;
        }
        h.with_payload(payload)
    }

    /// Sets the payload's length and checksum.
    pub fn with_payload(mut self, payload: &[u8]) -> Header {
        self.payload_len = u32::try_from(payload.len()).expect("payload within the limit");
        self.payload_crc = if payload.is_empty() {
            0
        } else {
            crc32c(payload)
        };
        self
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as u8;
        b[5] = self.flags | if self.reply { FLAG_REPLY } else { 0 };
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_le_bytes());
        b[16..24].copy_from_slice(&self.token.to_le_bytes());
        b[24..32].copy_from_slice(&self.sequence.to_le_bytes());
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.range.to_le_bytes());
        b[48..52].copy_from_slice(&self.handle.to_le_bytes());
        b[52..56].copy_from_slice(&self.payload_len.to_le_bytes());
        b[56..60].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header (`docs/peer-protocol.md`, "Header"): `Ok(None)` until
    /// `bytes` holds a whole one.
    pub fn decode(bytes: &[u8]) -> Result<Option<Header>, WireError> {
        let Some(b) = bytes.get(..HEADER_BYTES) else {
            return Ok(None);
        };
        let magic: [u8; 4] = b[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if crc32c(&b[..60]) != u32_at(b, 60) {
            return Err(WireError::HeaderChecksum);
        }
        let kind = Kind::from_u8(b[4]).ok_or(WireError::UnknownKind(b[4]))?;
        let reply = b[5] & FLAG_REPLY != 0;
        let flags = b[5] & !FLAG_REPLY;
        // A reply echoes nothing but the REPLY bit, and says whether a forwarded data
        // operation reached the requester's replica.
        let allowed = match (reply, kind.is_data()) {
            (true, true) => FLAG_NOT_ON_REPLICA,
            (true, false) => 0,
            (false, _) => kind.allowed_flags(),
        };
        if flags & !allowed != 0 {
            return Err(WireError::BadFlags { kind, flags });
        }
        let status = u16::from_le_bytes([b[6], b[7]]);
        if !reply && status != 0 {
            return Err(WireError::StatusInRequest(status));
        }
        let h = Header {
            kind,
            flags,
            reply,
            status,
            cookie: u64_at(b, 8),
            token: u64_at(b, 16),
            sequence: u64_at(b, 24),
            offset: u64_at(b, 32),
            range: u64_at(b, 40),
            handle: u32_at(b, 48),
            payload_len: u32_at(b, 52),
            payload_crc: u32_at(b, 56),
        };
        if h.payload_len > MAX_PAYLOAD_BYTES {
            return Err(WireError::PayloadTooLarge(h.payload_len));
        }
        if h.payload_len == 0 && h.payload_crc != 0 {
            return Err(h.malformed("has a payload checksum and no payload"));
        }
        h.offset
            .checked_add(h.range)
            .ok_or(WireError::RangeOverflow {
                offset: h.offset,
                range: h.range,
            })?;
        h.check_shape()?;
        Ok(Some(h))
    }

    fn malformed(&self, what: &'static str) -> WireError {
        WireError::Malformed {
            kind: self.kind,
            what,
        }
    }

    /// What each kind requires of the other fields.
    fn check_shape(&self) -> Result<(), WireError> {
        let has_payload = self.payload_len > 0;
        if self.reply {
            // Payloads in replies: OPEN's generation and token (always, when it succeeded),
            // READ's data. The echoed fields (cookie, token, handle) are the requester's to
            // match against what it sent.
            let ok = match self.kind {
                Kind::Open if self.status == 0 => self.payload_len as usize == OPEN_REPLY_BYTES,
                Kind::Read => self.status != 0 || u64::from(self.payload_len) == self.range,
                // A control answer (or the refusal's reason) is a JSON document.
                Kind::Control => self.payload_len as usize <= MAX_CONTROL_BYTES,
                _ => !has_payload,
            };
            if !ok || (self.status != 0 && has_payload && self.kind != Kind::Control) {
                return Err(self.malformed("reply has the wrong payload"));
            }
            return Ok(());
        }
        // Every frame about a volume carries its fencing token; only data operations are
        // ordered by a sequence.
        let about_volume = !matches!(self.kind, Kind::Hello | Kind::Ping | Kind::Control);
        if about_volume && self.token == 0 {
            return Err(self.malformed("carries no fencing token"));
        }
        if !about_volume && self.token != 0 {
            return Err(self.malformed("carries a token"));
        }
        if self.kind.is_data() && self.sequence == 0 {
            return Err(self.malformed("carries no sequence number"));
        }
        if !self.kind.is_data() && self.sequence != 0 {
            return Err(self.malformed("carries a sequence number"));
        }
        match self.kind {
            Kind::Hello | Kind::Open | Kind::Control => {
                if !has_payload {
                    return Err(self.malformed("has no payload"));
                }
                let most = match self.kind {
                    Kind::Hello => MAX_HELLO_BYTES,
                    Kind::Open => MAX_OPEN_BYTES,
                    _ => MAX_CONTROL_BYTES,
                };
                if self.payload_len as usize > most {
                    return Err(self.malformed("has a payload longer than its fields allow"));
                }
                if self.handle != 0 || self.offset != 0 || self.range != 0 {
                    return Err(self.malformed("names a volume handle or range"));
                }
            }
            Kind::Write => {
                if !has_payload || u64::from(self.payload_len) != self.range {
                    return Err(self.malformed("payload length differs from its range"));
                }
            }
            Kind::Zero | Kind::Trim => {
                if has_payload || self.range == 0 {
                    return Err(self.malformed("needs a range and no payload"));
                }
            }
            Kind::Read => {
                if has_payload || self.range == 0 || self.range > u64::from(MAX_PAYLOAD_BYTES) {
                    return Err(self.malformed("needs a range within the limit and no payload"));
                }
            }
            Kind::Flush | Kind::Ping => {
                if has_payload || self.offset != 0 || self.range != 0 {
                    return Err(self.malformed("takes no range or payload"));
                }
                if self.kind == Kind::Ping && self.handle != 0 {
                    return Err(self.malformed("names a volume handle"));
                }
            }
        }
        Ok(())
    }

    /// Checks a received payload against the header's checksum.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), WireError> {
        debug_assert_eq!(payload.len(), self.payload_len as usize);
        if payload.is_empty() {
            return Ok(());
        }
        let actual = crc32c(payload);
        if actual != self.payload_crc {
            return Err(WireError::PayloadChecksum {
                expected: self.payload_crc,
                actual,
            });
        }
        Ok(())
    }
}

/// CRC-32C (Castagnoli), the volume format's checksum too (hardware-accelerated by the crate).
pub fn crc32c(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

/// HELLO's payload: who is calling whom, in which pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub pair: String,
    pub from: String,
    pub to: String,
    /// Which link this connection is: [`CONTROL_LINK`], or the data link of the sender's I/O
    /// worker `n` (`n + 1`). A newer connection of the same link supersedes an older one.
    pub link: u16,
}

/// [`Hello::link`] of the control link.
pub const CONTROL_LINK: u16 = 0;
/// [`Hello::link`] of the owner's resync connection (a data link of its own).
pub const RESYNC_LINK: u16 = u16::MAX - 1;
/// [`Hello::link`] of a connection carrying one golden image to the peer: a CONTROL request
/// (`{"name", "size", "sha256"}`), then the image's raw bytes until the sender shuts its side,
/// then the receiver's CONTROL answer once the image is sealed (digest checked) or refused.
pub const IMAGE_LINK: u16 = u16::MAX - 2;
/// [`Hello::link`] of a connection made for one CONTROL request (many may run at once; none
/// supersedes another).
pub const CONTROL_CALL: u16 = u16::MAX;
/// [`Hello::link`] of the forwarding link of the sender's I/O worker `n`: `FORWARD_LINK + n`.
/// It carries the data operations a client of the sender's (not the volume's owner) asked for,
/// to the owner, which carries them out as its own (`docs/pair.md` §8).
pub const FORWARD_LINK: u16 = 0x8000;
/// [`Hello::link`] of the data link an owner uses to put forwarded operations on the
/// forwarder's replica, one per forwarding connection: `FORWARDED_DATA_LINK + k`, `k` the
/// owner's own number for that connection (below [`MAX_FORWARD_LINKS`]).
pub const FORWARDED_DATA_LINK: u16 = 0xC000;
/// Most I/O workers a node may have forwarding links for (the ranges above must not meet).
pub const MAX_FORWARD_LINKS: u16 = 0x3F00;

// The ranges of link numbers do not meet.
const _: () = assert!(
    FORWARD_LINK + MAX_FORWARD_LINKS <= FORWARDED_DATA_LINK
        && FORWARDED_DATA_LINK + MAX_FORWARD_LINKS < IMAGE_LINK
);

/// What a connection is, from its HELLO's link number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Control,
    ControlCall,
    Image,
    /// Data operations from the owner to this node's replicas: a worker's, the resync's, or
    /// the one carrying forwarded operations back.
    Data,
    /// Operations this node (the owner) carries out for the sender's clients.
    Forward,
}

impl LinkKind {
    pub fn of(link: u16) -> LinkKind {
        match link {
            CONTROL_LINK => LinkKind::Control,
            CONTROL_CALL => LinkKind::ControlCall,
            IMAGE_LINK => LinkKind::Image,
            l if (FORWARD_LINK..FORWARD_LINK + MAX_FORWARD_LINKS).contains(&l) => LinkKind::Forward,
            _ => LinkKind::Data,
        }
    }
}

/// Longest CONTROL payload (request or answer): a JSON document.
pub const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// Bytes of OPEN's reply payload: generation (16) and the highest token seen (8).
pub const OPEN_REPLY_BYTES: usize = 24;
/// Longest HELLO payload: the version, three names of at most 255 bytes, each with its length,
/// and the link.
pub const MAX_HELLO_BYTES: usize = 4 + 3 * 256 + 2;
/// Longest OPEN payload: one name with its length.
pub const MAX_OPEN_BYTES: usize = 256;

fn put_name(out: &mut Vec<u8>, s: &str) {
    let len = u8::try_from(s.len()).expect("names are at most 255 bytes");
    out.push(len);
    out.extend_from_slice(s.as_bytes());
}

/// Reads one length-prefixed name from `b` at `*at`.
fn take_name(b: &[u8], at: &mut usize) -> Result<String, WireError> {
    let len = *b.get(*at).ok_or(WireError::BadPayload("truncated name"))? as usize;
    let bytes = b
        .get(*at + 1..*at + 1 + len)
        .ok_or(WireError::BadPayload("truncated name"))?;
    *at += 1 + len;
    let s = std::str::from_utf8(bytes).map_err(|_| WireError::BadPayload("name is not UTF-8"))?;
    if s.is_empty() || crate::names::validate_name(s).is_err() {
        return Err(WireError::BadPayload("not a valid name"));
    }
    Ok(s.to_owned())
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.version.to_le_bytes().to_vec();
        put_name(&mut out, &self.pair);
        put_name(&mut out, &self.from);
        put_name(&mut out, &self.to);
        out.extend_from_slice(&self.link.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Hello, WireError> {
        let version = b
            .get(..4)
            .map(|v| u32::from_le_bytes(v.try_into().expect("4 bytes")))
            .ok_or(WireError::BadPayload("truncated HELLO"))?;
        let mut at = 4;
        let pair = take_name(b, &mut at)?;
        let from = take_name(b, &mut at)?;
        let to = take_name(b, &mut at)?;
        let link = b
            .get(at..at + 2)
            .map(|v| u16::from_le_bytes([v[0], v[1]]))
            .ok_or(WireError::BadPayload("truncated HELLO"))?;
        if at + 2 != b.len() {
            return Err(WireError::BadPayload("bytes after HELLO"));
        }
        Ok(Hello {
            version,
            pair,
            from,
            to,
            link,
        })
    }
}

/// OPEN's payload: the volume's name.
pub fn encode_open(volume: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_name(&mut out, volume);
    out
}

pub fn decode_open(b: &[u8]) -> Result<String, WireError> {
    let mut at = 0;
    let name = take_name(b, &mut at)?;
    if at != b.len() {
        return Err(WireError::BadPayload("bytes after OPEN's volume name"));
    }
    Ok(name)
}

/// OPEN's reply payload: the replica's current generation and the highest token it has seen.
pub fn encode_open_reply(generation: [u8; 16], token: u64) -> [u8; OPEN_REPLY_BYTES] {
    let mut b = [0u8; OPEN_REPLY_BYTES];
    b[..16].copy_from_slice(&generation);
    b[16..].copy_from_slice(&token.to_le_bytes());
    b
}

pub fn decode_open_reply(b: &[u8]) -> Result<([u8; 16], u64), WireError> {
    if b.len() != OPEN_REPLY_BYTES {
        return Err(WireError::BadPayload("OPEN reply of the wrong length"));
    }
    Ok((b[..16].try_into().expect("16 bytes"), u64_at(b, 16)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(payload: &[u8]) -> Header {
        Header {
            token: 7,
            sequence: 1,
            offset: 4096,
            range: payload.len() as u64,
            handle: 3,
            flags: FLAG_FUA,
            ..Header::request(Kind::Write, 42)
        }
        .with_payload(payload)
    }

    /// NOT_ON_REPLICA is a flag of data replies only: a request or another kind's reply that
    /// carries it is refused.
    #[test]
    fn not_on_replica_is_only_in_data_replies() {
        let data = vec![9u8; 4096];
        let mut r = write(&data).reply_to(0);
        r.flags = FLAG_NOT_ON_REPLICA;
        assert_eq!(Header::decode(&r.encode()), Ok(Some(r)));
        let mut req = write(&data);
        req.flags |= FLAG_NOT_ON_REPLICA;
        assert!(matches!(
            Header::decode(&req.encode()),
            Err(WireError::BadFlags { .. })
        ));
        let mut pong = Header::request(Kind::Ping, 1).reply_to(0);
        pong.flags = FLAG_NOT_ON_REPLICA;
        assert!(matches!(
            Header::decode(&pong.encode()),
            Err(WireError::BadFlags { .. })
        ));
    }

    #[test]
    fn link_numbers_name_their_kind() {
        assert_eq!(LinkKind::of(CONTROL_LINK), LinkKind::Control);
        assert_eq!(LinkKind::of(CONTROL_CALL), LinkKind::ControlCall);
        assert_eq!(LinkKind::of(IMAGE_LINK), LinkKind::Image);
        assert_eq!(LinkKind::of(RESYNC_LINK), LinkKind::Data);
        assert_eq!(LinkKind::of(1), LinkKind::Data);
        assert_eq!(LinkKind::of(FORWARD_LINK), LinkKind::Forward);
        assert_eq!(
            LinkKind::of(FORWARD_LINK + MAX_FORWARD_LINKS - 1),
            LinkKind::Forward
        );
        assert_eq!(LinkKind::of(FORWARDED_DATA_LINK), LinkKind::Data);
    }

    #[test]
    fn headers_round_trip() {
        let data = vec![9u8; 8192];
        let h = write(&data);
        let b = h.encode();
        assert_eq!(Header::decode(&b), Ok(Some(h)));
        assert_eq!(Header::decode(&b[..63]), Ok(None));
        h.check_payload(&data).unwrap();
        let r = h.reply_to(0);
        assert_eq!(Header::decode(&r.encode()), Ok(Some(r)));
        let ping = Header::request(Kind::Ping, 1);
        assert_eq!(Header::decode(&ping.encode()), Ok(Some(ping)));
    }

    /// The header checksum catches any single flipped bit (the checks behind it have their own
    /// test, `malformed_frames_are_refused_by_name`, with valid checksums).
    #[test]
    fn every_flipped_bit_of_a_header_is_refused() {
        let b = write(&[1u8; 512]).encode();
        for i in 0..HEADER_BYTES * 8 {
            let mut c = b;
            c[i / 8] ^= 1 << (i % 8);
            assert!(Header::decode(&c).is_err(), "bit {i} flipped was accepted");
        }
    }

    #[test]
    fn a_payload_that_differs_from_its_checksum_is_refused() {
        let data = vec![5u8; 4096];
        let h = write(&data);
        let mut bad = data.clone();
        bad[100] ^= 0x10;
        assert!(matches!(
            h.check_payload(&bad),
            Err(WireError::PayloadChecksum { .. })
        ));
    }

    /// Shapes a valid checksum cannot excuse: each is refused with a reason.
    #[test]
    fn malformed_frames_are_refused_by_name() {
        let cases: Vec<(Header, &str)> = vec![
            (
                Header {
                    token: 0,
                    ..write(&[1; 512])
                },
                "fencing token",
            ),
            (
                Header {
                    sequence: 0,
                    ..write(&[1; 512])
                },
                "sequence",
            ),
            (
                Header {
                    range: 4096,
                    ..write(&[1; 512])
                },
                "payload length",
            ),
            (
                Header {
                    flags: FLAG_NO_HOLE,
                    ..write(&[1; 512])
                },
                "not allowed",
            ),
            (
                Header {
                    offset: u64::MAX,
                    range: 2,
                    token: 1,
                    sequence: 1,
                    ..Header::request(Kind::Trim, 1)
                },
                "overflows",
            ),
            (
                Header {
                    range: u64::from(MAX_PAYLOAD_BYTES) + 1,
                    token: 1,
                    ..Header::request(Kind::Read, 1)
                },
                "within the limit",
            ),
            (
                Header {
                    range: 4096,
                    ..Header::request(Kind::Read, 1)
                },
                "fencing token",
            ),
            (
                Header {
                    token: 1,
                    sequence: 3,
                    ..Header::request(Kind::Open, 1)
                }
                .with_payload(&encode_open("v")),
                "sequence",
            ),
            (
                Header::request(Kind::Open, 1).with_payload(&encode_open("v")),
                "fencing token",
            ),
            (
                Header {
                    token: 1,
                    ..Header::request(Kind::Open, 1)
                }
                .with_payload(&[1u8; 300]),
                "longer than its fields allow",
            ),
            (
                Header {
                    token: 1,
                    ..Header::request(Kind::Open, 1)
                }
                .with_payload(&encode_open("v"))
                .reply_to(0),
                "wrong payload",
            ),
            (
                Header {
                    handle: 1,
                    ..Header::request(Kind::Ping, 1)
                },
                "handle",
            ),
            (Header::request(Kind::Hello, 1), "no payload"),
        ];
        for (h, why) in cases {
            let e = Header::decode(&h.encode()).unwrap_err().to_string();
            assert!(e.contains(why), "{h:?}: {e} (expected {why:?})");
        }
        let mut b = Header::request(Kind::Ping, 1).encode();
        b[6] = 1;
        let crc = crc32c(&b[..60]);
        b[60..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Header::decode(&b), Err(WireError::StatusInRequest(1)));
    }

    #[test]
    fn hello_and_open_payloads_round_trip_and_refuse_garbage() {
        let h = Hello {
            version: VERSION,
            pair: "p1".into(),
            from: "a".into(),
            to: "b".into(),
            link: 0,
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h.clone()));
        let mut long = h.encode();
        long.push(0);
        assert!(Hello::decode(&long).is_err());
        assert!(Hello::decode(&h.encode()[..6]).is_err());
        assert_eq!(decode_open(&encode_open("vol-1")), Ok("vol-1".into()));
        assert!(decode_open(&[3, b'.', b'.', b'/']).is_err(), "not a name");
        assert!(decode_open(&[0]).is_err(), "empty name");
        let r = encode_open_reply([7; 16], 9);
        assert_eq!(decode_open_reply(&r), Ok(([7; 16], 9)));
        assert!(decode_open_reply(&r[..23]).is_err());
    }
}
