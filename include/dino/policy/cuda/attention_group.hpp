// dino/policy/cuda/attention_group.hpp: the launch constants and the launch description
// (group<T>) of the CUDA attention kernels (policy/cuda/attention.cuh), and how segments are
// grouped into launches (for_each_group). Plain C++, so that the host emulation of the bf16
// kernels (tests/emu/) describes and groups its launches with the same code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "dino/nn/attention.hpp"  // segment

namespace dino::cuda::detail::attn {

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
  std::int64_t poff0;  ///< probs offset of the first segment (segment s: + s*heads*n*n, bf16: + s*pstride)
  std::int64_t cls0;   ///< CLS offset of the first segment (segment s: + s*heads*n)
  std::int64_t tiles;  ///< 32-row tiles per segment: ceil(n / 32)
  T scale;             ///< hd^-0.5
  std::int64_t pstride = 0;  ///< probs elements from one segment's region to the next's (bf16 path)
};

/// Calls f(first, count, pstride) for each run of consecutive segments that one launch can
/// take: equal length n > 0, token offsets advancing by n, probs offsets by pstride =
/// heads*n*n (or heads*n when rows: the bf16 path) and (when cls_offsets is given) CLS
/// offsets by heads*n. Empty segments are skipped.
template <class F>
inline void for_each_group(std::int64_t heads, const std::vector<nn::segment>& segs, const std::vector<std::size_t>& poff,
                           const std::int64_t* cls_offsets, bool rows, F&& f) {
  const std::size_t ns = segs.size();
  std::size_t a = 0;
  while (a < ns) {
    const std::int64_t n = segs[a].length;
    if (n == 0) {
      ++a;
      continue;
    }
    std::size_t pstride = static_cast<std::size_t>(heads * n * n);
    if (rows && a + 1 < ns && poff[a + 1] == poff[a] + static_cast<std::size_t>(heads * n))
      pstride = static_cast<std::size_t>(heads * n);
    std::size_t b = a + 1;
    for (; b < ns; ++b) {
      const std::int64_t k = static_cast<std::int64_t>(b - a);
      if (segs[b].length != n || segs[b].offset != segs[a].offset + k * n) break;
      if (poff[b] != poff[a] + static_cast<std::size_t>(k) * pstride) break;
      if (cls_offsets && cls_offsets[b] != cls_offsets[a] + k * heads * n) break;
    }
    f(a, static_cast<std::int64_t>(b - a), static_cast<std::int64_t>(pstride));
    a = b;
  }
}

}  // namespace dino::cuda::detail::attn
