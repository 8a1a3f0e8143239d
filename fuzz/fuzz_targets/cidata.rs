//! Golden images' partition tables (outside input: an operator imports any image): any bytes
//! as a disk give a `CIDATA` partition, none, or an error naming the problem, never a panic;
//! a partition found lies inside the disk, and writing a seed into it changes only blocks of
//! that partition (whatever its FAT holds).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;

use streamer::personality::NoCloud;
use streamer::personality::cidata;

fuzz_target!(|data: &[u8]| {
    let mut disk = Cursor::new(data.to_vec());
    let Ok(Some(p)) = cidata::find(&mut disk) else {
        return;
    };
    assert!(p.start.checked_add(p.len).is_some_and(|end| end <= data.len() as u64));
    let docs = NoCloud {
        meta_data: "{\"instance-id\": \"i-1\"}\n".into(),
        user_data: "#cloud-config\n{}\n".into(),
        network_config: "{\"version\": 2}\n".into(),
    };
    if let Ok(Some((q, blocks))) = cidata::seed_blocks(&mut disk, &docs) {
        assert_eq!(p, q);
        for (at, b) in blocks {
            let first = p.start - p.start % 4096;
            assert!(at >= first && at < p.start + p.len, "block {at} outside {p:?}");
            assert_eq!(b.len(), 4096);
        }
    }
});
