// The CPU kernel's loops (na2d_cpu.cpp), written once over a vector width of L float lanes and
// included twice there: into `narrow` (8 lanes; built into the target_clones entry points for
// AVX-512, AVX2 and baseline x86-64) and into `wide` under `#pragma GCC target` for AVX-512 (16
// lanes). Compiled in the target's own namespace, every helper sees its vector width as a native one:
// a 512-bit comparison in a helper without the target is split lane by lane before it could be
// inlined into an AVX-512 caller (GCC 12), which ran the forward 2x slower. No include guard: by design.

// Vectors of L floats / int32 (GCC vector extensions; an alias template would drop the attribute).
template <int L>
struct Vec;
template <>
struct Vec<8> {
  using f = float __attribute__((vector_size(32)));
  using i = int32_t __attribute__((vector_size(32)));
  using f_unaligned = float __attribute__((vector_size(32), aligned(4), may_alias));
  using i_unaligned = int32_t __attribute__((vector_size(32), aligned(2), may_alias));
};
template <>
struct Vec<16> {
  using f = float __attribute__((vector_size(64)));
  using i = int32_t __attribute__((vector_size(64)));
  using f_unaligned = float __attribute__((vector_size(64), aligned(4), may_alias));
  using i_unaligned = int32_t __attribute__((vector_size(64), aligned(2), may_alias));
};
template <int L>
using VF = typename Vec<L>::f;
template <int L>
using VI = typename Vec<L>::i;

template <int L>
NA_INLINE VF<L> load(const float* p) {
  return *reinterpret_cast<const typename Vec<L>::f_unaligned*>(p);
}
template <int L>
NA_INLINE void store(float* p, VF<L> x) {
  *reinterpret_cast<typename Vec<L>::f_unaligned*>(p) = x;
}
template <int L>
NA_INLINE VF<L> as_float(VI<L> bits) {
  return reinterpret_cast<const VF<L>&>(bits);
}
template <int L>
NA_INLINE VI<L> as_bits(VF<L> x) {
  return reinterpret_cast<const VI<L>&>(x);
}
template <int L>
NA_INLINE VI<L> lane_index() {
  VI<L> lanes{};
  for (int l = 0; l < L; ++l) lanes[l] = l;
  return lanes;
}

// Chunk c (L lanes, as float) of a row of head-dim elements. float: elements Lc..Lc+L-1. bfloat16
// (the top half of a float) is read 2L elements at a time as L 32-bit pairs: chunk 2m holds block m's
// even elements (pair << 16), chunk 2m+1 its odd ones (pair & high half): a shift or a mask per chunk.
// (Widening 8 bfloat16 in order took GCC six instructions and ran the forward 1.9x slower than float.)
// Every vector sum over chunks is over the head dim or lane by lane, so the order only shows where a
// row is written: store_row puts elements back in place, and float sums kept in chunk order (dk, dv)
// go through store_row on their way out.
template <typename S, int L>
NA_INLINE VF<L> load_chunk(const S* row, int c) {
  if constexpr (std::is_same_v<S, float>) {
    return load<L>(row + L * c);
  } else {
    const VI<L> pairs = *reinterpret_cast<const typename Vec<L>::i_unaligned*>(row + 2 * L * (c / 2));
    return as_float<L>(c % 2 == 0 ? pairs << 16 : pairs & static_cast<int32_t>(0xFFFF0000));
  }
}

// The row's kChunks chunks (as load_chunk lays them out) written to `row`, rounded to nearest even.
template <typename S, int L, int kChunks>
NA_INLINE void store_row(S* row, const VF<L>* chunks) {
  if constexpr (std::is_same_v<S, float>) {
    for (int c = 0; c < kChunks; ++c) store<L>(row + L * c, chunks[c]);
  } else {
    auto rounded = [](VF<L> x) {
      const VI<L> bits = as_bits<L>(x);
      const VI<L> nearest = bits + 0x7FFF + ((bits >> 16) & 1);
      return x != x ? VI<L>{} + 0x7FC00000 : nearest;  // NaN stays NaN
    };
    for (int c = 0; c < kChunks; c += 2) {
      const VI<L> even = rounded(chunks[c]), odd = rounded(chunks[c + 1]);
      const VI<L> pairs = ((even >> 16) & 0xFFFF) | (odd & static_cast<int32_t>(0xFFFF0000));
      *reinterpret_cast<typename Vec<L>::i_unaligned*>(row + L * c) = pairs;
    }
  }
}

// Lane l of the result: sum of the L lanes of x[l] (a transposing reduction: no serial add chain).
template <int L>
NA_INLINE VF<L> sum_lanes(const VF<L>* x) {
  if constexpr (L == 8) {
    using v8i = VI<8>;
    auto pair_sums = [](VF<8> a, VF<8> b) {  // the haddps pattern: shuffles within 128-bit lanes
      return __builtin_shuffle(a, b, v8i{0, 2, 8, 10, 4, 6, 12, 14}) +
             __builtin_shuffle(a, b, v8i{1, 3, 9, 11, 5, 7, 13, 15});
    };
    const VF<8> low = pair_sums(pair_sums(x[0], x[1]), pair_sums(x[2], x[3]));
    const VF<8> high = pair_sums(pair_sums(x[4], x[5]), pair_sums(x[6], x[7]));
    return __builtin_shuffle(low, high, v8i{0, 1, 2, 3, 8, 9, 10, 11}) +
           __builtin_shuffle(low, high, v8i{4, 5, 6, 7, 12, 13, 14, 15});
  } else {
    // pair_sums(a, b): adjacent-lane sums of a in the low half, of b in the high half (two vpermt2ps
    // and an add). Four levels turn 16 vectors into one whose lane l sums x[l].
    VI<L> evens{}, odds{};
    for (int l = 0; l < L; ++l) {
      evens[l] = 2 * l;
      odds[l] = 2 * l + 1;
    }
    auto pair_sums = [&](VF<L> a, VF<L> b) NA_INLINE_LAMBDA {
      return __builtin_shuffle(a, b, evens) + __builtin_shuffle(a, b, odds);
    };
    VF<L> level[L];
    for (int n = 0; n < L; ++n) level[n] = x[n];
    for (int count = L; count > 1; count /= 2)
      for (int n = 0; n < count / 2; ++n) level[n] = pair_sums(level[2 * n], level[2 * n + 1]);
    return level[0];
  }
}

// Sum of x's L lanes by halving (log2 L shuffles and adds): the tail of window_dots, where a
// transposing reduction of mostly zero vectors would cost ~2L shuffles.
template <int L>
NA_INLINE float halving_sum(VF<L> x) {
  if constexpr (L == 16) {
    const VF<8> half = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                       __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    return halving_sum<8>(half);
  } else {
    using v4 = float __attribute__((vector_size(16)));
    v4 quarter = __builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7);
    quarter += __builtin_shufflevector(quarter, quarter, 2, 3, 0, 1);
    quarter += __builtin_shufflevector(quarter, quarter, 1, 0, 3, 2);
    return quarter[0];
  }
}

template <int L>
NA_INLINE float lane_sum(VF<L> x) {
  float sum = 0;
  for (int l = 0; l < L; ++l) sum += x[l];
  return sum;
}

// exp on (-inf, 0], the only range the softmax needs (logit - max). Cephes' expf: reduction by ln 2,
// degree-6 polynomial, ~1 ulp; written on vectors because std::exp stays a scalar libm call.
template <int L>
NA_INLINE VF<L> exp_nonpositive(VF<L> x) {
  const VF<L> lowest = VF<L>{} - 87.0f, magic = VF<L>{} + 12582912.0f;  // 1.5 * 2^23: rounds to integer
  x = x < lowest ? lowest : x;
  const VF<L> shifted = x * 1.44269504088896341f + magic;
  const VF<L> n = shifted - magic;
  const VF<L> r = x - n * 0.693359375f + n * 2.12194440e-4f;
  VF<L> p = VF<L>{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VI<L> exponent = (as_bits<L>(shifted) - as_bits<L>(magic) + 127) << 23;
  return p * as_float<L>(exponent);
}

// L lane-wise partial sums of <x, row>, x's chunks in xv (window_dots' groups and tail).
template <typename S, int L, int kChunks>
NA_INLINE VF<L> row_dot(const VF<L>* xv, const S* row) {
  VF<L> acc = xv[0] * load_chunk<S, L>(row, 0);
  for (int c = 1; c < kChunks; ++c) acc += xv[c] * load_chunk<S, L>(row, c);
  return acc;
}

// out[t] = <x, base + offsets[t]> for t < taps (base: a window's first key). `out` has room for
// padded_taps(taps).
template <typename S, int kD, int L, typename T = Acc<S>>
NA_INLINE void window_dots(const S* x, const S* base, const int64_t* offsets, int64_t taps, int64_t dim,
                           T* out) {
  if constexpr (kVectorPath<S, kD, L>) {
    constexpr int kChunks = kD / L;
    VF<L> xv[kChunks];
    for (int c = 0; c < kChunks; ++c) xv[c] = load_chunk<S, L>(x, c);
    VF<L> partial[L];
    int64_t first = 0;
    for (; first + L / 2 <= taps; first += L) {
      for (int64_t t = 0; t < L; ++t) {
        if (first + t >= taps) {
          partial[t] = VF<L>{};
          continue;
        }
        partial[t] = row_dot<S, L, kChunks>(xv, base + offsets[first + t]);
      }
      store<L>(out + first, sum_lanes<L>(partial));
    }
    if (first < taps) {  // fewer than L / 2 taps left (one at k = 7)
      // Stored as one vector, as the full groups are: a scalar store under the next vector load of
      // these taps would stall its store forwarding.
      const VI<L> lane = lane_index<L>();
      VF<L> sums{};
      for (int64_t t = first; t < taps; ++t) {
        const VF<L> acc = row_dot<S, L, kChunks>(xv, base + offsets[t]);
        sums = lane == static_cast<int32_t>(t - first) ? halving_sum<L>(acc) + VF<L>{} : sums;
      }
      store<L>(out + first, sums);
    }
  } else {
    for (int64_t t = 0; t < taps; ++t) {
      const S* row = base + offsets[t];
      T acc = 0;
      for (int64_t d = 0; d < dim; ++d) acc += T(x[d]) * T(row[d]);
      out[t] = acc;
    }
  }
}

// weights[t] = exp(weights[t] - shift) for t < taps; returns their sum. Tail lanes up to the padding
// are zeroed.
template <typename S, int kD, int L, typename T = Acc<S>>
NA_INLINE T exp_shifted(T* weights, int64_t taps, T shift) {
  if constexpr (kVectorPath<S, kD, L>) {
    VF<L> total{};
    const VI<L> lane = lane_index<L>();
    for (int64_t first = 0; first < taps; first += L) {
      VF<L> w = exp_nonpositive<L>(load<L>(weights + first) - shift);
      w = (lane + static_cast<int32_t>(first)) < static_cast<int32_t>(taps) ? w : VF<L>{};
      store<L>(weights + first, w);
      total += w;
    }
    return lane_sum<L>(total);
  } else {
    T sum = 0;
    for (int64_t t = 0; t < taps; ++t) sum += (weights[t] = std::exp(weights[t] - shift));
    return sum;
  }
}

// sum_t a[t] * b[t]. On the vector path L taps at a time: a float sum in order (compilers keep it so
// without -ffast-math) is a chain of `taps` dependent adds, ~200 cycles a query at k = 7.
template <typename S, int kD, int L, typename T = Acc<S>>
NA_INLINE T tap_dot(const T* a, const T* b, int64_t taps) {
  T sum = 0;
  int64_t t = 0;
  if constexpr (kVectorPath<S, kD, L>) {
    VF<L> lanes{};
    for (; t + L <= taps; t += L) lanes += load<L>(a + t) * load<L>(b + t);
    sum = lane_sum<L>(lanes);
  }
  for (; t < taps; ++t) sum += a[t] * b[t];
  return sum;
}

// out = factor * sum_t weights[t] * (base + offsets[t])[0:dim]: the attention-weighted sum of value
// rows, normalised (`sums`: room for dim values, used by the scalar loops).
template <typename S, int kD, int L, typename T = Acc<S>>
NA_INLINE void weighted_rows(const T* weights, const S* base, const int64_t* offsets, int64_t taps, int64_t dim,
                             T factor, S* out, T* sums) {
  if constexpr (kVectorPath<S, kD, L>) {
    // Even and odd taps in separate sums when a row is few chunks: 2 * kChunks independent FMA chains
    // instead of kChunks dependent chains of `taps` FMAs each (latency-bound at 4 chains).
    constexpr int kChunks = kD / L, kSets = kChunks <= 4 ? 2 : 1;
    VF<L> acc[kSets][kChunks] = {};
    int64_t t = 0;
    for (; t + kSets <= taps; t += kSets) {
      for (int set = 0; set < kSets; ++set) {
        const S* row = base + offsets[t + set];
        for (int c = 0; c < kChunks; ++c) acc[set][c] += weights[t + set] * load_chunk<S, L>(row, c);
      }
    }
    for (; t < taps; ++t) {
      const S* row = base + offsets[t];
      for (int c = 0; c < kChunks; ++c) acc[0][c] += weights[t] * load_chunk<S, L>(row, c);
    }
    for (int c = 0; c < kChunks; ++c) {
      for (int set = 1; set < kSets; ++set) acc[0][c] += acc[set][c];
      acc[0][c] *= factor;
    }
    store_row<S, L, kChunks>(out, acc[0]);
  } else {
    std::fill(sums, sums + dim, T(0));
    for (int64_t t = 0; t < taps; ++t) {
      const S* row = base + offsets[t];
      for (int64_t d = 0; d < dim; ++d) sums[d] += weights[t] * T(row[d]);
    }
    for (int64_t d = 0; d < dim; ++d) out[d] = S(sums[d] * factor);
  }
}

// The gradient step of N queries of one map row, j, j + d, j + 2d, ... (neighbours in a dilation
// group; N = 1 for one left over), on the vector path: dq_m = sum_t dlogit_mt * k_t (written), and into
// the key rows dk_t += dlogit_mt * q_m, dv_t += p_mt * dO_m (dlogits arrive multiplied by the scale).
// Their windows cover the same key rows, query m's starting shifts[m] dilated columns right of the
// first's (shifts[0] = 0, each next one 0 or 1 more). The k x (k + shifts[N-1]) keys of the union are
// walked once, each key's dk and dv rows read-modify-written once for all the windows that have it
// (one query at a time: two float rows per key and query). At NAT's 7x7 windows four interior queries
// share 7 x 10 keys where one at a time would update 4 x 49 (NA's backward 0.84x the time, bf16).
// dq in the same pass was 20% faster than in a pass of its own; gathering dk/dv per key instead
// (row-band inverse windows, sums in registers) was no faster and needs more geometry.
template <typename S, int kD, int L, int N>
NA_INLINE void query_block_gradients(const S* const* qp, const S* const* gp, const S* keys, float* dkeys,
                                     float* dvalues, const int64_t* offsets, int64_t kernel, int64_t column_step,
                                     const int64_t* shifts, const float* probs, int64_t probs_step,
                                     const float* dlogits, int64_t dlogits_step, S* const* dq_out) {
  constexpr int kChunks = kD / L;
  VF<L> qv[N][kChunks], gv[N][kChunks], dq[N][kChunks] = {};
  for (int m = 0; m < N; ++m)
    for (int c = 0; c < kChunks; ++c) {
      qv[m][c] = load_chunk<S, L>(qp[m], c);
      gv[m][c] = load_chunk<S, L>(gp[m], c);
    }
  const int64_t columns = kernel + shifts[N - 1];
  for (int64_t a = 0; a < kernel; ++a) {
    const int64_t first = a * kernel;  // tap (a, 0) of the first window
    for (int64_t u = 0; u < columns; ++u) {
      const int64_t offset = offsets[first] + u * column_step;
      const S* key = keys + offset;
      float* dkey = dkeys + offset;
      float* dvalue = dvalues + offset;
      VF<L> key_chunks[kChunks], dk[kChunks], dv[kChunks];
      for (int c = 0; c < kChunks; ++c) {
        key_chunks[c] = load_chunk<S, L>(key, c);
        dk[c] = load<L>(dkey + L * c);
        dv[c] = load<L>(dvalue + L * c);
      }
#pragma GCC unroll 8
      for (int m = 0; m < N; ++m) {
        const int64_t tap = u - shifts[m];
        if (tap < 0 || tap >= kernel) continue;
        const float dlogit = dlogits[m * dlogits_step + first + tap];
        const float prob = probs[m * probs_step + first + tap];
        for (int c = 0; c < kChunks; ++c) {
          dq[m][c] += dlogit * key_chunks[c];
          dk[c] += dlogit * qv[m][c];
          dv[c] += prob * gv[m][c];
        }
      }
      for (int c = 0; c < kChunks; ++c) {
        store<L>(dkey + L * c, dk[c]);
        store<L>(dvalue + L * c, dv[c]);
      }
    }
  }
  for (int m = 0; m < N; ++m) store_row<S, L, kChunks>(dq_out[m], dq[m]);
}

// query_block_gradients for one query on the scalar loops (float64, head dims not whole vectors).
template <typename S, typename T = Acc<S>>
NA_INLINE void query_gradients(const S* qp, const S* gp, const S* keys, T* dkeys, T* dvalues,
                               const int64_t* offsets, const T* probs, const T* dlogits, int64_t taps,
                               int64_t dim, S* dq_out, T* dq) {
  std::fill(dq, dq + dim, T(0));
  for (int64_t t = 0; t < taps; ++t) {
    const S* key = keys + offsets[t];
    T* dkey = dkeys + offsets[t];
    T* dvalue = dvalues + offsets[t];
    for (int64_t d = 0; d < dim; ++d) {
      dq[d] += dlogits[t] * T(key[d]);
      dkey[d] += dlogits[t] * T(qp[d]);
      dvalue[d] += probs[t] * T(gp[d]);
    }
  }
  for (int64_t d = 0; d < dim; ++d) dq_out[d] = S(dq[d]);
}

// How many neighbouring queries backward_units takes through query_block_gradients at a time: four
// where their q, dO and dq rows (3 x 4 x kChunks vectors) fit AVX-512's 32 registers beside a key's,
// else two. On AVX2's 16 registers pairs ran NA's backward at 0.87x the time of the one-query loop they replaced, fours
// at 0.94x; at 16 lanes fours 0.84x, pairs 0.88x (bfloat16, NAT-T's shapes).
template <int L, int kChunks>
constexpr int kBlockQueries = L == 16 && kChunks <= 2 ? 4 : 2;
constexpr int kMaxBlockQueries = 4;

// Scratch for one query: logits (then probabilities), gradients of logits (padded for vector tails;
// a block of queries' in a row), and one head-dim row of sums for the scalar loops.
template <typename T>
struct Scratch {
  Scratch(int64_t taps, int64_t dim)
      : logits(padded_taps(taps)), dlogits(kMaxBlockQueries * padded_taps(taps)), row(dim) {}
  std::vector<T> logits, dlogits, row;
};


// Offset of query (i, j)'s first key within its (b, h) plane.
NA_INLINE int64_t window_origin(Layout kv, Geometry g, int64_t i, int64_t j) {
  return g.row_start[i] * kv.i + g.col_start[j] * kv.j;
}

// Query (i, j)'s logits = scale * <q, k> + bias over its window from `keys` (`bias`: its placement's
// k*k biases, or null). Returns the largest logit.
template <typename S, int kD, int L, typename T = Acc<S>>
NA_INLINE T window_logits(const S* qp, const S* keys, const T* bias, Geometry g, int64_t dim, T scale,
                          T* logits) {
  const int64_t taps = g.kernel * g.kernel;
  window_dots<S, kD, L>(qp, keys, g.tap_offsets, taps, dim, logits);
  if constexpr (kVectorPath<S, kD, L>) {
    const VI<L> lane = lane_index<L>();
    VF<L> largest = VF<L>{} - INFINITY;
    for (int64_t first = 0; first < taps; first += L) {
      VF<L> logit = load<L>(logits + first) * scale;
      if (bias) logit += load<L>(bias + first);
      store<L>(logits + first, logit);
      const auto in_window = (lane + static_cast<int32_t>(first)) < static_cast<int32_t>(taps);
      largest = (in_window & (logit > largest)) ? logit : largest;  // &&: lane by lane at 16 lanes
    }
    float maximum = largest[0];
    for (int l = 1; l < L; ++l) maximum = std::max(maximum, largest[l]);
    return maximum;
  } else {
    T maximum = -INFINITY;
    for (int64_t t = 0; t < taps; ++t) {
      logits[t] = logits[t] * scale + (bias ? bias[t] : T(0));
      maximum = std::max(maximum, logits[t]);
    }
    return maximum;
  }
}

// Rows r in [begin, end) of the map, every query of a row. Keys in per-head planes: r runs over
// (B * heads * H), one head's row at a time. Keys with the heads interleaved per pixel (the
// (B, H, W, heads, D) memory of contiguous inputs): r runs over (B * H), all heads of each pixel
// together, which reads each pixel's keys once for all heads (15-19% faster there at 56^2 than a
// head at a time). With `probs` (training), each query's k*k probabilities are kept,
// (B, heads, H, W, k*k), for the backward.
template <typename S, int kD, int L, typename T = Acc<S>>
NA_INLINE void forward_rows(const S* q, const S* k, const S* v, const T* biases, S* out, T* probs, Shape s,
                            Layout lq, Layout lkv, Layout lo, Geometry g, T scale, bool heads_per_pixel,
                            int64_t begin, int64_t end) {
  const int64_t taps = g.kernel * g.kernel, D = kD > 0 ? kD : s.D;
  const int64_t head_biases = g.kernel * g.kernel * padded_taps(taps);
  Scratch<T> scratch(taps, D);
  T* weights = scratch.logits.data();
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = heads_per_pixel ? r / s.H : r / (s.heads * s.H), i = r % s.H;
    const int64_t first_head = heads_per_pixel ? 0 : r / s.H % s.heads;
    const int64_t last_head = heads_per_pixel ? s.heads : first_head + 1;
    for (int64_t j = 0; j < s.W; ++j) {
      const int64_t origin = window_origin(lkv, g, i, j), placement = bias_placement(g, i, j);
      for (int64_t h = first_head; h < last_head; ++h) {
        const int64_t window = lkv.offset(b, 0, 0, h) + origin;
        const T* bias = biases ? biases + h * head_biases + placement : nullptr;
        const T maximum =
            window_logits<S, kD, L>(q + lq.offset(b, i, j, h), k + window, bias, g, D, scale, weights);
        const T inverse = T(1) / exp_shifted<S, kD, L>(weights, taps, maximum);
        weighted_rows<S, kD, L>(weights, v + window, g.tap_offsets, taps, D, inverse, out + lo.offset(b, i, j, h),
                             scratch.row.data());
        if (probs) {
          T* query_probs = probs + s.query_index(b, h, i, j) * taps;
          for (int64_t t = 0; t < taps; ++t) query_probs[t] = weights[t] * inverse;
        }
      }
    }
  }
}

// A row of dim values summed in Acc<S> (in load_chunk's order on the vector path: dk, dv) written to
// `out` in S.
template <typename S, int kD, int L, typename T = Acc<S>>
NA_INLINE void row_to_storage(const T* sums, S* out, int64_t dim) {
  if constexpr (kVectorPath<S, kD, L>) {
    constexpr int kChunks = kD / L;
    VF<L> chunks[kChunks];
    for (int c = 0; c < kChunks; ++c) chunks[c] = load<L>(sums + L * c);
    store_row<S, L, kChunks>(out, chunks);
  } else {
    for (int64_t d = 0; d < dim; ++d) out[d] = S(sums[d]);
  }
}

// Rows [begin, end) of dense sums, as row_to_storage.
template <typename S, int kD, int L, typename T = Acc<S>>
NA_INLINE void sums_to_storage(const T* sums, S* out, int64_t dim, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) row_to_storage<S, kD, L>(sums + r * dim, out + r * dim, dim);
}

// Units u in [begin, end) of the flattened (B * heads): one thread owns a unit's slices of dk and dv
// (and its rpb-gradient plane), so the scatter into keys needs no atomics. dk and dv are sums of k*k
// terms per key, taken in Acc<S>: in `dk`, `dv` (laid out like k, zeroed by the caller), or, given
// `dk_out`, `dv_out` (bfloat16 keys in per-head planes, NAT's case), in one plane of sums per thread,
// zeroed per unit and rounded into dk_out's and dv_out's rows (layout `ldkv`) after it. The plane's
// sums (H*W*D floats each, 400 KB at NAT's 56^2) stay in cache from zeroing to rounding, where
// whole-tensor float buffers took two passes more over memory (zeros_like, then a rounding pass).
template <typename S, int kD, int L, typename T = Acc<S>>
NA_INLINE void backward_units(const S* grad_out, const S* q, const S* k, const S* v, const T* probs,
                              S* dq, T* dk, T* dv, S* dk_out, S* dv_out, T* drpb, Shape s, Layout lg, Layout lq,
                              Layout lkv, Layout ldq, Layout ldkv, Geometry g, T scale, int64_t begin,
                              int64_t end) {
  const int64_t kk = g.kernel, taps = kk * kk, span = 2 * kk - 1, D = kD > 0 ? kD : s.D;
  Scratch<T> scratch(taps, D);
  std::vector<T> placement_grads(drpb ? kk * kk * padded_taps(taps) : 0);
  const bool plane_sums = dk_out != nullptr;
  std::vector<T> plane_dk(plane_sums ? s.H * s.W * D : 0), plane_dv(plane_dk.size());
  for (int64_t u = begin; u < end; ++u) {
    const int64_t b = u / s.heads, h = u % s.heads, plane = lkv.offset(b, 0, 0, h);
    std::fill(placement_grads.begin(), placement_grads.end(), T(0));
    T* dk_plane = plane_sums ? plane_dk.data() : dk + plane;
    T* dv_plane = plane_sums ? plane_dv.data() : dv + plane;
    if (plane_sums) {
      std::fill(plane_dk.begin(), plane_dk.end(), T(0));
      std::fill(plane_dv.begin(), plane_dv.end(), T(0));
    }
    // dlogits of query (i, j), multiplied by the scale, into `dlogits`; its RPB gradient into its placement.
    auto logit_grads = [&](int64_t i, int64_t j, T* dlogits) NA_INLINE_LAMBDA {
      const T* query_probs = probs + s.query_index(b, h, i, j) * taps;
      window_dots<S, kD, L>(grad_out + lg.offset(b, i, j, h), v + plane + window_origin(lkv, g, i, j),
                            g.tap_offsets, taps, D, dlogits);  // dP
      // Softmax backward: dlogit_t = p_t (dP_t - sum_u p_u dP_u); the sum is dO . O, taken here from
      // what is at hand instead of from the output (one pass fewer over dO and O).
      const T row_delta = tap_dot<S, kD, L>(query_probs, dlogits, taps);
      for (int64_t t = 0; t < taps; ++t) dlogits[t] = query_probs[t] * (dlogits[t] - row_delta);
      if (drpb) {
        T* placement = placement_grads.data() + bias_placement(g, i, j);
        for (int64_t t = 0; t < taps; ++t) placement[t] += dlogits[t];
      }
      for (int64_t t = 0; t < taps; ++t) dlogits[t] *= scale;
    };
    const int64_t d = g.dilation;
    // Queries j, j + d, ... (N of them) through query_block_gradients (geometry_of checked that each
    // window starts 0 or d columns right of the one before it in its dilation group).
    auto block = [&](auto count, int64_t i, int64_t j) NA_INLINE_LAMBDA {
      constexpr int N = decltype(count)::value;
      int64_t shifts[N];
      for (int m = 0; m < N; ++m) shifts[m] = (g.col_start[j + m * d] - g.col_start[j]) / d;
      const S* qp[N];
      const S* gp[N];
      S* dq_out[N];
      for (int m = 0; m < N; ++m) {
        const int64_t col = j + m * d;
        qp[m] = q + lq.offset(b, i, col, h);
        gp[m] = grad_out + lg.offset(b, i, col, h);
        dq_out[m] = dq + ldq.offset(b, i, col, h);
        logit_grads(i, col, scratch.dlogits.data() + m * padded_taps(taps));
      }
      const int64_t origin = window_origin(lkv, g, i, j);
      const T* first_probs = probs + s.query_index(b, h, i, j) * taps;  // the block's: d * taps apart
      query_block_gradients<S, kD, L, N>(qp, gp, k + plane + origin, dk_plane + origin, dv_plane + origin,
                                         g.tap_offsets, kk, lkv.j * d, shifts, first_probs, d * taps,
                                         scratch.dlogits.data(), padded_taps(taps), dq_out);
    };
    for (int64_t i = 0; i < s.H; ++i) {
      for (int64_t j = 0; j < s.W; ++j) {
        if constexpr (kVectorPath<S, kD, L>) {
          // The first query of each block of its dilation group takes the block: four or two queries,
          // or what is left at the group's end (a pair, then a single query).
          constexpr int kBlock = kBlockQueries<L, kD / L>;
          if ((j / d) % kBlock) continue;
          int64_t left = std::min<int64_t>(kBlock, (s.W - 1 - j) / d + 1), col = j;
          if constexpr (kBlock == 4) {
            if (left == 4) {
              block(std::integral_constant<int, 4>(), i, col);
              continue;
            }
          }
          if (left >= 2) {
            block(std::integral_constant<int, 2>(), i, col);
            left -= 2;
            col += 2 * d;
          }
          if (left) block(std::integral_constant<int, 1>(), i, col);
        } else {
          const int64_t origin = window_origin(lkv, g, i, j);
          T* dlogits = scratch.dlogits.data();
          logit_grads(i, j, dlogits);
          query_gradients<S>(q + lq.offset(b, i, j, h), grad_out + lg.offset(b, i, j, h), k + plane + origin,
                             dk_plane + origin, dv_plane + origin, g.tap_offsets,
                             probs + s.query_index(b, h, i, j) * taps, dlogits, taps, D,
                             dq + ldq.offset(b, i, j, h), scratch.row.data());
        }
      }
    }
    if (drpb) add_placements_to_plane(placement_grads.data(), kk, drpb + u * span * span);
    if (plane_sums) {
      for (int64_t i = 0; i < s.H; ++i) {
        for (int64_t j = 0; j < s.W; ++j) {
          const int64_t row = i * s.W + j, at = ldkv.offset(b, i, j, h);
          row_to_storage<S, kD, L>(plane_dk.data() + row * D, dk_out + at, D);
          row_to_storage<S, kD, L>(plane_dv.data() + row * D, dv_out + at, D);
        }
      }
    }
  }
}

// ---- The forward with queries in lanes (AVX-512 build, 7x7 windows at dilation 1, any layout) ----
// forward_rows takes one query at a time: each window tap is a dot over the head dim, L lanes wide,
// summed across lanes (transposing reductions), and every key row is widened from bfloat16 once per
// query that sees it (49 times). Here the 16 lanes are 16 neighbouring queries of one map row
// instead: key and value rows are widened once, into float rows laid out dim-major (one vector per
// head-dim element and 16 map columns); a tap's 16 keys are then one permute of two such vectors
// (each lane's window starts where windows.py says, edges included), and logits, softmax and
// weighted sums are plain lane-wise FMAs: no reductions across lanes, no per-query re-widening.

// x[r] (row r, lanes = columns) transposed in place: x[c][r] = old x[r][c]. Stage s swaps bit s of
// the row and column indices (8 pairs of rows, two 2-source shuffles each; constant masks, spelt out
// so that GCC sees them as constants).
template <int kStage, int L>
NA_INLINE void transpose_stage(VF<L>* x) {
  constexpr int s = kStage;
#define NA_LOW(c) (((c) & s) ? 16 + (c) - s : (c))
#define NA_HIGH(c) (((c) & s) ? 16 + (c) : (c) + s)
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) {
    if (r & s) continue;
    const VF<L> a = x[r], b = x[r + s];
    x[r] = __builtin_shufflevector(a, b, NA_LOW(0), NA_LOW(1), NA_LOW(2), NA_LOW(3), NA_LOW(4), NA_LOW(5),
                                   NA_LOW(6), NA_LOW(7), NA_LOW(8), NA_LOW(9), NA_LOW(10), NA_LOW(11),
                                   NA_LOW(12), NA_LOW(13), NA_LOW(14), NA_LOW(15));
    x[r + s] = __builtin_shufflevector(a, b, NA_HIGH(0), NA_HIGH(1), NA_HIGH(2), NA_HIGH(3), NA_HIGH(4),
                                       NA_HIGH(5), NA_HIGH(6), NA_HIGH(7), NA_HIGH(8), NA_HIGH(9), NA_HIGH(10),
                                       NA_HIGH(11), NA_HIGH(12), NA_HIGH(13), NA_HIGH(14), NA_HIGH(15));
  }
#undef NA_LOW
#undef NA_HIGH
}

template <int L>
NA_INLINE void transpose_16(VF<L>* x) {
  static_assert(L == 16, "16 x 16 only");
  transpose_stage<8, L>(x);
  transpose_stage<4, L>(x);
  transpose_stage<2, L>(x);
  transpose_stage<1, L>(x);
}

// 16 head-dim rows (rows[l]: lane l's) as kD vectors, dim-major: out[e * stride] holds element e of
// the 16 rows in load_chunk's element order (float, lane l = row l).
template <typename S, int kD, int L>
NA_INLINE void rows_to_dim_major(const S* const* rows, float* out, int64_t stride) {
  constexpr int kChunks = kD / L;
  for (int c = 0; c < kChunks; ++c) {
    VF<L> x[L];
    for (int l = 0; l < L; ++l) x[l] = load_chunk<S, L>(rows[l], c);
    transpose_16<L>(x);
    for (int e = 0; e < L; ++e) store<L>(out + (c * L + e) * stride, x[e]);
  }
}

// Rows r in [begin, end) of (B * heads * H), two neighbouring query rows of a plane at a time: their
// windows span 8 key rows (7 at the map's edges), and each permuted key or value vector serves both
// rows (the permutes, not the FMAs, bound the one-row loop: one per FMA). Key and value rows are
// widened into a ring of 8 slots as the rows advance, each once per thread.
template <typename S, int kD, int L, typename T = Acc<S>>
NA_INLINE void forward_query_lanes(const S* q, const S* k, const S* v, const T* rpb_rows, S* out, T* probs,
                                   Shape s, Layout lq, Layout lkv, Layout lo, Geometry g, T scale, int64_t begin,
                                   int64_t end) {
  if constexpr (L == 16 && std::is_same_v<T, float> && kVectorPath<S, kD, L>) {
    constexpr int kK = 7, kTaps = kK * kK, kChunks = kD / L, kSlots = kK + 1;
    // A key row widened: kD rows of `width` floats (map columns, zero padding after the map: a
    // window's two vectors start at most W - 7 columns in).
    const int64_t width = (s.W + 25 + L - 1) / L * L, row_floats = kD * width;
    std::vector<float> key_rows(2 * kSlots * row_floats, 0.0f);  // the slots of keys, then of values
    int64_t slot_row[kSlots];
    std::fill(slot_row, slot_row + kSlots, int64_t(-1));
    alignas(64) float logits[2][kTaps * L];
    alignas(64) float queries[2][kD * L];
    const S* row_ptrs[L];
    // Key row r of plane (b, h) (row id (b * heads + h) * H + r): its slot, widened on first use.
    auto slot_of = [&](int64_t b, int64_t h, int64_t r) NA_INLINE_LAMBDA -> int64_t {
      const int64_t id = (b * s.heads + h) * s.H + r, slot = r % kSlots;
      if (slot_row[slot] == id) return slot;
      slot_row[slot] = id;
      for (int which = 0; which < 2; ++which) {
        const S* plane = (which ? v : k) + lkv.offset(b, r, 0, h);
        float* rows = key_rows.data() + (which * kSlots + slot) * row_floats;
        for (int64_t j0 = 0; j0 < s.W; j0 += L) {
          for (int l = 0; l < L; ++l) row_ptrs[l] = plane + std::min<int64_t>(j0 + l, s.W - 1) * lkv.j;
          rows_to_dim_major<S, kD, L>(row_ptrs, rows + j0, width);
        }
      }
      return slot;
    };
    // Query rows i .. i + kRows - 1 of plane (b, h).
    auto row_block = [&](auto rows_count, int64_t b, int64_t h, int64_t i) NA_INLINE_LAMBDA {
      constexpr int kRows = decltype(rows_count)::value;
      int64_t first_row[kRows];
      const float* bias_rows[kRows];
      for (int m = 0; m < kRows; ++m) {
        first_row[m] = g.row_start[i + m];
        bias_rows[m] = rpb_rows ? rpb_rows + (h * (2 * kK - 1) + g.row_bias[i + m]) * L : nullptr;
      }
      const int64_t top = first_row[0], key_count = first_row[kRows - 1] + kK - top;
      const float* key_slot[kSlots];
      const float* value_slot[kSlots];
      for (int64_t n = 0; n < key_count; ++n) {
        const int64_t slot = slot_of(b, h, top + n);
        key_slot[n] = key_rows.data() + slot * row_floats;
        value_slot[n] = key_rows.data() + (kSlots + slot) * row_floats;
      }
      for (int64_t j0 = 0; j0 < s.W; j0 += L) {
        const int64_t valid = std::min<int64_t>(L, s.W - j0), first_col = g.col_start[j0];
        VI<L> tap_index[kK], bias_index{};
        for (int l = 0; l < L; ++l) {
          const int64_t j = j0 + std::min<int64_t>(l, valid - 1);
          tap_index[0][l] = static_cast<int32_t>(g.col_start[j] - first_col);
          bias_index[l] = static_cast<int32_t>(g.col_bias[j]);
        }
        for (int c = 1; c < kK; ++c) tap_index[c] = tap_index[0] + c;
        for (int m = 0; m < kRows; ++m) {
          for (int l = 0; l < L; ++l) row_ptrs[l] = q + lq.offset(b, i + m, j0 + std::min<int64_t>(l, valid - 1), h);
          rows_to_dim_major<S, kD, L>(row_ptrs, queries[m], L);
        }
        // Logits, lane = query: tap (a, c) of every lane is one permute of key row a's two vectors;
        // key row n is tap row n - (first_row[m] - top) of query row m, where that is in [0, 7).
        auto logit_rows = [&](auto use, int64_t n) NA_INLINE_LAMBDA {
          constexpr int kUse = decltype(use)::value;  // bit m: row m has key row n in its window
          const float* keys = key_slot[n] + first_col;
          VF<L> acc[kRows][kK] = {};
          for (int e = 0; e < kD; ++e) {
            const VF<L> low = load<L>(keys + e * width), high = load<L>(keys + e * width + L);
            for (int c = 0; c < kK; ++c) {
              const VF<L> key = __builtin_shuffle(low, high, tap_index[c]);
              for (int m = 0; m < kRows; ++m)
                if (kUse & (1 << m)) acc[m][c] += load<L>(queries[m] + e * L) * key;
            }
          }
          for (int m = 0; m < kRows; ++m) {
            if (!(kUse & (1 << m))) continue;
            const int64_t a = top + n - first_row[m];
            const VF<L> bias_row = bias_rows[m] ? load<L>(bias_rows[m] + a * L) : VF<L>{};
            for (int c = 0; c < kK; ++c) {
              VF<L> logit = acc[m][c] * scale;
              if (bias_rows[m]) logit += __builtin_shuffle(bias_row, bias_index + c);
              store<L>(logits[m] + (a * kK + c) * L, logit);
            }
          }
        };
        // Which rows take key row n: both, or (at the ends of the union) the first or the last.
        auto for_key_rows = [&](const auto& body) NA_INLINE_LAMBDA {
          for (int64_t n = 0; n < key_count; ++n) {
            const bool first = n < kK, last = n >= first_row[kRows - 1] - top;
            if (kRows == 1 || (first && last))
              body(std::integral_constant<int, (1 << kRows) - 1>(), n);
            else if (first)
              body(std::integral_constant<int, 1>(), n);
            else
              body(std::integral_constant<int, 1 << (kRows - 1)>(), n);
          }
        };
        for_key_rows(logit_rows);
        VF<L> inverse[kRows];
        for (int m = 0; m < kRows; ++m) {
          VF<L> largest = VF<L>{} - INFINITY;
          for (int t = 0; t < kTaps; ++t) {
            const VF<L> logit = load<L>(logits[m] + t * L);
            largest = logit > largest ? logit : largest;
          }
          VF<L> total{};
          for (int t = 0; t < kTaps; ++t) {
            const VF<L> w = exp_nonpositive<L>(load<L>(logits[m] + t * L) - largest);
            store<L>(logits[m] + t * L, w);
            total += w;
          }
          inverse[m] = 1.0f / total;
        }
        // Weighted values, 4 head-dim elements at a time, taps outermost: consecutive FMAs go to
        // different sums (4 x kRows chains), where tap-innermost loops chained 7 FMAs in a row.
        constexpr int kE = 4;
        VF<L> sums[kRows][kD];
        for (int e0 = 0; e0 < kD; e0 += kE) {
          VF<L> acc[kRows][kE] = {};
          auto value_rows = [&](auto use, int64_t n) NA_INLINE_LAMBDA {
            constexpr int kUse = decltype(use)::value;
            const float* values = value_slot[n] + first_col;
            const float* weights[kRows];
            for (int m = 0; m < kRows; ++m) weights[m] = logits[m] + (top + n - first_row[m]) * kK * L;
            VF<L> low[kE], high[kE];
            for (int e = 0; e < kE; ++e) {
              low[e] = load<L>(values + (e0 + e) * width);
              high[e] = load<L>(values + (e0 + e) * width + L);
            }
            for (int c = 0; c < kK; ++c)
              for (int e = 0; e < kE; ++e) {
                const VF<L> value = __builtin_shuffle(low[e], high[e], tap_index[c]);
                for (int m = 0; m < kRows; ++m)
                  if (kUse & (1 << m)) acc[m][e] += load<L>(weights[m] + c * L) * value;
              }
          };
          for_key_rows(value_rows);
          for (int m = 0; m < kRows; ++m)
            for (int e = 0; e < kE; ++e) sums[m][e0 + e] = acc[m][e] * inverse[m];
        }
        for (int m = 0; m < kRows; ++m) {
          for (int c = 0; c < kChunks; ++c) transpose_16<L>(sums[m] + c * L);  // sums[m][c * L + l]: query l's chunk c
          for (int64_t l = 0; l < valid; ++l) {
            VF<L> chunks[kChunks];
            for (int c = 0; c < kChunks; ++c) chunks[c] = sums[m][c * L + l];
            store_row<S, L, kChunks>(out + lo.offset(b, i + m, j0 + l, h), chunks);
          }
          if (probs) {  // (B, heads, H, W, 49), per query: 16 x 16 blocks of taps transposed
            T* first = probs + s.query_index(b, h, i + m, j0) * kTaps;
            for (int t0 = 0; t0 + L <= kTaps; t0 += L) {
              VF<L> block[L];
              for (int t = 0; t < L; ++t) block[t] = load<L>(logits[m] + (t0 + t) * L) * inverse[m];
              transpose_16<L>(block);
              for (int64_t l = 0; l < valid; ++l) store<L>(first + l * kTaps + t0, block[l]);
            }
            const VF<L> last = load<L>(logits[m] + (kTaps - 1) * L) * inverse[m];
            for (int64_t l = 0; l < valid; ++l) first[l * kTaps + kTaps - 1] = last[l];
          }
        }
      }
    };
    for (int64_t r = begin; r < end;) {
      const int64_t b = r / (s.heads * s.H), h = r / s.H % s.heads, i = r % s.H;
      if (r + 1 < end && i + 1 < s.H) {
        row_block(std::integral_constant<int, 2>(), b, h, i);
        r += 2;
      } else {
        row_block(std::integral_constant<int, 1>(), b, h, i);
        r += 1;
      }
    }
  }
}

// The loops the entry points call, as types: na2d_cpu.cpp's `run_widest` picks one build of each.
struct ForwardRows {
  template <typename S, int kD, int L, typename... A>
  static NA_INLINE void run(A... args) { forward_rows<S, kD, L>(args...); }
};
struct ForwardQueryLanes {
  template <typename S, int kD, int L, typename... A>
  static NA_INLINE void run(A... args) { forward_query_lanes<S, kD, L>(args...); }
};
struct BackwardUnits {
  template <typename S, int kD, int L, typename... A>
  static NA_INLINE void run(A... args) { backward_units<S, kD, L>(args...); }
};
// Rows of dk, dv summed in float, rounded to storage: at the lanes the backward summed them at (a
// bfloat16 row's float sums are in that lane count's chunk order).
struct SumsToStorage {
  template <typename S, int kD, int L, typename... A>
  static NA_INLINE void run(A... args) { sums_to_storage<S, kD, L>(args...); }
};
