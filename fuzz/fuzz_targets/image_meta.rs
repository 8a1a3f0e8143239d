//! Golden image metadata from arbitrary bytes: decoding never panics, and whatever decodes
//! re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume_format::ImageInfo;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = ImageInfo::decode(data) {
        assert_eq!(info.encode(), data);
    }
});
