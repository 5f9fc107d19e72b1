// dino/data/idx.hpp: MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST), plain or gzip.
//
//   read_idx(images_path, labels_path) -> array_dataset [N, H, W, 1]
//   fashion_mnist(dir = "/usr/share/datasets/fashion-mnist", train = true)
//
// An IDX file is a big-endian header, magic 0x00000803 (2051: unsigned bytes, 3 dimensions)
// for images and 0x00000801 (2049: unsigned bytes, 1 dimension) for labels, the dimensions
// as 32-bit integers, then the bytes. Files that start with the gzip magic 1f 8b are
// inflated first (zlib). Everything is checked before use, each failure an io_error naming
// the file: the magic number, the header length, the data length against the dimensions
// (truncated or over-long files), the label count against the image count. num_classes is
// max(label) + 1. fashion_mnist() reads {train,t10k}-{images-idx3,labels-idx1}-ubyte with
// or without .gz (Debian's dataset-fashion-mnist installs the .gz files): 60,000 training
// or 10,000 test images of 28 x 28, labels 0..9.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/data/array_dataset.hpp"
#include "dino/data/file_bytes.hpp"

namespace dino::data {

namespace detail {

inline std::uint32_t be32(const std::uint8_t* p) {
  return std::uint32_t(p[0]) << 24 | std::uint32_t(p[1]) << 16 | std::uint32_t(p[2]) << 8 | std::uint32_t(p[3]);
}

inline std::string dims_string(const std::vector<std::int64_t>& d) {
  std::string s = "[";
  for (std::size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

/// Checks an IDX file's header and length; returns its dimensions (data starts after 4 + 4 * rank).
inline std::vector<std::int64_t> idx_header(const std::vector<std::uint8_t>& b, std::uint32_t magic, int rank,
                                            const std::string& name) {
  require<io_error>(b.size() >= 4, name, ": ", b.size(), " bytes is too short for an IDX header");
  const std::uint32_t found = be32(b.data());
  require<io_error>(found == magic, name, ": bad IDX magic number ", found, " (expected ", magic, ": ",
                    magic == 2051 ? "images, unsigned bytes, 3 dimensions" : "labels, unsigned bytes, 1 dimension",
                    ")");
  const std::size_t header = 4 + 4 * std::size_t(rank);
  require<io_error>(b.size() >= header, name, ": truncated IDX header (", b.size(), " bytes, expected at least ",
                    header, ")");
  std::vector<std::int64_t> dims(std::size_t(rank), 0);
  std::int64_t count = 1;
  for (int d = 0; d < rank; ++d) {
    dims[std::size_t(d)] = be32(b.data() + 4 + 4 * d);
    count *= dims[std::size_t(d)];  // at most 3 factors below 2^32 each: checked below
    require<io_error>(count <= (std::int64_t(1) << 40), name, ": IDX dimensions too large");
  }
  const std::int64_t data = static_cast<std::int64_t>(b.size() - header);
  require<io_error>(data == count, name, ": IDX dimensions ", dims_string(dims), " need ", count,
                    " data bytes, the file has ", data, data < count ? " (truncated)" : " (trailing bytes)");
  return dims;
}

}  // namespace detail

inline array_dataset read_idx(const std::filesystem::path& images_path, const std::filesystem::path& labels_path) {
  const std::string in = images_path.string(), ln = labels_path.string();
  std::vector<std::uint8_t> ib = read_maybe_gzip(images_path);
  const auto idims = detail::idx_header(ib, 2051, 3, in);
  require<io_error>(idims[1] > 0 && idims[2] > 0, in, ": image size ", idims[1], " x ", idims[2], " is empty");
  std::vector<std::uint8_t> lb = read_maybe_gzip(labels_path);
  const auto ldims = detail::idx_header(lb, 2049, 1, ln);
  require<io_error>(ldims[0] == idims[0], ln, ": ", ldims[0], " labels for ", idims[0], " images in ", in);

  std::vector<int> labels(lb.begin() + 8, lb.end());
  ib.erase(ib.begin(), ib.begin() + 16);
  return array_dataset(idims[0], idims[1], idims[2], 1, std::move(ib), std::move(labels), -1,
                       in);
}

/// Fashion-MNIST from `dir` (the .gz files, or the plain ones when those are absent).
inline array_dataset fashion_mnist(const std::filesystem::path& dir = "/usr/share/datasets/fashion-mnist",
                                   bool train = true) {
  const std::string stem = train ? "train" : "t10k";
  auto pick = [&](const std::string& base) {
    std::filesystem::path gz = dir / (base + ".gz"), plain = dir / base;
    if (std::filesystem::exists(gz)) return gz;
    if (std::filesystem::exists(plain)) return plain;
    throw io_error(dino::detail::concat("fashion_mnist: neither ", gz.string(), " nor ", plain.string(),
                                  " exists (Debian: apt-get install dataset-fashion-mnist)"));
  };
  const auto images = pick(stem + "-images-idx3-ubyte");
  const auto labels = pick(stem + "-labels-idx1-ubyte");
  return read_idx(images, labels);
}

}  // namespace dino::data
