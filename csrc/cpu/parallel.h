// parallel.h — OpenMP over independent blocks, skipped when the work is too small to repay a region.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kbit {

// Below this many elements a parallel region costs more than it saves (~3 us to open one here).
inline constexpr int64_t kMinElementsPerThread = 1 << 15;

// Calls fn(first_block, last_block) on disjoint ranges covering [0, nblocks), from up to `threads`
// OpenMP threads. Static scheduling: blocks are equal-sized, and the same split every call keeps
// results independent of timing (each block is computed by one thread, in order).
template <class Fn>
void parallel_for_blocks(int64_t nblocks, int64_t elements_per_block, int threads, const Fn& fn) {
  const int64_t total = nblocks * elements_per_block;
  int64_t useful = total / kMinElementsPerThread;
  if (useful > nblocks) useful = nblocks;
  const int nt = int(useful < threads ? useful : threads);
  if (nt <= 1) {
    if (nblocks > 0) fn(int64_t(0), nblocks);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num();
#else
    const int64_t t = 0;
#endif
    const int64_t first = nblocks * t / nt;
    const int64_t last = nblocks * (t + 1) / nt;
    if (first < last) fn(first, last);
  }
}

}  // namespace kbit
