#pragma once
// The shared dedupe store: one PostgreSQL table that several instances use,
// so that an event id that succeeded on one is a duplicate on all. Driven by
// the event loop without ever blocking it: libpq's asynchronous API in
// pipeline mode on one connection, its socket watched by asio; every query
// and every connection attempt has a time bound (`timeout`), enforced both by
// the server (statement_timeout) and here (tick(): twice the timeout, then
// the connection is dropped). Loop thread only.
//
// Table <table>(queue, event_id, done, owner, expires_at), primary key
// (queue, event_id), created if missing. Per event:
//  - check() claims the id: INSERT ... ON CONFLICT DO UPDATE taking the row
//    when it has expired, or when it is an unfinished claim of this instance
//    (owner = this process; the consumer's in-flight rule already keeps two
//    copies of one id from running at once here). Answers New (claimed: run
//    it), Seen (done and not expired: ack it as a duplicate) or Busy (an
//    unexpired claim of another instance: it runs there now).
//  - record() after success: the row becomes done, expiring after the
//    queue's ttl. Sent before the ack, on the same pipeline, but the ack does
//    not wait for its answer (see the crash window in docs/reliability.md).
//  - release() after a failure or a hand-back: the claim is deleted, so a
//    retry copy may run on any instance at once.
//  - A claim expires after `lease`: an instance killed mid-event leaves one
//    that keeps other instances off that id until then (they hand it back).
//  - Pruning: every ~10 s, up to 10000 expired rows are deleted (sooner again
//    while there are more). Expiry itself never waits for pruning.
// Unreachable (down, refused, timed out): check() answers Unavailable (at
// once while disconnected), record()/release() are dropped with a warning;
// reconnection is tried with backoff (0.5 s doubling to 30 s), first on
// tick() or check(). ready() says so.
//
// The connection string goes to libpq as it is; a host name is resolved
// inside PQconnectStart (blocking): give an IP address (or hostaddr=) where
// a slow resolver matters.
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>

#include "config/config.hpp"
#include "dedupe/backend.hpp"

typedef struct pg_conn PGconn;

namespace er::dedupe {

class PgStore final : public Backend, public std::enable_shared_from_this<PgStore> {
 public:
  static constexpr int kPruneBatch = 10000;
  // Construct with make_shared (callbacks hold weak references). Connects
  // later, on the loop.
  PgStore(boost::asio::io_context& io, const config::DedupeStoreConfig& cfg);
  ~PgStore() override;
  PgStore(const PgStore&) = delete;
  PgStore& operator=(const PgStore&) = delete;

  bool asynchronous() const override { return true; }
  void check(std::string_view queue, std::string_view event_id, Done done) override;
  void record(std::string_view queue, std::string_view event_id, std::chrono::seconds ttl) override;
  void release(std::string_view queue, std::string_view event_id) override;
  void tick() override;
  // Waits (bounded by `timeout`) for what was sent, then disconnects.
  void close() override;
  bool ready(std::string& reason) const override;

  const config::DedupeStoreConfig& config() const { return cfg_; }
  const std::string& owner() const { return owner_; }
  struct Stats {
    uint64_t queries = 0;      // answered
    uint64_t failures = 0;     // answered with an error, or never (connection lost)
    uint64_t timeouts = 0;     // connections dropped for a late answer
    uint64_t connects = 0;     // connections established
    uint64_t pruned = 0;       // rows deleted by pruning
  };
  const Stats& stats() const { return stats_; }
  bool connected() const { return state_ == State::Ready; }

 private:
  enum class Kind { Claim, Record, Release, Prune };
  enum class State { Down, Connecting, Setup, Ready, Closed };
  struct Request {
    explicit Request(Kind k, std::string_view q = {}, std::string_view id = {}) : kind(k), queue(q), event_id(id) {}
    Kind kind;
    std::string queue, event_id;
    double seconds = 0;  // lease or ttl
    Done done;           // Claim only
    std::chrono::steady_clock::time_point deadline;
    char answer = 0;     // Claim: 'c', 'd', 'b'
    bool failed = false;
    std::string error;
  };
  using clock = std::chrono::steady_clock;

  void submit(Request r);
  void send(Request& r);
  void flush_out();
  void connect();
  void connect_step();
  void setup_done();
  void on_readable();
  void read_results();
  void complete(Request& r);
  void lost(const std::string& why);  // drops the connection, fails what was sent
  void teardown() noexcept;
  void bind_socket();
  void wait(bool write);

  boost::asio::io_context& io_;
  config::DedupeStoreConfig cfg_;
  std::string owner_;
  std::string lease_s_;
  PGconn* conn_ = nullptr;
  boost::asio::posix::stream_descriptor sock_;
  int fd_ = -1;
  bool reading_ = false, writing_ = false;
  // Incremented per connection: a wait of an older one is ignored.
  uint64_t epoch_ = 0;
  State state_ = State::Down;
  clock::time_point connect_deadline_{};
  clock::time_point next_attempt_{};  // Down: no connection attempt before
  std::chrono::milliseconds backoff_{0};
  std::string last_error_;
  std::deque<Request> waiting_;  // submitted while connecting
  std::deque<Request> sent_;     // in the pipeline, in order
  bool setup_failed_ = false;
  std::string setup_error_;
  unsigned ticks_ = 0;
  bool prune_sent_ = false;
  bool prune_again_ = false;
  Stats stats_;
};

}  // namespace er::dedupe
