#!/usr/bin/env python3
"""The highest call rate with 0 failed calls, for each X in: the generator
alone (uac -> uas), a relay that parses nothing (bench/relay.c, one
recvfrom/sendto per datagram) in X's place, and siplb (one server, policy
static, the config of ../shared/bench/floor/floor.sh); then the ratio
siplb / relay (issue 15's target: >= 0.9).

For each X, rates rise from --start by --factor per step until a step fails,
then are bisected between the last pass and the first fail to --precision.
Each step is one bounded run: a fresh UAS, a fresh X, the UAC for --seconds
of calls. A step passes when every call completed (0 failed, ok = calls) and
the UAC kept its schedule (achieved >= 95 % of offered). The generator is
`siplb load uac|uas` (--generator ours, the default) or SIPp's built-in
uac/uas (--generator sipp), so the report says which one is the limit.

CPU is utime+stime: X's and the UAS's read from /proc around the UAC's run,
the UAC's from the rusage of the reaped child. Loopback only (127.0.0.1),
ports from --port-base; every process is started here and stopped by its
PID; every wait is bounded, and the whole search by --timeout.

    cargo build --release -p siplb
    python3 bench/ceiling.py --siplb target/release/siplb
    python3 bench/ceiling.py --siplb target/release/siplb --generator sipp
    python3 bench/ceiling.py --targets siplb --start 1000 --seconds 3 --max-rate 3000   # a quick look
"""
import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Deadline, Procs, Timeout, log, sipp_totals, wait_until  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid):
    """utime + stime of pid (all its threads), ms; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1000 / TICK
    except (OSError, ValueError, IndexError):
        return 0.0


def children_cpu_ms():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * 1000


def udp_bound(port):
    """Whether some socket is bound to 127.0.0.1:port (or any address) for UDP."""
    want = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    try:
        with open("/proc/net/udp") as f:
            return any(line.split()[1] in want for line in list(f)[1:])
    except OSError:
        return False


def tcp_answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def sipp_p99_bound(st):
    """The upper bound (ms) of SIPp's ResponseTimeRepartition1 bucket (<10, <20, ...
    <200) that holds the 99th percentile of INVITE->200; None past 200 ms."""
    buckets = sorted((int(k.split("<")[1]), int(v or 0)) for k, v in st.items()
                     if k.startswith("ResponseTimeRepartition1_<"))
    total = sum(n for _, n in buckets) + int(st.get("ResponseTimeRepartition1_>=200", 0) or 0)
    seen = 0
    for bound, n in buckets:
        seen += n
        if total and seen >= 0.99 * total:
            return float(bound)
    return None


SIPLB_CONFIG = """[sip]
listen = ["127.0.0.1:{x}"]
transports = ["udp"]
[routing]
secret = "ceiling-bench-secret-0123456789abcdef"
policy = "static"
{routing}
[perf]
key_file = "{key}"
[admin]
listen = "127.0.0.1:{admin}"
[[servers]]
id = "s1"
address = "127.0.0.1:{server}"
capacity = 1000
"""


class Bench:
    def __init__(self, a, work):
        self.a = a
        self.work = work
        self.procs = Procs()
        self.deadline = Deadline(a.timeout)
        b = a.port_base
        self.x_port, self.uas_port, self.client_port, self.admin_port = b + 160, b + 181, b + 200, b + 80
        self.relay = None
        self.n = 0

    # ---------------------------------------------------------- one step

    def start_uas(self, target):
        p = self.uas_port
        if self.a.generator == "ours":
            argv = [self.a.siplb, "load", "uas", "--listen", f"127.0.0.1:{p}"]
        else:
            # SIPp's uas answers to -rsa: X, or the UAC when alone.
            rsa = self.client_port if target == "alone" else self.x_port
            argv = ["sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", str(p),
                    "-rsa", f"127.0.0.1:{rsa}", "-nostdin"]
        proc = self.procs.start("uas", argv, os.path.join(self.work, f"uas-{self.n}.log"))
        wait_until(lambda: udp_bound(p) or proc.poll() is not None, self.deadline.upto(10),
                   what="the UAS binds")
        return proc

    def start_x(self, target):
        logpath = os.path.join(self.work, f"{target}-{self.n}.log")
        if target == "alone":
            return None, self.uas_port
        if target == "relay":
            argv = [self.relay, str(self.x_port), str(self.uas_port), str(self.client_port),
                    str(self.a.relay_mode)]
            proc = self.procs.start("relay", argv, logpath)
            wait_until(lambda: udp_bound(self.x_port) or proc.poll() is not None,
                       self.deadline.upto(10), what="the relay binds")
            return proc, self.x_port
        env = dict(os.environ, SIPLB_LOG="warn")
        proc = self.procs.start("siplb", [self.a.siplb, "balancer", "--config", self.config],
                                logpath, env=env)
        wait_until(lambda: tcp_answers(self.admin_port) or proc.poll() is not None,
                   self.deadline.upto(15), what="siplb's admin API answers")
        return proc, self.x_port

    def uac_argv(self, target_port, rate, sockets):
        a = self.a
        if a.generator == "ours":
            return [a.siplb, "load", "uac", f"127.0.0.1:{target_port}",
                    "--local-port", str(self.client_port), "--sockets", str(sockets),
                    "--rate", str(rate), "--seconds", str(a.seconds),
                    "--timeout", f"{a.call_timeout}s", "--json"]
        self.stat = os.path.join(self.work, f"uac-{self.n}.csv")
        return ["sipp", "-sn", "uac", f"127.0.0.1:{target_port}", "-i", "127.0.0.1",
                "-p", str(self.client_port), "-r", str(rate), "-m", str(int(rate * a.seconds)),
                "-default_behaviors", "all,-abortunexp", "-nostdin",
                "-timeout", f"{int(a.seconds + 2 * a.call_timeout + 10)}s",
                "-recv_timeout", str(int(a.call_timeout * 1000)),
                "-trace_stat", "-stf", self.stat]

    def step(self, target, rate):
        """One bounded run at `rate`; a dict of what it measured."""
        self.n += 1
        a = self.a
        sockets = 1 if target == "relay" else a.sockets
        calls = int(round(rate * a.seconds))
        res = {"target": target, "rate": rate, "calls": calls, "sockets": sockets}
        try:
            uas = self.start_uas(target)
            x, port = self.start_x(target)
            if uas.poll() is not None or (x is not None and x.poll() is not None):
                raise RuntimeError(f"a process of step {self.n} exited at start; logs in {self.work}")
            x0 = cpu_ms(x.pid) if x else 0.0
            u0 = cpu_ms(uas.pid)
            c0 = children_cpu_ms()
            out = os.path.join(self.work, f"uac-{self.n}.out")
            bound = a.seconds + 2 * a.call_timeout + 20
            if self.deadline.left() < bound:
                raise Timeout("the global --timeout leaves no room for another step")
            uac = self.procs.start("uac", self.uac_argv(port, rate, sockets), out)
            t0 = time.monotonic()
            try:
                uac.wait(timeout=bound)
            except subprocess.TimeoutExpired:
                # Calls still open past every timeout: a failed step.
                self.procs.stop(uac)
                res.update(ok=0, failed=calls, achieved=0.0, p99_ms=None, p50_ms=None, retrans=None,
                           failed_by={"uac_killed_after_s": int(bound)}, x_cpu_per_1000=None,
                           gen_cpu_per_1000=None, passed=False)
                return res
            wall = time.monotonic() - t0
            self.procs.procs = [(n, q) for (n, q) in self.procs.procs if q is not uac]
            uac_cpu = children_cpu_ms() - c0
            x_cpu = (cpu_ms(x.pid) - x0) if x else 0.0
            uas_cpu = cpu_ms(uas.pid) - u0
            if a.generator == "ours":
                lines = [l for l in open(out) if l.startswith("{")]
                if not lines:
                    raise RuntimeError(f"no report from the UAC: {out}")
                r = json.loads(lines[-1])
                ok, failed, achieved = r["ok"], r["failed"], r["achieved"]
                res.update(p99_ms=r["p99_ms"], p50_ms=r["p50_ms"], retrans=r["invite_retrans"] + r["bye_retrans"],
                           duplicates=r["duplicates"], reacks=r["reacks"],
                           failed_by={k: v for k, v in r["failed_by"].items() if v})
            else:
                st = sipp_totals(self.stat)
                ok, failed = int(st.get("SuccessfulCall(C)", 0)), int(st.get("FailedCall(C)", 0))
                # SIPp's own rate of calls created, scaled by the share that succeeded.
                created = int(st.get("OutgoingCall(C)", 0)) or 1
                achieved = float(st.get("CallRate(C)", 0) or 0) * ok / created
                res.update(p99_ms=sipp_p99_bound(st), p50_ms=None,
                           retrans=int(st.get("Retransmissions(C)", 0)),
                           failed_by={k[6:-3]: int(v) for k, v in st.items()
                                      if k.startswith("Failed") and k.endswith("(C)")
                                      and k != "FailedCall(C)" and v not in ("0", "")})
            n = max(ok + failed, 1)
            res.update(ok=ok, failed=failed, achieved=round(achieved, 1),
                       x_cpu_per_1000=round(x_cpu * 1000 / n, 1) if x else None,
                       gen_cpu_per_1000=round((uac_cpu + uas_cpu) * 1000 / n, 1),
                       passed=failed == 0 and ok == calls and achieved >= 0.95 * rate)
        finally:
            self.procs.stop_all()
        return res

    # ---------------------------------------------------------- the search

    def search(self, target):
        a = self.a
        steps = []

        def run(rate):
            r = self.step(target, rate)
            steps.append(r)
            fb = " ".join(f"{k}={v}" for k, v in r.get("failed_by", {}).items())
            late = f"dups={r['duplicates']} reacks={r['reacks']} " if "duplicates" in r else ""
            log(f"  {target:6} rate={rate:>6} ok={r['ok']}/{r['calls']} failed={r['failed']} {fb} "
                f"achieved={r['achieved']:.0f} p99_ms={r['p99_ms']} retrans={r['retrans']} {late}"
                f"x_cpu/1000={r['x_cpu_per_1000']} gen_cpu/1000={r['gen_cpu_per_1000']} "
                f"{'PASS' if r['passed'] else 'FAIL'}")
            return r["passed"]

        best, fail, note = None, None, ""
        try:
            rate = a.start
            while rate <= a.max_rate:
                if run(rate):
                    best = rate
                    rate = int(rate * a.factor)
                else:
                    fail = rate
                    break
            if best is None and fail is not None:
                # The first step failed: come down until one passes.
                rate = int(fail / a.factor)
                while rate >= 100:
                    if run(rate):
                        best = rate
                        break
                    fail = rate
                    rate = int(rate / a.factor)
            if best is not None and fail is not None:
                while (fail - best) / best > a.precision:
                    mid = int((best + fail) / 2 / 10) * 10
                    if mid in (best, fail):
                        break
                    if run(mid):
                        best = mid
                    else:
                        fail = mid
            if fail is None:
                note = f"passed up to --max-rate {a.max_rate}"
        except Timeout as e:
            note = f"stopped: {e}"
        top = next((s for s in steps if s["rate"] == best and s["passed"]), None)
        return {"target": target, "highest": best, "first_fail": fail, "best_step": top,
                "steps": steps, "note": note}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    ap.add_argument("--generator", choices=["ours", "sipp"], default="ours")
    ap.add_argument("--targets", default="alone,relay,siplb",
                    help="comma-separated, from alone, relay, siplb")
    ap.add_argument("--start", type=int, default=2000, help="first rate, calls/s")
    ap.add_argument("--factor", type=float, default=1.25, help="rate step while passing")
    ap.add_argument("--precision", type=float, default=0.05, help="bisect until fail/pass - 1 <= this")
    ap.add_argument("--max-rate", type=int, default=100000)
    ap.add_argument("--seconds", type=float, default=5, help="seconds of new calls per step")
    ap.add_argument("--call-timeout", type=float, default=8,
                    help="an INVITE or BYE unanswered this long fails its call (SIPp: -recv_timeout)")
    ap.add_argument("--sockets", type=int, default=1,
                    help="UAC sockets for alone and siplb (the relay serves one client port: always 1)")
    ap.add_argument("--relay-mode", type=int, choices=[0, 1], default=0,
                    help="0: recvfrom/sendto per datagram, 1: recvmmsg/sendmmsg")
    ap.add_argument("--port-base", type=int, default=25000)
    ap.add_argument("--timeout", type=float, default=3600, help="bound on the whole search, s")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--siplb-routing", action="append", default=[],
                    help='an extra [routing] line of the siplb config, e.g. "max_transactions = 1000000" '
                         '(the default 100,000 holds ~18,000 calls/s: each answered call keeps its '
                         'transaction ~5 s); repeatable')
    a = ap.parse_args()
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if any(t not in ("alone", "relay", "siplb") for t in targets):
        sys.exit("--targets: alone, relay, siplb")
    if a.generator == "sipp" and not shutil.which("sipp"):
        sys.exit("sipp not found: apt-get install sip-tester")
    if (a.generator == "ours" or "siplb" in targets) and not os.access(a.siplb, os.X_OK):
        sys.exit(f"{a.siplb} is not an executable: cargo build --release -p siplb, or --siplb")
    if a.factor <= 1 or a.start < 100:
        sys.exit("--factor must be > 1 and --start >= 100")

    work = tempfile.mkdtemp(prefix="siplb-ceiling-")
    b = Bench(a, work)
    results = []
    try:
        if "relay" in targets:
            b.relay = os.path.join(work, "relay")
            subprocess.run(["gcc", "-O2", "-o", b.relay, os.path.join(ROOT, "bench/relay.c")],
                           check=True, timeout=120)
        with open(os.path.join(work, "key"), "w") as f:
            f.write("ceiling-bench-key-0123456789abcdef\n")
        b.config = os.path.join(work, "one.toml")
        with open(b.config, "w") as f:
            f.write(SIPLB_CONFIG.format(x=b.x_port, key=os.path.join(work, "key"),
                                        admin=b.admin_port, server=b.uas_port,
                                        routing="\n".join(a.siplb_routing)))
        log(f"generator={a.generator} seconds/step={a.seconds} start={a.start} x{a.factor} "
            f"precision={a.precision} sockets={a.sockets} logs in {work}")
        for t in targets:
            log(f"{t}:")
            results.append(b.search(t))
    finally:
        b.procs.stop_all()

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    log("")
    log(f"generator: {a.generator}; {a.seconds:g} s of calls per step; pass = 0 failed and "
        f"achieved >= 95 % of offered")
    log("| X | highest rate with 0 failed (calls/s) | achieved | p99 INVITE->200 ms | "
        "CPU ms/1,000 calls of X | of the generator (uac+uas) | sockets | first fail | note |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["best_step"] or {}
        name = {"alone": "generator alone", "relay": f"relay (mode {a.relay_mode})", "siplb": "siplb"}[r["target"]]
        log(f"| {name} | {fmt(r['highest'], 'd')} | {fmt(s.get('achieved'), '.0f')} | "
            f"{fmt(s.get('p99_ms'), '.2f')} | {fmt(s.get('x_cpu_per_1000'))} | "
            f"{fmt(s.get('gen_cpu_per_1000'))} | {s.get('sockets', '-')} | "
            f"{fmt(r['first_fail'], 'd')} | {r['note']} |")
    by = {r["target"]: r for r in results}
    if by.get("siplb", {}).get("highest") and by.get("relay", {}).get("highest"):
        ratio = by["siplb"]["highest"] / by["relay"]["highest"]
        open_ended = [t for t in ("siplb", "relay") if by[t]["first_fail"] is None]
        caveat = f" (a lower bound for {', '.join(open_ended)}: no step failed; raise --max-rate)" if open_ended else ""
        log(f"siplb / relay = {ratio:.2f} (target >= 0.90){caveat}")
    if a.generator == "sipp":
        log("(SIPp: p99 is the upper bound of its ResponseTimeRepartition1 bucket, e.g. 10 = under 10 ms)")
        if by.get("alone", {}).get("first_fail") and by["alone"]["highest"] <= by["relay"]["highest"] * (1 + a.precision):
            log("the generator alone is no faster than with the relay: the generator may be the limit")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
