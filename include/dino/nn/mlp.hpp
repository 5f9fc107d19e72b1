// dino/nn/mlp.hpp: a multi-layer perceptron, Linear (GELU Linear)*, as nn.Sequential.
//
// dims = {d0, d1, ..., dL}: L linear layers d_i -> d_{i+1}, exact GELU after every layer
// but the last (or after the last too, with gelu_last). Parameter names follow the
// Sequential indices: "<prefix>0.weight", "<prefix>2.weight", ... (GELU takes the odd
// indices); with a single layer and `single_unindexed`, "<prefix>weight" as PyTorch names a
// bare nn.Linear.
//
// Memory, all caller-owned and sized by the queries (N = rows of x):
//   saved_elems(N)   what forward keeps for backward: pre-activations and activations
//   scratch_elems(N) what infer() and backward() need besides
// forward writes y [N, dL]; backward accumulates parameter gradients into G and writes,
// accumulates or skips dx [N, d0]. Any policy the linear layers and GELU run on; all views
// in its memory space.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "dino/nn/gelu.hpp"
#include "dino/nn/linear.hpp"

namespace dino::nn {

struct mlp_config {
  std::vector<std::int64_t> dims;  ///< d0 .. dL, at least two entries
  bool gelu_last = false;
  bool bias = true;
  bool single_unindexed = false;  ///< one layer named "<prefix>weight" (PyTorch: a bare Linear)
  /// Weight initialisation: truncated normal 0.02 as the reference's heads and ViT linears, or
  /// kaiming_uniform (PyTorch's nn.Linear default), which keeps activations at unit scale in a
  /// deep MLP without normalisation layers (the stand-in backbone).
  param_init weight_init = param_init::trunc_normal;
  double init_std = 0.02;
};

class mlp {
 public:
  using config_type = mlp_config;
  mlp() = default;
  mlp(mlp_config c, param_layout& layout, const std::string& prefix) : cfg_(std::move(c)) {
    require<config_error>(cfg_.dims.size() >= 2, "mlp '", prefix, "': needs at least an input and an output size");
    const std::size_t L = cfg_.dims.size() - 1;
    for (std::size_t i = 0; i < L; ++i) {
      std::string p = (L == 1 && cfg_.single_unindexed) ? prefix : prefix + std::to_string(2 * i) + ".";
      layers_.emplace_back(linear_config{cfg_.dims[i], cfg_.dims[i + 1], cfg_.bias}, layout, p, cfg_.weight_init,
                           cfg_.init_std);
    }
  }

  std::int64_t in_dim() const { return cfg_.dims.front(); }
  std::int64_t out_dim() const { return cfg_.dims.back(); }
  std::size_t layers() const { return layers_.size(); }
  std::int64_t param_count() const {
    std::int64_t n = 0;
    for (const auto& l : layers_) n += l.param_count();
    return n;
  }
  /// Number of layers followed by a GELU.
  std::size_t activated() const { return cfg_.gelu_last ? layers_.size() : layers_.size() - 1; }

  std::size_t saved_elems(std::int64_t n) const {
    std::size_t s = 0;
    for (std::size_t i = 0; i < activated(); ++i) s += 2 * static_cast<std::size_t>(n * cfg_.dims[i + 1]);
    return s;
  }
  std::size_t scratch_elems(std::int64_t n) const {
    std::int64_t w = *std::max_element(cfg_.dims.begin(), cfg_.dims.end());
    return 2 * static_cast<std::size_t>(n * w);
  }

  /// Training forward: keeps pre-activations and activations in `saved`.
  template <class Policy, class T, class S>
  void forward(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<T, S> y,
               tensor_view<T, S> saved) const {
    require<shape_error>(static_cast<std::size_t>(saved.numel()) >= saved_elems(x.rows()), "mlp forward: saved: needs ",
                         saved_elems(x.rows()), " elements, got ", saved.numel());
    const std::int64_t n = x.rows();
    tensor_view<const T, S> in = x;
    T* s = saved.data;
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const std::int64_t d = cfg_.dims[i + 1];
      if (i < activated()) {
        tensor_view<T, S> a{s, {n, d}, "mlp pre-activation"}, h{s + n * d, {n, d}, "mlp activation"};
        layers_[i].forward(pol, P, in, a);
        if (i + 1 == layers_.size()) {  // gelu_last: the activation is the output
          gelu_forward(pol, tensor_view<const T, S>(a), y);
          copy_elements(pol, static_cast<const T*>(y.data), h.data, n * d);
        } else {
          gelu_forward(pol, tensor_view<const T, S>(a), h);
        }
        in = h;
        s += 2 * n * d;
      } else {
        layers_[i].forward(pol, P, in, y);
      }
    }
  }

  /// Inference forward: saves nothing, uses scratch_elems(N) of scratch.
  template <class Policy, class T, class S>
  void infer(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<T, S> y,
             tensor_view<T, S> scratch) const {
    require<shape_error>(static_cast<std::size_t>(scratch.numel()) >= scratch_elems(x.rows()),
                         "mlp infer: scratch: needs ", scratch_elems(x.rows()), " elements, got ", scratch.numel());
    const std::int64_t n = x.rows();
    const std::int64_t half = static_cast<std::int64_t>(scratch_elems(n) / 2);
    tensor_view<const T, S> in = x;
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      const std::int64_t d = cfg_.dims[i + 1];
      const bool last = i + 1 == layers_.size();
      tensor_view<T, S> out = last ? y : tensor_view<T, S>{scratch.data + (i % 2) * half, {n, d}, "mlp activation"};
      layers_[i].forward(pol, P, in, out);
      if (i < activated()) gelu_forward(pol, tensor_view<const T, S>(out), out);
      in = out;
    }
  }

  template <class Policy, class T, class S>
  void backward(const Policy& pol, tensor_view<const T, S> P, tensor_view<const T, S> x, tensor_view<const T, S> saved,
                tensor_view<const T, S> dy, tensor_view<T, S> dx, grad_mode mode, tensor_view<T, S> G,
                tensor_view<T, S> scratch) const {
    const std::int64_t n = x.rows();
    require<shape_error>(static_cast<std::size_t>(scratch.numel()) >= scratch_elems(n), "mlp backward: scratch: needs ",
                         scratch_elems(n), " elements, got ", scratch.numel());
    const std::int64_t half = static_cast<std::int64_t>(scratch_elems(n) / 2);
    // Offsets of each activated layer's (a, h) pair in `saved`.
    std::size_t off[64];
    require<config_error>(activated() <= 64, "mlp: at most 64 activated layers");
    {
      std::size_t o = 0;
      for (std::size_t i = 0; i < activated(); ++i) {
        off[i] = o;
        o += 2 * static_cast<std::size_t>(n * cfg_.dims[i + 1]);
      }
    }
    tensor_view<const T, S> g = dy;  // gradient w.r.t. the output of layer i (after its GELU)
    for (std::size_t ii = layers_.size(); ii-- > 0;) {
      const std::int64_t d = cfg_.dims[ii + 1];
      tensor_view<const T, S> g_pre = g;
      if (ii < activated()) {  // through the GELU into the pre-activation
        tensor_view<const T, S> a{saved.data + off[ii], {n, d}, "mlp pre-activation"};
        tensor_view<T, S> ga{scratch.data + (ii % 2) * half, {n, d}, "mlp gradient"};
        gelu_backward(pol, a, g, ga, false);
        g_pre = ga;
      }
      tensor_view<const T, S> in =
          ii == 0 ? x : tensor_view<const T, S>{saved.data + off[ii - 1] + n * cfg_.dims[ii], {n, cfg_.dims[ii]}, "mlp activation"};
      if (ii == 0) {
        layers_[0].backward(pol, P, in, g_pre, dx, mode, G);
      } else {
        tensor_view<T, S> gin{scratch.data + ((ii + 1) % 2) * half, {n, cfg_.dims[ii]}, "mlp gradient"};
        layers_[ii].backward(pol, P, in, g_pre, gin, grad_mode::write, G);
        g = gin;
      }
    }
  }

  const std::vector<linear>& linears() const { return layers_; }

 private:
  mlp_config cfg_;
  std::vector<linear> layers_;
};

}  // namespace dino::nn
