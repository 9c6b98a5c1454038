//! The balancer's life as health probes and the service manager see it:
//! `GET /healthz` and `GET /readyz` on the admin listener, and systemd's
//! notify protocol (`Type=notify`: `READY=1`, `RELOADING=1`, `STOPPING=1`,
//! `WATCHDOG=1`; nothing is sent without `NOTIFY_SOCKET`).
//!
//! The admin listener is bound, with the whole admin API, before the
//! balancer waits for its agents' first answers, so `/readyz` can say
//! `503 starting` meanwhile. `/healthz` and `/readyz` pass no guard (no
//! token, no `Host` check: a kubelet or a load balancer probes them by
//! address) and say nothing but the phase.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use perf::server::SharedTable;
use sd_notify::NotifyState;
use serde_json::json;
use tracing::{info, warn};

use crate::router::Router as Core;

/// Where the balancer is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Sockets bound, waiting (bounded) for every agent's first answer.
    Starting = 0,
    /// Serving SIP.
    Ready = 1,
    /// Shutting down: new sessions refused, transactions finishing.
    Stopping = 2,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Stopping => "stopping",
        }
    }
}

/// The phase, and what readiness waits for.
pub struct Lifecycle {
    phase: AtomicU8,
    /// The routing core (for the configuration in force) and the
    /// performance table: while starting, `/readyz` says how many agents
    /// answered.
    router: Arc<Core>,
    table: SharedTable,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("phase", &self.phase())
            .finish_non_exhaustive()
    }
}

/// Sends `states` to the service manager; nothing without `NOTIFY_SOCKET`.
fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

impl Lifecycle {
    /// Starting, for `router` whose agents fill `table`.
    #[must_use]
    pub fn new(router: Arc<Core>, table: SharedTable) -> Arc<Lifecycle> {
        Arc::new(Lifecycle {
            phase: AtomicU8::new(Phase::Starting as u8),
            router,
            table,
        })
    }

    /// The phase now.
    #[must_use]
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Stopping,
        }
    }

    /// The routes of the admin listener: `/healthz` and `/readyz`, outside
    /// the guard of `admin` (the admin API, [`crate::admin::router`]).
    pub fn app(self: &Arc<Self>, admin: axum::Router) -> axum::Router {
        admin.merge(
            axum::Router::new()
                .route("/healthz", get(healthz))
                .route("/readyz", get(readyz))
                .with_state(self.clone()),
        )
    }

    /// The balancer serves SIP: `/readyz` says ready, and the service
    /// manager hears `READY=1`.
    pub fn serving(&self, status: &str) {
        self.phase.store(Phase::Ready as u8, Ordering::Relaxed);
        notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// Runs a reload (`SIGHUP`, `POST /reload`) between `RELOADING=1` (with
    /// `MONOTONIC_USEC`, as systemd 253 and later want) and `READY=1`, a
    /// refused reload included: the running configuration stays.
    ///
    /// # Errors
    /// The reload's, naming the field.
    /// While starting (`POST /reload` before `READY=1`) nothing is said:
    /// a `READY=1` then would end the start early.
    pub fn reload(&self, reload: &dyn Fn() -> Result<(), String>) -> Result<(), String> {
        if self.phase() != Phase::Ready {
            return reload();
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => notify(&[NotifyState::Reloading, now]),
            Err(_) => notify(&[NotifyState::Reloading]),
        }
        let r = reload();
        let status = match &r {
            Ok(()) => "serving SIP; configuration reloaded".to_owned(),
            Err(e) => format!("serving SIP; reload refused: {e}"),
        };
        notify(&[NotifyState::Ready, NotifyState::Status(&status)]);
        r
    }

    /// Shutting down: `/readyz` says `503 stopping` and the service manager
    /// hears `STOPPING=1`.
    pub fn stopping(&self) {
        self.phase.store(Phase::Stopping as u8, Ordering::Relaxed);
        notify(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: finishing transactions"),
        ]);
    }

    /// Pings the service manager's watchdog (`WATCHDOG=1`) every half
    /// `WATCHDOG_USEC` (`WatchdogSec=`) from the runtime, so a stalled
    /// runtime misses them; returns at once when there is no watchdog.
    pub async fn watchdog() {
        let mut usec = 0;
        if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
            return;
        }
        let every = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
        info!(every_ms = every.as_millis() as u64, "systemd watchdog on");
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    }

    /// Why the balancer is not ready, while starting.
    fn waiting(&self) -> String {
        let (answered, agents) =
            crate::forwarding::agents_answered(&self.router.config(), &self.table.load());
        format!("waiting for the agents' first answers: {answered} of {agents}")
    }
}

/// `GET /healthz`: the process answers (200 in every phase).
async fn healthz(State(l): State<Arc<Lifecycle>>) -> Response {
    Json(json!({"alive": true, "phase": l.phase().name()})).into_response()
}

/// `GET /readyz`: 200 while serving SIP; 503 while starting (waiting for
/// the agents), while the whole instance is drained (`POST /drain`: the
/// health check of a VIP or a DNS pool takes it out, its dialogs go on
/// through the others by the `sb` token) and while stopping.
async fn readyz(State(l): State<Arc<Lifecycle>>) -> Response {
    let phase = l.phase();
    match phase {
        Phase::Ready if l.router.instance_drained() => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "ready": false,
                "phase": phase.name(),
                "drained": true,
                "reason": "drained (POST /drain): new sessions refused, dialogs served"
            })),
        )
            .into_response(),
        Phase::Ready => Json(json!({"ready": true, "phase": phase.name()})).into_response(),
        Phase::Starting => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "phase": phase.name(), "reason": l.waiting()})),
        )
            .into_response(),
        Phase::Stopping => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "ready": false,
                "phase": phase.name(),
                "reason": "shutting down: new sessions refused, transactions finishing"
            })),
        )
            .into_response(),
    }
}
