#include "consume/ordering.hpp"

#include <algorithm>

namespace er::consume {

bool AggregateLines::join(InLine& e, std::string_view aggregate_id, Clock::time_point now) {
  auto [it, fresh] = lines_.try_emplace(std::string(aggregate_id));
  Line& line = it->second;
  e.lines = this;
  e.key = &it->first;  // node-based map: stable until the line is erased
  e.next_in_line = nullptr;
  e.joined = now;
  if (fresh) {
    line.first = line.last = &e;
    return true;
  }
  line.last->next_in_line = &e;
  line.last = &e;
  ++waiting_;
  return false;
}

void AggregateLines::join_behind(InLine& e, InLine& first, Clock::time_point now) {
  auto it = lines_.find(*first.key);
  e.lines = this;
  e.key = first.key;
  e.joined = now;
  e.next_in_line = first.next_in_line;
  first.next_in_line = &e;
  if (it != lines_.end() && it->second.last == &first) it->second.last = &e;
  ++waiting_;
}

InLine* AggregateLines::leave(InLine& e) {
  auto it = lines_.find(*e.key);
  InLine* next = e.next_in_line;
  e.lines = nullptr;
  e.key = nullptr;
  e.next_in_line = nullptr;
  if (it == lines_.end()) return nullptr;
  Line& line = it->second;
  if (line.first != &e) {
    // Not a first (it never ran): unlink it; the first keeps running.
    for (InLine* p = line.first; p; p = p->next_in_line) {
      if (p->next_in_line != &e) continue;
      p->next_in_line = next;
      if (line.last == &e) line.last = p;
      --waiting_;
      break;
    }
    return nullptr;
  }
  if (!next) {
    lines_.erase(it);
    return nullptr;
  }
  line.first = next;
  --waiting_;
  return next;
}

std::vector<InLine*> AggregateLines::take_waiting(const std::function<bool(const InLine&)>& pred) {
  std::vector<InLine*> out;
  if (waiting_ == 0) return out;
  for (auto& [key, line] : lines_) {
    InLine* prev = line.first;
    for (InLine* e = prev->next_in_line; e;) {
      InLine* after = e->next_in_line;
      if (pred(*e)) {
        prev->next_in_line = after;
        if (line.last == e) line.last = prev;
        e->lines = nullptr;
        e->key = nullptr;
        e->next_in_line = nullptr;
        --waiting_;
        out.push_back(e);
      } else {
        prev = e;
      }
      e = after;
    }
  }
  return out;
}

std::chrono::duration<double> AggregateLines::longest_wait(Clock::time_point now) const {
  // The second of a line joined it before everyone behind it.
  Clock::time_point oldest = now;
  for (const auto& [key, line] : lines_)
    if (line.first->next_in_line) oldest = std::min(oldest, line.first->next_in_line->joined);
  return now - oldest;
}

}  // namespace er::consume
