#include "dispatch/plugin_handler.hpp"

#include <dlfcn.h>

#include <rapidjson/encodedstream.h>
#include <rapidjson/memorystream.h>
#include <rapidjson/reader.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cstddef>
#include <cstring>
#include <iterator>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include "event_router/plugin.h"
#include "util/log.hpp"

namespace er::dispatch {

namespace {

using version_fn = int (*)(int, const int*);
using init_fn = int (*)(void**, const er_host*, const char*, size_t, er_plugin_info*);
using handle_fn = int (*)(void*, const er_event*, er_result*);
using cleanup_fn = void (*)(void*);

constexpr int kSupportedVersions[] = {2, 1};  // newest first

// Emit limits per event (documented in plugin.h).
constexpr size_t kMaxEmits = 1000;
constexpr size_t kMaxEmitBytes = 16u << 20;

// The loaded library and one plugin instance. Shared with in-flight pool work
// so that cleanup + dlclose only happen once no handle() call can still run.
struct Instance {
  std::string name;
  std::string path;
  void* dl = nullptr;
  handle_fn handle = nullptr;
  cleanup_fn cleanup = nullptr;
  void* user_data = nullptr;
  int version = 1;
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

er_event event_of(const EventView& v) {
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
    ev.timestamp = to_er(e->timestamp);
  }
  ev.attempt = v.attempt;
  ev.redelivered = v.redelivered ? 1 : 0;
  return ev;
}

// The daemon zeroes the result (verdict ER_ACK) before each call.
er_result fresh_result() {
  er_result res;
  std::memset(&res, 0, sizeof res);
  res.struct_size = sizeof res;
  res.verdict = ER_ACK;
  return res;
}

Outcome call_plugin(const Instance& inst, const EventView& v) noexcept {
  try {
    er_event ev = event_of(v);
    ev.timestamp = {};  // version 1 saw reserved fields there: keep them zero
    er_result res = fresh_result();
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

class PluginHandler;

// Version 2: one event a plugin may complete later. The plugin holds only
// its id (the handle); everything else is reached through the registry.
struct Pending {
  uint64_t id = 0;
  // Guarded by the registry's mutex.
  std::vector<std::string> emits;
  size_t emit_bytes = 0;
  // Event loop thread only.
  Job* job = nullptr;               // null once finished, timed out or abandoned
  PluginHandler* owner = nullptr;   // valid while job is set (the job holds its generation)
  bool returned = false;            // handle() returned: the view may go
  std::optional<Outcome> early;     // completed before handle() returned
  std::optional<boost::asio::steady_timer> timer;
};

// Process-wide and never destroyed, so that a handle stays a harmless value
// whatever happened to its event, handler or generation: a stale id finds
// nothing. Ids are never reused.
struct Registry {
  struct Entry {
    std::shared_ptr<Pending> p;
    boost::asio::io_context* io;
  };
  std::mutex m;
  std::unordered_map<uint64_t, Entry> live;  // events that may still be completed
  std::atomic<uint64_t> next{1};
};

Registry& registry() {
  static auto* r = new Registry;  // plugin threads may call in while the process exits
  return *r;
}

er_event_handle* handle_of(uint64_t id) {
  return reinterpret_cast<er_event_handle*>(static_cast<uintptr_t>(id));
}
uint64_t id_of(er_event_handle* h) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(h)); }

// Removes the event from the registry; with an ack, its emits go with it.
// False if it was no longer there (completed, timed out or abandoned).
bool take(uint64_t id, Outcome& out) {
  auto& reg = registry();
  std::lock_guard<std::mutex> lock(reg.m);
  auto it = reg.live.find(id);
  if (it == reg.live.end()) return false;
  if (out.verdict == Verdict::Ack) out.emits = std::move(it->second.p->emits);
  reg.live.erase(it);
  return true;
}

void log_stale(const char* what, uint64_t id) {
  log::warn(what, {{"handle", std::to_string(id)},
                   {"detail", "the event was completed already, timed out or was abandoned at shutdown"}});
}

// One SAX pass over an emit: checks the follow-up fields and writes the
// object compact. Iterative parsing, so deep nesting cannot exhaust the stack.
class EmitFilter {
 public:
  explicit EmitFilter(rapidjson::Writer<rapidjson::StringBuffer>& w) : w_(w) {}
  bool has_type() const { return has_type_; }

  bool Null() { return value(Kind::Other) && w_.Null(); }
  bool Bool(bool b) { return value(Kind::Other) && w_.Bool(b); }
  bool RawNumber(const char* s, rapidjson::SizeType n, bool /*copy*/) {
    return value(Kind::Other) && w_.RawValue(s, n, rapidjson::kNumberType);
  }
  bool String(const char* s, rapidjson::SizeType n, bool copy) {
    return value(n ? Kind::String : Kind::Empty) && w_.String(s, n, copy);
  }
  bool StartObject() { return value(Kind::Object) && ++depth_ && w_.StartObject(); }
  bool Key(const char* s, rapidjson::SizeType n, bool copy) {
    if (depth_ == 1) field_ = field_of(std::string_view(s, n));
    return w_.Key(s, n, copy);
  }
  bool EndObject(rapidjson::SizeType n) { return --depth_, w_.EndObject(n); }
  bool StartArray() { return value(Kind::Other) && ++depth_ && w_.StartArray(); }
  bool EndArray(rapidjson::SizeType n) { return --depth_, w_.EndArray(n); }
  // Unused with kParseNumbersAsStringsFlag (numbers stay as written).
  bool Int(int) { return false; }
  bool Uint(unsigned) { return false; }
  bool Int64(int64_t) { return false; }
  bool Uint64(uint64_t) { return false; }
  bool Double(double) { return false; }

 private:
  enum class Kind { Object, String, Empty, Other };
  enum class Field { Type, Payload, Text, Other };
  static Field field_of(std::string_view k) {
    if (k == "event_type") return Field::Type;
    if (k == "payload") return Field::Payload;
    if (k == "aggregate_id" || k == "aggregate_type" || k == "routing_key") return Field::Text;
    return Field::Other;
  }
  // A value begins at the current depth: the root must be an object, and
  // the known top-level fields have their types.
  bool value(Kind k) {
    if (depth_ == 0) return k == Kind::Object;
    if (depth_ != 1) return true;
    switch (field_) {
      case Field::Type:
        if (k != Kind::String || has_type_) return false;
        return has_type_ = true;
      case Field::Payload: return k == Kind::Object;
      case Field::Text: return k == Kind::String || k == Kind::Empty;
      case Field::Other: return true;
    }
    return false;
  }

  rapidjson::Writer<rapidjson::StringBuffer>& w_;
  unsigned depth_ = 0;
  Field field_ = Field::Other;
  bool has_type_ = false;
};

// The emit, compact, or nothing if it is not one valid follow-up object.
std::optional<std::string> compact_emit(const char* json, size_t len) {
  rapidjson::StringBuffer buf;
  rapidjson::Writer<rapidjson::StringBuffer> w(buf);
  EmitFilter filter(w);
  rapidjson::MemoryStream ms(json, len);
  rapidjson::EncodedInputStream<rapidjson::UTF8<>, rapidjson::MemoryStream> in(ms);
  rapidjson::Reader reader;
  constexpr unsigned kFlags =
      rapidjson::kParseIterativeFlag | rapidjson::kParseNumbersAsStringsFlag | rapidjson::kParseValidateEncodingFlag;
  if (reader.Parse<kFlags>(in, filter).IsError() || !filter.has_type()) return std::nullopt;
  return std::string(buf.GetString(), buf.GetSize());
}

void on_completed(const std::shared_ptr<Pending>& p, Outcome out);

int host_complete(er_event_handle* h, const er_result* r) noexcept {
  try {
    if (!r || r->struct_size < offsetof(er_result, reserved)) return ER_E_INVALID;
    Outcome out = to_outcome(0, *r);
    const uint64_t id = id_of(h);
    auto& reg = registry();
    {
      std::lock_guard<std::mutex> lock(reg.m);
      auto it = reg.live.find(id);
      if (it != reg.live.end()) {
        if (out.verdict == Verdict::Ack) out.emits = std::move(it->second.p->emits);
        // Posted under the lock: abort_all() takes it too, so no completion
        // is posted after an abort (the loop may be gone then).
        boost::asio::post(*it->second.io, [p = std::move(it->second.p), out = std::move(out)]() mutable {
          on_completed(p, std::move(out));
        });
        reg.live.erase(it);
        return ER_OK;
      }
    }
    log_stale("plugin completed an event that is not pending", id);
    return ER_E_HANDLE;
  } catch (...) {
    return ER_E_INVALID;  // out of memory: nothing must unwind into C
  }
}

int host_emit(er_event_handle* h, const char* json, size_t len) noexcept {
  try {
    if (!json) return ER_E_INVALID;
    std::optional<std::string> e = compact_emit(json, len);
    if (!e) return ER_E_INVALID;
    const uint64_t id = id_of(h);
    auto& reg = registry();
    {
      std::lock_guard<std::mutex> lock(reg.m);
      auto it = reg.live.find(id);
      if (it != reg.live.end()) {
        Pending& p = *it->second.p;
        if (p.emits.size() >= kMaxEmits || p.emit_bytes + e->size() > kMaxEmitBytes) return ER_E_LIMIT;
        p.emit_bytes += e->size();
        p.emits.push_back(std::move(*e));
        return ER_OK;
      }
    }
    log_stale("plugin emitted for an event that is not pending", id);
    return ER_E_HANDLE;
  } catch (...) {
    return ER_E_INVALID;
  }
}

// Calls a version 2 plugin. Returns the outcome if handle() returned a
// verdict that still counts, nothing if the event is pending or was
// completed through host->complete already.
std::optional<Outcome> call_plugin_v2(const Instance& inst, const EventView& v, uint64_t id) noexcept {
  try {
    er_event ev = event_of(v);
    ev.handle = handle_of(id);
    er_result res = fresh_result();
    int rc = inst.handle(inst.user_data, &ev, &res);
    if (rc == ER_PENDING) return std::nullopt;
    Outcome out = to_outcome(rc, res);
    if (take(id, out)) return out;
    log::warn("plugin returned a verdict for an event that is no longer pending; the verdict is ignored",
              {{"handler", inst.name}, {"handle", std::to_string(id)}});
    return std::nullopt;
  } catch (...) {
    Outcome out;
    try {
      out = Outcome::retry("handler_failed", "plugin threw an exception");
    } catch (...) {
      out.verdict = Verdict::Retry;
    }
    if (take(id, out)) return out;
    return std::nullopt;
  }
}

class PluginHandler : public Handler {
 public:
  PluginHandler(std::string name, std::shared_ptr<Instance> inst, boost::asio::io_context& io,
                boost::asio::thread_pool& pool, std::chrono::milliseconds timeout)
      : Handler(std::move(name)), inst_(std::move(inst)), io_(io), pool_(pool), timeout_(timeout) {}

  // Only tests destroy a handler with events in flight; skip what is queued.
  ~PluginHandler() override { PluginHandler::abort_all(); }

  void start(Job& job) override {
    if (inst_->version >= 2) return start_v2(job);
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

  // A version 2 plugin's pending events hold no call, so the configured
  // `concurrency` alone bounds them; calls are still serialised unless CONCURRENT.
  unsigned max_concurrency() const override {
    return (inst_->version >= 2 || (inst_->flags & ER_PLUGIN_CONCURRENT)) ? ~0u : 1u;
  }

  // Running plugin calls cannot be interrupted; their outcomes are dropped
  // and queued ones skipped. Pending events are abandoned: a later
  // completion finds nothing. Cleanup waits for the last running call.
  void abort_all() override {
    inst_->generation.fetch_add(1);
    abandon_pending();
  }

  // Event loop thread: the plugin's handle() returned (`sync`: with a verdict).
  static void on_returned(const std::shared_ptr<Pending>& p, std::optional<Outcome> sync) {
    p->returned = true;
    if (!p->job) return;
    if (sync) return p->owner->settle(p, std::move(*sync));
    if (p->early) return p->owner->settle(p, std::move(*p->early));
    p->owner->arm_timeout(p);
  }

  // Event loop thread: host->complete() took the event.
  static void on_completed(const std::shared_ptr<Pending>& p, Outcome out) {
    if (!p->job) return;
    if (!p->returned) {
      p->early = std::move(out);  // the plugin may still read the view until handle() returns
      return;
    }
    p->owner->settle(p, std::move(out));
  }

 private:
  void start_v2(Job& job) {
    auto p = std::make_shared<Pending>();
    p->id = registry().next.fetch_add(1);
    p->job = &job;
    p->owner = this;
    pending_.insert(p);
    {
      std::lock_guard<std::mutex> lock(registry().m);
      registry().live.emplace(p->id, Registry::Entry{p, &io_});
    }
    if (inst_->flags & ER_PLUGIN_NONBLOCKING) {
      on_returned(p, call_plugin_v2(*inst_, job.view(), p->id));
      return;
    }
    unsigned gen = inst_->generation.load();
    boost::asio::post(pool_, [inst = inst_, &io = io_, &job, p, gen] {
      if (inst->generation.load() != gen) return;  // aborted before it ran
      std::optional<Outcome> out;
      if (job.stale()) {
        Outcome skipped = Outcome::retry("stale", "skipped: its channel closed before a worker took it");
        if (take(p->id, skipped)) out = std::move(skipped);
      } else if (inst->flags & ER_PLUGIN_CONCURRENT) {
        out = call_plugin_v2(*inst, job.view(), p->id);
      } else {
        std::lock_guard<std::mutex> lock(inst->serial);
        out = call_plugin_v2(*inst, job.view(), p->id);
      }
      boost::asio::post(io, [p, out = std::move(out)]() mutable { on_returned(p, std::move(out)); });
    });
  }

  void arm_timeout(const std::shared_ptr<Pending>& p) {
    if (timeout_.count() <= 0) return;
    p->timer.emplace(io_, timeout_);
    p->timer->async_wait([p, timeout = timeout_](boost::system::error_code ec) {
      if (ec || !p->job) return;
      Outcome out = Outcome::retry("plugin_timeout", "not completed within " + std::to_string(timeout.count()) + "ms");
      // If complete() took it first, its outcome is on its way: let it win.
      if (take(p->id, out)) p->owner->settle(p, std::move(out));
    });
  }

  void settle(const std::shared_ptr<Pending>& p, Outcome out) {
    Job* job = p->job;
    p->job = nullptr;
    if (p->timer) p->timer->cancel();
    pending_.erase(p);
    job->finish(std::move(out));  // may free this handler (the last event of a generation)
  }

  void abandon_pending() {
    {
      std::lock_guard<std::mutex> lock(registry().m);
      for (const auto& p : pending_) registry().live.erase(p->id);
    }
    for (const auto& p : pending_) {
      p->job = nullptr;
      if (p->timer) p->timer->cancel();
    }
    pending_.clear();
  }

  std::shared_ptr<Instance> inst_;
  boost::asio::io_context& io_;
  boost::asio::thread_pool& pool_;
  std::chrono::milliseconds timeout_;
  std::unordered_set<std::shared_ptr<Pending>> pending_;  // loop thread: events not yet finished
};

void on_completed(const std::shared_ptr<Pending>& p, Outcome out) { PluginHandler::on_completed(p, std::move(out)); }

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
  if (std::find(std::begin(kSupportedVersions), std::end(kSupportedVersions), v) == std::end(kSupportedVersions)) {
    inst->fail("plugin " + cfg.plugin_path + " supports none of the ABI versions 2, 1 (it answered " +
               std::to_string(v) + ")");
  }
  inst->version = v;

  inst->host.struct_size = sizeof inst->host;
  inst->host.ctx = inst.get();
  inst->host.log = &host_log;
  if (v >= 2) {  // a version 1 plugin sees its reserved fields as they were
    inst->host.complete = &host_complete;
    inst->host.emit = &host_emit;
  }

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

  log::debug("plugin loaded", {{"handler", cfg.name}, {"path", cfg.plugin_path}, {"abi", std::to_string(v)},
                               {"concurrent", (info.flags & ER_PLUGIN_CONCURRENT) ? "yes" : "no"},
                               {"nonblocking", (info.flags & ER_PLUGIN_NONBLOCKING) ? "yes" : "no"}});
  return std::make_unique<PluginHandler>(cfg.name, std::move(inst), io, pool, cfg.timeout);
}

}  // namespace er::dispatch
