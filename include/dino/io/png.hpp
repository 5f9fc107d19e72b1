// dino/io/png.hpp: 8-bit images in memory, PNG files, and a heat colour map.
//
// image_u8 holds width x height pixels of 1 (gray), 3 (RGB) or 4 (RGBA) interleaved 8-bit
// channels, rows top to bottom. encode_png compresses one to PNG bytes with stb_image_write
// (libstb-dev); write_png writes them atomically (io/atomic_file.hpp: a temporary file next to
// the target, fsync, rename), so a reader never finds half a PNG. Failures throw io_error
// naming the file; bad sizes throw shape_error.
//
// heat_color(t) maps t in [0, 1] (clamped; NaN gives 0) to RGB along a perceptually ordered
// dark-to-light scale (near black, purple, red, orange, pale yellow): the attention overlays of
// eval/attention_png.hpp use it.
//
// stb_image_write is compiled into every translation unit that includes this header with
// STB_IMAGE_WRITE_STATIC (static functions, no link-time symbols). A translation unit that has
// already included <stb/stb_image_write.h> itself uses that declaration and must link one
// implementation, as stb asks; do not define STB_IMAGE_WRITE_IMPLEMENTATION after including
// this header in the same translation unit.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#if !defined(INCLUDE_STB_IMAGE_WRITE_H)
#define STB_IMAGE_WRITE_STATIC
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include <stb/stb_image_write.h>
#undef STB_IMAGE_WRITE_IMPLEMENTATION
#undef STB_IMAGE_WRITE_STATIC
#endif

#include "dino/core/error.hpp"
#include "dino/io/atomic_file.hpp"

namespace dino::io {

/// An 8-bit image: `channels` interleaved values per pixel, rows top to bottom.
struct image_u8 {
  int width = 0, height = 0, channels = 3;
  std::vector<std::uint8_t> pixels;  ///< [height, width, channels]

  image_u8() = default;
  /// A width x height image with every channel set to `fill`.
  image_u8(int w, int h, int c = 3, std::uint8_t fill = 0) : width(w), height(h), channels(c) {
    require<shape_error>(w > 0 && h > 0 && c >= 1 && c <= 4, "image_u8: invalid size ", w, " x ", h, " x ", c);
    pixels.assign(static_cast<std::size_t>(w) * static_cast<std::size_t>(h) * static_cast<std::size_t>(c), fill);
  }
  std::uint8_t* at(int x, int y) {
    return pixels.data() + (static_cast<std::size_t>(y) * static_cast<std::size_t>(width) + static_cast<std::size_t>(x)) *
                               static_cast<std::size_t>(channels);
  }
  const std::uint8_t* at(int x, int y) const { return const_cast<image_u8*>(this)->at(x, y); }
};

/// PNG bytes of width x height pixels of `channels` (1 to 4) 8-bit values, rows top to bottom.
inline std::string encode_png(int width, int height, int channels, const std::uint8_t* pixels) {
  require<shape_error>(width > 0 && height > 0 && channels >= 1 && channels <= 4 && pixels != nullptr,
                       "encode_png: invalid image ", width, " x ", height, " x ", channels,
                       pixels ? "" : " (null pixels)");
  std::string out;
  auto sink = [](void* ctx, void* data, int size) {
    static_cast<std::string*>(ctx)->append(static_cast<const char*>(data), static_cast<std::size_t>(size));
  };
  const int ok = stbi_write_png_to_func(sink, &out, width, height, channels, pixels, width * channels);
  require<io_error>(ok != 0 && !out.empty(), "encode_png: stb_image_write failed for a ", width, " x ", height, " x ",
                    channels, " image");
  return out;
}

/// Writes width x height pixels of `channels` (1 gray, 2 gray+alpha, 3 RGB, 4 RGBA) 8-bit values
/// as a PNG file, atomically.
inline void write_png(const std::string& path, int width, int height, int channels, const std::uint8_t* pixels) {
  std::string bytes;
  try {
    bytes = encode_png(width, height, channels, pixels);
  } catch (const error& e) {
    throw io_error("write_png: " + path + ": " + e.what());
  }
  write_file_atomic(path, std::span<const std::byte>(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size()));
}

inline void write_png(const std::string& path, const image_u8& img) {
  require<shape_error>(img.pixels.size() == static_cast<std::size_t>(img.width) * static_cast<std::size_t>(img.height) *
                                               static_cast<std::size_t>(img.channels),
                       "write_png: ", path, ": the image holds ", img.pixels.size(), " values, not ", img.width, " x ",
                       img.height, " x ", img.channels);
  write_png(path, img.width, img.height, img.channels, img.pixels.data());
}

/// The heat colour map: t in [0, 1] (clamped; NaN as 0) to RGB, dark (low) to light (high),
/// piecewise linear between five control colours.
inline std::array<std::uint8_t, 3> heat_color(double t) {
  static constexpr double stops[5][3] = {
      {12, 8, 42}, {118, 30, 112}, {208, 62, 72}, {248, 150, 44}, {255, 248, 170}};
  if (!(t > 0)) t = 0;
  if (t > 1) t = 1;
  const double s = t * 4.0;
  const int i = std::min(3, static_cast<int>(s));
  const double f = s - i;
  std::array<std::uint8_t, 3> c{};
  for (int k = 0; k < 3; ++k)
    c[static_cast<std::size_t>(k)] =
        static_cast<std::uint8_t>(std::lround(stops[i][k] + f * (stops[i + 1][k] - stops[i][k])));
  return c;
}

}  // namespace dino::io
