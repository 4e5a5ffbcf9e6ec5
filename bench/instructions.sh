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
NAME=bench/instructions.sh
# shellcheck source=bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_setup valgrind ab curl

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
    wait_for_proxy "$port" 3000  # valgrind starts the proxy slowly
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
