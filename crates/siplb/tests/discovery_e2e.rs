//! Destinations by name, end to end: `siplb balancer` follows a DNS SRV
//! name and a server written `host:port`, asked of a real DNS server on
//! loopback (dnsmasq, Debian package dnsmasq-base) that the test starts,
//! changes (a restart with other records) and stops; the SIP servers are
//! SIPp's built-in UAS, the calls SIPp's built-in UAC. Every process is
//! stopped by its PID (the guard's drop); every wait is bounded.

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// A port free for UDP and TCP at 127.0.0.1 now (released for a process).
fn free_port() -> u16 {
    for _ in 0..100 {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in 100 tries");
}

fn wait(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn require(tool: &str, package: &str) {
    assert!(
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "{tool} is required: apt-get install {package}"
    );
}

/// dnsmasq on 127.0.0.1:`port` answering only `records` (its own options:
/// `--srv-host=...`, `--host-record=...`), TTL 1 s, nothing else.
fn dnsmasq(port: u16, records: &[String], log: &Path) -> Proc {
    let p = Proc(
        Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--local-ttl=1",
                "--pid-file",
                "--log-facility=-",
                &format!("--port={port}"),
            ])
            .args(records)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("dnsmasq (Debian package dnsmasq-base)"),
    );
    // Up once it answers a query for one of its names.
    p
}

fn sipp_uas(port: u16, log: &Path) -> Proc {
    Proc(
        Command::new("sipp")
            .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-nostdin", "-timeout", "120"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("sipp (Debian package sip-tester)"),
    )
}

/// `calls` calls of SIPp's built-in UAC through the balancer; (ok, failed).
fn uac(sip: u16, calls: u32) -> (u32, u32, String) {
    let out = Command::new("sipp")
        .args(["-sn", "uac", &format!("127.0.0.1:{sip}"), "-i", "127.0.0.1"])
        .args(["-p", &free_port().to_string(), "-nostdin"])
        .args(["-m", &calls.to_string(), "-r", "20", "-timeout", "60"])
        .output()
        .expect("sipp");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let count = |label: &str| {
        text.lines()
            .rfind(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split('|').nth(2))
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0)
    };
    (count("Successful call"), count("Failed call"), text)
}

/// `GET path` on the admin API: the body.
fn get(admin: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", admin)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    Some(r.split_once("\r\n\r\n")?.1.to_owned())
}

fn servers(admin: u16) -> Vec<serde_json::Value> {
    get(admin, "/servers")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn field(admin: u16, id: &str, name: &str) -> serde_json::Value {
    servers(admin)
        .into_iter()
        .find(|s| s["id"] == id)
        .map_or(serde_json::Value::Null, |s| s[name].clone())
}

#[test]
fn members_follow_dns_srv_and_a_name_and_stay_when_dns_fails() {
    require("dnsmasq", "dnsmasq-base");
    require("sipp", "sip-tester");
    let dir = std::env::temp_dir().join(format!("siplb-e2e-discovery-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (dns, sip, admin) = (free_port(), free_port(), free_port());
    let (pa, pb, pc, pn) = (free_port(), free_port(), free_port(), free_port());
    let _uas: Vec<Proc> = [pa, pb, pc, pn]
        .iter()
        .map(|&p| sipp_uas(p, &dir.join(format!("uas-{p}.log"))))
        .collect();
    let records = |targets: &[(&str, u16)]| -> Vec<String> {
        let mut r: Vec<String> = targets
            .iter()
            .map(|(t, p)| format!("--srv-host=_sip._udp.pool.test,{t}.pool.test,{p},0,10"))
            .collect();
        for h in ["a", "b", "c", "n"] {
            r.push(format!("--host-record={h}.pool.test,127.0.0.1"));
        }
        r
    };
    let mut dnsmasq_p = Some(dnsmasq(
        dns,
        &records(&[("a", pa), ("b", pb)]),
        &dir.join("dns1.log"),
    ));
    let key = root().join("examples/agent.key");
    let cfg = format!(
        r#"[sip]
listen = ["127.0.0.1:{sip}"]
transports = ["udp"]
[routing]
secret = "discovery-e2e-secret-0123456789"
policy = "round-robin"
[perf]
key_file = "{key}"
[admin]
listen = "127.0.0.1:{admin}"
[dns]
nameservers = ["127.0.0.1:{dns}"]
min_ttl = "1s"
max_ttl = "2s"
[[discover]]
id = "pool"
name = "_sip._udp.pool.test"
[[servers]]
id = "named"
address = "n.pool.test:{pn}"
"#,
        key = key.display()
    );
    let config = dir.join("discovery.toml");
    std::fs::write(&config, cfg).unwrap();
    let log = dir.join("balancer.log");
    let _lb = Proc(
        Command::new(env!("CARGO_BIN_EXE_siplb"))
            .args(["balancer", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("siplb"),
    );
    let (a, b, c) = (
        format!("pool-a-pool-test-{pa}"),
        format!("pool-b-pool-test-{pb}"),
        format!("pool-c-pool-test-{pc}"),
    );
    let log_tail = || std::fs::read_to_string(&log).unwrap_or_default();
    // The SRV's two targets and the named server join the pool.
    wait(Duration::from_secs(15), "three members up", || {
        let v = servers(admin);
        [&a, &b, &"named".to_owned()]
            .iter()
            .all(|id| v.iter().any(|s| s["id"] == **id && s["state"] == "up"))
    });
    assert_eq!(field(admin, &a, "address"), format!("127.0.0.1:{pa}"));
    assert_eq!(field(admin, &a, "source"), "pool");
    assert_eq!(field(admin, "named", "address"), format!("127.0.0.1:{pn}"));
    let (ok, failed, text) = uac(sip, 30);
    assert_eq!((ok, failed), (30, 0), "{text}\n{}", log_tail());
    for id in [&a, &b, &"named".to_owned()] {
        let n = field(admin, id, "selected_total").as_u64().unwrap();
        assert!(n >= 5, "{id} got calls: {n}");
    }

    // New records: b gone, c there. After the TTL c is a member and b retires.
    drop(dnsmasq_p.take());
    dnsmasq_p = Some(dnsmasq(
        dns,
        &records(&[("a", pa), ("c", pc)]),
        &dir.join("dns2.log"),
    ));
    wait(Duration::from_secs(15), "c in, b retiring", || {
        field(admin, &c, "state") == "up" && field(admin, &b, "state") == "retiring"
    });
    let b_before = field(admin, &b, "selected_total");
    let (ok, failed, text) = uac(sip, 30);
    assert_eq!((ok, failed), (30, 0), "{text}");
    assert_eq!(
        field(admin, &b, "selected_total"),
        b_before,
        "no new call to a retiring member"
    );
    assert!(field(admin, &c, "selected_total").as_u64().unwrap() >= 5);

    // DNS down: the failures are counted, the last answer stays.
    drop(dnsmasq_p.take());
    let failures = || {
        get(admin, "/metrics")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("siplb_dns_failures_total{source=\"pool\"} "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    wait(Duration::from_secs(20), "a failed resolution", || {
        failures() >= 1
    });
    for id in [&a, &c] {
        assert_eq!(field(admin, id, "state"), "up", "{id} kept");
    }
    let metrics = get(admin, "/metrics").unwrap();
    assert!(
        metrics.contains("siplb_dns_members{source=\"pool\",state=\"member\"} 2"),
        "{metrics}"
    );
    let (ok, failed, text) = uac(sip, 12);
    assert_eq!((ok, failed), (12, 0), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
