// Core: shapes, views, errors, the parameter store, workspaces, Philox, initialisation.
#include <doctest/doctest.h>

#include <cmath>
#include <set>
#include <string>

#include <dino/dino.hpp>

using namespace dino;

TEST_CASE("shape and tensor_view") {
  shape s{2, 3, 4};
  CHECK(s.rank == 3);
  CHECK(s.numel() == 24);
  CHECK(s.str() == "[2, 3, 4]");
  CHECK(s == shape{2, 3, 4});
  CHECK_FALSE(s == shape{2, 3});
  CHECK(shape{}.numel() == 1);
  float buf[24];
  for (int i = 0; i < 24; ++i) buf[i] = float(i);
  host_view<float> v{buf, s, "x"};
  CHECK(v.rows() == 2);
  CHECK(v.cols() == 12);
  CHECK(v.row(1)[0] == 12.0f);
  auto w = v.slice_rows(1, 1);
  CHECK(w.data == buf + 12);
  CHECK(w.shape == shape{1, 3, 4});
  host_view<const float> c = v;  // const conversion keeps the space and name
  CHECK(std::string(c.name) == "x");
  static_assert(std::is_same_v<decltype(c)::space, host_space>);
}

TEST_CASE("check_shape names the tensor, the expected and the found shape") {
  float buf[6];
  host_view<float> v{buf, {2, 3}, "student logits"};
  CHECK_NOTHROW(check_shape("op", v, {2, 3}));
  try {
    check_shape("op", v, {3, 2});
    FAIL("no exception");
  } catch (const shape_error& e) {
    CHECK(std::string(e.what()) == "op: student logits: expected shape [3, 2], found [2, 3]");
  }
  CHECK_THROWS_AS(check_matrix("op", v, 4), shape_error);
  CHECK_THROWS_WITH_AS(require<config_error>(false, "bad ", 3), "bad 3", config_error);
  // the hierarchy
  CHECK_THROWS_AS(throw io_error("x"), dino::error);
  CHECK_THROWS_AS(throw numeric_error("x"), std::runtime_error);
}

TEST_CASE("param_layout: offsets, flags, lookup") {
  param_layout L;
  auto a = L.add("a.weight", {3, 5}, param_none, param_init::trunc_normal, 0.02);
  auto b = L.add("a.bias", {3}, param_no_weight_decay, param_init::zeros);
  auto c = L.add("c", {40}, param_frozen, param_init::ones);
  CHECK(a == 0);
  CHECK(b % param_layout::align_elems == 0);
  CHECK(b >= 15);
  CHECK(c >= b + 3);
  CHECK(c % param_layout::align_elems == 0);
  CHECK(L.size() == c + 40);
  CHECK(L.numel() == 15 + 3 + 40);
  CHECK(L.at("a.bias").flags == param_no_weight_decay);
  CHECK_FALSE(L.at("c").trainable());
  CHECK(L.find("nope") == nullptr);
  CHECK_THROWS_WITH_AS(L.at("nope"), "param_layout: no tensor named 'nope'", config_error);
  CHECK_THROWS_AS(L.add("a.weight", {1}, param_none, param_init::zeros), config_error);
  CHECK_THROWS_AS(L.add("empty", {0, 3}, param_none, param_init::zeros), config_error);
  std::vector<std::string> names;
  L.visit([&](const param_entry& e) { names.push_back(e.name); });
  CHECK(names == std::vector<std::string>{"a.weight", "a.bias", "c"});

  flat_params<float> P(L);
  CHECK(P.size() == L.size());
  auto w = P.view("a.weight");
  CHECK(w.shape == shape{3, 5});
  CHECK(std::string(w.name) == "a.weight");
  w[14] = 2.0f;
  CHECK(P.data()[14] == 2.0f);
  flat_params<float> Q(L);
  Q.copy_from(P);
  CHECK(Q.view("a.weight")[14] == 2.0f);
}

TEST_CASE("workspace: planned regions, overflow names the request") {
  workspace_plan plan;
  plan.add<float>(10).add<double>(3);
  CHECK(plan.bytes == 128);  // two 64-byte-aligned regions
  workspace ws(plan);
  float* a = ws.take<float>(10, "a");
  double* b = ws.take<double>(3, "b");
  CHECK(reinterpret_cast<std::uintptr_t>(a) % 64 == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(b) % 64 == 0);
  CHECK(ws.used() == 128);
  try {
    ws.take<float>(1, "extra scratch");
    FAIL("no exception");
  } catch (const config_error& e) {
    CHECK(std::string(e.what()).find("extra scratch") != std::string::npos);
  }
  ws.reset();
  CHECK(ws.take<float>(10) == a);
}

TEST_CASE("Philox4x32-10 known-answer vectors (Random123 kat_vectors)") {
  auto r = philox4x32_10({{0, 0, 0, 0}}, 0, 0);
  CHECK(r.v[0] == 0x6627e8d5u);
  CHECK(r.v[1] == 0xe169c58du);
  CHECK(r.v[2] == 0xbc57ac4cu);
  CHECK(r.v[3] == 0x9b00dbd8u);
  r = philox4x32_10({{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu);
  CHECK(r.v[0] == 0x408f276du);
  CHECK(r.v[1] == 0x41c83b0eu);
  CHECK(r.v[2] == 0xa20bc7c6u);
  CHECK(r.v[3] == 0x6d5451fdu);
  r = philox4x32_10({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u);
  CHECK(r.v[0] == 0xd16cfe09u);
  CHECK(r.v[1] == 0x94fdccebu);
  CHECK(r.v[2] == 0x5001e420u);
  CHECK(r.v[3] == 0x24126ea1u);
}

TEST_CASE("philox streams are addressed: offsets, subsequences, statistics") {
  philox a(42, 7);
  std::vector<std::uint32_t> first;
  for (int i = 0; i < 11; ++i) first.push_back(a.next_u32());
  CHECK(a.offset() == 11);
  philox b(42, 7, 5);  // starting at offset 5 gives the same numbers as skipping 5
  for (int i = 5; i < 11; ++i) CHECK(b.next_u32() == first[std::size_t(i)]);
  philox c(42, 8);
  CHECK(c.next_u32() != first[0]);
  philox d(43, 7);
  CHECK(d.next_u32() != first[0]);

  philox g(1, 2);
  double s = 0, s2 = 0, us = 0;
  float umin = 1, umax = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    double x = g.normal();
    s += x;
    s2 += x * x;
    float u = g.uniform();
    umin = std::min(umin, u);
    umax = std::max(umax, u);
    us += u;
  }
  CHECK(std::fabs(s / n) < 0.01);
  CHECK(std::fabs(s2 / n - 1.0) < 0.01);
  CHECK(umin > 0.0f);
  CHECK(umax <= 1.0f);
  CHECK(std::fabs(us / n - 0.5) < 0.005);
  CHECK(rng_subsequence(1, 2, 3) != rng_subsequence(2, 2, 3));
  CHECK(rng_subsequence(1, 2, 3) != rng_subsequence(1, 3, 3));
}

TEST_CASE("initialize follows each tensor's rule, deterministically") {
  param_layout L;
  L.add("w", {200, 100}, param_none, param_init::trunc_normal, 0.02);
  L.add("b", {200}, param_no_weight_decay, param_init::zeros);
  L.add("g", {10, 1}, param_none, param_init::ones);
  L.add("v", {300, 64}, param_none, param_init::kaiming_uniform, 64.0);
  flat_params<float> P(L), Q(L);
  nn::initialize(P, 5);
  nn::initialize(Q, 5);
  CHECK(std::equal(P.data(), P.data() + P.size(), Q.data()));
  nn::initialize(Q, 6);
  CHECK_FALSE(std::equal(P.data(), P.data() + P.size(), Q.data()));

  auto w = P.view("w");
  double s = 0, s2 = 0;
  for (std::int64_t i = 0; i < w.numel(); ++i) {
    s += w[i];
    s2 += double(w[i]) * w[i];
  }
  CHECK(std::fabs(s / double(w.numel())) < 1e-3);
  CHECK(std::sqrt(s2 / double(w.numel())) == doctest::Approx(0.02).epsilon(0.03));
  for (std::int64_t i = 0; i < 200; ++i) CHECK(P.view("b")[i] == 0.0f);
  for (std::int64_t i = 0; i < 10; ++i) CHECK(P.view("g")[i] == 1.0f);
  auto v = P.view("v");
  float vmax = 0;
  for (std::int64_t i = 0; i < v.numel(); ++i) vmax = std::max(vmax, std::fabs(v[i]));
  CHECK(vmax <= 0.125f);  // 1 / sqrt(64)
  CHECK(vmax > 0.12f);
}

TEST_CASE("buffer: aligned, copyable, movable") {
  buffer<float> a(100);
  CHECK(reinterpret_cast<std::uintptr_t>(a.data()) % 64 == 0);
  CHECK(a[99] == 0.0f);
  a[3] = 1.5f;
  buffer<float> b = a;
  CHECK(b[3] == 1.5f);
  buffer<float> c = std::move(a);
  CHECK(c[3] == 1.5f);
  CHECK(a.size() == 0);
  CHECK(std::string(version_string()) == "dino 0.1.0");
}
