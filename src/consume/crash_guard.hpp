#pragma once
// Crash-loop protection (docs/reliability.md#crash-loop-protection).
//
// An event whose handling kills the daemon (a plugin that segfaults on it) is
// redelivered by the broker after every restart and would kill it again,
// forever. The guard keeps, in <state_dir>/inflight, a journal of the events
// the daemon is working on: one fixed 64-byte slot per event, in a shared
// mmap'd file, so recording is a few stores into memory (no system call); the
// kernel keeps the pages when the process dies, whatever kills it. A clean
// exit marks the file clean. At the next start, a file not marked clean means
// the previous run died: the events it was working on each get one more
// crash in <state_dir>/crash_counts (written only then). A fatal signal the
// daemon raised itself (SIGSEGV, SIGBUS, SIGFPE, SIGILL, an abort()) names
// the event its thread was running (CrashMark), and then only that one is
// counted; a kill from outside (SIGKILL, the OOM killer, the watchdog's
// SIGABRT) counts every event that was active.
//
// An event is identified by a keyed 64-bit hash of its queue and body: known
// before the body is parsed (a crash in the parser counts too), and the same
// for every redelivery. Counts expire `ttl` after their last crash.
//
// Loop thread only, except CrashMark and the signal handler.
#include <chrono>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace er::consume {

// While alive, fatal signals raised on this thread are blamed on the event in
// `slot` (-1: none). Async-signal-safe to read.
class CrashMark {
 public:
  explicit CrashMark(int32_t slot) noexcept;
  ~CrashMark();
  CrashMark(const CrashMark&) = delete;
  CrashMark& operator=(const CrashMark&) = delete;

 private:
  int32_t prev_;
};

class CrashGuard {
 public:
  // Another daemon holds the journal (the same state_dir).
  struct InUse : std::runtime_error {
    using std::runtime_error::runtime_error;
  };
  struct Entry {
    uint32_t crashes = 0;
    int64_t last = 0;       // unix seconds of the last crash counted
    int signal = 0;         // that crash's signal when the daemon saw it, else 0
    std::string event_id;   // as far as it was known (at most 48 bytes)
  };
  // What start found of the previous run.
  struct Previous {
    bool unclean = false;
    bool attributed = false;  // a signal named the event its thread ran
    int signal = 0;
    std::vector<uint64_t> counted;  // keys whose count went up
  };
  using Clock = std::function<int64_t()>;  // unix seconds; tests only

  static constexpr size_t kIdBytes = 48;
  struct Header;  // the journal's layout (crash_guard.cpp)
  struct Slot;

  // Opens (creates) the journal in `dir` for up to `slots` events at once,
  // counts the previous run's events if it did not end cleanly, prunes
  // expired counts. Throws InUse, or std::runtime_error naming the path.
  CrashGuard(const std::string& dir, size_t slots, std::chrono::seconds ttl, Clock now = {});
  ~CrashGuard();  // restores the signal handlers; does NOT mark clean
  CrashGuard(const CrashGuard&) = delete;
  CrashGuard& operator=(const CrashGuard&) = delete;

  const Previous& previous() const { return prev_; }
  const std::string& dir() const { return dir_; }

  // Blame fatal signals on the event of the current thread's CrashMark
  // (one guard per process).
  void install_signal_handlers();

  uint64_t key(std::string_view queue, std::string_view body) const;
  // A slot for the event (active), or -1 when every slot is taken.
  int32_t enter(uint64_t key);
  void set_id(int32_t slot, std::string_view event_id);
  // Active: intake or its in-process handler runs; else it waits, runs in
  // another process, or is being settled, and is not blamed for a crash.
  void set_active(int32_t slot, bool active);
  void leave(int32_t slot);

  // The unclean exits counted against this event, or null.
  const Entry* find(uint64_t key) const;
  bool empty() const { return counts_.empty(); }
  const std::unordered_map<uint64_t, Entry>& counts() const { return counts_; }

  // The run ends cleanly: nothing in the journal counts at the next start.
  void mark_clean();

 private:
  void load_counts(uint64_t seed);
  void save_counts();
  void map_journal(size_t slots, uint64_t seed);
  int64_t now() const;

  std::string dir_, journal_path_, counts_path_;
  std::chrono::seconds ttl_;
  Clock clock_;
  int fd_ = -1;
  void* map_ = nullptr;
  size_t map_len_ = 0;
  Header* header_ = nullptr;
  Slot* slots_ = nullptr;
  std::vector<int32_t> free_;
  uint64_t seed_ = 0;
  bool handlers_installed_ = false;
  bool warned_full_ = false;
  std::unordered_map<uint64_t, Entry> counts_;
  Previous prev_;
};

}  // namespace er::consume
