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
# The Python worker helper: in lib/python3/dist-packages, which Debian's
# python3 searches under /usr (the .deb's and the image's prefix).
[ -f "$tmp/lib/python3/dist-packages/event_router/__init__.py" ] || fail "event_router not in lib/python3/dist-packages"
[ -z "$(find "$tmp/lib/python3/dist-packages/event_router" -name __pycache__)" ] || fail "__pycache__ installed"
if [ -x /usr/bin/python3 ]; then
  /usr/bin/python3 -c 'import sys; sys.exit("/usr/lib/python3/dist-packages" not in sys.path)' ||
    fail "/usr/bin/python3 does not search /usr/lib/python3/dist-packages"
  /usr/bin/python3 -I -B -c 'import sys; sys.path.insert(0, sys.argv[1]); import event_router; assert event_router.__file__.startswith(sys.argv[1]), event_router.__file__' "$tmp/lib/python3/dist-packages" ||
    fail "the installed event_router does not import"
fi
[ -x "$tmp/etc/event-router/handlers/rag_worker.py" ] || fail "handlers/rag_worker.py not installed executable"
echo "install modes ok: router.yaml 640, sysusers.d entry, EnvironmentFile, event_router for python3"
