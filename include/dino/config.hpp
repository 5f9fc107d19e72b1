// dino/config.hpp: version and the host/device function marker.
//
// DINO_HD marks functions that run on the host and, when compiled by nvcc, on the device:
// the math/ functors and the counter-based generator are written once and used by both
// policies. Host-only translation units see an empty macro.
#pragma once

#include <cstdint>

#define DINO_VERSION_MAJOR 0
#define DINO_VERSION_MINOR 1
#define DINO_VERSION_PATCH 0

#if defined(__CUDACC__)
#define DINO_HD __host__ __device__
#define DINO_INLINE __host__ __device__ __forceinline__
#else
#define DINO_HD
#define DINO_INLINE inline
#endif

namespace dino {

/// "dino MAJOR.MINOR.PATCH"
inline const char* version_string() noexcept { return "dino 0.1.0"; }

namespace detail {
/// True when p is 16-byte aligned: the CUDA element-wise functors' float4 forms (vec4) need it.
inline bool aligned16(const void* p) noexcept { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }
}  // namespace detail

}  // namespace dino
