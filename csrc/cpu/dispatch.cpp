#include "dispatch.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#define KBIT_X86 1
#endif

namespace kbit {
namespace {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512vbmi = false;
  bool amd = false;
  bool os_ymm = false, os_zmm = false;
};

#ifdef KBIT_X86
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#ifdef KBIT_X86
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
  f.amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  f.f16c = c & (1u << 29);
  // cpuid says what the CPU has; XCR0 says which register state the OS saves on a context switch.
  // Using AVX registers the OS does not save corrupts them silently, so both must agree.
  if (osxsave) {
    const uint64_t xcr0 = read_xcr0();
    f.os_ymm = (xcr0 & 0x6) == 0x6;             // SSE + AVX state
    f.os_zmm = f.os_ymm && (xcr0 & 0xe0) == 0xe0;  // opmask + ZMM_Hi256 + Hi16_ZMM state
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = b & (1u << 5);
    f.avx512f = b & (1u << 16);
    f.avx512dq = b & (1u << 17);
    f.avx512bw = b & (1u << 30);
    f.avx512vl = b & (1u << 31);
    f.avx512vbmi = c & (1u << 1);
  }
#endif
  return f;
}

std::atomic<int> g_level{-1};

// "scalar, avx2 (default 'avx2')": what an error about an unsupported level offers instead. The default
// is not always the highest supported level (default_level() prefers avx512 on Intel CPUs with VBMI).
std::string supported_summary() {
  std::string names;
  for (CpuLevel l : supported_levels()) names += std::string(names.empty() ? "" : ", ") + level_name(l);
  return names + " (default '" + level_name(default_level()) + "')";
}

CpuLevel initial_level() {
  const char* env = std::getenv("KBIT_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return default_level();
  const CpuLevel wanted = parse_level(env);
  for (CpuLevel l : supported_levels())
    if (l == wanted) return wanted;
  throw std::invalid_argument(std::string("KBIT_CPU_CAPABILITY=") + env +
                              " is not supported by this CPU/OS; supported here: " + supported_summary() +
                              ". Unset it or choose one of those.");
}

}  // namespace

std::vector<CpuLevel> supported_levels() {
  static const std::vector<CpuLevel> levels = [] {
    std::vector<CpuLevel> v{CpuLevel::kScalar};
    const CpuFeatures f = detect();
#ifdef KBIT_HAVE_AVX2
    if (f.avx2 && f.fma && f.f16c && f.os_ymm) v.push_back(CpuLevel::kAvx2);
#endif
#ifdef KBIT_HAVE_AVX512
    if (v.back() == CpuLevel::kAvx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.os_zmm)
      v.push_back(CpuLevel::kAvx512);
#endif
#ifdef KBIT_HAVE_AVX512VBMI
    if (v.back() == CpuLevel::kAvx512 && f.avx512vbmi) v.push_back(CpuLevel::kAvx512Vbmi);
#endif
    (void)f;
    return v;
  }();
  return levels;
}

CpuLevel default_level() {
  static const CpuLevel level = [] {
    const std::vector<CpuLevel> levels = supported_levels();
    if (levels.back() == CpuLevel::kAvx512Vbmi && !detect().amd) return CpuLevel::kAvx512;
    return levels.back();
  }();
  return level;
}

const char* level_name(CpuLevel level) {
  switch (level) {
    case CpuLevel::kScalar: return "scalar";
    case CpuLevel::kAvx2: return "avx2";
    case CpuLevel::kAvx512: return "avx512";
    case CpuLevel::kAvx512Vbmi: return "avx512vbmi";
  }
  return "?";
}

CpuLevel parse_level(const std::string& name) {
  if (name == "scalar") return CpuLevel::kScalar;
  if (name == "avx2") return CpuLevel::kAvx2;
  if (name == "avx512") return CpuLevel::kAvx512;
  if (name == "avx512vbmi") return CpuLevel::kAvx512Vbmi;
  throw std::invalid_argument("unknown CPU capability '" + name + "': choose one of scalar, avx2, avx512, avx512vbmi");
}

CpuLevel active_level() {
  int l = g_level.load(std::memory_order_acquire);
  if (l < 0) {
    l = int(initial_level());
    int expected = -1;
    g_level.compare_exchange_strong(expected, l);
    l = g_level.load(std::memory_order_acquire);
  }
  return CpuLevel(l);
}

void set_active_level(CpuLevel level) {
  for (CpuLevel l : supported_levels()) {
    if (l == level) {
      g_level.store(int(level), std::memory_order_release);
      return;
    }
  }
  throw std::invalid_argument(std::string("CPU capability '") + level_name(level) +
                              "' is not supported here; supported here: " + supported_summary());
}

const KernelTable& active_kernels() {
  switch (active_level()) {
#ifdef KBIT_HAVE_AVX512VBMI
    case CpuLevel::kAvx512Vbmi: return kAvx512VbmiKernels;
#endif
#ifdef KBIT_HAVE_AVX512
    case CpuLevel::kAvx512: return kAvx512Kernels;
#endif
#ifdef KBIT_HAVE_AVX2
    case CpuLevel::kAvx2: return kAvx2Kernels;
#endif
    default: return kScalarKernels;
  }
}

}  // namespace kbit
