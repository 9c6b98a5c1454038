//! `siplb`: the one binary. Subcommands are thin shells over the library crates.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod balancer_cmds;
mod check;
mod load_cmds;
mod perf_cmds;

/// siplb: a SIP load balancer that sends each new call to the server doing
/// best right now (US patent 7,805,517).
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Parse each FILE as one SIP message (as if received in one UDP datagram)
    /// and print `OK <method or status> call-id=<Call-ID>` or `ERROR <file>: <reason>`.
    ///
    /// Exit status: 0 when every file is OK, 1 when any is not, 2 on usage errors.
    Check {
        /// Files holding one raw SIP message each.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Largest message accepted, in bytes.
        #[arg(long, default_value_t = sip::DEFAULT_MAX_SIZE)]
        max_size: usize,
    },
    /// The patent's test bed (FIG 14) on this machine: four scenarios with FIG 15's
    /// readings, real SIP calls through the balancer, the figure's table.
    Demo {
        /// Calls per scenario.
        #[arg(long, default_value_t = 20)]
        calls: u32,
        /// Seed of the random selections (default: a fresh one, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The routing policies with real SIP on loopback: built-in UAS whose answer
    /// time grows with their load, agents reporting their busy fraction, one or
    /// more balancers, Poisson calls; prints INVITE->200 p50/p99 and shares.
    Experiment {
        /// Server capacities, comma-separated (1.0 = 1000/service-ms calls/s).
        #[arg(long, default_value = "1,0.5")]
        pool: String,
        /// Offered load, a fraction of the pool's capacity (0.05-1.2).
        #[arg(long, default_value_t = 0.85)]
        load: f64,
        /// Agent poll period, ms.
        #[arg(long, default_value_t = 500)]
        poll_ms: u64,
        /// Routing policy: adaptive, patent, round-robin, p2c, static.
        #[arg(long, default_value = "adaptive")]
        policy: String,
        /// Seconds of calls (1-600).
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Balancers sharing the pool (1-8): the same secret and servers, each
        /// polling the agents itself, one pool name in their Record-Route (as
        /// instances behind DNS SRV). New calls go round robin over them, each
        /// call's ACK and BYE through the next one; `per_balancer` in the result
        /// says what each carried.
        #[arg(long, default_value_t = 1)]
        balancers: usize,
        /// Mean service time at capacity 1.0, ms.
        #[arg(long, default_value_t = 10.0)]
        service_ms: f64,
        /// Let the balancers learn capacities from agent data instead of configuring them.
        #[arg(long)]
        learn_capacity: bool,
        /// Seed of arrivals and service times.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Run the load balancer: the SIP outbound proxy for a pool of SIP servers,
    /// routing each new session by performance score (config: docs/configuration.md).
    ///
    /// Exit status: 0 after a graceful stop (SIGTERM, SIGINT), 1 when it cannot
    /// run (a socket that cannot be bound), 2 for a bad config. Under systemd
    /// (`Type=notify`) it says READY=1, RELOADING=1 and STOPPING=1.
    Balancer {
        /// The TOML configuration file, e.g. /etc/siplb/balancer.toml.
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        log: LogArgs,
        /// Check the config and the files it names (agent key, admin token,
        /// TLS certificates), bind nothing, and exit: `OK` and 0, or the
        /// field at fault (e.g. `servers[1].address: ...`) and 2. For
        /// systemd's ExecStartPre= and ExecReload=.
        #[arg(long)]
        check: bool,
    },
    /// Show the balancer's servers as a table (from its admin API).
    Status(balancer_cmds::StatusArgs),
    /// Run the performance agent on a SIP server: sample CPU and memory, answer
    /// performance servers, push a notice when a threshold is crossed.
    Agent(AgentArgs),
    /// Run a standalone performance server: poll every agent over one persistent
    /// connection each, and serve the table to the balancers that subscribe.
    PerfServer(PerfServerArgs),
    /// A SIP load generator for ceiling runs (bench/ceiling.py): `load uac`
    /// places calls at a rate over several sockets, `load uas` answers them.
    Load(load_cmds::LoadArgs),
    /// Write the man pages or the shell completions of this CLI (packaging).
    #[command(hide = true)]
    Generate {
        /// What to write.
        #[arg(value_enum)]
        what: Generated,
        /// The folder to write into (created if missing).
        dir: PathBuf,
    },
}

/// What `siplb generate` writes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Generated {
    /// One man page per subcommand: siplb.1, siplb-balancer.1, ...
    Man,
    /// Completions for bash (siplb.bash), zsh (_siplb) and fish (siplb.fish).
    Completions,
}

/// How the long-running commands log (to stderr; the level comes from
/// `SIPLB_LOG`, default `info`).
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log line format: `text` for people, `json` (one object a line, every
    /// field its own key: `call_id`, `server`, `method`...) for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `siplb agent` options.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Address to listen on for performance servers, e.g. 127.0.0.1:7071.
    #[arg(long)]
    pub listen: SocketAddr,
    /// File holding the pre-shared key (at least 16 bytes; whitespace around it is ignored).
    #[arg(long)]
    pub key_file: PathBuf,
    /// Sampling interval.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    pub interval: Duration,
    /// Synthetic readings instead of /proc, for test beds and tests: one reading
    /// (`cpu=12%,mem=60456KB`) or a script held from each time on
    /// (`0s:cpu=10%,mem=2GB;5s:cpu=90%,mem=2GB`). Memory units are binary (1 KB = 1024 B).
    #[arg(long)]
    pub synthetic: Option<String>,
    /// cgroup v2 directory whose limits bound the server (e.g.
    /// /sys/fs/cgroup/system.slice/kamailio.service); default: the agent's own.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// CPU percentage above which a notice is pushed.
    #[arg(long, default_value_t = 85.0)]
    pub cpu_high: f64,
    /// Available memory below which a notice is pushed (e.g. 10MB).
    #[arg(long, default_value = "10MB", value_parser = bytes)]
    pub mem_low: u64,
    /// A performance-server connection silent this long is closed.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub idle_timeout: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

/// `siplb perf-server` options.
#[derive(Debug, Args)]
pub struct PerfServerArgs {
    /// Address balancers subscribe on, e.g. 127.0.0.1:7070.
    #[arg(long)]
    pub listen: SocketAddr,
    /// File holding the pre-shared key shared with agents and balancers.
    #[arg(long)]
    pub key_file: PathBuf,
    /// An agent to poll, as ID=HOST:PORT (repeat for each SIP server).
    #[arg(long = "agent", required = true, value_parser = agent_spec)]
    pub agents: Vec<perf::server::AgentSpec>,
    /// Time between two polls of one agent.
    #[arg(long, default_value = "500ms", value_parser = duration)]
    pub poll_interval: Duration,
    /// No reply within this marks an agent down.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub log: LogArgs,
}

fn duration(s: &str) -> Result<Duration, String> {
    perf::collect::parse_duration(s)
        .ok_or_else(|| format!("'{s}' is not a duration like 500ms, 2s or 1m"))
}

fn bytes(s: &str) -> Result<u64, String> {
    perf::collect::parse_bytes(s).ok_or_else(|| format!("'{s}' is not a size like 10MB"))
}

fn agent_spec(s: &str) -> Result<perf::server::AgentSpec, String> {
    let (id, agent) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not ID=HOST:PORT"))?;
    if id.is_empty() || agent.is_empty() {
        return Err(format!("'{s}' is not ID=HOST:PORT"));
    }
    Ok(perf::server::AgentSpec {
        id: id.to_owned(),
        agent: agent.to_owned(),
    })
}

fn init_tracing(log: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIPLB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: not in journald or a log file.
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match log.log_format {
        LogFormat::Text => fmt.init(),
        // Fields at the top level (`"call_id": ...`), not nested under
        // `fields`: what log collectors index without a mapping.
        LogFormat::Json => fmt.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files, max_size } => check::run(&files, max_size),
        Command::Demo { calls, seed, json } => {
            no_huge_pages();
            balancer_cmds::demo(calls, seed, json)
        }
        Command::Experiment {
            pool,
            load,
            poll_ms,
            policy,
            seconds,
            balancers,
            service_ms,
            learn_capacity,
            seed,
        } => {
            let capacities: Result<Vec<f64>, _> =
                pool.split(',').map(|c| c.trim().parse::<f64>()).collect();
            let capacities = match capacities {
                Ok(c) if !c.is_empty() && c.iter().all(|x| *x > 0.0 && x.is_finite()) => c,
                _ => {
                    eprintln!("siplb: --pool: '{pool}' is not a list of capacities like 1,0.5");
                    return ExitCode::from(2);
                }
            };
            no_huge_pages();
            balancer_cmds::experiment(testbed::experiment::ExperimentConfig {
                capacities,
                load,
                poll_ms,
                policy,
                seconds,
                balancers,
                service_ms,
                configured_capacity: !learn_capacity,
                seed,
            })
        }
        Command::Balancer {
            config,
            check: true,
            ..
        } => balancer_cmds::check_config(&config),
        Command::Balancer {
            config,
            check: false,
            log,
        } => {
            init_tracing(&log);
            no_huge_pages();
            balancer_cmds::balancer(config)
        }
        Command::Status(args) => balancer_cmds::status(&args),
        Command::Agent(args) => {
            init_tracing(&args.log);
            perf_cmds::agent(args)
        }
        Command::PerfServer(args) => {
            init_tracing(&args.log);
            perf_cmds::perf_server(args)
        }
        Command::Load(args) => load_cmds::run(args),
        Command::Generate { what, dir } => generate(what, &dir),
    }
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`),
/// in the commands that run a balancer. Its allocator hands memory that
/// stays free for a second back to the kernel, and the transaction table
/// frees a second's worth of calls at a time; with huge pages each page it
/// touches again is a fault that zeroes 2 MB (4.0 % of the balancer's CPU
/// at 3,000 calls/s, against 0.75 % with 4 KB pages: docs/benchmarks.md).
/// An operator who sets `MIMALLOC_ALLOW_THP` decides instead (the allocator
/// reads it: `0` off, `1` on).
fn no_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        tracing::debug!(error = %e, "could not turn transparent huge pages off");
    }
}

/// `siplb generate man|completions DIR`, from this very CLI.
fn generate(what: Generated, dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    let written = std::fs::create_dir_all(dir).and_then(|()| match what {
        Generated::Man => clap_mangen::generate_to(Cli::command(), dir),
        Generated::Completions => {
            use clap_complete::Shell;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut Cli::command(), "siplb", dir)?;
            }
            Ok(())
        }
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("siplb: generate {what:?} {}: {e}", dir.display());
            ExitCode::from(1)
        }
    }
}
