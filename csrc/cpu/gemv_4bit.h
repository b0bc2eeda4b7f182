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
//
// Rows made of whole 128-element groups (K % 128 == 0, blocksize >= 64: gemv_uses_groups()) take a
// cheaper order, because the chunk walk above spends a byte-to-lane widening per 32 elements and a scale
// FMA per block. A group's 64 bytes are read as 16 dwords four times, at byte offsets k = 0..3: lane j of
// offset k then holds byte 4j + k in its low eight bits, so a table permute (which reads only the low four
// index bits) decodes its low nibble, element 8j + 2k + 1, directly, and one shift by 4 its high nibble,
// element 8j + 2k. With the inputs gathered into that order once per call (x_groups), lane j keeps two
// sums: s0 over the low nibbles, s0 = w(k=0) x, then s0 = fma(w(k), x, s0) for k = 1, 2, 3, and s1 likewise
// over the high nibbles. Lanes 0-7 cover the group's first 64 elements and lanes 8-15 its last 64, so
// each lane lies in one quantization block; the row's lanes take c0 = fma(s0, absmax, c0) and
// c1 = fma(s1, absmax, c1) with that block's absmax, and at the row's end y = c0 + c1 goes through the
// same tree. A group costs 4 shifts, 8 permutes and 10 multiply-adds for 128 elements.
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
  const float* x;          // [M][k_in]: x in float32
  const float* x_even;     // [M][x_stride]: x[m][2j] (when the rows are not walked in groups)
  const float* x_odd;      // [M][x_stride]: x[m][2j + 1]
  int64_t x_stride;
  const float* x_groups;   // [M][k_in] in group order (gemv_group_input_index) when gemv_uses_groups()
  bool aligned;  // every row is made of whole chunk-aligned blocks (K % 32 == 0 and K % blocksize == 0)
  float* out;              // [M][N] float32
};

// Whether rows of [N, K] with this block size are walked in 128-element groups (Note [4-bit gemv order]).
inline constexpr int64_t kGemvGroup = 128;
inline bool gemv_uses_groups(int64_t k_in, int64_t blocksize) { return k_in % kGemvGroup == 0 && blocksize >= 64; }

// The input column that position i of a row's group-ordered copy holds: in group g = i / 128, vector
// v = 2k + h (h = 0: low nibbles, 1: high nibbles) of 16 lanes, lane j holds column 128g + 8j + 2k + 1 - h.
inline int64_t gemv_group_input_index(int64_t i) {
  const int64_t g = i / kGemvGroup, r = i % kGemvGroup, v = r / 16, j = r % 16;
  return g * kGemvGroup + 8 * j + 2 * (v >> 1) + 1 - (v & 1);
}

}  // namespace kbit
