// dino/policy/cuda/policy.cuh: the CUDA policy, its errors and its context.
//
// cuda_policy is the small value passed first to every GPU operation, as cpu_policy is on
// the host: a stream, a cuBLASLt handle and the GEMM workspace. It owns nothing; a
// cuda_context owns the handle and the workspace and hands out policies. Views handed to a
// cuda_policy operation carry device_space (DINO_CHECK_SPACE).
//
// Every CUDA or cuBLAS status is checked and turned into dino::cuda_error naming the call,
// the status and the file and line (DINO_CUDA_CHECK, DINO_CUBLAS_CHECK). Kernel launches are
// checked with cudaGetLastError, which does not synchronise.
//
// Every host synchronisation of the library goes through cuda::host_wait (a stream) or
// cuda::host_copy_wait (a synchronous device-to-host cudaMemcpy), which count them:
// cuda::host_waits(), and cuda::last_host_wait() names the latest. A test runs steps and
// checks the count does not move, as device_allocations() does for cudaMalloc.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "dino/core/error.hpp"
#include "dino/policy/policy.hpp"

namespace dino {

/// A CUDA runtime or cuBLAS call that failed.
struct cuda_error : error {
  using error::error;
};

namespace cuda::detail {
inline void check(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess)
    throw cuda_error(::dino::detail::concat("CUDA: ", what, " failed: ", cudaGetErrorName(e), " (",
                                            cudaGetErrorString(e), ") at ", file, ":", line));
}
inline void check(cublasStatus_t s, const char* what, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw cuda_error(::dino::detail::concat("cuBLAS: ", what, " failed: status ", int(s), " at ", file, ":", line));
}
}  // namespace cuda::detail

}  // namespace dino

namespace dino::cuda::detail {
/// The per-thread hook of cuda::op_profile (policy/cuda/profile.cuh): when set, every
/// operation of the library marks its name after queuing its work.
struct profile_hook {
  void (*mark)(void* self, const char* name) = nullptr;
  void* self = nullptr;
};
inline profile_hook& active_profile() {
  static thread_local profile_hook h;
  return h;
}
inline void profile_mark(const char* name) {
  const profile_hook& h = active_profile();
  if (h.mark) h.mark(h.self, name);
}
}  // namespace dino::cuda::detail

#define DINO_CUDA_CHECK(call) ::dino::cuda::detail::check((call), #call, __FILE__, __LINE__)
#define DINO_CUBLAS_CHECK(call) ::dino::cuda::detail::check((call), #call, __FILE__, __LINE__)
/// After a kernel launch: reports a bad launch configuration without synchronising, and
/// marks the operation for an active cuda::op_profile.
#define DINO_CUDA_LAUNCHED(name)                                                   \
  (::dino::cuda::detail::check(cudaGetLastError(), name, __FILE__, __LINE__),      \
   ::dino::cuda::detail::profile_mark(name))

namespace dino::cuda::detail {
/// Device memory for the bf16 copies of GEMM operands (cuda_policy::bf16_staged), owned by a
/// cuda::context and grown by the GEMMs to the largest pair of operands they stage.
struct bf16_stage {
  void* data = nullptr;
  std::size_t bytes = 0;
};
}  // namespace dino::cuda::detail

namespace dino {

/// Runs operations on one CUDA stream: cuBLASLt GEMMs and kernels over rows and elements.
struct cuda_policy {
  cudaStream_t stream = nullptr;        ///< every kernel and copy of an operation goes here
  cublasLtHandle_t lt = nullptr;        ///< cuBLASLt handle (owned by a cuda_context)
  void* gemm_workspace = nullptr;       ///< cuBLASLt workspace (device memory)
  std::size_t gemm_workspace_bytes = 0;
  bool tf32 = false;  ///< fp32 GEMMs on TF32 tensor cores (false: exact fp32, the reference)
  int* flags = nullptr;       ///< 16 device ints for results read back by the host (all_finite)
  int* host_flags = nullptr;  ///< their pinned host mirror
  /// Device scratch for the partial sums of multi-block reductions (column sums, LayerNorm
  /// parameter gradients, clipping norms). Stream-ordered: an operation uses it only between
  /// its own kernels on `stream`. Null: those reductions run in one stage (slower, same sums
  /// up to the order of double additions).
  void* scratch = nullptr;
  std::size_t scratch_bytes = 0;
  /// fp32 GEMMs on bf16 tensor cores (cuBLASLt's CUBLAS_COMPUTE_32F_FAST_16BF): operands
  /// rounded to bf16 inside the GEMM, fp32 accumulation and output; the twin of
  /// cpu_policy::bf16. Wins over tf32 for GEMMs. The DINO head's prototype layer opts out
  /// (without_bf16).
  bool bf16 = false;
  /// Attention on bf16 tensor cores in the flash-attention form (policy/cuda/attention_bf16.cuh):
  /// Q, K, V, dO and the GEMM operands P and dS rounded to bf16, fp32 sums and an fp32 softmax,
  /// as PyTorch's bf16 autocast runs its attention; the forward keeps each row's lse2 instead
  /// of P, and the backward recomputes P (it needs the forward's output). context::policy sets
  /// it with bf16; false keeps the TF32 kernels (finer than bf16). Float tensors and head dims
  /// 32, 64 and 128 only; other cases take the paths they took before.
  bool bf16_attention = false;
  /// With bf16: each GEMM's fp32 operands are rounded to bf16 (to nearest even, as the CPU's
  /// cpu::bf16_bits) by a pass of their own into `stage`, and the product runs on those bf16
  /// operands in memory (cuBLASLt CUDA_R_16BF A and B, fp32 C and output, COMPUTE_32F)
  /// instead of COMPUTE_32F_FAST_16BF over the fp32 operands: cuBLASLt's native bf16 kernels,
  /// and the CPU's rounding. Single products only (strided batches keep FAST_16BF). Off unless
  /// set: what it gains is measured by bench_cuda_gemm and bench_cuda_dino's bf16_staged rows
  /// (docs/perf-notes.md, v11). The stage grows on the first products of a new size (one host
  /// wait and one allocation each), never afterwards.
  bool bf16_staged = false;
  cuda::detail::bf16_stage* stage = nullptr;  ///< the context's stage (null: no staging)
  /// With bf16: the ViT writes the operands of its forward qkv, fc1 and fc2 products as bf16
  /// (LayerNorm and GELU round as they store, the weights get bf16 copies) and those products
  /// read bf16 from memory on cuBLASLt's native bf16 kernels (policy/cuda/bf16_operands.cuh,
  /// nn/vit.hpp): in infer() always, in the training forward with recompute_pointwise. The
  /// twin of cpu_policy::bf16_operands; off unless set, until a GPU run has measured it
  /// (docs/perf-notes.md, v13). A pack must be planned for it (vit::make_pack(pol, sets)).
  bool bf16_operands = false;
  /// Whether attention may use its TF32 tensor-core kernels (tf32 or bf16 asked for).
  bool tensor_core_attention() const { return tf32 || bf16; }
  /// Field by field (a captured step graph is replayed only for the policy it was captured with).
  bool operator==(const cuda_policy&) const = default;
};

template <>
struct policy_traits<cuda_policy> {
  using memory_space = device_space;
  static constexpr bool is_host = false;
};

namespace cuda {
namespace detail {
inline std::atomic<std::uint64_t>& host_wait_counter() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}
inline std::atomic<const char*>& last_host_wait_name() {
  static std::atomic<const char*> w{""};
  return w;
}
inline void count_host_wait(const char* what) {
  ++host_wait_counter();
  last_host_wait_name().store(what ? what : "");
}
}  // namespace detail

/// Number of host synchronisations made by the library so far.
inline std::uint64_t host_waits() { return detail::host_wait_counter().load(); }
/// What the latest host synchronisation was for (a static string).
inline const char* last_host_wait() { return detail::last_host_wait_name().load(); }

/// Waits until `stream` has run everything queued on it: the one way the library
/// synchronises with the host (counted; `what` names the reason, a static string).
inline void host_wait(cudaStream_t stream, const char* what) {
  detail::count_host_wait(what);
  DINO_CUDA_CHECK(cudaStreamSynchronize(stream));
}
inline void host_wait(const cuda_policy& pol, const char* what) { host_wait(pol.stream, what); }
/// Waits until the work recorded before `event` has run (counted as host_wait is).
inline void host_wait(cudaEvent_t event, const char* what) {
  detail::count_host_wait(what);
  DINO_CUDA_CHECK(cudaEventSynchronize(event));
}
/// A synchronous device-to-host copy (cudaMemcpy: it waits for the device), counted as one
/// host wait. For set-up, tests, logging and checkpoints, never inside a step.
inline void host_copy_wait(void* dst, const void* src, std::size_t bytes, const char* what) {
  if (!bytes) return;
  detail::count_host_wait(what);
  DINO_CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
}  // namespace cuda

/// Whether a cuda::op_profile is active on this thread (it marks each operation as it is
/// queued, which a captured CUDA graph would not do).
inline bool profiling(const cuda_policy&) { return cuda::detail::active_profile().mark != nullptr; }

/// Whether a CUDA device is present and usable (tests skip visibly without one).
inline bool cuda_device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" status
    return false;
  }
  return n > 0;
}

}  // namespace dino
