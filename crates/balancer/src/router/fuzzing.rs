//! What a fuzzer (and the property test in `tests/router_fuzz.rs`) drives:
//! a router over a fixed two-server pool, fed any datagrams from any origin,
//! checked after each for the edge's promise: no panic, the core's
//! invariants hold, and nothing is sent anywhere but to a pool server or
//! back to where the message came from — never to ourselves, never to a
//! third party — unless the message came from a pool server.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::SeedableRng;

use super::{Dest, Now, Origin, Outbox, Router};
use crate::config::Config;

/// The balancer's address in the harness.
pub const LB: &str = "127.0.0.1:5060";
/// The pool.
pub const SERVERS: [&str; 2] = ["127.0.0.1:5081", "127.0.0.1:5082"];

/// A router, its clock and its pending timers.
#[derive(Debug)]
pub struct Harness {
    router: Router,
    base: Instant,
    now_ms: u64,
    timers: Vec<(Instant, super::TimerKey)>,
    rng: rand::rngs::StdRng,
    out: Outbox,
    /// Where every message so far came from (answers and retransmissions
    /// may go back there later, from a timer).
    seen: Vec<Dest>,
    /// A pool server sent something (its requests go anywhere its Route or
    /// Request-URI says, and their retransmissions later).
    server_spoke: bool,
}

impl Harness {
    /// A harness whose config reads its key from `key_dir/key` (written here).
    ///
    /// # Panics
    /// When the fixed config does not parse (a bug in this harness).
    #[must_use]
    pub fn new(key_dir: &std::path::Path) -> Harness {
        let _ = std::fs::write(key_dir.join("key"), "fuzz-key-0123456789abcdef");
        let text = format!(
            "[sip]\nlisten = [\"{LB}\"]\ntransports = [\"udp\"]\n\
             [routing]\nsecret = \"fuzz-secret-0123456789abcdef\"\npolicy = \"round-robin\"\n\
             failover_timeout = \"500ms\"\ninvite_timeout = \"2s\"\n\
             [limits]\nallow = []\nnew_session_burst = 50\nregister_burst = 50\nrequest_burst = 50\n\
             [perf]\nkey_file = \"key\"\n\
             [[servers]]\nid = \"s1\"\naddress = \"{}\"\n\
             [[servers]]\nid = \"s2\"\naddress = \"{}\"\nprobe = \"1s\"\n",
            SERVERS[0], SERVERS[1]
        );
        let cfg = Config::parse(&text, key_dir).expect("the harness config parses");
        let base = Instant::now();
        let router = Router::new(cfg, Default::default(), base).expect("router");
        // The connections the origins below stand for are open (flows).
        for b in 0..=u8::MAX {
            if let Origin::Conn { peer, conn, .. } = Harness::origin(b) {
                router.conn_opened(conn, peer, crate::config::Transport::Tcp);
            }
        }
        Harness {
            router,
            base,
            now_ms: 0,
            timers: Vec::new(),
            rng: rand::rngs::StdRng::seed_from_u64(7),
            out: Outbox::new(),
            seen: Vec::new(),
            server_spoke: false,
        }
    }

    fn now(&self) -> Now {
        Now {
            at: self.base + Duration::from_millis(self.now_ms),
            wall_ms: 1_700_000_000_000 + self.now_ms,
        }
    }

    /// The origin byte `b` stands for: a pool server, a user agent over UDP,
    /// one over a connection, or a server over a connection it opened to us
    /// (from a port of its own).
    #[must_use]
    pub fn origin(b: u8) -> Origin {
        let ua = SocketAddr::from(([192, 0, 2, b % 8], 5000 + u16::from(b % 4)));
        match b % 8 {
            0 => Origin::Udp {
                peer: SERVERS[0].parse().expect("address"),
            },
            1 => Origin::Udp {
                peer: SERVERS[1].parse().expect("address"),
            },
            2 => Origin::Conn {
                peer: ua,
                conn: u64::from(b),
                inbound: true,
            },
            3 => Origin::Conn {
                peer: SocketAddr::from(([127, 0, 0, 1], 40_000 + u16::from(b))),
                conn: 1000 + u64::from(b),
                inbound: true,
            },
            _ => Origin::Udp { peer: ua },
        }
    }

    /// Feeds one message from `origin`, then lets `advance_ms` pass (ticks
    /// and due timers), checking every output.
    ///
    /// # Panics
    /// When a check fails: that is the finding.
    pub fn feed(&mut self, data: &[u8], origin: Origin, advance_ms: u64) {
        let now = self.now();
        self.server_spoke |= match origin {
            Origin::Udp { peer } => SERVERS.iter().any(|s| s.parse() == Ok(peer)),
            Origin::Conn { peer, .. } => peer.ip() == std::net::IpAddr::from([127, 0, 0, 1]),
        };
        if !self.seen.contains(&origin.reply_dest()) {
            self.seen.push(origin.reply_dest());
        }
        self.router
            .on_message(data, origin, now, &mut self.rng, &mut self.out);
        self.check(Some(origin));
        let end = self.now_ms + advance_ms.min(5_000);
        while self.now_ms < end {
            self.now_ms = (self.now_ms + 100).min(end);
            let now = self.now();
            self.router.tick(now, &mut self.rng, &mut self.out);
            self.check(None);
            let due: Vec<_> = {
                let (due, later) = self.timers.drain(..).partition(|(at, _)| *at <= now.at);
                self.timers = later;
                due
            };
            for (_, key) in due {
                self.router.on_timer(key, now, &mut self.rng, &mut self.out);
                self.check(None);
            }
        }
    }

    fn check(&mut self, origin: Option<Origin>) {
        self.router.check_invariants();
        let lb: SocketAddr = LB.parse().expect("address");
        let servers: Vec<SocketAddr> = SERVERS
            .iter()
            .map(|s| s.parse().expect("address"))
            .collect();
        let from_server = origin.is_some_and(|o| match o {
            Origin::Udp { peer } => servers.contains(&peer),
            // A connection from a server's host (only a server is there).
            Origin::Conn { peer, .. } => servers.iter().any(|s| s.ip() == peer.ip()),
        }) || origin.is_none() && self.server_spoke;
        for (dest, bytes) in self.out.sends() {
            assert!(!bytes.is_empty(), "an empty send to {dest:?}");
            match dest {
                Dest::Udp(a) | Dest::Tcp(a) | Dest::Tls(a) => {
                    assert_ne!(*a, lb, "a send to ourselves");
                    let back = self.seen.contains(dest);
                    assert!(
                        servers.contains(a) || back || from_server,
                        "a send to a third party {a} after a message from {origin:?}"
                    );
                }
                Dest::Conn(c) => {
                    let back = self.seen.contains(&Dest::Conn(*c));
                    assert!(
                        back || from_server,
                        "a send into connection {c} after a message from {origin:?}"
                    );
                }
                Dest::Resolve { .. } => {
                    assert!(from_server, "a name resolved for a message from {origin:?}");
                }
            }
        }
        self.timers.extend_from_slice(self.out.timers());
        self.out.clear();
    }
}
