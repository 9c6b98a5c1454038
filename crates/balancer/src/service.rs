//! Starting and stopping the balancer: sockets, the embedded performance
//! server (or a subscription to a standalone one), housekeeping, the admin
//! API, and signals (SIGHUP reloads, SIGTERM stops gracefully).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use perf::client::TcpConnector;
use perf::server::{AgentSpec, PerfServer, SharedTable};
use tokio::net::{TcpListener, UdpSocket};
use tracing::{error, info, warn};

use crate::admin::{AdminState, router};
use crate::config::{Config, Transport};
use crate::proxy::{Proxy, tcp_conn, udp_loop};

/// How long a graceful stop waits for outstanding transactions.
pub const GRACE: Duration = Duration::from_secs(10);

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    // Bursts of thousands of calls a second: room for them in the kernel.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

fn agent_specs(cfg: &Config) -> Vec<AgentSpec> {
    cfg.servers
        .iter()
        .filter_map(|s| {
            Some(AgentSpec {
                id: s.id.clone(),
                agent: s.agent.clone()?,
            })
        })
        .collect()
}

/// Runs the balancer from a config file until SIGTERM/SIGINT (and the grace period).
///
/// # Errors
/// A socket that cannot be bound, or an invalid scoring config.
pub async fn run(config_path: PathBuf, cfg: Config) -> Result<(), String> {
    let mut udp = Vec::new();
    if cfg.transports.contains(&Transport::Udp) {
        for a in &cfg.listen {
            for _ in 0..cfg.udp_sockets {
                udp.push(Arc::new(
                    udp_socket(*a).map_err(|e| format!("sip.listen {a} (udp): {e}"))?,
                ));
            }
        }
    } else {
        // Responses and requests to UDP servers still need a socket.
        udp.push(Arc::new(
            UdpSocket::bind(SocketAddr::new(cfg.listen[0].ip(), 0))
                .await
                .map_err(|e| e.to_string())?,
        ));
    }
    let mut tcp = Vec::new();
    if cfg.transports.contains(&Transport::Tcp) {
        for a in &cfg.listen {
            tcp.push(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| format!("sip.listen {a} (tcp): {e}"))?,
            );
        }
    }

    // Performance data: embedded performance server, or a standalone one.
    let (table, perf_server) = match &cfg.perf_server {
        Some(addr) => {
            let shared = SharedTable::default();
            tokio::spawn(perf::server::subscribe(
                TcpConnector(addr.clone()),
                cfg.key.clone(),
                cfg.poll,
                shared.clone(),
            ));
            (shared, None)
        }
        None => {
            let ps = PerfServer::new(cfg.key.clone(), cfg.poll);
            ps.set_agents(&agent_specs(&cfg));
            (ps.shared().clone(), Some(ps))
        }
    };

    let admin_addr = cfg.admin;
    let proxy = Proxy::new(cfg, udp.clone(), table).map_err(|e| e.to_string())?;
    wait_for_first_data(&proxy).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..udp.len() {
        tasks.spawn(udp_loop(proxy.clone(), i));
    }
    for l in tcp {
        let p = proxy.clone();
        tasks.spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, peer)) => {
                        tokio::spawn(tcp_conn(p.clone(), s, peer));
                    }
                    Err(e) => {
                        warn!(error = %e, "tcp accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    {
        let p = proxy.clone();
        tasks.spawn(async move {
            let mut due = std::collections::HashMap::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                p.probe_round(&mut due).await;
                p.health_round().await;
            }
        });
    }
    {
        let p = proxy.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                p.sweep();
                p.timer_c_round().await;
            }
        });
    }

    let reload = {
        let p = proxy.clone();
        let path = config_path.clone();
        let ps = perf_server.clone();
        move || -> Result<(), String> {
            let new = Config::load(&path).map_err(|e| e.to_string())?;
            if let Some(ps) = &ps {
                ps.set_agents(&agent_specs(&new));
            }
            p.reload(new);
            Ok(())
        }
    };
    let state = Arc::new(AdminState {
        proxy: proxy.clone(),
        reload: Box::new(reload.clone()),
    });
    if let Some(a) = admin_addr {
        let l = TcpListener::bind(a)
            .await
            .map_err(|e| format!("admin.listen {a}: {e}"))?;
        let app = router(state);
        tasks.spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                error!(error = %e, "admin API stopped");
            }
        });
        info!(%a, "admin API listening");
    }
    {
        let c = proxy.config();
        info!(listen = ?c.listen, servers = c.servers.len(), policy = %c.policy, "balancer running");
    }

    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match reload() {
                    Ok(()) => {}
                    Err(e) => error!(error = %e, "reload refused; the running configuration stays"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Graceful stop: no new sessions; wait for what is in flight.
    proxy.stopping.store(true, Ordering::Relaxed);
    info!(
        outstanding = proxy.outstanding(),
        "stopping: refusing new sessions, finishing transactions"
    );
    let start = tokio::time::Instant::now();
    while proxy.outstanding() > 0 && start.elapsed() < GRACE {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!(outstanding = proxy.outstanding(), "stopped");
    tasks.abort_all();
    drop(perf_server);
    Ok(())
}

/// Waits (bounded by the agent timeout + 1 s) until every server's agent has
/// answered or failed once. A balancer (re)started under load would
/// otherwise refuse the first new calls for lack of data; meanwhile the
/// sockets are bound and the kernel holds datagrams and connections.
async fn wait_for_first_data(proxy: &Proxy) {
    let cfg = proxy.config();
    let start = tokio::time::Instant::now();
    let limit = cfg.poll.timeout + Duration::from_secs(1);
    loop {
        let table = proxy.table.load();
        let ready = cfg.servers.iter().filter(|s| s.agent.is_some()).all(|s| {
            table.get(&s.id).is_some_and(|e| match e.state {
                perf::AgentState::Up => e.sample.is_some(),
                perf::AgentState::Down => true,
                perf::AgentState::Connecting => false,
            })
        });
        if ready {
            info!(
                after_ms = start.elapsed().as_millis() as u64,
                "agents answered: serving SIP"
            );
            return;
        }
        if start.elapsed() >= limit {
            warn!(
                after_ms = limit.as_millis() as u64,
                "not every agent answered: serving SIP anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
