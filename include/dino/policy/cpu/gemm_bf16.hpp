// dino/policy/cpu/gemm_bf16.hpp: fp32 GEMM on bf16 operands (cpu_policy::bf16).
//
//   C = alpha op(round_bf16(A)) op(round_bf16(B)) + beta C, products summed in fp32
//
// The mixed-precision GEMM of the bf16 path: each operand element is rounded to bfloat16
// (8 significant bits, round to nearest even; NaN stays NaN), the products (exact in fp32)
// are summed in fp32, and C, alpha, beta and the bias stay fp32.
//
// On CPUs with AVX512_BF16 (Zen 4 and 5, Sapphire Rapids and later) a packed, blocked GEMM
// with the same loop nest and blocking as gemm_kernels.hpp runs a 12 x 32 micro-kernel of
// VDPBF16PS, which does two multiply-adds per lane per instruction (twice the fp32 FMA
// rate); both operands are rounded as they are packed, as consecutive depth pairs
// (p, p + 1) of a depth block, so the packing buffers are half the size of the fp32 ones.
// Elsewhere (no AVX512_BF16, a kernel other than avx512 chosen, DINO_GEMM_KERNEL) gemm.hpp
// rounds copies of the operands and runs the fp32 kernel on them: the same operand
// rounding, the sums in another order (differences at fp32 rounding, not at bf16's).
//
// Determinism: as for the fp32 kernels, an element of C sums its depth blocks in order and
// each block in depth pairs in order (VDPBF16PS adds the odd product, then the even one),
// whatever the tile, the tile edges or the thread split: the result does not depend on the
// thread count. VDPBF16PS treats denormal bf16 inputs as zero and flushes denormal results.
#pragma once

#include <bit>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "dino/policy/cpu/gemm_kernels.hpp"

#if DINO_GEMM_X86
#define DINO_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512bf16,avx2,fma")))
#endif

namespace dino::cpu {

/// The bits of x rounded to the nearest bfloat16 (ties to even); NaN stays a quiet NaN,
/// values past bf16's largest finite round to infinity.
inline std::uint16_t bf16_bits(float x) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::uint16_t(u >> 16);
}
/// The float a bf16 bit pattern stands for (exact).
inline float bf16_value(std::uint16_t h) { return std::bit_cast<float>(std::uint32_t(h) << 16); }
/// x rounded to the nearest bfloat16, as a float.
inline float bf16_round(float x) { return bf16_value(bf16_bits(x)); }

/// Whether this CPU (and this compiler's build) runs the AVX512_BF16 kernel; bf16 products
/// use it when this holds and the fp32 kernel in use is avx512 (gemm_kernels.hpp).
inline bool gemm_bf16_native_supported() {
#if DINO_GEMM_X86
  static const bool ok = gemm_kernel_supported(gemm_kernel::avx512) && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}
/// Whether a bf16 product made now runs the AVX512_BF16 kernel (else: rounded copies on the
/// fp32 kernel).
inline bool gemm_bf16_native() {
  return gemm_bf16_native_supported() && gemm_active_kernel() == gemm_kernel::avx512;
}

namespace detail::pgemm16 {

using pgemm::KC;
using pgemm::MC;
using pgemm::NC;
constexpr int MR = 12, NR = 32;  // the fp32 AVX-512 tile: 24 zmm accumulators

// A pair word: two depth-consecutive values rounded to bf16, depth p in the low half and
// p + 1 in the high half, the order VDPBF16PS pairs them in.

/// Thread-local packing buffers in 32-bit pair words, allocated once per thread.
using buffers = pgemm::packing_buffers<std::uint32_t, MC * (KC / 2), (KC / 2) * NC>;
inline buffers& thread_buffers() { return pgemm::thread_local_buffers<buffers>(); }
static_assert(KC % 2 == 0, "depth blocks of at most KC values make at most KC / 2 pairs");

#if DINO_GEMM_X86
/// n <= 16 pair words from two rows: word c = (s0[c], s1[c]) (s1 null: zeros), zeros past n.
DINO_TARGET_AVX512BF16 inline __m512i pairs_of_rows(const float* s0, const float* s1, int n) {
  const __mmask16 m = pgemm::lanes16(n);
  const __m512 x0 = _mm512_maskz_loadu_ps(m, s0), x1 = s1 ? _mm512_maskz_loadu_ps(m, s1) : _mm512_setzero_ps();
  const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);  // halves: x0's 16 values, then x1's
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, h);  // interleaved: x0[c] low, x1[c] high
}
/// The pair words of cnt <= 32 consecutive values (a zero after an odd last one): in memory
/// order the bf16 values already are the words (s[2t], s[2t + 1]).
DINO_TARGET_AVX512BF16 inline __m512i pairs_of_run(const float* s, std::int64_t cnt) {
  const int c0 = int(std::min<std::int64_t>(cnt, 16)), c1 = int(std::min<std::int64_t>(cnt - c0, 16));
  const __mmask16 m0 = pgemm::lanes16(c0), m1 = pgemm::lanes16(c1);
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, s + 16), _mm512_maskz_loadu_ps(m0, s));
}
/// Stores the first n (<= 16) words of v at d[0], d[stride], d[2 stride], ...
DINO_TARGET_AVX512BF16 inline void store_strided(__m512i v, int n, std::uint32_t* d, std::int64_t stride) {
  alignas(64) std::uint32_t w[16];
  _mm512_store_si512(w, v);
  for (int u = 0; u < n; ++u) d[u * stride] = w[u];
}

/// Packs op(A)[i0 : i0 + mc, p0 : p0 + kc] as panels of MR rows (zeros past row mc and past
/// depth kc). A row-major A (!trans) packs each row's pair words in order, rows kp words
/// apart: the bf16 values of a row already are its pair words, so this is one streaming
/// conversion (the micro-kernel reads the panel as rows, like the fp32 kernel reads A in
/// place). A^T (trans) packs, for each depth pair t, the words of the MR rows together.
DINO_TARGET_AVX512BF16 inline void pack_a(bool trans, const float* A, std::int64_t lda, std::int64_t i0,
                                          std::int64_t p0, std::int64_t mc, std::int64_t kc, std::uint32_t* dst) {
  const std::int64_t kp = (kc + 1) / 2;
  for (std::int64_t i = 0; i < mc; i += MR, dst += MR * kp) {
    const int rows = int(std::min<std::int64_t>(MR, mc - i));
    if (rows < MR) std::memset(dst, 0, sizeof(std::uint32_t) * std::size_t(MR * kp));
    if (!trans) {  // A[i, p] at A[i lda + p]: word (r, t) at dst[r kp + t]
      for (int r = 0; r < rows; ++r) {
        const float* s = A + (i0 + i + r) * lda + p0;
        std::uint32_t* d = dst + r * kp;
        std::int64_t t = 0;
        for (; t + 16 <= kp; t += 16) _mm512_storeu_si512(d + t, pairs_of_run(s + 2 * t, kc - 2 * t));
        if (t < kp)
          _mm512_mask_storeu_epi32(d + t, pgemm::lanes16(kp - t), pairs_of_run(s + 2 * t, kc - 2 * t));
      }
    } else {  // A[i, p] at A[p lda + i]: word (r, t) at dst[t MR + r], from rows p and p + 1 of A
      const __mmask16 m = pgemm::lanes16(rows);
      for (std::int64_t t = 0; t < kp; ++t) {
        const float* s0 = A + (p0 + 2 * t) * lda + i0 + i;
        _mm512_mask_storeu_epi32(dst + t * MR, m, pairs_of_rows(s0, 2 * t + 1 < kc ? s0 + lda : nullptr, rows));
      }
    }
  }
}

/// Packs op(B)[p0 : p0 + kc, j0 : j0 + nc] as panels of pgemm::panel_width columns: a panel
/// holds, for each depth pair t, the pair words of its w columns (zeros past column nc and
/// past depth kc). Every panel before the last is NR wide, so panel j starts at dst + j kp.
DINO_TARGET_AVX512BF16 inline void pack_b(bool trans, const float* B, std::int64_t ldb, std::int64_t p0,
                                          std::int64_t j0, std::int64_t nc, std::int64_t kc, std::uint32_t* dst) {
  const std::int64_t kp = (kc + 1) / 2;
  if (!trans) {  // B[p, j] at B[p ldb + j]: rows p and p + 1 in order (one sequential stream, as in pgemm::pack_b)
    for (std::int64_t t = 0; t < kp; ++t) {
      const float* s0 = B + (p0 + 2 * t) * ldb + j0;
      const float* s1 = 2 * t + 1 < kc ? s0 + ldb : nullptr;
      for (std::int64_t j = 0; j < nc; j += NR) {
        const int w = pgemm::panel_width<NR>(nc, j);
        const int cols = int(std::min<std::int64_t>(w, nc - j));
        std::uint32_t* d = dst + j * kp + t * w;
        for (int c = 0; c < w; c += 16)  // columns past nc: zeros from the masked loads
          _mm512_storeu_si512(d + c, pairs_of_rows(s0 + j + c, s1 ? s1 + j + c : nullptr, std::max(0, cols - c)));
      }
    }
    return;
  }
  for (std::int64_t j = 0; j < nc; j += NR) {  // B[p, j] at B[j ldb + p]: a column's pairs are contiguous
    const int w = pgemm::panel_width<NR>(nc, j);
    const int cols = int(std::min<std::int64_t>(w, nc - j));
    if (cols < w) std::memset(dst, 0, sizeof(std::uint32_t) * std::size_t(w * kp));
    for (int c = 0; c < cols; ++c) {
      const float* s = B + (j0 + j + c) * ldb + p0;
      for (std::int64_t t = 0; t < kp; t += 16)
        store_strided(pairs_of_run(s + 2 * t, kc - 2 * t), int(std::min<std::int64_t>(16, kp - t)), dst + t * w + c, w);
    }
    dst += std::int64_t(w) * kp;
  }
}

/// C[0 : mr, 0 : nr] = alpha acc + beta C (or + bias), acc the product over kp depth pairs of
/// a packed A panel and a packed B panel (16 NV words per pair). A's word (r, t) is at
/// a[r lda + t] when ROWS (a row-major panel, lda = kp) and at a[t MR + r] otherwise.
template <int NV, bool ROWS>
DINO_TARGET_AVX512BF16 inline void kernel(std::int64_t kp, const std::uint32_t* __restrict a, std::int64_t lda,
                                          const std::uint32_t* __restrict b, float* c, std::int64_t ldc, int mr,
                                          int nr, float alpha, float beta, const float* bias) {
  __m512 acc[MR][NV];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const std::uint32_t* a4 = a + 4 * lda;
  const std::uint32_t* a8 = a + 8 * lda;
  for (std::int64_t t = 0; t < kp; ++t) {
    __m512bh bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_load_si512(b + 16 * v);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const std::uint32_t w = ROWS ? (r < 4 ? a : r < 8 ? a4 : a8)[(r & 3) * lda] : a[r];
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(int(w));
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, bv[v]);
    }
    if constexpr (ROWS) {
      ++a;
      ++a4;
      ++a8;
    } else {
      a += MR;
    }
    b += 16 * NV;
  }
  pgemm::store_tile_avx512<MR, NV>(acc, c, ldc, mr, nr, alpha, beta, bias);
}

/// The loop nest of the bf16 GEMMs (pgemm::gemm_blocked's, its depth blocks and bias
/// contract): pack_a(ic, pc, mc, kc, dst) and pack_b(pc, jc, nc, kc, dst) fill the panels;
/// ta: A's panel holds depth pairs of MR rows (else rows of pair words).
template <class PackA, class PackB>
inline void blocked_loop(bool ta, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, float beta, float* C,
                         std::int64_t ldc, const float* bias, buffers& buf, PackA&& pack_a_at, PackB&& pack_b_at) {
  static_assert(MC % MR == 0 && NC % NR == 0);
  const std::int64_t kb = pgemm::depth_block(k);
  for (std::int64_t jc = 0; jc < n; jc += NC) {
    const std::int64_t nc = std::min(NC, n - jc);
    for (std::int64_t pc = 0; pc < k; pc += kb) {
      const std::int64_t kc = std::min(kb, k - pc), kp = (kc + 1) / 2;
      pack_b_at(pc, jc, nc, kc, buf.b);
      const float bet = pc == 0 ? beta : 1.0f;
      const float* bias_c = pc == 0 && bias ? bias + jc : nullptr;
      for (std::int64_t ic = 0; ic < m; ic += MC) {
        const std::int64_t mc = std::min(MC, m - ic);
        pack_a_at(ic, pc, mc, kc, buf.a);
        const std::uint32_t* bp = buf.b;
        for (std::int64_t j = 0; j < nc; j += NR) {
          const int w = pgemm::panel_width<NR>(nc, j);
          const int nr = int(std::min<std::int64_t>(w, nc - j));
          const std::uint32_t* ap = buf.a;
          for (std::int64_t i = 0; i < mc; i += MR, ap += MR * kp) {
            const int mr = int(std::min<std::int64_t>(MR, mc - i));
            float* ct = C + (ic + i) * ldc + jc + j;
            const float* bt = bias_c ? bias_c + j : nullptr;
            if (ta) {
              if (w == NR) kernel<2, false>(kp, ap, MR, bp, ct, ldc, mr, nr, alpha, bet, bt);
              else kernel<1, false>(kp, ap, MR, bp, ct, ldc, mr, nr, alpha, bet, bt);
            } else {
              if (w == NR) kernel<2, true>(kp, ap, kp, bp, ct, ldc, mr, nr, alpha, bet, bt);
              else kernel<1, true>(kp, ap, kp, bp, ct, ldc, mr, nr, alpha, bet, bt);
            }
          }
          bp += std::int64_t(w) * kp;
        }
      }
    }
  }
}

/// The bf16 twin of pgemm::gemm_blocked (same loop nest, depth blocks and bias contract).
/// Returns false when the thread's packing buffers could not be allocated.
inline bool gemm_blocked(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                         const float* A, std::int64_t lda, const float* B, std::int64_t ldb, float beta, float* C,
                         std::int64_t ldc, const float* bias) {
  buffers& buf = thread_buffers();
  if (!buf.a) return false;
  if (k == 0) return pgemm::gemm_blocked<pgemm::isa_avx512>(ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc, bias);
  blocked_loop(
      ta, m, n, k, alpha, beta, C, ldc, bias, buf,
      [&](std::int64_t ic, std::int64_t pc, std::int64_t mc, std::int64_t kc, std::uint32_t* d) {
        pack_a(ta, A, lda, ic, pc, mc, kc, d);
      },
      [&](std::int64_t pc, std::int64_t jc, std::int64_t nc, std::int64_t kc, std::uint32_t* d) {
        pack_b(tb, B, ldb, pc, jc, nc, kc, d);
      });
  return true;
}

// ---- operands already bf16 in memory (cpu/bf16_operands.hpp): C = X W^T, X [m, k] and W
// [n, k] bf16 bits in rows. Their pair words are consecutive values of a row, so packing is a
// copy of words (no rounding); the panels, the kernel and the depth blocks are gemm_blocked's,
// so C is the same bits as gemm_blocked(false, true, ...) on the fp32 values the bits stand for.

/// The pair words of cnt values of a bf16 row (the high half of a last, odd word zero).
inline void pairs_of_bf16_run(const std::uint16_t* s, std::int64_t cnt, std::uint32_t* d) {
  const std::int64_t whole = cnt / 2;
  std::memcpy(d, s, sizeof(std::uint32_t) * std::size_t(whole));
  if (cnt % 2) d[whole] = s[cnt - 1];
}

/// pack_a(false, ...) from bf16 rows: row r's words at dst[r kp + t], zero rows past mc.
inline void pack_a_bf16(const std::uint16_t* A, std::int64_t lda, std::int64_t i0, std::int64_t p0, std::int64_t mc,
                        std::int64_t kc, std::uint32_t* dst) {
  const std::int64_t kp = (kc + 1) / 2;
  for (std::int64_t i = 0; i < mc; i += MR, dst += MR * kp) {
    const int rows = int(std::min<std::int64_t>(MR, mc - i));
    if (rows < MR) std::memset(dst, 0, sizeof(std::uint32_t) * std::size_t(MR * kp));
    for (int r = 0; r < rows; ++r) pairs_of_bf16_run(A + (i0 + i + r) * lda + p0, kc, dst + r * kp);
  }
}

/// pack_b(true, ...) from bf16 rows of B^T (column j of op(B) is row j of W): panel words
/// (t, c) at dst[t w + c], zero columns past nc.
inline void pack_b_bf16(const std::uint16_t* B, std::int64_t ldb, std::int64_t p0, std::int64_t j0, std::int64_t nc,
                        std::int64_t kc, std::uint32_t* dst) {
  const std::int64_t kp = (kc + 1) / 2;
  std::uint32_t col[KC / 2 + 1];
  for (std::int64_t j = 0; j < nc; j += NR) {
    const int w = pgemm::panel_width<NR>(nc, j);
    const int cols = int(std::min<std::int64_t>(w, nc - j));
    if (cols < w) std::memset(dst, 0, sizeof(std::uint32_t) * std::size_t(w * kp));
    for (int c = 0; c < cols; ++c) {
      pairs_of_bf16_run(B + (j0 + j + c) * ldb + p0, kc, col);
      for (std::int64_t t = 0; t < kp; ++t) dst[t * w + c] = col[t];
    }
    dst += std::int64_t(w) * kp;
  }
}

/// gemm_blocked(false, true, m, n, k, 1, X, lda, W, ldb, 0, C, ldc, bias) on bf16 operands
/// in memory. Returns false when the thread's packing buffers could not be allocated.
inline bool gemm_blocked_bf16_operands(std::int64_t m, std::int64_t n, std::int64_t k, const std::uint16_t* X,
                                       std::int64_t lda, const std::uint16_t* W, std::int64_t ldb, float* C,
                                       std::int64_t ldc, const float* bias) {
  buffers& buf = thread_buffers();
  if (!buf.a || k == 0) return false;
  blocked_loop(
      false, m, n, k, 1.0f, 0.0f, C, ldc, bias, buf,
      [&](std::int64_t ic, std::int64_t pc, std::int64_t mc, std::int64_t kc, std::uint32_t* d) {
        pack_a_bf16(X, lda, ic, pc, mc, kc, d);
      },
      [&](std::int64_t pc, std::int64_t jc, std::int64_t nc, std::int64_t kc, std::uint32_t* d) {
        pack_b_bf16(W, ldb, pc, jc, nc, kc, d);
      });
  return true;
}
#endif  // DINO_GEMM_X86

}  // namespace detail::pgemm16

namespace detail {
/// Runs the AVX512_BF16 kernel on one product; false: not run (no such CPU, or no buffers).
inline bool gemm_packed_bf16(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t kd, float alpha,
                             const float* A, std::int64_t lda, const float* B, std::int64_t ldb, float beta, float* C,
                             std::int64_t ldc, const float* bias = nullptr) {
#if DINO_GEMM_X86
  if (gemm_bf16_native())
    return pgemm16::gemm_blocked(ta, tb, m, n, kd, alpha, A, lda, B, ldb, beta, C, ldc, bias);
#else
  (void)ta, (void)tb, (void)m, (void)n, (void)kd, (void)alpha, (void)A, (void)lda, (void)B, (void)ldb, (void)beta,
      (void)C, (void)ldc, (void)bias;
#endif
  return false;
}
}  // namespace detail

}  // namespace dino::cpu
