#include "consume/consumer_metrics.hpp"

namespace er::consume {

ConsumerMetrics::ConsumerMetrics(metrics::Registry& r, const dispatch::Runtime& rt) {
  auto& info = r.gauge("event_router_build_info", "Build information; the value is always 1.", {"version"});
  info.with({ER_VERSION}).set(1);
  auto& received = r.counter("event_router_events_received_total", "Events delivered by the broker.", {"queue"});
  auto& handled = r.counter("event_router_events_handled_total",
                            "Events a handler finished, by outcome (ack, retry, dead-letter).",
                            {"queue", "handler", "outcome"});
  auto& duration = r.histogram("event_router_handler_duration_seconds", "Time from handler start to its outcome.",
                               {"queue", "handler"});
  auto& redelivered = r.counter("event_router_redeliveries_total", "Deliveries the broker flagged as redelivered.",
                                {"queue"});
  auto& duplicates = r.counter("event_router_duplicates_skipped_total",
                               "Deliveries acked without running the handler: their event_id already succeeded.",
                               {"queue"});
  auto& unhandled = r.counter("event_router_unhandled_acked_total",
                              "Events no handler takes, acked on purpose (unhandled: ack).", {"queue"});
  connected = &r.gauge("event_router_connected", "1 while connected to the broker and consuming every queue.").with();
  in_flight = &r.gauge("event_router_in_flight_events", "Events delivered and not yet settled.").with();
  reconnects = &r.counter("event_router_reconnects_total", "Connections to the broker after the first.").with();
  ack_frames = &r.counter("event_router_ack_frames_total",
                          "basic.ack frames sent; one that acks several events (multiple) counts once.")
                    .with();
  auto& confirms = r.counter("event_router_publish_confirms_total",
                             "Broker answers to the daemon's own publishes (retry and dead-letter copies).",
                             {"result"});
  confirms_ack = &confirms.with({"ack"});
  confirms_nack = &confirms.with({"nack"});
  confirms_returned = &confirms.with({"returned"});
  confirm_latency = &r.histogram("event_router_publish_confirm_seconds", "Time from publishing a copy to its confirm.")
                         .with();

  for (const auto& q : rt.queues) {
    const std::string& name = q.cfg().name;
    QueueMetrics qm;
    qm.received = &received.with({name});
    qm.redelivered = &redelivered.with({name});
    qm.duplicates = &duplicates.with({name});
    qm.unhandled_acked = &unhandled.with({name});
    for (const auto& slot : const_cast<dispatch::QueueRouter&>(q).slots()) {
      const std::string& h = slot.handler->name();
      SlotMetrics sm;
      sm.ack = &handled.with({name, h, "ack"});
      sm.retry = &handled.with({name, h, "retry"});
      sm.dead_letter = &handled.with({name, h, "dead-letter"});
      sm.duration = &duration.with({name, h});
      qm.slots.push_back(sm);
    }
    queues_.push_back(std::move(qm));
  }
}

}  // namespace er::consume
