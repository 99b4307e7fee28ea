#pragma once
// The consumer's Prometheus metrics. Label children on the hot path are
// resolved once, here, so counting an event is one relaxed atomic add.
#include <string>
#include <string_view>
#include <vector>

#include "dispatch/router.hpp"
#include "metrics/metrics.hpp"

namespace er::consume {

struct SlotMetrics {
  metrics::Counter* ack = nullptr;
  metrics::Counter* retry = nullptr;
  metrics::Counter* dead_letter = nullptr;
  metrics::Histogram* duration = nullptr;
};

struct QueueMetrics {
  metrics::Counter* received = nullptr;
  metrics::Counter* redelivered = nullptr;
  metrics::Counter* duplicates = nullptr;
  metrics::Counter* unhandled_acked = nullptr;
  std::vector<SlotMetrics> slots;  // same order as the queue's handlers
};

class ConsumerMetrics {
 public:
  ConsumerMetrics(metrics::Registry& registry, const dispatch::Runtime& rt);

  QueueMetrics& queue(size_t i) { return queues_[i]; }
  metrics::Gauge* connected = nullptr;
  metrics::Gauge* in_flight = nullptr;
  metrics::Counter* reconnects = nullptr;
  metrics::Counter* ack_frames = nullptr;
  metrics::Counter* confirms_ack = nullptr;
  metrics::Counter* confirms_nack = nullptr;
  metrics::Counter* confirms_returned = nullptr;
  metrics::Histogram* confirm_latency = nullptr;

 private:
  std::vector<QueueMetrics> queues_;
};

}  // namespace er::consume
