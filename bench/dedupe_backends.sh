#!/usr/bin/env bash
# SQLite vs PostgreSQL dedupe, per event, in one run (bench/dedupe_backends_bench.cpp),
# against a throw-away PostgreSQL 15 (tests/integration/pg_node.py; needs root and
# postgresql-15). Usage: bench/dedupe_backends.sh [N=20000] [window=10]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${BUILD_DIR:-build}/dedupe_backends_bench
[ -x "$BIN" ] || make -C "${BUILD_DIR:-build}" dedupe_backends_bench >/dev/null
exec /usr/bin/python3 - "$BIN" "${1:-20000}" "${2:-10}" <<'PY'
import subprocess, sys
sys.path.insert(0, "tests/integration")
import pg_node
pg = pg_node.PgNode()
try:
    pg.start()
    sys.exit(subprocess.call([sys.argv[1], pg.url, sys.argv[2], sys.argv[3]]))
finally:
    pg.close()
PY
