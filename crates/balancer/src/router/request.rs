//! Requests (RFC 3261 §16.3-16.6): the checks, our Route, then where the
//! request goes — a server's request out towards the user agent; a UA's
//! ACK and CANCEL by their transaction; a new session's first request as a
//! client transaction of ours ([`super::txn`]); REGISTER to every server
//! ([`super::fork`]); everything else to the server of its session.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::RngCore;
use sip::{Edits, HeaderName, MaxForwards, Message, Method, Received};
use smallvec::SmallVec;
use tracing::debug;

use super::txn::{self, ClientTxn};
use super::{Dest, Now, Origin, Outbox, Router, TimerKey};
use std::net::SocketAddr;

use crate::codec::{Branch, Flow, Keys, Leg};
use crate::config::{Config, OnNoServer, Transport};
use crate::pool::{Pool, Server};
use crate::sessions::Kind;
use crate::stats::{DropReason, Limit};

/// Candidates a full table looks at to end one early (`end_one_early`), of
/// the ends and of those watched since the last round each: bounds the
/// work a new transaction adds when no entry may go. Those that must stay
/// are set aside until the next round, so the next search reaches others.
const EARLY_END_LOOKS: usize = 256;

/// What our own Routes on top of a request said (one, or two of a double
/// Record-Route, RFC 5658; or our Path).
pub(super) struct OurRoute {
    /// How many of the top Route values are ours: pop them.
    pub pop: u8,
    /// The server its `sb` token names.
    pub target: Option<Arc<Server>>,
    /// The user agent's flow its `flow` token names.
    pub flow: Option<FlowRef>,
    /// The request's loop hash (computed once per request).
    pub loop_hash: u32,
}

/// A flow token, checked.
#[derive(Debug, Clone, Copy)]
pub(super) enum FlowRef {
    /// The flow is there: reach the user agent over it.
    Live {
        flow: Flow,
        /// Its far end (for the token's MAC).
        peer: SocketAddr,
        transport: Transport,
    },
    /// A connection that has closed: 430 Flow Failed (RFC 5626 §5.3).
    Gone,
    /// A connection another instance of the pool holds (`pool.instance`):
    /// not reachable from here, so 430 Flow Failed as well.
    Elsewhere(u16),
}

/// How a request is written for one server.
#[derive(Debug, Clone, Copy)]
pub(super) struct Hop {
    /// Remove this many top Routes (they named us).
    pub pop_routes: u8,
    /// Add our Record-Route.
    pub record_route: bool,
    /// Decrement Max-Forwards and write `received`/`rport`: the request as
    /// it came from its sender. `false` for a copy of a request processed
    /// once already.
    pub fresh: bool,
    /// Add our Path (a REGISTER from a user agent, RFC 3327).
    pub path: bool,
}

impl Router {
    pub(super) fn request(
        &self,
        cfg: &Config,
        msg: &Message<'_>,
        origin: Origin,
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Outbox,
    ) {
        let back = origin.reply_dest();
        if msg.max_forwards() == Some(0) {
            // A pool peer's liveness probe: we answer it ourselves.
            if self.answer_peer_probe(msg, origin, out) {
                return;
            }
            return self.reply(msg, 483, "Too Many Hops", &[], back, out);
        }
        let uri = msg.request_uri().expect("a request has a Request-URI");
        if !matches!(
            uri.scheme,
            sip::Scheme::Sip | sip::Scheme::Sips | sip::Scheme::Tel
        ) {
            return self.reply(msg, 416, "Unsupported URI Scheme", &[], back, out);
        }
        if let Some(h) = msg.header(HeaderName::ProxyRequire) {
            // We support no extension a proxy must understand.
            let mut line = b"Unsupported: ".to_vec();
            line.extend_from_slice(h.value);
            return self.reply(msg, 420, "Bad Extension", &[&line], back, out);
        }
        let loop_hash = self.loop_hash(msg);
        let looped = |v: &sip::Via<'_>| {
            self.is_ours(&v.host, v.port)
                && v.branch
                    .and_then(Branch::parse)
                    .is_some_and(|b| b.loop_hash == loop_hash)
        };
        if looped(msg.top_via()) || msg.vias_below_top().flatten().any(|v| looped(&v)) {
            return self.reply(msg, 482, "Loop Detected", &[], back, out);
        }
        let to_tag = msg.tags().1.is_some();
        let Some(mut route) = self.our_route(cfg, msg, to_tag) else {
            return self.reply(
                msg,
                403,
                "Forbidden (bad Record-Route or flow signature)",
                &[],
                back,
                out,
            );
        };

        route.loop_hash = loop_hash;
        let pool = self.pool.load();
        // A server's own request: from its address, or (on a connection it
        // opened to us, e.g. along our Path or Record-Route over TLS) from
        // its IP with its address in the top Via.
        let top = msg.top_via();
        let sent_by = top
            .host
            .ip()
            .map(|ip| SocketAddr::new(ip, top.port.unwrap_or(5060)));
        let from_server = pool.sender(origin.peer(), sent_by).cloned();
        if let Some(server) = from_server {
            if let Origin::Conn {
                conn,
                inbound: true,
                ..
            } = origin
            {
                self.mark_server_conn(conn);
            }
            // A request from a server goes towards the user agent.
            return self.forward_outward(msg, &server, &route, origin, false, now, out);
        }
        if self.peer_sender(origin.peer(), sent_by).is_some() {
            // A server's request another instance of the pool got for a
            // flow of ours.
            return self.peer_request(msg, &route, origin, now, out);
        }

        let method = msg.method();
        // Per-source limits: servers of the pool never; in-dialog requests
        // (a To tag, or our token) never; REGISTER before its fork.
        let kind = match method {
            Method::Register => Some(Limit::Register),
            Method::Ack => None,
            _ if to_tag => None,
            m if txn::creates_dialog(m) => Some(Limit::NewSession),
            _ => Some(Limit::Request),
        };
        if let Some(kind) = kind
            && !self.within_limit(msg, kind, origin, now, out)
        {
            return;
        }
        if method != Method::Ack
            && method != Method::Cancel
            && !self.may_authenticate(msg, origin, now, out)
        {
            return;
        }
        match method {
            Method::Ack => return self.ack(msg, &pool, route, origin, now, out),
            Method::Cancel => return self.cancel(msg, &pool, route, origin, now, out),
            _ => {}
        }
        if !to_tag && txn::starts_session(method) {
            return self.new_transaction(cfg, msg, &pool, route, origin, now, rng, out);
        }
        if method == Method::Register && route.target.is_none() {
            if self.instance_drained() {
                // A phone that registers elsewhere takes its flow there too.
                return self.refuse_drained(cfg, msg, back, out);
            }
            return self.register(cfg, msg, &pool, route.pop, loop_hash, origin, now, out);
        }
        let ms = self.ms(now);
        let target = route.target.clone().or_else(|| {
            self.sessions
                .get(msg.call_id(), ms)
                .and_then(|id| pool.by_id(&id).cloned())
        });
        let target = match target {
            Some(t) => t,
            None if to_tag => {
                return self.reply(msg, 481, "Call/Transaction Does Not Exist", &[], back, out);
            }
            None => {
                // An out-of-dialog request of another kind (INFO, UPDATE
                // without a dialog...): a session of one transaction.
                let Some(s) =
                    self.new_session_server(cfg, msg, &pool, None, now, rng, out, back.clone())
                else {
                    return;
                };
                if !self
                    .sessions
                    .insert(msg.call_id(), s.id.clone(), Kind::Transaction, ms)
                    && self.sessions.len() >= cfg.max_sessions
                {
                    self.drop_counted(DropReason::SessionTableFull, out);
                }
                s.stats.selected.fetch_add(1, Ordering::Relaxed);
                s
            }
        };
        let branch = Self::branch(self.txn_id(msg), Leg::Attempt(0), loop_hash);
        self.forward_to_server(msg, &target, Hop::stateless(route.pop), branch, origin, out);
    }

    /// Our own Routes on top: `None` when an in-dialog request carries an
    /// `sb` token that does not verify for its own Call-ID (or names no
    /// server of the pool), or any request a `flow` token that is not ours.
    /// A request without a To tag starts a session: its `sb` is ignored
    /// (the policy draws its server, whatever Route it carries, so a token
    /// seen once pins nothing and reaches no drained server).
    fn our_route(&self, cfg: &Config, msg: &Message<'_>, to_tag: bool) -> Option<OurRoute> {
        let mut r = OurRoute {
            pop: 0,
            target: None,
            flow: None,
            loop_hash: 0,
        };
        let pool = self.pool.load();
        // A double Record-Route is two of ours; our Path may follow: at
        // most a few, and only at the top.
        for top in msg.routes().take(4) {
            let Ok(top) = top else { break };
            if !top.uri.host.is_some_and(|h| self.is_ours(&h, top.uri.port)) {
                break;
            }
            r.pop += 1;
            if let Some(sb) = top.uri.param(b"sb")
                && to_tag
                && r.target.is_none()
            {
                let id = sb.and_then(|v| {
                    self.keys
                        .verify_sb_bound(v, msg.call_id())
                        .or_else(|| cfg.legacy_sb.then(|| self.keys.verify_sb(v)).flatten())
                });
                let s = id.and_then(|id| pool.by_id(id))?;
                r.target = Some(s.clone());
            }
            if let Some(token) = top.uri.param(b"flow")
                && r.flow.is_none()
            {
                r.flow = Some(self.check_flow(token?)?);
            }
        }
        Some(r)
    }

    /// A flow token checked: live, gone (a closed connection), or `None`
    /// when it is not ours.
    fn check_flow(&self, token: &[u8]) -> Option<FlowRef> {
        let (flow, holder) = Keys::parse_flow(token)?;
        match flow {
            Flow::Conn(_) if holder.is_some() && holder != self.me.instance => {
                Some(FlowRef::Elsewhere(holder.unwrap_or_default()))
            }
            Flow::Conn(id) => match self.flow_info(id) {
                Some(info) if self.keys.verify_flow(token, info.peer) => Some(FlowRef::Live {
                    flow: Flow::Conn(id),
                    peer: info.peer,
                    transport: info.transport,
                }),
                Some(_) => None,
                None => Some(FlowRef::Gone),
            },
            Flow::Udp(a) => self.keys.verify_flow(token, a).then_some(FlowRef::Live {
                flow: Flow::Udp(a),
                peer: a,
                transport: Transport::Udp,
            }),
        }
    }

    /// The flow a request from a user agent came on (RFC 5626 §5.2) and the
    /// transport facing it: its connection; over UDP its source address
    /// when it asked for symmetric responses (`rport`, RFC 3581: it listens
    /// where it sends from) or `always` (our Path: a NAT binding is the
    /// only way back to a phone behind NAT).
    fn ua_side(
        &self,
        msg: &Message<'_>,
        origin: Origin,
        always: bool,
    ) -> (Transport, Option<(Flow, SocketAddr)>) {
        match origin {
            Origin::Conn {
                conn,
                peer,
                inbound: true,
            } => (
                self.flow_info(conn).map_or(Transport::Tcp, |f| f.transport),
                Some((Flow::Conn(conn), peer)),
            ),
            Origin::Udp { peer } if always || msg.top_via().rport.is_some() => {
                (Transport::Udp, Some((Flow::Udp(peer), peer)))
            }
            _ => (Transport::Udp, None),
        }
    }

    /// One Record-Route value of ours facing `facing`: the `sb` token of
    /// `server` bound to the Call-ID, and the user agent's flow.
    fn write_rr(
        &self,
        out: &mut ViaText,
        facing: Transport,
        held: bool,
        server: &str,
        call_id: &[u8],
        flow: Option<(Flow, SocketAddr)>,
    ) {
        out.0.extend_from_slice(self.me.rr(facing, held).as_bytes());
        self.keys.write_sb_bound(server, call_id, &mut out.0);
        if let Some((f, peer)) = flow {
            out.0.extend_from_slice(b";flow=");
            self.keys.write_flow(f, self.me.instance, peer, &mut out.0);
        }
        out.0.push(b'>');
    }

    /// Our Record-Route for a request going out facing `outgoing` that came
    /// in facing `incoming` (the user agent's flow on the user agent's
    /// side): one value when the two sides are alike, else two (RFC 5658:
    /// the outgoing side on top), so that each side's in-dialog requests
    /// reach us over its own transport.
    #[allow(clippy::too_many_arguments)]
    fn record_route(
        &self,
        out: &mut ViaText,
        outgoing: Transport,
        incoming: Transport,
        ua_outgoing: bool,
        server: &str,
        call_id: &[u8],
        flow: Option<(Flow, SocketAddr)>,
    ) {
        // A phone on a connection of ours: the dialog's routes name this
        // instance, the one that can reach it.
        let held = matches!(flow, Some((Flow::Conn(_), _)));
        if outgoing == incoming {
            return self.write_rr(out, outgoing, held, server, call_id, flow);
        }
        let (f_out, f_in) = if ua_outgoing {
            (flow, None)
        } else {
            (None, flow)
        };
        self.write_rr(out, outgoing, held, server, call_id, f_out);
        out.0.extend_from_slice(b", ");
        self.write_rr(out, incoming, held, server, call_id, f_in);
    }

    /// Whether a request from `ip` is within its source's limit; when it is
    /// not, answers it (503, itself limited) or drops it, counted.
    fn within_limit(
        &self,
        msg: &Message<'_>,
        kind: Limit,
        origin: Origin,
        now: Now,
        out: &mut Outbox,
    ) -> bool {
        let limiter = self.limiter.load();
        let ip = origin.peer().ip();
        if !limiter.cfg.enabled || limiter.cfg.allow.contains(ip) {
            return true;
        }
        let ms = self.ms(now);
        let buckets = match kind {
            Limit::NewSession => &limiter.new_session,
            Limit::Register => &limiter.register,
            Limit::Request => &limiter.request,
        };
        if buckets.take(ip, ms) {
            return true;
        }
        self.stats.limited(kind);
        self.refuse(&limiter, msg, origin, ms, DropReason::RateLimited, 1, out);
        false
    }

    /// Whether a request may carry credentials from its source: `false`
    /// (refused like a request over a limit) when the source has spent its
    /// budget of failed authentications (`limits.auth_failure_*`: password
    /// guessing, svcrack). A request without credentials always may (its
    /// challenge costs the guesser nothing it can use).
    fn may_authenticate(
        &self,
        msg: &Message<'_>,
        origin: Origin,
        now: Now,
        out: &mut Outbox,
    ) -> bool {
        let Some(ip) = self.credentials_from(msg, origin) else {
            return true;
        };
        let limiter = self.limiter.load();
        let ms = self.ms(now);
        if limiter.auth_failure.available(ip, ms) {
            return true;
        }
        let wait = limiter.auth_failure.wait_seconds(ip, ms).max(1);
        self.refuse(
            &limiter,
            msg,
            origin,
            ms,
            DropReason::AuthFailures,
            wait,
            out,
        );
        false
    }

    /// The source address to charge when this request's challenge comes
    /// back: a request with credentials (Authorization, Proxy-Authorization)
    /// from a source the limits apply to.
    pub(super) fn credentials_from(
        &self,
        msg: &Message<'_>,
        origin: Origin,
    ) -> Option<std::net::IpAddr> {
        if msg.header(HeaderName::Authorization).is_none()
            && msg.header(HeaderName::ProxyAuthorization).is_none()
        {
            return None;
        }
        let limiter = self.limiter.load();
        let ip = origin.peer().ip();
        (limiter.cfg.enabled && !limiter.cfg.allow.contains(ip)).then_some(ip)
    }

    /// A 401 or 407 answered a request with credentials from `ip`: one
    /// failure spent from its budget.
    pub(super) fn auth_failed(&self, ip: Option<std::net::IpAddr>, code: u16, now: Now) {
        if let Some(ip) = ip
            && matches!(code, 401 | 407)
        {
            let _ = self.limiter.load().auth_failure.take(ip, self.ms(now));
        }
    }

    /// A request refused by a limit: counted; answered 503 with
    /// `Retry-After` (our answers themselves limited per source) unless the
    /// limits say drop.
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &self,
        limiter: &crate::limits::Limiter,
        msg: &Message<'_>,
        origin: Origin,
        ms: u64,
        reason: DropReason,
        retry_after: u64,
        out: &mut Outbox,
    ) {
        self.drop_counted(reason, out);
        let ip = origin.peer().ip();
        if limiter.cfg.over_limit == crate::config::OverLimit::Reject && limiter.reject.take(ip, ms)
        {
            let ra = format!("Retry-After: {retry_after}");
            let why = if reason == DropReason::AuthFailures {
                "Service Unavailable (too many failed authentications)"
            } else {
                "Service Unavailable (rate limited)"
            };
            self.reply(msg, 503, why, &[ra.as_bytes()], origin.reply_dest(), out);
        }
    }

    /// Whether one more transaction may be held (`routing.max_transactions`):
    /// when the table is full, the finished entry due to end first makes
    /// room ([`Router::end_one_early`]); when none can, the request is
    /// answered 503 and counted.
    pub(super) fn room_for_transaction(
        &self,
        cfg: &Config,
        msg: &Message<'_>,
        back: Dest,
        ms: u64,
        out: &mut Outbox,
    ) -> bool {
        if self.txns.len() + self.forks.len() < cfg.max_transactions || self.end_one_early(ms) {
            return true;
        }
        self.drop_counted(DropReason::TransactionTableFull, out);
        let ra = format!("Retry-After: {}", cfg.retry_after);
        self.reply(
            msg,
            503,
            "Service Unavailable (too many transactions)",
            &[ra.as_bytes()],
            back,
            out,
        );
        false
    }

    /// Our 503 to a new session or a REGISTER while this instance is
    /// drained: the user agent tries the next instance of the pool (RFC
    /// 3263 §4.3) and comes back after `Retry-After` at the earliest.
    fn refuse_drained(&self, cfg: &Config, msg: &Message<'_>, back: Dest, out: &mut Outbox) {
        let ra = format!("Retry-After: {}", cfg.drain_retry_after);
        self.reply(
            msg,
            503,
            "Service Unavailable (draining)",
            &[ra.as_bytes()],
            back,
            out,
        );
    }

    /// A server for a new session, or our refusal (503, or a counted drop)
    /// when there is none. `prefer` is tried first when usable.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new_session_server(
        &self,
        cfg: &Config,
        msg: &Message<'_>,
        pool: &Pool,
        prefer: Option<Arc<Server>>,
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Outbox,
        back: Dest,
    ) -> Option<Arc<Server>> {
        if self.instance_drained() {
            self.refuse_drained(cfg, msg, back, out);
            return None;
        }
        if self.stopping.load(Ordering::Relaxed) {
            let ra = format!("Retry-After: {}", cfg.retry_after);
            self.reply(
                msg,
                503,
                "Service Unavailable (shutting down)",
                &[ra.as_bytes()],
                back,
                out,
            );
            return None;
        }
        if let Some(p) = prefer.filter(|p| self.usable(cfg, p, now)) {
            return Some(p);
        }
        let s = self.select(cfg, pool, &[], now, rng);
        if s.is_none() {
            debug!(call_id = %String::from_utf8_lossy(msg.call_id()), method = %msg.method(), "no server available");
            self.refuse_new_session(cfg, msg, pool, now, out, back);
        }
        s
    }

    /// No server for a new session: our 503, or a counted drop
    /// (`routing.on_no_server`).
    fn refuse_new_session(
        &self,
        cfg: &Config,
        msg: &Message<'_>,
        pool: &Pool,
        now: Now,
        out: &mut Outbox,
        back: Dest,
    ) {
        if cfg.on_no_server == OnNoServer::Drop {
            self.drop_counted(DropReason::NoServer, out);
        } else {
            let ra = format!("Retry-After: {}", self.retry_after(cfg, pool, now));
            self.reply(msg, 503, "Service Unavailable", &[ra.as_bytes()], back, out);
        }
    }

    /// Seconds in the `Retry-After` of our 503 when no server may take a
    /// new session: `routing.retry_after`, or longer when servers said
    /// they are overloaded for longer (until the first of them is back):
    /// the UAs do not come back while every server still refuses.
    fn retry_after(&self, cfg: &Config, pool: &Pool, now: Now) -> u64 {
        let ms = self.ms(now);
        let back = pool
            .servers
            .iter()
            .filter(|s| s.stats.overloaded(ms))
            .map(|s| s.stats.overloaded_until.load(Ordering::Relaxed) - ms)
            .min();
        let configured = u64::from(cfg.retry_after);
        back.map_or(configured, |b| configured.max(b.div_ceil(1000)))
    }

    /// Ends the finished entry due to end first that only absorbs what
    /// crosses its final ([`ClientTxn::may_end_early`]): a call answered at
    /// once keeps its entry T4 (5 s), so 100,000 entries are 5 s of 20,000
    /// calls/s, and without this a full table refused new calls while
    /// nothing was in progress. Its id is remembered 64 × T1 (`ended`) and a
    /// late copy of its request absorbed, as the entry would have. The
    /// candidates: the entries due to end first, then (a table filled within
    /// the last round) the oldest on the round's list of those in progress;
    /// [`EARLY_END_LOOKS`] of each at most, those that must stay set aside
    /// until the next round. Whether one ended.
    fn end_one_early(&self, ms: u64) -> bool {
        let mut kept: SmallVec<[(u64, u64); 4]> = SmallVec::new();
        let mut ended = false;
        for _ in 0..EARLY_END_LOOKS {
            let Some(id) = self.sweep_lock().pop_oldest_end() else {
                break;
            };
            match self.end_early(id, ms) {
                Ok(true) => {
                    ended = true;
                    break;
                }
                Ok(false) => {} // ended already (an entry may be listed twice)
                Err(at) => kept.push((at, id)),
            }
        }
        if !kept.is_empty() {
            let mut sweep = self.sweep_lock();
            // Out of the next searches' way; the round puts them back.
            for (at, id) in kept {
                sweep.hold(at, id);
            }
        }
        if ended {
            return true;
        }
        // Left on the list: the round finds them gone.
        for _ in 0..EARLY_END_LOOKS {
            let Some(id) = self.sweep_lock().next_watched() else {
                break;
            };
            if self.end_early(id, ms) == Ok(true) {
                return true;
            }
        }
        false
    }

    /// Ends entry `id` if it may end early: whether it did, or when it may
    /// go if it may not yet (`Err`).
    fn end_early(&self, id: u64, ms: u64) -> Result<bool, u64> {
        let table = self.txns.pin();
        let Some(t) = table.get(&id).cloned() else {
            return Ok(false);
        };
        let mut g = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !g.may_end_early() {
            return Err(g.expires_ms());
        }
        if table.remove(&id).is_none() {
            return Ok(false);
        }
        g.release_all();
        self.ended.note(id, ms);
        self.stats.txn_ended_early.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The first request of a new session (or its retransmission, or the
    /// same request re-sent with credentials): a client transaction of ours.
    #[allow(clippy::too_many_arguments)]
    fn new_transaction(
        &self,
        cfg: &Config,
        msg: &Message<'_>,
        pool: &Pool,
        route: OurRoute,
        origin: Origin,
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Outbox,
    ) {
        let id = self.txn_id(msg);
        if let Some(t) = self.txns.pin().get(&id).cloned() {
            let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            return self.retransmission(&mut t, id, msg, out);
        }
        let ms = self.ms(now);
        let back = origin.reply_dest();
        if self.ended.refused(id, ms) {
            // A late copy of a request whose entry made room in a full
            // table: absorbed, as the entry would have absorbed it.
            return self.drop_counted(DropReason::Absorbed, out);
        }
        if self.refusals.refused(id, ms) {
            // A copy of a request refused a moment ago: refused again, even
            // if a server could take it now (its UA was told it failed).
            return self.refuse_new_session(cfg, msg, pool, now, out, back);
        }
        if !self.room_for_transaction(cfg, msg, back.clone(), ms, out) {
            return;
        }
        // The server of the session first (a request re-sent with the
        // credentials its challenge asked for), else a draw.
        let prefer = route.target.clone().or_else(|| {
            self.sessions
                .get(msg.call_id(), ms)
                .and_then(|id| pool.by_id(&id).cloned())
        });
        let Some(server) =
            self.new_session_server(cfg, msg, pool, prefer, now, rng, out, back.clone())
        else {
            self.refusals.note(id, ms);
            return;
        };
        let method = msg.method();
        let invite = method == Method::Invite;
        let kind = if txn::creates_dialog(method) {
            Kind::Dialog
        } else {
            Kind::Transaction
        };
        if !self
            .sessions
            .insert(msg.call_id(), server.id.clone(), kind, ms)
        {
            if self.sessions.len() >= cfg.max_sessions {
                self.drop_counted(DropReason::SessionTableFull, out);
            } else {
                self.sessions.reassign(msg.call_id(), server.id.clone(), ms);
            }
        }
        server.stats.selected.fetch_add(1, Ordering::Relaxed);
        debug!(call_id = %String::from_utf8_lossy(msg.call_id()), server = %server.id, method = %method, "selected");

        // The request as processed once (§16.6: our Route popped,
        // Max-Forwards decremented, `received`); every copy comes from it.
        let mut base = Vec::with_capacity(msg.as_bytes().len() + 64);
        self.write_processed(msg, route.pop, origin, &mut base);
        let t = ClientTxn::new(
            invite,
            base,
            back.clone(),
            origin,
            txn::creates_dialog(method),
            route.loop_hash,
            ms,
        );
        let mut t = t;
        t.auth_from = self.credentials_from(msg, origin);
        let t = Arc::new(std::sync::Mutex::new(t));
        let mut guard = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.txns.pin().try_insert(id, t.clone()).is_err() {
            // The same request on another socket a moment before: it has it.
            return self.drop_counted(DropReason::Merged, out);
        }
        self.sweep_lock().watch(id);
        // We hold the transaction now: stop the UA's retransmissions (not
        // for non-INVITE: RFC 4320 §4.1 forbids an early 100) — at once, or
        // only when the server has not answered within `trying_after` (RFC
        // 3261 §17.2.1: nearly every server does, and the 180 or 200 stops
        // them as well; a datagram less per call).
        // The Trying timer, due first, arms the failover timer only if the
        // server has not answered by then.
        let mut defer_failover = false;
        if invite {
            if cfg.trying_after.is_zero() {
                guard.trying_sent = true;
                self.reply(msg, 100, "Trying", &[], back, out);
            } else {
                out.arm(now.at + cfg.trying_after, TimerKey::Trying { txn: id });
                defer_failover = cfg.trying_after < cfg.failover_timeout;
            }
        }
        // The first copy from the request as it came (processed on the way
        // out: the same bytes as from `base`, without parsing `base` again).
        self.start_attempt(
            cfg,
            &mut guard,
            id,
            &server,
            Some((msg, route.pop)),
            defer_failover,
            now,
            out,
        );
    }

    /// The UA's ACK: of our own final (absorbed, also when we answered
    /// without a transaction: our To tag), of a non-2xx final we relayed
    /// (to the server that sent it, by the transaction, every copy), or of
    /// a 2xx (in the dialog: our Route, else the session). With no state at
    /// all (a restart, a full table) a non-2xx ACK goes to every server: the
    /// one that has the transaction takes it, the others ignore it.
    fn ack(
        &self,
        msg: &Message<'_>,
        pool: &Pool,
        route: OurRoute,
        origin: Origin,
        now: Now,
        out: &mut Outbox,
    ) {
        let id = self.txn_id(msg);
        let loop_hash = route.loop_hash;
        if let Some(t) = self.txns.pin().get(&id).cloned() {
            let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match self.ack_of(&mut t, id, now) {
                txn::AckOf::Ours => return,
                txn::AckOf::Server { index, server } => {
                    // The entry stays until it expires (64 × T1 after the
                    // final): if this ACK is lost, the server repeats its
                    // final, the UA its ACK, and that copy needs the
                    // attempt's branch too (without the entry it would go
                    // to the session's server as attempt 0).
                    drop(t);
                    if let Some(s) = pool.by_id(&server) {
                        let branch = Self::branch(id, Leg::Attempt(index), loop_hash);
                        self.forward_to_server(
                            msg,
                            s,
                            Hop::stateless(route.pop),
                            branch,
                            origin,
                            out,
                        );
                    }
                    return;
                }
                txn::AckOf::NotThis => {}
            }
        }
        if msg.tags().1 == Some(&self.to_tag(msg)[..]) {
            // The ACK of a final we sent without a transaction (our 503
            // when no server is available, our answer to a bad request):
            // ours to absorb; no server has that transaction.
            return self.drop_counted(DropReason::Absorbed, out);
        }
        let ms = self.ms(now);
        let target = route.target.clone().or_else(|| {
            self.sessions
                .get(msg.call_id(), ms)
                .and_then(|id| pool.by_id(&id).cloned())
        });
        let branch = Self::branch(id, Leg::Attempt(0), loop_hash);
        match target {
            Some(s) => {
                self.forward_to_server(msg, &s, Hop::stateless(route.pop), branch, origin, out)
            }
            None if route.pop > 0 || msg.routes().next().is_none() => {
                // No state: every server (a 2xx ACK would carry our sb). An
                // amplification of N: limited per source like any request
                // out of dialog (the ACK of our own 503 never gets here).
                if !self.within_limit(msg, Limit::Request, origin, now, out) {
                    return;
                }
                for s in &pool.servers {
                    self.forward_to_server(msg, s, Hop::stateless(route.pop), branch, origin, out);
                }
            }
            None => self.drop_counted(DropReason::StrayAck, out),
        }
    }

    /// The UA's CANCEL (RFC 3261 §16.10): answered 200 here at once; the
    /// INVITE's transaction stops failing over and CANCELs the server that
    /// has it once that server has answered provisionally (§9.1). Without
    /// a transaction it goes to the session's server, else (a restart, a
    /// full table) to every server, each with the INVITE's branch.
    fn cancel(
        &self,
        msg: &Message<'_>,
        pool: &Pool,
        route: OurRoute,
        origin: Origin,
        now: Now,
        out: &mut Outbox,
    ) {
        let back = origin.reply_dest();
        self.reply(msg, 200, "OK", &[], back, out);
        let id = self.txn_id(msg);
        if let Some(t) = self.txns.pin().get(&id).cloned() {
            let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if t.invite {
                return self.cancel_txn(&mut t, id, now, out);
            }
        }
        let ms = self.ms(now);
        let target = route.target.clone().or_else(|| {
            self.sessions
                .get(msg.call_id(), ms)
                .and_then(|id| pool.by_id(&id).cloned())
        });
        let branch = Self::branch(id, Leg::Attempt(0), route.loop_hash);
        match target {
            Some(s) => {
                self.forward_to_server(msg, &s, Hop::stateless(route.pop), branch, origin, out)
            }
            None => {
                for s in &pool.servers {
                    self.forward_to_server(msg, s, Hop::stateless(route.pop), branch, origin, out);
                }
            }
        }
    }

    /// Writes `msg` as processed once for forwarding (our Route popped,
    /// Max-Forwards decremented, `received`/`rport` from `origin`), without
    /// our Via or Record-Route: the base of every copy a transaction sends.
    pub(super) fn write_processed(
        &self,
        msg: &Message<'_>,
        pop_routes: u8,
        origin: Origin,
        out: &mut Vec<u8>,
    ) {
        let peer = origin.peer();
        // Always our own `received` (RFC 3261 §18.2.1, RFC 3581): one the
        // client wrote would aim the responses elsewhere.
        let mut ip = IpText::default();
        ip.set(peer.ip());
        msg.write_edited(
            &Edits {
                remove_routes: pop_routes,
                max_forwards: MaxForwards::Decrement,
                received: Some(Received {
                    received: ip.as_bytes(),
                    rport: peer.port(),
                }),
                ..Edits::default()
            },
            out,
        );
    }

    /// Forwards `msg` to `server` with our Via (`branch`) on top.
    pub(super) fn forward_to_server(
        &self,
        msg: &Message<'_>,
        server: &Server,
        hop: Hop,
        branch: Branch,
        origin: Origin,
        out: &mut Outbox,
    ) {
        let peer = origin.peer();
        let needs_received = hop.fresh;
        let mut ip = IpText::default();
        ip.set(peer.ip());
        let branch = self.seal(branch, &response_hop(msg, origin, hop.fresh));
        let srv_t = server.cfg.transport;
        let mut rr = ViaText::default();
        if hop.record_route {
            let (ua_t, flow) = self.ua_side(msg, origin, false);
            self.record_route(&mut rr, srv_t, ua_t, false, &server.id, msg.call_id(), flow);
        }
        let mut path = ViaText::default();
        if hop.path {
            // The registrar reaches the phone through us, over its flow.
            let (_, flow) = self.ua_side(msg, origin, true);
            let held = matches!(flow, Some((Flow::Conn(_), _)));
            path.0
                .extend_from_slice(self.me.path(srv_t, held).as_bytes());
            if let Some((f, p)) = flow {
                self.keys.write_flow(f, self.me.instance, p, &mut path.0);
            }
            path.0.push(b'>');
        }
        let mut dest = server.dest();
        let mut via_t = srv_t;
        // RFC 3261 §18.1.1: a request too large for the path MTU goes over
        // a congestion-controlled transport (every SIP server has TCP, §18)
        // to the same address; our Record-Route and Path still name our
        // UDP side, which the server's later (small) requests may use.
        let mtu = self.cfg.load().udp_mtu;
        let size = msg.as_bytes().len() + rr.0.len() + path.0.len() + 160;
        if srv_t == Transport::Udp && mtu != 0 && size > mtu {
            via_t = Transport::Tcp;
            dest = Dest::Tcp(server.cfg.address);
            self.stats.udp_to_tcp.fetch_add(1, Ordering::Relaxed);
        }
        let mut via = ViaText::default();
        self.write_via(&mut via.0, via_t, branch, conn_of(origin));
        let stream = dest.reliable();
        out.send_with(dest, |b| {
            msg.write_edited(
                &Edits {
                    prepend_via: Some(&via.0),
                    record_route: hop.record_route.then_some(&rr.0[..]),
                    remove_routes: hop.pop_routes,
                    path: hop.path.then_some(&path.0[..]),
                    max_forwards: if hop.fresh {
                        MaxForwards::Decrement
                    } else {
                        MaxForwards::Keep
                    },
                    received: needs_received.then_some(Received {
                        received: ip.as_bytes(),
                        rport: peer.port(),
                    }),
                    add_content_length: stream,
                    ..Edits::default()
                },
                b,
            );
        });
        server.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether our Path goes on this REGISTER from a user agent.
    pub(super) fn wants_path(&self, cfg: &Config, msg: &Message<'_>) -> bool {
        match cfg.path {
            crate::config::PathMode::Always => true,
            crate::config::PathMode::Off => false,
            crate::config::PathMode::Supported => msg
                .values(HeaderName::Supported)
                .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"path")),
        }
    }

    /// A request from a server to the user agent side. It must come by one
    /// of our tokens (RFC 3261 §16.12 and the edge hardening: a server
    /// reaches only a user agent that a dialog or a registration through
    /// us names): our Record-Route's `sb` bound to this Call-ID, or the
    /// `flow` of our Record-Route or Path. It goes over that flow (RFC 5626
    /// §5.3: 430 Flow Failed when it has closed), else to the next Route
    /// or the Request-URI by its transport (RFC 3263 §4.1). A flow another
    /// instance holds: to that instance ([`super::peer`]) unless `from_peer`
    /// (the request came from one already), else 430.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_outward(
        &self,
        msg: &Message<'_>,
        server: &Server,
        route: &OurRoute,
        origin: Origin,
        from_peer: bool,
        now: Now,
        out: &mut Outbox,
    ) {
        let back = origin.reply_dest();
        if route.target.is_none() && route.flow.is_none() {
            return self.reply(
                msg,
                403,
                "Forbidden (no dialog or registration through this balancer)",
                &[],
                back,
                out,
            );
        }
        let (dest, ua_t, flow) = match route.flow {
            Some(FlowRef::Gone) => {
                return self.reply(msg, 430, "Flow Failed", &[], back, out);
            }
            Some(FlowRef::Elsewhere(holder)) => {
                return self.flow_elsewhere(msg, holder, from_peer, route, origin, now, out);
            }
            Some(FlowRef::Live {
                flow,
                peer,
                transport,
            }) => {
                let dest = match flow {
                    Flow::Conn(id) => Dest::Conn(id),
                    Flow::Udp(a) => Dest::Udp(a),
                };
                (dest, transport, Some((flow, peer)))
            }
            None => {
                let next_route = msg.routes().flatten().nth(usize::from(route.pop));
                let uri =
                    next_route.map_or_else(|| *msg.request_uri().expect("request"), |r| r.uri);
                match uri_dest(&uri) {
                    Ok((dest, t)) => (dest, t, None),
                    Err((code, reason)) => return self.reply(msg, code, reason, &[], back, out),
                }
            }
        };
        let to_tag = msg.tags().1.is_some();
        let record_route = txn::creates_dialog(msg.method()) && !to_tag;
        let branch = Self::branch(self.txn_id(msg), Leg::Attempt(0), route.loop_hash);
        let branch = self.seal(branch, &response_hop(msg, origin, true));
        let mut via = ViaText::default();
        // On a connection the server opened to us, its responses go back
        // down that connection (RFC 3261 §18.2.2): `lbc`, under the MAC.
        self.write_via(&mut via.0, ua_t, branch, conn_of(origin));
        let mut rr = ViaText::default();
        if record_route {
            let srv_t = server.cfg.transport;
            self.record_route(&mut rr, ua_t, srv_t, true, &server.id, msg.call_id(), flow);
        }
        let peer = origin.peer();
        let mut ip = IpText::default();
        ip.set(peer.ip());
        out.send_with(dest.clone(), |b| {
            msg.write_edited(
                &Edits {
                    prepend_via: Some(&via.0),
                    record_route: record_route.then_some(&rr.0[..]),
                    remove_routes: route.pop,
                    max_forwards: MaxForwards::Decrement,
                    received: Some(Received {
                        received: ip.as_bytes(),
                        rport: peer.port(),
                    }),
                    add_content_length: dest.reliable(),
                    ..Edits::default()
                },
                b,
            );
        });
    }
}

/// Where a request to `uri` goes when no flow names the user agent (RFC
/// 3263 §4.1: the `transport` parameter, `sips:`; the port or 5060/5061)
/// and the transport facing it; or the status to answer with.
fn uri_dest(uri: &sip::Uri<'_>) -> Result<(Dest, Transport), (u16, &'static str)> {
    let Some(host) = uri.host else {
        return Err((416, "Unsupported URI Scheme"));
    };
    let transport = uri.param(b"transport").flatten();
    let is = |name: &[u8]| transport.is_some_and(|t| t.eq_ignore_ascii_case(name));
    // RFC 7118 §5.2: a browser's Contact host is a random `.invalid` name.
    let invalid = matches!(host, sip::Host::Name(n)
        if n.len() >= 8 && n[n.len() - 8..].eq_ignore_ascii_case(b".invalid"));
    let t = if is(b"ws") || invalid {
        Transport::Ws
    } else if is(b"wss") {
        Transport::Wss
    } else if uri.scheme == sip::Scheme::Sips || is(b"tls") {
        Transport::Tls
    } else if is(b"tcp") {
        Transport::Tcp
    } else {
        Transport::Udp
    };
    let port = uri
        .port
        .unwrap_or(if t == Transport::Tls { 5061 } else { 5060 });
    match (host.ip(), t) {
        (Some(ip), Transport::Udp) => Ok((Dest::Udp(SocketAddr::new(ip, port)), t)),
        (Some(ip), Transport::Tcp) => Ok((Dest::Tcp(SocketAddr::new(ip, port)), t)),
        (None, Transport::Udp) => match &host {
            sip::Host::Name(n) => Ok((
                Dest::Resolve {
                    host: String::from_utf8_lossy(n).into(),
                    port,
                },
                t,
            )),
            _ => Err((404, "Not Found")),
        },
        // A browser is reached over its WebSocket only (its flow).
        (_, Transport::Ws | Transport::Wss) => Err((
            480,
            "Temporarily Unavailable (no WebSocket flow to the user agent)",
        )),
        // No TLS connection of ours to a user agent without its flow (it
        // would need the phone's certificate checked), nor TCP to a name.
        (_, Transport::Tls) => Err((
            480,
            "Temporarily Unavailable (no TLS flow to the user agent)",
        )),
        (None, Transport::Tcp) => Err((
            480,
            "Temporarily Unavailable (no TCP flow to the user agent)",
        )),
    }
}

impl Hop {
    /// A request forwarded as it came, without Record-Route.
    pub(super) fn stateless(pop_routes: u8) -> Hop {
        Hop {
            pop_routes,
            record_route: false,
            fresh: true,
            path: false,
        }
    }
}

/// Where the responses to a request from `origin` will be relayed, as the
/// response path will compute it from the request as forwarded: its
/// inbound connection, else its top Via with our `received` (and `rport`
/// when asked) — `fresh` — or as the processed copy already carries them.
pub(super) fn response_hop(msg: &Message<'_>, origin: Origin, fresh: bool) -> Dest {
    if let Some(c) = conn_of(origin) {
        return Dest::Conn(c);
    }
    let top = msg.top_via();
    let peer = origin.peer();
    if fresh {
        let port = if top.rport.is_some() {
            peer.port()
        } else {
            top.port.unwrap_or(5060)
        };
        return Dest::Udp(std::net::SocketAddr::new(peer.ip(), port));
    }
    super::response::next_hop(top).unwrap_or(Dest::Udp(peer))
}

/// The inbound connection a request came on, for our Via's `lbc`.
pub(super) fn conn_of(origin: Origin) -> Option<u64> {
    match origin {
        Origin::Conn {
            conn,
            inbound: true,
            ..
        } => Some(conn),
        _ => None,
    }
}

/// Our Via or Record-Route value, on the stack (no allocation per message).
#[derive(Default)]
pub(super) struct ViaText(pub smallvec::SmallVec<[u8; 160]>);

/// An IP address as text, on the stack.
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl Default for IpText {
    fn default() -> Self {
        IpText {
            buf: [0; 48],
            len: 0,
        }
    }
}

impl IpText {
    fn set(&mut self, ip: std::net::IpAddr) {
        use std::io::Write;
        if let std::net::IpAddr::V4(v4) = ip {
            // Dotted quad by hand: `write!` costs ~1,000 instructions here
            // (bench/callgrind-router.sh), three times per call.
            let mut n = 0;
            for (k, o) in v4.octets().into_iter().enumerate() {
                if k > 0 {
                    self.buf[n] = b'.';
                    n += 1;
                }
                if o >= 100 {
                    self.buf[n] = b'0' + o / 100;
                    n += 1;
                }
                if o >= 10 {
                    self.buf[n] = b'0' + (o / 10) % 10;
                    n += 1;
                }
                self.buf[n] = b'0' + o % 10;
                n += 1;
            }
            self.len = n;
            return;
        }
        let mut c = std::io::Cursor::new(&mut self.buf[..]);
        let _ = write!(c, "{ip}");
        self.len = c.position() as usize;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::IpText;

    #[test]
    fn ip_text_writes_what_display_writes() {
        let ips = [
            "0.0.0.0",
            "127.0.0.1",
            "10.9.99.100",
            "255.255.255.255",
            "192.168.1.20",
            "::1",
            "2001:db8::5060",
            "::ffff:1.2.3.4",
        ];
        for s in ips {
            let ip: std::net::IpAddr = s.parse().unwrap();
            let mut t = IpText::default();
            t.set(ip);
            assert_eq!(t.as_bytes(), ip.to_string().as_bytes(), "{s}");
        }
        for a in 0..=255u8 {
            let ip = std::net::IpAddr::from([a, 255 - a, a / 3, a % 7]);
            let mut t = IpText::default();
            t.set(ip);
            assert_eq!(t.as_bytes(), ip.to_string().as_bytes());
        }
    }
}
