//! A real browser through siplb over secure WebSocket (issue 14), in short:
//! bench/webrtc.py with headless Chromium (Debian package `chromium`)
//! running JsSIP (npm, the version pinned in the script), registering
//! through siplb over WSS (a throwaway CA; Chromium trusts the server
//! certificate by its key, --ignore-certificate-errors-spki-list), calling
//! a SIPp server behind siplb over UDP and hanging up. It passes only when
//! the call was registered, confirmed and ended by a BYE answered 200, as
//! the page saw it on its WebSocket and as SIPp saw it.
//!
//! Missing programs are a failure, not a skip: CI installs them with apt
//! (`apt-get install chromium sip-tester openssl nodejs npm`). JsSIP comes
//! from the npm registry once (`bench/webrtc.py --prepare`, into
//! ~/.cache/siplb-webrtc or $SIPLB_WEBRTC_CACHE); that step runs outside the
//! network namespace, the run itself inside one where one can be made (its
//! own loopback: the script's fixed ports are its alone), elsewhere with
//! every port moved up by OFFSET. The screenshot of the page at the end is
//! kept in the target folder (CARGO_TARGET_TMPDIR/webrtc-e2e.png).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Added to every port of bench/webrtc.py when the run shares the loopback.
const OFFSET: u16 = 22000;

/// The script's own bound on a run, in seconds; past it plus a margin the
/// test kills the script by its PID.
const RUN_TIMEOUT: u64 = 60;

/// Runs bench/webrtc.py with `args` (plus --siplb, --timeout, --screenshot)
/// and fails the test, with the script's output, unless it exits 0 with the
/// summary line `calls=N ok=N failed=0`.
fn webrtc(args: &[&str]) {
    for (tool, package) in [
        ("chromium", "chromium"),
        ("sipp", "sip-tester"),
        ("openssl", "openssl"),
        ("npm", "npm"),
    ] {
        common::require(tool, package);
    }
    let script = common::root().join("bench/webrtc.py");

    // JsSIP from the npm registry into the cache, outside the namespace.
    let mut prepare = Command::new("python3");
    prepare.arg(&script).arg("--prepare");
    let (status, text) = common::bounded(prepare, "webrtc_prepare", Duration::from_secs(300));
    assert!(
        status.is_some_and(|s| s.success()),
        "bench/webrtc.py --prepare (npm install jssip) failed ({status:?})\n{text}"
    );

    let (mut cmd, _) = common::python_script(&script, OFFSET);
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("webrtc-e2e.png");
    cmd.args(args)
        .arg("--siplb")
        .arg(common::siplb_bin())
        .args(["--timeout", &RUN_TIMEOUT.to_string()])
        .arg("--screenshot")
        .arg(&shot);
    let limit = Duration::from_secs(RUN_TIMEOUT + 30);
    let (status, text) = common::bounded(cmd, &format!("webrtc_{}", args.join("_")), limit);
    common::passed(&format!("bench/webrtc.py {args:?}"), status, limit, &text);
    let summary = common::no_failed_call(&text);
    eprintln!("{summary}; screenshot {}", shot.display());
}

/// Chromium + JsSIP: REGISTER over WSS, one call to the SIPp server behind
/// siplb (INVITE with the browser's offer, 200 with a WebRTC answer, ACK),
/// the browser's BYE answered 200.
#[test]
fn browser_registers_and_calls_over_wss() {
    webrtc(&["--transport", "wss", "--calls", "1"]);
}
