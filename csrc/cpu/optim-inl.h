// optim-inl.h — fused optimizer block kernels, written once against an `Ops` vector interface and
// included by each ISA unit inside its namespace (after blockwise-inl.h: block quantization helpers).
// One pass over memory per block: load parameter, gradient and state codes, dequantize in registers,
// apply the rule (optim_rules.h), write the parameter, find the block's new absmax, requantize, store.
// Levels with byte planes run their 8-bit states through Note [staged 8-bit step] (optim_staged-inl.h):
// still one pass over memory, with the batch's states in an L1 buffer between the passes.
// Tails end in step_element(), the per-element function the reference twin uses.

// The gathering block kernels are compute-bound enough (gathers, a divide) that the hardware prefetchers fall
// behind on their five streams; fetching the block two ahead measured 10-20% faster on one thread
// (Intel VM). On the Zen 4 VM, 50M params at 2 threads, 8 interleaved rounds against torch each:
// distance 6 gave Lion8bit 1.27x / AdamW8bit 0.81x (medians) against 1.19x / 0.72x at 2, 1.23x / 0.74x
// at 4 and 1.26x / 0.75x at 10. Six blocks of 256 elements are ~14 KB of fp32 p and g in flight.
inline constexpr int64_t kPrefetchBlocks = 6;

#include "optim_requant-inl.h"
#include "optim_step-inl.h"
#include "optim_staged-inl.h"

struct OptimBlocks : StepKernels {
  template <class Rule, class T>
  static void prefetch_block(const OptimTensor& t, int64_t start, int64_t blocksize) {
    if (start + blocksize > t.n) return;
    const T* p = static_cast<const T*>(t.p);
    const T* g = static_cast<const T*>(t.g);
    for (int64_t j = 0; j < blocksize; j += 64 / int64_t(sizeof(T))) {
      __builtin_prefetch(p + start + j, 1);
      __builtin_prefetch(g + start + j, 0);
    }
    for (int k = 0; k < Rule::kStates; ++k)
      for (int64_t j = 0; j < blocksize; j += 64) __builtin_prefetch(t.codes[k] + start + j, 1);
  }

  template <class Rule, class T>
  static void update32(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t begin, int64_t end) {
    T* p = static_cast<T*>(t.p);
    const T* g = static_cast<const T*>(t.g);
    int64_t i = begin;
    for (; i + Ops::N <= end; i += Ops::N) {
      F pv = Ops::load(p + i);
      F s[3];
      for (int k = 0; k < Rule::kStates; ++k) s[k] = Ops::load(t.state32[k] + i);
      step_vector(r, t.sc, c.skip_zeros, pv, Ops::load(g + i), s);
      store_param<T>(t, i, pv);
      for (int k = 0; k < Rule::kStates; ++k) Ops::store(t.state32[k] + i, s[k]);
    }
    for (; i < end; ++i) {
      float pf = to_f32(p[i]);
      float s[3];
      for (int k = 0; k < Rule::kStates; ++k) s[k] = t.state32[k][i];
      step_element(r, t.sc, c.skip_zeros, pf, to_f32(g[i]), s);
      write_param<T>(t, i, pf);
      for (int k = 0; k < Rule::kStates; ++k) t.state32[k][i] = s[k];
    }
  }

  // The update pass over [start, start + len) of 8-bit states: dequantize (scales am), step, write the
  // parameter, keep the new states in buf and return their max |.| bit patterns (for the new absmax).
  // codes[k][0..len) are the state codes of the span (one byte per element), qmap[k] their code map (16
  // values when kFourBit: looked up in a register instead of gathered).
  // With a Pending block (not NoPending), the loop also requantizes it, the previous block (same length, a
  // multiple of 2 Ops::N), as it goes: Pending::step(i) after vector i (Note [pipelined requantization]).
  // Levels with byte planes call it only for 4-bit states (Note [staged 8-bit step]).
  template <class Rule, class T, bool kFourBit = false, class Pending = NoPending>
  static void update_span(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t start, int64_t len,
                          const uint8_t* const* codes, const float* const* qmap, const float* am,
                          float (*buf)[kMaxFusedBlock], uint32_t* max_bits, const Pending* pending = nullptr) {
    // Everything the vector loop reads is copied into locals first: the loop stores floats and bytes,
    // which may alias any float or byte in memory, so fields read through references would be reloaded
    // after every store (extra loads on the ports the gathers need).
    const Rule rule = r;
    const StepScalars sc = t.sc;
    const bool skip_zeros = c.skip_zeros;
    const OptimTensor tensor = t;
    T* p = static_cast<T*>(t.p) + start;
    const T* g = static_cast<const T*>(t.g) + start;
    typename Ops::I vmax[3];
    typename Ops::T16 table[3];
    const uint8_t* code_in[3];
    const float* map[3];
    float* out[3];
    F scale[3];
    for (int k = 0; k < Rule::kStates; ++k) {
      vmax[k] = Ops::zero_i();
      if constexpr (kFourBit) table[k] = Ops::table16(qmap[k]);
      code_in[k] = codes[k];
      map[k] = qmap[k];
      out[k] = buf[k];
      scale[k] = Ops::set1(am[k]);
    }
    Pending pend;
    if constexpr (Pending::kActive) pend = *pending;
    // Vector j of the span, given its dequantized states s: step, write the parameter, keep the new states.
    auto vector_step = [&](int64_t j, F* s) KBIT_INLINE_LAMBDA {
      F pv = Ops::load(p + j);
      step_vector(rule, sc, skip_zeros, pv, Ops::load(g + j), s);
      store_param<T>(tensor, start + j, pv);
      for (int k = 0; k < Rule::kStates; ++k) {
        Ops::store(out[k] + j, s[k]);
        vmax[k] = Ops::max_u32(vmax[k], Ops::abs_bits(s[k]));
      }
    };
    int64_t i = 0;
    // The dequantized states of the next vector are looked up one iteration ahead, so the lookups'
    // latency (a gather) overlaps this vector's update.
    F next[3];
    auto dequantize = [&](int64_t at) KBIT_INLINE_LAMBDA {
      for (int k = 0; k < Rule::kStates; ++k) {
        const typename Ops::I idx = Ops::load_u8(code_in[k] + at);
        next[k] = Ops::mul(kFourBit ? Ops::lookup16(table[k], idx) : Ops::gather(map[k], idx), scale[k]);
      }
    };
    if (i + Ops::N <= len) dequantize(i);
    for (; i + Ops::N <= len; i += Ops::N) {
      F s[3];
      for (int k = 0; k < Rule::kStates; ++k) s[k] = next[k];
      if (i + 2 * Ops::N <= len) dequantize(i + Ops::N);
      vector_step(i, s);
      if constexpr (Pending::kActive) pend.template step<Rule::kStates>(i);
    }
    for (int k = 0; k < Rule::kStates; ++k) max_bits[k] = Ops::reduce_max_u32(vmax[k]);
    for (; i < len; ++i) {
      float pf = to_f32(p[i]);
      float s[3];
      for (int k = 0; k < Rule::kStates; ++k) s[k] = qmap[k][codes[k][i]] * am[k];
      step_element(r, t.sc, c.skip_zeros, pf, to_f32(g[i]), s);
      write_param<T>(t, start + i, pf);
      for (int k = 0; k < Rule::kStates; ++k) {
        buf[k][i] = s[k];
        if (abs_bits(s[k]) > max_bits[k]) max_bits[k] = abs_bits(s[k]);
      }
    }
  }

  // Note [pipelined requantization]
  // A block's codes can only be searched once its new absmax is known, after its update pass. Searching
  // them in a second loop leaves the load ports (the search is gathers) idle during the update and the
  // divider (Adam's sqrt and divide) idle during the search. So blocks are software-pipelined: block b's
  // update pass also requantizes block b - 1, whose new states wait in the other half of a double buffer.
  // The codes are the same bits either way; only the order of independent work changes.

  // Blocks [b0, b1) of an 8-bit blockwise state, Note [optimizer step].
  template <class Rule, class T>
  static void update8_blocks(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t b0, int64_t b1) {
    if constexpr (Ops::kBytePlanes) {
      StagedBlocks<Ops>::template update8_blocks<Rule, T>(c, t, r, b0, b1);
    } else {
      update8_blocks_gathered<Rule, T>(c, t, r, b0, b1);
    }
  }

  // The same at levels that gather code values: one fused pass per block, pipelined with the previous
  // block's requantization where the rule waits on the divider.
  template <class Rule, class T>
  static void update8_blocks_gathered(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t b0,
                                      int64_t b1) {
    alignas(64) float buf[2][3][kMaxFusedBlock];
    PendingBlock pending;
    int64_t pending_len = 0;  // 0: no block waits
    for (int k = 0; k < Rule::kStates; ++k) pending.lut[k] = LutView(*c.luts[k]);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * c.blocksize;
      const int64_t len = start + c.blocksize <= t.n ? c.blocksize : t.n - start;
      float am[3];
      uint32_t max_bits[3];
      const uint8_t* codes[3];
      const float* qmap[3];
      for (int k = 0; k < Rule::kStates; ++k) {
        am[k] = t.absmax[k][b];
        codes[k] = t.codes[k] + start;
        qmap[k] = c.luts[k]->code;
      }
      prefetch_block<Rule, T>(t, start + kPrefetchBlocks * c.blocksize, c.blocksize);
      float (*cur)[kMaxFusedBlock] = buf[b & 1];
      if (kPipelineRequant<Rule> && pending_len == len && pending.pipelinable<Rule::kStates>(len)) {
        update_span<Rule, T, false, PendingBlock>(c, t, r, start, len, codes, qmap, am, cur, max_bits, &pending);
      } else {
        if (pending_len > 0) pending.quantize_all<Rule::kStates>(pending_len);
        update_span<Rule, T>(c, t, r, start, len, codes, qmap, am, cur, max_bits);
      }
      for (int k = 0; k < Rule::kStates; ++k) {
        const float amax = absmax_from_bits(max_bits[k]);
        t.absmax[k][b] = amax;
        pending.set(k, cur[k], amax, t.codes[k] + start);
      }
      pending_len = len;
      if (!kPipelineRequant<Rule>) {
        pending.quantize_all<Rule::kStates>(pending_len);
        pending_len = 0;
      }
    }
    if (pending_len > 0) pending.quantize_all<Rule::kStates>(pending_len);
  }

  // Elements [begin, end) of a tensor-wise 8-bit state: old and new absmax are known up front.
  template <class Rule, class T>
  static void update8_fixed(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t begin, int64_t end,
                            const float* old_am, const float* new_am) {
    if constexpr (Ops::kBytePlanes) {
      StagedBlocks<Ops>::template update8_fixed<Rule, T>(c, t, r, begin, end, old_am, new_am);
    } else {
      update8_fixed_gathered<Rule, T>(c, t, r, begin, end, old_am, new_am);
    }
  }

  template <class Rule, class T>
  static void update8_fixed_gathered(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t begin,
                                     int64_t end, const float* old_am, const float* new_am) {
    static_assert(kChunk <= kMaxFusedBlock, "update_span buffers hold kMaxFusedBlock values");
    alignas(64) float buf[3][kMaxFusedBlock];
    uint32_t unused_max[3];
    const float* qmap[3];
    for (int k = 0; k < Rule::kStates; ++k) qmap[k] = c.luts[k]->code;
    for (int64_t i = begin; i < end; i += kChunk) {
      const int64_t len = i + kChunk <= end ? kChunk : end - i;
      const uint8_t* codes[3];
      for (int k = 0; k < Rule::kStates; ++k) codes[k] = t.codes[k] + i;
      update_span<Rule, T>(c, t, r, i, len, codes, qmap, old_am, buf, unused_max);
      for (int k = 0; k < Rule::kStates; ++k)
        quantize_values(buf[k], len, block_reciprocal(new_am[k]), finite_absmax(new_am[k]), LutView(*c.luts[k]),
                        t.codes[k] + i);
    }
  }

  // Blocks [b0, b1) of a 4-bit blockwise state, Note [4-bit optimizer states]: the block's nibbles are
  // unpacked to bytes, go through the same update pass as 8-bit codes, and are packed back.
  template <class Rule, class T>
  static void update4_blocks(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t b0, int64_t b1) {
    alignas(64) float buf[2][3][kMaxFusedBlock];
    alignas(64) uint8_t codes[3][kMaxFusedBlock];
    PendingBlock4 pending;
    int64_t pending_len = 0;  // 0: no block waits
    const uint8_t* code_ptr[3];
    for (int k = 0; k < Rule::kStates; ++k) {
      pending.search[k] = BinarySearch16(c.code4[k], c.mids4[k]);
      pending.mids[k] = c.mids4[k];
      code_ptr[k] = codes[k];
    }
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * c.blocksize;
      const int64_t len = start + c.blocksize <= t.n ? c.blocksize : t.n - start;
      float am[3];
      uint32_t max_bits[3];
      for (int k = 0; k < Rule::kStates; ++k) {
        am[k] = t.absmax[k][b];
        const uint8_t* packed = t.codes[k] + start / 2;
        int64_t j = 0;
        for (; j + 2 * Ops::N <= len; j += 2 * Ops::N) {
          typename Ops::I c0, c1;
          Ops::load_nibbles(packed + j / 2, &c0, &c1);
          Ops::store_u8(codes[k] + j, c0);
          Ops::store_u8(codes[k] + j + Ops::N, c1);
        }
        unpack_nibbles(packed + j / 2, len - j, codes[k] + j);  // j is even: the tail starts on a byte
      }
      float (*cur)[kMaxFusedBlock] = buf[b & 1];
      if (kPipelineRequant<Rule> && pending_len == len && len % (2 * Ops::N) == 0) {
        update_span<Rule, T, true, PendingBlock4>(c, t, r, start, len, code_ptr, c.code4, am, cur, max_bits, &pending);
      } else {
        if (pending_len > 0) pending.quantize_all<Rule::kStates>(pending_len);
        update_span<Rule, T, true>(c, t, r, start, len, code_ptr, c.code4, am, cur, max_bits);
      }
      for (int k = 0; k < Rule::kStates; ++k) {
        const float amax = absmax_from_bits(max_bits[k]);
        t.absmax[k][b] = amax;
        pending.set(k, cur[k], amax, t.codes[k] + start / 2);
      }
      pending_len = len;
      if (!kPipelineRequant<Rule>) {
        pending.quantize_all<Rule::kStates>(pending_len);
        pending_len = 0;
      }
    }
    if (pending_len > 0) pending.quantize_all<Rule::kStates>(pending_len);
  }



  // The trust-ratio sums and tensor-wise maxima over [begin, end), in blocks of `unit` elements; nothing
  // is written. Lanes follow Note [trust ratio].
  template <class Rule, class T>
  static void prepass(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t begin, int64_t end,
                      int64_t unit, PrepassOut* out) {
    const T* p = static_cast<const T*>(t.p);
    const T* g = static_cast<const T*>(t.g);
    typename Ops::I vmax[3];
    for (int k = 0; k < Rule::kStates; ++k) vmax[k] = Ops::zero_i();
    uint32_t max_bits[3] = {0, 0, 0};
    for (int64_t start = begin; start < end; start += unit) {
      const int64_t len = start + unit <= end ? unit : end - start;
      const float* qmap[3] = {nullptr, nullptr, nullptr};
      float am[3] = {0, 0, 0};
      if (c.eight_bit) {
        for (int k = 0; k < Rule::kStates; ++k) {
          qmap[k] = c.luts[k]->code;
          am[k] = c.blocksize > 0 ? t.absmax[k][start / c.blocksize] : t.absmax[k][0];
        }
      }
      typename Ops::Acc16 acc_u = Ops::acc16_zero(), acc_p = Ops::acc16_zero();
      // Vector `at` of the unit, given its states s: the sums and maxima, in lane order (Note [trust ratio]).
      auto vector_step = [&](int64_t at, F* s) KBIT_INLINE_LAMBDA {
        F pv = Ops::load(p + start + at);
        Ops::acc16_add_sq(acc_p, pv, at);
        const F u = step_vector(r, t.sc, c.skip_zeros, pv, Ops::load(g + start + at), s);
        Ops::acc16_add_sq(acc_u, u, at);
        for (int k = 0; k < Rule::kStates; ++k) vmax[k] = Ops::max_u32(vmax[k], Ops::abs_bits(s[k]));
      };
      int64_t i = 0;
      if constexpr (Ops::kBytePlanes) {  // 8-bit states looked up 64 at a time (Note [gather-free lookups])
        if (c.eight_bit) {
          for (; i + 64 <= len; i += 64) {
            F sv[3][4];
            for (int k = 0; k < Rule::kStates; ++k) lookup64(t.codes[k] + start + i, c.luts[k]->planes, sv[k]);
            for (int q = 0; q < 4; ++q) {
              F s[3];
              for (int k = 0; k < Rule::kStates; ++k) s[k] = Ops::mul(sv[k][q], Ops::set1(am[k]));
              vector_step(i + q * Ops::N, s);
            }
          }
        }
      }
      for (; i + Ops::N <= len; i += Ops::N) {
        F s[3];
        for (int k = 0; k < Rule::kStates; ++k)
          s[k] = c.eight_bit ? Ops::mul(Ops::gather(qmap[k], Ops::load_u8(t.codes[k] + start + i)), Ops::set1(am[k]))
                             : Ops::load(t.state32[k] + start + i);
        vector_step(i, s);
      }
      Lanes16 lanes_u, lanes_p;
      Ops::acc16_store(acc_u, lanes_u.lane);
      Ops::acc16_store(acc_p, lanes_p.lane);
      for (; i < len; ++i) {
        float pf = to_f32(p[start + i]);
        float s[3];
        for (int k = 0; k < Rule::kStates; ++k)
          s[k] = c.eight_bit ? qmap[k][t.codes[k][start + i]] * am[k] : t.state32[k][start + i];
        lanes_p.add_sq(i, pf);
        lanes_u.add_sq(i, step_element(r, t.sc, c.skip_zeros, pf, to_f32(g[start + i]), s));
        for (int k = 0; k < Rule::kStates; ++k)
          if (abs_bits(s[k]) > max_bits[k]) max_bits[k] = abs_bits(s[k]);
      }
      out->sum_u2 += lanes_u.total();
      out->sum_p2 += lanes_p.total();
    }
    for (int k = 0; k < Rule::kStates; ++k) {
      const uint32_t v = Ops::reduce_max_u32(vmax[k]);
      out->max_bits[k] = v > max_bits[k] ? v : max_bits[k];
    }
  }
};
