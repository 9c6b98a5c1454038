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

/// What the man in the middle does to the agent's lines once the handshake
/// (its first two lines: `hello`, `welcome`) is through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attack {
    /// Pass every line as it is.
    Relay,
    /// Change one byte of every sample: a digit of its CPU.
    Flip,
    /// Send the connection's first sealed line again before each later one.
    Replay,
}

/// A TCP proxy between a performance server and an agent, on 127.0.0.1,
/// that can alter what the agent says. Its task is aborted on drop.
struct Mitm {
    addr: std::net::SocketAddr,
    attack: std::sync::Arc<std::sync::Mutex<Attack>>,
    /// Lines altered or replayed so far.
    done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mitm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mitm {
    async fn start(agent: std::net::SocketAddr) -> Mitm {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let attack = std::sync::Arc::new(std::sync::Mutex::new(Attack::Relay));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (a, d) = (attack.clone(), done.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(agent).await else {
                    continue;
                };
                let (attack, done) = (a.clone(), d.clone());
                conns.spawn(async move {
                    let (dr, mut dw) = down.into_split();
                    let (ur, mut uw) = up.into_split();
                    // The performance server's lines go through untouched.
                    let mut dr = dr;
                    let upward = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut dr, &mut uw).await;
                    });
                    let mut ur = BufReader::new(ur);
                    let mut first_sealed: Option<Vec<u8>> = None;
                    let mut n = 0;
                    loop {
                        let mut line = Vec::new();
                        match ur.read_until(b'\n', &mut line).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        n += 1;
                        // Past hello and welcome, every line is sealed.
                        let now = *attack.lock().unwrap();
                        if n <= 2 {
                        } else if now == Attack::Flip {
                            let at = line
                                .windows(8)
                                .position(|w| w == b"\"cpu\":0.")
                                .map(|p| p + 8);
                            if let Some(i) = at {
                                line[i] = if line[i] == b'9' { b'1' } else { b'9' };
                                done.fetch_add(1, Ordering::SeqCst);
                            }
                        } else if let (Attack::Replay, Some(old)) = (now, &first_sealed) {
                            if dw.write_all(old).await.is_err() {
                                break;
                            }
                            done.fetch_add(1, Ordering::SeqCst);
                        } else if first_sealed.is_none() {
                            first_sealed = Some(line.clone());
                        }
                        if dw.write_all(&line).await.is_err() {
                            break;
                        }
                    }
                    upward.abort();
                });
            }
        });
        Mitm {
            addr,
            attack,
            done,
            task,
        }
    }

    fn set(&self, a: Attack) {
        *self.attack.lock().unwrap() = a;
    }

    fn done(&self) -> usize {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Watches the table every millisecond and keeps every sample `s1` ever
/// showed, so a test can say what never appeared in it.
fn watch_samples(
    shared: &SharedTable,
) -> (
    std::sync::Arc<std::sync::Mutex<Vec<perf::Sample>>>,
    tokio::task::JoinHandle<()>,
) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<perf::Sample>::new()));
    let (s, shared) = (seen.clone(), shared.clone());
    let task = tokio::spawn(async move {
        loop {
            if let Some(sample) = shared.load().get("s1").and_then(|e| e.sample) {
                let mut s = s.lock().unwrap();
                if s.last() != Some(&sample) {
                    s.push(sample);
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    (seen, task)
}

fn down_with(t: &Table, what: &str) -> bool {
    t.get("s1").is_some_and(|e| {
        e.state == AgentState::Down && e.error.as_deref().is_some_and(|m| m.contains(what))
    })
}

/// An agent behind a man in the middle: polled through it, up; then a byte
/// of a sample is changed on the path: the agent is down for "message
/// authentication failed" and the altered value never reaches the table,
/// however often the performance server reconnects; back up once the path
/// is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_altered_on_the_path_is_refused_and_never_reaches_the_table() {
    let dir = tempdir::Dir::new("mitm-flip");
    let kf = key_file(&dir, "key", KEY);
    let port = free_port();
    let _a = agent(port, &kf, "cpu=20%,mem=1GB");
    let mitm = Mitm::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let ps = PerfServer::new(Key::new(KEY.as_bytes()).unwrap(), poll());
    ps.set_agents(&[AgentSpec {
        id: "s1".into(),
        agent: mitm.addr.to_string(),
    }]);
    let shared = ps.shared().clone();
    let (seen, watcher) = watch_samples(&shared);
    let cpu_is = |t: &Table, cpu: f64| {
        t.get("s1").is_some_and(|e| {
            e.state == AgentState::Up && e.sample.is_some_and(|s| (s.cpu - cpu).abs() < 1e-9)
        })
    };
    until(
        &shared,
        Duration::from_secs(10),
        "s1 up through the proxy",
        |t| cpu_is(t, 0.2),
    )
    .await;

    mitm.set(Attack::Flip);
    until(
        &shared,
        Duration::from_secs(5),
        "s1 down for message authentication",
        |t| down_with(t, "message authentication failed"),
    )
    .await;
    // Reconnections meet the same proxy: still down, for the same reason.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(mitm.done() >= 2, "flipped {} lines", mitm.done());
    let t = shared.load();
    assert!(
        down_with(&t, "message authentication failed"),
        "{:#?}",
        t.get("s1")
    );
    assert!((t.get("s1").unwrap().sample.unwrap().cpu - 0.2).abs() < 1e-9);

    let before = t.get("s1").unwrap().sample.unwrap().seq;
    mitm.set(Attack::Relay);
    // Up again with a fresh sample (the table keeps the last good one while
    // the agent is down, so "up" alone may still show the old one).
    until(&shared, Duration::from_secs(10), "s1 up again", |t| {
        cpu_is(t, 0.2)
            && t.get("s1")
                .is_some_and(|e| e.sample.is_some_and(|s| s.seq > before))
    })
    .await;
    // Let the watcher see it too.
    tokio::time::sleep(Duration::from_millis(50)).await;
    watcher.abort();
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= 2, "before and after: {seen:?}");
    assert!(
        seen.iter().all(|s| (s.cpu - 0.2).abs() < 1e-9),
        "a forged value reached the table: {seen:?}"
    );
}

/// The man in the middle sends an earlier sample line again: refused as a
/// replay, the agent down for it, and the table never goes back to the old
/// sample.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_sample_line_is_refused() {
    let dir = tempdir::Dir::new("mitm-replay");
    let kf = key_file(&dir, "key", KEY);
    let port = free_port();
    let _a = agent(port, &kf, "cpu=20%,mem=1GB");
    let mitm = Mitm::start(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let ps = PerfServer::new(Key::new(KEY.as_bytes()).unwrap(), poll());
    ps.set_agents(&[AgentSpec {
        id: "s1".into(),
        agent: mitm.addr.to_string(),
    }]);
    let shared = ps.shared().clone();
    let (seen, watcher) = watch_samples(&shared);
    let seq = |t: &Table| t.get("s1").and_then(|e| e.sample).map_or(0, |s| s.seq);
    until(
        &shared,
        Duration::from_secs(10),
        "s1 up with a few samples",
        |t| state(t, "s1") == AgentState::Up && seq(t) >= 3,
    )
    .await;
    let downs = shared.load().get("s1").unwrap().downs;

    mitm.set(Attack::Replay);
    until(
        &shared,
        Duration::from_secs(5),
        "s1 down for a replayed message",
        |t| down_with(t, "replayed message"),
    )
    .await;
    assert!(mitm.done() >= 1);
    mitm.set(Attack::Relay);
    until(&shared, Duration::from_secs(10), "s1 up again", |t| {
        state(t, "s1") == AgentState::Up
    })
    .await;
    assert!(shared.load().get("s1").unwrap().downs > downs);
    watcher.abort();
    let seen = seen.lock().unwrap();
    assert!(
        seen.windows(2).all(|w| w[0].seq < w[1].seq),
        "the table went back to an older sample: {:?}",
        seen.iter().map(|s| s.seq).collect::<Vec<_>>()
    );
}

/// An agent that speaks protocol version 1: its hello is refused with an
/// error line saying what to upgrade, never answered with `auth`, and the
/// table shows the same words as the server's error (the `error` field of
/// the balancer's GET /servers). And the other way round: a version-1
/// performance server at a version-2 agent is told the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_agent_is_refused_with_a_clear_version_error() {
    use std::io::{BufRead, BufReader, Write};
    let want = "agent speaks protocol v1; this performance server needs v2 (upgrade the agent)";
    let old = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let old_addr = old.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let mut heard = Vec::new();
        old.set_nonblocking(true).unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            let Ok((mut s, _)) = old.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(
                b"{\"type\":\"hello\",\"version\":1,\"role\":\"agent\",\"challenge\":\"eca85bb6e4440848b6d0f089f082184d\"}\n",
            )
            .unwrap();
            let mut r = BufReader::new(s);
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => heard.push(line),
                }
            }
        }
        heard
    });
    let ps = PerfServer::new(Key::new(KEY.as_bytes()).unwrap(), poll());
    ps.set_agents(&[AgentSpec {
        id: "s1".into(),
        agent: old_addr.to_string(),
    }]);
    let shared = ps.shared().clone();
    until(
        &shared,
        Duration::from_secs(5),
        "s1 down for its version",
        |t| {
            t.get("s1")
                .is_some_and(|e| e.state == AgentState::Down && e.error.as_deref() == Some(want))
        },
    )
    .await;
    let heard = fake.join().unwrap();
    assert!(!heard.is_empty());
    let error_line = format!("{{\"type\":\"error\",\"error\":\"{want}\"}}\n");
    assert!(heard.iter().all(|l| *l == error_line), "{heard:?}");
    assert!(shared.load().get("s1").unwrap().sample.is_none());
    drop(ps);

    // A version-2 agent and a version-1 performance server's auth.
    let dir = tempdir::Dir::new("v1");
    let kf = key_file(&dir, "key", KEY);
    let port = free_port();
    let _a = agent(port, &kf, "cpu=20%,mem=1GB");
    let start = Instant::now();
    let s = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(10), "{e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut hello = String::new();
    r.read_line(&mut hello).unwrap();
    assert!(hello.contains("\"version\":2"), "{hello}");
    w.write_all(
        b"{\"type\":\"auth\",\"version\":1,\"mac\":\"00\",\"challenge\":\"0123456789abcdef\"}\n",
    )
    .unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    assert_eq!(
        reply,
        "{\"type\":\"error\",\"error\":\"performance server speaks protocol v1; this agent needs v2 (upgrade the performance server)\"}\n"
    );
    let mut rest = String::new();
    assert_eq!(r.read_line(&mut rest).unwrap(), 0, "closed: {rest}");
}
