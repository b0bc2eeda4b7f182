// optim_rules.h — the element-wise update rule of every optimizer family, written once as templates
// over a math policy M: ScalarMath (float, used by the reference twins and every SIMD tail) or an ISA's
// Ops (a vector of floats). Each rule spells out its float32 operations in a fixed order; with
// -ffp-contract=off the scalar and vector instantiations therefore give identical bits.
//
// Note [optimizer step]
// For every element, in float32:  g <- g * gnorm_scale;  the rule computes the new states and an update
// direction u (decoupled weight decay, where the family has it, multiplies p first);  p <- p - k * u,
// where k is the per-tensor step size (times the trust-ratio scale, Note [trust ratio]). With skip_zeros
// an element whose scaled gradient is exactly 0 keeps its parameter and states. In 8-bit mode states are
// read dequantized and written quantized (optim-inl.h); the parameter is always updated from the
// unquantized new states, so quantization error only reaches the next step.
#pragma once

#include <cmath>
#include <cstdint>

#include "scalar_ops.h"

namespace kbit {

// ---- the rules' parameters: plain data, passed to every ISA level -----------------------------------
// Fields marked "per tensor" depend on the step or lr and are filled for each tensor of a call.

// Adam / AdamW / LAMB ("adam"), states m, v:
//   p <- p (1 - lr wd);  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;  u = m / (sqrt(v) * (1/bc2) + eps);
//   k = lr / bc1, with bc1 = 1 - b1^t, bc2 = sqrt(1 - b2^t): torch.optim.AdamW's formulation, except that
//   sqrt(v) is multiplied by the reciprocal of bc2 (a division per element costs as much as the rest of the
//   rule; the results differ from torch's by at most an ulp of the denominator).
struct AdamRule {
  static constexpr int kStates = 2;
  float beta1, beta2, omb1, omb2, eps;
  float decay, inv_bc2;  // per tensor
};

// AdEMAMix (Pagliardini et al. 2024), states m1 (fast EMA), m2 (slow EMA), nu:
//   p <- p (1 - lr wd);  m1 <- b1 m1 + (1-b1) g;  m2 <- b3 m2 + (1-b3) g;  nu <- b2 nu + (1-b2) g^2;
//   u = (m1 * (1/bc1) + alpha m2) / (sqrt(nu) * (1/bc2) + eps);  k = lr.
struct AdEMAMixRule {
  static constexpr int kStates = 3;
  float beta1, beta2, omb1, omb2, eps;
  float beta3, omb3, alpha, decay, inv_bc1, inv_bc2;  // per tensor (beta3 and alpha may follow schedules)
};

// Lion (Chen et al. 2023), state m:  p <- p (1 - lr wd);  u = sign(b1 m + (1-b1) g);  m <- b2 m + (1-b2) g;  k = lr.
struct LionRule {
  static constexpr int kStates = 1;
  float beta1, beta2, omb1, omb2;
  float decay;  // per tensor
};

// SGD with momentum / LARS ("momentum"), state buf — exactly torch.optim.SGD:
//   g' = g + wd p;  buf <- g' on the first step, else momentum buf + (1 - dampening) g';
//   u = nesterov ? g' + momentum buf : buf;  k = lr.
struct MomentumRule {
  static constexpr int kStates = 1;
  float momentum, omd, weight_decay;
  bool nesterov;
  bool first;  // per tensor
};

// RMSprop, state s:  g' = g + wd p;  s <- alpha s + (1-alpha) g'^2;  u = g' / (sqrt(s) + eps);  k = lr.
struct RMSpropRule {
  static constexpr int kStates = 1;
  float alpha, oma, eps, weight_decay;
};

// Adagrad, state s:  g' = g + wd p;  s <- s + g'^2;  u = g' / (sqrt(s) + eps);  k = lr / (1 + (t-1) lr_decay).
struct AdagradRule {
  static constexpr int kStates = 1;
  float eps, weight_decay;
};

// Per-tensor scalars of every rule, computed on the host once per tensor per step.
struct StepScalars {
  float gnorm_scale;  // multiplies the gradient (percentile clipping); 1 otherwise
  float k;            // step size multiplying u (times the trust-ratio scale)
};

// Note [one definition per ISA] (scalar_ops.h): the math is compiled separately by every unit.
namespace {

// The scalar math policy: a "vector" of one float.
struct ScalarMath {
  using F = float;
  using Mask = bool;
  static F set1(float v) { return v; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F sqrt(F a) { return std::sqrt(a); }
  // sign(+-0) = +-0 and sign(NaN) = NaN. torch.sign gives +0 for all three; passing NaN through makes a
  // poisoned Lion state show in the parameter instead of freezing it (docs/numerics.md; the reference matches).
  static F sign(F a) { return a > 0.0f ? 1.0f : (a < 0.0f ? -1.0f : a); }
  static Mask is_zero(F a) { return a == 0.0f; }
  static F select(Mask m, F if_true, F if_false) { return m ? if_true : if_false; }
};

template <class M>
inline void update(const AdamRule& r, typename M::F& p, typename M::F g, typename M::F* s, typename M::F* u) {
  p = M::mul(p, M::set1(r.decay));
  s[0] = M::add(M::mul(M::set1(r.beta1), s[0]), M::mul(M::set1(r.omb1), g));
  s[1] = M::add(M::mul(M::set1(r.beta2), s[1]), M::mul(M::set1(r.omb2), M::mul(g, g)));
  *u = M::div(s[0], M::add(M::mul(M::sqrt(s[1]), M::set1(r.inv_bc2)), M::set1(r.eps)));
}

template <class M>
inline void update(const AdEMAMixRule& r, typename M::F& p, typename M::F g, typename M::F* s, typename M::F* u) {
  p = M::mul(p, M::set1(r.decay));
  s[0] = M::add(M::mul(M::set1(r.beta1), s[0]), M::mul(M::set1(r.omb1), g));
  s[1] = M::add(M::mul(M::set1(r.beta3), s[1]), M::mul(M::set1(r.omb3), g));
  s[2] = M::add(M::mul(M::set1(r.beta2), s[2]), M::mul(M::set1(r.omb2), M::mul(g, g)));
  const typename M::F denom = M::add(M::mul(M::sqrt(s[2]), M::set1(r.inv_bc2)), M::set1(r.eps));
  *u = M::div(M::add(M::mul(s[0], M::set1(r.inv_bc1)), M::mul(M::set1(r.alpha), s[1])), denom);
}

template <class M>
inline void update(const LionRule& r, typename M::F& p, typename M::F g, typename M::F* s, typename M::F* u) {
  p = M::mul(p, M::set1(r.decay));
  *u = M::sign(M::add(M::mul(M::set1(r.beta1), s[0]), M::mul(M::set1(r.omb1), g)));
  s[0] = M::add(M::mul(M::set1(r.beta2), s[0]), M::mul(M::set1(r.omb2), g));
}

template <class M>
inline void update(const MomentumRule& r, typename M::F& p, typename M::F g, typename M::F* s, typename M::F* u) {
  if (r.weight_decay != 0.0f) g = M::add(g, M::mul(M::set1(r.weight_decay), p));
  s[0] = r.first ? g : M::add(M::mul(M::set1(r.momentum), s[0]), M::mul(M::set1(r.omd), g));
  *u = r.nesterov ? M::add(g, M::mul(M::set1(r.momentum), s[0])) : s[0];
}

template <class M>
inline void update(const RMSpropRule& r, typename M::F& p, typename M::F g, typename M::F* s, typename M::F* u) {
  if (r.weight_decay != 0.0f) g = M::add(g, M::mul(M::set1(r.weight_decay), p));
  s[0] = M::add(M::mul(M::set1(r.alpha), s[0]), M::mul(M::set1(r.oma), M::mul(g, g)));
  *u = M::div(g, M::add(M::sqrt(s[0]), M::set1(r.eps)));
}

template <class M>
inline void update(const AdagradRule& r, typename M::F& p, typename M::F g, typename M::F* s, typename M::F* u) {
  if (r.weight_decay != 0.0f) g = M::add(g, M::mul(M::set1(r.weight_decay), p));
  s[0] = M::add(s[0], M::mul(g, g));
  *u = M::div(g, M::add(M::sqrt(s[0]), M::set1(r.eps)));
}

// One element through a rule: gradient scaling, skip_zeros, the update and the parameter write-back,
// Note [optimizer step]. Returns u (0 for a skipped element), which the trust-ratio pre-pass sums.
// Used by the reference twins for every element and by the SIMD kernels for their tails.
template <class Rule>
inline float step_element(const Rule& rule, const StepScalars& sc, bool skip_zeros, float& p, float g, float* s) {
  g = g * sc.gnorm_scale;
  if (skip_zeros && g == 0.0f) return 0.0f;
  float u;
  update<ScalarMath>(rule, p, g, s, &u);
  p = p - sc.k * u;
  return u;
}

}  // namespace
}  // namespace kbit
