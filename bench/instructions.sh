#!/usr/bin/env bash
# Instructions the proxy process executes per request, counted by callgrind: deterministic,
# so a change worth 1% shows on a shared, noisy machine where timings cannot (the figures in
# bench/optimisations.md come from here). Not part of CI.
#
#   bash bench/instructions.sh [ka|new] [N]      # defaults: ka 2000
#
# ka:  N keep-alive requests (ab -k -c 8); new: N requests, each on a new TLS connection (ab -c 8).
# The proxy runs twice under valgrind --tool=callgrind: once with no request, once with N;
# the difference divided by N is printed. Needs valgrind and ab (apt-get install valgrind
# apache2-utils) and the repository's .venv (twistd, mtlsproxy). Takes a few minutes.
set -euo pipefail
MODE=${1:-ka}
N=${2:-2000}
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
for tool in valgrind ab curl; do
    command -v "$tool" >/dev/null || { echo "bench/instructions.sh: needs $tool" >&2; exit 2; }
done
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
"$VENV/bin/mtlsproxy" pki init "$WORK/pki" >/dev/null
cat "$WORK/pki/client-cert.pem" "$WORK/pki/client-key.pem" > "$WORK/client.pem"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND_PORT=$(free_port)
python3 "$REPO/bench/backend.py" --port "$BACKEND_PORT" >/dev/null 2>&1 &

run() {  # run N_REQUESTS: the proxy's total instruction count
    local n=$1 port
    port=$(free_port)
    rm -f "$WORK"/cg.out.*
    PYTHONPATH=$REPO valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out.%p" \
        "$VENV/bin/python" "$VENV/bin/twistd" -n --pidfile= mtlsproxy \
        --listen "tcp:$port:interface=127.0.0.1" --backend "http://127.0.0.1:$BACKEND_PORT" \
        --cert "$WORK/pki/server-cert.pem" --key "$WORK/pki/server-key.pem" \
        --ca "$WORK/pki/ca-cert.pem" > "$WORK/proxy.log" 2>&1 &
    local pid=$!
    for _ in $(seq 600); do
        curl -s -o /dev/null --cacert "$WORK/pki/ca-cert.pem" --cert "$WORK/pki/client-cert.pem" \
            --key "$WORK/pki/client-key.pem" --resolve "localhost:$port:127.0.0.1" \
            "https://localhost:$port/" && break
        sleep 0.5
    done
    if [ "$n" -gt 0 ]; then
        local keepalive=-k
        [ "$MODE" = new ] && keepalive=
        ab $keepalive -q -c 8 -n "$n" -E "$WORK/client.pem" "https://127.0.0.1:$port/" >/dev/null
    fi
    kill -TERM "$pid"
    wait "$pid" || true
    grep -h "^summary:\|^totals:" "$WORK"/cg.out.* | head -1 | awk '{print $2}'
}

base=$(run 0)
full=$(run "$N")
python3 -c "print(f'$MODE: {($full - $base) / $N:,.0f} instructions per request (N=$N)')"
