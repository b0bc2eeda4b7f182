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

// The base position and the number of positions of binade e (its exponent) in a finished layout.
uint32_t binade_shift(const BytePlanes& t, uint32_t e) { return plane_shift(t, e & uint32_t(kPlaneBinades - 1)); }
uint32_t binade_base(const BytePlanes& t, uint32_t e) { return t.offset[e & uint32_t(kPlaneBinades - 1)] + (e << (23 - binade_shift(t, e))); }
uint32_t binade_span(const BytePlanes& t, uint32_t e) { return 1u << (23 - binade_shift(t, e)); }

// Places the binades on the position line (Note [gather-free lookups]); false when the map does not fit.
// Each binade takes the fewest positions (the largest shift) that keep at most two thresholds of each
// sign in every sub-bin, counting those of the binades below that share its first sub-bin; it starts
// right after the previous one (at the next position = shift mod 32) or, failing that, in a fresh sub-bin.
bool lay_out_binades(const std::vector<uint32_t> (&mants)[kPlaneBinades][2], uint32_t e_min, uint32_t limit,
                     BytePlanes* t) {
  std::vector<int> load[2] = {std::vector<int>(limit / 256, 0), std::vector<int>(limit / 256, 0)};
  uint32_t next = 0;
  for (uint32_t e = e_min; e <= 127; ++e) {
    const uint32_t j = e & uint32_t(kPlaneBinades - 1);
    bool placed = false;
    for (int s = kPlaneMaxShift; s >= 0 && !placed; --s) {
      const uint32_t span = 1u << (23 - s);
      for (uint32_t start : {next, (next + 255u) & ~255u}) {
        const uint32_t base = start + ((uint32_t(s) - start) & 31u);
        if (base + span > limit) continue;
        std::vector<int> trial[2] = {load[0], load[1]};
        bool fits = true;
        for (int side = 0; side < 2 && fits; ++side)
          for (uint32_t m : mants[j][side])
            fits = fits && ++trial[side][(base + (m >> s)) >> 8] <= kPlaneMaxThresholdsPerBin;
        if (!fits) continue;
        load[0].swap(trial[0]);
        load[1].swap(trial[1]);
        t->offset[j] = base - (e << (23 - s));  // = base = s (mod 32): (e << (23 - s)) is a multiple of 256
        next = base + span;
        placed = true;
        break;
      }
    }
    if (!placed) return false;
  }
  return true;
}

// Lays out the sub-bins and fills the search tables; false when the map does not fit the scheme.
bool build_search(const float* mids, BytePlanes* t) {
  // |midpoint| mantissas per binade (exponent mod 32) and sign.
  std::vector<uint32_t> mants[kPlaneBinades][2];
  t->positive_only = true;
  for (int i = 0; i < 255; ++i) t->positive_only = t->positive_only && mids[i] > 0.0f;
  uint32_t e_min = 255;
  for (int i = 0; i < 255; ++i) {
    const uint32_t bits = f32_bits(mids[i]);
    const uint32_t a = bits & 0x7fffffffu, e = a >> 23;
    // A midpoint at 0, below the lowest floor or at |s| >= 2 cannot be placed.
    if (a == 0 || e < kPlaneMinExponent || e > 127) return false;
    mants[e & uint32_t(kPlaneBinades - 1)][bits >> 31].push_back(a & 0x7fffffu);
    e_min = std::min(e_min, e);
  }
  // A negative midpoint at -floor would change the codes of the values raised to it: floor one binade lower.
  bool midpoint_at_floor = false;
  for (int i = 0; i < 255; ++i) midpoint_at_floor |= (f32_bits(mids[i]) & 0x7fffffffu) == (e_min << 23);
  if (midpoint_at_floor && !t->positive_only) e_min -= 1;
  if (e_min < kPlaneMinExponent) return false;
  t->floor_bits = e_min << 23;
  for (int j = 0; j < kPlaneBinades; ++j) t->offset[j] = uint32_t(kPlaneMaxShift);  // binades below the floor: unused
  const uint32_t limit = (t->positive_only ? 256u : uint32_t(kMaxSubBinsPerSign)) * 256u;
  if (!lay_out_binades(mants, e_min, limit, t)) return false;
  // count[sub]: the code of the sub-bin's lowest value (the highest |s| for mirrored negative sub-bins).
  std::memset(t->count, 0, sizeof t->count);
  bool seen[256] = {};
  for (uint32_t e = e_min; e <= 127; ++e) {  // ascending |s|
    const uint32_t base = binade_base(*t, e), span = binade_span(*t, e);
    const uint32_t s = binade_shift(*t, e);
    for (uint32_t w = base >> 8; w <= (base + span - 1) >> 8; ++w) {
      // This binade's lowest and highest mantissa inside sub-bin w.
      const uint64_t first = std::max<uint64_t>(base, uint64_t(w) * 256u) - base;
      const uint64_t last = std::min<uint64_t>(base + span - 1, uint64_t(w) * 256u + 255u) - base;
      const uint32_t low = (e << 23) | uint32_t(first << s);
      const uint32_t high = (e << 23) | uint32_t(((last + 1) << s) - 1);
      // The first binade reaching w holds its lowest value; the last one its highest |s|, which is the
      // lowest value of the mirrored negative sub-bin.
      if (!seen[w]) t->count[w] = nearest_code_index(f32_from_bits(low), mids);
      seen[w] = true;
      if (!t->positive_only) t->count[255 - w] = nearest_code_index(f32_from_bits(high | 0x80000000u), mids);
    }
  }
  std::memset(t->thr_lo, 255, sizeof t->thr_lo);
  std::memset(t->thr_hi, 255, sizeof t->thr_hi);
  for (int i = 0; i < 255; ++i) {
    const uint32_t x = byte_plane_position(*t, f32_bits(mids[i]));
    const uint32_t sub = x >> 8;
    const uint8_t p8 = uint8_t(std::min<uint32_t>(x & 0xffu, 254u));
    if (t->thr_lo[sub] == 255) {
      t->thr_lo[sub] = p8;
    } else if (t->thr_hi[sub] == 255) {
      t->thr_hi[sub] = std::max(p8, t->thr_lo[sub]);
      t->thr_lo[sub] = std::min(p8, t->thr_lo[sub]);
    } else {
      return false;
    }
  }
  // Self-check against the reference search around every midpoint, at every binade's ends and at the
  // floor: a layout bug would otherwise be silently wrong codes.
  std::vector<uint32_t> probes;
  for (int i = 0; i < 255; ++i)
    for (int d = -3; d <= 3; ++d) probes.push_back(f32_bits(mids[i]) + uint32_t(d));
  for (uint32_t e = e_min; e <= 127; ++e)
    for (uint32_t m : {0u, 1u, 0x7ffffeu, 0x7fffffu}) probes.push_back((e << 23) | m);
  for (uint32_t a : {0u, 1u, t->floor_bits - 1u, t->floor_bits, 0x3f800000u, 0x3f800001u}) probes.push_back(a);
  for (uint32_t a : probes) {
    for (uint32_t sign : {0u, 0x80000000u}) {
      const float s = f32_from_bits((a & 0x7fffffffu) | sign);
      if (!(s >= -1.999f && s <= 1.999f)) continue;
      const int got = formula_code(*t, s);
      if (got >= 0 && got != nearest_code_index(s, mids)) return false;
    }
  }
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
