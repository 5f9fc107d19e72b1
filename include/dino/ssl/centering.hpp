// dino/ssl/centering.hpp: the DINO teacher target, centering + sharpening (dino-spec §3).
//
//   q = softmax((t - c) / tau_t)            per teacher row, t the raw teacher logits [R, K]
//   c <- m c + (1 - m) mean_rows(t)          m = 0.9, from the *raw* logits, after the loss
//
// The update is split in two so that gradient accumulation stays exact: observe() adds the
// column sums of each micro-batch's teacher logits, commit() applies one EMA step with the
// mean over every row observed since the last commit. With one micro-batch per step this is
// the reference's update_center; with several it equals the update of one batch holding
// them all (not one EMA step per micro-batch, which would change the effective momentum:
// dino-spec §7 item 14). Every micro-batch of a step uses the center from before the step.
//
// centering<T, Space>: the center and the pending column sums (double) live in Space
// (host_space, or device_space with <dino/cuda.hpp>); views and policies must match it.
// Policy: softmax_targets (policy/cpu/softmax_rows.hpp, policy/cuda/loss.cuh), column_sums,
// sum_to and for_each_chunk. targets() returning a double reads the mean entropy back (on
// the GPU: one synchronisation); the scalar_out form leaves it in the space's memory.
// commit(pol) and discard(pol) run on the policy's stream; commit() and discard() without a
// policy exist for host memory only. commit(pol, skip_flag) (an int in the space's memory)
// commits, or discards when *skip_flag is nonzero: on the GPU the kernel reads the flag, so a
// skipped step is decided on the device.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "dino/config.hpp"
#include "dino/core/buffer.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::ssl {

struct centering_config {
  std::int64_t out_dim = 65536;  ///< K
  double momentum = 0.9;         ///< center momentum m_c
};

namespace kernels {
/// c <- c m + bc (1 - m) with bc = sums * inv rounded to T (the reference's rounding); the
/// pending sums are cleared. The functor of centering::commit on every policy.
template <class T>
struct center_commit {
  T* center;
  double* sums;
  double inv;
  T m, one_minus_m;
  const int* skip = nullptr;  ///< nonzero: discard (clear the sums, keep the center)
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    if (skip && *skip) {
      for (std::int64_t k = lo; k < hi; ++k) sums[k] = 0.0;
      return;
    }
    for (std::int64_t k = lo; k < hi; ++k) {
      const T bc = T(sums[k] * inv);
      center[k] = T(center[k] * m + bc * one_minus_m);
      sums[k] = 0.0;
    }
  }
};
struct zero_doubles {
  double* x;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t k = lo; k < hi; ++k) x[k] = 0.0;
  }
};
}  // namespace kernels

template <class T, class Space = host_space>
class centering {
  static constexpr bool on_host = std::is_same_v<Space, host_space>;

 public:
  using space = Space;

  centering() = default;
  explicit centering(centering_config c) : cfg_(c) {
    require<config_error>(c.out_dim > 0, "centering: out_dim must be positive, got ", c.out_dim);
    require<config_error>(c.momentum >= 0 && c.momentum <= 1, "centering: momentum must be in [0, 1], got ", c.momentum);
    center_ = typename storage_for<T, Space>::type(static_cast<std::size_t>(c.out_dim), true);
    sums_ = typename storage_for<double, Space>::type(static_cast<std::size_t>(c.out_dim), true);
  }

  std::int64_t out_dim() const { return cfg_.out_dim; }
  const centering_config& config() const { return cfg_; }

  /// q = softmax((t - c) / tau); returns the mean entropy of the rows of q (nats). tau may be
  /// read from the policy's memory when the pass runs (step_value::read_at; unchecked then).
  template <class Policy, class S>
  double targets(const Policy& pol, tensor_view<const T, S> t, step_value<double> tau, tensor_view<T, S> q,
                 tensor_view<T, S> row_entropy) const {
    run_targets(pol, t, tau, q, row_entropy);
    if constexpr (policy_traits<Policy>::is_host) {
      double h = 0;
      for (std::int64_t r = 0; r < t.rows(); ++r) h += double(row_entropy.data[r]);
      return h / double(t.rows());
    } else {
      return sum_to_host(pol, static_cast<const T*>(row_entropy.data), t.rows(), double(t.rows()));
    }
  }

  /// The same, leaving the mean entropy in the policy's memory: *mean_entropy.value (=|+=)
  /// weight * mean entropy. Reads nothing back.
  template <class Policy, class S>
  void targets(const Policy& pol, tensor_view<const T, S> t, step_value<double> tau, tensor_view<T, S> q,
               tensor_view<T, S> row_entropy, scalar_out mean_entropy) const {
    run_targets(pol, t, tau, q, row_entropy);
    sum_to(pol, static_cast<const T*>(row_entropy.data), t.rows(), double(t.rows()), mean_entropy);
  }

  /// Adds the column sums of raw teacher logits t [R, K] to the pending update.
  template <class Policy, class S>
  void observe(const Policy& pol, tensor_view<const T, S> t) {
    DINO_CHECK_SPACE(Policy, S);
    static_assert(std::is_same_v<S, Space>, "centering::observe: the logits are not in the center's memory space");
    check_matrix("centering observe", t, cfg_.out_dim);
    column_sums(pol, t.data, t.rows(), cfg_.out_dim, sums_.data(), true);
    count_ += t.rows();
  }

  /// c <- m c + (1 - m) * (pending sums / pending rows); clears the pending update.
  void commit()
    requires on_host
  {
    if (count_ == 0) return;
    const double m = cfg_.momentum, inv = 1.0 / double(count_);
    for (std::int64_t k = 0; k < cfg_.out_dim; ++k) {
      // Rounded as the reference: batch_center in T, then m * c + (1 - m) * batch_center in T.
      const T bc = T(sums_[static_cast<std::size_t>(k)] * inv);
      center_[static_cast<std::size_t>(k)] = T(center_[static_cast<std::size_t>(k)] * T(m) + bc * T(1 - m));
    }
    sums_.fill_zero();
    count_ = 0;
  }
  /// commit() on the policy (the GPU's stream for device memory).
  template <class Policy>
  void commit(const Policy& pol) {
    DINO_CHECK_SPACE(Policy, Space);
    if constexpr (on_host) {
      (void)pol;
      commit();
    } else {
      if (count_ == 0) return;
      const double m = cfg_.momentum;
      for_each_chunk(pol, cfg_.out_dim,
                     kernels::center_commit<T>{center_.data(), sums_.data(), 1.0 / double(count_), T(m), T(1 - m)});
      count_ = 0;
    }
  }

  /// commit(pol), or discard(pol) when *skip_flag (an int in the space's memory) is nonzero.
  template <class Policy>
  void commit(const Policy& pol, const int* skip_flag) {
    DINO_CHECK_SPACE(Policy, Space);
    if constexpr (on_host) {
      if (skip_flag && *skip_flag) discard();
      else commit();
    } else {
      if (count_ == 0) return;
      const double m = cfg_.momentum;
      for_each_chunk(pol, cfg_.out_dim,
                     kernels::center_commit<T>{center_.data(), sums_.data(), 1.0 / double(count_), T(m), T(1 - m),
                                               skip_flag});
      count_ = 0;
    }
  }

  /// Drops the pending update (a skipped step).
  void discard()
    requires on_host
  {
    sums_.fill_zero();
    count_ = 0;
  }
  template <class Policy>
  void discard(const Policy& pol) {
    DINO_CHECK_SPACE(Policy, Space);
    if constexpr (on_host) {
      (void)pol;
      discard();
    } else {
      for_each_chunk(pol, cfg_.out_dim, kernels::zero_doubles{sums_.data()});
      count_ = 0;
    }
  }

  tensor_view<T, Space> center() { return {center_.data(), {cfg_.out_dim}, "center"}; }
  tensor_view<const T, Space> center() const { return {center_.data(), {cfg_.out_dim}, "center"}; }
  std::int64_t pending_rows() const { return count_; }

 private:
  template <class Policy, class S>
  void run_targets(const Policy& pol, tensor_view<const T, S> t, step_value<double> tau, tensor_view<T, S> q,
                   tensor_view<T, S> row_entropy) const {
    DINO_CHECK_SPACE(Policy, S);
    static_assert(std::is_same_v<S, Space>, "centering::targets: the logits are not in the center's memory space");
    check_matrix("centering targets", t, cfg_.out_dim);
    check_shape("centering targets", q, t.shape);
    check_shape("centering targets", row_entropy, {t.rows()});
    if constexpr (!policy_traits<Policy>::is_host) {
      if (tau.at) {  // read on the device, as 1 / tau in double rounded to T (the host's rounding)
        softmax_targets(pol, t.data, static_cast<const T*>(center_.data()), q.data, row_entropy.data, t.rows(),
                        cfg_.out_dim, tau.at);
        return;
      }
    }
    const double tv = tau.get();
    require<config_error>(tv > 0, "centering targets: teacher temperature must be positive, got ", tv);
    softmax_targets(pol, t.data, static_cast<const T*>(center_.data()), q.data, row_entropy.data, t.rows(),
                    cfg_.out_dim, T(1.0 / tv));
  }

  centering_config cfg_{};
  typename storage_for<T, Space>::type center_;
  typename storage_for<double, Space>::type sums_;
  std::int64_t count_ = 0;
};

}  // namespace dino::ssl
