// The PostgreSQL store without a server: what a refused connection does (the
// store's behaviour against a real server is in tests/integration/test_dedupe_pg.py).
#include <catch2/catch.hpp>

#include <boost/asio/io_context.hpp>

#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include <chrono>
#include <optional>
#include <string>

#include "dedupe/open.hpp"
#include "dedupe/pg_store.hpp"
#include "dedupe/store.hpp"

using namespace er::dedupe;
using namespace std::chrono_literals;

namespace {
// A local port that refuses connections: bound, never listened on.
struct RefusingPort {
  int fd = -1;
  int port = 0;
  RefusingPort() {
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    port = ntohs(a.sin_port);
  }
  ~RefusingPort() { ::close(fd); }
};
}  // namespace

TEST_CASE("PgStore: a refused connection answers Unavailable, not ready, retried with backoff", "[dedupe]") {
  RefusingPort p;
  boost::asio::io_context io;
  er::config::DedupeStoreConfig cfg;
  cfg.postgres = "postgresql://u@127.0.0.1:" + std::to_string(p.port) + "/db";
  auto store = std::make_shared<PgStore>(io, cfg);
  std::string reason;
  CHECK_FALSE(store->ready(reason));
  CHECK(reason.find("dedupe store (PostgreSQL) unavailable") != std::string::npos);

  std::optional<Check> got;
  store->check("q", "id-1", [&](Check c) { got = c; });
  for (int i = 0; i < 200 && !got; ++i) io.run_for(10ms);
  REQUIRE(got);
  CHECK(*got == Check::Unavailable);
  CHECK_FALSE(store->ready(reason));
  CHECK(reason.find("cannot connect") != std::string::npos);

  // Within the backoff: answered at once, without a new attempt.
  std::optional<Check> again;
  store->check("q", "id-2", [&](Check c) { again = c; });
  CHECK((again && *again == Check::Unavailable));
  store->record("q", "id-1", 60s);  // dropped with a warning, no throw
  CHECK(store->stats().connects == 0);
  CHECK(store->stats().failures >= 2);

  // `on_unavailable: run` keeps the instance ready (it handles events).
  cfg.on_unavailable = er::config::DedupeUnavailable::Run;
  auto run = std::make_shared<PgStore>(io, cfg);
  CHECK(run->ready(reason));
}

TEST_CASE("open_store: the kind the config asks for, the running one when unchanged", "[dedupe]") {
  boost::asio::io_context io;
  er::config::Config none;
  none.queues.emplace_back();
  CHECK(open_store(io, none) == nullptr);  // no queue dedupes

  er::config::Config pg = none;
  pg.queues[0].dedupe_ttl = std::chrono::hours(1);
  pg.dedupe_store.postgres = "postgresql://u@127.0.0.1:1/db";
  auto a = open_store(io, pg);
  REQUIRE(a);
  CHECK(a->asynchronous());
  CHECK(open_store(io, pg, &pg, a) == a);
  er::config::Config pg2 = pg;
  pg2.dedupe_store.lease = std::chrono::minutes(1);
  auto b = open_store(io, pg2, &pg, a);
  CHECK(b != a);
  CHECK(b->asynchronous());
}
