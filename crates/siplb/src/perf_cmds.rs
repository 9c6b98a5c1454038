//! `siplb agent` and `siplb perf-server`: argument checks, sockets, signals.

use std::process::ExitCode;

use perf::agent::{AgentConfig, Thresholds};
use perf::client::PollConfig;
use perf::collect::{Collector, ProcCollector, Synthetic};
use perf::server::PerfServer;
use tracing::{error, info};

use crate::{AgentArgs, PerfServerArgs};

/// A usage problem: printed as one line, exit 2.
fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("siplb: {msg}");
    ExitCode::from(2)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("shutting down");
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
}

/// Runs `siplb agent`.
pub fn agent(args: AgentArgs) -> ExitCode {
    let key = match perf::Key::from_file(&args.key_file) {
        Ok(k) => k,
        Err(e) => return usage(e),
    };
    if !(0.0..=100.0).contains(&args.cpu_high) {
        return usage("--cpu-high must be a percentage between 0 and 100");
    }
    if args.interval.is_zero() {
        return usage("--interval must be more than 0");
    }
    let collector: Box<dyn Collector> = match &args.synthetic {
        Some(spec) => match Synthetic::parse(spec) {
            Ok(s) => Box::new(s),
            Err(e) => return usage(e),
        },
        None => Box::new(ProcCollector::new(args.cgroup.clone())),
    };
    let cfg = AgentConfig {
        interval: args.interval,
        thresholds: Thresholds {
            cpu_high: args.cpu_high / 100.0,
            mem_low: args.mem_low,
            ..Thresholds::default()
        },
        idle_timeout: args.idle_timeout,
        ..AgentConfig::new(key)
    };
    let rt = match runtime(1) {
        Ok(rt) => rt,
        Err(e) => return usage(format_args!("cannot start: {e}")),
    };
    rt.block_on(async {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                error!(listen = %args.listen, error = %e, "cannot listen");
                return ExitCode::from(1);
            }
        };
        info!(listen = %args.listen, synthetic = args.synthetic.is_some(), "agent listening");
        perf::agent::run(listener, cfg, collector, shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

/// Runs `siplb perf-server`.
pub fn perf_server(args: PerfServerArgs) -> ExitCode {
    let key = match perf::Key::from_file(&args.key_file) {
        Ok(k) => k,
        Err(e) => return usage(e),
    };
    let mut ids: Vec<&str> = args.agents.iter().map(|a| a.id.as_str()).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return usage(format_args!("--agent: server id '{}' given twice", w[0]));
    }
    let poll = PollConfig {
        interval: args.poll_interval,
        timeout: args.timeout,
        ..PollConfig::default()
    };
    let rt = match runtime(2) {
        Ok(rt) => rt,
        Err(e) => return usage(format_args!("cannot start: {e}")),
    };
    rt.block_on(async {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                error!(listen = %args.listen, error = %e, "cannot listen");
                return ExitCode::from(1);
            }
        };
        let server = PerfServer::new(key.clone(), poll);
        server.set_agents(&args.agents);
        info!(listen = %args.listen, agents = args.agents.len(), "performance server listening");
        perf::server::serve_subscribers(listener, key, server.shared().clone(), shutdown_signal())
            .await;
        ExitCode::SUCCESS
    })
}
