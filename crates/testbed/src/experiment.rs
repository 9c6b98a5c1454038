//! `siplb experiment`: the routing policies with real SIP on loopback.
//!
//! A pool of built-in UAS whose answer time grows with their load (a
//! single-server FIFO queue with exponential service, mean `service_ms` at
//! capacity 1.0), each with an agent reporting the server's real busy
//! fraction over 500 ms windows through the agent protocol; one or more
//! balancers (same secret, same pool, each its own agent polling, one pool
//! name in their Record-Route, as instances behind DNS SRV); a UAC placing
//! Poisson calls at `load` × the pool's capacity, new calls round robin over
//! the balancers and each call's ACK and BYE through the next one (any
//! instance routes any in-dialog request by the signed token). Reports
//! INVITE→200 p50/p99, calls refused or lost, each server's share of new
//! calls per second and what each balancer carried.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer::config::{ServerConfig, Transport};
use balancer::forwarding::{Balancer, Sockets, now};
use perf::agent::AgentConfig;
use perf::client::PollConfig;
use perf::collect::{Collector, Reading};
use perf::server::{AgentSpec, PerfServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sip::{HeaderName, Message, Method};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::demo::loopback_config;
use crate::uac::{dialog_of, request};

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentConfig {
    /// Capacity of each server (1.0 = 1000/`service_ms` calls/s).
    pub capacities: Vec<f64>,
    /// Offered load, a fraction of the pool's capacity.
    pub load: f64,
    /// Agent poll period, ms.
    pub poll_ms: u64,
    /// Routing policy.
    pub policy: String,
    /// Seconds of offered calls.
    pub seconds: f64,
    /// Balancers sharing the pool (new calls round robin over them, each
    /// call's ACK and BYE through the next one).
    pub balancers: usize,
    /// Mean service time at capacity 1.0, ms.
    pub service_ms: f64,
    /// Give the balancers each server's capacity (else they learn it).
    pub configured_capacity: bool,
    /// Seed of arrivals and service times.
    pub seed: u64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentResult {
    /// The run.
    pub config: ExperimentConfig,
    /// Calls placed.
    pub calls: u64,
    /// Calls answered 200.
    pub answered: u64,
    /// Calls refused (a final response other than 200).
    pub refused: u64,
    /// Calls with no final response to the INVITE.
    pub lost: u64,
    /// INVITE→200 median, ms (after the first 10 % of the run).
    pub p50_ms: f64,
    /// INVITE→200 99th percentile, ms.
    pub p99_ms: f64,
    /// New calls per server per second.
    pub per_second: Vec<Vec<u32>>,
    /// Per-second share std-dev beyond binomial noise, mean over servers.
    pub share_sd_excess: f64,
    /// Busy fraction per server over the run.
    pub utilisation: Vec<f64>,
    /// What each balancer carried, in the order the UAC takes them.
    pub per_balancer: Vec<BalancerCount>,
}

/// What one balancer of the pool carried, from its own server table.
#[derive(Debug, Clone, Serialize)]
pub struct BalancerCount {
    /// New sessions it sent to a server (INVITEs it selected a server for).
    pub new_calls: u64,
    /// Requests it forwarded to a server in all (new calls, and in-dialog
    /// requests: ACKs and BYEs, of its own calls or of another balancer's).
    pub forwarded: u64,
}

/// The pool's name in every balancer's Record-Route: written without a
/// port (an SRV name), taken by each balancer as its own in a Route.
pub const POOL_NAME: &str = "pool.siplb.test";

const LOOPBACK: [u8; 4] = [127, 0, 0, 1];

/// A UAS that serves INVITEs one at a time.
struct LoadedUas {
    addr: SocketAddr,
    busy_ns: Arc<AtomicU64>,
    per_second: Arc<Mutex<Vec<u32>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for LoadedUas {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn exp(rng: &mut StdRng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

fn reply(m: &Message<'_>, code: u16, reason: &str, addr: SocketAddr, invite: bool) -> Vec<u8> {
    let mut extra: Vec<Vec<u8>> = m
        .headers()
        .filter(|h| h.name == HeaderName::RecordRoute)
        .map(|h| [b"Record-Route: ".as_slice(), h.value].concat())
        .collect();
    if invite && code == 200 {
        extra.push(format!("Contact: <sip:uas@{addr}>").into_bytes());
    }
    let refs: Vec<&[u8]> = extra.iter().map(Vec::as_slice).collect();
    let mut out = Vec::with_capacity(1024);
    sip::reply::response_for(m, code, reason, b"uas", &refs, &mut out);
    out
}

impl LoadedUas {
    async fn start(mean_service: f64, seed: u64, t0: Instant) -> std::io::Result<LoadedUas> {
        let sock = Arc::new(UdpSocket::bind(SocketAddr::from((LOOPBACK, 0))).await?);
        let addr = sock.local_addr()?;
        let busy_ns = Arc::new(AtomicU64::new(0));
        let per_second = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = mpsc::unbounded_channel::<(Vec<u8>, SocketAddr)>();
        let (s, ps) = (sock.clone(), per_second.clone());
        let receiver = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            let mut seen: HashSet<Vec<u8>> = HashSet::new();
            loop {
                let Ok((n, peer)) = s.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(m) = Message::parse(&buf[..n]) else {
                    continue;
                };
                if !m.is_request() {
                    continue;
                }
                match m.method() {
                    Method::Ack => {}
                    Method::Invite => {
                        // A retransmission of a queued or answered INVITE is
                        // absorbed; a new one is queued behind the others.
                        if seen.insert(m.call_id().to_vec()) {
                            let sec = t0.elapsed().as_secs() as usize;
                            {
                                let mut v =
                                    ps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                                if v.len() <= sec {
                                    v.resize(sec + 1, 0);
                                }
                                v[sec] += 1;
                            }
                            let _ = s.send_to(&reply(&m, 100, "Trying", addr, true), peer).await;
                            let _ = tx.send((buf[..n].to_vec(), peer));
                        }
                    }
                    method => {
                        if method == Method::Bye {
                            seen.remove(m.call_id());
                        }
                        let _ = s.send_to(&reply(&m, 200, "OK", addr, false), peer).await;
                    }
                }
            }
        });
        let (s, busy) = (sock.clone(), busy_ns.clone());
        let worker = tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            // A virtual clock: each job ends its service time after the
            // previous one ended (or after it arrived, when the server was
            // idle), so the timer's millisecond granularity delays answers
            // a little but never adds up into extra load.
            let mut free_at = Instant::now();
            while let Some((bytes, peer)) = rx.recv().await {
                let service = Duration::from_secs_f64(exp(&mut rng, mean_service));
                free_at = free_at.max(Instant::now()) + service;
                tokio::time::sleep_until(free_at).await;
                busy.fetch_add(service.as_nanos() as u64, Ordering::Relaxed);
                if let Ok(m) = Message::parse(&bytes) {
                    let _ = s.send_to(&reply(&m, 200, "OK", addr, true), peer).await;
                }
            }
        });
        Ok(LoadedUas {
            addr,
            busy_ns,
            per_second,
            tasks: vec![receiver, worker],
        })
    }
}

/// An agent's collector reporting the UAS's busy fraction since the last reading.
struct BusyCollector {
    busy_ns: Arc<AtomicU64>,
    last: (u64, Instant),
    mem: u64,
}

impl Collector for BusyCollector {
    fn read(&mut self, _since_start: Duration) -> perf::Result<Reading> {
        let now = Instant::now();
        let b = self.busy_ns.load(Ordering::Relaxed);
        let dt = now.duration_since(self.last.1).as_nanos().max(1) as f64;
        let cpu = ((b - self.last.0) as f64 / dt).clamp(0.0, 1.0);
        self.last = (b, now);
        Ok(Reading {
            cpu,
            mem_available: self.mem,
            mem_total: self.mem * 2,
            cpus: 1.0,
        })
    }
}

/// Calls waiting for responses on one UAC socket, by Call-ID.
type Waiting = Arc<Mutex<HashMap<Vec<u8>, mpsc::UnboundedSender<Vec<u8>>>>>;

struct CallOutcome {
    started: f64,
    /// INVITE→final ms and the final status; `None`: no final response.
    invite: Option<(f64, u16)>,
}

/// Sends `req` and waits for a final response to `method`, retransmitting on
/// T1 doubling, 16 s in all.
async fn transact(
    sock: &UdpSocket,
    lb: SocketAddr,
    rx: &mut mpsc::UnboundedReceiver<Vec<u8>>,
    req: &[u8],
    method: &[u8],
) -> Option<Vec<u8>> {
    let mut wait = Duration::from_millis(500);
    let end = Instant::now() + Duration::from_secs(16);
    while Instant::now() < end {
        let _ = sock.send_to(req, lb).await;
        let deadline = (Instant::now() + wait).min(end);
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if let Ok(m) = Message::parse(&r)
                && m.cseq().method.as_bytes() == method
                && m.status().is_some_and(|c| c >= 200)
            {
                return Some(r);
            }
        }
        wait = (wait * 2).min(Duration::from_secs(4));
    }
    None
}

/// One call: the INVITE to `lb`, its ACK and BYE to `dialog_lb` (another
/// balancer of the pool, or the same one).
async fn one_call(
    sock: Arc<UdpSocket>,
    (lb, dialog_lb): (SocketAddr, SocketAddr),
    waiting: Waiting,
    call_id: String,
    t0: Instant,
) -> CallOutcome {
    let local = sock
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from((LOOPBACK, 0)));
    let (tx, mut rx) = mpsc::unbounded_channel();
    waiting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(call_id.clone().into_bytes(), tx);
    let started = t0.elapsed().as_secs_f64();
    let sent = Instant::now();
    let invite = request(
        "INVITE",
        &call_id,
        1,
        local,
        lb,
        None,
        None,
        &format!("{call_id}i"),
    );
    let resp = transact(&sock, lb, &mut rx, &invite, b"INVITE").await;
    let outcome = match resp {
        None => CallOutcome {
            started,
            invite: None,
        },
        Some(r) => {
            let ms = sent.elapsed().as_secs_f64() * 1000.0;
            let m = Message::parse(&r).ok();
            let code = m.as_ref().and_then(Message::status).unwrap_or(0);
            if code == 200
                && let Some(m) = m
            {
                let (tag, route) = dialog_of(&m);
                let ack = request(
                    "ACK",
                    &call_id,
                    1,
                    local,
                    dialog_lb,
                    tag.as_deref(),
                    route.as_deref(),
                    &format!("{call_id}a"),
                );
                let _ = sock.send_to(&ack, dialog_lb).await;
                let bye = request(
                    "BYE",
                    &call_id,
                    2,
                    local,
                    dialog_lb,
                    tag.as_deref(),
                    route.as_deref(),
                    &format!("{call_id}b"),
                );
                let _ = transact(&sock, dialog_lb, &mut rx, &bye, b"BYE").await;
            }
            CallOutcome {
                started,
                invite: Some((ms, code)),
            }
        }
    };
    waiting
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(call_id.as_bytes());
    outcome
}

/// Runs one experiment.
///
/// # Errors
/// When a loopback socket cannot be bound or the pipeline does not come up.
#[allow(clippy::too_many_lines)]
pub async fn run(cfg: ExperimentConfig) -> Result<ExperimentResult, String> {
    let err = |e: std::io::Error| e.to_string();
    let key = perf::Key::new(perf::protocol::challenge().as_bytes()).map_err(str::to_owned)?;
    let secret = perf::protocol::challenge().into_bytes();
    let any = SocketAddr::from((LOOPBACK, 0));
    let t0 = Instant::now();
    let mean = cfg.service_ms / 1000.0;
    let mut servers = Vec::new();
    let mut agents = Vec::new();
    let mut pool = Vec::new();
    let mut specs = Vec::new();
    for (i, &c) in cfg.capacities.iter().enumerate() {
        let u = LoadedUas::start(
            mean / c,
            cfg.seed.wrapping_mul(31).wrapping_add(i as u64),
            t0,
        )
        .await
        .map_err(err)?;
        let listener = TcpListener::bind(any).await.map_err(err)?;
        let agent_addr = listener.local_addr().map_err(err)?;
        let collector = BusyCollector {
            busy_ns: u.busy_ns.clone(),
            last: (0, Instant::now()),
            // Memory in proportion to capacity (a bigger box).
            mem: (c * f64::from(1u32 << 30)) as u64,
        };
        agents.push(tokio::spawn(perf::agent::run(
            listener,
            AgentConfig {
                interval: Duration::from_millis(500),
                ..AgentConfig::new(key.clone())
            },
            Box::new(collector),
            std::future::pending(),
        )));
        let id = format!("s{}", i + 1);
        specs.push(AgentSpec {
            id: id.clone(),
            agent: agent_addr.to_string(),
        });
        pool.push(ServerConfig {
            id,
            address: u.addr,
            transport: Transport::Udp,
            agent: Some(agent_addr.to_string()),
            capacity: cfg.configured_capacity.then(|| c / mean),
            probe: None,
            probe_failures: 2,
            probe_successes: 2,
            tls_name: None,
        });
        servers.push(u);
    }
    let poll = PollConfig {
        interval: Duration::from_millis(cfg.poll_ms),
        ..PollConfig::default()
    };
    let mut lbs = Vec::new();
    let mut tasks = Vec::new();
    for _ in 0..cfg.balancers.max(1) {
        let ps = PerfServer::new(key.clone(), poll);
        ps.set_agents(&specs);
        let sock = Arc::new(UdpSocket::bind(any).await.map_err(err)?);
        let addr = sock.local_addr().map_err(err)?;
        let mut c = loopback_config(
            addr,
            key.clone(),
            poll,
            poll.interval * 3 + Duration::from_millis(500),
            &cfg.policy,
            pool.clone(),
        );
        c.secret.clone_from(&secret);
        // One pool name in every balancer's Record-Route (no port: as
        // behind DNS SRV), so any of them takes the in-dialog requests of
        // any call.
        POOL_NAME.clone_into(&mut c.record_route_host);
        c.record_route_port = None;
        let sockets = Sockets {
            udp: vec![sock],
            tcp: Vec::new(),
            tls: Vec::new(),
            ws: Vec::new(),
            wss: Vec::new(),
        };
        let lb = Balancer::start(c, sockets, ps.shared().clone(), None).await?;
        lbs.push((lb, addr, ps));
    }
    // Every balancer has every agent's data (bounded).
    let ready = async {
        while !lbs.iter().all(|(p, _, _)| {
            p.router()
                .servers_view(now())
                .iter()
                .all(|s| s.cpu.is_some())
        }) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), ready)
        .await
        .map_err(|_| "the agents did not report within 10 s".to_owned())?;

    // One UAC socket per balancer, a dispatcher each.
    let mut uacs = Vec::new();
    for (_, addr, _) in &lbs {
        let sock = Arc::new(UdpSocket::bind(any).await.map_err(err)?);
        let waiting: Waiting = Arc::default();
        let (s, w) = (sock.clone(), waiting.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            loop {
                let Ok((n, _)) = s.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(m) = Message::parse(&buf[..n]) else {
                    continue;
                };
                let tx = w
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(m.call_id())
                    .cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(buf[..n].to_vec());
                }
            }
        }));
        uacs.push((sock, *addr, waiting));
    }
    let rate = cfg.load * cfg.capacities.iter().sum::<f64>() / mean;
    let start = Instant::now();
    let t_calls = start.duration_since(t0).as_secs_f64();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut next = start;
    let mut calls = Vec::new();
    let mut n = 0u64;
    while next.duration_since(start).as_secs_f64() < cfg.seconds {
        tokio::time::sleep_until(next).await;
        let k = (n as usize) % uacs.len();
        let (sock, lb, waiting) = &uacs[k];
        let dialog_lb = uacs[(k + 1) % uacs.len()].1;
        calls.push(tokio::spawn(one_call(
            sock.clone(),
            (*lb, dialog_lb),
            waiting.clone(),
            format!("exp-{}-{n}", cfg.seed),
            t0,
        )));
        n += 1;
        next += Duration::from_secs_f64(exp(&mut rng, 1.0 / rate));
    }
    let mut outcomes = Vec::new();
    for c in calls {
        if let Ok(o) = c.await {
            outcomes.push(o);
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    let per_balancer = lbs
        .iter()
        .map(|(b, _, _)| {
            let view = b.router().servers_view(now());
            BalancerCount {
                new_calls: view.iter().map(|s| s.selected_total).sum(),
                forwarded: view.iter().map(|s| s.forwarded_total).sum(),
            }
        })
        .collect();
    for a in agents {
        a.abort();
    }
    let warm = t_calls + cfg.seconds * 0.1;
    let mut times: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.started >= warm)
        .filter_map(|o| o.invite.filter(|(_, c)| *c == 200).map(|(ms, _)| ms))
        .collect();
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if times.is_empty() {
            0.0
        } else {
            times[((times.len() - 1) as f64 * p).round() as usize]
        }
    };
    let secs = servers
        .iter()
        .map(|s| s.per_second.lock().map(|v| v.len()).unwrap_or(0))
        .max()
        .unwrap_or(0);
    let per_second: Vec<Vec<u32>> = (t_calls as usize..secs)
        .map(|sec| {
            servers
                .iter()
                .map(|s| {
                    s.per_second
                        .lock()
                        .map(|v| v.get(sec).copied().unwrap_or(0))
                        .unwrap_or(0)
                })
                .collect()
        })
        .collect();
    Ok(ExperimentResult {
        calls: outcomes.len() as u64,
        answered: outcomes
            .iter()
            .filter(|o| matches!(o.invite, Some((_, 200))))
            .count() as u64,
        refused: outcomes
            .iter()
            .filter(|o| matches!(o.invite, Some((_, c)) if c != 200))
            .count() as u64,
        lost: outcomes.iter().filter(|o| o.invite.is_none()).count() as u64,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        share_sd_excess: balancer::sim::share_sd_excess(&per_second),
        per_second,
        utilisation: servers
            .iter()
            .map(|s| s.busy_ns.load(Ordering::Relaxed) as f64 / 1e9 / (elapsed - t_calls).max(1e-9))
            .collect(),
        per_balancer,
        config: cfg,
    })
}
