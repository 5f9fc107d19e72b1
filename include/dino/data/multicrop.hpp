// dino/data/multicrop.hpp: DINO's multi-crop augmentation (dino-spec §4.1,
// DataAugmentationDINO), on uint8 HWC images, giving normalised float CHW crops.
//
// Crop v of an image (v < n_global: global, then the locals) runs, in this order:
//   1. RandomResizedCrop: torchvision's get_params (area fraction U(scale), aspect ratio
//      log-uniform in (3/4, 4/3), w = round(sqrt(A r)), h = round(sqrt(A / r)) with Python's
//      round-half-even, 10 attempts, then the centre-crop fallback clamped to the ratio
//      range), then PIL bicubic resize of the box to size x size (image_ops.hpp)
//   2. horizontal flip, p = flip_p (0.5)
//   3. ColorJitter with p = jitter_p (0.8): brightness, contrast, saturation factors
//      U(max(0, 1 - x), 1 + x), hue U(-hue, hue), applied in a random order (torchvision's
//      randperm(4)), with PIL's formulas (image_ops.hpp)
//   4. RandomGrayscale, p = grayscale_p (0.2), 3 channels kept
//   5. Gaussian blur, sigma U(blur_sigma_min, blur_sigma_max), fires when u <= p: p =
//      blur_p_global1 (1.0) for even global crops (crop 0: the reference's global crop 1),
//      blur_p_global2 (0.1) for odd global crops, blur_p_local (0.5) for local crops
//   6. solarize (threshold 128), fires when u < p: p = solarize_p_global2 (0.2) on odd
//      global crops only
//   7. ToTensor + Normalize with mean and std (one value per channel, or one for all)
// color = false removes steps 3 and 4. On 1-channel images saturation, hue and grayscale
// are identities, brightness and contrast still apply (torchvision on a PIL "L" image).
//
// Randomness: crop v of sample s in epoch e draws from the Philox stream (key seed,
// subsequence (purpose 3, e, s), offset v * 2^20), so a crop depends only on (seed, epoch,
// sample, v) and the image, never on threads or on the order crops are made. draw() gives
// the parameters alone (needs only the image size), apply() renders them; both are const
// and thread-safe; apply() allocates only while its scratch grows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/core/rng.hpp"
#include "dino/data/image.hpp"
#include "dino/data/image_ops.hpp"

namespace dino::data {

inline constexpr std::uint32_t rng_purpose_augment = 3;
inline constexpr std::uint32_t rng_purpose_shuffle = 4;

struct multicrop_config {
  int n_global = 2, n_local = 8;
  int global_size = 224, local_size = 96;
  double global_scale_min = 0.4, global_scale_max = 1.0;
  double local_scale_min = 0.05, local_scale_max = 0.4;
  double ratio_min = 3.0 / 4.0, ratio_max = 4.0 / 3.0;
  double flip_p = 0.5;
  bool color = true;  ///< ColorJitter + RandomGrayscale
  double jitter_p = 0.8, brightness = 0.4, contrast = 0.4, saturation = 0.2, hue = 0.1;
  double grayscale_p = 0.2;
  double blur_p_global1 = 1.0, blur_p_global2 = 0.1, blur_p_local = 0.5;
  double blur_sigma_min = 0.1, blur_sigma_max = 2.0;
  double solarize_p_global2 = 0.2;
  int solarize_threshold = 128;
  std::vector<float> mean{0.485f, 0.456f, 0.406f};
  std::vector<float> std{0.229f, 0.224f, 0.225f};
};

/// The reference recipe: 2 x 224 (scale 0.4-1) + n_local x 96 (0.05-0.4), ImageNet statistics.
inline multicrop_config multicrop_imagenet(int n_local = 8) {
  multicrop_config c;
  c.n_local = n_local;
  return c;
}

/// Fashion-MNIST-sized crops: 2 x 28 + n_local x 12, the reference's scales and
/// probabilities, Fashion-MNIST's mean 0.2860 and std 0.3530. The blur sigma range is the
/// reference's scaled by 28 / 224 (0.0125 - 0.25 pixels), so that it blurs the same
/// fraction of the crop as at 224: sigma up to 2 pixels would wipe out a 28-pixel image.
inline multicrop_config multicrop_28px(int n_local = 6) {
  multicrop_config c;
  c.n_local = n_local;
  c.global_size = 28;
  c.local_size = 12;
  c.blur_sigma_min = 0.1 * 28.0 / 224.0;
  c.blur_sigma_max = 2.0 * 28.0 / 224.0;
  c.mean = {0.2860f};
  c.std = {0.3530f};
  return c;
}

/// The random parameters of one crop.
struct crop_params {
  crop_box box{};
  bool fallback = false;  ///< the 10 attempts failed: centre crop
  bool flip = false;
  bool jitter = false;
  int order[4] = {0, 1, 2, 3};  ///< 0 brightness, 1 contrast, 2 saturation, 3 hue
  double brightness = 1, contrast = 1, saturation = 1, hue = 0;
  bool grayscale = false;
  bool blur = false;
  double sigma = 0;
  bool solarize = false;
};

/// Identifies an image's crops: (seed, epoch, sample) with sample the dataset index.
struct augment_key {
  std::uint64_t seed = 0, epoch = 0, sample = 0;
};

struct augment_scratch {
  image crop;
  resample_scratch resample;
  blur_scratch blur;
};

namespace detail {
/// Python's round(): half to even.
inline double round_half_even(double x) {
  const double r = std::round(x);
  if (std::fabs(x - std::trunc(x)) == 0.5) return 2.0 * std::round(x / 2.0);
  return r;
}
}  // namespace detail

class multicrop {
 public:
  explicit multicrop(multicrop_config cfg = {}) : c_(std::move(cfg)) {
    auto prob = [](double p, const char* what) {
      require<config_error>(p >= 0 && p <= 1, "multicrop: ", what, " = ", p, " is not a probability");
    };
    require<config_error>(c_.n_global >= 1 && c_.n_local >= 0 && c_.n_global + c_.n_local <= 4096,
                          "multicrop: need n_global >= 1 and n_local >= 0, found ", c_.n_global, " and ", c_.n_local);
    require<config_error>(c_.global_size > 0 && c_.local_size > 0, "multicrop: crop sizes must be positive, found ",
                          c_.global_size, " and ", c_.local_size);
    require<config_error>(c_.global_scale_min > 0 && c_.global_scale_min <= c_.global_scale_max &&
                              c_.local_scale_min > 0 && c_.local_scale_min <= c_.local_scale_max,
                          "multicrop: scale ranges must satisfy 0 < min <= max, found global (", c_.global_scale_min,
                          ", ", c_.global_scale_max, "), local (", c_.local_scale_min, ", ", c_.local_scale_max, ")");
    require<config_error>(c_.ratio_min > 0 && c_.ratio_min <= c_.ratio_max, "multicrop: bad ratio range (",
                          c_.ratio_min, ", ", c_.ratio_max, ")");
    prob(c_.flip_p, "flip_p");
    prob(c_.jitter_p, "jitter_p");
    prob(c_.grayscale_p, "grayscale_p");
    prob(c_.blur_p_global1, "blur_p_global1");
    prob(c_.blur_p_global2, "blur_p_global2");
    prob(c_.blur_p_local, "blur_p_local");
    prob(c_.solarize_p_global2, "solarize_p_global2");
    require<config_error>(c_.brightness >= 0 && c_.contrast >= 0 && c_.saturation >= 0 && c_.hue >= 0 &&
                              c_.hue <= 0.5,
                          "multicrop: jitter strengths must be >= 0 (hue <= 0.5), found ", c_.brightness, ", ",
                          c_.contrast, ", ", c_.saturation, ", ", c_.hue);
    require<config_error>(c_.blur_sigma_min > 0 && c_.blur_sigma_min <= c_.blur_sigma_max,
                          "multicrop: blur sigma range must satisfy 0 < min <= max, found (", c_.blur_sigma_min, ", ",
                          c_.blur_sigma_max, ")");
    require<config_error>(!c_.mean.empty() && c_.mean.size() == c_.std.size(), "multicrop: ", c_.mean.size(),
                          " means for ", c_.std.size(), " stds");
    for (float s : c_.std) require<config_error>(s > 0, "multicrop: std values must be positive, found ", s);
  }

  const multicrop_config& config() const { return c_; }
  int n_global() const { return c_.n_global; }
  int n_local() const { return c_.n_local; }
  int n_crops() const { return c_.n_global + c_.n_local; }
  bool is_global(int v) const { return v < c_.n_global; }
  int output_size(int v) const { return is_global(v) ? c_.global_size : c_.local_size; }
  double blur_p(int v) const {
    return is_global(v) ? (v % 2 == 0 ? c_.blur_p_global1 : c_.blur_p_global2) : c_.blur_p_local;
  }
  double solarize_p(int v) const { return is_global(v) && v % 2 == 1 ? c_.solarize_p_global2 : 0.0; }
  /// Checks that images of `channels` channels can be normalised with this config.
  void check_channels(std::int64_t channels) const {
    require<config_error>(c_.mean.size() == 1 || std::int64_t(c_.mean.size()) == channels, "multicrop: ",
                          c_.mean.size(), " mean/std values for ", channels, "-channel images");
  }

  /// The Philox stream of crop v.
  static philox stream(const augment_key& k, int v) {
    require<config_error>(k.epoch < (std::uint64_t(1) << 24) && k.sample < (std::uint64_t(1) << 32),
                          "multicrop: epoch ", k.epoch, " or sample ", k.sample, " beyond the stream address space");
    const std::uint64_t sub = (std::uint64_t(rng_purpose_augment) << 56) | (k.epoch << 32) | k.sample;
    return philox(k.seed, sub, std::uint64_t(v) << 20);
  }

  /// Random parameters of crop v for an image of height x width.
  crop_params draw(const augment_key& key, int v, std::int64_t height, std::int64_t width) const {
    require<shape_error>(v >= 0 && v < n_crops(), "multicrop: crop index ", v, " outside [0, ", n_crops(), ")");
    require<shape_error>(height > 0 && width > 0, "multicrop: empty image ", height, " x ", width);
    philox g = stream(key, v);
    auto u01 = [&] { return 1.0 - g.uniform_double(); };  // [0, 1)
    auto randint = [&](std::int64_t n) { return std::min<std::int64_t>(static_cast<std::int64_t>(u01() * n), n - 1); };
    crop_params p;
    const bool global = is_global(v);
    const double smin = global ? c_.global_scale_min : c_.local_scale_min;
    const double smax = global ? c_.global_scale_max : c_.local_scale_max;

    // torchvision RandomResizedCrop.get_params
    const double area = double(height) * double(width);
    const double lr0 = std::log(c_.ratio_min), lr1 = std::log(c_.ratio_max);
    bool found = false;
    for (int attempt = 0; attempt < 10 && !found; ++attempt) {
      const double target = area * g.uniform(smin, smax);
      const double ar = std::exp(g.uniform(lr0, lr1));
      const auto w = static_cast<std::int64_t>(detail::round_half_even(std::sqrt(target * ar)));
      const auto h = static_cast<std::int64_t>(detail::round_half_even(std::sqrt(target / ar)));
      if (0 < w && w <= width && 0 < h && h <= height) {
        p.box = {randint(height - h + 1), randint(width - w + 1), h, w};
        found = true;
      }
    }
    if (!found) {
      p.fallback = true;
      const double in_ratio = double(width) / double(height);
      std::int64_t w = width, h = height;
      if (in_ratio < c_.ratio_min) {
        h = static_cast<std::int64_t>(detail::round_half_even(double(w) / c_.ratio_min));
      } else if (in_ratio > c_.ratio_max) {
        w = static_cast<std::int64_t>(detail::round_half_even(double(h) * c_.ratio_max));
      }
      h = std::clamp<std::int64_t>(h, 1, height);
      w = std::clamp<std::int64_t>(w, 1, width);
      p.box = {(height - h) / 2, (width - w) / 2, h, w};
    }

    p.flip = u01() < c_.flip_p;
    // RandomApply(ColorJitter): applies when rand <= p; ColorJitter.get_params.
    const double uj = u01();
    for (int i = 3; i > 0; --i) std::swap(p.order[i], p.order[randint(i + 1)]);
    auto factor = [&](double x) { return g.uniform(std::max(0.0, 1.0 - x), 1.0 + x); };
    p.brightness = factor(c_.brightness);
    p.contrast = factor(c_.contrast);
    p.saturation = factor(c_.saturation);
    p.hue = g.uniform(-c_.hue, c_.hue);
    p.jitter = c_.color && c_.jitter_p > 0 && uj <= c_.jitter_p;
    const double ug = u01();  // drawn whatever the config, so that later draws do not move
    p.grayscale = c_.color && ug < c_.grayscale_p;
    const double ub = u01();
    const double pb = blur_p(v);
    p.sigma = g.uniform(c_.blur_sigma_min, c_.blur_sigma_max);
    p.blur = pb > 0 && ub <= pb;
    p.solarize = u01() < solarize_p(v);
    return p;
  }

  /// Renders crop v of src with parameters p into out [C, S, S] (S = output_size(v)), written.
  void apply(const image& src, const crop_params& p, int v, float* out, augment_scratch& s) const {
    const int S = output_size(v);
    check_channels(src.channels);
    resize_bicubic(src, p.box, S, S, s.crop, s.resample);
    image& im = s.crop;
    if (p.flip) hflip(im);
    if (p.jitter) {
      for (int id : p.order) {
        switch (id) {
          case 0: if (c_.brightness > 0) adjust_brightness(im, p.brightness); break;
          case 1: if (c_.contrast > 0) adjust_contrast(im, p.contrast); break;
          case 2: if (c_.saturation > 0) adjust_saturation(im, p.saturation); break;
          default: if (c_.hue > 0) adjust_hue(im, p.hue); break;
        }
      }
    }
    if (p.grayscale) to_grayscale(im);
    if (p.blur) gaussian_blur(im, p.sigma, s.blur);
    if (p.solarize) solarize(im, c_.solarize_threshold);
    to_tensor_normalize(im, c_.mean, c_.std, out);
  }

  /// draw + apply: crop v of src (sample key) into out [C, S, S]; returns the parameters used.
  crop_params operator()(const image& src, const augment_key& key, int v, float* out, augment_scratch& s) const {
    crop_params p = draw(key, v, src.height, src.width);
    apply(src, p, v, out, s);
    return p;
  }

 private:
  multicrop_config c_;
};

}  // namespace dino::data
