// tools/presets.hpp: architecture names of the command-line tools.
#pragma once

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include <dino/data/image.hpp>
#include <dino/io/checkpoint.hpp>
#include <dino/io/safetensors.hpp>
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

/// The architecture from a checkpoint's tensor shapes: D and the patch from
/// patch_embed.proj.weight, the stored grid from pos_embed, the depth from blocks.N, the MLP
/// ratio from blocks.0.mlp.fc1.weight, heads = D / 64 (every released DINO ViT) unless given.
/// `program` and `alternatives` (the other flags that give the architecture) word the errors.
inline dino::nn::vit_config config_from_file(const dino::io::safetensors_file& f, const std::string& key,
                                             std::int64_t heads, const std::string& program,
                                             const std::string& alternatives) {
  std::map<std::string, std::vector<std::int64_t>> shapes;
  for (const auto& t : f.tensors()) {
    auto [group, rest] = dino::io::split_group(t.name);
    if (!key.empty() && !group.empty() && group != key) continue;
    shapes[dino::io::canonical_param_name(t.name)] = t.shape;
  }
  auto need = [&](const std::string& n, std::size_t rank) -> const std::vector<std::int64_t>& {
    auto it = shapes.find(n);
    if (it == shapes.end() || it->second.size() != rank)
      throw dino::io_error(program + ": " + f.name() + ": cannot infer the architecture: no " + std::to_string(rank) +
                           "-d tensor '" + n + "' (give " + alternatives + ")");
    return it->second;
  };
  const auto& pw = need("patch_embed.proj.weight", 4);
  const auto& pe = need("pos_embed", 3);
  dino::nn::vit_config c;
  c.embed_dim = pw[0];
  c.in_chans = pw[1];
  c.patch = pw[2];
  const auto n0 = pe[1] - 1;
  const auto g = static_cast<std::int64_t>(std::llround(std::sqrt(double(n0))));
  if (g * g != n0)
    throw dino::io_error(program + ": " + f.name() + ": pos_embed has " + std::to_string(n0) +
                         " patch positions, not a square grid");
  c.img_size = g * c.patch;
  c.depth = 0;
  while (shapes.count("blocks." + std::to_string(c.depth) + ".attn.qkv.weight")) ++c.depth;
  if (c.depth == 0) throw dino::io_error(program + ": " + f.name() + ": no blocks.N.attn.qkv.weight tensors");
  if (heads == 0 && c.embed_dim % 64 != 0)
    throw dino::io_error(program + ": " + f.name() + ": embed dim " + std::to_string(c.embed_dim) +
                         " is not a multiple of 64, so heads = D / 64 does not apply (give --heads or " + alternatives + ")");
  c.heads = heads ? heads : c.embed_dim / 64;
  if (c.embed_dim % c.heads != 0)
    throw dino_cli::usage_error("--heads " + std::to_string(c.heads) + " does not divide the embed dim " +
                                std::to_string(c.embed_dim));
  c.mlp_ratio = double(need("blocks.0.mlp.fc1.weight", 2)[0]) / double(c.embed_dim);
  c.qkv_bias = shapes.count("blocks.0.attn.qkv.bias") > 0;
  return c;
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
