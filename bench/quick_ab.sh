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
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
for tool in ab curl; do
    command -v "$tool" >/dev/null || { echo "bench/quick_ab.sh: needs $tool" >&2; exit 2; }
done
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
"$VENV/bin/mtlsproxy" pki init "$WORK/pki" >/dev/null
cat "$WORK/pki/client-cert.pem" "$WORK/pki/client-key.pem" > "$WORK/client.pem"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND_PORT=$(free_port)
PROXY_PORT=$(free_port)
python3 "$REPO/bench/backend.py" --port "$BACKEND_PORT" >/dev/null 2>&1 &
"$VENV/bin/twistd" -n --pidfile= mtlsproxy --listen "tcp:$PROXY_PORT:interface=127.0.0.1" \
    --backend "http://127.0.0.1:$BACKEND_PORT" --cert "$WORK/pki/server-cert.pem" \
    --key "$WORK/pki/server-key.pem" --ca "$WORK/pki/ca-cert.pem" > "$WORK/proxy.log" 2>&1 &
for _ in $(seq 100); do
    curl -s -o /dev/null --cacert "$WORK/pki/ca-cert.pem" --cert "$WORK/pki/client-cert.pem" \
        --key "$WORK/pki/client-key.pem" --resolve "localhost:$PROXY_PORT:127.0.0.1" \
        "https://localhost:$PROXY_PORT/" && break
    sleep 0.1
done

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
