#!/usr/bin/env bash
# The installed tree has the modes SECURITY.md promises: router.yaml 0640
# (it may hold credentials), the sysusers.d entry that gives the service its
# group, and the unit reading secrets from an EnvironmentFile.
#   check_install.sh BUILD_DIR
set -euo pipefail
build=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp" >/dev/null
fail() { echo "FAIL: $*"; exit 1; }
mode=$(stat -c %a "$tmp/etc/event-router/router.yaml")
[ "$mode" = 640 ] || fail "router.yaml installed with mode $mode, want 640"
grep -q '^u event-router ' "$tmp/lib/sysusers.d/event-router.conf" || fail "sysusers.d entry for event-router missing"
unit=$(find "$tmp" -name event-router.service | head -1)
grep -q '^EnvironmentFile=-/etc/default/event-router$' "$unit" || fail "unit lacks EnvironmentFile=-/etc/default/event-router"
grep -q 'chgrp event-router' "$(dirname "$0")/../../packaging/debian/postinst" || fail "postinst does not give router.yaml to the group"
echo "install modes ok: router.yaml 640, sysusers.d entry, EnvironmentFile"
