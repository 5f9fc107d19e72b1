// dino/policy/cpu/gemm.hpp: row-major GEMM through Eigen maps (the only place Eigen appears).
//
//   C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C[m, n]
//
// All matrices are row-major with leading dimensions (elements between rows); op(X) is X or
// X^T. beta == 0 never reads C (it may hold garbage or NaN, as in BLAS). The strided-batched
// form runs `batch` independent products at offsets i * stride_{a,b,c} (attention heads).
// Kernels: fp32 products run dino's packed GEMM with an AVX-512 or AVX2 + FMA micro-kernel
// picked at run time (gemm_kernels.hpp; no -march flag needed), other CPUs and double run
// Eigen's kernel through maps. With pol.bf16, fp32 products round their operands to bf16
// and sum in fp32 (gemm_bf16.hpp: an AVX512_BF16 kernel, or rounded copies of the operands
// on the fp32 kernel); double ignores it.
// Threads: the product is split into one block per thread, each on a single-threaded kernel
// (see gemm() below); the batched form runs batches in parallel.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "dino/core/error.hpp"
#include "dino/policy/cpu/gemm_bf16.hpp"
#include "dino/policy/cpu/gemm_kernels.hpp"
#include "dino/policy/policy.hpp"

namespace dino::cpu {

struct gemm_desc {
  bool trans_a = false, trans_b = false;
  std::int64_t m = 0, n = 0, k = 0;
  std::int64_t lda = 0, ldb = 0, ldc = 0;  ///< 0: packed (k or m for A, n or k for B, n for C)
  std::int64_t batch = 1, stride_a = 0, stride_b = 0, stride_c = 0;
};

/// bf16 copies (std::uint16_t bits, rounded to nearest even) of a linear layer's backward
/// operands for linear_backward: dy's and x's, either null. Products on bf16 operands may
/// read them instead of rounding dy and x themselves (the same values); x itself may then be
/// null, and dy is still read in fp32 (the bias gradient sums it).
struct linear_bf16_copies {
  const std::uint16_t* dy = nullptr;
  const std::uint16_t* x = nullptr;
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

/// One product on the calling thread. With bias (beta 0): C = alpha op(A) op(B) + bias in
/// every row; dino's kernels add it in their store, Eigen's path writes the bias rows first
/// and adds the product to them (the same value: alpha acc + bias, rounded once per block).
/// bf16 (fp32 only): operands rounded to bf16, on the AVX512_BF16 kernel where it runs, else
/// on rounded copies of the operands (thread-local, packed) through the fp32 path.
template <class T>
inline void gemm_one(const gemm_desc& d, T alpha, const T* A, const T* B, T beta, T* C, const T* bias = nullptr,
                     bool bf16 = false) {
  if constexpr (std::is_same_v<T, float>) {
    const std::int64_t lda = d.lda ? d.lda : (d.trans_a ? d.m : d.k), ldb = d.ldb ? d.ldb : (d.trans_b ? d.k : d.n);
    const std::int64_t ldc = d.ldc ? d.ldc : d.n;
    if (bf16) {
      if (gemm_packed_bf16(d.trans_a, d.trans_b, d.m, d.n, d.k, alpha, A, lda, B, ldb, beta, C, ldc, bias)) return;
      thread_local std::vector<float> ra, rb;
      const auto rounded = [](const float* X, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                              std::vector<float>& out) {
        out.resize(std::size_t(rows * cols));
        for (std::int64_t r = 0; r < rows; ++r)
          for (std::int64_t c = 0; c < cols; ++c) out[std::size_t(r * cols + c)] = bf16_round(X[r * ld + c]);
        return out.data();
      };
      gemm_desc e = d;
      e.lda = d.trans_a ? d.m : d.k;
      e.ldb = d.trans_b ? d.k : d.n;
      const float* Ar = rounded(A, d.trans_a ? d.k : d.m, e.lda, lda, ra);
      const float* Br = rounded(B, d.trans_b ? d.n : d.k, e.ldb, ldb, rb);
      gemm_one(e, alpha, Ar, Br, beta, C, bias, false);
      return;
    }
    const gemm_kernel kern = gemm_active_kernel();
    if (kern != gemm_kernel::eigen &&
        gemm_packed(kern, d.trans_a, d.trans_b, d.m, d.n, d.k, alpha, A, lda, B, ldb, beta, C, ldc, bias))
      return;
  }
  if (bias) {
    const std::int64_t ldc = d.ldc ? d.ldc : d.n;
    for (std::int64_t i = 0; i < d.m; ++i) std::copy(bias, bias + d.n, C + i * ldc);
    beta = T(1);
  }
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
///
/// Threads: dino splits the product itself (the larger of m and n into one block per
/// thread; batches across threads) and runs each block on a single-threaded kernel (dino's
/// packed fp32 GEMM, or Eigen's).
/// Eigen's own parallel GEMM synchronises its threads by spinning, which collapses when the
/// cores are shared (a data loader's threads, another process): a 2-thread step measured 10x
/// slower under load. Blocks write disjoint parts of C, and each element of C is summed the
/// same way in any block (gemm_kernels.hpp), so the result does not depend on the thread
/// count.
namespace detail {
template <class T>
inline void gemm_split(const cpu_policy& pol, const gemm_desc& d, T alpha, const T* A, const T* B, T beta, T* C,
                       const T* bias);
}  // namespace detail

template <class T>
inline void gemm(const cpu_policy& pol, const gemm_desc& d, T alpha, const T* A, const T* B, T beta, T* C) {
  require<shape_error>(d.m >= 0 && d.n >= 0 && d.k >= 0 && d.batch >= 1, "gemm: invalid sizes m=", d.m, " n=", d.n,
                       " k=", d.k, " batch=", d.batch);
  if (d.m == 0 || d.n == 0) return;
  Eigen::setNbThreads(1);
  const int threads = pol.threads > 1 ? pol.threads : 1;
  if (d.batch > 1) {
    if (threads == 1) {  // no OpenMP region: libgomp allocates a team even for an if(false) one
      for (std::int64_t i = 0; i < d.batch; ++i)
        detail::gemm_one(d, alpha, A + i * d.stride_a, B + i * d.stride_b, beta, C + i * d.stride_c,
                         static_cast<const T*>(nullptr), pol.bf16);
      return;
    }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
    for (std::int64_t i = 0; i < d.batch; ++i)
      detail::gemm_one(d, alpha, A + i * d.stride_a, B + i * d.stride_b, beta, C + i * d.stride_c,
                       static_cast<const T*>(nullptr), pol.bf16);
    return;
  }
  detail::gemm_split(pol, d, alpha, A, B, beta, C, static_cast<const T*>(nullptr));
}

/// C[m, n] = op(A) op(B) + bias[j] in every row (one product, d.batch 1), the bias added as
/// the product is stored (no pass over C of its own). Same threads and results as gemm()
/// after C = bias rows with beta = 1.
template <class T>
inline void gemm_bias(const cpu_policy& pol, const gemm_desc& d, const T* A, const T* B, const T* bias, T* C) {
  require<shape_error>(d.m >= 0 && d.n >= 0 && d.k >= 0 && d.batch == 1, "gemm_bias: invalid sizes m=", d.m,
                       " n=", d.n, " k=", d.k, " batch=", d.batch, " (one product only)");
  if (d.m == 0 || d.n == 0) return;
  Eigen::setNbThreads(1);
  detail::gemm_split(pol, d, T(1), A, B, T(0), C, bias);
}

namespace detail {
/// The split of one product (see gemm()): the larger of m and n into one block per thread, in
/// multiples of g_rows (rows of C) or g_cols (columns of C), each block handed to
/// f(split_rows, lo, len) in parallel; a small product, or one thread, is one call
/// f(true, 0, m) on the calling thread. True when every call returned true.
template <class F>
inline bool split_product(const cpu_policy& pol, std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t g_rows,
                          std::int64_t g_cols, F&& f) {
  const int threads = pol.threads > 1 ? pol.threads : 1;
  const double work = double(m) * double(n) * double(k);
  if (threads == 1 || work < 262144.0 || (m < 32 && n < 32)) return f(true, std::int64_t(0), m);
  const bool split_rows = m >= n;
  const std::int64_t extent = split_rows ? m : n, g = split_rows ? g_rows : g_cols;
  const std::int64_t per = ((extent + threads - 1) / threads + g - 1) / g * g;
  const int blocks = int((extent + per - 1) / per);
  bool ok = true;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(threads) reduction(&& : ok)
#endif
  for (int bi = 0; bi < blocks; ++bi) {
    const std::int64_t lo = per * bi;
    ok = f(split_rows, lo, std::min(extent - lo, per)) && ok;
  }
  return ok;
}

/// One product (batch 1) split into one block per thread (see gemm()); bias may be null.
template <class T>
inline void gemm_split(const cpu_policy& pol, const gemm_desc& d, T alpha, const T* A, const T* B, T beta, T* C,
                       const T* bias) {
  const std::int64_t lda = d.lda ? d.lda : (d.trans_a ? d.m : d.k);
  const std::int64_t ldb = d.ldb ? d.ldb : (d.trans_b ? d.k : d.n);
  const std::int64_t ldc = d.ldc ? d.ldc : d.n;
  // Block granule: 16, or a multiple of the fp32 kernel's tile (12 or 6 rows, 32 or 16 columns).
  const bool eigen = !std::is_same_v<T, float> || gemm_active_kernel() == gemm_kernel::eigen;
  split_product(pol, d.m, d.n, d.k, eigen ? 16 : 48, eigen ? 16 : 32, [&](bool split_rows, std::int64_t lo, std::int64_t len) {
    gemm_desc part = d;
    part.lda = lda;
    part.ldb = ldb;
    part.ldc = ldc;
    if (split_rows) {  // rows of C: rows of op(A)
      part.m = len;
      detail::gemm_one(part, alpha, d.trans_a ? A + lo : A + lo * lda, B, beta, C + lo * ldc, bias, pol.bf16);
    } else {  // columns of C: columns of op(B)
      part.n = len;
      detail::gemm_one(part, alpha, A, d.trans_b ? B + lo * ldb : B + lo, beta, C + lo, bias ? bias + lo : bias,
                       pol.bf16);
    }
    return true;
  });
}
}  // namespace detail

}  // namespace dino::cpu
