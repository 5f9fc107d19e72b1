// dino/policy/cuda/parallel.cuh: the row and element runners of the CUDA policy.
//
// The same calls as policy/cpu/parallel.hpp, over functors written once in math/ or in a
// module (DINO_HD, captured by value: the functor is copied to the kernel's parameters, so
// it holds device pointers and sizes, never references to host objects).
//   for_each_row(pol, rows, f)        f(r) for every r in [0, rows): one thread per row
//   for_each_row_cyclic(pol, rows, f) the same (the CPU's dealing order does not matter here)
//   for_each_chunk(pol, n, f)         f(b, e) over ranges covering [0, n), one element per
//                                     range, consecutive threads on consecutive elements;
//                                     or f.vec4(q) over the quads [4q, 4q + 4) when f has
//                                     that float4 form and f.vec4_ok() allows it (below)
// A functor may name itself for cuda::op_profile (static constexpr const char* profile_name,
// and profile_name_vec4 for its float4 form); unnamed ones show as the runner.
// Kernels go to pol.stream and return at once (no synchronisation). Row functors that
// would gain from a warp or block per row (LayerNorm, softmax over K) have their own kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "dino/config.hpp"
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

namespace detail {
inline constexpr int threads_per_block = 256;

template <class F>
__global__ void rows_kernel(std::int64_t rows, F f) {
  for (std::int64_t r = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += std::int64_t(blockDim.x) * gridDim.x)
    f(r);
}
template <class F>
__global__ void chunks_kernel(std::int64_t n, std::int64_t per, F f) {
  const std::int64_t chunks = (n + per - 1) / per;
  for (std::int64_t c = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += std::int64_t(blockDim.x) * gridDim.x) {
    const std::int64_t b = c * per;
    f(b, b + per < n ? b + per : n);
  }
}
template <class F>
__global__ void quads_kernel(std::int64_t quads, F f) {
  for (std::int64_t q = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < quads;
       q += std::int64_t(blockDim.x) * gridDim.x)
    f.vec4(q);
}
// The name a cuda::op_profile shows for a runner's launch: the functor's profile_name (or,
// for its float4 form, profile_name_vec4) when it has one, else the runner's.
template <class F>
constexpr const char* op_name(const char* runner) {
  if constexpr (requires { F::profile_name; }) return F::profile_name;
  else return runner;
}
template <class F>
constexpr const char* op_name_vec4(const char* runner) {
  if constexpr (requires { F::profile_name_vec4; }) return F::profile_name_vec4;
  else return runner;
}
inline unsigned grid_for(std::int64_t work, int block = threads_per_block) {
  const std::int64_t g = (work + block - 1) / block;
  return static_cast<unsigned>(std::clamp<std::int64_t>(g, 1, 65535LL * 16));
}
}  // namespace detail

template <class F>
inline void for_each_row(const cuda_policy& pol, std::int64_t rows, F f) {
  if (rows <= 0) return;
  detail::rows_kernel<<<detail::grid_for(rows), detail::threads_per_block, 0, pol.stream>>>(rows, f);
  DINO_CUDA_LAUNCHED(detail::op_name<F>("for_each_row"));
}
template <class F>
inline void for_each_row_cyclic(const cuda_policy& pol, std::int64_t rows, F f) {
  for_each_row(pol, rows, f);
}
/// Ranges of one element: consecutive threads of a warp touch consecutive elements, so every
/// load and store of an element-wise functor is coalesced (ranges of 4 made each warp
/// instruction span four times the cache lines it used).
/// A functor with a float4 form, vec4(q) for the elements [4q, 4q + 4) with 16-byte loads and
/// stores, and vec4_ok() (host: this call's pointers are 16-byte aligned and its shape keeps
/// each quad inside one row) runs that instead when n is a multiple of 4: a thread then keeps
/// four times the bytes in flight. The element-wise passes of a training step are bound by
/// memory, and one 4-byte load per thread left them at about 40 % of the H100's bandwidth.
/// Both forms compute each element with the same expression, so the results are the same.
template <class F>
inline void for_each_chunk(const cuda_policy& pol, std::int64_t n, F f) {
  if (n <= 0) return;
  if constexpr (requires { f.vec4(std::int64_t(0)); f.vec4_ok(); }) {
    if (n % 4 == 0 && f.vec4_ok()) {
      const std::int64_t quads = n / 4;
      detail::quads_kernel<<<detail::grid_for(quads), detail::threads_per_block, 0, pol.stream>>>(quads, f);
      DINO_CUDA_LAUNCHED(detail::op_name_vec4<F>("for_each_chunk (float4)"));
      return;
    }
  }
  constexpr std::int64_t per = 1;
  detail::chunks_kernel<<<detail::grid_for((n + per - 1) / per), detail::threads_per_block, 0, pol.stream>>>(n, per, f);
  DINO_CUDA_LAUNCHED(detail::op_name<F>("for_each_chunk"));
}

}  // namespace dino::cuda

namespace dino {
using cuda::for_each_chunk;
using cuda::for_each_row;
using cuda::for_each_row_cyclic;
}  // namespace dino
