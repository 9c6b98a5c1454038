#!/usr/bin/env python3
"""Real phones through siplb (issue 13): two Kamailio registrars as the pool,
siplb in front of them, and two baresip phones, alice and bob, registering
through siplb and calling each other.

    python3 bench/phones.py --transport udp --calls 4 --hangup callee
    python3 bench/phones.py --transport tcp --calls 4 --hangup both
    python3 bench/phones.py --transport tls --calls 2 --hangup both
    python3 bench/phones.py --transport tcp --nat --calls 2 --hangup both

What runs (ports with --port-offset added; everything on loopback, or in
network namespaces this script creates):

  kamailio s1 127.0.0.1:5081, s2 127.0.0.1:5082 (UDP and TCP): registrar
      and proxy, bench/phones/kamailio.cfg, in memory, no authentication
  siplb      127.0.0.1:5060 (UDP, TCP; TLS on 5061 with --transport tls),
      admin 127.0.0.1:8060, policy round-robin (no agents), REGISTER forked
  alice      baresip, SIP on 127.0.0.1:5310, control 127.0.0.1:4441
  bob        baresip, SIP on 127.0.0.1:5320, control 127.0.0.1:4442,
      auto-answer; with --nat in a network namespace of its own behind a
      masquerading router namespace (below)

Both phones have siplb as their outbound proxy, over --transport. Each call:
alice dials bob, bob answers, the call is held --hold seconds, then the
--hangup side hangs up (both: caller on odd calls, callee on even ones).
A call is ok when both phones said established, the other phone saw the
BYE (its call closed) and the side that hung up got a 200 for its BYE (read
from its SIP trace, baresip -s). One line per call, then the summary line
`calls=N ok=K failed=F`; exit status 0 only when every call was ok.

--nat: bob runs in namespace phb<pid> (10.200.0.6/30), whose default route
is a router namespace phr<pid> (10.200.0.5/30 towards bob, 10.200.0.2/30
towards the host) that masquerades everything leaving towards the host; the
host side of that link is 10.200.0.1/30, where siplb listens (and alice
points). The host gets an `unreachable 10.200.0.0/29` route so that bob's
private address can never be routed off the machine; Kamailio stays on
127.0.0.1, out of bob's reach (as the servers behind a real balancer).
So siplb sees bob at 10.200.0.2 (the NAT), bob's Contact says 10.200.0.6,
and a request for bob can only reach him through siplb (Path, the flow,
received/rport). Everything is torn down at the end, failure or not. Needs
root (ip netns, iptables); exit status 77 with a message when namespaces
cannot be made.

--transport tls: a throwaway CA and a certificate for 127.0.0.1 (and
10.200.0.1) are made with the openssl CLI in the run's folder; siplb's
config gets [sip.tls] and "tls" in sip.transports; the phones trust the CA.

Exit status: 0 every call ok; 1 a call failed or the test bed did not come
up (siplb exiting on its config included); 2 usage or a missing program;
77 --nat without the right to make namespaces. Everything lives in a
temporary folder (kept with --keep, or printed on failure with its logs);
every process is stopped by its PID; the whole run is bounded by --timeout.
"""
import argparse
import ctypes
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Deadline, Procs, Timeout, log, wait_until  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "bench", "phones")
DOMAIN = "example.test"
NAT_NET = "10.200.0"  # /29: host .1 | router .2 ; router .5 | bob .6


def run(argv, check=True):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), r.returncode,
                                                r.stdout.decode(errors="replace").strip()))
    return r


def tail(path, n=30):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no %s)" % path
    return "\n".join(lines[-n:])


# ------------------------------------------------------------ netns (--nat)

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def connect_in_netns(ns, addr, timeout):
    """A TCP connection to addr made from inside network namespace `ns`
    (setns on this thread for the connect only; the socket stays in ns)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open("/run/netns/" + ns, os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, "setns: " + os.strerror(e))
        try:
            return socket.create_connection(addr, timeout=timeout)
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                # Not back in our own namespace: nothing else here is safe.
                os._exit(70)
    finally:
        os.close(own)
        os.close(target)


class Nat:
    """bob's namespace behind a masquerading router namespace."""

    def __init__(self, tag):
        self.router = "phr%d" % tag
        self.bob = "phb%d" % tag
        self.host_if = "phh%d" % (tag % 1000000)
        self.made = []  # what to undo, in reverse

    host = NAT_NET + ".1"
    outside = NAT_NET + ".2"   # bob as the host sees him (the NAT)
    inside_gw = NAT_NET + ".5"
    bob_addr = NAT_NET + ".6"  # bob's own (private) address

    def up(self):
        r, b, h = self.router, self.bob, self.host_if
        run(["ip", "netns", "add", r])
        self.made.append(["ip", "netns", "del", r])
        run(["ip", "netns", "add", b])
        self.made.append(["ip", "netns", "del", b])
        run(["ip", "link", "add", h, "type", "veth", "peer", "name", "n0", "netns", r])
        self.made.append(["ip", "link", "del", h])
        run(["ip", "addr", "add", self.host + "/30", "dev", h])
        run(["ip", "link", "set", h, "up"])
        # bob's private range is never routed off the machine.
        run(["ip", "route", "add", "unreachable", NAT_NET + ".0/29"])
        self.made.append(["ip", "route", "del", "unreachable", NAT_NET + ".0/29"])
        run(["ip", "-n", r, "link", "set", "lo", "up"])
        run(["ip", "-n", r, "addr", "add", self.outside + "/30", "dev", "n0"])
        run(["ip", "-n", r, "link", "set", "n0", "up"])
        run(["ip", "-n", r, "link", "add", "n1", "type", "veth", "peer", "name", "b0", "netns", b])
        run(["ip", "-n", r, "addr", "add", self.inside_gw + "/30", "dev", "n1"])
        run(["ip", "-n", r, "link", "set", "n1", "up"])
        run(["ip", "-n", b, "link", "set", "lo", "up"])
        run(["ip", "-n", b, "addr", "add", self.bob_addr + "/30", "dev", "b0"])
        run(["ip", "-n", b, "link", "set", "b0", "up"])
        run(["ip", "-n", b, "route", "add", "default", "via", self.inside_gw])
        run(["ip", "netns", "exec", r, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        run(["ip", "netns", "exec", r, "iptables", "-t", "nat", "-A", "POSTROUTING",
             "-o", "n0", "-j", "MASQUERADE"])

    def down(self):
        for argv in reversed(self.made):
            run(argv, check=False)
        self.made = []


def nat_permitted():
    """Whether we may make network namespaces, veth pairs and NAT rules here."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "iptables"):
        if not shutil.which(tool):
            return "%s not found (apt-get install iproute2 iptables)" % tool
    probe = "phx%d" % os.getpid()
    r = run(["ip", "netns", "add", probe], check=False)
    if r.returncode != 0:
        return "ip netns add: " + r.stdout.decode(errors="replace").strip()
    try:
        r = run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-A",
                 "POSTROUTING", "-o", "lo", "-j", "MASQUERADE"], check=False)
        if r.returncode != 0:
            return "iptables MASQUERADE: " + r.stdout.decode(errors="replace").strip()
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None


# ------------------------------------------------------------ baresip control


class Phone:
    """One baresip process and its ctrl_tcp connection (netstring JSON)."""

    def __init__(self, name, folder, sip_addr, sip_port, ctrl_port, netns=None):
        self.name = name
        self.folder = folder
        self.sip_addr = sip_addr
        self.sip_port = sip_port
        self.ctrl_port = ctrl_port
        self.netns = netns
        self.logpath = os.path.join(folder, "baresip.log")
        self.proc = None
        self.sock = None
        self.events = []
        self.responses = {}
        self.cond = threading.Condition()
        self.closed = False
        self.token = 0

    def connect(self, until):
        def attempt():
            if self.proc.poll() is not None:
                raise RuntimeError("%s: baresip exited (%s):\n%s" % (
                    self.name, self.proc.returncode, tail(self.logpath)))
            try:
                if self.netns:
                    return connect_in_netns(self.netns, ("127.0.0.1", self.ctrl_port), 1)
                return socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=1)
            except OSError:
                return None
        self.sock = wait_until(attempt, until, 0.1, "%s: ctrl_tcp connect" % self.name)
        self.sock.settimeout(None)
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self.cond:
                    self.closed = True
                    self.cond.notify_all()
                return
            buf += data
            while True:
                m = re.match(rb"(\d+):", buf)
                if not m:
                    break
                n = int(m.group(1))
                start = m.end()
                if len(buf) < start + n + 1:
                    break
                body = buf[start:start + n]
                buf = buf[start + n + 1:]
                try:
                    msg = json.loads(body)
                except ValueError:
                    continue
                with self.cond:
                    if msg.get("event"):
                        msg["at"] = time.monotonic()
                        self.events.append(msg)
                    elif msg.get("response"):
                        self.responses[msg.get("token")] = msg
                    self.cond.notify_all()

    def command(self, cmd, params="", until=None):
        self.token += 1
        tok = "%s-%d" % (self.name, self.token)
        body = json.dumps({"command": cmd, "params": params, "token": tok}).encode()
        self.sock.sendall(str(len(body)).encode() + b":" + body + b",")
        until = until or time.monotonic() + 5
        with self.cond:
            while tok not in self.responses:
                left = until - time.monotonic()
                if left <= 0 or self.closed:
                    raise Timeout("%s: no answer to %s" % (self.name, cmd))
                self.cond.wait(left)
            return self.responses.pop(tok)

    def wait_event(self, pred, until):
        """The first event since the start for which pred holds, or None at `until`."""
        with self.cond:
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                left = until - time.monotonic()
                if left <= 0 or self.closed:
                    return None
                self.cond.wait(min(left, 0.5))

    def registered(self):
        data = self.command("reginfo").get("data", "")
        return "OK" in re.sub(r"\x1b\[[0-9;]*m", "", data)

    def trace(self):
        """The SIP messages of baresip's -s trace: (transport, src, dst, text)."""
        try:
            with open(self.logpath, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return []
        out = []
        for m in re.finditer(r"\x1b\[36;1m#\n(\S+) (\S+) -> (\S+)\n(.*?)\x1b\[;m", text, re.S):
            out.append((m.group(1), m.group(2), m.group(3), m.group(4)))
        return out


def header(msg, name):
    m = re.search(r"^%s\s*:\s*(.*?)\s*$" % re.escape(name), msg, re.M | re.I)
    return m.group(1) if m else None


def messages_of(phone, call_id):
    return [t for t in phone.trace() if header(t[3], "Call-ID") == call_id]


def bye_answered(phone, call_id):
    """A final response to a BYE of this call in phone's trace (it sent the BYE)."""
    for _, _, _, msg in messages_of(phone, call_id):
        first = msg.split("\n", 1)[0]
        cseq = header(msg, "CSeq") or ""
        if first.startswith("SIP/2.0 ") and cseq.endswith("BYE"):
            code = int(first.split()[1])
            if code >= 200:
                return code
    return None


def bye_transport(phone, call_id, sent):
    """The transport of the BYE of this call that phone sent (sent=True) or
    received, from its trace; None when there is none."""
    for tr, src, dst, msg in messages_of(phone, call_id):
        if msg.startswith("BYE "):
            # Sent or received: the top Via is the phone's own when it sent it
            # (a stream's local port is not the listening one).
            via = (header(msg, "Via") or "").split(";")[0]
            # baresip's TLS listener is on its SIP port + 1.
            ours = any(("%s:%d" % (phone.sip_addr, p)) in via
                       for p in (phone.sip_port, phone.sip_port + 1))
            if ours == sent:
                return tr
    return None


def summary_of(msg):
    """First line and the routing headers of one traced message."""
    keep = ("via", "route", "record-route", "contact", "cseq", "path")
    lines = msg.strip("\n").split("\n")
    out = [lines[0]]
    for line in lines[1:]:
        if line.split(":", 1)[0].strip().lower() in keep:
            out.append("  " + line)
    return "\n".join(out)


# ------------------------------------------------------------ configs


def sip_options_ok(addr, port, timeout=0.3):
    """An OPTIONS over UDP answered (any status)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.bind(("127.0.0.1", 0))
        lport = s.getsockname()[1]
        cid = "probe-%d-%d" % (os.getpid(), time.monotonic_ns())
        msg = ("OPTIONS sip:%s:%d SIP/2.0\r\n"
               "Via: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK%s;rport\r\n"
               "Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=p1\r\n"
               "To: <sip:%s:%d>\r\nCall-ID: %s\r\nCSeq: 1 OPTIONS\r\n"
               "Content-Length: 0\r\n\r\n" % (addr, port, lport, cid, addr, port, cid))
        s.sendto(msg.encode(), (addr, port))
        data, _ = s.recvfrom(65536)
        return data.startswith(b"SIP/2.0 ")
    except OSError:
        return False
    finally:
        s.close()


def kamailio_mpath():
    for d in sorted(glob.glob("/usr/lib/*/kamailio/modules")) + ["/usr/lib/kamailio/modules",
                                                                  "/usr/local/lib64/kamailio/modules"]:
        if os.path.exists(os.path.join(d, "registrar.so")):
            return d + "/"
    return None


def baresip_module_path():
    for d in ["/usr/lib/baresip/modules", "/usr/local/lib/baresip/modules"] + \
            sorted(glob.glob("/usr/lib/*/baresip/modules")):
        if os.path.exists(os.path.join(d, "ctrl_tcp.so")):
            return d
    return None


def make_certs(folder, ips):
    """A throwaway CA and a server certificate (SAN: the ips) signed by it."""
    ca_key, ca = os.path.join(folder, "ca.key"), os.path.join(folder, "ca.pem")
    key, csr, cert = (os.path.join(folder, n) for n in ("key.pem", "server.csr", "cert.pem"))
    ext = os.path.join(folder, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
                % ",".join("IP:" + ip for ip in ips))
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
         "-out", ca, "-days", "2", "-subj", "/CN=siplb phones test CA"])
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=%s" % ips[0]])
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext])
    # The chain siplb serves: its certificate, then the CA.
    chain = os.path.join(folder, "chain.pem")
    with open(chain, "w") as out:
        out.write(open(cert).read())
        out.write(open(ca).read())
    return ca, chain, key


def siplb_config(work, a, lb_addr, ports, tls):
    key = os.path.join(work, "agent.key")
    with open(key, "w") as f:
        f.write(os.urandom(16).hex() + "\n")
    os.chmod(key, 0o600)
    transports = ["udp", "tcp"] + (["tls"] if tls else [])
    text = """# written by bench/phones.py
[sip]
listen = ["{lb}:{sip}"]
transports = {transports}
""".format(lb=lb_addr, sip=ports["sip"], transports=json.dumps(transports))
    if tls:
        text += 'tls_port = {tls}\n\n[sip.tls]\ncertificate = "{cert}"\nkey = "{key}"\n'.format(
            tls=ports["tls"], cert=tls[1], key=tls[2])
        if a.server_transport == "tls":
            # TLS servers send their requests back to us over TLS.
            text += 'server_ca = "{ca}"\n'.format(ca=tls[0])
    text += """
[routing]
secret = "phones-bench-secret-{rand}"
policy = "round-robin"
register = "fork"
# No agents, as the e2e tests of round-robin (edge_e2e.rs, admin_e2e.rs):
# health "agent" with no agent configured routes to every server.
health = "agent"

[perf]
key_file = "agent.key"

[admin]
listen = "127.0.0.1:{admin}"

[[servers]]
id = "s1"
address = "127.0.0.1:{k1}"
transport = "{st}"

[[servers]]
id = "s2"
address = "127.0.0.1:{k2}"
transport = "{st}"
""".format(rand=os.urandom(8).hex(), admin=ports["admin"],
           k1=ports["k1tls" if a.server_transport == "tls" else "k1"],
           k2=ports["k2tls" if a.server_transport == "tls" else "k2"],
           st=a.server_transport)
    path = os.path.join(work, "siplb.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def admin_get(port, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=1) as r:
        return r.read().decode()


# ------------------------------------------------------------ the run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    ap.add_argument("--transport", choices=["udp", "tcp", "tls"], default="udp",
                    help="the phones' transport to siplb")
    ap.add_argument("--server-transport", choices=["udp", "tcp", "tls"], default="udp",
                    help="siplb to the Kamailios")
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--hangup", choices=["caller", "callee", "both"], default="both")
    ap.add_argument("--hold", type=float, default=1.0, help="seconds a call is held")
    ap.add_argument("--nat", action="store_true", help="bob behind NAT (network namespaces)")
    ap.add_argument("--outbound", action="store_true",
                    help="the phones use RFC 5626 outbound (baresip sipnat=outbound). Experimental: "
                         "baresip then puts a GRUU (sip:bob@example.test;gr=...) in its Contact, "
                         "which bench/phones/kamailio.cfg does not resolve, so calls fail "
                         "(the ACK never reaches bob) whatever siplb does")
    ap.add_argument("--port-offset", type=int, default=0, help="added to every port")
    ap.add_argument("--timeout", type=float, default=60, help="bound on the whole run (s)")
    ap.add_argument("--bye-timeout", type=float, default=4,
                    help="seconds for a BYE to reach the other phone and be answered")
    ap.add_argument("--any-transport", action="store_true",
                    help="accept a BYE sent or received over another transport than --transport "
                         "(baresip also listens on UDP, so such a BYE still arrives here)")
    ap.add_argument("--debug", action="store_true", help="SIPLB_LOG=debug for siplb")
    ap.add_argument("--keep", action="store_true", help="keep the run's folder")
    a = ap.parse_args()
    if a.calls < 1:
        ap.error("--calls must be at least 1")

    missing = [p for p in ("kamailio", "baresip") + (("openssl",) if a.transport == "tls" else ())
               if not shutil.which(p)]
    if missing:
        log("missing: %s (apt-get install kamailio baresip openssl)" % " ".join(missing))
        return 2
    if not os.access(a.siplb, os.X_OK):
        log("siplb binary not found: %s (cargo build --release, or --siplb PATH)" % a.siplb)
        return 2
    mpath, bmods = kamailio_mpath(), baresip_module_path()
    if not mpath or not bmods:
        log("Kamailio modules (registrar.so) or baresip modules (ctrl_tcp.so) not found")
        return 2
    if a.nat:
        why = nat_permitted()
        if why:
            log("SKIP --nat: cannot make network namespaces here: %s" % why)
            return 77

    off = a.port_offset
    ports = dict(sip=5060 + off, tls=5061 + off, admin=8060 + off, k1=5081 + off, k2=5082 + off,
                 k1tls=5091 + off, k2tls=5092 + off,
                 alice=5310 + off, bob=5320 + off, actl=4441 + off, bctl=4442 + off)
    deadline = Deadline(a.timeout)
    work = tempfile.mkdtemp(prefix="siplb-phones-")
    procs = Procs()
    nat = Nat(os.getpid()) if a.nat else None
    results = []
    ok = False

    def on_alarm(*_):
        raise Timeout("the whole run (--timeout %g s)" % a.timeout)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_alarm)
    signal.alarm(int(a.timeout) + 15)  # a last resort; the waits below keep to deadline
    try:
        if nat:
            nat.up()
        lb_addr = nat.host if nat else "127.0.0.1"
        log("work folder %s; siplb %s; transport %s%s" % (
            work, a.siplb, a.transport, ", bob behind NAT" if nat else ""))

        tls = None
        if a.transport == "tls" or a.server_transport == "tls":
            tls = make_certs(work, ["127.0.0.1"] + ([nat.host] if nat else []))

        # --- Kamailio pool
        kams = []
        with open(os.path.join(HERE, "kamailio.cfg")) as f:
            ktext = f.read()
        for sid in ("s1", "s2"):
            port = ports["k1" if sid == "s1" else "k2"]
            kdir = os.path.join(work, sid)
            os.mkdir(kdir)
            cfg = os.path.join(kdir, "kamailio.cfg")
            tls_listen = tls_module = ""
            if a.server_transport == "tls":
                # Kamailio's tls module (Debian: kamailio-tls-modules) with
                # the test CA's certificate; it does not check ours.
                tls_cfg = os.path.join(kdir, "tls.cfg")
                with open(tls_cfg, "w") as f:
                    f.write("[server:default]\nmethod = TLSv1.2+\nverify_certificate = no\n"
                            "require_certificate = no\nprivate_key = %s\ncertificate = %s\n\n"
                            "[client:default]\nmethod = TLSv1.2+\nverify_certificate = no\n"
                            "require_certificate = no\n" % (tls[2], tls[1]))
                tport = ports["k1tls" if sid == "s1" else "k2tls"]
                tls_listen = "enable_tls=yes\nlisten=tls:127.0.0.1:%d" % tport
                tls_module = 'loadmodule "tls.so"\nmodparam("tls", "config", "%s")' % tls_cfg
            with open(cfg, "w") as f:
                f.write(ktext.replace("@ADDR@", "127.0.0.1").replace("@PORT@", str(port))
                        .replace("@DOMAIN@", DOMAIN).replace("@MPATH@", mpath)
                        .replace("@TLS_LISTEN@", tls_listen).replace("@TLS_MODULE@", tls_module))
            klog = os.path.join(kdir, "kamailio.log")
            p = procs.start("kamailio-" + sid, ["kamailio", "-f", cfg, "-DD", "-E", "-m", "64",
                                                 "-M", "8", "-Y", kdir], klog)
            kams.append((sid, port, p, klog))
        for sid, port, p, klog in kams:
            def up(p=p, port=port, klog=klog, sid=sid):
                if p.poll() is not None:
                    raise RuntimeError("kamailio %s exited (%s):\n%s" % (sid, p.returncode, tail(klog)))
                return sip_options_ok("127.0.0.1", port)
            wait_until(up, deadline.upto(15), 0.1, "kamailio %s answering OPTIONS" % sid)

        # --- siplb
        conf = siplb_config(work, a, lb_addr, ports, tls)
        env = dict(os.environ)
        env["SIPLB_LOG"] = "debug" if a.debug else env.get("SIPLB_LOG", "info")
        lblog = os.path.join(work, "siplb.log")
        lb = procs.start("siplb", [a.siplb, "balancer", "--config", conf], lblog, env)

        def lb_up():
            if lb.poll() is not None:
                raise RuntimeError("siplb exited with status %s:\n%s" % (lb.returncode, tail(lblog)))
            try:
                servers = json.loads(admin_get(ports["admin"], "/servers"))
            except (OSError, ValueError):
                return False
            return len(servers) == 2
        try:
            wait_until(lb_up, deadline.upto(10), 0.1, "siplb's admin API listing s1 and s2")
        except Timeout:
            try:
                log("GET /servers: " + admin_get(ports["admin"], "/servers"))
            except OSError as e:
                log("GET /servers: %s" % e)
            raise

        # --- phones
        if a.transport == "udp":
            outbound = "sip:%s:%d;transport=udp" % (lb_addr, ports["sip"])
        elif a.transport == "tcp":
            outbound = "sip:%s:%d;transport=tcp" % (lb_addr, ports["sip"])
        else:
            outbound = "sip:%s:%d;transport=tls" % (lb_addr, ports["tls"])
        with open(os.path.join(HERE, "baresip.config")) as f:
            btext = f.read()
        phones = {}
        for name, rtp in (("alice", "10000-10099"), ("bob", "10100-10199")):
            folder = os.path.join(work, name)
            os.mkdir(folder)
            in_nat = nat and name == "bob"
            sip_addr = nat.bob_addr if in_nat else "127.0.0.1"
            tls_lines = "sip_cafile\t\t%s" % tls[0] if tls else ""
            with open(os.path.join(folder, "config"), "w") as f:
                f.write(btext.replace("@SIP_ADDR@", sip_addr)
                        .replace("@SIP_PORT@", str(ports[name]))
                        .replace("@TLS_LINES@", tls_lines)
                        .replace("@RTP_PORTS@", rtp)
                        .replace("@NET_IF@", sip_addr)
                        .replace("@MODULE_PATH@", bmods)
                        .replace("@CTRL_ADDR@", "127.0.0.1")
                        .replace("@CTRL_PORT@", str(ports["actl" if name == "alice" else "bctl"])))
            account = "<sip:%s@%s>;outbound=\"%s\";answermode=%s;regint=600;audio_codecs=pcmu" % (
                name, DOMAIN, outbound, "auto" if name == "bob" else "manual")
            if a.outbound:
                account += ";sipnat=outbound"
            with open(os.path.join(folder, "accounts"), "w") as f:
                f.write(account + "\n")
            ph = Phone(name, folder, sip_addr, ports[name],
                       ports["actl" if name == "alice" else "bctl"],
                       nat.bob if in_nat else None)
            argv = ["baresip", "-f", folder, "-s"]
            if in_nat:
                argv = ["ip", "netns", "exec", nat.bob] + argv  # execs baresip: same PID
            ph.proc = procs.start(name, argv, ph.logpath)
            phones[name] = ph
        alice, bob = phones["alice"], phones["bob"]
        for ph in (alice, bob):
            ph.connect(deadline.upto(10))

        # Registered through siplb, at both Kamailios (REGISTER forked).
        def all_registered():
            if not (alice.registered() and bob.registered()):
                return False
            for sid, _, _, klog in kams:
                text = open(klog, errors="replace").read()
                for name in ("alice", "bob"):
                    if not re.search(r"SAVED sip:%s@" % name, text):
                        return False
            return True
        try:
            wait_until(all_registered, deadline.upto(15), 0.2, "both phones registered at s1 and s2")
        except Timeout:
            for sid, _, _, klog in kams:
                log("%s saved: %s" % (sid, re.findall(r"SAVED \S+", open(klog, errors="replace").read())))
            raise
        log("registered: alice and bob, at s1 and s2")
        for sid, _, _, klog in kams:
            for line in re.findall(r"SAVED .*", open(klog, errors="replace").read()):
                log("  %s %s" % (sid, line))
                break

        # --- calls
        for i in range(1, a.calls + 1):
            if deadline.left() < a.hold + a.bye_timeout + 2:
                log("call %d: not placed, the run's --timeout is nearly up" % i)
                results.append(dict(call=i, ok=False, why="not placed (timeout)"))
                continue
            hanger = {"caller": "alice", "callee": "bob"}.get(a.hangup) or ("alice" if i % 2 else "bob")
            results.append(one_call(i, alice, bob, hanger, a, deadline))
        ok = bool(results) and all(r["ok"] for r in results)
        try:
            m = admin_get(ports["admin"], "/metrics")
            picks = [ln for ln in m.splitlines()
                     if ln.startswith(("siplb_requests_total", "siplb_drops_total",
                                       "siplb_local_responses_total"))]
            log("siplb metrics: " + "; ".join(ln.replace("siplb_", "") for ln in picks))
        except OSError as e:
            log("siplb metrics: %s" % e)
    except (Timeout, RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        log("ERROR: %s" % e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        procs.stop_all()
        if nat:
            nat.down()
    failed = a.calls - sum(1 for r in results if r["ok"])
    if not ok:
        log("logs: %s (siplb.log, s1/ s2/ kamailio.log, alice/ bob/ baresip.log)" % work)
        log("siplb log tail:\n" + tail(os.path.join(work, "siplb.log"), 15))
    if ok and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    log("calls=%d ok=%d failed=%d" % (a.calls, a.calls - failed, failed))
    return 0 if ok else 1


def one_call(i, alice, bob, hanger_name, a, deadline):
    """alice calls bob, held, hung up by hanger_name; returns the verdict."""
    r = dict(call=i, hangup="caller" if hanger_name == "alice" else "callee",
             established=False, bye_delivered=False, bye_answered=None, ok=False)
    t0 = time.monotonic()
    n_a, n_b = len(alice.events), len(bob.events)

    def after(ph, n):
        return lambda e, ph=ph, n=n: ph.events.index(e) >= n
    since_a, since_b = after(alice, n_a), after(bob, n_b)
    alice.command("dial", "sip:bob@%s" % DOMAIN, deadline.upto(5))
    until = deadline.upto(10)
    ea = alice.wait_event(lambda e: since_a(e) and e.get("type") in ("CALL_ESTABLISHED", "CALL_CLOSED"), until)
    cid = ea.get("id") if ea else None
    eb = None
    if ea and ea["type"] == "CALL_ESTABLISHED":
        eb = bob.wait_event(lambda e: since_b(e) and e.get("type") in ("CALL_ESTABLISHED", "CALL_CLOSED")
                            and e.get("id") == cid, until)
    r["call_id"] = cid
    if not (ea and eb and ea["type"] == "CALL_ESTABLISHED" and eb["type"] == "CALL_ESTABLISHED"):
        r["why"] = "not established (alice: %s, bob: %s)" % (
            ea and "%s %s" % (ea["type"], ea.get("param", "")), eb and eb["type"])
        report(r, alice, bob)
        cleanup(alice, bob, a, deadline)
        return r
    r["established"] = True
    r["setup_ms"] = int((time.monotonic() - t0) * 1000)
    time.sleep(a.hold)  # the call is held this long, by design
    hanger, other = (alice, bob) if hanger_name == "alice" else (bob, alice)
    n_h, n_o = len(hanger.events), len(other.events)
    hanger.command("hangup", "", deadline.upto(5))
    until = deadline.upto(a.bye_timeout)
    closed = other.wait_event(lambda e: other.events.index(e) >= n_o and e.get("type") == "CALL_CLOSED"
                              and e.get("id") == cid, until)
    r["bye_delivered"] = closed is not None
    wait_until(lambda: bye_answered(hanger, cid) or time.monotonic() >= until, until + 0.1, 0.1)
    r["bye_answered"] = bye_answered(hanger, cid)
    # A phone on TCP or TLS sends and takes its in-dialog requests on that
    # transport: baresip also listens on UDP (the same port), so a BYE sent
    # to it over UDP closes its call here, but a phone behind NAT or a
    # firewall, or one that listens on its transport only, never gets it.
    want = a.transport.upper()
    r["bye_sent_over"] = bye_transport(hanger, cid, True)
    r["bye_received_over"] = bye_transport(other, cid, False)
    transports_ok = a.any_transport or (r["bye_sent_over"] == want and r["bye_received_over"] == want)
    r["ok"] = r["bye_delivered"] and r["bye_answered"] == 200 and transports_ok
    if not r["ok"]:
        r["why"] = "BYE from %s %s%s" % (
            hanger.name, "reached %s" % other.name if r["bye_delivered"] else "never reached %s" % other.name,
            ", answered %s" % r["bye_answered"] if r["bye_answered"] else ", never answered")
        if r["bye_delivered"] and not transports_ok:
            r["why"] += "; sent by %s over %s, received by %s over %s, both on %s" % (
                hanger.name, r["bye_sent_over"], other.name, r["bye_received_over"], want)
    report(r, alice, bob)
    if not r["bye_delivered"]:
        cleanup(alice, bob, a, deadline)
    return r


def cleanup(alice, bob, a, deadline):
    """Leaves no call up on either phone before the next one."""
    for ph in (alice, bob):
        try:
            ph.command("hangup", "", deadline.upto(3))
        except Timeout:
            pass
    time.sleep(0.2)


def report(r, alice, bob):
    verdict = "ok" if r["ok"] else "FAILED"
    log("call %d: %s hangup=%s established=%s bye_delivered=%s bye_answered=%s bye_over=%s/%s "
        "call-id=%s%s" % (
        r["call"], verdict, r["hangup"], "yes" if r["established"] else "no",
        "yes" if r["bye_delivered"] else "no", r["bye_answered"] or "no",
        r.get("bye_sent_over"), r.get("bye_received_over"), r.get("call_id"),
        "" if r["ok"] else " (%s)" % r.get("why", "")))
    if not r["ok"] and r.get("call_id"):
        for ph in (alice, bob):
            for tr, src, dst, msg in messages_of(ph, r["call_id"]):
                first = msg.split("\n", 1)[0]
                if "BYE" in (header(msg, "CSeq") or "") or first.startswith("INVITE") or \
                        (first.startswith("SIP/2.0 2") and "INVITE" in (header(msg, "CSeq") or "")):
                    log("  [%s trace] %s %s -> %s\n    %s" % (
                        ph.name, tr, src, dst, summary_of(msg).replace("\n", "\n    ")))


if __name__ == "__main__":
    sys.exit(main())
