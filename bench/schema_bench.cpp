// Micro-benchmark of the per-event schema cost: SchemaSet::decode_validate()
// with the generic validation (RapidJSON's validator on every parser event,
// as before the plans) and the planned one, next to decode() alone, on the
// bodies the bench kit publishes (~380 bytes, the types bench/run.sh's
// schemas row binds). Variants alternate within each round; the medians of
// the rounds are printed, in thread CPU time.
// Build: make -C build er_schema_bench
// Run:   build/er_schema_bench [N=200000] [ROUNDS=7] [SCHEMAS=config/schemas/events]
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "event/envelope.hpp"
#include "event/schema.hpp"

using er::event::DecodeStatus;
using er::event::Envelope;
using er::event::SchemaSet;
using er::event::Validation;

namespace {

double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// As the kit's preloader (shared/bench/c/preload.c) writes them.
std::vector<std::string> bodies(size_t n) {
  const char* types[] = {"speaker.onboarded", "speaker.updated", "draft.ingested"};
  const char* aggregates[] = {"Speaker", "Speaker", "Draft"};
  std::vector<std::string> out;
  uint64_t x = 88172645463325252ull;
  auto uuid = [&x] {
    char b[40];
    auto r = [&x] { x ^= x >> 12; x ^= x << 25; x ^= x >> 27; return x * 2685821657736338717ull; };
    uint64_t a = r(), c = r();
    std::snprintf(b, sizeof b, "%08x-%04x-4%03x-%04x-%012llx", unsigned(a >> 32), unsigned(a >> 16) & 0xffff,
                  unsigned(a) & 0xfff, 0x8000 | (unsigned(c >> 48) & 0x3fff),
                  static_cast<unsigned long long>(c & 0xffffffffffffull));
    return std::string(b);
  };
  for (size_t i = 0; i < n; ++i) {
    int t = static_cast<int>(i % 3);
    unsigned sp = static_cast<unsigned>(i % 100000);
    char payload[256], body[1024];
    if (t == 0)
      std::snprintf(payload, sizeof payload,
                    R"({"speaker_id":"%u","external_id":"ext-%u","name":"John Doe","bucket":"GOOD"})", sp, sp);
    else if (t == 1)
      std::snprintf(payload, sizeof payload,
                    R"({"speaker_id":"%u","external_id":"ext-%u","name":"John Doe","bucket":"EXCELLENT","changed":["bucket"]})",
                    sp, sp);
    else
      std::snprintf(payload, sizeof payload, R"({"draft_id":"%s","speaker_id":"%u","source":"asr","word_count":%u})",
                    uuid().c_str(), sp, 200 + sp % 800);
    std::snprintf(body, sizeof body,
                  R"({"event_id":"%s","event_type":"%s","aggregate_id":"%s","aggregate_type":"%s",)"
                  R"("timestamp":"2026-12-01T14:%02u:%02u.%06uZ","version":1,"correlation_id":"%s","payload":%s})",
                  uuid().c_str(), types[t], uuid().c_str(), aggregates[t], unsigned(i / 60 % 60), unsigned(i % 60),
                  unsigned(i % 1000000), uuid().c_str(), payload);
    out.emplace_back(body);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const size_t n = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 200000;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 7;
  const std::string dir = argc > 3 ? argv[3] : "config/schemas/events";
  auto generic = SchemaSet::load(dir, Validation::Generic);
  auto planned = SchemaSet::load(dir, Validation::Planned);
  const auto events = bodies(3000);

  Envelope env;
  std::string detail;
  size_t sum = 0;  // keeps the work observable
  auto check = [&](const SchemaSet& set, const char* name) {
    for (const auto& b : events) {
      bool valid = false;
      if (set.decode_validate(b.data(), b.size(), "", env, detail, valid) != DecodeStatus::Ok || !valid) {
        std::fprintf(stderr, "%s: a bench body is refused: %s\n%s\n", name, detail.c_str(), b.c_str());
        std::exit(1);
      }
    }
  };
  check(*generic, "generic");
  check(*planned, "planned");

  struct Variant {
    const char* name;
    std::function<void(const std::string&)> run;
    std::vector<double> us;
  };
  auto dv = [&](const SchemaSet& set) {
    return [&set, &env, &detail, &sum](const std::string& b) {
      bool valid = false;
      set.decode_validate(b.data(), b.size(), "", env, detail, valid);
      sum += valid + env.event_id.size();
    };
  };
  std::vector<Variant> variants = {
      {"decode() alone (the parse)", [&](const std::string& b) {
         er::event::decode(b.data(), b.size(), "", env, detail);
         sum += env.event_id.size();
       }, {}},
      {"decode_validate, generic (before)", dv(*generic), {}},
      {"decode_validate, planned (after)", dv(*planned), {}},
  };
  for (int r = 0; r < rounds; ++r) {
    for (auto& v : variants) {
      double t0 = thread_seconds();
      for (size_t i = 0; i < n; ++i) v.run(events[i % events.size()]);
      v.us.push_back((thread_seconds() - t0) * 1e6 / n);
    }
  }
  size_t bytes = 0;
  for (const auto& b : events) bytes += b.size();
  std::printf("%zu events x %d rounds, bodies of %zu bytes on average, schemas %s\n", n, rounds,
              bytes / events.size(), dir.c_str());
  std::printf("%-36s %12s %10s %10s\n", "", "median us/ev", "min", "max");
  double med[3];
  for (size_t i = 0; i < variants.size(); ++i) {
    auto us = variants[i].us;
    std::sort(us.begin(), us.end());
    med[i] = us[us.size() / 2];
    std::printf("%-36s %12.3f %10.3f %10.3f\n", variants[i].name, med[i], us.front(), us.back());
  }
  std::printf("validation on top of the parse: generic %.3f us, planned %.3f us (%.1fx less)\n", med[1] - med[0],
              med[2] - med[0], (med[1] - med[0]) / (med[2] - med[0]));
  return sum == 42 ? 2 : 0;
}
