#!/usr/bin/env bash
# A SIP server killed (SIGKILL) and restarted under load, on loopback only:
# two `sipp -sn uas` (5081, 5082), two synthetic agents, siplb with
# examples/local.toml, SIPp's uac at RATE calls/s for DURATION seconds; the
# uas on 5081 is killed at KILL_AT s and started again at RESTART_AT s.
# Prints SIPp's successful/failed counts and the balancer's per-server view.
# Every process is started here and stopped by its PID.
# Usage: bench/failover.sh [RATE=500] [DURATION=60] [KILL_AT=20] [RESTART_AT=40]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-500}; duration=${2:-60}; kill_at=${3:-20}; restart_at=${4:-40}
siplb=target/release/siplb
[ -x "$siplb" ] || cargo build -q --release -p siplb
work=$(mktemp -d /tmp/siplb-failover-XXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
$siplb agent --listen 127.0.0.1:7071 --key-file examples/agent.key --synthetic 'cpu=10%,mem=1GB' 2>>"$work/log" & pids+=($!)
$siplb agent --listen 127.0.0.1:7072 --key-file examples/agent.key --synthetic 'cpu=10%,mem=1GB' 2>>"$work/log" & pids+=($!)
sipp -sn uas -i 127.0.0.1 -p 5081 -nostdin -timeout $((duration + 60)) >/dev/null 2>&1 & victim=$!; pids+=($victim)
sipp -sn uas -i 127.0.0.1 -p 5082 -nostdin -timeout $((duration + 60)) >/dev/null 2>&1 & pids+=($!)
$siplb balancer --config examples/local.toml 2>>"$work/log" & pids+=($!)
sleep 2
( sleep "$kill_at"; kill -KILL "$victim"; echo "killed uas 5081 at ${kill_at}s";
  sleep $((restart_at - kill_at));
  sipp -sn uas -i 127.0.0.1 -p 5081 -nostdin -timeout $((duration + 60)) >/dev/null 2>&1 & echo $! > "$work/restarted"; echo "restarted uas 5081 at ${restart_at}s" ) &
timer=$!
sipp -sn uac 127.0.0.1:5060 -i 127.0.0.1 -p 5070 -nostdin -r "$rate" -m $((rate * duration)) -timeout $((duration + 60)) \
  -trace_stat -stf "$work/stat.csv" -fd 5 >"$work/uac.out" 2>&1 || true
wait $timer || true
if [ -f "$work/restarted" ]; then pids+=("$(cat "$work/restarted")"); fi
python3 - "$work/stat.csv" <<'PY'
import sys
rows = [l.strip().split(";") for l in open(sys.argv[1]) if l.strip()]
d = dict(zip(rows[0], rows[-1]))
keys = ["SuccessfulCall(C)", "FailedCall(C)", "Retransmissions(C)"] + [k for k in rows[0] if k.startswith("Failed") and k.endswith("(C)") and d.get(k) not in ("0", "")]
print({k: d[k] for k in dict.fromkeys(keys)})
# Calls per 5 s window, from the periodic rows.
cols = rows[0]
ok_p = cols.index("SuccessfulCall(P)"); fail_p = cols.index("FailedCall(P)")
print("per 5 s: successful", [r[ok_p] for r in rows[1:]], "failed", [r[fail_p] for r in rows[1:]])
PY
$siplb status
