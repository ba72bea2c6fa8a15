// Fused InfoNCE, CPU: forward statistics and backward gradients over (BLOCK_N x BLOCK_M) logit tiles, never the
// N x M logits. Semantics: kernels/ville_kernels/infonce_ref.py (`infonce_ref`); organisation mirrors
// kernels/ville_kernels/infonce.py: the positive pair of each row is handled in closed form (x_pos,
// z = lse_negatives - x_pos, loss = softplus(z)), the tiles only see the negatives.
//
// Shape letters: N rows (q), M columns (p), D features, s = logit_scale. Parallel layout: row blocks are walked in
// order; inside one, the column blocks are split over the threads. A thread then owns its columns' statistics, its
// rows of dp and its column sums outright, and only the per-row partials (BLOCK_N values, or a BLOCK_N x D slab of
// dq in the backward) are merged after each row block: no atomics, deterministic for a given thread count, and
// O(threads * BLOCK_N * (BLOCK_M + D)) scratch. The tile GEMMs run through at::mm_out (MKL/oneDNN, single-threaded
// inside at::parallel_for); everything elementwise is fused into one pass over the tile while it is in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

namespace ville {
namespace {

constexpr int64_t BLOCK_N = 256;
constexpr int64_t BLOCK_M = 256;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Turn unscaled dots t into scaled logits of the negatives, -inf elsewhere. A pair is a negative when it is not the
// row's positive and its groups differ; without groups the callers pass row ids 0 and column ids 1 (never equal).
VILLE_CLONES void mask_scale_tile(float* x, int64_t bn, int64_t bm, float s, const int64_t* labels, int64_t c0,
                                  const int64_t* rg, const int64_t* cg) {
  for (int64_t i = 0; i < bn; ++i) {
    float* xi = x + i * bm;
    const int64_t lab = labels[i] - c0, g = rg[i];
#pragma omp simd
    for (int64_t j = 0; j < bm; ++j) {
      const bool negative = (j != lab) & (cg[j] != g);
      xi[j] = negative ? s * xi[j] : NEG_INF;
    }
  }
}

// Online (max, sum of exp) of each tile row into (row_m, row_l) and, when symmetric, of each tile column into
// (col_m, col_l). `tmp` holds bm floats.
VILLE_CLONES void fwd_tile_stats(const float* x, int64_t bn, int64_t bm, float* row_m, float* row_l, bool symmetric,
                                 float* col_m, float* col_l, float* tmp) {
  for (int64_t i = 0; i < bn; ++i) {
    const float* xi = x + i * bm;
    float m = NEG_INF;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < bm; ++j) m = std::max(m, xi[j]);
    const float m_new = std::max(row_m[i], m);
    if (m_new == NEG_INF) continue;  // no negative in this row so far
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < bm; ++j) sum += fexp(xi[j] - m_new);
    row_l[i] = row_l[i] * fexp(row_m[i] - m_new) + sum;
    row_m[i] = m_new;
  }
  if (!symmetric) return;
  for (int64_t j = 0; j < bm; ++j) tmp[j] = NEG_INF;
  for (int64_t i = 0; i < bn; ++i) {
    const float* xi = x + i * bm;
#pragma omp simd
    for (int64_t j = 0; j < bm; ++j) tmp[j] = std::max(tmp[j], xi[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < bm; ++j) {
    const float m_new = std::max(col_m[j], tmp[j]);
    const float safe = m_new == NEG_INF ? 0.0f : m_new;  // an all-masked column: keep its sum at 0, not NaN
    col_l[j] *= fexp(col_m[j] - safe);
    col_m[j] = m_new;
    tmp[j] = safe;
  }
  for (int64_t i = 0; i < bn; ++i) {
    const float* xi = x + i * bm;
#pragma omp simd
    for (int64_t j = 0; j < bm; ++j) col_l[j] += fexp(xi[j] - tmp[j]);
  }
}

// Backward tile: t (unscaled dots) is overwritten with G = w_row * softmax_row + w_col * softmax_col on the
// negatives (0 elsewhere); adds each row's / column's negative softmax mass and returns sum(G * t) (for ds).
VILLE_CLONES double bwd_tile(float* t, int64_t bn, int64_t bm, float s, const int64_t* labels, int64_t c0,
                             const int64_t* rg, const int64_t* cg, const float* lse_row, const float* lse_col,
                             float w_row, float w_col, bool symmetric, float* neg_row, float* neg_col) {
  double ds = 0.0;
  for (int64_t i = 0; i < bn; ++i) {
    float* ti = t + i * bm;
    const int64_t lab = labels[i] - c0, g = rg[i];
    const float lr = lse_row[i];
    float row_mass = 0.0f, ds_row = 0.0f;
    if (symmetric) {
#pragma omp simd reduction(+ : row_mass, ds_row)
      for (int64_t j = 0; j < bm; ++j) {
        const bool negative = (j != lab) & (cg[j] != g);
        const float x = negative ? s * ti[j] : NEG_INF;
        const float a = fexp(x - lr);
        const float b = fexp(x - lse_col[j]);  // lse_col = +inf (unlabelled column) gives 0
        const float grad = w_row * a + w_col * b;
        row_mass += a;
        neg_col[j] += b;
        ds_row += grad * ti[j];
        ti[j] = grad;
      }
    } else {
#pragma omp simd reduction(+ : row_mass, ds_row)
      for (int64_t j = 0; j < bm; ++j) {
        const bool negative = (j != lab) & (cg[j] != g);
        const float a = fexp((negative ? s * ti[j] : NEG_INF) - lr);
        row_mass += a;
        ds_row += w_row * a * ti[j];
        ti[j] = w_row * a;
      }
    }
    neg_row[i] += row_mass;
    ds += ds_row;
  }
  return ds;
}

struct Inputs {
  at::Tensor q32, p32, labels, rg, cg;
  int64_t N, M, D;
  float s;
};

Inputs prepare(const at::Tensor& q, const at::Tensor& p, const at::Tensor& logit_scale, const at::Tensor& labels,
               const c10::optional<at::Tensor>& row_groups, const c10::optional<at::Tensor>& col_groups,
               bool symmetric) {
  TORCH_CHECK(q.dim() == 2 && p.dim() == 2 && q.size(1) == p.size(1),
              "infonce: expected q (N, D) and p (M, D), got ", q.sizes(), " and ", p.sizes());
  TORCH_CHECK(q.scalar_type() == p.scalar_type(), "infonce: q and p must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "infonce: expected float32 / bfloat16 / float16, got ", q.scalar_type());
  TORCH_CHECK(logit_scale.dim() == 0 && logit_scale.is_floating_point(), "infonce: logit_scale must be 0-dim float");
  Inputs in;
  in.N = q.size(0);
  in.M = p.size(0);
  in.D = q.size(1);
  TORCH_CHECK(in.N >= 1 && in.M >= 1 && in.D >= 1, "infonce: expected N, M, D >= 1");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == in.N && !labels.is_floating_point(),
              "infonce: expected integer labels of shape (N,) = (", in.N, ",)");
  in.labels = labels.to(at::kLong).contiguous();
  const int64_t* lab = in.labels.data_ptr<int64_t>();
  std::vector<char> seen(symmetric ? in.M : 0, 0);
  for (int64_t i = 0; i < in.N; ++i) {
    TORCH_CHECK(lab[i] >= 0 && lab[i] < in.M, "infonce: expected labels in [0, M) = [0, ", in.M, "), got ", lab[i]);
    if (symmetric) {
      TORCH_CHECK(!seen[lab[i]], "infonce: expected distinct labels in symmetric mode, got duplicate ", lab[i]);
      seen[lab[i]] = 1;
    }
  }
  TORCH_CHECK(row_groups.has_value() == col_groups.has_value(), "infonce: give both row_groups and col_groups");
  if (row_groups.has_value()) {
    TORCH_CHECK(row_groups->dim() == 1 && row_groups->size(0) == in.N && col_groups->dim() == 1 &&
                    col_groups->size(0) == in.M,
                "infonce: expected row_groups (N,) and col_groups (M,)");
    in.rg = row_groups->to(at::kLong).contiguous();
    in.cg = col_groups->to(at::kLong).contiguous();
  } else {
    in.rg = at::zeros({in.N}, at::kLong);
    in.cg = at::ones({in.M}, at::kLong);
  }
  // fp32 copies of half-precision inputs: the tile GEMMs accumulate and *output* fp32 (a bf16 GEMM would round the
  // logits to bf16), exactly like the chunked torch path.
  // detach: grad mode is thread-local, so the NoGradGuard of the caller does not reach at::parallel_for's workers,
  // and their at::mm_out would refuse inputs that require grad.
  in.q32 = q.detach().to(at::kFloat).contiguous();
  in.p32 = p.detach().to(at::kFloat).contiguous();
  in.s = logit_scale.item<float>();
  return in;
}

// Returns (lse over each row's negatives (N,), lse over each column's negatives (M,) or an empty tensor).
std::tuple<at::Tensor, at::Tensor> negative_lses(const Inputs& in, bool symmetric) {
  const int64_t N = in.N, M = in.M;
  const int threads = at::get_num_threads();
  at::Tensor lse_row = at::empty({N}, at::kFloat);
  at::Tensor col_m = at::full({symmetric ? M : 0}, NEG_INF, at::kFloat);
  at::Tensor col_l = at::zeros({symmetric ? M : 0}, at::kFloat);
  std::vector<float> tiles(threads * BLOCK_N * BLOCK_M), tmp(threads * BLOCK_M);
  std::vector<float> row_m(threads * BLOCK_N), row_l(threads * BLOCK_N);
  const int64_t* labels = in.labels.data_ptr<int64_t>();
  const int64_t* rg = in.rg.data_ptr<int64_t>();
  const int64_t* cg = in.cg.data_ptr<int64_t>();
  float* cm = col_m.data_ptr<float>();
  float* cl = col_l.data_ptr<float>();
  const int64_t col_blocks = (M + BLOCK_M - 1) / BLOCK_M;
  for (int64_t r0 = 0; r0 < N; r0 += BLOCK_N) {
    const int64_t bn = std::min(BLOCK_N, N - r0);
    const at::Tensor qb = in.q32.narrow(0, r0, bn);
    std::fill(row_m.begin(), row_m.end(), NEG_INF);
    std::fill(row_l.begin(), row_l.end(), 0.0f);
    at::parallel_for(0, col_blocks, 1, [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      float* tile = tiles.data() + tid * BLOCK_N * BLOCK_M;
      for (int64_t cb = b0; cb < b1; ++cb) {
        const int64_t c0 = cb * BLOCK_M, bm = std::min(BLOCK_M, M - c0);
        at::Tensor x = at::from_blob(tile, {bn, bm}, at::kFloat);
        at::mm_out(x, qb, in.p32.narrow(0, c0, bm).t());
        mask_scale_tile(tile, bn, bm, in.s, labels + r0, c0, rg + r0, cg + c0);
        fwd_tile_stats(tile, bn, bm, row_m.data() + tid * BLOCK_N, row_l.data() + tid * BLOCK_N, symmetric,
                       symmetric ? cm + c0 : nullptr, symmetric ? cl + c0 : nullptr, tmp.data() + tid * BLOCK_M);
      }
    });
    float* out = lse_row.data_ptr<float>() + r0;
    for (int64_t i = 0; i < bn; ++i) {
      float top = NEG_INF;
      for (int t = 0; t < threads; ++t) top = std::max(top, row_m[t * BLOCK_N + i]);
      if (top == NEG_INF) {
        out[i] = NEG_INF;  // no negative at all: softplus(-inf) = 0 loss
        continue;
      }
      float sum = 0.0f;
      for (int t = 0; t < threads; ++t) sum += row_l[t * BLOCK_N + i] * std::exp(row_m[t * BLOCK_N + i] - top);
      out[i] = top + std::log(sum);
    }
  }
  at::Tensor lse_col = symmetric ? col_m + col_l.log() : at::empty({0}, at::kFloat);
  return {lse_row, lse_col};
}

// Unscaled q_i . p_labels[i] in fp32, (N,).
at::Tensor positive_dots(const Inputs& in) {
  return (in.q32 * in.p32.index_select(0, in.labels)).sum(1);
}

}  // namespace

// Returns (loss (), x_pos (N,), z_row (N,), z_col (N,) or (0,)); see InfoNCEFunction in
// kernels/ville_kernels/infonce.py.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cpu(
    const at::Tensor& q, const at::Tensor& p, const at::Tensor& logit_scale, const at::Tensor& labels,
    const c10::optional<at::Tensor>& row_groups, const c10::optional<at::Tensor>& col_groups, bool symmetric) {
  at::NoGradGuard no_grad;
  const Inputs in = prepare(q, p, logit_scale, labels, row_groups, col_groups, symmetric);
  auto [lse_row, lse_col] = negative_lses(in, symmetric);
  at::Tensor x_pos = positive_dots(in) * in.s;
  at::Tensor z_row = lse_row - x_pos;
  at::Tensor loss = at::softplus(z_row).mean();
  at::Tensor z_col = at::empty({0}, at::kFloat);
  if (symmetric) {
    z_col = lse_col.index_select(0, in.labels) - x_pos;
    loss = 0.5 * (loss + at::softplus(z_col).mean());
  }
  return {loss, x_pos, z_row, z_col};
}

// Returns (dq (N, D) in q's dtype, dp (M, D) in p's dtype, d logit_scale () in its dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& p, const at::Tensor& logit_scale,
    const at::Tensor& labels, const c10::optional<at::Tensor>& row_groups,
    const c10::optional<at::Tensor>& col_groups, const at::Tensor& x_pos, const at::Tensor& z_row,
    const at::Tensor& z_col, bool symmetric) {
  at::NoGradGuard no_grad;
  const Inputs in = prepare(q, p, logit_scale, labels, row_groups, col_groups, symmetric);
  const int64_t N = in.N, M = in.M, D = in.D;
  const float w_row = symmetric ? 0.5f / N : 1.0f / N;
  const float w_col = symmetric ? 0.5f / N : 0.0f;
  const float g = grad.item<float>();
  const at::Tensor x_pos32 = x_pos.to(at::kFloat);
  const at::Tensor lse_row = (x_pos32 + at::softplus(z_row.to(at::kFloat))).contiguous();
  at::Tensor lse_col = at::full({M}, std::numeric_limits<float>::infinity(), at::kFloat);
  if (symmetric) lse_col.index_copy_(0, in.labels, x_pos32 + at::softplus(z_col.to(at::kFloat)));

  const int threads = at::get_num_threads();
  at::Tensor dq = at::empty({N, D}, at::kFloat);
  at::Tensor dp = at::zeros({M, D}, at::kFloat);
  at::Tensor neg_row = at::empty({N}, at::kFloat);
  at::Tensor neg_col = at::zeros({M}, at::kFloat);
  std::vector<float> tiles(threads * BLOCK_N * BLOCK_M), dq_part(threads * BLOCK_N * D);
  std::vector<float> mass_part(threads * BLOCK_N);
  std::vector<double> ds_part(threads, 0.0);
  const int64_t* labels_p = in.labels.data_ptr<int64_t>();
  const int64_t* rg = in.rg.data_ptr<int64_t>();
  const int64_t* cg = in.cg.data_ptr<int64_t>();
  const float* lr = lse_row.data_ptr<float>();
  const float* lc = lse_col.data_ptr<float>();
  float* nc = neg_col.data_ptr<float>();
  const int64_t col_blocks = (M + BLOCK_M - 1) / BLOCK_M;
  for (int64_t r0 = 0; r0 < N; r0 += BLOCK_N) {
    const int64_t bn = std::min(BLOCK_N, N - r0);
    const at::Tensor qb = in.q32.narrow(0, r0, bn);
    std::fill(dq_part.begin(), dq_part.end(), 0.0f);
    std::fill(mass_part.begin(), mass_part.end(), 0.0f);
    at::parallel_for(0, col_blocks, 1, [&](int64_t b0, int64_t b1) {
      const int tid = at::get_thread_num();
      float* tile = tiles.data() + tid * BLOCK_N * BLOCK_M;
      at::Tensor dqp = at::from_blob(dq_part.data() + tid * BLOCK_N * D, {bn, D}, at::kFloat);
      for (int64_t cb = b0; cb < b1; ++cb) {
        const int64_t c0 = cb * BLOCK_M, bm = std::min(BLOCK_M, M - c0);
        const at::Tensor pb = in.p32.narrow(0, c0, bm);
        at::Tensor t = at::from_blob(tile, {bn, bm}, at::kFloat);
        at::mm_out(t, qb, pb.t());
        ds_part[tid] += bwd_tile(tile, bn, bm, in.s, labels_p + r0, c0, rg + r0, cg + c0, lr + r0, lc + c0, w_row,
                                 w_col, symmetric, mass_part.data() + tid * BLOCK_N, nc + c0);
        dqp.addmm_(t, pb);
        dp.narrow(0, c0, bm).addmm_(t.t(), qb);
      }
    });
    float* dq_rows = dq.data_ptr<float>() + r0 * D;
    float* mass = neg_row.data_ptr<float>() + r0;
    for (int64_t i = 0; i < bn; ++i) {
      float m = 0.0f;
      for (int t = 0; t < threads; ++t) m += mass_part[t * BLOCK_N + i];
      mass[i] = m;
    }
    for (int64_t k = 0; k < bn * D; ++k) {
      float v = 0.0f;
      for (int t = 0; t < threads; ++t) v += dq_part[t * BLOCK_N * D + k];
      dq_rows[k] = v;
    }
  }
  double ds_neg = 0.0;
  for (double v : ds_part) ds_neg += v;
  const float gs = g * in.s;
  dq.mul_(gs);
  dp.mul_(gs);
  // The positive pair (i, labels[i]) has G = softmax - 1 = -(softmax mass of the negatives): summed from the very
  // probabilities the negatives used, so every row and column of G sums to zero (see kernels/ville_kernels/infonce.py).
  at::Tensor share = w_row * neg_row;
  if (symmetric) share = share + w_col * neg_col.index_select(0, in.labels);
  const at::Tensor g_pos = share * (-g);  // (N,)
  const at::Tensor p_pos = in.p32.index_select(0, in.labels);
  const at::Tensor scaled = (g_pos * in.s).unsqueeze(1);
  dq.add_(p_pos * scaled);
  dp.index_put_({in.labels}, in.q32 * scaled, /*accumulate=*/true);
  at::Tensor ds = (g_pos * (in.q32 * p_pos).sum(1)).sum() + static_cast<float>(ds_neg * g);
  return {dq.to(q.scalar_type()), dp.to(p.scalar_type()), ds.to(logit_scale.scalar_type())};
}

}  // namespace ville

TORCH_LIBRARY_IMPL(ville_kernels, CPU, m) {
  m.impl("infonce_fwd", &ville::infonce_fwd_cpu);
  m.impl("infonce_bwd", &ville::infonce_bwd_cpu);
}
