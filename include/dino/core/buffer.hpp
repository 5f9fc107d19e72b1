// dino/core/buffer.hpp: owning, 64-byte aligned host memory.
//
// buffer<T> is the host owner behind flat parameter stores, optimizer state and planned
// workspaces. It allocates once, at construction or resize, never in a step, and it does
// not value-initialise unless asked to (the caller writes what it reads).
#pragma once

#include <cstddef>
#include <cstring>
#include <new>
#include <utility>

#include "dino/core/tensor.hpp"

namespace dino {

template <class T>
class buffer {
 public:
  static constexpr std::size_t alignment = 64;

  buffer() = default;
  explicit buffer(std::size_t n, bool zero = true) { resize(n, zero); }
  buffer(const buffer& o) : buffer(o.n_, false) {
    if (n_) std::memcpy(p_, o.p_, n_ * sizeof(T));
  }
  buffer(buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  buffer& operator=(buffer o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~buffer() { release(); }

  /// Reallocates to n elements (contents are lost); zero-fills when asked.
  void resize(std::size_t n, bool zero = true) {
    if (n != n_) {
      release();
      if (n) p_ = static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t{alignment}));
      n_ = n;
    }
    if (zero && n_) std::memset(static_cast<void*>(p_), 0, n_ * sizeof(T));
  }
  void fill_zero() {
    if (n_) std::memset(static_cast<void*>(p_), 0, n_ * sizeof(T));
  }

  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  T& operator[](std::size_t i) { return p_[i]; }
  const T& operator[](std::size_t i) const { return p_[i]; }
  T* begin() { return p_; }
  T* end() { return p_ + n_; }
  const T* begin() const { return p_; }
  const T* end() const { return p_ + n_; }

  host_view<T> view(shape s, const char* name = "buffer") { return {p_, s, name}; }
  host_view<const T> view(shape s, const char* name = "buffer") const { return {p_, s, name}; }

 private:
  void release() {
    if (p_) ::operator delete[](p_, std::align_val_t{alignment});
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// The owner of memory in a space: buffer<T> on the host; the CUDA policy specialises it
/// for device_space (policy/cuda/memory.cuh). copy() copies n elements within the space.
template <class T, class Space>
struct storage_for;
template <class T>
struct storage_for<T, host_space> {
  using type = buffer<T>;
  static void copy(T* dst, const T* src, std::size_t n) {
    if (n) std::memcpy(static_cast<void*>(dst), src, n * sizeof(T));
  }
};

}  // namespace dino
