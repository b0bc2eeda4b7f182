// kernels_avx2.cpp — the kernel templates compiled for AVX2 + FMA + F16C. Only this unit gets those
// flags (CMakeLists.txt), so nothing shared can leak AVX2 instructions into code run on older CPUs.
#include <limits>

#include "code_lut.h"
#include "gemv4_common.h"
#include "kernels.h"
#include "optim_driver.h"
#include "parallel.h"
#include "simd_avx2.h"

namespace kbit {
namespace avx2 {
#include "blockwise-inl.h"
#include "fourbit-inl.h"
#include "optim-inl.h"
#include "gemv4-inl.h"

template <class Rule>
void optim_entry(const OptimCall<Rule>& call, int threads) {
  dispatch_optim_call<OptimBlocks>(call, threads);
}
}  // namespace avx2

const KernelTable kAvx2Kernels = KBIT_KERNEL_TABLE(avx2, "avx2");

}  // namespace kbit
