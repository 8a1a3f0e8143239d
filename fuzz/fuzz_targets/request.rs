//! Transmission request parsing and validation on arbitrary bytes, and reply encoding of whatever
//! was accepted: no panic, lengths and ranges always consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamer::nbd::handshake::ReplyMode;
use streamer::nbd::reply::{ReplyBuilder, Segment};
use streamer::nbd::request::{Command, Parse, Session, decode, parse_header};

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let mode = match data[0] % 3 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let session = Session {
        mode,
        transmission_flags: u16::from_be_bytes([data[1], data[2]]),
        size_bytes: u64::from(u32::from_be_bytes(data[3..7].try_into().unwrap())) << (data[7] % 24),
        max_payload_bytes: 4096u32 << (data[8] % 14),
        base_allocation: data[9] & 1 == 1,
        block_min: 1 << (data[10] % 13),
        sizes_agreed: data[10] & 0x80 != 0,
    };
    let mut rest = &data[12..];
    let mut header = Vec::new();
    let mut segments = Vec::new();
    while let Parse::Header(h, n) = parse_header(rest, mode) {
        assert!(n <= rest.len());
        rest = &rest[n..];
        let Ok(req) = decode(&h, &session) else { break };
        header.clear();
        segments.clear();
        let mut b = ReplyBuilder {
            mode,
            cookie: req.cookie,
            offset: req.offset,
            header: &mut header,
            segments: &mut segments,
        };
        match req.outcome {
            Ok(Command::Read { offset, len, df }) => {
                assert!(offset + u64::from(len) <= session.size_bytes);
                assert!(offset.is_multiple_of(u64::from(session.block_min)));
                assert!(len <= session.max_payload_bytes);
                // Encode a read reply over (a prefix of) the remaining fuzz bytes.
                let len = (len as usize).min(rest.len());
                b.read(&rest[..len], df);
                let mut data_bytes = 0u64;
                for s in &segments {
                    if let Segment::Data { start, len: n } = *s {
                        assert!(
                            start as usize + n as usize <= len,
                            "data segment beyond the read"
                        );
                        data_bytes += u64::from(n);
                    }
                }
                assert!(data_bytes <= len as u64);
            }
            Ok(Command::Write { offset, len, .. }) => {
                assert!(offset + u64::from(len) <= session.size_bytes);
                assert!(offset.is_multiple_of(u64::from(session.block_min)));
                assert_eq!(req.payload_bytes, u64::from(len));
                b.ok();
            }
            Ok(Command::BlockStatus { .. }) => b.block_status(1, &[(4096, 0), (1 << 33, 3)]),
            Ok(_) => b.ok(),
            Err(r) => b.error(r.errno, r.why),
        }
        for s in &segments {
            if let Segment::Header { start, len } = s {
                assert!((*start as usize + *len as usize) <= header.len());
            }
        }
    }
});
