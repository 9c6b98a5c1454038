#!/usr/bin/env bash
# Builds the Debian package: a release build of siplb, its man pages and
# shell completions written by that very binary (`siplb generate`), then
# cargo-deb (installed with `cargo install cargo-deb --locked` if missing).
# Prints the path of the .deb on its last line.
#
#   bash deploy/build-deb.sh        # the package: target/debian/siplb_<version>-1_<arch>.deb
#   bash deploy/build-deb.sh --dev  # the same from the debug build (stripped), for the
#                                   # CI smoke test: the build `cargo test` already made
set -euo pipefail
profile=release
case "${1:-}" in
    "") ;;
    --dev) profile=dev ;;
    *) echo "usage: $0 [--dev]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

if ! cargo deb --version >/dev/null 2>&1; then
    echo "== cargo install cargo-deb --locked"
    cargo install cargo-deb --locked
fi

echo "== cargo build --profile $profile --locked -p siplb"
cargo build --profile "$profile" --locked -p siplb
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
if [ "$profile" = dev ]; then bin="$target_dir/debug/siplb"; else bin="$target_dir/release/siplb"; fi

echo "== man pages and completions from $bin"
rm -rf deploy/debian/generated
"$bin" generate man deploy/debian/generated/man
gzip -9n deploy/debian/generated/man/*.1
"$bin" generate completions deploy/debian/generated/completions

echo "== cargo deb --no-build --profile $profile -p siplb"
if [ "$profile" = dev ]; then
    cargo deb --no-build --locked --profile dev --strip --fast -p siplb
else
    cargo deb --no-build --locked -p siplb
fi
