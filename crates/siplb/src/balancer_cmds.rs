//! `siplb balancer` and `siplb status`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tracing::error;

/// Runs `siplb balancer --config FILE`; a bad config is one line naming the field, exit 2.
pub fn balancer(path: PathBuf) -> ExitCode {
    let cfg = match balancer::config::Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("siplb: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("siplb: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(balancer::service::run(path, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "balancer failed");
            eprintln!("siplb: {e}");
            ExitCode::from(1)
        }
    }
}

/// A plain HTTP/1.1 GET on loopback; the admin API is ours, so no client crate.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let (head, rest) = body.split_once("\r\n\r\n").unwrap_or((&body, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(
            head.lines().next().unwrap_or("no answer").to_owned(),
        ));
    }
    // Small JSON bodies come unchunked or as one chunk; strip chunk framing if present.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut r = rest;
        while let Some((len, tail)) = r.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            r = tail[n..].trim_start_matches("\r\n");
        }
        return Ok(out);
    }
    Ok(rest.to_owned())
}

/// Runs `siplb status`.
pub fn status(admin: SocketAddr) -> ExitCode {
    let body = match http_get(admin, "/servers") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("siplb: cannot reach the admin API at {admin}: {e}");
            return ExitCode::from(1);
        }
    };
    let servers: Vec<serde_json::Value> = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("siplb: unexpected answer from {admin}: {e}");
            return ExitCode::from(1);
        }
    };
    let policy = http_get(admin, "/policy")
        .ok()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["policy"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    println!("policy: {policy}");
    println!(
        "{:<10} {:<22} {:<14} {:>5} {:>6} {:>6} {:>10} {:>6} {:>10} {:<}",
        "SERVER",
        "ADDRESS",
        "STATE",
        "SCORE",
        "SHARE%",
        "CPU%",
        "FREE MB",
        "CALLS",
        "SELECTED",
        "AGENT"
    );
    for s in servers {
        let cpu = s["cpu"]
            .as_f64()
            .map_or("-".into(), |c| format!("{:.1}", c * 100.0));
        let mem = s["mem_available"]
            .as_u64()
            .map_or("-".into(), |m| format!("{}", m >> 20));
        let agent = match s["error"].as_str() {
            Some(e) => format!("{} ({e})", s["agent_state"].as_str().unwrap_or("?")),
            None => s["agent_state"].as_str().unwrap_or("?").to_owned(),
        };
        // "down:probe", "down:agent+outlier": which signal said so.
        let state = match s["down_by"].as_str() {
            Some(by) => format!("{}:{by}", s["state"].as_str().unwrap_or("?")),
            None => s["state"].as_str().unwrap_or("?").to_owned(),
        };
        let share = s["policy_weight"]
            .as_f64()
            .map_or("-".into(), |w| format!("{:.1}", w * 100.0));
        println!(
            "{:<10} {:<22} {:<14} {:>5} {:>6} {:>6} {:>10} {:>6} {:>10} {}",
            s["id"].as_str().unwrap_or("?"),
            s["address"].as_str().unwrap_or("?"),
            state,
            s["score"].as_u64().unwrap_or(0),
            share,
            cpu,
            mem,
            s["active_calls"].as_u64().unwrap_or(0),
            s["selected_total"].as_u64().unwrap_or(0),
            agent
        );
    }
    ExitCode::SUCCESS
}

/// Runs `siplb demo`.
pub fn demo(calls: u32, seed: Option<u64>, json: bool) -> ExitCode {
    if calls == 0 || calls > 100_000 {
        eprintln!("siplb: --calls must be between 1 and 100000");
        return ExitCode::from(2);
    }
    let seed = seed.unwrap_or_else(rand::random);
    let Some(rt) = test_bed_runtime() else {
        return ExitCode::from(1);
    };
    match rt.block_on(testbed::demo::run(calls, seed)) {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
            } else {
                println!("{}", testbed::demo::table(&r));
            }
            if r.scenarios.iter().any(|s| s.failed > 0) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("siplb: demo failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// `siplb experiment`: one run, one JSON line.
pub fn experiment(cfg: testbed::experiment::ExperimentConfig) -> ExitCode {
    if !(0.05..=1.2).contains(&cfg.load) {
        eprintln!("siplb: --load must be between 0.05 and 1.2");
        return ExitCode::from(2);
    }
    if !(1.0..=600.0).contains(&cfg.seconds) {
        eprintln!("siplb: --seconds must be between 1 and 600");
        return ExitCode::from(2);
    }
    if !balancer::policy::NAMES.contains(&cfg.policy.as_str()) {
        eprintln!(
            "siplb: --policy: '{}' is not one of: {}",
            cfg.policy,
            balancer::policy::NAMES.join(", ")
        );
        return ExitCode::from(2);
    }
    if !(1..=8).contains(&cfg.balancers) || !(1..=64).contains(&cfg.capacities.len()) {
        eprintln!("siplb: --balancers must be 1-8 and --pool 1-64 servers");
        return ExitCode::from(2);
    }
    if !(1.0..=1000.0).contains(&cfg.service_ms) || !(10..=60_000).contains(&cfg.poll_ms) {
        eprintln!("siplb: --service-ms must be 1-1000 and --poll-ms 10-60000");
        return ExitCode::from(2);
    }
    let Some(rt) = test_bed_runtime() else {
        return ExitCode::from(1);
    };
    match rt.block_on(testbed::experiment::run(cfg)) {
        Ok(r) => {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("siplb: experiment: {e}");
            ExitCode::from(1)
        }
    }
}

/// The runtime of the in-process test beds (demo, experiment): two workers.
fn test_bed_runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| eprintln!("siplb: cannot start: {e}"))
        .ok()
}
