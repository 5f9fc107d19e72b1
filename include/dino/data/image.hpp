// dino/data/image.hpp: a decoded image and the dataset concept every reader satisfies.
//
// image: height x width x channels bytes, HWC (interleaved) uint8, row-major. resize() keeps
// the vector's capacity, so a reader that loads into the same image again and again stops
// allocating once it has seen its largest image.
//
// dino::data::dataset<D>: a const D offers
//   size()          -> std::int64_t   number of samples
//   label(i)        -> int            class index of sample i, in [0, num_classes())
//   num_classes()   -> int
//   channels()      -> std::int64_t   channels of every image load() produces (1 or 3)
//   load(i, image&)                   decodes sample i into the image, reusing its storage
// load() must be safe to call concurrently from several threads on the same const object
// (the loader's workers share one dataset). A sample that cannot be read throws io_error
// naming the file; an index outside [0, size()) throws shape_error.
#pragma once

#include <concepts>
#include <cstdint>
#include <vector>

namespace dino::data {

struct image {
  std::int64_t height = 0, width = 0, channels = 0;
  std::vector<std::uint8_t> pixels;  ///< HWC, height * width * channels bytes

  /// Sets the extents and sizes the pixels (contents unspecified); keeps the capacity.
  void resize(std::int64_t h, std::int64_t w, std::int64_t c) {
    height = h;
    width = w;
    channels = c;
    pixels.resize(static_cast<std::size_t>(h * w * c));
  }
  std::int64_t numel() const { return height * width * channels; }
  std::uint8_t* data() { return pixels.data(); }
  const std::uint8_t* data() const { return pixels.data(); }
  std::uint8_t& at(std::int64_t y, std::int64_t x, std::int64_t c) {
    return pixels[static_cast<std::size_t>((y * width + x) * channels + c)];
  }
  std::uint8_t at(std::int64_t y, std::int64_t x, std::int64_t c) const {
    return pixels[static_cast<std::size_t>((y * width + x) * channels + c)];
  }
};

template <class D>
concept dataset = requires(const D& d, std::int64_t i, image& img) {
  { d.size() } -> std::convertible_to<std::int64_t>;
  { d.label(i) } -> std::convertible_to<int>;
  { d.num_classes() } -> std::convertible_to<int>;
  { d.channels() } -> std::convertible_to<std::int64_t>;
  d.load(i, img);
};

}  // namespace dino::data
