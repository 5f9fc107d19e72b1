// dino/eval/attention_png.hpp: attention maps drawn over their images, as PNG files.
//
// An overlay shows an 8-bit gray image of height x width = (grid_h * patch) x (grid_w * patch)
// pixels, enlarged `scale` times (nearest), with one head's patch attention upsampled to the
// pixels (nearest, factor patch: the reference's interpolation) and blended over it:
//   out = (1 - alpha) * gray + alpha * heat_color((a - min) / (max - min))
// where min and max are taken over that head's patches (a flat map shows as 0), heat_color
// the dark-to-light colour map of io/png.hpp. A mask overlay shows the patches kept by
// mass_mask (60 % of the mass) tinted orange with a solid outline, the rest dimmed to half.
//
// write_attention_pngs(prefix, ...) writes, for one image,
//   <prefix>-head<h>.png  the overlay of head h, one file per head;
//   <prefix>-heads.png    a grid: the first row the image and every head's overlay, the second
//                         row the mean over heads' overlay and every head's 60 % mask,
//                         each column labelled.
// write_attention_grid(path, ...) writes one PNG for several images: a row per image, columns
// the image and each head's overlay. Files are written atomically (io/png.hpp).
// scale = 0 picks the smallest factor that makes the image's short side at least 96 pixels
// (4 for 28 x 28 Fashion-MNIST). Inputs: cls_rows is a crop's [heads, 1 + grid_h * grid_w] of
// vit::infer's cls_attention (see eval/attention.hpp).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/eval/attention.hpp"
#include "dino/io/font5x7.hpp"
#include "dino/io/png.hpp"

namespace dino::eval {

struct overlay_options {
  int scale = 0;       ///< display enlargement; 0: automatic (short side >= 96 pixels)
  double alpha = 0.6;  ///< weight of the heat colour
  double mass = 0.6;   ///< the mass the masks keep
};

namespace detail {
inline int display_scale(int height, int width, int scale) {
  if (scale > 0) return scale;
  const int s = std::min(height, width);
  return std::max(1, (96 + s - 1) / s);
}

inline void check_overlay(const char* where, int height, int width, int grid_h, int grid_w, int patch) {
  require<shape_error>(grid_h > 0 && grid_w > 0 && patch > 0 && height == grid_h * patch && width == grid_w * patch,
                       where, ": the image is ", height, " x ", width, " pixels but the attention grid ", grid_h, " x ",
                       grid_w, " at patch ", patch, " covers ", grid_h * patch, " x ", grid_w * patch);
}

/// Copies tile into canvas at (x0, y0) (both RGB).
inline void blit(io::image_u8& canvas, const io::image_u8& tile, int x0, int y0) {
  for (int y = 0; y < tile.height; ++y)
    for (int x = 0; x < tile.width; ++x) {
      if (x0 + x < 0 || y0 + y < 0 || x0 + x >= canvas.width || y0 + y >= canvas.height) continue;
      std::copy(tile.at(x, y), tile.at(x, y) + 3, canvas.at(x0 + x, y0 + y));
    }
}
}  // namespace detail

/// The heat overlay of one head's patch attention map [grid_h, grid_w] on a gray image.
inline io::image_u8 attention_overlay(const std::uint8_t* gray, int height, int width, const float* map, int grid_h,
                                      int grid_w, int patch, const overlay_options& opt = {}) {
  detail::check_overlay("attention_overlay", height, width, grid_h, grid_w, patch);
  const int s = detail::display_scale(height, width, opt.scale);
  const std::int64_t np = std::int64_t(grid_h) * grid_w;
  float lo = map[0], hi = map[0];
  for (std::int64_t i = 1; i < np; ++i) lo = std::min(lo, map[i]), hi = std::max(hi, map[i]);
  const double range = hi > lo ? double(hi) - double(lo) : 0.0;
  io::image_u8 img(width * s, height * s, 3);
  for (int y = 0; y < img.height; ++y)
    for (int x = 0; x < img.width; ++x) {
      const int iy = y / s, ix = x / s;
      const double g = gray[iy * width + ix];
      const double v = range > 0 ? (double(map[(iy / patch) * grid_w + ix / patch]) - lo) / range : 0.0;
      const auto c = io::heat_color(v);
      std::uint8_t* p = img.at(x, y);
      for (int k = 0; k < 3; ++k)
        p[k] = static_cast<std::uint8_t>(std::lround((1 - opt.alpha) * g + opt.alpha * c[std::size_t(k)]));
    }
  return img;
}

/// The 0/1 patch mask [grid_h, grid_w] on a gray image: kept patches tinted and outlined,
/// the rest dimmed.
inline io::image_u8 mask_overlay(const std::uint8_t* gray, int height, int width, const std::uint8_t* mask, int grid_h,
                                 int grid_w, int patch, const overlay_options& opt = {}) {
  detail::check_overlay("mask_overlay", height, width, grid_h, grid_w, patch);
  const int s = detail::display_scale(height, width, opt.scale);
  const std::array<double, 3> tint{255, 140, 0};
  io::image_u8 img(width * s, height * s, 3);
  auto kept = [&](int x, int y) {  // display pixel in the mask?
    if (x < 0 || y < 0 || x >= width * s || y >= height * s) return false;
    return mask[(y / s / patch) * grid_w + (x / s / patch)] != 0;
  };
  for (int y = 0; y < img.height; ++y)
    for (int x = 0; x < img.width; ++x) {
      const double g = gray[(y / s) * width + x / s];
      std::uint8_t* p = img.at(x, y);
      const bool in = kept(x, y);
      const bool edge = in && (!kept(x - 1, y) || !kept(x + 1, y) || !kept(x, y - 1) || !kept(x, y + 1));
      for (int k = 0; k < 3; ++k) {
        const double v = edge ? tint[std::size_t(k)] : in ? 0.55 * g + 0.45 * tint[std::size_t(k)] : 0.5 * g;
        p[k] = static_cast<std::uint8_t>(std::lround(v));
      }
    }
  return img;
}

/// One PNG per head and a labelled grid for one image (see the header comment).
inline void write_attention_pngs(const std::string& prefix, const std::uint8_t* gray, int height, int width,
                                 const float* cls_rows, int heads, int grid_h, int grid_w, int patch,
                                 const overlay_options& opt = {}) {
  detail::check_overlay("write_attention_pngs", height, width, grid_h, grid_w, patch);
  require<shape_error>(heads > 0, "write_attention_pngs: needs heads > 0");
  const std::int64_t np = std::int64_t(grid_h) * grid_w;
  std::vector<float> att(static_cast<std::size_t>(heads * np)), mean(static_cast<std::size_t>(np), 0.0f);
  cls_patch_attention(cls_rows, heads, np, att.data());
  for (int h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < np; ++i) mean[std::size_t(i)] += att[std::size_t(h * np + i)] / float(heads);

  const int s = detail::display_scale(height, width, opt.scale);
  const int tw = width * s, th = height * s, gap = 4, label = io::text_height(1) + 4;
  const int cols = 1 + heads;
  io::image_u8 grid(cols * tw + (cols + 1) * gap, 2 * (th + label) + 3 * gap, 3, 255);
  auto place = [&](const io::image_u8& tile, int row, int col, const std::string& text) {
    const int x = gap + col * (tw + gap), y = gap + row * (th + label + gap);
    io::draw_text(grid, x + (tw - io::text_width(text)) / 2, y + 1, text, {0, 0, 0});
    detail::blit(grid, tile, x, y + label);
  };

  io::image_u8 plain(tw, th, 3);
  for (int y = 0; y < th; ++y)
    for (int x = 0; x < tw; ++x) std::fill(plain.at(x, y), plain.at(x, y) + 3, gray[(y / s) * width + x / s]);
  place(plain, 0, 0, "image");
  place(attention_overlay(gray, height, width, mean.data(), grid_h, grid_w, patch, opt), 1, 0, "mean");
  std::vector<std::uint8_t> m(static_cast<std::size_t>(np));
  for (int h = 0; h < heads; ++h) {
    const io::image_u8 ov = attention_overlay(gray, height, width, att.data() + h * np, grid_h, grid_w, patch, opt);
    io::write_png(prefix + "-head" + std::to_string(h) + ".png", ov);
    place(ov, 0, 1 + h, "head " + std::to_string(h));
    mass_mask(att.data() + h * np, np, opt.mass, m.data());
    place(mask_overlay(gray, height, width, m.data(), grid_h, grid_w, patch, opt), 1, 1 + h,
          std::to_string(static_cast<int>(std::lround(opt.mass * 100))) + "% mass");
  }
  io::write_png(prefix + "-heads.png", grid);
}

/// One PNG for several images: a row per image (the image, then each head's overlay).
///   gray_images [count, height, width], cls_attention [count, heads, 1 + grid_h * grid_w]
inline void write_attention_grid(const std::string& path, const std::uint8_t* gray_images, int count, int height,
                                 int width, const float* cls_attention, int heads, int grid_h, int grid_w, int patch,
                                 const overlay_options& opt = {}) {
  detail::check_overlay("write_attention_grid", height, width, grid_h, grid_w, patch);
  require<shape_error>(count > 0 && heads > 0, "write_attention_grid: needs count > 0 and heads > 0");
  const std::int64_t np = std::int64_t(grid_h) * grid_w, pixels = std::int64_t(height) * width;
  const int s = detail::display_scale(height, width, opt.scale);
  const int tw = width * s, th = height * s, gap = 4, label = io::text_height(1) + 4;
  const int cols = 1 + heads;
  io::image_u8 grid(cols * tw + (cols + 1) * gap, label + count * (th + gap) + gap, 3, 255);
  for (int c = 0; c < cols; ++c) {
    const std::string text = c == 0 ? "image" : "head " + std::to_string(c - 1);
    io::draw_text(grid, gap + c * (tw + gap) + (tw - io::text_width(text)) / 2, gap + 1, text, {0, 0, 0});
  }
  std::vector<float> att(static_cast<std::size_t>(heads * np));
  for (int i = 0; i < count; ++i) {
    const std::uint8_t* gray = gray_images + i * pixels;
    const int y = gap + label + i * (th + gap);
    io::image_u8 plain(tw, th, 3);
    for (int yy = 0; yy < th; ++yy)
      for (int x = 0; x < tw; ++x) std::fill(plain.at(x, yy), plain.at(x, yy) + 3, gray[(yy / s) * width + x / s]);
    detail::blit(grid, plain, gap, y);
    cls_patch_attention(cls_attention + std::int64_t(i) * heads * (1 + np), heads, np, att.data());
    for (int h = 0; h < heads; ++h)
      detail::blit(grid, attention_overlay(gray, height, width, att.data() + h * np, grid_h, grid_w, patch, opt),
                   gap + (1 + h) * (tw + gap), y);
  }
  io::write_png(path, grid);
}

}  // namespace dino::eval
