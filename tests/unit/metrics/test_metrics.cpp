#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>

#include "metrics/metrics.hpp"

using namespace er::metrics;

TEST_CASE("metrics: counter family renders HELP, TYPE and _total samples in registration order", "[metrics]") {
  Registry r;
  auto& fam = r.counter("er_events", "Events handled.", {"queue", "handler", "outcome"});
  Counter& ack = fam.with({"speaker.events", "speaker-log", "ack"});
  Counter& nack = fam.with({"speaker.events", "speaker-log", "nack"});
  ack.inc();
  ack.inc(2);
  REQUIRE(&fam.with({"speaker.events", "speaker-log", "ack"}) == &ack);  // same child, not a new one
  REQUIRE(nack.value() == 0);
  REQUIRE(r.render() ==
          "# HELP er_events_total Events handled.\n"
          "# TYPE er_events_total counter\n"
          "er_events_total{queue=\"speaker.events\",handler=\"speaker-log\",outcome=\"ack\"} 3\n"
          "er_events_total{queue=\"speaker.events\",handler=\"speaker-log\",outcome=\"nack\"} 0\n");
}

TEST_CASE("metrics: gauge set/inc/dec and number formatting", "[metrics]") {
  Registry r;
  auto& fam = r.gauge("er_inflight", "Events in flight.");
  Gauge& g = fam.with();
  g.set(5);
  g.inc();
  g.dec(2.5);
  REQUIRE(g.value() == 3.5);
  auto& special = r.gauge("er_special", "Odd values.", {"kind"});
  special.with({"nan"}).set(std::numeric_limits<double>::quiet_NaN());
  special.with({"inf"}).set(std::numeric_limits<double>::infinity());
  special.with({"ninf"}).set(-std::numeric_limits<double>::infinity());
  special.with({"big"}).set(static_cast<double>(int64_t{1} << 40));
  special.with({"small"}).set(1e-5);
  special.with({"neg"}).set(-2);
  REQUIRE(r.render() ==
          "# HELP er_inflight Events in flight.\n"
          "# TYPE er_inflight gauge\n"
          "er_inflight 3.5\n"
          "# HELP er_special Odd values.\n"
          "# TYPE er_special gauge\n"
          "er_special{kind=\"nan\"} NaN\n"
          "er_special{kind=\"inf\"} +Inf\n"
          "er_special{kind=\"ninf\"} -Inf\n"
          "er_special{kind=\"big\"} 1099511627776\n"
          "er_special{kind=\"small\"} 1e-05\n"
          "er_special{kind=\"neg\"} -2\n");
}

TEST_CASE("metrics: histogram buckets are cumulative, with +Inf, _sum and _count", "[metrics]") {
  Registry r;
  auto& fam = r.histogram("er_handler_seconds", "Handler run time.", {"handler"}, {0.125, 1});
  Histogram& h = fam.with({"log"});
  h.observe(0.0625);
  h.observe(0.125);  // "le" is inclusive
  h.observe(0.5);
  h.observe(4);
  REQUIRE(h.count() == 4);
  REQUIRE(r.render() ==
          "# HELP er_handler_seconds Handler run time.\n"
          "# TYPE er_handler_seconds histogram\n"
          "er_handler_seconds_bucket{handler=\"log\",le=\"0.125\"} 2\n"
          "er_handler_seconds_bucket{handler=\"log\",le=\"1\"} 3\n"
          "er_handler_seconds_bucket{handler=\"log\",le=\"+Inf\"} 4\n"
          "er_handler_seconds_sum{handler=\"log\"} 4.6875\n"
          "er_handler_seconds_count{handler=\"log\"} 4\n");
}

TEST_CASE("metrics: unlabelled histogram with default buckets", "[metrics]") {
  Registry r;
  Histogram& h = r.histogram("er_latency_seconds", "Latency.").with();
  REQUIRE(h.bounds() == default_buckets());
  double sum = 0;
  for (double v : {0.0005, 0.003, 0.003, 0.2, 7.0, 100.0}) {
    h.observe(v);
    sum += v;
  }
  std::string sum_line = "er_latency_seconds_sum ";
  append_double(sum_line, sum);
  std::string out = r.render();
  CHECK(out.find("er_latency_seconds_bucket{le=\"0.001\"} 1\n") != std::string::npos);
  CHECK(out.find("er_latency_seconds_bucket{le=\"0.005\"} 3\n") != std::string::npos);
  CHECK(out.find("er_latency_seconds_bucket{le=\"0.1\"} 3\n") != std::string::npos);
  CHECK(out.find("er_latency_seconds_bucket{le=\"0.25\"} 4\n") != std::string::npos);
  CHECK(out.find("er_latency_seconds_bucket{le=\"5\"} 4\n") != std::string::npos);
  CHECK(out.find("er_latency_seconds_bucket{le=\"10\"} 5\n") != std::string::npos);
  CHECK(out.find("er_latency_seconds_bucket{le=\"60\"} 5\n") != std::string::npos);
  CHECK(out.find("er_latency_seconds_bucket{le=\"+Inf\"} 6\n") != std::string::npos);
  CHECK(out.find("er_latency_seconds_count 6\n") != std::string::npos);
  CHECK(out.find(sum_line + "\n") != std::string::npos);
  CHECK(std::abs(h.sum() - 107.2065) < 1e-9);
}

TEST_CASE("metrics: label values and HELP are escaped", "[metrics]") {
  Registry r;
  r.counter("er_x_total", "Back\\slash and\nnewline \"quoted\".", {"v"}).with({"a\\b\"c\nd"}).inc();
  REQUIRE(r.render() ==
          "# HELP er_x_total Back\\\\slash and\\nnewline \"quoted\".\n"
          "# TYPE er_x_total counter\n"
          "er_x_total{v=\"a\\\\b\\\"c\\nd\"} 1\n");
}

TEST_CASE("metrics: collectors run before rendering", "[metrics]") {
  Registry r;
  Gauge& g = r.gauge("er_queue_depth", "Depth.").with();
  int calls = 0;
  r.add_collector([&] { g.set(++calls * 10); });
  REQUIRE(r.render().find("er_queue_depth 10\n") != std::string::npos);
  REQUIRE(r.render().find("er_queue_depth 20\n") != std::string::npos);
}

TEST_CASE("metrics: a family without children renders only its HELP and TYPE", "[metrics]") {
  Registry r;
  r.counter("er_none", "Nothing yet.", {"a"});
  REQUIRE(r.render() == "# HELP er_none_total Nothing yet.\n# TYPE er_none_total counter\n");
}

TEST_CASE("metrics: re-registration, bad names and label arity", "[metrics]") {
  Registry r;
  auto& a = r.counter("er_a", "A.", {"x"});
  REQUIRE(&r.counter("er_a_total", "A.", {"x"}) == &a);  // idempotent, for reload code
  REQUIRE_THROWS_AS(r.counter("er_a", "A.", {"y"}), std::invalid_argument);
  REQUIRE_THROWS_AS(r.gauge("er_a_total", "A."), std::invalid_argument);
  REQUIRE_THROWS_AS(r.gauge("1bad", "x"), std::invalid_argument);
  REQUIRE_THROWS_AS(r.gauge("bad-name", "x"), std::invalid_argument);
  REQUIRE_THROWS_AS(r.gauge("g", "x", {"__reserved"}), std::invalid_argument);
  REQUIRE_THROWS_AS(r.gauge("g", "x", {"a", "a"}), std::invalid_argument);
  REQUIRE_THROWS_AS(r.histogram("h", "x", {"le"}), std::invalid_argument);
  REQUIRE_THROWS_AS(r.histogram("h", "x", {}, {1, 1}), std::invalid_argument);
  REQUIRE_NOTHROW(r.histogram("h2", "x", {}, {1, std::numeric_limits<double>::infinity()}));  // +Inf is dropped
  REQUIRE(r.histogram("h2", "x", {}, {1}).bounds().size() == 1);
  REQUIRE_THROWS_AS(a.with({}), std::invalid_argument);
  REQUIRE_THROWS_AS(a.with({"1", "2"}), std::invalid_argument);
}

TEST_CASE("metrics: child references stay valid as more children are added", "[metrics]") {
  Registry r;
  auto& fam = r.counter("er_many", "Many.", {"i"});
  Counter& first = fam.with({"0"});
  for (int i = 1; i < 2000; ++i) fam.with({std::to_string(i)}).inc();
  first.inc(7);
  REQUIRE(fam.with({"0"}).value() == 7);
  REQUIRE(&fam.with({"0"}) == &first);
}

TEST_CASE("metrics: counters and histograms may be updated from another thread", "[metrics]") {
  Registry r;
  Counter& c = r.counter("er_c", "C.").with();
  Histogram& h = r.histogram("er_h", "H.").with();
  auto work = [&] {
    for (int i = 0; i < 100000; ++i) {
      c.inc();
      h.observe(0.5);
    }
  };
  std::thread t(work);
  work();
  t.join();
  REQUIRE(c.value() == 200000);
  REQUIRE(h.count() == 200000);
  REQUIRE(h.sum() == 100000.0);
}
