// Ack coalescing: a multiple ack covers only settled tags, every tag is
// acked exactly once, and out-of-order completion still saves frames.
#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "consume/ack_tracker.hpp"

using er::consume::AckTracker;

namespace {
// The broker's view of one channel: what is unacked, and what each frame
// does to it. An ack of a tag that is not unacked is a channel error
// (PRECONDITION_FAILED) in RabbitMQ: it fails the test here.
struct Broker {
  std::set<uint64_t> unacked;
  std::set<uint64_t> settled;  // the consumer's side: may be acked
  size_t frames = 0;

  void send(AckTracker::Ack a) {
    ++frames;
    INFO("ack tag " << a.tag << " multiple " << a.multiple);
    REQUIRE(unacked.count(a.tag) == 1);
    auto end = a.multiple ? unacked.upper_bound(a.tag) : std::next(unacked.find(a.tag));
    auto begin = a.multiple ? unacked.begin() : unacked.find(a.tag);
    for (auto it = begin; it != end; ++it) {
      INFO("tag " << *it << " acked");
      REQUIRE(settled.count(*it) == 1);  // never an event that is not settled
    }
    unacked.erase(begin, end);
  }
  void nack(uint64_t tag) { REQUIRE(unacked.erase(tag) == 1); }
};

std::vector<AckTracker::Ack> flush(AckTracker& t, bool all = false) {
  std::vector<AckTracker::Ack> out;
  t.flush(all, [&](AckTracker::Ack a) { out.push_back(a); });
  return out;
}
}  // namespace

TEST_CASE("ack tracker: in-order completion is one multiple ack", "[ack]") {
  AckTracker t;
  for (uint64_t tag = 1; tag <= 10; ++tag) t.delivered(tag);
  for (uint64_t tag = 1; tag <= 10; ++tag) REQUIRE(t.settled(tag));
  CHECK(t.ready() == 10);
  auto acks = flush(t);
  REQUIRE(acks.size() == 1);
  CHECK(acks[0].tag == 10);
  CHECK(acks[0].multiple);
  CHECK(t.outstanding() == 0);
  CHECK(t.pending() == 0);
  CHECK(flush(t, true).empty());
}

TEST_CASE("ack tracker: a single settled tag is acked alone", "[ack]") {
  AckTracker t;
  t.delivered(7);
  t.delivered(8);
  REQUIRE(t.settled(7));
  auto acks = flush(t);
  REQUIRE(acks.size() == 1);
  CHECK(acks[0].tag == 7);
  CHECK_FALSE(acks[0].multiple);
  CHECK(t.outstanding() == 1);
}

TEST_CASE("ack tracker: a running tag blocks coalescing past it", "[ack]") {
  AckTracker t;
  for (uint64_t tag = 1; tag <= 4; ++tag) t.delivered(tag);
  REQUIRE(t.settled(2));
  REQUIRE(t.settled(3));
  CHECK(t.ready() == 0);
  CHECK(t.pending() == 2);
  CHECK(flush(t).empty());  // 1 still runs: a multiple ack of 3 would ack it
  SECTION("the head settles: one frame for all three") {
    REQUIRE(t.settled(1));
    auto acks = flush(t);
    REQUIRE(acks.size() == 1);
    CHECK(acks[0].tag == 3);
    CHECK(acks[0].multiple);
    CHECK(t.outstanding() == 1);  // 4
  }
  SECTION("the window passes first: each waiting tag alone, then the head alone") {
    auto acks = flush(t, true);
    REQUIRE(acks.size() == 2);
    CHECK((acks[0].tag == 2 && !acks[0].multiple));
    CHECK((acks[1].tag == 3 && !acks[1].multiple));
    CHECK(t.pending() == 0);
    REQUIRE(t.settled(1));
    acks = flush(t);
    REQUIRE(acks.size() == 1);
    CHECK(acks[0].tag == 1);
    CHECK_FALSE(acks[0].multiple);  // 2 and 3 are gone: alone, but multiple would do no harm
    REQUIRE(t.settled(4));
    acks = flush(t);
    REQUIRE(acks.size() == 1);
    CHECK(acks[0].tag == 4);
    CHECK(t.outstanding() == 0);
  }
}

TEST_CASE("ack tracker: a handed-back tag no longer blocks", "[ack]") {
  AckTracker t;
  Broker b;
  for (uint64_t tag = 1; tag <= 5; ++tag) {
    t.delivered(tag);
    b.unacked.insert(tag);
  }
  for (uint64_t tag : {1, 2, 4, 5}) {
    REQUIRE(t.settled(tag));
    b.settled.insert(tag);
  }
  CHECK(t.ready() == 2);
  t.forget(3);  // nacked: the broker has it back
  b.nack(3);
  CHECK(t.ready() == 4);
  auto acks = flush(t);
  REQUIRE(acks.size() == 1);
  CHECK(acks[0].tag == 5);
  CHECK(acks[0].multiple);
  for (auto a : acks) b.send(a);
  CHECK(b.unacked.empty());
  CHECK(t.outstanding() == 0);
}

TEST_CASE("ack tracker: unknown and repeated tags", "[ack]") {
  AckTracker t;
  CHECK_FALSE(t.settled(1));  // the caller acks it alone
  t.delivered(1);
  REQUIRE(t.settled(1));
  CHECK_FALSE(t.settled(1));
  t.forget(1);  // settled, then handed back instead: not acked
  CHECK(t.pending() == 0);
  CHECK(flush(t, true).empty());
  CHECK(t.outstanding() == 0);
  t.delivered(3);
  t.delivered(2);  // out of order: kept in order, never covered by a multiple ack of 3
  REQUIRE(t.settled(3));
  CHECK(flush(t).empty());
  REQUIRE(t.settled(2));
  auto acks = flush(t);
  REQUIRE(acks.size() == 1);
  CHECK(acks[0].tag == 3);
  CHECK(acks[0].multiple);
}

// A consumer with `window` deliveries out at once that complete in random
// order; after each completion the loop may flush (end of its turn), and
// now and then the ack window passes (flush all). Nothing is acked before
// it settled, everything is acked exactly once, and far fewer frames go out
// than there were deliveries.
TEST_CASE("ack tracker: out-of-order completion", "[ack]") {
  const unsigned seed = GENERATE(1u, 2u, 3u, 4u, 5u);
  const size_t window = GENERATE(size_t{10}, size_t{100});
  std::mt19937 rng(seed);
  AckTracker t;
  Broker b;
  const uint64_t total = 20000;
  uint64_t next = 1;
  std::vector<uint64_t> running;
  size_t handed_back = 0;
  while (next <= total || !running.empty()) {
    // The broker keeps `window` unacked deliveries out.
    while (next <= total && b.unacked.size() < window) {
      t.delivered(next);
      b.unacked.insert(next);
      running.push_back(next++);
    }
    // A few complete, in any order (mostly the oldest, as with real handlers).
    std::uniform_int_distribution<size_t> how_many(1, std::max<size_t>(1, running.size() / 2));
    for (size_t k = how_many(rng); k > 0 && !running.empty(); --k) {
      std::uniform_int_distribution<size_t> pick(0, std::min<size_t>(running.size() - 1, 3));
      size_t i = pick(rng);
      uint64_t tag = running[i];
      running.erase(running.begin() + static_cast<std::ptrdiff_t>(i));
      if (rng() % 50 == 0) {  // handed back (nack) instead of acked
        t.forget(tag);
        b.nack(tag);
        ++handed_back;
        continue;
      }
      b.settled.insert(tag);
      REQUIRE(t.settled(tag));
    }
    for (auto a : flush(t, rng() % 8 == 0)) b.send(a);
  }
  for (auto a : flush(t, true)) b.send(a);
  CHECK(b.unacked.empty());
  CHECK(t.outstanding() == 0);
  CHECK(t.pending() == 0);
  CHECK(handed_back > 0);
  INFO("frames " << b.frames << " for " << total << " deliveries, window " << window);
  CHECK(b.frames < (total - handed_back) / 2);
}
