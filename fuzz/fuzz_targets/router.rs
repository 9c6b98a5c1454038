//! Any datagrams from any origin into the routing core: no panic, the
//! core's invariants hold, and nothing is sent anywhere but to a pool server
//! or back to a sender (never to ourselves, never to a third party named by
//! a forged message). Input: up to 8 messages separated by two NUL bytes,
//! each prefixed by an origin byte and a time byte.
#![no_main]

use balancer::router::fuzzing::Harness;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static DIR: std::path::PathBuf = {
        let d = std::env::temp_dir().join(format!("siplb-fuzz-router-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&d);
        d
    };
}

fuzz_target!(|data: &[u8]| {
    let mut h = DIR.with(|d| Harness::new(d));
    for part in data.split(|&b| b == 0).filter(|p| p.len() > 2).take(8) {
        let (origin, rest) = (part[0], &part[1..]);
        let (after, msg) = (rest[0], &rest[1..]);
        h.feed(msg, Harness::origin(origin), u64::from(after) * 20);
    }
});
