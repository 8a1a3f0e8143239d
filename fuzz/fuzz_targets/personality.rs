//! Personality files (TOML or JSON) from operators: any bytes give a personality or an error
//! naming the problem, never a panic; what is accepted renders NoCloud documents that are valid
//! JSON (hence YAML) and survives a round trip through its stored form unchanged. The same bytes
//! as an IP pool (JSON, as `ip_pool_create` carries it): validation never panics (a /32 pool
//! once overflowed a shift), and a valid pool hands out an address of its own range.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;

use streamer::personality::ippool::IpPool;
use streamer::personality::{Personality, validate_cidr};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(pool) = serde_json::from_str::<IpPool>(text)
        && pool.validate().is_ok()
    {
        let first = pool.next_free(&BTreeSet::new());
        if let Some(a) = first {
            let ip = validate_cidr(&a).expect("a pool hands out ADDR/PREFIX");
            assert!(pool.in_range(ip), "{a} outside {pool:?}");
        }
    }
    let Ok(p) = Personality::parse(text) else {
        return;
    };
    let n = p.nocloud();
    for doc in [&n.meta_data, &n.network_config] {
        serde_json::from_str::<serde_json::Value>(doc).expect("valid JSON");
    }
    let body = n.user_data.strip_prefix("#cloud-config\n").expect("header");
    serde_json::from_str::<serde_json::Value>(body).expect("valid JSON");
    let stored = serde_json::to_string(&p).unwrap();
    let back: Personality = serde_json::from_str(&stored).expect("the stored form reads back");
    assert_eq!(back, p);
    back.validate().expect("still valid");
});
