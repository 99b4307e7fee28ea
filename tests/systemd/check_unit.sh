#!/usr/bin/env bash
# Gates for the systemd unit: `systemd-analyze verify` passes and
# `systemd-analyze security --offline=true` scores 2.0 or lower.
#   check_unit.sh UNIT_FILE BINARY CONFIG_DIR
set -euo pipefail
unit=$1 bin=$2 confdir=$3
command -v systemd-analyze >/dev/null || { echo "systemd-analyze not found: skipped"; exit 77; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The unit names installed paths; point them at this build so verify can check them.
sed -e "s|ExecStart=[^ ]*/event-router|ExecStart=$bin|" \
    -e "s|ExecStartPre=[^ ]*/event-router|ExecStartPre=$bin|" \
    -e "s|ExecReload=[^ ]*/event-router|ExecReload=$bin|" \
    -e "s|/etc/event-router|$confdir|g" "$unit" > "$tmp/event-router.service"
echo "== systemd-analyze verify"
systemd-analyze verify "$tmp/event-router.service"
echo "== systemd-analyze security --offline=true"
out=$(systemd-analyze security --offline=true "$tmp/event-router.service" 2>&1)
echo "$out" | tail -1
score=$(echo "$out" | sed -n 's/.*Overall exposure level for event-router.service: \([0-9.]*\).*/\1/p')
[[ -n $score ]] || { echo "could not read the exposure score"; exit 1; }
awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }' || { echo "exposure $score is above 2.0"; exit 1; }
echo "exposure $score <= 2.0: ok"
