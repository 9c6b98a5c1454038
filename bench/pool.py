#!/usr/bin/env python3
"""Two siplb instances as one pool behind a virtual IP, the standby taking
over mid-call (issue 17, the VIP variant).

Run it in a network namespace of its own (it makes two more inside it):

    unshare --net sh -c 'ip link set lo up && exec python3 bench/pool.py \\
        --siplb target/release/siplb --calls 20'

Layout (addresses assigned inside the namespaces only, nothing routed off
the machine):

  this namespace ("host"): 10.201.0.1 on lo: SIPp uas s1 (:5081) and s2
      (:5082), bench/sipp/uas_rr_reinvite.xml; SIPp uac (:5070),
      bench/sipp/uac_rr_reinvite.xml, calling the VIP 10.201.0.100:5060;
      a veth to each instance: 10.201.1.1/30 (A), 10.201.2.1/30 (B).
  plA<pid>: instance A, 10.201.1.2 (sip.advertise), listening on the VIP
      (sip.freebind) and on 10.201.1.2, port 5060.
  plB<pid>: instance B, 10.201.2.2, the same.
  Both: sip.record_route = "10.201.0.100:5060" (the VIP), the same
  routing.secret, pool.instance 1 and 2, policy round-robin over s1, s2.

The VIP starts on A (an address on A's lo, and the host's route to it via
A). Each call: INVITE, 200, ACK; HOLD ms; re-INVITE, 200, ACK; BYE, 200,
every in-dialog request by the Route set of the 200. Calls are placed at
RATE per second. When a third of them have been set up through A (its
GET /servers says so), A gets SIGKILL (by its PID) and the VIP moves to B (`ip addr del` in A, `ip addr add` in B, the
host's route replaced), as keepalived would: the calls set up through A
finish through B (their re-INVITE and BYE by the `sb` token), the calls
placed after go through B. B is ready before the move: its GET /readyz
answers 200 (what keepalived's check script or a DNS health check reads).

--mode drain: a planned switchover instead: the VIP moves to B with A
still up, then A is drained (POST /drain): a new call sent to A's own
address must get 503 with Retry-After (what sends a UA to the next SRV
target); the calls set up through A finish through B.

Prints SIPp's counts and `calls=N ok=K failed=F` (plus how many calls had
been set up through A); exit 0 when every call succeeded (UDP phones have
no connection flow to lose with A: nothing may fail), 1 otherwise, 2 usage
or a missing program, 77 when the namespaces cannot be made. Every process
is stopped by its PID; every wait is bounded by --timeout; the namespaces go
at the end, failure or not.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Deadline, Procs, Timeout, leave_work, log, sipp_totals, wait_until  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIPP = os.path.join(ROOT, "bench", "sipp")
HOST = "10.201.0.1"
VIP = "10.201.0.100"
SECRET = "pool-bench-secret-0123456789"


def run(argv, check=True):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), r.returncode,
                                                r.stdout.decode(errors="replace").strip()))
    return r


class Instance:
    """One siplb instance in a namespace of its own, a veth to the host."""

    def __init__(self, name, n, tag, record_route=VIP + ":5060"):
        self.name = name
        self.record_route = record_route
        self.n = n
        self.ns = "pl%s%d" % (name, tag)
        self.host_if = "plh%s%d" % (name, tag % 100000)
        self.addr = "10.201.%d.2" % n
        self.gw = "10.201.%d.1" % n
        self.proc = None

    def up(self, made):
        run(["ip", "netns", "add", self.ns])
        made.append(["ip", "netns", "del", self.ns])
        run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
             "netns", self.ns])
        made.append(["ip", "link", "del", self.host_if])
        run(["ip", "addr", "add", self.gw + "/30", "dev", self.host_if])
        run(["ip", "link", "set", self.host_if, "up"])
        run(["ip", "-n", self.ns, "link", "set", "lo", "up"])
        run(["ip", "-n", self.ns, "addr", "add", self.addr + "/30", "dev", "eth0"])
        run(["ip", "-n", self.ns, "link", "set", "eth0", "up"])
        run(["ip", "-n", self.ns, "route", "add", "default", "via", self.gw])

    def listen(self):
        """Behind the VIP: on the VIP (the standby before it holds it:
        sip.freebind) and on its own address, so that the phones' answers
        come from the VIP; else (an SRV pool) on the wildcard address."""
        if self.record_route.startswith(VIP + ":"):
            return 'listen = ["%s:5060", "%s:5060"]\nfreebind = true' % (VIP, self.addr)
        return 'listen = ["0.0.0.0:5060"]'

    def config(self, work):
        folder = os.path.join(work, self.name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "agent.key"), "w") as f:
            f.write("pool-bench-agent-key-0123456789\n")
        path = os.path.join(folder, "siplb.toml")
        with open(path, "w") as f:
            f.write("""[sip]
%s
transports = ["udp"]
advertise = "%s:5060"
record_route = "%s"
[routing]
secret = "%s"
policy = "round-robin"
[pool]
instance = %d
[perf]
key_file = "agent.key"
[admin]
listen = "127.0.0.1:8060"
[[servers]]
id = "s1"
address = "%s:5081"
[[servers]]
id = "s2"
address = "%s:5082"
""" % (self.listen(), self.addr, self.record_route, SECRET, self.n, HOST, HOST))
        return path

    def start(self, procs, siplb, work):
        cfg = self.config(work)
        self.log = os.path.join(work, self.name, "siplb.log")
        self.proc = procs.start("siplb-" + self.name,
                                ["ip", "netns", "exec", self.ns, siplb, "balancer",
                                 "--config", cfg], self.log)

    def servers(self):
        """GET /servers from inside its namespace, as JSON (None: no answer)."""
        return self.get("/servers")

    def post(self, path):
        """POST `path` on its admin API from inside its namespace; the JSON answer."""
        r = run(["ip", "netns", "exec", self.ns, "python3", "-c",
                 "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                 "urllib.request.Request('http://127.0.0.1:8060%s',method='POST'),"
                 "timeout=1).read().decode())" % path])
        return json.loads(r.stdout)

    def get(self, path):
        """GET `path` on its admin API from inside its namespace, as JSON (None: no answer)."""
        r = run(["ip", "netns", "exec", self.ns, "python3", "-c",
                 "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                 "'http://127.0.0.1:8060%s',timeout=1).read().decode())" % path], check=False)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def selected(self):
        """New sessions it has sent to servers so far."""
        v = self.servers() or {}
        rows = v.get("servers", v) if isinstance(v, dict) else v
        return sum(int(s.get("selected_total", 0)) for s in rows if isinstance(s, dict))

    def ready(self):
        """GET /readyz answers 200: serving SIP (503 while starting or stopping)."""
        if self.proc.poll() is not None:
            raise RuntimeError("siplb %s exited: %s" % (self.name, tail(self.log)))
        r = run(["ip", "netns", "exec", self.ns, "python3", "-c",
                 "import urllib.request;urllib.request.urlopen("
                 "'http://127.0.0.1:8060/readyz',timeout=1)"], check=False)
        return r.returncode == 0


def tail(path, n=20):
    try:
        with open(path, "rb") as f:
            return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no %s)" % path


def permitted():
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("ip"):
        return "ip not found (apt-get install iproute2)"
    probe = "plx%d" % os.getpid()
    r = run(["ip", "netns", "add", probe], check=False)
    if r.returncode != 0:
        return "ip netns add: " + r.stdout.decode(errors="replace").strip()
    run(["ip", "netns", "del", probe], check=False)
    return None


def probe_invite(to):
    """One INVITE from the host to `to` (ip, port) over UDP: the status line
    and Retry-After of the answer (None: no answer within 2 s)."""
    call = "pool-probe-%d" % os.getpid()
    msg = ("INVITE sip:probe@%s:%d SIP/2.0\r\n"
           "Via: SIP/2.0/UDP %s:5071;branch=z9hG4bK%s;rport\r\n"
           "Max-Forwards: 70\r\nFrom: <sip:probe@%s>;tag=p1\r\nTo: <sip:probe@%s>\r\n"
           "Call-ID: %s\r\nCSeq: 1 INVITE\r\nContact: <sip:probe@%s:5071>\r\n"
           "Content-Length: 0\r\n\r\n") % (to[0], to[1], HOST, call, HOST, to[0], call, HOST)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((HOST, 5071))
        s.settimeout(2)
        s.sendto(msg.encode(), to)
        data, _ = s.recvfrom(65535)
    except OSError:
        return None
    finally:
        s.close()
    text = data.decode(errors="replace")
    lines = text.split("\r\n")
    retry = next((line for line in lines if line.lower().startswith("retry-after:")), None)
    return lines[0], retry


def answer_sources(to):
    """Where the answers to OPTIONS with Max-Forwards 0 (which siplb answers
    itself) sent to `to` from ports 5072-5075 come from (the ports cover
    every socket siplb might pick by the port's remainder): a phone's NAT
    may let in only what comes from the address it sent to."""
    return [answer_source(to, port) for port in range(5072, 5076)]


def answer_source(to, port):
    """Where the answer to one such OPTIONS from HOST:`port` comes from
    (None: no answer within 2 s)."""
    call = "pool-src-%d-%d" % (os.getpid(), port)
    msg = ("OPTIONS sip:%s:%d SIP/2.0\r\n"
           "Via: SIP/2.0/UDP %s:%d;branch=z9hG4bK%s;rport\r\n"
           "Max-Forwards: 0\r\nFrom: <sip:probe@%s>;tag=p2\r\nTo: <sip:%s>\r\n"
           "Call-ID: %s\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n") % (
               to[0], to[1], HOST, port, call, HOST, to[0], call)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((HOST, port))
        s.settimeout(2)
        s.sendto(msg.encode(), to)
        _, src = s.recvfrom(65535)
        return src
    except OSError:
        return None
    finally:
        s.close()


def move_vip(frm, to):
    """The VIP leaves `frm` and comes up on `to`, and the host routes it there."""
    run(["ip", "-n", frm.ns, "addr", "del", VIP + "/32", "dev", "lo"], check=False)
    run(["ip", "-n", to.ns, "addr", "add", VIP + "/32", "dev", "lo"])
    run(["ip", "route", "replace", VIP + "/32", "via", to.addr])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rate", type=int, default=10, help="calls per second")
    ap.add_argument("--hold", type=int, default=2000, help="ms between the ACK and the re-INVITE")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--keep", action="store_true", help="keep the run's folder")
    ap.add_argument("--mode", choices=["kill", "drain"], default="kill",
                    help="kill: A gets SIGKILL; drain: A is drained (POST /drain) and stays up")
    a = ap.parse_args()
    for tool in ("sipp", "ip"):
        if not shutil.which(tool):
            log("%s not found (apt-get install %s)" % (tool, "sip-tester" if tool == "sipp" else "iproute2"))
            return 2
    if not os.access(a.siplb, os.X_OK):
        log("no siplb binary at %s (cargo build --release)" % a.siplb)
        return 2
    why = permitted()
    if why:
        log("cannot make network namespaces here: %s" % why)
        return 77

    deadline = Deadline(a.timeout)
    work = tempfile.mkdtemp(prefix="siplb-pool-")
    procs = Procs()
    made = []
    tag = os.getpid()
    A, B = Instance("A", 1, tag), Instance("B", 2, tag)
    ok = False
    try:
        run(["ip", "link", "set", "lo", "up"])
        run(["ip", "addr", "add", HOST + "/32", "dev", "lo"])
        for inst in (A, B):
            inst.up(made)
        # The VIP on A; the host reaches it through A.
        run(["ip", "-n", A.ns, "addr", "add", VIP + "/32", "dev", "lo"])
        run(["ip", "route", "add", VIP + "/32", "via", A.addr])

        for sid, port in (("s1", 5081), ("s2", 5082)):
            procs.start("uas-" + sid, ["sipp", "-sf", os.path.join(SIPP, "uas_rr_reinvite.xml"),
                                       "-i", HOST, "-p", str(port), "-nostdin",
                                       "-trace_err", "-error_file",
                                       os.path.join(work, "uas-%s.err" % sid)],
                        os.path.join(work, "uas-%s.log" % sid), cwd=work)
        for inst in (A, B):
            inst.start(procs, a.siplb, work)
        for inst in (A, B):
            wait_until(inst.ready, deadline.upto(15), what="siplb %s ready" % inst.name)
        log("ready: A %s, B %s, VIP %s on A" % (A.addr, B.addr, VIP))
        # Both listen on the VIP (B before it holds it: sip.freebind) and on
        # their own address; a phone's answers come from the VIP.
        sources = answer_sources((VIP, 5060))

        stat = os.path.join(work, "uac_stat.csv")
        uac = procs.start("uac", ["sipp", "-sf", os.path.join(SIPP, "uac_rr_reinvite.xml"),
                                  "%s:5060" % VIP, "-i", HOST, "-p", "5070",
                                  "-r", str(a.rate), "-m", str(a.calls), "-l", str(a.calls),
                                  "-d", str(a.hold), "-nostdin", "-timeout_error",
                                  "-timeout", str(int(max(deadline.left() - 5, 10))) + "s",
                                  "-trace_stat", "-stf", stat, "-fd", "1",
                                  "-trace_err", "-error_file", os.path.join(work, "uac.err"),
                                  "-trace_msg", "-message_file", os.path.join(work, "uac.msg")],
                           os.path.join(work, "uac.log"), cwd=work)
        # A third of the calls set up through A (mid-call: in their hold),
        # then A dies.
        wait_until(lambda: A.selected() >= max(a.calls // 3, 1), deadline.upto(15),
                   step=0.05, what="calls set up through A")
        through_a = A.selected()
        probe = None
        if a.mode == "kill":
            os.kill(A.proc.pid, 9)
            A.proc.wait(timeout=5)
            t0 = time.monotonic()
            move_vip(A, B)
            log("A killed (pid %d), VIP moved to B in %.0f ms" % (
                A.proc.pid, (time.monotonic() - t0) * 1000))
        else:
            # A planned switchover: the VIP moves to B first (a new call
            # that reached A through the VIP after the drain would get 503
            # and have nowhere else to go), then A is drained: a UA that
            # reaches A by its own address (an SRV target) is told 503 and
            # Retry-After. A stays up; its calls go on through B.
            move_vip(A, B)
            log("VIP moved to B")
            log("A drained: %s" % json.dumps(A.post("/drain")))
            probe = probe_invite((A.addr, 5060))
            log("a new call to A's own address: %s" % (probe,))

        before = len(sources)
        sources += answer_sources((VIP, 5060))
        text = ["%s:%d" % x if x else "nowhere" for x in sources]
        log("answers to a phone came from %s before the switchover, %s after" % (
            ", ".join(text[:before]), ", ".join(text[before:])))
        wait_until(lambda: uac.poll() is not None, deadline.upto(a.timeout),
                   step=0.2, what="the uac to finish its calls")
        totals = sipp_totals(stat) if os.path.exists(stat) else {}
        okc = int(totals.get("SuccessfulCall(C)", 0))
        failed = int(totals.get("FailedCall(C)", 0))
        log("sipp: successful=%d failed=%d retransmissions=%s (exit %s)" % (
            okc, failed, totals.get("Retransmissions(C)", "?"), uac.returncode))
        log("calls set up through A before the switchover: %d, through B: %d" % (
            through_a, B.selected()))
        log("calls=%d ok=%d failed=%d" % (a.calls, okc, a.calls - okc))
        from_vip = all(x == (VIP, 5060) for x in sources)
        log("every answer to the phone from the VIP: %s" % from_vip)
        ok = (okc == a.calls and failed == 0 and uac.returncode == 0 and through_a > 0
              and from_vip)
        if a.mode == "drain":
            left = A.servers()
            log("A at the end: drained, GET /servers answers: %s" % (left is not None))
            refused = bool(probe and probe[0].startswith("SIP/2.0 503") and probe[1])
            log("drained A refused a new call with 503 and Retry-After: %s" % refused)
            ok = ok and refused
        if not ok:
            for f in ("uac.err", "uac.log", "A/siplb.log", "B/siplb.log"):
                log("--- %s\n%s" % (f, tail(os.path.join(work, f))))
    except (Timeout, RuntimeError, subprocess.TimeoutExpired) as e:
        log("pool test failed: %s" % e)
        for f in ("uac.log", "A/siplb.log", "B/siplb.log"):
            log("--- %s\n%s" % (f, tail(os.path.join(work, f))))
    finally:
        procs.stop_all()
        run(["ip", "route", "del", VIP + "/32"], check=False)
        for argv in reversed(made):
            run(argv, check=False)
        leave_work(work, ok, a.keep)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
