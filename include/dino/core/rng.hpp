// dino/core/rng.hpp: Philox4x32-10, a counter-based generator for host and device.
//
// philox4x32_10(counter, key) maps a 128-bit counter and a 64-bit key to 128 random bits
// (Salmon et al., SC'11; the Random123 and cuRAND generator). Streams are addressed, not
// advanced: a draw is identified by (seed, subsequence, offset), so the same seed gives the
// same numbers whatever the thread count and on CPU and GPU alike. DINO keys its streams by
// (seed, purpose/step/sample) packed into the 64-bit subsequence.
#pragma once

#include <cmath>
#include <cstdint>

#include "dino/config.hpp"

namespace dino {

struct philox_u32x4 {
  std::uint32_t v[4];
};

DINO_INLINE std::uint32_t philox_mulhilo(std::uint32_t a, std::uint32_t b, std::uint32_t& hi) {
  std::uint64_t p = static_cast<std::uint64_t>(a) * b;
  hi = static_cast<std::uint32_t>(p >> 32);
  return static_cast<std::uint32_t>(p);
}

/// The Philox4x32 bijection with 10 rounds.
DINO_INLINE philox_u32x4 philox4x32_10(philox_u32x4 c, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr std::uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += W0;
      k1 += W1;
    }
    std::uint32_t hi0, hi1;
    std::uint32_t lo0 = philox_mulhilo(M0, c.v[0], hi0);
    std::uint32_t lo1 = philox_mulhilo(M1, c.v[2], hi1);
    c = philox_u32x4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
  }
  return c;
}

/// Maps 32 random bits to a float in (0, 1]: never 0, so log() is safe.
DINO_INLINE float u32_to_unit_float(std::uint32_t x) { return (static_cast<float>(x >> 8) + 1.0f) * (1.0f / 16777216.0f); }
/// Maps 64 random bits to a double in (0, 1].
DINO_INLINE double u64_to_unit_double(std::uint32_t a, std::uint32_t b) {
  std::uint64_t x = (static_cast<std::uint64_t>(a) << 21) ^ static_cast<std::uint64_t>(b);
  return (static_cast<double>(x & ((1ull << 53) - 1)) + 1.0) * (1.0 / 9007199254740992.0);
}

/// A stream of draws: key = seed, counter = (offset, subsequence). Cheap to copy.
class philox {
 public:
  DINO_HD philox(std::uint64_t seed, std::uint64_t subsequence = 0, std::uint64_t offset = 0)
      : k0_(static_cast<std::uint32_t>(seed)), k1_(static_cast<std::uint32_t>(seed >> 32)),
        sub_(subsequence), block_(offset / 4), lane_(static_cast<int>(offset % 4)) {}

  /// The next 32 random bits.
  DINO_HD std::uint32_t next_u32() {
    if (!valid_) {
      cur_ = philox4x32_10(philox_u32x4{{static_cast<std::uint32_t>(block_), static_cast<std::uint32_t>(block_ >> 32),
                                         static_cast<std::uint32_t>(sub_), static_cast<std::uint32_t>(sub_ >> 32)}},
                           k0_, k1_);
      valid_ = true;
    }
    std::uint32_t r = cur_.v[lane_];
    if (++lane_ == 4) {
      lane_ = 0;
      ++block_;
      valid_ = false;
    }
    return r;
  }
  /// Uniform in (0, 1].
  DINO_HD float uniform() { return u32_to_unit_float(next_u32()); }
  /// Uniform in (0, 1] with 53 bits.
  DINO_HD double uniform_double() {
    std::uint32_t a = next_u32();
    return u64_to_unit_double(a, next_u32());
  }
  /// Uniform in [lo, hi).
  DINO_HD double uniform(double lo, double hi) { return hi - (hi - lo) * uniform_double(); }
  /// Standard normal (Box-Muller on two double draws).
  DINO_HD double normal() {
    double u1 = uniform_double(), u2 = uniform_double();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586476925 * u2);
  }
  /// Position of the next draw within the subsequence (for checkpointing a stream).
  DINO_HD std::uint64_t offset() const { return block_ * 4 + static_cast<std::uint64_t>(lane_); }

 private:
  std::uint32_t k0_, k1_;
  std::uint64_t sub_;
  std::uint64_t block_;
  int lane_;
  philox_u32x4 cur_{};
  bool valid_ = false;
};

/// Packs a purpose tag (8 bits), an index a (32 bits, e.g. the step) and an index b (24 bits,
/// e.g. the sample) into a 64-bit subsequence.
DINO_INLINE std::uint64_t rng_subsequence(std::uint32_t purpose, std::uint32_t a, std::uint32_t b = 0) {
  return (static_cast<std::uint64_t>(purpose) << 56) ^ (static_cast<std::uint64_t>(a) << 24) ^ b;
}

}  // namespace dino
