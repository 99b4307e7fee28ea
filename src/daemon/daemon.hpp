#pragma once
#include <string>

namespace er::daemon {

struct Options {
  std::string config_path;
  bool check = false;
};

// Runs the daemon (or --check). Returns the process exit code.
int run(const Options& opts);

// `event-router health [--ready]`: asks the running daemon's HTTP endpoint
// (/healthz, or /readyz) and exits 0 on 200. For container health checks.
int health(const Options& opts, bool ready);

}  // namespace er::daemon
