//! The balancer's forwarding (FIG 4 box 402) and routing (box 404): what
//! happens to each SIP message, and the sockets it comes and goes on.
//!
//! Each UDP socket (several on one port with SO_REUSEPORT) and each TCP
//! connection has one task that handles its messages one after the other,
//! so the messages of one flow leave in the order they came. The decision
//! path reads the performance table, the scoring parameters and the pool
//! from `arc-swap` snapshots and the session table from a lock-free map: no
//! lock is taken per message.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use perf::server::SharedTable;
use sip::{Edits, HeaderName, MaxForwards, Message, Method, Received, Transport as SipTransport};
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::affinity::Signer;
use crate::config::{Config, Health, OnNoServer, RegisterMode, ServerConfig, Transport};
use crate::load::Input;
use crate::merge;
use crate::query::{LiveScoring, input_for};
use crate::select::{Facts, Patent, Policy, PoolView};
use crate::sessions::{Kind, Sessions};
use crate::stats::{Drop, ServerStats, Stats};

/// One server of the pool, as the running balancer holds it.
#[derive(Debug)]
pub struct Server {
    /// Its configuration.
    pub cfg: ServerConfig,
    /// Its id, shared with the session table.
    pub id: Arc<str>,
    /// `sb` value of our Record-Route for it.
    pub sb: String,
    /// Counters and drain state (kept across reloads).
    pub stats: Arc<ServerStats>,
    tcp: Arc<TcpOut>,
    /// Where its entry is expected in the performance table (the order of
    /// the servers with an agent).
    slot: usize,
}

/// The pool: servers in configured order.
#[derive(Debug, Default)]
pub struct Pool {
    /// The servers.
    pub servers: Vec<Arc<Server>>,
}

impl Pool {
    fn by_id(&self, id: &str) -> Option<&Arc<Server>> {
        self.servers.iter().find(|s| &*s.id == id)
    }

    fn by_addr(&self, a: SocketAddr) -> Option<&Arc<Server>> {
        self.servers.iter().find(|s| s.cfg.address == a)
    }
}

/// Where a message came from.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A datagram on UDP socket `sock`.
    Udp {
        /// Sender.
        peer: SocketAddr,
        /// Index of our socket.
        sock: usize,
    },
    /// A TCP connection a UA opened to us.
    TcpIn {
        /// Peer.
        peer: SocketAddr,
        /// Connection id.
        conn: u64,
    },
    /// A TCP connection we opened to a server.
    TcpServer {
        /// The server's address.
        peer: SocketAddr,
    },
}

impl Source {
    fn peer(&self) -> SocketAddr {
        match *self {
            Source::Udp { peer, .. } | Source::TcpIn { peer, .. } | Source::TcpServer { peer } => {
                peer
            }
        }
    }
}

/// A persistent TCP connection to a server, opened on first need and reused.
#[derive(Debug, Default)]
struct TcpOut {
    tx: Mutex<Option<mpsc::Sender<Bytes>>>,
}

/// A CANCEL for `invite` as its UA would send it (RFC 3261 §9.1): same
/// Request-URI, top Via, Call-ID, From, To, Route, CSeq number.
fn cancel_for(invite: &Message<'_>) -> Vec<u8> {
    let mut c = Vec::with_capacity(512);
    c.extend_from_slice(b"CANCEL ");
    c.extend_from_slice(invite.request_uri().map_or(&b""[..], |u| u.raw));
    c.extend_from_slice(b" SIP/2.0\r\nVia: ");
    c.extend_from_slice(invite.top_via().raw);
    c.extend_from_slice(b"\r\nMax-Forwards: 70\r\n");
    for h in invite.headers() {
        if matches!(
            h.name,
            HeaderName::From | HeaderName::To | HeaderName::CallId | HeaderName::Route
        ) {
            c.extend_from_slice(h.line);
        }
    }
    c.extend_from_slice(
        format!(
            "CSeq: {} CANCEL\r\nContent-Length: 0\r\n\r\n",
            invite.cseq().seq
        )
        .as_bytes(),
    );
    c
}

/// What our branch says besides the transaction: a fork leg or an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Branch {
    /// Attempt N of a (possibly failed-over) transaction; 0 writes nothing.
    Attempt(u8),
    /// Leg N of a forked REGISTER.
    Fork(usize),
}

/// A REGISTER forked to several servers (RFC 3261 §16.7).
#[derive(Debug)]
struct Fork {
    request: Vec<u8>,
    reply_to: Source,
    pending: usize,
    finals: Vec<(u16, Vec<u8>)>,
    done: bool,
}

/// A new session's INVITE, tried server after server (client transaction
/// state for failover: RFC 3261 §16.7 with our own retry policy).
#[derive(Debug)]
struct Attempt {
    /// The INVITE as the UA sent it.
    request: Vec<u8>,
    reply_to: Source,
    tried: SmallVec<[Arc<str>; 4]>,
    /// Attempt number, written into our branch (`a1`, `a2`...).
    index: u8,
    /// The current attempt got a response.
    answered: bool,
    /// A final response went to the UA (relayed or ours).
    done: bool,
    /// We answered the UA ourselves: its ACK stops here.
    local_final: bool,
    /// The best failure so far, our Via removed.
    best: Option<(u16, Vec<u8>)>,
    /// Timer C runs from here: the INVITE's forwarding to the current
    /// server, or its last provisional response above 100.
    timer_c_from: Instant,
}

/// The running balancer.
pub struct Proxy {
    cfg: ArcSwap<Config>,
    pool: ArcSwap<Pool>,
    /// Session table.
    pub sessions: Sessions,
    /// Scoring parameters, live.
    pub scoring: LiveScoring,
    policy: ArcSwap<Box<dyn Policy>>,
    /// The performance table.
    pub table: SharedTable,
    /// Counters.
    pub stats: Stats,
    signer: Signer,
    udp: Vec<Arc<UdpSocket>>,
    tcp_in: papaya::HashMap<u64, mpsc::Sender<Bytes>>,
    next_conn: AtomicU64,
    forks: papaya::HashMap<u64, Arc<Mutex<Fork>>>,
    attempts: papaya::HashMap<u64, Arc<Mutex<Attempt>>>,
    failover_timers: mpsc::UnboundedSender<(Instant, u64, u8)>,
    clock: Instant,
    /// Set by SIGTERM: new sessions are refused.
    pub stopping: AtomicBool,
    via_udp: String,
    via_tcp: String,
    rr: String,
    me: std::sync::Weak<Proxy>,
    /// A seeded generator for selection (the demo's `--seed`); production
    /// uses the thread's generator, seeded by the OS, and takes no lock.
    seeded: std::sync::OnceLock<Mutex<rand::rngs::StdRng>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// Largest datagram we read.
const MAX_DATAGRAM: usize = 65_535;

impl Proxy {
    /// Builds the balancer around bound UDP sockets and a performance table.
    ///
    /// # Errors
    /// Invalid scoring in the config.
    pub fn new(
        cfg: Config,
        udp: Vec<Arc<UdpSocket>>,
        table: SharedTable,
    ) -> Result<Arc<Proxy>, crate::load::ScoringError> {
        let signer = Signer::new(&cfg.secret);
        let hostport = format!("{}:{}", cfg.advertise_host, cfg.advertise_port);
        let scoring = LiveScoring::new(cfg.scoring)?;
        let (timers_tx, timers_rx) = mpsc::unbounded_channel();
        let p = Arc::new_cyclic(|me| Proxy {
            me: me.clone(),
            seeded: std::sync::OnceLock::new(),
            sessions: Sessions::new(cfg.max_sessions),
            scoring,
            policy: ArcSwap::from_pointee(
                crate::policy::by_name(&cfg.policy).unwrap_or_else(|| Box::new(Patent)),
            ),
            table,
            stats: Stats::default(),
            pool: ArcSwap::from_pointee(Pool::default()),
            udp,
            tcp_in: papaya::HashMap::new(),
            next_conn: AtomicU64::new(1),
            forks: papaya::HashMap::new(),
            attempts: papaya::HashMap::new(),
            failover_timers: timers_tx,
            clock: Instant::now(),
            stopping: AtomicBool::new(false),
            via_udp: format!("SIP/2.0/UDP {hostport};branch=z9hG4bK"),
            via_tcp: format!("SIP/2.0/TCP {hostport};branch=z9hG4bK"),
            rr: format!("<sip:{hostport};lr;sb="),
            signer,
            cfg: ArcSwap::from_pointee(cfg),
        });
        p.apply_servers(&p.cfg.load().servers.clone());
        tokio::spawn(Proxy::failover_timer(Arc::downgrade(&p), timers_rx));
        Ok(p)
    }

    /// Makes selection repeatable: draws come from a generator seeded with
    /// `seed` (for test beds; it serialises selections behind a lock).
    pub fn seed_selection(&self, seed: u64) {
        use rand::SeedableRng;
        let _ = self
            .seeded
            .set(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)));
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> Arc<Config> {
        self.cfg.load_full()
    }

    /// The pool in force.
    #[must_use]
    pub fn pool(&self) -> Arc<Pool> {
        self.pool.load_full()
    }

    /// Replaces the pool: servers are kept by id with their counters and drain
    /// state; new ids start fresh; removed ids go (their sessions idle out).
    pub fn apply_servers(&self, servers: &[ServerConfig]) {
        let old = self.pool.load_full();
        let mut slot = 0;
        let servers = servers
            .iter()
            .map(|c| {
                let this_slot = slot;
                slot += usize::from(c.agent.is_some());
                let prev = old.by_id(&c.id);
                let same = prev.filter(|p| p.cfg == *c);
                Arc::new(Server {
                    id: c.id.as_str().into(),
                    sb: self.signer.sb(&c.id),
                    stats: prev.map_or_else(Arc::default, |p| p.stats.clone()),
                    tcp: same.map_or_else(Arc::default, |p| p.tcp.clone()),
                    cfg: c.clone(),
                    slot: this_slot,
                })
            })
            .collect();
        self.pool.store(Arc::new(Pool { servers }));
    }

    /// Takes a re-read config: the pool, scoring and routing settings change;
    /// listen addresses, the secret and the key need a restart (logged).
    pub fn reload(&self, new: Config) {
        let cur = self.cfg.load();
        if new.listen != cur.listen || new.transports != cur.transports {
            warn!("sip.listen / sip.transports changed: takes effect at the next restart");
        }
        if new.secret != cur.secret {
            warn!("routing.secret changed: takes effect at the next restart");
        }
        if let Err(e) = self.scoring.set(new.scoring) {
            warn!(error = %e, "scoring not changed");
        }
        self.apply_servers(&new.servers);
        if new.policy != cur.policy
            && let Err(e) = self.set_policy(&new.policy)
        {
            warn!(error = %e, "policy not changed");
        }
        info!(servers = new.servers.len(), "configuration reloaded");
        self.cfg.store(Arc::new(new));
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Handles one message from `src`; `out` is a scratch buffer.
    pub async fn handle(&self, data: &[u8], src: Source, out: &mut Vec<u8>) {
        let cfg = self.cfg.load();
        if data.len() > cfg.max_message_size {
            self.refuse_raw(data, 513, "Message Too Large", src).await;
            return;
        }
        let transport = match src {
            Source::Udp { .. } => SipTransport::Datagram,
            _ => SipTransport::Stream,
        };
        let msg = match Message::parse_as(data, transport) {
            Ok(m) => m,
            Err(sip::Error::Empty) => return,
            Err(e) => {
                debug!(error = %e, peer = %src.peer(), "unparseable message");
                let reason = refusal_reason(&e);
                self.refuse_raw(data, e.status(), &reason, src).await;
                return;
            }
        };
        if msg.is_request() {
            if let Err(e) = msg.validate() {
                debug!(error = %e, call_id = %String::from_utf8_lossy(msg.call_id()), "invalid request");
                let reason = refusal_reason(&e);
                self.reply(&msg, e.status(), &reason, &[], src, out).await;
                return;
            }
            self.stats.request(msg.method());
            self.request(&cfg, &msg, src, out).await;
        } else {
            self.response(&msg, src, out).await;
        }
    }

    async fn refuse_raw(&self, data: &[u8], code: u16, reason: &str, src: Source) {
        match sip::reply::error_response(data, code, reason) {
            Some(resp) => {
                self.stats.refusal(code);
                self.send_back(src, &resp).await;
            }
            None => self.stats.drop(Drop::Unparseable),
        }
    }

    /// Answers a request ourselves, to where it came from (RFC 3261 §18.2.2).
    async fn reply(
        &self,
        req: &Message<'_>,
        code: u16,
        reason: &str,
        extra: &[&[u8]],
        src: Source,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        let tag = format!(
            "lb{:x}",
            self.signer.hash(&[req.call_id(), b"to-tag"]) as u32
        );
        sip::reply::response_for(req, code, reason, tag.as_bytes(), extra, out);
        self.stats.refusal(code);
        self.send_back(src, out).await;
    }

    async fn send_back(&self, src: Source, bytes: &[u8]) {
        let ok = match src {
            Source::Udp { peer, sock } => self.udp[sock].send_to(bytes, peer).await.is_ok(),
            Source::TcpIn { conn, .. } => self.send_tcp_in(conn, bytes),
            Source::TcpServer { peer } => match self.pool.load().by_addr(peer) {
                Some(s) => self.send_tcp_server(s, bytes),
                None => false,
            },
        };
        if !ok {
            self.stats.drop(Drop::SendFailed);
        }
    }

    fn send_tcp_in(&self, conn: u64, bytes: &[u8]) -> bool {
        let m = self.tcp_in.pin();
        m.get(&conn)
            .is_some_and(|tx| tx.try_send(Bytes::copy_from_slice(bytes)).is_ok())
    }

    fn send_tcp_server(&self, s: &Arc<Server>, bytes: &[u8]) -> bool {
        let mut guard = s
            .tcp
            .tx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.as_ref().is_none_or(mpsc::Sender::is_closed) {
            *guard = Some(self.open_server_conn(s.cfg.address));
        }
        guard
            .as_ref()
            .is_some_and(|tx| tx.try_send(Bytes::copy_from_slice(bytes)).is_ok())
    }

    fn open_server_conn(&self, addr: SocketAddr) -> mpsc::Sender<Bytes> {
        let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
        let me = self.self_arc();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                Duration::from_secs(2),
                TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => s,
                _ => {
                    warn!(%addr, "cannot connect to server over TCP");
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let (r, mut w) = stream.into_split();
            let reader =
                me.map(|p| tokio::spawn(read_stream(p, r, Source::TcpServer { peer: addr })));
            while let Some(b) = rx.recv().await {
                if w.write_all(&b).await.is_err() {
                    break;
                }
            }
            if let Some(r) = reader {
                r.abort();
            }
        });
        tx
    }

    fn self_arc(&self) -> Option<Arc<Proxy>> {
        self.me.upgrade()
    }

    fn is_ours(&self, cfg: &Config, host: &sip::Host<'_>, port: Option<u16>) -> bool {
        let port_ok = port.unwrap_or(5060) == cfg.advertise_port;
        port_ok
            && match host {
                sip::Host::Name(n) => n.eq_ignore_ascii_case(cfg.advertise_host.as_bytes()),
                h => h.to_string() == cfg.advertise_host,
            }
    }

    async fn request(&self, cfg: &Config, msg: &Message<'_>, src: Source, out: &mut Vec<u8>) {
        let method = msg.method();
        if msg.max_forwards() == Some(0) {
            return self.reply(msg, 483, "Too Many Hops", &[], src, out).await;
        }
        let uri = msg.request_uri().expect("a request has a Request-URI");
        if !matches!(
            uri.scheme,
            sip::Scheme::Sip | sip::Scheme::Sips | sip::Scheme::Tel
        ) {
            return self
                .reply(msg, 416, "Unsupported URI Scheme", &[], src, out)
                .await;
        }
        if let Some(h) = msg.header(HeaderName::ProxyRequire) {
            // We support no extension a proxy must understand.
            let mut line = b"Unsupported: ".to_vec();
            line.extend_from_slice(h.value);
            return self
                .reply(msg, 420, "Bad Extension", &[&line], src, out)
                .await;
        }
        let loop_hash = self.loop_hash(msg);
        for v in msg.vias().flatten() {
            if self.is_ours(cfg, &v.host, v.port)
                && v.branch
                    .is_some_and(|b| b.len() >= 15 && b.ends_with(&hex8(loop_hash)))
            {
                return self.reply(msg, 482, "Loop Detected", &[], src, out).await;
            }
        }

        // Our own Route on top: pop it; its sb names the server.
        let mut pop_route = false;
        let mut target: Option<Arc<Server>> = None;
        if let Some(Ok(top)) = msg.routes().next()
            && top
                .uri
                .host
                .is_some_and(|h| self.is_ours(cfg, &h, top.uri.port))
        {
            pop_route = true;
            if let Some(sb) = top.uri.param(b"sb") {
                let pool = self.pool.load();
                match sb
                    .and_then(|v| self.signer.verify(v))
                    .and_then(|id| pool.by_id(id))
                {
                    Some(s) => target = Some(s.clone()),
                    None => {
                        return self
                            .reply(
                                msg,
                                403,
                                "Forbidden (bad Record-Route signature)",
                                &[],
                                src,
                                out,
                            )
                            .await;
                    }
                }
            }
        }

        let pool = self.pool.load();
        let from_server = match src {
            Source::TcpServer { peer } => pool.by_addr(peer).cloned(),
            Source::Udp { peer, .. } => pool.by_addr(peer).cloned(),
            Source::TcpIn { .. } => None,
        };
        if let Some(server) = from_server {
            // A request from a server goes towards the user agent: the next
            // Route, else the Request-URI.
            return self
                .forward_outward(msg, &server, pop_route, src, out)
                .await;
        }

        let now = self.now_ms();
        let to_tag = msg.to().ok().and_then(|t| t.tag()).is_some();
        if target.is_none() {
            target = self
                .sessions
                .get(msg.call_id(), now)
                .and_then(|id| pool.by_id(&id).cloned());
        }
        if target.is_none() && method == Method::Register {
            return self.register(cfg, msg, src, out).await;
        }
        let mut new_session = false;
        let target = match target {
            Some(t) => t,
            None if to_tag || method == Method::Cancel || method == Method::Ack => {
                if method == Method::Ack {
                    self.stats.drop(Drop::StrayAck);
                    return;
                }
                return self
                    .reply(msg, 481, "Call/Transaction Does Not Exist", &[], src, out)
                    .await;
            }
            None => {
                if self.stopping.load(Ordering::Relaxed) {
                    let ra = format!("Retry-After: {}", cfg.retry_after);
                    return self
                        .reply(
                            msg,
                            503,
                            "Service Unavailable (shutting down)",
                            &[ra.as_bytes()],
                            src,
                            out,
                        )
                        .await;
                }
                match self.select(cfg, &pool, &[]) {
                    Some(s) => {
                        new_session = true;
                        s
                    }
                    None => {
                        debug!(call_id = %String::from_utf8_lossy(msg.call_id()), "no server available");
                        if cfg.on_no_server == OnNoServer::Drop {
                            self.stats.drop(Drop::NoServer);
                            return;
                        }
                        let ra = format!("Retry-After: {}", cfg.retry_after);
                        return self
                            .reply(msg, 503, "Service Unavailable", &[ra.as_bytes()], src, out)
                            .await;
                    }
                }
            }
        };
        let dialog = matches!(method, Method::Invite | Method::Subscribe | Method::Refer);
        if new_session {
            target.stats.selected.fetch_add(1, Ordering::Relaxed);
            let kind = if dialog {
                Kind::Dialog
            } else {
                Kind::Transaction
            };
            if !self
                .sessions
                .insert(msg.call_id(), target.id.clone(), kind, now)
                && self.sessions.len() >= cfg.max_sessions
            {
                self.stats.drop(Drop::SessionTableFull);
            }
            debug!(call_id = %String::from_utf8_lossy(msg.call_id()), server = %target.id, "selected");
        }
        let record_route = dialog && !to_tag;
        // The first transaction of a new session is ours to retry on
        // another server (failover); its retransmissions, CANCEL and
        // non-2xx ACK follow the current attempt.
        let mut attempt = 0;
        if matches!(method, Method::Cancel | Method::Ack) || fails_over(method) {
            let id = self.txn_hash(msg);
            if new_session && fails_over(method) {
                self.attempts.pin().insert(
                    id,
                    Arc::new(Mutex::new(Attempt {
                        request: msg.as_bytes().to_vec(),
                        reply_to: src,
                        tried: smallvec::smallvec![target.id.clone()],
                        index: 0,
                        answered: false,
                        done: false,
                        local_final: false,
                        best: None,
                        timer_c_from: Instant::now(),
                    })),
                );
                // We hold the transaction now: stop the UA's retransmissions.
                // (Not for non-INVITE: RFC 4320 §4.1 forbids an early 100;
                // their retransmissions follow the current attempt.)
                if method == Method::Invite {
                    self.reply(msg, 100, "Trying", &[], src, out).await;
                }
                self.arm_failover(id, 0, cfg.failover_timeout);
            } else {
                let found = self.attempts.pin().get(&id).cloned();
                if let Some(a) = found {
                    let (local_final, index, done) = {
                        let a = a.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        (a.local_final, a.index, a.done)
                    };
                    if method == Method::Ack && done {
                        // The transaction is over once its ACK passes.
                        self.attempts.pin().remove(&id);
                    }
                    if local_final && method != Method::Cancel {
                        // The ACK (or a late retransmission) of our own final response.
                        return;
                    }
                    attempt = index;
                }
            }
        }
        self.forward_to_server(
            msg,
            &target,
            pop_route,
            record_route,
            loop_hash,
            Branch::Attempt(attempt),
            src,
            out,
        )
        .await;
    }

    /// After `after`, tries the next server if attempt `index` of `id` is
    /// still unanswered.
    fn arm_failover(&self, id: u64, index: u8, after: Duration) {
        // One timer task serves every attempt: the deadlines come in order
        // (same timeout), so a FIFO is a timer wheel; no task per INVITE.
        let _ = self
            .failover_timers
            .send((Instant::now() + after, id, index));
    }

    /// The failover timer task: fires each deadline in turn.
    async fn failover_timer(
        me: std::sync::Weak<Proxy>,
        mut rx: mpsc::UnboundedReceiver<(Instant, u64, u8)>,
    ) {
        while let Some((at, id, index)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            let Some(p) = me.upgrade() else { return };
            let due = {
                let m = p.attempts.pin();
                let Some(a) = m.get(&id) else { continue };
                let a = a.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                a.index == index && !a.answered && !a.done
            };
            if due {
                p.failover(id, "no response").await;
            }
        }
    }

    /// Timer C round (call every second): every new INVITE that has had
    /// provisional responses only, and none above 100 for `invite_timeout`
    /// (RFC 3261 §16.6 step 11, §16.7 step 2). A scan of the transactions in flight, not a timer per
    /// INVITE: nearly every INVITE is answered long before.
    pub async fn timer_c_round(&self) {
        let limit = self.cfg.load().invite_timeout;
        let due: Vec<u64> = self
            .attempts
            .pin()
            .iter()
            .filter_map(|(id, a)| {
                let a = a.lock().ok()?;
                (!a.done
                    && a.answered
                    && a.request.starts_with(b"INVITE ")
                    && a.timer_c_from.elapsed() >= limit)
                    .then_some(*id)
            })
            .collect();
        for id in due {
            self.timer_c_fired(id).await;
        }
    }

    /// Timer C (RFC 3261 §16.8): CANCEL the server's branch, 408 to the UA.
    async fn timer_c_fired(&self, id: u64) {
        let found = self.attempts.pin().get(&id).cloned();
        let Some(a) = found else { return };
        let (request, reply_to, index, server) = {
            let mut a = a.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if a.done {
                return;
            }
            a.done = true;
            a.local_final = true;
            (
                a.request.clone(),
                a.reply_to,
                a.index,
                a.tried.last().cloned(),
            )
        };
        let Ok(invite) = Message::parse(&request) else {
            return;
        };
        warn!(call_id = %String::from_utf8_lossy(invite.call_id()), "no final response within invite_timeout: CANCEL, 408");
        let mut out = Vec::with_capacity(1024);
        let cancel = cancel_for(&invite);
        if let Ok(c) = Message::parse(&cancel)
            && let Some(s) = server.and_then(|id| self.pool.load().by_id(&id).cloned())
        {
            self.forward_to_server(
                &c,
                &s,
                false,
                false,
                self.loop_hash(&invite),
                Branch::Attempt(index),
                reply_to,
                &mut out,
            )
            .await;
        }
        self.sessions.demote(invite.call_id(), self.now_ms());
        self.reply(&invite, 408, "Request Timeout", &[], reply_to, &mut out)
            .await;
    }

    /// Sends the INVITE of attempt `id` to the next server not tried, or gives
    /// the UA the best final response (or 503) when every attempt failed.
    async fn failover(&self, id: u64, why: &str) {
        let cfg = self.cfg.load();
        let pool = self.pool.load();
        let found = self.attempts.pin().get(&id).cloned();
        let Some(a) = found else { return };
        let (request, reply_to, next, index, give_up) = {
            let mut a = a.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if a.done {
                return;
            }
            if let Some(last) = a.tried.last()
                && let Some(s) = pool.by_id(last)
            {
                let _ =
                    s.stats
                        .outstanding
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                            Some((n - 1).max(0))
                        });
                s.stats.failovers.fetch_add(1, Ordering::Relaxed);
                self.record_outcome(&pool, s, false);
            }
            let next = if a.tried.len() < usize::from(cfg.max_attempts) {
                self.select(&cfg, &pool, &a.tried)
            } else {
                None
            };
            match next {
                Some(n) => {
                    a.tried.push(n.id.clone());
                    a.index += 1;
                    a.answered = false;
                    a.timer_c_from = Instant::now();
                    (a.request.clone(), a.reply_to, Some(n), a.index, None)
                }
                None => {
                    a.done = true;
                    a.local_final = a.best.is_none();
                    (a.request.clone(), a.reply_to, None, a.index, a.best.take())
                }
            }
        };
        let Ok(msg) = Message::parse(&request) else {
            return;
        };
        let call_id = String::from_utf8_lossy(msg.call_id()).into_owned();
        let mut out = Vec::with_capacity(2048);
        match next {
            Some(server) => {
                info!(call_id = %call_id, server = %server.id, attempt = index, why, "failover");
                self.sessions
                    .reassign(msg.call_id(), server.id.clone(), self.now_ms());
                server.stats.selected.fetch_add(1, Ordering::Relaxed);
                let loop_hash = self.loop_hash(&msg);
                let record_route = matches!(
                    msg.method(),
                    Method::Invite | Method::Subscribe | Method::Refer
                );
                self.forward_to_server(
                    &msg,
                    &server,
                    false,
                    record_route,
                    loop_hash,
                    Branch::Attempt(index),
                    reply_to,
                    &mut out,
                )
                .await;
                self.arm_failover(id, index, cfg.failover_timeout);
            }
            None => {
                warn!(call_id = %call_id, why, "every attempt failed");
                self.sessions.demote(msg.call_id(), self.now_ms());
                match give_up {
                    Some((code, bytes)) => {
                        self.stats.response(merge::outgoing_status(code));
                        let mut bytes = bytes;
                        merge::set_outgoing_status(&mut bytes, code);
                        self.send_back(reply_to, &bytes).await;
                    }
                    None => {
                        let ra = format!("Retry-After: {}", cfg.retry_after);
                        self.reply(
                            &msg,
                            503,
                            "Service Unavailable (no server answered)",
                            &[ra.as_bytes()],
                            reply_to,
                            &mut out,
                        )
                        .await;
                    }
                }
            }
        }
    }

    /// A keyed hash of what stays the same when a request loops back to us
    /// (RFC 3261 §16.3 step 4): Request-URI, From tag, Call-ID, CSeq.
    fn loop_hash(&self, msg: &Message<'_>) -> u32 {
        let uri = msg.request_uri().map_or(&b""[..], |u| u.raw);
        let from_tag = msg.from().ok().and_then(|f| f.tag()).unwrap_or_default();
        let cseq = msg.cseq();
        // A CANCEL and a non-2xx ACK carry the INVITE's branch (RFC 3261
        // §9.1, §17.1.1.3): hash them as the INVITE they belong to.
        let method = match cseq.method {
            Method::Cancel | Method::Ack => &b"INVITE"[..],
            m => m.as_bytes(),
        };
        self.signer.hash(&[
            uri,
            from_tag,
            msg.call_id(),
            &cseq.seq.to_be_bytes(),
            method,
        ]) as u32
    }

    /// The transaction part of our branch: the same for a request, its
    /// retransmissions, its CANCEL and its non-2xx ACK.
    fn txn_hash(&self, msg: &Message<'_>) -> u64 {
        let v = msg.top_via();
        let branch = v.branch.unwrap_or_default();
        // RFC 2543 peers have no branch: fall back to Call-ID and CSeq number.
        let fallback = if v.is_rfc3261() {
            &[][..]
        } else {
            msg.call_id()
        };
        self.signer.hash(&[
            branch,
            v.raw.split(|&b| b == b';').next().unwrap_or_default(),
            fallback,
            &msg.cseq().seq.to_be_bytes(),
        ])
    }

    fn select(&self, cfg: &Config, pool: &Pool, exclude: &[Arc<str>]) -> Option<Arc<Server>> {
        let table = self.table.load();
        let now = Instant::now();
        let now_ms = self.now_ms();
        let inputs: SmallVec<[Input; 16]> = pool
            .servers
            .iter()
            .map(|s| {
                if exclude.contains(&s.id) {
                    return Input::Drained;
                }
                input_of(&table, s, now, now_ms, cfg)
            })
            .collect();
        let facts = facts_of(cfg, pool, &table, now_ms);
        let scoring = self.scoring.get();
        let view = PoolView {
            inputs: &inputs,
            facts: &facts,
            scoring: &scoring,
        };
        let policy = self.policy.load();
        let i = match self.seeded.get() {
            Some(rng) => {
                let mut rng = rng
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                policy.select(&view, &mut *rng)?
            }
            None => policy.select(&view, &mut rand::rng())?,
        };
        pool.servers.get(i).cloned()
    }

    /// Servers REGISTER may go to: agent up and not drained.
    fn up_servers(&self, cfg: &Config, pool: &Pool) -> Vec<Arc<Server>> {
        let table = self.table.load();
        let now = Instant::now();
        let now_ms = self.now_ms();
        pool.servers
            .iter()
            .filter(|s| matches!(input_of(&table, s, now, now_ms, cfg), Input::Up(_)))
            .cloned()
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward_to_server(
        &self,
        msg: &Message<'_>,
        server: &Arc<Server>,
        pop_route: bool,
        record_route: bool,
        loop_hash: u32,
        branch: Branch,
        src: Source,
        out: &mut Vec<u8>,
    ) {
        use std::fmt::Write;
        let peer = src.peer();
        let top = msg.top_via();
        let needs_received = top.host.ip() != Some(peer.ip()) || top.rport.is_some();
        // Per-thread scratch strings: no allocation per message once warm
        // (borrowed only in this block, never across an await).
        SCRATCH.with_borrow_mut(|(via, rr, ip)| {
            via.clear();
            via.push_str(match server.cfg.transport {
                Transport::Udp => &self.via_udp,
                Transport::Tcp => &self.via_tcp,
            });
            let _ = write!(via, "{:016x}", self.txn_hash(msg));
            match branch {
                Branch::Fork(i) => {
                    let _ = write!(via, "f{i}");
                }
                Branch::Attempt(0) => {}
                Branch::Attempt(n) => {
                    let _ = write!(via, "a{n}");
                }
            }
            let _ = write!(via, "{loop_hash:08x}");
            if let Source::TcpIn { conn, .. } = src {
                let _ = write!(via, ";lbc={conn}");
            }
            rr.clear();
            if record_route {
                rr.push_str(&self.rr);
                rr.push_str(&server.sb);
                rr.push('>');
            }
            ip.clear();
            let _ = write!(ip, "{}", peer.ip());
            out.clear();
            msg.write_edited(
                &Edits {
                    prepend_via: Some(via.as_bytes()),
                    record_route: record_route.then_some(rr.as_bytes()),
                    remove_top_route: pop_route,
                    max_forwards: MaxForwards::Decrement,
                    received: needs_received.then_some(Received {
                        received: ip.as_bytes(),
                        rport: peer.port(),
                    }),
                    add_content_length: server.cfg.transport == Transport::Tcp,
                    ..Edits::default()
                },
                out,
            );
        });
        if msg.method() != Method::Ack {
            server.stats.outstanding.fetch_add(1, Ordering::Relaxed);
        }
        server.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let ok = match server.cfg.transport {
            Transport::Udp => self
                .udp_for(server.cfg.address)
                .send_to(out, server.cfg.address)
                .await
                .is_ok(),
            Transport::Tcp => self.send_tcp_server(server, out),
        };
        if !ok {
            self.stats.drop(Drop::SendFailed);
        }
    }

    fn udp_for(&self, dest: SocketAddr) -> &UdpSocket {
        // Any of our sockets will do (they share the port); keep one per
        // destination so one flow keeps its order.
        let i = (dest.port() as usize) % self.udp.len().max(1);
        &self.udp[i]
    }

    /// A request from a server to the UA side: next Route, else the Request-URI.
    async fn forward_outward(
        &self,

        msg: &Message<'_>,
        server: &Arc<Server>,
        pop_route: bool,
        src: Source,
        out: &mut Vec<u8>,
    ) {
        let routes: SmallVec<[_; 4]> = msg
            .routes()
            .flatten()
            .skip(usize::from(pop_route))
            .take(1)
            .collect();
        let uri = routes
            .first()
            .map_or_else(|| *msg.request_uri().expect("request"), |r| r.uri);
        let Some(host) = uri.host else {
            return self
                .reply(msg, 416, "Unsupported URI Scheme", &[], src, out)
                .await;
        };
        let port = uri.port.unwrap_or(5060);
        let dest = match host.ip() {
            Some(ip) => SocketAddr::new(ip, port),
            None => match tokio::net::lookup_host((
                String::from_utf8_lossy(host_name(&host)).as_ref(),
                port,
            ))
            .await
            {
                Ok(mut it) => match it.next() {
                    Some(a) => a,
                    None => return self.reply(msg, 404, "Not Found", &[], src, out).await,
                },
                Err(_) => return self.reply(msg, 404, "Not Found", &[], src, out).await,
            },
        };
        let dialog = matches!(
            msg.method(),
            Method::Invite | Method::Subscribe | Method::Refer
        );
        let to_tag = msg.to().ok().and_then(|t| t.tag()).is_some();
        use std::fmt::Write;
        let mut via = self.via_udp.clone();
        let _ = write!(
            via,
            "{:016x}{:08x}",
            self.txn_hash(msg),
            self.loop_hash(msg)
        );
        let rr = (dialog && !to_tag).then(|| format!("{}{}>", self.rr, server.sb));
        out.clear();
        msg.write_edited(
            &Edits {
                prepend_via: Some(via.as_bytes()),
                record_route: rr.as_deref().map(str::as_bytes),
                remove_top_route: pop_route,
                max_forwards: MaxForwards::Decrement,
                ..Edits::default()
            },
            out,
        );
        if self.udp_for(dest).send_to(out, dest).await.is_err() {
            self.stats.drop(Drop::SendFailed);
        }
    }

    async fn register(&self, cfg: &Config, msg: &Message<'_>, src: Source, out: &mut Vec<u8>) {
        let pool = self.pool.load();
        let targets: Vec<Arc<Server>> = match cfg.register {
            RegisterMode::Registrar => cfg
                .registrar
                .as_deref()
                .and_then(|id| pool.by_id(id))
                .filter(|s| !s.stats.drained.load(Ordering::Relaxed))
                .into_iter()
                .cloned()
                .collect(),
            RegisterMode::Fork => self.up_servers(cfg, &pool),
        };
        if targets.is_empty() {
            let ra = format!("Retry-After: {}", cfg.retry_after);
            return self
                .reply(msg, 503, "Service Unavailable", &[ra.as_bytes()], src, out)
                .await;
        }
        let loop_hash = self.loop_hash(msg);
        if targets.len() == 1 {
            return self
                .forward_to_server(
                    msg,
                    &targets[0],
                    false,
                    false,
                    loop_hash,
                    Branch::Attempt(0),
                    src,
                    out,
                )
                .await;
        }
        let id = self.txn_hash(msg);
        {
            let forks = self.forks.pin();
            if forks.get(&id).is_some() {
                // A retransmission while the fork runs: the servers were asked.
                return;
            }
            forks.insert(
                id,
                Arc::new(Mutex::new(Fork {
                    request: msg.as_bytes().to_vec(),
                    reply_to: src,
                    pending: targets.len(),
                    finals: Vec::new(),
                    done: false,
                })),
            );
        }
        for (i, s) in targets.iter().enumerate() {
            self.forward_to_server(msg, s, false, false, loop_hash, Branch::Fork(i), src, out)
                .await;
        }
        // Whatever has not answered by the timeout does not hold the UA up.
        if let Some(me) = self.self_arc() {
            let timeout = cfg.register_timeout;
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                me.finish_fork(id, true).await;
            });
        }
    }

    /// Sends the merged answer of a fork once every server answered (or on timeout).
    async fn finish_fork(&self, id: u64, timed_out: bool) {
        let reply = {
            let forks = self.forks.pin();
            let Some(f) = forks.get(&id) else { return };
            let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if f.done || (!timed_out && f.pending > 0) {
                if f.done && timed_out {
                    drop(f);
                    forks.remove(&id);
                }
                return;
            }
            f.done = true;
            let codes: Vec<u16> = f.finals.iter().map(|(c, _)| *c).collect();
            let chosen = match merge::best(&codes) {
                Some(i) => Some(merge_challenges(&f.finals, i)),
                None => {
                    // Nobody answered: 408 from the stored request.
                    Message::parse(&f.request).ok().map(|req| {
                        let mut out = Vec::new();
                        sip::reply::response_for(
                            &req,
                            408,
                            "Request Timeout",
                            b"lbfork",
                            &[],
                            &mut out,
                        );
                        out
                    })
                }
            };
            chosen.map(|c| (c, f.reply_to))
        };
        if let Some((bytes, to)) = reply {
            self.send_back(to, &bytes).await;
        }
    }

    async fn response(&self, msg: &Message<'_>, src: Source, out: &mut Vec<u8>) {
        let cfg = self.cfg.load();
        let code = msg.status().unwrap_or(0);
        let top = msg.top_via();
        let branch = top.branch.unwrap_or_default();
        if !self.is_ours(&cfg, &top.host, top.port)
            || !branch.starts_with(b"z9hG4bK")
            || branch.len() < 7 + 24
        {
            self.stats.drop(Drop::ViaNotOurs);
            return;
        }
        let pool = self.pool.load();
        // The answer to one of our OPTIONS probes: any status means alive.
        let hexpart = &branch[7..];
        if hexpart.len() == 25 && hexpart[16] == b'p' {
            let seq = u64::from_str_radix(std::str::from_utf8(&hexpart[..16]).unwrap_or("x"), 16)
                .unwrap_or(0);
            if let Some(s) = pool.by_addr(src.peer()) {
                s.stats.probe_answered.fetch_max(seq, Ordering::Relaxed);
            }
            return;
        }
        let from = match src {
            Source::TcpServer { peer } | Source::Udp { peer, .. } => pool.by_addr(peer).cloned(),
            Source::TcpIn { .. } => None,
        };
        if code >= 200
            && let Some(s) = &from
        {
            let _ = s
                .stats
                .outstanding
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some((n - 1).max(0))
                });
            s.stats.last_final.store(self.now_ms(), Ordering::Relaxed);
        }
        let method = msg.cseq().method;
        let now = self.now_ms();
        // A forked REGISTER: fN in the branch.
        let h1 = u64::from_str_radix(std::str::from_utf8(&hexpart[..16]).unwrap_or("x"), 16)
            .unwrap_or(0);
        if hexpart.len() > 24 && hexpart[16] == b'f' {
            return self.fork_response(h1, msg, code, out).await;
        }
        if fails_over(method) {
            let index = if hexpart.len() > 25 && hexpart[16] == b'a' {
                std::str::from_utf8(&hexpart[17..hexpart.len() - 8])
                    .ok()
                    .and_then(|d| d.parse::<u8>().ok())
                    .unwrap_or(0)
            } else {
                0
            };
            let found = self.attempts.pin().get(&h1).cloned();
            if let Some(a) = found {
                let cfg = self.cfg.load();
                enum Next {
                    Relay,
                    Drop,
                    AckAndDrop,
                    AckAndFailover,
                }
                let next = {
                    let mut a = a.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if index != a.index {
                        // A late answer from a server we gave up on.
                        if code >= 300 {
                            Next::AckAndDrop
                        } else {
                            Next::Drop
                        }
                    } else if a.done && a.local_final {
                        // We answered the UA ourselves (Timer C): whatever
                        // the server says now stays here.
                        if code >= 300 {
                            Next::AckAndDrop
                        } else {
                            Next::Drop
                        }
                    } else if code < 200 {
                        if !a.answered {
                            self.record_attempt_success(&a);
                        }
                        if code > 100 {
                            a.timer_c_from = Instant::now();
                        }
                        a.answered = true;
                        Next::Relay
                    } else if code >= 300 && !a.done && cfg.failover_statuses.contains(&code) {
                        a.answered = true;
                        without_top_via(msg, out);
                        if a.best
                            .as_ref()
                            .is_none_or(|(c, _)| merge::best(&[*c, code]) == Some(1))
                        {
                            a.best = Some((code, out.clone()));
                        }
                        Next::AckAndFailover
                    } else {
                        if !a.answered {
                            self.record_attempt_success(&a);
                        }
                        a.answered = true;
                        a.done = true;
                        // Only the ACK's branch still needs this attempt (a
                        // 2xx's ACK is a new transaction): free the rest.
                        a.request = Vec::new();
                        a.best = None;
                        Next::Relay
                    }
                };
                // Over at a 2xx (its ACK is a new transaction), or at any
                // final of a non-INVITE (no ACK at all) -- unless it failed
                // over: a retransmission that crosses the final must still
                // carry the attempt's branch, so the entry (its request
                // freed) stays until the sweep.
                if matches!(next, Next::Relay)
                    && ((200..300).contains(&code) && method == Method::Invite
                        || code >= 200 && method != Method::Invite && index == 0)
                {
                    self.attempts.pin().remove(&h1);
                }
                match next {
                    Next::Relay => {}
                    Next::Drop => {
                        self.stats.drop(Drop::Merged);
                        return;
                    }
                    Next::AckAndDrop | Next::AckAndFailover => {
                        let request = a
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .request
                            .clone();
                        if method == Method::Invite {
                            self.ack_final(&request, msg, src).await;
                        }
                        if matches!(next, Next::AckAndFailover) {
                            self.failover(h1, "failover status").await;
                        } else {
                            self.stats.drop(Drop::Merged);
                        }
                        return;
                    }
                }
            }
        }
        match (method, code) {
            (Method::Invite, 200..=299) => self.sessions.confirm(msg.call_id(), now),
            // The ACK of a failed INVITE must still find the server.
            (Method::Invite, 300..) => self.sessions.demote(msg.call_id(), now),
            (Method::Bye, 200..) => self.sessions.remove(msg.call_id()),
            _ => {}
        }
        self.relay_response(msg, out).await;
        self.stats.response(code);
    }

    /// ACKs a non-2xx final response of our own client transaction
    /// (RFC 3261 §17.1.1.3): same Request-URI, our Via (same branch), From,
    /// the response's To, Call-ID, CSeq number with ACK.
    async fn ack_final(&self, request: &[u8], resp: &Message<'_>, to: Source) {
        let Ok(req) = Message::parse(request) else {
            return;
        };
        let uri = req.request_uri().map_or(&b""[..], |u| u.raw);
        let (Some(from), Some(to_h)) = (resp.header(HeaderName::From), resp.header(HeaderName::To))
        else {
            return;
        };
        let mut ack = Vec::with_capacity(512);
        ack.extend_from_slice(b"ACK ");
        ack.extend_from_slice(uri);
        ack.extend_from_slice(b" SIP/2.0\r\nVia: ");
        ack.extend_from_slice(resp.top_via().raw);
        ack.extend_from_slice(b"\r\nMax-Forwards: 70\r\nFrom: ");
        ack.extend_from_slice(from.value);
        ack.extend_from_slice(b"\r\nTo: ");
        ack.extend_from_slice(to_h.value);
        ack.extend_from_slice(b"\r\nCall-ID: ");
        ack.extend_from_slice(resp.call_id());
        ack.extend_from_slice(
            format!(
                "\r\nCSeq: {} ACK\r\nContent-Length: 0\r\n\r\n",
                resp.cseq().seq
            )
            .as_bytes(),
        );
        self.send_back(to, &ack).await;
    }

    /// Removes our Via and sends the response to the next one.
    async fn relay_response(&self, msg: &Message<'_>, out: &mut Vec<u8>) {
        let conn = lbc(msg.top_via().raw);
        without_top_via(msg, out);
        if let Some(conn) = conn {
            if !self.send_tcp_in(conn, out) {
                self.stats.drop(Drop::NoRoute);
            }
            return;
        }
        let Some(Ok(next)) = msg.vias().nth(1) else {
            self.stats.drop(Drop::NoRoute);
            return;
        };
        let ip = next
            .received
            .and_then(|r| {
                std::str::from_utf8(r)
                    .ok()?
                    .trim_matches(['[', ']'])
                    .parse::<IpAddr>()
                    .ok()
            })
            .or_else(|| next.host.ip());
        let port = match next.rport {
            Some(Some(p)) => p,
            _ => next.port.unwrap_or(5060),
        };
        let dest = match ip {
            Some(ip) => SocketAddr::new(ip, port),
            None => match tokio::net::lookup_host((
                String::from_utf8_lossy(host_name(&next.host)).as_ref(),
                port,
            ))
            .await
            {
                Ok(mut it) => match it.next() {
                    Some(a) => a,
                    None => {
                        self.stats.drop(Drop::NoRoute);
                        return;
                    }
                },
                Err(_) => {
                    self.stats.drop(Drop::NoRoute);
                    return;
                }
            },
        };
        if dest.ip().is_unspecified() || matches!(dest.ip(), IpAddr::V4(v4) if v4.is_broadcast()) {
            self.stats.drop(Drop::NoRoute);
            return;
        }
        if self.udp_for(dest).send_to(out, dest).await.is_err() {
            self.stats.drop(Drop::SendFailed);
        }
    }

    async fn fork_response(&self, id: u64, msg: &Message<'_>, code: u16, out: &mut Vec<u8>) {
        if code < 200 {
            self.stats.drop(Drop::Merged);
            return;
        }
        let found = self.forks.pin().get(&id).cloned();
        let Some(f) = found else {
            self.stats.drop(Drop::Merged);
            return;
        };
        let forward_now = {
            let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if f.done {
                None
            } else {
                f.pending = f.pending.saturating_sub(1);
                without_top_via(msg, out);
                if (200..300).contains(&code) {
                    f.done = true;
                    Some(f.reply_to)
                } else {
                    f.finals.push((code, out.clone()));
                    None
                }
            }
        };
        match forward_now {
            Some(to) => {
                self.stats.response(code);
                self.send_back(to, out).await;
            }
            None => {
                self.stats.drop(Drop::Merged);
                self.finish_fork(id, false).await;
            }
        }
    }

    /// Registers an inbound TCP connection; returns its id and receiver.
    fn register_conn(&self) -> (u64, mpsc::Receiver<Bytes>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1024);
        self.tcp_in.pin().insert(id, tx);
        (id, rx)
    }

    fn record_attempt_success(&self, a: &Attempt) {
        let pool = self.pool.load();
        if let Some(s) = a.tried.last().and_then(|id| pool.by_id(id)) {
            self.record_outcome(&pool, s, true);
        }
    }

    /// Feeds one new-session attempt's outcome to the server's failure
    /// record; ejects it after too many failures in a row (within the
    /// pool's ejection budget).
    fn record_outcome(&self, pool: &Pool, s: &Server, ok: bool) {
        let cfg = self.cfg.load();
        let now = self.now_ms();
        let may = !ok
            && crate::outlier::may_eject(
                pool.servers.iter().filter(|x| x.stats.ejected(now)).count(),
                pool.servers.len(),
                cfg.outlier.max_ejected_percent,
            );
        let mut t = s
            .stats
            .tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The failure ratio is refreshed by the health round (every 100 ms),
        // not here on every new call.
        let verdict = t.record(now, ok, &cfg.outlier, may);
        drop(t);
        if let crate::outlier::Verdict::Ejected(until) = verdict {
            s.stats.ejected_until.store(until, Ordering::Relaxed);
            warn!(
                server = %s.id,
                for_ms = until - now,
                failures_in_a_row = cfg.outlier.consecutive,
                "outlier: ejected"
            );
        }
    }

    /// One health round (call every 100 ms): refreshes the failure ratios
    /// and starts the slow start of every server that came back.
    pub async fn health_round(&self) {
        let cfg = self.cfg.load();
        let pool = self.pool.load();
        let table = self.table.load();
        let now = Instant::now();
        let now_ms = self.now_ms();
        let mut sip_down: SmallVec<[Arc<str>; 4]> = SmallVec::new();
        for s in &pool.servers {
            let ratio = s
                .stats
                .tracker
                .lock()
                .map(|t| t.failure_ratio(now_ms, cfg.outlier.window))
                .unwrap_or(0.0);
            s.stats
                .failure_permille
                .store((ratio * 1000.0).round() as u32, Ordering::Relaxed);
            self.track_windows(s, table.get_at(s.slot, &s.id).and_then(|e| e.sample));
            let up = matches!(input_of(&table, s, now, now_ms, &cfg), Input::Up(_));
            let was = s.stats.available.swap(up, Ordering::Relaxed);
            if was
                && !up
                && (s.stats.ejected(now_ms)
                    || s.cfg.probe.is_some() && s.stats.probe_down.load(Ordering::Relaxed))
            {
                sip_down.push(s.id.clone());
            }
            // Requests a server never answered (it died, or answers were
            // lost) would count against it for ever: forget them when it
            // comes back, and when it has sent no final response for a
            // whole transaction timeout (64 x T1) while some are counted.
            let quiet = now_ms.saturating_sub(s.stats.last_final.load(Ordering::Relaxed)) > 32_000;
            if (up && !was || quiet) && s.stats.outstanding.swap(0, Ordering::Relaxed) > 0 {
                s.stats.last_final.store(now_ms, Ordering::Relaxed);
                debug!(server = %s.id, "outstanding count reset");
            }
            // The first time up (balancer start) is no comeback: every
            // server would ramp alike.
            if up && !was && s.stats.ever_available.swap(true, Ordering::Relaxed) {
                s.stats.ramp_from.store(now_ms + 1, Ordering::Relaxed);
                if !cfg.outlier.slow_start.is_zero() {
                    info!(server = %s.id, over_ms = cfg.outlier.slow_start.as_millis() as u64, "back: slow start");
                }
            }
        }
        if !sip_down.is_empty() {
            self.rescue_provisional(&sip_down).await;
        }
    }

    /// New sessions whose server answered provisionally and then stopped
    /// answering SIP (ejected, or its probes unanswered; not merely its agent
    /// down: the server may still be ringing) go to another server: without
    /// it they would wait for a final response that never comes.
    async fn rescue_provisional(&self, down: &[Arc<str>]) {
        let stuck: Vec<u64> = self
            .attempts
            .pin()
            .iter()
            .filter_map(|(id, a)| {
                let a = a.lock().ok()?;
                (!a.done && a.answered && a.tried.last().is_some_and(|t| down.contains(t)))
                    .then_some(*id)
            })
            .collect();
        for id in stuck {
            self.failover(id, "server stopped answering after a provisional response")
                .await;
        }
    }

    /// Keeps `selected` snapshots of `s`; on a new agent sample, anchors the
    /// in-flight count to the end of its window and learns capacity from
    /// the sessions sent during it.
    fn track_windows(&self, s: &Server, sample: Option<perf::Sample>) {
        let wall = wall_ms();
        let selected = s.stats.selected.load(Ordering::Relaxed);
        let mut h = s
            .stats
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        h.ring.push_back((wall, selected));
        if h.ring.len() > crate::stats::History::LEN {
            h.ring.pop_front();
        }
        let Some(x) = sample else { return };
        if x.seq == s.stats.anchor_seq.load(Ordering::Relaxed) {
            return;
        }
        let end = h.selected_at(x.window_end_ms).unwrap_or(selected);
        let start = h
            .selected_at(x.window_end_ms.saturating_sub(u64::from(x.window_ms)))
            .unwrap_or(end);
        h.capacity.observe(
            end.saturating_sub(start),
            x.cpu,
            f64::from(x.window_ms) / 1000.0,
        );
        if let Some(c) = h.capacity.value {
            s.stats
                .capacity_learned
                .store(c.to_bits(), Ordering::Relaxed);
        }
        s.stats.anchor_selected.store(end, Ordering::Relaxed);
        s.stats.anchor_seq.store(x.seq, Ordering::Relaxed);
    }

    /// The routing policy in force.
    #[must_use]
    pub fn policy_name(&self) -> &'static str {
        self.policy.load().name()
    }

    /// Changes the routing policy at run time.
    ///
    /// # Errors
    /// An unknown name, or a policy that needs agents while a server has none.
    pub fn set_policy(&self, name: &str) -> Result<(), String> {
        let Some(p) = crate::policy::by_name(name) else {
            return Err(format!(
                "'{name}' is not one of: {}",
                crate::policy::NAMES.join(", ")
            ));
        };
        if crate::policy::needs_agents(name)
            && let Some(s) = self
                .pool
                .load()
                .servers
                .iter()
                .find(|s| s.cfg.agent.is_none())
        {
            return Err(format!(
                "policy '{name}' needs agent data and server '{}' has no agent",
                s.id
            ));
        }
        self.policy.store(Arc::new(p));
        info!(policy = name, "routing policy changed");
        Ok(())
    }

    /// One round of SIP OPTIONS probing (call every 100 ms): judges the last
    /// probe of each probed server that is due, and sends the next.
    pub async fn probe_round(&self, due: &mut std::collections::HashMap<Arc<str>, Instant>) {
        let pool = self.pool.load();
        let now = Instant::now();
        for s in &pool.servers {
            let Some(every) = s.cfg.probe else { continue };
            let next = due.entry(s.id.clone()).or_insert(now);
            if now < *next {
                continue;
            }
            *next = now + every;
            let st = &s.stats;
            let sent = st.probe_sent.load(Ordering::Relaxed);
            if sent > 0 {
                let ok = st.probe_answered.load(Ordering::Relaxed) >= sent;
                let down = st.probe_down.load(Ordering::Relaxed);
                if ok == down {
                    // A result against the current state: count it.
                    let streak = st.probe_streak.fetch_add(1, Ordering::Relaxed) + 1;
                    let needed = if down {
                        s.cfg.probe_successes
                    } else {
                        s.cfg.probe_failures
                    };
                    if streak >= u64::from(needed) {
                        st.probe_down.store(!down, Ordering::Relaxed);
                        st.probe_streak.store(0, Ordering::Relaxed);
                        if down {
                            info!(server = %s.id, "OPTIONS probe: up");
                        } else {
                            warn!(server = %s.id, unanswered = streak, "OPTIONS probe: down");
                        }
                    }
                } else {
                    st.probe_streak.store(0, Ordering::Relaxed);
                }
            }
            let seq = sent + 1;
            st.probe_sent.store(seq, Ordering::Relaxed);
            let cfg = self.cfg.load();
            let host = format!("{}:{}", cfg.advertise_host, cfg.advertise_port);
            let probe = format!(
                "OPTIONS sip:{addr} SIP/2.0\r\nVia: SIP/2.0/{t} {host};branch=z9hG4bK{seq:016x}p00000000\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:siplb@{host}>;tag=probe\r\nTo: <sip:{addr}>\r\n\
                 Call-ID: probe-{id}-{seq}@{host}\r\nCSeq: {seq} OPTIONS\r\nContent-Length: 0\r\n\r\n",
                addr = s.cfg.address,
                t = s.cfg.transport.via_name(),
                id = s.id,
            );
            let _ = match s.cfg.transport {
                Transport::Udp => self
                    .udp_for(s.cfg.address)
                    .send_to(probe.as_bytes(), s.cfg.address)
                    .await
                    .is_ok(),
                Transport::Tcp => self.send_tcp_server(s, probe.as_bytes()),
            };
        }
    }

    /// Periodic housekeeping: idle sessions, finished forks.
    pub fn sweep(&self) {
        let cfg = self.cfg.load();
        let gone = self
            .sessions
            .sweep(self.now_ms(), cfg.session_idle_timeout.as_millis() as u64);
        if gone > 0 {
            debug!(gone, "idle sessions removed");
        }
        // Over, or never answered: 64 s (the ACK of a failure may still
        // come); ringing: until Timer C has had its say.
        let ringing = cfg.invite_timeout + Duration::from_secs(64);
        self.attempts.pin().retain(|_, a| {
            a.lock()
                .map(|a| {
                    let keep = if a.answered && !a.done {
                        ringing
                    } else {
                        Duration::from_secs(64)
                    };
                    a.timer_c_from.elapsed() < keep
                })
                .unwrap_or(false)
        });
        self.forks
            .pin()
            .retain(|_, f| !f.lock().map(|f| f.done).unwrap_or(true));
    }

    /// Servers with per-server facts, for the admin API.
    #[must_use]
    pub fn servers_view(&self) -> Vec<ServerView> {
        let cfg = self.cfg.load();
        let pool = self.pool.load();
        let table = self.table.load();
        let now = Instant::now();
        let now_ms = self.now_ms();
        let per = self.sessions.per_server();
        let inputs: Vec<Input> = pool
            .servers
            .iter()
            .map(|s| input_of(&table, s, now, now_ms, &cfg))
            .collect();
        let scoring = self.scoring.get();
        let mut scores = vec![0u32; inputs.len()];
        crate::load::scores(&scoring, &inputs, &mut scores);
        let caps = capacities_of(&pool);
        let facts = facts_of(&cfg, &pool, &table, now_ms);
        let mut weights = vec![0.0; inputs.len()];
        let weighted = self.policy.load().weights(
            &PoolView {
                inputs: &inputs,
                facts: &facts,
                scoring: &scoring,
            },
            &mut weights,
        );
        let total: f64 = weights.iter().sum();
        pool.servers
            .iter()
            .zip(inputs.iter().zip(&scores))
            .enumerate()
            .map(|(k, (s, (input, &score)))| {
                let e = table.get_at(s.slot, &s.id);
                ServerView {
                    id: s.id.to_string(),
                    address: s.cfg.address.to_string(),
                    transport: s.cfg.transport.via_name().to_ascii_lowercase(),
                    agent: s.cfg.agent.clone(),
                    state: match input {
                        Input::Drained => "drained",
                        Input::Up(_) => "up",
                        Input::Down | Input::NoData => "down",
                    }
                    .into(),
                    agent_state: e
                        .map_or("connecting", |e| match e.state {
                            perf::AgentState::Up => "up",
                            perf::AgentState::Down => "down",
                            perf::AgentState::Connecting => "connecting",
                        })
                        .into(),
                    score,
                    cpu: e.and_then(|e| e.sample).map(|x| x.cpu),
                    mem_available: e.and_then(|e| e.sample).map(|x| x.mem_available),
                    sample_age_ms: e
                        .and_then(|e| e.received)
                        .map(|r| now.saturating_duration_since(r).as_millis() as u64),
                    active_calls: per.get(&s.id).copied().unwrap_or(0),
                    outstanding: s.stats.outstanding(),
                    selected_total: s.stats.selected.load(Ordering::Relaxed),
                    forwarded_total: s.stats.forwarded.load(Ordering::Relaxed),
                    failovers_total: s.stats.failovers.load(Ordering::Relaxed),
                    probe_state: match (s.cfg.probe, s.stats.probe_down.load(Ordering::Relaxed)) {
                        (None, _) => "off",
                        (Some(_), false) => "up",
                        (Some(_), true) => "down",
                    }
                    .into(),
                    down_by: {
                        let agent = e.is_none_or(|e| e.state != perf::AgentState::Up)
                            && cfg.health != Health::Probe;
                        let probe = s.cfg.probe.is_some()
                            && s.stats.probe_down.load(Ordering::Relaxed)
                            && cfg.health != Health::Agent;
                        let outlier = s.stats.ejected(now_ms);
                        let by: Vec<&str> =
                            [(agent, "agent"), (probe, "probe"), (outlier, "outlier")]
                                .into_iter()
                                .filter_map(|(on, name)| on.then_some(name))
                                .collect();
                        (!by.is_empty()).then(|| by.join("+"))
                    },
                    failure_ratio: f64::from(s.stats.failure_permille.load(Ordering::Relaxed))
                        / 1000.0,
                    ejected: s.stats.ejected(now_ms),
                    ejected_for_ms: s
                        .stats
                        .ejected_until
                        .load(Ordering::Relaxed)
                        .saturating_sub(now_ms),
                    ejections_total: s.stats.tracker.lock().map_or(0, |t| t.ejections),
                    weight_factor: crate::outlier::ramp(now_ms, s.stats.ramp_from(), &cfg.outlier),
                    capacity: caps[k],
                    policy_weight: (weighted && total > 0.0).then(|| weights[k] / total),
                    capacity_source: if s.cfg.capacity.is_some() {
                        "configured"
                    } else if s.stats.capacity_learned().is_some() {
                        "learned"
                    } else {
                        "mean"
                    }
                    .into(),
                    error: e.and_then(|e| e.error.as_deref().map(str::to_owned)),
                }
            })
            .collect()
    }

    /// Drains or undrains a server; `false` when there is no such id.
    pub fn set_drained(&self, id: &str, drained: bool) -> bool {
        match self.pool.load().by_id(id) {
            Some(s) => {
                s.stats.drained.store(drained, Ordering::Relaxed);
                info!(server = id, drained, "drain state changed");
                true
            }
            None => false,
        }
    }

    /// New-session INVITE transactions held for failover.
    #[must_use]
    pub fn transactions(&self) -> usize {
        self.attempts.len()
    }

    /// Requests outstanding at the servers (for a graceful stop).
    #[must_use]
    pub fn outstanding(&self) -> u32 {
        self.pool
            .load()
            .servers
            .iter()
            .map(|s| s.stats.outstanding())
            .sum()
    }
}

/// `GET /servers` element.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerView {
    /// Configured id.
    pub id: String,
    /// SIP address.
    pub address: String,
    /// `udp` or `tcp`.
    pub transport: String,
    /// Agent address, if it has one.
    pub agent: Option<String>,
    /// `up`, `down` or `drained`.
    pub state: String,
    /// What the agent connection says: `up`, `down`, `connecting`.
    pub agent_state: String,
    /// Performance score now.
    pub score: u32,
    /// CPU busy fraction of the latest sample.
    pub cpu: Option<f64>,
    /// Available memory, bytes.
    pub mem_available: Option<u64>,
    /// Age of the latest sample, ms.
    pub sample_age_ms: Option<u64>,
    /// Dialogs in the session table.
    pub active_calls: usize,
    /// Requests sent and not yet answered.
    pub outstanding: u32,
    /// New sessions sent here by selection.
    pub selected_total: u64,
    /// Requests forwarded here.
    pub forwarded_total: u64,
    /// New sessions moved elsewhere after this server failed them (no answer or a failover status).
    pub failovers_total: u64,
    /// OPTIONS probing: `off`, `up` or `down`.
    pub probe_state: String,
    /// Which signals say the server is down, when one does: `agent`,
    /// `probe`, `outlier`, joined by `+`.
    pub down_by: Option<String>,
    /// Failed new-session attempts / attempts over the failure window.
    pub failure_ratio: f64,
    /// Ejected by outlier detection now.
    pub ejected: bool,
    /// Time left of the ejection, ms (0 when not ejected).
    pub ejected_for_ms: u64,
    /// Ejections so far.
    pub ejections_total: u64,
    /// Slow start factor of the weight, `slow_start_floor..=1` (1: full weight).
    pub weight_factor: f64,
    /// The share of new sessions the policy in force gives this server now,
    /// 0-1, for the weighted policies (`patent`: its score's share;
    /// `adaptive`: its weight before the two-choice stage; `static`: its
    /// capacity's share); `None` for `round-robin` and `p2c`.
    pub policy_weight: Option<f64>,
    /// Capacity used by the policies, sessions/s (relative when nothing is known).
    pub capacity: f64,
    /// Where it comes from: `configured`, `learned` (from agent data), `mean` (of the others).
    pub capacity_source: String,
    /// Why the agent is down, when it is.
    pub error: Option<String>,
}

fn merge_challenges(finals: &[(u16, Vec<u8>)], chosen: usize) -> Vec<u8> {
    let (code, bytes) = &finals[chosen];
    let mut out = bytes.clone();
    merge::set_outgoing_status(&mut out, *code);
    if !matches!(code, 401 | 407) {
        return out;
    }
    // Every other 401/407's challenges go into the chosen one (§16.7 step 7).
    let mut extra = Vec::new();
    for (i, (c, b)) in finals.iter().enumerate() {
        if i == chosen || !matches!(c, 401 | 407) {
            continue;
        }
        if let Ok(m) = Message::parse(b) {
            for h in m.headers() {
                if h.raw_name.eq_ignore_ascii_case(b"WWW-Authenticate")
                    || h.raw_name.eq_ignore_ascii_case(b"Proxy-Authenticate")
                {
                    extra.extend_from_slice(h.line);
                }
            }
        }
    }
    if let Some(pos) = out.windows(4).position(|w| w == b"\r\n\r\n") {
        out.splice(pos + 2..pos + 2, extra);
    }
    out
}

thread_local! {
    /// Scratch for our Via, Record-Route and the `received` address.
    static SCRATCH: std::cell::RefCell<(String, String, String)> =
        std::cell::RefCell::new((String::with_capacity(128), String::with_capacity(128), String::with_capacity(48)));
}

fn host_name<'a>(h: &sip::Host<'a>) -> &'a [u8] {
    match h {
        sip::Host::Name(n) => n,
        _ => b"",
    }
}

/// The response with our Via removed, into `out` (what goes back to the UA).
fn without_top_via(msg: &Message<'_>, out: &mut Vec<u8>) {
    out.clear();
    msg.write_edited(
        &Edits {
            remove_top_via: true,
            ..Edits::default()
        },
        out,
    );
}

/// What load computation makes of a server now: its agent's data, unless
/// drained, or down by the health signals in use (`routing.health`).
fn input_of(
    table: &perf::server::Table,
    s: &Server,
    now: Instant,
    now_ms: u64,
    cfg: &Config,
) -> Input {
    let input = input_for(
        table.get_at(s.slot, &s.id),
        s.stats.drained.load(Ordering::Relaxed),
        now,
        cfg.stale_after,
    );
    if input == Input::Drained {
        return input;
    }
    if s.stats.ejected(now_ms) {
        return Input::Down;
    }
    let input = match input {
        Input::Up(mut l) => {
            l.failure_ratio = f64::from(s.stats.failure_permille.load(Ordering::Relaxed)) / 1000.0;
            Input::Up(l)
        }
        other => other,
    };
    let probed_down = s.cfg.probe.is_some() && s.stats.probe_down.load(Ordering::Relaxed);
    match cfg.health {
        Health::Agent => input,
        Health::Probe | Health::Both if probed_down => Input::Down,
        // The probe alone decides up/down; without agent data there is no score.
        Health::Probe if input == Input::Down => Input::NoData,
        Health::Probe | Health::Both => input,
    }
}

/// Requests whose first transaction a new session may retry on another
/// server: the INVITE, and the out-of-dialog non-INVITE requests a server
/// either did not get (no answer) or refused unprocessed (a failover
/// status). REGISTER is forked instead; CANCEL, ACK and in-dialog requests
/// always follow their session.
fn fails_over(m: Method<'_>) -> bool {
    matches!(
        m,
        Method::Invite
            | Method::Subscribe
            | Method::Refer
            | Method::Message
            | Method::Options
            | Method::Publish
            | Method::Notify
    )
}

/// Wall-clock milliseconds since the Unix epoch (agents stamp their
/// windows with it).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The balancer's own facts per server for the policies: outstanding
/// transactions, slow-start ramp, capacity, and the sessions sent since the
/// end of the agent window in use (only when the count is anchored to that
/// very sample).
fn facts_of(
    cfg: &Config,
    pool: &Pool,
    table: &perf::server::Table,
    now_ms: u64,
) -> SmallVec<[Facts; 16]> {
    let caps = capacities_of(pool);
    let wall = wall_ms();
    pool.servers
        .iter()
        .zip(&caps)
        .map(|(s, &cap)| {
            let mut f = Facts {
                outstanding: s.stats.outstanding(),
                ramp: crate::outlier::ramp(now_ms, s.stats.ramp_from(), &cfg.outlier),
                capacity: Some(cap),
                ..Facts::default()
            };
            if let Some(x) = table.get_at(s.slot, &s.id).and_then(|e| e.sample)
                && x.seq == s.stats.anchor_seq.load(Ordering::Relaxed)
            {
                let sent = s.stats.selected.load(Ordering::Relaxed);
                f.sent_since_window =
                    sent.saturating_sub(s.stats.anchor_selected.load(Ordering::Relaxed)) as u32;
                f.window = Some((
                    wall.saturating_sub(x.window_end_ms) as f64 / 1000.0,
                    f64::from(x.window_ms) / 1000.0,
                ));
            }
            f
        })
        .collect()
}

/// Capacity per server: configured, else learned, else the mean of the others.
fn capacities_of(pool: &Pool) -> SmallVec<[f64; 16]> {
    let configured: SmallVec<[Option<f64>; 16]> =
        pool.servers.iter().map(|s| s.cfg.capacity).collect();
    let learned: SmallVec<[Option<f64>; 16]> = pool
        .servers
        .iter()
        .map(|s| s.stats.capacity_learned())
        .collect();
    crate::policy::capacities(&configured, &learned)
}

/// The reason phrase of our answer to a message that does not parse or
/// validate: the status's phrase with the parse error.
fn refusal_reason(e: &sip::Error) -> String {
    let phrase = if e.status() == 505 {
        "Version Not Supported"
    } else {
        "Bad Request"
    };
    format!("{phrase} ({e})")
}

/// `n` as 8 lower-case hex digits, on the stack.
fn hex8(n: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    for (i, o) in out.iter_mut().enumerate() {
        *o = b"0123456789abcdef"[((n >> (28 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// The `lbc` parameter of our Via: the inbound TCP connection of the request.
fn lbc(via: &[u8]) -> Option<u64> {
    via.split(|&b| b == b';').find_map(|p| {
        let v = p.strip_prefix(b"lbc=")?;
        std::str::from_utf8(v).ok()?.trim().parse().ok()
    })
}

/// Reads framed messages from a stream and hands them to the proxy.
async fn read_stream<R: tokio::io::AsyncRead + Unpin>(proxy: Arc<Proxy>, mut r: R, src: Source) {
    let max = proxy.config().max_message_size;
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut out = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Hand over every whole message already buffered.
        let mut consumed = 0;
        loop {
            match sip::framing::check(&buf[consumed..], max) {
                Ok(sip::Frame::Message(n)) => {
                    let msg = buf[consumed..consumed + n].to_vec();
                    proxy.handle(&msg, src, &mut out).await;
                    consumed += n;
                }
                Ok(sip::Frame::KeepAlive(n)) => consumed += n,
                Ok(sip::Frame::Incomplete) => break,
                Err(e) => {
                    debug!(error = %e, ?src, "stream framing error; closing");
                    if e.status() == 513 || matches!(e, sip::Error::StreamWithoutLength) {
                        proxy
                            .refuse_raw(
                                &buf[consumed..],
                                e.status(),
                                &format!("Bad Request ({e})"),
                                src,
                            )
                            .await;
                    }
                    return;
                }
            }
        }
        buf.drain(..consumed);
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Runs the UDP receive loop of socket `sock`.
pub async fn udp_loop(proxy: Arc<Proxy>, sock: usize) {
    let socket = proxy.udp[sock].clone();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Vec::with_capacity(4096);
    loop {
        let (n, peer) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "udp receive error");
                continue;
            }
        };
        proxy
            .handle(&buf[..n], Source::Udp { peer, sock }, &mut out)
            .await;
    }
}

/// Serves one inbound TCP connection.
pub async fn tcp_conn(proxy: Arc<Proxy>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (id, mut rx) = proxy.register_conn();
    let (r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if w.write_all(&b).await.is_err() {
                break;
            }
        }
    });
    let p2 = proxy.clone();
    let reader = tokio::spawn(async move {
        read_stream(p2.clone(), r, Source::TcpIn { peer, conn: id }).await;
    });
    let _ = reader.await;
    // Dropping the registry's sender lets the writer flush what is queued
    // (e.g. our 400/513 before the close), then end.
    proxy.tcp_in.pin().remove(&id);
    if tokio::time::timeout(Duration::from_secs(1), writer)
        .await
        .is_err()
    {
        debug!(%peer, "tcp writer did not finish in time");
    }
}
