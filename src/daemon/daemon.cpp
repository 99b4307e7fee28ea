#include "daemon/daemon.hpp"

#include <sys/prctl.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <iostream>

#include "config/config.hpp"
#include "consume/consumer.hpp"
#include "consume/crash_guard.hpp"
#include "daemon/reload.hpp"
#include "daemon/notify.hpp"
#include "dedupe/open.hpp"
#include "settle/copy_key.hpp"
#include "http/server.hpp"
#include "metrics/metrics.hpp"
#include "dispatch/exec_handler.hpp"
#include "dispatch/router.hpp"
#include "util/log.hpp"

namespace er::daemon {

namespace asio = boost::asio;

namespace {

// Crash-loop protection (consume/crash_guard.hpp). A state_dir it cannot use
// stops the start, as for the dedupe store; a journal another instance holds
// leaves this one unprotected, loudly, rather than down.
bool open_crash_guard(const config::Config& cfg, std::shared_ptr<consume::CrashGuard>& out) {
  size_t slots = 256;
  bool on = false;
  for (const auto& q : cfg.queues) {
    if (q.crash_max == 0) continue;
    on = true;
    slots += 2 * size_t{q.prefetch};  // prefetch, and as many again for a reload's new consumers
  }
  if (!on) return true;
  try {
    out = std::make_shared<consume::CrashGuard>(cfg.state_dir, slots,
                                                std::chrono::duration_cast<std::chrono::seconds>(cfg.crash_ttl));
  } catch (const consume::CrashGuard::InUse& e) {
    log::warn("crash-loop protection is off for this instance", {{"error", e.what()}});
    return true;
  } catch (const std::exception& e) {
    log::error("cannot open the crash journal (state_dir); make it writable, or set crash_loop: {max_crashes: 0}",
               {{"error", e.what()}});
    return false;
  }
  out->install_signal_handlers();
  const auto& prev = out->previous();
  if (prev.unclean) {
    log::warn("the previous run ended uncleanly",
              {{"blamed", prev.attributed ? "the event its signal named" : "every event a plugin or intake was running"},
               {"signal", std::to_string(prev.signal)}, {"events", std::to_string(prev.counted.size())}});
    for (uint64_t k : prev.counted) {
      const auto* e = out->find(k);
      if (e) log::warn("an event was being handled when the daemon died",
                       {{"event_id", e->event_id}, {"crashes", std::to_string(e->crashes)}});
    }
  }
  return true;
}

}  // namespace

int run(const Options& opts) {
  std::shared_ptr<const config::Config> cfg;
  try {
    cfg = std::make_shared<const config::Config>(config::load_config(opts.config_path));
  } catch (const config::ConfigError& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  log::set_level(cfg->log.level);
  log::set_format(cfg->log.format);

  asio::io_context io(1);
  asio::thread_pool pool(cfg->plugin_threads);
  std::unique_ptr<dispatch::Runtime> rt;
  try {
    rt = dispatch::build_runtime(cfg, io, pool);
  } catch (const std::exception& e) {
    // --check talks to a person; the daemon to its log collector.
    if (opts.check)
      std::cerr << cfg->path << ": " << e.what() << "\n";
    else
      log::error("cannot start", {{"config", cfg->path}, {"error", e.what()}});
    return 1;
  }
  for (const auto& w : dispatch::plan_warnings(*cfg)) {
    if (opts.check && w.rfind(cfg->path + ":", 0) == 0)  // config warnings name their line
      std::cerr << w << "\n";
    else if (opts.check)
      std::cerr << cfg->path << ": warning: " << w << "\n";
    else
      log::warn(w, {{"config", cfg->path}});
  }
  if (opts.check) {
    dispatch::print_plan(*rt, std::cout);
    return 0;
  }

  log::info("starting", {{"version", ER_VERSION}, {"config", cfg->path},
                         {"queues", std::to_string(cfg->queues.size())}});
  // Processes handlers leave behind are reparented to us, not to init, and
  // reaped here (as PID 1 in a container we are their reaper anyway).
  if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0)
    log::warn("cannot become a child subreaper; orphaned handler processes go to init");
  dispatch::OrphanReaper reaper(io);
  Notifier notifier;
  metrics::Registry registry;
  std::shared_ptr<dedupe::Backend> dedupe;
  {
    try {
      dedupe = dedupe::open_store(io, *cfg);
    } catch (const std::exception& e) {
      log::error("cannot open the dedupe store (state_dir)", {{"error", e.what()}});
      return 1;
    }
  }
  std::shared_ptr<const settle::CopySigner> signer;
  try {
    signer = std::make_shared<const settle::CopySigner>(settle::load_or_create_copy_key(*cfg));
  } catch (const std::exception& e) {
    log::error("cannot load the copy key", {{"error", e.what()}});
    return 1;
  }
  std::shared_ptr<consume::CrashGuard> guard;
  if (!open_crash_guard(*cfg, guard)) return 1;
  // Every way out of here but a crash is a clean exit, _Exit included (below).
  struct MarkClean {
    consume::CrashGuard* g;
    ~MarkClean() { if (g) g->mark_clean(); }
  } mark_clean{guard.get()};
  consume::Consumer session(io, std::move(rt), registry, {std::move(dedupe), std::move(signer)});
  session.set_crash_guard(guard);
  Reloader reloader(io, pool, session, opts.config_path);
  std::unique_ptr<http::Server> http_server;
  if (!cfg->http_listen.empty()) {
    try {
      http::Handlers h;
      h.ready = [&](std::string& reason) { return session.ready(reason); };
      h.metrics = [&] { return registry.render(); };
      http_server = std::make_unique<http::Server>(io, cfg->http_listen, std::move(h));
      http_server->start();
      log::info("http listening", {{"listen", cfg->http_listen}, {"port", std::to_string(http_server->port())}});
    } catch (const std::exception& e) {
      log::error(e.what());
      return 1;
    }
  }
  asio::signal_set signals(io, SIGINT, SIGTERM, SIGHUP);
  asio::steady_timer status_timer(io);
  asio::steady_timer watchdog_timer(io);
  bool stopping = false;
  // Set when the consumer stopped. A timer that had already fired when it was
  // cancelled still runs its handler: that must not arm it again, or io.run()
  // would never return.
  bool stopped = false;

  auto status_line = [&] {
    const auto& st = session.stats();
    std::string reason;
    std::string s = "STATUS=";
    if (session.ready(reason)) {
      s += "consuming " + std::to_string(cfg->queues.size()) + " queues on " + session.node();
      if (!reason.empty()) s += " (" + reason + ")";
    } else {
      s += reason;
    }
    s += "; events handled " + std::to_string(st.acked) + ", retried " + std::to_string(st.retried) +
         ", dead-lettered " + std::to_string(st.dead_lettered);
    return s;
  };
  std::function<void()> tick_status = [&] {
    status_timer.expires_after(std::chrono::seconds(5));
    status_timer.async_wait([&](boost::system::error_code ec) {
      if (ec || stopping || stopped) return;
      notifier.send(status_line());
      tick_status();
    });
  };
  // Pinged from a timer on the loop itself: a stuck loop stops the pings and
  // systemd's watchdog restarts the service.
  std::function<void()> tick_watchdog = [&] {
    auto period = notifier.watchdog_period();
    if (!period) return;
    watchdog_timer.expires_after(*period);
    watchdog_timer.async_wait([&](boost::system::error_code ec) {
      if (ec || stopped) return;
      notifier.send("WATCHDOG=1");
      tick_watchdog();
    });
  };

  auto reload = [&] {
    notifier.send("RELOADING=1\nSTATUS=reloading " + opts.config_path);
    reloader.request([&](bool) {
      cfg = session.config_ptr();
      notifier.send("READY=1\n" + status_line());
    });
  };

  std::function<void()> wait_signal;
  wait_signal = [&] {
    signals.async_wait([&](boost::system::error_code ec, int sig) {
      if (ec || stopped) return;
      if (sig == SIGHUP) {
        if (!stopping) reload();
        wait_signal();
        return;
      }
      log::info("signal received", {{"signal", sig == SIGTERM ? "SIGTERM" : "SIGINT"}});
      if (!stopping) {
        stopping = true;
        notifier.send("STOPPING=1\nSTATUS=stopping: draining in-flight events");
        status_timer.cancel();
        session.stop();
      }
      wait_signal();  // a second signal during the drain is logged and ignored
    });
  };
  wait_signal();
  if (notifier.enabled()) {
    tick_status();
    tick_watchdog();
  }
  bool ready_sent = false;
  session.start(
      [&] {
        // READY=1 once: the topology is declared and every queue is consumed.
        notifier.send(std::string(ready_sent ? "" : "READY=1\n") + status_line());
        ready_sent = true;
      },
      [&] {
        stopped = true;
        signals.cancel();
        reaper.stop();
        status_timer.cancel();
        watchdog_timer.cancel();
        if (http_server) http_server->stop();
      });
  io.run();

  int code = session.exit_code();
  if (guard) guard->mark_clean();
  if (session.aborted()) {
    // Handlers on worker threads may still be running and cannot be joined;
    // their events stay unacked and are redelivered.
    std::_Exit(code);
  }
  pool.join();
  return code;
}

int health(const Options& opts, bool ready) {
  std::shared_ptr<const config::Config> cfg;
  try {
    cfg = std::make_shared<const config::Config>(config::load_config(opts.config_path));
  } catch (const config::ConfigError& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
  if (cfg->http_listen.empty()) {
    std::cerr << cfg->path << ": health needs the HTTP endpoint: set http: {listen: 127.0.0.1:9090}\n";
    return 1;
  }
  std::string body;
  const char* path = ready ? "/readyz" : "/healthz";
  int status = http::probe(cfg->http_listen, path, body, std::chrono::seconds(3));
  if (status < 0) {
    std::cerr << "event-router health: no answer from http://" << cfg->http_listen << path << "\n";
    return 1;
  }
  std::cout << status << " " << body;
  if (!body.empty() && body.back() != '\n') std::cout << "\n";
  return status == 200 ? 0 : 1;
}

}  // namespace er::daemon
