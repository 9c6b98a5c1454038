//! What the routing core is given and what it asks for: the time, where a
//! message came from, and the [`Outbox`] of sends, timers and drops that the
//! shell performs in order. Plain data: no socket, no clock.

use std::net::SocketAddr;
use std::time::Instant;

use crate::stats::DropReason;

/// The time, as the shell read it once for one input: the monotonic clock
/// for every timer and the wall clock for the agents' window stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time.
    pub at: Instant,
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
}

/// A connection the shell holds (TCP today; TLS and WebSocket later).
pub type ConnId = u64;

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A datagram on one of our UDP sockets.
    Udp {
        /// Its sender.
        peer: SocketAddr,
    },
    /// A message on a stream connection.
    Conn {
        /// The other end.
        peer: SocketAddr,
        /// The shell's id of the connection.
        conn: ConnId,
        /// A connection a user agent opened to us (else one we opened to a server).
        inbound: bool,
    },
}

impl Origin {
    /// The other end's address.
    #[must_use]
    pub fn peer(&self) -> SocketAddr {
        match *self {
            Origin::Udp { peer } | Origin::Conn { peer, .. } => peer,
        }
    }

    /// Where an answer to a request from here goes (RFC 3261 §18.2.2: back
    /// on the connection, or to the datagram's source address and port).
    #[must_use]
    pub fn reply_dest(&self) -> Dest {
        match *self {
            Origin::Udp { peer } => Dest::Udp(peer),
            Origin::Conn { conn, .. } => Dest::Conn(conn),
        }
    }

    /// Whether it came over a reliable transport (no retransmissions).
    #[must_use]
    pub fn reliable(&self) -> bool {
        matches!(self, Origin::Conn { .. })
    }
}

/// Where bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// A datagram to this address, from one of our UDP sockets.
    Udp(SocketAddr),
    /// Down a connection the shell holds; dropped (and counted by the
    /// shell) when it has closed.
    Conn(ConnId),
    /// Over the shell's persistent TCP connection to this address (a
    /// server, or a user agent whose URI says TCP), opened when needed.
    Tcp(SocketAddr),
    /// The same over TLS (a server with `transport = "tls"`).
    Tls(SocketAddr),
    /// A datagram to a host name: the shell resolves it off the socket
    /// task (with a cache) and sends when it knows the address.
    Resolve {
        /// The name.
        host: Box<str>,
        /// The port.
        port: u16,
    },
}

impl Dest {
    /// Whether the transport is reliable (no retransmission needed).
    #[must_use]
    pub fn reliable(&self) -> bool {
        matches!(self, Dest::Conn(_) | Dest::Tcp(_) | Dest::Tls(_))
    }
}

/// A timer the core asked for. When it fires the shell hands the key back
/// ([`crate::router::Router::on_timer`]); a key that no longer means
/// anything is ignored there, so timers are never cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimerKey {
    /// Attempt `attempt` of client transaction `txn` has had no response
    /// within `routing.failover_timeout`.
    Failover {
        /// Transaction id.
        txn: u64,
        /// Attempt index.
        attempt: u8,
    },
    /// Retransmit our own final response of transaction `txn` (RFC 3261
    /// §17.2.1 Timer G), the `n`th time.
    Retransmit {
        /// Transaction id.
        txn: u64,
        /// How many retransmissions came before.
        n: u8,
    },
    /// Retransmit (RFC 3261 §17.1.2.2 Timer E, over UDP) a request of our
    /// own to attempt `attempt` of client transaction `txn`: its CANCEL
    /// (`bye: false`), or the BYE of the 2xx of an attempt given up; the
    /// `n`th time.
    Resend {
        /// Transaction id.
        txn: u64,
        /// Attempt index.
        attempt: u8,
        /// The BYE (else the CANCEL).
        bye: bool,
        /// How many retransmissions came before.
        n: u8,
    },
    /// Our `100 Trying` to new INVITE transaction `txn`, unless something
    /// was relayed to the UA by then (`routing.trying_after`).
    Trying {
        /// Transaction id.
        txn: u64,
    },
    /// A request forwarded to the pool peer that holds its flow has had no
    /// answer within `pool.peer_timeout`: 430 to the server.
    PeerForward {
        /// Our transaction id.
        txn: u64,
    },
    /// A forked REGISTER's `routing.register_timeout`; then (over UDP) the
    /// end of the entry that answers the UA's retransmissions.
    Fork {
        /// Fork id.
        fork: u64,
    },
}

/// One send, its bytes in the outbox's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    /// Where to.
    pub dest: Dest,
    start: usize,
    end: usize,
}

/// Everything one input made the core want done, in order. Reused by the
/// shell from one input to the next, so forwarding allocates nothing once
/// its buffers have grown.
#[derive(Debug, Default)]
pub struct Outbox {
    buf: Vec<u8>,
    sends: Vec<Send>,
    timers: Vec<(Instant, TimerKey)>,
    drops: Vec<DropReason>,
}

impl Outbox {
    /// An empty outbox.
    #[must_use]
    pub fn new() -> Outbox {
        Outbox {
            buf: Vec::with_capacity(8192),
            sends: Vec::with_capacity(8),
            timers: Vec::with_capacity(4),
            drops: Vec::with_capacity(4),
        }
    }

    /// Queues a send whose bytes `write` appends to the buffer it is given.
    pub fn send_with(&mut self, dest: Dest, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        write(&mut self.buf);
        let end = self.buf.len();
        self.sends.push(Send { dest, start, end });
    }

    /// Takes back the last send queued (its writer had nothing to say).
    pub fn cancel_last(&mut self) {
        if let Some(s) = self.sends.pop() {
            self.buf.truncate(s.start);
        }
    }

    /// Queues a send of `bytes`.
    pub fn send(&mut self, dest: Dest, bytes: &[u8]) {
        self.send_with(dest, |b| b.extend_from_slice(bytes));
    }

    /// Asks for a timer.
    pub fn arm(&mut self, at: Instant, key: TimerKey) {
        self.timers.push((at, key));
    }

    /// Records a drop (the core has counted it already).
    pub fn dropped(&mut self, why: DropReason) {
        self.drops.push(why);
    }

    /// The sends, in the order they were queued.
    pub fn sends(&self) -> impl Iterator<Item = (&Dest, &[u8])> + '_ {
        self.sends
            .iter()
            .map(|s| (&s.dest, &self.buf[s.start..s.end]))
    }

    /// The timers asked for.
    #[must_use]
    pub fn timers(&self) -> &[(Instant, TimerKey)] {
        &self.timers
    }

    /// The drops recorded.
    #[must_use]
    pub fn drops(&self) -> &[DropReason] {
        &self.drops
    }

    /// Whether nothing was asked for.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.timers.is_empty() && self.drops.is_empty()
    }

    /// Empties it, keeping its buffers.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.sends.clear();
        self.timers.clear();
        self.drops.clear();
    }
}
