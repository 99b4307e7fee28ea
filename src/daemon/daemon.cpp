#include "daemon/daemon.hpp"

#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/thread_pool.hpp>

#include <csignal>
#include <cstdlib>
#include <iostream>

#include "config/config.hpp"
#include "consume/session.hpp"
#include "dispatch/router.hpp"
#include "util/log.hpp"

namespace er::daemon {

namespace asio = boost::asio;

int run(const Options& opts) {
  std::shared_ptr<const config::Config> cfg;
  try {
    cfg = std::make_shared<const config::Config>(config::load_config(opts.config_path));
  } catch (const config::ConfigError& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  log::set_level(cfg->log.level);

  asio::io_context io(1);
  asio::thread_pool pool(cfg->workers);
  std::unique_ptr<dispatch::Runtime> rt;
  try {
    rt = dispatch::build_runtime(cfg, io, pool);
  } catch (const std::exception& e) {
    std::cerr << cfg->path << ": " << e.what() << "\n";
    return 1;
  }
  for (const auto& w : dispatch::plan_warnings(*cfg)) std::cerr << cfg->path << ": warning: " << w << "\n";
  if (opts.check) {
    dispatch::print_plan(*rt, std::cout);
    return 0;
  }

  log::info("starting", {{"version", ER_VERSION}, {"config", cfg->path},
                         {"queues", std::to_string(cfg->queues.size())}});
  consume::Session session(io, std::move(rt));
  asio::signal_set signals(io, SIGINT, SIGTERM, SIGHUP);
  std::function<void()> wait_signal;
  wait_signal = [&] {
    signals.async_wait([&](boost::system::error_code ec, int sig) {
      if (ec) return;
      if (sig == SIGHUP) {
        log::warn("SIGHUP ignored: configuration reload is not available in this version; restart to apply changes");
        wait_signal();
        return;
      }
      log::info("signal received", {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
      session.stop();
      wait_signal();  // a second signal during the drain is logged and ignored
    });
  };
  wait_signal();
  session.start({}, [&] { signals.cancel(); });
  io.run();

  int code = session.exit_code();
  if (session.aborted()) {
    // Handlers on worker threads may still be running and cannot be joined;
    // their events stay unacked and are redelivered.
    std::_Exit(code);
  }
  pool.join();
  return code;
}

}  // namespace er::daemon
