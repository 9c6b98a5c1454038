//! What the e2e tests that drive a bench/ script share: the binary under
//! test, a network namespace of their own where one can be made, a run
//! bounded in time (killed by its PID), and its verdict.

#![allow(dead_code)] // each test binary uses its own part

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The siplb binary under test: `SIPLB_BIN`, else this build's.
pub fn siplb_bin() -> PathBuf {
    std::env::var_os("SIPLB_BIN").map_or_else(|| env!("CARGO_BIN_EXE_siplb").into(), PathBuf::from)
}

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Fails the test unless `tool` is on the PATH.
pub fn require(tool: &str, package: &str) {
    assert!(
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "{tool} is required: apt-get install {package}"
    );
}

/// How to run a command in a network namespace of its own with its loopback
/// up (`unshare --net`, as root), tried once; `None` where it cannot.
pub fn netns() -> Option<&'static [&'static str]> {
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

/// `python3 script` in a namespace of its own when one can be made (its
/// fixed ports are its alone), else as is with `--port-offset offset`;
/// whether it is in a namespace.
pub fn python_script(script: &Path, offset: u16) -> (Command, bool) {
    match netns() {
        Some(unshare) => {
            let mut c = Command::new(unshare[0]);
            c.args(&unshare[1..])
                .args([
                    "sh",
                    "-c",
                    "ip link set lo up && exec \"$0\" \"$@\"",
                    "python3",
                ])
                .arg(script);
            (c, true)
        }
        None => {
            let mut c = Command::new("python3");
            c.arg(script).args(["--port-offset", &offset.to_string()]);
            (c, false)
        }
    }
}

/// Runs `cmd` with its output in a file (nothing blocks on a pipe), killed
/// by its PID past `limit`; the exit status (`None`: killed) and the output.
pub fn bounded(mut cmd: Command, tag: &str, limit: Duration) -> (Option<ExitStatus>, String) {
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let out_path = std::env::temp_dir().join(format!("siplb-e2e-{}-{tag}.out", std::process::id()));
    let out = File::create(&out_path).unwrap();
    let mut child = cmd
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("the script starts");
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
    (status, text)
}

/// Fails the test unless `name`'s run ended with exit status 0 (77: its
/// namespaces could not be made; 2: a missing program or bad usage).
pub fn passed(name: &str, status: Option<ExitStatus>, limit: Duration, text: &str) {
    let Some(status) = status else {
        panic!("{name} still running after {limit:?}: killed\n{text}");
    };
    match status.code() {
        Some(0) => {}
        Some(77) => panic!(
            "{name} could not make its network namespaces (needs root, ip netns, iptables): \
             not a pass\n{text}"
        ),
        Some(2) => panic!("{name}: missing program or bad usage\n{text}"),
        _ => panic!("{name} failed ({status})\n{text}"),
    }
}

/// Fails the test unless the output's last `calls=N ok=K failed=F` line
/// says `failed=0`; that line.
pub fn no_failed_call(text: &str) -> String {
    let summary = text
        .lines()
        .rev()
        .find(|l| l.starts_with("calls="))
        .unwrap_or_else(|| panic!("no summary line\n{text}"));
    assert!(summary.ends_with(" failed=0"), "{summary}\n{text}");
    summary.to_owned()
}

/// A child process, killed (by its PID) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free for UDP and TCP on 127.0.0.1, released for a process to bind.
pub fn free_port() -> u16 {
    for _ in 0..50 {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP in 50 binds");
}

/// `GET path` on the admin API: (status, body).
pub fn get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let code = r.get(9..12)?.parse().ok()?;
    Some((code, r.split_once("\r\n\r\n")?.1.to_owned()))
}

/// `cmd` started in the repository's root, its output to `log`.
pub fn spawn(cmd: &mut Command, log: &Path) -> Proc {
    let log = File::create(log).unwrap();
    Proc(
        cmd.current_dir(root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starts"),
    )
}
