#!/usr/bin/env bash
# Installs the Debian packages that the demo and the test suite use, if any is missing:
# python3-venv (a fresh Debian has python3 without venv), curl and openssl (real clients in
# the end-to-end tests), a JRE for keytool (PKCS#12 truststores as Java makes them), and
# systemd for systemd-analyze (tests/test_systemd_units.py verifies the units with it, and
# is skipped without it: CI containers usually lack systemd).
# Run with bash by examples/demo.sh and tests/run.sh; does nothing when everything is there.
# Not root: uses sudo if there is one, else prints the apt-get command and exits 1.
set -euo pipefail

missing=()
# installed without their recommended packages (systemd's would add dbus, timesyncd, ...)
bare=()
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
if [ "${MTLSPROXY_WITH_KEYTOOL:-1}" = 1 ]; then
  command -v keytool >/dev/null || missing+=(default-jre-headless)
fi
if [ "${MTLSPROXY_WITH_SYSTEMD_ANALYZE:-1}" = 1 ]; then
  command -v systemd-analyze >/dev/null || bare+=(systemd)
fi

if [ $((${#missing[@]} + ${#bare[@]})) -gt 0 ]; then
  all="${missing[*]} ${bare[*]}"
  all="${all# }"
  all="${all% }"
  if [ "$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else
    echo "please install: $all (apt-get install $all)" >&2
    exit 1
  fi
  echo "installing Debian packages: $all" >&2
  $SUDO apt-get update -qq
  if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  if [ ${#bare[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
      "${bare[@]}" >/dev/null
  fi
fi
