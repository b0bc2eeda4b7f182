#include "byte_planes.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "scalar_ops.h"

namespace kbit {
namespace {

// Positive sub-bins count up from 0, mirrored ones down from 255 (all 256 when positive_only).
constexpr int kMaxSubBinsPerSign = 128;

// The code the search formula gives for s, or -1 where the lane would be ambiguous (Note [gather-free lookups]).
int formula_code(const BytePlanes& t, float s) {
  const uint32_t x = byte_plane_position(t, f32_bits(s));
  const uint32_t sub = (x >> 8) & 0xffu, p8 = std::min<uint32_t>(x & 0xffu, 254u);
  if (p8 == t.thr_lo[sub] || p8 == t.thr_hi[sub]) return -1;
  return int(t.count[sub]) + (p8 > t.thr_lo[sub]) + (p8 > t.thr_hi[sub]);
}

// Lays out the sub-bins; false when the map does not fit the scheme.
bool build_search(const float* mids, BytePlanes* t) {
  // |midpoint| bits per binade and sign.
  std::vector<uint32_t> in_binade[kPlaneBinades][2];
  t->positive_only = true;
  for (int i = 0; i < 255; ++i) t->positive_only = t->positive_only && mids[i] > 0.0f;
  const int max_sub_bins = t->positive_only ? 256 : kMaxSubBinsPerSign;
  for (int i = 0; i < 255; ++i) {
    const uint32_t bits = f32_bits(mids[i]);
    const uint32_t a = bits & 0x7fffffffu, e = a >> 23;
    // A midpoint at 0, in binade 0's shared sub-bin or beyond |s| < 2 cannot be placed.
    if (e <= kPlaneMinExponent || e >= kPlaneMinExponent + kPlaneBinades) return false;
    in_binade[e - kPlaneMinExponent][bits >> 31].push_back(a & 0x7fffffu);
  }
  int used = 0;
  for (int j = 0; j < kPlaneBinades; ++j) {
    const uint32_t e = kPlaneMinExponent + uint32_t(j);
    if (in_binade[j][0].empty() && in_binade[j][1].empty()) {
      t->shift[j] = 31;
      t->offset[j] = int32_t(uint32_t(used) * 256u);
      used += 1;
      continue;
    }
    int b = 0;
    for (; b <= 15; ++b) {
      bool fits = true;
      for (const auto& mants : in_binade[j]) {
        std::vector<uint32_t> subs;
        for (uint32_t m : mants) subs.push_back(m >> (23 - b));
        std::sort(subs.begin(), subs.end());
        for (size_t k = kPlaneMaxThresholdsPerBin; k < subs.size(); ++k)
          if (subs[k] == subs[k - kPlaneMaxThresholdsPerBin]) fits = false;
      }
      if (fits) break;
    }
    if (b > 15) return false;  // more than two midpoints within 256 ulps of each other
    t->shift[j] = 15 - b;
    t->offset[j] = int32_t(uint32_t(used) * 256u - (e << (8 + b)));
    used += 1 << b;
    if (used > max_sub_bins) return false;
  }
  if (used > max_sub_bins) return false;
  for (int j = 0; j < kPlaneBinades; ++j) {
    if ((uint32_t(t->offset[j]) & 0xffu) != 0) return false;  // sub-bins start on multiples of 256
    t->shift_offset[j] = uint32_t(t->offset[j]) | uint32_t(t->shift[j]);
  }
  // The lowest value of every sub-bin, in s order, gives its count: no in-bin midpoint is below it.
  std::memset(t->count, 0, sizeof t->count);
  for (int j = 0; j < kPlaneBinades; ++j) {
    const uint32_t e = kPlaneMinExponent + uint32_t(j);
    const int bins = t->shift[j] == 31 ? 1 : 1 << (15 - t->shift[j]);
    const uint32_t width = t->shift[j] == 31 ? (1u << 23) : (1u << (23 - (15 - t->shift[j])));
    for (int k = 0; k < bins; ++k) {
      // Binade 0's sub-bin also holds everything smaller, down to 0.
      const uint32_t low = (j == 0 && bins == 1) ? 0u : (e << 23) + uint32_t(k) * width;
      const uint32_t high = (e << 23) + uint32_t(k + 1) * width - 1u;  // largest |s| bits in the sub-bin
      const uint32_t pos = byte_plane_position(*t, low) >> 8;
      t->count[pos] = nearest_code_index(f32_from_bits(low), mids);
      if (!t->positive_only) t->count[255 - pos] = nearest_code_index(f32_from_bits(high | 0x80000000u), mids);
    }
  }
  std::memset(t->thr_lo, 255, sizeof t->thr_lo);
  std::memset(t->thr_hi, 255, sizeof t->thr_hi);
  for (int i = 0; i < 255; ++i) {
    const uint32_t x = byte_plane_position(*t, f32_bits(mids[i]));
    const uint32_t sub = x >> 8;
    const uint8_t p8 = uint8_t(std::min<uint32_t>(x & 0xffu, 254u));
    if (sub > 255) return false;
    if (t->thr_lo[sub] == 255) {
      t->thr_lo[sub] = p8;
    } else if (t->thr_hi[sub] == 255) {
      t->thr_hi[sub] = std::max(p8, t->thr_lo[sub]);
      t->thr_lo[sub] = std::min(p8, t->thr_lo[sub]);
    } else {
      return false;
    }
  }
  // Self-check against the reference search at and around every midpoint and at the bin edges: a layout
  // bug would otherwise be silently wrong codes.
  for (int i = 0; i < 255; ++i) {
    const uint32_t bits = f32_bits(mids[i]);
    for (int d = -3; d <= 3; ++d) {
      const float s = f32_from_bits(bits + uint32_t(d));
      if (!(s >= -1.999f && s <= 1.999f)) continue;
      const int got = formula_code(*t, s);
      if (got >= 0 && got != nearest_code_index(s, mids)) return false;
    }
  }
  for (float s : {0.0f, -0.0f, 1e-30f, -1e-30f, 1.0f, -1.0f, 1.0000001f, -1.0000001f})
    if (formula_code(*t, s) >= 0 && formula_code(*t, s) != nearest_code_index(s, mids)) return false;
  return true;
}

}  // namespace

void build_byte_plane_lookup(const float* code, BytePlanes* out) {
  for (int i = 0; i < 256; ++i) {
    const uint32_t bits = f32_bits(code[i]);
    for (int k = 0; k < 4; ++k) out->planes[k][i] = uint8_t(bits >> (8 * k));
  }
  out->search_usable = false;
}

void build_byte_planes(const float* code, const float* mids, BytePlanes* out) {
  build_byte_plane_lookup(code, out);
  out->search_usable = build_search(mids, out);
}

}  // namespace kbit
