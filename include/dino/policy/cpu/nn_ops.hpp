// dino/policy/cpu/nn_ops.hpp: row operations of the nn/ modules on the CPU policy (twins in
// policy/cuda/nn_ops.cuh, found from the policy argument).
//
//   broadcast_rows(pol, b, y, rows, cols)      y[r, :] = b                       (bias rows)
//   gemm_bias_rows(pol, d, A, B, bias, C[, R]) C = A op(B) + bias per row (+ R)  (nn::linear)
//   linear_param_grads(pol, dy, x, rows, out, in, dW, db)
//       dW[out, in] += dy^T x, db[out] += sum_r dy[r, :] (db null: none)   (nn::linear)
//   copy_elements(pol, src, dst, n)            dst[0, n) = src[0, n)
//   layer_norm_rows(pol, x, w, b, y, stats, rows, D, eps)
//       y = LN(x) per row (math/layernorm.hpp); stats [rows, 2] = (mean, rstd) unless null
//   layer_norm_rows_backward(pol, x, w, dy, stats, dx, rows, D, accumulate)
//       dx (=|+=) the LayerNorm input gradient per row
//   layer_norm_param_grads(pol, x, dy, stats, rows, D, gw, gb)
//       gw[c] += sum_r dy[r, c] (x[r, c] - mean_r) rstd_r,  gb[c] += sum_r dy[r, c]
// Rows run in parallel; the parameter gradients sum rows in order within column blocks, so
// no result depends on the thread count. The LayerNorm passes run on the active SIMD level
// (policy/cpu/simd.hpp): a second, AVX-512 copy of the same loops where the CPU has it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dino/math/layernorm.hpp"
#include "dino/policy/cpu/gemm.hpp"
#include "dino/policy/cpu/parallel.hpp"
#include "dino/policy/cpu/reduce.hpp"
#include "dino/policy/cpu/simd.hpp"

namespace dino::cpu {

namespace detail {
/// C[m, n] += R (both packed; R null: nothing): gemm_bias_rows' residual, added after the product.
template <class T>
inline void add_residual_rows(const cpu_policy& pol, std::int64_t m, std::int64_t n, const T* R, T* C) {
  if (!R) return;
  for_each_row(pol, m, [&](std::int64_t r) {
    T* cr = C + r * n;
    const T* rr = R + r * n;
    for (std::int64_t j = 0; j < n; ++j) cr[j] += rr[j];
  });
}
}  // namespace detail

template <class T>
inline void broadcast_rows(const cpu_policy& pol, const T* b, T* y, std::int64_t rows, std::int64_t cols) {
  for_each_row(pol, rows, [&](std::int64_t r) {
    T* yr = y + r * cols;
    for (std::int64_t j = 0; j < cols; ++j) yr[j] = b[j];
  });
}

/// C[m, n] = A op(B) + bias per row (d.batch 1): the bias added as the GEMM stores C
/// (cpu::gemm_bias; the value of C = bias rows, then C += A op(B)). Twin of the CUDA form,
/// which adds the bias in cuBLASLt's epilogue.
/// With residual (packed [m, n], not C): then C += residual, a pass of its own, so the sums
/// round as (x W^T + b) + residual, the reference's order.
template <class T>
inline void gemm_bias_rows(const cpu_policy& pol, const gemm_desc& d, const T* A, const T* B, const T* bias, T* C,
                           const T* residual = nullptr) {
  require<shape_error>(d.batch == 1, "gemm_bias_rows: one product only, got batch=", d.batch);
  require<shape_error>(d.ldc == 0 || d.ldc == d.n, "gemm_bias_rows: C must be packed (ldc ", d.ldc, ", n ", d.n, ")");
  gemm_bias(pol, d, A, B, bias, C);
  detail::add_residual_rows(pol, d.m, d.n, residual, C);
}

/// The parameter gradients of a linear layer (nn::linear): dW[out, in] += dy^T x over the
/// rows, and db[out] += the column sums of dy (db null: no bias). Twin of the CUDA form,
/// which may sum db in the GEMM's epilogue.
template <class T>
inline void linear_param_grads(const cpu_policy& pol, const T* dy, const T* x, std::int64_t rows, std::int64_t out,
                               std::int64_t in, T* dW, T* db) {
  gemm(pol, gemm_desc{true, false, out, in, rows}, T(1), dy, x, T(1), dW);
  if (db) column_sums(pol, dy, rows, out, db, true);
}

/// The backward products of a linear layer (nn::linear) with weight W [out, in]:
/// linear_param_grads, then, with dx, dx[rows, in] = dy W + beta dx (beta 0: dx is not read).
/// Twin of the CUDA form, which under bf16_staged rounds dy once for both products. copies
/// (float only): with x null, x is copies.x widened (a temporary of rows x in values; the ViT
/// passes it on the GPU only, bf16_backward_operands); copies.dy is not needed here, since the
/// bf16 products round dy to the same values.
template <class T>
inline void linear_backward(const cpu_policy& pol, const T* dy, const T* x, const T* W, std::int64_t rows,
                            std::int64_t out, std::int64_t in, T* dW, T* db, T* dx, T beta,
                            linear_bf16_copies copies = {}) {
  std::vector<T> widened;
  if (!x) {
    require<config_error>(std::is_same_v<T, float> && copies.x != nullptr,
                          "linear_backward: no x, and no bf16 copy of it (float only)");
    widened.resize(std::size_t(rows * in));
    for (std::size_t i = 0; i < widened.size(); ++i)
      widened[i] = T(bf16_value(copies.x[i]));
    x = widened.data();
  }
  linear_param_grads(pol, dy, x, rows, out, in, dW, db);
  if (dx) gemm(pol, gemm_desc{false, false, rows, in, out}, T(1), dy, W, beta, dx);
}

/// Whether the ViT's backward should pass its recomputed operands as bf16 copies
/// (linear_bf16_copies) instead of fp32: never on the CPU, whose bf16 products round fp32
/// operands as they pack them. The CUDA form: under bf16_staged.
constexpr bool bf16_backward_operands(const cpu_policy&) { return false; }

template <class T>
inline void copy_elements(const cpu_policy&, const T* src, T* dst, std::int64_t n) {
  std::copy(src, src + n, dst);
}

namespace detail {
/// sum_i f(i) over [0, n) as 16 lane partials (lane j adds the i = j mod 16 terms in order),
/// combined pairwise (lane j += lane j + 8, then + 4, + 2, + 1): one order on every SIMD
/// level, vectorised by the compiler (4 chains of 4 lanes in SSE2, one of 16 with AVX-512)
/// instead of one serial chain of n adds.
template <class T, class F>
[[gnu::always_inline]] inline T lane_sum(std::int64_t n, F&& f) {
  constexpr int L = 16;
  T p[L] = {};
  std::int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) p[j] += f(i + j);
  for (int j = 0; i + j < n; ++j) p[j] += f(i + j);
  for (int h = L / 2; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) p[j] += p[j + h];
  return p[0];
}

/// LayerNorm of rows [r0, r1) (math/layernorm.hpp's formulas; the two sums as lane_sum).
template <class T>
[[gnu::always_inline]] inline void layer_norm_block(const T* x, const T* w, const T* b, T* y, T* stats, std::int64_t r0,
                                                    std::int64_t r1, std::int64_t n, T eps) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    const T mean = lane_sum<T>(n, [&](std::int64_t i) { return xr[i]; }) / T(n);
    const T var = lane_sum<T>(n, [&](std::int64_t i) {
                    const T d = xr[i] - mean;
                    return d * d;
                  }) /
                  T(n);
    const T rstd = T(1) / std::sqrt(var + eps);
    if (w && b)
      for (std::int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
    else
      for (std::int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - mean) * rstd * (w ? w[i] : T(1)) + (b ? b[i] : T(0));
    if (stats) {
      stats[2 * r] = mean;
      stats[2 * r + 1] = rstd;
    }
  }
}

/// LayerNorm input gradient of rows [r0, r1) (math/layernorm.hpp; the sums as lane_sum).
template <class T>
[[gnu::always_inline]] inline void layer_norm_backward_block(const T* x, const T* w, const T* dy, const T* stats, T* dx,
                                                             std::int64_t r0, std::int64_t r1, std::int64_t n,
                                                             bool accumulate) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * n;
    const T* dr = dy + r * n;
    T* out = dx + r * n;
    const T mean = stats[2 * r], rstd = stats[2 * r + 1];
    const auto g = [&](std::int64_t i) { return dr[i] * (w ? w[i] : T(1)); };
    const T mg = lane_sum<T>(n, g) / T(n);
    const T mgx = lane_sum<T>(n, [&](std::int64_t i) { return g(i) * ((xr[i] - mean) * rstd); }) / T(n);
    for (std::int64_t i = 0; i < n; ++i) {
      const T v = rstd * (g(i) - mg - (xr[i] - mean) * rstd * mgx);
      out[i] = accumulate ? out[i] + v : v;
    }
  }
}

/// gw[c] += sum_r dy[r, c] (x[r, c] - mean_r) rstd_r, gb[c] += sum_r dy[r, c] for c in [c0, c1),
/// rows in order.
template <class T>
[[gnu::always_inline]] inline void layer_norm_param_block(const T* x, const T* dy, const T* stats, std::int64_t rows,
                                                          std::int64_t D, std::int64_t c0, std::int64_t c1, T* gw, T* gb) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const T mean = stats[2 * r], rstd = stats[2 * r + 1];
    const T* xr = x + r * D;
    const T* dr = dy + r * D;
    for (std::int64_t c = c0; c < c1; ++c) {
      gw[c] += dr[c] * (xr[c] - mean) * rstd;
      gb[c] += dr[c];
    }
  }
}

#if DINO_GEMM_X86
template <class T>
DINO_SIMD_AVX512 void layer_norm_block_avx512(const T* x, const T* w, const T* b, T* y, T* stats, std::int64_t r0,
                                              std::int64_t r1, std::int64_t n, T eps) {
  layer_norm_block(x, w, b, y, stats, r0, r1, n, eps);
}
template <class T>
DINO_SIMD_AVX512 void layer_norm_backward_block_avx512(const T* x, const T* w, const T* dy, const T* stats, T* dx,
                                                       std::int64_t r0, std::int64_t r1, std::int64_t n, bool accumulate) {
  layer_norm_backward_block(x, w, dy, stats, dx, r0, r1, n, accumulate);
}
template <class T>
DINO_SIMD_AVX512 void layer_norm_param_block_avx512(const T* x, const T* dy, const T* stats, std::int64_t rows,
                                                    std::int64_t D, std::int64_t c0, std::int64_t c1, T* gw, T* gb) {
  layer_norm_param_block(x, dy, stats, rows, D, c0, c1, gw, gb);
}
#endif

/// Rows [0, rows) in contiguous blocks of about 64 rows, in parallel: f(r0, r1).
template <class F>
inline void for_each_row_block(const cpu_policy& pol, std::int64_t rows, F&& f) {
  constexpr std::int64_t R = 64;
  for_each_row(pol, (rows + R - 1) / R, [&](std::int64_t bi) { f(bi * R, std::min(rows, bi * R + R)); });
}
}  // namespace detail

/// y = LN(x) per row; stats [rows, 2] = (mean, rstd) unless null. The formulas of
/// math/layernorm.hpp with the mean and variance summed in 16 lanes (detail::lane_sum), on
/// the active SIMD level (simd.hpp).
template <class T>
inline void layer_norm_rows(const cpu_policy& pol, const T* x, const T* w, const T* b, T* y, T* stats,
                            std::int64_t rows, std::int64_t D, T eps) {
#if DINO_GEMM_X86
  const bool wide = simd_avx512();
#endif
  detail::for_each_row_block(pol, rows, [&](std::int64_t r0, std::int64_t r1) {
#if DINO_GEMM_X86
    if (wide) return detail::layer_norm_block_avx512(x, w, b, y, stats, r0, r1, D, eps);
#endif
    detail::layer_norm_block(x, w, b, y, stats, r0, r1, D, eps);
  });
}

/// dx (=|+=) the LayerNorm input gradient per row (sums as in layer_norm_rows).
template <class T>
inline void layer_norm_rows_backward(const cpu_policy& pol, const T* x, const T* w, const T* dy, const T* stats, T* dx,
                                     std::int64_t rows, std::int64_t D, bool accumulate) {
#if DINO_GEMM_X86
  const bool wide = simd_avx512();
#endif
  detail::for_each_row_block(pol, rows, [&](std::int64_t r0, std::int64_t r1) {
#if DINO_GEMM_X86
    if (wide) return detail::layer_norm_backward_block_avx512(x, w, dy, stats, dx, r0, r1, D, accumulate);
#endif
    detail::layer_norm_backward_block(x, w, dy, stats, dx, r0, r1, D, accumulate);
  });
}

template <class T>
inline void layer_norm_param_grads(const cpu_policy& pol, const T* x, const T* dy, const T* stats, std::int64_t rows,
                                   std::int64_t D, T* gw, T* gb) {
  // Parallel over column blocks, rows summed in order (deterministic, whatever the block
  // width). Blocks of 16 to 64 columns, about 4 per thread.
  const std::int64_t block = std::clamp<std::int64_t>((D / (4 * std::max(1, pol.threads)) + 15) / 16 * 16, 16, 64);
  const std::int64_t nb = (D + block - 1) / block;
#if DINO_GEMM_X86
  const bool wide = simd_avx512();
#endif
  for_each_row(pol, nb, [&](std::int64_t bi) {
    const std::int64_t c0 = bi * block, c1 = std::min<std::int64_t>(D, c0 + block);
#if DINO_GEMM_X86
    if (wide) return detail::layer_norm_param_block_avx512(x, dy, stats, rows, D, c0, c1, gw, gb);
#endif
    detail::layer_norm_param_block(x, dy, stats, rows, D, c0, c1, gw, gb);
  });
}

}  // namespace dino::cpu

namespace dino {
using cpu::broadcast_rows;
using cpu::copy_elements;
using cpu::gemm_bias_rows;
using cpu::bf16_backward_operands;
using cpu::linear_backward;
using cpu::linear_param_grads;
using cpu::layer_norm_param_grads;
using cpu::layer_norm_rows;
using cpu::layer_norm_rows_backward;
}  // namespace dino
