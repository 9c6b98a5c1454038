#!/usr/bin/env bash
# Instructions per call in the routing core: INVITE, 180, 200, ACK, BYE, 200
# through Router::on_message (crates/balancer/examples/call_loop.rs, no
# sockets), counted by valgrind's callgrind inside on_message only:
# repeatable whatever else the machine does. Needs valgrind.
# Usage: bench/callgrind-router.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
cargo build -q --release -p balancer --example call_loop
bin=target/release/examples/call_loop
total=$(valgrind --tool=callgrind --toggle-collect='balancer::router::Router::on_message' \
  --callgrind-out-file=/dev/null "$bin" "$n" route 2>&1 | awk '/refs/ {gsub(",", "", $NF); print $NF}')
echo "instructions per call in the core: $((total / n)) ($total for $n calls)"
