// The per-aggregate lines: who may run, who waits, in which order, and what a
// hand-back takes out.
#include <catch2/catch.hpp>

#include <deque>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "consume/ordering.hpp"

using namespace er::consume;
using Clock = std::chrono::steady_clock;

namespace {
struct Ev : InLine {
  std::string agg;
  int seq = 0;
  int channel = 0;
};
}  // namespace

TEST_CASE("ordering: the first event of an aggregate runs, the next ones wait in join order", "[ordering]") {
  AggregateLines lines;
  const auto t0 = Clock::now();
  Ev a1, a2, a3, b1;
  CHECK(lines.join(a1, "A", t0));
  CHECK(lines.join(b1, "B", t0));  // another aggregate: runs beside A
  CHECK_FALSE(lines.join(a2, "A", t0));
  CHECK_FALSE(lines.join(a3, "A", t0 + std::chrono::seconds(1)));
  CHECK(lines.waiting() == 2);
  CHECK(lines.lines() == 2);
  CHECK(lines.longest_wait(t0 + std::chrono::seconds(3)).count() == Approx(3.0));

  CHECK(lines.leave(a1) == &a2);
  CHECK(lines.waiting() == 1);
  CHECK(lines.longest_wait(t0 + std::chrono::seconds(3)).count() == Approx(2.0));
  CHECK(lines.leave(b1) == nullptr);
  CHECK(lines.leave(a2) == &a3);
  CHECK(lines.leave(a3) == nullptr);
  CHECK(lines.waiting() == 0);
  CHECK(lines.lines() == 0);
  CHECK(lines.longest_wait(t0).count() == 0.0);
  CHECK_FALSE(a1.in_line());
  // An aggregate whose line emptied starts a new one.
  CHECK(lines.join(a1, "A", t0));
  CHECK(lines.leave(a1) == nullptr);
}

TEST_CASE("ordering: take_waiting takes only matching events behind a first, and the line stays linked",
          "[ordering]") {
  AggregateLines lines;
  const auto t = Clock::now();
  Ev e[6];
  for (int i = 0; i < 6; ++i) {
    e[i].seq = i;
    e[i].channel = i % 2;  // 0, 2, 4 on channel 0; 1, 3, 5 on channel 1
    CHECK(lines.join(e[i], "A", t) == (i == 0));
  }
  auto out = lines.take_waiting([](const InLine& x) { return static_cast<const Ev&>(x).channel == 1; });
  REQUIRE(out.size() == 3);
  CHECK(static_cast<Ev*>(out[0])->seq == 1);
  CHECK(static_cast<Ev*>(out[2])->seq == 5);  // the last one too: the line's end moves back
  CHECK(lines.waiting() == 2);
  // The first is never taken, even when it matches.
  CHECK(lines.take_waiting([](const InLine& x) { return static_cast<const Ev&>(x).seq == 0; }).empty());
  Ev late;
  late.seq = 6;
  CHECK_FALSE(lines.join(late, "A", t));  // joins behind e[4], not behind the taken e[5]
  CHECK(lines.leave(e[0]) == &e[2]);
  CHECK(lines.leave(e[2]) == &e[4]);
  CHECK(lines.leave(e[4]) == &late);
  CHECK(lines.leave(late) == nullptr);
  CHECK(lines.lines() == 0);
}

TEST_CASE("ordering: an event behind the first may leave without moving the line", "[ordering]") {
  AggregateLines lines;
  const auto t = Clock::now();
  Ev a, b, c;
  lines.join(a, "A", t);
  lines.join(b, "A", t);
  lines.join(c, "A", t);
  CHECK(lines.leave(b) == nullptr);  // a keeps running
  CHECK(lines.waiting() == 1);
  CHECK(lines.leave(a) == &c);
  CHECK(lines.leave(c) == nullptr);
  CHECK(lines.lines() == 0);
}

// Many aggregates, random completion: at any time at most one event per
// aggregate runs, and each aggregate's events run in join order.
TEST_CASE("ordering: random interleaving keeps one runner per aggregate, in join order", "[ordering]") {
  std::mt19937 rng(12345);
  AggregateLines lines;
  const auto t = Clock::now();
  std::deque<Ev> evs;  // stable addresses
  std::vector<Ev*> running;
  std::map<std::string, int> next_seq, runs;
  size_t max_parallel = 0;
  auto start = [&](Ev* e) {
    for (auto* r : running) REQUIRE(r->agg != e->agg);
    CHECK(e->seq == next_seq[e->agg]++);
    running.push_back(e);
    max_parallel = std::max(max_parallel, running.size());
  };
  std::map<std::string, int> joined;
  for (int step = 0; step < 20000; ++step) {
    if (running.empty() || rng() % 2 == 0) {
      Ev& e = evs.emplace_back();
      e.agg = "agg-" + std::to_string(rng() % 20);
      e.seq = joined[e.agg]++;
      if (lines.join(e, e.agg, t)) start(&e);
    } else {
      size_t i = rng() % running.size();
      Ev* done = running[i];
      running.erase(running.begin() + static_cast<long>(i));
      ++runs[done->agg];
      if (auto* next = lines.leave(*done)) start(static_cast<Ev*>(next));
    }
  }
  while (!running.empty()) {
    Ev* done = running.back();
    running.pop_back();
    ++runs[done->agg];
    if (auto* next = lines.leave(*done)) start(static_cast<Ev*>(next));
  }
  CHECK(lines.waiting() == 0);
  CHECK(lines.lines() == 0);
  CHECK(runs == joined);   // every event ran exactly once
  CHECK(max_parallel > 1); // aggregates ran side by side
}

TEST_CASE("ordering: a copy of the first joins directly behind it, ahead of later events", "[ordering]") {
  AggregateLines lines;
  const auto t = Clock::now();
  Ev first, later, copy;
  CHECK(lines.join(first, "A", t));
  CHECK_FALSE(lines.join(later, "A", t));
  lines.join_behind(copy, first, t);
  CHECK(lines.waiting() == 2);
  CHECK(lines.leave(first) == &copy);
  CHECK(lines.leave(copy) == &later);
  CHECK(lines.leave(later) == nullptr);
  // Behind a first that is alone: it becomes the line's end.
  Ev solo, twin, after;
  CHECK(lines.join(solo, "B", t));
  lines.join_behind(twin, solo, t);
  CHECK_FALSE(lines.join(after, "B", t));
  CHECK(lines.leave(solo) == &twin);
  CHECK(lines.leave(twin) == &after);
  CHECK(lines.leave(after) == nullptr);
  CHECK(lines.lines() == 0);
}
