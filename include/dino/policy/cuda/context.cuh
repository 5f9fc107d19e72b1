// dino/policy/cuda/context.cuh: owns what a cuda_policy points to.
//
//   dino::cuda::context ctx;              // device 0, a new stream, cuBLASLt, 32 MiB workspace,
//                                         // 16 MiB reduction scratch
//   dino::cuda_policy pol = ctx.policy(); // pass to every GPU operation
//
// One context per thread of work; the policy is a cheap copy.
#pragma once

#include <cstddef>

#include "dino/policy/cuda/memory.cuh"
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

class context {
 public:
  /// Selects `device`, creates a stream, a cuBLASLt handle and its workspace. The stream is a
  /// blocking one: set-up work that runs on the default stream (zeroing and copying device
  /// buffers with cudaMemset / cudaMemcpy) is ordered before the steps that follow it.
  explicit context(int device = 0, std::size_t gemm_workspace_bytes = std::size_t(32) << 20,
                   std::size_t scratch_bytes = std::size_t(16) << 20) {
    require<cuda_error>(cuda_device_available(), "CUDA: no CUDA device is available");
    DINO_CUDA_CHECK(cudaSetDevice(device));
    DINO_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault));
    DINO_CUBLAS_CHECK(cublasLtCreate(&lt_));
    ws_.resize(gemm_workspace_bytes, false, "cuBLASLt workspace");
    scratch_.resize(scratch_bytes, false, "reduction scratch");
    flags_.resize(16, true, "policy flags");
    DINO_CUDA_CHECK(cudaMallocHost(&host_flags_, 16 * sizeof(int)));
  }
  context(const context&) = delete;
  context& operator=(const context&) = delete;
  ~context() {
    if (stream_) (void)cudaStreamSynchronize(stream_);
    if (host_flags_) (void)cudaFreeHost(host_flags_);
    device_free(stage_.data);
    if (lt_) (void)cublasLtDestroy(lt_);
    if (stream_) (void)cudaStreamDestroy(stream_);
  }

  /// A policy on this context's stream; tf32 turns on TF32 tensor cores for fp32 GEMMs, bf16
  /// bf16 tensor cores (operands rounded to bf16, fp32 sums; cuda_policy::bf16) and the bf16
  /// attention forward (cuda_policy::bf16_attention; set it false on the copy to keep TF32).
  /// bf16_staged (cuda_policy::bf16_staged) is off; the policy carries the context's stage.
  cuda_policy policy(bool tf32 = false, bool bf16 = false) const {
    return cuda_policy{stream_,       lt_,         ws_.data(),      ws_.size(),      tf32, flags_.data(),
                       host_flags_, scratch_.data(), scratch_.size(), bf16,            bf16,
                       false,       &stage_};
  }
  cudaStream_t stream() const { return stream_; }
  void synchronize() const { host_wait(stream_, "context::synchronize"); }

 private:
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  mutable device_buffer<std::byte> ws_;  // mutable: a const context still hands out a usable policy
  mutable device_buffer<int> flags_;
  mutable device_buffer<std::byte> scratch_;
  int* host_flags_ = nullptr;
  mutable detail::bf16_stage stage_;  // grown by the GEMMs of a bf16_staged policy
};

}  // namespace dino::cuda
