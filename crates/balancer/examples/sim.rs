//! The simulation grid behind docs/balancing.md: every policy on two pools,
//! at 50-95 % load, polls every 100 / 500 / 2000 ms. Prints one CSV row per
//! run (median of `--seeds` seeds for p50/p99); `--series FILE` also writes
//! the per-second share of the slow server for N=2, 85 %, 500 ms.
//!
//!     cargo run --release -p balancer --example sim -- --seeds 3 > results.csv

use balancer::policy::by_name;
use balancer::sim::{SimConfig, run};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let seeds: u64 = opt("--seeds").map_or(3, |s| s.parse().expect("--seeds N"));
    let calls: u32 = opt("--calls").map_or(100_000, |s| s.parse().expect("--calls N"));
    let series = opt("--series");
    let pools: [(&str, Vec<f64>); 2] = [
        ("N=2", vec![1.0, 0.5]),
        ("N=8", vec![1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]),
    ];
    println!("pool,policy,load,poll_ms,p50_ms,p99_ms,refused_percent,share_sd_excess");
    for (pool, caps) in &pools {
        for load in [0.5, 0.7, 0.85, 0.95] {
            for poll in [0.1, 0.5, 2.0] {
                for name in balancer::policy::NAMES {
                    let policy = by_name(name).expect("a policy");
                    let mut p50 = vec![];
                    let mut p99 = vec![];
                    let mut refused = vec![];
                    let mut sd = vec![];
                    for seed in 0..seeds {
                        let cfg = SimConfig {
                            capacities: caps.clone(),
                            load,
                            poll,
                            window: 0.5,
                            calls,
                            seed,
                        };
                        let r = run(&cfg, policy.as_ref());
                        p50.push(r.p50_ms);
                        p99.push(r.p99_ms);
                        refused.push(f64::from(r.refused) * 100.0 / f64::from(calls));
                        sd.push(r.share_sd_excess);
                        if seed == 0
                            && *pool == "N=2"
                            && load == 0.85
                            && poll == 0.5
                            && let Some(f) = &series
                        {
                            use std::io::Write;
                            let mut out = std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(f)
                                .expect("series file");
                            for (sec, b) in r.per_second.iter().enumerate().take(120) {
                                let all: u32 = b.iter().sum();
                                let share = if all > 0 {
                                    f64::from(b[1]) / f64::from(all)
                                } else {
                                    0.0
                                };
                                let _ = writeln!(out, "{name},{sec},{share:.4}");
                            }
                        }
                    }
                    println!(
                        "{pool},{name},{load},{},{:.1},{:.1},{:.2},{:.3}",
                        (poll * 1000.0) as u32,
                        median(p50),
                        median(p99),
                        median(refused),
                        median(sd)
                    );
                }
            }
        }
    }
}
