// dino/nn/layer_norm.hpp: LayerNorm over the last dimension, nn.LayerNorm(dim, eps).
//
//   y = (x - mean) * rstd * w + b      per row; w "<prefix>weight" [D] = 1, b "<prefix>bias" [D] = 0
// saved: mean and rstd per row ([N, 2]); backward: dw += sum_rows dy * xhat, db += sum_rows dy,
// dx (=|+=|skip) by grad_mode. Both parameters are 1-D, so they get no weight decay.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "dino/core/param_store.hpp"
#include "dino/math/layernorm.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::nn {

struct layer_norm_config {
  std::int64_t dim = 0;
  double eps = 1e-6;  ///< ViT blocks (dino-spec §1.5); PyTorch's default is 1e-5
};

class layer_norm {
 public:
  using config_type = layer_norm_config;
  layer_norm() = default;
  layer_norm(layer_norm_config c, param_layout& layout, const std::string& prefix) : cfg_(c) {
    require<config_error>(c.dim > 0, "layer_norm '", prefix, "': dim must be positive, got ", c.dim);
    w_ = layout.add(prefix + "weight", {c.dim}, param_no_weight_decay, param_init::ones);
    b_ = layout.add(prefix + "bias", {c.dim}, param_no_weight_decay, param_init::zeros);
  }
  std::int64_t in_dim() const { return cfg_.dim; }
  std::int64_t out_dim() const { return cfg_.dim; }
  std::size_t saved_elems(std::int64_t n) const { return static_cast<std::size_t>(2 * n); }
  std::size_t scratch_elems(std::int64_t) const { return 0; }

  template <class Policy, class T, class S>
  void forward(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<T, S> y,
               tensor_view<T, S> saved) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("layer_norm forward", x, cfg_.dim);
    check_shape("layer_norm forward", y, x.shape);
    const int D = static_cast<int>(cfg_.dim);
    for_each_row(pol, x.rows(), [&](std::int64_t r) {
      auto st = math::layernorm_row(x.data + r * D, P.data + w_, P.data + b_, y.data + r * D, D, T(cfg_.eps));
      if (saved.data) {
        saved.data[2 * r] = st.mean;
        saved.data[2 * r + 1] = st.rstd;
      }
    });
  }
  template <class Policy, class T, class S>
  void infer(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<T, S> y,
             tensor_view<T, S>) const {
    forward(pol, P, x, y, tensor_view<T, S>{});
  }

  template <class Policy, class T, class S>
  void backward(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<const T, S> saved,
                tensor_view<const T, S> dy, tensor_view<T, S> dx, grad_mode mode, tensor_view<T, S> G,
                tensor_view<T, S>) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("layer_norm backward", x, cfg_.dim);
    check_shape("layer_norm backward", dy, x.shape);
    const std::int64_t n = x.rows();
    const int D = static_cast<int>(cfg_.dim);
    if (mode != grad_mode::skip) {
      check_shape("layer_norm backward", dx, x.shape);
      for_each_row(pol, n, [&](std::int64_t r) {
        math::layernorm_row_backward(x.data + r * D, P.data + w_, dy.data + r * D,
                                     math::layernorm_stats<T>{saved.data[2 * r], saved.data[2 * r + 1]}, dx.data + r * D,
                                     D, mode == grad_mode::accumulate);
      });
    }
    // Parameter gradients: parallel over column blocks, rows summed in order (deterministic,
    // whatever the block width). Blocks of 16 to 64 columns, about 4 per thread.
    const std::int64_t block = std::clamp<std::int64_t>((cfg_.dim / (4 * std::max(1, pol.threads)) + 15) / 16 * 16, 16, 64);
    const std::int64_t nb = (cfg_.dim + block - 1) / block;
    for_each_row(pol, nb, [&](std::int64_t bi) {
      const std::int64_t c0 = bi * block, c1 = std::min<std::int64_t>(cfg_.dim, c0 + block);
      for (std::int64_t r = 0; r < n; ++r) {
        const T mean = saved.data[2 * r], rstd = saved.data[2 * r + 1];
        const T* xr = x.data + r * D;
        const T* dr = dy.data + r * D;
        for (std::int64_t c = c0; c < c1; ++c) {
          G.data[w_ + c] += dr[c] * (xr[c] - mean) * rstd;
          G.data[b_ + c] += dr[c];
        }
      }
    });
  }

 private:
  layer_norm_config cfg_{};
  std::size_t w_ = 0, b_ = 0;
};

}  // namespace dino::nn
