"""Pieces the bench scripts share: stopping what they started, by PID, waits
bounded in time, and reading SIPp's statistics file."""
import os
import shutil
import signal
import subprocess
import time


def stop_all(procs):
    """SIGTERM every process still running, then wait (5 s each, SIGKILL after)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()


def sipp_totals(stat_csv):
    """The last row of SIPp's -trace_stat file as {column: value}."""
    rows = [line.strip().split(";") for line in open(stat_csv) if line.strip()]
    return dict(zip(rows[0], rows[-1]))


class Timeout(Exception):
    """A wait ran past its bound."""


class Deadline:
    """The run's overall bound; every wait takes the earlier of its own
    bound and this one."""

    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()

    def upto(self, seconds):
        return min(time.monotonic() + seconds, self.end)


def log(*a):
    print(*a, flush=True)


def leave_work(work, ok, keep=False):
    """A run's working directory at its end: kept and named when the run
    failed (or `keep`), else removed."""
    if keep or not ok:
        log("logs in %s" % work)
    else:
        shutil.rmtree(work, ignore_errors=True)


def wait_until(pred, until, step=0.05, what="condition"):
    """Calls pred() until it is truthy (returned) or `until` (monotonic) passes."""
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= until:
            raise Timeout(what)
        time.sleep(step)


class Procs:
    """The processes a script started, each stopped by its PID."""

    def __init__(self):
        self.procs = []  # (name, Popen)

    def start(self, name, argv, logpath, env=None, **kw):
        """Starts argv in a session of its own, its output appended to logpath."""
        with open(logpath, "ab") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env,
                                 start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def stop(self, p, grace=5):
        """SIGTERM by PID, SIGKILL after `grace` s."""
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = [(n, q) for (n, q) in self.procs if q is not p]

    def stop_all(self, grace=3):
        """Every process still listed, the last started first (phones
        unregister while siplb and the servers still run)."""
        for _, p in reversed(list(self.procs)):
            self.stop(p, grace)
