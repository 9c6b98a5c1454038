//! Two routing cores of one pool driven directly (no sockets): instance A
//! and instance B share `routing.secret` and `sip.record_route`, each with
//! its own `sip.advertise`. What one wrote, the other routes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use balancer::config::{Config, Transport};
use balancer::router::{Dest, Now, Origin, Outbox, Router};
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

    /// Feeds one message at `ms`; the sends it caused, as (dest, text).
    fn feed(&mut self, text: &str, origin: Origin, ms: u64) -> Vec<(Dest, String)> {
        self.out.clear();
        let now = Now {
            at: self.base + Duration::from_millis(ms),
            wall_ms: 1_700_000_000_000 + ms,
        };
        self.router
            .on_message(text.as_bytes(), origin, now, &mut self.rng, &mut self.out);
        self.out
            .sends()
            .map(|(d, b)| (d.clone(), String::from_utf8_lossy(b).into_owned()))
            .collect()
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
    sent.iter()
        .find_map(|(d, t)| match d {
            Dest::Udp(a) if *a == addr(S1) || *a == addr(S2) => Some((*a, t.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("nothing to a server: {sent:?}"))
}
