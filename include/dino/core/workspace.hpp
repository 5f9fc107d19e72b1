// dino/core/workspace.hpp: scratch planned before the first step.
//
// Operations that need scratch report the number of bytes first (CUB, CUTLASS); a caller
// adds the requests to a workspace_plan, allocates once, and hands out regions from the
// arena in the same order on every step. Nothing is allocated inside a step: a request
// that does not fit is a programming error and raises config_error naming it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dino/core/buffer.hpp"
#include "dino/core/error.hpp"

namespace dino {

/// Accumulates sizes of scratch regions.
struct workspace_plan {
  static constexpr std::size_t alignment = 64;
  std::size_t bytes = 0;

  static constexpr std::size_t round_up(std::size_t n) { return (n + alignment - 1) / alignment * alignment; }
  /// Adds a region of n elements of T.
  template <class T>
  workspace_plan& add(std::size_t n) {
    bytes += round_up(n * sizeof(T));
    return *this;
  }
  workspace_plan& add_bytes(std::size_t n) {
    bytes += round_up(n);
    return *this;
  }
};

/// A bump allocator over one host allocation; reset() at the start of each step.
class workspace {
 public:
  workspace() = default;
  explicit workspace(const workspace_plan& plan) : mem_(plan.bytes, false) {}
  void reserve(const workspace_plan& plan) {
    if (plan.bytes > mem_.size()) mem_.resize(plan.bytes, false);
    used_ = 0;
  }

  /// n elements of T; throws config_error naming `what` when the plan was too small.
  template <class T>
  T* take(std::size_t n, const char* what = "scratch") {
    std::size_t need = workspace_plan::round_up(n * sizeof(T));
    if (used_ + need > mem_.size())
      throw config_error(detail::concat("workspace: request for ", what, " (", need, " bytes) exceeds the plan: ",
                                        mem_.size() - used_, " of ", mem_.size(), " bytes left"));
    T* p = reinterpret_cast<T*>(mem_.data() + used_);
    used_ += need;
    return p;
  }
  void reset() { used_ = 0; }
  std::size_t capacity() const { return mem_.size(); }
  std::size_t used() const { return used_; }

 private:
  buffer<std::byte> mem_;
  std::size_t used_ = 0;
};

/// The workspace type of a memory space: workspace on the host; the CUDA policy specialises
/// it for device_space (policy/cuda/memory.cuh).
template <class Space>
struct workspace_for;
template <>
struct workspace_for<host_space> {
  using type = workspace;
};

}  // namespace dino
