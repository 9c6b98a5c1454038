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

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Taken by the runs that share the machine's loopback (no namespace).
static SERIAL: Mutex<()> = Mutex::new(());

/// Added to every port of bench/phones.py when runs share the loopback.
const OFFSET: u16 = 21000;

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

/// Runs bench/phones.py with `args` (plus --siplb and --timeout) and fails
/// the test, with the script's output, unless it exits 0 with the summary
/// line `calls=N ok=N failed=0`.
fn phones(args: &[&str]) {
    for (tool, package) in [("kamailio", "kamailio"), ("baresip", "baresip")] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is required: apt-get install {package}"
        );
    }
    let private = netns();
    let _serial = private
        .is_none()
        .then(|| SERIAL.lock().unwrap_or_else(PoisonError::into_inner));
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
    cmd.arg(root().join("bench/phones.py"))
        .args(args)
        .arg("--siplb")
        .arg(siplb_bin())
        .args(["--timeout", &RUN_TIMEOUT.to_string()]);
    if private.is_none() {
        cmd.args(["--port-offset", &OFFSET.to_string()]);
    }
    // The output goes to a file, not a pipe: nothing blocks while we wait.
    let out_path = std::env::temp_dir().join(format!(
        "siplb-phones-e2e-{}-{}.out",
        std::process::id(),
        args.join("_").replace(['-', ' '], "")
    ));
    let out = File::create(&out_path).unwrap();
    let mut child = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3 runs bench/phones.py");
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
        panic!("bench/phones.py {args:?} still running after {limit:?}: killed\n{text}");
    };
    match status.code() {
        Some(0) => {}
        Some(77) => panic!(
            "bench/phones.py {args:?} could not make its network namespaces \
             (needs root, ip netns, iptables): not a pass\n{text}"
        ),
        Some(2) => panic!("bench/phones.py {args:?}: missing program or bad usage\n{text}"),
        _ => panic!("bench/phones.py {args:?} failed ({status})\n{text}"),
    }
    let summary = text
        .lines()
        .rev()
        .find(|l| l.starts_with("calls="))
        .unwrap_or_else(|| panic!("no summary line\n{text}"));
    assert!(summary.ends_with(" failed=0"), "{summary}\n{text}");
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
    assert!(
        Command::new("openssl")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "openssl is required: apt-get install openssl"
    );
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
