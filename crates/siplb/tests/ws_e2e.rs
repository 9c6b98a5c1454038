//! SIP over WebSocket (RFC 7118) through a real siplb process, as a browser
//! softphone speaks it (JsSIP, SIP.js): `.invalid` Via and Contact hosts,
//! one SIP message per WebSocket message, the `sip` subprotocol. Over WS
//! and WSS (a certificate made by the test): REGISTER forked to two UDP
//! servers and merged, a call from the browser (INVITE, 200, ACK; the
//! server hangs up: its BYE reaches the browser down its WebSocket), a call
//! to the browser along our Path (the browser hangs up), and the upgrade
//! refused without the `sip` subprotocol or from an Origin not allowed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

fn siplb_bin() -> PathBuf {
    std::env::var_os("SIPLB_BIN").map_or_else(|| env!("CARGO_BIN_EXE_siplb").into(), PathBuf::from)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A siplb with WS and WSS listeners in front of two UDP servers.
struct Lb {
    child: Child,
    ws: u16,
    wss: u16,
    ca: rustls::pki_types::CertificateDer<'static>,
    /// A client certificate signed by the CA, and its key (DER).
    client: (rustls::pki_types::CertificateDer<'static>, Vec<u8>),
    dir: PathBuf,
}

impl Drop for Lb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lb {
    fn start(name: &str, servers: &[SocketAddr], extra: &str) -> Lb {
        Lb::start_with(name, servers, extra, false)
    }

    /// With `client_certs`, the TLS listener asks for client certificates
    /// signed by the test CA (`client_ca`).
    fn start_with(name: &str, servers: &[SocketAddr], extra: &str, client_certs: bool) -> Lb {
        let dir = std::env::temp_dir().join(format!("siplb-ws-{name}-{}", std::process::id()));
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
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        // A client certificate from the same CA, for the tests that need one.
        let client = rcgen::CertificateParams::new(vec!["phone.example".to_owned()]).unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let client_cert = client.signed_by(&client_key, &ca, &ca_key).unwrap();
        let client_id = (client_cert.der().clone(), client_key.serialize_der());
        std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
        std::fs::write(dir.join("agent.key"), "ws-test-agent-key-0123456789").unwrap();
        let (sip, ws, wss, tls, admin) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let client_ca = if client_certs {
            "client_ca = \"ca.pem\"\n"
        } else {
            ""
        };
        let mut text = format!(
            "[sip]\nlisten = [\"127.0.0.1:{sip}\"]\ntransports = [\"udp\", \"tcp\", \"ws\", \"wss\"]\n\
             ws_port = {ws}\nwss_port = {wss}\ntls_port = {tls}\nws_path = \"/sip\"\n{extra}\n\
             [sip.tls]\ncertificate = \"chain.pem\"\nkey = \"key.pem\"\n{client_ca}\
             [routing]\nsecret = \"ws-test-secret-0123456789\"\npolicy = \"round-robin\"\nhealth = \"agent\"\n\
             [perf]\nkey_file = \"agent.key\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n"
        );
        for (i, s) in servers.iter().enumerate() {
            text += &format!("[[servers]]\nid = \"s{}\"\naddress = \"{s}\"\n", i + 1);
        }
        std::fs::write(dir.join("siplb.toml"), text).unwrap();
        let log = std::fs::File::create(dir.join("siplb.log")).unwrap();
        let child = Command::new(siplb_bin())
            .args(["balancer", "--config"])
            .arg(dir.join("siplb.toml"))
            .env("SIPLB_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let lb = Lb {
            child,
            ws,
            wss,
            ca: ca.der().clone(),
            client: client_id,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", wss)).is_err()
            || TcpStream::connect(("127.0.0.1", ws)).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "siplb did not listen:\n{}",
                lb.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        lb
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("siplb.log")).unwrap_or_default()
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A browser's WebSocket to siplb.
struct Browser {
    ws: WebSocket<Box<dyn Stream>>,
    host: String,
}

fn tls_stream(lb: &Lb, tcp: TcpStream) -> Box<dyn Stream> {
    tls_stream_as(lb, tcp, false)
}

/// A TLS client of siplb's listener; `present` shows the client
/// certificate.
fn tls_stream_as(lb: &Lb, tcp: TcpStream, present: bool) -> Box<dyn Stream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(lb.ca.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = if present {
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(lb.client.1.clone().into());
        cfg.with_client_auth_cert(vec![lb.client.0.clone()], key)
            .unwrap()
    } else {
        cfg.with_no_client_auth()
    };
    let name = rustls::pki_types::ServerName::IpAddress(
        "127.0.0.1".parse::<std::net::IpAddr>().unwrap().into(),
    );
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    Box::new(rustls::StreamOwned::new(conn, tcp))
}

/// Opens the WebSocket (`secure`: WSS) with the given subprotocol and
/// Origin; the upgrade's error when refused.
fn open(
    lb: &Lb,
    secure: bool,
    protocol: Option<&str>,
    origin: Option<&str>,
) -> Result<Browser, String> {
    let port = if secure { lb.wss } else { lb.ws };
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let stream: Box<dyn Stream> = if secure {
        tls_stream(lb, tcp)
    } else {
        Box::new(tcp)
    };
    let scheme = if secure { "wss" } else { "ws" };
    let mut req = format!("{scheme}://127.0.0.1:{port}/sip")
        .into_client_request()
        .unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("sec-websocket-protocol", p.parse().unwrap());
    }
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tungstenite::client::client(req, stream) {
        Ok((ws, resp)) => {
            assert_eq!(resp.headers()["sec-websocket-protocol"], "sip");
            Ok(Browser {
                ws,
                host: format!("b{}.invalid", std::process::id()),
            })
        }
        Err(e) => Err(e.to_string()),
    }
}

impl Browser {
    fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_owned())).unwrap();
    }

    /// The next SIP message, within 3 s.
    fn recv(&mut self) -> String {
        loop {
            match self.ws.read() {
                Ok(Message::Text(t)) => return t.as_str().to_owned(),
                Ok(Message::Binary(b)) => return String::from_utf8_lossy(&b).into_owned(),
                Ok(_) => {}
                Err(e) => panic!("the browser's WebSocket: {e}"),
            }
        }
    }

    /// The next message matching `pred` (others skipped, e.g. our 100).
    fn expect(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        for _ in 0..10 {
            let m = self.recv();
            if pred(&m) {
                return m;
            }
        }
        panic!("the browser never got {what}");
    }
}

/// A scripted UDP server.
struct Server {
    sock: UdpSocket,
}

impl Server {
    fn new() -> Server {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Server { sock }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    /// The next request or response matching `pred`, with its sender.
    fn expect(&self, what: &str, pred: impl Fn(&str) -> bool) -> (String, SocketAddr) {
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok((n, from)) = self.sock.recv_from(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                if pred(&m) {
                    return (m, from);
                }
            }
        }
        panic!("server {} never got {what}", self.addr());
    }

    fn send(&self, text: &str, to: SocketAddr) {
        self.sock.send_to(text.as_bytes(), to).unwrap();
    }
}

fn headers<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    msg.split("\r\n")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
        .collect()
}

fn header<'a>(msg: &'a str, name: &str) -> &'a str {
    headers(msg, name)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no {name} in\n{msg}"))
}

/// Comma-separated values of every `name` header, in order.
fn values<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    headers(msg, name)
        .into_iter()
        .flat_map(|v| v.split(", "))
        .collect()
}

/// A response to `req`: its Vias, From, To (with `tag`), Call-ID, CSeq and
/// Record-Route, and `extra` headers.
fn response(req: &str, status: &str, tag: &str, extra: &str) -> String {
    let mut out = format!("SIP/2.0 {status}\r\n");
    for v in headers(req, "via") {
        out += &format!("Via: {v}\r\n");
    }
    for r in headers(req, "record-route") {
        out += &format!("Record-Route: {r}\r\n");
    }
    let to = header(req, "to");
    let to = if to.contains("tag=") {
        to.to_owned()
    } else {
        format!("{to};tag={tag}")
    };
    out += &format!(
        "From: {}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {}\r\n{extra}Content-Length: 0\r\n\r\n",
        header(req, "from"),
        header(req, "call-id"),
        header(req, "cseq")
    );
    out
}

fn is_request(m: &str, method: &str) -> bool {
    m.starts_with(&format!("{method} "))
}

fn is_response(m: &str, code: u16, method: &str) -> bool {
    m.starts_with(&format!("SIP/2.0 {code} ")) && header(m, "cseq").ends_with(method)
}

/// The whole exchange over one kind of WebSocket.
fn browser_calls(secure: bool) {
    let (s1, s2) = (Server::new(), Server::new());
    let name = if secure { "wss" } else { "ws" };
    let lb = Lb::start(name, &[s1.addr(), s2.addr()], "");
    let mut b = open(&lb, secure, Some("sip"), Some("https://phone.example"))
        .unwrap_or_else(|e| panic!("{e}\n{}", lb.log()));
    let t = if secure { "WSS" } else { "WS" };
    let host = b.host.clone();
    let call = format!("ws-{name}-{}", std::process::id());

    // REGISTER, forked to both servers, merged.
    b.send(&format!(
        "REGISTER sip:example.test SIP/2.0\r\nVia: SIP/2.0/{t} {host};branch=z9hG4bKreg{name}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.test>;tag=br\r\nTo: <sip:alice@example.test>\r\n\
         Call-ID: reg-{call}\r\nCSeq: 1 REGISTER\r\n\
         Contact: <sip:a1@{host};transport={}>;+sip.ice;reg-id=1\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n",
        t.to_ascii_lowercase()
    ));
    let mut path = String::new();
    for s in [&s1, &s2] {
        let (reg, from) = s.expect("the REGISTER", |m| is_request(m, "REGISTER"));
        let p = values(&reg, "path");
        assert_eq!(p.len(), 1, "our Path: {reg}");
        assert!(p[0].contains(";ob;flow=c"), "{}", p[0]);
        path = p[0].to_owned();
        s.send(
            &response(
                &reg,
                "200 OK",
                "srv",
                "Contact: <sip:a1@x.invalid>;expires=600\r\n",
            ),
            from,
        );
    }
    let ok = b.expect("the merged 200", |m| is_response(m, 200, "REGISTER"));
    assert_eq!(headers(&ok, "via").len(), 1, "only the browser's Via: {ok}");

    // A call from the browser: INVITE, 200, ACK; the server hangs up.
    b.send(&format!(
        "INVITE sip:bob@example.test SIP/2.0\r\nVia: SIP/2.0/{t} {host};branch=z9hG4bKinv{name}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:alice@example.test>;tag=bi\r\nTo: <sip:bob@example.test>\r\n\
         Call-ID: out-{call}\r\nCSeq: 1 INVITE\r\nContact: <sip:a1@{host};transport={};ob>\r\nContent-Length: 0\r\n\r\n",
        t.to_ascii_lowercase()
    ));
    let (inv, from) = {
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut got = None;
        while got.is_none() && Instant::now() < deadline {
            for s in [&s1, &s2] {
                s.sock
                    .set_read_timeout(Some(Duration::from_millis(20)))
                    .unwrap();
                if let Ok((n, f)) = s.sock.recv_from(&mut buf) {
                    let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if is_request(&m, "INVITE") {
                        got = Some((m, f, s.addr()));
                    }
                }
            }
        }
        let (m, f, at) = got.expect("a server gets the browser's INVITE");
        (m, (f, at))
    };
    let (lb_addr, server_addr) = from;
    let server = if server_addr == s1.addr() { &s1 } else { &s2 };
    server
        .sock
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let rr = values(&inv, "record-route");
    assert_eq!(
        rr.len(),
        2,
        "WebSocket in, UDP out: two Record-Routes: {inv}"
    );
    assert!(
        rr[1].contains(";transport=ws;") && rr[1].contains(";flow=c"),
        "{}",
        rr[1]
    );
    let server_contact = format!("<sip:bob@{}>", server.addr());
    server.send(
        &response(
            &inv,
            "200 OK",
            "b2",
            &format!("Contact: {server_contact}\r\n"),
        ),
        lb_addr,
    );
    let ok = b.expect("the 200 to its INVITE", |m| is_response(m, 200, "INVITE"));
    // The browser's ACK by the route set (Record-Route reversed).
    let routes: String = values(&ok, "record-route")
        .iter()
        .rev()
        .map(|r| format!("Route: {r}\r\n"))
        .collect();
    let to = header(&ok, "to").to_owned();
    b.send(&format!(
        "ACK sip:bob@{} SIP/2.0\r\nVia: SIP/2.0/{t} {host};branch=z9hG4bKack{name}\r\nMax-Forwards: 70\r\n{routes}\
         From: <sip:alice@example.test>;tag=bi\r\nTo: {to}\r\nCall-ID: out-{call}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        server.addr()
    ));
    server.expect("the browser's ACK", |m| is_request(m, "ACK"));
    // The server hangs up: its route set is the Record-Route in order.
    let routes: String = values(&inv, "record-route")
        .iter()
        .map(|r| format!("Route: {r}\r\n"))
        .collect();
    server.send(
        &format!(
            "BYE sip:a1@{host};transport={} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKsbye{name}\r\nMax-Forwards: 70\r\n{routes}\
             From: {to}\r\nTo: <sip:alice@example.test>;tag=bi\r\nCall-ID: out-{call}\r\nCSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
            t.to_ascii_lowercase(),
            server.addr()
        ),
        lb_addr,
    );
    let bye = b.expect("the server's BYE down its WebSocket", |m| {
        is_request(m, "BYE")
    });
    assert!(
        header(&bye, "via").starts_with(&format!("SIP/2.0/{t} ")),
        "{bye}"
    );
    assert!(
        headers(&bye, "route").is_empty(),
        "our Routes popped: {bye}"
    );
    b.send(&response(&bye, "200 OK", "bi", ""));
    server.expect("the 200 to its BYE", |m| is_response(m, 200, "BYE"));

    // A call to the browser along our Path; the browser hangs up.
    let inbound = format!("in-{call}");
    server.send(
        &format!(
            "INVITE sip:a1@{host};transport={} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKsinv{name}\r\nMax-Forwards: 70\r\n\
             Route: {path}\r\nFrom: <sip:carol@example.test>;tag=c1\r\nTo: <sip:alice@example.test>\r\n\
             Call-ID: {inbound}\r\nCSeq: 1 INVITE\r\nContact: {server_contact}\r\nContent-Length: 0\r\n\r\n",
            t.to_ascii_lowercase(),
            server.addr()
        ),
        lb_addr,
    );
    let inv = b.expect("the INVITE along our Path", |m| is_request(m, "INVITE"));
    let rr = values(&inv, "record-route");
    assert_eq!(rr.len(), 2, "{inv}");
    assert!(
        rr[0].contains(";transport=ws;"),
        "the browser's side on top: {}",
        rr[0]
    );
    b.send(&response(
        &inv,
        "200 OK",
        "a9",
        &format!(
            "Contact: <sip:a1@{host};transport={}>\r\n",
            t.to_ascii_lowercase()
        ),
    ));
    let ok = server
        .expect("the browser's 200", |m| is_response(m, 200, "INVITE"))
        .0;
    let to = header(&ok, "to").to_owned();
    let routes_server: String = values(&ok, "record-route")
        .iter()
        .map(|r| format!("Route: {r}\r\n"))
        .collect();
    server.send(
        &format!(
            "ACK sip:a1@{host};transport={} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKsack{name}\r\nMax-Forwards: 70\r\n{routes_server}\
             From: <sip:carol@example.test>;tag=c1\r\nTo: {to}\r\nCall-ID: {inbound}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
            t.to_ascii_lowercase(),
            server.addr()
        ),
        lb_addr,
    );
    b.expect("the server's ACK", |m| is_request(m, "ACK"));
    let routes: String = values(&inv, "record-route")
        .iter()
        .rev()
        .map(|r| format!("Route: {r}\r\n"))
        .collect();
    b.send(&format!(
        "BYE {} SIP/2.0\r\nVia: SIP/2.0/{t} {host};branch=z9hG4bKbbye{name}\r\nMax-Forwards: 70\r\n{routes}\
         From: {to}\r\nTo: <sip:carol@example.test>;tag=c1\r\nCall-ID: {inbound}\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
        server_contact.trim_matches(['<', '>'])
    ));
    let (bye, from) = server.expect("the browser's BYE", |m| is_request(m, "BYE"));
    server.send(&response(&bye, "200 OK", "c1", ""), from);
    b.expect("the 200 to its BYE", |m| is_response(m, 200, "BYE"));
}

#[test]
fn a_browser_over_ws_registers_calls_and_is_called() {
    browser_calls(false);
}

#[test]
fn a_browser_over_wss_registers_calls_and_is_called() {
    browser_calls(true);
}

#[test]
fn the_upgrade_needs_the_sip_subprotocol_and_an_allowed_origin() {
    let s1 = Server::new();
    let lb = Lb::start(
        "origins",
        &[s1.addr()],
        "ws_origins = [\"https://phone.example\"]",
    );
    let e = open(&lb, false, None, Some("https://phone.example"))
        .err()
        .expect("refused without sip");
    assert!(e.contains("400"), "{e}");
    let e = open(&lb, true, Some("sip"), Some("https://evil.example"))
        .err()
        .expect("refused from another Origin");
    assert!(e.contains("403"), "{e}");
    assert!(open(&lb, true, Some("sip"), Some("https://phone.example")).is_ok());
}

#[test]
fn client_certificates_when_asked_for() {
    let s1 = Server::new();
    let lb = Lb::start_with("client-certs", &[s1.addr()], "", true);
    // With the certificate: a CRLF keep-alive gets its CRLF (RFC 5626 §4.4.1).
    let tcp = TcpStream::connect(("127.0.0.1", lb.wss)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut s = tls_stream_as(&lb, tcp, true);
    let req = format!("wss://127.0.0.1:{}/sip", lb.wss)
        .into_client_request()
        .map(|mut r| {
            r.headers_mut()
                .insert("sec-websocket-protocol", "sip".parse().unwrap());
            r
        });
    tungstenite::client::client(req.unwrap(), &mut s)
        .expect("the upgrade with a client certificate");
    // Without: the handshake fails and siplb counts it.
    let tcp = TcpStream::connect(("127.0.0.1", lb.wss)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut s = tls_stream_as(&lb, tcp, false);
    let mut buf = [0u8; 16];
    let refused = s
        .write_all(b"GET /sip HTTP/1.1\r\n\r\n")
        .and_then(|()| s.flush())
        .and_then(|()| s.read(&mut buf));
    assert!(
        !matches!(refused, Ok(n) if n > 0),
        "no answer without a client certificate: {refused:?}"
    );
}

#[test]
fn a_crlf_keepalive_on_tcp_gets_its_pong() {
    let s1 = Server::new();
    let lb = Lb::start("crlf", &[s1.addr()], "");
    let sip_port = std::fs::read_to_string(lb.dir.join("siplb.toml"))
        .unwrap()
        .split("listen = [\"127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap();
    let mut c = TcpStream::connect(("127.0.0.1", sip_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // A ping split over two writes still gets one pong.
    c.write_all(b"\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    c.write_all(b"\r\n").unwrap();
    let mut buf = [0u8; 8];
    let n = c.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"\r\n");
}

#[test]
fn a_websocket_ping_gets_its_pong_and_a_close_is_answered() {
    let s1 = Server::new();
    let lb = Lb::start("ping", &[s1.addr()], "");
    let mut b = open(&lb, false, Some("sip"), None).unwrap();
    b.ws.send(Message::Ping(b"keep"[..].into())).unwrap();
    let pong = loop {
        match b.ws.read() {
            Ok(Message::Pong(p)) => break p,
            Ok(_) => {}
            Err(e) => panic!("no pong: {e}"),
        }
    };
    assert_eq!(&pong[..], b"keep");
    b.ws.close(None).unwrap();
    // siplb answers the close and ends the connection.
    let end = loop {
        match b.ws.read() {
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(
        matches!(end, tungstenite::Error::ConnectionClosed),
        "a clean close: {end}"
    );
}
