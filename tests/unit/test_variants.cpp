// The variant parts (dino-spec §8): the Sinkhorn-Knopp, sharpen-only and raw teacher targets,
// and the MSE, InfoNCE (with its queue) and NT-Xent losses. Each is checked against a direct
// double-precision restatement of its formula, its gradient against central finite
// differences of that restatement, and its edge cases and errors. The attention_mask's patch
// selection against brute force (its masked ViT path: test_vit.cpp and test_golden_vit.cpp).
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include <dino/dino.hpp>
#include <dino/ssl/info_nce.hpp>
#include <dino/ssl/mse_loss.hpp>
#include <dino/ssl/nt_xent.hpp>
#include <dino/ssl/sinkhorn.hpp>
#include <dino/ssl/student_mask.hpp>
#include <dino/ssl/targets.hpp>

#include "gradcheck.hpp"

using namespace dino;
using dino_test::fd_gradient;
using dino_test::fill_normal;
using dino_test::rel_error;

// Every part satisfies its concept, in float and double.
static_assert(ssl::teacher_target<ssl::sinkhorn_knopp<float>, float>);
static_assert(ssl::teacher_target<ssl::sinkhorn_knopp<double>, double>);
static_assert(ssl::teacher_target<ssl::sharpen_only<float>, float>);
static_assert(ssl::teacher_target<ssl::raw_target<float>, float>);
static_assert(ssl::teacher_target<ssl::raw_target<double>, double>);
static_assert(ssl::distillation_loss<ssl::mse_distillation, float>);
static_assert(ssl::distillation_loss<ssl::mse_distillation, double>);
static_assert(ssl::distillation_loss<ssl::info_nce<float>, float>);
static_assert(ssl::distillation_loss<ssl::info_nce<double>, double>);
static_assert(ssl::distillation_loss<ssl::nt_xent<float>, float>);
static_assert(ssl::distillation_loss<ssl::nt_xent<double>, double>);

namespace {

using vec = std::vector<double>;
using cv = host_view<const double>;
using mv = host_view<double>;

vec normalized(const double* x, std::int64_t K) {
  double n = 0;
  for (std::int64_t k = 0; k < K; ++k) n += x[k] * x[k];
  n = std::max(std::sqrt(n), 1e-12);
  vec y(static_cast<std::size_t>(K));
  for (std::int64_t k = 0; k < K; ++k) y[std::size_t(k)] = x[k] / n;
  return y;
}
double dotv(const vec& a, const vec& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// DINOv2's sinkhorn_knopp_teacher, loop for loop (world size 1), on t [R, K].
vec naive_sinkhorn(const vec& t, std::int64_t R, std::int64_t K, double tau, int iters) {
  vec Q(t.size());  // Q[k][r], K x R
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t k = 0; k < K; ++k) Q[std::size_t(k * R + r)] = std::exp(t[std::size_t(r * K + k)] / tau);
  double sum = 0;
  for (double x : Q) sum += x;
  for (double& x : Q) x /= sum;
  for (int it = 0; it < iters; ++it) {
    for (std::int64_t k = 0; k < K; ++k) {
      double rs = 0;
      for (std::int64_t r = 0; r < R; ++r) rs += Q[std::size_t(k * R + r)];
      for (std::int64_t r = 0; r < R; ++r) Q[std::size_t(k * R + r)] /= rs * double(K);
    }
    for (std::int64_t r = 0; r < R; ++r) {
      double cs = 0;
      for (std::int64_t k = 0; k < K; ++k) cs += Q[std::size_t(k * R + r)];
      for (std::int64_t k = 0; k < K; ++k) Q[std::size_t(k * R + r)] /= cs * double(R);
    }
  }
  vec q(t.size());
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t k = 0; k < K; ++k) q[std::size_t(r * K + k)] = Q[std::size_t(k * R + r)] * double(R);
  return q;
}

// The pair losses written directly: pair(s_row, q_row) summed over (i < G, v != i, b), / (n_terms B).
template <class F>
double pair_mean(int V, int G, std::int64_t B, F&& term) {
  double total = 0;
  int terms = 0;
  for (int i = 0; i < G; ++i)
    for (int v = 0; v < V; ++v) {
      if (v == i) continue;
      for (std::int64_t b = 0; b < B; ++b) total += term(v * B + b, i * B + b);
      ++terms;
    }
  return total / (double(terms) * double(B));
}

double naive_mse(const vec& s, const vec& q, int V, int G, std::int64_t B, std::int64_t K) {
  return pair_mean(V, G, B, [&](std::int64_t rs, std::int64_t rq) {
    const vec a = normalized(&s[std::size_t(rs * K)], K), c = normalized(&q[std::size_t(rq * K)], K);
    double d = 0;
    for (std::int64_t k = 0; k < K; ++k) d += (a[std::size_t(k)] - c[std::size_t(k)]) * (a[std::size_t(k)] - c[std::size_t(k)]);
    return d;
  });
}

// MoCo: CE over [l_pos, l_neg...] with label 0; queue as a list of keys (normalised here).
double naive_info_nce(const vec& s, const vec& q, const std::vector<vec>& queue, int V, int G, std::int64_t B,
                      std::int64_t K, double tau) {
  return pair_mean(V, G, B, [&](std::int64_t rs, std::int64_t rq) {
    const vec a = normalized(&s[std::size_t(rs * K)], K), k = normalized(&q[std::size_t(rq * K)], K);
    vec l{dotv(a, k) / tau};
    for (const vec& n : queue) l.push_back(dotv(a, normalized(n.data(), K)) / tau);
    double mx = -1e300, z = 0;
    for (double x : l) mx = std::max(mx, x);
    for (double x : l) z += std::exp(x - mx);
    return mx + std::log(z) - l[0];
  });
}

// NT-Xent over all student rows; the positives of anchor (v, b) are (i, b), i < G, i != v.
double naive_nt_xent(const vec& s, int V, int G, std::int64_t B, std::int64_t K, double tau) {
  const std::int64_t N = V * B;
  return pair_mean(V, G, B, [&](std::int64_t a, std::int64_t p) {
    const vec za = normalized(&s[std::size_t(a * K)], K);
    double mx = -1e300;
    vec l(static_cast<std::size_t>(N));
    for (std::int64_t k = 0; k < N; ++k) {
      l[std::size_t(k)] = dotv(za, normalized(&s[std::size_t(k * K)], K)) / tau;
      if (k != a) mx = std::max(mx, l[std::size_t(k)]);
    }
    double z = 0;
    for (std::int64_t k = 0; k < N; ++k)
      if (k != a) z += std::exp(l[std::size_t(k)] - mx);
    return mx + std::log(z) - l[std::size_t(p)];
  });
}

template <class L>
double fwd_bwd(const L& loss, int V, int G, std::int64_t B, std::int64_t K, const vec& s, const vec& q, vec& ds,
               double dloss = 1.0, bool accumulate = false, int threads = 2) {
  vec row(static_cast<std::size_t>(V * B));
  ds.resize(s.size());
  return loss.forward_backward(cpu_policy{threads}, cv{s.data(), {V * B, K}, "student"}, cv{q.data(), {G * B, K}, "teacher"},
                               mv{row.data(), {V * B}, "row loss"}, mv{ds.data(), {V * B, K}, "ds"}, dloss, accumulate);
}

}  // namespace

// ---- Sinkhorn-Knopp ------------------------------------------------------------------------

TEST_CASE("sinkhorn_knopp: DINOv2's three iterations, rows are distributions, prototypes balanced") {
  const std::int64_t R = 6, K = 9;
  const double tau = 0.07;
  vec t(static_cast<std::size_t>(R * K)), q(t.size()), ent(static_cast<std::size_t>(R));
  fill_normal(t, 11, 0.3);
  ssl::sinkhorn_knopp<double> sk({K, 3});
  const double H = sk.targets(cpu_policy{2}, cv{t.data(), {R, K}, "t"}, tau, mv{q.data(), {R, K}, "q"},
                              mv{ent.data(), {R}, "H"});
  const vec ref = naive_sinkhorn(t, R, K, tau, 3);
  CHECK(rel_error(q, ref) < 1e-13);
  double Href = 0;
  for (std::int64_t r = 0; r < R; ++r) {
    double sum = 0, h = 0;
    for (std::int64_t k = 0; k < K; ++k) {
      const double p = q[std::size_t(r * K + k)];
      sum += p;
      h -= p * std::log(p);
    }
    CHECK(sum == doctest::Approx(1.0).epsilon(1e-14));  // each sample's assignment sums to 1
    CHECK(ent[std::size_t(r)] == doctest::Approx(h).epsilon(1e-12));
    Href += h / double(R);
  }
  CHECK(H == doctest::Approx(Href).epsilon(1e-12));
  // each prototype's mass moves towards R / K with the iterations (exact only in the limit):
  // the largest relative deviation shrinks from the plain softmax to 1 and to 3 iterations
  auto imbalance = [&](const vec& p) {
    double worst = 0;
    for (std::int64_t k = 0; k < K; ++k) {
      double cs = 0;
      for (std::int64_t r = 0; r < R; ++r) cs += p[std::size_t(r * K + k)];
      worst = std::max(worst, std::fabs(cs * double(K) / double(R) - 1.0));
    }
    return worst;
  };
  vec soft(t.size());
  ssl::sharpen_only<double>({K}).targets(cpu_policy{1}, cv{t.data(), {R, K}, "t"}, tau, mv{soft.data(), {R, K}, "q"},
                                         mv{ent.data(), {R}, "H"});
  const double d0 = imbalance(soft), d1 = imbalance(naive_sinkhorn(t, R, K, tau, 1)), d3 = imbalance(q);
  INFO("imbalance: softmax ", d0, ", 1 iteration ", d1, ", 3 iterations ", d3);
  CHECK(d3 < d1);
  CHECK(d1 < d0);
  ssl::sinkhorn_knopp<double> many({K, 500});
  many.targets(cpu_policy{1}, cv{t.data(), {R, K}, "t"}, tau, mv{q.data(), {R, K}, "q"}, mv{ent.data(), {R}, "H"});
  CHECK(rel_error(q, naive_sinkhorn(t, R, K, tau, 500)) < 1e-11);
  for (std::int64_t k = 0; k < K; ++k) {
    double cs = 0;
    for (std::int64_t r = 0; r < R; ++r) cs += q[std::size_t(r * K + k)];
    CHECK(cs == doctest::Approx(double(R) / double(K)).epsilon(1e-9));
  }
  // no running state
  sk.observe(cpu_policy{1}, cv{t.data(), {R, K}, "t"});
  sk.commit();
  sk.discard();
}

TEST_CASE("sinkhorn_knopp: large logits do not overflow; per-prototype shifts change nothing") {
  const std::int64_t R = 5, K = 7;
  vec t(static_cast<std::size_t>(R * K)), t2(t.size()), q(t.size()), q2(t.size()), ent(static_cast<std::size_t>(R));
  fill_normal(t, 12, 0.5);
  // a per-prototype offset is cancelled by the first prototype normalisation
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t k = 0; k < K; ++k) t2[std::size_t(r * K + k)] = t[std::size_t(r * K + k)] + 40.0 * double(k);
  ssl::sinkhorn_knopp<double> sk({K, 3});
  sk.targets(cpu_policy{1}, cv{t.data(), {R, K}, "t"}, 0.05, mv{q.data(), {R, K}, "q"}, mv{ent.data(), {R}, "H"});
  sk.targets(cpu_policy{1}, cv{t2.data(), {R, K}, "t"}, 0.05, mv{q2.data(), {R, K}, "q"}, mv{ent.data(), {R}, "H"});
  // exp(280 / 0.05) overflows in the reference's order; here it does not
  CHECK(rel_error(q2, q) < 1e-12);
  // float: the same within rounding
  std::vector<float> tf(t2.begin(), t2.end()), qf(t.size()), ef(static_cast<std::size_t>(R));
  ssl::sinkhorn_knopp<float> skf({K, 3});
  skf.targets(cpu_policy{2}, host_view<const float>{tf.data(), {R, K}, "t"}, 0.05, host_view<float>{qf.data(), {R, K}, "q"},
              host_view<float>{ef.data(), {R}, "H"});
  vec qd(qf.begin(), qf.end());
  CHECK(rel_error(qd, q) < 1e-4);  // t2's float rounding (|t| ~ 240) moves t / tau by ~3e-4
}

TEST_CASE("sinkhorn_knopp: K = 1 and a batch of 1") {
  vec t{0.3, -1.2, 2.0}, q(3), ent(3);
  ssl::sinkhorn_knopp<double> one({1, 3});
  one.targets(cpu_policy{1}, cv{t.data(), {3, 1}, "t"}, 0.1, mv{q.data(), {3, 1}, "q"}, mv{ent.data(), {3}, "H"});
  for (double x : q) CHECK(x == doctest::Approx(1.0).epsilon(1e-14));
  for (double h : ent) CHECK(h == 0.0);
  // one sample: the prototype step makes every entry 1 / K
  ssl::sinkhorn_knopp<double> sk({3, 3});
  const double H = sk.targets(cpu_policy{1}, cv{t.data(), {1, 3}, "t"}, 0.1, mv{q.data(), {1, 3}, "q"}, mv{ent.data(), {1}, "H"});
  for (double x : q) CHECK(x == doctest::Approx(1.0 / 3.0).epsilon(1e-14));
  CHECK(H == doctest::Approx(std::log(3.0)).epsilon(1e-14));
}

TEST_CASE("sinkhorn_knopp: errors") {
  vec t(12, 0.1), q(12), ent(3);
  ssl::sinkhorn_knopp<double> sk({4, 3});
  CHECK_THROWS_WITH_AS(ssl::sinkhorn_knopp<double>({4, 0}), "sinkhorn_knopp: need at least 1 iteration, got 0", config_error);
  CHECK_THROWS_AS(ssl::sinkhorn_knopp<double>({0, 3}), config_error);
  CHECK_THROWS_WITH_AS(sk.targets(cpu_policy{1}, cv{t.data(), {4, 3}, "teacher logits"}, 0.1, mv{q.data(), {4, 3}, "q"},
                                  mv{ent.data(), {4}, "H"}),
                       "sinkhorn_knopp targets: teacher logits: expected shape [N, 4], found [4, 3]", shape_error);
  CHECK_THROWS_AS(sk.targets(cpu_policy{1}, cv{t.data(), {3, 4}, "t"}, 0.1, mv{q.data(), {4, 3}, "q"}, mv{ent.data(), {3}, "H"}),
                  shape_error);
  CHECK_THROWS_AS(sk.targets(cpu_policy{1}, cv{t.data(), {3, 4}, "t"}, 0.0, mv{q.data(), {3, 4}, "q"}, mv{ent.data(), {3}, "H"}),
                  config_error);
  t[5] = NAN;
  CHECK_THROWS_WITH_AS(sk.targets(cpu_policy{1}, cv{t.data(), {3, 4}, "t"}, 0.1, mv{q.data(), {3, 4}, "q"},
                                  mv{ent.data(), {3}, "H"}),
                       "sinkhorn_knopp targets: t [3, 4] holds a non-finite value (nan) at row 1, column 1", numeric_error);
  // a sample far below every prototype's best sample underflows: a clear error, not NaN targets
  vec u{0, 0, 0, 0, -100, -100, -100, -100, 0, 0, 0, 0};
  CHECK_THROWS_AS(sk.targets(cpu_policy{1}, cv{u.data(), {3, 4}, "t"}, 0.01, mv{q.data(), {3, 4}, "q"}, mv{ent.data(), {3}, "H"}),
                  numeric_error);
}

// ---- sharpen_only and raw_target -----------------------------------------------------------

TEST_CASE("sharpen_only is softmax(t / tau); raw_target passes t through") {
  const std::int64_t R = 4, K = 5;
  const double tau = 0.2;
  vec t(static_cast<std::size_t>(R * K)), q(t.size()), ent(static_cast<std::size_t>(R)), q2(t.size()), ent2(static_cast<std::size_t>(R));
  fill_normal(t, 21);
  ssl::sharpen_only<double> sh({K});
  ssl::raw_target<double> raw({K});
  const double H = sh.targets(cpu_policy{2}, cv{t.data(), {R, K}, "t"}, tau, mv{q.data(), {R, K}, "q"}, mv{ent.data(), {R}, "H"});
  const double H2 = raw.targets(cpu_policy{2}, cv{t.data(), {R, K}, "t"}, tau, mv{q2.data(), {R, K}, "q"}, mv{ent2.data(), {R}, "H"});
  double Href = 0;
  for (std::int64_t r = 0; r < R; ++r) {
    double mx = -1e300, z = 0, h = 0;
    for (std::int64_t k = 0; k < K; ++k) mx = std::max(mx, t[std::size_t(r * K + k)] / tau);
    for (std::int64_t k = 0; k < K; ++k) z += std::exp(t[std::size_t(r * K + k)] / tau - mx);
    for (std::int64_t k = 0; k < K; ++k) {
      const double p = std::exp(t[std::size_t(r * K + k)] / tau - mx) / z;
      CHECK(q[std::size_t(r * K + k)] == doctest::Approx(p).epsilon(1e-13));
      CHECK(q2[std::size_t(r * K + k)] == t[std::size_t(r * K + k)]);
      h -= p * std::log(p);
    }
    CHECK(ent2[std::size_t(r)] == doctest::Approx(h).epsilon(1e-12));
    Href += h / double(R);
  }
  CHECK(H == doctest::Approx(Href).epsilon(1e-12));
  CHECK(H2 == doctest::Approx(Href).epsilon(1e-12));
  CHECK_THROWS_WITH_AS(sh.targets(cpu_policy{1}, cv{t.data(), {R, K}, "t"}, -1.0, mv{q.data(), {R, K}, "q"},
                                  mv{ent.data(), {R}, "H"}),
                       "sharpen_only: teacher temperature must be positive, got -1", config_error);
  CHECK_THROWS_AS(raw.targets(cpu_policy{1}, cv{t.data(), {2, 3}, "t"}, tau, mv{q.data(), {2, 3}, "q"}, mv{ent.data(), {2}, "H"}),
                  shape_error);
  CHECK_THROWS_AS(ssl::raw_target<float>({0}), config_error);
}

// ---- MSE -----------------------------------------------------------------------------------

TEST_CASE("mse_distillation: 2 - 2 cos over crop pairs, value and gradient") {
  for (auto [V, G] : {std::pair{2, 2}, std::pair{5, 2}, std::pair{3, 1}}) {
    CAPTURE(V);
    CAPTURE(G);
    const std::int64_t B = 3, K = 6;
    vec s(static_cast<std::size_t>(V * B * K)), q(static_cast<std::size_t>(G * B * K)), ds;
    fill_normal(s, 31 + V);
    fill_normal(q, 41 + V, 3.0);  // raw teacher outputs of another scale: only directions count
    ssl::mse_distillation loss({V, G});
    const double L = fwd_bwd(loss, V, G, B, K, s, q, ds);
    CHECK(L == doctest::Approx(naive_mse(s, q, V, G, B, K)).epsilon(1e-13));
    auto g = fd_gradient([&] { return naive_mse(s, q, V, G, B, K); }, s.data(), s.size());
    CHECK(rel_error(ds, g) < 1e-7);
    // dloss scales; accumulate adds
    vec ds2(s.size(), 1.5);
    fwd_bwd(loss, V, G, B, K, s, q, ds2, -0.25, true);
    for (std::size_t i = 0; i < s.size(); ++i) REQUIRE(ds2[i] == doctest::Approx(1.5 - 0.25 * ds[i]).epsilon(1e-12));
    // forward alone
    vec row(static_cast<std::size_t>(V * B));
    CHECK(loss.forward(cpu_policy{1}, cv{s.data(), {V * B, K}, "s"}, cv{q.data(), {G * B, K}, "q"},
                       mv{row.data(), {V * B}, "row"}) == doctest::Approx(L).epsilon(1e-14));
  }
}

TEST_CASE("mse_distillation: K = 1, batch 1, identical and zero rows") {
  ssl::mse_distillation loss({2, 2});
  vec ds;
  // K = 1: directions are +-1, the loss is 0 or 4 per pair, and the gradient vanishes
  vec s{2.0, -3.0}, q{-1.0, -0.5};
  CHECK(fwd_bwd(loss, 2, 2, 1, 1, s, q, ds) == doctest::Approx((4.0 + 0.0) / 2.0));
  CHECK(std::fabs(ds[0]) < 1e-15);
  CHECK(std::fabs(ds[1]) < 1e-15);
  // student equal to the swapped teacher: loss 0, gradient 0
  vec s2{1, 2, 3, 4, 5, 6}, q2{4, 5, 6, 1, 2, 3};
  CHECK(fwd_bwd(loss, 2, 2, 1, 3, s2, q2, ds) == doctest::Approx(0.0).scale(1.0));
  for (double x : ds) CHECK(std::fabs(x) < 1e-14);
  // a zero student row stays finite (normalised by max(||s||, 1e-12), as F.normalize)
  vec s3{0, 0, 0, 1, 1, 1}, q3{1, 0, 0, 0, 1, 0};
  const double L = fwd_bwd(loss, 2, 2, 1, 3, s3, q3, ds);
  CHECK(L == doctest::Approx((2.0 + (2.0 - 2.0 / std::sqrt(3.0))) / 2.0));
  for (double x : ds) CHECK(std::isfinite(x));
  CHECK(ds[0] == doctest::Approx(-2.0 / 2.0 * 0.0 / 1e-12).scale(1.0));  // Q = e_1 for row 0: d/ds_0 ∝ Q_0 = 0
  CHECK(ds[1] == doctest::Approx(-1.0 / 1e-12));
}

TEST_CASE("mse_distillation: errors") {
  CHECK_THROWS_WITH_AS(ssl::mse_distillation({1, 1}),
                       "mse_distillation: need 1 <= n_global <= min(8, n_crops) and n_crops >= 2, got n_global=1 n_crops=1",
                       config_error);
  CHECK_THROWS_AS(ssl::mse_distillation({3, 4}), config_error);
  ssl::mse_distillation loss({3, 2});
  vec s(7 * 4), q(4 * 4), row(7), ds(s.size());
  CHECK_THROWS_WITH_AS(loss.forward(cpu_policy{1}, cv{s.data(), {7, 4}, "student"}, cv{q.data(), {4, 4}, "teacher"},
                                    mv{row.data(), {7}, "row"}),
                       "mse_distillation: student has 7 rows, which is not a multiple of the crop count 3", shape_error);
  CHECK_THROWS_WITH_AS(loss.forward(cpu_policy{1}, cv{s.data(), {6, 4}, "student"}, cv{q.data(), {3, 4}, "teacher"},
                                    mv{row.data(), {6}, "row"}),
                       "mse_distillation: teacher: expected 4 rows (2 global crops x batch 2), found 3", shape_error);
  CHECK_THROWS_AS(loss.forward(cpu_policy{1}, cv{s.data(), {6, 4}, "student"}, cv{q.data(), {4, 3}, "teacher"},
                               mv{row.data(), {6}, "row"}),
                  shape_error);
  CHECK_THROWS_AS(loss.forward_backward(cpu_policy{1}, cv{s.data(), {6, 4}, "s"}, cv{q.data(), {4, 4}, "q"},
                                        mv{row.data(), {6}, "row"}, mv{ds.data(), {6, 3}, "ds"}, 1.0, false),
                  shape_error);
  s[3] = INFINITY;
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = 1.0;
  CHECK_THROWS_WITH_AS(loss.forward(cpu_policy{1}, cv{s.data(), {6, 4}, "student"}, cv{q.data(), {4, 4}, "teacher"},
                                    mv{row.data(), {6}, "row"}),
                       "mse_distillation: student [6, 4] holds a non-finite value (inf) at row 0, column 3", numeric_error);
}

// ---- InfoNCE -------------------------------------------------------------------------------

TEST_CASE("info_nce: MoCo's loss against a queue, value and gradient") {
  for (auto [V, G] : {std::pair{2, 2}, std::pair{4, 2}, std::pair{3, 1}}) {
    CAPTURE(V);
    CAPTURE(G);
    const std::int64_t B = 3, K = 5, Mq = 7;
    const double tau = 0.2;
    ssl::info_nce<double> loss({V, G, K, Mq, tau});
    vec keys(static_cast<std::size_t>(5 * K));
    fill_normal(keys, 50 + V);
    loss.observe(cpu_policy{1}, cv{keys.data(), {5, K}, "keys"});
    CHECK(loss.pending_rows() == 5);
    CHECK(loss.queued() == 0);
    loss.commit();
    CHECK(loss.queued() == 5);
    CHECK(loss.head() == 5);
    std::vector<vec> queue;
    for (int j = 0; j < 5; ++j) queue.emplace_back(keys.begin() + j * K, keys.begin() + (j + 1) * K);
    vec s(static_cast<std::size_t>(V * B * K)), q(static_cast<std::size_t>(G * B * K)), ds;
    fill_normal(s, 60 + V);
    fill_normal(q, 70 + V, 2.0);
    const double L = fwd_bwd(loss, V, G, B, K, s, q, ds);
    CHECK(L == doctest::Approx(naive_info_nce(s, q, queue, V, G, B, K, tau)).epsilon(1e-13));
    auto g = fd_gradient([&] { return naive_info_nce(s, q, queue, V, G, B, K, tau); }, s.data(), s.size());
    CHECK(rel_error(ds, g) < 1e-7);
    vec ds2(s.size(), -1.0);
    fwd_bwd(loss, V, G, B, K, s, q, ds2, 0.5, true, 1);
    for (std::size_t i = 0; i < s.size(); ++i) REQUIRE(ds2[i] == doctest::Approx(-1.0 + 0.5 * ds[i]).epsilon(1e-12));
  }
}

TEST_CASE("info_nce: the queue empty, filling, full and wrapping; discard; observe then commit") {
  const std::int64_t K = 3, Mq = 5, B = 2;
  ssl::info_nce<double> loss({2, 2, K, Mq, 0.5});
  vec s(static_cast<std::size_t>(2 * B * K)), q(s.size()), ds;
  fill_normal(s, 81);
  fill_normal(q, 82);
  // empty: only the positive; the loss is 0 and so is the gradient
  CHECK(fwd_bwd(loss, 2, 2, B, K, s, q, ds) == 0.0);
  for (double x : ds) CHECK(x == 0.0);
  // discarded rows never reach the queue
  loss.observe(cpu_policy{1}, cv{q.data(), {2 * B, K}, "t"});
  loss.discard();
  loss.commit();
  CHECK(loss.queued() == 0);
  // 7 keys into a queue of 5, in two commits (4 then 3): rows wrap, the oldest go
  vec keys(static_cast<std::size_t>(7 * K));
  fill_normal(keys, 83);
  loss.observe(cpu_policy{1}, cv{keys.data(), {4, K}, "t"});
  CHECK(fwd_bwd(loss, 2, 2, B, K, s, q, ds) == 0.0);  // the pending rows are not negatives yet
  loss.commit();
  CHECK(loss.queued() == 4);
  CHECK(loss.head() == 4);
  loss.observe(cpu_policy{1}, cv{keys.data() + 4 * K, {2, K}, "t"});  // two micro-batches, one commit
  loss.observe(cpu_policy{1}, cv{keys.data() + 6 * K, {1, K}, "t"});
  loss.commit();
  CHECK(loss.queued() == 5);
  CHECK(loss.head() == 2);
  // ring rows: 0 <- key 5, 1 <- key 6, 2..4 <- keys 2..4 (normalised)
  const int expect[5] = {5, 6, 2, 3, 4};
  std::vector<vec> queue;
  for (int j = 0; j < 5; ++j) {
    const vec n = normalized(&keys[std::size_t(expect[j] * K)], K);
    for (std::int64_t k = 0; k < K; ++k) CHECK(loss.queue()[j * K + k] == doctest::Approx(n[std::size_t(k)]).epsilon(1e-15));
    queue.push_back(n);
  }
  const double L = fwd_bwd(loss, 2, 2, B, K, s, q, ds);
  CHECK(L == doctest::Approx(naive_info_nce(s, q, queue, 2, 2, B, K, 0.5)).epsilon(1e-13));
  // more rows than the queue in one commit: the last 5 remain
  vec many(static_cast<std::size_t>(12 * K));
  fill_normal(many, 84);
  loss.observe(cpu_policy{1}, cv{many.data(), {12, K}, "t"});
  loss.commit();
  CHECK(loss.queued() == 5);
  CHECK(loss.head() == (2 + 12) % 5);
  for (int r = 7; r < 12; ++r) {
    const vec n = normalized(&many[std::size_t(r * K)], K);
    const std::int64_t j = (2 + r) % 5;
    CHECK(loss.queue()[j * K] == doctest::Approx(n[0]).epsilon(1e-15));
  }
  // MoCo's random start: a full queue of unit vectors
  ssl::info_nce<float> moco({2, 2, 16, 64, 0.2});
  moco.fill_random(1);
  CHECK(moco.queued() == 64);
  for (std::int64_t j = 0; j < 64; ++j) {
    double n = 0;
    for (std::int64_t k = 0; k < 16; ++k) n += double(moco.queue()[j * 16 + k]) * double(moco.queue()[j * 16 + k]);
    CHECK(n == doctest::Approx(1.0).epsilon(1e-6));
  }
  moco.clear();
  CHECK(moco.queued() == 0);
}

TEST_CASE("info_nce: float against double (the GEMM path), K = 1 and batch 1") {
  const std::int64_t B = 4, K = 32, Mq = 40;
  ssl::info_nce<double> ld({3, 2, K, Mq, 0.2});
  ssl::info_nce<float> lf({3, 2, K, Mq, 0.2});
  vec keys(static_cast<std::size_t>(Mq * K)), s(static_cast<std::size_t>(3 * B * K)), q(static_cast<std::size_t>(2 * B * K)), ds;
  fill_normal(keys, 91);
  fill_normal(s, 92);
  fill_normal(q, 93);
  std::vector<float> kf(keys.begin(), keys.end()), sf(s.begin(), s.end()), qf(q.begin(), q.end()), dsf(s.size()),
      rowf(static_cast<std::size_t>(3 * B));
  ld.observe(cpu_policy{1}, cv{keys.data(), {Mq, K}, "t"});
  ld.commit();
  lf.observe(cpu_policy{1}, host_view<const float>{kf.data(), {Mq, K}, "t"});
  lf.commit();
  const double L = fwd_bwd(ld, 3, 2, B, K, s, q, ds);
  const double Lf = lf.forward_backward(cpu_policy{2}, host_view<const float>{sf.data(), {3 * B, K}, "s"},
                                        host_view<const float>{qf.data(), {2 * B, K}, "q"},
                                        host_view<float>{rowf.data(), {3 * B}, "row"},
                                        host_view<float>{dsf.data(), {3 * B, K}, "ds"}, 1.0, false);
  CHECK(Lf == doctest::Approx(L).epsilon(1e-6));
  CHECK(rel_error(vec(dsf.begin(), dsf.end()), ds) < 1e-5);
  // K = 1: every key is +-1; batch 1
  ssl::info_nce<double> one({2, 2, 1, 3, 0.2});
  vec k1{2.0, -1.0, 0.5};
  one.observe(cpu_policy{1}, cv{k1.data(), {3, 1}, "t"});
  one.commit();
  vec s1{1.5, -0.3}, q1{0.7, 0.2};
  std::vector<vec> queue{{1.0}, {-1.0}, {1.0}};
  CHECK(fwd_bwd(one, 2, 2, 1, 1, s1, q1, ds) == doctest::Approx(naive_info_nce(s1, q1, queue, 2, 2, 1, 1, 0.2)).epsilon(1e-13));
}

TEST_CASE("info_nce: errors") {
  CHECK_THROWS_WITH_AS(ssl::info_nce<float>({2, 2, 8, 0, 0.2}), "info_nce: queue_size must be positive, got 0", config_error);
  CHECK_THROWS_AS(ssl::info_nce<float>({2, 2, 0, 8, 0.2}), config_error);
  CHECK_THROWS_WITH_AS(ssl::info_nce<float>({2, 2, 8, 8, 0.0}), "info_nce: temperature must be positive, got 0", config_error);
  CHECK_THROWS_AS(ssl::info_nce<float>({2, 3, 8, 8, 0.2}), config_error);
  ssl::info_nce<double> loss({2, 2, 4, 8, 0.2});
  vec s(4 * 5), q(4 * 5), row(4), ds(s.size());
  CHECK_THROWS_WITH_AS(loss.forward(cpu_policy{1}, cv{s.data(), {4, 5}, "student"}, cv{q.data(), {4, 5}, "teacher"},
                                    mv{row.data(), {4}, "row"}),
                       "info_nce: student has K = 5 but the queue holds keys of dim 4", shape_error);
  CHECK_THROWS_WITH_AS(loss.observe(cpu_policy{1}, cv{q.data(), {4, 5}, "teacher logits"}),
                       "info_nce observe: teacher logits: expected shape [N, 4], found [4, 5]", shape_error);
  CHECK_THROWS_AS(loss.forward(cpu_policy{1}, cv{s.data(), {4, 4}, "student"}, cv{q.data(), {2, 4}, "teacher"},
                               mv{row.data(), {4}, "row"}),
                  shape_error);
  CHECK_THROWS_WITH_AS(loss.set_state(3, 1),
                       "info_nce: a queue that is not full fills from row 0, so head must equal queued (got head=1, queued=3)",
                       config_error);
  CHECK_THROWS_AS(loss.set_state(9, 0), config_error);
  loss.set_state(8, 3);
  CHECK(loss.queued() == 8);
  q[2] = NAN;
  CHECK_THROWS_WITH_AS(loss.forward(cpu_policy{1}, cv{s.data(), {4, 4}, "student"}, cv{q.data(), {4, 4}, "teacher"},
                                    mv{row.data(), {4}, "row"}),
                       "info_nce: teacher [4, 4] holds a non-finite value (nan) at row 0, column 2", numeric_error);
  CHECK_THROWS_AS(loss.observe(cpu_policy{1}, cv{q.data(), {4, 4}, "t"}), numeric_error);
}

// ---- NT-Xent -------------------------------------------------------------------------------

TEST_CASE("nt_xent: SimCLR over in-batch negatives, value and gradient to every row") {
  for (auto [V, G] : {std::pair{2, 2}, std::pair{4, 2}, std::pair{3, 1}}) {
    CAPTURE(V);
    CAPTURE(G);
    const std::int64_t B = 3, K = 5;
    const double tau = 0.3;
    ssl::nt_xent<double> loss({V, G, tau});
    vec s(static_cast<std::size_t>(V * B * K)), q, ds;
    fill_normal(s, 100 + V);
    const double L = fwd_bwd(loss, V, G, B, K, s, q, ds);
    CHECK(L == doctest::Approx(naive_nt_xent(s, V, G, B, K, tau)).epsilon(1e-13));
    auto g = fd_gradient([&] { return naive_nt_xent(s, V, G, B, K, tau); }, s.data(), s.size());
    CHECK(rel_error(ds, g) < 1e-7);
    vec ds2(s.size(), 0.25);
    fwd_bwd(loss, V, G, B, K, s, q, ds2, 2.0, true, 1);
    for (std::size_t i = 0; i < s.size(); ++i) REQUIRE(ds2[i] == doctest::Approx(0.25 + 2.0 * ds[i]).epsilon(1e-12));
  }
}

TEST_CASE("nt_xent: with 2 crops it is SimCLR's loss (TF code's (loss_a + loss_b) / 2)") {
  const std::int64_t B = 4, K = 6;
  const double tau = 0.1;
  vec s(static_cast<std::size_t>(2 * B * K)), ds;
  fill_normal(s, 111);
  ssl::nt_xent<double> loss({2, 2, tau});
  const double L = fwd_bwd(loss, 2, 2, B, K, s, {}, ds);
  // add_contrastive_loss: logits_ab = h1 h2^T / tau, logits_aa = h1 h1^T / tau - inf * I
  auto h = [&](int view, std::int64_t b) { return normalized(&s[std::size_t((view * B + b) * K)], K); };
  double la = 0, lb = 0;
  for (int dir = 0; dir < 2; ++dir)
    for (std::int64_t b = 0; b < B; ++b) {
      vec l;
      for (std::int64_t k = 0; k < B; ++k) l.push_back(dotv(h(dir, b), h(1 - dir, k)) / tau);  // ab
      for (std::int64_t k = 0; k < B; ++k)
        if (k != b) l.push_back(dotv(h(dir, b), h(dir, k)) / tau);  // aa without the diagonal
      double z = 0;
      for (double x : l) z += std::exp(x);
      (dir == 0 ? la : lb) += (std::log(z) - l[std::size_t(b)]) / double(B);
    }
  CHECK(L == doctest::Approx((la + lb) / 2.0).epsilon(1e-13));
}

TEST_CASE("nt_xent: batch 1, K = 1, float against double, errors") {
  ssl::nt_xent<double> loss({2, 2, 0.5});
  vec ds;
  // batch 1 with 2 crops: the positive is the only other row, so the loss is 0
  vec s{0.3, -1.0, 2.0, 0.5};
  CHECK(fwd_bwd(loss, 2, 2, 1, 2, s, {}, ds) == doctest::Approx(0.0).scale(1.0));
  for (double x : ds) CHECK(std::fabs(x) < 1e-15);
  // K = 1
  vec s1{1.0, -2.0, 0.5, 3.0};
  CHECK(fwd_bwd(loss, 2, 2, 2, 1, s1, {}, ds) == doctest::Approx(naive_nt_xent(s1, 2, 2, 2, 1, 0.5)).epsilon(1e-13));
  // float through the GEMMs
  const std::int64_t B = 8, K = 24;
  vec sd(static_cast<std::size_t>(4 * B * K));
  fill_normal(sd, 121);
  std::vector<float> sf(sd.begin(), sd.end()), dsf(sd.size()), rowf(static_cast<std::size_t>(4 * B));
  ssl::nt_xent<double> l4({4, 2, 0.1});
  ssl::nt_xent<float> l4f({4, 2, 0.1});
  const double L = fwd_bwd(l4, 4, 2, B, K, sd, {}, ds);
  const double Lf = l4f.forward_backward(cpu_policy{2}, host_view<const float>{sf.data(), {4 * B, K}, "s"},
                                         host_view<const float>{}, host_view<float>{rowf.data(), {4 * B}, "row"},
                                         host_view<float>{dsf.data(), {4 * B, K}, "ds"}, 1.0, false);
  CHECK(Lf == doctest::Approx(L).epsilon(1e-6));
  CHECK(rel_error(vec(dsf.begin(), dsf.end()), ds) < 1e-5);
  // errors
  CHECK_THROWS_WITH_AS(ssl::nt_xent<float>({2, 2, -0.1}), "nt_xent: temperature must be positive, got -0.1", config_error);
  CHECK_THROWS_AS(ssl::nt_xent<float>({1, 1, 0.1}), config_error);
  vec row(3);
  CHECK_THROWS_WITH_AS(loss.forward(cpu_policy{1}, cv{s.data(), {3, 1}, "student"}, cv{}, mv{row.data(), {3}, "row"}),
                       "nt_xent: student has 3 rows, which is not a multiple of the crop count 2", shape_error);
  CHECK_THROWS_AS(loss.forward(cpu_policy{1}, cv{s.data(), {2, 2}, "student"}, cv{}, mv{row.data(), {3}, "row"}), shape_error);
  s[1] = NAN;
  CHECK_THROWS_WITH_AS(loss.forward(cpu_policy{1}, cv{s.data(), {2, 2}, "student"}, cv{}, mv{row.data(), {2}, "row"}),
                       "nt_xent: student [2, 2] holds a non-finite value (nan) at row 0, column 1", numeric_error);
}

// ---- assembly ------------------------------------------------------------------------------

namespace {
// A few crop-major rows of 3 Gaussian clusters (2 global crops sigma 0.3, then local 0.6).
std::vector<float> cluster_crops(std::int64_t b, int n_crops, std::uint64_t step, std::int64_t in) {
  std::vector<float> centers(static_cast<std::size_t>(3 * in)), x(static_cast<std::size_t>(n_crops * b * in));
  fill_normal(centers, 5);
  philox g(7, step);
  for (int v = 0; v < n_crops; ++v)
    for (std::int64_t i = 0; i < b; ++i)
      for (std::int64_t d = 0; d < in; ++d)
        x[std::size_t((v * b + i) * in + d)] = centers[std::size_t((i % 3) * in + d)] + float(g.normal() * (v < 2 ? 0.3 : 0.6));
  return x;
}

template <class Target, class Loss>
void train_a_few_steps(Target target, Loss loss, int n_crops) {
  using M = ssl::method<nn::mlp, ssl::dino_head, Target, Loss, ssl::ema_update>;
  const std::int64_t B = 4, in = 8;
  ssl::train_config tc;
  tc.max_batch = B;
  tc.schedule.epochs = 1;
  tc.schedule.iters_per_epoch = 4;
  tc.schedule.batch_size = B;
  tc.schedule.lr = 0.01;
  tc.schedule.warmup_epochs = 0;
  tc.freeze_last_layer = 0;
  nn::mlp_config bc{{in, 32, 16}, false};
  bc.weight_init = param_init::kaiming_uniform;
  M m(bc, ssl::dino_head_config{16, 32, 32, 8, 2, true}, std::move(target), std::move(loss), ssl::ema_update{}, tc);
  for (int it = 0; it < 4; ++it) {
    auto x = cluster_crops(B, n_crops, std::uint64_t(it), in);
    auto st = m.step(cpu_policy{2}, host_view<const float>{x.data(), {n_crops * B, in}, "crops"});
    CHECK_FALSE(st.skipped);
    CHECK(std::isfinite(st.loss));
  }
}
}  // namespace

TEST_CASE("the variant parts assemble into ssl::method and train (today's method interface)") {
  const std::int64_t K = 32;
  SUBCASE("Sinkhorn-Knopp targets + cross-entropy (Table 7 row 3 / SwAV without the momentum)") {
    train_a_few_steps(ssl::sinkhorn_knopp<float>({K, 3}), ssl::cross_entropy_distillation({4, 2, 0.1}), 4);
  }
  SUBCASE("sharpening only + cross-entropy") {
    train_a_few_steps(ssl::sharpen_only<float>({K}), ssl::cross_entropy_distillation({4, 2, 0.1}), 4);
  }
  SUBCASE("raw teacher outputs + MSE (row 5)") {
    train_a_few_steps(ssl::raw_target<float>({K}), ssl::mse_distillation({4, 2}), 4);
  }
  SUBCASE("raw teacher outputs + InfoNCE with MoCo's random queue (no queue update: the method does not call it yet)") {
    ssl::info_nce<float> l({2, 2, K, 64, 0.2});
    l.fill_random(3);
    train_a_few_steps(ssl::raw_target<float>({K}), std::move(l), 2);
  }
  SUBCASE("NT-Xent (the teacher runs but is not read)") {
    train_a_few_steps(ssl::raw_target<float>({K}), ssl::nt_xent<float>({2, 2, 0.1}), 2);
  }
}

// ---- attention_mask (ssl/student_mask.hpp) ----------------------------------------------------

namespace {
// The kept patches by brute force: every pair of patches compared, a patch kept when fewer than
// k patches rank before it (higher summed attention, or equal and a lower index).
std::vector<std::int64_t> kept_brute(const std::vector<float>& a, std::int64_t heads, std::int64_t n, std::int64_t k) {
  std::vector<std::int64_t> out;
  for (std::size_t c = 0; c < a.size() / std::size_t(heads * (1 + n)); ++c) {
    std::vector<double> s(std::size_t(n), 0.0);
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t h = 0; h < heads; ++h) s[std::size_t(j)] += a[c * std::size_t(heads * (1 + n)) + std::size_t(h * (1 + n) + 1 + j)];
    for (std::int64_t j = 0; j < n; ++j) {
      std::int64_t before = 0;
      for (std::int64_t i = 0; i < n; ++i)
        before += s[std::size_t(i)] > s[std::size_t(j)] || (s[std::size_t(i)] == s[std::size_t(j)] && i < j);
      if (before < k) out.push_back(j);
    }
  }
  return out;
}
}  // namespace

TEST_CASE("attention_mask: the rounding rule, the selection against brute force, ties, NaN, errors") {
  // kept(N) = max(1, N - floor(ratio N + 1e-9))
  CHECK(ssl::attention_mask({0.0}).kept(49) == 49);
  CHECK(ssl::attention_mask({0.3}).kept(10) == 7);   // 0.3 * 10 = 3.0000000000000004
  CHECK(ssl::attention_mask({0.29}).kept(100) == 71);  // 0.29 * 100 = 28.999999999999996
  CHECK(ssl::attention_mask({0.3}).kept(49) == 35);
  CHECK(ssl::attention_mask({0.5}).kept(9) == 5);
  CHECK(ssl::attention_mask({0.99}).kept(3) == 1);
  CHECK(ssl::attention_mask({0.999999}).kept(1) == 1);
  CHECK(ssl::attention_mask().config().ratio == 0.3);
  for (double bad : {-0.1, 1.0, 1.5, std::nan("")})
    CHECK_THROWS_WITH_AS(ssl::attention_mask({bad}), doctest::Contains("attention_mask: ratio must be in [0, 1)"),
                         config_error);
  const cpu_policy pol{1};
  for (std::int64_t n : {1, 5, 16, 49}) {
    for (double ratio : {0.0, 0.25, 0.3, 0.5, 0.9}) {
      CAPTURE(n);
      CAPTURE(ratio);
      const std::int64_t heads = 3, crops = 4;
      std::vector<float> a(std::size_t(crops * heads * (1 + n)));
      dino_test::fill_normal(a, std::uint64_t(n * 100 + std::int64_t(ratio * 10)));
      for (auto& x : a) x = std::round(x * 4) / 4;  // coarse values: many ties
      for (std::int64_t j = 0; j <= n; ++j) a[std::size_t(heads * (1 + n) + j)] = 0.5f;  // crop 1, head 0: flat
      ssl::attention_mask m({ratio});
      const std::int64_t k = m.kept(n);
      std::vector<std::int64_t> keep(std::size_t(crops * k), -1);
      m.select(pol, host_view<const float>{a.data(), {crops, heads * (1 + n)}, "attention"}, heads, n, keep.data());
      CHECK(keep == kept_brute(a, heads, n, k));
    }
  }
  // every score equal: the lowest indices; a NaN score ranks last
  std::vector<float> a(2 * 7, 0.125f);
  a[2] = std::nanf("");
  std::vector<std::int64_t> keep(3);
  ssl::attention_mask m({0.5});
  m.select(pol, host_view<const float>{a.data(), {1, 2 * 7}, "attention"}, 2, 6, keep.data());
  CHECK(keep == std::vector<std::int64_t>{0, 2, 3});  // patch 1 (column 2) is NaN
  CHECK_THROWS_AS(m.select(pol, host_view<const float>{a.data(), {1, 14}, "attention"}, 2, 5, keep.data()), shape_error);
}
