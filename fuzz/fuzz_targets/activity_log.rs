//! A pair volume's activity log slots (on-disk bytes, read after a crash): any bytes give a log
//! or an error naming the problem, never a panic; a log decoded names strictly ascending
//! extents, at most a slot's worth, and the ranges it gives lie inside the volume.
#![no_main]

use libfuzzer_sys::fuzz_target;

use streamer::target::activity;

fuzz_target!(|data: &[u8]| {
    let Ok(log) = activity::decode(data) else {
        return;
    };
    assert!(log.sequence > 0);
    assert!(log.extents.len() <= activity::HARD_EXTENTS);
    let size = u64::from(u32::from_le_bytes([
        data[0] ^ data[8],
        data[1],
        data[2],
        data[3] & 0x3f,
    ])) * 4096
        + 4096;
    let mut end = 0;
    for (offset, len) in log.ranges(size) {
        assert!(offset >= end && len > 0 && offset + len <= size);
        end = offset + len;
    }
});
