//! Deployment plans (TOML or JSON) from operators: any bytes give a plan or an error naming the
//! problem, never a panic or an unbounded expansion; every server of an accepted plan has a
//! usable volume name (no two alike), a personality that passes its checks, and a place in the
//! plan; no entry is both a server and bad.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;

use streamer::personality::plan::{self, MAX_SERVERS};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = plan::parse(text) else {
        return;
    };
    assert!((p.servers.len() + p.bad.len()) as u64 <= MAX_SERVERS);
    let mut names = BTreeSet::new();
    for s in &p.servers {
        streamer::names::validate_name(&s.name).expect("a usable name");
        assert!(names.insert(s.name.clone()), "{} twice", s.name);
        s.personality.validate().expect("a checked personality");
        assert!(s.personality.instance_id.is_empty());
        assert!(s.entry.starts_with("servers["));
    }
    let good: BTreeSet<&str> = p.servers.iter().map(|s| s.entry.as_str()).collect();
    for b in &p.bad {
        assert!(!good.contains(b.entry.as_str()), "{} both good and bad", b.entry);
        assert!(!b.error.is_empty());
    }
});
