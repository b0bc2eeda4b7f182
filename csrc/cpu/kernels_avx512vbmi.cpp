// kernels_avx512vbmi.cpp — the kernel templates compiled for AVX-512 F/BW/VL/DQ + VBMI, whose Ops look up
// and search 8-bit code maps with byte permutes instead of gathers (Note [gather-free lookups]). Only
// this unit gets the VBMI flag; its AVX-512 Ops live in their own namespace (simd_avx512.h).
#include <limits>

#include "code_lut.h"
#include "gemv4_common.h"
#include "kernels.h"
#include "optim_driver.h"
#include "parallel.h"

#define KBIT_AVX512_NAMESPACE avx512vbmi
#include "simd_avx512.h"
#include "simd_avx512_vbmi.h"

namespace kbit {
namespace avx512vbmi {
#include "blockwise-inl.h"
#include "fourbit-inl.h"
#include "optim-inl.h"
#include "gemv4-inl.h"

template <class Rule>
void optim_entry(const OptimCall<Rule>& call, int threads) {
  dispatch_optim_call<OptimBlocks>(call, threads);
}
}  // namespace avx512vbmi

const KernelTable kAvx512VbmiKernels = KBIT_KERNEL_TABLE(avx512vbmi, "avx512vbmi");

}  // namespace kbit
