#pragma once
// Where the key of settle::CopySigner comes from.
#include <string>

namespace er::config {
struct Config;
}

namespace er::settle {

// The key from `security:` (copy_key_file / copy_key_env, already read by the
// config loader), else state_dir/copy.key: read when it exists (32..4096
// bytes, a regular file readable by its owner only), else created once with
// 32 random bytes from getrandom(), mode 0600, atomically (written to a
// temporary file, then link()ed into place, so a concurrent start never sees
// half a key and both end up with the same one). Creates state_dir if needed.
//
// That generated key is per state_dir: instances that consume the same queues
// must share one key through security.copy_key_file or copy_key_env, or they
// will not believe each other's retry copies (those then count as attempt 1).
//
// Throws std::runtime_error naming the file and the reason.
std::string load_or_create_copy_key(const config::Config& cfg);

}  // namespace er::settle
