#!/usr/bin/env python3
"""The routing policies with real SIP on loopback (`siplb experiment`), as a
grid, with its table and plots for docs/balancing.md.

Each run: built-in UAS whose answer time grows with their load (FIFO,
exponential service, 10 ms mean at capacity 1.0), an agent per server
reporting its real busy fraction over 500 ms windows, siplb's balancer(s),
Poisson calls at a fraction of the pool's capacity. Pools: 1.0/0.5 (N=2) and
4x1.0 + 2x0.5 + 2x0.25 (N=8). Runs: every policy at 70/85/95 % with polls
every 500 ms; adaptive and patent also at 100 and 2000 ms; adaptive with two
balancers. Bounded: SECONDS per run, each run a child process with a time limit.

    python3 bench/experiment.py --seconds 15
Writes docs/img/exp_results.jsonl, docs/img/exp_p99_vs_load.svg and
docs/img/exp_share.svg, and prints the markdown tables.

    python3 bench/experiment.py --instances 1,2,3,4 --runs 3 --seconds 20
Load over several instances (issue 17): adaptive at 85 %, polls every 500 ms,
on each pool with 1, 2, 3, 4 balancers (new calls round robin over them, each
call's ACK and BYE through the next one), RUNS seeds each (the same seeds for
every count, so every count gets the same arrivals and service times); prints
each run, the medians, the spread and the p99 ratio to one balancer. Writes
nothing.
"""
import argparse, json, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sim_plot import svg_lines  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOLS = {"N=2": "1,0.5", "N=8": "1,1,1,1,0.5,0.5,0.25,0.25"}
POLICIES = ["adaptive", "patent", "p2c", "static", "round-robin"]


def run(siplb, pool, load, policy, poll, seconds, balancers=1, seed=1):
    cmd = [siplb, "experiment", "--pool", POOLS[pool], "--load", str(load), "--policy", policy,
           "--poll-ms", str(poll), "--seconds", str(seconds), "--balancers", str(balancers),
           "--seed", str(seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 90)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: {out.stderr}")
    r = json.loads(out.stdout)
    r["pool"] = pool
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} {pool} {policy:11} load {load} poll {poll:4} lbs {balancers} "
          f"seed {seed}: p50 {r['p50_ms']:8.1f} p99 {r['p99_ms']:8.1f} "
          f"refused {r['refused']} lost {r['lost']} sd {r['share_sd_excess']:.3f} "
          f"new calls per balancer {[b['new_calls'] for b in r['per_balancer']]}", file=sys.stderr, flush=True)
    return r


def instances(a):
    """adaptive at 85 % with 1..4 balancers, RUNS seeds each: medians and ratios."""
    counts = [int(n) for n in a.instances.split(",")]
    print(f"started {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC", flush=True)
    for pool in POOLS:
        rows = {}
        for seed in range(a.first_seed, a.first_seed + a.runs):
            # Interleaved (1, 2, 3, 4, 1, 2, ...): a neighbour's load on the
            # machine falls on every count alike.
            for n in counts:
                rows.setdefault(n, []).append(run(a.siplb, pool, 0.85, "adaptive", 500, a.seconds, n, seed))
        base = statistics.median(r["p99_ms"] for r in rows[counts[0]])
        print(f"\n{pool} ({POOLS[pool]}), adaptive, 85 %, polls every 500 ms, {a.runs} runs of {a.seconds:g} s "
              f"(seeds {a.first_seed}-{a.first_seed + a.runs - 1}); INVITE→200 ms\n")
        print("| balancers | p50 median | p99 median (min-max) | p99 / one balancer's | calls, failed | new calls per balancer (median run) |")
        print("|---:|---:|---:|---:|---:|---|")
        for n in counts:
            rs = rows[n]
            p99s = sorted(r["p99_ms"] for r in rs)
            med = statistics.median(p99s)
            mid = sorted(rs, key=lambda r: r["p99_ms"])[len(rs) // 2]
            failed = sum(r["refused"] + r["lost"] for r in rs)
            print(f"| {n} | {statistics.median(r['p50_ms'] for r in rs):.0f} | {med:.0f} ({p99s[0]:.0f}-{p99s[-1]:.0f}) | "
                  f"{med / base:.2f} | {sum(r['calls'] for r in rs)}, {failed} | "
                  f"{'/'.join(str(b['new_calls']) for b in mid['per_balancer'])} |", flush=True)
    print(f"ended {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    ap.add_argument("--instances", help="balancer counts, e.g. 1,2,3,4: the load-over-instances runs only")
    ap.add_argument("--runs", type=int, default=3, help="seeds per balancer count (--instances)")
    ap.add_argument("--first-seed", type=int, default=1, help="the first of the --runs seeds")
    a = ap.parse_args()
    if not os.access(a.siplb, os.X_OK):
        subprocess.run(["cargo", "build", "-q", "--release", "-p", "siplb"], cwd=ROOT, check=True)
    if a.instances:
        return instances(a)
    results = []
    for pool in POOLS:
        for load in (0.7, 0.85, 0.95):
            for policy in POLICIES:
                results.append(run(a.siplb, pool, load, policy, 500, a.seconds))
            for policy in ("adaptive", "patent"):
                for poll in (100, 2000):
                    results.append(run(a.siplb, pool, load, policy, poll, a.seconds))
        results.append(run(a.siplb, pool, 0.85, "adaptive", 500, a.seconds, balancers=2))
    img = os.path.join(ROOT, "docs/img")
    os.makedirs(img, exist_ok=True)
    with open(os.path.join(img, "exp_results.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps({k: v for k, v in r.items() if k != "per_second"}) + "\n")
    key = lambda r: (r["pool"], r["config"]["policy"], r["config"]["load"], r["config"]["poll_ms"], r["config"]["balancers"])
    by = {key(r): r for r in results}
    panels = []
    for pool in POOLS:
        series = {p: [(l, max(by[(pool, p, l, 500, 1)]["p99_ms"], 1)) for l in (0.7, 0.85, 0.95)] for p in POLICIES}
        panels.append((f"{pool}, polls every 500 ms", series))
    svg_lines(os.path.join(img, "exp_p99_vs_load.svg"), "Real SIP on loopback: INVITE to 200 p99 (ms, log scale) against load",
              panels, "offered load (fraction of pool capacity)", "p99 ms", True, [0.7, 0.8, 0.85, 0.9, 0.95],
              [10, 100, 1000, 10000, 100000])
    panels = []
    for p in ("patent", "adaptive"):
        r = by[("N=2", p, 0.85, 500, 1)]
        pts = [(i, b[1] / sum(b)) for i, b in enumerate(r["per_second"]) if sum(b) > 0]
        panels.append((p, {p: pts}))
    svg_lines(os.path.join(img, "exp_share.svg"), "Real SIP: share of new calls to the slow server (capacity 0.5) per second, N=2, 85 %, 500 ms polls",
              panels, "seconds", "share", False, [0, 5, 10, 15, 20], [0, 0.25, 0.5, 0.75, 1])
    for pool in POOLS:
        print(f"\n{pool}: INVITE→200 p99 ms (p50) at polls every 500 ms; refused or lost calls; share sd excess\n")
        print("| policy | ρ=0.7 | ρ=0.85 | ρ=0.95 |\n|---|---:|---:|---:|")
        for p in POLICIES:
            cells = []
            for l in (0.7, 0.85, 0.95):
                r = by[(pool, p, l, 500, 1)]
                bad = r["refused"] + r["lost"]
                cells.append(f"{r['p99_ms']:.0f} ({r['p50_ms']:.0f})" + (f", {bad} refused/lost" if bad else "") +
                             (f", sd {r['share_sd_excess']:.2f}" if r["share_sd_excess"] > 0.02 else ""))
            print(f"| {p} | " + " | ".join(cells) + " |")
        print(f"\n{pool}: p99 ms at polls every 100 / 500 / 2000 ms\n")
        print("| policy | ρ=0.7 | ρ=0.85 | ρ=0.95 |\n|---|---:|---:|---:|")
        for p in ("adaptive", "patent"):
            print(f"| {p} | " + " | ".join(" / ".join(f"{by[(pool, p, l, poll, 1)]['p99_ms']:.0f}" for poll in (100, 500, 2000))
                                          for l in (0.7, 0.85, 0.95)) + " |")
        two = by[(pool, "adaptive", 0.85, 500, 2)]
        one = by[(pool, "adaptive", 0.85, 500, 1)]
        print(f"\n{pool} adaptive at 85 %, 500 ms: one balancer p99 {one['p99_ms']:.0f} ms (p50 {one['p50_ms']:.0f}), "
              f"two balancers p99 {two['p99_ms']:.0f} ms (p50 {two['p50_ms']:.0f}), refused/lost {two['refused'] + two['lost']}, "
              f"utilisation {[round(u, 2) for u in two['utilisation']]}")


if __name__ == "__main__":
    main()
