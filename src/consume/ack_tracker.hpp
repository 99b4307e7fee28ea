#pragma once
// The delivery tags one consumer channel has out, and which acks may go out
// in one frame. `basic.ack` with multiple=true acks every unacked tag up to N
// on the channel, so it may cover only a run of tags that are all settled (or
// already gone: nacked, or acked one by one). A tag still running below N
// blocks coalescing past it; settled tags behind it wait for it, or go out
// one by one when the caller says so (flush(true)). Pure: no broker, no clock.
#include <cstddef>
#include <cstdint>
#include <deque>

namespace er::consume {

class AckTracker {
 public:
  struct Ack {
    uint64_t tag;
    bool multiple;
  };

  // A delivery arrived on the channel (tags ascend on a channel).
  void delivered(uint64_t tag);
  // Its event is settled: its ack may go out. False if the tag is unknown
  // (the caller then acks it alone).
  bool settled(uint64_t tag);
  // It leaves without an ack (nack, reject): it blocks nothing any more.
  void forget(uint64_t tag);

  // Settled tags at the front that one frame covers (0: nothing to coalesce).
  size_t ready() const { return ready_; }
  // Settled tags not yet acked, ready or blocked behind a running one.
  size_t pending() const { return pending_; }
  // Tags the broker still counts as unacked, as far as this tracker knows.
  size_t outstanding() const { return tags_.size(); }

  // Emits the acks to send now: the settled run at the front as one frame
  // (multiple when it covers more than one unacked tag); with `all`, also
  // every settled tag behind a running one, each in a frame of its own.
  template <class Send>
  void flush(bool all, Send&& send);

  void clear();

 private:
  enum class State : unsigned char { Running, Settled, Gone };
  struct Entry {
    uint64_t tag;
    State state;
  };
  static constexpr size_t kNone = ~size_t{0};
  size_t find(uint64_t tag) const;  // index, or kNone
  void extend_run();
  void pop_gone();

  std::deque<Entry> tags_;  // ascending
  size_t run_end_ = 0;      // tags_[0, run_end_) hold no running tag
  size_t ready_ = 0;        // settled tags in that run
  size_t pending_ = 0;
};

template <class Send>
void AckTracker::flush(bool all, Send&& send) {
  if (ready_ > 0) {
    // The run at the front holds only settled and gone tags: one frame acks
    // it up to its last settled tag (gone ones are no longer unacked).
    size_t last = run_end_;
    while (tags_[last - 1].state != State::Settled) --last;
    const Ack ack{tags_[last - 1].tag, ready_ > 1};
    pending_ -= ready_;
    tags_.erase(tags_.begin(), tags_.begin() + static_cast<std::ptrdiff_t>(last));
    run_end_ -= last;
    ready_ = 0;
    send(ack);
  }
  if (all) {
    for (auto& e : tags_) {
      if (e.state != State::Settled) continue;
      e.state = State::Gone;
      --pending_;
      send(Ack{e.tag, false});
    }
  }
  pop_gone();
  extend_run();
}

}  // namespace er::consume
