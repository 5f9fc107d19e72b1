// dino/nn/gelu.hpp: element-wise exact GELU over a tensor and its backward.
//
//   y = gelu(a);   da (=|+=) dy * gelu'(a)
// The CPU policy runs the range kernels of policy/cpu/gelu_kernel.hpp (vectorised erf for float);
// the CUDA policy runs math::gelu / math::gelu_grad element-wise (policy/cuda/nn_ops.cuh).
// Needs of the policy: gelu_apply and gelu_backward_apply.
//
// A policy that also has gelu_with_grad_apply and mul_apply (the CPU policy) computes gelu'(a)
// with gelu(a) in one pass: gelu_saves_grad<Policy> is then true, and the ViT's training
// forward keeps gelu'(a) in place of a (gelu_forward_keep_grad), for the backward to multiply
// by (gelu_backward_from_grad), one erf and exp per element instead of two. The values are
// the same as gelu_forward then gelu_backward. The CUDA policy recomputes (its element-wise
// passes are bound by memory, where the extra stream would cost more than the arithmetic).
#pragma once

#include <cstdint>

#include "dino/math/gelu.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::nn {

template <class Policy, class T, class S>
inline void gelu_forward(const Policy& pol, tensor_view<const T, S> a, tensor_view<T, S> y) {
  DINO_CHECK_SPACE(Policy, S);
  check_shape("gelu forward", y, a.shape);
  gelu_apply(pol, a.data, y.data, a.numel());
}

template <class Policy, class T, class S>
inline void gelu_backward(const Policy& pol, tensor_view<const T, S> a, tensor_view<const T, S> dy,
                          tensor_view<T, S> da, bool accumulate) {
  DINO_CHECK_SPACE(Policy, S);
  check_shape("gelu backward", dy, a.shape);
  check_shape("gelu backward", da, a.shape);
  gelu_backward_apply(pol, a.data, dy.data, da.data, a.numel(), accumulate);
}

/// Whether Policy computes gelu'(a) with gelu(a) in one pass (see above).
template <class Policy, class T>
inline constexpr bool gelu_saves_grad = requires(const Policy& p, const T* a, T* y, T* g, std::int64_t n) {
  gelu_with_grad_apply(p, a, y, g, n);
  mul_apply(p, a, a, g, n, true);
};

/// y = gelu(a), and a replaced by gelu'(a) (a policy with gelu_saves_grad).
template <class Policy, class T, class S>
inline void gelu_forward_keep_grad(const Policy& pol, tensor_view<T, S> a, tensor_view<T, S> y) {
  DINO_CHECK_SPACE(Policy, S);
  check_shape("gelu forward", y, a.shape);
  gelu_with_grad_apply(pol, static_cast<const T*>(a.data), y.data, a.data, a.numel());
}

/// da (=|+=) dy * ga, with ga = gelu'(a) kept by gelu_forward_keep_grad.
template <class Policy, class T, class S>
inline void gelu_backward_from_grad(const Policy& pol, tensor_view<const T, S> ga, tensor_view<const T, S> dy,
                                    tensor_view<T, S> da, bool accumulate) {
  DINO_CHECK_SPACE(Policy, S);
  check_shape("gelu backward", dy, ga.shape);
  check_shape("gelu backward", da, ga.shape);
  mul_apply(pol, ga.data, dy.data, da.data, ga.numel(), accumulate);
}

}  // namespace dino::nn
