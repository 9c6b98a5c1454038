//! Counters for `/metrics` and `/servers`: atomics, no lock.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};

use sip::Method;

/// Methods counted by name; the rest as `other`.
pub const METHODS: [&str; 15] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "REGISTER",
    "OPTIONS",
    "SUBSCRIBE",
    "NOTIFY",
    "REFER",
    "INFO",
    "UPDATE",
    "PRACK",
    "MESSAGE",
    "PUBLISH",
    "other",
];

/// Index of a method in [`METHODS`].
#[must_use]
pub fn method_index(m: Method<'_>) -> usize {
    match m {
        Method::Invite => 0,
        Method::Ack => 1,
        Method::Bye => 2,
        Method::Cancel => 3,
        Method::Register => 4,
        Method::Options => 5,
        Method::Subscribe => 6,
        Method::Notify => 7,
        Method::Refer => 8,
        Method::Info => 9,
        Method::Update => 10,
        Method::Prack => 11,
        Method::Message => 12,
        Method::Publish => 13,
        Method::Other(_) => 14,
    }
}

/// Why a message was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not SIP, or a request too broken to answer.
    Unparseable,
    /// A response whose top Via is not ours.
    ViaNotOurs,
    /// A response with nowhere to go (no next Via, connection gone).
    NoRoute,
    /// New session, no server, `on_no_server = "drop"`.
    NoServer,
    /// An ACK for a session we do not know.
    StrayAck,
    /// A send failed.
    SendFailed,
    /// A response dropped by the REGISTER merge (provisional or late).
    Merged,
    /// Session table full (the request was still routed).
    SessionTableFull,
    /// A response whose top Via is ours but whose branch MAC does not verify
    /// over the hop it would be relayed to: forged or edited.
    Forged,
    /// A request over its source's limit (`[limits]`), dropped (or answered
    /// 503: then counted as a local response).
    RateLimited,
    /// A request with credentials from a source that has spent its budget
    /// of failed authentications (`limits.auth_failure_*`), dropped (or
    /// answered 503: then counted as a local response too).
    AuthFailures,
    /// A new transaction refused (503) because `routing.max_transactions`
    /// are held.
    TransactionTableFull,
    /// A response that ends here by design: a server's `100 Trying` (hop by
    /// hop), the answer to a CANCEL we answered ourselves, late answers of
    /// an attempt given up, answers to our own ACK/BYE.
    Absorbed,
}

/// All drop reasons, with their metric labels.
pub const DROPS: [(DropReason, &str); 13] = [
    (DropReason::Unparseable, "unparseable"),
    (DropReason::ViaNotOurs, "via_not_ours"),
    (DropReason::NoRoute, "no_route"),
    (DropReason::NoServer, "no_server"),
    (DropReason::StrayAck, "stray_ack"),
    (DropReason::SendFailed, "send_failed"),
    (DropReason::Merged, "merged"),
    (DropReason::SessionTableFull, "session_table_full"),
    (DropReason::Absorbed, "absorbed"),
    (DropReason::Forged, "forged_response"),
    (DropReason::RateLimited, "rate_limited"),
    (DropReason::AuthFailures, "auth_failures"),
    (DropReason::TransactionTableFull, "transaction_table_full"),
];

/// The per-source request limits (`[limits]` token buckets by kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limits.new_session_*`: INVITE, SUBSCRIBE, REFER without a To tag.
    NewSession,
    /// `limits.register_*`.
    Register,
    /// `limits.request_*`: other requests without a To tag.
    Request,
}

/// The limits with their metric labels.
pub const LIMITS: [(Limit, &str); 3] = [
    (Limit::NewSession, "new_session"),
    (Limit::Register, "register"),
    (Limit::Request, "request"),
];

/// Why an inbound connection was refused or closed by us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEvent {
    /// Refused: `sip.max_connections` reached.
    RefusedTotal,
    /// Refused: `sip.max_connections_per_source` reached for its address.
    RefusedPerSource,
    /// Closed: nothing received for `sip.idle_timeout`.
    ClosedIdle,
    /// Closed: a message (or a TLS handshake) not whole within
    /// `sip.message_timeout`.
    ClosedSlow,
    /// Closed: the TLS handshake failed.
    TlsFailed,
    /// Closed: the WebSocket upgrade was refused (path, Origin, no `sip`
    /// subprotocol) or failed.
    WsRefused,
}

/// Connection events with their metric names and labels.
pub const CONN_EVENTS: [(ConnEvent, &str, &str); 6] = [
    (ConnEvent::RefusedTotal, "refused", "max_connections"),
    (
        ConnEvent::RefusedPerSource,
        "refused",
        "max_connections_per_source",
    ),
    (ConnEvent::ClosedIdle, "closed", "idle_timeout"),
    (ConnEvent::ClosedSlow, "closed", "message_timeout"),
    (ConnEvent::TlsFailed, "closed", "tls_handshake"),
    (ConnEvent::WsRefused, "closed", "websocket_upgrade"),
];

/// Balancer-wide counters.
#[derive(Debug)]
pub struct Stats {
    /// Inbound stream connections open now.
    pub connections: AtomicU64,
    /// Requests to UDP servers sent over TCP for their size (`sip.udp_mtu`).
    pub udp_to_tcp: AtomicU64,
    /// Datagrams to phones sent from this instance's own address because
    /// the pool's address (a virtual IP) had left this host.
    pub udp_source_fallback: AtomicU64,
    /// Entries of finished transactions (kept only to absorb
    /// retransmissions) ended before their time to make room for a new
    /// transaction (`routing.max_transactions`).
    pub txn_ended_early: AtomicU64,
    /// Requests for a flow another instance of the pool holds answered 430
    /// at once, with no way to it: its owner not among `pool.peers`, or the
    /// request came from a peer already (no second instance-to-instance hop).
    pub flow_elsewhere: AtomicU64,
    /// Requests for a flow a peer holds, forwarded to it (`pool.peers`).
    pub flow_forwarded: AtomicU64,
    /// Requests for a flow a peer holds answered 430 because the peer is
    /// down: known down (its probes), or silent on a forwarded request for
    /// `pool.peer_timeout`.
    pub flow_owner_down: AtomicU64,
    conn_events: [AtomicU64; CONN_EVENTS.len()],
    requests: [AtomicU64; METHODS.len()],
    responses: Box<[AtomicU64]>,
    drops: [AtomicU64; DROPS.len()],
    limited: [AtomicU64; LIMITS.len()],
    /// Responses we generated ourselves, by code.
    refusals: Box<[AtomicU64]>,
    /// HEP capture (`[capture]`): sent and dropped, shared with its thread.
    pub capture: std::sync::Arc<crate::capture::CaptureStats>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            connections: AtomicU64::new(0),
            udp_to_tcp: AtomicU64::new(0),
            udp_source_fallback: AtomicU64::new(0),
            txn_ended_early: AtomicU64::new(0),
            flow_elsewhere: AtomicU64::new(0),
            flow_forwarded: AtomicU64::new(0),
            flow_owner_down: AtomicU64::new(0),
            conn_events: std::array::from_fn(|_| AtomicU64::new(0)),
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            responses: (0..600).map(|_| AtomicU64::new(0)).collect(),
            drops: std::array::from_fn(|_| AtomicU64::new(0)),
            limited: std::array::from_fn(|_| AtomicU64::new(0)),
            refusals: (0..600).map(|_| AtomicU64::new(0)).collect(),
            capture: std::sync::Arc::default(),
        }
    }
}

impl Stats {
    /// Counts a request received.
    pub fn request(&self, m: Method<'_>) {
        self.requests[method_index(m)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a response relayed.
    pub fn response(&self, code: u16) {
        if let Some(c) = self.responses.get(usize::from(code).wrapping_sub(100)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a response we made.
    pub fn refusal(&self, code: u16) {
        if let Some(c) = self.refusals.get(usize::from(code).wrapping_sub(100)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection refused or closed by us.
    pub fn conn_event(&self, e: ConnEvent) {
        if let Some(i) = CONN_EVENTS.iter().position(|(x, _, _)| *x == e) {
            self.conn_events[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(kind, reason, count)` of connection events: kind `refused` or `closed`.
    pub fn conn_events(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        CONN_EVENTS
            .iter()
            .zip(&self.conn_events)
            .map(|((_, k, r), c)| (*k, *r, c.load(Ordering::Relaxed)))
    }

    /// Counts a drop.
    pub fn drop(&self, d: DropReason) {
        if let Some(i) = DROPS.iter().position(|(x, _)| *x == d) {
            self.drops[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a request over a per-source limit (also counted as the drop
    /// `rate_limited`).
    pub fn limited(&self, l: Limit) {
        if let Some(i) = LIMITS.iter().position(|(x, _)| *x == l) {
            self.limited[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `(limit, count)` of requests over each per-source limit.
    pub fn limited_counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        LIMITS
            .iter()
            .zip(&self.limited)
            .map(|((_, l), c)| (*l, c.load(Ordering::Relaxed)))
    }

    /// `(method, count)` for every method counted.
    pub fn requests(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        METHODS
            .iter()
            .zip(&self.requests)
            .map(|(m, c)| (*m, c.load(Ordering::Relaxed)))
    }

    /// `(code, count)` of relayed responses, non-zero only.
    pub fn responses(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        nonzero(&self.responses)
    }

    /// `(code, count)` of our own responses, non-zero only.
    pub fn refusals(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        nonzero(&self.refusals)
    }

    /// `(reason, count)` of drops.
    pub fn drops(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DROPS
            .iter()
            .zip(&self.drops)
            .map(|((_, l), c)| (*l, c.load(Ordering::Relaxed)))
    }

    /// Count of one drop reason.
    #[must_use]
    pub fn drops_of(&self, d: DropReason) -> u64 {
        DROPS
            .iter()
            .position(|(x, _)| *x == d)
            .map_or(0, |i| self.drops[i].load(Ordering::Relaxed))
    }
}

fn nonzero(a: &[AtomicU64]) -> impl Iterator<Item = (u16, u64)> + '_ {
    a.iter().enumerate().filter_map(|(i, c)| {
        let n = c.load(Ordering::Relaxed);
        (n > 0).then_some((i as u16 + 100, n))
    })
}

/// Upper bounds of the latency histograms' buckets, microseconds: 5 ms to
/// 32 s (64 × T1, when a transaction times out), about doubling.
pub const LATENCY_BOUNDS_US: [u64; 14] = [
    5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_000_000, 4_000_000,
    8_000_000, 16_000_000, 32_000_000, 64_000_000,
];

/// A latency histogram: a count per bucket (not cumulative), the total
/// count and the sum, atomics only (no lock, no allocation to observe).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = LATENCY_BOUNDS_US.iter().position(|b| us <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// `(upper bound in seconds, cumulative count)` of each bucket, then
    /// the total count and the sum in seconds (Prometheus' `le`, `_count`
    /// and `_sum`; the `+Inf` bucket is the count).
    #[must_use]
    pub fn snapshot(&self) -> ([(f64, u64); LATENCY_BOUNDS_US.len()], u64, f64) {
        // Count first: a concurrent observation then never makes a bucket
        // exceed the count.
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let mut acc = 0u64;
        let buckets = std::array::from_fn(|i| {
            acc += self.buckets[i].load(Ordering::Relaxed);
            (LATENCY_BOUNDS_US[i] as f64 / 1e6, acc.min(count))
        });
        (buckets, count, sum)
    }
}

/// Per-server counters and operator state; kept across reloads (keyed by id).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// New sessions sent to the server by selection.
    pub selected: AtomicU64,
    /// Requests forwarded to it.
    pub forwarded: AtomicU64,
    /// Attempts of client transactions and fork legs sent to it and not yet
    /// answered with a final response (owned by the transactions: each
    /// increments it once and decrements it once).
    pub outstanding: AtomicI64,
    /// Taken out by an operator.
    pub drained: AtomicBool,
    /// New sessions moved to another server after this one failed them.
    pub failovers: AtomicU64,
    /// New INVITEs it left unanswered past `failover_timeout` with no other
    /// server to take them: kept waiting (`last_attempt_timeout`).
    pub last_waits: AtomicU64,
    /// The OPTIONS probe says down.
    pub probe_down: AtomicBool,
    /// Sequence number of the last probe sent, and of the last one answered.
    pub probe_sent: AtomicU64,
    /// Sequence number of the last probe answered.
    pub probe_answered: AtomicU64,
    /// Consecutive probe results of the same kind (failures while up, successes while down).
    pub probe_streak: AtomicU64,
    /// Failure record of new-session attempts (outlier detection).
    pub tracker: std::sync::Mutex<crate::outlier::Tracker>,
    /// Ejected until this time (balancer clock, ms); 0: never ejected.
    pub ejected_until: AtomicU64,
    /// Failure ratio over the window, per mille (claim 9 input).
    pub failure_permille: AtomicU32,
    /// Out of new-session selection until this time (balancer clock, ms)
    /// because it answered `503` with `Retry-After`; 0: never.
    pub overloaded_until: AtomicU64,
    /// Overload periods so far (a `503` with `Retry-After` while not overloaded).
    pub overloads: AtomicU64,
    /// Slow start began at this time (balancer clock, ms) + 1; 0: none.
    pub ramp_from: AtomicU64,
    /// Up at the last health round.
    pub available: AtomicBool,
    /// Up at some health round before.
    pub ever_available: AtomicBool,
    /// Agent sample the in-flight count is anchored to (its `seq`; 0: none).
    pub anchor_seq: AtomicU64,
    /// `selected` at the end of that sample's window.
    pub anchor_selected: AtomicU64,
    /// Learned capacity, sessions/s, as f64 bits; 0: not learned.
    pub capacity_learned: AtomicU64,
    /// What the health round keeps to anchor counts and learn capacity.
    pub history: std::sync::Mutex<History>,
    /// A new session's INVITE sent to the server until its first response
    /// (a `100 Trying` usually), per attempt.
    pub invite_first_response: Histogram,
    /// A new session's INVITE sent to the server until its final response.
    pub invite_final_response: Histogram,
}

/// `(wall ms, selected)` snapshots of the last seconds, and the capacity estimate.
#[derive(Debug, Default)]
pub struct History {
    /// Snapshots, oldest first.
    pub ring: std::collections::VecDeque<(u64, u64)>,
    /// Capacity learned from the agent's windows.
    pub capacity: crate::policy::CapacityEstimate,
}

impl History {
    /// Snapshots kept (every 100 ms: 10 s).
    pub const LEN: usize = 100;

    /// `selected` at wall time `t`: the last snapshot at or before it (the
    /// first one when all are later).
    #[must_use]
    pub fn selected_at(&self, t: u64) -> Option<u64> {
        self.ring
            .iter()
            .rev()
            .find(|(w, _)| *w <= t)
            .or_else(|| self.ring.front())
            .map(|&(_, n)| n)
    }
}

impl ServerStats {
    /// Outstanding transactions, never negative.
    #[must_use]
    pub fn outstanding(&self) -> u32 {
        self.outstanding.load(Ordering::Relaxed).max(0) as u32
    }

    /// Ejected at `now_ms` (balancer clock).
    #[must_use]
    pub fn ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Overloaded (its own `503` with `Retry-After`) at `now_ms`.
    #[must_use]
    pub fn overloaded(&self, now_ms: u64) -> bool {
        now_ms < self.overloaded_until.load(Ordering::Relaxed)
    }

    /// Learned capacity, if any.
    #[must_use]
    pub fn capacity_learned(&self) -> Option<f64> {
        let v = f64::from_bits(self.capacity_learned.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }

    /// Start of the current slow start, if any.
    #[must_use]
    pub fn ramp_from(&self) -> Option<u64> {
        self.ramp_from.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Start of the slow start in force at `now_ms`: the later of the one
    /// the health round started and the end of the last overload period
    /// (known to the millisecond, while the health round sees a comeback
    /// only at its next 100 ms turn).
    #[must_use]
    pub fn ramp_start(&self, now_ms: u64) -> Option<u64> {
        let overload_end =
            Some(self.overloaded_until.load(Ordering::Relaxed)).filter(|&u| u > 0 && u <= now_ms);
        self.ramp_from().max(overload_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_at_reads_the_last_snapshot_at_or_before() {
        let mut h = History::default();
        assert_eq!(h.selected_at(5), None);
        h.ring.extend([(1000, 10), (1100, 15), (1200, 30)]);
        assert_eq!(h.selected_at(1150), Some(15));
        assert_eq!(h.selected_at(1200), Some(30));
        assert_eq!(h.selected_at(5000), Some(30));
        // Older than every snapshot: the oldest (the count can only be lower).
        assert_eq!(h.selected_at(10), Some(10));
    }

    #[test]
    fn counters_and_drops() {
        let s = Stats::default();
        s.request(Method::Invite);
        s.response(200);
        s.response(700);
        s.drop(DropReason::StrayAck);
        assert_eq!(s.requests().next(), Some(("INVITE", 1)));
        assert_eq!(s.responses().collect::<Vec<_>>(), [(200, 1)]);
        assert_eq!(s.drops_of(DropReason::StrayAck), 1);
        let st = ServerStats::default();
        st.outstanding.store(-3, Ordering::Relaxed);
        assert_eq!(st.outstanding(), 0);
        assert_eq!(st.capacity_learned(), None);
        st.capacity_learned
            .store(250.0f64.to_bits(), Ordering::Relaxed);
        assert_eq!(st.capacity_learned(), Some(250.0));
        assert_eq!(st.ramp_from(), None);
        st.ramp_from.store(11, Ordering::Relaxed);
        assert_eq!(st.ramp_from(), Some(10));
        // An overload period's end starts a ramp too, once it is over.
        assert_eq!(st.ramp_start(50), Some(10));
        st.overloaded_until.store(40, Ordering::Relaxed);
        assert_eq!(st.ramp_start(39), Some(10));
        assert_eq!(st.ramp_start(50), Some(40));
        st.ramp_from.store(61, Ordering::Relaxed);
        assert_eq!(st.ramp_start(70), Some(60));
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_the_bound_inclusive() {
        use std::time::Duration;
        let h = Histogram::default();
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_micros(5_001));
        h.observe(Duration::from_secs(20));
        h.observe(Duration::from_secs(100));
        let (b, count, sum) = h.snapshot();
        assert_eq!(b[0], (0.005, 1));
        assert_eq!(b[1], (0.01, 2));
        assert_eq!(b[11], (16.0, 2));
        assert_eq!(b[12], (32.0, 3));
        assert_eq!(b[13], (64.0, 3));
        assert_eq!(count, 4);
        assert!((sum - 120.010_001).abs() < 1e-9, "{sum}");
    }
}
