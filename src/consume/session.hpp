#pragma once
// The broker session: one AMQP connection owned by the event loop thread,
// channel 1 for declaring and (confirmed) publishing, one channel per queue
// for consuming. Deliveries go to the router; outcomes come back as acks or
// confirmed copies (retry, dead-letter). Reconnects by itself, recovers a
// single queue's channel without disturbing the others, drains on stop().
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "amqp/connection.hpp"
#include "consume/session_metrics.hpp"
#include "dedupe/store.hpp"
#include "dispatch/router.hpp"
#include "settle/settle.hpp"

namespace er::consume {

struct Delivery;

class Session {
 public:
  // `dedupe` may be null (no queue has `dedupe:`); it must outlive the session.
  Session(boost::asio::io_context& io, std::unique_ptr<dispatch::Runtime> runtime, metrics::Registry& registry,
          dedupe::Store* dedupe = nullptr);

  // Switches to a new runtime (SIGHUP), built and validated by the caller.
  // New events go to the new handlers; in-flight ones finish on their old
  // handler and are settled on their channel. New queues are declared and
  // consumed; removed ones stop being consumed (not deleted). Broker URL
  // changes apply at the next reconnect. Throws amqp::AmqpError only if
  // declaring the new topology failed (the old one keeps running).
  void reload(std::unique_ptr<dispatch::Runtime> runtime, dedupe::Store* dedupe);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Connects (retrying with backoff until stop()), declares, consumes.
  // `on_ready` runs each time every queue is being consumed; `on_stopped`
  // once, after stop() drained or after a fatal error (see exit_code()).
  void start(std::function<void()> on_ready, std::function<void()> on_stopped);

  // Stop consuming, let in-flight handlers finish (up to shutdown_timeout),
  // settle them, close the connection, then call `on_stopped`.
  void stop();

  // Non-zero when the session gave up for a reason a restart will not fix
  // (e.g. the broker's queue has different arguments than the config).
  int exit_code() const { return exit_code_; }
  // True if stop() had to abandon running handlers at the deadline.
  bool aborted() const { return aborted_; }
  size_t in_flight() const { return in_flight_; }
  // Connected and consuming every queue; else `reason` says why not.
  bool ready(std::string& reason) const;
  // Masked URL of the broker node of the current connection.
  const std::string& node() const { return node_; }

  struct Stats {
    uint64_t received = 0;
    uint64_t acked = 0;          // handled successfully, or unhandled with `unhandled: ack`
    uint64_t retried = 0;
    uint64_t dead_lettered = 0;
    uint64_t reconnects = 0;
  };
  const Stats& stats() const { return stats_; }

 private:
  friend struct Delivery;
  enum class State { Idle, Connecting, Running, Draining, Stopped };

  // One queue's consuming channel. Channel numbers are never reused within a
  // connection, so frames of a closed incarnation cannot be mistaken for new ones.
  struct QueueChannel {
    std::string name;
    size_t index = 0;            // in the current generation's queues
    bool removed = false;        // gone from the config: draining, then closed
    amqp_channel_t channel = 0;  // 0 = no channel
    bool consuming = false;      // its consumer is active (not cancelled by a reload)
    std::atomic<uint64_t> gen{0};  // bumps whenever the channel goes away (read by worker threads)
    size_t in_flight = 0;
    std::string consumer_tag;
    std::chrono::milliseconds backoff{0};
    std::unique_ptr<boost::asio::steady_timer> retry_timer;
  };

  struct RetryStep {
    config::Duration delay;
    std::string queue;  // its delay queue
  };

  // Everything built from one config. Deliveries hold a reference, so a
  // reload never pulls a handler or a config value from under them.
  struct Generation {
    std::unique_ptr<dispatch::Runtime> rt;
    const config::Config* cfg = nullptr;
    std::unique_ptr<SessionMetrics> m;
    std::vector<std::vector<RetryStep>> steps;  // per queue, ascending
    std::vector<QueueChannel*> channels;        // per queue
  };
  std::shared_ptr<Generation> make_generation(std::unique_ptr<dispatch::Runtime> rt);
  template <class F>
  void for_each_generation(F&& f);

  // A copy waiting for the broker to unblock publishing.
  struct BlockedPublish {
    Delivery* d;
    std::string routing_key;
    std::unique_ptr<settle::CopyProperties> props;
  };

  void connect();
  void schedule_reconnect(const std::string& why);
  void open_queue_channel(QueueChannel& qc);  // throws amqp::AmqpError
  void queue_channel_lost(QueueChannel& qc, const std::string& why);
  void reopen_queue(QueueChannel& qc);
  void close_removed(QueueChannel& qc);
  void declare_changes(amqp_channel_t ch, const config::Config& prev, const config::Config& next,
                       const Generation& g);
  void finish_reload(std::shared_ptr<Generation> g, const config::Config& prev, dedupe::Store* dedupe);
  const config::Config& cfg() const { return *current_->cfg; }
  void arm_dedupe_flush();
  bool is_duplicate(const Delivery* d);
  void remember_success(const Delivery* d);
  void arm_socket();
  void arm_heartbeat();
  void pump();
  void on_frame(const amqp_frame_t& frame);
  void on_delivery(amqp_envelope_t& env);
  void start_job(Delivery* d);
  void start_waiting(dispatch::HandlerSlot* slot);
  void on_finished(Delivery* d, dispatch::Outcome outcome);
  bool live(const Delivery* d) const;
  void ack(Delivery* d);
  void hand_back_later(Delivery* d, const char* why);
  void dead_letter(Delivery* d, std::string_view reason, std::string_view detail, std::string_view handler);
  void retry(Delivery* d, const dispatch::Outcome& outcome, const std::string& handler,
             const config::RetryConfig& policy);
  void publish_copy(Delivery* d, const std::string& routing_key, std::unique_ptr<settle::CopyProperties> props,
                    const char* what);
  void on_confirm(uint64_t tag, bool multiple, bool acked);
  void on_return(const amqp_frame_t& frame);
  void connection_lost(const std::string& why);
  void drop_waiting(const QueueChannel& qc);
  void maybe_finish_stop();
  void finish_stop();
  Delivery* acquire();
  void release(Delivery* d);

  boost::asio::io_context& io_;
  metrics::Registry& registry_;
  std::shared_ptr<Generation> current_;
  std::vector<std::weak_ptr<Generation>> generations_;  // current and those in-flight events still use
  State state_ = State::Idle;

  std::optional<amqp::Connection> conn_;
  std::optional<boost::asio::posix::stream_descriptor> socket_;
  bool socket_armed_ = false;
  std::atomic<uint64_t> epoch_{0};  // bumps per connection; results of older ones are stale
  size_t url_index_ = 0;
  std::string node_;    // masked URL of the node we are connected to
  std::vector<std::unique_ptr<QueueChannel>> qch_;  // by queue name, across reloads
  std::vector<QueueChannel*> channel_map_;          // channel number -> its queue, null = none
  amqp_channel_t next_channel_ = 2;
  bool blocked_ = false;             // connection.blocked: hold publishes
  std::deque<BlockedPublish> blocked_publishes_;

  settle::ConfirmTracker<Delivery*> confirms_;
  size_t in_flight_ = 0;
  std::vector<std::unique_ptr<Delivery>> pool_;  // recycled Delivery objects
  std::string detail_;                           // scratch for decode errors

  boost::asio::steady_timer heartbeat_timer_;
  boost::asio::steady_timer reconnect_timer_;
  boost::asio::steady_timer deadline_timer_;
  std::chrono::milliseconds backoff_{0};
  std::mt19937 rng_{std::random_device{}()};

  std::function<void()> on_ready_;
  std::function<void()> on_stopped_;
  int exit_code_ = 0;
  bool aborted_ = false;
  Stats stats_;
  bool connected_once_ = false;
  dedupe::Store* dedupe_ = nullptr;
  boost::asio::steady_timer dedupe_timer_;
  unsigned dedupe_ticks_ = 0;
};

}  // namespace er::consume
