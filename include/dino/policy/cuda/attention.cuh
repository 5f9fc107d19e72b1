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
// launches.
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
// The arithmetic is plain fp32 (double) FMA; a later bf16 flash-attention replaces this.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "dino/nn/attention.hpp"  // segment, attention_probs_elems, detail::probs_offsets
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

using nn::segment;

namespace detail::attn {

inline constexpr int tile = 32;                        ///< rows of a query tile = keys of a key tile
inline constexpr int warps = 4;                        ///< warps per block
inline constexpr int threads = warps * 32;             ///< threads per block
inline constexpr int rows_per_warp = tile / warps;     ///< rows of a tile each warp owns
inline constexpr int ps = tile + 1;                    ///< padded row stride of a [32, 32] shared tile
inline constexpr unsigned full_mask = 0xffffffffu;

/// One launch: `count` segments of n tokens whose offsets advance regularly (see header).
template <class T>
struct group {
  const T* qkv;        ///< [T, 3D]
  const T* dout;       ///< [T, D] (backward)
  T* out;              ///< [T, D] (forward)
  T* probs;            ///< P blocks
  T* cls;              ///< CLS rows or null (forward)
  T* dqkv;             ///< [T, 3D] (backward)
  T* ds;               ///< dS blocks, laid out as probs (backward scratch)
  std::int64_t D;      ///< model width: qkv rows hold 3D, out/dout rows D
  std::int64_t heads;  ///< heads; head h covers columns [h*hd, (h+1)*hd) of each third
  std::int64_t hd;     ///< head dim D / heads (1..128); the kernels' HD is the padded width >= hd
  std::int64_t n;      ///< tokens per segment
  std::int64_t row0;   ///< first token of the group's first segment (segment s: row0 + s*n)
  std::int64_t poff0;  ///< probs offset of the first segment (segment s: + s*heads*n*n)
  std::int64_t cls0;   ///< CLS offset of the first segment (segment s: + s*heads*n)
  std::int64_t tiles;  ///< 32-row tiles per segment: ceil(n / 32)
  T scale;             ///< hd^-0.5
};

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

/// Launches kernel over a group's (segment, tile) x head grid with `smem` bytes of dynamic
/// shared memory (opting in above the 48 KiB default).
template <class T, class K>
inline void launch(const cuda_policy& pol, K kernel, const group<T>& g, std::int64_t count, std::size_t smem,
                   const char* name) {
  const std::int64_t blocks = count * g.tiles;
  require<shape_error>(blocks <= 0x7fffffffLL && g.heads <= 65535, name, ": too many blocks (", blocks, " x ", g.heads,
                       ")");
  if (smem > 48 * 1024)
    DINO_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<dim3(unsigned(blocks), unsigned(g.heads)), threads, smem, pol.stream>>>(g);
  DINO_CUDA_LAUNCHED(name);
}

/// Calls f(first, count) for each run of consecutive segments that one launch can take:
/// equal length n > 0, token offsets advancing by n, probs offsets by heads*n*n and (when
/// cls_offsets is given) CLS offsets by heads*n. Empty segments are skipped.
template <class F>
inline void for_each_group(std::int64_t heads, const std::vector<segment>& segs, const std::vector<std::size_t>& poff,
                           const std::int64_t* cls_offsets, F&& f) {
  const std::size_t ns = segs.size();
  std::size_t a = 0;
  while (a < ns) {
    const std::int64_t n = segs[a].length;
    if (n == 0) {
      ++a;
      continue;
    }
    std::size_t b = a + 1;
    for (; b < ns; ++b) {
      const std::int64_t k = static_cast<std::int64_t>(b - a);
      if (segs[b].length != n || segs[b].offset != segs[a].offset + k * n) break;
      if (poff[b] != poff[a] + static_cast<std::size_t>(k * heads * n * n)) break;
      if (cls_offsets && cls_offsets[b] != cls_offsets[a] + k * heads * n) break;
    }
    f(a, static_cast<std::int64_t>(b - a));
    a = b;
  }
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

template <class T, int HD, bool Padded>
inline void forward_hd(const cuda_policy& pol, group<T> g, const std::vector<segment>& segs,
                       const std::vector<std::size_t>& poff, const std::int64_t* cls_offsets) {
  for_each_group(g.heads, segs, poff, g.cls ? cls_offsets : nullptr, [&](std::size_t a, std::int64_t count) {
    g.n = segs[a].length;
    g.row0 = segs[a].offset;
    g.poff0 = static_cast<std::int64_t>(poff[a]);
    g.cls0 = g.cls ? cls_offsets[a] : 0;
    g.tiles = (g.n + tile - 1) / tile;
    launch(pol, forward_kernel<T, HD, Padded>, g, count, forward_smem<T>(HD), "attention_forward");
  });
}

template <class T, int HD, bool Padded>
inline void backward_hd(const cuda_policy& pol, group<T> g, const std::vector<segment>& segs,
                        const std::vector<std::size_t>& poff) {
  for_each_group(g.heads, segs, poff, nullptr, [&](std::size_t a, std::int64_t count) {
    g.n = segs[a].length;
    g.row0 = segs[a].offset;
    g.poff0 = static_cast<std::int64_t>(poff[a]);
    g.cls0 = 0;
    g.tiles = (g.n + tile - 1) / tile;
    launch(pol, backward_rows_kernel<T, HD, Padded>, g, count, backward_rows_smem<T>(HD), "attention_backward (rows)");
    launch(pol, backward_cols_kernel<T, HD, Padded>, g, count, backward_cols_smem<T>(HD), "attention_backward (columns)");
  });
}

}  // namespace detail::attn

/// out [T, D] (=) attention of qkv [T, 3D]; probs receives every P. cls_attn, when non-null,
/// receives P[0, :] per segment and head at cls_offsets[segment] (host memory) + h*n.
template <class T>
inline void attention_forward(const cuda_policy& pol, std::int64_t heads, std::int64_t D, const std::vector<segment>& segs,
                              const std::vector<std::size_t>& poff, const T* qkv, T* out, T* probs, T* cls_attn = nullptr,
                              const std::int64_t* cls_offsets = nullptr) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "attention_forward (CUDA): float or double");
  namespace a = detail::attn;
  const std::int64_t hd = a::check_args("attention_forward", heads, D, segs, poff);
  require<shape_error>(cls_attn == nullptr || cls_offsets != nullptr,
                       "attention_forward: cls_attn needs cls_offsets (host memory)");
  require<shape_error>(segs.empty() || (qkv && out && probs), "attention_forward: qkv, out and probs are required");
  a::group<T> g{qkv, nullptr, out, probs, cls_attn, nullptr, nullptr, D, heads, hd, 0, 0, 0, 0, 0,
                T(1.0 / std::sqrt(double(hd)))};
  a::with_head_dim(hd, [&](auto HD, auto padded) {
    a::forward_hd<T, decltype(HD)::value, decltype(padded)::value>(pol, g, segs, poff, cls_offsets);
  });
}

/// dqkv [T, 3D] (=) from dout [T, D] with the P kept by attention_forward. scratch: probs_elems.
template <class T>
inline void attention_backward(const cuda_policy& pol, std::int64_t heads, std::int64_t D, const std::vector<segment>& segs,
                               const std::vector<std::size_t>& poff, const T* qkv, const T* probs, const T* dout, T* dqkv,
                               T* scratch) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "attention_backward (CUDA): float or double");
  namespace a = detail::attn;
  const std::int64_t hd = a::check_args("attention_backward", heads, D, segs, poff);
  require<shape_error>(segs.empty() || (qkv && probs && dout && dqkv && scratch),
                       "attention_backward: qkv, probs, dout, dqkv and scratch are required");
  a::group<T> g{qkv, dout, nullptr, const_cast<T*>(probs), nullptr, dqkv, scratch, D, heads, hd, 0, 0, 0, 0, 0,
                T(1.0 / std::sqrt(double(hd)))};
  a::with_head_dim(hd, [&](auto HD, auto padded) {
    a::backward_hd<T, decltype(HD)::value, decltype(padded)::value>(pol, g, segs, poff);
  });
}

}  // namespace dino::cuda

namespace dino::nn {
// Found from nn code (vit.hpp calls attention_forward(pol, ...) unqualified) by argument-
// dependent lookup at instantiation: segs is a std::vector<nn::segment>.
using cuda::attention_backward;
using cuda::attention_forward;
}  // namespace dino::nn
