// dino/ssl/sinkhorn.hpp: the Sinkhorn-Knopp teacher target of SwAV and DINOv2 (dino-spec §8.2).
//
// DINOv2's DINOLoss.sinkhorn_knopp_teacher on one process (world_size 1), for raw teacher
// logits t [R, K] (R samples: every global crop of every image of the micro-batch):
//
//   Q = exp(t / tau)^T                        [K, R]
//   Q /= sum(Q)
//   repeat n_iterations (3):
//     Q /= row sums (over samples, per prototype);  Q /= K
//     Q /= column sums (over prototypes, per sample);  Q /= R
//   Q *= R;  q = Q^T                          each sample's row of q sums to 1
//
// Computed as Q = diag(r) E diag(c) with E = exp(t / tau - m) and scale vectors r [K],
// c [R] in double: E is formed once (in q) and each half-iteration only updates a scale
// vector, which is the same arithmetic in another order. m_k = max over samples of t_k / tau
// is subtracted per prototype: the first row normalisation cancels any per-prototype factor
// (and the global sum any scalar), so the result is unchanged while exp never overflows.
// A sample whose every exp(t / tau - m) underflows to 0 cannot be normalised: numeric_error.
//
// No running state: observe / commit / discard do nothing. targets() returns the mean
// entropy of the rows of q (the scalar_out form leaves it in the policy's memory). Scratch
// (r, c: K + R doubles) is held by the object, in Space, and grows on first use (reserve(R)
// plans it: the method calls it at construction), so one instance must not run targets()
// from two threads at once.
// Micro-batches are normalised each on their own (DINOv2 all-reduces the sums over GPUs;
// gradient accumulation here does not gather rows across micro-batches).
//
// sinkhorn_knopp<T, Space>: Space is host_space (the CPU loops below) or device_space (the
// kernels of policy/cuda/variants.cuh: the same arithmetic in double, a thread per prototype
// summing the samples in order, a block per sample). On the GPU non-finite or unnormalisable
// rows are not reported by the scalar_out form: they make q, hence the loss, NaN, and the
// method skips the step; the form returning a double throws numeric_error as on the CPU.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dino/core/buffer.hpp"
#include "dino/core/error.hpp"
#include "dino/core/tensor.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/ssl/variant_detail.hpp"

namespace dino::ssl {

struct sinkhorn_config {
  std::int64_t out_dim = 65536;  ///< K
  int iterations = 3;            ///< DINOv2's n_iterations
};

template <class T, class Space = host_space>
class sinkhorn_knopp : public detail::no_running_state {
  static constexpr bool on_host = std::is_same_v<Space, host_space>;

 public:
  using space = Space;
  sinkhorn_knopp() = default;
  explicit sinkhorn_knopp(sinkhorn_config c) : cfg_(c) {
    require<config_error>(c.out_dim > 0, "sinkhorn_knopp: out_dim must be positive, got ", c.out_dim);
    require<config_error>(c.iterations >= 1, "sinkhorn_knopp: need at least 1 iteration, got ", c.iterations);
    if constexpr (!on_host) r_d_.resize(static_cast<std::size_t>(c.out_dim));
  }
  /// Plans the scratch for R rows of K (device memory; nothing on the host).
  void reserve(std::int64_t R, std::int64_t /*K*/) {
    if constexpr (!on_host) detail::grow(c_d_, static_cast<std::size_t>(R));
  }
  std::int64_t out_dim() const { return cfg_.out_dim; }
  const sinkhorn_config& config() const { return cfg_; }

  /// q = Sinkhorn-Knopp(exp(t / tau)) (each row a distribution over the K prototypes whose
  /// columns are balanced); row_entropy [R] gets each row's entropy; returns their mean.
  template <class Policy, class S>
  double targets(const Policy& pol, tensor_view<const T, S> t, double tau, tensor_view<T, S> q,
                 tensor_view<T, S> row_entropy) const {
    check(pol, t, tau, q, row_entropy);
    if constexpr (policy_traits<Policy>::is_host) {
      return host_targets(pol, t, tau, q, row_entropy);
    } else {
      device_targets(pol, t, tau, q, row_entropy);
      const double h = sum_to_host(pol, static_cast<const T*>(row_entropy.data), t.rows(), double(t.rows()));
      if (!std::isfinite(h)) {
        if (!all_finite(pol, t.data, t.numel())) detail::report_non_finite(pol, "sinkhorn_knopp targets", {t});
        throw numeric_error(dino::detail::concat("sinkhorn_knopp targets: a sample of ", t.name,
                                                 " cannot be normalised (tau = ", tau, " is too small for these logits)"));
      }
      return h;
    }
  }
  /// The same, leaving the mean entropy in the policy's memory: *mean_entropy.value (=|+=)
  /// weight * mean entropy. Reads nothing back on the GPU.
  template <class Policy, class S>
  void targets(const Policy& pol, tensor_view<const T, S> t, double tau, tensor_view<T, S> q,
               tensor_view<T, S> row_entropy, scalar_out mean_entropy) const {
    check(pol, t, tau, q, row_entropy);
    if constexpr (policy_traits<Policy>::is_host) host_targets(pol, t, tau, q, row_entropy);
    else device_targets(pol, t, tau, q, row_entropy);
    sum_to(pol, static_cast<const T*>(row_entropy.data), t.rows(), double(t.rows()), mean_entropy);
  }

 private:
  template <class Policy, class S>
  void check(const Policy&, tensor_view<const T, S> t, double tau, tensor_view<T, S> q,
             tensor_view<T, S> row_entropy) const {
    DINO_CHECK_SPACE(Policy, S);
    static_assert(std::is_same_v<S, Space>, "sinkhorn_knopp::targets: the logits are not in the target's memory space");
    check_matrix("sinkhorn_knopp targets", t, cfg_.out_dim);
    check_shape("sinkhorn_knopp targets", q, t.shape);
    check_shape("sinkhorn_knopp targets", row_entropy, {t.rows()});
    require<config_error>(tau > 0, "sinkhorn_knopp targets: teacher temperature must be positive, got ", tau);
    require<shape_error>(t.rows() > 0, "sinkhorn_knopp targets: ", t.name, " has no rows");
  }
  template <class Policy, class S>
  void device_targets(const Policy& pol, tensor_view<const T, S> t, double tau, tensor_view<T, S> q,
                      tensor_view<T, S> row_entropy) const {
    detail::grow(c_d_, static_cast<std::size_t>(t.rows()));
    sinkhorn_rows(pol, t.data, q.data, row_entropy.data, r_d_.data(), c_d_.data(), t.rows(), cfg_.out_dim, 1.0 / tau,
                  cfg_.iterations);
  }
  template <class Policy, class S>
  double host_targets(const Policy& pol, tensor_view<const T, S> t, double tau, tensor_view<T, S> q,
                      tensor_view<T, S> row_entropy) const {
    const std::int64_t R = t.rows(), K = cfg_.out_dim;
    const double inv_tau = 1.0 / tau;
    r_.assign(static_cast<std::size_t>(K), 0.0);
    c_.assign(static_cast<std::size_t>(R), 1.0);
    double* r = r_.data();
    double* c = c_.data();

    // m_k = max_s t_sk / tau (into r), then E = exp(t / tau - m) into q.
    for_each_chunk(pol, K, [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t k = lo; k < hi; ++k) r[k] = -INFINITY;
      for (std::int64_t s = 0; s < R; ++s) {
        const T* ts = t.data + s * K;
        for (std::int64_t k = lo; k < hi; ++k) r[k] = std::max(r[k], double(ts[k]) * inv_tau);
      }
    });
    for (std::int64_t k = 0; k < K; ++k)
      if (!std::isfinite(r[k])) report_non_finite(t);
    for_each_row(pol, R, [&](std::int64_t s) {
      const T* ts = t.data + s * K;
      T* qs = q.data + s * K;
      for (std::int64_t k = 0; k < K; ++k) qs[k] = T(std::exp(double(ts[k]) * inv_tau - r[k]));
    });

    const double dK = double(K), dR = double(R);
    for (int it = 0; it < cfg_.iterations; ++it) {
      // rows of Q (prototypes): r_k = 1 / (K sum_s E_sk c_s)
      for_each_chunk(pol, K, [&](std::int64_t lo, std::int64_t hi) {
        for (std::int64_t k = lo; k < hi; ++k) r[k] = 0;
        for (std::int64_t s = 0; s < R; ++s) {
          const T* es = q.data + s * K;
          const double cs = c[s];
          for (std::int64_t k = lo; k < hi; ++k) r[k] += double(es[k]) * cs;
        }
        for (std::int64_t k = lo; k < hi; ++k) r[k] = 1.0 / (dK * r[k]);
      });
      // columns of Q (samples): c_s = 1 / (R sum_k E_sk r_k)
      for_each_row(pol, R, [&](std::int64_t s) {
        const T* es = q.data + s * K;
        double acc = 0;
        for (std::int64_t k = 0; k < K; ++k) acc += double(es[k]) * r[k];
        c[s] = 1.0 / (dR * acc);
      });
    }
    for (std::int64_t s = 0; s < R; ++s) {
      if (!std::isfinite(c[s]) || !(c[s] > 0)) report_non_finite(t);  // returns when t is finite
      require<numeric_error>(std::isfinite(c[s]) && c[s] > 0, "sinkhorn_knopp targets: sample ", s, " of ", t.name,
                             " cannot be normalised (every exp(t / tau) of its row underflows against the other",
                             " samples'; tau = ", tau, " is too small for these logits)");
    }
    // q = E_sk r_k c_s R; entropy per row.
    for_each_row(pol, R, [&](std::int64_t s) {
      T* qs = q.data + s * K;
      const double cs = c[s] * dR;
      double h = 0;
      for (std::int64_t k = 0; k < K; ++k) {
        const double p = double(qs[k]) * r[k] * cs;
        qs[k] = T(p);
        if (p > 0) h -= p * std::log(p);
      }
      row_entropy.data[s] = T(h);
    });
    double h = 0;
    for (std::int64_t s = 0; s < R; ++s) h += double(row_entropy.data[s]);
    return h / dR;
  }

  /// Throws numeric_error at the first non-finite logit; returns when there is none.
  template <class S>
  static void report_non_finite(tensor_view<const T, S> t) {
    for (std::int64_t i = 0; i < t.numel(); ++i)
      if (!std::isfinite(double(t.data[i])))
        throw numeric_error(dino::detail::concat("sinkhorn_knopp targets: ", t.name, " ", t.shape.str(),
                                                 " holds a non-finite value (", double(t.data[i]), ") at row ",
                                                 i / t.cols(), ", column ", i % t.cols()));
  }

  sinkhorn_config cfg_{};
  mutable std::vector<double> r_, c_;
  mutable detail::scratch_for<double, Space> r_d_, c_d_;  // device scratch (r [K], c [R])
};

}  // namespace dino::ssl
