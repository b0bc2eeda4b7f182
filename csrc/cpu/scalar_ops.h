// scalar_ops.h — per-element operations shared by the scalar reference kernels and by the tails of
// the SIMD kernels, so that a vector loop and the reference can never disagree on a single element.
//
// This header is compiled into every ISA translation unit; it must only use portable C++ (no
// intrinsics), and every function must give the same bits whatever flags the unit is built with.
// That is why all units are built with -ffp-contract=off (no silent FMA contraction).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "../formats.h"

// Forces inlining of the small vector helpers the hot loops call: GCC otherwise may keep them as calls
// once a loop body grows, and every __m512 argument then goes through the stack (AdamW8bit's
// step_vector and the byte-plane search were calls, by perf, at the avx512vbmi level).
#define KBIT_ALWAYS_INLINE inline __attribute__((always_inline))
// The same for a lambda (placed after its parameter list): a lambda in a hot loop is a call otherwise,
// and a call clobbers every zmm register (all are caller-saved), so the loop's tables are reloaded.
#define KBIT_INLINE_LAMBDA __attribute__((always_inline))

namespace kbit {

// Storage types of 16-bit floats (bit patterns; all math happens in float32).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

// Note [one definition per ISA]
// Everything below has internal linkage (an unnamed namespace): each ISA unit compiles its own copy
// with its own flags. With ordinary inline functions the linker would keep one arbitrary copy, and an
// AVX-512 build of it could end up called from the scalar path on a CPU without AVX-512.
namespace {

// ---- float <-> storage conversions ---------------------------------------------------------------
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_f32(float v) { return v; }
inline float to_f32(bf16_t v) { return f32_from_bits(uint32_t(v.bits) << 16); }
inline float to_f32(f16_t v) {
  // Exact IEEE binary16 -> binary32 (normals, subnormals, inf, NaN with payload), as F16C does.
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return f32_from_bits(sign);
    exp = 127 - 15 + 1;
    while ((mant & 0x400) == 0) {
      mant <<= 1;
      --exp;
    }
    mant &= 0x3ff;
    return f32_from_bits(sign | (exp << 23) | (mant << 13));
  }
  return f32_from_bits(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

// Note [bf16 rounding]
// Round to nearest even; NaN becomes 0x7fc0, exactly as torch's own float -> bfloat16 conversion,
// so a kernel's bf16 output equals torch's `.to(torch.bfloat16)` of the same fp32 value.
inline constexpr uint16_t kBf16QuietNaN = 0x7fc0;
inline void from_f32(float f, float* out) { *out = f; }
inline void from_f32(float f, bf16_t* out) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out->bits = kBf16QuietNaN;
    return;
  }
  out->bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
// Note [stochastic rounding]
// With bf16_stochastic_round an optimizer writes a bfloat16 parameter by adding 16 random bits to the
// float32 pattern and truncating: x rounds away from zero with probability (dropped bits) / 2^16, so the
// expected stored value is x and updates smaller than half a bf16 ulp still move the parameter on average.
// The random bits of element i are sr_bits(seed, i), a counter-based hash (Wellons' "lowbias32", applied to
// the low and then the high half of i): they depend only on the per-tensor, per-step seed and the element's
// index, so results are the same at every thread count and CPU level and after a checkpoint resume.
// NaN stays NaN (0x7fc0, as in Note [bf16 rounding]); values past the largest bf16 may round to +-Inf.
inline constexpr uint32_t kLowbias32Mul1 = 0x7feb352du;
inline constexpr uint32_t kLowbias32Mul2 = 0x846ca68bu;
inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= kLowbias32Mul1;
  x ^= x >> 15;
  x *= kLowbias32Mul2;
  x ^= x >> 16;
  return x;
}
inline uint32_t sr_bits(uint32_t seed, uint64_t i) {
  return lowbias32(lowbias32(uint32_t(i) ^ seed) ^ uint32_t(i >> 32));
}
inline void from_f32_stochastic(float f, uint32_t random_bits, bf16_t* out) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out->bits = kBf16QuietNaN;
    return;
  }
  out->bits = uint16_t((u + (random_bits & 0xffffu)) >> 16);
}

// Round to nearest even, with the same results as F16C's vcvtps2ph (NaN keeps sign and the top
// payload bits and is made quiet).
inline void from_f32(float f, f16_t* out) {
  const uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) {
    out->bits = uint16_t(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
    return;
  }
  if (abs >= 0x477ff000u) {  // rounds to >= 65520: overflow to infinity
    out->bits = uint16_t(sign | 0x7c00u);
    return;
  }
  if (abs < 0x38800000u) {  // below the smallest normal half: produce a subnormal (or zero)
    if (abs < 0x33000000u) {  // below half of the smallest subnormal: rounds to zero
      out->bits = uint16_t(sign);
      return;
    }
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    // value = mant * 2^(exp - 150) and a subnormal half is h * 2^-24, so h = mant >> (126 - exp),
    // with 14 <= shift <= 24 here.
    const uint32_t shift = 126 - exp;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    out->bits = uint16_t(sign | h);
    return;
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  out->bits = uint16_t(sign | h);
}

// Number of blocks of `blocksize` covering n elements, without the overflow of (n + blocksize - 1) for
// block sizes near INT64_MAX.
inline int64_t ceil_div(int64_t n, int64_t blocksize) { return n / blocksize + (n % blocksize != 0); }

// ---- blockwise scaling ----------------------------------------------------------------------------
// Note [scaling rule]
// A block's scale is absmax = max |x| over its valid elements (NaN if any element is NaN). Each value is
// scaled by multiplying with the float32 reciprocal 1/absmax (as bitsandbytes' CUDA kernels do) and
// clamped to [-1, 1]; an all-zero block uses a reciprocal of 0 so every element scales to 0.
// A NaN stays NaN through the clamp and receives code 0.
// A subnormal absmax (below ~2.9e-39) has no finite float32 reciprocal; FLT_MAX keeps 0 at 0 (an infinite
// one would turn 0 * inf into NaN) and scales the block's values into [-1, 1] all the same.
inline float block_reciprocal(float absmax) {
  if (absmax == 0.0f) return 0.0f;
  const float inv = 1.0f / absmax;
  return inv == std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::max() : inv;
}

inline float scale_and_clamp(float x, float inv) {
  float s = x * inv;
  if (s < -1.0f) s = -1.0f;
  if (s > 1.0f) s = 1.0f;
  return s;
}

// Absmax accumulation with NaN made sticky; the result is a canonical quiet NaN so that every ISA
// level produces the same bits.
struct AbsmaxAccumulator {
  float max = 0.0f;
  bool nan = false;
  void add(float x) {
    const float a = x < 0.0f ? -x : x;
    if (a != a) nan = true;
    else if (a > max) max = a;
  }
  float result() const { return nan ? std::numeric_limits<float>::quiet_NaN() : max; }
};

// ---- code selection -------------------------------------------------------------------------------
// 8-bit: number of the 255 code midpoints strictly below s (Note [NF4 decision rule] applied to a
// 256-entry sorted map). `mids` holds 256 floats: the 255 midpoints and +inf as a sentinel.
inline uint8_t nearest_code_index(float s, const float* mids) {
  if (s != s) return 0;
  unsigned c = 0;
  for (unsigned step = 128; step >= 1; step >>= 1) {
    if (mids[c + step - 1] < s) c += step;
  }
  return uint8_t(c);
}

// Note [4-bit optimizer states]: the count of a 16-value map's 15 midpoints strictly below s (NaN: 0).
inline uint8_t code4_index(float s, const float* mids) {
  if (s != s) return 0;
  uint8_t c = 0;
  for (int i = 0; i < 15; ++i) c += mids[i] < s ? 1 : 0;
  return c;
}

// Nibble (un)packing of Note [4-bit optimizer states]: element 2i in the high nibble of byte i. `start`
// of a span is even, so its first element is a high nibble; an odd final element leaves the low nibble 0.
inline void unpack_nibbles(const uint8_t* packed, int64_t len, uint8_t* codes) {
  for (int64_t j = 0; j < len; ++j) codes[j] = (j & 1) ? packed[j >> 1] & 0x0f : packed[j >> 1] >> 4;
}
inline void pack_nibbles(const uint8_t* codes, int64_t len, uint8_t* packed) {
  for (int64_t j = 0; j + 1 < len; j += 2) packed[j >> 1] = uint8_t((codes[j] << 4) | (codes[j + 1] & 0x0f));
  if (len & 1) packed[len >> 1] = uint8_t(codes[len - 1] << 4);
}

inline uint8_t nf4_code(float s) {
  uint8_t c = 0;
  for (int i = 0; i < 15; ++i) c += formats::nf4_midpoint(i) < s ? 1 : 0;
  return c;
}

inline uint8_t fp4_code(float s) {
  const uint8_t sign = s < 0.0f ? formats::kFP4SignBit : 0;
  const float a = s < 0.0f ? -s : s;
  int m = 0;
  for (int i = 0; i < 7; ++i) m += a > formats::kFP4Thresholds[i] ? 1 : 0;
  return uint8_t(formats::kFP4MagnitudeCode[m] | sign);
}

inline uint8_t code_4bit(float s, formats::QuantType4bit qt) {
  return qt == formats::QuantType4bit::kNF4 ? nf4_code(s) : fp4_code(s);
}

inline const float* table_4bit(formats::QuantType4bit qt) {
  return qt == formats::QuantType4bit::kNF4 ? formats::kNF4 : formats::kFP4;
}

}  // namespace
}  // namespace kbit
