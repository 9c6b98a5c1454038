//! The admin API's guard end to end: one real `siplb balancer` process per
//! test (two servers without agents, `policy = "round-robin"`, so no other
//! process), and plain HTTP/1.1 on a TCP socket, so every header is ours to
//! forge: the bearer token (`admin.token_file`, `admin.auth_reads`), the
//! `Host` check (DNS rebinding), the `Origin` check (cross-site requests),
//! `siplb_admin_refused_total`, the warning about a listener beyond loopback
//! without a token, and `siplb status` sending the token.
//!
//! Every port is picked free at run time (and the balancer restarted on
//! others if one was taken meanwhile), so the tests run in parallel; every
//! wait is bounded; each balancer is killed by its PID when its guard drops.
//! `SIPLB_BIN=PATH` runs the same tests against another build of `siplb`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const TOKEN: &str = "admin-e2e-token-0123456789abcdef";
const OTHER_TOKEN: &str = "admin-e2e-other-token-fedcba9876543210";

fn siplb_bin() -> PathBuf {
    std::env::var_os("SIPLB_BIN").map_or_else(|| env!("CARGO_BIN_EXE_siplb").into(), PathBuf::from)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A port free now on `ip` (bound, read, released).
fn free_tcp_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP answer: status, head (lower case) and body.
#[derive(Debug)]
struct Answer {
    code: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The value of header `name` (lower case), if present.
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n.trim() == name).then(|| v.trim())
        })
    }
}

/// One HTTP/1.1 request to `addr`. `Host: addr` unless `headers` has a
/// `Host`; `None` when nothing answers.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<Answer> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str(&format!(
        "Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(req.as_bytes()).ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let code = r.get(9..12)?.parse().ok()?;
    let (head, rest) = r.split_once("\r\n\r\n")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // One chunk, then the last.
        let (len, tail) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(len.trim(), 16).ok()?;
        tail.get(..n)?.to_owned()
    } else {
        rest.to_owned()
    };
    Some(Answer {
        code,
        head: head.to_ascii_lowercase(),
        body,
    })
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

static DIRS: AtomicU32 = AtomicU32::new(0);

/// One `siplb balancer` with its config, token file and log in a temp folder.
#[derive(Debug)]
struct Balancer {
    child: Child,
    admin: SocketAddr,
    dir: PathBuf,
    config: PathBuf,
}

impl Balancer {
    /// A balancer whose `[admin]` is `listen` on 127.0.0.1 plus `admin`
    /// lines; `admin.token` in its folder holds [`TOKEN`].
    fn start(admin: &str) -> Balancer {
        Balancer::start_on("127.0.0.1", admin)
    }

    /// As `start`, the admin API listening on `ip` (e.g. `0.0.0.0`).
    fn start_on(ip: &str, admin: &str) -> Balancer {
        let dir = std::env::temp_dir().join(format!(
            "siplb-admin-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("admin.token"), format!("{TOKEN}\n")).unwrap();
        let config = dir.join("balancer.toml");
        for _ in 0..5 {
            let sip = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
            let listen = SocketAddr::new(ip.parse().unwrap(), free_tcp_port(ip));
            let text = format!(
                "[sip]\nlisten = [\"{sip}\"]\ntransports = [\"udp\"]\n\n\
                 [routing]\nsecret = \"admin-e2e-secret-0123456789\"\n\
                 policy = \"round-robin\"\nhealth = \"agent\"\noutlier_failures = 0\n\n\
                 [perf]\nkey_file = \"{}\"\n\n\
                 [admin]\nlisten = \"{listen}\"\n{admin}\n\n\
                 [[servers]]\nid = \"s1\"\naddress = \"127.0.0.1:{}\"\n\n\
                 [[servers]]\nid = \"s2\"\naddress = \"127.0.0.1:{}\"\n",
                root().join("examples/agent.key").display(),
                free_udp_port(),
                free_udp_port(),
            );
            std::fs::write(&config, text).unwrap();
            // The admin API is reached on loopback, also behind a wildcard.
            let admin = if listen.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], listen.port()))
            } else {
                listen
            };
            let mut lb = Balancer {
                child: Balancer::spawn(&dir, &config),
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
            .env("SIPLB_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("siplb balancer")
    }

    /// Waits (bounded) until the admin API answers anything; `false` when
    /// the process exited.
    fn ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            // Serving SIP, not merely answering HTTP: the admin API is up a
            // few milliseconds before the start phase ends (even with no
            // agent to wait for), and /readyz says "starting" until then.
            if self
                .req("GET", "/readyz", &[])
                .is_some_and(|a| a.json()["phase"] != "starting")
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn req(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Option<Answer> {
        http(self.admin, method, path, headers, "")
    }

    /// A request that must be answered.
    fn must(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.req(method, path, headers)
            .unwrap_or_else(|| panic!("no answer to {method} {path}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("balancer.log")).unwrap_or_default()
    }

    /// `siplb_admin_refused_total{reason}` (read with the token, which is
    /// ignored when none is configured).
    fn refused(&self, reason: &str) -> u64 {
        let auth = bearer(TOKEN);
        let m = self.must("GET", "/metrics", &[("Authorization", &auth)]);
        assert_eq!(m.code, 200, "{}", m.body);
        let line = format!("siplb_admin_refused_total{{reason=\"{reason}\"}} ");
        m.body
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line} in\n{}", m.body))
            .parse()
            .unwrap()
    }

    /// `siplb status ARGS`.
    fn status(&self, args: &[&str]) -> Output {
        Command::new(siplb_bin())
            .arg("status")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("siplb status")
    }

    fn drained(&self, id: &str, headers: &[(&str, &str)]) -> bool {
        let a = self.must("GET", "/servers", headers);
        assert_eq!(a.code, 200, "{}", a.body);
        let v = a.json();
        let s = v
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("no server {id} in {v}"));
        s["state"] == "drained"
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
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

#[test]
fn without_a_token_reads_and_writes_work_from_loopback() {
    let lb = Balancer::start("");
    let a = lb.must("GET", "/servers", &[]);
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(a.json().as_array().unwrap().len(), 2);

    let a = lb.must("POST", "/servers/s1/drain", &[]);
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(a.json()["drained"], true);
    assert!(lb.drained("s1", &[]));
    // localhost on the admin port is this listener too, and a token sent
    // to a balancer that has none is ignored.
    let host = format!("localhost:{}", lb.admin.port());
    let auth = bearer(OTHER_TOKEN);
    let a = lb.must(
        "POST",
        "/servers/s1/undrain",
        &[("Host", &host), ("Authorization", &auth)],
    );
    assert_eq!(a.code, 200, "{}", a.body);
    assert!(!lb.drained("s1", &[]));

    let a = lb.must("PUT", "/policy", &[]);
    assert_eq!(a.code, 400, "an empty body is a bad one, past the guard");
    let out = lb.status(&["--admin", &lb.admin.to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("s1"),
        "{out:?}"
    );

    assert_eq!(lb.refused("missing_token"), 0);
    assert!(
        !lb.log().contains("beyond loopback"),
        "a loopback listener is not warned about"
    );
}

#[test]
fn with_a_token_writes_need_it() {
    let lb = Balancer::start("token_file = \"admin.token\"");
    let right = bearer(TOKEN);
    let wrong = bearer(OTHER_TOKEN);

    let a = lb.must("POST", "/servers/s1/drain", &[]);
    assert_eq!(a.code, 401, "{}", a.body);
    assert!(
        a.header("www-authenticate")
            .is_some_and(|v| v.starts_with("bearer")),
        "{}",
        a.head
    );
    assert_eq!(a.json()["reason"], "missing_token");
    assert!(a.json()["error"].is_string());

    let a = lb.must("POST", "/servers/s1/drain", &[("Authorization", &wrong)]);
    assert_eq!(a.code, 401, "{}", a.body);
    assert!(
        a.header("www-authenticate")
            .is_some_and(|v| v.starts_with("bearer") && v.contains("invalid_token")),
        "{}",
        a.head
    );
    assert_eq!(a.json()["reason"], "bad_token");
    let a = lb.must(
        "POST",
        "/servers/s1/drain",
        &[("Authorization", "Basic YWRtaW46YWRtaW4=")],
    );
    assert_eq!(a.code, 401, "{}", a.body);
    // A prefix of the token, and the token with more after it.
    let short = bearer(&TOKEN[..TOKEN.len() - 1]);
    let long = bearer(&format!("{TOKEN}x"));
    for t in [&short, &long] {
        let a = lb.must("POST", "/servers/s1/drain", &[("Authorization", t)]);
        assert_eq!(a.code, 401, "{t}: {}", a.body);
    }
    assert!(!lb.drained("s1", &[]), "refused requests changed nothing");

    let a = lb.must("POST", "/servers/s1/drain", &[("Authorization", &right)]);
    assert_eq!(a.code, 200, "{}", a.body);
    assert!(lb.drained("s1", &[]));

    // Every state-changing endpoint needs it.
    for (method, path) in [
        ("POST", "/servers/s1/undrain"),
        ("PUT", "/scoring"),
        ("PUT", "/policy"),
        ("POST", "/reload"),
    ] {
        let a = lb.must(method, path, &[]);
        assert_eq!(a.code, 401, "{method} {path}: {}", a.body);
    }
    let a = lb.must("POST", "/reload", &[("Authorization", &right)]);
    assert_eq!(a.code, 200, "{}", a.body);

    // Reads do not (auth_reads = false), but a wrong token is still wrong.
    for path in ["/servers", "/policy", "/scoring", "/metrics", "/"] {
        let a = lb.must("GET", path, &[]);
        assert_eq!(a.code, 200, "GET {path}: {}", a.body);
    }
    let a = lb.must("GET", "/servers", &[("Authorization", &wrong)]);
    assert_eq!(a.code, 401, "{}", a.body);

    assert_eq!(lb.refused("missing_token"), 6);
    assert_eq!(lb.refused("bad_token"), 4);
    assert_eq!(lb.refused("host"), 0);
    assert!(
        !lb.log().contains(TOKEN),
        "the token is not written in the log"
    );
}

#[test]
fn auth_reads_protects_reads_too() {
    let lb = Balancer::start("token_file = \"admin.token\"\nauth_reads = true");
    let right = bearer(TOKEN);
    for path in ["/servers", "/metrics", "/policy"] {
        let a = lb.must("GET", path, &[]);
        assert_eq!(a.code, 401, "GET {path}: {}", a.body);
        let a = lb.must("GET", path, &[("Authorization", &right)]);
        assert_eq!(a.code, 200, "GET {path}: {}", a.body);
    }
    let a = lb.must("POST", "/servers/s2/drain", &[("Authorization", &right)]);
    assert_eq!(a.code, 200, "{}", a.body);
    assert!(lb.drained("s2", &[("Authorization", &right)]));
}

#[test]
fn a_forged_host_or_a_foreign_origin_is_refused() {
    let lb =
        Balancer::start("token_file = \"admin.token\"\nallowed_hosts = [\"lb1.mgmt.example\"]");
    let port = lb.admin.port();
    let right = bearer(TOKEN);
    let evil = format!("evil.example:{port}");

    // DNS rebinding: the attacker's name resolving to us; even with the token.
    for (method, path) in [("GET", "/servers"), ("POST", "/servers/s1/drain")] {
        let a = lb.must(method, path, &[("Host", &evil), ("Authorization", &right)]);
        assert_eq!(a.code, 403, "{method} {path}: {}", a.body);
        assert_eq!(a.json()["reason"], "host");
    }
    for host in ["evil.example", "127.0.0.1:1", "x"] {
        let a = lb.must("GET", "/servers", &[("Host", host)]);
        assert_eq!(a.code, 403, "Host: {host}: {}", a.body);
    }
    // Names listed in admin.allowed_hosts are accepted, on any port.
    let listed = format!("lb1.mgmt.example:{port}");
    let a = lb.must("GET", "/servers", &[("Host", &listed)]);
    assert_eq!(a.code, 200, "{}", a.body);

    // A cross-site request from a browser: its Origin is not our Host.
    for origin in [
        "http://evil.example",
        &format!("http://evil.example:{port}"),
        &format!("http://127.0.0.1:{}", port.wrapping_add(1)),
        "null",
    ] {
        let a = lb.must(
            "POST",
            "/servers/s1/drain",
            &[("Origin", origin), ("Authorization", &right)],
        );
        assert_eq!(a.code, 403, "Origin: {origin}: {}", a.body);
        assert_eq!(a.json()["reason"], "origin");
    }
    let a = lb.must("GET", "/servers", &[("Origin", "http://evil.example")]);
    assert_eq!(a.code, 403, "{}", a.body);
    assert!(!lb.drained("s1", &[]), "refused requests changed nothing");

    // Same origin (a page served by the admin API itself) is fine.
    let own = format!("http://{}", lb.admin);
    let a = lb.must(
        "POST",
        "/servers/s1/drain",
        &[("Origin", &own), ("Authorization", &right)],
    );
    assert_eq!(a.code, 200, "{}", a.body);

    assert_eq!(lb.refused("host"), 5);
    assert_eq!(lb.refused("origin"), 5);
}

#[test]
fn siplb_status_sends_the_token_of_the_config() {
    // auth_reads, so that the GETs of `siplb status` need the token too.
    let lb = Balancer::start("token_file = \"admin.token\"\nauth_reads = true");
    let config = lb.config.to_str().unwrap().to_owned();

    let out = lb.status(&["--config", &config]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("policy: round-robin") && stdout.contains("s1") && stdout.contains("s2"),
        "{stdout}"
    );

    let admin = lb.admin.to_string();
    let out = lb.status(&["--admin", &admin]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("--token-file"),
        "{stderr}"
    );

    let token = lb.dir.join("admin.token");
    let token = token.to_str().unwrap();
    let out = lb.status(&["--admin", &admin, "--token-file", token]);
    assert!(out.status.success(), "{out:?}");

    let other = lb.dir.join("other.token");
    std::fs::write(&other, OTHER_TOKEN).unwrap();
    let out = lb.status(&["--config", &config, "--token-file", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "--token-file wins: {out:?}");

    let short = lb.dir.join("short.token");
    std::fs::write(&short, "short").unwrap();
    let out = lb.status(&["--admin", &admin, "--token-file", short.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn the_token_file_is_reread_on_reload() {
    let lb = Balancer::start("token_file = \"admin.token\"");
    let old = bearer(TOKEN);
    let new = bearer(OTHER_TOKEN);
    std::fs::write(lb.dir.join("admin.token"), OTHER_TOKEN).unwrap();
    let a = lb.must("POST", "/reload", &[("Authorization", &old)]);
    assert_eq!(a.code, 200, "{}", a.body);
    let a = lb.must("POST", "/servers/s1/drain", &[("Authorization", &old)]);
    assert_eq!(a.code, 401, "{}", a.body);
    let a = lb.must("POST", "/servers/s1/drain", &[("Authorization", &new)]);
    assert_eq!(a.code, 200, "{}", a.body);

    // A token file made unfit refuses the reload: the token in force stays.
    std::fs::write(lb.dir.join("admin.token"), "short").unwrap();
    let a = lb.must("POST", "/reload", &[("Authorization", &new)]);
    assert_eq!(a.code, 400, "{}", a.body);
    assert!(a.body.contains("admin.token_file"), "{}", a.body);
    let a = lb.must("POST", "/servers/s1/undrain", &[("Authorization", &new)]);
    assert_eq!(a.code, 200, "{}", a.body);
}

#[test]
fn a_listener_beyond_loopback_without_a_token_is_warned_about() {
    let lb = Balancer::start_on("0.0.0.0", "");
    let log = lb.log();
    let listen = format!("0.0.0.0:{}", lb.admin.port());
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains(&format!("admin.listen is {listen}"))
            && l.contains("without admin.token_file")
            && l.contains("anyone who reaches it can drain servers and reload")),
        "{log}"
    );
    // Behind a wildcard, the address a connection came in on is its Host.
    let a = lb.must("POST", "/servers/s1/drain", &[]);
    assert_eq!(a.code, 200, "{}", a.body);
    let a = lb.must("GET", "/servers", &[("Host", "0.0.0.0")]);
    assert_eq!(a.code, 403, "{}", a.body);
    // siplb status --config reaches a wildcard listener on loopback.
    let out = lb.status(&["--config", lb.config.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");

    // With a token, no warning.
    let lb = Balancer::start_on("0.0.0.0", "token_file = \"admin.token\"");
    assert!(!lb.log().contains("beyond loopback"), "{}", lb.log());
}

#[test]
fn the_whole_instance_drains_with_the_token_and_says_what_it_still_carries() {
    let lb = Balancer::start("token_file = \"admin.token\"");
    let right = bearer(TOKEN);
    let a = lb.must("POST", "/drain", &[]);
    assert_eq!(a.code, 401, "a write like the others: {}", a.body);
    let a = lb.must("GET", "/drain", &[]);
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(a.json()["drained"], false);

    let a = lb.must("POST", "/drain", &[("Authorization", &right)]);
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(a.json()["drained"], true);
    assert_eq!(a.json()["sessions"], 0);
    assert_eq!(a.json()["transactions"], 0);
    let m = lb.must("GET", "/metrics", &[]);
    assert!(m.body.contains("\nsiplb_draining 1\n"), "{}", m.body);
    // The VIP's or the DNS pool's health check takes a drained instance out.
    let r = lb.must("GET", "/readyz", &[]);
    assert_eq!(r.code, 503, "{}", r.body);
    assert_eq!(r.json()["drained"], true, "{}", r.body);

    let a = lb.must("POST", "/undrain", &[("Authorization", &right)]);
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(a.json()["drained"], false);
    let m = lb.must("GET", "/metrics", &[]);
    assert!(m.body.contains("\nsiplb_draining 0\n"), "{}", m.body);
    let r = lb.must("GET", "/readyz", &[]);
    assert_eq!(r.code, 200, "{}", r.body);
}
