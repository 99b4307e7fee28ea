#include <catch2/catch.hpp>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

#include "config/config.hpp"
#include "settle/copy_key.hpp"

namespace fs = std::filesystem;
using er::settle::load_or_create_copy_key;

namespace {

struct TempState {
  std::string path;
  TempState() {
    char tmpl[] = "/tmp/er-copy-key-test-XXXXXX";
    REQUIRE(mkdtemp(tmpl) != nullptr);
    path = tmpl;
  }
  ~TempState() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::string slurp(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string error_of(const er::config::Config& c) {
  try {
    load_or_create_copy_key(c);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST_CASE("copy key: a configured key wins, state_dir is not touched", "[settle][copy_key]") {
  TempState t;
  er::config::Config c;
  c.state_dir = t.path + "/state";
  c.security.copy_key = std::string(40, 'c');
  CHECK(load_or_create_copy_key(c) == std::string(40, 'c'));
  CHECK_FALSE(fs::exists(c.state_dir));
}

TEST_CASE("copy key: created once in state_dir, 32 random bytes, mode 0600, then reused", "[settle][copy_key]") {
  TempState t;
  er::config::Config c;
  c.state_dir = t.path + "/nested/state";  // created when missing
  std::string key = load_or_create_copy_key(c);
  REQUIRE(key.size() == 32);
  std::string file = c.state_dir + "/copy.key";
  CHECK(slurp(file) == key);
  struct stat st;
  REQUIRE(::stat(file.c_str(), &st) == 0);
  CHECK((st.st_mode & 07777) == 0600);
  CHECK(load_or_create_copy_key(c) == key);  // a restart keeps the key
  // No temporary file left behind.
  size_t files = 0;
  for (auto& e : fs::directory_iterator(c.state_dir)) (void)e, ++files;
  CHECK(files == 1);

  TempState other;
  er::config::Config c2;
  c2.state_dir = other.path;
  CHECK(load_or_create_copy_key(c2) != key);  // random, not derived from anything
}

TEST_CASE("copy key: concurrent first starts end up with the same key", "[settle][copy_key]") {
  TempState t;
  er::config::Config c;
  c.state_dir = t.path;
  constexpr int kProcs = 8;
  pid_t pids[kProcs];
  for (int i = 0; i < kProcs; ++i) {
    pids[i] = fork();
    REQUIRE(pids[i] >= 0);
    if (pids[i] == 0) {
      std::string k;
      try {
        k = load_or_create_copy_key(c);
      } catch (...) {
        _exit(2);
      }
      std::ofstream(t.path + "/seen." + std::to_string(i), std::ios::binary) << k;
      _exit(0);
    }
  }
  for (pid_t p : pids) {
    int status = 0;
    REQUIRE(waitpid(p, &status, 0) == p);
    CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  }
  std::string key = slurp(t.path + "/copy.key");
  REQUIRE(key.size() == 32);
  for (int i = 0; i < kProcs; ++i) CHECK(slurp(t.path + "/seen." + std::to_string(i)) == key);
}

TEST_CASE("copy key: a bad key file is refused with a clear message", "[settle][copy_key]") {
  TempState t;
  er::config::Config c;
  c.state_dir = t.path;
  std::string file = t.path + "/copy.key";

  std::ofstream(file, std::ios::binary) << std::string(20, 's');
  ::chmod(file.c_str(), 0600);
  CHECK(error_of(c) == "copy key " + file + ": is 20 bytes, at least 32 are needed (delete it for a new key)");

  std::ofstream(file, std::ios::binary) << std::string(32, 'k');
  ::chmod(file.c_str(), 0644);
  CHECK(error_of(c) == "copy key " + file +
                           ": mode 0644 lets others read or write it (chmod 600 it, or delete it for a new key)");

  fs::remove(file);
  fs::create_directory(file);
  CHECK(error_of(c) == "copy key " + file + ": not a regular file");

  fs::remove(file);
  fs::create_symlink("/etc/hostname", file);  // never followed: the key is ours, in our directory
  CHECK(error_of(c) == "copy key " + file + ": cannot open: Too many levels of symbolic links");

  er::config::Config empty;
  empty.state_dir.clear();
  CHECK(error_of(empty) == "copy key: state_dir is empty");

  // state_dir under a regular file: cannot be created.
  std::ofstream(t.path + "/plain") << "x";
  er::config::Config blocked;
  blocked.state_dir = t.path + "/plain/state";
  CHECK(error_of(blocked).rfind("copy key " + blocked.state_dir + "/copy.key: cannot open: Not a directory", 0) == 0);
}
