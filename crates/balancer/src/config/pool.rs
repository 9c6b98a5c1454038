//! `[pool]`: this instance among several balancers that act as one — its
//! number, its drain answer, and the other instances it forwards the
//! requests for their flows to (`peers`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, duration, err};

/// `[pool]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct PoolSection {
    pub(super) instance: Option<u16>,
    pub(super) drain_retry_after: Option<u32>,
    peers: Vec<PeerSection>,
    flow_route: FlowRouteSetting,
    peer_timeout: String,
    peer_probe: String,
    peer_probe_failures: u32,
}

impl Default for PoolSection {
    fn default() -> Self {
        PoolSection {
            instance: None,
            drain_retry_after: None,
            peers: Vec::new(),
            flow_route: FlowRouteSetting::Auto,
            peer_timeout: "2s".into(),
            peer_probe: "1s".into(),
            peer_probe_failures: 2,
        }
    }
}

/// `[[pool.peers]]` / `peers = [{ instance = 2, address = "ip:port" }]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerSection {
    instance: u16,
    address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FlowRouteSetting {
    Auto,
    Instance,
    Pool,
}

/// What the Path and Record-Route of a phone on a connection (TCP, TLS,
/// WebSocket) of ours name (`pool.flow_route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowRoute {
    /// This instance (`sip.advertise`): the servers reach the instance that
    /// holds the connection directly, and no other can.
    Instance,
    /// The pool (`sip.record_route`): any instance gets the servers'
    /// requests and forwards them to the holder (`pool.peers`).
    Pool,
}

/// Another instance of the pool, as `pool.peers` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its `pool.instance`.
    pub instance: u16,
    /// Its SIP address (UDP), where the requests for its flows go.
    pub address: SocketAddr,
}

/// The `[pool]` settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// The other instances.
    pub peers: Vec<PeerConfig>,
    /// What a held flow's Path and Record-Route name.
    pub flow_route: FlowRoute,
    /// A request forwarded to a peer that has had no answer (not even its
    /// `100 Trying`) this long gets `430 Flow Failed`, and the peer is
    /// taken for down.
    pub peer_timeout: Duration,
    /// OPTIONS probe interval of each peer.
    pub peer_probe: Duration,
    /// Unanswered probes in a row that mark a peer down.
    pub peer_probe_failures: u32,
}

impl Default for PoolConfig {
    /// A lone balancer: no peers, a held flow's routes name this instance.
    fn default() -> Self {
        PoolConfig {
            peers: Vec::new(),
            flow_route: FlowRoute::Instance,
            peer_timeout: Duration::from_secs(2),
            peer_probe: Duration::from_secs(1),
            peer_probe_failures: 2,
        }
    }
}

/// Checks `[pool]`'s peer settings against `instance` (ours).
pub(super) fn pool_config(p: &PoolSection) -> Result<PoolConfig, ConfigError> {
    let mut peers: Vec<PeerConfig> = Vec::with_capacity(p.peers.len());
    for (i, peer) in p.peers.iter().enumerate() {
        let field = |f: &str| format!("pool.peers[{i}].{f}");
        let Some(me) = p.instance else {
            return err(
                field("instance"),
                "peers need pool.instance (this instance's own number)",
            );
        };
        if peer.instance == me {
            return err(
                field("instance"),
                format!(
                    "{} is this instance's own number (pool.instance)",
                    peer.instance
                ),
            );
        }
        if peers.iter().any(|q| q.instance == peer.instance) {
            return err(
                field("instance"),
                format!("instance {} is given twice", peer.instance),
            );
        }
        let Ok(address) = peer.address.parse::<SocketAddr>() else {
            return err(
                field("address"),
                format!("'{}' is not ip:port", peer.address),
            );
        };
        if address.ip().is_unspecified() || address.port() == 0 {
            return err(
                field("address"),
                format!("'{address}' is not an address to send to"),
            );
        }
        if peers.iter().any(|q| q.address == address) {
            return err(field("address"), format!("{address} is given twice"));
        }
        peers.push(PeerConfig {
            instance: peer.instance,
            address,
        });
    }
    let flow_route = match p.flow_route {
        FlowRouteSetting::Instance => FlowRoute::Instance,
        FlowRouteSetting::Pool => FlowRoute::Pool,
        FlowRouteSetting::Auto if peers.is_empty() => FlowRoute::Instance,
        FlowRouteSetting::Auto => FlowRoute::Pool,
    };
    let peer_timeout = duration("pool.peer_timeout", &p.peer_timeout)?;
    if peer_timeout < Duration::from_millis(100) {
        return err("pool.peer_timeout", "at least 100ms");
    }
    let peer_probe = duration("pool.peer_probe", &p.peer_probe)?;
    if peer_probe < Duration::from_millis(100) {
        return err("pool.peer_probe", "at least 100ms");
    }
    if p.peer_probe_failures == 0 {
        return err("pool.peer_probe_failures", "at least 1");
    }
    Ok(PoolConfig {
        peers,
        flow_route,
        peer_timeout,
        peer_probe,
        peer_probe_failures: p.peer_probe_failures,
    })
}
