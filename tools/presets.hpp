// tools/presets.hpp: architecture names of the command-line tools.
#pragma once

#include <string>

#include <dino/data/image.hpp>
#include <dino/nn/vit.hpp>

#include "cli.hpp"

namespace dino_tools {

/// vit_tiny, vit_small, vit_base (224 px grid, 3 channels), vit_small28 (D 192, depth 6,
/// 3 heads), vit_tiny28 (D 96, depth 4, 3 heads): 28 px, 1 channel. patch 0: the preset's.
inline dino::nn::vit_config arch(const std::string& name, long patch) {
  if (name == "vit_tiny") return dino::nn::vit_tiny(patch ? patch : 16);
  if (name == "vit_small") return dino::nn::vit_small(patch ? patch : 16);
  if (name == "vit_base") return dino::nn::vit_base(patch ? patch : 16);
  if (name == "vit_small28") return dino::nn::vit_small28(patch ? patch : 4);
  if (name == "vit_tiny28") {
    auto c = dino::nn::vit_small28(patch ? patch : 4);
    c.embed_dim = 96;
    c.depth = 4;
    c.heads = 3;
    return c;
  }
  throw dino_cli::usage_error("unknown --arch '" + name + "' (vit_tiny, vit_small, vit_base, vit_small28, vit_tiny28)");
}

/// Grayscale images of at most 32 pixels get the 28-px presets.
template <class Dataset>
bool is_small_images(const Dataset& ds) {
  if (ds.size() == 0) return false;
  dino::data::image img;
  ds.load(0, img);
  return img.height <= 32 && img.width <= 32 && ds.channels() == 1;
}

}  // namespace dino_tools
