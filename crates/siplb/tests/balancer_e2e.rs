//! The balancer end to end, as the balancer issue asks: two SIP servers (real
//! `sipp -sn uas`, or small responders written here where a test needs a
//! server that does what SIPp's built-in UAS does not), two `siplb agent`s
//! and `siplb balancer` with a copy of examples/local.toml, all on loopback.
//!
//! Each test has ports of its own, picked at run time (bound to port 0 to
//! find a free one, released, handed to the process; a setup that finds one
//! of them taken meanwhile starts again on other ports) and written into its
//! own copy of examples/local.toml, so the tests run in parallel. The
//! bench/kill.py runs, whose ports are fixed in the script, each get a network
//! namespace of their own, or where none can be made run one at a time
//! (SERIAL). At most HEAVY tests place SIPp load at once (2 cores are shared;
//! call rates and shares of the draw are timed). Every process is stopped by
//! its PID (the guard's drop); every wait and every SIPp run is bounded in
//! count and time.

use std::collections::HashSet;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Held by the bench/kill.py runs when they cannot have a network namespace
/// each (`netns`): the script has its ports written in (SIP 5060, admin 8060,
/// agents 7071/7072, servers 5081/5082, its UAC 5070) and takes no option to
/// change them, so two of its runs on one loopback cannot overlap. (No other
/// test here uses those ports: see `claim`.)
static SERIAL: Mutex<()> = Mutex::new(());

/// At most this many tests place SIPp load (hundreds of calls at a rate,
/// shares of the draw, the kill.py runs) at once.
const HEAVY: usize = 1;
static HEAVY_RUNNING: Mutex<usize> = Mutex::new(0);
static HEAVY_FREED: Condvar = Condvar::new();

/// One of the HEAVY places, given back on drop.
struct Heavy;

/// Waits (bounded) for one of the HEAVY places.
fn heavy() -> Heavy {
    let limit = Duration::from_secs(600);
    let start = Instant::now();
    let mut running = HEAVY_RUNNING.lock().unwrap_or_else(PoisonError::into_inner);
    while *running >= HEAVY {
        let left = limit
            .checked_sub(start.elapsed())
            .expect("timed out waiting for a place among the heavy tests");
        running = HEAVY_FREED
            .wait_timeout(running, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    *running += 1;
    Heavy
}

impl Drop for Heavy {
    fn drop(&mut self) {
        *HEAVY_RUNNING.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
        HEAVY_FREED.notify_one();
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

// ------------------------------------------------------------------ ports

/// Ports handed out by this process, never handed out twice: the balancer's
/// UDP sockets use SO_REUSEPORT, so two balancers given one port would share
/// it without a word. It starts with bench/kill.py's fixed ports, so that
/// no test here takes one while a kill run uses it.
static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Binds (to port 0) again until the socket's port is one never handed out
/// here; that port is then ours. `bind` gives `None` when the port it found
/// is no good (free for UDP, say, but taken for TCP).
fn claim<S>(bind: impl Fn() -> Option<(S, u16)>) -> (S, u16) {
    let mut used = PORTS.lock().unwrap_or_else(PoisonError::into_inner);
    let used =
        used.get_or_insert_with(|| HashSet::from([5060, 5070, 5081, 5082, 7071, 7072, 8060]));
    // Sockets on ports handed out already, kept open meanwhile so that the
    // next bind gets another port.
    let mut held = Vec::new();
    for _ in 0..200 {
        if let Some((s, port)) = bind() {
            if used.insert(port) {
                return (s, port);
            }
            held.push(s);
        }
    }
    panic!("no free port in 200 binds");
}

/// A port free at `ip` for UDP, TCP, or both at once (`udp` and `tcp`),
/// never handed out before; released, for a process to bind.
fn free_port(ip: IpAddr, udp: bool, tcp: bool) -> u16 {
    claim(|| {
        if udp {
            let u = UdpSocket::bind((ip, 0)).unwrap();
            let port = u.local_addr().unwrap().port();
            let t = if tcp {
                Some(TcpListener::bind((ip, port)).ok()?)
            } else {
                None
            };
            Some(((Some(u), t), port))
        } else {
            assert!(tcp);
            let t = TcpListener::bind((ip, 0)).unwrap();
            let port = t.local_addr().unwrap().port();
            Some(((None, Some(t)), port))
        }
    })
    .1
}

fn lo4() -> IpAddr {
    Ipv4Addr::LOCALHOST.into()
}

/// Whether process `pid` has a socket bound to `port` (for TCP, one
/// listening), from /proc/net/{udp,tcp}{,6} and /proc/PID/fd.
fn holds(pid: u32, tcp: bool, port: u16) -> bool {
    let tables = if tcp {
        ["tcp", "tcp6"]
    } else {
        ["udp", "udp6"]
    };
    let mut sockets = Vec::new();
    for table in tables {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let listening = !tcp || f.get(3) == Some(&"0A");
            if local == Some(port)
                && listening
                && let Some(inode) = f.get(9)
            {
                sockets.push(format!("socket:[{inode}]"));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|l| sockets.iter().any(|s| l.as_os_str() == s.as_str()))
    })
}

/// The last lines of a log file, for an error message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// `p` once it holds each of `sockets` ((tcp, port)), waited for (bounded);
/// `Err` when it exits first (a port taken meanwhile: the caller starts again
/// on other ports) or never gets them.
fn bound(mut p: Proc, what: &str, sockets: &[(bool, u16)], log: &Path) -> Result<Proc, String> {
    let start = Instant::now();
    loop {
        if let Some(status) = p.0.try_wait().unwrap() {
            return Err(format!("{what} exited ({status}): {}", tail(log)));
        }
        if sockets
            .iter()
            .all(|&(tcp, port)| holds(p.0.id(), tcp, port))
        {
            return Ok(p);
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("{what} did not bind {sockets:?} within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_file(path: &Path) -> File {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

fn siplb(args: &[&str], log: &Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_siplb"))
            .args(args)
            .current_dir(root())
            .stdout(Stdio::null())
            .stderr(log_file(log))
            .spawn()
            .expect("siplb"),
    )
}

fn sipp_available() -> bool {
    Command::new("sipp").arg("-v").output().is_ok()
}

// -------------------------------------------------------------- one test's pool

static DIRS: AtomicU32 = AtomicU32::new(0);

/// examples/local.toml with `edits` (pairs of replace-this, with-that, as in
/// the example), the agent key's absolute path, and every port the example
/// names replaced by `net`'s: SIP 5060, admin 8060, agents 7071 and 7072,
/// servers 5081 and 5082.
fn edited_config(net: &Net, edits: &[(&str, &str)]) -> String {
    let key = root().join("examples/agent.key");
    let mut cfg = std::fs::read_to_string(root().join("examples/local.toml")).unwrap();
    for (from, to) in edits {
        assert!(cfg.contains(from), "examples/local.toml has no {from}");
        cfg = cfg.replace(from, to);
    }
    cfg = cfg.replace(
        "key_file = \"agent.key\"",
        &format!("key_file = \"{}\"", key.display()),
    );
    let ports = [
        (5060, net.sip),
        (8060, net.admin),
        (7071, net.agents[0]),
        (7072, net.agents[1]),
        (5081, net.servers[0]),
        (5082, net.servers[1]),
    ];
    for (fixed, port) in ports {
        let from = format!(":{fixed}\"");
        assert!(cfg.contains(&from), "examples/local.toml has no {from}");
        cfg = cfg.replace(&from, &format!(":{port}\""));
    }
    cfg
}

/// One test's ports, its config file (`config`, text `cfg`) and the folder
/// that holds them and the logs (removed on drop unless the test failed).
struct Net {
    /// Of the balancer's SIP side and the servers: 127.0.0.1 or ::1.
    ip: IpAddr,
    /// The balancer's SIP port, UDP and TCP.
    sip: u16,
    /// The admin API's port, on 127.0.0.1.
    admin: u16,
    /// The agents' ports (s1, s2), on 127.0.0.1.
    agents: [u16; 2],
    /// The servers' SIP ports (s1, s2), UDP.
    servers: [u16; 2],
    dir: PathBuf,
    config: PathBuf,
    cfg: String,
}

impl Net {
    fn new(name: &str, v6: bool, edits: &[(&str, &str)]) -> Net {
        let ip: IpAddr = if v6 {
            Ipv6Addr::LOCALHOST.into()
        } else {
            lo4()
        };
        let dir = std::env::temp_dir().join(format!(
            "siplb-e2e-{name}-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut net = Net {
            ip,
            sip: free_port(ip, true, true),
            admin: free_port(lo4(), false, true),
            agents: [free_port(lo4(), false, true), free_port(lo4(), false, true)],
            servers: [free_port(ip, true, false), free_port(ip, true, false)],
            config: dir.join(format!("{name}.toml")),
            dir,
            cfg: String::new(),
        };
        net.cfg = edited_config(&net, edits);
        std::fs::write(&net.config, &net.cfg).unwrap();
        net
    }

    fn sip_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.sip)
    }

    fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(lo4(), self.admin)
    }

    fn server_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(self.ip, self.servers[i])
    }

    /// `siplb agent` for server `i` (0: s1, 1: s2) with synthetic readings.
    fn agent(&self, i: usize, synthetic: &str) -> Result<Proc, String> {
        let port = self.agents[i];
        let log = self.dir.join(format!("agent{}.log", i + 1));
        let p = siplb(
            &[
                "agent",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--key-file",
                "examples/agent.key",
                "--interval",
                "100ms",
                "--synthetic",
                synthetic,
            ],
            &log,
        );
        bound(p, &format!("agent {}", i + 1), &[(true, port)], &log)
    }

    /// SIPp's built-in UAS as server `i` (0: s1, 1: s2).
    fn uas(&self, i: usize) -> Result<Proc, String> {
        let port = self.servers[i];
        let log = self.dir.join(format!("uas{}.log", i + 1));
        let p = Proc(
            Command::new("sipp")
                .args(["-sn", "uas", "-i", &self.ip.to_string()])
                .args(["-p", &port.to_string(), "-nostdin", "-timeout", "120"])
                .stdout(Stdio::null())
                .stderr(log_file(&log))
                .spawn()
                .expect("sipp (Debian package sip-tester)"),
        );
        bound(p, &format!("sipp uas {}", i + 1), &[(false, port)], &log)
    }

    /// SIPp with scenario `xml` (a path from the repository's root) as
    /// server `i`, its `<log>` actions written to `logs`.
    fn sipp_scenario(&self, i: usize, xml: &str, logs: &Path) -> Result<Proc, String> {
        let port = self.servers[i];
        let log = self.dir.join(format!("uas{}.log", i + 1));
        let p = Proc(
            Command::new("sipp")
                .arg("-sf")
                .arg(root().join(xml))
                .args(["-i", &self.ip.to_string()])
                .args(["-p", &port.to_string(), "-nostdin", "-timeout", "120"])
                .arg("-trace_logs")
                .arg("-log_file")
                .arg(logs)
                .current_dir(&self.dir)
                .stdout(Stdio::null())
                .stderr(log_file(&log))
                .spawn()
                .expect("sipp (Debian package sip-tester)"),
        );
        bound(p, &format!("sipp {xml} {}", i + 1), &[(false, port)], &log)
    }

    /// A responder written here as server `i` (0: s1, 1: s2).
    fn responder(&self, i: usize, register_reply: &'static str) -> Result<Responder, String> {
        let at = self.server_addr(i);
        Responder::start(at, register_reply).map_err(|e| format!("responder on {at}: {e}"))
    }

    /// `siplb balancer` with this config, once its admin API answers
    /// (bounded); `Err` when it exits first (a port taken meanwhile).
    fn balancer(&self) -> Result<Proc, String> {
        let log = self.dir.join("balancer.log");
        let mut p = siplb(
            &["balancer", "--config", self.config.to_str().unwrap()],
            &log,
        );
        let start = Instant::now();
        loop {
            if let Some(status) = p.0.try_wait().unwrap() {
                return Err(format!("balancer exited ({status}): {}", tail(&log)));
            }
            if self.admin("/servers").is_some() {
                return Ok(p);
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err("timed out waiting for admin API".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET path` on the admin API (its `Host` naming it, as a browser's
    /// would), the body as JSON.
    fn admin(&self, path: &str) -> Option<serde_json::Value> {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect_timeout(&self.admin_addr(), Duration::from_secs(1))
                .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin_addr()
        )
        .ok()?;
        let mut r = String::new();
        s.read_to_string(&mut r).ok()?;
        serde_json::from_str(r.split_once("\r\n\r\n")?.1).ok()
    }

    fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.admin_addr(),
            body.len()
        )
        .unwrap();
        let mut r = String::new();
        let _ = s.read_to_string(&mut r);
        let code = r.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        (
            code,
            r.split_once("\r\n\r\n")
                .map_or(String::new(), |(_, b)| b.to_owned()),
        )
    }

    fn server_field(&self, id: &str, field: &str) -> serde_json::Value {
        let v = self.admin("/servers").expect("admin API");
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()[field]
            .clone()
    }

    fn both_up(&self) {
        wait(Duration::from_secs(10), "both servers up", || {
            self.admin("/servers")
                .is_some_and(|v| v.as_array().unwrap().iter().all(|s| s["state"] == "up"))
        });
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("config and logs in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A `Net` of fresh ports and what `start` starts on them (agents, servers,
/// the balancer); when a port was taken meanwhile (`start` gives `Err`),
/// all of it is stopped and started again on other ports, a few times.
fn setup<T>(
    name: &str,
    v6: bool,
    edits: &[(&str, &str)],
    start: impl Fn(&Net) -> Result<T, String>,
) -> (Net, T) {
    let mut why = String::new();
    for attempt in 1..=5 {
        let net = Net::new(name, v6, edits);
        match start(&net) {
            Ok(t) => return (net, t),
            Err(e) => {
                eprintln!("{name}: setup {attempt} failed ({e}); again on other ports");
                why = e;
            }
        }
    }
    panic!("{name}: no setup in 5 attempts; the last: {why}");
}

/// SIPp's built-in UAC towards `target` with `args`, from a free local port
/// (another one if that was taken meanwhile: SIPp's exit code 254).
fn sipp_uac(target: SocketAddr, args: &[&str]) -> Output {
    for _ in 0..3 {
        let port = free_port(target.ip(), true, true).to_string();
        let out = Command::new("sipp")
            .args([
                "-sn",
                "uac",
                &target.to_string(),
                "-i",
                &target.ip().to_string(),
            ])
            .args(["-p", &port, "-nostdin"])
            .args(args)
            .output()
            .expect("sipp");
        if out.status.code() != Some(254) {
            return out;
        }
    }
    panic!("sipp could not bind a local port three times");
}

/// Runs SIPp's built-in UAC through the balancer at `target`; returns
/// (successful, failed).
fn uac(target: SocketAddr, extra: &[&str], calls: u32, rate: u32) -> (u32, u32, Output) {
    let (rate, calls) = (rate.to_string(), calls.to_string());
    let mut args = vec!["-r", &rate, "-m", &calls, "-timeout", "90"];
    args.extend_from_slice(extra);
    let out = sipp_uac(target, &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let count = |label: &str| {
        text.lines()
            .rfind(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split('|').nth(2))
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0)
    };
    (count("Successful call"), count("Failed call"), out)
}

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn udp_and_tcp_calls_follow_the_scores_with_no_failure() {
    let _heavy = heavy();
    assert!(
        sipp_available(),
        "SIPp is required (apt-get install sip-tester)"
    );
    // Scores 70 and 50 (FIG 8 with equal memory): shares 58.3 % / 41.7 %.
    let (net, _procs) = setup("scores", false, &[], |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=50%,mem=1GB")?,
            n.uas(0)?,
            n.uas(1)?,
            n.balancer()?,
        ))
    });
    net.both_up();
    assert_eq!(net.server_field("s1", "score"), 70);
    assert_eq!(net.server_field("s2", "score"), 50);

    let (ok, failed, out) = uac(net.sip_addr(), &[], 1000, 100);
    assert_eq!(
        (ok, failed),
        (1000, 0),
        "UDP: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let s1 = net.server_field("s1", "selected_total").as_u64().unwrap();
    let s2 = net.server_field("s2", "selected_total").as_u64().unwrap();
    assert_eq!(s1 + s2, 1000);
    let share = s1 as f64 / 1000.0;
    assert!(
        (share - 70.0 / 120.0).abs() < 0.06,
        "s1 share {share:.3}, want 0.583"
    );
    // Every dialog ended: the session table is empty again.
    assert_eq!(net.server_field("s1", "active_calls"), 0);

    let (ok, failed, out) = uac(net.sip_addr(), &["-t", "t1"], 1000, 100);
    assert_eq!(
        (ok, failed),
        (1000, 0),
        "TCP: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let total = net.server_field("s1", "selected_total").as_u64().unwrap()
        + net.server_field("s2", "selected_total").as_u64().unwrap();
    assert_eq!(total, 2000);
}

/// A SIP server written here: answers REGISTER as told, INVITE with 200
/// (echoing Record-Route), BYE with 200, and counts what it gets.
struct Responder {
    got: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    fn start(at: SocketAddr, register_reply: &'static str) -> std::io::Result<Responder> {
        let sock = UdpSocket::bind(at)?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(m) = sip::Message::parse(&buf[..n]) else {
                    continue;
                };
                if !m.is_request() {
                    g.lock()
                        .unwrap()
                        .push(format!("RESP {}", m.status().unwrap_or(0)));
                    continue;
                }
                let method = m.method().to_string();
                if register_reply == "bounce" && method == "OPTIONS" {
                    // A misconfigured server: sends the request straight back
                    // to the balancer, unchanged but for its own Via.
                    g.lock()
                        .unwrap()
                        .push(format!("{method} {}", String::from_utf8_lossy(m.call_id())));
                    let mut out = Vec::new();
                    m.write_edited(
                        &sip::Edits {
                            prepend_via: Some(
                                format!("SIP/2.0/UDP {at};branch=z9hG4bKbounce").as_bytes(),
                            ),
                            ..sip::Edits::default()
                        },
                        &mut out,
                    );
                    let _ = sock.send_to(&out, peer);
                    continue;
                }
                g.lock().unwrap().push(format!(
                    "{method} {} {}",
                    String::from_utf8_lossy(m.call_id()),
                    String::from_utf8_lossy(m.top_via().branch.unwrap_or_default())
                ));
                let mut extra: Vec<Vec<u8>> = m
                    .headers()
                    .filter(|h| h.name == sip::HeaderName::RecordRoute)
                    .map(|h| [b"Record-Route: ".as_slice(), h.value].concat())
                    .collect();
                let (code, reason) = match method.as_str() {
                    "ACK" => continue,
                    "INVITE" if register_reply == "invite503" => (503, "Service Unavailable"),
                    _ if register_reply == "all503" => (503, "Service Unavailable"),
                    "INVITE" if register_reply == "ring" => (180, "Ringing"),
                    "REGISTER" => {
                        let (c, r, hdr) = match register_reply {
                            "200" => (200, "OK", None),
                            realm => (
                                401,
                                "Unauthorized",
                                Some(format!(
                                    "WWW-Authenticate: Digest realm=\"{realm}\", nonce=\"n\""
                                )),
                            ),
                        };
                        extra.extend(hdr.map(String::into_bytes));
                        (c, r)
                    }
                    _ => (200, "OK"),
                };
                let refs: Vec<&[u8]> = extra.iter().map(Vec::as_slice).collect();
                let mut out = Vec::new();
                sip::reply::response_for(&m, code, reason, b"srv", &refs, &mut out);
                let _ = sock.send_to(&out, peer);
            }
        });
        Ok(Responder {
            got,
            stop,
            thread: Some(thread),
        })
    }

    /// The lines logged so far that start with `prefix`.
    fn lines(&self, prefix: &str) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn count(&self, prefix: &str) -> usize {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Ua {
    sock: UdpSocket,
    port: u16,
    /// The balancer's SIP address: where requests go, and their Request-URI.
    lb: SocketAddr,
    cseq: AtomicU32,
}

impl Ua {
    fn new(net: &Net) -> Ua {
        // A port of its own, never one handed out to a test's process.
        let (sock, port) = claim(|| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = s.local_addr().unwrap().port();
            Some((s, port))
        });
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Ua {
            sock,
            port,
            lb: net.sip_addr(),
            cseq: AtomicU32::new(1),
        }
    }

    fn send(&self, method: &str, call_id: &str, to_tag: Option<&str>, extra: &str) {
        let n = self.cseq.fetch_add(1, Ordering::Relaxed);
        let to = to_tag.map_or(String::new(), |t| format!(";tag={t}"));
        let msg = format!(
            "{method} sip:svc@{lb} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{p};branch=z9hG4bK{call_id}{n};rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:ua@127.0.0.1>;tag=ua1\r\nTo: <sip:svc@127.0.0.1>{to}\r\nCall-ID: {call_id}\r\nCSeq: {n} {method}\r\n\
Contact: <sip:ua@127.0.0.1:{p}>\r\n{extra}Content-Length: 0\r\n\r\n",
            lb = self.lb,
            p = self.port
        );
        self.sock.send_to(msg.as_bytes(), self.lb).unwrap();
    }

    fn send_raw(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.lb).unwrap();
    }

    /// Responses received within `limit`.
    fn responses(&self, limit: Duration) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let start = Instant::now();
        let mut buf = vec![0u8; 65536];
        while start.elapsed() < limit {
            if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                out.push(buf[..n].to_vec());
            }
        }
        out
    }
}

fn status_of(r: &[u8]) -> u16 {
    sip::Message::parse(r)
        .ok()
        .and_then(|m| m.status())
        .unwrap_or(0)
}

#[test]
fn register_is_forked_and_merged_and_record_route_survives_a_restart() {
    let (net, (_a1, _a2, r1, r2, mut lb)) = setup("fork", false, &[], |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.responder(0, "200")?,
            n.responder(1, "realm-b")?,
            n.balancer()?,
        ))
    });
    net.both_up();
    let ua = Ua::new(&net);

    // One REGISTER, both servers get it, one final response: the 2xx wins.
    ua.send("REGISTER", "reg1", None, "Expires: 60\r\n");
    let got = ua.responses(Duration::from_millis(800));
    assert_eq!(
        (r1.count("REGISTER reg1"), r2.count("REGISTER reg1")),
        (1, 1)
    );
    let finals: Vec<u16> = got
        .iter()
        .map(|r| status_of(r))
        .filter(|&c| c >= 200)
        .collect();
    assert_eq!(finals, [200]);

    // A Record-Routed INVITE; then the balancer restarts; the BYE that
    // carries our Record-Route still reaches the same server.
    ua.send("INVITE", "call1", None, "");
    let got = ua.responses(Duration::from_millis(500));
    let ok = got
        .iter()
        .find(|r| status_of(r) == 200)
        .expect("200 for the INVITE");
    let m = sip::Message::parse(ok).unwrap();
    let rr = m.record_routes().next().expect("our Record-Route").unwrap();
    let sb = String::from_utf8_lossy(rr.uri.param(b"sb").flatten().unwrap()).into_owned();
    let route = String::from_utf8_lossy(rr.raw).into_owned();
    let (first, other) = if r1.count("INVITE call1") == 1 {
        (&r1, &r2)
    } else {
        (&r2, &r1)
    };
    assert_eq!(first.count("INVITE call1"), 1);
    assert!(
        sb.starts_with(if std::ptr::eq(first, &r1) {
            "s1."
        } else {
            "s2."
        }),
        "{sb}"
    );

    drop(std::mem::replace(
        &mut lb,
        Proc(Command::new("true").spawn().unwrap()),
    ));
    // On the same ports (this test's, handed out to no one else).
    let _lb2 = net.balancer().expect("the balancer back on its ports");
    net.both_up();
    ua.send("BYE", "call1", Some("srv"), &format!("Route: {route}\r\n"));
    let got = ua.responses(Duration::from_millis(500));
    assert!(got.iter().any(|r| status_of(r) == 200), "BYE answered");
    assert_eq!((first.count("BYE call1"), other.count("BYE call1")), (1, 0));

    // A forged signature is refused, never forwarded.
    let forged = route.replace(&sb[3..], "0000000000000000");
    ua.send("BYE", "call1", Some("srv"), &format!("Route: {forged}\r\n"));
    let got = ua.responses(Duration::from_millis(500));
    assert_eq!(got.iter().map(|r| status_of(r)).collect::<Vec<_>>(), [403]);
    assert_eq!(first.count("BYE call1") + other.count("BYE call1"), 1);
}

#[test]
fn register_challenges_are_combined() {
    let (net, _procs) = setup("challenges", false, &[], |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.responder(0, "realm-a")?,
            n.responder(1, "realm-b")?,
            n.balancer()?,
        ))
    });
    net.both_up();
    let ua = Ua::new(&net);
    ua.send("REGISTER", "reg2", None, "Expires: 60\r\n");
    let got = ua.responses(Duration::from_millis(800));
    assert_eq!(got.len(), 1, "one final response");
    let text = String::from_utf8_lossy(&got[0]);
    assert!(text.starts_with("SIP/2.0 401"), "{text}");
    assert!(
        text.contains("realm=\"realm-a\"") && text.contains("realm=\"realm-b\""),
        "{text}"
    );
}

#[test]
fn a_stopped_agent_takes_its_server_out_and_bad_input_gets_answers_while_calls_flow() {
    let _heavy = heavy();
    assert!(
        sipp_available(),
        "SIPp is required (apt-get install sip-tester)"
    );
    let (net, (a1, _a2, _u1, _u2, _lb)) = setup("stopped", false, &[], |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.uas(0)?,
            n.uas(1)?,
            n.balancer()?,
        ))
    });
    net.both_up();
    drop(a1);
    wait(Duration::from_secs(5), "s1 down", || {
        net.server_field("s1", "state") == "down"
    });
    let before = net.server_field("s1", "selected_total");

    // Calls keep flowing while bad input arrives.
    let target = net.sip_addr();
    let calls = std::thread::spawn(move || uac(target, &[], 400, 100));
    std::thread::sleep(Duration::from_millis(500));
    let ua = Ua::new(&net);
    ua.send_raw(b"hello, not SIP at all");
    ua.send_raw(b"INVITE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKbad\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: bad1\r\nCSeq: 99999999999 INVITE\r\n\r\n");
    ua.send("OPTIONS", "mf0", None, "");
    let zeromf = std::fs::read(root().join("crates/sip/tests/rfc4475/invalid/zeromf.sip")).unwrap();
    ua.send_raw(&zeromf);
    // A Max-Forwards: 0 request built by us goes back to our own socket.
    ua.send_raw(
        format!(
            "OPTIONS sip:svc@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bKmf0\r\nMax-Forwards: 0\r\n\
From: <sip:ua@x>;tag=1\r\nTo: <sip:svc@x>\r\nCall-ID: mf0b\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            ua.port
        )
        .as_bytes(),
    );
    // RFC 4475's unknown scheme and unknown Proxy-Require get 416 and 420.
    for file in ["unkscm", "bext01"] {
        let path = root().join(format!("crates/sip/tests/rfc4475/invalid/{file}.sip"));
        ua.send_raw(&std::fs::read(path).unwrap());
    }
    let got = ua.responses(Duration::from_millis(800));
    let codes: Vec<u16> = got.iter().map(|r| status_of(r)).collect();
    assert_eq!(
        codes.iter().filter(|&&c| c == 483).count(),
        2,
        "483 for both Max-Forwards 0: {codes:?}"
    );
    assert!(
        codes.contains(&416) && codes.contains(&420),
        "416 and 420: {codes:?}"
    );
    // The broken INVITE's 400 copies what it had: its Via and its (broken) CSeq.
    let bad = got
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .find(|r| r.starts_with("SIP/2.0 400"));
    let bad = bad.expect("a 400 for the broken INVITE");
    assert!(
        bad.contains("invalid CSeq") && bad.contains("branch=z9hG4bKbad"),
        "{bad}"
    );
    // Over the size limit on TCP: 513, then the connection closes.
    {
        use std::io::{Read, Write};
        let mut t = std::net::TcpStream::connect(net.sip_addr()).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        t.write_all(
            b"MESSAGE sip:svc@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKbig\r\n\
From: <sip:a@x>;tag=1\r\nTo: <sip:b@x>\r\nCall-ID: big1\r\nCSeq: 1 MESSAGE\r\nContent-Length: 70000\r\n\r\n",
        )
        .unwrap();
        let mut answer = String::new();
        let _ = t.read_to_string(&mut answer);
        assert!(answer.starts_with("SIP/2.0 513"), "{answer}");
    }
    // A truncated TCP stream: half a message, then the connection closes.
    {
        use std::io::Write;
        let mut t = std::net::TcpStream::connect(net.sip_addr()).unwrap();
        t.write_all(b"INVITE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKt\r\nContent-Le").unwrap();
    }
    let (ok, failed, out) = calls.join().unwrap();
    assert_eq!(
        (ok, failed),
        (400, 0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        net.server_field("s1", "selected_total"),
        before,
        "no new call to the server whose agent stopped"
    );
    assert_eq!(net.server_field("s2", "state"), "up");
}

#[test]
fn drain_scoring_metrics_reload_and_graceful_stop() {
    let _heavy = heavy();
    assert!(
        sipp_available(),
        "SIPp is required (apt-get install sip-tester)"
    );
    // Its own copy of the example config, which we edit for the reload.
    let (net, (_a1, _a2, _u1, _u2, mut lb)) = setup("reload", false, &[], |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.uas(0)?,
            n.uas(1)?,
            n.balancer()?,
        ))
    });
    let (cfg_path, cfg) = (&net.config, &net.cfg);
    net.both_up();

    // Drained: no new calls.
    assert_eq!(net.http("POST", "/servers/s1/drain", "").0, 200);
    assert_eq!(net.server_field("s1", "state"), "drained");
    assert_eq!(net.http("POST", "/servers/nope/drain", "").0, 404);
    let (ok, failed, _) = uac(net.sip_addr(), &[], 100, 100);
    assert_eq!((ok, failed), (100, 0));
    assert_eq!(net.server_field("s1", "selected_total"), 0);
    assert_eq!(net.server_field("s2", "selected_total"), 100);
    assert_eq!(net.http("POST", "/servers/s1/undrain", "").0, 200);

    // Scoring changes live; a bad value names its field and changes nothing.
    let (code, body) = net.http("PUT", "/scoring", r#"{"w_mem": 0}"#);
    assert_eq!(code, 200, "{body}");
    assert_eq!(net.server_field("s1", "score"), 90);
    let (code, body) = net.http("PUT", "/scoring", r#"{"cpu_max": 7}"#);
    assert_eq!(code, 400);
    assert!(body.contains("cpu_max"), "{body}");

    // Metrics in Prometheus text.
    let (code, metrics) = net.http("GET", "/metrics", "");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("siplb_requests_total{method=\"INVITE\"} 100"),
        "{metrics}"
    );
    assert!(
        metrics.contains("siplb_selected_total{server=\"s2\"} 100"),
        "{metrics}"
    );
    assert!(
        metrics.contains("siplb_responses_total{code=\"200\"}"),
        "{metrics}"
    );

    // The policy changes live: round-robin splits 100 new calls 50/50.
    let (code, body) = net.http("GET", "/policy", "");
    assert_eq!(code, 200);
    assert!(body.contains("\"policy\":\"patent\""), "{body}");
    let (code, body) = net.http("PUT", "/policy", r#"{"policy": "fastest"}"#);
    assert_eq!(code, 400);
    assert!(body.contains("round-robin"), "{body}");
    // `siplb status` shows the policy, each server's share and who said down.
    let status = Command::new(env!("CARGO_BIN_EXE_siplb"))
        .args(["status", "--admin", &net.admin_addr().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(text.starts_with("policy: patent\n"), "{text}");
    assert!(
        text.contains("SHARE%") && text.lines().count() == 4,
        "{text}"
    );
    // Under a weighted policy /servers shows each server's share of the draw.
    // Both shares from one answer: the weights move between two (s1 ramps
    // back after its undrain), so two reads need not add up to 1.
    let servers = net.admin("/servers").expect("admin API");
    let shares: Vec<f64> = servers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["policy_weight"].as_f64().unwrap())
        .collect();
    assert_eq!(shares.len(), 2, "{servers}");
    assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{servers}");
    let (code, body) = net.http("PUT", "/policy", r#"{"policy": "round-robin"}"#);
    assert_eq!(code, 200, "{body}");
    assert!(net.server_field("s1", "policy_weight").is_null());
    let (ok, failed, _) = uac(net.sip_addr(), &[], 100, 100);
    assert_eq!((ok, failed), (100, 0));
    assert_eq!(net.server_field("s1", "selected_total"), 50);
    assert_eq!(net.server_field("s2", "selected_total"), 150);
    assert!(
        net.http("GET", "/metrics", "")
            .1
            .contains("siplb_policy{name=\"round-robin\"} 1")
    );
    // Sessions per busy second from the agents' windows (synthetic CPU here).
    assert_eq!(net.server_field("s1", "capacity_source"), "learned");
    assert!(net.server_field("s1", "capacity").as_f64().unwrap() > 0.0);
    assert_eq!(net.http("PUT", "/policy", r#"{"policy": "patent"}"#).0, 200);

    // Reload: s2 removed, s1 keeps its counters; a broken file is refused.
    let s2 = format!(
        "[[servers]]\nid = \"s2\"\naddress = \"{}\"\nagent = \"127.0.0.1:{}\"\n",
        net.server_addr(1),
        net.agents[1]
    );
    assert!(cfg.contains(&s2), "{cfg}");
    std::fs::write(cfg_path, cfg.replace(&s2, "")).unwrap();
    let (code, body) = net.http("POST", "/reload", "");
    assert_eq!(code, 200, "{body}");
    let servers = net.admin("/servers").unwrap();
    assert_eq!(servers.as_array().unwrap().len(), 1);
    std::fs::write(cfg_path, "[routing\nbroken").unwrap();
    let (code, body) = net.http("POST", "/reload", "");
    assert_eq!(code, 400);
    assert!(body.contains("config"), "{body}");
    // SIGHUP re-reads too: back to two servers.
    std::fs::write(cfg_path, cfg).unwrap();
    Command::new("kill")
        .args(["-HUP", &lb.0.id().to_string()])
        .status()
        .unwrap();
    wait(Duration::from_secs(5), "two servers after SIGHUP", || {
        net.admin("/servers")
            .is_some_and(|v| v.as_array().unwrap().len() == 2)
    });
    assert_eq!(
        net.server_field("s2", "selected_total"),
        0,
        "a re-added server starts fresh"
    );

    // SIGTERM: stops, exit 0, well within the grace period.
    Command::new("kill")
        .args(["-TERM", &lb.0.id().to_string()])
        .status()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = lb.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "balancer did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
}

#[test]
fn a_request_looping_back_gets_482() {
    let (net, (_a1, _a2, r1, r2, _lb)) = setup("loop", false, &[], |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.responder(0, "bounce")?,
            n.responder(1, "bounce")?,
            n.balancer()?,
        ))
    });
    net.both_up();
    let ua = Ua::new(&net);
    ua.send("OPTIONS", "loop1", None, "");
    wait(Duration::from_secs(3), "482 at the bouncing server", || {
        r1.count("RESP 482") + r2.count("RESP 482") == 1
    });
    // Forwarded once, refused the second time round: no storm.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(r1.count("OPTIONS loop1") + r2.count("OPTIONS loop1"), 1);
}

#[test]
fn ipv6_calls_over_udp_and_tcp() {
    let _heavy = heavy();
    assert!(
        sipp_available(),
        "SIPp is required (apt-get install sip-tester)"
    );
    assert!(
        UdpSocket::bind("[::1]:0").is_ok(),
        "this test needs IPv6 loopback (::1)"
    );
    // SIP and the servers on ::1 (the agents and the admin API stay on 127.0.0.1).
    let edits = [
        ("listen = [\"127.0.0.1:5060\"]", "listen = [\"[::1]:5060\"]"),
        ("\"127.0.0.1:5081\"", "\"[::1]:5081\""),
        ("\"127.0.0.1:5082\"", "\"[::1]:5082\""),
    ];
    let (net, _procs) = setup("v6", true, &edits, |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.uas(0)?,
            n.uas(1)?,
            n.balancer()?,
        ))
    });
    net.both_up();
    for transport in ["u1", "t1"] {
        let out = sipp_uac(
            net.sip_addr(),
            &["-t", transport, "-r", "50", "-m", "100", "-timeout", "60"],
        );
        assert!(
            out.status.success(),
            "{transport}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let total = net.server_field("s1", "selected_total").as_u64().unwrap()
        + net.server_field("s2", "selected_total").as_u64().unwrap();
    assert_eq!(total, 200);
}

#[test]
fn a_dead_server_or_a_503_costs_no_call() {
    let _heavy = heavy();
    assert!(
        sipp_available(),
        "SIPp is required (apt-get install sip-tester)"
    );
    // s1's agent answers but nothing listens on its SIP port (one handed out
    // to this test only, and left unbound): every INVITE sent there times
    // out after failover_timeout and moves to s2.
    let (net, (_a1, _a2, _u2, lb)) = setup("dead", false, &[], |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.uas(1)?,
            n.balancer()?,
        ))
    });
    net.both_up();
    let (ok, failed, out) = uac(net.sip_addr(), &[], 60, 20);
    assert_eq!(
        (ok, failed),
        (60, 0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // 3 unanswered attempts in a row eject s1 (outlier detection): the
    // calls already sent there fail over, no later call goes there.
    let moved = net.server_field("s1", "failovers_total").as_u64().unwrap();
    assert!(moved >= 3, "s1 was tried and failed over: {moved}");
    assert_eq!(net.server_field("s1", "ejected"), true);
    assert_eq!(net.server_field("s1", "ejections_total"), 1);
    assert_eq!(net.server_field("s1", "down_by"), "outlier");
    assert!(net.server_field("s1", "failure_ratio").as_f64().unwrap() > 0.99);
    let selected = net.server_field("s1", "selected_total").as_u64().unwrap();
    assert!(selected < 20, "s1 chosen only until ejected: {selected}");
    assert_eq!(net.server_field("s2", "active_calls"), 0);
    let metrics = net.http("GET", "/metrics", "").1;
    assert!(
        metrics.contains("siplb_ejected{server=\"s1\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("siplb_down_by{server=\"s1\",signal=\"outlier\"} 1"));
    drop(lb);

    // s1 answers every INVITE with 503: ACKed by the balancer, the call goes to s2.
    let r1 = net.responder(0, "invite503").expect("s1's port, ours");
    let _lb = net.balancer().expect("the balancer back on its ports");
    net.both_up();
    let (ok, failed, out) = uac(net.sip_addr(), &[], 60, 20);
    assert_eq!(
        (ok, failed),
        (60, 0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let tried = r1.count("INVITE");
    assert!(tried >= 3, "s1 got INVITEs: {tried}");
    assert_eq!(net.server_field("s1", "ejected"), true);
    wait(Duration::from_secs(2), "every 503 ACKed", || {
        r1.count("ACK") == tried
    });
}

/// A table of 40 transactions, 400 calls at 100 calls/s: every call's INVITE
/// entry stays T4 (5 s) after its 200, so the table is full of finished
/// calls after 0.4 s. Those entries make room (oldest first); no call is
/// refused.
#[test]
fn finished_calls_do_not_fill_the_transaction_table() {
    let _heavy = heavy();
    assert!(
        sipp_available(),
        "SIPp is required (apt-get install sip-tester)"
    );
    let edits = [(
        "on_no_server = \"reject\"",
        "on_no_server = \"reject\"\nmax_transactions = 40",
    )];
    let (net, _procs) = setup("txn-full", false, &edits, |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.uas(0)?,
            n.uas(1)?,
            n.balancer()?,
        ))
    });
    net.both_up();
    let (ok, failed, out) = uac(net.sip_addr(), &[], 400, 100);
    let metrics = net.http("GET", "/metrics", "").1;
    assert_eq!(
        (ok, failed),
        (400, 0),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        metrics
            .lines()
            .filter(|l| l.contains("drops")
                || l.contains("transactions")
                || l.contains("local_responses"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert!(value("siplb_transactions ") <= 40.0, "{metrics}");
    let ended = value("siplb_transactions_ended_early_total ");
    assert!(ended >= 300.0, "the finished entries made room: {ended}");
    assert_eq!(
        value("siplb_drops_total{reason=\"transaction_table_full\"} "),
        0.0
    );
}

#[test]
fn an_options_probe_takes_a_silent_server_out_and_back() {
    let edits = [(
        "agent = \"127.0.0.1:7071\"",
        "agent = \"127.0.0.1:7071\"\nprobe = \"200ms\"",
    )];
    let (net, (_a1, _a2, r1, _r2, _lb)) = setup("probe", false, &edits, |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.responder(0, "200")?,
            n.responder(1, "200")?,
            n.balancer()?,
        ))
    });
    net.both_up();
    assert_eq!(net.server_field("s1", "probe_state"), "up");
    assert_eq!(net.server_field("s2", "probe_state"), "off");
    wait(Duration::from_secs(3), "probes answered", || {
        r1.count("OPTIONS probe-s1") >= 2
    });
    // Silent (its agent still answers): down after 2 unanswered probes, and the probe says so.
    drop(r1);
    wait(Duration::from_secs(3), "s1 down by probe", || {
        net.server_field("s1", "state") == "down"
    });
    assert_eq!(net.server_field("s1", "down_by"), "probe");
    let metrics = net.http("GET", "/metrics", "").1;
    assert!(
        metrics.contains("siplb_probe_up{server=\"s1\"} 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("siplb_probe_up{server=\"s2\""),
        "s2 is not probed"
    );
    assert!(metrics.contains("siplb_down_by{server=\"s1\",signal=\"probe\"} 1"));
    let ua = Ua::new(&net);
    let before = net.server_field("s1", "selected_total");
    for i in 0..10 {
        ua.send("OPTIONS", &format!("probe-test-{i}"), None, "");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        net.server_field("s1", "selected_total"),
        before,
        "no new session to a server probed down"
    );
    // Answering again (on s1's port, ours): up after 2 answered probes.
    let _r1 = net.responder(0, "200").expect("s1's port, ours");
    wait(Duration::from_secs(3), "s1 up again", || {
        net.server_field("s1", "state") == "up"
    });
    assert!(net.server_field("s1", "down_by").is_null());
}

#[test]
fn out_of_dialog_requests_fail_over_too() {
    // Ejection off: every request that lands on s1 must fail over by itself.
    let edits = [("[routing]", "[routing]\noutlier_failures = 0")];
    let (net, (_a1, _a2, r1, r2, _lb)) = setup("noninvite", false, &edits, |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            // s1 scores 70, s2 35: most first attempts go to s1.
            n.agent(1, "cpu=80%,mem=1GB")?,
            n.responder(0, "all503")?,
            n.responder(1, "200")?,
            n.balancer()?,
        ))
    });
    net.both_up();
    let ua = Ua::new(&net);
    // s1 refuses everything with 503: SUBSCRIBE and MESSAGE move to s2; the
    // UA sees one 200 per request and never a 503 (nor a 100: RFC 4320).
    for i in 0..10 {
        ua.send(
            "SUBSCRIBE",
            &format!("sub-{i}"),
            None,
            "Event: presence\r\n",
        );
        ua.send("MESSAGE", &format!("msg-{i}"), None, "");
    }
    let got: Vec<u16> = ua
        .responses(Duration::from_millis(1500))
        .iter()
        .map(|r| status_of(r))
        .collect();
    assert_eq!(got.len(), 20, "one final per request: {got:?}");
    assert!(got.iter().all(|&c| c == 200), "{got:?}");
    let refused = r1.count("SUBSCRIBE") + r1.count("MESSAGE");
    assert!(refused > 0, "s1 was tried");
    assert_eq!(r2.count("SUBSCRIBE") + r2.count("MESSAGE"), 20);
    assert_eq!(r1.count("ACK"), 0, "no ACK for a non-INVITE");
    // s1 silent: a non-INVITE sent there is NOT moved to s2 on silence (RFC
    // 4320: a server may work on it for 32 s without a word, so a second
    // server would get a duplicate MESSAGE); those the draw gives s2 succeed.
    drop(r1);
    let before = net.server_field("s1", "failovers_total").as_u64().unwrap();
    let at_s2 = r2.count("MESSAGE");
    for i in 0..10 {
        ua.send("MESSAGE", &format!("silent-{i}"), None, "");
    }
    let got: Vec<u16> = ua
        .responses(Duration::from_millis(2000))
        .iter()
        .map(|r| status_of(r))
        .collect();
    assert!(got.iter().all(|&c| c == 200), "{got:?}");
    assert_eq!(
        got.len(),
        r2.count("MESSAGE") - at_s2,
        "each MESSAGE reached one server once: {got:?}"
    );
    assert!(got.len() < 10, "s1 (score 70) got some of them: {got:?}");
    assert!(before >= refused as u64);
    assert_eq!(
        net.server_field("s1", "failovers_total").as_u64().unwrap(),
        before,
        "no failover of a non-INVITE on silence"
    );
}

/// How to run a command in a network namespace of its own, its loopback up
/// (`unshare --net`, as root or in a user namespace), tried once; `None`
/// where neither works.
fn netns() -> Option<&'static [&'static str]> {
    static HOW: OnceLock<Option<&'static [&'static str]>> = OnceLock::new();
    *HOW.get_or_init(|| {
        let ways: [&'static [&'static str]; 2] = [
            &["unshare", "--net"],
            &["unshare", "--user", "--map-root-user", "--net"],
        ];
        ways.into_iter().find(|w| {
            Command::new(w[0])
                .args(&w[1..])
                .args(["sh", "-c", "ip link set lo up"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    })
}

/// bench/kill.py in short: 200 calls/s for 9 s with calls held 500 ms; one
/// part of the pool killed (or hung) at 2 s and back at 6 s (out from 4.5 s). The script
/// fails when more calls fail than the mode allows: none with an agent
/// killed or hung or the balancer restarted (in-dialog requests find their
/// server by our Record-Route), only calls the killed server had answered
/// when the server is killed.
///
/// bench/kill.py starts its own pool on fixed ports (those of
/// examples/local.toml, and its UAC on 5070) and has no option to move them,
/// so each run gets a network namespace of its own where one can be made (a
/// loopback of its own: those ports are its alone, whatever else runs on this
/// machine). Where none can, the runs share the machine's loopback and run
/// one at a time (SERIAL); the other tests here never use those ports.
fn kill_run(mode: &str) {
    let private = netns();
    let _g = private
        .is_none()
        .then(|| SERIAL.lock().unwrap_or_else(PoisonError::into_inner));
    let _heavy = heavy();
    assert!(
        sipp_available(),
        "SIPp is required (apt-get install sip-tester)"
    );
    let mut cmd = match private {
        Some(unshare) => {
            let mut c = Command::new(unshare[0]);
            c.args(&unshare[1..]).args([
                "sh",
                "-c",
                "ip link set lo up && exec \"$0\" \"$@\"",
                "python3",
            ]);
            c
        }
        None => Command::new("python3"),
    };
    let out = cmd
        .arg(root().join("bench/kill.py"))
        .args(["--mode", mode, "--rate", "200", "--seconds", "9"])
        .args(["--kill-at", "2", "--back-at", "6", "--settle", "2.5"])
        .args(["--hold", "500"])
        .args(["--siplb", env!("CARGO_BIN_EXE_siplb"), "--json"])
        .output()
        .expect("python3 runs bench/kill.py");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(
        last["successful"].as_u64().unwrap() + last["failed"].as_u64().unwrap(),
        1800,
        "{text}"
    );
    if mode != "server" {
        assert_eq!(last["failed"], 0, "{text}");
    }
    if mode != "balancer" {
        // Out means out: no new call goes to s1 while its agent is dead or
        // hung, or while it is ejected after its SIP port died.
        assert_eq!(last["s1_while_out"], 0, "{text}");
    }
    if mode == "agent" || mode == "hang" {
        // Back (ramping from the slow-start floor) once its agent answers.
        assert!(last["s1_after_back"].as_u64().unwrap() > 0, "{text}");
    }
}

#[test]
fn kill_a_server_under_load() {
    kill_run("server");
}

#[test]
fn kill_an_agent_under_load() {
    kill_run("agent");
}

#[test]
fn hang_an_agent_under_load() {
    kill_run("hang");
}

#[test]
fn restart_the_balancer_under_load() {
    kill_run("balancer");
}

#[test]
fn a_server_that_dies_after_ringing_does_not_strand_the_call() {
    // s1 answers INVITE with 180 only, and OPTIONS probes; s2 answers 200.
    let edits = [(
        "agent = \"127.0.0.1:7071\"",
        "agent = \"127.0.0.1:7071\"\nprobe = \"200ms\"",
    )];
    let (net, (_a1, _a2, r1, _r2, _lb)) = setup("ring", false, &edits, |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            // s1 scores 70, s2 30: most calls start on s1.
            n.agent(1, "cpu=90%,mem=1GB")?,
            n.responder(0, "ring")?,
            n.responder(1, "200")?,
            n.balancer()?,
        ))
    });
    net.both_up();
    let ua = Ua::new(&net);
    for i in 0..10 {
        ua.send("INVITE", &format!("ring-{i}"), None, "");
    }
    let early = ua.responses(Duration::from_millis(600));
    let ringing = early.iter().filter(|r| status_of(r) == 180).count();
    assert!(ringing > 0, "s1 rang some calls");
    let done_early = early.iter().filter(|r| status_of(r) == 200).count();
    // s1 dies: its probes go unanswered, it is down by probe, and each call
    // it was ringing goes to s2.
    drop(r1);
    let late = ua.responses(Duration::from_millis(2500));
    let done_late = late.iter().filter(|r| status_of(r) == 200).count();
    assert_eq!(done_early + done_late, 10, "every call answered");
    assert_eq!(done_late, ringing, "each rung call rescued");
}

/// A CANCEL reaches the server with its INVITE's branch (RFC 3261 §9.1), so
/// the server can match it; a call that rings for ever gets 408 from the
/// balancer after `invite_timeout` (Timer C) and the server a CANCEL.
#[test]
fn cancel_matches_its_invite_and_timer_c_ends_a_call_that_rings_for_ever() {
    let edits = [("[routing]", "[routing]\ninvite_timeout = \"1s\"")];
    let (net, (_a1, _a2, r1, r2, _lb)) = setup("timerc", false, &edits, |n| {
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.responder(0, "ring")?,
            n.responder(1, "ring")?,
            n.balancer()?,
        ))
    });
    net.both_up();
    let ua = Ua::new(&net);
    // The UA cancels a ringing call.
    let invite = |m: &str| {
        format!(
            "{m} sip:svc@{lb} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{p};branch=z9hG4bKcancelme;rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:ua@127.0.0.1>;tag=ua1\r\nTo: <sip:svc@127.0.0.1>\r\nCall-ID: cancel-1\r\nCSeq: 1 {m}\r\n\
Contact: <sip:ua@127.0.0.1:{p}>\r\nContent-Length: 0\r\n\r\n",
            lb = ua.lb,
            p = ua.port
        )
    };
    ua.send_raw(invite("INVITE").as_bytes());
    std::thread::sleep(Duration::from_millis(200));
    ua.send_raw(invite("CANCEL").as_bytes());
    std::thread::sleep(Duration::from_millis(300));
    let seen: Vec<String> = [&r1, &r2]
        .iter()
        .flat_map(|r| [r.lines("INVITE cancel-1"), r.lines("CANCEL cancel-1")])
        .flatten()
        .collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let branch = |l: &String| l.rsplit(' ').next().unwrap().to_owned();
    assert_eq!(branch(&seen[0]), branch(&seen[1]), "{seen:?}");

    // A call nobody answers: 408 after invite_timeout, and a CANCEL to its server.
    ua.send("INVITE", "rings-for-ever", None, "");
    let got: Vec<u16> = ua
        .responses(Duration::from_millis(3000))
        .iter()
        .map(|r| status_of(r))
        .filter(|&c| c >= 180)
        .collect();
    assert!(got.contains(&180), "{got:?}");
    assert!(got.contains(&408), "Timer C: {got:?}");
    assert_eq!(
        r1.count("CANCEL rings-for-ever") + r2.count("CANCEL rings-for-ever"),
        1
    );
}

/// One whole call from `ua` through the balancer (INVITE, its 200, ACK,
/// BYE and its 200): the SIP port of the server that answered it, from the
/// Contact of its 200 (written by the server itself).
fn whole_call(ua: &Ua, call_id: &str) -> Result<u16, String> {
    let mut buf = vec![0u8; 65536];
    let final_of = |want: &str, buf: &mut [u8]| -> Result<String, String> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok((n, _)) = ua.sock.recv_from(buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let code = status_of(&buf[..n]);
                if code >= 200 && text.contains(want) && text.contains(call_id) {
                    return Ok(text);
                }
            }
        }
        Err(format!("{call_id}: no final response to {want} within 3 s"))
    };
    ua.send("INVITE", call_id, None, "");
    let ok = final_of(" INVITE\r\n", &mut buf)?;
    if status_of(ok.as_bytes()) != 200 {
        return Err(format!("{call_id} failed: {ok}"));
    }
    let header = |name: &str| {
        ok.split("\r\n")
            .find(|l| l.to_ascii_lowercase().starts_with(name))
            .unwrap_or_default()
            .to_owned()
    };
    let tag = header("to:")
        .split(";tag=")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let port = header("contact:")
        .split("sip:")
        .nth(1)
        .and_then(|h| h.split([';', '>']).next())
        .and_then(|h| h.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("{call_id}: no Contact port in {ok}"))?;
    ua.send("ACK", call_id, Some(&tag), "");
    ua.send("BYE", call_id, Some(&tag), "");
    final_of(" BYE\r\n", &mut buf)?;
    Ok(port)
}

#[test]
fn a_503_with_retry_after_keeps_new_calls_away_for_that_long_then_they_ramp_back() {
    let _heavy = heavy();
    assert!(
        sipp_available(),
        "SIPp is required (apt-get install sip-tester)"
    );
    // s1: a SIPp server that answers its first INVITE 503 Retry-After: 5 and
    // later ones 200 (bench/sipp/uas_overloaded_once.xml), logging each
    // INVITE it gets; s2: SIPp's built-in UAS.
    let logs = std::env::temp_dir().join(format!("siplb-e2e-overload-{}.log", std::process::id()));
    let (net, (_a1, _a2, _u1, _u2, _lb)) = setup("overload", false, &[], |n| {
        let _ = std::fs::remove_file(&logs);
        Ok((
            n.agent(0, "cpu=10%,mem=1GB")?,
            n.agent(1, "cpu=10%,mem=1GB")?,
            n.sipp_scenario(0, "bench/sipp/uas_overloaded_once.xml", &logs)?,
            n.uas(1)?,
            n.balancer()?,
        ))
    });
    let invites_at_s1 = || {
        std::fs::read_to_string(&logs)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("INVITE call "))
            .count()
    };
    net.both_up();
    let (s1, s2) = (net.servers[0], net.servers[1]);
    let ua = Ua::new(&net);
    // Calls until one is drawn for s1: its 503 moves that call to s2 (the
    // UA never sees the 503) and starts s1's 5 s.
    let wall = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let mut n = 0;
    let mut sent_at = wall();
    while net.server_field("s1", "overloaded") != true {
        assert!(n < 40, "no call reached s1 in 40");
        sent_at = wall();
        assert_eq!(whole_call(&ua, &format!("ov-{n}")), Ok(s2), "call {n}");
        n += 1;
    }
    let seen_at = wall();
    assert_eq!(invites_at_s1(), 1);
    assert_eq!(net.server_field("s1", "down_by"), "overload");
    assert_eq!(net.server_field("s1", "overloads_total"), 1);
    let until = net.server_field("s1", "overloaded_until").as_u64().unwrap();
    // 5 s from the 503, which came between the call's start and now.
    assert!(
        (sent_at + 5_000..=seen_at + 5_005).contains(&until),
        "until {until}: the 503 came between {sent_at} and {seen_at}"
    );
    let metrics = net.http("GET", "/metrics", "").1;
    assert!(
        metrics.contains("siplb_overloaded{server=\"s1\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("siplb_overloads_total{server=\"s1\"} 1"));
    assert!(metrics.contains("siplb_down_by{server=\"s1\",signal=\"overload\"} 1"));
    // During those 5 s: every call whole, on s2; s1 gets no INVITE (one per
    // call would be a retry storm).
    let selected = net.server_field("s1", "selected_total");
    let mut during = 0;
    while wall() + 300 < until && during < 100 {
        assert_eq!(whole_call(&ua, &format!("ov-during-{during}")), Ok(s2));
        during += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(during >= 10, "calls during the overload: {during}");
    assert_eq!(invites_at_s1(), 1, "no INVITE reached s1 while it said 503");
    assert_eq!(net.server_field("s1", "selected_total"), selected);
    // After them: s1 back, ramping up from the slow start floor.
    wait(Duration::from_secs(3), "s1 back", || {
        net.server_field("s1", "state") == "up"
    });
    assert_eq!(net.server_field("s1", "overloaded"), false);
    assert!(net.server_field("s1", "overloaded_until").is_null());
    let factor = net.server_field("s1", "weight_factor").as_f64().unwrap();
    assert!(factor < 0.5, "slow start: weight factor {factor}");
    let (mut at_s1, mut at_s2) = (0, 0);
    for i in 0..60 {
        match whole_call(&ua, &format!("ov-after-{i}")) {
            Ok(p) if p == s1 => at_s1 += 1,
            Ok(p) if p == s2 => at_s2 += 1,
            other => panic!("call {i} after: {other:?}"),
        }
        if at_s1 >= 2 && i >= 20 {
            break;
        }
    }
    assert!(
        at_s1 >= 1,
        "s1 takes calls again: {at_s1} of {}",
        at_s1 + at_s2
    );
    assert!(
        at_s1 < at_s2,
        "ramping, not at once a full share: s1 {at_s1}, s2 {at_s2}"
    );
    assert_eq!(
        invites_at_s1(),
        1 + at_s1,
        "every INVITE s1 got was a call it answered"
    );
    assert_eq!(net.server_field("s1", "overloads_total"), 1);
    let _ = std::fs::remove_file(&logs);
}
