// nn/ and the DINO head: every backward against central differences in double, the
// accumulate contract (pre-filled gradients receive +=; input gradients write, accumulate or
// skip as asked), and inference equal to the training forward.
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

namespace {

// Checks module m (registered in L) on an input of n rows.
template <class M>
void check_module(const M& m, const param_layout& L, std::int64_t n, std::uint64_t seed, double tol = 1e-6,
                  unsigned skip_param_flags = param_none) {
  const cpu_policy pol{2};
  flat_params<double> P(L), G(L);
  nn::initialize(P, seed);
  // Perturb everything away from the initial values so zeros and ones do not hide errors.
  for (const auto& e : L.entries()) {
    std::vector<double> noise(e.numel());
    fill_normal(noise, seed + e.offset + 1, 0.1);
    for (std::size_t i = 0; i < e.numel(); ++i) P.data()[e.offset + i] += noise[i];
  }
  const std::int64_t din = m.in_dim(), dout = m.out_dim();
  std::vector<double> x(std::size_t(n * din)), y(std::size_t(n * dout)), r(std::size_t(n * dout));
  std::vector<double> saved(m.saved_elems(n)), scratch(m.scratch_elems(n) + 1);
  fill_normal(x, seed + 100);
  fill_normal(r, seed + 200);
  auto Pv = [&] { return host_view<const double>{P.data(), {std::int64_t(P.size())}, "P"}; };
  host_view<const double> xv{x.data(), {n, din}, "x"};
  auto objective = [&] {
    std::vector<double> yy(std::size_t(n * dout)), ss(m.saved_elems(n));
    m.forward(pol, Pv(), host_view<const double>{x.data(), {n, din}, "x"}, host_view<double>{yy.data(), {n, dout}, "y"},
              host_view<double>{ss.data(), {std::int64_t(ss.size())}, "saved"});
    return dot(yy.data(), r.data(), yy.size());
  };
  m.forward(pol, Pv(), xv, host_view<double>{y.data(), {n, dout}, "y"},
            host_view<double>{saved.data(), {std::int64_t(saved.size())}, "saved"});

  // inference gives the same output
  std::vector<double> yi(y.size());
  m.infer(pol, Pv(), xv, host_view<double>{yi.data(), {n, dout}, "y"},
          host_view<double>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
  CHECK(rel_error(yi, y) < 1e-14);

  // analytic gradients, with G pre-filled to check accumulation
  const double pre = 0.5;
  for (std::size_t i = 0; i < G.size(); ++i) G.data()[i] = pre;
  std::vector<double> dx(x.size(), 0.0);
  m.backward(pol, Pv(), xv, host_view<const double>{saved.data(), {std::int64_t(saved.size())}, "saved"},
             host_view<const double>{r.data(), {n, dout}, "dy"}, host_view<double>{dx.data(), {n, din}, "dx"},
             grad_mode::write, host_view<double>{G.data(), {std::int64_t(G.size())}, "G"},
             host_view<double>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});

  auto fdx = fd_gradient(objective, x.data(), x.size());
  CHECK_MESSAGE(rel_error(dx, fdx) < tol, "input gradient");

  for (const auto& e : L.entries()) {
    std::vector<double> ga(e.numel());
    for (std::size_t i = 0; i < e.numel(); ++i) ga[i] = G.data()[e.offset + i] - pre;
    if (!e.trainable() || (e.flags & skip_param_flags)) {
      for (double v : ga) REQUIRE_MESSAGE(v == 0.0, e.name << " must receive no gradient");
      continue;
    }
    auto gf = fd_gradient(objective, P.data() + e.offset, e.numel());
    CHECK_MESSAGE(rel_error(ga, gf) < tol, e.name << " rel error " << rel_error(ga, gf));
  }

  // input-gradient modes: accumulate adds, skip leaves dx alone
  std::vector<double> dacc(x.size(), 1.0), dskip(x.size(), 3.0);
  for (auto [mode, buf] : {std::pair{grad_mode::accumulate, &dacc}, std::pair{grad_mode::skip, &dskip}}) {
    m.backward(pol, Pv(), xv, host_view<const double>{saved.data(), {std::int64_t(saved.size())}, "saved"},
               host_view<const double>{r.data(), {n, dout}, "dy"}, host_view<double>{buf->data(), {n, din}, "dx"}, mode,
               host_view<double>{G.data(), {std::int64_t(G.size())}, "G"},
               host_view<double>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
  }
  for (std::size_t i = 0; i < x.size(); ++i) {
    REQUIRE(dacc[i] == doctest::Approx(dx[i] + 1.0).epsilon(1e-12));
    REQUIRE(dskip[i] == 3.0);
  }
}

}  // namespace

TEST_CASE("linear: forward is x W^T + b; gradients") {
  param_layout L;
  nn::linear lin({5, 4, true}, L, "fc.");
  CHECK(L.at("fc.weight").shape == shape{4, 5});
  CHECK((L.at("fc.bias").flags & param_no_weight_decay) != 0);
  check_module(lin, L, 3, 1);
  param_layout L2;
  nn::linear nob({6, 3, false}, L2, "fc.");
  CHECK(L2.find("fc.bias") == nullptr);
  check_module(nob, L2, 4, 2);
}

TEST_CASE("mlp: Sequential names and gradients, with and without a final GELU") {
  param_layout L;
  nn::mlp m({{6, 8, 7, 5}, false}, L, "mlp.");
  CHECK(L.find("mlp.0.weight"));
  CHECK(L.find("mlp.2.weight"));
  CHECK(L.find("mlp.4.bias"));
  CHECK(m.param_count() == 6 * 8 + 8 + 8 * 7 + 7 + 7 * 5 + 5);
  check_module(m, L, 4, 3);
  param_layout L2;
  nn::mlp g({{4, 6, 3}, true}, L2, "b.");
  check_module(g, L2, 5, 4);
  param_layout L3;
  nn::mlp single({{4, 3}, false, true, true}, L3, "mlp.");
  CHECK(L3.find("mlp.weight"));
  check_module(single, L3, 2, 5);
}

TEST_CASE("layer_norm module: input and parameter gradients") {
  param_layout L;
  nn::layer_norm ln({9, 1e-6}, L, "norm.");
  CHECK((L.at("norm.weight").flags & param_no_weight_decay) != 0);
  check_module(ln, L, 6, 6);
}

TEST_CASE("DINO head: names, shapes, flags and gradients") {
  for (bool norm_last : {true, false}) {
    CAPTURE(norm_last);
    param_layout L;
    ssl::dino_head h({7, 20, 9, 5, 3, norm_last}, L);
    std::vector<std::string> names;
    for (const auto& e : L.entries()) names.push_back(e.name);
    CHECK(names == std::vector<std::string>{"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                            "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"});
    CHECK(L.at("last_layer.weight_g").shape == shape{20, 1});
    CHECK(L.at("last_layer.weight_v").shape == shape{20, 5});
    CHECK(bool(L.at("last_layer.weight_g").flags & param_frozen) == norm_last);
    CHECK((L.at("last_layer.weight_v").flags & param_last_layer) != 0);
    CHECK(h.param_count() == std::int64_t(L.numel()));
    check_module(h, L, 4, 7);
  }
  // one layer: a bare Linear named mlp.weight; two layers
  param_layout L1;
  ssl::dino_head h1({6, 12, 9, 4, 1, false}, L1);
  CHECK(L1.find("mlp.weight"));
  check_module(h1, L1, 3, 8);
  param_layout L2;
  ssl::dino_head h2({6, 12, 9, 4, 2, true}, L2);
  CHECK(L2.find("mlp.2.weight"));
  check_module(h2, L2, 3, 9);
}

TEST_CASE("DINO head: outputs are cosines when norm_last_layer; frozen last layer gets no gradient") {
  param_layout L;
  ssl::dino_head h({6, 30, 8, 4, 3, true}, L);
  flat_params<float> P(L), G(L);
  nn::initialize(P, 3);
  const std::int64_t n = 5;
  std::vector<float> x(std::size_t(n * 6)), y(std::size_t(n * 30)), saved(h.saved_elems(n)), scratch(h.scratch_elems(n));
  fill_normal(x, 4, 10.0);
  const cpu_policy pol{1};
  host_view<const float> Pv{P.data(), {std::int64_t(P.size())}, "P"};
  h.forward(pol, Pv, host_view<const float>{x.data(), {n, 6}, "x"}, host_view<float>{y.data(), {n, 30}, "y"},
            host_view<float>{saved.data(), {std::int64_t(saved.size())}, "saved"});
  for (float v : y) {
    CHECK(v <= 1.0f + 1e-6f);
    CHECK(v >= -1.0f - 1e-6f);
  }
  std::vector<float> dy(y.size(), 1.0f), dx(x.size());
  h.backward(pol, Pv, host_view<const float>{x.data(), {n, 6}, "x"},
             host_view<const float>{saved.data(), {std::int64_t(saved.size())}, "saved"},
             host_view<const float>{dy.data(), {n, 30}, "dy"}, host_view<float>{dx.data(), {n, 6}, "dx"}, grad_mode::write,
             host_view<float>{G.data(), {std::int64_t(G.size())}, "G"},
             host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"}, /*last_layer_frozen=*/true);
  auto gv = G.view("last_layer.weight_v");
  for (std::int64_t i = 0; i < gv.numel(); ++i) REQUIRE(gv[i] == 0.0f);
  auto g0 = G.view("mlp.0.weight");
  double s = 0;
  for (std::int64_t i = 0; i < g0.numel(); ++i) s += std::fabs(g0[i]);
  CHECK(s > 0);
}
