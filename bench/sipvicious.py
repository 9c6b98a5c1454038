#!/usr/bin/env python3
"""Scanners against siplb under load, on loopback only: sipvicious (svmap,
svwar, svcrack; Debian package `sipvicious`) attacks the balancer while SIPp
places calls through it.

Starts, all on loopback and on free ports:
  - two SIP servers: this script with `--serve`, a small Python UDP responder
    (INVITE -> 180 + 200, ACK -> nothing, BYE -> 200, OPTIONS -> 200, CANCEL ->
    200, REGISTER -> 401 with a Digest challenge for extensions 100-199 and 404
    for any other, so that svwar's REGISTER scan has something to tell apart;
    200 when the digest is right for user 100 and the password written into
    svcrack's dictionary), each counting what it receives by method and by
    origin (the `received` of the bottom Via: where the balancer saw the
    request come from);
  - `siplb balancer` with a generated config: those two servers without
    agents, `policy = "round-robin"`, `[limits] allow = []` (loopback is
    limited too), every limit at its default, admin on a free port;
then, for SECONDS at the same time:
  - SIPp's built-in uac from 127.0.0.2: `sipp -sn uac 127.0.0.1:PORT -i 127.0.0.2
    -r RATE -m RATE*SECONDS`;
  - svmap from 127.0.0.3: OPTIONS to 127.0.0.1:PORT, the target listed once per
    line of an input file (a scan of one host, repeated);
  - svwar (-b 127.0.0.4): extensions 100-999, by REGISTER, INVITE, OPTIONS in
    turn, restarted until the time is up;
  - svcrack (-b 127.0.0.5): user 100, a generated dictionary (the right password
    at line PASSWORD_AT), restarted on the lines it has not tried yet when it
    stops before the time is up (it stops at the first response it does not
    expect, a 503 among them).
sipvicious 0.3.3's svwar and svcrack do not pass -b on to their socket: both
send from 127.0.0.1 and share its buckets (the report says where each tool's
requests came from). Each sv* tool runs as installed, under a wrapper that counts what it sends
(its own `mysendto`, by method) and writes the counts when it ends. Its `-t`
(select timeout, sipvicious's throttle; default 0.005 s) is --select-time.

Reports SIPp's successful/failed calls, what each server received by method
and origin, the balancer's /metrics (`siplb_drops_total{reason="rate_limited"}`,
`siplb_local_responses_total{code="503"}`, requests by method), its CPU
(utime+stime) and RSS before and after, and what each sv* tool sent. Checks
(PASS/FAIL, exit 1 on a FAIL): no failed SIPp call; per origin, each server
received at most register_burst + register_rate x T REGISTERs, new_session_burst
+ new_session_rate x T INVITEs and request_burst + request_rate x T OPTIONS
(T: from the attack's start to its end). Every loop is bounded in count and
time; every process is started here and stopped by its PID.

    python3 bench/sipvicious.py --seconds 20
"""
import argparse, hashlib, json, os, random, re, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import sipp_totals, stop_all  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")
# [limits] defaults (docs/configuration.md): rate per second, burst.
LIMITS = {"REGISTER": (200, 1000), "INVITE": (500, 1000), "OPTIONS": (1000, 2000)}
REALM, USER = "siplb-bench", "100"
EXTENSIONS = (100, 199)  # the extensions that exist: REGISTER for any other gets 404
SOURCES = {"sipp": "127.0.0.2", "svmap": "127.0.0.3", "svwar": "127.0.0.4", "svcrack": "127.0.0.5"}


# ---------------------------------------------------------------- the servers

COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length"}


def parse(data):
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    lines = head.split("\r\n")
    headers = []
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            k = k.strip().lower()
            headers.append((COMPACT.get(k, k), v.strip()))
    return lines[0], headers


def first(headers, name):
    for k, v in headers:
        if k == name:
            return v
    return ""


def origin_of(headers):
    """The address the balancer received the request from: its `received`
    on the bottom Via (the UA's), else that Via's host."""
    vias = [part.strip() for k, v in headers if k == "via" for part in v.split(",")]
    if not vias:
        return "?"
    bottom = vias[-1]
    m = re.search(r";\s*received=([^;\s,]+)", bottom)
    if m:
        return m.group(1)
    m = re.match(r"SIP/2\.0/\w+\s+\[?([^\]:;\s]+)", bottom)
    return m.group(1) if m else "?"


def digest_ok(auth, method, password):
    p = dict((k.lower(), v1 if v1 else v2) for k, v1, v2 in re.findall(r'(\w+)\s*=\s*(?:"([^"]*)"|([^,\s]+))', auth))
    if p.get("username") != USER or "nonce" not in p or "response" not in p:
        return False
    h = lambda s: hashlib.md5(s.encode()).hexdigest()  # noqa: E731
    ha1 = h(f"{USER}:{p.get('realm', '')}:{password}")
    ha2 = h(f"{method}:{p.get('uri', '')}")
    if p.get("qop") == "auth" and "cnonce" in p and "nc" in p:
        want = h(f"{ha1}:{p['nonce']}:{p['nc']}:{p['cnonce']}:auth:{ha2}")
    else:
        want = h(f"{ha1}:{p['nonce']}:{ha2}")
    return want == p["response"]


def respond(sock, peer, headers, code, reason, tag, extra=(), rr=False, body=""):
    out = [f"SIP/2.0 {code} {reason}"]
    out += [f"Via: {v}" for k, v in headers if k == "via"]
    if rr:
        out += [f"Record-Route: {v}" for k, v in headers if k == "record-route"]
    out.append(f"From: {first(headers, 'from')}")
    to = first(headers, "to")
    if tag and not re.search(r";\s*tag=", to):
        to += f";tag={tag}"
    out.append(f"To: {to}")
    out.append(f"Call-ID: {first(headers, 'call-id')}")
    out.append(f"CSeq: {first(headers, 'cseq')}")
    out += list(extra)
    if body:
        out.append("Content-Type: application/sdp")
    out.append(f"Content-Length: {len(body)}")
    sock.sendto(("\r\n".join(out) + "\r\n\r\n" + body).encode(), peer)


def serve(listen, out, lifetime, password):
    """A SIP server that counts what it receives; until SIGTERM or lifetime s."""
    host, port = listen.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, int(port)))
    sock.settimeout(0.2)
    contact = f"Contact: <sip:server@{host}:{port}>"
    sdp = f"v=0\r\no=- 1 1 IN IP4 {host}\r\ns=-\r\nc=IN IP4 {host}\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\n"
    counts, tags, stop = {}, {}, []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))

    def dump():
        with open(out + ".tmp", "w") as f:
            json.dump(counts, f)
        os.replace(out + ".tmp", out)

    deadline, next_dump = time.time() + lifetime, 0.0
    while not stop and time.time() < deadline:
        if time.time() >= next_dump:
            dump()
            next_dump = time.time() + 1
        try:
            data, peer = sock.recvfrom(65535)
        except (socket.timeout, InterruptedError):
            continue
        try:
            line, headers = parse(data)
        except Exception:  # noqa: BLE001 -- count it, answer nothing
            line, headers = "?", []
        if line.startswith("SIP/2.0"):
            method = "(response)"
        else:
            method = line.split(" ", 1)[0] or "?"
        src = origin_of(headers)
        by = counts.setdefault(method, {})
        by[src] = by.get(src, 0) + 1
        if not headers or method == "(response)":
            continue
        key = (first(headers, "call-id"), first(headers, "cseq"))
        if len(tags) > 200000:
            tags.clear()
        tag = tags.setdefault(key, "%08x" % random.getrandbits(32))
        if method == "INVITE":
            respond(sock, peer, headers, 180, "Ringing", tag, rr=True)
            respond(sock, peer, headers, 200, "OK", tag, [contact], rr=True, body=sdp)
        elif method in ("BYE", "OPTIONS", "CANCEL"):
            respond(sock, peer, headers, 200, "OK", tag)
        elif method == "REGISTER":
            auth = first(headers, "authorization")
            user = re.search(r"<?sips?:([^@;>]+)@", first(headers, "to"))
            if not (user and user.group(1).isdigit() and EXTENSIONS[0] <= int(user.group(1)) <= EXTENSIONS[1]):
                respond(sock, peer, headers, 404, "Not Found", tag)
            elif auth and digest_ok(auth, "REGISTER", password):
                respond(sock, peer, headers, 200, "OK", tag, [f"Contact: {first(headers, 'contact')};expires=60"])
            else:
                nonce = "%016x" % random.getrandbits(64)
                respond(sock, peer, headers, 401, "Unauthorized", tag,
                        [f'WWW-Authenticate: Digest realm="{REALM}", nonce="{nonce}", algorithm=MD5'])
        elif method != "ACK":
            respond(sock, peer, headers, 200, "OK", tag)
    dump()


# ------------------------------------------------------------ the sv* wrapper

# Runs an installed sipvicious tool's main() (the module its /usr/bin script
# loads) with its send function wrapped to count datagrams by method; the
# counts are written to OUT when the tool ends (SIGINT: the tool's own
# "caught your control^c" path; SIGTERM: at once).
WRAPPER = r"""
import atexit, collections, importlib, json, os, signal, sys
pkgdir, name, out = sys.argv[1:4]
sys.path.insert(0, pkgdir)
mod = importlib.import_module("sipvicious." + name)
sent = collections.Counter()
real = mod.mysendto
def counting(sock, data, dst):
    method = data.split(" ", 1)[0]
    sent[method + (" (with credentials)" if "\r\nAuthorization:" in data else "")] += 1
    return real(sock, data, dst)
mod.mysendto = counting
def dump(*_):
    with open(out + ".tmp", "w") as f:
        json.dump(sent, f)
    os.replace(out + ".tmp", out)
atexit.register(dump)
def term(*_):
    dump()
    sys.stdout.flush()
    os._exit(0)
signal.signal(signal.SIGTERM, term)
sys.argv = [name] + sys.argv[4:]
sys.exit(mod.main())
"""


def sv_locate(name):
    """(interpreter, package folder) of an installed sv* tool, or an error string."""
    path = shutil.which(name) or shutil.which("sipvicious_" + name)
    if not path:
        return None, f"{name} not found on PATH (apt-get install -y sipvicious)"
    real = os.path.realpath(path)
    with open(real, "rb") as f:
        shebang = f.readline().decode(errors="replace").strip()
    interp = shebang[2:].split()[0] if shebang.startswith("#!") else sys.executable
    pkgdir = os.path.dirname(real)
    probe = subprocess.run([interp, "-c", f"import sys; sys.path.insert(0, {pkgdir!r}); import sipvicious.{name}"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return None, f"{name}: import failed: {probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.returncode}"
    return (interp, pkgdir), None


class Tool:
    """One sv* tool, restarted (at most max_runs times) until the deadline."""

    def __init__(self, name, loc, work, env, argv_for_run, max_runs):
        self.name, self.loc, self.work, self.env = name, loc, work, env
        self.argv_for_run, self.max_runs = argv_for_run, max_runs
        self.runs, self.proc, self.sent, self.ends, self.last_argv = 0, None, {}, [], ""
        self.done = False

    def _collect(self):
        p = self.proc
        out = os.path.join(self.work, f"{self.name}.{self.runs}.sent.json")
        try:
            with open(out) as f:
                for k, v in json.load(f).items():
                    self.sent[k] = self.sent.get(k, 0) + v
        except (OSError, ValueError):
            pass
        log = os.path.join(self.work, f"{self.name}.{self.runs}.log")
        last = cracked = found = ""
        try:
            with open(log, errors="replace") as f:
                lines = [l.strip() for l in f if l.strip()]
            notable = [l for l in lines if l.startswith(("WARNING", "ERROR", "CRITICAL"))
                       or "Traceback" in l or "Error" in l]
            last = notable[-1] if notable else (lines[-1] if lines else "")
            cracked = next((l for l in lines if "The password for" in l), "")
            found = next((l.split(":", 2)[-1] for l in lines if re.search(r"we have \d+ (extensions|devices|cracked)", l)), "")
            # What the "unknown response" that stopped it was (svcrack logs it at -vv).
            for i, l in enumerate(lines):
                if "unknown response" in l:
                    m = re.search(r"SIP/2\.0 \d{3}[^\\']*", " ".join(lines[i + 1:i + 3]))
                    if m:
                        last = f"{l} ({m.group(0).strip()})"
                    break
        except OSError:
            pass
        self.ends.append({"run": self.runs, "argv": self.last_argv, "exit": p.returncode,
                          "found": found, "last": last[:200], "cracked": cracked})
        self.proc = None

    def step(self, deadline):
        """Start the next run when the previous one ended; never past the deadline."""
        if self.proc is not None and self.proc.poll() is not None:
            self._collect()
        if self.proc is None and not self.done:
            argv = self.argv_for_run(self.runs)
            if argv is None or self.runs >= self.max_runs or time.time() >= deadline - 0.5:
                self.done = True
                return
            self.runs += 1
            self.last_argv = " ".join(argv)
            interp, pkgdir = self.loc
            out = os.path.join(self.work, f"{self.name}.{self.runs}.sent.json")
            log = open(os.path.join(self.work, f"{self.name}.{self.runs}.log"), "w")
            self.proc = subprocess.Popen([interp, "-c", WRAPPER, pkgdir, self.name, out] + argv, cwd=self.work,
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()

    def stop(self):
        """SIGINT by PID (the tool prints its results), then SIGTERM/SIGKILL."""
        self.done = True
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                stop_all([p])
        self._collect()


# ------------------------------------------------------------------- helpers

def free_port(host, kind=socket.SOCK_DGRAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def proc_stat(pid):
    """(cpu ms utime+stime, RSS kB) of pid."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK, rss


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.read().decode()
    except OSError:
        return None


def metrics(admin):
    """/metrics as {'name{labels}': value}."""
    text = http_get(f"http://{admin}/metrics") or ""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def write_config(path, sip, admin, servers):
    key = os.path.join(ROOT, "examples/agent.key")
    text = f"""# generated by bench/sipvicious.py
[sip]
listen = ["{sip}"]
transports = ["udp"]

[routing]
secret = "sipvicious-bench-secret-{random.getrandbits(64):016x}"
policy = "round-robin"

[perf]
key_file = "{key}"

[limits]
allow = []

[admin]
listen = "{admin}"
"""
    for i, s in enumerate(servers, 1):
        text += f'\n[[servers]]\nid = "s{i}"\naddress = "{s}"\n'
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rate", type=int, default=50, help="SIPp calls per second")
    ap.add_argument("--select-time", default="0.005", help="sipvicious -t (select timeout, its throttle); its default is 0.005")
    ap.add_argument("--password-at", type=int, default=3000, help="line of svcrack's dictionary holding the right password")
    ap.add_argument("--dictionary", type=int, default=20000, help="lines in svcrack's dictionary")
    ap.add_argument("--settle", type=float, default=35, help="s to wait after the run before reading RSS again (0: do not)")
    ap.add_argument("--siplb", help="the siplb binary (default: target/release/siplb, built if missing)")
    ap.add_argument("--json", action="store_true", help="print the whole result as JSON at the end")
    a = ap.parse_args()
    siplb = a.siplb or os.path.join(ROOT, "target/release/siplb")
    if not os.access(siplb, os.X_OK):
        subprocess.run(["cargo", "build", "-q", "--release", "-p", "siplb"], cwd=ROOT, check=True)
    if not shutil.which("sipp"):
        sys.exit("sipp not found: apt-get install sip-tester")
    work = tempfile.mkdtemp(prefix="siplb-sipvicious-")
    home = os.path.join(work, "home")  # sipvicious keeps its state in $HOME/.sipvicious
    os.makedirs(home)
    env = dict(os.environ, HOME=home)
    log = open(os.path.join(work, "processes.log"), "w")
    N = a.seconds

    locs, sv_errors = {}, {}
    for name in ("svmap", "svwar", "svcrack"):
        locs[name], err = sv_locate(name)
        if err:
            sv_errors[name] = err

    password = "%04d" % random.randrange(1000, 10000)
    dict_path = os.path.join(work, "passwords.txt")
    with open(dict_path, "w") as f:
        common = ["123456", "password", "1234", "12345", "admin", "secret", "voip", "sip", "100", "1000"]
        for i in range(1, a.dictionary + 1):
            f.write((password if i == a.password_at else (common[i - 1] if i <= len(common) else f"pw{i:06d}")) + "\n")
    targets = os.path.join(work, "targets.txt")
    with open(targets, "w") as f:
        f.write("127.0.0.1\n" * (2000 * N))  # bounded: svmap sends at most one datagram per line

    sip_port = free_port("127.0.0.1")
    sip = f"127.0.0.1:{sip_port}"
    admin = f"127.0.0.1:{free_port('127.0.0.1', socket.SOCK_STREAM)}"
    srv = [f"127.0.0.1:{free_port('127.0.0.1')}" for _ in range(2)]
    cfg = os.path.join(work, "siplb.toml")
    write_config(cfg, sip, admin, srv)
    count_files = [os.path.join(work, f"s{i}.counts.json") for i in (1, 2)]
    lifetime = N * 3 + 120

    procs, tools = [], {}
    result = {"command": " ".join(["python3", "bench/sipvicious.py"] + sys.argv[1:]), "seconds": N, "rate": a.rate,
              "select_time": a.select_time, "work": work, "sv_errors": sv_errors}
    checks = []
    try:
        for addr, out in zip(srv, count_files):
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", addr, "--out", out,
                                           "--lifetime", str(lifetime), "--password", password],
                                          stdout=log, stderr=log, stdin=subprocess.DEVNULL))
        lb = subprocess.Popen([siplb, "balancer", "--config", cfg], cwd=work, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        procs.append(lb)
        end = time.time() + 10
        view = None
        while time.time() < end and lb.poll() is None and view is None:
            v = http_get(f"http://{admin}/servers")
            view = json.loads(v) if v else None
            time.sleep(0.1)
        if view is None:
            sys.exit(f"the balancer did not come up (exit {lb.poll()}); see {work}/processes.log")
        time.sleep(0.5)
        # Servers without agents: what GET /servers says of them (round-robin routes to them).
        view = json.loads(http_get(f"http://{admin}/servers") or "[]")
        result["servers_view_at_start"] = {s["id"]: {k: s.get(k) for k in ("state", "agent_state", "down_by", "score")} for s in view}
        m0 = metrics(admin)
        cpu0, rss0 = proc_stat(lb.pid)

        # The legitimate traffic.
        stat = os.path.join(work, "uac_stat.csv")
        sipp_port = free_port(SOURCES["sipp"])
        uac = subprocess.Popen(["sipp", "-sn", "uac", sip, "-i", SOURCES["sipp"], "-p", str(sipp_port), "-nostdin",
                                "-r", str(a.rate), "-m", str(a.rate * N), "-timeout", str(N * 3 + 30),
                                "-trace_stat", "-stf", stat, "-fd", "1", "-trace_err", "-error_file", os.path.join(work, "uac_err.log")],
                               cwd=work, stdout=open(os.path.join(work, "uac.out"), "w"), stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        procs.append(uac)

        # The attack.
        url = f"udp://{sip}"
        t = ["-t", a.select_time, "-v"]
        ports = {n: free_port(SOURCES[n]) for n in ("svmap", "svwar", "svcrack")}
        common_opts = lambda n: ["-b", SOURCES[n], "-P", str(ports[n])] + t  # noqa: E731
        methods = ["REGISTER", "INVITE", "OPTIONS"]
        def crack_argv(run):
            tool = tools["svcrack"]
            tried = tool.sent.get("REGISTER (with credentials)", 0)
            if any(e["cracked"] for e in tool.ends) or tried >= a.dictionary:
                return None
            part = os.path.join(work, f"passwords.{run}.txt")
            with open(dict_path) as f, open(part, "w") as g:
                g.writelines(line for i, line in enumerate(f) if i >= tried)
            return common_opts("svcrack") + ["-v", "-u", USER, "-d", part, url]  # -vv: logs what stopped it

        argvs = {
            "svmap": lambda run: common_opts("svmap") + ["-p", str(sip_port), "-m", "OPTIONS", "-I", targets],
            "svwar": lambda run: common_opts("svwar") + ["-e", "100-999", "-m", methods[run % 3], url],
            # Restarted, when it stops, on the part of the dictionary it has not tried yet (as
            # an attacker would); not once the password is found or the dictionary is done.
            "svcrack": lambda run: crack_argv(run),
        }

        for n in ("svmap", "svwar", "svcrack"):
            if locs.get(n):
                tools[n] = Tool(n, locs[n], work, env, argvs[n], max_runs=100)
        t0 = time.time()
        deadline = t0 + N
        peak_rss = rss0
        while time.time() < deadline:
            for tool in tools.values():
                tool.step(deadline)
            peak_rss = max(peak_rss, proc_stat(lb.pid)[1])
            time.sleep(0.05)
        for tool in tools.values():
            tool.stop()
        t_attack = time.time() - t0
        try:
            uac.wait(timeout=N * 3 + 40)
        except subprocess.TimeoutExpired:
            stop_all([uac])
        time.sleep(1.5)  # the last responses; the servers' counts are written every second
        m1 = metrics(admin)
        cpu1, rss1 = proc_stat(lb.pid)
        peak_rss = max(peak_rss, rss1)
        # Lone transactions (OPTIONS, REGISTER forks) leave the tables after 32 s: RSS once they have.
        if a.settle > 0:
            time.sleep(a.settle)
            m2 = metrics(admin)
            cpu2, rss2 = proc_stat(lb.pid)
            result["after_settle"] = {"seconds": a.settle, "rss_kb": rss2, "cpu_ms_idle": round(cpu2 - cpu1),
                                      "sessions": m2.get("siplb_sessions"), "transactions": m2.get("siplb_transactions")}
        result["tables_after_run"] = {"sessions": m1.get("siplb_sessions"), "transactions": m1.get("siplb_transactions")}
    finally:
        for tool in tools.values():
            tool.stop()
        stop_all(procs)
        log.close()

    # ------------------------------------------------------------ the report
    try:
        d = sipp_totals(stat)
    except (OSError, IndexError):
        d = {}
        result["sipp_error"] = f"no statistics from SIPp ({stat}); see {work}/uac.out"
    ok, failed = int(d.get("SuccessfulCall(C)", 0)), int(d.get("FailedCall(C)", 0))
    unfinished = a.rate * N - ok - failed
    reasons = {k: int(v) for k, v in d.items() if k.startswith("Failed") and k.endswith("(C)") and k != "FailedCall(C)" and v not in ("0", "")}
    result["sipp"] = {"calls": a.rate * N, "successful": ok, "failed": failed + max(unfinished, 0),
                      "failure_reasons": reasons, "unfinished": max(unfinished, 0),
                      "retransmissions": int(d.get("Retransmissions(C)", 0))}
    servers = []
    for path in count_files:
        try:
            with open(path) as f:
                servers.append(json.load(f))
        except (OSError, ValueError):
            servers.append({})
    result["servers"] = {f"s{i}": c for i, c in enumerate(servers, 1)}
    delta = lambda k: int(m1.get(k, 0) - m0.get(k, 0))  # noqa: E731
    result["balancer"] = {
        "rate_limited": delta('siplb_drops_total{reason="rate_limited"}'),
        "local_503": delta('siplb_local_responses_total{code="503"}'),
        "requests": {k.split('"')[1]: delta(k) for k in m1 if k.startswith("siplb_requests_total{") and delta(k)},
        "drops": {k.split('"')[1]: delta(k) for k in m1 if k.startswith("siplb_drops_total{") and delta(k)},
        "local_responses": {k.split('"')[1]: delta(k) for k in m1 if k.startswith("siplb_local_responses_total{") and delta(k)},
        "cpu_ms": round(cpu1 - cpu0), "cpu_ms_before": round(cpu0), "cpu_ms_after": round(cpu1),
        "rss_kb_before": rss0, "rss_kb_after": rss1, "rss_kb_peak": peak_rss,
    }
    result["attack_seconds"] = round(t_attack, 2)
    result["sv"] = {}
    for n in ("svmap", "svwar", "svcrack"):
        if n in sv_errors:
            result["sv"][n] = {"error": sv_errors[n]}
            continue
        tool = tools[n]
        total = sum(tool.sent.values())
        seen = sum(by.get(SOURCES[n], 0) for c in servers for by in c.values())
        result["sv"][n] = {"source": SOURCES[n], "seen_from_source": seen, "runs": tool.runs, "sent": tool.sent, "sent_total": total,
                           "per_second": round(total / max(t_attack, 1e-9), 1), "ends": tool.ends}
    cracked = [e["cracked"] for e in result["sv"].get("svcrack", {}).get("ends", []) if e["cracked"]]
    result["svcrack_cracked"] = bool(cracked)
    result["password_at"] = a.password_at

    # The checks.
    sipp_failed = result["sipp"]["failed"]
    checks.append(("no failed SIPp call", sipp_failed == 0, f"{ok} successful, {sipp_failed} failed of {a.rate * N}"))
    # Every origin the servers saw but SIPp's (svwar and svcrack may share one: see the report).
    seen = sorted({src for c in servers for by in c.values() for src in by} - {SOURCES["sipp"], "?"})
    for method, (rate, burst) in LIMITS.items():
        bound = burst + rate * t_attack
        for src in seen:
            if method == "REGISTER" and any(c.get(method, {}).get(src, 0) for c in servers):
                # Forked: every REGISTER let through reaches each server once.
                for i, c in enumerate(servers, 1):
                    got = c.get(method, {}).get(src, 0)
                    checks.append((f"s{i}: REGISTER from {src} <= {burst} + {rate}/s x {t_attack:.1f} s = {bound:.0f}",
                                   got <= bound, f"{got}"))
            elif method != "REGISTER":
                got = sum(c.get(method, {}).get(src, 0) for c in servers)
                if got:
                    checks.append((f"s1+s2: {method} from {src} <= {burst} + {rate}/s x {t_attack:.1f} s = {bound:.0f}",
                                   got <= bound, f"{got}"))
    for n, err in sv_errors.items():
        checks.append((f"{n} ran", False, err))
    result["checks"] = [{"check": c, "pass": p, "value": v} for c, p, v in checks]

    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"command: {result['command']}")
        print(f"siplb {siplb}; SIP {sip}, admin {admin}; servers {srv[0]}, {srv[1]}; work {work}")
        print("GET /servers at the start (servers without agents): " + "; ".join(
            f"{k}: " + ", ".join(f"{f} {x}" for f, x in v.items()) for k, v in result["servers_view_at_start"].items()))
        if "sipp_error" in result:
            print(f"SIPp: {result['sipp_error']}")
        s = result["sipp"]
        print(f"SIPp uac from {SOURCES['sipp']}: {s['calls']} calls at {a.rate}/s: successful {s['successful']}, failed {s['failed']}"
              f"{' ' + str(s['failure_reasons']) if s['failure_reasons'] else ''}, retransmissions {s['retransmissions']}")
        for n, v in result["sv"].items():
            if "error" in v:
                print(f"{n}: COULD NOT RUN: {v['error']}")
                continue
            where = v["source"] if v["seen_from_source"] or not v["sent_total"] else f"-b {v['source']} (ignored: none of it came from there)"
            print(f"{n} from {where} (-t {a.select_time}): {v['runs']} run(s), sent {v['sent_total']} ({v['per_second']}/s) {v['sent']}")
            for e in v["ends"]:
                print(f"    run {e['run']}: {n} {e['argv']}")
                print(f"        exit {e['exit']}{', ' + e['found'] if e['found'] else ''}; {e['last']}")
        print(f"svcrack: right password at dictionary line {a.password_at}: {'CRACKED: ' + cracked[0] if cracked else 'not found'}")
        for name, c in result["servers"].items():
            print(f"{name} received: " + "; ".join(f"{m} " + ", ".join(f"{src} {k}" for src, k in sorted(by.items()))
                                                for m, by in sorted(c.items())))
        b = result["balancer"]
        print(f"balancer: rate_limited {b['rate_limited']}, local 503 {b['local_503']}, drops {b['drops']}, local responses {b['local_responses']}")
        print(f"balancer: requests received {b['requests']}")
        sent = {}
        for v in result["sv"].values():
            for k, x in v.get("sent", {}).items():
                k = k.split(" ")[0]
                sent[k] = sent.get(k, 0) + x
        sipp_sent = {"INVITE": s["calls"] + s["retransmissions"], "ACK": s["successful"], "BYE": s["successful"]}
        print("cross-check, sent by sv* + SIPp (without its retransmissions of ACK/BYE) / received by the balancer: "
              + ", ".join(f"{k} {sent.get(k, 0)} + {sipp_sent.get(k, 0)} / {b['requests'].get(k, 0)}"
                          for k in sorted(set(sent) | set(b["requests"]))))
        print(f"balancer: CPU {b['cpu_ms']} ms over the run ({b['cpu_ms_before']} -> {b['cpu_ms_after']} ms), "
              f"RSS {b['rss_kb_before']} -> {b['rss_kb_after']} kB (peak {b['rss_kb_peak']} kB)")
        tr = result["tables_after_run"]
        print(f"balancer: right after the run: sessions {tr['sessions']}, transactions {tr['transactions']}")
        if "after_settle" in result:
            st = result["after_settle"]
            print(f"balancer: {st['seconds']:g} s later: RSS {st['rss_kb']} kB, sessions {st['sessions']}, "
                  f"transactions {st['transactions']}, CPU idle {st['cpu_ms_idle']} ms")
        for c in result["checks"]:
            print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']}")
    sys.exit(0 if all(c["pass"] for c in result["checks"]) else 1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        sp = argparse.ArgumentParser()
        sp.add_argument("--serve", required=True)
        sp.add_argument("--out", required=True)
        sp.add_argument("--lifetime", type=float, default=300)
        sp.add_argument("--password", required=True)
        x = sp.parse_args()
        serve(x.serve, x.out, x.lifetime, x.password)
    else:
        main()
