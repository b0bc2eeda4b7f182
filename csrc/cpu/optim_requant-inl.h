// optim_requant-inl.h — requantizing a block's new optimizer states: quantize_values, and for levels
// without byte planes the pending-block types update_span interleaves with the next block's update (Note
// [pipelined requantization] in optim-inl.h); the register binary search of 4-bit states. Included by
// optim-inl.h, inside each ISA unit's namespace.

// Codes of `len` values scaled by `inv` (Note [scaling rule]), exact nearest.
inline void quantize_values(const float* v, int64_t len, float inv, bool finite, const LutView lut, uint8_t* codes) {
  const typename Ops::F vinv = Ops::set1(inv);
  int64_t j = 0;
  if (finite && lut.plane_search) j = quantize_span(v, len, inv, lut.clamp_free, lut, codes);
  for (; j + Ops::N <= len; j += Ops::N)
    Ops::store_u8(codes + j, code_indices(Ops::clamp_unit(Ops::mul(Ops::load(v + j), vinv)), lut, finite));
  for (; j < len; ++j) codes[j] = nearest_code_index(scale_and_clamp(v[j], inv), lut.mids);
}

// No block waits: update_span's plain loop.
struct NoPending {
  static constexpr bool kActive = false;
  template <int kStates>
  void step(int64_t) const {}
};

// A block of 8-bit states whose new values wait in a buffer for requantization (Note [pipelined
// requantization]). Levels with byte planes take Note [staged 8-bit step] instead.
struct PendingBlock {
  static constexpr bool kActive = true;
  const float* values[3];
  typename Ops::F inv[3];  // Note [scaling rule]
  float inv_scalar[3];
  bool one_round[3];  // the search is code_first_round() alone
  bool finite[3];
  uint8_t* codes[3];
  LutView lut[3];

  void set(int k, const float* v, float amax, uint8_t* out) {
    values[k] = v;
    inv_scalar[k] = block_reciprocal(amax);
    inv[k] = Ops::set1(inv_scalar[k]);
    finite[k] = finite_absmax(amax);
    // The clamp is skipped for maps whose search needs none (CodeLut::clamp_free); a non-finite block
    // takes the general search, which masks NaN.
    one_round[k] = finite[k] && lut[k].max_in_bin <= 1 && lut[k].clamp_free;
    codes[k] = out;
  }
  // Codes of state k's values [i, i + Ops::N) when one_round[k].
  void quantize_vector_one_round(int k, int64_t i) const {
    Ops::store_u8(codes[k] + i, code_first_round(Ops::mul(Ops::load(values[k] + i), inv[k]), lut[k].bins));
  }
  // Codes of vector i, after update_span's vector loop stepped it.
  template <int kStates>
  KBIT_ALWAYS_INLINE void step(int64_t i) const {
    for (int k = 0; k < kStates; ++k) quantize_vector_one_round(k, i);
  }
  // Whether step() can requantize a whole block of `len` values as update_span goes.
  template <int kStates>
  bool pipelinable(int64_t len) const {
    if (len % Ops::N != 0) return false;
    for (int k = 0; k < kStates; ++k)
      if (!one_round[k]) return false;
    return true;
  }
  template <int kStates>
  void quantize_all(int64_t len) const {
    const PendingBlock local = *this;  // see update_span: stores of codes would reload fields
    for (int k = 0; k < kStates; ++k) {
      if (!local.one_round[k]) {
        quantize_values(local.values[k], len, local.inv_scalar[k], local.finite[k], local.lut[k], local.codes[k]);
        continue;
      }
      int64_t j = 0;
      for (; j + Ops::N <= len; j += Ops::N) local.quantize_vector_one_round(k, j);
      for (; j < len; ++j)
        local.codes[k][j] = nearest_code_index(scale_and_clamp(local.values[k][j], local.inv_scalar[k]), local.lut[k].mids);
    }
  }
};

// Code of a scaled value among 15 sorted thresholds (a 4-bit state's midpoints): the count of thresholds
// strictly below it, as a branch-free binary search over registers. Step k compares with
// thresholds[c + step - 1]; the tables at_plus3 / at_plus1 hold thresholds[i + 3] / thresholds[i + 1] so
// each step is one register lookup by c, one compare and one masked add. NaN compares false: code 0,
// as the reference (scalar_ops.h code4_index). Unlike make_search's grid (fourbit-inl.h), its cost does
// not depend on how the thresholds are spaced: the optimizer maps crowd thresholds near 0, where the
// grid needed up to 6 extra rounds.
struct BinarySearch16 {
  typename Ops::T16 at, at_plus1, at_plus3;
  typename Ops::F middle;  // thresholds[7]
  bool clamp_free;         // as CodeLut::clamp_free: no threshold below -1, none at or above 1

  BinarySearch16() = default;
  BinarySearch16(const float* code16, const float* thresholds15) {
    alignas(64) float t[19];
    for (int i = 0; i < 19; ++i) t[i] = i < 15 ? thresholds15[i] : std::numeric_limits<float>::infinity();
    at = Ops::table16(t);
    at_plus1 = Ops::table16(t + 1);
    at_plus3 = Ops::table16(t + 3);
    middle = Ops::set1(t[7]);
    clamp_free = code16[0] >= -1.0f && thresholds15[14] < 1.0f;
  }
  typename Ops::I codes(typename Ops::F v) const {
    typename Ops::I c = Ops::add_where(Ops::zero_i(), Ops::lt(middle, v), 8);
    c = Ops::add_where(c, Ops::lt(Ops::lookup16(at_plus3, c), v), 4);
    c = Ops::add_where(c, Ops::lt(Ops::lookup16(at_plus1, c), v), 2);
    return Ops::add_where(c, Ops::lt(Ops::lookup16(at, c), v), 1);
  }
  // Codes of values scaled by inv (Note [scaling rule]).
  typename Ops::I scaled_codes(typename Ops::F x, typename Ops::F inv) const {
    const typename Ops::F s = Ops::mul(x, inv);
    return codes(clamp_free ? s : Ops::clamp_unit(s));
  }
};

// A block of 4-bit states whose new values wait in a buffer for requantization: codes are packed two
// vectors at a time, so step(i) packs [i - N, i + N) after every second vector.
struct PendingBlock4 {
  static constexpr bool kActive = true;
  const float* values[3];
  typename Ops::F inv[3];
  float inv_scalar[3];
  const float* mids[3];  // the 15 thresholds, for the scalar tail
  BinarySearch16 search[3];
  uint8_t* packed[3];

  void set(int k, const float* v, float amax, uint8_t* out) {
    values[k] = v;
    inv_scalar[k] = block_reciprocal(amax);
    inv[k] = Ops::set1(inv_scalar[k]);
    packed[k] = out;
  }
  void pack_pair(int k, int64_t j) const {  // elements [j, j + 2N)
    Ops::store_nibbles(packed[k] + j / 2, search[k].scaled_codes(Ops::load(values[k] + j), inv[k]),
                       search[k].scaled_codes(Ops::load(values[k] + j + Ops::N), inv[k]));
  }
  template <int kStates>
  void step(int64_t i) const {
    if ((i / Ops::N) & 1)
      for (int k = 0; k < kStates; ++k) pack_pair(k, i - Ops::N);
  }
  template <int kStates>
  void quantize_all(int64_t len) const {
    const PendingBlock4 local = *this;  // byte stores would reload fields read through `this`
    for (int k = 0; k < kStates; ++k) {
      int64_t j = 0;
      for (; j + 2 * Ops::N <= len; j += 2 * Ops::N) local.pack_pair(k, j);
      alignas(64) uint8_t tail[2 * Ops::N];
      for (int64_t e = j; e < len; ++e) tail[e - j] = code4_index(scale_and_clamp(local.values[k][e], local.inv_scalar[k]), local.mids[k]);
      pack_nibbles(tail, len - j, local.packed[k] + j / 2);  // j is even: the tail starts on a byte
    }
  }
};

// Rules whose update waits on the divider (sqrt, divide): their blocks are pipelined with the previous
// block's requantization. For the others, interleaving measured slower than two loops (Lion8bit 28 -> 31 ms).
template <class Rule>
inline constexpr bool kPipelineRequant = std::is_same_v<Rule, AdamRule> || std::is_same_v<Rule, AdEMAMixRule> ||
                                         std::is_same_v<Rule, RMSpropRule> || std::is_same_v<Rule, AdagradRule>;
