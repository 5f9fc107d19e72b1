// train/features.hpp on the CUDA policy against the CPU: extract_features over a small
// in-memory data set through a small random ViT (CLS features, final tokens, the CLS
// attention of the last block, the CLS tokens of the last two blocks), with the parameters
// given in host memory (uploaded once) or as a device view; and a checkpoint of a ViT DINO
// method trained two steps on the GPU, read by the CPU feature path as dino-eval and
// dino-features read it. Bounds are normwise relative (cuda_test_support.cuh), fp32 with
// exact-fp32 GEMMs:
//   CLS features, tokens, last-blocks CLS tokens   5e-5 (the ViT inference bound of test_cuda_nn)
//   CLS attention                                   1e-5
#include "cuda_test_support.cuh"

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <dino/data/array_dataset.hpp>
#include <dino/io/checkpoint.hpp>
#include <dino/io/safetensors.hpp>
#include <dino/nn/init.hpp>
#include <dino/nn/vit.hpp>
#include <dino/train/checkpoint.hpp>
#include <dino/train/features.hpp>

using namespace dino_test;
using dino::cpu_policy;
using dino::cuda_policy;
using dino::device_view;
using dino::flat_params;
using dino::host_view;
using dino::param_layout;
namespace nn = dino::nn;

namespace {

/// n random images of size x size x channels (bytes) with labels 0..2.
dino::data::array_dataset random_images(std::int64_t n, std::int64_t size, std::int64_t channels, std::uint64_t seed) {
  const auto v = random_vector<float>(std::size_t(n * size * size * channels), seed, 0.0, 256.0);
  std::vector<std::uint8_t> px(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) px[i] = static_cast<std::uint8_t>(std::min(255.0f, v[i]));
  std::vector<int> labels(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) labels[std::size_t(i)] = int(i % 3);
  return dino::data::array_dataset(n, size, size, channels, std::move(px), std::move(labels), 3, "random images");
}

struct features {
  std::vector<float> cls, tokens, attention, last2;
};

/// Every output of extract_features for the first n samples, on one policy.
template <class Policy, class S>
features extract_all(const Policy& pol, const nn::vit& v, dino::tensor_view<const float, S> P,
                     const dino::data::array_dataset& ds, std::int64_t n, std::int64_t batch, const std::vector<float>& mean,
                     const std::vector<float>& stdev) {
  dino::data::image img;
  ds.load(0, img);
  const std::int64_t D = v.out_dim(), N1 = 1 + (img.height / v.config().patch) * (img.width / v.config().patch);
  features f;
  f.cls.resize(std::size_t(n * D));
  f.tokens.resize(std::size_t(n * N1 * D));
  f.attention.resize(std::size_t(n * v.config().heads * N1));
  f.last2.resize(std::size_t(n * 2 * D));
  dino::train::extract_features(pol, v, P, ds, n, mean, stdev, batch, f.cls.data(), f.attention.data(), nullptr, 1,
                                f.tokens.data());
  dino::train::extract_features(pol, v, P, ds, n, mean, stdev, batch, f.last2.data(), nullptr, nullptr, 2);
  return f;
}

}  // namespace

TEST_CASE("GPU extract_features matches the CPU: CLS features, tokens, CLS attention, last-blocks CLS tokens") {
  const cuda_policy pol = gpu().policy(false);
  const cpu_policy cpu{2};
  nn::vit_config c;
  c.img_size = 16;
  c.patch = 4;
  c.in_chans = 3;
  c.embed_dim = 48;
  c.depth = 3;
  c.heads = 3;  // head dim 16
  param_layout L;
  nn::vit v(c, L);
  flat_params<float> P(L);
  dino::nn::initialize(P, 5);
  const host_view<const float> hP{P.data(), {std::int64_t(P.size())}, "parameters"};
  auto dP = upload(std::vector<float>(P.data(), P.data() + P.size()));
  const device_view<const float> dPv{dP.data(), {std::int64_t(dP.size())}, "parameters"};
  const std::vector<float> mean{0.485f, 0.456f, 0.406f}, stdev{0.229f, 0.224f, 0.225f};
  for (std::int64_t size : {16, 12}) {  // the stored 4 x 4 grid, and resized to 3 x 3
    CAPTURE(size);
    const auto ds = random_images(11, size, 3, 100 + std::uint64_t(size));
    const std::int64_t n = 10, batch = 4;  // batches of 4, 4 and 2
    const features on_cpu = extract_all(cpu, v, hP, ds, n, batch, mean, stdev);
    const features from_host = extract_all(pol, v, hP, ds, n, batch, mean, stdev);  // uploaded by the runner
    const features from_device = extract_all(pol, v, dPv, ds, n, batch, mean, stdev);
    for (const features* g : {&from_host, &from_device}) {
      DINO_CHECK_CLOSE(g->cls, on_cpu.cls, 5e-5);
      DINO_CHECK_CLOSE(g->tokens, on_cpu.tokens, 5e-5);
      DINO_CHECK_CLOSE(g->attention, on_cpu.attention, 1e-5);
      DINO_CHECK_CLOSE(g->last2, on_cpu.last2, 5e-5);
    }
    // the parameters' place does not change the result (the same kernels on the same values)
    DINO_CHECK_CLOSE(from_host.cls, from_device.cls, 1e-6);
    DINO_CHECK_CLOSE(from_host.tokens, from_device.tokens, 1e-6);
    // the last block's CLS token of the last-two-blocks features is the CLS feature
    const std::int64_t D = c.embed_dim;
    std::vector<float> last(std::size_t(n * D));
    for (std::int64_t i = 0; i < n; ++i)
      std::copy(from_device.last2.begin() + (2 * i + 1) * D, from_device.last2.begin() + (2 * i + 2) * D,
                last.begin() + i * D);
    DINO_CHECK_CLOSE(last, from_device.cls, 1e-6);
  }
}

TEST_CASE("GPU feature runner: full batches allocate no device memory") {
  const cuda_policy pol = gpu().policy(false);
  nn::vit_config c;
  c.img_size = 16;
  c.patch = 4;
  c.in_chans = 1;
  c.embed_dim = 32;
  c.depth = 2;
  c.heads = 1;
  param_layout L;
  nn::vit v(c, L);
  flat_params<float> P(L);
  dino::nn::initialize(P, 9);
  const host_view<const float> hP{P.data(), {std::int64_t(P.size())}, "parameters"};
  dino::train::vit_feature_runner<cuda_policy> run(pol, v, hP, 3, 16, 16, {true, true, 2});
  const auto x = random_vector<float>(std::size_t(3 * 16 * 16), 11);
  std::vector<float> f(std::size_t(3 * run.feature_dim())), t(std::size_t(3 * run.tokens_per_image() * 32)),
      a(std::size_t(3 * run.attention_per_image()));
  run.run(x.data(), 3, f.data(), t.data(), a.data());
  const auto before = dino::cuda::device_allocations();
  for (int r = 0; r < 3; ++r) run.run(x.data(), 3, f.data(), t.data(), a.data());
  CHECK(dino::cuda::device_allocations() == before);
}

TEST_CASE("GPU: a ViT DINO checkpoint trained two steps on the GPU gives the CPU feature path the GPU's features") {
  const cuda_policy pol = gpu().policy(false);
  nn::vit_config vc;
  vc.img_size = 16;
  vc.patch = 4;
  vc.in_chans = 1;
  vc.embed_dim = 64;
  vc.depth = 2;
  vc.heads = 2;  // head dim 32
  vc.drop_path_rate = 0.1;
  const std::int64_t B = 4, G = 16, Ls = 8, C = 1;
  dino::ssl::dino_config c;
  c.head = {0, 32, 48, 16, 3, true};
  c.local_crops = 2;
  c.train.max_batch = B;
  c.train.crops = {G, Ls};
  c.train.seed = 3;
  auto& s = c.train.schedule;
  s.epochs = 2;
  s.iters_per_epoch = 1;
  s.batch_size = B;
  s.warmup_epochs = 0;
  s.lr = 0.5;  // 0.5 * B / 256 per step: the teacher moves visibly in two steps
  auto m = dino::ssl::make_dino<nn::vit, float, cuda_policy>(vc, vc.embed_dim, c);
  flat_params<float> init(m.layout());
  dino::assign_params(init, m.teacher());
  for (std::uint64_t step = 0; step < 2; ++step) {
    const auto glob = random_vector<float>(std::size_t(2 * B * C * G * G), 200 + step);
    const auto loc = random_vector<float>(std::size_t(2 * B * C * Ls * Ls), 300 + step);
    m.step(pol, dino::ssl::image_crops<float>{glob.data(), loc.data()});
  }
  CHECK(m.iteration() == 2);
  flat_params<float> teacher(m.layout());
  dino::assign_params(teacher, m.teacher());
  bool moved = false;
  for (std::size_t i = 0; i < teacher.size() && !moved; ++i) moved = teacher.data()[i] != init.data()[i];
  CHECK(moved);

  const std::string path = (std::filesystem::temp_directory_path() / "dino_cuda_features_ckpt.safetensors").string();
  dino::train::save_checkpoint(path, m, 3);
  // The CPU side reads the teacher backbone as dino-eval and dino-features do.
  param_layout L;
  nn::vit v(vc, L);
  flat_params<float> P(L);
  dino::io::load_options opt;
  opt.checkpoint_key = "teacher";
  dino::io::load_params(dino::io::safetensors_file::read(path), P, opt);
  REQUIRE(P.size() <= teacher.size());
  for (std::size_t i = 0; i < P.size(); ++i)  // the backbone leads the method's buffer
    if (P.data()[i] != teacher.data()[i]) {
      FAIL_CHECK("backbone element " << i << " differs between the checkpoint and the GPU teacher");
      break;
    }
  std::filesystem::remove(path);
  std::filesystem::remove(path + ".json");

  const auto ds = random_images(9, 16, 1, 400);
  const std::vector<float> mean{0.5f}, stdev{0.5f};
  const host_view<const float> hP{P.data(), {std::int64_t(P.size())}, "parameters"};
  const device_view<const float> dT{m.teacher().data(), {std::int64_t(m.teacher().size())}, "teacher"};
  const features on_cpu = extract_all(cpu_policy{2}, v, hP, ds, 9, 4, mean, stdev);
  const features on_gpu = extract_all(pol, m.backbone(), dT, ds, 9, 4, mean, stdev);  // the method's own buffer
  DINO_CHECK_CLOSE(on_gpu.cls, on_cpu.cls, 5e-5);
  DINO_CHECK_CLOSE(on_gpu.tokens, on_cpu.tokens, 5e-5);
  DINO_CHECK_CLOSE(on_gpu.attention, on_cpu.attention, 1e-5);
  DINO_CHECK_CLOSE(on_gpu.last2, on_cpu.last2, 5e-5);
}
