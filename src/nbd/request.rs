//! Transmission-phase requests: parsing the header, and deciding what the request asks for or which
//! error it gets. Pure: the connection driver does the I/O.

use super::handshake::ReplyMode;
use super::wire::*;

/// What a connection negotiated, as the request decoder needs it.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub mode: ReplyMode,
    pub transmission_flags: u16,
    pub size_bytes: u64,
    /// Largest payload accepted (advertised as the maximum block size).
    pub max_payload_bytes: u32,
    pub base_allocation: bool,
    /// Offsets and lengths must be multiples of this (1: anything goes); see
    /// `Negotiated::block_min`.
    pub block_min: u32,
    /// The client agreed to the advertised block sizes, the maximum payload included.
    pub sizes_agreed: bool,
}

impl Session {
    fn has(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }
}

/// A request header as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

/// Result of looking for a request header at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    Incomplete,
    /// A header, and how many bytes it took.
    Header(RequestHeader, usize),
    /// The stream is not NBD requests: the connection must be dropped.
    BadMagic(u32),
}

/// Bytes of one request header: extended sessions use 32-byte headers.
pub fn header_bytes(mode: ReplyMode) -> usize {
    if mode == ReplyMode::Extended {
        EXTENDED_REQUEST_BYTES
    } else {
        COMPACT_REQUEST_BYTES
    }
}

/// Parses the header at the front of `buf`.
pub fn parse_header(buf: &[u8], mode: ReplyMode) -> Parse {
    let extended = mode == ReplyMode::Extended;
    let need = header_bytes(mode);
    let Some(b) = buf.get(..need) else {
        return Parse::Incomplete;
    };
    let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let be32 = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    let be64 = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
    let magic = be32(0);
    let expected = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != expected {
        return Parse::BadMagic(magic);
    }
    let length = if extended {
        be64(24)
    } else {
        u64::from(be32(24))
    };
    Parse::Header(
        RequestHeader {
            flags: be16(4),
            kind: be16(6),
            cookie: be64(8),
            offset: be64(16),
            length,
        },
        need,
    )
}

/// A valid request, ready to be carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        may_trim: bool,
        fast: bool,
    },
    Cache {
        offset: u64,
        len: u64,
    },
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
    },
    Disc,
}

/// Why a request is answered with an error without being carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: NbdErrno,
    pub why: &'static str,
}

fn reject(errno: NbdErrno, why: &'static str) -> Result<Command, Rejection> {
    Err(Rejection { errno, why })
}

/// A decoded request: what to do, and how many payload bytes follow the header on the wire
/// (they must be consumed whether or not the request is carried out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub cookie: u64,
    pub offset: u64,
    pub payload_bytes: u64,
    pub is_read: bool,
    pub outcome: Result<Command, Rejection>,
}

/// A breach after which the byte stream cannot be trusted: the connection is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
    #[error("payload of {0} bytes exceeds the advertised maximum")]
    PayloadTooLarge(u64),
}

/// Flags each command may carry.
fn allowed_flags(kind: u16, s: &Session) -> u16 {
    let payload = if s.mode == ReplyMode::Extended {
        CMD_FLAG_PAYLOAD_LEN
    } else {
        0
    };
    // FUA is valid on every command once SEND_FUA is advertised: the spec says the server MUST
    // accept it everywhere, even if it means nothing (READ, CACHE, BLOCK_STATUS).
    let fua = if s.has(TF_SEND_FUA) { CMD_FLAG_FUA } else { 0 };
    match kind {
        CMD_READ if s.mode != ReplyMode::Simple => CMD_FLAG_DF | fua,
        CMD_WRITE => fua | payload,
        CMD_WRITE_ZEROES => {
            let fast = if s.has(TF_SEND_FAST_ZERO) {
                CMD_FLAG_FAST_ZERO
            } else {
                0
            };
            fua | CMD_FLAG_NO_HOLE | fast
        }
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE | fua,
        _ => fua,
    }
}

/// Decides what a request asks for, or why it is refused.
pub fn decode(h: &RequestHeader, s: &Session) -> Result<Request, Violation> {
    let extended = s.mode == ReplyMode::Extended;
    // A write always carries its payload. The extended-headers draft says clients MUST also set
    // PAYLOAD_LEN on writes, but qemu 10's client does not (its server does not require it), so the
    // flag is honoured as a payload marker on other commands only.
    let payload_bytes = match (extended, h.kind) {
        (_, CMD_WRITE) => h.length,
        (true, _) if h.flags & CMD_FLAG_PAYLOAD_LEN != 0 => h.length,
        _ => 0,
    };
    // The extended-headers spec asks for a hard disconnect past the advertised or default
    // maximum rather than draining. The advertised one binds only a client that agreed to block
    // sizes; any other may assume the default (32 MiB), and the spec says a server stricter than
    // that MUST cleanly error what falls outside: such a payload is drained and refused (EINVAL).
    let hard_limit = if s.sizes_agreed {
        s.max_payload_bytes
    } else {
        s.max_payload_bytes.max(DEFAULT_MAX_PAYLOAD_BYTES)
    };
    if extended && payload_bytes > u64::from(hard_limit) {
        return Err(Violation::PayloadTooLarge(payload_bytes));
    }
    let outcome = command(h, s, payload_bytes);
    Ok(Request {
        cookie: h.cookie,
        offset: h.offset,
        payload_bytes,
        is_read: h.kind == CMD_READ,
        outcome,
    })
}

fn command(h: &RequestHeader, s: &Session, payload_bytes: u64) -> Result<Command, Rejection> {
    use NbdErrno::*;
    let known = matches!(
        h.kind,
        CMD_READ
            | CMD_WRITE
            | CMD_DISC
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    );
    if !known {
        return reject(Inval, "unknown command");
    }
    if h.kind == CMD_DISC {
        // DISC has no reply, so nothing about it can be refused: whatever its flags, the client
        // is done and the connection ends once everything before it is answered.
        return Ok(Command::Disc);
    }
    if h.flags & !allowed_flags(h.kind, s) != 0 {
        return reject(Inval, "flag not valid for this command");
    }
    if h.kind != CMD_WRITE && payload_bytes != 0 {
        return reject(Inval, "command takes no payload");
    }
    let flag = |f: u16| h.flags & f != 0;
    let (offset, len) = (h.offset, h.length);
    let end = offset.checked_add(len);
    let in_range = end.is_some_and(|e| e <= s.size_bytes);
    let writes = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.has(TF_READ_ONLY) {
        return reject(Perm, "export is read-only");
    }
    // The spec: the server SHOULD answer EINVAL to a request not aligned to the minimum block
    // size (every request with an offset and a length, block status included). Only clients that
    // agreed to one have a minimum above 1 here. Targets advertise a minimum that divides the
    // export size; should one not, a request that ends at the end of the export still passes,
    // so the tail stays reachable. FLUSH has no range.
    let aligned = s.block_min <= 1
        || (offset.is_multiple_of(u64::from(s.block_min))
            && (len.is_multiple_of(u64::from(s.block_min)) || end == Some(s.size_bytes)));
    if !aligned && h.kind != CMD_FLUSH {
        return reject(Inval, "request not aligned to the minimum block size");
    }
    match h.kind {
        CMD_DISC => unreachable!("handled above"),
        // Offset and length of FLUSH are reserved; a client that fills them in is not harmed.
        CMD_FLUSH => Ok(Command::Flush),
        CMD_READ => {
            if len > u64::from(s.max_payload_bytes) {
                // EOVERFLOW is for reads whose reply the server could not send unfragmented
                // (structured replies, DF supported); for simple replies the spec keeps it out.
                let errno = if s.mode == ReplyMode::Simple {
                    Inval
                } else {
                    Overflow
                };
                return reject(errno, "read longer than the maximum block size");
            }
            if !in_range {
                return reject(Inval, "read beyond the end of the export");
            }
            Ok(Command::Read {
                offset,
                len: len as u32,
                df: flag(CMD_FLAG_DF),
            })
        }
        CMD_WRITE => {
            if len > u64::from(s.max_payload_bytes) {
                // The spec: "SHOULD NOT return NBD_EOVERFLOW except" for reads with DF support and
                // for commands without payload, so an oversized write is EINVAL (its payload is
                // drained by the caller).
                return reject(Inval, "write longer than the maximum block size");
            }
            if !in_range {
                return reject(NoSpc, "write beyond the end of the export");
            }
            Ok(Command::Write {
                offset,
                len: len as u32,
                fua: flag(CMD_FLAG_FUA),
            })
        }
        CMD_TRIM => {
            if !s.has(TF_SEND_TRIM) {
                return reject(Inval, "trim not supported by this export");
            }
            if !in_range {
                return reject(Inval, "trim beyond the end of the export");
            }
            Ok(Command::Trim {
                offset,
                len,
                fua: flag(CMD_FLAG_FUA),
            })
        }
        CMD_WRITE_ZEROES => {
            if !s.has(TF_SEND_WRITE_ZEROES) {
                return reject(Inval, "write zeroes not supported by this export");
            }
            if !in_range {
                return reject(NoSpc, "write zeroes beyond the end of the export");
            }
            Ok(Command::WriteZeroes {
                offset,
                len,
                fua: flag(CMD_FLAG_FUA),
                may_trim: !flag(CMD_FLAG_NO_HOLE),
                fast: flag(CMD_FLAG_FAST_ZERO),
            })
        }
        CMD_CACHE => {
            if !in_range {
                return reject(Inval, "cache beyond the end of the export");
            }
            Ok(Command::Cache { offset, len })
        }
        CMD_BLOCK_STATUS => {
            if !s.base_allocation {
                return reject(Inval, "no metadata context was negotiated");
            }
            if !in_range {
                return reject(Inval, "block status beyond the end of the export");
            }
            if len == 0 {
                // The spec leaves a zero-length query unspecified; no descriptor could describe
                // it (each is at least one byte and none may exceed the request), so it is
                // refused, as qemu-nbd does.
                return reject(Inval, "block status of zero length");
            }
            Ok(Command::BlockStatus {
                offset,
                len,
                req_one: flag(CMD_FLAG_REQ_ONE),
            })
        }
        _ => unreachable!("filtered by `known` above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(mode: ReplyMode) -> Session {
        Session {
            mode,
            transmission_flags: TF_HAS_FLAGS
                | TF_SEND_FLUSH
                | TF_SEND_FUA
                | TF_SEND_TRIM
                | TF_SEND_WRITE_ZEROES
                | TF_SEND_FAST_ZERO
                | TF_SEND_DF,
            size_bytes: 1 << 20,
            max_payload_bytes: 64 * 1024,
            base_allocation: true,
            block_min: 1,
            sizes_agreed: true,
        }
    }
    fn compact(flags: u16, kind: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }
    fn decode_bytes(b: &[u8], s: &Session) -> Result<Request, Violation> {
        match parse_header(b, s.mode) {
            Parse::Header(h, n) => {
                assert_eq!(n, b.len());
                decode(&h, s)
            }
            other => panic!("{other:?}"),
        }
    }
    fn errno(b: &[u8], s: &Session) -> NbdErrno {
        decode_bytes(b, s).unwrap().outcome.unwrap_err().errno
    }

    #[test]
    fn header_needs_all_bytes_and_checks_magic() {
        let b = compact(0, CMD_READ, 0, 512);
        assert_eq!(parse_header(&b[..27], ReplyMode::Simple), Parse::Incomplete);
        let mut bad = b.clone();
        bad[0] = 0;
        assert!(matches!(
            parse_header(&bad, ReplyMode::Simple),
            Parse::BadMagic(_)
        ));
        // A compact request on an extended session is a magic mismatch.
        let mut ext = b.clone();
        ext.extend_from_slice(&[0; 4]);
        assert!(matches!(
            parse_header(&ext, ReplyMode::Extended),
            Parse::BadMagic(_)
        ));
    }

    #[test]
    fn ranges_map_to_the_spec_errors() {
        let s = session(ReplyMode::Structured);
        assert_eq!(
            errno(&compact(0, CMD_READ, (1 << 20) - 10, 512), &s),
            NbdErrno::Inval
        );
        assert_eq!(
            errno(&compact(0, CMD_WRITE, 1 << 20, 512), &s),
            NbdErrno::NoSpc
        );
        assert_eq!(
            errno(&compact(0, CMD_WRITE_ZEROES, 1 << 20, 512), &s),
            NbdErrno::NoSpc
        );
        assert_eq!(
            errno(&compact(0, CMD_TRIM, u64::MAX, 512), &s),
            NbdErrno::Inval
        );
        assert_eq!(errno(&compact(0, 42, 0, 0), &s), NbdErrno::Inval);
        // Too long: EOVERFLOW where DF exists, EINVAL with simple replies.
        assert_eq!(
            errno(&compact(0, CMD_READ, 0, u32::MAX), &s),
            NbdErrno::Overflow
        );
        assert_eq!(
            errno(
                &compact(0, CMD_READ, 0, u32::MAX),
                &session(ReplyMode::Simple)
            ),
            NbdErrno::Inval
        );
    }

    #[test]
    fn unaligned_requests_are_einval_only_under_an_agreed_minimum() {
        let mut s = session(ReplyMode::Structured);
        s.size_bytes = (1 << 20) + 512;
        let unaligned = [
            compact(0, CMD_READ, 512, 4096),
            compact(0, CMD_READ, 4096, 100),
            compact(0, CMD_WRITE, 1, 4096),
            compact(0, CMD_TRIM, 0, 4097),
            compact(0, CMD_WRITE_ZEROES, 2048, 4096),
            compact(0, CMD_BLOCK_STATUS, 100, 1000),
        ];
        // Anything goes when no minimum was agreed.
        for r in &unaligned {
            assert!(decode_bytes(r, &s).unwrap().outcome.is_ok());
        }
        s.block_min = 4096;
        for r in &unaligned {
            let req = decode_bytes(r, &s).unwrap();
            assert_eq!(req.outcome.unwrap_err().errno, NbdErrno::Inval);
        }
        // A refused write still declares its payload, so the caller drains it.
        assert_eq!(
            decode_bytes(&compact(0, CMD_WRITE, 1, 4096), &s)
                .unwrap()
                .payload_bytes,
            4096
        );
        // Aligned requests, the unaligned tail of the export and flush pass.
        for r in [
            compact(0, CMD_READ, 8192, 4096),
            compact(0, CMD_READ, 1 << 20, 512),
            compact(0, CMD_WRITE, (1 << 20) - 4096, 4608),
            compact(0, CMD_BLOCK_STATUS, 4096, 8192),
            compact(0, CMD_FLUSH, 7, 3),
        ] {
            assert!(decode_bytes(&r, &s).unwrap().outcome.is_ok(), "{r:?}");
        }
    }

    #[test]
    fn zero_length_block_status_is_einval() {
        let s = session(ReplyMode::Structured);
        let r = decode_bytes(&compact(0, CMD_BLOCK_STATUS, 4096, 0), &s).unwrap();
        assert_eq!(r.outcome.unwrap_err().errno, NbdErrno::Inval);
    }

    #[test]
    fn oversized_compact_write_is_refused_but_payload_is_drained() {
        let s = session(ReplyMode::Simple);
        let r = decode_bytes(&compact(0, CMD_WRITE, 0, u32::MAX), &s).unwrap();
        assert_eq!(r.payload_bytes, u64::from(u32::MAX));
        assert_eq!(r.outcome.unwrap_err().errno, NbdErrno::Inval);
    }

    #[test]
    fn flags_are_checked_per_command() {
        let s = session(ReplyMode::Simple);
        // DF needs structured replies.
        assert_eq!(
            errno(&compact(CMD_FLAG_DF, CMD_READ, 0, 512), &s),
            NbdErrno::Inval
        );
        let s = session(ReplyMode::Structured);
        assert!(
            decode_bytes(&compact(CMD_FLAG_DF, CMD_READ, 0, 512), &s)
                .unwrap()
                .outcome
                .is_ok()
        );
        // FUA is accepted on every command (SEND_FUA is advertised), and ignored where it means
        // nothing.
        for kind in [CMD_READ, CMD_FLUSH, CMD_CACHE, CMD_BLOCK_STATUS, CMD_TRIM] {
            let r = decode_bytes(&compact(CMD_FLAG_FUA, kind, 0, 512), &s).unwrap();
            assert!(r.outcome.is_ok(), "FUA on command {kind}");
        }
        let mut no_fua = s;
        no_fua.transmission_flags &= !TF_SEND_FUA;
        assert_eq!(
            errno(&compact(CMD_FLAG_FUA, CMD_READ, 0, 512), &no_fua),
            NbdErrno::Inval
        );
        // DISC is never refused: it has no reply.
        let disc = decode_bytes(&compact(0xffff, CMD_DISC, 7, 9), &s).unwrap();
        assert_eq!(disc.outcome, Ok(Command::Disc));
        assert_eq!(
            errno(&compact(1 << 9, CMD_WRITE, 0, 512), &s),
            NbdErrno::Inval
        );
        let zero = decode_bytes(
            &compact(
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_WRITE_ZEROES,
                0,
                512,
            ),
            &s,
        )
        .unwrap()
        .outcome
        .unwrap();
        assert_eq!(
            zero,
            Command::WriteZeroes {
                offset: 0,
                len: 512,
                fua: false,
                may_trim: false,
                fast: true
            }
        );
    }

    #[test]
    fn read_only_refuses_writes_with_eperm() {
        let mut s = session(ReplyMode::Structured);
        s.transmission_flags |= TF_READ_ONLY;
        assert_eq!(errno(&compact(0, CMD_WRITE, 0, 512), &s), NbdErrno::Perm);
        assert_eq!(errno(&compact(0, CMD_TRIM, 0, 512), &s), NbdErrno::Perm);
        assert!(
            decode_bytes(&compact(0, CMD_READ, 0, 512), &s)
                .unwrap()
                .outcome
                .is_ok()
        );
    }

    #[test]
    fn block_status_needs_a_context() {
        let mut s = session(ReplyMode::Structured);
        s.base_allocation = false;
        assert_eq!(
            errno(&compact(0, CMD_BLOCK_STATUS, 0, 512), &s),
            NbdErrno::Inval
        );
    }

    #[test]
    fn extended_requests_carry_payload_length_flag() {
        let s = session(ReplyMode::Extended);
        let ext = |flags: u16, kind: u16, len: u64| {
            let mut v = EXTENDED_REQUEST_MAGIC.to_be_bytes().to_vec();
            v.extend_from_slice(&flags.to_be_bytes());
            v.extend_from_slice(&kind.to_be_bytes());
            v.extend_from_slice(&9u64.to_be_bytes());
            v.extend_from_slice(&4096u64.to_be_bytes());
            v.extend_from_slice(&len.to_be_bytes());
            v
        };
        let r = decode_bytes(&ext(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 512), &s).unwrap();
        assert_eq!(r.payload_bytes, 512);
        assert!(r.outcome.is_ok());
        // qemu 10 sends extended writes without the flag: the payload still follows.
        let r = decode_bytes(&ext(0, CMD_WRITE, 512), &s).unwrap();
        assert_eq!(r.payload_bytes, 512);
        assert!(r.outcome.is_ok());
        // A 64-bit effect length on a trim is fine when in range.
        let r = decode_bytes(&ext(0, CMD_TRIM, 8192), &s).unwrap();
        assert_eq!(
            r.outcome.unwrap(),
            Command::Trim {
                offset: 4096,
                len: 8192,
                fua: false
            }
        );
        // A payload on a read is drained and refused.
        let r = decode_bytes(&ext(CMD_FLAG_PAYLOAD_LEN, CMD_READ, 16), &s).unwrap();
        assert_eq!(r.payload_bytes, 16);
        assert_eq!(r.outcome.unwrap_err().errno, NbdErrno::Inval);
        // Past the advertised maximum (64 KiB here), a client that agreed to it is cut off.
        assert_eq!(
            decode_bytes(&ext(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1 << 17), &s),
            Err(Violation::PayloadTooLarge(1 << 17))
        );
        assert_eq!(
            decode_bytes(&ext(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1 << 40), &s),
            Err(Violation::PayloadTooLarge(1 << 40))
        );
        // A client that did not agree may assume the default maximum of 32 MiB: up to there a
        // larger write is drained and refused, past it the connection ends.
        let s = Session {
            sizes_agreed: false,
            ..s
        };
        let r = decode_bytes(&ext(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1 << 17), &s).unwrap();
        assert_eq!(r.payload_bytes, 1 << 17);
        assert_eq!(r.outcome.unwrap_err().errno, NbdErrno::Inval);
        let r = decode_bytes(&ext(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, 1 << 25), &s).unwrap();
        assert_eq!(r.outcome.unwrap_err().errno, NbdErrno::Inval);
        assert_eq!(
            decode_bytes(&ext(CMD_FLAG_PAYLOAD_LEN, CMD_WRITE, (1 << 25) + 1), &s),
            Err(Violation::PayloadTooLarge((1 << 25) + 1))
        );
    }
}
