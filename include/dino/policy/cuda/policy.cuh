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
#pragma once

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

#define DINO_CUDA_CHECK(call) ::dino::cuda::detail::check((call), #call, __FILE__, __LINE__)
#define DINO_CUBLAS_CHECK(call) ::dino::cuda::detail::check((call), #call, __FILE__, __LINE__)
/// After a kernel launch: reports a bad launch configuration without synchronising.
#define DINO_CUDA_LAUNCHED(name) ::dino::cuda::detail::check(cudaGetLastError(), name, __FILE__, __LINE__)

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
};

template <>
struct policy_traits<cuda_policy> {
  using memory_space = device_space;
  static constexpr bool is_host = false;
};

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
