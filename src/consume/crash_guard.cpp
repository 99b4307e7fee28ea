#include "consume/crash_guard.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "util/hash.hpp"
#include "util/log.hpp"

namespace er::consume {

struct CrashGuard::Header {
  char magic[8];
  uint32_t version;
  uint32_t clean;     // 1: the run that wrote it ended cleanly
  uint64_t seed;      // keys the event hashes (and so crash_counts)
  int32_t culprit;    // slot a fatal signal blamed, -1: none
  int32_t signal;     // that signal
  uint32_t slots;
  uint32_t reserved[7];
};
static_assert(sizeof(CrashGuard::Header) == 64, "journal header layout");

enum SlotState : uint32_t { kFree = 0, kActive = 1, kIdle = 2 };

struct CrashGuard::Slot {
  uint64_t key;
  uint32_t state;
  uint32_t id_len;
  char id[kIdBytes];
};
static_assert(sizeof(CrashGuard::Slot) == 64, "journal slot layout");

namespace {

constexpr char kMagic[8] = {'E', 'R', 'C', 'R', 'A', 'S', 'H', '1'};
constexpr uint32_t kVersion = 1;
constexpr size_t kMaxSlots = 1u << 20;
constexpr size_t kMaxCounts = 10000;  // newest kept: a flood of crashes cannot grow the file
constexpr int kFatal[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};

thread_local int32_t tl_slot = -1;
CrashGuard::Header* g_header = nullptr;  // set while handlers are installed
struct sigaction g_old[NSIG];

std::runtime_error sys_error(const std::string& path, const std::string& what, int err) {
  return std::runtime_error(path + ": " + what + ": " + std::strerror(err));
}

constexpr uint64_t kK1 = 0x9e3779b97f4a7c15ULL, kK2 = 0xbf58476d1ce4e5b9ULL;

uint64_t round64(uint64_t h, uint64_t w) {
  h ^= w * kK2;
  return (h << 29 | h >> 35) * kK1;
}

uint64_t word(const char* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// Four independent lanes over 32-byte blocks, so the multiplies overlap:
// a few GB/s, tens of ns for a typical event. Not cryptographic; keyed by a
// seed of the journal's own.
uint64_t hash_bytes(uint64_t seed, const char* p, size_t n) {
  const uint64_t len = n;
  uint64_t a = seed, b = seed ^ kK1, c = seed ^ kK2, d = seed + kK1;
  for (; n >= 32; p += 32, n -= 32) {
    a = round64(a, word(p));
    b = round64(b, word(p + 8));
    c = round64(c, word(p + 16));
    d = round64(d, word(p + 24));
  }
  uint64_t h = a ^ (b << 17 | b >> 47) ^ (c << 31 | c >> 33) ^ (d << 47 | d >> 17);
  for (; n >= 8; p += 8, n -= 8) h = round64(h, word(p));
  uint64_t w = 0;
  if (n) std::memcpy(&w, p, n);  // an empty body: p may be null
  return util::mix64(round64(h, w) ^ len);
}

std::string hex(std::string_view s) {
  static const char* d = "0123456789abcdef";
  std::string out;
  out.reserve(s.size() * 2);
  for (unsigned char c : s) {
    out.push_back(d[c >> 4]);
    out.push_back(d[c & 15]);
  }
  return out;
}

bool unhex(std::string_view s, std::string& out) {
  if (s.size() % 2) return false;
  out.clear();
  auto v = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; };
  for (size_t i = 0; i < s.size(); i += 2) {
    int a = v(s[i]), b = v(s[i + 1]);
    if (a < 0 || b < 0) return false;
    out.push_back(static_cast<char>(a * 16 + b));
  }
  return true;
}

void make_dir(const std::string& dir) {
  for (size_t pos = 1;; ++pos) {
    pos = dir.find('/', pos);
    std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0750) != 0 && errno != EEXIST) throw sys_error(dir, "cannot create", errno);
    if (pos == std::string::npos) break;
  }
}

// Blames the event of this thread's CrashMark, then lets the signal do what
// it did before (the default, or a sanitizer's report).
void on_fatal(int sig, siginfo_t* si, void*) {
  const int saved = errno;
  // A fault is the thread's own doing (si_code > 0); so is abort(), a
  // tgkill from this process. Another process's signal (an operator, the
  // watchdog) says nothing about this thread's event.
  const bool own = si->si_code > 0 || ((si->si_code == SI_TKILL || si->si_code == SI_USER) && si->si_pid == ::getpid());
  if (CrashGuard::Header* h = g_header; h && own && tl_slot >= 0) {
    int32_t none = -1;
    if (__atomic_compare_exchange_n(&h->culprit, &none, tl_slot, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
      __atomic_store_n(&h->signal, sig, __ATOMIC_SEQ_CST);
  }
  ::sigaction(sig, &g_old[sig], nullptr);
  // A fault happens again on return, now under the old action; a sent
  // signal is sent again (it stays pending until this handler returns).
  if (si->si_code <= 0) ::raise(sig);
  errno = saved;
}

}  // namespace

CrashMark::CrashMark(int32_t slot) noexcept : prev_(tl_slot) { tl_slot = slot; }
CrashMark::~CrashMark() { tl_slot = prev_; }

CrashGuard::CrashGuard(const std::string& dir, size_t slots, std::chrono::seconds ttl, Clock now)
    : dir_(dir),
      journal_path_(dir + "/inflight"),
      counts_path_(dir + "/crash_counts"),
      ttl_(ttl),
      clock_(std::move(now)) {
  if (dir.empty()) throw std::runtime_error("crash guard: state_dir is empty");
  slots = std::clamp<size_t>(slots, 1, kMaxSlots);
  make_dir(dir_);
  fd_ = ::open(journal_path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0640);
  if (fd_ < 0) throw sys_error(journal_path_, "cannot open", errno);
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    ::close(fd_);
    fd_ = -1;
    if (err == EWOULDBLOCK)
      throw InUse(journal_path_ + ": in use by another event-router instance (each instance needs its own state_dir)");
    throw sys_error(journal_path_, "cannot lock", err);
  }
  try {
    // What the previous run left.
    struct stat st;
    if (::fstat(fd_, &st) != 0) throw sys_error(journal_path_, "cannot stat", errno);
    Header old{};
    std::vector<Slot> old_slots;
    bool have_old = false;
    if (static_cast<size_t>(st.st_size) >= sizeof(Header) &&
        ::pread(fd_, &old, sizeof old, 0) == static_cast<ssize_t>(sizeof old) &&
        std::memcmp(old.magic, kMagic, sizeof kMagic) == 0 && old.version == kVersion) {
      have_old = true;
      size_t n = std::min<size_t>(old.slots, (static_cast<size_t>(st.st_size) - sizeof(Header)) / sizeof(Slot));
      old_slots.resize(n);
      if (n && ::pread(fd_, old_slots.data(), n * sizeof(Slot), sizeof(Header)) != static_cast<ssize_t>(n * sizeof(Slot)))
        throw sys_error(journal_path_, "cannot read", errno);
    }
    uint64_t seed = 0;
    if (have_old) {
      seed = old.seed;
    } else if (::getrandom(&seed, sizeof seed, 0) != static_cast<ssize_t>(sizeof seed)) {
      throw sys_error(journal_path_, "getrandom failed", errno);
    }
    seed_ = seed;
    if (have_old) load_counts(seed);
    const int64_t t = this->now();
    if (have_old && !old.clean) {
      prev_.unclean = true;
      std::vector<const Slot*> blamed;
      if (old.culprit >= 0 && static_cast<size_t>(old.culprit) < old_slots.size() &&
          old_slots[static_cast<size_t>(old.culprit)].state != kFree) {
        prev_.attributed = true;
        prev_.signal = old.signal;
        blamed.push_back(&old_slots[static_cast<size_t>(old.culprit)]);
      } else {
        for (const auto& s : old_slots)
          if (s.state == kActive) blamed.push_back(&s);
      }
      for (const Slot* s : blamed) {
        Entry& e = counts_[s->key];
        ++e.crashes;
        e.last = t;
        e.signal = prev_.signal;
        if (s->id_len) e.event_id.assign(s->id, std::min<size_t>(s->id_len, kIdBytes));
        prev_.counted.push_back(s->key);
      }
    }
    // Expired counts go; past kMaxCounts the oldest do.
    for (auto it = counts_.begin(); it != counts_.end();)
      it = it->second.last + ttl_.count() <= t ? counts_.erase(it) : std::next(it);
    if (counts_.size() > kMaxCounts) {
      std::vector<std::pair<int64_t, uint64_t>> by_age;
      for (const auto& [k, e] : counts_) by_age.emplace_back(e.last, k);
      std::sort(by_age.begin(), by_age.end());
      for (size_t i = 0; i + kMaxCounts < by_age.size(); ++i) counts_.erase(by_age[i].second);
    }
    // Saved before the journal is reset: a crash in between loses nothing.
    save_counts();
    map_journal(slots, seed);
  } catch (...) {
    if (map_) ::munmap(map_, map_len_);
    ::close(fd_);
    throw;
  }
}

CrashGuard::~CrashGuard() {
  if (handlers_installed_) {
    for (int sig : kFatal) ::sigaction(sig, &g_old[sig], nullptr);
    g_header = nullptr;
  }
  if (map_) ::munmap(map_, map_len_);
  if (fd_ >= 0) ::close(fd_);
}

int64_t CrashGuard::now() const {
  if (clock_) return clock_();
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// crash_counts: "er-crash-counts 1 <seed>", then per event
// "<key> <crashes> <last> <signal> <event id, hex>". Unreadable lines (or a
// file of another seed, whose keys mean nothing now) are dropped.
void CrashGuard::load_counts(uint64_t seed) {
  std::ifstream in(counts_path_);
  if (!in) return;
  std::string line;
  if (!std::getline(in, line)) return;
  std::istringstream head(line);
  std::string magic;
  unsigned version = 0;
  uint64_t file_seed = 0;
  if (!(head >> magic >> version >> std::hex >> file_seed) || magic != "er-crash-counts" || version != 1 ||
      file_seed != seed)
    return;
  while (std::getline(in, line) && counts_.size() < 2 * kMaxCounts) {
    std::istringstream ls(line);
    uint64_t key = 0;
    Entry e;
    std::string id_hex;
    if (!(ls >> std::hex >> key >> std::dec >> e.crashes >> e.last >> e.signal)) continue;
    if (ls >> id_hex && !unhex(id_hex, e.event_id)) e.event_id.clear();
    if (e.event_id.size() > kIdBytes) e.event_id.resize(kIdBytes);
    counts_[key] = std::move(e);
  }
}

void CrashGuard::save_counts() {
  if (counts_.empty() && ::access(counts_path_.c_str(), F_OK) != 0) return;
  std::ostringstream out;
  out << "er-crash-counts 1 " << std::hex << seed_ << "\n";
  for (const auto& [key, e] : counts_)
    out << std::hex << key << std::dec << ' ' << e.crashes << ' ' << e.last << ' ' << e.signal << ' '
        << hex(e.event_id) << "\n";
  const std::string data = out.str();
  const std::string tmp = counts_path_ + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
  if (fd < 0) throw sys_error(tmp, "cannot create", errno);
  size_t done = 0;
  while (done < data.size()) {
    ssize_t w = ::write(fd, data.data() + done, data.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      int err = errno;
      ::close(fd);
      throw sys_error(tmp, "cannot write", err);
    }
    done += static_cast<size_t>(w);
  }
  // Written once per start after a crash: worth an fsync, so a power loss
  // right after cannot cost the count.
  if (::fsync(fd) != 0 || ::close(fd) != 0) throw sys_error(tmp, "cannot write", errno);
  if (::rename(tmp.c_str(), counts_path_.c_str()) != 0) throw sys_error(counts_path_, "cannot replace", errno);
}

void CrashGuard::map_journal(size_t slots, uint64_t seed) {
  map_len_ = sizeof(Header) + slots * sizeof(Slot);
  if (::ftruncate(fd_, static_cast<off_t>(map_len_)) != 0) throw sys_error(journal_path_, "cannot size", errno);
  // Reserve the blocks now: a full disk fails here, not as a SIGBUS later.
  if (int err = ::posix_fallocate(fd_, 0, static_cast<off_t>(map_len_)); err != 0 && err != EOPNOTSUPP)
    throw sys_error(journal_path_, "cannot allocate", err);
  map_ = ::mmap(nullptr, map_len_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    throw sys_error(journal_path_, "cannot map", errno);
  }
  header_ = static_cast<Header*>(map_);
  slots_ = reinterpret_cast<Slot*>(static_cast<char*>(map_) + sizeof(Header));
  std::memset(map_, 0, map_len_);
  std::memcpy(header_->magic, kMagic, sizeof kMagic);
  header_->version = kVersion;
  header_->seed = seed;
  header_->culprit = -1;
  header_->slots = static_cast<uint32_t>(slots);
  header_->clean = 0;  // until mark_clean()
  free_.reserve(slots);
  for (size_t i = slots; i-- > 0;) free_.push_back(static_cast<int32_t>(i));
}

void CrashGuard::install_signal_handlers() {
  if (handlers_installed_) return;
  g_header = header_;
  struct sigaction sa {};
  sa.sa_sigaction = on_fatal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  for (int sig : kFatal) ::sigaction(sig, &sa, &g_old[sig]);
  handlers_installed_ = true;
}

uint64_t CrashGuard::key(std::string_view queue, std::string_view body) const {
  return hash_bytes(hash_bytes(seed_, queue.data(), queue.size()), body.data(), body.size());
}

int32_t CrashGuard::enter(uint64_t key) {
  if (free_.empty()) {
    if (!warned_full_)
      log::warn("crash guard: every journal slot is taken; events beyond it are not protected",
                {{"slots", std::to_string(header_->slots)}});
    warned_full_ = true;
    return -1;
  }
  int32_t i = free_.back();
  free_.pop_back();
  Slot& s = slots_[i];
  s.key = key;
  s.id_len = 0;
  s.state = kActive;
  return i;
}

void CrashGuard::set_id(int32_t slot, std::string_view event_id) {
  if (slot < 0) return;
  Slot& s = slots_[slot];
  s.id_len = static_cast<uint32_t>(std::min(event_id.size(), kIdBytes));
  std::memcpy(s.id, event_id.data(), s.id_len);
}

void CrashGuard::set_active(int32_t slot, bool active) {
  if (slot >= 0) slots_[slot].state = active ? kActive : kIdle;
}

void CrashGuard::leave(int32_t slot) {
  if (slot < 0) return;
  slots_[slot].state = kFree;
  free_.push_back(slot);
}

const CrashGuard::Entry* CrashGuard::find(uint64_t key) const {
  auto it = counts_.find(key);
  return it == counts_.end() ? nullptr : &it->second;
}

void CrashGuard::mark_clean() {
  if (header_) __atomic_store_n(&header_->clean, 1u, __ATOMIC_SEQ_CST);
}

}  // namespace er::consume
