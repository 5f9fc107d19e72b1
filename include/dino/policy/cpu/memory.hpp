// dino/policy/cpu/memory.hpp: the memory operations a step needs, CPU forms.
//
// fill_zero and upload exist for every policy so that code generic over the policy (the
// method's step) zeroes its gradients and takes host input the same way: on the CPU the
// "upload" is a copy into the planned buffer, on the GPU (policy/cuda/memory.cuh) a copy
// on the stream.
#pragma once

#include <cstddef>
#include <cstring>

#include "dino/policy/policy.hpp"

namespace dino {

/// Zeroes n elements.
template <class T>
inline void fill_zero(const cpu_policy&, T* p, std::size_t n) {
  if (n) std::memset(static_cast<void*>(p), 0, n * sizeof(T));
}
/// Copies n host elements into the policy's memory (here: host memory).
template <class T>
inline void upload(const cpu_policy&, T* dst, const T* host, std::size_t n) {
  if (n && dst != host) std::memcpy(static_cast<void*>(dst), host, n * sizeof(T));
}

}  // namespace dino
