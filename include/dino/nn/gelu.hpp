// dino/nn/gelu.hpp: element-wise exact GELU over a tensor and its backward.
//
//   y = gelu(a);   da (=|+=) dy * gelu'(a)
// The CPU policy runs the range kernels of policy/cpu/gelu_kernel.hpp (vectorised erf for float);
// the CUDA policy runs math::gelu / math::gelu_grad element-wise (policy/cuda/nn_ops.cuh).
// Needs of the policy: gelu_apply and gelu_backward_apply.
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

}  // namespace dino::nn
