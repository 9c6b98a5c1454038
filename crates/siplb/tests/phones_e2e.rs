//! Real phones through siplb (issue 13), in short: bench/phones.py with two
//! Kamailio registrars as the pool (Debian package `kamailio`) and two
//! baresip phones (Debian package `baresip`), alice calling bob, one side
//! hanging up, over UDP, TCP and TLS, and with bob behind NAT. Each test
//! places 2-4 calls and passes only when every call was set up and its BYE
//! reached the other phone, on the phone's transport, and was answered.
//!
//! Missing programs are a failure, not a skip: CI installs kamailio,
//! baresip and openssl with apt (`apt-get install kamailio baresip
//! openssl`). The NAT tests need root (network namespaces, veth pairs,
//! iptables MASQUERADE in a namespace of their own); where the script cannot
//! make them it exits 77, and the test fails saying so.
//!
//! bench/phones.py uses fixed ports (siplb 5060/5061, admin 8060, Kamailio
//! 5081/5082, phones 5310/5320, their control 4441/4442, RTP 10000-10199).
//! Each run gets a network namespace of its own where one can be made (its
//! own loopback: those ports are its alone, and the tests run in parallel);
//! elsewhere the runs take turns (SERIAL) with every port moved up by
//! OFFSET, away from other test beds on the machine. Every run is bounded
//! (the script's --timeout, and a kill by PID here past it).

mod common;

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Taken by the runs that share the machine's loopback (no namespace).
static SERIAL: Mutex<()> = Mutex::new(());

/// Added to every port of bench/phones.py when runs share the loopback.
const OFFSET: u16 = 21000;

/// The script's own bound on a run, in seconds; past it plus a margin the
/// test kills the script by its PID.
const RUN_TIMEOUT: u64 = 60;

/// Runs bench/phones.py with `args` (plus --siplb and --timeout) and fails
/// the test, with the script's output, unless it exits 0 with the summary
/// line `calls=N ok=N failed=0`.
fn phones(args: &[&str]) {
    common::require("kamailio", "kamailio");
    common::require("baresip", "baresip");
    let (mut cmd, private) = common::python_script(&common::root().join("bench/phones.py"), OFFSET);
    let _serial = (!private).then(|| SERIAL.lock().unwrap_or_else(PoisonError::into_inner));
    cmd.args(args)
        .arg("--siplb")
        .arg(common::siplb_bin())
        .args(["--timeout", &RUN_TIMEOUT.to_string()]);
    let limit = Duration::from_secs(RUN_TIMEOUT + 30);
    let (status, text) = common::bounded(cmd, &format!("phones_{}", args.join("_")), limit);
    common::passed(&format!("bench/phones.py {args:?}"), status, limit, &text);
    common::no_failed_call(&text);
}

#[test]
fn udp_caller_hangs_up() {
    phones(&["--transport", "udp", "--calls", "2", "--hangup", "caller"]);
}

#[test]
fn udp_callee_hangs_up() {
    phones(&["--transport", "udp", "--calls", "2", "--hangup", "callee"]);
}

/// The bug of issue 13: when the callee hangs up, siplb sends the BYE from
/// the server to the caller over UDP to its Request-URI, though the caller
/// is on TCP (its Contact says `transport=tcp`, its connection is open).
#[test]
fn tcp_callee_hangs_up() {
    phones(&["--transport", "tcp", "--calls", "2", "--hangup", "callee"]);
}

#[test]
fn tcp_caller_hangs_up() {
    phones(&["--transport", "tcp", "--calls", "2", "--hangup", "caller"]);
}

#[test]
fn tls_either_side_hangs_up() {
    common::require("openssl", "openssl");
    phones(&["--transport", "tls", "--calls", "2", "--hangup", "both"]);
}

#[test]
fn nat_over_tcp() {
    phones(&[
        "--transport",
        "tcp",
        "--nat",
        "--calls",
        "2",
        "--hangup",
        "both",
    ]);
}

#[test]
fn nat_over_udp() {
    phones(&[
        "--transport",
        "udp",
        "--nat",
        "--calls",
        "2",
        "--hangup",
        "both",
    ]);
}

/// TLS on both sides: phones to siplb, siplb to the Kamailios (their tls
/// module, Debian package kamailio-tls-modules; siplb checks their
/// certificate against the test CA), and the Kamailios' own requests (the
/// INVITE along our Path, the BYE along our Record-Route) back to siplb
/// over TLS connections they open.
#[test]
fn tls_phones_and_tls_servers() {
    phones(&[
        "--transport",
        "tls",
        "--server-transport",
        "tls",
        "--calls",
        "2",
        "--hangup",
        "both",
    ]);
}

/// UDP phones, TLS servers: a double Record-Route across the two.
#[test]
fn udp_phones_and_tls_servers() {
    phones(&[
        "--transport",
        "udp",
        "--server-transport",
        "tls",
        "--calls",
        "2",
        "--hangup",
        "both",
    ]);
}
