#include "settle/signer.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>

#include <stdexcept>

namespace er::settle {

namespace {
void put_u32(std::string& m, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) m.push_back(static_cast<char>((v >> shift) & 0xff));
}
void put_field(std::string& m, std::string_view s) {
  put_u32(m, static_cast<uint32_t>(s.size()));  // length-prefixed: no two field lists give the same M
  m.append(s.data(), s.size());
}
int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;  // only lowercase: one spelling per signature
}
constexpr char kPrefix[] = "v1.";
}  // namespace

CopySigner::CopySigner(std::string key) : key_(std::move(key)) {
  if (key_.size() < kMinKeyBytes)
    throw std::invalid_argument("copy key is " + std::to_string(key_.size()) + " bytes; at least " +
                                std::to_string(kMinKeyBytes) + " are needed");
}

std::array<unsigned char, 32> CopySigner::mac(const SignedFields& f, std::string_view body) const {
  std::string m;
  m.reserve(2 + 4 + 16 + f.original_exchange.size() + f.original_routing_key.size() + f.original_queue.size() +
            f.first_failed_at.size() + SHA256_DIGEST_LENGTH);
  m.push_back('\x01');
  m.push_back(static_cast<char>(f.kind));
  put_u32(m, f.attempt);
  put_field(m, f.original_exchange);
  put_field(m, f.original_routing_key);
  put_field(m, f.original_queue);
  put_field(m, f.first_failed_at);
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(body.data()), body.size(), digest);
  m.append(reinterpret_cast<const char*>(digest), sizeof digest);

  std::array<unsigned char, 32> out{};
  unsigned int len = 0;
  if (!HMAC(EVP_sha256(), key_.data(), static_cast<int>(key_.size()), reinterpret_cast<const unsigned char*>(m.data()),
            m.size(), out.data(), &len) ||
      len != out.size())
    throw std::runtime_error("HMAC-SHA256 failed");
  return out;
}

std::string CopySigner::sign(const SignedFields& f, std::string_view body) const {
  static constexpr char kHex[] = "0123456789abcdef";
  auto m = mac(f, body);
  std::string s(kPrefix);
  for (unsigned char b : m) {
    s.push_back(kHex[b >> 4]);
    s.push_back(kHex[b & 15]);
  }
  return s;
}

bool CopySigner::verify(const SignedFields& f, std::string_view body, std::string_view signature) const {
  if (signature.size() != kSignatureChars || signature.substr(0, 3) != kPrefix) return false;
  unsigned char given[32];
  for (size_t i = 0; i < sizeof given; ++i) {
    int hi = hex_digit(signature[3 + 2 * i]), lo = hex_digit(signature[4 + 2 * i]);
    if (hi < 0 || lo < 0) return false;
    given[i] = static_cast<unsigned char>(hi << 4 | lo);
  }
  auto expected = mac(f, body);
  return CRYPTO_memcmp(given, expected.data(), expected.size()) == 0;
}

}  // namespace er::settle
