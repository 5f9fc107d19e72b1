// The ViT golden files' set-up, shared by the CPU test (test_golden_vit.cpp) and the GPU one
// (tests/cuda/test_cuda_method.cu): the architecture of a "config" tensor, and the run of
// vit_e2e.bin (its hyper-parameters as a dino_config, its crops per step).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <dino/nn/vit.hpp>
#include <dino/ssl/presets.hpp>

#include "golden.hpp"

namespace dino_golden {

/// config (f64 [10]) = [D, depth, heads, mlp_hidden, patch, in_chans, img_size, qkv_bias, ln_eps, drop_path_rate]
inline dino::nn::vit_config vit_config_of(const tensor& t) {
  const auto& c = t.values;
  REQUIRE(c.size() == 10);
  dino::nn::vit_config v;
  v.embed_dim = std::int64_t(c[0]);
  v.depth = std::int64_t(c[1]);
  v.heads = std::int64_t(c[2]);
  v.mlp_ratio = c[3] / c[0];
  v.patch = std::int64_t(c[4]);
  v.in_chans = std::int64_t(c[5]);
  v.img_size = std::int64_t(c[6]);
  v.qkv_bias = c[7] != 0;
  v.ln_eps = c[8];
  v.drop_path_rate = c[9];
  REQUIRE(v.mlp_hidden() == std::int64_t(c[3]));
  REQUIRE(v.drop_path_rate == 0.0);  // the golden runs have DropPath off
  return v;
}

/// The run of vit_e2e.bin: its ViT, its sizes and its DINO configuration (one iteration per
/// epoch, batch 256 for the lr scaling; the schedules themselves are the file's tables).
struct e2e_run {
  dino::nn::vit_config vc;
  dino::ssl::dino_config c;
  std::int64_t B = 0, ng = 0, nl = 0, Gs = 0, Ls = 0;
  int steps = 0;
};

inline e2e_run e2e_setup(const file& g) {
  e2e_run r;
  r.vc = vit_config_of(g["config"]);
  // hyper = [B, n_global, n_local, global, local, K, hidden, bottleneck, nlayers, norm_last_layer,
  //          steps, tau_s, center momentum, clip, freeze_last_layer]
  const auto& hp = g["hyper"].values;
  REQUIRE(hp.size() == 15);
  r.B = std::int64_t(hp[0]), r.ng = std::int64_t(hp[1]), r.nl = std::int64_t(hp[2]);
  r.Gs = std::int64_t(hp[3]), r.Ls = std::int64_t(hp[4]);
  r.steps = int(hp[10]);
  REQUIRE(r.ng == 2);  // make_dino's loss has 2 global crops
  auto& c = r.c;
  c.head.out_dim = std::int64_t(hp[5]);
  c.head.hidden_dim = std::int64_t(hp[6]);
  c.head.bottleneck_dim = std::int64_t(hp[7]);
  c.head.nlayers = int(hp[8]);
  c.head.norm_last_layer = hp[9] != 0;
  c.local_crops = int(r.nl);
  c.student_temp = hp[11];
  c.center_momentum = hp[12];
  c.train.clip_grad = hp[13];
  c.train.freeze_last_layer = std::int64_t(hp[14]);  // epochs; one iteration per epoch here
  c.train.max_batch = r.B;
  c.train.crops = {r.Gs, r.Ls};
  c.train.seed = 0;
  c.train.schedule.epochs = r.steps;
  c.train.schedule.iters_per_epoch = 1;
  c.train.schedule.batch_size = 256;
  return r;
}

/// The crops of step s, crop-major: glob [n_global * B, C, G, G], loc [n_local * B, C, L, L].
inline void e2e_crops(const file& g, const e2e_run& r, int s, std::vector<float>& glob, std::vector<float>& loc) {
  glob.clear();
  loc.clear();
  for (std::int64_t cr = 0; cr < r.ng + r.nl; ++cr) {
    const tensor& t = g["step" + std::to_string(s) + "/crop" + std::to_string(cr)];
    const std::int64_t sz = cr < r.ng ? r.Gs : r.Ls;
    REQUIRE(t.numel() == r.B * r.vc.in_chans * sz * sz);
    auto& dst = cr < r.ng ? glob : loc;
    dst.insert(dst.end(), t.f32.begin(), t.f32.end());
  }
}

}  // namespace dino_golden
