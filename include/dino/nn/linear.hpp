// dino/nn/linear.hpp: a fully connected layer, PyTorch's nn.Linear.
//
//   y[N, out] = x[N, in] W^T + b,   W: "<prefix>weight" [out, in],  b: "<prefix>bias" [out]
// backward: dW += dy^T x,  db += sum_rows dy  (parameter gradients always accumulate)
//           dx (=|+=|skip, by grad_mode) = dy W
// Parameters and gradients are flat buffers laid out by the param_layout the layer
// registered in; the layer keeps only offsets. Any policy with gemm, gemm_bias_rows and
// linear_param_grads (CPU, CUDA); all views in the policy's memory space. The bf16-operand
// forms (round_weight, forward_bf16) also need round_bf16_apply and gemm_bias_rows_bf16.
#pragma once

#include <cstdint>
#include <string>

#include "dino/core/param_store.hpp"
#include "dino/core/tensor.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/policy/cpu/bf16_operands.hpp"
#include "dino/policy/cpu/nn_ops.hpp"

namespace dino::nn {

struct linear_config {
  std::int64_t in = 0, out = 0;
  bool bias = true;
};

class linear {
 public:
  using config_type = linear_config;
  linear() = default;
  /// Registers "<prefix>weight" (and "<prefix>bias") with the given weight initialisation.
  linear(linear_config c, param_layout& layout, const std::string& prefix, param_init winit = param_init::trunc_normal,
         double wscale = 0.02, unsigned extra_flags = param_none)
      : cfg_(c) {
    require<config_error>(c.in > 0 && c.out > 0, "linear '", prefix, "': sizes must be positive, got in=", c.in,
                          " out=", c.out);
    w_ = layout.add(prefix + "weight", {c.out, c.in}, extra_flags, winit,
                    winit == param_init::kaiming_uniform ? double(c.in) : wscale);
    if (c.bias) b_ = layout.add(prefix + "bias", {c.out}, extra_flags | param_no_weight_decay, param_init::zeros);
  }

  const linear_config& config() const { return cfg_; }
  std::int64_t in_dim() const { return cfg_.in; }
  std::int64_t out_dim() const { return cfg_.out; }
  /// Backward needs only the input, which the caller keeps: nothing saved, no scratch.
  std::size_t saved_elems(std::int64_t) const { return 0; }
  std::size_t scratch_elems(std::int64_t) const { return 0; }
  std::int64_t param_count() const { return cfg_.out * cfg_.in + (cfg_.bias ? cfg_.out : 0); }

  template <class Policy, class T, class S>
  void forward(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<T, S> y) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("linear forward", x, cfg_.in);
    check_shape("linear forward", y, {x.rows(), cfg_.out});
    const std::int64_t n = x.rows();
    gemm_desc d{false, true, n, cfg_.out, cfg_.in};
    if (cfg_.bias) {
      gemm_bias_rows(pol, d, x.data, P.data + w_, P.data + b_, y.data);  // y = x W^T + b
    } else {
      gemm(pol, d, T(1), x.data, P.data + w_, T(0), y.data);
    }
  }

  /// y = x W^T + b + residual (residual [N, out], not y): on the GPU the residual is read by
  /// the GEMM (no pass of its own); on the CPU it is added after, as a separate add would.
  template <class Policy, class T, class S>
  void forward_residual(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x,
                        tensor_view<const T, S> residual, tensor_view<T, S> y) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("linear forward", x, cfg_.in);
    check_shape("linear forward", y, {x.rows(), cfg_.out});
    check_shape("linear forward (residual)", residual, {x.rows(), cfg_.out});
    require<config_error>(cfg_.bias, "linear forward_residual: the layer has no bias");
    require<shape_error>(residual.data != y.data, "linear forward_residual: the residual must not be the output");
    gemm_bias_rows(pol, gemm_desc{false, true, x.rows(), cfg_.out, cfg_.in}, x.data, P.data + w_, P.data + b_, y.data,
                   residual.data);
  }

  /// w16 (=) the weight rounded to bf16 ([out, in] bf16 bits): the weight operand of
  /// forward_bf16 (policy op round_bf16_apply).
  template <class Policy, class S>
  void round_weight(const Policy& pol, tensor_view<const float, S> P, std::uint16_t* w16) const {
    DINO_CHECK_SPACE(Policy, S);
    round_bf16_apply(pol, P.data + w_, w16, cfg_.out * cfg_.in);
  }
  /// y = x16 w16^T + b (+ residual, [N, out], not y) with both operands bf16 in memory: x16
  /// [N, in] (N = y's rows) and w16 from round_weight (policy op gemm_bias_rows_bf16). The
  /// same values as forward() with pol.bf16 on the fp32 x that x16 rounds.
  template <class Policy, class S>
  void forward_bf16(const Policy& pol, tensor_view<const float, S> P, const std::uint16_t* x16,
                    const std::uint16_t* w16, tensor_view<float, S> y, const float* residual = nullptr) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("linear forward (bf16 operands)", y, cfg_.out);
    require<shape_error>(!residual || residual != y.data,
                         "linear forward (bf16 operands): the residual must not be the output");
    gemm_bias_rows_bf16(pol, y.rows(), cfg_.out, cfg_.in, x16, w16, cfg_.bias ? P.data + b_ : nullptr, y.data,
                        residual);
  }

  /// copies: bf16 copies of dy and x that the products may read instead of rounding them
  /// (linear_backward; x.data may then be null, its shape still given).
  template <class Policy, class T, class S>
  void backward(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<const T, S> dy,
                tensor_view<T, S> dx, grad_mode mode, tensor_view<T, S> G, linear_bf16_copies copies = {}) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("linear backward", x, cfg_.in);
    check_shape("linear backward", dy, {x.rows(), cfg_.out});
    const std::int64_t n = x.rows();
    if (mode != grad_mode::skip) check_shape("linear backward", dx, {n, cfg_.in});
    // dW[out, in] += dy^T[out, N] x[N, in], db += sum over rows of dy, dx[N, in] = dy W (+ dx)
    linear_backward(pol, dy.data, x.data, P.data + w_, n, cfg_.out, cfg_.in, G.data + w_,
                    cfg_.bias ? G.data + b_ : nullptr, mode == grad_mode::skip ? nullptr : dx.data,
                    mode == grad_mode::accumulate ? T(1) : T(0), copies);
  }

  // The network_module forms (ssl/concepts.hpp).
  template <class Policy, class T, class S>
  void forward(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<T, S> y,
               tensor_view<T, S>) const {
    forward(pol, P, x, y);
  }
  template <class Policy, class T, class S>
  void infer(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<T, S> y,
             tensor_view<T, S>) const {
    forward(pol, P, x, y);
  }
  template <class Policy, class T, class S>
  void backward(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<const T, S>,
                tensor_view<const T, S> dy, tensor_view<T, S> dx, grad_mode mode, tensor_view<T, S> G,
                tensor_view<T, S>) const {
    backward(pol, P, x, dy, dx, mode, G);
  }

  std::size_t weight_offset() const { return w_; }
  std::size_t bias_offset() const { return b_; }

 private:
  linear_config cfg_{};
  std::size_t w_ = 0, b_ = 0;
};

}  // namespace dino::nn
