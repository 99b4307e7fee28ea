// Micro-benchmark of er::dedupe::Store on the hot path: seen() + record() per
// event, commits driven by flush() as the daemon's 100 ms timer would.
// Build (standalone, not part of CMake):
//   g++ -std=c++17 -O2 -DNDEBUG -Isrc bench/dedupe_bench.cpp src/dedupe/store.cpp src/util/log.cpp src/util/time.cpp \
//       -lsqlite3 -o dedupe_bench
// Run: ./dedupe_bench [N=200000] [dir=fresh mkdtemp under /tmp]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <time.h>

#include "dedupe/store.hpp"

using namespace std::chrono;
using er::dedupe::Store;

namespace {

std::vector<std::string> make_ids(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::string> ids;
  ids.reserve(n);
  char buf[40];
  for (size_t i = 0; i < n; ++i) {
    uint64_t a = rng(), b = rng();
    std::snprintf(buf, sizeof buf, "%08x-%04x-4%03x-%04x-%012llx", unsigned(a >> 32), unsigned(a >> 16) & 0xffff,
                  unsigned(a) & 0xfff, 0x8000 | (unsigned(b >> 48) & 0x3fff),
                  static_cast<unsigned long long>(b & 0xffffffffffffULL));
    ids.emplace_back(buf);
  }
  return ids;
}

// The no-op handler, called through a volatile pointer so the loop is not optimised away.
size_t handled = 0;
void noop_handler(const std::string& id) { handled += id.size() & 1; }
void (*volatile handler)(const std::string&) = noop_handler;

struct FlushStats {
  size_t commits = 0;
  double max_us = 0, total_us = 0;
};

// The daemon's timer: flush() is cheap when nothing is due; time the ones that commit.
void tick(Store& s, FlushStats& fs, bool force = false) {
  auto t0 = steady_clock::now();
  size_t n = s.flush(force);
  if (n == 0) return;
  double us = duration<double, std::micro>(steady_clock::now() - t0).count();
  ++fs.commits;
  fs.total_us += us;
  if (us > fs.max_us) fs.max_us = us;
}

double ns_per(steady_clock::duration d, size_t n) { return duration<double, std::nano>(d).count() / double(n); }

// Process CPU time (user + system, one thread): on a shared box wall time also counts waiting for a core.
double cpu_ns() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) * 1e9 + double(ts.tv_nsec);
}
double last_cpu_ns_per_op = 0;

// Events as the daemon handles them: skip duplicates, else run the handler and record.
// commit_every == 0: flush() as a 100 ms timer would (at full speed batches
// reach kMaxBatch first); else a commit every that many events, i.e. the
// batches a 100 ms timer gives at commit_every * 10 events/s.
double run_events(Store& s, const std::vector<std::string>& ids, FlushStats& fs, size_t* dups,
                  size_t commit_every = 0) {
  double c0 = cpu_ns();
  auto t0 = steady_clock::now();
  for (size_t i = 0; i < ids.size(); ++i) {
    if (s.seen("orders", ids[i])) {
      ++*dups;
    } else {
      handler(ids[i]);
      s.record("orders", ids[i], hours(24));
    }
    if (commit_every ? (i + 1) % commit_every == 0 : (i & 255) == 0) tick(s, fs, commit_every != 0);
  }
  tick(s, fs, true);
  auto wall = steady_clock::now() - t0;
  last_cpu_ns_per_op = (cpu_ns() - c0) / double(ids.size());
  return ns_per(wall, ids.size());
}

void report(const char* name, double ns, double base, const FlushStats& fs, const Store& s, size_t dups) {
  std::printf("%-28s wall %6.0f ns/op (+%6.0f over baseline), cpu %6.0f ns/op | timer commits=%zu max=%.1fms avg=%.1fms"
              " | ram_answers=%llu bloom_negatives=%llu sql_lookups=%llu dups=%zu\n",
              name, ns, ns - base, last_cpu_ns_per_op, fs.commits, fs.max_us / 1000,
              fs.commits ? fs.total_us / fs.commits / 1000 : 0.0,
              static_cast<unsigned long long>(s.stats().memory_hits),
              static_cast<unsigned long long>(s.stats().bloom_negatives),
              static_cast<unsigned long long>(s.stats().db_lookups), dups);
}

}  // namespace

int main(int argc, char** argv) {
  size_t n = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 200000;
  std::string dir;
  if (argc > 2) {
    dir = argv[2];
  } else {
    char tmpl[] = "/tmp/dedupe-bench-XXXXXX";
    if (!::mkdtemp(tmpl)) return 1;
    dir = tmpl;
  }
  auto ids = make_ids(n, 1);
  auto fresh = make_ids(n, 2);
  auto fresh2 = make_ids(n, 3);

  // Baseline: the same loop without the store.
  auto t0 = steady_clock::now();
  for (size_t i = 0; i < ids.size(); ++i) handler(ids[i]);
  double base = ns_per(steady_clock::now() - t0, n);
  std::printf("N=%zu dir=%s memory_entries=%zu\n", n, dir.c_str(), Store::kDefaultMemoryEntries);
  std::printf("%-34s %8.1f ns/op\n", "baseline (no store)", base);

  {
    Store s(dir);
    FlushStats fs;
    size_t dups = 0;
    double ns = run_events(s, ids, fs, &dups);
    report("new ids, empty db", ns, base, fs, s, dups);

    FlushStats fs2;
    size_t dups2 = 0;
    double ns2 = run_events(s, ids, fs2, &dups2);  // every one a redelivery
    report("redelivered ids (all dups)", ns2, base, fs2, s, dups2);
  }
  {
    // After a restart: RAM is empty and the table is not; the filter spares most SELECTs.
    auto o0 = steady_clock::now();
    Store s(dir);
    std::printf("reopen with %zu rows: %.0f ms\n", 2 * n, duration<double, std::milli>(steady_clock::now() - o0).count());
    FlushStats fs;
    size_t dups = 0;
    double ns = run_events(s, fresh, fs, &dups);
    report("new ids, after restart", ns, base, fs, s, dups);
  }
  {
    // As above, with the small batches of a 100 ms timer at 20k events/s.
    Store s(dir);
    FlushStats fs;
    size_t dups = 0;
    double ns = run_events(s, fresh2, fs, &dups, 2000);
    report("same, commit/2000 (20k ev/s)", ns, base, fs, s, dups);
  }
  auto size = [&](const char* f) {
    std::error_code ec;
    auto sz = std::filesystem::file_size(std::filesystem::path(dir) / f, ec);
    return ec ? 0.0 : double(sz) / (1 << 20);
  };
  std::printf("files: dedupe.sqlite %.1f MiB, -wal %.1f MiB\n", size("dedupe.sqlite"), size("dedupe.sqlite-wal"));
  if (argc <= 2) std::filesystem::remove_all(dir);
  return handled == 12345678 ? 2 : 0;
}
