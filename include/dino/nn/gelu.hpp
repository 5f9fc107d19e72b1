// dino/nn/gelu.hpp: element-wise exact GELU over a tensor and its backward.
//
//   y = gelu(a);   da (=|+=) dy * gelu'(a)
#pragma once

#include <cstdint>

#include "dino/math/gelu.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::nn {

template <class Policy, class T, class S>
inline void gelu_forward(const Policy& pol, tensor_view<const T, S> a, tensor_view<T, S> y) {
  DINO_CHECK_SPACE(Policy, S);
  check_shape("gelu forward", y, a.shape);
  for_each_chunk(pol, a.numel(), [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) y.data[i] = math::gelu(a.data[i]);
  });
}

template <class Policy, class T, class S>
inline void gelu_backward(const Policy& pol, tensor_view<const T, S> a, tensor_view<const T, S> dy,
                          tensor_view<T, S> da, bool accumulate) {
  DINO_CHECK_SPACE(Policy, S);
  check_shape("gelu backward", dy, a.shape);
  check_shape("gelu backward", da, a.shape);
  for_each_chunk(pol, a.numel(), [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      const T v = dy.data[i] * math::gelu_grad(a.data[i]);
      da.data[i] = accumulate ? da.data[i] + v : v;
    }
  });
}

}  // namespace dino::nn
