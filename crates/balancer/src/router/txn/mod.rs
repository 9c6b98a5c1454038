//! Client transactions of a new session's first request (RFC 3261 §16.7,
//! §17): the INVITE (or SUBSCRIBE, MESSAGE...) tried server after server.
//!
//! The balancer answers the UA's INVITE with `100 Trying`, sends it to the
//! drawn server and fails over to another on no answer within
//! `failover_timeout` or a `failover_statuses` final (ACKed here). A
//! non-INVITE fails over only on a 503 (the server says it did not process
//! it), never on silence: a server may take 32 s and sends no 100 (RFC
//! 4320), so a second server could get a duplicate MESSAGE. The UA's CANCEL
//! stops the failover; a server is CANCELled only once it answered
//! provisionally (§9.1). An attempt given up (failover, Timer C, a server
//! that stopped answering after ringing) is CANCELled once it has rung; a
//! 2xx that it sends later is ACKed and BYEd here (the UA's session is
//! elsewhere by then: passing the 2xx up would open a second dialog it did
//! not ask for); its non-2xx finals are ACKed. Our own final response (503,
//! 408, 487, or the best failure when every attempt failed) is retransmitted
//! over UDP until the UA's ACK (§17.2.1). Our CANCELs and BYEs are
//! retransmitted over UDP until answered (Timer E, as any non-INVITE
//! request), the entry staying meanwhile.
//!
//! An entry outlives its final response by 64 × T1 (UDP): after a 2xx in
//! the Accepted state of RFC 6026 (INVITE retransmissions absorbed, the
//! 2xx's retransmissions relayed, any other attempt's 2xx ACKed and BYEd);
//! after a non-2xx for the UA's ACK and its copies (each forwarded with
//! the attempt's branch) and for a server's repeats of a final we ACKed
//! (Timer D); after a non-INVITE's final for the UA's retransmissions,
//! which get the final again (Timer J) and never reach a server as a new
//! transaction. Only when every attempt has its final over TCP does the
//! ACK of our own final shorten that (Timer I).
//!
//! Each attempt's branch is `Leg::Attempt(n)`; the transaction holds the
//! request as processed once, and every copy (a failover, a CANCEL) comes
//! from it. The outstanding count of a server is the number of attempts
//! waiting for its final response: incremented when an attempt is sent,
//! decremented once when it gets its final, is given up, or the
//! transaction goes.

mod own;
mod timers;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::RngCore;
use sip::{Edits, Message, Method};
use smallvec::SmallVec;
use tracing::{info, warn};

use super::build;
use super::request::{Hop, ViaText};
use super::{Dest, Now, Outbox, Router, TimerKey};
use crate::codec::Leg;
use crate::config::{Config, Transport};
use crate::merge;
use crate::pool::Server;
use crate::stats::{DropReason, ServerStats};

/// RFC 3261 T1: the round-trip estimate.
pub const T1: Duration = Duration::from_millis(500);
/// RFC 3261 T2: the longest retransmission interval.
pub const T2: Duration = Duration::from_secs(4);
/// RFC 3261 T4: how long a datagram may live in the network.
pub const T4_MS: u64 = 5_000;
/// 64 × T1: how long a transaction may wait for an answer (Timers B, F, H).
pub const TXN_MS: u64 = 32_000;

/// Requests whose first transaction a new session may retry on another
/// server. REGISTER is forked instead; CANCEL, ACK and in-dialog requests
/// follow their session.
#[must_use]
pub fn starts_session(m: Method<'_>) -> bool {
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

/// Requests that create a dialog (and so get our Record-Route).
#[must_use]
pub fn creates_dialog(m: Method<'_>) -> bool {
    matches!(m, Method::Invite | Method::Subscribe | Method::Refer)
}

/// One server tried.
#[derive(Debug)]
pub(super) struct Try {
    pub server: Arc<str>,
    stats: Arc<ServerStats>,
    address: std::net::SocketAddr,
    transport: Transport,
    /// Counted in the server's outstanding transactions.
    counted: bool,
    /// It answered (anything, 100 included).
    answered: bool,
    /// It passed `failover_timeout` unanswered: its failure is recorded
    /// (a late answer is not a success), and it may wait on as the last
    /// server (`last_attempt_timeout`).
    late: bool,
    /// It answered provisionally (a CANCEL may go to it).
    provisional: bool,
    /// It sent a final response.
    final_seen: bool,
    /// We CANCELled it.
    cancel_sent: bool,
    /// Our CANCEL got its final response (its retransmissions stop).
    cancel_answered: bool,
    /// We sent a BYE for its late 2xx.
    byed: bool,
    /// That BYE, retransmitted over UDP until it is answered.
    bye: Option<Vec<u8>>,
    /// Our BYE got its final response.
    bye_answered: bool,
    /// When it was sent first (its latency is measured from here).
    sent: std::time::Instant,
}

impl Try {
    /// A CANCEL or BYE of ours to it still waits for its answer.
    fn own_pending(&self) -> bool {
        self.cancel_sent && !self.cancel_answered && !self.final_seen
            || self.bye.is_some() && !self.bye_answered
    }
}

/// The once-a-second round's work list (see `txn_round`): transactions
/// still waiting for their final, looked at every round (few: the calls
/// being set up), and completed entries by the time they may go, looked at
/// then (so the round costs what is due, not the size of the table, which
/// holds every transaction of the last 64 × T1). The ends are kept in
/// 100 ms buckets, each a list appended to: a binary heap of 100,000
/// entries costs a cache miss per level on every pop, as much as the walk
/// of the table it replaces.
#[derive(Debug, Default)]
pub(in crate::router) struct Sweep {
    trying: Vec<u64>,
    /// How many of `trying` were handed out by `next_watched`.
    handed_out: usize,
    /// Completed entries a full table looked at and could not end early,
    /// (end, id): out of the search's way until the next round puts them
    /// back among the ends.
    held: Vec<(u64, u64)>,
    ends: std::collections::BTreeMap<u64, Vec<u64>>,
    /// Entries the rounds have looked at, in all.
    pub looked_at: u64,
}

/// The width of an end bucket (ms): an entry is looked at in the first
/// round at or after its bucket's end, at most this much after its end.
const END_BUCKET_MS: u64 = 100;

impl Sweep {
    /// A new transaction: looked at every round while it is in progress.
    pub(in crate::router) fn watch(&mut self, id: u64) {
        self.trying.push(id);
    }

    /// Look at completed entry `id` in the first round at or after `ms`
    /// (again: an entry may be due more than once; the round checks).
    pub(in crate::router) fn end_at(&mut self, ms: u64, id: u64) {
        self.ends
            .entry(ms.div_ceil(END_BUCKET_MS))
            .or_default()
            .push(id);
    }

    /// The completed entry due to end first (any of its 100 ms bucket), taken
    /// off the work list: a candidate to end early when the table is full.
    pub(in crate::router) fn pop_oldest_end(&mut self) -> Option<u64> {
        let mut e = self.ends.first_entry()?;
        let id = e.get_mut().pop();
        if e.get().is_empty() {
            e.remove();
        }
        id
    }

    /// Keeps completed entry `id` (ending at `at`) out of the search for an
    /// early end until the next round.
    pub(in crate::router) fn hold(&mut self, at: u64, id: u64) {
        self.held.push((at, id));
    }

    /// The next transaction watched since the last round, oldest first
    /// (most are answered by now), each handed out once per round and left
    /// on the list: a candidate to end early before the round has moved it
    /// to the ends (one still in progress is a candidate again once it is
    /// there).
    pub(in crate::router) fn next_watched(&mut self) -> Option<u64> {
        let id = self.trying.get(self.handed_out).copied()?;
        self.handed_out += 1;
        Some(id)
    }

    /// What the round at `ms` looks at: every transaction in progress and
    /// every entry due, each once.
    fn take_due(&mut self, ms: u64) -> Vec<u64> {
        for (at, id) in std::mem::take(&mut self.held) {
            self.end_at(at, id);
        }
        let mut due = std::mem::take(&mut self.trying);
        self.handed_out = 0;
        while let Some(e) = self.ends.first_entry() {
            if *e.key() * END_BUCKET_MS > ms {
                break;
            }
            due.append(&mut e.remove());
        }
        due.sort_unstable();
        due.dedup();
        self.looked_at += due.len() as u64;
        due
    }

    /// How many transactions it holds (the in-progress ones and the
    /// scheduled ends, a transaction perhaps more than once).
    pub(in crate::router) fn len(&self) -> usize {
        self.trying.len() + self.held.len() + self.ends.values().map(Vec::len).sum::<usize>()
    }
}

/// Where the transaction is towards the UA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Waiting for the current attempt's final response.
    Trying,
    /// A final went to the UA; the entry stays for the ACK (INVITE non-2xx)
    /// or for retransmissions until `expires_ms`.
    Completed,
    /// An INVITE's 2xx went to the UA (RFC 6026 §7: Accepted). Its ACK is a
    /// transaction of its own, but the entry stays 64 × T1: the INVITE's
    /// retransmissions are absorbed (not a new transaction, perhaps on
    /// another server), the 2xx's retransmissions are relayed, and a 2xx
    /// of an attempt given up is ACKed and BYEd, not passed up as a second
    /// dialog.
    Accepted,
}

/// A new session's first transaction.
#[derive(Debug)]
pub(super) struct ClientTxn {
    pub invite: bool,
    /// The request as processed once (Route popped, Max-Forwards
    /// decremented, `received`), without our Via.
    request: Vec<u8>,
    reply_to: Dest,
    conn: Option<u64>,
    /// Where the request came from (the user agent's flow).
    from: super::Origin,
    record_route: bool,
    loop_hash: u32,
    pub tries: SmallVec<[Try; 3]>,
    phase: Phase,
    /// The UA CANCELled (at this time, ms).
    cancelled: bool,
    cancelled_ms: u64,
    /// The best failure so far (our Via removed).
    best: Option<(u16, Vec<u8>)>,
    /// Our own final response to the UA, retransmitted until its ACK.
    local_final: Option<Vec<u8>>,
    /// The server's final response as relayed to the UA (non-2xx INVITE,
    /// non-INVITE): sent again when the UA retransmits its request
    /// (§17.2.1, §17.2.2), which no server must see as a new transaction.
    relayed: Option<Vec<u8>>,
    /// The UA's ACK of a non-2xx final came.
    acked: bool,
    /// Timer C runs from here (ms): the last forwarding or provisional.
    timer_c_from: u64,
    created_ms: u64,
    /// When a completed entry may go (ms).
    expires_ms: u64,
    /// A CANCEL or BYE of ours may still be retransmitted until then (ms):
    /// the entry stays while one waits for its answer.
    own_until_ms: u64,
    /// A provisional, a final or our 100 went to the UA (no 100 of ours
    /// after that).
    pub trying_sent: bool,
    /// The attempt whose failover timer the Trying timer arms, if the
    /// attempt is still unanswered when it fires: one timer per INVITE
    /// answered at once (nearly all), not two.
    pub failover_deferred: Option<u8>,
    /// The request carried credentials from this source: a 401/407 final
    /// spends one of its failed authentications (`limits.auth_failure_*`).
    pub auth_from: Option<std::net::IpAddr>,
}

/// What the UA's ACK belongs to.
pub(super) enum AckOf {
    /// Our own final response: absorbed.
    Ours,
    /// A non-2xx final relayed from attempt `index` on `server`.
    Server { index: u8, server: Arc<str> },
    /// Not this transaction's final (a 2xx's ACK: another transaction).
    NotThis,
}

impl ClientTxn {
    pub(super) fn new(
        invite: bool,
        request: Vec<u8>,
        reply_to: Dest,
        from: super::Origin,
        record_route: bool,
        loop_hash: u32,
        now_ms: u64,
    ) -> ClientTxn {
        ClientTxn {
            invite,
            request,
            reply_to,
            conn: super::request::conn_of(from),
            from,
            record_route,
            loop_hash,
            tries: SmallVec::new(),
            phase: Phase::Trying,
            cancelled: false,
            cancelled_ms: 0,
            best: None,
            local_final: None,
            relayed: None,
            acked: false,
            timer_c_from: now_ms,
            created_ms: now_ms,
            expires_ms: u64::MAX,
            own_until_ms: 0,
            auth_from: None,
            trying_sent: false,
            failover_deferred: None,
        }
    }

    /// When a completed entry that may not go at `ms` is to be looked at
    /// again: its end, or the end of the wait for our own CANCEL or BYE.
    fn next_end(&self, ms: u64) -> u64 {
        if ms < self.expires_ms {
            self.expires_ms
        } else {
            self.own_until_ms.max(ms + 1)
        }
    }

    /// Whether the entry may end before its time when the table is full:
    /// it is one of those that already live only T4 (or less) to absorb what
    /// crosses the final, and that a copy of the request arriving after it
    /// is gone cannot hurt (`Router::ended` absorbs the copy): an INVITE
    /// answered 2xx by the only server tried (no late 2xx of another attempt
    /// to ACK and BYE), or an INVITE whose non-2xx final the UA has ACKed
    /// with every attempt answered over a reliable transport (no server
    /// repeating a final whose ACK was lost: our Timer D); and no CANCEL or
    /// BYE of ours waits for an answer. Never a transaction in progress, a
    /// final still owed its ACK, or a non-INVITE (a copy of its request
    /// would need the final again).
    pub(in crate::router) fn may_end_early(&self) -> bool {
        let settled = match self.phase {
            Phase::Trying => false,
            Phase::Accepted => self.tries.len() == 1,
            Phase::Completed => {
                self.invite
                    && self.acked
                    && self
                        .tries
                        .iter()
                        .all(|x| x.final_seen && x.transport != Transport::Udp)
            }
        };
        settled && !self.tries.iter().any(Try::own_pending)
    }

    /// When a completed entry may go (ms): where its round looks at it.
    pub(in crate::router) fn expires_ms(&self) -> u64 {
        self.expires_ms
    }

    /// Whether a completed entry may go at `ms`.
    fn over(&self, ms: u64) -> bool {
        ms >= self.expires_ms
            && (ms >= self.own_until_ms || !self.tries.iter().any(Try::own_pending))
    }

    /// How long a completed entry stays after its final: 64 × T1 for an
    /// INVITE (Timers H, L) or a UA on UDP, whose retransmissions must be
    /// answered from here until its Timer F (our Timer J); else T4.
    fn linger_ms(&self) -> u64 {
        if self.invite || !self.reply_to.reliable() {
            TXN_MS
        } else {
            T4_MS
        }
    }

    /// The origin to forward the stored request as: where it came from
    /// (its inbound connection for `lbc`, its flow for our Record-Route).
    fn origin(&self) -> super::Origin {
        self.from
    }

    fn current(&self) -> u8 {
        self.tries.len().saturating_sub(1) as u8
    }

    /// Stops counting attempt `i` as outstanding at its server.
    fn release(&mut self, i: usize) {
        if let Some(t) = self.tries.get_mut(i)
            && std::mem::take(&mut t.counted)
        {
            let _ = t
                .stats
                .outstanding
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n - 1));
        }
    }

    /// Stops counting every attempt (the entry goes).
    pub(super) fn release_all(&mut self) {
        for i in 0..self.tries.len() {
            self.release(i);
        }
    }

    /// Structural invariants (checked by tests after every step).
    pub(super) fn check(&self, id: u64) {
        let counted = self.tries.iter().filter(|t| t.counted).count();
        assert!(
            counted <= 1,
            "txn {id:x}: {counted} attempts counted at once"
        );
        if let Some(t) = self.tries.iter().find(|t| t.counted) {
            assert!(!t.final_seen, "txn {id:x}: counted after its final");
        }
        if self.local_final.is_some() {
            assert_eq!(
                self.phase,
                Phase::Completed,
                "txn {id:x}: local final while trying"
            );
        }
        assert!(self.tries.len() <= 255);
    }
}

impl Router {
    /// Sends the transaction's request to `server` as its next attempt.
    /// `first`: the request as it came from the UA and the Routes to pop,
    /// when this is the transaction's first attempt (its copy is written
    /// from it, processed on the way, rather than from the stored request
    /// parsed again). `defer_failover`: the Trying timer, due before the
    /// failover timer, arms the latter only if the attempt is unanswered.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_attempt(
        &self,
        cfg: &Config,
        t: &mut ClientTxn,
        id: u64,
        server: &Server,
        first: Option<(&Message<'_>, u8)>,
        defer_failover: bool,
        now: Now,
        out: &mut Outbox,
    ) {
        t.tries.push(Try {
            server: server.id.clone(),
            stats: server.stats.clone(),
            address: server.cfg.address,
            transport: server.cfg.transport,
            counted: true,
            answered: false,
            late: false,
            provisional: false,
            final_seen: false,
            cancel_sent: false,
            cancel_answered: false,
            byed: false,
            bye: None,
            bye_answered: false,
            sent: now.at,
        });
        server.stats.outstanding.fetch_add(1, Ordering::Relaxed);
        t.timer_c_from = self.ms(now);
        let index = t.current();
        match first {
            Some((msg, pop_routes)) => {
                let branch = Self::branch(id, Leg::Attempt(index), t.loop_hash);
                let hop = Hop {
                    pop_routes,
                    record_route: t.record_route,
                    fresh: true,
                    path: false,
                };
                self.forward_to_server(msg, server, hop, branch, t.origin(), out);
            }
            None => self.send_attempt(t, id, server, out),
        }
        if t.invite && defer_failover {
            t.failover_deferred = Some(index);
        } else if t.invite {
            out.arm(
                now.at + cfg.failover_timeout,
                TimerKey::Failover {
                    txn: id,
                    attempt: index,
                },
            );
        }
    }

    /// Writes the current attempt's copy of the request for `server`.
    fn send_attempt(&self, t: &ClientTxn, id: u64, server: &Server, out: &mut Outbox) {
        let Ok(msg) = Message::parse(&t.request) else {
            return;
        };
        let branch = Self::branch(id, Leg::Attempt(t.current()), t.loop_hash);
        let origin = t.origin();
        self.forward_to_server(
            &msg,
            server,
            Hop {
                pop_routes: 0,
                record_route: t.record_route,
                fresh: false,
                path: false,
            },
            branch,
            origin,
            out,
        );
    }

    /// A retransmission of the transaction's request from the UA.
    pub(super) fn retransmission(
        &self,
        t: &mut ClientTxn,
        id: u64,
        msg: &Message<'_>,
        out: &mut Outbox,
    ) {
        if let Some(f) = t.local_final.as_ref().or(t.relayed.as_ref()) {
            // The final was lost: again (§17.2.1, §17.2.2).
            return out.send(t.reply_to.clone(), f);
        }
        if t.cancelled || t.phase != Phase::Trying {
            return self.drop_counted(DropReason::Merged, out);
        }
        let Some(cur) = t.tries.last() else { return };
        // No second 100 of ours here: under load it raced the server's 180
        // relayed by another socket's task and reached the UA after it (SIPp
        // counts that as an unexpected message). The server answers the
        // duplicate with its latest response, in its flow's order.
        let _ = msg;
        // The server absorbs a duplicate and repeats its last answer.
        if cur.transport == Transport::Udp
            && let Some(s) = self.pool.load().by_id(&cur.server)
        {
            self.send_attempt(t, id, s, out);
        }
    }

    /// The UA's CANCEL for this INVITE transaction.
    pub(super) fn cancel_txn(&self, t: &mut ClientTxn, id: u64, now: Now, out: &mut Outbox) {
        if t.phase != Phase::Trying || t.cancelled {
            return;
        }
        t.cancelled = true;
        t.cancelled_ms = self.ms(now);
        let i = t.current() as usize;
        if t.tries.get(i).is_some_and(|x| x.provisional) {
            self.cancel_attempt(t, id, i, now, out);
        }
        // Else the CANCEL waits for a provisional response (§9.1); if none
        // comes by the failover timeout, the UA gets our 487.
    }

    /// A response to attempt `index` of transaction `id`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn txn_response(
        &self,
        cfg: &Config,
        t: &mut ClientTxn,
        id: u64,
        index: u8,
        msg: &Message<'_>,
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Outbox,
    ) -> TxnVerdict {
        let code = msg.status().unwrap_or(0);
        let i = usize::from(index);
        let current = index == t.current() && t.local_final.is_none() && t.phase == Phase::Trying;
        let Some(x) = t.tries.get_mut(i) else {
            self.drop_counted(DropReason::ViaNotOurs, out);
            return TxnVerdict::Done;
        };
        let first_answer = !std::mem::replace(&mut x.answered, true);
        if t.invite {
            // The server's latency, whatever becomes of its answer.
            let waited = now.at.saturating_duration_since(x.sent);
            if first_answer {
                x.stats.invite_first_response.observe(waited);
            }
            if code >= 200 && !x.final_seen {
                x.stats.invite_final_response.observe(waited);
            }
        }
        if code < 200 {
            x.provisional = true;
        }
        if !current {
            let given_up = index != t.current() || t.local_final.is_some();
            if !given_up {
                // The final we relayed, again (the UA may have lost it and
                // its ACK, or its retransmission, goes to the server).
                if code >= 200 {
                    return TxnVerdict::Relay;
                }
            } else if code < 200 {
                if t.invite {
                    self.cancel_attempt(t, id, i, now, out);
                }
            } else {
                t.tries[i].final_seen = true;
                t.release(i);
                // Its repeats (if our ACK is lost) must find the entry
                // (Timer D); the entry is not over before then.
                t.expires_ms = t.expires_ms.max(self.ms(now) + TXN_MS);
                if t.invite && (200..300).contains(&code) {
                    self.ack_and_bye(t, id, i, msg, now, out);
                } else if t.invite {
                    self.ack_attempt(t, i, msg, out);
                }
            }
            self.drop_counted(DropReason::Absorbed, out);
            return TxnVerdict::Done;
        }
        let pool = self.pool.load();
        let server = pool.by_id(&t.tries[i].server).cloned();
        if code == 503
            && let Some(s) = &server
        {
            self.note_overload(cfg, s, msg, now);
        }
        if first_answer
            && !t.tries[i].late
            && !(code >= 200 && fails_over_on(cfg, t.invite, code))
            && let Some(s) = &server
        {
            self.record_outcome(cfg, &pool, s, true, now);
        }
        if code < 200 {
            if code > 100 {
                t.timer_c_from = self.ms(now);
            }
            if t.cancelled {
                self.cancel_attempt(t, id, i, now, out);
            }
            if code == 100 {
                // Hop by hop (§16.7 step 3): ours is sent, or will be.
                self.drop_counted(DropReason::Absorbed, out);
                return TxnVerdict::Done;
            }
            t.trying_sent = true;
            return TxnVerdict::Relay;
        }
        t.tries[i].final_seen = true;
        t.release(i);
        if !t.cancelled && fails_over_on(cfg, t.invite, code) {
            if let Some(s) = &server {
                s.stats.failovers.fetch_add(1, Ordering::Relaxed);
                self.record_outcome(cfg, &pool, s, false, now);
            }
            if t.invite {
                self.ack_attempt(t, i, msg, out);
            }
            let mut without = Vec::with_capacity(msg.as_bytes().len());
            without_top_via(msg, &mut without);
            if t.best
                .as_ref()
                .is_none_or(|(c, _)| merge::best(&[*c, code]) == Some(1))
            {
                t.best = Some((code, without));
            }
            self.next_attempt(cfg, t, id, "failover status", now, rng, out);
            return TxnVerdict::Done;
        }
        t.trying_sent = true;
        t.phase = Phase::Completed;
        t.best = None;
        t.expires_ms = self.ms(now) + t.linger_ms();
        self.auth_failed(t.auth_from, code, now);
        if t.invite && (200..300).contains(&code) {
            // Its ACK is a transaction of its own; the entry stays (Timer L)
            // so that a late 2xx from another attempt is ACKed and BYEd, and
            // a CANCEL or INVITE retransmission crossing the 2xx is absorbed.
            t.phase = Phase::Accepted;
            if t.tries.len() == 1 && !t.tries.iter().any(Try::own_pending) {
                // The only server tried answered (nearly every call): no late
                // 2xx can come from another, so the entry only has to absorb
                // what crosses the 2xx. It keeps T4 (as Kamailio's wait
                // timer), without its request, so the table does not hold
                // every call for 64 × T1.
                t.request = Vec::new();
                t.expires_ms = self.ms(now) + T4_MS;
            }
        } else {
            let mut relayed = Vec::with_capacity(msg.as_bytes().len());
            without_top_via(msg, &mut relayed);
            merge::set_outgoing_status(&mut relayed, code);
            t.relayed = Some(relayed);
            if !t.invite {
                // Retransmissions get `relayed`; the request is not needed
                // any more (it is the bulk of the entry).
                t.request = Vec::new();
            }
        }
        TxnVerdict::Relay
    }

    /// Tries the next server, or gives the UA the best failure (or our 503).
    #[allow(clippy::too_many_arguments)]
    fn next_attempt(
        &self,
        cfg: &Config,
        t: &mut ClientTxn,
        id: u64,
        why: &str,
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Outbox,
    ) {
        let next = self.next_server(cfg, t, now, rng);
        self.move_on(cfg, t, id, next, why, now, out);
    }

    /// The server a failover of `t` would go to, drawn by the policy among
    /// those not tried; none when the UA cancelled, the attempts are used
    /// up or the balancer is stopping.
    fn next_server(
        &self,
        cfg: &Config,
        t: &ClientTxn,
        now: Now,
        rng: &mut dyn RngCore,
    ) -> Option<Arc<Server>> {
        if t.cancelled
            || t.tries.len() >= usize::from(cfg.max_attempts)
            || self.stopping.load(Ordering::Relaxed)
        {
            return None;
        }
        let pool = self.pool.load();
        let tried: SmallVec<[Arc<str>; 4]> = t.tries.iter().map(|x| x.server.clone()).collect();
        self.select(cfg, &pool, &tried, now, rng)
    }

    /// Sends `t` to `next`, or with none answers the UA: 487 if it
    /// cancelled, else the best failure so far or 503.
    #[allow(clippy::too_many_arguments)]
    fn move_on(
        &self,
        cfg: &Config,
        t: &mut ClientTxn,
        id: u64,
        next: Option<Arc<Server>>,
        why: &str,
        now: Now,
        out: &mut Outbox,
    ) {
        if t.cancelled {
            return self.final_from_request(t, id, 487, "Request Terminated", &[], now, out);
        }
        let (call_id, method): (SmallVec<[u8; 64]>, &str) = Message::parse(&t.request)
            .map(|m| {
                (
                    m.call_id().into(),
                    crate::stats::METHODS[crate::stats::method_index(m.method())],
                )
            })
            .unwrap_or_default();
        match next {
            Some(s) => {
                info!(call_id = %String::from_utf8_lossy(&call_id), server = %s.id, method, attempt = t.tries.len(), why, "failover");
                self.sessions.reassign(&call_id, s.id.clone(), self.ms(now));
                s.stats.selected.fetch_add(1, Ordering::Relaxed);
                self.start_attempt(cfg, t, id, &s, None, false, now, out);
            }
            None => {
                warn!(call_id = %String::from_utf8_lossy(&call_id), method, why, "every attempt failed");
                self.sessions.demote(&call_id, self.ms(now));
                match t.best.take() {
                    Some((code, mut bytes)) => {
                        merge::set_outgoing_status(&mut bytes, code);
                        self.stats.response(merge::outgoing_status(code));
                        self.complete_with(t, id, bytes, now, out);
                    }
                    None => {
                        let ra = format!("Retry-After: {}", cfg.retry_after);
                        self.final_from_request(
                            t,
                            id,
                            503,
                            "Service Unavailable (no server answered)",
                            &[ra.as_bytes()],
                            now,
                            out,
                        );
                    }
                }
            }
        }
    }

    /// Answers the UA ourselves with `code`, built from the stored request.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn final_from_request(
        &self,
        t: &mut ClientTxn,
        id: u64,
        code: u16,
        reason: &str,
        extra: &[&[u8]],
        now: Now,
        out: &mut Outbox,
    ) {
        let request = std::mem::take(&mut t.request);
        if let Ok(req) = Message::parse(&request) {
            self.local_final(t, id, &req, code, reason, extra, now, out);
        }
        t.request = request;
    }

    /// Answers the UA ourselves with a final response.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn local_final(
        &self,
        t: &mut ClientTxn,
        id: u64,
        req: &Message<'_>,
        code: u16,
        reason: &str,
        extra: &[&[u8]],
        now: Now,
        out: &mut Outbox,
    ) {
        let mut bytes = Vec::with_capacity(512);
        let tag = self.to_tag(req);
        // The UA's Via is the top one of the processed request.
        sip::reply::response_for(req, code, reason, &tag, extra, &mut bytes);
        self.stats.refusal(code);
        self.complete_with(t, id, bytes, now, out);
    }

    /// Sends `bytes` to the UA as the transaction's final response, kept
    /// and retransmitted (UDP) until the UA's ACK.
    fn complete_with(
        &self,
        t: &mut ClientTxn,
        id: u64,
        bytes: Vec<u8>,
        now: Now,
        out: &mut Outbox,
    ) {
        out.send(t.reply_to.clone(), &bytes);
        t.phase = Phase::Completed;
        t.local_final = Some(bytes);
        t.expires_ms = self.ms(now) + t.linger_ms();
        if t.invite && !t.reply_to.reliable() {
            out.arm(now.at + T1, TimerKey::Retransmit { txn: id, n: 0 });
        }
    }

    /// What the UA's ACK of this transaction is.
    pub(super) fn ack_of(&self, t: &mut ClientTxn, id: u64, now: Now) -> AckOf {
        if !t.invite || t.phase != Phase::Completed {
            return AckOf::NotThis;
        }
        if t.local_final.is_some() {
            if !t.acked {
                t.acked = true;
                // Absorb the ACK's retransmissions a while (Timer I); but an
                // attempt given up without its final may still answer (a
                // 2xx to ACK and BYE here, never to pass up), and a server
                // on UDP repeats a final we ACKed if our ACK was lost (our
                // Timer D): then the entry keeps its 64 × T1.
                if t.tries
                    .iter()
                    .all(|x| x.final_seen && x.transport != Transport::Udp)
                {
                    let i = if t.reply_to.reliable() { 0 } else { T4_MS };
                    t.expires_ms = t.expires_ms.min(self.ms(now) + i);
                    self.sweep_lock().end_at(t.expires_ms, id);
                }
            }
            return AckOf::Ours;
        }
        t.acked = true;
        match t.tries.last() {
            Some(x) => AckOf::Server {
                index: t.current(),
                server: x.server.clone(),
            },
            None => AckOf::NotThis,
        }
    }
}

/// What to do with a transaction's response after the transaction saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TxnVerdict {
    /// Nothing more (absorbed, or handled).
    Done,
    /// Relay it to the UA (a server's 503 as 500: RFC 3261 §16.7 step 6,
    /// the UA must not take the pool as unavailable because one server is).
    Relay,
}

/// Whether a final `code` makes a new session's request try another server.
fn fails_over_on(cfg: &Config, invite: bool, code: u16) -> bool {
    cfg.failover_statuses.contains(&code) && (invite || code == 503)
}

fn dest_of(address: std::net::SocketAddr, transport: Transport) -> Dest {
    match transport {
        Transport::Udp => Dest::Udp(address),
        Transport::Tcp => Dest::Tcp(address),
        Transport::Tls => Dest::Tls(address),
        // The config refuses WebSocket servers.
        Transport::Ws | Transport::Wss => Dest::Tcp(address),
    }
}

/// The response with our Via removed, into `out` (what goes back to the UA).
pub(super) fn without_top_via(msg: &Message<'_>, out: &mut Vec<u8>) {
    msg.write_edited(
        &Edits {
            remove_top_via: true,
            ..Edits::default()
        },
        out,
    );
}
