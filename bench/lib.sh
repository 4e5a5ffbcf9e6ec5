# Shared set-up of the small benchmark scripts (bench/instructions.sh, bench/quick_ab.sh),
# sourced, not run: the tools they need, a throw-away PKI, the benchmark backend, and a wait
# until a proxy answers an authenticated request.
#
#   NAME=bench/x.sh; source "$(dirname "$0")/lib.sh"; bench_setup ab curl
#
# Sets REPO, VENV, WORK (removed at exit, background jobs killed) and BACKEND_PORT;
# WORK/pki holds `mtlsproxy pki init` material and WORK/client.pem the client's cert+key for ab -E.

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

bench_setup() {  # bench_setup TOOL...: exit 2 naming the first missing tool
    REPO=$(cd "$(dirname "$0")/.." && pwd)
    VENV=${VENV:-$REPO/.venv}
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$NAME: needs $tool" >&2; exit 2; }
    done
    WORK=$(mktemp -d)
    trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
    "$VENV/bin/mtlsproxy" pki init "$WORK/pki" >/dev/null
    cat "$WORK/pki/client-cert.pem" "$WORK/pki/client-key.pem" > "$WORK/client.pem"
    BACKEND_PORT=$(free_port)
    python3 "$REPO/bench/backend.py" --port "$BACKEND_PORT" >/dev/null 2>&1 &
}

wait_for_proxy() {  # wait_for_proxy PORT TRIES: until a client with a certificate gets through
    local port=$1 tries=$2
    for _ in $(seq "$tries"); do
        curl -s -o /dev/null --cacert "$WORK/pki/ca-cert.pem" --cert "$WORK/pki/client-cert.pem" \
            --key "$WORK/pki/client-key.pem" --resolve "localhost:$port:127.0.0.1" \
            "https://localhost:$port/" && return 0
        sleep 0.1
    done
    echo "$NAME: the proxy on port $port did not answer; its log:" >&2
    cat "$WORK/proxy.log" >&2
    exit 1
}
