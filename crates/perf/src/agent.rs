//! The performance agent (FIG 11 1102, FIG 13; claims 12-13), one per SIP
//! server: a collection controller that samples and caches, a server socket
//! with a worker per performance-server connection answering `get` from the
//! cache, and a notification controller that pushes a `notice` on every open
//! connection at once when a threshold is crossed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, broadcast, watch};
use tracing::{debug, info, warn};

use crate::collect::Collector;
use crate::error::Error;
use crate::protocol::{self, Event, Key, LineReader, MAX_LINE, Msg};
use crate::sample::Sample;

/// Thresholds of the notification controller (FIG 13 step 1326).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// CPU busy fraction above which `cpu_high` is pushed (default 0.85).
    pub cpu_high: f64,
    /// How far below `cpu_high` CPU must fall to push `cpu_normal` (default 0.05).
    pub cpu_hysteresis: f64,
    /// Available bytes below which `mem_low` is pushed (default 10 MB).
    pub mem_low: u64,
    /// How far above `mem_low` memory must rise to push `mem_normal` (default 2 MB).
    pub mem_hysteresis: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            cpu_high: 0.85,
            cpu_hysteresis: 0.05,
            mem_low: 10_000_000,
            mem_hysteresis: 2_000_000,
        }
    }
}

/// The notification controller's state: which thresholds are crossed now.
/// Pure; hysteresis keeps a value hovering at a line from flapping.
#[derive(Debug, Clone, Copy, Default)]
pub struct Notifier {
    cpu_high: bool,
    mem_low: bool,
}

impl Notifier {
    /// Feeds one sample; returns the crossings it causes (empty when none).
    pub fn observe(&mut self, t: &Thresholds, s: &Sample) -> Vec<Event> {
        let mut events = Vec::new();
        if !self.cpu_high && s.cpu > t.cpu_high {
            self.cpu_high = true;
            events.push(Event::CpuHigh);
        } else if self.cpu_high && s.cpu < t.cpu_high - t.cpu_hysteresis {
            self.cpu_high = false;
            events.push(Event::CpuNormal);
        }
        if !self.mem_low && s.mem_available < t.mem_low {
            self.mem_low = true;
            events.push(Event::MemLow);
        } else if self.mem_low && s.mem_available > t.mem_low.saturating_add(t.mem_hysteresis) {
            self.mem_low = false;
            events.push(Event::MemNormal);
        }
        events
    }
}

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The pre-shared key.
    pub key: Key,
    /// Sampling interval (default 500 ms).
    pub interval: Duration,
    /// Notification thresholds.
    pub thresholds: Thresholds,
    /// A connection silent this long is closed (default 30 s).
    pub idle_timeout: Duration,
    /// Time allowed for the handshake (default 5 s).
    pub handshake_timeout: Duration,
    /// Most performance-server connections open at once (default 64).
    pub max_connections: usize,
}

impl AgentConfig {
    /// Defaults around a key.
    #[must_use]
    pub fn new(key: Key) -> Self {
        AgentConfig {
            key,
            interval: Duration::from_millis(500),
            thresholds: Thresholds::default(),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs an agent on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    cfg: AgentConfig,
    mut collector: Box<dyn Collector>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let (cache_tx, cache_rx) = watch::channel::<Option<Sample>>(None);
    let (notice_tx, _) = broadcast::channel::<Arc<Msg>>(16);

    // Collection controller (steps 1304-1310) and notification controller
    // (1322-1328), in one task: every sample is checked as it is cached.
    let collection = {
        let cfg = cfg.clone();
        let notice_tx = notice_tx.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            // A baseline reading first (CPU is a difference of counters), so
            // the first sample covers a whole interval; until then `get`
            // answers with no sample.
            let _ = collector.read(Duration::ZERO);
            let mut last_end = SystemTime::now();
            let first = tokio::time::Instant::now() + cfg.interval;
            let mut tick = tokio::time::interval_at(first, cfg.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut notifier = Notifier::default();
            let mut seq = 0;
            loop {
                tick.tick().await;
                let reading = match collector.read(start.elapsed()) {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(error = %e, "cannot read performance data; keeping the last sample");
                        continue;
                    }
                };
                let end = SystemTime::now();
                seq += 1;
                let sample = Sample {
                    seq,
                    window_end_ms: unix_ms(end),
                    window_ms: end
                        .duration_since(last_end)
                        .map_or(0, |d| d.as_millis() as u32),
                    cpus: reading.cpus,
                    cpu: reading.cpu,
                    mem_available: reading.mem_available,
                    mem_total: reading.mem_total,
                };
                last_end = end;
                cache_tx.send_replace(Some(sample));
                let events = notifier.observe(&cfg.thresholds, &sample);
                if !events.is_empty() {
                    info!(
                        ?events,
                        cpu = sample.cpu,
                        mem_available = sample.mem_available,
                        "threshold crossed"
                    );
                    let _ = notice_tx.send(Arc::new(Msg::Notice { events, sample }));
                }
            }
        })
    };

    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    // Workers live in a set owned here, so stopping the agent stops them all.
    let mut workers = tokio::task::JoinSet::new();
    let mut refused = 0u64;
    let accept = async {
        loop {
            // Reap finished workers as we go.
            while workers.try_join_next().is_some() {}
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                refused += 1;
                warn!(
                    %peer,
                    max = cfg.max_connections,
                    refused,
                    "too many performance-server connections; refusing"
                );
                workers.spawn(refuse(stream));
                continue;
            };
            let (cfg, cache, notices) = (cfg.clone(), cache_rx.clone(), notice_tx.subscribe());
            let _ = stream.set_nodelay(true);
            workers.spawn(async move {
                match serve(stream, &cfg, cache, notices).await {
                    Ok(()) => debug!(%peer, "performance server left"),
                    Err(e) if e.is_refusal() => {
                        warn!(%peer, error = %e, "performance connection closed");
                    }
                    Err(e) => info!(%peer, error = %e, "performance connection closed"),
                }
                drop(permit);
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
    collection.abort();
    workers.abort_all();
}

async fn refuse(mut stream: TcpStream) {
    let _ = protocol::write_msg(
        &mut stream,
        &Msg::Error {
            error: "too many connections".into(),
        },
    )
    .await;
}

/// A worker per connection (steps 1312-1320): handshake, then answer `get`
/// from the cache and pass on notices, until the peer leaves or goes silent
/// for `idle_timeout`.
///
/// # Errors
/// Why the connection ended, when it was not a clean close.
pub async fn serve<S>(
    stream: S,
    cfg: &AgentConfig,
    cache: watch::Receiver<Option<Sample>>,
    mut notices: broadcast::Receiver<Arc<Msg>>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, mut w) = tokio::io::split(stream);
    let mut r = LineReader::new(r, MAX_LINE);
    let session = tokio::time::timeout(
        cfg.handshake_timeout,
        protocol::accept_handshake(&mut r, &mut w, &cfg.key, "agent"),
    )
    .await
    .map_err(|_| Error::Timeout(cfg.handshake_timeout))??;
    // From here on every line is sealed and numbered (docs/protocol.md).
    let (r, mut w) = session.attach(r, w);

    // Reading lines is not cancel-safe, so it has its own task.
    let (reader, mut lines) = protocol::spawn_reader(r);
    let result = async {
        loop {
            tokio::select! {
                m = tokio::time::timeout(cfg.idle_timeout, lines.recv()) => {
                    let m = m.map_err(|_| Error::Timeout(cfg.idle_timeout))?.unwrap_or(Ok(None))?;
                    match m {
                        None => return Ok(()),
                        Some(Msg::Get { id }) => {
                            let sample = *cache.borrow();
                            w.send(&Msg::Data { id, sample }).await?;
                        }
                        // The performance server says why it closes (a bad MAC...).
                        Some(Msg::Error { error }) => return Err(Error::Peer(error)),
                        Some(_) => return Err(Error::Unexpected("an agent answers get only")),
                    }
                }
                n = notices.recv() => match n {
                    Ok(msg) => w.send(&msg).await?,
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
            }
        }
    }
    .await;
    if let Err(e) = &result {
        w.send_error(e, cfg.handshake_timeout).await;
    }
    reader.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(cpu: f64, mem: u64) -> Sample {
        Sample {
            seq: 1,
            window_end_ms: 0,
            window_ms: 500,
            cpus: 1.0,
            cpu,
            mem_available: mem,
            mem_total: mem * 2,
        }
    }

    /// A performance client that speaks through the agent's `serve` on a
    /// pipe, framing its own lines so a test can alter them.
    #[tokio::test]
    async fn a_tampered_or_replayed_get_closes_the_connection_with_the_reason() {
        use tokio::io::AsyncWriteExt;
        for attack in ["tamper", "replay", "bare"] {
            let key = Key::new(b"0123456789abcdef-agent-test").unwrap();
            let cfg = AgentConfig::new(key.clone());
            let (_cache_tx, cache) = watch::channel(Some(sample(0.25, 1 << 30)));
            let (_notice_tx, notices) = broadcast::channel(4);
            let (a, b) = tokio::io::duplex(1 << 16);
            let agent = tokio::spawn(async move { serve(a, &cfg, cache, notices).await });
            let (r, mut w) = tokio::io::split(b);
            let mut r = LineReader::new(r, MAX_LINE);
            let (mut seal, mut open) = protocol::connect_handshake(&mut r, &mut w, &key, "agent")
                .await
                .unwrap()
                .split();
            let get1 = seal.seal(&Msg::Get { id: 1 }).unwrap();
            w.write_all(&get1).await.unwrap();
            let reply = open.open(r.next_line().await.unwrap().unwrap()).unwrap();
            assert!(
                matches!(reply, Msg::Data { id: 1, sample: Some(s) } if s.cpu == 0.25),
                "{reply:?}"
            );
            let (bad, why) = match attack {
                "tamper" => {
                    let get2 = String::from_utf8(seal.seal(&Msg::Get { id: 2 }).unwrap()).unwrap();
                    (
                        get2.replace("\"id\":2", "\"id\":3"),
                        "message authentication failed",
                    )
                }
                "replay" => (String::from_utf8(get1).unwrap(), "replayed message"),
                _ => (
                    "{\"type\":\"get\",\"id\":2}\n".to_owned(),
                    "message authentication failed",
                ),
            };
            w.write_all(bad.as_bytes()).await.unwrap();
            // The agent says why, sealed, and closes.
            match open.open(r.next_line().await.unwrap().unwrap()).unwrap() {
                Msg::Error { error } => assert!(error.starts_with(why), "{attack}: {error}"),
                other => panic!("{attack}: {other:?}"),
            }
            assert!(r.next_line().await.unwrap().is_none(), "{attack}: closed");
            let e = agent.await.unwrap().unwrap_err();
            assert!(
                e.is_refusal() && e.to_string().starts_with(why),
                "{attack}: {e}"
            );
        }
    }

    #[test]
    fn hysteresis_keeps_a_hovering_value_from_flapping() {
        let t = Thresholds::default();
        let mut n = Notifier::default();
        assert!(n.observe(&t, &sample(0.5, 1 << 30)).is_empty());
        assert_eq!(n.observe(&t, &sample(0.86, 1 << 30)), [Event::CpuHigh]);
        // Hovering around 85 %: no new notice.
        for cpu in [0.84, 0.86, 0.83, 0.851, 0.81] {
            assert!(n.observe(&t, &sample(cpu, 1 << 30)).is_empty(), "{cpu}");
        }
        assert_eq!(n.observe(&t, &sample(0.79, 1 << 30)), [Event::CpuNormal]);
        assert_eq!(
            n.observe(&t, &sample(0.9, 5_000_000)),
            [Event::CpuHigh, Event::MemLow]
        );
        assert!(n.observe(&t, &sample(0.9, 11_000_000)).is_empty());
        assert_eq!(n.observe(&t, &sample(0.9, 12_500_000)), [Event::MemNormal]);
    }
}
