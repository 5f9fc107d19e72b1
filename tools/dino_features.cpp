// dino-features: CLS features, final tokens and CLS attention of a DINO ViT checkpoint.
//
//   dino-features --checkpoint FILE.safetensors [--arch vit_small --patch 16] --input X.npy --out F.npy
//                 [--tokens T.npy] [--attention A.npy] [--checkpoint-key teacher|student]
//                 [--heads H] [--threads N] [--batch N] [--device cpu|cuda] [--tf32 true|false]
//
// X.npy: float32 [B, C, H, W], already normalised, H and W multiples of the patch size.
// F.npy: [B, D] normalised CLS features; T.npy: [B, N+1, D] final tokens; A.npy: [B, heads,
// N+1], the CLS row of the last block's self-attention. Without --arch the architecture is
// read from the checkpoint's shapes (heads = D / 64, or --heads). --device cuda (a build with
// DINO_ENABLE_CUDA) runs the model on the GPU; the results are the same arrays. Exit codes: 0
// success, 1 a bad file or input (the message says which and why), 2 bad usage.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <dino/dino.hpp>
#if defined(DINO_WITH_CUDA)
#include <dino/cuda.hpp>
#endif
#include <dino/io/checkpoint.hpp>
#include <dino/io/npy.hpp>
#include <dino/io/safetensors.hpp>
#include <dino/nn/vit.hpp>
#include <dino/train/features.hpp>

#include "presets.hpp"

namespace {

const char* kUsage =
    "usage: dino-features --checkpoint FILE.safetensors [--arch ARCH] [--patch P] --input X.npy --out F.npy\n"
    "                     [--tokens T.npy] [--attention A.npy] [--checkpoint-key teacher|student]\n"
    "                     [--heads H] [--threads N] [--batch N] [--device cpu|cuda] [--tf32 true|false]\n"
    "  ARCH: vit_tiny, vit_small, vit_base (224 px grid), vit_small28, vit_tiny28 (28 px, 1 channel); default: from the file\n"
    "  --device: where the model runs: cpu (default), or cuda in a build with DINO_ENABLE_CUDA\n"
    "  --tf32: with --device cuda: fp32 GEMMs on TF32 tensor cores (default false: exact fp32)\n";

struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int run(int argc, char** argv) {
  std::map<std::string, std::string> a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "-h" || k == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (k.rfind("--", 0) != 0 || i + 1 >= argc) throw usage_error("unexpected argument '" + k + "'");
    a[k.substr(2)] = argv[++i];
  }
  for (const auto& [k, v] : a)
    if (k != "checkpoint" && k != "arch" && k != "patch" && k != "input" && k != "out" && k != "tokens" &&
        k != "attention" && k != "checkpoint-key" && k != "threads" && k != "batch" && k != "heads" && k != "device" &&
        k != "tf32")
      throw usage_error("unknown option --" + k);
  if (!a.count("checkpoint") || !a.count("input") || !a.count("out"))
    throw usage_error("--checkpoint, --input and --out are required");
  auto num = [&](const char* k, long def) {
    if (!a.count(k)) return def;
    char* end = nullptr;
    const long v = std::strtol(a[k].c_str(), &end, 10);
    if (!end || *end || v < 1) throw usage_error(std::string("--") + k + " must be a positive integer, got '" + a[k] + "'");
    return v;
  };
  const int threads = int(num("threads", 2));
  const std::int64_t batch = num("batch", 16), patch = a.count("patch") ? num("patch", 16) : 0;
  const std::int64_t heads_opt = a.count("heads") ? num("heads", 1) : 0;
  const std::string key = a.count("checkpoint-key") ? a["checkpoint-key"] : "";
  const std::string device = a.count("device") ? a["device"] : "cpu", tf32s = a.count("tf32") ? a["tf32"] : "false";
  if (tf32s != "true" && tf32s != "false" && tf32s != "1" && tf32s != "0" && tf32s != "yes" && tf32s != "no")
    throw usage_error("--tf32 must be true or false, got '" + tf32s + "'");
  const bool tf32 = tf32s == "true" || tf32s == "1" || tf32s == "yes";
#if defined(DINO_WITH_CUDA)
  if (device != "cpu" && device != "cuda")
    throw dino::config_error("dino-features: --device must be cpu or cuda, got '" + device + "'");
#else
  if (device != "cpu")
    throw dino::config_error("dino-features: --device must be cpu (this build has no CUDA: configure with -DDINO_ENABLE_CUDA=ON), got '" +
                             device + "'");
#endif

  const auto file = dino::io::safetensors_file::read(a["checkpoint"]);
  const dino::nn::vit_config cfg = a.count("arch") ? dino_tools::arch(a["arch"], long(patch)) : dino_tools::config_from_file(file, key, heads_opt, "dino-features", "--arch");
  dino::param_layout layout;
  dino::nn::vit model(cfg, layout);
  dino::flat_params<float> params(layout);
  dino::io::load_options opt;
  opt.checkpoint_key = key;
  dino::io::load_params(file, params, opt);

  const auto x = dino::io::read_npy(a["input"]);
  if (x.shape.size() != 4)
    throw dino::shape_error("dino-features: " + a["input"] + ": expected a float32 array [B, C, H, W], found " +
                            dino::io::detail::shape_str(x.shape));
  const std::int64_t B = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
  if (C != cfg.in_chans)
    throw dino::shape_error("dino-features: " + a["input"] + ": " + std::to_string(C) + " channels, the model takes " +
                            std::to_string(cfg.in_chans));
  if (H % cfg.patch || W % cfg.patch || H == 0 || W == 0)
    throw dino::shape_error("dino-features: " + a["input"] + ": " + std::to_string(H) + " x " + std::to_string(W) +
                            " pixels is not a multiple of the patch size " + std::to_string(cfg.patch));
  if (B == 0) throw dino::shape_error("dino-features: " + a["input"] + ": no images");
  const std::int64_t D = cfg.embed_dim, N1 = 1 + (H / cfg.patch) * (W / cfg.patch), heads = cfg.heads;
  std::vector<float> feats(std::size_t(B * D)), tokens, attn;
  if (a.count("tokens")) tokens.resize(std::size_t(B * N1 * D));
  if (a.count("attention")) attn.resize(std::size_t(B * heads * N1));

  const dino::host_view<const float> P{params.data(), {std::int64_t(params.size())}, "parameters"};
  const auto run_on = [&](const auto& pol) {
    const std::int64_t chunk = std::min(batch, B);
    dino::train::vit_feature_runner<std::decay_t<decltype(pol)>> runner(pol, model, P, chunk, H, W, {!tokens.empty(), !attn.empty(), 1});
    for (std::int64_t b0 = 0; b0 < B; b0 += chunk) {
      const std::int64_t n = std::min(chunk, B - b0);
      runner.run(x.data.data() + b0 * C * H * W, n, feats.data() + b0 * D, tokens.empty() ? nullptr : tokens.data() + b0 * N1 * D,
                 attn.empty() ? nullptr : attn.data() + b0 * heads * N1);
      std::fprintf(stderr, "\rdino-features: %lld / %lld images", (long long)(b0 + n), (long long)B);
    }
  };
#if defined(DINO_WITH_CUDA)
  if (device == "cuda") {
    dino::cuda::context ctx;
    run_on(ctx.policy(tf32));
  } else {
    run_on(dino::cpu_policy{threads});
  }
#else
  (void)tf32;
  run_on(dino::cpu_policy{threads});
#endif
  std::fprintf(stderr, "\n");
  dino::io::write_npy(a["out"], {B, D}, feats.data());
  if (!tokens.empty()) dino::io::write_npy(a["tokens"], {B, N1, D}, tokens.data());
  if (!attn.empty()) dino::io::write_npy(a["attention"], {B, heads, N1}, attn.data());
  std::fprintf(stderr, "dino-features: %s (D %lld, depth %lld, heads %lld, patch %lld): wrote %s\n",
               a.count("arch") ? a["arch"].c_str() : "architecture from the checkpoint", (long long)D,
               (long long)cfg.depth, (long long)heads, (long long)cfg.patch, a["out"].c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const dino_cli::usage_error& e) {
    std::fprintf(stderr, "dino-features: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const usage_error& e) {
    std::fprintf(stderr, "dino-features: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
