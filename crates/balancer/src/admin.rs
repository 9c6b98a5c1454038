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

use crate::proxy::Proxy;
use crate::query::ScoringPatch;

/// What the admin API needs besides the proxy: how to reload.
#[allow(missing_debug_implementations)]
pub struct AdminState {
    /// The running balancer.
    pub proxy: Arc<Proxy>,
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
        .route("/reload", post(reload))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { "siplb admin: GET /servers, POST /servers/{id}/drain|undrain, GET|PUT /scoring, POST /reload, GET /metrics\n" }))
        .with_state(state)
}

async fn servers(State(s): State<Arc<AdminState>>) -> Json<Vec<crate::proxy::ServerView>> {
    Json(s.proxy.servers_view())
}

fn set_drain(s: &AdminState, id: &str, drained: bool) -> Response {
    if s.proxy.set_drained(id, drained) {
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
    Json(*s.proxy.scoring.get())
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
    match s.proxy.scoring.patch(&patch) {
        Ok(new) => Json(new).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": e.to_string(), "field": e.field})),
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
    let p = &s.proxy;
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
        "# HELP siplb_transactions New-session INVITE transactions held for failover.\n# TYPE siplb_transactions gauge\nsiplb_transactions {}",
        p.transactions()
    );
    let servers = p.servers_view();
    let _ = writeln!(
        o,
        "# HELP siplb_selected_total New sessions sent to each server.\n# TYPE siplb_selected_total counter"
    );
    for v in &servers {
        let _ = writeln!(
            o,
            "siplb_selected_total{{server=\"{}\"}} {}",
            v.id, v.selected_total
        );
    }
    let _ = writeln!(
        o,
        "# HELP siplb_score Performance score of each server.\n# TYPE siplb_score gauge"
    );
    for v in &servers {
        let _ = writeln!(o, "siplb_score{{server=\"{}\"}} {}", v.id, v.score);
    }
    let _ = writeln!(
        o,
        "# HELP siplb_server_up 1 when the server may take new sessions (state up).\n# TYPE siplb_server_up gauge"
    );
    for v in &servers {
        let _ = writeln!(
            o,
            "siplb_server_up{{server=\"{}\",agent=\"{}\"}} {}",
            v.id,
            v.agent_state,
            u8::from(v.state == "up")
        );
    }
    let _ = writeln!(
        o,
        "# HELP siplb_active_calls Dialogs per server in the session table.\n# TYPE siplb_active_calls gauge"
    );
    for v in &servers {
        let _ = writeln!(
            o,
            "siplb_active_calls{{server=\"{}\"}} {}",
            v.id, v.active_calls
        );
    }
    ([("content-type", "text/plain; version=0.0.4")], o)
}
