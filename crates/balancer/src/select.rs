//! Selection (FIG 6-7, claims 4-5) and the pluggable routing policies.
//! Pure: randomness is injected, so every test can replay a run from a seed.

use rand::Rng;
use smallvec::SmallVec;

use crate::load::{Input, Scoring, scores};

/// The patent's draw: an integer `X` uniform in `1..=ΣS`, then the first `j`
/// whose prefix sum `S_0 + ... + S_j` reaches `X`. A zero score is never
/// chosen; `ΣS = 0` means no server.
pub fn draw(scores: &[u32], rng: &mut (impl Rng + ?Sized)) -> Option<usize> {
    let total: u64 = scores.iter().map(|&s| u64::from(s)).sum();
    if total == 0 {
        return None;
    }
    let x = rng.random_range(1..=total);
    let mut prefix = 0u64;
    scores.iter().position(|&s| {
        prefix += u64::from(s);
        prefix >= x
    })
}

/// What the balancer knows of one server besides its agent's data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Facts {
    /// Sessions sent to the server since the end of its agent's last window.
    pub sent_since_window: u32,
    /// Seconds from the end of the agent's last window to now, and the
    /// window's length, when the sample carries them.
    pub window: Option<(f64, f64)>,
    /// Transactions sent to the server and not yet answered.
    pub outstanding: u32,
    /// Capacity in sessions per second, configured or learned, when known.
    pub capacity: Option<f64>,
    /// Slow start factor, `floor..=1`: 1 unless the server just came back.
    pub ramp: f64,
}

impl Default for Facts {
    fn default() -> Self {
        Facts {
            sent_since_window: 0,
            window: None,
            outstanding: 0,
            capacity: None,
            ramp: 1.0,
        }
    }
}

/// Scales each score by its server's slow start factor (floored, so the
/// draw stays on integers; a ramping server keeps at least 1).
pub fn apply_ramp(scores: &mut [u32], facts: &[Facts]) {
    for (s, f) in scores.iter_mut().zip(facts) {
        if f.ramp < 1.0 && *s > 0 {
            *s = ((f64::from(*s) * f.ramp) as u32).max(1);
        }
    }
}

/// Everything a policy sees when it picks a server for a new session.
#[derive(Debug, Clone, Copy)]
pub struct PoolView<'a> {
    /// Load computation's input per server (agent data, health, drain).
    pub inputs: &'a [Input],
    /// The balancer's own facts per server, same order.
    pub facts: &'a [Facts],
    /// Current weights and thresholds.
    pub scoring: &'a Scoring,
}

/// A routing policy: picks the server for a new session, or none.
pub trait Policy: Send + Sync + std::fmt::Debug {
    /// The name used in config and the admin API.
    fn name(&self) -> &'static str;

    /// Picks a server index of `view`, or `None` when no server may take it.
    fn select(&self, view: &PoolView<'_>, rng: &mut dyn rand::RngCore) -> Option<usize>;

    /// The weight per server that drives the draw, into `out` (for the
    /// admin API); `false` when the policy does not draw by weight.
    fn weights(&self, _view: &PoolView<'_>, _out: &mut [f64]) -> bool {
        false
    }
}

/// Stack room for the scores of a pool this size; larger pools spill to the heap.
pub(crate) type Scores = SmallVec<[u32; 32]>;

/// The patent's policy, exactly: FIG 8 scores, FIG 6 draw. The one
/// addition is slow start: a server that just came back has its score scaled
/// by its ramp factor (1 at all other times; `routing.slow_start = "0s"`
/// turns it off).
#[derive(Debug, Clone, Copy, Default)]
pub struct Patent;

impl Policy for Patent {
    fn name(&self) -> &'static str {
        "patent"
    }

    fn select(&self, view: &PoolView<'_>, rng: &mut dyn rand::RngCore) -> Option<usize> {
        let mut s: Scores = SmallVec::from_elem(0, view.inputs.len());
        scores(view.scoring, view.inputs, &mut s);
        apply_ramp(&mut s, view.facts);
        draw(&s, rng)
    }

    fn weights(&self, view: &PoolView<'_>, out: &mut [f64]) -> bool {
        let mut s: Scores = SmallVec::from_elem(0, view.inputs.len());
        scores(view.scoring, view.inputs, &mut s);
        apply_ramp(&mut s, view.facts);
        for (o, v) in out.iter_mut().zip(&s) {
            *o = f64::from(*v);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Load;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn draw_walks_the_prefix_sums() {
        // FIG 7: S3 = 0 is a point on the axis and never chosen.
        let s = [10, 20, 30, 0, 40];
        let mut rng = StdRng::seed_from_u64(1);
        let mut seen = [0u32; 5];
        for _ in 0..10_000 {
            seen[draw(&s, &mut rng).unwrap()] += 1;
        }
        assert_eq!(seen[3], 0);
        assert!(seen.iter().enumerate().all(|(i, &n)| i == 3 || n > 0));
        assert_eq!(draw(&[0, 0], &mut rng), None);
        assert_eq!(draw(&[], &mut rng), None);
        assert_eq!(draw(&[0, 7, 0], &mut rng), Some(1));
    }

    /// Over 100,000 seeded draws each server's share is within one
    /// percentage point of `S_i / ΣS`.
    #[test]
    fn shares_follow_scores() {
        for (seed, s) in [
            (1u64, vec![70u32, 78]),
            (2, vec![26, 76]),
            (3, vec![87, 17]),
            (4, vec![5, 0, 50, 100, 1, 44]),
        ] {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut n = vec![0u32; s.len()];
            for _ in 0..100_000 {
                n[draw(&s, &mut rng).unwrap()] += 1;
            }
            let total: u32 = s.iter().sum();
            for (i, (&si, &ni)) in s.iter().zip(&n).enumerate() {
                let want = f64::from(si) / f64::from(total);
                let got = f64::from(ni) / 100_000.0;
                assert!(
                    (want - got).abs() < 0.01,
                    "server {i}: want {want:.4}, got {got:.4} ({s:?})"
                );
            }
        }
    }

    #[test]
    fn patent_policy_refuses_when_every_score_is_zero() {
        let scoring = Scoring::default();
        let hot = Input::Up(Load {
            cpu: 0.99,
            mem_available: 1 << 30,
            ..Load::default()
        });
        let facts = [Facts::default(); 2];
        let view = PoolView {
            inputs: &[hot, Input::Down],
            facts: &facts,
            scoring: &scoring,
        };
        let mut rng = StdRng::seed_from_u64(7);
        assert_eq!(Patent.select(&view, &mut rng), None);
        let ok = Input::Up(Load {
            cpu: 0.5,
            mem_available: 1 << 30,
            ..Load::default()
        });
        let view = PoolView {
            inputs: &[hot, ok],
            ..view
        };
        assert_eq!(Patent.select(&view, &mut rng), Some(1));
    }
}
