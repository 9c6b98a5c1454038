#!/usr/bin/env python3
"""Runs the seeded simulation grid (crates/balancer/examples/sim.rs) and
writes its table and two SVG plots for docs/balancing.md, with no plotting
library: docs/img/sim_p99_vs_load.svg (p99 against load per policy, polls
every 500 ms, both pools) and docs/img/sim_share.svg (the slow server's
per-second share over time, N=2, 85 %, 500 ms).

    python3 bench/sim_plot.py [--seeds 3] [--calls 100000]
"""
import argparse, csv, io, math, os, subprocess, tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = {"adaptive": "#1b7837", "patent": "#d73027", "round-robin": "#999999", "p2c": "#2166ac", "static": "#e08214"}


def svg_lines(path, title, panels, xlabel, ylabel, logy, xticks, yticks):
    """panels: [(subtitle, {policy: [(x, y)]})] side by side."""
    pw, ph, ml, mt, mb = 420, 300, 60, 40, 45
    w = pw * len(panels) + 20
    h = ph + mt + mb + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{title}</text>']
    ys = [y for _, series in panels for pts in series.values() for _, y in pts if y > 0]
    lo, hi = (min(yticks), max(yticks))
    tr = (lambda v: math.log10(max(v, lo))) if logy else (lambda v: v)
    x0, x1 = min(xticks), max(xticks)
    for k, (sub, series) in enumerate(panels):
        ox = k * pw + ml
        iw, ih = pw - ml - 20, ph - 20
        X = lambda x: ox + (x - x0) / (x1 - x0) * iw
        Y = lambda y: mt + ih - (tr(min(max(y, lo), hi)) - tr(lo)) / (tr(hi) - tr(lo)) * ih
        out.append(f'<text x="{ox + iw / 2}" y="{mt - 8}" text-anchor="middle">{sub}</text>')
        out.append(f'<rect x="{ox}" y="{mt}" width="{iw}" height="{ih}" fill="none" stroke="#444"/>')
        for t in yticks:
            out.append(f'<line x1="{ox}" x2="{ox + iw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{ox - 4}" y="{Y(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
        for t in xticks:
            out.append(f'<text x="{X(t):.1f}" y="{mt + ih + 14}" text-anchor="middle">{t:g}</text>')
        out.append(f'<text x="{ox + iw / 2}" y="{mt + ih + 30}" text-anchor="middle">{xlabel}</text>')
        if k == 0:
            out.append(f'<text x="14" y="{mt + ih / 2}" text-anchor="middle" transform="rotate(-90 14 {mt + ih / 2})">{ylabel}</text>')
        for name, pts in series.items():
            d = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{COLORS[name]}" stroke-width="1.6"/>')
            if len(pts) < 12:
                out += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.5" fill="{COLORS[name]}"/>' for x, y in pts]
    lx = 20
    for name, c in COLORS.items():
        if any(name in s for _, s in panels):
            out.append(f'<rect x="{lx}" y="{h - 18}" width="12" height="4" fill="{c}"/><text x="{lx + 16}" y="{h - 13}">{name}</text>')
            lx += 100
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=100_000)
    a = ap.parse_args()
    series_file = tempfile.mktemp(suffix=".csv")
    res = subprocess.run(["cargo", "run", "-q", "--release", "-p", "balancer", "--example", "sim", "--",
                          "--seeds", str(a.seeds), "--calls", str(a.calls), "--series", series_file],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    img = os.path.join(ROOT, "docs/img")
    os.makedirs(img, exist_ok=True)
    with open(os.path.join(img, "sim_results.csv"), "w") as f:
        f.write(res.stdout)
    panels = []
    for pool in ("N=2", "N=8"):
        series = {}
        for r in rows:
            if r["pool"] == pool and r["poll_ms"] == "500":
                series.setdefault(r["policy"], []).append((float(r["load"]), float(r["p99_ms"])))
        panels.append((f"{pool}, polls every 500 ms", series))
    svg_lines(os.path.join(img, "sim_p99_vs_load.svg"), "Simulated call-setup p99 (ms, log scale) against load",
              panels, "offered load (fraction of pool capacity)", "p99 ms", True,
              [0.5, 0.6, 0.7, 0.8, 0.9, 0.95], [10, 100, 1000, 10000, 100000])
    share = {}
    for line in open(series_file):
        name, sec, v = line.strip().split(",")
        share.setdefault(name, []).append((int(sec), float(v)))
    os.unlink(series_file)
    panels = [(f"{n}", {n: share[n]}) for n in ("patent", "adaptive")]
    svg_lines(os.path.join(img, "sim_share.svg"), "Share of new calls sent to the slow server (capacity 0.5) per second, N=2, 85 % load, 500 ms polls",
              panels, "seconds", "share", False, [0, 30, 60, 90, 120], [0, 0.25, 0.5, 0.75, 1])
    # Markdown tables for the docs.
    for pool in ("N=2", "N=8"):
        print(f"\n{pool}: p99 ms at polls 100 / 500 / 2000 ms (refused % at 500 ms; share sd excess at 500 ms)\n")
        print("| policy | " + " | ".join(f"ρ={l}" for l in ("0.5", "0.7", "0.85", "0.95")) + " |")
        print("|---|" + "---:|" * 4)
        for pol in ("adaptive", "patent", "p2c", "static", "round-robin"):
            cells = []
            for load in ("0.5", "0.7", "0.85", "0.95"):
                by = {r["poll_ms"]: r for r in rows if r["pool"] == pool and r["policy"] == pol and r["load"] == load}
                f = lambda v: f"{float(v):.0f}" if float(v) < 10000 else f"{float(v) / 1000:.0f} s"
                c = " / ".join(f(by[p]["p99_ms"]) for p in ("100", "500", "2000"))
                extra = []
                if float(by["500"]["refused_percent"]) > 0:
                    extra.append(f"{float(by['500']['refused_percent']):.1f} % refused")
                if float(by["500"]["share_sd_excess"]) > 0.02:
                    extra.append(f"sd {float(by['500']['share_sd_excess']):.2f}")
                cells.append(c + (f" ({', '.join(extra)})" if extra else ""))
            print(f"| {pol} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
