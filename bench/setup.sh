#!/usr/bin/env bash
# Installs what bench/run.py needs: nginx, HAProxy, ab (apache2-utils), openssl, taskset
# (util-linux) and curl from Debian/Ubuntu packages (as root or through sudo), and, in a fresh
# clone, the virtualenv .venv with mtlsproxy installed (bench/run.py runs the twistd next to it).
#
#   bash bench/setup.sh
#
# bench/run.py starts its own nginx and HAProxy instances on free loopback ports, with
# configuration files of its own; the system services the packages may start are not used
# (stop them with `systemctl disable --now nginx haproxy` if you do not want them).
set -euo pipefail
pkgs=(nginx haproxy apache2-utils openssl util-linux curl)
sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "bench/setup.sh: already installed: ${pkgs[*]}"
else
  "${sudo[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${missing[@]}"
fi
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/twistd ] || [ ! -x .venv/bin/mtlsproxy ]; then
  MTLSPROXY_WITH_KEYTOOL=0 MTLSPROXY_WITH_SYSTEMD_ANALYZE=0 bash scripts/system-deps.sh  # python3-venv on a fresh Debian
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check ".[test]"
fi
echo "next: .venv/bin/python bench/run.py [--rounds 3] [--quick]"
