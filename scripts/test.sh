#!/usr/bin/env bash
# Installs dependencies, builds, starts RabbitMQ and runs all tests with ctest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

# The tests need Debian's python3 (it has python3-aio-pika); another python3
# (pyenv and such) may come first on PATH.
python_args=()
if [ -x /usr/bin/python3 ]; then python_args=(-DPython3_EXECUTABLE=/usr/bin/python3); fi

# CMP0110 NEW: test names with spaces ("integration: test_flow") need it, and
# cmake_minimum_required(VERSION 3.16) leaves it OLD, which breaks add_test().
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_POLICY_DEFAULT_CMP0110=NEW "${python_args[@]}"
cmake --build build -j2

bash scripts/start-rabbitmq.sh

if [ ! -f tests/integration/node_modules/amqplib/package.json ]; then
  (cd tests/integration && npm ci --no-audit --no-fund --loglevel=error)
fi

ctest --test-dir build --output-on-failure "$@"
