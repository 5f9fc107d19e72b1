// dino/policy/cpu/simd.hpp: the instruction set of the CPU policy's element-wise and row
// kernels (GELU, LayerNorm, column sums), chosen at run time like the GEMM's
// (gemm_kernels.hpp).
//
// The library is built for the x86-64 baseline, so a plain loop compiles to SSE2. On a CPU
// with AVX-512 the kernels below run a second copy of the same loop compiled for AVX-512
// through a function attribute (DINO_SIMD_AVX512: `target(...)` plus `flatten`, which
// inlines the shared loop body into the AVX-512 function so that it is vectorised with
// 16 float lanes), or hand-written AVX-512 intrinsics (GELU).
//
//   simd_level::baseline  the build's instruction set (SSE2 on x86-64)
//   simd_level::avx512    AVX-512F/DQ/BW/VL with FMA (picked when the CPU has it)
//
// `DINO_CPU_SIMD=baseline|avx512` in the environment (read once) or set_simd_level()
// overrides the choice; a level the CPU lacks is never used.
//
// Results: every kernel keeps its summation order whatever the level (partial sums are
// per lane of a fixed width, never per register width), so the thread count never changes
// a result. The AVX-512 copies contract a multiply and an add into one FMA where the
// compiler sees fit, so they can differ from the baseline in the last bit; each level is
// deterministic on its own, and both are tested against double references (test_math).
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "dino/policy/cpu/gemm_kernels.hpp"

#if DINO_GEMM_X86
// DINO_SIMD_AVX512_TARGET: AVX-512 code generation for one function (intrinsic helpers).
// DINO_SIMD_AVX512: the same, and every call inside inlined (a shared loop body).
#define DINO_SIMD_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define DINO_SIMD_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"), flatten))
#endif

namespace dino::cpu {

/// The instruction sets of the element-wise and row kernels.
enum class simd_level : int {
  baseline = 0,  ///< the build's instruction set (SSE2 for the x86-64 baseline)
  avx512 = 1,    ///< AVX-512 (F, DQ, BW, VL) with FMA, through function attributes
};

inline const char* simd_level_name(simd_level l) { return l == simd_level::avx512 ? "avx512" : "baseline"; }

/// Whether this CPU (and this compiler's build) can run level l.
inline bool simd_supported(simd_level l) {
  if (l == simd_level::baseline) return true;
#if DINO_GEMM_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

namespace detail {
inline simd_level simd_default() {
  simd_level best = simd_supported(simd_level::avx512) ? simd_level::avx512 : simd_level::baseline;
  if (const char* e = std::getenv("DINO_CPU_SIMD")) {
    for (simd_level l : {simd_level::baseline, simd_level::avx512})
      if (std::strcmp(e, simd_level_name(l)) == 0 && simd_supported(l)) return l;
  }
  return best;
}
inline std::atomic<int>& simd_state() {
  static std::atomic<int> s{int(simd_default())};
  return s;
}
}  // namespace detail

/// The level the kernels use now.
inline simd_level simd_active() { return simd_level(detail::simd_state().load(std::memory_order_relaxed)); }

/// True when the AVX-512 copies run (the active level is avx512).
inline bool simd_avx512() {
#if DINO_GEMM_X86
  return simd_active() == simd_level::avx512;
#else
  return false;
#endif
}

/// Chooses the level (for tests and comparisons). Returns false, and changes nothing, when
/// the CPU cannot run it. Not for use while another thread runs a kernel.
inline bool set_simd_level(simd_level l) {
  if (!simd_supported(l)) return false;
  detail::simd_state().store(int(l), std::memory_order_relaxed);
  return true;
}

}  // namespace dino::cpu
