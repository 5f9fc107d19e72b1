// dino/core/param_store.hpp: one flat buffer of parameters with named views.
//
// Modules register their tensors in a param_layout under their PyTorch state_dict names
// ("mlp.0.weight", "last_layer.weight_v"), with a shape, flags and an initialisation rule.
// All tensors of a model then live in one contiguous buffer (llm.c, tiny-cuda-nn), and so do
// their gradients and optimizer moments, with the same offsets: the EMA teacher update and
// AdamW are single passes over contiguous memory, and a checkpoint or a parameter group is
// a walk over the layout's entries (the "visitor" of DESIGN §3).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dino/core/buffer.hpp"
#include "dino/core/error.hpp"
#include "dino/core/tensor.hpp"

namespace dino {

/// Flags of a parameter tensor.
enum param_flags : unsigned {
  param_none = 0,
  param_no_weight_decay = 1u << 0,  ///< group 1 of the reference: biases and 1-D tensors
  param_frozen = 1u << 1,           ///< requires_grad = False: never optimised (EMA still walks it)
  param_last_layer = 1u << 2,       ///< the head's last layer: frozen during the first epoch(s)
};

/// How a tensor is initialised (the reference's rules, DESIGN §3 and dino-spec §1.7, §2.3).
enum class param_init {
  zeros,
  ones,
  trunc_normal,    ///< N(0, std) truncated to [-2, 2] (timm trunc_normal_, std 0.02)
  kaiming_uniform, ///< PyTorch's default Linear/Conv weight init: U(+-1/sqrt(fan_in))
};

struct param_entry {
  std::string name;
  dino::shape shape;
  std::size_t offset = 0;  ///< in elements, from the start of the flat buffer
  unsigned flags = param_none;
  param_init init = param_init::zeros;
  double init_scale = 0.0;  ///< std for trunc_normal, fan_in for kaiming_uniform

  std::size_t numel() const { return static_cast<std::size_t>(shape.numel()); }
  bool trainable() const { return !(flags & param_frozen); }
};

/// Names, shapes and offsets of every tensor of a model, in registration (parameters()) order.
class param_layout {
 public:
  /// Offsets are rounded up to this many elements so that every tensor starts on a cache line.
  static constexpr std::size_t align_elems = 16;

  /// Registers a tensor and returns its offset. Names must be unique.
  std::size_t add(std::string name, dino::shape s, unsigned flags, param_init init, double scale = 0.0) {
    require<config_error>(find(name) == nullptr, "param_layout: tensor '", name, "' registered twice");
    require<config_error>(s.numel() > 0, "param_layout: tensor '", name, "' has empty shape ", s.str());
    std::size_t off = (total_ + align_elems - 1) / align_elems * align_elems;
    entries_.push_back(param_entry{std::move(name), s, off, flags, init, scale});
    total_ = off + static_cast<std::size_t>(s.numel());
    return off;
  }

  const param_entry* find(std::string_view name) const {
    for (const auto& e : entries_)
      if (e.name == name) return &e;
    return nullptr;
  }
  const param_entry& at(std::string_view name) const {
    const param_entry* e = find(name);
    require<config_error>(e != nullptr, "param_layout: no tensor named '", std::string(name), "'");
    return *e;
  }
  param_entry& at(std::string_view name) {
    return const_cast<param_entry&>(static_cast<const param_layout&>(*this).at(name));
  }

  const std::vector<param_entry>& entries() const { return entries_; }
  /// Elements of the flat buffer, padding included.
  std::size_t size() const { return total_; }
  /// Elements that belong to tensors (without padding).
  std::size_t numel() const {
    std::size_t n = 0;
    for (const auto& e : entries_) n += e.numel();
    return n;
  }

  /// Calls f(entry) for each tensor, in registration order.
  template <class F>
  void visit(F&& f) const {
    for (const auto& e : entries_) f(e);
  }

 private:
  std::vector<param_entry> entries_;
  std::size_t total_ = 0;
};

/// A flat buffer laid out by a param_layout; named, typed views into it. Space says where
/// it lives: host memory (the default) or, with <dino/cuda.hpp>, device memory.
template <class T, class Space = host_space>
class flat_params {
 public:
  using space = Space;
  using storage = typename storage_for<T, Space>::type;
  flat_params() = default;
  explicit flat_params(const param_layout& layout) : layout_(&layout), data_(layout.size(), true) {}

  const param_layout& layout() const { return *layout_; }
  T* data() { return data_.data(); }
  const T* data() const { return data_.data(); }
  std::size_t size() const { return data_.size(); }
  /// Zeroes every element (on the device: synchronously, for set-up; a step uses fill_zero(pol, ...)).
  void fill_zero() { data_.fill_zero(); }

  tensor_view<T, Space> view(std::string_view name) {
    const param_entry& e = layout_->at(name);
    return {data_.data() + e.offset, e.shape, e.name.c_str()};
  }
  tensor_view<const T, Space> view(std::string_view name) const {
    const param_entry& e = layout_->at(name);
    return {data_.data() + e.offset, e.shape, e.name.c_str()};
  }
  tensor_view<T, Space> view(const param_entry& e) { return {data_.data() + e.offset, e.shape, e.name.c_str()}; }
  tensor_view<const T, Space> view(const param_entry& e) const {
    return {data_.data() + e.offset, e.shape, e.name.c_str()};
  }
  /// The whole buffer as one view.
  tensor_view<T, Space> all(const char* name = "parameters") {
    return {data_.data(), {std::int64_t(data_.size())}, name};
  }
  tensor_view<const T, Space> all(const char* name = "parameters") const {
    return {data_.data(), {std::int64_t(data_.size())}, name};
  }

  /// Copies all tensors from another buffer of the same layout (padding included).
  void copy_from(const flat_params& o) {
    require<shape_error>(o.size() == size(), "flat_params::copy_from: sizes differ: ", o.size(), " vs ",
                         size());
    storage_for<T, Space>::copy(data_.data(), o.data_.data(), size());
  }

 private:
  const param_layout* layout_ = nullptr;
  storage data_;
};

/// dst = src for two buffers of one layout, in any pair of spaces (host to host here; the
/// CUDA policy adds host to device and back, in policy/cuda/memory.cuh). Synchronous: for
/// set-up, checkpoints and tests, not for a step.
template <class T>
inline void assign_params(flat_params<T>& dst, const flat_params<T>& src) {
  dst.copy_from(src);
}

/// Copies a view's elements to host memory (host views here; device views in
/// policy/cuda/memory.cuh), and back. Synchronous: for checkpoints and tests.
template <class T>
inline void view_to_host(tensor_view<const T, host_space> v, T* dst) {
  std::copy(v.data, v.data + v.numel(), dst);
}
template <class T>
inline void view_from_host(tensor_view<T, host_space> v, const T* src) {
  std::copy(src, src + v.numel(), v.data);
}

}  // namespace dino
