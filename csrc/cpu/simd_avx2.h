// simd_avx2.h — the vector operations the kernel templates (*-inl.h) use, for AVX2 + F16C.
// Include only from kernels_avx2.cpp, the one unit built with AVX2 flags.
#pragma once

#include <immintrin.h>

#include "scalar_ops.h"

namespace kbit {
namespace avx2 {

struct Ops {
  static constexpr bool kBytePlanes = false;  // Note [gather-free lookups]: AVX-512 VBMI only
  static constexpr int N = 8;  // float32 lanes
  using F = __m256;
  using I = __m256i;
  using M = __m256i;  // all-ones lanes where true

  // ---- loads and stores (one rounding, Note [bf16 rounding]) ----
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const bf16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static F load(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store(bf16_t* p, F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(kBf16QuietNaN), isnan(v));
    // Pack 8 x u32 (each < 65536) to 8 x u16: packus works within 128-bit halves, so fix the order.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  // Note [stochastic rounding]: the random bits of elements lo0 + 0..N-1 (lo0 + N - 1 must not wrap).
  static I lowbias32(I x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(kLowbias32Mul1)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(kLowbias32Mul2)));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  }
  static I sr_bits(uint32_t seed, uint32_t lo0, uint32_t hi) {
    const I lo = _mm256_add_epi32(_mm256_set1_epi32(int(lo0)), iota_i());
    const I x = lowbias32(_mm256_xor_si256(lo, _mm256_set1_epi32(int(seed))));
    return lowbias32(_mm256_xor_si256(x, _mm256_set1_epi32(int(hi))));
  }
  static void store_stochastic(bf16_t* p, F v, I random_bits) {
    const I u = _mm256_castps_si256(v);
    I r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_and_si256(random_bits, _mm256_set1_epi32(0xffff))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(kBf16QuietNaN), isnan(v));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static void store(f16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }

  // ---- arithmetic ----
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F zero() { return _mm256_setzero_ps(); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  // sign(0) = 0 and sign(NaN) = NaN, as ScalarMath::sign.
  static F sign(F a) {
    F r = _mm256_blendv_ps(a, _mm256_set1_ps(1.0f), _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ));
    return _mm256_blendv_ps(r, _mm256_set1_ps(-1.0f), _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LT_OQ));
  }
  static M is_zero(F a) { return _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_EQ_OQ)); }
  static F select(M m, F if_true, F if_false) { return _mm256_blendv_ps(if_false, if_true, _mm256_castsi256_ps(m)); }

  // 16 float64 lanes of sums of squares (Note [trust ratio]): a vector at block offset 8j fills lanes
  // 0..7 when j is even and 8..15 when j is odd, so element i always lands in lane i % 16.
  struct Acc16 {
    __m256d a[4];
  };
  static Acc16 acc16_zero() { return {{_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()}}; }
  static void acc16_add_sq(Acc16& acc, F x, int64_t offset) {
    const int h = (offset & 8) ? 2 : 0;
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    acc.a[h] = _mm256_add_pd(acc.a[h], _mm256_mul_pd(lo, lo));
    acc.a[h + 1] = _mm256_add_pd(acc.a[h + 1], _mm256_mul_pd(hi, hi));
  }
  static void acc16_store(const Acc16& acc, double* lanes) {
    for (int j = 0; j < 4; ++j) _mm256_storeu_pd(lanes + 4 * j, acc.a[j]);
  }
  static F abs(F a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
  static M isnan(F a) { return _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)); }
  static M lt(F a, F b) { return _mm256_castps_si256(_mm256_cmp_ps(a, b, _CMP_LT_OQ)); }
  static F clamp_unit(F s) { return _mm256_min_ps(_mm256_set1_ps(1.0f), _mm256_max_ps(_mm256_set1_ps(-1.0f), s)); }

  // ---- integer lanes ----
  static I zero_i() { return _mm256_setzero_si256(); }
  static I abs_bits(F a) { return _mm256_and_si256(_mm256_castps_si256(a), _mm256_set1_epi32(0x7fffffff)); }
  static I max_u32(I a, I b) { return _mm256_max_epu32(a, b); }
  static uint32_t reduce_max_u32(I a) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
    return uint32_t(_mm_cvtsi128_si32(m));
  }
  static I iota_i() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I srl_i(I a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static I set1_i(int v) { return _mm256_set1_epi32(v); }
  static I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  static I add_where(I a, M m, int k) { return _mm256_add_epi32(a, _mm256_and_si256(m, _mm256_set1_epi32(k))); }
  static I zero_where(I a, M m) { return _mm256_andnot_si256(m, a); }
  // Order-preserving integer key of s's bits (code_lut.h order_key).
  static I order_key(F s) {
    const __m256i u = _mm256_castps_si256(s);
    const __m256i neg = _mm256_srai_epi32(u, 31);  // all ones for negative lanes
    // negative: ~u; positive: u | 0x80000000  ==  (u ^ neg) | (~neg & 0x80000000)
    return _mm256_or_si256(_mm256_xor_si256(u, neg), _mm256_andnot_si256(neg, _mm256_set1_epi32(int(0x80000000u))));
  }
  template <int kShift>
  static I srli_i(I a) { return _mm256_srli_epi32(a, kShift); }
  static I gather_u32(const uint32_t* table, I idx) {
    return _mm256_i32gather_epi32(reinterpret_cast<const int*>(table), idx, 4);
  }
  static F gather(const float* table, I idx) { return _mm256_i32gather_ps(table, idx, 4); }

  // 16-entry table in two registers; idx in 0..15.
  struct T16 {
    __m256 lo, hi;
  };
  struct T16i {
    __m256i lo, hi;
  };
  static T16 table16(const float* t) { return {_mm256_loadu_ps(t), _mm256_loadu_ps(t + 8)}; }
  static T16i table16_i(const int32_t* t) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 8))};
  }
  static F lookup16(T16 t, I idx) {
    const __m256 lo = _mm256_permutevar8x32_ps(t.lo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(t.hi, idx);
    const __m256i upper = _mm256_slli_epi32(idx, 28);  // bit 3 -> sign bit
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(upper));
  }
  static I lookup16_i(T16i t, I idx) {
    return _mm256_castps_si256(lookup16({_mm256_castsi256_ps(t.lo), _mm256_castsi256_ps(t.hi)}, idx));
  }

  // Uniform grid of 16 cells (Note [4-bit code search]); NaN lands in some valid cell and is masked.
  static constexpr int kGridCells = 16;
  using TGrid = T16i;
  static TGrid table_grid(const int32_t* t) { return table16_i(t); }
  static I grid_cell(F x) {
    const __m256i c = _mm256_cvttps_epi32(x);  // NaN / out of range -> INT_MIN
    return _mm256_min_epi32(_mm256_max_epi32(c, _mm256_setzero_si256()), _mm256_set1_epi32(kGridCells - 1));
  }
  static I lookup_grid(const TGrid& t, I idx) { return lookup16_i(t, idx); }

  // ---- 16 float32 lanes for the 4-bit gemv (Note [4-bit gemv order]): two registers ----
  struct L16 {
    __m256 a, b;
  };
  static L16 l16_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static L16 l16_loadu(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static void l16_store(float* p, L16 v) {
    _mm256_storeu_ps(p, v.a);
    _mm256_storeu_ps(p + 8, v.b);
  }
  static L16 l16_add(L16 x, L16 y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
  static L16 l16_mul(L16 x, L16 y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
  static L16 l16_fma(L16 x, L16 y, L16 acc) { return {_mm256_fmadd_ps(x.a, y.a, acc.a), _mm256_fmadd_ps(x.b, y.b, acc.b)}; }
  struct LM {
    __m256i a, b;
  };
  static LM l16_lanes(int lo, int hi) {  // lanes [lo, hi)
    const __m256i i0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), i1 = _mm256_add_epi32(i0, _mm256_set1_epi32(8));
    const __m256i vlo = _mm256_set1_epi32(lo - 1), vhi = _mm256_set1_epi32(hi);
    return {_mm256_and_si256(_mm256_cmpgt_epi32(i0, vlo), _mm256_cmpgt_epi32(vhi, i0)),
            _mm256_and_si256(_mm256_cmpgt_epi32(i1, vlo), _mm256_cmpgt_epi32(vhi, i1))};
  }
  static L16 l16_maskz(L16 v, LM m) {
    return {_mm256_and_ps(v.a, _mm256_castsi256_ps(m.a)), _mm256_and_ps(v.b, _mm256_castsi256_ps(m.b))};
  }
  // Masked-out lanes read nothing (no fault) and are +0.
  static L16 l16_maskz_loadu(const float* p, LM m) { return {_mm256_maskload_ps(p, m.a), _mm256_maskload_ps(p + 8, m.b)}; }
  static L16 l16_scale_fma(L16 acc, float s, L16 y) {
    const __m256 v = _mm256_set1_ps(s);
    return {_mm256_fmadd_ps(acc.a, v, y.a), _mm256_fmadd_ps(acc.b, v, y.b)};
  }
  static void l16_decode(const uint8_t* p, T16 table, L16* hi, L16* lo) {
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    *hi = {lookup16(table, _mm256_srli_epi32(b0, 4)), lookup16(table, _mm256_srli_epi32(b1, 4))};
    *lo = {lookup16(table, b0), lookup16(table, b1)};  // lookup16 reads only the index's low four bits
  }
  static void l16_decode_dwords(const uint8_t* p, T16 table, L16* lo, L16* hi) {
    const __m256i d0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i d1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
    *lo = {lookup16(table, d0), lookup16(table, d1)};
    *hi = {lookup16(table, _mm256_srli_epi32(d0, 4)), lookup16(table, _mm256_srli_epi32(d1, 4))};
  }
  static L16 l16_halves(float a, float b) { return {_mm256_set1_ps(a), _mm256_set1_ps(b)}; }

  static constexpr bool kHasWordLookup = false;  // no cross-lane 16-bit permute in AVX2

  // ---- bytes ----
  static I load_u8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_u8(uint8_t* p, I v) {
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(w, w));
  }
  // Note [nibble order]: codes of elements 0..N-1 in c0 and N..2N-1 in c1 -> N packed bytes.
  static void store_nibbles(uint8_t* p, I c0, I c1) {
    const __m128i w0 = _mm_packus_epi32(_mm256_castsi256_si128(c0), _mm256_extracti128_si256(c0, 1));
    const __m128i w1 = _mm_packus_epi32(_mm256_castsi256_si128(c1), _mm256_extracti128_si256(c1, 1));
    const __m128i bytes = _mm_packus_epi16(w0, w1);  // codes of elements 0..15 as bytes
    const __m128i packed = _mm_or_si128(_mm_slli_epi16(bytes, 4), _mm_srli_epi16(bytes, 8));
    const __m128i lowbytes = _mm_and_si128(packed, _mm_set1_epi16(0x00ff));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(lowbytes, lowbytes));
  }
  static void load_nibbles(const uint8_t* p, I* c0, I* c1) {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i pairs = _mm_or_si128(_mm_srli_epi16(b, 4), _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x0f)), 8));
    *c0 = _mm256_cvtepu8_epi32(pairs);
    *c1 = _mm256_cvtepu8_epi32(_mm_srli_si128(pairs, 8));
  }
};

}  // namespace avx2
}  // namespace kbit
