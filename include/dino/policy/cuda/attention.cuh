// dino/policy/cuda/attention.cuh: multi-head self-attention over packed variable-length
// segments on the GPU, the twin of nn/attention.hpp (same arguments, same results within
// floating-point rounding).
//
// Contract (as the CPU version; see nn/attention.hpp for the layout of a pack):
//   attention_forward(pol, heads, D, segs, poff, qkv, out, probs, cls_attn, cls_offsets)
//     out [T, D] (=) per segment and head O = P V with P = softmax(Q K^T * hd^-0.5); every P
//     is written to probs at poff[segment] + h*n*n (row-major [n, n]): training keeps it for
//     the backward, inference passes scratch of the same size. cls_attn, when non-null,
//     receives P[0, :] at cls_offsets[segment] + h*n + j.
//   attention_backward(pol, heads, D, segs, poff, qkv, probs, dout, dqkv, scratch)
//     dqkv [T, 3D] (=) every element of the rows the segments cover, from dout [T, D] and
//     the P kept by the forward; scratch (attention_probs_elems elements, laid out as probs)
//     receives dS = P o (dP - rowsum(dP o P)).
// qkv, out, probs, cls_attn, dout, dqkv and scratch are device memory; segs, poff and
// cls_offsets are host memory (the pack's plan, as vit_pack keeps it). Nothing is allocated
// and nothing synchronises: the kernels are queued on pol.stream.
//
// Every head dim hd = D / heads from 1 to 128 runs (float and double); above 128 throws
// dino::shape_error. The kernels are compiled for a padded width HD in {32, 64, 128}, the
// smallest >= hd: 32, 64 and 128 run their own paths (Padded = false, no padding code);
// any other hd runs the HD path with Padded = true: head h still covers columns
// h*hd .. h*hd + hd - 1 of each of Q, K, V (and of out, dout, dqkv), the shared tiles hold
// zeros in columns hd .. HD - 1 (so they add exactly 0 to every dot product and the scale
// stays hd^-0.5), and nothing is stored to those columns (the work is that of HD: a head
// dim of 10 costs what 32 costs).
// Segments are launched in groups: consecutive segments of equal length n whose token
// offsets, probs offsets and CLS offsets advance by n, heads*n*n and heads*n form one
// launch (a DINO pack: one launch per crop resolution); other layouts only make more
// launches. The bf16 path (attention_bf16.cuh) keeps n floats per (segment, head), at
// poff[segment] + h*n, and groups segments whose probs offsets advance by heads*n
// (attention_store::rows, a pack planned by attention_store_for) or by heads*n*n; the
// other paths keep P and check that no segment's heads*n*n floats overlap the next one's.
//
// Kernels (128 threads = 4 warps; a tile is 32 rows; warp w owns rows 8w..8w+7 of a tile,
// lane l owns key column l of a key tile and dims l, l+32, ... of the padded head dim HD):
//   forward   one block per (segment, head, tile of 32 queries). The Q tile stays in shared
//             memory; pass 1 streams K tiles through shared memory and writes the scaled
//             scores to P (global) while keeping each row's max; pass 2 turns P into
//             exp(s - max) and sums each row (a warp per row); pass 3 streams V tiles,
//             divides by the row sum, writes P (and the CLS row) and accumulates O in
//             registers. Each P element is read and written by the thread that made it.
//   backward  two kernels, deterministic (no atomics):
//     rows    one block per (segment, head, tile of 32 queries): dP = dO V^T into scratch
//             with rowsum(dP o P), then dS in place and dQ = dS K * scale;
//     columns one block per (segment, head, tile of 32 keys): dK = dS^T Q * scale and
//             dV = P^T dO, streaming tiles of 32 queries of Q, dO, dS and P.
// Shared memory: forward (65 * HD + 33 * 32) * 32 elements, backward columns
// (2 * HD + 66) * 32; above 48 KiB (double with HD 64/128) the kernel is opted in to more.
// A row whose scores hold a NaN or +inf, or are all -inf, becomes NaN, as on the CPU.
// The arithmetic is plain fp32 (double) FMA, except where the policy asks for TF32
// (pol.tf32 or pol.bf16, float, head dim 32, 64 or 128, segments of at most 256 tokens): the forward
// then runs Q K^T and P V on TF32 tensor cores with fp32 accumulation and an exact fp32
// softmax (forward_tc_kernel; the same contract, results within TF32 rounding). The backward
// runs on tensor cores too under the same conditions (backward_rows_tc_kernel and
// backward_cols_tc_kernel: dP, dQ, dK and dV on TF32, dS in fp32).
// With pol.bf16_attention (float, head dim 32, 64 or 128, any n) attention is the flash-
// attention form on bf16 tensor cores (mma.sync m16n8k16, fp32 sums, an online fp32 softmax;
// policy/cuda/attention_bf16.cuh): the forward keeps only each row's lse2 (log2-sum-exp2 of
// the scaled scores, in the first n floats of each probs block) and the CLS row when asked
// for; the backward (backward_rows_bf16_kernel, backward_cols_bf16_kernel) recomputes P from
// it and takes D = rowsum(dO o O) from the forward's output, so it needs `out`, and leaves D
// (not dS) in the scratch. Results within bf16 rounding.
// keep_probs false (inference) lets the tensor-core forwards skip writing P (or lse2).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <mma.h>

#include "dino/nn/attention.hpp"  // segment, attention_probs_elems, detail::probs_offsets
#include "dino/policy/cuda/attention_group.hpp"  // tile, threads, group<T>: shared with tests/emu
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

using nn::segment;

namespace detail::attn {

template <class T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    const T u = __shfl_xor_sync(full_mask, v, o);
    v = u > v ? u : v;
  }
  return v;
}
template <class T>
__device__ __forceinline__ T dev_exp(T x) {
  if constexpr (std::is_same_v<T, float>) return ::expf(x);
  else return ::exp(x);
}
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(full_mask, v, o);
  return v;
}

/// dst[r * stride + d] (=) src[(first + r) * ld + d] for r < 32, d < HD: zero past row n and,
/// when Padded, for d >= hd (src is never read there). Without Padded, hd is HD.
template <class T, int HD, bool Padded>
__device__ __forceinline__ void load_tile(T* dst, int stride, const T* src, std::int64_t ld, std::int64_t first,
                                          std::int64_t n, int hd) {
  for (int idx = threadIdx.x; idx < tile * HD; idx += threads) {
    const int r = idx / HD, d = idx % HD;
    const std::int64_t i = first + r;
    dst[r * stride + d] = i < n && (!Padded || d < hd) ? src[i * ld + d] : T(0);
  }
}

template <class T>
constexpr std::size_t forward_smem(int hd) {
  return sizeof(T) * std::size_t(tile * hd + tile * (hd + 1) + tile * ps);
}
template <class T>
constexpr std::size_t backward_rows_smem(int hd) {
  return forward_smem<T>(hd);
}
template <class T>
constexpr std::size_t backward_cols_smem(int hd) {
  return sizeof(T) * std::size_t(2 * tile * hd + 2 * tile * ps);
}

// grid: x = segment * tiles + query tile, y = head.
template <class T, int HD, bool Padded>
__global__ void __launch_bounds__(threads) forward_kernel(group<T> g) {
  constexpr int C = HD / 32, KS = HD + 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [32][HD]      query tile
  T* sK = sQ + tile * HD;                   // [32][HD + 1]  key tile, then value tile
  T* sP = sK + tile * KS;                   // [32][33]      normalised P of the key tile
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const std::int64_t seg = blockIdx.x / g.tiles, q0 = (blockIdx.x % g.tiles) * tile, h = blockIdx.y;
  const std::int64_t n = g.n, ld = 3 * g.D;
  const int hd = Padded ? int(g.hd) : HD;  // columns of the head; d in [hd, HD) is zero padding
  const T* Qb = g.qkv + (g.row0 + seg * n) * ld + h * hd;  // row i of Q: Qb + i*ld; K: + D; V: + 2D
  const T* Kb = Qb + g.D;
  const T* Vb = Qb + 2 * g.D;
  T* P = g.probs + g.poff0 + (seg * g.heads + h) * n * n;
  T* cls = g.cls ? g.cls + g.cls0 + (seg * g.heads + h) * n : nullptr;

  load_tile<T, HD, Padded>(sQ, HD, Qb, ld, q0, n, hd);

  // pass 1: scores s = (q . k) * scale into P, each row's max and non-finite flag
  T mx[rows_per_warp];
  bool bad[rows_per_warp];
#pragma unroll
  for (int r = 0; r < rows_per_warp; ++r) {
    mx[r] = -INFINITY;
    bad[r] = false;
  }
  for (std::int64_t k0 = 0; k0 < n; k0 += tile) {
    __syncthreads();  // the previous key tile (and, the first time, nothing) is no longer read
    load_tile<T, HD, Padded>(sK, KS, Kb, ld, k0, n, hd);
    __syncthreads();
    T s[rows_per_warp];
#pragma unroll
    for (int r = 0; r < rows_per_warp; ++r) s[r] = T(0);
    for (int d = 0; d < HD; ++d) {
      const T k = sK[lane * KS + d];
#pragma unroll
      for (int r = 0; r < rows_per_warp; ++r) s[r] += sQ[(w * rows_per_warp + r) * HD + d] * k;
    }
    const std::int64_t j = k0 + lane;
#pragma unroll
    for (int r = 0; r < rows_per_warp; ++r) {
      const std::int64_t i = q0 + w * rows_per_warp + r;
      if (i < n && j < n) {
        const T v = s[r] * g.scale;
        P[i * n + j] = v;
        bad[r] = bad[r] || !(v < T(INFINITY));
        mx[r] = v > mx[r] ? v : mx[r];
      }
    }
  }

  // pass 2: e = exp(s - max) in place, row sums (a warp per row; lane l keeps columns l + 32t,
  // the very elements it wrote in pass 1)
  T sum[rows_per_warp];
#pragma unroll
  for (int r = 0; r < rows_per_warp; ++r) {
    const std::int64_t i = q0 + w * rows_per_warp + r;  // the same for the whole warp
    const T m = warp_max(mx[r]);
    bad[r] = __any_sync(full_mask, bad[r]) || m == -T(INFINITY);
    T acc = T(0);
    if (i < n && !bad[r])
      for (std::int64_t j = lane; j < n; j += 32) {
        const T e = dev_exp(P[i * n + j] - m);
        P[i * n + j] = e;
        acc += e;
      }
    sum[r] = warp_sum(acc);
  }

  // pass 3: P = e / sum (written back, CLS row too), O = P V
  T o[rows_per_warp][C];
#pragma unroll
  for (int r = 0; r < rows_per_warp; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) o[r][c] = T(0);
  for (std::int64_t k0 = 0; k0 < n; k0 += tile) {
    __syncthreads();  // sK (keys or the previous values) and sP are no longer read
    load_tile<T, HD, Padded>(sK, KS, Vb, ld, k0, n, hd);
    const std::int64_t j = k0 + lane;
#pragma unroll
    for (int r = 0; r < rows_per_warp; ++r) {
      const std::int64_t i = q0 + w * rows_per_warp + r;
      T p = T(0);
      if (i < n && j < n) {
        p = bad[r] ? T(NAN) : P[i * n + j] / sum[r];
        P[i * n + j] = p;
        if (cls && i == 0) cls[j] = p;
      }
      sP[(w * rows_per_warp + r) * ps + lane] = p;
    }
    __syncthreads();
    const int kn = n - k0 < tile ? int(n - k0) : tile;
    for (int jj = 0; jj < kn; ++jj) {
      T v[C];
#pragma unroll
      for (int c = 0; c < C; ++c) v[c] = sK[jj * KS + lane + 32 * c];
#pragma unroll
      for (int r = 0; r < rows_per_warp; ++r) {
        const T p = sP[(w * rows_per_warp + r) * ps + jj];
#pragma unroll
        for (int c = 0; c < C; ++c) o[r][c] += p * v[c];
      }
    }
  }
  T* Ob = g.out + (g.row0 + seg * n) * g.D + h * hd;
#pragma unroll
  for (int r = 0; r < rows_per_warp; ++r) {
    const std::int64_t i = q0 + w * rows_per_warp + r;
    if (i < n)
#pragma unroll
      for (int c = 0; c < C; ++c)
        if (!Padded || lane + 32 * c < hd) Ob[i * g.D + lane + 32 * c] = o[r][c];
  }
}

// Backward over query rows. grid: x = segment * tiles + query tile, y = head.
// dP = dO V^T (into ds), dot_i = sum_j dP_ij P_ij, dS = P o (dP - dot) (in place), dQ = dS K * scale.
template <class T, int HD, bool Padded>
__global__ void __launch_bounds__(threads) backward_rows_kernel(group<T> g) {
  constexpr int C = HD / 32, KS = HD + 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);  // [32][HD]      dO tile
  T* sK = sA + tile * HD;                   // [32][HD + 1]  V tile, then K tile
  T* sS = sK + tile * KS;                   // [32][33]      dS of the key tile
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const std::int64_t seg = blockIdx.x / g.tiles, q0 = (blockIdx.x % g.tiles) * tile, h = blockIdx.y;
  const std::int64_t n = g.n, ld = 3 * g.D;
  const int hd = Padded ? int(g.hd) : HD;  // columns of the head; d in [hd, HD) is zero padding
  const std::int64_t first = g.row0 + seg * n;
  const T* Kb = g.qkv + first * ld + g.D + h * hd;
  const T* Vb = Kb + g.D;
  const T* dOb = g.dout + first * g.D + h * hd;
  const std::int64_t blk = g.poff0 + (seg * g.heads + h) * n * n;
  const T* P = g.probs + blk;
  T* S = g.ds + blk;

  load_tile<T, HD, Padded>(sA, HD, dOb, g.D, q0, n, hd);

  // pass 1: dP into S, dot_i = sum_j dP_ij P_ij
  T dot[rows_per_warp];
#pragma unroll
  for (int r = 0; r < rows_per_warp; ++r) dot[r] = T(0);
  for (std::int64_t k0 = 0; k0 < n; k0 += tile) {
    __syncthreads();
    load_tile<T, HD, Padded>(sK, KS, Vb, ld, k0, n, hd);
    __syncthreads();
    T s[rows_per_warp];
#pragma unroll
    for (int r = 0; r < rows_per_warp; ++r) s[r] = T(0);
    for (int d = 0; d < HD; ++d) {
      const T v = sK[lane * KS + d];
#pragma unroll
      for (int r = 0; r < rows_per_warp; ++r) s[r] += sA[(w * rows_per_warp + r) * HD + d] * v;
    }
    const std::int64_t j = k0 + lane;
#pragma unroll
    for (int r = 0; r < rows_per_warp; ++r) {
      const std::int64_t i = q0 + w * rows_per_warp + r;
      if (i < n && j < n) {
        S[i * n + j] = s[r];
        dot[r] += s[r] * P[i * n + j];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < rows_per_warp; ++r) dot[r] = warp_sum(dot[r]);

  // pass 2: dS = P (dP - dot) in place (the elements this thread wrote), dQ = dS K
  T acc[rows_per_warp][C];
#pragma unroll
  for (int r = 0; r < rows_per_warp; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = T(0);
  for (std::int64_t k0 = 0; k0 < n; k0 += tile) {
    __syncthreads();
    load_tile<T, HD, Padded>(sK, KS, Kb, ld, k0, n, hd);
    const std::int64_t j = k0 + lane;
#pragma unroll
    for (int r = 0; r < rows_per_warp; ++r) {
      const std::int64_t i = q0 + w * rows_per_warp + r;
      T ds = T(0);
      if (i < n && j < n) {
        ds = P[i * n + j] * (S[i * n + j] - dot[r]);
        S[i * n + j] = ds;
      }
      sS[(w * rows_per_warp + r) * ps + lane] = ds;
    }
    __syncthreads();
    const int kn = n - k0 < tile ? int(n - k0) : tile;
    for (int jj = 0; jj < kn; ++jj) {
      T k[C];
#pragma unroll
      for (int c = 0; c < C; ++c) k[c] = sK[jj * KS + lane + 32 * c];
#pragma unroll
      for (int r = 0; r < rows_per_warp; ++r) {
        const T ds = sS[(w * rows_per_warp + r) * ps + jj];
#pragma unroll
        for (int c = 0; c < C; ++c) acc[r][c] += ds * k[c];
      }
    }
  }
  T* dQb = g.dqkv + first * ld + h * hd;
#pragma unroll
  for (int r = 0; r < rows_per_warp; ++r) {
    const std::int64_t i = q0 + w * rows_per_warp + r;
    if (i < n)
#pragma unroll
      for (int c = 0; c < C; ++c)
        if (!Padded || lane + 32 * c < hd) dQb[i * ld + lane + 32 * c] = acc[r][c] * g.scale;
  }
}

// Backward over key rows. grid: x = segment * tiles + key tile, y = head.
// dK = dS^T Q * scale, dV = P^T dO; warp w owns keys 8w..8w+7 of the tile.
template <class T, int HD, bool Padded>
__global__ void __launch_bounds__(threads) backward_cols_kernel(group<T> g) {
  constexpr int C = HD / 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [32][HD]  Q tile (32 queries)
  T* sO = sQ + tile * HD;                   // [32][HD]  dO tile
  T* sS = sO + tile * HD;                   // [32][33]  dS[query][key]
  T* sP = sS + tile * ps;                   // [32][33]  P[query][key]
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const std::int64_t seg = blockIdx.x / g.tiles, k0 = (blockIdx.x % g.tiles) * tile, h = blockIdx.y;
  const std::int64_t n = g.n, ld = 3 * g.D;
  const int hd = Padded ? int(g.hd) : HD;  // columns of the head; d in [hd, HD) is zero padding
  const std::int64_t first = g.row0 + seg * n;
  const T* Qb = g.qkv + first * ld + h * hd;
  const T* dOb = g.dout + first * g.D + h * hd;
  const std::int64_t blk = g.poff0 + (seg * g.heads + h) * n * n;
  const T* P = g.probs + blk;
  const T* S = g.ds + blk;

  T ak[rows_per_warp][C], av[rows_per_warp][C];
#pragma unroll
  for (int r = 0; r < rows_per_warp; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) ak[r][c] = av[r][c] = T(0);
  for (std::int64_t q0 = 0; q0 < n; q0 += tile) {
    __syncthreads();
    load_tile<T, HD, Padded>(sQ, HD, Qb, ld, q0, n, hd);
    load_tile<T, HD, Padded>(sO, HD, dOb, g.D, q0, n, hd);
    for (int idx = threadIdx.x; idx < tile * tile; idx += threads) {
      const int a = idx / tile, b = idx % tile;  // a: query of the tile, b: key of the tile
      const std::int64_t i = q0 + a, j = k0 + b;
      const bool in = i < n && j < n;
      sS[a * ps + b] = in ? S[i * n + j] : T(0);
      sP[a * ps + b] = in ? P[i * n + j] : T(0);
    }
    __syncthreads();
    const int qn = n - q0 < tile ? int(n - q0) : tile;
    for (int ii = 0; ii < qn; ++ii) {
      T q[C], d[C];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        q[c] = sQ[ii * HD + lane + 32 * c];
        d[c] = sO[ii * HD + lane + 32 * c];
      }
#pragma unroll
      for (int r = 0; r < rows_per_warp; ++r) {
        const T ds = sS[ii * ps + w * rows_per_warp + r], p = sP[ii * ps + w * rows_per_warp + r];
#pragma unroll
        for (int c = 0; c < C; ++c) {
          ak[r][c] += ds * q[c];
          av[r][c] += p * d[c];
        }
      }
    }
  }
  T* dKb = g.dqkv + first * ld + g.D + h * hd;
  T* dVb = dKb + g.D;
#pragma unroll
  for (int r = 0; r < rows_per_warp; ++r) {
    const std::int64_t j = k0 + w * rows_per_warp + r;
    if (j < n)
#pragma unroll
      for (int c = 0; c < C; ++c)
        if (!Padded || lane + 32 * c < hd) {
          dKb[j * ld + lane + 32 * c] = ak[r][c] * g.scale;
          dVb[j * ld + lane + 32 * c] = av[r][c];
        }
  }
}

// ---- TF32 tensor-core forward (float, head dim 32, 64 or 128, n <= tc::max_n, pol.tf32) ----
// One block of 4 warps per (segment, head, 64 queries); warp w owns queries 16w..16w+15 of
// the tile. Its Q rows stay in registers as TF32 fragments; S = Q K^T for the whole segment
// goes to the warp's rows of shared memory one 16-key tile at a time (wmma m16n16k8, fp32
// accumulation); the softmax is exact (max, exp, sum over the row, as the fp32 kernel) and
// writes P (and the CLS row); O = P V accumulates in fp32 fragments over 8-key steps. Keys
// and values are staged 64 rows at a time (few block-wide synchronisations per segment)
// with zeros past n; padded query rows and key columns hold zeros, so they add nothing.
namespace tc {
inline constexpr int qrows = 64;    ///< queries per block
inline constexpr int kt = 16;       ///< keys per wmma tile (S columns are padded to a multiple)
inline constexpr int ks = 64;       ///< keys per staged tile
inline constexpr int max_n = 256;   ///< longest segment on this path (S rows in shared memory)
constexpr int ld_kv(int hd) { return hd + 4; }
inline int ld_s(std::int64_t n) { return int((n + kt - 1) / kt * kt) + 4; }
/// Floats of a warp's region: its S rows, later its O staging (16 rows of ld_kv).
inline int warp_floats(std::int64_t n, int hd) { return 16 * std::max(ld_s(n), ld_kv(hd)); }
inline std::size_t smem_bytes(std::int64_t n, int hd) {
  return sizeof(float) * std::size_t(ks * ld_kv(hd) + warps * warp_floats(n, hd));
}
namespace frags {  // the wmma m16n16k8 TF32 fragments of the kernels (a, b row- or column-major)
namespace wmma = nvcuda::wmma;
using frag_a = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using frag_ac = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using frag_bc = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using frag_br = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using frag_acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
}  // namespace frags
}  // namespace tc

// rows [first, first + rows) of a head's columns of src (row stride ld) into dst (row stride
// stride), zeros at and past row n; float4 when vec (decided on the host).
template <int HD>
__device__ __forceinline__ void tc_stage(float* dst, int stride, const float* src, std::int64_t ld, std::int64_t first,
                                         int rows, std::int64_t n, bool vec) {
  if (vec) {
    constexpr int V4 = HD / 4;
    for (int idx = threadIdx.x; idx < rows * V4; idx += threads) {
      const int r = idx / V4, d = (idx % V4) * 4;
      const std::int64_t i = first + r;
      const float4 v = i < n ? *reinterpret_cast<const float4*>(src + i * ld + d) : make_float4(0.f, 0.f, 0.f, 0.f);
      *reinterpret_cast<float4*>(dst + r * stride + d) = v;
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * HD; idx += threads) {
      const int r = idx / HD, d = idx % HD;
      const std::int64_t i = first + r;
      dst[r * stride + d] = i < n ? src[i * ld + d] : 0.0f;
    }
  }
}

template <class Frag>
__device__ __forceinline__ void tc_round(Frag& f) {
#pragma unroll
  for (int t = 0; t < f.num_elements; ++t) f.x[t] = nvcuda::wmma::__float_to_tf32(f.x[t]);
}

template <int HD>
__global__ void __launch_bounds__(threads) forward_tc_kernel(group<float> g, int lds, int wfl, bool vec, bool keep) {
  using namespace nvcuda;
  using namespace tc::frags;
  constexpr int LK = tc::ld_kv(HD), F = HD / 8, OC = HD / 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* sKV = reinterpret_cast<float*>(smem_raw);  // [64][LK]  key tile, then value tile
  float* sW = sKV + tc::ks * LK;                     // warps x wfl: Q staging first, then S / O rows
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const std::int64_t seg = blockIdx.x / g.tiles, q0 = (blockIdx.x % g.tiles) * tc::qrows, h = blockIdx.y;
  const std::int64_t n = g.n, ld = 3 * g.D;
  const float* Qb = g.qkv + (g.row0 + seg * n) * ld + h * HD;
  const float* Kb = Qb + g.D;
  const float* Vb = Qb + 2 * g.D;
  float* P = g.probs + g.poff0 + (seg * g.heads + h) * n * n;
  float* cls = g.cls ? g.cls + g.cls0 + (seg * g.heads + h) * n : nullptr;
  tc_stage<HD>(sW, LK, Qb, ld, q0, tc::qrows, n, vec);  // [64][LK] across the warps' regions (64 * LK <= 4 * wfl)
  __syncthreads();
  frag_a qf[F];
#pragma unroll
  for (int f = 0; f < F; ++f) {
    wmma::load_matrix_sync(qf[f], sW + (w * 16) * LK + f * 8, LK);
    tc_round(qf[f]);
  }
  float* Sw = sW + w * wfl;  // this warp's S rows [16][lds]
  const int npad = int((n + tc::kt - 1) / tc::kt) * tc::kt;  // S columns: keys padded to 16
  const int nst = int((n + tc::ks - 1) / tc::ks);             // staged tiles of 64 keys
  for (int kb = 0; kb < nst; ++kb) {
    __syncthreads();  // Q staging read (first time), previous key tile read
    tc_stage<HD>(sKV, LK, Kb, ld, std::int64_t(kb) * tc::ks, tc::ks, n, vec);
    __syncthreads();
    for (int sub = 0; sub < tc::ks / tc::kt && kb * tc::ks + sub * tc::kt < npad; ++sub) {
      frag_acc acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int f = 0; f < F; ++f) {
        frag_bc kf;  // K^T: element (d, j) at sKV[(16 sub + j) * LK + d]
        wmma::load_matrix_sync(kf, sKV + sub * tc::kt * LK + f * 8, LK);
        tc_round(kf);
        wmma::mma_sync(acc, qf[f], kf, acc);
      }
      wmma::store_matrix_sync(Sw + kb * tc::ks + sub * tc::kt, acc, lds, wmma::mem_row_major);
    }
  }
  __syncwarp();
  // softmax of the warp's 16 rows (lanes over columns); padded rows and columns become 0
  for (int r = 0; r < 16; ++r) {
    const std::int64_t i = q0 + w * 16 + r;
    float* row = Sw + r * lds;
    if (i >= n) {
      for (int j = lane; j < npad; j += 32) row[j] = 0.0f;
      continue;
    }
    float m = -INFINITY;
    bool bad = false;
    for (int j = lane; j < n; j += 32) {
      const float v = row[j] * g.scale;
      row[j] = v;
      bad = bad || !(v < INFINITY);
      m = v > m ? v : m;
    }
    m = warp_max(m);
    bad = __any_sync(full_mask, bad) || m == -INFINITY;
    float sum = 0.0f;
    for (int j = lane; j < n; j += 32) {
      const float e = bad ? 0.0f : ::expf(row[j] - m);
      row[j] = e;
      sum += e;
    }
    sum = warp_sum(sum);
    for (int j = lane; j < npad; j += 32) {
      float p = 0.0f;
      if (j < n) {
        p = bad ? NAN : row[j] / sum;
        if (keep) P[i * n + j] = p;
        if (cls && i == 0) cls[j] = p;
      }
      row[j] = p;
    }
  }
  __syncwarp();
  // O = P V
  frag_acc o[OC];
#pragma unroll
  for (int c = 0; c < OC; ++c) wmma::fill_fragment(o[c], 0.0f);
  for (int kb = 0; kb < nst; ++kb) {
    __syncthreads();  // previous value (or key) tile read
    tc_stage<HD>(sKV, LK, Vb, ld, std::int64_t(kb) * tc::ks, tc::ks, n, vec);
    __syncthreads();
    for (int kk = 0; kk < tc::ks / 8 && kb * tc::ks + kk * 8 < npad; ++kk) {
      frag_a pf;
      wmma::load_matrix_sync(pf, Sw + kb * tc::ks + kk * 8, lds);
      tc_round(pf);
#pragma unroll
      for (int c = 0; c < OC; ++c) {
        frag_br vf;  // V rows kk*8.., columns c*16..
        wmma::load_matrix_sync(vf, sKV + kk * 8 * LK + c * 16, LK);
        tc_round(vf);
        wmma::mma_sync(o[c], pf, vf, o[c]);
      }
    }
  }
  __syncwarp();  // the warp's P rows are read: its region takes O
#pragma unroll
  for (int c = 0; c < OC; ++c) wmma::store_matrix_sync(Sw + c * 16, o[c], LK, wmma::mem_row_major);
  __syncwarp();
  float* Ob = g.out + (g.row0 + seg * n) * g.D + h * HD;
  for (int idx = lane; idx < 16 * HD; idx += 32) {
    const int r = idx / HD, d = idx % HD;
    const std::int64_t i = q0 + w * 16 + r;
    if (i < n) Ob[i * g.D + d] = Sw[r * LK + d];
  }
}

// ---- TF32 tensor-core backward (the same conditions as the forward) ----
// rows:    one block of 4 warps per (segment, head, 64 queries), as the forward: dP = dO V^T
//          into the warp's rows of shared memory (16-key wmma tiles), dot_i = sum_j dP_ij P_ij
//          and dS = P o (dP - dot) in fp32 (written to the dS scratch, as the fp32 kernel),
//          then dQ = dS K * scale.
// columns: one block per (segment, head, 64 keys); warp w owns keys 16w..16w+15. For each 64
//          queries, Q, dO and the [64 x 64] blocks of dS and P are staged; dK += dS^T Q and
//          dV += P^T dO on tensor cores (dS^T and P^T read as column-major fragments).
namespace tc {
constexpr int ld_blk = ks + 4;  ///< row stride of a staged [64 x 64] block of dS or P
inline std::size_t cols_smem_bytes(int hd) {
  return sizeof(float) * std::size_t(2 * ks * ld_kv(hd) + 2 * ks * ld_blk);
}
}  // namespace tc

template <int HD>
__global__ void __launch_bounds__(threads) backward_rows_tc_kernel(group<float> g, int lds, int wfl, bool vec) {
  using namespace nvcuda;
  using namespace tc::frags;
  constexpr int LK = tc::ld_kv(HD), F = HD / 8, OC = HD / 16;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* sKV = reinterpret_cast<float*>(smem_raw);  // [64][LK]  V tile, then K tile
  float* sW = sKV + tc::ks * LK;                     // warps x wfl: dO staging, then dP / dS rows, then dQ
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const std::int64_t seg = blockIdx.x / g.tiles, q0 = (blockIdx.x % g.tiles) * tc::qrows, h = blockIdx.y;
  const std::int64_t n = g.n, ld = 3 * g.D, first = g.row0 + seg * n;
  const float* Kb = g.qkv + first * ld + g.D + h * HD;
  const float* Vb = Kb + g.D;
  const float* dOb = g.dout + first * g.D + h * HD;
  const std::int64_t blk = g.poff0 + (seg * g.heads + h) * n * n;
  const float* P = g.probs + blk;
  float* S = g.ds + blk;

  tc_stage<HD>(sW, LK, dOb, g.D, q0, tc::qrows, n, vec);
  __syncthreads();
  frag_a af[F];
#pragma unroll
  for (int f = 0; f < F; ++f) {
    wmma::load_matrix_sync(af[f], sW + (w * 16) * LK + f * 8, LK);
    tc_round(af[f]);
  }
  float* Sw = sW + w * wfl;
  const int npad = int((n + tc::kt - 1) / tc::kt) * tc::kt;
  const int nst = int((n + tc::ks - 1) / tc::ks);
  for (int kb = 0; kb < nst; ++kb) {  // dP = dO V^T
    __syncthreads();
    tc_stage<HD>(sKV, LK, Vb, ld, std::int64_t(kb) * tc::ks, tc::ks, n, vec);
    __syncthreads();
    for (int sub = 0; sub < tc::ks / tc::kt && kb * tc::ks + sub * tc::kt < npad; ++sub) {
      frag_acc acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int f = 0; f < F; ++f) {
        frag_bc vf;
        wmma::load_matrix_sync(vf, sKV + sub * tc::kt * LK + f * 8, LK);
        tc_round(vf);
        wmma::mma_sync(acc, af[f], vf, acc);
      }
      wmma::store_matrix_sync(Sw + kb * tc::ks + sub * tc::kt, acc, lds, wmma::mem_row_major);
    }
  }
  __syncwarp();
  for (int r = 0; r < 16; ++r) {  // dS = P o (dP - rowsum(dP o P)), into S and the warp's rows
    const std::int64_t i = q0 + w * 16 + r;
    float* row = Sw + r * lds;
    if (i >= n) {
      for (int j = lane; j < npad; j += 32) row[j] = 0.0f;
      continue;
    }
    float dot = 0.0f;
    for (int j = lane; j < n; j += 32) dot += row[j] * P[i * n + j];
    dot = warp_sum(dot);
    for (int j = lane; j < npad; j += 32) {
      float ds = 0.0f;
      if (j < n) {
        ds = P[i * n + j] * (row[j] - dot);
        S[i * n + j] = ds;
      }
      row[j] = ds;
    }
  }
  __syncwarp();
  frag_acc dq[OC];  // dQ = dS K
#pragma unroll
  for (int c = 0; c < OC; ++c) wmma::fill_fragment(dq[c], 0.0f);
  for (int kb = 0; kb < nst; ++kb) {
    __syncthreads();
    tc_stage<HD>(sKV, LK, Kb, ld, std::int64_t(kb) * tc::ks, tc::ks, n, vec);
    __syncthreads();
    for (int kk = 0; kk < tc::ks / 8 && kb * tc::ks + kk * 8 < npad; ++kk) {
      frag_a sf;
      wmma::load_matrix_sync(sf, Sw + kb * tc::ks + kk * 8, lds);
      tc_round(sf);
#pragma unroll
      for (int c = 0; c < OC; ++c) {
        frag_br kf;
        wmma::load_matrix_sync(kf, sKV + kk * 8 * LK + c * 16, LK);
        tc_round(kf);
        wmma::mma_sync(dq[c], sf, kf, dq[c]);
      }
    }
  }
  __syncwarp();
#pragma unroll
  for (int c = 0; c < OC; ++c) wmma::store_matrix_sync(Sw + c * 16, dq[c], LK, wmma::mem_row_major);
  __syncwarp();
  float* dQb = g.dqkv + first * ld + h * HD;
  for (int idx = lane; idx < 16 * HD; idx += 32) {
    const int r = idx / HD, d = idx % HD;
    const std::int64_t i = q0 + w * 16 + r;
    if (i < n) dQb[i * ld + d] = Sw[r * LK + d] * g.scale;
  }
}

template <int HD>
__global__ void __launch_bounds__(threads) backward_cols_tc_kernel(group<float> g, bool vec) {
  using namespace nvcuda;
  using namespace tc::frags;
  constexpr int LK = tc::ld_kv(HD), OC = HD / 16, LP = tc::ld_blk;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* sQ = reinterpret_cast<float*>(smem_raw);  // [64][LK] queries of the stage
  float* sO = sQ + tc::ks * LK;                     // [64][LK] their dO
  float* sS = sO + tc::ks * LK;                     // [64 queries][LP] dS of the block's keys
  float* sP = sS + tc::ks * LP;                     // [64 queries][LP] P
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const std::int64_t seg = blockIdx.x / g.tiles, k0 = (blockIdx.x % g.tiles) * tc::ks, h = blockIdx.y;
  const std::int64_t n = g.n, ld = 3 * g.D, first = g.row0 + seg * n;
  const float* Qb = g.qkv + first * ld + h * HD;
  const float* dOb = g.dout + first * g.D + h * HD;
  const std::int64_t blk = g.poff0 + (seg * g.heads + h) * n * n;
  const float* P = g.probs + blk;
  const float* S = g.ds + blk;
  frag_acc dk[OC], dv[OC];
#pragma unroll
  for (int c = 0; c < OC; ++c) {
    wmma::fill_fragment(dk[c], 0.0f);
    wmma::fill_fragment(dv[c], 0.0f);
  }
  const int nq = int((n + tc::ks - 1) / tc::ks);
  for (int qs = 0; qs < nq; ++qs) {
    const std::int64_t i0 = std::int64_t(qs) * tc::ks;
    __syncthreads();
    tc_stage<HD>(sQ, LK, Qb, ld, i0, tc::ks, n, vec);
    tc_stage<HD>(sO, LK, dOb, g.D, i0, tc::ks, n, vec);
    for (int idx = threadIdx.x; idx < tc::ks * tc::ks; idx += threads) {
      const int r = idx / tc::ks, c = idx % tc::ks;
      const std::int64_t i = i0 + r, j = k0 + c;
      const bool in = i < n && j < n;
      sS[r * LP + c] = in ? S[i * n + j] : 0.0f;
      sP[r * LP + c] = in ? P[i * n + j] : 0.0f;
    }
    __syncthreads();
    for (int kk = 0; kk < tc::ks / 8 && i0 + kk * 8 < n; ++kk) {
      frag_ac sf, pf;  // (key r, query c) at [(8 kk + c) * LP + 16 w + r]
      wmma::load_matrix_sync(sf, sS + kk * 8 * LP + w * 16, LP);
      wmma::load_matrix_sync(pf, sP + kk * 8 * LP + w * 16, LP);
      tc_round(sf);
      tc_round(pf);
#pragma unroll
      for (int c = 0; c < OC; ++c) {
        frag_br qf, of;
        wmma::load_matrix_sync(qf, sQ + kk * 8 * LK + c * 16, LK);
        wmma::load_matrix_sync(of, sO + kk * 8 * LK + c * 16, LK);
        tc_round(qf);
        tc_round(of);
        wmma::mma_sync(dk[c], sf, qf, dk[c]);
        wmma::mma_sync(dv[c], pf, of, dv[c]);
      }
    }
  }
  __syncthreads();  // the staged tiles are read: warp w's 16 rows of sQ and sO take dK and dV
  float* kst = sQ + w * 16 * LK;
  float* vst = sO + w * 16 * LK;
#pragma unroll
  for (int c = 0; c < OC; ++c) {
    wmma::store_matrix_sync(kst + c * 16, dk[c], LK, wmma::mem_row_major);
    wmma::store_matrix_sync(vst + c * 16, dv[c], LK, wmma::mem_row_major);
  }
  __syncwarp();
  float* dKb = g.dqkv + first * ld + g.D + h * HD;
  float* dVb = dKb + g.D;
  for (int idx = lane; idx < 16 * HD; idx += 32) {
    const int r = idx / HD, d = idx % HD;
    const std::int64_t j = k0 + w * 16 + r;
    if (j < n) {
      dKb[j * ld + d] = kst[r * LK + d] * g.scale;
      dVb[j * ld + d] = vst[r * LK + d];
    }
  }
}

}  // namespace detail::attn
}  // namespace dino::cuda

#include "dino/policy/cuda/attention_bf16.cuh"  // forward_bf16_kernel (pol.bf16_attention)

namespace dino::cuda {
namespace detail::attn {

/// Launches kernel(g, args...) over a group's (segment, tile) x head grid with `smem` bytes of
/// dynamic shared memory (opting in above the 48 KiB default).
template <class T, class K, class... Args>
inline void launch(const cuda_policy& pol, K kernel, const group<T>& g, std::int64_t count, std::size_t smem,
                   const char* name, Args... args) {
  const std::int64_t blocks = count * g.tiles;
  require<shape_error>(blocks <= 0x7fffffffLL && g.heads <= 65535, name, ": too many blocks (", blocks, " x ", g.heads,
                       ")");
  if (smem > 48 * 1024)
    DINO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<dim3(unsigned(blocks), unsigned(g.heads)), threads, smem, pol.stream>>>(g, args...);
  DINO_CUDA_LAUNCHED(name);
}

/// Checks the arguments shared by forward and backward; returns head_dim.
inline std::int64_t check_args(const char* name, std::int64_t heads, std::int64_t D, const std::vector<segment>& segs,
                               const std::vector<std::size_t>& poff) {
  require<shape_error>(heads > 0 && D > 0 && D % heads == 0, name, ": embed dim ", D, " is not a multiple of heads ",
                       heads);
  const std::int64_t hd = D / heads;
  require<shape_error>(hd <= 128, name, ": head dim ", hd, " is not supported on the GPU (1 to 128)");
  require<shape_error>(poff.size() >= segs.size(), name, ": ", poff.size(), " probs offsets for ", segs.size(),
                       " segments");
  for (const auto& s : segs)
    require<shape_error>(s.length >= 0 && s.offset >= 0, name, ": segment at ", s.offset, " of length ", s.length);
  return hd;
}

/// Calls f(HD, Padded) (std::integral_constant values) for head dim hd in 1..128: HD is the
/// smallest of 32, 64, 128 that is >= hd, Padded is hd != HD.
template <class F>
inline void with_head_dim(std::int64_t hd, F&& f) {
  using std::integral_constant;
  using exact = integral_constant<bool, false>;
  using padded = integral_constant<bool, true>;
  if (hd == 32) f(integral_constant<int, 32>{}, exact{});
  else if (hd == 64) f(integral_constant<int, 64>{}, exact{});
  else if (hd == 128) f(integral_constant<int, 128>{}, exact{});
  else if (hd < 32) f(integral_constant<int, 32>{}, padded{});
  else if (hd < 64) f(integral_constant<int, 64>{}, padded{});
  else f(integral_constant<int, 128>{}, padded{});
}

/// Whether attention over float tensors with head dim hd takes the bf16 kernels.
template <class T>
inline bool bf16_path(const cuda_policy& pol, std::int64_t hd) {
  return std::is_same_v<T, float> && pol.bf16_attention && (hd == 32 || hd == 64 || hd == 128);
}

template <class T, int HD, bool Padded>
inline void forward_hd(const cuda_policy& pol, group<T> g, const std::vector<segment>& segs,
                       const std::vector<std::size_t>& poff, const std::int64_t* cls_offsets, bool keep) {
  const bool rows = bf16_path<T>(pol, g.hd);
  for_each_group(g.heads, segs, poff, g.cls ? cls_offsets : nullptr, rows, [&](std::size_t a, std::int64_t count,
                                                                                std::int64_t pstride) {
    g.n = segs[a].length;
    g.row0 = segs[a].offset;
    g.poff0 = static_cast<std::int64_t>(poff[a]);
    g.pstride = pstride;
    g.cls0 = g.cls ? cls_offsets[a] : 0;
    if constexpr (std::is_same_v<T, float> && !Padded) {
      const bool vec = reinterpret_cast<std::uintptr_t>(g.qkv) % 16 == 0 && g.D % 4 == 0;
      if (rows) {  // bf16 tensor cores, online softmax (see forward_bf16_kernel)
        g.tiles = (g.n + bf::qrows - 1) / bf::qrows;
        launch(pol, forward_bf16_kernel<HD>, g, count, bf::smem_bytes(HD), "attention_forward (bf16 tensor cores)",
               keep, vec);
        return;
      }
      if (pol.tensor_core_attention() && g.n <= tc::max_n) {  // TF32 tensor cores (see forward_tc_kernel)
        g.tiles = (g.n + tc::qrows - 1) / tc::qrows;
        launch(pol, forward_tc_kernel<HD>, g, count, tc::smem_bytes(g.n, HD), "attention_forward (TF32 tensor cores)",
               tc::ld_s(g.n), tc::warp_floats(g.n, HD), vec, keep);
        return;
      }
    }
    g.tiles = (g.n + tile - 1) / tile;
    launch(pol, forward_kernel<T, HD, Padded>, g, count, forward_smem<T>(HD), "attention_forward");
  });
}

template <class T, int HD, bool Padded>
inline void backward_hd(const cuda_policy& pol, group<T> g, const std::vector<segment>& segs,
                        const std::vector<std::size_t>& poff) {
  const bool rows = bf16_path<T>(pol, g.hd);
  for_each_group(g.heads, segs, poff, nullptr, rows, [&](std::size_t a, std::int64_t count, std::int64_t pstride) {
    g.n = segs[a].length;
    g.row0 = segs[a].offset;
    g.poff0 = static_cast<std::int64_t>(poff[a]);
    g.pstride = pstride;
    g.cls0 = 0;
    if constexpr (std::is_same_v<T, float> && !Padded) {
      const bool vec = reinterpret_cast<std::uintptr_t>(g.qkv) % 16 == 0 &&
                       reinterpret_cast<std::uintptr_t>(g.dout) % 16 == 0 && g.D % 4 == 0;
      if (rows) {  // bf16 tensor cores (see backward_rows_bf16_kernel)
        g.tiles = (g.n + bf::qrows - 1) / bf::qrows;  // 64 queries, then 64 keys, per block
        launch(pol, backward_rows_bf16_kernel<HD>, g, count, bf::rows_smem_bytes(HD),
               "attention_backward (rows, bf16 tensor cores)", vec);
        launch(pol, backward_cols_bf16_kernel<HD>, g, count, bf::cols_smem_bytes(HD),
               "attention_backward (columns, bf16 tensor cores)", vec);
        return;
      }
      if (pol.tensor_core_attention() && g.n <= tc::max_n) {  // TF32 tensor cores (see backward_rows_tc_kernel)
        g.tiles = (g.n + tc::qrows - 1) / tc::qrows;  // 64 queries, then 64 keys, per block
        launch(pol, backward_rows_tc_kernel<HD>, g, count, tc::smem_bytes(g.n, HD),
               "attention_backward (rows, TF32 tensor cores)", tc::ld_s(g.n), tc::warp_floats(g.n, HD), vec);
        launch(pol, backward_cols_tc_kernel<HD>, g, count, tc::cols_smem_bytes(HD),
               "attention_backward (columns, TF32 tensor cores)", vec);
        return;
      }
    }
    g.tiles = (g.n + tile - 1) / tile;
    launch(pol, backward_rows_kernel<T, HD, Padded>, g, count, backward_rows_smem<T>(HD), "attention_backward (rows)");
    launch(pol, backward_cols_kernel<T, HD, Padded>, g, count, backward_cols_smem<T>(HD), "attention_backward (columns)");
  });
}

}  // namespace detail::attn

/// out [T, D] (=) attention of qkv [T, 3D]; probs receives every P. cls_attn, when non-null,
/// receives P[0, :] per segment and head at cls_offsets[segment] (host memory) + h*n.
/// keep_probs false (inference): probs is scratch, and the tensor-core paths leave it alone.
template <class T>
inline void attention_forward(const cuda_policy& pol, std::int64_t heads, std::int64_t D, const std::vector<segment>& segs,
                              const std::vector<std::size_t>& poff, const T* qkv, T* out, T* probs, T* cls_attn = nullptr,
                              const std::int64_t* cls_offsets = nullptr, bool keep_probs = true) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "attention_forward (CUDA): float or double");
  namespace a = detail::attn;
  const std::int64_t hd = a::check_args("attention_forward", heads, D, segs, poff);
  require<shape_error>(cls_attn == nullptr || cls_offsets != nullptr,
                       "attention_forward: cls_attn needs cls_offsets (host memory)");
  require<shape_error>(segs.empty() || (qkv && out && probs), "attention_forward: qkv, out and probs are required");
  if (!a::bf16_path<T>(pol, hd)) nn::detail::check_matrix_room("attention_forward", heads, segs, poff);
  a::group<T> g{qkv, nullptr, out, probs, cls_attn, nullptr, nullptr, D, heads, hd, 0, 0, 0, 0, 0,
                T(1.0 / std::sqrt(double(hd)))};
  a::with_head_dim(hd, [&](auto HD, auto padded) {
    a::forward_hd<T, decltype(HD)::value, decltype(padded)::value>(pol, g, segs, poff, cls_offsets, keep_probs);
  });
}

/// dqkv [T, 3D] (=) from dout [T, D] with what attention_forward kept in probs (P, or the
/// rows' lse2 on the bf16 path: call both with the same bf16_attention). scratch: probs_elems.
/// out: the forward's output, which the bf16 path needs (D = rowsum(dout o out)); the other
/// paths ignore it.
template <class T>
inline void attention_backward(const cuda_policy& pol, std::int64_t heads, std::int64_t D, const std::vector<segment>& segs,
                               const std::vector<std::size_t>& poff, const T* qkv, const T* probs, const T* dout, T* dqkv,
                               T* scratch, const T* out = nullptr) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "attention_backward (CUDA): float or double");
  namespace a = detail::attn;
  const std::int64_t hd = a::check_args("attention_backward", heads, D, segs, poff);
  require<shape_error>(segs.empty() || (qkv && probs && dout && dqkv && scratch),
                       "attention_backward: qkv, probs, dout, dqkv and scratch are required");
  require<shape_error>(segs.empty() || out || !a::bf16_path<T>(pol, hd),
                       "attention_backward: the bf16 attention path needs the forward's output (out)");
  if (!a::bf16_path<T>(pol, hd)) nn::detail::check_matrix_room("attention_backward", heads, segs, poff);
  a::group<T> g{qkv, dout, const_cast<T*>(out), const_cast<T*>(probs), nullptr, dqkv, scratch, D, heads, hd, 0, 0, 0, 0,
                0, T(1.0 / std::sqrt(double(hd)))};
  a::with_head_dim(hd, [&](auto HD, auto padded) {
    a::backward_hd<T, decltype(HD)::value, decltype(padded)::value>(pol, g, segs, poff);
  });
}

}  // namespace dino::cuda

namespace dino {
/// What this policy's attention keeps for the backward (nn/attention.hpp): rows on the bf16
/// path (float tensors, head dims 32, 64, 128, pol.bf16_attention), else matrix. In namespace
/// dino, where cuda_policy is, so that nn code finds it by argument-dependent lookup.
template <class T>
inline nn::attention_store attention_store_for(const cuda_policy& pol, std::int64_t head_dim) {
  return cuda::detail::attn::bf16_path<T>(pol, head_dim) ? nn::attention_store::rows : nn::attention_store::matrix;
}
}  // namespace dino

namespace dino::nn {
// Found from nn code (vit.hpp calls attention_forward(pol, ...) unqualified) by argument-
// dependent lookup at instantiation: segs is a std::vector<nn::segment>.
using cuda::attention_backward;
using cuda::attention_forward;
}  // namespace dino::nn
