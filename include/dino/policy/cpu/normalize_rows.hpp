// dino/policy/cpu/normalize_rows.hpp: the CPU policy's row normalisations of the DINO head.
//
//   l2_normalize_rows(pol, x, y, norms, rows, n, eps)       y_r = x_r / max(||x_r||, eps), norms_r = ||x_r||
//   l2_normalize_rows_backward(pol, y, norms, dy, dx, rows, n, eps, accumulate)   dx (=|+=)
//   weight_norm_rows(pol, g, v, w, vnorm, rows, n)         w_k = g_k v_k / ||v_k||, vnorm_k = ||v_k||
//   weight_norm_rows_backward(pol, g, v, vnorm, dw, dg, dv, rows, n)   dg (+=, skipped when null), dv (+=)
// Each row runs the math/normalize.hpp functor (sums in T, in index order); rows in
// parallel. Matrices are row-major [rows, n]; g, norms and vnorm hold one value per row.
// The CUDA twins are in policy/cuda/loss.cuh.
#pragma once

#include <cstdint>

#include "dino/math/normalize.hpp"
#include "dino/policy/cpu/parallel.hpp"

namespace dino::cpu {

template <class T>
inline void l2_normalize_rows(const cpu_policy& pol, const T* x, T* y, T* norms, std::int64_t rows, std::int64_t n,
                              T eps) {
  for_each_row(pol, rows, [&](std::int64_t r) {
    norms[r] = math::l2_normalize_row(x + r * n, y + r * n, static_cast<int>(n), eps);
  });
}

template <class T>
inline void l2_normalize_rows_backward(const cpu_policy& pol, const T* y, const T* norms, const T* dy, T* dx,
                                       std::int64_t rows, std::int64_t n, T eps, bool accumulate) {
  for_each_row(pol, rows, [&](std::int64_t r) {
    math::l2_normalize_row_backward(y + r * n, norms[r], dy + r * n, dx + r * n, static_cast<int>(n), eps, accumulate);
  });
}

template <class T>
inline void weight_norm_rows(const cpu_policy& pol, const T* g, const T* v, T* w, T* vnorm, std::int64_t rows,
                             std::int64_t n) {
  for_each_row(pol, rows, [&](std::int64_t k) {
    vnorm[k] = math::weight_norm_row(g[k], v + k * n, w + k * n, static_cast<int>(n));
  });
}

template <class T>
inline void weight_norm_rows_backward(const cpu_policy& pol, const T* g, const T* v, const T* vnorm, const T* dw, T* dg,
                                      T* dv, std::int64_t rows, std::int64_t n) {
  for_each_row(pol, rows, [&](std::int64_t k) {
    math::weight_norm_row_backward(g[k], v + k * n, vnorm[k], dw + k * n, dg ? dg + k : static_cast<T*>(nullptr),
                                   dv + k * n, static_cast<int>(n));
  });
}

}  // namespace dino::cpu

namespace dino {
using cpu::l2_normalize_rows;
using cpu::l2_normalize_rows_backward;
using cpu::weight_norm_rows;
using cpu::weight_norm_rows_backward;
}  // namespace dino
