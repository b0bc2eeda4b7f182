// blockwise-inl.h — 8-bit blockwise quantization kernels, written once against an `Ops` vector
// interface (simd_avx2.h / simd_avx512.h) and included by each ISA unit inside its own namespace.
// Every vector loop ends in the per-element functions of scalar_ops.h, so tails are not special.
//
// No include guard: each ISA unit includes it once, after defining its Ops.

// max |x| over [x, x + len), Note [scaling rule]. The vector loop takes the integer max of |x|'s bit
// patterns: for non-negative floats that order is the float order, and every NaN pattern is above
// +inf, so a NaN anywhere wins and is then turned into the canonical NaN, as the scalar accumulator does.
template <class T>
inline float block_absmax(const T* x, int64_t len) {
  int64_t i = 0;
  uint32_t max_bits = 0;
  if (len >= Ops::N) {
    typename Ops::I vmax = Ops::zero_i();
    for (; i + Ops::N <= len; i += Ops::N) vmax = Ops::max_u32(vmax, Ops::abs_bits(Ops::load(x + i)));
    max_bits = Ops::reduce_max_u32(vmax);
  }
  AbsmaxAccumulator acc;
  acc.nan = max_bits > 0x7f800000u;
  acc.max = acc.nan ? 0.0f : f32_from_bits(max_bits);
  for (; i < len; ++i) acc.add(to_f32(x[i]));
  return acc.result();
}

// The CodeLut fields the search reads, copied into locals: the kernels store uint8 codes, which may alias
// anything, so reading through the CodeLut pointer would reload every field after every store.
struct LutView {
  const uint32_t* bins = nullptr;
  const float* mids = nullptr;
  const BytePlanes* planes = nullptr;
  int max_in_bin = 0;
  bool clamp_free = false;
  bool plane_search = false;  // Ops can search with byte planes and this map's layout fits
  LutView() = default;
  explicit LutView(const CodeLut& l)
      : bins(l.bins), mids(l.mids), planes(&l.planes), max_in_bin(l.max_in_bin), clamp_free(l.clamp_free),
        plane_search(Ops::kBytePlanes && l.planes.search_usable) {}
};

// Note [gather-free lookups] over a span, 64 values at a time, with the map's tables in registers (Note
// [register tables]). Each returns how many leading elements it did (a multiple of 64); the caller finishes
// the tail. The *_planes forms take tables a caller loaded once for several spans (O::PlaneLookup,
// O::PlaneSearch) and are always inlined: called through a reference, the tables would be memory again (a
// vector store may alias anything). The *_span forms load the tables themselves. All are templates over O
// whose bodies only exist for Ops with byte planes, so the other levels compile the calls, not the permutes.

// out[j] = code[codes[j]] * scale, stored with one rounding.
template <class O, class Tables, class T>
KBIT_ALWAYS_INLINE int64_t dequantize_planes(const uint8_t* codes, int64_t len, const Tables& tables, float scale,
                                             T* out) {
  const typename O::F vscale = O::set1(scale);
  int64_t j = 0;
  for (; j + 64 <= len; j += 64) {
    typename O::F v[4];
    O::lookup64(codes + j, tables, v);
    for (int r = 0; r < 4; ++r) O::store(out + j + r * O::N, O::mul(v[r], vscale));
  }
  return j;
}

// The codes of x[j] * inv (clamped to [-1, 1] unless kClampFree), for a finite block.
template <class O, bool kPositiveOnly, bool kClampFree, class Tables, class T>
KBIT_ALWAYS_INLINE int64_t quantize_planes(const T* x, int64_t len, typename O::F inv, const Tables& tables,
                                           uint8_t* out) {
  int64_t j = 0;
  for (; j + 64 <= len; j += 64) {
    typename O::F s[4];
    for (int r = 0; r < 4; ++r) {
      s[r] = O::mul(O::load(x + j + r * O::N), inv);
      if (!kClampFree) s[r] = O::clamp_unit(s[r]);
    }
    O::template search64<kPositiveOnly>(s, tables, out + j);
  }
  return j;
}

// The same, choosing the instantiation from the map (lut.plane_search must hold).
template <class O, class Tables, class T>
KBIT_ALWAYS_INLINE int64_t quantize_planes(const T* x, int64_t len, float inv, bool clamp_free, const LutView& lut,
                                           const Tables& tables, uint8_t* out) {
  const typename O::F vinv = O::set1(inv);
  if (lut.planes->positive_only)
    return clamp_free ? quantize_planes<O, true, true>(x, len, vinv, tables, out)
                      : quantize_planes<O, true, false>(x, len, vinv, tables, out);
  return clamp_free ? quantize_planes<O, false, true>(x, len, vinv, tables, out)
                    : quantize_planes<O, false, false>(x, len, vinv, tables, out);
}

template <class O = Ops, class T>
int64_t dequantize_span(const uint8_t* codes, int64_t len, const BytePlanes& planes, float scale, T* out) {
  if constexpr (O::kBytePlanes) {
    return dequantize_planes<O>(codes, len, typename O::PlaneLookup(planes), scale, out);
  } else {
    return 0;
  }
}

template <class O = Ops, class T>
int64_t quantize_span(const T* x, int64_t len, float inv, bool clamp_free, const LutView& lut, uint8_t* out) {
  if constexpr (O::kBytePlanes) {
    return quantize_planes<O>(x, len, inv, clamp_free, lut, typename O::PlaneSearch(*lut.planes, lut.mids), out);
  } else {
    return 0;
  }
}

// code[codes[i]] for i in [0, 64) as four vectors, loading the planes for this one call.
template <class O = Ops>
KBIT_ALWAYS_INLINE void lookup64(const uint8_t* codes, const BytePlanes& planes, typename O::F* out) {
  if constexpr (O::kBytePlanes) O::lookup64(codes, typename O::PlaneLookup(planes), out);
}

// The bin lookup and first compare round of Note [8-bit code search] for Ops::N non-NaN values: the exact
// codes when the map has at most one midpoint per bin.
inline typename Ops::I code_first_round(typename Ops::F s, const uint32_t* bins) {
  const typename Ops::I key = Ops::order_key(s);
  return Ops::srli_i<16>(Ops::add_i(key, Ops::gather_u32(bins, Ops::srli_i<16>(key))));
}

// Exact nearest-code indices of Ops::N scaled values, Note [8-bit code search]. `finite_block` says the
// block's absmax is finite, so no value can be NaN and the NaN masking can be skipped.
inline typename Ops::I code_indices(typename Ops::F s, const LutView lut, bool finite_block) {
  typename Ops::I idx;
  if (lut.max_in_bin <= kMaxLutSteps) {
    idx = code_first_round(s, lut.bins);
    for (int k = 1; k < lut.max_in_bin; ++k) idx = Ops::add_where(idx, Ops::lt(Ops::gather(lut.mids, idx), s), 1);
  } else {
    idx = Ops::zero_i();
    for (int step = 128; step >= 1; step >>= 1) {
      const typename Ops::F m = Ops::gather(lut.mids, Ops::add_i(idx, Ops::set1_i(step - 1)));
      idx = Ops::add_where(idx, Ops::lt(m, s), step);
    }
  }
  return finite_block ? idx : Ops::zero_where(idx, Ops::isnan(s));
}

// True when every value of a block with this absmax is finite (NaN absmax: the block has a NaN; an
// infinite absmax gives inf * 0 = NaN when scaling).
inline bool finite_absmax(float amax) { return amax <= std::numeric_limits<float>::max(); }

template <class T>
void quantize_blockwise(const T* x, int64_t n, int64_t blocksize, const CodeLut* lut, float* absmax,
                        uint8_t* codes, int threads) {
  const int64_t nblocks = ceil_div(n, blocksize);
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = start + blocksize <= n ? blocksize : n - start;
      const T* xb = x + start;
      uint8_t* qb = codes + start;
      const float amax = block_absmax(xb, len);
      absmax[b] = amax;
      const float inv = block_reciprocal(amax);
      const typename Ops::F vinv = Ops::set1(inv);
      const LutView view(*lut);
      const bool finite = finite_absmax(amax);
      int64_t i = 0;
      if (finite && view.plane_search) i = quantize_span(xb, len, inv, false, view, qb);
      for (; i + Ops::N <= len; i += Ops::N) {
        const typename Ops::F s = Ops::clamp_unit(Ops::mul(Ops::load(xb + i), vinv));
        Ops::store_u8(qb + i, code_indices(s, view, finite));
      }
      for (; i < len; ++i) qb[i] = nearest_code_index(scale_and_clamp(to_f32(xb[i]), inv), lut->mids);
    }
  });
}

template <class T>
void dequantize_blockwise(const uint8_t* codes, int64_t n, int64_t blocksize, const float* code,
                          const float* absmax, T* out, int threads) {
  const int64_t nblocks = ceil_div(n, blocksize);
  [[maybe_unused]] BytePlanes planes;  // Note [gather-free lookups]; building them costs ~1 us
  constexpr int64_t kPlanesMinElements = 1 << 14;
  const bool use_planes = Ops::kBytePlanes && n >= kPlanesMinElements;
  if constexpr (Ops::kBytePlanes)
    if (use_planes) build_byte_plane_lookup(code, &planes);
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = start + blocksize <= n ? blocksize : n - start;
      const uint8_t* qb = codes + start;
      T* ob = out + start;
      const float scale = absmax[b];
      const typename Ops::F vscale = Ops::set1(scale);
      int64_t i = 0;
      if (use_planes) i = dequantize_span(qb, len, planes, scale, ob);
      for (; i + Ops::N <= len; i += Ops::N) Ops::store(ob + i, Ops::mul(Ops::gather(code, Ops::load_u8(qb + i)), vscale));
      for (; i < len; ++i) from_f32(code[qb[i]] * scale, ob + i);
    }
  });
}
