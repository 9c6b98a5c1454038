#!/usr/bin/env python3
"""Soak, on loopback only: CALLS calls at RATE calls/s through one siplb
balancer, its memory sampled every second.

Two synthetic `siplb agent`s (7071, 7072), two SIPp uas (5081, 5082,
bench/sipp/uas_rr.xml), `siplb balancer --config examples/local.toml`, SIPp's
uac with bench/sipp/uac_rr.xml (ACK and BYE through our Record-Route, calls
held HOLD ms). Passes (exit 0) when no call failed and the balancer's RSS at
the end is within 10 % of its RSS after warm-up (the first 10 % of the run,
and at least 40 s: a transaction entry lives up to 64 x T1 = 32 s).
Every process is started here and stopped by its PID; bounded in calls and time.

    python3 bench/soak.py --calls 100000 --rate 1000
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import sipp_totals, stop_all  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The warm-up lasts at least this long (s): 64 x T1 and a margin.
WARM_S = 40


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def metric(name):
    try:
        with urllib.request.urlopen("http://127.0.0.1:8060/metrics", timeout=0.5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--hold", type=int, default=500, help="ms between ACK and BYE")
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    a = ap.parse_args()
    if not os.access(a.siplb, os.X_OK):
        subprocess.run(["cargo", "build", "-q", "--release", "-p", "siplb"], cwd=ROOT, check=True)
    seconds = a.calls / a.rate
    work = tempfile.mkdtemp(prefix="siplb-soak-")
    log = open(os.path.join(work, "log"), "w")
    key = os.path.join(ROOT, "examples/agent.key")
    procs = []

    def start(cmd, out=log, cwd=ROOT):
        p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        for port in (7071, 7072):
            start([a.siplb, "agent", "--listen", f"127.0.0.1:{port}", "--key-file", key, "--synthetic", "cpu=10%,mem=1GB"])
        for port in (5081, 5082):
            start(["sipp", "-sf", os.path.join(ROOT, "bench/sipp/uas_rr.xml"), "-i", "127.0.0.1", "-p", str(port),
                   "-nostdin", "-timeout", str(int(seconds) + 120)], subprocess.DEVNULL)
        lb = start([a.siplb, "balancer", "--config", "local.toml"], cwd=os.path.join(ROOT, "examples"))
        time.sleep(1.5)
        stat = os.path.join(work, "stat.csv")
        uac = start(["sipp", "-sf", os.path.join(ROOT, "bench/sipp/uac_rr.xml"), "127.0.0.1:5060", "-i", "127.0.0.1",
                     "-p", "5070", "-nostdin", "-r", str(a.rate), "-m", str(a.calls), "-d", str(a.hold),
                     "-timeout", str(int(seconds) + 120), "-trace_stat", "-stf", stat, "-fd", "5", "-trace_err"],
                    open(os.path.join(work, "uac.out"), "w"), cwd=work)
        t0 = time.time()
        series = []  # (t, rss_kb)
        while uac.poll() is None and time.time() - t0 < seconds + 120:
            series.append((time.time() - t0, rss_kb(lb.pid)))
            time.sleep(1)
        if uac.poll() is None:
            uac.kill()
        time.sleep(1.5)
        series.append((time.time() - t0, rss_kb(lb.pid)))
        sessions, transactions = metric("siplb_sessions"), metric("siplb_transactions")
    finally:
        stop_all(procs)
    d = sipp_totals(stat)
    ok, failed = int(d["SuccessfulCall(C)"]), int(d["FailedCall(C)"])
    failed += a.calls - ok - failed  # unfinished or never placed
    # Warm-up: the first tenth of the run, and at least WARM_S: the longest
    # a transaction entry lives is 64 x T1 (32 s), so the tables (and the
    # allocator's pages under them) cannot have settled before that.
    warm = [r for t, r in series if t <= max(seconds * 0.1, WARM_S, 2)]
    warm_rss = warm[-1] if warm else series[0][1]
    end_rss = series[-1][1]
    peak = max(r for _, r in series)
    growth = (end_rss - warm_rss) / warm_rss * 100
    print(f"calls {a.calls} at {a.rate}/s (held {a.hold} ms): successful {ok}, failed {failed}")
    print(f"balancer RSS: after warm-up {warm_rss} kB, end {end_rss} kB ({growth:+.1f} %), peak {peak} kB, "
          f"median {statistics.median(r for _, r in series):.0f} kB")
    print(f"after the run: sessions {sessions}, transactions {transactions}")
    tenths = [series[int(i * (len(series) - 1) / 10)][1] for i in range(11)]
    print("RSS at each tenth of the run (kB):", " ".join(map(str, tenths)))
    print(json.dumps({"calls": a.calls, "rate": a.rate, "successful": ok, "failed": failed, "rss_warm_kb": warm_rss,
                      "rss_end_kb": end_rss, "rss_peak_kb": peak, "growth_percent": round(growth, 1),
                      "sessions_after": sessions, "transactions_after": transactions}))
    passed = failed == 0 and abs(growth) <= 10
    print("PASS" if passed else "FAIL", f"(logs in {work})")
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
