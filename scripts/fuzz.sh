#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang + ASan/UBSan) and runs each for a
# bounded time on a copy of its seed corpus. Fails on any crash, hang, leak,
# OOM or sanitizer report; exits 77 (skip) when clang/libFuzzer is missing.
#
#   scripts/fuzz.sh [SECONDS] [--target envelope|config|copy_props]
#   env: ER_FUZZ_SECONDS (default 30), ER_FUZZ_BUILD_DIR (default <repo>/build-fuzz),
#        ER_FUZZ_ARGS (extra libFuzzer flags)
# Crash inputs are kept in $ER_FUZZ_BUILD_DIR/artifacts/<target>/.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
seconds="${ER_FUZZ_SECONDS:-30}"
targets=(envelope config copy_props)
only=""

while [ $# -gt 0 ]; do
  case "$1" in
    --target) only="${2:-}"; shift 2 || { echo "fuzz.sh: --target needs a name" >&2; exit 2; } ;;
    --target=*) only="${1#--target=}"; shift ;;
    -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *[!0-9]*|"") echo "fuzz.sh: unknown argument '$1'" >&2; exit 2 ;;
    *) seconds="$1"; shift ;;
  esac
done
case "$seconds" in ''|*[!0-9]*) echo "fuzz.sh: seconds must be a whole number, got '$seconds'" >&2; exit 2 ;; esac
if [ -n "$only" ]; then
  case " ${targets[*]} " in *" $only "*) targets=("$only") ;;
    *) echo "fuzz.sh: unknown target '$only' (envelope, config, copy_props)" >&2; exit 2 ;; esac
fi

# Skip (77) when the toolchain is missing.
skip() { echo "fuzz.sh: SKIP: $*" >&2; exit 77; }
if ! command -v clang++ >/dev/null 2>&1 || ! command -v clang >/dev/null 2>&1; then
  skip "clang/clang++ not found (apt-get install -y clang libclang-rt-14-dev)"
fi
command -v cmake >/dev/null 2>&1 || skip "cmake not found"
work="$(mktemp -d "${TMPDIR:-/tmp}/er-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
printf 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\n' \
  >"$work/probe.cpp"
clang++ -fsanitize=fuzzer,address,undefined "$work/probe.cpp" -o "$work/probe" >"$work/probe.log" 2>&1 \
  || { cat "$work/probe.log" >&2; skip "clang cannot link -fsanitize=fuzzer (apt-get install -y libclang-rt-14-dev)"; }

build="${ER_FUZZ_BUILD_DIR:-$repo/build-fuzz}"
echo "fuzz.sh: building in $build"
if ! cmake -S "$repo/fuzz" -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang \
       -DCMAKE_BUILD_TYPE= >"$work/cmake.log" 2>&1; then
  cat "$work/cmake.log" >&2
  echo "fuzz.sh: cmake configure failed" >&2
  exit 1
fi
if ! cmake --build "$build" -j "${ER_FUZZ_JOBS:-2}"; then
  echo "fuzz.sh: build failed" >&2
  exit 1
fi

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

status=0
summary=()
for t in "${targets[@]}"; do
  bin="$build/fuzz_$t"
  corpus="$work/corpus-$t"
  artifacts="$build/artifacts/$t/"
  mkdir -p "$corpus" "$artifacts"
  cp -R "$repo/fuzz/corpus/$t/." "$corpus/" 2>/dev/null || true
  seeds=$(find "$corpus" -type f | wc -l)
  # 0 seconds: only replay the seeds (-max_total_time=0 would mean "forever").
  if [ "$seconds" -eq 0 ]; then limit=(-runs=0); else limit=(-max_total_time="$seconds"); fi
  args=("${limit[@]}" -timeout=10 -rss_limit_mb=2048 -max_len=65536
        -print_final_stats=1 -artifact_prefix="$artifacts"
        # libFuzzer's default error exit code is 77, which ctest would read as "skipped".
        -error_exitcode=1 -timeout_exitcode=1)
  if [ "$t" = config ] && [ -f "$repo/fuzz/config.dict" ]; then
    args+=(-dict="$repo/fuzz/config.dict")
  fi
  # shellcheck disable=SC2206
  args+=(${ER_FUZZ_ARGS:-})
  echo "fuzz.sh: running fuzz_$t for ${seconds}s ($seeds seeds)"
  log="$work/$t.log"
  TMPDIR="$work" "$bin" "${args[@]}" "$corpus" 2>&1 | tee "$log" \
    | grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse|INITED)|^[[:space:]]+NEW_FUNC|# Uses: [0-9]+$'
  rc=${PIPESTATUS[0]}
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
  files=$(find "$corpus" -type f | wc -l)
  if [ "$rc" -eq 0 ]; then
    verdict=ok
  else
    verdict="FAILED (exit $rc)"
    status=1
    # Only a real fuzzer failure leaves the crash-*/timeout-*/leak-*/oom-* file.
    found=$(grep -E -o "Test unit written to [^ ]+" "$log" | tail -1 | sed 's/Test unit written to //')
    [ -n "$found" ] && verdict+="; reproduce: $bin $found"
  fi
  summary+=("fuzz_$t: $verdict; runs ${runs:-?}, ${eps:-?} exec/s, peak rss ${rss:-?} MB, corpus $seeds -> $files files")
done

echo
for line in "${summary[@]}"; do echo "fuzz.sh: $line"; done
exit "$status"
