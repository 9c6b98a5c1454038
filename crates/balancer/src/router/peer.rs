//! The other instances of the pool (`pool.peers`, issue 17): a server's
//! request for a phone's connection that another instance holds (the flow
//! token names it, [`crate::codec`]) is forwarded to that instance, one
//! proxy hop over UDP (RFC 3261 §16.6: our Via on top, so the response
//! comes back through us and on to the server; Max-Forwards decremented;
//! the Route, with the flow token under the pool's MAC, left for the owner
//! to check and pop). The owner takes such a request from a peer's address
//! as it takes one from a server, answers `100 Trying` to tell us it is
//! alive, and forwards it down the phone's connection; it never forwards it
//! again (no loop between instances: a flow that is not its own gets 430).
//!
//! When the owner is gone the request gets `430 Flow Failed` (RFC 5626
//! §5.3), so the phone's registrar and the server learn the flow is dead
//! and the phone registers again through a live instance: at once when the
//! owner is known down (its OPTIONS probes unanswered, or a forwarded
//! request of the last round unanswered), else when the forwarded request
//! has had no answer within `pool.peer_timeout` ([`TimerKey::PeerForward`]).
//! A final response either way, never silence.
//!
//! Liveness is probed like the servers' ([`super::health`]): an OPTIONS with
//! `Max-Forwards: 0` every `pool.peer_probe`, which any siplb answers itself
//! (a peer with `200`, any other with `483`), so it reaches no server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use sip::{Edits, MaxForwards, Message, Method, Received};
use tracing::{debug, info, warn};

use super::request::{FlowRef, OurRoute, ViaText, conn_of, response_hop};
use super::{Dest, Now, Origin, Outbox, Router, TimerKey};
use crate::codec::{Branch, Leg};
use crate::config::{PeerConfig, Transport};
use crate::pool::Server;

/// One peer as the core follows it.
#[derive(Debug)]
pub(super) struct Peer {
    pub cfg: PeerConfig,
    /// Taken for down: its probes unanswered `pool.peer_probe_failures`
    /// times in a row, or a forwarded request unanswered. Up again at its
    /// next answer.
    down: AtomicBool,
    misses: AtomicU32,
    probe_sent: AtomicU64,
    probe_answered: AtomicU64,
    next_probe: AtomicU64,
}

impl Peer {
    pub(super) fn new(cfg: PeerConfig) -> Peer {
        Peer {
            cfg,
            // Up until it says otherwise: a restart must not refuse the
            // first requests for the other instances' flows.
            down: AtomicBool::new(false),
            misses: AtomicU32::new(0),
            probe_sent: AtomicU64::new(0),
            probe_answered: AtomicU64::new(0),
            next_probe: AtomicU64::new(0),
        }
    }

    fn set_down(&self, down: bool, why: &str) {
        if self.down.swap(down, Ordering::Relaxed) != down {
            if down {
                warn!(peer = self.cfg.instance, address = %self.cfg.address, why, "pool peer down: its flows get 430");
            } else {
                info!(peer = self.cfg.instance, address = %self.cfg.address, "pool peer up");
            }
        }
    }

    /// It answered (a probe, or a request we forwarded).
    fn answered(&self) {
        self.misses.store(0, Ordering::Relaxed);
        self.set_down(false, "");
    }
}

/// A peer as `GET /metrics` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its `pool.instance`.
    pub instance: u16,
    /// Its address.
    pub address: SocketAddr,
    /// Not taken for down.
    pub up: bool,
}

/// A request forwarded to a peer, waiting for its first answer.
#[derive(Debug)]
pub(super) struct Pending {
    instance: u16,
    /// Balancer ms after which it gets 430.
    deadline: u64,
    /// Where it came from, and its bytes (to answer it 430).
    origin: Origin,
    request: Box<[u8]>,
}

impl Router {
    /// The peer with this instance number.
    fn peer(&self, instance: u16) -> Option<&Peer> {
        self.peers.iter().find(|p| p.cfg.instance == instance)
    }

    /// The peer a message from `from` (whose top Via names `sent_by`)
    /// comes from: the one at that address, else (a connection it opened
    /// from a port of its own) the one at `sent_by` on `from`'s IP.
    pub(super) fn peer_sender(
        &self,
        from: SocketAddr,
        sent_by: Option<SocketAddr>,
    ) -> Option<&Peer> {
        self.peers
            .iter()
            .find(|p| p.cfg.address == from)
            .or_else(|| {
                let v = sent_by.filter(|v| v.ip() == from.ip())?;
                self.peers.iter().find(|p| p.cfg.address == v)
            })
    }

    /// The peers and whether each is up.
    #[must_use]
    pub fn peers(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|p| PeerStatus {
                instance: p.cfg.instance,
                address: p.cfg.address,
                up: !p.down.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Forwarded requests waiting for a peer's first answer.
    #[must_use]
    pub fn peer_pending(&self) -> usize {
        self.peer_fwds.len()
    }

    /// A server's request for a flow instance `holder` holds: to that
    /// instance when it is a live peer and the request did not come from a
    /// peer already; else `430 Flow Failed`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flow_elsewhere(
        &self,
        msg: &Message<'_>,
        holder: u16,
        from_peer: bool,
        route: &OurRoute,
        origin: Origin,
        now: Now,
        out: &mut Outbox,
    ) {
        let call_id = String::from_utf8_lossy(msg.call_id());
        let peer = self.peer(holder).filter(|_| !from_peer);
        let Some(peer) = peer else {
            debug!(%call_id, holder, from_peer, "flow held by another instance, no way to it");
            self.stats.flow_elsewhere.fetch_add(1, Ordering::Relaxed);
            return self.refuse_flow(
                msg,
                "Flow Failed (held by another balancer instance)",
                origin,
                out,
            );
        };
        if peer.down.load(Ordering::Relaxed) {
            debug!(%call_id, holder, "flow held by a peer that is down");
            self.stats.flow_owner_down.fetch_add(1, Ordering::Relaxed);
            return self.refuse_flow(
                msg,
                "Flow Failed (its balancer instance is down)",
                origin,
                out,
            );
        }
        self.forward_to_peer(msg, peer, route, origin, now, out);
    }

    /// `430 Flow Failed`, not for an ACK (which has no response).
    fn refuse_flow(&self, msg: &Message<'_>, reason: &str, origin: Origin, out: &mut Outbox) {
        if msg.method() != Method::Ack {
            self.reply(msg, 430, reason, &[], origin.reply_dest(), out);
        }
    }

    /// Forwards a server's request to `peer` as it came (its Route, with
    /// the flow token, kept for the peer), our Via on top.
    fn forward_to_peer(
        &self,
        msg: &Message<'_>,
        peer: &Peer,
        route: &OurRoute,
        origin: Origin,
        now: Now,
        out: &mut Outbox,
    ) {
        let txn = self.txn_id(msg);
        let branch = Branch {
            txn,
            leg: Leg::Attempt(0),
            loop_hash: route.loop_hash,
            mac: None,
        };
        // The answers go back where the server's request came from.
        let branch = self.seal(branch, &response_hop(msg, origin, true));
        // Over UDP, unless too large for it (RFC 3261 §18.1.1): then TCP to
        // the same address, as to a server.
        let mtu = self.cfg.load().udp_mtu;
        let (dest, via_t) = if mtu != 0 && msg.as_bytes().len() + 160 > mtu {
            (Dest::Tcp(peer.cfg.address), Transport::Tcp)
        } else {
            (Dest::Udp(peer.cfg.address), Transport::Udp)
        };
        let mut via = ViaText::default();
        self.write_via(&mut via.0, via_t, branch, conn_of(origin));
        let from = origin.peer();
        let ip = from.ip().to_string();
        let reliable = dest.reliable();
        out.send_with(dest, |b| {
            msg.write_edited(
                &Edits {
                    prepend_via: Some(&via.0),
                    max_forwards: MaxForwards::Decrement,
                    received: Some(Received {
                        received: ip.as_bytes(),
                        rport: from.port(),
                    }),
                    add_content_length: reliable,
                    ..Edits::default()
                },
                b,
            );
        });
        self.stats.flow_forwarded.fetch_add(1, Ordering::Relaxed);
        // An ACK has no answer to wait for; a CANCEL's is absorbed on the
        // way back, and its INVITE waits for the peer anyway.
        if matches!(msg.method(), Method::Ack | Method::Cancel) {
            return;
        }
        let ms = self.ms(now);
        let timeout = self.cfg.load().pool.peer_timeout;
        let fwds = self.peer_fwds.pin();
        // A retransmission keeps the first copy's deadline.
        if fwds.get(&txn).is_none() {
            fwds.insert(
                txn,
                Pending {
                    instance: peer.cfg.instance,
                    deadline: ms + timeout.as_millis() as u64,
                    origin,
                    request: msg.as_bytes().into(),
                },
            );
            out.arm(now.at + timeout, TimerKey::PeerForward { txn });
        }
    }

    /// A request from a peer (`peer_sender`): one a server sent to the
    /// pool for a flow of ours, forwarded by the instance that got it.
    /// Taken as that server's own request, for our flows only.
    pub(super) fn peer_request(
        &self,
        msg: &Message<'_>,
        route: &OurRoute,
        origin: Origin,
        now: Now,
        out: &mut Outbox,
    ) {
        if let Origin::Conn {
            conn,
            inbound: true,
            ..
        } = origin
        {
            // Its answers go back down this connection (our Via's `lbc`).
            self.mark_server_conn(conn);
        }
        // The server is the hop under the peer's Via.
        let pool = self.pool.load();
        let server: Option<std::sync::Arc<Server>> = msg.vias().flatten().nth(1).and_then(|v| {
            let sent_by = v
                .host
                .ip()
                .map(|ip| SocketAddr::new(ip, v.port.unwrap_or(5060)));
            let at = match super::response::next_hop(&v) {
                Some(Dest::Udp(a)) => Some(a),
                _ => sent_by,
            }?;
            pool.sender(at, sent_by).cloned()
        });
        let Some(server) = server else {
            return self.reply(
                msg,
                403,
                "Forbidden (a pool peer's request from no server of the pool)",
                &[],
                origin.reply_dest(),
                out,
            );
        };
        // Alive, and the flow is here: the peer stops waiting (hop by hop, RFC 3261
        // §16.7 step 3: it relays no 100).
        if !matches!(msg.method(), Method::Ack | Method::Cancel)
            && matches!(route.flow, Some(FlowRef::Live { .. }))
        {
            out.send_with(origin.reply_dest(), |b| {
                sip::reply::response_for(msg, 100, "Trying", &[], &[], b);
            });
        }
        self.forward_outward(msg, &server, route, origin, true, now, out);
    }

    /// A response to a request we forwarded to a peer (transaction `txn`):
    /// the peer is alive, its request answered.
    pub(super) fn peer_answered(&self, txn: u64) {
        if self.peers.is_empty() {
            return;
        }
        let fwds = self.peer_fwds.pin();
        if let Some(p) = fwds.remove(&txn)
            && let Some(peer) = self.peer(p.instance)
        {
            peer.answered();
        }
    }

    /// [`TimerKey::PeerForward`]: no answer from the peer in time: 430 to
    /// the server, and the peer is down until it answers again.
    pub(super) fn peer_timer(&self, txn: u64, now: Now, out: &mut Outbox) {
        let ms = self.ms(now);
        let fwds = self.peer_fwds.pin();
        let Some(p) = fwds.get(&txn) else { return };
        if ms < p.deadline {
            return;
        }
        let Some(p) = fwds.remove(&txn) else { return };
        if let Some(peer) = self.peer(p.instance) {
            peer.set_down(true, "a forwarded request unanswered");
            peer.misses
                .store(self.cfg.load().pool.peer_probe_failures, Ordering::Relaxed);
        }
        let transport = match p.origin {
            Origin::Udp { .. } => sip::Transport::Datagram,
            Origin::Conn { .. } => sip::Transport::Stream,
        };
        let Ok(msg) = Message::parse_as(&p.request, transport) else {
            return;
        };
        debug!(call_id = %String::from_utf8_lossy(msg.call_id()), peer = p.instance, "forwarded request unanswered by its peer");
        self.stats.flow_owner_down.fetch_add(1, Ordering::Relaxed);
        self.refuse_flow(
            &msg,
            "Flow Failed (its balancer instance does not answer)",
            p.origin,
            out,
        );
    }

    /// The answer to one of our peer probes, from `from`: whether it was one.
    pub(super) fn peer_probe_answered(&self, from: SocketAddr, branch: &Branch) -> bool {
        let Some(p) = self.peers.iter().find(|p| p.cfg.address == from) else {
            return false;
        };
        if self.sealed_for(branch, &Dest::Udp(p.cfg.address)) {
            p.probe_answered.fetch_max(branch.txn, Ordering::Relaxed);
        }
        true
    }

    /// A peer's probe (OPTIONS, `Max-Forwards: 0`) answered `200`; whether
    /// `msg` was one.
    pub(super) fn answer_peer_probe(
        &self,
        msg: &Message<'_>,
        origin: Origin,
        out: &mut Outbox,
    ) -> bool {
        if msg.method() != Method::Options || self.peers.is_empty() {
            return false;
        }
        let top = msg.top_via();
        let sent_by = top
            .host
            .ip()
            .map(|ip| SocketAddr::new(ip, top.port.unwrap_or(5060)));
        if self.peer_sender(origin.peer(), sent_by).is_none() {
            return false;
        }
        let tag = self.to_tag(msg);
        out.send_with(origin.reply_dest(), |b| {
            sip::reply::response_for(msg, 200, "OK", &tag, &[], b);
        });
        true
    }

    /// One round of peer probing (from [`Router::tick`]): judges the last
    /// probe of each peer that is due, and sends the next.
    pub(super) fn peer_round(&self, now: Now, out: &mut Outbox) {
        if self.peers.is_empty() {
            return;
        }
        let cfg = self.cfg.load();
        let ms = self.ms(now);
        let every = cfg.pool.peer_probe.as_millis() as u64;
        for p in self.peers.iter() {
            let next = p.next_probe.load(Ordering::Relaxed);
            if ms < next
                || p.next_probe
                    .compare_exchange(next, ms + every, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let sent = p.probe_sent.load(Ordering::Relaxed);
            if sent > 0 {
                if p.probe_answered.load(Ordering::Relaxed) >= sent {
                    p.answered();
                } else {
                    let misses = p.misses.fetch_add(1, Ordering::Relaxed) + 1;
                    if misses >= cfg.pool.peer_probe_failures {
                        p.set_down(true, "OPTIONS probes unanswered");
                    }
                }
            }
            let seq = sent + 1;
            p.probe_sent.store(seq, Ordering::Relaxed);
            let branch = Branch {
                txn: seq,
                leg: Leg::Probe,
                loop_hash: 0,
                mac: None,
            };
            let mut b = Vec::with_capacity(48);
            self.seal(branch, &Dest::Udp(p.cfg.address)).write(&mut b);
            let host = format!("{}:{}", self.me.host, self.me.port);
            let probe = format!(
                "OPTIONS sip:{addr} SIP/2.0\r\nVia: SIP/2.0/UDP {host};branch={b}\r\n\
                 Max-Forwards: 0\r\nFrom: <sip:siplb@{host}>;tag=peer-probe\r\nTo: <sip:{addr}>\r\n\
                 Call-ID: peer-probe-{n}-{seq}@{host}\r\nCSeq: {seq} OPTIONS\r\nContent-Length: 0\r\n\r\n",
                addr = p.cfg.address,
                n = p.cfg.instance,
                b = String::from_utf8_lossy(&b),
            );
            out.send(Dest::Udp(p.cfg.address), probe.as_bytes());
        }
    }
}
