// Exact-window 2-D neighborhood attention for CPU: k*k logits per query, none wasted.
//
// Tensors are (B, H, W, heads, D) with any strides but a contiguous head dim; k and v (and so dk, dv)
// share theirs, dense in any dim order. NAT's q, k, v reach it in per-head planes, (B, heads, H, W, D)
// memory (cpp_kernel.py copies the qkv projection's views into them). In (B, H, W, heads, D) memory
// a window's key rows lie a whole map row of all heads apart (14 KB at every NAT stage), which lands
// them on few L1 sets; planes made the backward 1.2x (56^2, 2 heads) to 1.6x (7^2, 16 heads) faster,
// the forward no slower, at the same copy cost. Window geometry comes in from Python (windows.py, the one
// source of truth): key row of tap a is row_start[i] + a * dilation, its RPB row row_bias[i] + a;
// columns likewise. In training the forward keeps each query's k*k probabilities (as Swin keeps its
// attention matrix: B*H*W*heads*k*k floats); the backward takes dP, dq, dk, dv and the RPB gradient
// from them in one pass per query. Rebuilding them from a saved logsumexp instead (flash-attention
// style, no B*H*W*k*k buffer) costs the backward the logits' dot products and exps again: keeping
// them took the backward 29.2 -> 24.0 ms and the forward 10.4 -> 11.1 ms at 56^2 (docs/benchmarks.md).
//
// Per query the work is: its window's first key (every window is the same k x k grid from there)
// -> k*k dot products -> + its RPB placement -> softmax -> weighted sum.
// float with a head dim that is a multiple of 8 takes 8-lane vector code (GCC vector extensions,
// lowered to whatever the clone's ISA has); anything else (float64 for the tests, odd head dims)
// runs the same steps with scalar loops.
//
// bfloat16 (autocast's CPU dtype) is storage only: q, k, v, dO are widened to float as they
// are loaded, and every sum (logits, softmax, weighted sums, dq, and dk, dv and the RPB gradient in
// float buffers) is taken in float; the kept probabilities and the RPB are float. Only the output
// and dq, dk, dv are rounded back to the inputs' dtype, once each.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time, so a build
// cached on one machine still runs on an older one.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NA_CLONES
#endif
#define NA_INLINE inline __attribute__((always_inline))

namespace {

using v8f = float __attribute__((vector_size(32)));
using v8i = int32_t __attribute__((vector_size(32)));
using v8f_unaligned = float __attribute__((vector_size(32), aligned(4), may_alias));

using v8i_unaligned = int32_t __attribute__((vector_size(32), aligned(2), may_alias));

NA_INLINE v8f load8(const float* p) { return *reinterpret_cast<const v8f_unaligned*>(p); }
NA_INLINE void store8(float* p, v8f x) { *reinterpret_cast<v8f_unaligned*>(p) = x; }
NA_INLINE v8f as_float(v8i bits) { return reinterpret_cast<const v8f&>(bits); }
NA_INLINE v8i as_bits(v8f x) { return reinterpret_cast<const v8i&>(x); }

// Chunk c (8 lanes, as float) of a row of head-dim elements. float: elements 8c..8c+7. bfloat16 (the
// top half of a float) is read 16 elements at a time as 8 32-bit pairs: chunk 2m holds block m's even
// elements (pair << 16), chunk 2m+1 its odd ones (pair & high half): a shift or a mask per 8 lanes.
// (Widening 8 bfloat16 in order took GCC six instructions and ran the forward 1.9x slower than float.)
// Every vector sum over chunks is over the head dim or lane by lane, so the order only shows where a
// row is written: store_row puts elements back in place, and float sums kept in chunk order (dk, dv)
// go through store_row on their way out.
template <typename S>
NA_INLINE v8f load_chunk(const S* row, int c) {
  if constexpr (std::is_same_v<S, float>) {
    return load8(row + 8 * c);
  } else {
    const v8i pairs = *reinterpret_cast<const v8i_unaligned*>(row + 16 * (c / 2));
    return as_float(c % 2 == 0 ? pairs << 16 : pairs & static_cast<int32_t>(0xFFFF0000));
  }
}

// The row's kChunks chunks (as load_chunk lays them out) written to `row`, rounded to nearest even.
template <typename S, int kChunks>
NA_INLINE void store_row(S* row, const v8f* chunks) {
  if constexpr (std::is_same_v<S, float>) {
    for (int c = 0; c < kChunks; ++c) store8(row + 8 * c, chunks[c]);
  } else {
    auto rounded = [](v8f x) {
      const v8i bits = as_bits(x);
      const v8i nearest = bits + 0x7FFF + ((bits >> 16) & 1);
      return x != x ? v8i{} + 0x7FC00000 : nearest;  // NaN stays NaN
    };
    for (int c = 0; c < kChunks; c += 2) {
      const v8i even = rounded(chunks[c]), odd = rounded(chunks[c + 1]);
      const v8i pairs = ((even >> 16) & 0xFFFF) | (odd & static_cast<int32_t>(0xFFFF0000));
      *reinterpret_cast<v8i_unaligned*>(row + 8 * c) = pairs;
    }
  }
}

// Lane l of the result: sum of the 8 lanes of x[l] (a transposing reduction: no serial add chain).
NA_INLINE v8f sum_lanes_of_8(const v8f* x) {
  auto pair_sums = [](v8f a, v8f b) {  // the haddps pattern
    return __builtin_shuffle(a, b, v8i{0, 2, 8, 10, 4, 6, 12, 14}) +
           __builtin_shuffle(a, b, v8i{1, 3, 9, 11, 5, 7, 13, 15});
  };
  const v8f low = pair_sums(pair_sums(x[0], x[1]), pair_sums(x[2], x[3]));
  const v8f high = pair_sums(pair_sums(x[4], x[5]), pair_sums(x[6], x[7]));
  return __builtin_shuffle(low, high, v8i{0, 1, 2, 3, 8, 9, 10, 11}) +
         __builtin_shuffle(low, high, v8i{4, 5, 6, 7, 12, 13, 14, 15});
}

// exp on (-inf, 0], the only range the softmax needs (logit - max). Cephes' expf: reduction by ln 2,
// degree-6 polynomial, ~1 ulp; written on vectors because std::exp stays a scalar libm call.
NA_INLINE v8f exp_nonpositive(v8f x) {
  const v8f lowest = v8f{} - 87.0f, magic = v8f{} + 12582912.0f;  // 1.5 * 2^23: rounds to integer
  x = x < lowest ? lowest : x;
  const v8f shifted = x * 1.44269504088896341f + magic;
  const v8f n = shifted - magic;
  const v8f r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8f p = v8f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const v8i exponent = (reinterpret_cast<const v8i&>(shifted) - reinterpret_cast<const v8i&>(magic) + 127) << 23;
  return p * reinterpret_cast<const v8f&>(exponent);
}

// S: the tensors' storage type; Acc<S>: what sums are taken in (float for bfloat16).
template <typename S>
using Acc = at::opmath_type<S>;

template <typename S, int kD>
constexpr bool kVectorPath =
    (std::is_same_v<S, float> && kD > 0 && kD % 8 == 0) || (std::is_same_v<S, at::BFloat16> && kD > 0 && kD % 16 == 0);

// out[t] = <x, base + offsets[t]> for t < taps (base: a window's first key). `out` has room for
// taps rounded up to 8.
template <typename S, int kD, typename T = Acc<S>>
NA_INLINE void window_dots(const S* x, const S* base, const int64_t* offsets, int64_t taps, int64_t dim,
                           T* out) {
  if constexpr (kVectorPath<S, kD>) {
    constexpr int kChunks = kD / 8;
    v8f xv[kChunks];
    for (int c = 0; c < kChunks; ++c) xv[c] = load_chunk(x, c);
    v8f partial[8];
    for (int64_t first = 0; first < taps; first += 8) {
      for (int64_t t = 0; t < 8; ++t) {
        if (first + t >= taps) {
          partial[t] = v8f{};
          continue;
        }
        const S* row = base + offsets[first + t];
        v8f acc = xv[0] * load_chunk(row, 0);
        for (int c = 1; c < kChunks; ++c) acc += xv[c] * load_chunk(row, c);
        partial[t] = acc;
      }
      store8(out + first, sum_lanes_of_8(partial));
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

// weights[t] = exp(weights[t] - shift) for t < taps; returns their sum. Tail lanes up to 8 are zeroed.
template <typename S, int kD, typename T = Acc<S>>
NA_INLINE T exp_shifted(T* weights, int64_t taps, T shift) {
  if constexpr (kVectorPath<S, kD>) {
    v8f total{};
    const v8i lane{0, 1, 2, 3, 4, 5, 6, 7};
    for (int64_t first = 0; first < taps; first += 8) {
      v8f w = exp_nonpositive(load8(weights + first) - shift);
      w = (lane + static_cast<int32_t>(first)) < static_cast<int32_t>(taps) ? w : v8f{};
      store8(weights + first, w);
      total += w;
    }
    float sum = 0;
    for (int l = 0; l < 8; ++l) sum += total[l];
    return sum;
  } else {
    T sum = 0;
    for (int64_t t = 0; t < taps; ++t) sum += (weights[t] = std::exp(weights[t] - shift));
    return sum;
  }
}

// sum_t a[t] * b[t]. On the vector path 8 taps at a time: a float sum in order (compilers keep it so
// without -ffast-math) is a chain of `taps` dependent adds, ~200 cycles a query at k = 7.
template <typename S, int kD, typename T = Acc<S>>
NA_INLINE T tap_dot(const T* a, const T* b, int64_t taps) {
  T sum = 0;
  int64_t t = 0;
  if constexpr (kVectorPath<S, kD>) {
    v8f lanes{};
    for (; t + 8 <= taps; t += 8) lanes += load8(a + t) * load8(b + t);
    for (int l = 0; l < 8; ++l) sum += lanes[l];
  }
  for (; t < taps; ++t) sum += a[t] * b[t];
  return sum;
}

// out = factor * sum_t weights[t] * (base + offsets[t])[0:dim]: the attention-weighted sum of value
// rows, normalised (`sums`: room for dim values, used by the scalar loops).
template <typename S, int kD, typename T = Acc<S>>
NA_INLINE void weighted_rows(const T* weights, const S* base, const int64_t* offsets, int64_t taps, int64_t dim,
                             T factor, S* out, T* sums) {
  if constexpr (kVectorPath<S, kD>) {
    // Even and odd taps in separate sums when a row is few chunks: 2 * kChunks independent FMA chains
    // instead of kChunks dependent chains of `taps` FMAs each (latency-bound at 4 chains).
    constexpr int kChunks = kD / 8, kSets = kChunks <= 4 ? 2 : 1;
    v8f acc[kSets][kChunks] = {};
    int64_t t = 0;
    for (; t + kSets <= taps; t += kSets) {
      for (int set = 0; set < kSets; ++set) {
        const S* row = base + offsets[t + set];
        for (int c = 0; c < kChunks; ++c) acc[set][c] += weights[t + set] * load_chunk(row, c);
      }
    }
    for (; t < taps; ++t) {
      const S* row = base + offsets[t];
      for (int c = 0; c < kChunks; ++c) acc[0][c] += weights[t] * load_chunk(row, c);
    }
    for (int c = 0; c < kChunks; ++c) {
      for (int set = 1; set < kSets; ++set) acc[0][c] += acc[set][c];
      acc[0][c] *= factor;
    }
    store_row<S, kChunks>(out, acc[0]);
  } else {
    std::fill(sums, sums + dim, T(0));
    for (int64_t t = 0; t < taps; ++t) {
      const S* row = base + offsets[t];
      for (int64_t d = 0; d < dim; ++d) sums[d] += weights[t] * T(row[d]);
    }
    for (int64_t d = 0; d < dim; ++d) out[d] = S(sums[d] * factor);
  }
}

// One tap of query_gradients' vector path: dq += dlogit * k_t; dk_t += dlogit * q; dv_t += p * dO.
template <typename S, int kChunks>
NA_INLINE void gradient_tap(const S* keys, float* dkeys, float* dvalues, int64_t offset, float dlogit, float prob,
                            const v8f* qv, const v8f* gv, v8f* dq) {
  const S* key = keys + offset;
  float* dkey = dkeys + offset;
  float* dvalue = dvalues + offset;
  for (int c = 0; c < kChunks; ++c) {
    dq[c] += dlogit * load_chunk(key, c);
    store8(dkey + 8 * c, load8(dkey + 8 * c) + dlogit * qv[c]);
    store8(dvalue + 8 * c, load8(dvalue + 8 * c) + prob * gv[c]);
  }
}

// One query's gradient step, one pass over its window: dq = sum_t dlogit_t * k_t (written), and
// into the key rows dk_t += dlogit_t * q, dv_t += p_t * dO (dlogits arrive multiplied by the scale).
// Measured: 20% faster than taking dq in a pass of its own; gathering dk/dv per key instead
// (row-band inverse windows, sums in registers, k read-modify-writes per query rather than k*k)
// was no faster and needs more geometry.
template <typename S, int kD, typename T = Acc<S>>
NA_INLINE void query_gradients(const S* qp, const S* gp, const S* keys, T* dkeys, T* dvalues,
                               const int64_t* offsets, const T* probs, const T* dlogits, int64_t taps,
                               int64_t dim, S* dq_out, T* dq) {
  if constexpr (kVectorPath<S, kD>) {
    constexpr int kChunks = kD / 8, kSets = kChunks <= 4 ? 2 : 1;  // dq chains: as weighted_rows
    v8f qv[kChunks], gv[kChunks], dq[kSets][kChunks] = {};
    for (int c = 0; c < kChunks; ++c) {
      qv[c] = load_chunk(qp, c);
      gv[c] = load_chunk(gp, c);
    }
    int64_t t = 0;
    for (; t + kSets <= taps; t += kSets) {
      for (int set = 0; set < kSets; ++set)
        gradient_tap<S, kChunks>(keys, dkeys, dvalues, offsets[t + set], dlogits[t + set], probs[t + set], qv, gv,
                                 dq[set]);
    }
    for (; t < taps; ++t)
      gradient_tap<S, kChunks>(keys, dkeys, dvalues, offsets[t], dlogits[t], probs[t], qv, gv, dq[0]);
    for (int set = 1; set < kSets; ++set)
      for (int c = 0; c < kChunks; ++c) dq[0][c] += dq[set][c];
    store_row<S, kChunks>(dq_out, dq[0]);
  } else {
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
}

struct Geometry {
  const int64_t* row_start;
  const int64_t* col_start;
  const int64_t* row_bias;
  const int64_t* col_bias;
  int64_t kernel;
  int64_t dilation;
  // Every window is the same k x k grid of keys (dilated) from its first key: offsets of tap (a, c)
  // from that key, computed once per call instead of k*k index computations per query.
  const int64_t* tap_offsets;
};

struct Shape {
  int64_t B, H, W, heads, D;
  // Query (b, h, i, j) in (B, heads, H, W) order: where its k*k kept probabilities start, in taps.
  int64_t query_index(int64_t b, int64_t h, int64_t i, int64_t j) const { return ((b * heads + h) * H + i) * W + j; }
};

// Element strides of a (B, H, W, heads, D) tensor whose head dim is contiguous.
struct Layout {
  int64_t b, i, j, h;
  int64_t offset(int64_t batch, int64_t row, int64_t col, int64_t head) const {
    return batch * b + row * i + col * j + head * h;
  }
};
Layout layout_of(const at::Tensor& t) { return Layout{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Scratch for one query: logits (then probabilities), gradients of logits (room for 8-lane tails),
// and one head-dim row of sums for the scalar loops.
template <typename T>
struct Scratch {
  Scratch(int64_t taps, int64_t dim) : logits(taps + 8), second(taps + 8), row(dim) {}
  std::vector<T> logits, second, row;
};

// Offsets of tap (a, c) from a window's first key, a * k + c, in the keys' layout.
std::vector<int64_t> tap_offsets(int64_t kernel, int64_t dilation, Layout kv) {
  std::vector<int64_t> offsets(kernel * kernel);
  for (int64_t a = 0; a < kernel; ++a)
    for (int64_t c = 0; c < kernel; ++c) offsets[a * kernel + c] = (a * kv.i + c * kv.j) * dilation;
  return offsets;
}

// A query's window takes k x k of the (2k-1)^2 relative position biases, starting at (row_bias[i],
// col_bias[j]), each in [0, k): one of k*k placements. Each placement's k*k biases are laid out once,
// contiguous, per head: a (heads, k, k, taps rounded up to 8) table, so that adding them (forward) or
// summing gradients into them (backward) is a vector add per query rather than k*k scalar ones.
constexpr int64_t padded_taps(int64_t taps) { return (taps + 7) / 8 * 8; }

NA_INLINE int64_t bias_placement(Geometry g, int64_t i, int64_t j) {
  return (g.row_bias[i] * g.kernel + g.col_bias[j]) * padded_taps(g.kernel * g.kernel);
}

template <typename T>
std::vector<T> placement_biases(const T* rpb, int64_t heads, int64_t kk) {
  const int64_t span = 2 * kk - 1, stride = padded_taps(kk * kk);
  std::vector<T> table(heads * kk * kk * stride, T(0));
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t first_row = 0; first_row < kk; ++first_row)
      for (int64_t first_col = 0; first_col < kk; ++first_col) {
        T* placement = table.data() + ((h * kk + first_row) * kk + first_col) * stride;
        for (int64_t a = 0; a < kk; ++a)
          for (int64_t c = 0; c < kk; ++c)
            placement[a * kk + c] = rpb[(h * span + first_row + a) * span + first_col + c];
      }
  return table;
}

// The backward's way back: adds one head's (k, k, padded) table of summed logit gradients into its
// (2k-1, 2k-1) RPB-gradient plane.
template <typename T>
void add_placements_to_plane(const T* table, int64_t kk, T* plane) {
  const int64_t span = 2 * kk - 1, stride = padded_taps(kk * kk);
  for (int64_t first_row = 0; first_row < kk; ++first_row)
    for (int64_t first_col = 0; first_col < kk; ++first_col) {
      const T* placement = table + (first_row * kk + first_col) * stride;
      for (int64_t a = 0; a < kk; ++a)
        for (int64_t c = 0; c < kk; ++c) plane[(first_row + a) * span + first_col + c] += placement[a * kk + c];
    }
}

// Offset of query (i, j)'s first key within its (b, h) plane.
NA_INLINE int64_t window_origin(Layout kv, Geometry g, int64_t i, int64_t j) {
  return g.row_start[i] * kv.i + g.col_start[j] * kv.j;
}

// Query (i, j)'s logits = scale * <q, k> + bias over its window from `keys` (`bias`: its placement's
// k*k biases, or null). Returns the largest logit.
template <typename S, int kD, typename T = Acc<S>>
NA_INLINE T window_logits(const S* qp, const S* keys, const T* bias, Geometry g, int64_t dim, T scale,
                          T* logits) {
  const int64_t taps = g.kernel * g.kernel;
  window_dots<S, kD>(qp, keys, g.tap_offsets, taps, dim, logits);
  if constexpr (kVectorPath<S, kD>) {
    const v8i lane{0, 1, 2, 3, 4, 5, 6, 7};
    v8f largest = v8f{} - INFINITY;
    for (int64_t first = 0; first < taps; first += 8) {
      v8f logit = load8(logits + first) * scale;
      if (bias) logit += load8(bias + first);
      store8(logits + first, logit);
      const auto in_window = (lane + static_cast<int32_t>(first)) < static_cast<int32_t>(taps);
      largest = in_window && logit > largest ? logit : largest;
    }
    float maximum = largest[0];
    for (int l = 1; l < 8; ++l) maximum = std::max(maximum, largest[l]);
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
template <typename S, int kD, typename T = Acc<S>>
NA_CLONES void forward_rows(const S* q, const S* k, const S* v, const T* biases, S* out, T* probs, Shape s,
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
            window_logits<S, kD>(q + lq.offset(b, i, j, h), k + window, bias, g, D, scale, weights);
        const T inverse = T(1) / exp_shifted<S, kD>(weights, taps, maximum);
        weighted_rows<S, kD>(weights, v + window, g.tap_offsets, taps, D, inverse, out + lo.offset(b, i, j, h),
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
template <typename S, int kD, typename T = Acc<S>>
NA_INLINE void row_to_storage(const T* sums, S* out, int64_t dim) {
  if constexpr (kVectorPath<S, kD>) {
    constexpr int kChunks = kD / 8;
    v8f chunks[kChunks];
    for (int c = 0; c < kChunks; ++c) chunks[c] = load8(sums + 8 * c);
    store_row<S, kChunks>(out, chunks);
  } else {
    for (int64_t d = 0; d < dim; ++d) out[d] = S(sums[d]);
  }
}

// Rows [begin, end) of dense sums, as row_to_storage.
template <typename S, int kD, typename T = Acc<S>>
NA_CLONES void sums_to_storage(const T* sums, S* out, int64_t dim, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) row_to_storage<S, kD>(sums + r * dim, out + r * dim, dim);
}

// Units u in [begin, end) of the flattened (B * heads): one thread owns a unit's slices of dk and dv
// (and its rpb-gradient plane), so the scatter into keys needs no atomics. dk and dv are sums of k*k
// terms per key, taken in Acc<S>: in `dk`, `dv` (laid out like k, zeroed by the caller), or, given
// `dk_out`, `dv_out` (bfloat16 keys in per-head planes, NAT's case), in one plane of sums per thread,
// zeroed per unit and rounded into dk_out's and dv_out's rows (layout `ldkv`) after it. The plane's
// sums (H*W*D floats each, 400 KB at NAT's 56^2) stay in cache from zeroing to rounding, where
// whole-tensor float buffers took two passes more over memory (zeros_like, then a rounding pass).
template <typename S, int kD, typename T = Acc<S>>
NA_CLONES void backward_units(const S* grad_out, const S* q, const S* k, const S* v, const T* probs,
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
    for (int64_t i = 0; i < s.H; ++i) {
      for (int64_t j = 0; j < s.W; ++j) {
        const S* qp = q + lq.offset(b, i, j, h);
        const S* gp = grad_out + lg.offset(b, i, j, h);
        const T* query_probs = probs + s.query_index(b, h, i, j) * taps;
        const int64_t origin = window_origin(lkv, g, i, j), window = plane + origin;
        T* dlogits = scratch.second.data();
        window_dots<S, kD>(gp, v + window, g.tap_offsets, taps, D, dlogits);  // dP
        // Softmax backward: dlogit_t = p_t (dP_t - sum_u p_u dP_u); the sum is dO . O, taken here from
        // what is at hand instead of from the output (one pass fewer over dO and O).
        const T row_delta = tap_dot<S, kD>(query_probs, dlogits, taps);
        for (int64_t t = 0; t < taps; ++t) dlogits[t] = query_probs[t] * (dlogits[t] - row_delta);
        if (drpb) {
          T* placement = placement_grads.data() + bias_placement(g, i, j);
          for (int64_t t = 0; t < taps; ++t) placement[t] += dlogits[t];
        }
        for (int64_t t = 0; t < taps; ++t) dlogits[t] *= scale;
        query_gradients<S, kD>(qp, gp, k + window, dk_plane + origin, dv_plane + origin, g.tap_offsets,
                               query_probs, dlogits, taps, D, dq + ldq.offset(b, i, j, h), scratch.row.data());
      }
    }
    if (drpb) add_placements_to_plane(placement_grads.data(), kk, drpb + u * span * span);
    if (plane_sums) {
      for (int64_t i = 0; i < s.H; ++i) {
        for (int64_t j = 0; j < s.W; ++j) {
          const int64_t row = i * s.W + j, at = ldkv.offset(b, i, j, h);
          row_to_storage<S, kD>(plane_dk.data() + row * D, dk_out + at, D);
          row_to_storage<S, kD>(plane_dv.data() + row * D, dv_out + at, D);
        }
      }
    }
  }
}

// Head dims of every NAT/DiNAT variant get loops of known length (unrolled, kept in registers);
// any other runs the same code with a runtime length.
template <typename F>
void dispatch_head_dim(int64_t dim, const F& body) {
  switch (dim) {
    case 16: return body(std::integral_constant<int, 16>());
    case 32: return body(std::integral_constant<int, 32>());
    case 64: return body(std::integral_constant<int, 64>());
    default: return body(std::integral_constant<int, 0>());
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& rpb, const at::Tensor& row_start) {
  TORCH_CHECK(q.dim() == 5, "q must be (B, H, W, heads, D)");
  // dk and dv are allocated like k and v and walked with k's tap offsets: k and v must be dense (in
  // any dim order) and share strides.
  TORCH_CHECK(q.stride(4) == 1 && k.stride(4) == 1 && k.strides() == v.strides() &&
                  k.is_non_overlapping_and_dense(),
              "q needs a contiguous head dim; k and v the same dense strides with a contiguous head dim");
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(), "q, k, v shapes differ");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "dtypes differ");
  TORCH_CHECK(!rpb || (rpb->is_contiguous() && rpb->scalar_type() == at::toOpMathType(q.scalar_type())),
              "rpb must be contiguous, float32 for bfloat16 q, else of q's dtype");
  TORCH_CHECK(row_start.scalar_type() == at::kLong, "geometry must be int64");
}

Shape shape_of(const at::Tensor& q) { return Shape{q.size(0), q.size(1), q.size(2), q.size(3), q.size(4)}; }

Geometry geometry_of(const at::Tensor& row_start, const at::Tensor& col_start, const at::Tensor& row_bias,
                     const at::Tensor& col_bias, int64_t kernel_size, int64_t dilation,
                     const std::vector<int64_t>& offsets) {
  for (const at::Tensor* first : {&row_bias, &col_bias}) {  // bias placements index the tables above
    const int64_t* index = first->data_ptr<int64_t>();
    for (int64_t n = 0; n < first->numel(); ++n)
      TORCH_CHECK(index[n] >= 0 && index[n] < kernel_size, "window RPB start out of range [0, kernel_size)");
  }
  return Geometry{row_start.data_ptr<int64_t>(), col_start.data_ptr<int64_t>(), row_bias.data_ptr<int64_t>(),
                  col_bias.data_ptr<int64_t>(), kernel_size, dilation, offsets.data()};
}

std::tuple<at::Tensor, at::Tensor> na2d_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& rpb,
                                                const at::Tensor& row_start, const at::Tensor& col_start,
                                                const at::Tensor& row_bias, const at::Tensor& col_bias,
                                                int64_t kernel_size, int64_t dilation, double scale,
                                                bool save_probs) {
  check_inputs(q, k, v, rpb, row_start);
  const Shape s = shape_of(q);
  const auto offsets = tap_offsets(kernel_size, dilation, layout_of(k));
  const Geometry g = geometry_of(row_start, col_start, row_bias, col_bias, kernel_size, dilation, offsets);
  auto out = at::empty_like(q, at::MemoryFormat::Contiguous);  // what the output projection reads
  const bool heads_per_pixel = k.stride(3) < k.stride(2);
  const int64_t rows = heads_per_pixel ? s.B * s.H : s.B * s.heads * s.H;
  const auto acc_options = q.options().dtype(at::toOpMathType(q.scalar_type()));
  auto probs = save_probs ? at::empty({s.B, s.heads, s.H, s.W, kernel_size * kernel_size}, acc_options)
                          : at::empty({0}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "na2d_forward", [&] {
    using acc_t = Acc<scalar_t>;
    const auto biases = rpb ? placement_biases(rpb->data_ptr<acc_t>(), s.heads, kernel_size)
                            : std::vector<acc_t>();
    const acc_t* bias = rpb ? biases.data() : nullptr;
    acc_t* kept = save_probs ? probs.data_ptr<acc_t>() : nullptr;
    dispatch_head_dim(s.D, [&](auto head_dim) {
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        forward_rows<scalar_t, decltype(head_dim)::value>(
            q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), bias,
            out.data_ptr<scalar_t>(), kept, s, layout_of(q), layout_of(k), layout_of(out), g,
            static_cast<acc_t>(scale), heads_per_pixel, begin, end);
      });
    });
  });
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> na2d_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& probs, const at::Tensor& row_start, const at::Tensor& col_start,
    const at::Tensor& row_bias, const at::Tensor& col_bias, int64_t kernel_size, int64_t dilation,
    double scale, bool rpb_grad) {
  check_inputs(q, k, v, std::nullopt, row_start);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && grad_out.stride(4) == 1,
              "grad_out must have q's shape and a contiguous head dim");
  const Shape s = shape_of(q);
  const int64_t taps = kernel_size * kernel_size, span = 2 * kernel_size - 1;
  const auto acc_options = q.options().dtype(at::toOpMathType(q.scalar_type()));
  TORCH_CHECK(probs.is_contiguous() && probs.numel() == s.B * s.H * s.W * s.heads * taps &&
                  probs.scalar_type() == acc_options.dtype(),
              "probs must be the forward's saved probabilities (forward with save_probs=True)");
  const auto offsets = tap_offsets(kernel_size, dilation, layout_of(k));
  const Geometry g = geometry_of(row_start, col_start, row_bias, col_bias, kernel_size, dilation, offsets);
  // dk, dv are summed in Acc: per plane in each thread's buffer (bfloat16 in per-head planes), into
  // themselves (float, double), or else in float tensors laid out like k and rounded after. dq, and
  // dk, dv when summed per plane, come out (B, H, W, heads, D) contiguous whatever the inputs' layout:
  // in NAT the autograd of unbind stacks them into the qkv projection's gradient, a copy of whole
  // heads*D pixel rows from this layout rather than of D-element rows from per-head planes (NA's
  // backward with that stack 0.82x-1.10x the time, median ~0.95x over NAT's four map sizes, bf16).
  const bool widened = acc_options.dtype() != k.dtype();
  const bool plane_sums = widened && k.stride(2) == s.D && k.stride(1) == s.W * s.D;
  auto dq = at::empty(q.sizes(), q.options());
  auto dk_sums = plane_sums ? at::Tensor() : at::zeros_like(k, acc_options);
  auto dv_sums = plane_sums ? at::Tensor() : at::zeros_like(v, acc_options);
  auto dk = plane_sums ? at::empty(k.sizes(), k.options()) : widened ? at::empty_like(k) : dk_sums;
  auto dv = plane_sums ? at::empty(v.sizes(), v.options()) : widened ? at::empty_like(v) : dv_sums;
  auto drpb_per_unit = rpb_grad ? at::zeros({s.B, s.heads, span, span}, acc_options) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "na2d_backward", [&] {
    using acc_t = Acc<scalar_t>;
    acc_t* drpb = drpb_per_unit.defined() ? drpb_per_unit.data_ptr<acc_t>() : nullptr;
    dispatch_head_dim(s.D, [&](auto head_dim) {
      at::parallel_for(0, s.B * s.heads, 1, [&](int64_t begin, int64_t end) {
        backward_units<scalar_t, decltype(head_dim)::value>(
            grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
            v.data_ptr<scalar_t>(), probs.data_ptr<acc_t>(),
            dq.data_ptr<scalar_t>(), plane_sums ? nullptr : dk_sums.data_ptr<acc_t>(),
            plane_sums ? nullptr : dv_sums.data_ptr<acc_t>(), plane_sums ? dk.data_ptr<scalar_t>() : nullptr,
            plane_sums ? dv.data_ptr<scalar_t>() : nullptr, drpb, s, layout_of(grad_out), layout_of(q),
            layout_of(k), layout_of(dq), layout_of(dk), g, static_cast<acc_t>(scale), begin, end);
      });
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {  // dk, dv are dense: numel / D rows of D
        if (plane_sums) return;
        at::parallel_for(0, k.numel() / s.D, 64, [&](int64_t begin, int64_t end) {
          constexpr int kD = decltype(head_dim)::value;
          sums_to_storage<scalar_t, kD>(dk_sums.data_ptr<acc_t>(), dk.data_ptr<scalar_t>(), s.D, begin, end);
          sums_to_storage<scalar_t, kD>(dv_sums.data_ptr<acc_t>(), dv.data_ptr<scalar_t>(), s.D, begin, end);
        });
      }
    });
  });
  auto drpb = drpb_per_unit.defined() ? drpb_per_unit.sum(0) : at::empty({0}, acc_options);
  return {dq, dk, dv, drpb};
}

}  // namespace

TORCH_LIBRARY(nat_na2d_cpu, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor? rpb, Tensor row_start, Tensor col_start, "
      "Tensor row_bias, Tensor col_bias, int kernel_size, int dilation, float scale, bool save_probs) "
      "-> (Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor probs, "
      "Tensor row_start, Tensor col_start, Tensor row_bias, Tensor col_bias, int kernel_size, "
      "int dilation, float scale, bool rpb_grad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nat_na2d_cpu, CPU, m) {
  m.impl("forward", &na2d_forward);
  m.impl("backward", &na2d_backward);
}
