// dino/optim/adamw.hpp: AdamW over a flat buffer with the reference's parameter groups.
//
// torch.optim.AdamW (single-tensor form), per tensor with its own step count t:
//   p <- p (1 - lr wd)                       wd = 0 for tensors flagged param_no_weight_decay
//   m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
//   p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// Groups (dino-spec §4.4): biases and 1-D tensors get no weight decay; frozen tensors are
// not optimised at all; tensors whose flags intersect `skip` are left untouched this step,
// step count included, as PyTorch does for a parameter whose grad is None (the last layer
// during freeze_last_layer).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "dino/core/param_store.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::optim {

struct adamw_config {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
};

template <class T>
class adamw {
 public:
  adamw() = default;
  adamw(const param_layout& layout, adamw_config c = {})
      : cfg_(c), m_(layout), v_(layout), steps_(layout.entries().size(), 0) {}

  /// One update of every trainable tensor not skipped.
  void step(const cpu_policy& pol, flat_params<T>& params, const flat_params<T>& grads, double lr, double wd,
            unsigned skip = param_none) {
    const auto& entries = params.layout().entries();
    for (std::size_t j = 0; j < entries.size(); ++j) {
      const param_entry& e = entries[j];
      if (!e.trainable() || (e.flags & skip)) continue;
      const std::int64_t t = ++steps_[j];
      const double w = (e.flags & param_no_weight_decay) ? 0.0 : wd;
      const T decay = T(1.0 - lr * w);
      const T b1 = T(cfg_.beta1), b2 = T(cfg_.beta2), c1 = T(1.0 - cfg_.beta1), c2 = T(1.0 - cfg_.beta2);
      const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t)), bc2 = 1.0 - std::pow(cfg_.beta2, double(t));
      const T step_size = T(lr / bc1), bc2_sqrt = T(std::sqrt(bc2)), eps = T(cfg_.eps);
      T* p = params.data() + e.offset;
      const T* g = grads.data() + e.offset;
      T* m = m_.data() + e.offset;
      T* v = v_.data() + e.offset;
      for_each_chunk(pol, static_cast<std::int64_t>(e.numel()), [&](std::int64_t lo, std::int64_t hi) {
#pragma omp simd
        for (std::int64_t i = lo; i < hi; ++i) {
          const T gi = g[i];
          const T pi = p[i] * decay;
          const T mi = m[i] * b1 + c1 * gi;
          const T vi = v[i] * b2 + c2 * gi * gi;
          m[i] = mi;
          v[i] = vi;
          p[i] = pi - step_size * (mi / (std::sqrt(vi) / bc2_sqrt + eps));
        }
      });
    }
  }

  flat_params<T>& exp_avg() { return m_; }
  flat_params<T>& exp_avg_sq() { return v_; }
  const flat_params<T>& exp_avg() const { return m_; }
  const flat_params<T>& exp_avg_sq() const { return v_; }
  /// Per-tensor step counts, in layout order.
  std::vector<std::int64_t>& steps() { return steps_; }
  const std::vector<std::int64_t>& steps() const { return steps_; }
  const adamw_config& config() const { return cfg_; }

 private:
  adamw_config cfg_{};
  flat_params<T> m_, v_;
  std::vector<std::int64_t> steps_;
};

}  // namespace dino::optim
