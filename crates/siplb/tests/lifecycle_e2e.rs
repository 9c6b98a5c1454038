//! The balancer's life as systemd and health probes see it, end to end: a
//! real `siplb balancer` process with `NOTIFY_SOCKET` naming a unix datagram
//! socket the test holds (as systemd does for `Type=notify`), `GET /healthz`
//! and `GET /readyz` over plain HTTP/1.1, SIGHUP and SIGTERM sent with
//! `kill`, and real SIP over UDP for a transaction in flight at shutdown.
//!
//! Every port is picked free at run time (the balancer restarted on others
//! if one was taken meanwhile); every wait is bounded; each balancer is
//! killed by its PID when its guard drops.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn siplb_bin() -> PathBuf {
    std::env::var_os("SIPLB_BIN").map_or_else(|| env!("CARGO_BIN_EXE_siplb").into(), PathBuf::from)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A port free now, never handed out before in this test binary (tests run
/// in parallel: one's released port must not become another's).
fn free_port(tcp: bool) -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = if tcp {
            TcpListener::bind("127.0.0.1:0").unwrap().local_addr()
        } else {
            UdpSocket::bind("127.0.0.1:0").unwrap().local_addr()
        }
        .unwrap()
        .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn free_tcp_port() -> u16 {
    free_port(true)
}

fn free_udp_port() -> u16 {
    free_port(false)
}

/// One `GET path` (or another method): the status code and the body;
/// `None` when nothing answers.
fn http(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    raw_http(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        ),
    )
}

/// One request as given: the status code and the body.
fn raw_http(addr: SocketAddr, req: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(req.as_bytes()).ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let code = r.get(9..12)?.parse().ok()?;
    let (_, body) = r.split_once("\r\n\r\n")?;
    Some((code, body.to_owned()))
}

static DIRS: AtomicU32 = AtomicU32::new(0);

/// A `siplb balancer` whose `NOTIFY_SOCKET` is ours.
struct Balancer {
    child: Child,
    admin: SocketAddr,
    sip: SocketAddr,
    dir: PathBuf,
    config: PathBuf,
    notify: UnixDatagram,
}

impl Balancer {
    /// Starts one with `servers` (TOML `[[servers]]` tables) and `perf`
    /// lines, and waits (bounded) until its admin listener answers.
    fn start(servers: &str, perf: &str, policy: &str) -> Balancer {
        Balancer::start_with(servers, perf, policy, "", None)
    }

    /// As `start`, with more `[admin]` lines, and `WATCHDOG_USEC` set (with
    /// `WATCHDOG_PID` its own, as systemd sets them) when `watchdog` is given.
    fn start_with(
        servers: &str,
        perf: &str,
        policy: &str,
        admin_extra: &str,
        watchdog: Option<u64>,
    ) -> Balancer {
        let dir = std::env::temp_dir().join(format!(
            "siplb-life-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&sock_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let config = dir.join("balancer.toml");
        for _ in 0..5 {
            let sip = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
            let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
            let text = format!(
                "[sip]\nlisten = [\"{sip}\"]\ntransports = [\"udp\"]\n\n\
                 [routing]\nsecret = \"lifecycle-e2e-secret-0123456789\"\n\
                 policy = \"{policy}\"\nhealth = \"agent\"\noutlier_failures = 0\n\n\
                 [perf]\nkey_file = \"{}\"\n{perf}\n\n\
                 [admin]\nlisten = \"{admin}\"\n{admin_extra}\n\n{servers}",
                root().join("examples/agent.key").display(),
            );
            std::fs::write(&config, text).unwrap();
            let log = std::fs::File::create(dir.join("balancer.log")).unwrap();
            let mut cmd = match watchdog {
                // The shell's PID is siplb's once it execs.
                Some(usec) => {
                    let mut c = Command::new("sh");
                    c.args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
                        .arg(siplb_bin())
                        .env("WATCHDOG_USEC", usec.to_string());
                    c
                }
                None => {
                    let mut c = Command::new(siplb_bin());
                    c.env_remove("WATCHDOG_USEC").env_remove("WATCHDOG_PID");
                    c
                }
            };
            let child = cmd
                .args(["balancer", "--config"])
                .arg(&config)
                .env("NOTIFY_SOCKET", &sock_path)
                .env("SIPLB_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("siplb balancer");
            let mut lb = Balancer {
                child,
                admin,
                sip,
                dir: dir.clone(),
                config: config.clone(),
                notify: notify.try_clone().unwrap(),
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && lb.child.try_wait().unwrap().is_none() {
                if lb.get("/healthz").is_some() {
                    return lb;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // A port taken meanwhile: try others.
            let _ = lb.child.kill();
            let _ = lb.child.wait();
        }
        panic!("the balancer did not start; log in {}", dir.display());
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http(self.admin, "GET", path)
    }

    fn must(&self, method: &str, path: &str) -> (u16, String) {
        http(self.admin, method, path).unwrap_or_else(|| panic!("no answer to {method} {path}"))
    }

    /// The next notification (bounded: 10 s), as text.
    fn next_notice(&self) -> String {
        let mut buf = [0u8; 4096];
        let n = self
            .notify
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification within 10 s ({e})"));
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// A notification waiting now, if any (taken).
    fn pending_notice(&self) -> Option<String> {
        self.notify.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        let got = self.notify.recv(&mut buf).ok();
        self.notify.set_nonblocking(false).unwrap();
        got.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    /// Waits (bounded: 15 s) for the process to exit.
    fn exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "balancer did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("balancer.log")).unwrap_or_default()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("balancer log ({}):\n{}", self.dir.display(), self.log());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `f` every 10 ms until it holds (bounded by `limit`).
fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn readyz_waits_for_the_agents_and_systemd_hears_ready_reloading_stopping() {
    // An "agent" that accepts and never answers: the balancer waits for it
    // (perf.timeout), so readiness has to wait too.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = silent.local_addr().unwrap();
    let servers = format!(
        "[[servers]]\nid = \"s1\"\naddress = \"127.0.0.1:{}\"\nagent = \"{agent}\"\n",
        free_udp_port()
    );
    let mut lb = Balancer::start(&servers, "timeout = \"2s\"", "adaptive");

    // Starting: alive, not ready, no READY=1; the admin API works already.
    let (code, body) = lb.must("GET", "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"alive\":true"), "{body}");
    let (code, body) = lb.must("GET", "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"phase\":\"starting\""), "{body}");
    assert!(body.contains("0 of 1"), "{body}");
    let (code, body) = lb.must("GET", "/servers");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"agent_state\":\"connecting\""), "{body}");
    let early = lb.pending_notice();
    assert_eq!(early, None, "notified before the agents answered");

    // The agent times out (marked down: data enough to route): ready.
    let ready = lb.next_notice();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready}");
    assert!(ready.contains("STATUS=serving SIP"), "{ready}");
    let (code, body) = lb.must("GET", "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"ready\":true"), "{body}");
    let (code, body) = lb.must("GET", "/servers");
    assert_eq!(code, 200, "{body}");

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    lb.signal("-HUP");
    let reloading = lb.next_notice();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    assert!(
        reloading.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{reloading}"
    );
    let again = lb.next_notice();
    assert!(again.lines().any(|l| l == "READY=1"), "{again}");
    assert!(again.contains("configuration reloaded"), "{again}");

    // POST /reload of a broken file: refused, and READY=1 all the same.
    let good = std::fs::read_to_string(&lb.config).unwrap();
    std::fs::write(&lb.config, good.replace("[routing]", "[routing\n")).unwrap();
    let (code, body) = lb.must("POST", "/reload");
    assert_eq!(code, 400, "{body}");
    let reloading = lb.next_notice();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading}");
    let refused = lb.next_notice();
    assert!(refused.lines().any(|l| l == "READY=1"), "{refused}");
    assert!(refused.contains("reload refused"), "{refused}");
    let (code, _) = lb.must("GET", "/readyz");
    assert_eq!(code, 200);

    // SIGTERM: STOPPING=1, exit 0.
    lb.signal("-TERM");
    let stopping = lb.next_notice();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    assert!(lb.exit().success(), "{}", lb.log());
    // Its socket threads stopped without a panic (they once panicked in
    // std's recv_from on a socket shut for reading).
    assert!(!lb.log().contains("panicked"), "{}", lb.log());
    drop(silent);
}

#[test]
fn readyz_says_stopping_while_a_transaction_finishes() {
    // A SIP server the test plays: it holds the INVITE until told.
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let servers = format!(
        "[[servers]]\nid = \"s1\"\naddress = \"{}\"\n",
        server.local_addr().unwrap()
    );
    let mut lb = Balancer::start(&servers, "", "round-robin");
    assert!(lb.next_notice().contains("READY=1"));
    wait(Duration::from_secs(5), "ready", || {
        lb.get("/readyz").is_some_and(|(c, _)| c == 200)
    });

    let ua = UdpSocket::bind("127.0.0.1:0").unwrap();
    let p = ua.local_addr().unwrap().port();
    let invite = format!(
        "INVITE sip:svc@{lb} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{p};branch=z9hG4bKlife1;rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:ua@127.0.0.1>;tag=ua1\r\nTo: <sip:svc@127.0.0.1>\r\nCall-ID: life-1\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:ua@127.0.0.1:{p}>\r\nContent-Length: 0\r\n\r\n",
        lb = lb.sip
    );
    ua.send_to(invite.as_bytes(), lb.sip).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, from) = server
        .recv_from(&mut buf)
        .expect("the INVITE reaches the server");
    let req = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(req.starts_with("INVITE "), "{req}");

    // SIGTERM with the INVITE unanswered: stopping, not ready, still alive.
    lb.signal("-TERM");
    let stopping = lb.next_notice();
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let (code, body) = lb.must("GET", "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"phase\":\"stopping\""), "{body}");
    let (code, body) = lb.must("GET", "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(
        lb.child.try_wait().unwrap().is_none(),
        "exited with a transaction open"
    );

    // The server answers: the transaction ends, so does the balancer.
    let mut resp = String::from("SIP/2.0 486 Busy Here\r\n");
    for l in req.lines() {
        let name = l.split(':').next().unwrap_or("").to_ascii_lowercase();
        match name.as_str() {
            "via" | "v" | "from" | "f" | "call-id" | "i" | "cseq" => {
                resp.push_str(l);
                resp.push_str("\r\n");
            }
            "to" | "t" => {
                resp.push_str(l);
                resp.push_str(";tag=srv1\r\n");
            }
            _ => {}
        }
    }
    resp.push_str("Content-Length: 0\r\n\r\n");
    server.send_to(resp.as_bytes(), from).unwrap();
    ua.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (n, _) = ua.recv_from(&mut buf).expect("the 486 reaches the UA");
    assert!(buf[..n].starts_with(b"SIP/2.0 486"));
    assert!(lb.exit().success(), "{}", lb.log());
    assert!(!lb.log().contains("panicked"), "{}", lb.log());
}

/// `siplb balancer --check --config FILE` with `edit` applied to
/// examples/local.toml (written beside a copy of its agent key).
fn check(tag: &str, edit: impl Fn(&str) -> String) -> std::process::Output {
    let dir = std::env::temp_dir().join(format!("siplb-check-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(root().join("examples/agent.key"), dir.join("agent.key")).unwrap();
    let text = std::fs::read_to_string(root().join("examples/local.toml")).unwrap();
    let config = dir.join("balancer.toml");
    std::fs::write(&config, edit(&text)).unwrap();
    let out = Command::new(siplb_bin())
        .args(["balancer", "--check", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

#[test]
fn check_validates_without_binding_and_names_the_field() {
    // Its SIP and admin ports are held here: a check that bound them would fail.
    let sip = UdpSocket::bind("127.0.0.1:0").unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let (sip_at, admin_at) = (sip.local_addr().unwrap(), admin.local_addr().unwrap());
    let out = check("ok", |t| {
        t.replace("127.0.0.1:5060", &sip_at.to_string())
            .replace("127.0.0.1:8060", &admin_at.to_string())
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("OK "), "{stdout}");

    for (tag, from, to, field) in [
        (
            "addr",
            "\"127.0.0.1:5082\"",
            "\"127.0.0.1:99999\"",
            "servers[1].address: ",
        ),
        (
            "policy",
            "policy = \"patent\"",
            "policy = \"fastest\"",
            "routing.policy: ",
        ),
        ("unknown", "[perf]", "[perf]\nbogus = 1", "perf.bogus: "),
        (
            "key",
            "key_file = \"agent.key\"",
            "key_file = \"none.key\"",
            "perf.key_file: ",
        ),
        ("syntax", "[sip]", "[sip", "config: "),
    ] {
        let out = check(tag, |t| t.replace(from, to));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{tag}: {stderr}");
        assert!(stderr.contains(field), "{tag}: {stderr}");
        assert!(out.stdout.is_empty(), "{tag}");
        assert!(!stderr.contains("panicked"), "{tag}: {stderr}");
    }
}

#[test]
fn probes_need_no_token_and_no_host_check() {
    // A token for everything, reads included: the probes still pass, the
    // rest is still guarded.
    let servers = format!(
        "[[servers]]\nid = \"s1\"\naddress = \"127.0.0.1:{}\"\n",
        free_udp_port()
    );
    let token_dir = std::env::temp_dir().join(format!("siplb-life-token-{}", std::process::id()));
    std::fs::create_dir_all(&token_dir).unwrap();
    let token = token_dir.join("admin.token");
    std::fs::write(&token, "lifecycle-e2e-token-0123456789abcdef\n").unwrap();
    let admin = format!("token_file = \"{}\"\nauth_reads = true", token.display());
    let lb = Balancer::start_with(&servers, "", "round-robin", &admin, None);
    assert!(lb.next_notice().contains("READY=1"));
    for path in ["/healthz", "/readyz"] {
        let (code, body) = lb.must("GET", path);
        assert_eq!(code, 200, "{path}: {body}");
        // A load balancer's probe: HTTP/1.0, no Host; a kubelet's: any Host.
        for req in [
            format!("GET {path} HTTP/1.0\r\n\r\n"),
            format!("GET {path} HTTP/1.1\r\nHost: 10.1.2.3:8060\r\nConnection: close\r\n\r\n"),
        ] {
            let (code, body) = raw_http(lb.admin, &req).expect("an answer");
            assert_eq!(code, 200, "{req}: {body}");
        }
    }
    let (code, _) = lb.must("GET", "/servers");
    assert_eq!(code, 401, "the rest still needs the token");
    let (code, _) = raw_http(
        lb.admin,
        "GET /servers HTTP/1.1\r\nHost: 10.1.2.3:8060\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert_eq!(code, 403, "and the Host check");
    drop(lb);
    let _ = std::fs::remove_dir_all(&token_dir);
}

#[test]
fn the_watchdog_is_pinged_when_systemd_asks() {
    let servers = format!(
        "[[servers]]\nid = \"s1\"\naddress = \"127.0.0.1:{}\"\n",
        free_udp_port()
    );
    // WatchdogSec=400ms: a ping every 200 ms.
    let mut lb = Balancer::start_with(&servers, "", "round-robin", "", Some(400_000));
    let mut pings = 0;
    let mut ready = false;
    // Bounded: 20 notifications (each within 10 s).
    for _ in 0..20 {
        let n = lb.next_notice();
        ready |= n.lines().any(|l| l == "READY=1");
        if n.lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
            if pings == 3 {
                break;
            }
        }
    }
    assert!(ready, "no READY=1");
    assert_eq!(pings, 3, "WATCHDOG=1 pings");
    lb.signal("-TERM");
    assert!(lb.exit().success(), "{}", lb.log());
}
