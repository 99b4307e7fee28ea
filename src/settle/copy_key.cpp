#include "settle/copy_key.hpp"

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <stdexcept>

#include "config/config.hpp"
#include "settle/signer.hpp"

namespace er::settle {

namespace {

constexpr size_t kNewKeyBytes = 32;
constexpr size_t kMaxKeyBytes = 4096;

[[noreturn]] void fail(const std::string& path, const std::string& what, int err = 0) {
  std::string msg = "copy key " + path + ": " + what;
  if (err) msg += std::string(": ") + std::strerror(err);
  throw std::runtime_error(msg);
}

// Closes the descriptor on every path out.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// The existing key file; false when there is none.
bool read_key(const std::string& path, std::string& key) {
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)};
  if (f.fd < 0) {
    if (errno == ENOENT) return false;
    fail(path, "cannot open", errno);
  }
  struct stat st;
  if (::fstat(f.fd, &st) != 0) fail(path, "cannot stat", errno);
  if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
  // A key others can read is no secret, and one they can write is no key of ours.
  if (st.st_mode & 077) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    fail(path, std::string("mode ") + mode + " lets others read or write it (chmod 600 it, or delete it for a new key)");
  }
  char buf[kMaxKeyBytes + 1];
  size_t n = 0;
  while (n < sizeof buf) {
    ssize_t r = ::read(f.fd, buf + n, sizeof buf - n);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail(path, "cannot read", errno);
    if (r == 0) break;
    n += static_cast<size_t>(r);
  }
  if (n < CopySigner::kMinKeyBytes)
    fail(path, "is " + std::to_string(n) + " bytes, at least " + std::to_string(CopySigner::kMinKeyBytes) +
                   " are needed (delete it for a new key)");
  if (n > kMaxKeyBytes) fail(path, "is larger than " + std::to_string(kMaxKeyBytes) + " bytes: not a key file");
  key.assign(buf, n);
  return true;
}

std::string random_bytes(const std::string& path, size_t n) {
  std::string out(n, '\0');
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::getrandom(out.data() + got, n - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail(path, "getrandom failed", errno);
    got += static_cast<size_t>(r);
  }
  return out;
}

void write_all(const std::string& path, int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t w = ::write(fd, data.data() + done, data.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) fail(path, "cannot write", errno);
    done += static_cast<size_t>(w);
  }
}

}  // namespace

std::string load_or_create_copy_key(const config::Config& cfg) {
  if (!cfg.security.copy_key.empty()) return cfg.security.copy_key;
  if (cfg.state_dir.empty()) throw std::runtime_error("copy key: state_dir is empty");
  const std::string path = cfg.state_dir + "/copy.key";
  std::string key;
  if (read_key(path, key)) return key;

  std::error_code ec;
  std::filesystem::create_directories(cfg.state_dir, ec);
  if (ec) fail(path, "cannot create " + cfg.state_dir + ": " + ec.message());
  std::string tmp = cfg.state_dir + "/.copy.key.XXXXXX";
  Fd f{::mkstemp(tmp.data())};  // mode 0600
  if (f.fd < 0) fail(path, "cannot create a file in " + cfg.state_dir, errno);
  struct Unlink {  // the temporary name never outlives this call
    const std::string& p;
    ~Unlink() { ::unlink(p.c_str()); }
  } unlink_tmp{tmp};
  key = random_bytes(path, kNewKeyBytes);
  write_all(path, f.fd, key);
  if (::fsync(f.fd) != 0) fail(path, "cannot sync", errno);
  // link() never replaces: if another instance got there first, its key wins.
  if (::link(tmp.c_str(), path.c_str()) != 0) {
    if (errno != EEXIST) fail(path, "cannot create", errno);
    if (!read_key(path, key)) fail(path, "vanished while being created");
    return key;
  }
  Fd dir{::open(cfg.state_dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (dir.fd >= 0) ::fsync(dir.fd);  // the new name survives a crash
  return key;
}

}  // namespace er::settle
