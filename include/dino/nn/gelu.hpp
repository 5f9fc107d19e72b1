// dino/nn/gelu.hpp: element-wise exact GELU over a tensor and its backward.
//
//   y = gelu(a);   da (=|+=) dy * gelu'(a)
// The CPU policy runs the range kernels of policy/cpu/gelu_kernel.hpp (vectorised erf for float).
#pragma once

#include <cstdint>

#include "dino/math/gelu.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::nn {

template <class Policy, class T, class S>
inline void gelu_forward(const Policy& pol, tensor_view<const T, S> a, tensor_view<T, S> y) {
  DINO_CHECK_SPACE(Policy, S);
  check_shape("gelu forward", y, a.shape);
  for_each_chunk(pol, a.numel(), [&](std::int64_t b, std::int64_t e) { cpu::gelu_range(a.data + b, y.data + b, e - b); });
}

template <class Policy, class T, class S>
inline void gelu_backward(const Policy& pol, tensor_view<const T, S> a, tensor_view<const T, S> dy,
                          tensor_view<T, S> da, bool accumulate) {
  DINO_CHECK_SPACE(Policy, S);
  check_shape("gelu backward", dy, a.shape);
  check_shape("gelu backward", da, a.shape);
  for_each_chunk(pol, a.numel(), [&](std::int64_t b, std::int64_t e) {
    cpu::gelu_backward_range(a.data + b, dy.data + b, da.data + b, e - b, accumulate);
  });
}

}  // namespace dino::nn
