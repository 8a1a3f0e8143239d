//! The handshake state machine on arbitrary client bytes, fed in arbitrary pieces. It must never
//! panic, never claim to consume more than it was given, and every reply it writes must be a
//! well-formed option reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamer::nbd::handshake::{ExportInfo, ExportLookup, Handshake, Step};
use streamer::nbd::wire::OPTION_REPLY_MAGIC;

struct OneExport;

impl ExportLookup for OneExport {
    type Export = ();
    fn lookup(&self, name: &str) -> Option<((), ExportInfo)> {
        (name == "disk" || name.is_empty()).then(|| {
            (
                (),
                ExportInfo {
                    name: "disk".into(),
                    size_bytes: 1 << 30,
                    description: "fuzz".into(),
                    read_only: false,
                    can_trim: true,
                    can_zero: true,
                    can_fast_zero: true,
                    can_cache: true,
                    can_multi_conn: true,
                    block_min: 1,
                    block_preferred: 4096,
                    block_max: 1 << 25,
                },
            )
        })
    }
    fn for_each(&self, f: &mut dyn FnMut(&str, &str)) {
        f("disk", "fuzz")
    }
}

fn check_replies(mut out: &[u8]) {
    // Skip the fixed-size EXPORT_NAME answer if present: it is not an option reply.
    while out.len() >= 20 {
        let magic = u64::from_be_bytes(out[..8].try_into().unwrap());
        if magic != OPTION_REPLY_MAGIC {
            assert!(
                out.len() == 10 || out.len() == 134,
                "stray output bytes: {}",
                out.len()
            );
            return;
        }
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(out.len() >= 20 + len, "reply shorter than its length field");
        out = &out[20 + len..];
    }
    assert!(
        out.is_empty() || out.len() == 10,
        "trailing {} bytes",
        out.len()
    );
}

fuzz_target!(|data: &[u8]| {
    // First byte chooses how the input is cut into pieces, as a socket would deliver it.
    let Some((&cut, input)) = data.split_first() else {
        return;
    };
    let piece = usize::from(cut).max(1);
    let mut hs = Handshake::new();
    let mut buffered: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for chunk in input.chunks(piece) {
        buffered.extend_from_slice(chunk);
        let (used, step) = hs.advance(&buffered, &OneExport, &mut out);
        assert!(used <= buffered.len());
        buffered.drain(..used);
        match step {
            Step::NeedMore => {}
            // Replies pile up unread: the client reads them, and the options left in `buffered`
            // are fed again with the next chunk.
            Step::Paused => {
                check_replies(&out);
                out.clear();
            }
            Step::Close(_) | Step::Transmission(_) => break,
        }
    }
    check_replies(&out);
});
