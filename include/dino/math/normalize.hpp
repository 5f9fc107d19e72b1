// dino/math/normalize.hpp: L2 normalisation and weight normalisation of one row.
//
// L2 (torch.nn.functional.normalize, p = 2): y = x / max(||x||, eps), eps = 1e-12.
//   backward: ||x|| > eps:  dx = (dy - y (y . dy)) / ||x||
//             otherwise:    dx = dy / eps        (the denominator is the constant eps)
// Weight norm (torch.nn.utils.weight_norm, dim = 0), one output row k:
//   w_k = g_k v_k / ||v_k||      (no eps, as PyTorch's _weight_norm)
//   dg_k = (dw_k . v_k) / ||v_k||
//   dv_k = (g_k / ||v_k||) (dw_k - v_k (dw_k . v_k) / ||v_k||^2)
#pragma once

#include <cmath>

#include "dino/config.hpp"

namespace dino::math {

/// y = x / max(||x||, eps); returns ||x||. y may alias x.
template <class T>
DINO_HD T l2_normalize_row(const T* x, T* y, int n, T eps) {
  T s = 0;
  for (int i = 0; i < n; ++i) s += x[i] * x[i];
  const T norm = std::sqrt(s);
  const T inv = T(1) / (norm > eps ? norm : eps);
  for (int i = 0; i < n; ++i) y[i] = x[i] * inv;
  return norm;
}

/// dx (=|+=) given the output y, the input norm and dy.
template <class T>
DINO_HD void l2_normalize_row_backward(const T* y, T norm, const T* dy, T* dx, int n, T eps, bool accumulate) {
  if (norm > eps) {
    T dot = 0;
    for (int i = 0; i < n; ++i) dot += y[i] * dy[i];
    const T inv = T(1) / norm;
    for (int i = 0; i < n; ++i) {
      const T v = (dy[i] - y[i] * dot) * inv;
      dx[i] = accumulate ? dx[i] + v : v;
    }
  } else {
    for (int i = 0; i < n; ++i) {
      const T v = dy[i] / eps;
      dx[i] = accumulate ? dx[i] + v : v;
    }
  }
}

/// w = g v / ||v|| for one row; returns ||v||.
template <class T>
DINO_HD T weight_norm_row(T g, const T* v, T* w, int n) {
  T s = 0;
  for (int i = 0; i < n; ++i) s += v[i] * v[i];
  const T norm = std::sqrt(s);
  const T scale = g / norm;
  for (int i = 0; i < n; ++i) w[i] = v[i] * scale;
  return norm;
}

/// Accumulates dg (when dg != nullptr) and dv (+=) for one row from dw.
template <class T>
DINO_HD void weight_norm_row_backward(T g, const T* v, T norm, const T* dw, T* dg, T* dv, int n) {
  T dot = 0;
  for (int i = 0; i < n; ++i) dot += dw[i] * v[i];
  if (dg) *dg += dot / norm;
  if (dv) {
    const T a = g / norm, b = dot / (norm * norm);
    for (int i = 0; i < n; ++i) dv[i] += a * (dw[i] - v[i] * b);
  }
}

}  // namespace dino::math
