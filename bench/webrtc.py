#!/usr/bin/env python3
"""A real browser through siplb over WebSocket (issue 14): headless Chromium
loads bench/webrtc/page.html, where JsSIP (a pinned npm version) registers
through siplb over WSS (or WS) and calls a SIPp server behind siplb, which
answers with a WebRTC SDP; the browser hangs up (BYE) and the harness reads
the outcome from the page.

    python3 bench/webrtc.py --prepare                      # npm: JsSIP into the cache (needs the registry)
    unshare --net sh -c 'ip link set lo up && exec python3 bench/webrtc.py \\
        --siplb target/release/siplb --transport wss --calls 2 --screenshot /tmp/webrtc.png'

What runs (ports with --port-offset added; everything on 127.0.0.1):

  sipp s1 :5081, s2 :5082 (UDP, or TCP with --server-transport tcp)
      bench/webrtc/uas.xml: 200 to every REGISTER
      (Contact echoed), and per INVITE 180, 200 with a WebRTC answer, both
      echoing the Record-Route; then ACK, BYE, 200 (--hangup server:
      bench/webrtc/uas_bye.xml, SIPp sends the BYE along the route set)
  siplb  SIP :5060 (UDP, TCP), WS :5066, WSS :7443 (a throwaway CA and a
      certificate for 127.0.0.1 made with openssl), admin :8060;
      round-robin over s1 and s2 (no agents), REGISTER forked; sip.udp_mtu
      off, its default (the INVITE, 3-5 KB, stays on UDP: SIPp has no TCP)
  http   :8088, this script: serves page.html and /jssip.js, takes the
      page's reports (POST /event)
  chromium --headless, fake media devices and permission prompt, the test
      CA's server certificate trusted by its key only
      (--ignore-certificate-errors-spki-list: any other certificate fails
      the WSS handshake), driven over --remote-debugging-pipe for the
      screenshot

The page (JsSIP, no STUN servers, audio from the fake device) registers
alice@example.test, calls bob@example.test --calls times, holds each call
--hold seconds after the ACK and hangs up, then unregisters. In a network
namespace with only the loopback, Chromium gathers no ICE candidate and its
gathering never ends; JsSIP waits for that end before it sends an offer, so
the page ends the wait after 0.5 s (a null icecandidate event). The answer
has no candidates either: no media flows, ICE does not fail, and the call
stays up until the BYE. A call is ok when JsSIP confirmed
it, the browser sent the BYE (or, --hangup server, received and answered
it) and the BYE's answer was 200, read from the WebSocket itself, and SIPp's
message trace shows that server got the ACK and the BYE (sent the BYE and
got its 200). One line per call, then `calls=N ok=K failed=F`.

--relay instead of siplb: a 1:1 WebSocket-UDP relay in this script (one
UDP socket per WebSocket, to s1): checks the browser side alone.

Exit status: 0 every call ok; 1 a call failed or the bed did not come up;
2 usage, a missing program or no JsSIP in the cache. The run's folder (the
page's SIP trace browser-sip.txt, JsSIP's debug console.txt, events.json,
siplb.log, sipp-*.log and the SIPp message traces, chromium.log) is printed
and kept on failure or with --keep; every process is stopped by its PID;
the whole run is bounded by --timeout.
"""
import argparse
import base64
import hashlib
import http.server
import json
import os
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Deadline, Procs, Timeout, log, wait_until  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "bench", "webrtc")
JSSIP = "3.10.1"      # pinned: the npm version of JsSIP the page runs
ESBUILD = "0.20.2"    # pinned: bundles JsSIP's CommonJS build for the browser once
DOMAIN = "example.test"


def tail(path, n=30):
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no %s)" % path
    return "\n".join(lines[-n:])


def run(argv, timeout=30, cwd=None):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, timeout=timeout, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(argv), r.returncode,
                                                r.stdout.decode(errors="replace").strip()[-2000:]))
    return r.stdout


# ------------------------------------------------------------ JsSIP


def cache_dir(a):
    return a.cache or os.environ.get("SIPLB_WEBRTC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "siplb-webrtc")


def jssip_bundle(a):
    return os.path.join(cache_dir(a), "jssip-%s.js" % JSSIP)


def prepare(a):
    """jssip@JSSIP from the npm registry (npm install into the cache), bundled
    for the browser with esbuild@ESBUILD: DIR/jssip-JSSIP.js, made once."""
    out = jssip_bundle(a)
    if os.path.exists(out):
        return out
    if not shutil.which("npm"):
        raise RuntimeError("npm not found: apt-get install nodejs npm")
    d = os.path.join(cache_dir(a), "npm-%s" % JSSIP)
    os.makedirs(d, exist_ok=True)
    t = time.monotonic()
    run(["npm", "install", "--prefix", d, "--no-audit", "--no-fund", "--loglevel=error",
         "jssip@" + JSSIP, "esbuild@" + ESBUILD], timeout=300)
    entry = os.path.join(d, "node_modules", "jssip", "lib-es5", "JsSIP.js")
    with open(os.path.join(d, "node_modules", "jssip", "package.json")) as f:
        got = json.load(f)["version"]
    if got != JSSIP:
        raise RuntimeError("npm installed jssip %s, not %s" % (got, JSSIP))
    tmp = out + ".tmp"
    run([os.path.join(d, "node_modules", ".bin", "esbuild"), "--bundle", entry, "--format=iife",
         "--global-name=JsSIP", "--platform=browser", "--outfile=" + tmp], timeout=120)
    os.replace(tmp, out)
    log("JsSIP %s bundled into %s (%.1f s)" % (JSSIP, out, time.monotonic() - t))
    return out


# ------------------------------------------------------------ certificates


def make_certs(folder, ip):
    """A throwaway CA, a server certificate for `ip` signed by it, and the
    base64 SHA-256 of the server certificate's SubjectPublicKeyInfo (what
    Chromium's --ignore-certificate-errors-spki-list pins)."""
    ca_key, ca = os.path.join(folder, "ca.key"), os.path.join(folder, "ca.pem")
    key, csr, cert = (os.path.join(folder, n) for n in ("key.pem", "server.csr", "cert.pem"))
    ext = os.path.join(folder, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" % ip)
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
         "-out", ca, "-days", "2", "-subj", "/CN=siplb webrtc test CA"])
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=%s" % ip])
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", ext])
    chain = os.path.join(folder, "chain.pem")
    with open(chain, "w") as out:
        out.write(open(cert).read())
        out.write(open(ca).read())
    pub = run(["openssl", "x509", "-in", cert, "-noout", "-pubkey"])
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub,
                         stdout=subprocess.PIPE, check=True, timeout=20).stdout
    spki = base64.b64encode(hashlib.sha256(der).digest()).decode()
    return ca, chain, key, spki


# ------------------------------------------------------------ siplb


def siplb_config(work, a, ports, tls):
    key = os.path.join(work, "agent.key")
    with open(key, "w") as f:
        f.write(os.urandom(16).hex() + "\n")
    os.chmod(key, 0o600)
    text = """# written by bench/webrtc.py
[sip]
listen = ["127.0.0.1:{sip}"]
transports = ["udp", "tcp", "ws", "wss"]
ws_port = {ws}
wss_port = {wss}
ws_path = "/"
# The page's origin (Chromium sends it in the upgrade's Origin header).
ws_origins = {origins}
# sip.udp_mtu stays off (the default): the browser's INVITE (its WebRTC
# offer, 3-5 KB) goes to a UDP server over UDP; SIPp has no TCP beside it.

[sip.tls]
certificate = "{cert}"
key = "{key}"

[routing]
secret = "webrtc-bench-secret-{rand}"
policy = "round-robin"
register = "fork"
# No agents (as bench/phones.py): health "agent" with no agent configured
# routes to every server.
health = "agent"

[perf]
key_file = "agent.key"

[admin]
listen = "127.0.0.1:{admin}"
""".format(origins=json.dumps(["https://elsewhere.example" if a.wrong_origin else
                               "http://127.0.0.1:%d" % ports["http"]]),
           sip=ports["sip"], ws=ports["ws"], wss=ports["wss"], cert=tls[1], key=tls[2],
           rand=os.urandom(8).hex(), admin=ports["admin"])
    for i in range(a.servers):
        text += '\n[[servers]]\nid = "s%d"\naddress = "127.0.0.1:%d"\ntransport = "%s"\n' % (
            i + 1, ports["s1"] + i, a.server_transport)
    path = os.path.join(work, "siplb.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def admin_get(port, path):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=1) as r:
        return r.read().decode()


def tcp_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
        return True
    except OSError:
        return False


# ------------------------------------------------------------ --relay


class Relay:
    """A WebSocket server (RFC 6455; the `sip` subprotocol, RFC 7118) that
    relays each text or binary message to `target` over a UDP socket of the
    connection's own, and each datagram back as a text message. No SIP
    processing at all: SIPp answers to the datagram's source. For checking
    the browser side without siplb."""

    def __init__(self, port, target, tls_ctx, logf):
        self.target, self.tls_ctx, self.logf = target, tls_ctx, logf
        self.srv = socket.create_server(("127.0.0.1", port))
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _log(self, s):
        self.logf.write(s + "\n")
        self.logf.flush()

    def _accept(self):
        self.srv.settimeout(0.5)
        while not self.stop:
            try:
                c, _ = self.srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            c.settimeout(10)
            if self.tls_ctx:
                c = self.tls_ctx.wrap_socket(c, server_side=True)
            req = b""
            while b"\r\n\r\n" not in req:
                chunk = c.recv(4096)
                if not chunk:
                    return
                req += chunk
            head = req.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
            hdrs = {}
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
            self._log("upgrade: " + head.split("\r\n", 1)[0] + " protocol=" +
                      hdrs.get("sec-websocket-protocol", ""))
            if "sip" not in [p.strip() for p in hdrs.get("sec-websocket-protocol", "").split(",")]:
                c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            accept = base64.b64encode(hashlib.sha1(
                (hdrs["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
            c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: sip\r\n\r\n")
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(("127.0.0.1", 0))
            u.connect(self.target)
            c.settimeout(None)
            buf = b""
            lock = threading.Lock()

            def down():
                while True:
                    try:
                        d = u.recv(65536)
                    except OSError:
                        return
                    n = len(d)
                    hdr = bytes([0x81]) + (bytes([n]) if n < 126 else
                                           bytes([126]) + struct.pack(">H", n))
                    with lock:
                        try:
                            c.sendall(hdr + d)
                        except OSError:
                            return
            threading.Thread(target=down, daemon=True).start()
            while True:
                while True:
                    frame = self._frame(buf)
                    if frame is None:
                        break
                    op, payload, buf = frame
                    if op in (1, 2):
                        u.send(payload)
                    elif op == 8:
                        with lock:
                            c.sendall(b"\x88\x00")
                        return
                    elif op == 9:
                        with lock:
                            c.sendall(bytes([0x8A, len(payload)]) + payload)
                chunk = c.recv(65536)
                if not chunk:
                    return
                buf += chunk
        except (OSError, ssl.SSLError, KeyError) as e:
            self._log("connection: %r" % e)
        finally:
            try:
                c.close()
            except OSError:
                pass

    @staticmethod
    def _frame(buf):
        if len(buf) < 2:
            return None
        op, n, i = buf[0] & 0x0F, buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, i = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, i = struct.unpack(">Q", buf[2:10])[0], 10
        masked = buf[1] & 0x80
        mask = buf[i:i + 4] if masked else b"\0\0\0\0"
        i += 4 if masked else 0
        if len(buf) < i + n:
            return None
        payload = bytes(b ^ mask[k % 4] for k, b in enumerate(buf[i:i + n]))
        return op, payload, buf[i + n:]

    def close(self):
        self.stop = True
        self.srv.close()


# ------------------------------------------------------------ the page's server


class Reports:
    def __init__(self, work):
        self.cv = threading.Condition()
        self.events = []
        self.done = None
        self.sip = open(os.path.join(work, "browser-sip.txt"), "w")
        self.console = open(os.path.join(work, "console.txt"), "w")

    def add(self, batch):
        with self.cv:
            for e in batch:
                kind, data = e.get("kind"), e.get("data")
                if kind == "sip":
                    self.sip.write("----- %7d ms  browser %s siplb\n%s\n" % (
                        e["t"], "->" if data["dir"] == "out" else "<-", data["text"].rstrip("\r\n")))
                    self.sip.flush()
                    self.events.append({"t": e["t"], "kind": "sip", "dir": data["dir"],
                                        "first": data["first"], "cseq": data["cseq"],
                                        "call_id": data["call_id"]})
                elif kind == "console":
                    self.console.write("%7d %s %s\n" % (e["t"], data["level"], data["text"]))
                    self.console.flush()
                else:
                    self.events.append(e)
                    if kind == "done":
                        self.done = data
            self.cv.notify_all()


def http_server(port, page, bundle, reports):
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path = urllib.parse.urlparse(self.path).path
            if path in ("/", "/page.html"):
                body, ctype = open(page, "rb").read(), "text/html; charset=utf-8"
            elif path == "/jssip.js":
                body, ctype = open(bundle, "rb").read(), "application/javascript"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            try:
                batch = json.loads(self.rfile.read(n))
                reports.add(batch if isinstance(batch, list) else [batch])
            except ValueError:
                pass
            self.send_response(204)
            self.end_headers()

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


# ------------------------------------------------------------ chromium


def chromium_binary(a):
    for c in ([a.chromium] if a.chromium else []) + ["chromium", "chromium-browser", "google-chrome"]:
        p = shutil.which(c)
        if p:
            return p
    return None


class Browser:
    """Chromium headless, driven over --remote-debugging-pipe (the DevTools
    protocol on fds 3 and 4, NUL-terminated JSON) for the screenshot and a
    clean close."""

    def __init__(self, procs, binary, work, url, spki, logpath, size=(1000, 760)):
        self.to_r, self.to_w = os.pipe()      # we write, chromium reads on fd 3
        self.from_r, self.from_w = os.pipe()  # chromium writes on fd 4, we read
        to_r, from_w = self.to_r, self.from_w

        def fds():
            # Through fresh fds first: one of ours may already be 3 or 4
            # (dup2 onto itself would keep it close-on-exec).
            r, w = os.dup(to_r), os.dup(from_w)
            os.dup2(r, 3)
            os.dup2(w, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)
        argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--user-data-dir=" + os.path.join(work, "chromium-profile"),
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-proxy-server", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                "--ignore-certificate-errors-spki-list=" + spki,
                "--enable-logging=stderr", "--v=0", "--window-size=%d,%d" % size,
                "--remote-debugging-pipe", url]
        # close_fds=False: the dup2'd fds 3 and 4 must survive; every other
        # fd of ours is close-on-exec (PEP 446).
        self.proc = procs.start("chromium", argv, logpath, preexec_fn=fds, close_fds=False)
        os.close(to_r)
        os.close(from_w)
        self.buf = b""
        self.next_id = 0

    def call(self, method, params=None, session=None, until=None):
        self.next_id += 1
        mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_w, json.dumps(msg).encode() + b"\0")
        end = until or time.monotonic() + 10
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                m = json.loads(raw)
                if m.get("id") == mid:
                    if "error" in m:
                        raise RuntimeError("%s: %s" % (method, m["error"]))
                    return m.get("result", {})
            left = end - time.monotonic()
            if left <= 0:
                raise Timeout("DevTools %s" % method)
            r, _, _ = select.select([self.from_r], [], [], left)
            if r:
                chunk = os.read(self.from_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk

    def screenshot(self, path, until):
        targets = self.call("Target.getTargets", until=until)["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        sess = self.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True},
                         until=until)["sessionId"]
        png = self.call("Page.captureScreenshot", {"format": "png"}, session=sess, until=until)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(png))

    def close(self):
        try:
            self.call("Browser.close", until=time.monotonic() + 3)
        except (Timeout, RuntimeError, OSError, ValueError):
            pass
        for fd in (self.to_w, self.from_r):
            try:
                os.close(fd)
            except OSError:
                pass


# ------------------------------------------------------------ SIPp's side


def sipp_messages(path):
    """(direction, text) per message in a SIPp -trace_msg file."""
    try:
        raw = open(path, errors="replace").read()
    except OSError:
        return []
    out = []
    for block in raw.split("----------------------------------------------- ")[1:]:
        lines = block.split("\n")
        hdr = " ".join(lines[:2])
        d = "in" if "message received" in hdr else "out" if "message sent" in hdr else None
        if d:
            out.append((d, "\n".join(lines[2:]).strip()))
    return out


def sip_header(text, name, short=None):
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k.strip().lower() in (name.lower(), (short or name).lower()):
            return v.strip()
    return None


def sipp_view(traces, call_id):
    """What the SIPp servers saw of one call: which server, the ACK, the
    BYE and its answer."""
    seen = {"server": None, "invite": False, "ack": False, "bye_in": False, "bye_200_out": False,
            "bye_out": False, "bye_200_in": False}
    for sid, msgs in traces.items():
        for d, text in msgs:
            if sip_header(text, "Call-ID", "i") != call_id:
                continue
            first = text.split("\n", 1)[0].strip()
            cseq = sip_header(text, "CSeq") or ""
            seen["server"] = sid
            if d == "in" and first.startswith("INVITE "):
                seen["invite"] = True
            if d == "in" and first.startswith("ACK "):
                seen["ack"] = True
            if first.startswith("BYE "):
                seen["bye_in" if d == "in" else "bye_out"] = True
            if first.startswith("SIP/2.0 200") and cseq.endswith("BYE"):
                seen["bye_200_out" if d == "out" else "bye_200_in"] = True
    return seen


# ------------------------------------------------------------ the run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    ap.add_argument("--relay", action="store_true",
                    help="a WebSocket-UDP relay in this script instead of siplb (the browser side alone)")
    ap.add_argument("--transport", choices=["ws", "wss"], default="wss")
    ap.add_argument("--calls", type=int, default=1)
    ap.add_argument("--hold", type=float, default=1.0, help="seconds a call is held")
    ap.add_argument("--hangup", choices=["browser", "server"], default="browser")
    ap.add_argument("--servers", type=int, default=2, choices=[1, 2])
    ap.add_argument("--server-transport", choices=["udp", "tcp"], default="udp",
                    help="siplb to the SIPp servers")
    ap.add_argument("--timeout", type=float, default=60, help="bound on the whole run (s)")
    ap.add_argument("--screenshot", help="a PNG of the page at the end of the run")
    ap.add_argument("--wrong-pin", action="store_true",
                    help="give Chromium another key's SPKI hash: registration must fail "
                         "(exit 0 when it does; checks the pin is what makes WSS work)")
    ap.add_argument("--wrong-origin", action="store_true",
                    help="sip.ws_origins without the page's origin: registration must fail "
                         "(exit 0 when it does)")
    ap.add_argument("--chromium", help="the browser binary (default: chromium on PATH)")
    ap.add_argument("--cache", help="where JsSIP is installed (default ~/.cache/siplb-webrtc, "
                                    "or $SIPLB_WEBRTC_CACHE)")
    ap.add_argument("--prepare", action="store_true",
                    help="only install JsSIP into the cache (npm; needs the registry), then exit")
    ap.add_argument("--port-offset", type=int, default=0)
    ap.add_argument("--debug", action="store_true", help="SIPLB_LOG=debug for siplb")
    ap.add_argument("--keep", action="store_true", help="keep the run's folder")
    a = ap.parse_args()
    if a.calls < 1:
        ap.error("--calls must be at least 1")

    try:
        if a.prepare:
            log("JsSIP bundle: %s" % prepare(a))
            return 0
        bundle = jssip_bundle(a)
        if not os.path.exists(bundle):
            try:
                bundle = prepare(a)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                log("no JsSIP %s in %s and npm could not fetch it (%s); run "
                    "`python3 bench/webrtc.py --prepare` where the npm registry is reachable"
                    % (JSSIP, cache_dir(a), e))
                return 2
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        log("prepare: %s" % e)
        return 2
    browser_bin = chromium_binary(a)
    missing = [p for p, ok in (("chromium", browser_bin), ("sipp", shutil.which("sipp")),
                               ("openssl", shutil.which("openssl"))) if not ok]
    if missing:
        log("missing: %s (apt-get install chromium sip-tester openssl)" % " ".join(missing))
        return 2
    if not a.relay and not os.access(a.siplb, os.X_OK):
        log("siplb binary not found: %s (cargo build --release, or --siplb PATH)" % a.siplb)
        return 2

    off = a.port_offset
    ports = dict(sip=5060 + off, ws=5066 + off, wss=7443 + off, admin=8060 + off,
                 s1=5081 + off, http=8088 + off)
    deadline = Deadline(a.timeout)
    work = tempfile.mkdtemp(prefix="siplb-webrtc-")
    procs = Procs()
    browser = relay = srv = reports = None
    ok = False

    def on_alarm(*_):
        raise Timeout("the whole run (--timeout %g s)" % a.timeout)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_alarm)
    signal.alarm(int(a.timeout) + 15)
    started = time.monotonic()
    try:
        log("work folder %s; %s; transport %s; JsSIP %s; %s" % (
            work, "relay (no siplb)" if a.relay else "siplb " + a.siplb, a.transport, JSSIP,
            run([browser_bin, "--version"]).decode(errors="replace").strip().splitlines()[-1]))
        tls = make_certs(work, "127.0.0.1")
        spki = tls[3]
        if a.wrong_pin:
            spki = base64.b64encode(hashlib.sha256(os.urandom(32)).digest()).decode()

        # --- SIPp servers
        scenario = os.path.join(HERE, "uas_bye.xml" if a.hangup == "server" else "uas.xml")
        sipps = {}
        for i in range(a.servers):
            sid, port = "s%d" % (i + 1), ports["s1"] + i
            msgf = os.path.join(work, "sipp-%s-messages.log" % sid)
            p = procs.start("sipp-" + sid, [
                "sipp", "-sf", scenario, "-i", "127.0.0.1", "-p", str(port),
                "-t", "t1" if a.server_transport == "tcp" else "u1", "-nostdin",
                "-trace_msg", "-message_file", msgf, "-trace_err", "-error_file",
                os.path.join(work, "sipp-%s-errors.log" % sid),
                "-d", str(int(a.hold * 1000)),
                # The un-REGISTER at the end reuses the REGISTER's Call-ID:
                # SIPp would take it for a message of a dead call for 33 s.
                "-deadcall_wait", "200",
                "-timeout", "%ds" % int(a.timeout + 10)], os.path.join(work, "sipp-%s.log" % sid))
            sipps[sid] = (p, port, msgf)
        for sid, (p, port, _) in sipps.items():
            def up(p=p, sid=sid):
                if p.poll() is not None:
                    raise RuntimeError("sipp %s exited (%s):\n%s" % (
                        sid, p.returncode, tail(os.path.join(work, "sipp-%s.log" % sid))))
                return True
            wait_until(up, deadline.upto(1), 0.1)
        time.sleep(0.3)
        for sid, (p, _, _) in sipps.items():
            if p.poll() is not None:
                raise RuntimeError("sipp %s exited (%s):\n%s" % (
                    sid, p.returncode, tail(os.path.join(work, "sipp-%s.log" % sid))))

        # --- siplb, or the relay
        port = ports["wss" if a.transport == "wss" else "ws"]
        if a.relay:
            ctx = None
            if a.transport == "wss":
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(tls[1], tls[2])
            relay = Relay(port, ("127.0.0.1", ports["s1"]), ctx, open(os.path.join(work, "relay.log"), "w"))
        else:
            conf = siplb_config(work, a, ports, tls)
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
                return len(servers) == a.servers and tcp_open(port)
            wait_until(lb_up, deadline.upto(10), 0.1, "siplb's admin API and its %s port" % a.transport)

        # --- the page
        reports = Reports(work)
        srv = http_server(ports["http"], os.path.join(HERE, "page.html"), bundle, reports)
        ws_url = "%s://127.0.0.1:%d/" % (a.transport, port)
        url = "http://127.0.0.1:%d/page.html?%s" % (ports["http"], urllib.parse.urlencode(dict(
            ws=ws_url, uri="sip:alice@%s" % DOMAIN, target="sip:bob@%s" % DOMAIN, calls=a.calls,
            hold=int(a.hold * 1000), hangup=a.hangup, edge="relay" if a.relay else "siplb")))
        log("page %s" % url)
        t_browser = time.monotonic()
        browser = Browser(procs, browser_bin, work, url, spki, os.path.join(work, "chromium.log"))
        with reports.cv:
            while reports.done is None:
                if browser.proc.poll() is not None:
                    raise RuntimeError("chromium exited (%s):\n%s" % (
                        browser.proc.returncode, tail(os.path.join(work, "chromium.log"))))
                left = deadline.left() - 8
                if left <= 0:
                    raise Timeout("the page's report (registered, calls, done)")
                reports.cv.wait(min(left, 0.5))
        done = reports.done
        log("page done in %.1f s after chromium started" % (time.monotonic() - t_browser))
        if a.screenshot:
            try:
                browser.screenshot(a.screenshot, deadline.upto(10))
                log("screenshot %s" % a.screenshot)
            except (Timeout, RuntimeError, OSError, StopIteration, KeyError) as e:
                log("screenshot failed: %s" % e)

        for e in reports.events:
            if e.get("kind") == "event" and "n" not in e["data"]:
                log("  page: %s" % json.dumps(e["data"]))
        if a.wrong_pin or a.wrong_origin:
            ok = not done.get("registered")
            log("wrong %s: registration %s (%s)" % (
                "pin" if a.wrong_pin else "origin",
                "failed as it must" if ok else "SUCCEEDED: that check does not work",
                done.get("error")))
            return 0 if ok else 1

        # --- SIPp's side of each call (its traces are written as it goes)
        time.sleep(0.3)
        traces = {sid: sipp_messages(m) for sid, (_, _, m) in sipps.items()}
        calls = done.get("calls") or []
        good = 0
        for c in calls:
            view = sipp_view(traces, c.get("call_id"))
            server_ok = view["invite"] and view["ack"] and (
                view["bye_in"] and view["bye_200_out"] if a.hangup == "browser"
                else view["bye_out"] and view["bye_200_in"])
            page_ok = bool(c.get("ok"))
            cok = page_ok and server_ok
            good += cok
            log("call %d: %s registered=yes confirmed=%s bye_from=%s bye_answer=%s ended=%s "
                "server=%s server_saw=invite:%s,ack:%s,bye:%s,200:%s call-id=%s%s" % (
                    c["n"], "ok" if cok else "FAILED", "yes" if c.get("confirmed") else "no",
                    c.get("bye_from"),
                    c.get("bye_status") if a.hangup == "browser" else c.get("bye_answered_by_browser"),
                    json.dumps(c.get("ended") or c.get("failed")), view["server"],
                    *("yes" if view[k] else "no" for k in (
                        "invite", "ack", "bye_in" if a.hangup == "browser" else "bye_out",
                        "bye_200_out" if a.hangup == "browser" else "bye_200_in")),
                    c.get("call_id"), "" if c.get("failed") is None else " (failed: %s)" % c["failed"]))
        if not done.get("registered"):
            log("not registered: %s" % done.get("error"))
        failed = a.calls - good
        log("calls=%d ok=%d failed=%d" % (a.calls, good, failed))
        ok = failed == 0 and done.get("registered") and len(calls) == a.calls
        return 0 if ok else 1
    except (Timeout, RuntimeError, OSError) as e:
        log("FAILED: %s" % e)
        return 1
    finally:
        signal.alarm(0)
        if reports:
            with open(os.path.join(work, "events.json"), "w") as f:
                json.dump(reports.events, f, indent=1)
            if not ok:
                for e in reports.events:
                    if e.get("kind") in ("event", "ws", "error", "call", "done"):
                        log("  page %6d ms %s %s" % (e["t"], e["kind"], json.dumps(e["data"])))
        if browser:
            browser.close()
        procs.stop_all()
        if srv:
            srv.shutdown()
        if relay:
            relay.close()
        log("run took %.1f s" % (time.monotonic() - started))
        if ok and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log("kept %s (browser-sip.txt: the page's SIP trace; console.txt: JsSIP's debug; "
                "siplb.log; sipp-*-messages.log; chromium.log)" % work)
            if not ok:
                for name in ("siplb.log", "chromium.log", "relay.log"):
                    p = os.path.join(work, name)
                    if os.path.exists(p):
                        log("--- %s (tail)\n%s" % (name, tail(p, 25)))


if __name__ == "__main__":
    sys.exit(main())
