#pragma once
// Signs the bookkeeping the daemon writes on its own copies (retry and
// dead-letter), so that a publisher cannot forge an attempt count or an
// "original" routing: read_history() believes those headers only when the
// x-er-sig header verifies.
//
// x-er-sig = "v1." + hex(HMAC-SHA256(key, M)), where M is
//   0x01                       version
//   'R' | 'D'                  retry copy | dead-letter copy (one cannot pose as the other)
//   u32 big-endian             attempt: x-attempt (retry) or x-attempts (dead-letter)
//   u32 length + bytes         x-original-exchange
//   u32 length + bytes         x-original-routing-key
//   u32 length + bytes         x-original-queue
//   u32 length + bytes         x-first-failed-at
//   32 bytes                   SHA-256 of the body (the signature cannot move to another message)
//
// Several instances consuming the same queues must share one key (security:
// copy_key_file or copy_key_env): a copy signed by one instance is read by
// another. The generated state_dir/copy.key is per instance.
#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace er::settle {

enum class CopyKind : char { Retry = 'R', DeadLetter = 'D' };

// What the signature covers, besides the body.
struct SignedFields {
  CopyKind kind = CopyKind::Retry;
  uint32_t attempt = 1;
  std::string_view original_exchange;
  std::string_view original_routing_key;
  std::string_view original_queue;
  std::string_view first_failed_at;
};

class CopySigner {
 public:
  static constexpr size_t kMinKeyBytes = 32;
  static constexpr size_t kSignatureChars = 3 + 64;  // "v1." + 64 hex digits

  // Throws std::invalid_argument when the key is shorter than kMinKeyBytes.
  explicit CopySigner(std::string key);

  // The x-er-sig value for these fields and this body.
  std::string sign(const SignedFields& f, std::string_view body) const;
  // Constant-time comparison (CRYPTO_memcmp); false for any malformed value.
  bool verify(const SignedFields& f, std::string_view body, std::string_view signature) const;

 private:
  std::array<unsigned char, 32> mac(const SignedFields& f, std::string_view body) const;
  std::string key_;
};

}  // namespace er::settle
