#pragma once
// The consumer: takes deliveries from the broker link, runs them through
// intake, hands them to their handler within its concurrency limit, and gives
// the verdict to the settler, whose decisions it carries out on the link.
// It owns the generations (see generation.hpp) and the drain on stop().
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "consume/crash_guard.hpp"
#include "consume/generation.hpp"
#include "consume/link.hpp"
#include "consume/ordering.hpp"
#include "settle/settler.hpp"

namespace er::consume {

struct Delivery;

class Consumer final : LinkEvents, settle::Outbox {
 public:
  // What a config builds besides its runtime.
  struct Extras {
    std::shared_ptr<dedupe::Backend> dedupe;             // null: no queue dedupes
    std::shared_ptr<const settle::CopySigner> signer;  // required
  };
  Consumer(boost::asio::io_context& io, std::unique_ptr<dispatch::Runtime> runtime, metrics::Registry& registry,
           Extras extras);
  ~Consumer() override;
  Consumer(const Consumer&) = delete;
  Consumer& operator=(const Consumer&) = delete;

  // Connects (retrying with backoff until stop()), declares, consumes.
  // `on_ready` runs each time every queue is being consumed; `on_stopped`
  // once, after stop() drained or after a fatal error (see exit_code()).
  void start(std::function<void()> on_ready, std::function<void()> on_stopped);

  // Stop consuming, let in-flight handlers finish (up to shutdown_timeout),
  // settle them, close the connection, then call `on_stopped`. A
  // single-active-consumer queue keeps its consumer until its own events are
  // settled (what arrives meanwhile stays unacked), then its channel closes:
  // the broker hands the queue over only after that.
  void stop();

  // Switches to a runtime that is already built (and whose topology is
  // declared): one step that cannot fail. New events go to the new handlers;
  // in-flight ones finish on their own generation and settle on their
  // channel. Queues that are new, or whose prefetch changed, get a new
  // consumer (a single-active-consumer queue keeps its own and gets the new
  // prefetch in place); removed ones and replaced consumers drain, then close.
  void switch_to(std::unique_ptr<dispatch::Runtime> runtime, Extras extras);

  // Crash-loop protection: journal the events in flight, dead-letter the
  // redelivered ones that took the daemon down too often. Before start().
  void set_crash_guard(std::shared_ptr<CrashGuard> guard) { guard_ = std::move(guard); }

  const config::Config& config() const { return *current_->cfg; }
  std::shared_ptr<const config::Config> config_ptr() const { return current_->rt->config; }
  std::shared_ptr<dedupe::Backend> dedupe_store() const { return current_->dedupe; }
  // The running runtime; holds its whole generation, so release it on the loop.
  std::shared_ptr<const dispatch::Runtime> runtime_ptr() const {
    return std::shared_ptr<const dispatch::Runtime>(current_, current_->rt.get());
  }

  // Non-zero when the consumer gave up for a reason a restart will not fix
  // (e.g. the broker's queue has different arguments than the config).
  int exit_code() const { return exit_code_; }
  // True if stop() had to abandon running handlers at the deadline.
  bool aborted() const { return aborted_; }
  size_t in_flight() const { return in_flight_; }
  // stop() has begun (or it gave up): nothing new may be switched in.
  bool stopping() const { return state_ == State::Draining || state_ == State::Stopped; }
  // Connected and consuming every queue; else `reason` says why not.
  bool ready(std::string& reason) const;
  // Masked URL of the broker node of the current connection.
  const std::string& node() const { return link_.node(); }

  struct Stats {
    uint64_t received = 0;
    uint64_t acked = 0;  // handled successfully, or unhandled with `unhandled: ack`
    uint64_t retried = 0;
    uint64_t dead_lettered = 0;
    uint64_t reconnects = 0;
  };
  Stats stats() const;

 private:
  friend struct Delivery;
  enum class State { Idle, Running, Draining, Stopped };

  // LinkEvents
  std::vector<std::shared_ptr<QueueChannel>> wanted_queues() override { return current_->channels; }
  void link_up() override;
  void delivery(QueueChannel& qc, amqp_envelope_t& env, uint64_t body_size) override;
  void queue_channel_lost(QueueChannel& qc) override;
  void link_down() override;
  void link_failed(const std::string& why) override;
  // settle::Outbox
  void ack(settle::Settling& s) override;
  void hand_back_later(settle::Settling& s, const char* why) override;
  void drop(settle::Settling& s) override;
  void publish(settle::Settling& s) override;
  bool live(const settle::Settling& s) const override;
  void publish_emit(settle::Settling& s, size_t index) override;
  void succeeded(settle::Settling& s) override;

  std::shared_ptr<Generation> make_generation(std::unique_ptr<dispatch::Runtime> rt, Extras extras);
  template <class F>
  void for_each_generation(F&& f);
  bool crash_looped(Delivery* d, const config::QueueConfig& q);
  void schedule(Delivery* d);
  void start_or_wait(Delivery* d);
  void start_job(Delivery* d);
  void start_waiting(dispatch::HandlerSlot& slot);
  void on_finished(Delivery* d, dispatch::Outcome outcome);
  void settle_or_hold(Delivery* d, const dispatch::Outcome& outcome, std::string_view handler,
                      const config::HandlerConfig& h);
  void hold(Delivery* d, config::Duration wait);
  void end_hold(Delivery* d);
  template <class Pred>
  void wake_held(Pred&& pred);
  void leave_line(Delivery* d);
  void drop_waiting_in_lines(const QueueChannel* qc);
  void hand_back_lines();  // every held and line-waiting event, on stop
  bool event_line(const config::LogConfig& lc, bool ok);
  enum class RunEnd { Succeeded, Failed, NotRun };
  void finish_twins(Delivery* d, RunEnd end);
  bool is_live(const Delivery* d) const;
  void remember_success(Delivery* d);
  void claim(Delivery* d);  // asynchronous stores: check, then run or settle
  void claimed(Delivery* d, dedupe::Check c);
  void drop_waiting(const QueueChannel& qc);
  void close_if_drained(QueueChannel& qc);
  bool parking(const QueueChannel& qc) const;
  void give_back(Delivery* d);
  void let_go_if_settled(QueueChannel& qc);
  void arm_dedupe_flush();
  void maybe_finish_stop();
  void finish_stop();
  Delivery* acquire();
  void release(Delivery* d);

  boost::asio::io_context& io_;
  metrics::Registry& registry_;
  BrokerLink link_;
  settle::Settler settler_;
  std::shared_ptr<Generation> current_;
  std::vector<std::weak_ptr<Generation>> generations_;  // current and those in-flight events still use
  std::vector<std::shared_ptr<QueueChannel>> retired_;   // draining until their last delivery settles
  State state_ = State::Idle;
  size_t in_flight_ = 0;
  uint64_t received_ = 0;
  uint64_t reconnects_counted_ = 0;  // of link_.reconnects(), in the metric
  uint64_t successes_seen_ = 0;      // for log.sample
  uint64_t ack_frames_counted_ = 0;  // of link_.ack_frames(), in the metric
  // Dedupe for copies in flight: queue + '\0' + event_id -> the delivery
  // running it. A second copy waits for that run's outcome.
  std::unordered_map<std::string, Delivery*> running_ids_;
  // ordering: aggregate, per queue name (kept across reloads and consumers,
  // so an aggregate stays in order when its queue gets a new consumer).
  std::map<std::string, AggregateLines, std::less<>> lines_;
  std::vector<Delivery*> held_;  // waiting in place for a retry
  std::vector<std::unique_ptr<Delivery>> pool_;  // recycled Delivery objects
  std::string detail_;                           // scratch for decode errors
  std::shared_ptr<CrashGuard> guard_;            // null: crash-loop protection off
  boost::asio::steady_timer deadline_timer_;
  boost::asio::steady_timer dedupe_timer_;
  std::function<void()> on_ready_;
  std::function<void()> on_stopped_;
  int exit_code_ = 0;
  bool aborted_ = false;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);  // guards timers that outlive a delivery
};

}  // namespace er::consume
