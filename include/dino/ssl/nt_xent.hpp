// dino/ssl/nt_xent.hpp: SimCLR's NT-Xent loss over in-batch negatives, on the crop pairs of
// cross_entropy_distillation.
//
// There is no teacher: both sides of a pair are student rows. Rows are crop-major, s
// [n_crops * B, K], z^_r = s_r / max(||s_r||, 1e-12), S_rk = z^_r . z^_k / tau (tau 0.1, the
// official SimCLR code's default). For each pair (anchor crop v, positive crop i != v,
// i < n_global) and image b, with a = (v, b) and p = (i, b):
//
//   term = -log( exp(S_ap) / sum_{k != a} exp(S_ak) )      (k over all n_crops * B rows)
//   loss = 1 / (n_terms B) sum_{i < n_global} sum_{v != i} sum_b term
//
// With 2 crops this is SimCLR's loss: the mean over the 2B anchors (the official TF code
// returns loss_a + loss_b, twice this). With local crops, each local row is an anchor for
// every global crop of its image and a negative for every other row (the multi-crop form).
// The gradient reaches every row (anchors, positives, negatives): with m_v the partners of
// crop v, lse_a = log sum_{k != a} exp(S_ak) and c = dloss / (n_terms B):
//
//   dS_ak = c (m_v exp(S_ak - lse_a) - [k is a positive of a]),  dS_aa = 0
//   dz^  = (dS + dS^T) z^ / tau,   then through the normalisation of each row
//
// q (the teacher rows the concept passes) is not read: a method using NT-Xent needs no
// teacher forward (see docs/api.md, "Variant parts"). Two GEMMs per call in T (the policy's
// gemm: z^ z^T and (dS + dS^T) z^); the row work is in double. Scratch [N, N] and [N, K]
// grows on first use (reserve(N) plans it on the GPU; the method calls it at construction),
// so one instance must not run two forwards at once.
//
// nt_xent<T, Space>: Space holds the scratch. On the GPU (device_space, cuda_policy) the two
// GEMMs run through cuBLASLt and the row work is a block per anchor in double, dS + dS^T a
// thread per pair, the normalisation's backward a warp per row (policy/cuda/variants.cuh);
// the forms taking a scalar_out leave the loss in device memory and read nothing back.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/core/tensor.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/ssl/variant_detail.hpp"

namespace dino::ssl {

struct nt_xent_config {
  int n_crops = 2;           ///< 2 global + M local
  int n_global = 2;          ///< crops that serve as positives (the first n_global)
  double temperature = 0.1;  ///< tau
};

template <class T, class Space = host_space>
class nt_xent : public detail::pair_loss_forms<nt_xent<T, Space>> {
  static constexpr bool on_host = std::is_same_v<Space, host_space>;
  friend struct detail::pair_loss_forms<nt_xent>;

 public:
  static constexpr const char* backward_name = "nt_xent backward";
  using space = Space;
  /// The method skips the teacher forward, the targets and the teacher update (ssl/concepts.hpp).
  static constexpr bool uses_teacher = false;
  nt_xent() = default;
  explicit nt_xent(nt_xent_config c) : cfg_(c) {
    detail::crop_pairs::check("nt_xent", c.n_crops, c.n_global);
    require<config_error>(c.temperature > 0, "nt_xent: temperature must be positive, got ", c.temperature);
  }
  /// Plans the scratch for N rows (device memory; nothing on the host).
  void reserve(std::int64_t N, std::int64_t K) const {
    if constexpr (!on_host) grow_scratch(N, K);
  }
  const nt_xent_config& config() const { return cfg_; }
  int n_terms() const { return detail::crop_pairs::n_terms(cfg_.n_crops, cfg_.n_global); }

 private:
  void grow_scratch(std::int64_t N, std::int64_t K) const {
    const auto n = [](std::int64_t v) { return static_cast<std::size_t>(v); };
    detail::grow(zhat_d_, n(N * K));
    detail::grow(sim_d_, n(N * N));
    detail::grow(dz_d_, n(N * K));
    detail::grow(stats_d_, n(2 * N));
  }

  // q (the teacher rows) is not read.
  template <class Policy, class S>
  double run(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S>, tensor_view<T, S> row_loss, T* ds,
             double dloss, bool accumulate, const scalar_out* out) const {
    DINO_CHECK_SPACE(Policy, S);
    static_assert(std::is_same_v<S, Space>, "nt_xent: the rows are not in the scratch's memory space");
    const int V = cfg_.n_crops, G = cfg_.n_global;
    const std::int64_t B = detail::pair_batch("nt_xent", V, G, s, tensor_view<const T, S>{}, false);
    check_shape("nt_xent", row_loss, {s.rows()});
    if constexpr (!on_host) {
      return device_run(pol, s, row_loss, ds, dloss, accumulate, out, B);
    } else {
      (void)out;
      return host_run(pol, s, row_loss, ds, dloss, accumulate, B);
    }
  }
  // The GPU's run: the same steps as host_run's.
  template <class Policy, class S>
  double device_run(const Policy& pol, tensor_view<const T, S> s, tensor_view<T, S> row_loss, T* ds, double dloss,
                    bool accumulate, const scalar_out* out, std::int64_t B) const {
    const std::int64_t K = s.shape[1], N = s.rows();
    const double inv_tau = 1.0 / cfg_.temperature, divisor = double(n_terms()) * double(B);
    grow_scratch(N, K);
    l2_rows_stats(pol, s.data, zhat_d_.data(), stats_d_.data(), N, K);
    const T* zhat = zhat_d_.data();
    gemm_desc d;
    d.trans_b = true;
    d.m = N;
    d.n = N;
    d.k = K;
    gemm(pol, d, T(inv_tau), zhat, zhat, T(0), sim_d_.data());
    const pair_rows_desc<T> pd{s.data, nullptr, row_loss.data, ds, B, K, cfg_.n_crops, cfg_.n_global,
                               dloss / divisor, inv_tau, accumulate};
    nt_xent_rows(pol, pd, sim_d_.data());
    const double loss = detail::loss_total(pol, "nt_xent", row_loss, divisor, out, {s});
    if (ds) {
      symmetrize_sum(pol, sim_d_.data(), N);
      gemm_desc g;
      g.m = N;
      g.n = K;
      g.k = N;
      gemm(pol, g, T(inv_tau), static_cast<const T*>(sim_d_.data()), zhat, T(0), dz_d_.data());
      l2_grad_rows(pol, pd, static_cast<const double*>(stats_d_.data()), static_cast<const T*>(dz_d_.data()),
                   static_cast<const double*>(nullptr));
    }
    return loss;
  }

  template <class Policy, class S>
  double host_run(const Policy& pol, tensor_view<const T, S> s, tensor_view<T, S> row_loss, T* ds, double dloss,
                  bool accumulate, std::int64_t B) const {
    const int G = cfg_.n_global;
    const std::int64_t K = s.shape[1], N = s.rows();
    const double inv_tau = 1.0 / cfg_.temperature;
    const double c = dloss / (double(n_terms()) * double(B));
    zhat_.resize(static_cast<std::size_t>(N * K));
    znorm_.resize(static_cast<std::size_t>(N));
    for_each_row(pol, N, [&](std::int64_t r) {
      const auto st = detail::l2_row(s.data + r * K, K);
      znorm_[std::size_t(r)] = st;
      for (std::int64_t k = 0; k < K; ++k) zhat_[std::size_t(r * K + k)] = T(double(s.data[r * K + k]) * st.inv);
    });
    // S = z^ z^T / tau  [N, N]
    sim_.resize(static_cast<std::size_t>(N * N));
    {
      gemm_desc d;
      d.trans_b = true;
      d.m = N;
      d.n = N;
      d.k = K;
      gemm(pol, d, T(inv_tau), zhat_.data(), zhat_.data(), T(0), sim_.data());
    }
    // per anchor row: the loss, and dS (in place of S) when a gradient is asked for
    for_each_row(pol, N, [&](std::int64_t a) {
      const int v = int(a / B);
      const std::int64_t b = a % B;
      T* Sa = sim_.data() + a * N;
      const int m = detail::crop_pairs::partners(v, G);
      if (m == 0) {
        row_loss.data[a] = T(0);
        if (ds) std::fill(Sa, Sa + N, T(0));
        return;
      }
      double mx = -INFINITY;
      for (std::int64_t k = 0; k < N; ++k)
        if (k != a) mx = std::max(mx, double(Sa[k]));
      double z = 0;
      for (std::int64_t k = 0; k < N; ++k)
        if (k != a) z += std::exp(double(Sa[k]) - mx);
      const double lse = mx + std::log(z);
      double loss = double(m) * lse;
      for (int i = 0; i < G; ++i)
        if (i != v) loss -= double(Sa[std::int64_t(i) * B + b]);
      row_loss.data[a] = T(loss);
      if (!ds) return;
      for (std::int64_t k = 0; k < N; ++k) Sa[k] = k == a ? T(0) : T(c * double(m) * std::exp(double(Sa[k]) - lse));
      for (int i = 0; i < G; ++i)
        if (i != v) Sa[std::int64_t(i) * B + b] = T(double(Sa[std::int64_t(i) * B + b]) - c);
    });
    double total = 0;
    for (std::int64_t r = 0; r < N; ++r) total += double(row_loss.data[r]);
    if (!std::isfinite(total)) detail::throw_non_finite<T>("nt_xent", {s});
    if (ds) {
      // dS + dS^T (in place), then dz^ = (dS + dS^T) z^ / tau
      T* D = sim_.data();
      for (std::int64_t a = 0; a < N; ++a)
        for (std::int64_t k = a + 1; k < N; ++k) {
          const T x = D[a * N + k] + D[k * N + a];
          D[a * N + k] = x;
          D[k * N + a] = x;
        }
      dz_.resize(static_cast<std::size_t>(N * K));
      gemm_desc d;
      d.m = N;
      d.n = K;
      d.k = N;
      gemm(pol, d, T(inv_tau), D, zhat_.data(), T(0), dz_.data());
      for_each_row(pol, N, [&](std::int64_t r) {
        thread_local std::vector<double> buf;
        buf.resize(static_cast<std::size_t>(2 * K));
        double* y = buf.data();
        double* g = y + K;
        const auto st = znorm_[std::size_t(r)];
        for (std::int64_t k = 0; k < K; ++k) {
          y[k] = double(s.data[r * K + k]) * st.inv;
          g[k] = double(dz_[std::size_t(r * K + k)]);
        }
        detail::l2_row_backward(y, st, g, ds + r * K, K, 1.0, accumulate);
      });
    }
    return total / (double(n_terms()) * double(B));
  }

  nt_xent_config cfg_{};
  mutable std::vector<T> zhat_, sim_, dz_;
  mutable std::vector<detail::l2_stats> znorm_;
  mutable detail::scratch_for<T, Space> zhat_d_, sim_d_, dz_d_;  // device scratch (GPU only)
  mutable detail::scratch_for<double, Space> stats_d_;
};

}  // namespace dino::ssl
