//! The balancer's SIP transactions end to end (RFC 3261 §16-17, RFC 4320):
//! a scripted user agent and two scripted SIP servers, each a plain UDP
//! socket on 127.0.0.1, around one `siplb balancer` process per test. No
//! SIPp, and agents only where REGISTER forking needs servers that are up.
//!
//! Every port is ephemeral (the balancer's are picked free and retried on a
//! conflict), so the tests run in parallel; every wait is bounded; each
//! process is killed by its PID when its guard drops. `SIPLB_BIN=PATH` runs
//! the same tests against another build of `siplb`.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// `routing.failover_timeout` of every balancer here.
const FAILOVER: Duration = Duration::from_millis(400);
/// RFC 3261 T1.
const T1: Duration = Duration::from_millis(500);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn siplb_bin() -> PathBuf {
    std::env::var_os("SIPLB_BIN").map_or_else(|| env!("CARGO_BIN_EXE_siplb").into(), PathBuf::from)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

// ---------------------------------------------------------------- messages

/// One SIP message as received: its text, sender and arrival time.
#[derive(Debug, Clone)]
struct Msg {
    text: String,
    from: SocketAddr,
    at: Instant,
}

/// A header name in lower case, compact forms expanded.
fn canonical(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase();
    match n.as_str() {
        "v" => "via".into(),
        "f" => "from".into(),
        "t" => "to".into(),
        "i" => "call-id".into(),
        "m" => "contact".into(),
        "l" => "content-length".into(),
        _ => n,
    }
}

/// The `name=value` parameter of a header value (`;tag=`, `;branch=`).
fn param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

impl Msg {
    fn start_line(&self) -> &str {
        self.text.lines().next().unwrap_or("")
    }

    /// (canonical name, value, whole line) of each header, in order.
    fn header_lines(&self) -> Vec<(String, &str, &str)> {
        let head = self.text.split("\r\n\r\n").next().unwrap_or("");
        head.split("\r\n")
            .skip(1)
            .filter_map(|line| {
                let (n, v) = line.split_once(':')?;
                Some((canonical(n), v.trim(), line))
            })
            .collect()
    }

    fn headers(&self, name: &str) -> Vec<&str> {
        let name = canonical(name);
        self.header_lines()
            .into_iter()
            .filter(|(n, _, _)| *n == name)
            .map(|(_, v, _)| v)
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers(name).into_iter().next()
    }

    /// The request's method; `None` for a response.
    fn method(&self) -> Option<&str> {
        let s = self.start_line();
        (!s.starts_with("SIP/")).then(|| s.split(' ').next().unwrap_or(""))
    }

    fn is(&self, method: &str) -> bool {
        self.method() == Some(method)
    }

    fn status(&self) -> Option<u16> {
        self.start_line()
            .strip_prefix("SIP/2.0 ")?
            .get(..3)?
            .parse()
            .ok()
    }

    fn cseq(&self) -> (u32, &str) {
        let mut it = self.header("cseq").unwrap_or("").split_whitespace();
        let n = it.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        (n, it.next().unwrap_or(""))
    }

    /// A response `code` to a `method` request.
    fn answers(&self, code: u16, method: &str) -> bool {
        self.status() == Some(code) && self.cseq().1 == method
    }

    /// A final response to a `method` request.
    fn is_final_for(&self, method: &str) -> bool {
        self.status().is_some_and(|c| c >= 200) && self.cseq().1 == method
    }

    fn top_branch(&self) -> String {
        let top = self.header("via").unwrap_or("").split(',').next();
        param(top.unwrap_or(""), "branch").unwrap_or("").to_owned()
    }

    fn to_tag(&self) -> Option<&str> {
        param(self.header("to")?, "tag")
    }

    /// Start line and CSeq, for failure messages.
    fn summary(&self) -> String {
        format!(
            "{} [{}]",
            self.start_line(),
            self.header("cseq").unwrap_or("no CSeq")
        )
    }
}

fn summaries(msgs: &[Msg]) -> Vec<String> {
    msgs.iter().map(Msg::summary).collect()
}

// ------------------------------------------------------------------- peers

/// A scripted SIP endpoint (the UA or a server): one UDP socket on 127.0.0.1.
#[derive(Debug)]
struct Peer {
    sock: UdpSocket,
    /// Received and not yet taken by `expect`.
    pending: RefCell<Vec<Msg>>,
    /// Everything received so far, in order.
    seen: RefCell<Vec<Msg>>,
}

impl Peer {
    fn new() -> Peer {
        Peer {
            sock: UdpSocket::bind("127.0.0.1:0").expect("a UDP socket on 127.0.0.1"),
            pending: RefCell::default(),
            seen: RefCell::default(),
        }
    }

    fn port(&self) -> u16 {
        self.sock.local_addr().unwrap().port()
    }

    fn send(&self, text: &str, to: SocketAddr) {
        self.sock.send_to(text.as_bytes(), to).unwrap();
    }

    /// One datagram, or `None` once `deadline` has passed.
    fn read(&self, deadline: Instant) -> Option<Msg> {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(ms(1));
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = vec![0u8; 65536];
        let (n, from) = self.sock.recv_from(&mut buf).ok()?;
        let m = Msg {
            text: String::from_utf8_lossy(&buf[..n]).into_owned(),
            from,
            at: Instant::now(),
        };
        self.seen.borrow_mut().push(m.clone());
        Some(m)
    }

    /// Reads what has arrived and what arrives within `d` into `pending`.
    fn settle(&self, d: Duration) {
        let deadline = Instant::now() + d;
        while let Some(m) = self.read(deadline) {
            self.pending.borrow_mut().push(m);
        }
    }

    /// The first pending or arriving message that matches, within `within`.
    fn take(&self, within: Duration, pred: impl Fn(&Msg) -> bool) -> Option<Msg> {
        let mut pending = self.pending.borrow_mut();
        if let Some(i) = pending.iter().position(&pred) {
            return Some(pending.remove(i));
        }
        drop(pending);
        let deadline = Instant::now() + within;
        while let Some(m) = self.read(deadline) {
            if pred(&m) {
                return Some(m);
            }
            self.pending.borrow_mut().push(m);
        }
        None
    }

    /// Like `take`, but a miss fails the test, naming `what` and listing
    /// what did arrive.
    fn expect(&self, what: &str, within: Duration, pred: impl Fn(&Msg) -> bool) -> Msg {
        self.take(within, pred).unwrap_or_else(|| {
            panic!(
                "{what}: nothing like it within {within:?}; got instead: {:?}",
                summaries(&self.pending.borrow())
            )
        })
    }

    /// Everything pending plus whatever arrives within `d`.
    fn gather(&self, d: Duration) -> Vec<Msg> {
        self.settle(d);
        std::mem::take(&mut *self.pending.borrow_mut())
    }

    /// Every message received so far (after reading what has arrived) that matches.
    fn seen_where(&self, pred: impl Fn(&Msg) -> bool) -> Vec<Msg> {
        self.settle(Duration::ZERO);
        self.seen
            .borrow()
            .iter()
            .filter(|m| pred(m))
            .cloned()
            .collect()
    }

    /// This server's To tag.
    fn tag(&self) -> String {
        format!("srv{}", self.port())
    }

    /// Answers `req` as a UAS does (RFC 3261 §8.2.6): its Via, From, To
    /// (with our tag, except on a 100), Call-ID and CSeq; Record-Route and
    /// our Contact on a 101-299 to an INVITE; `extra` header lines.
    fn respond(&self, req: &Msg, code: u16, reason: &str, extra: &str) {
        let dialog = req.is("INVITE") && (101..300).contains(&code);
        let mut out = format!("SIP/2.0 {code} {reason}\r\n");
        for (name, value, line) in req.header_lines() {
            match name.as_str() {
                "via" | "from" | "call-id" | "cseq" => out.push_str(line),
                "record-route" if dialog => out.push_str(line),
                "to" if code > 100 && param(value, "tag").is_none() => {
                    out.push_str(&format!("{line};tag={}", self.tag()));
                }
                "to" => out.push_str(line),
                _ => continue,
            }
            out.push_str("\r\n");
        }
        if dialog {
            out.push_str(&format!("Contact: <sip:srv@127.0.0.1:{}>\r\n", self.port()));
        }
        out.push_str(extra);
        out.push_str("Content-Length: 0\r\n\r\n");
        self.send(&out, req.from);
    }
}

/// The first of `servers` to receive a request that matches: its index and
/// the request.
fn first_to_get(
    servers: &[Peer],
    what: &str,
    within: Duration,
    pred: impl Fn(&Msg) -> bool,
) -> (usize, Msg) {
    let deadline = Instant::now() + within;
    loop {
        for (i, s) in servers.iter().enumerate() {
            if let Some(m) = s.take(ms(10), &pred) {
                return (i, m);
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no server got it within {within:?}"
        );
    }
}

/// The scripted user agent of one call: a Call-ID, a From tag, and requests
/// sent to the balancer (its outbound proxy).
#[derive(Debug)]
struct Ua {
    peer: Peer,
    lb: SocketAddr,
    call_id: String,
    branches: Cell<u32>,
}

impl std::ops::Deref for Ua {
    type Target = Peer;
    fn deref(&self) -> &Peer {
        &self.peer
    }
}

/// The To of every out-of-dialog request here.
const SVC_TO: &str = "<sip:svc@127.0.0.1>";

impl Ua {
    fn new(lb: &Balancer, call: &str) -> Ua {
        Ua {
            peer: Peer::new(),
            lb: lb.sip,
            call_id: format!("{call}-{}", std::process::id()),
            branches: Cell::new(0),
        }
    }

    /// A message of this UA's call.
    fn owns(&self, m: &Msg) -> bool {
        m.header("call-id") == Some(self.call_id.as_str())
    }

    /// A branch no other request of this UA has.
    fn branch(&self) -> String {
        self.branches.set(self.branches.get() + 1);
        format!("z9hG4bK{}-{}", self.call_id, self.branches.get())
    }

    fn svc_uri(&self) -> String {
        format!("sip:svc@127.0.0.1:{}", self.lb.port())
    }

    fn send_request(
        &self,
        method: &str,
        uri: &str,
        cseq: u32,
        branch: &str,
        to: &str,
        extra: &str,
    ) {
        let p = self.port();
        let msg = format!(
            "{method} {uri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:{p};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:ua@127.0.0.1>;tag=ua{p}\r\n\
             To: {to}\r\n\
             Call-ID: {}\r\n\
             CSeq: {cseq} {method}\r\n\
             Contact: <sip:ua@127.0.0.1:{p}>\r\n\
             {extra}Content-Length: 0\r\n\r\n",
            self.call_id
        );
        self.send(&msg, self.lb);
    }

    /// An out-of-dialog request to the pool (INVITE, MESSAGE, REGISTER; and
    /// the CANCEL of an INVITE, with its CSeq number and branch).
    fn send_new(&self, method: &str, cseq: u32, branch: &str, extra: &str) {
        self.send_request(method, &self.svc_uri(), cseq, branch, SVC_TO, extra);
    }

    /// The ACK of a non-2xx final response (RFC 3261 §17.1.1.3): the
    /// INVITE's branch and CSeq number, the response's To.
    fn ack_failure(&self, resp: &Msg, branch: &str) {
        let to = resp.header("to").unwrap_or(SVC_TO);
        self.send_request("ACK", &self.svc_uri(), resp.cseq().0, branch, to, "");
    }

    /// A request inside the dialog that the 2xx `ok` set up (RFC 3261
    /// §12.2.1.1): its Contact as Request-URI, its Record-Route as Route.
    fn in_dialog(&self, method: &str, cseq: u32, ok: &Msg) {
        let contact = ok.header("contact").expect("Contact in the 2xx");
        let uri = contact.trim_start_matches('<').split('>').next().unwrap();
        let route: String = ok
            .headers("record-route")
            .iter()
            .rev()
            .map(|r| format!("Route: {r}\r\n"))
            .collect();
        let to = ok.header("to").unwrap();
        self.send_request(method, uri, cseq, &self.branch(), to, &route);
    }
}

// --------------------------------------------------------------- processes

/// Ports handed out by this process, never handed out twice (the
/// balancer's UDP sockets use SO_REUSEPORT).
static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn fresh_port(bind: impl Fn() -> u16) -> u16 {
    let mut used = PORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let used = used.get_or_insert_with(HashSet::new);
    loop {
        let p = bind();
        if used.insert(p) {
            return p;
        }
    }
}

fn free_udp_port() -> u16 {
    fresh_port(|| {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
}

fn free_tcp_port() -> u16 {
    fresh_port(|| {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    })
}

/// A child process, killed by its PID when dropped.
#[derive(Debug)]
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `siplb agent` with synthetic readings on a free port (for REGISTER
/// forking, which goes to the servers whose agents say up).
fn agent() -> (Proc, u16) {
    let port = free_tcp_port();
    let key = root().join("examples/agent.key");
    let child = Command::new(siplb_bin())
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--key-file")
        .arg(key)
        .args(["--interval", "100ms", "--synthetic", "cpu=10%,mem=1GB"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("siplb agent");
    (Proc(child), port)
}

fn http(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, ms(300)).ok()?;
    s.set_read_timeout(Some(ms(2000))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let code = r.get(9..12)?.parse().ok()?;
    Some((code, r.split_once("\r\n\r\n")?.1.to_owned()))
}

static DIRS: AtomicU32 = AtomicU32::new(0);

/// One `siplb balancer` with its config file and log in a temp folder.
#[derive(Debug)]
struct Balancer {
    child: Child,
    sip: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
    config: PathBuf,
}

impl Balancer {
    /// A balancer for `servers` (round-robin, no agents), with `routing`
    /// lines added to `[routing]`.
    fn start(servers: &[Peer], routing: &str) -> Balancer {
        Balancer::start_with(servers, &[], routing)
    }

    /// As `start`, server `i` with the agent on port `agents[i]`.
    fn start_with(servers: &[Peer], agents: &[u16], routing: &str) -> Balancer {
        let dir = std::env::temp_dir().join(format!(
            "siplb-txn-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("balancer.toml");
        for _ in 0..5 {
            let sip = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
            let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
            let mut text = format!(
                "[sip]\nlisten = [\"{sip}\"]\ntransports = [\"udp\"]\n\n\
                 [routing]\nsecret = \"transactions-e2e-secret-0123456789\"\n\
                 policy = \"round-robin\"\nhealth = \"agent\"\noutlier_failures = 0\n\
                 failover_timeout = \"{}ms\"\n{routing}\n\n\
                 [perf]\nkey_file = \"{}\"\npoll_interval = \"100ms\"\n\n\
                 [admin]\nlisten = \"{admin}\"\n",
                FAILOVER.as_millis(),
                root().join("examples/agent.key").display()
            );
            for (i, s) in servers.iter().enumerate() {
                text.push_str(&format!(
                    "\n[[servers]]\nid = \"s{}\"\naddress = \"127.0.0.1:{}\"\n",
                    i + 1,
                    s.port()
                ));
                if let Some(a) = agents.get(i) {
                    text.push_str(&format!("agent = \"127.0.0.1:{a}\"\n"));
                }
            }
            std::fs::write(&config, text).unwrap();
            let mut lb = Balancer {
                child: Balancer::spawn(&dir, &config),
                sip,
                admin,
                dir: dir.clone(),
                config: config.clone(),
            };
            if lb.ready() {
                return lb;
            }
            // A port taken meanwhile: try others.
        }
        panic!("the balancer did not start; log in {}", dir.display());
    }

    fn spawn(dir: &Path, config: &Path) -> Child {
        let log = File::options()
            .create(true)
            .append(true)
            .open(dir.join("balancer.log"))
            .unwrap();
        Command::new(siplb_bin())
            .arg("balancer")
            .arg("--config")
            .arg(config)
            .env("SIPLB_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("siplb balancer")
    }

    /// Waits (bounded) for the admin API; `false` when the process exited.
    fn ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            if http(self.admin, "GET", "/servers").is_some_and(|(c, _)| c == 200) {
                return true;
            }
            std::thread::sleep(ms(20));
        }
        false
    }

    /// SIGKILL, then a new balancer on the same ports and config.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Balancer::spawn(&self.dir, &self.config);
        assert!(self.ready(), "the balancer did not come back on its ports");
    }

    /// Waits (bounded) until `GET /servers` says every server is up.
    fn wait_all_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let up = http(self.admin, "GET", "/servers").is_some_and(|(_, body)| {
                serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| {
                    v.as_array()
                        .is_some_and(|a| a.iter().all(|s| s["state"] == "up"))
                })
            });
            if up {
                return;
            }
            assert!(Instant::now() < deadline, "servers not up within 5 s");
            std::thread::sleep(ms(50));
        }
    }

    /// The balancer's own Route/Record-Route URI host:port.
    fn hostport(&self) -> String {
        self.sip.to_string()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("balancer.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "balancer log ({}), last lines:\n{}",
                self.dir.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// INVITE, 200, ACK, BYE, 200 through the balancer; the INVITE as its
/// server got it.
fn complete_call(ua: &Ua, servers: &[Peer]) -> Msg {
    ua.send_new("INVITE", 1, &ua.branch(), "");
    let (i, inv) = first_to_get(
        servers,
        &format!("{}: the INVITE", ua.call_id),
        ms(1000),
        |m| m.is("INVITE") && ua.owns(m),
    );
    let srv = &servers[i];
    srv.respond(&inv, 200, "OK", "");
    let ok = ua.expect(
        &format!("{}: the UA gets the server's 200 OK", ua.call_id),
        ms(1000),
        |m| m.answers(200, "INVITE"),
    );
    ua.in_dialog("ACK", 1, &ok);
    srv.expect(
        &format!("{}: the server gets the ACK of its 200", ua.call_id),
        ms(1000),
        |m| m.is("ACK") && ua.owns(m),
    );
    ua.in_dialog("BYE", 2, &ok);
    let bye = srv.expect(
        &format!("{}: the server gets the BYE", ua.call_id),
        ms(1000),
        |m| m.is("BYE") && ua.owns(m),
    );
    srv.respond(&bye, 200, "OK", "");
    ua.expect(
        &format!("{}: the UA gets the 200 OK for its BYE", ua.call_id),
        ms(1000),
        |m| m.answers(200, "BYE"),
    );
    inv
}

// ------------------------------------------------------------------- tests

/// RFC 3261 §16.10 and §9.1: a CANCEL that arrives while the balancer waits
/// for its first server (failover) gets 200 at once and ends the call: no
/// other server is tried, the UA gets 487, and the server that never sent a
/// provisional response gets no CANCEL (it could not match one yet).
#[test]
fn cancel_during_failover_stops_it() {
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start(&servers, "");
    let ua = Ua::new(&lb, "cancel-failover");
    let branch = ua.branch();
    ua.send_new("INVITE", 1, &branch, "");
    ua.expect("the balancer's 100 Trying", ms(1000), |m| {
        m.answers(100, "INVITE")
    });
    let (i, _) = first_to_get(&servers, "the INVITE", ms(1000), |m| m.is("INVITE"));
    let (a, b) = (&servers[i], &servers[1 - i]);
    // A stays silent; the UA gives up before the failover timeout.
    ua.send_new("CANCEL", 1, &branch, "");
    ua.expect(
        "the UA's CANCEL is answered 200 by the balancer",
        ms(1000),
        |m| m.answers(200, "CANCEL"),
    );
    let r487 = ua.expect(
        "the cancelled INVITE ends with 487 Request Terminated",
        FAILOVER + ms(1000),
        |m| m.answers(487, "INVITE"),
    );
    ua.ack_failure(&r487, &branch);
    b.settle(FAILOVER * 3);
    let rung = b.seen_where(|m| m.is("INVITE"));
    assert!(
        rung.is_empty(),
        "a call the UA had cancelled still rang the next server: {:?}",
        summaries(&rung)
    );
    let cancels = a.seen_where(|m| m.is("CANCEL"));
    assert!(
        cancels.is_empty(),
        "a server that had sent no provisional response got a CANCEL (RFC 3261 §9.1)"
    );
    let more: Vec<Msg> = ua
        .gather(ms(1000))
        .into_iter()
        .filter(|m| m.status().is_none_or(|c| c >= 200))
        .collect();
    assert!(
        more.is_empty(),
        "after its ACK the UA still got: {:?}",
        summaries(&more)
    );
}

/// RFC 3261 §9.1 and §16.10: a CANCEL that comes before the server's first
/// provisional response is held until one arrives, then sent with the
/// INVITE's branch; the server's 487 reaches the UA once and is ACKed at
/// the server with the INVITE's branch (§17.1.1.3).
#[test]
fn cancel_waits_for_the_servers_provisional_response() {
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start(&servers, "");
    let ua = Ua::new(&lb, "cancel-late-180");
    let branch = ua.branch();
    ua.send_new("INVITE", 1, &branch, "");
    let (i, inv) = first_to_get(&servers, "the INVITE", ms(1000), |m| m.is("INVITE"));
    let (a, b) = (&servers[i], &servers[1 - i]);
    ua.send_new("CANCEL", 1, &branch, "");
    ua.expect(
        "the UA's CANCEL is answered 200 by the balancer",
        ms(1000),
        |m| m.answers(200, "CANCEL"),
    );
    a.settle(ms(50));
    assert!(
        a.seen_where(|m| m.is("CANCEL")).is_empty(),
        "the server got a CANCEL before it had sent any provisional response (RFC 3261 §9.1)"
    );
    assert!(
        inv.at.elapsed() < FAILOVER - ms(100),
        "the test ran too slowly to ring before the failover timeout"
    );
    a.respond(&inv, 180, "Ringing", "");
    let cancel = a.expect(
        "the held CANCEL reaches the server once it rang",
        ms(1000),
        |m| m.is("CANCEL"),
    );
    assert_eq!(
        cancel.top_branch(),
        inv.top_branch(),
        "the CANCEL's branch must be its INVITE's for the server to match it"
    );
    a.respond(&cancel, 200, "OK", "");
    a.respond(&inv, 487, "Request Terminated", "");
    let r487 = ua.expect("the UA gets the 487", ms(1000), |m| {
        m.answers(487, "INVITE")
    });
    ua.ack_failure(&r487, &branch);
    a.expect(
        "the server's 487 is ACKed with the INVITE's branch",
        ms(1000),
        |m| m.is("ACK") && m.top_branch() == inv.top_branch(),
    );
    let again: Vec<Msg> = ua
        .gather(ms(1000))
        .into_iter()
        .filter(|m| m.answers(487, "INVITE"))
        .collect();
    assert!(
        again.is_empty(),
        "the UA got {} more 487s for one cancelled INVITE",
        again.len()
    );
    assert!(
        b.seen_where(|m| m.is("INVITE")).is_empty(),
        "a cancelled call rang the other server"
    );
}

/// RFC 3261 §16.8 (Timer C): a ringing attempt that gets no final response
/// within `invite_timeout` is CANCELled with the INVITE's branch and the UA
/// gets 408 from the balancer. A 2xx that crosses the CANCEL has no UA
/// transaction left to go to: the balancer ACKs it and ends the call with a
/// BYE (as a UAC does with a 2xx it does not want, §15), so the server does
/// not hold a call nobody has.
#[test]
fn timer_c_cancels_a_ringing_attempt_and_a_late_2xx_is_acked_and_byed() {
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start(&servers, "invite_timeout = \"1s\"");
    let ua = Ua::new(&lb, "timer-c");
    let branch = ua.branch();
    ua.send_new("INVITE", 1, &branch, "");
    let (i, inv) = first_to_get(&servers, "the INVITE", ms(1000), |m| m.is("INVITE"));
    let a = &servers[i];
    a.respond(&inv, 180, "Ringing", "");
    ua.expect("the UA gets the 180", ms(1000), |m| {
        m.answers(180, "INVITE")
    });
    let cancel = a.expect("Timer C CANCELs the ringing attempt", ms(3000), |m| {
        m.is("CANCEL")
    });
    assert_eq!(
        cancel.top_branch(),
        inv.top_branch(),
        "Timer C's CANCEL must carry the INVITE's branch"
    );
    let r408 = ua.expect("the UA gets 408 at Timer C", ms(1000), |m| {
        m.answers(408, "INVITE")
    });
    ua.ack_failure(&r408, &branch);
    // The server's 200 crossed the CANCEL.
    a.respond(&inv, 200, "OK", "");
    a.respond(&cancel, 200, "OK", "");
    let tag = a.tag();
    let ack = a.expect("the late 200 is ACKed by the balancer", ms(1000), |m| {
        m.is("ACK") && m.to_tag() == Some(&tag)
    });
    assert_eq!(ack.cseq(), (1, "ACK"), "the ACK of the 200: {}", ack.text);
    let bye = a.expect(
        "the call the late 200 set up is ended with a BYE",
        ms(1000),
        |m| m.is("BYE"),
    );
    assert_eq!(
        bye.header("call-id"),
        inv.header("call-id"),
        "the BYE's Call-ID"
    );
    assert_eq!(
        bye.to_tag(),
        Some(tag.as_str()),
        "the BYE must name the dialog of the late 200 (its To tag)"
    );
    a.respond(&bye, 200, "OK", "");
    let late: Vec<Msg> = ua
        .gather(ms(500))
        .into_iter()
        .filter(|m| m.answers(200, "INVITE"))
        .collect();
    assert!(
        late.is_empty(),
        "the UA got a 200 after its 408: a call it does not know it has"
    );
}

/// RFC 3261 §22.2 with §16.6: a UA that answers a 401 re-sends its INVITE
/// with credentials (same Call-ID and From tag, next CSeq, new branch). That
/// is a new INVITE transaction: the balancer takes charge of it as of the
/// first (100 Trying, failover), sending it first to the server that issued
/// the challenge; a 503 there moves it to the next server.
#[test]
fn an_invite_resent_with_credentials_gets_the_same_failover() {
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start(&servers, "");
    let ua = Ua::new(&lb, "auth");
    let first = ua.branch();
    ua.send_new("INVITE", 1, &first, "");
    let (i, inv1) = first_to_get(&servers, "the INVITE", ms(1000), |m| m.is("INVITE"));
    let (a, b) = (&servers[i], &servers[1 - i]);
    a.respond(
        &inv1,
        401,
        "Unauthorized",
        "WWW-Authenticate: Digest realm=\"e2e\", nonce=\"n1\"\r\n",
    );
    let r401 = ua.expect("the UA gets the 401", ms(1000), |m| {
        m.answers(401, "INVITE")
    });
    ua.ack_failure(&r401, &first);
    let auth = format!(
        "Authorization: Digest username=\"ua\", realm=\"e2e\", nonce=\"n1\", uri=\"{}\", response=\"00\"\r\n",
        ua.svc_uri()
    );
    ua.send_new("INVITE", 2, &ua.branch(), &auth);
    ua.expect(
        "the re-sent INVITE gets the balancer's 100 Trying",
        ms(1000),
        |m| m.answers(100, "INVITE") && m.cseq().0 == 2,
    );
    let (j, inv2) = first_to_get(&servers, "the re-sent INVITE", ms(1000), |m| {
        m.is("INVITE") && m.cseq().0 == 2
    });
    assert_eq!(
        j, i,
        "the re-sent INVITE must go to the server that challenged"
    );
    a.respond(&inv2, 503, "Service Unavailable", "");
    let inv3 = b.expect(
        "the re-sent INVITE fails over to the other server after the 503",
        FAILOVER + ms(1000),
        |m| m.is("INVITE") && m.cseq().0 == 2,
    );
    b.respond(&inv3, 200, "OK", "");
    let fin = ua.expect("a final response to the re-sent INVITE", ms(1000), |m| {
        m.is_final_for("INVITE") && m.cseq().0 == 2
    });
    assert_eq!(
        fin.status(),
        Some(200),
        "the UA must get the second server's 200, not {}",
        fin.start_line()
    );
    ua.in_dialog("ACK", 2, &fin);
}

/// The balancer's own Route and the Max-Forwards decrement (RFC 3261 §16.4,
/// §16.6 step 3) are applied once to the request: a failed-over INVITE
/// reaches the next server without our Route and with Max-Forwards 69, like
/// the first.
#[test]
fn every_copy_is_processed_once() {
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start(&servers, "");
    let ua = Ua::new(&lb, "route-once");
    let ours = lb.hostport();
    let route = format!("Route: <sip:{ours};lr>\r\n");
    ua.send_new("INVITE", 1, &ua.branch(), &route);
    let (i, inv) = first_to_get(&servers, "the INVITE", ms(1000), |m| m.is("INVITE"));
    let (a, b) = (&servers[i], &servers[1 - i]);
    let names_us = |m: &Msg| m.headers("route").iter().any(|r| r.contains(&ours));
    assert!(
        !names_us(&inv),
        "the first server got our own Route:\n{}",
        inv.text
    );
    assert_eq!(inv.header("max-forwards"), Some("69"), "first attempt");
    a.respond(&inv, 503, "Service Unavailable", "");
    let next = b.expect(
        "the INVITE fails over after the 503",
        FAILOVER + ms(1000),
        |m| m.is("INVITE"),
    );
    assert!(
        !names_us(&next),
        "the failed-over INVITE still carries the balancer's own Route:\n{}",
        next.text
    );
    assert_eq!(
        next.header("max-forwards"),
        Some("69"),
        "the failed-over INVITE's Max-Forwards (70 from the UA, one hop)"
    );
    b.respond(&next, 200, "OK", "");
    let ok = ua.expect("the UA gets the 200", ms(1000), |m| {
        m.answers(200, "INVITE")
    });
    ua.in_dialog("ACK", 1, &ok);
}

/// As `every_copy_is_processed_once`, for a REGISTER forked to every server
/// (RFC 3261 §16.6, one copy per target): each leg without our Route, with
/// Max-Forwards 69.
#[test]
fn every_register_leg_is_processed_once() {
    let (_agent1, p1) = agent();
    let (_agent2, p2) = agent();
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start_with(&servers, &[p1, p2], "register = \"fork\"");
    lb.wait_all_up();
    let ua = Ua::new(&lb, "register-once");
    let ours = lb.hostport();
    let route = format!("Route: <sip:{ours};lr>\r\nExpires: 60\r\n");
    ua.send_new("REGISTER", 1, &ua.branch(), &route);
    for (k, s) in servers.iter().enumerate() {
        let leg = s.expect(
            &format!("server {} gets its leg of the forked REGISTER", k + 1),
            ms(1000),
            |m| m.is("REGISTER"),
        );
        assert!(
            !leg.headers("route").iter().any(|r| r.contains(&ours)),
            "a REGISTER leg still carries the balancer's own Route:\n{}",
            leg.text
        );
        assert_eq!(
            leg.header("max-forwards"),
            Some("69"),
            "a REGISTER leg's Max-Forwards"
        );
        s.respond(&leg, 200, "OK", "");
    }
    ua.expect("the UA gets one 200 for its REGISTER", ms(1000), |m| {
        m.answers(200, "REGISTER")
    });
}

/// RFC 4320 §4.1 and RFC 3261 §17.1.2: a non-INVITE request without an
/// answer yet may simply take long (no 100 comes for it); sending it to
/// another server would have it processed twice. Only a refusal (503) moves
/// it on.
#[test]
fn a_slow_message_is_not_duplicated() {
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start(&servers, "");
    let ua = Ua::new(&lb, "slow-message");
    ua.send_new("MESSAGE", 1, &ua.branch(), "");
    let (i, msg) = first_to_get(&servers, "the MESSAGE", ms(1000), |m| m.is("MESSAGE"));
    let other = &servers[1 - i];
    other.settle(FAILOVER * 3);
    servers[i].respond(&msg, 200, "OK", "");
    assert!(
        other.seen_where(|m| m.is("MESSAGE")).is_empty(),
        "a MESSAGE still being worked on went to a second server too: delivered twice"
    );
    let finals: Vec<u16> = ua
        .gather(ms(1000))
        .iter()
        .filter(|m| m.is_final_for("MESSAGE"))
        .filter_map(Msg::status)
        .collect();
    assert_eq!(finals, [200], "the UA's final responses to one MESSAGE");

    // A 503 at once still fails over.
    let ua = Ua::new(&lb, "refused-message");
    ua.send_new("MESSAGE", 1, &ua.branch(), "");
    let (i, msg) = first_to_get(&servers, "the MESSAGE", ms(1000), |m| {
        m.is("MESSAGE") && ua.owns(m)
    });
    servers[i].respond(&msg, 503, "Service Unavailable", "");
    let moved = servers[1 - i].expect(
        "a MESSAGE refused with 503 goes to the other server",
        FAILOVER + ms(1000),
        |m| m.is("MESSAGE") && ua.owns(m),
    );
    servers[1 - i].respond(&moved, 200, "OK", "");
    let finals: Vec<u16> = ua
        .gather(ms(1000))
        .iter()
        .filter(|m| m.is_final_for("MESSAGE"))
        .filter_map(Msg::status)
        .collect();
    assert_eq!(
        finals,
        [200],
        "the UA's final responses to a refused MESSAGE"
    );
}

/// RFC 3261 §17.2.1 (Timer G): a final response the balancer sends the UA
/// itself (every server refused) is its server transaction's: retransmitted
/// after T1, then 2 T1 later, until the ACK comes; then no more.
#[test]
fn our_own_final_is_retransmitted_until_the_ack() {
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start(&servers, "");
    let ua = Ua::new(&lb, "own-final");
    let branch = ua.branch();
    ua.send_new("INVITE", 1, &branch, "");
    let (i, inv) = first_to_get(&servers, "the INVITE", ms(1000), |m| m.is("INVITE"));
    servers[i].respond(&inv, 503, "Service Unavailable", "");
    let next = servers[1 - i].expect(
        "the INVITE fails over after the 503",
        FAILOVER + ms(1000),
        |m| m.is("INVITE"),
    );
    servers[1 - i].respond(&next, 503, "Service Unavailable", "");
    let first = ua.expect(
        "the UA gets a final response when every server refused",
        ms(1000),
        |m| m.is_final_for("INVITE"),
    );
    let same = |m: &Msg| {
        m.start_line() == first.start_line()
            && m.header("to") == first.header("to")
            && m.header("via") == first.header("via")
    };
    let second = ua.expect(
        &format!(
            "the balancer's own {} is retransmitted after T1 while the UA has not ACKed",
            first.start_line()
        ),
        T1 * 2,
        same,
    );
    let gap = second.at - first.at;
    assert!(
        (ms(350)..=ms(900)).contains(&gap),
        "first retransmission {gap:?} after the response, want about T1 (500 ms)"
    );
    let third = ua.expect(
        "the final response is retransmitted again, 2 T1 later",
        T1 * 3,
        same,
    );
    let gap = third.at - second.at;
    assert!(
        (ms(750)..=ms(1600)).contains(&gap),
        "second retransmission {gap:?} after the first, want about 2 T1 (1 s)"
    );
    ua.ack_failure(&first, &branch);
    let more: Vec<Msg> = ua
        .gather(ms(2000))
        .into_iter()
        .filter(|m| m.is_final_for("INVITE"))
        .collect();
    assert!(
        more.is_empty(),
        "the final response was still retransmitted after the ACK: {:?}",
        summaries(&more)
    );
}

/// RFC 3261 §16.7 step 3: a 100 from a server is hop by hop and is not
/// forwarded; the balancer's own 100 goes only when the server has sent
/// nothing to relay within `trying_after` (200 ms, RFC 3261 §17.2.1).
#[test]
fn a_servers_100_is_not_forwarded() {
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start(&servers, "");
    // A server that answers at once: its 180 stops the UA's
    // retransmissions; no 100 reaches the UA.
    let ua = Ua::new(&lb, "no-second-100");
    ua.send_new("INVITE", 1, &ua.branch(), "");
    let (i, inv) = first_to_get(&servers, "the INVITE", ms(1000), |m| m.is("INVITE"));
    let a = &servers[i];
    a.respond(&inv, 100, "Trying", "");
    a.respond(&inv, 180, "Ringing", "");
    a.respond(&inv, 200, "OK", "");
    let ok = ua.expect("the UA gets the 200", ms(1000), |m| {
        m.answers(200, "INVITE")
    });
    let got = ua.gather(ms(300));
    let count = |got: &[Msg], code| got.iter().filter(|m| m.answers(code, "INVITE")).count();
    assert_eq!(
        count(&got, 100),
        0,
        "the server's 100 is not forwarded, and ours is not needed: {:?}",
        summaries(&got)
    );
    assert_eq!(count(&got, 180), 1, "the 180: {:?}", summaries(&got));
    ua.in_dialog("ACK", 1, &ok);

    // A server silent for 350 ms (its own 100 aside): our 100 at 200 ms,
    // one, before its 180.
    let ua = Ua::new(&lb, "late-180");
    ua.send_new("INVITE", 1, &ua.branch(), "");
    let (i, inv) = first_to_get(&servers, "the INVITE", ms(1000), |m| m.is("INVITE"));
    let a = &servers[i];
    a.respond(&inv, 100, "Trying", "");
    let early = ua.gather(ms(350));
    a.respond(&inv, 180, "Ringing", "");
    a.respond(&inv, 200, "OK", "");
    let ok = ua.expect("the UA gets the 200", ms(1000), |m| {
        m.answers(200, "INVITE")
    });
    assert_eq!(
        count(&early, 100),
        1,
        "one 100 (ours) while the server is silent: {:?}",
        summaries(&early)
    );
    ua.in_dialog("ACK", 1, &ok);
}

/// RFC 3261 §16.10 and §9.1 across a restart: the balancer's branch is
/// computed from the UA's (same secret), so a restarted balancer forwards
/// the UA's CANCEL with the branch the server saw on the INVITE, and the
/// server can match it.
#[test]
fn cancel_survives_a_balancer_restart() {
    let servers = [Peer::new(), Peer::new()];
    let mut lb = Balancer::start(&servers, "");
    let ua = Ua::new(&lb, "restart-cancel");
    let branch = ua.branch();
    ua.send_new("INVITE", 1, &branch, "");
    let (i, inv) = first_to_get(&servers, "the INVITE", ms(1000), |m| m.is("INVITE"));
    let a = &servers[i];
    a.respond(&inv, 180, "Ringing", "");
    ua.expect("the UA gets the 180", ms(1000), |m| {
        m.answers(180, "INVITE")
    });
    lb.restart();
    ua.send_new("CANCEL", 1, &branch, "");
    let Some(cancel) = a.take(ms(1500), |m| m.is("CANCEL")) else {
        panic!(
            "after the restart the UA's CANCEL did not reach the ringing server; the UA got: {:?}",
            summaries(&ua.gather(ms(100)))
        );
    };
    assert_eq!(
        cancel.top_branch(),
        inv.top_branch(),
        "the CANCEL's branch after the restart must be the INVITE's"
    );
    a.respond(&cancel, 200, "OK", "");
    a.respond(&inv, 487, "Request Terminated", "");
    ua.expect("the UA gets 200 for its CANCEL", ms(1000), |m| {
        m.answers(200, "CANCEL")
    });
    let r487 = ua.expect("the UA gets the 487", ms(1000), |m| {
        m.answers(487, "INVITE")
    });
    ua.ack_failure(&r487, &branch);
}

/// RFC 3261 §17.1.1.3 across a restart: the ACK of a non-2xx final response
/// reaches the server with the INVITE's branch, whether the balancer was
/// restarted after the response (then it ACKed already, or forwards the
/// UA's ACK) or between the 180 and the response (only the UA's ACK can
/// end the server's transaction).
#[test]
fn ack_survives_a_balancer_restart() {
    let servers = [Peer::new(), Peer::new()];
    let mut lb = Balancer::start(&servers, "");

    let ua = Ua::new(&lb, "restart-ack");
    let branch = ua.branch();
    ua.send_new("INVITE", 1, &branch, "");
    let (i, inv) = first_to_get(&servers, "the INVITE", ms(1000), |m| m.is("INVITE"));
    let a = &servers[i];
    a.respond(&inv, 486, "Busy Here", "");
    let busy = ua.expect("the UA gets the 486", ms(1000), |m| {
        m.answers(486, "INVITE")
    });
    lb.restart();
    ua.ack_failure(&busy, &branch);
    a.expect(
        "the server's 486 is ACKed with the INVITE's branch (restart after the 486)",
        ms(1500),
        |m| m.is("ACK") && m.top_branch() == inv.top_branch(),
    );

    let ua = Ua::new(&lb, "restart-ack-2");
    let branch = ua.branch();
    ua.send_new("INVITE", 1, &branch, "");
    let (i, inv) = first_to_get(&servers, "the INVITE", ms(1000), |m| {
        m.is("INVITE") && ua.owns(m)
    });
    let a = &servers[i];
    a.respond(&inv, 180, "Ringing", "");
    ua.expect("the UA gets the 180", ms(1000), |m| {
        m.answers(180, "INVITE")
    });
    lb.restart();
    a.respond(&inv, 486, "Busy Here", "");
    let busy = ua.expect(
        "the restarted balancer passes the 486 on to the UA",
        ms(1000),
        |m| m.answers(486, "INVITE"),
    );
    ua.ack_failure(&busy, &branch);
    a.expect(
        "the UA's ACK reaches the server with the INVITE's branch (restart before the 486)",
        ms(1500),
        |m| m.is("ACK") && m.top_branch() == inv.top_branch(),
    );
}

/// RFC 3261 §16.6 steps 4 and 8 with §7.3.1: our Via goes before the Via
/// values there are, our Record-Route before the Record-Route values; the
/// rows of one header field are one ordered list, so a Record-Route row
/// between two Via rows splits the Via list (and servers that combine or
/// rewrite rows get it wrong).
#[test]
fn vias_stay_adjacent() {
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start(&servers, "");
    let ua = Ua::new(&lb, "via-block");
    let inv = complete_call(&ua, &servers);
    let names: Vec<String> = inv.header_lines().into_iter().map(|(n, _, _)| n).collect();
    assert!(
        names.iter().any(|n| n == "record-route"),
        "the INVITE is record-routed:\n{}",
        inv.text
    );
    let first = names.iter().position(|n| n == "via").unwrap();
    let last = names.iter().rposition(|n| n == "via").unwrap();
    assert!(
        !names[first..last].iter().any(|n| n == "record-route"),
        "a Record-Route line sits between two Via lines of the INVITE:\n{}",
        inv.text
    );
}

/// `sip.advertise` names the balancer in its Via and Record-Route, and what
/// comes back (responses, in-dialog requests) is recognised by it: changed
/// under running traffic it would strand it. A reload that changes it is
/// refused, or it waits for the next restart (like `sip.listen`): calls
/// keep working, and our Via still names the old address.
#[test]
fn advertise_is_restart_only() {
    let servers = [Peer::new(), Peer::new()];
    let lb = Balancer::start(&servers, "");
    complete_call(&Ua::new(&lb, "call-before-the-reload"), &servers);
    let text = std::fs::read_to_string(&lb.config).unwrap();
    let edited = text.replacen(
        "[sip]\n",
        &format!(
            "[sip]\nadvertise = \"balancer.invalid:{}\"\n",
            lb.sip.port()
        ),
        1,
    );
    std::fs::write(&lb.config, edited).unwrap();
    let reload = http(lb.admin, "POST", "/reload");
    assert!(reload.is_some(), "POST /reload gets an answer");
    let inv = complete_call(&Ua::new(&lb, "call-after-the-reload"), &servers);
    let via = inv.header("via").unwrap();
    assert!(
        via.contains(&lb.hostport()),
        "after the reload our Via names a new advertise: {via}"
    );
}

/// The last server that may take a call is waited for: one server, silent
/// for three failover timeouts and then answering (a queue, a slow
/// database). The UA gets our 100, then the server's 200 — not our 503 at
/// the failover timeout and a late 200 ACKed and BYEd behind its back —
/// and the call completes; `last_waits_total` counts the wait.
#[test]
fn the_last_server_is_waited_for_past_the_failover_timeout() {
    let servers = [Peer::new()];
    let lb = Balancer::start(&servers, "last_attempt_timeout = \"5s\"");
    let ua = Ua::new(&lb, "last-wait");
    let branch = ua.branch();
    ua.send_new("INVITE", 1, &branch, "");
    let inv = servers[0].expect("the INVITE", ms(1000), |m| m.is("INVITE"));
    let early = ua.gather(FAILOVER * 3);
    assert!(
        early.iter().all(|m| m.status() == Some(100)),
        "only our 100 while the server is silent: {:?}",
        summaries(&early)
    );
    assert!(
        early.iter().any(|m| m.status() == Some(100)),
        "our 100 Trying after trying_after: {:?}",
        summaries(&early)
    );
    servers[0].respond(&inv, 200, "OK", "");
    let ok = ua.expect("the server's late 200 reaches the UA", ms(1000), |m| {
        m.answers(200, "INVITE")
    });
    ua.in_dialog("ACK", 1, &ok);
    servers[0].expect("the server gets the UA's ACK", ms(1000), |m| m.is("ACK"));
    let stray = servers[0].gather(ms(300));
    assert!(
        stray.iter().all(|m| !m.is("BYE") && !m.is("CANCEL")),
        "the balancer ended the call behind the UA's back: {:?}",
        summaries(&stray)
    );
    ua.in_dialog("BYE", 2, &ok);
    let bye = servers[0].expect("the BYE", ms(1000), |m| m.is("BYE"));
    servers[0].respond(&bye, 200, "OK", "");
    ua.expect("the 200 for the BYE", ms(1000), |m| m.answers(200, "BYE"));
    let (_, body) = http(lb.admin, "GET", "/servers").expect("GET /servers");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v[0]["last_waits_total"], 1, "{body}");
}
