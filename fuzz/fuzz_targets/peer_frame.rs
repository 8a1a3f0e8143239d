//! The peer link's frame decoder on arbitrary bytes, as a stream of frames: it must never
//! panic; a header it accepts must encode back to the same bytes (nothing is silently
//! normalised); a payload is accepted only with its checksum; HELLO and OPEN payloads decode or
//! are refused, and what decodes encodes back identically.
//!
//! Random bytes almost never carry a valid CRC, which would stop every input at the first
//! check: the first input byte says whether to fix each frame's header and payload checksums
//! before decoding, so the checks behind them are reached too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamer::peer::control;
use streamer::peer::wire::{self, HEADER_BYTES, Header, Hello, Kind};

/// Writes valid checksums into the frame at the start of `b` (as far as it is there).
fn fix_checksums(b: &mut [u8], header: bool, payload: bool) {
    if b.len() < HEADER_BYTES {
        return;
    }
    let len = u32::from_le_bytes(b[52..56].try_into().unwrap()) as usize;
    if payload && len > 0 && b.len() >= HEADER_BYTES + len {
        let crc = wire::crc32c(&b[HEADER_BYTES..HEADER_BYTES + len]);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
    }
    if header {
        let crc = wire::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let mut owned = input.to_vec();
    let mut at = 0;
    loop {
        fix_checksums(&mut owned[at..], mode & 1 != 0, mode & 2 != 0);
        let rest = &owned[at..];
        let h = match Header::decode(rest) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => return,
        };
        assert_eq!(&h.encode()[..], &rest[..HEADER_BYTES], "re-encoded differently");
        let Some(payload) = rest.get(HEADER_BYTES..HEADER_BYTES + h.payload_len as usize) else {
            return;
        };
        at += HEADER_BYTES + payload.len();
        if h.check_payload(payload).is_err() {
            return;
        }
        if h.reply {
            if h.kind == Kind::Open && !payload.is_empty() {
                let (generation, token) = wire::decode_open_reply(payload).expect("length checked");
                assert_eq!(&wire::encode_open_reply(generation, token)[..], payload);
            }
            continue;
        }
        match h.kind {
            Kind::Hello => {
                if let Ok(hello) = Hello::decode(payload) {
                    assert_eq!(hello.encode(), payload);
                }
            }
            Kind::Open => {
                if let Ok(name) = wire::decode_open(payload) {
                    assert_eq!(wire::encode_open(&name), payload);
                }
            }
            Kind::Control => {
                assert!(!payload.is_empty() && payload.len() <= wire::MAX_CONTROL_BYTES);
                // What a control call or an image link carries is decoded before anyone acts.
                if let Ok(r) = control::ControlRequest::decode(payload) {
                    assert_eq!(control::ControlRequest::decode(&r.encode()), Ok(r));
                }
                if let Ok(r) = control::ImageRequest::decode(payload) {
                    assert_eq!(control::ImageRequest::decode(&r.encode()), Ok(r));
                }
                let _ = control::decode_checksums(payload, payload.len() % 1025);
                // The answer to `generations`.
                if let Ok(g) = streamer::peer::generations::Generations::decode(payload) {
                    assert_eq!(
                        streamer::peer::generations::Generations::decode(&g.encode()),
                        Ok(g)
                    );
                }
            }
            _ => assert_eq!(payload.len() as u64, if h.kind == Kind::Write { h.range } else { 0 }),
        }
    }
});
