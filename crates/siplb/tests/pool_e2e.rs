//! Two balancer instances as one pool behind a virtual IP (issue 17), in
//! short (the second test: A drained with POST /drain instead of killed,
//! and a new call to its own address answered 503 with Retry-After): bench/pool.py puts instance A and instance B in network
//! namespaces of their own (inside one made for this test with `unshare
//! --net`), SIPp servers and a SIPp caller in the outer one calling the
//! VIP, the VIP on A. A dozen calls are placed; half-way, A gets SIGKILL
//! and the VIP moves to B: the calls set up through A finish through B
//! (re-INVITE and BYE by the signed Record-Route), the later ones are set
//! up through B. Passes only when every call succeeded (UDP callers have
//! no connection to lose with A) and some were set up through A.
//!
//! Needs root for the namespaces (`unshare`, `ip netns`, veth pairs): where
//! they cannot be made the test says so and skips. SIPp missing is a
//! failure (CI installs `sip-tester`).

mod common;

use std::time::Duration;

/// The script's own bound on a run, in seconds.
const RUN_TIMEOUT: u64 = 40;

/// Runs bench/pool.py with `args` (12 calls, 6/s, 2 s hold); its output,
/// or `None` (skipped, said why) where the namespaces cannot be made.
fn pool(tag: &str, args: &[&str]) -> Option<String> {
    common::require("sipp", "sip-tester");
    if common::netns().is_none() {
        eprintln!(
            "SKIPPED: cannot make a network namespace here (unshare --net needs root); \
             bench/pool.py needs namespaces of its own"
        );
        return None;
    }
    let (mut cmd, private) = common::python_script(&common::root().join("bench/pool.py"), 0);
    assert!(private, "netns() said a namespace can be made");
    cmd.arg("--siplb")
        .arg(common::siplb_bin())
        .args(["--calls", "12", "--rate", "6", "--hold", "2000"])
        .args(args)
        .args(["--timeout", &RUN_TIMEOUT.to_string()]);
    let limit = Duration::from_secs(RUN_TIMEOUT + 20);
    let (status, text) = common::bounded(cmd, tag, limit);
    if status.and_then(|s| s.code()) == Some(77) {
        eprintln!("SKIPPED: bench/pool.py could not make its namespaces:\n{text}");
        return None;
    }
    common::passed("bench/pool.py", status, limit, &text);
    let summary = common::no_failed_call(&text);
    assert_eq!(summary, "calls=12 ok=12 failed=0", "{text}");
    // A phone's NAT may let in only what comes from the address it sent to.
    assert!(
        text.contains("every answer to the phone from the VIP: True"),
        "{text}"
    );
    println!("{text}");
    Some(text)
}

#[test]
fn the_standby_takes_the_vip_over_mid_call_and_no_call_fails() {
    pool("pool_vip_kill", &["--mode", "kill"]);
}

#[test]
fn a_drained_instance_refuses_new_calls_and_its_calls_finish_through_the_other() {
    if let Some(text) = pool("pool_vip_drain", &["--mode", "drain"]) {
        assert!(
            text.contains("drained A refused a new call with 503 and Retry-After: True"),
            "{text}"
        );
    }
}

/// bench/vip_gone.py: the answers of a transaction still in flight on an
/// instance when the pool's address left it (a planned switchover) reach
/// the phone, from the instance's own address, and are counted
/// (`siplb_udp_source_fallback_total`). Before, Linux refused each send
/// from the departed address (ENETUNREACH) and the call hung: SIPp's
/// caller, past its `100 Trying`, waits for a final answer with no timer.
#[test]
fn answers_in_flight_when_the_vip_leaves_still_reach_the_phone() {
    if common::netns().is_none() {
        eprintln!("SKIPPED: cannot make a network namespace here (unshare --net needs root)");
        return;
    }
    let (mut cmd, private) = common::python_script(&common::root().join("bench/vip_gone.py"), 0);
    assert!(private, "netns() said a namespace can be made");
    cmd.arg("--siplb")
        .arg(common::siplb_bin())
        .args(["--timeout", "30"]);
    let limit = Duration::from_secs(50);
    let (status, text) = common::bounded(cmd, "vip_gone", limit);
    common::passed("bench/vip_gone.py", status, limit, &text);
    assert!(
        text.contains("answers after the VIP left reached the phone, counted: True"),
        "{text}"
    );
    println!("{text}");
}
