#pragma once
// Option parsing shared by the operator commands (dlq, publish).
#include <csignal>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>

namespace er::util {

// A wrong command line: the commands print it with their usage and exit 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The option at argv[i]: "--name=value", or "--name value" / "-n value".
class Option {
 public:
  Option(int argc, char** argv, int& i) : argc_(argc), argv_(argv), i_(i), name_(argv[i]) {
    if (name_.rfind("--", 0) == 0) {
      if (auto eq = name_.find('='); eq != std::string::npos) {
        value_ = name_.substr(eq + 1);
        name_.resize(eq);
        inline_ = true;
      }
    }
  }
  const std::string& name() const { return name_; }
  bool is(const char* short_name, const char* long_name) const { return name_ == short_name || name_ == long_name; }
  // Its value; takes the next argument unless it was given inline.
  std::string value() {
    if (inline_) return value_;
    if (i_ + 1 >= argc_) throw UsageError(name_ + " needs a value");
    return argv_[++i_];
  }

 private:
  int argc_;
  char** argv_;
  int& i_;
  std::string name_;
  std::string value_;
  bool inline_ = false;
};

// The shape of every operator command: parse (usage errors exit 2, --help
// prints the usage), then run (any error is one line on stderr, exit 1).
// `parse` returns std::optional<Args> (nullopt = --help); `run` takes the Args.
// `usage_status`: the exit status of a usage error (plan keeps 2 for "differs").
template <class Parse, class Run>
int run_command(const char* prog, const char* usage, int argc, char** argv, Parse parse, Run run,
                int usage_status = 2) {
  decltype(parse(argc, argv)) args;
  try {
    args = parse(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << prog << ": " << e.what() << "\n" << usage;
    return usage_status;
  }
  if (!args) {
    std::cout << usage;
    return 0;
  }
  std::signal(SIGPIPE, SIG_IGN);
  try {
    return run(*args);
  } catch (const std::exception& e) {
    // ConfigError is "file:line:column: message"; AMQP errors mask the password.
    std::cerr << prog << ": " << e.what() << "\n";
    return 1;
  }
}

}  // namespace er::util
