// dino/policy/cuda/attention_group.hpp: the launch constants and the launch description
// (group<T>) of the CUDA attention kernels (policy/cuda/attention.cuh). Plain C++, so that
// the host emulation of the bf16 kernel (tests/emu/) describes its launches with the same
// struct.
#pragma once

#include <cstdint>

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
  std::int64_t poff0;  ///< probs offset of the first segment (segment s: + s*heads*n*n)
  std::int64_t cls0;   ///< CLS offset of the first segment (segment s: + s*heads*n)
  std::int64_t tiles;  ///< 32-row tiles per segment: ceil(n / 32)
  T scale;             ///< hd^-0.5
};

}  // namespace dino::cuda::detail::attn
