#include "dispatch/router.hpp"

#include <algorithm>

#include "dispatch/exec_handler.hpp"
#include "dispatch/plugin_handler.hpp"
#include "dispatch/worker_handler.hpp"
#include "util/log.hpp"

namespace er::dispatch {

namespace {
constexpr size_t kMaxCachedTypes = 4096;  // bounds memory against random event types
}

HandlerSlot* QueueRouter::route(std::string_view event_type) {
  auto it = cache_.find(event_type);
  if (it != cache_.end()) return it->second < 0 ? nullptr : &slots_[static_cast<size_t>(it->second)];
  int found = -1;
  for (size_t i = 0; i < slots_.size() && found < 0; ++i) {
    for (const auto& p : slots_[i].cfg->events) {
      if (p.matches(event_type)) { found = static_cast<int>(i); break; }
    }
  }
  if (cache_.size() < kMaxCachedTypes) cache_.emplace(std::string(event_type), found);
  return found < 0 ? nullptr : &slots_[static_cast<size_t>(found)];
}

std::unique_ptr<Runtime> build_runtime(std::shared_ptr<const config::Config> cfg, boost::asio::io_context& io,
                                       boost::asio::thread_pool& pool, const Runtime* previous) {
  auto rt = std::make_unique<Runtime>();
  rt->config = cfg;
  if (!cfg->schemas_dir.empty()) rt->schemas = event::SchemaSet::load(cfg->schemas_dir);
  rt->queues.reserve(cfg->queues.size());
  for (const auto& q : cfg->queues) {
    QueueRouter router(q);
    router.slots().reserve(q.handlers.size());
    for (const auto& h : q.handlers) {
      HandlerSlot slot;
      slot.cfg = &h;
      switch (h.kind) {
        case config::HandlerKind::Plugin: slot.handler = make_plugin_handler(h, io, pool); break;
        case config::HandlerKind::Exec: slot.handler = make_exec_handler(h, io); break;
        case config::HandlerKind::Worker:
          slot.handler = make_worker_handler(h, q, io, previous ? previous->find_handler(q.name, h.name) : nullptr);
          break;
      }
      slot.limit = std::max(1u, std::min(h.concurrency, slot.handler->max_concurrency()));
      router.slots().push_back(std::move(slot));
    }
    rt->queues.push_back(std::move(router));
  }
  return rt;
}

const Handler* Runtime::find_handler(std::string_view queue, std::string_view handler) const {
  for (const auto& q : queues) {
    if (q.cfg().name != queue) continue;
    for (const auto& slot : const_cast<QueueRouter&>(q).slots())
      if (slot.handler && slot.handler->name() == handler) return slot.handler.get();
  }
  return nullptr;
}

std::vector<std::string> plan_warnings(const config::Config& cfg) {
  // RabbitMQ closes the channel of a delivery left unacked longer than its
  // consumer_timeout (30 min by default), which would redeliver the event.
  constexpr auto kAckTimeout = std::chrono::minutes(30);
  std::vector<std::string> out = cfg.warnings;
  bool amqps = std::any_of(cfg.broker.urls.begin(), cfg.broker.urls.end(),
                           [](const std::string& u) { return u.rfind("amqps://", 0) == 0; });
  if (amqps && !cfg.broker.tls.verify_peer)
    out.push_back("broker.tls.verify_peer is false: the broker's certificate is not checked, so anyone on the "
                  "network path can pose as the broker and read the password and every event");
  else if (amqps && !cfg.broker.tls.verify_hostname)
    out.push_back("broker.tls.verify_hostname is false: any certificate from the trusted CA is accepted for this "
                  "broker, whatever host it was issued to");
  for (const auto& q : cfg.queues) {
    for (const auto& h : q.handlers) {
      // A plugin's timeout bounds a pending event (ABI 2); nothing is killed after it.
      const bool plugin = h.kind == config::HandlerKind::Plugin;
      const auto budget = plugin ? h.timeout : h.timeout + h.kill_grace;
      if (budget >= kAckTimeout)
        out.push_back("handler '" + h.name + "': " + (plugin ? "timeout (" : "timeout + kill_grace (") +
                      std::to_string(budget.count() / 1000) +
                      "s) is not below the broker's consumer acknowledgement timeout (30 min by default); "
                      "the broker would close the channel and redeliver the event while it still runs");
      if (h.ordering == config::Ordering::Aggregate && q.ordering_hold_max + h.timeout >= kAckTimeout)
        out.push_back("handler '" + h.name + "': ordering_hold_max + timeout (" +
                      std::to_string((q.ordering_hold_max + h.timeout).count() / 1000) +
                      "s) is not below the broker's consumer acknowledgement timeout (30 min by default); "
                      "an event held for a retry in place could be redelivered behind later events of its aggregate");
    }
  }
  return out;
}

void print_plan(const Runtime& rt, std::ostream& out) {
  const config::Config& cfg = *rt.config;
  out << "config " << cfg.path << " ok\n";
  out << "broker " << log::mask_url(cfg.broker.url) << " heartbeat " << cfg.broker.heartbeat.count() << "ms\n";
  out << "exchange " << cfg.exchange.name << " (" << cfg.exchange.type << ", durable)\n";
  for (const auto& q : cfg.queues) {
    out << "queue " << q.name << " (durable";
    if (q.type == config::QueueType::Quorum) out << ", quorum, delivery_limit " << q.delivery_limit;
    out << ") prefetch " << q.prefetch << " dead-letter " << q.dead_letter_queue
        << " unhandled " << (q.unhandled == config::Unhandled::Ack ? "ack" : "dead-letter")
        << (q.single_active_consumer ? " single-active-consumer" : "") << "\n";
    for (const auto& b : q.bindings) out << "  binding " << cfg.exchange.name << " -> " << q.name << " key " << b << "\n";
    for (const auto& h : q.handlers) {
      out << "  handler " << h.name << " events [";
      for (size_t i = 0; i < h.events.size(); ++i) out << (i ? ", " : "") << h.events[i].text();
      out << "] ";
      if (h.kind == config::HandlerKind::Plugin) {
        out << "plugin " << h.plugin_path;
      } else {
        // Arguments may carry secrets and --check output reaches the journal
        // (ExecStartPre, ExecReload): the program and the count only.
        out << (h.kind == config::HandlerKind::Worker ? "worker " : "exec ") << (h.argv.empty() ? std::string() : h.argv[0]) << " (" << (h.argv.empty() ? 0 : h.argv.size() - 1)
            << (h.argv.size() == 2 ? " argument)" : " arguments)");
        out << " timeout " << h.timeout.count() << "ms";
      }
      out << " concurrency " << h.concurrency;
      if (h.ordering == config::Ordering::Aggregate)
        out << " ordering aggregate (hold_max " << q.ordering_hold_max.count() << "ms)";
      out << "\n";
    }
    if (q.handlers.empty()) out << "  (no handlers: every event is unhandled)\n";
    out << "  retry max_attempts " << q.retry.max_attempts << " delay queues";
    for (auto step : q.retry_steps()) out << " " << q.name << ".retry." << step.count();
    out << "\n  max_message_bytes " << q.max_message_bytes << "\n";
  }
  if (rt.schemas) {
    out << "schemas " << cfg.schemas_dir << " (" << rt.schemas->size() << " loaded):";
    for (const auto& t : rt.schemas->event_types()) out << " " << t;
    out << "\n";
  }
}

}  // namespace er::dispatch
