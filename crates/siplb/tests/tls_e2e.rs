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

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Added to every port of bench/tls.py when the run shares the loopback.
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

fn require(tool: &str, probe: &[&str], package: &str) {
    assert!(
        Command::new(tool)
            .args(probe)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "{tool} is required: apt-get install {package}"
    );
}

/// Runs bench/tls.py with `args` (plus --siplb and --timeout) and fails the
/// test, with the script's output, unless it exits 0 with `result: ok`.
fn tls_bench(args: &[&str]) {
    // `sipp -v` exits 99 whatever it prints: found on the PATH is enough.
    assert!(
        Command::new("sh")
            .args(["-c", "command -v sipp"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "sipp is required: apt-get install sip-tester"
    );
    require("openssl", &["version"], "openssl");
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
    cmd.arg(root().join("bench/tls.py"))
        .args(args)
        .arg("--siplb")
        .arg(siplb_bin())
        .args(["--timeout", &RUN_TIMEOUT.to_string()]);
    if private.is_none() {
        cmd.args(["--port-offset", &OFFSET.to_string()]);
    }
    // The output goes to a file, not a pipe: nothing blocks while we wait.
    let out_path = std::env::temp_dir().join(format!(
        "siplb-tls-e2e-{}-{}.out",
        std::process::id(),
        args.join("_").replace(['-', ' '], "")
    ));
    let out = File::create(&out_path).unwrap();
    let mut child = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 runs bench/tls.py");
    let limit = Duration::from_secs(RUN_TIMEOUT + 30);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > limit {
            // Its own --timeout did not stop it: stopped here, by its PID.
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
    let Some(status) = status else {
        panic!("bench/tls.py {args:?} still running after {limit:?}: killed\n{text}");
    };
    match status.code() {
        Some(0) => {}
        Some(2) => panic!("bench/tls.py {args:?}: missing program or bad usage\n{text}"),
        _ => panic!("bench/tls.py {args:?} failed ({status})\n{text}"),
    }
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
