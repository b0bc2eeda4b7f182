// optim_step-inl.h — the per-vector pieces every fused optimizer kernel shares (optim-inl.h and
// optim_staged-inl.h): the parameter store with its rounding and the vector form of step_element().
// Included by optim-inl.h inside each ISA unit's namespace.

struct StepKernels {
  using F = typename Ops::F;

  // Stores parameter elements [i, i + N) (Note [bf16 rounding], or Note [stochastic rounding]).
  template <class T>
  static void store_param(const OptimTensor& t, int64_t i, F v) {
    T* p = static_cast<T*>(t.p) + i;
    if constexpr (std::is_same_v<T, bf16_t>) {
      if (t.stochastic_round) {
        const uint64_t first = uint64_t(i);
        if (uint32_t(first) <= 0xffffffffu - uint32_t(Ops::N - 1)) {  // the low halves of the indices do not wrap
          Ops::store_stochastic(p, v, Ops::sr_bits(t.sr_seed, uint32_t(first), uint32_t(first >> 32)));
        } else {
          alignas(64) float lanes[Ops::N];
          Ops::store(lanes, v);
          for (int j = 0; j < Ops::N; ++j) write_param<T>(t, i + j, lanes[j]);
        }
        return;
      }
    }
    Ops::store(p, v);
  }

  // Vector form of step_element(): gnorm scaling, the rule, p -= k u, skip_zeros. Returns u (0 where skipped).
  template <class Rule>
  static KBIT_ALWAYS_INLINE F step_vector(const Rule& r, const StepScalars& sc, bool skip_zeros, F& p, F g, F* s) {
    g = Ops::mul(g, Ops::set1(sc.gnorm_scale));
    const F p_old = p;
    F s_old[3];
    for (int k = 0; k < Rule::kStates; ++k) s_old[k] = s[k];
    F u;
    update<Ops>(r, p, g, s, &u);
    p = Ops::sub(p, Ops::mul(Ops::set1(sc.k), u));
    if (skip_zeros) {
      const typename Ops::M zero = Ops::is_zero(g);
      p = Ops::select(zero, p_old, p);
      for (int k = 0; k < Rule::kStates; ++k) s[k] = Ops::select(zero, s_old[k], s[k]);
      u = Ops::select(zero, Ops::zero(), u);
    }
    return u;
  }
};
