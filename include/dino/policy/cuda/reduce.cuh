// dino/policy/cuda/reduce.cuh: reductions for the CUDA policy, twins of policy/cpu/reduce.hpp.
//
// Sums accumulate in double whatever T is, as on the CPU. column_sums splits the rows into
// chunks of row_chunk_rows (more when the partial sums would not fit pol.scratch): a block per
// 32 columns and chunk, 8 row groups reading coalesced rows, combined in shared memory in a
// fixed order; a second kernel adds the chunks' partial sums (double, in pol.scratch) in
// chunk order. The split depends on the sizes and the scratch size only, never on the
// device, so results are reproducible. flag_non_finite leaves its answer in device
// memory (the form a step uses: the skip decision stays on the device); all_finite returns
// a bool to the host and therefore waits for the stream (a counted cuda::host_wait).
#pragma once

#include <algorithm>
#include <cstdint>

#include "dino/policy/cuda/parallel.cuh"
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

namespace detail {
/// How a [rows, cols] reduction over rows is split: `chunks` chunks of `per` rows (the last
/// may be shorter), with `values` doubles of partial sums per column and chunk in scratch.
struct row_split {
  std::int64_t chunks = 1, per = 0;
};
inline constexpr std::int64_t row_chunk_rows = 256;
inline row_split split_rows(const cuda_policy& pol, std::int64_t rows, std::int64_t cols, int values) {
  row_split s{1, rows};
  if (!pol.scratch || rows <= row_chunk_rows || cols <= 0) return s;
  const std::int64_t fit = static_cast<std::int64_t>(pol.scratch_bytes / (sizeof(double) * std::size_t(values) *
                                                                          static_cast<std::size_t>(cols)));
  s.chunks = std::min((rows + row_chunk_rows - 1) / row_chunk_rows, fit);
  s.chunks = std::min<std::int64_t>(s.chunks, 65535);  // gridDim.y
  if (s.chunks <= 1) return row_split{1, rows};
  s.per = (rows + s.chunks - 1) / s.chunks;
  s.chunks = (rows + s.per - 1) / s.per;
  return s;
}

// blockDim (32, 8), grid (column blocks, chunks). Chunk blockIdx.y sums rows
// [y * per, min((y + 1) * per, rows)); with one chunk it writes out (=|+=) directly, else
// its partial sums to part[y * cols + c].
template <class T, class U>
__global__ void column_sums_kernel(const T* x, std::int64_t rows, std::int64_t cols, std::int64_t per, U* out,
                                   double* part_out, bool accumulate) {
  __shared__ double part[8][33];
  const std::int64_t c = std::int64_t(blockIdx.x) * 32 + threadIdx.x;
  const std::int64_t r0 = std::int64_t(blockIdx.y) * per, r1 = r0 + per < rows ? r0 + per : rows;
  double acc = 0.0;
  if (c < cols)
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += 8) acc += static_cast<double>(x[r * cols + c]);
  part[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    double s = 0.0;
    for (int g = 0; g < 8; ++g) s += part[g][threadIdx.x];
    if (part_out) part_out[std::int64_t(blockIdx.y) * cols + c] = s;
    else out[c] = accumulate ? static_cast<U>(out[c] + s) : static_cast<U>(s);
  }
}
// out[c] (=|+=) the sum of part[k * cols + c] over k in [0, chunks), in chunk order.
// A thread per column: few threads, so the loads of 8 chunks are issued before their adds
// (the unrolled loop), which keeps the order of the adds and hides the loads' latency.
template <class U>
__global__ void sum_chunks_kernel(const double* __restrict__ part, std::int64_t chunks, std::int64_t cols,
                                  U* __restrict__ out, bool accumulate) {
  const std::int64_t c = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double s = 0.0;
  std::int64_t k = 0;
  for (; k + 8 <= chunks; k += 8) {
    double v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = part[(k + j) * cols + c];
#pragma unroll
    for (int j = 0; j < 8; ++j) s += v[j];
  }
  for (; k < chunks; ++k) s += part[k * cols + c];
  out[c] = accumulate ? static_cast<U>(out[c] + s) : static_cast<U>(s);
}
template <class U>
inline void sum_chunks(const cuda_policy& pol, const double* part, std::int64_t chunks, std::int64_t cols, U* out,
                       bool accumulate) {
  sum_chunks_kernel<<<grid_for(cols), threads_per_block, 0, pol.stream>>>(part, chunks, cols, out, accumulate);
  DINO_CUDA_LAUNCHED("sum_chunks");
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
  const detail::row_split sp = detail::split_rows(pol, rows, cols, 1);
  double* part = sp.chunks > 1 ? static_cast<double*>(pol.scratch) : nullptr;
  const dim3 grid(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>(sp.chunks));
  detail::column_sums_kernel<<<grid, dim3(32, 8), 0, pol.stream>>>(x, rows, cols, sp.per, out, part, accumulate);
  DINO_CUDA_LAUNCHED("column_sums");
  if (part) detail::sum_chunks(pol, part, sp.chunks, cols, out, accumulate);
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
