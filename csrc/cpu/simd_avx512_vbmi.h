// simd_avx512_vbmi.h — the avx512vbmi level's Ops: every AVX-512 operation plus the gather-free 64-lane
// code lookups and searches of Note [gather-free lookups] (byte_planes.h), built on AVX512-VBMI byte
// permutes. Include only from kernels_avx512vbmi.cpp, after simd_avx512.h.
//
// Note [register tables]
// A map's lookup tables (four byte planes, 16 zmm) and search tables (offsets, count and thresholds, 14 zmm)
// are loaded into registers once (PlaneLookup, PlaneSearch) and the loops permute registers. The earlier
// form read them through a BytePlanes reference inside the loop: every byte or vector store may alias them
// (__m512i is may_alias), so they were reloaded for every 64 values, and on Zen 4 those 16-30 loads per
// 64 values doubled a lookup's cost (one map, 64 codes: 31.6 cycles with loads, 16.7 from registers).
// Loops that keep tables in registers therefore handle one map at a time (Note [staged 8-bit step]).
#pragma once

#include <immintrin.h>

#include "byte_planes.h"
#include "scalar_ops.h"

namespace kbit {
namespace KBIT_AVX512_NAMESPACE {

struct Ops : Avx512Ops {
  static constexpr bool kBytePlanes = true;

  // The byte order that makes the unpacks below produce floats in element order: unpacking four byte
  // planes puts byte lane 16q + 4r + n into float lane 4q + n of vector r, so lane 16q + 4r + n must
  // hold element 16r + 4q + n.
  static KBIT_ALWAYS_INLINE __m512i plane_order() {
    alignas(64) static const uint8_t order[64] = {0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55, 8, 9, 10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
    return _mm512_load_si512(order);
  }

  // A map's four byte planes held in 16 registers (Note [register tables]).
  struct PlaneLookup {
    __m512i t[16];  // plane k, bytes 64q..64q+63, in t[4k + q]
    explicit KBIT_ALWAYS_INLINE PlaneLookup(const BytePlanes& p) {
      for (int k = 0; k < 16; ++k) t[k] = _mm512_loadu_si512(&p.planes[k / 4][(k % 4) * 64]);
    }
  };

  // 64 byte lanes of a 256-entry byte table held in four registers (t[0..3]): two 128-byte permutes,
  // chosen by the index's top bit.
  static KBIT_ALWAYS_INLINE __m512i lookup256_u8(const __m512i* t, __m512i idx, __mmask64 top) {
    return _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(t[0], idx, t[1]),
                                  _mm512_permutex2var_epi8(t[2], idx, t[3]));
  }

  // code[codes[i]] for i in [0, 64), as four vectors of 16 floats in element order.
  static KBIT_ALWAYS_INLINE void lookup64(const uint8_t* codes, const PlaneLookup& r, __m512 out[4]) {
    const __m512i idx = _mm512_permutexvar_epi8(plane_order(), _mm512_loadu_si512(codes));
    const __mmask64 top = _mm512_movepi8_mask(idx);
    const __m512i b0 = lookup256_u8(r.t, idx, top), b1 = lookup256_u8(r.t + 4, idx, top);
    const __m512i b2 = lookup256_u8(r.t + 8, idx, top), b3 = lookup256_u8(r.t + 12, idx, top);
    const __m512i w01_lo = _mm512_unpacklo_epi8(b0, b1), w01_hi = _mm512_unpackhi_epi8(b0, b1);
    const __m512i w23_lo = _mm512_unpacklo_epi8(b2, b3), w23_hi = _mm512_unpackhi_epi8(b2, b3);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01_lo, w23_lo));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01_lo, w23_lo));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01_hi, w23_hi));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01_hi, w23_hi));
  }

  // x = ror(u, shift[j]) + offset[j] for the raised value bits u of 16 values in binade j: one permute
  // of BytePlanes::offset by the exponent (the permute reads the index's low five bits, so the sign
  // above them does not matter), whose low five bits are the rotate count (Note [gather-free lookups]).
  static KBIT_ALWAYS_INLINE __m512i shifted_position(__m512i u, __m512i off_lo, __m512i off_hi) {
    const __m512i off = _mm512_permutex2var_epi32(off_lo, _mm512_srli_epi32(u, 23), off_hi);
    return _mm512_add_epi32(_mm512_rorv_epi32(u, off), off);
  }

  // The 16-bit positions x of 16 values (byte_plane_position, in the low 16 bits of each lane).
  static KBIT_ALWAYS_INLINE __m512i plane_position(__m512 s, __m512 floor, __m512i off_lo, __m512i off_hi) {
    // max(|s|, floor) with s's sign: vrangeps, imm 0b0111 = larger magnitude, sign of the first source.
    const __m512i u = _mm512_castps_si512(_mm512_range_ps(s, floor, 0x7));
    const __m512i x = shifted_position(u, off_lo, off_hi);
    // x ^ (sign smeared & 0xffff): truth table of A ^ (B & C) is 0x78.
    return _mm512_ternarylogic_epi32(x, _mm512_srai_epi32(u, 31), _mm512_set1_epi32(0xffff), 0x78);
  }

  // The same for a map with only positive midpoints: max(s, floor) sends 0, -0 and negatives to the
  // floor, +0's position, and leaves no sign to mirror.
  static KBIT_ALWAYS_INLINE __m512i plane_position_positive(__m512 s, __m512 floor, __m512i off_lo, __m512i off_hi) {
    return shifted_position(_mm512_castps_si512(_mm512_max_ps(s, floor)), off_lo, off_hi);
  }

  // Byte 1 of every dword of a and b in bytes 0-31, byte 0 in bytes 32-63 (a's lanes first).
  static KBIT_ALWAYS_INLINE __m512i split_positions(__m512i a, __m512i b) {
    alignas(64) static const uint8_t pick[64] = {
        1,  5,  9,  13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61,  65,  69,  73,  77,  81,  85,
        89, 93, 97, 101, 105, 109, 113, 117, 121, 125, 0,  4,  8,  12, 16, 20, 24, 28, 32, 36, 40, 44,
        48, 52, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92, 96, 100, 104, 108, 112, 116, 120, 124};
    return _mm512_permutex2var_epi8(a, _mm512_load_si512(pick), b);
  }

  // A map's search tables held in registers (Note [register tables]), and its midpoints for the
  // ambiguous lanes.
  struct PlaneSearch {
    __m512i off_lo, off_hi;             // BytePlanes::offset
    __m512i count[4], thr_lo[4], thr_hi[4];
    __m512 floor;
    const float* mids;
    explicit KBIT_ALWAYS_INLINE PlaneSearch(const BytePlanes& p, const float* m) : mids(m) {
      off_lo = _mm512_loadu_si512(p.offset);
      off_hi = _mm512_loadu_si512(p.offset + 16);
      for (int q = 0; q < 4; ++q) {
        count[q] = _mm512_loadu_si512(p.count + 64 * q);
        thr_lo[q] = _mm512_loadu_si512(p.thr_lo + 64 * q);
        thr_hi[q] = _mm512_loadu_si512(p.thr_hi + 64 * q);
      }
      floor = _mm512_castsi512_ps(_mm512_set1_epi32(int(p.floor_bits)));
    }
  };

  // Exact nearest codes of 64 scaled values s[0..3] (|s| < 2, none NaN) into out[0, 64), Note [gather-free
  // lookups]: the byte-plane search, then the reference search for the rare ambiguous lanes.
  // kPositiveOnly is BytePlanes::positive_only of the map the tables came from.
  template <bool kPositiveOnly>
  static KBIT_ALWAYS_INLINE void search64(const __m512 s_in[4], const PlaneSearch& t, uint8_t* out) {
    __m512i x[4];
    for (int r = 0; r < 4; ++r)
      x[r] = kPositiveOnly ? plane_position_positive(s_in[r], t.floor, t.off_lo, t.off_hi)
                           : plane_position(s_in[r], t.floor, t.off_lo, t.off_hi);
    const __m512i x01 = split_positions(x[0], x[1]), x23 = split_positions(x[2], x[3]);
    const __m512i sub = _mm512_shuffle_i64x2(x01, x23, 0x44);  // 128-bit lanes 0, 1 of each
    const __m512i p8 = _mm512_min_epu8(_mm512_shuffle_i64x2(x01, x23, 0xee), _mm512_set1_epi8(char(254)));
    const __mmask64 top = _mm512_movepi8_mask(sub);
    const __m512i count = lookup256_u8(t.count, sub, top);
    const __m512i lo = lookup256_u8(t.thr_lo, sub, top), hi = lookup256_u8(t.thr_hi, sub, top);
    const __m512i one = _mm512_set1_epi8(1);
    __m512i code = _mm512_mask_add_epi8(count, _mm512_cmpgt_epu8_mask(p8, lo), count, one);
    code = _mm512_mask_add_epi8(code, _mm512_cmpgt_epu8_mask(p8, hi), code, one);
    _mm512_storeu_si512(out, code);
    uint64_t ambiguous = _mm512_cmpeq_epu8_mask(p8, lo) | _mm512_cmpeq_epu8_mask(p8, hi);
    if (__builtin_expect(ambiguous != 0, 0)) {
      // The lane's sub-bin holds midpoints count and count + 1 at most, and mids[count + 1] is at most
      // the +inf sentinel: comparing with those two is nearest_code_index's answer.
      alignas(64) float values[64];
      alignas(64) uint8_t first[64];
      for (int r = 0; r < 4; ++r) _mm512_store_ps(values + 16 * r, s_in[r]);
      _mm512_store_si512(first, count);
      for (; ambiguous != 0; ambiguous &= ambiguous - 1) {
        const int lane = __builtin_ctzll(ambiguous);
        const unsigned c = first[lane];
        out[lane] = uint8_t(c + (t.mids[c] < values[lane]) + (t.mids[c + 1] < values[lane]));
      }
    }
  }
};

}  // namespace KBIT_AVX512_NAMESPACE
}  // namespace kbit
