#include "consume/ack_tracker.hpp"

#include <algorithm>

namespace er::consume {

size_t AckTracker::find(uint64_t tag) const {
  auto it = std::lower_bound(tags_.begin(), tags_.end(), tag, [](const Entry& e, uint64_t t) { return e.tag < t; });
  return it != tags_.end() && it->tag == tag ? static_cast<size_t>(it - tags_.begin()) : kNone;
}

void AckTracker::delivered(uint64_t tag) {
  if (tags_.empty() || tags_.back().tag < tag) {
    tags_.push_back({tag, State::Running});
    return;
  }
  // Out of order (never seen from RabbitMQ): keep the order anyway, so that
  // a multiple ack never covers it.
  auto it = std::lower_bound(tags_.begin(), tags_.end(), tag, [](const Entry& e, uint64_t t) { return e.tag < t; });
  if (it != tags_.end() && it->tag == tag) return;
  const auto at = static_cast<size_t>(it - tags_.begin());
  tags_.insert(it, {tag, State::Running});
  if (at < run_end_) {
    // It splits the run: recount from the front.
    run_end_ = 0;
    ready_ = 0;
    extend_run();
  }
}

bool AckTracker::settled(uint64_t tag) {
  const size_t at = find(tag);
  if (at == kNone || tags_[at].state != State::Running) return false;
  tags_[at].state = State::Settled;
  ++pending_;
  extend_run();
  return true;
}

void AckTracker::forget(uint64_t tag) {
  const size_t at = find(tag);
  if (at == kNone || tags_[at].state == State::Gone) return;
  if (tags_[at].state == State::Settled) {
    --pending_;
    if (at < run_end_) --ready_;
  }
  tags_[at].state = State::Gone;
  pop_gone();
  extend_run();
}

void AckTracker::extend_run() {
  while (run_end_ < tags_.size() && tags_[run_end_].state != State::Running) {
    if (tags_[run_end_].state == State::Settled) ++ready_;
    ++run_end_;
  }
}

void AckTracker::pop_gone() {
  while (!tags_.empty() && tags_.front().state == State::Gone) {
    tags_.pop_front();
    if (run_end_ > 0) --run_end_;
  }
}

void AckTracker::clear() {
  tags_.clear();
  run_end_ = 0;
  ready_ = 0;
  pending_ = 0;
}

}  // namespace er::consume
