#!/usr/bin/env python3
"""An answer that comes back after the pool's virtual IP left this instance
still reaches the phone (a planned switchover: bench/pool.py --mode drain,
made deterministic).

Run it in a network namespace of its own:

    unshare --net sh -c 'ip link set lo up && exec python3 bench/vip_gone.py \\
        --siplb target/release/siplb'

One instance, on lo: the VIP 10.201.0.100 (sip.listen with sip.freebind,
sip.record_route) and its own address 10.201.1.2 (sip.advertise); a phone
(a plain UDP socket, 10.201.0.1:5070) and a server (another, :5081, no
SIPp: the test decides when it answers). The phone sends an INVITE to the
VIP; the server gets it and answers 100 only; the VIP is deleted from lo
(keepalived moving it to the other instance); then the server answers 180
and 200. The phone must get the 180 and the 200 (from the instance's own
address: the VIP is no longer ours to send from), and the instance must
count what it did (siplb_udp_source_fallback_total). Then the same for a
BYE from the server to the phone (a request by the dialog's Record-Route).

Exit 0 when it holds, 1 when not, 2 usage or a missing program, 77 when the
namespace's addresses cannot be set (not root / not in a namespace).
"""
import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Deadline, Procs, Timeout, leave_work, log, wait_until  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "10.201.0.1"
VIP = "10.201.0.100"
OWN = "10.201.1.2"
ADMIN = "127.0.0.1:8060"


def sh(cmd, check=True):
    r = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (cmd, r.returncode, r.stdout.decode().strip()))
    return r


def udp(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, port))
    s.settimeout(3)
    return s


def recv(s, want):
    """The next datagram on `s` whose first line starts with `want` (others
    are logged and skipped); (text, source)."""
    while True:
        data, src = s.recvfrom(65535)
        text = data.decode(errors="replace")
        first = text.split("\r\n", 1)[0]
        if first.startswith(want):
            return text, src
        log("  (skipped %r from %s:%d)" % (first, src[0], src[1]))


def headers(text, name):
    return [line for line in text.split("\r\n\r\n", 1)[0].split("\r\n")[1:]
            if line.lower().startswith(name.lower() + ":")]


def answer(req, status, totag="srv1"):
    """A response to `req` (its Via, From, To, Call-ID, CSeq, Record-Route)."""
    keep = []
    for name in ("Via", "From", "To", "Call-ID", "CSeq", "Record-Route"):
        for line in headers(req, name):
            if name == "To" and ";tag=" not in line:
                line += ";tag=" + totag
            keep.append(line)
    return ("SIP/2.0 %s\r\n%s\r\nContact: <sip:srv@%s:5081>\r\nContent-Length: 0\r\n\r\n"
            % (status, "\r\n".join(keep), HOST)).encode()


def metric(name):
    body = urllib.request.urlopen("http://%s/metrics" % ADMIN, timeout=2).read().decode()
    total = 0.0
    for line in body.splitlines():
        m = re.match(r"^%s(\{[^}]*\})? ([0-9.e+]+)$" % re.escape(name), line)
        if m:
            total += float(m.group(2))
    return total


def ready():
    try:
        urllib.request.urlopen("http://%s/readyz" % ADMIN, timeout=1)
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    ap.add_argument("--timeout", type=float, default=30)
    a = ap.parse_args()
    if not os.access(a.siplb, os.X_OK):
        log("no siplb binary at %s (cargo build --release)" % a.siplb)
        return 2
    if not shutil.which("ip"):
        log("ip not found (apt-get install iproute2)")
        return 2
    if os.geteuid() != 0 or sh("ip addr add %s/32 dev lo" % HOST, check=False).returncode:
        log("cannot set addresses here (run as root in a namespace of its own)")
        return 77
    sh("ip addr add %s/32 dev lo" % VIP)
    sh("ip addr add %s/32 dev lo" % OWN)

    deadline = Deadline(a.timeout)
    work = tempfile.mkdtemp(prefix="siplb-vipgone-")
    procs = Procs()
    ok = False
    try:
        with open(os.path.join(work, "agent.key"), "w") as f:
            f.write("vip-gone-agent-key-0123456789\n")
        cfg = os.path.join(work, "siplb.toml")
        with open(cfg, "w") as f:
            f.write("""[sip]
listen = ["%s:5060", "%s:5060"]
freebind = true
transports = ["udp"]
advertise = "%s:5060"
record_route = "%s:5060"
[routing]
secret = "vip-gone-secret-0123456789abcdef"
policy = "static"
[perf]
key_file = "agent.key"
[admin]
listen = "%s"
[[servers]]
id = "s1"
address = "%s:5081"
""" % (VIP, OWN, OWN, VIP, ADMIN, HOST))
        log_path = os.path.join(work, "siplb.log")
        procs.start("siplb", [a.siplb, "balancer", "--config", cfg], log_path)
        wait_until(ready, deadline.upto(15), what="siplb ready")
        phone, server = udp(5070), udp(5081)
        call = "vip-gone-%d" % os.getpid()
        invite = ("INVITE sip:bob@%s:5060 SIP/2.0\r\n"
                  "Via: SIP/2.0/UDP %s:5070;branch=z9hG4bK-vg1;rport\r\n"
                  "Max-Forwards: 70\r\nFrom: <sip:alice@%s>;tag=ph1\r\nTo: <sip:bob@%s>\r\n"
                  "Call-ID: %s\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@%s:5070>\r\n"
                  "Content-Length: 0\r\n\r\n") % (VIP, HOST, HOST, VIP, call, HOST)
        phone.sendto(invite.encode(), (VIP, 5060))
        trying, src = recv(phone, "SIP/2.0 100")
        log("phone: 100 Trying from %s:%d (the VIP still ours)" % src)
        req, via = recv(server, "INVITE ")
        log("server: INVITE from %s:%d" % via)
        server.sendto(answer(req, "100 Trying"), via)
        before = metric("siplb_udp_source_fallback_total")

        sh("ip addr del %s/32 dev lo" % VIP)
        log("VIP deleted from lo (it moved to the other instance)")
        # Where the response goes: the top Via (ours, our own address).
        top = headers(req, "Via")[0]
        m = re.search(r"SIP/2.0/UDP ([0-9.]+):([0-9]+)", top)
        to = (m.group(1), int(m.group(2)))
        server.sendto(answer(req, "180 Ringing"), to)
        ring, src180 = recv(phone, "SIP/2.0 180")
        log("phone: 180 from %s:%d" % src180)
        server.sendto(answer(req, "200 OK"), to)
        ok200, src200 = recv(phone, "SIP/2.0 200")
        log("phone: 200 from %s:%d" % src200)

        # The server's BYE by the Record-Route (the VIP with our token):
        # the phone is reached from the instance's own address too.
        rr = headers(req, "Record-Route")
        route = rr[0].split(":", 1)[1].strip() if rr else None
        bye = ("BYE sip:alice@%s:5070 SIP/2.0\r\n"
               "Via: SIP/2.0/UDP %s:5081;branch=z9hG4bK-vg2;rport\r\n"
               "Max-Forwards: 70\r\nFrom: <sip:bob@%s>;tag=srv1\r\nTo: <sip:alice@%s>;tag=ph1\r\n"
               "Call-ID: %s\r\nCSeq: 1 BYE\r\nRoute: %s\r\nContent-Length: 0\r\n\r\n") % (
                   HOST, HOST, VIP, HOST, call, route)
        # The VIP is gone from here: the server reaches the instance by its
        # own address (as a pool peer would hand it over).
        server.sendto(bye.encode(), (OWN, 5060))
        got_bye, srcbye = recv(phone, "BYE ")
        log("phone: BYE from %s:%d" % srcbye)
        after = metric("siplb_udp_source_fallback_total")
        log("siplb_udp_source_fallback_total: %d -> %d" % (before, after))
        ok = (src180[0] == OWN and src200[0] == OWN and srcbye[0] == OWN
              and after - before >= 3 and route is not None)
        log("answers after the VIP left reached the phone, counted: %s" % ok)
    except (Timeout, RuntimeError, OSError) as e:
        log("vip_gone failed: %r" % e)
    finally:
        procs.stop_all()
        if not ok:
            try:
                with open(os.path.join(work, "siplb.log")) as f:
                    log("--- siplb.log\n" + f.read()[-4000:])
            except OSError:
                pass
        leave_work(work, ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
