// dino/policy/cpu/vexp.hpp: a vectorised exp over a contiguous range, in place.
//
//   x[i] <- exp(x[i])   for i in [0, n)
//
// The DINO loss evaluates exp once or twice for each of 65,536 logits per crop; libm's
// scalar expf costs ~1.5 ns, more than the memory traffic. With AVX2 Eigen's vectorised exp
// is used; on the x86-64 baseline (SSE2, what a portable build targets) Eigen's exp is slower
// than libm, so float uses the Cephes polynomial below, 4 lanes at a time: n = round(x log2 e),
// r = x - n ln 2 (in two parts), exp(r) by a degree-6 polynomial, times 2^n through the
// exponent bits. Error: within 2 ulp of the exact exp over [-87.3, 88.3]; inputs below -87.3
// give about 1e-38 instead of a denormal or 0 (a softmax never notices), inputs above 88.3
// saturate at 88.3. Other types use std::exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include <Eigen/Core>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "dino/policy/cpu/simd.hpp"

namespace dino::cpu {

#if defined(__SSE2__)
namespace detail {
// Also used by the GELU kernel (policy/cpu/gelu_kernel.hpp), whatever the ISA level.
inline __m128 exp_ps(__m128 x) {
  const __m128 hi = _mm_set1_ps(88.3762626647949f), lo = _mm_set1_ps(-87.3365478515625f);
  x = _mm_min_ps(_mm_max_ps(x, lo), hi);
  const __m128i n = _mm_cvtps_epi32(_mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f)));  // round to nearest
  const __m128 fn = _mm_cvtepi32_ps(n);
  __m128 r = _mm_sub_ps(x, _mm_mul_ps(fn, _mm_set1_ps(0.693359375f)));
  r = _mm_sub_ps(r, _mm_mul_ps(fn, _mm_set1_ps(-2.12194440e-4f)));
  __m128 y = _mm_set1_ps(1.9875691500e-4f);
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(1.3981999507e-3f));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(8.3334519073e-3f));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(4.1665795894e-2f));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(1.6666665459e-1f));
  y = _mm_add_ps(_mm_mul_ps(y, r), _mm_set1_ps(5.0000001201e-1f));
  y = _mm_add_ps(_mm_mul_ps(_mm_mul_ps(y, r), r), _mm_add_ps(r, _mm_set1_ps(1.0f)));
  // 2^n: n + 127 in the exponent field; n >= -126 after the clamp, so the field is >= 1.
  const __m128i e = _mm_slli_epi32(_mm_add_epi32(n, _mm_set1_epi32(127)), 23);
  return _mm_mul_ps(y, _mm_castsi128_ps(e));
}
}  // namespace detail
#endif

#if DINO_GEMM_X86
namespace detail {
// The AVX-512 twin of exp_ps: the same constants and steps, 16 lanes, multiply-adds fused
// (used by the GELU kernel and the attention softmax). min, max, the rounding, the conversion and the shift go
// through their masked forms with a full mask: GCC 12's unmasked ones pass an undefined
// source register that -Wuninitialized reports at every use.
constexpr __mmask16 kAll16 = 0xFFFF;
DINO_SIMD_AVX512_TARGET inline __m512 min512(__m512 a, __m512 b) { return _mm512_mask_min_ps(a, kAll16, a, b); }
DINO_SIMD_AVX512_TARGET inline __m512 max512(__m512 a, __m512 b) { return _mm512_mask_max_ps(a, kAll16, a, b); }
DINO_SIMD_AVX512_TARGET inline __m512 exp512_ps(__m512 x) {
  x = min512(max512(x, _mm512_set1_ps(-87.3365478515625f)), _mm512_set1_ps(88.3762626647949f));
  const __m512 xl = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 fn = _mm512_mask_roundscale_ps(xl, kAll16, xl, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i zero = _mm512_setzero_si512();
  const __m512i biased = _mm512_add_epi32(_mm512_mask_cvtps_epi32(zero, kAll16, fn), _mm512_set1_epi32(127));
  const __m512i e = _mm512_mask_slli_epi32(zero, kAll16, biased, 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

}  // namespace detail
#endif

template <class T>
inline void exp_inplace(T* x, std::int64_t n) {
#if defined(__SSE2__) && !defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    std::int64_t i = 0;
    for (; i + 16 <= n; i += 16) {  // four independent polynomials in flight
      const __m128 a = detail::exp_ps(_mm_loadu_ps(x + i)), b = detail::exp_ps(_mm_loadu_ps(x + i + 4));
      const __m128 c = detail::exp_ps(_mm_loadu_ps(x + i + 8)), d = detail::exp_ps(_mm_loadu_ps(x + i + 12));
      _mm_storeu_ps(x + i, a);
      _mm_storeu_ps(x + i + 4, b);
      _mm_storeu_ps(x + i + 8, c);
      _mm_storeu_ps(x + i + 12, d);
    }
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, detail::exp_ps(_mm_loadu_ps(x + i)));
    if (i < n) {
      alignas(16) float t[4] = {0, 0, 0, 0};
      for (std::int64_t j = i; j < n; ++j) t[j - i] = x[j];
      _mm_store_ps(t, detail::exp_ps(_mm_load_ps(t)));
      for (std::int64_t j = i; j < n; ++j) x[j] = t[j - i];
    }
    return;
  }
#endif
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>> a(x, n);
    a = a.exp();
  } else {
    for (std::int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
  }
}

}  // namespace dino::cpu
