#!/usr/bin/env bash
# Instructions per message for the SIP layer, counted by valgrind's callgrind:
# repeatable whatever else the machine does. Needs valgrind (apt-get install valgrind).
# Usage: bench/callgrind-sip.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
cargo build -q --release -p sip --example parse_loop
bin=target/release/examples/parse_loop
count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 | awk '/refs/ {gsub(",", "", $NF); print $NF}'; }
printf '%-8s %s\n' mode instructions/message
for mode in parse validate forward frame; do
  base=$(count 1 "$mode")
  total=$(count $((n + 1)) "$mode")
  printf '%-8s %d\n' "$mode" $(((total - base) / n))
done
