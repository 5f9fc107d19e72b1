// dino/policy/cpu/softmax_rows.hpp: the CPU policy's fused row kernels for the DINO loss.
//
// The loss touches every one of K = 65,536 logits of every crop several times; with scalar
// libm exp it is bound by exp, not by memory. These kernels run the same formulas as
// math/softmax.hpp and math/cross_entropy.hpp over a whole row with a vectorised exp
// (policy/cpu/vexp.hpp, within 2 ulp of libm's) and Eigen's vectorised max and sums, in tiles
// that stay in L1, accumulating tile sums in double:
//
//   softmax_targets_row:  q = softmax((t - c) / tau); returns {lse, entropy = sum q (lse - z)}
//   student_row:          lse of s / tau and, per target row q_i, the dots sum q_i and
//                         sum q_i s / tau (the loss is sum_i lse * sum q_i - sum q_i s / tau);
//                         optionally exp(s / tau - max) into the gradient row
//   student_row_grad_*:   ds (=|+=) scale * (mass * softmax(s / tau) - sum_i q_i), from those
//                         exp values in place, or recomputing them to accumulate
//   softmax_row_inplace:  a short row's softmax in place (attention), one exp per element
//
// The composition of the math/ functors is the reference these are tested against. The
// CUDA twins of softmax_targets and distillation_rows are in policy/cuda/loss.cuh.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#include "dino/policy/cpu/parallel.hpp"
#include "dino/policy/cpu/simd.hpp"
#include "dino/policy/cpu/vexp.hpp"

namespace dino::cpu {

namespace detail {
inline constexpr std::int64_t softmax_tile = 512;
template <class T>
using arr_map = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
template <class T>
using arr_mut = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
}  // namespace detail

template <class T>
struct softmax_target_stats {
  T lse;
  double entropy;
};

/// q = softmax((t - c) * inv_tau) (c may be null); returns lse and the row's entropy.
template <class T>
inline softmax_target_stats<T> softmax_targets_row(const T* t, const T* c, T* q, std::int64_t K, T inv_tau) {
  using detail::arr_map;
  using detail::arr_mut;
  constexpr std::int64_t tile = detail::softmax_tile;
  // z = (t - c) * inv_tau is recomputed per pass instead of stored: it costs less than a
  // store and a reload.
  T mx = -INFINITY;
  for (std::int64_t k0 = 0; k0 < K; k0 += tile) {
    const std::int64_t n = K - k0 < tile ? K - k0 : tile;
    const T m = c ? ((arr_map<T>(t + k0, n) - arr_map<T>(c + k0, n)) * inv_tau).maxCoeff()
                  : (arr_map<T>(t + k0, n) * inv_tau).maxCoeff();
    mx = m > mx ? m : mx;
  }
  double sum = 0;
  for (std::int64_t k0 = 0; k0 < K; k0 += tile) {
    const std::int64_t n = K - k0 < tile ? K - k0 : tile;
    arr_mut<T> e(q + k0, n);
    if (c) e = (arr_map<T>(t + k0, n) - arr_map<T>(c + k0, n)) * inv_tau - mx;
    else e = arr_map<T>(t + k0, n) * inv_tau - mx;
    exp_inplace(q + k0, n);
    sum += double(e.sum());
  }
  const T lse = mx + T(std::log(sum));
  const T inv_sum = T(1.0 / sum);
  // q = exp(z - mx) / sum (the exp values are already in q): one multiply, no second exp.
  // entropy = sum q (lse - z)
  double h = 0;
  for (std::int64_t k0 = 0; k0 < K; k0 += tile) {
    const std::int64_t n = K - k0 < tile ? K - k0 : tile;
    arr_mut<T> e(q + k0, n);
    e *= inv_sum;
    if (c) h += double((e * (lse - (arr_map<T>(t + k0, n) - arr_map<T>(c + k0, n)) * inv_tau)).sum());
    else h += double((e * (lse - arr_map<T>(t + k0, n) * inv_tau)).sum());
  }
  return {lse, h};
}

/// sum_k x_k in double (tile sums in T).
template <class T>
inline double row_sum(const T* x, std::int64_t K) {
  constexpr std::int64_t tile = detail::softmax_tile;
  double s = 0;
  for (std::int64_t k0 = 0; k0 < K; k0 += tile) s += double(detail::arr_map<T>(x + k0, K - k0 < tile ? K - k0 : tile).sum());
  return s;
}

namespace detail {
/// The sum of 16 lane sums, lane j holding the elements i = j (mod 16) in index order:
/// the one summation order of softmax_row_inplace on every SIMD level.
template <class T>
inline T combine_lanes16(const T* l) {
  T h[8];
  for (int j = 0; j < 8; ++j) h[j] = l[j] + l[j + 8];
  for (int j = 0; j < 4; ++j) h[j] = h[j] + h[j + 4];
  return (h[0] + h[2]) + (h[1] + h[3]);
}

#if DINO_GEMM_X86
/// softmax_row_inplace for float, 16 lanes (the same sums; exp512_ps instead of exp_ps).
DINO_SIMD_AVX512_TARGET inline void softmax_row_inplace_avx512(float* x, std::int64_t n) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY), pinf = _mm512_set1_ps(INFINITY);
  __m512 vmx = ninf;
  __mmask16 bad = 0;
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = pgemm::lanes16(n - i);
    const __m512 v = _mm512_mask_loadu_ps(ninf, m, x + i);
    bad |= _mm512_mask_cmp_ps_mask(m, v, pinf, _CMP_NLT_UQ);  // NaN or +inf
    vmx = max512(vmx, v);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, vmx);  // (GCC 12's _mm512_reduce_max_ps warns of an undefined register)
  float mx = lanes[0];
  for (int j = 1; j < 16; ++j) mx = lanes[j] > mx ? lanes[j] : mx;
  if (bad || mx == -INFINITY) {  // (all -inf: NaN too, as exp(-inf - -inf))
    for (std::int64_t i = 0; i < n; ++i) x[i] = NAN;
    return;
  }
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = pgemm::lanes16(n - i);
    const __m512 e = exp512_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vm));
    _mm512_mask_storeu_ps(x + i, m, e);
    acc = _mm512_mask_add_ps(acc, m, acc, e);
  }
  _mm512_store_ps(lanes, acc);
  const __m512 vs = _mm512_set1_ps(combine_lanes16(lanes));
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = pgemm::lanes16(n - i);
    _mm512_mask_storeu_ps(x + i, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), vs));
  }
}
#endif
}  // namespace detail

/// x = softmax(x) over one short row, in place (attention probabilities): a max sweep, the
/// vectorised exp of x - max (one exp per element, where math::softmax_row takes two), then
/// x / sum, the sum taken as 16 lane sums in index order (detail::combine_lanes16) on every
/// SIMD level. A row holding NaN or +inf, or only -inf, becomes all NaN, as math::softmax_row
/// makes it (the vectorised exp clamps a NaN). With AVX-512 (simd.hpp) float runs 16 lanes
/// at a time; the levels can differ in the last bit (the exp's fused multiply-adds).
template <class T>
inline void softmax_row_inplace(T* x, std::int64_t n) {
#if DINO_GEMM_X86
  if constexpr (std::is_same_v<T, float>) {
    if (simd_avx512()) {
      detail::softmax_row_inplace_avx512(x, n);
      return;
    }
  }
#endif
  T mx = -INFINITY;
  bool bad = false;
  for (std::int64_t i = 0; i < n; ++i) {
    bad |= !(x[i] < T(INFINITY));
    mx = x[i] > mx ? x[i] : mx;
  }
  if (bad || mx == -T(INFINITY)) {  // (all -inf: NaN too, as exp(-inf - -inf))
    for (std::int64_t i = 0; i < n; ++i) x[i] = T(NAN);
    return;
  }
  for (std::int64_t i = 0; i < n; ++i) x[i] -= mx;
  exp_inplace(x, n);
  T lanes[16] = {};
  for (std::int64_t i = 0; i < n; ++i) lanes[i % 16] += x[i];
  const T s = detail::combine_lanes16(lanes);
  for (std::int64_t i = 0; i < n; ++i) x[i] /= s;
}

/// The forward of one student row against up to 8 target rows.
template <class T>
struct student_row_stats {
  T lse;
  double sum_exp;  ///< sum_k exp(s_k / tau - max)
  T max;           ///< max_k s_k / tau
  double q_dot;    ///< sum_i sum_k q_i,k s_k / tau over the targets
};

/// lse of s * inv_tau and the targets' summed dot with s / tau. With `e_out`, also writes exp(s / tau - max)
/// there, so that the gradient needs no second exp (the caller's gradient row serves).
template <class T>
inline student_row_stats<T> student_row(const T* s, std::int64_t K, T inv_tau, const T* const* targets, int n_targets,
                                        T* e_out = nullptr) {
  using detail::arr_map;
  using detail::arr_mut;
  constexpr std::int64_t tile = detail::softmax_tile;
  student_row_stats<T> st{};
  T mx = -INFINITY;
  for (std::int64_t k0 = 0; k0 < K; k0 += tile) {
    const std::int64_t n = K - k0 < tile ? K - k0 : tile;
    const T m = (arr_map<T>(s + k0, n) * inv_tau).maxCoeff();
    mx = m > mx ? m : mx;
  }
  double sum = 0;
  alignas(64) T buf[tile];
  for (std::int64_t k0 = 0; k0 < K; k0 += tile) {
    const std::int64_t n = K - k0 < tile ? K - k0 : tile;
    arr_map<T> z(s + k0, n);
    T* ep = e_out ? e_out + k0 : buf;
    arr_mut<T> e(ep, n);
    e = z * inv_tau - mx;
    exp_inplace(ep, n);
    sum += double(e.sum());
    if (n_targets == 2) st.q_dot += double(((arr_map<T>(targets[0] + k0, n) + arr_map<T>(targets[1] + k0, n)) * z).sum());
    else
      for (int i = 0; i < n_targets; ++i) st.q_dot += double((arr_map<T>(targets[i] + k0, n) * z).sum());
  }
  st.q_dot *= double(inv_tau);
  st.max = mx;
  st.sum_exp = sum;
  st.lse = mx + T(std::log(sum));
  return st;
}

/// ds = scale * (mass * e / sum_exp - sum_i q_i), where ds already holds e = exp(s / tau - max)
/// (written by student_row).
template <class T>
inline void student_row_grad_from_exp(std::int64_t K, double sum_exp, const T* const* targets, int n_targets, T mass,
                                      T scale, T* ds) {
  using detail::arr_map;
  using detail::arr_mut;
  constexpr std::int64_t tile = detail::softmax_tile;
  const T a = T(double(scale) * double(mass) / sum_exp);
  for (std::int64_t k0 = 0; k0 < K; k0 += tile) {
    const std::int64_t n = K - k0 < tile ? K - k0 : tile;
    arr_mut<T> d(ds + k0, n);
    if (n_targets == 2) d = a * d - scale * (arr_map<T>(targets[0] + k0, n) + arr_map<T>(targets[1] + k0, n));
    else if (n_targets == 1) d = a * d - scale * arr_map<T>(targets[0] + k0, n);
    else {
      d *= a;
      for (int i = 0; i < n_targets; ++i) d -= scale * arr_map<T>(targets[i] + k0, n);
    }
  }
}

/// ds += scale * (mass * exp(s * inv_tau - lse) - sum_i q_i) for one student row.
template <class T>
inline void student_row_grad_accumulate(const T* s, std::int64_t K, T inv_tau, T lse, const T* const* targets,
                                        int n_targets, T mass, T scale, T* ds) {
  using detail::arr_map;
  using detail::arr_mut;
  constexpr std::int64_t tile = detail::softmax_tile;
  alignas(64) T buf[tile];
  for (std::int64_t k0 = 0; k0 < K; k0 += tile) {
    const std::int64_t n = K - k0 < tile ? K - k0 : tile;
    arr_mut<T> d(ds + k0, n);
    arr_mut<T> p(buf, n);
    p = arr_map<T>(s + k0, n) * inv_tau - lse;
    exp_inplace(buf, n);
    d += (scale * mass) * p;
    for (int i = 0; i < n_targets; ++i) d -= scale * arr_map<T>(targets[i] + k0, n);
  }
}

}  // namespace dino::cpu

namespace dino {

/// Teacher targets over rows (the fused kernel behind ssl::centering::targets):
/// q[r] = softmax((t[r] - c) * inv_tau), entropy[r] its entropy.
template <class T>
inline void softmax_targets(const cpu_policy& pol, const T* t, const T* c, T* q, T* entropy, std::int64_t rows,
                            std::int64_t K, T inv_tau) {
  for_each_row(pol, rows, [&](std::int64_t r) {
    entropy[r] = T(cpu::softmax_targets_row(t + r * K, c, q + r * K, K, inv_tau).entropy);
  });
}

/// Cross-entropy distillation over crop-major rows (the fused kernel behind
/// ssl::cross_entropy_distillation): for student crop v of image b, row_loss = sum over the
/// targets i != v of -sum_k q_i log softmax(s / tau); with ds, also its gradient times
/// `grad_scale` (=|+=). Images run in parallel, each image's crops in order, so that the
/// image's target rows stay in cache.
template <class T>
struct distillation_desc {
  const T* s = nullptr;  ///< student logits [n_crops * B, K]
  const T* q = nullptr;  ///< targets [n_global * B, K]
  T* row_loss = nullptr; ///< [n_crops * B]
  T* ds = nullptr;       ///< [n_crops * B, K] or null (forward only)
  std::int64_t B = 0, K = 0;
  int n_crops = 0, n_global = 0;
  T inv_tau = 1, grad_scale = 0;
  bool accumulate = false;
};

template <class T>
inline void distillation_rows(const cpu_policy& pol, const distillation_desc<T>& d) {
  for_each_row(pol, d.B, [&](std::int64_t b) {
    double mass_of[8];  // sum_k q_i,k: once per target row, not once per pair
    for (int i = 0; i < d.n_global; ++i) mass_of[i] = cpu::row_sum(d.q + (i * d.B + b) * d.K, d.K);
    for (int v = 0; v < d.n_crops; ++v) {
      const T* targets[8];
      int nt = 0;
      double mass = 0;
      for (int i = 0; i < d.n_global; ++i)
        if (i != v) {
          targets[nt++] = d.q + (i * d.B + b) * d.K;
          mass += mass_of[i];
        }
      const std::int64_t r = v * d.B + b;
      const T* sr = d.s + r * d.K;
      // Writing the gradient: the exp values go to its row first and the gradient is formed
      // in place (one exp per logit). Accumulating: the gradient pass recomputes them.
      T* e_out = d.ds && !d.accumulate ? d.ds + r * d.K : nullptr;
      auto st = cpu::student_row(sr, d.K, d.inv_tau, targets, nt, e_out);
      d.row_loss[r] = T(double(st.lse) * mass - st.q_dot);
      if (e_out) cpu::student_row_grad_from_exp(d.K, st.sum_exp, targets, nt, T(mass), d.grad_scale, e_out);
      else if (d.ds)
        cpu::student_row_grad_accumulate(sr, d.K, d.inv_tau, st.lse, targets, nt, T(mass), d.grad_scale,
                                         d.ds + r * d.K);
    }
  });
}

}  // namespace dino
