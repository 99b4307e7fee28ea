#include "daemon/notify.hpp"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace er::daemon {

Notifier::Notifier() {
  const char* sock = std::getenv("NOTIFY_SOCKET");
  if (sock && (sock[0] == '/' || sock[0] == '@') && std::strlen(sock) < sizeof(sockaddr_un::sun_path)) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    addr_ = sock;
  }
  const char* usec = std::getenv("WATCHDOG_USEC");
  const char* pid = std::getenv("WATCHDOG_PID");
  if (usec && (!pid || std::strtol(pid, nullptr, 10) == ::getpid())) {
    long long us = std::strtoll(usec, nullptr, 10);
    if (us > 0) watchdog_ = std::chrono::microseconds(us / 2);
  }
  // Children (exec handlers) must not talk to systemd in our name.
  ::unsetenv("NOTIFY_SOCKET");
  ::unsetenv("WATCHDOG_USEC");
  ::unsetenv("WATCHDOG_PID");
}

Notifier::~Notifier() {
  if (fd_ >= 0) ::close(fd_);
}

void Notifier::send(std::string_view state) const {
  if (fd_ < 0) return;
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  std::memcpy(sa.sun_path, addr_.data(), addr_.size());
  socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + addr_.size());
  if (addr_[0] == '@') sa.sun_path[0] = '\0';  // abstract namespace
  ::sendto(fd_, state.data(), state.size(), MSG_NOSIGNAL, reinterpret_cast<sockaddr*>(&sa), len);
}

}  // namespace er::daemon
