// sd_notify spoken directly: datagrams reach $NOTIFY_SOCKET, the watchdog
// period is half of WATCHDOG_USEC for this process only, and no socket
// means no effect.
#include <catch2/catch.hpp>

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "daemon/notify.hpp"

using er::daemon::Notifier;

namespace {
struct EnvGuard {
  ~EnvGuard() {
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
  }
};
}  // namespace

TEST_CASE("notify: states reach the socket; watchdog period is half of WATCHDOG_USEC", "[notify]") {
  EnvGuard guard;
  std::string path = "/tmp/er-notify-" + std::to_string(getpid()) + ".sock";
  ::unlink(path.c_str());
  int fd = ::socket(AF_UNIX, SOCK_DGRAM, 0);
  REQUIRE(fd >= 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::snprintf(a.sun_path, sizeof a.sun_path, "%s", path.c_str());
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  setenv("NOTIFY_SOCKET", path.c_str(), 1);
  setenv("WATCHDOG_USEC", "2000000", 1);
  setenv("WATCHDOG_PID", std::to_string(getpid()).c_str(), 1);
  {
    Notifier n;
    REQUIRE(n.enabled());
    REQUIRE(n.watchdog_period());
    CHECK(n.watchdog_period()->count() == 1000000);
    n.send("READY=1\nSTATUS=consuming");
    char buf[256];
    ssize_t got = ::recv(fd, buf, sizeof buf, 0);
    REQUIRE(got > 0);
    CHECK(std::string(buf, static_cast<size_t>(got)) == "READY=1\nSTATUS=consuming");
  }
  // The watchdog belongs to another process: not ours to ping.
  setenv("WATCHDOG_PID", "1", 1);
  CHECK_FALSE(Notifier().watchdog_period());
  ::close(fd);
  ::unlink(path.c_str());
  unsetenv("NOTIFY_SOCKET");
  Notifier off;
  CHECK_FALSE(off.enabled());
  off.send("READY=1");  // no effect, no error
}
