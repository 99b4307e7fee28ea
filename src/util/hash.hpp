#pragma once
// Hash helpers shared by the dedupe store and the crash guard.
#include <cstdint>

namespace er::util {

// murmur3's 64-bit finaliser: every input bit reaches every output bit.
// The dedupe store's file depends on it: it must never change.
inline uint64_t mix64(uint64_t h) {
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdULL;
  h ^= h >> 33;
  h *= 0xc4ceb9fe1a85ec53ULL;
  h ^= h >> 33;
  return h;
}

}  // namespace er::util
