// dino/math/gelu.hpp: exact GELU and its derivative (element functors, host and device).
//
//   gelu(x)  = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))     (torch.nn.GELU(), approximate='none')
//   gelu'(x) = Phi(x) + x * phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
#pragma once

#include <cmath>

#include "dino/config.hpp"

namespace dino::math {

template <class T>
DINO_INLINE T gelu(T x) {
  return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440)));
}

template <class T>
DINO_INLINE T gelu_grad(T x) {
  const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
  const T pdf = std::exp(T(-0.5) * x * x) * T(0.39894228040143267794);
  return cdf + x * pdf;
}

}  // namespace dino::math
