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

/// Runs `siplb balancer --check --config FILE`: `OK ...` on stdout and exit
/// 0, or one line naming the field on stderr and exit 2; binds nothing.
pub fn check_config(path: &std::path::Path) -> ExitCode {
    let checked = balancer::config::Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|cfg| balancer::service::check(&cfg).map(|()| cfg));
    match checked {
        Ok(cfg) => {
            println!(
                "OK {}: {} servers, policy {}",
                path.display(),
                cfg.servers.len(),
                cfg.policy
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("siplb: {}: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

/// `siplb status` options.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Admin API address [default: admin.listen of --config, else 127.0.0.1:8060].
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// The balancer's config file: the admin address and token are read from
    /// its [admin] section (admin.listen, admin.token_file).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// File holding the admin API's bearer token (overrides admin.token_file of --config).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Where to reach the admin API, and with which token.
#[derive(Debug)]
struct AdminClient {
    addr: SocketAddr,
    token: Option<balancer::config::AdminToken>,
}

impl AdminClient {
    /// From the options: an address given wins over the config's; a
    /// wildcard `admin.listen` is reached on loopback.
    fn new(args: &StatusArgs) -> Result<AdminClient, String> {
        let admin = match &args.config {
            Some(p) => balancer::config::Config::load_admin(p)
                .map_err(|e| format!("{}: {e}", p.display()))?,
            None => None,
        };
        let addr = args.admin.unwrap_or_else(|| match &admin {
            Some(a) if a.listen.ip().is_unspecified() => {
                let lo: std::net::IpAddr = if a.listen.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                };
                SocketAddr::new(lo, a.listen.port())
            }
            Some(a) => a.listen,
            None => SocketAddr::from(([127, 0, 0, 1], 8060)),
        });
        let token = match &args.token_file {
            Some(p) => Some(
                balancer::config::AdminToken::from_file(p)
                    .map_err(|e| format!("--token-file: {e}"))?,
            ),
            None => admin.and_then(|a| a.token),
        };
        Ok(AdminClient { addr, token })
    }

    /// A plain HTTP/1.1 GET; the admin API is ours, so no client crate.
    fn get(&self, path: &str) -> std::io::Result<String> {
        let addr = self.addr;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {}\r\n", t.expose()))
            .unwrap_or_default();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        let (head, rest) = body.split_once("\r\n\r\n").unwrap_or((&body, ""));
        if !head.starts_with("HTTP/1.1 200") {
            let status = head.lines().next().unwrap_or("no answer").to_owned();
            let hint = if head.starts_with("HTTP/1.1 401") {
                if self.token.is_some() {
                    " (the token given is not the balancer's admin.token_file)"
                } else {
                    " (give --token-file, or --config with admin.token_file)"
                }
            } else if head.starts_with("HTTP/1.1 403") {
                " (the Host is not accepted: see admin.allowed_hosts)"
            } else {
                ""
            };
            return Err(std::io::Error::other(format!("{status}{hint}")));
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
}

/// Runs `siplb status`; a bad `--config` or `--token-file` is exit 2.
pub fn status(args: &StatusArgs) -> ExitCode {
    let client = match AdminClient::new(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("siplb: {e}");
            return ExitCode::from(2);
        }
    };
    let admin = client.addr;
    let body = match client.get("/servers") {
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
    let policy = client
        .get("/policy")
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
