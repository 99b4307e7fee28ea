#include "dispatch/plugin_handler.hpp"

#include <dlfcn.h>

#include <atomic>
#include <boost/asio/post.hpp>
#include <cstring>
#include <iterator>
#include <mutex>
#include <stdexcept>

#include "event_router/plugin.h"
#include "util/log.hpp"

namespace er::dispatch {

namespace {

using version_fn = int (*)(int, const int*);
using init_fn = int (*)(void**, const er_host*, const char*, size_t, er_plugin_info*);
using handle_fn = int (*)(void*, const er_event*, er_result*);
using cleanup_fn = void (*)(void*);

constexpr int kSupportedVersions[] = {1};  // newest first

// The loaded library and one plugin instance. Shared with in-flight pool work
// so that cleanup + dlclose only happen once no handle() call can still run.
struct Instance {
  std::string name;
  std::string path;
  void* dl = nullptr;
  handle_fn handle = nullptr;
  cleanup_fn cleanup = nullptr;
  void* user_data = nullptr;
  bool initialized = false;
  uint32_t flags = 0;
  er_host host{};
  std::mutex serial;                  // serializes non-CONCURRENT plugins on the pool
  std::atomic<unsigned> generation{0};  // bumped by abort_all()

  ~Instance() {
    if (initialized) cleanup(user_data);
    if (dl) dlclose(dl);
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("handler '" + name + "': " + what);
  }
};

void host_log(void* ctx, int level, const char* msg, size_t len) noexcept {
  try {
    auto* inst = static_cast<const Instance*>(ctx);
    log::Level l = level <= ER_LOG_DEBUG  ? log::Level::Debug
                   : level == ER_LOG_INFO ? log::Level::Info
                   : level == ER_LOG_WARN ? log::Level::Warn
                                          : log::Level::Error;
    if (!log::enabled(l)) return;
    std::string_view text = msg ? std::string_view(msg, len) : std::string_view();
    log::write(l, text, {{"handler", inst->name}});
  } catch (...) {
    // A logging failure must not unwind into C code.
  }
}

template <typename Fn>
Fn load_symbol(const Instance& inst, const char* symbol) {
  dlerror();
  void* p = dlsym(inst.dl, symbol);
  if (!p) inst.fail("plugin " + inst.path + " does not export " + symbol);
  return reinterpret_cast<Fn>(p);
}

std::string_view reason_of(const er_result& r) {
  return {r.reason, strnlen(r.reason, sizeof r.reason)};  // the plugin may not NUL-terminate
}

Outcome to_outcome(int rc, const er_result& r) {
  if (rc != 0) return Outcome::retry("handler_failed", "plugin returned " + std::to_string(rc));
  std::string_view reason = reason_of(r);
  switch (r.verdict) {
    case ER_ACK:
      return Outcome::ack();
    case ER_RETRY:
      return Outcome::retry("handler_failed",
                            reason.empty() ? "plugin asked to retry" : std::string(reason),
                            std::chrono::milliseconds(r.retry_delay_ms));
    case ER_DEAD_LETTER:
      return Outcome::dead_letter("handler_failed",
                                  reason.empty() ? "plugin rejected the event" : std::string(reason));
    default:
      return Outcome::retry("handler_failed", "plugin returned unknown verdict " + std::to_string(r.verdict));
  }
}

er_str to_er(std::string_view s) { return {s.data(), s.size()}; }

Outcome call_plugin(const Instance& inst, const EventView& v) noexcept {
  try {
    er_event ev{};
    ev.struct_size = sizeof ev;
    ev.body = to_er(v.body);
    ev.routing_key = to_er(v.routing_key);
    ev.exchange = to_er(v.exchange);
    ev.queue = to_er(v.queue);
    if (const event::Envelope* e = v.envelope) {
      ev.event_type = to_er(e->event_type);
      ev.event_id = to_er(e->event_id);
      ev.correlation_id = to_er(e->correlation_id);
      ev.aggregate_id = to_er(e->aggregate_id);
      ev.aggregate_type = to_er(e->aggregate_type);
    }
    ev.attempt = v.attempt;
    ev.redelivered = v.redelivered ? 1 : 0;

    er_result res;
    std::memset(&res, 0, sizeof res);
    res.struct_size = sizeof res;
    res.verdict = ER_ACK;
    int rc = inst.handle(inst.user_data, &ev, &res);
    return to_outcome(rc, res);
  } catch (...) {
    try {
      return Outcome::retry("handler_failed", "plugin threw an exception");
    } catch (...) {
      return Outcome{Verdict::Retry, {}, {}, {}, {}};
    }
  }
}

class PluginHandler : public Handler {
 public:
  PluginHandler(std::string name, std::shared_ptr<Instance> inst, boost::asio::io_context& io,
                boost::asio::thread_pool& pool)
      : Handler(std::move(name)), inst_(std::move(inst)), io_(io), pool_(pool) {}

  void start(Job& job) override {
    if (inst_->flags & ER_PLUGIN_NONBLOCKING) {
      job.finish(call_plugin(*inst_, job.view()));
      return;
    }
    unsigned gen = inst_->generation.load();
    boost::asio::post(pool_, [inst = inst_, &io = io_, &job, gen] {
      if (inst->generation.load() != gen) return;  // aborted before it ran
      Outcome out;
      if (job.stale()) {
        // Its channel died while it waited for a worker: the broker redelivers it.
        out = Outcome::retry("stale", "skipped: its channel closed before a worker took it");
      } else if (inst->flags & ER_PLUGIN_CONCURRENT) {
        out = call_plugin(*inst, job.view());
      } else {
        std::lock_guard<std::mutex> lock(inst->serial);
        out = call_plugin(*inst, job.view());
      }
      boost::asio::post(io, [inst, &job, gen, out = std::move(out)]() mutable {
        if (inst->generation.load() != gen) return;  // abort_all: the job is gone
        job.finish(std::move(out));
      });
    });
  }

  unsigned max_concurrency() const override {
    return (inst_->flags & ER_PLUGIN_CONCURRENT) ? ~0u : 1u;
  }

  // Running plugin calls cannot be interrupted; their outcomes are dropped
  // and queued ones skipped. Cleanup waits for the last running call.
  void abort_all() override { inst_->generation.fetch_add(1); }

 private:
  std::shared_ptr<Instance> inst_;
  boost::asio::io_context& io_;
  boost::asio::thread_pool& pool_;
};

}  // namespace

std::unique_ptr<Handler> make_plugin_handler(const config::HandlerConfig& cfg, boost::asio::io_context& io,
                                             boost::asio::thread_pool& pool) {
  auto inst = std::make_shared<Instance>();
  inst->name = cfg.name;
  inst->path = cfg.plugin_path;

  inst->dl = dlopen(cfg.plugin_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!inst->dl) {
    const char* err = dlerror();
    inst->fail("cannot load plugin " + cfg.plugin_path + ": " + (err ? err : "unknown error"));
  }
  auto version = load_symbol<version_fn>(*inst, "er_plugin_version");
  auto init = load_symbol<init_fn>(*inst, "er_plugin_init");
  inst->handle = load_symbol<handle_fn>(*inst, "er_plugin_handle");
  inst->cleanup = load_symbol<cleanup_fn>(*inst, "er_plugin_cleanup");

  int v = version(static_cast<int>(std::size(kSupportedVersions)), kSupportedVersions);
  if (v != 1) {
    inst->fail("plugin " + cfg.plugin_path + " supports none of the ABI versions 1 (it answered " +
               std::to_string(v) + ")");
  }

  inst->host.struct_size = sizeof inst->host;
  inst->host.ctx = inst.get();
  inst->host.log = &host_log;

  er_plugin_info info;
  std::memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  const std::string& conf = cfg.plugin_config_json.empty() ? std::string("{}") : cfg.plugin_config_json;
  int rc = init(&inst->user_data, &inst->host, conf.c_str(), conf.size(), &info);
  if (rc != 0) {
    std::string_view err(info.error, strnlen(info.error, sizeof info.error));
    inst->fail("plugin " + cfg.plugin_path + " failed to initialize (returned " + std::to_string(rc) +
               "): " + (err.empty() ? std::string("no error message") : std::string(err)));
  }
  inst->initialized = true;
  inst->flags = info.flags;

  log::debug("plugin loaded", {{"handler", cfg.name}, {"path", cfg.plugin_path},
                               {"concurrent", (info.flags & ER_PLUGIN_CONCURRENT) ? "yes" : "no"},
                               {"nonblocking", (info.flags & ER_PLUGIN_NONBLOCKING) ? "yes" : "no"}});
  return std::make_unique<PluginHandler>(cfg.name, std::move(inst), io, pool);
}

}  // namespace er::dispatch
