// kernels_avx512.cpp — the kernel templates compiled for AVX-512 F/BW/VL/DQ. Only this unit gets those
// flags (CMakeLists.txt), so nothing shared can leak AVX-512 instructions into code run on older CPUs.
#include <limits>

#include "code_lut.h"
#include "gemv4_common.h"
#include "kernels.h"
#include "optim_driver.h"
#include "parallel.h"
#include "simd_avx512.h"

namespace kbit {
namespace avx512 {
struct Ops : Avx512Ops {
  static constexpr bool kBytePlanes = false;  // Note [gather-free lookups]: the avx512vbmi level has them
};
#include "blockwise-inl.h"
#include "fourbit-inl.h"
#include "optim-inl.h"
#include "gemv4-inl.h"

template <class Rule>
void optim_entry(const OptimCall<Rule>& call, int threads) {
  dispatch_optim_call<OptimBlocks>(call, threads);
}
}  // namespace avx512

const KernelTable kAvx512Kernels = KBIT_KERNEL_TABLE(avx512, "avx512");

}  // namespace kbit
