// tests/support/naive_gemm.hpp: the tests' reference GEMM, for the CPU and the GPU tests.
//
// naive_gemm(d, alpha, A, B, beta, C[, op]): C = alpha op(A) op(B) + beta C in naive loops
// with double sums, row-major with gemm_desc's leading dimensions (no batch); beta == 0 never
// reads C. op maps each operand element first (identity by default; a bf16 rounding gives
// the product that a bf16 GEMM approximates).
#pragma once

#include <cstdint>

#include <dino/policy/cpu/gemm.hpp>

namespace dino_test {

struct identity_op {
  template <class T>
  T operator()(T x) const {
    return x;
  }
};

template <class T, class Op = identity_op>
void naive_gemm(const dino::cpu::gemm_desc& d, T alpha, const T* A, const T* B, T beta, T* C, Op op = {}) {
  const std::int64_t lda = d.lda ? d.lda : (d.trans_a ? d.m : d.k);
  const std::int64_t ldb = d.ldb ? d.ldb : (d.trans_b ? d.k : d.n);
  const std::int64_t ldc = d.ldc ? d.ldc : d.n;
  for (std::int64_t i = 0; i < d.m; ++i)
    for (std::int64_t j = 0; j < d.n; ++j) {
      double s = 0;
      for (std::int64_t p = 0; p < d.k; ++p) {
        const double a = op(d.trans_a ? A[p * lda + i] : A[i * lda + p]);
        const double b = op(d.trans_b ? B[j * ldb + p] : B[p * ldb + j]);
        s += a * b;
      }
      C[i * ldc + j] = T(alpha * s + (beta == T(0) ? 0.0 : double(beta) * C[i * ldc + j]));
    }
}

}  // namespace dino_test
