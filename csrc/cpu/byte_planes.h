// byte_planes.h — tables that let AVX-512 VBMI kernels look up and search a 256-entry code map with byte
// permutes instead of gathers (a 16-lane gather costs ~22 cycles on AMD Zen 4, Note [gather-free lookups]).
//
// Note [gather-free lookups]
// Dequantizing: byte k of code[i]'s float32 bits is planes[k][i]. Four 256-byte planes, each looked up
// for 64 codes at once with two 128-byte permutes (vpermt2b) and a blend on the index's top bit, then
// interleaved back into floats: the exact table values, so nothing about the numbers changes.
//
// Searching (the exact nearest code of a scaled value s, Note [8-bit code search] in code_lut.h): s is
// mapped to a 16-bit position x = sub-bin (high byte) and a position inside it (low byte, p8):
//   a = max(|s| bits, floor_bits),  j = (a >> 23) mod 32 (the binade),  shift[j] = offset[j] mod 32,
//   x = ((a >> shift[j]) + offset[j]) mod 2^16,  and for negative s (sign bit set, -0 included) x ^= 0xffff.
// floor_bits is the start of the lowest binade holding a midpoint: every smaller |s| has that value's
// code (no midpoint lies below it), so the binades under it take no positions. Binade j keeps
// 23 - shift[j] mantissa bits and gets the 2^(23 - shift[j]) positions from base[j]: offset[j] = base[j] -
// (e << (23 - shift[j])). The positions of |s| form one line, binade after binade (each base at or above
// the previous binade's end), so x grows with |s| everywhere, and a sub-bin (256 positions) may hold the
// top of one binade and the bottom of the next. Positive sub-bins are numbered up from 0 and the xor
// mirrors negative ones down from 255, so inside every sub-bin x grows with s. The builder takes for
// each binade the fewest positions that leave at most two thresholds (midpoints) of each sign in every
// sub-bin. Then
//   code(s) = count[sub] + (p8' > thr_lo[sub]) + (p8' > thr_hi[sub]),  p8' = min(p8, 254),
// where count[sub] is the number of midpoints below the sub-bin's lowest value, and thr_lo/hi are the
// in-bin midpoints' own min(p8, 254) (255: none). When p8' equals an in-bin threshold's the order is not
// decided by 8 bits: that lane is ambiguous and is compared with its sub-bin's midpoints themselves,
// mids[count] and mids[count + 1] (those are the only midpoints the sub-bin can hold; the second may be
// the +inf sentinel), which gives what the reference search (scalar_ops.h nearest_code_index) gives.
// Clamping p8 at 254 keeps a sentinel 255 that no lane equals, and a threshold at 254 or 255 makes both
// positions ambiguous, so "greater" stays exact. Ambiguous lanes are ~1/128 per in-bin threshold.
// Maps whose midpoints are all positive (the unsigned dynamic map of Adam's second state) search
// max(s, floor) instead: every negative value and -0 has the code of +0, nothing is mirrored, and
// positive sub-bins may use all 256 numbers.
// The vector search is five operations per 16 values (seven with signs): raise |s| to the floor (one
// vrangeps keeps the sign), permute offset[j] by the exponent, rotate a right by offset[j]'s low five
// bits, shift[j] (the builder starts each binade at base[j] = shift[j] mod 32), and add offset[j]. The
// rotate equals the shift in the low 16 bits, the only ones read: shift <= 15, so the bits it brings
// around, and the sign, land above bit 15.
// The layout is usable when every sub-bin fits (<= 128 per sign, or 256), no midpoint is 0, below
// 2^(kPlaneMinExponent - 127) or at 2 or above; otherwise the kernels keep the gather search (CodeLut::bins).
#pragma once

#include <cstdint>

namespace kbit {

inline constexpr uint32_t kPlaneMinExponent = 96;  // the lowest floor: 2^-31
inline constexpr int kPlaneBinades = 32;           // exponents up to 127; |s| < 2 in every searched block
inline constexpr int kPlaneMaxThresholdsPerBin = 2;
inline constexpr int kPlaneMaxShift = 15;          // the rotate must not bring bits into the low 16

struct BytePlanes {
  uint8_t planes[4][256];  // byte k of code[i]'s bits (little-endian order)
  bool search_usable = false;
  bool positive_only = false;  // every midpoint > 0: negative values search as +0
  uint32_t floor_bits = 0;     // |s| bits are raised to this: the lowest binade holding a midpoint
  // By exponent mod 32, modulo 2^32. offset[j] mod 32 is binade j's shift (0..kPlaneMaxShift): one
  // permute gives the vector search both.
  uint32_t offset[kPlaneBinades];
  uint8_t count[256];
  uint8_t thr_lo[256];
  uint8_t thr_hi[256];
};

// Fills `out` for the sorted 256-entry `code` and its 256 midpoints (the last is the +inf sentinel).
void build_byte_planes(const float* code, const float* mids, BytePlanes* out);
// Fills only `planes` (dequantizing needs no search tables, nor a sorted code); search_usable = false.
void build_byte_plane_lookup(const float* code, BytePlanes* out);

// Binade j's shift: the low five bits of its offset.
inline uint32_t plane_shift(const BytePlanes& t, uint32_t j) { return t.offset[j] & 31u; }

// The 16-bit position x of Note [gather-free lookups] for the bits of a value s with |s| < 2: the scalar
// statement of what the vector search computes, used by the builder and by tests.
inline uint32_t byte_plane_position(const BytePlanes& t, uint32_t bits) {
  const bool negative = (bits >> 31) != 0;
  uint32_t a = (t.positive_only && negative) ? 0u : (bits & 0x7fffffffu);
  if (a < t.floor_bits) a = t.floor_bits;
  const uint32_t j = (a >> 23) & uint32_t(kPlaneBinades - 1);
  uint32_t x = ((a >> plane_shift(t, j)) + t.offset[j]) & 0xffffu;
  if (negative && !t.positive_only) x ^= 0xffffu;
  return x;
}

}  // namespace kbit
