//! The balancer's configuration: a TOML file (docs/configuration.md), parsed
//! from a `&str` and checked into a [`Config`] so tests need no files. Every
//! error names the field.

mod admin;
mod capture;
mod limits;
mod pool;

mod dns;

pub use admin::{AdminConfig, AdminToken, MIN_TOKEN_LEN};
use admin::{AdminSection, admin_config};
pub use capture::{CaptureConfig, CaptureTransport};
use capture::{CaptureSection, capture_config};
pub use dns::{DiscoverConfig, DiscoverKind, DnsConfig, host_port};
pub use limits::{LimitsConfig, OverLimit};
use limits::{LimitsSection, limits_config};
pub use pool::{FlowRoute, PeerConfig, PoolConfig};
use pool::{PoolSection, pool_config};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::load::Scoring;

/// A configuration that cannot be used, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// Dotted path of the field, e.g. `servers[1].address`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// Whether `id` (a server's or a `[[discover]]` entry's) is letters,
/// digits, `-` and `_`, and not empty.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A server's (or a `[[discover]]` entry's) OPTIONS probe fields: the
/// interval (at least 100 ms) when probing is on, and failures/successes of
/// at least 1.
fn probe_fields(
    field: &dyn Fn(&str) -> String,
    probe: Option<&str>,
    failures: u32,
    successes: u32,
) -> Result<Option<Duration>, ConfigError> {
    let probe = match probe {
        Some(p) => {
            let d = duration(&field("probe"), p)?;
            if d < Duration::from_millis(100) {
                return err(field("probe"), "at least 100ms");
            }
            Some(d)
        }
        None => None,
    };
    if failures == 0 || successes == 0 {
        return err(
            field("probe_failures"),
            "probe_failures and probe_successes must be at least 1",
        );
    }
    Ok(probe)
}

/// `host[:port]` of `field`, the port `default_port` when not given.
fn field_host_port(
    field: &str,
    text: &str,
    default_port: u16,
) -> Result<(String, u16), ConfigError> {
    match sip::uri::Uri::parse(format!("sip:{text}").as_bytes()) {
        Ok(u) if u.user.is_none() && u.params.is_empty() && u.headers.is_empty() => {
            let host = u.host.map(|h| h.to_string()).unwrap_or_default();
            if host.is_empty() {
                return err(field, format!("'{text}' is not host[:port]"));
            }
            Ok((host, u.port.unwrap_or(default_port)))
        }
        _ => err(field, format!("'{text}' is not host[:port]")),
    }
}

fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.into(),
        reason: reason.into(),
    })
}

/// SIP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP (RFC 3261 §26.2; inbound on `sip.tls_port`).
    Tls,
    /// WebSocket (RFC 7118; inbound on `sip.ws_port`, user agents only).
    Ws,
    /// Secure WebSocket (inbound on `sip.wss_port`, user agents only).
    Wss,
}

impl Transport {
    /// `UDP`, `TCP` or `TLS`, as in a Via.
    #[must_use]
    pub fn via_name(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
            Transport::Ws => "WS",
            Transport::Wss => "WSS",
        }
    }

    /// WebSocket or secure WebSocket: one SIP message per WebSocket
    /// message (RFC 7118 §5), framed like a datagram.
    #[must_use]
    pub fn is_ws(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }

    /// Whether it is a stream (messages framed by Content-Length).
    #[must_use]
    pub fn is_stream(self) -> bool {
        self != Transport::Udp
    }
}

/// When to add our Path to a REGISTER (RFC 3327).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathMode {
    /// To every REGISTER from a user agent (the registrar then reaches it
    /// through us, over its flow).
    Always,
    /// Only when the REGISTER says `Supported: path`.
    Supported,
    /// Never.
    Off,
}

/// `[sip.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    certificate: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    server_ca: Option<PathBuf>,
}

/// TLS files (`[sip.tls]`), checked at load and re-read on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first: the listener's (required with
    /// `"tls"` in `sip.transports`), and ours towards TLS servers.
    pub certificate: Option<PathBuf>,
    /// PEM private key of `certificate`.
    pub key: Option<PathBuf>,
    /// PEM CA certificates: when given, clients must present a certificate
    /// signed by one of them.
    pub client_ca: Option<PathBuf>,
    /// PEM CA certificates that sign the TLS servers' certificates
    /// (required when a server has `transport = "tls"`).
    pub server_ca: Option<PathBuf>,
}

/// Where REGISTER goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegisterMode {
    /// To every server that is up; responses merged (RFC 3261 §16.7).
    Fork,
    /// To the one server named by `routing.registrar`.
    Registrar,
}

/// What to do with a new session when no server has a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNoServer {
    /// Answer `503 Service Unavailable` with `Retry-After`.
    Reject,
    /// Drop the request silently (FIG 5 step 518).
    Drop,
}

fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([127, 0, 0, 1], 5060))]
}

fn default_transports() -> Vec<Transport> {
    vec![Transport::Udp, Transport::Tcp]
}

/// `[sip]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SipSection {
    listen: Vec<SocketAddr>,
    transports: Vec<Transport>,
    advertise: Option<String>,
    record_route: Option<String>,
    max_message_size: usize,
    udp_sockets: usize,
    freebind: bool,
    max_connections: usize,
    max_connections_per_source: usize,
    idle_timeout: String,
    message_timeout: String,
    tls_port: u16,
    tls: Option<TlsSection>,
    path: PathMode,
    udp_mtu: usize,
    ws_port: u16,
    wss_port: u16,
    ws_path: String,
    ws_origins: Vec<String>,
}

impl Default for SipSection {
    fn default() -> Self {
        SipSection {
            listen: default_listen(),
            transports: default_transports(),
            advertise: None,
            record_route: None,
            max_message_size: sip::DEFAULT_MAX_SIZE,
            udp_sockets: 2,
            freebind: false,
            max_connections: 10_000,
            max_connections_per_source: 256,
            idle_timeout: "300s".into(),
            message_timeout: "10s".into(),
            tls_port: 5061,
            tls: None,
            path: PathMode::Always,
            // Off, as Kamailio's udp_mtu: a server without TCP would lose
            // every large request.
            udp_mtu: 0,
            ws_port: 5066,
            wss_port: 7443,
            ws_path: "/".into(),
            ws_origins: Vec::new(),
        }
    }
}

/// `[routing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RoutingSection {
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    policy: String,
    register: RegisterMode,
    registrar: Option<String>,
    register_timeout: String,
    on_no_server: OnNoServer,
    retry_after: u32,
    max_sessions: usize,
    max_transactions: usize,
    session_idle_timeout: String,
    failover_timeout: String,
    last_attempt_timeout: String,
    invite_timeout: String,
    trying_after: String,
    max_attempts: u8,
    failover_statuses: Vec<u16>,
    retry_after_max: String,
    probe_down_statuses: Vec<u16>,
    health: Health,
    legacy_sb: bool,
    outlier_failures: u32,
    ejection_time: String,
    max_ejection_time: String,
    max_ejected_percent: u8,
    failure_window: String,
    slow_start: String,
    slow_start_floor: f64,
}

impl Default for RoutingSection {
    fn default() -> Self {
        RoutingSection {
            secret: None,
            secret_file: None,
            policy: "adaptive".into(),
            register: RegisterMode::Fork,
            registrar: None,
            register_timeout: "4s".into(),
            on_no_server: OnNoServer::Reject,
            retry_after: 5,
            max_sessions: 100_000,
            max_transactions: 100_000,
            session_idle_timeout: "1h".into(),
            failover_timeout: "500ms".into(),
            last_attempt_timeout: "32s".into(),
            invite_timeout: "181s".into(),
            trying_after: "200ms".into(),
            max_attempts: 3,
            failover_statuses: vec![500, 503],
            retry_after_max: "300s".into(),
            probe_down_statuses: vec![503],
            health: Health::Both,
            legacy_sb: false,
            outlier_failures: 3,
            ejection_time: "10s".into(),
            max_ejection_time: "300s".into(),
            max_ejected_percent: 50,
            failure_window: "10s".into(),
            slow_start: "10s".into(),
            slow_start_floor: 0.1,
        }
    }
}

/// `[perf]`
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PerfSection {
    key_file: Option<PathBuf>,
    poll_interval: String,
    timeout: String,
    stale_after: Option<String>,
    perf_server: Option<String>,
}

impl Default for PerfSection {
    fn default() -> Self {
        PerfSection {
            key_file: None,
            poll_interval: "500ms".into(),
            timeout: "1s".into(),
            stale_after: None,
            perf_server: None,
        }
    }
}

/// `[[servers]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    id: String,
    address: String,
    #[serde(default = "udp")]
    transport: Transport,
    agent: Option<String>,
    capacity: Option<f64>,
    probe: Option<String>,
    #[serde(default = "two")]
    probe_failures: u32,
    #[serde(default = "two")]
    probe_successes: u32,
    tls_name: Option<String>,
}

fn two() -> u32 {
    2
}

/// Which health signals decide that a server is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The agent answers.
    Agent,
    /// SIP OPTIONS probes are answered (servers without `probe` count as up).
    Probe,
    /// Both (a server without `probe` is judged by its agent alone).
    Both,
}

fn udp() -> Transport {
    Transport::Udp
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    sip: SipSection,
    #[serde(default)]
    routing: RoutingSection,
    #[serde(default)]
    perf: PerfSection,
    #[serde(default)]
    scoring: Scoring,
    #[serde(default)]
    admin: AdminSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    capture: CaptureSection,
    #[serde(default)]
    pool: PoolSection,
    #[serde(default)]
    servers: Vec<ServerSection>,
    #[serde(default)]
    dns: dns::DnsSection,
    #[serde(default)]
    discover: Vec<dns::DiscoverSection>,
}

/// One SIP server of the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Stable id (what sessions, Record-Route and counters are keyed by).
    pub id: String,
    /// Where its SIP goes.
    pub address: SocketAddr,
    /// How.
    pub transport: Transport,
    /// Its agent, `host:port` (optional for policies that need no agent data).
    pub agent: Option<String>,
    /// Sessions per second it carries at full CPU, when configured (else learned).
    pub capacity: Option<f64>,
    /// SIP OPTIONS probe interval; `None`: not probed.
    pub probe: Option<Duration>,
    /// Consecutive unanswered probes that mark it down.
    pub probe_failures: u32,
    /// Consecutive answered probes that mark it up again.
    pub probe_successes: u32,
    /// With `transport = "tls"`: the name its certificate must have (else
    /// its IP address).
    pub tls_name: Option<String>,
}

/// The checked runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// SIP listen addresses.
    pub listen: Vec<SocketAddr>,
    /// Transports served on each.
    pub transports: Vec<Transport>,
    /// TLS listens on each listen address at this port.
    pub tls_port: u16,
    /// The TLS listener's certificate (required with `tls`).
    pub tls: Option<TlsConfig>,
    /// When REGISTER gets our Path.
    pub path: PathMode,
    /// A request to a UDP server larger than this goes over TCP to the same
    /// address (RFC 3261 §18.1.1); 0: never.
    pub udp_mtu: usize,
    /// WebSocket on each listen address at this port.
    pub ws_port: u16,
    /// Secure WebSocket on each listen address at this port.
    pub wss_port: u16,
    /// The HTTP path of the WebSocket upgrade.
    pub ws_path: String,
    /// `Origin`s allowed to upgrade (browsers send it); empty: any.
    pub ws_origins: Vec<String>,
    /// `host[:port]` written into our Via and Record-Route.
    pub advertise_host: String,
    /// Port written with it.
    pub advertise_port: u16,
    /// `host` of our Record-Route and Path (`sip.record_route`: the pool's
    /// DNS name or virtual IP; `advertise_host` when not set).
    pub record_route_host: String,
    /// Port written with it (UDP and TCP; TLS and WebSocket keep their
    /// ports); `None` for a DNS name given without a port: none written, so
    /// that the UAs and servers look its SRV records up (RFC 3263 §4.2).
    pub record_route_port: Option<u16>,
    /// This instance's number in its pool (`pool.instance`), written into
    /// the flow tokens of connections it holds; `None`: a lone balancer.
    pub instance: Option<u16>,
    /// Seconds in `Retry-After` of our 503s while this instance is drained
    /// (`pool.drain_retry_after`; `retry_after` when not set).
    pub drain_retry_after: u32,
    /// The other instances of the pool and how requests for their flows
    /// reach them (`pool.peers`, `pool.flow_route`, `pool.peer_*`).
    pub pool: PoolConfig,
    /// Largest message accepted.
    pub max_message_size: usize,
    /// UDP sockets per address (SO_REUSEPORT), for more than one core.
    pub udp_sockets: usize,
    /// Bind the SIP listeners with IP_FREEBIND: an address this host does
    /// not hold yet (a virtual IP on the standby instance).
    pub freebind: bool,
    /// Inbound stream connections at most, in all.
    pub max_connections: usize,
    /// Inbound stream connections at most from one source address.
    pub max_connections_per_source: usize,
    /// An inbound connection with nothing received this long is closed.
    pub idle_timeout: Duration,
    /// A message whose first byte came this long ago and is still not whole
    /// closes its connection (slow senders).
    pub message_timeout: Duration,
    /// Record-Route MAC secret.
    pub secret: Vec<u8>,
    /// Routing policy name.
    pub policy: String,
    /// REGISTER handling.
    pub register: RegisterMode,
    /// The registrar's server id, in registrar mode.
    pub registrar: Option<String>,
    /// How long a REGISTER fork waits for every server.
    pub register_timeout: Duration,
    /// No server for a new session.
    pub on_no_server: OnNoServer,
    /// Seconds in `Retry-After` of a 503.
    pub retry_after: u32,
    /// Session table bound.
    pub max_sessions: usize,
    /// Bound on the transactions we hold (new sessions' first transactions
    /// and REGISTER forks); past it a new one is answered 503.
    pub max_transactions: usize,
    /// A session with no message this long leaves the table.
    pub session_idle_timeout: Duration,
    /// No response to a new INVITE within this: try another server.
    pub failover_timeout: Duration,
    /// A new INVITE's attempt past `failover_timeout` with no other server
    /// to take it keeps waiting for its server's answer until this long
    /// after it was sent (while the server is not known down); then 503.
    pub last_attempt_timeout: Duration,
    /// Timer C: a new INVITE with a provisional response but no final one
    /// this long is CANCELled and answered 408.
    pub invite_timeout: Duration,
    /// Our `100 Trying` to a new INVITE goes only when the server has sent
    /// nothing to relay within this (RFC 3261 §17.2.1); 0: at once.
    pub trying_after: Duration,
    /// Servers tried for one new INVITE, at most.
    pub max_attempts: u8,
    /// Final responses that make us try another server.
    pub failover_statuses: Vec<u16>,
    /// Longest overload period a server's `503` with `Retry-After` takes
    /// it out of new-session selection for; zero: `Retry-After` ignored.
    pub retry_after_max: Duration,
    /// Statuses of an answer to an OPTIONS probe that count as a failed probe.
    pub probe_down_statuses: Vec<u16>,
    /// Which signals decide up/down.
    pub health: Health,
    /// Outlier ejection, failure window and slow start.
    pub outlier: crate::outlier::OutlierConfig,
    /// Agent key.
    pub key: perf::Key,
    /// Agent polling.
    pub poll: perf::client::PollConfig,
    /// Data older than this counts as none.
    pub stale_after: Duration,
    /// A standalone performance server to subscribe to instead of polling agents.
    pub perf_server: Option<String>,
    /// Scoring weights and thresholds.
    pub scoring: Scoring,
    /// Admin API (None: off).
    pub admin: Option<AdminConfig>,
    /// Accept Record-Route tokens of earlier versions (bound to the server
    /// only, not to the dialog) on in-dialog requests: for a rolling upgrade.
    pub legacy_sb: bool,
    /// Per-source limits.
    pub limits: LimitsConfig,
    /// HEPv3 call capture (`[capture]`; None: off). Restart-only.
    pub capture: Option<CaptureConfig>,
    /// The pool (the servers given by address).
    pub servers: Vec<ServerConfig>,
    /// How names are resolved (`[dns]`).
    pub dns: DnsConfig,
    /// Servers found by name: `[[discover]]`, and `[[servers]]` written `host:port`.
    pub discover: Vec<DiscoverConfig>,
}

fn duration(field: &str, s: &str) -> Result<Duration, ConfigError> {
    match perf::collect::parse_duration(s) {
        Some(d) => Ok(d),
        None => err(
            field,
            format!("'{s}' is not a duration like 500ms, 4s or 1m"),
        ),
    }
}

/// Reads a file named in the config; relative paths are relative to the config's folder.
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// Deserializes `text`; an error names the field where serde stopped
/// (`servers[1].address`, or `config` for the syntax) and its line.
fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let line_of = |e: &toml::de::Error| {
        e.span()
            .map(|s| {
                format!(
                    " (line {})",
                    text[..s.start.min(text.len())].lines().count().max(1)
                )
            })
            .unwrap_or_default()
    };
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError {
        field: "config".into(),
        reason: format!("{}{}", e.message(), line_of(&e)),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let e = e.into_inner();
        ConfigError {
            field: if path == "." || path.is_empty() {
                "config".into()
            } else {
                path
            },
            reason: format!("{}{}", e.message(), line_of(&e)),
        }
    })
}

impl Config {
    /// Parses and checks a config; `base` is the folder relative paths start from.
    ///
    /// # Errors
    /// The first problem, naming its field.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let f: FileConfig = from_toml(text)?;
        let s = f.sip;
        if s.listen.is_empty() {
            return err("sip.listen", "at least one address");
        }
        if s.transports.is_empty() {
            return err(
                "sip.transports",
                "at least one of \"udp\", \"tcp\", \"tls\"",
            );
        }
        let needs_cert =
            s.transports.contains(&Transport::Tls) || s.transports.contains(&Transport::Wss);
        let tls = match (&s.tls, needs_cert) {
            (None, true) => {
                return err(
                    "sip.tls",
                    "transports has \"tls\" or \"wss\": give [sip.tls] certificate and key",
                );
            }
            (Some(t), listener) => {
                let r = |p: &Option<PathBuf>| p.as_ref().map(|p| resolve(base, p));
                let t = TlsConfig {
                    certificate: r(&t.certificate),
                    key: r(&t.key),
                    client_ca: r(&t.client_ca),
                    server_ca: r(&t.server_ca),
                };
                if t.certificate.is_some() != t.key.is_some() {
                    return err("sip.tls", "give certificate and key together");
                }
                if listener && t.certificate.is_none() {
                    return err(
                        "sip.tls.certificate",
                        "transports has \"tls\": the listener needs a certificate and key",
                    );
                }
                for (field, p) in [
                    ("sip.tls.certificate", t.certificate.as_ref()),
                    ("sip.tls.key", t.key.as_ref()),
                    ("sip.tls.client_ca", t.client_ca.as_ref()),
                    ("sip.tls.server_ca", t.server_ca.as_ref()),
                ] {
                    if let Some(p) = p
                        && let Err(e) = std::fs::metadata(p)
                    {
                        return err(field, format!("{}: {e}", p.display()));
                    }
                }
                Some(t)
            }
            (None, false) => None,
        };
        if s.udp_mtu != 0 && !(576..=65_000).contains(&s.udp_mtu) {
            return err(
                "sip.udp_mtu",
                "0 (never switch to TCP) or between 576 and 65000",
            );
        }
        if !s.ws_path.starts_with('/') {
            return err(
                "sip.ws_path",
                format!("'{}' is not an absolute path (\"/\", \"/ws\")", s.ws_path),
            );
        }
        // Each stream listener needs a port of its own on the listen
        // addresses.
        let mut ports: Vec<(&str, u16)> =
            s.listen.iter().map(|a| ("sip.listen", a.port())).collect();
        for (on, field, port) in [
            (Transport::Tls, "sip.tls_port", s.tls_port),
            (Transport::Ws, "sip.ws_port", s.ws_port),
            (Transport::Wss, "sip.wss_port", s.wss_port),
        ] {
            if !s.transports.contains(&on) {
                continue;
            }
            if port == 0 {
                return err(field, "a port (1-65535)");
            }
            if let Some((other, _)) = ports.iter().find(|(_, p)| *p == port) {
                return err(field, format!("{port} is also {other}'s port"));
            }
            ports.push((field, port));
        }
        if !(1024..=(1 << 20)).contains(&s.max_message_size) {
            return err("sip.max_message_size", "between 1024 and 1048576");
        }
        if !(1..=64).contains(&s.udp_sockets) {
            return err("sip.udp_sockets", "between 1 and 64");
        }
        if s.max_connections == 0 {
            return err("sip.max_connections", "at least 1");
        }
        if s.max_connections_per_source == 0 {
            return err("sip.max_connections_per_source", "at least 1");
        }
        let idle_timeout = duration("sip.idle_timeout", &s.idle_timeout)?;
        let message_timeout = duration("sip.message_timeout", &s.message_timeout)?;
        if idle_timeout < Duration::from_secs(1) {
            return err("sip.idle_timeout", "at least 1s");
        }
        if message_timeout < Duration::from_millis(100) {
            return err("sip.message_timeout", "at least 100ms");
        }
        let limits = limits_config(&f.limits)?;
        let (advertise_host, advertise_port) = match &s.advertise {
            None => {
                let a = s.listen[0];
                if a.ip().is_unspecified() {
                    return err(
                        "sip.advertise",
                        "required when sip.listen[0] is a wildcard address",
                    );
                }
                let host = match a.ip() {
                    std::net::IpAddr::V4(ip) => ip.to_string(),
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                };
                (host, a.port())
            }
            Some(adv) => field_host_port("sip.advertise", adv, s.listen[0].port())?,
        };
        let (record_route_host, record_route_port) = match &s.record_route {
            None => (advertise_host.clone(), Some(advertise_port)),
            Some(rr) => {
                let (host, port) = field_host_port("sip.record_route", rr, advertise_port)?;
                let is_name = host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_err();
                let explicit = sip::uri::Uri::parse(format!("sip:{rr}").as_bytes())
                    .is_ok_and(|u| u.port.is_some());
                (host, (explicit || !is_name).then_some(port))
            }
        };

        let r = f.routing;
        let secret = match (&r.secret, &r.secret_file) {
            (Some(_), Some(_)) => {
                return err("routing.secret", "give secret or secret_file, not both");
            }
            (Some(s), None) => s.as_bytes().to_vec(),
            (None, Some(p)) => {
                let p = resolve(base, p);
                match std::fs::read(&p) {
                    Ok(b) => b.trim_ascii().to_vec(),
                    Err(e) => return err("routing.secret_file", format!("{}: {e}", p.display())),
                }
            }
            (None, None) => {
                return err(
                    "routing.secret",
                    "required (or routing.secret_file): it signs our Record-Route",
                );
            }
        };
        if secret.len() < 16 {
            return err("routing.secret", "at least 16 bytes");
        }
        if !crate::policy::NAMES.contains(&r.policy.as_str()) {
            return err(
                "routing.policy",
                format!(
                    "'{}' is not one of: {}",
                    r.policy,
                    crate::policy::NAMES.join(", ")
                ),
            );
        }
        if r.max_sessions == 0 {
            return err("routing.max_sessions", "must be at least 1");
        }
        if r.max_transactions == 0 {
            return err("routing.max_transactions", "must be at least 1");
        }
        if !(1..=16).contains(&r.max_attempts) {
            return err("routing.max_attempts", "between 1 and 16");
        }
        if let Some(c) = r
            .failover_statuses
            .iter()
            .find(|c| !(300..700).contains(*c))
        {
            return err(
                "routing.failover_statuses",
                format!("{c} is not a final failure status (300-699)"),
            );
        }
        if let Some(c) = r
            .probe_down_statuses
            .iter()
            .find(|c| !(200..700).contains(*c))
        {
            return err(
                "routing.probe_down_statuses",
                format!("{c} is not a final status (200-699)"),
            );
        }
        let retry_after_max = duration("routing.retry_after_max", &r.retry_after_max)?;
        if retry_after_max > Duration::from_secs(86_400) {
            return err("routing.retry_after_max", "at most 24h");
        }

        let invite_timeout = duration("routing.invite_timeout", &r.invite_timeout)?;
        if invite_timeout < Duration::from_secs(1) {
            return err(
                "routing.invite_timeout",
                "at least 1s (RFC 3261 Timer C: more than 3 minutes)",
            );
        }
        let trying_after = duration("routing.trying_after", &r.trying_after)?;
        let failover_timeout = duration("routing.failover_timeout", &r.failover_timeout)?;
        let last_attempt_timeout =
            duration("routing.last_attempt_timeout", &r.last_attempt_timeout)?;
        if last_attempt_timeout < failover_timeout {
            return err(
                "routing.last_attempt_timeout",
                "at least routing.failover_timeout (equal: no wait past it)",
            );
        }
        if trying_after > Duration::from_millis(200) {
            return err(
                "routing.trying_after",
                "at most 200ms (RFC 3261 §17.2.1; the UA retransmits at 500ms)",
            );
        }
        let outlier = crate::outlier::OutlierConfig {
            consecutive: r.outlier_failures,
            base_ejection: duration("routing.ejection_time", &r.ejection_time)?,
            max_ejection: duration("routing.max_ejection_time", &r.max_ejection_time)?,
            max_ejected_percent: r.max_ejected_percent,
            window: duration("routing.failure_window", &r.failure_window)?,
            slow_start: duration("routing.slow_start", &r.slow_start)?,
            floor: r.slow_start_floor,
        };
        if outlier.consecutive > 0 && outlier.base_ejection.is_zero() {
            return err("routing.ejection_time", "must be more than 0");
        }
        if outlier.max_ejection < outlier.base_ejection {
            return err(
                "routing.max_ejection_time",
                "must be at least routing.ejection_time",
            );
        }
        if outlier.max_ejected_percent > 100 {
            return err("routing.max_ejected_percent", "between 0 and 100");
        }
        if !(1..=60).contains(&outlier.window.as_secs()) {
            return err("routing.failure_window", "between 1s and 60s");
        }
        if !(0.0..=1.0).contains(&outlier.floor) {
            return err("routing.slow_start_floor", "between 0 and 1");
        }

        let p = f.perf;
        let key_path = match &p.key_file {
            Some(k) => resolve(base, k),
            None => return err("perf.key_file", "required: the agents' pre-shared key"),
        };
        let key = perf::Key::from_file(&key_path).map_err(|e| ConfigError {
            field: "perf.key_file".into(),
            reason: e.to_string(),
        })?;
        let poll = perf::client::PollConfig {
            interval: duration("perf.poll_interval", &p.poll_interval)?,
            timeout: duration("perf.timeout", &p.timeout)?,
            ..perf::client::PollConfig::default()
        };
        if poll.interval.is_zero() {
            return err("perf.poll_interval", "must be more than 0");
        }
        if poll.timeout.is_zero() {
            return err("perf.timeout", "must be more than 0");
        }
        let stale_after = match &p.stale_after {
            Some(s) => duration("perf.stale_after", s)?,
            None => poll.interval * 3,
        };

        let admin = admin_config(f.admin, base)?;
        let capture = capture_config(f.capture)?;

        f.scoring.validate().map_err(|e| ConfigError {
            field: format!("scoring.{}", e.field),
            reason: e.reason.into(),
        })?;

        let mut servers = Vec::with_capacity(f.servers.len());
        let mut named: Vec<DiscoverConfig> = Vec::new();
        let mut ids: Vec<String> = Vec::new();
        for (i, sv) in f.servers.iter().enumerate() {
            let field = |name: &str| format!("servers[{i}].{name}");
            if !valid_id(&sv.id) {
                return err(field("id"), "letters, digits, '-' and '_' only, not empty");
            }
            if ids.contains(&sv.id) {
                return err(field("id"), format!("'{}' is used twice", sv.id));
            }
            ids.push(sv.id.clone());
            let (address, name) = match sv.address.parse::<SocketAddr>() {
                Ok(a) => (a, None),
                Err(_) => match host_port(&sv.address) {
                    Some((host, port)) => (
                        SocketAddr::from(([0, 0, 0, 0], port)),
                        Some((host.to_owned(), port)),
                    ),
                    None => {
                        return err(
                            field("address"),
                            format!("'{}' is neither IP:port nor host:port", sv.address),
                        );
                    }
                },
            };
            let agent = sv.agent.clone();
            if agent.is_none() && crate::policy::needs_agents(&r.policy) {
                return err(
                    field("agent"),
                    format!(
                        "required by policy '{}', which scores a server by its agent's data \
                         (round-robin, p2c and static work without agents)",
                        r.policy
                    ),
                );
            }
            if let Some(c) = sv.capacity
                && !(c.is_finite() && c > 0.0)
            {
                return err(field("capacity"), "sessions per second, more than 0");
            }
            if sv.transport.is_ws() {
                return err(
                    field("transport"),
                    "\"ws\"/\"wss\" are for browsers: \"udp\", \"tcp\" or \"tls\" towards servers",
                );
            }
            if sv.transport == Transport::Tls {
                if !s.transports.contains(&Transport::Tls) {
                    return err(
                        field("transport"),
                        "\"tls\" needs \"tls\" in sip.transports too (the server's requests come back to us over TLS)",
                    );
                }
                if tls.as_ref().and_then(|t| t.server_ca.as_ref()).is_none() {
                    return err(
                        field("transport"),
                        "\"tls\" needs sip.tls.server_ca (the CA that signs the servers' certificates)",
                    );
                }
            } else if sv.tls_name.is_some() {
                return err(field("tls_name"), "only with transport = \"tls\"");
            }
            let probe = probe_fields(
                &field,
                sv.probe.as_deref(),
                sv.probe_failures,
                sv.probe_successes,
            )?;
            let server = ServerConfig {
                id: sv.id.clone(),
                address,
                transport: sv.transport,
                agent,
                capacity: sv.capacity,
                probe,
                probe_failures: sv.probe_failures,
                probe_successes: sv.probe_successes,
                tls_name: sv.tls_name.clone(),
            };
            match name {
                None => servers.push(server),
                Some((host, port)) => named.push(DiscoverConfig {
                    source: sv.id.clone(),
                    name: host,
                    kind: DiscoverKind::Server(port),
                    template: server,
                }),
            }
        }
        let dns = dns::dns_config(&f.dns)?;
        let mut discover = named;
        discover.extend(dns::discover_configs(&f.discover, &r.policy, &ids)?);
        if servers.is_empty() && discover.is_empty() {
            return err("servers", "at least one [[servers]] or [[discover]] entry");
        }
        if r.register == RegisterMode::Registrar {
            match &r.registrar {
                Some(id) if ids.contains(id) => {}
                Some(id) => return err("routing.registrar", format!("'{id}' is not a server id")),
                None => {
                    return err(
                        "routing.registrar",
                        "required when routing.register = \"registrar\"",
                    );
                }
            }
        }
        Ok(Config {
            listen: s.listen,
            transports: s.transports,
            tls_port: s.tls_port,
            tls,
            path: s.path,
            udp_mtu: s.udp_mtu,
            ws_port: s.ws_port,
            wss_port: s.wss_port,
            ws_path: s.ws_path,
            ws_origins: s.ws_origins,
            advertise_host,
            advertise_port,
            record_route_host,
            record_route_port,
            instance: f.pool.instance,
            drain_retry_after: f.pool.drain_retry_after.unwrap_or(r.retry_after),
            pool: pool_config(&f.pool)?,
            max_message_size: s.max_message_size,
            udp_sockets: s.udp_sockets,
            freebind: s.freebind,
            max_connections: s.max_connections,
            max_connections_per_source: s.max_connections_per_source,
            idle_timeout,
            message_timeout,
            secret,
            policy: r.policy,
            register: r.register,
            registrar: r.registrar,
            register_timeout: duration("routing.register_timeout", &r.register_timeout)?,
            on_no_server: r.on_no_server,
            retry_after: r.retry_after,
            max_sessions: r.max_sessions,
            max_transactions: r.max_transactions,
            session_idle_timeout: duration(
                "routing.session_idle_timeout",
                &r.session_idle_timeout,
            )?,
            failover_timeout,
            last_attempt_timeout,
            invite_timeout,
            trying_after,
            max_attempts: r.max_attempts,
            failover_statuses: r.failover_statuses,
            retry_after_max,
            probe_down_statuses: r.probe_down_statuses,
            health: r.health,
            legacy_sb: r.legacy_sb,
            outlier,
            key,
            poll,
            stale_after,
            perf_server: p.perf_server,
            scoring: f.scoring,
            admin,
            limits,
            capture,
            servers,
            dns,
            discover,
        })
    }

    /// Reads and checks a config file.
    ///
    /// # Errors
    /// The file cannot be read, or a field is wrong.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: "config".into(),
            reason: format!("{}: {e}", path.display()),
        })?;
        Config::parse(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Reads and checks only the `[admin]` section of a config file (for
    /// `siplb status`, which needs neither the secret nor the agent key).
    ///
    /// # Errors
    /// The file cannot be read or parsed, or an `[admin]` field is wrong.
    pub fn load_admin(path: &Path) -> Result<Option<AdminConfig>, ConfigError> {
        #[derive(Deserialize)]
        struct AdminOnly {
            #[serde(default)]
            admin: AdminSection,
        }
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: "config".into(),
            reason: format!("{}: {e}", path.display()),
        })?;
        let f: AdminOnly = from_toml(&text)?;
        admin_config(f.admin, path.parent().unwrap_or(Path::new(".")))
    }
}

#[cfg(test)]
mod tests;
