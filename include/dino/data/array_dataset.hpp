// dino/data/array_dataset.hpp: an in-memory dataset of equally sized uint8 images.
//
// Holds pixels [N, H, W, C] (HWC per image, uint8) and N integer labels. Construction checks
// that the pixel count is N * H * W * C (shape_error) and that every label lies in
// [0, num_classes) (config_error); num_classes defaults to max(label) + 1. load(i) copies
// image i into the caller's image (no allocation once its capacity suffices); it is const and
// safe to call from several threads. read_idx and read_cifar return one of these.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/data/image.hpp"

namespace dino::data {

class array_dataset {
 public:
  array_dataset() = default;

  /// pixels: n * height * width * channels bytes; labels: n values in [0, num_classes).
  /// num_classes < 0 takes max(label) + 1. `name` appears in error messages.
  array_dataset(std::int64_t n, std::int64_t height, std::int64_t width, std::int64_t channels,
                std::vector<std::uint8_t> pixels, std::vector<int> labels, int num_classes = -1,
                std::string name = "array_dataset")
      : n_(n), h_(height), w_(width), c_(channels), pixels_(std::move(pixels)), labels_(std::move(labels)),
        name_(std::move(name)) {
    require<shape_error>(n >= 0 && height > 0 && width > 0 && (channels == 1 || channels == 3), name_,
                         ": expected N >= 0, H, W > 0 and 1 or 3 channels, found [", n, ", ", height, ", ", width,
                         ", ", channels, "]");
    require<shape_error>(static_cast<std::int64_t>(pixels_.size()) == n * height * width * channels, name_,
                         ": expected ", n * height * width * channels, " pixel bytes for [", n, ", ", height, ", ",
                         width, ", ", channels, "], found ", pixels_.size());
    require<shape_error>(static_cast<std::int64_t>(labels_.size()) == n, name_, ": expected ", n,
                         " labels, found ", labels_.size());
    int max_label = -1;
    for (std::size_t i = 0; i < labels_.size(); ++i) {
      require<config_error>(labels_[i] >= 0, name_, ": label ", labels_[i], " of sample ", i, " is negative");
      max_label = std::max(max_label, labels_[i]);
    }
    classes_ = num_classes < 0 ? max_label + 1 : num_classes;
    require<config_error>(max_label < classes_, name_, ": label ", max_label, " is not below num_classes ",
                          classes_);
  }

  std::int64_t size() const { return n_; }
  int label(std::int64_t i) const {
    check(i);
    return labels_[static_cast<std::size_t>(i)];
  }
  int num_classes() const { return classes_; }
  std::int64_t channels() const { return c_; }
  std::int64_t height() const { return h_; }
  std::int64_t width() const { return w_; }
  const std::string& name() const { return name_; }
  const std::vector<int>& labels() const { return labels_; }
  /// Image i's HWC bytes.
  const std::uint8_t* data(std::int64_t i) const {
    check(i);
    return pixels_.data() + i * h_ * w_ * c_;
  }

  void load(std::int64_t i, image& out) const {
    const std::uint8_t* src = data(i);
    out.resize(h_, w_, c_);
    std::memcpy(out.data(), src, static_cast<std::size_t>(h_ * w_ * c_));
  }

 private:
  void check(std::int64_t i) const {
    require<shape_error>(i >= 0 && i < n_, name_, ": sample index ", i, " outside [0, ", n_, ")");
  }

  std::int64_t n_ = 0, h_ = 0, w_ = 0, c_ = 0;
  std::vector<std::uint8_t> pixels_;
  std::vector<int> labels_;
  int classes_ = 0;
  std::string name_ = "array_dataset";
};

static_assert(dataset<array_dataset>);

}  // namespace dino::data
