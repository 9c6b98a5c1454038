#!/usr/bin/env bash
# Instructions per call of the whole balancer process (socket threads, core,
# timers, tick, allocator: everything in user space), with SIPp's uac ->
# siplb -> uas over loopback UDP, counted by valgrind's callgrind: repeatable
# whatever else the machine does, unlike CPU time (this machine has no
# hardware counters for `perf stat`). Two runs, N and 2N calls, so that
# start-up and stop cancel out: the figure is (Ir(2N) - Ir(N)) / N.
# Needs valgrind and sip-tester. Valgrind is ~50x slower: keep RATE low.
# Usage: bench/callgrind-siplb.sh [BIN] [N=1500] [RATE=300]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
n=${2:-1500}
rate=${3:-300}
if [ -z "$bin" ]; then
  cargo build -q --release -p siplb
  bin=$PWD/target/release/siplb
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
. bench/sipp-bed.sh
bed_config "$dir" callgrind-siplb 5360 8360 5381

# One run of `calls` calls; prints the process's total instructions.
run() {
  local calls=$1 uas x
  uas=$(bed_uas "$dir" 5381)
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" \
    "$bin" balancer --config "$dir/siplb.toml" > "$dir/siplb.log" 2>&1 &
  x=$!
  bed_ready 8360 60 || true
  timeout 300 sipp -sn uac 127.0.0.1:5360 -i 127.0.0.1 -p 5370 -r "$rate" -m "$calls" \
    -default_behaviors all,-abortunexp -nostdin > "$dir/uac.out" 2>&1 || true
  kill -TERM "$x"
  wait "$x" || true
  kill "$uas" 2> /dev/null || true
  # Gone before the next run binds its port (at most 5 s).
  for _ in $(seq 50); do
    kill -0 "$uas" 2> /dev/null || break
    sleep 0.1
  done
  local ok failed
  read -r ok failed < <(bed_totals "$dir/uac.out")
  if [ "${ok:-0}" != "$calls" ] || [ "${failed:-1}" != 0 ]; then
    echo "run of $calls calls: ok=${ok:-?} failed=${failed:-?} (see $dir)" >&2
    trap - EXIT
    exit 1
  fi
  grep -h '^summary:\|^totals:' "$dir"/cg.out* | head -1 | awk '{print $2}'
  rm -f "$dir"/cg.out*
}

a=$(run "$n")
b=$(run $((2 * n)))
echo "instructions per call, whole process: $(((b - a) / n)) (Ir $a for $n calls, $b for $((2 * n)); $rate calls/s)"
