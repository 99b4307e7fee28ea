#include <catch2/catch.hpp>

#include <cctype>
#include <stdexcept>
#include <string>

#include "settle/signer.hpp"

using namespace er::settle;

namespace {
const std::string kKey(32, 'k');
const std::string kOtherKey(32, 'o');
}  // namespace

TEST_CASE("signer: key length, signature format, field boundaries", "[settle][signer]") {
  CHECK_THROWS_AS(CopySigner(std::string(31, 'k')), std::invalid_argument);
  CopySigner s(kKey);
  SignedFields f;
  f.kind = CopyKind::Retry;
  f.attempt = 2;
  f.original_exchange = "ab";
  f.original_routing_key = "c";
  std::string sig = s.sign(f, "body");
  REQUIRE(sig.size() == CopySigner::kSignatureChars);
  CHECK(sig.substr(0, 3) == "v1.");
  CHECK(sig.find_first_not_of("0123456789abcdef", 3) == std::string::npos);
  CHECK(s.verify(f, "body", sig));
  CHECK(sig == CopySigner(kKey).sign(f, "body"));  // deterministic: any instance with the key verifies

  SignedFields moved = f;  // same bytes, other boundary: length prefixes tell them apart
  moved.original_exchange = "a";
  moved.original_routing_key = "bc";
  CHECK_FALSE(s.verify(moved, "body", sig));
  SignedFields other_kind = f;
  other_kind.kind = CopyKind::DeadLetter;
  CHECK_FALSE(s.verify(other_kind, "body", sig));
  SignedFields other_attempt = f;
  other_attempt.attempt = 3;
  CHECK_FALSE(s.verify(other_attempt, "body", sig));
  CHECK_FALSE(s.verify(f, "body!", sig));
  CHECK_FALSE(CopySigner(kOtherKey).verify(f, "body", sig));

  std::string upper = sig;
  for (auto& ch : upper) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  CHECK_FALSE(s.verify(f, "body", upper));
  CHECK_FALSE(s.verify(f, "body", sig.substr(0, sig.size() - 1)));
  CHECK_FALSE(s.verify(f, "body", sig + "0"));
  CHECK_FALSE(s.verify(f, "body", ""));
  std::string flipped = sig;
  flipped.back() = flipped.back() == '0' ? '1' : '0';
  CHECK_FALSE(s.verify(f, "body", flipped));
}
