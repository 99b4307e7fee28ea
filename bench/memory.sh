#!/usr/bin/env bash
# Bounded memory: the daemon's resident memory idle vs. while it drains a
# preloaded queue of N (200k) events with the no-op plugin (log level warn).
#
#   bench/memory.sh [N]            (default 200000)
#   env: ER_BINARY (default build/event-router), AMQP_URL, PREFETCH (10),
#        DEDUPE=1 (queue `dedupe: {ttl: 1h}` with a temp state_dir),
#        ER_BENCH_KIT (default ../shared/bench)
#
# 1. Start the daemon on an empty queue (its own exchange and queue names),
#    wait until it consumes, let it sit 3 s: idle VmRSS (and VmHWM so far).
# 2. Stop it; preload N events with the bench kit's preload.sh
#    (ER_BENCH_EXCHANGE = our exchange, --bind '#').
# 3. Start it again; sample VmRSS every 50 ms (rabbitmqctl every ~1 s) until the queue holds no
#    message (ready + unacked = 0); then read VmHWM (peak since start) and
#    VmRSS after the drain.
# Prints idle RSS, drain peak (VmHWM) and the difference. Expectation: within
# a few MB (nothing grows per event). Not a ctest test; nothing is asserted.
# Everything it declared (queue, .dlq, retry queues, exchange) is deleted at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
kit=${ER_BENCH_KIT:-$repo/../shared/bench}
n=${1:-200000}
bin=${ER_BINARY:-$repo/build/event-router}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}
[[ -x $bin ]] || { echo "build first: $bin not found" >&2; exit 1; }
[[ -f $kit/preload.sh ]] || { echo "bench kit not found at $kit (set ER_BENCH_KIT)" >&2; exit 1; }

tag=er-mem-$$-$RANDOM
export ER_BENCH_EXCHANGE=$tag.events
queue=$tag.q
tmp=$(mktemp -d /tmp/er-mem.XXXXXX)
pid=

. "$here/lib.sh"
cleanup() {
  set +e
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"; wait "$pid" 2>/dev/null
  fi
  # the queue, its .dlq and whatever else the daemon declared under our name (retry queues)
  bench_cleanup "$tag" "$queue" "$queue.dlq"
  rm -rf "$tmp"
}
trap cleanup EXIT

{
  cat <<EOF
broker:
  url: "$AMQP_URL"
  heartbeat: 30s
exchange: {name: "$ER_BENCH_EXCHANGE", type: topic}
log: {level: warn}
queues:
  - name: "$queue"
    bindings: ["#"]
    prefetch: ${PREFETCH:-10}
    handlers:
      - {name: noop, events: ["#"], plugin: libnoop_plugin.so}
EOF
  if [[ ${DEDUPE:-0} == 1 ]]; then
    echo "    dedupe: {ttl: 1h}"
    echo "state_dir: \"$tmp/state\""
  fi
} >"$tmp/router.yaml"

kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
mib() { awk -v x="$1" 'BEGIN {printf "%.1f MiB", x / 1024}'; }
# ready+unacked messages of $queue, and its consumer count
qstate() { rabbitmqctl -q list_queues name messages consumers 2>/dev/null | awk -v q="$queue" '$1 == q {print $2, $3}'; }

start_daemon() {
  env -u EVENT_ROUTER_PLUGIN_DIR -u EVENT_ROUTER_CONFIG "$bin" --config "$tmp/router.yaml" 2>>"$tmp/daemon.log" & pid=$!
}
wait_consuming() {
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || { echo "daemon exited:" >&2; cat "$tmp/daemon.log" >&2; exit 1; }
    read -r _msgs consumers <<<"$(qstate)" || true
    [[ ${consumers:-0} -ge 1 ]] && return 0
    sleep 0.1
  done
  echo "the daemon never consumed $queue" >&2; exit 1
}

echo "binary: $bin ($(stat -c %y "$bin" | cut -d. -f1)); N=$n prefetch=${PREFETCH:-10} dedupe=${DEDUPE:-0}"

# 1. idle
start_daemon
wait_consuming
sleep 3
idle_rss=$(kb "$pid" VmRSS); idle_hwm=$(kb "$pid" VmHWM)
kill -TERM "$pid"; wait "$pid" || true; pid=

# 2. preload
bash "$kit/preload.sh" --queue "$queue" --count "$n" --bind '#' | tail -1

# 3. drain
t0=$(date +%s.%N)
start_daemon
peak_sampled=0
while :; do
  kill -0 "$pid" 2>/dev/null || { echo "daemon exited while draining:" >&2; cat "$tmp/daemon.log" >&2; exit 1; }
  # rabbitmqctl takes ~0.5 s per call: sample RSS in between, every 50 ms
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    r=$(kb "$pid" VmRSS) || break; (( r > peak_sampled )) && peak_sampled=$r
    sleep 0.05
  done
  read -r msgs _c <<<"$(qstate)" || true
  [[ ${msgs:-1} == 0 ]] && break
done
t1=$(date +%s.%N)
drain_hwm=$(kb "$pid" VmHWM)
sleep 1
after_rss=$(kb "$pid" VmRSS)
kill -TERM "$pid"; wait "$pid" || true; pid=

printf 'idle          VmRSS %s   (VmHWM at idle %s)\n' "$(mib "$idle_rss")" "$(mib "$idle_hwm")"
printf 'drain peak    VmHWM %s   (highest sampled VmRSS %s)\n' "$(mib "$drain_hwm")" "$(mib "$peak_sampled")"
printf 'after drain   VmRSS %s\n' "$(mib "$after_rss")"
printf 'peak - idle   %s   (%d events in %.1f s)\n' "$(mib $((drain_hwm - idle_rss)))" "$n" \
  "$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')"
if [[ -s $tmp/daemon.log ]]; then
  echo "daemon warnings/errors:"; sed 's/^/  /' "$tmp/daemon.log" | tail -20
fi
