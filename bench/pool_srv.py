#!/usr/bin/env python3
"""Three siplb instances as one pool behind a DNS name (RFC 3263 SRV
records), one killed mid-call (issue 17, the DNS SRV variant).

Run it in a network namespace of its own (it makes three more inside it):

    unshare --net sh -c 'ip link set lo up && exec python3 bench/pool_srv.py \\
        --siplb target/release/siplb --calls 30'

Layout (addresses assigned inside the namespaces only, nothing routed off
the machine; bench/pool.py's, with a third instance and DNS in place of the
VIP):

  this namespace ("host"): 10.201.0.1 on lo:
      dnsmasq on 10.201.0.1:53 publishing the pool, sip.pool.test:
        _sip._udp.sip.pool.test SRV 10 50 5060 lb-a.pool.test (and lb-b, lb-c)
        lb-a.pool.test A 10.201.1.2, lb-b 10.201.2.2, lb-c 10.201.3.2;
      Kamailio (bench/kamailio/srv_edge.cfg) on 10.201.0.1:5060, the phones'
        outbound proxy and their RFC 3263 client, in a mount namespace of its
        own where /etc/resolv.conf says `nameserver 10.201.0.1`: new calls to
        sip:...@sip.pool.test (an SRV lookup, a target by weight), in-dialog
        requests to their Route (siplb's Record-Route, sip:sip.pool.test;lr:
        the same lookup), the next SRV target when one does not answer within
        1 s (use_dns_failover);
      SIPp uas s1 (:5081) and s2 (:5082), bench/sipp/uas_rr_reinvite.xml;
      SIPp uac (:5070), bench/sipp/uac_rr_reinvite.xml, calling through
        Kamailio (SIPp cannot look up SRV records itself).
  plA<pid>, plB<pid>, plC<pid>: instances A, B, C at 10.201.{1,2,3}.2
      (sip.advertise), listening on 0.0.0.0:5060, each with a veth to the host.
  All: sip.record_route = "sip.pool.test" (no port: written without one, so
  the next hop looks it up by SRV), the same routing.secret, pool.instance
  1, 2, 3, policy round-robin over s1, s2.

Each call: INVITE, 200, ACK; HOLD ms; re-INVITE, 200, ACK; BYE, 200. Calls
at RATE per second. When A has set up KILL_AFTER calls (2; its GET /servers
says so), A gets SIGKILL by its PID (what it held at that moment, from its GET
/drain, is printed): the calls set up through A finish through B or C (their
re-INVITE and BYE reach Kamailio's next SRV target, which routes them by the
signed `sb` token), new calls go on over B and C.

--phone baresip: a real phone resolving the pool itself instead: one
baresip (dns_server 10.201.0.1:53, no registration) calls
sip:service@sip.pool.test CALLS times, one call at a time (SIPp uas_rr at
the servers); the instance that set up call KILL_AFTER is killed mid-call.
What baresip 1.0 does then is printed: its BYE goes to the dead instance
until its transaction times out (32 s), then to the next SRV target; every
later request tries the dead one first again; the ACK of a 2xx is sent to
the dead one and lost. So it exits 1 there: this mode shows the phone's
limits, the test uses the SIPp phones behind Kamailio.

Prints each instance's new calls (GET /servers selected_total) and requests
forwarded, how many in-dialog requests Kamailio sent to the pool and how many
it had to try again elsewhere, SIPp's counts and `calls=N ok=K failed=F`.
Exit 0 when every instance carried calls, A held dialogs when it died and
they finished through the others, and no more than --allowed-lost calls
failed (default 0: over UDP the phones' transactions are Kamailio's, which
sends a request A did not answer to the next SRV target; what can still
fail is a transaction A had answered 100 for and then died holding, whose
final response goes to A's Via; A's GET /drain just before the kill says
how many transactions it held, completed ones included: printed, an upper
bound); 1 otherwise, 2 usage or a missing
program, 77 when the namespaces cannot be made. Every process is stopped by
its PID; every wait is bounded by --timeout; the namespaces go at the end,
failure or not.
"""
import argparse
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Deadline, Procs, Timeout, leave_work, log, sipp_totals, wait_until  # noqa: E402
from pool import HOST, SIPP, Instance, permitted, run, tail  # noqa: E402
from phones import Phone, baresip_module_path  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POOL = "sip.pool.test"


def module_path():
    for d in sorted(glob.glob("/usr/lib/*/kamailio/modules")) + ["/usr/lib/kamailio/modules"]:
        if os.path.exists(os.path.join(d, "tm.so")):
            return d
    return None


def dnsmasq_argv(insts, work):
    argv = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--bind-interfaces", "--listen-address=" + HOST, "--port=53",
            "--local-ttl=1", "--pid-file=" + os.path.join(work, "dnsmasq.pid"),
            "--log-facility=-", "--log-queries"]
    for inst in insts:
        name = "lb-%s.pool.test" % inst.name.lower()
        argv += ["--srv-host=_sip._udp.%s,%s,5060,10,50" % (POOL, name),
                 "--host-record=%s,%s" % (name, inst.addr)]
    return argv


def dns_srv_answers(timeout=1.0):
    """Asks dnsmasq for _sip._udp.POOL SRV over UDP: the answer count (None: no answer)."""
    qname = b"".join(bytes([len(p)]) + p.encode() for p in ("_sip._udp." + POOL).split(".")) + b"\0"
    q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + qname + b"\x00\x21\x00\x01"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(timeout)
        s.sendto(q, (HOST, 53))
        data, _ = s.recvfrom(4096)
    except OSError:
        return None
    finally:
        s.close()
    return int.from_bytes(data[6:8], "big") if len(data) >= 12 and data[:2] == b"\x12\x34" else None


def options_ok(addr, port=5060):
    """One OPTIONS to Kamailio: a 200 within 1 s."""
    msg = ("OPTIONS sip:%s:%d SIP/2.0\r\nVia: SIP/2.0/UDP %s:5072;branch=z9hG4bKo%d\r\n"
           "Max-Forwards: 70\r\nFrom: <sip:probe@%s>;tag=o1\r\nTo: <sip:%s>\r\n"
           "Call-ID: srv-options-%d\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n") % (
        addr, port, HOST, time.monotonic_ns(), HOST, addr, os.getpid())
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((HOST, 5072))
        s.settimeout(1)
        s.sendto(msg.encode(), (addr, port))
        data, _ = s.recvfrom(65535)
        return data.startswith(b"SIP/2.0 200")
    except OSError:
        return False
    finally:
        s.close()


BARESIP_CONFIG = """poll_method\t\tepoll
sip_listen\t\t%(host)s:5090
call_local_timeout\t30
call_max_calls\t\t4
audio_player\t\taubridge,pool
audio_source\t\taubridge,pool
audio_alert\t\taubridge,pool
audio_level\t\tno
rtp_ports\t\t10000-10099
rtcp_mux\t\tno
rtp_stats\t\tno
net_interface\t\t%(host)s
dns_server\t\t%(host)s:53
module_path\t\t%(mods)s
module\t\t\tg711.so
module\t\t\taubridge.so
module_tmp\t\tuuid.so
module_tmp\t\taccount.so
module_app\t\tmenu.so
module_app\t\tctrl_tcp.so
ctrl_tcp_listen\t\t127.0.0.1:4441
"""


def baresip_calls(a, procs, work, insts, deadline):
    """CALLS calls from one baresip phone (it resolves sip:service@POOL by
    SRV itself, through dnsmasq: dns_server), one at a time, each held 1 s;
    the instance that set up the KILL_AFTER-th call is killed mid-call;
    every call must reach its server and end there (the servers' SIPp
    counts): True when all did. baresip 1.0 (libre) does not meet it: it
    tries the next SRV target only when a transaction times out (32 s),
    sends every new request to the dead target first again, and its ACK of
    a 2xx (no transaction) to the dead target is lost: printed, not hidden."""
    mods = baresip_module_path()
    folder = os.path.join(work, "alice")
    os.makedirs(folder)
    with open(os.path.join(folder, "config"), "w") as f:
        f.write(BARESIP_CONFIG % {"host": HOST, "mods": mods})
    with open(os.path.join(folder, "accounts"), "w") as f:
        f.write("<sip:alice@%s>;regint=0;answermode=manual;audio_codecs=pcmu\n" % POOL)
    ph = Phone("alice", folder, HOST, 5090, 4441)
    ph.proc = procs.start("baresip", ["baresip", "-f", folder, "-s"], ph.logpath)
    ph.connect(deadline.upto(10))
    A = insts[0]
    results = []
    killed = False
    for i in range(1, a.calls + 1):
        n = len(ph.events)
        before = [None if killed and x is A else x.selected() for x in insts]
        t0 = time.monotonic()
        ph.command("dial", "sip:service@%s" % POOL, deadline.upto(5))
        e = ph.wait_event(lambda e: ph.events.index(e) >= n and e.get("type") in (
            "CALL_ESTABLISHED", "CALL_CLOSED"), deadline.upto(40))
        up = bool(e and e["type"] == "CALL_ESTABLISHED")
        setup = time.monotonic() - t0
        after = [None if killed and x is A else x.selected() for x in insts]
        via = [x.name for x, b, c in zip(insts, before, after) if b is not None and c is not None and c > b]
        if up and not killed and i >= a.kill_after and via:
            # The instance this call went through dies mid-call.
            A = next(x for x in insts if x.name == via[0])
            os.kill(A.proc.pid, 9)
            A.proc.wait(timeout=5)
            killed = True
            log("call %d set up through %s; %s killed (pid %d) mid-call" % (i, A.name, A.name, A.proc.pid))
        time.sleep(1)
        closed_at = None
        if up:
            m = len(ph.events)
            t1 = time.monotonic()
            ph.command("hangup", "", deadline.upto(5))
            c = ph.wait_event(lambda e: ph.events.index(e) >= m and e.get("type") == "CALL_CLOSED",
                              deadline.upto(40))
            closed_at = time.monotonic() - t1
        results.append((i, up, via, setup, closed_at))
        log("call %d: %s through %s, set up in %.2f s%s" % (
            i, "up" if up else "FAILED (%s)" % (e and e.get("param")), "/".join(via) or "?",
            setup, "" if closed_at is None else ", hung up"))
    # The servers' view: each call's BYE reached its server (SIPp uas_rr
    # counts a call successful only after BYE, 200; its counts are written
    # every second). A BYE first sent to the dead instance gets to another
    # one only after baresip's transaction timeout (32 s).
    def served():
        n = 0
        for sid in ("s1", "s2"):
            path = os.path.join(work, "uas-%s.csv" % sid)
            if os.path.exists(path):
                n += int(sipp_totals(path).get("SuccessfulCall(C)", 0))
        return n
    try:
        wait_until(lambda: served() >= a.calls, deadline.upto(40), step=0.5, what="the servers' counts")
    except Timeout:
        pass
    served = served()
    upc = sum(1 for r in results if r[1])
    log("baresip: %d calls, %d set up, %d ended at their server (BYE, 200)" % (a.calls, upc, served))
    log("calls=%d ok=%d failed=%d" % (a.calls, served, a.calls - served))
    return served == a.calls and killed


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--rate", type=int, default=10, help="calls per second")
    ap.add_argument("--hold", type=int, default=2000, help="ms between the ACK and the re-INVITE")
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--allowed-lost", type=int, default=0,
                    help="calls that may fail (a transaction A held when it died)")
    ap.add_argument("--kill-after", type=int, default=2,
                    help="A is killed once it has set up this many calls")
    ap.add_argument("--no-kill", action="store_true", help="no instance killed (a control run)")
    ap.add_argument("--keep", action="store_true", help="keep the run's folder")
    ap.add_argument("--phone", choices=["sipp", "baresip"], default="sipp",
                    help="sipp: SIPp phones behind Kamailio; baresip: one baresip phone "
                         "resolving the pool by SRV itself (dns_server), CALLS calls one at a time")
    a = ap.parse_args()
    missing = [t for t in ("sipp", "ip", "dnsmasq", "kamailio", "unshare", "mount") + (
        ("baresip",) if a.phone == "baresip" else ())
               if not shutil.which(t)]
    if missing:
        log("missing: %s (apt-get install sip-tester iproute2 dnsmasq-base kamailio util-linux)"
            % " ".join(missing))
        return 2
    if not os.access(a.siplb, os.X_OK):
        log("no siplb binary at %s (cargo build --release)" % a.siplb)
        return 2
    mpath = module_path()
    if not mpath:
        log("no Kamailio modules (tm.so) under /usr/lib/*/kamailio/modules")
        return 2
    why = permitted()
    if why:
        log("cannot make network namespaces here: %s" % why)
        return 77

    deadline = Deadline(a.timeout)
    work = tempfile.mkdtemp(prefix="siplb-pool-srv-")
    procs = Procs()
    made = []
    tag = os.getpid()
    insts = [Instance(n, i + 1, tag, record_route=POOL) for i, n in enumerate("ABC")]
    A = insts[0]
    ok = False
    try:
        run(["ip", "link", "set", "lo", "up"])
        run(["ip", "addr", "add", HOST + "/32", "dev", "lo"])
        for inst in insts:
            inst.up(made)

        procs.start("dnsmasq", dnsmasq_argv(insts, work), os.path.join(work, "dnsmasq.log"))
        answers = wait_until(dns_srv_answers, deadline.upto(10), step=0.1, what="dnsmasq answering")
        log("dnsmasq on %s:53: _sip._udp.%s SRV -> %d targets" % (HOST, POOL, answers))

        kdir = os.path.join(work, "kamailio")
        os.makedirs(kdir)
        with open(os.path.join(ROOT, "bench", "kamailio", "srv_edge.cfg")) as f:
            cfg = f.read()
        cfg = (cfg.replace("HOST_ADDR", HOST).replace("POOL_NAME", POOL)
               .replace("MODULE_PATH", mpath + "/"))
        with open(os.path.join(kdir, "kamailio.cfg"), "w") as f:
            f.write(cfg)
        resolv = os.path.join(kdir, "resolv.conf")
        with open(resolv, "w") as f:
            f.write("nameserver %s\noptions timeout:1 attempts:1\n" % HOST)
        # Kamailio's resolver reads /etc/resolv.conf: its own, in a mount
        # namespace of its own (unshare makes its mounts private).
        klog = os.path.join(kdir, "kamailio.log")
        kam = procs.start("kamailio", [
            "unshare", "--mount", "sh", "-c",
            'mount --bind "$0" /etc/resolv.conf && exec kamailio -f "$1" -DD -E -m 64 -M 8 '
            '-Y "$2" -u root -g root',
            resolv, os.path.join(kdir, "kamailio.cfg"), kdir], klog, cwd=kdir)

        for sid, port in (("s1", 5081), ("s2", 5082)):
            scen = "uas_rr_reinvite.xml" if a.phone == "sipp" else "uas_rr.xml"
            procs.start("uas-" + sid, ["sipp", "-sf", os.path.join(SIPP, scen),
                                       "-i", HOST, "-p", str(port), "-nostdin",
                                       "-trace_err", "-error_file",
                                       os.path.join(work, "uas-%s.err" % sid),
                                       "-trace_stat", "-stf", os.path.join(work, "uas-%s.csv" % sid),
                                       "-fd", "1"],
                        os.path.join(work, "uas-%s.log" % sid), cwd=work)
        for inst in insts:
            inst.start(procs, a.siplb, work)
        for inst in insts:
            wait_until(inst.ready, deadline.upto(15), what="siplb %s ready" % inst.name)

        def kamailio_up():
            if kam.poll() is not None:
                raise RuntimeError("kamailio exited (%s):\n%s" % (kam.returncode, tail(klog)))
            return options_ok(HOST)
        wait_until(kamailio_up, deadline.upto(15), step=0.1, what="kamailio answering OPTIONS")
        log("ready: %s; Kamailio on %s:5060 resolving %s by SRV" % (
            ", ".join("%s %s" % (i.name, i.addr) for i in insts), HOST, POOL))

        if a.phone == "baresip":
            ok = baresip_calls(a, procs, work, insts, deadline)
            return 0 if ok else 1  # (the finally below stops everything)

        stat = os.path.join(work, "uac_stat.csv")
        uac = procs.start("uac", ["sipp", "-sf", os.path.join(SIPP, "uac_rr_reinvite.xml"),
                                  "%s:5060" % HOST, "-i", HOST, "-p", "5070",
                                  "-r", str(a.rate), "-m", str(a.calls), "-l", str(a.calls),
                                  "-d", str(a.hold), "-nostdin", "-timeout_error",
                                  "-timeout", str(int(max(deadline.left() - 5, 10))) + "s",
                                  "-trace_stat", "-stf", stat, "-fd", "1",
                                  "-trace_err", "-error_file", os.path.join(work, "uac.err")],
                           os.path.join(work, "uac.log"), cwd=work)
        held = {}
        through_a = 0
        if not a.no_kill:
            # KILL_AFTER calls set up through A (mid-call: in their hold),
            # then A dies. SRV weights pick A for a third of the calls at
            # random: 2 of 24 calls miss A with a chance under 0.1 %.
            wait_until(lambda: A.selected() >= a.kill_after, deadline.upto(20),
                       step=0.05, what="calls set up through A")
            # What A held and had set up, read together just before the
            # kill (a call A takes in between is counted by neither).
            held = A.get("/drain") or {}
            through_a = A.selected()
            os.kill(A.proc.pid, 9)
            A.proc.wait(timeout=5)
            log("A killed (pid %d) after setting up %d calls; it held sessions=%s transactions=%s"
                % (A.proc.pid, through_a, held.get("sessions"), held.get("transactions")))

        wait_until(lambda: uac.poll() is not None, deadline.upto(a.timeout),
                   step=0.2, what="the uac to finish its calls")
        totals = sipp_totals(stat) if os.path.exists(stat) else {}
        okc = int(totals.get("SuccessfulCall(C)", 0))
        failed = a.calls - okc
        counts = {}
        for inst in insts:
            v = None if inst is A and not a.no_kill else inst.servers()
            rows = (v.get("servers", v) if isinstance(v, dict) else v) or []
            sel = sum(int(s.get("selected_total", 0)) for s in rows if isinstance(s, dict))
            fwd = sum(int(s.get("forwarded_total", 0)) for s in rows if isinstance(s, dict))
            counts[inst.name] = (through_a, None) if inst is A and not a.no_kill else (sel, fwd)
            log("instance %s (%s): new calls %d, requests forwarded %s%s" % (
                inst.name, inst.addr, counts[inst.name][0],
                "?" if counts[inst.name][1] is None else counts[inst.name][1],
                " (killed; its count before the kill)" if inst is A and not a.no_kill else ""))
        klines = open(klog, errors="replace").read()
        in_dialog = len(re.findall(r"in-dialog (?:INVITE|BYE|ACK) ", klines))
        # tm's DNS failover: a branch that got no answer (A dead), the
        # request sent to the next SRV target.
        retried = re.findall(r"branch failed: (\S+) ", klines)
        log("Kamailio: %d new calls, %d in-dialog requests sent to %s by SRV; "
            "%d unanswered by a target and sent to the next one (%s)" % (
                len(re.findall(r"new INVITE ", klines)), in_dialog, POOL, len(retried),
                ", ".join("%s %d" % (m, retried.count(m)) for m in sorted(set(retried))) or "none"))
        log("sipp: successful=%d failed=%s retransmissions=%s (exit %s)" % (
            okc, totals.get("FailedCall(C)", "?"), totals.get("Retransmissions(C)", "?"),
            uac.returncode))
        in_flight = int(held.get("transactions") or 0)
        log("failed calls: %d (allowed: %d); transactions on A when it died (completed ones "
            "included): %d" % (failed, a.allowed_lost, in_flight))
        log("calls=%d ok=%d failed=%d" % (a.calls, okc, failed))
        spread = all(c[0] > 0 for c in counts.values())
        after = all(counts[i.name][0] > 0 for i in insts[1:])
        ok = spread and after and failed <= a.allowed_lost and okc > 0
        if not a.no_kill:
            # A held dialogs when it died (calls in their hold): their
            # re-INVITE, ACK and BYE could only go through B or C.
            mid = int(held.get("sessions") or 0)
            log("dialogs A held when it died, finished through B and C: %d" % (
                mid if failed <= a.allowed_lost else 0))
            ok = ok and mid > 0
        if not spread:
            log("not every instance carried calls: %s" % counts)
        if not ok:
            for f in ("uac.err", "uac.log", "kamailio/kamailio.log", "dnsmasq.log",
                      "B/siplb.log", "C/siplb.log"):
                log("--- %s\n%s" % (f, tail(os.path.join(work, f), 30)))
    except (Timeout, RuntimeError, subprocess.TimeoutExpired) as e:
        log("pool srv test failed: %s" % e)
        for f in ("uac.log", "kamailio/kamailio.log", "dnsmasq.log", "A/siplb.log", "B/siplb.log"):
            log("--- %s\n%s" % (f, tail(os.path.join(work, f), 30)))
    finally:
        procs.stop_all()
        for argv in reversed(made):
            run(argv, check=False)
        leave_work(work, ok, a.keep)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
