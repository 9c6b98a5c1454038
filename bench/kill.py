#!/usr/bin/env python3
"""Failures under load, on loopback only: one part of the pool is killed (or
hung) while SIPp places calls through siplb, and started again.

Two synthetic `siplb agent`s (7071, 7072), two SIPp uas (5081, 5082;
bench/sipp/uas_rr.xml: the built-in uas, echoing Record-Route, keeping a
finished call 32 s as RFC 3261's Timer J does),
`siplb balancer --config examples/local.toml` (5060, admin 8060), and SIPp's
uac with bench/sipp/uac_rr.xml (ACK and BYE sent with the Route set from our
Record-Route, calls held HOLD ms) at RATE calls/s for SECONDS. At KILL_AT s:

  server    the uas on 5081 gets SIGKILL; started again at BACK_AT
  agent     the agent of s1 gets SIGKILL; started again at BACK_AT
  hang      the agent of s1 gets SIGSTOP (accepts, never answers); SIGCONT at BACK_AT
  balancer  the balancer gets SIGKILL; a new one is started at BACK_AT

Prints SIPp's counts (successful, failed and why, retransmissions), new calls
per server per second window (from GET /servers, sampled every 250 ms), and
the balancer's view at the end. Every process is started here and stopped by
its PID; the run is bounded in calls and time. Exit 0 when the failed calls
are within what the mode allows (see `allowed` below), else 1.

    python3 bench/kill.py --mode server --rate 500 --seconds 60 --kill-at 20 --back-at 40
"""
import argparse, json, os, signal, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import sipp_totals, stop_all  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIPLB = os.path.join(ROOT, "target/release/siplb")


def start(cmd, log, cwd=ROOT):
    return subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)


def servers():
    try:
        with urllib.request.urlopen("http://127.0.0.1:8060/servers", timeout=0.5) as r:
            return json.load(r)
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["server", "agent", "hang", "balancer"], required=True)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--kill-at", type=float, default=20)
    ap.add_argument("--back-at", type=float, default=40)
    ap.add_argument("--hold", type=int, default=1000, help="ms between ACK and BYE")
    ap.add_argument("--json", action="store_true", help="print one JSON result line at the end")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="s after the kill before s1 counts as out (a hung agent is noticed within a poll + the timeout)")
    ap.add_argument("--siplb", help="the siplb binary (default: target/release/siplb, built if missing)")
    a = ap.parse_args()
    global SIPLB
    if a.siplb:
        SIPLB = a.siplb
    elif not os.access(SIPLB, os.X_OK):
        subprocess.run(["cargo", "build", "-q", "--release", "-p", "siplb"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix=f"siplb-kill-{a.mode}-")
    log = open(os.path.join(work, "log"), "w")
    procs = {}
    key = os.path.join(ROOT, "examples/agent.key")

    def agent(port):
        return start([SIPLB, "agent", "--listen", f"127.0.0.1:{port}", "--key-file", key,
                      "--synthetic", "cpu=10%,mem=1GB"], log)

    # The uas keeps a finished call for 64*T1 = 32 s, as RFC 3261 §17.2.2
    # (Timer J) has a UDP server transaction do, not SIPp's 4 s: a BYE whose
    # 200 died in the killed balancer is retransmitted to the new one 7.5 s
    # after it was first sent (Timer E: 0.5, 1, 2, 4 s), and only a uas that
    # still knows the call answers it again. With 4 s that call is lost by the
    # harness's uas, not by anything a balancer could do.
    with open(os.path.join(ROOT, "bench/sipp/uas_rr.xml")) as f:
        scenario = f.read()
    assert '<timewait milliseconds="4000"/>' in scenario
    uas_xml = os.path.join(work, "uas_rr_timer_j.xml")
    with open(uas_xml, "w") as f:
        f.write(scenario.replace('<timewait milliseconds="4000"/>', '<timewait milliseconds="32000"/>'))

    def uas(port):
        return start(["sipp", "-sf", uas_xml, "-i", "127.0.0.1", "-p", str(port), "-nostdin",
                      "-timeout", str(a.seconds + 60)], subprocess.DEVNULL)

    def balancer():
        return start([SIPLB, "balancer", "--config", "local.toml"], log, cwd=os.path.join(ROOT, "examples"))

    def wait_ready(limit=10):
        end = time.time() + limit
        while time.time() < end:
            v = servers()
            if v and all(s["state"] == "up" for s in v):
                return True
            time.sleep(0.05)
        return False

    try:
        procs["agent1"], procs["agent2"] = agent(7071), agent(7072)
        procs["uas1"], procs["uas2"] = uas(5081), uas(5082)
        procs["balancer"] = balancer()
        if not wait_ready():
            sys.exit("the balancer did not see both servers up")
        stat = os.path.join(work, "stat.csv")
        uac = start(["sipp", "-sf", os.path.join(ROOT, "bench/sipp/uac_rr.xml"), "127.0.0.1:5060",
                     "-i", "127.0.0.1", "-p", "5070", "-nostdin", "-r", str(a.rate),
                     "-m", str(a.rate * a.seconds), "-d", str(a.hold),
                     "-timeout", str(a.seconds + 60), "-trace_stat", "-stf", stat, "-fd", "1", "-trace_err"],
                    open(os.path.join(work, "uac.out"), "w"), cwd=work)
        procs["uac"] = uac
        t0 = time.time()
        killed = back = False
        samples = []  # (t, {id: (selected_total, state, weight_factor)})
        while uac.poll() is None and time.time() - t0 < a.seconds + 70:
            t = time.time() - t0
            if not killed and t >= a.kill_at:
                killed = True
                victim = {"server": "uas1", "agent": "agent1", "hang": "agent1", "balancer": "balancer"}[a.mode]
                p = procs[victim]
                if a.mode == "hang":
                    os.kill(p.pid, signal.SIGSTOP)
                else:
                    p.kill()
                    p.wait()
                print(f"{t:6.1f} s  {a.mode}: {victim} (pid {p.pid}) {'stopped' if a.mode == 'hang' else 'killed'}", flush=True)
            if killed and not back and t >= a.back_at:
                back = True
                if a.mode == "hang":
                    os.kill(procs["agent1"].pid, signal.SIGCONT)
                elif a.mode == "server":
                    procs["uas1"] = uas(5081)
                elif a.mode == "agent":
                    procs["agent1"] = agent(7071)
                else:
                    procs["balancer"] = balancer()
                print(f"{t:6.1f} s  {a.mode}: back", flush=True)
            v = servers()
            if v:
                samples.append((t, {s["id"]: (s["selected_total"], s["state"], s["weight_factor"]) for s in v}))
            time.sleep(0.25)
        if uac.poll() is None:
            uac.kill()
        uac.wait()
        end_view = servers()
    finally:
        if a.mode == "hang" and procs["agent1"].poll() is None:
            os.kill(procs["agent1"].pid, signal.SIGCONT)
        stop_all(procs.values())

    d = sipp_totals(stat)
    reasons = {k: int(d[k]) for k in d if k.startswith("Failed") and k.endswith("(C)") and d.get(k, "0") not in ("0", "")}
    ok, failed, retrans = int(d["SuccessfulCall(C)"]), int(d["FailedCall(C)"]), int(d["Retransmissions(C)"])
    # A call SIPp had not finished when it was stopped (or never placed) is
    # a failed call too.
    unfinished = a.rate * a.seconds - ok - failed
    if unfinished:
        reasons["unfinished"] = unfinished
        failed += unfinished
    print(f"calls {a.rate * a.seconds}: successful {ok}, failed {failed}, retransmissions {retrans}")
    if reasons:
        print("  failed by reason:", reasons)
    # New calls per server per 5 s window (selected_total deltas; a
    # restarted balancer starts its counters at 0).
    print("new calls per 5 s window (s1 / s2), s1 state and weight at the window's end:")
    window, last, line = 5.0, None, []
    edge = window
    for t, v in samples:
        if t >= edge and last is not None:
            d1 = v["s1"][0] - last["s1"][0]
            d2 = v["s2"][0] - last["s2"][0]
            if d1 < 0 or d2 < 0:
                d1, d2 = v["s1"][0], v["s2"][0]
            line.append(f"{edge - window:4.0f}-{edge:<4.0f} {d1:5d} / {d2:5d}  {v['s1'][1]:7s} {v['s1'][2]:.2f}")
            last, edge = v, edge + window
        elif last is None:
            last = v
    print("\n".join("  " + l for l in line))
    if end_view:
        for s in end_view:
            print(f"  {s['id']}: state {s['state']}, selected {s['selected_total']}, failovers {s['failovers_total']}, outstanding {s['outstanding']}, "
                  f"ejections {s['ejections_total']}, down_by {s['down_by']}")
    # What may fail: with the server killed, only calls it had already
    # answered (their BYE has nowhere to go): at most the calls it held,
    # rate/2 x hold. With an agent killed or hung, or the balancer
    # restarted, nothing.
    allowed = (a.rate * a.hold // 2000 + a.rate // 10) if a.mode == "server" else 0
    print(f"failed {failed}, allowed {allowed} ({'ok' if failed <= allowed else 'TOO MANY'}); logs in {work}")
    # s1's new calls while it is out (from --settle s after the kill -- a
    # hung agent is noticed within a poll interval + the timeout -- to the
    # restart) and after it is back.
    def s1_at(t):
        before = [v["s1"][0] for (ts, v) in samples if ts <= t]
        return before[-1] if before else 0
    while_out = s1_at(a.back_at) - s1_at(a.kill_at + a.settle)
    after_back = s1_at(a.seconds + 70) - s1_at(a.back_at)
    if a.mode != "balancer":
        print(f"s1 new calls while out: {while_out}; after it is back: {after_back}")
    if a.json:
        print(json.dumps({"s1_while_out": while_out, "s1_after_back": after_back,"mode": a.mode, "rate": a.rate, "seconds": a.seconds, "kill_at": a.kill_at,
                          "back_at": a.back_at, "hold_ms": a.hold, "successful": ok, "failed": failed,
                          "retransmissions": retrans, "reasons": reasons, "allowed": allowed}))
    sys.exit(0 if failed <= allowed else 1)


if __name__ == "__main__":
    main()
