// math/ functors: values against direct formulas, gradients against central differences in
// double, and the accumulate contract (pre-filled outputs receive +=).
#include <doctest/doctest.h>

#include <cmath>
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
