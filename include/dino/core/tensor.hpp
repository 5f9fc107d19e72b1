// dino/core/tensor.hpp: shapes and non-owning tensor views.
//
// A tensor_view<T, Space> is a pointer, a row-major shape (rank 0 to 4) and a name used in
// error messages. The memory space is part of the type: host_space views go to the CPU
// policy, device_space views to the CUDA policy, and mixing them does not compile.
// Views never own memory; owners are dino::buffer (host) and the policies' arenas.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>

#include "dino/core/error.hpp"

namespace dino {

/// Memory spaces (Kokkos vocabulary).
struct host_space {
  static constexpr const char* name = "host";
};
struct device_space {
  static constexpr const char* name = "device";
};

/// Row-major extents, rank 0 to 4.
struct shape {
  std::array<std::int64_t, 4> dims{1, 1, 1, 1};
  int rank = 0;

  constexpr shape() = default;
  constexpr shape(std::initializer_list<std::int64_t> d) : rank(static_cast<int>(d.size())) {
    int i = 0;
    for (auto v : d) dims[static_cast<std::size_t>(i++)] = v;
  }
  constexpr std::int64_t operator[](int i) const { return dims[static_cast<std::size_t>(i)]; }
  constexpr std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[static_cast<std::size_t>(i)];
    return n;
  }
  friend constexpr bool operator==(const shape& a, const shape& b) {
    if (a.rank != b.rank) return false;
    for (int i = 0; i < a.rank; ++i)
      if (a.dims[static_cast<std::size_t>(i)] != b.dims[static_cast<std::size_t>(i)]) return false;
    return true;
  }
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank; ++i) {
      if (i) s += ", ";
      s += std::to_string(dims[static_cast<std::size_t>(i)]);
    }
    return s + "]";
  }
};

template <class T, class Space = host_space>
struct tensor_view {
  using value_type = T;
  using space = Space;

  T* data = nullptr;
  dino::shape shape{};
  const char* name = "tensor";

  constexpr tensor_view() = default;
  constexpr tensor_view(T* p, dino::shape s, const char* n = "tensor") : data(p), shape(s), name(n) {}
  /// A view of const T from a view of T.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  constexpr tensor_view(const tensor_view<U, Space>& o) : data(o.data), shape(o.shape), name(o.name) {}

  constexpr std::int64_t numel() const { return shape.numel(); }
  constexpr std::int64_t rows() const { return shape.rank == 0 ? 1 : shape[0]; }
  /// Elements per row: the product of all extents after the first.
  constexpr std::int64_t cols() const { return shape.rank == 0 ? 1 : numel() / (shape[0] ? shape[0] : 1); }
  constexpr T* row(std::int64_t r) const { return data + r * cols(); }
  constexpr T& operator[](std::int64_t i) const { return data[i]; }
  /// Rows [begin, begin + count) of a view of rank >= 1.
  constexpr tensor_view slice_rows(std::int64_t begin, std::int64_t count) const {
    dino::shape s = shape;
    s.dims[0] = count;
    return {data + begin * cols(), s, name};
  }
  constexpr tensor_view named(const char* n) const { return {data, shape, n}; }
};

template <class T>
using host_view = tensor_view<T, host_space>;
template <class T>
using device_view = tensor_view<T, device_space>;

/// Throws shape_error "<where>: <tensor>: expected [..], found [..]" when shapes differ.
template <class T, class S>
inline void check_shape(const char* where, const tensor_view<T, S>& t, const shape& expected) {
  if (!(t.shape == expected))
    throw shape_error(detail::concat(where, ": ", t.name, ": expected shape ", expected.str(), ", found ",
                                     t.shape.str()));
}

/// Throws shape_error unless t has rank 2 with the given number of columns.
template <class T, class S>
inline void check_matrix(const char* where, const tensor_view<T, S>& t, std::int64_t cols) {
  if (t.shape.rank != 2 || t.shape[1] != cols)
    throw shape_error(detail::concat(where, ": ", t.name, ": expected shape [N, ", cols, "], found ",
                                     t.shape.str()));
}

}  // namespace dino
