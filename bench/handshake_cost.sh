#!/usr/bin/env bash
# Full TLS handshakes per second that the proxy sustains on one core, for each server key
# type `mtlsproxy pki init --key-type` offers: the proxy pinned to CPU 0, `openssl s_time -new`
# (a new session per connection, with the client certificate) pinned to CPU 1.
# Also prints `openssl speed`'s signing rate for the same keys: the ceiling for one core.
#
#   bash bench/handshake_cost.sh [SECONDS_PER_RUN] [ROUNDS]
#
# Needs mtlsproxy installed in .venv (or VENV=...), the example app, openssl and taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(cd "${VENV:-.venv}" && pwd)
SECS=${1:-5}
ROUNDS=${2:-3}
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT

app_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 examples/legacy_app.py --listen "127.0.0.1:$app_port" >/dev/null 2>&1 &
pids+=($!)

echo "| server key | full handshakes/s, one s_time client (median of $ROUNDS x ${SECS}s; min-max) | openssl speed sign/s, one core |"
echo "| --- | --- | --- |"
for kt in ec rsa2048 rsa4096; do
  "$VENV/bin/mtlsproxy" pki init "$work/$kt" --key-type "$kt" >/dev/null
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  (cd "$work/$kt" && exec taskset -c 0 "$VENV/bin/twistd" -n --pidfile= mtlsproxy \
    --listen "tcp:$port:interface=127.0.0.1" --backend "http://127.0.0.1:$app_port" \
    --cert server-cert.pem --key server-key.pem --ca ca-cert.pem) >"$work/$kt.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  rates=()
  for _ in $(seq "$ROUNDS"); do
    # "N connections in T real seconds": T is rounded to whole seconds, so divide
    # by the run's length instead.
    r=$(taskset -c 1 openssl s_time -connect "127.0.0.1:$port" -new -time "$SECS" \
          -cert "$work/$kt/client-cert.pem" -key "$work/$kt/client-key.pem" \
          -CAfile "$work/$kt/ca-cert.pem" 2>/dev/null |
        awk -v s="$SECS" '/connections in .* real seconds/ {print $1 / s; exit}')
    rates+=("$r")
  done
  sorted=$(printf '%s\n' "${rates[@]}" | sort -g)
  min=$(echo "$sorted" | head -1); max=$(echo "$sorted" | tail -1)
  med=$(echo "$sorted" | sed -n "$(( (ROUNDS + 1) / 2 ))p")
  case $kt in ec) alg=ecdsap256 ;; *) alg=$kt ;; esac
  # "256 bits ecdsa (nistp256) 0.0000s 0.0001s SIGN/s VERIFY/s", "rsa 2048 bits ... SIGN/s VERIFY/s"
  sign=$(taskset -c 0 openssl speed -seconds 2 "$alg" 2>/dev/null |
         awk '/bits ecdsa|^rsa +[0-9]+ bits/ {print $(NF-1); exit}')
  printf '| %s | %.0f (%.0f-%.0f) | %s |\n' "$kt" "$med" "$min" "$max" "$sign"
done
