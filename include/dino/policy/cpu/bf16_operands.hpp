// dino/policy/cpu/bf16_operands.hpp: GEMM operands kept in memory as bf16 (the bf16_operands
// option of the bf16 mixed precision; twin of policy/cuda/bf16_operands.cuh).
//
//   round_bf16_apply(pol, x, y16, n)        y16[i] = bf16 bits of x[i] (nearest even, cpu::bf16_bits)
//   layer_norm_rows_bf16(pol, x, w, b, y16, stats, rows, D, eps)
//                                           y16 = bf16(LN(x)) per row; stats as layer_norm_rows
//   gelu_apply_bf16(pol, a, y16, n)         y16 = bf16(gelu(a))
//   gemm_bias_rows_bf16(pol, m, n, k, X16, W16, bias, C[, R])
//                                           C[m, n] = X16 W16^T + bias (+ R), X16 [m, k] and
//                                           W16 [n, k] bf16 bits, C, bias and R fp32 (bias null: none)
//
// The bf16 path of the linear layers (cpu_policy::bf16) rounds each fp32 operand to bf16 as
// the GEMM packs it. Here the producers of an operand (LayerNorm, GELU, a weight's copy) round
// as they write, with the same rounding, and the product reads the bf16 values: the operands
// the product sees are the same values, so the results are the same bits as the fp32-operand
// bf16 path (the tests check this). That also makes the CPU the test bed of the ViT's bf16
// operand layout (nn/vit.hpp): the same areas and buffers as on the GPU, where halving the
// bytes the products read is what the option is for. On the CPU the product packs bf16
// operands as they lie on the AVX512_BF16 kernel (a copy of words instead of a rounding pass
// over fp32), and elsewhere widens them to fp32 in blocks of rows; the producers' rounding is
// a pass of its own here. Off by default on both policies; docs/benchmarks.md has what it
// costs or saves on the CPU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dino/policy/cpu/gelu_kernel.hpp"
#include "dino/policy/cpu/nn_ops.hpp"

namespace dino::cpu {

/// y16[i] = the bf16 bits of x[i], rounded to nearest even (bf16_bits), in parallel chunks.
inline void round_bf16_apply(const cpu_policy& pol, const float* x, std::uint16_t* y, std::int64_t n) {
  for_each_chunk(pol, n, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) y[i] = bf16_bits(x[i]);
  });
}

/// y16 = LN(x) per row rounded to bf16; stats [rows, 2] = (mean, rstd) unless null. The fp32
/// values are layer_norm_rows' (the same row kernel), rounded as they are stored.
inline void layer_norm_rows_bf16(const cpu_policy& pol, const float* x, const float* w, const float* b,
                                 std::uint16_t* y, float* stats, std::int64_t rows, std::int64_t D, float eps) {
  detail::for_each_row_block(pol, rows, [&](std::int64_t r0, std::int64_t r1) {
    thread_local std::vector<float> block;  // the block's rows in fp32, grown once per thread
    const std::size_t n = std::size_t((r1 - r0) * D);
    if (block.size() < n) block.resize(n);
    layer_norm_rows(cpu_policy{1}, x + r0 * D, w, b, block.data(), stats ? stats + 2 * r0 : nullptr, r1 - r0, D, eps);
    for (std::size_t i = 0; i < n; ++i) y[std::size_t(r0 * D) + i] = bf16_bits(block[i]);
  });
}

/// y16 = gelu(a) rounded to bf16 over n elements (gelu_range's values), in parallel chunks.
inline void gelu_apply_bf16(const cpu_policy& pol, const float* a, std::uint16_t* y, std::int64_t n) {
  for_each_chunk(pol, n, [&](std::int64_t b, std::int64_t e) {
    constexpr std::int64_t L = 1024;
    alignas(64) float t[L];
    for (std::int64_t i = b; i < e; i += L) {
      const std::int64_t len = std::min(L, e - i);
      gelu_range(a + i, t, len);
      for (std::int64_t j = 0; j < len; ++j) y[i + j] = bf16_bits(t[j]);
    }
  });
}

namespace detail {
/// The AVX512_BF16 kernel on the bf16 operands as they lie (pgemm16::gemm_blocked_bf16_operands),
/// split over threads as gemm() splits a product; false: not run (no such kernel active, an
/// empty depth, or no packing buffers), C then to be written by another path.
inline bool gemm_bf16_operands_native(const cpu_policy& pol, std::int64_t m, std::int64_t n, std::int64_t k,
                                      const std::uint16_t* X, const std::uint16_t* W, const float* bias, float* C) {
#if DINO_GEMM_X86
  if (!gemm_bf16_native() || k == 0) return false;
  return split_product(pol, m, n, k, 48, 32, [&](bool split_rows, std::int64_t lo, std::int64_t len) {
    return split_rows ? pgemm16::gemm_blocked_bf16_operands(len, n, k, X + lo * k, k, W, k, C + lo * n, n, bias)
                      : pgemm16::gemm_blocked_bf16_operands(m, len, k, X, k, W + lo * k, k, C + lo, n,
                                                             bias ? bias + lo : nullptr);
  });
#else
  (void)pol, (void)m, (void)n, (void)k, (void)X, (void)W, (void)bias, (void)C;
  return false;
#endif
}
}  // namespace detail

/// C[m, n] = X16 W16^T + bias (+ R) with X16 [m, k] and W16 [n, k] bf16 bits (packed rows),
/// summed in fp32 as the bf16 GEMM sums (gemm_bf16.hpp), so C is the same bits as
/// gemm_bias_rows with pol.bf16 on the fp32 values the bits stand for. On the AVX512_BF16
/// kernel the operands are packed as they lie (a copy of words: half the bytes of the fp32
/// path's packing, and no rounding); elsewhere W16 is widened once and X16 in blocks of rows
/// for the bf16 GEMM (bf16 values are exact in fp32, and an element of C is summed the same way
/// whatever the block of rows it is computed in). The residual is added after, as
/// gemm_bias_rows adds it.
inline void gemm_bias_rows_bf16(const cpu_policy& pol, std::int64_t m, std::int64_t n, std::int64_t k,
                                const std::uint16_t* X, const std::uint16_t* W, const float* bias, float* C,
                                const float* residual = nullptr) {
  require<shape_error>(m >= 0 && n >= 0 && k >= 0, "gemm_bias_rows_bf16: invalid sizes m=", m, " n=", n, " k=", k);
  if (m == 0 || n == 0) return;
  if (detail::gemm_bf16_operands_native(pol, m, n, k, X, W, bias, C)) {
    detail::add_residual_rows(pol, m, n, residual, C);
    return;
  }
  constexpr std::int64_t R = 512;  // rows of X widened at a time
  thread_local std::vector<float> w, x;
  w.resize(std::size_t(n * k));
  x.resize(std::size_t(std::min(m, R) * k));
  const auto widen = [&pol](const std::uint16_t* src, float* dst, std::int64_t cnt) {
    for_each_chunk(pol, cnt, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) dst[i] = bf16_value(src[i]);
    });
  };
  widen(W, w.data(), n * k);
  cpu_policy bp = pol;
  bp.bf16 = true;  // rounding bf16 values to bf16 changes nothing: the same kernel as the fp32-operand path
  for (std::int64_t r0 = 0; r0 < m; r0 += R) {
    const std::int64_t rows = std::min(R, m - r0);
    widen(X + r0 * k, x.data(), rows * k);
    const gemm_desc d{false, true, rows, n, k};
    if (bias) gemm_bias(bp, d, x.data(), w.data(), bias, C + r0 * n);
    else gemm(bp, d, 1.0f, x.data(), w.data(), 0.0f, C + r0 * n);
  }
  detail::add_residual_rows(pol, m, n, residual, C);
}

/// dst = src scaled per token by scale[token_crop[token]] over tokens x D values, and dst16
/// its bf16 copy. Twin of the CUDA op, which the ViT's backward uses under bf16_staged
/// (bf16_backward_operands; the CPU's ViT scales crop by crop and never asks for the copy).
inline void scaled_copy_bf16(const cpu_policy& pol, const std::int64_t* token_crop, const float* src,
                             const float* scale, float* dst, std::uint16_t* dst16, std::int64_t tokens,
                             std::int64_t D) {
  for_each_chunk(pol, tokens * D, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      dst[i] = src[i] * scale[token_crop[i / D]];
      dst16[i] = bf16_bits(dst[i]);
    }
  });
}

/// da = dy * gelu'(a) over n elements (da may be dy; gelu_backward_apply's values) and da16
/// its bf16 copy. Twin of the CUDA op (see scaled_copy_bf16).
inline void gelu_backward_copy_bf16(const cpu_policy& pol, const float* a, const float* dy, float* da,
                                    std::uint16_t* da16, std::int64_t n) {
  gelu_backward_apply(pol, a, dy, da, n, false);
  round_bf16_apply(pol, da, da16, n);
}

}  // namespace dino::cpu

namespace dino {
using cpu::gelu_apply_bf16;
using cpu::gelu_backward_copy_bf16;
using cpu::scaled_copy_bf16;
using cpu::gemm_bias_rows_bf16;
using cpu::layer_norm_rows_bf16;
using cpu::round_bf16_apply;
}  // namespace dino
