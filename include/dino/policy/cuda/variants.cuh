// dino/policy/cuda/variants.cuh: the row kernels of the variant parts (ssl/sinkhorn.hpp,
// ssl/mse_loss.hpp, ssl/info_nce.hpp, ssl/nt_xent.hpp, ssl/student_mask.hpp) on the CUDA policy. The ssl headers
// call these by name with a cuda_policy (the CPU runs the parts' own loops); each computes
// what the CPU part computes, in the same precision (double sums and exponentials where the
// CPU works in double, T where it rounds to T), with a different but fixed summation order.
//
//   sinkhorn_rows(pol, t, q, entropy, r, c, R, K, inv_tau, iterations)
//       Sinkhorn-Knopp over raw logits t [R, K] into q, entropy [R]; r [K], c [R] doubles
//       of scratch. Per prototype (a thread per column, samples in order): the max and the row
//       scale; per sample (a block per row): the column scale, then q and its entropy.
//   l2_rows_stats(pol, x, y, stats, rows, K, y_offset, y_rows)
//       y[(y_offset + r) % y_rows] = x[r] / max(||x[r]||, 1e-12), stats[2r] = ||x[r]||,
//       stats[2r + 1] = 1 / max(||x[r]||, 1e-12) (doubles; a warp per row). y may be null.
//   mse_rows(pol, pair_rows_desc)       the MSE distillation's rows (a block per student row)
//   info_nce_rows(pol, desc, L, queued, Q, pos_coef)
//       the InfoNCE rows over the queue logits L [N, Q] (only the first *queued count; queued
//       is device memory): row_loss, pos_coef [N, G] and, with ds, L replaced by the weights
//       of the negatives (0 past *queued)
//   nt_xent_rows(pol, desc, S)          the NT-Xent rows over S [N, N]; with ds, S becomes dS
//   symmetrize_sum(pol, D, N)           D = D + D^T (in place)
//   l2_grad_rows(pol, desc, stats, g, pos_coef)
//       ds (=|+=) the l2 normalisation's backward of g + sum_i pos_coef[r, i] q_i (a warp per row)
//   queue_commit(pol, queue, pending, state, n, cap, Q, K, skip)
//       the last min(n, Q) of n pending rows (a ring of cap rows) into the queue ring at
//       state[1] (head), then head and queued (state[0]) advance; nothing when *skip
//   select_kept_patches(pol, attn, crops, heads, n, k, keep)
//       ssl::attention_mask's choice: each crop's k best-attended patches, ascending (a block
//       per crop, ranks counted in shared memory)
//
// Everything runs on pol.stream and reads nothing back.
#pragma once

#include <climits>
#include <cstdint>
#include <type_traits>

#include "dino/policy/cuda/loss.cuh"
#include "dino/policy/pair_rows.hpp"
#include "dino/policy/cuda/parallel.cuh"
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

namespace variant_kernels {

using loss_kernels::block_max;
using loss_kernels::block_sum;
using loss_kernels::row_reduce_storage;
using loss_kernels::warp_rows_grid;
using loss_kernels::warp_rows_threads;
using loss_kernels::warp_sum;

inline constexpr double l2_eps = 1e-12;  // F.normalize's eps (ssl/variant_detail.hpp)

// ---- Sinkhorn-Knopp -------------------------------------------------------------------------

/// A thread per prototype k: r[k] = max_s t[s, k] inv_tau.
template <class T>
__global__ void sinkhorn_max_kernel(const T* t, double* r, std::int64_t R, std::int64_t K, double inv_tau) {
  const std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  double m = -INFINITY;
  for (std::int64_t s = 0; s < R; ++s) m = fmax(m, double(t[s * K + k]) * inv_tau);
  r[k] = m;
}
template <class T>
__global__ void sinkhorn_exp_kernel(const T* t, const double* r, T* q, std::int64_t R, std::int64_t K,
                                    double inv_tau) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < R * K;
       i += std::int64_t(blockDim.x) * gridDim.x)
    q[i] = T(::exp(double(t[i]) * inv_tau - r[i % K]));
}
/// A thread per prototype k: r[k] = 1 / (K sum_s E[s, k] c[s]) (c null: all ones).
template <class T>
__global__ void sinkhorn_row_scale_kernel(const T* E, const double* c, double* r, std::int64_t R, std::int64_t K) {
  const std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  double acc = 0;
  for (std::int64_t s = 0; s < R; ++s) acc += double(E[s * K + k]) * (c ? c[s] : 1.0);
  r[k] = 1.0 / (double(K) * acc);
}
/// A block per sample s: c[s] = 1 / (R sum_k E[s, k] r[k]).
template <class T, int Threads>
__global__ void __launch_bounds__(Threads)
    sinkhorn_col_scale_kernel(const T* E, const double* r, double* c, std::int64_t R, std::int64_t K) {
  __shared__ row_reduce_storage<T, Threads> sm;
  const std::int64_t s = blockIdx.x;
  double acc = 0;
  for (std::int64_t k = threadIdx.x; k < K; k += Threads) acc += double(E[s * K + k]) * r[k];
  acc = block_sum<Threads>(acc, sm.tmp.d, sm.d_shared);
  if (threadIdx.x == 0) c[s] = 1.0 / (double(R) * acc);
}
/// A block per sample s: q = E r c R, and the row's entropy.
template <class T, int Threads>
__global__ void __launch_bounds__(Threads)
    sinkhorn_finish_kernel(T* q, const double* r, const double* c, T* entropy, std::int64_t R, std::int64_t K) {
  __shared__ row_reduce_storage<T, Threads> sm;
  const std::int64_t s = blockIdx.x;
  const double cs = c[s] * double(R);
  double h = 0;
  for (std::int64_t k = threadIdx.x; k < K; k += Threads) {
    const double p = double(q[s * K + k]) * r[k] * cs;
    q[s * K + k] = T(p);
    if (!(p <= 0)) h -= p * ::log(p);  // a NaN or infinite p makes the entropy non-finite, as on the CPU
  }
  h = block_sum<Threads>(h, sm.tmp.d, sm.d_shared);
  if (threadIdx.x == 0) entropy[s] = T(h);
}

// ---- row normalisation and its backward -------------------------------------------------------

template <class T>
__global__ void __launch_bounds__(warp_rows_threads)
    l2_rows_stats_kernel(const T* x, T* y, double* stats, std::int64_t rows, std::int64_t K, std::int64_t y_offset,
                         std::int64_t y_rows) {
  const std::int64_t r = std::int64_t(blockIdx.x) * (warp_rows_threads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const T* xr = x + r * K;
  double s = 0;
  for (std::int64_t k = lane; k < K; k += 32) s += double(xr[k]) * double(xr[k]);
  const double norm = ::sqrt(warp_sum(s));
  const double inv = 1.0 / (norm > l2_eps ? norm : l2_eps);
  if (y) {
    T* yr = y + ((y_offset + r) % y_rows) * K;
    for (std::int64_t k = lane; k < K; k += 32) yr[k] = T(double(xr[k]) * inv);
  }
  if (stats && lane == 0) {
    stats[2 * r] = norm;
    stats[2 * r + 1] = inv;
  }
}

/// g_k = g[r, k] + sum_{i != v} pos_coef[r, i] q[(i B + b), k]; ds (=|+=) the backward of
/// y = s / max(||s||, eps) applied to g: (g - y (y . g)) / ||s||, or g / eps for a tiny row.
template <class T>
__global__ void __launch_bounds__(warp_rows_threads)
    l2_grad_rows_kernel(pair_rows_desc<T> d, const double* stats, const T* g, const double* pos_coef) {
  const std::int64_t rows = std::int64_t(d.n_crops) * d.B;
  const std::int64_t r = std::int64_t(blockIdx.x) * (warp_rows_threads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int v = int(r / d.B);
  const std::int64_t b = r % d.B, K = d.K;
  const double norm = stats[2 * r], inv = stats[2 * r + 1];
  const T* sr = d.s + r * K;
  const T* gr = g + r * K;
  auto grad = [&](std::int64_t k) {
    double x = double(gr[k]);
    if (pos_coef)
      for (int i = 0; i < d.n_global; ++i)
        if (i != v) x += pos_coef[r * d.n_global + i] * double(d.q[(std::int64_t(i) * d.B + b) * K + k]);
    return x;
  };
  T* dr = d.ds + r * K;
  if (norm > l2_eps) {
    double yg = 0;
    for (std::int64_t k = lane; k < K; k += 32) yg += double(sr[k]) * inv * grad(k);
    yg = warp_sum(yg);
    const double c = 1.0 / norm;
    for (std::int64_t k = lane; k < K; k += 32) {
      const double x = c * (grad(k) - double(sr[k]) * inv * yg);
      dr[k] = d.accumulate ? T(double(dr[k]) + x) : T(x);
    }
  } else {
    for (std::int64_t k = lane; k < K; k += 32) {
      const double x = grad(k) / l2_eps;
      dr[k] = d.accumulate ? T(double(dr[k]) + x) : T(x);
    }
  }
}

// ---- the pair losses ------------------------------------------------------------------------------

/// Per partner i (< n_global, != v) of student row r: ||q_i||^-1-ready sums: qq[i] = ||q_i||^2 and
/// dot[i] = s_r . q_i, block-reduced; returns ||s_r||^2 (every thread gets every value).
template <class T, int Threads>
__device__ void pair_sums(const pair_rows_desc<T>& d, std::int64_t r, row_reduce_storage<T, Threads>& sm, double* qq,
                          double* dot, double& ss) {
  const int v = int(r / d.B);
  const std::int64_t b = r % d.B, K = d.K;
  const T* sr = d.s + r * K;
  double a = 0;
  for (std::int64_t k = threadIdx.x; k < K; k += Threads) a += double(sr[k]) * double(sr[k]);
  ss = block_sum<Threads>(a, sm.tmp.d, sm.d_shared);
  for (int i = 0; i < d.n_global; ++i) {
    qq[i] = dot[i] = 0;
    if (i == v) continue;
    const T* qr = d.q + (std::int64_t(i) * d.B + b) * K;
    double x = 0, y = 0;
    for (std::int64_t k = threadIdx.x; k < K; k += Threads) {
      x += double(qr[k]) * double(qr[k]);
      y += double(sr[k]) * double(qr[k]);
    }
    qq[i] = block_sum<Threads>(x, sm.tmp.d, sm.d_shared);
    dot[i] = block_sum<Threads>(y, sm.tmp.d, sm.d_shared);
  }
}
__device__ __forceinline__ double l2_inv(double norm) { return 1.0 / (norm > l2_eps ? norm : l2_eps); }

/// MSE: a block per student row (ssl/mse_loss.hpp); d.scale = -2 dloss / (n_terms B).
template <class T, int Threads>
__global__ void __launch_bounds__(Threads) mse_kernel(pair_rows_desc<T> d) {
  __shared__ row_reduce_storage<T, Threads> sm;
  const std::int64_t r = blockIdx.x;
  const int v = int(r / d.B);
  const std::int64_t b = r % d.B, K = d.K;
  double qq[8], dot[8], ss;
  pair_sums<T, Threads>(d, r, sm, qq, dot, ss);
  const double snorm = ::sqrt(ss), sinv = l2_inv(snorm);
  double loss = 0, w[8], sQ = 0;
  int partners = 0;
  for (int i = 0; i < d.n_global; ++i) {
    w[i] = 0;
    if (i == v) continue;
    ++partners;
    w[i] = l2_inv(::sqrt(qq[i]));
    loss += 2.0 - 2.0 * dot[i] * sinv * w[i];
    sQ += dot[i] * w[i];
  }
  if (threadIdx.x == 0) d.row_loss[r] = T(loss);
  if (!d.ds) return;
  T* dr = d.ds + r * K;
  if (partners == 0) {
    if (!d.accumulate)
      for (std::int64_t k = threadIdx.x; k < K; k += Threads) dr[k] = T(0);
    return;
  }
  const T* sr = d.s + r * K;
  const double yQ = snorm > l2_eps ? sQ * sinv : 0.0, c = d.scale * sinv;
  for (std::int64_t k = threadIdx.x; k < K; k += Threads) {
    double Qk = 0;
    for (int i = 0; i < d.n_global; ++i)
      if (i != v) Qk += double(d.q[(std::int64_t(i) * d.B + b) * K + k]) * w[i];
    const double g = c * (Qk - double(sr[k]) * sinv * yQ);
    dr[k] = d.accumulate ? T(double(dr[k]) + g) : T(g);
  }
}

/// InfoNCE: a block per student row over its queue logits L [Q] (ssl/info_nce.hpp); d.scale =
/// dloss / (n_terms B); stats from l2_rows_stats of s.
template <class T, int Threads>
__global__ void __launch_bounds__(Threads)
    info_nce_kernel(pair_rows_desc<T> d, const double* stats, T* L, const std::int64_t* queued, std::int64_t Q,
                    double* pos_coef) {
  __shared__ row_reduce_storage<T, Threads> sm;
  const std::int64_t r = blockIdx.x;
  const int v = int(r / d.B), G = d.n_global;
  const std::int64_t M = *queued;
  T* Lr = L + r * Q;
  double qq[8], dot[8], ss;
  pair_sums<T, Threads>(d, r, sm, qq, dot, ss);
  const double sinv = stats[2 * r + 1];
  double mx = -INFINITY;
  for (std::int64_t j = threadIdx.x; j < M; j += Threads) mx = fmax(mx, double(Lr[j]));
  mx = block_max<double, Threads>(mx, sm.tmp.d, sm.d_shared);
  double pos[8], qinv[8];
  for (int i = 0; i < G; ++i) {
    if (i == v) continue;
    qinv[i] = l2_inv(::sqrt(qq[i]));
    pos[i] = dot[i] * sinv * qinv[i] * d.inv_tau;
    mx = fmax(mx, pos[i]);
  }
  double sneg = 0;
  for (std::int64_t j = threadIdx.x; j < M; j += Threads) sneg += ::exp(double(Lr[j]) - mx);
  sneg = block_sum<Threads>(sneg, sm.tmp.d, sm.d_shared);
  double loss = 0, wsum = 0;
  for (int i = 0; i < G; ++i) {
    double pc = 0;
    if (i != v) {
      const double lse = mx + ::log(::exp(pos[i] - mx) + sneg);
      loss += lse - pos[i];
      wsum += ::exp(mx - lse);
      pc = qinv[i] * d.scale * d.inv_tau * (::exp(pos[i] - lse) - 1.0);
    }
    if (threadIdx.x == 0) pos_coef[r * G + i] = pc;
  }
  if (threadIdx.x == 0) d.row_loss[r] = T(loss);
  if (!d.ds) return;
  const double a = d.scale * d.inv_tau * wsum;
  for (std::int64_t j = threadIdx.x; j < Q; j += Threads) Lr[j] = j < M ? T(a * ::exp(double(Lr[j]) - mx)) : T(0);
}

/// NT-Xent: a block per anchor row a over S [N, N] (ssl/nt_xent.hpp); d.scale = dloss / (n_terms B).
template <class T, int Threads>
__global__ void __launch_bounds__(Threads) nt_xent_kernel(pair_rows_desc<T> d, T* S) {
  __shared__ row_reduce_storage<T, Threads> sm;
  const std::int64_t a = blockIdx.x, N = std::int64_t(d.n_crops) * d.B;
  const int v = int(a / d.B), G = d.n_global;
  const std::int64_t b = a % d.B;
  T* Sa = S + a * N;
  const int m = v < G ? G - 1 : G;
  if (m == 0) {
    if (threadIdx.x == 0) d.row_loss[a] = T(0);
    if (d.ds)
      for (std::int64_t k = threadIdx.x; k < N; k += Threads) Sa[k] = T(0);
    return;
  }
  double mx = -INFINITY;
  for (std::int64_t k = threadIdx.x; k < N; k += Threads)
    if (k != a) mx = fmax(mx, double(Sa[k]));
  mx = block_max<double, Threads>(mx, sm.tmp.d, sm.d_shared);
  double z = 0;
  for (std::int64_t k = threadIdx.x; k < N; k += Threads)
    if (k != a) z += ::exp(double(Sa[k]) - mx);
  z = block_sum<Threads>(z, sm.tmp.d, sm.d_shared);
  const double lse = mx + ::log(z);
  if (threadIdx.x == 0) {
    double loss = double(m) * lse;
    for (int i = 0; i < G; ++i)
      if (i != v) loss -= double(Sa[std::int64_t(i) * d.B + b]);
    d.row_loss[a] = T(loss);
  }
  if (!d.ds) return;
  __syncthreads();  // thread 0 has read the positives
  const double c = d.scale;
  for (std::int64_t k = threadIdx.x; k < N; k += Threads) {
    if (k == a) {
      Sa[k] = T(0);
      continue;
    }
    T x = T(c * double(m) * ::exp(double(Sa[k]) - lse));
    const int ck = int(k / d.B);
    if (k % d.B == b && ck < G && ck != v) x = T(double(x) - c);
    Sa[k] = x;
  }
}

template <class T>
__global__ void symmetrize_sum_kernel(T* D, std::int64_t N) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * N;
       i += std::int64_t(blockDim.x) * gridDim.x) {
    const std::int64_t a = i / N, k = i % N;
    if (k <= a) continue;  // one thread per pair a < k owns both entries
    const T x = D[a * N + k] + D[k * N + a];
    D[a * N + k] = x;
    D[k * N + a] = x;
  }
}

// ---- the queue ---------------------------------------------------------------------------------------

template <class T>
__global__ void queue_commit_kernel(T* queue, const T* pending, const std::int64_t* state, std::int64_t n,
                                    std::int64_t cap, std::int64_t Q, std::int64_t K, const int* skip) {
  if (skip && *skip) return;
  const std::int64_t m = n < Q ? n : Q, head = state[1];
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < m * K;
       i += std::int64_t(blockDim.x) * gridDim.x) {
    const std::int64_t p = n - m + i / K, k = i % K;  // pending row p (the last m survive)
    queue[((head + p) % Q) * K + k] = pending[(p % cap) * K + k];
  }
}
template <class I>
__global__ void queue_state_kernel(I* state, I n, I Q, const int* skip) {
  if (skip && *skip) return;
  const I q = state[0] + n;
  state[0] = q < Q ? q : Q;
  state[1] = (state[1] + n) % Q;
}

inline unsigned grid_of(std::int64_t work) { return std::min(detail::grid_for(work), 4096u); }

}  // namespace variant_kernels

namespace variant_kernels {
/// Calls launch(std::integral_constant<int, Threads>) with the block size of a block-per-row
/// kernel: 256 threads, or 1024 for rows of 8192 or more elements.
template <class F>
inline void by_width(std::int64_t width, F launch) {
  if (width >= 8192) launch(std::integral_constant<int, 1024>{});
  else launch(std::integral_constant<int, 256>{});
}
/// The student rows of d (0: nothing to do), checked for the row kernels.
template <class T>
inline std::int64_t pair_rows(const pair_rows_desc<T>& d, const char* who) {
  const std::int64_t rows = std::int64_t(d.n_crops) * d.B;
  require<shape_error>(rows <= INT_MAX && d.K > 0 && d.n_global >= 1 && d.n_global <= 8, who,
                       ": unsupported shape (", rows, " rows, K = ", d.K, ", ", d.n_global, " global crops)");
  return rows > 0 ? rows : 0;
}
}  // namespace variant_kernels

/// Sinkhorn-Knopp targets (see the file comment); r [K] and c [R] are double scratch.
template <class T>
inline void sinkhorn_rows(const cuda_policy& pol, const T* t, T* q, T* entropy, double* r, double* c, std::int64_t R,
                          std::int64_t K, double inv_tau, int iterations) {
  namespace vk = variant_kernels;
  if (R <= 0) return;
  require<shape_error>(R <= INT_MAX && K > 0, "sinkhorn_rows: unsupported shape [", R, ", ", K, "]");
  const unsigned cols = unsigned((K + 255) / 256);
  vk::sinkhorn_max_kernel<<<cols, 256, 0, pol.stream>>>(t, r, R, K, inv_tau);
  vk::sinkhorn_exp_kernel<<<vk::grid_of(R * K), 256, 0, pol.stream>>>(t, r, q, R, K, inv_tau);
  vk::by_width(K, [&](auto threads) {
    constexpr int n = decltype(threads)::value;
    for (int it = 0; it < iterations; ++it) {
      vk::sinkhorn_row_scale_kernel<<<cols, 256, 0, pol.stream>>>(q, it == 0 ? nullptr : c, r, R, K);
      vk::sinkhorn_col_scale_kernel<T, n><<<unsigned(R), n, 0, pol.stream>>>(q, r, c, R, K);
    }
    vk::sinkhorn_finish_kernel<T, n><<<unsigned(R), n, 0, pol.stream>>>(q, r, c, entropy, R, K);
  });
  DINO_CUDA_LAUNCHED("sinkhorn_rows");
}

/// Row norms and normalised rows (see the file comment).
template <class T>
inline void l2_rows_stats(const cuda_policy& pol, const T* x, T* y, double* stats, std::int64_t rows, std::int64_t K,
                          std::int64_t y_offset = 0, std::int64_t y_rows = LLONG_MAX) {
  if (rows <= 0) return;
  variant_kernels::l2_rows_stats_kernel<<<variant_kernels::warp_rows_grid(rows), variant_kernels::warp_rows_threads, 0,
                                          pol.stream>>>(x, y, stats, rows, K, y_offset, y_rows);
  DINO_CUDA_LAUNCHED("l2_rows_stats");
}

template <class T>
inline void l2_grad_rows(const cuda_policy& pol, const pair_rows_desc<T>& d, const double* stats, const T* g,
                         const double* pos_coef) {
  const std::int64_t rows = variant_kernels::pair_rows(d, "l2_grad_rows");
  if (!rows) return;
  variant_kernels::l2_grad_rows_kernel<<<variant_kernels::warp_rows_grid(rows), variant_kernels::warp_rows_threads, 0,
                                         pol.stream>>>(d, stats, g, pos_coef);
  DINO_CUDA_LAUNCHED("l2_grad_rows");
}

template <class T>
inline void mse_rows(const cuda_policy& pol, const pair_rows_desc<T>& d) {
  const std::int64_t rows = variant_kernels::pair_rows(d, "mse_rows");
  if (!rows) return;
  variant_kernels::by_width(d.K, [&](auto threads) {
    constexpr int n = decltype(threads)::value;
    variant_kernels::mse_kernel<T, n><<<unsigned(rows), n, 0, pol.stream>>>(d);
  });
  DINO_CUDA_LAUNCHED("mse_rows");
}

template <class T>
inline void info_nce_rows(const cuda_policy& pol, const pair_rows_desc<T>& d, const double* stats, T* L,
                          const std::int64_t* queued, std::int64_t Q, double* pos_coef) {
  const std::int64_t rows = variant_kernels::pair_rows(d, "info_nce_rows");
  if (!rows) return;
  variant_kernels::by_width(Q, [&](auto threads) {
    constexpr int n = decltype(threads)::value;
    variant_kernels::info_nce_kernel<T, n><<<unsigned(rows), n, 0, pol.stream>>>(d, stats, L, queued, Q, pos_coef);
  });
  DINO_CUDA_LAUNCHED("info_nce_rows");
}

template <class T>
inline void nt_xent_rows(const cuda_policy& pol, const pair_rows_desc<T>& d, T* S) {
  const std::int64_t rows = variant_kernels::pair_rows(d, "nt_xent_rows");
  if (!rows) return;
  variant_kernels::by_width(rows, [&](auto threads) {
    constexpr int n = decltype(threads)::value;
    variant_kernels::nt_xent_kernel<T, n><<<unsigned(rows), n, 0, pol.stream>>>(d, S);
  });
  DINO_CUDA_LAUNCHED("nt_xent_rows");
}

template <class T>
inline void symmetrize_sum(const cuda_policy& pol, T* D, std::int64_t N) {
  if (N <= 1) return;
  variant_kernels::symmetrize_sum_kernel<<<variant_kernels::grid_of(N * N), 256, 0, pol.stream>>>(D, N);
  DINO_CUDA_LAUNCHED("symmetrize_sum");
}

template <class T>
inline void queue_commit(const cuda_policy& pol, T* queue, const T* pending, std::int64_t* state, std::int64_t n,
                         std::int64_t cap, std::int64_t Q, std::int64_t K, const int* skip) {
  if (n <= 0) return;
  const std::int64_t m = n < Q ? n : Q;
  variant_kernels::queue_commit_kernel<<<variant_kernels::grid_of(m * K), 256, 0, pol.stream>>>(queue, pending, state, n,
                                                                                                cap, Q, K, skip);
  DINO_CUDA_LAUNCHED("queue_commit");
  variant_kernels::queue_state_kernel<std::int64_t><<<1, 1, 0, pol.stream>>>(state, n, Q, skip);
  DINO_CUDA_LAUNCHED("queue_commit state");
}

namespace variant_kernels {
// A block per crop: score[j] = sum over heads of the CLS attention to patch j (double, head
// order; NaN as -inf), rank[j] = #{i : score_i > score_j or (score_i == score_j and i < j)};
// the patches of rank < k are kept, written in ascending order (their position among the
// kept = the kept patches of lower index).
template <class T>
__global__ void select_kept_kernel(const T* attn, std::int64_t heads, std::int64_t n, std::int64_t k,
                                   std::int64_t* keep) {
  extern __shared__ double score[];  // [n], then the flags: n ints padded to a multiple of 4, plus 4
  int* flag = reinterpret_cast<int*>(score + n);
  const std::int64_t c = blockIdx.x;
  const T* a = attn + c * heads * (1 + n);
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    double s = 0;
    for (std::int64_t h = 0; h < heads; ++h) s += double(a[h * (1 + n) + 1 + j]);
    score[j] = isnan(s) ? -INFINITY : s;
  }
  __syncthreads();
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const double sj = score[j];
    std::int64_t rank = 0;
    for (std::int64_t i = 0; i < n; ++i) rank += (score[i] > sj || (score[i] == sj && i < j)) ? 1 : 0;
    flag[j] = rank < k ? 1 : 0;
  }
  // The padding is zeroed and allocated because the compiler may read the scores two and the
  // flags four at a time (16-byte loads) past the last element.
  for (std::int64_t j = n + threadIdx.x; j < (n + 3) / 4 * 4 + 4; j += blockDim.x) flag[j] = 0;
  __syncthreads();
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x)
    if (flag[j]) {
      std::int64_t pos = 0;
      for (std::int64_t i = 0; i < j; ++i) pos += flag[i];
      keep[c * k + pos] = j;
    }
}
}  // namespace variant_kernels

/// keep [crops, k] (=) the k patches of each crop that the CLS attention attn [crops, heads *
/// (1 + n)] ranks highest, ascending (ssl::attention_mask's ranking; device memory).
template <class T>
inline void select_kept_patches(const cuda_policy& pol, const T* attn, std::int64_t crops, std::int64_t heads,
                                std::int64_t n, std::int64_t k, std::int64_t* keep) {
  require<shape_error>(n > 0 && k >= 1 && k <= n && heads > 0, "select_kept_patches: k = ", k, " of n = ", n,
                       " patches, ", heads, " heads");
  if (crops <= 0) return;
  const std::size_t smem = std::size_t(n) * sizeof(double) + std::size_t((n + 3) / 4 * 4 + 4) * sizeof(int);
  require<shape_error>(smem <= 48 * 1024, "select_kept_patches: ", n, " patches per crop do not fit a block");
  variant_kernels::select_kept_kernel<<<unsigned(crops), 256, smem, pol.stream>>>(attn, heads, n, k, keep);
  DINO_CUDA_LAUNCHED("select_kept_patches");
}

}  // namespace dino::cuda

namespace dino {
using cuda::info_nce_rows;
using cuda::select_kept_patches;
using cuda::l2_grad_rows;
using cuda::l2_rows_stats;
using cuda::mse_rows;
using cuda::nt_xent_rows;
using cuda::queue_commit;
using cuda::sinkhorn_rows;
using cuda::symmetrize_sum;
}  // namespace dino
