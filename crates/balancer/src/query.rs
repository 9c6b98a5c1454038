//! Performance query (FIG 4 box 408, FIG 10): the latest performance table
//! turned into load-computation inputs, and the scoring parameters that can
//! change in situ (FIG 9 text) without a restart.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use perf::AgentState;
use perf::server::Entry;
use serde::Deserialize;
use tokio::time::Instant;

use crate::load::{Input, Load, MemMin, Scoring, ScoringError};

/// What load computation makes of one server's table entry at `now`.
///
/// A drained server is `Drained`; no entry, no sample yet, or a sample
/// older than `stale_after` is `NoData`; an agent that does not answer is
/// `Down`; otherwise its sample's CPU and memory.
#[must_use]
pub fn input_for(
    entry: Option<&Entry>,
    drained: bool,
    now: Instant,
    stale_after: Duration,
) -> Input {
    if drained {
        return Input::Drained;
    }
    let Some(e) = entry else {
        return Input::NoData;
    };
    match (e.state, e.sample, e.received) {
        (AgentState::Down, _, _) => Input::Down,
        (AgentState::Up, Some(s), Some(at)) if now.saturating_duration_since(at) <= stale_after => {
            Input::Up(Load {
                cpu: s.cpu,
                mem_available: s.mem_available,
                mem_total: Some(s.mem_total),
                ..Load::default()
            })
        }
        _ => Input::NoData,
    }
}

/// A partial change of the scoring parameters: the fields given replace the
/// current ones (the admin API's `PUT /scoring` body).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoringPatch {
    /// `C_max`.
    pub cpu_max: Option<f64>,
    /// `M_min`.
    pub mem_min: Option<MemMin>,
    /// `W0`.
    pub w_cpu: Option<f64>,
    /// `W1`.
    pub w_mem: Option<f64>,
    /// Claim 8 weight.
    pub w_calls: Option<f64>,
    /// Claim 9 weight.
    pub w_failures: Option<f64>,
    /// Claim 9 weight.
    pub w_latency: Option<f64>,
    /// Latency that scores 0.
    pub latency_ref_ms: Option<f64>,
}

impl ScoringPatch {
    /// `base` with the given fields replaced.
    #[must_use]
    pub fn apply(&self, base: &Scoring) -> Scoring {
        Scoring {
            cpu_max: self.cpu_max.unwrap_or(base.cpu_max),
            mem_min: self.mem_min.unwrap_or(base.mem_min),
            w_cpu: self.w_cpu.unwrap_or(base.w_cpu),
            w_mem: self.w_mem.unwrap_or(base.w_mem),
            w_calls: self.w_calls.unwrap_or(base.w_calls),
            w_failures: self.w_failures.unwrap_or(base.w_failures),
            w_latency: self.w_latency.unwrap_or(base.w_latency),
            latency_ref_ms: self.latency_ref_ms.unwrap_or(base.latency_ref_ms),
        }
    }
}

/// The scoring parameters in force, readable on the hot path without a lock
/// and changeable at run time.
#[derive(Debug)]
pub struct LiveScoring(ArcSwap<Scoring>);

impl LiveScoring {
    /// Starts with `s`.
    ///
    /// # Errors
    /// When `s` does not validate.
    pub fn new(s: Scoring) -> Result<LiveScoring, ScoringError> {
        s.validate()?;
        Ok(LiveScoring(ArcSwap::from_pointee(s)))
    }

    /// The parameters in force.
    #[must_use]
    pub fn get(&self) -> Arc<Scoring> {
        self.0.load_full()
    }

    /// Replaces them all; the old ones stay when the new ones do not validate.
    ///
    /// # Errors
    /// The field that does not validate.
    pub fn set(&self, s: Scoring) -> Result<(), ScoringError> {
        s.validate()?;
        self.0.store(Arc::new(s));
        Ok(())
    }

    /// Applies a partial change atomically; returns the new parameters.
    ///
    /// # Errors
    /// The field that does not validate (nothing changes then).
    pub fn patch(&self, p: &ScoringPatch) -> Result<Scoring, ScoringError> {
        let mut result = Ok(Scoring::default());
        self.0.rcu(|cur| {
            let next = p.apply(cur);
            match next.validate() {
                Ok(()) => {
                    result = Ok(next);
                    Arc::new(next)
                }
                Err(e) => {
                    result = Err(e);
                    Arc::clone(cur)
                }
            }
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::scores;
    use perf::Sample;

    fn entry(state: AgentState, cpu: f64, mem: u64, received: Option<Instant>) -> Entry {
        Entry {
            id: "s".into(),
            agent: "a".into(),
            state,
            sample: Some(Sample {
                seq: 1,
                window_end_ms: 0,
                window_ms: 500,
                cpus: 2.0,
                cpu,
                mem_available: mem,
                mem_total: mem * 2,
            }),
            received,
            error: None,
            notices: 0,
            downs: 0,
        }
    }

    #[test]
    fn table_entries_become_inputs() {
        let now = Instant::now();
        let stale = Duration::from_millis(1500);
        let fresh = entry(AgentState::Up, 0.3, 1 << 30, Some(now));
        assert!(matches!(input_for(Some(&fresh), false, now, stale), Input::Up(l) if l.cpu == 0.3));
        assert_eq!(input_for(Some(&fresh), true, now, stale), Input::Drained);
        assert_eq!(input_for(None, false, now, stale), Input::NoData);
        let down = entry(AgentState::Down, 0.3, 1 << 30, Some(now));
        assert_eq!(input_for(Some(&down), false, now, stale), Input::Down);
        let later = now + Duration::from_millis(1501);
        assert_eq!(
            input_for(Some(&fresh), false, later, stale),
            Input::NoData,
            "stale"
        );
        let connecting = entry(AgentState::Connecting, 0.3, 1 << 30, None);
        assert_eq!(
            input_for(Some(&connecting), false, now, stale),
            Input::NoData
        );
    }

    #[test]
    fn weights_and_thresholds_change_in_situ() {
        let live = LiveScoring::new(Scoring::default()).unwrap();
        let inputs = [
            Input::Up(Load {
                cpu: 0.5,
                mem_available: 3 << 30,
                ..Load::default()
            }),
            Input::Up(Load {
                cpu: 0.9,
                mem_available: 1 << 30,
                ..Load::default()
            }),
        ];
        let mut out = [0; 2];
        scores(&live.get(), &inputs, &mut out);
        assert_eq!(out, [62, 17]);
        // CPU only.
        let s = live
            .patch(&ScoringPatch {
                w_mem: Some(0.0),
                ..ScoringPatch::default()
            })
            .unwrap();
        assert_eq!(s.w_mem, 0.0);
        scores(&live.get(), &inputs, &mut out);
        assert_eq!(out, [50, 10]);
        // A lower C_max takes the busy server out at once.
        live.patch(&ScoringPatch {
            cpu_max: Some(0.8),
            ..ScoringPatch::default()
        })
        .unwrap();
        scores(&live.get(), &inputs, &mut out);
        assert_eq!(out, [50, 0]);
        // A bad change names its field and changes nothing.
        let err = live
            .patch(&ScoringPatch {
                w_cpu: Some(-1.0),
                ..ScoringPatch::default()
            })
            .unwrap_err();
        assert_eq!(err.field, "w_cpu");
        assert_eq!(live.get().cpu_max, 0.8);
        let parsed: ScoringPatch =
            serde_json::from_str(r#"{"w_cpu": 2, "mem_min": {"percent": 5}}"#).unwrap();
        assert_eq!(parsed.mem_min, Some(MemMin::Percent(5.0)));
        assert!(serde_json::from_str::<ScoringPatch>(r#"{"w_cpux": 2}"#).is_err());
    }
}
