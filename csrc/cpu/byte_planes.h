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
//   a = |s| bits, e = a >> 23 (raised to kPlaneMinExponent),  j = e - kPlaneMinExponent,
//   x = (a >> shift[j]) + offset[j],  and for negative s (sign bit set, -0 included) x ^= 0xffff.
// Binade j is cut into 2^b sub-bins (shift = 15 - b keeps b mantissa bits for the sub-bin and the next 8
// for p8), or is one sub-bin (shift = 31, so a >> 31 = 0) when no threshold lies in it; binades below
// kPlaneMinExponent share binade 0's sub-bin, which must hold no threshold. Positive sub-bins are
// numbered up from 0 and the xor mirrors negative ones down from 255, so inside every sub-bin x grows
// with s (not across sub-bins: they are independent). b is the least that puts at most two thresholds
// (midpoints) of each sign in a sub-bin. Then
//   code(s) = count[sub] + (p8' > thr_lo[sub]) + (p8' > thr_hi[sub]),  p8' = min(p8, 254),
// where count[sub] is the number of midpoints below the whole sub-bin, and thr_lo/hi are the in-bin
// midpoints' own min(p8, 254) (255: none). When p8' equals an in-bin threshold's the order is not decided
// by 8 bits: that lane is ambiguous and is compared with its sub-bin's midpoints themselves, mids[count]
// and mids[count + 1] (those are the only midpoints the sub-bin can hold; the second may be the +inf
// sentinel), which gives what the reference search (scalar_ops.h nearest_code_index) gives.
// Clamping p8 at 254 keeps a sentinel 255 that no lane equals, and a threshold at 254 or 255 makes both
// positions ambiguous, so "greater" stays exact. Ambiguous lanes are ~1/128 per in-bin threshold.
// Maps whose midpoints are all positive (the unsigned dynamic map of Adam's second state) search
// max(s, +0) instead: every negative value and -0 has code 0 like +0, nothing is mirrored, and positive
// sub-bins may use all 256 numbers.
// The vector search reads shift and offset with one permute of shift_offset = offset | shift (every
// offset is a multiple of 256). For positive_only maps it raises s to 2^-31 instead of clamping the
// exponent: binade 0 never holds a midpoint, so that lands 0, -0 and negatives in +0's sub-bin.
// The layout is usable when every sub-bin fits (<= 128 per sign, or 256) and no midpoint is 0 or below
// 2^(kPlaneMinExponent - 127 + 1); otherwise the kernels keep the gather search (CodeLut::bins).
#pragma once

#include <cstdint>

namespace kbit {

inline constexpr uint32_t kPlaneMinExponent = 96;  // binade j = 0: [2^-31, 2^-30) and everything below
inline constexpr int kPlaneBinades = 32;           // exponents 96..127; |s| < 2 in every searched block
inline constexpr int kPlaneMaxThresholdsPerBin = 2;

struct BytePlanes {
  uint8_t planes[4][256];  // byte k of code[i]'s bits (little-endian order)
  bool search_usable = false;
  bool positive_only = false;  // every midpoint > 0: negative values search as +0
  int32_t shift[kPlaneBinades];
  int32_t offset[kPlaneBinades];  // modulo 2^32; always a multiple of 256
  // offset[j] | shift[j], one dword per binade: the vector search looks up both with one permute.
  uint32_t shift_offset[kPlaneBinades];
  uint8_t count[256];
  uint8_t thr_lo[256];
  uint8_t thr_hi[256];
};

// Fills `out` for the sorted 256-entry `code` and its 256 midpoints (the last is the +inf sentinel).
void build_byte_planes(const float* code, const float* mids, BytePlanes* out);
// Fills only `planes` (dequantizing needs no search tables, nor a sorted code); search_usable = false.
void build_byte_plane_lookup(const float* code, BytePlanes* out);

// The 16-bit position x of Note [gather-free lookups] for the bits of a value s with |s| < 2: the scalar
// statement of what the vector search computes, used by the builder and by tests.
inline uint32_t byte_plane_position(const BytePlanes& t, uint32_t bits) {
  if (t.positive_only && (bits & 0x80000000u)) bits = 0;
  const uint32_t a = bits & 0x7fffffffu;
  uint32_t e = a >> 23;
  if (e < kPlaneMinExponent) e = kPlaneMinExponent;
  const uint32_t j = (e - kPlaneMinExponent) & uint32_t(kPlaneBinades - 1);
  uint32_t x = (a >> t.shift[j]) + uint32_t(t.offset[j]);  // shift <= 31; a < 2^31, so a >> 31 = 0
  if (bits & 0x80000000u) x ^= 0xffffu;
  return x;
}

}  // namespace kbit
