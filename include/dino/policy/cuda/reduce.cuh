// dino/policy/cuda/reduce.cuh: reductions for the CUDA policy, twins of policy/cpu/reduce.hpp.
//
// Sums accumulate in double whatever T is, as on the CPU. column_sums runs one block per 32
// columns, 8 row groups reading coalesced rows, combined in shared memory in a fixed order,
// so results do not depend on the launch. flag_non_finite leaves its answer in device
// memory (the form a step uses: the skip decision stays on the device); all_finite returns
// a bool to the host and therefore waits for the stream (a counted cuda::host_wait).
#pragma once

#include <cstdint>

#include "dino/policy/cuda/parallel.cuh"
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

namespace detail {
template <class T, class U>
__global__ void column_sums_kernel(const T* x, std::int64_t rows, std::int64_t cols, U* out, bool accumulate) {
  __shared__ double part[8][33];
  const std::int64_t c = std::int64_t(blockIdx.x) * 32 + threadIdx.x;
  double acc = 0.0;
  if (c < cols)
    for (std::int64_t r = threadIdx.y; r < rows; r += 8) acc += static_cast<double>(x[r * cols + c]);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    double s = 0.0;
    for (int g = 0; g < 8; ++g) s += part[g][threadIdx.x];
    out[c] = accumulate ? static_cast<U>(out[c] + s) : static_cast<U>(s);
  }
}
template <class T>
__global__ void non_finite_kernel(const T* x, std::int64_t n, int* flag) {
  int bad = 0;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(blockDim.x) * gridDim.x)
    bad |= !isfinite(x[i]);
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(flag, 1);
}
}  // namespace detail

/// out[c] (=|+=) sum over r of x[r * cols + c], for a [rows, cols] row-major matrix.
template <class T, class U>
inline void column_sums(const cuda_policy& pol, const T* x, std::int64_t rows, std::int64_t cols, U* out,
                        bool accumulate) {
  if (cols <= 0) return;
  const unsigned blocks = static_cast<unsigned>((cols + 31) / 32);
  detail::column_sums_kernel<<<blocks, dim3(32, 8), 0, pol.stream>>>(x, rows, cols, out, accumulate);
  DINO_CUDA_LAUNCHED("column_sums");
}

/// Sets *flag (device int) to 1 when x[0, n) holds a NaN or an infinity; never clears it.
template <class T>
inline void flag_non_finite(const cuda_policy& pol, const T* x, std::int64_t n, int* flag) {
  if (n <= 0) return;
  detail::non_finite_kernel<<<std::min(detail::grid_for(n), 1024u), detail::threads_per_block, 0, pol.stream>>>(
      x, n, flag);
  DINO_CUDA_LAUNCHED("flag_non_finite");
}

/// True when every element of x[0, n) is finite. Synchronises the stream (the answer goes
/// to the host); uses pol.flags[0].
template <class T>
inline bool all_finite(const cuda_policy& pol, const T* x, std::int64_t n) {
  require<config_error>(pol.flags != nullptr && pol.host_flags != nullptr,
                        "all_finite: the cuda_policy has no flags (make policies with cuda::context::policy())");
  DINO_CUDA_CHECK(cudaMemsetAsync(pol.flags, 0, sizeof(int), pol.stream));
  flag_non_finite(pol, x, n, pol.flags);
  DINO_CUDA_CHECK(cudaMemcpyAsync(pol.host_flags, pol.flags, sizeof(int), cudaMemcpyDeviceToHost, pol.stream));
  host_wait(pol, "all_finite");
  return pol.host_flags[0] == 0;
}

}  // namespace dino::cuda

namespace dino {
using cuda::all_finite;
using cuda::column_sums;
using cuda::flag_non_finite;
}  // namespace dino
