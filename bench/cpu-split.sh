#!/usr/bin/env bash
# cpu-split.sh OUT CMD ARGS...: runs CMD; when told to stop (SIGTERM, as
# drain.sh does once the queue is empty), first writes "router_s children_s"
# to OUT: the CPU seconds of CMD itself and of its descendants (live worker
# processes, reaped exec children), so a run can say how the two cores were shared.
set -uo pipefail
out=$1; shift
tck=$(getconf CLK_TCK)
"$@" & pid=$!
split() {
  local own=0 kids=0 f st a
  declare -A parent
  for f in /proc/[0-9]*/stat; do
    read -r st 2>/dev/null <"$f" || continue
    local p=${f#/proc/}; p=${p%/stat}
    read -r -a a <<<"${st##*) }"   # a[1] = ppid, a[11] utime, a[12] stime
    parent[$p]="${a[1]} $((a[11] + a[12]))"
    # reaped children (exec handlers) count as children
    [[ $p == "$pid" ]] && kids=$((a[13] + a[14]))
  done
  own=${parent[$pid]#* }
  for p in "${!parent[@]}"; do      # descendants: walk each process's ancestry
    local q=${parent[$p]%% *} hops=0
    while [[ -n ${parent[$q]:-} && $q != "$pid" && $hops -lt 16 ]]; do q=${parent[$q]%% *}; hops=$((hops + 1)); done
    [[ $q == "$pid" && $p != "$pid" ]] && kids=$((kids + ${parent[$p]#* }))
  done
  awk -v o="${own:-0}" -v k="$kids" -v t="$tck" 'BEGIN { printf "%.2f %.2f\n", o / t, k / t }' >"$out"
  kill -TERM "$pid" 2>/dev/null
}
trap split TERM INT
wait "$pid"; wait "$pid"
