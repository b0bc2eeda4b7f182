// gemv_bindings.cpp — the Python boundary of the fused 4-bit gemv (rules as in bindings.cpp: typed arrays,
// no silent copies, sizes re-checked, GIL released).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
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

// A 4-bit weight W [N, K] ready for the fused gemv: its arrays are checked once and held (which keeps
// their memory alive), so a call only converts x and out. Scales are float32 per block (absmax), or
// double-quantized (absmax_q non-empty: codes, their map, the nested float32 scales and the 0-dim float32
// offset, read at every call so an in-place update of it is seen).
class Gemv4bitWeight {
 public:
  Gemv4bitWeight(Array packed, Array absmax, Array absmax_q, Array absmax_code, Array absmax_nested,
                 int64_t nested_blocksize, Array offset, int64_t n_out, int64_t k_in, int64_t blocksize,
                 const std::string& quant_type)
      : packed_(std::move(packed)), absmax_(std::move(absmax)), absmax_q_(std::move(absmax_q)),
        code_(std::move(absmax_code)), nested_(std::move(absmax_nested)), offset_(std::move(offset)) {
    bool valid_bs = false;
    for (int64_t b : formats::kBlocksizes4bit) valid_bs |= b == blocksize;
    if (!valid_bs) fail("4-bit blocksize must be one of 32, 64, ..., 4096");
    formats::QuantType4bit qt;
    if (quant_type == "nf4") qt = formats::QuantType4bit::kNF4;
    else if (quant_type == "fp4") qt = formats::QuantType4bit::kFP4;
    else fail("quant_type must be 'nf4' or 'fp4'");
    if (n_out < 0 || k_in <= 0) fail("weight shape must be positive");
    if (packed_.dtype() != nb::dtype<uint8_t>()) throw nb::type_error("packed weight must be viewed as uint8");
    const int64_t total = n_out * k_in;
    if (int64_t(packed_.size()) < (total + 1) / 2) fail("packed weight is too short for [N, K]");
    const int64_t blocks = total / blocksize + (total % blocksize != 0);
    Gemv4bitArgs& a = base_;
    if (absmax_q_.size() > 0) {
      if (absmax_q_.dtype() != nb::dtype<uint8_t>() || int64_t(absmax_q_.size()) != blocks)
        fail("nested absmax codes: wrong dtype or length");
      if (code_.dtype() != nb::dtype<float>() || code_.size() != 256) fail("nested absmax code map must be 256 float32");
      if (nested_blocksize <= 0 || (nested_blocksize & (nested_blocksize - 1)) != 0)
        fail("nested blocksize must be a power of two");
      const int64_t nested_blocks = blocks / nested_blocksize + (blocks % nested_blocksize != 0);
      if (nested_.dtype() != nb::dtype<float>() || int64_t(nested_.size()) != nested_blocks)
        fail("nested absmax: wrong dtype or length");
      if (offset_.dtype() != nb::dtype<float>() || offset_.size() != 1) fail("absmax offset must be one float32");
      a.absmax_q = static_cast<const uint8_t*>(absmax_q_.data());
      a.absmax_code = static_cast<const float*>(code_.data());
      a.absmax_nested = static_cast<const float*>(nested_.data());
      a.nested_blocksize = nested_blocksize;
      while ((int64_t(1) << a.nested_shift) < nested_blocksize) ++a.nested_shift;
    } else {
      if (absmax_.dtype() != nb::dtype<float>() || int64_t(absmax_.size()) != blocks) fail("absmax: wrong dtype or length");
      a.absmax = static_cast<const float*>(absmax_.data());
    }
    a.packed = static_cast<const uint8_t*>(packed_.data());
    a.n_out = n_out;
    a.k_in = k_in;
    a.blocksize = blocksize;
    a.qt = qt;
    a.aligned = k_in % 32 == 0 && k_in % blocksize == 0;
  }

  // out[M, N] = x[M, K] @ W^T, 1 <= M <= kGemvMaxRows, out in x's dtype.
  void run(const Array& x, Array& out, int threads) const {
    Gemv4bitArgs a = base_;
    const int64_t n_out = a.n_out, k_in = a.k_in;
    const Kind kx = kind_of(x, "x"), ko = kind_of(out, "out");
    if (kx != ko) throw nb::type_error("out must have the dtype of x");
    if (x.ndim() != 2 || int64_t(x.shape(1)) != k_in) fail("x must be [M, K]");
    const int64_t rows = int64_t(x.shape(0));
    if (rows < 1 || rows > kGemvMaxRows) fail("the fused 4-bit gemv takes 1.." + std::to_string(kGemvMaxRows) + " rows");
    if (out.ndim() != 2 || int64_t(out.shape(0)) != rows || int64_t(out.shape(1)) != n_out) fail("out must be [M, N]");
    a.rows = rows;
    if (a.absmax_q != nullptr) a.offset = *static_cast<const float*>(offset_.data());
    const void* xp = x.data();
    void* op = out.data();
    nb::gil_scoped_release release;
    // x in float32 (one typed pass), then the layout the kernel walks: the group-ordered copy (Note [4-bit
    // gemv order]), 64-byte aligned since its 16-lane loads would otherwise split across cache lines, or
    // de-interleaved even / odd columns padded so chunk loads never run past.
    const int64_t numel = rows * k_in;
    std::vector<float> x32(static_cast<size_t>(numel));
    switch (kx) {
      case Kind::kF32: std::memcpy(x32.data(), xp, size_t(numel) * sizeof(float)); break;
      case Kind::kBF16: for (int64_t i = 0; i < numel; ++i) x32[size_t(i)] = to_f32(static_cast<const bf16_t*>(xp)[i]); break;
      default: for (int64_t i = 0; i < numel; ++i) x32[size_t(i)] = to_f32(static_cast<const f16_t*>(xp)[i]); break;
    }
    a.x = x32.data();
    std::vector<float> xe, xo, xg_storage;
    if (gemv_uses_groups(k_in, a.blocksize)) {
      xg_storage.resize(size_t(numel) + 16);
      float* xg = xg_storage.data() + (16 - (reinterpret_cast<uintptr_t>(xg_storage.data()) / sizeof(float)) % 16) % 16;
      for (int64_t i = 0; i < numel; i += kGemvGroup)  // rows are whole groups
        for (int64_t r = 0; r < kGemvGroup; ++r) xg[i + r] = x32[size_t(i + gemv_group_input_index(r))];
      a.x_groups = xg;
    } else {
      const int64_t stride = (k_in + 1) / 2 + 16;
      xe.assign(size_t(rows * stride), 0.0f);
      xo.assign(size_t(rows * stride), 0.0f);
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t k = 0; k < k_in; ++k) ((k & 1) ? xo : xe)[size_t(m * stride + (k >> 1))] = x32[size_t(m * k_in + k)];
      a.x_even = xe.data();
      a.x_odd = xo.data();
      a.x_stride = stride;
    }
    std::vector<float> y;  // float32 results go straight to out
    if (ko == Kind::kF32) {
      a.out = static_cast<float*>(op);
    } else {
      y.resize(size_t(rows * n_out));
      a.out = y.data();
    }
    active_kernels().gemv_4bit(a, threads);
    if (ko == Kind::kBF16)
      for (int64_t i = 0; i < rows * n_out; ++i) from_f32(y[size_t(i)], static_cast<bf16_t*>(op) + i);
    else if (ko == Kind::kF16)
      for (int64_t i = 0; i < rows * n_out; ++i) from_f32(y[size_t(i)], static_cast<f16_t*>(op) + i);
  }

 private:
  Array packed_, absmax_, absmax_q_, code_, nested_, offset_;
  Gemv4bitArgs base_{};
};

}  // namespace

void register_gemv_bindings(nb::module_& m) {
  const auto a = [](const char* name) { return nb::arg(name).noconvert(); };
  nb::class_<Gemv4bitWeight>(m, "Gemv4bitWeight")
      .def(nb::init<Array, Array, Array, Array, Array, int64_t, Array, int64_t, int64_t, int64_t, const std::string&>(),
           a("packed"), a("absmax"), a("absmax_q"), a("absmax_code"), a("absmax_nested"), "nested_blocksize"_a,
           a("offset"), "n_out"_a, "k_in"_a, "blocksize"_a, "quant_type"_a)
      .def("run", &Gemv4bitWeight::run, a("x"), a("out"), "threads"_a);
}

}  // namespace kbit
