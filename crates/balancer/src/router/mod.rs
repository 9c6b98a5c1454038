//! The routing core (FIG 4 box 404): what happens to each SIP message, with
//! no I/O. There is no socket, no `Instant::now()`, no global RNG here:
//! the shell ([`crate::forwarding`]) hands in each message with where it
//! came from, the time ([`Now`]) and a random generator, and performs what
//! the core put into the [`Outbox`] — sends in the order they were queued,
//! timers, drops — before it reads the next message of that socket or
//! connection, so the messages of one flow leave in the order they came.
//!
//! **Shared, not single-owner.** One [`Router`] serves every UDP socket
//! (several share a port with SO_REUSEPORT, and the kernel spreads the
//! datagrams of one call over them), every TCP connection, the timer task
//! and the housekeeping tick, all through `&self`. A response can come in
//! on any socket and must find the transaction its request created on
//! another, so the tables are concurrent maps (`papaya`, lock-free reads)
//! and each client transaction sits behind its own short mutex, held only
//! while the core decides, never across I/O (there is none in here). A
//! router per socket would need the tables shared anyway, or the kernel
//! steered per Call-ID, which it cannot be.
//!
//! Inputs: [`Router::on_message`] (one SIP message), [`Router::on_timer`]
//! (a timer the core asked for), [`Router::tick`] (every 100 ms: health,
//! OPTIONS probes, Timer C, sweeps). The tables:
//! - sessions: Call-ID → server ([`crate::sessions`]);
//! - client transactions ([`txn`]): a new session's first transaction,
//!   tried server after server, keyed by our transaction id;
//! - forks ([`fork`]): REGISTER sent to every server, keyed the same way.
//!
//! What the core writes and reads back (our branch, the connection
//! reference, the Record-Route token) is [`crate::codec`].

#[doc(hidden)]
pub mod fuzzing;
pub mod outbox;

mod build;
mod fork;
mod health;
mod peer;
mod refusals;
mod request;
mod response;
mod txn;
mod view;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use perf::server::SharedTable;
use rand::RngCore;
use sip::{Message, Transport as SipTransport};
use smallvec::SmallVec;
use tracing::{debug, info, warn};

use crate::codec::{Branch, Keys, Leg};
use crate::config::{Config, Transport};
use crate::load::Input;
use crate::pool::{Pool, Server};
use crate::query::LiveScoring;
use crate::select::{Patent, Policy, PoolView};
use crate::sessions::Sessions;
use crate::stats::{DropReason, Stats};

pub use outbox::{ConnId, Dest, Now, Origin, Outbox, TimerKey};
pub use peer::PeerStatus;
pub use view::ServerView;

use fork::Fork;
use txn::ClientTxn;

/// How we name ourselves on the wire; fixed for the life of the process
/// (`sip.advertise` and `sip.record_route` changes take effect at a
/// restart, so that the Vias and Routes we wrote before a reload still read
/// as ours after it).
///
/// Two names: this instance (`sip.advertise`, in our Via, so responses come
/// back to the instance that holds the transaction) and the pool
/// (`sip.record_route`, in our Record-Route and Path, so a dialog's later
/// requests and a registrar's requests reach whichever instance of the pool
/// is alive; the `sb` and `flow` tokens carry what that instance needs).
/// Except where the phone is on a connection (TCP, TLS, WebSocket) it
/// opened to this instance: only this instance can send on it, so the
/// Record-Route and Path of that dialog or registration name this
/// instance (behind SRV the pool's name would reach another instance, which
/// could only answer 430) — unless `pool.flow_route` is `pool` (the default
/// with `pool.peers`): then they name the pool too, and the instance that
/// gets the request forwards it to this one ([`peer`]). Both names read as
/// ours in a Route, a Via or a Request-URI.
#[derive(Debug)]
struct Me {
    host: String,
    /// `host` when it is an IP address (compared without allocating).
    ip: Option<std::net::IpAddr>,
    port: u16,
    /// The pool's name (`sip.record_route`; `host` when not set).
    pool_host: String,
    pool_ip: Option<std::net::IpAddr>,
    /// `None`: an SRV name, written without a port.
    pool_port: Option<u16>,
    /// This instance's number in the pool (`pool.instance`), in the flow
    /// tokens of the connections it holds.
    instance: Option<u16>,
    /// The ports of our other listeners (TLS, WS, WSS) that are on.
    other_ports: SmallVec<[u16; 3]>,
    /// Per transport ([`Me::index`]): `SIP/2.0/UDP host:port;branch=`.
    vias: [String; 5],
    /// The same, for reading our Via on top of a response from what we
    /// know of it.
    own_vias: sip::OwnVias,
    /// `<sip:host:port[;transport=tcp];lr;sb=` (UDP without the parameter,
    /// as it always was), naming the pool.
    rrs: [String; 5],
    /// `<sip:host:port[;transport=tcp];lr;ob;flow=` (our Path), naming the pool.
    paths: [String; 5],
    /// The same two naming this instance: for a phone on a connection of
    /// ours, which only this instance can reach (unless `pool.flow_route`
    /// is `pool`: then the pool, whose instances forward to this one).
    rrs_here: [String; 5],
    paths_here: [String; 5],
    /// `pool.flow_route` is `instance`: a held flow's routes name this
    /// instance.
    held_here: bool,
}

/// Transactions ended early remembered at once (`Router::ended`): 1 MiB.
const ENDED_SLOTS: usize = 65_536;

const TRANSPORTS: [Transport; 5] = [
    Transport::Udp,
    Transport::Tcp,
    Transport::Tls,
    Transport::Ws,
    Transport::Wss,
];

impl Me {
    fn new(cfg: &Config) -> Me {
        let port_of = |t: Transport| match t {
            Transport::Udp | Transport::Tcp => cfg.advertise_port,
            Transport::Tls => cfg.tls_port,
            Transport::Ws => cfg.ws_port,
            Transport::Wss => cfg.wss_port,
        };
        let hostport = |t: Transport| format!("{}:{}", cfg.advertise_host, port_of(t));
        // The pool listens on the same TLS and WebSocket ports everywhere;
        // its UDP/TCP port is the one `sip.record_route` names.
        // A DNS name without a port is written without one, so that it is
        // looked up by SRV (RFC 3263 §4.2) for UDP and TCP.
        let pool_hostport = |t: Transport| {
            let port = match t {
                Transport::Udp | Transport::Tcp => cfg.record_route_port,
                t => Some(port_of(t)),
            };
            match port {
                Some(p) => format!("{}:{p}", cfg.record_route_host),
                None => cfg.record_route_host.clone(),
            }
        };
        // RFC 7118 §5.2: `ws` names plain and secure WebSocket alike.
        let param = |t: Transport| match t {
            Transport::Udp => String::new(),
            Transport::Wss => ";transport=ws".to_owned(),
            t => format!(";transport={}", t.via_name().to_ascii_lowercase()),
        };
        let vias = TRANSPORTS.map(|t| format!("SIP/2.0/{} {};branch=", t.via_name(), hostport(t)));
        // Config validation makes every one a Via; were one not, responses
        // would only be parsed in full.
        let own_vias = sip::OwnVias::new(&vias).unwrap_or_default();
        Me {
            host: cfg.advertise_host.clone(),
            ip: cfg.advertise_host.trim_matches(['[', ']']).parse().ok(),
            port: cfg.advertise_port,
            pool_host: cfg.record_route_host.clone(),
            pool_ip: cfg.record_route_host.trim_matches(['[', ']']).parse().ok(),
            pool_port: cfg.record_route_port,
            instance: cfg.instance,
            other_ports: [Transport::Tls, Transport::Ws, Transport::Wss]
                .into_iter()
                .filter(|t| cfg.transports.contains(t))
                .map(port_of)
                .collect(),
            vias,
            own_vias,
            rrs: TRANSPORTS.map(|t| format!("<sip:{}{};lr;sb=", pool_hostport(t), param(t))),
            paths: TRANSPORTS.map(|t| format!("<sip:{}{};lr;ob;flow=", pool_hostport(t), param(t))),
            rrs_here: TRANSPORTS.map(|t| format!("<sip:{}{};lr;sb=", hostport(t), param(t))),
            paths_here: TRANSPORTS.map(|t| format!("<sip:{}{};lr;ob;flow=", hostport(t), param(t))),
            held_here: cfg.pool.flow_route == crate::config::FlowRoute::Instance,
        }
    }

    fn index(t: Transport) -> usize {
        match t {
            Transport::Udp => 0,
            Transport::Tcp => 1,
            Transport::Tls => 2,
            Transport::Ws => 3,
            Transport::Wss => 4,
        }
    }

    /// Our Via value up to the branch, for a hop over `t`.
    fn via(&self, t: Transport) -> &str {
        &self.vias[Me::index(t)]
    }

    /// Our Record-Route value up to the `sb` token, facing `t`: naming
    /// this instance when `held` (the phone is on a connection of ours)
    /// and `pool.flow_route` says so, else the pool.
    fn rr(&self, t: Transport, held: bool) -> &str {
        if held && self.held_here {
            &self.rrs_here[Me::index(t)]
        } else {
            &self.rrs[Me::index(t)]
        }
    }

    /// Our Path value up to the flow token, facing `t` (`held` as for
    /// [`Me::rr`]).
    fn path(&self, t: Transport, held: bool) -> &str {
        if held && self.held_here {
            &self.paths_here[Me::index(t)]
        } else {
            &self.paths[Me::index(t)]
        }
    }
}

/// A connection a user agent opened to us, as the shell announced it.
#[derive(Debug, Clone, Copy)]
pub struct FlowInfo {
    /// Its far end.
    pub peer: std::net::SocketAddr,
    /// TCP or TLS.
    pub transport: Transport,
    /// A pool server opened it (its requests came on it): responses to
    /// them go down it from user agents.
    pub server: bool,
}

/// The routing core.
pub struct Router {
    cfg: ArcSwap<Config>,
    pool: ArcSwap<Pool>,
    /// Session table.
    pub sessions: Sessions,
    /// Scoring parameters, live.
    pub scoring: LiveScoring,
    policy: ArcSwap<Box<dyn Policy>>,
    /// The performance table (written by the performance server).
    pub table: SharedTable,
    /// Counters.
    pub stats: Stats,
    keys: Keys,
    me: Me,
    txns: papaya::HashMap<u64, Arc<Mutex<ClientTxn>>, crate::codec::IdHash>,
    /// Which transactions the once-a-second round looks at: the ones in
    /// progress, and the completed ones whose end is due (never the whole
    /// table, which holds every call of the last 64 × T1).
    sweep: Mutex<txn::Sweep>,
    /// New-session requests refused without a transaction, for 64 × T1:
    /// their copies are refused again.
    refusals: refusals::Refusals,
    /// Transactions ended early to make room in a full table
    /// (`end_one_early`), remembered 64 × T1 so that a late copy of the
    /// request is absorbed as the entry would have absorbed it, not taken
    /// for a new call ([`ENDED_SLOTS`] at most: 16 bytes each).
    ended: refusals::Refusals,
    forks: papaya::HashMap<u64, Arc<Mutex<Fork>>, crate::codec::IdHash>,
    /// The balancer clock's zero (every `_ms` value counts from it).
    epoch: Instant,
    /// Set by a graceful stop: new sessions are refused.
    pub stopping: AtomicBool,
    /// This whole instance drained (`POST /drain`): new sessions and
    /// REGISTERs refused with 503 and `pool.drain_retry_after`, so user
    /// agents move to another instance of the pool; in-dialog traffic
    /// served until it ends.
    draining: AtomicBool,
    /// Next OPTIONS probe due per server id, and the last sweep (ms).
    probe_due: Mutex<std::collections::HashMap<Arc<str>, u64>>,
    last_sweep: AtomicU64,
    /// Per-source token buckets (`[limits]`), rebuilt when a reload changes them.
    limiter: ArcSwap<crate::limits::Limiter>,
    /// The connections user agents have open to us (RFC 5626 flows), by id:
    /// a request for a flow that is not here gets 430 Flow Failed.
    flows: papaya::HashMap<ConnId, FlowInfo>,
    /// Members found by name, per source (`[[discover]]` id, or the id of
    /// a server written `host:port`), and what its resolutions did.
    discovered: Mutex<std::collections::BTreeMap<String, Source>>,
    /// The other instances of the pool (`pool.peers`, fixed at start).
    peers: Box<[peer::Peer]>,
    /// Requests forwarded to a peer, waiting for its first answer, by our
    /// transaction id.
    peer_fwds: papaya::HashMap<u64, peer::Pending, crate::codec::IdHash>,
}

/// One name followed in DNS, as the core keeps it.
#[derive(Debug, Default, Clone)]
pub struct Source {
    /// Its members (retiring ones included).
    pub members: Vec<crate::discover::Member>,
    /// Answers taken.
    pub answers: u64,
    /// Resolutions that failed (the last answer stayed).
    pub failures: u64,
    /// The last failure, when the last resolution failed.
    pub error: Option<String>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("sessions", &self.sessions.len())
            .field("transactions", &self.txns.len())
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router for `cfg` reading performance data from `table`; `epoch` is
    /// the zero of its millisecond clock.
    ///
    /// # Errors
    /// Invalid scoring in the config.
    pub fn new(
        cfg: Config,
        table: SharedTable,
        epoch: Instant,
    ) -> Result<Router, crate::load::ScoringError> {
        let keys = Keys::new(&cfg.secret);
        let me = Me::new(&cfg);
        let pool = Pool::build(&cfg.servers, &Pool::default());
        let limiter = crate::limits::Limiter::new(&cfg.limits, limiter_key(&keys));
        Ok(Router {
            sessions: Sessions::new(cfg.max_sessions),
            scoring: LiveScoring::new(cfg.scoring)?,
            policy: ArcSwap::from_pointee(
                crate::policy::by_name(&cfg.policy).unwrap_or_else(|| Box::new(Patent)),
            ),
            table,
            stats: Stats::default(),
            pool: ArcSwap::from_pointee(pool),
            keys,
            me,
            txns: papaya::HashMap::with_hasher(crate::codec::IdHash),
            sweep: Mutex::new(txn::Sweep::default()),
            refusals: refusals::Refusals::default(),
            ended: refusals::Refusals::with_slots(ENDED_SLOTS),
            forks: papaya::HashMap::with_hasher(crate::codec::IdHash),
            epoch,
            stopping: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            probe_due: Mutex::new(std::collections::HashMap::new()),
            last_sweep: AtomicU64::new(0),
            limiter: ArcSwap::from_pointee(limiter),
            flows: papaya::HashMap::new(),
            discovered: Mutex::new(std::collections::BTreeMap::new()),
            peers: cfg
                .pool
                .peers
                .iter()
                .copied()
                .map(peer::Peer::new)
                .collect(),
            peer_fwds: papaya::HashMap::with_hasher(crate::codec::IdHash),
            cfg: ArcSwap::from_pointee(cfg),
        })
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

    /// Takes a re-read config: the pool, scoring, policy and routing settings
    /// change; listen addresses, transports, `sip.advertise`, the secret,
    /// `[capture]` and the agent key need a restart (logged, and kept as
    /// they are).
    pub fn reload(&self, mut new: Config) {
        let cur = self.cfg.load();
        if new.listen != cur.listen || new.transports != cur.transports {
            warn!("sip.listen / sip.transports changed: takes effect at the next restart");
            new.listen.clone_from(&cur.listen);
            new.transports.clone_from(&cur.transports);
        }
        if new.advertise_host != cur.advertise_host || new.advertise_port != cur.advertise_port {
            warn!("sip.advertise changed: takes effect at the next restart");
            new.advertise_host.clone_from(&cur.advertise_host);
            new.advertise_port = cur.advertise_port;
        }
        if new.record_route_host != cur.record_route_host
            || new.record_route_port != cur.record_route_port
            || new.instance != cur.instance
            || new.pool.peers != cur.pool.peers
            || new.pool.flow_route != cur.pool.flow_route
        {
            warn!(
                "sip.record_route / pool.instance / pool.peers / pool.flow_route changed: takes effect at the next restart"
            );
            new.record_route_host.clone_from(&cur.record_route_host);
            new.record_route_port = cur.record_route_port;
            new.instance = cur.instance;
            new.pool.peers.clone_from(&cur.pool.peers);
            new.pool.flow_route = cur.pool.flow_route;
        }
        if new.secret != cur.secret {
            warn!("routing.secret changed: takes effect at the next restart");
            new.secret.clone_from(&cur.secret);
        }
        if new.discover != cur.discover || new.dns != cur.dns {
            warn!(
                "[[discover]], [dns] or a server written host:port changed: takes effect at the next restart"
            );
            new.discover.clone_from(&cur.discover);
            new.dns.clone_from(&cur.dns);
        }
        if new.capture != cur.capture {
            warn!("[capture] changed: takes effect at the next restart");
            new.capture.clone_from(&cur.capture);
        }
        if let Err(e) = self.scoring.set(new.scoring) {
            warn!(error = %e, "scoring not changed");
        }
        // Before the policy check (it reads the pool), and again once the
        // configuration is stored (a DNS answer in between read the old one).
        self.apply_servers(&new.servers);
        if new.limits != self.limiter.load().cfg {
            self.limiter.store(Arc::new(crate::limits::Limiter::new(
                &new.limits,
                limiter_key(&self.keys),
            )));
        }
        if new.policy != cur.policy
            && let Err(e) = self.set_policy(&new.policy)
        {
            warn!(error = %e, "policy not changed");
        }
        info!(servers = new.servers.len(), "configuration reloaded");
        self.cfg.store(Arc::new(new));
        self.rebuild_pool();
    }

    /// Rebuilds the pool from the configuration in force and the members
    /// found by name ([`Router::apply_servers`]).
    fn rebuild_pool(&self) {
        let d = self.discovered_lock();
        // Read under the lock: of two rebuilds at once (a reload, a DNS
        // answer), the later one has the later configuration.
        let cfg = self.cfg.load_full();
        self.build_pool(&d, &cfg.servers);
    }

    /// Replaces the pool: servers are kept by id with their counters and drain
    /// state; new ids start fresh; removed ids go (their sessions idle out).
    /// The members found by name are added after `servers`.
    pub fn apply_servers(&self, servers: &[crate::config::ServerConfig]) {
        let d = self.discovered_lock();
        self.build_pool(&d, servers);
    }

    fn build_pool(
        &self,
        d: &std::collections::BTreeMap<String, Source>,
        servers: &[crate::config::ServerConfig],
    ) {
        let old = self.pool.load_full();
        let named = d.iter().flat_map(|(k, src)| {
            src.members
                .iter()
                .map(move |m| (&m.cfg, m.gone_since.is_some(), Some(k.as_str())))
        });
        let all = servers.iter().map(|c| (c, false, None)).chain(named);
        self.pool.store(Arc::new(Pool::build_with(all, &old)));
    }

    fn sweep_lock(&self) -> std::sync::MutexGuard<'_, txn::Sweep> {
        self.sweep
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn discovered_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Source>> {
        self.discovered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A DNS answer for `src` at `now` (from the shell): its members join,
    /// follow, or retire ([`crate::discover::merge`]), and the pool is
    /// rebuilt with the same rules as a reload.
    pub fn set_discovered(
        &self,
        src: &crate::config::DiscoverConfig,
        targets: &[crate::discover::Target],
        now: Now,
    ) {
        let ms = self.ms(now);
        {
            let mut d = self.discovered_lock();
            let e = d.entry(src.source.clone()).or_default();
            let next = crate::discover::merge(src, &e.members, targets, ms);
            if next != e.members {
                let live = next.iter().filter(|m| m.gone_since.is_none()).count();
                info!(source = %src.source, name = %src.name, members = live, retiring = next.len() - live, "DNS: members changed");
            }
            e.members = next;
            e.answers += 1;
            e.error = None;
        }
        self.rebuild_pool();
    }

    /// A resolution of `source` failed: its members stay as they are.
    pub fn discovery_failed(&self, source: &str, error: String) {
        let mut d = self.discovered_lock();
        let e = d.entry(source.to_owned()).or_default();
        e.failures += 1;
        e.error = Some(error);
    }

    /// What each followed name's resolutions did, by source.
    #[must_use]
    pub fn sources(&self) -> Vec<(String, Source)> {
        self.discovered_lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Members retired for `dns.retire_after` leave the pool.
    fn sweep_retired(&self, cfg: &Config, now: Now) {
        let ms = self.ms(now);
        let after = cfg.dns.retire_after.as_millis() as u64;
        let changed = {
            let mut d = self.discovered_lock();
            let mut changed = false;
            for src in d.values_mut() {
                changed |= crate::discover::sweep(&mut src.members, ms, after);
            }
            changed
        };
        if changed {
            info!("DNS: retired members left the pool");
            self.rebuild_pool();
        }
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

    /// Drains or undrains this whole instance (new sessions and REGISTERs
    /// refused with 503; dialogs and transactions under way go on).
    pub fn set_instance_drained(&self, drained: bool) {
        self.draining.store(drained, Ordering::Relaxed);
        info!(drained, "instance drain state changed");
    }

    /// Whether this instance is drained.
    #[must_use]
    pub fn instance_drained(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// A user agent opened connection `id` to us from `peer`: a flow that
    /// requests from servers can reach it by (RFC 5626 §5.3).
    pub fn conn_opened(&self, id: ConnId, peer: std::net::SocketAddr, transport: Transport) {
        self.flows.pin().insert(
            id,
            FlowInfo {
                peer,
                transport,
                server: false,
            },
        );
    }

    /// Connection `id` closed: its flow token now gets 430 Flow Failed.
    pub fn conn_closed(&self, id: ConnId) {
        self.flows.pin().remove(&id);
    }

    /// The user agents' connections open now.
    #[must_use]
    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// Connection `id` carries a pool server's requests.
    fn mark_server_conn(&self, id: ConnId) {
        let flows = self.flows.pin();
        if let Some(f) = flows.get(&id)
            && !f.server
        {
            flows.insert(id, FlowInfo { server: true, ..*f });
        }
    }

    /// Whether connection `id` is one a pool server opened to us.
    fn is_server_conn(&self, id: ConnId) -> bool {
        self.flows.pin().get(&id).is_some_and(|f| f.server)
    }

    /// What the shell told us of connection `id`.
    fn flow_info(&self, id: ConnId) -> Option<FlowInfo> {
        self.flows.pin().get(&id).copied()
    }

    /// Client transactions in the table.
    #[must_use]
    pub fn transactions(&self) -> usize {
        self.txns.len()
    }

    /// How many entries the once-a-second round's work list holds: the
    /// transactions in progress and the scheduled ends of completed ones
    /// (one transaction may have more than one). Bounded by a small
    /// multiple of [`Router::transactions`].
    #[must_use]
    pub fn sweep_entries(&self) -> usize {
        self.sweep_lock().len()
    }

    /// How many transactions the once-a-second rounds have looked at, in
    /// all (what is due each time, not the whole table).
    #[must_use]
    pub fn sweep_looked_at(&self) -> u64 {
        self.sweep_lock().looked_at
    }

    /// REGISTER forks in the table.
    #[must_use]
    pub fn forks(&self) -> usize {
        self.forks.len()
    }

    /// Transactions outstanding at the servers (for a graceful stop).
    #[must_use]
    pub fn outstanding(&self) -> u32 {
        self.pool
            .load()
            .servers
            .iter()
            .map(|s| s.stats.outstanding())
            .sum()
    }

    /// Milliseconds on the balancer clock.
    fn ms(&self, now: Now) -> u64 {
        now.at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Handles one message that came from `origin`.
    pub fn on_message(
        &self,
        data: &[u8],
        origin: Origin,
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Outbox,
    ) {
        let cfg = self.cfg.load();
        if data.len() > cfg.max_message_size {
            self.refuse_raw(data, 513, "Message Too Large", origin, out);
            return;
        }
        if let Origin::Udp { peer } = origin
            && crate::stun::is_stun(data)
        {
            // A NAT keep-alive (RFC 5626 §4.4.2), not SIP.
            let mut answered = false;
            out.send_with(Dest::Udp(peer), |b| {
                answered = crate::stun::answer(data, peer, b)
            });
            if !answered {
                out.cancel_last();
                self.drop_counted(DropReason::Unparseable, out);
            }
            return;
        }
        let transport = match origin {
            Origin::Udp { .. } => SipTransport::Datagram,
            // One SIP message per WebSocket message (RFC 7118 §5):
            // Content-Length optional, as in a datagram.
            Origin::Conn {
                conn,
                inbound: true,
                ..
            } if self.flow_info(conn).is_some_and(|f| f.transport.is_ws()) => {
                SipTransport::Datagram
            }
            Origin::Conn { .. } => SipTransport::Stream,
        };
        // Borrowed where it lies: a `Message` is over a kilobyte, and moving
        // it out of the `Result` was a copy per message.
        let parsed = Message::parse_known(data, transport, &self.me.own_vias);
        let msg = match &parsed {
            Ok(m) => m,
            Err(sip::Error::Empty) => return,
            Err(e) => {
                debug!(error = %e, peer = %origin.peer(), "unparseable message");
                let reason = refusal_reason(e);
                self.refuse_raw(data, e.status(), &reason, origin, out);
                return;
            }
        };
        if msg.is_request() {
            if let Err(e) = msg.validate() {
                debug!(error = %e, call_id = %String::from_utf8_lossy(msg.call_id()), "invalid request");
                let reason = refusal_reason(&e);
                self.reply(msg, e.status(), &reason, &[], origin.reply_dest(), out);
                return;
            }
            self.stats.request(msg.method());
            self.request(&cfg, msg, origin, now, rng, out);
        } else {
            self.response(&cfg, msg, origin, now, rng, out);
        }
    }

    /// Handles a timer the core asked for.
    pub fn on_timer(&self, key: TimerKey, now: Now, rng: &mut dyn RngCore, out: &mut Outbox) {
        match key {
            TimerKey::Failover { txn, attempt } => self.failover_timer(txn, attempt, now, rng, out),
            TimerKey::Retransmit { txn, n } => self.retransmit_timer(txn, n, now, out),
            TimerKey::Resend {
                txn,
                attempt,
                bye,
                n,
            } => self.resend_timer(txn, attempt, bye, n, now, out),
            TimerKey::Fork { fork } => self.finish_fork(fork, true, now, out),
            TimerKey::Trying { txn } => self.trying_timer(txn, now, out),
            TimerKey::PeerForward { txn } => self.peer_timer(txn, now, out),
        }
    }

    /// Housekeeping, every 100 ms: health and OPTIONS probes; every second:
    /// Timer C, transaction timeouts and the sweep of idle sessions.
    pub fn tick(&self, now: Now, rng: &mut dyn RngCore, out: &mut Outbox) {
        self.probe_round(now, out);
        self.peer_round(now, out);
        self.health_round(now, rng, out);
        let ms = self.ms(now);
        let last = self.last_sweep.load(Ordering::Relaxed);
        if ms >= last + 1000
            && self
                .last_sweep
                .compare_exchange(last, ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.txn_round(now, rng, out);
            self.sweep(now);
            self.sweep_retired(&self.cfg.load(), now);
        }
    }

    /// Whether `host:port` names this balancer (its SIP port, or its TLS
    /// or WebSocket port when it has one): this instance, or its pool.
    fn is_ours(&self, host: &sip::Host<'_>, port: Option<u16>) -> bool {
        let written = port;
        let port = port.unwrap_or(5060);
        let named = |name: &str, ip: Option<std::net::IpAddr>| match host {
            sip::Host::Name(n) => n.eq_ignore_ascii_case(name.as_bytes()),
            h => h.ip().is_some() && h.ip() == ip,
        };
        let other = self.me.other_ports.contains(&port);
        // An SRV name is ours without a port (its records say the port) or
        // with one of ours.
        let pool_port = match self.me.pool_port {
            Some(p) => port == p || other,
            None => written.is_none() || port == self.me.port || other,
        };
        ((port == self.me.port || other) && named(&self.me.host, self.me.ip))
            || (pool_port && named(&self.me.pool_host, self.me.pool_ip))
    }

    /// Whether a URI (a Route, a Record-Route) names this balancer.
    fn uri_is_ours(&self, u: &sip::Uri<'_>) -> bool {
        u.host.is_some_and(|h| self.is_ours(&h, u.port))
    }

    /// A keyed hash of what stays the same when a request loops back to us
    /// (RFC 3261 §16.3 step 4): Request-URI, From tag, Call-ID, CSeq, and
    /// the Route set. With the Route set, a request that spirals back
    /// through us with the same Request-URI (an in-dialog request from a
    /// server that record-routed, its route set one shorter) is a spiral,
    /// not a loop.
    fn loop_hash(&self, msg: &Message<'_>) -> u32 {
        let uri = msg.request_uri().map_or(&b""[..], |u| u.raw);
        let from_tag = msg.tags().0.unwrap_or_default();
        let cseq = msg.cseq();
        // A CANCEL and a non-2xx ACK carry the INVITE's branch (RFC 3261
        // §9.1, §17.1.1.3): hash them as the INVITE they belong to.
        let method = match cseq.method {
            sip::Method::Cancel | sip::Method::Ack => &b"INVITE"[..],
            m => m.as_bytes(),
        };
        let mut routes = 0u64;
        for r in msg.values(sip::HeaderName::Route) {
            routes = routes.rotate_left(5) ^ self.keys.hash(&[r]);
        }
        self.keys.hash(&[
            uri,
            from_tag,
            msg.call_id(),
            &cseq.seq.to_be_bytes(),
            method,
            &routes.to_le_bytes(),
        ]) as u32
    }

    /// Our transaction id for a request: the same for the request, its
    /// retransmissions, its CANCEL and its non-2xx ACK (they share the UA's
    /// top Via), and the same after a restart (keyed by the secret only).
    fn txn_id(&self, msg: &Message<'_>) -> u64 {
        let v = msg.top_via();
        let branch = v.branch.unwrap_or_default();
        // RFC 2543 peers have no branch: fall back to Call-ID and CSeq number.
        let fallback = if v.is_rfc3261() {
            &[][..]
        } else {
            msg.call_id()
        };
        self.keys.hash(&[
            branch,
            v.raw.split(|&b| b == b';').next().unwrap_or_default(),
            fallback,
            &msg.cseq().seq.to_be_bytes(),
        ])
    }

    /// Writes our Via value for a request to `transport` into `out`.
    fn write_via(
        &self,
        out: &mut impl crate::codec::Sink,
        transport: Transport,
        branch: Branch,
        conn: Option<u64>,
    ) {
        out.put(self.me.via(transport).as_bytes());
        branch.write(out);
        if let Some(c) = conn {
            crate::codec::write_conn(c, out);
        }
    }

    /// The branch of attempt/leg `leg` of transaction `txn`.
    fn branch(txn: u64, leg: Leg, loop_hash: u32) -> Branch {
        Branch {
            txn,
            leg,
            loop_hash,
            mac: None,
        }
    }

    /// `branch` with its MAC over `hop`, where the responses to the request
    /// it goes on will be relayed (RFC 3261 §18.2.2): a forged or edited
    /// response cannot be relayed anywhere else.
    fn seal(&self, mut branch: Branch, hop: &Dest) -> Branch {
        let text = HopText::of(hop);
        branch.mac =
            Some(
                self.keys
                    .branch_mac(branch.txn, branch.leg, branch.loop_hash, text.as_bytes()),
            );
        branch
    }

    /// Whether `branch` carries our MAC over `hop`.
    fn sealed_for(&self, branch: &Branch, hop: &Dest) -> bool {
        self.keys.verify_branch(branch, HopText::of(hop).as_bytes())
    }

    /// Draws a server for a new session among those not in `exclude`.
    fn select(
        &self,
        cfg: &Config,
        pool: &Pool,
        exclude: &[Arc<str>],
        now: Now,
        rng: &mut dyn RngCore,
    ) -> Option<Arc<Server>> {
        let table = self.table.load();
        let ms = self.ms(now);
        let inputs: SmallVec<[Input; 16]> = pool
            .servers
            .iter()
            .map(|s| {
                if exclude.contains(&s.id) {
                    return Input::Drained;
                }
                health::input_of(&table, s, now.at, ms, cfg)
            })
            .collect();
        let facts = health::facts_of(cfg, pool, &table, ms, now.wall_ms);
        let scoring = self.scoring.get();
        let view = PoolView {
            inputs: &inputs,
            facts: &facts,
            scoring: &scoring,
        };
        let i = self.policy.load().select(&view, rng)?;
        pool.servers.get(i).cloned()
    }

    /// Whether a new session may go to `s` now (not drained, not down by
    /// any health signal in use).
    fn usable(&self, cfg: &Config, s: &Server, now: Now) -> bool {
        let table = self.table.load();
        match health::input_of(&table, s, now.at, self.ms(now), cfg) {
            Input::Up(_) => true,
            // A server without an agent has no data by design.
            Input::NoData => s.cfg.agent.is_none(),
            Input::Down | Input::Drained => false,
        }
    }

    /// Whether a health signal says `s` is down now (agent, probe,
    /// ejection, its own overload): not drained, which keeps its calls.
    fn known_down(&self, cfg: &Config, s: &Server, now: Now) -> bool {
        let table = self.table.load();
        health::input_of(&table, s, now.at, self.ms(now), cfg) == Input::Down
    }

    /// Answers a request ourselves (RFC 3261 §8.2.6) to `dest`.
    fn reply(
        &self,
        req: &Message<'_>,
        code: u16,
        reason: &str,
        extra: &[&[u8]],
        dest: Dest,
        out: &mut Outbox,
    ) {
        let tag = self.to_tag(req);
        out.send_with(dest, |b| {
            sip::reply::response_for(req, code, reason, &tag, extra, b);
        });
        self.stats.refusal(code);
    }

    /// The To tag of our own responses to a request: the same for its
    /// retransmissions.
    fn to_tag(&self, req: &Message<'_>) -> [u8; 10] {
        let mut tag = *b"lb00000000";
        let h = self.keys.hash(&[req.call_id(), b"to-tag"]) as u32;
        tag[2..].copy_from_slice(&hex8(h));
        tag
    }

    fn refuse_raw(&self, data: &[u8], code: u16, reason: &str, origin: Origin, out: &mut Outbox) {
        match sip::reply::error_response(data, code, reason) {
            Some(resp) => {
                self.stats.refusal(code);
                out.send(origin.reply_dest(), &resp);
            }
            None => self.drop_counted(DropReason::Unparseable, out),
        }
    }

    /// Counts a drop and records it in the outbox.
    fn drop_counted(&self, why: DropReason, out: &mut Outbox) {
        self.stats.drop(why);
        out.dropped(why);
    }

    /// Checks the core's structural invariants (debug builds and tests).
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        for (id, t) in &self.txns.pin() {
            let t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            t.check(*id);
        }
    }
}

/// The key of the per-source buckets' hash, from the routing secret.
fn limiter_key(keys: &Keys) -> (u64, u64) {
    (keys.hash(&[b"limits-0"]), keys.hash(&[b"limits-1"]))
}

/// A hop as the bytes the branch MAC binds, on the stack.
struct HopText {
    buf: [u8; 96],
    len: usize,
}

impl HopText {
    /// The hop in a few bytes: a tag, then the address (IP octets, port
    /// big-endian), the connection id, or the name and port. Binary, not
    /// text: no formatting on the per-message path.
    fn of(hop: &Dest) -> HopText {
        let mut t = HopText {
            buf: [0; 96],
            len: 0,
        };
        let mut put = |b: &[u8]| {
            let n = b.len().min(t.buf.len() - t.len);
            t.buf[t.len..t.len + n].copy_from_slice(&b[..n]);
            t.len += n;
        };
        let addr = |put: &mut dyn FnMut(&[u8]), a: &std::net::SocketAddr| {
            match a.ip() {
                std::net::IpAddr::V4(ip) => put(&ip.octets()),
                std::net::IpAddr::V6(ip) => put(&ip.octets()),
            }
            put(&a.port().to_be_bytes());
        };
        match hop {
            Dest::Udp(a) => {
                put(b"u");
                addr(&mut put, a);
            }
            Dest::Tcp(a) => {
                put(b"t");
                addr(&mut put, a);
            }
            Dest::Tls(a) => {
                put(b"s");
                addr(&mut put, a);
            }
            Dest::Conn(id) => {
                put(b"c");
                put(&id.to_be_bytes());
            }
            Dest::Resolve { host, port } => {
                put(b"n");
                put(host.as_bytes());
                put(&port.to_be_bytes());
            }
        }
        t
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Our Via of every transport is known to the parser, whatever the
    /// advertised host is written as (else responses are parsed in full:
    /// correct, only slower).
    #[test]
    fn every_own_via_is_known_to_the_parser() {
        let dir = std::env::temp_dir().join(format!("siplb-own-vias-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("key"), "own-vias-key-0123456789abcdef").unwrap();
        for adv in [
            "192.0.2.1:5060",
            "[2001:db8::5]:5070",
            "lb.example.com:5060",
        ] {
            let text = format!(
                "[sip]\nlisten = [\"127.0.0.1:5060\"]\nadvertise = \"{adv}\"\n\
                 [routing]\nsecret = \"own-vias-secret-0123456789abcdef\"\npolicy = \"static\"\n\
                 [perf]\nkey_file = \"key\"\n\
                 [[servers]]\nid = \"s1\"\naddress = \"127.0.0.1:5090\"\n"
            );
            let cfg = Config::parse(&text, &dir).unwrap();
            assert_eq!(Me::new(&cfg).own_vias.len(), 5, "{adv}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
