// dino/nn/layer_norm.hpp: LayerNorm over the last dimension, nn.LayerNorm(dim, eps).
//
//   y = (x - mean) * rstd * w + b      per row; w "<prefix>weight" [D] = 1, b "<prefix>bias" [D] = 0
// saved: mean and rstd per row ([N, 2]); backward: dw += sum_rows dy * xhat, db += sum_rows dy,
// dx (=|+=|skip) by grad_mode. Both parameters are 1-D, so they get no weight decay.
// Any policy with layer_norm_rows, layer_norm_rows_backward and layer_norm_param_grads
// (policy/cpu/nn_ops.hpp; on CUDA a warp per row with double sums, policy/cuda/nn_ops.cuh).
#pragma once

#include <cstdint>
#include <string>

#include "dino/core/param_store.hpp"
#include "dino/math/layernorm.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/policy/cpu/bf16_operands.hpp"
#include "dino/policy/cpu/nn_ops.hpp"

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
    layer_norm_rows(pol, x.data, P.data + w_, P.data + b_, y.data, saved.data, x.rows(), cfg_.dim, T(cfg_.eps));
  }
  /// forward() with y rounded to bf16 as it is stored (y16 [N, dim] bf16 bits; policy op
  /// layer_norm_rows_bf16): the operand of a bf16 product (nn::linear::forward_bf16).
  template <class Policy, class S>
  void forward_bf16(const Policy& pol, tensor_view<const float, S> P, tensor_view<const float, S> x,
                    std::uint16_t* y16, tensor_view<float, S> saved) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("layer_norm forward", x, cfg_.dim);
    layer_norm_rows_bf16(pol, x.data, P.data + w_, P.data + b_, y16, saved.data, x.rows(), cfg_.dim, float(cfg_.eps));
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
    if (mode != grad_mode::skip) {
      check_shape("layer_norm backward", dx, x.shape);
      layer_norm_rows_backward(pol, x.data, P.data + w_, dy.data, saved.data, dx.data, n, cfg_.dim,
                               mode == grad_mode::accumulate);
    }
    layer_norm_param_grads(pol, x.data, dy.data, saved.data, n, cfg_.dim, G.data + w_, G.data + b_);
  }

 private:
  layer_norm_config cfg_{};
  std::size_t w_ = 0, b_ = 0;
};

}  // namespace dino::nn
