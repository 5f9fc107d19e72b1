// dino/nn/init.hpp: initialises a flat parameter buffer from its layout's rules.
//
// Each tensor draws from its own Philox subsequence keyed by (seed, "init", tensor index),
// so the values do not depend on the thread count or on the other tensors' sizes.
//   trunc_normal:    N(0, std) redrawn outside [-2, 2] (timm's trunc_normal_ bounds are absolute)
//   kaiming_uniform: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default for Linear and Conv)
//   zeros, ones
// Padding between tensors is zero.
#pragma once

#include <cmath>
#include <cstdint>

#include "dino/core/param_store.hpp"
#include "dino/core/rng.hpp"

namespace dino::nn {

inline constexpr std::uint32_t rng_purpose_init = 1;

template <class T>
inline void initialize(flat_params<T>& params, std::uint64_t seed) {
  params.fill_zero();
  std::uint32_t index = 0;
  for (const param_entry& e : params.layout().entries()) {
    T* p = params.data() + e.offset;
    const std::size_t n = e.numel();
    philox g(seed, rng_subsequence(rng_purpose_init, index++));
    switch (e.init) {
      case param_init::zeros:
        for (std::size_t i = 0; i < n; ++i) p[i] = T(0);
        break;
      case param_init::ones:
        for (std::size_t i = 0; i < n; ++i) p[i] = T(1);
        break;
      case param_init::trunc_normal:
        for (std::size_t i = 0; i < n; ++i) {
          double x;
          do x = g.normal() * e.init_scale;
          while (x < -2.0 || x > 2.0);
          p[i] = T(x);
        }
        break;
      case param_init::kaiming_uniform: {
        const double bound = 1.0 / std::sqrt(e.init_scale);
        for (std::size_t i = 0; i < n; ++i) p[i] = T(g.uniform(-bound, bound));
        break;
      }
    }
  }
}

}  // namespace dino::nn
