//! `siplb load` end to end: the generator's UAC and UAS through a real
//! `siplb balancer` on loopback (every call completes, the UAS saw each
//! INVITE once), and with no UAS at all (every call fails by timeout,
//! counted, and the UAC exits by itself). Ports are picked at run time;
//! every process is stopped by its PID (the guard's drop); every wait is
//! bounded.

mod common;

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{bounded, siplb_bin};

static DIRS: AtomicU32 = AtomicU32::new(0);

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "siplb-load-e2e-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(args: &[&str], out: &std::path::Path) -> Proc {
    let f = File::create(out).unwrap();
    Proc(
        Command::new(siplb_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("siplb starts"),
    )
}

/// The value of `key=` in a `key=value ...` line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a count in {line}"))
}

fn last_line<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.lines()
        .rev()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no '{prefix}' line in\n{text}"))
}

/// A balancer with one server (`server`), policy static, as
/// bench/ceiling.py runs it; its SIP address, once its admin API answers.
fn balancer(d: &std::path::Path, server: SocketAddr) -> (Proc, SocketAddr) {
    std::fs::write(d.join("key"), "load-e2e-key-0123456789abcdef\n").unwrap();
    for _ in 0..5 {
        let sip = SocketAddr::from(([127, 0, 0, 1], udp_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], tcp_port()));
        let config = d.join("one.toml");
        std::fs::write(
            &config,
            format!(
                "[sip]\nlisten = [\"{sip}\"]\ntransports = [\"udp\"]\n\
                 [routing]\nsecret = \"load-e2e-secret-0123456789abcdef\"\npolicy = \"static\"\n\
                 [perf]\nkey_file = \"{}\"\n[admin]\nlisten = \"{admin}\"\n\
                 [[servers]]\nid = \"s1\"\naddress = \"{server}\"\ncapacity = 1000\n",
                d.join("key").display()
            ),
        )
        .unwrap();
        let mut p = spawn(
            &["balancer", "--config", config.to_str().unwrap()],
            &d.join("balancer.log"),
        );
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if p.0.try_wait().unwrap().is_some() {
                break; // a port taken meanwhile: try others
            }
            if TcpStream::connect_timeout(&admin, Duration::from_millis(200)).is_ok() {
                return (p, sip);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!(
        "the balancer did not start:\n{}",
        std::fs::read_to_string(d.join("balancer.log")).unwrap_or_default()
    );
}

#[test]
fn every_call_through_the_balancer_completes_and_the_uas_sees_each_invite_once() {
    let d = dir();
    let uas_addr = SocketAddr::from(([127, 0, 0, 1], udp_port()));
    let uas_out = d.join("uas.out");
    let mut uas = spawn(
        &[
            "load",
            "uas",
            "--listen",
            &uas_addr.to_string(),
            "--idle-exit",
            "5s",
            "--seconds",
            "120s",
        ],
        &uas_out,
    );
    let (_lb, sip) = balancer(&d, uas_addr);
    let mut uac = Command::new(siplb_bin());
    uac.args(["load", "uac", &sip.to_string()])
        .args(["--rate", "200", "--seconds", "2", "--sockets", "2"])
        .args(["--timeout", "8s"]);
    let limit = Duration::from_secs(60);
    let (status, text) = bounded(uac, "load_uac_through", limit);
    let line = last_line(&text, "uac ").to_owned();
    assert!(
        status.is_some(),
        "the UAC still ran after {limit:?}\n{text}"
    );
    assert_eq!(field(&line, "calls"), 400, "{line}");
    assert_eq!(field(&line, "ok"), 400, "{line}");
    assert_eq!(field(&line, "failed"), 0, "{line}");
    assert!(status.unwrap().success(), "{text}");
    // The UAS exits once it has been idle for 5 s (bounded here all the same).
    let start = Instant::now();
    while uas.0.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let uas_text = std::fs::read_to_string(&uas_out).unwrap();
    let u = last_line(&uas_text, "uas ");
    assert_eq!(field(u, "invites"), 400, "{u}");
    assert_eq!(field(u, "acks"), 400, "{u}");
    // A BYE the UAC sent again (a busy machine) reaches the UAS too.
    assert_eq!(
        field(u, "byes"),
        400 + field(&line, "bye_retrans"),
        "{u}\n{line}"
    );
    assert_eq!(field(u, "ack_timeouts"), 0, "{u}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn with_no_uas_every_call_fails_by_timeout_and_the_uac_exits() {
    // A port nobody reads: held open, so nothing else takes it and no ICMP
    // error comes back.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = silent.local_addr().unwrap();
    let mut uac = Command::new(siplb_bin());
    uac.args(["load", "uac", &target.to_string()])
        .args(["--rate", "100", "--calls", "20"])
        .args(["--timeout", "1s", "--t1", "100ms"]);
    let limit = Duration::from_secs(60);
    let (status, text) = bounded(uac, "load_uac_silent", limit);
    let Some(status) = status else {
        panic!("the UAC still ran after {limit:?}: killed\n{text}");
    };
    let line = last_line(&text, "uac ");
    assert_eq!(status.code(), Some(1), "{text}");
    assert_eq!(field(line, "calls"), 20, "{line}");
    assert_eq!(field(line, "ok"), 0, "{line}");
    assert_eq!(field(line, "failed"), 20, "{line}");
    assert_eq!(field(line, "invite_timeout"), 20, "{line}");
    // Timer A ran: each INVITE went out again before its call was given up.
    assert!(field(line, "invite_retrans") >= 20, "{line}");
    drop(silent);
}

/// A UAS that answers each INVITE with 200, the 200 again, then a 180 (a
/// retransmission and a response reordered behind the final one), each BYE
/// with 200 twice, and ignores ACK; until `stop`.
fn misbehaving_uas(sock: UdpSocket, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = vec![0u8; 65_535];
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, src)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Ok(m) = sip::Message::parse(&buf[..n]) else {
            continue;
        };
        let answers: &[(u16, &str)] = match m.method() {
            sip::Method::Invite => &[(200, "OK"), (200, "OK"), (180, "Ringing")],
            sip::Method::Bye => &[(200, "OK"), (200, "OK")],
            _ => &[],
        };
        for &(code, reason) in answers {
            out.clear();
            sip::reply::response_for(&m, code, reason, b"odd", &[], &mut out);
            sock.send_to(&out, src).unwrap();
        }
    }
}

#[test]
fn a_repeated_200_is_acked_again_and_late_responses_are_counted_not_failed() {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let target = sock.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let uas = {
        let stop = stop.clone();
        std::thread::spawn(move || misbehaving_uas(sock, stop))
    };
    let mut uac = Command::new(siplb_bin());
    uac.args(["load", "uac", &target.to_string()]).args([
        "--rate",
        "100",
        "--calls",
        "50",
        "--timeout",
        "8s",
    ]);
    let limit = Duration::from_secs(60);
    let (status, text) = bounded(uac, "load_uac_odd", limit);
    stop.store(true, Ordering::Relaxed);
    uas.join().unwrap();
    let line = last_line(&text, "uac ");
    assert!(status.is_some_and(|s| s.success()), "{text}");
    assert_eq!(field(line, "ok"), 50, "{line}");
    assert_eq!(field(line, "failed"), 0, "{line}");
    // Each call's second 200 got an ACK of its own; its 180 (after the 200)
    // and its BYE's second 200 changed nothing (the last call's may come
    // after the UAC, its calls all done, has stopped reading). A request
    // sent again (a busy machine) brings its answers again.
    let (ir, br) = (field(line, "invite_retrans"), field(line, "bye_retrans"));
    assert_eq!(field(line, "reacks"), 50 + 2 * ir, "{line}");
    let dups = field(line, "duplicates");
    assert!((99 + ir..=100 + ir + 2 * br).contains(&dups), "{line}");
    assert_eq!(field(line, "strays"), 0, "{line}");
}
