//! The performance pipeline end to end, on 127.0.0.1 with real processes:
//! `siplb agent` and `siplb perf-server` binaries, the library's performance
//! server and subscriber in the test. Every process is stopped by its PID
//! (the guard's drop), every wait is bounded.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use perf::client::{PollConfig, TcpConnector};
use perf::server::{AgentSpec, PerfServer, SharedTable, Table};
use perf::{AgentState, Key};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn key_file(dir: &tempdir::Dir, name: &str, key: &str) -> PathBuf {
    let p = dir.0.join(name);
    std::fs::write(&p, key).unwrap();
    p
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("siplb-test-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

const KEY: &str = "e2e-test-key-0123456789abcdef";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn agent(port: u16, key: &PathBuf, synthetic: &str) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_siplb"))
        .args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--interval",
            "100ms",
            "--synthetic",
            synthetic,
        ])
        .arg("--key-file")
        .arg(key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

fn poll() -> PollConfig {
    PollConfig {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(300),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
    }
}

/// Waits (at most `limit`) until `f` holds for the table; returns how long it took.
async fn until(
    shared: &SharedTable,
    limit: Duration,
    what: &str,
    f: impl Fn(&Table) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if f(&shared.load()) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "timed out waiting for: {what}; table: {:#?}",
            shared.load()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn state(t: &Table, id: &str) -> AgentState {
    t.get(id).map_or(AgentState::Connecting, |e| e.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_flows_then_a_killed_agent_is_down_and_a_restarted_one_up() {
    let dir = tempdir::Dir::new("flow");
    let kf = key_file(&dir, "key", KEY);
    let port = free_port();
    let mut a = agent(port, &kf, "cpu=20%,mem=1GB");
    let ps = PerfServer::new(Key::new(KEY.as_bytes()).unwrap(), poll());
    ps.set_agents(&[AgentSpec {
        id: "s1".into(),
        agent: format!("127.0.0.1:{port}"),
    }]);
    let shared = ps.shared().clone();
    until(&shared, Duration::from_secs(10), "s1 up with data", |t| {
        t.get("s1").is_some_and(|e| {
            e.state == AgentState::Up && e.sample.is_some_and(|s| (s.cpu - 0.2).abs() < 1e-9)
        })
    })
    .await;
    let s = shared.load().get("s1").unwrap().sample.unwrap();
    assert_eq!(s.mem_available, 1 << 30);
    assert!(s.window_ms > 0 && s.window_end_ms > 1_700_000_000_000);

    // (The first connection may have been refused before the agent listened.)
    let downs_before = shared.load().get("s1").unwrap().downs;
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let took = until(&shared, Duration::from_secs(5), "s1 down", |t| {
        state(t, "s1") == AgentState::Down
    })
    .await;
    // A killed process's socket is closed by the kernel: down at once, well within the timeout.
    assert!(
        took <= poll().timeout + Duration::from_millis(200),
        "down after {took:?}"
    );

    let _a2 = agent(port, &kf, "cpu=30%,mem=1GB");
    until(&shared, Duration::from_secs(10), "s1 up again", |t| {
        t.get("s1").is_some_and(|e| {
            e.state == AgentState::Up && e.sample.is_some_and(|s| (s.cpu - 0.3).abs() < 1e-9)
        })
    })
    .await;
    assert_eq!(shared.load().get("s1").unwrap().downs, downs_before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_arrives_well_before_the_next_poll() {
    let dir = tempdir::Dir::new("notice");
    let kf = key_file(&dir, "key", KEY);
    let port = free_port();
    let _a = agent(port, &kf, "0s:cpu=10%,mem=1GB;1s:cpu=95%,mem=1GB");
    let slow = PollConfig {
        interval: Duration::from_secs(30),
        ..poll()
    };
    let ps = PerfServer::new(Key::new(KEY.as_bytes()).unwrap(), slow);
    ps.set_agents(&[AgentSpec {
        id: "s1".into(),
        agent: format!("127.0.0.1:{port}"),
    }]);
    let shared = ps.shared().clone();
    // The agent may not have sampled when the first poll arrives; the notice
    // is what must bring the 95 % reading, long before the 30 s poll.
    let took = until(
        &shared,
        Duration::from_secs(8),
        "notice with cpu 95%",
        |t| {
            t.get("s1").is_some_and(|e| {
                e.notices >= 1 && e.sample.is_some_and(|s| (s.cpu - 0.95).abs() < 1e-9)
            })
        },
    )
    .await;
    assert!(took < Duration::from_secs(5), "notice after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_rejected() {
    let dir = tempdir::Dir::new("key");
    let kf = key_file(&dir, "key", KEY);
    let port = free_port();
    let _a = agent(port, &kf, "cpu=20%,mem=1GB");
    let ps = PerfServer::new(Key::new(b"a-different-key-0123456789").unwrap(), poll());
    ps.set_agents(&[AgentSpec {
        id: "s1".into(),
        agent: format!("127.0.0.1:{port}"),
    }]);
    let shared = ps.shared().clone();
    until(
        &shared,
        Duration::from_secs(10),
        "s1 down for its key",
        |t| {
            t.get("s1").is_some_and(|e| {
                e.state == AgentState::Down
                    && e.error
                        .as_deref()
                        .is_some_and(|m| m.contains("authentication failed"))
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = shared.load();
    let e = t.get("s1").unwrap();
    assert_eq!(e.state, AgentState::Down);
    assert!(e.sample.is_none(), "no data ever crossed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_is_down_and_does_not_stall_the_others() {
    let dir = tempdir::Dir::new("hung");
    let kf = key_file(&dir, "key", KEY);
    // Accepts and never says a word.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        hung.set_nonblocking(true).unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(8) {
            if let Ok((s, _)) = hung.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        held.len()
    });
    let port = free_port();
    let _a = agent(port, &kf, "cpu=20%,mem=1GB");
    let ps = PerfServer::new(Key::new(KEY.as_bytes()).unwrap(), poll());
    ps.set_agents(&[
        AgentSpec {
            id: "hung".into(),
            agent: hung_addr.to_string(),
        },
        AgentSpec {
            id: "ok".into(),
            agent: format!("127.0.0.1:{port}"),
        },
    ]);
    let shared = ps.shared().clone();
    let took = until(&shared, Duration::from_secs(5), "hung down", |t| {
        state(t, "hung") == AgentState::Down
    })
    .await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    until(&shared, Duration::from_secs(10), "ok up", |t| {
        state(t, "ok") == AgentState::Up
    })
    .await;
    // The healthy agent keeps being polled while the hung one times out again and again.
    let seq = |t: &Table| t.get("ok").and_then(|e| e.sample).map_or(0, |s| s.seq);
    let before = seq(&shared.load());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let t = shared.load();
    assert!(seq(&t) > before + 5, "ok polled: {} -> {}", before, seq(&t));
    assert_eq!(state(&t, "hung"), AgentState::Down);
    assert!(
        t.get("hung")
            .unwrap()
            .error
            .as_deref()
            .unwrap()
            .contains("timed out")
    );
    drop(ps);
    assert!(holder.join().unwrap() >= 2, "the hung agent was retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_perf_server_serves_its_table_to_subscribers() {
    let dir = tempdir::Dir::new("standalone");
    let kf = key_file(&dir, "key", KEY);
    let (aport, pport) = (free_port(), free_port());
    let _a = agent(aport, &kf, "cpu=40%,mem=2GB");
    let mut p = Proc(
        Command::new(env!("CARGO_BIN_EXE_siplb"))
            .args([
                "perf-server",
                "--listen",
                &format!("127.0.0.1:{pport}"),
                "--poll-interval",
                "100ms",
                "--timeout",
                "300ms",
            ])
            .arg("--key-file")
            .arg(&kf)
            .args([
                "--agent",
                &format!("s1=127.0.0.1:{aport}"),
                "--agent",
                "s2=127.0.0.1:1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let shared = SharedTable::default();
    let sub = tokio::spawn(perf::server::subscribe(
        TcpConnector(format!("127.0.0.1:{pport}")),
        Key::new(KEY.as_bytes()).unwrap(),
        poll(),
        shared.clone(),
    ));
    until(
        &shared,
        Duration::from_secs(10),
        "s1 up through the perf-server",
        |t| {
            t.get("s1").is_some_and(|e| {
                e.state == AgentState::Up && e.sample.is_some_and(|s| (s.cpu - 0.4).abs() < 1e-9)
            })
        },
    )
    .await;
    until(&shared, Duration::from_secs(5), "s2 down", |t| {
        state(t, "s2") == AgentState::Down
    })
    .await;
    let t = shared.load();
    assert!(t.get("s1").unwrap().received.unwrap().elapsed() < Duration::from_secs(2));
    p.0.kill().unwrap();
    p.0.wait().unwrap();
    until(
        &shared,
        Duration::from_secs(5),
        "everything down without the perf-server",
        |t| t.entries.iter().all(|e| e.state == AgentState::Down),
    )
    .await;
    sub.abort();
}

#[test]
fn bad_agent_arguments_exit_2_naming_the_problem() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_siplb"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        "/nonexistent/key",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("key file /nonexistent/key"), "{err}");
    let dir = tempdir::Dir::new("args");
    let short = key_file(&dir, "short", "tiny");
    let (code, err) = run(&[
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        short.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("shorter than 16 bytes"), "{err}");
    let kf = key_file(&dir, "key", KEY);
    let (code, err) = run(&[
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        kf.to_str().unwrap(),
        "--synthetic",
        "cpu=300%,mem=1GB",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cpu must be 0-100%"), "{err}");
    let (code, _) = run(&[
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        kf.to_str().unwrap(),
        "--interval",
        "fast",
    ]);
    assert_eq!(code, Some(2));
    let (code, err) = run(&[
        "perf-server",
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        kf.to_str().unwrap(),
        "--agent",
        "a=127.0.0.1:1",
        "--agent",
        "a=127.0.0.1:2",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("'a' given twice"), "{err}");
}
