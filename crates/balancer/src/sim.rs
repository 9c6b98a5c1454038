//! A discrete-event model of a pool behind one balancer, to test routing
//! policies against herding (after `shared/studies/balancing`). Pure and
//! seeded: same config, same numbers.
//!
//! Servers are single-core FIFO queues with exponential service (mean 5 ms
//! at capacity 1.0); new calls arrive as a Poisson stream at `load` × the
//! pool's capacity; each server's agent measures its busy fraction over
//! tumbling windows (random phase); the balancer polls every `poll` and sees
//! the last completed window, with its end time and length, as the real
//! pipeline does. The policy under test picks through the same
//! [`Policy`] trait and [`PoolView`] the proxy uses.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::load::{Input, Load, Scoring};
use crate::select::{Facts, Policy, PoolView};

/// One simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Capacity per server (1.0 = 200 calls/s).
    pub capacities: Vec<f64>,
    /// Offered load, a fraction of the pool's capacity.
    pub load: f64,
    /// Poll period, seconds.
    pub poll: f64,
    /// Agent window, seconds.
    pub window: f64,
    /// New calls.
    pub calls: u32,
    /// Seed.
    pub seed: u64,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct SimResult {
    /// Median call-setup time, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Calls no server was chosen for.
    pub refused: u32,
    /// Per-second share std-dev in excess of binomial noise, mean over servers.
    pub share_sd_excess: f64,
    /// Calls per server per second, `[second][server]`.
    pub per_second: Vec<Vec<u32>>,
    /// Utilisation per server.
    pub utilisation: Vec<f64>,
    /// Slowest call-setup time per second of arrival, ms.
    pub slowest_per_second: Vec<f64>,
}

/// Mean service time at capacity 1.0, seconds.
const SERVICE: f64 = 0.005;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival,
    Departure(usize),
    WindowEnd(usize),
    Poll,
}

struct Server {
    queue: VecDeque<f64>,
    busy_total: f64,
    busy_since: Option<f64>,
    /// Busy total, sent count and time at the last window end.
    mark: (f64, u32, f64),
    /// Last completed window: busy fraction, end time, sends up to its end, length.
    done: Option<(f64, f64, u32, f64)>,
    sent: u32,
}

impl Server {
    fn busy_at(&self, t: f64) -> f64 {
        self.busy_total + self.busy_since.map_or(0.0, |s| t - s)
    }
}

fn exp(rng: &mut StdRng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

/// Runs `policy` on `cfg`.
#[must_use]
#[allow(clippy::too_many_lines)]
pub fn run(cfg: &SimConfig, policy: &dyn Policy) -> SimResult {
    let n = cfg.capacities.len();
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    // Arrivals and service from their own stream: common random numbers
    // across policies.
    let mut arrivals_rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed);
    let mu: Vec<f64> = cfg.capacities.iter().map(|c| c / SERVICE).collect();
    let rate = cfg.load * mu.iter().sum::<f64>();
    let mut servers: Vec<Server> = (0..n)
        .map(|_| Server {
            queue: VecDeque::new(),
            busy_total: 0.0,
            busy_since: None,
            mark: (0.0, 0, 0.0),
            done: None,
            sent: 0,
        })
        .collect();
    let mut heap: BinaryHeap<Reverse<(u64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let ns = |t: f64| (t * 1e9) as u64;
    let mut push = |heap: &mut BinaryHeap<_>, t: f64, e: Ev| {
        seq += 1;
        heap.push(Reverse((ns(t), seq, e)));
    };
    for i in 0..n {
        let phase = rng.random::<f64>() * cfg.window;
        push(&mut heap, phase, Ev::WindowEnd(i));
    }
    push(&mut heap, rng.random::<f64>() * cfg.poll, Ev::Poll);
    push(&mut heap, exp(&mut arrivals_rng, 1.0 / rate), Ev::Arrival);

    let scoring = Scoring::default();
    let mut table: Vec<Option<(f64, f64, u32, f64)>> = vec![None; n];
    let mut arrived = 0u32;
    let mut refused = 0u32;
    let mut times: Vec<f64> = Vec::with_capacity(cfg.calls as usize);
    let warmup = cfg.calls / 20;
    let mut per_second: Vec<Vec<u32>> = Vec::new();
    let mut inputs = vec![Input::NoData; n];
    let mut facts = vec![Facts::default(); n];
    let mut end = 0.0;
    let mut slowest: Vec<f64> = Vec::new();
    while let Some(Reverse((t_ns, _, ev))) = heap.pop() {
        let t = t_ns as f64 / 1e9;
        end = t;
        match ev {
            Ev::Arrival => {
                arrived += 1;
                if arrived < cfg.calls {
                    push(
                        &mut heap,
                        t + exp(&mut arrivals_rng, 1.0 / rate),
                        Ev::Arrival,
                    );
                }
                for i in 0..n {
                    inputs[i] = match table[i] {
                        Some((c, _, _, _)) => Input::Up(Load {
                            cpu: c,
                            // Memory in proportion to capacity.
                            mem_available: (cfg.capacities[i] * f64::from(1u32 << 30)) as u64,
                            ..Load::default()
                        }),
                        None => Input::NoData,
                    };
                    let s = &servers[i];
                    facts[i] = Facts {
                        sent_since_window: table[i].map_or(0, |(_, _, sent, _)| s.sent - sent),
                        window: table[i].map(|(_, end, _, w)| (t - end, w)),
                        outstanding: s.queue.len() as u32,
                        capacity: Some(mu[i]),
                        ramp: 1.0,
                    };
                }
                let view = PoolView {
                    inputs: &inputs,
                    facts: &facts,
                    scoring: &scoring,
                };
                let Some(i) = policy.select(&view, &mut rng) else {
                    refused += 1;
                    continue;
                };
                let sec = t as usize;
                if per_second.len() <= sec {
                    per_second.resize(sec + 1, vec![0; n]);
                }
                per_second[sec][i] += 1;
                let s = &mut servers[i];
                s.sent += 1;
                s.queue.push_back(t);
                if s.queue.len() == 1 {
                    s.busy_since = Some(t);
                    let d = exp(&mut arrivals_rng, SERVICE / cfg.capacities[i]);
                    push(&mut heap, t + d, Ev::Departure(i));
                }
            }
            Ev::Departure(i) => {
                let s = &mut servers[i];
                let a = s.queue.pop_front().expect("a call in service");
                times.push(t - a);
                let sec = a as usize;
                if slowest.len() <= sec {
                    slowest.resize(sec + 1, 0.0);
                }
                slowest[sec] = f64::max(slowest[sec], (t - a) * 1000.0);
                if s.queue.is_empty() {
                    s.busy_total += t - s.busy_since.take().unwrap_or(t);
                } else {
                    let d = exp(&mut arrivals_rng, SERVICE / cfg.capacities[i]);
                    push(&mut heap, t + d, Ev::Departure(i));
                }
            }
            Ev::WindowEnd(i) => {
                let s = &mut servers[i];
                let busy = s.busy_at(t);
                // The first window is partial (it starts at 0).
                let w = t - s.mark.2;
                let c = if w > 0.0 {
                    ((busy - s.mark.0) / w).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                s.done = (w > 0.0).then_some((c, t, s.sent, w));
                s.mark = (busy, s.sent, t);
                if arrived < cfg.calls {
                    push(&mut heap, t + cfg.window, Ev::WindowEnd(i));
                }
            }
            Ev::Poll => {
                for i in 0..n {
                    table[i] = servers[i].done;
                }
                if arrived < cfg.calls {
                    push(&mut heap, t + cfg.poll, Ev::Poll);
                }
            }
        }
    }
    // Percentiles after warm-up (the first 5 % of completions).
    let mut steady: Vec<f64> = times[(warmup as usize).min(times.len())..].to_vec();
    steady.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        if steady.is_empty() {
            0.0
        } else {
            steady[((steady.len() - 1) as f64 * p).round() as usize] * 1000.0
        }
    };
    let utilisation = servers
        .iter()
        .map(|s| if end > 0.0 { s.busy_at(end) / end } else { 0.0 })
        .collect();
    SimResult {
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        refused,
        share_sd_excess: share_sd_excess(&per_second),
        per_second,
        utilisation,
        slowest_per_second: slowest,
    }
}

/// Std-dev of each server's per-second share beyond binomial noise
/// (`sqrt(max(0, var − mean(p(1−p)/n)))`), averaged over servers; the first
/// and last seconds are left out.
#[must_use]
pub fn share_sd_excess(per_second: &[Vec<u32>]) -> f64 {
    let bins: Vec<&Vec<u32>> = per_second
        .iter()
        .skip(1)
        .take(per_second.len().saturating_sub(2))
        .filter(|b| b.iter().sum::<u32>() > 0)
        .collect();
    if bins.len() < 2 {
        return 0.0;
    }
    let n = bins[0].len();
    let mut total = 0.0;
    for i in 0..n {
        let shares: Vec<(f64, f64)> = bins
            .iter()
            .map(|b| {
                let all = f64::from(b.iter().sum::<u32>());
                (f64::from(b[i]) / all, all)
            })
            .collect();
        let mean = shares.iter().map(|s| s.0).sum::<f64>() / shares.len() as f64;
        let var =
            shares.iter().map(|s| (s.0 - mean).powi(2)).sum::<f64>() / (shares.len() - 1) as f64;
        let noise = shares
            .iter()
            .map(|s| mean * (1.0 - mean) / s.1)
            .sum::<f64>()
            / shares.len() as f64;
        total += (var - noise).max(0.0).sqrt();
    }
    total / n as f64
}
