// gemv4_common.h — the ISA-independent pieces of the 4-bit gemv: block scales and the lane bookkeeping
// that both the reference twin and the SIMD kernels use for the elements outside whole chunks.
#pragma once

#include <cmath>
#include <cstring>
#include <limits>

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

// Weights and inputs of the elements [f, stop) of chunk-sized piece of row n, laid out as a whole chunk's
// lanes: high-nibble weights in wh[lane], low in wl[lane], inputs in xh[m][lane] / xl[m][lane], and 0 for
// absent elements (Note [4-bit gemv order]). A whole chunk is the special case with every element present.
inline void chunk_operands(const Gemv4bitArgs& a, const float* table, int64_t n, int64_t f, int64_t stop, float* wh,
                           float* wl, float* xh, float* xl) {
  for (int l = 0; l < 16; ++l) wh[l] = wl[l] = 0.0f;
  for (int64_t i = 0; i < a.rows * 16; ++i) xh[i] = xl[i] = 0.0f;
  for (; f < stop; ++f) {
    const float w = nibble_value(a.packed, f, table);
    const int64_t k = f - n * a.k_in;
    const int lane = int((f & 31) >> 1);
    ((f & 1) ? wl : wh)[lane] = w;
    float* x = (f & 1) ? xl : xh;
    for (int64_t m = 0; m < a.rows; ++m) x[m * 16 + lane] = x_at(a, m, k);
  }
}

// Lane sums of one chunk into s (Note [4-bit gemv order]), element by element: the reference twin.
inline void chunk_accumulate(bool first, const float* wh, const float* wl, const float* xh, const float* xl, float* s) {
  for (int l = 0; l < 16; ++l) {
    float acc = first ? wl[l] * xl[l] : std::fma(wl[l], xl[l], std::fma(wh[l], xh[l], s[l]));
    if (first) acc = std::fma(wh[l], xh[l], acc);
    s[l] = acc;
  }
}

}  // namespace
}  // namespace kbit
