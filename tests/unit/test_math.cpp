// math/ functors: values against direct formulas, gradients against central differences in
// double, and the accumulate contract (pre-filled outputs receive +=).
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include <dino/dino.hpp>

#include "gradcheck.hpp"

using namespace dino;
using dino_test::dot;
using dino_test::fd_gradient;
using dino_test::fill_normal;
using dino_test::rel_error;

static constexpr double kTol = 1e-7;  // relative-norm error of analytic vs central differences

TEST_CASE("gelu is exact (erf) and its derivative matches finite differences") {
  CHECK(math::gelu(1.0) == doctest::Approx(0.8413447460685429));  // 1 * Phi(1)
  CHECK(math::gelu(-2.0) == doctest::Approx(-0.04550026389635842));
  CHECK(math::gelu(0.0) == 0.0);
  for (double x : {-3.0, -1.0, -0.1, 0.0, 0.3, 2.0, 5.0}) {
    const double h = 1e-6;
    const double fd = (math::gelu(x + h) - math::gelu(x - h)) / (2 * h);
    CHECK(math::gelu_grad(x) == doctest::Approx(fd).epsilon(1e-8));
  }
}

TEST_CASE("CPU GELU range kernels (vectorised erf for float) against the exact formulas") {
  // erf within 2 ulp of double erf; gelu and gelu' then agree with the double formulas to a
  // few float ulps of their magnitude (the 1 + erf cancellation for x << 0 is in both).
  // Every SIMD level this CPU runs (policy/cpu/simd.hpp): the baseline's 4-lane kernel and
  // the AVX-512 one.
  const cpu::simd_level saved = cpu::simd_active();
  for (cpu::simd_level level : {cpu::simd_level::baseline, cpu::simd_level::avx512}) {
    if (!cpu::set_simd_level(level)) continue;
    CAPTURE(cpu::simd_level_name(level));
    std::vector<float> a;
    for (float x = -9.f; x <= 9.f; x += 0.00137f) a.push_back(x);
    a.push_back(0.f);
    a.push_back(-0.f);
    const std::size_t n = a.size();  // not a multiple of 4 or 16: the padded tail is exercised
    std::vector<float> y(n), g(n), dy(n, 2.f), acc(n, 1.f);
    cpu::gelu_range(a.data(), y.data(), std::int64_t(n));
    cpu::gelu_backward_range(a.data(), dy.data(), g.data(), std::int64_t(n), false);
    cpu::gelu_backward_range(a.data(), dy.data(), acc.data(), std::int64_t(n), true);
    // gelu and gelu' in one pass (what the ViT's training forward keeps on the CPU), then the
    // backward as a product: the same bits as the two passes above
    std::vector<float> y2(n), ga(a), g2(n), acc2(n, 1.f);
    cpu::gelu_with_grad_range(a.data(), y2.data(), ga.data(), std::int64_t(n));  // ga aliases its input
    cpu::mul_range(ga.data(), dy.data(), g2.data(), std::int64_t(n), false);
    cpu::mul_range(ga.data(), dy.data(), acc2.data(), std::int64_t(n), true);
    CHECK(std::memcmp(y2.data(), y.data(), n * sizeof(float)) == 0);
    CHECK(std::memcmp(g2.data(), g.data(), n * sizeof(float)) == 0);
    CHECK(std::memcmp(acc2.data(), acc.data(), n * sizeof(float)) == 0);
    // erf of one value through this level's vector erf
    const auto erf_one = [&](float x) {
#if DINO_GEMM_X86
      if (level == cpu::simd_level::avx512) {
        float e[16];
        cpu::detail::simd_erf_avx512(x, e);
        return e[0];
      }
#endif
#if defined(__SSE2__)
      float e[4];
      _mm_storeu_ps(e, cpu::detail::erf_ps(_mm_set1_ps(x)));
      return e[0];
#else
      return float(std::erf(double(x)));
#endif
    };
    double worst_erf_ulp = 0;
    std::size_t bad_y = 0, bad_g = 0, bad_acc = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const double x = a[i], c = 0.5 * (1 + std::erf(x / std::sqrt(2.0)));
      const double ref = x * c, dref = 2 * (c + x * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI));
      bad_y += !(std::fabs(y[i] - ref) <= 4e-7 * std::max(1.0, std::fabs(x)));
      bad_g += !(std::fabs(g[i] - dref) <= 1e-6);
      bad_acc += !(std::fabs(acc[i] - (1.0 + g[i])) <= 1e-6 * std::fabs(1.0 + g[i]));
      const double er = std::erf(double(a[i]));
      const double ulp = std::nextafter(std::fabs(float(er)), 2.f) - std::fabs(float(er));
      worst_erf_ulp = std::max(worst_erf_ulp, std::fabs(erf_one(a[i]) - er) / ulp);
    }
    CHECK(bad_y == 0);
    CHECK(bad_g == 0);
    CHECK(bad_acc == 0);
    CHECK(worst_erf_ulp <= 2.0);
    CHECK(y[n - 1] == 0.f);
    // NaN propagates (the method's non-finite checks rely on it); erf(+-inf) = +-1.
    float sp[5] = {NAN, INFINITY, -INFINITY, 1.f, -1.f}, o[5];
    cpu::gelu_range(sp, o, 5);
    CHECK(std::isnan(o[0]));
    CHECK(o[1] == INFINITY);
    CHECK(o[3] == doctest::Approx(0.8413447460685429));
    CHECK(o[4] == doctest::Approx(-0.15865525393145707));
    cpu::gelu_backward_range(sp, sp + 3, o, 1, false);
    CHECK(std::isnan(o[0]));
    // double goes through math::gelu itself
    std::vector<double> ad{-1.5, 0.25, 3.0}, yd(3);
    cpu::gelu_range(ad.data(), yd.data(), 3);
    for (int i = 0; i < 3; ++i) CHECK(yd[std::size_t(i)] == math::gelu(ad[std::size_t(i)]));
  }
  cpu::set_simd_level(saved);
  static_assert(nn::gelu_saves_grad<cpu_policy, float> && nn::gelu_saves_grad<cpu_policy, double>);
}

TEST_CASE("CPU softmax_row_inplace (attention) against math::softmax_row, on every SIMD level") {
  const cpu::simd_level saved = cpu::simd_active();
  std::vector<std::vector<float>> per_level;
  for (cpu::simd_level level : {cpu::simd_level::baseline, cpu::simd_level::avx512}) {
    if (!cpu::set_simd_level(level)) continue;
    CAPTURE(std::string(cpu::simd_level_name(level)));
    std::vector<float> all;
    for (int n : {1, 3, 4, 10, 15, 16, 17, 50, 197}) {
      CAPTURE(n);
      std::vector<double> r(static_cast<std::size_t>(n));
      fill_normal(r, std::uint64_t(n), 4.0);
      std::vector<float> x(r.begin(), r.end()), ref(x.size());
      math::softmax_row(x.data(), static_cast<const float*>(nullptr), ref.data(), n, 1.f);
      cpu::softmax_row_inplace(x.data(), n);
      double sum = 0;
      for (int i = 0; i < n; ++i) {
        CHECK(x[std::size_t(i)] == doctest::Approx(ref[std::size_t(i)]).epsilon(2e-6));
        sum += x[std::size_t(i)];
      }
      CHECK(sum == doctest::Approx(1.0).epsilon(1e-6));
      all.insert(all.end(), x.begin(), x.end());
    }
    per_level.push_back(all);
  }
  cpu::set_simd_level(saved);
  if (per_level.size() == 2)  // the same sums on both levels; the exp may differ in the last bits
    for (std::size_t i = 0; i < per_level[0].size(); ++i)
      CHECK(per_level[1][i] == doctest::Approx(per_level[0][i]).epsilon(1e-6));
  // non-finite rows become NaN, as with math::softmax_row
  for (float bad : {NAN, INFINITY}) {
    std::vector<float> x{0.5f, bad, -1.f, 2.f, 0.f};
    cpu::softmax_row_inplace(x.data(), 5);
    for (float v : x) CHECK(std::isnan(v));
  }
  std::vector<float> m{-INFINITY, -INFINITY};
  cpu::softmax_row_inplace(m.data(), 2);
  CHECK(std::isnan(m[0]));
  std::vector<float> p{-INFINITY, 0.f, 0.f};  // a masked entry gets (about) 0
  cpu::softmax_row_inplace(p.data(), 3);
  CHECK(p[0] < 1e-30f);
  CHECK(p[1] == doctest::Approx(0.5f));
}

TEST_CASE("layernorm row: values, mean/rstd, gradient") {
  const int n = 13;
  std::vector<double> x(n), w(n), b(n), y(n), r(n), dx(n), dxa(n, 0.5);
  fill_normal(x, 1, 2.0);
  fill_normal(w, 2);
  fill_normal(b, 3);
  fill_normal(r, 4);
  auto st = math::layernorm_row(x.data(), w.data(), b.data(), y.data(), n, 1e-6);
  double mean = 0, var = 0;
  for (double v : x) mean += v / n;
  for (double v : x) var += (v - mean) * (v - mean) / n;
  CHECK(st.mean == doctest::Approx(mean));
  CHECK(st.rstd == doctest::Approx(1 / std::sqrt(var + 1e-6)));
  CHECK(y[3] == doctest::Approx((x[3] - mean) * st.rstd * w[3] + b[3]));
  auto f = [&] {
    std::vector<double> yy(n);
    math::layernorm_row(x.data(), w.data(), b.data(), yy.data(), n, 1e-6);
    return dot(yy.data(), r.data(), n);
  };
  auto fd = fd_gradient(f, x.data(), n);
  math::layernorm_row_backward(x.data(), w.data(), r.data(), st, dx.data(), n, false);
  CHECK(rel_error(dx, fd) < kTol);
  math::layernorm_row_backward(x.data(), w.data(), r.data(), st, dxa.data(), n, true);
  for (int i = 0; i < n; ++i) CHECK(dxa[std::size_t(i)] == doctest::Approx(dx[std::size_t(i)] + 0.5));
}

TEST_CASE("softmax and log-softmax with temperature and center") {
  const int n = 17;
  const double tau = 0.07, inv = 1 / tau;
  std::vector<double> x(n), c(n), r(n), y(n), ly(n), dx(n);
  fill_normal(x, 5, 0.1);  // z = (x - c) / tau spans a few units: a peaked softmax has ~0 gradient
  fill_normal(c, 6, 0.03);
  fill_normal(r, 7);
  for (const double* center : {static_cast<const double*>(nullptr), static_cast<const double*>(c.data())}) {
    const double lse = math::softmax_row(x.data(), center, y.data(), n, inv);
    math::log_softmax_row(x.data(), center, ly.data(), n, inv);
    double mx = -1e300, s = 0, sum = 0;
    for (int i = 0; i < n; ++i) mx = std::max(mx, (x[std::size_t(i)] - (center ? center[i] : 0)) * inv);
    for (int i = 0; i < n; ++i) s += std::exp((x[std::size_t(i)] - (center ? center[i] : 0)) * inv - mx);
    CHECK(lse == doctest::Approx(mx + std::log(s)));
    for (int i = 0; i < n; ++i) {
      sum += y[std::size_t(i)];
      CHECK(std::log(y[std::size_t(i)]) == doctest::Approx(ly[std::size_t(i)]));
    }
    CHECK(sum == doctest::Approx(1.0));
    // gradients through z = (x - c) / tau into x
    auto fs = [&] {
      std::vector<double> t(n);
      math::softmax_row(x.data(), center, t.data(), n, inv);
      return dot(t.data(), r.data(), n);
    };
    auto fl = [&] {
      std::vector<double> t(n);
      math::log_softmax_row(x.data(), center, t.data(), n, inv);
      return dot(t.data(), r.data(), n);
    };
    auto g1 = fd_gradient(fs, x.data(), n);
    math::softmax_row_backward(y.data(), r.data(), dx.data(), n, inv, false);
    CHECK(rel_error(dx, g1) < kTol);
    auto g2 = fd_gradient(fl, x.data(), n);
    math::log_softmax_row_backward(ly.data(), r.data(), dx.data(), n, inv, false);
    CHECK(rel_error(dx, g2) < kTol);
    std::vector<double> acc(n, -1.0);
    math::log_softmax_row_backward(ly.data(), r.data(), acc.data(), n, inv, true);
    for (int i = 0; i < n; ++i) CHECK(acc[std::size_t(i)] == doctest::Approx(dx[std::size_t(i)] - 1.0));
  }
  // large logits do not overflow (max subtraction)
  std::vector<float> big{1000.f, 1001.f, 999.f}, p(3);
  math::softmax_row(big.data(), static_cast<const float*>(nullptr), p.data(), 3, 10.0f);
  CHECK(std::isfinite(p[0]));
  CHECK(p[1] == doctest::Approx(1.0f).epsilon(1e-4));
  std::vector<double> q{0.5, 0.5, 0.0};
  CHECK(math::entropy_row(q.data(), 3) == doctest::Approx(std::log(2.0)));
}

TEST_CASE("L2 normalisation with PyTorch's eps semantics") {
  const int n = 9;
  const double eps = 1e-12;
  std::vector<double> x(n), y(n), r(n), dx(n);
  fill_normal(x, 8);
  fill_normal(r, 9);
  const double norm = math::l2_normalize_row(x.data(), y.data(), n, eps);
  double nn = 0;
  for (double v : y) nn += v * v;
  CHECK(nn == doctest::Approx(1.0));
  auto f = [&] {
    std::vector<double> t(n);
    math::l2_normalize_row(x.data(), t.data(), n, eps);
    return dot(t.data(), r.data(), n);
  };
  auto g = fd_gradient(f, x.data(), n);
  math::l2_normalize_row_backward(y.data(), norm, r.data(), dx.data(), n, eps, false);
  CHECK(rel_error(dx, g) < kTol);
  // below eps the denominator is the constant eps: y = x / eps, dx = dy / eps
  std::vector<double> tiny(n, 1e-14), ty(n), tdx(n);
  const double tn = math::l2_normalize_row(tiny.data(), ty.data(), n, 1e-12);
  CHECK(ty[0] == doctest::Approx(1e-2));
  math::l2_normalize_row_backward(ty.data(), tn, r.data(), tdx.data(), n, 1e-12, false);
  CHECK(tdx[2] == doctest::Approx(r[2] / 1e-12));
}

TEST_CASE("weight normalisation g v / ||v||: values and gradients of g and v") {
  const int n = 11;
  double g = 1.7;
  std::vector<double> v(n), w(n), r(n), dv(n, 0.25);
  fill_normal(v, 10);
  fill_normal(r, 11);
  const double norm = math::weight_norm_row(g, v.data(), w.data(), n);
  double nw = 0;
  for (double t : w) nw += t * t;
  CHECK(std::sqrt(nw) == doctest::Approx(g));
  auto f = [&] {
    std::vector<double> t(n);
    math::weight_norm_row(g, v.data(), t.data(), n);
    return dot(t.data(), r.data(), n);
  };
  auto gv = fd_gradient(f, v.data(), n);
  auto gg = fd_gradient(f, &g, 1);
  double dg = 0.5;  // accumulates
  math::weight_norm_row_backward(g, v.data(), norm, r.data(), &dg, dv.data(), n);
  CHECK(dg - 0.5 == doctest::Approx(gg[0]).epsilon(1e-7));
  for (auto& t : dv) t -= 0.25;
  CHECK(rel_error(dv, gv) < kTol);
}

TEST_CASE("soft cross-entropy and its gradient through log-softmax") {
  const int n = 15;
  const double tau = 0.1, inv = 1 / tau;
  std::vector<double> s(n), q(n), lp(n), ds(n);
  fill_normal(s, 12);
  fill_normal(q, 13);
  math::softmax_row(q.data(), static_cast<const double*>(nullptr), q.data(), n, 1.0);  // a distribution
  auto f = [&] {
    std::vector<double> t(n);
    math::log_softmax_row(s.data(), static_cast<const double*>(nullptr), t.data(), n, inv);
    return math::soft_cross_entropy_row(q.data(), t.data(), n);
  };
  const double h = f();
  math::log_softmax_row(s.data(), static_cast<const double*>(nullptr), lp.data(), n, inv);
  double ref = 0;
  for (int i = 0; i < n; ++i) ref -= q[std::size_t(i)] * lp[std::size_t(i)];
  CHECK(h == doctest::Approx(ref));
  auto g = fd_gradient(f, s.data(), n);
  math::soft_cross_entropy_row_backward(q.data(), lp.data(), ds.data(), n, inv, 1.0, false);
  CHECK(rel_error(ds, g) < kTol);
}

TEST_CASE("the CPU policy's vectorised exp is within 2 ulp of exp, any length") {
  std::vector<float> x;
  for (double v = -87.0; v <= 88.0; v += 3.7e-3) x.push_back(float(v));
  x.push_back(0.0f);
  x.push_back(-1e-30f);
  for (std::int64_t n : {std::int64_t(x.size()), std::int64_t(1), std::int64_t(3), std::int64_t(17)}) {
    std::vector<float> y(x.begin(), x.begin() + n);
    cpu::exp_inplace(y.data(), n);
    for (std::int64_t i = 0; i < n; ++i) {
      const double ref = std::exp(double(x[std::size_t(i)]));
      const double ulp = double(std::nextafter(float(ref), INFINITY)) - double(float(ref));
      REQUIRE_MESSAGE(std::fabs(double(y[std::size_t(i)]) - ref) <= 2 * ulp, "x = " << x[std::size_t(i)]);
    }
  }
  // far below the range: a tiny positive value, never NaN or negative
  float t[2] = {-1000.0f, -90.0f};
  cpu::exp_inplace(t, 2);
  CHECK(t[0] >= 0.0f);
  CHECK(t[0] < 1e-37f);
  CHECK(t[1] < 1e-37f);
  std::vector<double> d{-3.0, 0.5, 2.0};
  cpu::exp_inplace(d.data(), 3);
  CHECK(d[0] == doctest::Approx(std::exp(-3.0)).epsilon(1e-15));
}
