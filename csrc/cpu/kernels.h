// kernels.h — the signatures every ISA level implements, and the table the dispatcher fills.
//
// All sizes are int64_t element counts; tensors larger than 2^31 elements index correctly. Callers
// (bindings.cpp) have already checked that every buffer is large enough for the sizes passed here.
#pragma once

#include <cstdint>

#include "gemv_4bit.h"
#include "optim_call.h"
#include "scalar_ops.h"

namespace kbit {

// Note [threads]
// `threads` is torch.get_num_threads() of the calling Python thread: the kernels open an OpenMP
// region of that size only when the work is large enough to repay it (~3 us per region).
struct KernelTable {
  const char* name;

  // 8-bit blockwise: absmax[b] = max |x| of block b; codes[k] = nearest code entry of x[k] / absmax.
  // `mids` is the 256-float midpoint table of a sorted code (see CodeLut in code_lut.h).
  void (*quantize_blockwise_f32)(const float* x, int64_t n, int64_t blocksize, const struct CodeLut* lut,
                                 float* absmax, uint8_t* codes, int threads);
  void (*quantize_blockwise_bf16)(const bf16_t* x, int64_t n, int64_t blocksize, const struct CodeLut* lut,
                                  float* absmax, uint8_t* codes, int threads);
  void (*quantize_blockwise_f16)(const f16_t* x, int64_t n, int64_t blocksize, const struct CodeLut* lut,
                                 float* absmax, uint8_t* codes, int threads);

  // out[k] = code[codes[k]] * absmax[k / blocksize], in float32, stored with one rounding.
  void (*dequantize_blockwise_f32)(const uint8_t* codes, int64_t n, int64_t blocksize, const float* code,
                                   const float* absmax, float* out, int threads);
  void (*dequantize_blockwise_bf16)(const uint8_t* codes, int64_t n, int64_t blocksize, const float* code,
                                    const float* absmax, bf16_t* out, int threads);
  void (*dequantize_blockwise_f16)(const uint8_t* codes, int64_t n, int64_t blocksize, const float* code,
                                   const float* absmax, f16_t* out, int threads);

  // 4-bit: packed holds (n + 1) / 2 bytes, Note [nibble order]. blocksize is even (32..4096).
  void (*quantize_4bit_f32)(const float* x, int64_t n, int64_t blocksize, formats::QuantType4bit qt,
                            float* absmax, uint8_t* packed, int threads);
  void (*quantize_4bit_bf16)(const bf16_t* x, int64_t n, int64_t blocksize, formats::QuantType4bit qt,
                             float* absmax, uint8_t* packed, int threads);
  void (*quantize_4bit_f16)(const f16_t* x, int64_t n, int64_t blocksize, formats::QuantType4bit qt,
                            float* absmax, uint8_t* packed, int threads);

  void (*dequantize_4bit_f32)(const uint8_t* packed, int64_t n, int64_t blocksize, formats::QuantType4bit qt,
                              const float* absmax, float* out, int threads);
  void (*dequantize_4bit_bf16)(const uint8_t* packed, int64_t n, int64_t blocksize, formats::QuantType4bit qt,
                               const float* absmax, bf16_t* out, int threads);
  void (*dequantize_4bit_f16)(const uint8_t* packed, int64_t n, int64_t blocksize, formats::QuantType4bit qt,
                              const float* absmax, f16_t* out, int threads);

  // Fused optimizer steps, one per rule family (optim_rules.h, optim_call.h).
  void (*optim_adam)(const OptimCall<AdamRule>& call, int threads);
  void (*optim_ademamix)(const OptimCall<AdEMAMixRule>& call, int threads);
  void (*optim_lion)(const OptimCall<LionRule>& call, int threads);
  void (*optim_momentum)(const OptimCall<MomentumRule>& call, int threads);
  void (*optim_rmsprop)(const OptimCall<RMSpropRule>& call, int threads);
  void (*optim_adagrad)(const OptimCall<AdagradRule>& call, int threads);

  // out[m][n] = sum_k x[m][k] * W[n][k] for a 4-bit W and at most kGemvMaxRows rows (gemv_4bit.h).
  void (*gemv_4bit)(const Gemv4bitArgs& args, int threads);
};

// One table per ISA level; each is defined in its own translation unit, compiled with only that
// level's flags. avx2/avx512 tables exist only when the compiler can target them.
extern const KernelTable kScalarKernels;
extern const KernelTable kAvx2Kernels;
extern const KernelTable kAvx512Kernels;
extern const KernelTable kAvx512VbmiKernels;

// Fills a KernelTable from the templates of namespace NS (one line per unit, same order as above).
#define KBIT_KERNEL_TABLE(NS, NAME)                                                                          \
  {                                                                                                          \
    NAME, NS::quantize_blockwise<float>, NS::quantize_blockwise<bf16_t>, NS::quantize_blockwise<f16_t>,      \
        NS::dequantize_blockwise<float>, NS::dequantize_blockwise<bf16_t>, NS::dequantize_blockwise<f16_t>, \
        NS::quantize_4bit<float>, NS::quantize_4bit<bf16_t>, NS::quantize_4bit<f16_t>,                       \
        NS::dequantize_4bit<float>, NS::dequantize_4bit<bf16_t>, NS::dequantize_4bit<f16_t>,                 \
        NS::optim_entry<AdamRule>, NS::optim_entry<AdEMAMixRule>, NS::optim_entry<LionRule>,                 \
        NS::optim_entry<MomentumRule>, NS::optim_entry<RMSpropRule>, NS::optim_entry<AdagradRule>,           \
        NS::gemv_4bit,                                                                                       \
  }

}  // namespace kbit
