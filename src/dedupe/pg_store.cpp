#include "dedupe/pg_store.hpp"

#include "dedupe/libpq.hpp"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <random>

#include "util/log.hpp"

namespace er::dedupe {

namespace asio = boost::asio;
using std::chrono::milliseconds;

namespace {

constexpr auto kMaxBackoff = milliseconds(30000);
constexpr auto kFirstBackoff = milliseconds(500);

std::string make_owner() {
  char host[64] = {};
  ::gethostname(host, sizeof host - 1);
  std::random_device rd;
  char tail[24];
  std::snprintf(tail, sizeof tail, ":%d:%08x", static_cast<int>(::getpid()), rd());
  return std::string(host) + tail;
}

// One string: the session settings, the table, and the four statements,
// prepared by name for PQsendQueryPrepared.
std::string setup_sql(const config::DedupeStoreConfig& c) {
  const std::string& t = c.table;
  const auto ms = std::to_string(std::chrono::duration_cast<milliseconds>(c.timeout).count());
  return "SET statement_timeout = " + ms + "; SET lock_timeout = " + ms +
         "; SET application_name = 'event-router dedupe';"
         // DDL only when the table is missing: CREATE INDEX IF NOT EXISTS locks
         // the table even when the index exists, and the setup is one
         // transaction: two instances starting together would deadlock.
         " DO $$ BEGIN IF to_regclass('" + t + "') IS NULL THEN"
         " CREATE TABLE IF NOT EXISTS " + t +
         " (queue text NOT NULL, event_id text NOT NULL, done boolean NOT NULL, owner text NOT NULL,"
         " expires_at timestamptz NOT NULL, PRIMARY KEY (queue, event_id));"
         " CREATE INDEX IF NOT EXISTS " + t + "_expires ON " + t + " (expires_at);"
         " END IF; END $$;"
         // Claim: taken when new, expired, or an unfinished claim of ours.
         " PREPARE er_claim(text, text, text, float8) AS WITH c AS ("
         " INSERT INTO " + t + " AS t (queue, event_id, done, owner, expires_at)"
         " VALUES ($1, $2, false, $3, now() + make_interval(secs => $4))"
         " ON CONFLICT (queue, event_id) DO UPDATE SET done = false, owner = EXCLUDED.owner,"
         " expires_at = EXCLUDED.expires_at"
         " WHERE t.expires_at < now() OR (NOT t.done AND t.owner = EXCLUDED.owner) RETURNING 1)"
         " SELECT 'c'::text FROM c UNION ALL"
         " SELECT CASE WHEN done THEN 'd' ELSE 'b' END FROM " + t +
         " WHERE queue = $1 AND event_id = $2 AND NOT EXISTS (SELECT 1 FROM c);"
         " PREPARE er_record(text, text, text, float8) AS"
         " INSERT INTO " + t + " AS t (queue, event_id, done, owner, expires_at)"
         " VALUES ($1, $2, true, $3, now() + make_interval(secs => $4))"
         " ON CONFLICT (queue, event_id) DO UPDATE SET done = true, owner = EXCLUDED.owner,"
         " expires_at = EXCLUDED.expires_at;"
         " PREPARE er_release(text, text, text) AS"
         " DELETE FROM " + t + " WHERE queue = $1 AND event_id = $2 AND owner = $3 AND NOT done;"
         " PREPARE er_prune(int) AS DELETE FROM " + t +
         " WHERE ctid = ANY (ARRAY(SELECT ctid FROM " + t + " WHERE expires_at < now() LIMIT $1));";
}

std::string one_line(const char* msg) {
  std::string s = msg ? msg : "";
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

}  // namespace

PgStore::PgStore(asio::io_context& io, const config::DedupeStoreConfig& cfg)
    : io_(io), cfg_(cfg), owner_(make_owner()), sock_(io) {
  libpq();  // loaded now, so a missing library fails the start (or the reload), not an event
  lease_s_ = std::to_string(std::chrono::duration<double>(cfg_.lease).count());
}

PgStore::~PgStore() { teardown(); }

void PgStore::teardown() noexcept {
  ++epoch_;
  if (fd_ >= 0) {
    boost::system::error_code ec;
    sock_.cancel(ec);
    sock_.release();  // libpq owns the descriptor
    fd_ = -1;
  }
  reading_ = writing_ = false;
  if (conn_) libpq().PQfinish(conn_);
  conn_ = nullptr;
}

bool PgStore::ready(std::string& reason) const {
  if (state_ == State::Ready || cfg_.on_unavailable == config::DedupeUnavailable::Run) return true;
  reason = "dedupe store (PostgreSQL) unavailable: " + (last_error_.empty() ? std::string("connecting") : last_error_);
  return false;
}

void PgStore::check(std::string_view queue, std::string_view event_id, Done done) {
  Request r(Kind::Claim, queue, event_id);
  r.seconds = std::chrono::duration<double>(cfg_.lease).count();
  r.done = std::move(done);
  submit(std::move(r));
}

void PgStore::record(std::string_view queue, std::string_view event_id, std::chrono::seconds ttl) {
  if (ttl.count() <= 0) return;
  Request r(Kind::Record, queue, event_id);
  r.seconds = static_cast<double>(ttl.count());
  submit(std::move(r));
}

void PgStore::release(std::string_view queue, std::string_view event_id) {
  submit(Request(Kind::Release, queue, event_id));
}

void PgStore::submit(Request r) {
  const auto now = clock::now();
  r.deadline = now + cfg_.timeout * 2;
  if (state_ == State::Down && now >= next_attempt_) connect();
  switch (state_) {
    case State::Ready:
      sent_.push_back(std::move(r));
      send(sent_.back());
      flush_out();
      return;
    case State::Connecting:
    case State::Setup:
      waiting_.push_back(std::move(r));
      return;
    case State::Down:
    case State::Closed:
      r.failed = true;
      r.error = last_error_.empty() ? "not connected" : last_error_;
      complete(r);
      return;
  }
}

void PgStore::send(Request& r) {
  const char* values[4] = {r.queue.c_str(), r.event_id.c_str(), owner_.c_str(), nullptr};
  std::string secs;
  int n = 3;
  const char* name = "er_release";
  switch (r.kind) {
    case Kind::Claim:
      name = "er_claim";
      values[3] = lease_s_.c_str();
      n = 4;
      break;
    case Kind::Record:
      name = "er_record";
      secs = std::to_string(r.seconds);
      values[3] = secs.c_str();
      n = 4;
      break;
    case Kind::Release:
      break;
    case Kind::Prune:
      name = "er_prune";
      secs = std::to_string(kPruneBatch);
      values[0] = secs.c_str();
      n = 1;
      break;
  }
  // One sync per request: an error aborts that request alone.
  if (!libpq().PQsendQueryPrepared(conn_, name, n, values, nullptr, nullptr, 0) || !libpq().PQpipelineSync(conn_)) {
    r.failed = true;
    r.error = one_line(libpq().PQerrorMessage(conn_));
  }
}

void PgStore::flush_out() {
  if (!conn_) return;
  int rc = libpq().PQflush(conn_);
  if (rc < 0) {
    lost("send failed: " + one_line(libpq().PQerrorMessage(conn_)));
  } else if (rc == 1) {
    wait(true);
  }
}

void PgStore::connect() {
  teardown();
  last_error_.clear();
  conn_ = libpq().PQconnectStart(cfg_.postgres.c_str());
  if (!conn_ || libpq().PQstatus(conn_) == CONNECTION_BAD) {
    std::string why = conn_ ? one_line(libpq().PQerrorMessage(conn_)) : "out of memory";
    state_ = State::Connecting;  // lost() backs off from here
    lost("cannot connect: " + why);
    return;
  }
  libpq().PQsetnonblocking(conn_, 1);
  // Server notices ("already exists, skipping") would go to stderr raw.
  libpq().PQsetNoticeProcessor(conn_, [](void*, const char*) {}, nullptr);
  state_ = State::Connecting;
  connect_deadline_ = clock::now() + cfg_.timeout;
  connect_step();
}

// The socket may change while libpq tries several addresses.
void PgStore::bind_socket() {
  int fd = libpq().PQsocket(conn_);
  if (fd == fd_) return;
  if (fd_ >= 0) {
    boost::system::error_code ec;
    sock_.cancel(ec);
    sock_.release();
    ++epoch_;
    reading_ = writing_ = false;
  }
  fd_ = -1;
  if (fd < 0) return;
  boost::system::error_code ec;
  sock_.assign(fd, ec);
  if (!ec) fd_ = fd;
}

void PgStore::connect_step() {
  auto st = libpq().PQconnectPoll(conn_);
  bind_socket();
  if (fd_ < 0 && st != PGRES_POLLING_FAILED) {
    lost("cannot watch the connection's socket");
    return;
  }
  switch (st) {
    case PGRES_POLLING_READING:
      wait(false);
      return;
    case PGRES_POLLING_WRITING:
      wait(true);
      return;
    case PGRES_POLLING_FAILED:
      lost("cannot connect: " + one_line(libpq().PQerrorMessage(conn_)));
      return;
    default:
      break;
  }
  // Connected: create the table and prepare the statements, then pipeline.
  state_ = State::Setup;
  setup_failed_ = false;
  setup_error_.clear();
  if (!libpq().PQsendQuery(conn_, setup_sql(cfg_).c_str())) {
    lost("setup: " + one_line(libpq().PQerrorMessage(conn_)));
    return;
  }
  flush_out();
  if (conn_) wait(false);
}

void PgStore::setup_done() {
  if (setup_failed_) {
    lost("setup: " + setup_error_);
    return;
  }
  if (!libpq().PQenterPipelineMode(conn_)) {
    lost("cannot enter pipeline mode: " + one_line(libpq().PQerrorMessage(conn_)));
    return;
  }
  state_ = State::Ready;
  backoff_ = milliseconds(0);
  ++stats_.connects;
  log::info("dedupe store connected (PostgreSQL)", {{"table", cfg_.table}, {"owner", owner_}});
  auto waiting = std::move(waiting_);
  waiting_.clear();
  for (auto& r : waiting) {
    sent_.push_back(std::move(r));
    send(sent_.back());
  }
  flush_out();
}

// One wait per direction; a wait left from an older connection is ignored.
void PgStore::wait(bool write) {
  bool& busy = write ? writing_ : reading_;
  if (busy || fd_ < 0) return;
  busy = true;
  std::weak_ptr<PgStore> self = weak_from_this();
  const uint64_t epoch = epoch_;
  sock_.async_wait(write ? asio::posix::stream_descriptor::wait_write : asio::posix::stream_descriptor::wait_read,
                   [self, epoch, write](boost::system::error_code ec) {
                     auto s = self.lock();
                     if (!s || s->epoch_ != epoch) return;
                     (write ? s->writing_ : s->reading_) = false;
                     if (ec) return;
                     if (s->state_ == State::Connecting) {
                       s->connect_step();
                     } else if (write) {
                       s->flush_out();
                     } else {
                       s->on_readable();
                     }
                   });
}

void PgStore::on_readable() {
  if (!libpq().PQconsumeInput(conn_)) {
    lost("connection lost: " + one_line(libpq().PQerrorMessage(conn_)));
    return;
  }
  read_results();
  if (conn_ && (state_ == State::Ready || state_ == State::Setup)) wait(false);
}

void PgStore::read_results() {
  if (state_ == State::Setup) {
    while (conn_ && !libpq().PQisBusy(conn_)) {
      PGresult* r = libpq().PQgetResult(conn_);
      if (!r) {
        setup_done();
        return;
      }
      auto st = libpq().PQresultStatus(r);
      if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && !setup_failed_) {
        setup_failed_ = true;
        setup_error_ = one_line(libpq().PQresultErrorMessage(r));
      }
      libpq().PQclear(r);
    }
    return;
  }
  // Per request: its result, a NULL, then PGRES_PIPELINE_SYNC.
  int nulls = 0;
  const uint64_t epoch = epoch_;
  while (conn_ && epoch == epoch_ && !libpq().PQisBusy(conn_)) {
    PGresult* r = libpq().PQgetResult(conn_);
    if (!r) {
      if (sent_.empty() || ++nulls >= 2) break;
      continue;
    }
    nulls = 0;
    auto st = libpq().PQresultStatus(r);
    if (sent_.empty()) {
      libpq().PQclear(r);
      lost("an answer to nothing sent");
      return;
    }
    Request& q = sent_.front();
    if (st == PGRES_PIPELINE_SYNC) {
      libpq().PQclear(r);
      Request done = std::move(q);
      sent_.pop_front();
      complete(done);  // may submit more, or drop the connection
      continue;
    }
    if (st == PGRES_TUPLES_OK) {
      if (libpq().PQntuples(r) > 0 && libpq().PQgetlength(r, 0, 0) > 0) q.answer = libpq().PQgetvalue(r, 0, 0)[0];
    } else if (st == PGRES_COMMAND_OK) {
      if (q.kind == Kind::Prune) {
        const char* n = libpq().PQcmdTuples(r);
        uint64_t rows = n && *n ? std::strtoull(n, nullptr, 10) : 0;
        stats_.pruned += rows;
        prune_again_ = rows >= static_cast<uint64_t>(kPruneBatch);
      }
    } else if (!q.failed) {
      q.failed = true;
      q.error = one_line(libpq().PQresultErrorMessage(r));
    }
    libpq().PQclear(r);
  }
}

void PgStore::complete(Request& r) {
  r.failed ? ++stats_.failures : ++stats_.queries;
  switch (r.kind) {
    case Kind::Claim: {
      Check c = r.failed ? Check::Unavailable : r.answer == 'c' ? Check::New : r.answer == 'd' ? Check::Seen : Check::Busy;
      if (r.failed && state_ == State::Ready)
        log::warn("dedupe claim failed", {{"event_id", r.event_id}, {"error", r.error}});
      auto done = std::move(r.done);
      if (done) done(c);
      return;
    }
    case Kind::Record:
      if (r.failed)
        log::warn("dedupe store: success not recorded; a duplicate of this event may run again",
                  {{"queue", r.queue}, {"event_id", r.event_id}, {"error", r.error}});
      return;
    case Kind::Release:
      if (r.failed)
        log::warn("dedupe store: claim not released; it expires after the lease",
                  {{"queue", r.queue}, {"event_id", r.event_id}, {"error", r.error}});
      return;
    case Kind::Prune:
      prune_sent_ = false;
      if (r.failed) log::warn("dedupe store: pruning failed", {{"error", r.error}});
      return;
  }
}

void PgStore::lost(const std::string& why) {
  const bool was_up = state_ == State::Ready;
  teardown();
  if (state_ == State::Closed) return;
  if (was_up || last_error_ != why)
    log::error("dedupe store (PostgreSQL) unavailable", {{"error", why}});
  last_error_ = why;
  state_ = State::Down;
  backoff_ = backoff_.count() == 0 ? kFirstBackoff : std::min(kMaxBackoff, backoff_ * 2);
  next_attempt_ = clock::now() + backoff_;
  prune_sent_ = false;
  auto sent = std::move(sent_);
  sent_.clear();
  auto waiting = std::move(waiting_);
  waiting_.clear();
  for (auto* list : {&sent, &waiting}) {
    for (auto& r : *list) {
      if (!r.failed) {
        r.failed = true;
        r.error = why;
      }
      complete(r);
    }
  }
}

void PgStore::tick() {
  const auto now = clock::now();
  switch (state_) {
    case State::Down:
      if (now >= next_attempt_) connect();
      return;
    case State::Connecting:
    case State::Setup:
      if (now >= connect_deadline_) lost("connecting timed out");
      return;
    case State::Ready:
      if (!sent_.empty() && now >= sent_.front().deadline) {
        ++stats_.timeouts;
        lost("no answer within " + std::to_string(std::chrono::duration_cast<milliseconds>(cfg_.timeout * 2).count()) +
             " ms");
        return;
      }
      if (!prune_sent_ && (++ticks_ % 100 == 0 || prune_again_)) {
        prune_again_ = false;
        prune_sent_ = true;
        submit(Request(Kind::Prune));
      }
      return;
    case State::Closed:
      return;
  }
}

void PgStore::close() {
  if (state_ == State::Closed) return;
  // Successes recorded just before the stop: wait for them, a bounded time.
  const auto deadline = clock::now() + cfg_.timeout;
  while (state_ == State::Ready && !sent_.empty() && conn_) {
    const auto left = std::chrono::duration_cast<milliseconds>(deadline - clock::now()).count();
    if (left <= 0) break;
    pollfd p{libpq().PQsocket(conn_), POLLIN, 0};
    if (libpq().PQflush(conn_) == 1) p.events |= POLLOUT;
    if (::poll(&p, 1, static_cast<int>(left)) < 0) break;
    if (!libpq().PQconsumeInput(conn_)) break;
    read_results();
  }
  if (!sent_.empty()) log::warn("dedupe store: closing with answers outstanding", {{"count", std::to_string(sent_.size())}});
  state_ = State::Closed;
  last_error_ = "closed";
  teardown();
  auto sent = std::move(sent_);
  sent_.clear();
  for (auto* list : {&sent, &waiting_}) {
    for (auto& r : *list) {
      r.failed = true;
      r.error = "closed";
      complete(r);
    }
  }
  waiting_.clear();
}

}  // namespace er::dedupe
