# Sourced by bench/run.sh, bench/http.sh, bench/workers.sh and bench/memory.sh.

# bench_cleanup TAG QUEUE...: deletes the queues, every queue the daemon
# declared under TAG (dead-letter and retry queues) and the exchange
# $ER_BENCH_EXCHANGE. Errors are ignored: it runs from an EXIT trap.
bench_cleanup() {
  local tag=$1 names
  shift
  names=$(rabbitmqctl -q list_queues name 2>/dev/null | grep -F "$tag." || true)
  # shellcheck disable=SC2086  # one queue name a word
  /usr/bin/python3 - "$AMQP_URL" "$ER_BENCH_EXCHANGE" "$@" $names <<'PY' >/dev/null 2>&1 || true
import asyncio, sys, aio_pika
async def main(url, ex, *queues):
    c = await aio_pika.connect(url + ("" if url.endswith("/") else "/"))
    for name in sorted(set(queues)):
        ch = await c.channel()
        try:
            await ch.queue_delete(name)
        except Exception:
            pass
    ch = await c.channel()
    try:
        await ch.exchange_delete(ex)
    except Exception:
        pass
    await c.close()
asyncio.run(main(*sys.argv[1:]))
PY
}

# bench_declare BIN CONFIG: runs the daemon on CONFIG until $BENCH_QUEUE
# exists, so it declares its queues once (dead-letter and retry queues
# too) before a peer consumes the same queue.
bench_declare() {
  local pid
  "$1" --config "$2" >/dev/null 2>&1 & pid=$!
  for _ in $(seq 50); do
    rabbitmqctl -q list_queues name 2>/dev/null | grep -qxF "$BENCH_QUEUE" && break
    sleep 0.2
  done
  kill -TERM $pid; wait $pid || true
}

# bench_dlq_count: messages in $BENCH_QUEUE.dlq (a row whose events were
# dead-lettered would time the dead-lettering).
bench_dlq_count() {
  rabbitmqctl -q list_queues --no-table-headers name messages 2>/dev/null |
    awk -v q="$BENCH_QUEUE.dlq" '$1 == q {print $2}'
}
