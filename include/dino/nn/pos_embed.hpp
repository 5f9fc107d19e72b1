// dino/nn/pos_embed.hpp: bicubic resizing of the position grid, as the reference does it
// (dino-spec §1.4).
//
// The stored grid g x g (g = sqrt(N0)) is resized to h0 x w0 with PyTorch's bicubic
// interpolation (align_corners = false, A = -0.75, border taps clamped) driven by a *scale
// factor* s = (h0 + 0.1) / g (and (w0 + 0.1) / g): the source coordinate of output index i is
// (i + 0.5) / s - 0.5, computed in T as PyTorch's kernel does. The reference skips the
// resize when h0 * w0 == N0 and h0 == w0.
//
// resize_plan holds, per output row and column, 4 clamped source indices and weights; the
// forward is out[i, j, :] = sum_ab wy[i][a] wx[j][b] grid[y_ia, x_jb, :], and the backward
// accumulates the transposed sum into the grid's gradient.
//
// Any policy: pos_resize_tables is a non-owning view of a resize's taps in the policy's memory
// (host_tables() on the CPU; a ViT pack uploads them to the device once, at pack creation),
// and pos_resize_forward / pos_resize_backward run the same sums through the policy's
// runners: the forward one output element per call (16 taps in the order above), the
// backward one column d per call, visiting (i, j, a, b) in the CPU's order (no atomics).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "dino/config.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/policy/cpu/nn_ops.hpp"

namespace dino::nn {

template <class T>
struct bicubic_axis {
  std::vector<std::int64_t> index;  ///< [out * 4] clamped source indices
  std::vector<T> weight;            ///< [out * 4]
};

/// PyTorch's upsample_bicubic2d taps for one axis: `in` -> `out` with the given scale factor.
template <class T>
bicubic_axis<T> bicubic_taps(std::int64_t in, std::int64_t out, double scale_factor) {
  constexpr T A = T(-0.75);
  auto cc1 = [&](T x) { return ((A + 2) * x - (A + 3)) * x * x + 1; };          // |x| <= 1
  auto cc2 = [&](T x) { return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A; };    // 1 < |x| < 2
  bicubic_axis<T> ax;
  ax.index.resize(static_cast<std::size_t>(out * 4));
  ax.weight.resize(static_cast<std::size_t>(out * 4));
  const T inv_scale = T(1.0 / scale_factor);
  for (std::int64_t i = 0; i < out; ++i) {
    const T src = inv_scale * (T(i) + T(0.5)) - T(0.5);
    const T fl = std::floor(src);
    const std::int64_t i0 = static_cast<std::int64_t>(fl);
    const T t = src - fl;
    const T w[4] = {cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t)};
    for (int a = 0; a < 4; ++a) {
      std::int64_t j = i0 - 1 + a;
      j = j < 0 ? 0 : (j > in - 1 ? in - 1 : j);
      ax.index[static_cast<std::size_t>(i * 4 + a)] = j;
      ax.weight[static_cast<std::size_t>(i * 4 + a)] = w[a];
    }
  }
  return ax;
}

/// The resize of a g x g grid of D-vectors to h0 x w0, with the reference's +0.1 offset.
template <class T>
struct pos_resize {
  std::int64_t g = 0, h0 = 0, w0 = 0;
  bool identity = true;
  bicubic_axis<T> y, x;

  pos_resize() = default;
  pos_resize(std::int64_t grid, std::int64_t h, std::int64_t w) : g(grid), h0(h), w0(w) {
    identity = (h * w == grid * grid) && h == w;
    if (!identity) {
      y = bicubic_taps<T>(grid, h, (double(h) + 0.1) / double(grid));
      x = bicubic_taps<T>(grid, w, (double(w) + 0.1) / double(grid));
    }
  }

  /// out [h0 * w0, D] (=) from grid [g * g, D]; rows are row-major (height, then width).
  void forward(const T* grid, T* out, std::int64_t D) const {
    if (identity) {
      for (std::int64_t i = 0; i < g * g * D; ++i) out[i] = grid[i];
      return;
    }
    // Separable: first along the width into a [g, w0, D] temporary would need scratch; the
    // direct 16-tap sum is cheap at these sizes (the grid is at most a few hundred vectors).
    for (std::int64_t i = 0; i < h0; ++i)
      for (std::int64_t j = 0; j < w0; ++j) {
        T* o = out + (i * w0 + j) * D;
        for (std::int64_t d = 0; d < D; ++d) o[d] = T(0);
        for (int a = 0; a < 4; ++a) {
          const T wy = y.weight[std::size_t(i * 4 + a)];
          const std::int64_t yi = y.index[std::size_t(i * 4 + a)];
          for (int b = 0; b < 4; ++b) {
            const T wgt = wy * x.weight[std::size_t(j * 4 + b)];
            const T* src = grid + (yi * g + x.index[std::size_t(j * 4 + b)]) * D;
            for (std::int64_t d = 0; d < D; ++d) o[d] += wgt * src[d];
          }
        }
      }
  }

  /// dgrid [g * g, D] (+=) from dout [h0 * w0, D].
  void backward(const T* dout, T* dgrid, std::int64_t D) const {
    if (identity) {
      for (std::int64_t i = 0; i < g * g * D; ++i) dgrid[i] += dout[i];
      return;
    }
    for (std::int64_t i = 0; i < h0; ++i)
      for (std::int64_t j = 0; j < w0; ++j) {
        const T* o = dout + (i * w0 + j) * D;
        for (int a = 0; a < 4; ++a) {
          const T wy = y.weight[std::size_t(i * 4 + a)];
          const std::int64_t yi = y.index[std::size_t(i * 4 + a)];
          for (int b = 0; b < 4; ++b) {
            const T wgt = wy * x.weight[std::size_t(j * 4 + b)];
            T* dst = dgrid + (yi * g + x.index[std::size_t(j * 4 + b)]) * D;
            for (std::int64_t d = 0; d < D; ++d) dst[d] += wgt * o[d];
          }
        }
      }
  }
};

/// The taps of a resize as pointers (host or device memory, as the policy that reads them).
template <class T>
struct pos_resize_tables {
  std::int64_t g = 0, h0 = 0, w0 = 0;
  bool identity = true;
  const std::int64_t* yi = nullptr;  ///< [h0 * 4]
  const T* yw = nullptr;             ///< [h0 * 4]
  const std::int64_t* xi = nullptr;  ///< [w0 * 4]
  const T* xw = nullptr;             ///< [w0 * 4]
};

/// Host pointers into r (valid while r lives unchanged).
template <class T>
pos_resize_tables<T> host_tables(const pos_resize<T>& r) {
  return {r.g, r.h0, r.w0, r.identity, r.y.index.data(), r.y.weight.data(), r.x.index.data(), r.x.weight.data()};
}

namespace detail {
template <class T>
struct pos_resize_forward_fn {  // out element e = (i * w0 + j) * D + d
  static constexpr const char* profile_name = "position embedding resize";
  pos_resize_tables<T> t;
  const T* grid;
  T* out;
  std::int64_t D;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t e = lo; e < hi; ++e) {
      const std::int64_t d = e % D, ij = e / D, i = ij / t.w0, j = ij % t.w0;
      T o = T(0);
      for (int a = 0; a < 4; ++a) {
        const T wy = t.yw[i * 4 + a];
        const std::int64_t yi = t.yi[i * 4 + a];
        for (int b = 0; b < 4; ++b) {
          const T wgt = wy * t.xw[j * 4 + b];
          o += wgt * grid[(yi * t.g + t.xi[j * 4 + b]) * D + d];
        }
      }
      out[e] = o;
    }
  }
};

template <class T>
struct pos_resize_backward_fn {  // one column d of the grid gradient per call
  static constexpr const char* profile_name = "position embedding resize backward";
  pos_resize_tables<T> t;
  const T* dout;
  T* dgrid;
  std::int64_t D;
  DINO_HD void operator()(std::int64_t d) const {
    for (std::int64_t i = 0; i < t.h0; ++i)
      for (std::int64_t j = 0; j < t.w0; ++j) {
        const T o = dout[(i * t.w0 + j) * D + d];
        for (int a = 0; a < 4; ++a) {
          const T wy = t.yw[i * 4 + a];
          const std::int64_t yi = t.yi[i * 4 + a];
          for (int b = 0; b < 4; ++b) {
            const T wgt = wy * t.xw[j * 4 + b];
            dgrid[(yi * t.g + t.xi[j * 4 + b]) * D + d] += wgt * o;
          }
        }
      }
  }
};

template <class T>
struct add_to_fn {  // x[i] += y[i]
  static constexpr const char* profile_name = "position gradient add";
  T* x;
  const T* y;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t i = lo; i < hi; ++i) x[i] += y[i];
  }
};
}  // namespace detail

/// out [h0 * w0, D] (=) the resized grid [g * g, D]; tables and data in the policy's memory.
template <class Policy, class T>
void pos_resize_forward(const Policy& pol, const pos_resize_tables<T>& t, const T* grid, T* out, std::int64_t D) {
  if (t.identity) copy_elements(pol, grid, out, t.g * t.g * D);
  else for_each_chunk(pol, t.h0 * t.w0 * D, detail::pos_resize_forward_fn<T>{t, grid, out, D});
}

/// dgrid [g * g, D] (+=) from dout [h0 * w0, D].
template <class Policy, class T>
void pos_resize_backward(const Policy& pol, const pos_resize_tables<T>& t, const T* dout, T* dgrid, std::int64_t D) {
  if (t.identity) for_each_chunk(pol, t.g * t.g * D, detail::add_to_fn<T>{dgrid, dout});
  else for_each_row(pol, D, detail::pos_resize_backward_fn<T>{t, dout, dgrid, D});
}

}  // namespace dino::nn
