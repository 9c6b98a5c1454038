#!/usr/bin/env bash
# A profile-guided (PGO) release build of siplb. Three steps:
#   1. build an instrumented binary (-Cprofile-generate) in target/pgo-gen;
#   2. train it: SIPp's uac -> siplb -> SIPp's uas over loopback UDP, CALLS
#      calls at RATE calls/s (policy static, one server), stopped by SIGTERM
#      so the profile is written; every call must succeed;
#   3. merge the profile (llvm-profdata of the toolchain's own LLVM) and build
#      again with -Cprofile-use in target/pgo-use; copy the binary to OUT.
# The training covers the UDP INVITE/ACK/BYE path only: code it does not run
# (TCP, TLS, WebSocket, REGISTER) is laid out as cold, still correct, perhaps
# slower. docs/benchmarks.md ("Profile-guided layout") has what it measured.
# Needs sip-tester, curl and `rustup component add llvm-tools`.
# Usage: bench/pgo-build.sh [OUT=target/pgo/siplb] [CALLS=40000] [RATE=2000]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/pgo/siplb}
calls=${2:-40000}
rate=${3:-2000}

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  echo "pgo-build: no $profdata; run: rustup component add llvm-tools" >&2
  exit 2
fi
for tool in sipp curl; do
  command -v "$tool" > /dev/null || {
    echo "pgo-build: $tool is required" >&2
    exit 2
  }
done

dir=$(mktemp -d)
uas=
x=
cleanup() {
  [ -n "$x" ] && kill "$x" 2> /dev/null || true
  [ -n "$uas" ] && kill "$uas" 2> /dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# 1. Instrumented. Build scripts are instrumented too and leave their
# profiles in target/pgo-gen/build-profiles (a fixed path: RUSTFLAGS are part
# of cargo's fingerprint); only the training run's are used.
RUSTFLAGS="-Cprofile-generate=$PWD/target/pgo-gen/build-profiles" \
  cargo build -q --release -p siplb --target-dir target/pgo-gen

# 2. Training.
. bench/sipp-bed.sh
bed_config "$dir" pgo-build 5460 8460 5481
uas=$(bed_uas "$dir" 5481)
LLVM_PROFILE_FILE="$dir/train/siplb-%p-%m.profraw" \
  target/pgo-gen/release/siplb balancer --config "$dir/siplb.toml" > "$dir/siplb.log" 2>&1 &
x=$!
bed_ready 8460 || {
  echo "pgo-build: the instrumented balancer did not become ready:" >&2
  cat "$dir/siplb.log" >&2
  exit 1
}
timeout $((calls / rate + 120)) sipp -sn uac 127.0.0.1:5460 -i 127.0.0.1 -p 5470 \
  -r "$rate" -m "$calls" -default_behaviors all,-abortunexp -nostdin > "$dir/uac.out" 2>&1 || true
kill -TERM "$x"
wait "$x" || true
x=
kill "$uas" 2> /dev/null || true
uas=
read -r ok failed < <(bed_totals "$dir/uac.out")
if [ "${ok:-0}" != "$calls" ] || [ "${failed:-1}" != 0 ]; then
  echo "pgo-build: training run: ok=${ok:-?} failed=${failed:-?} of $calls" >&2
  exit 1
fi
ls "$dir"/train/*.profraw > /dev/null 2>&1 || {
  echo "pgo-build: the training run wrote no profile" >&2
  exit 1
}

# 3. Merged and used.
"$profdata" merge -o "$dir/siplb.profdata" "$dir"/train/*.profraw
RUSTFLAGS="-Cprofile-use=$dir/siplb.profdata -Cllvm-args=-pgo-warn-missing-function=false" \
  cargo build -q --release -p siplb --target-dir target/pgo-use
mkdir -p "$(dirname "$out")"
cp target/pgo-use/release/siplb "$out"
echo "pgo-build: $out (trained on $calls calls at $rate/s, 0 failed)"
