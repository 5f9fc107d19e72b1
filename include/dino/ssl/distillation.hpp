// dino/ssl/distillation.hpp: cross-entropy distillation over multi-crop pairs (dino-spec §3.2).
//
// Rows are crop-major: student [n_crops * B, K] (rows v*B .. v*B+B-1 are crop v of every
// image), teacher targets q [n_global * B, K] (softmax probabilities from a target such as
// centering). With log p_v = log_softmax(s_v / tau_s):
//
//   loss = 1 / n_terms * sum_{i < n_global} sum_{v != i} 1/B sum_b  -sum_k q_{i,b,k} log p_{v,b,k}
//   n_terms = n_global * (n_crops - 1)          (18 for 2 + 8 crops, 2 for 2 + 0)
//
// Local crops are never teachers; a global crop is never paired with itself. The gradient
// to the student logits, with m_v the number of teachers paired with crop v:
//
//   ds_{v,b} = dloss / (n_terms B tau_s) * (m_v p_{v,b} - sum_{i != v} q_{i,b})
//
// forward_backward() does both in one sweep per student row (the row stays in cache), never
// materialising the student probabilities; forward() alone computes the loss. The rows run
// in the policy's fused kernel distillation_rows: policy/cpu/softmax_rows.hpp on the CPU
// (an image's crops per thread), policy/cuda/loss.cuh on the GPU (a block per student row).
//
// Policy: distillation_rows, sum_to, all_finite and first_non_finite, on views in its space.
// The forms returning a double read the loss back (on the GPU: one synchronisation) and
// throw numeric_error naming the first non-finite input when it is not finite; the forms
// taking a scalar_out leave the loss in the policy's memory (*value (=|+=) weight * loss),
// read nothing back and check nothing (a GPU step flags a non-finite loss on the device:
// ssl/method.hpp).
#pragma once

#include <cmath>
#include <cstdint>

#include "dino/core/tensor.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::ssl {

struct distillation_config {
  int n_crops = 10;           ///< 2 global + M local
  int n_global = 2;           ///< crops that have teacher targets (the first n_global)
  double student_temp = 0.1;  ///< tau_s
};

class cross_entropy_distillation {
 public:
  cross_entropy_distillation() = default;
  explicit cross_entropy_distillation(distillation_config c) : cfg_(c) {
    require<config_error>(c.n_global >= 1 && c.n_global <= 8 && c.n_crops >= 2 && c.n_global <= c.n_crops,
                          "cross_entropy_distillation: need 1 <= n_global <= min(8, n_crops) and n_crops >= 2, got n_global=",
                          c.n_global, " n_crops=", c.n_crops);
    require<config_error>(c.student_temp > 0, "cross_entropy_distillation: student temperature must be positive, got ",
                          c.student_temp);
  }
  const distillation_config& config() const { return cfg_; }
  int n_terms() const {
    int n = 0;
    for (int i = 0; i < cfg_.n_global; ++i) n += cfg_.n_crops - 1;
    return n;
  }

  /// Checks shapes and returns the batch size B.
  template <class T, class S>
  std::int64_t batch_of(const char* where, tensor_view<const T, S> s, tensor_view<const T, S> q) const {
    require<shape_error>(s.shape.rank == 2 && q.shape.rank == 2, where, ": student logits and teacher targets must be ",
                         "matrices, found ", s.name, " ", s.shape.str(), " and ", q.name, " ", q.shape.str());
    require<shape_error>(s.shape[1] == q.shape[1], where, ": ", s.name, " has K = ", s.shape[1], " but ", q.name,
                         " has K = ", q.shape[1], " (student and teacher must have the same number of prototypes)");
    require<shape_error>(s.rows() % cfg_.n_crops == 0, where, ": ", s.name, " has ", s.rows(),
                         " rows, which is not a multiple of the crop count ", cfg_.n_crops);
    const std::int64_t B = s.rows() / cfg_.n_crops;
    require<shape_error>(B > 0, where, ": ", s.name, " is empty");
    require<shape_error>(q.rows() == cfg_.n_global * B, where, ": ", q.name, ": expected ", cfg_.n_global * B,
                         " rows (", cfg_.n_global, " global crops x batch ", B, "), found ", q.rows());
    return B;
  }

  /// The loss; row_loss [n_crops * B] receives each student row's summed cross-entropy.
  template <class Policy, class T, class S>
  double forward(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q,
                 tensor_view<T, S> row_loss) const {
    return run(pol, s, q, row_loss, static_cast<T*>(nullptr), 0.0, false);
  }
  /// The loss left in the policy's memory (no read-back).
  template <class Policy, class T, class S>
  void forward(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q, tensor_view<T, S> row_loss,
               scalar_out loss) const {
    const std::int64_t B = run_rows(pol, s, q, row_loss, static_cast<T*>(nullptr), 0.0, false);
    sum_to(pol, static_cast<const T*>(row_loss.data), s.rows(), double(n_terms()) * double(B), loss);
  }

  /// The loss, and ds (=|+=) dloss * d loss / d s.
  template <class Policy, class T, class S>
  double forward_backward(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q,
                          tensor_view<T, S> row_loss, tensor_view<T, S> ds, double dloss, bool accumulate) const {
    check_shape("cross_entropy_distillation backward", ds, s.shape);
    return run(pol, s, q, row_loss, ds.data, dloss, accumulate);
  }
  /// The same with the loss left in the policy's memory (no read-back, no synchronisation).
  template <class Policy, class T, class S>
  void forward_backward(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q,
                        tensor_view<T, S> row_loss, tensor_view<T, S> ds, double dloss, bool accumulate,
                        scalar_out loss) const {
    check_shape("cross_entropy_distillation backward", ds, s.shape);
    const std::int64_t B = run_rows(pol, s, q, row_loss, ds.data, dloss, accumulate);
    sum_to(pol, static_cast<const T*>(row_loss.data), s.rows(), double(n_terms()) * double(B), loss);
  }

 private:
  template <class Policy, class T, class S>
  double run(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q, tensor_view<T, S> row_loss,
             T* ds, double dloss, bool accumulate) const {
    const std::int64_t B = run_rows(pol, s, q, row_loss, ds, dloss, accumulate);
    double total = 0;
    if constexpr (policy_traits<Policy>::is_host) {
      for (std::int64_t r = 0; r < s.rows(); ++r) total += double(row_loss.data[r]);
    } else {
      total = sum_to_host(pol, static_cast<const T*>(row_loss.data), s.rows(), 1.0);
    }
    if (!std::isfinite(total)) report_non_finite(pol, s, q);
    return total / (double(n_terms()) * double(B));
  }

  /// Checks, runs the rows (row_loss and ds) and returns the batch size B.
  template <class Policy, class T, class S>
  std::int64_t run_rows(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q,
                    tensor_view<T, S> row_loss, T* ds, double dloss, bool accumulate) const {
    DINO_CHECK_SPACE(Policy, S);
    const std::int64_t B = batch_of("cross_entropy_distillation", s, q);
    check_shape("cross_entropy_distillation", row_loss, {s.rows()});
    distillation_desc<T> d;
    d.s = s.data;
    d.q = q.data;
    d.row_loss = row_loss.data;
    d.ds = ds;
    d.B = B;
    d.K = s.shape[1];
    d.n_crops = cfg_.n_crops;
    d.n_global = cfg_.n_global;
    d.inv_tau = T(1.0 / cfg_.student_temp);
    d.grad_scale = T(dloss / (double(n_terms()) * double(B) * cfg_.student_temp));
    d.accumulate = accumulate;
    distillation_rows(pol, d);
    return B;
  }

  template <class Policy, class T, class S>
  [[noreturn]] static void report_non_finite(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q) {
    for (auto t : {s, q}) {
      if (all_finite(pol, t.data, t.numel())) continue;
      std::int64_t i = 0;
      double value = 0;
      if constexpr (policy_traits<Policy>::is_host) {
        while (std::isfinite(t.data[i])) ++i;
        value = double(t.data[i]);
      } else {
        const non_finite_at at = first_non_finite(pol, t.data, t.numel());
        i = at.index;
        value = at.value;
      }
      throw numeric_error(detail::concat("cross_entropy_distillation: ", t.name, " ", t.shape.str(),
                                         " holds a non-finite value (", value, ") at row ", i / t.cols(),
                                         ", column ", i % t.cols()));
    }
    throw numeric_error("cross_entropy_distillation: the loss is not finite although its inputs are");
  }

  distillation_config cfg_{};
};

}  // namespace dino::ssl
