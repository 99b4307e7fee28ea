#!/usr/bin/env bash
# The http plugin under load (issue 12): the daemon pushing every event by
# HTTP POST to a trivial endpoint, at prefetch 100 with 50 requests in
# flight, side by side with the bare rabbitmq-c peer and the no-op plugin
# draining the same N events in the same run; interleaved rounds, medians.
# Also the CPU per event of the daemon and of the endpoint (from /proc of
# each), and what bounds the rate.
#   bash bench/run.sh http [ROUNDS] [N]      (defaults 3, 50000)
#   env: SERVERS   the endpoints, any of "beast node express fastapi" (default all four):
#                  beast   = bench/http-server/server.cpp (Boost.Beast, one thread),
#                  node    = bench/http-server/server.js (Node's bare http module),
#                  express = bench/http-server/server_express.js (an Express app; needs
#                            npm ci in tests/integration),
#                  fastapi = bench/http-server/server_fastapi.py (FastAPI under uvicorn)
#        HTTP_CONFIG  the daemon's config for the http rows (default bench/http.yaml;
#                  it reads BENCH_HTTP_URL, BENCH_QUEUE, BENCH_PREFETCH, ER_BENCH_EXCHANGE)
#        ER_BINARY, ER_BENCH_KIT, AMQP_URL as for bench/run.sh
set -euo pipefail
export LC_NUMERIC=C
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
kit=${ER_BENCH_KIT:-$repo/../shared/bench}
rounds=${1:-${ROUNDS:-3}} n=${2:-${N:-50000}}
servers=${SERVERS:-beast node express fastapi}
config=${HTTP_CONFIG:-$here/http.yaml}
bin=${ER_BINARY:-$repo/build/event-router}
prefetch=100
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}
[[ -x $bin ]] || { echo "build first: $bin not found" >&2; exit 1; }
[[ -f $kit/drain.sh ]] || { echo "benchmark kit not found at $kit (set ER_BENCH_KIT)" >&2; exit 1; }
. "$here/lib.sh"
bash "$kit/setup.sh" >/dev/null

# The Beast endpoint, built once into the cache (make rebuilds it when stale);
# one build dir per checkout, as CMake ties it to its source dir.
cache=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/er-bench-router}/http-server-$(echo "$here" | md5sum | cut -c1-8)
if [[ " $servers " == *" beast "* ]]; then
  cmake -S "$here/http-server" -B "$cache" -DCMAKE_BUILD_TYPE=Release >/dev/null
  make -s -C "$cache" >/dev/null
fi

# Names are ours alone: nothing of a service or of another run is touched.
tag=er-bench-h$$-$RANDOM
export ER_BENCH_EXCHANGE=$tag.events
export BENCH_QUEUE=$tag.q
tmp=$(mktemp -d /tmp/er-bench-http.XXXXXX)
declare -A spid=() sport=()
cleanup() {
  set +e
  for s in "${!spid[@]}"; do kill -TERM "${spid[$s]}" 2>/dev/null; done
  wait 2>/dev/null
  bench_cleanup "$tag" "$BENCH_QUEUE" "$BENCH_QUEUE.dlq"
  rm -rf "$tmp"
}
trap cleanup EXIT

# The endpoints run for the whole run; each row reads its CPU from /proc.
tck=$(getconf CLK_TCK)
for s in $servers; do
  case $s in
    beast) cmd=("$cache/er-bench-http-server" 0) ;;
    node) cmd=(node "$here/http-server/server.js" 0) ;;
    express) cmd=(env NODE_PATH="$repo/tests/integration/node_modules" node "$here/http-server/server_express.js" 0) ;;
    fastapi) cmd=(/usr/bin/python3 "$here/http-server/server_fastapi.py" 0) ;;
    *) echo "unknown server '$s' (beast|node|express|fastapi)" >&2; exit 2 ;;
  esac
  "${cmd[@]}" >"$tmp/$s.out" 2>&1 & spid[$s]=$!
  for _ in $(seq 50); do grep -q '^listening' "$tmp/$s.out" && break; sleep 0.1; done
  sport[$s]=$(awk '/^listening/ {print $2}' "$tmp/$s.out")
  [[ -n ${sport[$s]} ]] || { cat "$tmp/$s.out"; echo "the $s endpoint did not start" >&2; exit 1; }
done
# utime + stime of a process, every thread (its own /proc/PID/stat).
ticks() { local a; read -r -a a <<<"$(sed 's/.*) //' "/proc/$1/stat")"; echo $((a[11] + a[12])); }
url() { echo "http://127.0.0.1:${sport[$1]}/events/{event_type}"; }
# The plugin's own I/O thread ("er-http"): its CPU time in ns (schedstat:
# exact, where a thread's tick counts in /stat miss short runs), sampled
# every 20 ms into OUT while a row runs (it vanishes with the process; the
# thread is idle once the queue is drained, so the last sample holds it).
# Runs until killed; no fork per sample.
sample_plugin_thread() { # OUT
  local out=$1 pid= task= st nap
  exec {nap}<> <(:)
  while :; do
    if [[ -z $task ]]; then
      pid=$(pgrep -n -f -- "^$bin --config $config") || pid=
      # The first: Asio's resolver thread, started from it later, inherits its name.
      for t in ${pid:+$(ls -v -d /proc/$pid/task/*)}; do
        [[ $(<"$t/comm") == er-http ]] 2>/dev/null && { task=$t; break; }
      done
    elif read -r st _ 2>/dev/null <"$task/schedstat"; then
      echo "$st" >"$out"
    fi
    read -r -t 0.02 -u "$nap" || true
  done
}

if ! BENCH_PREFETCH=$prefetch BENCH_HTTP_URL=$(url "${servers%% *}") "$bin" --config "$config" --check >"$tmp/check" 2>&1; then
  cat "$tmp/check" >&2
  echo "$config fails --check with $bin (is the http plugin built? make -C build http_plugin)" >&2
  exit 1
fi

out=$tmp/runs
{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/^Mem:/ {print $2}') GiB"
  echo "broker: RabbitMQ $(rabbitmqctl -q version 2>/dev/null || echo '?'); daemon: $("$bin" --version 2>/dev/null | head -1), $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$repo" diff --quiet 2>/dev/null || echo ' (modified)')"
  echo "run: $rounds rounds x N=$n, prefetch $prefetch, endpoints: $servers; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$out"

# handle() alone, on the daemon's thread (bench/http_handle_bench.cpp): with
# the io thread's CPU, the plugin's whole CPU per event.
bdir=$(dirname "$bin")
if [[ -f $bdir/Makefile ]] && make -s -C "$bdir" er_http_handle_bench >/dev/null 2>&1; then
  "$bdir/er_http_handle_bench" "$bdir/plugins/libhttp_plugin.so" 50000 5 | tee -a "$out"
else
  echo "handle: not measured (make -C $bdir er_http_handle_bench failed)" | tee -a "$out"
fi

# One queue gets the preloads: the raw peer consumes the daemon's.
BENCH_PREFETCH=$prefetch bench_declare "$bin" "$here/noop.yaml"

drain() { # NAME -- CMD...
  local name=$1; shift 2
  BENCH_PREFETCH=$prefetch bash "$kit/drain.sh" --queue "$BENCH_QUEUE" --count "$n" --name "$name" \
    --bind 'speaker.*' --bind 'draft.*' -- "$@" | tee -a "$out"
  local dl; dl=$(bench_dlq_count)
  if [[ ${dl:-0} != 0 ]]; then
    echo "dead-lettered: $name $dl" | tee -a "$out"
    rabbitmqctl -q purge_queue "$BENCH_QUEUE.dlq" >/dev/null
  fi
}
for ((i = 1; i <= rounds; i++)); do
  drain raw -- bash "$kit/peer.sh" raw "$BENCH_QUEUE" $prefetch
  drain noop -- "$bin" --config "$here/noop.yaml"
  for s in $servers; do
    before=$(ticks "${spid[$s]}")
    rm -f "$tmp/thread"
    sample_plugin_thread "$tmp/thread" & sampler=$!
    BENCH_HTTP_URL=$(url "$s") drain "http-$s" -- "$bin" --config "$config"
    kill "$sampler"; wait "$sampler" 2>/dev/null || true
    echo "server http-$s $(( $(ticks "${spid[$s]}") - before )) $tck" >>"$out"
    echo "plugin-thread http-$s $(cat "$tmp/thread" 2>/dev/null || echo 0) 1000000000" >>"$out"
  done
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out"
# Every event reached the endpoint (retries may add requests, never fewer).
for s in $servers; do
  kill -TERM "${spid[$s]}"; wait "${spid[$s]}" || true; unset "spid[$s]"
  got=$(awk '/^requests/ {print $2}' "$tmp/$s.out")
  echo "endpoint $s: ${got:-?} requests for $((rounds * n)) events" | tee -a "$out"
  [[ ${got:-0} -ge $((rounds * n)) ]] || echo "MISSING: the $s endpoint saw fewer requests than events" | tee -a "$out"
done

/usr/bin/python3 - "$out" "$n" "$prefetch" <<'PY'
import re, statistics, sys
out, n, prefetch = sys.argv[1], int(sys.argv[2]), sys.argv[3]
runs, server, dead, thread, handle = {}, {}, {}, {}, None
pat = re.compile(r"(\S+): (\d+) msgs in ([\d.]+) s = (\d+) msg/s .*rss=([\d.]+)MiB cpu=([\d.]+)s broker_cpu=([\d.]+)s\](.*)")
for line in open(out):
    m = pat.match(line)
    if m and m.group(1) != "preload":
        runs.setdefault(m.group(1), []).append(dict(rate=int(m.group(4)), rss=float(m.group(5)), cpu=float(m.group(6)),
                                                    broker=float(m.group(7)), note=m.group(8).strip()))
    m = re.match(r"server (\S+) (\d+) (\d+)", line)
    if m:
        server.setdefault(m.group(1), []).append(int(m.group(2)) / int(m.group(3)))
    m = re.match(r"handle: ([\d.]+) us/event", line)
    if m:
        handle = float(m.group(1))
    m = re.match(r"plugin-thread (\S+) (\d+) (\d+)", line)
    if m:
        thread.setdefault(m.group(1), []).append(int(m.group(2)) / int(m.group(3)))
    m = re.match(r"dead-lettered: (\S+) (\d+)", line)
    if m:
        dead[m.group(1)] = dead.get(m.group(1), 0) + int(m.group(2))
med = statistics.median
rate = lambda r: med(x["rate"] for x in runs[r])
us = lambda r, k: med(x[k] for x in runs[r]) / n * 1e6
srv = lambda r: med(server[r]) / n * 1e6
what = {"raw": "raw rabbitmq-c", "noop": "no-op plugin", "http-beast": "http plugin -> Beast endpoint",
        "http-node": "http plugin -> Node http endpoint", "http-express": "http plugin -> Express endpoint",
        "http-fastapi": "http plugin -> FastAPI endpoint"}
print()
print("| row | prefetch | msg/s | x raw | x no-op | broker CPU/msg | daemon CPU/msg | endpoint CPU/msg | peak RSS |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in runs:
    xr = f"{rate(r) / rate('raw'):.2f}" if "raw" in runs else ""
    xn = f"{rate(r) / rate('noop'):.2f}" if r.startswith("http") and "noop" in runs else ""
    s = f"{srv(r):.1f} us" if r in server else ""
    notes = "; ".join(sorted({x["note"] for x in runs[r] if x["note"]}))
    if r in dead:
        notes += f"; {dead[r]} dead-lettered"
    print(f"| {what.get(r, r)} | {prefetch} | {rate(r):.0f} | {xr} | {xn} | {us(r, 'broker'):.1f} us | "
          f"{us(r, 'cpu'):.1f} us | {s} | {max(x['rss'] for x in runs[r]):.1f} MiB |" + (f" {notes}" if notes else ""))
print()
for r in runs:
    if r not in server:
        continue
    d, e, b = us(r, "cpu"), srv(r), us(r, "broker")
    line = f"{r}: daemon {d:.1f} us/event, endpoint {e:.1f} us/event, daemon/endpoint {d / e:.2f}"
    print(line)
    if r in thread and handle is not None:
        # The plugin's CPU: its io thread (connections, writes, reads,
        # parsing, completion) and handle() on the daemon's thread.
        t = med(thread[r]) / n * 1e6
        p = t + handle
        print(f"  the plugin: io thread {t:.1f} + handle() {handle:.1f} = {p:.1f} us/event, {p / e:.2f} of the endpoint's "
              f"(goal <= 0.25: {'ok' if p / e <= 0.25 else 'MISSED'})")
    if "noop" in runs:  # an upper bound: also the main loop's own wake-ups, one or two per event at a low rate
        q = d - us("noop", "cpu")
        print(f"  the daemon beyond the no-op plugin: {q:.1f} us/event, {q / e:.2f} of the endpoint's")
    # What bounds it: the three processes' CPU against the 2 cores, and the
    # time each event spends in flight if the 50 slots stay full (Little's law).
    busy = (b + d + e) * rate(r) / 1e6
    top = max((b, "the broker"), (d, "the daemon"), (e, "the endpoint"))
    print(f"  CPU in use while draining: {busy:.2f} of 2 cores (broker {b * rate(r) / 1e6:.2f}, daemon {d * rate(r) / 1e6:.2f}, "
          f"endpoint {e * rate(r) / 1e6:.2f}); the largest share per event: {top[1]}; "
          f"50 in flight at this rate = {50 / rate(r) * 1e3:.1f} ms per event in flight")
    if busy < 1.6:
        print("  these three leave CPU idle: bound by the time per event in flight (latency x 50), or by other load on the machine")
print("runs per row (msg/s):", {k: [x["rate"] for x in v] for k, v in runs.items()})
PY
