// dino/math/layernorm.hpp: LayerNorm over one row (host and device).
//
//   forward:  mean = sum x / n,  var = sum (x - mean)^2 / n (biased),  rstd = 1 / sqrt(var + eps)
//             y = (x - mean) * rstd * w + b           returns {mean, rstd} for backward
//   backward: xhat = (x - mean) * rstd,  g = dy * w
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//             dw += dy * xhat,  db += dy               (the caller reduces these over rows)
// ViT blocks use eps = 1e-6 (dino-spec §1.5); PyTorch's default is 1e-5.
#pragma once

#include <cmath>

#include "dino/config.hpp"

namespace dino::math {

template <class T>
struct layernorm_stats {
  T mean, rstd;
};

template <class T>
DINO_HD layernorm_stats<T> layernorm_row(const T* x, const T* w, const T* b, T* y, int n, T eps) {
  T mean = 0;
  for (int i = 0; i < n; ++i) mean += x[i];
  mean /= T(n);
  T var = 0;
  for (int i = 0; i < n; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= T(n);
  const T rstd = T(1) / std::sqrt(var + eps);
  for (int i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * (w ? w[i] : T(1)) + (b ? b[i] : T(0));
  return {mean, rstd};
}

/// Input gradient of one row: dx = (or +=, when accumulate) the formula above.
template <class T>
DINO_HD void layernorm_row_backward(const T* x, const T* w, const T* dy, layernorm_stats<T> s, T* dx, int n,
                                    bool accumulate) {
  T mg = 0, mgx = 0;
  for (int i = 0; i < n; ++i) {
    const T g = dy[i] * (w ? w[i] : T(1));
    const T xh = (x[i] - s.mean) * s.rstd;
    mg += g;
    mgx += g * xh;
  }
  mg /= T(n);
  mgx /= T(n);
  for (int i = 0; i < n; ++i) {
    const T g = dy[i] * (w ? w[i] : T(1));
    const T xh = (x[i] - s.mean) * s.rstd;
    const T v = s.rstd * (g - mg - xh * mgx);
    dx[i] = accumulate ? dx[i] + v : v;
  }
}

}  // namespace dino::math
