#!/usr/bin/env bash
# The project's benchmark: every figure of docs/performance.md's main table from one run.
# Times event-router side by side with the shared bench kit's bare
# rabbitmq-c consumer (`peer.sh raw`) on the same broker, every row once per
# round, rounds interleaved, and prints medians and ratios from this run only.
# Timings on a shared 2-core box are noisy: compare the ratios, not msg/s.
#
#   bash bench/run.sh [ROUNDS] [N]      (defaults: 3 rounds, 100000 events of ~380 B)
#   bash bench/run.sh workers [ROUNDS] [N] [N_SUB]   worker and exec handlers against the
#                                        service-style peers (bench/workers.sh)
#   bash bench/run.sh http [ROUNDS] [N]  the http plugin against a trivial endpoint, with
#                                        the endpoint's CPU per event (bench/http.sh)
#   env: ROUNDS, N            as the arguments (quick look: N=20000 ROUNDS=1)
#        ROWS=REGEX           only the rows whose name matches (and the rows they compare with, in turn)
#        ER_BINARY            the daemon (default build/event-router)
#        ER_BENCH_KIT         the kit (default ../shared/bench), AMQP_URL
#
# Adding a row: one line in ROWS_TABLE below. A row runs `raw` (the kit's
# peer) or the daemon on a config of bench/; configs read BENCH_QUEUE,
# BENCH_PREFETCH, ER_BENCH_EXCHANGE (and BENCH_STATE_DIR, BENCH_ACK_WINDOW)
# from the environment. A row whose config is missing or fails --check is
# skipped with a note, so rows for features of other branches can wait here.
set -euo pipefail
export LC_NUMERIC=C
here=$(cd "$(dirname "$0")" && pwd)
if [[ ${1:-} == workers ]]; then shift; exec bash "$here/workers.sh" "$@"; fi
if [[ ${1:-} == http ]]; then shift; exec bash "$here/http.sh" "$@"; fi
repo=$(dirname "$here")
kit=${ER_BENCH_KIT:-$repo/../shared/bench}
rounds=${1:-${ROUNDS:-3}}
n=${2:-${N:-100000}}
only=${ROWS:-}
bin=${ER_BINARY:-$repo/build/event-router}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}
[[ -x $bin ]] || { echo "build first: $bin not found" >&2; exit 1; }
[[ -f $kit/drain.sh ]] || { echo "benchmark kit not found at $kit (set ER_BENCH_KIT)" >&2; exit 1; }
. "$here/lib.sh"

# name               prefetch aggregates compare-with     goal   env               command
ROWS_TABLE='
raw-p10              10    0    -                -      -                 raw
raw-p100             100   0    -                -      -                 raw
raw-p1000            1000  0    -                -      -                 raw
router-p10           10    0    raw-p10          1.0    -                 noop.yaml
router-p100          100   0    raw-p100         1.0    -                 noop.yaml
router-p1000         1000  0    raw-p1000        1.0    -                 noop.yaml
router-p1000-ack1    1000  0    raw-p1000        -      BENCH_ACK_WINDOW=0 noop.yaml
recommended          1000  0    raw-p1000        1.1    -                 noop-recommended.yaml
dedupe-p10           10    0    router-p10       -      -                 noop-dedupe.yaml
schemas-p100         100   0    router-p100      0.9    -                 noop-schemas.yaml
agg1000-p100         100   1000 -                -      -                 noop.yaml
agg1000-ordered-p100 100   1000 agg1000-p100     0.9    -                 noop-ordered.yaml
agg1-p1              1     1    -                -      -                 noop.yaml
agg1-ordered-p100    100   1    agg1-p1          -      -                 noop-ordered.yaml
'
# Further checks on the medians (python expressions over the rows, see below).
CHECKS='
broker CPU/msg, recommended vs raw-p1000 (<= 0.90)|cpu_ratio("recommended", "raw-p1000") <= 0.90
peak RSS draining at prefetch 10, no dedupe (<= 10 MiB)|rss("router-p10") <= 10.0
'

# Names are ours alone: nothing of a service or of another run is touched.
tag=er-bench-$$-$RANDOM
export ER_BENCH_EXCHANGE=$tag.events
export BENCH_QUEUE=$tag.q
export BENCH_STATE_DIR=$(mktemp -d /tmp/er-bench-state.XXXXXX)
out=$(mktemp /tmp/er-bench-out.XXXXXX)
cleanup() {
  set +e
  bench_cleanup "$tag" "$BENCH_QUEUE" "$BENCH_QUEUE.dlq"
  rm -rf "$BENCH_STATE_DIR" "$out"
}
trap cleanup EXIT

env -u ER_BENCH_CACHE bash "$kit/setup.sh" >/dev/null
# The kit's tools in a cache of our own, its preloader with one addition:
# BENCH_AGGREGATES=K draws aggregate ids from K (bench/preload_aggregates.c).
export ER_BENCH_CACHE=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/er-bench-router}
mkdir -p "$ER_BENCH_CACHE/bin"
gcc -O2 -I"$kit/c" -o "$ER_BENCH_CACHE/bin/preload" "$here/preload_aggregates.c" -lrabbitmq

# Select the rows: those asked for, and the ones they are compared with.
declare -A want=()
mapfile -t table < <(grep -v '^[[:space:]]*$' <<<"$ROWS_TABLE")
for line in "${table[@]}"; do
  read -r name _rest <<<"$line"
  [[ -n $only && ! $name =~ $only ]] || want[$name]=1
done
for _ in 1 2 3; do  # and what those compare with, and so on
  for line in "${table[@]}"; do
    read -r name _p _a base _rest <<<"$line"
    [[ -z ${want[$name]:-} || $base == - ]] || want[$base]=1
  done
done
# A config that is missing or that this binary refuses skips its rows.
declare -A skip=()
for line in "${table[@]}"; do
  read -r name prefetch _a _b _g _e cmd <<<"$line"
  [[ -n ${want[$name]:-} && $cmd != raw ]] || continue
  if [[ ! -f $here/$cmd ]]; then
    skip[$name]="bench/$cmd not found"
  elif ! BENCH_PREFETCH=$prefetch "$bin" --config "$here/$cmd" --check >/dev/null 2>&1; then
    skip[$name]="$cmd fails --check with this binary"
  fi
done

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/^Mem:/ {print $2}') GiB"
  echo "broker: RabbitMQ $(rabbitmqctl -q version 2>/dev/null || echo '?'); daemon: $("$bin" --version 2>/dev/null | head -1), $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$repo" diff --quiet 2>/dev/null || echo ' (modified)')"
  echo "run: $rounds rounds x N=$n, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$out"
for name in "${!skip[@]}"; do echo "skipped $name: ${skip[$name]}" | tee -a "$out"; done

# One queue gets the preloads: the raw peer consumes the daemon's.
bench_declare "$bin" "$here/noop.yaml"

for ((i = 1; i <= rounds; i++)); do
  for line in "${table[@]}"; do
    read -r name prefetch aggregates _base _goal env cmd <<<"$line"
    [[ -n ${want[$name]:-} && -z ${skip[$name]:-} ]] || continue
    vars=(BENCH_PREFETCH="$prefetch" BENCH_AGGREGATES="$aggregates")
    [[ $env == - ]] || vars+=("$env")
    rm -rf "$BENCH_STATE_DIR"  # with dedupe every round starts empty: all ids are new
    if [[ $cmd == raw ]]; then
      run=(bash "$kit/peer.sh" raw "$BENCH_QUEUE" "$prefetch")
    else
      run=("$bin" --config "$here/$cmd")
    fi
    env "${vars[@]}" bash "$kit/drain.sh" --queue "$BENCH_QUEUE" --count "$n" --name "$name" \
      --bind 'speaker.*' --bind 'draft.*' -- "${run[@]}" | tee -a "$out"
    # A dead-lettered event would time the dead-lettering: flag the row.
    dl=$(bench_dlq_count)
    if [[ ${dl:-0} != 0 ]]; then
      echo "dead-lettered: $name $dl" | tee -a "$out"
      rabbitmqctl -q purge_queue "$BENCH_QUEUE.dlq" >/dev/null
    fi
  done
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out"

/usr/bin/python3 - "$out" "$n" "$ROWS_TABLE" "$CHECKS" <<'PY'
import re, statistics, sys
out, n, table, checks = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = [l.split() for l in table.strip().splitlines()]
runs, dead = {}, {}
pat = re.compile(r"(\S+): (\d+) msgs in ([\d.]+) s = (\d+) msg/s .*rss=([\d.]+)MiB cpu=([\d.]+)s broker_cpu=([\d.]+)s\](.*)")
for line in open(out):
    m = pat.match(line)
    if m and m.group(1) != "preload":
        runs.setdefault(m.group(1), []).append(
            dict(rate=int(m.group(4)), rss=float(m.group(5)), cpu=float(m.group(6)), broker=float(m.group(7)),
                 note=m.group(8).strip()))
    m = re.match(r"dead-lettered: (\S+) (\d+)", line)
    if m:
        dead[m.group(1)] = dead.get(m.group(1), 0) + int(m.group(2))

def med(name, key):
    return statistics.median(r[key] for r in runs[name])
def rate(name): return med(name, "rate")
def cpu_us(name): return med(name, "broker") / n * 1e6
def own_us(name): return med(name, "cpu") / n * 1e6
def rss(name): return max(r["rss"] for r in runs[name])
def cpu_ratio(a, b): return cpu_us(a) / cpu_us(b)

print()
print("| row | prefetch | msg/s | compared with | x | goal | broker CPU/msg | own CPU/msg | peak RSS |")
print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
for name, prefetch, aggregates, base, goal, env, cmd in rows:
    if name not in runs:
        continue
    x = rate(name) / rate(base) if base in runs else None
    what = cmd + ("" if env == "-" else f" {env}") + ("" if aggregates == "0" else f", {aggregates} aggregates")
    flag = ""
    if goal != "-" and x is not None:
        flag = " ok" if x >= float(goal) else " MISSED"
    notes = "; ".join(sorted({r["note"] for r in runs[name] if r["note"]}))
    if name in dead:
        notes += f"; {dead[name]} dead-lettered"
    print(f"| {name} ({what}) | {prefetch} | {rate(name):.0f} | {base if base in runs else ''} | "
          f"{'' if x is None else f'{x:.2f}'} | {'' if goal == '-' else '>= ' + goal}{flag} | "
          f"{cpu_us(name):.1f} us | {own_us(name):.1f} us | {rss(name):.1f} MiB |" + (f" {notes}" if notes else ""))
print()
for line in checks.strip().splitlines():
    label, expr = line.split("|", 1)
    try:
        print(f"{label}: {'ok' if eval(expr) else 'MISSED'}")
    except KeyError as e:
        print(f"{label}: not run ({e} missing)")
print("runs per row (msg/s):", {k: [r["rate"] for r in v] for k, v in runs.items()})
PY
