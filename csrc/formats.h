// formats.h — THE single definition of kbit's k-bit code tables and layout constants.
//
// Every other file (C++ kernels, and Python through kbit._C.format_tables()) takes these values from
// here. They are bit-for-bit the tables bitsandbytes 0.50 uses, so packed weights and quantization
// statistics are interchangeable with it.
#pragma once

#include <cstdint>

namespace kbit {
namespace formats {

// ---- 4-bit NormalFloat (QLoRA, Dettmers et al. 2023) --------------------------------------------
// Sorted ascending; index == 4-bit code. Values are the normalized quantiles of N(0,1) with an exact
// zero (the "extra value" construction); they are the float32 values bitsandbytes hard-codes.
inline constexpr float kNF4[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Note [NF4 decision rule]
// The NF4 code of a scaled value s is the number of midpoints (kNF4[i] + kNF4[i+1]) / 2, computed in
// float32, that are strictly below s. A value exactly on a midpoint goes to the lower code; NaN gets
// code 0. This is what bitsandbytes' CUDA decision tree computes (its decimal literals round to exactly
// these float32 midpoints), so our bytes equal theirs.
constexpr float nf4_midpoint(int i) { return (kNF4[i] + kNF4[i + 1]) / 2.0f; }
static_assert(nf4_midpoint(0) == -0.8480964f, "NF4 midpoint 0 drifted");
static_assert(nf4_midpoint(7) == 0.03979015f, "NF4 midpoint 7 drifted");
static_assert(nf4_midpoint(14) == 0.86147845f, "NF4 midpoint 14 drifted");

// ---- 4-bit float (e2m1 with a subnormal, bitsandbytes' "fp4") -------------------------------------
// NOT sorted: bit 3 is the sign, bits 2..0 the magnitude, i.e. the raw list
// [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12 followed by its negation. Index 8 is +0.0 as bitsandbytes'
// Python table has it (the sign of a zero never survives multiplication by absmax anyway).
inline constexpr float kFP4[16] = {
    0.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 12.0f / 12.0f, 4.0f / 12.0f, 6.0f / 12.0f, 2.0f / 12.0f, 3.0f / 12.0f,
    0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f, -4.0f / 12.0f, -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f,
};
static_assert(kFP4[1] == 0.0052083334885537624f, "FP4 subnormal drifted");

// Note [FP4 decision rule]
// FP4 follows bitsandbytes' CUDA rule, not its CPU bucketize: sign bit 8 iff s < 0, then |s| is
// compared with these float32 thresholds using strict '>' (a tie goes to the smaller magnitude).
// They are CUDA's decimal literals, which differ from exact midpoints in the last bit in places
// (0.583333 vs 0.58333337); keeping them makes our bytes equal CUDA's. NaN gets code 0.
inline constexpr float kFP4Thresholds[7] = {
    0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f, 0.4166667f, 0.583333f, 0.8333333f,
};
// Magnitude code chosen when |s| is above kFP4Thresholds[i-1] and at most kFP4Thresholds[i]
// (i == 0: at most the first threshold; i == 7: above the last).
inline constexpr uint8_t kFP4MagnitudeCode[8] = {0, 1, 6, 7, 4, 5, 2, 3};
inline constexpr uint8_t kFP4SignBit = 8;

// ---- Layout --------------------------------------------------------------------------------------
// Note [nibble order]
// Flattened element 2j goes to the HIGH nibble of byte j and element 2j+1 to the LOW nibble. An odd
// element count pads the last low nibble with the code of 0.0.
inline constexpr int kHighNibbleShift = 4;

// 4-bit quantization block sizes bitsandbytes accepts (and whose checkpoints we must read).
inline constexpr int64_t kBlocksizes4bit[8] = {32, 64, 128, 256, 512, 1024, 2048, 4096};
// Double quantization ("compress_statistics") always quantizes the 4-bit absmax with this block size.
inline constexpr int64_t kNestedBlocksize4bit = 256;
// Number of entries of an 8-bit code map.
inline constexpr int kCodeSize8bit = 256;
// Block size of blockwise 8-bit optimizer states (bitsandbytes >= 0.44; 2048 before).
inline constexpr int64_t kOptimizerBlocksize8bit = 256;

// 4-bit optimizer states (Note [4-bit optimizer states], csrc/cpu/optim_call.h), after Li et al. 2023,
// "Memory Efficient Optimizers with 4-bit States": small blocks, a dynamic-exponent map for first moments
// and a map without zero for second moments (a second moment quantized to 0 would make its update
// m / (sqrt(v) + eps) explode). Values are v / absmax of the block.
inline constexpr int64_t kOptimizerBlocksize4bit = 128;
// Signed dynamic exponent: sign, then decades 10^-2 .. 10^0 with 1, 2 and 4 linear steps, plus 0 and 1.
inline constexpr float kOptimizer4bitSignedMap[16] = {
    -0.8875f, -0.6625f, -0.4375f, -0.2125f, -0.0775f, -0.0325f, -0.0055f, 0.0f,
    0.0055f,  0.0325f,  0.0775f,  0.2125f,  0.4375f,  0.6625f,  0.8875f,  1.0f};
// Unsigned, without zero: from 2e-4 of the block maximum, roughly geometric up to 0.1 and then close to
// uniform in sqrt(v) (the update divides by sqrt(v)). Chosen over a zero-free dynamic-exponent map (floor
// 1e-3), a linear map ((i + 1) / 16) and a sqrt-uniform one on a byte-level model (BENCHMARKS.md).
inline constexpr float kOptimizer4bitUnsignedMap[16] = {
    0.0002f, 0.0007f, 0.002f, 0.005f, 0.01f, 0.02f, 0.035f, 0.06f,
    0.1f,    0.16f,   0.25f,  0.36f,  0.5f,  0.66f, 0.83f,  1.0f};
constexpr bool strictly_increasing16(const float* m) {
  for (int i = 0; i < 15; ++i)
    if (!(m[i] < m[i + 1])) return false;
  return true;
}
static_assert(strictly_increasing16(kOptimizer4bitSignedMap) && strictly_increasing16(kOptimizer4bitUnsignedMap),
              "4-bit optimizer maps must be sorted without repeats (codes are counts of midpoints below)");
static_assert(kOptimizer4bitUnsignedMap[0] > 0.0f, "the second-moment map must not contain zero");
static_assert(kOptimizerBlocksize4bit % 2 == 0, "4-bit state blocks must not split a byte");

enum class QuantType4bit : int { kFP4 = 0, kNF4 = 1 };

}  // namespace formats
}  // namespace kbit
