// gemv4_common.h — the ISA-independent pieces of the 4-bit gemv: block scales and the lane bookkeeping
// that both the reference twin and the SIMD kernels use for the elements outside whole chunks.
#pragma once

#include <cmath>

#include "gemv_4bit.h"
#include "scalar_ops.h"

namespace kbit {
namespace {  // Note [one definition per ISA]

// Scale of block b (double quantization decoded on the fly: one byte and a multiply per block).
inline float block_absmax_of(const Gemv4bitArgs& a, int64_t b) {
  if (a.absmax != nullptr) return a.absmax[b];
  return a.absmax_code[a.absmax_q[b]] * a.absmax_nested[b >> a.nested_shift] + a.offset;
}

inline float nibble_value(const uint8_t* packed, int64_t f, const float* table) {
  const uint8_t byte = packed[f >> 1];
  return table[(f & 1) ? (byte & 0x0f) : (byte >> formats::kHighNibbleShift)];
}

// x[m][k] from the de-interleaved copies.
inline float x_at(const Gemv4bitArgs& a, int64_t m, int64_t k) {
  return (k & 1) ? a.x_odd[m * a.x_stride + (k >> 1)] : a.x_even[m * a.x_stride + (k >> 1)];
}

// The fixed summation tree of Note [4-bit gemv order].
inline float sum_lanes16(const float* lanes) {
  float s[16];
  for (int l = 0; l < 16; ++l) s[l] = lanes[l];
  for (int width = 8; width >= 1; width >>= 1)
    for (int l = 0; l < width; ++l) s[l] = s[l] + s[l + width];
  return s[0];
}

// Products of the elements [f, stop) of a chunk cut by a row boundary (row n): high-nibble products
// into ph[m][lane], low-nibble ones into pl[m][lane], 0 for absent elements (Note [4-bit gemv order]).
inline void partial_chunk_products(const Gemv4bitArgs& a, const float* table, int64_t n, int64_t f, int64_t stop,
                                   float* ph, float* pl) {
  for (int64_t i = 0; i < a.rows * 16; ++i) ph[i] = pl[i] = 0.0f;
  for (; f < stop; ++f) {
    const float w = nibble_value(a.packed, f, table);
    const int64_t k = f - n * a.k_in;
    const int lane = int((f & 31) >> 1);
    float* dst = (f & 1) ? pl : ph;
    for (int64_t m = 0; m < a.rows; ++m) dst[m * 16 + lane] = w * x_at(a, m, k);
  }
}

}  // namespace
}  // namespace kbit
