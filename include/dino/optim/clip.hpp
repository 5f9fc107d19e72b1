// dino/optim/clip.hpp: the reference's gradient clipping, per parameter tensor (dino-spec §4.6).
//
// For each trainable tensor: n = ||grad||_2; if clip / (n + 1e-6) < 1, grad *= clip / (n + 1e-6).
// This is utils.clip_gradients, not torch's global-norm clipping. Norms are summed in double
// over fixed blocks in a fixed order, so they do not depend on the thread count.
//
// Policy: on the CPU, l2_norm (below) and a parallel scale per tensor; on the GPU,
// clip_tensors (policy/cuda/optim.cuh): a block per tensor sums its squares in double,
// decides and scales, with the count of clipped tensors kept in device memory. The form
// returning the count reads it back (on the GPU: one synchronisation); the form taking an
// int* leaves it there (device memory on the GPU) and reads nothing back.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "dino/core/param_store.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::optim {

/// The L2 norm of x[0, n), deterministic whatever the thread count.
template <class T>
inline double l2_norm(const cpu_policy& pol, const T* x, std::int64_t n) {
  constexpr std::int64_t block = 1 << 15;
  const std::int64_t nb = (n + block - 1) / block;
  if (nb <= 1) return std::sqrt(cpu::sum_squares(x, n));
  double partial[1024];
  std::vector<double> heap;
  double* part = partial;
  if (nb > 1024) {  // > 32 M elements: rare, allocate
    heap.resize(static_cast<std::size_t>(nb));
    part = heap.data();
  }
  for_each_row(pol, nb, [&](std::int64_t b) {
    const std::int64_t lo = b * block, hi = std::min(n, lo + block);
    part[b] = cpu::sum_squares(x + lo, hi - lo);
  });
  double s = 0;
  for (std::int64_t b = 0; b < nb; ++b) s += part[b];
  return std::sqrt(s);
}

namespace kernels {
template <class T>
inline int clip_host(const cpu_policy& pol, flat_params<T>& grads, double clip, unsigned skip) {
  int clipped = 0;
  for (const param_entry& e : grads.layout().entries()) {
    if (!e.trainable() || (e.flags & skip)) continue;
    T* g = grads.data() + e.offset;
    const std::int64_t n = static_cast<std::int64_t>(e.numel());
    const double norm = l2_norm(pol, g, n);
    const double coef = clip / (norm + 1e-6);
    if (coef < 1.0) {
      const T c = T(coef);
      for_each_chunk(pol, n, [&](std::int64_t lo, std::int64_t hi) {
        for (std::int64_t i = lo; i < hi; ++i) g[i] *= c;
      });
      ++clipped;
    }
  }
  return clipped;
}
}  // namespace kernels

/// Clips every trainable tensor whose flags do not intersect `skip`; returns how many were scaled.
template <class Policy, class T, class Space>
inline int clip_gradients(const Policy& pol, flat_params<T, Space>& grads, double clip, unsigned skip = param_none) {
  DINO_CHECK_SPACE(Policy, Space);
  if constexpr (!policy_traits<Policy>::is_host) {
    return clip_tensors(pol, grads.layout().entries(), grads.data(), clip, skip);
  } else {
    return kernels::clip_host(pol, grads, clip, skip);
  }
}

/// The same, leaving the count in the policy's memory: *clipped (a device int on the GPU)
/// receives the number of tensors scaled. Reads nothing back.
template <class Policy, class T, class Space>
inline void clip_gradients(const Policy& pol, flat_params<T, Space>& grads, double clip, unsigned skip,
                           int* clipped) {
  DINO_CHECK_SPACE(Policy, Space);
  if constexpr (!policy_traits<Policy>::is_host) {
    clip_tensors(pol, grads.layout().entries(), grads.data(), clip, skip, clipped);
  } else {
    *clipped = kernels::clip_host(pol, grads, clip, skip);
  }
}

}  // namespace dino::optim
