//! The admin API (HTTP on loopback by default): servers, drain, scoring,
//! reload, and Prometheus metrics.
//!
//! Every request passes the guard first: its `Host` must name this listener
//! (DNS rebinding), an `Origin` must match that `Host` (cross-site requests
//! from a browser), and when `admin.token_file` is set, every request but a
//! read (and reads too with `admin.auth_reads`) must carry
//! `Authorization: Bearer <token>`. The settings are read from the
//! configuration in force at each request, so a reload changes them.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Extension, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tracing::info;

use crate::config::AdminConfig;
use crate::query::ScoringPatch;
use crate::router::{Router as Core, ServerView};

/// What the admin API needs besides the routing core: how to reload.
#[allow(missing_debug_implementations)]
pub struct AdminState {
    /// The running balancer's routing core.
    pub router: Arc<Core>,
    /// Re-reads the config file and applies it; the error names the field.
    pub reload: Box<dyn Fn() -> Result<(), String> + Send + Sync>,
}

/// The address a connection came in on (serve the router with
/// `into_make_service_with_connect_info::<LocalAddr>()`): the `Host` check
/// accepts it, which covers a wildcard `admin.listen` and port 0.
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(pub Option<SocketAddr>);

impl Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>> for LocalAddr {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        LocalAddr(stream.io().local_addr().ok())
    }
}

/// Why a request was refused: the `reason` of `siplb_admin_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `Host` does not name this listener (DNS rebinding).
    Host,
    /// `Origin` is not the `Host` (a cross-site request).
    Origin,
    /// No `Authorization: Bearer` where the token is required.
    MissingToken,
    /// A token that is not `admin.token_file`'s.
    BadToken,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::Host,
        Refusal::Origin,
        Refusal::MissingToken,
        Refusal::BadToken,
    ];

    fn name(self) -> &'static str {
        match self {
            Refusal::Host => "host",
            Refusal::Origin => "origin",
            Refusal::MissingToken => "missing_token",
            Refusal::BadToken => "bad_token",
        }
    }
}

/// Refusals counted by reason.
#[derive(Debug, Default)]
struct Refused([AtomicU64; 4]);

impl Refused {
    fn add(&self, r: Refusal) {
        self.0[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, r: Refusal) -> u64 {
        self.0[r as usize].load(Ordering::Relaxed)
    }
}

/// The guard's state: the core (for the settings in force) and the counters.
#[derive(Debug)]
struct Guard {
    core: Arc<Core>,
    refused: Refused,
}

/// The routes, behind the guard (Host, Origin, token).
pub fn router(state: Arc<AdminState>) -> Router {
    let g = Arc::new(Guard {
        core: state.router.clone(),
        refused: Refused::default(),
    });
    Router::new()
        .route("/servers", get(servers))
        .route("/servers/{id}/drain", post(drain))
        .route("/servers/{id}/undrain", post(undrain))
        .route("/drain", get(instance_drain).post(drain_instance))
        .route("/undrain", post(undrain_instance))
        .route("/scoring", get(get_scoring).put(put_scoring))
        .route("/policy", get(get_policy).put(put_policy))
        .route("/reload", post(reload))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { "siplb admin: GET /healthz, GET /readyz, GET /servers, POST /servers/{id}/drain|undrain, GET|POST /drain, POST /undrain, GET|PUT /scoring, GET|PUT /policy, POST /reload, GET /metrics\n" }))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(g.clone(), guard))
        .layer(Extension(g))
}

/// `host[:port]` of a `Host` header, an `Origin` or an `admin.allowed_hosts`
/// entry: the host in lower case (an IPv6 address in brackets) and the port
/// if given. `None` when it is not one (a scheme, a path, a bare IPv6
/// address, a wildcard, user info).
#[must_use]
pub fn parse_authority(s: &str) -> Option<(String, Option<u16>)> {
    let (host, rest) = if let Some(v6) = s.strip_prefix('[') {
        let end = v6.find(']')?;
        v6[..end].parse::<std::net::Ipv6Addr>().ok()?;
        (&s[..end + 2], &v6[end + 1..])
    } else {
        match s.rfind(':') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        }
    };
    let port = match rest {
        "" => None,
        r => {
            let digits = r.strip_prefix(':')?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(digits.parse::<u16>().ok()?)
        }
    };
    let name_ok = host.starts_with('[')
        || (!host.is_empty()
            && !host.starts_with('.')
            && !host.starts_with('-')
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')));
    name_ok.then(|| (host.to_ascii_lowercase(), port))
}

/// `ip` as it is written in a `Host` (IPv6 in brackets).
fn host_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// Whether `Host` (`host`, `port`: 80 when absent) names this listener: its
/// address (the connection's local one, or `admin.listen`), `localhost` on
/// its port, or an `admin.allowed_hosts` entry (a name without a port
/// matches on any port).
fn host_allowed(
    host: &str,
    port: Option<u16>,
    local: Option<SocketAddr>,
    cfg: Option<&AdminConfig>,
) -> bool {
    let port_or_80 = port.unwrap_or(80);
    let ours = local
        .into_iter()
        .chain(cfg.map(|c| c.listen).filter(|a| !a.ip().is_unspecified()));
    for a in ours {
        if port_or_80 == a.port() && (host == "localhost" || host == host_of(a.ip())) {
            return true;
        }
    }
    cfg.is_some_and(|c| {
        c.allowed_hosts.iter().any(|entry| {
            parse_authority(entry)
                .is_some_and(|(h, p)| h == host && p.is_none_or(|p| p == port_or_80))
        })
    })
}

/// Whether an `Origin` (`scheme://host[:port]`) is the `Host`'s.
fn origin_matches(origin: &str, host: &str, port: Option<u16>) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // "null" (sandboxed frames, file:), or garbage
    };
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    let Some((o_host, o_port)) = parse_authority(authority) else {
        return false;
    };
    o_host == host && o_port.unwrap_or(default) == port.unwrap_or(default)
}

/// The token of `Authorization: Bearer <token>`, if that is what it holds.
fn bearer(headers: &HeaderMap) -> Option<Option<&[u8]>> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let token = v
        .split_at_checked(7)
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|(_, t)| t.trim_ascii());
    Some(token)
}

/// One refusal: counted, logged, answered with a JSON error.
fn refuse(g: &Guard, why: Refusal, req: &Request, detail: &str) -> Response {
    g.refused.add(why);
    info!(
        reason = why.name(),
        method = %req.method(),
        path = %req.uri().path(),
        detail,
        "admin request refused"
    );
    let body = Json(json!({"error": detail, "reason": why.name()}));
    match why {
        Refusal::Host | Refusal::Origin => (StatusCode::FORBIDDEN, body).into_response(),
        Refusal::MissingToken => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer realm=\"siplb admin\"")],
            body,
        )
            .into_response(),
        Refusal::BadToken => (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Bearer realm=\"siplb admin\", error=\"invalid_token\"",
            )],
            body,
        )
            .into_response(),
    }
}

/// The checks every request passes: `Host`, `Origin`, then the token.
async fn guard(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    match check(&g, &req) {
        Ok(()) => next.run(req).await,
        Err((why, detail)) => refuse(&g, why, &req, detail),
    }
}

fn check(g: &Guard, req: &Request) -> Result<(), (Refusal, &'static str)> {
    let cfg = g.core.config();
    let cfg = cfg.admin.as_ref();
    let local = req
        .extensions()
        .get::<ConnectInfo<LocalAddr>>()
        .and_then(|c| c.0.0);
    let headers = req.headers();

    // Host: exactly one, naming us (and an absolute-form target must too).
    let mut hosts = headers.get_all(header::HOST).iter();
    let (Some(h), None) = (hosts.next(), hosts.next()) else {
        return Err((Refusal::Host, "exactly one Host header is required"));
    };
    let Some((host, port)) = h.to_str().ok().and_then(parse_authority) else {
        return Err((Refusal::Host, "Host is not host[:port]"));
    };
    if !host_allowed(&host, port, local, cfg) {
        return Err((
            Refusal::Host,
            "Host does not name this admin API (add it to admin.allowed_hosts)",
        ));
    }
    if let Some(a) = req.uri().authority()
        && parse_authority(a.as_str()) != Some((host.clone(), port))
    {
        return Err((
            Refusal::Host,
            "the request target's authority is not the Host",
        ));
    }

    // Origin: a browser's cross-site request.
    let mut origins = headers.get_all(header::ORIGIN).iter();
    match (origins.next(), origins.next()) {
        (None, _) => {}
        (Some(o), None) if o.to_str().is_ok_and(|o| origin_matches(o, &host, port)) => {}
        _ => return Err((Refusal::Origin, "cross-origin requests are refused")),
    }

    // The token: required but for reads (unless admin.auth_reads); a bearer
    // token given where none is required must still be the right one.
    let Some(token) = cfg.and_then(|c| c.token.as_ref()) else {
        return Ok(());
    };
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    let needed = !read || cfg.is_some_and(|c| c.auth_reads);
    match bearer(headers) {
        Some(Some(t)) if token.matches(t) => Ok(()),
        Some(Some(_)) => Err((Refusal::BadToken, "wrong admin token")),
        _ if !needed => Ok(()),
        _ => Err((
            Refusal::MissingToken,
            "this request needs Authorization: Bearer <the token of admin.token_file>",
        )),
    }
}

async fn servers(State(s): State<Arc<AdminState>>) -> Json<Vec<ServerView>> {
    Json(s.router.servers_view(crate::forwarding::now()))
}

fn set_drain(s: &AdminState, id: &str, drained: bool) -> Response {
    if s.router.set_drained(id, drained) {
        Json(json!({"id": id, "drained": drained})).into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no server '{id}'")})),
        )
            .into_response()
    }
}

async fn drain(State(s): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    set_drain(&s, &id, true)
}

async fn undrain(State(s): State<Arc<AdminState>>, Path(id): Path<String>) -> Response {
    set_drain(&s, &id, false)
}

/// This instance's drain state and what it still carries: drained, it is
/// done when `sessions` and `transactions` reach 0 (or the dialogs idle out).
fn instance_state(s: &AdminState) -> Json<serde_json::Value> {
    Json(json!({
        "drained": s.router.instance_drained(),
        "sessions": s.router.sessions.len(),
        "transactions": s.router.transactions() + s.router.forks(),
        "flows": s.router.flows(),
    }))
}

async fn instance_drain(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    instance_state(&s)
}

async fn drain_instance(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    s.router.set_instance_drained(true);
    instance_state(&s)
}

async fn undrain_instance(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    s.router.set_instance_drained(false);
    instance_state(&s)
}

async fn get_scoring(State(s): State<Arc<AdminState>>) -> Json<crate::load::Scoring> {
    Json(*s.router.scoring.get())
}

async fn put_scoring(State(s): State<Arc<AdminState>>, body: axum::body::Bytes) -> Response {
    let patch: ScoringPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    };
    match s.router.scoring.patch(&patch) {
        Ok(new) => Json(new).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": e.to_string(), "field": e.field})),
        )
            .into_response(),
    }
}

async fn get_policy(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(json!({"policy": s.router.policy_name(), "available": crate::policy::NAMES}))
}

/// `PUT /policy` with `{"policy": "p2c"}`.
async fn put_policy(State(s): State<Arc<AdminState>>, body: axum::body::Bytes) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        policy: String,
    }
    let b: Body = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": e.to_string()})),
            )
                .into_response();
        }
    };
    match s.router.set_policy(&b.policy) {
        Ok(()) => Json(json!({"policy": s.router.policy_name()})).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": e, "field": "policy"})),
        )
            .into_response(),
    }
}

async fn reload(State(s): State<Arc<AdminState>>) -> Response {
    match (s.reload)() {
        Ok(()) => Json(json!({"reloaded": true})).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"error": e}))).into_response(),
    }
}

async fn metrics(
    State(s): State<Arc<AdminState>>,
    Extension(g): Extension<Arc<Guard>>,
) -> impl IntoResponse {
    let p = &s.router;
    let mut o = String::with_capacity(16384);
    let _ = writeln!(
        o,
        "# HELP siplb_build_info The running siplb's version (1).\n# TYPE siplb_build_info gauge\nsiplb_build_info{{version=\"{}\",os=\"{}\",arch=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    let _ = writeln!(
        o,
        "# HELP siplb_admin_refused_total Admin API requests refused, by reason (host, origin, missing_token, bad_token).\n# TYPE siplb_admin_refused_total counter"
    );
    for r in Refusal::ALL {
        let _ = writeln!(
            o,
            "siplb_admin_refused_total{{reason=\"{}\"}} {}",
            r.name(),
            g.refused.get(r)
        );
    }
    let _ = writeln!(
        o,
        "# HELP siplb_requests_total SIP requests received, by method.\n# TYPE siplb_requests_total counter"
    );
    for (m, n) in p.stats.requests() {
        let _ = writeln!(o, "siplb_requests_total{{method=\"{m}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP siplb_responses_total SIP responses relayed, by code.\n# TYPE siplb_responses_total counter"
    );
    for (c, n) in p.stats.responses() {
        let _ = writeln!(o, "siplb_responses_total{{code=\"{c}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP siplb_local_responses_total Responses siplb sent itself (refusals), by code.\n# TYPE siplb_local_responses_total counter"
    );
    for (c, n) in p.stats.refusals() {
        let _ = writeln!(o, "siplb_local_responses_total{{code=\"{c}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP siplb_drops_total Messages dropped without an answer, by reason.\n# TYPE siplb_drops_total counter"
    );
    for (r, n) in p.stats.drops() {
        let _ = writeln!(o, "siplb_drops_total{{reason=\"{r}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP siplb_rate_limited_total Requests over a per-source limit ([limits]), by limit (new_session, register, request); each is also a drop, reason rate_limited.\n# TYPE siplb_rate_limited_total counter"
    );
    for (l, n) in p.stats.limited_counts() {
        let _ = writeln!(o, "siplb_rate_limited_total{{limit=\"{l}\"}} {n}");
    }
    let cap = &p.stats.capture;
    let _ = writeln!(
        o,
        "# HELP siplb_capture_sent_total SIP messages sent to the HEP collector ([capture]).\n# TYPE siplb_capture_sent_total counter\nsiplb_capture_sent_total {}",
        cap.sent.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP siplb_capture_dropped_total SIP messages not captured, by reason (queue_full: capture.queue was full; send_failed: the socket refused the packet, e.g. the collector is down; too_large: over 64 KiB).\n# TYPE siplb_capture_dropped_total counter"
    );
    for (r, n) in cap.dropped() {
        let _ = writeln!(o, "siplb_capture_dropped_total{{reason=\"{r}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "# HELP siplb_draining 1 while this instance is drained (POST /drain): new sessions and REGISTERs get 503.\n# TYPE siplb_draining gauge\nsiplb_draining {}",
        u8::from(p.instance_drained())
    );
    let _ = writeln!(
        o,
        "# HELP siplb_connections Inbound stream connections open.\n# TYPE siplb_connections gauge\nsiplb_connections {}",
        p.stats
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP siplb_flows User agents' connections open as flows (RFC 5626).\n# TYPE siplb_flows gauge\nsiplb_flows {}\n# HELP siplb_udp_to_tcp_total Requests to UDP servers sent over TCP for their size (sip.udp_mtu).\n# TYPE siplb_udp_to_tcp_total counter\nsiplb_udp_to_tcp_total {}\n# HELP siplb_udp_source_fallback_total Datagrams to phones sent from this instance's own address because the pool's address (sip.record_route, a virtual IP) had left this host.\n# TYPE siplb_udp_source_fallback_total counter\nsiplb_udp_source_fallback_total {}\n# HELP siplb_flow_elsewhere_total Requests for a flow another instance of the pool holds, answered 430 Flow Failed.\n# TYPE siplb_flow_elsewhere_total counter\nsiplb_flow_elsewhere_total {}",
        p.flows(),
        p.stats
            .udp_to_tcp
            .load(std::sync::atomic::Ordering::Relaxed),
        p.stats
            .udp_source_fallback
            .load(std::sync::atomic::Ordering::Relaxed),
        p.stats
            .flow_elsewhere
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP siplb_flow_forwarded_total Requests for a flow a pool peer holds, forwarded to it (pool.peers).\n# TYPE siplb_flow_forwarded_total counter\nsiplb_flow_forwarded_total {}\n# HELP siplb_flow_owner_down_total Requests for a flow a pool peer holds answered 430 Flow Failed: the peer known down, or silent for pool.peer_timeout.\n# TYPE siplb_flow_owner_down_total counter\nsiplb_flow_owner_down_total {}\n# HELP siplb_peer_up 1 while a pool peer answers (its probes, the requests forwarded to it).\n# TYPE siplb_peer_up gauge",
        p.stats
            .flow_forwarded
            .load(std::sync::atomic::Ordering::Relaxed),
        p.stats
            .flow_owner_down
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    for peer in p.peers() {
        let _ = writeln!(
            o,
            "siplb_peer_up{{instance=\"{}\",address=\"{}\"}} {}",
            peer.instance,
            peer.address,
            u8::from(peer.up)
        );
    }
    for kind in ["refused", "closed"] {
        let _ = writeln!(
            o,
            "# HELP siplb_connections_{kind}_total Inbound connections {kind} by siplb, by the limit that did it.\n# TYPE siplb_connections_{kind}_total counter"
        );
        for (k, r, n) in p.stats.conn_events() {
            if k == kind {
                let _ = writeln!(o, "siplb_connections_{kind}_total{{reason=\"{r}\"}} {n}");
            }
        }
    }
    let _ = writeln!(
        o,
        "# HELP siplb_sessions Sessions in the session table.\n# TYPE siplb_sessions gauge\nsiplb_sessions {}",
        p.sessions.len()
    );
    let _ = writeln!(
        o,
        "# HELP siplb_transactions Client transactions of new sessions held for failover.\n# TYPE siplb_transactions gauge\nsiplb_transactions {}\n# HELP siplb_transactions_ended_early_total Entries of finished transactions (kept only to absorb retransmissions) ended before their time to make room in a full table (routing.max_transactions).\n# TYPE siplb_transactions_ended_early_total counter\nsiplb_transactions_ended_early_total {}",
        p.transactions(),
        p.stats
            .txn_ended_early
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    let servers = p.servers_view(crate::forwarding::now());
    type Per = fn(&ServerView) -> Option<f64>;
    type HistOf = fn(&crate::stats::ServerStats) -> &crate::stats::Histogram;
    let _ = writeln!(
        o,
        "# HELP siplb_policy The routing policy in force (1).\n# TYPE siplb_policy gauge\nsiplb_policy{{name=\"{}\"}} 1",
        p.policy_name()
    );
    let per_server: [(&str, &str, &str, Per); 18] = [
        (
            "siplb_server_cpu_ratio",
            "gauge",
            "CPU busy fraction (0-1, all cores) of each server's latest agent sample.",
            |v| v.cpu,
        ),
        (
            "siplb_server_memory_available_bytes",
            "gauge",
            "Available memory of each server's latest agent sample.",
            |v| v.mem_available.map(|m| m as f64),
        ),
        (
            "siplb_server_sample_age_seconds",
            "gauge",
            "Age of each server's latest agent sample.",
            |v| v.sample_age_ms.map(|ms| ms as f64 / 1e3),
        ),
        (
            "siplb_selected_total",
            "counter",
            "New sessions sent to each server.",
            |v| Some(v.selected_total as f64),
        ),
        (
            "siplb_score",
            "gauge",
            "Performance score of each server.",
            |v| Some(f64::from(v.score)),
        ),
        (
            "siplb_server_up",
            "gauge",
            "1 when the server may take new sessions (state up).",
            |v| Some(f64::from(u8::from(v.state == "up"))),
        ),
        (
            "siplb_active_calls",
            "gauge",
            "Dialogs per server in the session table.",
            |v| Some(v.active_calls as f64),
        ),
        (
            "siplb_outstanding",
            "gauge",
            "Requests sent to each server and not yet answered.",
            |v| Some(f64::from(v.outstanding)),
        ),
        (
            "siplb_failovers_total",
            "counter",
            "New sessions moved away from each server after it failed them.",
            |v| Some(v.failovers_total as f64),
        ),
        (
            "siplb_last_attempt_waits_total",
            "counter",
            "New INVITEs each server left unanswered past failover_timeout with no other server to take them (kept waiting).",
            |v| Some(v.last_waits_total as f64),
        ),
        (
            "siplb_failure_ratio",
            "gauge",
            "Failed new-session attempts / attempts over the failure window.",
            |v| Some(v.failure_ratio),
        ),
        (
            "siplb_ejected",
            "gauge",
            "1 while the server is ejected by outlier detection.",
            |v| Some(f64::from(u8::from(v.ejected))),
        ),
        (
            "siplb_ejections_total",
            "counter",
            "Outlier ejections of each server.",
            |v| Some(v.ejections_total as f64),
        ),
        (
            "siplb_overloaded",
            "gauge",
            "1 while the server is out of new-session selection after its own 503 with Retry-After.",
            |v| Some(f64::from(u8::from(v.overloaded))),
        ),
        (
            "siplb_overloads_total",
            "counter",
            "Overload periods of each server (a 503 with Retry-After while not overloaded).",
            |v| Some(v.overloads_total as f64),
        ),
        (
            "siplb_weight_factor",
            "gauge",
            "Slow start factor of each server's weight (1: full).",
            |v| Some(v.weight_factor),
        ),
        (
            "siplb_capacity",
            "gauge",
            "Capacity the policies use, sessions/s (configured, learned or the mean).",
            |v| Some(v.capacity),
        ),
        (
            "siplb_probe_up",
            "gauge",
            "OPTIONS probe verdict (probed servers only): 1 up, 0 down.",
            |v| match v.probe_state.as_str() {
                "up" => Some(1.0),
                "down" => Some(0.0),
                _ => None,
            },
        ),
    ];
    for (name, kind, help, f) in per_server {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for v in &servers {
            if let Some(x) = f(v) {
                let _ = writeln!(o, "{name}{{server=\"{}\"}} {x}", v.id);
            }
        }
    }
    let histograms: [(&str, &str, HistOf); 2] = [
        (
            "siplb_invite_first_response_seconds",
            "A new session's INVITE sent to each server until its first response (100 Trying included), per attempt.",
            |st| &st.invite_first_response,
        ),
        (
            "siplb_invite_final_response_seconds",
            "A new session's INVITE sent to each server until its final response, per attempt.",
            |st| &st.invite_final_response,
        ),
    ];
    let stats = p.server_stats();
    for (name, help, f) in histograms {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (id, st) in &stats {
            let (buckets, count, sum) = f(st).snapshot();
            for (le, n) in buckets {
                let _ = writeln!(o, "{name}_bucket{{server=\"{id}\",le=\"{le}\"}} {n}");
            }
            let _ = writeln!(
                o,
                "{name}_bucket{{server=\"{id}\",le=\"+Inf\"}} {count}\n{name}_sum{{server=\"{id}\"}} {sum}\n{name}_count{{server=\"{id}\"}} {count}"
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP siplb_down_by Which signal says each server is down (agent, probe, outlier, overload).\n# TYPE siplb_down_by gauge"
    );
    for v in &servers {
        for signal in ["agent", "probe", "outlier", "overload"] {
            let on = v
                .down_by
                .as_deref()
                .is_some_and(|d| d.split('+').any(|x| x == signal));
            let _ = writeln!(
                o,
                "siplb_down_by{{server=\"{}\",signal=\"{signal}\"}} {}",
                v.id,
                u8::from(on)
            );
        }
    }
    let sources = p.sources();
    if !sources.is_empty() {
        let _ = writeln!(
            o,
            "# HELP siplb_dns_answers_total DNS answers taken per followed name ([[discover]] id, or the id of a server written host:port).\n# TYPE siplb_dns_answers_total counter"
        );
        for (k, v) in &sources {
            let _ = writeln!(o, "siplb_dns_answers_total{{source=\"{k}\"}} {}", v.answers);
        }
        let _ = writeln!(
            o,
            "# HELP siplb_dns_failures_total Failed resolutions per followed name (its last answer stayed).\n# TYPE siplb_dns_failures_total counter"
        );
        for (k, v) in &sources {
            let _ = writeln!(
                o,
                "siplb_dns_failures_total{{source=\"{k}\"}} {}",
                v.failures
            );
        }
        let _ = writeln!(
            o,
            "# HELP siplb_dns_members Members per followed name: in its last answer (member), or gone from it and draining (retiring).\n# TYPE siplb_dns_members gauge"
        );
        for (k, v) in &sources {
            let retiring = v.members.iter().filter(|m| m.gone_since.is_some()).count();
            let _ = writeln!(
                o,
                "siplb_dns_members{{source=\"{k}\",state=\"member\"}} {}\nsiplb_dns_members{{source=\"{k}\",state=\"retiring\"}} {retiring}",
                v.members.len() - retiring
            );
        }
    }
    ([("content-type", "text/plain; version=0.0.4")], o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(listen: &str, allowed: &[&str]) -> AdminConfig {
        AdminConfig {
            listen: listen.parse().unwrap(),
            token: None,
            auth_reads: false,
            allowed_hosts: allowed.iter().map(|h| (*h).to_owned()).collect(),
        }
    }

    fn allowed(host: &str, local: Option<&str>, cfg: &AdminConfig) -> bool {
        let (h, p) = parse_authority(host).unwrap();
        host_allowed(&h, p, local.map(|l| l.parse().unwrap()), Some(cfg))
    }

    #[test]
    fn authorities() {
        let a = |s: &str| parse_authority(s);
        assert_eq!(a("127.0.0.1:8060"), Some(("127.0.0.1".into(), Some(8060))));
        assert_eq!(a("LocalHost"), Some(("localhost".into(), None)));
        assert_eq!(a("[::1]:8060"), Some(("[::1]".into(), Some(8060))));
        assert_eq!(a("[::1]"), Some(("[::1]".into(), None)));
        for bad in [
            "", ":80", "::1", "[::1", "[zz]:1", "a:", "a:x", "a:65536", "a b", "a/b", "http://a",
            "u@a", "*.a", ".a", "-a", "a:1:2",
        ] {
            assert_eq!(a(bad), None, "{bad}");
        }
    }

    #[test]
    fn hosts_that_name_the_listener() {
        let c = admin("127.0.0.1:8060", &[]);
        assert!(allowed("127.0.0.1:8060", None, &c));
        assert!(allowed("localhost:8060", None, &c));
        assert!(allowed("LOCALHOST:8060", None, &c));
        // DNS rebinding: the attacker's name, resolving to us.
        assert!(!allowed("evil.example:8060", None, &c));
        assert!(!allowed("evil.example", None, &c));
        assert!(!allowed("127.0.0.1:8061", None, &c));
        assert!(!allowed("localhost", None, &c));
        assert!(!allowed("x", None, &c));

        // A wildcard listener: the address the connection came in on.
        let c = admin("0.0.0.0:8060", &["lb1.mgmt.example", "admin.example:443"]);
        assert!(allowed("10.1.2.3:8060", Some("10.1.2.3:8060"), &c));
        assert!(!allowed("10.1.2.4:8060", Some("10.1.2.3:8060"), &c));
        assert!(!allowed("0.0.0.0:8060", None, &c));
        assert!(allowed("lb1.mgmt.example:8060", None, &c));
        assert!(allowed("LB1.mgmt.example", None, &c));
        assert!(allowed("admin.example:443", None, &c));
        assert!(!allowed("admin.example:8060", None, &c));
        assert!(!allowed("admin.example", None, &c));

        let c = admin("[::1]:8060", &[]);
        assert!(allowed("[::1]:8060", None, &c));
        assert!(!allowed("[::2]:8060", None, &c));
        // Port 80: a Host without a port is port 80.
        let c = admin("127.0.0.1:80", &[]);
        assert!(allowed("127.0.0.1", None, &c));
        assert!(allowed("localhost", None, &c));
    }

    #[test]
    fn origins() {
        let h = "127.0.0.1";
        assert!(origin_matches("http://127.0.0.1:8060", h, Some(8060)));
        assert!(origin_matches("HTTP://127.0.0.1:8060", h, Some(8060)));
        assert!(!origin_matches("http://evil.example", h, Some(8060)));
        assert!(!origin_matches("http://evil.example:8060", h, Some(8060)));
        assert!(!origin_matches("http://127.0.0.1:8061", h, Some(8060)));
        assert!(!origin_matches("null", h, Some(8060)));
        assert!(!origin_matches("file://", h, Some(8060)));
        assert!(!origin_matches("ftp://127.0.0.1:8060", h, Some(8060)));
        // Default ports on either side.
        assert!(origin_matches("http://lb.example", "lb.example", None));
        assert!(origin_matches("http://lb.example:80", "lb.example", None));
        assert!(origin_matches(
            "https://lb.example",
            "lb.example",
            Some(443)
        ));
        assert!(origin_matches("https://lb.example", "lb.example", None));
        assert!(!origin_matches(
            "https://lb.example",
            "lb.example",
            Some(80)
        ));
    }

    #[test]
    fn bearer_tokens() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some(Some(&b"abc"[..])));
        h.insert(header::AUTHORIZATION, "bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some(Some(&b"abc"[..])));
        h.insert(header::AUTHORIZATION, "Basic YTpi".parse().unwrap());
        assert_eq!(bearer(&h), Some(None));
        h.insert(header::AUTHORIZATION, "Bear".parse().unwrap());
        assert_eq!(bearer(&h), Some(None));
    }
}
