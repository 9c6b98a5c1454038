//! Flows owned by another instance (issue 17 item 2), over real sockets on
//! loopback: balancer instances A (`pool.instance = 1`) and B (2), each the
//! other's `pool.peers`; one registrar written here (UDP); a phone written
//! here on a TCP connection to A. The phone registers through A: the Path
//! names the pool, with A's flow token. The registrar's INVITE goes to the
//! pool, and here the pool is B (as when the name or the VIP leads there):
//! B forwards it to A, A sends it down the phone's connection, and the
//! phone's 200 comes back A → B → registrar. Then A is killed (by its PID):
//! the next INVITE to B gets `430 Flow Failed` from B within a bounded time,
//! and the one after at once (A known down).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Proc, free_port, get, root, siplb_bin, spawn};

const POOL: &str = "pool.test";

/// One instance's config.
fn config(dir: &Path, name: &str, me: u16, admin: u16, n: u16, peer: (u16, u16), srv: u16) {
    let key = root().join("examples/agent.key");
    let text = format!(
        r#"
[sip]
listen = ["127.0.0.1:{me}"]
transports = ["udp", "tcp"]
record_route = "{POOL}"

[routing]
secret = "pool-flow-e2e-secret-0123456789"
policy = "round-robin"
register = "fork"

[perf]
key_file = "{key}"

[admin]
listen = "127.0.0.1:{admin}"

[pool]
instance = {n}
peers = [{{ instance = {pn}, address = "127.0.0.1:{pp}" }}]
peer_timeout = "1s"
peer_probe = "300ms"

[[servers]]
id = "registrar"
address = "127.0.0.1:{srv}"
"#,
        key = key.display(),
        pn = peer.0,
        pp = peer.1,
    );
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

fn start(dir: &Path, name: &str) -> Proc {
    spawn(
        Command::new(siplb_bin())
            .env("SIPLB_LOG", "debug")
            .args(["balancer", "--config"])
            .arg(dir.join(format!("{name}.toml"))),
        &dir.join(format!("{name}.log")),
    )
}

/// The value of header `name` in `msg` (first one).
fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n")
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
}

fn status(msg: &str) -> Option<u16> {
    msg.strip_prefix("SIP/2.0 ")?.get(..3)?.parse().ok()
}

/// The response `code` to request `req` as a UA writes it (its Vias, From,
/// Call-ID, CSeq copied; a To tag; our Contact).
fn answer(req: &str, code: u16, reason: &str, contact: &str) -> String {
    let mut r = format!("SIP/2.0 {code} {reason}\r\n");
    for l in req.split("\r\n").take_while(|l| !l.is_empty()).skip(1) {
        let name = l
            .split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match name.as_str() {
            "via" | "v" | "from" | "f" | "call-id" | "i" | "cseq" | "path" => {
                r.push_str(l);
                r.push_str("\r\n");
            }
            "to" | "t" if l.contains(";tag=") => {
                r.push_str(l);
                r.push_str("\r\n");
            }
            "to" | "t" => {
                r.push_str(l);
                r.push_str(";tag=e2e\r\n");
            }
            _ => {}
        }
    }
    r.push_str(&format!("Contact: {contact}\r\nContent-Length: 0\r\n\r\n"));
    r
}

/// A phone on a TCP connection: reads whole messages (Content-Length 0 or
/// as given), keep-alive CRLFs skipped.
struct Phone {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl Phone {
    fn send(&mut self, msg: &str) {
        self.conn.write_all(msg.as_bytes()).unwrap();
    }

    /// The next message within `within`.
    fn recv(&mut self, within: Duration) -> Option<String> {
        let until = Instant::now() + within;
        loop {
            while self.buf.starts_with(b"\r\n") {
                self.buf.drain(..2);
            }
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end + 4]).into_owned();
                let len: usize = header(&head, "content-length")
                    .or_else(|| header(&head, "l"))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let msg = String::from_utf8_lossy(&self.buf[..end + 4 + len]).into_owned();
                    self.buf.drain(..end + 4 + len);
                    return Some(msg);
                }
            }
            let left = until.checked_duration_since(Instant::now())?;
            self.conn
                .set_read_timeout(Some(left.max(Duration::from_millis(10))))
                .unwrap();
            let mut chunk = [0u8; 4096];
            match self.conn.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) if Instant::now() >= until => return None,
                Err(_) => {}
            }
        }
    }
}

/// The registrar's next datagram within `within` that `keep` accepts.
fn recv_udp(
    sock: &UdpSocket,
    within: Duration,
    keep: impl Fn(&str) -> bool,
) -> Option<(String, SocketAddr)> {
    let until = Instant::now() + within;
    let mut buf = vec![0u8; 65_536];
    loop {
        let left = until.checked_duration_since(Instant::now())?;
        sock.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .unwrap();
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if keep(&text) {
                return Some((text, from));
            }
        }
    }
}

fn invite(call: &str, registrar: SocketAddr, route: &str, contact: &str) -> String {
    format!(
        "INVITE {contact} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {registrar};branch=z9hG4bK-{call}\r\n\
         Max-Forwards: 70\r\n\
         Route: {route}\r\n\
         From: <sip:carol@{POOL}>;tag=c-{call}\r\n\
         To: <sip:bob@{POOL}>\r\n\
         Call-ID: {call}\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:carol@{registrar}>\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// A counter's value in a `/metrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn a_peer_forwards_to_the_flows_owner_and_answers_430_once_it_is_gone() {
    let t0 = Instant::now();
    let dir = std::env::temp_dir().join(format!("siplb-pool-flow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (pa, pb, aa, ab) = (free_port(), free_port(), free_port(), free_port());
    let registrar = UdpSocket::bind("127.0.0.1:0").unwrap();
    let reg_addr = registrar.local_addr().unwrap();
    config(&dir, "a", pa, aa, 1, (2, pb), reg_addr.port());
    config(&dir, "b", pb, ab, 2, (1, pa), reg_addr.port());
    let mut a = start(&dir, "a");
    let _b = start(&dir, "b");
    let (admin_a, admin_b) = (
        SocketAddr::from(([127, 0, 0, 1], aa)),
        SocketAddr::from(([127, 0, 0, 1], ab)),
    );
    let log =
        |name: &str| std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(admin_a, "/metrics").is_none() || get(admin_b, "/metrics").is_none() {
        assert!(
            Instant::now() < deadline,
            "the instances did not start\nA:\n{}\nB:\n{}",
            log("a"),
            log("b")
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The phone registers over TCP through A.
    let conn = TcpStream::connect(("127.0.0.1", pa)).unwrap();
    let me = conn.local_addr().unwrap();
    let mut phone = Phone {
        conn,
        buf: Vec::new(),
    };
    let contact = format!("<sip:bob@{me};transport=tcp>");
    phone.send(&format!(
        "REGISTER sip:{POOL} SIP/2.0\r\n\
         Via: SIP/2.0/TCP {me};branch=z9hG4bK-reg1;rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:bob@{POOL}>;tag=reg1\r\n\
         To: <sip:bob@{POOL}>\r\n\
         Call-ID: reg1@e2e\r\n\
         CSeq: 1 REGISTER\r\n\
         Supported: path, outbound\r\n\
         Contact: {contact};reg-id=1;+sip.instance=\"<urn:uuid:00000000-0000-0000-0000-000000000001>\"\r\n\
         Expires: 600\r\n\
         Content-Length: 0\r\n\r\n"
    ));
    let (reg, from) = recv_udp(&registrar, Duration::from_secs(5), |m| {
        m.starts_with("REGISTER ")
    })
    .unwrap_or_else(|| panic!("no REGISTER at the registrar\nA:\n{}", log("a")));
    assert_eq!(from.port(), pa, "through A");
    let path = header(&reg, "path").expect("A's Path").to_owned();
    assert!(
        path.starts_with(&format!("<sip:{POOL};lr;ob;flow=i0001")),
        "the Path names the pool and A's flow: {path}"
    );
    registrar
        .send_to(answer(&reg, 200, "OK", &contact).as_bytes(), from)
        .unwrap();
    let ok = phone
        .recv(Duration::from_secs(5))
        .expect("the 200 to the REGISTER");
    assert_eq!(status(&ok), Some(200), "{ok}");

    // The registrar's INVITE to the pool lands on B: B → A → the phone.
    let to_b = SocketAddr::from(([127, 0, 0, 1], pb));
    let uri = format!("sip:bob@{me};transport=tcp");
    registrar
        .send_to(invite("call-1", reg_addr, &path, &uri).as_bytes(), to_b)
        .unwrap();
    let inv = phone
        .recv(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no INVITE on the phone\nA:\n{}\nB:\n{}", log("a"), log("b")));
    assert!(inv.starts_with("INVITE "), "{inv}");
    let vias: Vec<_> = inv
        .split("\r\n")
        .filter(|l| l.starts_with("Via:"))
        .collect();
    assert_eq!(vias.len(), 3, "A's, B's and the registrar's Via: {inv}");
    assert!(vias[0].contains(&format!("127.0.0.1:{pa}")), "{inv}");
    assert!(vias[1].contains(&format!("127.0.0.1:{pb}")), "{inv}");
    phone.send(&answer(&inv, 200, "OK", &contact));
    let (resp, from) = recv_udp(&registrar, Duration::from_secs(5), |m| {
        status(m).is_some_and(|c| c >= 200)
    })
    .unwrap_or_else(|| panic!("no final answer\nA:\n{}\nB:\n{}", log("a"), log("b")));
    assert_eq!(status(&resp), Some(200), "{resp}");
    assert_eq!(from, to_b, "back through B");
    assert!(resp.contains("Call-ID: call-1\r\n"), "{resp}");
    let (_, m) = get(admin_b, "/metrics").unwrap();
    assert_eq!(metric(&m, "siplb_flow_forwarded_total"), Some(1.0), "{m}");

    // A dies: its flow with it. The next INVITE gets 430 from B, bounded.
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let sent = Instant::now();
    registrar
        .send_to(invite("call-2", reg_addr, &path, &uri).as_bytes(), to_b)
        .unwrap();
    let (resp, from) = recv_udp(&registrar, Duration::from_secs(5), |m| {
        status(m).is_some_and(|c| c >= 200)
    })
    .unwrap_or_else(|| panic!("no final answer once A is gone (silence)\nB:\n{}", log("b")));
    let took = sent.elapsed();
    assert_eq!(status(&resp), Some(430), "{resp}");
    assert_eq!(from, to_b);
    assert!(resp.contains("Call-ID: call-2\r\n"), "{resp}");
    assert!(
        took < Duration::from_millis(2_500),
        "within peer_timeout and a probe: {took:?}"
    );

    // Known down by now: 430 at once.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !get(admin_b, "/metrics").is_some_and(|(_, m)| {
        m.contains(&format!(
            "siplb_peer_up{{instance=\"1\",address=\"127.0.0.1:{pa}\"}} 0"
        ))
    }) {
        assert!(
            Instant::now() < deadline,
            "B never took A for down\n{}",
            log("b")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = Instant::now();
    registrar
        .send_to(invite("call-3", reg_addr, &path, &uri).as_bytes(), to_b)
        .unwrap();
    let (resp, _) = recv_udp(&registrar, Duration::from_secs(3), |m| {
        status(m).is_some_and(|c| c >= 200)
    })
    .expect("430 at once");
    assert_eq!(status(&resp), Some(430), "{resp}");
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "{:?}",
        sent.elapsed()
    );
    let (_, m) = get(admin_b, "/metrics").unwrap();
    assert!(
        metric(&m, "siplb_flow_owner_down_total").is_some_and(|n| n >= 2.0),
        "{m}"
    );
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
