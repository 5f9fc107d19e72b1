// dino/data/image_ops.hpp: the image operations of the reference's augmentation, ported from
// Pillow's C code so that a crop box and factors give the bytes PIL gives.
//
// All operate on uint8 HWC images with 1 or 3 channels (dino/data/image.hpp), in place
// unless they say otherwise, and allocate only when a scratch buffer must grow.
//
//   resize_bicubic(src, box, out_h, out_w, dst, scratch)
//       PIL Image.crop(box).resize((out_w, out_h), BICUBIC): separable convolution with the
//       Keys cubic (a = -0.5), support 2 scaled by the down-scaling factor (antialiasing),
//       coefficients normalised then rounded to 22-bit fixed point, two passes through an
//       8-bit intermediate (rounded, clamped), in the order current Pillow picks (Resample.c
//       of Pillow 13: vertical first when the height shrinks by more than twice the width).
//   hflip(img)                           PIL FLIP_LEFT_RIGHT
//   adjust_brightness(img, f)            ImageEnhance.Brightness: blend(black, img, f)
//   adjust_contrast(img, f)              ImageEnhance.Contrast: blend(mean, img, f), mean =
//                                        the grayscale image's mean rounded to an integer
//   adjust_saturation(img, f)            ImageEnhance.Color: blend(grayscale, img, f)
//   adjust_hue(img, h)                   torchvision's PIL adjust_hue: to HSV (PIL's 8-bit
//                                        HSV), H += trunc(h * 255) mod 256, back to RGB
//   to_grayscale(img)                    convert("L") (ITU-R 601-2 luma in 16-bit fixed
//                                        point), replicated into 3 channels
//   gaussian_blur(img, sigma, scratch)   ImageFilter.GaussianBlur(radius = sigma): 3 passes
//                                        of an extended box blur per direction (Gwosdek et
//                                        al. 2011, as BoxBlur.c), edges replicated
//   solarize(img, threshold = 128)       ImageOps.solarize: v >= threshold -> 255 - v
//   to_tensor_normalize(img, mean, std, out)
//                                        ToTensor + Normalize: out[c, y, x] =
//                                        (v / 255 - mean[c]) / std[c] in float, CHW, written
// Blends compute int + float * int in float and truncate, clamped to [0, 255], as
// ImagingBlend. On 1-channel images saturation, hue and grayscale are identities (as
// torchvision with PIL "L" images); brightness, contrast, blur and solarize apply.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/data/image.hpp"

namespace dino::data {

/// A crop rectangle in pixels: rows [top, top + height), columns [left, left + width).
struct crop_box {
  std::int64_t top = 0, left = 0, height = 0, width = 0;
};

struct resample_scratch {
  std::vector<int> xbounds, ybounds;
  std::vector<std::int32_t> xk, yk;
  std::vector<double> k;
  image tmp;
};

struct blur_scratch {
  std::vector<std::uint8_t> a, b;
};

namespace detail {

inline double pil_bicubic(double x) {
  constexpr double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

constexpr int pil_precision_bits = 32 - 8 - 2;

/// Resample.c precompute_coeffs + normalize_coeffs_8bpc for a box [0, in_size); returns ksize.
inline int pil_coeffs(int in_size, int out_size, std::vector<int>& bounds, std::vector<std::int32_t>& kk,
                      std::vector<double>& k) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 2.0 * filterscale;
  const int ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  bounds.resize(static_cast<std::size_t>(out_size) * 2);
  kk.assign(static_cast<std::size_t>(out_size) * static_cast<std::size_t>(ksize), 0);
  k.resize(static_cast<std::size_t>(ksize));
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    double ww = 0.0;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    for (int x = 0; x < xmax; ++x) {
      const double w = pil_bicubic((x + xmin - center + 0.5) * ss);
      k[std::size_t(x)] = w;
      ww += w;
    }
    std::int32_t* dst = kk.data() + static_cast<std::size_t>(xx) * static_cast<std::size_t>(ksize);
    for (int x = 0; x < xmax; ++x) {
      double w = k[std::size_t(x)];
      if (ww != 0.0) w /= ww;
      dst[x] = w < 0 ? static_cast<std::int32_t>(-0.5 + w * (1 << pil_precision_bits))
                     : static_cast<std::int32_t>(0.5 + w * (1 << pil_precision_bits));
    }
    bounds[std::size_t(xx) * 2] = xmin;
    bounds[std::size_t(xx) * 2 + 1] = xmax;
  }
  return ksize;
}

inline std::uint8_t pil_clip8(std::int32_t in) {
  if (in >= (1 << pil_precision_bits << 8)) return 255;
  if (in <= 0) return 0;
  return static_cast<std::uint8_t>(in >> pil_precision_bits);
}

/// ImagingBlend for one byte: degenerate `a`, image `b`, factor alpha (a float, as in PIL).
inline std::uint8_t pil_blend(int a, int b, float alpha) {
  const float t = static_cast<float>(a) + alpha * static_cast<float>(b - a);
  if (t <= 0.0f) return 0;
  if (t >= 255.0f) return 255;
  return static_cast<std::uint8_t>(t);
}

/// PIL's RGB -> L: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16.
inline std::uint8_t pil_luma(const std::uint8_t* p) {
  return static_cast<std::uint8_t>((p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >> 16);
}

inline std::uint8_t clip8i(int v) { return static_cast<std::uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v)); }

/// PIL Convert.c rgb2hsv_row (float arithmetic kept as in C).
inline void pil_rgb2hsv(const std::uint8_t* in, std::uint8_t* out) {
  const std::uint8_t r = in[0], g = in[1], b = in[2];
  const std::uint8_t maxc = std::max(r, std::max(g, b)), minc = std::min(r, std::min(g, b));
  std::uint8_t uh = 0, us = 0;
  if (minc != maxc) {
    const float cr = static_cast<float>(maxc - minc);
    const float s = cr / static_cast<float>(maxc);
    const float rc = static_cast<float>(maxc - r) / cr;
    const float gc = static_cast<float>(maxc - g) / cr;
    const float bc = static_cast<float>(maxc - b) / cr;
    float h;
    if (r == maxc)
      h = bc - gc;
    else if (g == maxc)
      h = static_cast<float>(2.0 + rc - bc);
    else
      h = static_cast<float>(4.0 + gc - rc);
    h = static_cast<float>(std::fmod((h / 6.0 + 1.0), 1.0));
    uh = clip8i(static_cast<int>(h * 255.0));
    us = clip8i(static_cast<int>(s * 255.0));
  }
  out[0] = uh;
  out[1] = us;
  out[2] = maxc;
}

/// PIL Convert.c hsv2rgb for one pixel.
inline void pil_hsv2rgb(const std::uint8_t* in, std::uint8_t* out) {
  const std::uint8_t h = in[0], s = in[1], v = in[2];
  if (s == 0) {
    out[0] = out[1] = out[2] = v;
    return;
  }
  const int i = static_cast<int>(std::floor(static_cast<float>(h) * 6.0 / 255.0));
  const float f = static_cast<float>(static_cast<float>(h) * 6.0 / 255.0 - static_cast<float>(i));
  const float fs = static_cast<float>(static_cast<float>(s) / 255.0);
  const int p = static_cast<int>(std::round(static_cast<float>(v) * (1.0 - fs)));
  const int q = static_cast<int>(std::round(static_cast<float>(v) * (1.0 - fs * f)));
  const int t = static_cast<int>(std::round(static_cast<float>(v) * (1.0 - fs * (1.0 - f))));
  const std::uint8_t up = clip8i(p), uq = clip8i(q), ut = clip8i(t);
  switch (i % 6) {
    case 0: out[0] = v, out[1] = ut, out[2] = up; break;
    case 1: out[0] = uq, out[1] = v, out[2] = up; break;
    case 2: out[0] = up, out[1] = v, out[2] = ut; break;
    case 3: out[0] = up, out[1] = uq, out[2] = v; break;
    case 4: out[0] = ut, out[1] = up, out[2] = v; break;
    default: out[0] = v, out[1] = up, out[2] = uq; break;
  }
}

/// BoxBlur.c _gaussian_blur_radius: the extended box radius of one of `passes` passes.
inline float pil_box_radius(float radius, int passes) {
  const float sigma2 = radius * radius / static_cast<float>(passes);
  const float L = static_cast<float>(std::sqrt(12.0 * sigma2 + 1.0));
  const float l = static_cast<float>(std::floor((L - 1.0) / 2.0));
  float a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2);
  a /= 6 * (sigma2 - (l + 1) * (l + 1));
  return l + a;
}

/// BoxBlur.c ImagingLineBoxBlur8 over a contiguous line of n = lastx + 1 bytes.
inline void pil_line_box_blur(std::uint8_t* out, const std::uint8_t* in, int lastx, int radius, int edgeA,
                              int edgeB, std::uint32_t ww, std::uint32_t fw) {
  std::uint32_t acc = in[0] * std::uint32_t(radius + 1);
  auto move = [&](int sub, int add) { acc += static_cast<std::uint32_t>(in[add] - in[sub]); };
  auto save = [&](int x, int left, int right) {
    const std::uint32_t bulk = acc * ww + (std::uint32_t(in[left]) + in[right]) * fw;
    out[x] = static_cast<std::uint8_t>((bulk + (1u << 23)) >> 24);
  };
  for (int x = 0; x < edgeA - 1; ++x) acc += in[x];
  acc += in[lastx] * std::uint32_t(radius - edgeA + 1);
  if (edgeA <= edgeB) {
    for (int x = 0; x < edgeA; ++x) move(0, x + radius), save(x, 0, x + radius + 1);
    for (int x = edgeA; x < edgeB; ++x) move(x - radius - 1, x + radius), save(x, x - radius - 1, x + radius + 1);
    for (int x = edgeB; x <= lastx; ++x) move(x - radius - 1, lastx), save(x, x - radius - 1, lastx);
  } else {
    for (int x = 0; x < edgeB; ++x) move(0, x + radius), save(x, 0, x + radius + 1);
    for (int x = edgeB; x < edgeA; ++x) move(0, lastx), save(x, 0, lastx);
    for (int x = edgeA; x <= lastx; ++x) move(x - radius - 1, lastx), save(x, x - radius - 1, lastx);
  }
}

/// `passes` extended box blurs along lines of n bytes at `stride`, `count` lines `step` apart.
inline void pil_box_blur_lines(std::uint8_t* base, int n, std::int64_t stride, std::int64_t count, std::int64_t step,
                               float fradius, int passes, blur_scratch& s) {
  const int radius = static_cast<int>(fradius);
  const auto ww = static_cast<std::uint32_t>(static_cast<float>(1u << 24) / (fradius * 2 + 1));
  const std::uint32_t fw = ((1u << 24) - std::uint32_t(radius * 2 + 1) * ww) / 2;
  const int edgeA = std::min(radius + 1, n), edgeB = std::max(n - radius - 1, 0);
  s.a.resize(std::size_t(n));
  s.b.resize(std::size_t(n));
  for (std::int64_t l = 0; l < count; ++l) {
    std::uint8_t* p = base + l * step;
    for (int x = 0; x < n; ++x) s.a[std::size_t(x)] = p[x * stride];
    for (int i = 0; i < passes; ++i) {
      pil_line_box_blur(s.b.data(), s.a.data(), n - 1, radius, edgeA, edgeB, ww, fw);
      std::swap(s.a, s.b);
    }
    for (int x = 0; x < n; ++x) p[x * stride] = s.a[std::size_t(x)];
  }
}

}  // namespace detail

/// PIL src.crop(box).resize((out_w, out_h), Image.BICUBIC). The box must lie inside src.
inline void resize_bicubic(const image& src, const crop_box& box, std::int64_t out_h, std::int64_t out_w, image& dst,
                           resample_scratch& s) {
  require<shape_error>(box.top >= 0 && box.left >= 0 && box.height > 0 && box.width > 0 &&
                           box.top + box.height <= src.height && box.left + box.width <= src.width,
                       "resize_bicubic: crop box (top ", box.top, ", left ", box.left, ", ", box.height, " x ",
                       box.width, ") outside the ", src.height, " x ", src.width, " image");
  require<shape_error>(out_h > 0 && out_w > 0, "resize_bicubic: output size ", out_h, " x ", out_w);
  const std::int64_t C = src.channels;
  const std::int64_t in_w = box.width, in_h = box.height;
  const bool need_h = out_w != in_w, need_v = out_h != in_h;
  const std::uint8_t* in = src.data() + (box.top * src.width + box.left) * C;
  const std::int64_t in_stride = src.width * C;
  dst.resize(out_h, out_w, C);
  if (!need_h && !need_v) {
    for (std::int64_t y = 0; y < out_h; ++y)
      std::memcpy(dst.data() + y * out_w * C, in + y * in_stride, std::size_t(out_w * C));
    return;
  }
  constexpr std::int32_t half = 1 << (detail::pil_precision_bits - 1);
  // Horizontal pass: out row yy (out_w pixels) from input row yy + y0.
  auto hpass = [&](const std::uint8_t* a, std::int64_t stride, std::int64_t rows, std::int64_t y0, int kx,
                   std::uint8_t* o) {
    for (std::int64_t yy = 0; yy < rows; ++yy) {
      const std::uint8_t* row = a + (yy + y0) * stride;
      std::uint8_t* orow = o + yy * out_w * C;
      for (std::int64_t xx = 0; xx < out_w; ++xx) {
        const int xmin = s.xbounds[std::size_t(xx) * 2], xmax = s.xbounds[std::size_t(xx) * 2 + 1];
        const std::int32_t* k = s.xk.data() + xx * kx;
        for (std::int64_t c = 0; c < C; ++c) {
          std::int32_t ss = half;
          for (int x = 0; x < xmax; ++x) ss += row[(x + xmin) * C + c] * k[x];
          orow[xx * C + c] = detail::pil_clip8(ss);
        }
      }
    }
  };
  // Vertical pass: out_h rows of `width` pixels; bounds shifted up by yshift.
  auto vpass = [&](const std::uint8_t* a, std::int64_t stride, std::int64_t width, int yshift, int ky,
                   std::uint8_t* o) {
    for (std::int64_t yy = 0; yy < out_h; ++yy) {
      const int ymin = s.ybounds[std::size_t(yy) * 2] - yshift, ymax = s.ybounds[std::size_t(yy) * 2 + 1];
      const std::int32_t* k = s.yk.data() + yy * ky;
      std::uint8_t* orow = o + yy * width * C;
      for (std::int64_t xc = 0; xc < width * C; ++xc) {
        std::int32_t ss = half;
        for (int y = 0; y < ymax; ++y) ss += a[(y + ymin) * stride + xc] * k[y];
        orow[xc] = detail::pil_clip8(ss);
      }
    }
  };
  const int ky = detail::pil_coeffs(int(in_h), int(out_h), s.ybounds, s.yk, s.k);
  const int kx = need_h ? detail::pil_coeffs(int(in_w), int(out_w), s.xbounds, s.xk, s.k) : 0;
  // Pillow >= 11.x: when the height shrinks by more than twice what the width shrinks, the
  // vertical pass runs first (older Pillow always ran the horizontal pass first).
  const bool horizontal_first = !((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2);
  if (horizontal_first) {
    if (!need_v) {
      hpass(in, in_stride, out_h, 0, kx, dst.data());
      return;
    }
    if (!need_h) {
      vpass(in, in_stride, out_w, 0, ky, dst.data());
      return;
    }
    // Only the rows the vertical pass reads are resampled horizontally.
    const int ybox_first = s.ybounds[0];
    const int ybox_last = s.ybounds[std::size_t(out_h) * 2 - 2] + s.ybounds[std::size_t(out_h) * 2 - 1];
    s.tmp.resize(ybox_last - ybox_first, out_w, C);
    hpass(in, in_stride, ybox_last - ybox_first, ybox_first, kx, s.tmp.data());
    vpass(s.tmp.data(), out_w * C, out_w, ybox_first, ky, dst.data());
  } else {
    if (!need_h) {
      vpass(in, in_stride, out_w, 0, ky, dst.data());
      return;
    }
    s.tmp.resize(out_h, in_w, C);
    vpass(in, in_stride, in_w, 0, ky, s.tmp.data());
    hpass(s.tmp.data(), in_w * C, out_h, 0, kx, dst.data());
  }
}

inline void hflip(image& img) {
  const std::int64_t W = img.width, C = img.channels;
  for (std::int64_t y = 0; y < img.height; ++y) {
    std::uint8_t* row = img.data() + y * W * C;
    for (std::int64_t a = 0, b = W - 1; a < b; ++a, --b)
      for (std::int64_t c = 0; c < C; ++c) std::swap(row[a * C + c], row[b * C + c]);
  }
}

inline void adjust_brightness(image& img, double factor) {
  const auto f = static_cast<float>(factor);
  for (auto& v : img.pixels) v = detail::pil_blend(0, v, f);
}

inline void adjust_contrast(image& img, double factor) {
  const std::int64_t n = img.height * img.width;
  if (n == 0) return;
  std::int64_t sum = 0;
  if (img.channels == 3) {
    for (std::int64_t i = 0; i < n; ++i) sum += detail::pil_luma(img.data() + 3 * i);
  } else {
    for (auto v : img.pixels) sum += v;
  }
  const int mean = static_cast<int>(static_cast<double>(sum) / static_cast<double>(n) + 0.5);
  const auto f = static_cast<float>(factor);
  for (auto& v : img.pixels) v = detail::pil_blend(mean, v, f);
}

inline void adjust_saturation(image& img, double factor) {
  if (img.channels != 3) return;
  const auto f = static_cast<float>(factor);
  for (std::int64_t i = 0, n = img.height * img.width; i < n; ++i) {
    std::uint8_t* p = img.data() + 3 * i;
    const int g = detail::pil_luma(p);
    for (int c = 0; c < 3; ++c) p[c] = detail::pil_blend(g, p[c], f);
  }
}

inline void adjust_hue(image& img, double hue_factor) {
  if (img.channels != 3) return;
  // np.array(hue_factor * 255).astype(np.uint8): truncation toward zero, then modulo 256.
  const auto shift = static_cast<std::uint8_t>(static_cast<int>(hue_factor * 255) & 0xff);
  for (std::int64_t i = 0, n = img.height * img.width; i < n; ++i) {
    std::uint8_t* p = img.data() + 3 * i;
    std::uint8_t hsv[3];
    detail::pil_rgb2hsv(p, hsv);
    hsv[0] = static_cast<std::uint8_t>(hsv[0] + shift);
    detail::pil_hsv2rgb(hsv, p);
  }
}

inline void to_grayscale(image& img) {
  if (img.channels != 3) return;
  for (std::int64_t i = 0, n = img.height * img.width; i < n; ++i) {
    std::uint8_t* p = img.data() + 3 * i;
    p[0] = p[1] = p[2] = detail::pil_luma(p);
  }
}

inline void gaussian_blur(image& img, double sigma, blur_scratch& s) {
  const float r = detail::pil_box_radius(static_cast<float>(sigma), 3);
  if (!(r > 0.0f) || img.numel() == 0) return;
  const std::int64_t H = img.height, W = img.width, C = img.channels;
  for (std::int64_t c = 0; c < C; ++c) {
    detail::pil_box_blur_lines(img.data() + c, int(W), C, H, W * C, r, 3, s);  // rows
    detail::pil_box_blur_lines(img.data() + c, int(H), W * C, W, C, r, 3, s);  // columns
  }
}

inline void solarize(image& img, int threshold = 128) {
  for (auto& v : img.pixels)
    if (v >= threshold) v = static_cast<std::uint8_t>(255 - v);
}

/// out [C, H, W] = (img / 255 - mean[c]) / std[c]; mean and std hold C values (or 1, broadcast).
inline void to_tensor_normalize(const image& img, const std::vector<float>& mean, const std::vector<float>& std_,
                                float* out) {
  const std::int64_t C = img.channels, HW = img.height * img.width;
  require<config_error>((mean.size() == 1 || std::int64_t(mean.size()) == C) && mean.size() == std_.size(),
                        "to_tensor_normalize: ", mean.size(), " means and ", std_.size(), " stds for a ", C,
                        "-channel image");
  for (std::int64_t c = 0; c < C; ++c) {
    const float m = mean[mean.size() == 1 ? 0 : std::size_t(c)], sd = std_[std_.size() == 1 ? 0 : std::size_t(c)];
    float lut[256];
    for (int v = 0; v < 256; ++v) lut[v] = (static_cast<float>(v) / 255.0f - m) / sd;
    const std::uint8_t* p = img.data() + c;
    float* o = out + c * HW;
    for (std::int64_t i = 0; i < HW; ++i) o[i] = lut[p[i * C]];
  }
}

}  // namespace dino::data
