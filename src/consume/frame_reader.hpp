#pragma once
// Assembles messages (deliveries and returns) from their frames, per channel,
// without ever waiting: frames are fed as they arrive, so a broker that stops
// mid-message never holds the event loop. Everything is copied out of
// rabbitmq-c's frame buffers, so they can be released after each frame.
// A delivery keeps at most `keep` bytes of its body; the rest is counted but
// not stored, so an oversized message costs a bounded amount of memory.
#include <amqp.h>

#include <chrono>
#include <cstdint>
#include <map>
#include <string>

namespace er::consume {

class FrameReader {
 public:
  enum class Kind { None, Delivery, Return };
  struct Done {
    Kind kind = Kind::None;
    amqp_envelope_t env{};   // Delivery: owned by the receiver (amqp_destroy_envelope)
    uint64_t body_size = 0;  // as the broker announced it; env's body may be shorter
    std::string exchange;    // Return: where the message was sent
    std::string routing_key;
  };

  FrameReader() = default;
  FrameReader(FrameReader&&) noexcept = default;
  FrameReader& operator=(FrameReader&& o) noexcept;
  ~FrameReader();

  void start_delivery(amqp_channel_t ch, const amqp_basic_deliver_t& m, size_t keep);
  void start_return(amqp_channel_t ch, const amqp_basic_return_t& m);
  // A header or body frame. False on a protocol violation (content with no
  // message started). When a message is complete, `done.kind` says which.
  bool content(const amqp_frame_t& frame, Done& done);
  // The channel is gone: drop what was being read on it.
  void forget(amqp_channel_t ch);
  // Some message has had no frame for longer than `limit`.
  bool stalled(std::chrono::milliseconds limit) const;
  size_t assembling() const { return partial_.size(); }

 private:
  struct Partial {
    Kind kind = Kind::None;
    amqp_envelope_t env{};
    bool have_header = false;
    uint64_t body_size = 0;
    uint64_t received = 0;
    size_t keep = 0;
    std::string exchange;
    std::string routing_key;
    std::chrono::steady_clock::time_point started;  // its last frame
  };
  static void destroy(Partial& p);
  std::map<amqp_channel_t, Partial> partial_;
};

// Deep-copies `src` (every flagged field and the header table) into `pool`.
// False when out of memory.
bool clone_properties(const amqp_basic_properties_t& src, amqp_basic_properties_t& dst, amqp_pool_t* pool);

}  // namespace er::consume
