// code_lut.h — per-code-map tables that make the exact nearest-code search cheap in SIMD.
//
// Note [8-bit code search]
// The code of a scaled value s is the number of midpoints of the sorted 256-entry map that are strictly
// below s (the reference: a binary search, scalar_ops.h nearest_code_index). The SIMD kernels get the
// same answer faster: the top 16 bits of s's order-preserving integer key select a bin; `bin_count[bin]`
// is the number of midpoints below the bin's lowest float, so the answer is bin_count plus the number of
// midpoints inside the bin below s. No bin of a well-spread map (the dynamic maps, linear, fp8) holds
// more than `max_in_bin` midpoints, so `max_in_bin` compare-and-step rounds finish the search exactly.
// Each bin is one 32-bit entry that makes the first round two integer operations. Let m be the low 16 key
// bits of mids[bin_count] when that midpoint lies inside the bin, else 0xffff. Inside one bin all keys
// share their top 16 bits (and their sign, so -0 and +0 never meet) and the key order is the float order,
// so s > mids[bin_count] exactly when s's low key bits exceed m, and never when m = 0xffff. The entry is
// ((bin_count - bin) << 16) + (0xffff - m), modulo 2^32: adding s's whole key (bin << 16 | low) gives
// (bin_count << 16) + 0xffff - m + low, whose top half is bin_count plus the carry "low > m". So the first
// round is one 16-lane 32-bit gather, an add and a shift; later rounds gather the midpoints themselves.
// Maps with many equal entries (max_in_bin > kMaxLutSteps) use a vector binary search instead.
#pragma once

#include <cstdint>
#include <memory>

#include "byte_planes.h"

namespace kbit {

inline constexpr int kLutBins = 1 << 16;
inline constexpr int kMaxLutSteps = 3;

struct CodeLut {
  float code[256];
  float mids[256];  // 255 midpoints (code[i] + code[i+1]) / 2 in float32, then +inf as a sentinel
  uint32_t bins[kLutBins];  // Note [8-bit code search]: ((count - bin) << 16) + (0xffff - in-bin midpoint's low key)
  // Values beyond [-1, 1] get the codes of -1 and 1 without clamping: no midpoint below -1, none at or
  // above 1. (x * block_reciprocal(absmax) can exceed 1 by a few ulps when the reciprocal is subnormal.)
  bool clamp_free;
  int max_in_bin;
  BytePlanes planes;  // Note [gather-free lookups]: for the AVX-512 VBMI kernels
};

namespace {  // Note [one definition per ISA]
// Order-preserving map from float bits to uint32 (negative floats reversed), and its top 16 bits.
inline uint32_t order_key(uint32_t bits) { return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u); }
inline uint32_t order_key16(uint32_t bits) { return order_key(bits) >> 16; }
}  // namespace

// Returns the (cached) table for a sorted 256-entry code. Thread-safe; a small LRU cache keyed by the
// code's contents, so optimizers that quantize with the same map every step build it once.
std::shared_ptr<const CodeLut> get_code_lut(const float* code);

}  // namespace kbit
