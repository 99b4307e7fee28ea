#!/usr/bin/env bash
# Installs everything needed to build event-router and run its tests (Debian 12).
# Idempotent: packages already installed are left as they are.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

packages=(
  build-essential cmake pkg-config
  librabbitmq-dev libssl-dev libboost-dev rapidjson-dev libyaml-cpp-dev catch2 libsqlite3-dev
  rabbitmq-server amqp-tools
  python3 python3-aio-pika python3-prometheus-client
  python3-fastapi python3-uvicorn      # tests/integration/test_http_push.py
  clang libclang-rt-14-dev
  buildah debootstrap python3-yaml   # tests/container
)
# This machine may have Node from elsewhere: only ask apt for it when missing.
if ! command -v node >/dev/null 2>&1; then packages+=(nodejs); fi
if ! command -v npm >/dev/null 2>&1; then packages+=(npm); fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
