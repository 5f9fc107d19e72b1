// dino/policy/cpu/gelu_kernel.hpp: exact GELU and its backward over a contiguous range,
// vectorised for float.
//
//   y[i] = gelu(a[i]) = 0.5 a (1 + erf(a / sqrt 2))
//   da[i] (=|+=) dy[i] * gelu'(a[i]),  gelu'(a) = 0.5 (1 + erf(a / sqrt 2)) + a exp(-a^2 / 2) / sqrt(2 pi)
//
// The same formulas, in the same order, as math/gelu.hpp; only erf and exp differ. libm's
// scalar erff (plus expf in the backward) took ~9 % of a ViT training step; with SSE2 (the
// x86-64 baseline) float runs 4 lanes at a time with:
//   erf(x), |x| < 1:  x + x Q(x^2), Q a degree-6 polynomial (least squares in relative error);
//   |x| >= 1:         1 - t exp(-x^2 + P(t)), t = 1 / (1 + |x| / 2), P the degree-9 polynomial of
//                     Numerical Recipes' erfcc (erfc to 1.2e-7 relative);
//   exp:              detail::exp_ps (policy/cpu/vexp.hpp, within 2 ulp).
// The second branch (a division, a polynomial and an exp) is skipped when all 4 lanes have
// |x| < 1, as most pre-activations of a freshly initialised network do.
// On a CPU with AVX-512 (policy/cpu/simd.hpp) the same formulas run 16 lanes at a time
// with FMAs (erf512_ps below), the all-|x| < 1 shortcut taken per 16 lanes.
// erf is within 2 ulp of the exact value over the floats (1.5 ulp measured against double
// erf on every 7th float in [-5, 5]; test_math checks both levels); |x| is clamped to 4 (erf = +-1 in float beyond 3.92);
// NaN propagates; erf(+-inf) = +-1. Elements are processed in groups of 4 with the tail padded, so every
// element goes through the same function whatever the range split. Other types (double)
// use math::gelu and math::gelu_grad.
#pragma once

#include <cstdint>
#include <type_traits>

#include "dino/math/gelu.hpp"
#include "dino/policy/cpu/parallel.hpp"
#include "dino/policy/cpu/simd.hpp"
#include "dino/policy/cpu/vexp.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace dino::cpu {

namespace detail {
// The erf polynomials, highest degree first (Horner), shared by the 4- and 16-lane kernels.
// |x| < 1: erf(x) = x + x Q(x^2).
inline constexpr float kErfQ[7] = {7.847259257687256e-05f, -0.0008008189033716917f, 0.005188099108636379f,
                                   -0.026853691786527634f, 0.1128358244895935f,     -0.3761262595653534f,
                                   0.12837916612625122f};
// |x| >= 1: erfc(x) = t exp(-x^2 + P(t)), t = 1 / (1 + x / 2) (Numerical Recipes' erfcc).
inline constexpr float kErfcP[10] = {0.17087277f,  -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                                     -0.18628806f, 0.09678418f,  0.37409196f, 1.00002368f,  -1.26551223f};
}  // namespace detail

#if defined(__SSE2__)
namespace detail {
inline __m128 erf_ps(__m128 x) {
  const __m128 one = _mm_set1_ps(1.0f), neg0 = _mm_set1_ps(-0.0f);
  const __m128 sign = _mm_and_ps(x, neg0);
  // |x| >= 4 gives erf = +-1 in float (erfc(4) = 1.5e-8); clamping keeps the polynomials and
  // exp away from overflow and denormals. min(4, NaN) is NaN: NaN propagates.
  const __m128 a = _mm_min_ps(_mm_set1_ps(4.0f), _mm_andnot_ps(neg0, x));
  const __m128 z = _mm_mul_ps(a, a);
  // |x| < 1: a + a Q(z)
  __m128 q = _mm_set1_ps(kErfQ[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 7; ++i) q = _mm_add_ps(_mm_mul_ps(q, z), _mm_set1_ps(kErfQ[i]));
  const __m128 small = _mm_add_ps(a, _mm_mul_ps(a, q));
  const __m128 lt1 = _mm_cmplt_ps(a, one);
  if (_mm_movemask_ps(lt1) == 0xF) return _mm_or_ps(small, sign);  // all lanes |x| < 1 (not NaN)
  // |x| >= 1: 1 - erfc(a), erfc(a) = t exp(-z + P(t))
  const __m128 t = _mm_div_ps(one, _mm_add_ps(one, _mm_mul_ps(_mm_set1_ps(0.5f), a)));
  __m128 p = _mm_set1_ps(kErfcP[0]);
#pragma GCC unroll 10
  for (int i = 1; i < 10; ++i) p = _mm_add_ps(_mm_mul_ps(p, t), _mm_set1_ps(kErfcP[i]));
  const __m128 large = _mm_sub_ps(one, _mm_mul_ps(t, exp_ps(_mm_sub_ps(p, z))));
  const __m128 r = _mm_or_ps(_mm_and_ps(lt1, small), _mm_andnot_ps(lt1, large));
  return _mm_or_ps(r, sign);  // odd; r >= 0 (or NaN)
}

inline __m128 gelu_ps(__m128 x) {
  const __m128 e = erf_ps(_mm_mul_ps(x, _mm_set1_ps(0.70710678118654752440f)));
  return _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(0.5f), x), _mm_add_ps(_mm_set1_ps(1.0f), e));
}

/// gelu(x) and gelu'(x) from one erf: the same operations as gelu_ps and gelu_grad_ps.
inline void gelu_both_ps(__m128 x, __m128& y, __m128& g) {
  const __m128 e = erf_ps(_mm_mul_ps(x, _mm_set1_ps(0.70710678118654752440f)));
  y = _mm_mul_ps(_mm_mul_ps(_mm_set1_ps(0.5f), x), _mm_add_ps(_mm_set1_ps(1.0f), e));
  const __m128 cdf = _mm_mul_ps(_mm_set1_ps(0.5f), _mm_add_ps(_mm_set1_ps(1.0f), e));
  const __m128 pdf =
      _mm_mul_ps(exp_ps(_mm_mul_ps(_mm_mul_ps(_mm_set1_ps(-0.5f), x), x)), _mm_set1_ps(0.39894228040143267794f));
  g = _mm_add_ps(cdf, _mm_mul_ps(x, pdf));
}

inline __m128 gelu_grad_ps(__m128 x) {
  const __m128 e = erf_ps(_mm_mul_ps(x, _mm_set1_ps(0.70710678118654752440f)));
  const __m128 cdf = _mm_mul_ps(_mm_set1_ps(0.5f), _mm_add_ps(_mm_set1_ps(1.0f), e));
  const __m128 pdf =
      _mm_mul_ps(exp_ps(_mm_mul_ps(_mm_mul_ps(_mm_set1_ps(-0.5f), x), x)), _mm_set1_ps(0.39894228040143267794f));
  return _mm_add_ps(cdf, _mm_mul_ps(x, pdf));
}
}  // namespace detail
#endif

#if DINO_GEMM_X86
namespace detail {
// The AVX-512 twin of erf_ps above (exp512_ps, min512 and max512 are in vexp.hpp): the same
// constants and steps, 16 lanes, multiply-adds fused.
DINO_SIMD_AVX512_TARGET inline __m512 erf512_ps(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512i signbit = _mm512_set1_epi32(int(0x80000000u));
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), signbit);
  const __m512 a = min512(_mm512_set1_ps(4.0f), _mm512_abs_ps(x));  // min(4, NaN) is NaN
  const __m512 z = _mm512_mul_ps(a, a);
  __m512 q = _mm512_set1_ps(kErfQ[0]);
#pragma GCC unroll 8
  for (int i = 1; i < 7; ++i) q = _mm512_fmadd_ps(q, z, _mm512_set1_ps(kErfQ[i]));
  const __m512 small = _mm512_fmadd_ps(a, q, a);
  const __mmask16 lt1 = _mm512_cmp_ps_mask(a, one, _CMP_LT_OQ);
  __m512 r = small;
  if (lt1 != 0xFFFF) {  // some lane has |x| >= 1 (or NaN): 1 - t exp(-z + P(t))
    const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.5f), a, one));
    __m512 p = _mm512_set1_ps(kErfcP[0]);
#pragma GCC unroll 10
    for (int i = 1; i < 10; ++i) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(kErfcP[i]));
    const __m512 large = _mm512_fnmadd_ps(t, exp512_ps(_mm512_sub_ps(p, z)), one);
    r = _mm512_mask_blend_ps(lt1, large, small);  // lt1 lanes: small
  }
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign));
}

DINO_SIMD_AVX512_TARGET inline __m512 gelu512_ps(__m512 x) {
  const __m512 e = erf512_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f)));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

DINO_SIMD_AVX512_TARGET inline __m512 gelu_grad512_ps(__m512 x) {
  const __m512 e = erf512_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f)));
  const __m512 cdf = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __m512 pdf = _mm512_mul_ps(exp512_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(-0.5f), x), x)),
                                   _mm512_set1_ps(0.39894228040143267794f));
  return _mm512_fmadd_ps(x, pdf, cdf);
}

/// erf(x) in all 16 lanes of out (for the tests).
DINO_SIMD_AVX512_TARGET inline void simd_erf_avx512(float x, float* out) { _mm512_storeu_ps(out, erf512_ps(_mm512_set1_ps(x))); }

/// gelu(x) and gelu'(x) from one erf: the same operations as gelu512_ps and gelu_grad512_ps.
DINO_SIMD_AVX512_TARGET inline void gelu_both512_ps(__m512 x, __m512& y, __m512& g) {
  const __m512 e = erf512_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752440f)));
  y = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __m512 cdf = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  const __m512 pdf = _mm512_mul_ps(exp512_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(-0.5f), x), x)),
                                   _mm512_set1_ps(0.39894228040143267794f));
  g = _mm512_fmadd_ps(x, pdf, cdf);
}

DINO_SIMD_AVX512_TARGET inline void gelu_range_avx512(const float* a, float* y, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 32 <= n; i += 32) {  // two independent evaluations in flight
    const __m512 u = gelu512_ps(_mm512_loadu_ps(a + i)), v = gelu512_ps(_mm512_loadu_ps(a + i + 16));
    _mm512_storeu_ps(y + i, u);
    _mm512_storeu_ps(y + i + 16, v);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = pgemm::lanes16(n - i);
    _mm512_mask_storeu_ps(y + i, m, gelu512_ps(_mm512_maskz_loadu_ps(m, a + i)));
  }
}

DINO_SIMD_AVX512_TARGET inline void gelu_backward_range_avx512(const float* a, const float* dy, float* da, std::int64_t n,
                                                                bool accumulate) {
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = pgemm::lanes16(n - i);
    const __m512 g = gelu_grad512_ps(_mm512_maskz_loadu_ps(m, a + i));
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + i), g);
    _mm512_mask_storeu_ps(da + i, m, accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, da + i), v) : v);
  }
}
DINO_SIMD_AVX512_TARGET inline void gelu_with_grad_range_avx512(const float* a, float* y, float* ga, std::int64_t n) {
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = pgemm::lanes16(n - i);
    __m512 u, g;
    gelu_both512_ps(_mm512_maskz_loadu_ps(m, a + i), u, g);
    _mm512_mask_storeu_ps(y + i, m, u);
    _mm512_mask_storeu_ps(ga + i, m, g);
  }
}

DINO_SIMD_AVX512_TARGET inline void mul_range_avx512(const float* g, const float* dy, float* da, std::int64_t n,
                                                      bool accumulate) {
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = pgemm::lanes16(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + i), _mm512_maskz_loadu_ps(m, g + i));
    _mm512_mask_storeu_ps(da + i, m, accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, da + i), v) : v);
  }
}
}  // namespace detail
#endif

/// y[i] = gelu(a[i]) and ga[i] = gelu'(a[i]) for i in [0, n), one erf per element; ga may
/// alias a (y may not alias either). The values are those of gelu_range and of the
/// derivative gelu_backward_range multiplies by.
template <class T>
inline void gelu_with_grad_range(const T* a, T* y, T* ga, std::int64_t n) {
#if DINO_GEMM_X86
  if constexpr (std::is_same_v<T, float>)
    if (simd_avx512()) return detail::gelu_with_grad_range_avx512(a, y, ga, n);
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    std::int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      __m128 u, g;
      detail::gelu_both_ps(_mm_loadu_ps(a + i), u, g);
      _mm_storeu_ps(y + i, u);
      _mm_storeu_ps(ga + i, g);
    }
    if (i < n) {
      alignas(16) float t[4] = {0, 0, 0, 0}, tu[4], tg[4];
      for (std::int64_t j = i; j < n; ++j) t[j - i] = a[j];
      __m128 u, g;
      detail::gelu_both_ps(_mm_load_ps(t), u, g);
      _mm_store_ps(tu, u);
      _mm_store_ps(tg, g);
      for (std::int64_t j = i; j < n; ++j) y[j] = tu[j - i], ga[j] = tg[j - i];
    }
  } else
#endif
  {
    for (std::int64_t i = 0; i < n; ++i) {
      const T x = a[i];
      y[i] = math::gelu(x);
      ga[i] = math::gelu_grad(x);
    }
  }
}

/// da[i] (=|+=) dy[i] * g[i] for i in [0, n); da may alias dy or g.
template <class T>
inline void mul_range(const T* g, const T* dy, T* da, std::int64_t n, bool accumulate) {
#if DINO_GEMM_X86
  if constexpr (std::is_same_v<T, float>)
    if (simd_avx512()) return detail::mul_range_avx512(g, dy, da, n, accumulate);
#endif
  for (std::int64_t i = 0; i < n; ++i) {
    const T v = dy[i] * g[i];
    da[i] = accumulate ? da[i] + v : v;
  }
}

/// y[i] = gelu(a[i]) for i in [0, n); y may alias a.
template <class T>
inline void gelu_range(const T* a, T* y, std::int64_t n) {
#if DINO_GEMM_X86
  if constexpr (std::is_same_v<T, float>)
    if (simd_avx512()) return detail::gelu_range_avx512(a, y, n);
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    std::int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m128 u = detail::gelu_ps(_mm_loadu_ps(a + i)), v = detail::gelu_ps(_mm_loadu_ps(a + i + 4));
      _mm_storeu_ps(y + i, u);
      _mm_storeu_ps(y + i + 4, v);
    }
    for (; i + 4 <= n; i += 4) _mm_storeu_ps(y + i, detail::gelu_ps(_mm_loadu_ps(a + i)));
    if (i < n) {
      alignas(16) float t[4] = {0, 0, 0, 0};
      for (std::int64_t j = i; j < n; ++j) t[j - i] = a[j];
      _mm_store_ps(t, detail::gelu_ps(_mm_load_ps(t)));
      for (std::int64_t j = i; j < n; ++j) y[j] = t[j - i];
    }
  } else
#endif
  {
    for (std::int64_t i = 0; i < n; ++i) y[i] = math::gelu(a[i]);
  }
}

/// da[i] (=|+=) dy[i] * gelu'(a[i]) for i in [0, n); da may alias dy.
template <class T>
inline void gelu_backward_range(const T* a, const T* dy, T* da, std::int64_t n, bool accumulate) {
#if DINO_GEMM_X86
  if constexpr (std::is_same_v<T, float>)
    if (simd_avx512()) return detail::gelu_backward_range_avx512(a, dy, da, n, accumulate);
#endif
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    std::int64_t i = 0;
    const auto one = [&](std::int64_t k, __m128 g) {
      const __m128 v = _mm_mul_ps(_mm_loadu_ps(dy + k), g);
      _mm_storeu_ps(da + k, accumulate ? _mm_add_ps(_mm_loadu_ps(da + k), v) : v);
    };
    for (; i + 8 <= n; i += 8) {
      const __m128 g0 = detail::gelu_grad_ps(_mm_loadu_ps(a + i)), g1 = detail::gelu_grad_ps(_mm_loadu_ps(a + i + 4));
      one(i, g0);
      one(i + 4, g1);
    }
    for (; i + 4 <= n; i += 4) one(i, detail::gelu_grad_ps(_mm_loadu_ps(a + i)));
    if (i < n) {
      alignas(16) float t[4] = {0, 0, 0, 0};
      for (std::int64_t j = i; j < n; ++j) t[j - i] = a[j];
      _mm_store_ps(t, detail::gelu_grad_ps(_mm_load_ps(t)));
      for (std::int64_t j = i; j < n; ++j) {
        const float v = dy[j] * t[j - i];
        da[j] = accumulate ? da[j] + v : v;
      }
    }
  } else
#endif
  {
    for (std::int64_t i = 0; i < n; ++i) {
      const T v = dy[i] * math::gelu_grad(a[i]);
      da[i] = accumulate ? da[i] + v : v;
    }
  }
}

/// y = gelu(a) over n elements, in parallel chunks (the policy-level op; CUDA twin in
/// policy/cuda/nn_ops.cuh). y may alias a.
template <class T>
inline void gelu_apply(const cpu_policy& pol, const T* a, T* y, std::int64_t n) {
  for_each_chunk(pol, n, [&](std::int64_t b, std::int64_t e) { gelu_range(a + b, y + b, e - b); });
}

/// y = gelu(a) and ga = gelu'(a) over n elements in one pass, in parallel chunks; ga may
/// alias a. CPU only: with it, the ViT's training forward keeps gelu'(a) for the backward
/// (nn::gelu_saves_grad), which then multiplies instead of evaluating erf and exp again.
template <class T>
inline void gelu_with_grad_apply(const cpu_policy& pol, const T* a, T* y, T* ga, std::int64_t n) {
  for_each_chunk(pol, n, [&](std::int64_t b, std::int64_t e) { gelu_with_grad_range(a + b, y + b, ga + b, e - b); });
}

/// da (=|+=) dy * g over n elements, in parallel chunks (the GELU backward from a kept
/// gelu'(a)); da may alias dy or g.
template <class T>
inline void mul_apply(const cpu_policy& pol, const T* g, const T* dy, T* da, std::int64_t n, bool accumulate) {
  for_each_chunk(pol, n, [&](std::int64_t b, std::int64_t e) { mul_range(g + b, dy + b, da + b, e - b, accumulate); });
}

/// da (=|+=) dy * gelu'(a) over n elements, in parallel chunks. da may alias dy.
template <class T>
inline void gelu_backward_apply(const cpu_policy& pol, const T* a, const T* dy, T* da, std::int64_t n, bool accumulate) {
  for_each_chunk(pol, n, [&](std::int64_t b, std::int64_t e) { gelu_backward_range(a + b, dy + b, da + b, e - b, accumulate); });
}

}  // namespace dino::cpu

namespace dino {
using cpu::gelu_apply;
using cpu::gelu_backward_apply;
using cpu::gelu_with_grad_apply;
using cpu::mul_apply;
}  // namespace dino
