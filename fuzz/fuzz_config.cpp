// libFuzzer target for er::config::load_config_string(). ConfigError is the
// expected outcome for bad input; any other exception escaping is a bug and
// ends the run (std::terminate -> abort -> reported crash).
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>

#include <rapidjson/document.h>

#include "config/config.hpp"

namespace {

#define CHECK(cond) \
  do {              \
    if (!(cond)) __builtin_trap(); \
  } while (0)

std::string g_plugin_dir;

void cleanup() {
  if (g_plugin_dir.empty()) return;
  ::unlink((g_plugin_dir + "/liblog_plugin.so").c_str());
  ::rmdir(g_plugin_dir.c_str());
}

// "fuzz.yaml:<line>:<column>: ..." with line, column >= 1.
bool well_formed(const char* what) {
  const char* prefix = "fuzz.yaml:";
  if (std::strncmp(what, prefix, std::strlen(prefix)) != 0) return false;
  const char* p = what + std::strlen(prefix);
  for (int i = 0; i < 2; ++i) {
    char* end = nullptr;
    long n = std::strtol(p, &end, 10);
    if (end == p || n < 1 || *end != ':') return false;
    p = end + 1;
  }
  return *p == ' ';
}

void check_config(const er::config::Config& c) {
  CHECK(!c.queues.empty() && c.plugin_threads >= 1);
  CHECK(!c.broker.url.empty() && !c.exchange.name.empty());
  std::set<std::string> queues, handlers;
  for (const auto& q : c.queues) {
    CHECK(!q.name.empty() && queues.insert(q.name).second);
    CHECK(q.prefetch >= 1 && !q.dead_letter_queue.empty() && q.dead_letter_queue != q.name);
    for (const auto& h : q.handlers) {
      CHECK(!h.name.empty() && handlers.insert(h.name).second);
      CHECK(!h.events.empty() && h.concurrency >= 1 && h.concurrency <= 65535);
      if (h.kind == er::config::HandlerKind::Plugin) {
        CHECK(!h.plugin_path.empty() && h.plugin_path[0] == '/');
        rapidjson::Document d;
        d.Parse(h.plugin_config_json.c_str(), h.plugin_config_json.size());
        CHECK(!d.HasParseError());
      } else {
        CHECK(!h.argv.empty() && !h.argv[0].empty() && h.argv[0][0] == '/');
        CHECK(h.timeout.count() > 0 && h.kill_grace.count() >= 0);
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // ${FUZZ_VAR} resolves; ${FUZZ_UNSET} must be reported as ConfigError.
  setenv("FUZZ_VAR", "x", 1);
  setenv("FUZZ_EMPTY", "", 1);
  unsetenv("FUZZ_UNSET");
  // A plugin dir holding liblog_plugin.so, so router.yaml-shaped inputs get
  // past plugin resolution and into `config:` -> JSON.
  const char* tmp = std::getenv("TMPDIR");
  std::string tmpl = std::string(tmp && *tmp ? tmp : "/tmp") + "/er-fuzz-plugins.XXXXXX";
  if (char* d = ::mkdtemp(tmpl.data())) {
    g_plugin_dir = d;
    if (FILE* f = std::fopen((g_plugin_dir + "/liblog_plugin.so").c_str(), "w")) std::fclose(f);
    setenv("EVENT_ROUTER_PLUGIN_DIR", d, 1);
    std::atexit(cleanup);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  try {
    er::config::Config c = er::config::load_config_string(text, "fuzz.yaml", "/nonexistent-dir");
    check_config(c);
  } catch (const er::config::ConfigError& e) {
    CHECK(well_formed(e.what()));
  }
  return 0;
}
