// dino/policy/cuda/memory.cuh: device memory that is allocated once, and copies.
//
// device_buffer<T> is the device twin of buffer<T>: one cudaMalloc at construction or
// resize, never in a step. Every device allocation of the library goes through
// device_allocate(), which counts them (device_allocations()): a test runs steps and checks
// the count does not move. device_workspace is the bump allocator of core/workspace.hpp
// over one device allocation, planned with the same workspace_plan. Device-to-host reads
// that wait (to_host, view_to_host, assign_params to the host, read_to_host) go through the
// counted host waits of policy.cuh.
#pragma once

#include <atomic>
#include <cstddef>
#include <span>
#include <utility>
#include <vector>

#include "dino/core/buffer.hpp"
#include "dino/core/param_store.hpp"
#include "dino/core/tensor.hpp"
#include "dino/core/workspace.hpp"
#include "dino/policy/cpu/reduce.hpp"
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

namespace detail {
inline std::atomic<std::uint64_t>& allocation_counter() {
  static std::atomic<std::uint64_t> n{0};
  return n;
}
}  // namespace detail

/// Number of device allocations made by the library so far.
inline std::uint64_t device_allocations() { return detail::allocation_counter().load(); }

inline void* device_allocate(std::size_t bytes, const char* what) {
  if (bytes == 0) return nullptr;
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw cuda_error(::dino::detail::concat("CUDA: cannot allocate ", bytes, " bytes of device memory for ", what, ": ",
                                            cudaGetErrorString(e)));
  }
  ++detail::allocation_counter();
  return p;
}
inline void device_free(void* p) noexcept {
  if (p) (void)cudaFree(p);
}

/// Owning device memory of n elements of T (not initialised unless asked).
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  explicit device_buffer(std::size_t n, bool zero = false, const char* what = "device_buffer") { resize(n, zero, what); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    std::swap(p_, o.p_);
    std::swap(n_, o.n_);
    return *this;
  }
  ~device_buffer() { device_free(p_); }

  /// Reallocates to n elements (contents are lost); zero-fills when asked (synchronously).
  void resize(std::size_t n, bool zero = false, const char* what = "device_buffer") {
    if (n != n_) {
      device_free(p_);
      p_ = nullptr;
      n_ = 0;
      p_ = static_cast<T*>(device_allocate(n * sizeof(T), what));
      n_ = n;
    }
    if (zero && n_) DINO_CUDA_CHECK(cudaMemset(p_, 0, n_ * sizeof(T)));
  }
  /// Zeroes every element, synchronously (set-up; a step zeroes on its stream).
  void fill_zero() {
    if (n_) DINO_CUDA_CHECK(cudaMemset(p_, 0, n_ * sizeof(T)));
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  device_view<T> view(shape s, const char* name = "device_buffer") { return {p_, s, name}; }
  device_view<const T> view(shape s, const char* name = "device_buffer") const { return {p_, s, name}; }

 private:
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

namespace detail {
// One asynchronous copy on the stream, marked in an active cuda::op_profile as the kernels
// are, so that a copy's time is not counted to the operation after it.
template <class T>
inline void copy_async(cudaStream_t s, T* dst, const T* src, std::size_t n, cudaMemcpyKind kind, const char* name) {
  if (!n) return;
  DINO_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), kind, s));
  profile_mark(name);
}
}  // namespace detail
/// Host to device, on the stream (the host memory must stay alive until the stream reaches it).
template <class T>
inline void copy_to_device(cudaStream_t s, T* dst, const T* src, std::size_t n) {
  detail::copy_async(s, dst, src, n, cudaMemcpyHostToDevice, "host-to-device copy");
}
/// Device to host, on the stream.
template <class T>
inline void copy_to_host(cudaStream_t s, T* dst, const T* src, std::size_t n) {
  detail::copy_async(s, dst, src, n, cudaMemcpyDeviceToHost, "device-to-host copy");
}
/// Device to device, on the stream.
template <class T>
inline void copy_on_device(cudaStream_t s, T* dst, const T* src, std::size_t n) {
  detail::copy_async(s, dst, src, n, cudaMemcpyDeviceToDevice, "device-to-device copy");
}
inline void synchronize(cudaStream_t s) { host_wait(s, "cuda::synchronize"); }

/// A device copy of host data (allocates: for set-up and tests, not for a step).
template <class T>
inline device_buffer<T> to_device(std::span<const T> host, const char* what = "to_device") {
  device_buffer<T> d(host.size(), false, what);
  if (!host.empty()) DINO_CUDA_CHECK(cudaMemcpy(d.data(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
/// A host copy of n device elements (synchronous: for tests, logging and checkpoints).
template <class T>
inline std::vector<T> to_host(const T* device, std::size_t n) {
  std::vector<T> h(n);
  host_copy_wait(h.data(), device, n * sizeof(T), "cuda::to_host");
  return h;
}

/// The bump allocator of core/workspace.hpp over one device allocation.
class device_workspace {
 public:
  device_workspace() = default;
  explicit device_workspace(const workspace_plan& plan) : mem_(plan.bytes, false, "device workspace") {}
  template <class T>
  T* take(std::size_t n, const char* what = "scratch") {
    const std::size_t need = workspace_plan::round_up(n * sizeof(T));
    if (used_ + need > mem_.size())
      throw config_error(::dino::detail::concat("device workspace: request for ", what, " (", need,
                                                " bytes) exceeds the plan: ", mem_.size() - used_, " of ", mem_.size(),
                                                " bytes left"));
    T* p = reinterpret_cast<T*>(mem_.data() + used_);
    used_ += need;
    return p;
  }
  void reset() { used_ = 0; }
  std::size_t capacity() const { return mem_.size(); }
  std::size_t used() const { return used_; }

 private:
  device_buffer<std::byte> mem_;
  std::size_t used_ = 0;
};

/// Results read back by the host some steps after they are made: `slots` slots of
/// `slot_bytes`, each with a pinned host mirror and an event. queue() copies a slot's device
/// bytes to its mirror on the stream and records the event (no wait); wait() waits for
/// that event only (one counted host wait) and returns the mirror. Allocated at
/// construction (pinned memory and events; no device memory).
class readback_ring {
 public:
  readback_ring() = default;
  readback_ring(std::size_t slots, std::size_t slot_bytes) : slot_bytes_(slot_bytes) {
    if (slots == 0 || slot_bytes == 0) return;
    DINO_CUDA_CHECK(cudaMallocHost(&host_, slots * slot_bytes));
    events_.resize(slots, nullptr);
    for (auto& e : events_) DINO_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  }
  readback_ring(const readback_ring&) = delete;
  readback_ring& operator=(const readback_ring&) = delete;
  readback_ring(readback_ring&& o) noexcept { swap(o); }
  readback_ring& operator=(readback_ring&& o) noexcept {
    swap(o);
    return *this;
  }
  ~readback_ring() {
    for (auto e : events_)
      if (e) (void)cudaEventDestroy(e);
    if (host_) (void)cudaFreeHost(host_);
  }
  /// Copies slot i's bytes from `device` to its mirror on the policy's stream, then marks it.
  void queue(const cuda_policy& pol, std::size_t i, const void* device) {
    DINO_CUDA_CHECK(cudaMemcpyAsync(mirror(i), device, slot_bytes_, cudaMemcpyDeviceToHost, pol.stream));
    DINO_CUDA_CHECK(cudaEventRecord(events_.at(i), pol.stream));
  }
  /// Waits for slot i's last queue() (one counted host wait); its bytes.
  const void* wait(std::size_t i, const char* what) {
    host_wait(events_.at(i), what);
    return mirror(i);
  }
  std::size_t slots() const { return events_.size(); }

 private:
  void* mirror(std::size_t i) const { return static_cast<std::byte*>(host_) + i * slot_bytes_; }
  void swap(readback_ring& o) noexcept {
    std::swap(host_, o.host_);
    std::swap(slot_bytes_, o.slot_bytes_);
    events_.swap(o.events_);
  }
  void* host_ = nullptr;
  std::size_t slot_bytes_ = 0;
  std::vector<cudaEvent_t> events_;
};

}  // namespace dino::cuda

namespace dino {
template <>
struct readback_ring_for<device_space> {
  using type = cuda::readback_ring;
};

/// Device memory for flat_params<T, device_space> and the other space-generic owners.
template <class T>
struct storage_for<T, device_space> {
  using type = cuda::device_buffer<T>;
  static void copy(T* dst, const T* src, std::size_t n) {
    if (n) DINO_CUDA_CHECK(cudaMemcpy(dst, src, n * sizeof(T), cudaMemcpyDeviceToDevice));
  }
};
template <>
struct workspace_for<device_space> {
  using type = cuda::device_workspace;
};

/// dst = src between host and device buffers of one layout (synchronous).
template <class T>
inline void assign_params(flat_params<T, device_space>& dst, const flat_params<T>& src) {
  require<shape_error>(dst.size() == src.size(), "assign_params: sizes differ: ", src.size(), " vs ", dst.size());
  if (src.size()) DINO_CUDA_CHECK(cudaMemcpy(dst.data(), src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}
template <class T>
inline void assign_params(flat_params<T>& dst, const flat_params<T, device_space>& src) {
  require<shape_error>(dst.size() == src.size(), "assign_params: sizes differ: ", src.size(), " vs ", dst.size());
  cuda::host_copy_wait(dst.data(), src.data(), src.size() * sizeof(T), "assign_params (to the host)");
}
template <class T>
inline void assign_params(flat_params<T, device_space>& dst, const flat_params<T, device_space>& src) {
  dst.copy_from(src);
}

template <class T>
inline void view_to_host(tensor_view<const T, device_space> v, T* dst) {
  cuda::host_copy_wait(dst, v.data, std::size_t(v.numel()) * sizeof(T), "view_to_host");
}
template <class T>
inline void view_from_host(tensor_view<T, device_space> v, const T* src) {
  if (v.numel()) DINO_CUDA_CHECK(cudaMemcpy(v.data, src, v.numel() * sizeof(T), cudaMemcpyHostToDevice));
}

/// Zeroes n elements on the policy's stream.
template <class T>
inline void fill_zero(const cuda_policy& pol, T* p, std::size_t n) {
  if (n) DINO_CUDA_CHECK(cudaMemsetAsync(p, 0, n * sizeof(T), pol.stream));
}
/// Reads n device elements into host memory after everything queued on the policy's stream:
/// one counted host wait (what names it).
template <class T>
inline void read_to_host(const cuda_policy& pol, T* host, const T* device, std::size_t n, const char* what) {
  cuda::copy_to_host(pol.stream, host, device, n);
  cuda::host_wait(pol, what);
}
/// Copies n host elements to the device on the policy's stream (the host memory must stay
/// valid until the stream has read it: the trainer's loader keeps a batch until the next).
template <class T>
inline void upload(const cuda_policy& pol, T* device, const T* host, std::size_t n) {
  cuda::copy_to_device(pol.stream, device, host, n);
}
}  // namespace dino
