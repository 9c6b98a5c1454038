#!/usr/bin/env python3
"""siplb under SIPp at rising call rates, on loopback only.

Starts two `siplb agent`s (synthetic, equal readings), two `sipp -sn uas`
servers on 127.0.0.1:5081/5082, `siplb balancer --config examples/local.toml`,
then for each rate runs SIPp's built-in `uac` (default, strict settings) for a
fixed number of seconds and reports: offered and achieved calls/s, failed
calls (and SIPp's reasons), retransmissions, INVITE->200 p50/p99, and the
balancer's CPU (utime+stime) per 1,000 calls. Every process is started here
and stopped by its PID; every run is bounded in calls and time.

    python3 bench/rates.py --rates 1000,3000,5000,7000 --seconds 10
"""
import argparse, glob, json, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK  # utime + stime


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


def run_rate(rate, seconds, balancer_pid, work):
    for f in glob.glob(os.path.join(work, "uac_*")):
        os.remove(f)
    calls = rate * seconds
    before = cpu_ms(balancer_pid)
    t0 = time.time()
    uac = subprocess.run(
        ["sipp", "-sn", "uac", "127.0.0.1:5060", "-i", "127.0.0.1", "-p", "5070", "-nostdin",
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
    elapsed = float(st.get("ElapsedTime(C)", "0").split(":")[-1] or 0) if False else wall
    r = rtts(work)
    return {
        "offered_cps": rate, "calls": calls, "achieved_cps": round(ok / max(wall, 1e-9), 1),
        "successful": ok, "failed": failed, "failure_reasons": reasons, "retransmissions": retrans,
        "invite_200_p50_ms": pct(r, 0.50), "invite_200_p99_ms": pct(r, 0.99),
        "balancer_cpu_ms_per_1000_calls": round(used * 1000 / max(ok + failed, 1), 1),
        "wall_s": round(wall, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="1000,3000,5000,7000")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if not shutil.which("sipp"):
        sys.exit("sipp not found: apt-get install sip-tester")
    if not os.path.exists(a.siplb):
        subprocess.run(["cargo", "build", "--release", "-p", "siplb"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="siplb-bench-")
    log = open(os.path.join(work, "processes.log"), "w")
    procs = []
    try:
        for port, agent in ((5081, 7071), (5082, 7072)):
            procs.append(start([a.siplb, "agent", "--listen", f"127.0.0.1:{agent}", "--key-file", "examples/agent.key",
                                "--synthetic", "cpu=10%,mem=1GB"], log))
            procs.append(start(["sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-nostdin",
                                "-timeout", str(len(a.rates.split(",")) * (a.seconds * 3 + 40))], log))
        lb = start([a.siplb, "balancer", "--config", "examples/local.toml"], log)
        procs.append(lb)
        time.sleep(2)
        rows = []
        for rate in [int(x) for x in a.rates.split(",")]:
            row = run_rate(rate, a.seconds, lb.pid, work)
            rows.append(row)
            if not a.json:
                print(f"{row['offered_cps']:>6} offered {row['achieved_cps']:>8} achieved  failed {row['failed']:>5} "
                      f"retrans {row['retransmissions']:>5}  p50 {row['invite_200_p50_ms']:>7} ms  p99 {row['invite_200_p99_ms']:>7} ms  "
                      f"cpu {row['balancer_cpu_ms_per_1000_calls']:>6} ms/1000 calls  {row['failure_reasons'] or ''}", flush=True)
            time.sleep(2)
        if a.json:
            print(json.dumps(rows, indent=1))
    finally:
        stop(procs)
        log.close()


if __name__ == "__main__":
    main()
