// dino/io/checkpoint.hpp: save and load a flat_params<float> as safetensors, by state_dict name.
//
// save_params writes every tensor of the layout under prefix + its name ("backbone.blocks.0.
// attn.qkv.weight"), F32 (or BF16), atomically, with metadata (plus "format": "pt" unless
// given, as Hugging Face tools expect).
//
// load_params fills every tensor of the layout from a file whose names follow the official
// DINO checkpoints (dino-spec §6) with any of their wrappers:
//   group   "teacher." | "student."   (a file converted from a full checkpoint.pth)
//   then    "module." and "backbone."  (DDP and MultiCropWrapper; dropped by DINO's own loader)
// Both the file's names and the layout's (after options.prefix) are reduced to a canonical
// name by removing the group, then every leading "module." and "backbone."; the weight-norm
// names of newer PyTorch ("last_layer.parametrizations.weight.original0/1") become
// "last_layer.weight_g/_v". So a bare backbone file (dino_deitsmall16_pretrain), a teacher
// dict ("backbone.*", "head.*") and a student dict ("module.backbone.*") all load into a
// backbone layout ("blocks.0...") or into a method's layout ("backbone.blocks.0...",
// "head.mlp.0.weight").
//
// options.checkpoint_key ("teacher" or "student") prefers that group: a tensor is taken from
// "<key>.*" when there, else from the names without a group; the other group is skipped.
// Names without a group count as the group written in the file's "checkpoint_key" metadata,
// when present (tools/convert_pth.py writes it). With no key, every tensor is a candidate.
// Failures throw io_error naming the file and the layout tensor: a tensor not found, two
// candidates of equal preference (ambiguous; choose a checkpoint_key), a shape that differs
// (expected and found shapes), a dtype that is not F32/F16/BF16/F64. The layout is checked
// completely before any value is written, so a failed load leaves params unchanged.
// Candidates the layout does not use are returned in load_result::unused and fail only when
// options.strict is set.
#pragma once

#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/core/param_store.hpp"
#include "dino/io/safetensors.hpp"

namespace dino::io {

struct load_options {
  std::string checkpoint_key;  ///< "", "teacher" or "student": the group to prefer
  std::string prefix;          ///< put before every layout name before matching (as save_params' prefix)
  bool strict = false;         ///< fail when candidate tensors remain unused
};

struct loaded_tensor {
  std::string layout_name;
  std::string file_name;
};

struct load_result {
  std::vector<loaded_tensor> loaded;  ///< in layout order
  std::vector<std::string> unused;    ///< candidates (file names) the layout did not use
  std::vector<std::string> skipped;   ///< tensors of the group not chosen by checkpoint_key
};

/// Splits "teacher.x" / "student.x" into the group and the rest; other names have no group.
inline std::pair<std::string_view, std::string_view> split_group(std::string_view name) {
  for (std::string_view g : {std::string_view("teacher"), std::string_view("student")})
    if (name.size() > g.size() && name.substr(0, g.size()) == g && name[g.size()] == '.')
      return {g, name.substr(g.size() + 1)};
  return {{}, name};
}

/// The name that file and layout tensors are matched by (see the header comment).
inline std::string canonical_param_name(std::string_view name) {
  name = split_group(name).second;
  for (bool again = true; again;) {
    again = false;
    for (std::string_view p : {std::string_view("module."), std::string_view("backbone.")})
      if (name.size() > p.size() && name.substr(0, p.size()) == p) {
        name.remove_prefix(p.size());
        again = true;
      }
  }
  std::string s(name);
  for (auto [from, to] : {std::pair<std::string_view, std::string_view>{".parametrizations.weight.original0", ".weight_g"},
                          {".parametrizations.weight.original1", ".weight_v"}})
    if (s.size() >= from.size() && std::string_view(s).substr(s.size() - from.size()) == from)
      s.replace(s.size() - from.size(), from.size(), to);
  return s;
}

/// Writes every tensor of params' layout as prefix + name (see the header comment).
inline void save_params(const std::string& path, const flat_params<float>& params, const std::string& prefix = "",
                        const metadata_map& metadata = {}, st_dtype dtype = st_dtype::f32) {
  require<io_error>(params.size() > 0, "save_params: ", path, ": the parameters have no layout");
  std::vector<tensor_entry> entries;
  for (const auto& e : params.layout().entries()) {
    tensor_entry t{prefix + e.name, {}, params.data() + e.offset};
    for (int i = 0; i < e.shape.rank; ++i) t.shape.push_back(e.shape[i]);
    entries.push_back(std::move(t));
  }
  metadata_map m = metadata;
  m.emplace("format", "pt");
  write_safetensors(path, entries, m, dtype);
}

/// Fills params from a checked file (see the header comment).
inline load_result load_params(const safetensors_file& file, flat_params<float>& params,
                               const load_options& options = {}) {
  using dino::detail::concat;
  const std::string& fname = file.name();
  auto fail = [&](const std::string& what) { throw io_error("load_params: " + fname + ": " + what); };
  if (!options.checkpoint_key.empty() && options.checkpoint_key != "teacher" && options.checkpoint_key != "student")
    throw config_error("load_params: checkpoint_key must be \"\", \"teacher\" or \"student\", got \"" +
                       options.checkpoint_key + "\"");
  require<io_error>(params.size() > 0, "load_params: ", fname, ": the parameters have no layout");

  std::string file_group;  // the group of the names without one, from the metadata
  if (auto it = file.metadata().find("checkpoint_key"); it != file.metadata().end()) file_group = it->second;

  struct candidate {
    std::string canonical;
    int rank;  // 0 preferred, 1 fallback
    const tensor_info* info;
    bool used = false;
  };
  std::vector<candidate> cands;
  load_result result;
  for (const auto& t : file.tensors()) {
    std::string_view g = split_group(t.name).first;
    int rank = 0;
    if (!options.checkpoint_key.empty()) {
      std::string_view eff = g.empty() ? std::string_view(file_group) : g;
      if (eff == options.checkpoint_key) {
        rank = g.empty() ? 1 : 0;
      } else if (g.empty() && eff != "teacher" && eff != "student") {
        rank = 1;
      } else {
        result.skipped.push_back(t.name);
        continue;
      }
    }
    cands.push_back({canonical_param_name(t.name), rank, &t});
  }
  std::sort(cands.begin(), cands.end(), [](const candidate& a, const candidate& b) {
    return a.canonical != b.canonical ? a.canonical < b.canonical : a.rank < b.rank;
  });

  // Match and check everything first; write only when the whole layout fits.
  std::vector<std::pair<const param_entry*, candidate*>> plan;
  for (const auto& e : params.layout().entries()) {
    const std::string lname = options.prefix + e.name;
    const std::string canon = canonical_param_name(lname);
    auto lo = std::lower_bound(cands.begin(), cands.end(), canon,
                               [](const candidate& c, const std::string& k) { return c.canonical < k; });
    if (lo == cands.end() || lo->canonical != canon) {
      std::string hint;
      for (const auto& s : result.skipped)
        if (canonical_param_name(s) == canon) hint = " (the file has it as '" + s + "', outside checkpoint_key \"" +
                                                     options.checkpoint_key + "\")";
      fail("tensor '" + lname + "' not found (looked for '" + canon + "' under any of the prefixes teacher., " +
           "student., module., backbone.)" + hint);
    }
    auto next = lo + 1;
    if (next != cands.end() && next->canonical == canon && next->rank == lo->rank)
      fail("tensor '" + lname + "' is ambiguous: the file has both '" + lo->info->name + "' and '" + next->info->name +
           "'" + (options.checkpoint_key.empty() ? " (choose one with checkpoint_key)" : ""));
    if (lo->used)
      fail("file tensor '" + lo->info->name + "' would fill two layout tensors, the second '" + lname + "'");
    lo->used = true;
    const tensor_info& t = *lo->info;
    bool same = t.shape.size() == static_cast<std::size_t>(e.shape.rank);
    for (int i = 0; same && i < e.shape.rank; ++i) same = t.shape[static_cast<std::size_t>(i)] == e.shape[i];
    if (!same)
      fail(concat("tensor '", lname, "' (file name '", t.name, "'): expected shape ", e.shape.str(), ", found ",
                  t.shape_str()));
    if (!is_float_dtype(t.dtype))
      fail(concat("tensor '", lname, "' (file name '", t.name, "') has dtype ", dtype_name(t.dtype),
                  "; F32, F16, BF16 or F64 expected"));
    plan.emplace_back(&e, &*lo);
  }
  for (const auto& c : cands)
    if (!c.used) result.unused.push_back(c.info->name);
  if (options.strict && !result.unused.empty()) {
    std::string list;
    for (std::size_t i = 0; i < result.unused.size() && i < 8; ++i) list += (i ? ", '" : "'") + result.unused[i] + "'";
    if (result.unused.size() > 8) list += concat(" and ", result.unused.size() - 8, " more");
    fail(concat(result.unused.size(), " tensor(s) in the file are not used by the layout (strict): ", list));
  }

  for (auto [e, c] : plan) {
    file.to_float(*c->info, params.data() + e->offset);
    result.loaded.push_back({options.prefix + e->name, c->info->name});
  }
  return result;
}

/// Reads path and fills params from it.
inline load_result load_params(const std::string& path, flat_params<float>& params, const load_options& options = {}) {
  return load_params(safetensors_file::read(path), params, options);
}

}  // namespace dino::io
