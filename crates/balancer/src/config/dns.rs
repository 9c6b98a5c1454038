//! `[dns]` and `[[discover]]`: servers found by name (DNS SRV, or every
//! A/AAAA address of a name, as a Kubernetes headless service gives), and
//! `servers[].address` written `host:port`. Only the settings: the shell
//! resolves ([`crate::dns`]), the core takes the members as data
//! ([`crate::discover`]).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::{
    ConfigError, ServerConfig, Transport, duration, err, probe_fields, two, udp, valid_id,
};

/// `[dns]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct DnsSection {
    nameservers: Vec<SocketAddr>,
    min_ttl: String,
    max_ttl: String,
    retire_after: String,
    timeout: String,
}

impl Default for DnsSection {
    fn default() -> Self {
        DnsSection {
            nameservers: Vec::new(),
            min_ttl: "5s".into(),
            max_ttl: "300s".into(),
            retire_after: "1h".into(),
            timeout: "2s".into(),
        }
    }
}

/// How names are resolved and followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers to ask (`ip:port`); empty: those of /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// A name is resolved again after its answer's TTL, at least this...
    pub min_ttl: Duration,
    /// ... and at most this.
    pub max_ttl: Duration,
    /// A member no longer in its name's answer takes no new session but
    /// keeps its dialogs' requests this long, then leaves the pool.
    pub retire_after: Duration,
    /// One query's time limit.
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
            retire_after: Duration::from_secs(3600),
            timeout: Duration::from_secs(2),
        }
    }
}

/// `[[discover]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DiscoverSection {
    id: String,
    name: String,
    port: Option<u16>,
    #[serde(default = "udp")]
    transport: Transport,
    capacity: Option<f64>,
    probe: Option<String>,
    #[serde(default = "two")]
    probe_failures: u32,
    #[serde(default = "two")]
    probe_successes: u32,
}

/// What a name stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoverKind {
    /// A DNS SRV name (`_sip._udp.example.com`): one member per target.
    Srv,
    /// Every A/AAAA address of the name is a member, at this port.
    Addresses(u16),
    /// One `[[servers]]` entry written `host:port`: its first address.
    Server(u16),
}

/// A name whose answer gives servers of the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverConfig {
    /// `discover[].id` (the prefix of its members' ids), or the server's id.
    pub source: String,
    /// The DNS name.
    pub name: String,
    /// SRV, every address, or one server.
    pub kind: DiscoverKind,
    /// What each member is, but for its id and address.
    pub template: ServerConfig,
}

pub(super) fn dns_config(d: &DnsSection) -> Result<DnsConfig, ConfigError> {
    let c = DnsConfig {
        nameservers: d.nameservers.clone(),
        min_ttl: duration("dns.min_ttl", &d.min_ttl)?,
        max_ttl: duration("dns.max_ttl", &d.max_ttl)?,
        retire_after: duration("dns.retire_after", &d.retire_after)?,
        timeout: duration("dns.timeout", &d.timeout)?,
    };
    if c.min_ttl < Duration::from_secs(1) {
        return err("dns.min_ttl", "at least 1s");
    }
    if c.max_ttl < c.min_ttl {
        return err("dns.max_ttl", "must be at least dns.min_ttl");
    }
    if c.timeout.is_zero() || c.timeout > Duration::from_secs(30) {
        return err("dns.timeout", "between 1ms and 30s");
    }
    Ok(c)
}

/// `host:port` split, when `host` is a DNS name (letters, digits, `-`, `.`).
#[must_use]
pub fn host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|&p| p > 0)?;
    let ok = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && valid_label(l));
    ok.then_some((host, port))
}

fn valid_label(l: &str) -> bool {
    l.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

pub(super) fn discover_configs(
    sections: &[DiscoverSection],
    policy: &str,
    taken: &[String],
) -> Result<Vec<DiscoverConfig>, ConfigError> {
    let mut out: Vec<DiscoverConfig> = Vec::new();
    for (i, d) in sections.iter().enumerate() {
        let field = |name: &str| format!("discover[{i}].{name}");
        if !valid_id(&d.id) {
            return err(field("id"), "letters, digits, '-' and '_' only, not empty");
        }
        if taken.contains(&d.id) || out.iter().any(|o| o.source == d.id) {
            return err(field("id"), format!("'{}' is used twice", d.id));
        }
        let name = d.name.trim_end_matches('.');
        if host_port(&format!("{name}:1")).is_none() {
            return err(field("name"), format!("'{}' is not a DNS name", d.name));
        }
        let srv = name.starts_with('_');
        let kind = match (srv, d.port) {
            (true, Some(_)) => {
                return err(
                    field("port"),
                    "not with an SRV name (its records give ports)",
                );
            }
            (true, None) => DiscoverKind::Srv,
            (false, p) => DiscoverKind::Addresses(p.unwrap_or(5060)),
        };
        if crate::policy::needs_agents(policy) {
            return err(
                field("name"),
                format!(
                    "members found by name have no agent: policy '{policy}' needs one \
                     (round-robin, p2c and static work without agents)"
                ),
            );
        }
        if !matches!(d.transport, Transport::Udp | Transport::Tcp) {
            return err(field("transport"), "\"udp\" or \"tcp\"");
        }
        if let Some(c) = d.capacity
            && !(c.is_finite() && c > 0.0)
        {
            return err(field("capacity"), "sessions per second, more than 0");
        }
        let probe = probe_fields(
            &field,
            d.probe.as_deref(),
            d.probe_failures,
            d.probe_successes,
        )?;
        out.push(DiscoverConfig {
            source: d.id.clone(),
            name: name.to_owned(),
            kind,
            template: ServerConfig {
                id: d.id.clone(),
                address: SocketAddr::from(([0, 0, 0, 0], 0)),
                transport: d.transport,
                agent: None,
                capacity: d.capacity,
                probe,
                probe_failures: d.probe_failures,
                probe_successes: d.probe_successes,
                tls_name: None,
            },
        });
    }
    Ok(out)
}
