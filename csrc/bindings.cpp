// bindings.cpp — the only boundary between Python and the kernels: typed arrays in (DLPack, no copies),
// every size the kernels index with re-checked here, the GIL released while they run.
//
// Note [no silent copies]
// Every array argument is bound with .noconvert(): nanobind would otherwise convert a non-contiguous or
// wrong-dtype tensor into a temporary copy, and an in-place kernel would write into that copy while the
// caller's tensor stayed unchanged. Instead such an argument is a TypeError. kbit/backends/cpu.py makes
// inputs contiguous before calling; this layer is the last line of defence, not the API.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <iterator>
#include <stdexcept>
#include <string>

#include "cpu/code_lut.h"
#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "formats.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace kbit {
namespace {

using Array = nb::ndarray<nb::device::cpu, nb::c_contig>;

enum class FloatKind { kF32, kBF16, kF16 };

FloatKind float_kind(const Array& a, const char* what) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt == nb::dtype<float>()) return FloatKind::kF32;
  if (dt.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16 && dt.lanes == 1) return FloatKind::kBF16;
  if (dt.code == uint8_t(nb::dlpack::dtype_code::Float) && dt.bits == 16 && dt.lanes == 1) return FloatKind::kF16;
  throw nb::type_error((std::string(what) + " must be float32, bfloat16 or float16").c_str());
}

void require(bool ok, const std::string& message) {
  if (!ok) throw nb::value_error(message.c_str());
}

void require_dtype(const Array& a, nb::dlpack::dtype dt, const char* what, const char* dtype_name) {
  if (a.dtype() != dt) throw nb::type_error((std::string(what) + " must be " + dtype_name).c_str());
}

int64_t numel(const Array& a) { return int64_t(a.size()); }

int64_t num_blocks(int64_t n, int64_t blocksize) { return ceil_div(n, blocksize); }

void check_blocksize(int64_t blocksize) { require(blocksize > 0, "blocksize must be positive"); }

formats::QuantType4bit parse_quant_type(const std::string& qt) {
  if (qt == "nf4") return formats::QuantType4bit::kNF4;
  if (qt == "fp4") return formats::QuantType4bit::kFP4;
  throw nb::value_error(("quant_type must be 'nf4' or 'fp4', got '" + qt + "'").c_str());
}

void check_4bit_blocksize(int64_t blocksize) {
  for (int64_t b : formats::kBlocksizes4bit)
    if (b == blocksize) return;
  throw nb::value_error(("4-bit blocksize must be one of 32, 64, ..., 4096 (got " + std::to_string(blocksize) + ")").c_str());
}

std::shared_ptr<const CodeLut> checked_code_lut(const Array& code) {
  require_dtype(code, nb::dtype<float>(), "code", "float32");
  require(numel(code) == formats::kCodeSize8bit, "code must have 256 entries");
  const float* c = static_cast<const float*>(code.data());
  for (int i = 0; i < 256; ++i) require(c[i] == c[i], "code must not contain NaN");
  for (int i = 0; i + 1 < 256; ++i) require(c[i] <= c[i + 1], "code must be sorted ascending");
  return get_code_lut(c);
}

// Whether the avx512vbmi kernels search this code map with byte planes (Note [gather-free lookups]) rather
// than falling back to gathers: for tests, which must know which path they exercise.
bool byte_plane_search_usable(const Array& code) { return checked_code_lut(code)->planes.search_usable; }

void quantize_blockwise(const Array& a, const Array& code, Array& absmax, Array& out, int64_t blocksize, int threads) {
  check_blocksize(blocksize);
  const FloatKind kind = float_kind(a, "A");
  const int64_t n = numel(a);
  require_dtype(absmax, nb::dtype<float>(), "absmax", "float32");
  require_dtype(out, nb::dtype<uint8_t>(), "out", "uint8");
  require(numel(absmax) >= num_blocks(n, blocksize), "absmax is too short for the input and blocksize");
  require(numel(out) >= n, "out is too short for the input");
  const auto lut = checked_code_lut(code);
  const KernelTable& k = active_kernels();
  float* am = static_cast<float*>(absmax.data());
  uint8_t* q = static_cast<uint8_t*>(out.data());
  nb::gil_scoped_release release;
  switch (kind) {
    case FloatKind::kF32: k.quantize_blockwise_f32(static_cast<const float*>(a.data()), n, blocksize, lut.get(), am, q, threads); break;
    case FloatKind::kBF16: k.quantize_blockwise_bf16(static_cast<const bf16_t*>(a.data()), n, blocksize, lut.get(), am, q, threads); break;
    case FloatKind::kF16: k.quantize_blockwise_f16(static_cast<const f16_t*>(a.data()), n, blocksize, lut.get(), am, q, threads); break;
  }
}

void dequantize_blockwise(const Array& codes, const Array& absmax, const Array& code, Array& out, int64_t blocksize,
                          int threads) {
  check_blocksize(blocksize);
  const FloatKind kind = float_kind(out, "out");
  const int64_t n = numel(out);
  require_dtype(codes, nb::dtype<uint8_t>(), "A", "uint8");
  require_dtype(absmax, nb::dtype<float>(), "absmax", "float32");
  require_dtype(code, nb::dtype<float>(), "code", "float32");
  require(numel(codes) >= n, "A (codes) is too short for the output");
  require(numel(absmax) >= num_blocks(n, blocksize), "absmax is too short for the output and blocksize");
  require(numel(code) == formats::kCodeSize8bit, "code must have 256 entries");
  const KernelTable& k = active_kernels();
  const uint8_t* q = static_cast<const uint8_t*>(codes.data());
  const float* am = static_cast<const float*>(absmax.data());
  const float* c = static_cast<const float*>(code.data());
  nb::gil_scoped_release release;
  switch (kind) {
    case FloatKind::kF32: k.dequantize_blockwise_f32(q, n, blocksize, c, am, static_cast<float*>(out.data()), threads); break;
    case FloatKind::kBF16: k.dequantize_blockwise_bf16(q, n, blocksize, c, am, static_cast<bf16_t*>(out.data()), threads); break;
    case FloatKind::kF16: k.dequantize_blockwise_f16(q, n, blocksize, c, am, static_cast<f16_t*>(out.data()), threads); break;
  }
}

void quantize_4bit(const Array& a, Array& absmax, Array& packed, int64_t blocksize, const std::string& quant_type,
                   int threads) {
  check_4bit_blocksize(blocksize);
  const formats::QuantType4bit qt = parse_quant_type(quant_type);
  const FloatKind kind = float_kind(a, "A");
  const int64_t n = numel(a);
  require_dtype(absmax, nb::dtype<float>(), "absmax", "float32");
  require_dtype(packed, nb::dtype<uint8_t>(), "packed", "uint8");
  require(numel(absmax) >= num_blocks(n, blocksize), "absmax is too short for the input and blocksize");
  require(numel(packed) >= (n + 1) / 2, "packed output is too short for the input");
  const KernelTable& k = active_kernels();
  float* am = static_cast<float*>(absmax.data());
  uint8_t* p = static_cast<uint8_t*>(packed.data());
  nb::gil_scoped_release release;
  switch (kind) {
    case FloatKind::kF32: k.quantize_4bit_f32(static_cast<const float*>(a.data()), n, blocksize, qt, am, p, threads); break;
    case FloatKind::kBF16: k.quantize_4bit_bf16(static_cast<const bf16_t*>(a.data()), n, blocksize, qt, am, p, threads); break;
    case FloatKind::kF16: k.quantize_4bit_f16(static_cast<const f16_t*>(a.data()), n, blocksize, qt, am, p, threads); break;
  }
}

void dequantize_4bit(const Array& packed, const Array& absmax, Array& out, int64_t blocksize,
                     const std::string& quant_type, int threads) {
  check_4bit_blocksize(blocksize);
  const formats::QuantType4bit qt = parse_quant_type(quant_type);
  const FloatKind kind = float_kind(out, "out");
  const int64_t n = numel(out);
  require_dtype(packed, nb::dtype<uint8_t>(), "A (packed)", "uint8");
  require_dtype(absmax, nb::dtype<float>(), "absmax", "float32");
  require(numel(packed) >= (n + 1) / 2, "packed data is too short for the output shape");
  require(numel(absmax) >= num_blocks(n, blocksize), "absmax is too short for the output shape and blocksize");
  const KernelTable& k = active_kernels();
  const uint8_t* p = static_cast<const uint8_t*>(packed.data());
  const float* am = static_cast<const float*>(absmax.data());
  nb::gil_scoped_release release;
  switch (kind) {
    case FloatKind::kF32: k.dequantize_4bit_f32(p, n, blocksize, qt, am, static_cast<float*>(out.data()), threads); break;
    case FloatKind::kBF16: k.dequantize_4bit_bf16(p, n, blocksize, qt, am, static_cast<bf16_t*>(out.data()), threads); break;
    case FloatKind::kF16: k.dequantize_4bit_f16(p, n, blocksize, qt, am, static_cast<f16_t*>(out.data()), threads); break;
  }
}

std::vector<std::string> supported_capabilities() {
  std::vector<std::string> names;
  for (CpuLevel l : supported_levels()) names.emplace_back(level_name(l));
  return names;
}

void set_capability(const std::string& name) {
  try {
    set_active_level(parse_level(name));
  } catch (const std::invalid_argument& e) {
    throw nb::value_error(e.what());
  }
}

std::string capability() {
  try {
    return level_name(active_level());
  } catch (const std::invalid_argument& e) {
    throw nb::value_error(e.what());
  }
}

nb::dict format_tables() {
  nb::dict d;
  nb::list nf4, fp4, fp4_thresholds, blocksizes;
  for (float v : formats::kNF4) nf4.append(v);
  for (float v : formats::kFP4) fp4.append(v);
  for (float v : formats::kFP4Thresholds) fp4_thresholds.append(v);
  for (int64_t b : formats::kBlocksizes4bit) blocksizes.append(b);
  nb::list mag;
  for (uint8_t m : formats::kFP4MagnitudeCode) mag.append(int(m));
  d["nf4"] = nf4;
  d["fp4"] = fp4;
  d["fp4_thresholds"] = fp4_thresholds;
  d["fp4_magnitude_code"] = mag;
  d["fp4_sign_bit"] = int(formats::kFP4SignBit);
  d["blocksizes_4bit"] = blocksizes;
  d["nested_blocksize_4bit"] = formats::kNestedBlocksize4bit;
  d["code_size_8bit"] = formats::kCodeSize8bit;
  d["optimizer_blocksize_8bit"] = formats::kOptimizerBlocksize8bit;
  d["optimizer_blocksize_4bit"] = formats::kOptimizerBlocksize4bit;
  d["optimizer_4bit_signed_map"] = std::vector<float>(std::begin(formats::kOptimizer4bitSignedMap),
                                                      std::end(formats::kOptimizer4bitSignedMap));
  d["optimizer_4bit_unsigned_map"] = std::vector<float>(std::begin(formats::kOptimizer4bitUnsignedMap),
                                                        std::end(formats::kOptimizer4bitUnsignedMap));
  d["high_nibble_shift"] = formats::kHighNibbleShift;
  return d;
}

}  // namespace

void register_optim_bindings(nb::module_& m);  // optim_bindings.cpp
void register_gemv_bindings(nb::module_& m);   // gemv_bindings.cpp

}  // namespace kbit

NB_MODULE(_C, m) {
  using namespace kbit;
  m.doc() = "kbit native CPU kernels (internal; use kbit.functional or torch.ops.kbit)";
  m.def("quantize_blockwise", &quantize_blockwise, "A"_a.noconvert(), "code"_a.noconvert(), "absmax"_a.noconvert(),
        "out"_a.noconvert(), "blocksize"_a, "threads"_a);
  m.def("dequantize_blockwise", &dequantize_blockwise, "A"_a.noconvert(), "absmax"_a.noconvert(), "code"_a.noconvert(),
        "out"_a.noconvert(), "blocksize"_a, "threads"_a);
  m.def("quantize_4bit", &quantize_4bit, "A"_a.noconvert(), "absmax"_a.noconvert(), "packed"_a.noconvert(),
        "blocksize"_a, "quant_type"_a, "threads"_a);
  m.def("dequantize_4bit", &dequantize_4bit, "A"_a.noconvert(), "absmax"_a.noconvert(), "out"_a.noconvert(),
        "blocksize"_a, "quant_type"_a, "threads"_a);
  m.def("byte_plane_search_usable", &byte_plane_search_usable, "code"_a.noconvert(),
        "Whether the avx512vbmi level searches this 256-entry code map without gathers.");
  m.def("capability", &capability, "The CPU kernel level in use: 'scalar', 'avx2', 'avx512' or 'avx512vbmi'.");
  m.def("supported_capabilities", &supported_capabilities, "Levels this CPU and OS can run, lowest first.");
  m.def("set_capability", &set_capability, "name"_a, "Use a (lower) kernel level; ValueError if unsupported.");
  m.def("format_tables", &format_tables, "The code tables and layout constants of csrc/formats.h.");
  register_optim_bindings(m);
  register_gemv_bindings(m);
}
