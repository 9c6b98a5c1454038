//! `siplb`: the one binary. Subcommands are thin shells over the library crates.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod check;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files, max_size } => check::run(&files, max_size),
    }
}
