// dino/policy/cuda/profile.cuh: where the GPU time of a piece of work goes, by operation.
//
//   dino::cuda::op_profile prof(pol.stream);
//   prof.start();
//   method.step(pol, crops);                     // any library work on pol.stream
//   prof.stop();
//   for (const auto& r : prof.summary()) ...     // r.name, r.ms, r.count (host wait)
//
// While a profile is active on a thread, every operation of the library records a CUDA
// event on the profiled stream after queuing its kernels (DINO_CUDA_LAUNCHED and the GEMM
// calls), named after the operation; the GPU time between an event and the previous one
// is that operation's. Copies and other calls that mark nothing count toward the next
// marked operation. The events are made at construction (capacity marks; marks past it are
// counted in dropped() and not timed), so profiling allocates nothing while it runs.
// The GPU does the same work with or without a profile; recording events adds about a
// microsecond of host time per operation. Where the host queues work more slowly than the
// GPU runs it, the GPU's idle wait for an operation counts toward that operation, so the
// total is then the wall time of the GPU, not its busy time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

class op_profile {
 public:
  struct row {
    std::string name;
    double ms = 0;            ///< GPU time summed over the marks of this name
    std::int64_t count = 0;   ///< marks (operations) of this name
  };

  explicit op_profile(cudaStream_t stream, std::size_t capacity = 1 << 16) : stream_(stream) {
    events_.resize(capacity + 1);
    for (auto& e : events_) DINO_CUDA_CHECK(cudaEventCreate(&e));
    names_.resize(capacity);
  }
  op_profile(const op_profile&) = delete;
  op_profile& operator=(const op_profile&) = delete;
  ~op_profile() {
    stop();
    for (auto& e : events_) (void)cudaEventDestroy(e);
  }

  /// Forgets earlier marks, records the start and makes this the thread's active profile.
  void start() {
    used_ = 0;
    dropped_ = 0;
    DINO_CUDA_CHECK(cudaEventRecord(events_[0], stream_));
    detail::active_profile() = detail::profile_hook{&op_profile::on_mark, this};
  }
  /// Stops marking (the thread's hook is cleared if it is this profile's).
  void stop() {
    auto& h = detail::active_profile();
    if (h.self == this) h = detail::profile_hook{};
  }
  /// Waits for the stream (one counted host wait) and sums the GPU time per operation name,
  /// largest first.
  std::vector<row> summary() const {
    host_wait(stream_, "op_profile::summary");
    std::map<std::string, row> by;
    for (std::size_t i = 0; i < used_; ++i) {
      float ms = 0;
      DINO_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]));
      row& r = by[names_[i]];
      r.name = names_[i];
      r.ms += ms;
      ++r.count;
    }
    std::vector<row> out;
    for (auto& [k, r] : by) out.push_back(r);
    std::sort(out.begin(), out.end(), [](const row& a, const row& b) { return a.ms > b.ms; });
    return out;
  }
  std::size_t marks() const { return used_; }
  std::size_t dropped() const { return dropped_; }

 private:
  static void on_mark(void* self, const char* name) { static_cast<op_profile*>(self)->mark(name); }
  void mark(const char* name) {
    if (used_ + 1 >= events_.size()) {
      ++dropped_;
      return;
    }
    DINO_CUDA_CHECK(cudaEventRecord(events_[used_ + 1], stream_));
    names_[used_++] = name ? name : "?";
  }

  cudaStream_t stream_ = nullptr;
  std::vector<cudaEvent_t> events_;
  std::vector<const char*> names_;
  std::size_t used_ = 0, dropped_ = 0;
};

}  // namespace dino::cuda
