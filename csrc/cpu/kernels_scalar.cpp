// kernels_scalar.cpp — the reference twins: the plainest correct loop for every kernel, built without
// ISA flags. The SIMD units must produce exactly these bytes (tests/test_native_levels.py), and these in
// turn equal kbit/backends/reference.py.
#include "code_lut.h"
#include "kernels.h"
#include "parallel.h"

namespace kbit {
namespace scalar {
namespace {

template <class T>
float block_absmax(const T* x, int64_t len) {
  AbsmaxAccumulator acc;
  for (int64_t i = 0; i < len; ++i) acc.add(to_f32(x[i]));
  return acc.result();
}

template <class T>
void quantize_blockwise(const T* x, int64_t n, int64_t blocksize, const CodeLut* lut, float* absmax,
                        uint8_t* codes, int threads) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * blocksize, len = start + blocksize <= n ? blocksize : n - start;
      absmax[b] = block_absmax(x + start, len);
      const float inv = block_reciprocal(absmax[b]);
      for (int64_t i = 0; i < len; ++i)
        codes[start + i] = nearest_code_index(scale_and_clamp(to_f32(x[start + i]), inv), lut->mids);
    }
  });
}

template <class T>
void dequantize_blockwise(const uint8_t* codes, int64_t n, int64_t blocksize, const float* code,
                          const float* absmax, T* out, int threads) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t k = first * blocksize; k < n && k < last * blocksize; ++k)
      from_f32(code[codes[k]] * absmax[k / blocksize], out + k);
  });
}

template <class T>
void quantize_4bit(const T* x, int64_t n, int64_t blocksize, formats::QuantType4bit qt, float* absmax,
                   uint8_t* packed, int threads) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const uint8_t pad_code = code_4bit(0.0f, qt);
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * blocksize, len = start + blocksize <= n ? blocksize : n - start;
      absmax[b] = block_absmax(x + start, len);
      const float inv = block_reciprocal(absmax[b]);
      for (int64_t i = 0; i < len; i += 2) {
        const uint8_t hi = code_4bit(scale_and_clamp(to_f32(x[start + i]), inv), qt);
        const uint8_t lo = i + 1 < len ? code_4bit(scale_and_clamp(to_f32(x[start + i + 1]), inv), qt) : pad_code;
        packed[(start + i) / 2] = uint8_t((hi << formats::kHighNibbleShift) | lo);
      }
    }
  });
}

template <class T>
void dequantize_4bit(const uint8_t* packed, int64_t n, int64_t blocksize, formats::QuantType4bit qt,
                     const float* absmax, T* out, int threads) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const float* values = table_4bit(qt);
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t k = first * blocksize; k < n && k < last * blocksize; ++k) {
      const uint8_t byte = packed[k / 2];
      const uint8_t c = (k & 1) ? (byte & 0x0f) : (byte >> formats::kHighNibbleShift);
      from_f32(values[c] * absmax[k / blocksize], out + k);
    }
  });
}

}  // namespace
}  // namespace scalar

const KernelTable kScalarKernels = KBIT_KERNEL_TABLE(scalar, "scalar");

}  // namespace kbit
