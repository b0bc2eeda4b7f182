// gemv_bindings.cpp — the Python boundary of the fused 4-bit gemv (rules as in bindings.cpp: typed arrays,
// no silent copies, sizes re-checked, GIL released).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kbit {
namespace {

using Array = nb::ndarray<nb::device::cpu, nb::c_contig>;

[[noreturn]] void fail(const std::string& message) { throw nb::value_error(message.c_str()); }

enum class Kind { kF32, kBF16, kF16 };

Kind kind_of(const Array& a, const char* what) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return Kind::kF32;
  if (dt.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16) return Kind::kBF16;
  if (dt.code == uint8_t(nb::dlpack::dtype_code::Float) && dt.bits == 16) return Kind::kF16;
  throw nb::type_error((std::string(what) + " must be float32, bfloat16 or float16").c_str());
}

float load_any(const void* p, Kind k, int64_t i) {
  switch (k) {
    case Kind::kF32: return static_cast<const float*>(p)[i];
    case Kind::kBF16: return to_f32(static_cast<const bf16_t*>(p)[i]);
    default: return to_f32(static_cast<const f16_t*>(p)[i]);
  }
}

void store_any(void* p, Kind k, int64_t i, float v) {
  switch (k) {
    case Kind::kF32: static_cast<float*>(p)[i] = v; break;
    case Kind::kBF16: from_f32(v, static_cast<bf16_t*>(p) + i); break;
    default: from_f32(v, static_cast<f16_t*>(p) + i); break;
  }
}

// out[M, N] = x[M, K] @ W^T for W of shape [N, K] in 4-bit; absmax either float32 per block, or (with
// absmax_q non-empty) double-quantized.
void gemv_4bit(const Array& x, const Array& packed, const Array& absmax, const Array& absmax_q, const Array& absmax_code,
               const Array& absmax_nested, int64_t nested_blocksize, double offset, int64_t n_out, int64_t k_in,
               int64_t blocksize, const std::string& quant_type, Array& out, int threads) {
  bool valid_bs = false;
  for (int64_t b : formats::kBlocksizes4bit) valid_bs |= b == blocksize;
  if (!valid_bs) fail("4-bit blocksize must be one of 32, 64, ..., 4096");
  formats::QuantType4bit qt;
  if (quant_type == "nf4") qt = formats::QuantType4bit::kNF4;
  else if (quant_type == "fp4") qt = formats::QuantType4bit::kFP4;
  else fail("quant_type must be 'nf4' or 'fp4'");
  if (n_out < 0 || k_in <= 0) fail("weight shape must be positive");
  const Kind kx = kind_of(x, "x"), ko = kind_of(out, "out");
  if (kx != ko) throw nb::type_error("out must have the dtype of x");
  if (x.ndim() != 2 || int64_t(x.shape(1)) != k_in) fail("x must be [M, K]");
  const int64_t rows = int64_t(x.shape(0));
  if (rows < 1 || rows > kGemvMaxRows) fail("the fused 4-bit gemv takes 1.." + std::to_string(kGemvMaxRows) + " rows");
  if (out.ndim() != 2 || int64_t(out.shape(0)) != rows || int64_t(out.shape(1)) != n_out) fail("out must be [M, N]");
  if (packed.dtype() != nb::dtype<uint8_t>()) throw nb::type_error("packed weight must be viewed as uint8");
  const int64_t total = n_out * k_in;
  if (int64_t(packed.size()) < (total + 1) / 2) fail("packed weight is too short for [N, K]");
  const int64_t blocks = total / blocksize + (total % blocksize != 0);
  Gemv4bitArgs a{};
  if (absmax_q.size() > 0) {
    if (absmax_q.dtype() != nb::dtype<uint8_t>() || int64_t(absmax_q.size()) != blocks) fail("nested absmax codes: wrong dtype or length");
    if (absmax_code.dtype() != nb::dtype<float>() || absmax_code.size() != 256) fail("nested absmax code map must be 256 float32");
    if (nested_blocksize <= 0 || (nested_blocksize & (nested_blocksize - 1)) != 0)
      fail("nested blocksize must be a power of two");
    const int64_t nested_blocks = blocks / nested_blocksize + (blocks % nested_blocksize != 0);
    if (absmax_nested.dtype() != nb::dtype<float>() || int64_t(absmax_nested.size()) != nested_blocks)
      fail("nested absmax: wrong dtype or length");
    a.absmax_q = static_cast<const uint8_t*>(absmax_q.data());
    a.absmax_code = static_cast<const float*>(absmax_code.data());
    a.absmax_nested = static_cast<const float*>(absmax_nested.data());
    a.nested_blocksize = nested_blocksize;
    while ((int64_t(1) << a.nested_shift) < nested_blocksize) ++a.nested_shift;
    a.offset = float(offset);
  } else {
    if (absmax.dtype() != nb::dtype<float>() || int64_t(absmax.size()) != blocks) fail("absmax: wrong dtype or length");
    a.absmax = static_cast<const float*>(absmax.data());
  }
  a.packed = static_cast<const uint8_t*>(packed.data());
  a.n_out = n_out;
  a.k_in = k_in;
  a.blocksize = blocksize;
  a.qt = qt;
  a.rows = rows;
  const void* xp = x.data();
  void* op = out.data();
  nb::gil_scoped_release release;
  // De-interleaved float32 copies of x (even and odd columns), padded so chunk loads never run past.
  const int64_t stride = (k_in + 1) / 2 + 16;
  std::vector<float> xe(size_t(rows * stride), 0.0f), xo(size_t(rows * stride), 0.0f), y(size_t(rows * n_out));
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t k = 0; k < k_in; ++k)
      ((k & 1) ? xo : xe)[size_t(m * stride + (k >> 1))] = load_any(xp, kx, m * k_in + k);
  a.x_even = xe.data();
  a.x_odd = xo.data();
  a.x_stride = stride;
  // The group-ordered copy (Note [4-bit gemv order]), 64-byte aligned: the kernel's 16-lane loads of it
  // would otherwise split across cache lines. The reference twin reads xe / xo.
  std::vector<float> xg_storage;
  if (gemv_uses_groups(k_in, blocksize)) {
    xg_storage.resize(size_t(rows * k_in + 16));
    float* xg = xg_storage.data() + (16 - (reinterpret_cast<uintptr_t>(xg_storage.data()) / sizeof(float)) % 16) % 16;
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t i = 0; i < k_in; ++i) xg[m * k_in + i] = load_any(xp, kx, m * k_in + gemv_group_input_index(i));
    a.x_groups = xg;
  }
  a.aligned = k_in % 32 == 0 && k_in % blocksize == 0;
  a.out = y.data();
  active_kernels().gemv_4bit(a, threads);
  for (int64_t i = 0; i < rows * n_out; ++i) store_any(op, ko, i, y[size_t(i)]);
}

}  // namespace

void register_gemv_bindings(nb::module_& m) {
  const auto a = [](const char* name) { return nb::arg(name).noconvert(); };
  m.def("gemv_4bit", &gemv_4bit, a("x"), a("packed"), a("absmax"), a("absmax_q"), a("absmax_code"), a("absmax_nested"),
        "nested_blocksize"_a, "offset"_a, "n_out"_a, "k_in"_a, "blocksize"_a, "quant_type"_a, a("out"), "threads"_a);
}

}  // namespace kbit
