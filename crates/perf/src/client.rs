//! The persistent performance client (PPC, FIG 12; claims 10-11): one per
//! agent, kept for the life of the performance server. It connects,
//! authenticates, polls `get` on a fixed schedule, takes pushed notices at
//! once, marks the agent down when a reply does not come within the timeout,
//! and reconnects with capped exponential backoff.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until, timeout};

use crate::error::Error;
use crate::protocol::{self, Event, Key, LineReader, MAX_LINE, Msg};
use crate::sample::Sample;

/// Polling schedule and limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollConfig {
    /// Time between two `get`s (default 500 ms).
    pub interval: Duration,
    /// No reply (or no connection, or no handshake) within this marks the
    /// agent down (default 1 s).
    pub timeout: Duration,
    /// First reconnection delay (default 100 ms), doubled on each failure...
    pub backoff_min: Duration,
    /// ...up to this (default 5 s).
    pub backoff_max: Duration,
}

impl Default for PollConfig {
    fn default() -> Self {
        PollConfig {
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What a PPC learns.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A `get` was answered with this sample.
    Data(Sample),
    /// The agent pushed a notice.
    Notice(Sample, Vec<Event>),
    /// The agent is not answering, and why.
    Down(String),
}

/// Opens a byte stream to one agent.
pub trait Connector: Send + Sync + 'static {
    /// The stream type.
    type Stream: AsyncRead + AsyncWrite + Send + 'static;
    /// Connects.
    fn connect(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

/// Connects over TCP to `host:port`.
#[derive(Debug, Clone)]
pub struct TcpConnector(pub String);

impl Connector for TcpConnector {
    type Stream = tokio::net::TcpStream;

    async fn connect(&self) -> std::io::Result<Self::Stream> {
        let s = tokio::net::TcpStream::connect(&self.0).await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

/// Runs one PPC forever, reporting to `sink`.
pub async fn run<C: Connector>(
    conn: C,
    key: Key,
    cfg: PollConfig,
    mut sink: impl FnMut(Update) + Send,
) {
    let mut backoff = cfg.backoff_min;
    loop {
        let mut answered = false;
        let err = session(&conn, &key, &cfg, &mut sink, &mut answered).await;
        sink(Update::Down(err.to_string()));
        if answered {
            backoff = cfg.backoff_min;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

/// One connection's life; returns why it ended.
async fn session<C: Connector>(
    conn: &C,
    key: &Key,
    cfg: &PollConfig,
    sink: &mut (impl FnMut(Update) + Send),
    answered: &mut bool,
) -> Error {
    let stream = match timeout(cfg.timeout, conn.connect()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return e.into(),
        Err(_) => return Error::Timeout(cfg.timeout),
    };
    let (r, mut w) = tokio::io::split(stream);
    let mut r = LineReader::new(r, MAX_LINE);
    let session = match timeout(
        cfg.timeout,
        protocol::connect_handshake(&mut r, &mut w, key, "agent"),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return e,
        Err(_) => return Error::Timeout(cfg.timeout),
    };
    // From here on every line is sealed and numbered: a line altered,
    // forged or replayed on the path ends the session before it is parsed.
    let (r, mut w) = session.attach(r, w);
    // Reading is not cancel-safe: a task reads, the loop below races the
    // channel (which is) against the poll schedule and the reply deadline.
    let (reader, mut rx) = protocol::spawn_reader(r);
    let mut id = 0u64;
    let mut next_poll = Instant::now();
    let mut waiting: Option<(u64, Instant)> = None;
    let err = loop {
        let wake = waiting.map_or(next_poll, |(_, deadline)| deadline);
        tokio::select! {
            () = sleep_until(wake) => {
                if waiting.is_some() {
                    break Error::Timeout(cfg.timeout);
                }
                id += 1;
                let now = Instant::now();
                match timeout(cfg.timeout, w.send(&Msg::Get { id })).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break e,
                    Err(_) => break Error::Timeout(cfg.timeout),
                }
                waiting = Some((id, now + cfg.timeout));
                // A fixed schedule, not "interval after the reply".
                next_poll += cfg.interval;
                if next_poll <= now {
                    next_poll = now + cfg.interval;
                }
            }
            m = rx.recv() => match m {
                Some(Ok(Some(Msg::Data { id: rid, sample }))) if waiting.is_some_and(|(w, _)| w == rid) => {
                    waiting = None;
                    // An agent that has not sampled yet answers without one.
                    if let Some(s) = sample {
                        *answered = true;
                        sink(Update::Data(s));
                    }
                }
                Some(Ok(Some(Msg::Notice { events, sample }))) => sink(Update::Notice(sample, events)),
                Some(Ok(Some(Msg::Error { error }))) => break Error::Peer(error),
                Some(Ok(Some(_))) => break Error::Unexpected("an agent sends data, notice or error"),
                Some(Ok(None)) | None => break Error::Closed,
                Some(Err(e)) => break e,
            }
        }
    };
    reader.abort();
    // Tell the agent why (a bad MAC, a replay...), briefly: the down must
    // not wait on a stuck socket.
    w.send_error(&err, cfg.timeout.min(Duration::from_millis(100)))
        .await;
    err
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn key() -> Key {
        Key::new(b"0123456789abcdef-test-key").unwrap()
    }

    fn sample(seq: u64) -> Sample {
        Sample {
            seq,
            window_end_ms: 0,
            window_ms: 500,
            cpus: 1.0,
            cpu: 0.25,
            mem_available: 1 << 30,
            mem_total: 1 << 32,
        }
    }

    /// How the fake agent behaves on the next connection.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Mode {
        /// Answer this many gets, then go silent (keep the socket open).
        AnswerThenHang(usize),
        /// Refuse the connection.
        Refuse,
    }

    #[derive(Clone)]
    struct Fake {
        mode: Arc<Mutex<Mode>>,
        gets: Arc<Mutex<Vec<Instant>>>,
        connects: Arc<Mutex<Vec<Instant>>>,
    }

    impl Connector for Fake {
        type Stream = tokio::io::DuplexStream;

        async fn connect(&self) -> std::io::Result<Self::Stream> {
            self.connects.lock().unwrap().push(Instant::now());
            let mode = *self.mode.lock().unwrap();
            if mode == Mode::Refuse {
                return Err(std::io::ErrorKind::ConnectionRefused.into());
            }
            let (ours, theirs) = tokio::io::duplex(1 << 16);
            let gets = self.gets.clone();
            tokio::spawn(async move {
                let (r, mut w) = tokio::io::split(theirs);
                let mut r = LineReader::new(r, MAX_LINE);
                let session = protocol::accept_handshake(&mut r, &mut w, &key(), "agent")
                    .await
                    .unwrap();
                let (mut r, mut w) = session.attach(r, w);
                let Mode::AnswerThenHang(n) = mode else {
                    return;
                };
                let mut answered = 0;
                while let Ok(Some(Msg::Get { id })) = r.next().await {
                    gets.lock().unwrap().push(Instant::now());
                    if answered < n {
                        answered += 1;
                        let s = Some(sample(id));
                        w.send(&Msg::Data { id, sample: s }).await.unwrap();
                    }
                }
            });
            Ok(ours)
        }
    }

    fn fake(mode: Mode) -> Fake {
        Fake {
            mode: Arc::new(Mutex::new(mode)),
            gets: Arc::default(),
            connects: Arc::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn polls_on_a_fixed_schedule() {
        let f = fake(Mode::AnswerThenHang(usize::MAX));
        let updates = Arc::new(Mutex::new(Vec::new()));
        let u = updates.clone();
        let task = tokio::spawn(run(f.clone(), key(), PollConfig::default(), move |x| {
            u.lock().unwrap().push(x);
        }));
        tokio::time::sleep(Duration::from_millis(2_600)).await;
        task.abort();
        let gets = f.gets.lock().unwrap().clone();
        assert_eq!(gets.len(), 6, "gets at 0, 0.5, 1, 1.5, 2, 2.5 s");
        for w in gets.windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_millis(500));
        }
        assert_eq!(
            f.connects.lock().unwrap().len(),
            1,
            "one persistent connection"
        );
        assert!(
            updates
                .lock()
                .unwrap()
                .iter()
                .all(|u| matches!(u, Update::Data(_)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_agent_is_down_at_the_timeout_and_retried_with_backoff() {
        let f = fake(Mode::AnswerThenHang(2));
        let downs = Arc::new(Mutex::new(Vec::new()));
        let d = downs.clone();
        let start = Instant::now();
        let task = tokio::spawn(run(f.clone(), key(), PollConfig::default(), move |x| {
            if let Update::Down(e) = x {
                d.lock().unwrap().push((Instant::now(), e));
            }
        }));
        // Gets at 0 and 0.5 s are answered; the one at 1 s is not: down at 2 s.
        tokio::time::sleep(Duration::from_millis(1_990)).await;
        assert!(downs.lock().unwrap().is_empty());
        *f.mode.lock().unwrap() = Mode::Refuse;
        tokio::time::sleep(Duration::from_millis(20)).await;
        {
            let d = downs.lock().unwrap();
            assert_eq!(d.len(), 1);
            assert_eq!(d[0].0 - start, Duration::from_secs(2));
            assert!(d[0].1.contains("timed out"), "{}", d[0].1);
        }
        // Refused reconnections: 100 ms after the down, then 200, 400, ... up to 5 s.
        tokio::time::sleep(Duration::from_secs(30)).await;
        task.abort();
        let c = f.connects.lock().unwrap().clone();
        let gaps: Vec<u128> = c
            .windows(2)
            .skip(1)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        assert_eq!(c[1] - start, Duration::from_millis(2_100));
        assert_eq!(&gaps[..6], &[200, 400, 800, 1600, 3200, 5000]);
        assert!(gaps[6..].iter().all(|&g| g == 5000));
    }
}
