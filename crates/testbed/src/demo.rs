//! `siplb demo`: the patent's test bed (FIG 14) on this machine, in one
//! process, reproducing FIG 15. For each of the figure's four scenarios: two
//! built-in UAS, an agent per server with the figure's readings (synthetic),
//! the balancer with the patent's policy (FIG 6-8 exactly), and a built-in
//! UAC placing real SIP calls over UDP on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use balancer::config::{Config, Health, OnNoServer, RegisterMode, ServerConfig, Transport};
use balancer::forwarding::{Balancer, Sockets, now};
use balancer::load::Scoring;
use perf::agent::AgentConfig;
use perf::client::PollConfig;
use perf::collect::Synthetic;
use perf::server::{AgentSpec, PerfServer};
use serde::Serialize;
use tokio::net::{TcpListener, UdpSocket};

use crate::uac::Uac;
use crate::uas::Uas;

/// FIG 15's readings: (CPU %, free memory KB) for server 1 and server 2.
pub const FIG15: [[(u32, u64); 2]; 4] = [
    [(1, 60_456), (2, 85_892)],
    [(95, 113_420), (0, 125_549)],
    [(2, 57_612), (88, 16_888)],
    [(92, 101_234), (89, 95_425)],
];

/// One server's row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct ServerRow {
    /// "server 1" or "server 2".
    pub name: String,
    /// CPU utilisation, percent.
    pub cpu_percent: u32,
    /// Free memory, KB.
    pub free_memory_kb: u64,
    /// Performance score the balancer computed from its agent's data.
    pub score: u32,
    /// Calls the server answered (INVITEs it received).
    pub selected: u64,
}

/// One scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// 1-4.
    pub scenario: usize,
    /// Calls placed.
    pub calls: u32,
    /// Calls that did not complete.
    pub failed: u32,
    /// Both servers.
    pub servers: Vec<ServerRow>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct DemoResult {
    /// The seed of the selections (repeat the run with `--seed`).
    pub seed: u64,
    /// The four scenarios.
    pub scenarios: Vec<ScenarioResult>,
}

const LOOPBACK: [u8; 4] = [127, 0, 0, 1];

/// Runs the four scenarios.
///
/// # Errors
/// When a loopback socket cannot be bound or the pipeline does not come up.
pub async fn run(calls: u32, seed: u64) -> Result<DemoResult, String> {
    let mut scenarios = Vec::new();
    for (i, readings) in FIG15.iter().enumerate() {
        scenarios.push(scenario(i + 1, readings, calls, seed.wrapping_add(i as u64)).await?);
    }
    Ok(DemoResult { seed, scenarios })
}

async fn scenario(
    n: usize,
    readings: &[(u32, u64); 2],
    calls: u32,
    seed: u64,
) -> Result<ScenarioResult, String> {
    let key = perf::Key::new(perf::protocol::challenge().as_bytes()).map_err(str::to_owned)?;
    let any = SocketAddr::from((LOOPBACK, 0));
    let mut uas = Vec::new();
    let mut agents = Vec::new();
    let mut specs = Vec::new();
    let mut servers = Vec::new();
    for (k, &(cpu, mem_kb)) in readings.iter().enumerate() {
        let u = Uas::start(any).await.map_err(|e| e.to_string())?;
        let listener = TcpListener::bind(any).await.map_err(|e| e.to_string())?;
        let agent_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let synthetic =
            Synthetic::parse(&format!("cpu={cpu}%,mem={mem_kb}KB")).map_err(|e| e.to_string())?;
        let cfg = AgentConfig {
            interval: Duration::from_millis(100),
            ..AgentConfig::new(key.clone())
        };
        agents.push(tokio::spawn(perf::agent::run(
            listener,
            cfg,
            Box::new(synthetic),
            std::future::pending(),
        )));
        let id = format!("s{}", k + 1);
        specs.push(AgentSpec {
            id: id.clone(),
            agent: agent_addr.to_string(),
        });
        servers.push(ServerConfig {
            id,
            address: u.addr,
            transport: Transport::Udp,
            agent: Some(agent_addr.to_string()),
            capacity: None,
            probe: None,
            probe_failures: 2,
            probe_successes: 2,
            tls_name: None,
        });
        uas.push(u);
    }
    let poll = PollConfig {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        ..PollConfig::default()
    };
    let ps = PerfServer::new(key.clone(), poll);
    ps.set_agents(&specs);

    let sock = Arc::new(UdpSocket::bind(any).await.map_err(|e| e.to_string())?);
    let lb_addr = sock.local_addr().map_err(|e| e.to_string())?;
    let cfg = loopback_config(
        lb_addr,
        key,
        poll,
        Duration::from_secs(2),
        "patent",
        servers,
    );
    let sockets = Sockets {
        udp: vec![sock],
        tcp: Vec::new(),
        tls: Vec::new(),
        ws: Vec::new(),
        wss: Vec::new(),
    };
    let lb = Balancer::start(cfg, sockets, ps.shared().clone(), Some(seed)).await?;
    let proxy = lb.router().clone();

    // Wait (bounded) until the balancer has both agents' data.
    let ready = async {
        loop {
            let v = proxy.servers_view(now());
            if v.iter().all(|s| s.cpu.is_some() && s.agent_state == "up") {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let view = tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .map_err(|_| format!("scenario {n}: the agents did not report within 10 s"))?;

    let uac = Uac::new(any, lb_addr).await.map_err(|e| e.to_string())?;
    // Bounded: a scenario that cannot finish in 5 minutes counts the rest failed.
    let budget = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut failed = 0;
    for c in 0..calls {
        let call_id = format!("fig15-{n}-{c}-{seed}@127.0.0.1");
        match tokio::time::timeout_at(budget, uac.call(&call_id)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => failed += 1,
            Err(_) => {
                failed += calls - c;
                break;
            }
        }
    }
    let rows = readings
        .iter()
        .zip(&uas)
        .zip(&view)
        .enumerate()
        .map(|(k, ((&(cpu, mem), u), v))| ServerRow {
            name: format!("server {}", k + 1),
            cpu_percent: cpu,
            free_memory_kb: mem,
            score: v.score,
            selected: u.invites(),
        })
        .collect();
    drop(lb);
    for a in agents {
        a.abort();
    }
    Ok(ScenarioResult {
        scenario: n,
        calls,
        failed,
        servers: rows,
    })
}

/// A balancer config for an in-process test bed on loopback: UDP on
/// `lb_addr`, one socket, the given policy and pool; every other field at
/// its production default.
#[must_use]
pub fn loopback_config(
    lb_addr: SocketAddr,
    key: perf::Key,
    poll: PollConfig,
    stale_after: Duration,
    policy: &str,
    servers: Vec<ServerConfig>,
) -> Config {
    Config {
        listen: vec![lb_addr],
        transports: vec![Transport::Udp],
        tls_port: 5061,
        tls: None,
        path: balancer::config::PathMode::Always,
        udp_mtu: 0,
        ws_port: 5066,
        wss_port: 7443,
        ws_path: "/".into(),
        ws_origins: Vec::new(),
        advertise_host: lb_addr.ip().to_string(),
        advertise_port: lb_addr.port(),
        record_route_host: lb_addr.ip().to_string(),
        record_route_port: Some(lb_addr.port()),
        instance: None,
        drain_retry_after: 5,
        pool: balancer::config::PoolConfig::default(),
        max_message_size: sip::DEFAULT_MAX_SIZE,
        udp_sockets: 1,
        freebind: false,
        max_connections: 10_000,
        max_connections_per_source: 256,
        idle_timeout: Duration::from_secs(300),
        message_timeout: Duration::from_secs(10),
        secret: perf::protocol::challenge().into_bytes(),
        policy: policy.into(),
        register: RegisterMode::Fork,
        registrar: None,
        register_timeout: Duration::from_secs(4),
        on_no_server: OnNoServer::Reject,
        retry_after: 5,
        max_sessions: 10_000,
        max_transactions: 10_000,
        session_idle_timeout: Duration::from_secs(3600),
        failover_timeout: Duration::from_millis(500),
        last_attempt_timeout: Duration::from_secs(32),
        invite_timeout: Duration::from_secs(181),
        trying_after: Duration::from_millis(200),
        max_attempts: 3,
        failover_statuses: vec![500, 503],
        retry_after_max: Duration::from_secs(300),
        probe_down_statuses: vec![503],
        health: Health::Both,
        legacy_sb: false,
        outlier: balancer::outlier::OutlierConfig::default(),
        key,
        poll,
        stale_after,
        perf_server: None,
        scoring: Scoring::default(),
        admin: None,
        // The test bed's UAC is one source on loopback placing every call.
        limits: balancer::config::LimitsConfig {
            enabled: false,
            ..balancer::config::LimitsConfig::default()
        },
        capture: None,
        servers,
        dns: balancer::config::DnsConfig::default(),
        discover: Vec::new(),
    }
}

/// The result as the figure's table.
#[must_use]
pub fn table(r: &DemoResult) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "siplb demo: the test bed of US 7,805,517 FIG 14, results as FIG 15 (seed {})",
        r.seed
    );
    let _ = writeln!(
        o,
        "two built-in SIP servers, an agent each with the figure's readings, the patent's selection (FIG 6-8), real SIP calls over UDP on 127.0.0.1\n"
    );
    let _ = writeln!(
        o,
        "{:<9} {:<9} {:>16} {:>17} {:>18} {:>15}",
        "Scenario",
        "Server",
        "CPU utilisation",
        "Free memory (KB)",
        "Performance score",
        "Times selected"
    );
    for s in &r.scenarios {
        for (k, row) in s.servers.iter().enumerate() {
            let scen = if k == 0 {
                s.scenario.to_string()
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "{:<9} {:<9} {:>15}% {:>17} {:>18} {:>15}",
                scen,
                row.name,
                row.cpu_percent,
                group(row.free_memory_kb),
                row.score,
                row.selected
            );
        }
        let _ = writeln!(o, "{:<9} {} calls, {} failed\n", "", s.calls, s.failed);
    }
    let _ = write!(
        o,
        "FIG 15 prints the scores 70/78, 26/76, 87/17, 29/28; the formula gives 29/29 for scenario 4 (100 × (0.11 + 95,425/196,659) / 2 = 29.76), so the figure's second reading evidently differed."
    );
    o
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
