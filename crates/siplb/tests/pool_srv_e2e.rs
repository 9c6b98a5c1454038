//! Three balancer instances as one pool behind a DNS name (issue 17, the
//! DNS SRV variant), in short: bench/pool_srv.py puts instances A, B and C
//! in network namespaces of their own (inside one made for this test with
//! `unshare --net`), dnsmasq publishing `_sip._udp.sip.pool.test` SRV
//! records for the three, every instance with `sip.record_route =
//! "sip.pool.test"`, and Kamailio as the SIPp phones' outbound proxy
//! resolving the pool by SRV (new calls, and the in-dialog requests by
//! siplb's Record-Route) and trying the next SRV target when one does not
//! answer (RFC 3263 §4.3). 24 calls; once A has set up two, A gets SIGKILL: the calls A held finish through B and C (re-INVITE, BYE), new
//! calls go on over them. Passes only when every instance carried calls, A
//! held dialogs when it died and no call failed beyond the transactions A
//! held at that moment (printed).
//!
//! Needs root for the namespaces: where `unshare --net` cannot make one, or
//! dnsmasq is not installed, the test says so and skips. SIPp or Kamailio
//! missing is a failure (CI installs `sip-tester` and `kamailio`).

mod common;

use std::process::Command;
use std::time::Duration;

/// The script's own bound on a run, in seconds (the test: < 40 s).
const RUN_TIMEOUT: u64 = 35;

#[test]
fn calls_spread_over_srv_targets_and_survive_one_instance_killed() {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("dnsmasq") || !have("unshare") {
        eprintln!(
            "SKIPPED: dnsmasq (dnsmasq-base) or unshare (util-linux) is not installed; \
             bench/pool_srv.py needs both"
        );
        return;
    }
    common::require("sipp", "sip-tester");
    common::require("kamailio", "kamailio");
    if common::netns().is_none() {
        eprintln!(
            "SKIPPED: cannot make a network namespace here (unshare --net needs root); \
             bench/pool_srv.py needs namespaces of its own"
        );
        return;
    }
    let (mut cmd, private) = common::python_script(&common::root().join("bench/pool_srv.py"), 0);
    assert!(private, "netns() said a namespace can be made");
    cmd.arg("--siplb")
        .arg(common::siplb_bin())
        .args(["--calls", "24", "--rate", "8", "--hold", "2000"])
        .args(["--timeout", &RUN_TIMEOUT.to_string()]);
    let limit = Duration::from_secs(RUN_TIMEOUT + 4);
    let (status, text) = common::bounded(cmd, "pool_srv_kill", limit);
    if status.and_then(|s| s.code()) == Some(77) {
        eprintln!("SKIPPED: bench/pool_srv.py could not make its namespaces:\n{text}");
        return;
    }
    println!("{text}");
    common::passed("bench/pool_srv.py", status, limit, &text);
    let summary = common::no_failed_call(&text);
    assert_eq!(summary, "calls=24 ok=24 failed=0", "{text}");
    for i in ["B", "C"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("instance {i} ")) && !l.contains("new calls 0,")),
            "instance {i} carried no call\n{text}"
        );
    }
    assert!(text.contains("A killed (pid"), "{text}");
}
