#pragma once
// Settling an event: the dead-letter copy (original body and properties plus
// the x-death-* headers) and publisher-confirm bookkeeping. The original is
// acked only after the broker confirmed the copy.
#include <amqp.h>

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace er::settle {

struct DeadLetterInfo {
  std::string_view reason;        // stable code: handler_failed, invalid_json, unhandled...
  std::string_view detail;        // human text
  std::string_view handler;       // may be empty (decode errors, unhandled)
  std::string_view queue;         // the queue it was consumed from
  std::string_view exchange;      // as delivered
  std::string_view routing_key;   // as delivered
  uint32_t attempts = 1;
};

// Properties for a copy the daemon publishes on the event's behalf: the
// dead-letter copy, or the retry copy that waits in a delay queue. Keeps every
// original property and header (except stale ones of ours it replaces),
// forces delivery_mode 2 so the copy survives a broker restart, and keeps
// x-first-failed-at from an earlier failure if there was one.
class CopyProperties {
 public:
  // The dead-letter copy: x-death-*, x-attempts, x-*-failed-at, x-original-*.
  CopyProperties(const amqp_basic_properties_t& original, const DeadLetterInfo& info);
  // The retry copy: x-attempt (the next attempt), x-last-error, x-*-failed-at,
  // x-original-*, and a per-message expiration of `expiration_ms`.
  CopyProperties(const amqp_basic_properties_t& original, const DeadLetterInfo& info, uint32_t next_attempt,
                 uint64_t expiration_ms);
  CopyProperties(const CopyProperties&) = delete;
  CopyProperties& operator=(const CopyProperties&) = delete;

  const amqp_basic_properties_t* get() const { return &props_; }

 private:
  void copy_original(const amqp_basic_properties_t& original);
  void add_common(const DeadLetterInfo& info);
  void add_string(const char* key, std::string value);
  void add_int(const char* key, int64_t value);
  void finish();
  amqp_basic_properties_t props_;
  std::vector<amqp_table_entry_t> entries_;
  std::vector<std::string> strings_;  // owns the bytes the entries point to
  std::string first_failed_;
};

// What a delivery says about its own history, read from our headers: set on
// retry copies, absent on a fresh event (attempt 1, as delivered).
struct DeliveryHistory {
  uint32_t attempt = 1;
  bool has_original = false;               // x-original-routing-key present (it may be empty)
  std::string_view original_exchange;
  std::string_view original_routing_key;
};
DeliveryHistory read_history(const amqp_basic_properties_t& props);

// Header names, shared with the tests and the dlq tooling.
inline constexpr const char* kReason = "x-death-reason";
inline constexpr const char* kDetail = "x-death-detail";
inline constexpr const char* kHandler = "x-death-handler";
inline constexpr const char* kAttempts = "x-attempts";
inline constexpr const char* kFirstFailedAt = "x-first-failed-at";
inline constexpr const char* kLastFailedAt = "x-last-failed-at";
inline constexpr const char* kOriginalExchange = "x-original-exchange";
inline constexpr const char* kOriginalRoutingKey = "x-original-routing-key";
inline constexpr const char* kOriginalQueue = "x-original-queue";
inline constexpr const char* kAttempt = "x-attempt";        // retry copies: the attempt they will be
inline constexpr const char* kLastError = "x-last-error";   // retry copies: why the last attempt failed

// Publisher confirms on one channel: sequence numbers start at 1 and the
// broker acks or nacks them, possibly several at once (`multiple`).
template <class T>
class ConfirmTracker {
 public:
  uint64_t add(T item) {
    uint64_t seq = next_++;
    pending_.emplace(seq, std::move(item));
    return seq;
  }
  // Calls f(item, acked) for every sequence number the confirm covers.
  template <class F>
  void confirm(uint64_t tag, bool multiple, bool acked, F&& f) {
    if (multiple) {
      auto end = pending_.upper_bound(tag);
      std::vector<T> done;
      for (auto it = pending_.begin(); it != end; ++it) done.push_back(std::move(it->second));
      pending_.erase(pending_.begin(), end);
      for (auto& item : done) f(item, acked);
    } else {
      auto it = pending_.find(tag);
      if (it == pending_.end()) return;
      T item = std::move(it->second);
      pending_.erase(it);
      f(item, acked);
    }
  }
  // The channel is gone: nothing pending will ever be confirmed.
  template <class F>
  void fail_all(F&& f) {
    auto items = std::move(pending_);
    pending_.clear();
    for (auto& kv : items) f(kv.second, false);
  }
  template <class F>
  void for_each(F&& f) {
    for (auto& kv : pending_) f(kv.second);
  }
  void reset() { pending_.clear(); next_ = 1; }
  size_t size() const { return pending_.size(); }
  bool empty() const { return pending_.empty(); }

 private:
  uint64_t next_ = 1;
  std::map<uint64_t, T> pending_;
};

}  // namespace er::settle
