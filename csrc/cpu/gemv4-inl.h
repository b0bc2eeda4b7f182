// gemv4-inl.h — the fused 4-bit dequantize-and-multiply kernel for a few input rows, written against
// an `Ops` vector interface and included by each ISA unit inside its namespace. Follows Note [4-bit gemv
// order]: each 16-byte chunk is decoded with two table permutes (the permute reads only the low four
// bits of an index, so the low nibble needs no mask) and its products summed in registers.

// One chunk's lane sums for M rows, Note [4-bit gemv order]: the first chunk of a segment starts
// s = fma(hi, x_hi, lo * x_lo); later ones do s = fma(lo, x_lo, fma(hi, x_hi, s)).
template <int M, bool First>
inline void chunk_accumulate_vec(typename Ops::L16 vh, typename Ops::L16 vl, const float* xh, const float* xl,
                                 int64_t x_stride, typename Ops::L16* s) {
  for (int m = 0; m < M; ++m) {
    const typename Ops::L16 xhm = Ops::l16_loadu(xh + m * x_stride), xlm = Ops::l16_loadu(xl + m * x_stride);
    s[m] = First ? Ops::l16_fma(vh, xhm, Ops::l16_mul(vl, xlm)) : Ops::l16_fma(vl, xlm, Ops::l16_fma(vh, xhm, s[m]));
  }
}

template <int M, bool First>
inline void chunk_sums(const Gemv4bitArgs& a, const uint8_t* bytes, typename Ops::T16 table, const float* xh,
                       const float* xl, typename Ops::L16* s) {
  typename Ops::L16 vh, vl;
  Ops::l16_decode(bytes, table, &vh, &vl);
  chunk_accumulate_vec<M, First>(vh, vl, xh, xl, a.x_stride, s);
}

// Scales of blocks [b0, b0 + count) into out, double quantization decoded Ops::N blocks at a time (one
// block's scalar decode costs as much as a quarter of the block's multiply-adds). Same float operations as
// block_absmax_of(): code * nested, then + offset.
inline constexpr int64_t kRowScales = 256;
inline void row_scales(const Gemv4bitArgs& a, int64_t b0, int64_t count, float* out) {
  int64_t i = 0;
  if (a.absmax == nullptr) {
    const typename Ops::F offset = Ops::set1(a.offset);
    for (; i + Ops::N <= count; i += Ops::N) {
      const int64_t first = b0 + i, last = first + Ops::N - 1;
      const typename Ops::F v = Ops::gather(a.absmax_code, Ops::load_u8(a.absmax_q + first));
      // Ops::N blocks usually share one nested block (256 of them do): a broadcast, not a second gather.
      typename Ops::F nested;
      if ((first >> a.nested_shift) == (last >> a.nested_shift)) {
        nested = Ops::set1(a.absmax_nested[first >> a.nested_shift]);
      } else {
        const typename Ops::I blocks = Ops::add_i(Ops::iota_i(), Ops::set1_i(int(first)));
        nested = Ops::gather(a.absmax_nested, Ops::srl_i(blocks, a.nested_shift));
      }
      Ops::store(out + i, Ops::add(Ops::mul(v, nested), offset));
    }
  }
  for (; i < count; ++i) out[i] = block_absmax_of(a, b0 + i);
}

// `nblocks` whole blocks of `CPB` chunks each (0: a.blocksize / 32 at run time) starting at flat index f of
// row `row` (f on a block boundary, so on a chunk boundary and a whole byte), blocks b0.. : the bulk of every
// row, with no per-chunk bookkeeping.
template <int M, int CPB>
void whole_blocks(const Gemv4bitArgs& a, typename Ops::T16 table, int64_t row, int64_t f, int64_t b0, int64_t nblocks,
                  typename Ops::L16* y) {
  const int64_t cpb = CPB ? CPB : a.blocksize / 32;
  const uint8_t* bytes = a.packed + (f >> 1);
  const int64_t k0 = f - row;  // has the row start's parity, since f is even
  const bool odd = (k0 & 1) != 0;
  const float* xh = odd ? a.x_odd + ((k0 - 1) >> 1) : a.x_even + (k0 >> 1);
  const float* xl = odd ? a.x_even + ((k0 + 1) >> 1) : a.x_odd + (k0 >> 1);
  alignas(64) float scales[kRowScales];
  // The row's lanes live in registers for the loop: through the pointer, every block's update would be a
  // store and a reload (the compiler cannot prove row_scales() leaves them alone), a chain twice as slow.
  typename Ops::L16 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = y[m];
  for (int64_t i = 0; i < nblocks; ++i) {
    if (i % kRowScales == 0) row_scales(a, b0 + i, nblocks - i < kRowScales ? nblocks - i : kRowScales, scales);
    typename Ops::L16 s[M];
    chunk_sums<M, true>(a, bytes, table, xh, xl, s);
    bytes += 16, xh += 16, xl += 16;
    for (int64_t c = 1; c < cpb; ++c, bytes += 16, xh += 16, xl += 16) chunk_sums<M, false>(a, bytes, table, xh, xl, s);
    const float am = scales[i % kRowScales];
    for (int m = 0; m < M; ++m) acc[m] = Ops::l16_scale_fma(s[m], am, acc[m]);
  }
  for (int m = 0; m < M; ++m) y[m] = acc[m];
}

template <int M>
inline void whole_blocks_any(const Gemv4bitArgs& a, typename Ops::T16 table, int64_t row, int64_t f, int64_t b0,
                             int64_t nblocks, typename Ops::L16* y) {
  if (a.blocksize == 64) whole_blocks<M, 2>(a, table, row, f, b0, nblocks, y);
  else whole_blocks<M, 0>(a, table, row, f, b0, nblocks, y);
}

// Rows [n0, n1) when gemv_uses_groups(): whole 128-element groups, Note [4-bit gemv order] (groups). Each
// half group lies in one block (both are 64-aligned and blocks are at least 64 long). Offset loads read up
// to 3 bytes past a group, so the tensor's last group is decoded from a zero-padded copy.
template <int M>
void group_rows(const Gemv4bitArgs& a, typename Ops::T16 table, int64_t n0, int64_t n1) {
  using L16 = typename Ops::L16;
  constexpr int64_t kHalf = kGemvGroup / 2;  // elements per half group, and bytes per group
  const int64_t K = a.k_in, groups = K / kGemvGroup, nbytes = (a.n_out * K + 1) / 2;
  int bs_shift = 0;  // block sizes are powers of two; a division per group would cost as much as its math
  while ((int64_t(1) << bs_shift) < a.blocksize) ++bs_shift;
  alignas(64) float scales[kRowScales];
  alignas(64) uint8_t padded[2 * kHalf];
  alignas(64) float lanes[16];
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = n * K, row_last_block = (row + K - 1) >> bs_shift;
    // Block scales: float32 ones are read in place; double-quantized ones are decoded into a window.
    const float* sp = a.absmax;
    int64_t window = 0, window_end = a.absmax != nullptr ? std::numeric_limits<int64_t>::max() : -1;
    const uint8_t* bytes = a.packed + (row >> 1);
    const int64_t direct = (row >> 1) + groups * kHalf + 3 <= nbytes ? groups : groups - 1;
    if (direct < groups) {
      std::memset(padded, 0, sizeof(padded));
      std::memcpy(padded, bytes + direct * kHalf, kHalf);
    }
    L16 c0[M], c1[M];
    for (int m = 0; m < M; ++m) c0[m] = c1[m] = Ops::l16_zero();
    const float* x = a.x_groups;
    for (int64_t g = 0, f = row; g < groups; ++g, f += kGemvGroup, x += kGemvGroup) {
      const int64_t b_lo = f >> bs_shift, b_hi = (f + kHalf) >> bs_shift;
      if (b_hi >= window_end) {
        window = b_lo;
        const int64_t count = row_last_block + 1 - window;
        window_end = window + (count < kRowScales ? count : kRowScales);
        row_scales(a, window, window_end - window, scales);
        sp = scales;
      }
      const L16 sc = Ops::l16_halves(sp[b_lo - window], sp[b_hi - window]);
      const uint8_t* p = g < direct ? bytes + g * kHalf : padded;
      L16 lo[4], hi[4];
      for (int k = 0; k < 4; ++k) Ops::l16_decode_dwords(p + k, table, &lo[k], &hi[k]);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        L16 s0 = Ops::l16_mul(lo[0], Ops::l16_loadu(xm)), s1 = Ops::l16_mul(hi[0], Ops::l16_loadu(xm + 16));
        for (int k = 1; k < 4; ++k) {
          s0 = Ops::l16_fma(lo[k], Ops::l16_loadu(xm + 32 * k), s0);
          s1 = Ops::l16_fma(hi[k], Ops::l16_loadu(xm + 32 * k + 16), s1);
        }
        c0[m] = Ops::l16_fma(s0, sc, c0[m]);
        c1[m] = Ops::l16_fma(s1, sc, c1[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      Ops::l16_store(lanes, Ops::l16_add(c0[m], c1[m]));
      a.out[m * a.n_out + n] = sum_lanes16(lanes);
    }
  }
}

// A chunk cut by a row boundary, elements [f, stop) of the 32-aligned chunk c: the whole chunk is decoded
// and the lanes outside [f, stop) are zeroed (weights and inputs, which masked loads never read), giving
// exactly the operands chunk_operands() builds element by element.
template <int M>
inline void partial_chunk_vec(const Gemv4bitArgs& a, typename Ops::T16 table, int64_t row, int64_t f, int64_t stop,
                              bool first, typename Ops::L16* s) {
  const int64_t c = f & ~int64_t(31);
  const int64_t k0 = c - row;  // may be negative: lanes before the row are masked out
  // High lane j holds element c + 2j, low lane j element c + 2j + 1.
  const auto hi = Ops::l16_lanes(int((f - c + 1) >> 1), int((stop - c + 1) >> 1));
  const auto lo = Ops::l16_lanes(int((f - c) >> 1), int((stop - c) >> 1));
  typename Ops::L16 vh, vl;
  Ops::l16_decode(a.packed + (c >> 1), table, &vh, &vl);
  vh = Ops::l16_maskz(vh, hi);
  vl = Ops::l16_maskz(vl, lo);
  const bool odd = (k0 & 1) != 0;
  const float* xh = odd ? a.x_odd + ((k0 - 1) >> 1) : a.x_even + (k0 >> 1);
  const float* xl = odd ? a.x_even + ((k0 + 1) >> 1) : a.x_odd + (k0 >> 1);
  for (int m = 0; m < M; ++m) {
    const typename Ops::L16 xhm = Ops::l16_maskz_loadu(xh + m * a.x_stride, hi);
    const typename Ops::L16 xlm = Ops::l16_maskz_loadu(xl + m * a.x_stride, lo);
    s[m] = first ? Ops::l16_fma(vh, xhm, Ops::l16_mul(vl, xlm)) : Ops::l16_fma(vl, xlm, Ops::l16_fma(vh, xhm, s[m]));
  }
}

// A cut chunk, vectorized unless its 16 bytes would run past the packed data (the tensor's last chunk).
template <int M>
inline void partial_any(const Gemv4bitArgs& a, typename Ops::T16 table, const float* tab, int64_t n, int64_t row,
                        int64_t f, int64_t stop, int64_t nbytes, bool first, typename Ops::L16* s, float* wh, float* wl,
                        float* xh_part, float* xl_part) {
  if (((f & ~int64_t(31)) >> 1) + 16 <= nbytes) {
    partial_chunk_vec<M>(a, table, row, f, stop, first, s);
    return;
  }
  chunk_operands(a, tab, n, f, stop, wh, wl, xh_part, xl_part);
  if (first) chunk_accumulate_vec<M, true>(Ops::l16_loadu(wh), Ops::l16_loadu(wl), xh_part, xl_part, 16, s);
  else chunk_accumulate_vec<M, false>(Ops::l16_loadu(wh), Ops::l16_loadu(wl), xh_part, xl_part, 16, s);
}

template <int M>
void gemv_4bit_rows(const Gemv4bitArgs& a, int64_t n0, int64_t n1) {
  using L16 = typename Ops::L16;
  const float* tab = table_4bit(a.qt);
  const typename Ops::T16 table = Ops::table16(tab);
  if (a.x_groups != nullptr) {
    group_rows<M>(a, table, n0, n1);
    return;
  }
  const int64_t K = a.k_in, bs = a.blocksize;
  alignas(64) float wh[16], wl[16], xh_part[M * 16], xl_part[M * 16], lanes[16];
  // Every row is made of whole, chunk-aligned blocks when K is a multiple of both (the common case).
  const bool aligned = a.aligned;
  const int64_t nbytes = (a.n_out * K + 1) / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = n * K, fend = row + K;
    // High nibbles sit at even flat indices: x[k] for k of the row's parity, from the matching copy.
    const bool odd_row = (row & 1) != 0;
    L16 y[M];
    for (int m = 0; m < M; ++m) y[m] = Ops::l16_zero();
    if (aligned) {
      whole_blocks_any<M>(a, table, row, row, n * (K / bs), K / bs, y);
    } else {
      // A segment (the part of block b in this row, [f, bend)) that may start or end mid-chunk.
      auto segment = [&](int64_t f, int64_t bend, int64_t b) {
        L16 s[M];
        bool first = true;
        if ((f & 31) != 0) {  // head: a chunk cut by the row start
          const int64_t stop = ((f >> 5) + 1) << 5 < bend ? ((f >> 5) + 1) << 5 : bend;
          partial_any<M>(a, table, tab, n, row, f, stop, nbytes, first, s, wh, wl, xh_part, xl_part);
          f = stop;
          first = false;
        }
        if (f + 32 <= bend) {  // whole chunks
          const int64_t k0 = f - row;
          const float* xh = odd_row ? a.x_odd + ((k0 - 1) >> 1) : a.x_even + (k0 >> 1);
          const float* xl = odd_row ? a.x_even + ((k0 + 1) >> 1) : a.x_odd + (k0 >> 1);
          if (first) {
            chunk_sums<M, true>(a, a.packed + (f >> 1), table, xh, xl, s);
            f += 32, xh += 16, xl += 16;
            first = false;
          }
          for (; f + 32 <= bend; f += 32, xh += 16, xl += 16) chunk_sums<M, false>(a, a.packed + (f >> 1), table, xh, xl, s);
        }
        if (f < bend) partial_any<M>(a, table, tab, n, row, f, bend, nbytes, first, s, wh, wl, xh_part, xl_part);
        const float am = block_absmax_of(a, b);
        for (int m = 0; m < M; ++m) y[m] = Ops::l16_scale_fma(s[m], am, y[m]);
      };
      int64_t f = row, b = row / bs;
      if (f % bs != 0 || f + bs > fend) {  // the block the row starts in, if cut
        const int64_t bend = (b + 1) * bs < fend ? (b + 1) * bs : fend;
        segment(f, bend, b);
        f = bend;
        ++b;
      }
      const int64_t nwhole = (fend - f) / bs;  // then whole blocks, in the tight loop
      if (nwhole > 0) {
        whole_blocks_any<M>(a, table, row, f, b, nwhole, y);
        f += nwhole * bs;
        b += nwhole;
      }
      if (f < fend) segment(f, fend, b);  // the block the row ends in, if cut
    }
    for (int m = 0; m < M; ++m) {
      Ops::l16_store(lanes, y[m]);
      a.out[m * a.n_out + n] = sum_lanes16(lanes);
    }
  }
}

template <int M>
void gemv_4bit_m(const Gemv4bitArgs& a, int threads) {
  parallel_for_blocks(a.n_out, a.k_in * M, threads, [&](int64_t n0, int64_t n1) { gemv_4bit_rows<M>(a, n0, n1); });
}

inline void gemv_4bit(const Gemv4bitArgs& a, int threads) {
  switch (a.rows) {
    case 1: gemv_4bit_m<1>(a, threads); break;
    case 2: gemv_4bit_m<2>(a, threads); break;
    case 3: gemv_4bit_m<3>(a, threads); break;
    case 4: gemv_4bit_m<4>(a, threads); break;
    case 5: gemv_4bit_m<5>(a, threads); break;
    case 6: gemv_4bit_m<6>(a, threads); break;
    case 7: gemv_4bit_m<7>(a, threads); break;
    case 8: gemv_4bit_m<8>(a, threads); break;
    default: break;  // the binding never passes more than kGemvMaxRows
  }
}
