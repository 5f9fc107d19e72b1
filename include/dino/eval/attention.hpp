// dino/eval/attention.hpp: self-attention maps, the masks that keep 60 % of their mass,
// and their Jaccard index against reference masks (visualize_attention.py, dino-spec §5.3).
//
// Input: the last block's CLS attention rows from nn::vit::infer (infer_outputs::cls_attention):
// per crop, [heads, 1 + h * w], column 0 the CLS key itself, the others the patches row-major
// over the h x w patch grid. For a pack of one crop set (all images the same size) crop c
// starts at c * heads * (1 + h * w), which is vit_pack::cls_attn_off[c].
//
// - cls_patch_attention: the reference's attn[0, :, 0, 1:]: drops the CLS column (the values
//   are not renormalised; each head's row then sums to 1 - attn[CLS -> CLS]).
// - mass_mask: the reference's --threshold procedure for one head, with t = 0.6 (the paper's
//   masks): sort the n values ascending, divide by their sum, cumulative sum, keep the
//   positions whose cumulative sum exceeds 1 - t, back in spatial order. So a patch is kept
//   when the patches ranked strictly above it hold less than t of the mass: the smallest set
//   of highest-attention patches that holds at least t. Ties in the sort are broken by the
//   patch index (lower first in the ascending order); computed in double. A head whose
//   values sum to 0 keeps nothing (the reference divides by 0 and keeps nothing either).
// - upsample_nearest: nearest-neighbour upsampling by an integer factor (the patch size), as
//   nn.functional.interpolate(scale_factor = p, mode = "nearest").
// - foreground_mask: pixel > threshold on 8-bit gray images. For Fashion-MNIST the threshold is
//   10 (fashion_mnist_foreground_threshold): the background is 0 (half of all test pixels),
//   values 1 to 9 hold 3.0 % more, decaying from 1.0 % at 1 to 0.1 % at 9 (a faint halo around
//   the objects), and from 10 up the histogram is flat at ~0.1 % per level (the garments).
//   "> 10" cuts where the halo's decay ends; "> 0" would count the halo as object, "> 25" would
//   drop 1.5 % of the pixels from the flat, garment part.
// - jaccard: |A and B| / |A or B| over n pixels; 1 when both are empty.
// - attention_jaccard: for each image and head, the mass mask upsampled to pixels against the
//   image's reference mask; the mean over all (image, head) pairs and the mean per head.
// Every output is written (=), never accumulated. Shapes are checked (shape_error).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "dino/core/error.hpp"

namespace dino::eval {

/// The Fashion-MNIST foreground: 8-bit pixel values above 10 (see the header comment).
inline constexpr int fashion_mnist_foreground_threshold = 10;

/// out [heads, patches] (=) cls_rows [heads, 1 + patches] without column 0.
inline void cls_patch_attention(const float* cls_rows, int heads, std::int64_t patches, float* out) {
  require<shape_error>(heads > 0 && patches > 0, "cls_patch_attention: needs heads > 0 and patches > 0, got ", heads,
                       " and ", patches);
  for (int h = 0; h < heads; ++h)
    std::copy(cls_rows + h * (1 + patches) + 1, cls_rows + (h + 1) * (1 + patches), out + h * patches);
}

/// mask [n] (=) 1 for the positions the reference's threshold keeps at mass t, else 0.
inline void mass_mask(const float* att, std::int64_t n, double t, std::uint8_t* mask) {
  require<shape_error>(n > 0, "mass_mask: needs n > 0");
  require<config_error>(t > 0 && t <= 1, "mass_mask: the kept mass must lie in (0, 1], got ", t);
  std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), std::int64_t{0});
  std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) { return att[a] < att[b]; });
  double sum = 0;
  for (std::int64_t i = 0; i < n; ++i) sum += att[i];
  std::fill(mask, mask + n, std::uint8_t{0});
  if (!(sum > 0)) return;
  double cum = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    cum += double(att[idx[std::size_t(i)]]) / sum;
    if (cum > 1.0 - t) mask[idx[std::size_t(i)]] = 1;
  }
}

/// out [h * scale, w * scale] (=) in [h, w], each value repeated over a scale x scale block.
template <class T>
inline void upsample_nearest(const T* in, std::int64_t h, std::int64_t w, int scale, T* out) {
  require<shape_error>(h > 0 && w > 0 && scale >= 1, "upsample_nearest: invalid size ", h, " x ", w, " scale ", scale);
  const std::int64_t W = w * scale;
  for (std::int64_t y = 0; y < h * scale; ++y)
    for (std::int64_t x = 0; x < W; ++x) out[y * W + x] = in[(y / scale) * w + x / scale];
}

/// mask [n] (=) gray[i] > threshold.
inline void foreground_mask(const std::uint8_t* gray, std::int64_t n, int threshold, std::uint8_t* mask) {
  for (std::int64_t i = 0; i < n; ++i) mask[i] = gray[i] > threshold ? 1 : 0;
}

/// |a and b| / |a or b| of two 0/1 masks of n values; 1 when both are empty.
inline double jaccard(const std::uint8_t* a, const std::uint8_t* b, std::int64_t n) {
  std::int64_t inter = 0, uni = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const bool x = a[i] != 0, y = b[i] != 0;
    inter += x && y;
    uni += x || y;
  }
  return uni == 0 ? 1.0 : double(inter) / double(uni);
}

struct attention_jaccard_result {
  double mean = 0;               ///< over all (image, head) pairs
  std::vector<double> per_head;  ///< [heads], each over the images
  std::int64_t images = 0;
};

/// Mean Jaccard index of the heads' mass masks against reference masks.
///   cls_attention: [images, heads, 1 + grid_h * grid_w] (one crop set of vit::infer)
///   reference:     [images, grid_h * patch, grid_w * patch] 0/1 masks
inline attention_jaccard_result attention_jaccard(const float* cls_attention, std::int64_t images, int heads,
                                                  int grid_h, int grid_w, int patch, const std::uint8_t* reference,
                                                  double mass = 0.6) {
  require<shape_error>(images > 0 && heads > 0 && grid_h > 0 && grid_w > 0 && patch > 0,
                       "attention_jaccard: needs positive sizes, got images = ", images, ", heads = ", heads, ", grid ",
                       grid_h, " x ", grid_w, ", patch ", patch);
  const std::int64_t np = std::int64_t(grid_h) * grid_w, pixels = np * patch * patch;
  std::vector<float> att(static_cast<std::size_t>(heads * np));
  std::vector<std::uint8_t> m(static_cast<std::size_t>(np)), up(static_cast<std::size_t>(pixels));
  attention_jaccard_result r;
  r.images = images;
  r.per_head.assign(static_cast<std::size_t>(heads), 0.0);
  for (std::int64_t i = 0; i < images; ++i) {
    cls_patch_attention(cls_attention + i * heads * (1 + np), heads, np, att.data());
    for (int h = 0; h < heads; ++h) {
      mass_mask(att.data() + h * np, np, mass, m.data());
      upsample_nearest(m.data(), grid_h, grid_w, patch, up.data());
      r.per_head[std::size_t(h)] += jaccard(up.data(), reference + i * pixels, pixels);
    }
  }
  double total = 0;
  for (auto& v : r.per_head) {
    total += v;
    v /= double(images);
  }
  r.mean = total / double(images * heads);
  return r;
}

/// attention_jaccard against the foreground (pixel > threshold) of 8-bit gray images
/// [images, grid_h * patch, grid_w * patch].
inline attention_jaccard_result attention_jaccard_foreground(const float* cls_attention, std::int64_t images, int heads,
                                                             int grid_h, int grid_w, int patch,
                                                             const std::uint8_t* gray_images,
                                                             int threshold = fashion_mnist_foreground_threshold,
                                                             double mass = 0.6) {
  require<shape_error>(images > 0 && grid_h > 0 && grid_w > 0 && patch > 0,
                       "attention_jaccard_foreground: needs positive sizes, got images = ", images, ", grid ", grid_h,
                       " x ", grid_w, ", patch ", patch);
  const std::int64_t pixels = std::int64_t(grid_h) * grid_w * patch * patch;
  std::vector<std::uint8_t> ref(static_cast<std::size_t>(images * pixels));
  foreground_mask(gray_images, images * pixels, threshold, ref.data());
  return attention_jaccard(cls_attention, images, heads, grid_h, grid_w, patch, ref.data(), mass);
}

}  // namespace dino::eval
