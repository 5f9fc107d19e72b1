// dino/policy/policy.hpp: execution policies and their traits.
//
// A policy is a small value passed first to every operation: it says where the tensors
// live and how to run (cpu_policy{threads}; cuda_policy{stream, handles, workspace} joins
// with the CUDA issue). policy_traits<P>::memory_space names the space its views must
// carry; operations check it with static_assert, so handing device memory to the CPU policy
// fails to compile with a readable message.
#pragma once

#include <type_traits>

#include "dino/config.hpp"
#include "dino/core/tensor.hpp"

namespace dino {

/// Runs operations on the host: Eigen GEMMs and OpenMP loops over rows.
struct cpu_policy {
  int threads = 1;  ///< OpenMP threads for row loops and GEMMs (>= 1)
  /// fp32 GEMMs on bf16 operands, summed in fp32 (cpu/gemm_bf16.hpp): the bf16 mixed
  /// precision of the linear layers. Parameters, optimizer, EMA, LayerNorm, softmax and
  /// loss stay fp32; attention's per-head products too. false: exact fp32, the reference.
  bool bf16 = false;
  /// With bf16: the ViT writes the operands of its forward qkv, fc1 and fc2 products (the
  /// LayerNorm and GELU outputs, and copies of those weights) as bf16 in memory, and the
  /// products read them (cpu/bf16_operands.hpp, nn/vit.hpp): in infer() always, in the
  /// training forward with vit_config::recompute_pointwise. The same rounding as bf16's, so
  /// the same results; a pack must be planned for it (vit::make_pack(pol, sets)).
  bool bf16_operands = false;
};

template <class P>
struct policy_traits;

/// Whether an operation profile is active (the CPU has none; policy/cuda/policy.cuh says for the GPU).
inline bool profiling(const cpu_policy&) { return false; }

template <>
struct policy_traits<cpu_policy> {
  using memory_space = host_space;
  static constexpr bool is_host = true;
};

/// A type usable as the first argument of dino operations.
template <class P>
concept execution_policy = requires { typename policy_traits<std::remove_cvref_t<P>>::memory_space; };

template <class P>
using memory_space_t = typename policy_traits<std::remove_cvref_t<P>>::memory_space;

/// pol without bf16 GEMM operands (a policy that has the option): for the products that
/// stay fp32 in the bf16 mixed precision, the DINO head's prototype layer (its logits feed
/// the sharp teacher softmax).
template <class P>
P without_bf16(const P& pol) {
  P q = pol;
  if constexpr (requires { q.bf16 = false; }) q.bf16 = false;
  return q;
}

/// A per-step scalar (a learning rate, a momentum, a temperature, a DropPath step) that an
/// operation takes by value, or reads from the policy's memory when it runs: `at` points
/// there (device memory for cuda_policy). The second form is what a step replayed from a CUDA
/// graph needs (ssl::method's step graphs): a graph freezes what its launches were passed,
/// not what they read. A plain value converts implicitly.
template <class V>
struct step_value {
  V value{};
  const V* at = nullptr;  ///< non-null: read *at when the operation runs (value is ignored)
  constexpr step_value() = default;
  constexpr step_value(V v) : value(v) {}  // NOLINT: implicit, a plain value
  static constexpr step_value read_at(const V* p) {
    step_value s;
    s.at = p;
    return s;
  }
  DINO_HD V get() const { return at ? *at : value; }
};

/// How an operation writes an input gradient (tiny-cuda-nn's GradientMode).
enum class grad_mode {
  write,       ///< d_input = ...
  accumulate,  ///< d_input += ... (residual branches)
  skip,        ///< no input gradient (the first layer)
};

}  // namespace dino

/// Asserts at compile time that a view's memory space is the one the policy runs in.
#define DINO_CHECK_SPACE(Policy, Space)                                                              \
  static_assert(std::is_same_v<::dino::memory_space_t<Policy>, Space>,                               \
                "dino: tensor memory space does not match the execution policy: a CPU operation was " \
                "handed device memory (or a GPU operation host memory)")
