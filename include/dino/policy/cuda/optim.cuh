// dino/policy/cuda/optim.cuh: the optimizer passes of the CUDA policy, twins of the CPU
// loops of optim/adamw.hpp and optim/clip.hpp.
//
//   adamw_tensors(pol, entries, coeffs, p, g, m, v[, device_steps])
//       the AdamW update of every tensor whose coeffs[j].active is set (coefficients computed
//       on the host by optim::adamw); tensors go 32 per launch, their offsets, sizes, first
//       block and coefficients passed by value in the launch, so no table lives in device
//       memory and nothing is copied or synchronised. 1024 elements per block of 256
//       threads; padding between tensors is not touched. The element arithmetic is the
//       CPU's, operation for operation, with round-to-nearest intrinsics (no FMA
//       contraction), so fp32 results equal the CPU's scalar/SSE2 kernel.
//       With device_steps (adamw_device_steps: the per-tensor step counts in device memory
//       and a skip flag, an int in device memory or null): when *skip is set the launch
//       changes nothing (counts included), so a step skipped for a non-finite loss is
//       decided on the device. Otherwise the kernel takes the host's coefficients when the
//       device count + 1 is the step the host assumed (every step but those after a skip
//       the host has not read yet), and else recomputes the two bias corrections from the
//       device count (lr / (1 - b1^t), sqrt(1 - b2^t), in double as on the host); a small
//       kernel then advances the counts. With lr_at and wd_at (device doubles: a step replayed
//       from a CUDA graph) every coefficient that depends on lr, wd or the count is computed
//       in the kernel from those and the device count, the host's coefficients ignored.
//   clip_tensors(pol, entries, g, clip, skip[, clipped])
//       utils.clip_gradients per tensor: a block per tensor (128 per launch) sums the squares
//       of its gradient in double (CUB, fixed order), computes clip / (norm + 1e-6) and scales
//       the tensor when that is below 1; the number of scaled tensors is counted in device
//       memory (pol.flags[1] for the form that returns it, which synchronises). A tensor of
//       more than clip_split_elems (a DINO head's last layer: 65,536 x 256) is split instead,
//       where pol.scratch holds its partial sums: a block per chunk of clip_chunk_elems sums
//       its squares, one block adds the chunks' sums in chunk order and sets the factor, and
//       a block per chunk scales. Both orders depend on the sizes only, never on the device.
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
  std::int64_t t_expected[capacity];       // the step count the host's coefficients are for
  int entry[capacity];                     // the tensor's index in the layout
  unsigned char decays[capacity];          // 1: weight decay applies (read with adamw_device_steps::lr_at)
  cpu::adamw_coeffs<T> k[capacity];
  int count;
};
/// What adamw_tensors needs to keep the step counts on the device (see the file comment).
struct adamw_device_steps {
  std::int64_t* steps = nullptr;  ///< per-tensor step counts, device memory (null: host counts only)
  const int* skip = nullptr;      ///< device int: nonzero skips the update (null: never)
  double lr = 0, beta1 = 0.9, beta2 = 0.999;
  /// Device doubles (null: the host's coefficients): the learning rate and weight decay read
  /// when the kernel runs, which then computes every coefficient that depends on them or on
  /// the step count (a step replayed from a CUDA graph; needs steps).
  const double *lr_at = nullptr, *wd_at = nullptr;
};
static_assert(sizeof(adamw_batch<double>) <= 4000, "adamw_batch must fit the 4 KiB of kernel parameters");

template <class T>
__global__ void __launch_bounds__(adamw_threads)
    adamw_kernel(const adamw_batch<T> bt, T* p, const T* g, T* m, T* v, adamw_device_steps ds) {
  if (ds.skip && *ds.skip) return;  // a skipped step: nothing changes
  const std::int64_t blk = blockIdx.x;
  int j = 0;
  while (j + 1 < bt.count && bt.first_block[j + 1] <= blk) ++j;
  const std::int64_t base = bt.begin[j] + (blk - bt.first_block[j]) * adamw_block_elems;
  const std::int64_t end = bt.end[j];
  cpu::adamw_coeffs<T> k = bt.k[j];
  if (ds.steps) {  // (lr_at needs steps: adamw_tensors checks it)
    const std::int64_t t = ds.steps[bt.entry[j]] + 1;
    const double lr = ds.lr_at ? *ds.lr_at : ds.lr;
    if (ds.lr_at) {  // as optim::adamw computes it on the host, in double, then rounded to T
      const double w = bt.decays[j] ? *ds.wd_at : 0.0;
      k.decay = T(__dsub_rn(1.0, __dmul_rn(lr, w)));  // no contraction into an FMA: 1 - lr w as the host rounds it
    }
    // The bias corrections from the device's count: always with lr_at, else when the host's
    // count ran ahead (a skip it has not read).
    if (ds.lr_at || t != bt.t_expected[j]) {
      k.step_size = T(lr / (1.0 - ::pow(ds.beta1, double(t))));
      k.bc2_sqrt = T(::sqrt(1.0 - ::pow(ds.beta2, double(t))));
    }
  }
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

/// After the update: the device step counts of the launch's tensors advance (not when skipped).
template <class T>
__global__ void adamw_count_kernel(const adamw_batch<T> bt, adamw_device_steps ds) {
  if (ds.skip && *ds.skip) return;
  const int j = int(threadIdx.x);
  if (j < bt.count) ++ds.steps[bt.entry[j]];
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

inline constexpr std::int64_t clip_split_elems = std::int64_t(1) << 21;
inline constexpr std::int64_t clip_chunk_elems = std::int64_t(1) << 17;

// part[blockIdx.x] = the sum of squares of x's chunk blockIdx.x, in double.
template <class T>
__global__ void __launch_bounds__(clip_threads) clip_chunk_sums_kernel(const T* x, std::int64_t n, double* part) {
  __shared__ typename cub::BlockReduce<double, clip_threads>::TempStorage tmp;
  const std::int64_t lo = std::int64_t(blockIdx.x) * clip_chunk_elems;
  const std::int64_t hi = lo + clip_chunk_elems < n ? lo + clip_chunk_elems : n;
  double acc = 0;
  for (std::int64_t i = lo + threadIdx.x; i < hi; i += clip_threads) {
    const double xi = double(x[i]);
    acc += xi * xi;
  }
  const double total = cub::BlockReduce<double, clip_threads>(tmp).Sum(acc);
  if (threadIdx.x == 0) part[blockIdx.x] = total;
}
// One block: part[chunks] = clip / (sqrt(sum of part[0, chunks)) + 1e-6), counted when below 1.
// (A template, as every kernel of these headers, so that a program of several translation
// units that include this header links.)
template <int Threads>
__global__ void __launch_bounds__(Threads) clip_factor_kernel(double* part, std::int64_t chunks, double clip,
                                                                    int* clipped) {
  __shared__ typename cub::BlockReduce<double, Threads>::TempStorage tmp;
  double acc = 0;
  for (std::int64_t k = threadIdx.x; k < chunks; k += Threads) acc += part[k];
  const double total = cub::BlockReduce<double, Threads>(tmp).Sum(acc);
  if (threadIdx.x == 0) {
    const double coef = clip / (::sqrt(total) + 1e-6);
    part[chunks] = coef;
    if (coef < 1.0) atomicAdd(clipped, 1);
  }
}
// x's chunk blockIdx.x *= the factor at *coef, when it is below 1.
template <class T>
__global__ void clip_chunk_scale_kernel(T* x, std::int64_t n, const double* coef) {
  const double c = *coef;
  if (c >= 1.0) return;
  const T ct = T(c);
  const std::int64_t lo = std::int64_t(blockIdx.x) * clip_chunk_elems;
  const std::int64_t hi = lo + clip_chunk_elems < n ? lo + clip_chunk_elems : n;
  for (std::int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) x[i] *= ct;
}

}  // namespace optim_kernels

/// AdamW over the active tensors of a flat buffer (see the file comment); no synchronisation.
/// t_expected[j]: the step count coeffs[j] was computed for (read only with ds.steps).
template <class T>
inline void adamw_tensors(const cuda_policy& pol, const std::vector<param_entry>& entries,
                          const std::vector<cpu::adamw_coeffs<T>>& coeffs, T* p, const T* g, T* m, T* v,
                          optim_kernels::adamw_device_steps ds, const std::int64_t* t_expected) {
  require<shape_error>(coeffs.size() == entries.size(), "adamw_tensors: ", coeffs.size(), " coefficient sets for ",
                       entries.size(), " tensors");
  require<config_error>(!ds.lr_at || (ds.wd_at && ds.steps), "adamw_tensors: a learning rate read on the device needs "
                        "the weight decay there too and the device step counts");
  optim_kernels::adamw_batch<T> bt{};
  std::int64_t blocks = 0;
  auto flush = [&] {
    if (bt.count == 0) return;
    bt.first_block[bt.count] = blocks;
    require<shape_error>(blocks <= 0x7fffffffLL, "adamw_tensors: too many blocks (", blocks, ")");
    if (blocks > 0) {  // (a launch of empty tensors only still counts their steps)
      optim_kernels::adamw_kernel<T><<<unsigned(blocks), optim_kernels::adamw_threads, 0, pol.stream>>>(bt, p, g, m,
                                                                                                         v, ds);
      DINO_CUDA_LAUNCHED("adamw_tensors");
    }
    if (ds.steps) {
      optim_kernels::adamw_count_kernel<T><<<1, optim_kernels::adamw_batch<T>::capacity, 0, pol.stream>>>(bt, ds);
      DINO_CUDA_LAUNCHED("adamw_tensors (step counts)");
    }
    bt.count = 0;
    blocks = 0;
  };
  for (std::size_t j = 0; j < entries.size(); ++j) {
    // Empty tensors have no blocks; they stay in the batch when their step is counted here.
    if (!coeffs[j].active || (entries[j].numel() == 0 && !ds.steps)) continue;
    const int c = bt.count;
    bt.begin[c] = std::int64_t(entries[j].offset);
    bt.end[c] = std::int64_t(entries[j].offset + entries[j].numel());
    bt.first_block[c] = blocks;
    bt.t_expected[c] = t_expected ? t_expected[j] : 0;
    bt.entry[c] = int(j);
    bt.decays[c] = (entries[j].flags & param_no_weight_decay) ? 0 : 1;
    bt.k[c] = coeffs[j];
    blocks += (std::int64_t(entries[j].numel()) + optim_kernels::adamw_block_elems - 1) / optim_kernels::adamw_block_elems;
    if (++bt.count == optim_kernels::adamw_batch<T>::capacity) flush();
  }
  flush();
}

/// The form optim::adamw calls with device step counts (see the file comment): device_steps
/// [entries] and skip in device memory; t_expected[j] the count the host assumed for tensor j;
/// lr_at and wd_at (device doubles, both or neither): lr and wd read when the kernels run.
template <class T>
inline void adamw_tensors(const cuda_policy& pol, const std::vector<param_entry>& entries,
                          const std::vector<cpu::adamw_coeffs<T>>& coeffs, T* p, const T* g, T* m, T* v,
                          std::int64_t* device_steps, const int* skip, double lr, double beta1, double beta2,
                          const std::int64_t* t_expected, const double* lr_at = nullptr,
                          const double* wd_at = nullptr) {
  adamw_tensors(pol, entries, coeffs, p, g, m, v,
                optim_kernels::adamw_device_steps{device_steps, skip, lr, beta1, beta2, lr_at, wd_at}, t_expected);
}

/// The same with the step counts on the host only and no skip flag.
template <class T>
inline void adamw_tensors(const cuda_policy& pol, const std::vector<param_entry>& entries,
                          const std::vector<cpu::adamw_coeffs<T>>& coeffs, T* p, const T* g, T* m, T* v) {
  adamw_tensors(pol, entries, coeffs, p, g, m, v, optim_kernels::adamw_device_steps{}, nullptr);
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
    const std::int64_t n = std::int64_t(e.numel());
    const std::int64_t chunks = (n + optim_kernels::clip_chunk_elems - 1) / optim_kernels::clip_chunk_elems;
    if (n > optim_kernels::clip_split_elems && pol.scratch &&
        pol.scratch_bytes >= std::size_t(chunks + 1) * sizeof(double)) {  // split over blocks (see the file comment)
      double* part = static_cast<double*>(pol.scratch);
      T* x = g + e.offset;
      optim_kernels::clip_chunk_sums_kernel<T><<<unsigned(chunks), optim_kernels::clip_threads, 0, pol.stream>>>(x, n, part);
      DINO_CUDA_LAUNCHED("clip_tensors (chunk sums)");
      optim_kernels::clip_factor_kernel<optim_kernels::clip_threads>
          <<<1, optim_kernels::clip_threads, 0, pol.stream>>>(part, chunks, clip, clipped);
      DINO_CUDA_LAUNCHED("clip_tensors (factor)");
      optim_kernels::clip_chunk_scale_kernel<T><<<unsigned(chunks), 256, 0, pol.stream>>>(x, n, part + chunks);
      DINO_CUDA_LAUNCHED("clip_tensors (chunk scale)");
      continue;
    }
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
  host_wait(pol, "clip_tensors (count to the host)");
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
