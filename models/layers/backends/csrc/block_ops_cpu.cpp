// A NAT block's LayerNorms and drop-path residual adds for bfloat16 autocast on CPU.
//
// Under CPU autocast NAT's token stream is bfloat16 from the stem's convolution on (LayerNorm keeps
// its input's dtype), so every LayerNorm and residual add reads and writes bfloat16. ATen's LayerNorm
// for bfloat16 input with float32 weights takes 0.3-0.7 ns per element forward and 0.7-1.2 backward
// on 2 threads (8-15x a copy of the tensor); the drop-path residual is two passes, a bfloat16 multiply
// by the rounded mask and an add. Here each is one pass over rows widened to float32 in a buffer: sums
// in float32, outputs rounded to bfloat16 once, to nearest even (as torch's casts); the drop-path
// scale is per sample in float32. A block's first residual add and its second LayerNorm are also one
// op: the sum and its normalization in one pass, and in the backward the sum's two gradients (the
// residual's and the LayerNorm's) added in float32 in the same pass, where autograd would add them in
// bfloat16 afterwards. Timings: docs/benchmarks.md, bf16 section.
//
// The loops are plain C++ over blocks of kLanes floats (reductions in kLanes partial sums, which
// GCC vectorizes without reassociating anything), cloned for AVX-512, AVX2 and baseline x86-64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BLOCK_OPS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BLOCK_OPS_CLONES
#endif

namespace {

constexpr int64_t kLanes = 16;

inline float widen(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

// Round to nearest even, NaN kept a NaN (c10::BFloat16's rounding, written branch-free to vectorize).
inline uint16_t narrow(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  const uint32_t rounded = (word + 0x7FFFu + ((word >> 16) & 1u)) >> 16;
  return (word & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

// The kLanes partial sums added in lane order.
__attribute__((always_inline)) inline float lane_sum(const float* lanes) {
  float sum = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// x + scale * branch, rounded once (the residual add with timm's drop-path scale in float32).
inline uint16_t scaled_sum(uint16_t x, uint16_t branch, float scale) {
  return narrow(widen(x) + scale * widen(branch));
}

// Widens n bfloat16 into float; returns their sum (kLanes partial sums).
__attribute__((always_inline)) inline float widen_row(const uint16_t* __restrict__ in, float* __restrict__ out,
                                                      int64_t n) {
  const int64_t whole = n / kLanes * kLanes;
  float lanes[kLanes] = {};
  for (int64_t c = 0; c < whole; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      out[c + l] = widen(in[c + l]);
      lanes[l] += out[c + l];
    }
  float sum = lane_sum(lanes);
  for (int64_t c = whole; c < n; ++c) {
    out[c] = widen(in[c]);
    sum += out[c];
  }
  return sum;
}

// Normalizes a row of C floats whose sum is `sum` into `out` (float32 weight and bias); keeps its mean
// and rstd. The variance is a second pass over the row (in L1): no cancellation.
__attribute__((always_inline)) inline void normalize_row(const float* __restrict__ row, float sum,
                                                         const float* __restrict__ weight,
                                                         const float* __restrict__ bias, uint16_t* __restrict__ out,
                                                         int64_t C, float eps, float* mean_out, float* rstd_out) {
  const int64_t whole = C / kLanes * kLanes;
  const float mean = sum / C;
  float lanes[kLanes] = {};
  for (int64_t c = 0; c < whole; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const float centred = row[c + l] - mean;
      lanes[l] += centred * centred;
    }
  float squares = lane_sum(lanes);
  for (int64_t c = whole; c < C; ++c) squares += (row[c] - mean) * (row[c] - mean);
  const float rstd = 1.f / std::sqrt(squares / C + eps);
  for (int64_t c = 0; c < C; ++c) out[c] = narrow((row[c] - mean) * rstd * weight[c] + bias[c]);
  *mean_out = mean;
  *rstd_out = rstd;
}

// Rows [begin, end) of a (rows, C) bfloat16 matrix normalized; mean and rstd kept for the backward.
// `row`: C floats of scratch.
BLOCK_OPS_CLONES void layer_norm_rows(const uint16_t* __restrict__ x, const float* __restrict__ weight,
                                      const float* __restrict__ bias, uint16_t* __restrict__ y,
                                      float* __restrict__ mean, float* __restrict__ rstd,
                                      float* __restrict__ row, int64_t C, float eps, int64_t begin,
                                      int64_t end) {
  for (int64_t r = begin; r < end; ++r)
    normalize_row(row, widen_row(x + r * C, row, C), weight, bias, y + r * C, C, eps, mean + r, rstd + r);
}

// out = x + scale * branch (rounded), and y = LayerNorm(out) of the rounded values, for rows [begin,
// end); `rows_per_sample` rows share one scale.
BLOCK_OPS_CLONES void residual_layer_norm_rows(const uint16_t* __restrict__ x, const uint16_t* __restrict__ branch,
                                               const float* __restrict__ scale, int64_t rows_per_sample,
                                               const float* __restrict__ weight, const float* __restrict__ bias,
                                               uint16_t* __restrict__ out, uint16_t* __restrict__ y,
                                               float* __restrict__ mean, float* __restrict__ rstd,
                                               float* __restrict__ row, int64_t C, float eps, int64_t begin,
                                               int64_t end) {
  const int64_t whole = C / kLanes * kLanes;
  for (int64_t r = begin; r < end; ++r) {
    const float s = scale[r / rows_per_sample];
    const uint16_t *xr = x + r * C, *br = branch + r * C;
    uint16_t* outr = out + r * C;
    float lanes[kLanes] = {};
    for (int64_t c = 0; c < whole; c += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const uint16_t rounded = scaled_sum(xr[c + l], br[c + l], s);
        outr[c + l] = rounded;
        row[c + l] = widen(rounded);
        lanes[l] += row[c + l];
      }
    float sum = lane_sum(lanes);
    for (int64_t c = whole; c < C; ++c) {
      const uint16_t rounded = scaled_sum(xr[c], br[c], s);
      outr[c] = rounded;
      row[c] = widen(rounded);
      sum += row[c];
    }
    normalize_row(row, sum, weight, bias, y + r * C, C, eps, mean + r, rstd + r);
  }
}

// One row's LayerNorm backward: `x_hat` holds the widened x (normalized in place), `dy` the widened
// output gradient (replaced by dx, float); the row's weight and bias gradients are added into dweight,
// dbias (this thread's partial sums). g = dy * w, x^ = (x - mean) * rstd: dx = rstd (g - mean(g) - x^
// mean(g x^)).
__attribute__((always_inline)) inline void layer_norm_backward_row(float* __restrict__ x_hat, float* __restrict__ dy,
                                                                   float m, float s, const float* __restrict__ weight,
                                                                   float* __restrict__ dweight,
                                                                   float* __restrict__ dbias, int64_t C) {
  const int64_t whole = C / kLanes * kLanes;
  float g_lanes[kLanes] = {}, gx_lanes[kLanes] = {};
  for (int64_t c = 0; c < whole; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const float d = dy[c + l], xh = (x_hat[c + l] - m) * s, g = d * weight[c + l];
      x_hat[c + l] = xh;
      g_lanes[l] += g;
      gx_lanes[l] += g * xh;
      dweight[c + l] += d * xh;
      dbias[c + l] += d;
    }
  float g_sum = lane_sum(g_lanes), gx_sum = lane_sum(gx_lanes);
  for (int64_t c = whole; c < C; ++c) {
    const float d = dy[c], xh = (x_hat[c] - m) * s, g = d * weight[c];
    x_hat[c] = xh;
    g_sum += g;
    gx_sum += g * xh;
    dweight[c] += d * xh;
    dbias[c] += d;
  }
  const float g_mean = g_sum / C, gx_mean = gx_sum / C;
  for (int64_t c = 0; c < C; ++c) dy[c] = s * (dy[c] * weight[c] - g_mean - x_hat[c] * gx_mean);
}

// dx of rows [begin, end), rounded; `x_hat`, `dy`: C floats of scratch each.
BLOCK_OPS_CLONES void layer_norm_backward_rows(const uint16_t* __restrict__ grad, const uint16_t* __restrict__ x,
                                               const float* __restrict__ mean, const float* __restrict__ rstd,
                                               const float* __restrict__ weight, uint16_t* __restrict__ dx,
                                               float* __restrict__ dweight, float* __restrict__ dbias,
                                               float* __restrict__ x_hat, float* __restrict__ dy, int64_t C,
                                               int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    widen_row(x + r * C, x_hat, C);
    widen_row(grad + r * C, dy, C);
    layer_norm_backward_row(x_hat, dy, mean[r], rstd[r], weight, dweight, dbias, C);
    uint16_t* dxr = dx + r * C;
    for (int64_t c = 0; c < C; ++c) dxr[c] = narrow(dy[c]);
  }
}

// The backward of residual_layer_norm_rows: out's gradient is grad_out plus the LayerNorm's dx (summed
// in float32), rounded once as x's gradient and once scaled as branch's.
BLOCK_OPS_CLONES void residual_layer_norm_backward_rows(
    const uint16_t* __restrict__ grad_out, const uint16_t* __restrict__ grad_y, const uint16_t* __restrict__ out,
    const float* __restrict__ mean, const float* __restrict__ rstd, const float* __restrict__ weight,
    const float* __restrict__ scale, int64_t rows_per_sample, uint16_t* __restrict__ dx,
    uint16_t* __restrict__ dbranch, float* __restrict__ dweight, float* __restrict__ dbias, float* __restrict__ x_hat,
    float* __restrict__ dy, int64_t C, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    widen_row(out + r * C, x_hat, C);
    widen_row(grad_y + r * C, dy, C);
    layer_norm_backward_row(x_hat, dy, mean[r], rstd[r], weight, dweight, dbias, C);
    const float s = scale[r / rows_per_sample];
    const uint16_t* gr = grad_out + r * C;
    uint16_t *dxr = dx + r * C, *dbr = dbranch + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const float total = widen(gr[c]) + dy[c];
      dxr[c] = narrow(total);
      dbr[c] = narrow(s * total);
    }
  }
}

// out = x + scale * branch over n elements (one sample's span).
BLOCK_OPS_CLONES void residual_add_span(const uint16_t* __restrict__ x, const uint16_t* __restrict__ branch,
                                        float scale, uint16_t* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = scaled_sum(x[i], branch[i], scale);
}

BLOCK_OPS_CLONES void scale_span(const uint16_t* __restrict__ grad, float scale, uint16_t* __restrict__ out,
                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = narrow(scale * widen(grad[i]));
}

const uint16_t* bf16_data(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* bf16_data(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// Rows per parallel chunk: ~16K elements, where a thread's start-up is paid back.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

at::Tensor bf16_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16, name, " must be a bfloat16 CPU tensor");
  return t.contiguous();
}

// The LayerNorm backwards' weight and bias gradients: rows split over threads, each thread's sums in
// its own pair of float32 rows (f(begin, end, sums: 2 * C, scratch: 2 * C)), added up at the end.
template <typename F>
std::pair<at::Tensor, at::Tensor> per_thread_sums(int64_t rows, int64_t C, const at::TensorOptions& options,
                                                  const F& f) {
  auto partial = at::zeros({at::get_num_threads(), 2, C}, options);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * C);
    f(begin, end, partial.data_ptr<float>() + at::get_thread_num() * 2 * C, scratch.data());
  });
  auto totals = partial.sum(0);
  return {totals.select(0, 0), totals.select(0, 1)};
}

// One float32 scale per sample of `like` (B, ...), contiguous.
at::Tensor checked_scale(const at::Tensor& like, const at::Tensor& scale) {
  TORCH_CHECK(like.dim() > 0 && scale.scalar_type() == at::kFloat && scale.numel() == like.size(0),
              "scale must hold one float32 per sample");
  return scale.contiguous();
}

// A LayerNorm's weight and bias: float32, C each, contiguous.
std::pair<at::Tensor, at::Tensor> checked_affine(const at::Tensor& weight, const at::Tensor& bias, int64_t C) {
  TORCH_CHECK(weight.numel() == C && bias.numel() == C && weight.scalar_type() == at::kFloat &&
                  bias.scalar_type() == at::kFloat,
              "weight and bias must be float32 of x's last size");
  return {weight.contiguous(), bias.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bf16(const at::Tensor& input, const at::Tensor& weight,
                                                               const at::Tensor& bias, double eps) {
  auto x = bf16_contiguous(input, "x");
  const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0;
  const auto affine = checked_affine(weight, bias, C);
  const at::Tensor &w = affine.first, &b = affine.second;
  auto y = at::empty_like(x);
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<float> row(C);
    layer_norm_rows(bf16_data(x), w.data_ptr<float>(), b.data_ptr<float>(), bf16_data(y), mean.data_ptr<float>(),
                    rstd.data_ptr<float>(), row.data(), C, static_cast<float>(eps), begin, end);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bf16_backward(const at::Tensor& grad, const at::Tensor& input,
                                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                                        const at::Tensor& weight) {
  auto x = bf16_contiguous(input, "x"), dy = bf16_contiguous(grad, "grad");
  const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0;
  auto w = weight.contiguous();
  auto dx = at::empty_like(x);
  auto [dweight, dbias] = per_thread_sums(rows, C, mean.options(), [&](int64_t begin, int64_t end, float* sums, float* scratch) {
    layer_norm_backward_rows(bf16_data(dy), bf16_data(x), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                             w.data_ptr<float>(), bf16_data(dx), sums, sums + C, scratch, scratch + C, C, begin, end);
  });
  return {dx, dweight, dbias};
}

// (x + scale[b] * branch, LayerNorm of it, mean, rstd): the residual add and the LayerNorm that
// follows it in one pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layer_norm_bf16(
    const at::Tensor& input, const at::Tensor& branch_input, const at::Tensor& scale_input, const at::Tensor& weight,
    const at::Tensor& bias, double eps) {
  auto x = bf16_contiguous(input, "x"), branch = bf16_contiguous(branch_input, "branch");
  TORCH_CHECK(x.sizes() == branch.sizes(), "x and branch must have one shape");
  const int64_t C = x.size(-1), rows = C ? x.numel() / C : 0;
  auto scale = checked_scale(x, scale_input);
  const auto affine = checked_affine(weight, bias, C);
  const at::Tensor &w = affine.first, &b = affine.second;
  auto out = at::empty_like(x), y = at::empty_like(x);
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  const int64_t rows_per_sample = x.size(0) ? std::max<int64_t>(rows / x.size(0), 1) : 1;  // 0 rows: unused
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<float> row(C);
    residual_layer_norm_rows(bf16_data(x), bf16_data(branch), scale.data_ptr<float>(), rows_per_sample,
                             w.data_ptr<float>(), b.data_ptr<float>(), bf16_data(out), bf16_data(y),
                             mean.data_ptr<float>(), rstd.data_ptr<float>(), row.data(), C, static_cast<float>(eps),
                             begin, end);
  });
  return {out, y, mean, rstd};
}

// Gradients of x, branch, weight, bias from those of the residual's output and of its LayerNorm.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_layer_norm_bf16_backward(
    const at::Tensor& grad_out_input, const at::Tensor& grad_y_input, const at::Tensor& out_input,
    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight, const at::Tensor& scale_input) {
  auto grad_out = bf16_contiguous(grad_out_input, "grad_out"), grad_y = bf16_contiguous(grad_y_input, "grad_y");
  auto out = bf16_contiguous(out_input, "out");
  const int64_t C = out.size(-1), rows = C ? out.numel() / C : 0;
  auto scale = checked_scale(out, scale_input);
  auto w = weight.contiguous();
  auto dx = at::empty_like(out), dbranch = at::empty_like(out);
  const int64_t rows_per_sample = out.size(0) ? std::max<int64_t>(rows / out.size(0), 1) : 1;
  auto [dweight, dbias] = per_thread_sums(rows, C, mean.options(), [&](int64_t begin, int64_t end, float* sums, float* scratch) {
    residual_layer_norm_backward_rows(bf16_data(grad_out), bf16_data(grad_y), bf16_data(out), mean.data_ptr<float>(),
                                      rstd.data_ptr<float>(), w.data_ptr<float>(), scale.data_ptr<float>(),
                                      rows_per_sample, bf16_data(dx), bf16_data(dbranch), sums, sums + C, scratch,
                                      scratch + C, C, begin, end);
  });
  return {dx, dbranch, dweight, dbias};
}

constexpr int64_t kElementGrain = 32768;

// A new bfloat16 tensor shaped as `like` (B, ...), filled span by span: f(offset, length, scale of
// the span's sample, out + offset); spans never cross a sample boundary. scale: one float32 per sample.
template <typename F>
at::Tensor map_per_sample(const at::Tensor& like, const at::Tensor& scale, const F& f) {
  auto s = checked_scale(like, scale);
  auto out = at::empty_like(like);
  const float* sample_scale = s.data_ptr<float>();
  uint16_t* out_data = bf16_data(out);
  const int64_t per_sample = like.numel() / std::max<int64_t>(like.size(0), 1);
  at::parallel_for(0, like.numel(), kElementGrain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t sample = begin / per_sample, stop = std::min(end, (sample + 1) * per_sample);
      f(begin, stop - begin, sample_scale[sample], out_data + begin);
      begin = stop;
    }
  });
  return out;
}

// x + scale[b] * branch (timm's DropPath: scale 0 or 1/keep_prob).
at::Tensor residual_add_bf16(const at::Tensor& input, const at::Tensor& branch_input, const at::Tensor& scale) {
  auto x = bf16_contiguous(input, "x"), branch = bf16_contiguous(branch_input, "branch");
  TORCH_CHECK(x.sizes() == branch.sizes(), "x and branch must have one shape");
  return map_per_sample(x, scale, [&](int64_t offset, int64_t n, float sample_scale, uint16_t* out) {
    residual_add_span(bf16_data(x) + offset, bf16_data(branch) + offset, sample_scale, out, n);
  });
}

// The branch's gradient: scale[b] * grad, rounded once.
at::Tensor scale_samples_bf16(const at::Tensor& grad_input, const at::Tensor& scale) {
  auto grad = bf16_contiguous(grad_input, "grad");
  return map_per_sample(grad, scale, [&](int64_t offset, int64_t n, float sample_scale, uint16_t* out) {
    scale_span(bf16_data(grad) + offset, sample_scale, out, n);
  });
}

}  // namespace

TORCH_LIBRARY(nat_block_cpu, m) {
  m.def("layer_norm_bf16(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_norm_bf16_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor weight) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("residual_add_bf16(Tensor x, Tensor branch, Tensor scale) -> Tensor");
  m.def(
      "residual_layer_norm_bf16(Tensor x, Tensor branch, Tensor scale, Tensor weight, Tensor bias, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "residual_layer_norm_bf16_backward(Tensor grad_out, Tensor grad_y, Tensor out, Tensor mean, Tensor rstd, "
      "Tensor weight, Tensor scale) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("scale_samples_bf16(Tensor grad, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(nat_block_cpu, CPU, m) {
  m.impl("layer_norm_bf16", &layer_norm_bf16);
  m.impl("layer_norm_bf16_backward", &layer_norm_bf16_backward);
  m.impl("residual_add_bf16", &residual_add_bf16);
  m.impl("residual_layer_norm_bf16", &residual_layer_norm_bf16);
  m.impl("residual_layer_norm_bf16_backward", &residual_layer_norm_bf16_backward);
  m.impl("scale_samples_bf16", &scale_samples_bf16);
}
