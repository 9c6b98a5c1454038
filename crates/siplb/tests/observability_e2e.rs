//! Logs, metrics, the dashboard and the alerting rules against a live
//! balancer: two `siplb agent`s, two SIPp UAS and `siplb balancer
//! --log-format json` on loopback, SIPp calls through it; then its
//! `/metrics` must pass `promtool check metrics` (Debian package
//! `prometheus`) without a word, the INVITE latency histograms must hold
//! the calls, the routing decisions must be JSON lines with `call_id`,
//! `server` and `method` fields, and every `siplb_*` metric that
//! deploy/grafana/siplb.json and deploy/prometheus/siplb-rules.yml query
//! must be in the output. Ports are picked at run time (bound to 0,
//! released, handed over; a setup that loses one starts again). Every
//! process is stopped by its PID (`Proc`'s drop); every wait is bounded.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{Proc, free_port, get, require, root, siplb_bin, spawn};

/// The pool a test runs: ports, folder, processes.
struct Bed {
    dir: PathBuf,
    sip: SocketAddr,
    admin: SocketAddr,
    _procs: Vec<Proc>,
    balancer: Proc,
}

impl Bed {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("balancer.log")).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        let (code, body) = get(self.admin, "/metrics").expect("admin API answers");
        assert_eq!(code, 200, "{body}");
        body
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

/// examples/local.toml on fresh ports, its agents, SIPp UAS and the
/// balancer (JSON logs, debug level), once both servers are up.
fn start(name: &str) -> Result<Bed, String> {
    let dir = std::env::temp_dir().join(format!("siplb-obs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (sip, admin) = (free_port(), free_port());
    let agents = [free_port(), free_port()];
    let servers = [free_port(), free_port()];
    let mut cfg = std::fs::read_to_string(root().join("examples/local.toml")).unwrap();
    let key = root().join("examples/agent.key");
    cfg = cfg.replace(
        "key_file = \"agent.key\"",
        &format!("key_file = \"{}\"", key.display()),
    );
    for (fixed, port) in [
        (5060, sip),
        (8060, admin),
        (7071, agents[0]),
        (7072, agents[1]),
        (5081, servers[0]),
        (5082, servers[1]),
    ] {
        let from = format!(":{fixed}\"");
        assert!(cfg.contains(&from), "examples/local.toml has no {from}");
        cfg = cfg.replace(&from, &format!(":{port}\""));
    }
    let config = dir.join("siplb.toml");
    std::fs::write(&config, cfg).unwrap();
    let mut procs = Vec::new();
    for (i, port) in agents.iter().enumerate() {
        procs.push(spawn(
            Command::new(siplb_bin()).args([
                "agent",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--key-file",
                "examples/agent.key",
                "--interval",
                "100ms",
                "--synthetic",
                "cpu=20%,mem=1GB",
                "--log-format",
                "json",
            ]),
            &dir.join(format!("agent{i}.log")),
        ));
    }
    for (i, port) in servers.iter().enumerate() {
        procs.push(spawn(
            Command::new("sipp").args([
                "-sn",
                "uas",
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-nostdin",
                "-timeout",
                "60",
            ]),
            &dir.join(format!("uas{i}.log")),
        ));
    }
    let mut balancer = spawn(
        Command::new(siplb_bin())
            .env("SIPLB_LOG", "debug")
            .args(["balancer", "--log-format", "json", "--config"])
            .arg(&config),
        &dir.join("balancer.log"),
    );
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let start = Instant::now();
    loop {
        if let Some(status) = balancer.0.try_wait().unwrap() {
            return Err(format!("balancer exited ({status})"));
        }
        for p in &mut procs {
            if let Some(status) = p.0.try_wait().unwrap() {
                return Err(format!("an agent or a UAS exited ({status})"));
            }
        }
        let up = get(admin, "/servers").is_some_and(|(_, b)| {
            serde_json::from_str::<serde_json::Value>(&b).is_ok_and(|v| {
                v.as_array()
                    .is_some_and(|a| a.len() == 2 && a.iter().all(|s| s["state"] == "up"))
            })
        });
        if up {
            break;
        }
        if start.elapsed() > Duration::from_secs(15) {
            return Err("both servers not up within 15 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Bed {
        dir,
        sip: SocketAddr::from(([127, 0, 0, 1], sip)),
        admin,
        _procs: procs,
        balancer,
    })
}

fn bed(name: &str) -> Bed {
    let mut why = String::new();
    for attempt in 1..=3 {
        match start(name) {
            Ok(b) => return b,
            Err(e) => {
                eprintln!("{name}: setup {attempt} failed ({e}); again on other ports");
                why = e;
            }
        }
    }
    panic!("{name}: no setup in 3 attempts; the last: {why}");
}

/// SIPp's built-in UAC: `calls` calls through the balancer, all successful.
fn calls(target: SocketAddr, calls: u32) -> Output {
    let out = Command::new("sipp")
        .args(["-sn", "uac", &target.to_string(), "-i", "127.0.0.1"])
        .args(["-p", &free_port().to_string(), "-nostdin"])
        .args(["-r", "50", "-m", &calls.to_string(), "-timeout", "30"])
        .output()
        .expect("sipp");
    assert!(
        out.status.success(),
        "SIPp: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

/// Runs `promtool args...` with `input` on its stdin (when given): its exit
/// status and everything it wrote.
fn promtool(args: &[&str], input: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    if let Some(text) = input {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The metric families of a Prometheus text exposition (from `# TYPE`),
/// with each histogram's `_bucket`, `_sum` and `_count` series too.
fn families(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let mut f = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (f.next(), f.next(), f.next(), f.next())
        {
            names.insert(name.to_owned());
            if kind == "histogram" {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
        }
    }
    names
}

/// Every `siplb_...` name in `text` (expressions of the dashboard and the
/// rules).
fn queried(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("siplb_") {
        let s = i + at;
        let before_ok = s == 0 || !(b[s - 1].is_ascii_alphanumeric() || b[s - 1] == b'_');
        let mut e = s + "siplb_".len();
        while e < b.len() && (b[e].is_ascii_lowercase() || b[e].is_ascii_digit() || b[e] == b'_') {
            e += 1;
        }
        if before_ok && e > s + "siplb_".len() {
            names.insert(text[s..e].to_owned());
        }
        i = e;
    }
    names
}

/// The sum over servers of a histogram's `_count` (or any per-server series).
fn total(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{series}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_pass_promtool_and_hold_latencies_logs_are_json_and_the_dashboard_queries_exist() {
    require("sipp", "sip-tester");
    require("promtool", "prometheus");
    let mut bed = bed("live");
    calls(bed.sip, 20);
    let metrics = bed.metrics();

    // Prometheus' own linter, on the whole output of a balancer with traffic.
    let (ok, lint) = promtool(&["check", "metrics"], Some(&metrics));
    assert!(
        ok && lint.trim().is_empty(),
        "promtool check metrics:\n{lint}\n{metrics}"
    );

    // Build info, and the latency of every INVITE: first and final response.
    assert!(
        metrics.contains(&format!(
            "siplb_build_info{{version=\"{}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    for h in [
        "siplb_invite_first_response_seconds",
        "siplb_invite_final_response_seconds",
    ] {
        assert_eq!(total(&metrics, &format!("{h}_count")), 20.0, "{metrics}");
        // Per server: cumulative buckets, non-decreasing, +Inf the count.
        for server in ["s1", "s2"] {
            let tag = format!("{h}_bucket{{server=\"{server}\",");
            let counts: Vec<f64> = metrics
                .lines()
                .filter(|l| l.starts_with(&tag))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .collect();
            assert_eq!(counts.len(), 15, "{metrics}");
            assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{metrics}");
            let count_line = format!("{h}_count{{server=\"{server}\"}} ");
            let count: f64 = metrics
                .lines()
                .find_map(|l| l.strip_prefix(&count_line)?.parse().ok())
                .expect("a count per server");
            assert_eq!(counts.last(), Some(&count), "{metrics}");
        }
    }
    // The agents' data per server: CPU (synthetic 20 %) and its age.
    assert!(
        metrics.contains("siplb_server_cpu_ratio{server=\"s1\"} 0.2"),
        "{metrics}"
    );
    assert!(total(&metrics, "siplb_server_sample_age_seconds") < 30.0);

    // Routing decisions as JSON lines, the fields their own keys.
    let log = bed.log();
    let selected: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "selected")
        .collect();
    assert_eq!(selected.len(), 20, "{log}");
    for v in &selected {
        assert_eq!(v["method"], "INVITE", "{v}");
        assert!(v["server"] == "s1" || v["server"] == "s2", "{v}");
        assert!(v["call_id"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
    }
    assert!(
        log.lines()
            .all(|l| l.trim().is_empty() || serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "a line that is not JSON:\n{log}"
    );

    // The agents' logs too (`agent listening` with its `listen` field).
    let agent = std::fs::read_to_string(bed.dir.join("agent0.log")).unwrap();
    let first: serde_json::Value = serde_json::from_str(agent.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("agent log not JSON ({e}):\n{agent}"));
    assert_eq!(first["message"], "agent listening", "{agent}");
    assert!(first["listen"].is_string(), "{agent}");

    // Every metric the dashboard and the rules query, in the live output.
    let have = families(&metrics);
    let dashboard = std::fs::read_to_string(root().join("deploy/grafana/siplb.json")).unwrap();
    let rules = std::fs::read_to_string(root().join("deploy/prometheus/siplb-rules.yml")).unwrap();
    for (file, text) in [("dashboard", &dashboard), ("rules", &rules)] {
        let wanted = queried(text);
        assert!(wanted.len() >= 8, "{file} queries {wanted:?}");
        let missing: Vec<&String> = wanted.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "the {file} queries metrics /metrics does not have: {missing:?}"
        );
    }

    let _ = bed.balancer.0.kill();
    let _ = bed.balancer.0.wait();
}

#[test]
fn the_dashboard_is_grafana_json_and_the_rules_pass_promtool() {
    require("promtool", "prometheus");
    let text = std::fs::read_to_string(root().join("deploy/grafana/siplb.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    for field in ["uid", "title"] {
        assert!(
            d[field].as_str().is_some_and(|s| !s.is_empty()),
            "dashboard {field}"
        );
    }
    assert!(d["schemaVersion"].as_u64().is_some(), "schemaVersion");
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "{title}: id twice"
        );
        assert!(p["type"].is_string(), "{title}: type");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].as_u64().is_some(), "{title}: gridPos.{k}");
        }
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no target");
        for t in targets {
            let expr = t["expr"].as_str().expect("target expr");
            assert!(expr.contains("siplb_"), "{title}: {expr}");
            assert!(t["refId"].is_string(), "{title}: refId");
        }
    }
    // Every panel's query is PromQL that Prometheus parses: written, with
    // Grafana's variables given values, as recording rules for promtool.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for p in panels {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5m")
                .replace("$__range", "1h")
                .replace("$instance", ".*");
            n += 1;
            rules.push_str(&format!(
                "      - record: dashboard:query_{n}\n        expr: {}\n",
                serde_json::Value::String(expr)
            ));
        }
    }
    let file = std::env::temp_dir().join(format!("siplb-dashboard-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let (ok, out) = promtool(&["check", "rules", file.to_str().unwrap()], None);
    let _ = std::fs::remove_file(&file);
    assert!(ok, "a dashboard query Prometheus does not parse:\n{out}");

    // Syntax and semantics of the rules, then their unit tests.
    let (ok, out) = promtool(
        &["check", "rules", "deploy/prometheus/siplb-rules.yml"],
        None,
    );
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(
        &["test", "rules", "deploy/prometheus/siplb-rules.test.yml"],
        None,
    );
    assert!(ok, "promtool test rules:\n{out}");
}

#[test]
fn queried_names_are_found_whole() {
    let q = queried(
        "histogram_quantile(0.99, sum by (le) (rate(siplb_invite_final_response_seconds_bucket[5m]))) / x_siplb_no + siplb_up",
    );
    assert_eq!(
        q.into_iter().collect::<Vec<_>>(),
        ["siplb_invite_final_response_seconds_bucket", "siplb_up"]
    );
}
