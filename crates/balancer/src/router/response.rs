//! Responses (RFC 3261 §16.7): only to a request we forwarded (our Via on
//! top, a branch of ours); to our probes, our fork legs and our client
//! transactions first; then back to the previous hop: the connection the
//! request came on, or the next Via's `received`/`rport`/sent-by.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use rand::RngCore;
use sip::{Message, Method};

use super::txn::{self, TxnVerdict};
use super::{Dest, Now, Origin, Outbox, Router};
use crate::codec::{Branch, Leg};
use crate::config::Config;
use crate::stats::DropReason;

impl Router {
    pub(super) fn response(
        &self,
        cfg: &Config,
        msg: &Message<'_>,
        origin: Origin,
        now: Now,
        rng: &mut dyn RngCore,
        out: &mut Outbox,
    ) {
        let code = msg.status().unwrap_or(0);
        let top = msg.top_via();
        let branch = top.branch.and_then(Branch::parse);
        let Some(branch) = branch.filter(|_| self.is_ours(&top.host, top.port)) else {
            return self.drop_counted(DropReason::ViaNotOurs, out);
        };
        let method = msg.cseq().method;
        // Where it would be relayed, and whether our MAC says it may: a
        // response is relayed only to the hop its request came from.
        let dest = self.response_dest(cfg, msg);
        if matches!(branch.leg, Leg::Attempt(_) | Leg::Fork(_)) && method != Method::Cancel {
            // A response to a request that came on a user agent's
            // connection comes from the server it went to: never from
            // anyone else (a replayed branch must not reach that stream).
            // Down a connection a server opened to us, the answers to its
            // requests come from user agents.
            let from_pool = match origin {
                Origin::Conn { inbound: false, .. } => true,
                Origin::Conn { inbound: true, .. } => false,
                Origin::Udp { peer } => self.pool.load().by_addr(peer).is_some(),
            };
            match &dest {
                Some(Dest::Conn(c)) if !from_pool && !self.is_server_conn(*c) => {
                    return self.drop_counted(DropReason::Forged, out);
                }
                Some(d) if self.sealed_for(&branch, d) => {}
                Some(_) => return self.drop_counted(DropReason::Forged, out),
                None => return self.drop_counted(DropReason::NoRoute, out),
            }
        }
        if let Leg::Attempt(0) = branch.leg {
            // Perhaps the owner of a flow answering a request we forwarded.
            self.peer_answered(branch.txn);
        }
        match branch.leg {
            Leg::Probe => {
                // The answer to one of our OPTIONS probes (from the server
                // it went to, with our MAC): alive, unless its status is
                // one of `probe_down_statuses` (the server says it takes
                // nothing: a failed probe); a 503 with Retry-After starts
                // an overload period too.
                if self.peer_probe_answered(origin.peer(), &branch) {
                    return;
                }
                if let Some(s) = self.pool.load().by_addr(origin.peer())
                    && self.sealed_for(&branch, &Dest::Udp(s.cfg.address))
                {
                    self.note_overload(cfg, s, msg, now);
                    if code >= 200 && cfg.probe_down_statuses.contains(&code) {
                        return;
                    }
                    s.stats
                        .probe_answered
                        .fetch_max(branch.txn, Ordering::Relaxed);
                }
                return;
            }
            // Answers to our own BYE of a 2xx given up (an ACK has none).
            Leg::Local(i) => {
                if method == Method::Bye && code >= 200 {
                    self.own_answered(branch.txn, i, true);
                }
                return self.drop_counted(DropReason::Absorbed, out);
            }
            Leg::Fork(i) => return self.fork_response(branch.txn, i, msg, code, now, out),
            Leg::Attempt(_) => {}
        }
        if method == Method::Cancel {
            // We answered the UA's CANCEL ourselves (§16.10); this answers
            // the CANCEL we sent to the attempt (its retransmissions stop).
            if let Leg::Attempt(i) = branch.leg
                && code >= 200
            {
                self.own_answered(branch.txn, i, false);
            }
            return self.drop_counted(DropReason::Absorbed, out);
        }
        let Leg::Attempt(index) = branch.leg else {
            return;
        };
        let mut status = code;
        if txn::starts_session(method)
            && let Some(t) = self.txns.pin().get(&branch.txn).cloned()
        {
            let mut t = t.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match self.txn_response(cfg, &mut t, branch.txn, index, msg, now, rng, out) {
                TxnVerdict::Done => return,
                TxnVerdict::Relay => status = crate::merge::outgoing_status(code),
            }
        } else if code == 100 {
            // Hop by hop (§16.7 step 3).
            return self.drop_counted(DropReason::Absorbed, out);
        }
        let ms = self.ms(now);
        match (method, code) {
            (Method::Invite, 200..=299) => self.sessions.confirm(msg.call_id(), ms),
            // The ACK of a failed INVITE must still find the server.
            (Method::Invite, 300..) => self.sessions.demote(msg.call_id(), ms),
            (Method::Bye, 200..) => self.sessions.remove(msg.call_id()),
            _ => {}
        }
        if let Some(dest) = dest {
            self.relay(msg, dest, status, out);
            self.stats.response(status);
        }
    }

    /// Where a response goes: down the connection named in our Via, else to
    /// the next Via (RFC 3261 §18.2.2, RFC 3581); never to ourselves.
    fn response_dest(&self, cfg: &Config, msg: &Message<'_>) -> Option<Dest> {
        let dest = match crate::codec::parse_conn(msg.top_via().raw) {
            Some(conn) => Dest::Conn(conn),
            None => next_hop(&msg.vias_below_top().next()?.ok()?)?,
        };
        if let Dest::Udp(a) = dest
            && (cfg.listen.contains(&a) || self.me.ip == Some(a.ip()) && a.port() == self.me.port)
        {
            return None;
        }
        Some(dest)
    }

    /// Sends a response on, our Via removed, with `status` (its own, or
    /// 500 for a 503): down the connection named in our Via, else to the
    /// next Via (RFC 3261 §18.2.2, RFC 3581).
    pub(super) fn relay(&self, msg: &Message<'_>, dest: Dest, status: u16, out: &mut Outbox) {
        let code = msg.status().unwrap_or(0);
        out.send_with(dest, |b| {
            let start = b.len();
            txn::without_top_via(msg, b);
            if status != code {
                crate::merge::set_outgoing_status(&mut b[start..], code);
            }
        });
    }
}

/// Where a response goes after the hop whose Via is `v`: `received` (else
/// the sent-by host), `rport` (else the sent-by port, else 5060).
pub(super) fn next_hop(v: &sip::Via<'_>) -> Option<Dest> {
    let ip = v
        .received
        .and_then(|r| {
            std::str::from_utf8(r)
                .ok()?
                .trim_matches(['[', ']'])
                .parse::<IpAddr>()
                .ok()
        })
        .or_else(|| v.host.ip());
    let port = match v.rport {
        Some(Some(p)) => p,
        _ => v.port.unwrap_or(5060),
    };
    match ip {
        Some(ip) if ip.is_unspecified() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) => {
            None
        }
        Some(ip) => Some(Dest::Udp(SocketAddr::new(ip, port))),
        None => match v.host {
            // A browser's `.invalid` sent-by (RFC 7118 §5.2): its answers
            // go down its WebSocket (our `lbc`), never to a name.
            sip::Host::Name(n)
                if n.len() >= 8 && n[n.len() - 8..].eq_ignore_ascii_case(b".invalid") =>
            {
                None
            }
            sip::Host::Name(n) => Some(Dest::Resolve {
                host: String::from_utf8_lossy(n).into(),
                port,
            }),
            _ => None,
        },
    }
}
