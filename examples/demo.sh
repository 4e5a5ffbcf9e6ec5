#!/usr/bin/env bash
# The main job, end to end: install mtlsproxy into a virtualenv, make a demo CA with a
# server and a client certificate, start the example legacy app and the proxy in front of
# it, then show a request with the client certificate reaching the app (which greets the
# client by its CN) and a request without a certificate being refused during the handshake.
#
#   bash examples/demo.sh            # run the demo, then stop everything
#   bash examples/demo.sh --serve    # leave the proxy running until Ctrl-C
#
# Ports: APP_PORT (default 8080) and PROXY_PORT (default 8443), on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
DEMO=$ROOT/demo
APP_PORT=${APP_PORT:-8080}
PROXY_PORT=${PROXY_PORT:-8443}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; }

step "Installing mtlsproxy into $VENV"
MTLSPROXY_WITH_KEYTOOL=0 MTLSPROXY_WITH_SYSTEMD_ANALYZE=0 bash scripts/system-deps.sh
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install -q --disable-pip-version-check .
PATH=$VENV/bin:$PATH

step "Making a demo CA, server and client certificate"
mkdir -p "$DEMO"
if [ -f "$DEMO/pki/ca-cert.pem" ]; then
  echo "(reusing $DEMO/pki from an earlier run)"
else
  show "mtlsproxy pki init demo/pki --client-name demo-client --p12"
  mtlsproxy pki init "$DEMO/pki" --client-name demo-client --p12
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Wait for a TCP port to accept connections, or for the process to die, for up to 15 s.
wait_port() {
  local port=$1 pid=$2 what=$3 deadline=$((SECONDS + 15))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "$what exited; its log:" >&2; cat "$4" >&2; exit 1; fi
    if [ $SECONDS -ge $deadline ]; then echo "$what did not start listening in 15 s" >&2; exit 1; fi
    sleep 0.1
  done
}

step "Starting the legacy app (no authentication of its own) on 127.0.0.1:$APP_PORT"
python3 examples/legacy_app.py --listen "127.0.0.1:$APP_PORT" >"$DEMO/app.log" 2>&1 &
pids+=($!)
wait_port "$APP_PORT" "${pids[-1]}" "the legacy app" "$DEMO/app.log"

step "Starting mtlsproxy on https://localhost:$PROXY_PORT in front of it"
show "twistd -n mtlsproxy --listen tcp:$PROXY_PORT:interface=127.0.0.1 --backend http://127.0.0.1:$APP_PORT \\"
show "    --cert demo/pki/server-cert.pem --key demo/pki/server-key.pem --ca demo/pki/ca-cert.pem"
(cd "$DEMO" && exec twistd -n --pidfile= mtlsproxy \
  --listen "tcp:$PROXY_PORT:interface=127.0.0.1" --backend "http://127.0.0.1:$APP_PORT" \
  --cert pki/server-cert.pem --key pki/server-key.pem --ca pki/ca-cert.pem) >"$DEMO/proxy.log" 2>&1 &
pids+=($!)
wait_port "$PROXY_PORT" "${pids[-1]}" "mtlsproxy" "$DEMO/proxy.log"

step "A client with a certificate from the CA: forwarded, and the app knows who it is"
show "curl --cacert demo/pki/ca-cert.pem --cert demo/pki/client-cert.pem --key demo/pki/client-key.pem https://localhost:$PROXY_PORT/"
curl -sS --fail --cacert "$DEMO/pki/ca-cert.pem" --cert "$DEMO/pki/client-cert.pem" \
  --key "$DEMO/pki/client-key.pem" "https://localhost:$PROXY_PORT/"

step "A client without a certificate: refused in the TLS handshake, the app sees nothing"
show "curl --cacert demo/pki/ca-cert.pem https://localhost:$PROXY_PORT/"
if curl -sS --cacert "$DEMO/pki/ca-cert.pem" "https://localhost:$PROXY_PORT/"; then
  echo "UNEXPECTED: the anonymous request went through" >&2
  exit 1
else
  echo "-> refused (curl exit status $?), as it must be"
fi

step "What the proxy logged"
# Wait (up to 5 s) for the refusal line: it is written when the server sees the handshake fail.
deadline=$((SECONDS + 5))
until grep -q "refused" "$DEMO/proxy.log" || [ $SECONDS -ge $deadline ]; do sleep 0.1; done
grep -E "listening on|access|refused" "$DEMO/proxy.log" | sed -E 's/^[^ ]+ //'

if [ "${1:-}" = "--serve" ]; then
  step "Serving on https://localhost:$PROXY_PORT until Ctrl-C (logs in demo/proxy.log)"
  wait
fi
