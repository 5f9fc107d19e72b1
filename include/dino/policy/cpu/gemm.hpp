// dino/policy/cpu/gemm.hpp: row-major GEMM through Eigen maps (the only place Eigen appears).
//
//   C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C[m, n]
//
// All matrices are row-major with leading dimensions (elements between rows); op(X) is X or
// X^T. beta == 0 never reads C (it may hold garbage or NaN, as in BLAS). The strided-batched
// form runs `batch` independent products at offsets i * stride_{a,b,c} (attention heads).
// Threads: Eigen's own OpenMP parallel GEMM with the policy's thread count; the batched form
// runs batches in parallel and each product on one thread.
#pragma once

#include <cstdint>

#include <Eigen/Core>

#include "dino/core/error.hpp"
#include "dino/policy/policy.hpp"

namespace dino::cpu {

struct gemm_desc {
  bool trans_a = false, trans_b = false;
  std::int64_t m = 0, n = 0, k = 0;
  std::int64_t lda = 0, ldb = 0, ldc = 0;  ///< 0: packed (k or m for A, n or k for B, n for C)
  std::int64_t batch = 1, stride_a = 0, stride_b = 0, stride_c = 0;
};

namespace detail {
template <class T>
using row_major = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using cmap = Eigen::Map<const row_major<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using mmap = Eigen::Map<row_major<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class T, class MA, class MB>
inline void gemm_apply(T alpha, const MA& a, const MB& b, T beta, mmap<T>& c) {
  if (beta == T(0)) {
    if (alpha == T(1)) c.noalias() = a * b;
    else c.noalias() = alpha * (a * b);
  } else {
    if (beta != T(1)) c *= beta;
    if (alpha == T(1)) c.noalias() += a * b;
    else c.noalias() += alpha * (a * b);
  }
}

template <class T>
inline void gemm_one(const gemm_desc& d, T alpha, const T* A, const T* B, T beta, T* C) {
  const std::int64_t ar = d.trans_a ? d.k : d.m, ac = d.trans_a ? d.m : d.k;
  const std::int64_t br = d.trans_b ? d.n : d.k, bc = d.trans_b ? d.k : d.n;
  cmap<T> a(A, ar, ac, Eigen::OuterStride<>(d.lda ? d.lda : ac));
  cmap<T> b(B, br, bc, Eigen::OuterStride<>(d.ldb ? d.ldb : bc));
  mmap<T> c(C, d.m, d.n, Eigen::OuterStride<>(d.ldc ? d.ldc : d.n));
  if (d.k == 0) {  // empty product: C = beta * C
    if (beta == T(0)) c.setZero();
    else c *= beta;
    return;
  }
  if (!d.trans_a && !d.trans_b) gemm_apply(alpha, a, b, beta, c);
  else if (d.trans_a && !d.trans_b) gemm_apply(alpha, a.transpose(), b, beta, c);
  else if (!d.trans_a && d.trans_b) gemm_apply(alpha, a, b.transpose(), beta, c);
  else gemm_apply(alpha, a.transpose(), b.transpose(), beta, c);
}
}  // namespace detail

/// One product on the calling thread only: for use inside a parallel region, where the
/// policy's thread count is already spent (and Eigen's global thread setting is not touched).
template <class T>
inline void gemm_serial(const gemm_desc& d, T alpha, const T* A, const T* B, T beta, T* C) {
  if (d.m == 0 || d.n == 0) return;
  detail::gemm_one(d, alpha, A, B, beta, C);
}

/// Runs the (batched) product described by d.
template <class T>
inline void gemm(const cpu_policy& pol, const gemm_desc& d, T alpha, const T* A, const T* B, T beta, T* C) {
  require<shape_error>(d.m >= 0 && d.n >= 0 && d.k >= 0 && d.batch >= 1, "gemm: invalid sizes m=", d.m, " n=", d.n,
                       " k=", d.k, " batch=", d.batch);
  if (d.m == 0 || d.n == 0) return;
  if (d.batch == 1) {
    Eigen::setNbThreads(pol.threads > 1 ? pol.threads : 1);
    detail::gemm_one(d, alpha, A, B, beta, C);
    return;
  }
  Eigen::setNbThreads(1);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(pol.threads > 1 ? pol.threads : 1) if (pol.threads > 1)
#endif
  for (std::int64_t i = 0; i < d.batch; ++i)
    detail::gemm_one(d, alpha, A + i * d.stride_a, B + i * d.stride_b, beta, C + i * d.stride_c);
}

}  // namespace dino::cpu
