// train_mlp_dino: DINO, assembled at compile time, trained on random vectors.
//
// Until the Vision Transformer lands, an MLP stands in for the backbone. The data are
// Gaussian clusters in 16 dimensions; the two global crops of an image add a little noise
// to its cluster's center, the local crops more. The program prints the loss and the
// collapse diagnostics (teacher entropy, KL(teacher || student), the ln K flag) as it goes.
//
//   train_mlp_dino [steps=300] [threads=2] [seed=0]
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <vector>

#include <dino/dino.hpp>

namespace {

constexpr int kDim = 16, kClusters = 16, kLocalCrops = 4, kCrops = 2 + kLocalCrops;

// Crop-major crops of `batch` images for one step, keyed by (seed, step) only.
std::vector<float> make_crops(const std::vector<float>& centers, std::int64_t batch, std::uint64_t seed,
                              std::uint64_t step) {
  dino::philox labels(seed, dino::rng_subsequence(10, std::uint32_t(step)));
  dino::philox noise(seed, dino::rng_subsequence(11, std::uint32_t(step)));
  std::vector<int> label(static_cast<std::size_t>(batch));
  for (auto& l : label) l = int(labels.next_u32() % kClusters);
  std::vector<float> x(static_cast<std::size_t>(kCrops * batch * kDim));
  for (int v = 0; v < kCrops; ++v)
    for (std::int64_t i = 0; i < batch; ++i)
      for (int d = 0; d < kDim; ++d)
        x[std::size_t((v * batch + i) * kDim + d)] = centers[std::size_t(label[std::size_t(i)] * kDim + d)] +
                                                     float(noise.normal() * (v < 2 ? 0.3 : 0.6));
  return x;
}

}  // namespace

int main(int argc, char** argv) try {
  const long steps = argc > 1 ? std::atol(argv[1]) : 300;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 2;
  const std::uint64_t seed = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 0;
  if (steps < 1 || threads < 1) {
    std::fprintf(stderr, "usage: train_mlp_dino [steps >= 1] [threads >= 1] [seed]\n");
    return 2;
  }
  const std::int64_t batch = 32, iters_per_epoch = 30;

  // The backbone: Linear(16, 64) GELU Linear(64, 32), PyTorch's default init.
  dino::nn::mlp_config backbone{{kDim, 64, 32}, false};
  backbone.weight_init = dino::param_init::kaiming_uniform;

  // Everything else is the reference recipe, scaled down: K = 16 prototypes, 2 + 4 crops.
  dino::ssl::dino_config cfg;
  cfg.head.out_dim = 16;
  cfg.head.hidden_dim = 64;
  cfg.head.bottleneck_dim = 16;
  cfg.local_crops = kLocalCrops;
  cfg.train.max_batch = batch;
  cfg.train.seed = seed;
  cfg.train.schedule.batch_size = batch;
  cfg.train.schedule.iters_per_epoch = iters_per_epoch;
  cfg.train.schedule.epochs = (steps + iters_per_epoch - 1) / iters_per_epoch;
  cfg.train.schedule.warmup_epochs = cfg.train.schedule.epochs > 1 ? 1 : 0;
  cfg.train.schedule.lr = 0.05;
  cfg.train.schedule.min_lr = 1e-4;
  cfg.train.schedule.momentum_teacher = 0.99;  // a short run: a faster-moving teacher

  auto model = dino::ssl::make_dino<dino::nn::mlp>(backbone, 32, cfg);
  std::printf("%s: MLP backbone + DINO head, %zu parameters, K = %lld, %d crops, batch %lld\n",
              dino::version_string(), model.layout().numel(), (long long)cfg.head.out_dim, kCrops, (long long)batch);

  std::vector<float> centers(kClusters * kDim);
  dino::philox g(seed, dino::rng_subsequence(12, 0));
  for (auto& c : centers) c = float(g.normal());

  const dino::cpu_policy pol{threads};
  for (long it = 0; it < steps; ++it) {
    auto x = make_crops(centers, batch, seed, std::uint64_t(it));
    auto st = model.step(pol, dino::host_view<const float>{x.data(), {kCrops * batch, kDim}, "crops"});
    if (st.skipped) std::printf("step %4ld skipped: %s\n", it, st.skip_reason);
    else if (it % 25 == 0 || it + 1 == steps)
      std::printf("step %4ld  loss %.4f  teacher entropy %.3f  KL %.4f  lr %.2e  wd %.3f  m %.5f  tau_t %.3f%s\n", it,
                  st.loss, st.teacher_entropy, st.kl, st.lr, st.weight_decay, st.momentum, st.teacher_temp,
                  st.collapsed ? "  COLLAPSED (loss at ln K)" : "");
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "train_mlp_dino: %s\n", e.what());
  return 1;
}
