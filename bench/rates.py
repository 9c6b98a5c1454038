#!/usr/bin/env python3
"""siplb (and Kamailio's dispatcher) under SIPp at rising call rates, on loopback only.

Starts two `siplb agent`s (synthetic, equal readings) and two `sipp -sn uas`
servers on 127.0.0.1:5081/5082; then, for each balancer in turn —
`siplb balancer --config examples/local.toml` (127.0.0.1:5060) and Kamailio
with bench/kamailio/kamailio.cfg (tm, Record-Route, dispatcher, 2 workers,
127.0.0.1:5065, started in the foreground) — runs SIPp's built-in `uac`
(default, strict settings) at each rate for a fixed number of seconds and
reports: offered and achieved calls/s, failed calls (and SIPp's reasons),
retransmissions, INVITE->200 p50/p99, and the balancer's CPU (utime+stime of
all its processes) per 1,000 calls. It ends with the ratios siplb/Kamailio.
Every process is started here and stopped by its PID; every run is bounded in
calls and time.

    python3 bench/rates.py --rates 1000,3000,5000,7000 --seconds 10 --balancers siplb,kamailio
"""
import argparse, glob, json, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def descendants(pid):
    """pid and every process under it."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ms(pid):
    """utime + stime of pid and its descendants, ms."""
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            pass
    return total * 1000 / TICK


def start(cmd, log):
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL)


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def parse_stats(stat_csv):
    """Last line of SIPp's -trace_stat file, as a dict."""
    with open(stat_csv) as f:
        lines = [l.rstrip("\n") for l in f if l.strip()]
    head = lines[0].split(";")
    last = lines[-1].split(";")
    return dict(zip(head, last))


def rtts(work):
    vals = []
    for path in glob.glob(os.path.join(work, "*_rtt.csv")):
        with open(path) as f:
            for line in f:
                parts = line.strip().split(";")
                if len(parts) >= 3 and parts[2].strip() == "1":
                    try:
                        vals.append(float(parts[1]))
                    except ValueError:
                        pass
    return vals


def pct(vals, q):
    if not vals:
        return float("nan")
    s = sorted(vals)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_rate(rate, seconds, balancer_pid, work, target):
    for f in glob.glob(os.path.join(work, "uac_*")):
        os.remove(f)
    calls = rate * seconds
    before = cpu_ms(balancer_pid)
    t0 = time.time()
    uac = subprocess.run(
        ["sipp", "-sn", "uac", target, "-i", "127.0.0.1", "-p", "5070", "-nostdin",
         "-r", str(rate), "-m", str(calls), "-timeout", str(seconds * 3 + 30),
         "-trace_stat", "-stf", os.path.join(work, "uac_stat.csv"), "-fd", "1",
         "-trace_rtt", "-rtt_freq", "1", "-trace_err", "-error_file", os.path.join(work, "uac_err.log")],
        cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - t0
    used = cpu_ms(balancer_pid) - before
    st = parse_stats(os.path.join(work, "uac_stat.csv"))
    ok = int(st.get("SuccessfulCall(C)", 0))
    failed = int(st.get("FailedCall(C)", 0))
    reasons = {k: int(v) for k, v in st.items() if k.startswith("Failed") and k.endswith("(C)") and k != "FailedCall(C)" and v not in ("0", "")}
    retrans = int(st.get("Retransmissions(C)", 0))
    r = rtts(work)
    return {
        "offered_cps": rate, "calls": calls, "achieved_cps": round(ok / max(wall, 1e-9), 1),
        "successful": ok, "failed": failed, "failure_reasons": reasons, "retransmissions": retrans,
        "invite_200_p50_ms": pct(r, 0.50), "invite_200_p99_ms": pct(r, 0.99),
        "balancer_cpu_ms_per_1000_calls": round(used * 1000 / max(ok + failed, 1), 1),
        "wall_s": round(wall, 1),
    }


def start_balancer(name, a, work, log):
    if name == "siplb":
        return start([a.siplb, "balancer", "--config", "examples/local.toml"], log), "127.0.0.1:5060"
    cfg = os.path.join(work, "kamailio.cfg")
    with open(os.path.join(ROOT, "bench/kamailio/kamailio.cfg")) as f:
        text = f.read().replace("DISPATCHER_LIST", os.path.join(ROOT, "bench/kamailio/dispatcher.list"))
    with open(cfg, "w") as f:
        f.write(text)
    return start(["kamailio", "-f", cfg, "-DD", "-E", "-x", "tlsf", "-m", "256", "-M", "16", "-Y", work], log), "127.0.0.1:5065"


def fmt(v):
    return "<1" if v == 0 else f"{v:g}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1000,3000,5000,7000")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--balancers", default="siplb", help="siplb, kamailio, or both: siplb,kamailio")
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not shutil.which("sipp"):
        sys.exit("sipp not found: apt-get install sip-tester")
    balancers = a.balancers.split(",")
    if "kamailio" in balancers and not shutil.which("kamailio"):
        sys.exit("kamailio not found: apt-get install kamailio")
    if not os.path.exists(a.siplb):
        subprocess.run(["cargo", "build", "--release", "-p", "siplb"], cwd=ROOT, check=True)
    rates = [int(x) for x in a.rates.split(",")]
    work = tempfile.mkdtemp(prefix="siplb-bench-")
    log = open(os.path.join(work, "processes.log"), "w")
    servers = []
    results = {}
    try:
        budget = str(len(rates) * len(balancers) * (a.seconds * 3 + 40))
        for port, agent in ((5081, 7071), (5082, 7072)):
            servers.append(start([a.siplb, "agent", "--listen", f"127.0.0.1:{agent}", "--key-file", "examples/agent.key",
                                  "--synthetic", "cpu=10%,mem=1GB"], log))
            servers.append(start(["sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-nostdin", "-timeout", budget], log))
        for name in balancers:
            lb, target = start_balancer(name, a, work, log)
            time.sleep(2)
            if lb.poll() is not None:
                sys.exit(f"{name} did not start; see {work}/processes.log")
            rows = []
            try:
                for rate in rates:
                    row = run_rate(rate, a.seconds, lb.pid, work, target)
                    rows.append(row)
                    if not a.json:
                        print(f"{name:<9}{row['offered_cps']:>6} offered {row['achieved_cps']:>8} achieved  failed {row['failed']:>5} "
                              f"retrans {row['retransmissions']:>5}  p50 {fmt(row['invite_200_p50_ms']):>4} ms  p99 {fmt(row['invite_200_p99_ms']):>4} ms  "
                              f"cpu {row['balancer_cpu_ms_per_1000_calls']:>6} ms/1000 calls  {row['failure_reasons'] or ''}", flush=True)
                    time.sleep(2)
            finally:
                stop([lb])
            results[name] = rows
        summary = {}
        for name, rows in results.items():
            clean = [r["offered_cps"] for r in rows if r["failed"] == 0 and r["achieved_cps"] >= 0.95 * r["offered_cps"]]
            summary[name] = {
                "highest_clean_rate": max(clean) if clean else 0,
                "median_cpu_ms_per_1000_calls": statistics.median(r["balancer_cpu_ms_per_1000_calls"] for r in rows),
            }
        if "siplb" in summary and "kamailio" in summary:
            s, k = summary["siplb"], summary["kamailio"]
            per_rate = {r1["offered_cps"]: round(r1["balancer_cpu_ms_per_1000_calls"] / max(r2["balancer_cpu_ms_per_1000_calls"], 1e-9), 2)
                        for r1, r2 in zip(results["siplb"], results["kamailio"])}
            summary["ratio_siplb_over_kamailio"] = {
                "cpu_per_call_median": round(s["median_cpu_ms_per_1000_calls"] / max(k["median_cpu_ms_per_1000_calls"], 1e-9), 2),
                "cpu_per_call_by_rate": per_rate,
                "highest_clean_rate": (round(s["highest_clean_rate"] / k["highest_clean_rate"], 2) if k["highest_clean_rate"]
                                       else "kamailio had failed calls at every rate"),
            }
        if a.json:
            print(json.dumps({"results": results, "summary": summary}, indent=1))
        else:
            print(json.dumps(summary, indent=1))
    finally:
        stop(servers)
        log.close()


if __name__ == "__main__":
    main()
