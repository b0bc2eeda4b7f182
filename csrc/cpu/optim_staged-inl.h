// optim_staged-inl.h — the 8-bit optimizer step at levels whose code lookups and searches are byte
// permutes (Note [gather-free lookups]): Note [staged 8-bit step]. Included by optim-inl.h inside each ISA
// unit's namespace; only levels with Ops::kBytePlanes instantiate it.
//
// Note [staged 8-bit step]
// A batch of whole blocks (about kStagedBatch elements) goes through three passes over an L1 buffer:
//   1. dequantize: each state's codes, times their block's absmax, into buf[k];
//   2. update: read buf, step (step_vector, the tails step_element), write the parameter and the new states
//      back into buf, and take each block's new absmax;
//   3. requantize: each state's buffer, block by block, to the exact nearest codes.
// Passes 1 and 3 work on one state at a time, so that state's tables stay in registers for the whole batch
// (Note [register tables]); a fused loop over both of Adam's states cannot hold their 60 table registers and
// reloads them for every 64 values. Measured on the Zen 4 VM (adam_step_ 8-bit, 64K fp32 params, one thread,
// in-process A/B of interleaved slices): the fused pipelined loop 1.00, fused with requantization in a second
// loop 0.92-0.98, staged one block at a time 0.90-0.95, staged in batches of 1024 elements 0.81-0.87 (4096:
// 1.0, the buffers leave L1). The result is the same bits: every element is dequantized, stepped and
// searched exactly as in the fused loop.
// The update pass also prefetches the parameter, gradient and codes kStagedPrefetch elements ahead, one
// cache line per vector, instead of a block's lines at once: bursts of ~160 prefetches per batch stalled
// the loop on DRAM-sized tensors (4M params, one thread: 1.22x the fused loop's time with bursts, 0.88x
// spread). The lines go to L2, not L1 (prefetcht1): 40 KB in flight would evict the batch's buffers from
// L1, and at 50M params, 2 threads, L2 prefetches took 0.83-0.94x the time of L1 prefetches; distances
// from 1K to 8K elements were within noise of each other, 4K the best median. A second prefetch moves the
// parameter and gradient from L2 to L1 kStagedPrefetchL1 elements ahead: 0.94-0.96x for Adam and 0.87x for
// Lion at 50M params, 2 threads (256 ahead: 0.97x, 1024: 0.97-0.99x), no change in L2-sized runs.

inline constexpr int64_t kStagedBatch = 1024;
inline constexpr int64_t kStagedMaxBlocks = 64;  // batches of tiny blocks stay shorter
inline constexpr int64_t kStagedPrefetch = 4096;   // elements ahead, into L2 (prefetcht1)
inline constexpr int64_t kStagedPrefetchL1 = 512;  // elements ahead, parameter and gradient into L1

// A template over the level's Ops (always Ops) so that units without byte planes never compile it.
template <class O>
struct StagedBlocks : StepKernels {
  // Pass 1 for state k of elements [start, start + len), in blocks of `unit` elements (the last may be
  // shorter): buf[j] = code[codes[j]] * the absmax of j's block.
  template <class Rule>
  static void dequantize_pass(const OptimCall<Rule>& c, const OptimTensor& t, int k, int64_t start, int64_t len,
                              const float* absmax, int64_t unit, float* buf) {
    const uint8_t* codes = t.codes[k] + start;
    const float* code = c.luts[k]->code;
    const typename O::PlaneLookup tables(c.luts[k]->planes);
    for (int64_t j = 0, b = 0; j < len; j += unit, ++b) {
      const int64_t n = unit < len - j ? unit : len - j;
      for (int64_t i = j + dequantize_planes<O>(codes + j, n, tables, absmax[b], buf + j); i < j + n; ++i)
        buf[i] = code[codes[i]] * absmax[b];
    }
  }

  // Pass 2 over elements [from, to) of the batch at `start`: the new states replace the old in buf.
  // Returns each state's max |new state| bit pattern over the range.
  template <class Rule, class T>
  static void update_pass(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t start, int64_t from,
                          int64_t to, float (*buf)[kMaxFusedBlock], uint32_t* max_bits) {
    // Locals, not fields read through references: the loop's stores may alias them (see update_span).
    const Rule rule = r;
    const StepScalars sc = t.sc;
    const bool skip_zeros = c.skip_zeros;
    const OptimTensor tensor = t;
    T* p = static_cast<T*>(t.p) + start;
    const T* g = static_cast<const T*>(t.g) + start;
    const uint8_t* codes[3];
    float* state[3];
    typename Ops::I vmax[3];
    for (int k = 0; k < Rule::kStates; ++k) {
      codes[k] = t.codes[k] + start;
      state[k] = buf[k];
      vmax[k] = Ops::zero_i();
    }
    // Prefetches stop at the tensor's end: a pointer beyond it may not even be formed.
    const int64_t prefetch_end = t.n - start - kStagedPrefetch;
    int64_t i = from;
    for (; i + Ops::N <= to; i += Ops::N) {
      if (i < prefetch_end) {  // __builtin_prefetch's locality: 3 = into L1, 2 = into L2
        __builtin_prefetch(p + i + kStagedPrefetchL1, 1, 3);
        __builtin_prefetch(g + i + kStagedPrefetchL1, 0, 3);
        __builtin_prefetch(p + i + kStagedPrefetch, 1, 2);
        __builtin_prefetch(g + i + kStagedPrefetch, 0, 2);
        if (i % 64 == 0)
          for (int k = 0; k < Rule::kStates; ++k) __builtin_prefetch(codes[k] + i + kStagedPrefetch, 1, 2);
      }
      F pv = Ops::load(p + i);
      F s[3];
      for (int k = 0; k < Rule::kStates; ++k) s[k] = Ops::load(state[k] + i);
      step_vector(rule, sc, skip_zeros, pv, Ops::load(g + i), s);
      store_param<T>(tensor, start + i, pv);
      for (int k = 0; k < Rule::kStates; ++k) {
        Ops::store(state[k] + i, s[k]);
        vmax[k] = Ops::max_u32(vmax[k], Ops::abs_bits(s[k]));
      }
    }
    for (int k = 0; k < Rule::kStates; ++k) max_bits[k] = Ops::reduce_max_u32(vmax[k]);
    for (; i < to; ++i) {
      float pf = to_f32(p[i]);
      float s[3];
      for (int k = 0; k < Rule::kStates; ++k) s[k] = state[k][i];
      step_element(rule, sc, skip_zeros, pf, to_f32(g[i]), s);
      write_param<T>(tensor, start + i, pf);
      for (int k = 0; k < Rule::kStates; ++k) {
        state[k][i] = s[k];
        if (abs_bits(s[k]) > max_bits[k]) max_bits[k] = abs_bits(s[k]);
      }
    }
  }

  // A block's new absmax as pass 3 needs it: the scale of Note [scaling rule] and whether it is finite.
  struct NewScale {
    float inv;
    bool finite;
    explicit NewScale(float amax) : inv(block_reciprocal(amax)), finite(finite_absmax(amax)) {}
    NewScale() = default;
  };

  // Pass 3 for state k of elements [start, start + len), blocks of `unit` elements as in pass 1: the codes
  // of buf scaled by each block's new absmax.
  template <class Rule>
  static void requantize_pass(const OptimCall<Rule>& c, const OptimTensor& t, int k, int64_t start, int64_t len,
                              const NewScale* scales, int64_t unit, const float* buf) {
    const LutView lut(*c.luts[k]);
    uint8_t* codes = t.codes[k] + start;
    if (!lut.plane_search) {
      for (int64_t j = 0, b = 0; j < len; j += unit, ++b)
        quantize_values(buf + j, unit < len - j ? unit : len - j, scales[b].inv, scales[b].finite, lut, codes + j);
      return;
    }
    const typename O::PlaneSearch tables(*lut.planes, lut.mids);
    for (int64_t j = 0, b = 0; j < len; j += unit, ++b) {
      const int64_t n = unit < len - j ? unit : len - j;
      const int64_t done =
          scales[b].finite ? quantize_planes<O>(buf + j, n, scales[b].inv, lut.clamp_free, lut, tables, codes + j) : 0;
      if (done < n) quantize_values(buf + j + done, n - done, scales[b].inv, scales[b].finite, lut, codes + j + done);
    }
  }

  // Blocks [b0, b1) of an 8-bit blockwise state.
  template <class Rule, class T>
  static void update8_blocks(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t b0, int64_t b1) {
    alignas(64) float buf[3][kMaxFusedBlock];
    const int64_t bs = c.blocksize;
    int64_t per_batch = bs < kStagedBatch ? kStagedBatch / bs : 1;
    if (per_batch > kStagedMaxBlocks) per_batch = kStagedMaxBlocks;
    NewScale scales[3][kStagedMaxBlocks];
    for (int64_t b = b0; b < b1; b += per_batch) {
      const int64_t nb = per_batch < b1 - b ? per_batch : b1 - b;
      const int64_t start = b * bs;
      const int64_t len = nb * bs < t.n - start ? nb * bs : t.n - start;
      for (int k = 0; k < Rule::kStates; ++k) dequantize_pass(c, t, k, start, len, t.absmax[k] + b, bs, buf[k]);
      for (int64_t j = 0; j < nb; ++j) {
        uint32_t max_bits[3];
        update_pass<Rule, T>(c, t, r, start, j * bs, (j + 1) * bs < len ? (j + 1) * bs : len, buf, max_bits);
        for (int k = 0; k < Rule::kStates; ++k) {
          const float amax = absmax_from_bits(max_bits[k]);
          t.absmax[k][b + j] = amax;
          scales[k][j] = NewScale(amax);
        }
      }
      for (int k = 0; k < Rule::kStates; ++k) requantize_pass(c, t, k, start, len, scales[k], bs, buf[k]);
    }
  }

  // Elements [begin, end) of a tensor-wise 8-bit state: old and new absmax are known up front.
  template <class Rule, class T>
  static void update8_fixed(const OptimCall<Rule>& c, const OptimTensor& t, const Rule& r, int64_t begin, int64_t end,
                            const float* old_am, const float* new_am) {
    alignas(64) float buf[3][kMaxFusedBlock];
    static_assert(kStagedBatch <= kMaxFusedBlock, "a batch fits the buffers");
    for (int64_t start = begin; start < end; start += kStagedBatch) {
      const int64_t len = kStagedBatch < end - start ? kStagedBatch : end - start;
      uint32_t unused_max[3];
      for (int k = 0; k < Rule::kStates; ++k) dequantize_pass(c, t, k, start, len, &old_am[k], len, buf[k]);
      update_pass<Rule, T>(c, t, r, start, 0, len, buf, unused_max);
      for (int k = 0; k < Rule::kStates; ++k) {
        const NewScale scale(new_am[k]);
        requantize_pass(c, t, k, start, len, &scale, len, buf[k]);
      }
    }
  }
};
