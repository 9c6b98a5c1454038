//! The admin API (HTTP on loopback by default): servers, drain, scoring,
//! reload, and Prometheus metrics.

use std::fmt::Write;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

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

/// The routes.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/servers", get(servers))
        .route("/servers/{id}/drain", post(drain))
        .route("/servers/{id}/undrain", post(undrain))
        .route("/scoring", get(get_scoring).put(put_scoring))
        .route("/policy", get(get_policy).put(put_policy))
        .route("/reload", post(reload))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { "siplb admin: GET /servers, POST /servers/{id}/drain|undrain, GET|PUT /scoring, GET|PUT /policy, POST /reload, GET /metrics\n" }))
        .with_state(state)
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

async fn metrics(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    let p = &s.router;
    let mut o = String::with_capacity(4096);
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
        "# HELP siplb_sessions Sessions in the session table.\n# TYPE siplb_sessions gauge\nsiplb_sessions {}",
        p.sessions.len()
    );
    let _ = writeln!(
        o,
        "# HELP siplb_transactions Client transactions of new sessions held for failover.\n# TYPE siplb_transactions gauge\nsiplb_transactions {}",
        p.transactions()
    );
    let servers = p.servers_view(crate::forwarding::now());
    type Per = fn(&ServerView) -> Option<f64>;
    let _ = writeln!(
        o,
        "# HELP siplb_policy The routing policy in force (1).\n# TYPE siplb_policy gauge\nsiplb_policy{{name=\"{}\"}} 1",
        p.policy_name()
    );
    let per_server: [(&str, &str, &str, Per); 12] = [
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
    let _ = writeln!(
        o,
        "# HELP siplb_down_by Which signal says each server is down (agent, probe, outlier).\n# TYPE siplb_down_by gauge"
    );
    for v in &servers {
        for signal in ["agent", "probe", "outlier"] {
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
    ([("content-type", "text/plain; version=0.0.4")], o)
}
