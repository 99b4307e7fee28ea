#include "daemon/reload.hpp"

#include <boost/asio/post.hpp>

#include <algorithm>

#include "amqp/topology.hpp"
#include "config/config.hpp"
#include "dedupe/open.hpp"
#include "settle/copy_key.hpp"
#include "util/log.hpp"

namespace er::daemon {

namespace asio = boost::asio;

struct Reloader::Built {
  std::shared_ptr<const config::Config> prev;
  // Lends unchanged worker handlers to the build. Holds the running
  // generation: released on the loop, in finish().
  std::shared_ptr<const dispatch::Runtime> prev_rt;
  std::shared_ptr<dedupe::Backend> prev_store;
  std::shared_ptr<const config::Config> cfg;
  std::unique_ptr<dispatch::Runtime> rt;
  std::shared_ptr<dedupe::Backend> store;
  std::shared_ptr<const settle::CopySigner> signer;
  std::string error;
};

Reloader::Reloader(asio::io_context& io, asio::thread_pool& pool, consume::Consumer& consumer,
                   std::string config_path)
    : io_(io), pool_(pool), consumer_(consumer), path_(std::move(config_path)) {}

Reloader::~Reloader() {
  *alive_ = false;
  if (worker_.joinable()) worker_.join();
  if (building_) {
    // Its result was posted to a loop that no longer runs: release what it
    // holds of the running generation (and the workers it started) here,
    // while the consumer still exists.
    building_->prev_rt.reset();
    building_->rt.reset();
  }
}

void Reloader::request(std::function<void(bool)> done) {
  done_ = std::move(done);
  if (busy_) {
    again_ = true;
    return;
  }
  begin();
}


void Reloader::begin() {
  busy_ = true;
  again_ = false;
  if (worker_.joinable()) worker_.join();  // the previous build has posted its result already
  log::info("reloading", {{"config", path_}});
  auto b = std::make_shared<Built>();
  building_ = b;
  b->prev = consumer_.config_ptr();
  b->prev_rt = consumer_.runtime_ptr();
  b->prev_store = consumer_.dedupe_store();
  std::weak_ptr<bool> alive = alive_;
  worker_ = std::thread([this, b, alive] {
    try {
      b->cfg = std::make_shared<const config::Config>(config::load_config(path_));
      b->rt = dispatch::build_runtime(b->cfg, io_, pool_, b->prev_rt.get());
      for (const auto& w : dispatch::plan_warnings(*b->cfg)) log::warn(w);
      // The same state_dir (or the same shared store) keeps the open store.
      b->store = dedupe::open_store(io_, *b->cfg, b->prev.get(), b->prev_store);
      b->signer = std::make_shared<const settle::CopySigner>(settle::load_or_create_copy_key(*b->cfg));
      std::string declared;
      try {
        if (!declare_for_reload(*b->prev, *b->cfg, declared))
          log::warn("broker unreachable during reload; the new topology is declared when it is back");
      } catch (const amqp::AmqpError& e) {
        throw std::runtime_error(std::string(e.what()) +
                                 (declared.empty() ? "" : " (already declared, and left in place: " + declared + ")"));
      }
    } catch (const std::exception& e) {
      b->error = e.what();
      // Here, off the loop: workers it started are not activated and are
      // stopped (end of input, grace) by this thread.
      b->rt.reset();
    }
    asio::post(io_, [this, b, alive] {
      if (!alive.expired()) finish(b);
    });
  });
}

void Reloader::finish(std::shared_ptr<Built> b) {
  busy_ = false;
  if (consumer_.stopping()) {
    // Shutdown began while it was built: switching in now would start worker
    // processes that nothing ends (the stop has passed), so io.run() would
    // never return. Keep it for ~Reloader, which releases it off the loop.
    log::info("reload abandoned: shutting down");
    done_ = nullptr;
    again_ = false;
    return;
  }
  building_.reset();
  bool ok = b->error.empty();
  // Before the switch, so that a replaced generation with no event in flight
  // goes (and its replaced workers get end of input) with the switch.
  b->prev_rt.reset();
  if (!ok) {
    log::error("reload failed; keeping the running config", {{"error", b->error}});
  } else {
    const auto& prev = *b->prev;
    const auto& next = *b->cfg;
    if (next.http_listen != prev.http_listen) log::warn("http.listen changed; it applies at the next restart");
    if (next.plugin_threads != prev.plugin_threads) log::warn("plugin_threads changed; it applies at the next restart");
    consumer_.switch_to(std::move(b->rt), {std::move(b->store), std::move(b->signer)});
    log::set_level(next.log.level);
    log::set_format(next.log.format);
  }
  auto done = std::move(done_);
  done_ = nullptr;
  if (again_) {
    begin();  // a SIGHUP that came during the build: it may have meant a newer file
    done_ = std::move(done);
    return;
  }
  if (done) done(ok);
}

bool declare_for_reload(const config::Config& prev, const config::Config& next, std::string& declared) {
  std::optional<amqp::Connection> conn;
  std::string last_error;
  for (size_t i = 0; i < next.broker.urls.size() && !conn; ++i) {
    try {
      conn.emplace(amqp::Connection::open(amqp::connect_options(next.broker, i)));
    } catch (const amqp::AmqpError& e) {
      last_error = e.what();
    }
  }
  if (!conn) return false;
  amqp_channel_t ch = 1;
  conn->open_channel(ch);
  auto note = [&](const std::string& what) {
    if (!declared.empty()) declared += ", ";
    declared += what;
  };
  amqp::declare_exchange(*conn, ch, next);
  note("exchange '" + next.exchange.name + "'");
  std::vector<std::string> unavailable;  // refused now (home node down): the consumer retries them
  for (const auto& q : next.queues) {
    try {
      amqp::declare_queue(*conn, ch, next, q);
    } catch (const amqp::AmqpError& e) {
      if (e.permanent() || !e.channel_closed()) throw;
      log::warn("cannot declare a queue now; its consumer retries", {{"queue", q.name}, {"reason", e.what()}});
      amqp::reply_channel_close_ok(conn->get(), ch);
      conn->open_channel(++ch);
      unavailable.push_back(q.name);
      continue;
    }
    note("queue '" + q.name + "'");
  }
  // Bindings the new config no longer has on a queue it keeps. A queue the
  // config removes keeps its bindings, so that nothing published for it is
  // dropped by the broker; the reload says so in the log.
  for (const auto& oq : prev.queues) {
    const config::QueueConfig* nq = nullptr;
    for (const auto& q : next.queues)
      if (q.name == oq.name) nq = &q;
    if (std::find(unavailable.begin(), unavailable.end(), oq.name) != unavailable.end()) continue;
    if (!nq) {
      log::warn("a queue removed from the config keeps its bindings and goes on filling; "
                "unbind or delete it on the broker once it is no longer needed",
                {{"queue", oq.name}});
      continue;
    }
    for (const auto& key : oq.bindings) {
      bool still = prev.exchange.name == next.exchange.name &&
                   std::find(nq->bindings.begin(), nq->bindings.end(), key) != nq->bindings.end();
      if (still) continue;
      amqp_queue_unbind(conn->get(), ch, amqp::bytes(oq.name), amqp::bytes(prev.exchange.name), amqp::bytes(key),
                        amqp_empty_table);
      amqp::check_reply(amqp_get_rpc_reply(conn->get()),
                        "unbinding queue '" + oq.name + "' key '" + key + "'");
      log::info("unbound", {{"queue", oq.name}, {"exchange", prev.exchange.name}, {"key", key}});
    }
  }
  conn->close();
  return true;
}

}  // namespace er::daemon
