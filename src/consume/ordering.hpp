#pragma once
// Per-aggregate ordering (docs/ordering.md): the events of one aggregate form
// a line; only the first of a line runs (or waits in place for a retry), the
// others wait behind it in the order they joined. Lines of different
// aggregates are independent. One AggregateLines per queue; the consumer owns
// the events, a line only links them.
#include <chrono>
#include <cstddef>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace er::consume {

class AggregateLines;

// The part of an event that a line links. Intrusive: joining a line costs no
// allocation beyond the line itself (one per aggregate with events in flight).
struct InLine {
  using Clock = std::chrono::steady_clock;
  AggregateLines* lines = nullptr;  // set while in a line
  InLine* next_in_line = nullptr;
  const std::string* key = nullptr; // the line's aggregate id (owned by the line)
  Clock::time_point joined{};       // when it joined: for the wait gauge and the hold bound

  bool in_line() const { return lines != nullptr; }
};

class AggregateLines {
 public:
  using Clock = InLine::Clock;

  AggregateLines() = default;
  AggregateLines(const AggregateLines&) = delete;
  AggregateLines& operator=(const AggregateLines&) = delete;

  // Puts `e` (in no line) at the end of the line of `aggregate_id`. True when
  // it is first in that line: the caller may start it now.
  bool join(InLine& e, std::string_view aggregate_id, Clock::time_point now);
  // Puts `e` (in no line) directly behind `first`, the first of its line:
  // a copy of the same event that is to run next.
  void join_behind(InLine& e, InLine& first, Clock::time_point now);
  // `e` is done (settled, handed back or dropped) and leaves its line. When
  // it was first, returns the new first, which the caller starts (nullptr:
  // the line is now empty); an entry behind the first just leaves.
  InLine* leave(InLine& e);
  // Takes out every entry behind the first of its line for which `pred` is
  // true (events to hand back: their channel is gone, or we are stopping).
  std::vector<InLine*> take_waiting(const std::function<bool(const InLine&)>& pred);

  // Events behind the first of their line.
  size_t waiting() const { return waiting_; }
  // Lines (aggregates with at least one event in flight).
  size_t lines() const { return lines_.size(); }
  // How long the longest-waiting entry behind a first has waited (0 if none).
  std::chrono::duration<double> longest_wait(Clock::time_point now) const;

  // Firsts holding their delivery for a retry in place; kept by the consumer.
  size_t held = 0;

 private:
  struct Line {
    InLine* first = nullptr;
    InLine* last = nullptr;
  };
  std::unordered_map<std::string, Line> lines_;
  size_t waiting_ = 0;
};

}  // namespace er::consume
