// The crash guard's journal and counts: a run that ends without mark_clean()
// is a crash; what it counts, what a fatal signal names, TTL, locking.
// Crashes are real where it matters: a forked child dies by abort(), a
// segfault or SIGKILL with the journal open.
#include <catch2/catch.hpp>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "consume/crash_guard.hpp"

using er::consume::CrashGuard;
using er::consume::CrashMark;
using namespace std::chrono_literals;

namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/er-crash-guard-XXXXXX";
    REQUIRE(::mkdtemp(tmpl) != nullptr);
    path = std::string(tmpl) + "/state";  // created by the guard
  }
  ~TempDir() { std::system(("rm -rf '" + path.substr(0, path.rfind('/')) + "'").c_str()); }
};

// Runs `body` with a guard on `dir` in a child process that must die by `sig`
// (or by SIGABRT: a sanitizer build reports a fault, then aborts).
template <class F>
void die_in_child(const std::string& dir, int sig, F body) {
  std::fflush(nullptr);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // Catch2's own handlers would report the crash as a failed test in the child.
    for (int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) ::signal(sig, SIG_DFL);
    {
      CrashGuard g(dir, 16, 1h);
      g.install_signal_handlers();
      body(g);
    }
    ::_exit(0);  // the body did not crash
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFSIGNALED(status));
  CHECK((WTERMSIG(status) == sig || WTERMSIG(status) == SIGABRT));
}

bool counted(const CrashGuard& g, uint64_t k) {
  const auto& c = g.previous().counted;
  return std::find(c.begin(), c.end(), k) != c.end();
}

}  // namespace

TEST_CASE("crash guard: a clean run counts nothing", "[crash_guard]") {
  TempDir t;
  uint64_t k;
  {
    CrashGuard g(t.path, 8, 1h);
    CHECK_FALSE(g.previous().unclean);
    k = g.key("q", "{\"event_id\":\"a\"}");
    int32_t s = g.enter(k);
    CHECK(s >= 0);
    g.mark_clean();  // even with an event still in the journal (shutdown_timeout passed)
  }
  CrashGuard g(t.path, 8, 1h);
  CHECK_FALSE(g.previous().unclean);
  CHECK(g.empty());
  CHECK(g.key("q", "{\"event_id\":\"a\"}") == k);  // the seed is kept
}

TEST_CASE("crash guard: an unclean end counts the active events only", "[crash_guard]") {
  TempDir t;
  uint64_t running, waiting, done, other_queue;
  {
    CrashGuard g(t.path, 8, 1h);
    running = g.key("q", "body-1");
    waiting = g.key("q", "body-2");
    done = g.key("q", "body-3");
    other_queue = g.key("q2", "body-1");
    CHECK(running != other_queue);
    int32_t a = g.enter(running);
    g.set_id(a, "id-running-and-a-very-long-event-id-cut-at-forty-eight-bytes");
    g.set_active(a, false);
    g.set_active(a, true);  // its plugin runs
    g.set_active(g.enter(waiting), false);
    g.leave(g.enter(done));
  }  // no mark_clean(): the process "died"
  for (uint32_t n = 1; n <= 3; ++n) {
    CrashGuard g(t.path, 8, 1h);
    REQUIRE(g.previous().unclean);
    CHECK_FALSE(g.previous().attributed);
    if (n == 1) {
      CHECK(g.previous().counted == std::vector<uint64_t>{running});
    } else {
      CHECK(g.previous().counted.empty());  // nothing was in flight in the run between
    }
    const auto* e = g.find(running);
    REQUIRE(e);
    CHECK(e->crashes == 1);
    CHECK(e->event_id == std::string("id-running-and-a-very-long-event-id-cut-at-forty-eight-bytes").substr(0, 48));
    CHECK_FALSE(g.find(waiting));
    CHECK_FALSE(g.find(done));
    // Runs it again and dies: the count grows by one a crash.
    if (n < 3) continue;
    g.enter(running);
  }
  CrashGuard g(t.path, 8, 1h);
  REQUIRE(g.find(running));
  CHECK(g.find(running)->crashes == 2);
}

TEST_CASE("crash guard: counts expire after ttl", "[crash_guard]") {
  TempDir t;
  int64_t now = 1'000'000;
  auto clock = [&] { return now; };
  uint64_t k;
  {
    CrashGuard g(t.path, 4, 1h, clock);
    k = g.key("q", "x");
    g.enter(k);
  }
  {
    CrashGuard g(t.path, 4, 1h, clock);
    REQUIRE(g.find(k));
    g.mark_clean();
  }
  now += 3599;
  {
    CrashGuard g(t.path, 4, 1h, clock);
    CHECK(g.find(k));
    g.mark_clean();
  }
  now += 2;
  CrashGuard g(t.path, 4, 1h, clock);
  CHECK_FALSE(g.find(k));
  std::ifstream f(t.path + "/crash_counts");
  std::string head, line;
  std::getline(f, head);
  CHECK_FALSE(std::getline(f, line));  // gone from the file too
}

TEST_CASE("crash guard: one instance per state_dir", "[crash_guard]") {
  TempDir t;
  CrashGuard g(t.path, 4, 1h);
  CHECK_THROWS_AS(CrashGuard(t.path, 4, 1h), CrashGuard::InUse);
}

TEST_CASE("crash guard: an unusable state_dir is an error naming it", "[crash_guard]") {
  TempDir t;
  CrashGuard(t.path, 4, 1h).mark_clean();  // creates it
  const std::string file = t.path + "/not-a-dir";
  std::ofstream(file) << "x";
  try {
    CrashGuard g(file + "/state", 4, 1h);
    FAIL("no error");
  } catch (const std::runtime_error& e) {
    CHECK_THAT(e.what(), Catch::Contains("not-a-dir"));
  }
}

TEST_CASE("crash guard: a full journal leaves events unrecorded, not lost", "[crash_guard]") {
  TempDir t;
  CrashGuard g(t.path, 2, 1h);
  int32_t a = g.enter(1), b = g.enter(2);
  CHECK(a >= 0);
  CHECK(b >= 0);
  CHECK(g.enter(3) == -1);
  g.set_active(-1, true);  // harmless on the slot-less event
  g.leave(-1);
  g.leave(a);
  CHECK(g.enter(4) == a);
  g.mark_clean();
}

TEST_CASE("crash guard: abort() names the event its thread was running", "[crash_guard]") {
  TempDir t;
  die_in_child(t.path, SIGABRT, [](CrashGuard& g) {
    g.enter(g.key("q", "bystander"));  // active, on another thread say
    int32_t s = g.enter(g.key("q", "culprit"));
    CrashMark mark(s);
    std::abort();
  });
  CrashGuard g(t.path, 16, 1h);
  const uint64_t culprit = g.key("q", "culprit"), bystander = g.key("q", "bystander");
  REQUIRE(g.previous().unclean);
  CHECK(g.previous().attributed);
  CHECK(g.previous().signal == SIGABRT);
  CHECK(counted(g, culprit));
  CHECK_FALSE(counted(g, bystander));
  REQUIRE(g.find(culprit));
  CHECK(g.find(culprit)->signal == SIGABRT);
}

TEST_CASE("crash guard: a segfault names the event its thread was running", "[crash_guard]") {
  TempDir t;
  die_in_child(t.path, SIGSEGV, [](CrashGuard& g) {
    g.enter(g.key("q", "bystander"));
    CrashMark mark(g.enter(g.key("q", "culprit")));
    *reinterpret_cast<volatile int*>(uintptr_t{8}) = 1;  // a real fault (not null: UBSan would stop first)
  });
  CrashGuard g(t.path, 16, 1h);
  CHECK(g.previous().attributed);
  // SIGABRT: a sanitizer build reports the fault, then aborts on that thread.
  CHECK((g.previous().signal == SIGSEGV || g.previous().signal == SIGABRT));
  CHECK(g.previous().counted == std::vector<uint64_t>{g.key("q", "culprit")});
}

TEST_CASE("crash guard: a kill from outside blames every active event", "[crash_guard]") {
  TempDir t;
  die_in_child(t.path, SIGKILL, [](CrashGuard& g) {
    g.enter(g.key("q", "a"));
    g.enter(g.key("q", "b"));
    g.set_active(g.enter(g.key("q", "idle")), false);
    CrashMark mark(-1);
    ::raise(SIGKILL);
  });
  CrashGuard g(t.path, 16, 1h);
  REQUIRE(g.previous().unclean);
  CHECK_FALSE(g.previous().attributed);
  CHECK(g.previous().counted.size() == 2);
  CHECK(counted(g, g.key("q", "a")));
  CHECK(counted(g, g.key("q", "b")));
  CHECK_FALSE(counted(g, g.key("q", "idle")));
}

TEST_CASE("crash guard: a signal from another process names no event", "[crash_guard]") {
  TempDir t;
  die_in_child(t.path, SIGABRT, [](CrashGuard& g) {
    g.enter(g.key("q", "a"));
    CrashMark mark(g.enter(g.key("q", "b")));
    // What systemd's watchdog does: SIGABRT from another process. kill(1)
    // by exec, so the journal's lock (O_CLOEXEC) is not held by it after.
    const std::string self = std::to_string(::getpid());
    if (::fork() == 0) {
      ::execlp("kill", "kill", "-ABRT", self.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    for (;;) ::pause();
  });
  CrashGuard g(t.path, 16, 1h);
  CHECK_FALSE(g.previous().attributed);
  CHECK(g.previous().counted.size() == 2);
}

TEST_CASE("crash guard: a damaged counts file is read as far as it makes sense", "[crash_guard]") {
  TempDir t;
  uint64_t k;
  {
    CrashGuard g(t.path, 4, 1h);
    k = g.key("q", "x");
    g.enter(k);
  }
  { CrashGuard(t.path, 4, 1h).mark_clean(); }
  {
    std::ofstream f(t.path + "/crash_counts", std::ios::app);
    f << "garbage line\nffff zz\n\n0123 7 notanumber\n";
  }
  {
    CrashGuard g(t.path, 4, 1h);
    REQUIRE(g.find(k));
    CHECK(g.find(k)->crashes == 1);
    CHECK(g.counts().size() == 1);
    g.mark_clean();
  }
  std::ofstream(t.path + "/crash_counts") << "not ours\n";
  CrashGuard g(t.path, 4, 1h);
  CHECK(g.empty());
}
