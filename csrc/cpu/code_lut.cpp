#include "code_lut.h"

#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "scalar_ops.h"

namespace kbit {
namespace {

// Lowest float (in key order) whose key16 is `bin`.
float bin_low(uint32_t bin) {
  const uint32_t key = bin << 16;
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return f32_from_bits(bits);
}

std::shared_ptr<CodeLut> build(const float* code) {
  auto lut = std::make_shared<CodeLut>();
  std::memcpy(lut->code, code, sizeof lut->code);
  for (int i = 0; i < 255; ++i) lut->mids[i] = (code[i] + code[i + 1]) / 2.0f;
  lut->mids[255] = std::numeric_limits<float>::infinity();
  lut->clamp_free = code[0] >= -1.0f && lut->mids[254] < 1.0f;  // sorted: the ends bound the rest
  // bin_count for every bin (NaN lows, beyond -inf and +inf, get 0: NaN lanes are masked to code 0
  // and clamped values never reach them).
  std::vector<uint8_t> count(kLutBins);
  for (uint32_t bin = 0; bin < uint32_t(kLutBins); ++bin) {
    const float low = bin_low(bin);
    count[bin] = low == low ? nearest_code_index(low, lut->mids) : 0;
    const uint32_t first_mid_key = order_key(f32_bits(lut->mids[count[bin]]));
    const uint32_t mid_low = (first_mid_key >> 16) == bin ? (first_mid_key & 0xffffu) : 0xffffu;
    lut->bins[bin] = ((uint32_t(count[bin]) - bin) << 16) + (0xffffu - mid_low);
  }
  // Only bins holding values of [-1, 1] are ever searched (values are clamped first).
  lut->max_in_bin = 0;
  const uint32_t first = order_key16(f32_bits(-1.0f)), last = order_key16(f32_bits(1.0f));
  for (uint32_t bin = first; bin <= last; ++bin) {
    const int inside = int(count[bin + 1]) - int(count[bin]);
    if (inside > lut->max_in_bin) lut->max_in_bin = inside;
  }
  build_byte_planes(lut->code, lut->mids, &lut->planes);
  return lut;
}

}  // namespace

std::shared_ptr<const CodeLut> get_code_lut(const float* code) {
  static std::mutex mu;
  static std::vector<std::shared_ptr<const CodeLut>> cache;  // most recent last
  constexpr size_t kCapacity = 8;
  std::lock_guard<std::mutex> lock(mu);
  for (size_t i = 0; i < cache.size(); ++i) {
    if (std::memcmp(cache[i]->code, code, sizeof(float) * 256) == 0) {
      auto hit = cache[i];
      cache.erase(cache.begin() + long(i));
      cache.push_back(hit);
      return hit;
    }
  }
  std::shared_ptr<const CodeLut> lut = build(code);
  if (cache.size() == kCapacity) cache.erase(cache.begin());
  cache.push_back(lut);
  return lut;
}

}  // namespace kbit
