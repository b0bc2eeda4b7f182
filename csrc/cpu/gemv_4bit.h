// gemv_4bit.h — y = x W^T for a 4-bit (NF4/FP4) weight W [N, K] and a few input rows x [M, K], reading each
// packed nibble once. Shared by every ISA unit (types and the reduction order; kernels in gemv4-inl.h).
//
// Note [4-bit gemv order]
// The weight is walked as the flat stream of its row-major elements in chunks of 32 (16 bytes) aligned to
// flat multiples of 32, so a chunk never straddles a quantization block (block sizes are multiples of 32).
// A row is split into segments, the part of one block inside the row. In a segment, lane j of 16 float32
// lanes accumulates with fused multiply-adds, chunk by chunk in order: the segment's first chunk starts
// s_j = w(c+2j+1) x (its low nibble), then s_j = fma(w(c+2j), x, s_j) (high nibble); every later chunk does
// s_j = fma(high, x, s_j), s_j = fma(low, x, s_j). A chunk cut by a row boundary (only when K % 32 != 0)
// contributes its present elements and 0 for the others. At the segment's end the lanes
// are scaled by the block's absmax into the row's lanes, y_j <- fma(s_j, absmax, y_j), and at the row's end
// y is summed by the fixed tree l + 8, l + 4, l + 2, l + 1. Segments are independent of each other (only the
// row's y chains through them), which keeps the vector code out of one long dependency chain, and every
// ISA level gives identical bits.
#pragma once

#include <cstdint>

#include "../formats.h"

namespace kbit {

// Largest number of input rows the fused kernel handles; larger batches dequantize tiles and call a GEMM.
inline constexpr int64_t kGemvMaxRows = 8;

struct Gemv4bitArgs {
  const uint8_t* packed;  // ceil(N*K / 2) bytes, Note [nibble order]
  int64_t n_out, k_in;    // N, K
  int64_t blocksize;
  formats::QuantType4bit qt;
  // Block scales: either float32 per block (absmax), or double-quantized: absmax_q codes, their code map,
  // the nested float32 absmax per nested block, and the offset (absmax = code[q] * nested + offset).
  const float* absmax;
  const uint8_t* absmax_q;
  const float* absmax_code;
  const float* absmax_nested;
  int64_t nested_blocksize;  // a power of two (256): block b's nested scale is absmax_nested[b >> nested_shift]
  int nested_shift;
  float offset;
  int64_t rows;            // M
  const float* x_even;     // [M][x_stride]: x[m][2j]
  const float* x_odd;      // [M][x_stride]: x[m][2j + 1]
  int64_t x_stride;
  bool aligned;  // every row is made of whole chunk-aligned blocks (K % 32 == 0 and K % blocksize == 0)
  float* out;              // [M][N] float32
};

}  // namespace kbit
