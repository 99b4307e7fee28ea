#include <catch2/catch.hpp>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dedupe/store.hpp"

using er::dedupe::Store;
using namespace std::chrono_literals;
namespace fs = std::filesystem;

namespace {
// A fresh directory per test, removed afterwards.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "er-dedupe-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
};

// Settable clock: starts at a fixed time, tests move it forward.
struct FakeClock {
  std::chrono::system_clock::time_point t = std::chrono::system_clock::time_point(std::chrono::seconds(1700000000));
  Store::Clock fn() {
    return [this] { return t; };
  }
};

std::string uuid_like(size_t i) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%08zx-0000-4000-8000-%012zx", i * 2654435761u % 0xffffffffu, i);
  return buf;
}
}  // namespace

TEST_CASE("dedupe: not seen before record, seen after, per queue", "[dedupe]") {
  TempDir d;
  Store s(d.str());
  REQUIRE_FALSE(s.seen("orders", "e1"));
  s.record("orders", "e1", 24h);
  REQUIRE(s.seen("orders", "e1"));
  REQUIRE_FALSE(s.seen("billing", "e1"));  // same id, other queue
  REQUIRE_FALSE(s.seen("orders", "e2"));
  // The key separator cannot make two different pairs collide.
  REQUIRE_FALSE(s.seen("order", std::string("s\0e1", 4)));
}

TEST_CASE("dedupe: uncommitted records are seen in-process; pending and flush", "[dedupe]") {
  TempDir d;
  Store s(d.str(), 1h);  // the interval never passes during the test
  REQUIRE(s.pending() == 0);
  REQUIRE(s.flush() == 0);
  s.record("q", "a", 1h);
  s.record("q", "b", 1h);
  REQUIRE(s.pending() == 2);
  REQUIRE(s.seen("q", "a"));
  REQUIRE(s.seen("q", "b"));
  REQUIRE(s.flush() == 0);  // interval not passed
  REQUIRE(s.pending() == 2);
  REQUIRE(s.flush(true) == 2);
  REQUIRE(s.pending() == 0);
  REQUIRE(s.flush(true) == 0);
  REQUIRE(s.seen("q", "a"));

  SECTION("flush commits once the interval has passed") {
    TempDir d2;
    Store fast(d2.str(), 1ms);
    fast.record("q", "x", 1h);
    REQUIRE(fast.pending() == 1);
    std::this_thread::sleep_for(5ms);
    REQUIRE(fast.flush() == 1);
    REQUIRE(fast.pending() == 0);
  }
  SECTION("a batch commits by itself at kMaxBatch records") {
    for (size_t i = 0; i < Store::kMaxBatch + 5; ++i) s.record("q", uuid_like(i), 1h);
    REQUIRE(s.pending() == 5);
  }
  SECTION("commit_interval 0 commits each record") {
    TempDir d2;
    Store sync(d2.str(), 0ms);
    sync.record("q", "x", 1h);
    REQUIRE(sync.pending() == 0);
    REQUIRE(sync.flush(true) == 0);
    REQUIRE(sync.seen("q", "x"));
  }
}

TEST_CASE("dedupe: records survive a restart", "[dedupe]") {
  TempDir d;
  {
    Store s(d.str());
    s.record("q", "committed", 24h);
    REQUIRE(s.flush(true) == 1);
    s.record("q", "pending-at-exit", 24h);  // the destructor commits it
  }
  REQUIRE(fs::exists(d.path / "dedupe.sqlite"));
  Store s(d.str());
  REQUIRE(s.cached() == 0);  // answers below come from SQLite
  REQUIRE(s.seen("q", "committed"));
  REQUIRE(s.seen("q", "pending-at-exit"));
  REQUIRE_FALSE(s.seen("q", "never"));
  REQUIRE_FALSE(s.seen("other", "committed"));
  REQUIRE(s.stats().db_lookups == 2);       // the two recorded ids
  REQUIRE(s.stats().bloom_negatives == 2);  // the filter was rebuilt from the table
}

TEST_CASE("dedupe: state_dir is created, mode 0750", "[dedupe]") {
  TempDir d;
  fs::path dir = d.path / "a" / "b";
  { Store s(dir.string()); }
  struct stat st;
  REQUIRE(::stat(dir.c_str(), &st) == 0);
  REQUIRE((st.st_mode & 0777 & ~0750) == 0);  // umask may only remove bits
}

TEST_CASE("dedupe: expiry and prune", "[dedupe]") {
  TempDir d;
  FakeClock clock;
  Store s(d.str());
  s.set_clock_for_testing(clock.fn());
  s.record("q", "short", 10s);
  s.record("q", "long", 24h);
  REQUIRE(s.seen("q", "short"));
  clock.t += 9s;
  REQUIRE(s.seen("q", "short"));
  clock.t += 1s;  // exactly ttl: expired
  REQUIRE_FALSE(s.seen("q", "short"));
  REQUIRE(s.seen("q", "long"));
  REQUIRE(s.prune() == 1);
  REQUIRE(s.prune() == 0);
  REQUIRE(s.pending() == 0);  // prune commits

  SECTION("re-recording extends the ttl") {
    s.record("q", "short", 10s);
    clock.t += 5s;
    s.record("q", "short", 10s);
    clock.t += 8s;
    REQUIRE(s.seen("q", "short"));
  }
  SECTION("ttl <= 0 records nothing") {
    s.record("q", "zero", 0s);
    REQUIRE(s.pending() == 0);
    REQUIRE_FALSE(s.seen("q", "zero"));
  }
}

TEST_CASE("dedupe: prune is bounded per call", "[dedupe]") {
  TempDir d;
  FakeClock clock;
  {
    Store s(d.str());
    s.set_clock_for_testing(clock.fn());
    for (int i = 0; i < 25; ++i) s.record("q", "p" + std::to_string(i), 1s);
    s.record("q", "long", 1h);
  }
  clock.t += 2s;
  Store s(d.str());  // opening moves the recent rows to the main table, where the limit applies
  s.set_clock_for_testing(clock.fn());
  REQUIRE(s.prune(10) == 10);
  REQUIRE(s.prune(10) == 10);
  REQUIRE(s.prune(10) == 5);
  REQUIRE(s.prune(10) == 0);
  REQUIRE(s.seen("q", "long"));
  REQUIRE_FALSE(s.seen("q", "p0"));
}

TEST_CASE("dedupe: expiry after restart uses wall-clock time", "[dedupe]") {
  TempDir d;
  FakeClock clock;
  {
    Store s(d.str());
    s.set_clock_for_testing(clock.fn());
    s.record("q", "a", 1h);
    s.record("q", "b", 3h);
  }
  clock.t += 2h;
  Store s(d.str());
  s.set_clock_for_testing(clock.fn());
  REQUIRE_FALSE(s.seen("q", "a"));
  REQUIRE(s.seen("q", "b"));
  REQUIRE(s.prune() == 1);
  REQUIRE(s.seen("q", "b"));
}

TEST_CASE("dedupe: many ids with a bounded RAM index", "[dedupe]") {
  TempDir d;
  constexpr size_t kMem = 1000, kN = 100000;
  Store s(d.str(), 100ms, kMem);
  for (size_t i = 0; i < kN; ++i) {
    REQUIRE_FALSE(s.seen("q", uuid_like(i)));
    s.record("q", uuid_like(i), 24h);
    if (i % 1000 == 0) s.flush(true);  // not on time: a timed commit could land the last record on kMaxBatch
    REQUIRE(s.cached() <= kMem);
  }
  REQUIRE(s.cached() == kMem);
  s.record("q", uuid_like(kN), 24h);  // left uncommitted and evicted below
  for (size_t i = 0; i < 2 * kMem; ++i) s.record("r", uuid_like(i), 24h);
  REQUIRE(s.pending() > 0);

  auto before = s.stats();
  for (size_t i = 0; i <= kN; ++i) REQUIRE(s.seen("q", uuid_like(i)));
  REQUIRE_FALSE(s.seen("q", uuid_like(kN + 1)));
  REQUIRE_FALSE(s.seen("r", uuid_like(2 * kMem)));
  REQUIRE(s.cached() <= kMem);
  REQUIRE(s.stats().db_lookups - before.db_lookups >= kN - kMem);  // evicted ones asked SQLite
  REQUIRE(s.stats().forced_merges > 0);  // evicting unmerged records moved them first
}

TEST_CASE("dedupe: a crash loses only what was not committed", "[dedupe]") {
  TempDir d;
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    try {
      Store s(d.str(), 1h);
      s.record("q", "committed", 24h);
      s.flush(true);
      s.record("q", "uncommitted", 24h);
      ::_exit(0);  // with the store still open: as if the daemon died here
    } catch (...) {
    }
    ::_exit(1);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  Store s(d.str());
  REQUIRE(s.seen("q", "committed"));
  REQUIRE_FALSE(s.seen("q", "uncommitted"));
}

TEST_CASE("dedupe: a RAM miss is final until something is evicted", "[dedupe]") {
  TempDir d;
  Store s(d.str(), 100ms, 4);
  s.record("q", "a", 1h);
  REQUIRE_FALSE(s.seen("q", "x"));
  REQUIRE(s.stats().db_lookups == 0);
  for (int i = 0; i < 4; ++i) s.record("q", "e" + std::to_string(i), 1h);  // evicts "a"
  REQUIRE(s.seen("q", "a"));
  REQUIRE(s.stats().db_lookups == 1);
}

TEST_CASE("dedupe: clear errors", "[dedupe]") {
  TempDir d;
  SECTION("state_dir under a regular file") {
    std::ofstream(d.path / "file") << "x";
    std::string dir = (d.path / "file" / "state").string();
    REQUIRE_THROWS_WITH(Store(dir), Catch::Contains(dir) && Catch::Contains("Not a directory"));
  }
  SECTION("state_dir is a regular file") {
    std::ofstream(d.path / "file") << "x";
    std::string dir = (d.path / "file").string();
    REQUIRE_THROWS_WITH(Store(dir), Catch::Contains(dir) && Catch::Contains("Not a directory"));
  }
  SECTION("corrupt database file") {
    std::ofstream(d.path / "dedupe.sqlite") << std::string(8192, 'g');
    REQUIRE_THROWS_WITH(Store(d.str()),
                        Catch::StartsWith((d.path / "dedupe.sqlite").string() + ": ") &&
                            Catch::Contains("not a database"));
  }
  SECTION("database path is a directory") {
    fs::create_directory(d.path / "dedupe.sqlite");
    REQUIRE_THROWS_WITH(Store(d.str()), Catch::StartsWith((d.path / "dedupe.sqlite").string() + ": "));
  }
  SECTION("unwritable directory") {
    if (::geteuid() == 0) {
      WARN("running as root: permission bits are not enforced, skipped");
    } else {
      fs::create_directory(d.path / "ro");
      fs::permissions(d.path / "ro", fs::perms::owner_read | fs::perms::owner_exec);
      REQUIRE_THROWS_WITH(Store((d.path / "ro").string()), Catch::Contains("Permission denied"));
    }
  }
  SECTION("a second store on the same directory is refused") {
    Store first(d.str());
    REQUIRE_THROWS_WITH(Store(d.str()), Catch::Contains("own state_dir"));
  }
  SECTION("empty state_dir") {
    REQUIRE_THROWS_AS(Store(""), std::runtime_error);
  }
}
