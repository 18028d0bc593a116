#!/usr/bin/env bash
# Everything mpserve needs on a fresh Debian machine: system packages, a virtualenv at .venv, the package.
# Idempotent: a second run only checks. Usage: scripts/bootstrap.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v clang >/dev/null || need+=(clang)                 # tinygrad's CPU backend compiles kernels with clang
[ -e /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || need+=(dataset-fashion-mnist)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)   # Debian splits ensurepip out
if [ "${1:-}" = "--test" ]; then
  command -v chromium >/dev/null || need+=(chromium)          # the dashboard test renders the page headless
  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need+=(nginx-light)  # replicas behind a balancer
fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "bootstrap: installing ${need[*]} from Debian's packages"
  sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${need[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
extra=""; [ "${1:-}" = "--test" ] && extra="[test]"
stamp=".venv/.mpserve-installed${extra}"
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".${extra}"
  touch "$stamp"
fi
echo "bootstrap: ready (.venv/bin/mpserve)"
