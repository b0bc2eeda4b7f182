// kernels_scalar.cpp — the reference twins: the plainest correct loop for every kernel, built without
// ISA flags. The SIMD units must produce exactly these bytes (tests/test_native_levels.py), and these in
// turn equal kbit/backends/reference.py.
#include "code_lut.h"
#include "gemv4_common.h"
#include "kernels.h"
#include "optim_driver.h"
#include "parallel.h"

#include <algorithm>
#include <vector>

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
  const int64_t nblocks = ceil_div(n, blocksize);
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
  const int64_t nblocks = ceil_div(n, blocksize);
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t k = first * blocksize; k < n && k < last * blocksize; ++k)
      from_f32(code[codes[k]] * absmax[k / blocksize], out + k);
  });
}

template <class T>
void quantize_4bit(const T* x, int64_t n, int64_t blocksize, formats::QuantType4bit qt, float* absmax,
                   uint8_t* packed, int threads) {
  const int64_t nblocks = ceil_div(n, blocksize);
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
  const int64_t nblocks = ceil_div(n, blocksize);
  const float* values = table_4bit(qt);
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t k = first * blocksize; k < n && k < last * blocksize; ++k) {
      const uint8_t byte = packed[k / 2];
      const uint8_t c = (k & 1) ? (byte & 0x0f) : (byte >> formats::kHighNibbleShift);
      from_f32(values[c] * absmax[k / blocksize], out + k);
    }
  });
}


// ---- fused optimizer steps: the reference twins of optim-inl.h ----------------------------------------
struct OptimBlocks {
  template <class Rule, class T>
  static void update32(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t begin, int64_t end) {
    T* p = static_cast<T*>(t.p);
    const T* g = static_cast<const T*>(t.g);
    for (int64_t i = begin; i < end; ++i) {
      float pf = to_f32(p[i]);
      float s[3];
      for (int k = 0; k < Rule::kStates; ++k) s[k] = t.state32[k][i];
      step_element(r, t.sc, c.skip_zeros, pf, to_f32(g[i]), s);
      write_param<T>(t, i, pf);
      for (int k = 0; k < Rule::kStates; ++k) t.state32[k][i] = s[k];
    }
  }

  // Dequantize, update and requantize elements [begin, end) whose absmax is old_am / new_am, through `buf`.
  template <class Rule, class T>
  static void update8_range(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t begin, int64_t end,
                            const float* old_am, float* new_am, bool compute_new_am) {
    T* p = static_cast<T*>(t.p);
    const T* g = static_cast<const T*>(t.g);
    std::vector<float> buf[3];
    uint32_t max_bits[3] = {0, 0, 0};
    for (int k = 0; k < Rule::kStates; ++k) buf[k].resize(size_t(end - begin));
    for (int64_t i = begin; i < end; ++i) {
      float pf = to_f32(p[i]);
      float s[3];
      for (int k = 0; k < Rule::kStates; ++k) s[k] = c.luts[k]->code[t.codes[k][i]] * old_am[k];
      step_element(r, t.sc, c.skip_zeros, pf, to_f32(g[i]), s);
      write_param<T>(t, i, pf);
      for (int k = 0; k < Rule::kStates; ++k) {
        buf[k][size_t(i - begin)] = s[k];
        if (abs_bits(s[k]) > max_bits[k]) max_bits[k] = abs_bits(s[k]);
      }
    }
    for (int k = 0; k < Rule::kStates; ++k) {
      if (compute_new_am) new_am[k] = absmax_from_bits(max_bits[k]);
      const float inv = block_reciprocal(new_am[k]);
      for (int64_t i = begin; i < end; ++i)
        t.codes[k][i] = nearest_code_index(scale_and_clamp(buf[k][size_t(i - begin)], inv), c.luts[k]->mids);
    }
  }

  template <class Rule, class T>
  static void update8_blocks(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * c.blocksize, end = start + c.blocksize <= t.n ? start + c.blocksize : t.n;
      float old_am[3], new_am[3];
      for (int k = 0; k < Rule::kStates; ++k) old_am[k] = t.absmax[k][b];
      update8_range<Rule, T>(c, t, r, start, end, old_am, new_am, true);
      for (int k = 0; k < Rule::kStates; ++k) t.absmax[k][b] = new_am[k];
    }
  }

  // Note [4-bit optimizer states], one element at a time.
  template <class Rule, class T>
  static void update4_blocks(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t b0, int64_t b1) {
    T* p = static_cast<T*>(t.p);
    const T* g = static_cast<const T*>(t.g);
    std::vector<float> buf[3];
    std::vector<uint8_t> codes[3];
    for (int k = 0; k < Rule::kStates; ++k) {
      buf[k].resize(size_t(c.blocksize));
      codes[k].resize(size_t(c.blocksize));
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * c.blocksize, len = start + c.blocksize <= t.n ? c.blocksize : t.n - start;
      uint32_t max_bits[3] = {0, 0, 0};
      for (int k = 0; k < Rule::kStates; ++k) unpack_nibbles(t.codes[k] + start / 2, len, codes[k].data());
      for (int64_t i = 0; i < len; ++i) {
        float pf = to_f32(p[start + i]);
        float s[3];
        for (int k = 0; k < Rule::kStates; ++k) s[k] = c.code4[k][codes[k][size_t(i)]] * t.absmax[k][b];
        step_element(r, t.sc, c.skip_zeros, pf, to_f32(g[start + i]), s);
        write_param<T>(t, start + i, pf);
        for (int k = 0; k < Rule::kStates; ++k) {
          buf[k][size_t(i)] = s[k];
          if (abs_bits(s[k]) > max_bits[k]) max_bits[k] = abs_bits(s[k]);
        }
      }
      for (int k = 0; k < Rule::kStates; ++k) {
        const float amax = absmax_from_bits(max_bits[k]);
        t.absmax[k][b] = amax;
        const float inv = block_reciprocal(amax);
        for (int64_t i = 0; i < len; ++i) codes[k][size_t(i)] = code4_index(scale_and_clamp(buf[k][size_t(i)], inv), c.mids4[k]);
        pack_nibbles(codes[k].data(), len, t.codes[k] + start / 2);
      }
    }
  }

  template <class Rule, class T>
  static void update8_fixed(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t begin, int64_t end,
                            const float* old_am, const float* new_am) {
    float am[3] = {new_am[0], new_am[1], new_am[2]};
    update8_range<Rule, T>(c, t, r, begin, end, old_am, am, false);
  }

  template <class Rule, class T>
  static void prepass(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t begin, int64_t end,
                      int64_t unit, PrepassOut* out) {
    const T* p = static_cast<const T*>(t.p);
    const T* g = static_cast<const T*>(t.g);
    for (int64_t start = begin; start < end; start += unit) {
      const int64_t len = start + unit <= end ? unit : end - start;
      Lanes16 lanes_u, lanes_p;
      for (int64_t i = 0; i < len; ++i) {
        float pf = to_f32(p[start + i]);
        float s[3];
        for (int k = 0; k < Rule::kStates; ++k) {
          if (c.eight_bit) {
            const float am = c.blocksize > 0 ? t.absmax[k][(start + i) / c.blocksize] : t.absmax[k][0];
            s[k] = c.luts[k]->code[t.codes[k][start + i]] * am;
          } else {
            s[k] = t.state32[k][start + i];
          }
        }
        lanes_p.add_sq(i, pf);
        lanes_u.add_sq(i, step_element(r, t.sc, c.skip_zeros, pf, to_f32(g[start + i]), s));
        for (int k = 0; k < Rule::kStates; ++k)
          if (abs_bits(s[k]) > out->max_bits[k]) out->max_bits[k] = abs_bits(s[k]);
      }
      out->sum_u2 += lanes_u.total();
      out->sum_p2 += lanes_p.total();
    }
  }
};


// ---- 4-bit gemv: the reference twin of gemv4-inl.h, lane by lane (Note [4-bit gemv order]) ----
// Rows of whole 128-element groups (gemv_uses_groups()), in the group order; weights and inputs are read
// from the packed data and the plain input columns, not from the kernel's group-ordered copy.
void gemv_4bit_group_rows(const Gemv4bitArgs& a, int64_t n0, int64_t n1) {
  const float* tab = table_4bit(a.qt);
  const int64_t K = a.k_in, bs = a.blocksize, M = a.rows;
  std::vector<float> c0(size_t(M) * 16), c1(size_t(M) * 16), y(16);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = n * K;
    std::fill(c0.begin(), c0.end(), 0.0f);
    std::fill(c1.begin(), c1.end(), 0.0f);
    for (int64_t f = row; f < row + K; f += kGemvGroup) {
      for (int64_t j = 0; j < 16; ++j) {
        const float am = block_absmax_of(a, (f + 8 * j) / bs);
        for (int64_t m = 0; m < M; ++m) {
          float s0 = 0.0f, s1 = 0.0f;
          for (int64_t k = 0; k < 4; ++k) {
            const int64_t lo = f + 8 * j + 2 * k + 1, hi = lo - 1;  // low nibble: the odd element
            const float pl = nibble_value(a.packed, lo, tab), xl = a.x[m * K + lo - row];
            const float ph = nibble_value(a.packed, hi, tab), xh = a.x[m * K + hi - row];
            s0 = k == 0 ? pl * xl : std::fma(pl, xl, s0);
            s1 = k == 0 ? ph * xh : std::fma(ph, xh, s1);
          }
          c0[size_t(m * 16 + j)] = std::fma(s0, am, c0[size_t(m * 16 + j)]);
          c1[size_t(m * 16 + j)] = std::fma(s1, am, c1[size_t(m * 16 + j)]);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int l = 0; l < 16; ++l) y[size_t(l)] = c0[size_t(m * 16 + l)] + c1[size_t(m * 16 + l)];
      a.out[m * a.n_out + n] = sum_lanes16(y.data());
    }
  }
}

void gemv_4bit_rows(const Gemv4bitArgs& a, int64_t n0, int64_t n1) {
  if (a.x_groups != nullptr) {
    gemv_4bit_group_rows(a, n0, n1);
    return;
  }
  const float* tab = table_4bit(a.qt);
  const int64_t K = a.k_in, bs = a.blocksize, M = a.rows;
  std::vector<float> wh(16), wl(16), xh(size_t(M) * 16), xl(size_t(M) * 16), s(size_t(M) * 16), y(size_t(M) * 16);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = n * K, fend = row + K;
    std::fill(y.begin(), y.end(), 0.0f);
    int64_t b = row / bs, block_end = (b + 1) * bs;
    for (int64_t f = row; f < fend; ++b, block_end += bs) {
      const int64_t bend = block_end < fend ? block_end : fend;
      for (bool first = true; f < bend; first = false) {
        const int64_t next = ((f >> 5) + 1) << 5;
        const int64_t stop = next < bend ? next : bend;
        chunk_operands(a, tab, n, f, stop, wh.data(), wl.data(), xh.data(), xl.data());
        for (int64_t m = 0; m < M; ++m)
          chunk_accumulate(first, wh.data(), wl.data(), xh.data() + m * 16, xl.data() + m * 16, s.data() + m * 16);
        f = stop;
      }
      const float am = block_absmax_of(a, b);
      for (size_t l = 0; l < y.size(); ++l) y[l] = std::fma(s[l], am, y[l]);
    }
    for (int64_t m = 0; m < M; ++m) a.out[m * a.n_out + n] = sum_lanes16(y.data() + m * 16);
  }
}

void gemv_4bit(const Gemv4bitArgs& a, int threads) {
  parallel_for_blocks(a.n_out, a.k_in * a.rows, threads, [&](int64_t n0, int64_t n1) { gemv_4bit_rows(a, n0, n1); });
}

template <class Rule>
void optim_entry(const OptimCall<Rule>& call, int threads) {
  dispatch_optim_call<OptimBlocks>(call, threads);
}

}  // namespace
}  // namespace scalar

const KernelTable kScalarKernels = KBIT_KERNEL_TABLE(scalar, "scalar");

}  // namespace kbit
