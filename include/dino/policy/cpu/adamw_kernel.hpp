// dino/policy/cpu/adamw_kernel.hpp: the CPU policy's element kernel of the AdamW update.
//
// For elements [i, end) of one tensor, with the tensor's coefficients for this step:
//   p <- p decay;  m <- b1 m + c1 g;  v <- b2 v + c2 g g;  p <- p - step_size m / (sqrt(v) / bc2_sqrt + eps)
// (optim/adamw.hpp computes the coefficients and owns the state; the CUDA twin, which
// rounds operation for operation as this kernel does, is adamw_tensors in policy/cuda/optim.cuh.)
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace dino::cpu {

/// One tensor's coefficients for one step.
template <class T>
struct adamw_coeffs {
  T decay, b1, b2, c1, c2, step_size, bc2_sqrt, eps;
  bool active = false;  ///< trainable and not skipped this step
};

/// The update of elements [i, end) of one tensor. Each element is rounded exactly as the
/// scalar expression below; the SSE2 form only exists because a compiler that honours errno
/// (GCC's default -fmath-errno) will not vectorise std::sqrt, and the scalar square root and
/// division then cost more than the memory traffic. sqrt and / are correctly rounded in both.
template <class T>
inline void adamw_update(T* p, const T* g, T* m, T* v, std::int64_t i, std::int64_t end, const adamw_coeffs<T>& k) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m128 decay = _mm_set1_ps(k.decay), b1 = _mm_set1_ps(k.b1), b2 = _mm_set1_ps(k.b2),
                 c1 = _mm_set1_ps(k.c1), c2 = _mm_set1_ps(k.c2), step_size = _mm_set1_ps(k.step_size),
                 bc2_sqrt = _mm_set1_ps(k.bc2_sqrt), eps = _mm_set1_ps(k.eps);
    for (; i + 4 <= end; i += 4) {
      const __m128 gi = _mm_loadu_ps(g + i);
      const __m128 pi = _mm_mul_ps(_mm_loadu_ps(p + i), decay);
      const __m128 mi = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(m + i), b1), _mm_mul_ps(c1, gi));
      const __m128 vi = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(v + i), b2), _mm_mul_ps(_mm_mul_ps(c2, gi), gi));
      _mm_storeu_ps(m + i, mi);
      _mm_storeu_ps(v + i, vi);
      const __m128 den = _mm_add_ps(_mm_div_ps(_mm_sqrt_ps(vi), bc2_sqrt), eps);
      _mm_storeu_ps(p + i, _mm_sub_ps(pi, _mm_mul_ps(step_size, _mm_div_ps(mi, den))));
    }
  }
#endif
#pragma omp simd
  for (std::int64_t j = i; j < end; ++j) {
    const T gj = g[j];
    const T pj = p[j] * k.decay;
    const T mj = m[j] * k.b1 + k.c1 * gj;
    const T vj = v[j] * k.b2 + k.c2 * gj * gj;
    m[j] = mj;
    v[j] = vj;
    p[j] = pj - k.step_size * (mj / (std::sqrt(vj) / k.bc2_sqrt + k.eps));
  }
}

}  // namespace dino::cpu
