// One-token decode attention over per-sample KV caches, CPU. Semantics: `decode_attention_ref` in
// kernels/ville_kernels/decode_attention.py. Shape letters: B active queries, Bc cache rows, Hq / Hkv query / kv heads,
// G = Hq / Hkv, Lm cache capacity, D head dim.
//
// One task per (b, kv head): its G query heads read the kv head's visible span [start, len) once (decode is
// bandwidth-bound, so each K / V row is loaded once for all G heads), scores and softmax in fp32, output
// accumulated in fp32. Positions outside the span are never read, so cache garbage (NaN included) cannot leak in.
// Any strides; nothing is copied.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace ville {
namespace {

// out[g] = sum_n p[g][n] * v_n for one position's v row (already fp32), G heads.
VILLE_CLONES void axpy_heads(float* acc, const float* p_n, const float* v, int64_t G, int64_t D) {
  for (int64_t g = 0; g < G; ++g) {
    const float w = p_n[g];
    float* a = acc + g * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
  }
}

VILLE_CLONES void dots_heads(float* s_n, const float* qg, const float* k, int64_t G, int64_t D) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qr = qg + g * D;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) acc += qr[d] * k[d];
    s_n[g] = acc;
  }
}

template <typename scalar_t>
void load_row(float* dst, const scalar_t* src, int64_t D, int64_t stride) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d * stride]);
}

template <typename scalar_t>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* lens,
                             const int64_t* rows, at::Tensor& out, double scale, c10::optional<double> softcap,
                             c10::optional<int64_t> window) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  const int64_t G = Hq / Hkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qg(G * D), acc(G * D), row(D), scores, sums(G), maxes(G);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t r = rows ? rows[b] : b;
      const int64_t end = lens[r];
      const int64_t start = window.has_value() ? std::max<int64_t>(end - *window, 0) : 0;
      const int64_t n = end - start;
      for (int64_t g = 0; g < G; ++g)
        load_row(qg.data() + g * D, qp + b * qs[0] + (h * G + g) * qs[1], D, qs[2]);
      scores.resize(n * G);  // position-major (n, G): one K row serves all G heads
      const scalar_t* kb = kp + r * ks[0] + h * ks[1];
      const scalar_t* vb = vp + r * vs[0] + h * vs[1];
      std::fill(maxes.begin(), maxes.end(), -std::numeric_limits<float>::infinity());
      for (int64_t i = 0; i < n; ++i) {
        load_row(row.data(), kb + (start + i) * ks[2], D, ks[3]);
        float* s_n = scores.data() + i * G;
        dots_heads(s_n, qg.data(), row.data(), G, D);
        for (int64_t g = 0; g < G; ++g) {
          float s = s_n[g] * sc;
          if (softcap.has_value()) s = static_cast<float>(*softcap) * std::tanh(s / static_cast<float>(*softcap));
          s_n[g] = s;
          maxes[g] = std::max(maxes[g], s);
        }
      }
      std::fill(sums.begin(), sums.end(), 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        float* s_n = scores.data() + i * G;
        for (int64_t g = 0; g < G; ++g) {
          s_n[g] = std::exp(s_n[g] - maxes[g]);
          sums[g] += s_n[g];
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        load_row(row.data(), vb + (start + i) * vs[2], D, vs[3]);
        axpy_heads(acc.data(), scores.data() + i * G, row.data(), G, D);
      }
      for (int64_t g = 0; g < G; ++g) {
        scalar_t* o = op + b * out.stride(0) + (h * G + g) * out.stride(1);
        const float inv = 1.0f / sums[g];
        for (int64_t d = 0; d < D; ++d) o[d * out.stride(2)] = static_cast<scalar_t>(acc[g * D + d] * inv);
      }
    }
  });
}

}  // namespace

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& cache_lens, const c10::optional<at::Tensor>& batch_idx,
                                double scale, c10::optional<double> softcap, c10::optional<int64_t> window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: expected q (B, Hq, D) and caches (Bc, Hkv, Lm, D), got ", q.sizes(), ", ",
              k_cache.sizes(), ", ", v_cache.sizes());
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Bc = k_cache.size(0), Hkv = k_cache.size(1), Lm = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, "decode_attention: q head dim ", D, " != cache head dim ", k_cache.size(3));
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "decode_attention: Hq=", Hq, " must be a multiple of Hkv=", Hkv);
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "decode_attention: q, k_cache, v_cache must share a dtype");
  TORCH_CHECK(cache_lens.dim() == 1 && cache_lens.size(0) == Bc, "decode_attention: cache_lens must be (Bc,)");
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "decode_attention: softcap must be > 0");
  TORCH_CHECK(!window.has_value() || *window >= 1, "decode_attention: window must be >= 1");
  const at::Tensor lens = cache_lens.to(at::kLong).contiguous();
  at::Tensor rows;
  if (batch_idx.has_value()) {
    TORCH_CHECK(batch_idx->dim() == 1 && batch_idx->size(0) == B, "decode_attention: batch_idx must be (B,)");
    rows = batch_idx->to(at::kLong).contiguous();
  } else {
    TORCH_CHECK(B == Bc, "decode_attention: without batch_idx, q's batch ", B, " must equal cache rows ", Bc);
  }
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* rp = rows.defined() ? rows.data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = rp ? rp[b] : b;
    TORCH_CHECK(r >= 0 && r < Bc, "decode_attention: batch_idx must lie in [0, ", Bc, "), got ", r);
    TORCH_CHECK(lp[r] >= 1 && lp[r] <= Lm, "decode_attention: cache_lens[", r, "] = ", lp[r], " not in [1, ", Lm,
                "]");
  }
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention_cpu", [&] {
    decode_attention_kernel<scalar_t>(q, k_cache, v_cache, lp, rp, out, scale, softcap, window);
  });
  return out;
}

}  // namespace ville

TORCH_LIBRARY_IMPL(ville_kernels, CPU, m) { m.impl("decode_attention", &ville::decode_attention_cpu); }
