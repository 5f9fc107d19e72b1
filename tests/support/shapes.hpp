// tests/support/shapes.hpp: a synthetic image data set of four shape classes, for the tests
// that train on images (tests/unit/test_train.cpp, test_tools_cli.cpp).
//
// shape_images(n, seed): n grey 28 x 28 images, image i of class i % 4: a filled square, a
// horizontal bar, a vertical bar or a frame, at a random offset of -3..2 pixels with a random
// brightness in [150, 250), on a near-black background (values 0..3); pixels row-major, one
// byte each (an IDX file's or an array_dataset's layout). The same (n, seed), the same bytes.
#pragma once

#include <cstdint>
#include <vector>

namespace dino_test {

struct shape_set {
  std::vector<std::uint8_t> pixels;  ///< [n, 28, 28]
  std::vector<int> labels;           ///< [n], i % 4
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

}  // namespace dino_test
