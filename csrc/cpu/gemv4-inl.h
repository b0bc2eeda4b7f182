// gemv4-inl.h — the fused 4-bit dequantize-and-multiply kernel for a few input rows, written against
// an `Ops` vector interface and included by each ISA unit inside its namespace. Follows Note [4-bit gemv
// order]: each 16-byte chunk is decoded with two table permutes (the permute reads only the low four
// bits of an index, so the low nibble needs no mask) and its products summed in registers.

template <int M>
void gemv_4bit_rows(const Gemv4bitArgs& a, int64_t n0, int64_t n1) {
  using L16 = typename Ops::L16;
  const float* tab = table_4bit(a.qt);
  const typename Ops::T16 table = Ops::table16(tab);
  const int64_t K = a.k_in, bs = a.blocksize;
  alignas(64) float ph[M * 16], pl[M * 16], lanes[16];
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = n * K, fend = row + K;
    // High nibbles sit at even flat indices: x[k] for k of the row's parity, from the matching copy.
    const bool odd_row = (row & 1) != 0;
    L16 y[M];
    for (int m = 0; m < M; ++m) y[m] = Ops::l16_zero();
    // Blocks are walked incrementally: an integer division per block costs as much as decoding it.
    int64_t b = row / bs, block_end = (b + 1) * bs;
    for (int64_t f = row; f < fend; ++b, block_end += bs) {
      const int64_t bend = block_end < fend ? block_end : fend;
      L16 s[M];
      for (int m = 0; m < M; ++m) s[m] = Ops::l16_zero();
      while (f < bend) {
        if ((f & 31) == 0 && f + 32 <= bend) {
          const int64_t k0 = f - row;  // same parity as the row start, since f is even
          const float* xh = odd_row ? a.x_odd + ((k0 - 1) >> 1) : a.x_even + (k0 >> 1);
          const float* xl = odd_row ? a.x_even + ((k0 + 1) >> 1) : a.x_odd + (k0 >> 1);
          for (; f + 32 <= bend; f += 32, xh += 16, xl += 16) {
            L16 vh, vl;
            Ops::l16_decode(a.packed + (f >> 1), table, &vh, &vl);
            for (int m = 0; m < M; ++m)
              s[m] = Ops::l16_add(s[m], Ops::l16_add(Ops::l16_mul(vh, Ops::l16_loadu(xh + m * a.x_stride)),
                                                     Ops::l16_mul(vl, Ops::l16_loadu(xl + m * a.x_stride))));
          }
        } else {
          const int64_t next = ((f >> 5) + 1) << 5;
          const int64_t stop = next < bend ? next : bend;
          partial_chunk_products(a, tab, n, f, stop, ph, pl);
          for (int m = 0; m < M; ++m)
            s[m] = Ops::l16_add(s[m], Ops::l16_add(Ops::l16_loadu(ph + m * 16), Ops::l16_loadu(pl + m * 16)));
          f = stop;
        }
      }
      const float am = block_absmax_of(a, b);
      for (int m = 0; m < M; ++m) y[m] = Ops::l16_scale_fma(s[m], am, y[m]);
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
