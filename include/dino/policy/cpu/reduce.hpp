// dino/policy/cpu/reduce.hpp: reductions for the CPU policy.
//
// Sums accumulate in double whatever T is, so that results do not drift with the length of
// the reduction (a center over 65,536 columns, a gradient norm over 2 M elements).
//
//   column_sums(pol, x, rows, cols, out, accumulate)   out[c] (=|+=) sum_r x[r, c]
//   sum_to(pol, x, n, divisor, out)                    *out.value (=|+=) out.weight * sum_i x[i] / divisor
//   all_finite(pol, x, n)                              no NaN or infinity in x[0, n)
// sum_to is the form a loss or an entropy takes when it stays in the policy's memory (a
// double in device memory on the GPU, so that a step reads nothing back until it logs).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dino/policy/cpu/gemm.hpp"
#include "dino/policy/cpu/parallel.hpp"
#include "dino/policy/cpu/simd.hpp"

namespace dino {

/// A scalar result left in the policy's memory space (host memory for cpu_policy, device
/// memory for cuda_policy): *value = weight * result, or *value += weight * result.
struct scalar_out {
  double* value = nullptr;
  double weight = 1.0;
  bool accumulate = false;
};

/// Where the host reads results that steps leave in a memory space (ssl::method's step
/// results): nothing on the host, where they are read as they are made. policy/cuda/memory.cuh
/// specialises it for device memory: a pinned host mirror and an event per slot, so that a
/// read waits for its own step and not for the steps queued after it.
template <class Space>
struct readback_ring_for {
  struct type {};
};

/// A captured sequence of a memory space's work replayed as one launch (ssl::method's step
/// graphs): nothing on the host. policy/cuda/graph.cuh specialises it for device memory.
template <class Space>
struct stream_graph_for {
  struct type {};
};

}  // namespace dino

namespace dino::cpu {

namespace detail {
/// out[c] (=|+=) sum_r x[r cols + c] for c in [c0, c1): 32 columns at a time, their sums in
/// registers (double), rows in order.
template <class T, class U>
[[gnu::always_inline]] inline void column_block_sums(const T* x, std::int64_t rows, std::int64_t cols, std::int64_t c0,
                                                     std::int64_t c1, U* out, bool accumulate) {
  constexpr std::int64_t W = 32;
  std::int64_t c = c0;
  for (; c + W <= c1; c += W) {
    double acc[W] = {};
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols + c;
      for (std::int64_t j = 0; j < W; ++j) acc[j] += static_cast<double>(xr[j]);
    }
    for (std::int64_t j = 0; j < W; ++j)
      out[c + j] = accumulate ? static_cast<U>(out[c + j] + acc[j]) : static_cast<U>(acc[j]);
  }
  if (c < c1) {
    double acc[W] = {};
    const std::int64_t w = c1 - c;
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols + c;
      for (std::int64_t j = 0; j < w; ++j) acc[j] += static_cast<double>(xr[j]);
    }
    for (std::int64_t j = 0; j < w; ++j)
      out[c + j] = accumulate ? static_cast<U>(out[c + j] + acc[j]) : static_cast<U>(acc[j]);
  }
}
#if DINO_GEMM_X86
template <class T, class U>
DINO_SIMD_AVX512 void column_block_sums_avx512(const T* x, std::int64_t rows, std::int64_t cols, std::int64_t c0,
                                               std::int64_t c1, U* out, bool accumulate) {
  column_block_sums(x, rows, cols, c0, c1, out, accumulate);
}
#endif
}  // namespace detail

/// out[c] (=|+=) sum over r of x[r * cols + c], for a [rows, cols] row-major matrix.
template <class T, class U>
inline void column_sums(const cpu_policy& pol, const T* x, std::int64_t rows, std::int64_t cols, U* out,
                        bool accumulate) {
  // Parallel over column blocks: each thread reads rows of its block, so the sum order over
  // rows is fixed and the result does not depend on the thread count (nor on the block
  // width, nor on the SIMD level: each column is one chain of double adds). Blocks of 32 to
  // 256 columns, about 4 per thread, so that a narrow matrix (a ViT's D = 192 bias
  // gradients) still splits over the threads.
  const std::int64_t threads = std::max(1, pol.threads);
  const std::int64_t block = std::clamp<std::int64_t>((cols / (4 * threads) + 31) / 32 * 32, 32, 256);
  const std::int64_t nblocks = (cols + block - 1) / block;
#if DINO_GEMM_X86
  const bool wide = simd_avx512();
#endif
  for_each_row(pol, nblocks, [&](std::int64_t bi) {
    const std::int64_t c0 = bi * block, c1 = std::min(cols, c0 + block);
#if DINO_GEMM_X86
    if (wide) return detail::column_block_sums_avx512(x, rows, cols, c0, c1, out, accumulate);
#endif
    detail::column_block_sums(x, rows, cols, c0, c1, out, accumulate);
  });
}

/// Sum of squares of x[0, n), in double.
template <class T>
inline double sum_squares(const T* x, std::int64_t n) {
  double s = 0.0;
  for (std::int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return s;
}

/// *out.value (=|+=) out.weight * (sum_i x[i] / divisor), the sum in double in index order.
template <class T>
inline void sum_to(const cpu_policy&, const T* x, std::int64_t n, double divisor, scalar_out out) {
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += double(x[i]);
  const double v = out.weight * (s / divisor);
  *out.value = out.accumulate ? *out.value + v : v;
}

/// The first non-finite element of x[0, n): its index (-1 when there is none) and value.
struct non_finite_at {
  std::int64_t index = -1;
  double value = 0;
};
template <class T>
inline non_finite_at first_non_finite(const cpu_policy&, const T* x, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return {i, double(x[i])};
  return {};
}

/// True when every element of x[0, n) is finite.
template <class T>
inline bool all_finite(const cpu_policy& pol, const T* x, std::int64_t n) {
  int bad = 0;
  for_each_chunk(pol, n, [&](std::int64_t b, std::int64_t e) {
    int local = 0;
    for (std::int64_t i = b; i < e; ++i) local |= !std::isfinite(x[i]);
    if (local) {
#if defined(_OPENMP)
#pragma omp atomic write
#endif
      bad = 1;
    }
  });
  return bad == 0;
}

}  // namespace dino::cpu

namespace dino {
// The CPU policy's customisation points: ADL finds these from cpu_policy arguments.
using cpu::all_finite;
using cpu::column_sums;
using cpu::first_non_finite;
using cpu::non_finite_at;
using cpu::sum_to;
using cpu::for_each_chunk;
using cpu::for_each_row;
using cpu::for_each_row_cyclic;
using cpu::gemm;
using cpu::gemm_desc;
using cpu::linear_bf16_copies;
}  // namespace dino
