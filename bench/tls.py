#!/usr/bin/env python3
"""siplb's TLS listener under SIPp, on loopback only: a certificate swapped
and reloaded while calls run, and what TLS costs beside UDP and TCP.

    python3 bench/tls.py --reload-at 3 --seconds 6 --rate 50
    python3 bench/tls.py --measure [--rates 500,1000] [--seconds 10] [--rounds 2] [--json]

Run it in a network namespace of its own where it can be made (fixed ports):

    unshare --net sh -c 'ip link set lo up && python3 bench/tls.py --measure'

What runs (ports with --port-offset added):

  sipp uas  127.0.0.1:5081, 5082 (UDP), bench/sipp/uas_rr.xml (the built-in
      uas, echoing Record-Route)
  siplb     127.0.0.1:5060 (UDP, TCP), TLS 127.0.0.1:5061, admin 127.0.0.1:8060,
      policy round-robin, no agents; the certificate is for IP:127.0.0.1, from
      a throwaway CA made here with the openssl CLI
  relay     127.0.0.1:5090: this script (`tls.py relay`), a TCP-to-TLS relay:
      each TCP connection accepted becomes one TLS connection to siplb (the
      CA verified). Debian's SIPp (sip-tester 3.6.1) is built without OpenSSL
      (`-t l1` says "To use a TLS transport you must compile SIPp with
      OpenSSL"), so SIPp speaks TCP (`-t t1`: one connection; `-t tn`: one
      per call) to the relay, and siplb sees TLS. The relay runs in its own
      process: its CPU is not siplb's (both are reported)
  sipp uac  127.0.0.1:5070, bench/sipp/uac_rr.xml (ACK and BYE by the Route
      set of our Record-Route), -d HOLD ms

--reload-at S: SIPp over TLS (`-t t1` through the relay: one TLS connection,
multiplexed) at --rate calls/s for --seconds; at S s the second certificate
and key (same CA) are written over the files siplb reads (each by a rename)
and `POST /reload` is called. Then a new TLS connection (openssl s_client
-CAfile ca.pem, verified) must be served the second certificate (SHA-256
fingerprint compared), while the TLS connection SIPp opened before the
reload keeps carrying calls. Exit 0 only when every call succeeded (none
failed, none unfinished), the reload answered 200, the first certificate was
served before it and the second after it, and the relay opened one TLS
connection only.

--measure, in one run: (a) siplb's CPU (utime+stime of /proc/PID/stat) per
1,000 calls with SIPp over UDP, over TCP (`-t t1`) and over TLS (`-t t1`
through the relay) at each of --rates, --rounds rounds with the order of
the transports alternated, medians and the ratios to UDP; (b) full TLS
handshakes per second from --hs-workers client processes (Python ssl, a new
context-less handshake each, then a CRLF ping answered by siplb's pong,
then close), bounded by count and time, with siplb's CPU per handshake; (c)
siplb's RSS (VmRSS) before and after --idle-conns idle connections (TLS:
handshake and one ping done; TCP: one ping done), (after - before) / N in
KB, each on a fresh siplb. A table, or --json.

Exit status: 0 pass (measure: no call and no handshake failed); 1 a check
failed, a call or handshake failed, or the test bed did not come up; 2 usage or a missing program
(sipp: apt-get install sip-tester; openssl). Everything lives in a
temporary folder (kept with --keep, or printed on failure); every process
is stopped by its PID; the run is bounded by --timeout.
"""
import argparse
import asyncio
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Procs, Timeout  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIPP_DIR = os.path.join(ROOT, "bench", "sipp")
TICK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class Failed(Exception):
    pass


def log(*a):
    print(*a, flush=True)


def now():
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def tail(path, n=20):
    try:
        with open(path, "rb") as f:
            return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no %s)" % path


def run(argv, check=True, timeout=30, inp=None):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       input=inp, timeout=timeout, stdin=None if inp is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise Failed("%s: exit %d: %s" % (" ".join(argv), r.returncode,
                                           r.stdout.decode(errors="replace").strip()))
    return r


# ------------------------------------------------------------ processes


def proc_stat(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_ms(pid):
    """utime + stime of pid (all its threads), ms."""
    try:
        fields = proc_stat(pid)
        return (int(fields[11]) + int(fields[12])) * 1000 / TICK
    except (OSError, ValueError, IndexError):
        return float("nan")


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise Failed("no VmRSS for %d" % pid)


def wait_until(pred, seconds, what, step=0.05):
    end = time.monotonic() + seconds
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= end:
            raise Timeout(what)
        time.sleep(step)


# ------------------------------------------------------------ certificates


def make_ca(folder):
    ca_key, ca = os.path.join(folder, "ca.key"), os.path.join(folder, "ca.pem")
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key,
         "-out", ca, "-days", "2", "-subj", "/CN=siplb tls bench CA"])
    return ca, ca_key


def make_cert(folder, name, ca, ca_key, ip="127.0.0.1"):
    """A server certificate for IP:ip signed by the CA: (chain.pem, key.pem, sha256 of the leaf's DER)."""
    key, csr, cert = (os.path.join(folder, name + s) for s in ("-key.pem", ".csr", "-cert.pem"))
    ext = os.path.join(folder, name + ".ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" % ip)
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=%s %s" % (ip, name)])
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-set_serial",
         str(int.from_bytes(os.urandom(8), "big")), "-out", cert, "-days", "2", "-extfile", ext])
    chain = os.path.join(folder, name + "-chain.pem")
    with open(chain, "w") as out, open(cert) as c, open(ca) as a:
        out.write(c.read())
        out.write(a.read())
    return chain, key, fingerprint_of_pem(open(cert).read())


def fingerprint_of_pem(pem):
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", pem, re.S)
    if not m:
        return None
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(m.group(0))).hexdigest()


def replace_file(src, dst):
    """dst gets src's bytes, atomically (a temporary file beside dst, renamed)."""
    tmp = dst + ".new"
    with open(src, "rb") as f, open(tmp, "wb") as g:
        g.write(f.read())
        g.flush()
        os.fsync(g.fileno())
    os.chmod(tmp, 0o600)
    os.rename(tmp, dst)


def served_cert_openssl(port, ca):
    """(SHA-256 of the leaf served to a new connection, verify line) by openssl s_client."""
    r = run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, "-CAfile", ca,
             "-verify_return_error", "-verify_ip", "127.0.0.1"], check=False, timeout=10, inp=b"")
    out = r.stdout.decode(errors="replace")
    verify = re.search(r"Verify return code: .*", out)
    return fingerprint_of_pem(out), verify.group(0) if verify else "(no verify line; exit %d)" % r.returncode


def served_cert_python(port, ca):
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            return hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest()


# ------------------------------------------------------------ siplb


def write_config(work, ports, chain, key, max_per_source=256):
    agent_key = os.path.join(work, "agent.key")
    with open(agent_key, "w") as f:
        f.write(os.urandom(16).hex() + "\n")
    os.chmod(agent_key, 0o600)
    text = """# written by bench/tls.py
[sip]
listen = ["127.0.0.1:{sip}"]
transports = ["udp", "tcp", "tls"]
tls_port = {tls}
max_connections_per_source = {mps}

[sip.tls]
certificate = "{chain}"
key = "{key}"

[routing]
secret = "tls-bench-secret-{rand}"
policy = "round-robin"
# No agents: health "agent" with no agent configured routes to every server.
health = "agent"

[perf]
key_file = "{agent_key}"

[admin]
listen = "127.0.0.1:{admin}"

[[servers]]
id = "s1"
address = "127.0.0.1:{s1}"

[[servers]]
id = "s2"
address = "127.0.0.1:{s2}"
""".format(sip=ports["sip"], tls=ports["tls"], mps=max_per_source, chain=chain, key=key,
           rand=os.urandom(8).hex(), agent_key=agent_key, admin=ports["admin"],
           s1=ports["s1"], s2=ports["s2"])
    path = os.path.join(work, "siplb.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def admin(port, path, method="GET"):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method,
                                 data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def start_siplb(procs, a, work, conf, ports, ca, tag=""):
    env = dict(os.environ)
    env["SIPLB_LOG"] = "debug" if a.debug else env.get("SIPLB_LOG", "info")
    lblog = os.path.join(work, "siplb%s.log" % tag)
    lb = procs.start("siplb", [a.siplb, "balancer", "--config", conf], lblog, env)

    def up():
        if lb.poll() is not None:
            raise Failed("siplb exited with status %s:\n%s" % (lb.returncode, tail(lblog)))
        try:
            code, body = admin(ports["admin"], "/servers")
            return code == 200 and len(json.loads(body)) == 2
        except (OSError, ValueError):
            return False
    wait_until(up, 10, "siplb's admin API listing s1 and s2", 0.1)

    def tls_up():
        # A whole handshake (a bare connect would count as a failed one).
        try:
            return bool(served_cert_python(ports["tls"], ca))
        except (OSError, ssl.SSLError):
            return False
    wait_until(tls_up, 5, "siplb's TLS listener answering a handshake", 0.05)
    return lb, lblog


def metrics_of(ports, prefixes):
    try:
        _, text = admin(ports["admin"], "/metrics")
    except OSError as e:
        return {"error": str(e)}
    out = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


# ------------------------------------------------------------ SIPp


def start_servers(procs, work, ports, seconds_budget):
    uas = []
    for sid in ("s1", "s2"):
        stf = os.path.join(work, "uas-%s-stat.csv" % sid)
        p = procs.start("uas-" + sid, ["sipp", "-sf", os.path.join(SIPP_DIR, "uas_rr.xml"), "-i", "127.0.0.1",
                                       "-p", str(ports[sid]), "-nostdin", "-timeout", str(int(seconds_budget)),
                                       "-trace_stat", "-stf", stf, "-fd", "1"],
                        os.path.join(work, "uas-%s.log" % sid), cwd=work)
        uas.append((sid, p, stf))
    time.sleep(0.3)
    for sid, p, _ in uas:
        if p.poll() is not None:
            raise Failed("sipp uas %s exited (%s):\n%s" % (sid, p.returncode, tail(os.path.join(work, "uas-%s.log" % sid))))
    return uas


def sipp_totals(stat_csv):
    try:
        rows = [line.strip().split(";") for line in open(stat_csv) if line.strip()]
    except OSError:
        return {}
    return dict(zip(rows[0], rows[-1])) if len(rows) >= 2 else {}


def uac_argv(work, target, mode, rate, calls, seconds, hold, tag, ports):
    stf = os.path.join(work, "uac-%s-stat.csv" % tag)
    err = os.path.join(work, "uac-%s-errors.log" % tag)
    for f in (stf, err):
        if os.path.exists(f):
            os.remove(f)
    argv = ["sipp", "-sf", os.path.join(SIPP_DIR, "uac_rr.xml"), target, "-i", "127.0.0.1",
            "-p", str(ports["uac"]), "-t", mode, "-nostdin", "-r", str(rate), "-m", str(calls),
            "-d", str(hold), "-recv_timeout", "5000", "-timeout", str(int(seconds * 2 + 20)),
            "-trace_stat", "-stf", stf, "-fd", "1", "-trace_err", "-error_file", err]
    if mode == "tn":
        argv += ["-max_socket", "10000"]  # below the descriptor limit, or SIPp refuses to start
    return argv, stf, err


def uac_result(stf, err, calls):
    st = sipp_totals(stf)
    ok = int(st.get("SuccessfulCall(C)", 0) or 0)
    failed = int(st.get("FailedCall(C)", 0) or 0)
    reasons = {k[len("Failed"):-3]: int(v) for k, v in st.items()
               if k.startswith("Failed") and k.endswith("(C)") and k != "FailedCall(C)" and v not in ("0", "")}
    unfinished = max(0, calls - ok - failed)
    errors = []
    try:
        with open(err, errors="replace") as f:
            # SIPp writes some events without a newline between them: cut each.
            text = re.sub(r"(?=\d{4}-\d\d-\d\d\t\d\d:\d\d:\d\d\.\d+\t)", "\n", f.read())
            errors = [line.rstrip()[:200] for line in text.splitlines() if line.strip()][:10]
    except OSError:
        pass
    return dict(calls=calls, successful=ok, failed=failed, unfinished=unfinished, reasons=reasons,
                retransmissions=int(st.get("Retransmissions(C)", 0) or 0), error_lines=errors,
                stats_found=bool(st))


def start_relay(procs, work, ports, ca, tag):
    rlog = os.path.join(work, "relay-%s.log" % tag)
    p = procs.start("relay", [sys.executable, os.path.abspath(__file__), "relay",
                              "--listen", "127.0.0.1:%d" % ports["relay"],
                              "--connect", "127.0.0.1:%d" % ports["tls"], "--cafile", ca], rlog)

    def up():
        if p.poll() is not None:
            raise Failed("relay exited (%s):\n%s" % (p.returncode, tail(rlog)))
        return "listening" in open(rlog, errors="replace").read()
    wait_until(up, 5, "the TLS relay listening")
    return p, rlog


def relay_counts(rlog):
    text = open(rlog, errors="replace").read()
    return dict(tls_connections=len(re.findall(r"^tls-open ", text, re.M)),
                tls_failures=len(re.findall(r"^tls-fail ", text, re.M)),
                fingerprints=sorted(set(re.findall(r"^tls-open \S+ fp=(\w+)", text, re.M))))


# ------------------------------------------------------------ the relay (tls.py relay)


def relay_main(argv):
    ap = argparse.ArgumentParser(prog="tls.py relay")
    ap.add_argument("--listen", required=True)
    ap.add_argument("--connect", required=True)
    ap.add_argument("--cafile", required=True)
    a = ap.parse_args(argv)
    lhost, lport = a.listen.rsplit(":", 1)
    chost, cport = a.connect.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=a.cafile)
    n = [0]

    async def pipe(r, w):
        try:
            while True:
                data = await r.read(262144)
                if not data:
                    break
                w.write(data)
                await w.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                w.close()
            except (OSError, RuntimeError):
                pass

    async def handle(reader, writer):
        n[0] += 1
        i = n[0]
        try:
            r2, w2 = await asyncio.open_connection(chost, int(cport), ssl=ctx, server_hostname=chost)
        except (OSError, ssl.SSLError) as e:
            print("tls-fail %d %s" % (i, e), flush=True)
            writer.close()
            return
        der = w2.get_extra_info("ssl_object").getpeercert(binary_form=True)
        print("tls-open %d fp=%s %s" % (i, hashlib.sha256(der).hexdigest(),
                                        w2.get_extra_info("ssl_object").version()), flush=True)
        await asyncio.gather(pipe(reader, w2), pipe(r2, writer))
        print("tls-close %d" % i, flush=True)

    async def serve():
        srv = await asyncio.start_server(handle, lhost, int(lport), backlog=1024)
        print("listening %s -> tls %s" % (a.listen, a.connect), flush=True)
        async with srv:
            await srv.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(serve())


# ------------------------------------------------------------ handshake client (tls.py hs-client)


def hs_client_main(argv):
    ap = argparse.ArgumentParser(prog="tls.py hs-client")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--cafile", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--start-at", type=float, required=True, help="time.time() to begin at")
    a = ap.parse_args(argv)
    ctx = ssl.create_default_context(cafile=a.cafile)
    delay = a.start_at - time.time()
    if 0 < delay < 10:
        time.sleep(delay)
    t0 = time.monotonic()
    done = errors = 0
    first_error = None
    for _ in range(a.count):
        if time.monotonic() - t0 >= a.seconds:
            break
        try:
            with socket.create_connection(("127.0.0.1", a.port), timeout=5) as s:
                with ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
                    t.sendall(b"\r\n\r\n")  # RFC 5626 ping: siplb answers CRLF
                    if t.recv(2) != b"\r\n":
                        raise OSError("no pong")
            done += 1
        except (OSError, ssl.SSLError) as e:
            errors += 1
            first_error = first_error or repr(e)
    print(json.dumps(dict(done=done, errors=errors, wall=time.monotonic() - t0, first_error=first_error)))


# ------------------------------------------------------------ idle connections


def open_idle(port, n, ca=None, seconds=60):
    """n connections to port, each having had one CRLF ping answered (TLS
    when ca is given), kept open; returned with the time it took."""
    ctx = ssl.create_default_context(cafile=ca) if ca else None
    conns = []
    t0 = time.monotonic()
    try:
        for _ in range(n):
            if time.monotonic() - t0 > seconds:
                raise Timeout("opening %d connections: %d after %d s" % (n, len(conns), seconds))
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if ctx:
                s = ctx.wrap_socket(s, server_hostname="127.0.0.1")
            conns.append(s)
            s.sendall(b"\r\n\r\n")
            if s.recv(2) != b"\r\n":
                raise Failed("connection %d: no CRLF pong" % len(conns))
    except BaseException:
        close_all(conns)
        raise
    return conns, time.monotonic() - t0


def close_all(conns):
    for s in conns:
        try:
            s.close()
        except OSError:
            pass


# ------------------------------------------------------------ modes


def setup(a, work, procs, ports, budget):
    ca, ca_key = make_ca(work)
    c1 = make_cert(work, "first", ca, ca_key)
    c2 = make_cert(work, "second", ca, ca_key)
    # The files siplb reads: the first certificate now, the second after the reload.
    chain, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    replace_file(c1[0], chain)
    replace_file(c1[1], key)
    uas = start_servers(procs, work, ports, budget)
    return dict(ca=ca, first=c1, second=c2, chain=chain, key=key, uas=uas)


def uas_retrans(uas):
    return {sid: int(sipp_totals(stf).get("Retransmissions(C)", 0) or 0) for sid, _, stf in uas}


def reload_mode(a, work, procs, ports):
    t = setup(a, work, procs, ports, a.seconds * 2 + 60)
    conf = write_config(work, ports, t["chain"], t["key"])
    lb, lblog = start_siplb(procs, a, work, conf, ports, t["ca"])
    fp1, fp2 = t["first"][2], t["second"][2]
    before = served_cert_python(ports["tls"], t["ca"])
    log("%s  siplb up; served before the reload: %s (first %s)" % (
        now(), before[:16], "yes" if before == fp1 else "NO"))
    relay, rlog = start_relay(procs, work, ports, t["ca"], "reload")
    calls = a.rate * a.seconds
    argv, stf, err = uac_argv(work, "127.0.0.1:%d" % ports["relay"], "t1", a.rate, calls, a.seconds,
                              a.hold, "reload", ports)
    uac = procs.start("uac", argv, os.path.join(work, "uac-reload.log"), cwd=work)
    t0 = time.monotonic()
    reload = None
    after = verify = None
    limit = a.seconds * 2 + 20
    while uac.poll() is None and time.monotonic() - t0 < limit:
        if reload is None and time.monotonic() - t0 >= a.reload_at:
            replace_file(t["second"][0], t["chain"])
            replace_file(t["second"][1], t["key"])
            code, body = admin(ports["admin"], "/reload", "POST")
            reload = dict(at_s=round(time.monotonic() - t0, 2), status=code, body=body.strip()[:300])
            log("%s  %.1f s: certificate files replaced, POST /reload -> %d %s" % (
                now(), reload["at_s"], code, body.strip()[:200]))
            after, verify = served_cert_openssl(ports["tls"], t["ca"])
            log("%s  new connection after the reload (openssl s_client): %s, %s (second %s)" % (
                now(), (after or "none")[:16], verify, "yes" if after == fp2 else "NO"))
        time.sleep(0.05)
    if uac.poll() is None:
        procs.stop(uac)
        log("sipp uac still running after %d s: stopped" % limit)
    time.sleep(0.5)
    res = uac_result(stf, err, calls)
    rc = relay_counts(rlog)
    uasr = uas_retrans(t["uas"])
    py_after = served_cert_python(ports["tls"], t["ca"])
    m = metrics_of(ports, ("siplb_connections", "siplb_drops_total", "siplb_local_responses_total"))
    checks = {
        "no failed or unfinished calls": res["failed"] == 0 and res["unfinished"] == 0 and res["stats_found"],
        "reload answered 200": bool(reload) and reload["status"] == 200,
        "first certificate served before the reload": before == fp1,
        "second certificate served after the reload (openssl s_client, verified)":
            after == fp2 and verify is not None and "0 (ok)" in verify,
        "second certificate served after the reload (python ssl)": py_after == fp2,
        "SIPp's one TLS connection carried the calls across the reload":
            rc["tls_connections"] == 1 and rc["tls_failures"] == 0 and rc["fingerprints"] == [fp1],
    }
    out = dict(mode="reload", date=now(), rate=a.rate, seconds=a.seconds, hold_ms=a.hold,
               uac=res, uas_retransmissions=uasr, reload=reload, relay=rc,
               certificates=dict(first=fp1, second=fp2, before=before, after_openssl=after,
                                 after_python=py_after, verify=verify),
               siplb_metrics=m, checks=checks, ok=all(checks.values()))
    if a.json:
        log(json.dumps(out, indent=1))
    else:
        log("calls %d: successful %d, failed %d, unfinished %d, uac retransmissions %d, uas retransmissions %s%s" % (
            calls, res["successful"], res["failed"], res["unfinished"], res["retransmissions"], uasr,
            (", failed by reason %s" % res["reasons"]) if res["reasons"] else ""))
        for line in res["error_lines"]:
            log("  sipp error: " + line)
        log("relay: %d TLS connection(s), %d failed; certificates served to it: %s" % (
            rc["tls_connections"], rc["tls_failures"], [f[:16] for f in rc["fingerprints"]]))
        log("siplb: " + "; ".join("%s %g" % (k.replace("siplb_", ""), v) for k, v in m.items() if v))
        for name, ok in checks.items():
            log("  %-4s %s" % ("ok" if ok else "FAIL", name))
    return out["ok"], lblog


def run_calls(a, work, procs, ports, lb, transport, rate, tag):
    calls = rate * a.seconds
    if transport == "udp":
        target, mode = "127.0.0.1:%d" % ports["sip"], "u1"
    elif transport == "tcp":
        target, mode = "127.0.0.1:%d" % ports["sip"], "t1"
    elif transport == "tls":
        target, mode = "127.0.0.1:%d" % ports["relay"], "t1"
    else:  # tlsn: one TLS connection (one handshake) per call
        target, mode = "127.0.0.1:%d" % ports["relay"], "tn"
    argv, stf, err = uac_argv(work, target, mode, rate, calls, a.seconds, a.hold, tag, ports)
    c0 = cpu_ms(lb.pid)
    via_relay = transport.startswith("tls")
    r0 = cpu_ms(a._relay.pid) if via_relay else 0
    t0 = time.monotonic()
    uac = procs.start("uac", argv, os.path.join(work, "uac-%s.log" % tag), cwd=work)
    try:
        uac.wait(timeout=a.seconds * 2 + 30)
    except subprocess.TimeoutExpired:
        procs.stop(uac)
    wall = time.monotonic() - t0
    used = cpu_ms(lb.pid) - c0
    relay_used = (cpu_ms(a._relay.pid) - r0) if via_relay else None
    procs.stop(uac)
    res = uac_result(stf, err, calls)
    done = res["successful"] + res["failed"]
    res.update(transport=transport, rate=rate, wall_s=round(wall, 1),
               achieved_cps=round(res["successful"] / max(wall, 1e-9), 1),
               cpu_ms=round(used, 1), cpu_ms_per_1000_calls=round(used * 1000 / max(done, 1), 1),
               relay_cpu_ms_per_1000_calls=None if relay_used is None else round(relay_used * 1000 / max(done, 1), 1))
    return res


def handshakes(a, work, procs, ports, lb, ca, workers):
    c0 = cpu_ms(lb.pid)
    t0 = time.monotonic()
    start_at = time.time() + 0.3
    ps = []
    for i in range(workers):
        outp = os.path.join(work, "hs-%d-%d.out" % (workers, i))
        p = procs.start("hs", [sys.executable, os.path.abspath(__file__), "hs-client", "--port", str(ports["tls"]),
                               "--cafile", ca, "--count", str(a.hs_count), "--seconds", str(a.hs_seconds),
                               "--start-at", str(start_at)], outp)
        ps.append((p, outp))
    done = errors = 0
    first_error = None
    walls = []
    for p, outp in ps:
        try:
            p.wait(timeout=a.hs_seconds + 30)
        except subprocess.TimeoutExpired:
            pass
        procs.stop(p)
        try:
            r = json.loads(open(outp).read().strip().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            errors += 1
            first_error = first_error or "worker output: " + tail(outp, 3)
            continue
        done += r["done"]
        errors += r["errors"]
        walls.append(r["wall"])
        first_error = first_error or r["first_error"]
    used = cpu_ms(lb.pid) - c0
    wall = max(walls) if walls else time.monotonic() - t0
    return dict(workers=workers, handshakes=done, errors=errors, first_error=first_error, wall_s=round(wall, 2),
                handshakes_per_s=round(done / max(wall, 1e-9), 1), siplb_cpu_ms=round(used, 1),
                siplb_cpu_ms_per_handshake=round(used / max(done, 1), 3),
                siplb_cpu_percent=round(100 * used / 1000 / max(time.monotonic() - t0, 1e-9), 1))


def idle_memory(a, work, procs, ports, t, kind):
    """RSS per idle connection of `kind` (tls or tcp), on a fresh siplb."""
    conf = write_config(work, ports, t["chain"], t["key"], max_per_source=a.idle_conns + 100)
    lb, _ = start_siplb(procs, a, work, conf, ports, t["ca"], "-mem-" + kind)
    try:
        # One connection first, opened and closed: what any first connection
        # sets up (the TLS config, buffers' first allocation) is in `before`.
        warm, _ = open_idle(ports["tls"] if kind == "tls" else ports["sip"], 1, t["ca"] if kind == "tls" else None)
        close_all(warm)
        time.sleep(1)
        before = rss_kb(lb.pid)
        conns, took = open_idle(ports["tls"] if kind == "tls" else ports["sip"], a.idle_conns,
                                t["ca"] if kind == "tls" else None, seconds=120)
        try:
            time.sleep(2)
            after = rss_kb(lb.pid)
            m = metrics_of(ports, ("siplb_connections ",))
        finally:
            close_all(conns)
        time.sleep(1)
        closed = rss_kb(lb.pid)
        # The same again: RSS that stays put means the memory of the closed
        # connections is reused (the allocator keeps it), not lost.
        conns, _ = open_idle(ports["tls"] if kind == "tls" else ports["sip"], a.idle_conns,
                             t["ca"] if kind == "tls" else None, seconds=120)
        time.sleep(2)
        again = rss_kb(lb.pid)
        close_all(conns)
    finally:
        procs.stop(lb)
    return dict(kind=kind, connections=a.idle_conns, rss_before_kb=before, rss_after_kb=after,
                rss_after_close_kb=closed, rss_after_second_open_kb=again, kb_per_connection=round((after - before) / a.idle_conns, 2),
                open_s=round(took, 2), siplb_connections_gauge=m.get("siplb_connections"))


def med(vals):
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 1) if vals else None


def measure_mode(a, work, procs, ports):
    rates = [int(x) for x in a.rates.split(",")]
    transports = a.transports.split(",")
    phases = a.phases.split(",")
    budget = len(rates) * len(transports) * a.rounds * (a.seconds * 2 + 30) + 300
    t = setup(a, work, procs, ports, budget)
    conf = write_config(work, ports, t["chain"], t["key"])
    lb, lblog = start_siplb(procs, a, work, conf, ports, t["ca"])
    a._relay, rlog = start_relay(procs, work, ports, t["ca"], "measure")
    runs, table, hs, mem = [], [], [], []
    if "calls" in phases:
        log("%s  (a) CPU per 1,000 calls: %s at %s calls/s, %d s each, %d rounds, hold %d ms" % (
            now(), "/".join(transports), a.rates, a.seconds, a.rounds, a.hold))
        for rnd in range(a.rounds):
            for rate in rates:
                order = transports if rnd % 2 == 0 else list(reversed(transports))
                for tr in order:
                    r = run_calls(a, work, procs, ports, lb, tr, rate, "%s-%d-%d" % (tr, rate, rnd))
                    r["round"] = rnd + 1
                    runs.append(r)
                    if not a.json:
                        log("  %s round %d %-4s %5d/s: ok %6d failed %3d unfinished %3d retrans %4d "
                            "achieved %7.1f/s  siplb %6.1f ms/1000 calls%s%s" % (
                                time.strftime("%H:%M:%S"), rnd + 1, tr, rate, r["successful"], r["failed"],
                                r["unfinished"], r["retransmissions"], r["achieved_cps"], r["cpu_ms_per_1000_calls"],
                                "  (relay %.1f)" % r["relay_cpu_ms_per_1000_calls"] if tr.startswith("tls") else "",
                                ("  " + str(r["reasons"])) if r["reasons"] else ""))
                        for line in r["error_lines"][:3]:
                            log("      sipp error: " + line)
                    time.sleep(a.pause)
        for rate in rates:
            row = dict(rate=rate)
            for tr in transports:
                rs = [r for r in runs if r["rate"] == rate and r["transport"] == tr]
                row[tr] = med([r["cpu_ms_per_1000_calls"] for r in rs])
                row[tr + "_failed"] = sum(r["failed"] + r["unfinished"] for r in rs)
                row[tr + "_runs"] = [r["cpu_ms_per_1000_calls"] for r in rs]
                if tr.startswith("tls"):
                    row["relay_" + tr] = med([r["relay_cpu_ms_per_1000_calls"] for r in rs])
            for tr in transports:
                if tr != "udp" and row.get("udp"):
                    row[tr + "/udp"] = round(row[tr] / row["udp"], 2) if row[tr] is not None else None
            table.append(row)
    rc = relay_counts(rlog)

    if "handshakes" in phases:
        log("%s  (b) TLS handshakes (full, RSA 2048, a CRLF ping each), workers %s, %g s or %d each" % (
            now(), a.hs_workers, a.hs_seconds, a.hs_count))
        for w in [int(x) for x in a.hs_workers.split(",")]:
            r = handshakes(a, work, procs, ports, lb, t["ca"], w)
            hs.append(r)
            if not a.json:
                log("  %d worker(s): %6d handshakes, %3d errors, %7.1f/s, siplb %.3f ms CPU/handshake "
                    "(%.0f%% of a core)%s" % (
                        w, r["handshakes"], r["errors"], r["handshakes_per_s"], r["siplb_cpu_ms_per_handshake"],
                        r["siplb_cpu_percent"], ("  first error: " + r["first_error"]) if r["first_error"] else ""))
            time.sleep(1)
    m = metrics_of(ports, ("siplb_connections", "siplb_drops_total"))
    procs.stop(a._relay)
    procs.stop(lb)

    if "memory" in phases:
        log("%s  (c) RSS per idle connection, %d connections, a fresh siplb each" % (now(), a.idle_conns))
        for kind in ("tls", "tcp"):
            r = idle_memory(a, work, procs, ports, t, kind)
            mem.append(r)
            if not a.json:
                log("  %s: RSS %d -> %d KB (%d KB after closing them, %d KB with as many open again), "
                    "%.2f KB per connection, opened in %.1f s, gauge %s" % (
                        kind, r["rss_before_kb"], r["rss_after_kb"], r["rss_after_close_kb"],
                        r["rss_after_second_open_kb"], r["kb_per_connection"], r["open_s"],
                        r["siplb_connections_gauge"]))
    failed = sum(r["failed"] + r["unfinished"] for r in runs) + sum(r["errors"] for r in hs)
    out = dict(mode="measure", date=now(), cpus=os.cpu_count(), seconds=a.seconds, rounds=a.rounds, hold_ms=a.hold,
               cpu_per_1000_calls=table, runs=runs, relay=rc, handshakes=hs, idle_memory=mem,
               siplb_metrics=m, uas_retransmissions=uas_retrans(t["uas"]), failed_calls_and_handshakes=failed)
    if a.json:
        log(json.dumps(out, indent=1))
    else:
        log("")
        if table:
            log("siplb CPU ms per 1,000 calls (median of %d rounds; %d CPUs; %s)" % (
                a.rounds, os.cpu_count(), out["date"]))
            head = "%8s" % "calls/s" + "".join("%10s" % tr for tr in transports) + \
                "".join("%10s" % (tr + "/udp") for tr in transports if tr != "udp") + \
                "".join("%12s" % ("relay(%s)" % tr) for tr in transports if tr.startswith("tls")) + "%9s" % "failed"
            log(head)
            for row in table:
                log("%8d" % row["rate"] + "".join("%10s" % row[tr] for tr in transports) +
                    "".join("%10s" % row.get(tr + "/udp") for tr in transports if tr != "udp") +
                    "".join("%12s" % row.get("relay_" + tr) for tr in transports if tr.startswith("tls")) +
                    "%9d" % sum(row[tr + "_failed"] for tr in transports))
            log("relay: %d TLS connections, %d failed" % (rc["tls_connections"], rc["tls_failures"]))
        if hs:
            log("TLS handshakes: " + "; ".join("%d worker(s) %.0f/s at %.3f ms siplb CPU each (%d errors)" % (
                r["workers"], r["handshakes_per_s"], r["siplb_cpu_ms_per_handshake"], r["errors"]) for r in hs))
        if mem:
            log("idle connections: " + "; ".join("%s %.2f KB each" % (r["kind"], r["kb_per_connection"])
                                                 for r in mem))
        log("siplb metrics (non-zero): " + "; ".join("%s %g" % (k.replace("siplb_", ""), v)
                                                     for k, v in m.items() if v))
        log("uas retransmissions: %s" % out["uas_retransmissions"])
    # Exit 1 when a call or a handshake failed (the figures are printed all the same).
    return failed == 0, lblog


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "relay":
        return relay_main(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "hs-client":
        return hs_client_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--siplb", default=os.path.join(ROOT, "target/release/siplb"))
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--reload-at", type=float, help="seconds into the calls to swap the certificate and reload")
    g.add_argument("--measure", action="store_true")
    ap.add_argument("--rate", type=int, default=50, help="--reload-at: calls/s")
    ap.add_argument("--seconds", type=int, default=None, help="seconds of calls per run (6 reload, 10 measure)")
    ap.add_argument("--hold", type=int, default=100, help="ms between ACK and BYE")
    ap.add_argument("--rates", default="500,1000", help="--measure: calls/s")
    ap.add_argument("--transports", default="udp,tcp,tls",
                    help="--measure: of udp, tcp (-t t1), tls (-t t1 through the relay), "
                         "tlsn (-t tn through the relay: a TLS connection and handshake per call)")
    ap.add_argument("--phases", default="calls,handshakes,memory", help="--measure: which of calls, handshakes, memory")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pause", type=float, default=2, help="s between runs")
    ap.add_argument("--hs-workers", default="1,2,4", help="--measure: handshake client processes, rising")
    ap.add_argument("--hs-seconds", type=float, default=5)
    ap.add_argument("--hs-count", type=int, default=20000, help="handshakes at most per worker")
    ap.add_argument("--idle-conns", type=int, default=1000)
    ap.add_argument("--port-offset", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None, help="bound on the whole run, s")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--debug", action="store_true", help="SIPLB_LOG=debug")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    if a.seconds is None:
        a.seconds = 6 if a.reload_at is not None else 10
    if a.reload_at is not None and not 0 < a.reload_at < a.seconds:
        ap.error("--reload-at must be within (0, --seconds)")
    missing = [p for p in ("sipp", "openssl") if not shutil.which(p)]
    if missing:
        log("missing: %s (apt-get install sip-tester openssl)" % " ".join(missing))
        return 2
    if not os.access(a.siplb, os.X_OK):
        log("siplb binary not found: %s (cargo build --release, or --siplb PATH)" % a.siplb)
        return 2
    # Idle connections and handshakes: more descriptors than the usual 1024
    # (siplb inherits the limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, a.idle_conns * 2 + 1024))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    off = a.port_offset
    ports = dict(sip=5060 + off, tls=5061 + off, admin=8060 + off, s1=5081 + off, s2=5082 + off,
                 uac=5070 + off, relay=5090 + off)
    if a.timeout is None:
        if a.measure:
            n = len(a.rates.split(",")) * len(a.transports.split(",")) * a.rounds
            a.timeout = n * (a.seconds * 2 + 30) + 600
        else:
            a.timeout = a.seconds * 2 + 60
    work = tempfile.mkdtemp(prefix="siplb-tls-")
    procs = Procs()
    ok = False
    lblog = os.path.join(work, "siplb.log")

    def on_alarm(*_):
        raise Timeout("the whole run (--timeout %g s)" % a.timeout)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_alarm)
    signal.alarm(int(a.timeout))
    log("%s  bench/tls.py %s; siplb %s; work folder %s" % (now(), " ".join(sys.argv[1:]), a.siplb, work))
    try:
        if a.measure:
            ok, lblog = measure_mode(a, work, procs, ports)
        else:
            ok, lblog = reload_mode(a, work, procs, ports)
    except (Timeout, Failed, OSError, subprocess.TimeoutExpired, ssl.SSLError) as e:
        log("ERROR: %r" % e)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        procs.stop_all()
    if not ok:
        log("logs: %s" % work)
        log("siplb log tail:\n" + tail(lblog, 15))
    elif not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    log("result: %s" % ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
