//! Load computation (FIG 4 box 406, FIG 8, claims 6-9): performance scores
//! from performance data. Pure: no I/O, no clock, no randomness.
//!
//! `S_i = floor(100 (W0 (1 - C_i) + W1 M_i/ΣM + Σ extra terms) / ΣW)`, and
//! `S_i = 0` when the server has no (fresh) data, is down or drained, uses
//! more CPU than `C_max`, or has less memory available than `M_min`. `ΣM`
//! runs over the servers not zeroed by those rules. The claims 8-9 terms
//! (call volume, failures, latency) have weight 0 by default, so the default
//! is the patent's formula exactly.

use serde::{Deserialize, Serialize};

/// The minimum available memory below which a server scores 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemMin {
    /// An absolute number of bytes.
    Bytes(u64),
    /// A percentage of the server's total memory (0-100).
    Percent(f64),
}

/// Weights and thresholds of the score; changeable at run time (FIG 9 text).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scoring {
    /// `C_max`: CPU busy fraction above which the score is 0 (default 0.95).
    pub cpu_max: f64,
    /// `M_min`: available memory below which the score is 0 (default 10 MiB).
    pub mem_min: MemMin,
    /// `W0`: weight of CPU headroom `1 - C_i` (default 1).
    pub w_cpu: f64,
    /// `W1`: weight of the memory share `M_i/ΣM` (default 1).
    pub w_mem: f64,
    /// Claim 8: weight of call headroom `1 - calls/capacity` (default 0).
    pub w_calls: f64,
    /// Claim 9: weight of `1 - failure ratio` (default 0).
    pub w_failures: f64,
    /// Claim 9: weight of `1 - latency/latency_ref`, clamped at 0 (default 0).
    pub w_latency: f64,
    /// The response latency, in milliseconds, that scores 0 on the latency term (default 1000).
    pub latency_ref_ms: f64,
}

impl Default for Scoring {
    fn default() -> Self {
        Scoring {
            cpu_max: 0.95,
            mem_min: MemMin::Bytes(10 * 1024 * 1024),
            w_cpu: 1.0,
            w_mem: 1.0,
            w_calls: 0.0,
            w_failures: 0.0,
            w_latency: 0.0,
            latency_ref_ms: 1000.0,
        }
    }
}

/// A scoring parameter that cannot be used, naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid scoring parameter {field}: {reason}")]
pub struct ScoringError {
    /// The offending field.
    pub field: &'static str,
    /// Why.
    pub reason: &'static str,
}

impl Scoring {
    /// Checks every field.
    ///
    /// # Errors
    /// The first field out of range.
    pub fn validate(&self) -> Result<(), ScoringError> {
        let err = |field, reason| Err(ScoringError { field, reason });
        if !(0.0..=1.0).contains(&self.cpu_max) {
            return err("cpu_max", "must be between 0 and 1");
        }
        if let MemMin::Percent(p) = self.mem_min
            && !(0.0..=100.0).contains(&p)
        {
            return err("mem_min", "a percentage must be between 0 and 100");
        }
        for (field, w) in [
            ("w_cpu", self.w_cpu),
            ("w_mem", self.w_mem),
            ("w_calls", self.w_calls),
            ("w_failures", self.w_failures),
            ("w_latency", self.w_latency),
        ] {
            if !w.is_finite() || w < 0.0 {
                return err(field, "must be a finite number >= 0");
            }
        }
        if self.weight_sum() <= 0.0 {
            return err("w_cpu", "the weights must not all be 0");
        }
        if !(self.latency_ref_ms.is_finite() && self.latency_ref_ms > 0.0) {
            return err("latency_ref_ms", "must be > 0");
        }
        Ok(())
    }

    fn weight_sum(&self) -> f64 {
        self.w_cpu + self.w_mem + self.w_calls + self.w_failures + self.w_latency
    }
}

/// What is known of one server's load.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// `C_i`: CPU busy fraction over the agent's last window, 0-1.
    pub cpu: f64,
    /// `M_i`: available memory, bytes.
    pub mem_available: u64,
    /// Total memory, bytes, when known (for `MemMin::Percent`).
    pub mem_total: Option<u64>,
    /// Active calls on the server (claim 8).
    pub active_calls: u32,
    /// Calls the server is configured to carry (claim 8); without it the
    /// call term counts as full headroom.
    pub call_capacity: Option<u32>,
    /// Recent failure ratio, 0-1 (claim 9).
    pub failure_ratio: f64,
    /// Recent response latency, milliseconds (claim 9).
    pub latency_ms: Option<f64>,
}

/// One server as load computation sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input {
    /// Fresh data from an agent that answers.
    Up(Load),
    /// No data yet, or data too old to use.
    NoData,
    /// The agent (or the server) does not answer.
    Down,
    /// Taken out by an operator.
    Drained,
}

/// Whether step 1 of FIG 8 zeroes this server.
fn eligible(s: &Scoring, input: &Input) -> Option<Load> {
    let Input::Up(load) = *input else {
        return None;
    };
    (!over_threshold(s, &load, load.cpu)).then_some(load)
}

/// Whether a server with this load (its CPU taken as `cpu`) is past `C_max`
/// or below `M_min`.
#[must_use]
pub fn over_threshold(s: &Scoring, load: &Load, cpu: f64) -> bool {
    let mem_min = match s.mem_min {
        MemMin::Bytes(b) => b as f64,
        MemMin::Percent(p) => load.mem_total.map_or(0.0, |t| t as f64 * p / 100.0),
    };
    !(cpu.is_finite() && cpu <= s.cpu_max && load.mem_available as f64 >= mem_min)
}

/// The weighted terms of FIG 8 and claims 8-9, `0..=1` (the score before
/// `100 x` and the floor), with CPU `cpu` and memory total `sum_mem`.
#[must_use]
pub fn terms(s: &Scoring, l: &Load, cpu: f64, sum_mem: f64) -> f64 {
    let mem_share = if sum_mem > 0.0 {
        l.mem_available as f64 / sum_mem
    } else {
        0.0
    };
    let calls = l.call_capacity.map_or(1.0, |cap| {
        (1.0 - f64::from(l.active_calls) / f64::from(cap.max(1))).clamp(0.0, 1.0)
    });
    let latency = l
        .latency_ms
        .map_or(1.0, |ms| (1.0 - ms / s.latency_ref_ms).clamp(0.0, 1.0));
    let v = s.w_cpu * (1.0 - cpu.clamp(0.0, 1.0))
        + s.w_mem * mem_share
        + s.w_calls * calls
        + s.w_failures * (1.0 - l.failure_ratio.clamp(0.0, 1.0))
        + s.w_latency * latency;
    v / s.weight_sum()
}

/// Computes every server's score into `out` (same length as `inputs`).
///
/// # Panics
/// Never for valid [`Scoring`]; `out` must be as long as `inputs`.
pub fn scores(s: &Scoring, inputs: &[Input], out: &mut [u32]) {
    debug_assert_eq!(inputs.len(), out.len());
    let sum_mem: f64 = inputs
        .iter()
        .filter_map(|i| eligible(s, i))
        .map(|l| l.mem_available as f64)
        .sum();
    for (input, o) in inputs.iter().zip(out.iter_mut()) {
        *o = match eligible(s, input) {
            None => 0,
            // The epsilon keeps an exact integer (e.g. 70.0) from
            // flooring to 69 through rounding error.
            Some(l) => (100.0 * terms(s, &l, l.cpu, sum_mem) + 1e-9)
                .floor()
                .clamp(0.0, 100.0) as u32,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(cpu_percent: u32, free_kb: u64) -> Input {
        Input::Up(Load {
            cpu: f64::from(cpu_percent) / 100.0,
            mem_available: free_kb * 1024,
            ..Load::default()
        })
    }

    fn two(s: &Scoring, a: Input, b: Input) -> [u32; 2] {
        let mut out = [0; 2];
        scores(s, &[a, b], &mut out);
        out
    }

    /// FIG 15's four scenarios (CPU %, free memory KB for both servers).
    /// The figure prints 29/28 for scenario 4; the formula gives 29/29
    /// (100 × (0.11 + 95425/196659) / 2 = 29.76), so the figure's second
    /// reading evidently differed from the one it prints.
    #[test]
    fn fig15_scores() {
        let s = Scoring::default();
        let table = [
            ((1, 60_456), (2, 85_892), [70, 78]),
            ((95, 113_420), (0, 125_549), [26, 76]),
            ((2, 57_612), (88, 16_888), [87, 17]),
            ((92, 101_234), (89, 95_425), [29, 29]),
        ];
        for (a, b, want) in table {
            assert_eq!(two(&s, up(a.0, a.1), up(b.0, b.1)), want, "{a:?} {b:?}");
        }
    }

    #[test]
    fn thresholds_zero_the_score_and_leave_sum_m() {
        let s = Scoring::default();
        // Above C_max: zero, and its memory leaves ΣM, so the other takes the whole memory share.
        assert_eq!(two(&s, up(96, 100_000), up(50, 100_000)), [0, 75]);
        // Exactly C_max is allowed (the patent zeroes only "greater than").
        assert_eq!(two(&s, up(95, 100_000), up(95, 100_000))[0], 27);
        // Below M_min (10 MiB = 10,240 KiB).
        assert_eq!(two(&s, up(10, 10_239), up(10, 10_240)), [0, 95]);
        let pct = Scoring {
            mem_min: MemMin::Percent(50.0),
            ..s
        };
        let with_total = |cpu, avail_kb: u64, total_kb: u64| {
            Input::Up(Load {
                cpu,
                mem_available: avail_kb * 1024,
                mem_total: Some(total_kb * 1024),
                ..Load::default()
            })
        };
        assert_eq!(
            two(&pct, with_total(0.0, 49, 100), with_total(0.0, 51, 100)),
            [0, 100]
        );
    }

    #[test]
    fn no_data_down_drained_are_zero() {
        let s = Scoring::default();
        for other in [Input::NoData, Input::Down, Input::Drained] {
            assert_eq!(two(&s, other, up(0, 100_000)), [0, 100]);
        }
        assert_eq!(two(&s, Input::Down, Input::Drained), [0, 0]);
    }

    #[test]
    fn claims_8_9_terms_default_to_nothing_and_count_when_weighted() {
        let loaded = Input::Up(Load {
            cpu: 0.2,
            mem_available: 1 << 30,
            active_calls: 90,
            call_capacity: Some(100),
            failure_ratio: 0.5,
            latency_ms: Some(500.0),
            ..Load::default()
        });
        let idle = up(20, 1 << 20);
        let s = Scoring::default();
        assert_eq!(
            two(&s, loaded, idle),
            [65, 65],
            "weights 0: the extras change nothing"
        );
        let s = Scoring {
            w_calls: 1.0,
            w_failures: 1.0,
            w_latency: 1.0,
            ..s
        };
        // (0.8 + 0.5 + 0.1 + 0.5 + 0.5) / 5 = 0.48; idle: (0.8 + 0.5 + 1 + 1 + 1) / 5 = 0.86
        assert_eq!(two(&s, loaded, idle), [48, 86]);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = Scoring {
            cpu_max: 1.5,
            ..Scoring::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "cpu_max");
        let bad = Scoring {
            w_mem: -1.0,
            ..Scoring::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "w_mem");
        let bad = Scoring {
            w_cpu: 0.0,
            w_mem: 0.0,
            ..Scoring::default()
        };
        assert!(bad.validate().is_err());
        Scoring::default().validate().unwrap();
    }
}
