// bench_gemm: dino's fp32 GEMM (policy/cpu/gemm.hpp) on the products of the ViT benchmarks,
// and the GELU kernels per SIMD level (BM_gelu, below);
// for each kernel this CPU runs (0 eigen, 1 avx2, 2 avx512; see gemm_kernels.hpp; 3: bf16
// operands on the AVX512_BF16 kernel, gemm_bf16.hpp) and thread count. Arguments: shape index (kShapes below), kernel, threads. Reports GFLOP/s (2 m n k
// per product, decimal). A kernel the CPU lacks is skipped.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "dino/core/rng.hpp"
#include "dino/policy/cpu/gelu_kernel.hpp"
#include "dino/policy/cpu/gemm.hpp"

namespace {

struct shape {
  const char* name;
  bool ta, tb;
  std::int64_t m, n, k;
};
// ViT-S/16 at batch 8 (T = 8 x 197 tokens, D 384) and the SMALL step (10,240 student tokens,
// D 192), forward (x W^T), input gradient (dy W) and weight gradient (dy^T x); attention.
const shape kShapes[] = {
    {"s16_qkv_fwd", false, true, 1576, 1152, 384},   {"s16_fc1_fwd", false, true, 1576, 1536, 384},
    {"s16_fc2_fwd", false, true, 1576, 384, 1536},   {"s16_att_qk", false, true, 197, 197, 64},
    {"s16_att_pv", false, false, 197, 64, 197},      {"small_fc1_fwd", false, true, 10240, 768, 192},
    {"small_fc1_dx", false, false, 10240, 192, 768}, {"small_fc1_dw", true, false, 768, 192, 10240},
    {"small_att_qk", false, true, 50, 50, 64},       {"small_att_local_qk", false, true, 10, 10, 64},
    // the rest of the SMALL step's linear layers (qkv 192 -> 576, proj 192 -> 192, fc2 768 -> 192)
    {"small_qkv_fwd", false, true, 10240, 576, 192}, {"small_proj_fwd", false, true, 10240, 192, 192},
    {"small_fc2_fwd", false, true, 10240, 192, 768}, {"small_qkv_dx", false, false, 10240, 192, 576},
    {"small_proj_dx", false, false, 10240, 192, 192}, {"small_fc2_dx", false, false, 10240, 768, 192},
    {"small_qkv_dw", true, false, 576, 192, 10240},  {"small_proj_dw", true, false, 192, 192, 10240},
    {"small_fc2_dw", true, false, 192, 768, 10240},
};

void BM_gemm(benchmark::State& state) {
  const shape& s = kShapes[state.range(0)];
  const bool bf16 = state.range(1) == 3;
  const auto kern = bf16 ? dino::cpu::gemm_kernel::avx512 : dino::cpu::gemm_kernel(state.range(1));
  const int threads = int(state.range(2));
  const auto saved = dino::cpu::gemm_active_kernel();
  if (!dino::cpu::set_gemm_kernel(kern) || (bf16 && !dino::cpu::gemm_bf16_native())) {
    dino::cpu::set_gemm_kernel(saved);
    state.SkipWithError("kernel not supported by this CPU");
    return;
  }
  std::vector<float> A(std::size_t(s.m * s.k)), B(std::size_t(s.k * s.n)), C(std::size_t(s.m * s.n));
  dino::philox g(1);
  for (auto& x : A) x = float(g.normal());
  for (auto& x : B) x = float(g.normal());
  const dino::cpu::gemm_desc d{s.ta, s.tb, s.m, s.n, s.k};
  for (auto _ : state) {
    dino::cpu::gemm(dino::cpu_policy{threads, bf16}, d, 1.0f, A.data(), B.data(), 0.0f, C.data());
    benchmark::DoNotOptimize(C.data());
    benchmark::ClobberMemory();
  }
  dino::cpu::set_gemm_kernel(saved);
  state.SetLabel(std::string(s.name) + "/" + (bf16 ? "avx512_bf16" : dino::cpu::gemm_kernel_name(kern)));
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(s.m) * double(s.n) * double(s.k) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void gemm_args(benchmark::internal::Benchmark* b) {
  for (int i = 0; i < int(sizeof kShapes / sizeof kShapes[0]); ++i)
    for (int k : {0, 1, 2, 3})
      for (int t : {1, 2}) b->Args({i, k, t});
}

// GELU over a SMALL step's fc1 output (10,240 x 768 floats, inputs in [-1.5, 1.5]) on one
// thread, per SIMD level (0 baseline, 1 avx512; policy/cpu/simd.hpp): 0 forward, 1 backward,
// 2 forward keeping the derivative (what the ViT's training forward runs on the CPU).
void BM_gelu(benchmark::State& state) {
  const auto level = dino::cpu::simd_level(state.range(0));
  const int pass = int(state.range(1));
  const auto saved = dino::cpu::simd_active();
  if (!dino::cpu::set_simd_level(level)) {
    state.SkipWithError("SIMD level not supported by this CPU");
    return;
  }
  const std::int64_t n = 10240 * 768;
  std::vector<float> a(static_cast<std::size_t>(n)), y(a.size()), g(a.size()), dy(a.size(), 1.0f);
  for (std::int64_t i = 0; i < n; ++i) a[std::size_t(i)] = 1.5f * std::sin(0.37f * float(i % 100000));
  for (auto _ : state) {
    if (pass == 0) dino::cpu::gelu_range(a.data(), y.data(), n);
    else if (pass == 1) dino::cpu::gelu_backward_range(a.data(), dy.data(), y.data(), n, false);
    else dino::cpu::gelu_with_grad_range(a.data(), y.data(), g.data(), n);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  dino::cpu::set_simd_level(saved);
  state.SetLabel(std::string(dino::cpu::simd_level_name(level)) + (pass == 0 ? "/forward" : pass == 1 ? "/backward" : "/forward+grad"));
  state.counters["ns/elem"] = benchmark::Counter(double(n), benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

}  // namespace

BENCHMARK(BM_gelu)->ArgsProduct({{0, 1}, {0, 1, 2}})->ArgNames({"level", "pass"})->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_gemm)->Apply(gemm_args)->ArgNames({"shape", "kernel", "threads"})->UseRealTime()->Unit(benchmark::kMicrosecond);
