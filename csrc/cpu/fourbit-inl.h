// fourbit-inl.h — NF4 / FP4 blockwise quantization kernels, written once against an `Ops` vector
// interface and included by each ISA unit inside its own namespace (after blockwise-inl.h, whose
// block_absmax it uses). Tails end in the per-element functions of scalar_ops.h.
//
// Blocks are whole multiples of 2 * Ops::N elements (4-bit block sizes are multiples of 32), so a
// vector step never straddles a block; only the final partial block has a scalar tail.

// Note [4-bit code search]
// The code is the count of sorted thresholds strictly below a value v (NF4: the 15 midpoints, v = s;
// FP4: the 7 magnitude thresholds, v = |s|). Instead of a 4-step dependent binary search, v's cell on a
// uniform grid of Ops::kGridCells cells over [lo, hi] picks `below[cell]`, the count of thresholds below
// the cell (less a margin covering the rounding of the cell computation), and `steps` compare-and-step
// rounds add the few thresholds inside the cell. The thresholds are far enough apart (>= 0.083) that
// this is 1 step with 32 cells and 2 with 16; make_search() computes it, so the result is exact by
// construction and equals the reference count (scalar_ops.h nf4_code / fp4_code).
struct ThresholdSearch {
  typename Ops::T16 thresholds;  // sorted, padded with +inf to 16
  typename Ops::TGrid below;      // per grid cell
  float lo, cells_per_unit;
  int steps;
};

inline ThresholdSearch make_search(const float* thresholds, int count, float lo, float hi) {
  constexpr float kMargin = 1e-5f;  // >> rounding error of (v - lo) * cells_per_unit for |v| <= 1
  alignas(64) float padded[16];
  alignas(64) int32_t below[Ops::kGridCells];
  for (int i = 0; i < 16; ++i) padded[i] = i < count ? thresholds[i] : std::numeric_limits<float>::infinity();
  const float width = (hi - lo) / Ops::kGridCells;
  int steps = 0;
  for (int c = 0; c < Ops::kGridCells; ++c) {
    const float cell_lo = lo + c * width - kMargin, cell_hi = lo + (c + 1) * width + kMargin;
    int n_below = 0, n_inside = 0;
    for (int i = 0; i < count; ++i) {
      n_below += thresholds[i] < cell_lo;
      n_inside += thresholds[i] >= cell_lo && thresholds[i] <= cell_hi;
    }
    below[c] = n_below;
    if (n_inside > steps) steps = n_inside;
  }
  return {Ops::table16(padded), Ops::table_grid(below), lo, Ops::kGridCells / (hi - lo), steps};
}

inline typename Ops::I count_below(const ThresholdSearch& t, typename Ops::F v) {
  const typename Ops::I cell = Ops::grid_cell(Ops::mul(Ops::sub(v, Ops::set1(t.lo)), Ops::set1(t.cells_per_unit)));
  typename Ops::I c = Ops::lookup_grid(t.below, cell);
  for (int k = 0; k < t.steps; ++k) c = Ops::add_where(c, Ops::lt(Ops::lookup16(t.thresholds, c), v), 1);
  return Ops::zero_where(c, Ops::isnan(v));
}

struct Codes4bitTables {
  ThresholdSearch search;            // NF4 midpoints over [-1, 1], or FP4 thresholds over [0, 1]
  typename Ops::T16i fp4_magnitude;  // magnitude rank -> code
  typename Ops::T16 values;          // code -> value, for dequantization
};

inline Codes4bitTables make_tables(formats::QuantType4bit qt) {
  alignas(64) float mids[15], values[16];
  alignas(64) int32_t mag[16];
  for (int i = 0; i < 16; ++i) {
    if (i < 15) mids[i] = formats::nf4_midpoint(i);
    mag[i] = i < 8 ? formats::kFP4MagnitudeCode[i] : 0;
    values[i] = table_4bit(qt)[i];
  }
  const ThresholdSearch search = qt == formats::QuantType4bit::kNF4
                                     ? make_search(mids, 15, -1.0f, 1.0f)
                                     : make_search(formats::kFP4Thresholds, 7, 0.0f, 1.0f);
  return {search, Ops::table16_i(mag), Ops::table16(values)};
}

inline typename Ops::I codes_4bit(typename Ops::F s, formats::QuantType4bit qt, const Codes4bitTables& t) {
  if (qt == formats::QuantType4bit::kNF4) return count_below(t.search, s);
  // FP4: thresholds t_i < |s| counted (strict '>'), sign from s < 0 (NaN: neither).
  const typename Ops::I rank = count_below(t.search, Ops::abs(s));
  return Ops::add_where(Ops::lookup16_i(t.fp4_magnitude, rank), Ops::lt(s, Ops::zero()), formats::kFP4SignBit);
}

template <class T>
void quantize_4bit(const T* x, int64_t n, int64_t blocksize, formats::QuantType4bit qt, float* absmax,
                   uint8_t* packed, int threads) {
  const int64_t nblocks = ceil_div(n, blocksize);
  const Codes4bitTables tables = make_tables(qt);
  const uint8_t pad_code = code_4bit(0.0f, qt);
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * blocksize;  // even: blocksize is even
      const int64_t len = start + blocksize <= n ? blocksize : n - start;
      const T* xb = x + start;
      uint8_t* pb = packed + start / 2;
      const float amax = block_absmax(xb, len);
      absmax[b] = amax;
      const float inv = block_reciprocal(amax);
      const typename Ops::F vinv = Ops::set1(inv);
      int64_t i = 0;
      for (; i + 2 * Ops::N <= len; i += 2 * Ops::N) {
        const typename Ops::F s0 = Ops::clamp_unit(Ops::mul(Ops::load(xb + i), vinv));
        const typename Ops::F s1 = Ops::clamp_unit(Ops::mul(Ops::load(xb + i + Ops::N), vinv));
        Ops::store_nibbles(pb + i / 2, codes_4bit(s0, qt, tables), codes_4bit(s1, qt, tables));
      }
      for (; i < len; i += 2) {
        const uint8_t hi = code_4bit(scale_and_clamp(to_f32(xb[i]), inv), qt);
        const uint8_t lo = i + 1 < len ? code_4bit(scale_and_clamp(to_f32(xb[i + 1]), inv), qt) : pad_code;
        pb[i / 2] = uint8_t((hi << formats::kHighNibbleShift) | lo);
      }
    }
  });
}

// 16-bit output: round each block's 16 possible values once, then look the codes up 32 at a time. Same
// bits as rounding every product (a code's product is the same number wherever it appears).
// (A template on O so that units whose Ops has no word lookup never instantiate it.)
template <class O, class T>
void dequantize_4bit_words(const uint8_t* packed, int64_t n, int64_t blocksize, const Codes4bitTables& tables,
                           const float* values, const float* absmax, T* out, int threads) {
  parallel_for_blocks(ceil_div(n, blocksize), blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * blocksize, end = start + blocksize < n ? start + blocksize : n;
      const typename O::W16 table = O::template word_table<T>(tables.values, absmax[b]);
      int64_t i = start;
      for (; i + 2 * O::N <= end; i += 2 * O::N) O::store_words(out + i, packed + i / 2, table);
      for (; i < end; ++i) {
        const uint8_t byte = packed[i / 2];
        const uint8_t c = (i & 1) ? (byte & 0x0f) : (byte >> formats::kHighNibbleShift);
        from_f32(values[c] * absmax[b], out + i);
      }
    }
  });
}

template <class T>
void dequantize_4bit(const uint8_t* packed, int64_t n, int64_t blocksize, formats::QuantType4bit qt,
                     const float* absmax, T* out, int threads) {
  const int64_t nblocks = ceil_div(n, blocksize);
  const Codes4bitTables tables = make_tables(qt);
  const float* values = table_4bit(qt);
  // 4-bit block sizes are powers of two and multiples of 2 * Ops::N: each vector step lies in one block,
  // whose scale is found with a shift. (A loop per block cost more than the decoding for blocks of 64.)
  int shift = 0;
  while ((int64_t(1) << shift) < blocksize) ++shift;
  if constexpr (Ops::kHasWordLookup && sizeof(T) == 2) {
    dequantize_4bit_words<Ops>(packed, n, blocksize, tables, values, absmax, out, threads);
    return;
  }
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    const int64_t begin = first * blocksize, end = last * blocksize < n ? last * blocksize : n;
    int64_t i = begin;
    for (; i + 2 * Ops::N <= end; i += 2 * Ops::N) {
      const typename Ops::F vscale = Ops::set1(absmax[i >> shift]);
      typename Ops::I c0, c1;
      Ops::load_nibbles(packed + i / 2, &c0, &c1);
      Ops::store(out + i, Ops::mul(Ops::lookup16(tables.values, c0), vscale));
      Ops::store(out + i + Ops::N, Ops::mul(Ops::lookup16(tables.values, c1), vscale));
    }
    for (; i < end; ++i) {
      const uint8_t byte = packed[i / 2];
      const uint8_t c = (i & 1) ? (byte & 0x0f) : (byte >> formats::kHighNibbleShift);
      from_f32(values[c] * absmax[i >> shift], out + i);
    }
  });
}
