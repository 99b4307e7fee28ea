#!/usr/bin/env bash
# Worker and exec handlers side by side with the service-style consumers they
# replace, from one run (issue 10's figures): a Python worker against the
# aio-pika peer, a Node worker against the amqplib peer, an exec handler
# against amqp-consume, all against raw rabbitmq-c; interleaved rounds,
# medians, prefetch 10, and where the CPU went (broker, router, worker).
#   bash bench/run.sh workers [ROUNDS] [N] [N_SUB]   (defaults 3, 50000, 3000)
# N_SUB is for the per-event-process rows (amqp-consume, exec).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
kit=${ER_BENCH_KIT:-$repo/../shared/bench}
rounds=${1:-3} n=${2:-50000} n_sub=${3:-3000}
bin=${ER_BINARY:-$repo/build/event-router}
[[ -x $bin ]] || { echo "build first: $bin not found" >&2; exit 1; }
[[ -d $kit ]] || { echo "benchmark kit not found at $kit (set ER_BENCH_KIT)" >&2; exit 1; }
bash "$kit/setup.sh" >/dev/null

export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}
. "$here/lib.sh"
# Names are ours alone: nothing of a service or of another run is touched.
tag=er-bench-w$$-$RANDOM
export ER_BENCH_EXCHANGE=$tag.events
export ER_NODE_CLIENT=$repo/clients/node
q_peer=$tag.peer q_router=$tag.workers
tmp=$(mktemp -d /tmp/er-bench-workers.XXXXXX)
trap 'bench_cleanup "$tag" "$q_peer" "$q_router"; rm -rf "$tmp"' EXIT

# config KIND: the router's config for one handler kind.
config() {
  local handler
  case $1 in
    python) handler="worker: [/usr/bin/python3, $here/workers/py_noop.py]
        env: {PYTHONPATH: $repo/clients/python}" ;;
    node) handler="worker: [$(command -v node), $here/workers/node_noop.js]
        inherit_env: [ER_NODE_CLIENT]" ;;
    exec) handler="exec: [/bin/cat]" ;;
  esac
  cat >"$tmp/$1.yaml" <<YAML
broker: {url: "${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}"}
exchange: {name: $ER_BENCH_EXCHANGE}
log: {level: warn}
state_dir: $tmp/state
queues:
  - name: $q_router
    bindings: ["speaker.*", "draft.*"]
    prefetch: 10
    handlers:
      - name: bench-$1
        events: ["#"]
        $handler
YAML
  echo "$tmp/$1.yaml"
}
for k in python node exec; do config $k >/dev/null; done
# Let the router declare its queues (retry and dead-letter ones too) once.
"$bin" --config "$tmp/exec.yaml" >/dev/null 2>&1 & pid=$!
sleep 2; kill -TERM $pid; wait $pid || true

out=$tmp/runs
drain() { # NAME COUNT QUEUE -- CMD...
  local name=$1 count=$2 queue=$3; shift 4
  bash "$kit/drain.sh" --queue "$queue" --count "$count" --name "$name" --bind 'speaker.*' --bind 'draft.*' \
    -- "$@" | tee -a "$out"
}
router() { # NAME COUNT KIND
  drain "$1" "$2" $q_router -- bash "$here/cpu-split.sh" "$tmp/split" "$bin" --config "$tmp/$3.yaml"
  echo "split $1 $(cat "$tmp/split")" >>"$out"
}
for ((i = 1; i <= rounds; i++)); do
  drain raw "$n" $q_peer -- bash "$kit/peer.sh" raw $q_peer
  drain aiopika "$n" $q_peer -- bash "$kit/peer.sh" aiopika $q_peer
  router python-worker "$n" python
  drain amqplib "$n" $q_peer -- bash "$kit/peer.sh" amqplib $q_peer
  router node-worker "$n" node
  drain amqp-consume "$n_sub" $q_peer -- bash "$kit/peer.sh" amqp-consume $q_peer
  router exec "$n_sub" exec
done

python3 - "$out" <<'PY'
import re, statistics, sys
runs, splits = {}, {}
for line in open(sys.argv[1]):
    m = re.match(r"(\S+): (\d+) msgs in ([\d.]+) s = (\d+) msg/s\s+\[startup=\S+ rss=([\d.]+)MiB cpu=([\d.]+)s broker_cpu=([\d.]+)s\]", line)
    if m and m.group(1) != "preload":
        runs.setdefault(m.group(1), []).append((int(m.group(4)), int(m.group(2)), float(m.group(5)),
                                                float(m.group(6)), float(m.group(7))))
    s = re.match(r"split (\S+) ([\d.]+) ([\d.]+)", line)
    if s:
        splits.setdefault(s.group(1), []).append((float(s.group(2)), float(s.group(3))))
med = lambda xs: statistics.median(xs)
rate = {k: med([r[0] for r in v]) for k, v in runs.items()}
peer = {"python-worker": "aiopika", "node-worker": "amqplib", "exec": "amqp-consume"}
print(f"{'consumer':14s} {'msg/s':>8s} {'x raw':>6s} {'x peer':>7s} {'rss MiB':>8s} "
      f"{'broker us/msg':>13s} {'router us/msg':>13s} {'worker us/msg':>13s}   runs")
for name, v in runs.items():
    n = v[0][1]
    broker = med([r[4] for r in v]) / n * 1e6
    if name in splits:
        own = med([s[0] for s in splits[name]]) / n * 1e6
        kids = med([s[1] for s in splits[name]]) / n * 1e6
        cols = f"{own:13.1f} {kids:13.1f}"
    else:
        cols = f"{med([r[3] for r in v]) / n * 1e6:13.1f} {'-':>13s}"
    vs = f"{rate[name] / rate[peer[name]]:7.2f}" if name in peer and peer[name] in rate else f"{'':7s}"
    print(f"{name:14s} {rate[name]:8.0f} {rate[name] / rate['raw']:6.2f} {vs} {med([r[2] for r in v]):8.1f} "
          f"{broker:13.1f} {cols}   {[r[0] for r in v]}")
print("router us/msg for peers = the peer's own CPU; worker = the worker processes (or exec children).")
PY
