// tests/support/shapes.hpp: synthetic image data sets of four classes, for the tests that
// train on images (tests/unit/test_train.cpp, test_tools_cli.cpp).
//
// shape_images(n, seed): n grey 28 x 28 images, image i of class i % 4: a filled square, a
// horizontal bar, a vertical bar or a frame, at a random offset of -3..2 pixels with a random
// brightness in [150, 250), on a near-black background (values 0..3); pixels row-major, one
// byte each (an IDX file's or an array_dataset's layout). The same (n, seed), the same bytes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace dino_test {

struct shape_set {
  std::vector<std::uint8_t> pixels;  ///< [n, 28, 28, channels]
  std::vector<int> labels;           ///< [n], i % 4
  int channels = 1;                  ///< bytes per pixel (HWC)
};

inline constexpr int kShapeSize = 28, kShapeClasses = 4;

inline shape_set shape_images(int n, std::uint32_t seed) {
  shape_set s;
  s.pixels.reserve(std::size_t(n) * kShapeSize * kShapeSize);
  s.labels.reserve(std::size_t(n));
  std::uint32_t r = seed;
  auto rnd = [&](int m) {
    r = r * 1664525u + 1013904223u;
    return int((r >> 8) % std::uint32_t(m));
  };
  for (int i = 0; i < n; ++i) {
    const int c = i % kShapeClasses, ox = rnd(6) - 3, oy = rnd(6) - 3, v = 150 + rnd(100);
    s.labels.push_back(c);
    for (int y = 0; y < kShapeSize; ++y)
      for (int x = 0; x < kShapeSize; ++x) {
        const int X = x - ox, Y = y - oy;
        bool on = false;
        if (c == 0) on = X >= 8 && X < 20 && Y >= 8 && Y < 20;
        if (c == 1) on = X >= 3 && X < 25 && Y >= 11 && Y < 17;
        if (c == 2) on = Y >= 3 && Y < 25 && X >= 11 && X < 17;
        if (c == 3) on = X >= 5 && X < 23 && Y >= 5 && Y < 23 && !(X >= 9 && X < 19 && Y >= 9 && Y < 19);
        s.pixels.push_back(std::uint8_t(on ? v : rnd(4)));
      }
  }
  return s;
}

// colour_textures(n, seed): n colour 28 x 28 images (HWC, 3 bytes a pixel) in four classes,
// image i of class i % 4, every image its own instance. The class is a hue sector: class c
// draws its hue from [90 c + 9, 90 c + 81) degrees. Everything else varies per image and
// says nothing of the class: the saturation (0.6 - 1), the mean brightness (70 - 185) and
// contrast (amplitude 35 - 70), +-8 of noise per byte, and a texture of one of four families
// (stripes: a sine grating; a checkerboard; rings around a point anywhere in the image; dots
// on a lattice), each with its own orientation (0 - pi), period (4 - 10 px, log-uniform),
// phase and centre. Any crop of an image thus shows its hue and texture. The same (n, seed),
// the same bytes.
inline shape_set colour_textures(int n, std::uint32_t seed) {
  shape_set s;
  s.channels = 3;
  s.pixels.reserve(std::size_t(n) * kShapeSize * kShapeSize * 3);
  s.labels.reserve(std::size_t(n));
  std::uint32_t r = seed * 2654435761u + 12345u;
  auto uni = [&](double lo, double hi) {
    r = r * 1664525u + 1013904223u;
    return lo + (hi - lo) * double(r >> 8) / double(1u << 24);
  };
  const double pi = 3.14159265358979323846;
  for (int i = 0; i < n; ++i) {
    const int c = i % kShapeClasses, family = int(uni(0, 4)) & 3;
    const double hue = (90.0 * c + uni(9, 81)) / 60.0, sat = uni(0.6, 1.0);  // hue in sixths of the circle
    double rgb[3];
    for (int k = 0; k < 3; ++k) {  // HSV -> RGB at V = 1: red, green, blue peak at hue 0, 2, 4
      const double d = std::fabs(std::fmod(hue + 6.0 - 2.0 * k, 6.0) - 3.0) - 1.0;
      rgb[k] = 1.0 - sat + sat * std::clamp(d, 0.0, 1.0);
    }
    const double th = uni(0, pi), period = 4.0 * std::exp(uni(0, std::log(2.5))), ph = uni(0, 2 * pi);
    const double cx = uni(0, kShapeSize), cy = uni(0, kShapeSize), mean = uni(70, 185), amp = uni(35, 70);
    const double ct = std::cos(th), st = std::sin(th), w = 2 * pi / period;
    s.labels.push_back(c);
    for (int y = 0; y < kShapeSize; ++y)
      for (int x = 0; x < kShapeSize; ++x) {
        const double dx = x - cx, dy = y - cy, u = dx * ct + dy * st, v = -dx * st + dy * ct;
        double f = 0;  // the texture, in [-1, 1]
        if (family == 0) f = std::sin(w * u + ph);
        if (family == 1) f = std::sin(w * u + ph) * std::sin(w * v + ph) > 0 ? 1.0 : -1.0;
        if (family == 2) f = std::sin(w * std::sqrt(dx * dx + dy * dy) + ph);
        if (family == 3) {  // a spot of radius ~period / 4 at each lattice point
          const double gu = u / period - std::floor(u / period) - 0.5, gv = v / period - std::floor(v / period) - 0.5;
          f = 2 * std::exp(-8.0 * (gu * gu + gv * gv)) - 1;
        }
        const double grey = mean + amp * f;
        for (int k = 0; k < 3; ++k) s.pixels.push_back(std::uint8_t(std::clamp(grey * rgb[k] + uni(-8, 8), 0.0, 255.0)));
      }
  }
  return s;
}

}  // namespace dino_test
