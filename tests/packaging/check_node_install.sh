#!/usr/bin/env bash
# The Node worker helper installs where node's require() finds it without
# NODE_PATH under the prefix /usr (the .deb's and the image's): Debian's node
# searches /usr/share/nodejs, NodeSource and upstream builds /usr/lib/node.
# Installs only the node-worker component (no daemon build needed).
#   check_node_install.sh BUILD_DIR
set -euo pipefail
build=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --component node-worker --prefix "$tmp" >/dev/null
fail() { echo "FAIL: $*"; exit 1; }
mod="$tmp/share/nodejs/@event-router/worker"
for f in package.json index.js index.d.ts README.md; do [ -f "$mod/$f" ] || fail "$mod/$f not installed"; done
[ "$(readlink -f "$tmp/lib/node/@event-router/worker")" = "$(readlink -f "$mod")" ] ||
  fail "lib/node/@event-router/worker does not lead to share/nodejs/@event-router/worker"
[ -z "$(find "$tmp" -path '*test*' -o -name node_modules)" ] || fail "tests or node_modules installed"
if command -v node >/dev/null 2>&1; then
  # This machine's node: one of the two folders is in its global paths under /usr...
  prefix=$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")
  [ "$prefix" = /usr ] || { echo "node is under $prefix, not /usr: global path check skipped"; prefix=""; }
  if [ -n "$prefix" ]; then
    env -u NODE_PATH node -e '
      const g = require("module").globalPaths;
      if (!g.includes("/usr/share/nodejs") && !g.includes("/usr/lib/node")) {
        console.error("neither /usr/share/nodejs nor /usr/lib/node in", g); process.exit(1);
      }' || fail "node does not search the install folders"
  fi
  # ...and through each, the package loads by its name (from the installed
  # files: require resolves the link).
  for dir in "$tmp/share/nodejs" "$tmp/lib/node"; do
    NODE_PATH=$dir MOD=$(readlink -f "$mod") node -e '
      const w = require("@event-router/worker");
      if (require.resolve("@event-router/worker") !== process.env.MOD + "/index.js") process.exit(1);
      if (typeof w.Worker !== "function" || w.PROTOCOL_VERSION !== 1) process.exit(1);' ||
      fail "@event-router/worker does not load from $dir"
  done
fi
echo "node helper install ok: share/nodejs/@event-router/worker, lib/node link"
