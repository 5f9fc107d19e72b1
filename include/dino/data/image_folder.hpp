// dino/data/image_folder.hpp: a folder of class sub-folders of images, as torchvision's
// ImageFolder (the reference's training set reader).
//
//   image_folder ds("train/");   // train/<class>/**/<image>.{jpg,jpeg,png,bmp,ppm,pgm}
//
// Classes are the immediate sub-folders of root, sorted by name (byte order, as Python's
// sorted()); class i is the i-th name. Inside a class folder the files are found
// recursively, following symbolic links, and ordered as torchvision orders them: by the
// folder they are in, then by file name. Extensions are matched without regard to case;
// other files are ignored. Construction throws io_error when root is missing, holds no
// class folder, or a class folder holds no image (torchvision refuses empty classes too).
//
// load(i) reads and decodes file i with stb_image (dino/data/stb_image.hpp) into 3 channels:
// grayscale and palette images are expanded and alpha is dropped, as PIL's convert("RGB")
// in torchvision's loader does (16-bit PNGs keep their high byte). JPEG decoding is stb's,
// not libjpeg's: pixels may differ from PIL's by a few levels. An unreadable or undecodable
// file throws io_error naming it and giving stb's reason. load() is const and thread-safe;
// it allocates (the file's bytes, stb's buffer).
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/data/file_bytes.hpp"
#include "dino/data/image.hpp"
#include "dino/data/stb_image.hpp"

namespace dino::data {

namespace detail {
inline bool is_image_extension(const std::filesystem::path& p) {
  std::string e = p.extension().string();
  for (char& c : e) c = static_cast<char>(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
  return e == ".jpg" || e == ".jpeg" || e == ".png" || e == ".bmp" || e == ".ppm" || e == ".pgm";
}
}  // namespace detail

/// Decodes an encoded image (PNG, JPEG, BMP, PPM/PGM) into 3-channel HWC bytes; `name`
/// appears in the io_error when the bytes cannot be decoded.
inline void decode_image(const std::vector<std::uint8_t>& bytes, const std::string& name, image& out) {
  require<io_error>(!bytes.empty(), name, ": cannot decode image: the file is empty");
  require<io_error>(bytes.size() <= static_cast<std::size_t>(INT_MAX), name, ": cannot decode image: ",
                    bytes.size(), " bytes is too large");
  int w = 0, h = 0, n = 0;
  stbi_uc* px = stbi_load_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &n, 3);
  if (px == nullptr) {
    const char* why = stbi_failure_reason();
    throw io_error(dino::detail::concat(name, ": cannot decode image: ", why ? why : "unknown reason"));
  }
  struct release {
    stbi_uc* p;
    ~release() { stbi_image_free(p); }
  } r{px};
  require<io_error>(w > 0 && h > 0, name, ": cannot decode image: size ", w, " x ", h);
  out.resize(h, w, 3);
  std::memcpy(out.data(), px, static_cast<std::size_t>(w) * static_cast<std::size_t>(h) * 3);
}

class image_folder {
 public:
  explicit image_folder(const std::filesystem::path& root) : root_(root) {
    namespace fs = std::filesystem;
    const std::string rn = root.string();
    try {
      require<io_error>(fs::is_directory(root), "image_folder: ", rn, ": no such directory");
      for (const auto& e : fs::directory_iterator(root))
        if (e.is_directory()) classes_.push_back(e.path().filename().string());
      std::sort(classes_.begin(), classes_.end());
      require<io_error>(!classes_.empty(), "image_folder: ", rn, " holds no class folder");
      for (std::size_t c = 0; c < classes_.size(); ++c) {
        std::vector<std::pair<std::string, std::string>> found;  // (folder, file name)
        const fs::path dir = root / classes_[c];
        for (const auto& e : fs::recursive_directory_iterator(dir, fs::directory_options::follow_directory_symlink)) {
          if (e.is_regular_file() && detail::is_image_extension(e.path()))
            found.emplace_back(e.path().parent_path().string(), e.path().filename().string());
        }
        require<io_error>(!found.empty(), "image_folder: class folder ", dir.string(),
                          " holds no image (.jpg .jpeg .png .bmp .ppm .pgm)");
        std::sort(found.begin(), found.end());
        for (auto& [folder, file] : found) {
          files_.push_back(fs::path(folder) / file);
          labels_.push_back(static_cast<int>(c));
        }
      }
    } catch (const fs::filesystem_error& e) {
      throw io_error(dino::detail::concat("image_folder: ", rn, ": ", e.what()));
    }
  }

  std::int64_t size() const { return static_cast<std::int64_t>(files_.size()); }
  int label(std::int64_t i) const {
    check(i);
    return labels_[static_cast<std::size_t>(i)];
  }
  int num_classes() const { return static_cast<int>(classes_.size()); }
  std::int64_t channels() const { return 3; }
  /// Class names, sorted: class i is classes()[i].
  const std::vector<std::string>& classes() const { return classes_; }
  const std::filesystem::path& path(std::int64_t i) const {
    check(i);
    return files_[static_cast<std::size_t>(i)];
  }
  const std::filesystem::path& root() const { return root_; }

  void load(std::int64_t i, image& out) const {
    const auto& p = path(i);
    decode_image(read_file_bytes(p), p.string(), out);
  }

 private:
  void check(std::int64_t i) const {
    require<shape_error>(i >= 0 && i < size(), "image_folder ", root_.string(), ": sample index ", i,
                         " outside [0, ", size(), ")");
  }

  std::filesystem::path root_;
  std::vector<std::string> classes_;
  std::vector<std::filesystem::path> files_;
  std::vector<int> labels_;
};

static_assert(dataset<image_folder>);

}  // namespace dino::data
