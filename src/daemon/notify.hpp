#pragma once
// systemd's sd_notify datagram protocol, spoken directly (no libsystemd):
// one datagram per state change to $NOTIFY_SOCKET.
#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace er::daemon {

class Notifier {
 public:
  // Reads NOTIFY_SOCKET ("/path" or "@abstract"), WATCHDOG_USEC, WATCHDOG_PID.
  Notifier();
  ~Notifier();
  Notifier(const Notifier&) = delete;
  Notifier& operator=(const Notifier&) = delete;

  bool enabled() const { return fd_ >= 0; }
  // Sends e.g. "READY=1\nSTATUS=..." ; never blocks, errors are ignored
  // (systemd not listening must not stop the daemon).
  void send(std::string_view state) const;
  // Half of WATCHDOG_USEC when the watchdog is on for this process.
  std::optional<std::chrono::microseconds> watchdog_period() const { return watchdog_; }

 private:
  int fd_ = -1;
  std::string addr_;
  std::optional<std::chrono::microseconds> watchdog_;
};

}  // namespace er::daemon
