//! The forwarding shell (FIG 4 box 402): sockets, connections, timers and
//! name resolution around the routing core ([`crate::router`]), and
//! [`Balancer::start`], the one entry point that `siplb balancer`, `siplb
//! demo` and `siplb experiment` share.
//!
//! Each UDP socket (several on one port with SO_REUSEPORT) has a thread of
//! its own that blocks in `recv_from` (no reactor, no wake-up of another
//! thread per datagram: docs/benchmarks.md measures why), and each TCP
//! connection has one task: it receives a message, reads the clock once,
//! calls the core, and performs the core's sends in the order they were
//! queued before it receives the next, so the messages of one flow leave
//! in the order they came. One timer task fires every timer the core asks
//! for from a heap shared with the socket tasks (a shortened
//! `failover_timeout` after a reload fires on time; see [`Timers`]); one
//! task ticks the core every 100 ms. Names (a Request-URI or
//! Via with a host name) are resolved by a resolver task with a cache, so a
//! slow resolver never stalls a socket. With `[capture]`, each message is
//! also handed to [`crate::capture`] where it is read and where it is
//! written (after TLS and WebSocket: the plaintext); without, that is one
//! branch on a `None`.

mod ws;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use perf::server::SharedTable;
use rand::{RngCore, SeedableRng};
use smallvec::SmallVec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::capture::{Capture, Proto};
use crate::config::{Config, Transport};
use crate::router::{ConnId, Dest, Now, Origin, Outbox, Router, TimerKey};
use crate::stats::DropReason;

/// Largest datagram we read.
const MAX_DATAGRAM: usize = 65_535;
/// How long a resolved name is kept (the system resolver gives no TTL).
const RESOLVED_FOR: Duration = Duration::from_secs(30);
/// How long a name that did not resolve is kept as such.
const UNRESOLVED_FOR: Duration = Duration::from_secs(5);
/// Lookups in flight at most; past it, datagrams to new names are dropped.
const MAX_LOOKUPS: usize = 64;
/// Messages queued per connection before sends to it fail.
const CONN_QUEUE: usize = 1024;

/// The time now, read once per input.
#[must_use]
pub fn now() -> Now {
    Now {
        at: Instant::now(),
        wall_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// The bound sockets the balancer serves.
#[derive(Debug, Default)]
pub struct Sockets {
    /// UDP sockets (at least one: servers are reached from it).
    pub udp: Vec<Arc<UdpSocket>>,
    /// TCP listeners.
    pub tcp: Vec<TcpListener>,
    /// TLS listeners (TCP sockets on `sip.tls_port`; the handshake is ours).
    pub tls: Vec<TcpListener>,
    /// WebSocket listeners (`sip.ws_port`).
    pub ws: Vec<TcpListener>,
    /// Secure WebSocket listeners (`sip.wss_port`; TLS, then WebSocket).
    pub wss: Vec<TcpListener>,
}

/// Where selection draws its randomness.
enum Rng {
    /// The thread's generator, seeded by the OS (production; no lock).
    Os,
    /// One seeded generator (test beds' `--seed`), behind a lock.
    Seeded(Box<Mutex<rand::rngs::StdRng>>),
}

/// What every task of the shell shares.
struct Net {
    router: Arc<Router>,
    /// The UDP sockets, blocking (their threads wait in `recv_from`; a
    /// `send_to` on UDP does not wait).
    udp: Vec<Arc<std::net::UdpSocket>>,
    /// Each UDP socket's own address (the capture's source of what it sends).
    udp_local: Vec<SocketAddr>,
    /// With SIP on more than one address, which sockets send to whom:
    /// [`UdpSides`]. `None`: one address, every socket alike.
    udp_sides: Option<UdpSides>,
    /// HEP capture (`[capture]`); `None` when off: then each hook below is
    /// one branch and nothing else.
    capture: Option<Capture>,
    conns: papaya::HashMap<ConnId, mpsc::Sender<Bytes>>,
    /// Our persistent connection to each TCP (`false`) and TLS (`true`)
    /// server, or user agent address a Request-URI named over TCP.
    servers: Mutex<HashMap<(SocketAddr, bool), mpsc::Sender<Bytes>>>,
    next_conn: AtomicU64,
    /// Inbound connections open per source address (bounded by
    /// `sip.max_connections` entries).
    per_source: Mutex<HashMap<std::net::IpAddr, usize>>,
    timers: Timers,
    resolve: mpsc::Sender<(Box<str>, u16, Bytes)>,
    rng: Rng,
    /// The TLS certificate in force, when there are TLS listeners.
    tls: Option<Arc<crate::tls::TlsListener>>,
    /// The TLS client side, when a server has `transport = "tls"`.
    tls_client: Option<Arc<crate::tls::TlsClient>>,
    me: std::sync::Weak<Net>,
}

impl Net {
    /// Runs `f` with the generator in use.
    fn with_rng<R>(&self, f: impl FnOnce(&mut dyn RngCore) -> R) -> R {
        match &self.rng {
            Rng::Os => f(&mut rand::rng()),
            Rng::Seeded(m) => f(&mut *m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
        }
    }

    /// Hands one message to the core and performs what it asks.
    async fn handle(&self, data: &[u8], origin: Origin, out: &mut Outbox) {
        self.handle_now(data, origin, None, out);
    }

    /// [`Net::handle`] for a thread that is not a task (the UDP threads):
    /// nothing in it waits.
    /// `socket`: the UDP socket (index) the datagram came in on.
    fn handle_now(&self, data: &[u8], origin: Origin, socket: Option<usize>, out: &mut Outbox) {
        let at = now();
        self.with_rng(|rng| self.router.on_message(data, origin, at, rng, out));
        let came_in = socket.map(|i| (origin.peer(), i));
        self.perform_now(out, came_in);
        self.fire_due(at, out);
    }

    /// Fires the timers due at `at` (at most [`TIMERS_PER_MESSAGE`]) on the
    /// thread that has just handled a message: under load the timers go
    /// off here, on a thread that is awake anyway, and the timer task only
    /// backs them up ([`Timers`]). One atomic load when none is due.
    fn fire_due(&self, at: Now, out: &mut Outbox) {
        if !self.timers.any_due(at.at) {
            return;
        }
        let mut due: SmallVec<[TimerKey; TIMERS_PER_MESSAGE]> = SmallVec::new();
        self.timers.take_due(at.at, &mut due);
        for key in due {
            self.with_rng(|rng| self.router.on_timer(key, at, rng, out));
            self.perform_now(out, None);
        }
    }

    /// Performs the outbox in order and empties it.
    async fn perform(&self, out: &mut Outbox) {
        self.perform_now(out, None);
    }

    /// [`Net::perform`]: a UDP send does not wait, a connection's sends go
    /// through its queue, a new connection or a lookup is a task of its own.
    /// `came_in`: the peer and socket of the datagram being handled (what
    /// goes back to that peer leaves from that socket, when SIP listens on
    /// more than one address: [`UdpSides`]).
    fn perform_now(&self, out: &mut Outbox, came_in: Option<(SocketAddr, usize)>) {
        for (dest, bytes) in out.sends() {
            let ok = match dest {
                Dest::Udp(to) => match came_in {
                    Some((peer, i)) if peer == *to && self.udp_sides.is_some() => {
                        self.send_udp_on(i, bytes, *to)
                    }
                    _ => self.send_udp(bytes, *to),
                },
                Dest::Conn(id) => self
                    .conns
                    .pin()
                    .get(id)
                    .is_some_and(|tx| tx.try_send(Bytes::copy_from_slice(bytes)).is_ok()),
                Dest::Tcp(to) => self.send_server(*to, false, bytes),
                Dest::Tls(to) => self.send_server(*to, true, bytes),
                Dest::Resolve { host, port } => self
                    .resolve
                    .try_send((host.clone(), *port, Bytes::copy_from_slice(bytes)))
                    .is_ok(),
            };
            if !ok {
                self.router.stats.drop(DropReason::SendFailed);
            }
        }
        self.timers.arm(out.timers());
        out.clear();
    }

    /// Sends a datagram from one of our UDP sockets (one per destination,
    /// so one flow keeps its order; with SIP on several addresses, one of
    /// the side [`UdpSides`] says), captured when it went.
    fn send_udp(&self, bytes: &[u8], to: SocketAddr) -> bool {
        let spread = to.port() as usize;
        let i = match &self.udp_sides {
            None => spread % self.udp.len().max(1),
            Some(sides) => {
                let inner = self.router.pool().by_addr(to).is_some()
                    || self
                        .router
                        .config()
                        .pool
                        .peers
                        .iter()
                        .any(|p| p.address == to);
                let side = if inner { &sides.inner } else { &sides.outer };
                side[spread % side.len()]
            }
        };
        self.send_udp_on(i, bytes, to)
    }

    /// Sends on UDP socket `i`; from this instance's own address instead
    /// when `i` is on the pool's address and that address has left this
    /// host ([`Net::send_udp_instead`]).
    fn send_udp_on(&self, i: usize, bytes: &[u8], to: SocketAddr) -> bool {
        match self.udp[i].send_to(bytes, to) {
            Ok(_) => {
                if let Some(c) = &self.capture {
                    c.record(self.udp_local[i], to, Proto::Udp, bytes);
                }
                true
            }
            Err(e) => self.send_udp_instead(i, &e, bytes, to),
        }
    }

    /// A send from the pool's address (the virtual IP, `sip.record_route`)
    /// that the kernel refused because the address is no longer on this
    /// host: keepalived moved it to another instance in a switchover while
    /// a transaction was still in flight here (its server answers by our
    /// Via, this instance's own address). Linux refuses such a send
    /// (IPv4: ENETUNREACH, even with IP_FREEBIND); the answer then goes
    /// from this instance's own address, so that the call is not lost: a
    /// phone matches it by its transaction, and one behind a NAT that lets
    /// in only the address it sent to loses nothing it would not have lost.
    /// Counted in `siplb_udp_source_fallback_total`; the first, and one in
    /// 10,000 after, logged.
    fn send_udp_instead(&self, i: usize, e: &std::io::Error, bytes: &[u8], to: SocketAddr) -> bool {
        use std::io::ErrorKind::{AddrNotAvailable, InvalidInput, NetworkUnreachable};
        let Some(sides) = &self.udp_sides else {
            return false;
        };
        if !sides.outer.contains(&i)
            || !matches!(
                e.kind(),
                NetworkUnreachable | AddrNotAvailable | InvalidInput
            )
        {
            return false;
        }
        let j = sides.inner[to.port() as usize % sides.inner.len()];
        if self.udp[j].send_to(bytes, to).is_err() {
            return false;
        }
        if let Some(c) = &self.capture {
            c.record(self.udp_local[j], to, Proto::Udp, bytes);
        }
        let n = self
            .router
            .stats
            .udp_source_fallback
            .fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(10_000) {
            warn!(
                pool_address = %self.udp_local[i].ip(),
                sent_from = %self.udp_local[j].ip(),
                %to,
                error = %e,
                total = n + 1,
                "the pool's address is no longer on this host (moved to another instance?): \
                 sending to phones from this instance's own address"
            );
        }
        true
    }

    fn send_server(self: &Net, addr: SocketAddr, tls: bool, bytes: &[u8]) -> bool {
        let mut m = self
            .servers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let tx = match m.get(&(addr, tls)) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let Some(tx) = self.open_server_conn(addr, tls) else {
                    return false;
                };
                m.insert((addr, tls), tx.clone());
                tx
            }
        };
        tx.try_send(Bytes::copy_from_slice(bytes)).is_ok()
    }

    /// Opens a connection to a TCP or TLS server (or a TCP user agent);
    /// messages queue until it is up. `None` for TLS without a client side.
    fn open_server_conn(&self, addr: SocketAddr, tls: bool) -> Option<mpsc::Sender<Bytes>> {
        let tls = if tls {
            let client = self.tls_client.as_ref()?;
            let pool = self.router.pool();
            let name = pool.by_addr(addr).and_then(|s| s.cfg.tls_name.clone());
            match crate::tls::server_name(name.as_deref(), addr) {
                Ok(n) => Some((client.connector(), n)),
                Err(e) => {
                    warn!(%addr, error = %e, "cannot connect to server over TLS");
                    return None;
                }
            }
        } else {
            None
        };
        let (tx, rx) = mpsc::channel::<Bytes>(CONN_QUEUE);
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.conns.pin().insert(id, tx.clone());
        let net = self.me();
        tokio::spawn(async move {
            let connected =
                tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await;
            let gone = |why: &str| {
                warn!(%addr, "cannot connect to server over {why}");
                if let Some(n) = net.upgrade() {
                    n.conns.pin().remove(&id);
                }
            };
            let Ok(Ok(stream)) = connected else {
                return gone("TCP");
            };
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().unwrap_or(unspecified(addr));
            let origin = Origin::Conn {
                peer: addr,
                conn: id,
                inbound: false,
            };
            match tls {
                None => serve_outbound(net, stream, origin, local, rx).await,
                Some((connector, name)) => {
                    let hs = tokio::time::timeout(
                        Duration::from_secs(2),
                        connector.connect(name, stream),
                    );
                    match hs.await {
                        Ok(Ok(s)) => serve_outbound(net, s, origin, local, rx).await,
                        Ok(Err(e)) => gone(&format!("TLS: {e}")),
                        Err(_) => gone("TLS: handshake timed out"),
                    }
                }
            }
        });
        Some(tx)
    }

    fn me(&self) -> std::sync::Weak<Net> {
        self.me.clone()
    }
}

/// A running balancer: the routing core and the shell's tasks.
pub struct Balancer {
    router: Arc<Router>,
    tls: Option<Arc<crate::tls::TlsListener>>,
    tls_client: Option<Arc<crate::tls::TlsClient>>,
    tasks: JoinSet<()>,
    udp: UdpThreads,
}

/// The UDP sockets' threads, told to stop when the balancer stops or is
/// dropped.
/// The UDP sockets of a balancer listening on more than one address (a
/// virtual IP and its own, `sip.listen`), by whom they send to: the servers
/// and the pool's peers from this instance's own address (`sip.advertise`,
/// the address in our Via, else the first listen address), everyone else —
/// the phones — from the pool's (`sip.record_route`, the virtual IP), since
/// a phone's NAT may let in only what comes from the address it sent to.
#[derive(Debug)]
struct UdpSides {
    inner: Vec<usize>,
    outer: Vec<usize>,
}

impl UdpSides {
    fn of(cfg: &crate::config::Config, local: &[SocketAddr]) -> Option<UdpSides> {
        let first = local.first()?.ip();
        if local.iter().all(|a| a.ip() == first) {
            return None;
        }
        let ip = |host: &str| {
            host.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .ok()
        };
        let side = |want: Option<std::net::IpAddr>| -> Vec<usize> {
            want.map_or_else(Vec::new, |w| {
                (0..local.len()).filter(|&i| local[i].ip() == w).collect()
            })
        };
        let mut inner = side(ip(&cfg.advertise_host));
        if inner.is_empty() {
            inner = side(Some(first));
        }
        let outer = side(ip(&cfg.record_route_host));
        if outer.is_empty() {
            return None;
        }
        info!(
            servers_from = %local[inner[0]].ip(),
            phones_from = %local[outer[0]].ip(),
            "UDP: to servers and peers from this instance's address, to the rest from the pool's"
        );
        Some(UdpSides { inner, outer })
    }
}

struct UdpThreads {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sockets: Vec<Arc<std::net::UdpSocket>>,
}

impl UdpThreads {
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the threads blocked in recv_from with empty datagrams (not
        // by shutting the sockets for reading: recv_from then returns no
        // address, which std's recv_from cannot represent and panics on).
        // SO_REUSEPORT spreads them by source port, so each comes from a
        // port of its own, a few per socket; the read timeout (250 ms) is
        // the backstop for a thread none reached.
        for s in &self.sockets {
            let Ok(mut to) = s.local_addr() else { continue };
            if to.ip().is_unspecified() {
                to.set_ip(match to {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let any = unspecified(to);
            for _ in 0..4 {
                if let Ok(w) = std::net::UdpSocket::bind(any) {
                    let _ = w.send_to(&[], to);
                }
            }
        }
    }
}

impl Drop for UdpThreads {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

/// A balancer made but not yet serving SIP: its routing core exists (the
/// admin API can use it), its sockets are bound, and it waits in
/// [`Prepared::serve`] for the agents' first answers.
pub struct Prepared {
    router: Arc<Router>,
    sockets: Sockets,
    table: SharedTable,
    seed: Option<u64>,
    tls: Option<Arc<crate::tls::TlsListener>>,
    tls_client: Option<Arc<crate::tls::TlsClient>>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// The routing core (for the admin API while the balancer waits).
    #[must_use]
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Waits (bounded) until every agent answered once, then serves SIP.
    ///
    /// # Errors
    /// A UDP socket that cannot be made blocking for its thread, or a
    /// thread that cannot start.
    pub async fn serve(self) -> Result<Balancer, String> {
        let Prepared {
            router,
            sockets,
            table,
            seed,
            tls,
            tls_client,
        } = self;
        wait_for_first_data(&router.config(), &table).await;
        let (resolve_tx, resolve_rx) = mpsc::channel(4096);
        // Each UDP socket as a blocking std socket for its thread (the
        // same socket: a duplicate of its descriptor).
        let mut udp = Vec::with_capacity(sockets.udp.len());
        for sock in &sockets.udp {
            use std::os::fd::AsFd;
            let std_sock = std::net::UdpSocket::from(
                sock.as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| format!("udp socket: {e}"))?,
            );
            std_sock
                .set_nonblocking(false)
                .and_then(|()| std_sock.set_read_timeout(Some(UDP_STOP_CHECK)))
                .map_err(|e| format!("udp socket: {e}"))?;
            udp.push(Arc::new(std_sock));
        }
        drop(sockets.udp);
        let udp_local = udp
            .iter()
            .map(|s| s.local_addr())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("udp socket: {e}"))?;
        let capture = match &router.config().capture {
            Some(c) => {
                let cap = Capture::start(c, router.stats.capture.clone())
                    .map_err(|e| format!("capture: {e}"))?;
                info!(hep = %c.hep, capture_id = c.capture_id, sample = c.sample, "capturing SIP to a HEP collector");
                Some(cap)
            }
            None => None,
        };
        let net = Arc::new_cyclic(|me: &std::sync::Weak<Net>| Net {
            me: me.clone(),
            router: router.clone(),
            udp: udp.clone(),
            udp_sides: UdpSides::of(&router.config(), &udp_local),
            udp_local: udp_local.clone(),
            capture,
            conns: papaya::HashMap::new(),
            servers: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            per_source: Mutex::new(HashMap::new()),
            timers: Timers::default(),
            resolve: resolve_tx,
            rng: match seed {
                Some(s) => Rng::Seeded(Box::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(s)))),
                None => Rng::Os,
            },
            tls: tls.clone(),
            tls_client: tls_client.clone(),
        });
        let mut tasks = JoinSet::new();
        let udp_threads = UdpThreads {
            stop: Arc::default(),
            sockets: udp.clone(),
        };
        let runtime = tokio::runtime::Handle::current();
        for (i, (sock, local)) in udp.into_iter().zip(udp_local).enumerate() {
            let (net, stop, runtime) = (net.clone(), udp_threads.stop.clone(), runtime.clone());
            std::thread::Builder::new()
                .name(format!("siplb-udp-{i}"))
                .spawn(move || {
                    // A new connection or lookup the core asks for is a task.
                    let _rt = runtime.enter();
                    udp_thread(&net, &sock, i, local, &stop);
                })
                .map_err(|e| format!("udp thread: {e}"))?;
        }
        for (kind, listeners) in [
            (Transport::Tcp, sockets.tcp),
            (Transport::Tls, sockets.tls),
            (Transport::Ws, sockets.ws),
            (Transport::Wss, sockets.wss),
        ] {
            for l in listeners {
                tasks.spawn(accept_loop(net.clone(), l, kind));
            }
        }
        tasks.spawn(timer_task(net.clone()));
        tasks.spawn(tick_task(net.clone()));
        tasks.spawn(resolver_task(net.clone(), resolve_rx));
        Ok(Balancer {
            router,
            tls,
            tls_client,
            tasks,
            udp: udp_threads,
        })
    }
}

impl Balancer {
    /// Starts the balancer for `cfg` on `sockets`, reading performance data
    /// from `table`: waits (bounded) until every agent answered once, then
    /// serves SIP. `seed` makes selection repeatable (test beds).
    ///
    /// # Errors
    /// As [`Balancer::prepare`].
    pub async fn start(
        cfg: Config,
        sockets: Sockets,
        table: SharedTable,
        seed: Option<u64>,
    ) -> Result<Balancer, String> {
        Balancer::prepare(cfg, sockets, table, seed)?.serve().await
    }

    /// The first half of [`Balancer::start`]: the routing core and the TLS
    /// sides, nothing served yet.
    ///
    /// # Errors
    /// An invalid scoring config, no UDP socket, or TLS listeners without a
    /// usable certificate.
    pub fn prepare(
        cfg: Config,
        sockets: Sockets,
        table: SharedTable,
        seed: Option<u64>,
    ) -> Result<Prepared, String> {
        if sockets.udp.is_empty() {
            return Err("the balancer needs at least one UDP socket".into());
        }
        let tls = if sockets.tls.is_empty() && sockets.wss.is_empty() {
            None
        } else {
            let t = cfg.tls.as_ref().ok_or("TLS listeners without [sip.tls]")?;
            Some(Arc::new(crate::tls::TlsListener::new(t)?))
        };
        let tls_client = if cfg
            .servers
            .iter()
            .chain(cfg.discover.iter().map(|d| &d.template))
            .any(|s| s.transport == Transport::Tls)
        {
            let t = cfg.tls.as_ref().ok_or("TLS servers without [sip.tls]")?;
            Some(Arc::new(crate::tls::TlsClient::new(t)?))
        } else {
            None
        };
        let router =
            Arc::new(Router::new(cfg, table.clone(), Instant::now()).map_err(|e| e.to_string())?);
        Ok(Prepared {
            router,
            sockets,
            table,
            seed,
            tls,
            tls_client,
        })
    }

    /// What re-reads the TLS files on a reload, before serving (for the
    /// reload hook, which the admin API has from the start).
    pub fn tls_reloader_of(
        prepared: &Prepared,
    ) -> impl Fn(&Config) -> Result<(), String> + Send + Sync + Clone + 'static {
        tls_reloader(prepared.tls.clone(), prepared.tls_client.clone())
    }

    /// Re-reads the TLS certificate and key (a reload): new handshakes use
    /// them, established connections keep theirs.
    ///
    /// # Errors
    /// The files cannot be used; the certificate in force stays.
    pub fn reload_tls(&self, cfg: &Config) -> Result<(), String> {
        self.tls_reloader()(cfg)
    }

    /// What re-reads the TLS files on a reload (for the reload hook).
    pub fn tls_reloader(
        &self,
    ) -> impl Fn(&Config) -> Result<(), String> + Send + Sync + Clone + 'static {
        tls_reloader(self.tls.clone(), self.tls_client.clone())
    }

    /// The routing core (for the admin API and the test beds).
    #[must_use]
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Stops gracefully: new sessions are refused with 503 while what is in
    /// flight finishes (at most `grace`); then every task ends.
    pub async fn stop(mut self, grace: Duration) {
        self.router.stopping.store(true, Ordering::Relaxed);
        info!(
            outstanding = self.router.outstanding(),
            "stopping: refusing new sessions, finishing transactions"
        );
        let start = Instant::now();
        while self.router.outstanding() > 0 && start.elapsed() < grace {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        info!(outstanding = self.router.outstanding(), "stopped");
        self.udp.stop();
        self.tasks.abort_all();
    }
}

/// Re-reads the TLS files of `listener` and `client` from a new config.
fn tls_reloader(
    listener: Option<Arc<crate::tls::TlsListener>>,
    client: Option<Arc<crate::tls::TlsClient>>,
) -> impl Fn(&Config) -> Result<(), String> + Send + Sync + Clone + 'static {
    move |cfg: &Config| {
        if let (Some(l), Some(t)) = (&listener, &cfg.tls) {
            l.reload(t)?;
        }
        if let (Some(c), Some(t)) = (&client, &cfg.tls)
            && t.server_ca.is_some()
        {
            c.reload(t)?;
        }
        Ok(())
    }
}

/// How many of the servers with an agent have had it answer (a sample) or
/// fail (marked down) once, and how many servers have an agent: the data
/// the balancer waits for before it serves SIP (and `GET /readyz` before it
/// says ready).
#[must_use]
pub fn agents_answered(cfg: &Config, t: &perf::server::Table) -> (usize, usize) {
    let mut answered = 0;
    let mut agents = 0;
    for s in cfg.servers.iter().filter(|s| s.agent.is_some()) {
        agents += 1;
        if t.get(&s.id).is_some_and(|e| match e.state {
            perf::AgentState::Up => e.sample.is_some(),
            perf::AgentState::Down => true,
            perf::AgentState::Connecting => false,
        }) {
            answered += 1;
        }
    }
    (answered, agents)
}

/// Waits (bounded by the agent timeout + 1 s) until every server's agent has
/// answered or failed once. A balancer (re)started under load would
/// otherwise refuse the first new calls for lack of data; meanwhile the
/// sockets are bound and the kernel holds datagrams and connections.
async fn wait_for_first_data(cfg: &Config, table: &SharedTable) {
    let start = Instant::now();
    let limit = cfg.poll.timeout + Duration::from_secs(1);
    loop {
        let (answered, agents) = agents_answered(cfg, &table.load());
        if answered == agents {
            info!(
                after_ms = start.elapsed().as_millis() as u64,
                "agents answered: serving SIP"
            );
            return;
        }
        if start.elapsed() >= limit {
            warn!(
                after_ms = limit.as_millis() as u64,
                "not every agent answered: serving SIP anyway"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How often a UDP thread blocked in `recv_from` looks whether the
/// balancer stopped, should the shutdown that wakes it not (backstop).
const UDP_STOP_CHECK: Duration = Duration::from_millis(250);

/// One UDP socket's receive loop, on a thread of its own: it blocks in
/// `recv_from`, hands the datagram to the core and sends what the core
/// asks, as a datagram relay would. Measured against a task per socket on
/// tokio's reactor (an `epoll_wait`, a wake-up and often another thread's
/// futex per datagram): docs/benchmarks.md, "Runtime shape".
fn udp_thread(
    net: &Net,
    socket: &std::net::UdpSocket,
    index: usize,
    local: SocketAddr,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut out = Outbox::new();
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            // The balancer stops: woken by an empty datagram (UdpThreads).
            Ok((0, _)) if stop.load(Ordering::Relaxed) => return,
            Ok((n, peer)) => {
                if let Some(c) = &net.capture {
                    c.record(peer, local, Proto::Udp, &buf[..n]);
                }
                net.handle_now(&buf[..n], Origin::Udp { peer }, Some(index), &mut out);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => debug!(error = %e, "udp receive error"),
        }
    }
}

async fn accept_loop(net: Arc<Net>, l: TcpListener, kind: Transport) {
    loop {
        match l.accept().await {
            Ok((s, peer)) => match net.admit(peer.ip()) {
                Ok(guard) => {
                    let _ = s.set_nodelay(true);
                    let net = net.clone();
                    let ends = Ends {
                        peer,
                        local: s.local_addr().unwrap_or(unspecified(peer)),
                    };
                    match kind {
                        Transport::Tls | Transport::Wss => {
                            tokio::spawn(tls_conn(net, s, ends, guard, kind));
                        }
                        Transport::Ws => {
                            tokio::spawn(ws::ws_conn(net, s, ends, guard, kind));
                        }
                        Transport::Tcp | Transport::Udp => {
                            tokio::spawn(stream_conn(net, s, ends, guard, Transport::Tcp));
                        }
                    }
                }
                Err(why) => {
                    // Refused: closed at once, everyone else served.
                    net.router.stats.conn_event(why);
                    debug!(%peer, ?why, "tcp connection refused");
                    drop(s);
                }
            },
            Err(e) => {
                warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The TLS handshake of an admitted connection (bounded by
/// `sip.message_timeout`, like a message head), then the connection.
async fn tls_conn(net: Arc<Net>, s: TcpStream, ends: Ends, admitted: Admitted, kind: Transport) {
    let peer = ends.peer;
    let Some(tls) = net.tls.clone() else { return };
    let limit = net.router.config().message_timeout;
    match tokio::time::timeout(limit, tls.acceptor().accept(s)).await {
        Ok(Ok(stream)) => {
            debug!(%peer, "tls handshake done");
            if kind == Transport::Wss {
                ws::ws_conn(net, stream, ends, admitted, kind).await;
            } else {
                stream_conn(net, stream, ends, admitted, Transport::Tls).await;
            }
        }
        Ok(Err(e)) => {
            net.router
                .stats
                .conn_event(crate::stats::ConnEvent::TlsFailed);
            debug!(%peer, error = %e, "tls handshake failed");
        }
        Err(_) => {
            net.router
                .stats
                .conn_event(crate::stats::ConnEvent::ClosedSlow);
            debug!(%peer, "tls handshake not done in time");
        }
    }
}

/// The two ends of a connection: the other's address and ours (what the
/// capture says a message came from and went to).
#[derive(Debug, Clone, Copy)]
struct Ends {
    peer: SocketAddr,
    local: SocketAddr,
}

/// The wildcard address of `like`'s family: our end when the socket cannot
/// say.
fn unspecified(like: SocketAddr) -> SocketAddr {
    let ip: std::net::IpAddr = if like.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    SocketAddr::new(ip, 0)
}

/// An admitted inbound connection: counted until it is dropped.
struct Admitted {
    net: std::sync::Weak<Net>,
    ip: std::net::IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(net) = self.net.upgrade() {
            net.router.stats.connections.fetch_sub(1, Ordering::Relaxed);
            let mut m = net
                .per_source
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.ip);
                }
            }
        }
    }
}

impl Net {
    /// Admits an inbound connection from `ip` under `sip.max_connections`
    /// and `sip.max_connections_per_source`.
    fn admit(&self, ip: std::net::IpAddr) -> Result<Admitted, crate::stats::ConnEvent> {
        let cfg = self.router.config();
        let mut m = self
            .per_source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = self.router.stats.connections.load(Ordering::Relaxed);
        if open >= cfg.max_connections as u64 {
            return Err(crate::stats::ConnEvent::RefusedTotal);
        }
        let n = m.entry(ip).or_insert(0);
        if *n >= cfg.max_connections_per_source {
            return Err(crate::stats::ConnEvent::RefusedPerSource);
        }
        *n += 1;
        self.router
            .stats
            .connections
            .fetch_add(1, Ordering::Relaxed);
        Ok(Admitted { net: self.me(), ip })
    }
}

/// Our connection to a server: writes what is queued for it, hands what it
/// sends to the core, until either side ends.
async fn serve_outbound<S>(
    net: std::sync::Weak<Net>,
    stream: S,
    origin: Origin,
    local: SocketAddr,
    mut rx: mpsc::Receiver<Bytes>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (r, mut w) = tokio::io::split(stream);
    let ends = Ends {
        peer: origin.peer(),
        local,
    };
    let capture = net.upgrade().and_then(|n| n.capture.clone());
    let reader = net
        .upgrade()
        .map(|n| tokio::spawn(read_stream(n, r, origin, local)));
    while let Some(b) = rx.recv().await {
        if w.write_all(&b).await.is_err() {
            break;
        }
        if let Some(c) = &capture {
            c.record_bytes(ends.local, ends.peer, Proto::Tcp, &b);
        }
    }
    if let Some(r) = reader {
        r.abort();
    }
    if let (Some(n), Origin::Conn { conn, .. }) = (net.upgrade(), origin) {
        n.conns.pin().remove(&conn);
    }
}

/// Serves one inbound stream connection (TCP, or TLS after its handshake):
/// a flow of the core's (RFC 5626) while it is open.
async fn stream_conn<S>(
    net: Arc<Net>,
    stream: S,
    ends: Ends,
    admitted: Admitted,
    transport: Transport,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let peer = ends.peer;
    let capture = net.capture.clone();
    let id = net.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Bytes>(CONN_QUEUE);
    net.conns.pin().insert(id, tx);
    net.router.conn_opened(id, peer, transport);
    let (r, mut w) = tokio::io::split(stream);
    let (closing, mut closed) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(b) => {
                        if w.write_all(&b).await.is_err() {
                            return;
                        }
                        if let Some(c) = &capture {
                            c.record_bytes(ends.local, ends.peer, Proto::Tcp, &b);
                        }
                    }
                    None => return,
                },
                _ = &mut closed => {
                    // The reader is done: flush what is queued (e.g. our
                    // 400/513 before the close), then close. (The registry's
                    // sender may outlive its removal a while: the map frees
                    // entries lazily, so its drop cannot be the signal.)
                    while let Ok(b) = rx.try_recv() {
                        if w.write_all(&b).await.is_err() {
                            return;
                        }
                        if let Some(c) = &capture {
                            c.record_bytes(ends.local, ends.peer, Proto::Tcp, &b);
                        }
                    }
                    let _ = w.shutdown().await;
                    return;
                }
            }
        }
    });
    let origin = Origin::Conn {
        peer,
        conn: id,
        inbound: true,
    };
    read_stream(net.clone(), r, origin, ends.local).await;
    debug!(%peer, conn = id, "connection closed");
    net.router.conn_closed(id);
    net.conns.pin().remove(&id);
    let _ = closing.send(());
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(1), writer)
        .await
        .is_err()
    {
        debug!(%peer, "stream writer did not finish in time");
        abort.abort();
    }
    drop(admitted);
}

/// Reads framed messages from a stream (`local`: our end) and hands them
/// to the core.
async fn read_stream<R: tokio::io::AsyncRead + Unpin>(
    net: Arc<Net>,
    mut r: R,
    origin: Origin,
    local: SocketAddr,
) {
    let max = net.router.config().max_message_size;
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut out = Outbox::new();
    let mut chunk = vec![0u8; 16 * 1024];
    // Remembers how far the message at the front was read: each byte is
    // looked at once however slowly it arrives.
    let mut framer = sip::Framer::default();
    // When the first byte of the (incomplete) message at the front came.
    let mut message_started: Option<Instant> = None;
    // CR/LF bytes since the last message: a CRLFCRLF ping gets a CRLF pong
    // (RFC 5626 §4.4.1), however the bytes were split.
    let mut crlf = 0usize;
    loop {
        // Hand over every whole message already buffered.
        let mut consumed = 0;
        loop {
            match framer.check(&buf[consumed..], max) {
                Ok(sip::Frame::Message(n)) => {
                    crlf = 0;
                    if let Some(c) = &net.capture {
                        let msg = &buf[consumed..consumed + n];
                        c.record(origin.peer(), local, Proto::Tcp, msg);
                    }
                    net.handle(&buf[consumed..consumed + n], origin, &mut out)
                        .await;
                    consumed += n;
                }
                Ok(sip::Frame::KeepAlive(n)) => {
                    consumed += n;
                    crlf += n;
                    if crlf >= 4 {
                        crlf = 0;
                        if let Origin::Conn { inbound: true, .. } = origin {
                            out.send(origin.reply_dest(), b"\r\n");
                            net.perform(&mut out).await;
                        }
                    }
                }
                Ok(sip::Frame::Incomplete) => break,
                Err(e) => {
                    debug!(error = %e, ?origin, "stream framing error; closing");
                    let answer = e.status() == 513 || matches!(e, sip::Error::StreamWithoutLength);
                    if answer
                        && let Some(resp) = sip::reply::error_response(
                            &buf[consumed..],
                            e.status(),
                            &format!("Bad Request ({e})"),
                        )
                    {
                        net.router.stats.refusal(e.status());
                        out.send(origin.reply_dest(), &resp);
                        net.perform(&mut out).await;
                    }
                    return;
                }
            }
        }
        buf.drain(..consumed);
        if consumed > 0 || buf.is_empty() {
            message_started = None;
        }
        if !buf.is_empty() && message_started.is_none() {
            message_started = Some(Instant::now());
        }
        // Our connections to servers are ours to keep; a user agent's
        // connection must keep sending (CRLF keep-alives count), and finish
        // each message it starts in time.
        let read = r.read(&mut chunk);
        let n = if let Origin::Conn { inbound: true, .. } = origin {
            let cfg = net.router.config();
            let (limit, why) = match message_started {
                Some(t) => (
                    cfg.message_timeout.saturating_sub(t.elapsed()),
                    crate::stats::ConnEvent::ClosedSlow,
                ),
                None => (cfg.idle_timeout, crate::stats::ConnEvent::ClosedIdle),
            };
            match tokio::time::timeout(limit, read).await {
                Ok(r) => r,
                Err(_) => {
                    net.router.stats.conn_event(why);
                    debug!(?origin, ?why, "closing a tcp connection");
                    return;
                }
            }
        } else {
            read.await
        };
        let n = match n {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// How late a timer may fire so that the timer task wakes at most once per
/// this long (each wake-up is a context switch; the core's timers are RFC
/// 3261 timers of 100 ms and more, or its own delayed `100 Trying`): 5 ms.
const TIMER_SLACK: Duration = Duration::from_millis(5);

/// While the threads that handle messages fire the timers (one did within
/// the last [`TIMER_SLACK`]), the timer task only backs them up: it looks
/// this often, the latest a timer then fires if the traffic stops at once.
const TIMER_BACKSTOP: Duration = Duration::from_millis(25);

/// Timers a thread fires after one message at most (bounds the delay the
/// message's thread adds before its next receive; the rest go with the
/// next message or the timer task).
const TIMERS_PER_MESSAGE: usize = 16;

/// Every timer the core asks for, in one heap shared by the threads that
/// arm them and fire them. Arming a timer wakes the timer task only when it
/// is due before the task's next wake-up (rare: most timers are later than
/// one already pending), not once per message. The threads that handle
/// messages fire what is due after each message ([`Net::fire_due`]): under
/// load nearly every timer goes off there, on time, and the timer task
/// wakes every [`TIMER_BACKSTOP`] instead of every [`TIMER_SLACK`].
struct Timers {
    heap: Mutex<TimerHeap>,
    wake: tokio::sync::Notify,
    /// The start of the clock of `earliest` and `fired`.
    base: Instant,
    /// When the first timer is due (ns from `base`; `u64::MAX`: none): a
    /// message's thread sees without the lock whether one is.
    earliest: AtomicU64,
    /// When a message's thread last fired timers (ns from `base`).
    fired: AtomicU64,
}

impl Default for Timers {
    fn default() -> Timers {
        Timers {
            heap: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            base: Instant::now(),
            earliest: AtomicU64::new(u64::MAX),
            fired: AtomicU64::new(0),
        }
    }
}

#[derive(Default)]
struct TimerHeap {
    heap: BinaryHeap<Reverse<(Instant, TimerKey)>>,
    /// When the timer task will next look (None: it waits for a timer).
    next_wake: Option<Instant>,
}

impl Timers {
    fn ns(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Publishes the heap's first timer to `earliest` (under the lock).
    fn publish(&self, h: &TimerHeap) {
        let first = h
            .heap
            .peek()
            .map_or(u64::MAX, |Reverse((at, _))| self.ns(*at));
        self.earliest.store(first, Ordering::Release);
    }

    fn arm(&self, timers: &[(Instant, TimerKey)]) {
        if timers.is_empty() {
            return;
        }
        let mut h = self
            .heap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut sooner = false;
        for &(at, key) in timers {
            h.heap.push(Reverse((at, key)));
            sooner |= h.next_wake.is_none_or(|w| at < w);
        }
        self.publish(&h);
        if sooner {
            // Wake it now; it recomputes its next wake-up.
            h.next_wake = Some(Instant::now());
            drop(h);
            self.wake.notify_one();
        }
    }

    /// Whether a timer is due at `now` (no lock).
    fn any_due(&self, now: Instant) -> bool {
        self.earliest.load(Ordering::Acquire) <= self.ns(now)
    }

    /// Pops the timers due at `now`, as many as `due` holds inline, for a
    /// message's thread to fire.
    fn take_due(&self, now: Instant, due: &mut SmallVec<[TimerKey; TIMERS_PER_MESSAGE]>) {
        let mut h = self
            .heap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while due.len() < TIMERS_PER_MESSAGE {
            match h.heap.peek() {
                Some(&Reverse((at, key))) if at <= now => {
                    h.heap.pop();
                    due.push(key);
                }
                _ => break,
            }
        }
        self.publish(&h);
        drop(h);
        if !due.is_empty() {
            self.fired.store(self.ns(now), Ordering::Relaxed);
        }
    }

    /// Pops every timer due at `now` into `due`; returns when the timer
    /// task looks next: at the next timer, but not sooner than
    /// [`TIMER_SLACK`] from now, or [`TIMER_BACKSTOP`] while the threads
    /// that handle messages fire the timers.
    fn due(&self, now: Instant, due: &mut Vec<TimerKey>) -> Option<Instant> {
        let mut h = self
            .heap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(&Reverse((at, key))) = h.heap.peek() {
            if at > now {
                break;
            }
            h.heap.pop();
            due.push(key);
        }
        self.publish(&h);
        let fired = self.fired.load(Ordering::Relaxed);
        let slack = if self.ns(now).saturating_sub(fired) < TIMER_SLACK.as_nanos() as u64 {
            TIMER_BACKSTOP
        } else {
            TIMER_SLACK
        };
        let next = h.heap.peek().map(|Reverse((at, _))| (*at).max(now + slack));
        h.next_wake = next;
        next
    }
}

/// Fires the core's timers that the threads handling messages have not
/// (see [`Timers`]).
async fn timer_task(net: Arc<Net>) {
    let mut out = Outbox::new();
    let mut due = Vec::new();
    loop {
        let next = net.timers.due(Instant::now(), &mut due);
        for key in due.drain(..) {
            net.with_rng(|rng| net.router.on_timer(key, self::now(), rng, &mut out));
            net.perform(&mut out).await;
        }
        match next {
            Some(at) => {
                tokio::select! {
                    () = net.timers.wake.notified() => {}
                    () = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                }
            }
            None => net.timers.wake.notified().await,
        }
    }
}

/// The core's housekeeping tick, every 100 ms.
async fn tick_task(net: Arc<Net>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = Outbox::new();
    loop {
        tick.tick().await;
        net.with_rng(|rng| net.router.tick(now(), rng, &mut out));
        net.perform(&mut out).await;
    }
}

/// Sends datagrams to host names: from the cache, else after a lookup in a
/// task of its own (bounded in number and time).
async fn resolver_task(net: Arc<Net>, mut rx: mpsc::Receiver<(Box<str>, u16, Bytes)>) {
    type Cache = Mutex<HashMap<(Box<str>, u16), (Option<SocketAddr>, Instant)>>;
    let cache: Arc<Cache> = Arc::default();
    let lookups = Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS));
    while let Some((host, port, bytes)) = rx.recv().await {
        let hit = cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&(host.clone(), port))
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(a, _)| *a);
        match hit {
            Some(Some(a)) => {
                net.send_udp(&bytes, a);
            }
            Some(None) => net.router.stats.drop(DropReason::NoRoute),
            None => {
                let Ok(permit) = lookups.clone().try_acquire_owned() else {
                    net.router.stats.drop(DropReason::NoRoute);
                    continue;
                };
                let (net, cache) = (net.clone(), cache.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let found = tokio::time::timeout(
                        Duration::from_secs(2),
                        tokio::net::lookup_host((&*host, port)),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .and_then(|mut it| it.next());
                    let until = Instant::now()
                        + if found.is_some() {
                            RESOLVED_FOR
                        } else {
                            UNRESOLVED_FOR
                        };
                    cache
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert((host, port), (found, until));
                    match found {
                        Some(a) => {
                            net.send_udp(&bytes, a);
                        }
                        None => net.router.stats.drop(DropReason::NoRoute),
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(txn: u64) -> TimerKey {
        TimerKey::Trying { txn }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn message_threads_take_what_is_due_in_order_and_bounded() {
        let t = Timers::default();
        let t0 = t.base;
        assert!(!t.any_due(t0 + ms(1000)), "nothing armed");
        let armed: Vec<_> = (0..20u64)
            .map(|i| (t0 + ms(10 + i), key(i)))
            .chain([(t0 + ms(500), key(99))])
            .collect();
        t.arm(&armed);
        assert!(!t.any_due(t0 + ms(9)));
        assert!(t.any_due(t0 + ms(10)));
        let mut due = SmallVec::new();
        t.take_due(t0 + ms(100), &mut due);
        assert_eq!(due.as_slice(), &(0..16).map(key).collect::<Vec<_>>()[..]);
        // The rest is still due, for the next message or the timer task.
        assert!(t.any_due(t0 + ms(100)));
        let mut rest = Vec::new();
        let next = t.due(t0 + ms(100), &mut rest);
        assert_eq!(rest, (16..20).map(key).collect::<Vec<_>>());
        assert_eq!(next, Some(t0 + ms(500)));
        assert!(!t.any_due(t0 + ms(499)));
        assert!(t.any_due(t0 + ms(500)));
        let mut last = SmallVec::new();
        t.take_due(t0 + ms(600), &mut last);
        assert_eq!(last.as_slice(), &[key(99)]);
        assert!(!t.any_due(t0 + ms(1_000_000)), "heap empty again");
    }

    #[test]
    fn the_timer_task_backs_up_while_message_threads_fire() {
        let t = Timers::default();
        let t0 = t.base + ms(1000);
        t.arm(&[(t0, key(1)), (t0 + ms(1), key(2))]);
        // Idle: the task looks again after TIMER_SLACK at the latest.
        let mut due = Vec::new();
        assert_eq!(t.due(t0 - ms(10), &mut due), Some(t0));
        assert!(due.is_empty());
        // A message's thread has just fired one: the task backs up only.
        let mut fired = SmallVec::new();
        t.take_due(t0, &mut fired);
        assert_eq!(fired.as_slice(), &[key(1)]);
        assert_eq!(t.due(t0, &mut due), Some(t0 + TIMER_BACKSTOP));
        // Traffic stopped: the task is back to TIMER_SLACK.
        let later = t0 + TIMER_SLACK;
        t.arm(&[(later + ms(1), key(3))]);
        assert_eq!(t.due(later, &mut due), Some(later + TIMER_SLACK));
        assert_eq!(due, vec![key(2)]);
    }
}
