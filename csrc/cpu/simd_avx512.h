// simd_avx512.h — the vector operations the kernel templates (*-inl.h) use, for AVX-512 F/BW/VL.
// Include only from the units built with AVX-512 flags: kernels_avx512.cpp, and kernels_avx512vbmi.cpp,
// which defines KBIT_AVX512_NAMESPACE first so its copy (built with VBMI enabled) has its own names.
// Each unit then defines `Ops` from Avx512Ops.
#pragma once

#include <immintrin.h>

#include "scalar_ops.h"

#ifndef KBIT_AVX512_NAMESPACE
#define KBIT_AVX512_NAMESPACE avx512
#endif

namespace kbit {
namespace KBIT_AVX512_NAMESPACE {

struct Avx512Ops {
  static constexpr int N = 16;  // float32 lanes
  using F = __m512;
  using I = __m512i;
  using M = __mmask16;

  // ---- loads and stores (one rounding, Note [bf16 rounding]) ----
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const bf16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static F load(const f16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(bf16_t* p, F v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, isnan(v), _mm512_set1_epi32(kBf16QuietNaN));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  // Note [stochastic rounding]: the random bits of elements lo0 + 0..N-1 (lo0 + N - 1 must not wrap).
  static I lowbias32(I x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(kLowbias32Mul1)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(kLowbias32Mul2)));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  }
  static I sr_bits(uint32_t seed, uint32_t lo0, uint32_t hi) {
    const I lo = _mm512_add_epi32(_mm512_set1_epi32(int(lo0)), iota_i());
    const I x = lowbias32(_mm512_xor_si512(lo, _mm512_set1_epi32(int(seed))));
    return lowbias32(_mm512_xor_si512(x, _mm512_set1_epi32(int(hi))));
  }
  static void store_stochastic(bf16_t* p, F v, I random_bits) {
    const I u = _mm512_castps_si512(v);
    I r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_and_si512(random_bits, _mm512_set1_epi32(0xffff))), 16);
    r = _mm512_mask_mov_epi32(r, isnan(v), _mm512_set1_epi32(kBf16QuietNaN));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static void store(f16_t* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }

  // ---- arithmetic ----
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F zero() { return _mm512_setzero_ps(); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  // sign(0) = 0 and sign(NaN) = NaN, as ScalarMath::sign.
  static F sign(F a) {
    F r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ), a, _mm512_set1_ps(1.0f));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ), r, _mm512_set1_ps(-1.0f));
  }
  static M is_zero(F a) { return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_EQ_OQ); }
  static F select(M m, F if_true, F if_false) { return _mm512_mask_blend_ps(m, if_false, if_true); }

  // 16 float64 lanes of sums of squares (Note [trust ratio]); `offset` (from the block start) is a
  // multiple of 16, so element offset + j lands in lane j.
  struct Acc16 {
    __m512d lo, hi;
  };
  static Acc16 acc16_zero() { return {_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static void acc16_add_sq(Acc16& acc, F x, int64_t /*offset*/) {
    const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    const __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    acc.lo = _mm512_add_pd(acc.lo, _mm512_mul_pd(lo, lo));
    acc.hi = _mm512_add_pd(acc.hi, _mm512_mul_pd(hi, hi));
  }
  static void acc16_store(const Acc16& acc, double* lanes) {
    _mm512_storeu_pd(lanes, acc.lo);
    _mm512_storeu_pd(lanes + 8, acc.hi);
  }
  static F abs(F a) { return _mm512_abs_ps(a); }
  static M isnan(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  // clamp(s, -1, 1) keeping NaN (MAXPS/MINPS return the second operand when one input is NaN).
  static F clamp_unit(F s) { return _mm512_min_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_set1_ps(-1.0f), s)); }

  // ---- integer lanes ----
  static I zero_i() { return _mm512_setzero_si512(); }
  static I abs_bits(F a) { return _mm512_and_si512(_mm512_castps_si512(a), _mm512_set1_epi32(0x7fffffff)); }
  static I max_u32(I a, I b) { return _mm512_max_epu32(a, b); }
  static uint32_t reduce_max_u32(I a) { return _mm512_reduce_max_epu32(a); }
  static I iota_i() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I srl_i(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static I set1_i(int v) { return _mm512_set1_epi32(v); }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static I add_where(I a, M m, int k) { return _mm512_mask_add_epi32(a, m, a, _mm512_set1_epi32(k)); }
  static I zero_where(I a, M m) { return _mm512_mask_mov_epi32(a, m, _mm512_setzero_si512()); }
  // Order-preserving integer key of s's bits (code_lut.h order_key).
  static I order_key(F s) {
    // u ^ (sign ? 0xffffffff : 0x80000000): the sign smeared by an arithmetic shift, then one ternary
    // logic op computing u ^ (smear | 0x80000000) (truth table 0x1e).
    const __m512i u = _mm512_castps_si512(s);
    return _mm512_ternarylogic_epi32(u, _mm512_srai_epi32(u, 31), _mm512_set1_epi32(int(0x80000000u)), 0x1e);
  }
  template <int kShift>
  static I srli_i(I a) { return _mm512_srli_epi32(a, kShift); }
  static I gather_u32(const uint32_t* table, I idx) { return _mm512_i32gather_epi32(idx, table, 4); }
  static F gather(const float* table, I idx) { return _mm512_i32gather_ps(idx, table, 4); }

  // 16-entry table held in a register: table16(t) then lookup16(table, idx) with idx in 0..15.
  using T16 = __m512;
  using T16i = __m512i;
  static T16 table16(const float* t) { return _mm512_loadu_ps(t); }
  static T16i table16_i(const int32_t* t) { return _mm512_loadu_si512(t); }
  static F lookup16(T16 t, I idx) { return _mm512_permutexvar_ps(idx, t); }
  static I lookup16_i(T16i t, I idx) { return _mm512_permutexvar_epi32(idx, t); }

  // Uniform grid of 32 cells (Note [4-bit code search]): cell index of x = (v - lo) * cells_per_unit,
  // truncated and clamped to [0, 31]; NaN lands in some valid cell and is masked by the caller.
  static constexpr int kGridCells = 32;
  struct TGrid {
    __m512i lo, hi;
  };
  static TGrid table_grid(const int32_t* t) { return {_mm512_loadu_si512(t), _mm512_loadu_si512(t + 16)}; }
  static I grid_cell(F x) {
    const __m512i c = _mm512_cvttps_epi32(x);  // NaN / out of range -> INT_MIN
    return _mm512_min_epi32(_mm512_max_epi32(c, _mm512_setzero_si512()), _mm512_set1_epi32(kGridCells - 1));
  }
  static I lookup_grid(const TGrid& t, I idx) { return _mm512_permutex2var_epi32(t.lo, idx, t.hi); }

  // ---- 16 float32 lanes for the 4-bit gemv (Note [4-bit gemv order]) ----
  using L16 = __m512;
  static L16 l16_zero() { return _mm512_setzero_ps(); }
  static L16 l16_loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void l16_store(float* p, L16 v) { _mm512_storeu_ps(p, v); }
  static L16 l16_add(L16 a, L16 b) { return _mm512_add_ps(a, b); }
  static L16 l16_mul(L16 a, L16 b) { return _mm512_mul_ps(a, b); }
  static L16 l16_fma(L16 a, L16 b, L16 acc) { return _mm512_fmadd_ps(a, b, acc); }
  using LM = __mmask16;
  static LM l16_lanes(int lo, int hi) {  // lanes [lo, hi)
    const unsigned below_hi = hi >= 16 ? 0xffffu : ((1u << (hi > 0 ? hi : 0)) - 1u);
    const unsigned below_lo = lo >= 16 ? 0xffffu : ((1u << (lo > 0 ? lo : 0)) - 1u);
    return LM(below_hi & ~below_lo);
  }
  static L16 l16_maskz(L16 v, LM m) { return _mm512_maskz_mov_ps(m, v); }
  // Masked-out lanes read nothing (no fault) and are +0.
  static L16 l16_maskz_loadu(const float* p, LM m) { return _mm512_maskz_loadu_ps(m, p); }
  static L16 l16_scale_fma(L16 acc, float s, L16 y) { return _mm512_fmadd_ps(acc, _mm512_set1_ps(s), y); }
  // 16 packed bytes -> the table values of their high nibbles (lane j: element 2j) and low nibbles.
  static void l16_decode(const uint8_t* p, T16 table, L16* hi, L16* lo) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
    *lo = _mm512_permutexvar_ps(b, table);  // vpermps reads only the index's low four bits
  }
  // The 64 bytes at p as 16 dwords (lane j: bytes 4j..4j+3) -> the table values of byte 4j's low nibble
  // and of its high nibble (Note [4-bit gemv order], groups).
  static void l16_decode_dwords(const uint8_t* p, T16 table, L16* lo, L16* hi) {
    const __m512i d = _mm512_loadu_si512(p);
    *lo = _mm512_permutexvar_ps(d, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);
  }
  // Lanes 0-7 a, lanes 8-15 b.
  static L16 l16_halves(float a, float b) { return _mm512_mask_broadcastss_ps(_mm512_set1_ps(a), 0xff00, _mm_set_ss(b)); }

  // ---- 16-bit table lookups (dequantizing 4-bit codes straight to bf16 / fp16) ----
  static constexpr bool kHasWordLookup = true;
  using W16 = __m512i;  // a 16-entry table of 16-bit values, duplicated to 32 entries
  // The 16 values v * scale, rounded to T (Note [bf16 rounding]) as a lookup table.
  template <class T>
  static W16 word_table(F values, float scale) {
    alignas(32) T t[16];
    store(t, _mm512_mul_ps(values, _mm512_set1_ps(scale)));
    return _mm512_broadcast_i64x4(_mm256_load_si256(reinterpret_cast<const __m256i*>(t)));
  }
  // 16 packed bytes (32 codes, Note [nibble order]) -> their 32 table entries, stored in element order.
  static void store_words(void* out, const uint8_t* p, W16 table) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    // Word j = high nibble | low nibble << 8: as bytes, the codes in element order.
    const __m256i pairs = _mm256_or_si256(_mm256_srli_epi16(w, 4), _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x0f)), 8));
    const __m512i idx = _mm512_cvtepu8_epi16(pairs);
    _mm512_storeu_si512(out, _mm512_permutexvar_epi16(idx, table));
  }

  // ---- bytes ----
  static I load_u8(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_u8(uint8_t* p, I v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(v)); }

  // Note [nibble order]: codes of elements 0..N-1 in c0 and N..2N-1 in c1 -> N packed bytes.
  static void store_nibbles(uint8_t* p, I c0, I c1) {
    const __m256i bytes = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(c0)),
                                                  _mm512_cvtepi32_epi8(c1), 1);
    // 16-bit lane j holds code(2j) in its low byte and code(2j+1) in its high byte.
    const __m256i packed = _mm256_or_si256(_mm256_slli_epi16(bytes, 4), _mm256_srli_epi16(bytes, 8));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtepi16_epi8(packed));
  }
  // Inverse of store_nibbles: N packed bytes -> codes of elements 0..N-1 (c0) and N..2N-1 (c1).
  static void load_nibbles(const uint8_t* p, I* c0, I* c1) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i pairs = _mm256_or_si256(_mm256_srli_epi16(b, 4),
                                          _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x0f)), 8));
    *c0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(pairs));
    *c1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(pairs, 1));
  }
};

}  // namespace KBIT_AVX512_NAMESPACE
}  // namespace kbit
