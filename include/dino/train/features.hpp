// dino/train/features.hpp: CLS features (and tokens, CLS attention) of images through a ViT,
// on any policy, with the results in host memory.
//
// vit_feature_runner<Policy> runs nn::vit::infer over batches of up to `batch` normalised
// host images [m, C, H, W] of one size (a multiple of the patch) and writes host arrays:
//   feats [m, D] (=) the normalised CLS features; with n_last > 1, [m, n_last * D] the CLS
//                    tokens of the last n_last blocks (each through the final norm), oldest
//                    first (the reference's linear-probe features)
//   tokens (optional) [m, N + 1, D] the final normalised tokens
//   cls_attention (optional) [m, heads, N + 1] the CLS row of the last block's attention
// On the CPU the model reads the images and writes the results in place. On a device policy
// the parameters are uploaded once (or taken as a view already in the policy's memory), each
// batch is copied into a device buffer planned at construction, and the results are copied
// back (synchronously) after the batch; nothing else is allocated per batch (the last, smaller
// batch plans its own pack).
//
// extract_features(pol, model, P, dataset, ...) converts dataset images as the reference's
// evaluation transforms do after resizing: ToTensor (/255) and Normalize(mean, std), CHW; all
// images must have the model's channel count and one size. Parameters: a model's own, or the
// backbone part of a method's buffer, in host memory or in the policy's memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <span>
#include <type_traits>
#include <vector>

#include "dino/config.hpp"
#include "dino/core/buffer.hpp"
#include "dino/core/error.hpp"
#include "dino/core/param_store.hpp"
#include "dino/data/image.hpp"
#include "dino/nn/vit.hpp"

namespace dino::train {

namespace detail {
/// cls[i, l*D .. (l+1)*D) = inter[l, i*N1, :] for row r = i * n_last + l: the CLS rows of
/// n_last intermediate outputs [n_last, m*N1, D] of m crops of N1 tokens each.
struct gather_last_cls_fn {
  const float* inter;
  float* cls;
  std::int64_t m, N1, D, n_last;
  DINO_HD void operator()(std::int64_t r) const {
    const std::int64_t i = r / n_last, l = r % n_last;
    const float* src = inter + (l * m * N1 + i * N1) * D;
    float* dst = cls + r * D;
    for (std::int64_t d = 0; d < D; ++d) dst[d] = src[d];
  }
};
}  // namespace detail

/// What a feature pass writes besides the CLS features.
struct feature_request {
  bool tokens = false;         ///< the final tokens [m, N + 1, D]
  bool cls_attention = false;  ///< the last block's CLS attention [m, heads, N + 1]
  std::int64_t n_last = 1;     ///< >= 1: the CLS tokens of the last n_last blocks as the features
};

template <class Policy>
class vit_feature_runner {
 public:
  using space = memory_space_t<Policy>;
  static constexpr bool on_host = policy_traits<Policy>::is_host;

  /// P: the ViT's parameters in host memory (copied to the device once for a device policy)
  /// or in the policy's memory (used as they are; they must outlive the runner).
  template <class S>
  vit_feature_runner(const Policy& pol, const nn::vit& model, tensor_view<const float, S> P, std::int64_t batch,
                     std::int64_t H, std::int64_t W, feature_request want = {})
      : pol_(pol), model_(&model), batch_(batch), H_(H), W_(W), want_(want) {
    const auto& c = model.config();
    require<config_error>(batch >= 1, "vit_feature_runner: batch must be >= 1, got ", batch);
    require<config_error>(want.n_last >= 1 && want.n_last <= c.depth, "vit_feature_runner: n_last must lie in [1, depth = ",
                          c.depth, "], got ", want.n_last);
    pk_ = model.make_pack<float>(pol, {{batch, H, W}});  // throws shape_error for sizes the patch does not divide
    N1_ = 1 + (H / c.patch) * (W / c.patch);
    const std::int64_t D = model.out_dim();
    if constexpr (std::is_same_v<S, space>) {
      P_ = P;
    } else {
      static_assert(std::is_same_v<S, host_space>, "vit_feature_runner: device parameters need a device policy");
      Pown_.resize(std::size_t(P.numel()), false);
      view_from_host(tensor_view<float, space>{Pown_.data(), P.shape, "parameters"}, P.data);
      P_ = tensor_view<const float, space>{Pown_.data(), P.shape, "parameters"};
    }
    scratch_.resize(model.infer_scratch_elems(pk_), false);
    if (want.n_last > 1) inter_.resize(std::size_t(want.n_last * pk_.tokens * D), false);
    // y_: the final CLS features where they do not go straight to the caller's array (with
    // n_last > 1 they are not returned)
    if (!on_host || want.n_last > 1) y_.resize(std::size_t(batch * D), false);
    if constexpr (!on_host) {
      x_.resize(std::size_t(batch * c.in_chans * H * W), false);
      if (want.n_last > 1) cls_.resize(std::size_t(batch * D * want.n_last), false);
      if (want.tokens) tok_.resize(std::size_t(pk_.tokens * D), false);
      if (want.cls_attention) att_.resize(model.cls_attention_elems(pk_), false);
    }
  }

  std::int64_t batch() const { return batch_; }
  /// N + 1: the tokens of one image.
  std::int64_t tokens_per_image() const { return N1_; }
  /// The width of a feature row: D * n_last.
  std::int64_t feature_dim() const { return model_->out_dim() * want_.n_last; }
  /// heads * (N + 1): the CLS-attention values of one image.
  std::int64_t attention_per_image() const { return model_->config().heads * N1_; }

  /// Runs m (1 <= m <= batch) normalised host images x [m, C, H, W]; writes feats
  /// [m, feature_dim()] and, when requested at construction, tokens and cls_attention (host).
  void run(const float* x, std::int64_t m, float* feats, float* tokens = nullptr, float* cls_attention = nullptr) {
    require<config_error>(m >= 1 && m <= batch_, "vit_feature_runner: ", m, " images, the batch holds 1 to ", batch_);
    require<config_error>(!want_.tokens || tokens, "vit_feature_runner: tokens were requested: give their array");
    require<config_error>(!want_.cls_attention || cls_attention,
                          "vit_feature_runner: the CLS attention was requested: give its array");
    [[maybe_unused]] const auto& c = model_->config();
    const std::int64_t D = model_->out_dim(), nl = want_.n_last;
    if (m != pk_.crops) pk_ = model_->make_pack<float>(pol_, {{m, H_, W_}});
    const auto sv = [](auto& b, std::int64_t n, const char* name) { return tensor_view<float, space>{b.data(), {n}, name}; };
    nn::vit::infer_outputs<float> out{};
    const float* xs = x;
    float* y = feats;
    if constexpr (on_host) {
      if (want_.tokens) out.tokens = tokens;
      if (want_.cls_attention) out.cls_attention = cls_attention;
      if (nl > 1) y = y_.data();
    } else {
      upload(pol_, x_.data(), x, std::size_t(m * c.in_chans * H_ * W_));
      xs = x_.data();
      y = y_.data();
      if (want_.tokens) out.tokens = tok_.data();
      if (want_.cls_attention) out.cls_attention = att_.data();
    }
    if (nl > 1) {
      out.n_last = nl;
      out.intermediate = inter_.data();
    }
    model_->infer(pol_, P_, pk_, std::span<const float* const>(&xs, 1), tensor_view<float, space>{y, {m, D}, "features"},
                  sv(scratch_, std::int64_t(scratch_.size()), "scratch"), out);
    if (nl > 1) {
      float* dst = on_host ? feats : cls_.data();
      for_each_row(pol_, m * nl, detail::gather_last_cls_fn{inter_.data(), dst, m, N1_, D, nl});
    }
    if constexpr (!on_host) {  // synchronous copies: the stream's work is done when they return
      const auto back = [](const float* src, std::int64_t n, float* dst) {
        view_to_host(tensor_view<const float, space>{src, {n}, "result"}, dst);
      };
      back(nl > 1 ? cls_.data() : y_.data(), m * D * nl, feats);
      if (want_.tokens) back(tok_.data(), m * N1_ * D, tokens);
      if (want_.cls_attention) back(att_.data(), m * c.heads * N1_, cls_attention);
    }
  }

 private:
  using store = typename storage_for<float, space>::type;
  Policy pol_;
  const nn::vit* model_;
  std::int64_t batch_, H_, W_, N1_ = 0;
  feature_request want_;
  nn::vit_pack<float> pk_;
  tensor_view<const float, space> P_{};
  store Pown_, scratch_, inter_, y_, x_, cls_, tok_, att_;
};

/// The first n samples of a dataset through the model, `batch` images at a time:
///   feats [n, D * n_last] (=) the CLS features (see vit_feature_runner; n_last from `want`)
///   cls_attention (optional) [n, heads, N + 1]; tokens (optional) [n, N + 1, D]
template <class Policy, class S, class Dataset>
void extract_features(const Policy& pol, const nn::vit& model, tensor_view<const float, S> P, const Dataset& ds,
                      std::int64_t n, const std::vector<float>& mean, const std::vector<float>& stdev,
                      std::int64_t batch, float* feats, float* cls_attention = nullptr, const char* label = nullptr,
                      std::int64_t n_last = 1, float* tokens = nullptr) {
  require<config_error>(n >= 1 && n <= ds.size() && batch >= 1, "extract_features: need 1 <= n (", n, ") <= ",
                        ds.size(), " samples and batch >= 1");
  const std::int64_t C = model.config().in_chans;
  require<shape_error>(ds.channels() == C, "extract_features: the dataset has ", ds.channels(),
                       " channels, the model takes ", C);
  require<config_error>(std::int64_t(mean.size()) == C && std::int64_t(stdev.size()) == C,
                        "extract_features: mean and std need ", C, " values");
  data::image img;
  ds.load(0, img);
  const std::int64_t H = img.height, W = img.width;
  const std::int64_t chunk = std::min(batch, n);
  vit_feature_runner<Policy> run(pol, model, P, chunk, H, W, {tokens != nullptr, cls_attention != nullptr, n_last});
  const std::int64_t fd = run.feature_dim(), per = run.attention_per_image(),
                     tok = run.tokens_per_image() * model.out_dim();
  std::vector<float> x(std::size_t(chunk * C * H * W));
  for (std::int64_t b0 = 0; b0 < n; b0 += chunk) {
    const std::int64_t m = std::min(chunk, n - b0);
    for (std::int64_t i = 0; i < m; ++i) {
      ds.load(b0 + i, img);
      require<shape_error>(img.height == H && img.width == W, "extract_features: sample ", b0 + i, " is ", img.height,
                           " x ", img.width, ", the first was ", H, " x ", W);
      float* xi = x.data() + i * C * H * W;
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t p = 0; p < H * W; ++p)
          xi[c * H * W + p] = (float(img.pixels[std::size_t(p * C + c)]) / 255.0f - mean[std::size_t(c)]) / stdev[std::size_t(c)];
    }
    run.run(x.data(), m, feats + b0 * fd, tokens ? tokens + b0 * tok : nullptr,
            cls_attention ? cls_attention + b0 * per : nullptr);
    if (label) std::fprintf(stderr, "\r%s: %lld / %lld images", label, (long long)(b0 + m), (long long)n);
  }
  if (label) std::fprintf(stderr, "\n");
}

}  // namespace dino::train
