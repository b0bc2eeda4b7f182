// code_lut.h — per-code-map tables that make the exact nearest-code search cheap in SIMD.
//
// Note [8-bit code search]
// The code of a scaled value s is the number of midpoints of the sorted 256-entry map that are strictly
// below s (the reference: a binary search, scalar_ops.h nearest_code_index). The SIMD kernels get the
// same answer faster: the top 16 bits of s's order-preserving integer key select a bin; `bin_count[bin]`
// is the number of midpoints below the bin's lowest float, so the answer is bin_count plus the number of
// midpoints inside the bin below s. No bin of a well-spread map (the dynamic maps, linear, fp8) holds
// more than `max_in_bin` midpoints, so `max_in_bin` compare-and-step rounds finish the search exactly.
// Each bin is one 64-bit entry: bin_count in the low word and mids[bin_count], the first midpoint the
// search compares with, in the high word. One 64-bit gather fetches both (half the loads of two 32-bit
// gathers, and no gather waits for another).
// Maps with many equal entries (max_in_bin > kMaxLutSteps) use a vector binary search instead.
#pragma once

#include <cstdint>
#include <memory>

namespace kbit {

inline constexpr int kLutBins = 1 << 16;
inline constexpr int kMaxLutSteps = 3;

struct CodeLut {
  float code[256];
  float mids[256];  // 255 midpoints (code[i] + code[i+1]) / 2 in float32, then +inf as a sentinel
  uint64_t bins[kLutBins];  // (float bits of mids[count]) << 32 | count
  int max_in_bin;
};

namespace {  // Note [one definition per ISA]
// Order-preserving map from float bits to uint32 (negative floats reversed), top 16 bits.
inline uint32_t order_key16(uint32_t bits) {
  const uint32_t key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return key >> 16;
}
}  // namespace

// Returns the (cached) table for a sorted 256-entry code. Thread-safe; a small LRU cache keyed by the
// code's contents, so optimizers that quantize with the same map every step build it once.
std::shared_ptr<const CodeLut> get_code_lut(const float* code);

}  // namespace kbit
