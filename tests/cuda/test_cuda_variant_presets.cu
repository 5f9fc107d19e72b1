// Every preset of ssl/presets.hpp but dino (which test_cuda_method.cu runs) on a tiny ViT,
// GPU against CPU from the same seed:
//   - 20 steps: each step's loss within kTolLoss (relative) of the CPU's, and the same skip
//     and clip decisions; the GPU's stats of steps 10..19 read only after all of them ran;
//   - those last 10 GPU steps neither allocate device memory nor wait for the device;
//   - a step with a NaN pixel is skipped on the device: parameters, AdamW moments, teacher,
//     center and queue stay byte-identical;
//   - dino_attention_mask: the kept patches of every step equal the CPU's.
// (The same binary as test_cuda_variants.cu: the parts one by one.)
//
// kTolLoss = 2e-4: the step-0 losses agree to fp32 rounding (about 1e-6: the ViT, head and
// loss in exact fp32 GEMMs, TF32 off); over 20 AdamW steps the parameters drift apart by
// rounding as in the golden ViT run (1e-4 after 10 steps, test_cuda_method.cu).
#include "cuda_test_support.cuh"

#include <algorithm>
#include <cstring>
#include <string>

#include <dino/nn/vit.hpp>
#include <dino/ssl/presets.hpp>
#include <dino/train/checkpoint.hpp>

using namespace dino_test;
using dino::cpu_policy;
using dino::cuda_policy;

namespace {

constexpr double kTolLoss = 2e-4;
constexpr int kSteps = 20;

dino::nn::vit_config tiny_vit() { return {16, 4, 1, 64, 1, 2, 2.0, true, 1e-6, 0.0}; }

dino::ssl::dino_config tiny_config(const char* preset) {
  auto c = dino::ssl::preset_defaults(preset);
  c.head = {0, 67, 32, 16, 3, true};  // K odd
  if (!dino::ssl::two_crop_preset(preset)) c.local_crops = 2;
  c.predictor_hidden = 24;
  c.queue_size = 50;  // 6 keys a step: the ring wraps after 8 steps
  c.train.max_batch = 3;
  c.train.seed = 11;
  c.train.crops = {16, 8};
  c.train.freeze_last_layer = 1;
  auto& s = c.train.schedule;
  s.epochs = 3;
  s.iters_per_epoch = 10;
  s.batch_size = 3;
  s.warmup_epochs = 1;
  s.warmup_teacher_temp_epochs = 1;
  s.lr = 0.05;  // lr 0.05 * 3 / 256: the parameters move, slowly
  return c;
}

/// The crops of each step, crop-major NCHW (global [2 B, 1, 16, 16], local [L B, 1, 8, 8]).
struct step_crops {
  std::vector<std::vector<float>> global, local;
  step_crops(const dino::ssl::dino_config& c, int steps) {
    const std::int64_t B = c.train.max_batch;
    for (int s = 0; s < steps; ++s) {
      global.push_back(random_vector<float>(std::size_t(2 * B * 16 * 16), 1000 + 2 * std::uint64_t(s), -2, 2));
      local.push_back(random_vector<float>(std::size_t(std::max(c.local_crops, 1) * B * 8 * 8),
                                           1001 + 2 * std::uint64_t(s), -2, 2));
    }
  }
  dino::ssl::image_crops<float> at(int s) const {
    return {global[std::size_t(s)].data(), local[std::size_t(s)].data()};
  }
};

/// Every buffer a skipped step must leave alone, copied to the host.
template <class M>
std::vector<std::vector<float>> state_of(M& m) {
  std::vector<std::vector<float>> s;
  for (auto* p : {&m.student(), &m.teacher(), &m.optimizer().exp_avg(), &m.optimizer().exp_avg_sq()})
    s.push_back(dino::cuda::to_host(p->data(), p->size()));
  if constexpr (dino::train::has_center<M>) {
    const auto c = m.target().center();
    s.push_back(dino::cuda::to_host(c.data, std::size_t(c.numel())));
  }
  if constexpr (dino::train::has_queue<M>) {
    const auto q = m.loss().queue();
    s.push_back(dino::cuda::to_host(q.data, std::size_t(q.numel())));
    s.push_back({float(m.loss().queued()), float(m.loss().head())});
  }
  return s;
}

template <class CpuM, class GpuM>
void check_preset(const char* name, CpuM& cpu_m, GpuM& gpu_m, const dino::ssl::dino_config& c) {
  CAPTURE(name);
  const cuda_policy pol = gpu().policy(false);
  DINO_CUDA_CHECK(cudaDeviceSynchronize());  // set-up copies on the legacy stream
  step_crops data(c, kSteps + 2);
  std::vector<dino::ssl::step_stats> on_cpu, on_gpu;
  std::uint64_t allocs = 0, waits = 0;
  for (int s = 0; s < kSteps; ++s) {
    on_cpu.push_back(cpu_m.step(cpu_policy{2}, data.at(s)));
    if (s == kSteps / 2) {
      allocs = dino::cuda::device_allocations();
      waits = dino::cuda::host_waits();
    }
    on_gpu.push_back(gpu_m.step(pol, data.at(s)));
    if (s < kSteps / 2) gpu_m.read_stats(pol, on_gpu.back());
  }
  {
    INFO("the last host wait: ", dino::cuda::last_host_wait());
    CHECK(dino::cuda::device_allocations() == allocs);
    CHECK(dino::cuda::host_waits() == waits);
  }
  for (int s = 0; s < kSteps; ++s) {
    CAPTURE(s);
    auto& b = on_gpu[std::size_t(s)];
    gpu_m.read_stats(pol, b);
    const auto& a = on_cpu[std::size_t(s)];
    CAPTURE(a.loss);
    CAPTURE(b.loss);
    REQUIRE_FALSE(a.skipped);
    CHECK_FALSE(b.skipped);
    CHECK(std::abs(b.loss - a.loss) <= kTolLoss * std::abs(a.loss) + 1e-7);
    CHECK(std::abs(b.teacher_entropy - a.teacher_entropy) <= kTolLoss * std::abs(a.teacher_entropy) + 1e-7);
    CHECK(b.clipped_tensors == a.clipped_tensors);
  }
  // A NaN pixel in global crop 0: the loss is NaN, the device skips the step.
  auto bad = data.global[kSteps];
  bad[7] = std::nanf("");
  const auto before = state_of(gpu_m);
  const auto allocs_before = dino::cuda::device_allocations();
  const auto waits_before = dino::cuda::host_waits();
  auto st = gpu_m.step(pol, dino::ssl::image_crops<float>{bad.data(), data.local[kSteps].data()});
  CHECK(dino::cuda::device_allocations() == allocs_before);
  CHECK(dino::cuda::host_waits() == waits_before);
  gpu_m.read_stats(pol, st);
  CHECK(st.skipped);
  const auto after = state_of(gpu_m);
  REQUIRE(after.size() == before.size());
  for (std::size_t i = 0; i < before.size(); ++i) {
    CAPTURE(i);  // student, teacher, exp_avg, exp_avg_sq, then center or queue and its counts
    REQUIRE(after[i].size() == before[i].size());
    CHECK(std::memcmp(after[i].data(), before[i].data(), before[i].size() * sizeof(float)) == 0);
  }
  // The CPU skips it too, and the next step agrees again.
  CHECK(cpu_m.step(cpu_policy{2}, dino::ssl::image_crops<float>{bad.data(), data.local[kSteps].data()}).skipped);
  const auto a = cpu_m.step(cpu_policy{2}, data.at(kSteps + 1));
  auto b = gpu_m.step(pol, data.at(kSteps + 1));
  gpu_m.read_stats(pol, b);
  CHECK(std::abs(b.loss - a.loss) <= kTolLoss * std::abs(a.loss) + 1e-7);
}

#define DINO_PRESET_CASE(preset)                                                                          \
  TEST_CASE("GPU preset " #preset ": 20 tiny-ViT steps follow the CPU; no allocation or wait; NaN skip") { \
    const auto vc = tiny_vit();                                                                           \
    const auto c = tiny_config(#preset);                                                                  \
    auto cpu_m = dino::ssl::make_##preset<dino::nn::vit>(vc, vc.embed_dim, c);                            \
    auto gpu_m = dino::ssl::make_##preset<dino::nn::vit, float, cuda_policy>(vc, vc.embed_dim, c);        \
    check_preset(#preset, cpu_m, gpu_m, c);                                                               \
  }

}  // namespace

DINO_PRESET_CASE(dino_no_momentum)
DINO_PRESET_CASE(dino_sinkhorn)
DINO_PRESET_CASE(dino_two_crops)
DINO_PRESET_CASE(dino_mse)
DINO_PRESET_CASE(dino_predictor)
DINO_PRESET_CASE(byol)
DINO_PRESET_CASE(mocov2)
DINO_PRESET_CASE(swav_like)
DINO_PRESET_CASE(simclr)
DINO_PRESET_CASE(dino_attention_mask)

TEST_CASE("GPU dino_attention_mask: the student keeps the CPU's patches every step") {
  const auto vc = tiny_vit();  // 16 px, patch 4: 16 patches, of which the default ratio 0.3 keeps 12
  const auto c = tiny_config("dino_attention_mask");
  auto cpu_m = dino::ssl::make_dino_attention_mask<dino::nn::vit>(vc, vc.embed_dim, c);
  auto gpu_m = dino::ssl::make_dino_attention_mask<dino::nn::vit, float, cuda_policy>(vc, vc.embed_dim, c);
  REQUIRE(cpu_m.masked_patches() == 16);
  REQUIRE(gpu_m.masked_patches() == 16);
  const cuda_policy pol = gpu().policy(false);
  DINO_CUDA_CHECK(cudaDeviceSynchronize());
  step_crops data(c, 10);
  for (int s = 0; s < 10; ++s) {
    CAPTURE(s);
    const auto a = cpu_m.step(cpu_policy{2}, data.at(s));
    auto b = gpu_m.step(pol, data.at(s));
    gpu_m.read_stats(pol, b);
    const auto want = cpu_m.kept_patches();
    REQUIRE(want.size() == std::size_t(2 * c.train.max_batch * 12));
    const auto got = dino::cuda::to_host(gpu_m.kept_patches_device(), want.size());
    CHECK(std::equal(got.begin(), got.end(), want.begin()));
    CHECK(std::abs(b.loss - a.loss) <= kTolLoss * std::abs(a.loss) + 1e-7);
  }
}
