#pragma once
// Reload on SIGHUP, like nginx: the new config is loaded, its handlers built
// and its plugins initialised by the same build_runtime() as at startup, its
// dedupe store opened and its topology declared on a connection of its own,
// all on a thread of its own, away from the event loop and its traffic. Only
// then does the loop switch the consumer to it, in one step that cannot fail.
// A reload that fails anywhere before the switch changes nothing (what it had
// already declared on the broker is additive and is listed in the log).
#include <boost/asio/io_context.hpp>
#include <boost/asio/thread_pool.hpp>

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "consume/consumer.hpp"

namespace er::daemon {

class Reloader {
 public:
  Reloader(boost::asio::io_context& io, boost::asio::thread_pool& pool, consume::Consumer& consumer,
           std::string config_path);
  ~Reloader();  // waits for a build in progress (it is bounded by the broker timeouts)
  Reloader(const Reloader&) = delete;
  Reloader& operator=(const Reloader&) = delete;

  // Starts a reload; `done(ok)` runs on the loop when it is switched in or
  // given up. A request while one is being built runs once that one is done.
  void request(std::function<void(bool ok)> done);
  bool busy() const { return busy_; }

 private:
  struct Built;
  void begin();
  void finish(std::shared_ptr<Built> b);

  boost::asio::io_context& io_;
  boost::asio::thread_pool& pool_;
  consume::Consumer& consumer_;
  std::string path_;
  std::thread worker_;
  std::shared_ptr<Built> building_;  // the build under way (its result may never reach the loop)
  bool busy_ = false;
  bool again_ = false;
  std::function<void(bool)> done_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

// Declares `next`'s topology and removes the bindings `prev` had on a queue
// that `next` keeps without them, on a connection of its own. Throws amqp::AmqpError (the refusal, and what was
// declared before it); returns false if no broker URL could be reached.
bool declare_for_reload(const config::Config& prev, const config::Config& next, std::string& declared);

}  // namespace er::daemon
