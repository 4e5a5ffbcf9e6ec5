#!/usr/bin/env bash
# Installs the Debian packages that the demo and the test suite use, if any is missing:
# python3-venv (a fresh Debian has python3 without venv), curl and openssl (real clients in
# the end-to-end tests), a JRE for keytool (PKCS#12 truststores as Java makes them).
# Sourced by examples/demo.sh and tests/run.sh; does nothing when everything is there.
set -euo pipefail

missing=()
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v curl >/dev/null || missing+=(curl)
command -v openssl >/dev/null || missing+=(openssl)
if [ "${MTLSPROXY_WITH_KEYTOOL:-1}" = 1 ]; then
  command -v keytool >/dev/null || missing+=(default-jre-headless)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else
    echo "please install: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
