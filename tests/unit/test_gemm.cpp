// The CPU policy: GEMM against naive loops (every fp32 kernel this CPU can run: dino's
// AVX-512 and AVX2 packed kernels and the Eigen fallback), reductions, runners.
#include <doctest/doctest.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <dino/dino.hpp>

#include "gradcheck.hpp"
#include "naive_gemm.hpp"

// Counts the C allocator's calls of this test binary (glibc, no sanitizer): the executable's
// definitions interpose malloc and friends, which forward to glibc's __libc_* entry points.
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define DINO_TEST_COUNT_MALLOC 1
static std::atomic<long> g_mallocs{0};
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
void* malloc(std::size_t n) {
  g_mallocs.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(n);
}
void* calloc(std::size_t a, std::size_t b) {
  g_mallocs.fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(a, b);
}
void* realloc(void* p, std::size_t n) {
  g_mallocs.fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(p, n);
}
void free(void* p) { __libc_free(p); }
void* memalign(std::size_t a, std::size_t n) {
  g_mallocs.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(a, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) {
  g_mallocs.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(a, n);
}
int posix_memalign(void** out, std::size_t a, std::size_t n) {
  g_mallocs.fetch_add(1, std::memory_order_relaxed);
  void* p = __libc_memalign(a, n);
  if (!p) return 12;  // ENOMEM
  *out = p;
  return 0;
}
}
#else
#define DINO_TEST_COUNT_MALLOC 0
#endif

using namespace dino;


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
            dino_test::naive_gemm(d, T(alpha), A.data(), B.data(), T(beta), R.data());
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
    dino_test::naive_gemm(one, 1.0, A.data() + i * d.stride_a, B.data() + i * d.stride_b, 0.0, R.data() + i * d.stride_c);
  CHECK(dino_test::rel_error(C, R) < 1e-13);
}

namespace {
// The fp32 kernels this CPU runs (Eigen always).
std::vector<cpu::gemm_kernel> runnable_kernels() {
  std::vector<cpu::gemm_kernel> ks;
  for (auto k : {cpu::gemm_kernel::eigen, cpu::gemm_kernel::avx2, cpu::gemm_kernel::avx512})
    if (cpu::gemm_kernel_supported(k)) ks.push_back(k);
  return ks;
}
// Restores the kernel chosen at start-up when a test case ends.
struct kernel_guard {
  cpu::gemm_kernel saved = cpu::gemm_active_kernel();
  ~kernel_guard() { cpu::set_gemm_kernel(saved); }
};

// One product on a C with a sentinel border (padding columns and rows below C), checked
// against the naive loop in double; the border must be untouched. Returns C.
// bf16: the policy rounds the operands to bf16 (cpu_policy::bf16), and so does the reference.
std::vector<float> check_product(const gemm_desc& d, float alpha, float beta, int threads, bool nan_c,
                                 std::uint64_t seed, bool serial = false, bool bf16 = false) {
  const std::int64_t ar = d.trans_a ? d.k : d.m, ac = d.trans_a ? d.m : d.k;
  const std::int64_t br = d.trans_b ? d.n : d.k, bc = d.trans_b ? d.k : d.n;
  const std::int64_t lda = d.lda ? d.lda : ac, ldb = d.ldb ? d.ldb : bc, ldc = d.ldc ? d.ldc : d.n;
  std::vector<float> A(std::size_t(std::max<std::int64_t>(1, ar * lda))), B(std::size_t(std::max<std::int64_t>(1, br * ldb)));
  const std::int64_t c_size = (d.m + 2) * ldc;  // two sentinel rows below C
  std::vector<float> C(static_cast<std::size_t>(c_size)), C0;
  dino_test::fill_normal(A.data(), A.size(), seed);
  dino_test::fill_normal(B.data(), B.size(), seed + 1);
  dino_test::fill_normal(C.data(), C.size(), seed + 2);
  if (nan_c)
    for (std::int64_t i = 0; i < d.m; ++i)
      for (std::int64_t j = 0; j < d.n; ++j) C[std::size_t(i * ldc + j)] = std::numeric_limits<float>::quiet_NaN();
  C0 = C;
  std::vector<double> R(C.begin(), C.end());
  if (serial) gemm_serial(d, alpha, A.data(), B.data(), beta, C.data());
  else gemm(cpu_policy{threads, bf16}, d, alpha, A.data(), B.data(), beta, C.data());
  const auto op = [bf16](float x) { return double(bf16 ? cpu::bf16_round(x) : x); };
  // reference in double (C is read only when beta != 0)
  double err = 0, ref = 0;
  for (std::int64_t i = 0; i < d.m; ++i)
    for (std::int64_t j = 0; j < d.n; ++j) {
      double sum = 0, mag = 0;
      for (std::int64_t p = 0; p < d.k; ++p) {
        const double a = op(d.trans_a ? A[std::size_t(p * lda + i)] : A[std::size_t(i * lda + p)]);
        const double b = op(d.trans_b ? B[std::size_t(j * ldb + p)] : B[std::size_t(p * ldb + j)]);
        sum += a * b;
        mag += std::fabs(a * b);
      }
      const double c0 = C0[std::size_t(i * ldc + j)];
      const double r = double(alpha) * sum + (beta == 0.0f ? 0.0 : double(beta) * c0);
      const double scale = std::fabs(double(alpha)) * mag + (beta == 0.0f ? 0.0 : std::fabs(double(beta) * c0));
      const double got = C[std::size_t(i * ldc + j)];
      err = std::max(err, std::fabs(got - r) / std::max(scale, 1e-30));
      ref = std::max(ref, std::fabs(r));
      if (!std::isfinite(got)) err = std::numeric_limits<double>::infinity();
    }
  // fp32 with depth d.k: the error of a sum of k products is about k eps times the sum of
  // the magnitudes (a loose but rigorous bound, far below a wrong product)
  CHECK_MESSAGE(err <= 2e-7 * double(d.k + 4), "ta=", d.trans_a, " tb=", d.trans_b, " m=", d.m, " n=", d.n,
                " k=", d.k, " lda=", lda, " ldb=", ldb, " ldc=", ldc, " alpha=", alpha, " beta=", beta,
                " threads=", threads, " kernel=", std::string(cpu::gemm_kernel_name(cpu::gemm_active_kernel())),
                " bf16=", bf16, " err=", err);
  bool border = true;
  for (std::int64_t i = 0; i < d.m + 2; ++i)
    for (std::int64_t j = 0; j < ldc; ++j)
      if ((i >= d.m || j >= d.n) && std::memcmp(&C[std::size_t(i * ldc + j)], &C0[std::size_t(i * ldc + j)], 4) != 0)
        border = false;
  CHECK_MESSAGE(border, "wrote outside C: m=", d.m, " n=", d.n, " ldc=", ldc);
  return C;
}
}  // namespace

TEST_CASE("every fp32 kernel: transposes, edges of the register tile and of the blocks, leading dims, alpha, beta") {
  kernel_guard guard;
  // sizes around the tiles (12 x 32 and 6 x 16, last panels of 16 or 8 columns) and the
  // blocks (depth 768, 192 rows, 1024 columns)
  const std::vector<std::tuple<int, int, int>> shapes = {
      {1, 1, 1},     {1, 9, 1},      {2, 3, 5},      {5, 7, 3},     {6, 8, 4},      {7, 17, 9},     {11, 15, 13},
      {12, 16, 16},  {13, 33, 31},   {12, 32, 64},   {24, 64, 7},   {25, 48, 65},   {23, 47, 100},  {37, 31, 512},
      {19, 40, 769}, {14, 20, 1540}, {193, 36, 40},  {200, 97, 70}, {31, 1025, 24}, {50, 50, 64},   {10, 10, 64},
      {50, 64, 50},  {3, 1100, 9},   {385, 17, 33}};
  std::uint64_t seed = 100;
  for (auto kern : runnable_kernels()) {
    REQUIRE(cpu::set_gemm_kernel(kern));
    const std::string kname = cpu::gemm_kernel_name(kern);
    CAPTURE(kname);
    for (auto [m, n, k] : shapes)
      for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb) {
          gemm_desc d{bool(ta), bool(tb), m, n, k};
          const int variant = int(seed % 4);
          if (variant >= 1) {  // padded leading dimensions
            d.lda = (ta ? m : k) + 3;
            d.ldb = (tb ? k : n) + 5;
            d.ldc = n + 7;
          }
          const float alpha = variant == 2 ? -0.75f : 1.0f;
          const float beta = variant == 0 ? 0.0f : variant == 1 ? 1.0f : variant == 2 ? 0.5f : 0.0f;
          for (int threads : {1, 2})
            check_product(d, alpha, beta, threads, /*nan_c=*/beta == 0.0f, seed++);
        }
  }
}

TEST_CASE("bf16_bits: round to nearest, ties to even; NaN, infinities, overflow") {
  CHECK(cpu::bf16_round(1.0f) == 1.0f);
  CHECK(cpu::bf16_round(1.0f + 0x1p-8f) == 1.0f);                    // a tie: down to the even 1
  CHECK(cpu::bf16_round(1.0f + 3 * 0x1p-8f) == 1.0f + 0x1p-6f);      // a tie: up to the even neighbour
  CHECK(cpu::bf16_round(1.0f + 0x1p-8f + 0x1p-20f) == 1.0f + 0x1p-7f);  // above the tie: up
  CHECK(cpu::bf16_round(-3.0f) == -3.0f);
  CHECK(cpu::bf16_round(0.1f) == 0.10009765625f);
  CHECK(std::isnan(cpu::bf16_round(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isnan(cpu::bf16_round(std::bit_cast<float>(0x7f800001u))));  // a NaN whose high bits are an infinity's
  CHECK(cpu::bf16_round(std::numeric_limits<float>::infinity()) == std::numeric_limits<float>::infinity());
  CHECK(cpu::bf16_round(std::numeric_limits<float>::max()) == std::numeric_limits<float>::infinity());
  CHECK(cpu::bf16_round(-std::numeric_limits<float>::max()) == -std::numeric_limits<float>::infinity());
}

TEST_CASE("bf16 operands (cpu_policy::bf16): the rounded operands' products summed in fp32, native and emulated") {
  // The AVX512_BF16 kernel where the CPU has it, and rounded copies on the fp32 kernel
  // (forced with the AVX2 or Eigen kernel): both must equal the product of the bf16-rounded
  // operands up to fp32 summation, over the tile and block edges, odd depths (a zero-padded
  // last pair) and depths of several blocks.
  kernel_guard guard;
  const std::vector<std::tuple<int, int, int>> shapes = {
      {1, 1, 1},    {2, 3, 5},     {7, 17, 9},    {11, 15, 13},  {12, 32, 64},  {13, 33, 31},
      {25, 48, 65}, {19, 40, 769}, {14, 20, 1541}, {193, 36, 40}, {31, 1025, 24}, {385, 17, 33}};
  std::vector<cpu::gemm_kernel> kernels;
  if (cpu::gemm_bf16_native_supported()) kernels.push_back(cpu::gemm_kernel::avx512);
  kernels.push_back(cpu::gemm_kernel_supported(cpu::gemm_kernel::avx2) ? cpu::gemm_kernel::avx2
                                                                       : cpu::gemm_kernel::eigen);
  MESSAGE("AVX512_BF16 kernel: ", std::string(cpu::gemm_bf16_native_supported() ? "yes" : "no (emulated only)"));
  std::uint64_t seed = 7000;
  for (auto kern : kernels) {
    REQUIRE(cpu::set_gemm_kernel(kern));
    const bool native = cpu::gemm_bf16_native();
    CAPTURE(native);
    for (auto [m, n, k] : shapes)
      for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb) {
          gemm_desc d{bool(ta), bool(tb), m, n, k};
          const int variant = int(seed % 3);
          if (variant >= 1) {
            d.lda = (ta ? m : k) + 3;
            d.ldb = (tb ? k : n) + 5;
            d.ldc = n + 7;
          }
          const float alpha = variant == 2 ? -0.75f : 1.0f, beta = variant == 1 ? 0.5f : 0.0f;
          for (int threads : {1, 2}) check_product(d, alpha, beta, threads, beta == 0.0f, seed++, false, true);
        }
  }
  // The rounding is real: on operands that are not bf16 values the result is far from the
  // fp32 product (a kernel that ignored bf16 would fail the check above by as much).
  const gemm_desc d{false, false, 40, 50, 300};
  std::vector<float> A(40 * 300), B(300 * 50), c32(40 * 50), c16(40 * 50);
  dino_test::fill_normal(A.data(), A.size(), 3);
  dino_test::fill_normal(B.data(), B.size(), 4);
  gemm(cpu_policy{1}, d, 1.0f, A.data(), B.data(), 0.0f, c32.data());
  for (auto kern : kernels) {
    REQUIRE(cpu::set_gemm_kernel(kern));
    gemm(cpu_policy{1, true}, d, 1.0f, A.data(), B.data(), 0.0f, c16.data());
    double diff = 0;
    for (std::size_t i = 0; i < c32.size(); ++i) diff = std::max(diff, double(std::fabs(c16[i] - c32[i])));
    CHECK_MESSAGE(diff > 1e-3, "kernel ", std::string(cpu::gemm_kernel_name(kern)), " max diff ", diff);
    CHECK(diff < 0.5);  // sums of 300 N(0, 1) products: about 17; bf16's relative error is 2^-9 per operand
  }
}

TEST_CASE("bf16 operands in memory (cpu_policy::bf16_operands): the bits of the fp32-operand bf16 path") {
  // The producers round as they store (LayerNorm, GELU, a weight's copy) and the product
  // reads bf16: every op must give the bits of the fp32 op followed by the bf16 product's own
  // rounding, on every kernel, over several 512-row blocks of X, odd depths, with and without
  // bias and residual, for 1 and 2 threads.
  kernel_guard guard;
  std::vector<cpu::gemm_kernel> kernels;
  if (cpu::gemm_bf16_native_supported()) kernels.push_back(cpu::gemm_kernel::avx512);
  kernels.push_back(cpu::gemm_kernel_supported(cpu::gemm_kernel::avx2) ? cpu::gemm_kernel::avx2
                                                                       : cpu::gemm_kernel::eigen);
  const auto bits = [](const std::vector<float>& v) {
    std::vector<std::uint16_t> b(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) b[i] = cpu::bf16_bits(v[i]);
    return b;
  };
  std::uint64_t seed = 9100;
  for (auto kern : kernels) {
    REQUIRE(cpu::set_gemm_kernel(kern));
    CAPTURE(std::string(cpu::gemm_kernel_name(kern)));
    for (int threads : {1, 2}) {
      CAPTURE(threads);
      const cpu_policy pol{threads, true};
      for (auto [m, n, k] : std::vector<std::tuple<int, int, int>>{{1, 1, 1}, {37, 19, 23}, {1100, 40, 33}, {600, 96, 96}, {40, 700, 65}}) {
        CAPTURE(m);
        CAPTURE(n);
        CAPTURE(k);
        std::vector<float> X(std::size_t(m) * k), W(std::size_t(n) * k), bias(static_cast<std::size_t>(n)), R(std::size_t(m) * n);
        dino_test::fill_normal(X.data(), X.size(), seed++);
        dino_test::fill_normal(W.data(), W.size(), seed++);
        dino_test::fill_normal(bias.data(), bias.size(), seed++);
        dino_test::fill_normal(R.data(), R.size(), seed++);
        std::vector<std::uint16_t> W16(W.size()), X16 = bits(X);
        round_bf16_apply(pol, W.data(), W16.data(), std::int64_t(W.size()));
        CHECK(W16 == bits(W));
        const gemm_desc d{false, true, m, n, k};
        for (int variant = 0; variant < 3; ++variant) {  // bias, bias + residual, no bias
          CAPTURE(variant);
          std::vector<float> ref(std::size_t(m) * n, std::nanf("")), got(ref.size(), std::nanf(""));
          const float* b = variant < 2 ? bias.data() : nullptr;
          const float* r = variant == 1 ? R.data() : nullptr;
          if (b) gemm_bias_rows(pol, d, X.data(), W.data(), b, ref.data(), r);
          else gemm(pol, d, 1.0f, X.data(), W.data(), 0.0f, ref.data());
          gemm_bias_rows_bf16(pol, m, n, k, X16.data(), W16.data(), b, got.data(), r);
          CHECK(std::memcmp(ref.data(), got.data(), ref.size() * sizeof(float)) == 0);
        }
      }
      // LayerNorm and GELU: the fp32 op's values, rounded
      const std::int64_t rows = 300, D = 72;
      std::vector<float> x(static_cast<std::size_t>(rows * D)), w(static_cast<std::size_t>(D)), b(static_cast<std::size_t>(D)), y(x.size()), st(2 * rows),
          st16(2 * rows, std::nanf(""));
      dino_test::fill_normal(x.data(), x.size(), seed++);
      dino_test::fill_normal(w.data(), w.size(), seed++);
      dino_test::fill_normal(b.data(), b.size(), seed++);
      std::vector<std::uint16_t> y16(x.size());
      layer_norm_rows(pol, x.data(), w.data(), b.data(), y.data(), st.data(), rows, D, 1e-6f);
      layer_norm_rows_bf16(pol, x.data(), w.data(), b.data(), y16.data(), st16.data(), rows, D, 1e-6f);
      CHECK(y16 == bits(y));
      CHECK(std::memcmp(st.data(), st16.data(), st.size() * sizeof(float)) == 0);
      const std::int64_t ne = 5000 + 13;
      std::vector<float> a(std::size_t(ne) + 1), g(static_cast<std::size_t>(ne));
      dino_test::fill_normal(a.data(), a.size(), seed++);
      std::vector<std::uint16_t> g16(static_cast<std::size_t>(ne));
      gelu_apply(pol, a.data() + 1, g.data(), ne);  // an unaligned start
      gelu_apply_bf16(pol, a.data() + 1, g16.data(), ne);
      CHECK(g16 == bits(g));
    }
  }
}

TEST_CASE("bf16 operands: the same bits for any thread count; gemm_bias equals bias rows then gemm") {
  kernel_guard guard;
  std::vector<cpu::gemm_kernel> kernels;
  if (cpu::gemm_bf16_native_supported()) kernels.push_back(cpu::gemm_kernel::avx512);
  if (cpu::gemm_kernel_supported(cpu::gemm_kernel::avx2)) kernels.push_back(cpu::gemm_kernel::avx2);
  for (auto kern : kernels) {
    REQUIRE(cpu::set_gemm_kernel(kern));
    CAPTURE(std::string(cpu::gemm_kernel_name(kern)));
    for (auto [m, n, k] : std::vector<std::tuple<int, int, int>>{{200, 97, 71}, {96, 700, 1030}, {31, 1025, 24}})
      for (int ta = 0; ta < 2; ++ta) {
        const gemm_desc d{bool(ta), true, m, n, k};
        std::vector<float> A(std::size_t(m * k)), B(std::size_t(n * k)), bias(static_cast<std::size_t>(n));
        dino_test::fill_normal(A.data(), A.size(), std::uint64_t(m + k));
        dino_test::fill_normal(B.data(), B.size(), std::uint64_t(n + k));
        dino_test::fill_normal(bias.data(), bias.size(), 5);
        std::vector<float> c1(std::size_t(m * n)), c2(c1.size()), cb(c1.size()), cr(c1.size());
        gemm(cpu_policy{1, true}, d, 1.0f, A.data(), B.data(), 0.0f, c1.data());
        gemm(cpu_policy{2, true}, d, 1.0f, A.data(), B.data(), 0.0f, c2.data());
        CHECK(std::memcmp(c1.data(), c2.data(), c1.size() * 4) == 0);
        gemm_bias(cpu_policy{2, true}, d, A.data(), B.data(), bias.data(), cb.data());
        for (int i = 0; i < m; ++i) std::copy(bias.begin(), bias.end(), cr.begin() + i * n);
        gemm(cpu_policy{1, true}, d, 1.0f, A.data(), B.data(), 1.0f, cr.data());
        CHECK(std::memcmp(cb.data(), cr.data(), cb.size() * 4) == 0);
      }
  }
}

TEST_CASE("linear_backward: the two single products; a bf16 copy stands for x (its widened values)") {
  const std::int64_t rows = 53, out = 24, in = 40;
  std::vector<float> dy(std::size_t(rows * out)), x(std::size_t(rows * in)), W(std::size_t(out * in)),
      G0(std::size_t(out * in + out));
  dino_test::fill_normal(dy.data(), dy.size(), 61);
  dino_test::fill_normal(x.data(), x.size(), 62);
  dino_test::fill_normal(W.data(), W.size(), 63);
  dino_test::fill_normal(G0.data(), G0.size(), 64);
  std::vector<std::uint16_t> x16(x.size());
  std::vector<float> xw(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    x16[i] = cpu::bf16_bits(x[i]);
    xw[i] = cpu::bf16_round(x[i]);
  }
  for (const bool bf16 : {false, true})
    for (const float beta : {0.0f, 1.0f}) {
      CAPTURE(bf16);
      CAPTURE(beta);
      const cpu_policy pol{2, bf16};
      CHECK_FALSE(bf16_backward_operands(pol));
      // the single products
      auto G1 = G0;
      std::vector<float> dx1(std::size_t(rows * in), 0.5f);
      linear_param_grads(pol, dy.data(), xw.data(), rows, out, in, G1.data(), G1.data() + out * in);
      gemm(pol, gemm_desc{false, false, rows, in, out}, 1.0f, dy.data(), W.data(), beta, dx1.data());
      // linear_backward on the widened x, and on its bf16 copy with x null
      auto G2 = G0, G3 = G0;
      std::vector<float> dx2(dx1.size(), 0.5f), dx3(dx1.size(), 0.5f);
      linear_backward(pol, dy.data(), xw.data(), W.data(), rows, out, in, G2.data(), G2.data() + out * in, dx2.data(),
                      beta);
      linear_backward(pol, dy.data(), static_cast<const float*>(nullptr), W.data(), rows, out, in, G3.data(),
                      G3.data() + out * in, dx3.data(), beta, linear_bf16_copies{nullptr, x16.data()});
      CHECK(G2 == G1);
      CHECK(dx2 == dx1);
      CHECK(G3 == G1);
      CHECK(dx3 == dx1);
    }
  std::vector<float> G(G0), dx(std::size_t(rows * in));
  CHECK_THROWS_AS(linear_backward(cpu_policy{1}, dy.data(), static_cast<const float*>(nullptr), W.data(), rows, out,
                                  in, G.data(), static_cast<float*>(nullptr), dx.data(), 0.0f),
                  config_error);
}

TEST_CASE("the backward's producers with a bf16 copy: GELU's gradient and the scaled branch gradient") {
  const cpu_policy pol{2};
  const std::int64_t n = 1001;
  std::vector<float> a(static_cast<std::size_t>(n)), g(a.size());
  dino_test::fill_normal(a.data(), a.size(), 71);
  dino_test::fill_normal(g.data(), g.size(), 72);
  std::vector<float> ref(g), got(g);
  std::vector<std::uint16_t> got16(a.size());
  gelu_backward_apply(pol, a.data(), ref.data(), ref.data(), n, false);
  gelu_backward_copy_bf16(pol, a.data(), got.data(), got.data(), got16.data(), n);  // in place
  CHECK(got == ref);
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(got16[i] == cpu::bf16_bits(got[i]));
  const std::int64_t tokens = 29, D = 7;
  std::vector<std::int64_t> token_crop(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) token_crop[std::size_t(t)] = t / 10;
  const std::vector<float> scale{1.25f, 0.0f, 0.5f};
  std::vector<float> src(std::size_t(tokens * D)), dst(src.size());
  std::vector<std::uint16_t> dst16(src.size());
  dino_test::fill_normal(src.data(), src.size(), 73);
  scaled_copy_bf16(pol, token_crop.data(), src.data(), scale.data(), dst.data(), dst16.data(), tokens, D);
  for (std::size_t i = 0; i < src.size(); ++i) {
    REQUIRE(dst[i] == src[i] * scale[std::size_t(token_crop[i / std::size_t(D)])]);
    REQUIRE(dst16[i] == cpu::bf16_bits(dst[i]));
  }
}

TEST_CASE("every fp32 kernel: gemm_bias equals the bias rows followed by gemm with beta 1, bit for bit") {
  // The bias goes in the first depth block's store (alpha acc + bias): the same rounding as
  // C = bias rows, then C += op(A) op(B). Shapes split by rows and by columns over 2
  // threads, several depth blocks (k > 768), partial tiles, a padded ldc; C starts as NaN
  // (never read) and the padding must stay untouched.
  kernel_guard guard;
  const std::vector<std::tuple<int, int, int>> shapes = {{1, 1, 1},   {7, 17, 9},   {13, 33, 31}, {200, 97, 70},
                                                         {50, 700, 3}, {96, 40, 1030}, {31, 1025, 24}, {5, 9, 0}};
  std::uint64_t seed = 900;
  for (auto kern : runnable_kernels()) {
    REQUIRE(cpu::set_gemm_kernel(kern));
    const std::string kname = cpu::gemm_kernel_name(kern);
    CAPTURE(kname);
    for (auto [m, n, k] : shapes)
      for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb)
          for (int threads : {1, 2}) {
            const std::string where = "m=" + std::to_string(m) + " n=" + std::to_string(n) + " k=" + std::to_string(k) +
                                      " ta=" + std::to_string(ta) + " tb=" + std::to_string(tb) +
                                      " threads=" + std::to_string(threads);
            CAPTURE(where);
            gemm_desc d{bool(ta), bool(tb), m, n, k};
            d.ldc = n + 3;
            std::vector<float> A(std::size_t(std::max(1, m * k))), B(std::size_t(std::max(1, k * n)));
            std::vector<float> bias(static_cast<std::size_t>(n));
            dino_test::fill_normal(A.data(), A.size(), seed++);
            dino_test::fill_normal(B.data(), B.size(), seed++);
            dino_test::fill_normal(bias.data(), bias.size(), seed++);
            std::vector<float> got(std::size_t(m * d.ldc), std::numeric_limits<float>::quiet_NaN()), want = got;
            for (int i = 0; i < m; ++i)
              for (int j = 0; j < n; ++j) want[std::size_t(i * d.ldc + j)] = bias[std::size_t(j)];
            gemm(cpu_policy{threads}, d, 1.0f, A.data(), B.data(), 1.0f, want.data());
            cpu::gemm_bias(cpu_policy{threads}, d, A.data(), B.data(), bias.data(), got.data());
            CHECK(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0);
          }
  }
  // double (Eigen) takes the same path as the rows-then-product form
  std::vector<double> A{1, 2, 3, 4, 5, 6}, B{1, 0, -1, 2, 1, 0}, bias{0.5, -0.5}, C(6, NAN);
  cpu::gemm_bias(cpu_policy{1}, gemm_desc{false, false, 3, 2, 2}, A.data(), B.data(), bias.data(), C.data());
  CHECK(C == std::vector<double>{1 * 1 + 2 * -1 + 0.5, 1 * 0 + 2 * 2 - 0.5, 3 - 4 + 0.5, 8 - 0.5, 5 - 6 + 0.5, 12 - 0.5});
  CHECK_THROWS_AS(cpu::gemm_bias(cpu_policy{1}, gemm_desc{false, false, 1, 1, 1, 0, 0, 0, 2}, A.data(), B.data(),
                                 bias.data(), C.data()),
                  shape_error);
}

TEST_CASE("every fp32 kernel: beta = 0 never reads C (NaN in C), gemm_serial, k = 0") {
  kernel_guard guard;
  for (auto kern : runnable_kernels()) {
    REQUIRE(cpu::set_gemm_kernel(kern));
    const std::string kname = cpu::gemm_kernel_name(kern);
    CAPTURE(kname);
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        gemm_desc d{bool(ta), bool(tb), 29, 45, 70};
        d.ldc = 50;
        check_product(d, 1.0f, 0.0f, 2, true, 7);
        check_product(d, 2.0f, 0.0f, 1, true, 8, /*serial=*/true);
        check_product(d, 1.0f, 0.25f, 1, false, 9, /*serial=*/true);
      }
    // k = 0: C = beta C; with beta = 0 the NaN are overwritten with zeros
    std::vector<float> C(6, std::numeric_limits<float>::quiet_NaN());
    const float* none = nullptr;
    gemm(cpu_policy{1}, gemm_desc{false, false, 2, 3, 0}, 1.0f, none, none, 0.0f, C.data());
    for (float c : C) CHECK(c == 0.0f);
    std::vector<float> D(6, 2.0f);
    gemm(cpu_policy{1}, gemm_desc{false, false, 2, 3, 0}, 1.0f, none, none, 0.5f, D.data());
    for (float c : D) CHECK(c == 1.0f);
  }
}

TEST_CASE("every fp32 kernel: strided batches (attention heads) match one product per batch") {
  kernel_guard guard;
  for (auto kern : runnable_kernels()) {
    REQUIRE(cpu::set_gemm_kernel(kern));
    const std::string kname = cpu::gemm_kernel_name(kern);
    CAPTURE(kname);
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb) {
        const std::int64_t batch = 7, m = 13, n = 21, k = 35;
        gemm_desc d{bool(ta), bool(tb), m, n, k};
        d.lda = (ta ? m : k) + 1;
        d.ldb = (tb ? k : n) + 2;
        d.ldc = n + 3;
        d.batch = batch;
        d.stride_a = (ta ? k : m) * d.lda + 5;
        d.stride_b = (tb ? n : k) * d.ldb + 3;
        d.stride_c = m * d.ldc + 4;
        std::vector<float> A(std::size_t(batch * d.stride_a)), B(std::size_t(batch * d.stride_b)),
            C(std::size_t(batch * d.stride_c), std::numeric_limits<float>::quiet_NaN());
        dino_test::fill_normal(A.data(), A.size(), 41);
        dino_test::fill_normal(B.data(), B.size(), 42);
        std::vector<float> R = C;
        for (int threads : {1, 2, 3}) {
          std::vector<float> Cw = C;
          gemm(cpu_policy{threads}, d, 1.5f, A.data(), B.data(), 0.0f, Cw.data());
          gemm_desc one = d;
          one.batch = 1;
          for (std::int64_t i = 0; i < batch; ++i)
            gemm(cpu_policy{1}, one, 1.5f, A.data() + i * d.stride_a, B.data() + i * d.stride_b, 0.0f,
                 R.data() + i * d.stride_c);
          // bit-identical, gaps between the batches untouched (NaN)
          CHECK(std::memcmp(Cw.data(), R.data(), Cw.size() * sizeof(float)) == 0);
        }
      }
  }
}

TEST_CASE("dino's fp32 kernels: the same bits for any thread count, and for AVX2 and AVX-512") {
  kernel_guard guard;
  std::vector<cpu::gemm_kernel> packed;
  for (auto k : runnable_kernels())
    if (k != cpu::gemm_kernel::eigen) packed.push_back(k);
  if (packed.empty()) return;  // this CPU runs Eigen only
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      // big enough to be split among threads, depth over two blocks
      const std::int64_t m = 301, n = 203, k = 1100;
      gemm_desc d{bool(ta), bool(tb), m, n, k};
      std::vector<float> A(std::size_t(m * k)), B(std::size_t(k * n)), C0(std::size_t(m * n));
      dino_test::fill_normal(A.data(), A.size(), 51);
      dino_test::fill_normal(B.data(), B.size(), 52);
      dino_test::fill_normal(C0.data(), C0.size(), 53);
      std::vector<float> first;
      for (auto kern : packed) {
        REQUIRE(cpu::set_gemm_kernel(kern));
        for (int threads : {1, 2, 3, 4}) {
          for (gemm_desc dd : {d, [&] { gemm_desc t = d; t.m = m / 2 + 1; t.lda = ta ? m : k; return t; }()}) {  // also a row block
            std::vector<float> C = C0;
            gemm(cpu_policy{threads}, dd, 0.5f, A.data(), B.data(), 0.75f, C.data());
            if (dd.m != m) {  // rows of a smaller product equal the first rows of the whole one
              if (!first.empty())
                CHECK(std::memcmp(C.data(), first.data(), std::size_t(dd.m * n) * sizeof(float)) == 0);
              continue;
            }
            if (first.empty()) first = C;
            else CHECK_MESSAGE(std::memcmp(C.data(), first.data(), C.size() * sizeof(float)) == 0,
                               "kernel ", std::string(cpu::gemm_kernel_name(kern)), " threads ", threads);
          }
        }
      }
    }
}

TEST_CASE("gemm kernel selection: supported kernels, the fallback, DINO_GEMM_KERNEL") {
  kernel_guard guard;
  CHECK(cpu::gemm_kernel_supported(cpu::gemm_kernel::eigen));
  CHECK(cpu::gemm_kernel_supported(cpu::gemm_active_kernel()));
  for (auto k : {cpu::gemm_kernel::eigen, cpu::gemm_kernel::avx2, cpu::gemm_kernel::avx512}) {
    CHECK(cpu::set_gemm_kernel(k) == cpu::gemm_kernel_supported(k));
    if (cpu::gemm_kernel_supported(k)) CHECK(cpu::gemm_active_kernel() == k);
  }
  if (const char* e = std::getenv("DINO_GEMM_KERNEL"))  // the start-up choice honours the variable
    if (cpu::gemm_kernel_supported(guard.saved) && std::strcmp(e, cpu::gemm_kernel_name(guard.saved)) != 0)
      MESSAGE("DINO_GEMM_KERNEL=", std::string(e), " not runnable here; kernel ",
              std::string(cpu::gemm_kernel_name(guard.saved)));
  MESSAGE("fp32 GEMM kernel at start-up: ", std::string(cpu::gemm_kernel_name(guard.saved)));
}

TEST_CASE("a steady-state gemm allocates nothing (dino's fp32 kernels; Eigen above 128 KiB blocks does)") {
#if DINO_TEST_COUNT_MALLOC
  kernel_guard guard;
  if (cpu::gemm_active_kernel() == cpu::gemm_kernel::eigen) return;
  // the shapes of a ViT's linear layers (split among threads) and of attention's heads
  const std::int64_t T = 700, D = 384;
  std::vector<float> x(std::size_t(T * 4 * D)), w(std::size_t(4 * D * D)), y(std::size_t(T * 4 * D));
  dino_test::fill_normal(x.data(), x.size(), 61);
  dino_test::fill_normal(w.data(), w.size(), 62);
  gemm_desc att{false, true, 197, 197, 64, 3 * D, 3 * D, 197};
  att.batch = 3;
  att.stride_a = att.stride_b = 64;
  att.stride_c = 197 * 197;
  auto run = [&] {
    for (int threads : {1, 2}) {
      const cpu_policy pol{threads};
      gemm(pol, gemm_desc{false, true, T, 4 * D, D}, 1.0f, x.data(), w.data(), 0.0f, y.data());      // x W^T
      gemm(pol, gemm_desc{true, false, 4 * D, D, T}, 1.0f, y.data(), x.data(), 1.0f, w.data());      // dy^T x
      gemm(pol, gemm_desc{false, false, T, D, 4 * D}, 1.0f, y.data(), w.data(), 0.0f, x.data());     // dy W
      gemm(pol, att, 0.125f, x.data(), x.data() + D, 0.0f, y.data());                                // heads
      gemm_serial(gemm_desc{false, false, 197, 64, 197, 197, 3 * D, D}, 1.0f, y.data(), x.data(), 0.0f, w.data());
    }
  };
  run();  // first use: each thread's packing buffers, OpenMP's teams
  const long before = g_mallocs.load();
  for (int i = 0; i < 3; ++i) run();
  const long after = g_mallocs.load();
  CHECK(after - before == 0);
  void* volatile probe = std::malloc(1000);  // the counter works
  CHECK(g_mallocs.load() == after + 1);
  std::free(probe);
#else
  MESSAGE("allocation counting needs glibc without a sanitizer: skipped");
#endif
}

TEST_CASE("CPU row kernels on every SIMD level: LayerNorm and column sums against double, any thread count") {
  // policy/cpu/simd.hpp: the baseline loops and their AVX-512 copies. Against references in
  // double; the thread count never changes a bit; the column sums (one chain of double adds
  // per column) are the same bits on every level.
  const cpu::simd_level saved = cpu::simd_active();
  const std::int64_t rows = 131, D = 200;  // D: 12 full 16-lane groups and a tail of 8
  std::vector<float> x(static_cast<std::size_t>(rows * D)), dy(x.size()), w(static_cast<std::size_t>(D)),
      b(static_cast<std::size_t>(D));
  dino_test::fill_normal(x.data(), x.size(), 71);
  dino_test::fill_normal(dy.data(), dy.size(), 72);
  dino_test::fill_normal(w.data(), w.size(), 73);
  dino_test::fill_normal(b.data(), b.size(), 74);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 3.0f + 2.0f * x[i];  // a mean far from 0
  std::vector<float> sums_first;
  for (cpu::simd_level level : {cpu::simd_level::baseline, cpu::simd_level::avx512}) {
    if (!cpu::set_simd_level(level)) continue;
    CAPTURE(cpu::simd_level_name(level));
    std::vector<float> y[2], st[2], dx[2], gw[2], gb[2], cs[2];
    for (int t = 0; t < 2; ++t) {
      const cpu_policy pol{t + 1};
      y[t].resize(x.size()), st[t].resize(std::size_t(2 * rows)), dx[t].assign(x.size(), 0.5f);
      gw[t].assign(std::size_t(D), 0.25f), gb[t].assign(std::size_t(D), -0.25f), cs[t].assign(std::size_t(D), 1.0f);
      cpu::layer_norm_rows(pol, x.data(), w.data(), b.data(), y[t].data(), st[t].data(), rows, D, 1e-6f);
      cpu::layer_norm_rows_backward(pol, x.data(), w.data(), dy.data(), st[t].data(), dx[t].data(), rows, D, true);
      cpu::layer_norm_param_grads(pol, x.data(), dy.data(), st[t].data(), rows, D, gw[t].data(), gb[t].data());
      cpu::column_sums(pol, dy.data(), rows, D, cs[t].data(), true);
    }
    CHECK(y[0] == y[1]);
    CHECK(st[0] == st[1]);
    CHECK(dx[0] == dx[1]);
    CHECK(gw[0] == gw[1]);
    CHECK(gb[0] == gb[1]);
    CHECK(cs[0] == cs[1]);
    if (sums_first.empty()) sums_first = cs[0];
    else CHECK(cs[0] == sums_first);
    // references in double
    std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end()), bd(b.begin(), b.end()), dyd(dy.begin(), dy.end());
    double ey = 0, edx = 0, egw = 0, egb = 0, ecs = 0;
    std::vector<double> rgw(std::size_t(D), 0.25), rgb(std::size_t(D), -0.25), rcs(std::size_t(D), 1.0);
    for (std::int64_t r = 0; r < rows; ++r) {
      std::vector<double> yr(static_cast<std::size_t>(D)), dxr(static_cast<std::size_t>(D), 0.5);
      const auto s = math::layernorm_row(xd.data() + r * D, wd.data(), bd.data(), yr.data(), int(D), 1e-6);
      math::layernorm_row_backward(xd.data() + r * D, wd.data(), dyd.data() + r * D, s, dxr.data(), int(D), true);
      for (std::int64_t c = 0; c < D; ++c) {
        const std::size_t i = std::size_t(r * D + c);
        ey = std::max(ey, std::fabs(y[0][i] - yr[std::size_t(c)]));
        edx = std::max(edx, std::fabs(dx[0][i] - dxr[std::size_t(c)]));
        rgw[std::size_t(c)] += dyd[i] * (xd[i] - s.mean) * s.rstd;
        rgb[std::size_t(c)] += dyd[i];
        rcs[std::size_t(c)] += dyd[i];
      }
    }
    for (std::int64_t c = 0; c < D; ++c) {
      egw = std::max(egw, std::fabs(gw[0][std::size_t(c)] - rgw[std::size_t(c)]));
      egb = std::max(egb, std::fabs(gb[0][std::size_t(c)] - rgb[std::size_t(c)]));
      ecs = std::max(ecs, std::fabs(cs[0][std::size_t(c)] - rcs[std::size_t(c)]));
    }
    CHECK(ey < 2e-5);   // |y| up to ~10: a few float ulps
    CHECK(edx < 2e-5);  // |dx| up to ~5
    CHECK(egw < 1e-4);  // sums of 131 terms of ~1
    CHECK(egb < 1e-4);
    CHECK(ecs < 1e-5);  // double sums, one rounding to float
  }
  cpu::set_simd_level(saved);
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
