#pragma once
// Duplicate suppression keyed by (queue, event_id), persisted in
// <state_dir>/dedupe.sqlite. Used by the single event-loop thread only: the
// class is not thread-safe and starts no threads.
//
// Protocol (per event):
//   if (store.seen(q, id)) ack;                  // duplicate: handler skipped
//   else { run handler; on success: store.record(q, id, ttl); ack; }
// plus a timer calling flush() every ~commit_interval and prune() now and then.
//
// Crash semantics: record() happens BEFORE the ack, but record() only adds to
// an open transaction that flush() commits (every commit_interval, or every
// kMaxBatch records). If the daemon dies before that commit, the records are
// lost; whether the ack reached the broker is unknown. If it did not, the
// event is redelivered and the handler runs again: delivery stays
// at-least-once. Dedupe narrows that window to ~commit_interval but cannot
// close it without an fsync per event: commit_interval = 0 (`sync: always`)
// commits each record with synchronous=FULL (fsync per record, slow).
// With the default (WAL, synchronous=NORMAL) a commit survives a process crash
// but the last commits may be lost on power loss / kernel crash.
//
// Limit: dedupe is per daemon instance. A second instance needs its own
// state_dir (and so has its own file and its own, independent record); the
// store takes an exclusive lock (<dir>/dedupe.lock) and refuses to open a
// directory in use. Two instances consuming the same queue can both run the
// handler for the same event id.
//
// Memory: at most `memory_entries` recent ids are kept in RAM (FIFO, ~120
// bytes each). A miss in RAM goes to SQLite (an indexed SELECT on the same
// connection, which also sees records not yet committed), unless RAM is known
// to hold every row.
//
// Errors: SQLite failures (disk full, I/O) throw std::runtime_error from any
// call; the daemon decides whether to go on without dedupe. The connection
// holds its file locks for good (locking_mode=EXCLUSIVE): the sqlite3 shell
// cannot read the file while the daemon runs. Every ~40 MB of WAL a commit
// also checkpoints (copy + fsync): expect a stall of tens of ms on that tick.
//
// On disk, two tables, because a B-tree keyed by random ids costs about one
// rewritten 4 KiB page per record when committed every 100 ms (measured
// ~10 us/record at 500k rows):
//  - dedupe(id, h, queue, event_id, expires_at), indexed on h (a stable
//    64-bit hash of queue and event_id: 8-byte keys, ~3x fewer pages than a
//    (queue, event_id) key) and on expires_at. Lookups go here.
//  - dedupe_recent(slice, seq, ...): what record() writes, append-only at
//    kSlices insertion points (slice = top bits of h), so cheap to commit.
//    Each commit moves one slice (round robin) into dedupe, sorted by h; a
//    slice is a contiguous h range, so it rewrites ~1/kSlices of the index.
//    Rows in dedupe_recent are always also in RAM (evicting one first merges
//    its slice), so lookups never search it; opening the store merges it all.
// Re-recording an id adds a row; lookups take the latest expiry.
//
// A 4 MiB one-word Bloom filter over the hashes of all rows answers most RAM
// misses for new ids without a SELECT (~1.5 us each). Filled at open (from
// the h index, up to kBloomMaxRows) and by record(); pruning does not clear
// it, so it degrades after several million records since open into a
// harmless ~50 ns check (every miss then goes to SQLite, as without it).
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "dedupe/backend.hpp"

struct sqlite3;
struct sqlite3_stmt;

namespace er::dedupe {

class Store final : public Backend {
 public:
  static constexpr size_t kDefaultMemoryEntries = 65536;
  // A transaction is committed once it holds this many records, whatever the
  // interval, so a late timer cannot grow it without bound.
  static constexpr size_t kMaxBatch = 10000;
  static constexpr size_t kPruneBatch = 10000;
  static constexpr unsigned kSliceBits = 4;
  static constexpr unsigned kSlices = 1u << kSliceBits;

  // Opens/creates <dir>/dedupe.sqlite (creating dir if missing, mode 0750).
  // Throws std::runtime_error("<path>: <message>").
  explicit Store(const std::string& dir,
                 std::chrono::milliseconds commit_interval = std::chrono::milliseconds(100),
                 size_t memory_entries = kDefaultMemoryEntries);
  ~Store();  // commits what is pending (errors are swallowed)
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // True if (queue, event_id) was recorded and has not expired.
  bool seen(std::string_view queue, std::string_view event_id);
  // Records success; expires after ttl (ttl <= 0: nothing is recorded).
  // Buffered until the next commit; seen() sees it at once.
  void record(std::string_view queue, std::string_view event_id, std::chrono::seconds ttl) override;
  // Backend: answers at once (New or Seen; Unavailable when SQLite fails).
  bool asynchronous() const override { return false; }
  void check(std::string_view queue, std::string_view event_id, Done done) override;
  void tick() override;   // flush(), and prune() every 100th call
  void close() override;  // flush(true)
  // Commits buffered records if commit_interval has passed since the first
  // of them (or force). Returns records committed. Cheap when nothing is due.
  size_t flush(bool force = false);
  // Deletes up to `limit` expired rows (plus any in the small recent table)
  // and commits, with anything pending. Returns rows deleted; >= limit means
  // more may be left: call again later.
  size_t prune(size_t limit = kPruneBatch);
  // Records not yet committed.
  size_t pending() const { return pending_; }

  // Ids currently held in RAM (<= memory_entries).
  size_t cached() const { return index_size_; }
  struct Stats {
    uint64_t memory_hits = 0;  // seen() answered from RAM
    uint64_t db_lookups = 0;   // seen() that ran a SELECT
    uint64_t commits = 0;
    uint64_t forced_merges = 0;  // a slice merged early to free a RAM slot
    uint64_t bloom_negatives = 0;  // RAM misses answered by the filter
  };
  const Stats& stats() const { return stats_; }
  const std::string& path() const { return path_; }

  // Tests only: replaces system_clock::now() for expiry decisions.
  using Clock = std::function<std::chrono::system_clock::time_point()>;
  void set_clock_for_testing(Clock now) { clock_ = std::move(now); }

 private:
  struct Slot {
    std::string key;  // queue '\0' event_id
    uint64_t hash = 0;
    int64_t expires_at = 0;
    uint64_t merge_epoch = 0;  // merges_[slice] when recorded
    bool used = false;
    bool in_recent = false;  // recorded; unmerged while merges_[slice] == merge_epoch
  };
  static unsigned slice_of(uint64_t hash) { return static_cast<unsigned>(hash >> (64 - kSliceBits)); }

  int64_t now_s() const;
  const std::string& make_key(std::string_view queue, std::string_view event_id);
  void remember(uint64_t hash, const std::string& key, int64_t expires_at, int64_t now, bool recorded);
  void merge_slice(unsigned slice);
  void commit_batch();  // merges the next slice, then commits
  void exec(const char* sql);
  sqlite3_stmt* prepare(const char* sql);
  void step_done(sqlite3_stmt* st);  // steps to SQLITE_DONE, resets, throws on error
  [[noreturn]] void fail(const std::string& what = {});
  void begin();
  void commit();
  void close_all() noexcept;

  std::string dir_, path_;
  std::chrono::milliseconds interval_;
  sqlite3* db_ = nullptr;
  int lock_fd_ = -1;
  sqlite3_stmt* st_begin_ = nullptr;
  sqlite3_stmt* st_commit_ = nullptr;
  sqlite3_stmt* st_insert_ = nullptr;
  sqlite3_stmt* st_select_ = nullptr;
  sqlite3_stmt* st_prune_ = nullptr;
  sqlite3_stmt* st_prune_recent_ = nullptr;
  sqlite3_stmt* st_merge_ins_ = nullptr;
  sqlite3_stmt* st_merge_del_ = nullptr;
  int64_t recent_seq_ = 0;
  unsigned next_merge_ = 0;
  uint64_t merges_[kSlices] = {};

  bool in_txn_ = false;
  std::chrono::steady_clock::time_point txn_started_{};
  size_t pending_ = 0;

  // RAM index: FIFO ring of slots, found by the key's 64-bit hash (the same
  // hash SQLite indexes) in an open-addressing table (one cache miss per
  // lookup; std::unordered_map showed up at 15% of the profile). The slot's
  // full key is compared before an answer is trusted.
  struct IndexEntry {
    uint64_t hash = 0;
    uint32_t slot_plus1 = 0;  // 0: empty
  };
  static constexpr size_t kNotFound = SIZE_MAX;
  size_t index_find(uint64_t hash) const;
  void index_put(uint64_t hash, uint32_t slot);
  void index_erase(size_t pos);

  static constexpr size_t kBloomWords = size_t(1) << 19;  // 4 MiB
  static constexpr size_t kBloomMaxRows = 8000000;        // beyond: saturated, not built
  static uint64_t bloom_bits(uint64_t hash) {
    return (uint64_t(1) << ((hash >> 40) & 63)) | (uint64_t(1) << ((hash >> 46) & 63)) |
           (uint64_t(1) << ((hash >> 52) & 63));
  }
  void bloom_add(uint64_t hash) { bloom_[hash & (kBloomWords - 1)] |= bloom_bits(hash); }
  bool bloom_may_contain(uint64_t hash) const {
    uint64_t b = bloom_bits(hash);
    return !bloom_on_ || (bloom_[hash & (kBloomWords - 1)] & b) == b;
  }
  std::vector<uint64_t> bloom_;
  bool bloom_on_ = true;

  std::vector<Slot> ring_;
  size_t next_slot_ = 0;
  std::vector<IndexEntry> index_;  // power-of-two size >= 2 * ring_.size()
  size_t index_size_ = 0;
  // False while RAM holds every row of the table: a RAM miss is then final.
  bool db_has_uncached_ = false;
  std::string key_;  // scratch, reused to avoid allocations

  Clock clock_;
  Stats stats_;
  unsigned ticks_ = 0;
};

}  // namespace er::dedupe
