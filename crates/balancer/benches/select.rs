//! `cargo bench -p balancer`: score + selection for one new session over
//! pools of 2, 16 and 256 servers (target: well under 1 µs for 16).

use balancer::{Facts, Input, Load, Patent, Policy, PoolView, Scoring};
use divan::{Bencher, black_box};
use rand::SeedableRng;
use rand::rngs::SmallRng;

fn main() {
    divan::main();
}

fn pool(n: usize) -> Vec<Input> {
    (0..n)
        .map(|i| {
            Input::Up(Load {
                cpu: (i % 10) as f64 / 10.0,
                mem_available: (100 + i as u64 % 7 * 50) << 20,
                ..Load::default()
            })
        })
        .collect()
}

#[divan::bench(args = [2, 16, 256])]
fn patent_score_and_select(b: Bencher, n: usize) {
    let inputs = pool(n);
    let facts = vec![Facts::default(); n];
    let scoring = Scoring::default();
    let mut rng = SmallRng::seed_from_u64(1);
    b.bench_local(|| {
        let view = PoolView {
            inputs: black_box(&inputs),
            facts: &facts,
            scoring: &scoring,
        };
        Patent.select(&view, &mut rng)
    });
}

#[divan::bench(args = [2, 16, 256])]
fn adaptive_select(b: Bencher, n: usize) {
    let inputs = pool(n);
    // In flight since a window that ended 200 ms ago, capacities 100-400/s.
    let facts: Vec<Facts> = (0..n)
        .map(|i| Facts {
            sent_since_window: (i % 5) as u32 * 10,
            window: Some((0.2, 0.5)),
            outstanding: (i % 3) as u32,
            capacity: Some(100.0 * (1 + i % 4) as f64),
            ramp: 1.0,
        })
        .collect();
    let scoring = Scoring::default();
    let mut rng = SmallRng::seed_from_u64(1);
    b.bench_local(|| {
        let view = PoolView {
            inputs: black_box(&inputs),
            facts: &facts,
            scoring: &scoring,
        };
        balancer::policy::Adaptive.select(&view, &mut rng)
    });
}
