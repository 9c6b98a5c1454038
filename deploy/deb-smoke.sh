#!/usr/bin/env bash
# Smoke test of the Debian package on this machine (as root): build it
# (deploy/build-deb.sh), install it with dpkg -i, check what it installed,
# then purge it and check that nothing is left. Exit 0 only when every
# check held; the last line says `deb-smoke: N passed, 0 failed`. Changes the
# system: run it on a CI or throw-away machine, not where siplb is installed
# for real (it refuses then).
#
#   bash deploy/deb-smoke.sh              # builds the package (release build)
#   bash deploy/deb-smoke.sh --dev        # from the debug build (what .ci/run does)
#   bash deploy/deb-smoke.sh PATH.deb     # an already built package
set -euo pipefail
cd "$(dirname "$0")/.."

passed=0
fail() { echo "deb-smoke: FAIL: $*" >&2; echo "deb-smoke: $passed passed, 1 failed"; exit 1; }
# check WHAT COMMAND...: runs COMMAND, fails the test with WHAT unless it succeeds.
check() {
    local what=$1; shift
    if "$@"; then passed=$((passed + 1)); echo "ok: $what"; else fail "$what"; fi
}

[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"
if dpkg -s siplb >/dev/null 2>&1; then
    fail "siplb is already installed here; this test would purge it"
fi

if [ $# -ge 1 ] && [ "$1" != --dev ]; then
    deb=$1
else
    start=$(date +%s)
    log=$(mktemp)
    bash deploy/build-deb.sh "$@" | tee "$log"
    deb=$(tail -n1 "$log")
    rm -f "$log"
    echo "== built $deb in $(( $(date +%s) - start )) s"
fi
[ -f "$deb" ] || fail "no package at $deb"

cleanup() { dpkg --purge siplb >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== dpkg -i $deb"
check "dpkg -i" dpkg -i "$deb"

echo "== what it installed"
siplb --version
check "siplb --version" sh -c 'siplb --version | grep -q "^siplb "'
check "the siplb user" sh -c "getent passwd siplb >/dev/null"
check "agent.key is root:siplb 640" sh -c '[ "$(stat -c %U:%G:%a /etc/siplb/agent.key)" = root:siplb:640 ]'
check "routing.secret is root:siplb 640" sh -c '[ "$(stat -c %U:%G:%a /etc/siplb/routing.secret)" = root:siplb:640 ]'
check "balancer.toml is a conffile" grep -qx /etc/siplb/balancer.toml /var/lib/dpkg/info/siplb.conffiles
for f in /usr/share/man/man1/siplb.1.gz /usr/share/man/man1/siplb-balancer.1.gz \
         /usr/share/bash-completion/completions/siplb /usr/share/zsh/vendor-completions/_siplb \
         /usr/share/fish/vendor_completions.d/siplb.fish \
         /usr/lib/systemd/system/siplb-balancer.service /usr/lib/systemd/system/siplb-agent.service; do
    check "$f" test -s "$f"
done
if command -v man >/dev/null; then
    check "man -w siplb-balancer" sh -c 'man -w siplb-balancer | grep -q siplb-balancer.1'
fi
check "the man page has --check" sh -c "zcat /usr/share/man/man1/siplb-balancer.1.gz | grep -q -- 'check'"
check "the bash completion knows balancer" grep -q balancer /usr/share/bash-completion/completions/siplb
check "Type=notify" grep -q '^Type=notify' /usr/lib/systemd/system/siplb-balancer.service
if command -v systemd-analyze >/dev/null; then
    for u in siplb-balancer siplb-agent; do
        check "systemd-analyze verify $u" systemd-analyze verify "/usr/lib/systemd/system/$u.service"
    done
fi

echo "== siplb balancer --check --config /etc/siplb/balancer.toml (as the siplb user)"
out=$(setpriv --reuid=siplb --regid=siplb --init-groups siplb balancer --check --config /etc/siplb/balancer.toml) \
    || fail "check of the shipped config: $out"
echo "$out"
check "the shipped config is OK" sh -c "case '$out' in OK*) ;; *) exit 1;; esac"
# A bad config: exit 2, the field named.
bad=$(mktemp -d)
sed 's/"127.0.0.1:5082"/"127.0.0.1:99999"/' /etc/siplb/balancer.toml > "$bad/balancer.toml"
cp /etc/siplb/agent.key /etc/siplb/routing.secret "$bad/"
set +e
err=$(siplb balancer --check --config "$bad/balancer.toml" 2>&1)
rc=$?
set -e
rm -rf "$bad"
echo "$err"
check "a bad config exits 2" test "$rc" = 2
check "the error names servers[1].address" sh -c "echo '$err' | grep -q 'servers\[1\]\.address: '"

echo "== dpkg --purge siplb"
trap - EXIT
check "dpkg --purge" dpkg --purge siplb
check "no siplb user left" sh -c '! getent passwd siplb >/dev/null'
check "no siplb group left" sh -c '! getent group siplb >/dev/null'
check "no /etc/siplb left" test ! -e /etc/siplb
check "no /usr/bin/siplb left" test ! -e /usr/bin/siplb
echo "deb-smoke: $passed passed, 0 failed"
