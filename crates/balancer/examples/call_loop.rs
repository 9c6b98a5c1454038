//! A whole call through the routing core, N times (no sockets): INVITE,
//! 180, 200, ACK, BYE, 200 — what siplb's core does per call, for
//! bench/callgrind-router.sh to count instructions (repeatable whatever
//! else the machine does). `call_loop N route` routes N calls; `call_loop
//! N gen` only writes their messages (the difference is the core's cost).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balancer::config::Config;
use balancer::router::{Dest, Now, Origin, Outbox, Router};
use rand::SeedableRng;

const UA: &str = "127.0.0.1:5070";
const SERVER: &str = "127.0.0.1:5081";

fn text(s: &str) -> Vec<u8> {
    s.replace('\n', "\r\n").into_bytes()
}

fn header<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    msg.split("\r\n")
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let route = args.next().as_deref() != Some("gen");
    let dir = std::env::temp_dir().join(format!("siplb-call-loop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("key"), "call-loop-key-0123456789").unwrap();
    let cfg = Config::parse(
        &format!(
            "[sip]\nlisten = [\"127.0.0.1:5060\"]\ntransports = [\"udp\"]\n\
             [routing]\nsecret = \"call-loop-secret-0123456789\"\npolicy = \"static\"\n\
             [perf]\nkey_file = \"key\"\n[[servers]]\nid = \"s1\"\naddress = \"{SERVER}\"\ncapacity = 1000\n"
        ),
        &dir,
    )
    .unwrap();
    let base = Instant::now();
    let now = |ms: u64| Now {
        at: base + Duration::from_millis(ms),
        wall_ms: 1_700_000_000_000 + ms,
    };
    let router = Router::new(cfg, Default::default(), base).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut out = Outbox::new();
    let ua: SocketAddr = UA.parse().unwrap();
    let server: SocketAddr = SERVER.parse().unwrap();
    let (from_ua, from_server) = (Origin::Udp { peer: ua }, Origin::Udp { peer: server });
    let mut sent = 0usize;
    let mut deliver =
        |router: &Router, msg: &[u8], o: Origin, ms: u64, out: &mut Outbox| -> Option<String> {
            if !route {
                return None;
            }
            router.on_message(msg, o, now(ms), &mut rng, out);
            let to = if o == from_ua { server } else { ua };
            let s = out
                .sends()
                .find(|(d, _)| **d == Dest::Udp(to))
                .map(|(_, b)| String::from_utf8_lossy(b).into_owned());
            sent += out.sends().count();
            out.clear();
            s
        };
    for i in 0..n {
        let t = (i as u64) * 10;
        let invite = text(&format!(
            "INVITE sip:bob@127.0.0.1:5060 SIP/2.0
Via: SIP/2.0/UDP {UA};branch=z9hG4bK-{i}-1;rport
Max-Forwards: 70
From: <sip:alice@127.0.0.1>;tag=a{i}
To: <sip:bob@127.0.0.1>
Call-ID: call-loop-{i}
CSeq: 1 INVITE
Contact: <sip:alice@{UA}>
Content-Type: application/sdp
Content-Length: 0

"
        ));
        let fwd = deliver(&router, &invite, from_ua, t, &mut out).unwrap_or_else(|| {
            format!("Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKx\r\nVia: SIP/2.0/UDP {UA};branch=z9hG4bK-{i}-1\r\nRecord-Route: <sip:127.0.0.1:5060;lr;sb=s1.0>\r\n")
        });
        let vias = header(&fwd, "Via").join("\r\nVia: ");
        let rr = header(&fwd, "Record-Route")
            .first()
            .copied()
            .unwrap_or("")
            .to_owned();
        let response = |code: &str, cseq: &str, vias: &str| {
            text(&format!(
                "SIP/2.0 {code}
Via: {vias}
Record-Route: {rr}
From: <sip:alice@127.0.0.1>;tag=a{i}
To: <sip:bob@127.0.0.1>;tag=b{i}
Call-ID: call-loop-{i}
CSeq: {cseq}
Contact: <sip:bob@{SERVER}>
Content-Length: 0

"
            ))
        };
        deliver(
            &router,
            &response("180 Ringing", "1 INVITE", &vias),
            from_server,
            t + 1,
            &mut out,
        );
        deliver(
            &router,
            &response("200 OK", "1 INVITE", &vias),
            from_server,
            t + 2,
            &mut out,
        );
        let in_dialog = |method: &str, seq: u32| {
            text(&format!(
                "{method} sip:bob@{SERVER} SIP/2.0
Via: SIP/2.0/UDP {UA};branch=z9hG4bK-{i}-{seq}{method};rport
Max-Forwards: 70
Route: {rr}
From: <sip:alice@127.0.0.1>;tag=a{i}
To: <sip:bob@127.0.0.1>;tag=b{i}
Call-ID: call-loop-{i}
CSeq: {seq} {method}
Content-Length: 0

"
            ))
        };
        deliver(&router, &in_dialog("ACK", 1), from_ua, t + 3, &mut out);
        let bye =
            deliver(&router, &in_dialog("BYE", 2), from_ua, t + 4, &mut out).unwrap_or_default();
        let vias = header(&bye, "Via").join("\r\nVia: ");
        deliver(
            &router,
            &response("200 OK", "2 BYE", &vias),
            from_server,
            t + 5,
            &mut out,
        );
    }
    if route {
        // 5 forwards + 3 relays per call (no 100 of ours: the server answers at once).
        assert!(sent >= n * 5, "{sent} sends for {n} calls");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
