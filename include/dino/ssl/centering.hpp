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
#pragma once

#include <cmath>
#include <cstdint>

#include "dino/core/buffer.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::ssl {

struct centering_config {
  std::int64_t out_dim = 65536;  ///< K
  double momentum = 0.9;         ///< center momentum m_c
};

template <class T>
class centering {
 public:
  centering() = default;
  explicit centering(centering_config c) : cfg_(c), center_(static_cast<std::size_t>(c.out_dim), true),
                                           sums_(static_cast<std::size_t>(c.out_dim), true) {
    require<config_error>(c.out_dim > 0, "centering: out_dim must be positive, got ", c.out_dim);
    require<config_error>(c.momentum >= 0 && c.momentum <= 1, "centering: momentum must be in [0, 1], got ", c.momentum);
  }

  std::int64_t out_dim() const { return cfg_.out_dim; }
  const centering_config& config() const { return cfg_; }

  /// q = softmax((t - c) / tau); returns the mean entropy of the rows of q (nats).
  template <class Policy, class S>
  double targets(const Policy& pol, tensor_view<const T, S> t, double tau, tensor_view<T, S> q,
                 tensor_view<T, S> row_entropy) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("centering targets", t, cfg_.out_dim);
    check_shape("centering targets", q, t.shape);
    check_shape("centering targets", row_entropy, {t.rows()});
    require<config_error>(tau > 0, "centering targets: teacher temperature must be positive, got ", tau);
    softmax_targets(pol, t.data, static_cast<const T*>(center_.data()), q.data, row_entropy.data, t.rows(),
                    cfg_.out_dim, T(1.0 / tau));
    double h = 0;
    for (std::int64_t r = 0; r < t.rows(); ++r) h += double(row_entropy.data[r]);
    return h / double(t.rows());
  }

  /// Adds the column sums of raw teacher logits t [R, K] to the pending update.
  template <class Policy, class S>
  void observe(const Policy& pol, tensor_view<const T, S> t) {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("centering observe", t, cfg_.out_dim);
    column_sums(pol, t.data, t.rows(), cfg_.out_dim, sums_.data(), true);
    count_ += t.rows();
  }

  /// c <- m c + (1 - m) * (pending sums / pending rows); clears the pending update.
  void commit() {
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

  /// Drops the pending update (a skipped step).
  void discard() {
    sums_.fill_zero();
    count_ = 0;
  }

  host_view<T> center() { return center_.view({cfg_.out_dim}, "center"); }
  host_view<const T> center() const { return center_.view({cfg_.out_dim}, "center"); }
  std::int64_t pending_rows() const { return count_; }

 private:
  centering_config cfg_{};
  buffer<T> center_;
  buffer<double> sums_;
  std::int64_t count_ = 0;
};

}  // namespace dino::ssl
