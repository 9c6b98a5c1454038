//! The routing core's view of the pool for the admin API (`GET /servers`,
//! `/metrics`, `siplb status`): each server's state, score, share of the
//! draw, health signals and counters, computed at the time given.

use std::sync::atomic::Ordering;

use super::health::{capacities_of, facts_of, input_of};
use super::{Now, Router};
use crate::config::Health;
use crate::load::Input;
use crate::select::PoolView;

impl Router {
    /// Each server's id and counters (its latency histograms), in pool order.
    #[must_use]
    pub fn server_stats(
        &self,
    ) -> Vec<(
        std::sync::Arc<str>,
        std::sync::Arc<crate::stats::ServerStats>,
    )> {
        self.pool
            .load()
            .servers
            .iter()
            .map(|s| (s.id.clone(), s.stats.clone()))
            .collect()
    }

    /// Servers with per-server facts, for the admin API.
    #[must_use]
    pub fn servers_view(&self, now: Now) -> Vec<ServerView> {
        let cfg = self.cfg.load();
        let pool = self.pool.load();
        let table = self.table.load();
        let now_ms = self.ms(now);
        let per = self.sessions.per_server();
        let inputs: Vec<Input> = pool
            .servers
            .iter()
            .map(|s| input_of(&table, s, now.at, now_ms, &cfg))
            .collect();
        let scoring = self.scoring.get();
        let mut scores = vec![0u32; inputs.len()];
        crate::load::scores(&scoring, &inputs, &mut scores);
        let caps = capacities_of(&pool);
        let facts = facts_of(&cfg, &pool, &table, now_ms, now.wall_ms);
        let mut weights = vec![0.0; inputs.len()];
        let weighted = self.policy.load().weights(
            &PoolView {
                inputs: &inputs,
                facts: &facts,
                scoring: &scoring,
            },
            &mut weights,
        );
        let total: f64 = weights.iter().sum();
        pool.servers
            .iter()
            .zip(inputs.iter().zip(&scores))
            .enumerate()
            .map(|(k, (s, (input, &score)))| {
                let e = table.get_at(s.slot, &s.id);
                ServerView {
                    id: s.id.to_string(),
                    address: s.cfg.address.to_string(),
                    transport: s.cfg.transport.via_name().to_ascii_lowercase(),
                    agent: s.cfg.agent.clone(),
                    source: s.source.as_deref().map(str::to_owned),
                    state: match input {
                        Input::Drained if s.retiring => "retiring",
                        Input::Drained => "drained",
                        Input::Up(_) => "up",
                        // No agent by design (round-robin, p2c, static):
                        // judged by probes and failures, which said up.
                        Input::NoData if s.cfg.agent.is_none() => "up",
                        Input::Down | Input::NoData => "down",
                    }
                    .into(),
                    agent_state: if s.cfg.agent.is_none() {
                        "none"
                    } else {
                        e.map_or("connecting", |e| match e.state {
                            perf::AgentState::Up => "up",
                            perf::AgentState::Down => "down",
                            perf::AgentState::Connecting => "connecting",
                        })
                    }
                    .into(),
                    score,
                    cpu: e.and_then(|e| e.sample).map(|x| x.cpu),
                    mem_available: e.and_then(|e| e.sample).map(|x| x.mem_available),
                    sample_age_ms: e.and_then(|e| e.received).map(|r| {
                        tokio::time::Instant::from_std(now.at)
                            .saturating_duration_since(r)
                            .as_millis() as u64
                    }),
                    active_calls: per.get(&s.id).copied().unwrap_or(0),
                    outstanding: s.stats.outstanding(),
                    selected_total: s.stats.selected.load(Ordering::Relaxed),
                    forwarded_total: s.stats.forwarded.load(Ordering::Relaxed),
                    failovers_total: s.stats.failovers.load(Ordering::Relaxed),
                    last_waits_total: s.stats.last_waits.load(Ordering::Relaxed),
                    probe_state: match (s.cfg.probe, s.stats.probe_down.load(Ordering::Relaxed)) {
                        (None, _) => "off",
                        (Some(_), false) => "up",
                        (Some(_), true) => "down",
                    }
                    .into(),
                    down_by: {
                        let agent = s.cfg.agent.is_some()
                            && e.is_none_or(|e| e.state != perf::AgentState::Up)
                            && cfg.health != Health::Probe;
                        let probe = s.cfg.probe.is_some()
                            && s.stats.probe_down.load(Ordering::Relaxed)
                            && cfg.health != Health::Agent;
                        let outlier = s.stats.ejected(now_ms);
                        let overload = s.stats.overloaded(now_ms);
                        let by: Vec<&str> = [
                            (agent, "agent"),
                            (probe, "probe"),
                            (outlier, "outlier"),
                            (overload, "overload"),
                        ]
                        .into_iter()
                        .filter_map(|(on, name)| on.then_some(name))
                        .collect();
                        (!by.is_empty()).then(|| by.join("+"))
                    },
                    failure_ratio: f64::from(s.stats.failure_permille.load(Ordering::Relaxed))
                        / 1000.0,
                    ejected: s.stats.ejected(now_ms),
                    ejected_for_ms: s
                        .stats
                        .ejected_until
                        .load(Ordering::Relaxed)
                        .saturating_sub(now_ms),
                    ejections_total: s.stats.tracker.lock().map_or(0, |t| t.ejections),
                    overloaded: s.stats.overloaded(now_ms),
                    overloaded_until: s.stats.overloaded(now_ms).then(|| {
                        now.wall_ms
                            + s.stats
                                .overloaded_until
                                .load(Ordering::Relaxed)
                                .saturating_sub(now_ms)
                    }),
                    overloads_total: s.stats.overloads.load(Ordering::Relaxed),
                    weight_factor: crate::outlier::ramp(
                        now_ms,
                        s.stats.ramp_start(now_ms),
                        &cfg.outlier,
                    ),
                    capacity: caps[k],
                    policy_weight: (weighted && total > 0.0).then(|| weights[k] / total),
                    capacity_source: if s.cfg.capacity.is_some() {
                        "configured"
                    } else if s.stats.capacity_learned().is_some() {
                        "learned"
                    } else {
                        "mean"
                    }
                    .into(),
                    error: e.and_then(|e| e.error.as_deref().map(str::to_owned)),
                }
            })
            .collect()
    }
}

/// `GET /servers` element.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerView {
    /// Configured id.
    pub id: String,
    /// SIP address.
    pub address: String,
    /// `udp` or `tcp`.
    pub transport: String,
    /// Agent address, if it has one.
    pub agent: Option<String>,
    /// The `[[discover]]` id (or, for a server written `host:port`, its
    /// own id) whose DNS answer gave it; `None` for a server given by address.
    pub source: Option<String>,
    /// `up`, `down`, `drained`, or `retiring` (gone from its DNS answer:
    /// no new session, its dialogs still reach it).
    pub state: String,
    /// What the agent connection says: `up`, `down`, `connecting`.
    pub agent_state: String,
    /// Performance score now.
    pub score: u32,
    /// CPU busy fraction of the latest sample.
    pub cpu: Option<f64>,
    /// Available memory, bytes.
    pub mem_available: Option<u64>,
    /// Age of the latest sample, ms.
    pub sample_age_ms: Option<u64>,
    /// Dialogs in the session table.
    pub active_calls: usize,
    /// Requests sent and not yet answered.
    pub outstanding: u32,
    /// New sessions sent here by selection.
    pub selected_total: u64,
    /// Requests forwarded here.
    pub forwarded_total: u64,
    /// New sessions moved elsewhere after this server failed them (no answer or a failover status).
    pub failovers_total: u64,
    /// New INVITEs it left unanswered past `failover_timeout` while no
    /// other server could take them: kept waiting for it
    /// (`routing.last_attempt_timeout`) instead of answered 503.
    pub last_waits_total: u64,
    /// OPTIONS probing: `off`, `up` or `down`.
    pub probe_state: String,
    /// Which signals say the server is down, when one does: `agent`,
    /// `probe`, `outlier`, `overload`, joined by `+`.
    pub down_by: Option<String>,
    /// Failed new-session attempts / attempts over the failure window.
    pub failure_ratio: f64,
    /// Ejected by outlier detection now.
    pub ejected: bool,
    /// Time left of the ejection, ms (0 when not ejected).
    pub ejected_for_ms: u64,
    /// Ejections so far.
    pub ejections_total: u64,
    /// Out of new-session selection now: it answered `503` with `Retry-After`.
    pub overloaded: bool,
    /// End of that overload period, Unix time in ms (`None` when not overloaded).
    pub overloaded_until: Option<u64>,
    /// Overload periods so far.
    pub overloads_total: u64,
    /// Slow start factor of the weight, `slow_start_floor..=1` (1: full weight).
    pub weight_factor: f64,
    /// The share of new sessions the policy in force gives this server now,
    /// 0-1, for the weighted policies (`patent`: its score's share;
    /// `adaptive`: its weight before the two-choice stage; `static`: its
    /// capacity's share); `None` for `round-robin` and `p2c`.
    pub policy_weight: Option<f64>,
    /// Capacity used by the policies, sessions/s (relative when nothing is known).
    pub capacity: f64,
    /// Where it comes from: `configured`, `learned` (from agent data), `mean` (of the others).
    pub capacity_source: String,
    /// Why the agent is down, when it is.
    pub error: Option<String>,
}
