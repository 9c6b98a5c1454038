//! Call capture (`[capture]`, HEPv3) against a live balancer: SIPp's UAC →
//! `siplb balancer` → SIPp's UAS on loopback, with a HEP collector that is
//! this test (a UDP socket on 127.0.0.1 and a HEPv3 parser of its own,
//! written from the spec, not siplb's encoder). Every message of every call
//! must reach it twice, as it came in and as it went out, with the right
//! addresses, capture id, protocol and a payload that is a SIP message
//! (UDP and TCP user agents); a browser's MESSAGE over WSS is captured as
//! the plaintext inside TLS and WebSocket; a sample of calls is captured
//! whole or not at all; a collector that is not there costs no call. Without `[capture]` nothing arrives and the
//! first test fails. Ports are picked at run time; every process is
//! stopped by its PID (`Proc`'s drop); every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod common;
use common::{Proc, free_port, get, require, root, siplb_bin, spawn};

/// One HEPv3 packet, as this test reads it.
#[derive(Debug, Clone)]
struct Hep {
    family: u8,
    proto: u8,
    src: SocketAddr,
    dst: SocketAddr,
    secs: u32,
    micros: u32,
    proto_type: u8,
    capture_id: u32,
    auth_key: Option<Vec<u8>>,
    correlation: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// Parses a HEPv3 packet: `HEP3`, total length (u16), then chunks of
/// vendor (u16), type (u16), length (u16, with its 6 header bytes), value.
fn parse_hep(b: &[u8]) -> Result<Hep, String> {
    if b.len() < 6 || &b[..4] != b"HEP3" {
        return Err("no HEP3 header".into());
    }
    let be16 = |x: &[u8]| u16::from_be_bytes([x[0], x[1]]);
    let be32 = |x: &[u8]| u32::from_be_bytes([x[0], x[1], x[2], x[3]]);
    if usize::from(be16(&b[4..])) != b.len() {
        return Err(format!(
            "length {} in a {}-byte datagram",
            be16(&b[4..]),
            b.len()
        ));
    }
    let mut chunks: BTreeMap<u16, &[u8]> = BTreeMap::new();
    let mut at = 6;
    while at < b.len() {
        if b.len() - at < 6 {
            return Err(format!("a truncated chunk header at {at}"));
        }
        let (vendor, kind, len) = (
            be16(&b[at..]),
            be16(&b[at + 2..]),
            usize::from(be16(&b[at + 4..])),
        );
        if vendor != 0 || len < 6 || at + len > b.len() {
            return Err(format!(
                "chunk {kind:#06x} at {at}: vendor {vendor}, length {len}"
            ));
        }
        if chunks.insert(kind, &b[at + 6..at + len]).is_some() {
            return Err(format!("chunk {kind:#06x} twice"));
        }
        at += len;
    }
    let need = |k: u16| chunks.get(&k).copied().ok_or(format!("no chunk {k:#06x}"));
    let family = need(0x0001)?[0];
    let (src_ip, dst_ip): (std::net::IpAddr, std::net::IpAddr) = match family {
        2 => {
            let (s, d) = (need(0x0003)?, need(0x0004)?);
            (
                <[u8; 4]>::try_from(s).map_err(|_| "ipv4 src")?.into(),
                <[u8; 4]>::try_from(d).map_err(|_| "ipv4 dst")?.into(),
            )
        }
        10 => {
            let (s, d) = (need(0x0005)?, need(0x0006)?);
            (
                <[u8; 16]>::try_from(s).map_err(|_| "ipv6 src")?.into(),
                <[u8; 16]>::try_from(d).map_err(|_| "ipv6 dst")?.into(),
            )
        }
        f => return Err(format!("family {f}")),
    };
    Ok(Hep {
        family,
        proto: need(0x0002)?[0],
        src: SocketAddr::new(src_ip, be16(need(0x0007)?)),
        dst: SocketAddr::new(dst_ip, be16(need(0x0008)?)),
        secs: be32(need(0x0009)?),
        micros: be32(need(0x000a)?),
        proto_type: need(0x000b)?[0],
        capture_id: be32(need(0x000c)?),
        auth_key: chunks.get(&0x000e).map(|v| v.to_vec()),
        correlation: chunks.get(&0x0011).map(|v| v.to_vec()),
        payload: need(0x000f)?.to_vec(),
    })
}

/// The collector: a UDP socket and a thread that keeps what it receives.
struct Collector {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Result<Hep, String>>>>,
    stop: Arc<AtomicBool>,
}

impl Collector {
    fn start() -> Collector {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_535];
            while !s.load(Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    g.lock().unwrap().push(parse_hep(&buf[..n]));
                }
            }
        });
        Collector { addr, got, stop }
    }

    fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    fn packets(&self) -> Vec<Hep> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.clone().unwrap_or_else(|e| panic!("not HEPv3: {e}")))
            .collect()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A balancer over one SIPp UAS, with `capture` as its `[capture]` section.
struct Bed {
    dir: PathBuf,
    sip: SocketAddr,
    uas: SocketAddr,
    admin: SocketAddr,
    _procs: Vec<Proc>,
}

impl Bed {
    fn metric(&self, series: &str) -> u64 {
        let (code, body) = get(self.admin, "/metrics").expect("admin API answers");
        assert_eq!(code, 200, "{body}");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("config and logs in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn start(name: &str, capture: &str) -> Result<Bed, String> {
    let dir = std::env::temp_dir().join(format!("siplb-capture-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (sip, admin, uas) = (free_port(), free_port(), free_port());
    let config = dir.join("siplb.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = [\"127.0.0.1:{sip}\"]\ntransports = [\"udp\", \"tcp\"]\n\n\
             [routing]\nsecret = \"capture-e2e-secret-0123456789\"\n\
             policy = \"round-robin\"\nhealth = \"agent\"\noutlier_failures = 0\n\n\
             [perf]\nkey_file = \"{}\"\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
             {capture}\n\n\
             [[servers]]\nid = \"s1\"\naddress = \"127.0.0.1:{uas}\"\n",
            root().join("examples/agent.key").display(),
        ),
    )
    .unwrap();
    let procs = vec![
        spawn(
            Command::new("sipp").args([
                "-sn",
                "uas",
                "-i",
                "127.0.0.1",
                "-p",
                &uas.to_string(),
                "-nostdin",
                "-timeout",
                "60",
            ]),
            &dir.join("uas.log"),
        ),
        spawn(
            Command::new(siplb_bin())
                .env("SIPLB_LOG", "info")
                .args(["balancer", "--config"])
                .arg(&config),
            &dir.join("balancer.log"),
        ),
    ];
    let mut bed = Bed {
        dir,
        sip: SocketAddr::from(([127, 0, 0, 1], sip)),
        uas: SocketAddr::from(([127, 0, 0, 1], uas)),
        admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        _procs: procs,
    };
    let begin = Instant::now();
    loop {
        for p in &mut bed._procs {
            if let Some(status) = p.0.try_wait().unwrap() {
                return Err(format!("the UAS or the balancer exited ({status})"));
            }
        }
        if get(bed.admin, "/servers").is_some_and(|(c, _)| c == 200) {
            return Ok(bed);
        }
        if begin.elapsed() > Duration::from_secs(15) {
            return Err("the balancer's admin API did not answer within 15 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn bed(name: &str, capture: &str) -> Bed {
    let mut why = String::new();
    for attempt in 1..=3 {
        match start(name, capture) {
            Ok(b) => return b,
            Err(e) => {
                eprintln!("{name}: setup {attempt} failed ({e}); again on other ports");
                why = e;
            }
        }
    }
    panic!("{name}: no setup in 3 attempts; the last: {why}");
}

/// SIPp's built-in UAC over `transport` (`u1`, `t1`): `calls` calls through
/// the balancer, all successful; Call-IDs `<n>-capture@test`.
fn calls(target: SocketAddr, transport: &str, calls: u32) {
    let out = Command::new("sipp")
        .args(["-sn", "uac", &target.to_string(), "-i", "127.0.0.1"])
        .args(["-p", &free_port().to_string(), "-t", transport, "-nostdin"])
        .args(["-cid_str", "%u-capture@test"])
        .args(["-r", "20", "-m", &calls.to_string(), "-timeout", "60"])
        .output()
        .expect("sipp");
    assert!(
        out.status.success(),
        "SIPp: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Waits (bounded) until the balancer has sent at least `at_least`
/// packets and the collector holds every one it sent (the last message of
/// a call is captured just after SIPp saw it, so maybe after SIPp exits).
fn all_arrived(bed: &Bed, collector: &Collector, at_least: u64) -> u64 {
    let begin = Instant::now();
    loop {
        let sent = bed.metric("siplb_capture_sent_total");
        if sent >= at_least
            && collector.count() as u64 == sent
            && bed.metric("siplb_capture_sent_total") == sent
        {
            return sent;
        }
        assert!(
            begin.elapsed() < Duration::from_secs(10),
            "the collector has {} of {sent} packets after 10 s",
            collector.count()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one captured message was: `in`/`out`, `uac`/`uas`, and its kind
/// (`INVITE`, `180 INVITE`, `200 BYE`...); its Call-ID.
fn classify(bed: &Bed, h: &Hep) -> ((&'static str, &'static str, String), String) {
    let m = sip::Message::parse(&h.payload).unwrap_or_else(|e| {
        panic!(
            "not a SIP message ({e}): {}",
            String::from_utf8_lossy(&h.payload)
        )
    });
    let (dir, peer) = if h.dst == bed.sip {
        ("in", h.src)
    } else if h.src == bed.sip {
        ("out", h.dst)
    } else {
        panic!("neither from nor to the balancer: {} -> {}", h.src, h.dst)
    };
    let side = if peer == bed.uas { "uas" } else { "uac" };
    let method = String::from_utf8_lossy(m.cseq().method.as_bytes()).into_owned();
    let kind = match m.status() {
        Some(code) => format!("{code} {method}"),
        None => method,
    };
    let cid = String::from_utf8_lossy(m.call_id()).into_owned();
    ((dir, side, kind), cid)
}

/// Every message of one call through the balancer, both ways.
fn whole_call() -> BTreeSet<(&'static str, &'static str, String)> {
    [
        ("in", "uac", "INVITE"),
        ("out", "uas", "INVITE"),
        ("in", "uas", "180 INVITE"),
        ("out", "uac", "180 INVITE"),
        ("in", "uas", "200 INVITE"),
        ("out", "uac", "200 INVITE"),
        ("in", "uac", "ACK"),
        ("out", "uas", "ACK"),
        ("in", "uac", "BYE"),
        ("out", "uas", "BYE"),
        ("in", "uas", "200 BYE"),
        ("out", "uac", "200 BYE"),
    ]
    .into_iter()
    .map(|(d, s, k)| (d, s, k.to_owned()))
    .collect()
}

/// The captured messages by Call-ID, each packet's fields checked.
fn by_call(
    bed: &Bed,
    packets: &[Hep],
    uac_proto: u8,
    window: (u64, u64),
) -> BTreeMap<String, BTreeSet<(&'static str, &'static str, String)>> {
    let mut calls: BTreeMap<String, BTreeSet<_>> = BTreeMap::new();
    for h in packets {
        let (what, cid) = classify(bed, h);
        assert_eq!(
            (h.family, h.proto_type, h.capture_id),
            (2, 1, 4242),
            "{h:?}"
        );
        let proto = if what.1 == "uas" { 17 } else { uac_proto };
        assert_eq!(h.proto, proto, "{what:?}");
        assert_eq!(h.auth_key.as_deref(), Some(&b"homer-key"[..]));
        assert_eq!(h.correlation.as_deref(), Some(cid.as_bytes()), "{what:?}");
        let at = u64::from(h.secs) * 1_000_000 + u64::from(h.micros);
        assert!(h.micros < 1_000_000, "{h:?}");
        assert!(
            (window.0..=window.1).contains(&at),
            "timestamp {at} µs outside the run {window:?}"
        );
        calls.entry(cid).or_default().insert(what);
    }
    calls
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

const CAPTURE: &str = "[capture]\nhep = \"{hep}\"\ncapture_id = 4242\npassword = \"homer-key\"";

fn every_message_of_every_call(name: &str, transport: &str, uac_proto: u8) {
    require("sipp", "sip-tester");
    let collector = Collector::start();
    let bed = bed(name, &CAPTURE.replace("{hep}", &collector.addr.to_string()));
    let n = 10;
    let from = micros_now();
    calls(bed.sip, transport, n);
    let sent = all_arrived(&bed, &collector, 12 * u64::from(n));
    let to = micros_now();
    eprintln!("{name}: {n} calls, {sent} HEP packets");
    let packets = collector.packets();
    assert_eq!(packets.len() as u64, sent);
    let calls = by_call(&bed, &packets, uac_proto, (from, to));
    assert_eq!(calls.len(), n as usize, "{:?}", calls.keys());
    for (cid, got) in &calls {
        let missing: Vec<_> = whole_call().difference(got).cloned().collect();
        assert!(missing.is_empty(), "{cid}: not captured: {missing:?}");
    }
    for reason in ["queue_full", "send_failed", "too_large"] {
        assert_eq!(
            bed.metric(&format!(
                "siplb_capture_dropped_total{{reason=\"{reason}\"}}"
            )),
            0,
            "{reason}"
        );
    }
}

#[test]
fn every_message_in_and_out_over_udp_reaches_the_collector() {
    every_message_of_every_call("udp", "u1", 17);
}

#[test]
fn messages_of_a_tcp_user_agent_are_captured_as_tcp() {
    every_message_of_every_call("tcp", "t1", 6);
}

#[test]
fn a_sample_captures_whole_calls_and_no_others() {
    require("sipp", "sip-tester");
    let collector = Collector::start();
    let bed = bed(
        "sample",
        &format!(
            "{}\nsample = 0.5",
            CAPTURE.replace("{hep}", &collector.addr.to_string())
        ),
    );
    let n = 40;
    let from = micros_now();
    calls(bed.sip, "u1", n);
    // Which calls: those the Call-ID hash picks, of the ones SIPp made.
    let made: BTreeSet<String> = (1..=n).map(|i| format!("{i}-capture@test")).collect();
    let picked: BTreeSet<String> = made
        .iter()
        .filter(|c| balancer::capture::sampled(c.as_bytes(), 0.5))
        .cloned()
        .collect();
    let sent = all_arrived(&bed, &collector, 12 * picked.len() as u64);
    eprintln!(
        "sample: {} of {n} calls picked, {sent} HEP packets",
        picked.len()
    );
    let calls = by_call(&bed, &collector.packets(), 17, (from, micros_now()));
    let captured: BTreeSet<String> = calls.keys().cloned().collect();
    assert_eq!(captured, picked);
    assert!(
        (10..=30).contains(&captured.len()),
        "{} of {n} calls captured with sample = 0.5",
        captured.len()
    );
    for (cid, got) in &calls {
        let missing: Vec<_> = whole_call().difference(got).cloned().collect();
        assert!(missing.is_empty(), "{cid}: not captured whole: {missing:?}");
    }
}

#[test]
fn calls_go_through_when_no_collector_listens() {
    require("sipp", "sip-tester");
    // A port nobody listens on: each packet draws an ICMP port unreachable.
    let nobody = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let bed = bed("absent", &CAPTURE.replace("{hep}", &nobody.to_string()));
    calls(bed.sip, "u1", 20);
    // SIPp saw every call succeed (asserted in `calls`); the refused sends
    // were counted, not waited on. (On Linux an ICMP error on a connected
    // UDP socket fails the next send with ECONNREFUSED.)
    let begin = Instant::now();
    loop {
        let failed = bed.metric("siplb_capture_dropped_total{reason=\"send_failed\"}");
        if failed > 0 {
            break;
        }
        assert!(
            begin.elapsed() < Duration::from_secs(10),
            "no failed send counted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A balancer with a WSS listener (a certificate made here) in front of
/// one UDP server that is this test: its port, the server's socket, the
/// CA to trust, the admin address; the process.
struct WssBed {
    dir: PathBuf,
    wss: u16,
    server: UdpSocket,
    ca: rustls::pki_types::CertificateDer<'static>,
    admin: SocketAddr,
    _lb: Proc,
}

impl Drop for WssBed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("config and logs in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn wss_bed(hep: SocketAddr) -> WssBed {
    let dir = std::env::temp_dir().join(format!("siplb-capture-wss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf.subject_alt_names = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("chain.pem"), cert.pem() + &ca.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..3 {
        let (sip, wss, admin) = (free_port(), free_port(), free_port());
        std::fs::write(
            dir.join("siplb.toml"),
            format!(
                "[sip]\nlisten = [\"127.0.0.1:{sip}\"]\ntransports = [\"udp\", \"wss\"]\n\
                 wss_port = {wss}\n\
                 [sip.tls]\ncertificate = \"chain.pem\"\nkey = \"key.pem\"\n\
                 [routing]\nsecret = \"capture-e2e-secret-0123456789\"\n\
                 policy = \"round-robin\"\nhealth = \"agent\"\noutlier_failures = 0\n\
                 [perf]\nkey_file = \"{}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
                 {}\n\
                 [[servers]]\nid = \"s1\"\naddress = \"{}\"\n",
                root().join("examples/agent.key").display(),
                CAPTURE.replace("{hep}", &hep.to_string()),
                server.local_addr().unwrap(),
            ),
        )
        .unwrap();
        let mut lb = spawn(
            Command::new(siplb_bin())
                .env("SIPLB_LOG", "info")
                .args(["balancer", "--config"])
                .arg(dir.join("siplb.toml")),
            &dir.join("balancer.log"),
        );
        let begin = Instant::now();
        while lb.0.try_wait().unwrap().is_none() && begin.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect(("127.0.0.1", wss)).is_ok() {
                return WssBed {
                    dir,
                    wss,
                    server,
                    ca: ca.der().clone(),
                    admin: SocketAddr::from(([127, 0, 0, 1], admin)),
                    _lb: lb,
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // A port taken meanwhile: others.
    }
    panic!(
        "the balancer did not listen for WSS; log in {}",
        dir.display()
    );
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

#[test]
fn a_browser_over_wss_is_captured_in_plaintext() {
    let collector = Collector::start();
    let bed = wss_bed(collector.addr);
    // The browser: TLS to the WSS port, then the WebSocket upgrade.
    let tcp = TcpStream::connect(("127.0.0.1", bed.wss)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let browser_addr = tcp.local_addr().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(bed.ca.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::IpAddress(
        "127.0.0.1".parse::<std::net::IpAddr>().unwrap().into(),
    );
    let tls: Box<dyn Stream> = Box::new(rustls::StreamOwned::new(
        rustls::ClientConnection::new(Arc::new(cfg), name).unwrap(),
        tcp,
    ));
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("wss://127.0.0.1:{}/", bed.wss)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "sip".parse().unwrap());
    let (mut ws, _) = tungstenite::client::client(req, tls).expect("the WebSocket upgrade");
    let message = String::from(
        "MESSAGE sip:bob@example.com SIP/2.0\r\n\
         Via: SIP/2.0/WSS b.invalid;branch=z9hG4bK-capture-1\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.com>;tag=a1\r\n\
         To: <sip:bob@example.com>\r\nCall-ID: wss-capture@test\r\n\
         CSeq: 1 MESSAGE\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    );
    ws.send(tungstenite::Message::text(message.clone()))
        .unwrap();
    // The server answers 200 with the Vias it got.
    let mut buf = vec![0u8; 65_535];
    let (n, from) = bed
        .server
        .recv_from(&mut buf)
        .expect("the MESSAGE reaches the server");
    let got = String::from_utf8_lossy(&buf[..n]).into_owned();
    let mut ok = String::from("SIP/2.0 200 OK\r\n");
    for l in got.split("\r\n").skip(1).take_while(|l| !l.is_empty()) {
        let lower = l.to_ascii_lowercase();
        if ["via:", "from:", "to:", "call-id:", "cseq:"]
            .iter()
            .any(|h| lower.starts_with(h))
        {
            ok += l;
            ok += "\r\n";
        }
    }
    ok += "Content-Length: 0\r\n\r\n";
    bed.server.send_to(ok.as_bytes(), from).unwrap();
    let answer = loop {
        match ws.read().expect("the browser gets the 200") {
            tungstenite::Message::Text(t) if t.starts_with("SIP/2.0 200") => {
                break t.as_str().to_owned();
            }
            _ => {}
        }
    };
    // In the capture: the browser's MESSAGE and the 200 it got, as the
    // plaintext inside TLS and WebSocket, over TCP; the server's leg on UDP.
    let begin = Instant::now();
    let (code, metrics) = loop {
        let (code, body) = get(bed.admin, "/metrics").expect("admin API answers");
        if body.contains("siplb_capture_sent_total 4\n") && collector.count() >= 4 {
            break (code, body);
        }
        assert!(
            begin.elapsed() < Duration::from_secs(10),
            "the collector has {} packets:\n{body}",
            collector.count()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, 200);
    let wss = SocketAddr::from(([127, 0, 0, 1], bed.wss));
    let packets = collector.packets();
    let find = |src: SocketAddr, dst: SocketAddr| {
        packets
            .iter()
            .find(|h| h.src == src && h.dst == dst)
            .unwrap_or_else(|| panic!("no packet {src} -> {dst} in {packets:?}\n{metrics}"))
    };
    let inbound = find(browser_addr, wss);
    assert_eq!(inbound.proto, 6);
    assert_eq!(
        inbound.payload,
        message.as_bytes(),
        "the plaintext, byte for byte"
    );
    let outbound = find(wss, browser_addr);
    assert_eq!(outbound.proto, 6);
    assert_eq!(outbound.payload, answer.as_bytes());
    let server = bed.server.local_addr().unwrap();
    let to_server = packets
        .iter()
        .find(|h| h.src == from && h.dst == server)
        .expect("the MESSAGE out to the server");
    assert_eq!(
        (to_server.proto, to_server.payload.clone()),
        (17, got.into_bytes())
    );
    assert!(
        packets
            .iter()
            .any(|h| h.src == server && h.dst == from && h.payload == ok.as_bytes())
    );
    for h in &packets {
        assert_eq!(h.correlation.as_deref(), Some(&b"wss-capture@test"[..]));
    }
}
