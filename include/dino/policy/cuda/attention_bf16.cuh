// dino/policy/cuda/attention_bf16.cuh: the bf16 tensor-core attention forward
// (forward_bf16_kernel), included by policy/cuda/attention.cuh.
//
// The two warp-level primitives (bf_mma, bf_ldmatrix_x4_trans) are inline PTX. Defining
// DINO_ATTN_BF16_HOST_PRIMITIVES before the include leaves them out, so that a host SIMT
// emulation (tests/emu/) can supply its own and run this very kernel code on the CPU.

#pragma once

#include <cstdint>
#include <cstring>

#include "dino/policy/cuda/attention_group.hpp"  // threads, full_mask, group<T>

#ifndef DINO_ATTN_BF16_HOST_PRIMITIVES
#include <cuda_bf16.h>
#endif

namespace dino::cuda::detail::attn {

// ---- bf16 tensor-core forward (float tensors, head dim 32, 64 or 128, any n; pol.bf16_attention) ----
// The flash-attention form of the forward: P is never stored. One block of 4
// warps per (segment, head, 64 queries); warp w owns queries 16w..16w+15. Its Q rows are
// rounded to bf16 into mma.sync m16n8k16 A fragments in registers. Keys and values are staged
// 64 rows at a time as bf16 (zeros past n); per staged chunk each warp computes its scores
// S = Q K^T in fp32 fragments, the running row max m and the running sum l of exp(s - m)
// (an online softmax, in base 2 with the scale folded in), rescales its O accumulators, and
// adds P V with the unnormalised P rounded to bf16 (the scores' C fragments are the A
// fragments of P, so P never leaves registers). At the end O is divided by l. With keep
// (training) each row's lse2 = m + log2(l) goes to n floats at poff[segment] + h*n of probs
// (the segment's region holds heads*n floats: attention_store::rows; a matrix layout has
// room to spare), for the backward. When the CLS row is asked for, a second pass recomputes
// row 0's scores chunk by chunk (the same products, so the same values) and writes
// exp2(s - m) / l.
// A row with a NaN or +inf score, or with only -inf scores, becomes NaN (exp2 of NaN or of
// inf - inf), as on the CPU.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16; lane = 4 g + t):
//   A (16 x 16, row): reg 0 = (row g, cols 2t, 2t+1), reg 1 = (row g+8, same cols),
//                     reg 2 = (row g, cols 2t+8, 2t+9), reg 3 = (row g+8, cols 2t+8, 2t+9)
//   B (16 x 8, col):  reg 0 = (rows 2t, 2t+1, col g), reg 1 = (rows 2t+8, 2t+9, col g)
//   C (16 x 8, f32):  c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// The low 16 bits of a register hold the lower column (or row) of its pair.
namespace bf {
inline constexpr int qrows = 64;  ///< queries per block (16 per warp)
inline constexpr int kc = 64;     ///< keys per staged chunk
/// Row stride (bf16 elements) of a staged K or V chunk: HD + 8 keeps rows 16-byte aligned
/// for ldmatrix and puts the 8 rows a fragment load touches in distinct banks.
constexpr int ld(int hd) { return hd + 8; }
constexpr std::size_t smem_bytes(int hd) { return 2 * std::size_t(kc) * std::size_t(ld(hd)) * 2; }
}  // namespace bf

__device__ __forceinline__ std::uint32_t bf_pack(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low half) = lo
  std::uint32_t u;
  memcpy(&u, &v, sizeof u);
  return u;
}

#ifndef DINO_ATTN_BF16_HOST_PRIMITIVES
/// c += a b on bf16 tensor cores with fp32 accumulation (mma.sync.m16n8k16, layouts above).
__device__ __forceinline__ void bf_mma(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// Four 8 x 8 bf16 matrices, transposed: lane 8 i + r gives the address of row r of matrix i;
/// register i of lane 4 g + t receives (rows 2t, 2t+1; column g) of matrix i.
__device__ __forceinline__ void bf_ldmatrix_x4_trans(std::uint32_t (&r)[4], const __nv_bfloat16* p) {
  const auto a = static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
#endif

/// rows [first, first + kc) of a head's columns of src (row stride ld floats) into dst as bf16
/// (row stride bf::ld(HD)), zeros at and past row n; float4 loads when vec.
template <int HD>
__device__ __forceinline__ void bf_stage(__nv_bfloat16* dst, const float* src, std::int64_t ld, std::int64_t first,
                                         std::int64_t n, bool vec) {
  constexpr int LK = bf::ld(HD);
  if (vec) {
    constexpr int V4 = HD / 4;
    for (int idx = threadIdx.x; idx < bf::kc * V4; idx += threads) {
      const int r = idx / V4, d = (idx % V4) * 4;
      const std::int64_t i = first + r;
      const float4 v = i < n ? *reinterpret_cast<const float4*>(src + i * ld + d) : make_float4(0.f, 0.f, 0.f, 0.f);
      const uint2 u{bf_pack(v.x, v.y), bf_pack(v.z, v.w)};
      *reinterpret_cast<uint2*>(dst + r * LK + d) = u;  // 8-byte aligned: LK * 2 and d * 2 are multiples of 8
    }
  } else {
    for (int idx = threadIdx.x; idx < bf::kc * HD; idx += threads) {
      const int r = idx / HD, d = idx % HD;
      const std::int64_t i = first + r;
      dst[r * LK + d] = __float2bfloat16_rn(i < n ? src[i * ld + d] : 0.0f);
    }
  }
}

/// a[*][*] = 0 (C fragments).
template <int N>
__device__ __forceinline__ void bf_zero(float (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) a[i][e] = 0.0f;
}

/// The max and the sum over a quad of lanes (the four lanes 4 g .. 4 g + 3 that share a row).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(full_mask, v, 1));
  return fmaxf(v, __shfl_xor_sync(full_mask, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(full_mask, v, 1);
  return v + __shfl_xor_sync(full_mask, v, 2);
}

/// dst[i][d] (row stride ld) = acc (C fragments of rows ra, ra + 8) times mul[0] or mul[1]
/// by row, for the rows under n.
template <int HD>
__device__ __forceinline__ void bf_store_rows(float* dst, std::int64_t ld, const float (&acc)[HD / 8][4],
                                              std::int64_t ra, std::int64_t n, const float (&mul)[2], int tq) {
#pragma unroll
  for (int dt = 0; dt < HD / 8; ++dt) {
    const int d = 8 * dt + 2 * tq;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const std::int64_t i = ra + 8 * r;
      if (i < n) {
        dst[i * ld + d] = acc[dt][2 * r] * mul[r];
        dst[i * ld + d + 1] = acc[dt][2 * r + 1] * mul[r];
      }
    }
  }
}

/// The warp's products of one staged chunk: s[jt] (keys 8 jt .. 8 jt + 7 of the chunk) = A B^T
/// for the A rows of `a` (fragments) and the chunk's rows of sB (row-major [kc][ld(HD)]);
/// tiles past the kn valid keys are 0 (their staged rows are zero too). NJ < kc / 8 takes
/// the first 8 NJ rows of sB (a part of the chunk: sB and kn moved to its first row).
template <int HD, int NJ = bf::kc / 8>
__device__ __forceinline__ void bf_products(float (&s)[NJ][4], const std::uint32_t (&a)[HD / 16][4],
                                            const __nv_bfloat16* sB, int kn, int gq, int tq) {
  constexpr int LK = bf::ld(HD);
#pragma unroll
  for (int jt = 0; jt < NJ; ++jt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[jt][e] = 0.0f;
    if (8 * jt < kn) {  // warp-uniform
      const __nv_bfloat16* brow = sB + (8 * jt + gq) * LK + 2 * tq;
#pragma unroll
      for (int kk = 0; kk < HD / 16; ++kk) {
        std::uint32_t b0, b1;
        memcpy(&b0, brow + 16 * kk, 4);
        memcpy(&b1, brow + 16 * kk + 8, 4);
        bf_mma(s[jt], a[kk], b0, b1);
      }
    }
  }
}

/// The warp's scores of one staged chunk, in log2 units: s[jt] (keys 8 jt .. 8 jt + 7 of the
/// chunk) = (Q K^T) * c for the kn valid keys, -inf for the others (NJ: as bf_products).
template <int HD, int NJ = bf::kc / 8>
__device__ __forceinline__ void bf_scores(float (&s)[NJ][4], const std::uint32_t (&qa)[HD / 16][4],
                                          const __nv_bfloat16* sK, int kn, float c, int gq, int tq) {
  bf_products<HD, NJ>(s, qa, sK, kn, gq, tq);
#pragma unroll
  for (int jt = 0; jt < NJ; ++jt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[jt][e] = 8 * jt + 2 * tq + (e & 1) < kn ? s[jt][e] * c : -INFINITY;
}

/// A fragments of 16 rows (rows r0 + g and r0 + g + 8 of this lane) of a [*, HD] float matrix
/// with row stride ld, rounded to bf16; zeros at and past row n.
template <int HD>
__device__ __forceinline__ void bf_row_fragments(std::uint32_t (&a)[HD / 16][4], const float* src, std::int64_t ld,
                                                 std::int64_t ra, std::int64_t n, int tq) {
  const std::int64_t rb = ra + 8;
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    const int d = 16 * kk + 2 * tq;
    const auto pair = [&](std::int64_t i, int col) {
      return i < n ? bf_pack(src[i * ld + col], src[i * ld + col + 1]) : 0u;
    };
    a[kk][0] = pair(ra, d);
    a[kk][1] = pair(rb, d);
    a[kk][2] = pair(ra, d + 8);
    a[kk][3] = pair(rb, d + 8);
  }
}

/// acc[dt] += S B over one staged chunk: S the warp's [16 x kc] C fragments s (rounded to
/// bf16 as A fragments, 16 keys at a time, up to kn), B the chunk's rows of sB ([kc][ld(HD)],
/// read transposed by ldmatrix). NJ: as bf_products (S is then [16 x 8 NJ]).
template <int HD, int NJ = bf::kc / 8>
__device__ __forceinline__ void bf_accumulate(float (&acc)[HD / 8][4], const float (&s)[NJ][4],
                                              const __nv_bfloat16* sB, int kn, int lane) {
  static_assert(NJ % 2 == 0, "S is rounded 16 keys at a time");
  constexpr int LK = bf::ld(HD);
  const int mi = lane >> 3, ri = lane & 7;  // this lane addresses row ri of matrix mi
#pragma unroll
  for (int t = 0; t < NJ / 2; ++t) {
    if (16 * t >= kn) break;  // warp-uniform: the rest of the chunk is padding
    const std::uint32_t pa[4] = {bf_pack(s[2 * t][0], s[2 * t][1]), bf_pack(s[2 * t][2], s[2 * t][3]),
                                 bf_pack(s[2 * t + 1][0], s[2 * t + 1][1]), bf_pack(s[2 * t + 1][2], s[2 * t + 1][3])};
#pragma unroll
    for (int dt = 0; dt < HD / 8; dt += 2) {
      std::uint32_t b[4];
      bf_ldmatrix_x4_trans(b, sB + (16 * t + (mi & 1) * 8 + ri) * LK + 8 * (dt + (mi >> 1)));
      bf_mma(acc[dt], pa, b[0], b[1]);
      bf_mma(acc[dt + 1], pa, b[2], b[3]);
    }
  }
}

/// What a thread of a bf16 kernel knows from its launch position: lane, warp w and quad
/// coordinates (gq = lane / 4, tq = lane % 4), the segment and head of its block, t0 (its 64
/// query or key rows), the head's columns of the packed qkv (Qb, Kb, Vb; row stride ld), the
/// offset blk of the (segment, head) rows in probs and scratch (n floats at poff + h*n), and
/// the two rows ra, rb = ra + 8 of its warp's 16 that this lane's fragments hold. active: the
/// warp has a row (warp-uniform).
template <int HD>
struct bf_place {
  int lane, w, gq, tq;
  std::int64_t seg, t0, h, n, ld, first, blk, ra, rb;
  const float *Qb, *Kb, *Vb;
  bool active;
  float c;  ///< scale * log2(e): scores in base 2
  __device__ __forceinline__ explicit bf_place(const group<float>& g)
      : lane(int(threadIdx.x & 31)), w(int(threadIdx.x >> 5)), gq(lane >> 2), tq(lane & 3),
        seg(std::int64_t(blockIdx.x) / g.tiles), t0((std::int64_t(blockIdx.x) % g.tiles) * bf::qrows),
        h(blockIdx.y), n(g.n), ld(3 * g.D), first(g.row0 + seg * n), blk(g.poff0 + seg * g.pstride + h * n),
        ra(t0 + 16 * w + gq), rb(ra + 8), Qb(g.qkv + first * ld + h * HD), Kb(Qb + g.D), Vb(Qb + 2 * g.D),
        active(t0 + 16 * w < n), c(g.scale * 1.4426950408889634f) {}
};

template <int HD>
__global__ void __launch_bounds__(threads, HD <= 64 ? 4 : 2) forward_bf16_kernel(group<float> g, bool keep, bool vec) {
  constexpr int LK = bf::ld(HD), KD = HD / 16, ND = HD / 8, JT = bf::kc / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [kc][LK] key chunk
  __nv_bfloat16* sV = sK + bf::kc * LK;                              // [kc][LK] value chunk
  const auto [lane, w, gq, tq, seg, q0, h, n, ld, first, blk, ra, rb, Qb, Kb, Vb, active, c] = bf_place<HD>(g);

  std::uint32_t qa[KD][4];
  bf_row_fragments<HD>(qa, Qb, ld, ra, n, tq);

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[ND][4];
  bf_zero(o);
  const int nch = int((n + bf::kc - 1) / bf::kc);
  for (int ch = 0; ch < nch; ++ch) {
    const std::int64_t k0 = std::int64_t(ch) * bf::kc;
    __syncthreads();  // the previous chunk is read
    bf_stage<HD>(sK, Kb, ld, k0, n, vec);
    bf_stage<HD>(sV, Vb, ld, k0, n, vec);
    __syncthreads();
    if (!active) continue;
    const int kn = n - k0 < bf::kc ? int(n - k0) : bf::kc;
    float s[JT][4];
    bf_scores<HD>(s, qa, sK, kn, c, gq, tq);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int jt = 0; jt < JT; ++jt)
#pragma unroll
      for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[jt][e]);
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the row's max over its quad of lanes
      mx[r] = quad_max(mx[r]);
      const float mn = fmaxf(m[r], mx[r]);
      alpha[r] = exp2f(m[r] - mn);  // 0 on the first chunk; NaN when mn is +-inf (the row becomes NaN)
      m[r] = mn;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int jt = 0; jt < JT; ++jt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[jt][e] - m[e >> 1]);  // 0 for masked keys; NaN for a NaN score
        s[jt][e] = p;
        l[e >> 1] += p;
      }
#pragma unroll
    for (int dt = 0; dt < ND; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e >> 1];
    bf_accumulate<HD>(o, s, sV, kn, lane);
  }
  float inv[2] = {0.0f, 0.0f};
  float* L = g.probs + blk;  // lse2 of the rows
  if (active) {
    float lsum[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lsum[r] = quad_sum(l[r]);
      inv[r] = 1.0f / lsum[r];
    }
    bf_store_rows<HD>(g.out + first * g.D + h * HD, g.D, o, ra, n, inv, tq);
    if (keep && tq == 0) {  // what the backward needs: P_ij = exp2(s_ij c - lse2_i)
      if (ra < n) L[ra] = m[0] + log2f(lsum[0]);
      if (rb < n) L[rb] = m[1] + log2f(lsum[1]);
    }
  }

  // the CLS row, P = exp2(s - m) / l, recomputed chunk by chunk (block-uniform condition)
  float* cls = g.cls && q0 == 0 ? g.cls + g.cls0 + (seg * g.heads + h) * n : nullptr;
  if (!cls) return;
  for (int ch = 0; ch < nch; ++ch) {
    const std::int64_t k0 = std::int64_t(ch) * bf::kc;
    __syncthreads();
    bf_stage<HD>(sK, Kb, ld, k0, n, vec);
    __syncthreads();
    if (w != 0) continue;  // row 0 is warp 0's (lanes 0..3, the C fragments' c0 and c1)
    const int kn = n - k0 < bf::kc ? int(n - k0) : bf::kc;
    float s[JT][4];
    bf_scores<HD>(s, qa, sK, kn, c, gq, tq);
    if (gq == 0)
#pragma unroll
      for (int jt = 0; jt < JT; ++jt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int jj = 8 * jt + 2 * tq + e;
          if (jj < kn) cls[k0 + jj] = exp2f(s[jt][e] - m[0]) * inv[0];
        }
  }
}

// ---- bf16 tensor-core backward (the same conditions as the forward, pol.bf16_attention) ----
// The flash-attention form, deterministic (no atomics): P is recomputed from the scores and
// the rows' lse2 that the forward kept (n floats at poff[segment] + h*n of probs), never
// read; D_i = rowsum(dO_i o O_i) (= rowsum(dP o P)) comes from the forward's
// output O. The products on bf16 tensor cores with fp32 sums; P and dS rounded to bf16 where
// they are operands.
//   rows:    one block of 4 warps per (segment, head, 64 queries); warp w owns queries
//            16w..16w+15 (Q and dO rows in A fragments). It writes D of its rows to
//            scratch (laid out as probs: n floats at poff[segment] + h*n), then per key chunk: S = Q K^T, P, dP =
//            dO V^T, dS = P o (dP - D), dQ += dS K.
//   columns: one block per (segment, head, 64 keys); warp w owns keys 16w..16w+15 (K and V
//            rows in A fragments). Per chunk of 64 queries (Q and dO staged as bf16 rows, their
//            lse2 and D as floats): S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T,
//            dS^T = P^T o (dP^T - D), dK += dS^T Q. It runs after the rows kernel (the same
//            stream), which wrote D.
// Both take a chunk in two halves of 32 rows, which keeps half the score and dP fragments
// live: at HD <= 64 that is 166 and 168 registers (ptxas, sm_90), so three blocks fit on an
// SM where two did. The products, roundings and order of the sums are the whole chunk's.
namespace bf {
constexpr std::size_t rows_smem_bytes(int hd) { return smem_bytes(hd); }
constexpr std::size_t cols_smem_bytes(int hd) { return smem_bytes(hd) + 2 * std::size_t(kc) * sizeof(float); }
}  // namespace bf

/// D of rows ra and ra + 8 (zero at and past n): sum over d of dO[i][d] O[i][d], the four lanes
/// of the quad splitting d.
template <int HD>
__device__ __forceinline__ void bf_row_dots(float (&D)[2], const float* dO, const float* O, std::int64_t ld,
                                            std::int64_t ra, std::int64_t n, int tq) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const std::int64_t i = ra + 8 * r;
    float acc = 0.0f;
    if (i < n)
      for (int d = tq; d < HD; d += 4) acc += dO[i * ld + d] * O[i * ld + d];
    D[r] = quad_sum(acc);
  }
}

template <int HD>
__global__ void __launch_bounds__(threads, HD <= 64 ? 3 : 2) backward_rows_bf16_kernel(group<float> g, bool vec) {
  constexpr int LK = bf::ld(HD), KD = HD / 16, ND = HD / 8, HJ = bf::kc / 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* sK = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [kc][LK] key chunk
  __nv_bfloat16* sV = sK + bf::kc * LK;                              // [kc][LK] value chunk
  const auto [lane, w, gq, tq, seg, q0, h, n, ld, first, blk, ra, rb, Qb, Kb, Vb, active, c] = bf_place<HD>(g);
  const float* dOb = g.dout + first * g.D + h * HD;
  const float* Ob = g.out + first * g.D + h * HD;
  const float* L = g.probs + blk;  // lse2 of the rows
  float* Dw = g.ds + blk;          // D of the rows, for the columns kernel

  std::uint32_t qa[KD][4], oa[KD][4];
  bf_row_fragments<HD>(qa, Qb, ld, ra, n, tq);
  bf_row_fragments<HD>(oa, dOb, g.D, ra, n, tq);
  float Dr[2] = {0.0f, 0.0f}, lse[2] = {0.0f, 0.0f};
  if (active) {
    bf_row_dots<HD>(Dr, dOb, Ob, g.D, ra, n, tq);
    lse[0] = ra < n ? L[ra] : 0.0f;
    lse[1] = rb < n ? L[rb] : 0.0f;
    if (tq == 0) {
      if (ra < n) Dw[ra] = Dr[0];
      if (rb < n) Dw[rb] = Dr[1];
    }
  }

  float dq[ND][4];
  bf_zero(dq);
  const int nch = int((n + bf::kc - 1) / bf::kc);
  for (int ch = 0; ch < nch; ++ch) {
    const std::int64_t k0 = std::int64_t(ch) * bf::kc;
    __syncthreads();
    bf_stage<HD>(sK, Kb, ld, k0, n, vec);
    bf_stage<HD>(sV, Vb, ld, k0, n, vec);
    __syncthreads();
    if (!active) continue;
    const int kn = n - k0 < bf::kc ? int(n - k0) : bf::kc;
    // The chunk in two halves of HJ tiles (32 keys): half the live score and dP registers,
    // and the same products, roundings and order of dQ's sums as the whole chunk at once.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j0 = half * 8 * HJ, hn = kn - j0;  // the half's first key and its valid keys
      if (hn <= 0) break;                           // warp-uniform
      const __nv_bfloat16 *hK = sK + j0 * LK, *hV = sV + j0 * LK;
      float s[HJ][4], dp[HJ][4];
      bf_scores<HD, HJ>(s, qa, hK, hn, c, gq, tq);   // -inf past the valid keys
      bf_products<HD, HJ>(dp, oa, hV, hn, gq, tq);  // dP = dO V^T
#pragma unroll
      for (int jt = 0; jt < HJ; ++jt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const bool row_ok = (r ? rb : ra) < n;
          const float p = row_ok ? exp2f(s[jt][e] - lse[r]) : 0.0f;  // 0 past the valid keys
          s[jt][e] = p * (dp[jt][e] - Dr[r]);                          // dS
        }
      bf_accumulate<HD, HJ>(dq, s, hK, hn, lane);
    }
  }
  if (!active) return;
  const float mul[2] = {g.scale, g.scale};
  bf_store_rows<HD>(g.dqkv + first * ld + h * HD, ld, dq, ra, n, mul, tq);
}

template <int HD>
__global__ void __launch_bounds__(threads, HD <= 64 ? 3 : 2) backward_cols_bf16_kernel(group<float> g, bool vec) {
  constexpr int LK = bf::ld(HD), KD = HD / 16, ND = HD / 8, HJ = bf::kc / 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* sQ = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [kc][LK] query chunk
  __nv_bfloat16* sO = sQ + bf::kc * LK;                              // [kc][LK] its dO
  float* sL = reinterpret_cast<float*>(sO + bf::kc * LK);            // [kc] its lse2
  float* sD = sL + bf::kc;                                           // [kc] its D
  // this block's 64 keys start at k0; the lane's fragments hold keys ja and jb
  const auto [lane, w, gq, tq, seg, k0, h, n, ld, first, blk, ja, jb, Qb, Kb, Vb, active, c] = bf_place<HD>(g);
  const float* dOb = g.dout + first * g.D + h * HD;
  const float* L = g.probs + blk;
  const float* Dg = g.ds + blk;

  std::uint32_t ka[KD][4], va[KD][4];
  bf_row_fragments<HD>(ka, Kb, ld, ja, n, tq);
  bf_row_fragments<HD>(va, Vb, ld, ja, n, tq);
  float dk[ND][4], dv[ND][4];
  bf_zero(dk);
  bf_zero(dv);
  const int nch = int((n + bf::kc - 1) / bf::kc);
  for (int ch = 0; ch < nch; ++ch) {
    const std::int64_t i0 = std::int64_t(ch) * bf::kc;
    __syncthreads();
    bf_stage<HD>(sQ, Qb, ld, i0, n, vec);
    bf_stage<HD>(sO, dOb, g.D, i0, n, vec);
    for (int r = threadIdx.x; r < bf::kc; r += threads) {
      const std::int64_t i = i0 + r;
      sL[r] = i < n ? L[i] : 0.0f;
      sD[r] = i < n ? Dg[i] : 0.0f;
    }
    __syncthreads();
    if (!active) continue;
    const int qn = n - i0 < bf::kc ? int(n - i0) : bf::kc;
    // The chunk in two halves of HJ tiles (32 queries), as in the rows kernel: each of dV's
    // and dK's sums still takes the chunk's 16-query groups in order, so the bits are the same.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j0 = half * 8 * HJ, hn = qn - j0;  // the half's first query and its valid queries
      if (hn <= 0) break;                           // warp-uniform
      const __nv_bfloat16 *hQ = sQ + j0 * LK, *hO = sO + j0 * LK;
      const float *hL = sL + j0, *hD = sD + j0;
      float st[HJ][4], dpt[HJ][4];
      bf_products<HD, HJ>(st, ka, hQ, hn, gq, tq);  // S^T = K Q^T (rows: keys, columns: queries)
#pragma unroll
      for (int jt = 0; jt < HJ; ++jt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qq = 8 * jt + 2 * tq + (e & 1);
          const bool ok = qq < hn && (e < 2 ? ja : jb) < n;
          st[jt][e] = ok ? exp2f(st[jt][e] * c - hL[qq]) : 0.0f;  // P^T
        }
      bf_accumulate<HD, HJ>(dv, st, hO, hn, lane);   // dV += P^T dO
      bf_products<HD, HJ>(dpt, va, hO, hn, gq, tq);  // dP^T = V dO^T
#pragma unroll
      for (int jt = 0; jt < HJ; ++jt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qq = 8 * jt + 2 * tq + (e & 1);
          st[jt][e] = qq < hn ? st[jt][e] * (dpt[jt][e] - hD[qq]) : 0.0f;  // dS^T
        }
      bf_accumulate<HD, HJ>(dk, st, hQ, hn, lane);  // dK += dS^T Q
    }
  }
  if (!active) return;
  const float mul_k[2] = {g.scale, g.scale}, mul_v[2] = {1.0f, 1.0f};
  bf_store_rows<HD>(g.dqkv + first * ld + g.D + h * HD, ld, dk, ja, n, mul_k, tq);
  bf_store_rows<HD>(g.dqkv + first * ld + 2 * g.D + h * HD, ld, dv, ja, n, mul_v, tq);
}
}  // namespace dino::cuda::detail::attn
