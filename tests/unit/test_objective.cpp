// The DINO objective: teacher targets with centering, the multi-crop distillation loss and
// its gradient, the center update (also under accumulation), diagnostics, EMA, AdamW with
// parameter groups, per-tensor clipping and the schedules.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include <dino/dino.hpp>

#include "gradcheck.hpp"

using namespace dino;
using dino_test::fd_gradient;
using dino_test::fill_normal;
using dino_test::rel_error;

namespace {
// The reference's loss written as directly as possible (dino-spec §3.2), in double.
double naive_dino_loss(const std::vector<double>& s, const std::vector<double>& t, const std::vector<double>& c,
                       int V, int G, std::int64_t B, int K, double tau_s, double tau_t) {
  auto row_logsoftmax = [&](const double* x, const double* cen, double tau) {
    std::vector<double> y(static_cast<std::size_t>(K));
    double mx = -1e300;
    for (int k = 0; k < K; ++k) mx = std::max(mx, (x[k] - (cen ? cen[k] : 0)) / tau);
    double z = 0;
    for (int k = 0; k < K; ++k) z += std::exp((x[k] - (cen ? cen[k] : 0)) / tau - mx);
    for (int k = 0; k < K; ++k) y[std::size_t(k)] = (x[k] - (cen ? cen[k] : 0)) / tau - mx - std::log(z);
    return y;
  };
  double total = 0;
  int terms = 0;
  for (int iq = 0; iq < G; ++iq)
    for (int v = 0; v < V; ++v) {
      if (v == iq) continue;
      double term = 0;
      for (std::int64_t b = 0; b < B; ++b) {
        auto lq = row_logsoftmax(&t[std::size_t((iq * B + b) * K)], c.data(), tau_t);
        auto ls = row_logsoftmax(&s[std::size_t((v * B + b) * K)], nullptr, tau_s);
        for (int k = 0; k < K; ++k) term -= std::exp(lq[std::size_t(k)]) * ls[std::size_t(k)];
      }
      total += term / double(B);
      ++terms;
    }
  return total / terms;
}
}  // namespace

TEST_CASE("DINO loss over 2 global + 3 local crops: value and gradient to the student logits") {
  const int V = 5, G = 2, K = 11;
  const std::int64_t B = 3;
  const double tau_t = 0.05, tau_s = 0.1;
  const cpu_policy pol{2};
  std::vector<double> s(std::size_t(V * B * K)), t(std::size_t(G * B * K)), q(t.size()), ent(std::size_t(G * B)),
      row(std::size_t(V * B)), ds(s.size());
  fill_normal(s, 1);
  fill_normal(t, 2, 0.1);
  ssl::centering<double> cen({K, 0.9});
  auto c = cen.center();
  std::vector<double> cvec(static_cast<std::size_t>(K));
  fill_normal(cvec, 3, 0.05);
  std::copy(cvec.begin(), cvec.end(), c.data);
  ssl::cross_entropy_distillation loss({V, G, tau_s});
  CHECK(loss.n_terms() == 8);

  const double H = cen.targets(pol, host_view<const double>{t.data(), {G * B, K}, "teacher logits"}, tau_t,
                               host_view<double>{q.data(), {G * B, K}, "q"}, host_view<double>{ent.data(), {G * B}, "H"});
  // targets are softmax((t - c) / tau_t); H is their mean entropy
  double Href = 0;
  for (std::int64_t r = 0; r < G * B; ++r) {
    double z = 0, mx = -1e300;
    for (int k = 0; k < K; ++k) mx = std::max(mx, (t[std::size_t(r * K + k)] - cvec[std::size_t(k)]) / tau_t);
    for (int k = 0; k < K; ++k) z += std::exp((t[std::size_t(r * K + k)] - cvec[std::size_t(k)]) / tau_t - mx);
    for (int k = 0; k < K; ++k) {
      const double p = std::exp((t[std::size_t(r * K + k)] - cvec[std::size_t(k)]) / tau_t - mx) / z;
      REQUIRE(q[std::size_t(r * K + k)] == doctest::Approx(p).epsilon(1e-12));
      Href -= p * std::log(p) / double(G * B);
    }
  }
  CHECK(H == doctest::Approx(Href).epsilon(1e-12));

  host_view<const double> qv{q.data(), {G * B, K}, "teacher targets"};
  const double L = loss.forward_backward(pol, host_view<const double>{s.data(), {V * B, K}, "student logits"}, qv,
                                         host_view<double>{row.data(), {V * B}, "row"},
                                         host_view<double>{ds.data(), {V * B, K}, "ds"}, 1.0, false);
  CHECK(L == doctest::Approx(naive_dino_loss(s, t, cvec, V, G, B, K, tau_s, tau_t)).epsilon(1e-12));
  CHECK(loss.forward(pol, host_view<const double>{s.data(), {V * B, K}, "s"}, qv,
                     host_view<double>{row.data(), {V * B}, "row"}) == doctest::Approx(L).epsilon(1e-14));

  auto f = [&] { return naive_dino_loss(s, t, cvec, V, G, B, K, tau_s, tau_t); };
  auto g = fd_gradient(f, s.data(), s.size());
  CHECK(rel_error(ds, g) < 1e-7);

  // dloss scales the gradient; accumulate adds to what is there
  std::vector<double> ds2(s.size(), 2.0);
  loss.forward_backward(pol, host_view<const double>{s.data(), {V * B, K}, "s"}, qv,
                        host_view<double>{row.data(), {V * B}, "row"}, host_view<double>{ds2.data(), {V * B, K}, "ds"},
                        0.5, true);
  for (std::size_t i = 0; i < s.size(); ++i) REQUIRE(ds2[i] == doctest::Approx(2.0 + 0.5 * ds[i]).epsilon(1e-12));

  // KL(teacher || student) = CE - H >= 0 here, and the pair-averaged entropy is the mean entropy
  auto d = ssl::diagnose(L, H, K);
  CHECK(d.kl == doctest::Approx(L - H));
  CHECK(d.kl > 0);
  CHECK_FALSE(d.collapsed);
}

TEST_CASE("DINO loss with 2 global crops only pairs them crosswise (2 terms)") {
  const int K = 7;
  const std::int64_t B = 2;
  ssl::cross_entropy_distillation loss({2, 2, 0.1});
  CHECK(loss.n_terms() == 2);
  std::vector<double> s(std::size_t(2 * B * K)), q(s.size()), row(std::size_t(2 * B)), ds(s.size());
  fill_normal(s, 4);
  fill_normal(q, 5);
  for (std::int64_t r = 0; r < 2 * B; ++r)
    math::softmax_row(&q[std::size_t(r * K)], static_cast<const double*>(nullptr), &q[std::size_t(r * K)], K, 1.0);
  const double L = loss.forward_backward(cpu_policy{1}, host_view<const double>{s.data(), {2 * B, K}, "s"},
                                         host_view<const double>{q.data(), {2 * B, K}, "q"},
                                         host_view<double>{row.data(), {2 * B}, "row"},
                                         host_view<double>{ds.data(), {2 * B, K}, "ds"}, 1.0, false);
  // teacher 0 with student crop 1 and teacher 1 with student crop 0
  double ref = 0;
  for (auto [iq, v] : {std::pair{0, 1}, std::pair{1, 0}})
    for (std::int64_t b = 0; b < B; ++b) {
      std::vector<double> lp(static_cast<std::size_t>(K));
      math::log_softmax_row(&s[std::size_t((v * B + b) * K)], static_cast<const double*>(nullptr), lp.data(), K, 10.0);
      ref += math::soft_cross_entropy_row(&q[std::size_t((iq * B + b) * K)], lp.data(), K) / double(B) / 2.0;
    }
  CHECK(L == doctest::Approx(ref).epsilon(1e-12));
}

TEST_CASE("uniform outputs sit at ln K and raise the collapse flag") {
  const int K = 64, V = 4;
  const std::int64_t B = 2;
  std::vector<float> s(std::size_t(V * B * K), 0.3f), t(std::size_t(2 * B * K), -0.2f), q(t.size()), ent(std::size_t(2 * B)),
      row(std::size_t(V * B));
  ssl::centering<float> cen({K, 0.9});
  const double H = cen.targets(cpu_policy{1}, host_view<const float>{t.data(), {2 * B, K}, "t"}, 0.04,
                               host_view<float>{q.data(), {2 * B, K}, "q"}, host_view<float>{ent.data(), {2 * B}, "H"});
  ssl::cross_entropy_distillation loss({V, 2, 0.1});
  const double L = loss.forward(cpu_policy{1}, host_view<const float>{s.data(), {V * B, K}, "s"},
                                host_view<const float>{q.data(), {2 * B, K}, "q"}, host_view<float>{row.data(), {V * B}, "r"});
  CHECK(L == doctest::Approx(std::log(64.0)).epsilon(1e-6));
  CHECK(H == doctest::Approx(std::log(64.0)).epsilon(1e-6));
  auto d = ssl::diagnose(L, H, K);
  CHECK(d.collapsed);
  CHECK(std::fabs(d.kl) < 1e-5);
}

TEST_CASE("center update: EMA of the batch mean, exact under gradient accumulation") {
  const int K = 6;
  const std::int64_t R = 8;
  std::vector<double> t(std::size_t(R * K));
  fill_normal(t, 6);
  ssl::centering<double> one({K, 0.9}), two({K, 0.9});
  for (auto* c : {&one, &two}) {
    auto cv = c->center();
    for (int k = 0; k < K; ++k) cv[k] = 0.1 * k;
  }
  const cpu_policy pol{2};
  one.observe(pol, host_view<const double>{t.data(), {R, K}, "t"});
  CHECK(one.pending_rows() == R);
  one.commit();
  CHECK(one.pending_rows() == 0);
  // two micro-batches of 4 rows, one commit
  two.observe(pol, host_view<const double>{t.data(), {4, K}, "t"});
  two.observe(pol, host_view<const double>{t.data() + 4 * K, {4, K}, "t"});
  two.commit();
  for (int k = 0; k < K; ++k) {
    double mean = 0;
    for (std::int64_t r = 0; r < R; ++r) mean += t[std::size_t(r * K + k)] / double(R);
    CHECK(one.center()[k] == doctest::Approx(0.9 * 0.1 * k + 0.1 * mean).epsilon(1e-14));
    CHECK(two.center()[k] == doctest::Approx(one.center()[k]).epsilon(1e-14));
  }
  // a discarded update leaves the center alone
  const double before = one.center()[2];
  one.observe(pol, host_view<const double>{t.data(), {R, K}, "t"});
  one.discard();
  one.commit();
  CHECK(one.center()[2] == before);
}

TEST_CASE("EMA and copy teacher updates over flat buffers") {
  param_layout L;
  L.add("a", {10, 3}, param_none, param_init::trunc_normal, 1.0);
  L.add("g", {4, 1}, param_frozen, param_init::trunc_normal, 1.0);
  flat_params<float> s(L), t(L);
  nn::initialize(s, 1);
  nn::initialize(t, 2);
  flat_params<float> t0(L);
  t0.copy_from(t);
  ssl::ema_update{}(cpu_policy{2}, t, s, 0.996);
  for (std::size_t i = 0; i < L.size(); ++i)
    REQUIRE(t.data()[i] == doctest::Approx(0.996 * t0.data()[i] + 0.004 * s.data()[i]).epsilon(1e-6));
  // frozen tensors follow too (the reference walks parameters())
  CHECK(t.view("g")[0] != t0.view("g")[0]);
  ssl::copy_update{}(cpu_policy{1}, t, s, 0.5);
  CHECK(std::equal(t.data(), t.data() + t.size(), s.data()));
}

TEST_CASE("AdamW: PyTorch's update, parameter groups, frozen and skipped tensors") {
  param_layout L;
  L.add("w", {5, 4}, param_none, param_init::trunc_normal, 1.0);
  L.add("b", {5}, param_no_weight_decay, param_init::trunc_normal, 1.0);
  L.add("g", {5, 1}, param_frozen, param_init::ones);
  L.add("last", {3, 2}, param_last_layer, param_init::trunc_normal, 1.0);
  flat_params<double> p(L), g(L);
  nn::initialize(p, 3);
  flat_params<double> ref(L);
  ref.copy_from(p);
  optim::adamw<double> opt(L);
  std::vector<double> m(L.size(), 0.0), v(L.size(), 0.0);
  std::vector<int> steps(4, 0);
  for (int it = 0; it < 4; ++it) {
    fill_normal(g.data(), g.size(), 100 + std::uint64_t(it));
    const double lr = 1e-2 * (it + 1), wd = 0.04 + 0.1 * it;
    const unsigned skip = it < 2 ? unsigned(param_last_layer) : 0u;
    opt.step(cpu_policy{2}, p, g, lr, wd, skip);
    std::size_t j = 0;
    for (const auto& e : L.entries()) {
      const std::size_t idx = j++;
      if (!e.trainable() || (e.flags & skip)) continue;
      const int t = ++steps[idx];
      const double w = (e.flags & param_no_weight_decay) ? 0 : wd;
      for (std::size_t i = e.offset; i < e.offset + e.numel(); ++i) {
        double& x = ref.data()[i];
        x *= 1 - lr * w;
        m[i] = 0.9 * m[i] + 0.1 * g.data()[i];
        v[i] = 0.999 * v[i] + 0.001 * g.data()[i] * g.data()[i];
        const double mhat = m[i] / (1 - std::pow(0.9, t));
        x -= lr * mhat / (std::sqrt(v[i]) / std::sqrt(1 - std::pow(0.999, t)) + 1e-8);
      }
    }
  }
  CHECK(rel_error(p.data(), ref.data(), L.size()) < 1e-14);
  CHECK(opt.steps() == std::vector<std::int64_t>{4, 4, 0, 2});
  CHECK(p.view("g")[0] == 1.0);  // frozen: untouched
}

TEST_CASE("per-tensor gradient clipping (utils.clip_gradients), not a global norm") {
  param_layout L;
  L.add("big", {100}, param_none, param_init::zeros);
  L.add("small", {4}, param_none, param_init::zeros);
  L.add("frozen", {4}, param_frozen, param_init::zeros);
  flat_params<float> g(L);
  for (std::int64_t i = 0; i < 100; ++i) g.view("big")[i] = 1.0f;  // norm 10
  for (std::int64_t i = 0; i < 4; ++i) g.view("small")[i] = 0.5f;  // norm 1
  for (std::int64_t i = 0; i < 4; ++i) g.view("frozen")[i] = 100.0f;
  const int n = optim::clip_gradients(cpu_policy{2}, g, 3.0);
  CHECK(n == 1);
  CHECK(g.view("big")[7] == doctest::Approx(3.0 / (10.0 + 1e-6)).epsilon(1e-6));
  CHECK(g.view("small")[0] == 0.5f);
  CHECK(g.view("frozen")[0] == 100.0f);
  // norms over many blocks do not depend on the thread count
  std::vector<float> x(300000);
  fill_normal(x, 7);
  CHECK(optim::l2_norm(cpu_policy{1}, x.data(), 300000) == optim::l2_norm(cpu_policy{2}, x.data(), 300000));
}

TEST_CASE("schedules: cosine with linear warm-up, per-epoch teacher temperature") {
  auto lr = ssl::cosine_schedule(1.0, 0.0, 4, 5, 1);
  REQUIRE(lr.size() == 20);
  CHECK(lr[0] == 0.0);
  CHECK(lr[4] == 1.0);  // warm-up endpoint included
  CHECK(lr[2] == doctest::Approx(0.5));
  CHECK(lr[5] == 1.0);  // cosine starts at base
  CHECK(lr[19] > 0.0);  // final is never reached
  CHECK(lr[19] == doctest::Approx(0.5 * (1 + std::cos(M_PI * 14.0 / 15.0))));
  auto wd = ssl::cosine_schedule(0.04, 0.4, 2, 3);
  CHECK(wd[0] == doctest::Approx(0.04));
  CHECK(wd[5] < 0.4);
  CHECK(wd[5] > wd[4]);
  auto tt = ssl::teacher_temp_schedule(0.04, 0.07, 3, 5);
  REQUIRE(tt.size() == 5);
  CHECK(tt[0] == 0.04);
  CHECK(tt[1] == doctest::Approx(0.055));
  CHECK(tt[2] == 0.07);
  CHECK(tt[4] == 0.07);
  CHECK(ssl::teacher_temp_schedule(0.04, 0.04, 0, 3).size() == 3);

  ssl::schedule_config c;
  c.epochs = 3;
  c.iters_per_epoch = 4;
  c.batch_size = 512;
  c.warmup_epochs = 1;
  c.warmup_teacher_temp_epochs = 2;
  c.teacher_temp = 0.07;
  ssl::dino_schedules s(c);
  CHECK(s.total_iters() == 12);
  CHECK(s.at(3).lr == doctest::Approx(1e-3));  // 5e-4 * 512 / 256 at the end of warm-up
  CHECK(s.at(5).epoch == 1);
  CHECK(s.at(5).teacher_temp == doctest::Approx(0.07));
  CHECK(s.at(3).teacher_temp == doctest::Approx(0.04));
  CHECK(s.at(0).momentum == doctest::Approx(0.996));
  CHECK_THROWS_AS(s.at(12), config_error);
  CHECK_THROWS_AS(ssl::cosine_schedule(1, 0, 2, 3, 3), config_error);
}

TEST_CASE("fused float kernels against the double computation, odd K, write and accumulate") {
  const int V = 4, G = 2, K = 1237;
  const std::int64_t B = 5;
  const cpu_policy pol{2};
  std::vector<double> sd(std::size_t(V * B * K)), td(std::size_t(G * B * K));
  fill_normal(sd, 21, 0.3);
  fill_normal(td, 22, 0.3);
  auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<T> s(sd.begin(), sd.end()), t(td.begin(), td.end()), q(t.size()), ent(std::size_t(G * B)),
        row(std::size_t(V * B)), ds(s.size(), T(0.00390625));
    ssl::centering<T> cen({K, 0.9});
    for (int k = 0; k < K; ++k) cen.center()[k] = T(0.01 * (k % 7));
    const double H = cen.targets(pol, host_view<const T>{t.data(), {G * B, K}, "t"}, 0.04,
                                 host_view<T>{q.data(), {G * B, K}, "q"}, host_view<T>{ent.data(), {G * B}, "H"});
    ssl::cross_entropy_distillation loss({V, G, 0.1});
    const double L = loss.forward_backward(pol, host_view<const T>{s.data(), {V * B, K}, "s"},
                                           host_view<const T>{q.data(), {G * B, K}, "q"},
                                           host_view<T>{row.data(), {V * B}, "row"},
                                           host_view<T>{ds.data(), {V * B, K}, "ds"}, 1.0, true);
    std::vector<double> out(ds.begin(), ds.end());
    out.push_back(L);
    out.push_back(H);
    return out;
  };
  auto f = run(0.0f);
  auto d = run(0.0);
  CHECK(f.back() == doctest::Approx(d.back()).epsilon(1e-5));                  // entropy
  CHECK(f[f.size() - 2] == doctest::Approx(d[d.size() - 2]).epsilon(1e-5));    // loss
  f.resize(f.size() - 2);
  d.resize(d.size() - 2);
  for (auto& v : f) v -= 0.00390625;  // accumulated onto 2^-8
  for (auto& v : d) v -= 0.00390625;
  CHECK(rel_error(f, d) < 1e-5);
}
