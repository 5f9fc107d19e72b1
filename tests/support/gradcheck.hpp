// Test support: central finite differences in double.
//
// fd_gradient(f, x, n) returns d f / d x by (f(x + h e_i) - f(x - h e_i)) / 2h with a
// relative step; rel_error(a, b) = ||a - b|| / max(||b||, tiny). Checks use a scalar
// f(x) = <forward(x), r> with a fixed random cotangent r (dlib's test_layer).
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include <dino/core/rng.hpp>

namespace dino_test {

inline std::vector<double> fd_gradient(const std::function<double()>& f, double* x, std::size_t n, double h = 1e-6) {
  std::vector<double> g(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double xi = x[i];
    const double step = h * std::max(1.0, std::fabs(xi));
    x[i] = xi + step;
    const double fp = f();
    x[i] = xi - step;
    const double fm = f();
    x[i] = xi;
    g[i] = (fp - fm) / (2 * step);
  }
  return g;
}

inline double rel_error(const double* a, const double* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}
inline double rel_error(const std::vector<double>& a, const std::vector<double>& b) {
  return rel_error(a.data(), b.data(), std::min(a.size(), b.size()));
}

template <class T>
inline void fill_normal(T* x, std::size_t n, std::uint64_t seed, double scale = 1.0) {
  dino::philox g(seed, 77);
  for (std::size_t i = 0; i < n; ++i) x[i] = T(g.normal() * scale);
}
template <class V>
inline void fill_normal(V& v, std::uint64_t seed, double scale = 1.0) {
  fill_normal(v.data(), v.size(), seed, scale);
}

inline double dot(const double* a, const double* b, std::size_t n) {
  double s = 0;
  for (std::size_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace dino_test
