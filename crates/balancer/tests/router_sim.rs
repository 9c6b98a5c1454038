//! A seeded discrete-event simulation of the routing core
//! ([`balancer::router::Router`]), driven exactly as the forwarding shell
//! drives it (`on_message` / `on_timer` / `tick` every 100 ms, the
//! [`Outbox`] performed in order), on a virtual clock and a lossy network.
//!
//! Each run is a pure function of its seed: one base `Instant`, time moved
//! only by RNG-drawn delays, every table iterated in a fixed order. A run
//! draws 2-4 servers (no agents, `round-robin` or `p2c`, sometimes OPTIONS
//! probes with `health = "probe"`, sometimes outlier ejection), a network
//! (0-10 % loss, duplication, reordering by random delivery delays), a
//! drain (and undrain) of one server and a network partition of one, and a
//! few dozen scripted user agents: INVITE calls (Timer A/B, ACK of non-2xx
//! with the INVITE's branch, ACK of 2xx and BYE as new transactions routed
//! by the balancer's Record-Route sent back as Route, CANCEL while ringing
//! or early, a re-INVITE with credentials after a 401), MESSAGEs and
//! REGISTERs (Timer E/F). Servers are scripted UASs whose behaviour is drawn
//! per call from a per-server profile (180 then 200, 486, 503, silence,
//! ringing forever, dying after the 180, answering late, a 401 challenge
//! once, late non-INVITE answers), with server transactions keyed by the top
//! Via branch, Timer G/H retransmission of INVITE finals until their ACK,
//! CANCEL answered 200 + 487, and a BYE of their own when the callee hangs
//! up (or a 2xx is never ACKed).
//!
//! After every step (a delivery, a timer, a tick) the core's own invariants
//! and a shadow model are checked; when the traffic is over and every timer
//! has run out (two minutes of ticks), so are the end states. The numbered
//! checks are listed at [`Check`]. A failure names the seed and the command
//! that replays it with a trace of every datagram:
//!
//! ```text
//! SIPLB_SIM_SEED=0x2a cargo test -p balancer --test router_sim -- --nocapture
//! ```
//!
//! The CI runs seeds 0-319, 40 per test (8 tests); `SIPLB_SIM_SEEDS=N`
//! runs N per test instead (seeds 0 to 8N-1), e.g. a long sweep in release:
//! `SIPLB_SIM_SEEDS=1000 cargo test --release -p balancer --test router_sim`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use balancer::config::Config;
use balancer::router::{Dest, Now, Origin, Outbox, Router, TimerKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// RFC 3261 T1, T2 and 64 × T1 (ms).
const T1: u64 = 500;
const T2: u64 = 4_000;
const TXN: u64 = 64 * T1;
/// Quiet time after the last activity before the end states are checked.
const QUIESCE_MS: u64 = 120_000;
/// A run that is still busy at this virtual time never quiesces.
const HARD_LIMIT_MS: u64 = 30 * 60_000;
/// The wall clock at virtual time 0 (only agent windows read it).
const WALL0: u64 = 1_700_000_000_000;

/// The checks of the shadow model (the number is printed with a violation).
#[derive(Debug, Clone, Copy)]
enum Check {
    /// 1. Every INVITE transaction at a UA ends with exactly one distinct
    ///    final (same status and To tag for every copy), or none only when
    ///    the UA gave up: Timer B fired while still Calling (no provisional
    ///    at all, RFC 3261 §17.1.1.2), or 64 × T1 passed after its CANCEL
    ///    without a final (§9.1). Non-INVITE: one distinct final (REGISTER:
    ///    the first counts, a fork may run again for a retransmission),
    ///    none only at Timer F when no server had answered it other than
    ///    503 at least 5 s before (RFC 4320: no 408 for a silent server);
    ///    a CANCEL always a final; a BYE a final, or at Timer F the UA ends
    ///    the dialog anyway (§15.1.1) and check 4 sees the server's end.
    ///    A server's 503 never reaches a UA as such (§16.7 step 6: 500).
    Final = 1,
    /// 2. A non-2xx ACK reaches the server that sent that final, with the
    ///    branch of the INVITE that server got (every copy); no ACK before
    ///    a final.
    NonSuccessAck = 2,
    /// 3. A CANCEL at a server carries the branch of an INVITE it got, and
    ///    comes only after it sent a provisional response for it; and no
    ///    INVITE whose provisional response reached the balancer stays
    ///    ringing at a server for ever (our CANCEL must get through: it is
    ///    retransmitted like any non-INVITE request). An attempt given up
    ///    before any of its responses reached us cannot be CANCELled
    ///    (§9.1), and the balancer does not retransmit INVITEs to servers
    ///    (it fails over instead), so such a server may ring on.
    Cancel = 3,
    /// 4. In-dialog requests (the ACK of a 2xx, BYE) reach the server that
    ///    answered 2xx for that dialog; every 2xx is ACKed and every dialog
    ///    ends with a BYE, at the UA and at the server.
    Dialog = 4,
    /// 5. No drained or down server gets a new session's first request
    ///    (INVITE, MESSAGE, REGISTER without To tag on a branch it has not
    ///    had): down before the step and still down after it.
    Usable = 5,
    /// 6. A UA never gets a 2xx from two different servers for one INVITE.
    OneServer2xx = 6,
    /// 7. A server never gets one MESSAGE (Call-ID + CSeq) as two
    ///    transactions, nor on a second server unless the first said 503;
    ///    no INVITE goes to any server once the UA's CANCEL reached us.
    NoDuplicate = 7,
    /// 8. Once quiet, no transaction, fork, session or outstanding count.
    Empty = 8,
    /// 9. The core's structural invariants (`check_invariants`), the
    ///    outstanding counts (never negative, at most one per transaction
    ///    and one per fork leg), the wire (every datagram to a known
    ///    address over UDP, responses only for transactions the UA has,
    ///    the 2xx carrying our Record-Route), and quiescence itself.
    Core = 9,
}

// ---------------------------------------------------------------------------
// Addresses

fn lb_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5060))
}

fn srv_addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 11 + i as u8], 5060))
}

fn ua_addr(k: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 100], 6000 + k as u16))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Lb,
    Srv(usize),
    Ua(usize),
}

// ---------------------------------------------------------------------------
// A small SIP reader of our own (independent of the crate under test).

struct Msg<'a> {
    first: &'a str,
    hdrs: Vec<(&'a str, &'a str)>,
}

fn canonical(name: &str) -> &str {
    match name {
        "v" | "V" => "via",
        "f" | "F" => "from",
        "t" | "T" => "to",
        "i" | "I" => "call-id",
        "m" | "M" => "contact",
        "l" | "L" => "content-length",
        _ => name,
    }
}

impl<'a> Msg<'a> {
    fn parse(b: &'a [u8]) -> Option<Msg<'a>> {
        let s = std::str::from_utf8(b).ok()?;
        let (head, _body) = s.split_once("\r\n\r\n")?;
        let mut lines = head.split("\r\n");
        let first = lines.next()?;
        let mut hdrs = Vec::with_capacity(12);
        for l in lines {
            let (n, v) = l.split_once(':')?;
            hdrs.push((canonical(n.trim_ascii()), v.trim_ascii()));
        }
        Some(Msg { first, hdrs })
    }

    fn is_request(&self) -> bool {
        !self.first.starts_with("SIP/2.0 ")
    }

    fn method(&self) -> &'a str {
        self.first.split(' ').next().unwrap_or("")
    }

    fn ruri(&self) -> &'a str {
        self.first.split(' ').nth(1).unwrap_or("")
    }

    fn status(&self) -> u16 {
        self.first
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    fn h(&self, name: &str) -> Option<&'a str> {
        self.hdrs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// Every value of `name`, comma-separated lists split.
    fn list(&self, name: &str) -> Vec<&'a str> {
        let mut out = Vec::new();
        for (n, v) in &self.hdrs {
            if n.eq_ignore_ascii_case(name) {
                out.extend(split_commas(v));
            }
        }
        out
    }

    /// The header lines of `name`, as written.
    fn lines(&self, name: &str) -> Vec<&'a str> {
        self.hdrs
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
            .collect()
    }

    fn call_id(&self) -> &'a str {
        self.h("call-id").unwrap_or("")
    }

    fn cseq(&self) -> (u32, &'a str) {
        let v = self.h("cseq").unwrap_or("");
        let mut it = v.split_whitespace();
        let n = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        (n, it.next().unwrap_or(""))
    }

    fn top_via(&self) -> &'a str {
        // Every Via here is a line of its own, without commas.
        self.h("via").unwrap_or("")
    }

    fn via_count(&self) -> usize {
        self.hdrs
            .iter()
            .filter(|(n, _)| *n == "via" || n.eq_ignore_ascii_case("via"))
            .count()
    }

    fn branch(&self) -> &'a str {
        param(self.top_via(), "branch").unwrap_or("")
    }

    fn to_tag(&self) -> Option<&'a str> {
        self.h("to").and_then(|t| param(t, "tag"))
    }

    fn tag_of_from(&self) -> Option<&'a str> {
        self.h("from").and_then(|t| param(t, "tag"))
    }
}

fn split_commas(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut quoted, mut start) = (0i32, false, 0usize);
    for (i, c) in v.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '<' if !quoted => depth += 1,
            '>' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                out.push(v[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(v[start..].trim());
    out
}

/// A `;name=value` parameter (after any `<...>`).
fn param<'a>(v: &'a str, name: &str) -> Option<&'a str> {
    let rest = match v.rfind('>') {
        Some(i) => &v[i..],
        None => v,
    };
    for p in rest.split(';').skip(1) {
        let (n, val) = p.split_once('=').unwrap_or((p, ""));
        if n.trim().eq_ignore_ascii_case(name) {
            return Some(val.trim());
        }
    }
    None
}

/// The URI of a name-addr.
fn uri_of(v: &str) -> &str {
    match (v.find('<'), v.find('>')) {
        (Some(a), Some(b)) if a < b => &v[a + 1..b],
        _ => v.split(';').next().unwrap_or(v),
    }
}

/// `ip:port` of a `sip:` URI (port 5060 by default).
fn uri_addr(uri: &str) -> Option<SocketAddr> {
    let rest = uri.strip_prefix("sip:")?;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hp = rest.split([';', '>', '?']).next()?;
    hp.parse()
        .ok()
        .or_else(|| format!("{hp}:5060").parse().ok())
}

/// Where a response to a request whose top Via is `via` goes (RFC 3261
/// §18.2.2, RFC 3581): `received`/`rport`, else the sent-by.
fn via_dest(via: &str) -> Option<SocketAddr> {
    let sent_by = via.split_whitespace().nth(1)?.split(';').next()?;
    let mut a: SocketAddr = sent_by
        .parse()
        .ok()
        .or_else(|| format!("{sent_by}:5060").parse().ok())?;
    if let Some(r) = param(via, "received").and_then(|r| r.parse().ok()) {
        a.set_ip(r);
    }
    if let Some(p) = param(via, "rport").and_then(|p| p.parse().ok()) {
        a.set_port(p);
    }
    Some(a)
}

/// A response to `req` (every Via, From, To with `tag` if it has none,
/// Call-ID, CSeq, then `extra` lines).
fn response(req: &Msg<'_>, code: u16, reason: &str, tag: Option<&str>, extra: &str) -> Vec<u8> {
    let mut s = format!("SIP/2.0 {code} {reason}\r\n");
    for v in req.lines("via") {
        s.push_str("Via: ");
        s.push_str(v);
        s.push_str("\r\n");
    }
    s.push_str("From: ");
    s.push_str(req.h("from").unwrap_or(""));
    s.push_str("\r\nTo: ");
    let to = req.h("to").unwrap_or("");
    s.push_str(to);
    if let (None, Some(t)) = (param(to, "tag"), tag) {
        s.push_str(";tag=");
        s.push_str(t);
    }
    s.push_str("\r\nCall-ID: ");
    s.push_str(req.call_id());
    s.push_str("\r\nCSeq: ");
    s.push_str(req.h("cseq").unwrap_or(""));
    s.push_str("\r\n");
    s.push_str(extra);
    s.push_str("Content-Length: 0\r\n\r\n");
    s.into_bytes()
}

/// One line about a datagram, for the trace.
fn summary(b: &[u8]) -> String {
    let Some(m) = Msg::parse(b) else {
        return format!("<unparseable {} bytes>", b.len());
    };
    let (n, method) = m.cseq();
    let first = if m.is_request() {
        format!("{} {}", m.method(), m.ruri())
    } else {
        m.first.to_owned()
    };
    let mut s = format!(
        "{first} | {} {n} {method} | br={}",
        m.call_id(),
        short_branch(m.branch())
    );
    if let Some(t) = m.to_tag() {
        s.push_str(" to=");
        s.push_str(t);
    }
    let vias = m.via_count();
    if vias > 1 {
        s.push_str(&format!(" vias={vias}"));
    }
    s
}

fn short_branch(b: &str) -> &str {
    // Ours are z9hG4bK + 16 hex + leg + 8 hex (+ -mac): keep txn start and leg.
    b.strip_prefix("z9hG4bK").unwrap_or(b)
}

/// Whether one of our branches names a request the balancer made itself
/// (`Leg::Local`: the ACK/BYE of a 2xx from an attempt given up).
fn local_leg(branch: &str) -> bool {
    branch.as_bytes().get(23) == Some(&b'l')
}

/// Our OPTIONS probes (the only OPTIONS here) and the answers to them.
fn is_probe(b: &[u8]) -> bool {
    b.starts_with(b"OPTIONS ") || b.starts_with(b"SIP/2.0 200 Probe OK")
}

/// Which server a To tag of ours names (`s2x7` → 1), `None` for the
/// balancer's own (`lb...`).
fn tag_server(tag: &str) -> Option<usize> {
    let rest = tag.strip_prefix('s')?;
    let n: usize = rest.split('x').next()?.parse().ok()?;
    n.checked_sub(1)
}

fn tag_owner(tag: &str) -> String {
    match tag_server(tag) {
        Some(i) => format!("s{}", i + 1),
        None => format!("lb({tag})"),
    }
}

/// Call index from a Call-ID of ours (`c17@sim`, `m3@sim`, `r5@sim`).
fn call_index(cid: &str) -> Option<usize> {
    cid.get(1..)?.split('@').next()?.parse().ok()
}

// ---------------------------------------------------------------------------
// The run's configuration and scripts

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InvB {
    Normal,
    Busy,
    Reject503,
    Silent,
    RingForever,
    DieAfter180,
    Late200,
    RingThenLate200,
    Challenge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonB {
    Ok,
    Fail503,
    Challenge,
    Silent,
}

#[derive(Debug, Clone)]
struct Profile {
    name: &'static str,
    invite: Vec<(InvB, u32)>,
    message: Vec<(NonB, u32)>,
    register: Vec<(NonB, u32)>,
    send100: bool,
}

fn profiles() -> Vec<Profile> {
    use InvB::*;
    vec![
        Profile {
            name: "good",
            invite: vec![
                (Normal, 80),
                (Busy, 8),
                (Late200, 4),
                (RingThenLate200, 4),
                (Challenge, 4),
            ],
            message: vec![(NonB::Ok, 90), (NonB::Fail503, 10)],
            register: vec![(NonB::Ok, 95), (NonB::Challenge, 5)],
            send100: false,
        },
        Profile {
            name: "flaky",
            invite: vec![
                (Normal, 40),
                (Reject503, 25),
                (Silent, 15),
                (DieAfter180, 10),
                (Late200, 10),
            ],
            message: vec![(NonB::Ok, 55), (NonB::Fail503, 30), (NonB::Silent, 15)],
            register: vec![(NonB::Ok, 80), (NonB::Silent, 20)],
            send100: true,
        },
        Profile {
            name: "ringer",
            invite: vec![
                (Normal, 40),
                (RingForever, 35),
                (RingThenLate200, 15),
                (Busy, 10),
            ],
            message: vec![(NonB::Ok, 100)],
            register: vec![(NonB::Ok, 100)],
            send100: true,
        },
        Profile {
            name: "challenger",
            invite: vec![(Challenge, 60), (Normal, 40)],
            message: vec![(NonB::Ok, 80), (NonB::Fail503, 20)],
            register: vec![(NonB::Ok, 70), (NonB::Challenge, 30)],
            send100: false,
        },
    ]
}

fn pick<T: Copy>(rng: &mut StdRng, w: &[(T, u32)]) -> T {
    let total: u32 = w.iter().map(|(_, n)| n).sum();
    let mut x = rng.random_range(0..total);
    for &(t, n) in w {
        if x < n {
            return t;
        }
        x -= n;
    }
    w[w.len() - 1].0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    Invite,
    Message,
    Register,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CancelPlan {
    No,
    /// After the first provisional of the INVITE (the balancer's 100), this
    /// long after, whether or not the server answered.
    Early(u64),
    /// This long after the first 180.
    Ringing(u64),
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    kind: CallKind,
    start: u64,
    cancel: CancelPlan,
    hold: u64,
    callee_hangs_up: bool,
}

#[derive(Debug, Clone)]
struct RunCfg {
    n_srv: usize,
    policy: &'static str,
    probes: bool,
    outlier: u32,
    max_attempts: u8,
    loss: f64,
    dup: f64,
    reorder: f64,
    profiles: Vec<Profile>,
    plans: Vec<Plan>,
    /// (server, at, drained)
    drains: Vec<(usize, u64, bool)>,
    /// (server, from, until)
    partitions: Vec<(usize, u64, u64)>,
    /// `routing.last_attempt_timeout`: 500 ms (no wait past the failover
    /// timeout), or a wait for the last server.
    last_attempt: &'static str,
}

impl RunCfg {
    fn draw(rng: &mut StdRng) -> RunCfg {
        let n_srv = rng.random_range(2..=4);
        let all = profiles();
        let profiles: Vec<Profile> = (0..n_srv)
            .map(|_| all[rng.random_range(0..all.len())].clone())
            .collect();
        let n_calls = rng.random_range(24..=40);
        let plans = (0..n_calls)
            .map(|_| {
                let kind = pick(
                    rng,
                    &[
                        (CallKind::Invite, 70),
                        (CallKind::Message, 15),
                        (CallKind::Register, 15),
                    ],
                );
                let cancel = match rng.random_range(0..100) {
                    0..70 => CancelPlan::No,
                    70..85 => CancelPlan::Ringing(rng.random_range(0..2_000)),
                    _ => CancelPlan::Early(rng.random_range(0..300)),
                };
                Plan {
                    kind,
                    start: rng.random_range(0..20_000),
                    cancel,
                    hold: rng.random_range(200..6_000),
                    callee_hangs_up: rng.random_bool(0.2),
                }
            })
            .collect();
        let mut drains = Vec::new();
        if rng.random_bool(0.6) {
            let s = rng.random_range(0..n_srv);
            let at = rng.random_range(2_000..15_000);
            drains.push((s, at, true));
            if rng.random_bool(0.5) {
                drains.push((s, at + rng.random_range(3_000..10_000), false));
            }
        }
        let mut partitions = Vec::new();
        if rng.random_bool(0.4) {
            let s = rng.random_range(0..n_srv);
            let from = rng.random_range(1_000..18_000);
            partitions.push((s, from, from + rng.random_range(1_000..8_000)));
        }
        RunCfg {
            n_srv,
            policy: if rng.random_bool(0.5) {
                "round-robin"
            } else {
                "p2c"
            },
            probes: rng.random_bool(1.0 / 3.0),
            outlier: if rng.random_bool(0.5) { 3 } else { 0 },
            max_attempts: rng.random_range(2..=3),
            loss: rng.random_range(0.0..0.10),
            dup: rng.random_range(0.0..0.05),
            reorder: rng.random_range(0.0..0.2),
            profiles,
            plans,
            drains,
            partitions,
            last_attempt: ["500ms", "3s", "32s"][rng.random_range(0..3)],
        }
    }

    fn config(&self) -> Config {
        let mut t = format!(
            "[sip]\nlisten = [\"127.0.0.1:5060\"]\ntransports = [\"udp\"]\n\
             [routing]\nsecret = \"router-sim-secret-0123456789\"\npolicy = \"{}\"\n\
             failover_timeout = \"500ms\"\ninvite_timeout = \"5s\"\n\
             session_idle_timeout = \"20s\"\nregister_timeout = \"4s\"\n\
             max_attempts = {}\nhealth = \"{}\"\noutlier_failures = {}\nslow_start = \"0s\"\n\
             last_attempt_timeout = \"{}\"\n\
             [perf]\nkey_file = \"{}\"\n",
            self.policy,
            self.max_attempts,
            if self.probes { "probe" } else { "agent" },
            self.outlier,
            self.last_attempt,
            key_file().display(),
        );
        for i in 0..self.n_srv {
            t.push_str(&format!(
                "[[servers]]\nid = \"s{}\"\naddress = \"{}\"\n",
                i + 1,
                srv_addr(i)
            ));
            if self.probes {
                t.push_str("probe = \"1s\"\n");
            }
        }
        Config::parse(&t, &std::env::temp_dir()).expect("simulation config")
    }
}

fn key_file() -> &'static PathBuf {
    static KEY: OnceLock<PathBuf> = OnceLock::new();
    KEY.get_or_init(|| {
        // One file for every test process, written whole (a rename) so that
        // another process never reads half of it.
        const KEY_TEXT: &str = "router-sim-perf-key-0123456789abcdef\n";
        let p = std::env::temp_dir().join("siplb-router-sim.key");
        if std::fs::read_to_string(&p).ok().as_deref() != Some(KEY_TEXT) {
            let tmp = p.with_extension(format!("key.{}", std::process::id()));
            std::fs::write(&tmp, KEY_TEXT).expect("write key file");
            std::fs::rename(&tmp, &p).expect("rename key file");
        }
        p
    })
}

// ---------------------------------------------------------------------------
// Events and the network

#[derive(Debug, Clone, Copy)]
enum UaT {
    Start,
    TimerA { inv: usize, n: u32 },
    TimerB { inv: usize },
    Cancel { inv: usize },
    CancelGiveUp { inv: usize },
    Retx { which: Which, n: u32 },
    TimerF { which: Which },
    Bye,
    AuthRetry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Cancel(usize),
    Bye,
    Req,
}

#[derive(Debug, Clone)]
enum SrvT {
    Step { branch: String, idx: usize },
    Retx { branch: String, n: u32 },
    NonFinal { key: (String, String) },
    Bye { dialog: (String, String) },
    ByeRetx { branch: String, n: u32 },
}

enum Kind {
    Deliver {
        from: SocketAddr,
        to: SocketAddr,
        data: Vec<u8>,
    },
    RouterTimer(TimerKey),
    Tick,
    Ua(usize, UaT),
    Srv(usize, SrvT),
    Drain(usize, bool),
    Partition(usize, u64),
}

struct Ev {
    at: u64,
    seq: u64,
    counts: bool,
    kind: Kind,
}

impl PartialEq for Ev {
    fn eq(&self, o: &Ev) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Ev) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    fn cmp(&self, o: &Ev) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Counters of what a run exercised (printed per run when tracing, summed
/// over the CI seeds).
#[derive(Debug, Default, Clone)]
struct Coverage {
    runs: u64,
    calls: u64,
    datagrams: u64,
    lost: u64,
    steps: u64,
    ua_finals: BTreeMap<u16, u64>,
    ua_gave_up: BTreeMap<&'static str, u64>,
    ua_cancels: u64,
    server_cancels: u64,
    auth_retries: u64,
    lb_byes: u64,
    failed_over_invites: u64,
    message_failovers: u64,
    register_forks: u64,
    callee_byes: u64,
    ringing_unheard: u64,
    drains: u64,
    partitions: u64,
    probe_runs: u64,
    virtual_ms: u64,
    /// FNV-1a over every datagram (time, ends, bytes), when asked for.
    digest: u64,
}

impl Coverage {
    fn add(&mut self, o: &Coverage) {
        self.runs += o.runs;
        self.calls += o.calls;
        self.datagrams += o.datagrams;
        self.lost += o.lost;
        self.steps += o.steps;
        for (k, v) in &o.ua_finals {
            *self.ua_finals.entry(*k).or_default() += v;
        }
        for (k, v) in &o.ua_gave_up {
            *self.ua_gave_up.entry(*k).or_default() += v;
        }
        self.ua_cancels += o.ua_cancels;
        self.server_cancels += o.server_cancels;
        self.auth_retries += o.auth_retries;
        self.lb_byes += o.lb_byes;
        self.failed_over_invites += o.failed_over_invites;
        self.message_failovers += o.message_failovers;
        self.register_forks += o.register_forks;
        self.callee_byes += o.callee_byes;
        self.ringing_unheard += o.ringing_unheard;
        self.drains += o.drains;
        self.partitions += o.partitions;
        self.probe_runs += o.probe_runs;
        self.virtual_ms += o.virtual_ms;
    }
}

/// A final a server sent: (server, status, at ms).
type ServerFinal = (usize, u16, u64);

/// What the endpoints share: the clock, the network, the event queue, the
/// cross-endpoint records of the shadow model.
struct Ctx {
    now: u64,
    rng: StdRng,
    heap: BinaryHeap<Reverse<Ev>>,
    seq: u64,
    loss: f64,
    dup: f64,
    reorder: f64,
    verbose: bool,
    digest: bool,
    violation: Option<String>,
    partition_until: Vec<u64>,
    n_srv: usize,
    n_ua: usize,
    plans: Vec<Plan>,
    /// Events other than ticks and probe traffic still queued.
    pending: usize,
    last_activity: u64,
    /// (Call-ID, CSeq) → when the UA's CANCEL first reached the balancer.
    cancel_at_lb: HashMap<(String, u32), u64>,
    /// MESSAGE (Call-ID, CSeq) → the servers that got it, and whether each said 503.
    message_at: HashMap<(String, u32), Vec<(usize, bool)>>,
    /// Non-INVITE (Call-ID, CSeq) → finals the servers sent: (server, code, at).
    nonin_finals: HashMap<(String, u32), Vec<ServerFinal>>,
    /// Per (Call-ID, CSeq): the finals the balancer sent a UA, and how many
    /// the network delivered: a transaction whose every final was lost on
    /// the way to its UA timed out by bad luck, not by the balancer.
    finals_to_ua: HashMap<(String, u32), (u32, u32)>,
    /// INVITE (Call-ID, CSeq) → servers that got it.
    invite_at: HashMap<(String, u32), BTreeSet<usize>>,
    /// INVITE (Call-ID, CSeq) → when a server first answered it 2xx.
    invite_2xx_at: HashMap<(String, u32), u64>,
    /// (server, branch) of INVITEs whose provisional response reached us.
    lb_heard_ringing: HashSet<(usize, String)>,
    cov: Coverage,
}

impl Ctx {
    fn node(&self, a: SocketAddr) -> Option<Node> {
        if a == lb_addr() {
            return Some(Node::Lb);
        }
        if let Some(i) = (0..self.n_srv).find(|&i| srv_addr(i) == a) {
            return Some(Node::Srv(i));
        }
        (0..self.n_ua).find(|&k| ua_addr(k) == a).map(Node::Ua)
    }

    fn name(&self, a: SocketAddr) -> String {
        match self.node(a) {
            Some(Node::Lb) => "lb".into(),
            Some(Node::Srv(i)) => format!("s{}", i + 1),
            Some(Node::Ua(k)) => format!("ua{k}"),
            None => a.to_string(),
        }
    }

    fn trace(&self, f: impl FnOnce() -> String) {
        if self.verbose {
            println!("[{:>9.3}] {}", self.now as f64 / 1000.0, f());
        }
    }

    fn fail(&mut self, check: Check, what: String) {
        if self.violation.is_none() {
            let msg = format!(
                "check {} ({check:?}) at t={:.3}s: {what}",
                check as u8,
                self.now as f64 / 1000.0
            );
            self.trace(|| format!("VIOLATION {msg}"));
            self.violation = Some(msg);
        }
    }

    fn schedule(&mut self, at: u64, kind: Kind, counts: bool) {
        if counts {
            self.pending += 1;
        }
        self.seq += 1;
        self.heap.push(Reverse(Ev {
            at,
            seq: self.seq,
            counts,
            kind,
        }));
    }

    fn ua_after(&mut self, d: u64, k: usize, t: UaT) {
        self.schedule(self.now + d, Kind::Ua(k, t), true);
    }

    fn srv_after(&mut self, d: u64, i: usize, t: SrvT) {
        self.schedule(self.now + d, Kind::Srv(i, t), true);
    }

    fn partitioned(&self, a: SocketAddr) -> bool {
        matches!(self.node(a), Some(Node::Srv(i)) if self.now < self.partition_until[i])
    }

    fn delay(&mut self) -> u64 {
        let mut d = self.rng.random_range(1..=15);
        if self.rng.random_bool(self.reorder) {
            d += self.rng.random_range(20..=250);
        }
        d
    }

    /// A datagram into the network: lost, delivered once or twice, each
    /// copy after its own delay.
    fn send(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        let probe = is_probe(&data);
        self.cov.datagrams += 1;
        if self.digest {
            let mut h = self.cov.digest ^ 0xcbf2_9ce4_8422_2325;
            let ends = format!("{} {from} {to} ", self.now);
            for b in ends.as_bytes().iter().chain(&data) {
                h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
            self.cov.digest = h;
        }
        let fate = if self.partitioned(from) || self.partitioned(to) {
            None
        } else if self.rng.random_bool(self.loss) {
            Some(vec![])
        } else {
            let mut d = vec![self.delay()];
            if self.rng.random_bool(self.dup) {
                d.push(self.delay());
            }
            Some(d)
        };
        if self.verbose {
            let f = match &fate {
                None => "CUT (partition)".to_owned(),
                Some(d) if d.is_empty() => "LOST".to_owned(),
                Some(d) => d
                    .iter()
                    .map(|x| format!("+{x}ms"))
                    .collect::<Vec<_>>()
                    .join(" "),
            };
            let (a, b) = (self.name(from), self.name(to));
            self.trace(|| format!("{a:>4} -> {b:<4} {:<16} {}", f, summary(&data)));
        }
        if from == lb_addr()
            && matches!(self.node(to), Some(Node::Ua(_)))
            && let Some(m) = Msg::parse(&data)
            && !m.is_request()
            && m.status() >= 200
        {
            let e = self
                .finals_to_ua
                .entry((m.call_id().to_owned(), m.cseq().0))
                .or_default();
            e.0 += 1;
            e.1 += u32::from(fate.as_ref().is_some_and(|d| !d.is_empty()));
        }
        match fate {
            None => self.cov.lost += 1,
            Some(d) if d.is_empty() => self.cov.lost += 1,
            Some(d) => {
                for x in d {
                    self.schedule(
                        self.now + x,
                        Kind::Deliver {
                            from,
                            to,
                            data: data.clone(),
                        },
                        !probe,
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// User agents

#[derive(Debug)]
struct UInv {
    cseq: u32,
    branch: String,
    bytes: Vec<u8>,
    sent_at: u64,
    provisional: bool,
    ringing: bool,
    final_: Option<(u16, String)>,
    gave_up: Option<&'static str>,
    /// The ACK of a non-2xx final (re-sent on each copy of it).
    ack: Option<Vec<u8>>,
    ok_servers: BTreeSet<String>,
    cancel: Option<UNon>,
    cancel_planned: bool,
}

#[derive(Debug)]
struct UNon {
    method: &'static str,
    cseq: u32,
    branch: String,
    bytes: Vec<u8>,
    to: SocketAddr,
    sent_at: u64,
    final_: Option<(u16, String)>,
    timed_out: bool,
}

#[derive(Debug)]
struct UDlg {
    remote_tag: String,
    route: Vec<String>,
    target: String,
    server: String,
    ended: bool,
    ack: Vec<u8>,
    next_hop: SocketAddr,
}

struct Ua {
    k: usize,
    addr: SocketAddr,
    call_id: String,
    tag: String,
    plan: Plan,
    invites: Vec<UInv>,
    dialog: Option<UDlg>,
    bye: Option<UNon>,
    req: Option<UNon>,
    branches: u32,
    retried_auth: bool,
}

impl Ua {
    fn new(k: usize, plan: Plan) -> Ua {
        let p = match plan.kind {
            CallKind::Invite => 'c',
            CallKind::Message => 'm',
            CallKind::Register => 'r',
        };
        Ua {
            k,
            addr: ua_addr(k),
            call_id: format!("{p}{k}@sim"),
            tag: format!("ua{k}"),
            plan,
            invites: Vec::new(),
            dialog: None,
            bye: None,
            req: None,
            branches: 0,
            retried_auth: false,
        }
    }

    fn new_branch(&mut self) -> String {
        self.branches += 1;
        format!("z9hG4bKua{}b{}", self.k, self.branches)
    }

    fn via(&self, branch: &str) -> String {
        format!("SIP/2.0/UDP {};branch={branch};rport", self.addr)
    }

    fn from(&self) -> String {
        format!(
            "\"Alice {k}\" <sip:alice{k}@example.com>;tag={}",
            self.tag,
            k = self.k
        )
    }

    fn invite_bytes(&self, cseq: u32, branch: &str, auth: bool) -> Vec<u8> {
        let body = format!(
            "v=0\r\no=- {k} 1 IN IP4 127.0.0.100\r\ns=call {k}\r\n",
            k = self.k
        );
        let auth = if auth {
            "Authorization: Digest username=\"alice\", realm=\"sim\", nonce=\"n\", uri=\"sip:bob@example.com\", response=\"0\"\r\n"
        } else {
            ""
        };
        format!(
            "INVITE sip:bob@example.com SIP/2.0\r\nVia: {}\r\nMax-Forwards: 70\r\n\
             From: {}\r\nTo: <sip:bob@example.com>\r\nCall-ID: {}\r\nCSeq: {cseq} INVITE\r\n\
             Contact: <sip:alice{}@{}>\r\n{auth}Content-Type: application/sdp\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.via(branch),
            self.from(),
            self.call_id,
            self.k,
            self.addr,
            body.len()
        )
        .into_bytes()
    }

    fn send(&self, ctx: &mut Ctx, to: SocketAddr, b: Vec<u8>) {
        ctx.send(self.addr, to, b);
    }

    fn start_invite(&mut self, ctx: &mut Ctx, auth: bool) {
        let cseq = self.invites.len() as u32 + 1;
        let branch = self.new_branch();
        let bytes = self.invite_bytes(cseq, &branch, auth);
        self.send(ctx, lb_addr(), bytes.clone());
        let inv = self.invites.len();
        self.invites.push(UInv {
            cseq,
            branch,
            bytes,
            sent_at: ctx.now,
            provisional: false,
            ringing: false,
            final_: None,
            gave_up: None,
            ack: None,
            ok_servers: BTreeSet::new(),
            cancel: None,
            cancel_planned: false,
        });
        ctx.ua_after(T1, self.k, UaT::TimerA { inv, n: 0 });
        ctx.ua_after(TXN, self.k, UaT::TimerB { inv });
    }

    fn non_invite(&mut self, ctx: &mut Ctx, method: &'static str) -> UNon {
        let branch = self.new_branch();
        let (ruri, to, extra, body) = match method {
            "MESSAGE" => (
                "sip:bob@example.com".to_owned(),
                "<sip:bob@example.com>".to_owned(),
                "Content-Type: text/plain\r\n",
                format!("hello {}", self.k),
            ),
            _ => (
                "sip:example.com".to_owned(),
                format!("<sip:alice{}@example.com>", self.k),
                "Expires: 600\r\n",
                String::new(),
            ),
        };
        let contact = if method == "REGISTER" {
            format!("Contact: <sip:alice{}@{}>\r\n", self.k, self.addr)
        } else {
            String::new()
        };
        let bytes = format!(
            "{method} {ruri} SIP/2.0\r\nVia: {}\r\nMax-Forwards: 70\r\nFrom: {}\r\nTo: {to}\r\n\
             Call-ID: {}\r\nCSeq: 1 {method}\r\n{contact}{extra}Content-Length: {}\r\n\r\n{body}",
            self.via(&branch),
            self.from(),
            self.call_id,
            body.len()
        )
        .into_bytes();
        self.send(ctx, lb_addr(), bytes.clone());
        ctx.ua_after(
            T1,
            self.k,
            UaT::Retx {
                which: Which::Req,
                n: 0,
            },
        );
        ctx.ua_after(TXN, self.k, UaT::TimerF { which: Which::Req });
        UNon {
            method,
            cseq: 1,
            branch,
            bytes,
            to: lb_addr(),
            sent_at: ctx.now,
            final_: None,
            timed_out: false,
        }
    }

    fn non(&mut self, w: Which) -> Option<&mut UNon> {
        match w {
            Which::Cancel(i) => self.invites.get_mut(i).and_then(|x| x.cancel.as_mut()),
            Which::Bye => self.bye.as_mut(),
            Which::Req => self.req.as_mut(),
        }
    }

    fn on_timer(&mut self, ctx: &mut Ctx, t: UaT) {
        match t {
            UaT::Start => match self.plan.kind {
                CallKind::Invite => self.start_invite(ctx, false),
                CallKind::Message => self.req = Some(self.non_invite(ctx, "MESSAGE")),
                CallKind::Register => self.req = Some(self.non_invite(ctx, "REGISTER")),
            },
            UaT::TimerA { inv, n } => {
                let x = &self.invites[inv];
                if x.provisional || x.final_.is_some() || x.gave_up.is_some() {
                    return;
                }
                let b = x.bytes.clone();
                self.send(ctx, lb_addr(), b);
                let next = T1 << (n + 1);
                if x.sent_at + TXN > ctx.now + next {
                    ctx.ua_after(next, self.k, UaT::TimerA { inv, n: n + 1 });
                }
            }
            UaT::TimerB { inv } => {
                let x = &mut self.invites[inv];
                if !x.provisional && x.final_.is_none() && x.gave_up.is_none() {
                    x.gave_up = Some("Timer B: no response at all in 64*T1 (Calling)");
                    ctx.trace(|| format!("ua{} gives up INVITE cseq {} (Timer B)", self.k, x.cseq));
                }
            }
            UaT::Cancel { inv } => self.send_cancel(ctx, inv),
            UaT::CancelGiveUp { inv } => {
                let x = &mut self.invites[inv];
                if x.final_.is_none() && x.gave_up.is_none() {
                    x.gave_up = Some("no final 64*T1 after its CANCEL (RFC 3261 9.1)");
                    ctx.trace(|| {
                        format!("ua{} gives up INVITE cseq {} after CANCEL", self.k, x.cseq)
                    });
                }
            }
            UaT::Retx { which, n } => {
                let k = self.k;
                let addr = self.addr;
                let Some(x) = self.non(which) else { return };
                if x.final_.is_some() || x.timed_out {
                    return;
                }
                let (b, to) = (x.bytes.clone(), x.to);
                let next = (T1 << (n + 1)).min(T2);
                if x.sent_at + TXN > ctx.now + next {
                    ctx.ua_after(next, k, UaT::Retx { which, n: n + 1 });
                }
                ctx.send(addr, to, b);
            }
            UaT::TimerF { which } => {
                let k = self.k;
                let Some(x) = self.non(which) else { return };
                if x.final_.is_none() {
                    x.timed_out = true;
                    let m = x.method;
                    ctx.trace(|| format!("ua{k} {m}: Timer F, no final"));
                    if which == Which::Bye
                        && let Some(d) = &mut self.dialog
                    {
                        // §15.1.1: the dialog is over for the UA anyway
                        // (the server's end is checked at the server).
                        d.ended = true;
                        *ctx.cov.ua_gave_up.entry("BYE Timer F").or_default() += 1;
                    }
                }
            }
            UaT::Bye => self.send_bye(ctx),
            UaT::AuthRetry => {
                ctx.cov.auth_retries += 1;
                self.start_invite(ctx, true);
            }
        }
    }

    fn send_cancel(&mut self, ctx: &mut Ctx, inv: usize) {
        let via = self.via(&self.invites[inv].branch);
        let from = self.from();
        let x = &mut self.invites[inv];
        if x.cancel.is_some() || x.final_.is_some() || x.gave_up.is_some() {
            return;
        }
        // RFC 3261 9.1: never before a provisional response.
        assert!(x.provisional, "the UA cancels only after a provisional");
        let bytes = format!(
            "CANCEL sip:bob@example.com SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\nFrom: {from}\r\n\
             To: <sip:bob@example.com>\r\nCall-ID: {}\r\nCSeq: {} CANCEL\r\nContent-Length: 0\r\n\r\n",
            self.call_id, x.cseq
        )
        .into_bytes();
        x.cancel = Some(UNon {
            method: "CANCEL",
            cseq: x.cseq,
            branch: x.branch.clone(),
            bytes: bytes.clone(),
            to: lb_addr(),
            sent_at: ctx.now,
            final_: None,
            timed_out: false,
        });
        ctx.cov.ua_cancels += 1;
        ctx.send(self.addr, lb_addr(), bytes);
        ctx.ua_after(
            T1,
            self.k,
            UaT::Retx {
                which: Which::Cancel(inv),
                n: 0,
            },
        );
        ctx.ua_after(
            TXN,
            self.k,
            UaT::TimerF {
                which: Which::Cancel(inv),
            },
        );
        ctx.ua_after(TXN, self.k, UaT::CancelGiveUp { inv });
    }

    fn in_dialog(&self, d: &UDlg, method: &str, cseq: u32, branch: &str) -> Vec<u8> {
        let mut routes = String::new();
        for r in &d.route {
            routes.push_str("Route: ");
            routes.push_str(r);
            routes.push_str("\r\n");
        }
        format!(
            "{method} {} SIP/2.0\r\nVia: {}\r\nMax-Forwards: 70\r\n{routes}From: {}\r\n\
             To: <sip:bob@example.com>;tag={}\r\nCall-ID: {}\r\nCSeq: {cseq} {method}\r\n\
             Content-Length: 0\r\n\r\n",
            d.target,
            self.via(branch),
            self.from(),
            d.remote_tag,
            self.call_id
        )
        .into_bytes()
    }

    fn send_bye(&mut self, ctx: &mut Ctx) {
        if self.bye.is_some() {
            return;
        }
        let Some(d) = &self.dialog else { return };
        if d.ended {
            return;
        }
        let cseq = self.invites.last().map_or(1, |x| x.cseq) + 1;
        let branch = self.new_branch();
        let d = self.dialog.as_ref().expect("dialog");
        let bytes = self.in_dialog(d, "BYE", cseq, &branch);
        let to = d.next_hop;
        ctx.send(self.addr, to, bytes.clone());
        self.bye = Some(UNon {
            method: "BYE",
            cseq,
            branch,
            bytes,
            to,
            sent_at: ctx.now,
            final_: None,
            timed_out: false,
        });
        ctx.ua_after(
            T1,
            self.k,
            UaT::Retx {
                which: Which::Bye,
                n: 0,
            },
        );
        ctx.ua_after(TXN, self.k, UaT::TimerF { which: Which::Bye });
    }

    fn on_datagram(&mut self, ctx: &mut Ctx, from: SocketAddr, data: &[u8]) {
        if from != lb_addr() {
            return ctx.fail(
                Check::Core,
                format!("ua{} got a datagram from {from}", self.k),
            );
        }
        let Some(m) = Msg::parse(data) else {
            return ctx.fail(
                Check::Core,
                format!("ua{} got an unparseable datagram", self.k),
            );
        };
        if m.call_id() != self.call_id {
            return ctx.fail(
                Check::Core,
                format!(
                    "ua{} got Call-ID {} (its own: {})",
                    self.k,
                    m.call_id(),
                    self.call_id
                ),
            );
        }
        if m.is_request() {
            return self.on_request(ctx, &m);
        }
        if m.via_count() != 1 || via_dest(m.top_via()) != Some(self.addr) {
            return ctx.fail(
                Check::Core,
                format!(
                    "ua{} got a response whose Vias are not just its own: {}",
                    self.k,
                    summary(data)
                ),
            );
        }
        let (cseq, method) = m.cseq();
        let branch = m.branch();
        let code = m.status();
        let tag = m.to_tag().unwrap_or("").to_owned();
        match method {
            "INVITE" => {
                let Some(inv) = self
                    .invites
                    .iter()
                    .position(|x| x.cseq == cseq && x.branch == branch)
                else {
                    return ctx.fail(
                        Check::Core,
                        format!(
                            "ua{}: INVITE response for no transaction: {}",
                            self.k,
                            summary(data)
                        ),
                    );
                };
                self.invite_response(ctx, inv, &m, code, tag);
            }
            "CANCEL" | "BYE" | "MESSAGE" | "REGISTER" => {
                let k = self.k;
                let w = match method {
                    "CANCEL" => self
                        .invites
                        .iter()
                        .position(|x| x.cseq == cseq)
                        .map(Which::Cancel),
                    "BYE" => Some(Which::Bye),
                    _ => Some(Which::Req),
                };
                let Some(x) = w.and_then(|w| self.non(w)) else {
                    return ctx.fail(
                        Check::Core,
                        format!(
                            "ua{k}: {method} response for no transaction: {}",
                            summary(data)
                        ),
                    );
                };
                if x.branch != branch || x.method != method {
                    return ctx.fail(
                        Check::Core,
                        format!(
                            "ua{k}: {method} response with a branch it did not send: {}",
                            summary(data)
                        ),
                    );
                }
                if code < 200 || x.timed_out {
                    return;
                }
                match &x.final_ {
                    None => {
                        x.final_ = Some((code, tag));
                        if method == "BYE"
                            && let Some(d) = &mut self.dialog
                        {
                            d.ended = true;
                        }
                    }
                    // A REGISTER may be forked again when the UA
                    // retransmits after the fork ended: the UA keeps the
                    // first final and absorbs the rest (Completed).
                    Some(_) if method == "REGISTER" => {}
                    Some(prev) if *prev != (code, tag.clone()) => {
                        let prev = prev.clone();
                        ctx.fail(
                            Check::Final,
                            format!(
                                "ua{k}: {method} got two distinct finals: {} {} then {code} {}",
                                prev.0,
                                tag_owner(&prev.1),
                                tag_owner(&tag)
                            ),
                        );
                    }
                    Some(_) => {}
                }
            }
            _ => ctx.fail(
                Check::Core,
                format!(
                    "ua{}: response to a method it never sent: {}",
                    self.k,
                    summary(data)
                ),
            ),
        }
    }

    fn invite_response(&mut self, ctx: &mut Ctx, inv: usize, m: &Msg<'_>, code: u16, tag: String) {
        let k = self.k;
        if code < 200 {
            let x = &mut self.invites[inv];
            if x.final_.is_some() || x.gave_up.is_some() {
                return;
            }
            let first = !x.provisional;
            x.provisional = true;
            if code >= 180 && !x.ringing {
                x.ringing = true;
                if let CancelPlan::Ringing(d) = self.plan.cancel
                    && !x.cancel_planned
                {
                    x.cancel_planned = true;
                    ctx.ua_after(d, k, UaT::Cancel { inv });
                }
            }
            if first
                && let CancelPlan::Early(d) = self.plan.cancel
                && !x.cancel_planned
            {
                x.cancel_planned = true;
                ctx.ua_after(d, k, UaT::Cancel { inv });
            }
            return;
        }
        let two = (200..300).contains(&code);
        if code == 503 && tag_server(&tag).is_some() {
            return ctx.fail(
                Check::Final,
                format!(
                    "ua{k}: a server's 503 passed up (RFC 3261 §16.7 step 6: a proxy sends 500 instead)"
                ),
            );
        }
        {
            let x = &mut self.invites[inv];
            if two {
                x.ok_servers.insert(tag_owner(&tag));
                if x.ok_servers.len() > 1 {
                    let s = format!("{:?}", x.ok_servers);
                    return ctx.fail(
                        Check::OneServer2xx,
                        format!("ua{k}: INVITE cseq {} got 2xx from {s}", x.cseq),
                    );
                }
            }
            if x.gave_up.is_none() {
                match &x.final_ {
                    None => {
                        x.final_ = Some((code, tag.clone()));
                        *ctx.cov.ua_finals.entry(code).or_default() += 1;
                    }
                    Some(prev) if *prev != (code, tag.clone()) => {
                        let prev = prev.clone();
                        return ctx.fail(
                            Check::Final,
                            format!(
                                "ua{k}: INVITE cseq {} got two distinct finals: {} from {} then {code} from {}",
                                x.cseq,
                                prev.0,
                                tag_owner(&prev.1),
                                tag_owner(&tag)
                            ),
                        );
                    }
                    Some(_) => {}
                }
            }
        }
        if two {
            self.on_2xx(ctx, inv, m, tag);
        } else {
            // §17.1.1.3: ACK with the INVITE's branch, on every copy.
            let x = &mut self.invites[inv];
            if x.gave_up.is_some() {
                // No transaction any more: discarded (§17.1.3).
                return;
            }
            if x.ack.is_none() {
                let via = m.top_via();
                x.ack = Some(
                    format!(
                        "ACK sip:bob@example.com SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n\
                         From: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} ACK\r\nContent-Length: 0\r\n\r\n",
                        m.h("from").unwrap_or(""),
                        m.h("to").unwrap_or(""),
                        self.call_id,
                        x.cseq
                    )
                    .into_bytes(),
                );
                if code == 401 && x.cseq == 1 && x.cancel.is_none() && !self.retried_auth {
                    self.retried_auth = true;
                    let d = ctx.rng.random_range(10..200);
                    ctx.ua_after(d, k, UaT::AuthRetry);
                }
            }
            let ack = self.invites[inv].ack.clone().expect("ack");
            ctx.send(self.addr, lb_addr(), ack);
        }
    }

    fn on_2xx(&mut self, ctx: &mut Ctx, inv: usize, m: &Msg<'_>, tag: String) {
        let k = self.k;
        if let Some(d) = &self.dialog {
            if d.remote_tag == tag {
                // A retransmission: the same ACK again (§13.2.2.4).
                let a = d.ack.clone();
                let to = d.next_hop;
                ctx.send(self.addr, to, a);
            } else {
                ctx.fail(
                    Check::OneServer2xx,
                    format!(
                        "ua{k}: a second dialog ({}) after {}",
                        tag_owner(&tag),
                        d.server
                    ),
                );
            }
            return;
        }
        let rr = m.list("record-route");
        let ours = format!("<sip:{};lr;sb=", lb_addr());
        if !rr.iter().any(|r| r.starts_with(&ours)) {
            return ctx.fail(
                Check::Core,
                format!("ua{k}: 2xx without our Record-Route: {rr:?}"),
            );
        }
        let route: Vec<String> = rr.iter().rev().map(|r| (*r).to_owned()).collect();
        let Some(next_hop) = uri_addr(uri_of(&route[0])) else {
            return ctx.fail(Check::Core, format!("ua{k}: bad Record-Route {rr:?}"));
        };
        let Some(target) = m.list("contact").first().map(|c| uri_of(c).to_owned()) else {
            return ctx.fail(Check::Core, format!("ua{k}: 2xx without Contact"));
        };
        let mut d = UDlg {
            remote_tag: tag.clone(),
            route,
            target,
            server: tag_owner(&tag),
            ended: false,
            ack: Vec::new(),
            next_hop,
        };
        let branch = self.new_branch();
        d.ack = self.in_dialog(&d, "ACK", self.invites[inv].cseq, &branch);
        ctx.send(self.addr, next_hop, d.ack.clone());
        self.dialog = Some(d);
        let x = &self.invites[inv];
        if x.cancel.is_some() || x.gave_up.is_some() {
            // It wanted no call (CANCEL lost the race, or it had given up):
            // the 2xx is ACKed and the call hung up at once (§9.1, §15).
            let d = ctx.rng.random_range(10..100);
            ctx.ua_after(d, k, UaT::Bye);
        } else if !self.plan.callee_hangs_up {
            ctx.ua_after(self.plan.hold, k, UaT::Bye);
        }
    }

    fn on_request(&mut self, ctx: &mut Ctx, m: &Msg<'_>) {
        let k = self.k;
        if m.method() != "BYE" {
            return ctx.fail(
                Check::Core,
                format!("ua{k} got an unexpected request {}", m.first),
            );
        }
        let live = match &mut self.dialog {
            Some(d)
                if m.tag_of_from() == Some(d.remote_tag.as_str())
                    && m.to_tag() == Some(self.tag.as_str()) =>
            {
                let was = !d.ended;
                d.ended = true;
                ctx.cov.callee_byes += u64::from(was);
                true
            }
            _ => false,
        };
        let (code, reason) = if live {
            (200, "OK")
        } else {
            (481, "Call/Transaction Does Not Exist")
        };
        let Some(to) = via_dest(m.top_via()) else {
            return ctx.fail(Check::Core, format!("ua{k}: BYE with a bad Via"));
        };
        let r = response(m, code, reason, None, "");
        ctx.send(self.addr, to, r);
    }

    /// End of run: check 1 and the dialog's end.
    fn end_checks(&self, ctx: &mut Ctx) {
        let k = self.k;
        for x in &self.invites {
            if x.final_.is_none() && x.gave_up.is_none() {
                ctx.fail(
                    Check::Final,
                    format!(
                        "ua{k}: INVITE cseq {} never got a final (provisional: {}, cancelled: {})",
                        x.cseq,
                        x.provisional,
                        x.cancel.is_some()
                    ),
                );
            }
            if let Some(r) = x.gave_up {
                *ctx.cov.ua_gave_up.entry(r).or_default() += 1;
            }
            if let Some(c) = &x.cancel
                && c.final_.is_none()
            {
                ctx.fail(Check::Final, format!("ua{k}: CANCEL never answered"));
            }
        }
        if let Some(r) = &self.req {
            if r.final_.is_none() {
                let key = (self.call_id.clone(), r.cseq);
                let answered = ctx.nonin_finals.get(&key).and_then(|v| {
                    v.iter()
                        .find(|(_, code, at)| *code != 503 && *at + 5_000 <= r.sent_at + TXN)
                        .copied()
                });
                // Every final relayed to the UA lost on the way: bad luck.
                let unlucky = ctx
                    .finals_to_ua
                    .get(&key)
                    .is_some_and(|&(sent, delivered)| sent > 0 && delivered == 0);
                if let Some((s, code, at)) = answered.filter(|_| !unlucky) {
                    ctx.fail(
                        Check::Final,
                        format!(
                            "ua{k}: {} timed out although s{} answered {code} at {:.3}s",
                            r.method,
                            s + 1,
                            at as f64 / 1000.0
                        ),
                    );
                } else if r.method == "MESSAGE" {
                    *ctx.cov.ua_gave_up.entry("MESSAGE Timer F").or_default() += 1;
                } else {
                    *ctx.cov.ua_gave_up.entry("REGISTER Timer F").or_default() += 1;
                }
            } else if let Some((c, _)) = &r.final_ {
                *ctx.cov.ua_finals.entry(*c).or_default() += 1;
            }
        }
        if let Some(d) = &self.dialog
            && !d.ended
        {
            ctx.fail(
                Check::Dialog,
                format!(
                    "ua{k}: dialog with {} never ended (BYE: {:?})",
                    d.server,
                    self.bye.as_ref().map(|b| (&b.final_, b.timed_out))
                ),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Servers

#[derive(Debug)]
struct SInv {
    call_id: String,
    cseq: u32,
    req: Vec<u8>,
    beh: InvB,
    tag: String,
    script: Vec<(u64, u16)>,
    prov_sent: bool,
    last_prov: Option<Vec<u8>>,
    final_code: Option<u16>,
    final_bytes: Option<Vec<u8>>,
    final_at: u64,
    acked: bool,
    dead: bool,
    cancelled: bool,
}

#[derive(Debug)]
struct SDlg {
    remote_tag: String,
    route: Vec<String>,
    target: String,
    confirmed: bool,
    ended: bool,
    bye_planned: bool,
}

#[derive(Debug)]
struct SBye {
    bytes: Vec<u8>,
    to: SocketAddr,
    sent_at: u64,
    final_: Option<u16>,
}

#[derive(Debug)]
struct SNon {
    req: Vec<u8>,
    final_: Option<Vec<u8>>,
    code: u16,
}

struct Srv {
    i: usize,
    id: String,
    addr: SocketAddr,
    prof: Profile,
    invites: HashMap<String, SInv>,
    nonin: HashMap<(String, String), SNon>,
    dialogs: HashMap<(String, String), SDlg>,
    messages: HashMap<(String, u32), String>,
    byes: HashMap<String, SBye>,
    tags: u32,
    /// Branches of every INVITE it got, in order (for the end checks).
    order: Vec<String>,
}

impl Srv {
    fn new(i: usize, prof: Profile) -> Srv {
        Srv {
            i,
            id: format!("s{}", i + 1),
            addr: srv_addr(i),
            prof,
            invites: HashMap::new(),
            nonin: HashMap::new(),
            dialogs: HashMap::new(),
            messages: HashMap::new(),
            byes: HashMap::new(),
            tags: 0,
            order: Vec::new(),
        }
    }

    fn new_tag(&mut self) -> String {
        self.tags += 1;
        format!("s{}x{}", self.i + 1, self.tags)
    }

    fn reply_to(&self, ctx: &mut Ctx, m: &Msg<'_>, bytes: Vec<u8>) {
        match via_dest(m.top_via()) {
            Some(to) => ctx.send(self.addr, to, bytes),
            None => ctx.fail(Check::Core, format!("{}: request with a bad Via", self.id)),
        }
    }

    fn on_datagram(&mut self, ctx: &mut Ctx, from: SocketAddr, data: &[u8]) {
        let id = self.id.clone();
        if from != lb_addr() {
            return ctx.fail(Check::Core, format!("{id} got a datagram from {from}"));
        }
        let Some(m) = Msg::parse(data) else {
            return ctx.fail(Check::Core, format!("{id} got an unparseable datagram"));
        };
        if !m.is_request() {
            return self.on_response(ctx, &m);
        }
        match m.method() {
            "INVITE" => self.on_invite(ctx, &m, data),
            "ACK" => self.on_ack(ctx, &m),
            "CANCEL" => self.on_cancel(ctx, &m),
            "BYE" => self.on_bye(ctx, &m),
            "MESSAGE" | "REGISTER" | "OPTIONS" => self.on_non_invite(ctx, &m, data),
            other => ctx.fail(Check::Core, format!("{id} got an unexpected {other}")),
        }
    }

    fn on_invite(&mut self, ctx: &mut Ctx, m: &Msg<'_>, data: &[u8]) {
        let branch = m.branch().to_owned();
        if let Some(x) = self.invites.get(&branch) {
            // A retransmission: absorbed, the last response again (§17.2.1).
            if x.dead {
                return;
            }
            if let Some(b) = x.final_bytes.clone().or_else(|| x.last_prov.clone()) {
                self.reply_to(ctx, m, b);
            }
            return;
        }
        if m.to_tag().is_some() {
            return ctx.fail(
                Check::Core,
                format!("{}: re-INVITE never sent by a UA", self.id),
            );
        }
        let (cseq, _) = m.cseq();
        let key = (m.call_id().to_owned(), cseq);
        let others = ctx.invite_at.entry(key).or_default();
        others.insert(self.i);
        if others.len() == 2 {
            ctx.cov.failed_over_invites += 1;
        }
        let mut beh = pick(&mut ctx.rng, &self.prof.invite);
        if m.h("authorization").is_some() {
            while beh == InvB::Challenge {
                beh = pick(&mut ctx.rng, &self.prof.invite);
            }
        }
        let r = &mut ctx.rng;
        let mut script = Vec::new();
        if self.prof.send100 && !matches!(beh, InvB::Silent | InvB::Late200) {
            script.push((r.random_range(0..20), 100));
        }
        let ring = r.random_range(20..400);
        match beh {
            InvB::Normal => {
                script.push((ring, 180));
                script.push((ring + r.random_range(100..3_000), 200));
            }
            InvB::Busy => {
                script.push((ring, 180));
                script.push((ring + r.random_range(100..1_500), 486));
            }
            InvB::Reject503 => script.push((r.random_range(5..150), 503)),
            InvB::Silent => {}
            InvB::RingForever | InvB::DieAfter180 => script.push((ring, 180)),
            InvB::Late200 => script.push((r.random_range(600..2_500), 200)),
            InvB::RingThenLate200 => {
                script.push((ring, 180));
                script.push((ring + r.random_range(4_000..6_500), 200));
            }
            InvB::Challenge => script.push((r.random_range(5..80), 401)),
        }
        for (idx, (d, _)) in script.iter().enumerate() {
            ctx.srv_after(
                *d,
                self.i,
                SrvT::Step {
                    branch: branch.clone(),
                    idx,
                },
            );
        }
        let tag = self.new_tag();
        ctx.trace(|| format!("{} INVITE {} {cseq}: {beh:?}", self.id, m.call_id()));
        self.order.push(branch.clone());
        self.invites.insert(
            branch,
            SInv {
                call_id: m.call_id().to_owned(),
                cseq,
                req: data.to_vec(),
                beh,
                tag,
                script,
                prov_sent: false,
                last_prov: None,
                final_code: None,
                final_bytes: None,
                final_at: 0,
                acked: false,
                dead: false,
                cancelled: false,
            },
        );
    }

    fn on_timer(&mut self, ctx: &mut Ctx, t: SrvT) {
        match t {
            SrvT::Step { branch, idx } => {
                let Some(x) = self.invites.get(&branch) else {
                    return;
                };
                if x.dead || x.final_code.is_some() {
                    return;
                }
                let code = x.script[idx].1;
                if code < 200 {
                    self.provisional(ctx, &branch, code);
                } else {
                    self.final_(ctx, &branch, code);
                }
            }
            SrvT::Retx { branch, n } => self.retransmit(ctx, &branch, n),
            SrvT::NonFinal { key } => {
                let Some(x) = self.nonin.get_mut(&key) else {
                    return;
                };
                let req = x.req.clone();
                let m = Msg::parse(&req).expect("own copy");
                let (code, reason, extra) = match x.code {
                    200 => (200, "OK", ""),
                    503 => (503, "Service Unavailable", "Retry-After: 1\r\n"),
                    _ => (
                        401,
                        "Unauthorized",
                        "WWW-Authenticate: Digest realm=\"sim\", nonce=\"n\"\r\n",
                    ),
                };
                let tag = format!("s{}x0", self.i + 1);
                let r = response(&m, code, reason, Some(&tag), extra);
                x.final_ = Some(r.clone());
                let (cseq, method) = m.cseq();
                if method != "OPTIONS" {
                    ctx.nonin_finals
                        .entry((m.call_id().to_owned(), cseq))
                        .or_default()
                        .push((self.i, code, ctx.now));
                }
                if method == "MESSAGE"
                    && code == 503
                    && let Some(v) = ctx.message_at.get_mut(&(m.call_id().to_owned(), cseq))
                    && let Some(e) = v.iter_mut().find(|(s, _)| *s == self.i)
                {
                    e.1 = true;
                }
                self.reply_to(ctx, &m, r);
            }
            SrvT::Bye { dialog } => self.send_bye(ctx, &dialog),
            SrvT::ByeRetx { branch, n } => {
                let Some(b) = self.byes.get(&branch) else {
                    return;
                };
                if b.final_.is_some() || ctx.now >= b.sent_at + TXN {
                    return;
                }
                let (bytes, to) = (b.bytes.clone(), b.to);
                ctx.send(self.addr, to, bytes);
                let next = (T1 << (n + 1)).min(T2);
                ctx.srv_after(next, self.i, SrvT::ByeRetx { branch, n: n + 1 });
            }
        }
    }

    fn contact(&self) -> String {
        format!("Contact: <sip:bob@{}>\r\n", self.addr)
    }

    fn provisional(&mut self, ctx: &mut Ctx, branch: &str, code: u16) {
        let contact = self.contact();
        let x = self.invites.get_mut(branch).expect("txn");
        let req = x.req.clone();
        let m = Msg::parse(&req).expect("own copy");
        let (reason, tag, extra) = if code == 100 {
            ("Trying", None, String::new())
        } else {
            let mut e = String::new();
            for rr in m.lines("record-route") {
                e.push_str(&format!("Record-Route: {rr}\r\n"));
            }
            e.push_str(&contact);
            ("Ringing", Some(x.tag.as_str()), e)
        };
        let r = response(&m, code, reason, tag, &extra);
        x.prov_sent = true;
        x.last_prov = Some(r.clone());
        if x.beh == InvB::DieAfter180 && code == 180 {
            x.dead = true;
        }
        self.reply_to(ctx, &m, r);
    }

    fn final_(&mut self, ctx: &mut Ctx, branch: &str, code: u16) {
        let contact = self.contact();
        let x = self.invites.get_mut(branch).expect("txn");
        let req = x.req.clone();
        let m = Msg::parse(&req).expect("own copy");
        let mut extra = String::new();
        let reason = match code {
            200 => {
                for rr in m.lines("record-route") {
                    extra.push_str(&format!("Record-Route: {rr}\r\n"));
                }
                extra.push_str(&contact);
                "OK"
            }
            401 => {
                extra.push_str("WWW-Authenticate: Digest realm=\"sim\", nonce=\"n\"\r\n");
                "Unauthorized"
            }
            486 => "Busy Here",
            487 => "Request Terminated",
            503 => {
                extra.push_str("Retry-After: 1\r\n");
                "Service Unavailable"
            }
            _ => "Whatever",
        };
        let r = response(&m, code, reason, Some(&x.tag), &extra);
        x.final_code = Some(code);
        x.final_bytes = Some(r.clone());
        x.final_at = ctx.now;
        if (200..300).contains(&code) {
            ctx.invite_2xx_at
                .entry((x.call_id.clone(), x.cseq))
                .or_insert(ctx.now);
        }
        if code == 200 {
            let route = m
                .list("record-route")
                .iter()
                .map(|r| (*r).to_owned())
                .collect();
            let target = m
                .list("contact")
                .first()
                .map(|c| uri_of(c).to_owned())
                .unwrap_or_default();
            self.dialogs.insert(
                (x.call_id.clone(), x.tag.clone()),
                SDlg {
                    remote_tag: m.tag_of_from().unwrap_or("").to_owned(),
                    route,
                    target,
                    confirmed: false,
                    ended: false,
                    bye_planned: false,
                },
            );
        }
        self.reply_to(ctx, &m, r);
        ctx.srv_after(
            T1,
            self.i,
            SrvT::Retx {
                branch: branch.to_owned(),
                n: 0,
            },
        );
    }

    /// Timer G (and the 2xx's retransmission by the UAS core, §13.3.1.4)
    /// until the ACK; Timer H after 64 × T1.
    fn retransmit(&mut self, ctx: &mut Ctx, branch: &str, n: u32) {
        let x = self.invites.get(branch).expect("txn");
        if x.acked || x.dead {
            return;
        }
        let key = (x.call_id.clone(), x.tag.clone());
        if x.final_code == Some(200) && self.dialogs.get(&key).is_some_and(|d| d.ended) {
            return;
        }
        if ctx.now >= x.final_at + TXN {
            if x.final_code == Some(200) {
                ctx.trace(|| format!("{}: 2xx never ACKed: BYE", self.id));
                self.send_bye(ctx, &key);
            }
            return;
        }
        let m = Msg::parse(&x.req).expect("own copy");
        let b = x.final_bytes.clone().expect("final");
        self.reply_to(ctx, &m, b);
        let next = (T1 << (n + 1)).min(T2);
        ctx.srv_after(
            next,
            self.i,
            SrvT::Retx {
                branch: branch.to_owned(),
                n: n + 1,
            },
        );
    }

    fn on_ack(&mut self, ctx: &mut Ctx, m: &Msg<'_>) {
        let id = self.id.clone();
        let branch = m.branch();
        if let Some(x) = self.invites.get_mut(branch) {
            if x.dead {
                return;
            }
            match x.final_code {
                None => ctx.fail(
                    Check::NonSuccessAck,
                    format!("{id}: ACK for INVITE {} before any final", x.call_id),
                ),
                Some(200..=299) => ctx.fail(
                    Check::Dialog,
                    format!(
                        "{id}: ACK with the INVITE's branch for a 2xx ({})",
                        x.call_id
                    ),
                ),
                Some(_) => x.acked = true,
            }
            return;
        }
        let cid = m.call_id().to_owned();
        let tag = m.to_tag().unwrap_or("").to_owned();
        let i = self.i;
        if let Some(d) = self.dialogs.get_mut(&(cid.clone(), tag.clone())) {
            if !d.confirmed {
                d.confirmed = true;
                let plan = call_index(&cid).and_then(|k| ctx.plans.get(k)).copied();
                if let Some(p) = plan
                    && p.callee_hangs_up
                    && !d.bye_planned
                    && !d.ended
                {
                    d.bye_planned = true;
                    ctx.srv_after(
                        p.hold,
                        i,
                        SrvT::Bye {
                            dialog: (cid.clone(), tag.clone()),
                        },
                    );
                }
            }
            if let Some(x) = self
                .invites
                .values_mut()
                .find(|x| x.call_id == cid && x.tag == tag && x.final_code == Some(200))
            {
                x.acked = true;
            }
            return;
        }
        // A non-2xx ACK with another branch than its INVITE's (it went
        // without the transaction), or an ACK of a dialog of another server.
        let non2xx = self
            .invites
            .values()
            .any(|x| x.call_id == cid && x.tag == tag && x.final_code.is_some_and(|c| c >= 300));
        if non2xx {
            return ctx.fail(
                Check::NonSuccessAck,
                format!(
                    "{id}: ACK of its non-2xx final for {cid} with a branch of no INVITE it got"
                ),
            );
        }
        ctx.fail(
            Check::Dialog,
            format!("{id}: ACK for {cid} to-tag {tag} matches no transaction or dialog here"),
        );
    }

    fn on_cancel(&mut self, ctx: &mut Ctx, m: &Msg<'_>) {
        let id = self.id.clone();
        ctx.cov.server_cancels += 1;
        let branch = m.branch().to_owned();
        let key = (branch.clone(), "CANCEL".to_owned());
        if let Some(x) = self.nonin.get(&key) {
            if let Some(b) = x.final_.clone() {
                self.reply_to(ctx, m, b);
            }
            return;
        }
        let Some(x) = self.invites.get_mut(&branch) else {
            // A CANCEL the balancer sent to every server because it has no
            // state for it any more: its INVITE was answered 2xx long enough
            // ago (the balancer keeps an answered call's transaction T4 =
            // 5 s) and its session has ended. Harmless (481), and the
            // documented fallback for a restarted balancer.
            let key = (m.call_id().to_owned(), m.cseq().0);
            if ctx
                .invite_2xx_at
                .get(&key)
                .is_some_and(|&at| ctx.now >= at + 4_500)
            {
                let r = response(m, 481, "Call/Transaction Does Not Exist", Some("c"), "");
                return self.reply_to(ctx, m, r);
            }
            ctx.fail(
                Check::Cancel,
                format!(
                    "{id}: CANCEL for {} with a branch of no INVITE it got",
                    m.call_id()
                ),
            );
            let r = response(m, 481, "Call/Transaction Does Not Exist", Some("c"), "");
            return self.reply_to(ctx, m, r);
        };
        if !x.prov_sent {
            return ctx.fail(
                Check::Cancel,
                format!(
                    "{id}: CANCEL for {} before any provisional response",
                    x.call_id
                ),
            );
        }
        if x.dead {
            return;
        }
        x.cancelled = true;
        let r = response(m, 200, "OK", Some(&x.tag), "");
        let pending = x.final_code.is_none();
        self.nonin.insert(
            key,
            SNon {
                req: Vec::new(),
                final_: Some(r.clone()),
                code: 200,
            },
        );
        self.reply_to(ctx, m, r);
        if pending {
            self.final_(ctx, &branch, 487);
        }
    }

    fn on_bye(&mut self, ctx: &mut Ctx, m: &Msg<'_>) {
        let id = self.id.clone();
        let branch = m.branch().to_owned();
        let key = (branch.clone(), "BYE".to_owned());
        if let Some(x) = self.nonin.get(&key) {
            if let Some(b) = x.final_.clone() {
                self.reply_to(ctx, m, b);
            }
            return;
        }
        if local_leg(&branch) {
            ctx.cov.lb_byes += 1;
        }
        let cid = m.call_id().to_owned();
        let tag = m.to_tag().unwrap_or("").to_owned();
        let (code, reason) = match self.dialogs.get_mut(&(cid.clone(), tag.clone())) {
            Some(d) if !d.ended => {
                d.ended = true;
                (200, "OK")
            }
            Some(_) => (481, "Call/Transaction Does Not Exist"),
            None => {
                ctx.fail(
                    Check::Dialog,
                    format!("{id}: BYE for {cid} to-tag {tag}: no such dialog here"),
                );
                (481, "Call/Transaction Does Not Exist")
            }
        };
        let r = response(m, code, reason, None, "");
        self.nonin.insert(
            key,
            SNon {
                req: Vec::new(),
                final_: Some(r.clone()),
                code,
            },
        );
        self.reply_to(ctx, m, r);
    }

    fn on_non_invite(&mut self, ctx: &mut Ctx, m: &Msg<'_>, data: &[u8]) {
        let id = self.id.clone();
        let method = m.method();
        let branch = m.branch().to_owned();
        let key = (branch.clone(), method.to_owned());
        if let Some(x) = self.nonin.get(&key) {
            // A retransmission: the final again if there is one (§17.2.2).
            if let Some(b) = x.final_.clone() {
                self.reply_to(ctx, m, b);
            }
            return;
        }
        if method == "OPTIONS" {
            // Our probes: answered at once.
            let r = response(m, 200, "Probe OK", Some("probe"), "");
            return self.reply_to(ctx, m, r);
        }
        let (cseq, _) = m.cseq();
        let cid = m.call_id().to_owned();
        if method == "MESSAGE" {
            if let Some(b) = self.messages.get(&(cid.clone(), cseq)) {
                return ctx.fail(
                    Check::NoDuplicate,
                    format!(
                        "{id}: MESSAGE {cid} {cseq} again as another transaction ({} then {})",
                        short_branch(b),
                        short_branch(&branch)
                    ),
                );
            }
            self.messages.insert((cid.clone(), cseq), branch.clone());
            let seen = ctx.message_at.entry((cid.clone(), cseq)).or_default();
            if let Some((s, _)) = seen.iter().find(|(s, said503)| *s != self.i && !said503) {
                let s = *s;
                return ctx.fail(
                    Check::NoDuplicate,
                    format!(
                        "{id}: MESSAGE {cid} also at s{} which did not say 503",
                        s + 1
                    ),
                );
            }
            if !seen.is_empty() {
                ctx.cov.message_failovers += 1;
            }
            seen.push((self.i, false));
        }
        if method == "REGISTER" && branch.len() > 23 && branch.as_bytes()[23] == b'f' {
            ctx.cov.register_forks += 1;
        }
        let w = if method == "MESSAGE" {
            &self.prof.message
        } else {
            &self.prof.register
        };
        let b = pick(&mut ctx.rng, w);
        let code = match b {
            NonB::Ok => 200,
            NonB::Fail503 => 503,
            NonB::Challenge => 401,
            NonB::Silent => 0,
        };
        let d = match b {
            NonB::Ok if method == "MESSAGE" => ctx.rng.random_range(10..2_500),
            NonB::Ok => ctx.rng.random_range(5..300),
            _ => ctx.rng.random_range(5..100),
        };
        ctx.trace(|| format!("{id} {method} {cid}: {b:?}"));
        self.nonin.insert(
            key.clone(),
            SNon {
                req: data.to_vec(),
                final_: None,
                code,
            },
        );
        if code != 0 {
            ctx.srv_after(d, self.i, SrvT::NonFinal { key });
        }
    }

    fn send_bye(&mut self, ctx: &mut Ctx, dialog: &(String, String)) {
        let Some(d) = self.dialogs.get_mut(dialog) else {
            return;
        };
        if d.ended {
            return;
        }
        d.ended = true;
        let Some(to) = d.route.first().and_then(|r| uri_addr(uri_of(r))) else {
            return ctx.fail(Check::Core, format!("{}: dialog without a route", self.id));
        };
        self.tags += 1;
        let branch = format!("z9hG4bKsrv{}bye{}", self.i + 1, self.tags);
        let mut routes = String::new();
        for r in &d.route {
            routes.push_str(&format!("Route: {r}\r\n"));
        }
        let bytes = format!(
            "BYE {} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch={branch}\r\nMax-Forwards: 70\r\n{routes}\
             From: <sip:bob@example.com>;tag={}\r\nTo: <sip:alice@example.com>;tag={}\r\n\
             Call-ID: {}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
            d.target, self.addr, dialog.1, d.remote_tag, dialog.0
        )
        .into_bytes();
        ctx.send(self.addr, to, bytes.clone());
        self.byes.insert(
            branch.clone(),
            SBye {
                bytes,
                to,
                sent_at: ctx.now,
                final_: None,
            },
        );
        ctx.srv_after(T1, self.i, SrvT::ByeRetx { branch, n: 0 });
    }

    fn on_response(&mut self, ctx: &mut Ctx, m: &Msg<'_>) {
        let code = m.status();
        let branch = m.branch();
        match self.byes.get_mut(branch) {
            Some(b) if m.cseq().1 == "BYE" => {
                if code >= 200 && b.final_.is_none() {
                    b.final_ = Some(code);
                }
            }
            _ => ctx.fail(
                Check::Core,
                format!(
                    "{}: response for no request of its own: {}",
                    self.id, m.first
                ),
            ),
        }
    }

    /// End of run: checks 2, 3 (no INVITE left ringing) and 4.
    fn end_checks(&self, ctx: &mut Ctx, uas: &[Ua]) {
        let id = &self.id;
        for b in &self.order {
            let x = &self.invites[b];
            let gave_up = call_index(&x.call_id)
                .and_then(|k| uas.get(k))
                .and_then(|u| u.invites.iter().find(|i| i.cseq == x.cseq))
                .is_some_and(|i| i.gave_up.is_some());
            match x.final_code {
                Some(c) if c >= 300 && !x.acked && !x.dead && !gave_up => ctx.fail(
                    Check::NonSuccessAck,
                    format!(
                        "{id}: its {c} for INVITE {} {} (br {}) never got its ACK",
                        x.call_id,
                        x.cseq,
                        short_branch(b)
                    ),
                ),
                None if x.prov_sent
                    && !x.dead
                    && ctx.lb_heard_ringing.contains(&(self.i, b.clone())) =>
                {
                    ctx.fail(
                        Check::Cancel,
                        format!(
                            "{id}: INVITE {} {} ({:?}) still ringing: never CANCELled{}",
                            x.call_id,
                            x.cseq,
                            x.beh,
                            if x.cancelled { " (cancelled?)" } else { "" }
                        ),
                    );
                }
                None if x.prov_sent && !x.dead => ctx.cov.ringing_unheard += 1,
                _ => {}
            }
        }
        let mut dialogs: Vec<_> = self.dialogs.iter().collect();
        dialogs.sort_by(|a, b| a.0.cmp(b.0));
        for ((cid, tag), d) in dialogs {
            if !d.ended {
                ctx.fail(
                    Check::Dialog,
                    format!(
                        "{id}: dialog {cid} {tag} never ended (ACKed: {})",
                        d.confirmed
                    ),
                );
            }
        }
        let mut byes: Vec<_> = self.byes.iter().collect();
        byes.sort_by(|a, b| a.0.cmp(b.0));
        for (br, b) in byes {
            if b.final_.is_none() {
                ctx.fail(Check::Dialog, format!("{id}: its BYE {br} never answered"));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The simulation

enum Input {
    Msg(SocketAddr, Vec<u8>),
    Timer(TimerKey),
    Tick,
}

struct Sim {
    ctx: Ctx,
    router: Router,
    rrng: StdRng,
    base: Instant,
    out: Outbox,
    servers: Vec<Srv>,
    uas: Vec<Ua>,
    rc: RunCfg,
    /// Per server: branches of new-session requests the balancer sent it.
    sent: Vec<HashSet<String>>,
    script_end: u64,
}

impl Sim {
    fn new(seed: u64, verbose: bool) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let rc = RunCfg::draw(&mut rng);
        let base = Instant::now();
        let router =
            Router::new(rc.config(), perf::server::SharedTable::default(), base).expect("router");
        let ctx = Ctx {
            now: 0,
            rng: StdRng::seed_from_u64(seed ^ 0x05ee_d0f0_e70f_5eed),
            heap: BinaryHeap::new(),
            seq: 0,
            loss: rc.loss,
            dup: rc.dup,
            reorder: rc.reorder,
            verbose,
            digest: false,
            violation: None,
            partition_until: vec![0; rc.n_srv],
            n_srv: rc.n_srv,
            n_ua: rc.plans.len(),
            plans: rc.plans.clone(),
            pending: 0,
            last_activity: 0,
            cancel_at_lb: HashMap::new(),
            message_at: HashMap::new(),
            nonin_finals: HashMap::new(),
            finals_to_ua: HashMap::new(),
            invite_at: HashMap::new(),
            invite_2xx_at: HashMap::new(),
            lb_heard_ringing: HashSet::new(),
            cov: Coverage::default(),
        };
        let servers = (0..rc.n_srv)
            .map(|i| Srv::new(i, rc.profiles[i].clone()))
            .collect();
        let uas = rc
            .plans
            .iter()
            .enumerate()
            .map(|(k, p)| Ua::new(k, *p))
            .collect();
        let mut sim = Sim {
            ctx,
            router,
            rrng: StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1),
            base,
            out: Outbox::new(),
            servers,
            uas,
            sent: vec![HashSet::new(); rc.n_srv],
            script_end: 0,
            rc,
        };
        for (k, p) in sim.rc.plans.clone().iter().enumerate() {
            sim.ctx.schedule(p.start, Kind::Ua(k, UaT::Start), true);
            sim.script_end = sim.script_end.max(p.start);
        }
        for &(s, at, d) in &sim.rc.drains.clone() {
            sim.ctx.schedule(at, Kind::Drain(s, d), true);
            sim.script_end = sim.script_end.max(at);
        }
        for &(s, from, until) in &sim.rc.partitions.clone() {
            sim.ctx.schedule(from, Kind::Partition(s, until), true);
            sim.script_end = sim.script_end.max(until);
        }
        sim.ctx.schedule(0, Kind::Tick, false);
        sim.ctx.cov.runs = 1;
        sim.ctx.cov.calls = sim.rc.plans.len() as u64;
        sim.ctx.cov.drains = sim.rc.drains.len() as u64;
        sim.ctx.cov.partitions = sim.rc.partitions.len() as u64;
        sim.ctx.cov.probe_runs = u64::from(sim.rc.probes);
        sim
    }

    fn now(&self) -> Now {
        Now {
            at: self.base + Duration::from_millis(self.ctx.now),
            wall_ms: WALL0 + self.ctx.now,
        }
    }

    /// Which servers may take a new session now (not drained, not ejected,
    /// not down by its probes when probes decide).
    fn usable(&self) -> Vec<bool> {
        let pool = self.router.pool();
        let mut v = vec![false; self.rc.n_srv];
        for s in &pool.servers {
            let Some(i) = s.id.strip_prefix('s').and_then(|n| n.parse::<usize>().ok()) else {
                continue;
            };
            let st = &s.stats;
            let down = st.drained.load(Ordering::Relaxed)
                || st.ejected(self.ctx.now)
                || self.rc.probes && st.probe_down.load(Ordering::Relaxed);
            v[i - 1] = !down;
        }
        v
    }

    fn router_step(&mut self, input: Input) {
        let now = self.now();
        let before = self.usable();
        let mut out = std::mem::take(&mut self.out);
        match input {
            Input::Msg(from, data) => {
                let m = Msg::parse(&data);
                match (self.ctx.node(from), m) {
                    (Some(Node::Ua(_)), Some(m)) if m.is_request() && m.method() == "CANCEL" => {
                        let key = (m.call_id().to_owned(), m.cseq().0);
                        self.ctx.cancel_at_lb.entry(key).or_insert(self.ctx.now);
                    }
                    (Some(Node::Srv(i)), Some(m))
                        if !m.is_request() && m.status() < 200 && m.cseq().1 == "INVITE" =>
                    {
                        self.ctx.lb_heard_ringing.insert((i, m.branch().to_owned()));
                    }
                    _ => {}
                }
                self.router.on_message(
                    &data,
                    Origin::Udp { peer: from },
                    now,
                    &mut self.rrng,
                    &mut out,
                );
            }
            Input::Timer(k) => self.router.on_timer(k, now, &mut self.rrng, &mut out),
            Input::Tick => self.router.tick(now, &mut self.rrng, &mut out),
        }
        let mut after: Option<Vec<bool>> = None;
        for (dest, bytes) in out.sends() {
            let Dest::Udp(to) = dest else {
                self.ctx.fail(
                    Check::Core,
                    format!("a send to {dest:?}: everything here is UDP to IP literals"),
                );
                continue;
            };
            let to = *to;
            if self.ctx.node(to).is_none() {
                self.ctx.fail(
                    Check::Core,
                    format!("a datagram to unknown address {to}: {}", summary(bytes)),
                );
                continue;
            }
            if let Some(Node::Srv(i)) = self.ctx.node(to) {
                self.observe_to_server(i, bytes, &before, &mut after);
            }
            self.ctx.send(lb_addr(), to, bytes.to_vec());
        }
        for &(at, key) in out.timers() {
            let d = at.saturating_duration_since(self.base);
            let ms = d.as_millis() as u64 + u64::from(d.subsec_nanos() % 1_000_000 != 0);
            if ms < self.ctx.now {
                self.ctx
                    .fail(Check::Core, format!("timer {key:?} armed in the past"));
            }
            self.ctx
                .schedule(ms.max(self.ctx.now), Kind::RouterTimer(key), true);
        }
        out.clear();
        self.out = out;
    }

    /// Checks 5 and 7 on a request the balancer sends to server `i`.
    fn observe_to_server(
        &mut self,
        i: usize,
        bytes: &[u8],
        before: &[bool],
        after: &mut Option<Vec<bool>>,
    ) {
        let Some(m) = Msg::parse(bytes) else {
            return self.ctx.fail(
                Check::Core,
                format!("we sent s{} an unparseable message", i + 1),
            );
        };
        if !m.is_request() {
            // The UA's answer to a BYE of the server's own.
            return;
        }
        let method = m.method();
        let (cseq, _) = m.cseq();
        if method == "INVITE"
            && let Some(at) = self.ctx.cancel_at_lb.get(&(m.call_id().to_owned(), cseq))
        {
            let at = *at;
            self.ctx.fail(
                Check::NoDuplicate,
                format!(
                    "INVITE {} {cseq} sent to s{} after the UA's CANCEL reached us at {:.3}s",
                    m.call_id(),
                    i + 1,
                    at as f64 / 1000.0
                ),
            );
        }
        let first = matches!(method, "INVITE" | "MESSAGE" | "REGISTER") && m.to_tag().is_none();
        if first
            && self.sent[i].insert(m.branch().to_owned())
            && !before[i]
            && !after.get_or_insert_with(|| self.usable())[i]
        {
            let why = self.router.servers_view(self.now())[i].clone();
            self.ctx.fail(
                Check::Usable,
                format!(
                    "new {method} {} sent to s{} while it is {} (ejected: {}, probe: {})",
                    m.call_id(),
                    i + 1,
                    why.state,
                    why.ejected,
                    why.probe_state
                ),
            );
        }
    }

    fn check_step(&mut self) {
        self.ctx.cov.steps += 1;
        self.router.check_invariants();
        let pool = self.router.pool();
        for s in &pool.servers {
            let n = s.stats.outstanding.load(Ordering::Relaxed);
            if n < 0 {
                self.ctx.fail(
                    Check::Core,
                    format!("{}: outstanding count went negative ({n})", s.id),
                );
            }
        }
        let bound = self.router.transactions() + self.router.forks() * self.rc.n_srv;
        let out = self.router.outstanding() as usize;
        if out > bound {
            self.ctx.fail(
                Check::Core,
                format!(
                    "outstanding {out} > {} transactions + {} forks x {} servers",
                    self.router.transactions(),
                    self.router.forks(),
                    self.rc.n_srv
                ),
            );
        }
    }

    fn run(&mut self) -> Result<(), String> {
        loop {
            let Some(Reverse(ev)) = self.ctx.heap.pop() else {
                unreachable!("the tick is always queued")
            };
            self.ctx.now = ev.at;
            if ev.counts {
                self.ctx.pending -= 1;
                self.ctx.last_activity = ev.at;
            }
            match ev.kind {
                Kind::Deliver { from, to, data } => match self.ctx.node(to) {
                    Some(Node::Lb) => self.router_step(Input::Msg(from, data)),
                    Some(Node::Srv(i)) => {
                        if self.ctx.partitioned(to) {
                            self.ctx
                                .trace(|| format!("s{} partitioned: drops it", i + 1));
                        } else {
                            self.servers[i].on_datagram(&mut self.ctx, from, &data);
                        }
                    }
                    Some(Node::Ua(k)) => self.uas[k].on_datagram(&mut self.ctx, from, &data),
                    None => unreachable!("checked at send"),
                },
                Kind::RouterTimer(k) => self.router_step(Input::Timer(k)),
                Kind::Tick => {
                    self.router_step(Input::Tick);
                    self.ctx.schedule(ev.at + 100, Kind::Tick, false);
                }
                Kind::Ua(k, t) => self.uas[k].on_timer(&mut self.ctx, t),
                Kind::Srv(i, t) => self.servers[i].on_timer(&mut self.ctx, t),
                Kind::Drain(i, d) => {
                    let id = format!("s{}", i + 1);
                    assert!(self.router.set_drained(&id, d));
                    self.ctx.trace(|| format!("{id} drained: {d}"));
                    let view = self.router.servers_view(self.now());
                    if d && view[i].state != "drained" {
                        self.ctx.fail(
                            Check::Core,
                            format!("{id} drained but shown {}", view[i].state),
                        );
                    }
                }
                Kind::Partition(i, until) => {
                    self.ctx.partition_until[i] = until;
                    self.ctx.trace(|| {
                        format!("s{} partitioned until {:.3}s", i + 1, until as f64 / 1000.0)
                    });
                }
            }
            self.check_step();
            if let Some(v) = self.ctx.violation.take() {
                return Err(v);
            }
            if self.ctx.pending == 0
                && self.ctx.now >= self.script_end
                && self.ctx.now >= self.ctx.last_activity + QUIESCE_MS
            {
                break;
            }
            if self.ctx.now > HARD_LIMIT_MS {
                return Err(format!(
                    "check 9 (Core): no quiescence after {} s of virtual time ({} events pending)",
                    HARD_LIMIT_MS / 1000,
                    self.ctx.pending
                ));
            }
        }
        self.end_checks();
        self.ctx.cov.virtual_ms = self.ctx.now;
        match self.ctx.violation.take() {
            Some(v) => Err(v),
            None => Ok(()),
        }
    }

    fn end_checks(&mut self) {
        let r = &self.router;
        let (t, f, s, o) = (
            r.transactions(),
            r.forks(),
            r.sessions.len(),
            r.outstanding(),
        );
        if t + f + s + o as usize != 0 {
            self.ctx.fail(
                Check::Empty,
                format!(
                    "after {} s quiet: {t} transactions, {f} forks, {s} sessions, {o} outstanding",
                    QUIESCE_MS / 1000
                ),
            );
        }
        for u in &self.uas {
            u.end_checks(&mut self.ctx);
        }
        for s in &self.servers {
            s.end_checks(&mut self.ctx, &self.uas);
        }
    }
}

fn describe(rc: &RunCfg) -> String {
    format!(
        "{} servers {:?}, {}, probes {}, outlier {}, max_attempts {}, loss {:.1}%, dup {:.1}%, reorder {:.0}%, {} calls, drains {:?}, partitions {:?}, last_attempt_timeout {}",
        rc.n_srv,
        rc.profiles.iter().map(|p| p.name).collect::<Vec<_>>(),
        rc.policy,
        rc.probes,
        rc.outlier,
        rc.max_attempts,
        rc.loss * 100.0,
        rc.dup * 100.0,
        rc.reorder * 100.0,
        rc.plans.len(),
        rc.drains,
        rc.partitions,
        rc.last_attempt
    )
}

/// Runs one seed; `Err` holds the violation (or the router's panic).
fn run_seed(seed: u64, verbose: bool) -> Result<Coverage, String> {
    run_seed_with(seed, verbose, false)
}

fn run_seed_with(seed: u64, verbose: bool, digest: bool) -> Result<Coverage, String> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sim = Sim::new(seed, verbose);
        sim.ctx.digest = digest;
        if verbose {
            println!("seed {seed:#x}: {}", describe(&sim.rc));
        }
        let r = sim.run();
        if verbose {
            println!("coverage: {:?}", sim.ctx.cov);
        }
        r.map(|()| sim.ctx.cov.clone())
    }));
    match result {
        Ok(r) => r,
        Err(p) => Err(format!(
            "check 9 (Core): panic: {}",
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default()
        )),
    }
}

fn replay_hint(seed: u64) -> String {
    format!("SIPLB_SIM_SEED={seed:#x} cargo test -p balancer --test router_sim -- --nocapture")
}

fn env_seed() -> Option<u64> {
    let s = std::env::var("SIPLB_SIM_SEED").ok()?;
    let s = s.trim();
    Some(
        match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(h) => u64::from_str_radix(h, 16).expect("SIPLB_SIM_SEED: hex u64"),
            None => s.parse().expect("SIPLB_SIM_SEED: u64 or 0xhex"),
        },
    )
}

/// Seeds per CI test (8 tests: 320 seeds, run in parallel by the harness).
fn per_test() -> u64 {
    std::env::var("SIPLB_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

fn run_range(part: u64) {
    if env_seed().is_some() {
        return;
    }
    let n = per_test();
    let mut total = Coverage::default();
    let mut failures = Vec::new();
    for seed in part * n..(part + 1) * n {
        match run_seed(seed, false) {
            Ok(c) => total.add(&c),
            Err(e) => failures.push(format!(
                "seed {seed:#x}: {e}\n    replay: {}",
                replay_hint(seed)
            )),
        }
    }
    println!("router_sim part {part}: {total:?}");
    assert!(
        failures.is_empty(),
        "{} of {n} router simulation runs failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[test]
fn router_sim_part_0() {
    run_range(0);
}

#[test]
fn router_sim_part_1() {
    run_range(1);
}

#[test]
fn router_sim_part_2() {
    run_range(2);
}

#[test]
fn router_sim_part_3() {
    run_range(3);
}

#[test]
fn router_sim_part_4() {
    run_range(4);
}

#[test]
fn router_sim_part_5() {
    run_range(5);
}

#[test]
fn router_sim_part_6() {
    run_range(6);
}

#[test]
fn router_sim_part_7() {
    run_range(7);
}

/// `SIPLB_SIM_SEED=<u64|0xhex>`: that seed alone, every datagram traced.
#[test]
fn router_sim_replay() {
    let Some(seed) = env_seed() else { return };
    if let Err(e) = run_seed(seed, true) {
        panic!("seed {seed:#x}: {e}\n  replay: {}", replay_hint(seed));
    }
}

/// The same seed gives the same run, datagram for datagram (the routers
/// of the two runs hash their tables with different keys).
#[test]
fn router_sim_is_repeatable() {
    if env_seed().is_some() {
        return;
    }
    for seed in [3, 11, 0x0, 0x10, 0x1f, 0x23, 0x59b, 0xc84] {
        let a = run_seed_with(seed, false, true);
        let b = run_seed_with(seed, false, true);
        match (a, b) {
            (Ok(a), Ok(b)) => assert_eq!(
                (a.digest, a.datagrams, a.steps, a.virtual_ms),
                (b.digest, b.datagrams, b.steps, b.virtual_ms),
                "seed {seed:#x}: two runs differ"
            ),
            (a, b) => assert_eq!(a.is_ok(), b.is_ok(), "seed {seed:#x}: {a:?} vs {b:?}"),
        }
    }
}

/// Focused scenarios, one per fix the simulation led to: the core driven
/// by hand, message by message, no randomness.
mod focused {
    use super::*;

    type Sent = Vec<(SocketAddr, String)>;

    const UA: &str = "127.0.0.100:6000";

    fn ua() -> SocketAddr {
        UA.parse().unwrap()
    }

    struct Lab {
        router: Router,
        base: Instant,
        ms: u64,
        rng: StdRng,
        timers: Vec<(u64, TimerKey)>,
    }

    impl Lab {
        fn new(n_srv: usize) -> Lab {
            let mut t = format!(
                "[sip]\nlisten = [\"127.0.0.1:5060\"]\ntransports = [\"udp\"]\n\
                 [routing]\nsecret = \"router-sim-secret-0123456789\"\npolicy = \"round-robin\"\n\
                 health = \"agent\"\noutlier_failures = 0\nslow_start = \"0s\"\n\
                 invite_timeout = \"5s\"\nmax_attempts = 2\nlast_attempt_timeout = \"500ms\"\n\
                 [perf]\nkey_file = \"{}\"\n",
                key_file().display()
            );
            for i in 0..n_srv {
                t.push_str(&format!(
                    "[[servers]]\nid = \"s{}\"\naddress = \"{}\"\n",
                    i + 1,
                    srv_addr(i)
                ));
            }
            let cfg = Config::parse(&t, &std::env::temp_dir()).unwrap();
            let base = Instant::now();
            Lab {
                router: Router::new(cfg, Default::default(), base).unwrap(),
                base,
                ms: 0,
                rng: StdRng::seed_from_u64(1),
                timers: Vec::new(),
            }
        }

        fn now(&self) -> Now {
            Now {
                at: self.base + Duration::from_millis(self.ms),
                wall_ms: WALL0 + self.ms,
            }
        }

        fn take(&mut self, out: &Outbox) -> Sent {
            for &(at, key) in out.timers() {
                let ms = at.saturating_duration_since(self.base).as_millis() as u64;
                self.timers.push((ms, key));
            }
            out.sends()
                .map(|(d, b)| match d {
                    Dest::Udp(a) => (*a, String::from_utf8_lossy(b).into_owned()),
                    other => panic!("send to {other:?}"),
                })
                .collect()
        }

        fn input(&mut self, from: SocketAddr, text: &str) -> Sent {
            let mut out = Outbox::new();
            let now = self.now();
            self.router.on_message(
                text.as_bytes(),
                Origin::Udp { peer: from },
                now,
                &mut self.rng,
                &mut out,
            );
            self.router.check_invariants();
            self.take(&out)
        }

        fn ua(&mut self, text: &str) -> Sent {
            self.input(ua(), text)
        }

        fn srv(&mut self, i: usize, text: &str) -> Sent {
            self.input(srv_addr(i), text)
        }

        /// Runs timers and ticks up to `until` (ms).
        fn advance(&mut self, until: u64) -> Sent {
            let mut sent = Vec::new();
            loop {
                let tick = (self.ms / 100 + 1) * 100;
                let timer = self.timers.iter().map(|(t, _)| *t).min();
                let next = timer.map_or(tick, |t| t.min(tick));
                if next > until {
                    self.ms = until;
                    return sent;
                }
                self.ms = next;
                let mut out = Outbox::new();
                let now = self.now();
                if timer == Some(next) {
                    let i = self.timers.iter().position(|(t, _)| *t == next).unwrap();
                    let (_, key) = self.timers.remove(i);
                    self.router.on_timer(key, now, &mut self.rng, &mut out);
                } else {
                    self.router.tick(now, &mut self.rng, &mut out);
                }
                self.router.check_invariants();
                sent.extend(self.take(&out));
            }
        }
    }

    fn to(sent: &Sent, a: SocketAddr) -> Vec<&str> {
        sent.iter()
            .filter(|(d, _)| *d == a)
            .map(|(_, s)| s.as_str())
            .collect()
    }

    fn first_lines(v: &[&str]) -> Vec<String> {
        v.iter()
            .map(|s| s.split("\r\n").next().unwrap_or("").to_owned())
            .collect()
    }

    fn branch(m: &str) -> String {
        Msg::parse(m.as_bytes()).unwrap().branch().to_owned()
    }

    fn crlf(s: &str) -> String {
        s.replace('\n', "\r\n")
    }

    fn request(method: &str, cid: &str, branch: &str, cseq: u32, to_tag: Option<&str>) -> String {
        let to = to_tag.map_or(String::new(), |t| format!(";tag={t}"));
        crlf(&format!(
            "{method} sip:bob@example.com SIP/2.0\n\
             Via: SIP/2.0/UDP {UA};branch={branch};rport\nMax-Forwards: 70\n\
             From: <sip:alice@example.com>;tag=a1\nTo: <sip:bob@example.com>{to}\n\
             Call-ID: {cid}\nCSeq: {cseq} {method}\nContact: <sip:alice@{UA}>\n\
             Content-Length: 0\n\n"
        ))
    }

    /// A server's answer to `req` (Record-Route and Contact on 1xx/2xx).
    fn answer(i: usize, req: &str, code: u16, tag: &str) -> String {
        let m = Msg::parse(req.as_bytes()).unwrap();
        let mut extra = String::new();
        if code > 100 && code < 300 {
            for rr in m.lines("record-route") {
                extra.push_str(&format!("Record-Route: {rr}\r\n"));
            }
            extra.push_str(&format!("Contact: <sip:bob@{}>\r\n", srv_addr(i)));
        }
        let tag = (code > 100).then_some(tag);
        String::from_utf8(response(&m, code, "Whatever", tag, &extra)).unwrap()
    }

    /// Seed 0xa: attempt 1 given up for silence answers 200 after attempt 2's
    /// 200 went to the UA. Before: the 2xx removed the transaction and the
    /// late 2xx was passed up (a second dialog). Now (RFC 6026 Accepted)
    /// it is ACKed and BYEd, and the INVITE's retransmission is absorbed.
    /// Seed 0x10: that BYE was sent once; now retransmitted until answered.
    #[test]
    fn a_late_2xx_after_the_winners_2xx_is_acked_and_byed_until_answered() {
        let mut lab = Lab::new(2);
        let inv = request("INVITE", "t1@lab", "z9hG4bKt1", 1, None);
        let s = lab.ua(&inv);
        let inv1 = to(&s, srv_addr(0))[0].to_owned();
        let s = lab.advance(600);
        let inv2 = to(&s, srv_addr(1))[0].to_owned();
        let s = lab.srv(1, &answer(1, &inv2, 200, "s2t"));
        assert_eq!(first_lines(&to(&s, ua())), ["SIP/2.0 200 Whatever"]);
        assert!(
            lab.ua(&inv).is_empty(),
            "the INVITE's retransmission is absorbed"
        );
        let s = lab.srv(0, &answer(0, &inv1, 200, "s1t"));
        assert!(to(&s, ua()).is_empty(), "the late 2xx is not passed up");
        let lines = first_lines(&to(&s, srv_addr(0)));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("ACK ") && lines[1].starts_with("BYE "));
        let bye = to(&s, srv_addr(0))[1].to_owned();
        let again = lab.advance(lab.ms + 600);
        assert_eq!(
            to(&again, srv_addr(0)),
            [bye.as_str()],
            "BYE again (Timer E)"
        );
        assert!(lab.srv(0, &answer(0, &bye, 200, "s1t")).is_empty());
        let later = lab.advance(lab.ms + 10_000);
        assert!(to(&later, srv_addr(0)).is_empty(), "answered: no more BYEs");
        lab.advance(lab.ms + 40_000);
        assert_eq!(lab.router.transactions(), 0);
        assert_eq!(lab.router.outstanding(), 0);
    }

    /// Seed 0xd: the UA's second ACK of a failed-over attempt's 486 (its
    /// first lost, the 486 repeated) went to the session's server as
    /// attempt 0 (a branch that server never had). Now the entry stays
    /// and every copy gets the attempt's branch.
    #[test]
    fn every_ack_of_a_failed_over_attempts_final_keeps_its_branch() {
        let mut lab = Lab::new(2);
        let inv = request("INVITE", "t2@lab", "z9hG4bKt2", 1, None);
        let s = lab.ua(&inv);
        let inv1 = to(&s, srv_addr(0))[0].to_owned();
        let s = lab.srv(0, &answer(0, &inv1, 503, "s1t"));
        let inv2 = to(&s, srv_addr(1))
            .into_iter()
            .find(|m| m.starts_with("INVITE"))
            .unwrap()
            .to_owned();
        let s = lab.srv(1, &answer(1, &inv2, 486, "s2t"));
        assert_eq!(first_lines(&to(&s, ua())), ["SIP/2.0 486 Whatever"]);
        let ack = request("ACK", "t2@lab", "z9hG4bKt2", 1, Some("s2t"));
        for _ in 0..2 {
            let s = lab.ua(&ack);
            let acks = to(&s, srv_addr(1));
            assert_eq!(acks.len(), 1);
            assert_eq!(branch(acks[0]), branch(&inv2));
        }
    }

    /// Seed 0x0: our CANCEL to a ringing attempt was sent once; lost, the
    /// server rang on for ever. Now retransmitted (Timer E) until answered.
    #[test]
    fn our_cancel_is_retransmitted_until_answered() {
        let mut lab = Lab::new(1);
        let inv = request("INVITE", "t3@lab", "z9hG4bKt3", 1, None);
        let s = lab.ua(&inv);
        let inv1 = to(&s, srv_addr(0))[0].to_owned();
        lab.srv(0, &answer(0, &inv1, 180, "s1t"));
        let s = lab.ua(&request("CANCEL", "t3@lab", "z9hG4bKt3", 1, None));
        let cancel = to(&s, srv_addr(0))[0].to_owned();
        assert!(cancel.starts_with("CANCEL "));
        let s = lab.advance(lab.ms + 600);
        assert_eq!(to(&s, srv_addr(0)), [cancel.as_str()], "CANCEL again");
        lab.srv(0, &answer(0, &cancel, 200, "s1t"));
        // (Less than invite_timeout after the 180: Timer C stays quiet.)
        let s = lab.advance(lab.ms + 3_000);
        assert!(to(&s, srv_addr(0)).is_empty(), "answered: no more CANCELs");
        let s = lab.srv(0, &answer(0, &inv1, 487, "s1t"));
        assert_eq!(first_lines(&to(&s, ua())), ["SIP/2.0 487 Whatever"]);
    }

    /// Seed 0xb: a retransmitted MESSAGE whose 200 the UA lost was dropped,
    /// and after T4 the next one became a new transaction (the server got
    /// the MESSAGE twice). Now the final is sent again from the entry,
    /// which stays 64 x T1 (Timer J).
    #[test]
    fn a_retransmitted_message_gets_its_final_again_and_is_not_forwarded() {
        let mut lab = Lab::new(2);
        let msg = request("MESSAGE", "t4@lab", "z9hG4bKt4", 1, None);
        let s = lab.ua(&msg);
        let m1 = to(&s, srv_addr(0))[0].to_owned();
        let s = lab.srv(0, &answer(0, &m1, 200, "s1t"));
        let ok = to(&s, ua())[0].to_owned();
        for at in [1_000, 12_000, 30_000] {
            lab.advance(at);
            let s = lab.ua(&msg);
            assert_eq!(s.len(), 1, "at {at} ms: {s:?}");
            assert_eq!(to(&s, ua()), [ok.as_str()]);
        }
    }

    /// Seed 0x6: with no server usable we answer 503 ourselves, without a
    /// transaction; its ACK went to every server. Now absorbed.
    #[test]
    fn the_ack_of_our_own_stateless_final_goes_to_no_server() {
        let mut lab = Lab::new(2);
        assert!(lab.router.set_drained("s1", true) && lab.router.set_drained("s2", true));
        let s = lab.ua(&request("INVITE", "t5@lab", "z9hG4bKt5", 1, None));
        let resp = to(&s, ua())[0].to_owned();
        assert!(resp.starts_with("SIP/2.0 503"));
        let tag = Msg::parse(resp.as_bytes())
            .unwrap()
            .to_tag()
            .unwrap()
            .to_owned();
        let s = lab.ua(&request("ACK", "t5@lab", "z9hG4bKt5", 1, Some(&tag)));
        assert!(s.is_empty(), "{s:?}");
    }

    /// Seeds 0x23, 0x25, 0x59b, 0xc84: once the UA ACKed our own final the
    /// entry went after T4, though an attempt could still answer: its 2xx,
    /// or a repeat of the 503 we ACKed (our ACK lost), was then relayed as
    /// a second final. Now the entry keeps its 64 x T1 for them.
    #[test]
    fn an_attempts_answer_after_the_ack_of_our_final_is_not_passed_up() {
        let mut lab = Lab::new(1);
        let inv = request("INVITE", "t6@lab", "z9hG4bKt6", 1, None);
        let s = lab.ua(&inv);
        let inv1 = to(&s, srv_addr(0))[0].to_owned();
        let s = lab.srv(0, &answer(0, &inv1, 503, "s1t"));
        assert_eq!(first_lines(&to(&s, ua())), ["SIP/2.0 500 Whatever"]);
        lab.ua(&request("ACK", "t6@lab", "z9hG4bKt6", 1, Some("s1t")));
        lab.advance(12_000);
        let s = lab.srv(0, &answer(0, &inv1, 503, "s1t"));
        assert!(to(&s, ua()).is_empty(), "{s:?}");
        assert_eq!(first_lines(&to(&s, srv_addr(0))).len(), 1, "ACKed again");

        // A silent attempt answering 200 after our 503 and its ACK.
        let mut lab = Lab::new(1);
        let inv = request("INVITE", "t7@lab", "z9hG4bKt7", 1, None);
        let s = lab.ua(&inv);
        let inv1 = to(&s, srv_addr(0))[0].to_owned();
        let s = lab.advance(600);
        // Our 100 at `trying_after` (the server said nothing), then our 503.
        let msgs = to(&s, ua());
        assert!(msgs[0].starts_with("SIP/2.0 100"), "{msgs:?}");
        let ours = msgs[1].to_owned();
        assert!(ours.starts_with("SIP/2.0 503"));
        let tag = Msg::parse(ours.as_bytes())
            .unwrap()
            .to_tag()
            .unwrap()
            .to_owned();
        lab.ua(&request("ACK", "t7@lab", "z9hG4bKt7", 1, Some(&tag)));
        lab.advance(10_000);
        let s = lab.srv(0, &answer(0, &inv1, 200, "s1t"));
        assert!(to(&s, ua()).is_empty(), "{s:?}");
        let lines = first_lines(&to(&s, srv_addr(0)));
        assert!(lines[0].starts_with("ACK ") && lines[1].starts_with("BYE "));
    }

    /// Seed 0x548: a retransmitted REGISTER was dropped while its fork ran
    /// and became a new request once it had ended. Now the answer is sent
    /// again, during the fork and 64 x T1 after it.
    #[test]
    fn a_retransmitted_register_gets_the_forks_answer_again() {
        let mut lab = Lab::new(2);
        let reg = request("REGISTER", "t8@lab", "z9hG4bKt8", 1, None);
        let s = lab.ua(&reg);
        let (r1, r2) = (
            to(&s, srv_addr(0))[0].to_owned(),
            to(&s, srv_addr(1))[0].to_owned(),
        );
        let s = lab.srv(0, &answer(0, &r1, 200, "s1t"));
        let ok = to(&s, ua())[0].to_owned();
        assert_eq!(lab.ua(&reg), [(ua(), ok.clone())], "while the fork runs");
        assert!(lab.srv(1, &answer(1, &r2, 200, "s2t")).is_empty());
        lab.advance(20_000);
        assert_eq!(lab.ua(&reg), [(ua(), ok)], "after it ended");
        lab.advance(60_000);
        assert_eq!(lab.router.forks(), 0);
        assert_eq!(lab.router.outstanding(), 0);
    }

    /// Seed 0x1f: the UA CANCELled, then the server said 503: passed up as
    /// it was. §16.7 step 6: a proxy sends 500 instead.
    #[test]
    fn a_servers_503_goes_up_as_500() {
        let mut lab = Lab::new(1);
        let s = lab.ua(&request("INVITE", "t9@lab", "z9hG4bKt9", 1, None));
        let inv1 = to(&s, srv_addr(0))[0].to_owned();
        lab.srv(0, &answer(0, &inv1, 100, "s1t"));
        lab.ua(&request("CANCEL", "t9@lab", "z9hG4bKt9", 1, None));
        let s = lab.srv(0, &answer(0, &inv1, 503, "s1t"));
        assert_eq!(first_lines(&to(&s, ua())), ["SIP/2.0 500 Whatever"]);
    }
}
