//! The routing policies besides the patent's, and capacity learning. Pure:
//! randomness is injected; time comes in through [`Facts`].
//!
//! - `adaptive` (the default): the patent's inputs, with the CPU estimate
//!   corrected for the sessions sent since the agent's window ended
//!   (`C_eff = C + (n/μ − C·Δt)/(W + Δt)`), weights ∝ capacity × the FIG 8
//!   terms at `C_eff` (no hard cut-off: a server past a threshold keeps a
//!   tenth of its weight), then two candidates drawn by weight and the one
//!   with fewer outstanding transactions per capacity wins. Why: see
//!   docs/balancing.md.
//! - `round-robin`, `p2c` ((outstanding + 1)/capacity of two drawn at
//!   random), `static` (weighted random by capacity): for comparison and for
//!   pools without agents.

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::Rng;
use smallvec::SmallVec;

use crate::load::{Input, over_threshold, terms};
use crate::select::{Facts, Patent, Policy, PoolView};

/// Every policy name, as config and the admin API spell them.
pub const NAMES: [&str; 5] = ["adaptive", "patent", "round-robin", "p2c", "static"];

/// Whether policy `name` scores servers by their agents' data.
#[must_use]
pub fn needs_agents(name: &str) -> bool {
    matches!(name, "adaptive" | "patent")
}

/// The policy called `name`.
#[must_use]
pub fn by_name(name: &str) -> Option<Box<dyn Policy>> {
    Some(match name {
        "adaptive" => Box::new(Adaptive),
        "patent" => Box::new(Patent),
        "round-robin" => Box::new(RoundRobin::default()),
        "p2c" => Box::new(P2c),
        "static" => Box::new(Static),
        _ => return None,
    })
}

/// A server that may take sessions without agent data: not down, not drained.
fn usable(i: &Input) -> bool {
    matches!(i, Input::Up(_) | Input::NoData)
}

fn capacity(f: &Facts) -> f64 {
    f.capacity
        .filter(|c| *c > 0.0 && c.is_finite())
        .unwrap_or(1.0)
}

/// Index drawn with probability `w_i / Σw`; `None` when `Σw = 0`.
pub fn draw_weighted(weights: &[f64], rng: &mut (impl Rng + ?Sized)) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let x = rng.random::<f64>() * total;
    let mut prefix = 0.0;
    let last = weights.iter().rposition(|&w| w > 0.0)?;
    Some(
        weights
            .iter()
            .position(|&w| {
                prefix += w;
                w > 0.0 && prefix > x
            })
            .unwrap_or(last),
    )
}

/// Of two candidates, the one with fewer outstanding transactions per
/// capacity (`(n + 1)/μ`); the first on a tie.
fn lighter(facts: &[Facts], a: usize, b: usize) -> usize {
    let load = |i: usize| (f64::from(facts[i].outstanding) + 1.0) / capacity(&facts[i]);
    if load(b) < load(a) { b } else { a }
}

/// Two distinct indices drawn by `weights` (the second from the rest); one
/// when only one has weight.
fn two_by_weight(weights: &mut [f64], rng: &mut dyn rand::RngCore) -> Option<(usize, usize)> {
    let a = draw_weighted(weights, rng)?;
    let wa = std::mem::replace(&mut weights[a], 0.0);
    let b = draw_weighted(weights, rng).unwrap_or(a);
    weights[a] = wa;
    Some((a, b))
}

type Weights = SmallVec<[f64; 32]>;

/// The CPU busy fraction estimated now: the agent's `C` over its window
/// `W`, plus the work sent since the window ended (`n/μ` busy seconds) less
/// what drained meanwhile at the measured rate (`C·Δt`), spread over
/// `W + Δt`. Without a capacity or window, `C` as measured.
#[must_use]
pub fn cpu_now(cpu: f64, f: &Facts) -> f64 {
    match (f.capacity, f.window) {
        (Some(mu), Some((dt, w))) if mu > 0.0 && w + dt > 0.0 => {
            let n = f64::from(f.sent_since_window);
            (cpu + (n / mu - cpu * dt) / (w + dt)).max(0.0)
        }
        _ => cpu,
    }
}

/// The adaptive policy's weight per server into `out`: capacity × FIG 8
/// terms at [`cpu_now`] (a tenth past a threshold, never below 1 % of the
/// capacity), × the slow-start ramp. A server without data (not down)
/// weighs as the mean of those with data; when no server has data,
/// capacity weights over the usable ones.
pub fn adaptive_weights(view: &PoolView<'_>, out: &mut [f64]) {
    let s = view.scoring;
    let sum_mem: f64 = view
        .inputs
        .iter()
        .filter_map(|i| match i {
            Input::Up(l) => Some(l.mem_available as f64),
            _ => None,
        })
        .sum();
    let (mut any, mut sum_terms, mut up) = (false, 0.0, 0u32);
    for ((input, f), o) in view.inputs.iter().zip(view.facts).zip(out.iter_mut()) {
        *o = match input {
            Input::Up(l) => {
                any = true;
                let c = cpu_now(l.cpu, f);
                let mut w = terms(s, l, c, sum_mem).max(0.01);
                if over_threshold(s, l, c) {
                    w *= 0.1;
                }
                sum_terms += w;
                up += 1;
                capacity(f) * w * f.ramp
            }
            _ => 0.0,
        };
    }
    if any {
        // A usable server without data yet (its agent has not answered
        // since the balancer started, or its data went stale) counts as an
        // average one: refusing it would pile its share onto the others,
        // and the two-choice stage still sees its outstanding count.
        let mean = sum_terms / f64::from(up);
        for ((input, f), o) in view.inputs.iter().zip(view.facts).zip(out.iter_mut()) {
            if *input == Input::NoData {
                *o = capacity(f) * mean * f.ramp;
            }
        }
    } else {
        for ((input, f), o) in view.inputs.iter().zip(view.facts).zip(out.iter_mut()) {
            *o = if usable(input) {
                capacity(f) * f.ramp
            } else {
                0.0
            };
        }
    }
}

/// The default policy (module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Adaptive;

impl Policy for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn select(&self, view: &PoolView<'_>, rng: &mut dyn rand::RngCore) -> Option<usize> {
        let mut w: Weights = SmallVec::from_elem(0.0, view.inputs.len());
        adaptive_weights(view, &mut w);
        let (a, b) = two_by_weight(&mut w, rng)?;
        Some(lighter(view.facts, a, b))
    }

    fn weights(&self, view: &PoolView<'_>, out: &mut [f64]) -> bool {
        adaptive_weights(view, out);
        true
    }
}

/// Each usable server in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn select(&self, view: &PoolView<'_>, _rng: &mut dyn rand::RngCore) -> Option<usize> {
        let n = view.inputs.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| usable(&view.inputs[i]))
    }
}

/// Power of two choices on `(outstanding + 1)/capacity`.
#[derive(Debug, Clone, Copy, Default)]
pub struct P2c;

impl Policy for P2c {
    fn name(&self) -> &'static str {
        "p2c"
    }

    fn select(&self, view: &PoolView<'_>, rng: &mut dyn rand::RngCore) -> Option<usize> {
        let mut w: Weights = view
            .inputs
            .iter()
            .zip(view.facts)
            .map(|(i, f)| if usable(i) { f.ramp } else { 0.0 })
            .collect();
        let (a, b) = two_by_weight(&mut w, rng)?;
        Some(lighter(view.facts, a, b))
    }
}

/// Weighted random by configured (or learned) capacity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Static;

impl Policy for Static {
    fn name(&self) -> &'static str {
        "static"
    }

    fn select(&self, view: &PoolView<'_>, rng: &mut dyn rand::RngCore) -> Option<usize> {
        let mut w: Weights = SmallVec::from_elem(0.0, view.inputs.len());
        self.weights(view, &mut w);
        draw_weighted(&w, rng)
    }

    fn weights(&self, view: &PoolView<'_>, out: &mut [f64]) -> bool {
        for ((o, i), f) in out.iter_mut().zip(view.inputs).zip(view.facts) {
            *o = if usable(i) { capacity(f) * f.ramp } else { 0.0 };
        }
        true
    }
}

/// A server's capacity learned from its agent's data: sessions sent per
/// busy second over each window, smoothed (EWMA). Windows with little CPU
/// use say little and are skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CapacityEstimate {
    /// Sessions per second, once learned.
    pub value: Option<f64>,
}

impl CapacityEstimate {
    /// Smoothing factor of each new window.
    pub const ALPHA: f64 = 0.2;
    /// Windows below this busy fraction are skipped.
    pub const MIN_BUSY: f64 = 0.05;

    /// Takes one window: `sessions` sent during it, `busy` fraction, `secs` long.
    pub fn observe(&mut self, sessions: u64, busy: f64, secs: f64) {
        if !(busy.is_finite() && busy >= Self::MIN_BUSY && secs > 0.0) || sessions == 0 {
            return;
        }
        let x = sessions as f64 / (busy.min(1.0) * secs);
        self.value = Some(match self.value {
            None => x,
            Some(v) => v + Self::ALPHA * (x - v),
        });
    }
}

/// Capacity per server: configured, else learned, else the mean of the
/// others' (1 when nothing is known).
#[must_use]
pub fn capacities(configured: &[Option<f64>], learned: &[Option<f64>]) -> SmallVec<[f64; 16]> {
    let known: SmallVec<[f64; 16]> = configured
        .iter()
        .zip(learned)
        .filter_map(|(c, l)| c.or(*l))
        .collect();
    let mean = if known.is_empty() {
        1.0
    } else {
        known.iter().sum::<f64>() / known.len() as f64
    };
    configured
        .iter()
        .zip(learned)
        .map(|(c, l)| c.or(*l).unwrap_or(mean))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{Load, Scoring};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn up(cpu: f64) -> Input {
        Input::Up(Load {
            cpu,
            mem_available: 1 << 30,
            ..Load::default()
        })
    }

    fn shares(p: &dyn Policy, inputs: &[Input], facts: &[Facts], n: u32) -> Vec<f64> {
        let scoring = Scoring::default();
        let view = PoolView {
            inputs,
            facts,
            scoring: &scoring,
        };
        let mut rng = StdRng::seed_from_u64(9);
        let mut c = vec![0u32; inputs.len()];
        for _ in 0..n {
            c[p.select(&view, &mut rng).unwrap()] += 1;
        }
        c.iter().map(|&x| f64::from(x) / f64::from(n)).collect()
    }

    fn cap(c: f64) -> Facts {
        Facts {
            capacity: Some(c),
            ..Facts::default()
        }
    }

    #[test]
    fn names_round_trip() {
        for n in NAMES {
            assert_eq!(by_name(n).unwrap().name(), n);
        }
        assert!(by_name("fastest").is_none());
    }

    #[test]
    fn round_robin_skips_down_and_drained() {
        let inputs = [up(0.5), Input::Down, Input::NoData, Input::Drained];
        let s = shares(
            &RoundRobin::default(),
            &inputs,
            &[Facts::default(); 4],
            1000,
        );
        assert_eq!(s, [0.5, 0.0, 0.5, 0.0]);
        let none = [Input::Down, Input::Drained];
        let scoring = Scoring::default();
        let view = PoolView {
            inputs: &none,
            facts: &[Facts::default(); 2],
            scoring: &scoring,
        };
        assert_eq!(
            RoundRobin::default().select(&view, &mut StdRng::seed_from_u64(1)),
            None
        );
    }

    #[test]
    fn static_follows_capacity() {
        let inputs = [up(0.9), up(0.1), Input::NoData];
        let s = shares(&Static, &inputs, &[cap(2.0), cap(1.0), cap(1.0)], 100_000);
        for (got, want) in s.iter().zip([0.5, 0.25, 0.25]) {
            assert!((got - want).abs() < 0.01, "{s:?}");
        }
    }

    #[test]
    fn p2c_prefers_fewer_outstanding_per_capacity() {
        let inputs = [up(0.5), up(0.5)];
        let busy = Facts {
            outstanding: 10,
            ..cap(1.0)
        };
        // Two servers: both candidates always, the lighter always wins.
        assert_eq!(shares(&P2c, &inputs, &[busy, cap(1.0)], 1000), [0.0, 1.0]);
        // Per capacity: 10+1 over 20 beats 0+1 over 1.
        let big = Facts {
            outstanding: 10,
            ..cap(20.0)
        };
        assert_eq!(shares(&P2c, &inputs, &[big, cap(1.0)], 1000), [1.0, 0.0]);
    }

    #[test]
    fn cpu_now_adds_what_was_sent_and_drains_what_was_measured() {
        let f = |n, dt| Facts {
            sent_since_window: n,
            window: Some((dt, 0.5)),
            capacity: Some(100.0),
            ..Facts::default()
        };
        // Nothing sent for 0.5 s after a window at 80 %: the estimate halves.
        assert!((cpu_now(0.8, &f(0, 0.5)) - 0.4).abs() < 1e-9);
        // Sent exactly at the measured rate: the estimate holds.
        assert!((cpu_now(0.8, &f(40, 0.5)) - 0.8).abs() < 1e-9);
        // Twice that: it rises.
        assert!((cpu_now(0.8, &f(80, 0.5)) - 1.2).abs() < 1e-9);
        // No capacity or window: as measured.
        assert_eq!(cpu_now(0.8, &Facts::default()), 0.8);
    }

    #[test]
    fn adaptive_never_empties_the_pool_while_a_server_is_up() {
        // Both past C_max: the patent refuses; adaptive still routes, by capacity.
        let inputs = [up(0.99), up(0.98)];
        let s = shares(&Adaptive, &inputs, &[cap(1.0), cap(1.0)], 10_000);
        assert!(s[0] > 0.3 && s[1] > 0.3, "{s:?}");
        // No agent data anywhere: capacity weights over the usable servers.
        let inputs = [Input::NoData, Input::NoData, Input::Down];
        let s = shares(&Adaptive, &inputs, &[cap(3.0), cap(1.0), cap(5.0)], 10_000);
        assert_eq!(s[2], 0.0);
        assert!(s[0] > s[1], "{s:?}");
        // Nothing usable: none.
        let scoring = Scoring::default();
        let view = PoolView {
            inputs: &[Input::Down, Input::Drained],
            facts: &[Facts::default(); 2],
            scoring: &scoring,
        };
        assert_eq!(Adaptive.select(&view, &mut StdRng::seed_from_u64(1)), None);
    }

    #[test]
    fn adaptive_weighs_capacity_and_headroom() {
        let scoring = Scoring::default();
        let inputs = [up(0.2), up(0.2), up(0.9)];
        let facts = [cap(2.0), cap(1.0), cap(1.0)];
        let view = PoolView {
            inputs: &inputs,
            facts: &facts,
            scoring: &scoring,
        };
        let mut w = [0.0; 3];
        adaptive_weights(&view, &mut w);
        assert!((w[0] - 2.0 * w[1]).abs() < 1e-9, "{w:?}");
        assert!(w[2] < w[1] / 2.0, "{w:?}");
    }

    #[test]
    fn weighted_policies_show_their_weights() {
        let scoring = Scoring::default();
        let inputs = [up(0.5), Input::Down];
        let facts = [cap(3.0), cap(1.0)];
        let view = PoolView {
            inputs: &inputs,
            facts: &facts,
            scoring: &scoring,
        };
        let mut w = [0.0; 2];
        assert!(Static.weights(&view, &mut w));
        assert_eq!(w, [3.0, 0.0]);
        assert!(Patent.weights(&view, &mut w));
        assert_eq!(w, [75.0, 0.0], "FIG 8: (0.5 + 1) / 2");
        assert!(Adaptive.weights(&view, &mut w));
        assert!(w[0] > 0.0 && w[1] == 0.0);
        assert!(!P2c.weights(&view, &mut w));
        assert!(!RoundRobin::default().weights(&view, &mut w));
    }

    #[test]
    fn capacity_is_learned_and_defaults_to_the_mean() {
        let mut e = CapacityEstimate::default();
        e.observe(50, 0.01, 0.5);
        assert_eq!(e.value, None, "too idle to say");
        e.observe(50, 0.5, 0.5);
        assert_eq!(e.value, Some(200.0));
        e.observe(25, 0.5, 0.5);
        assert!((e.value.unwrap() - 180.0).abs() < 1e-9);
        let c = capacities(&[Some(10.0), None, None], &[None, Some(30.0), None]);
        assert_eq!(c.as_slice(), &[10.0, 30.0, 20.0]);
        assert_eq!(capacities(&[None], &[None]).as_slice(), &[1.0]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn input() -> impl Strategy<Value = Input> {
            prop_oneof![
                (0.0f64..1.2, 0u64..(8 << 30)).prop_map(|(cpu, mem)| Input::Up(Load {
                    cpu,
                    mem_available: mem,
                    ..Load::default()
                })),
                Just(Input::NoData),
                Just(Input::Down),
                Just(Input::Drained),
            ]
        }

        fn facts() -> impl Strategy<Value = Facts> {
            (
                0u32..500,
                proptest::option::of((0.0f64..3.0, 0.1f64..1.0)),
                0u32..100,
                proptest::option::of(1.0f64..1000.0),
                0.1f64..=1.0,
            )
                .prop_map(|(sent, window, outstanding, capacity, ramp)| Facts {
                    sent_since_window: sent,
                    window,
                    outstanding,
                    capacity,
                    ramp,
                })
        }

        proptest! {
            /// Whatever the data: no policy but `patent` refuses while a
            /// server is usable, none picks a server that is down or
            /// drained, and `patent` picks only a server with a score.
            #[test]
            fn policies_pick_only_usable_servers(
                pool in proptest::collection::vec((input(), facts()), 1..12),
                seed in any::<u64>(),
            ) {
                let (inputs, facts): (Vec<Input>, Vec<Facts>) = pool.into_iter().unzip();
                let scoring = Scoring::default();
                let view = PoolView { inputs: &inputs, facts: &facts, scoring: &scoring };
                let any_usable = inputs.iter().any(usable);
                for name in NAMES {
                    let p = by_name(name).unwrap();
                    let mut rng = StdRng::seed_from_u64(seed);
                    for _ in 0..5 {
                        let pick = p.select(&view, &mut rng);
                        if let Some(i) = pick {
                            prop_assert!(usable(&inputs[i]), "{name} picked {:?}", inputs[i]);
                        }
                        if name == "patent" {
                            if let Some(i) = pick {
                                prop_assert!(matches!(inputs[i], Input::Up(_)));
                            }
                        } else {
                            prop_assert_eq!(pick.is_some(), any_usable, "{}", name);
                        }
                    }
                    let mut w = vec![0.0; inputs.len()];
                    if p.weights(&view, &mut w) {
                        for (x, i) in w.iter().zip(&inputs) {
                            prop_assert!(x.is_finite() && *x >= 0.0);
                            if !usable(i) {
                                prop_assert_eq!(*x, 0.0);
                            }
                        }
                    }
                }
            }

            /// The in-flight estimate never goes negative and grows with what was sent.
            #[test]
            fn cpu_now_is_monotone_in_sent(cpu in 0.0f64..1.0, f in facts(), more in 1u32..100) {
                let a = cpu_now(cpu, &f);
                let b = cpu_now(cpu, &Facts { sent_since_window: f.sent_since_window + more, ..f });
                prop_assert!(a >= 0.0 && a.is_finite());
                prop_assert!(b >= a);
            }
        }
    }
}
