//! Server health as the routing core sees it (FIG 4 box 408 meets the
//! failover rules): what load computation makes of each server now, the
//! balancer's own facts for the policies, the outcome of each new-session
//! attempt (outlier ejection), the 100 ms health round (slow start, the
//! in-flight anchor, learned capacity) and the OPTIONS probes.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rand::RngCore;
use smallvec::SmallVec;
use tracing::{debug, info, warn};

use super::{Now, Outbox, Router};
use crate::codec::{Branch, Leg};
use crate::config::{Config, Health};
use crate::load::Input;
use crate::outlier::{self, Hysteresis};
use crate::pool::{Pool, Server};
use crate::query::input_for;
use crate::select::Facts;

/// What load computation makes of a server now: its agent's data, unless
/// drained, or down by the health signals in use (`routing.health`).
pub(super) fn input_of(
    table: &perf::server::Table,
    s: &Server,
    now: Instant,
    now_ms: u64,
    cfg: &Config,
) -> Input {
    let input = input_for(
        table.get_at(s.slot, &s.id),
        s.stats.drained.load(Ordering::Relaxed),
        tokio::time::Instant::from_std(now),
        cfg.stale_after,
    );
    if input == Input::Drained || s.retiring {
        return Input::Drained;
    }
    if s.stats.ejected(now_ms) || s.stats.overloaded(now_ms) {
        return Input::Down;
    }
    let input = match input {
        Input::Up(mut l) => {
            l.failure_ratio = f64::from(s.stats.failure_permille.load(Ordering::Relaxed)) / 1000.0;
            Input::Up(l)
        }
        other => other,
    };
    let probed_down = s.cfg.probe.is_some() && s.stats.probe_down.load(Ordering::Relaxed);
    match cfg.health {
        Health::Agent => input,
        Health::Probe | Health::Both if probed_down => Input::Down,
        // The probe alone decides up/down; without agent data there is no score.
        Health::Probe if input == Input::Down => Input::NoData,
        Health::Probe | Health::Both => input,
    }
}

/// The balancer's own facts per server for the policies: outstanding
/// transactions, slow-start ramp, capacity, and the sessions sent since the
/// end of the agent window in use (only when the count is anchored to that
/// very sample).
pub(super) fn facts_of(
    cfg: &Config,
    pool: &Pool,
    table: &perf::server::Table,
    now_ms: u64,
    wall_ms: u64,
) -> SmallVec<[Facts; 16]> {
    let caps = capacities_of(pool);
    pool.servers
        .iter()
        .zip(&caps)
        .map(|(s, &cap)| {
            let mut f = Facts {
                outstanding: s.stats.outstanding(),
                ramp: outlier::ramp(now_ms, s.stats.ramp_start(now_ms), &cfg.outlier),
                capacity: Some(cap),
                ..Facts::default()
            };
            if let Some(x) = table.get_at(s.slot, &s.id).and_then(|e| e.sample)
                && x.seq == s.stats.anchor_seq.load(Ordering::Relaxed)
            {
                let sent = s.stats.selected.load(Ordering::Relaxed);
                f.sent_since_window =
                    sent.saturating_sub(s.stats.anchor_selected.load(Ordering::Relaxed)) as u32;
                f.window = Some((
                    wall_ms.saturating_sub(x.window_end_ms) as f64 / 1000.0,
                    f64::from(x.window_ms) / 1000.0,
                ));
            }
            f
        })
        .collect()
}

/// Capacity per server: configured, else learned, else the mean of the others.
pub(super) fn capacities_of(pool: &Pool) -> SmallVec<[f64; 16]> {
    let configured: SmallVec<[Option<f64>; 16]> =
        pool.servers.iter().map(|s| s.cfg.capacity).collect();
    let learned: SmallVec<[Option<f64>; 16]> = pool
        .servers
        .iter()
        .map(|s| s.stats.capacity_learned())
        .collect();
    crate::policy::capacities(&configured, &learned)
}

impl Router {
    /// Feeds one new-session attempt's outcome to the server's failure
    /// record; ejects it after too many failures in a row (within the
    /// pool's ejection budget).
    pub(super) fn record_outcome(&self, cfg: &Config, pool: &Pool, s: &Server, ok: bool, now: Now) {
        let now_ms = self.ms(now);
        let may = !ok
            && outlier::may_eject(
                pool.servers
                    .iter()
                    .filter(|x| x.stats.ejected(now_ms))
                    .count(),
                pool.servers.len(),
                cfg.outlier.max_ejected_percent,
            );
        let mut t = s
            .stats
            .tracker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // The failure ratio is refreshed by the health round (every 100 ms),
        // not here on every new call.
        let verdict = t.record(now_ms, ok, &cfg.outlier, may);
        drop(t);
        if let outlier::Verdict::Ejected(until) = verdict {
            s.stats.ejected_until.store(until, Ordering::Relaxed);
            warn!(
                server = %s.id,
                for_ms = until - now_ms,
                failures_in_a_row = cfg.outlier.consecutive,
                "outlier: ejected"
            );
        }
    }

    /// A server's `503` (to a request of ours, or to a probe) at `now`: with
    /// `Retry-After: N` it says it is overloaded, and takes no new session
    /// for N seconds (at most `routing.retry_after_max`; RFC 3261 §21.5.4).
    /// In-dialog requests still reach it. Returns whether a new overload
    /// period began.
    pub(super) fn note_overload(
        &self,
        cfg: &Config,
        s: &Server,
        msg: &sip::Message<'_>,
        now: Now,
    ) -> bool {
        if msg.status() != Some(503) {
            return false;
        }
        let now_ms = self.ms(now);
        let Some(until) = msg
            .header(sip::HeaderName::RetryAfter)
            .and_then(|h| outlier::retry_after_secs(h.value))
            .and_then(|secs| outlier::overload_until(now_ms, secs, cfg.retry_after_max))
        else {
            return false;
        };
        let before = s.stats.overloaded_until.fetch_max(until, Ordering::Relaxed);
        if before > now_ms {
            // Already in a period (a later Retry-After may extend it).
            return false;
        }
        s.stats.overloads.fetch_add(1, Ordering::Relaxed);
        warn!(
            server = %s.id,
            for_ms = until - now_ms,
            "overloaded: 503 with Retry-After, no new sessions until then"
        );
        true
    }

    /// One health round: refreshes the failure ratios, starts the slow start
    /// of every server that came back, and moves the calls that ring on a
    /// server that stopped answering SIP.
    pub(super) fn health_round(&self, now: Now, rng: &mut dyn RngCore, out: &mut Outbox) {
        let cfg = self.cfg.load();
        let pool = self.pool.load();
        let table = self.table.load();
        let now_ms = self.ms(now);
        let mut sip_down: SmallVec<[Arc<str>; 4]> = SmallVec::new();
        for s in &pool.servers {
            let ratio = s
                .stats
                .tracker
                .lock()
                .map(|t| t.failure_ratio(now_ms, cfg.outlier.window))
                .unwrap_or(0.0);
            s.stats
                .failure_permille
                .store((ratio * 1000.0).round() as u32, Ordering::Relaxed);
            track_windows(
                s,
                table.get_at(s.slot, &s.id).and_then(|e| e.sample),
                now.wall_ms,
            );
            let up = self.usable(&cfg, s, now);
            let was = s.stats.available.swap(up, Ordering::Relaxed);
            if was
                && !up
                && (s.stats.ejected(now_ms)
                    || s.cfg.probe.is_some() && s.stats.probe_down.load(Ordering::Relaxed))
            {
                sip_down.push(s.id.clone());
            }
            // The first time up (balancer start) is no comeback: every
            // server would ramp alike.
            if up && !was && s.stats.ever_available.swap(true, Ordering::Relaxed) {
                // Back from an overload period: the ramp began at its end
                // (`ServerStats::ramp_start`), not at this turn.
                let until = s.stats.overloaded_until.load(Ordering::Relaxed);
                let from = if until > 0 && until <= now_ms && now_ms - until < 1000 {
                    until
                } else {
                    now_ms
                };
                s.stats.ramp_from.store(from + 1, Ordering::Relaxed);
                if !cfg.outlier.slow_start.is_zero() {
                    info!(server = %s.id, over_ms = cfg.outlier.slow_start.as_millis() as u64, "back: slow start");
                }
            }
        }
        if !sip_down.is_empty() {
            self.rescue(&sip_down, now, rng, out);
        }
    }

    /// One round of SIP OPTIONS probing: judges the last probe of each
    /// probed server that is due, and sends the next.
    pub(super) fn probe_round(&self, now: Now, out: &mut Outbox) {
        let pool = self.pool.load();
        let now_ms = self.ms(now);
        let mut due = self
            .probe_due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in &pool.servers {
            let Some(every) = s.cfg.probe else { continue };
            let next = due.entry(s.id.clone()).or_insert(now_ms);
            if now_ms < *next {
                continue;
            }
            *next = now_ms + every.as_millis() as u64;
            let st = &s.stats;
            let sent = st.probe_sent.load(Ordering::Relaxed);
            if sent > 0 {
                let ok = st.probe_answered.load(Ordering::Relaxed) >= sent;
                let mut h = Hysteresis {
                    down: st.probe_down.load(Ordering::Relaxed),
                    streak: st.probe_streak.load(Ordering::Relaxed) as u32,
                };
                if h.observe(ok, s.cfg.probe_failures, s.cfg.probe_successes) {
                    if h.down {
                        warn!(server = %s.id, unanswered = s.cfg.probe_failures, "OPTIONS probe: down");
                    } else {
                        info!(server = %s.id, "OPTIONS probe: up");
                    }
                }
                st.probe_down.store(h.down, Ordering::Relaxed);
                st.probe_streak
                    .store(u64::from(h.streak), Ordering::Relaxed);
            }
            let seq = sent + 1;
            st.probe_sent.store(seq, Ordering::Relaxed);
            let host = format!("{}:{}", self.me.host, self.me.port);
            let mut branch = Vec::with_capacity(40);
            let probe_branch = Branch {
                txn: seq,
                leg: Leg::Probe,
                loop_hash: 0,
                mac: None,
            };
            self.seal(probe_branch, &super::Dest::Udp(s.cfg.address))
                .write(&mut branch);
            let probe = format!(
                "OPTIONS sip:{addr} SIP/2.0\r\nVia: SIP/2.0/{t} {host};branch={b}\r\n\
                 Max-Forwards: 70\r\nFrom: <sip:siplb@{host}>;tag=probe\r\nTo: <sip:{addr}>\r\n\
                 Call-ID: probe-{id}-{seq}@{host}\r\nCSeq: {seq} OPTIONS\r\nContent-Length: 0\r\n\r\n",
                addr = s.cfg.address,
                t = s.cfg.transport.via_name(),
                id = s.id,
                b = String::from_utf8_lossy(&branch),
            );
            out.send(s.dest(), probe.as_bytes());
        }
    }

    /// Every second: idle sessions.
    pub(super) fn sweep(&self, now: Now) {
        let cfg = self.cfg.load();
        let gone = self
            .sessions
            .sweep(self.ms(now), cfg.session_idle_timeout.as_millis() as u64);
        if gone > 0 {
            debug!(gone, "idle sessions removed");
        }
    }
}

/// Keeps `selected` snapshots of `s`; on a new agent sample, anchors the
/// in-flight count to the end of its window and learns capacity from the
/// sessions sent during it.
fn track_windows(s: &Server, sample: Option<perf::Sample>, wall: u64) {
    let selected = s.stats.selected.load(Ordering::Relaxed);
    let mut h = s
        .stats
        .history
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    h.ring.push_back((wall, selected));
    if h.ring.len() > crate::stats::History::LEN {
        h.ring.pop_front();
    }
    let Some(x) = sample else { return };
    if x.seq == s.stats.anchor_seq.load(Ordering::Relaxed) {
        return;
    }
    let end = h.selected_at(x.window_end_ms).unwrap_or(selected);
    let start = h
        .selected_at(x.window_end_ms.saturating_sub(u64::from(x.window_ms)))
        .unwrap_or(end);
    h.capacity.observe(
        end.saturating_sub(start),
        x.cpu,
        f64::from(x.window_ms) / 1000.0,
    );
    if let Some(c) = h.capacity.value {
        s.stats
            .capacity_learned
            .store(c.to_bits(), Ordering::Relaxed);
    }
    s.stats.anchor_selected.store(end, Ordering::Relaxed);
    s.stats.anchor_seq.store(x.seq, Ordering::Relaxed);
}
