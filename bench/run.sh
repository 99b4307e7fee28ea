#!/usr/bin/env bash
# Times event-router (no-op plugin, with and without dedupe) side by side with
# a bare rabbitmq-c consumer on the same broker, interleaved, and prints
# ratios from one run.
# Timings on a shared 2-core box are noisy: compare the ratios, not msg/s.
#   bench/run.sh [ROUNDS] [N]      (defaults: 3 rounds, 100000 events)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
kit=${ER_BENCH_KIT:-$repo/../shared/bench}
rounds=${1:-3}
n=${2:-100000}
bin=${ER_BINARY:-$repo/build/event-router}
[[ -x $bin ]] || { echo "build first: $bin not found" >&2; exit 1; }
[[ -d $kit ]] || { echo "benchmark kit not found at $kit (set ER_BENCH_KIT)" >&2; exit 1; }
bash "$kit/setup.sh" >/dev/null

# An exchange of its own, so the preloads do not land in real service queues.
export ER_BENCH_EXCHANGE=${ER_BENCH_EXCHANGE:-er-bench.events}
q_raw=er-bench.raw
q_router=er-bench.router
export BENCH_QUEUE=$q_router
export BENCH_STATE_DIR=${BENCH_STATE_DIR:-$(mktemp -d /tmp/er-bench-state.XXXXXX)}
# Let the router declare its queues once (dead-letter and retry queues too).
"$bin" --config "$here/noop.yaml" >/dev/null 2>&1 & pid=$!
sleep 2; kill -TERM $pid; wait $pid || true

out=$(mktemp)
for ((i = 1; i <= rounds; i++)); do
  bash "$kit/drain.sh" --queue $q_raw --count "$n" --name raw --bind 'speaker.*' --bind 'draft.*' \
    -- bash "$kit/peer.sh" raw $q_raw | tee -a "$out"
  bash "$kit/drain.sh" --queue $q_router --count "$n" --name event-router --bind 'speaker.*' --bind 'draft.*' \
    -- "$bin" --config "$here/noop.yaml" | tee -a "$out"
  rm -rf "$BENCH_STATE_DIR"  # every round starts with an empty store: all ids are new
  bash "$kit/drain.sh" --queue $q_router --count "$n" --name router+dedupe --bind 'speaker.*' --bind 'draft.*' \
    -- "$bin" --config "$here/noop-dedupe.yaml" | tee -a "$out"
done
rm -rf "$BENCH_STATE_DIR"
amqp-delete-queue -q $q_raw >/dev/null 2>&1 || true
python3 - "$out" <<'PY'
import re, statistics, sys
rates = {}
for line in open(sys.argv[1]):
    m = re.match(r"(\S+): (\d+) msgs in ([\d.]+) s = (\d+) msg/s", line)
    if m and m.group(1) != "preload":
        rates.setdefault(m.group(1), []).append(int(m.group(4)))
raw = statistics.median(rates["raw"])
for name, r in rates.items():
    med = statistics.median(r)
    print(f"{name:14s} median {med:8.0f} msg/s  x raw {med / raw:.2f}  runs {r}")
if "router+dedupe" in rates and "event-router" in rates:
    ratio = statistics.median(rates["router+dedupe"]) / statistics.median(rates["event-router"])
    print(f"dedupe on / off: {ratio:.2f}")
PY
rm -f "$out"
