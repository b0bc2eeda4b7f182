// optim_call.h — what one fused optimizer call receives: a group of tensors that share a rule's
// hyper-parameters and a state format, each with its own parameter, gradient, states and step scalars.
// The multi-tensor form keeps a step over hundreds of small tensors from being dominated by the
// per-call cost of Python and the binding layer.
#pragma once

#include <cstdint>

#include "code_lut.h"
#include "optim_rules.h"

namespace kbit {

enum class ParamDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Note [4-bit optimizer states]
// A 4-bit state stores two codes per byte, element 2i in the high nibble and 2i+1 in the low one (the
// order of 4-bit weights), with one absmax per block of an even number of elements, so no byte straddles
// two blocks. Codes index a 16-value map (kbit/formats.py: signed dynamic-exponent map for first moments,
// a zero-free map for second moments); a value's code is the count of the map's midpoints strictly below
// it, as for 8-bit states. 4-bit states are always blockwise and have no trust ratio.

// Largest 8-bit block whose new states are held in a stack buffer between update and requantization.
inline constexpr int64_t kMaxFusedBlock = 4096;
// 32-bit states and tensor-wise 8-bit states are processed in chunks of this many elements.
inline constexpr int64_t kChunk = 4096;

struct OptimTensor {
  void* p;          // parameter (ParamDtype), updated in place
  const void* g;    // gradient, same dtype as p
  int64_t n;        // elements of p (a state has kStates * n values in total)
  float* state32[3];    // 32-bit mode: each logical state (n floats)
  uint8_t* codes[3];    // 8-bit mode: each logical state's codes (n bytes); 4-bit: packed (ceil(n / 2) bytes)
  float* absmax[3];     // quantized modes: per-block absmax (ceil(n / blocksize)), or 1 value when tensor-wise
  float* unorm_out;     // receives the update norm of the trust-ratio test (may be null)
  StepScalars sc;       // gnorm_scale and k (the kernel multiplies k by the trust-ratio scale)
  double unorm_factor;  // the update norm is sqrt(sum u^2) * unorm_factor (1 / bc1 for adam, else 1)
  bool stochastic_round;  // bf16 parameters: written with Note [stochastic rounding] (else round to nearest even)
  uint32_t sr_seed;       // that rounding's per-tensor, per-step seed
};

template <class Rule>
struct OptimCall {
  const OptimTensor* tensors;
  const Rule* rules;  // one per tensor (per-tensor fields differ)
  int64_t ntensors;
  ParamDtype dtype;
  bool eight_bit;                  // quantized states (8-bit, or 4-bit when four_bit)
  bool four_bit;                   // Note [4-bit optimizer states]
  int64_t blocksize;               // quantized: block size (<= kMaxFusedBlock), or 0 for one absmax per tensor
  const CodeLut* luts[3];          // 8-bit: the code map of each logical state
  const float* code4[3];           // 4-bit: each logical state's 16-value code map (sorted)
  const float* mids4[3];           // 4-bit: its 15 midpoints
  bool skip_zeros;
  // Note [trust ratio]
  // With max_unorm > 0 the step is scaled by min(1, (max_unorm * |p| + trust_eps) / |u|_scaled) where
  // |p| is the parameter norm before the step and |u|_scaled = sqrt(sum u^2) * unorm_factor. Both sums
  // come from a pre-pass over the tensor in a fixed order (16 float64 lanes per block, then blocks in
  // order), so every ISA level and thread count computes the same scale.
  float max_unorm;
  float trust_eps;
};

}  // namespace kbit
