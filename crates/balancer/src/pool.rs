//! The pool of SIP servers as the running balancer holds it: each server's
//! configuration and its counters, kept by id
//! across reloads.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{ServerConfig, Transport};
use crate::router::outbox::Dest;
use crate::stats::ServerStats;

/// One server of the pool.
#[derive(Debug)]
pub struct Server {
    /// Its configuration.
    pub cfg: ServerConfig,
    /// Its id, shared with the session table.
    pub id: Arc<str>,
    /// Counters, health and drain state (kept across reloads).
    pub stats: Arc<ServerStats>,
    /// Where its entry is expected in the performance table (the order of
    /// the servers with an agent).
    pub slot: usize,
    /// Gone from its name's DNS answer: no new session, its dialogs still
    /// reach it until `dns.retire_after` ([`crate::discover`]).
    pub retiring: bool,
    /// The `[[discover]]` id (or the server id of a `host:port` server)
    /// whose answer gave it; `None` for a server given by address.
    pub source: Option<Arc<str>>,
}

impl Server {
    /// Where requests to it go.
    #[must_use]
    pub fn dest(&self) -> Dest {
        match self.cfg.transport {
            Transport::Udp => Dest::Udp(self.cfg.address),
            Transport::Tcp => Dest::Tcp(self.cfg.address),
            Transport::Tls => Dest::Tls(self.cfg.address),
            // The config refuses WebSocket servers (a transport for browsers).
            Transport::Ws | Transport::Wss => Dest::Tcp(self.cfg.address),
        }
    }
}

/// The servers in configured order.
#[derive(Debug, Default)]
pub struct Pool {
    /// The servers.
    pub servers: Vec<Arc<Server>>,
}

impl Pool {
    /// Builds the pool for `servers`, keeping the counters and drain state of
    /// every id that `old` has; new ids start fresh.
    #[must_use]
    pub fn build(servers: &[ServerConfig], old: &Pool) -> Pool {
        Pool::build_with(servers.iter().map(|c| (c, false, None)), old)
    }

    /// [`Pool::build`] for `(config, retiring, source)` triples; an id
    /// already in the list is skipped.
    #[must_use]
    pub fn build_with<'a>(
        servers: impl Iterator<Item = (&'a ServerConfig, bool, Option<&'a str>)>,
        old: &Pool,
    ) -> Pool {
        let mut slot = 0;
        let mut out: Vec<Arc<Server>> = Vec::new();
        for (c, retiring, source) in servers {
            if out.iter().any(|s| *s.id == *c.id) {
                continue;
            }
            let this_slot = slot;
            slot += usize::from(c.agent.is_some());
            let prev = old.by_id(&c.id);
            out.push(Arc::new(Server {
                id: c.id.as_str().into(),
                stats: prev.map_or_else(Arc::default, |p| p.stats.clone()),
                cfg: c.clone(),
                slot: this_slot,
                retiring,
                source: source.map(Into::into),
            }));
        }
        Pool { servers: out }
    }

    /// The server with this id.
    #[must_use]
    pub fn by_id(&self, id: &str) -> Option<&Arc<Server>> {
        self.servers.iter().find(|s| &*s.id == id)
    }

    /// The server at this SIP address.
    #[must_use]
    pub fn by_addr(&self, a: SocketAddr) -> Option<&Arc<Server>> {
        self.servers.iter().find(|s| s.cfg.address == a)
    }

    /// The server a request from `peer` whose top Via names `sent_by`
    /// comes from: the one at `peer`, else (a connection the server opened
    /// to us from a port of its own, or a datagram from another of its
    /// sockets) the one at `sent_by` when it is on `peer`'s IP address.
    #[must_use]
    pub fn sender(&self, peer: SocketAddr, sent_by: Option<SocketAddr>) -> Option<&Arc<Server>> {
        self.by_addr(peer).or_else(|| {
            let v = sent_by.filter(|v| v.ip() == peer.ip())?;
            self.by_addr(v)
        })
    }
}
