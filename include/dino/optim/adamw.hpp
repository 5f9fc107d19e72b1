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
//
// adamw<T, Space>: the moments live in Space (flat_params<T, Space>); the step counts and
// this step's per-tensor coefficients are computed on the host (double, then rounded to T)
// whatever the space. Policy: on the CPU one parallel pass over the flat buffer with the
// element kernel of policy/cpu/adamw_kernel.hpp; on the GPU adamw_tensors
// (policy/cuda/optim.cuh): one launch per 32 active tensors, their coefficients passed by
// value in the launch (no host-to-device copy, no synchronisation).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dino/core/param_store.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/policy/cpu/adamw_kernel.hpp"

namespace dino::optim {

struct adamw_config {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
};


template <class T, class Space = host_space>
class adamw {
 public:
  using space = Space;
  adamw() = default;
  adamw(const param_layout& layout, adamw_config c = {})
      : cfg_(c), m_(layout), v_(layout), steps_(layout.entries().size(), 0), coeffs_(layout.entries().size()) {}

  /// One update of every trainable tensor not skipped.
  template <class Policy>
  void step(const Policy& pol, flat_params<T, Space>& params, const flat_params<T, Space>& grads, double lr,
            double wd, unsigned skip = param_none) {
    DINO_CHECK_SPACE(Policy, Space);
    require<shape_error>(params.size() == m_.size() && grads.size() == m_.size(), "adamw::step: parameters (",
                         params.size(), ") and gradients (", grads.size(), ") do not match the optimizer's layout (",
                         m_.size(), " elements)");
    const auto& entries = params.layout().entries();
    for (std::size_t j = 0; j < entries.size(); ++j) {
      const param_entry& e = entries[j];
      cpu::adamw_coeffs<T>& k = coeffs_[j];
      k.active = e.trainable() && !(e.flags & skip);
      if (!k.active) continue;
      const std::int64_t t = ++steps_[j];
      const double w = (e.flags & param_no_weight_decay) ? 0.0 : wd;
      const double bc1 = 1.0 - std::pow(cfg_.beta1, double(t)), bc2 = 1.0 - std::pow(cfg_.beta2, double(t));
      k.decay = T(1.0 - lr * w);
      k.b1 = T(cfg_.beta1), k.b2 = T(cfg_.beta2), k.c1 = T(1.0 - cfg_.beta1), k.c2 = T(1.0 - cfg_.beta2);
      k.step_size = T(lr / bc1), k.bc2_sqrt = T(std::sqrt(bc2)), k.eps = T(cfg_.eps);
    }
    // One pass over the flat buffer (one parallel region per step, not one per tensor: a
    // ViT-S has 150 tensors, most of them too small to split). Each thread's range walks the
    // tensors it overlaps, which lie in increasing offset order; padding is not touched.
    T* p = params.data();
    const T* g = grads.data();
    T* m = m_.data();
    T* v = v_.data();
    if constexpr (policy_traits<Policy>::is_host) {
      for_each_chunk(pol, static_cast<std::int64_t>(params.size()), [&](std::int64_t lo, std::int64_t hi) {
        auto j = static_cast<std::size_t>(
            std::partition_point(entries.begin(), entries.end(),
                                 [&](const param_entry& e) { return std::int64_t(e.offset + e.numel()) <= lo; }) -
            entries.begin());
        for (; j < entries.size() && std::int64_t(entries[j].offset) < hi; ++j) {
          if (!coeffs_[j].active) continue;
          const std::int64_t b = std::max<std::int64_t>(lo, std::int64_t(entries[j].offset));
          const std::int64_t e = std::min<std::int64_t>(hi, std::int64_t(entries[j].offset + entries[j].numel()));
          cpu::adamw_update(p, g, m, v, b, e, coeffs_[j]);
        }
      });
    } else {
      adamw_tensors(pol, entries, coeffs_, p, g, m, v);
    }
  }

  flat_params<T, Space>& exp_avg() { return m_; }
  flat_params<T, Space>& exp_avg_sq() { return v_; }
  const flat_params<T, Space>& exp_avg() const { return m_; }
  const flat_params<T, Space>& exp_avg_sq() const { return v_; }
  /// Per-tensor step counts, in layout order.
  std::vector<std::int64_t>& steps() { return steps_; }
  const std::vector<std::int64_t>& steps() const { return steps_; }
  const adamw_config& config() const { return cfg_; }

 private:
  adamw_config cfg_{};
  flat_params<T, Space> m_, v_;
  std::vector<std::int64_t> steps_;
  std::vector<cpu::adamw_coeffs<T>> coeffs_;  // per tensor, rewritten each step (sized once)
};

}  // namespace dino::optim
