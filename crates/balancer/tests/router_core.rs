//! The routing core driven directly (no sockets): messages in, the outbox
//! read back. Bounds and the stream/flow behaviour of an edge proxy.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balancer::config::Config;
use balancer::router::{Dest, Now, Origin, Outbox, Router};
use rand::SeedableRng;

/// A router over `servers` (UDP, agentless, round-robin) with `extra`
/// appended to its config.
struct Core {
    router: Router,
    base: Instant,
    rng: rand::rngs::StdRng,
    out: Outbox,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

const S1: &str = "127.0.0.1:5081";
const S2: &str = "127.0.0.1:5082";

impl Core {
    fn new(name: &str, extra: &str) -> Core {
        let dir = std::env::temp_dir().join(format!("siplb-core-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("key"), "core-test-key-0123456789").unwrap();
        let text = format!(
            r#"
[sip]
listen = ["127.0.0.1:5060"]
transports = ["udp", "tcp"]
[routing]
secret = "core-test-secret-0123456789"
policy = "round-robin"
{extra}
[perf]
key_file = "key"
[[servers]]
id = "s1"
address = "{S1}"
[[servers]]
id = "s2"
address = "{S2}"
"#
        );
        let cfg = Config::parse(&text, &dir).unwrap();
        let base = Instant::now();
        Core {
            router: Router::new(cfg, Default::default(), base).unwrap(),
            base,
            rng: rand::rngs::StdRng::seed_from_u64(7),
            out: Outbox::new(),
            _dir: tempdir::Dir(dir),
        }
    }

    fn now(&self, ms: u64) -> Now {
        Now {
            at: self.base + Duration::from_millis(ms),
            wall_ms: 1_700_000_000_000 + ms,
        }
    }

    /// Feeds one message at `ms`; the sends it caused, as (dest, text).
    fn feed(&mut self, text: &str, origin: Origin, ms: u64) -> Vec<(Dest, String)> {
        self.out.clear();
        let now = self.now(ms);
        let bytes = text.replace('\n', "\r\n");
        self.router
            .on_message(bytes.as_bytes(), origin, now, &mut self.rng, &mut self.out);
        self.out
            .sends()
            .map(|(d, b)| (d.clone(), String::from_utf8_lossy(b).into_owned()))
            .collect()
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn invite(call: &str, ua: SocketAddr, transport: &str) -> String {
    format!(
        "INVITE sip:bob@127.0.0.1 SIP/2.0
Via: SIP/2.0/{transport} {ua};branch=z9hG4bK{call};rport
Max-Forwards: 70
From: <sip:alice@127.0.0.1>;tag=a-{call}
To: <sip:bob@127.0.0.1>
Call-ID: {call}
CSeq: 1 INVITE
Contact: <sip:alice@{ua};transport={}>
Content-Length: 0

",
        transport.to_ascii_lowercase()
    )
}

fn status(text: &str) -> Option<u16> {
    text.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

#[test]
fn the_transaction_table_is_bounded() {
    let mut core = Core::new("txn-bound", "max_transactions = 3");
    let ua = addr("192.0.2.10:5070");
    let from = Origin::Udp { peer: ua };
    for i in 0..3 {
        let sent = core.feed(&invite(&format!("bound-{i}"), ua, "UDP"), from, i);
        assert!(
            sent.iter().any(
                |(d, t)| matches!(d, Dest::Udp(a) if *a == addr(S1) || *a == addr(S2))
                    && t.starts_with("INVITE")
            ),
            "INVITE {i} goes to a server: {sent:?}"
        );
    }
    assert_eq!(core.router.transactions(), 3);
    let sent = core.feed(&invite("bound-3", ua, "UDP"), from, 10);
    assert_eq!(sent.len(), 1, "only our answer: {sent:?}");
    assert_eq!(sent[0].0, Dest::Udp(ua));
    assert_eq!(status(&sent[0].1), Some(503), "{}", sent[0].1);
    assert!(sent[0].1.contains("Retry-After: "), "{}", sent[0].1);
    assert_eq!(
        core.router
            .stats
            .drops_of(balancer::stats::DropReason::TransactionTableFull),
        1
    );
}
