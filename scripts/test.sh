#!/usr/bin/env bash
# Installs dependencies, builds, starts RabbitMQ and runs all tests with ctest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-deps.sh

# The tests need Debian's python3 (it has python3-aio-pika); another python3
# (pyenv and such) may come first on PATH.
python_args=()
if [ -x /usr/bin/python3 ]; then python_args=(-DPython3_EXECUTABLE=/usr/bin/python3); fi

# CMP0110 NEW: test names with spaces ("integration: test_flow") need it, and
# cmake_minimum_required(VERSION 3.16) leaves it OLD, which breaks add_test().
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_POLICY_DEFAULT_CMP0110=NEW "${python_args[@]}"
cmake --build build -j2
# The same sources with AddressSanitizer + UBSan (no fuzz, container or
# systemd tests there: the plain build runs those). -O1: the usual level for
# sanitizer builds, and it compiles about a third faster than -O2 with ASan.
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DER_SANITIZE=address,undefined \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g -DNDEBUG" -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g -DNDEBUG" \
  -DCMAKE_POLICY_DEFAULT_CMP0110=NEW "${python_args[@]}"
cmake --build build-asan -j2

bash scripts/start-rabbitmq.sh

if [ ! -f tests/integration/node_modules/amqplib/package.json ]; then
  (cd tests/integration && npm ci --no-audit --no-fund --loglevel=error)
fi

# Two tiers, both always run, both decide the exit status. Extra arguments
# (e.g. -R test_flow) select tests in both; without any, the sanitizer tier
# runs the unit tests and the integration tests of the lifecycle paths.
asan_select=(-R '^unit:|^integration: test_(reload|faults|shutdown|retry|bad_input|failures|verdicts|soak|lifecycle|hostile|ordering|plugin_async|workers|emit|hot_path|plan|instances|http_push|crash_loop|dedupe_pg|quorum)$')
if [ "$#" -gt 0 ]; then asan_select=("$@"); fi

# A long failed output keeps its head and its end (where the reason is).
ctest_args=(--output-on-failure --test-output-truncation middle -j2)
status=0 failed=()
echo "== tier 1: build/ (plain) =="
ctest --test-dir build "${ctest_args[@]}" "$@" || { status=1; failed+=(build); }
echo "== tier 2: build-asan/ (AddressSanitizer + UBSan) =="
# tests/CMakeLists.txt sets ASAN_OPTIONS; UBSan's stack must come from here
# for the unit tests (see there).
UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1 \
  ctest --test-dir build-asan "${ctest_args[@]}" "${asan_select[@]}" || { status=1; failed+=(build-asan); }
# The reasons again, last: a log cut to its head and tail keeps them.
for dir in "${failed[@]}"; do
  echo "== failed in $dir/ =="
  /usr/bin/python3 scripts/failed-tests.py "$dir" || true
done
exit "$status"
