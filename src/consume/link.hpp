#pragma once
// The broker link: the one AMQP connection, owned by the event loop thread.
// It turns frames into deliveries and carries out acks, nacks and confirmed
// publishes. Channel 1 declares and publishes (with confirms); each queue is
// consumed on a channel of its own. It reconnects by itself (every URL in
// turn, then backoff) and recovers one queue's channel without disturbing the
// others. Every broker call it makes is bounded by broker.rpc_timeout, and one
// turn of the read loop handles a bounded number of frames.
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <deque>
#include <map>
#include <set>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "amqp/connection.hpp"
#include "config/config.hpp"
#include "consume/frame_reader.hpp"
#include "consume/queue_channel.hpp"
#include "settle/settler.hpp"

namespace er::consume {

// What the link reports upward. Called on the loop thread.
class LinkEvents {
 public:
  virtual ~LinkEvents() = default;
  // The consumers a new connection starts with (read when it is opened).
  virtual std::vector<std::shared_ptr<QueueChannel>> wanted_queues() = 0;
  // Connected, the topology declared and the wanted consumers started (or
  // being recovered): start any consumer still missing.
  virtual void link_up() = 0;
  // A delivery; the callee owns `env` (amqp_destroy_envelope). Its body holds
  // at most the queue's max_message_bytes of the `body_size` announced.
  virtual void delivery(QueueChannel& qc, amqp_envelope_t& env, uint64_t body_size) = 0;
  // One queue's channel is gone: its deliveries are stale (the broker has them back).
  virtual void queue_channel_lost(QueueChannel& qc) = 0;
  // The connection is gone: every delivery is stale, every pending copy failed.
  virtual void link_down() = 0;
  // The broker refused the topology in a way a retry cannot fix.
  virtual void link_failed(const std::string& why) = 0;
};

using settle::CopyResult;

class BrokerLink {
 public:
  using CopyDone = std::function<void(CopyResult)>;
  using Queues = std::function<std::vector<std::shared_ptr<QueueChannel>>()>;

  BrokerLink(boost::asio::io_context& io, LinkEvents& events);
  ~BrokerLink();
  BrokerLink(const BrokerLink&) = delete;
  BrokerLink& operator=(const BrokerLink&) = delete;

  // The config the next declares and connects use (URLs, topology, timeouts).
  void set_config(std::shared_ptr<const config::Config> cfg) { cfg_ = std::move(cfg); }
  void start();
  // Closes the connection; nothing is reported afterwards.
  void close();

  bool connected() const { return conn_.has_value(); }
  // Read by worker threads (Job::stale).
  uint64_t connection_id() const { return connection_id_.load(std::memory_order_relaxed); }
  const std::string& node() const { return node_; }
  uint64_t reconnects() const { return reconnects_; }
  bool blocked() const { return blocked_; }
  size_t frame_max() const { return conn_ ? static_cast<size_t>(amqp_get_frame_max(conn_->get())) : 131072; }

  // Opens a fresh channel for `qc`, sets its prefetch and consumes. On a
  // failure the queue is recovered with backoff (reported as lost).
  void open_queue(const std::shared_ptr<QueueChannel>& qc);
  // Stops the consumer (the channel stays open so its deliveries can settle).
  void cancel_consumer(QueueChannel& qc);
  // The prefetch from now on: basic.qos on the running consumer's channel
  // when it is channel-wide, else at its next start.
  void set_prefetch(QueueChannel& qc, uint16_t prefetch);
  // Closes the channel: what it still had unacked goes back to the queue.
  void close_queue(QueueChannel& qc);

  // Whether a delivery taken on (`connection`, `incarnation`, `channel`) can
  // still be settled.
  bool live(uint64_t connection, const QueueChannel& qc, uint64_t incarnation, amqp_channel_t channel) const {
    return conn_ && connection == connection_id() && qc.channel == channel &&
           qc.incarnation.load(std::memory_order_relaxed) == incarnation;
  }
  // Socket errors drop the connection (and report link_down); false then.
  // An ack may wait to be coalesced with its neighbours (broker.ack_window):
  // it goes out at the end of this turn of the loop, or when half the
  // prefetch is ready, or before its channel closes; one still blocked by an
  // unsettled tag below it goes out alone when the window has passed.
  bool ack(amqp_channel_t ch, uint64_t tag);
  bool nack(amqp_channel_t ch, uint64_t tag, bool requeue);
  // basic.ack frames sent (a coalesced one counts once).
  uint64_t ack_frames() const { return ack_frames_; }

  // Publishes mandatory through the default exchange on the confirm channel;
  // `done` runs exactly once. `props` and `body` must stay valid until then.
  // Held while the broker blocks publishing.
  void publish(std::string routing_key, const amqp_basic_properties_t* props, amqp_bytes_t body, CopyDone done) {
    publish_to({}, std::move(routing_key), props, body, std::move(done));
  }
  // The same through `exchange` (emitted events, to the config's exchange).
  void publish_to(std::string exchange, std::string routing_key, const amqp_basic_properties_t* props,
                  amqp_bytes_t body, CopyDone done);
  size_t held_copies() const { return held_.size(); }

  // Re-runs the queue's declare on a channel of its own; throws amqp::AmqpError.
  void declare_queue(const config::QueueConfig& q);
  // Draining: no consumer is started or recovered any more.
  void stop_recovering() { draining_ = true; }

 private:
  struct Pending {
    std::string exchange;
    std::string routing_key;
    CopyDone done;
    bool returned = false;
  };
  struct Held {
    std::string exchange;
    std::string routing_key;
    const amqp_basic_properties_t* props;
    amqp_bytes_t body;
    CopyDone done;
  };

  struct Opening;
  void connect();
  void connected(std::shared_ptr<Opening> o);
  void schedule_reconnect(const std::string& why);
  void open_publish_channel();
  void recover_later(const std::shared_ptr<QueueChannel>& qc, const std::string& why);
  void drop_channel(QueueChannel& qc);
  void lost(const std::string& why);
  void arm_socket();
  void arm_heartbeat();
  void pump();
  void on_frame(const amqp_frame_t& frame);
  void on_return(const FrameReader::Done& done);
  void on_confirm(uint64_t tag, bool multiple, bool acked);
  void fail_pending(CopyResult result);
  void send_now(Held h);
  void kick();
  template <class F>
  void later(F f);
  bool flush_acks(QueueChannel& qc, bool all);
  void flush_acks_later(QueueChannel& qc);
  void arm_ack_window();
  amqp_channel_t next_channel();

  boost::asio::io_context& io_;
  LinkEvents& events_;
  std::shared_ptr<const config::Config> cfg_;
  std::optional<amqp::Connection> conn_;
  std::optional<boost::asio::posix::stream_descriptor> socket_;
  bool socket_armed_ = false;
  bool closing_ = false;
  std::atomic<uint64_t> connection_id_{0};  // bumps per connection and at its loss
  size_t url_index_ = 0;
  std::string node_;
  uint64_t reconnects_ = 0;
  bool connected_once_ = false;
  FrameReader reader_;
  std::vector<std::shared_ptr<QueueChannel>> by_channel_;  // channel number -> its queue
  amqp_channel_t next_channel_ = 2;
  amqp_channel_t publish_channel_ = 1;
  uint64_t next_seq_ = 1;                  // publisher confirm sequence of publish_channel_
  std::map<uint64_t, Pending> pending_;
  bool blocked_ = false;
  std::deque<Held> held_;
  boost::asio::steady_timer heartbeat_timer_;
  boost::asio::steady_timer reconnect_timer_;
  std::chrono::milliseconds backoff_{0};
  std::mt19937 rng_{std::random_device{}()};
  std::thread connector_;  // opens connections: login and declares never hold the loop
  bool connecting_ = false;
  bool draining_ = false;                   // stop_recovering() was called
  bool kicked_ = false;                     // a pump() is posted
  std::vector<amqp_channel_t> ack_dirty_;  // channels with acks for the end of this turn
  bool ack_flush_posted_ = false;
  boost::asio::steady_timer ack_timer_;      // acks blocked behind a running tag
  bool ack_timer_armed_ = false;
  uint64_t ack_frames_ = 0;
  std::set<std::string> redeclare_;         // queues to declare again after a returned copy
  std::vector<std::shared_ptr<QueueChannel>> opening_;  // the consumers the connector starts
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);  // guards posted continuations
};

}  // namespace er::consume
