// kernels_avx512.cpp — the kernel templates compiled for AVX-512 F/BW/VL/DQ. Only this unit gets those
// flags (CMakeLists.txt), so nothing shared can leak AVX-512 instructions into code run on older CPUs.
#include <limits>

#include "code_lut.h"
#include "kernels.h"
#include "parallel.h"
#include "simd_avx512.h"

namespace kbit {
namespace avx512 {
#include "blockwise-inl.h"
#include "fourbit-inl.h"
}  // namespace avx512

const KernelTable kAvx512Kernels = KBIT_KERNEL_TABLE(avx512, "avx512");

}  // namespace kbit
