// Training state: 10 steps, save, restore into a fresh method, 10 more steps equals 20 steps
// bit for bit (ViT backbone with DropPath); a checkpoint that does not fit is refused without
// changing anything. The trainer (train::run) over the multi-crop loader on synthetic shape
// images (shapes.hpp): gradient accumulation feeds the right batches to method::step, matches
// one larger batch, resumes bit for bit (the log drops what a stopped run wrote after its
// checkpoint) and refuses bad values; and a 200-step smoke run of a
// tiny ViT on colour textures whose loss falls without collapse.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <vector>

#include <dino/data/array_dataset.hpp>
#include <dino/data/loader.hpp>
#include <dino/dino.hpp>
#include <dino/eval/knn.hpp>
#include <dino/train/checkpoint.hpp>
#include <dino/train/features.hpp>
#include <dino/train/trainer.hpp>

#include "gradcheck.hpp"
#include "shapes.hpp"

using namespace dino;

namespace {
ssl::dino_config config() {
  ssl::dino_config c;
  c.head.out_dim = 32;
  c.head.hidden_dim = 16;
  c.head.bottleneck_dim = 8;
  c.local_crops = 2;
  c.train.max_batch = 2;
  c.train.crops = {8, 4};
  c.train.schedule.epochs = 4;
  c.train.schedule.iters_per_epoch = 5;
  c.train.schedule.warmup_epochs = 1;
  c.train.schedule.lr = 0.5;
  c.train.freeze_last_layer = 1;
  c.train.seed = 7;
  return c;
}
nn::vit_config vit_cfg() { return nn::vit_config{8, 2, 1, 8, 2, 2, 4.0, true, 1e-6, 0.2}; }

template <class M>
void run_steps(M& m, int from, int to, cpu_policy pol = cpu_policy{2}) {
  std::vector<float> g(2 * 2 * 64), l(2 * 2 * 16);
  for (int it = from; it < to; ++it) {
    dino_test::fill_normal(g, 1000 + std::uint64_t(it));
    dino_test::fill_normal(l, 2000 + std::uint64_t(it));
    auto st = m.step(pol, ssl::image_crops<float>{g.data(), l.data()});
    REQUIRE_FALSE(st.skipped);
  }
}
bool same(const flat_params<float>& a, const flat_params<float>& b) {
  return std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
}  // namespace

TEST_CASE("resume: 10 steps, save, restore, 10 steps equals 20 steps bit for bit (fp32 and bf16)") {
  const std::string path = std::string(DINO_TEST_TMP) + "/resume.safetensors";
  std::vector<float> fp32_student;
  for (bool bf16 : {false, true}) {
    CAPTURE(bf16);
    const cpu_policy pol{2, bf16};
    auto a = ssl::make_dino<nn::vit>(vit_cfg(), 8, config());
    run_steps(a, 0, 20, pol);
    if (!bf16) fp32_student.assign(a.student().data(), a.student().data() + a.student().size());
    else CHECK(std::memcmp(fp32_student.data(), a.student().data(), fp32_student.size() * sizeof(float)) != 0);

    {
      auto b = ssl::make_dino<nn::vit>(vit_cfg(), 8, config());
      run_steps(b, 0, 10, pol);
      train::save_checkpoint(path, b, 7);
    }
    auto cfg = config();
    cfg.train.seed = 99;  // a different initialisation: everything must come from the file
    auto c = ssl::make_dino<nn::vit>(vit_cfg(), 8, cfg);
    auto info = train::restore_checkpoint(path, c);
    CHECK(info.iteration == 10);
    CHECK(info.seed == 7);
    CHECK(c.iteration() == 10);
    // the DropPath key is the run's seed, which the trainer takes from the checkpoint; here the
    // method's own seed differs, so rebuild it with the checkpoint's seed before continuing
    auto d = ssl::make_dino<nn::vit>(vit_cfg(), 8, config());
    train::restore_checkpoint(path, d);
    run_steps(d, 10, 20, pol);
    CHECK(same(a.student(), d.student()));
    CHECK(same(a.teacher(), d.teacher()));
    CHECK(same(a.optimizer().exp_avg(), d.optimizer().exp_avg()));
    CHECK(std::memcmp(a.target().center().data, d.target().center().data, 32 * sizeof(float)) == 0);
    CHECK(a.optimizer().steps() == d.optimizer().steps());
  }
}

TEST_CASE("a checkpoint that does not fit is refused and changes nothing") {
  const std::string path = std::string(DINO_TEST_TMP) + "/other.safetensors";
  auto a = ssl::make_dino<nn::vit>(vit_cfg(), 8, config());
  run_steps(a, 0, 2);
  train::save_checkpoint(path, a, 7);
  auto cfg = config();
  cfg.head.out_dim = 16;  // another K
  auto b = ssl::make_dino<nn::vit>(vit_cfg(), 8, cfg);
  std::vector<float> before(b.student().data(), b.student().data() + b.student().size());
  CHECK_THROWS_AS(train::restore_checkpoint(path, b), io_error);
  CHECK(std::memcmp(before.data(), b.student().data(), before.size() * sizeof(float)) == 0);
  CHECK(b.iteration() == 0);
  CHECK_THROWS_WITH_AS(train::restore_checkpoint(std::string(DINO_TEST_TMP) + "/nothing.safetensors", b),
                       doctest::Contains("nothing.safetensors"), io_error);
}

// ---- the trainer: gradient accumulation ------------------------------------------------------

namespace {
data::array_dataset shapes(int n, std::uint32_t seed) {
  auto s = dino_test::shape_images(n, seed);
  return data::array_dataset(n, dino_test::kShapeSize, dino_test::kShapeSize, 1, std::move(s.pixels),
                             std::move(s.labels), dino_test::kShapeClasses, "shapes");
}
// 16-pixel global and 8-pixel local crops (2 of them) of the 28-pixel shapes.
data::multicrop_config small_crops() {
  auto mc = data::multicrop_28px(2);
  mc.global_size = 16;
  mc.local_size = 8;
  return mc;
}
data::loader_config loader_cfg(std::int64_t batch, std::int64_t start_epoch = 0, std::int64_t start_batch = 0) {
  data::loader_config lc;
  lc.batch_size = batch;
  lc.threads = 1;
  lc.seed = 5;
  lc.start_epoch = start_epoch;
  lc.start_batch = start_batch;
  return lc;
}
// config() for micro-batches of `batch` images of small_crops(): 2 epochs of 4 steps.
ssl::dino_config loader_config_of(std::int64_t batch) {
  auto c = config();
  c.train.max_batch = batch;
  c.train.crops = {16, 8};
  c.train.schedule.epochs = 2;
  c.train.schedule.iters_per_epoch = 4;
  c.train.schedule.batch_size = 8;
  return c;
}
nn::vit_config loader_vit(double drop_path) { return nn::vit_config{16, 4, 1, 8, 2, 2, 4.0, true, 1e-6, drop_path}; }
train::run_config quiet_run(const std::string& dir, std::int64_t accumulate) {
  std::filesystem::remove_all(dir);
  train::run_config rc;
  rc.out_dir = dir;
  rc.progress = 0;
  rc.log_every = 0;
  rc.seed = 7;
  rc.accumulate = accumulate;
  return rc;
}
template <class M>
bool same_state(M& a, M& b) {
  return same(a.student(), b.student()) && same(a.teacher(), b.teacher()) &&
         same(a.optimizer().exp_avg(), b.optimizer().exp_avg()) &&
         std::memcmp(a.target().center().data, b.target().center().data, 32 * sizeof(float)) == 0 &&
         a.iteration() == b.iteration();
}
double max_rel_diff(const flat_params<float>& a, const flat_params<float>& b) {
  double d = 0, s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, double(std::fabs(a.data()[i] - b.data()[i])));
    s = std::max(s, double(std::fabs(a.data()[i])));
  }
  return d / s;
}
}  // namespace

TEST_CASE("resume: the log keeps the steps before the checkpoint's and drops those after it") {
  const std::string path = std::string(DINO_TEST_TMP) + "/truncate_log.jsonl";
  {
    std::ofstream f(path, std::ios::trunc);
    for (int i = 0; i < 6; ++i) f << "{\"step\": " << i << ", \"loss\": " << 0.5 * i << "}\n";
    f << "not a step line\n";
  }
  train::detail::truncate_log(path, 3);  // a checkpoint at step 3: steps 3, 4 and 5 are run again
  std::ifstream f(path);
  std::vector<std::string> lines;
  for (std::string l; std::getline(f, l);) lines.push_back(l);
  REQUIRE(lines.size() == 4);
  CHECK(lines[0] == "{\"step\": 0, \"loss\": 0}");
  CHECK(lines[2] == "{\"step\": 2, \"loss\": 1}");
  CHECK(lines[3] == "not a step line");
  train::detail::truncate_log(path, 10);  // nothing to drop: the file stays as it is
  std::ifstream g(path);
  std::size_t n = 0;
  for (std::string l; std::getline(g, l);) ++n;
  CHECK(n == 4);
  train::detail::truncate_log(std::string(DINO_TEST_TMP) + "/no_such_log.jsonl", 0);  // no file: nothing happens
  CHECK(!std::filesystem::exists(std::string(DINO_TEST_TMP) + "/no_such_log.jsonl"));
}

TEST_CASE("accumulate: the trainer gives method::step the loader's batches in order, whole steps per epoch") {
  // 36 images in batches of 4: 9 batches an epoch, 4 steps of 2 (the 9th batch is not used).
  const auto ds = shapes(36, 3);
  const std::string dir = std::string(DINO_TEST_TMP) + "/accumulate";
  auto a = ssl::make_dino<nn::vit>(loader_vit(0.2), 8, loader_config_of(4));
  {
    data::multicrop_loader<data::array_dataset> loader(ds, small_crops(), loader_cfg(4));
    const auto sum = train::run(cpu_policy{2}, a, loader, quiet_run(dir, 2));
    CHECK(sum.steps == 8);
    CHECK(sum.skipped == 0);
    CHECK(sum.finished);
  }
  // The same steps by hand: step s takes batches 2 (s % 4) and 2 (s % 4) + 1 of epoch s / 4.
  auto b = ssl::make_dino<nn::vit>(loader_vit(0.2), 8, loader_config_of(4));
  {
    data::multicrop_loader<data::array_dataset> loader(ds, small_crops(), loader_cfg(4));
    std::vector<float> g[2], l[2];
    for (int s = 0; s < 8; ++s) {
      ssl::image_crops<float> micro[2];
      for (int k = 0; k < 2; ++k) {
        auto x = loader.next();
        if (x.index == 8) x = loader.next();  // the batch no step uses
        REQUIRE(x.epoch == s / 4);
        REQUIRE(x.index == 2 * (s % 4) + k);
        g[k].assign(x.global, x.global + 2 * 4 * 16 * 16);
        l[k].assign(x.local, x.local + 2 * 4 * 8 * 8);
        micro[k] = {g[k].data(), l[k].data()};
      }
      REQUIRE_FALSE(b.step(cpu_policy{2}, std::span<const ssl::image_crops<float>>(micro, 2)).skipped);
    }
  }
  CHECK(same_state(a, b));  // bit for bit: the same operations on the same numbers

  // Stop after step 5 (the checkpoint of save_every = 1 holds 5 steps: mid-epoch), resume from
  // resume_position and finish: the same state as the uninterrupted run, bit for bit.
  CHECK(train::resume_position(5, 9, 2) == std::pair<std::int64_t, std::int64_t>{1, 2});
  struct stop {};
  {
    auto c = ssl::make_dino<nn::vit>(loader_vit(0.2), 8, loader_config_of(4));
    data::multicrop_loader<data::array_dataset> loader(ds, small_crops(), loader_cfg(4));
    auto rc = quiet_run(dir, 2);
    rc.save_every = 1;
    rc.after_step = [](const ssl::step_stats& st) {
      if (st.iteration == 5) throw stop{};  // before the checkpoint of step 5 is written
    };
    CHECK_THROWS_AS(train::run(cpu_policy{2}, c, loader, rc), stop);
  }
  auto d = ssl::make_dino<nn::vit>(loader_vit(0.2), 8, loader_config_of(4));
  REQUIRE(train::restore_checkpoint(dir + "/checkpoint.safetensors", d).iteration == 5);
  const auto [e0, b0] = train::resume_position(d.iteration(), 9, 2);
  data::multicrop_loader<data::array_dataset> loader(ds, small_crops(), loader_cfg(4, e0, b0));
  auto rc = quiet_run(dir, 2);
  rc.out_dir = dir;
  CHECK(train::run(cpu_policy{2}, d, loader, rc).steps == 3);
  CHECK(same_state(a, d));
}

TEST_CASE("accumulate: 2 micro-batches of 2 images give the step of one batch of 4") {
  // The same 32 images in the same order either way (the loader's permutation and crops depend
  // on (seed, epoch, sample), not on the batch size), no DropPath (its key is the micro-batch),
  // the same schedules. The loss is a mean over images, each micro-batch's scaled by 1/2; the
  // center takes one EMA step with the mean teacher output of all 4 images (centering.hpp).
  // What differs is the order of float sums (the weight gradients sum 2 + 2 rows instead of 4,
  // then add), so after 8 steps of AdamW, whose update divides by sqrt(v) and so passes on
  // the relative rounding error of small gradients, parameters agree to ~1e-6 relative.
  const auto ds = shapes(32, 4);
  auto one = ssl::make_dino<nn::vit>(loader_vit(0), 8, loader_config_of(4));
  auto two = ssl::make_dino<nn::vit>(loader_vit(0), 8, loader_config_of(2));
  std::vector<double> loss_one, loss_two;
  {
    data::multicrop_loader<data::array_dataset> loader(ds, small_crops(), loader_cfg(4));
    loss_one = train::run(cpu_policy{2}, one, loader, quiet_run(std::string(DINO_TEST_TMP) + "/acc1", 1)).loss;
  }
  {
    data::multicrop_loader<data::array_dataset> loader(ds, small_crops(), loader_cfg(2));
    loss_two = train::run(cpu_policy{2}, two, loader, quiet_run(std::string(DINO_TEST_TMP) + "/acc2", 2)).loss;
  }
  REQUIRE(loss_one.size() == 8);
  REQUIRE(loss_two.size() == 8);
  for (std::size_t i = 0; i < 8; ++i) CHECK(loss_two[i] == doctest::Approx(loss_one[i]).epsilon(1e-5));
  const double ds_rel = max_rel_diff(one.student(), two.student()), dt_rel = max_rel_diff(one.teacher(), two.teacher());
  const double dc_rel = [&] {
    double d = 0, s = 0;
    for (int k = 0; k < 32; ++k) {
      d = std::max(d, double(std::fabs(one.target().center().data[k] - two.target().center().data[k])));
      s = std::max(s, double(std::fabs(one.target().center().data[k])));
    }
    return d / s;
  }();
  MESSAGE("max relative difference after 8 steps: student " << ds_rel << ", teacher " << dt_rel << ", center " << dc_rel);
  CHECK(ds_rel < 1e-5);  // measured 5.7e-7 (student), 3.7e-9 (teacher), 3.1e-8 (center)
  CHECK(dt_rel < 1e-5);
  CHECK(dc_rel < 1e-5);
}

TEST_CASE("accumulate: bad values are refused with a config_error naming accumulate") {
  const auto ds = shapes(36, 3);
  auto m = ssl::make_dino<nn::vit>(loader_vit(0), 8, loader_config_of(4));
  data::multicrop_loader<data::array_dataset> loader(ds, small_crops(), loader_cfg(4));
  const std::string dir = std::string(DINO_TEST_TMP) + "/accumulate-bad";
  CHECK_THROWS_WITH_AS(train::run(cpu_policy{2}, m, loader, quiet_run(dir, 0)),
                       doctest::Contains("accumulate must be >= 1, got 0"), config_error);
  CHECK_THROWS_WITH_AS(train::run(cpu_policy{2}, m, loader, quiet_run(dir, 10)),
                       doctest::Contains("accumulate 10 is larger than the loader's 9 batches per epoch"), config_error);
  CHECK_FALSE(std::filesystem::exists(dir));  // refused before anything is written
  CHECK(m.iteration() == 0);
  CHECK_THROWS_WITH_AS(train::resume_position(3, 9, -1), doctest::Contains("accumulate"), config_error);
  CHECK_THROWS_WITH_AS(train::steps_per_epoch(9, 10), doctest::Contains("accumulate 10"), config_error);
  CHECK(train::steps_per_epoch(9, 9) == 1);
  // a loader that starts inside a step of 2 batches (batch 1 of its epoch)
  data::multicrop_loader<data::array_dataset> odd(ds, small_crops(), loader_cfg(4, 0, 1));
  CHECK_THROWS_WITH_AS(train::run(cpu_policy{2}, m, odd, quiet_run(dir, 2)),
                       doctest::Contains("resume_position"), config_error);
}

// ---- a 200-step smoke run ---------------------------------------------------------------------

namespace {
// The colour textures of shapes.hpp (3 channels, 4 hue classes) as a data set.
data::array_dataset colour_textures(int n, std::uint32_t seed) {
  auto s = dino_test::colour_textures(n, seed);
  return data::array_dataset(n, dino_test::kShapeSize, dino_test::kShapeSize, s.channels, std::move(s.pixels),
                             std::move(s.labels), dino_test::kShapeClasses, "colour textures");
}
// Weighted k-NN top-1 (k = 20) of the teacher backbone's CLS features: test against train.
template <class M>
double knn_top1(M& m, const data::array_dataset& train, const data::array_dataset& test) {
  const cpu_policy pol{2};
  const std::int64_t D = m.backbone().out_dim();
  const host_view<const float> P{m.teacher().data(), {std::int64_t(m.teacher().size())}, "teacher"};
  const std::vector<float> mean(std::size_t(train.channels()), 0.5f), stdev(mean);
  std::vector<float> ftr(std::size_t(train.size() * D)), fte(std::size_t(test.size() * D));
  train::extract_features(pol, m.backbone(), P, train, train.size(), mean, stdev, 128, ftr.data());
  train::extract_features(pol, m.backbone(), P, test, test.size(), mean, stdev, 128, fte.data());
  return eval::knn_classify(pol, ftr.data(), train.labels().data(), train.size(), fte.data(), test.labels().data(),
                            test.size(), D, dino_test::kShapeClasses, {20})
      .at(20)
      .top1;
}
// The teacher's targets q = softmax((t - c) / tau) on n global crops [n, C, G, G] (the
// method's teacher, head and center): the mean per-crop entropy H(q) and the entropy of the
// mean target H(mean q), in nats. Their difference is the mutual information between a crop
// and its prototype; both collapses make it 0 (uniform: both entropies ln K; one dominant
// prototype: both 0).
template <class M>
std::pair<double, double> teacher_entropies(M& m, const float* crops, std::int64_t n, std::int64_t G, double tau) {
  const cpu_policy pol{2};
  const std::int64_t D = m.backbone().out_dim(), K = m.head().out_dim();
  const host_view<const float> P{m.teacher().data(), {std::int64_t(m.teacher().size())}, "teacher"};
  train::vit_feature_runner<cpu_policy> features(pol, m.backbone(), P, n, G, G);
  std::vector<float> f(std::size_t(n * D)), t(std::size_t(n * K)), q(std::size_t(n * K)), e(static_cast<std::size_t>(n)),
      scratch(m.head().scratch_elems(n));
  features.run(crops, n, f.data());
  m.head().infer(pol, P, host_view<const float>{f.data(), {n, D}, "features"}, host_view<float>{t.data(), {n, K}, "logits"},
                 host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
  const double h = m.target().targets(pol, host_view<const float>{t.data(), {n, K}, "logits"}, tau,
                                      host_view<float>{q.data(), {n, K}, "q"}, host_view<float>{e.data(), {n}, "H"});
  std::vector<double> mean(std::size_t(K), 0.0);
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t k = 0; k < K; ++k) mean[std::size_t(k)] += double(q[std::size_t(i * K + k)]) / double(n);
  double hm = 0;
  for (double p : mean)
    if (p > 0) hm -= p * std::log(p);
  return {h, hm};
}
}  // namespace

TEST_CASE("smoke: 200 steps of a tiny ViT on colour textures through the loader and train::run") {
  // The image path end to end: 640 colour-texture images (shapes.hpp: 4 hue classes, every
  // image its own texture, orientation, period, brightness and saturation) through the
  // multi-crop loader (2 x 16 + 2 x 8 px crops of the 28-px images, DINO's augmentations
  // unchanged: flip, colour jitter, grayscale, blur, solarize), a ViT of D 32, depth 2, patch
  // 4, a head with K 256, 200 steps of train::run (10 loader epochs of 20 batches of 32).
  //
  // The recipe is the reference's (tau_s 0.1, center momentum 0.9, teacher momentum 0.996 ->
  // 1, AdamW, wd 0.04 -> 0.4, clip 3, last layer frozen the first epoch) but for tau_t 0.02,
  // the first author's advice when the loss does not fall (dino-spec §7 item 2). Why these
  // images: on the grey shapes of shape_images() (four nearly identical images a class) no
  // setting tried (K 8-256, tau_t 0.01-0.06, center momentum 0.9-0.99, lr, teacher momentum,
  // crops, weight decay) kept the loss falling without collapse: they drifted to the uniform
  // output or to near one-hot targets. Grey textures with random orientation, period and
  // brightness did no better under the full augmentations: the brightness jitter and the
  // solarization make brightness, the one cue a tiny ViT picks up in 200 steps, disagree
  // between views, and the teacher went towards uniform (entropy 3.6-4.2 of ln 64). Hue
  // survives the augmentations (brightness and contrast keep it, hue jitter moves it by 36
  // degrees at most, grayscale takes 20 % of the crops), so here the teacher sharpens.
  //
  // Asserted, besides every step finite and none skipped:
  // - the loss falls: the mean loss of steps 20-39 against that of steps 180-199, by more than
  //   0.1 ln K. Not steps 0-19: the center starts at 0, so the first targets are not yet
  //   centred and are sharper (lower loss) than the settled ones. With the lr at 1e-6 (no
  //   learning) the same windows fall by 0.13 only; here by 1.15 (4.00 -> 2.85). Other seeds
  //   (model and loader) fell by 0.25-0.80, so the threshold holds for these seeds, not for
  //   any: the run is deterministic (fixed seeds, the same numbers in Debug and Release).
  // - no collapse, in the loss's own statistics over the last 20 steps: the teacher entropy
  //   below 0.9 ln K (not uniform) and above 0.05 ln K (not one-hot), KL(teacher || student)
  //   above 0.1 (both collapses drive it to 0, the paper's Figure 7), no collapse flag;
  // - no collapse, across images: on the global crops
  //   of 256 held-out images the entropy of the teacher's mean target exceeds its mean
  //   per-crop entropy by more than 1 nat (the crops spread over several prototypes, each
  //   crop sharply on few). A uniform or one-prototype teacher gives 0. (A run driven to
  //   one prototype, tau_t 0.005 and center momentum 0.999, measured: loss 0.21 -> 0.01,
  //   entropy 0, KL 0.005, this difference 0.03; tau_t 0.1: entropy 5.43 of 5.55, KL 0.05,
  //   difference 0.14; the grey shapes: entropy 5.52, difference 0.02.)
  // - the k-NN top-1 of the teacher's CLS features on the hue classes above 0.5 (chance 0.25;
  //   a sanity check: the random-init ViT already separates the hues).
  const auto train_set = colour_textures(640, 21), test_set = colour_textures(256, 22);
  auto c = loader_config_of(32);  // config(): 2 local crops, warm-up and frozen last layer 1 epoch
  c.head = {0, 256, 128, 32};      // K 256, hidden 128, bottleneck 32 (in_dim: the backbone's)
  auto& s = c.train.schedule;
  s.epochs = 10, s.iters_per_epoch = 20, s.batch_size = 32;  // 640 / 32: the loader's epochs
  s.lr = 5e-3, s.momentum_teacher = 0.996;                  // peak lr 6.25e-4
  s.teacher_temp = s.warmup_teacher_temp = 0.02;
  auto mc = small_crops();
  mc.mean = {0.5f, 0.5f, 0.5f};
  mc.std = {0.5f, 0.5f, 0.5f};
  const nn::vit_config vc{28, 4, 3, 32, 2, 2, 4.0, true, 1e-6, 0.1};
  auto m = ssl::make_dino<nn::vit>(vc, vc.embed_dim, c);
  const double knn_init = knn_top1(m, train_set, test_set);
  std::vector<ssl::step_stats> stats;
  auto rc = quiet_run(std::string(DINO_TEST_TMP) + "/smoke", 1);
  rc.after_step = [&](const ssl::step_stats& st) { stats.push_back(st); };
  const auto t0 = std::chrono::steady_clock::now();
  data::multicrop_loader<data::array_dataset> loader(train_set, mc, loader_cfg(32));
  const auto sum = train::run(cpu_policy{2}, m, loader, rc);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  REQUIRE(stats.size() == 200);
  CHECK(sum.skipped == 0);
  double early = 0, late = 0, late_h = 0, late_kl = 0;
  for (std::size_t i = 0; i < 200; ++i) {
    CAPTURE(i);
    REQUIRE(std::isfinite(stats[i].loss));
    REQUIRE(std::isfinite(stats[i].teacher_entropy));
    REQUIRE_FALSE(stats[i].skipped);
    if (i >= 20 && i < 40) early += stats[i].loss / 20;
    if (i >= 180) late += stats[i].loss / 20, late_h += stats[i].teacher_entropy / 20, late_kl += stats[i].kl / 20;
  }
  const auto& end = stats.back();
  const double ln_k = end.ln_k;
  CHECK(ln_k == doctest::Approx(std::log(256.0)));
  // the teacher's targets on the global crops of the held-out images (their own loader)
  data::loader_config held = loader_cfg(256);
  held.seed = 11;
  data::multicrop_loader<data::array_dataset> held_loader(test_set, mc, held);
  const auto [h_crop, h_mean] = teacher_entropies(m, held_loader.next().global, 256, mc.global_size, end.teacher_temp);
  const double knn = knn_top1(m, train_set, test_set);
  MESSAGE("200 steps in " << secs << " s; mean loss of steps 20-39 " << early << ", of steps 180-199 " << late
                          << " (ln K " << ln_k << "); their teacher entropy " << late_h << ", KL " << late_kl
                          << "; held-out crops: per-crop entropy " << h_crop << ", of the mean target " << h_mean
                          << "; k-NN top-1 " << knn << " (random init " << knn_init << ")");
  CHECK(late < early - 0.1 * ln_k);       // the loss falls
  CHECK(late_h < 0.9 * ln_k);             // the teacher is not uniform
  CHECK(late_h > 0.05 * ln_k);            // nor one-hot
  CHECK(late_kl > 0.1);                   // the student does not match the teacher trivially
  CHECK_FALSE(end.collapsed);             // the loss is not at ln K
  CHECK(h_mean - h_crop > 1.0);           // the images use different prototypes
  CHECK(knn > 0.5);                       // chance: 0.25
}
