#pragma once
// One consumer of one queue: the AMQP channel it runs on and the deliveries
// it has out. A reload that keeps a queue as it is keeps its QueueChannel; one
// that removes the queue or changes its prefetch retires it (it drains, then
// closes) and, for a change, starts a new one beside it; a single-active-
// consumer queue keeps its consumer instead (see Consumer::switch_to).
#include <amqp.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>

#include "consume/ack_tracker.hpp"

namespace er::consume {

struct QueueChannel {
  QueueChannel(boost::asio::io_context& io, std::string queue, uint16_t prefetch_, bool single_active_,
               bool channel_wide_)
      : name(std::move(queue)),
        prefetch(prefetch_),
        single_active(single_active_),
        channel_wide(channel_wide_),
        recover_timer(io) {}
  QueueChannel(const QueueChannel&) = delete;
  QueueChannel& operator=(const QueueChannel&) = delete;

  const std::string name;
  uint16_t prefetch;           // changed in place only when channel_wide (else at the next start)
  // x-single-active-consumer: a replaced consumer would queue behind other
  // instances' standbys, so it is kept; and stop() lets go of it only when settled.
  const bool single_active;
  // Prefetch as basic.qos global: the channel has one consumer, so it means
  // the same, and a new value applies to the running consumer (a per-consumer
  // one only applies to consumers started after it). Classic queues only:
  // quorum queues refuse global qos.
  const bool channel_wide;
  bool letting_go = false;     // stopping: its channel closes once its events are settled
  size_t index = 0;            // in the current generation's queues (while not retired)
  bool retired = false;        // removed or replaced by a reload: drains, then closes
  amqp_channel_t channel = 0;  // 0 = no channel
  bool consuming = false;      // its consumer is active (not cancelled)
  // Bumps whenever the channel goes away, so a result for a delivery of an
  // earlier incarnation is never settled on a later one. Read by worker threads.
  std::atomic<uint64_t> incarnation{0};
  size_t in_flight = 0;        // deliveries not yet settled
  AckTracker acks;             // tags out on `channel` (the link's; cleared with the channel)
  std::string consumer_tag;
  std::chrono::milliseconds backoff{0};
  bool recovering = false;     // a recovery is scheduled
  std::string unavailable;     // why it is not consumed (the last refusal); empty once consumed
  boost::asio::steady_timer recover_timer;
};

}  // namespace er::consume
