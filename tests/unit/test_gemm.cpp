// The CPU policy: GEMM against naive loops, reductions, runners.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include <dino/dino.hpp>

#include "gradcheck.hpp"

using namespace dino;

namespace {
// C = alpha op(A) op(B) + beta C, naive, double accumulation.
template <class T>
void naive(const gemm_desc& d, T alpha, const T* A, const T* B, T beta, T* C) {
  const std::int64_t lda = d.lda ? d.lda : (d.trans_a ? d.m : d.k);
  const std::int64_t ldb = d.ldb ? d.ldb : (d.trans_b ? d.k : d.n);
  const std::int64_t ldc = d.ldc ? d.ldc : d.n;
  for (std::int64_t i = 0; i < d.m; ++i)
    for (std::int64_t j = 0; j < d.n; ++j) {
      double s = 0;
      for (std::int64_t p = 0; p < d.k; ++p) {
        const double a = d.trans_a ? A[p * lda + i] : A[i * lda + p];
        const double b = d.trans_b ? B[j * ldb + p] : B[p * ldb + j];
        s += a * b;
      }
      C[i * ldc + j] = T(alpha * s + (beta == T(0) ? 0.0 : double(beta) * C[i * ldc + j]));
    }
}
}  // namespace

TEST_CASE_TEMPLATE("gemm matches naive loops: transposes, alpha, beta, leading dimensions", T, float, double) {
  const double tol = std::is_same_v<T, float> ? 1e-5 : 1e-12;
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (auto [m, n, k] : {std::tuple{7, 5, 3}, std::tuple{33, 17, 65}, std::tuple{1, 9, 1}}) {
        for (auto [alpha, beta] : {std::pair{1.0, 0.0}, std::pair{0.5, 1.0}, std::pair{-2.0, 0.25}}) {
          gemm_desc d{bool(ta), bool(tb), m, n, k};
          d.lda = (ta ? m : k) + 2;  // padded rows
          d.ldb = (tb ? k : n) + 1;
          d.ldc = n + 3;
          std::vector<T> A(std::size_t((ta ? k : m) * d.lda)), B(std::size_t((tb ? n : k) * d.ldb)),
              C(std::size_t(m * d.ldc)), R;
          dino_test::fill_normal(A, 1);
          dino_test::fill_normal(B, 2);
          dino_test::fill_normal(C, 3);
          R = C;
          for (int threads : {1, 2}) {
            std::vector<T> Cw = C;
            gemm(cpu_policy{threads}, d, T(alpha), A.data(), B.data(), T(beta), Cw.data());
            naive(d, T(alpha), A.data(), B.data(), T(beta), R.data());
            double err = 0, ref = 0;
            for (std::int64_t i = 0; i < m; ++i)
              for (std::int64_t j = 0; j < n; ++j) {
                err = std::max(err, std::fabs(double(Cw[std::size_t(i * d.ldc + j)]) - R[std::size_t(i * d.ldc + j)]));
                ref = std::max(ref, std::fabs(double(R[std::size_t(i * d.ldc + j)])));
              }
            CHECK(err <= tol * std::max(1.0, ref) * k);
            // padding columns untouched
            for (std::int64_t i = 0; i < m; ++i)
              for (std::int64_t j = n; j < d.ldc; ++j) CHECK(Cw[std::size_t(i * d.ldc + j)] == C[std::size_t(i * d.ldc + j)]);
            R = C;
          }
        }
      }
}

TEST_CASE("gemm with beta = 0 never reads C") {
  std::vector<float> A(6, 1.0f), B(6, 1.0f), C(4, std::numeric_limits<float>::quiet_NaN());
  gemm(cpu_policy{1}, gemm_desc{false, false, 2, 2, 3}, 1.0f, A.data(), B.data(), 0.0f, C.data());
  for (float c : C) CHECK(c == 3.0f);
}

TEST_CASE("strided batched gemm equals one gemm per batch") {
  const std::int64_t batch = 5, m = 6, n = 4, k = 8;
  gemm_desc d{false, true, m, n, k};
  d.batch = batch;
  d.stride_a = m * k + 3;
  d.stride_b = n * k + 5;
  d.stride_c = m * n + 1;
  std::vector<double> A(std::size_t(batch * d.stride_a)), B(std::size_t(batch * d.stride_b)),
      C(std::size_t(batch * d.stride_c), 0.0), R = C;
  dino_test::fill_normal(A, 4);
  dino_test::fill_normal(B, 5);
  gemm(cpu_policy{2}, d, 1.0, A.data(), B.data(), 0.0, C.data());
  gemm_desc one = d;
  one.batch = 1;
  for (std::int64_t i = 0; i < batch; ++i)
    naive(one, 1.0, A.data() + i * d.stride_a, B.data() + i * d.stride_b, 0.0, R.data() + i * d.stride_c);
  CHECK(dino_test::rel_error(C, R) < 1e-13);
}

TEST_CASE("column sums, finiteness, runners") {
  const std::int64_t rows = 37, cols = 300;
  std::vector<float> x(std::size_t(rows * cols));
  dino_test::fill_normal(x, 9);
  std::vector<double> out(std::size_t(cols), 1.0), ref(std::size_t(cols), 1.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) ref[std::size_t(c)] += x[std::size_t(r * cols + c)];
  column_sums(cpu_policy{2}, x.data(), rows, cols, out.data(), true);
  CHECK(dino_test::rel_error(out, ref) < 1e-12);
  CHECK(all_finite(cpu_policy{2}, x.data(), rows * cols));
  std::vector<float> big(100000, 1.0f);
  CHECK(all_finite(cpu_policy{2}, big.data(), 100000));
  big[77777] = std::numeric_limits<float>::infinity();
  CHECK_FALSE(all_finite(cpu_policy{2}, big.data(), 100000));
  std::vector<int> hit(100000, 0);
  for_each_chunk(cpu_policy{2}, 100000, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) hit[std::size_t(i)]++;
  });
  for (int h : hit) REQUIRE(h == 1);
}
