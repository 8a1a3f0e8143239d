//! Management request parsing on arbitrary bytes: a request or a message, never a panic; an
//! accepted request survives a round trip through its own encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamer::mgmt::protocol::{Envelope, PROTOCOL_VERSION, Request, parse_request, parse_sha256};

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(request) => {
            let line = serde_json::to_vec(&Envelope {
                version: PROTOCOL_VERSION,
                request: request.clone(),
            })
            .expect("a parsed request encodes");
            assert_eq!(parse_request(&line).expect("re-parses"), request);
            // An import's expected digest: 32 bytes that print back as the same digits.
            if let Request::ImageImport { sha256: Some(h), .. } = &request
                && let Ok(d) = parse_sha256(h)
            {
                let back: String = d.iter().map(|b| format!("{b:02x}")).collect();
                assert_eq!(back, h.to_ascii_lowercase());
            }
        }
        Err(message) => assert!(!message.is_empty()),
    }
});
