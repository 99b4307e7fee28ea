#!/usr/bin/env bash
# Starts the local RabbitMQ broker unless it is already running, and waits
# (up to 60 s) until it answers `rabbitmqctl status`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if rabbitmqctl status >/dev/null 2>&1; then
  echo "start-rabbitmq: already running"
  exit 0
fi

echo "start-rabbitmq: starting rabbitmq-server"
rabbitmq-server -detached
deadline=$((SECONDS + 60))
until rabbitmqctl status >/dev/null 2>&1; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "start-rabbitmq: broker not ready after 60 s" >&2
    rabbitmqctl status >&2 || true
    exit 1
  fi
  sleep 1
done
# `status` answers before the app has fully booted; wait for it too.
rabbitmqctl await_startup >/dev/null 2>&1 || true
echo "start-rabbitmq: ready"
