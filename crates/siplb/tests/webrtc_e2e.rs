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

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Added to every port of bench/webrtc.py when the run shares the loopback.
const OFFSET: u16 = 22000;

/// The script's own bound on a run, in seconds; past it plus a margin the
/// test kills the script by its PID.
const RUN_TIMEOUT: u64 = 60;

fn siplb_bin() -> PathBuf {
    std::env::var_os("SIPLB_BIN").map_or_else(|| env!("CARGO_BIN_EXE_siplb").into(), PathBuf::from)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// How to run a command in a network namespace of its own with its loopback
/// up (`unshare --net`, as root), tried once; `None` where it cannot.
fn netns() -> Option<&'static [&'static str]> {
    static HOW: OnceLock<Option<&'static [&'static str]>> = OnceLock::new();
    *HOW.get_or_init(|| {
        let way: &'static [&'static str] = &["unshare", "--net"];
        Command::new(way[0])
            .args(&way[1..])
            .args(["sh", "-c", "ip link set lo up"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            .then_some(way)
    })
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` with its output in a file, killed by its PID past `limit`;
/// the exit status (None: killed) and the output.
fn bounded(
    mut cmd: Command,
    tag: &str,
    limit: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let out_path =
        std::env::temp_dir().join(format!("siplb-webrtc-e2e-{}-{tag}.out", std::process::id()));
    let out = File::create(&out_path).unwrap();
    let mut child = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 runs bench/webrtc.py");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut text = String::new();
    File::open(&out_path)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let _ = std::fs::remove_file(&out_path);
    (status, text)
}

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
        assert!(have(tool), "{tool} is required: apt-get install {package}");
    }
    let script = root().join("bench/webrtc.py");

    // JsSIP from the npm registry into the cache, outside the namespace.
    let mut prepare = Command::new("python3");
    prepare.arg(&script).arg("--prepare");
    let (status, text) = bounded(prepare, "prepare", Duration::from_secs(300));
    assert!(
        status.is_some_and(|s| s.success()),
        "bench/webrtc.py --prepare (npm install jssip) failed ({status:?})\n{text}"
    );

    let private = netns();
    let mut cmd = match private {
        Some(unshare) => {
            let mut c = Command::new(unshare[0]);
            c.args(&unshare[1..]).args([
                "sh",
                "-c",
                "ip link set lo up && exec \"$0\" \"$@\"",
                "python3",
            ]);
            c
        }
        None => Command::new("python3"),
    };
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("webrtc-e2e.png");
    cmd.arg(&script)
        .args(args)
        .arg("--siplb")
        .arg(siplb_bin())
        .args(["--timeout", &RUN_TIMEOUT.to_string()])
        .arg("--screenshot")
        .arg(&shot);
    if private.is_none() {
        cmd.args(["--port-offset", &OFFSET.to_string()]);
    }
    let tag = args.join("_").replace(['-', ' '], "");
    let limit = Duration::from_secs(RUN_TIMEOUT + 30);
    let (status, text) = bounded(cmd, &tag, limit);
    let Some(status) = status else {
        panic!("bench/webrtc.py {args:?} still running after {limit:?}: killed\n{text}");
    };
    match status.code() {
        Some(0) => {}
        Some(2) => panic!("bench/webrtc.py {args:?}: missing program or bad usage\n{text}"),
        _ => panic!("bench/webrtc.py {args:?} failed ({status})\n{text}"),
    }
    let summary = text
        .lines()
        .rev()
        .find(|l| l.starts_with("calls="))
        .unwrap_or_else(|| panic!("no summary line\n{text}"));
    assert!(summary.ends_with(" failed=0"), "{summary}\n{text}");
    eprintln!("{summary}; screenshot {}", shot.display());
}

/// Chromium + JsSIP: REGISTER over WSS, one call to the SIPp server behind
/// siplb (INVITE with the browser's offer, 200 with a WebRTC answer, ACK),
/// the browser's BYE answered 200.
#[test]
fn browser_registers_and_calls_over_wss() {
    webrtc(&["--transport", "wss", "--calls", "1"]);
}
