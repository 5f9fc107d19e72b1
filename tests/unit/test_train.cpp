// Training state: 10 steps, save, restore into a fresh method, 10 more steps equals 20 steps
// bit for bit (ViT backbone with DropPath); a checkpoint that does not fit is refused without
// changing anything.
#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

#include <dino/dino.hpp>
#include <dino/train/checkpoint.hpp>

#include "gradcheck.hpp"

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
void run_steps(M& m, int from, int to) {
  std::vector<float> g(2 * 2 * 64), l(2 * 2 * 16);
  for (int it = from; it < to; ++it) {
    dino_test::fill_normal(g, 1000 + std::uint64_t(it));
    dino_test::fill_normal(l, 2000 + std::uint64_t(it));
    auto st = m.step(cpu_policy{2}, ssl::image_crops<float>{g.data(), l.data()});
    REQUIRE_FALSE(st.skipped);
  }
}
bool same(const flat_params<float>& a, const flat_params<float>& b) {
  return std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}
}  // namespace

TEST_CASE("resume: 10 steps, save, restore, 10 steps equals 20 steps bit for bit") {
  const std::string path = std::string(DINO_TEST_TMP) + "/resume.safetensors";
  auto a = ssl::make_dino<nn::vit>(vit_cfg(), 8, config());
  run_steps(a, 0, 20);

  {
    auto b = ssl::make_dino<nn::vit>(vit_cfg(), 8, config());
    run_steps(b, 0, 10);
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
  run_steps(d, 10, 20);
  CHECK(same(a.student(), d.student()));
  CHECK(same(a.teacher(), d.teacher()));
  CHECK(same(a.optimizer().exp_avg(), d.optimizer().exp_avg()));
  CHECK(std::memcmp(a.target().center().data, d.target().center().data, 32 * sizeof(float)) == 0);
  CHECK(a.optimizer().steps() == d.optimizer().steps());
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
