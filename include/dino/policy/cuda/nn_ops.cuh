// dino/policy/cuda/nn_ops.cuh: the row and element operations of the nn/ modules on the CUDA
// policy, twins of policy/cpu/nn_ops.hpp and the policy ops of policy/cpu/gelu_kernel.hpp.
//
//   broadcast_rows(pol, b, y, rows, cols)      y[r, :] = b (one thread per 4 elements)
//   copy_elements(pol, src, dst, n)            device to device on pol.stream
//   gelu_apply / gelu_backward_apply           math::gelu and math::gelu_grad element-wise
//   layer_norm_rows                            a warp per row; mean and variance summed in
//                                              double by a fixed butterfly (deterministic),
//                                              then y in T as math::layernorm_row
//   layer_norm_rows_backward                   a warp per row, both row sums in double
//   layer_norm_param_grads                     a block per 32 columns and chunk of rows (as
//                                              column_sums), 8 row groups summed in double and
//                                              combined in a fixed order (+=)
//   upload_shared(pol, host, bytes, what)      one counted device allocation holding a copy of
//                                              host bytes (set-up: synchronises; the tables of
//                                              a ViT pack), freed with the last owner
// All pointers are device pointers; kernels go to pol.stream without synchronising.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "dino/math/gelu.hpp"
#include "dino/policy/cuda/memory.cuh"
#include "dino/policy/cuda/parallel.cuh"
#include "dino/policy/cuda/policy.cuh"
#include "dino/policy/cuda/reduce.cuh"

namespace dino::cuda {

namespace detail {

template <class T>
struct broadcast_rows_fn {
  const T* b;
  T* y;
  std::int64_t cols;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t i = lo; i < hi; ++i) y[i] = b[i % cols];
  }
};

template <class T>
struct gelu_fn {
  static constexpr const char* profile_name = "GELU";
  static constexpr const char* profile_name_vec4 = "GELU (float4)";
  const T* a;
  T* y;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t i = lo; i < hi; ++i) y[i] = math::gelu(a[i]);
  }
  // float4 form (parallel.cuh, for_each_chunk)
  bool vec4_ok() const
    requires std::is_same_v<T, float>
  {
    return ::dino::detail::aligned16(a) && ::dino::detail::aligned16(y);
  }
  __device__ void vec4(std::int64_t q) const
    requires std::is_same_v<T, float>
  {
    const float4 v = reinterpret_cast<const float4*>(a)[q];
    reinterpret_cast<float4*>(y)[q] = float4{math::gelu(v.x), math::gelu(v.y), math::gelu(v.z), math::gelu(v.w)};
  }
};

// Four floats rounded to bf16 (to nearest even) as a uint2, the low half the lower index.
__device__ __forceinline__ uint2 bf16x4(float a, float b, float c, float d) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
  uint2 w;
  std::memcpy(&w.x, &lo, 4);
  std::memcpy(&w.y, &hi, 4);
  return w;
}

// da (=/+=) dy * gelu'(a); Copy16 (float): da16 = bf16(da) as well, in the same pass.
template <class T, bool Copy16 = false>
struct gelu_backward_fn {
  static_assert(!Copy16 || std::is_same_v<T, float>, "gelu_backward_fn: a bf16 copy of float values only");
  static constexpr const char* profile_name = Copy16 ? "GELU backward (bf16 copy)" : "GELU backward";
  static constexpr const char* profile_name_vec4 =
      Copy16 ? "GELU backward (bf16 copy, float4)" : "GELU backward (float4)";
  const T* a;
  const T* dy;
  T* da;
  bool accumulate;
  __nv_bfloat16* da16 = nullptr;  // Copy16 only
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t i = lo; i < hi; ++i) {
      const T v = dy[i] * math::gelu_grad(a[i]), out = accumulate ? da[i] + v : v;
      da[i] = out;
      if constexpr (Copy16) da16[i] = __float2bfloat16_rn(out);
    }
  }
  bool vec4_ok() const
    requires std::is_same_v<T, float>
  {
    return ::dino::detail::aligned16(a) && ::dino::detail::aligned16(dy) && ::dino::detail::aligned16(da) &&
           (!Copy16 || (reinterpret_cast<std::uintptr_t>(da16) & 7u) == 0);
  }
  __device__ void vec4(std::int64_t q) const
    requires std::is_same_v<T, float>
  {
    const float4 x = reinterpret_cast<const float4*>(a)[q], g = reinterpret_cast<const float4*>(dy)[q];
    float4 v{g.x * math::gelu_grad(x.x), g.y * math::gelu_grad(x.y), g.z * math::gelu_grad(x.z),
             g.w * math::gelu_grad(x.w)};
    if (accumulate) {
      const float4 o = reinterpret_cast<const float4*>(da)[q];
      v = float4{o.x + v.x, o.y + v.y, o.z + v.z, o.w + v.w};
    }
    reinterpret_cast<float4*>(da)[q] = v;
    if constexpr (Copy16) reinterpret_cast<uint2*>(da16)[q] = bf16x4(v.x, v.y, v.z, v.w);
  }
};

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // every lane holds the same sum (the butterfly adds in the same order on each)
}

inline constexpr int ln_warps = 8;  // rows per block of 256 threads

// Y: the output's type, T or __nv_bfloat16 (rounded to nearest even as it is stored:
// layer_norm_rows_bf16 in bf16_operands.cuh).
template <class T, class Y = T>
__global__ void layer_norm_rows_kernel(const T* x, const T* w, const T* b, Y* y, T* stats, std::int64_t rows, int D,
                                       T eps) {
  const std::int64_t r = std::int64_t(blockIdx.x) * ln_warps + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (r >= rows) return;  // the whole warp leaves together
  const T* xr = x + r * D;
  Y* yr = y + r * D;
  double s = 0;
  for (int i = lane; i < D; i += 32) s += static_cast<double>(xr[i]);
  const double mean = warp_sum(s) / D;
  double v = 0;
  for (int i = lane; i < D; i += 32) {
    const double c = static_cast<double>(xr[i]) - mean;
    v += c * c;
  }
  const double var = warp_sum(v) / D;
  const T m = static_cast<T>(mean);
  const T rstd = static_cast<T>(1.0 / sqrt(var + static_cast<double>(eps)));
  for (int i = lane; i < D; i += 32) {
    const T v = (xr[i] - m) * rstd * (w ? w[i] : T(1)) + (b ? b[i] : T(0));
    if constexpr (std::is_same_v<Y, T>) yr[i] = v;
    else yr[i] = __float2bfloat16_rn(static_cast<float>(v));
  }
  if (stats && lane == 0) {
    stats[2 * r] = m;
    stats[2 * r + 1] = rstd;
  }
}

template <class T>
__global__ void layer_norm_rows_backward_kernel(const T* x, const T* w, const T* dy, const T* stats, T* dx,
                                                std::int64_t rows, int D, bool accumulate) {
  const std::int64_t r = std::int64_t(blockIdx.x) * ln_warps + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (r >= rows) return;
  const T* xr = x + r * D;
  const T* dr = dy + r * D;
  T* out = dx + r * D;
  const T mean = stats[2 * r], rstd = stats[2 * r + 1];
  double sg = 0, sgx = 0;
  for (int i = lane; i < D; i += 32) {
    const T g = dr[i] * (w ? w[i] : T(1));
    const T xh = (xr[i] - mean) * rstd;
    sg += static_cast<double>(g);
    sgx += static_cast<double>(g) * static_cast<double>(xh);
  }
  const T mg = static_cast<T>(warp_sum(sg) / D), mgx = static_cast<T>(warp_sum(sgx) / D);
  for (int i = lane; i < D; i += 32) {
    const T g = dr[i] * (w ? w[i] : T(1));
    const T xh = (xr[i] - mean) * rstd;
    const T v = rstd * (g - mg - xh * mgx);
    out[i] = accumulate ? out[i] + v : v;
  }
}

// blockDim (32, 8), grid (column blocks, row chunks): column blockIdx.x * 32 + threadIdx.x,
// rows of chunk blockIdx.y (split_rows) threadIdx.y, +8, ... With one chunk it adds to gw and
// gb; else it writes the chunk's partial sums to part[y * D + c] (w) and
// part[(chunks + y) * D + c] (b), which sum_chunks then adds in chunk order.
template <class T>
__global__ void layer_norm_param_grads_kernel(const T* x, const T* dy, const T* stats, std::int64_t rows,
                                              std::int64_t D, std::int64_t per, T* gw, T* gb, double* part) {
  __shared__ double pw[8][33], pb[8][33];
  const std::int64_t c = std::int64_t(blockIdx.x) * 32 + threadIdx.x;
  const std::int64_t r0 = std::int64_t(blockIdx.y) * per, r1 = r0 + per < rows ? r0 + per : rows;
  double aw = 0, ab = 0;
  if (c < D)
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      const double d = static_cast<double>(dy[r * D + c]);
      const double xh = (static_cast<double>(x[r * D + c]) - static_cast<double>(stats[2 * r])) *
                        static_cast<double>(stats[2 * r + 1]);
      aw += d * xh;
      ab += d;
    }
  pw[threadIdx.y][threadIdx.x] = aw;
  pb[threadIdx.y][threadIdx.x] = ab;
  __syncthreads();
  if (threadIdx.y == 0 && c < D) {
    double sw = 0, sb = 0;
    for (int g = 0; g < 8; ++g) {
      sw += pw[g][threadIdx.x];
      sb += pb[g][threadIdx.x];
    }
    if (part) {
      part[std::int64_t(blockIdx.y) * D + c] = sw;
      part[(std::int64_t(gridDim.y) + blockIdx.y) * D + c] = sb;
    } else {
      gw[c] = static_cast<T>(gw[c] + sw);
      gb[c] = static_cast<T>(gb[c] + sb);
    }
  }
}

inline unsigned ln_blocks(std::int64_t rows) { return static_cast<unsigned>((rows + ln_warps - 1) / ln_warps); }

}  // namespace detail

template <class T>
inline void broadcast_rows(const cuda_policy& pol, const T* b, T* y, std::int64_t rows, std::int64_t cols) {
  if (rows <= 0 || cols <= 0) return;
  for_each_chunk(pol, rows * cols, detail::broadcast_rows_fn<T>{b, y, cols});
}

template <class T>
inline void copy_elements(const cuda_policy& pol, const T* src, T* dst, std::int64_t n) {
  if (n > 0) copy_on_device(pol.stream, dst, src, static_cast<std::size_t>(n));
}

/// y = gelu(a) over n elements; y may alias a.
template <class T>
inline void gelu_apply(const cuda_policy& pol, const T* a, T* y, std::int64_t n) {
  for_each_chunk(pol, n, detail::gelu_fn<T>{a, y});
}

/// da (=|+=) dy * gelu'(a) over n elements; da may alias dy.
template <class T>
inline void gelu_backward_apply(const cuda_policy& pol, const T* a, const T* dy, T* da, std::int64_t n, bool accumulate) {
  for_each_chunk(pol, n, detail::gelu_backward_fn<T>{a, dy, da, accumulate});
}

template <class T>
inline void layer_norm_rows(const cuda_policy& pol, const T* x, const T* w, const T* b, T* y, T* stats,
                            std::int64_t rows, std::int64_t D, T eps) {
  if (rows <= 0) return;
  detail::layer_norm_rows_kernel<<<detail::ln_blocks(rows), 32 * detail::ln_warps, 0, pol.stream>>>(
      x, w, b, y, stats, rows, static_cast<int>(D), eps);
  DINO_CUDA_LAUNCHED("layer_norm_rows");
}

template <class T>
inline void layer_norm_rows_backward(const cuda_policy& pol, const T* x, const T* w, const T* dy, const T* stats, T* dx,
                                     std::int64_t rows, std::int64_t D, bool accumulate) {
  if (rows <= 0) return;
  detail::layer_norm_rows_backward_kernel<<<detail::ln_blocks(rows), 32 * detail::ln_warps, 0, pol.stream>>>(
      x, w, dy, stats, dx, rows, static_cast<int>(D), accumulate);
  DINO_CUDA_LAUNCHED("layer_norm_rows_backward");
}

template <class T>
inline void layer_norm_param_grads(const cuda_policy& pol, const T* x, const T* dy, const T* stats, std::int64_t rows,
                                   std::int64_t D, T* gw, T* gb) {
  if (D <= 0) return;
  const detail::row_split sp = detail::split_rows(pol, rows, D, 2);
  double* part = sp.chunks > 1 ? static_cast<double*>(pol.scratch) : nullptr;
  const dim3 grid(static_cast<unsigned>((D + 31) / 32), static_cast<unsigned>(sp.chunks));
  detail::layer_norm_param_grads_kernel<<<grid, dim3(32, 8), 0, pol.stream>>>(x, dy, stats, rows, D, sp.per, gw, gb,
                                                                             part);
  DINO_CUDA_LAUNCHED("layer_norm_param_grads");
  if (part) {
    detail::sum_chunks(pol, static_cast<const double*>(part), sp.chunks, D, gw, true);
    detail::sum_chunks(pol, static_cast<const double*>(part + sp.chunks * D), sp.chunks, D, gb, true);
  }
}

/// A device copy of `bytes` host bytes in one counted allocation, shared by its owners.
/// Set-up only: the copy is synchronous with respect to the host.
inline std::shared_ptr<void> upload_shared(const cuda_policy& pol, const void* host, std::size_t bytes,
                                           const char* what) {
  void* d = device_allocate(bytes, what);
  std::shared_ptr<void> owner(d, [](void* p) { device_free(p); });
  if (bytes) {
    DINO_CUDA_CHECK(cudaMemcpyAsync(d, host, bytes, cudaMemcpyHostToDevice, pol.stream));
    DINO_CUDA_CHECK(cudaStreamSynchronize(pol.stream));
  }
  return owner;
}

}  // namespace dino::cuda

namespace dino {
using cuda::broadcast_rows;
using cuda::copy_elements;
using cuda::gelu_apply;
using cuda::gelu_backward_apply;
using cuda::layer_norm_param_grads;
using cuda::layer_norm_rows;
using cuda::layer_norm_rows_backward;
using cuda::upload_shared;
}  // namespace dino
