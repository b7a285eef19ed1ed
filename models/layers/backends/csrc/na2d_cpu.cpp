// Exact-window 2-D neighborhood attention for CPU: k*k logits per query, none wasted.
//
// Tensors are (B, H, W, heads, D) with any strides but a contiguous head dim; k and v (and so dk, dv)
// share theirs, dense in any dim order. NAT's q, k, v reach it in per-head planes, (B, heads, H, W, D)
// memory (cpp_kernel.py copies the packed qkv projection into them, one copy for all three). In
// (B, H, W, heads, D) memory a window's key rows lie a whole map row of all heads apart (14 KB at
// every NAT stage), which lands them on few L1 sets; planes made the backward 1.2x (56^2, 2 heads) to 1.6x (7^2, 16 heads) faster,
// the forward no slower, at the same copy cost. Window geometry comes in from Python (windows.py, the one
// source of truth): key row of tap a is row_start[i] + a * dilation, its RPB row row_bias[i] + a;
// columns likewise. In training the forward keeps each query's k*k probabilities (as Swin keeps its
// attention matrix: B*H*W*heads*k*k floats); the backward takes dP, dq, dk, dv and the RPB gradient
// from them in one pass per query (dk, dv: per block of neighbouring queries, whose windows share
// most keys). Rebuilding them from a saved logsumexp instead (flash-attention
// style, no B*H*W*k*k buffer) costs the backward the logits' dot products and exps again: keeping
// them took the backward 29.2 -> 24.0 ms and the forward 10.4 -> 11.1 ms at 56^2 (docs/benchmarks.md).
//
// Per query the work is: its window's first key (every window is the same k x k grid from there)
// -> k*k dot products -> + its RPB placement -> softmax -> weighted sum.
// The loops (na2d_cpu_loops.h) run on vectors of L float lanes where the head dim is whole vectors
// (float: multiples of L, bfloat16: of 2L; GCC vector extensions); anything else (float64 for the
// tests, odd head dims) runs the same steps with scalar loops.
//
// NAT's common case, 7x7 windows at dilation 1 on maps >= 8 wide, has a second forward where ATen runs
// AVX-512 (forward_query_lanes): 16 neighbouring queries of a map row per vector, key and value rows
// widened once into dim-major float rows, each lane's window keys one permute away; no reductions
// across lanes, and each key row is widened once instead of once per query that sees it (49 times).
// bf16 forward 0.71x-0.82x the one-query loops' time at NAT-T's 56^2-14^2 maps (docs/benchmarks.md).
//
// bfloat16 (autocast's CPU dtype) is storage only: q, k, v, dO are widened to float as they
// are loaded, and every sum (logits, softmax, weighted sums, dq, and dk, dv and the RPB gradient in
// float buffers) is taken in float; the kept probabilities and the RPB are float. Only the output
// and dq, dk, dv are rounded back to the inputs' dtype, once each.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

// The loops are built twice (see run_widest): at L = 8 into entry points cloned for AVX-512, AVX2 and
// baseline x86-64, picked at load time, so a build cached on one machine still runs on an older one;
// and at L = 16 for AVX-512. At NAT's head dim of 32, 16 lanes halve the loads, bf16 unpacks and FMAs
// per key row (bf16: one 64-byte load per row instead of two): NA's forward + backward at NAT-T's
// shapes took 0.89x (float) and 0.81x (bfloat16) the 8-lane build's time (docs/benchmarks.md). The
// 8-lane code stays for AVX2 machines, where a 512-bit vector is two registers with slow lane shuffles.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define NA_AVX512 __attribute__((target("arch=x86-64-v4")))
#define NA_HAS_AVX512_BUILD 1
#else
#define NA_CLONES
#define NA_AVX512
#define NA_HAS_AVX512_BUILD 0
#endif
#define NA_INLINE inline __attribute__((always_inline))
// Lambdas in the loops too: one left out of line is built for baseline x86-64 in the clones (SSE2).
#define NA_INLINE_LAMBDA __attribute__((always_inline))
namespace {

// S: the tensors' storage type; Acc<S>: what sums are taken in (float for bfloat16).
template <typename S>
using Acc = at::opmath_type<S>;

// Whether a head dim of kD takes the L-lane vector code (whole chunks of L floats, or of 2L
// bfloat16); else scalar loops.
template <typename S, int kD, int L>
constexpr bool kVectorPath = (std::is_same_v<S, float> && kD > 0 && kD % L == 0) ||
                             (std::is_same_v<S, at::BFloat16> && kD > 0 && kD % (2 * L) == 0);

// The widest lane count in {16, 8} whose vector path takes head dim kD (16 in the AVX-512 build).
template <typename S, int kD>
constexpr int kWideLanes = kVectorPath<S, kD, 16> ? 16 : 8;

// Scalar buffers a vector loop reads and writes L lanes at a time are padded to this many taps.
constexpr int64_t kMaxLanes = 16;
constexpr int64_t padded_taps(int64_t taps) { return (taps + kMaxLanes - 1) / kMaxLanes * kMaxLanes; }


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

// Offsets of tap (a, c) from a window's first key, a * k + c, in the keys' layout.
std::vector<int64_t> tap_offsets(int64_t kernel, int64_t dilation, Layout kv) {
  std::vector<int64_t> offsets(kernel * kernel);
  for (int64_t a = 0; a < kernel; ++a)
    for (int64_t c = 0; c < kernel; ++c) offsets[a * kernel + c] = (a * kv.i + c * kv.j) * dilation;
  return offsets;
}

// A query's window takes k x k of the (2k-1)^2 relative position biases, starting at (row_bias[i],
// col_bias[j]), each in [0, k): one of k*k placements. Each placement's k*k biases are laid out once,
// contiguous, per head: a (heads, k, k, padded_taps) table, so that adding them (forward) or
// summing gradients into them (backward) is a vector add per query rather than k*k scalar ones.

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

namespace narrow {
#include "na2d_cpu_loops.h"
}  // namespace narrow

#if NA_HAS_AVX512_BUILD
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#endif
namespace wide {
#include "na2d_cpu_loops.h"
}  // namespace wide
#if NA_HAS_AVX512_BUILD
#pragma GCC pop_options
#endif

// Each loop is built twice (na2d_cpu_loops.h): at 8 lanes in the clones, and at the widest lanes that
// take the head dim in the AVX-512 build, run where ATen runs AVX-512 code (`at::get_cpu_capability()`,
// which honours ATEN_CPU_CAPABILITY: `=avx2` runs the clones on an AVX-512 machine).
template <class Loop, typename S, int kD, typename... A>
NA_CLONES void run_narrow(A... args) { Loop::template run<S, kD, 8>(args...); }

template <class Loop, typename S, int kD, typename... A>
NA_AVX512 void run_wide(A... args) { Loop::template run<S, kD, kWideLanes<S, kD>>(args...); }

// Narrower maps leave most of the 16 query lanes empty: the one-query loops run them.
constexpr int64_t kQueryLanesMinWidth = 8;

bool wide_build() {
  static const bool wide = NA_HAS_AVX512_BUILD && at::get_cpu_capability() == "AVX512";
  return wide;
}

// `Narrow` and `Wide`: one loop's two builds, e.g. narrow::ForwardRows and wide::ForwardRows.
template <class Narrow, class Wide, typename S, int kD, typename... A>
void run_widest(A... args) {
  if (wide_build())
    run_wide<Wide, S, kD>(args...);
  else
    run_narrow<Narrow, S, kD>(args...);
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
                  const std::optional<at::Tensor>& rpb, const at::Tensor& row_start, bool backward) {
  TORCH_CHECK(q.dim() == 5, "q must be (B, H, W, heads, D)");
  // k and v are walked with one table of tap offsets: they share strides. The backward allocates dk
  // and dv like them: there they must be dense too (in any dim order); the forward reads views, such
  // as the slices of a packed qkv projection, where they are.
  TORCH_CHECK(q.stride(4) == 1 && k.stride(4) == 1 && k.strides() == v.strides() &&
                  (!backward || k.is_non_overlapping_and_dense()),
              "q needs a contiguous head dim; k and v the same strides with a contiguous head dim (and dense "
              "in the backward)");
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
  // The backward takes queries j, j + d, ... together (query_block_gradients): their windows must
  // start 0 or d columns apart, as windows.py's do.
  const int64_t* col = col_start.data_ptr<int64_t>();
  for (int64_t j = 0; j + dilation < col_start.numel(); ++j) {
    const int64_t step = col[j + dilation] - col[j];
    TORCH_CHECK(step == 0 || step == dilation,
                "window column starts must advance by 0 or dilation in a dilation group");
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
  check_inputs(q, k, v, rpb, row_start, /*backward=*/false);
  const Shape s = shape_of(q);
  const auto offsets = tap_offsets(kernel_size, dilation, layout_of(k));
  const Geometry g = geometry_of(row_start, col_start, row_bias, col_bias, kernel_size, dilation, offsets);
  auto out = at::empty_like(q, at::MemoryFormat::Contiguous);  // what the output projection reads
  const bool heads_per_pixel = k.stride(3) < k.stride(2);
  const int64_t rows = heads_per_pixel ? s.B * s.H : s.B * s.heads * s.H;
  const auto acc_options = q.options().dtype(at::toOpMathType(q.scalar_type()));
  auto probs = save_probs ? at::empty({s.B, s.heads, s.H, s.W, kernel_size * kernel_size}, acc_options)
                          : at::empty({0}, acc_options);
  const bool query_lanes = wide_build() && kernel_size == 7 && dilation == 1 && s.W >= kQueryLanesMinWidth;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "na2d_forward", [&] {
    using acc_t = Acc<scalar_t>;
    if constexpr (std::is_same_v<acc_t, float>) {
      bool done = false;
      if (query_lanes) {
        // RPB rows padded to 16 floats: one vector per row, permuted per lane (the query's column bias).
        const int64_t span = 2 * kernel_size - 1;
        std::vector<float> bias_rows(rpb ? s.heads * span * 16 : 0, 0.0f);
        for (int64_t row = 0; rpb && row < s.heads * span; ++row)
          std::copy_n(rpb->data_ptr<float>() + row * span, span, bias_rows.data() + row * 16);
        float* kept = save_probs ? probs.data_ptr<float>() : nullptr;
        dispatch_head_dim(s.D, [&](auto head_dim) {
          constexpr int kD = decltype(head_dim)::value;
          if constexpr (kVectorPath<scalar_t, kD, 16>) {
            at::parallel_for(0, s.B * s.heads * s.H, 1, [&](int64_t begin, int64_t end) {
              run_wide<wide::ForwardQueryLanes, scalar_t, kD>(
                  q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                  rpb ? bias_rows.data() : nullptr, out.data_ptr<scalar_t>(), kept, s, layout_of(q),
                  layout_of(k), layout_of(out), g, static_cast<float>(scale), begin, end);
            });
            done = true;
          }
        });
      }
      if (done) return;
    }
    const auto biases = rpb ? placement_biases(rpb->data_ptr<acc_t>(), s.heads, kernel_size)
                            : std::vector<acc_t>();
    const acc_t* bias = rpb ? biases.data() : nullptr;
    acc_t* kept = save_probs ? probs.data_ptr<acc_t>() : nullptr;
    dispatch_head_dim(s.D, [&](auto head_dim) {
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        run_widest<narrow::ForwardRows, wide::ForwardRows, scalar_t, decltype(head_dim)::value>(
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
    double scale, bool rpb_grad, bool packed) {
  check_inputs(q, k, v, std::nullopt, row_start, /*backward=*/true);
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
  // dk, dv when summed per plane, come out (B, H, W, heads, D) contiguous whatever the inputs' layout
  // (a later stack of three copies whole heads*D pixel rows rather than D-element plane rows).
  // `packed` (NAT: q, k, v are the dim-3 slices of one (B, H, W, 3, heads, D) qkv projection): that
  // tensor's gradient is returned whole, dq, dk, dv written into its slices, and no stack follows.
  const bool widened = acc_options.dtype() != k.dtype();
  const bool plane_sums = widened && k.stride(2) == s.D && k.stride(1) == s.W * s.D;
  auto grad_qkv = packed ? at::empty({s.B, s.H, s.W, 3, s.heads, s.D}, q.options()) : at::Tensor();
  auto dq = packed ? grad_qkv.select(3, 0) : at::empty(q.sizes(), q.options());
  auto dk_sums = plane_sums ? at::Tensor() : at::zeros_like(k, acc_options);
  auto dv_sums = plane_sums ? at::Tensor() : at::zeros_like(v, acc_options);
  auto dk = plane_sums ? (packed ? grad_qkv.select(3, 1) : at::empty(k.sizes(), k.options()))
                       : widened ? at::empty_like(k) : dk_sums;
  auto dv = plane_sums ? (packed ? grad_qkv.select(3, 2) : at::empty(v.sizes(), v.options()))
                       : widened ? at::empty_like(v) : dv_sums;
  auto drpb_per_unit = rpb_grad ? at::zeros({s.B, s.heads, span, span}, acc_options) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "na2d_backward", [&] {
    using acc_t = Acc<scalar_t>;
    acc_t* drpb = drpb_per_unit.defined() ? drpb_per_unit.data_ptr<acc_t>() : nullptr;
    dispatch_head_dim(s.D, [&](auto head_dim) {
      at::parallel_for(0, s.B * s.heads, 1, [&](int64_t begin, int64_t end) {
        run_widest<narrow::BackwardUnits, wide::BackwardUnits, scalar_t, decltype(head_dim)::value>(
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
          run_widest<narrow::SumsToStorage, wide::SumsToStorage, scalar_t, kD>(dk_sums.data_ptr<acc_t>(), dk.data_ptr<scalar_t>(), s.D, begin, end);
          run_widest<narrow::SumsToStorage, wide::SumsToStorage, scalar_t, kD>(dv_sums.data_ptr<acc_t>(), dv.data_ptr<scalar_t>(), s.D, begin, end);
        });
      }
    });
  });
  auto drpb = drpb_per_unit.defined() ? drpb_per_unit.sum(0) : at::empty({0}, acc_options);
  if (!packed) return {dq, dk, dv, drpb};
  if (!plane_sums) {  // summed in k's layout: copied into the slices
    grad_qkv.select(3, 1).copy_(dk);
    grad_qkv.select(3, 2).copy_(dv);
  }
  return {grad_qkv, at::empty({0}, q.options()), at::empty({0}, q.options()), drpb};
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
      "int dilation, float scale, bool rpb_grad, bool packed) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nat_na2d_cpu, CPU, m) {
  m.impl("forward", &na2d_forward);
  m.impl("backward", &na2d_backward);
}
