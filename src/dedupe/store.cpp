#include "dedupe/store.hpp"

#include <sqlite3.h>

#include <cerrno>
#include <climits>
#include <cstring>
#include <stdexcept>

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util/hash.hpp"
#include "util/log.hpp"

namespace er::dedupe {

namespace {

std::string sys_error(const std::string& path, int err) {
  return path + ": " + std::strerror(err);
}

// mkdir -p with mode 0750 for the directories it creates.
void make_dirs(const std::string& dir) {
  for (size_t pos = 1;; ++pos) {
    pos = dir.find('/', pos);
    std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0750) != 0 && errno != EEXIST) throw std::runtime_error(sys_error(dir, errno));
    if (pos == std::string::npos) break;
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) throw std::runtime_error(sys_error(dir, errno));
  if (!S_ISDIR(st.st_mode)) throw std::runtime_error(sys_error(dir, ENOTDIR));
}

// Resets the statement whatever happens, so it never holds a read lock or stale binds.
struct ResetGuard {
  sqlite3_stmt* st;
  ~ResetGuard() { sqlite3_reset(st); }
};

constexpr const char* kSchema =
    "CREATE TABLE IF NOT EXISTS dedupe(id INTEGER PRIMARY KEY, h INTEGER NOT NULL,"
    " queue TEXT NOT NULL, event_id TEXT NOT NULL, expires_at INTEGER NOT NULL);"
    "CREATE INDEX IF NOT EXISTS dedupe_h ON dedupe(h);"
    "CREATE INDEX IF NOT EXISTS dedupe_expires ON dedupe(expires_at);"
    "CREATE TABLE IF NOT EXISTS dedupe_recent(slice INTEGER NOT NULL, seq INTEGER NOT NULL,"
    " h INTEGER NOT NULL, queue TEXT NOT NULL, event_id TEXT NOT NULL, expires_at INTEGER NOT NULL,"
    " PRIMARY KEY(slice, seq)) WITHOUT ROWID;";

// FNV-1a then a murmur3 finaliser. Stored on disk: must never change.
uint64_t key_hash(std::string_view key) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : key) h = (h ^ c) * 0x100000001b3ULL;
  return util::mix64(h);
}

}  // namespace

Store::Store(const std::string& dir, std::chrono::milliseconds commit_interval, size_t memory_entries)
    : dir_(dir), path_(dir + "/dedupe.sqlite"), interval_(commit_interval) {
  if (dir.empty()) throw std::runtime_error("dedupe: state_dir is empty");
  if (interval_.count() < 0) interval_ = std::chrono::milliseconds(0);
  try {
    make_dirs(dir_);

    // Two processes on one file would fail each other's writes with SQLITE_BUSY
    // at run time (we hold SQLite's locks for good): refuse at start instead.
    std::string lock_path = dir_ + "/dedupe.lock";
    lock_fd_ = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0640);
    if (lock_fd_ < 0) throw std::runtime_error(sys_error(lock_path, errno));
    if (::flock(lock_fd_, LOCK_EX | LOCK_NB) != 0) {
      if (errno == EWOULDBLOCK)
        throw std::runtime_error(lock_path +
                                 ": in use by another event-router instance (each instance needs its own state_dir)");
      throw std::runtime_error(sys_error(lock_path, errno));
    }

    // NOMUTEX: one thread only, skip SQLite's per-call locking.
    int rc = sqlite3_open_v2(path_.c_str(), &db_, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             nullptr);
    if (rc != SQLITE_OK) fail(db_ ? sqlite3_errmsg(db_) : sqlite3_errstr(rc));
    sqlite3_busy_timeout(db_, 100);
    // We are the only user (see the lock above): hold SQLite's file locks for
    // good instead of fcntl() calls per transaction, and keep the WAL index in
    // heap memory (no -shm file). Must precede journal_mode=WAL. The sqlite3
    // shell cannot read the file while the daemon runs.
    exec("PRAGMA locking_mode=EXCLUSIVE");

    // journal_mode is the first statement to read the file: a corrupt one fails here.
    {
      sqlite3_stmt* st = prepare("PRAGMA journal_mode=WAL");
      rc = sqlite3_step(st);
      std::string mode = rc == SQLITE_ROW ? reinterpret_cast<const char*>(sqlite3_column_text(st, 0)) : "";
      std::string err = rc == SQLITE_ROW ? "" : sqlite3_errmsg(db_);
      sqlite3_finalize(st);
      if (!err.empty()) fail(err);
      if (mode != "wal") fail("cannot use WAL journal (journal_mode=" + mode + ")");
    }
    if (sqlite3_db_readonly(db_, "main") == 1) fail("database is read-only");
    // NORMAL in WAL: commits survive a process crash, fsync only at checkpoints.
    // commit_interval 0 means "sync: always": fsync every commit.
    exec(interval_.count() == 0 ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL");
    exec("PRAGMA cache_size=-16384");  // 16 MiB: keep the indexes' upper levels hot
    // Checkpoints copy every dirty page to the file and fsync: with random keys
    // the default (1000 pages) would run one after nearly every commit.
    exec("PRAGMA wal_autocheckpoint=10000");
    exec("PRAGMA journal_size_limit=67108864");

    {
      sqlite3_stmt* st = prepare("PRAGMA user_version");
      int version = sqlite3_step(st) == SQLITE_ROW ? sqlite3_column_int(st, 0) : 0;
      sqlite3_finalize(st);
      if (version > 1) fail("unsupported dedupe schema version " + std::to_string(version));
    }
    exec(kSchema);
    exec("PRAGMA user_version=1");

    // Rows left in dedupe_recent by the last run are not in RAM: merge them all.
    exec("BEGIN IMMEDIATE;"
         "INSERT INTO dedupe(h, queue, event_id, expires_at)"
         " SELECT h, queue, event_id, expires_at FROM dedupe_recent ORDER BY h;"
         "DELETE FROM dedupe_recent;"
         "COMMIT");
    {
      // Rows from an earlier run are not in RAM, only in the filter. The h
      // index covers this scan: ~8 bytes read per row.
      bloom_.assign(kBloomWords, 0);
      sqlite3_stmt* st = prepare("SELECT h FROM dedupe");
      size_t rows = 0;
      while ((rc = sqlite3_step(st)) == SQLITE_ROW && rows < kBloomMaxRows) {
        bloom_add(static_cast<uint64_t>(sqlite3_column_int64(st, 0)));
        ++rows;
      }
      sqlite3_finalize(st);
      if (rc != SQLITE_ROW && rc != SQLITE_DONE) fail();
      db_has_uncached_ = rows > 0;
      bloom_on_ = rows < kBloomMaxRows;
    }

    st_begin_ = prepare("BEGIN IMMEDIATE");
    st_commit_ = prepare("COMMIT");
    st_insert_ = prepare(
        "INSERT INTO dedupe_recent(slice, seq, h, queue, event_id, expires_at) VALUES(?5, ?6, ?1, ?2, ?3, ?4)");
    st_merge_ins_ = prepare(
        "INSERT INTO dedupe(h, queue, event_id, expires_at)"
        " SELECT h, queue, event_id, expires_at FROM dedupe_recent WHERE slice = ?1 ORDER BY h");
    st_merge_del_ = prepare("DELETE FROM dedupe_recent WHERE slice = ?1");
    st_prune_recent_ = prepare("DELETE FROM dedupe_recent WHERE expires_at <= ?1");
    st_select_ = prepare("SELECT max(expires_at) FROM dedupe WHERE h = ?1 AND queue = ?2 AND event_id = ?3");
    st_prune_ = prepare(
        "DELETE FROM dedupe WHERE id IN"
        " (SELECT id FROM dedupe WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)");
  } catch (...) {
    close_all();
    throw;
  }

  if (memory_entries > UINT32_MAX) memory_entries = UINT32_MAX;
  if (memory_entries == 0) memory_entries = 1;  // records must stay in RAM until merged
  ring_.resize(memory_entries);
  size_t cap = 16;
  while (cap < 2 * memory_entries) cap *= 2;
  index_.resize(cap);
}

Store::~Store() {
  try {
    if (db_) commit();
  } catch (...) {
    // Nothing to do here: those records are lost, the events may run again.
  }
  close_all();
}

void Store::close_all() noexcept {
  for (sqlite3_stmt** st : {&st_begin_, &st_commit_, &st_insert_, &st_select_, &st_prune_, &st_prune_recent_,
                            &st_merge_ins_, &st_merge_del_}) {
    sqlite3_finalize(*st);
    *st = nullptr;
  }
  if (db_) sqlite3_close_v2(db_);  // an open transaction is rolled back
  db_ = nullptr;
  if (lock_fd_ >= 0) ::close(lock_fd_);  // after the database: releases the lock
  lock_fd_ = -1;
}

int64_t Store::now_s() const {
  auto tp = clock_ ? clock_() : std::chrono::system_clock::now();
  return std::chrono::duration_cast<std::chrono::seconds>(tp.time_since_epoch()).count();
}

const std::string& Store::make_key(std::string_view queue, std::string_view event_id) {
  key_.assign(queue);
  key_.push_back('\0');
  key_.append(event_id);
  return key_;
}

size_t Store::index_find(uint64_t hash) const {
  const size_t mask = index_.size() - 1;
  for (size_t i = hash & mask;; i = (i + 1) & mask) {
    if (index_[i].slot_plus1 == 0) return kNotFound;
    if (index_[i].hash == hash) return i;
  }
}

void Store::index_put(uint64_t hash, uint32_t slot) {
  const size_t mask = index_.size() - 1;
  size_t i = hash & mask;
  while (index_[i].slot_plus1 != 0 && index_[i].hash != hash) i = (i + 1) & mask;
  if (index_[i].slot_plus1 == 0) ++index_size_;
  index_[i] = IndexEntry{hash, slot + 1};
}

// Linear-probing delete by backward shift: no tombstones to slow lookups down.
void Store::index_erase(size_t i) {
  const size_t mask = index_.size() - 1;
  for (size_t j = i;;) {
    j = (j + 1) & mask;
    if (index_[j].slot_plus1 == 0) break;
    size_t home = index_[j].hash & mask;
    bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
    if (stays) continue;
    index_[i] = index_[j];
    i = j;
  }
  index_[i] = IndexEntry{};
  --index_size_;
}

void Store::remember(uint64_t hash, const std::string& key, int64_t expires_at, int64_t now, bool recorded) {
  if (size_t pos = index_find(hash); pos != kNotFound && ring_[index_[pos].slot_plus1 - 1].key == key) {
    Slot& s = ring_[index_[pos].slot_plus1 - 1];
    s.expires_at = expires_at;
    if (recorded) {
      s.in_recent = true;
      s.merge_epoch = merges_[slice_of(hash)];
    }
    return;
  }
  Slot& s = ring_[next_slot_];
  if (s.used) {
    // Its row may still be only in dedupe_recent, which lookups do not search.
    if (s.in_recent && merges_[slice_of(s.hash)] == s.merge_epoch) {
      merge_slice(slice_of(s.hash));
      ++stats_.forced_merges;
    }
    // After a hash collision the index may point at a newer slot: leave that one.
    if (size_t pos = index_find(s.hash); pos != kNotFound && index_[pos].slot_plus1 - 1 == next_slot_)
      index_erase(pos);
    // Evicting a live id: from now on a RAM miss must ask SQLite.
    if (s.expires_at > now) db_has_uncached_ = true;
  }
  s.key.assign(key);  // reuses the slot's buffer
  s.hash = hash;
  s.expires_at = expires_at;
  s.used = true;
  s.in_recent = recorded;
  s.merge_epoch = merges_[slice_of(hash)];
  index_put(hash, static_cast<uint32_t>(next_slot_));
  if (++next_slot_ == ring_.size()) next_slot_ = 0;
}

bool Store::seen(std::string_view queue, std::string_view event_id) {
  const int64_t now = now_s();
  const std::string& key = make_key(queue, event_id);
  const uint64_t hash = key_hash(key);
  const size_t pos = index_find(hash);
  if (pos != kNotFound && ring_[index_[pos].slot_plus1 - 1].key == key) {
    ++stats_.memory_hits;
    return ring_[index_[pos].slot_plus1 - 1].expires_at > now;
  }
  // A hash match with another key is a 64-bit collision: ask SQLite (which
  // misses the id only if it is also unmerged: a re-run, not a lost event).
  if (pos == kNotFound && !db_has_uncached_) {
    ++stats_.memory_hits;
    return false;
  }
  if (!bloom_may_contain(hash)) {
    ++stats_.bloom_negatives;
    return false;
  }
  ++stats_.db_lookups;
  int64_t expires_at = 0;
  {
    ResetGuard g{st_select_};
    sqlite3_bind_int64(st_select_, 1, static_cast<sqlite3_int64>(hash));
    sqlite3_bind_text(st_select_, 2, queue.data(), static_cast<int>(queue.size()), SQLITE_STATIC);
    sqlite3_bind_text(st_select_, 3, event_id.data(), static_cast<int>(event_id.size()), SQLITE_STATIC);
    int rc = sqlite3_step(st_select_);
    if (rc != SQLITE_ROW) {
      std::string err = sqlite3_errmsg(db_);
      sqlite3_reset(st_select_);
      fail(err);
    }
    if (sqlite3_column_type(st_select_, 0) != SQLITE_NULL) expires_at = sqlite3_column_int64(st_select_, 0);
  }
  if (expires_at <= now) return false;
  remember(hash, key, expires_at, now, false);  // a redelivery often comes more than once
  return true;
}

void Store::record(std::string_view queue, std::string_view event_id, std::chrono::seconds ttl) {
  if (ttl.count() <= 0) return;
  const int64_t now = now_s();
  const int64_t expires_at = now + ttl.count();
  const std::string& key = make_key(queue, event_id);
  const uint64_t hash = key_hash(key);
  begin();
  sqlite3_bind_int64(st_insert_, 1, static_cast<sqlite3_int64>(hash));
  sqlite3_bind_text(st_insert_, 2, queue.data(), static_cast<int>(queue.size()), SQLITE_STATIC);
  sqlite3_bind_text(st_insert_, 3, event_id.data(), static_cast<int>(event_id.size()), SQLITE_STATIC);
  sqlite3_bind_int64(st_insert_, 4, expires_at);
  sqlite3_bind_int(st_insert_, 5, static_cast<int>(slice_of(hash)));
  sqlite3_bind_int64(st_insert_, 6, ++recent_seq_);
  step_done(st_insert_);
  ++pending_;
  bloom_add(hash);
  remember(hash, key, expires_at, now, true);
  if (interval_.count() == 0 || pending_ >= kMaxBatch) commit_batch();
}

void Store::merge_slice(unsigned slice) {
  begin();
  sqlite3_bind_int(st_merge_ins_, 1, static_cast<int>(slice));
  step_done(st_merge_ins_);
  sqlite3_bind_int(st_merge_del_, 1, static_cast<int>(slice));
  step_done(st_merge_del_);
  ++merges_[slice];
}

void Store::commit_batch() {
  merge_slice(next_merge_);
  next_merge_ = (next_merge_ + 1) % kSlices;
  commit();
}

size_t Store::flush(bool force) {
  if (!in_txn_) return 0;
  if (!force && std::chrono::steady_clock::now() - txn_started_ < interval_) return 0;
  size_t n = pending_;
  commit_batch();
  return n;
}

size_t Store::prune(size_t limit) {
  if (limit == 0) return 0;
  if (limit > static_cast<size_t>(INT_MAX)) limit = INT_MAX;
  const int64_t now = now_s();
  begin();
  sqlite3_bind_int64(st_prune_, 1, now);
  sqlite3_bind_int64(st_prune_, 2, static_cast<sqlite3_int64>(limit));
  step_done(st_prune_);
  size_t n = static_cast<size_t>(sqlite3_changes(db_));
  // Unbounded, but the table holds only the last ~kSlices commits.
  sqlite3_bind_int64(st_prune_recent_, 1, now);
  step_done(st_prune_recent_);
  n += static_cast<size_t>(sqlite3_changes(db_));
  commit();  // keep the pass bounded: do not leave deletes in the next batch
  return n;
}

void Store::begin() {
  if (in_txn_) return;
  step_done(st_begin_);
  in_txn_ = true;
  txn_started_ = std::chrono::steady_clock::now();
}

void Store::commit() {
  if (!in_txn_) return;
  step_done(st_commit_);
  in_txn_ = false;
  pending_ = 0;
  ++stats_.commits;
}

void Store::exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : sqlite3_errmsg(db_);
    sqlite3_free(err);
    fail(msg);
  }
}

sqlite3_stmt* Store::prepare(const char* sql) {
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &st, nullptr) != SQLITE_OK) fail();
  return st;
}

void Store::step_done(sqlite3_stmt* st) {
  int rc = sqlite3_step(st);
  if (rc == SQLITE_DONE || rc == SQLITE_ROW) {
    sqlite3_reset(st);
    return;
  }
  std::string err = sqlite3_errmsg(db_);
  sqlite3_reset(st);
  fail(err);
}

void Store::fail(const std::string& what) {
  std::string msg = what.empty() && db_ ? sqlite3_errmsg(db_) : what;
  if (db_ && in_txn_ && sqlite3_get_autocommit(db_)) {
    // SQLite rolled the transaction back (e.g. disk full): those records are gone.
    in_txn_ = false;
    pending_ = 0;
  }
  throw std::runtime_error(path_ + ": " + msg);
}

void Store::check(std::string_view queue, std::string_view event_id, Done done) {
  Check c;
  try {
    c = seen(queue, event_id) ? Check::Seen : Check::New;
  } catch (const std::exception& e) {
    log::error("dedupe store lookup failed", {{"error", e.what()}});
    c = Check::Unavailable;
  }
  done(c);
}

// The caller's timer (~100 ms): commit the batch, prune every ~10 s.
void Store::tick() {
  flush();
  if (++ticks_ % 100 == 0) prune();
}

void Store::close() { flush(true); }

}  // namespace er::dedupe
