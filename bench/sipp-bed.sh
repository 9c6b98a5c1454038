# The bed of bench/callgrind-siplb.sh, bench/cpu-siplb.sh and bench/pgo-build.sh:
# one balancer (policy static, one server) between SIPp's uac and SIPp's uas
# over loopback UDP. Sourced, not run; it defines:
#   bed_config DIR NAME SIP_PORT ADMIN_PORT SERVER_PORT
#       writes DIR/key and DIR/siplb.toml (NAME goes into the secrets)
#   bed_uas DIR SERVER_PORT
#       starts SIPp's uas in the background; prints its PID
#   bed_ready ADMIN_PORT [SECONDS=30]
#       waits for the balancer's /readyz; status 1 if it never answers
#   bed_totals FILE
#       prints "OK FAILED" from SIPp's statistics in FILE ("? ?" when absent)

bed_config() {
  local dir=$1 name=$2 sip=$3 admin=$4 server=$5
  echo "$name-key-0123456789abcdef" > "$dir/key"
  cat > "$dir/siplb.toml" << EOF2
[sip]
listen = ["127.0.0.1:$sip"]
transports = ["udp"]
[routing]
secret = "$name-secret-0123456789abcdef"
policy = "static"
[perf]
key_file = "key"
[admin]
listen = "127.0.0.1:$admin"
[[servers]]
id = "s1"
address = "127.0.0.1:$server"
capacity = 1000
EOF2
}

bed_uas() {
  # `sipp -bg` exits non-zero once the background copy runs; its PID is printed.
  sipp -sn uas -i 127.0.0.1 -p "$2" -nostdin -bg > "$1/uas.bg" 2>&1 || true
  grep -o 'PID=\[[0-9]*\]' "$1/uas.bg" | tr -dc 0-9
}

bed_ready() {
  for _ in $(seq $((${2:-30} * 2))); do
    curl -sf "http://127.0.0.1:$1/readyz" > /dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}

bed_totals() {
  local ok failed
  ok=$(awk '/Successful call/ {print $NF}' "$1" 2> /dev/null | tail -1)
  failed=$(awk '/Failed call/ {print $NF}' "$1" 2> /dev/null | tail -1)
  echo "${ok:-?} ${failed:-?}"
}
