//! Any datagrams from any origin into the routing core (the fuzz target
//! `fuzz/fuzz_targets/router.rs` in miniature, run in CI): no panic, the
//! invariants hold, and nothing goes anywhere but a pool server or back to a
//! sender — never to ourselves, never to a third party a forged message
//! names. Inputs are real SIP messages (requests and responses, some with
//! our own Via and Route) mutated byte by byte, so they get past the parser.

use balancer::router::fuzzing::{Harness, LB, SERVERS};
use proptest::prelude::*;

fn seeds() -> Vec<Vec<u8>> {
    let lb = LB;
    let s1 = SERVERS[0];
    let msgs = [
        format!(
            "INVITE sip:bob@{s1} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.3:5003;branch=z9hG4bKa1;rport\r\n\
             Route: <sip:{lb};lr>\r\nMax-Forwards: 70\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\n\
             Call-ID: c1\r\nCSeq: 1 INVITE\r\nContact: <sip:a@192.0.2.3:5003>\r\nContent-Length: 0\r\n\r\n"
        ),
        format!(
            "CANCEL sip:bob@{s1} SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.3:5003;branch=z9hG4bKa1\r\n\
             Max-Forwards: 70\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: c1\r\nCSeq: 1 CANCEL\r\n\
             Content-Length: 0\r\n\r\n"
        ),
            "REGISTER sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.4:5000;branch=z9hG4bKr1\r\n\
             Max-Forwards: 70\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:a@x>\r\nCall-ID: r1\r\nCSeq: 1 REGISTER\r\n\
             Contact: <sip:a@192.0.2.4:5000>\r\nContent-Length: 0\r\n\r\n"
            .to_owned(),
        format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP {lb};branch=z9hG4bK0123456789abcdefdeadbeef\r\n\
             Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKv\r\nFrom: <sip:a@x>;tag=1\r\n\
             To: <sip:b@x>;tag=2\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        ),
        format!(
            "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP {lb};branch=z9hG4bK0123456789abcdefa1deadbeef;lbc=2\r\n\
             Via: SIP/2.0/UDP 192.0.2.3:5003;branch=z9hG4bKa1;received=198.51.100.9;rport=9\r\n\
             From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>;tag=2\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        ),
        format!(
            "BYE sip:a@192.0.2.3:5003 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.5:5001;branch=z9hG4bKb1\r\n\
             Route: <sip:{lb};lr;sb=s1.0011223344556677>\r\nMax-Forwards: 70\r\nFrom: <sip:b@x>;tag=2\r\n\
             To: <sip:a@x>;tag=1\r\nCall-ID: c1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
        ),
        "MESSAGE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.6:5002;branch=z9hG4bKm1\r\nMax-Forwards: 70\r\n\
         From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: m1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 2\r\n\r\nhi"
            .to_owned(),
    ];
    msgs.into_iter().map(String::into_bytes).collect()
}

/// One step: which seed, how it is mutated, from whom, how long after.
fn step() -> impl Strategy<Value = (usize, Vec<(usize, u8)>, u8, u64)> {
    (
        0..7usize,
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        any::<u8>(),
        0..3_000u64,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn any_datagrams_from_anyone_go_nowhere_else(steps in prop::collection::vec(step(), 1..12)) {
        let dir = std::env::temp_dir().join(format!("siplb-router-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut h = Harness::new(&dir);
        let seeds = seeds();
        for (seed, edits, from, after) in steps {
            let mut msg = seeds[seed].clone();
            for (at, byte) in edits {
                let i = at % msg.len();
                msg[i] = byte;
            }
            h.feed(&msg, Harness::origin(from), after);
        }
    }
}
