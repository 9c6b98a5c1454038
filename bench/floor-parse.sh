#!/usr/bin/env bash
# Where siplb's CPU per call goes beyond the floor, on the real CPU: the harness of
# ../shared/bench/floor/floor.sh (SIPp uac -> X -> one SIPp uas over loopback UDP, CPU =
# utime + stime of X over the run), with X in turn
#   relay     bench/relay.c, one recvfrom/sendto per datagram (floor.sh's floor)
#   rust      crates/sip/examples/parse_relay.rs `none`: the same relay in Rust (std sockets)
#   parse     the same, with `sip::Message::parse` of every datagram
#   validate  the same, with `Message::validate` of every request as well (what siplb
#             checks of a message before it routes it), the messages relayed unchanged
#   siplb     siplb, one server, policy static (floor.sh's config)
# so that the difference between two lines is what one layer costs: the Rust shell, the
# parse, the grammar check, and siplb's routing state (Via, Record-Route, transactions,
# sessions, timers). Prints one line per run, like floor.sh, and a table of the medians
# and of each median over the relay's. With SIPLB1=1, siplb also runs with `udp_sockets = 1`
# (line siplb1: one socket, one thread, every message of a call on it) after the default
# (two sockets, SO_REUSEPORT: the client's and the server's datagrams may land on different
# threads). Loopback only; every process stopped by its PID.
# Needs sip-tester, gcc, cargo.
# Usage: bench/floor-parse.sh SIPLB_BIN [RATE=3000] [SECONDS=10] [ROUNDS=3]
set -u
cd "$(dirname "$0")/.."
SIPLB=$(realpath "${1:?usage: bench/floor-parse.sh SIPLB_BIN [RATE] [SECONDS] [ROUNDS]}")
RATE=${2:-3000}
DUR=${3:-10}
ROUNDS=${4:-3}
ROOT=$PWD
cargo build -q --release -p sip --example parse_relay || exit 1
PR=$ROOT/target/release/examples/parse_relay
W=$(mktemp -d)
UAS=
X=
cleanup() {
  [ -n "$X" ] && kill "$X" 2> /dev/null
  [ -n "$UAS" ] && kill "$UAS" 2> /dev/null
  rm -rf "$W"
}
trap cleanup EXIT
cd "$W" || exit 1
gcc -O2 -o relay "$ROOT/bench/relay.c" || exit 1
head -c 32 /dev/urandom | base64 > key
cat > one.toml << T
[sip]
listen = ["127.0.0.1:5160"]
transports = ["udp"]
[routing]
secret = "floor-bench-secret-0123456789abcdef"
policy = "static"
[perf]
key_file = "key"
[admin]
listen = "127.0.0.1:8160"
[[servers]]
id = "s1"
address = "127.0.0.1:5181"
capacity = 1000
T
sed 's/^transports = \["udp"\]$/&\nudp_sockets = 1/' one.toml > one1.toml
cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2> /dev/null || echo 0; }
run() { # who cmd...
  local who=$1 t0 t1 ok fail
  shift
  # `sipp -bg` exits non-zero once the background copy runs; its PID is printed.
  sipp -sn uas -i 127.0.0.1 -p 5181 -rsa 127.0.0.1:5160 -nostdin -bg > uas.bg 2>&1 || true
  UAS=$(grep -o 'PID=\[[0-9]*\]' uas.bg | tr -dc 0-9)
  sleep 0.3
  "$@" > "$who.log" 2>&1 &
  X=$!
  sleep 1.5
  t0=$(cpu "$X")
  timeout $((DUR + 40)) sipp -sn uac 127.0.0.1:5160 -i 127.0.0.1 -p 5170 -r "$RATE" \
    -m $((RATE * DUR)) -default_behaviors all,-abortunexp -nostdin > "$who.out" 2>&1
  t1=$(cpu "$X")
  ok=$(awk '/Successful call/ {print $NF}' "$who.out" | tail -1)
  fail=$(awk '/Failed call/ {print $NF}' "$who.out" | tail -1)
  kill "$X" "$UAS" 2> /dev/null
  wait "$X" 2> /dev/null
  X=
  # The uas gone before the next run binds its port (at most 5 s).
  for _ in $(seq 50); do
    kill -0 "$UAS" 2> /dev/null || break
    sleep 0.1
  done
  UAS=
  sleep 1
  python3 -c "
ok = int('${ok:-0}' or 0)
ms = ($t1 - $t0) * 10 / (ok / 1000) if ok else float('nan')
print(f'$who: ok={ok} failed=${fail:-?} total={ms:.1f} ms per 1000 calls')" | tee -a results
}
for _ in $(seq "$ROUNDS"); do
  run relay ./relay 5160 5181 5170 0
  run rust "$PR" 5160 5181 5170 none
  run parse "$PR" 5160 5181 5170 parse
  run validate "$PR" 5160 5181 5170 validate
  run siplb "$SIPLB" balancer --config one.toml
  [ -n "${SIPLB1:-}" ] && run siplb1 "$SIPLB" balancer --config one1.toml
done
python3 - << 'PY'
import re, statistics
runs = {}
for line in open("results"):
    m = re.match(r"(\w+): ok=(\d+) failed=(\S+) total=(\S+)", line)
    if m and m.group(3) == "0":
        runs.setdefault(m.group(1), []).append(float(m.group(4)))
relay = statistics.median(runs["relay"]) if runs.get("relay") else None
print("X, runs with 0 failed, median CPU ms per 1,000 calls, median / relay's median")
for who in ["relay", "rust", "parse", "validate", "siplb", "siplb1"]:
    if who == "siplb1" and who not in runs:
        continue
    v = runs.get(who, [])
    if not v:
        print(f"{who}: no run with 0 failed")
        continue
    med = statistics.median(v)
    ratio = f"{med / relay:.2f}" if relay else "-"
    print(f"{who}: {len(v)} runs, {med:.1f} ms, {ratio}")
PY
