// dino/ssl/dino_head.hpp: the DINO projection head (dino-spec §2).
//
//   z = mlp(x)                    Linear(in, hidden) GELU [Linear(hidden, hidden) GELU]* Linear(hidden, bottleneck)
//   u = z / max(||z||, 1e-12)     (F.normalize)
//   W = g v / ||v||  row-wise     (weight norm, dim 0; "last_layer.weight_g" [K, 1], "last_layer.weight_v" [K, bottleneck])
//   y = u W^T                     [N, K], no bias
// norm_last_layer = true keeps g = 1 and frozen (the reference default, teacher too): the
// logits are cosines. The last layer carries param_last_layer so that a trainer can freeze
// it during the first epoch(s) (cancel_gradients_last_layer).
// Initialisation as the reference: MLP weights truncated normal 0.02, biases 0; v PyTorch's
// default Linear init U(+-1/sqrt(bottleneck)); g filled with 1.
//
// Policy: any policy whose space the views carry (DINO_CHECK_SPACE), with gemm, the MLP's
// operations (nn/mlp.hpp) and the head's own row operations l2_normalize_rows(_backward) and
// weight_norm_rows(_backward): policy/cpu/normalize_rows.hpp on the CPU (a row per thread,
// the math/normalize.hpp functors), policy/cuda/loss.cuh on the GPU (a warp per row).
#pragma once

#include <cstdint>
#include <string>

#include "dino/math/normalize.hpp"
#include "dino/nn/mlp.hpp"
#include "dino/policy/cpu/normalize_rows.hpp"

namespace dino::ssl {

struct dino_head_config {
  std::int64_t in_dim = 384;
  std::int64_t out_dim = 65536;  ///< K, the number of prototypes
  std::int64_t hidden_dim = 2048;
  std::int64_t bottleneck_dim = 256;
  int nlayers = 3;
  bool norm_last_layer = true;
};

class dino_head {
 public:
  using config_type = dino_head_config;
  static constexpr double l2_eps = 1e-12;

  dino_head() = default;
  dino_head(dino_head_config c, param_layout& layout, const std::string& prefix = "") : cfg_(c) {
    require<config_error>(c.nlayers >= 1, "dino_head: nlayers must be >= 1, got ", c.nlayers);
    require<config_error>(c.in_dim > 0 && c.out_dim > 0 && c.hidden_dim > 0 && c.bottleneck_dim > 0,
                          "dino_head: sizes must be positive (in ", c.in_dim, ", out ", c.out_dim, ", hidden ",
                          c.hidden_dim, ", bottleneck ", c.bottleneck_dim, ")");
    nn::mlp_config m;
    m.dims.push_back(c.in_dim);
    for (int i = 0; i + 1 < c.nlayers; ++i) m.dims.push_back(c.hidden_dim);
    m.dims.push_back(c.bottleneck_dim);
    m.single_unindexed = true;
    mlp_ = nn::mlp(m, layout, prefix + "mlp.");
    g_ = layout.add(prefix + "last_layer.weight_g", {c.out_dim, 1},
                    param_last_layer | (c.norm_last_layer ? param_frozen : param_none), param_init::ones);
    v_ = layout.add(prefix + "last_layer.weight_v", {c.out_dim, c.bottleneck_dim}, param_last_layer,
                    param_init::kaiming_uniform, double(c.bottleneck_dim));
  }

  const dino_head_config& config() const { return cfg_; }
  std::int64_t in_dim() const { return cfg_.in_dim; }
  std::int64_t out_dim() const { return cfg_.out_dim; }
  std::int64_t param_count() const {
    return mlp_.param_count() + cfg_.out_dim * (cfg_.bottleneck_dim + 1);
  }

  // Layout of `saved` for N rows: mlp saved | z [N, bn] | u [N, bn] | ||z|| [N] | W [K, bn] | ||v|| [K]
  std::size_t saved_elems(std::int64_t n) const {
    const auto bn = cfg_.bottleneck_dim, K = cfg_.out_dim;
    return mlp_.saved_elems(n) + static_cast<std::size_t>(2 * n * bn + n + K * bn + K);
  }
  std::size_t scratch_elems(std::int64_t n) const {
    const auto bn = cfg_.bottleneck_dim, K = cfg_.out_dim;
    const std::size_t own = static_cast<std::size_t>(2 * n * bn + K * bn + K);
    return own + mlp_.scratch_elems(n);
  }

  template <class Policy, class T, class S>
  void forward(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<T, S> y,
               tensor_view<T, S> saved) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("dino_head forward", x, cfg_.in_dim);
    check_shape("dino_head forward", y, {x.rows(), cfg_.out_dim});
    require<shape_error>(static_cast<std::size_t>(saved.numel()) >= saved_elems(x.rows()),
                         "dino_head forward: saved: needs ", saved_elems(x.rows()), " elements, got ", saved.numel());
    const std::int64_t n = x.rows();
    parts<T, S> s = split<T, S>(saved.data, n);
    mlp_.forward(pol, P, x, s.z, tensor_view<T, S>{saved.data, {static_cast<std::int64_t>(mlp_.saved_elems(n))}, "mlp saved"});
    finish(pol, P, s.z, s.u, s.znorm, s.w, s.vnorm, y);
  }

  /// Inference forward (the teacher): saves nothing; scratch_elems(N) of scratch.
  template <class Policy, class T, class S>
  void infer(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<T, S> y,
             tensor_view<T, S> scratch) const {
    DINO_CHECK_SPACE(Policy, S);
    check_matrix("dino_head infer", x, cfg_.in_dim);
    check_shape("dino_head infer", y, {x.rows(), cfg_.out_dim});
    require<shape_error>(static_cast<std::size_t>(scratch.numel()) >= scratch_elems(x.rows()),
                         "dino_head infer: scratch: needs ", scratch_elems(x.rows()), " elements, got ", scratch.numel());
    const std::int64_t n = x.rows(), bn = cfg_.bottleneck_dim, K = cfg_.out_dim;
    T* p = scratch.data;
    tensor_view<T, S> z{p, {n, bn}, "head z"}, u{p + n * bn, {n, bn}, "head u"};
    tensor_view<T, S> w{p + 2 * n * bn, {K, bn}, "head W"}, vnorm{p + 2 * n * bn + K * bn, {K}, "head ||v||"};
    tensor_view<T, S> rest{p + 2 * n * bn + K * bn + K, {static_cast<std::int64_t>(mlp_.scratch_elems(n))}, "mlp scratch"};
    mlp_.infer(pol, P, x, z, rest);
    // ||z|| is not needed afterwards: reuse the first n entries of the mlp scratch.
    finish(pol, P, z, u, tensor_view<T, S>{rest.data, {n}, "head ||z||"}, w, vnorm, y);
  }

  /// dy [N, K] -> parameter gradients (+=) and dx (by mode). dg is skipped when g is frozen,
  /// and the whole last layer's gradient when `last_layer_frozen` (it would be discarded).
  template <class Policy, class T, class S>
  void backward(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<const T, S> saved,
                tensor_view<const T, S> dy, tensor_view<T, S> dx, grad_mode mode, tensor_view<T, S> G,
                tensor_view<T, S> scratch, bool last_layer_frozen = false) const {
    DINO_CHECK_SPACE(Policy, S);
    const std::int64_t n = x.rows(), bn = cfg_.bottleneck_dim, K = cfg_.out_dim;
    check_shape("dino_head backward", dy, {n, K});
    require<shape_error>(static_cast<std::size_t>(scratch.numel()) >= scratch_elems(n),
                         "dino_head backward: scratch: needs ", scratch_elems(n), " elements, got ", scratch.numel());
    parts<const T, S> s = split<const T, S>(saved.data, n);
    T* p = scratch.data;
    tensor_view<T, S> du{p, {n, bn}, "head du"}, dz{p + n * bn, {n, bn}, "head dz"}, dw{p + 2 * n * bn, {K, bn}, "head dW"};
    tensor_view<T, S> rest{p + 2 * n * bn + K * bn + K, {static_cast<std::int64_t>(mlp_.scratch_elems(n))}, "mlp scratch"};
    // du[N, bn] = dy[N, K] W[K, bn]; the prototype layer's products in fp32 (without_bf16)
    const Policy fp = without_bf16(pol);
    gemm(fp, gemm_desc{false, false, n, bn, K}, T(1), dy.data, s.w.data, T(0), du.data);
    if (!last_layer_frozen) {
      // dW[K, bn] = dy^T u, then through the weight norm into g and v.
      gemm(fp, gemm_desc{true, false, K, bn, n}, T(1), dy.data, s.u.data, T(0), dw.data);
      const bool g_trainable = !cfg_.norm_last_layer;
      weight_norm_rows_backward(pol, P.data + g_, P.data + v_, s.vnorm.data, dw.data,
                                g_trainable ? G.data + g_ : static_cast<T*>(nullptr), G.data + v_, K, bn);
    }
    l2_normalize_rows_backward(pol, s.u.data, s.znorm.data, du.data, dz.data, n, bn, T(l2_eps), false);
    mlp_.backward(pol, P, x, tensor_view<const T, S>{saved.data, {static_cast<std::int64_t>(mlp_.saved_elems(n))}, "mlp saved"},
                  tensor_view<const T, S>(dz), dx, mode, G, rest);
  }

  std::size_t weight_g_offset() const { return g_; }
  std::size_t weight_v_offset() const { return v_; }

 private:
  template <class U, class S>
  struct parts {
    tensor_view<U, S> z, u, znorm, w, vnorm;
  };
  template <class U, class S>
  parts<U, S> split(U* base, std::int64_t n) const {
    const std::int64_t bn = cfg_.bottleneck_dim, K = cfg_.out_dim;
    U* p = base + mlp_.saved_elems(n);
    parts<U, S> r;
    r.z = {p, {n, bn}, "head z"};
    r.u = {p + n * bn, {n, bn}, "head u"};
    r.znorm = {p + 2 * n * bn, {n}, "head ||z||"};
    r.w = {p + 2 * n * bn + n, {K, bn}, "head W"};
    r.vnorm = {p + 2 * n * bn + n + K * bn, {K}, "head ||v||"};
    return r;
  }

  template <class Policy, class T, class S>
  void finish(const Policy& pol, tensor_view<const T, S> P, tensor_view<T, S> z, tensor_view<T, S> u,
              tensor_view<T, S> znorm, tensor_view<T, S> w, tensor_view<T, S> vnorm, tensor_view<T, S> y) const {
    const std::int64_t n = z.rows(), bn = cfg_.bottleneck_dim, K = cfg_.out_dim;
    l2_normalize_rows(pol, static_cast<const T*>(z.data), u.data, znorm.data, n, bn, T(l2_eps));
    weight_norm_rows(pol, P.data + g_, P.data + v_, w.data, vnorm.data, K, bn);
    // the logits in fp32 from fp32 operands, also under bf16 mixed precision (a few MFLOP per crop)
    gemm(without_bf16(pol), gemm_desc{false, true, n, K, bn}, T(1), u.data, w.data, T(0), y.data);
  }

  dino_head_config cfg_{};
  nn::mlp mlp_;
  std::size_t g_ = 0, v_ = 0;
};

}  // namespace dino::ssl
