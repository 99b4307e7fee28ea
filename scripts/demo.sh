#!/usr/bin/env bash
# Demo: build, start RabbitMQ and the daemon with config/router.yaml, publish
# the sample events (Python aio-pika + Node amqplib), then keep the daemon in
# the foreground (its log on this terminal) until Ctrl-C.
# Honours RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build build -j2
bash scripts/start-rabbitmq.sh
if [ ! -f tests/integration/node_modules/amqplib/package.json ]; then
  (cd tests/integration && npm ci --no-audit --no-fund --loglevel=error)
fi

export RABBITMQ_URL="${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/}"
export RABBITMQ_EXCHANGE="${RABBITMQ_EXCHANGE:-draft-genie.events}"

log="$(mktemp -t event-router-demo.XXXXXX.log)"
# The log goes to the terminal and to a file we watch for "ready".
build/event-router --config config/router.yaml 2> >(tee "$log" >&2) &
daemon=$!

forward() {
  trap - INT TERM
  kill -TERM "$daemon" 2>/dev/null || true
}
trap forward INT TERM

deadline=$((SECONDS + 60))
until grep -Eq '^[^ ]+ [^ ]+ ready( |$)' "$log"; do
  if ! kill -0 "$daemon" 2>/dev/null; then
    echo "demo: event-router exited before it was ready" >&2
    wait "$daemon" || true
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "demo: event-router not ready after 60 s" >&2
    kill -TERM "$daemon" 2>/dev/null || true
    exit 1
  fi
  sleep 0.2
done

python=python3
if [ -x /usr/bin/python3 ]; then python=/usr/bin/python3; fi
"$python" scripts/publish-samples.py
node scripts/publish-samples.js

echo "demo: samples published; event-router keeps running (Ctrl-C to stop)" >&2
# `wait` returns early (status > 128) when a trapped signal arrives: the
# trap forwards it, then we wait again until the daemon has really exited.
set +e
while :; do
  wait "$daemon"
  status=$?
  kill -0 "$daemon" 2>/dev/null || break
done
set -e
rm -f "$log"
echo "demo: event-router exited with status $status" >&2
exit "$status"
