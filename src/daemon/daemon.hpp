#pragma once
#include <string>

namespace er::daemon {

struct Options {
  std::string config_path;
  bool check = false;
};

// Runs the daemon (or --check). Returns the process exit code.
int run(const Options& opts);

}  // namespace er::daemon
