// dino/train/features.hpp: CLS features (and CLS attention) of a dataset through a ViT.
//
// Images are converted as the reference's evaluation transforms do after resizing: ToTensor
// (/255) and Normalize(mean, std), CHW; all images must have the model's channel count and
// one size (a multiple of the patch). Batches of `batch` images run through nn::vit::infer
// with the given parameters (a model's own, or the backbone part of a method's buffer).
//   feats [n, D] (=) the normalised CLS features of samples 0 .. n-1
//   cls_attention (optional) [n, heads, N + 1] the CLS row of the last block's attention
#pragma once

#include <cstdint>
#include <cstdio>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/data/image.hpp"
#include "dino/nn/vit.hpp"

namespace dino::train {

template <class Dataset>
void extract_features(const cpu_policy& pol, const nn::vit& model, host_view<const float> P, const Dataset& ds,
                      std::int64_t n, const std::vector<float>& mean, const std::vector<float>& stdev,
                      std::int64_t batch, float* feats, float* cls_attention = nullptr, const char* label = nullptr) {
  require<config_error>(n >= 1 && n <= ds.size() && batch >= 1, "extract_features: need 1 <= n (", n, ") <= ",
                        ds.size(), " samples and batch >= 1");
  const std::int64_t C = model.config().in_chans, D = model.out_dim(), heads = model.config().heads;
  require<shape_error>(ds.channels() == C, "extract_features: the dataset has ", ds.channels(),
                       " channels, the model takes ", C);
  require<config_error>(std::int64_t(mean.size()) == C && std::int64_t(stdev.size()) == C,
                        "extract_features: mean and std need ", C, " values");
  data::image img;
  ds.load(0, img);
  const std::int64_t H = img.height, W = img.width;
  const std::int64_t chunk = std::min(batch, n);
  auto pk = model.make_pack<float>({{chunk, H, W}});
  std::vector<float> x(std::size_t(chunk * C * H * W)), scratch(model.infer_scratch_elems(pk)),
      att(cls_attention ? model.cls_attention_elems(pk) : 0);
  for (std::int64_t b0 = 0; b0 < n; b0 += chunk) {
    const std::int64_t m = std::min(chunk, n - b0);
    if (m != pk.crops) {
      pk = model.make_pack<float>({{m, H, W}});
      scratch.resize(model.infer_scratch_elems(pk));
    }
    for (std::int64_t i = 0; i < m; ++i) {
      ds.load(b0 + i, img);
      require<shape_error>(img.height == H && img.width == W, "extract_features: sample ", b0 + i, " is ", img.height,
                           " x ", img.width, ", the first was ", H, " x ", W);
      float* xi = x.data() + i * C * H * W;
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t p = 0; p < H * W; ++p)
          xi[c * H * W + p] = (float(img.pixels[std::size_t(p * C + c)]) / 255.0f - mean[std::size_t(c)]) / stdev[std::size_t(c)];
    }
    const float* xs = x.data();
    nn::vit::infer_outputs<float> out{};
    if (cls_attention) out.cls_attention = att.data();
    model.infer(pol, P, pk, std::span<const float* const>(&xs, 1), host_view<float>{feats + b0 * D, {m, D}, "features"},
                host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"}, out);
    if (cls_attention) {
      const std::int64_t per = heads * (1 + (H / model.config().patch) * (W / model.config().patch));
      std::copy(att.begin(), att.begin() + m * per, cls_attention + b0 * per);
    }
    if (label) std::fprintf(stderr, "\r%s: %lld / %lld images", label, (long long)(b0 + m), (long long)n);
  }
  if (label) std::fprintf(stderr, "\n");
}

}  // namespace dino::train
