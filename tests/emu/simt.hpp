// tests/emu/simt.hpp: a small host emulation of the CUDA execution model, enough to run the
// bf16 attention kernel (policy/cuda/attention_bf16.cuh) on the CPU, as it is written.
//
// A block is 128 std::threads (threadIdx, blockIdx thread_local); __syncthreads is a
// std::barrier over the block, __shfl_xor_sync and the two tensor-core primitives exchange
// registers through a per-warp slot array between two barrier phases over the warp's 32
// threads. The primitives follow the PTX ISA's fragment layouts, as the kernel's comment
// states them:
//   mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 (lane = 4 g + t):
//     A reg 0 = (row g, cols 2t, 2t+1), reg 1 = (row g+8, same), reg 2 = (row g, cols 2t+8,
//     2t+9), reg 3 = (row g+8, cols 2t+8, 2t+9); B reg 0 = (rows 2t, 2t+1, col g), reg 1 =
//     (rows 2t+8, 2t+9, col g); C c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, same);
//     the low half of a register is the lower index of its pair. Products of bf16 values are
//     exact in fp32 and summed in fp32 (the hardware's order is not specified).
//   ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16: lane 8 i + r gives the address of row r
//     of matrix i; register i of lane 4 g + t receives (rows 2t, 2t+1; column g) of matrix i.
// bf16 conversion rounds to nearest even, as __float2bfloat16_rn does.
//
// What this checks is the kernel's own logic (indexing, masking, the online softmax, the
// fragment plumbing) against the layouts above; that the hardware matches those layouts is
// what the GPU test (tests/cuda/test_cuda_attention.cu) checks.
#pragma once

#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

// ---- CUDA spellings on the host ----
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n)
#define __shared__

struct uint3_emu {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local uint3_emu threadIdx, blockIdx;

struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct uint2 {
  std::uint32_t x, y;
};

struct __nv_bfloat16 {
  std::uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline std::uint16_t emu_float_to_bf16_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                              // nearest even
  return static_cast<std::uint16_t>(u >> 16);
}
inline float emu_bf16_bits_to_float(std::uint16_t h) {
  const std::uint32_t u = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {emu_float_to_bf16_bits(f)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {{emu_float_to_bf16_bits(a)}, {emu_float_to_bf16_bits(b)}};
}

namespace dino::cuda::detail::attn {
/// The dynamic shared memory of the block being run (the kernel's `extern __shared__
/// smem_raw`; blocks run one after another).
alignas(128) inline unsigned char smem_raw[96 * 1024];
}  // namespace dino::cuda::detail::attn

namespace simt {

inline constexpr int block_threads = 128;

struct warp_state {
  std::barrier<> bar{32};
  std::array<float, 32> f{};
  std::array<std::array<std::uint32_t, 6>, 32> regs{};
  std::array<const void*, 32> addr{};
};
struct block_state {
  std::barrier<> bar{block_threads};
  std::array<warp_state, block_threads / 32> warps;
};
inline thread_local block_state* current_block = nullptr;
inline warp_state& my_warp() { return current_block->warps[threadIdx.x >> 5]; }

/// Runs kernel() for every block of a grid_x x grid_y grid, 128 threads per block.
inline void launch(unsigned grid_x, unsigned grid_y, const std::function<void()>& kernel) {
  for (unsigned by = 0; by < grid_y; ++by)
    for (unsigned bx = 0; bx < grid_x; ++bx) {
      std::memset(dino::cuda::detail::attn::smem_raw, 0xcd, sizeof dino::cuda::detail::attn::smem_raw);  // garbage
      auto blk = std::make_unique<block_state>();
      std::vector<std::thread> ts;
      ts.reserve(block_threads);
      for (int t = 0; t < block_threads; ++t)
        ts.emplace_back([&, t] {
          threadIdx = {unsigned(t), 0, 0};
          blockIdx = {bx, by, 0};
          current_block = blk.get();
          kernel();
        });
      for (auto& th : ts) th.join();
    }
}

}  // namespace simt

inline void __syncthreads() { simt::current_block->bar.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  auto& w = simt::my_warp();
  const int lane = int(threadIdx.x & 31);
  w.f[std::size_t(lane)] = v;
  w.bar.arrive_and_wait();
  const float r = w.f[std::size_t(lane ^ lane_mask)];
  w.bar.arrive_and_wait();
  return r;
}

namespace dino::cuda::detail::attn {

inline void bf_mma(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  auto& w = simt::my_warp();
  const int lane = int(threadIdx.x & 31);
  auto& mine = w.regs[std::size_t(lane)];
  for (int i = 0; i < 4; ++i) mine[std::size_t(i)] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  w.bar.arrive_and_wait();
  const auto half = [](std::uint32_t v, int hi) { return emu_bf16_bits_to_float(std::uint16_t(hi ? v >> 16 : v)); };
  const auto A = [&](int r, int k) {
    const int reg = (k >= 8 ? 2 : 0) + (r >= 8 ? 1 : 0), ln = 4 * (r & 7) + (k & 7) / 2;
    return half(w.regs[std::size_t(ln)][std::size_t(reg)], k & 1);
  };
  const auto B = [&](int k, int col) {
    const int reg = 4 + (k >= 8 ? 1 : 0), ln = 4 * col + (k & 7) / 2;
    return half(w.regs[std::size_t(ln)][std::size_t(reg)], k & 1);
  };
  const int g = lane >> 2, t = lane & 3;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[e] = acc;
  }
  w.bar.arrive_and_wait();  // every lane has read the registers
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

inline void bf_ldmatrix_x4_trans(std::uint32_t (&r)[4], const __nv_bfloat16* p) {
  auto& w = simt::my_warp();
  const int lane = int(threadIdx.x & 31);
  w.addr[std::size_t(lane)] = p;
  w.bar.arrive_and_wait();
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const auto* row0 = static_cast<const __nv_bfloat16*>(w.addr[std::size_t(8 * i + 2 * t)]);
    const auto* row1 = static_cast<const __nv_bfloat16*>(w.addr[std::size_t(8 * i + 2 * t + 1)]);
    r[i] = std::uint32_t(row0[g].bits) | (std::uint32_t(row1[g].bits) << 16);
  }
  w.bar.arrive_and_wait();
}

}  // namespace dino::cuda::detail::attn
