// Helpers of the GPU tests: one context per binary, random host data, and the comparison
// of a device result with its CPU twin under a per-operation bound.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <dino/cuda.hpp>

#include "attention_layout.hpp"  // random_vector

namespace dino_test {

inline dino::cuda::context& gpu() {
  static dino::cuda::context ctx;
  return ctx;
}

template <class T>
dino::cuda::device_buffer<T> upload(const std::vector<T>& h) {
  return dino::cuda::to_device(std::span<const T>(h));
}
template <class T>
std::vector<T> download(const dino::cuda::device_buffer<T>& d) {
  dino::cuda::synchronize(gpu().stream());
  return dino::cuda::to_host(d.data(), d.size());
}

/// A host copy of n device elements, after the test stream's work.
template <class T>
std::vector<T> to_host_vec(const T* d, std::size_t n) {
  dino::cuda::synchronize(gpu().stream());
  return dino::cuda::to_host(d, n);
}
template <class T, class S>
std::vector<std::remove_const_t<T>> to_host_vec(dino::tensor_view<T, S> v) {
  return to_host_vec<std::remove_const_t<T>>(v.data, static_cast<std::size_t>(v.numel()));
}

/// Zeroed device buffers are made with cudaMemset on the legacy stream, which a non-blocking
/// stream does not wait for: finish them before the test's stream uses them.
inline void settle() { DINO_CUDA_CHECK(cudaDeviceSynchronize()); }

inline double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-300); }
template <class T>
double max_abs(const std::vector<T>& a) {
  double m = 0;
  for (auto x : a) m = std::max(m, std::abs(double(x)));
  return m;
}
/// Entropies H = sum q (lse - z) carry the fp32 rounding of lse (a float of size |z|max +
/// ln K) in absolute terms, on the CPU as on the GPU: a flipped last bit of lse moves H by
/// ulp(lse). The bound is 1e-6 (about 8 ulp) of that scale, plus 1e-6 of H itself.
inline double entropy_bound(double z_max, std::int64_t K, double h_max) {
  return 1e-6 * (z_max + std::log(double(K)) + h_max);
}

/// v[off, off + n) as a vector of its own (a parameter tensor of a flat buffer, a batch entry).
template <class T>
std::vector<T> slice(const std::vector<T>& v, std::size_t off, std::size_t n) {
  return {v.begin() + static_cast<std::ptrdiff_t>(off), v.begin() + static_cast<std::ptrdiff_t>(off + n)};
}

/// Normwise relative error max_i |a_i - b_i| / max_i |b_i| (the GPU against its CPU twin).
/// Element-wise relative error is the wrong measure for sums with cancellation (a GEMM
/// entry near zero carries the rounding of terms of size one); this is the one the bounds
/// of the GPU tests are stated in. An empty or all-zero reference compares absolute error.
template <class T>
double max_rel_error(const std::vector<T>& a, const std::vector<T>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(double(a[i]) - double(b[i]));
    if (!(d <= worst)) worst = d;  // NaN propagates as a failure
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return scale > 0 ? worst / scale : worst;
}

#define DINO_CHECK_CLOSE(gpu_values, cpu_values, bound)                                  \
  do {                                                                                  \
    const double dino_err_ = ::dino_test::max_rel_error((gpu_values), (cpu_values));    \
    INFO("max relative error " << dino_err_ << " (bound " << (bound) << ")");           \
    CHECK(dino_err_ <= (bound));                                                        \
  } while (0)

}  // namespace dino_test
