//! `siplb demo` as a new user runs it: FIG 15's scores, selections that follow
//! them, no failed call, repeatable with a seed.

use std::process::Command;

fn demo(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_siplb"))
        .arg("demo")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn fig15_scores_and_selections() {
    let r = demo(&["--json", "--seed", "42", "--calls", "100"]);
    let want = [[70, 78], [26, 76], [87, 17], [29, 29]];
    let readings = [
        [(1, 60_456), (2, 85_892)],
        [(95, 113_420), (0, 125_549)],
        [(2, 57_612), (88, 16_888)],
        [(92, 101_234), (89, 95_425)],
    ];
    let scenarios = r["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 4);
    for (i, s) in scenarios.iter().enumerate() {
        assert_eq!(s["scenario"], i + 1);
        assert_eq!(s["calls"], 100);
        assert_eq!(s["failed"], 0, "scenario {}", i + 1);
        let servers = s["servers"].as_array().unwrap();
        let scores: Vec<u64> = servers
            .iter()
            .map(|v| v["score"].as_u64().unwrap())
            .collect();
        assert_eq!(scores, want[i], "scenario {}", i + 1);
        for (k, v) in servers.iter().enumerate() {
            assert_eq!(v["cpu_percent"], readings[i][k].0);
            assert_eq!(v["free_memory_kb"], readings[i][k].1);
        }
        let sel: Vec<u64> = servers
            .iter()
            .map(|v| v["selected"].as_u64().unwrap())
            .collect();
        assert_eq!(sel.iter().sum::<u64>(), 100);
        // Selections follow the scores: within 15 calls of the expected share
        // (100 draws: two standard deviations are under 10).
        let expect = 100.0 * scores[0] as f64 / (scores[0] + scores[1]) as f64;
        assert!(
            (sel[0] as f64 - expect).abs() <= 15.0,
            "scenario {}: {sel:?} for scores {scores:?}",
            i + 1
        );
    }
    // The same seed gives the same selections.
    let again = demo(&["--json", "--seed", "42", "--calls", "100"]);
    assert_eq!(again["scenarios"], r["scenarios"]);
}

#[test]
fn the_table_has_the_figure_columns() {
    let out = Command::new(env!("CARGO_BIN_EXE_siplb"))
        .args(["demo", "--seed", "1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for col in [
        "Scenario",
        "Server",
        "CPU utilisation",
        "Free memory (KB)",
        "Performance score",
        "Times selected",
    ] {
        assert!(text.contains(col), "{text}");
    }
    assert_eq!(text.matches("20 calls, 0 failed").count(), 4, "{text}");
}

/// `siplb experiment` in short: real SIP through two balancers with the
/// adaptive policy over a loaded 1.0/0.5 pool; every call answered, both
/// servers used, the faster one more; both balancers set up half the calls
/// and each forwarded the other's ACKs and BYEs (the pool's name in the
/// Record-Route: any instance routes any in-dialog request); a bad argument
/// exits 2.
#[test]
fn experiment_runs_real_calls_through_two_balancers() {
    let out = Command::new(env!("CARGO_BIN_EXE_siplb"))
        .args([
            "experiment",
            "--pool",
            "1,0.5",
            "--load",
            "0.6",
            "--seconds",
            "3",
        ])
        .args(["--balancers", "2", "--policy", "adaptive", "--seed", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let calls = r["calls"].as_u64().unwrap();
    assert!(calls > 100, "{r}");
    assert_eq!(r["answered"].as_u64().unwrap(), calls, "{r}");
    assert_eq!(r["refused"], 0);
    assert_eq!(r["lost"], 0);
    let per: Vec<[u64; 2]> = r["per_second"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| [b[0].as_u64().unwrap(), b[1].as_u64().unwrap()])
        .collect();
    let (a, b) = per.iter().fold((0, 0), |(x, y), s| (x + s[0], y + s[1]));
    assert!(a > b && b > 0, "capacity 1.0 server {a}, 0.5 server {b}");
    assert!(r["p99_ms"].as_f64().unwrap() > 0.0);
    // Each balancer: half the new calls, and the ACK and BYE of the
    // other's calls (a call's in-dialog requests go through the other one).
    let lbs = r["per_balancer"].as_array().unwrap();
    assert_eq!(lbs.len(), 2, "{r}");
    let new: Vec<u64> = lbs
        .iter()
        .map(|b| b["new_calls"].as_u64().unwrap())
        .collect();
    assert_eq!(new[0] + new[1], calls, "{r}");
    assert!(new[0].abs_diff(new[1]) <= 1, "{r}");
    // Its own INVITEs, and an ACK and a BYE for each of the other's calls
    // (a BYE retransmitted under load may add one; with each balancer's own
    // address in the Record-Route instead of the pool's, it forwards its
    // INVITEs only).
    for (k, lb) in lbs.iter().enumerate() {
        let forwarded = lb["forwarded"].as_u64().unwrap();
        assert!(forwarded >= new[k] + 2 * new[1 - k], "{r}");
    }

    let bad = Command::new(env!("CARGO_BIN_EXE_siplb"))
        .args(["experiment", "--policy", "fastest"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("round-robin"));
}
