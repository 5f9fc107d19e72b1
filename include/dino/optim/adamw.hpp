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
//
// step(..., skip_flag): an int in Space (null: never); when it is nonzero the step changes
// nothing, step counts included. On the host it is read there. On the GPU it is read by
// the kernels, so a step can be skipped without the host knowing: the device then keeps
// the true per-tensor step counts (a copy of steps() in device memory, advanced by the
// kernels), the host's counts may run ahead of them after a skip, and the kernels recompute
// the bias corrections from the device count when the two differ. steps() reads the device
// counts back (one counted host wait) and may be written; the next step uploads them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
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
      : cfg_(c), m_(layout), v_(layout), steps_(layout.entries().size(), 0), coeffs_(layout.entries().size()) {
    if constexpr (!on_host) {
      dev_steps_ = typename storage_for<std::int64_t, Space>::type(layout.entries().size(), true);
      t_expected_.assign(layout.entries().size(), 0);
    }
  }

  /// One update of every trainable tensor not skipped. skip_flag: an int in Space; nonzero
  /// makes the whole step a no-op (null: never; see the file comment). lr and wd may be read
  /// from Space when the update runs (step_value::read_at, both or neither: a step replayed
  /// from a CUDA graph; on the GPU the kernels then derive every coefficient themselves).
  template <class Policy>
  void step(const Policy& pol, flat_params<T, Space>& params, const flat_params<T, Space>& grads,
            step_value<double> lr_in, step_value<double> wd_in, unsigned skip = param_none,
            const int* skip_flag = nullptr) {
    DINO_CHECK_SPACE(Policy, Space);
    require<config_error>(!lr_in.at == !wd_in.at, "adamw::step: the learning rate and the weight decay are read "
                          "from memory together or not at all");
    // On the host .get() (host memory); on the GPU the value passed (unused when read there).
    const double lr = on_host ? lr_in.get() : lr_in.value, wd = on_host ? wd_in.get() : wd_in.value;
    if constexpr (on_host) {
      if (skip_flag && *skip_flag) return;
    } else {
      sync_steps(pol);
    }
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
      for (std::size_t j = 0; j < entries.size(); ++j) t_expected_[j] = steps_[j];
      adamw_tensors(pol, entries, coeffs_, p, g, m, v, dev_steps_.data(), skip_flag, lr, cfg_.beta1, cfg_.beta2,
                    t_expected_.data(), lr_in.at, wd_in.at);
    }
  }

  /// GPU: uploads the step counts written through steps() since the last step, on the
  /// policy's stream (step() does it first; a step replayed from a CUDA graph, which does not
  /// run step(), needs it before the replay). Nothing to do on the host.
  template <class Policy>
  void sync_steps(const Policy& pol) {
    if constexpr (!on_host) {
      if (!steps_dirty_) return;  // steps() was handed out: the host's counts are the truth again
      if (!steps_.empty()) upload(pol, dev_steps_.data(), steps_.data(), steps_.size());
      steps_dirty_ = false;
    } else {
      (void)pol;
    }
  }

  flat_params<T, Space>& exp_avg() { return m_; }
  flat_params<T, Space>& exp_avg_sq() { return v_; }
  const flat_params<T, Space>& exp_avg() const { return m_; }
  const flat_params<T, Space>& exp_avg_sq() const { return v_; }
  /// Per-tensor step counts, in layout order. On the GPU they are read back from the device
  /// (one counted host wait); what is written here is uploaded by the next step.
  std::vector<std::int64_t>& steps() {
    pull_steps();
    if constexpr (!on_host) steps_dirty_ = true;
    return steps_;
  }
  const std::vector<std::int64_t>& steps() const {
    pull_steps();
    return steps_;
  }
  const adamw_config& config() const { return cfg_; }

 private:
  static constexpr bool on_host = std::is_same_v<Space, host_space>;
  struct no_storage {};
  // The device's step counts into the host's (GPU): after a skipped step they are the truth.
  void pull_steps() const {
    if constexpr (!on_host) {
      if (steps_dirty_ || steps_.empty()) return;  // the host's counts are newer, or nothing to read
      view_to_host(tensor_view<const std::int64_t, Space>{dev_steps_.data(), {std::int64_t(steps_.size())}, "adamw steps"},
                   steps_.data());
    }
  }

  adamw_config cfg_{};
  flat_params<T, Space> m_, v_;
  mutable std::vector<std::int64_t> steps_;
  std::vector<cpu::adamw_coeffs<T>> coeffs_;  // per tensor, rewritten each step (sized once)
  // GPU only: the true step counts in device memory, the counts each step's host
  // coefficients were computed for, and whether steps() may have been written.
  std::conditional_t<on_host, no_storage, typename storage_for<std::int64_t, Space>::type> dev_steps_{};
  std::vector<std::int64_t> t_expected_;
  mutable bool steps_dirty_ = false;
};

}  // namespace dino::optim
