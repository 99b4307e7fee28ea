// The dedupe stores compared through the consumer's interface (dedupe::Backend):
// per event check() then, when new, record(), with `window` events in flight
// (like a queue's prefetch), ticks every 100 ms as the daemon's timer does.
// SQLite answers at once; PostgreSQL answers later, over one pipelined
// connection. A first pass of new ids, then the same ids again (duplicates).
// Build: make -C build dedupe_backends_bench
// Run:   bench/dedupe_backends.sh [N=20000] [window=10]   (starts a throw-away PostgreSQL)
//   or:  build/dedupe_backends_bench POSTGRES_URL [N] [window]
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dedupe/pg_store.hpp"
#include "dedupe/store.hpp"

using namespace std::chrono;
namespace asio = boost::asio;
using er::dedupe::Backend;
using er::dedupe::Check;

namespace {

struct Pass {
  double seconds = 0;
  size_t n = 0, news = 0, seen = 0, other = 0;
  double mean_answer_us = 0;  // check() to its answer
};

Pass run_pass(asio::io_context& io, Backend& store, const std::vector<std::string>& ids, size_t window) {
  Pass p;
  p.n = ids.size();
  size_t next = 0, in_flight = 0, done = 0;
  double answer_us = 0;
  bool pumping = false;
  std::function<void()> pump = [&] {
    if (pumping) return;
    pumping = true;
    while (in_flight < window && next < ids.size()) {
      const std::string& id = ids[next++];
      ++in_flight;
      auto t0 = steady_clock::now();
      store.check("bench.q", id, [&, t0, idp = &id](Check c) {
        answer_us += duration<double, std::micro>(steady_clock::now() - t0).count();
        if (c == Check::New) {
          ++p.news;
          store.record("bench.q", *idp, seconds(3600));  // the no-op handler succeeded
        } else if (c == Check::Seen) {
          ++p.seen;
        } else {
          ++p.other;
        }
        --in_flight;
        ++done;
        pump();
      });
    }
    pumping = false;
    if (in_flight < window && next < ids.size()) pump();  // answered synchronously meanwhile
  };
  asio::steady_timer timer(io);
  std::function<void()> arm = [&] {
    timer.expires_after(milliseconds(100));
    timer.async_wait([&](boost::system::error_code ec) {
      if (ec) return;
      store.tick();
      arm();
    });
  };
  arm();
  auto t0 = steady_clock::now();
  pump();
  while (done < ids.size()) io.run_one_for(milliseconds(100));
  p.seconds = duration<double>(steady_clock::now() - t0).count();
  timer.cancel();
  io.poll();
  p.mean_answer_us = answer_us / double(p.n);
  return p;
}

void report(const char* name, const char* pass, const Pass& p) {
  std::printf("%-10s %-10s %8zu %10.0f %10.1f %12.1f   new=%zu seen=%zu other=%zu\n", name, pass, p.n,
              double(p.n) / p.seconds, 1e6 * p.seconds / double(p.n), p.mean_answer_us, p.news, p.seen, p.other);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s POSTGRES_URL [N=20000] [window=10]\n", argv[0]);
    return 2;
  }
  const size_t n = argc > 2 ? std::strtoul(argv[2], nullptr, 10) : 20000;
  const size_t window = argc > 3 ? std::strtoul(argv[3], nullptr, 10) : 10;
  std::vector<std::string> ids;
  ids.reserve(n);
  const auto salt = std::to_string(steady_clock::now().time_since_epoch().count());
  for (size_t i = 0; i < n; ++i) ids.push_back(salt + "-" + std::to_string(i));

  std::printf("%-10s %-10s %8s %10s %10s %12s\n", "store", "pass", "events", "msg/s", "us/event", "answer_us");
  {
    asio::io_context io;
    char tmpl[] = "/tmp/er-dedupe-bench-XXXXXX";
    if (!::mkdtemp(tmpl)) return 1;
    {
      er::dedupe::Store s(tmpl);
      report("sqlite", "new", run_pass(io, s, ids, window));
      report("sqlite", "duplicate", run_pass(io, s, ids, window));
      s.close();
    }
    std::filesystem::remove_all(tmpl);
  }
  {
    asio::io_context io;
    er::config::DedupeStoreConfig cfg;
    cfg.postgres = argv[1];
    cfg.table = "er_bench_" + salt.substr(salt.size() - 8);
    auto s = std::make_shared<er::dedupe::PgStore>(io, cfg);
    report("postgres", "new", run_pass(io, *s, ids, window));
    report("postgres", "duplicate", run_pass(io, *s, ids, window));
    s->close();
    std::printf("postgres: %llu queries, %llu failures, %llu timeouts\n",
                static_cast<unsigned long long>(s->stats().queries), static_cast<unsigned long long>(s->stats().failures),
                static_cast<unsigned long long>(s->stats().timeouts));
  }
  return 0;
}
