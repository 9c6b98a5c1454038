//! `siplb load uac|uas`: the load generator of bench/ceiling.py
//! (testbed::load), as command-line options.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

/// `siplb load` options.
#[derive(Debug, Args)]
pub struct LoadArgs {
    #[command(subcommand)]
    pub role: Role,
}

/// The generator's two ends.
#[derive(Debug, Subcommand)]
pub enum Role {
    /// Place calls (INVITE, 200, ACK, BYE, 200) at a rate over UDP, one
    /// thread per client socket, and print one `uac key=value ...` line:
    /// offered and achieved rate, calls ok and failed by reason,
    /// retransmissions, INVITE->200 p50/p99 ms, CPU ms per 1,000 calls.
    /// Exit status: 0 when every call succeeded, 1 when any failed.
    Uac(UacArgs),
    /// Answer calls over UDP (INVITE with 180 and 200, retransmitted until
    /// the ACK; BYE and anything else with 200) to the datagram's source,
    /// and print one `uas key=value ...` line after each quiet second and at
    /// the end.
    Uas(UasArgs),
}

/// `siplb load uac` options.
#[derive(Debug, Args)]
pub struct UacArgs {
    /// Where every request goes: the balancer, a relay, or a UAS.
    pub target: SocketAddr,
    /// Local address of the client sockets.
    #[arg(long, default_value = "127.0.0.1")]
    pub local_ip: IpAddr,
    /// First client socket's port (0: any); socket i binds PORT + i.
    #[arg(long, default_value_t = 0)]
    pub local_port: u16,
    /// Client sockets, each with its own thread.
    #[arg(long, default_value_t = 1)]
    pub sockets: usize,
    /// New calls per second, over all sockets.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Seconds of new calls (calls = rate x seconds), unless --calls.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Calls to place (instead of rate x seconds).
    #[arg(long)]
    pub calls: Option<u64>,
    /// An INVITE or BYE unanswered this long fails its call.
    #[arg(long, default_value = "32s", value_parser = crate::duration)]
    pub timeout: Duration,
    /// RFC 3261 T1: the first retransmission interval.
    #[arg(long, default_value = "500ms", value_parser = crate::duration)]
    pub t1: Duration,
    /// Retransmissions of one request at most.
    #[arg(long, default_value_t = 7)]
    pub max_retrans: u32,
    /// Also print the report as one JSON object (after the line).
    #[arg(long)]
    pub json: bool,
}

/// `siplb load uas` options.
#[derive(Debug, Args)]
pub struct UasArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:5090")]
    pub listen: SocketAddr,
    /// Answer INVITE with 200 only (no 180 Ringing).
    #[arg(long)]
    pub no_ringing: bool,
    /// RFC 3261 T1: the 200's first retransmission interval.
    #[arg(long, default_value = "500ms", value_parser = crate::duration)]
    pub t1: Duration,
    /// A 200 not ACKed within this is given up.
    #[arg(long, default_value = "32s", value_parser = crate::duration)]
    pub timeout: Duration,
    /// Exit after this long (default: run until stopped).
    #[arg(long, value_parser = crate::duration)]
    pub seconds: Option<Duration>,
    /// Exit after this long without a datagram, once one came.
    #[arg(long, value_parser = crate::duration)]
    pub idle_exit: Option<Duration>,
}

/// Runs `siplb load`.
pub fn run(args: LoadArgs) -> ExitCode {
    match args.role {
        Role::Uac(a) => {
            if !(a.rate > 0.0 && a.rate.is_finite()) || a.sockets == 0 || a.sockets > 1024 {
                eprintln!("siplb load uac: --rate must be > 0 and --sockets 1-1024");
                return ExitCode::from(2);
            }
            let calls = a
                .calls
                .unwrap_or_else(|| (a.rate * a.seconds.max(0.0)).round() as u64);
            let cfg = testbed::load::UacConfig {
                target: a.target,
                local_ip: a.local_ip,
                local_port: a.local_port,
                sockets: a.sockets,
                rate: a.rate,
                calls,
                timeout: a.timeout,
                t1: a.t1,
                max_retrans: a.max_retrans.min(16),
            };
            match testbed::load::run_uac(&cfg) {
                Ok(r) => {
                    println!("{}", r.line());
                    if a.json {
                        println!("{}", r.json());
                    }
                    if r.failed.total() == 0 && r.ok == r.calls {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("siplb load uac: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Role::Uas(a) => {
            let cfg = testbed::load::UasConfig {
                listen: a.listen,
                ringing: !a.no_ringing,
                t1: a.t1,
                timeout: a.timeout,
                seconds: a.seconds,
                idle_exit: a.idle_exit,
            };
            match testbed::load::run_uas(&cfg) {
                Ok(r) => {
                    println!("{}", r.line());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("siplb load uas: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
