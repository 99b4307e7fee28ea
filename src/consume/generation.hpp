#pragma once
// A generation: everything built from one config (handlers, routing, schemas,
// metrics, retry steps, dedupe store) and the queue channels it consumes.
// Every in-flight delivery holds its generation, so a reload never frees a
// handler, a config value or a store under an event that still uses it; the
// last delivery of a replaced generation unloads it.
#include <memory>
#include <vector>

#include "consume/consumer_metrics.hpp"
#include "consume/queue_channel.hpp"
#include "dedupe/backend.hpp"
#include "dispatch/router.hpp"
#include "settle/settler.hpp"

namespace er::consume {

struct Generation {
  std::unique_ptr<dispatch::Runtime> rt;
  const config::Config* cfg = nullptr;
  std::unique_ptr<ConsumerMetrics> m;
  std::vector<std::vector<settle::RetryStep>> steps;   // per queue, ascending
  std::vector<std::shared_ptr<QueueChannel>> channels; // per queue
  std::shared_ptr<dedupe::Backend> dedupe;               // null: no queue dedupes
  std::shared_ptr<const settle::CopySigner> signer;    // signs and verifies copies' bookkeeping
};

}  // namespace er::consume
