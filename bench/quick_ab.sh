#!/usr/bin/env bash
# A quick keep-alive figure: ab -k against bench/backend.py directly and through mtlsproxy
# (client certificate via ab -E), interleaved for ROUNDS rounds, with min/median/max.
# The full comparison with nginx and HAProxy is bench/run.py; this takes about a minute.
#
#   bash bench/quick_ab.sh [ROUNDS] [REQUESTS]      # defaults: 5 30000, concurrency 32
#
# Needs ab and curl (apt-get install apache2-utils curl) and the repository's .venv.
set -euo pipefail
ROUNDS=${1:-5}
N=${2:-30000}
NAME=bench/quick_ab.sh
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup ab curl
PROXY_PORT=$(free_port)
"$VENV/bin/twistd" -n --pidfile= mtlsproxy --listen "tcp:$PROXY_PORT:interface=127.0.0.1" \
    --backend "http://127.0.0.1:$BACKEND_PORT" --cert "$WORK/pki/server-cert.pem" \
    --key "$WORK/pki/server-key.pem" --ca "$WORK/pki/ca-cert.pem" > "$WORK/proxy.log" 2>&1 &
wait_for_proxy "$PROXY_PORT" 100

rate() {  # rate URL [ab options]: requests/s, or the failure
    local url=$1 out
    shift
    out=$(ab -q -k -c 32 -n "$N" "$@" "$url" 2>&1)
    if ! grep -q "^Failed requests: *0" <<<"$out"; then
        echo "ab reported failures for $url:" >&2
        echo "$out" >&2
        exit 1
    fi
    awk '/Requests per second/{print $4}' <<<"$out"
}

direct=()
proxied=()
for round in $(seq "$ROUNDS"); do
    direct+=("$(rate "http://127.0.0.1:$BACKEND_PORT/")")
    proxied+=("$(rate "https://127.0.0.1:$PROXY_PORT/" -E "$WORK/client.pem")")
    echo "round $round: direct ${direct[-1]} req/s, mtlsproxy ${proxied[-1]} req/s"
done
python3 - "${direct[*]}" "${proxied[*]}" <<'EOF'
import statistics
import sys

direct, proxied = ([float(x) for x in arg.split()] for arg in sys.argv[1:])
for name, xs in (("backend directly", direct), ("through mtlsproxy", proxied)):
    print(f"{name}: median {statistics.median(xs):,.0f} req/s "
          f"(min {min(xs):,.0f}, max {max(xs):,.0f})")
print(f"ratio of medians: {statistics.median(proxied) / statistics.median(direct):.2f}")
EOF
