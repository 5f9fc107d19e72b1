// dino/policy/cuda/loss.cuh: the DINO objective on the CUDA policy, twins of
// policy/cpu/softmax_rows.hpp, policy/cpu/normalize_rows.hpp and the scalar reductions of
// policy/cpu/reduce.hpp.
//
//   softmax_targets(pol, t, c, q, entropy, rows, K, inv_tau)
//       q[r] = softmax((t[r] - c) * inv_tau), entropy[r] = sum q (lse - z); a block per row:
//       max, then exp into q with the sum in double, then q *= 1/sum with the entropy.
//   distillation_rows(pol, desc)       (the fused loss behind ssl::cross_entropy_distillation)
//       a block per student row r = v B + b over K: pass 1 the max of s / tau, the target
//       mass and sum_k (sum_i q_i) s; pass 2 the sum of exp(s / tau - max); row_loss[r] =
//       lse * mass - dot / tau; pass 3 (with ds) ds (=|+=) scale (mass e / sum - sum_i q_i),
//       recomputing e. The probabilities are never stored; every sum is in double.
//   sum_to(pol, x, n, divisor, out)    *out.value (=|+=) weight * sum x / divisor, in device memory
//   sum_to_host(pol, x, n, divisor)    the same value returned to the host (synchronises)
//   first_non_finite(pol, x, n)        index and value of the first NaN or infinity (synchronises)
//   l2_normalize_rows(_backward), weight_norm_rows(_backward)   the DINO head's rows: a warp per row
//
// Block reductions are CUB's (fixed order for a fixed block size) and warp sums a xor
// butterfly, so results do not depend on the launch. Everything runs on pol.stream; only
// the *_host forms and first_non_finite read back (a counted cuda::host_wait), through pol.flags / pol.host_flags
// (slot 2-3: one double; 4-7: first_non_finite; slot 0 belongs to all_finite).
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>

#include <cub/cub.cuh>
#include <cuda/functional>

#include "dino/policy/cpu/reduce.hpp"
#include "dino/policy/cpu/softmax_rows.hpp"
#include "dino/policy/cuda/parallel.cuh"
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

namespace loss_kernels {

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return ::exp(x); }

/// The block-wide sum of x, returned to every thread (the storage is reusable afterwards).
template <int Threads>
__device__ __forceinline__ double block_sum(double x, typename cub::BlockReduce<double, Threads>::TempStorage& tmp,
                                            double& shared) {
  const double s = cub::BlockReduce<double, Threads>(tmp).Sum(x);
  if (threadIdx.x == 0) shared = s;
  __syncthreads();
  const double r = shared;
  __syncthreads();
  return r;
}
/// The block-wide max of x, returned to every thread.
template <class T, int Threads>
__device__ __forceinline__ T block_max(T x, typename cub::BlockReduce<T, Threads>::TempStorage& tmp, T& shared) {
  const T m = cub::BlockReduce<T, Threads>(tmp).Reduce(x, ::cuda::maximum<>{});
  if (threadIdx.x == 0) shared = m;
  __syncthreads();
  const T r = shared;
  __syncthreads();
  return r;
}
/// The warp-wide sum of x (xor butterfly: every lane gets the same bits).
__device__ __forceinline__ double warp_sum(double x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <class T, int Threads>
struct row_reduce_storage {
  union {
    typename cub::BlockReduce<double, Threads>::TempStorage d;
    typename cub::BlockReduce<T, Threads>::TempStorage t;
  } tmp;
  double d_shared;
  T t_shared;
};

template <class T, int Threads>
__global__ void __launch_bounds__(Threads)
    softmax_targets_kernel(const T* t, const T* c, T* q, T* entropy, std::int64_t K, T inv_tau,
                           const double* tau_at = nullptr) {
  __shared__ row_reduce_storage<T, Threads> sm;
  if (tau_at) inv_tau = T(1.0 / *tau_at);  // a step graph's temperature, rounded as the host rounds it
  const std::int64_t r = blockIdx.x;
  const T* tr = t + r * K;
  T* qr = q + r * K;
  T mx = -INFINITY;
  for (std::int64_t k = threadIdx.x; k < K; k += Threads) {
    const T z = c ? (tr[k] - c[k]) * inv_tau : tr[k] * inv_tau;
    mx = z > mx ? z : mx;
  }
  mx = block_max<T, Threads>(mx, sm.tmp.t, sm.t_shared);
  double sum = 0;
  for (std::int64_t k = threadIdx.x; k < K; k += Threads) {
    const T z = c ? (tr[k] - c[k]) * inv_tau : tr[k] * inv_tau;
    const T e = dev_exp(z - mx);
    qr[k] = e;  // read back below by this same thread
    sum += double(e);
  }
  sum = block_sum<Threads>(sum, sm.tmp.d, sm.d_shared);
  const T lse = mx + T(::log(sum));
  const T inv_sum = T(1.0 / sum);
  double h = 0;
  for (std::int64_t k = threadIdx.x; k < K; k += Threads) {
    const T z = c ? (tr[k] - c[k]) * inv_tau : tr[k] * inv_tau;
    const T p = qr[k] * inv_sum;
    qr[k] = p;
    h += double(p * (lse - z));
  }
  h = block_sum<Threads>(h, sm.tmp.d, sm.d_shared);
  if (threadIdx.x == 0) entropy[r] = T(h);
}

template <class T, int Threads>
__global__ void __launch_bounds__(Threads) distillation_kernel(distillation_desc<T> d) {
  __shared__ row_reduce_storage<T, Threads> sm;
  const std::int64_t r = blockIdx.x;  // student row: crop v of image b
  const int v = static_cast<int>(r / d.B);
  const std::int64_t b = r % d.B;
  const T* targets[8];
  int nt = 0;
  for (int i = 0; i < d.n_global; ++i)
    if (i != v) targets[nt++] = d.q + (i * d.B + b) * d.K;
  const T* sr = d.s + r * d.K;
  const std::int64_t K = d.K;
  // Pass 1: max of s / tau, the targets' mass and their dot with s.
  T mx = -INFINITY;
  double mass = 0, dot = 0;
  for (std::int64_t k = threadIdx.x; k < K; k += Threads) {
    const T sk = sr[k];
    const T z = sk * d.inv_tau;
    mx = z > mx ? z : mx;
    T qs = 0;
    for (int i = 0; i < nt; ++i) qs += targets[i][k];
    mass += double(qs);
    dot += double(qs) * double(sk);
  }
  mx = block_max<T, Threads>(mx, sm.tmp.t, sm.t_shared);
  mass = block_sum<Threads>(mass, sm.tmp.d, sm.d_shared);
  dot = block_sum<Threads>(dot, sm.tmp.d, sm.d_shared);
  // Pass 2: the normaliser.
  double sum = 0;
  for (std::int64_t k = threadIdx.x; k < K; k += Threads) sum += double(dev_exp(sr[k] * d.inv_tau - mx));
  sum = block_sum<Threads>(sum, sm.tmp.d, sm.d_shared);
  const T lse = mx + T(::log(sum));
  if (threadIdx.x == 0) d.row_loss[r] = T(double(lse) * mass - dot * double(d.inv_tau));
  if (!d.ds) return;
  // Pass 3: ds = scale * (mass * e / sum - sum_i q_i), e recomputed (as the CPU's write form).
  const T a = T(double(d.grad_scale) * double(T(mass)) / sum);
  T* dr = d.ds + r * K;
  for (std::int64_t k = threadIdx.x; k < K; k += Threads) {
    T qs = 0;
    for (int i = 0; i < nt; ++i) qs += targets[i][k];
    const T g = a * dev_exp(sr[k] * d.inv_tau - mx) - d.grad_scale * qs;
    dr[k] = d.accumulate ? dr[k] + g : g;
  }
}

template <class T, int Threads>
__global__ void __launch_bounds__(Threads)
    sum_kernel(const T* x, std::int64_t n, bool square, double divisor, double* out, double weight, bool accumulate) {
  __shared__ typename cub::BlockReduce<double, Threads>::TempStorage tmp;
  double acc = 0;
  for (std::int64_t i = threadIdx.x; i < n; i += Threads) {
    const double xi = double(x[i]);
    acc += square ? xi * xi : xi;
  }
  const double s = cub::BlockReduce<double, Threads>(tmp).Sum(acc);
  if (threadIdx.x == 0) {
    const double v = weight * (s / divisor);
    *out = accumulate ? *out + v : v;
  }
}

template <class T>
__global__ void first_non_finite_kernel(const T* x, std::int64_t n, unsigned long long* index) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(blockDim.x) * gridDim.x)
    if (!isfinite(x[i])) atomicMin(index, static_cast<unsigned long long>(i));
}
template <class T>
__global__ void value_at_kernel(const T* x, const unsigned long long* index, double* value) {
  const unsigned long long i = *index;
  *value = i == ULLONG_MAX ? 0.0 : double(x[i]);
}

inline constexpr int warp_rows_threads = 256;  // 8 rows per block, a warp each

template <class T>
__global__ void __launch_bounds__(warp_rows_threads)
    l2_normalize_rows_kernel(const T* x, T* y, T* norms, std::int64_t rows, std::int64_t n, T eps) {
  const std::int64_t r = std::int64_t(blockIdx.x) * (warp_rows_threads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;  // whole warps leave; no block barrier follows
  const T* xr = x + r * n;
  double s = 0;
  for (std::int64_t i = lane; i < n; i += 32) s += double(xr[i]) * double(xr[i]);
  s = warp_sum(s);
  const T norm = T(::sqrt(s));
  const T inv = T(1) / (norm > eps ? norm : eps);
  T* yr = y + r * n;  // may alias x: each lane reads its elements before writing them
  for (std::int64_t i = lane; i < n; i += 32) yr[i] = xr[i] * inv;
  if (lane == 0) norms[r] = norm;
}

template <class T>
__global__ void __launch_bounds__(warp_rows_threads)
    l2_normalize_rows_backward_kernel(const T* y, const T* norms, const T* dy, T* dx, std::int64_t rows,
                                      std::int64_t n, T eps, bool accumulate) {
  const std::int64_t r = std::int64_t(blockIdx.x) * (warp_rows_threads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const T* yr = y + r * n;
  const T* dyr = dy + r * n;
  T* dxr = dx + r * n;
  const T norm = norms[r];
  if (norm > eps) {
    double dot = 0;
    for (std::int64_t i = lane; i < n; i += 32) dot += double(yr[i]) * double(dyr[i]);
    const T dt = T(warp_sum(dot));
    const T inv = T(1) / norm;
    for (std::int64_t i = lane; i < n; i += 32) {
      const T v = (dyr[i] - yr[i] * dt) * inv;
      dxr[i] = accumulate ? dxr[i] + v : v;
    }
  } else {
    for (std::int64_t i = lane; i < n; i += 32) {
      const T v = dyr[i] / eps;
      dxr[i] = accumulate ? dxr[i] + v : v;
    }
  }
}

template <class T>
__global__ void __launch_bounds__(warp_rows_threads)
    weight_norm_rows_kernel(const T* g, const T* v, T* w, T* vnorm, std::int64_t rows, std::int64_t n) {
  const std::int64_t k = std::int64_t(blockIdx.x) * (warp_rows_threads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (k >= rows) return;
  const T* vk = v + k * n;
  double s = 0;
  for (std::int64_t i = lane; i < n; i += 32) s += double(vk[i]) * double(vk[i]);
  const T norm = T(::sqrt(warp_sum(s)));
  const T scale = g[k] / norm;
  T* wk = w + k * n;
  for (std::int64_t i = lane; i < n; i += 32) wk[i] = vk[i] * scale;
  if (lane == 0) vnorm[k] = norm;
}

template <class T>
__global__ void __launch_bounds__(warp_rows_threads)
    weight_norm_rows_backward_kernel(const T* g, const T* v, const T* vnorm, const T* dw, T* dg, T* dv,
                                     std::int64_t rows, std::int64_t n) {
  const std::int64_t k = std::int64_t(blockIdx.x) * (warp_rows_threads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (k >= rows) return;
  const T* vk = v + k * n;
  const T* dwk = dw + k * n;
  double d = 0;
  for (std::int64_t i = lane; i < n; i += 32) d += double(dwk[i]) * double(vk[i]);
  const T dot = T(warp_sum(d));
  const T norm = vnorm[k];
  if (dg && lane == 0) dg[k] += dot / norm;
  if (dv) {
    const T a = g[k] / norm, b = dot / (norm * norm);
    T* dvk = dv + k * n;
    for (std::int64_t i = lane; i < n; i += 32) dvk[i] += a * (dwk[i] - vk[i] * b);
  }
}

inline unsigned warp_rows_grid(std::int64_t rows) {
  return static_cast<unsigned>((rows + warp_rows_threads / 32 - 1) / (warp_rows_threads / 32));
}

/// The double read-back slot of a policy (pol.flags[2..3]).
inline double* double_slot(const cuda_policy& pol) { return reinterpret_cast<double*>(pol.flags + 2); }
inline void require_flags(const cuda_policy& pol, const char* what) {
  require<config_error>(pol.flags != nullptr && pol.host_flags != nullptr, what,
                        ": the cuda_policy has no flags (make policies with cuda::context::policy())");
}

template <class T>
inline void launch_sum(const cuda_policy& pol, const T* x, std::int64_t n, bool square, double divisor, double* out,
                       double weight, bool accumulate) {
  sum_kernel<T, 1024><<<1, 1024, 0, pol.stream>>>(x, n, square, divisor, out, weight, accumulate);
  DINO_CUDA_LAUNCHED("sum_to");
}
inline double read_double_slot(const cuda_policy& pol) {
  DINO_CUDA_CHECK(cudaMemcpyAsync(pol.host_flags + 2, pol.flags + 2, sizeof(double), cudaMemcpyDeviceToHost,
                                  pol.stream));
  host_wait(pol, "sum_to_host");
  double v;
  std::memcpy(&v, pol.host_flags + 2, sizeof(double));
  return v;
}

}  // namespace loss_kernels

/// Teacher targets over rows: q[r] = softmax((t[r] - c) * inv_tau) (c may be null), entropy[r].
/// tau_at (device memory, or null): the kernels take inv_tau = 1 / *tau_at instead.
template <class T>
inline void softmax_targets(const cuda_policy& pol, const T* t, const T* c, T* q, T* entropy, std::int64_t rows,
                            std::int64_t K, T inv_tau, const double* tau_at = nullptr) {
  if (rows <= 0) return;
  require<shape_error>(rows <= INT_MAX && K > 0, "softmax_targets: unsupported shape [", rows, ", ", K, "]");
  if (K >= 8192)
    loss_kernels::softmax_targets_kernel<T, 1024>
        <<<unsigned(rows), 1024, 0, pol.stream>>>(t, c, q, entropy, K, inv_tau, tau_at);
  else
    loss_kernels::softmax_targets_kernel<T, 256>
        <<<unsigned(rows), 256, 0, pol.stream>>>(t, c, q, entropy, K, inv_tau, tau_at);
  DINO_CUDA_LAUNCHED("softmax_targets");
}
/// The same with the temperature read on the device (*tau_at, a step graph's).
template <class T>
inline void softmax_targets(const cuda_policy& pol, const T* t, const T* c, T* q, T* entropy, std::int64_t rows,
                            std::int64_t K, const double* tau_at) {
  softmax_targets(pol, t, c, q, entropy, rows, K, T(1), tau_at);
}

/// The fused distillation loss over crop-major rows (see distillation_desc in
/// policy/cpu/softmax_rows.hpp): row_loss for every student row, and ds when d.ds is set.
template <class T>
inline void distillation_rows(const cuda_policy& pol, const distillation_desc<T>& d) {
  const std::int64_t rows = std::int64_t(d.n_crops) * d.B;
  if (rows <= 0) return;
  require<shape_error>(rows <= INT_MAX && d.K > 0 && d.n_global >= 0 && d.n_global <= 8,
                       "distillation_rows: unsupported shape (", rows, " rows, K = ", d.K, ", ", d.n_global,
                       " global crops)");
  if (d.K >= 8192)
    loss_kernels::distillation_kernel<T, 1024><<<unsigned(rows), 1024, 0, pol.stream>>>(d);
  else
    loss_kernels::distillation_kernel<T, 256><<<unsigned(rows), 256, 0, pol.stream>>>(d);
  DINO_CUDA_LAUNCHED("distillation_rows");
}

/// *out.value (=|+=) out.weight * (sum_i x[i] / divisor); out.value is device memory. No read-back.
template <class T>
inline void sum_to(const cuda_policy& pol, const T* x, std::int64_t n, double divisor, scalar_out out) {
  loss_kernels::launch_sum(pol, x, n < 0 ? 0 : n, false, divisor, out.value, out.weight, out.accumulate);
}

/// sum_i x[i] / divisor, returned to the host: synchronises the stream (pol.flags slot 2-3).
template <class T>
inline double sum_to_host(const cuda_policy& pol, const T* x, std::int64_t n, double divisor) {
  loss_kernels::require_flags(pol, "sum_to_host");
  loss_kernels::launch_sum(pol, x, n < 0 ? 0 : n, false, divisor, loss_kernels::double_slot(pol), 1.0, false);
  return loss_kernels::read_double_slot(pol);
}

/// sum_i x[i]^2 in double, returned to the host: synchronises the stream.
template <class T>
inline double sum_squares_to_host(const cuda_policy& pol, const T* x, std::int64_t n) {
  loss_kernels::require_flags(pol, "sum_squares_to_host");
  loss_kernels::launch_sum(pol, x, n < 0 ? 0 : n, true, 1.0, loss_kernels::double_slot(pol), 1.0, false);
  return loss_kernels::read_double_slot(pol);
}

/// The first NaN or infinity of x[0, n) (index -1 when there is none): synchronises.
template <class T>
inline non_finite_at first_non_finite(const cuda_policy& pol, const T* x, std::int64_t n) {
  loss_kernels::require_flags(pol, "first_non_finite");
  auto* index = reinterpret_cast<unsigned long long*>(pol.flags + 4);
  auto* value = reinterpret_cast<double*>(pol.flags + 6);
  DINO_CUDA_CHECK(cudaMemsetAsync(index, 0xff, sizeof(unsigned long long), pol.stream));
  if (n > 0) {
    loss_kernels::first_non_finite_kernel<<<std::min(detail::grid_for(n), 1024u), detail::threads_per_block, 0,
                                      pol.stream>>>(x, n, index);
    DINO_CUDA_LAUNCHED("first_non_finite");
  }
  loss_kernels::value_at_kernel<<<1, 1, 0, pol.stream>>>(x, index, value);
  DINO_CUDA_LAUNCHED("first_non_finite value");
  DINO_CUDA_CHECK(cudaMemcpyAsync(pol.host_flags + 4, pol.flags + 4, 4 * sizeof(int), cudaMemcpyDeviceToHost,
                                  pol.stream));
  host_wait(pol, "first_non_finite");
  unsigned long long i;
  double v;
  std::memcpy(&i, pol.host_flags + 4, sizeof(i));
  std::memcpy(&v, pol.host_flags + 6, sizeof(v));
  if (i == ULLONG_MAX) return {};
  return {static_cast<std::int64_t>(i), v};
}

/// y_r = x_r / max(||x_r||, eps), norms_r = ||x_r|| (y may alias x).
template <class T>
inline void l2_normalize_rows(const cuda_policy& pol, const T* x, T* y, T* norms, std::int64_t rows, std::int64_t n,
                              T eps) {
  if (rows <= 0) return;
  loss_kernels::l2_normalize_rows_kernel<<<loss_kernels::warp_rows_grid(rows), loss_kernels::warp_rows_threads, 0, pol.stream>>>(
      x, y, norms, rows, n, eps);
  DINO_CUDA_LAUNCHED("l2_normalize_rows");
}

/// dx (=|+=) the gradient of l2_normalize_rows given its output y, the norms and dy.
template <class T>
inline void l2_normalize_rows_backward(const cuda_policy& pol, const T* y, const T* norms, const T* dy, T* dx,
                                       std::int64_t rows, std::int64_t n, T eps, bool accumulate) {
  if (rows <= 0) return;
  loss_kernels::l2_normalize_rows_backward_kernel<<<loss_kernels::warp_rows_grid(rows), loss_kernels::warp_rows_threads, 0,
                                              pol.stream>>>(y, norms, dy, dx, rows, n, eps, accumulate);
  DINO_CUDA_LAUNCHED("l2_normalize_rows_backward");
}

/// w_k = g_k v_k / ||v_k||, vnorm_k = ||v_k|| (weight norm, dim 0).
template <class T>
inline void weight_norm_rows(const cuda_policy& pol, const T* g, const T* v, T* w, T* vnorm, std::int64_t rows,
                             std::int64_t n) {
  if (rows <= 0) return;
  loss_kernels::weight_norm_rows_kernel<<<loss_kernels::warp_rows_grid(rows), loss_kernels::warp_rows_threads, 0, pol.stream>>>(
      g, v, w, vnorm, rows, n);
  DINO_CUDA_LAUNCHED("weight_norm_rows");
}

/// dg (+=, skipped when null) and dv (+=) from dw through the weight norm.
template <class T>
inline void weight_norm_rows_backward(const cuda_policy& pol, const T* g, const T* v, const T* vnorm, const T* dw,
                                      T* dg, T* dv, std::int64_t rows, std::int64_t n) {
  if (rows <= 0) return;
  loss_kernels::weight_norm_rows_backward_kernel<<<loss_kernels::warp_rows_grid(rows), loss_kernels::warp_rows_threads, 0,
                                             pol.stream>>>(g, v, vnorm, dw, dg, dv, rows, n);
  DINO_CUDA_LAUNCHED("weight_norm_rows_backward");
}

}  // namespace dino::cuda

namespace dino {
using cuda::distillation_rows;
using cuda::first_non_finite;
using cuda::l2_normalize_rows;
using cuda::l2_normalize_rows_backward;
using cuda::softmax_targets;
using cuda::sum_squares_to_host;
using cuda::sum_to;
using cuda::sum_to_host;
using cuda::weight_norm_rows;
using cuda::weight_norm_rows_backward;
}  // namespace dino
