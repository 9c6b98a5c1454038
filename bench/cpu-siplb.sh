#!/usr/bin/env bash
# CPU of siplb alone per 1,000 calls, with SIPp's uac -> siplb -> uas over
# loopback UDP (policy static, one server: the set-up of callgrind-siplb.sh),
# from utime + stime in /proc/PID/stat over the whole run, with the minor
# page faults of the run and whether the process has transparent huge pages
# (THP_enabled in /proc/PID/status), and the context switches per call of each
# of its threads (voluntary + involuntary, /proc/PID/task/*/status; on stderr
# by thread name, the sum as ctx_per_call). Quicker than floor.sh (no relay, no
# Kamailio), for interleaved before/after pairs; compare builds only within
# one series of runs (this machine's speed moves by +-25 %).
# With PROFILE=FILE, `perf record -F 2000 -g` of seconds 3 to SECONDS-2 goes
# to FILE. Environment variables set for this script reach siplb
# (e.g. MIMALLOC_ALLOW_THP=1).
# Needs sip-tester (and linux-perf for PROFILE).
# Usage: bench/cpu-siplb.sh BIN [RATE=3000] [SECONDS=15]
set -euo pipefail
bin=${1:?usage: bench/cpu-siplb.sh BIN [RATE] [SECONDS]}
rate=${2:-3000}
secs=${3:-15}
dir=$(mktemp -d)
uas=
x=
cleanup() {
  [ -n "$x" ] && kill -TERM "$x" 2> /dev/null || true
  if [ -n "$uas" ]; then
    kill "$uas" 2> /dev/null || true
    # Gone before the next run binds its port (at most 5 s).
    for _ in $(seq 50); do
      kill -0 "$uas" 2> /dev/null || break
      sleep 0.1
    done
  fi
  rm -rf "$dir"
}
trap cleanup EXIT
. "$(dirname "$0")/sipp-bed.sh"
bed_config "$dir" cpu-siplb 5360 8360 5381
uas=$(bed_uas "$dir" 5381)
"$bin" balancer --config "$dir/siplb.toml" > "$dir/siplb.log" 2>&1 &
x=$!
bed_ready 8360 || {
  echo "cpu-siplb: the balancer did not become ready:" >&2
  cat "$dir/siplb.log" >&2
  exit 1
}
thp=$(awk '/^THP_enabled:/ {print $2}' "/proc/$x/status")
# One line per thread: TID NAME SWITCHES.
ctx_snap() {
  local t
  for t in "/proc/$x/task/"*; do
    printf '%s %s %s\n' "${t##*/}" "$(tr -d ' ' < "$t/comm")" \
      "$(awk '/ctxt_switches/ {s += $2} END {print s + 0}' "$t/status")"
  done 2> /dev/null
}
ctx0=$(ctx_snap)
read -r t0 f0 < <(awk '{print $14 + $15, $10}' "/proc/$x/stat")
timeout $((secs + 30)) sipp -sn uac 127.0.0.1:5360 -i 127.0.0.1 -p 5370 -r "$rate" \
  -m $((rate * secs)) -default_behaviors all,-abortunexp -nostdin > "$dir/uac.out" 2>&1 &
u=$!
if [ -n "${PROFILE:-}" ]; then
  sleep 3
  perf record -F 2000 -g -o "$PROFILE" -p "$x" -- sleep $((secs - 5)) > /dev/null 2>&1 || true
fi
wait "$u" || true
read -r t1 f1 < <(awk '{print $14 + $15, $10}' "/proc/$x/stat")
ctx1=$(ctx_snap)
# Per thread name (tokio's workers summed), and in all, per call.
ctx=$(awk -v n=$((rate * secs)) 'NR == FNR {a[$1] = $3; next}
  {d = $3 - ($1 in a ? a[$1] : 0); by[$2] += d; all += d}
  END {for (k in by) printf "%s=%.3f ", k, by[k] / n > "/dev/stderr"
    printf "\n" > "/dev/stderr"; printf "%.3f", all / n}' \
  <(echo "$ctx0") <(echo "$ctx1"))
read -r ok failed < <(bed_totals "$dir/uac.out")
tck=$(getconf CLK_TCK)
cpu=$(awk -v a="$t0" -v b="$t1" -v t="$tck" -v n=$((rate * secs)) \
  'BEGIN {printf "%.1f", (b - a) * 1000 / t * 1000 / n}')
n=$((rate * secs))
if ! [ "${ok:-0}" -ge $((n - n / 100)) ] 2> /dev/null || [ "${failed:-1}" != 0 ]; then
  # No figure from a run that failed calls or did not carry them (a port
  # still held by an earlier run's uas, an overloaded machine); SIPp's last
  # count may miss a few calls still ending, hence 99 %.
  echo "cpu-siplb: ok=${ok:-?} failed=${failed:-?} of $n calls; no figure" >&2
  exit 1
fi
echo "rate=$rate ok=$ok failed=$failed cpu_ms_per_1000_calls=$cpu minor_faults=$((f1 - f0)) thp_enabled=${thp:-?} ctx_per_call=$ctx"
