// dino/data/cifar.hpp: CIFAR-10 and CIFAR-100 binary batches.
//
//   read_cifar(paths, cifar100 = false) -> array_dataset [N, 32, 32, 3]
//   cifar10(dir, train = true)    data_batch_1..5.bin or test_batch.bin in dir
//   cifar100(dir, train = true)   train.bin or test.bin in dir (fine labels)
//
// A record is 1 label byte (CIFAR-10) or 2 (CIFAR-100: coarse, then fine; the fine label is
// kept) followed by 3072 pixel bytes, the red plane, then green, then blue (CHW, 32 x 32);
// they are stored HWC. Each file must be a whole, non-zero number of records and every
// label below 10 (or 100); any failure is an io_error naming the file. Files are read in
// the order given, so sample indices follow that order.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/data/array_dataset.hpp"
#include "dino/data/file_bytes.hpp"

namespace dino::data {

inline array_dataset read_cifar(const std::vector<std::filesystem::path>& paths, bool cifar100 = false) {
  constexpr std::int64_t side = 32, plane = side * side, pixels = 3 * plane;
  const std::int64_t label_bytes = cifar100 ? 2 : 1, record = label_bytes + pixels;
  const int classes = cifar100 ? 100 : 10;
  require<io_error>(!paths.empty(), "read_cifar: no files given");
  std::vector<std::uint8_t> out;
  std::vector<int> labels;
  for (const auto& p : paths) {
    const std::string name = p.string();
    const std::vector<std::uint8_t> b = read_file_bytes(p);
    const auto size = static_cast<std::int64_t>(b.size());
    require<io_error>(size > 0 && size % record == 0, name, ": ", size, " bytes is not a whole number of ",
                      cifar100 ? "CIFAR-100" : "CIFAR-10", " records of ", record, " bytes",
                      size > record ? " (truncated?)" : "");
    const std::int64_t n = size / record;
    const std::size_t base = out.size();
    out.resize(base + static_cast<std::size_t>(n * pixels));
    labels.reserve(labels.size() + static_cast<std::size_t>(n));
    for (std::int64_t r = 0; r < n; ++r) {
      const std::uint8_t* rec = b.data() + r * record;
      const int label = rec[label_bytes - 1];
      require<io_error>(label < classes, name, ": record ", r, " has label ", label, ", expected below ", classes);
      labels.push_back(label);
      const std::uint8_t* px = rec + label_bytes;
      std::uint8_t* dst = out.data() + base + r * pixels;
      for (std::int64_t i = 0; i < plane; ++i) {
        dst[3 * i + 0] = px[i];
        dst[3 * i + 1] = px[plane + i];
        dst[3 * i + 2] = px[2 * plane + i];
      }
    }
  }
  const auto n = static_cast<std::int64_t>(labels.size());
  return array_dataset(n, side, side, 3, std::move(out), std::move(labels), classes,
                       paths.size() == 1 ? paths.front().string() : paths.front().string() + " (and others)");
}

/// CIFAR-10 from the "cifar-10-batches-bin" folder.
inline array_dataset cifar10(const std::filesystem::path& dir, bool train = true) {
  std::vector<std::filesystem::path> p;
  if (train) {
    for (int i = 1; i <= 5; ++i) p.push_back(dir / ("data_batch_" + std::to_string(i) + ".bin"));
  } else {
    p.push_back(dir / "test_batch.bin");
  }
  return read_cifar(p, false);
}

/// CIFAR-100 from the "cifar-100-binary" folder (fine labels).
inline array_dataset cifar100(const std::filesystem::path& dir, bool train = true) {
  return read_cifar({dir / (train ? "train.bin" : "test.bin")}, true);
}

}  // namespace dino::data
