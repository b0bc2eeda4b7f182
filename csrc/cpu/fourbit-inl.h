// fourbit-inl.h — NF4 / FP4 blockwise quantization kernels, written once against an `Ops` vector
// interface and included by each ISA unit inside its own namespace (after blockwise-inl.h, whose
// block_absmax it uses). Tails end in the per-element functions of scalar_ops.h.
//
// Blocks are whole multiples of 2 * Ops::N elements (4-bit block sizes are multiples of 32), so a
// vector step never straddles a block; only the final partial block has a scalar tail.

struct Codes4bitTables {
  typename Ops::T16 nf4_mids;       // 15 NF4 midpoints + inf (Note [NF4 decision rule])
  typename Ops::T16 fp4_thresholds;  // 7 thresholds, then +inf (Note [FP4 decision rule])
  typename Ops::T16i fp4_magnitude;  // magnitude rank -> code
  typename Ops::T16 values;          // code -> value, for dequantization
};

inline Codes4bitTables make_tables(formats::QuantType4bit qt) {
  alignas(64) float mids[16], thr[16], values[16];
  alignas(64) int32_t mag[16];
  for (int i = 0; i < 16; ++i) {
    mids[i] = i < 15 ? formats::nf4_midpoint(i) : std::numeric_limits<float>::infinity();
    thr[i] = i < 7 ? formats::kFP4Thresholds[i] : std::numeric_limits<float>::infinity();
    mag[i] = i < 8 ? formats::kFP4MagnitudeCode[i] : 0;
    values[i] = table_4bit(qt)[i];
  }
  return {Ops::table16(mids), Ops::table16(thr), Ops::table16_i(mag), Ops::table16(values)};
}

// Branchless count of table entries strictly below s, over the first `2 * top` entries.
inline typename Ops::I count_below(typename Ops::T16 table, typename Ops::F s, int top) {
  typename Ops::I c = Ops::zero_i();
  for (int step = top; step >= 1; step >>= 1) {
    c = Ops::add_where(c, Ops::lt(Ops::lookup16(table, Ops::add_i(c, Ops::set1_i(step - 1))), s), step);
  }
  return c;
}

inline typename Ops::I codes_4bit(typename Ops::F s, formats::QuantType4bit qt, const Codes4bitTables& t) {
  if (qt == formats::QuantType4bit::kNF4) return count_below(t.nf4_mids, s, 8);
  // FP4: thresholds t_i < |s| counted (strict '>'), sign from s < 0 (NaN: neither).
  const typename Ops::I rank = count_below(t.fp4_thresholds, Ops::abs(s), 4);
  return Ops::add_where(Ops::lookup16_i(t.fp4_magnitude, rank), Ops::lt(s, Ops::zero()), formats::kFP4SignBit);
}

template <class T>
void quantize_4bit(const T* x, int64_t n, int64_t blocksize, formats::QuantType4bit qt, float* absmax,
                   uint8_t* packed, int threads) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
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

template <class T>
void dequantize_4bit(const uint8_t* packed, int64_t n, int64_t blocksize, formats::QuantType4bit qt,
                     const float* absmax, T* out, int threads) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const Codes4bitTables tables = make_tables(qt);
  const float* values = table_4bit(qt);
  parallel_for_blocks(nblocks, blocksize, threads, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = start + blocksize <= n ? blocksize : n - start;
      const uint8_t* pb = packed + start / 2;
      T* ob = out + start;
      const float scale = absmax[b];
      const typename Ops::F vscale = Ops::set1(scale);
      int64_t i = 0;
      for (; i + 2 * Ops::N <= len; i += 2 * Ops::N) {
        typename Ops::I c0, c1;
        Ops::load_nibbles(pb + i / 2, &c0, &c1);
        Ops::store(ob + i, Ops::mul(Ops::lookup16(tables.values, c0), vscale));
        Ops::store(ob + i + Ops::N, Ops::mul(Ops::lookup16(tables.values, c1), vscale));
      }
      for (; i < len; ++i) {
        const uint8_t byte = pb[i / 2];
        const uint8_t c = (i & 1) ? (byte & 0x0f) : (byte >> formats::kHighNibbleShift);
        from_f32(values[c] * scale, ob + i);
      }
    }
  });
}
