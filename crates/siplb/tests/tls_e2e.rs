//! The TLS listener under SIPp, in short: bench/tls.py --reload-at with two
//! SIPp uas servers (Debian package `sip-tester`) behind siplb and SIPp's
//! uac calling over TLS (one connection, through the script's TCP-to-TLS
//! relay: Debian's SIPp is built without OpenSSL) at 50 calls/s for 6 s.
//! At 3 s the certificate and key files are replaced by a second
//! certificate from the same CA and `POST /reload` is called. The test
//! passes only when every call succeeded, the reload answered 200, a new
//! TLS connection after it was served the second certificate (openssl
//! s_client, verified against the CA) and SIPp's connection, opened with
//! the first one, carried the calls across the reload.
//!
//! Missing programs are a failure, not a skip: CI installs sipp and openssl
//! with apt (`apt-get install sip-tester openssl`).
//!
//! bench/tls.py uses fixed ports (siplb 5060/5061, admin 8060, uas
//! 5081/5082, uac 5070, relay 5090). The run gets a network namespace of its
//! own where one can be made (its own loopback); elsewhere every port is
//! moved up by OFFSET, away from other test beds on the machine. The run is
//! bounded (the script's --timeout, and a kill by PID here past it).

mod common;

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Taken by the runs that share the machine's loopback (no namespace).
static SERIAL: Mutex<()> = Mutex::new(());

/// Added to every port of bench/tls.py when runs share the loopback.
const OFFSET: u16 = 22000;

/// The script's own bound on a run, in seconds; past it plus a margin the
/// test kills the script by its PID.
const RUN_TIMEOUT: u64 = 60;

/// Runs bench/tls.py with `args` (plus --siplb and --timeout) and fails the
/// test, with the script's output, unless it exits 0 with `result: ok`.
fn tls_bench(args: &[&str]) {
    common::require("sipp", "sip-tester");
    common::require("openssl", "openssl");
    let (mut cmd, private) = common::python_script(&common::root().join("bench/tls.py"), OFFSET);
    let _serial = (!private).then(|| SERIAL.lock().unwrap_or_else(PoisonError::into_inner));
    cmd.args(args)
        .arg("--siplb")
        .arg(common::siplb_bin())
        .args(["--timeout", &RUN_TIMEOUT.to_string()]);
    let limit = Duration::from_secs(RUN_TIMEOUT + 30);
    let (status, text) = common::bounded(cmd, &format!("tls_{}", args.join("_")), limit);
    common::passed(&format!("bench/tls.py {args:?}"), status, limit, &text);
    assert!(
        text.lines().any(|l| l == "result: ok"),
        "no `result: ok` line\n{text}"
    );
}

/// A certificate renewed by `POST /reload` while calls run over TLS: no call
/// lost, new connections get the new certificate, the old connection stays.
#[test]
fn certificate_reload_under_calls() {
    tls_bench(&["--reload-at", "3", "--seconds", "6", "--rate", "50"]);
}
