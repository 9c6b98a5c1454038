//! The performance server (FIG 11 304, FIG 12; claims 10-11): one PPC per
//! agent and the table of what they report. The table is an immutable
//! snapshot swapped atomically (`arc-swap`), so the balancer's hot path reads
//! it without a lock. It runs embedded in the balancer, or standalone
//! (`siplb perf-server`) serving its table to several balancers that
//! subscribe over the same protocol.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::client::{self, Connector, PollConfig, TcpConnector, Update};
use crate::error::Error;
use crate::protocol::{
    self, AgentState, Key, LineReader, MAX_LINE, MAX_TABLE_LINE, Msg, ServerStatus,
};
use crate::sample::Sample;

/// What the performance server knows of one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Configured server id.
    pub id: Arc<str>,
    /// The agent's address.
    pub agent: Arc<str>,
    /// Whether the agent answers.
    pub state: AgentState,
    /// The latest sample, kept while down (state says whether to use it).
    pub sample: Option<Sample>,
    /// When the sample arrived here.
    pub received: Option<Instant>,
    /// Why the agent is down, when it is.
    pub error: Option<Arc<str>>,
    /// Notices received.
    pub notices: u64,
    /// Times the agent was marked down.
    pub downs: u64,
}

impl Entry {
    fn new(id: &str, agent: &str) -> Entry {
        Entry {
            id: id.into(),
            agent: agent.into(),
            state: AgentState::Connecting,
            sample: None,
            received: None,
            error: None,
            notices: 0,
            downs: 0,
        }
    }

    fn apply(&mut self, u: Update, now: Instant) {
        match u {
            Update::Data(s) => {
                self.state = AgentState::Up;
                self.sample = Some(s);
                self.received = Some(now);
                self.error = None;
            }
            Update::Notice(s, _) => {
                self.state = AgentState::Up;
                self.sample = Some(s);
                self.received = Some(now);
                self.error = None;
                self.notices += 1;
            }
            Update::Down(e) => {
                if self.state != AgentState::Down {
                    self.downs += 1;
                }
                self.state = AgentState::Down;
                self.error = Some(e.into());
            }
        }
    }

    /// The entry as the wire protocol's `table` says it.
    #[must_use]
    pub fn status(&self, now: Instant) -> ServerStatus {
        ServerStatus {
            id: self.id.to_string(),
            agent: self.agent.to_string(),
            state: self.state,
            sample: self.sample,
            age_ms: self
                .received
                .map(|r| now.saturating_duration_since(r).as_millis() as u64),
            error: self.error.as_deref().map(str::to_owned),
        }
    }
}

/// A snapshot of every agent's entry, in configured order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    /// One entry per server.
    pub entries: Vec<Entry>,
}

impl Table {
    /// The entry of a server id.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| &*e.id == id)
    }

    /// The entry of a server id, looked for first at `slot` (where the
    /// caller expects it: the table keeps the order of the agents given),
    /// then everywhere: O(1) per lookup when the orders agree.
    #[must_use]
    pub fn get_at(&self, slot: usize, id: &str) -> Option<&Entry> {
        match self.entries.get(slot) {
            Some(e) if &*e.id == id => Some(e),
            _ => self.get(id),
        }
    }
}

/// The shared, lock-free-to-read table and its change counter.
#[derive(Debug, Clone)]
pub struct SharedTable {
    table: Arc<ArcSwap<Table>>,
    changed: watch::Sender<u64>,
}

impl Default for SharedTable {
    fn default() -> Self {
        SharedTable {
            table: Arc::new(ArcSwap::from_pointee(Table::default())),
            changed: watch::channel(0).0,
        }
    }
}

impl SharedTable {
    /// The current snapshot (cheap; no lock).
    #[must_use]
    pub fn load(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// A receiver that sees a new value on every change.
    #[must_use]
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn update(&self, f: impl Fn(&mut Table)) {
        self.table.rcu(|t| {
            let mut t = Table::clone(t);
            f(&mut t);
            t
        });
        self.changed.send_modify(|n| *n += 1);
    }

    fn apply(&self, id: &str, u: Update) {
        let now = Instant::now();
        self.update(|t| {
            if let Some(e) = t.entries.iter_mut().find(|e| &*e.id == id) {
                e.apply(u.clone(), now);
            }
        });
    }
}

/// One server to watch: its id and its agent's `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSpec {
    /// Server id.
    pub id: String,
    /// Agent address, `host:port`.
    pub agent: String,
}

/// The performance server: PPCs and their table.
#[derive(Debug)]
pub struct PerfServer {
    key: Key,
    poll: PollConfig,
    shared: SharedTable,
    ppcs: Mutex<HashMap<String, (String, AbortHandle)>>,
}

impl PerfServer {
    /// A performance server with no agents yet.
    #[must_use]
    pub fn new(key: Key, poll: PollConfig) -> Arc<PerfServer> {
        Arc::new(PerfServer {
            key,
            poll,
            shared: SharedTable::default(),
            ppcs: Mutex::new(HashMap::new()),
        })
    }

    /// The table.
    #[must_use]
    pub fn shared(&self) -> &SharedTable {
        &self.shared
    }

    /// Watches exactly these agents: a PPC is created for each new one,
    /// kept for unchanged ones (with their state), stopped for removed ones.
    /// Must be called within a tokio runtime.
    pub fn set_agents(&self, specs: &[AgentSpec]) {
        self.set_agents_with(specs, |s| TcpConnector(s.agent.clone()));
    }

    /// [`PerfServer::set_agents`] with a chosen way to connect (tests).
    pub fn set_agents_with<C: Connector>(
        &self,
        specs: &[AgentSpec],
        connector: impl Fn(&AgentSpec) -> C,
    ) {
        let mut ppcs = self
            .ppcs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ppcs.retain(|id, (agent, handle)| {
            let keep = specs.iter().any(|s| &s.id == id && &s.agent == agent);
            if !keep {
                handle.abort();
            }
            keep
        });
        for s in specs {
            if ppcs.contains_key(&s.id) {
                continue;
            }
            let shared = self.shared.clone();
            let id = s.id.clone();
            let mut up = None;
            let task = tokio::spawn(client::run(
                connector(s),
                self.key.clone(),
                self.poll,
                move |u| {
                    // Log transitions once, not every poll.
                    match &u {
                        Update::Down(e) if up != Some(false) => {
                            warn!(server = %id, error = %e, "agent down");
                            up = Some(false);
                        }
                        Update::Down(e) => debug!(server = %id, error = %e, "agent still down"),
                        Update::Data(_) | Update::Notice(..) if up != Some(true) => {
                            info!(server = %id, "agent up");
                            up = Some(true);
                        }
                        Update::Notice(s, events) => {
                            info!(server = %id, ?events, cpu = s.cpu, "notice")
                        }
                        Update::Data(_) => {}
                    }
                    shared.apply(&id, u);
                },
            ));
            ppcs.insert(s.id.clone(), (s.agent.clone(), task.abort_handle()));
        }
        self.shared.update(|t| {
            let old = std::mem::take(&mut t.entries);
            t.entries = specs
                .iter()
                .map(|s| {
                    old.iter()
                        .find(|e| *e.id == *s.id && *e.agent == *s.agent)
                        .cloned()
                        .unwrap_or_else(|| Entry::new(&s.id, &s.agent))
                })
                .collect();
        });
    }
}

impl Drop for PerfServer {
    fn drop(&mut self) {
        let ppcs = self
            .ppcs
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (_, (_, h)) in ppcs.drain() {
            h.abort();
        }
    }
}

/// How the standalone performance server serves its subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriberConfig {
    /// Most subscriber connections open at once (default 64, as the agent):
    /// one more is refused with an `error` line, counted and logged.
    pub max_connections: usize,
    /// Time allowed for the handshake and the `subscribe` (default 5 s).
    pub handshake_timeout: Duration,
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Serves the table to subscribing balancers until `shutdown` resolves,
/// with the default [`SubscriberConfig`].
pub async fn serve_subscribers(
    listener: TcpListener,
    key: Key,
    shared: SharedTable,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_subscribers_with(listener, key, shared, SubscriberConfig::default(), shutdown).await;
}

/// Serves the table to subscribing balancers until `shutdown` resolves.
pub async fn serve_subscribers_with(
    listener: TcpListener,
    key: Key,
    shared: SharedTable,
    cfg: SubscriberConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    // Connections live in a set owned here, so stopping stops them all.
    let mut conns = tokio::task::JoinSet::new();
    let mut refused = 0u64;
    let accept = async {
        loop {
            while conns.try_join_next().is_some() {}
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
                    "too many subscriber connections; refusing"
                );
                conns.spawn(async move {
                    let mut stream = stream;
                    let msg = Msg::Error {
                        error: "too many connections".into(),
                    };
                    let _ = protocol::write_msg(&mut stream, &msg).await;
                });
                continue;
            };
            let (key, shared) = (key.clone(), shared.clone());
            conns.spawn(async move {
                match subscriber(stream, &key, &shared, &cfg).await {
                    Ok(()) => debug!(%peer, "subscriber left"),
                    Err(e) if e.is_refusal() => {
                        warn!(%peer, error = %e, "subscriber connection closed");
                    }
                    Err(e) => info!(%peer, error = %e, "subscriber connection closed"),
                }
                drop(permit);
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
    conns.abort_all();
}

async fn subscriber(
    stream: tokio::net::TcpStream,
    key: &Key,
    shared: &SharedTable,
    cfg: &SubscriberConfig,
) -> Result<(), Error> {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = LineReader::new(r, MAX_LINE);
    let limit = cfg.handshake_timeout;
    let session = tokio::time::timeout(
        limit,
        protocol::accept_handshake(&mut r, &mut w, key, "perf-server"),
    )
    .await
    .map_err(|_| Error::Timeout(limit))??;
    let (mut r, mut w) = session.attach(r, w);
    let first = tokio::time::timeout(limit, r.next())
        .await
        .map_err(|_| Error::Timeout(limit))
        .and_then(|m| m);
    match first {
        Ok(Some(Msg::Subscribe {})) => {}
        Ok(Some(_)) => {
            let err = Error::Unexpected("expected subscribe");
            w.send_error(&err, limit).await;
            return Err(err);
        }
        Ok(None) => return Ok(()),
        Err(e) => {
            w.send_error(&e, limit).await;
            return Err(e);
        }
    }
    let mut changes = shared.changes();
    // The subscriber says nothing more; this notices when it leaves (or
    // sends a line that does not authenticate). One future polled to its
    // end, never dropped midway, so reading need not be cancel-safe.
    let gone = async {
        loop {
            match r.next().await {
                Ok(Some(Msg::Error { error })) => return Err(Error::Peer(error)),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    };
    tokio::pin!(gone);
    // A heartbeat table at least every second, so a subscriber can tell a
    // quiet pool from a dead performance server.
    let heartbeat = Duration::from_secs(1);
    let result = loop {
        let now = Instant::now();
        let table = shared.load();
        let msg = Msg::Table {
            servers: table.entries.iter().map(|e| e.status(now)).collect(),
        };
        if let Err(e) = w.send(&msg).await {
            break Err(e);
        }
        // Coalesce bursts of changes: at most 20 tables a second.
        tokio::time::sleep(Duration::from_millis(50)).await;
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep(heartbeat) => {}
            left = &mut gone => break left,
        }
    };
    if let Err(e) = &result {
        w.send_error(e, limit).await;
    }
    result
}

/// Keeps `shared` in step with a standalone performance server's table
/// (for a balancer that does not poll agents itself). When the performance
/// server stops answering, every entry goes down after `cfg.timeout` plus
/// the heartbeat, and the subscription is retried with backoff.
pub async fn subscribe<C: Connector>(conn: C, key: Key, cfg: PollConfig, shared: SharedTable) {
    let mut backoff = cfg.backoff_min;
    loop {
        let err = subscription(&conn, &key, &cfg, &shared).await;
        warn!(error = %err, "performance server subscription lost");
        let now = Instant::now();
        let reason: Arc<str> = format!("performance server: {err}").into();
        shared.update(|t| {
            for e in &mut t.entries {
                e.apply(Update::Down(reason.to_string()), now);
            }
        });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
}

async fn subscription<C: Connector>(
    conn: &C,
    key: &Key,
    cfg: &PollConfig,
    shared: &SharedTable,
) -> Error {
    let stream = match tokio::time::timeout(cfg.timeout, conn.connect()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return e.into(),
        Err(_) => return Error::Timeout(cfg.timeout),
    };
    let (r, mut w) = tokio::io::split(stream);
    let mut r = LineReader::new(r, MAX_TABLE_LINE);
    let session = match tokio::time::timeout(
        cfg.timeout,
        protocol::connect_handshake(&mut r, &mut w, key, "perf-server"),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return e,
        Err(_) => return Error::Timeout(cfg.timeout),
    };
    let (mut r, mut w) = session.attach(r, w);
    if let Err(e) = w.send(&Msg::Subscribe {}).await {
        return e;
    }
    let err = tables(&mut r, cfg, shared).await;
    w.send_error(&err, cfg.timeout.min(Duration::from_millis(100)))
        .await;
    err
}

/// Applies every `table` the performance server pushes; returns why it stopped.
async fn tables<R: tokio::io::AsyncRead + Unpin>(
    r: &mut protocol::Reader<R>,
    cfg: &PollConfig,
    shared: &SharedTable,
) -> Error {
    // A table comes at least every second; allow the timeout on top.
    let patience = cfg.timeout + Duration::from_secs(1);
    loop {
        let m = match tokio::time::timeout(patience, r.next()).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return e,
            Err(_) => return Error::Timeout(patience),
        };
        match m {
            Some(Msg::Table { servers }) => {
                let now = Instant::now();
                shared.update(|t| {
                    t.entries = servers
                        .iter()
                        .map(|s| Entry {
                            id: s.id.as_str().into(),
                            agent: s.agent.as_str().into(),
                            state: s.state,
                            sample: s.sample,
                            received: s
                                .age_ms
                                .map(|a| now.checked_sub(Duration::from_millis(a)).unwrap_or(now)),
                            error: s.error.as_deref().map(Into::into),
                            notices: t.get(&s.id).map_or(0, |e| e.notices),
                            downs: t.get(&s.id).map_or(0, |e| e.downs),
                        })
                        .collect();
                });
            }
            Some(Msg::Error { error }) => return Error::Peer(error),
            Some(_) => return Error::Unexpected("a performance server sends table or error"),
            None => return Error::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn the_subscriber_listener_refuses_connections_beyond_its_cap() {
        assert_eq!(SubscriberConfig::default().max_connections, 64);
        let key = Key::new(b"0123456789abcdef-server-test").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = SubscriberConfig {
            max_connections: 1,
            ..SubscriberConfig::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_subscribers_with(
            listener,
            key.clone(),
            SharedTable::default(),
            cfg,
            async {
                let _ = stopped.await;
            },
        ));
        // The first subscriber is served: sealed tables arrive.
        let (r1, mut w1) = TcpStream::connect(addr).await.unwrap().into_split();
        let mut r1 = LineReader::new(r1, MAX_TABLE_LINE);
        let session = protocol::connect_handshake(&mut r1, &mut w1, &key, "perf-server")
            .await
            .unwrap();
        let (mut r1, mut w1) = session.attach(r1, w1);
        w1.send(&Msg::Subscribe {}).await.unwrap();
        assert!(matches!(r1.next().await.unwrap(), Some(Msg::Table { .. })));
        // A second one is refused at once, with a reason.
        let mut r2 = LineReader::new(TcpStream::connect(addr).await.unwrap(), MAX_LINE);
        assert_eq!(
            r2.next().await.unwrap(),
            Some(Msg::Error {
                error: "too many connections".into()
            })
        );
        assert_eq!(r2.next().await.unwrap(), None);
        // When the first leaves, its slot is free again.
        drop((r1, w1));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut r3 = LineReader::new(TcpStream::connect(addr).await.unwrap(), MAX_LINE);
            match r3.next().await.unwrap() {
                Some(Msg::Hello { .. }) => break,
                other => assert!(Instant::now() < deadline, "{other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(()).unwrap();
        server.await.unwrap();
    }

    #[test]
    fn get_at_looks_at_the_slot_first_then_everywhere() {
        let t = Table {
            entries: vec![
                Entry::new("a", "x:1"),
                Entry::new("b", "x:2"),
                Entry::new("c", "x:3"),
            ],
        };
        assert_eq!(t.get_at(1, "b").map(|e| &*e.id), Some("b"));
        // A stale slot still finds the id.
        assert_eq!(t.get_at(0, "c").map(|e| &*e.id), Some("c"));
        assert_eq!(t.get_at(9, "a").map(|e| &*e.id), Some("a"));
        assert!(t.get_at(1, "z").is_none());
    }
}
