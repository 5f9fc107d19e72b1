// dino/policy/cuda/optim.cuh: the optimizer passes of the CUDA policy, twins of the CPU
// loops of optim/adamw.hpp and optim/clip.hpp.
//
//   adamw_tensors(pol, entries, coeffs, p, g, m, v)
//       the AdamW update of every tensor whose coeffs[j].active is set (coefficients computed
//       on the host by optim::adamw); tensors go 32 per launch, their offsets, sizes, first
//       block and coefficients passed by value in the launch, so no table lives in device
//       memory and nothing is copied or synchronised. 1024 elements per block of 256
//       threads; padding between tensors is not touched. The element arithmetic is the
//       CPU's, operation for operation, with round-to-nearest intrinsics (no FMA
//       contraction), so fp32 results equal the CPU's scalar/SSE2 kernel.
//   clip_tensors(pol, entries, g, clip, skip[, clipped])
//       utils.clip_gradients per tensor: a block per tensor (128 per launch) sums the squares
//       of its gradient in double (CUB, fixed order), computes clip / (norm + 1e-6) and scales
//       the tensor when that is below 1; the number of scaled tensors is counted in device
//       memory (pol.flags[1] for the form that returns it, which synchronises).
//   optim::l2_norm(pol, x, n)          the norm returned to the host (synchronises)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <cub/cub.cuh>

#include "dino/core/param_store.hpp"
#include "dino/policy/cpu/adamw_kernel.hpp"
#include "dino/policy/cuda/loss.cuh"
#include "dino/policy/cuda/parallel.cuh"
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

namespace optim_kernels {

__device__ __forceinline__ float rn_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double rn_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float rn_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double rn_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float rn_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double rn_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float rn_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double rn_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float rn_sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double rn_sqrt(double a) { return __dsqrt_rn(a); }

inline constexpr int adamw_threads = 256;
inline constexpr int adamw_per_thread = 4;
inline constexpr std::int64_t adamw_block_elems = adamw_threads * adamw_per_thread;

template <class T>
struct adamw_batch {
  static constexpr int capacity = 32;
  std::int64_t begin[capacity];
  std::int64_t end[capacity];
  std::int64_t first_block[capacity + 1];  // [count] = blocks of the launch
  cpu::adamw_coeffs<T> k[capacity];
  int count;
};
static_assert(sizeof(adamw_batch<double>) <= 4000, "adamw_batch must fit the 4 KiB of kernel parameters");

template <class T>
__global__ void __launch_bounds__(adamw_threads) adamw_kernel(const adamw_batch<T> bt, T* p, const T* g, T* m, T* v) {
  const std::int64_t blk = blockIdx.x;
  int j = 0;
  while (j + 1 < bt.count && bt.first_block[j + 1] <= blk) ++j;
  const std::int64_t base = bt.begin[j] + (blk - bt.first_block[j]) * adamw_block_elems;
  const std::int64_t end = bt.end[j];
  const cpu::adamw_coeffs<T> k = bt.k[j];
#pragma unroll
  for (int u = 0; u < adamw_per_thread; ++u) {
    const std::int64_t i = base + u * adamw_threads + threadIdx.x;
    if (i >= end) break;
    // As cpu::adamw_update, one rounding per operation:
    // p <- p decay; m <- b1 m + c1 g; v <- b2 v + c2 g g; p <- p - step_size m / (sqrt(v) / bc2_sqrt + eps)
    const T gi = g[i];
    const T pi = rn_mul(p[i], k.decay);
    const T mi = rn_add(rn_mul(m[i], k.b1), rn_mul(k.c1, gi));
    const T vi = rn_add(rn_mul(v[i], k.b2), rn_mul(rn_mul(k.c2, gi), gi));
    m[i] = mi;
    v[i] = vi;
    const T den = rn_add(rn_div(rn_sqrt(vi), k.bc2_sqrt), k.eps);
    p[i] = rn_sub(pi, rn_mul(k.step_size, rn_div(mi, den)));
  }
}

struct clip_batch {
  static constexpr int capacity = 128;
  std::int64_t offset[capacity];
  std::int64_t numel[capacity];
  int count;
};

inline constexpr int clip_threads = 1024;

template <class T>
__global__ void __launch_bounds__(clip_threads) clip_kernel(const clip_batch bt, T* g, double clip, int* clipped) {
  __shared__ typename cub::BlockReduce<double, clip_threads>::TempStorage tmp;
  __shared__ double coef_shared;
  T* x = g + bt.offset[blockIdx.x];
  const std::int64_t n = bt.numel[blockIdx.x];
  double acc = 0;
  for (std::int64_t i = threadIdx.x; i < n; i += clip_threads) {
    const double xi = double(x[i]);
    acc += xi * xi;
  }
  const double total = cub::BlockReduce<double, clip_threads>(tmp).Sum(acc);
  if (threadIdx.x == 0) {
    const double coef = clip / (::sqrt(total) + 1e-6);
    coef_shared = coef;
    if (coef < 1.0) atomicAdd(clipped, 1);
  }
  __syncthreads();
  const double coef = coef_shared;
  if (coef < 1.0) {
    const T c = T(coef);
    for (std::int64_t i = threadIdx.x; i < n; i += clip_threads) x[i] *= c;
  }
}

}  // namespace optim_kernels

/// AdamW over the active tensors of a flat buffer (see the file comment); no synchronisation.
template <class T>
inline void adamw_tensors(const cuda_policy& pol, const std::vector<param_entry>& entries,
                          const std::vector<cpu::adamw_coeffs<T>>& coeffs, T* p, const T* g, T* m, T* v) {
  require<shape_error>(coeffs.size() == entries.size(), "adamw_tensors: ", coeffs.size(), " coefficient sets for ",
                       entries.size(), " tensors");
  optim_kernels::adamw_batch<T> bt{};
  std::int64_t blocks = 0;
  auto flush = [&] {
    if (bt.count == 0) return;
    bt.first_block[bt.count] = blocks;
    require<shape_error>(blocks <= 0x7fffffffLL, "adamw_tensors: too many blocks (", blocks, ")");
    optim_kernels::adamw_kernel<T><<<unsigned(blocks), optim_kernels::adamw_threads, 0, pol.stream>>>(bt, p, g, m, v);
    DINO_CUDA_LAUNCHED("adamw_tensors");
    bt.count = 0;
    blocks = 0;
  };
  for (std::size_t j = 0; j < entries.size(); ++j) {
    if (!coeffs[j].active || entries[j].numel() == 0) continue;
    const int c = bt.count;
    bt.begin[c] = std::int64_t(entries[j].offset);
    bt.end[c] = std::int64_t(entries[j].offset + entries[j].numel());
    bt.first_block[c] = blocks;
    bt.k[c] = coeffs[j];
    blocks += (std::int64_t(entries[j].numel()) + optim_kernels::adamw_block_elems - 1) / optim_kernels::adamw_block_elems;
    if (++bt.count == optim_kernels::adamw_batch<T>::capacity) flush();
  }
  flush();
}

/// Per-tensor clipping of the trainable tensors not in `skip`; *clipped (device int) receives
/// the number of tensors scaled. No synchronisation.
template <class T>
inline void clip_tensors(const cuda_policy& pol, const std::vector<param_entry>& entries, T* g, double clip,
                         unsigned skip, int* clipped) {
  DINO_CUDA_CHECK(cudaMemsetAsync(clipped, 0, sizeof(int), pol.stream));
  optim_kernels::clip_batch bt{};
  auto flush = [&] {
    if (bt.count == 0) return;
    optim_kernels::clip_kernel<T><<<unsigned(bt.count), optim_kernels::clip_threads, 0, pol.stream>>>(bt, g, clip, clipped);
    DINO_CUDA_LAUNCHED("clip_tensors");
    bt.count = 0;
  };
  for (const param_entry& e : entries) {
    if (!e.trainable() || (e.flags & skip) || e.numel() == 0) continue;
    bt.offset[bt.count] = std::int64_t(e.offset);
    bt.numel[bt.count] = std::int64_t(e.numel());
    if (++bt.count == optim_kernels::clip_batch::capacity) flush();
  }
  flush();
}

/// The same, returning the count: synchronises the stream (pol.flags[1]).
template <class T>
inline int clip_tensors(const cuda_policy& pol, const std::vector<param_entry>& entries, T* g, double clip,
                        unsigned skip) {
  loss_kernels::require_flags(pol, "clip_tensors");
  clip_tensors(pol, entries, g, clip, skip, pol.flags + 1);
  DINO_CUDA_CHECK(cudaMemcpyAsync(pol.host_flags + 1, pol.flags + 1, sizeof(int), cudaMemcpyDeviceToHost, pol.stream));
  DINO_CUDA_CHECK(cudaStreamSynchronize(pol.stream));
  return pol.host_flags[1];
}

}  // namespace dino::cuda

namespace dino {
using cuda::adamw_tensors;
using cuda::clip_tensors;
}  // namespace dino

namespace dino::optim {
/// The L2 norm of x[0, n) (device memory), summed in double; returned to the host (synchronises).
template <class T>
inline double l2_norm(const cuda_policy& pol, const T* x, std::int64_t n) {
  return std::sqrt(sum_squares_to_host(pol, x, n));
}
}  // namespace dino::optim
