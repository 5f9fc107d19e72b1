// The presets of ssl/presets.hpp: each trains on synthetic clusters (an MLP backbone; two on
// a tiny ViT; dino_attention_mask on a tiny ViT only) for 200 steps without a non-finite value;
// and the method's optional parts checked directly: copy / no teacher, a loss that ignores the
// teacher, the predictor (trained, not followed by the teacher), the two-crop plan, a stateful
// loss (InfoNCE's queue) and the StudentMask (the teacher's attention picks the student's
// patches; ratio 0 is DINO bit for bit).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <dino/dino.hpp>
#include <dino/train/checkpoint.hpp>

#include "gradcheck.hpp"

using namespace dino;

namespace {

constexpr int kIn = 16, kClusters = 8, kB = 16;

// Crop-major crops of b images from kClusters Gaussian clusters (as test_method.cpp).
struct synthetic {
  std::vector<float> centers;
  explicit synthetic(std::uint64_t seed) : centers(std::size_t(kClusters * kIn)) {
    dino_test::fill_normal(centers, seed);
  }
  std::vector<float> crops(std::int64_t b, int n_crops, std::uint64_t step) const {
    std::vector<int> l(static_cast<std::size_t>(b));
    philox lg(99, step);
    for (auto& x : l) x = int(lg.next_u32() % kClusters);
    std::vector<float> x(std::size_t(n_crops * b * kIn));
    philox g(7, step);
    for (int v = 0; v < n_crops; ++v)
      for (std::int64_t i = 0; i < b; ++i)
        for (int d = 0; d < kIn; ++d)
          x[std::size_t((v * b + i) * kIn + d)] =
              centers[std::size_t(l[std::size_t(i)] * kIn + d)] + float(g.normal() * (v < 2 ? 0.3 : 0.6));
    return x;
  }
};

nn::mlp_config backbone_config() {
  nn::mlp_config c{{kIn, 64, 32}, false};
  c.weight_init = param_init::kaiming_uniform;
  return c;
}

// Small sizes on top of a preset's defaults: K 32, 2 local crops for multi-crop presets,
// 200 steps, a queue of 64 keys.
ssl::dino_config small(std::string_view preset, std::int64_t steps = 200) {
  ssl::dino_config c = ssl::preset_defaults(preset);
  c.head.out_dim = 32;
  c.head.hidden_dim = 64;
  c.head.bottleneck_dim = 16;
  if (!ssl::two_crop_preset(preset)) c.local_crops = 2;
  c.predictor_hidden = 32;
  c.queue_size = 64;
  c.train.max_batch = kB;
  c.train.schedule.epochs = 4;
  c.train.schedule.iters_per_epoch = steps / 4;
  c.train.schedule.batch_size = kB;
  c.train.schedule.lr = 0.05;
  c.train.schedule.min_lr = 1e-4;
  c.train.schedule.warmup_epochs = 1;
  c.train.freeze_last_layer = 1;
  return c;
}

int n_crops_of(const ssl::dino_config& c, std::string_view preset) {
  return ssl::two_crop_preset(preset) ? 2 : 2 + c.local_crops;
}

bool all_finite_params(const flat_params<float>& p) {
  for (std::size_t i = 0; i < p.size(); ++i)
    if (!std::isfinite(p.data()[i])) return false;
  return true;
}

// 200 steps; every loss, parameter and teacher finite, no step skipped.
template <class M>
void train_checked(M& m, int n_crops, const char* name, std::int64_t steps = 200) {
  synthetic data(11);
  const cpu_policy pol{2};
  double first = 0, last = 0;
  for (std::int64_t it = 0; it < steps; ++it) {
    auto x = data.crops(kB, n_crops, std::uint64_t(it));
    auto st = m.step(pol, host_view<const float>{x.data(), {n_crops * kB, kIn}, "crops"});
    REQUIRE_MESSAGE(!st.skipped, name, " step ", it, ": ", st.skip_reason);
    REQUIRE_MESSAGE(std::isfinite(st.loss), name, " step ", it);
    REQUIRE(std::isfinite(st.teacher_entropy));
    if (it < 10) first += st.loss / 10;
    if (it >= steps - 10) last += st.loss / 10;
  }
  CHECK_MESSAGE(all_finite_params(m.student()), name);
  CHECK_MESSAGE(all_finite_params(m.teacher()), name);
  MESSAGE(std::string(name) << ": loss first 10 steps " << first << ", last 10 " << last);
}

bool same_range(const float* a, const float* b, std::size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

// A target that counts its calls (to see that a method never ran the teacher side).
template <class T>
struct counting_target : ssl::raw_target<T> {
  using ssl::raw_target<T>::raw_target;
  mutable int targets_calls = 0;
  int observe_calls = 0;
  template <class Policy, class S>
  double targets(const Policy& pol, tensor_view<const T, S> t, double tau, tensor_view<T, S> q,
                 tensor_view<T, S> e) const {
    ++targets_calls;
    return ssl::raw_target<T>::targets(pol, t, tau, q, e);
  }
  template <class Policy, class S>
  void observe(const Policy&, tensor_view<const T, S>) {
    ++observe_calls;
  }
};

}  // namespace

// ---- compile-time assembly ------------------------------------------------------------------

static_assert(ssl::stateful_loss<ssl::info_nce<float>>);
static_assert(!ssl::stateful_loss<ssl::cross_entropy_distillation>);
static_assert(!ssl::uses_teacher_v<ssl::nt_xent<float>>);
static_assert(ssl::uses_teacher_v<ssl::mse_distillation>);
static_assert(ssl::shares_student_v<ssl::no_teacher> && !ssl::shares_student_v<ssl::copy_update>);
static_assert(ssl::ranged_teacher_update<ssl::ema_update> && ssl::ranged_teacher_update<ssl::copy_update>);
static_assert(std::is_same_v<ssl::dino_two_crops_method<nn::mlp>, ssl::dino_method<nn::mlp>>);
// The control of tests/compile_fail/method_predictor_size.cpp: matching static sizes assemble.
using fixed_ok = ssl::method<nn::mlp, ssl::fixed_dims<ssl::dino_head, 32, 64>, ssl::centering<float>,
                             ssl::cross_entropy_distillation, ssl::ema_update, float, cpu_policy,
                             ssl::fixed_dims<ssl::mlp_predictor, 64, 64>>;
static_assert(sizeof(fixed_ok) > 0);

// The example of docs/api.md ("A part and a preset of one's own").
struct half_ema {
  template <class Policy, class T, class S>
  void operator()(const Policy& pol, dino::flat_params<T, S>& t, const dino::flat_params<T, S>& s, double m,
                  const int* skip = nullptr) const {
    dino::ssl::ema_update{}(pol, t, s, m * m, skip);
  }
};
template <class Backbone, class T = float, class Policy = dino::cpu_policy>
using my_method = dino::ssl::method<Backbone, dino::ssl::dino_head, dino::ssl::sinkhorn_knopp<T>,
                                    dino::ssl::mse_distillation, half_ema, T, Policy>;
static_assert(ssl::teacher_update<half_ema> && sizeof(my_method<nn::mlp>) > 0);

// The example of docs/api.md ("Student masks"): a mask of one's own assembles.
struct random_mask {  // keeps half of the patches, drawn anew each call
  std::uint64_t calls = 0;
  std::int64_t kept(std::int64_t n) const { return std::max<std::int64_t>(1, n / 2); }
  void select(const dino::cpu_policy&, dino::host_view<const float> a, std::int64_t, std::int64_t n,
              std::int64_t* keep) {
    std::vector<std::int64_t> idx(static_cast<std::size_t>(n));  // (a real part keeps this as scratch)
    for (std::int64_t c = 0; c < a.rows(); ++c) {
      std::iota(idx.begin(), idx.end(), 0);
      dino::philox g(7, calls++);
      for (std::int64_t i = n - 1; i > 0; --i) std::swap(idx[std::size_t(i)], idx[g.next_u32() % std::uint32_t(i + 1)]);
      std::sort(idx.begin(), idx.begin() + kept(n));
      std::copy(idx.begin(), idx.begin() + kept(n), keep + c * kept(n));
    }
  }
};
using my_masked = dino::ssl::method<dino::nn::vit, dino::ssl::dino_head, dino::ssl::centering<float>,
                                    dino::ssl::cross_entropy_distillation, dino::ssl::ema_update, float,
                                    dino::cpu_policy, dino::ssl::no_predictor, random_mask>;
static_assert(ssl::student_mask_part<random_mask> && ssl::student_mask_part<ssl::attention_mask> &&
              ssl::student_mask_part<ssl::no_student_mask> && !ssl::student_mask_part<half_ema>);
static_assert(sizeof(my_masked) > 0);

TEST_CASE("preset names and defaults") {
  CHECK(ssl::preset_names.size() == 11);
  CHECK(ssl::preset_defaults("dino_attention_mask").mask_ratio == 0.3);
  CHECK(ssl::preset_defaults("dino_attention_mask").local_crops == 8);
  CHECK(ssl::preset_defaults("dino").local_crops == 8);
  CHECK(ssl::preset_defaults("byol").local_crops == 0);
  CHECK(ssl::preset_defaults("mocov2").info_nce_temperature == 0.2);
  CHECK(ssl::preset_defaults("simclr").nt_xent_temperature == 0.1);
  CHECK_THROWS_AS(ssl::preset_defaults("dino_v3"), config_error);
}

// ---- every preset trains ------------------------------------------------------------------

TEST_CASE("every preset trains 200 steps on an MLP without a non-finite value") {
#define DINO_PRESET_CASE(NAME)                                                  \
  SUBCASE(#NAME) {                                                             \
    const auto c = small(#NAME);                                               \
    auto m = ssl::make_##NAME<nn::mlp>(backbone_config(), 32, c);              \
    CHECK(m.loss().config().n_crops == n_crops_of(c, #NAME));                  \
    train_checked(m, n_crops_of(c, #NAME), #NAME);                             \
  }
  DINO_PRESET_CASE(dino)
  DINO_PRESET_CASE(dino_no_momentum)
  DINO_PRESET_CASE(dino_sinkhorn)
  DINO_PRESET_CASE(dino_two_crops)
  DINO_PRESET_CASE(dino_mse)
  DINO_PRESET_CASE(dino_predictor)
  DINO_PRESET_CASE(byol)
  DINO_PRESET_CASE(mocov2)
  DINO_PRESET_CASE(swav_like)
  DINO_PRESET_CASE(simclr)
#undef DINO_PRESET_CASE
}

TEST_CASE("BYOL and DINO with two crops train a tiny ViT") {
  nn::vit_config vc{8, 2, 1, 8, 2, 2, 4.0, true, 1e-6, 0.1};
  const cpu_policy pol{2};
  std::vector<float> g(2 * 2 * 64);
  auto run = [&](auto& m, const char* name) {
    for (int it = 0; it < 200; ++it) {
      dino_test::fill_normal(g, 300 + std::uint64_t(it));
      auto st = m.step(pol, ssl::image_crops<float>{g.data(), nullptr});  // two crops: no local ones
      REQUIRE_MESSAGE(!st.skipped, name, " step ", it);
      REQUIRE_MESSAGE(std::isfinite(st.loss), name, " step ", it);
    }
    CHECK(all_finite_params(m.student()));
    CHECK(all_finite_params(m.teacher()));
  };
  for (const char* name : {"byol", "dino_two_crops"}) {
    auto c = small(name);
    c.train.max_batch = 2;
    c.train.schedule.batch_size = 2;
    c.train.crops = {8, 4};
    if (std::string(name) == "byol") {
      auto m = ssl::make_byol<nn::vit>(vc, vc.embed_dim, c);
      CHECK(m.layout().find("predictor.0.weight") != nullptr);
      run(m, name);
    } else {
      auto m = ssl::make_dino_two_crops<nn::vit>(vc, vc.embed_dim, c);
      run(m, name);
    }
  }
}

// ---- the mechanics ----------------------------------------------------------------------------

TEST_CASE("copy_update: the teacher equals the student after every step") {
  auto m = ssl::make_dino_no_momentum<nn::mlp>(backbone_config(), 32, small("dino_no_momentum", 20));
  synthetic data(2);
  for (int it = 0; it < 3; ++it) {
    auto x = data.crops(kB, 4, std::uint64_t(it));
    m.step(cpu_policy{2}, host_view<const float>{x.data(), {4 * kB, kIn}, "crops"});
    CHECK(same_range(m.teacher().data(), m.student().data(), m.student().size()));
  }
}

TEST_CASE("no_teacher with NT-Xent never runs the teacher, its targets or its update") {
  auto c = small("simclr", 20);
  c.head.in_dim = 32;
  using M = ssl::method<nn::mlp, ssl::dino_head, counting_target<float>, ssl::nt_xent<float>, ssl::no_teacher>;
  M m(backbone_config(), c.head, counting_target<float>({32}), ssl::nt_xent<float>({2, 2, 0.1}), ssl::no_teacher{},
      c.train);
  // A teacher buffer of NaN: any teacher forward or update would show.
  std::fill(m.teacher().data(), m.teacher().data() + m.teacher().size(), std::numeric_limits<float>::quiet_NaN());
  synthetic data(3);
  std::vector<float> s0(m.student().data(), m.student().data() + m.student().size());
  for (int it = 0; it < 3; ++it) {
    auto x = data.crops(kB, 2, std::uint64_t(it));
    auto st = m.step(cpu_policy{2}, host_view<const float>{x.data(), {2 * kB, kIn}, "crops"});
    CHECK_FALSE(st.skipped);
    CHECK(std::isfinite(st.loss));
    CHECK(st.teacher_entropy == 0);
  }
  CHECK(m.target().targets_calls == 0);
  CHECK(m.target().observe_calls == 0);
  CHECK(std::isnan(m.teacher().data()[0]));  // never updated
  CHECK_FALSE(same_range(s0.data(), m.student().data(), s0.size()));
}

TEST_CASE("no_teacher with a loss that reads the teacher: the teacher forward shares the student's weights") {
  auto c = small("dino", 20);
  c.head.in_dim = 32;
  using M = ssl::method<nn::mlp, ssl::dino_head, ssl::centering<float>, ssl::cross_entropy_distillation,
                        ssl::no_teacher>;
  M m(backbone_config(), c.head, ssl::centering<float>({32, 0.9}), ssl::cross_entropy_distillation({4, 2, 0.1}),
      ssl::no_teacher{}, c.train);
  std::fill(m.teacher().data(), m.teacher().data() + m.teacher().size(), std::numeric_limits<float>::quiet_NaN());
  synthetic data(4);
  for (int it = 0; it < 3; ++it) {
    auto x = data.crops(kB, 4, std::uint64_t(it));
    auto st = m.step(cpu_policy{2}, host_view<const float>{x.data(), {4 * kB, kIn}, "crops"});
    CHECK_FALSE(st.skipped);
    CHECK(std::isfinite(st.loss));
    CHECK(st.teacher_entropy > 0);
  }
  // the teacher's logits are the student's head output (computed with the student's weights)
  auto x = data.crops(2, 1, 99);
  auto t = m.teacher_logits(cpu_policy{1}, host_view<const float>{x.data(), {2, kIn}, "x"});
  CHECK(std::isfinite(t.data[0]));
}

TEST_CASE("the predictor: trained, after the head in the layout, not followed by the teacher") {
  auto c = small("dino_predictor", 20);
  auto m = ssl::make_dino_predictor<nn::mlp>(backbone_config(), 32, c);
  const auto& L = m.layout();
  const auto* p0 = L.find("predictor.0.weight");
  REQUIRE(p0 != nullptr);
  CHECK(L.find("predictor.2.weight") != nullptr);
  CHECK(p0->offset >= L.at("head.last_layer.weight_v").offset);
  const std::size_t n = m.teacher_elems();
  CHECK(n == p0->offset);  // the predictor's parameters end the layout
  CHECK(n < m.student().size());
  const std::size_t total = m.student().size();
  std::vector<float> t0(m.teacher().data(), m.teacher().data() + total);
  std::vector<float> s0(m.student().data(), m.student().data() + total);
  synthetic data(5);
  for (int it = 0; it < 3; ++it) {
    auto x = data.crops(kB, 4, std::uint64_t(it));
    auto st = m.step(cpu_policy{2}, host_view<const float>{x.data(), {4 * kB, kIn}, "crops"});
    CHECK_FALSE(st.skipped);
    // the predictor's gradients (of this step) are not zero
    double g = 0;
    for (std::size_t i = n; i < total; ++i) g += std::fabs(double(m.grads().data()[i]));
    CHECK(g > 0);
  }
  // trained: the student's predictor moved; the teacher's stayed where it started
  CHECK_FALSE(same_range(s0.data() + n, m.student().data() + n, total - n));
  CHECK(same_range(t0.data() + n, m.teacher().data() + n, total - n));
  // the rest of the teacher follows the student by EMA
  CHECK_FALSE(same_range(t0.data(), m.teacher().data(), n));
  // a wrong predictor size is a config_error at run time when the sizes are values
  using M = ssl::dino_predictor_method<nn::mlp>;
  c.head.in_dim = 32;
  CHECK_THROWS_AS(M(backbone_config(), c.head, ssl::predictor_config(48, 16), ssl::centering<float>({32, 0.9}),
                    ssl::cross_entropy_distillation({4, 2, 0.1}), ssl::ema_update{}, c.train),
                  config_error);
}

TEST_CASE("the two-crop plan: 2 crops per image, no local crops") {
  auto m = ssl::make_dino_two_crops<nn::mlp>(backbone_config(), 32, small("dino_two_crops", 20));
  CHECK(m.loss().config().n_crops == 2);
  CHECK(m.loss().config().n_global == 2);
  synthetic data(6);
  auto x2 = data.crops(kB, 2, 0);
  CHECK_FALSE(m.step(cpu_policy{2}, host_view<const float>{x2.data(), {2 * kB, kIn}, "crops"}).skipped);
  auto x4 = data.crops(kB, 4, 1);  // multi-crop input: more rows than planned
  CHECK_THROWS_AS(m.step(cpu_policy{2}, host_view<const float>{x4.data(), {4 * kB, kIn}, "crops"}), shape_error);
}

TEST_CASE("a stateful loss: the InfoNCE queue is committed after a step and left alone by a skipped one") {
  auto c = small("mocov2", 20);
  c.queue_size = 256;
  auto m = ssl::make_mocov2<nn::mlp>(backbone_config(), 32, c);
  CHECK(m.loss().queued() == 256);  // MoCo's random start
  CHECK(m.loss().head() == 0);
  synthetic data(7);
  auto x = data.crops(kB, 2, 0);
  auto st = m.step(cpu_policy{2}, host_view<const float>{x.data(), {2 * kB, kIn}, "crops"});
  CHECK_FALSE(st.skipped);
  CHECK(m.loss().head() == 2 * kB);  // both global crops' keys enqueued
  CHECK(m.loss().pending_rows() == 0);
  std::vector<float> q(m.loss().queue().data, m.loss().queue().data + 256 * 32);
  x[5] = std::numeric_limits<float>::quiet_NaN();
  st = m.step(cpu_policy{2}, host_view<const float>{x.data(), {2 * kB, kIn}, "crops"});
  CHECK(st.skipped);
  CHECK(m.loss().head() == 2 * kB);
  CHECK(m.loss().pending_rows() == 0);
  CHECK(same_range(q.data(), m.loss().queue().data, q.size()));
}

namespace {
// n steps of m on the synthetic crops of steps [first, first + n).
template <class M>
void run_steps(M& m, const synthetic& data, int n_crops, int first, int n) {
  for (int s = first; s < first + n; ++s) {
    auto x = data.crops(kB, n_crops, std::uint64_t(s));
    REQUIRE_FALSE(m.step(cpu_policy{2}, host_view<const float>{x.data(), {n_crops * kB, kIn}, "crops"}).skipped);
  }
}
template <class M>
void check_resume(const char* preset, M a, M b, M c) {
  CAPTURE(preset);
  const auto cfg = small(preset, 20);
  const int nc = n_crops_of(cfg, preset);
  synthetic data(3);
  const std::string path = std::filesystem::temp_directory_path() / (std::string("dino_resume_") + preset + ".safetensors");
  run_steps(a, data, nc, 0, 3);
  train::save_checkpoint(path, a, 0);
  train::restore_checkpoint(path, b);  // a fresh method continues from the file...
  run_steps(a, data, nc, 3, 2);
  run_steps(b, data, nc, 3, 2);
  CHECK(same_range(a.student().data(), b.student().data(), a.student().size()));  // ...bit for bit
  CHECK(same_range(a.teacher().data(), b.teacher().data(), a.teacher().size()));
  if constexpr (train::has_queue<M>) {
    CHECK(a.loss().head() == b.loss().head());
    CHECK(same_range(a.loss().queue().data, b.loss().queue().data, std::size_t(a.loss().queue().numel())));
  }
  // A file of another method is refused and changes nothing.
  const std::vector<float> before(c.student().data(), c.student().data() + c.student().size());
  auto dino = ssl::make_dino<nn::mlp>(backbone_config(), 32, small("dino", 20));
  const std::string other = path + ".dino.safetensors";
  train::save_checkpoint(other, dino, 0);
  if constexpr (train::has_queue<M>) CHECK_THROWS_AS(train::restore_checkpoint(other, c), io_error);
  CHECK(same_range(before.data(), c.student().data(), before.size()));
  std::filesystem::remove(path);
  std::filesystem::remove(path + ".json");
  std::filesystem::remove(other);
  std::filesystem::remove(other + ".json");
}
}  // namespace

TEST_CASE("checkpoints hold each preset's state: resume continues bit for bit (InfoNCE queue, no center)") {
  const auto mk_moco = [] { return ssl::make_mocov2<nn::mlp>(backbone_config(), 32, small("mocov2", 20)); };
  check_resume("mocov2", mk_moco(), mk_moco(), mk_moco());
  const auto mk_sk = [] { return ssl::make_dino_sinkhorn<nn::mlp>(backbone_config(), 32, small("dino_sinkhorn", 20)); };
  check_resume("dino_sinkhorn", mk_sk(), mk_sk(), mk_sk());
  const auto mk_sim = [] { return ssl::make_simclr<nn::mlp>(backbone_config(), 32, small("simclr", 20)); };
  check_resume("simclr", mk_sim(), mk_sim(), mk_sim());
}

// ---- the StudentMask: attention-conditioned masking of the student's global crops -------------

namespace {
nn::vit_config mask_vit() { return nn::vit_config{8, 2, 1, 8, 2, 2, 4.0, true, 1e-6, 0.1}; }  // 4 x 4 patches
ssl::dino_config mask_config(double ratio, std::int64_t steps) {
  auto c = small("dino_attention_mask", steps);
  c.local_crops = 2;
  c.mask_ratio = ratio;
  c.train.max_batch = 2;
  c.train.schedule.batch_size = 2;
  c.train.crops = {8, 4};
  return c;
}
struct vit_crops {
  std::vector<float> g = std::vector<float>(2 * 2 * 64), l = std::vector<float>(2 * 2 * 16);
  ssl::image_crops<float> at(std::uint64_t step) {
    dino_test::fill_normal(g, 400 + step);
    dino_test::fill_normal(l, 500 + step);
    return {g.data(), l.data()};
  }
};
}  // namespace

TEST_CASE("dino_attention_mask trains a tiny ViT 200 steps without a non-finite value") {
  auto m = ssl::make_dino_attention_mask<nn::vit>(mask_vit(), 8, mask_config(0.3, 200));
  CHECK(m.masked_patches() == 16);
  CHECK(m.mask().kept(16) == 12);  // floor(0.3 * 16) = 4 patches dropped
  const cpu_policy pol{2};
  vit_crops data;
  for (int it = 0; it < 200; ++it) {
    auto st = m.step(pol, data.at(std::uint64_t(it)));
    REQUIRE_MESSAGE(!st.skipped, "step ", it, ": ", st.skip_reason);
    REQUIRE_MESSAGE(std::isfinite(st.loss), "step ", it);
    REQUIRE(std::isfinite(st.teacher_entropy));
  }
  CHECK(all_finite_params(m.student()));
  CHECK(all_finite_params(m.teacher()));
  CHECK(m.kept_patches().size() == 2 * 2 * 12);
}

TEST_CASE("the StudentMask: the teacher's CLS attention picks each global crop's kept patches") {
  auto m = ssl::make_dino_attention_mask<nn::vit>(mask_vit(), 8, mask_config(0.5, 20));
  const cpu_policy pol{2};
  vit_crops data;
  // the same teacher, by hand: inference on the global crops with the CLS attention, then the selection
  param_layout L;
  nn::vit v(mask_vit(), L, "backbone.");
  auto pk = v.make_pack<float>({{4, 8, 8}});
  for (int it = 0; it < 3; ++it) {
    std::vector<float> teacher(m.teacher().data(), m.teacher().data() + m.teacher().size());
    const auto x = data.at(std::uint64_t(it));
    REQUIRE_FALSE(m.step(pol, x).skipped);
    std::vector<float> y(4 * 8), attn(v.cls_attention_elems(pk)), scratch(v.infer_scratch_elems(pk));
    nn::vit::infer_outputs<float> out;
    out.cls_attention = attn.data();
    const float* imgs[1] = {x.global};
    v.infer(pol, host_view<const float>{teacher.data(), {std::int64_t(teacher.size())}, "teacher"}, pk,
            std::span<const float* const>(imgs, 1), host_view<float>{y.data(), {4, 8}, "y"},
            host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"}, out);
    ssl::attention_mask sel({0.5});
    std::vector<std::int64_t> keep(4 * 8);
    sel.select(pol, host_view<const float>{attn.data(), {4, 2 * 17}, "attention"}, 2, 16, keep.data());
    const auto got = m.kept_patches();
    REQUIRE(got.size() == keep.size());
    CHECK(std::equal(keep.begin(), keep.end(), got.begin()));
  }
  CHECK_THROWS_WITH_AS(ssl::make_dino_attention_mask<nn::vit>(mask_vit(), 8, mask_config(1.0, 20)),
                       doctest::Contains("ratio must be in [0, 1)"), config_error);
  CHECK_THROWS_AS(ssl::make_dino_attention_mask<nn::vit>(mask_vit(), 8, mask_config(-0.5, 20)), config_error);
}

TEST_CASE("the StudentMask at ratio 0 is DINO bit for bit") {
  auto a = ssl::make_dino_attention_mask<nn::vit>(mask_vit(), 8, mask_config(0.0, 20));
  auto b = ssl::make_dino<nn::vit>(mask_vit(), 8, mask_config(0.0, 20));
  auto c = ssl::make_dino_attention_mask<nn::vit>(mask_vit(), 8, mask_config(0.3, 20));
  CHECK(a.masked_patches() == 0);
  CHECK(a.kept_patches().empty());
  const cpu_policy pol{2};
  vit_crops data;
  for (int it = 0; it < 5; ++it) {
    const auto x = data.at(std::uint64_t(it));
    const auto sa = a.step(pol, x), sb = b.step(pol, x);
    c.step(pol, x);
    CHECK(std::memcmp(&sa.loss, &sb.loss, sizeof(double)) == 0);
    CHECK(std::memcmp(&sa.teacher_entropy, &sb.teacher_entropy, sizeof(double)) == 0);
  }
  CHECK(same_range(a.student().data(), b.student().data(), a.student().size()));
  CHECK(same_range(a.teacher().data(), b.teacher().data(), a.teacher().size()));
  CHECK(same_range(a.grads().data(), b.grads().data(), a.grads().size()));
  CHECK_FALSE(same_range(c.student().data(), b.student().data(), b.student().size()));  // masking changes the run
}
