//! Management request parsing on arbitrary bytes: a request or a message, never a panic; an
//! accepted request survives a round trip through its own encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamer::mgmt::protocol::{Envelope, PROTOCOL_VERSION, parse_request};

fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(request) => {
            let line = serde_json::to_vec(&Envelope {
                version: PROTOCOL_VERSION,
                request: request.clone(),
            })
            .expect("a parsed request encodes");
            assert_eq!(parse_request(&line).expect("re-parses"), request);
        }
        Err(message) => assert!(!message.is_empty()),
    }
});
