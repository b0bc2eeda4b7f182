// In-process A/B timing of the avx512vbmi fused optimizer kernels (Adam and Lion 8-bit, Adam 32-bit):
// several builds of csrc/cpu/kernels_avx512vbmi.cpp, each compiled into its own namespace by build.sh, are
// called directly (no Python, no torch) in interleaved time slices, so that every slice of one variant has a
// neighbour of each other variant measured under the same load of this shared machine. The figure to read is
// the median over slices of variant/first-variant ("paired ratio"): ~1% resolution where process-level A/B
// (bench_kernel_ab.py) needs ~5%.
//
//   harness OPTIMIZER PARAMS SLICES THREADS MAPDIR
//
// OPTIMIZER is adam or lion (8-bit blockwise states) or adam32 (32-bit states), PARAMS the elements of the
// one fp32 tensor, SLICES the slices per variant, THREADS the kernel's thread count (1: thread CPU time;
// more: wall time), MAPDIR the directory holding signed.bin and unsigned.bin (the dynamic maps as 256
// float32 each, written by build.sh).
#include <time.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/code_lut.h"
#include "cpu/kernels.h"

namespace kbit {
#define X(name) extern const KernelTable name;
KBIT_AB_VARIANTS
#undef X
}  // namespace kbit

using namespace kbit;

namespace {

const KernelTable* const kTables[] = {
#define X(name) &name,
    KBIT_AB_VARIANTS
#undef X
};
const char* const kNames[] = {
#define X(name) #name,
    KBIT_AB_VARIANTS
#undef X
};
constexpr int kVariants = sizeof(kTables) / sizeof(kTables[0]);

double now_ns(clockid_t clock) {
  timespec t;
  clock_gettime(clock, &t);
  return t.tv_sec * 1e9 + t.tv_nsec;
}

std::vector<float> read_map(const std::string& path) {
  std::vector<float> v(256);
  FILE* f = fopen(path.c_str(), "rb");
  if (!f || fread(v.data(), sizeof(float), 256, f) != 256) {
    fprintf(stderr, "cannot read 256 float32 from %s\n", path.c_str());
    exit(2);
  }
  fclose(f);
  return v;
}

// One variant's copy of the tensors, so that every variant steps the same numbers.
struct Tensors {
  std::vector<float> p, g, absmax1, absmax2, state1, state2;
  std::vector<uint8_t> codes1, codes2;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: %s adam|lion|adam32 PARAMS SLICES THREADS MAPDIR\n", argv[0]);
    return 2;
  }
  const std::string op = argv[1];
  const int64_t n = atoll(argv[2]);
  const int slices = atoi(argv[3]), threads = atoi(argv[4]);
  if ((op != "adam" && op != "lion" && op != "adam32") || n < 256 || slices < 1 || threads < 1) {
    fprintf(stderr, "bad arguments: optimizer adam, lion or adam32, PARAMS >= 256, SLICES and THREADS >= 1\n");
    return 2;
  }
  const std::vector<float> signed_map = read_map(std::string(argv[5]) + "/signed.bin");
  const std::vector<float> unsigned_map = read_map(std::string(argv[5]) + "/unsigned.bin");
  const auto lut1 = get_code_lut(signed_map.data()), lut2 = get_code_lut(unsigned_map.data());
  const int64_t blocksize = 256, blocks = (n + blocksize - 1) / blocksize;

  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<float> p0(static_cast<size_t>(n)), g0(static_cast<size_t>(n));
  for (auto& x : p0) x = normal(rng) * 0.02f;
  for (auto& x : g0) x = normal(rng) * 1e-3f;
  std::vector<Tensors> data(kVariants);
  for (auto& d : data) {
    d.p = p0;
    d.g = g0;
    d.absmax1.assign(size_t(blocks), 1e-3f);
    d.absmax2.assign(size_t(blocks), 1e-6f);
    d.codes1.assign(size_t(n), 128);
    d.codes2.assign(size_t(n), 0);
    if (op == "adam32") {
      d.state1.assign(size_t(n), 0.0f);
      d.state2.assign(size_t(n), 0.0f);
    }
  }

  // A one-tensor call of a rule with 8-bit blockwise states whose code maps are `luts`.
  auto call_of = [&](const OptimTensor& t, const auto& rule, std::initializer_list<const CodeLut*> luts) {
    OptimCall<std::decay_t<decltype(rule)>> c{};
    c.tensors = &t;
    c.rules = &rule;
    c.ntensors = 1;
    c.dtype = ParamDtype::kF32;
    c.eight_bit = luts.size() > 0;
    c.blocksize = c.eight_bit ? blocksize : 0;
    int k = 0;
    for (const CodeLut* lut : luts) c.luts[k++] = lut;
    return c;
  };
  auto step = [&](int v, int64_t k) {
    Tensors& d = data[size_t(v)];
    OptimTensor t{};
    t.p = d.p.data();
    t.g = d.g.data();
    t.n = n;
    t.codes[0] = d.codes1.data();
    t.codes[1] = d.codes2.data();
    t.absmax[0] = d.absmax1.data();
    t.absmax[1] = d.absmax2.data();
    t.sc.gnorm_scale = 1.0f;
    t.state32[0] = d.state1.data();
    t.state32[1] = d.state2.data();
    if (op == "adam" || op == "adam32") {
      const double bc1 = 1 - std::pow(0.9, double(k)), bc2 = std::sqrt(1 - std::pow(0.999, double(k)));
      const AdamRule r{0.9f, 0.999f, 0.1f, float(1 - 0.999), 1e-8f, float(1 - 1e-3 * 1e-2), float(1 / bc2)};
      t.sc.k = float(1e-3 / bc1);
      t.unorm_factor = 1 / bc1;
      if (op == "adam")
        kTables[v]->optim_adam(call_of(t, r, {lut1.get(), lut2.get()}), threads);
      else
        kTables[v]->optim_adam(call_of(t, r, {}), threads);
    } else {
      LionRule r{};
      r.beta1 = 0.9f;
      r.beta2 = 0.99f;
      r.omb1 = 0.1f;
      r.omb2 = 0.01f;
      r.decay = float(1 - 1e-4 * 1e-2);
      t.sc.k = 1e-4f;
      kTables[v]->optim_lion(call_of(t, r, {lut1.get()}), threads);
    }
  };

  int64_t k = 1;
  for (; k <= 5; ++k)
    for (int v = 0; v < kVariants; ++v) step(v, k);
  const int64_t reps = std::max<int64_t>(1, (int64_t(1) << 22) / n);  // ~4M elements per slice
  const clockid_t clock = threads > 1 ? CLOCK_MONOTONIC : CLOCK_THREAD_CPUTIME_ID;
  std::vector<std::vector<double>> ns(kVariants);
  for (int s = 0; s < slices; ++s) {
    for (int i = 0; i < kVariants; ++i) {
      const int v = (s & 1) ? kVariants - 1 - i : i;  // alternate the order: no variant always runs first
      const double t0 = now_ns(clock);
      for (int64_t r = 0; r < reps; ++r) step(v, k + r);
      ns[size_t(v)].push_back((now_ns(clock) - t0) / double(reps) / double(n));
    }
    k += reps;
  }
  for (int v = 1; v < kVariants; ++v) {
    const Tensors &a = data[size_t(v)], &b = data[0];
    if (a.codes1 != b.codes1 || a.codes2 != b.codes2 || a.p != b.p || a.absmax1 != b.absmax1 ||
        a.absmax2 != b.absmax2 || a.state1 != b.state1 || a.state2 != b.state2)
      printf("note: %s computes different numbers than %s\n", kNames[v], kNames[0]);
  }
  printf("%s, %lld params, %d thread(s), %d slices; ns/param, paired ratio = median over slices of this/first\n",
         op.c_str(), (long long)n, threads, slices);
  for (int v = 0; v < kVariants; ++v) {
    std::vector<double> x = ns[size_t(v)], ratio;
    for (int s = 0; s < slices; ++s) ratio.push_back(ns[size_t(v)][size_t(s)] / ns[0][size_t(s)]);
    std::sort(x.begin(), x.end());
    std::sort(ratio.begin(), ratio.end());
    printf("%-20s min %.3f  median %.3f   paired ratio %.3f (quartiles %.3f-%.3f)\n", kNames[v], x[0],
           x[x.size() / 2], ratio[ratio.size() / 2], ratio[ratio.size() / 4], ratio[3 * ratio.size() / 4]);
  }
  return 0;
}
