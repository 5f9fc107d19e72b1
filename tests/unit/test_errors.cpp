// Bad input: each case expects the documented exception and a message that names what was
// wrong (the tensor, the expected and the found shape or value).
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <dino/dino.hpp>

using namespace dino;

namespace {
template <class E, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  FAIL("expected exception not thrown");
  return {};
}
bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

struct loss_fixture {
  int V = 4, K = 8;
  std::int64_t B = 3;
  std::vector<float> s = std::vector<float>(std::size_t(4 * 3 * 8), 0.1f);
  std::vector<float> q = std::vector<float>(std::size_t(2 * 3 * 8), 1.0f / 8);
  std::vector<float> row = std::vector<float>(std::size_t(4 * 3), 0.0f);
  ssl::cross_entropy_distillation loss{{4, 2, 0.1}};
  double run(std::int64_t s_rows, std::int64_t s_cols, std::int64_t q_rows, std::int64_t q_cols) {
    return loss.forward(cpu_policy{1}, host_view<const float>{s.data(), {s_rows, s_cols}, "student logits"},
                        host_view<const float>{q.data(), {q_rows, q_cols}, "teacher targets"},
                        host_view<float>{row.data(), {s_rows}, "row loss"});
  }
};
}  // namespace

TEST_CASE("mismatched shapes name the tensor and both shapes") {
  param_layout L;
  nn::linear lin({5, 4, true}, L, "fc.");
  flat_params<float> P(L);
  std::vector<float> x(15), y(12);
  auto m = message_of<shape_error>([&] {
    lin.forward(cpu_policy{1}, host_view<const float>{P.data(), {std::int64_t(P.size())}, "P"},
                host_view<const float>{x.data(), {3, 5}, "features"}, host_view<float>{y.data(), {4, 3}, "logits"});
  });
  CHECK(m == "linear forward: logits: expected shape [3, 4], found [4, 3]");
  m = message_of<shape_error>([&] {
    lin.forward(cpu_policy{1}, host_view<const float>{P.data(), {std::int64_t(P.size())}, "P"},
                host_view<const float>{x.data(), {5, 3}, "features"}, host_view<float>{y.data(), {5, 4}, "logits"});
  });
  CHECK(m == "linear forward: features: expected shape [N, 5], found [5, 3]");
}

TEST_CASE("K differing between teacher and student") {
  loss_fixture f;
  auto m = message_of<shape_error>([&] { f.run(12, 8, 6, 4); });
  CHECK(contains(m, "student logits has K = 8 but teacher targets has K = 4"));
}

TEST_CASE("a batch that is not a multiple of the crop count") {
  loss_fixture f;
  auto m = message_of<shape_error>([&] { f.run(10, 8, 6, 8); });
  CHECK(contains(m, "student logits has 10 rows, which is not a multiple of the crop count 4"));
  m = message_of<shape_error>([&] { f.run(12, 8, 4, 8); });
  CHECK(contains(m, "teacher targets: expected 6 rows (2 global crops x batch 3), found 4"));
}

TEST_CASE("non-finite logits are reported with their position") {
  loss_fixture f;
  f.s[std::size_t(1 * 8 + 5)] = std::numeric_limits<float>::quiet_NaN();
  auto m = message_of<numeric_error>([&] { f.run(12, 8, 6, 8); });
  CHECK(contains(m, "student logits [12, 8] holds a non-finite value (nan) at row 1, column 5"));
  loss_fixture g;
  g.q[3] = std::numeric_limits<float>::infinity();
  m = message_of<numeric_error>([&] { g.run(12, 8, 6, 8); });
  CHECK(contains(m, "teacher targets [6, 8] holds a non-finite value (inf) at row 0, column 3"));
}

TEST_CASE("bad hyper-parameters are config errors") {
  CHECK(contains(message_of<config_error>([] { ssl::cross_entropy_distillation l({1, 2, 0.1}); }), "n_crops"));
  CHECK(contains(message_of<config_error>([] { ssl::cross_entropy_distillation l({4, 2, 0.0}); }),
                 "student temperature must be positive, got 0"));
  CHECK(contains(message_of<config_error>([] { ssl::centering<float> c({8, 1.5}); }), "momentum must be in [0, 1], got 1.5"));
  ssl::centering<float> c({8, 0.9});
  std::vector<float> t(16), q(16), e(2);
  CHECK(contains(message_of<config_error>([&] {
                   c.targets(cpu_policy{1}, host_view<const float>{t.data(), {2, 8}, "t"}, 0.0,
                             host_view<float>{q.data(), {2, 8}, "q"}, host_view<float>{e.data(), {2}, "e"});
                 }),
                 "teacher temperature must be positive, got 0"));
  param_layout L;
  CHECK(contains(message_of<config_error>([&] { ssl::dino_head h({8, 16, 0, 4, 3, true}, L); }), "hidden 0"));
  CHECK(contains(message_of<config_error>([] { ssl::cosine_schedule(1, 0, 0, 5); }), "epochs (0)"));
}

TEST_CASE("a method whose parts do not fit together") {
  ssl::dino_config c;
  c.head.out_dim = 16;
  c.head.hidden_dim = 8;
  c.head.bottleneck_dim = 4;
  c.local_crops = 0;
  c.train.max_batch = 2;
  c.train.schedule.epochs = 1;
  c.train.schedule.warmup_epochs = 0;
  auto m = message_of<config_error>([&] {
    ssl::dino_method<nn::mlp> bad(nn::mlp_config{{4, 6}}, ssl::dino_head_config{5, 16, 8, 4, 3, true},
                                  ssl::centering<float>({16, 0.9}), ssl::cross_entropy_distillation({2, 2, 0.1}),
                                  ssl::ema_update{}, c.train);
  });
  CHECK(m == "method: the backbone's output size 6 differs from the head's input size 5");
  m = message_of<config_error>([&] {
    ssl::dino_method<nn::mlp> bad(nn::mlp_config{{4, 6}}, ssl::dino_head_config{6, 16, 8, 4, 3, true},
                                  ssl::centering<float>({32, 0.9}), ssl::cross_entropy_distillation({2, 2, 0.1}),
                                  ssl::ema_update{}, c.train);
  });
  CHECK(m == "method: the head's output size (K = 16) differs from the target's (K = 32)");

  auto good = ssl::make_dino<nn::mlp>(nn::mlp_config{{4, 6}}, 6, c);
  std::vector<float> x(std::size_t(2 * 3 * 4));
  m = message_of<shape_error>([&] { good.step(cpu_policy{1}, host_view<const float>{x.data(), {3, 4}, "crops"}); });
  CHECK(m == "method::step: crops has 3 rows, not a multiple of the crop count 2");
  m = message_of<shape_error>([&] { good.step(cpu_policy{1}, host_view<const float>{x.data(), {6, 4}, "crops"}); });
  CHECK(contains(m, "crops has 6 rows, more than planned (4 = 2 crops x max_batch 2)"));
  // Step graphs are CUDA graphs: a CPU method refuses them, and turning them off is always fine.
  static_assert(!decltype(good)::step_graphs_supported);
  m = message_of<config_error>([&] { good.use_step_graphs(true); });
  CHECK(m == "method::use_step_graphs: step graphs are CUDA graphs: the CPU policy has none");
  good.use_step_graphs(false);
  CHECK_FALSE(good.step_graphs());
}

TEST_CASE("attention: a probs layout of rows (the GPU's bf16 path) is refused where P is kept") {
  const std::vector<nn::segment> segs = {{0, 5}, {5, 5}, {10, 3}};
  const std::int64_t heads = 2, D = 8;
  const auto rows = nn::detail::probs_offsets(segs, heads, nn::attention_store::rows);
  CHECK(rows == std::vector<std::size_t>{0, 10, 20});  // heads * n per segment
  CHECK(nn::attention_probs_elems(segs, heads, nn::attention_store::rows) == 26);
  CHECK(nn::attention_probs_elems(segs, heads) == 2 * (25 + 25 + 9));
  std::vector<float> qkv(std::size_t(13 * 3 * D), 0.5f), out(std::size_t(13 * D)), probs(200), dqkv(qkv.size()),
      scratch(200);
  auto m = message_of<shape_error>([&] {
    nn::attention_forward(cpu_policy{1}, heads, D, segs, rows, qkv.data(), out.data(), probs.data());
  });
  CHECK(contains(m, "attention_forward: the probs regions of segments 0 and 1 overlap (offsets 0 and 10"));
  CHECK(contains(m, "attention_store::rows"));
  CHECK_THROWS_AS(nn::attention_backward(cpu_policy{1}, heads, D, segs, rows, qkv.data(), probs.data(), out.data(),
                                         dqkv.data(), scratch.data()),
                  shape_error);
  // the matrix layout, in either order of regions, runs
  nn::attention_forward(cpu_policy{1}, heads, D, segs, nn::detail::probs_offsets(segs, heads), qkv.data(), out.data(),
                        probs.data());
  nn::attention_forward(cpu_policy{1}, heads, D, segs, std::vector<std::size_t>{68, 18, 0}, qkv.data(), out.data(),
                        probs.data());
  CHECK(std::isfinite(out[0]));
}

TEST_CASE("vit: a pack planned for row statistics is refused by a policy whose attention keeps P") {
  param_layout L;
  nn::vit_config vc;
  vc.img_size = 8, vc.patch = 2, vc.in_chans = 1, vc.embed_dim = 8, vc.depth = 1, vc.heads = 2;
  nn::vit v(vc, L);
  flat_params<float> P(L);
  const cpu_policy pol{1};
  CHECK(v.make_pack<float>(pol, {{2, 8, 8}}).store == nn::attention_store::matrix);  // what the CPU keeps
  auto pk = v.make_pack<float>({{2, 8, 8}}, nn::attention_store::rows);
  CHECK(pk.probs == std::size_t(2 * 2 * 17));  // 2 crops of 17 tokens, 2 heads, one float per row
  std::vector<float> img(2 * 64, 0.1f), y(2 * 8), saved(v.saved_elems(pk));
  const float* imgs[1] = {img.data()};
  const auto m = message_of<config_error>([&] {
    v.forward(pol, host_view<const float>{P.data(), {std::int64_t(P.size())}, "P"}, pk,
              std::span<const float* const>(imgs, 1), host_view<float>{y.data(), {2, 8}, "y"},
              host_view<float>{saved.data(), {std::int64_t(saved.size())}, "saved"});
  });
  CHECK(contains(m, "vit: the pack was planned for the bf16 attention's row statistics"));
}
