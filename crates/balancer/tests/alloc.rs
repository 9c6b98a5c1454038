//! The per-message path of an established call allocates nothing on the
//! heap: forwarding an in-dialog request (our Route on top, its `sb` token
//! verified) and relaying responses, both provisional ones of a new call's
//! client transaction and final ones in a dialog. Counted per thread with a
//! counting global allocator, after one warm-up message of each kind (the
//! outbox's buffers grow once, then are reused as the shell reuses them).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balancer::config::Config;
use balancer::router::{Dest, Now, Origin, Outbox, Router};
use rand::SeedableRng;

const UA: &str = "127.0.0.1:5070";

fn config(dir: &std::path::Path) -> Config {
    std::fs::write(dir.join("key"), "alloc-test-key-0123456789").unwrap();
    let text = r#"
[sip]
listen = ["127.0.0.1:5060"]
transports = ["udp"]
[routing]
secret = "alloc-test-secret-0123456789"
policy = "round-robin"
[perf]
key_file = "key"
[[servers]]
id = "s1"
address = "127.0.0.1:5081"
"#;
    Config::parse(text, dir).unwrap()
}

fn text(s: &str) -> Vec<u8> {
    s.replace('\n', "\r\n").into_bytes()
}

/// The first send to `to`, as text.
fn sent_to(out: &Outbox, to: SocketAddr) -> String {
    out.sends()
        .find(|(d, _)| **d == Dest::Udp(to))
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_else(|| panic!("nothing sent to {to}"))
}

fn header<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    msg.split("\r\n")
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .collect()
}

#[test]
fn an_established_call_allocates_nothing() {
    // The counter counts (else every assertion below would pass vacuously).
    let probe = allocation_counter::measure(|| {
        std::hint::black_box(vec![0u8; 64]);
    });
    assert_eq!(probe.count_total, 1, "the counting allocator is in use");
    let dir = std::env::temp_dir().join(format!("siplb-alloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base = Instant::now();
    let now = |ms: u64| Now {
        at: base + Duration::from_millis(ms),
        wall_ms: 1_700_000_000_000 + ms,
    };
    let router = Router::new(config(&dir), Default::default(), base).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut out = Outbox::new();
    let ua: SocketAddr = UA.parse().unwrap();
    let server: SocketAddr = "127.0.0.1:5081".parse().unwrap();
    let ua_origin = Origin::Udp { peer: ua };
    let server_origin = Origin::Udp { peer: server };

    // A call: INVITE through, 200 back (with our Record-Route), ACK.
    let invite = text(
        "INVITE sip:bob@127.0.0.1:5081 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKinv1;rport
Max-Forwards: 70
From: <sip:alice@127.0.0.1>;tag=a1
To: <sip:bob@127.0.0.1>
Call-ID: alloc-call-1
CSeq: 1 INVITE
Contact: <sip:alice@127.0.0.1:5070>
Content-Length: 0

",
    );
    router.on_message(&invite, ua_origin, now(0), &mut rng, &mut out);
    let fwd = sent_to(&out, server);
    out.clear();
    let vias = header(&fwd, "Via").join("\r\nVia: ");
    let rr = header(&fwd, "Record-Route")[0].to_owned();
    let response = |code: &str, cseq: &str| {
        text(&format!(
            "SIP/2.0 {code}
Via: {vias}
Record-Route: {rr}
From: <sip:alice@127.0.0.1>;tag=a1
To: <sip:bob@127.0.0.1>;tag=b1
Call-ID: alloc-call-1
CSeq: {cseq}
Contact: <sip:bob@127.0.0.1:5081>
Content-Length: 0

"
        ))
    };
    let ringing = response("180 Ringing", "1 INVITE");
    let ok = response("200 OK", "1 INVITE");

    // Warm-up of the provisional path, then measured.
    router.on_message(&ringing, server_origin, now(10), &mut rng, &mut out);
    assert!(out.sends().any(|(d, _)| *d == Dest::Udp(ua)), "180 relayed");
    out.clear();
    let info = allocation_counter::measure(|| {
        for i in 0..100 {
            router.on_message(&ringing, server_origin, now(20 + i), &mut rng, &mut out);
            out.clear();
        }
    });
    assert_eq!(info.count_total, 0, "relaying a 180 allocated: {info:?}");

    router.on_message(&ok, server_origin, now(200), &mut rng, &mut out);
    assert!(sent_to(&out, ua).starts_with("SIP/2.0 200 OK"));
    out.clear();

    // In-dialog requests from the UA, routed by our Record-Route.
    let route = rr.clone();
    let in_dialog = |method: &str, seq: u32| {
        text(&format!(
            "{method} sip:bob@127.0.0.1:5081 SIP/2.0
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKdlg{seq};rport
Max-Forwards: 70
Route: {route}
From: <sip:alice@127.0.0.1>;tag=a1
To: <sip:bob@127.0.0.1>;tag=b1
Call-ID: alloc-call-1
CSeq: {seq} {method}
Content-Length: 0

"
        ))
    };
    let ack = in_dialog("ACK", 1);
    let infos: Vec<Vec<u8>> = (2..102).map(|n| in_dialog("INFO", n)).collect();
    router.on_message(&ack, ua_origin, now(300), &mut rng, &mut out);
    let acked = sent_to(&out, server);
    assert!(acked.starts_with("ACK "), "{acked}");
    assert!(!acked.contains(";sb="), "our Route popped: {acked}");
    out.clear();
    // Their answers, relayed back.
    let answers: Vec<Vec<u8>> = infos
        .iter()
        .map(|req| {
            router.on_message(req, ua_origin, now(400), &mut rng, &mut out);
            let fwd = sent_to(&out, server);
            out.clear();
            let vias = header(&fwd, "Via").join("\r\nVia: ");
            let cseq = header(&fwd, "CSeq")[0].to_owned();
            text(&format!(
                "SIP/2.0 200 OK
Via: {vias}
From: <sip:alice@127.0.0.1>;tag=a1
To: <sip:bob@127.0.0.1>;tag=b1
Call-ID: alloc-call-1
CSeq: {cseq}
Content-Length: 0

"
            ))
        })
        .collect();
    router.on_message(&answers[0], server_origin, now(500), &mut rng, &mut out);
    assert!(sent_to(&out, ua).starts_with("SIP/2.0 200 OK"));
    out.clear();

    let info = allocation_counter::measure(|| {
        for req in &infos {
            router.on_message(req, ua_origin, now(600), &mut rng, &mut out);
            out.clear();
        }
    });
    assert_eq!(
        info.count_total, 0,
        "forwarding in-dialog requests allocated: {info:?}"
    );
    let info = allocation_counter::measure(|| {
        for resp in &answers {
            router.on_message(resp, server_origin, now(700), &mut rng, &mut out);
            out.clear();
        }
    });
    assert_eq!(
        info.count_total, 0,
        "relaying in-dialog responses allocated: {info:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
