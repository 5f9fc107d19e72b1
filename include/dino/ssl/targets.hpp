// dino/ssl/targets.hpp: stateless teacher targets for the variants (dino-spec §8.1).
//
//   sharpen_only<T>   q = softmax(t / tau)           the "no centering" target: sharpening
//                                                    alone (the paper: collapses to one dimension)
//   raw_target<T>     q = t                          the teacher's raw outputs, for losses that
//                                                    compare outputs rather than distributions
//                                                    (mse_distillation, info_nce)
//
// Both satisfy teacher_target (ssl/concepts.hpp) and keep no running state: observe, commit
// and discard do nothing. targets() returns the mean entropy (nats) of softmax(t / tau) over
// the rows, and row_entropy [R] receives each row's: for sharpen_only it is the entropy of q
// itself; for raw_target it is a diagnostic only (q holds logits, not a distribution), which
// keeps the method's collapse flag (entropy near ln K) meaningful.
//
// Any policy: softmax_targets (policy/cpu/softmax_rows.hpp, policy/cuda/loss.cuh), then for
// raw_target a copy of t into q on the policy (for_each_chunk). The form returning a double
// reads the mean entropy back (on the GPU: one wait); the scalar_out form leaves it in the
// policy's memory. commit(pol, skip_flag) does nothing, as commit() does.
#pragma once

#include <algorithm>
#include <cstdint>

#include "dino/core/error.hpp"
#include "dino/core/tensor.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/ssl/ema.hpp"
#include "dino/ssl/variant_detail.hpp"

namespace dino::ssl {

struct stateless_target_config {
  std::int64_t out_dim = 65536;  ///< K
};

namespace detail {
template <class T, bool Raw>
class stateless_target : public no_running_state {
 public:
  stateless_target() = default;
  explicit stateless_target(stateless_target_config c) : cfg_(c) {
    require<config_error>(c.out_dim > 0, who(), ": out_dim must be positive, got ", c.out_dim);
  }
  std::int64_t out_dim() const { return cfg_.out_dim; }
  const stateless_target_config& config() const { return cfg_; }

  template <class Policy, class S>
  double targets(const Policy& pol, tensor_view<const T, S> t, double tau, tensor_view<T, S> q,
                 tensor_view<T, S> row_entropy) const {
    run(pol, t, tau, q, row_entropy);
    const std::int64_t R = t.rows();
    if constexpr (policy_traits<Policy>::is_host) {
      double h = 0;
      for (std::int64_t r = 0; r < R; ++r) h += double(row_entropy.data[r]);
      return h / double(R);
    } else {
      return sum_to_host(pol, static_cast<const T*>(row_entropy.data), R, double(R));
    }
  }
  /// The same, leaving the mean entropy in the policy's memory (*value (=|+=) weight * mean).
  template <class Policy, class S>
  void targets(const Policy& pol, tensor_view<const T, S> t, double tau, tensor_view<T, S> q,
               tensor_view<T, S> row_entropy, scalar_out mean_entropy) const {
    run(pol, t, tau, q, row_entropy);
    sum_to(pol, static_cast<const T*>(row_entropy.data), t.rows(), double(t.rows()), mean_entropy);
  }

 private:
  template <class Policy, class S>
  void run(const Policy& pol, tensor_view<const T, S> t, double tau, tensor_view<T, S> q,
           tensor_view<T, S> row_entropy) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix(who(), t, cfg_.out_dim);
    check_shape(who(), q, t.shape);
    check_shape(who(), row_entropy, {t.rows()});
    require<config_error>(tau > 0, who(), ": teacher temperature must be positive, got ", tau);
    const std::int64_t R = t.rows(), K = cfg_.out_dim;
    // softmax(t / tau) into q: q is the target (sharpen_only) or scratch overwritten by t.
    softmax_targets(pol, t.data, static_cast<const T*>(nullptr), q.data, row_entropy.data, R, K, T(1.0 / tau));
    if constexpr (Raw) {
      if constexpr (policy_traits<Policy>::is_host) std::copy(t.data, t.data + R * K, q.data);
      else for_each_chunk(pol, R * K, kernels::copy_chunk<T>{q.data, t.data, nullptr});
    }
  }
  static const char* who() { return Raw ? "raw_target" : "sharpen_only"; }
  stateless_target_config cfg_{};
};
}  // namespace detail

/// q = softmax(t / tau): sharpening without centering.
template <class T>
class sharpen_only : public detail::stateless_target<T, false> {
 public:
  using detail::stateless_target<T, false>::stateless_target;
};

/// q = t: the teacher's raw outputs (an identity target).
template <class T>
class raw_target : public detail::stateless_target<T, true> {
 public:
  using detail::stateless_target<T, true>::stateless_target;
};

}  // namespace dino::ssl
