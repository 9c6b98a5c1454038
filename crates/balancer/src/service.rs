//! Starting and stopping the balancer: sockets, the embedded performance
//! server (or a subscription to a standalone one), housekeeping, the admin
//! API, and signals (SIGHUP reloads, SIGTERM stops gracefully), told to
//! systemd and the health probes (crate::lifecycle).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use perf::client::TcpConnector;
use perf::server::{AgentSpec, PerfServer, SharedTable};
use tokio::net::{TcpListener, UdpSocket};
use tracing::{error, info, warn};

use crate::admin::{AdminState, router};
use crate::config::{Config, Transport};
use crate::forwarding::{Balancer, Sockets};
use crate::lifecycle::Lifecycle;

/// How long a graceful stop waits for outstanding transactions.
pub const GRACE: Duration = Duration::from_secs(10);

/// IP_FREEBIND (`sip.freebind`): binds an address the host does not hold
/// (yet), as a standby instance does a virtual IP.
fn set_freebind(s: &socket2::Socket, addr: SocketAddr) -> std::io::Result<()> {
    if addr.is_ipv6() {
        s.set_freebind_v6(true)
    } else {
        s.set_freebind_v4(true)
    }
}

fn udp_socket(addr: SocketAddr, freebind: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_port(true)?;
    if freebind {
        set_freebind(&s, addr)?;
    }
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

/// A SIP stream listener on `addr` (with IP_FREEBIND when `freebind`).
fn tcp_listener(addr: SocketAddr, freebind: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if freebind {
        set_freebind(&s, addr)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

fn agent_specs(cfg: &Config) -> Vec<AgentSpec> {
    // A server written `host:port` may have an agent too.
    cfg.servers
        .iter()
        .chain(cfg.discover.iter().map(|d| &d.template))
        .filter_map(|s| {
            Some(AgentSpec {
                id: s.id.clone(),
                agent: s.agent.clone()?,
            })
        })
        .collect()
}

/// What a start would refuse that loading the config does not check: the
/// TLS files parse and the key matches the certificate (the listener's and
/// the client side's). Binds nothing (`siplb balancer --check`).
///
/// # Errors
/// The first problem, naming the field and the file.
pub fn check(cfg: &Config) -> Result<(), String> {
    if let Some(t) = &cfg.tls {
        if cfg.transports.contains(&Transport::Tls) || cfg.transports.contains(&Transport::Wss) {
            crate::tls::TlsListener::new(t)?;
        }
        if cfg.servers.iter().any(|s| s.transport == Transport::Tls) {
            crate::tls::TlsClient::new(t)?;
        }
    }
    Ok(())
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
                    udp_socket(*a, cfg.freebind)
                        .map_err(|e| format!("sip.listen {a} (udp): {e}"))?,
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
                tcp_listener(*a, cfg.freebind).map_err(|e| format!("sip.listen {a} (tcp): {e}"))?,
            );
        }
    }
    // The other stream listeners, on each listen address at their port.
    let mut others: [Vec<TcpListener>; 3] = Default::default();
    for (i, (t, field, port)) in [
        (Transport::Tls, "sip.tls_port", cfg.tls_port),
        (Transport::Ws, "sip.ws_port", cfg.ws_port),
        (Transport::Wss, "sip.wss_port", cfg.wss_port),
    ]
    .into_iter()
    .enumerate()
    {
        if !cfg.transports.contains(&t) {
            continue;
        }
        for a in &cfg.listen {
            let a = SocketAddr::new(a.ip(), port);
            others[i].push(
                tcp_listener(a, cfg.freebind)
                    .map_err(|e| format!("{field} {a} ({}): {e}", t.via_name()))?,
            );
            info!(%a, transport = t.via_name(), "listening");
        }
    }
    let [tls, ws, wss] = others;

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

    let admin_cfg = cfg.admin.clone();
    let sockets = Sockets {
        udp,
        tcp,
        tls,
        ws,
        wss,
    };
    let prepared = Balancer::prepare(cfg, sockets, table.clone(), None)?;
    let life = Lifecycle::new(prepared.router().clone(), table);
    let reload_tls = Balancer::tls_reloader_of(&prepared);
    let proxy = prepared.router().clone();
    let mut tasks = tokio::task::JoinSet::new();
    // Names followed in DNS: one task each (their settings change at a restart).
    if !proxy.config().discover.is_empty() {
        let c = proxy.config();
        let resolver = crate::dns::resolver(&c.dns).map_err(|e| format!("dns: {e}"))?;
        for src in &c.discover {
            tasks.spawn(crate::dns::follow(
                proxy.clone(),
                resolver.clone(),
                src.clone(),
                c.dns.clone(),
            ));
        }
    }

    let reload = {
        let p = proxy.clone();
        let path = config_path.clone();
        let ps = perf_server.clone();
        let reload_tls = reload_tls.clone();
        let life = life.clone();
        move || -> Result<(), String> {
            life.reload(&|| {
                let new = Config::load(&path).map_err(|e| e.to_string())?;
                // The certificates first: a reload with unusable files changes
                // nothing and says why.
                reload_tls(&new)?;
                if new.tls.is_some() {
                    info!("TLS certificates re-read");
                }
                if let Some(ps) = &ps {
                    ps.set_agents(&agent_specs(&new));
                }
                p.reload(new);
                Ok(())
            })
        }
    };
    let state = Arc::new(AdminState {
        router: proxy.clone(),
        reload: Box::new(reload.clone()),
    });
    // The admin listener before the wait for the agents, so `/readyz`
    // answers `503 starting` meanwhile (crate::lifecycle).
    if let Some(admin) = admin_cfg {
        let a = admin.listen;
        let l = TcpListener::bind(a)
            .await
            .map_err(|e| format!("admin.listen {a}: {e}"))?;
        if !a.ip().to_canonical().is_loopback() && admin.token.is_none() {
            warn!(
                %a,
                "admin.listen is {a}, beyond loopback, without admin.token_file: \
                 anyone who reaches it can drain servers and reload"
            );
        }
        let app = life
            .app(router(state))
            .into_make_service_with_connect_info::<crate::admin::LocalAddr>();
        tasks.spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                error!(error = %e, "admin API stopped");
            }
        });
        info!(%a, "admin API listening");
    }
    tasks.spawn(Lifecycle::watchdog());

    let balancer = prepared.serve().await?;
    let status = {
        let c = proxy.config();
        info!(listen = ?c.listen, servers = c.servers.len(), policy = %c.policy, "balancer running");
        format!(
            "serving SIP: {} servers, policy {}",
            c.servers.len(),
            c.policy
        )
    };

    // The handlers before READY=1: a SIGHUP or SIGTERM right after it
    // (systemctl reload, stop) must not meet the default action.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    life.serving(&status);
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
    life.stopping();
    balancer.stop(GRACE).await;
    tasks.abort_all();
    drop(perf_server);
    Ok(())
}
