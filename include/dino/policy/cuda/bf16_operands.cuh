// dino/policy/cuda/bf16_operands.cuh: GEMM operands kept in memory as bf16 on the CUDA policy
// (cuda_policy::bf16_operands), twin of policy/cpu/bf16_operands.hpp.
//
//   round_bf16_apply(pol, x, y16, n)        y16 = bf16(x), round to nearest even
//   layer_norm_rows_bf16(pol, x, w, b, y16, stats, rows, D, eps)
//                                           layer_norm_rows' kernel, y rounded as it is stored
//   gelu_apply_bf16(pol, a, y16, n)         y16 = bf16(gelu(a))
//   scaled_copy_bf16(pol, token_crop, src, scale, dst, dst16, tokens, D)
//                                           the ViT's scaled branch gradient and its bf16 copy
//   gelu_backward_copy_bf16(pol, a, dy, da, da16, n)
//                                           GELU's backward and its bf16 copy (GPU only, both:
//                                           the backward's products under bf16_staged)
//   gemm_bias_rows_bf16(pol, m, n, k, X16, W16, bias, C[, R])
//                                           C[m, n] = X16 W16^T + bias (+ R): cuBLASLt with bf16
//                                           A and B (CUDA_R_16BF), fp32 C and output, COMPUTE_32F,
//                                           the bias in the epilogue, R read as the C operand
// The bf16 bits are passed as std::uint16_t (the CPU's type); here they are __nv_bfloat16. The
// rounding is round-to-nearest-even, the CPU's, so the operands are the CPU's bf16 values
// (FAST_16BF rounds fp32 operands inside the GEMM its own way, within a bf16 step of them).
// What it saves: the products read 2 bytes per operand element instead of 4, the producers
// write 2 instead of 4, and cuBLASLt runs its native bf16 kernels (perf-notes v13).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "dino/math/gelu.hpp"
#include "dino/policy/cuda/gemm.cuh"
#include "dino/policy/cuda/nn_ops.cuh"

namespace dino::cuda {

namespace detail {

struct rounded {  // y = bf16(x)
  static constexpr const char* name = "bf16 operand rounding";
  static constexpr const char* name_vec4 = "bf16 operand rounding (float4)";
  __device__ float operator()(float v) const { return v; }
};
struct gelu_rounded {  // y = bf16(gelu(x))
  static constexpr const char* name = "GELU (bf16 out)";
  static constexpr const char* name_vec4 = "GELU (bf16 out, float4)";
  __device__ float operator()(float v) const { return math::gelu(v); }
};

// y[i] = bf16(Op(x[i])), rounded to nearest even.
template <class Op>
struct bf16_out_fn {
  static constexpr const char* profile_name = Op::name;
  static constexpr const char* profile_name_vec4 = Op::name_vec4;
  const float* x;
  __nv_bfloat16* y;
  __device__ void operator()(std::int64_t b, std::int64_t e) const {
    for (std::int64_t i = b; i < e; ++i) y[i] = __float2bfloat16_rn(Op{}(x[i]));
  }
  bool vec4_ok() const { return ::dino::detail::aligned16(x) && alignment_of(y) >= 8; }
  __device__ void vec4(std::int64_t q) const {
    const float4 v = reinterpret_cast<const float4*>(x)[q];
    reinterpret_cast<uint2*>(y)[q] = bf16x4(Op{}(v.x), Op{}(v.y), Op{}(v.z), Op{}(v.w));
  }
};

// dst[i] = src[i] * scale[token_crop[i / D]] and dst16[i] = bf16(dst[i]): the ViT's scaled
// branch gradient with its bf16 copy (the same fp32 value as vit's scale_elems_fn).
struct scaled_copy_bf16_fn {
  static constexpr const char* profile_name = "scaled branch gradient (bf16 copy)";
  static constexpr const char* profile_name_vec4 = "scaled branch gradient (bf16 copy, float4)";
  const std::int64_t* token_crop;
  const float* src;
  const float* scale;
  float* dst;
  __nv_bfloat16* dst16;
  std::int64_t D;
  __device__ void operator()(std::int64_t b, std::int64_t e) const {
    for (std::int64_t i = b; i < e; ++i) {
      const float v = src[i] * scale[token_crop[i / D]];
      dst[i] = v;
      dst16[i] = __float2bfloat16_rn(v);
    }
  }
  bool vec4_ok() const {
    return D % 4 == 0 && ::dino::detail::aligned16(src) && ::dino::detail::aligned16(dst) && alignment_of(dst16) >= 8;
  }
  __device__ void vec4(std::int64_t q) const {
    const float k = scale[token_crop[4 * q / D]];
    const float4 s = reinterpret_cast<const float4*>(src)[q];
    const float4 v{s.x * k, s.y * k, s.z * k, s.w * k};
    reinterpret_cast<float4*>(dst)[q] = v;
    reinterpret_cast<uint2*>(dst16)[q] = bf16x4(v.x, v.y, v.z, v.w);
  }
};

}  // namespace detail

/// dst = src scaled per token by scale[token_crop[token]] over tokens x D values, and dst16 its
/// bf16 copy (round to nearest even), in one pass: the ViT's branch gradients when its backward
/// passes bf16 copies to the products (bf16_backward_operands).
inline void scaled_copy_bf16(const cuda_policy& pol, const std::int64_t* token_crop, const float* src,
                             const float* scale, float* dst, std::uint16_t* dst16, std::int64_t tokens,
                             std::int64_t D) {
  for_each_chunk(pol, tokens * D,
                 detail::scaled_copy_bf16_fn{token_crop, src, scale, dst, reinterpret_cast<__nv_bfloat16*>(dst16), D});
}

/// da = dy * gelu'(a) over n elements (da may be dy) and da16 its bf16 copy, in one pass.
inline void gelu_backward_copy_bf16(const cuda_policy& pol, const float* a, const float* dy, float* da,
                                    std::uint16_t* da16, std::int64_t n) {
  for_each_chunk(pol, n, detail::gelu_backward_fn<float, true>{a, dy, da, false, reinterpret_cast<__nv_bfloat16*>(da16)});
}

/// y16 = bf16(x) over n elements (round to nearest even).
inline void round_bf16_apply(const cuda_policy& pol, const float* x, std::uint16_t* y, std::int64_t n) {
  for_each_chunk(pol, n, detail::bf16_out_fn<detail::rounded>{x, reinterpret_cast<__nv_bfloat16*>(y)});
}

/// y16 = bf16(gelu(a)) over n elements.
inline void gelu_apply_bf16(const cuda_policy& pol, const float* a, std::uint16_t* y, std::int64_t n) {
  for_each_chunk(pol, n, detail::bf16_out_fn<detail::gelu_rounded>{a, reinterpret_cast<__nv_bfloat16*>(y)});
}

/// y16 = bf16(LN(x)) per row; stats [rows, 2] = (mean, rstd) unless null (layer_norm_rows'
/// kernel and sums).
inline void layer_norm_rows_bf16(const cuda_policy& pol, const float* x, const float* w, const float* b,
                                 std::uint16_t* y, float* stats, std::int64_t rows, std::int64_t D, float eps) {
  if (rows <= 0) return;
  detail::layer_norm_rows_kernel<float, __nv_bfloat16><<<detail::ln_blocks(rows), 32 * detail::ln_warps, 0, pol.stream>>>(
      x, w, b, reinterpret_cast<__nv_bfloat16*>(y), stats, rows, static_cast<int>(D), eps);
  DINO_CUDA_LAUNCHED("layer_norm_rows (bf16 out)");
}

/// C[m, n] = X16 W16^T + bias (+ R) with X16 [m, k] and W16 [n, k] bf16 in memory (packed
/// rows), summed in fp32 by cuBLASLt's bf16 kernels; bias null: none; R a packed [m, n]
/// matrix, not C. The bias goes in the epilogue and R is read as the product's C operand;
/// without an epilogue algorithm for the shape and alignments the bias rows are written first
/// and the product adds to them, and R is added after. Throws cuda_error when cuBLASLt has no
/// bf16 algorithm at all (rows of k bf16 values that are not 16-byte multiples may have none).
inline void gemm_bias_rows_bf16(const cuda_policy& pol, std::int64_t m, std::int64_t n, std::int64_t k,
                                const std::uint16_t* X, const std::uint16_t* W, const float* bias, float* C,
                                const float* residual = nullptr) {
  require<shape_error>(m >= 0 && n >= 0 && k >= 0, "gemm_bias_rows_bf16: invalid sizes m=", m, " n=", n, " k=", k);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty product: C = bias (+ R)
    if (bias) for_each_chunk(pol, m * n, detail::bias_rows_fn<float>{bias, C, n, n});
    else for_each_chunk(pol, m * n, detail::scale_chunk<float>{C, 0.0f, n, n});
    if (residual) for_each_chunk(pol, m * n, detail::add_rows_fn<float>{residual, C, n, n});
    return;
  }
  const gemm_desc d{false, true, m, n, k};
  if (!bias || detail::alignment_of(bias) >= 16) {
    const float* c_in = residual ? residual : C;
    const float beta = residual ? 1.0f : 0.0f;
    const detail::lt_plan& p = detail::plan_for<float>(
        pol, d, k, k, n, {detail::alignment_of(W), detail::alignment_of(X), detail::alignment_of(c_in), detail::alignment_of(C)},
        bias ? detail::epi_bias : detail::epi_none, /*staged=*/true);
    if (p.found) {
      detail::lt_run(pol, p, 1.0f, X, W, beta, c_in, C, bias,
                     residual ? "gemm + bias + residual (bf16 in memory)"
                     : bias   ? "gemm + bias epilogue (bf16 in memory)"
                              : "gemm (bf16 in memory)");
      return;
    }
  }
  const detail::lt_plan& q = detail::plan_for<float>(
      pol, d, k, k, n, {detail::alignment_of(W), detail::alignment_of(X), detail::alignment_of(C), detail::alignment_of(C)},
      detail::epi_none, /*staged=*/true);
  require<cuda_error>(q.found, "gemm_bias_rows_bf16: cuBLASLt has no bf16 algorithm for m=", m, " n=", n, " k=", k,
                      " (operand alignment ", detail::alignment_of(X), " and ", detail::alignment_of(W), " bytes)");
  if (bias) for_each_chunk(pol, m * n, detail::bias_rows_fn<float>{bias, C, n, n});
  detail::lt_run(pol, q, 1.0f, X, W, bias ? 1.0f : 0.0f, C, C, nullptr, "gemm (bf16 in memory)");
  if (residual) for_each_chunk(pol, m * n, detail::add_rows_fn<float>{residual, C, n, n});
}

}  // namespace dino::cuda

namespace dino {
using cuda::gelu_apply_bf16;
using cuda::gelu_backward_copy_bf16;
using cuda::gemm_bias_rows_bf16;
using cuda::scaled_copy_bf16;
using cuda::layer_norm_rows_bf16;
using cuda::round_bf16_apply;
}  // namespace dino
