#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include "daemon/daemon.hpp"
#include "dlq/dlq.hpp"
#include "plan/plan.hpp"
#include "publish/publish.hpp"

namespace {
const char* kUsage =
    "usage: event-router [--config FILE] [--check] [--version] [--help]\n"
    "       event-router dlq list|replay --queue Q [options]   (see: event-router dlq --help)\n"
    "       event-router health [--ready] [--config FILE]      ask the daemon's HTTP endpoint\n"
    "       event-router publish [--routing-key K] [--file F]  publish events (see: event-router publish --help)\n"
    "       event-router plan [--config FILE] [--management URL]  compare the config with the broker\n"
    "\n"
    "Consumes events from RabbitMQ and dispatches them to plugin and exec handlers.\n"
    "\n"
    "  -c, --config FILE  routing table (default: $EVENT_ROUTER_CONFIG, else\n"
    "                     /etc/event-router/router.yaml)\n"
    "  -t, --check        validate the config, load plugins, check executables,\n"
    "                     print the topology and routing plan, and exit 0 or 1\n"
    "  -V, --version      print the version and exit\n"
    "  -h, --help         print this help and exit\n";
}

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "dlq") == 0) return er::dlq::main(argc - 1, argv + 1);
  if (argc > 1 && std::strcmp(argv[1], "publish") == 0) return er::publish::main(argc - 1, argv + 1);
  if (argc > 1 && std::strcmp(argv[1], "plan") == 0) return er::plan::main(argc - 1, argv + 1);
  er::daemon::Options opts;
  const char* env = std::getenv("EVENT_ROUTER_CONFIG");
  opts.config_path = env && *env ? env : "/etc/event-router/router.yaml";
  bool health = false, ready = false;
  int first = 1;
  if (argc > 1 && std::strcmp(argv[1], "health") == 0) {
    health = true;
    first = 2;
  }
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    if (health && a == "--ready") {
      ready = true;
    } else if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "-V" || a == "--version") {
      std::cout << "event-router " << ER_VERSION << "\n";
      return 0;
    } else if (a == "-t" || a == "--check") {
      opts.check = true;
    } else if ((a == "-c" || a == "--config") && i + 1 < argc) {
      opts.config_path = argv[++i];
    } else if (a.rfind("--config=", 0) == 0) {
      opts.config_path = a.substr(9);
    } else {
      std::cerr << "event-router: unknown argument '" << a << "'\n" << kUsage;
      return 2;
    }
  }
  // A handler that exits before reading its stdin must not kill the daemon.
  std::signal(SIGPIPE, SIG_IGN);
  if (health) return er::daemon::health(opts, ready);
  return er::daemon::run(opts);
}
