// dino/policy/cpu/gemm_kernels.hpp: dino's own fp32 GEMM for x86-64, chosen at run time.
//
// The library is header-only and built for the x86-64 baseline (SSE2), so Eigen's kernels
// are its SSE2 ones. This file adds a packed, blocked fp32 GEMM (the BLIS loop nest) whose
// micro-kernels are compiled for AVX2 + FMA and for AVX-512 through function attributes
// (`__attribute__((target(...)))`), not build flags, and picked once per process with
// `__builtin_cpu_supports`:
//
//   avx512  12 x 32 register tile (24 zmm accumulators), 12 x 16 for a last narrow panel
//   avx2     6 x 16 register tile (12 ymm accumulators),  6 x 8 for a last narrow panel
//   eigen   the Eigen path of gemm.hpp (other CPUs, other compilers, double, or forced)
//
// `DINO_GEMM_KERNEL=eigen|avx2|avx512` in the environment (read once) or set_gemm_kernel()
// overrides the choice; a kernel the CPU lacks is never used.
//
// Loop nest for C[m, n] = alpha op(A) op(B) + beta C, all row-major (gemm_blocked below):
//   for jc (nc columns of C):   for pc (kc of the depth):   pack op(B)[pc, jc] -> panels of NR columns
//     for ic (mc rows):   [pack op(A)[ic, pc] -> panels of MR rows]
//       for each NR panel, for each MR panel: micro-kernel on an MR x NR tile of C
// Full MR-row panels of op(A) are read in place by the AVX-512 kernel (A's rows or A^T's
// columns are contiguous), so only B and a last partial panel of A are packed; the AVX2
// kernel reads packed A panels (in place it spills an accumulator). The packing buffers are
// thread-local, allocated once per thread at their largest size (3.6 MiB), so a steady
// state allocates nothing.
//
// Determinism: the depth blocks depend on k alone (k split into ceil(k / KC) near-equal
// blocks), and every element of C sums its depth block in order p = 0, 1, ... in one FMA
// chain, whatever its position in a tile or the tile's size; the block results are added to
// C in order. So an element's value does not depend on m, n, the tile edges or on how a
// caller splits C among threads: the result is the same for any thread count (and the same
// for the AVX2 and AVX-512 kernels).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define DINO_GEMM_X86 1
#include <immintrin.h>
#define DINO_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DINO_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#else
#define DINO_GEMM_X86 0
#endif

namespace dino::cpu {

/// The fp32 GEMM kernels dino can run.
enum class gemm_kernel : int {
  eigen = 0,   ///< Eigen (the build's instruction set: SSE2 for the x86-64 baseline)
  avx2 = 1,    ///< dino's packed GEMM, AVX2 + FMA micro-kernel (6 x 16)
  avx512 = 2,  ///< dino's packed GEMM, AVX-512F micro-kernel (12 x 32)
};

inline const char* gemm_kernel_name(gemm_kernel k) {
  switch (k) {
    case gemm_kernel::avx2: return "avx2";
    case gemm_kernel::avx512: return "avx512";
    default: return "eigen";
  }
}

/// Whether this CPU (and this compiler's build) can run kernel k.
inline bool gemm_kernel_supported(gemm_kernel k) {
  if (k == gemm_kernel::eigen) return true;
#if DINO_GEMM_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  return k == gemm_kernel::avx2 ? avx2 : k == gemm_kernel::avx512 ? avx512 : false;
#else
  return false;
#endif
}

namespace detail {
inline gemm_kernel gemm_kernel_default() {
  gemm_kernel best = gemm_kernel_supported(gemm_kernel::avx512) ? gemm_kernel::avx512
                     : gemm_kernel_supported(gemm_kernel::avx2) ? gemm_kernel::avx2
                                                                : gemm_kernel::eigen;
  if (const char* e = std::getenv("DINO_GEMM_KERNEL")) {
    for (gemm_kernel k : {gemm_kernel::eigen, gemm_kernel::avx2, gemm_kernel::avx512})
      if (std::strcmp(e, gemm_kernel_name(k)) == 0 && gemm_kernel_supported(k)) return k;
  }
  return best;
}
inline std::atomic<int>& gemm_kernel_state() {
  static std::atomic<int> s{int(gemm_kernel_default())};
  return s;
}
}  // namespace detail

/// The kernel that fp32 gemm() and gemm_serial() use now (double always uses Eigen).
inline gemm_kernel gemm_active_kernel() {
  return gemm_kernel(detail::gemm_kernel_state().load(std::memory_order_relaxed));
}

/// Chooses the fp32 kernel (for tests and comparisons). Returns false, and changes nothing,
/// when the CPU cannot run it. Not for use while another thread runs a GEMM.
inline bool set_gemm_kernel(gemm_kernel k) {
  if (!gemm_kernel_supported(k)) return false;
  detail::gemm_kernel_state().store(int(k), std::memory_order_relaxed);
  return true;
}

namespace detail::pgemm {

// Blocking sizes (floats). KC: depth of a block (a 12 x 32 tile's B panel is 96 KiB, from
// L2); MC: rows of op(A) per block (576 KiB when packed, in the 1 MiB L2); NC: columns of a
// packed B block (3 MiB, in L3). Tuned on Zen 5 among KC 256 to 1024, MC 192 to 240 and NC
// 1024 to 2048. KC 768 rather than 512 keeps depths of 576 and 768 (a ViT's qkv and fc1
// input gradients, fc2's forward) in one block, so C is written once: 7 to 19 % faster on
// those products with 2 threads, the others within 2 %.
constexpr std::int64_t KC = 768;
constexpr std::int64_t MC = 192;   // multiple of both MRs (12 and 6)
constexpr std::int64_t NC = 1024;  // multiple of both NRs (32 and 16)

/// Packing buffers of NA and NB elements of E (null when the allocation failed).
template <class E, std::int64_t NA, std::int64_t NB>
struct packing_buffers {
  E* a = nullptr;
  E* b = nullptr;
  packing_buffers() {
    a = static_cast<E*>(std::aligned_alloc(64, sizeof(E) * NA));
    b = static_cast<E*>(std::aligned_alloc(64, sizeof(E) * NB));
    if (!a || !b) {
      std::free(a);
      std::free(b);
      a = b = nullptr;
    }
  }
  ~packing_buffers() {
    std::free(a);
    std::free(b);
  }
  packing_buffers(const packing_buffers&) = delete;
  packing_buffers& operator=(const packing_buffers&) = delete;
};
/// This thread's buffers of that kind, allocated once per thread at their largest size.
template <class Buffers>
inline Buffers& thread_local_buffers() {
  thread_local Buffers b;
  return b;
}
using buffers = packing_buffers<float, MC * KC, KC * NC>;
inline buffers& thread_buffers() { return thread_local_buffers<buffers>(); }

/// The depth blocks: ceil(k / KC) blocks of near-equal size (a function of k alone).
inline std::int64_t depth_block(std::int64_t k) {
  const std::int64_t nb = (k + KC - 1) / KC;
  return (k + nb - 1) / nb;
}

/// dst[p w + r] = src[r ld + p] for r < rows, p < kc: `rows` rows of length kc, transposed
/// into an interleaved panel of width w. 4 x 4 blocks through SSE (the x86-64 baseline).
inline void pack_transposed(const float* src, std::int64_t ld, int rows, std::int64_t kc, float* dst, int w) {
  int r = 0;
#if DINO_GEMM_X86
  for (; r + 4 <= rows; r += 4) {
    const float* s0 = src + r * ld;
    const float* s1 = s0 + ld;
    const float* s2 = s1 + ld;
    const float* s3 = s2 + ld;
    float* d = dst + r;
    std::int64_t p = 0;
    for (; p + 4 <= kc; p += 4) {
      __m128 x0 = _mm_loadu_ps(s0 + p), x1 = _mm_loadu_ps(s1 + p), x2 = _mm_loadu_ps(s2 + p), x3 = _mm_loadu_ps(s3 + p);
      _MM_TRANSPOSE4_PS(x0, x1, x2, x3);
      _mm_storeu_ps(d + (p + 0) * w, x0);
      _mm_storeu_ps(d + (p + 1) * w, x1);
      _mm_storeu_ps(d + (p + 2) * w, x2);
      _mm_storeu_ps(d + (p + 3) * w, x3);
    }
    for (; p < kc; ++p) {
      d[p * w + 0] = s0[p];
      d[p * w + 1] = s1[p];
      d[p * w + 2] = s2[p];
      d[p * w + 3] = s3[p];
    }
  }
#endif
  for (; r < rows; ++r) {
    const float* s = src + r * ld;
    float* d = dst + r;
    for (std::int64_t p = 0; p < kc; ++p) d[p * w] = s[p];
  }
}

/// Packs op(A)[i0 : i0 + mc, p0 : p0 + kc] as panels of MR rows: panel q holds, for each p,
/// the MR values of rows q MR ... q MR + MR - 1 (zeros past row mc).
template <int MR>
inline void pack_a(bool trans, const float* A, std::int64_t lda, std::int64_t i0, std::int64_t p0, std::int64_t mc,
                   std::int64_t kc, float* dst) {
  if (!trans) {  // A[i, p] at A[i lda + p]: rows are contiguous; 4 x 4 transposes
    for (std::int64_t i = 0; i < mc; i += MR, dst += MR * kc) {
      const int rows = int(std::min<std::int64_t>(MR, mc - i));
      if (rows < MR) std::memset(dst, 0, sizeof(float) * std::size_t(MR * kc));
      pack_transposed(A + (i0 + i) * lda + p0, lda, rows, kc, dst, MR);
    }
    return;
  }
  // A[i, p] at A[p lda + i]: the MR values of one p are contiguous; one sweep over rows p
  for (std::int64_t p = 0; p < kc; ++p) {
    const float* src = A + (p0 + p) * lda + i0;
    float* d = dst + p * MR;
    for (std::int64_t i = 0; i < mc; i += MR, d += MR * kc) {
      const int rows = int(std::min<std::int64_t>(MR, mc - i));
      if (rows == MR) std::memcpy(d, src + i, sizeof(float) * MR);
      else {
        int r = 0;
        for (; r < rows; ++r) d[r] = src[i + r];
        for (; r < MR; ++r) d[r] = 0.0f;
      }
    }
  }
}

/// The width of the packed B panel that starts at column j of nc: NR, or NR / 2 for a last
/// panel of at most NR / 2 columns.
template <int NR>
inline int panel_width(std::int64_t nc, std::int64_t j) {
  return nc - j <= NR / 2 ? NR / 2 : NR;
}

/// Packs op(B)[p0 : p0 + kc, j0 : j0 + nc] as panels of panel_width columns: panel holds,
/// for each p, its w values (zeros past column nc).
template <int NR>
inline void pack_b(bool trans, const float* B, std::int64_t ldb, std::int64_t p0, std::int64_t j0, std::int64_t nc,
                   std::int64_t kc, float* dst) {
  if (!trans) {
    // B[p, j] at B[p ldb + j]: B's rows are read in order, each scattered into all panels
    // (panel j starts at dst + j kc: every panel before the last is NR wide). Row order keeps
    // the reads one sequential stream; a panel at a time would read NR columns of every row,
    // a 4 ldb-byte stride that the prefetcher follows badly (2x slower for k = 10,240 rows
    // from memory).
    for (std::int64_t p = 0; p < kc; ++p) {
      const float* src = B + (p0 + p) * ldb + j0;
      std::int64_t j = 0;
      for (; j + NR <= nc && panel_width<NR>(nc, j) == NR; j += NR)
        std::memcpy(dst + j * kc + p * NR, src + j, sizeof(float) * NR);  // constant size: inline moves
      if (j < nc) {
        const int w = panel_width<NR>(nc, j);
        const int cols = int(nc - j);
        float* d = dst + j * kc + p * w;
        int c = 0;
        for (; c < cols; ++c) d[c] = src[j + c];
        for (; c < w; ++c) d[c] = 0.0f;
      }
    }
    return;
  }
  for (std::int64_t j = 0; j < nc; j += NR) {  // B[p, j] at B[j ldb + p]: columns of op(B) are contiguous
    const int w = panel_width<NR>(nc, j);
    const int cols = int(std::min<std::int64_t>(w, nc - j));
    if (cols < w) std::memset(dst, 0, sizeof(float) * std::size_t(w * kc));
    pack_transposed(B + (j0 + j) * ldb + p0, ldb, cols, kc, dst, w);
    dst += std::int64_t(w) * kc;
  }
}

#if DINO_GEMM_X86
/// The lanes of a 16-float step with rem elements left: all 16, the first rem, or none.
inline __mmask16 lanes16(std::int64_t rem) {
  return rem >= 16 ? __mmask16(0xFFFF) : rem <= 0 ? __mmask16(0) : __mmask16((1u << rem) - 1u);
}

// ------------------------------------------------------------------ micro-kernels
// C[0 : mr, 0 : nr] = alpha * acc + beta * C (beta == 0: C is not read), where acc is the
// tile's product over kc of a packed A panel (MR values per p) and a packed B panel (NV
// vectors per p). Each accumulator is one FMA chain over p in order.
//
// Stores an MR x (16 NV) tile of accumulators: C[0 : mr, 0 : nr] = alpha acc + beta C, or
// alpha acc + bias (beta 0) when bias is given; beta 0 never reads C. Shared by the fp32
// and the bf16 (gemm_bf16.hpp) micro-kernels.
template <int MR, int NV>
DINO_TARGET_AVX512 __attribute__((always_inline)) inline void store_tile_avx512(const __m512 (&acc)[MR][NV], float* c,
                                                                                std::int64_t ldc, int mr, int nr,
                                                                                float alpha, float beta,
                                                                                const float* bias) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  __mmask16 mask[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
    mask[v] = lanes16(nr - 16 * v);
  }
  __m512 bias_v[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) bias_v[v] = bias ? _mm512_maskz_loadu_ps(mask[v], bias + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    if (r >= mr) break;
    float* cr = c + r * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      __m512 x;
      if (bias) x = _mm512_fmadd_ps(va, acc[r][v], bias_v[v]);  // beta is 0 with a bias
      else if (beta == 0.0f) x = _mm512_mul_ps(va, acc[r][v]);
      else x = _mm512_fmadd_ps(va, acc[r][v], _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(mask[v], cr + 16 * v)));
      _mm512_mask_storeu_ps(cr + 16 * v, mask[v], x);
    }
  }
}

// A's element (r, p) is at a[r lda + p] when DIRECT (A read in place, row-major; all MR rows
// must exist) and at a[p lda + r] otherwise (a packed panel with lda = MR, or A^T read in
// place). The arithmetic is the same in every case.
template <int NV, bool DIRECT>
DINO_TARGET_AVX512 inline void kernel_avx512(std::int64_t kc, const float* __restrict a, std::int64_t lda,
                                              const float* __restrict b, float* c, std::int64_t ldc, int mr, int nr,
                                              float alpha, float beta, const float* bias) {
  constexpr int MR = 12;
  __m512 acc[MR][NV];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* a4 = a + 4 * lda;
  const float* a8 = a + 8 * lda;
  for (std::int64_t p = 0; p < kc; ++p) {
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_load_ps(b + 16 * v);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      __m512 ar;
      if constexpr (DIRECT) ar = _mm512_set1_ps((r < 4 ? a : r < 8 ? a4 : a8)[(r & 3) * lda]);
      else ar = _mm512_set1_ps(a[r]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
    }
    if constexpr (DIRECT) {
      ++a;
      ++a4;
      ++a8;
    } else {
      a += lda;
    }
    b += 16 * NV;
  }
  store_tile_avx512<MR, NV>(acc, c, ldc, mr, nr, alpha, beta, bias);
}

alignas(32) inline constexpr std::int32_t avx2_mask_table[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                                 0,  0,  0,  0,  0,  0,  0,  0};

template <int NV, bool DIRECT>
DINO_TARGET_AVX2 inline void kernel_avx2(std::int64_t kc, const float* __restrict a, std::int64_t lda,
                                          const float* __restrict b, float* c, std::int64_t ldc, int mr, int nr,
                                          float alpha, float beta, const float* bias) {
  constexpr int MR = 6;
  __m256 acc[MR][NV];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (std::int64_t p = 0; p < kc; ++p) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_load_ps(b + 8 * v);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 ar = _mm256_broadcast_ss(DIRECT ? a + r * lda : a + r);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(ar, bv[v], acc[r][v]);
    }
    a += DIRECT ? 1 : lda;
    b += 8 * NV;
  }
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  __m256i mask[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v) {
    const int rem = std::clamp(nr - 8 * v, 0, 8);
    mask[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(avx2_mask_table + 8 - rem));
  }
  const bool full = nr >= 8 * NV;
  __m256 bias_v[NV];
#pragma GCC unroll 2
  for (int v = 0; v < NV; ++v)
    bias_v[v] = !bias ? _mm256_setzero_ps() : full ? _mm256_loadu_ps(bias + 8 * v) : _mm256_maskload_ps(bias + 8 * v, mask[v]);
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    if (r >= mr) break;
    float* cr = c + r * ldc;
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) {
      __m256 x;
      if (bias) {  // beta is 0 with a bias
        x = _mm256_fmadd_ps(va, acc[r][v], bias_v[v]);
        if (full) _mm256_storeu_ps(cr + 8 * v, x);
        else _mm256_maskstore_ps(cr + 8 * v, mask[v], x);
      } else if (full) {
        if (beta == 0.0f) x = _mm256_mul_ps(va, acc[r][v]);
        else x = _mm256_fmadd_ps(va, acc[r][v], _mm256_mul_ps(vb, _mm256_loadu_ps(cr + 8 * v)));
        _mm256_storeu_ps(cr + 8 * v, x);
      } else {
        if (beta == 0.0f) x = _mm256_mul_ps(va, acc[r][v]);
        else x = _mm256_fmadd_ps(va, acc[r][v], _mm256_mul_ps(vb, _mm256_maskload_ps(cr + 8 * v, mask[v])));
        _mm256_maskstore_ps(cr + 8 * v, mask[v], x);
      }
    }
  }
}

// tile(): A's (r, p) at a[r lda + p] (rows == true: A in place, all MR rows present) or at
// a[p lda + r] (a packed panel with lda == MR, or A^T in place).
struct isa_avx512 {
  static constexpr int MR = 12, NR = 32;
  static constexpr bool in_place_rows = true;
  static void tile(int w, std::int64_t kc, const float* a, bool rows, std::int64_t lda, const float* b, float* c,
                   std::int64_t ldc, int mr, int nr, float alpha, float beta, const float* bias) {
    if (rows) {
      if (w == NR) kernel_avx512<2, true>(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, bias);
      else kernel_avx512<1, true>(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, bias);
    } else {
      if (w == NR) kernel_avx512<2, false>(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, bias);
      else kernel_avx512<1, false>(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, bias);
    }
  }
};
struct isa_avx2 {
  static constexpr int MR = 6, NR = 16;
  // GCC spills an accumulator of the in-place-rows AVX2 kernel (16 ymm registers): 2x slower
  // than reading a packed panel, so row-major A is packed for AVX2.
  static constexpr bool in_place_rows = false;
  static void tile(int w, std::int64_t kc, const float* a, bool rows, std::int64_t lda, const float* b, float* c,
                   std::int64_t ldc, int mr, int nr, float alpha, float beta, const float* bias) {
    if (rows) {
      if (w == NR) kernel_avx2<2, true>(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, bias);
      else kernel_avx2<1, true>(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, bias);
    } else {
      if (w == NR) kernel_avx2<2, false>(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, bias);
      else kernel_avx2<1, false>(kc, a, lda, b, c, ldc, mr, nr, alpha, beta, bias);
    }
  }
};
#endif  // DINO_GEMM_X86

/// C = alpha op(A) op(B) + beta C on the calling thread (m, n >= 1; lda, ldb, ldc resolved).
/// With bias (beta must be 0): C = alpha op(A) op(B) + bias[j] in every row, the bias added
/// in the first depth block's store, as alpha acc + bias (one rounding; the same value as
/// C = bias followed by the product with beta = 1).
/// Returns false when the thread's packing buffers could not be allocated.
template <class ISA>
inline bool gemm_blocked(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
                         const float* A, std::int64_t lda, const float* B, std::int64_t ldb, float beta, float* C,
                         std::int64_t ldc, const float* bias = nullptr) {
  constexpr int MR = ISA::MR, NR = ISA::NR;
  static_assert(MC % MR == 0 && NC % NR == 0);
  buffers& buf = thread_buffers();
  if (!buf.a) return false;
  if (k == 0) {  // C = beta C (or the bias rows)
    for (std::int64_t i = 0; i < m; ++i) {
      float* c = C + i * ldc;
      if (bias) std::copy(bias, bias + n, c);
      else if (beta == 0.0f) std::fill(c, c + n, 0.0f);
      else if (beta != 1.0f)
        for (std::int64_t j = 0; j < n; ++j) c[j] *= beta;
    }
    return true;
  }
  const std::int64_t kb = depth_block(k);
  for (std::int64_t jc = 0; jc < n; jc += NC) {
    const std::int64_t nc = std::min(NC, n - jc);
    for (std::int64_t pc = 0; pc < k; pc += kb) {
      const std::int64_t kc = std::min(kb, k - pc);
      pack_b<NR>(tb, B, ldb, pc, jc, nc, kc, buf.b);
      const float bet = pc == 0 ? beta : 1.0f;
      const float* bias_c = pc == 0 && bias ? bias + jc : nullptr;
      for (std::int64_t ic = 0; ic < m; ic += MC) {
        const std::int64_t mc = std::min(MC, m - ic);
        // Full MR-row panels of op(A) are read in place (A's rows, or A^T's columns, are
        // contiguous); only a last partial panel is packed (zero-padded to MR rows).
        const std::int64_t full = (ta || ISA::in_place_rows) ? mc / MR * MR : 0;
        if (full < mc) pack_a<MR>(ta, A, lda, ic + full, pc, mc - full, kc, buf.a);
        const float* bp = buf.b;
        for (std::int64_t j = 0; j < nc; j += NR) {
          const int w = panel_width<NR>(nc, j);
          const int nr = int(std::min<std::int64_t>(w, nc - j));
          std::int64_t i = 0;
          for (; i < full; i += MR)
            ISA::tile(w, kc, ta ? A + pc * lda + ic + i : A + (ic + i) * lda + pc, !ta, lda, bp,
                      C + (ic + i) * ldc + jc + j, ldc, MR, nr, alpha, bet, bias_c ? bias_c + j : nullptr);
          for (const float* ap = buf.a; i < mc; i += MR, ap += MR * kc)
            ISA::tile(w, kc, ap, false, MR, bp, C + (ic + i) * ldc + jc + j, ldc, int(std::min<std::int64_t>(MR, mc - i)),
                      nr, alpha, bet, bias_c ? bias_c + j : nullptr);
          bp += std::int64_t(w) * kc;
        }
      }
    }
  }
  return true;
}

}  // namespace detail::pgemm

namespace detail {
/// Runs dino's fp32 kernel k (avx2 or avx512) on one product; false: not run (use Eigen).
/// bias: see gemm_blocked (beta must be 0 with it).
inline bool gemm_packed(gemm_kernel k, bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t kd, float alpha,
                        const float* A, std::int64_t lda, const float* B, std::int64_t ldb, float beta, float* C,
                        std::int64_t ldc, const float* bias = nullptr) {
#if DINO_GEMM_X86
  if (k == gemm_kernel::avx512)
    return pgemm::gemm_blocked<pgemm::isa_avx512>(ta, tb, m, n, kd, alpha, A, lda, B, ldb, beta, C, ldc, bias);
  if (k == gemm_kernel::avx2)
    return pgemm::gemm_blocked<pgemm::isa_avx2>(ta, tb, m, n, kd, alpha, A, lda, B, ldb, beta, C, ldc, bias);
#else
  (void)k, (void)ta, (void)tb, (void)m, (void)n, (void)kd, (void)alpha, (void)A, (void)lda, (void)B, (void)ldb,
      (void)beta, (void)C, (void)ldc, (void)bias;
#endif
  return false;
}
}  // namespace detail

}  // namespace dino::cpu
