// optim_driver.h — the ISA-independent part of a fused optimizer call: splitting the tensors into work
// items, the trust-ratio and tensor-wise-absmax pre-passes with their fixed-order reductions, and the
// OpenMP loop. Each ISA unit supplies `Blocks`, its block kernels (kernels_scalar.cpp, optim-inl.h).
#pragma once

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "optim_call.h"
#include "parallel.h"

namespace kbit {
namespace {  // Note [one definition per ISA]

// Sums and maxima one pre-pass work item produces.
struct PrepassOut {
  double sum_u2 = 0.0;      // sum of u^2 (trust ratio)
  double sum_p2 = 0.0;      // sum of p^2 before the step (trust ratio)
  uint32_t max_bits[3] = {0, 0, 0};  // max |new state| bit patterns (tensor-wise 8-bit)
};

// Sum of squares in the fixed order of Note [trust ratio]: element i of a block (offset from the block
// start) goes to lane i % 16; a block's sum is its lanes added in order 0..15.
struct Lanes16 {
  double lane[16] = {};
  void add_sq(int64_t offset, float x) { lane[offset & 15] += double(x) * double(x); }
  double total() const {
    double s = 0.0;
    for (double v : lane) s += v;
    return s;
  }
};

inline uint32_t abs_bits(float x) { return f32_bits(x) & 0x7fffffffu; }
inline float absmax_from_bits(uint32_t bits) {
  return bits > 0x7f800000u ? std::numeric_limits<float>::quiet_NaN() : f32_from_bits(bits);
}

// p[i] = f, rounded once: to nearest even, or for bf16 parameters of a tensor that asks for it,
// Note [stochastic rounding]. Used by the reference twins and every SIMD tail.
template <class T>
inline void write_param(const OptimTensor& t, int64_t i, float f) {
  T* p = static_cast<T*>(t.p) + i;
  if constexpr (std::is_same_v<T, bf16_t>) {
    if (t.stochastic_round) {
      from_f32_stochastic(f, sr_bits(t.sr_seed, uint64_t(i)), p);
      return;
    }
  }
  from_f32(f, p);
}

struct WorkItem {
  int64_t tensor;
  int64_t first, last;  // blocks (8-bit blockwise) or chunks of kChunk elements
};

template <class Blocks, class Rule, class T>
void run_optim_call(const OptimCall<Rule>& call, int threads) {
  const bool blockwise8 = call.eight_bit && call.blocksize > 0;
  const auto unit = [&](const OptimTensor&) { return blockwise8 ? call.blocksize : kChunk; };
  // Work items of roughly kItemElements elements; a tensor smaller than that is one item.
  constexpr int64_t kItemElements = 1 << 15;
  std::vector<WorkItem> items;
  int64_t total = 0;
  for (int64_t ti = 0; ti < call.ntensors; ++ti) {
    const OptimTensor& t = call.tensors[ti];
    if (t.n == 0) continue;
    const int64_t u = unit(t), units = (t.n + u - 1) / u;
    const int64_t per_item = kItemElements / u > 0 ? kItemElements / u : 1;
    for (int64_t first = 0; first < units; first += per_item)
      items.push_back({ti, first, first + per_item < units ? first + per_item : units});
    total += t.n;
  }
  const int64_t nitems = int64_t(items.size());
  const int64_t per_item_avg = nitems ? (total + nitems - 1) / nitems : 0;
  auto for_items = [&](auto&& fn) {
    parallel_for_blocks(nitems, per_item_avg, threads, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) fn(i);
    });
  };
  auto range_of = [&](const WorkItem& it) {
    const int64_t u = unit(call.tensors[it.tensor]);
    const int64_t n = call.tensors[it.tensor].n;
    return std::pair<int64_t, int64_t>{it.first * u, it.last * u < n ? it.last * u : n};
  };

  // Step scalars after the trust ratio, and the new absmax of tensor-wise 8-bit states.
  std::vector<OptimTensor> tensors(call.tensors, call.tensors + call.ntensors);
  std::vector<float> new_absmax(size_t(call.ntensors) * 3, 0.0f);
  const bool tensorwise8 = call.eight_bit && call.blocksize == 0;
  if (call.max_unorm > 0.0f || tensorwise8) {
    std::vector<PrepassOut> out(static_cast<size_t>(nitems));
    for_items([&](int64_t i) {
      const auto [begin, end] = range_of(items[size_t(i)]);
      const OptimTensor& t = call.tensors[items[size_t(i)].tensor];
      Blocks::template prepass<Rule, T>(call, t, call.rules[items[size_t(i)].tensor], begin, end, unit(t),
                                        &out[size_t(i)]);
    });
    std::vector<PrepassOut> per_tensor(static_cast<size_t>(call.ntensors));
    for (int64_t i = 0; i < nitems; ++i) {  // in item order: deterministic
      PrepassOut& acc = per_tensor[size_t(items[size_t(i)].tensor)];
      acc.sum_u2 += out[size_t(i)].sum_u2;
      acc.sum_p2 += out[size_t(i)].sum_p2;
      for (int s = 0; s < Rule::kStates; ++s)
        if (out[size_t(i)].max_bits[s] > acc.max_bits[s]) acc.max_bits[s] = out[size_t(i)].max_bits[s];
    }
    for (int64_t ti = 0; ti < call.ntensors; ++ti) {
      const PrepassOut& acc = per_tensor[size_t(ti)];
      OptimTensor& t = tensors[size_t(ti)];
      if (call.max_unorm > 0.0f) {
        const double unorm = std::sqrt(acc.sum_u2) * t.unorm_factor;
        const double threshold = double(call.max_unorm) * std::sqrt(acc.sum_p2) + double(call.trust_eps);
        const double scale = unorm > threshold && unorm > 0.0 ? threshold / unorm : 1.0;
        t.sc.k = float(double(t.sc.k) * scale);
        if (t.unorm_out) *t.unorm_out = float(unorm);
      }
      for (int s = 0; s < Rule::kStates; ++s) new_absmax[size_t(ti) * 3 + s] = absmax_from_bits(acc.max_bits[s]);
    }
  }

  for_items([&](int64_t i) {
    const WorkItem& it = items[size_t(i)];
    const OptimTensor& t = tensors[size_t(it.tensor)];
    const Rule& r = call.rules[it.tensor];
    if (!call.eight_bit) {
      const auto [begin, end] = range_of(it);
      Blocks::template update32<Rule, T>(call, t, r, begin, end);
    } else if (call.four_bit) {
      Blocks::template update4_blocks<Rule, T>(call, t, r, it.first, it.last);
    } else if (blockwise8) {
      Blocks::template update8_blocks<Rule, T>(call, t, r, it.first, it.last);
    } else {
      const auto [begin, end] = range_of(it);
      float old_am[3];
      for (int s = 0; s < Rule::kStates; ++s) old_am[s] = t.absmax[s][0];
      Blocks::template update8_fixed<Rule, T>(call, t, r, begin, end, old_am, &new_absmax[size_t(it.tensor) * 3]);
    }
  });
  // Tensor-wise absmax is read by every item above, so it is written only now.
  if (tensorwise8) {
    for (int64_t ti = 0; ti < call.ntensors; ++ti)
      for (int s = 0; s < Rule::kStates; ++s)
        if (call.tensors[ti].n > 0) call.tensors[ti].absmax[s][0] = new_absmax[size_t(ti) * 3 + s];
  }
}

// A fused optimizer call at one ISA level (Blocks: that level's block kernels), for the call's dtype.
template <class Blocks, class Rule>
void dispatch_optim_call(const OptimCall<Rule>& call, int threads) {
  switch (call.dtype) {
    case ParamDtype::kF32: run_optim_call<Blocks, Rule, float>(call, threads); break;
    case ParamDtype::kBF16: run_optim_call<Blocks, Rule, bf16_t>(call, threads); break;
    case ParamDtype::kF16: run_optim_call<Blocks, Rule, f16_t>(call, threads); break;
  }
}

}  // namespace
}  // namespace kbit
