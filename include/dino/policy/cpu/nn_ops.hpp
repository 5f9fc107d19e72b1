// dino/policy/cpu/nn_ops.hpp: row operations of the nn/ modules on the CPU policy (twins in
// policy/cuda/nn_ops.cuh, found from the policy argument).
//
//   broadcast_rows(pol, b, y, rows, cols)      y[r, :] = b                       (bias rows)
//   gemm_bias_rows(pol, d, A, B, bias, C[, R]) C = A op(B) + bias per row (+ R)  (nn::linear)
//   copy_elements(pol, src, dst, n)            dst[0, n) = src[0, n)
//   layer_norm_rows(pol, x, w, b, y, stats, rows, D, eps)
//       y = LN(x) per row (math/layernorm.hpp); stats [rows, 2] = (mean, rstd) unless null
//   layer_norm_rows_backward(pol, x, w, dy, stats, dx, rows, D, accumulate)
//       dx (=|+=) the LayerNorm input gradient per row
//   layer_norm_param_grads(pol, x, dy, stats, rows, D, gw, gb)
//       gw[c] += sum_r dy[r, c] (x[r, c] - mean_r) rstd_r,  gb[c] += sum_r dy[r, c]
// Rows run in parallel; the parameter gradients sum rows in order within column blocks, so
// no result depends on the thread count.
#pragma once

#include <algorithm>
#include <cstdint>

#include "dino/math/layernorm.hpp"
#include "dino/policy/cpu/gemm.hpp"
#include "dino/policy/cpu/parallel.hpp"

namespace dino::cpu {

template <class T>
inline void broadcast_rows(const cpu_policy& pol, const T* b, T* y, std::int64_t rows, std::int64_t cols) {
  for_each_row(pol, rows, [&](std::int64_t r) {
    T* yr = y + r * cols;
    for (std::int64_t j = 0; j < cols; ++j) yr[j] = b[j];
  });
}

/// C[m, n] = A op(B) + bias per row (d.batch 1): the bias rows first, then the GEMM adds to
/// them (one pass over C before the GEMM instead of a bias pass after it). Twin of the CUDA
/// form, which adds the bias in cuBLASLt's epilogue.
/// With residual (packed [m, n], not C): then C += residual, a pass of its own, so the sums
/// round as (x W^T + b) + residual, the reference's order.
template <class T>
inline void gemm_bias_rows(const cpu_policy& pol, const gemm_desc& d, const T* A, const T* B, const T* bias, T* C,
                           const T* residual = nullptr) {
  require<shape_error>(d.batch == 1, "gemm_bias_rows: one product only, got batch=", d.batch);
  require<shape_error>(d.ldc == 0 || d.ldc == d.n, "gemm_bias_rows: C must be packed (ldc ", d.ldc, ", n ", d.n, ")");
  broadcast_rows(pol, bias, C, d.m, d.n);
  gemm(pol, d, T(1), A, B, T(1), C);
  if (residual)
    for_each_row(pol, d.m, [&](std::int64_t r) {
      T* cr = C + r * d.n;
      const T* rr = residual + r * d.n;
      for (std::int64_t j = 0; j < d.n; ++j) cr[j] += rr[j];
    });
}

template <class T>
inline void copy_elements(const cpu_policy&, const T* src, T* dst, std::int64_t n) {
  std::copy(src, src + n, dst);
}

template <class T>
inline void layer_norm_rows(const cpu_policy& pol, const T* x, const T* w, const T* b, T* y, T* stats,
                            std::int64_t rows, std::int64_t D, T eps) {
  const int n = static_cast<int>(D);
  for_each_row(pol, rows, [&](std::int64_t r) {
    auto st = math::layernorm_row(x + r * n, w, b, y + r * n, n, eps);
    if (stats) {
      stats[2 * r] = st.mean;
      stats[2 * r + 1] = st.rstd;
    }
  });
}

template <class T>
inline void layer_norm_rows_backward(const cpu_policy& pol, const T* x, const T* w, const T* dy, const T* stats, T* dx,
                                     std::int64_t rows, std::int64_t D, bool accumulate) {
  const int n = static_cast<int>(D);
  for_each_row(pol, rows, [&](std::int64_t r) {
    math::layernorm_row_backward(x + r * n, w, dy + r * n, math::layernorm_stats<T>{stats[2 * r], stats[2 * r + 1]},
                                 dx + r * n, n, accumulate);
  });
}

template <class T>
inline void layer_norm_param_grads(const cpu_policy& pol, const T* x, const T* dy, const T* stats, std::int64_t rows,
                                   std::int64_t D, T* gw, T* gb) {
  // Parallel over column blocks, rows summed in order (deterministic, whatever the block
  // width). Blocks of 16 to 64 columns, about 4 per thread.
  const std::int64_t block = std::clamp<std::int64_t>((D / (4 * std::max(1, pol.threads)) + 15) / 16 * 16, 16, 64);
  const std::int64_t nb = (D + block - 1) / block;
  for_each_row(pol, nb, [&](std::int64_t bi) {
    const std::int64_t c0 = bi * block, c1 = std::min<std::int64_t>(D, c0 + block);
    for (std::int64_t r = 0; r < rows; ++r) {
      const T mean = stats[2 * r], rstd = stats[2 * r + 1];
      const T* xr = x + r * D;
      const T* dr = dy + r * D;
      for (std::int64_t c = c0; c < c1; ++c) {
        gw[c] += dr[c] * (xr[c] - mean) * rstd;
        gb[c] += dr[c];
      }
    }
  });
}

}  // namespace dino::cpu

namespace dino {
using cpu::broadcast_rows;
using cpu::copy_elements;
using cpu::gemm_bias_rows;
using cpu::layer_norm_param_grads;
using cpu::layer_norm_rows;
using cpu::layer_norm_rows_backward;
}  // namespace dino
