// dino/math/cross_entropy.hpp: soft cross-entropy between a target distribution and
// log-probabilities (host and device).
//
//   H(q, log p) = - sum_k q_k log p_k
// With log p = log_softmax(s / tau), the gradient with respect to the logits s is
//   dH/ds_k = (p_k sum_j q_j - q_k) / tau
// and for several targets q^(1..m) against the same student row the terms add:
//   d/ds_k = (m p_k - sum_i q^(i)_k) / tau       (probability rows sum to 1)
#pragma once

#include "dino/config.hpp"

namespace dino::math {

template <class T>
DINO_HD T soft_cross_entropy_row(const T* q, const T* logp, int n) {
  T h = 0;
  for (int i = 0; i < n; ++i) h -= q[i] * logp[i];
  return h;
}

/// ds (=|+=) scale * d/ds of H(q, log_softmax(s / tau)); logp holds log_softmax(s / tau).
template <class T>
DINO_HD void soft_cross_entropy_row_backward(const T* q, const T* logp, T* ds, int n, T inv_tau, T scale,
                                             bool accumulate) {
  T qs = 0;
  for (int i = 0; i < n; ++i) qs += q[i];
  for (int i = 0; i < n; ++i) {
    const T v = scale * (std::exp(logp[i]) * qs - q[i]) * inv_tau;
    ds[i] = accumulate ? ds[i] + v : v;
  }
}

}  // namespace dino::math
