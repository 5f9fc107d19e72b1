// dino/math/softmax.hpp: softmax and log-softmax of one row with a temperature and an
// optional center (host and device).
//
//   z_k = (x_k - c_k) / tau                   (c = nullptr: no center)
//   softmax:     y_k = exp(z_k - max z) / sum_j exp(z_j - max z)
//   log-softmax: y_k = z_k - lse(z),  lse(z) = max z + log sum_j exp(z_j - max z)
//   backward (through z to x):
//     softmax:     dx_k = y_k (dy_k - sum_j dy_j y_j) / tau
//     log-softmax: dx_k = (dy_k - softmax(z)_k sum_j dy_j) / tau
// The DINO teacher is softmax((t - c) / tau_t); the student log_softmax(s / tau_s).
#pragma once

#include <cmath>

#include "dino/config.hpp"

namespace dino::math {

/// Returns lse(z); z is never stored.
template <class T>
DINO_HD T logsumexp_row(const T* x, const T* center, int n, T inv_tau) {
  T mx = -INFINITY;
  for (int i = 0; i < n; ++i) {
    const T z = (x[i] - (center ? center[i] : T(0))) * inv_tau;
    mx = z > mx ? z : mx;
  }
  T s = 0;
  for (int i = 0; i < n; ++i) s += std::exp((x[i] - (center ? center[i] : T(0))) * inv_tau - mx);
  return mx + std::log(s);
}

/// y = softmax((x - c) / tau); returns lse.
template <class T>
DINO_HD T softmax_row(const T* x, const T* center, T* y, int n, T inv_tau) {
  const T lse = logsumexp_row(x, center, n, inv_tau);
  for (int i = 0; i < n; ++i) y[i] = std::exp((x[i] - (center ? center[i] : T(0))) * inv_tau - lse);
  return lse;
}

/// y = log_softmax((x - c) / tau); returns lse.
template <class T>
DINO_HD T log_softmax_row(const T* x, const T* center, T* y, int n, T inv_tau) {
  const T lse = logsumexp_row(x, center, n, inv_tau);
  for (int i = 0; i < n; ++i) y[i] = (x[i] - (center ? center[i] : T(0))) * inv_tau - lse;
  return lse;
}

/// dx (=|+=) gradient of softmax given its output y.
template <class T>
DINO_HD void softmax_row_backward(const T* y, const T* dy, T* dx, int n, T inv_tau, bool accumulate) {
  T dot = 0;
  for (int i = 0; i < n; ++i) dot += dy[i] * y[i];
  for (int i = 0; i < n; ++i) {
    const T v = y[i] * (dy[i] - dot) * inv_tau;
    dx[i] = accumulate ? dx[i] + v : v;
  }
}

/// dx (=|+=) gradient of log-softmax given its output y (= log-probabilities).
template <class T>
DINO_HD void log_softmax_row_backward(const T* y, const T* dy, T* dx, int n, T inv_tau, bool accumulate) {
  T sum = 0;
  for (int i = 0; i < n; ++i) sum += dy[i];
  for (int i = 0; i < n; ++i) {
    const T v = (dy[i] - std::exp(y[i]) * sum) * inv_tau;
    dx[i] = accumulate ? dx[i] + v : v;
  }
}

/// Entropy -sum p log p of a probability row (0 log 0 = 0).
template <class T>
DINO_HD T entropy_row(const T* p, int n) {
  T h = 0;
  for (int i = 0; i < n; ++i)
    if (p[i] > T(0)) h -= p[i] * std::log(p[i]);
  return h;
}

}  // namespace dino::math
