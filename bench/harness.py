"""Pieces the bench scripts share: stopping what they started, by PID, and
reading SIPp's statistics file."""
import subprocess


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
