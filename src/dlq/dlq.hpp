#pragma once
// `event-router dlq list|replay`: operator commands for the dead-letter
// queues. Blocking rabbitmq-c calls on a connection of their own (a CLI, not
// the daemon loop).
#include <cstddef>
#include <string>
#include <string_view>

namespace er::dlq {

// argv[0] is "dlq". Returns the exit code: 0 ok, 1 failure, 2 usage error.
int main(int argc, char** argv);

// Headers that record a failure and are removed on replay: x-death-*,
// x-attempts, x-attempt, x-first-failed-at, x-last-failed-at, x-last-error,
// x-original-*, and the broker's own x-death / x-first-death-* / x-last-death-*.
bool is_failure_header(std::string_view key);

// One line of at most `max` bytes: control characters become spaces, a cut
// never splits a UTF-8 sequence, and "..." marks a cut.
std::string one_line(std::string_view text, size_t max);
// `text` with control bytes shown as \xNN, cut to about `max` bytes.
std::string printable(std::string_view text, size_t max);

}  // namespace er::dlq
