// optim_bindings.cpp — the Python boundary of the fused optimizer kernels (see bindings.cpp for the rules:
// typed arrays, no silent copies, every size re-checked, GIL released).
//
// One function per rule family. Each takes a group of tensors that share the family's hyper-parameters
// and state format (the Python optimizer groups them), the states as the optimizer stores them
// (state1/state2 storage, per-block absmax storage, code maps), and the per-tensor scalars lr, step and
// gnorm_scale. Per-tensor step sizes, bias corrections and decays are computed here in float64 and
// rounded once to float32 — kbit/backends/reference.py computes the same scalars the same way.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kbit {
namespace {

using Array = nb::ndarray<nb::device::cpu, nb::c_contig>;
using Arrays = std::vector<Array>;

[[noreturn]] void fail(const std::string& message) { throw nb::value_error(message.c_str()); }

ParamDtype param_dtype(const Array& a) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return ParamDtype::kF32;
  if (dt.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16) return ParamDtype::kBF16;
  if (dt.code == uint8_t(nb::dlpack::dtype_code::Float) && dt.bits == 16) return ParamDtype::kF16;
  throw nb::type_error("parameters must be float32, bfloat16 or float16");
}

// The shared part of every family's call: tensors, states, code maps, per-tensor scalars.
struct Group {
  std::vector<OptimTensor> tensors;
  std::vector<std::shared_ptr<const CodeLut>> luts;
  ParamDtype dtype = ParamDtype::kF32;
  bool eight_bit = false;
  bool four_bit = false;                   // Note [4-bit optimizer states]
  std::vector<const float*> code4, mids4;  // 4-bit: per logical state
  std::vector<std::vector<float>> mids4_storage;
  int64_t blocksize = 0;
};

// `storage[j][i]` is storage tensor j (state1, state2) of tensor i, holding rows[j] logical states of n
// values each; `absmax[j][i]` its absmax (rows[j] x blocks) in 8-bit mode; `qmaps[j]` its code map.
Group build_group(const Arrays& params, const Arrays& grads, const std::vector<Arrays>& storage,
                  const std::vector<Arrays>& absmax, const Arrays& qmaps, const std::vector<int>& rows,
                  int64_t blocksize, const std::vector<double>& gnorm_scale, Arrays& unorm_out) {
  Group grp;
  const size_t nt = params.size();
  if (grads.size() != nt || gnorm_scale.size() != nt) fail("params, grads and gnorm_scale must have the same length");
  if (!unorm_out.empty() && unorm_out.size() != nt) fail("unorm_out must be empty or have one entry per parameter");
  if (storage.size() != rows.size()) fail("wrong number of state storage lists for this optimizer");
  for (const Arrays& s : storage)
    if (s.size() != nt) fail("every state list must have one entry per parameter");
  if (nt == 0) return grp;
  grp.dtype = param_dtype(params[0]);
  grp.eight_bit = storage[0][0].dtype() == nb::dtype<uint8_t>();
  if (grp.eight_bit) {
    if (absmax.size() != rows.size() || qmaps.size() != rows.size()) fail("8-bit states need absmax and qmap for every state");
    for (const Arrays& a : absmax)
      if (a.size() != nt) fail("every absmax list must have one entry per parameter");
    if (blocksize < 0 || blocksize > kMaxFusedBlock)
      fail("8-bit optimizer blocksize must be in 1.." + std::to_string(kMaxFusedBlock) + ", or 0 for one absmax per tensor");
    grp.four_bit = qmaps[0].size() == 16;
    const size_t code_size = grp.four_bit ? 16 : 256;
    grp.mids4_storage.reserve(rows.size());  // pointers into it are kept
    for (size_t j = 0; j < rows.size(); ++j) {
      const Array& q = qmaps[j];
      if (q.dtype() != nb::dtype<float>() || q.size() != code_size)
        fail("qmaps must all be 256 float32 values (8-bit states) or all 16 (4-bit states)");
      const float* c = static_cast<const float*>(q.data());
      for (size_t i = 0; i < code_size; ++i)
        if (c[i] != c[i]) fail("qmap must not contain NaN");
      for (size_t i = 0; i + 1 < code_size; ++i)
        if (c[i] > c[i + 1]) fail("qmap must be sorted ascending");
      if (grp.four_bit) {
        std::vector<float> mids(16, std::numeric_limits<float>::infinity());
        for (int i = 0; i < 15; ++i) mids[size_t(i)] = (c[i] + c[i + 1]) / 2.0f;
        grp.mids4_storage.push_back(std::move(mids));
        for (int r = 0; r < rows[j]; ++r) {
          grp.code4.push_back(c);
          grp.mids4.push_back(grp.mids4_storage.back().data());
        }
      } else {
        const auto lut = get_code_lut(c);
        for (int r = 0; r < rows[j]; ++r) grp.luts.push_back(lut);
      }
    }
    if (grp.four_bit && (blocksize <= 0 || blocksize % 2 != 0))
      fail("4-bit optimizer states need an even blocksize (they are always blockwise)");
    grp.blocksize = blocksize;
  }
  for (size_t i = 0; i < nt; ++i) {
    const Array& p = params[i];
    const Array& g = grads[i];
    if (param_dtype(p) != grp.dtype || g.dtype() != p.dtype())
      throw nb::type_error("all parameters of a group and their gradients must share one dtype");
    const int64_t n = int64_t(p.size());
    if (int64_t(g.size()) != n) fail("gradient size differs from its parameter's");
    OptimTensor t{};
    t.p = p.data();
    t.g = g.data();
    t.n = n;
    t.sc.gnorm_scale = float(gnorm_scale[i]);
    t.unorm_factor = 1.0;
    t.unorm_out = nullptr;
    if (!unorm_out.empty()) {
      if (unorm_out[i].dtype() != nb::dtype<float>() || unorm_out[i].size() < 1) fail("unorm_out entries must be float32");
      t.unorm_out = static_cast<float*>(unorm_out[i].data());
    }
    const int64_t blocks = grp.eight_bit && blocksize > 0 ? ceil_div(n, blocksize) : 1;
    const int64_t row_bytes = grp.four_bit ? ceil_div(n, int64_t(2)) : n;  // a quantized logical state's storage
    int k = 0;
    for (size_t j = 0; j < rows.size(); ++j) {
      const Array& s = storage[j][i];
      const int64_t row_size = grp.eight_bit ? row_bytes : n;
      if (int64_t(s.size()) != rows[j] * row_size)
        fail("state size does not match its parameter (" + std::to_string(s.size()) + " values for " +
             std::to_string(n) + " elements" + (grp.four_bit ? " in 4-bit codes, two per byte)" : ")"));
      if (grp.eight_bit) {
        if (s.dtype() != nb::dtype<uint8_t>()) throw nb::type_error("8-bit states must all be uint8");
        const Array& a = absmax[j][i];
        if (a.dtype() != nb::dtype<float>()) throw nb::type_error("absmax must be float32");
        if (int64_t(a.size()) != rows[j] * blocks) fail("absmax size does not match the state and blocksize");
        for (int r = 0; r < rows[j]; ++r, ++k) {
          t.codes[k] = static_cast<uint8_t*>(s.data()) + r * row_bytes;
          t.absmax[k] = static_cast<float*>(a.data()) + r * blocks;
        }
      } else {
        if (s.dtype() != nb::dtype<float>()) throw nb::type_error("32-bit states must all be float32");
        for (int r = 0; r < rows[j]; ++r, ++k) t.state32[k] = static_cast<float*>(s.data()) + r * n;
      }
    }
    grp.tensors.push_back(t);
  }
  return grp;
}

void check_lengths(size_t nt, const std::vector<double>& lr, const std::vector<int64_t>& step) {
  if (lr.size() != nt || step.size() != nt) fail("lr and step must have one entry per parameter");
  for (int64_t s : step)
    if (s < 1) fail("step must be >= 1 (it counts the step being taken)");
}

// Per-tensor seeds of Note [stochastic rounding]; empty: every parameter is rounded to nearest even.
void set_stochastic_rounding(Group& grp, const std::vector<int64_t>& sr_seed) {
  if (sr_seed.empty()) return;
  if (sr_seed.size() != grp.tensors.size()) fail("sr_seed must be empty or have one entry per parameter");
  if (grp.dtype != ParamDtype::kBF16) fail("stochastic rounding applies to bfloat16 parameters only");
  for (size_t i = 0; i < sr_seed.size(); ++i) {
    if (sr_seed[i] < 0 || sr_seed[i] > int64_t(UINT32_MAX)) fail("sr_seed values must be in 0..2^32-1");
    grp.tensors[i].stochastic_round = true;
    grp.tensors[i].sr_seed = uint32_t(sr_seed[i]);
  }
}

template <class Rule>
void launch(const Group& grp, const std::vector<Rule>& rules, void (*fn)(const OptimCall<Rule>&, int), bool skip_zeros,
            double max_unorm, double trust_eps, int threads) {
  OptimCall<Rule> call{};
  call.tensors = grp.tensors.data();
  call.rules = rules.data();
  call.ntensors = int64_t(grp.tensors.size());
  call.dtype = grp.dtype;
  call.eight_bit = grp.eight_bit;
  call.four_bit = grp.four_bit;
  call.blocksize = grp.blocksize;
  for (size_t k = 0; k < grp.luts.size() && k < 3; ++k) call.luts[k] = grp.luts[k].get();
  for (size_t k = 0; k < grp.code4.size() && k < 3; ++k) {
    call.code4[k] = grp.code4[k];
    call.mids4[k] = grp.mids4[k];
  }
  if (grp.four_bit && max_unorm > 0.0) fail("4-bit optimizer states do not support a trust ratio (max_unorm)");
  call.skip_zeros = skip_zeros;
  call.max_unorm = float(max_unorm);
  call.trust_eps = float(trust_eps);
  nb::gil_scoped_release release;
  fn(call, threads);
}

void adam_step(Arrays params, Arrays grads, Arrays state1, Arrays state2, Arrays absmax1, Arrays absmax2, Arrays qmaps,
               int64_t blocksize, std::vector<double> lr, std::vector<int64_t> step, std::vector<double> gnorm_scale,
               Arrays unorm_out, double beta1, double beta2, double eps, double weight_decay, double max_unorm,
               bool skip_zeros, bool bias_correction, std::vector<int64_t> sr_seed, int threads) {
  std::vector<Arrays> absmax;
  if (!absmax1.empty()) absmax = {absmax1, absmax2};
  Group grp = build_group(params, grads, {state1, state2}, absmax, qmaps, {1, 1}, blocksize, gnorm_scale, unorm_out);
  check_lengths(grp.tensors.size(), lr, step);
  set_stochastic_rounding(grp, sr_seed);
  std::vector<AdamRule> rules(grp.tensors.size());
  for (size_t i = 0; i < rules.size(); ++i) {
    const double bc1 = bias_correction ? 1.0 - std::pow(beta1, double(step[i])) : 1.0;
    const double bc2 = bias_correction ? std::sqrt(1.0 - std::pow(beta2, double(step[i]))) : 1.0;
    rules[i] = {float(beta1), float(beta2), float(1.0 - beta1), float(1.0 - beta2), float(eps),
                float(1.0 - lr[i] * weight_decay), float(1.0 / bc2)};
    grp.tensors[i].sc.k = float(lr[i] / bc1);
    grp.tensors[i].unorm_factor = 1.0 / bc1;
  }
  launch(grp, rules, active_kernels().optim_adam, skip_zeros, max_unorm, 0.0, threads);
}

void ademamix_step(Arrays params, Arrays grads, Arrays state1, Arrays state2, Arrays absmax1, Arrays absmax2,
                   Arrays qmaps, int64_t blocksize, std::vector<double> lr, std::vector<int64_t> step,
                   std::vector<double> gnorm_scale, std::vector<double> beta3, std::vector<double> alpha, double beta1,
                   double beta2, double eps, double weight_decay, std::vector<int64_t> sr_seed, int threads) {
  std::vector<Arrays> absmax;
  if (!absmax1.empty()) absmax = {absmax1, absmax2};
  Arrays no_unorm;
  Group grp = build_group(params, grads, {state1, state2}, absmax, qmaps, {2, 1}, blocksize, gnorm_scale, no_unorm);
  check_lengths(grp.tensors.size(), lr, step);
  set_stochastic_rounding(grp, sr_seed);
  if (beta3.size() != grp.tensors.size() || alpha.size() != grp.tensors.size())
    fail("beta3 and alpha must have one entry per parameter");
  std::vector<AdEMAMixRule> rules(grp.tensors.size());
  for (size_t i = 0; i < rules.size(); ++i) {
    const double bc1 = 1.0 - std::pow(beta1, double(step[i]));
    const double bc2 = std::sqrt(1.0 - std::pow(beta2, double(step[i])));
    rules[i] = {float(beta1), float(beta2), float(1.0 - beta1), float(1.0 - beta2), float(eps), float(beta3[i]),
                float(1.0 - beta3[i]), float(alpha[i]), float(1.0 - lr[i] * weight_decay), float(1.0 / bc1),
                float(1.0 / bc2)};
    grp.tensors[i].sc.k = float(lr[i]);
  }
  launch(grp, rules, active_kernels().optim_ademamix, false, 0.0, 0.0, threads);
}

void lion_step(Arrays params, Arrays grads, Arrays state1, Arrays absmax1, Arrays qmaps, int64_t blocksize,
               std::vector<double> lr, std::vector<int64_t> step, std::vector<double> gnorm_scale, double beta1,
               double beta2, double weight_decay, bool skip_zeros, std::vector<int64_t> sr_seed, int threads) {
  std::vector<Arrays> absmax;
  if (!absmax1.empty()) absmax = {absmax1};
  Arrays no_unorm;
  Group grp = build_group(params, grads, {state1}, absmax, qmaps, {1}, blocksize, gnorm_scale, no_unorm);
  check_lengths(grp.tensors.size(), lr, step);
  set_stochastic_rounding(grp, sr_seed);
  std::vector<LionRule> rules(grp.tensors.size());
  for (size_t i = 0; i < rules.size(); ++i) {
    rules[i] = {float(beta1), float(beta2), float(1.0 - beta1), float(1.0 - beta2), float(1.0 - lr[i] * weight_decay)};
    grp.tensors[i].sc.k = float(lr[i]);
  }
  launch(grp, rules, active_kernels().optim_lion, skip_zeros, 0.0, 0.0, threads);
}

void momentum_step(Arrays params, Arrays grads, Arrays state1, Arrays absmax1, Arrays qmaps, int64_t blocksize,
                   std::vector<double> lr, std::vector<int64_t> step, std::vector<double> gnorm_scale,
                   Arrays unorm_out, double momentum, double dampening, double weight_decay, bool nesterov,
                   double max_unorm, double trust_eps, bool skip_zeros, std::vector<int64_t> sr_seed, int threads) {
  std::vector<Arrays> absmax;
  if (!absmax1.empty()) absmax = {absmax1};
  Group grp = build_group(params, grads, {state1}, absmax, qmaps, {1}, blocksize, gnorm_scale, unorm_out);
  check_lengths(grp.tensors.size(), lr, step);
  set_stochastic_rounding(grp, sr_seed);
  std::vector<MomentumRule> rules(grp.tensors.size());
  for (size_t i = 0; i < rules.size(); ++i) {
    rules[i] = {float(momentum), float(1.0 - dampening), float(weight_decay), nesterov, step[i] == 1};
    grp.tensors[i].sc.k = float(lr[i]);
  }
  launch(grp, rules, active_kernels().optim_momentum, skip_zeros, max_unorm, trust_eps, threads);
}

void rmsprop_step(Arrays params, Arrays grads, Arrays state1, Arrays absmax1, Arrays qmaps, int64_t blocksize,
                  std::vector<double> lr, std::vector<int64_t> step, std::vector<double> gnorm_scale, Arrays unorm_out,
                  double alpha, double eps, double weight_decay, double max_unorm, bool skip_zeros,
                  std::vector<int64_t> sr_seed, int threads) {
  std::vector<Arrays> absmax;
  if (!absmax1.empty()) absmax = {absmax1};
  Group grp = build_group(params, grads, {state1}, absmax, qmaps, {1}, blocksize, gnorm_scale, unorm_out);
  check_lengths(grp.tensors.size(), lr, step);
  set_stochastic_rounding(grp, sr_seed);
  std::vector<RMSpropRule> rules(grp.tensors.size());
  for (size_t i = 0; i < rules.size(); ++i) {
    rules[i] = {float(alpha), float(1.0 - alpha), float(eps), float(weight_decay)};
    grp.tensors[i].sc.k = float(lr[i]);
  }
  launch(grp, rules, active_kernels().optim_rmsprop, skip_zeros, max_unorm, eps, threads);
}

void adagrad_step(Arrays params, Arrays grads, Arrays state1, Arrays absmax1, Arrays qmaps, int64_t blocksize,
                  std::vector<double> lr, std::vector<int64_t> step, std::vector<double> gnorm_scale, double eps,
                  double weight_decay, double lr_decay, bool skip_zeros, std::vector<int64_t> sr_seed, int threads) {
  std::vector<Arrays> absmax;
  if (!absmax1.empty()) absmax = {absmax1};
  Arrays no_unorm;
  Group grp = build_group(params, grads, {state1}, absmax, qmaps, {1}, blocksize, gnorm_scale, no_unorm);
  check_lengths(grp.tensors.size(), lr, step);
  set_stochastic_rounding(grp, sr_seed);
  std::vector<AdagradRule> rules(grp.tensors.size());
  for (size_t i = 0; i < rules.size(); ++i) {
    rules[i] = {float(eps), float(weight_decay)};
    grp.tensors[i].sc.k = float(lr[i] / (1.0 + double(step[i] - 1) * lr_decay));
  }
  launch(grp, rules, active_kernels().optim_adagrad, skip_zeros, 0.0, 0.0, threads);
}

}  // namespace

void register_optim_bindings(nb::module_& m) {
  const auto a = [](const char* name) { return nb::arg(name).noconvert(); };
  m.def("adam_step", &adam_step, a("params"), a("grads"), a("state1"), a("state2"), a("absmax1"), a("absmax2"),
        a("qmaps"), "blocksize"_a, "lr"_a, "step"_a, "gnorm_scale"_a, a("unorm_out"), "beta1"_a, "beta2"_a, "eps"_a,
        "weight_decay"_a, "max_unorm"_a, "skip_zeros"_a, "bias_correction"_a, "sr_seed"_a, "threads"_a);
  m.def("ademamix_step", &ademamix_step, a("params"), a("grads"), a("state1"), a("state2"), a("absmax1"), a("absmax2"),
        a("qmaps"), "blocksize"_a, "lr"_a, "step"_a, "gnorm_scale"_a, "beta3"_a, "alpha"_a, "beta1"_a, "beta2"_a,
        "eps"_a, "weight_decay"_a, "sr_seed"_a, "threads"_a);
  m.def("lion_step", &lion_step, a("params"), a("grads"), a("state1"), a("absmax1"), a("qmaps"), "blocksize"_a, "lr"_a,
        "step"_a, "gnorm_scale"_a, "beta1"_a, "beta2"_a, "weight_decay"_a, "skip_zeros"_a, "sr_seed"_a, "threads"_a);
  m.def("momentum_step", &momentum_step, a("params"), a("grads"), a("state1"), a("absmax1"), a("qmaps"), "blocksize"_a,
        "lr"_a, "step"_a, "gnorm_scale"_a, a("unorm_out"), "momentum"_a, "dampening"_a, "weight_decay"_a, "nesterov"_a,
        "max_unorm"_a, "trust_eps"_a, "skip_zeros"_a, "sr_seed"_a, "threads"_a);
  m.def("rmsprop_step", &rmsprop_step, a("params"), a("grads"), a("state1"), a("absmax1"), a("qmaps"), "blocksize"_a,
        "lr"_a, "step"_a, "gnorm_scale"_a, a("unorm_out"), "alpha"_a, "eps"_a, "weight_decay"_a, "max_unorm"_a,
        "skip_zeros"_a, "sr_seed"_a, "threads"_a);
  m.def("adagrad_step", &adagrad_step, a("params"), a("grads"), a("state1"), a("absmax1"), a("qmaps"), "blocksize"_a,
        "lr"_a, "step"_a, "gnorm_scale"_a, "eps"_a, "weight_decay"_a, "lr_decay"_a, "skip_zeros"_a, "sr_seed"_a, "threads"_a);
}

}  // namespace kbit
