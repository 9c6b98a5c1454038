//! Two routing cores of one pool driven directly (no sockets): instance A
//! and instance B share `routing.secret` and `sip.record_route`, each with
//! its own `sip.advertise`. What one wrote, the other routes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balancer::config::{Config, Transport};
use balancer::router::{Dest, Now, Origin, Outbox, Router, TimerKey};
use rand::SeedableRng;

mod common;
use common::{addr, header_values, status};

const S1: &str = "10.0.1.1:5060";
const S2: &str = "10.0.1.2:5060";
const POOL: &str = "sip.example.net";

/// One instance: `listen` is its own address, `extra` goes into `[sip]`,
/// `tail` at the end of the file.
struct Instance {
    router: Router,
    base: Instant,
    rng: rand::rngs::StdRng,
    out: Outbox,
    dir: std::path::PathBuf,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(name: &str, me: &str, extra: &str, tail: &str) -> (Config, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("siplb-pool-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("key"), "pool-test-key-0123456789").unwrap();
    let text = format!(
        r#"
[sip]
listen = ["{me}"]
transports = ["udp", "tcp"]
{extra}
[routing]
secret = "pool-test-secret-0123456789"
policy = "round-robin"
[perf]
key_file = "key"
{tail}
[[servers]]
id = "s1"
address = "{S1}"
[[servers]]
id = "s2"
address = "{S2}"
"#
    );
    (Config::parse(&text, &dir).unwrap(), dir)
}

impl Instance {
    fn new(name: &str, me: &str, extra: &str, tail: &str) -> Instance {
        let (cfg, dir) = config(name, me, extra, tail);
        let base = Instant::now();
        Instance {
            router: Router::new(cfg, Default::default(), base).unwrap(),
            base,
            rng: rand::rngs::StdRng::seed_from_u64(7),
            out: Outbox::new(),
            dir,
        }
    }

    fn now(&self, ms: u64) -> Now {
        Now {
            at: self.base + Duration::from_millis(ms),
            wall_ms: 1_700_000_000_000 + ms,
        }
    }

    /// The sends of the last input, as (dest, text).
    fn sent(&self) -> Vec<(Dest, String)> {
        self.out
            .sends()
            .map(|(d, b)| (d.clone(), String::from_utf8_lossy(b).into_owned()))
            .collect()
    }

    /// Feeds one message at `ms`; the sends it caused, as (dest, text).
    fn feed(&mut self, text: &str, origin: Origin, ms: u64) -> Vec<(Dest, String)> {
        self.out.clear();
        let now = self.now(ms);
        self.router
            .on_message(text.as_bytes(), origin, now, &mut self.rng, &mut self.out);
        self.sent()
    }

    /// Fires those of `timers` (as an input asked for them) due by `ms`.
    fn fire(&mut self, timers: &[(Instant, TimerKey)], ms: u64) -> Vec<(Dest, String)> {
        let now = self.now(ms);
        let due: Vec<TimerKey> = timers
            .iter()
            .filter(|(at, _)| *at <= now.at)
            .map(|(_, k)| *k)
            .collect();
        self.out.clear();
        for k in due {
            self.router.on_timer(k, now, &mut self.rng, &mut self.out);
        }
        self.sent()
    }

    /// The housekeeping tick at `ms`.
    fn tick(&mut self, ms: u64) -> Vec<(Dest, String)> {
        self.out.clear();
        let now = self.now(ms);
        self.router.tick(now, &mut self.rng, &mut self.out);
        self.sent()
    }
}

fn invite(call: &str, ua: SocketAddr) -> String {
    format!(
        "INVITE sip:bob@{POOL} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {ua};branch=z9hG4bK{call};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@{POOL}>;tag=a-{call}\r\n\
         To: <sip:bob@{POOL}>\r\n\
         Call-ID: {call}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:alice@{ua}>\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// The caller's in-dialog request `method` by the route set `rr` (the
/// Record-Route of the 2xx, reversed: one value here), to the callee's
/// Contact `target`.
fn in_dialog(
    method: &str,
    cseq: u32,
    call: &str,
    ua: SocketAddr,
    rr: &str,
    target: &str,
) -> String {
    format!(
        "{method} {target} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {ua};branch=z9hG4bK{call}-{cseq};rport\r\n\
         Max-Forwards: 70\r\n\
         Route: {rr}\r\n\
         From: <sip:alice@{POOL}>;tag=a-{call}\r\n\
         To: <sip:bob@{POOL}>;tag=srv\r\n\
         Call-ID: {call}\r\n\
         CSeq: {cseq} {method}\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn any_instance_of_the_pool_routes_a_dialog_another_record_routed() {
    let extra = format!("record_route = \"{POOL}\"");
    let mut a = Instance::new("rr-a", "10.0.0.1:5060", &extra, "");
    let mut b = Instance::new("rr-b", "10.0.0.2:5060", &extra, "");
    let ua = addr("192.0.2.10:5070");

    let mut calls = Vec::new();
    for i in 0..4 {
        let call = format!("pool-{i}");
        let sent = a.feed(&invite(&call, ua), Origin::Udp { peer: ua }, i);
        let (server, inv) = to_server(&sent);
        let via = header_values(&inv, "via");
        assert!(
            via[0].starts_with("SIP/2.0/UDP 10.0.0.1:5060;branch="),
            "A's Via names A: {}",
            via[0]
        );
        let rr = header_values(&inv, "record-route");
        assert_eq!(rr.len(), 1, "{inv}");
        assert!(
            rr[0].starts_with(&format!("<sip:{POOL};lr;sb=")),
            "A's Record-Route names the pool, without a port (SRV): {}",
            rr[0]
        );
        calls.push((call, server, rr[0].to_owned()));
    }
    assert!(
        calls.iter().any(|c| c.1 == addr(S1)) && calls.iter().any(|c| c.1 == addr(S2)),
        "both servers have calls: {calls:?}"
    );

    // A is gone; the caller's BYE, by its route set, reaches B: B sends it
    // to the server the token names, under B's own Via.
    for (call, server, rr) in &calls {
        let bye = in_dialog("BYE", 2, call, ua, rr, &format!("sip:bob@{server}"));
        let sent = b.feed(&bye, Origin::Udp { peer: ua }, 100);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].0, Dest::Udp(*server), "to its own server: {sent:?}");
        let out = &sent[0].1;
        assert!(out.starts_with("BYE "), "{out}");
        assert!(
            header_values(out, "route").is_empty(),
            "our Route popped: {out}"
        );
        assert!(
            header_values(out, "via")[0].starts_with("SIP/2.0/UDP 10.0.0.2:5060;branch="),
            "B's Via names B: {out}"
        );
        // And the server's 200 to it comes back to B and on to the caller.
        let ok = format!(
            "SIP/2.0 200 OK\r\n{}\r\nFrom: <sip:alice@{POOL}>;tag=a-{call}\r\n\
             To: <sip:bob@{POOL}>;tag=srv\r\nCall-ID: {call}\r\nCSeq: 2 BYE\r\n\
             Content-Length: 0\r\n\r\n",
            out.split("\r\n")
                .filter(|l| l.starts_with("Via:"))
                .collect::<Vec<_>>()
                .join("\r\n")
        );
        let sent = b.feed(&ok, Origin::Udp { peer: *server }, 110);
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].0, Dest::Udp(ua), "{sent:?}");
        assert_eq!(status(&sent[0].1), Some(200));
    }

    // B's own address is ours in a Route too (a UA that found B by SRV and
    // kept its address).
    let (call, server, rr) = &calls[0];
    let by_addr = rr.replace(POOL, "10.0.0.2");
    let sent = b.feed(
        &in_dialog("INFO", 3, call, ua, &by_addr, &format!("sip:bob@{server}")),
        Origin::Udp { peer: ua },
        120,
    );
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, Dest::Udp(*server), "{sent:?}");
    // A token signed with another secret is not the pool's.
    let (cfg, dir) = config("rr-c", "10.0.0.3:5060", &extra, "");
    let _ = std::fs::remove_dir_all(dir);
    let mut cfg = cfg;
    cfg.secret = b"another-secret-0123456789".to_vec();
    let mut c = Instance {
        router: Router::new(cfg, Default::default(), Instant::now()).unwrap(),
        base: Instant::now(),
        rng: rand::rngs::StdRng::seed_from_u64(1),
        out: Outbox::new(),
        dir: std::env::temp_dir().join("siplb-pool-rr-c-none"),
    };
    let sent = c.feed(
        &in_dialog("BYE", 4, call, ua, rr, &format!("sip:bob@{server}")),
        Origin::Udp { peer: ua },
        130,
    );
    assert_eq!(status(&sent[0].1), Some(403), "{sent:?}");
}

#[test]
fn the_pool_name_is_the_default_advertise_address_and_is_checked() {
    let (cfg, dir) = config("rr-default", "10.0.0.1:5070", "", "");
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(
        (cfg.record_route_host.as_str(), cfg.record_route_port),
        ("10.0.0.1", Some(5070))
    );
    let (cfg, dir) = config(
        "rr-vip",
        "0.0.0.0:5060",
        "advertise = \"10.0.0.1\"\nrecord_route = \"10.0.0.100:5080\"",
        "[pool]\ninstance = 3",
    );
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(
        (cfg.record_route_host.as_str(), cfg.record_route_port),
        ("10.0.0.100", Some(5080))
    );
    assert_eq!(cfg.instance, Some(3));
    // A DNS name: no port unless one is given (RFC 3263 §4.2: SRV).
    for (given, port) in [
        ("sip.example.net", None),
        ("sip.example.net:5070", Some(5070)),
        ("10.0.0.100", Some(5060)),
    ] {
        let (cfg, dir) = config(
            "rr-name",
            "10.0.0.1:5060",
            &format!("record_route = \"{given}\""),
            "",
        );
        let _ = std::fs::remove_dir_all(dir);
        assert_eq!(cfg.record_route_port, port, "{given}");
    }
    let dir = std::env::temp_dir().join(format!("siplb-pool-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("key"), "pool-test-key-0123456789").unwrap();
    let e = Config::parse(
        &format!(
            "[sip]\nrecord_route = \"sip:x;lr\"\n[routing]\nsecret = \"pool-test-secret-0123456789\"\n\
             [perf]\nkey_file = \"key\"\n[[servers]]\nid = \"s1\"\naddress = \"{S1}\"\n"
        ),
        &dir,
    )
    .unwrap_err();
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(e.field, "sip.record_route", "{e}");
}

fn register_tcp(user: &str, phone: SocketAddr) -> String {
    format!(
        "REGISTER sip:{POOL} SIP/2.0\r\n\
         Via: SIP/2.0/TCP 10.9.0.5:5060;branch=z9hG4bKreg{user};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:{user}@{POOL}>;tag=r{user}\r\n\
         To: <sip:{user}@{POOL}>\r\n\
         Call-ID: reg-{user}-{phone}\r\n\
         CSeq: 1 REGISTER\r\n\
         Contact: <sip:{user}@10.9.0.5:5060;transport=tcp>;+sip.instance=\"<urn:uuid:1>\";reg-id=1\r\n\
         Expires: 300\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn invite_by_path(path: &str, server: SocketAddr, call: &str) -> String {
    format!(
        "INVITE sip:bob@10.9.0.5:5060;transport=tcp SIP/2.0\r\n\
         Via: SIP/2.0/UDP {server};branch=z9hG4bKsrvinv{call}\r\n\
         Max-Forwards: 69\r\n\
         Route: {path}\r\n\
         From: <sip:carol@{POOL}>;tag=c-{call}\r\n\
         To: <sip:bob@{POOL}>\r\n\
         Call-ID: {call}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:carol@{server}>\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn a_flow_held_by_another_instance_gets_430_and_its_own_instance_reaches_it() {
    let extra = format!("record_route = \"{POOL}\"");
    let mut a = Instance::new("flow-a", "10.0.0.1:5060", &extra, "[pool]\ninstance = 1");
    let mut b = Instance::new("flow-b", "10.0.0.2:5060", &extra, "[pool]\ninstance = 2");
    let phone = addr("203.0.113.6:41000");
    // The same connection id on both instances: only the token's instance
    // number tells them apart.
    a.router.conn_opened(9, phone, Transport::Tcp);
    b.router.conn_opened(9, phone, Transport::Tcp);
    let sent = a.feed(
        &register_tcp("bob", phone),
        Origin::Conn {
            peer: phone,
            conn: 9,
            inbound: true,
        },
        0,
    );
    let (server, reg) = to_server(&sent);
    let path = header_values(&reg, "path")[0].to_owned();
    assert!(
        path.starts_with("<sip:10.0.0.1:5060;lr;ob;flow=i0001"),
        "a phone on A's connection: the Path names A, and its flow instance 1: {path}"
    );

    // Should the registrar's request reach B anyway (a route naming the
    // pool with A's token: a Path stored from a misconfigured instance, an
    // address moved), B does not take the id for its own connection 9.
    let by_pool = path.replace("10.0.0.1", POOL);
    let sent = b.feed(
        &invite_by_path(&by_pool, server, "elsewhere-1"),
        Origin::Udp { peer: server },
        10,
    );
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, Dest::Udp(server));
    assert_eq!(status(&sent[0].1), Some(430), "{}", sent[0].1);
    assert_eq!(
        b.router
            .stats
            .flow_elsewhere
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // At A, the instance that holds it, it goes down the connection.
    let sent = a.feed(
        &invite_by_path(&path, server, "elsewhere-2"),
        Origin::Udp { peer: server },
        20,
    );
    let inv = sent
        .iter()
        .find(|(_, t)| t.starts_with("INVITE"))
        .unwrap_or_else(|| panic!("{sent:?}"));
    assert_eq!(inv.0, Dest::Conn(9));
    assert!(
        header_values(&inv.1, "via")[0].starts_with("SIP/2.0/TCP 10.0.0.1:5060;"),
        "{}",
        inv.1
    );
    // The dialog's routes name A on both sides (a double Record-Route, TCP
    // to the phone, UDP to the server): only A reaches the phone.
    let rr = header_values(&inv.1, "record-route");
    assert_eq!(rr.len(), 2, "{}", inv.1);
    for r in &rr {
        assert!(r.starts_with("<sip:10.0.0.1:5060"), "{r}");
    }
    // A phone over UDP has no owner: its Path names the pool.
    let nat = addr("203.0.113.7:40000");
    let reg = register_tcp("carol", nat)
        .replace("SIP/2.0/TCP", "SIP/2.0/UDP")
        .replace(";transport=tcp", "");
    let (_, reg) = to_server(&a.feed(&reg, Origin::Udp { peer: nat }, 25));
    let udp_path = header_values(&reg, "path")[0].to_owned();
    assert!(
        udp_path.starts_with(&format!("<sip:{POOL};lr;ob;flow=4")),
        "{udp_path}"
    );

    // Once A has lost it (A restarted, the phone not yet back), 430 there too.
    a.router.conn_closed(9);
    let sent = a.feed(
        &invite_by_path(&path, server, "elsewhere-3"),
        Origin::Udp { peer: server },
        30,
    );
    assert_eq!(status(&sent[0].1), Some(430), "{sent:?}");
}

#[test]
fn a_drained_instance_refuses_new_sessions_and_registers_and_serves_its_dialogs() {
    let extra = format!("record_route = \"{POOL}\"");
    let mut a = Instance::new(
        "drain",
        "10.0.0.1:5060",
        &extra,
        "[pool]\ninstance = 1\ndrain_retry_after = 30",
    );
    let ua = addr("192.0.2.10:5070");
    let sent = a.feed(&invite("before", ua), Origin::Udp { peer: ua }, 0);
    let (server, inv) = to_server(&sent);
    let rr = header_values(&inv, "record-route")[0].to_owned();

    a.router.set_instance_drained(true);
    assert!(a.router.instance_drained());
    let sent = a.feed(&invite("during", ua), Origin::Udp { peer: ua }, 10);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, Dest::Udp(ua));
    assert_eq!(status(&sent[0].1), Some(503), "{}", sent[0].1);
    assert!(
        sent[0].1.contains("\r\nRetry-After: 30\r\n"),
        "{}",
        sent[0].1
    );
    let phone = addr("203.0.113.6:41000");
    a.router.conn_opened(3, phone, Transport::Tcp);
    let sent = a.feed(
        &register_tcp("bob", phone),
        Origin::Conn {
            peer: phone,
            conn: 3,
            inbound: true,
        },
        20,
    );
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(status(&sent[0].1), Some(503), "REGISTER too: {}", sent[0].1);

    // The call set up before the drain goes on to its end.
    let bye = in_dialog("BYE", 2, "before", ua, &rr, &format!("sip:bob@{server}"));
    let sent = a.feed(&bye, Origin::Udp { peer: ua }, 30);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, Dest::Udp(server), "{sent:?}");
    assert!(sent[0].1.starts_with("BYE "));

    a.router.set_instance_drained(false);
    let sent = a.feed(&invite("after", ua), Origin::Udp { peer: ua }, 40);
    to_server(&sent);
}

#[test]
fn a_reload_keeps_the_pool_name_and_the_instance_until_a_restart() {
    let extra = format!("record_route = \"{POOL}\"");
    let mut a = Instance::new("reload", "10.0.0.1:5060", &extra, "[pool]\ninstance = 1");
    let mut cfg = (*a.router.config()).clone();
    cfg.record_route_host = "other.example.net".into();
    cfg.record_route_port = Some(5070);
    cfg.instance = Some(9);
    cfg.drain_retry_after = 60;
    a.router.reload(cfg);
    let now = a.router.config();
    assert_eq!(
        (
            now.record_route_host.as_str(),
            now.record_route_port,
            now.instance
        ),
        (POOL, None, Some(1)),
        "kept: the routes already written must still read as ours"
    );
    assert_eq!(now.drain_retry_after, 60, "this one takes effect at once");
    let ua = addr("192.0.2.10:5070");
    let (_, inv) = to_server(&a.feed(&invite("reload-1", ua), Origin::Udp { peer: ua }, 0));
    assert!(
        header_values(&inv, "record-route")[0].starts_with(&format!("<sip:{POOL};lr;sb=")),
        "{inv}"
    );
}

/// The message sent to one of this file's servers.
fn to_server(sent: &[(Dest, String)]) -> (SocketAddr, String) {
    common::to_one_of(sent, &[S1, S2])
}

// ---- Flows owned by another instance: forwarded to a live peer, 430 when
// it is gone (issue 17 item 2).

const A: &str = "10.0.0.1:5060";
const B: &str = "10.0.0.2:5060";
const PHONE: &str = "203.0.113.6:41000";

/// A and B of one pool, each the other's peer (`pool.peers`), the phone on
/// A's connection 9, registered: A, B and the Path the registrar stored.
fn peered(name: &str, extra_pool: &str) -> (Instance, Instance, String) {
    let rr = format!("record_route = \"{POOL}\"");
    let mut a = Instance::new(
        &format!("{name}-a"),
        A,
        &rr,
        &format!(
            "[pool]\ninstance = 1\npeers = [{{ instance = 2, address = \"{B}\" }}]\n{extra_pool}"
        ),
    );
    let b = Instance::new(
        &format!("{name}-b"),
        B,
        &rr,
        &format!(
            "[pool]\ninstance = 2\npeers = [{{ instance = 1, address = \"{A}\" }}]\n{extra_pool}"
        ),
    );
    a.router.conn_opened(9, addr(PHONE), Transport::Tcp);
    let sent = a.feed(&register_tcp("bob", addr(PHONE)), on_phone_conn(), 0);
    let (_, reg) = to_server(&sent);
    let path = header_values(&reg, "path")[0].to_owned();
    (a, b, path)
}

fn on_phone_conn() -> Origin {
    Origin::Conn {
        peer: addr(PHONE),
        conn: 9,
        inbound: true,
    }
}

fn counter(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// The response `code` to `req`, its Via lines copied (as a UA writes it).
fn answer(req: &str, code: u16, reason: &str) -> String {
    let mut r = format!("SIP/2.0 {code} {reason}\r\n");
    for l in req.split("\r\n").take_while(|l| !l.is_empty()) {
        let name = l.split(':').next().unwrap_or_default().to_ascii_lowercase();
        match name.as_str() {
            "via" | "from" | "call-id" | "cseq" => r.push_str(&format!("{l}\r\n")),
            "to" => r.push_str(&format!("{l};tag=phone\r\n")),
            _ => {}
        }
    }
    r.push_str("Contact: <sip:bob@10.9.0.5:5060;transport=tcp>\r\nContent-Length: 0\r\n\r\n");
    r
}

/// The one send of `sent` to `dest`.
fn one_to(sent: &[(Dest, String)], dest: &Dest) -> String {
    let to: Vec<_> = sent.iter().filter(|(d, _)| d == dest).collect();
    assert_eq!(to.len(), 1, "one message to {dest:?}: {sent:?}");
    to[0].1.clone()
}

#[test]
fn a_request_for_a_peers_flow_is_forwarded_to_it_and_its_answer_comes_back() {
    let (mut a, mut b, path) = peered("fwd", "");
    assert!(
        path.starts_with(&format!("<sip:{POOL};lr;ob;flow=i0001")),
        "with peers the Path of a held flow names the pool (any instance forwards): {path}"
    );
    let server = addr(S1);
    // The registrar's INVITE reaches B (the pool's name led there).
    let sent = b.feed(
        &invite_by_path(&path, server, "fwd-1"),
        Origin::Udp { peer: server },
        10,
    );
    assert_eq!(sent.len(), 1, "{sent:?}");
    let fwd = one_to(&sent, &Dest::Udp(addr(A)));
    assert!(fwd.starts_with("INVITE sip:bob@10.9.0.5:5060;transport=tcp SIP/2.0\r\n"));
    let via = header_values(&fwd, "via");
    assert!(
        via[0].starts_with("SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK"),
        "B's Via on top: {fwd}"
    );
    assert!(
        via[1].starts_with(&format!("SIP/2.0/UDP {server};")),
        "{fwd}"
    );
    assert_eq!(
        header_values(&fwd, "route"),
        vec![path.as_str()],
        "the Route kept for A"
    );
    assert_eq!(header_values(&fwd, "max-forwards"), vec!["68"]);
    assert!(
        header_values(&fwd, "record-route").is_empty(),
        "B adds no Record-Route: {fwd}"
    );
    assert_eq!(counter(&b.router.stats.flow_forwarded), 1);
    assert_eq!(b.router.peer_pending(), 1);

    // A takes it from its peer as the server's: 100 Trying back to B (hop
    // by hop), the INVITE down the phone's connection.
    let sent = a.feed(&fwd, Origin::Udp { peer: addr(B) }, 11);
    let trying = one_to(&sent, &Dest::Udp(addr(B)));
    assert_eq!(status(&trying), Some(100), "{trying}");
    let inv = one_to(&sent, &Dest::Conn(9));
    let via = header_values(&inv, "via");
    assert_eq!(via.len(), 3, "{inv}");
    assert!(
        via[0].starts_with("SIP/2.0/TCP 10.0.0.1:5060;branch="),
        "{inv}"
    );
    assert!(via[1].starts_with("SIP/2.0/UDP 10.0.0.2:5060;"), "{inv}");
    assert!(
        header_values(&inv, "route").is_empty(),
        "A popped its Path: {inv}"
    );
    assert_eq!(header_values(&inv, "max-forwards"), vec!["67"]);
    // Its Record-Route names the pool too, with A's flow.
    let rr = header_values(&inv, "record-route");
    assert!(!rr.is_empty(), "{inv}");
    for r in &rr {
        assert!(r.starts_with(&format!("<sip:{POOL}")), "{r}");
    }
    assert!(rr.iter().any(|r| r.contains(";flow=i0001")), "{rr:?}");

    // B hears the 100: the peer is alive, nothing waits any more, and the
    // 100 goes no further.
    let sent = b.feed(&trying, Origin::Udp { peer: addr(A) }, 12);
    assert!(sent.is_empty(), "a 100 is hop by hop: {sent:?}");
    assert_eq!(b.router.peer_pending(), 0);

    // The phone's 200 goes back A → B → the server, each Via popped.
    let ok = answer(&inv, 200, "OK");
    let sent = a.feed(&ok, on_phone_conn(), 20);
    let back = one_to(&sent, &Dest::Udp(addr(B)));
    assert_eq!(status(&back), Some(200), "{back}");
    assert_eq!(header_values(&back, "via").len(), 2, "{back}");
    let sent = b.feed(&back, Origin::Udp { peer: addr(A) }, 21);
    let to_srv = one_to(&sent, &Dest::Udp(server));
    assert_eq!(status(&to_srv), Some(200), "{to_srv}");
    let via = header_values(&to_srv, "via");
    assert_eq!(via.len(), 1, "only the server's Via left: {to_srv}");
    assert!(via[0].starts_with(&format!("SIP/2.0/UDP {server};branch=z9hG4bKsrvinvfwd-1")));

    // The forward's timer finds it answered: no 430.
    b.out.clear();
    b.router.on_timer(
        TimerKey::PeerForward {
            txn: u64::MAX, // unknown: ignored
        },
        b.now(5_000),
        &mut b.rng,
        &mut b.out,
    );
    assert!(b.sent().is_empty());
    assert_eq!(counter(&b.router.stats.flow_owner_down), 0);
    assert!(b.router.peers().iter().all(|p| p.up));

    // The server's in-dialog BYE by the dialog's Record-Route (the pool
    // with A's flow) reaches B and goes to A too.
    let route = rr
        .iter()
        .rev()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let bye = format!(
        "BYE sip:bob@10.9.0.5:5060;transport=tcp SIP/2.0\r\n\
         Via: SIP/2.0/UDP {server};branch=z9hG4bKsrvbye\r\n\
         Max-Forwards: 70\r\nRoute: {route}\r\n\
         From: <sip:carol@{POOL}>;tag=c-fwd-1\r\nTo: <sip:bob@{POOL}>;tag=phone\r\n\
         Call-ID: fwd-1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    );
    let sent = b.feed(&bye, Origin::Udp { peer: server }, 30);
    let fwd = one_to(&sent, &Dest::Udp(addr(A)));
    let sent = a.feed(&fwd, Origin::Udp { peer: addr(B) }, 31);
    let bye_out = one_to(&sent, &Dest::Conn(9));
    assert!(bye_out.starts_with("BYE "), "{bye_out}");
}

#[test]
fn an_owner_that_does_not_answer_gets_430_and_is_down_until_it_answers_a_probe() {
    let (mut a, mut b, path) = peered("down", "peer_timeout = \"2s\"\npeer_probe = \"1s\"");
    let server = addr(S1);
    // A is gone: B forwards, nothing comes back.
    let sent = b.feed(
        &invite_by_path(&path, server, "down-1"),
        Origin::Udp { peer: server },
        10,
    );
    one_to(&sent, &Dest::Udp(addr(A)));
    let timers = b.out.timers().to_vec();
    assert!(
        timers
            .iter()
            .any(|(_, k)| matches!(k, TimerKey::PeerForward { .. })),
        "{timers:?}"
    );
    // The server retransmits (UDP): forwarded again, the same deadline
    // (no second timer).
    let again = b.feed(
        &invite_by_path(&path, server, "down-1"),
        Origin::Udp { peer: server },
        510,
    );
    one_to(&again, &Dest::Udp(addr(A)));
    assert!(b.out.timers().is_empty(), "{:?}", b.out.timers());
    assert_eq!(b.router.peer_pending(), 1);
    assert!(b.fire(&timers, 2_009).is_empty(), "not yet");
    let sent = b.fire(&timers, 2_010);
    let r = one_to(&sent, &Dest::Udp(server));
    assert_eq!(
        status(&r),
        Some(430),
        "a final response, never silence: {r}"
    );
    assert!(r.contains("Call-ID: down-1\r\n"), "{r}");
    assert!(
        header_values(&r, "via")[0].contains("z9hG4bKsrvinvdown-1"),
        "{r}"
    );
    assert_eq!(counter(&b.router.stats.flow_owner_down), 1);
    assert_eq!(b.router.peer_pending(), 0);
    assert_eq!(
        b.router
            .peers()
            .iter()
            .map(|p| (p.instance, p.up))
            .collect::<Vec<_>>(),
        vec![(1, false)]
    );

    // Known down: the next request gets 430 at once, nothing goes to A.
    let sent = b.feed(
        &invite_by_path(&path, server, "down-2"),
        Origin::Udp { peer: server },
        2_100,
    );
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, Dest::Udp(server));
    assert_eq!(status(&sent[0].1), Some(430), "{}", sent[0].1);
    assert_eq!(counter(&b.router.stats.flow_owner_down), 2);
    assert_eq!(
        counter(&b.router.stats.flow_forwarded),
        2,
        "the two copies only"
    );
    // An ACK for a dead flow has no answer: dropped, not answered.
    let ack = invite_by_path(&path, server, "down-2")
        .replace("INVITE sip:", "ACK sip:")
        .replace("CSeq: 1 INVITE", "CSeq: 1 ACK");
    assert!(b.feed(&ack, Origin::Udp { peer: server }, 2_150).is_empty());

    // A comes back: B's probe (OPTIONS, Max-Forwards 0) is answered by A
    // itself, and the round after marks A up.
    let probes = b.tick(3_000);
    let probe = one_to(&probes, &Dest::Udp(addr(A)));
    assert!(
        probe.starts_with(&format!("OPTIONS sip:{A} SIP/2.0")),
        "{probe}"
    );
    assert_eq!(header_values(&probe, "max-forwards"), vec!["0"]);
    let sent = a.feed(&probe, Origin::Udp { peer: addr(B) }, 3_001);
    let pong = one_to(&sent, &Dest::Udp(addr(B)));
    assert_eq!(status(&pong), Some(200), "{pong}");
    assert!(
        b.feed(&pong, Origin::Udp { peer: addr(A) }, 3_002)
            .is_empty()
    );
    b.tick(4_000);
    assert!(b.router.peers()[0].up, "up again at its answer");
    let sent = b.feed(
        &invite_by_path(&path, server, "down-3"),
        Origin::Udp { peer: server },
        4_010,
    );
    one_to(&sent, &Dest::Udp(addr(A)));

    // Unanswered probes alone take it down (peer_probe_failures = 2).
    // (the probe of 4,000 is judged at 5,000, and so on)
    b.tick(5_000);
    assert!(b.router.peers()[0].up, "one miss");
    b.tick(6_000);
    assert!(!b.router.peers()[0].up, "two misses in a row");
}

#[test]
fn a_peers_request_for_a_flow_not_ours_gets_430_and_is_never_forwarded_again() {
    let (mut a, mut b, path) = peered("loop", "");
    let server = addr(S1);
    // B forwards to A; suppose A restarted and its flow is gone: 430 from A,
    // relayed by B.
    let fwd = one_to(
        &b.feed(
            &invite_by_path(&path, server, "loop-1"),
            Origin::Udp { peer: server },
            10,
        ),
        &Dest::Udp(addr(A)),
    );
    // A request B sent to A for a flow of B's own (or of a third instance):
    // A does not send it back (or on), it answers 430.
    let theirs = fwd.replace("flow=i0001", "flow=i0002");
    let sent = a.feed(&theirs, Origin::Udp { peer: addr(B) }, 11);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].0, Dest::Udp(addr(B)));
    assert_eq!(status(&sent[0].1), Some(430), "{}", sent[0].1);
    assert_eq!(counter(&a.router.stats.flow_forwarded), 0, "no second hop");
    assert_eq!(counter(&a.router.stats.flow_elsewhere), 1);
    // B relays that 430 to the server, and no longer waits.
    let sent = b.feed(&sent[0].1, Origin::Udp { peer: addr(A) }, 12);
    let r = one_to(&sent, &Dest::Udp(server));
    assert_eq!(status(&r), Some(430));
    assert_eq!(b.router.peer_pending(), 0);

    // A's flow closed: A answers 430 itself, through B.
    a.router.conn_closed(9);
    let sent = a.feed(&fwd, Origin::Udp { peer: addr(B) }, 20);
    let r = one_to(&sent, &Dest::Udp(addr(B)));
    assert_eq!(status(&r), Some(430), "{r}");

    // A request from a peer that names no server of the pool under the
    // peer's Via is refused.
    let forged = fwd.replace(&server.ip().to_string(), "198.51.100.1");
    let sent = a.feed(&forged, Origin::Udp { peer: addr(B) }, 30);
    assert_eq!(status(&one_to(&sent, &Dest::Udp(addr(B)))), Some(403));
}

#[test]
fn forged_flow_tokens_are_refused_and_unknown_instances_get_430() {
    let (mut a, mut b, path) = peered("forged", "");
    let server = addr(S1);
    let mac_at = path.rfind('.').unwrap() + 1;
    let mut forged = path.clone();
    let flip = if &forged[mac_at..mac_at + 1] == "0" {
        "1"
    } else {
        "0"
    };
    forged.replace_range(mac_at..mac_at + 1, flip);
    // At the owner, a token whose MAC fails is not ours: 403, as before.
    let sent = a.feed(
        &invite_by_path(&forged, server, "forged-1"),
        Origin::Udp { peer: server },
        10,
    );
    assert_eq!(status(&one_to(&sent, &Dest::Udp(server))), Some(403));
    // B cannot check it (the MAC binds A's connection): it forwards, and
    // A's 403 comes back through B.
    let fwd = one_to(
        &b.feed(
            &invite_by_path(&forged, server, "forged-2"),
            Origin::Udp { peer: server },
            20,
        ),
        &Dest::Udp(addr(A)),
    );
    let sent = a.feed(&fwd, Origin::Udp { peer: addr(B) }, 21);
    assert_eq!(sent.len(), 1, "nothing to the phone: {sent:?}");
    let r = one_to(&sent, &Dest::Udp(addr(B)));
    assert_eq!(status(&r), Some(403), "{r}");
    let sent = b.feed(&r, Origin::Udp { peer: addr(A) }, 22);
    assert_eq!(status(&one_to(&sent, &Dest::Udp(server))), Some(403));
    // Unsigned (no MAC at all) or not a flow token: 403 where it is read.
    let unsigned = path[..mac_at - 1].to_owned() + ">";
    for bad in [unsigned, path.replace("flow=i0001", "flow=zz")] {
        let sent = b.feed(
            &invite_by_path(&bad, server, "forged-3"),
            Origin::Udp { peer: server },
            30,
        );
        assert_eq!(
            status(&one_to(&sent, &Dest::Udp(server))),
            Some(403),
            "{bad}"
        );
    }
    // An instance that is no peer of B: 430 at once.
    let sent = b.feed(
        &invite_by_path(
            &path.replace("flow=i0001", "flow=i0007"),
            server,
            "forged-4",
        ),
        Origin::Udp { peer: server },
        40,
    );
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(status(&one_to(&sent, &Dest::Udp(server))), Some(430));
    assert_eq!(counter(&b.router.stats.flow_forwarded), 1, "only forged-2");
    assert_eq!(counter(&b.router.stats.flow_elsewhere), 1);
    // A user agent (no peer, no server) cannot use the peer hop: its
    // OPTIONS with Max-Forwards 0 gets 483 as before, not a peer's 200.
    let ua = addr("192.0.2.50:5060");
    let probe = format!(
        "OPTIONS sip:{B} SIP/2.0\r\nVia: SIP/2.0/UDP {ua};branch=z9hG4bKua\r\n\
         Max-Forwards: 0\r\nFrom: <sip:x@{POOL}>;tag=x\r\nTo: <sip:{B}>\r\n\
         Call-ID: ua-probe\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    let sent = b.feed(&probe, Origin::Udp { peer: ua }, 50);
    assert_eq!(status(&one_to(&sent, &Dest::Udp(ua))), Some(483));
}

#[test]
fn pool_peers_are_checked_and_name_the_pool_in_a_held_flows_routes() {
    let (cfg, dir) = config(
        "peers-ok",
        A,
        "",
        &format!(
            "[pool]\ninstance = 1\npeers = [{{ instance = 2, address = \"{B}\" }}, {{ instance = 3, address = \"10.0.0.3:5070\" }}]"
        ),
    );
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(cfg.pool.peers.len(), 2);
    assert_eq!(cfg.pool.peers[1].address, addr("10.0.0.3:5070"));
    assert_eq!(cfg.pool.flow_route, balancer::config::FlowRoute::Pool);
    assert_eq!(cfg.pool.peer_timeout, Duration::from_secs(2));
    let (cfg, dir) = config("peers-none", A, "", "[pool]\ninstance = 1");
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(cfg.pool.flow_route, balancer::config::FlowRoute::Instance);

    let dir = std::env::temp_dir().join(format!("siplb-pool-peers-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("key"), "pool-test-key-0123456789").unwrap();
    for (pool, field) in [
        (
            "peers = [{ instance = 2, address = \"10.0.0.2:5060\" }]",
            "pool.peers[0].instance",
        ),
        (
            "instance = 1\npeers = [{ instance = 2, address = \"10.0.0.2:5060\" }, { instance = 1, address = \"10.0.0.3:5060\" }]",
            "pool.peers[1].instance",
        ),
        (
            "instance = 1\npeers = [{ instance = 2, address = \"10.0.0.2:5060\" }, { instance = 2, address = \"10.0.0.3:5060\" }]",
            "pool.peers[1].instance",
        ),
        (
            "instance = 1\npeers = [{ instance = 2, address = \"peer.example.net:5060\" }]",
            "pool.peers[0].address",
        ),
        (
            "instance = 1\npeers = [{ instance = 2, address = \"0.0.0.0:5060\" }]",
            "pool.peers[0].address",
        ),
        ("instance = 1\npeer_timeout = \"10ms\"", "pool.peer_timeout"),
        (
            "instance = 1\npeer_probe_failures = 0",
            "pool.peer_probe_failures",
        ),
    ] {
        let e = Config::parse(
            &format!(
                "[routing]\nsecret = \"pool-test-secret-0123456789\"\npolicy = \"round-robin\"\n[perf]\nkey_file = \"key\"\n\
                 [pool]\n{pool}\n[[servers]]\nid = \"s1\"\naddress = \"{S1}\"\n"
            ),
            &dir,
        )
        .unwrap_err();
        assert_eq!(e.field, field, "{pool}: {e}");
    }
    let _ = std::fs::remove_dir_all(dir);

    // `flow_route = "instance"` keeps today's routes even with peers.
    let (a, _b, path) = peered("keep", "flow_route = \"instance\"");
    assert!(
        path.starts_with("<sip:10.0.0.1:5060;lr;ob;flow=i0001"),
        "{path}"
    );

    // A reload changes the peers' timing at once, the peers and the routes
    // at the next restart.
    let mut cfg = (*a.router.config()).clone();
    cfg.pool.peers.clear();
    cfg.pool.flow_route = balancer::config::FlowRoute::Pool;
    cfg.pool.peer_timeout = Duration::from_millis(500);
    a.router.reload(cfg);
    let now = a.router.config();
    assert_eq!(now.pool.peers.len(), 1);
    assert_eq!(now.pool.flow_route, balancer::config::FlowRoute::Instance);
    assert_eq!(now.pool.peer_timeout, Duration::from_millis(500));
}
