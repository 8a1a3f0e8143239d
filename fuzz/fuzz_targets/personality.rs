//! Personality files (TOML or JSON) from operators: any bytes give a personality or an error
//! naming the problem, never a panic; what is accepted renders NoCloud documents that are valid
//! JSON (hence YAML) and survives a round trip through its stored form unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamer::personality::Personality;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
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
