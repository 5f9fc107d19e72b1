// dino/ssl/mse_loss.hpp: the MSE distillation loss of the DINO ablation (dino-spec §8.1 row 5)
// and of BYOL: the squared distance between l2-normalised outputs, 2 - 2 cos.
//
// Rows are crop-major as in cross_entropy_distillation: student s [n_crops * B, K], teacher
// rows q [n_global * B, K]. With x^ = x / max(||x||, 1e-12) (F.normalize):
//
//   loss = 1 / (n_terms B) sum_{i < n_global} sum_{v != i} sum_b || s^_{v,b} - q^_{i,b} ||^2
//        = 1 / (n_terms B) sum ... (2 - 2 s^_{v,b} . q^_{i,b})         (BYOL's loss_fn)
//   n_terms = n_global (n_crops - 1)
//
// BYOL sums its two symmetric terms (loss_one + loss_two); here the pairs are averaged, as
// the DINO loss averages them: with 2 crops this is BYOL's loss / 2.
//
// q is read as given, and normalised here: pass the teacher's raw outputs (raw_target), as
// BYOL and the ablation do; any target's rows work (softmax targets are normalised too).
// The gradient goes to the student only, with Q_{v,b} = sum_{i != v} q^_{i,b}:
//
//   ds_{v,b} = -2 dloss / (n_terms B) (Q - (s^ . Q) s^) / ||s_{v,b}||     (Q / 1e-12 when ||s|| <= 1e-12)
//
// row_loss [n_crops * B] receives each student row's sum over its partners. Work is in
// double per row, rows in parallel. Stateless. On the GPU (cuda_policy, views in device
// memory) a block per student row does the same in double (mse_rows, policy/cuda/variants.cuh);
// the forms taking a scalar_out leave the loss in device memory and read nothing back.
#pragma once

#include <cmath>
#include <cstdint>

#include "dino/core/error.hpp"
#include "dino/core/tensor.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/ssl/variant_detail.hpp"

namespace dino::ssl {

struct mse_config {
  int n_crops = 2;   ///< 2 global + M local
  int n_global = 2;  ///< crops that have teacher rows (the first n_global)
};

class mse_distillation : public detail::pair_loss_forms<mse_distillation> {
  friend struct detail::pair_loss_forms<mse_distillation>;

 public:
  static constexpr const char* backward_name = "mse_distillation backward";
  mse_distillation() = default;
  explicit mse_distillation(mse_config c) : cfg_(c) { detail::crop_pairs::check("mse_distillation", c.n_crops, c.n_global); }
  const mse_config& config() const { return cfg_; }
  int n_terms() const { return detail::crop_pairs::n_terms(cfg_.n_crops, cfg_.n_global); }

 private:
  template <class Policy, class T, class S>
  double run(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q, tensor_view<T, S> row_loss,
             T* ds, double dloss, bool accumulate, const scalar_out* out) const {
    DINO_CHECK_SPACE(Policy, S);
    const int V = cfg_.n_crops, G = cfg_.n_global;
    const std::int64_t B = detail::pair_batch("mse_distillation", V, G, s, q, true);
    check_shape("mse_distillation", row_loss, {s.rows()});
    const std::int64_t K = s.shape[1];
    const double scale = -2.0 * dloss / (double(n_terms()) * double(B));
    if constexpr (!policy_traits<Policy>::is_host) {
      mse_rows(pol, pair_rows_desc<T>{s.data, q.data, row_loss.data, ds, B, K, V, G, scale, 1.0, accumulate});
      return detail::loss_total(pol, "mse_distillation", row_loss, double(n_terms()) * double(B), out, {s, q});
    } else {
      (void)out;
      return host_run(pol, s, q, row_loss, ds, accumulate, B, K, scale);
    }
  }
  template <class Policy, class T, class S>
  double host_run(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q, tensor_view<T, S> row_loss,
                  T* ds, bool accumulate, std::int64_t B, std::int64_t K, double scale) const {
    const int G = cfg_.n_global;
    for_each_row(pol, s.rows(), [&](std::int64_t row) {
      const int v = int(row / B);
      const std::int64_t b = row % B;
      const T* sr = s.data + row * K;
      const auto ss = detail::l2_row(sr, K);
      double loss = 0;
      // first pass: the cosines (loss), and the partners' 1 / ||q|| for the gradient
      double w[8];
      double sQ = 0;  // s . Q
      for (int i = 0; i < G; ++i) {
        w[i] = 0;
        if (i == v) continue;
        const T* qr = q.data + (std::int64_t(i) * B + b) * K;
        const auto qs = detail::l2_row(qr, K);
        double dot = 0;
        for (std::int64_t k = 0; k < K; ++k) dot += double(sr[k]) * double(qr[k]);
        loss += 2.0 - 2.0 * dot * ss.inv * qs.inv;
        w[i] = qs.inv;
        sQ += dot * qs.inv;
      }
      row_loss.data[row] = T(loss);
      if (!ds) return;
      T* dr = ds + row * K;
      if (detail::crop_pairs::partners(v, G) == 0) {
        if (!accumulate)
          for (std::int64_t k = 0; k < K; ++k) dr[k] = T(0);
        return;
      }
      // Q = sum_i q^_i and s^ . Q = sum_i w_i (s . q_i) / ||s|| come from the first pass; then
      // the normalisation's backward, (Q - s^ (s^ . Q)) / ||s||.
      const bool normal = ss.norm > detail::l2_eps;
      const double yQ = normal ? sQ * ss.inv : 0.0, c = scale * ss.inv;
      for (std::int64_t k = 0; k < K; ++k) {
        double Qk = 0;
        for (int i = 0; i < G; ++i)
          if (i != v) Qk += double(q.data[(std::int64_t(i) * B + b) * K + k]) * w[i];
        const double g = c * (Qk - double(sr[k]) * ss.inv * yQ);
        dr[k] = accumulate ? T(double(dr[k]) + g) : T(g);
      }
    });
    double total = 0;
    for (std::int64_t r = 0; r < s.rows(); ++r) total += double(row_loss.data[r]);
    if (!std::isfinite(total)) detail::throw_non_finite<T>("mse_distillation", {s, q});
    return total / (double(n_terms()) * double(B));
  }

  mse_config cfg_{};
};

}  // namespace dino::ssl
