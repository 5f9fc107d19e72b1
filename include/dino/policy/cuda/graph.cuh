// dino/policy/cuda/graph.cuh: a stream's work captured once as a CUDA graph and replayed.
//
//   cuda::stream_graph g;
//   cuda_policy cap = g.begin(pol);   // capture on the graph's own stream (non-blocking)
//   ...operations on cap...           // queued into the graph, not run
//   g.end();                          // instantiated (throws cuda_error when capture failed)
//   g.launch(pol);                    // runs it on pol.stream; again each step
//   cuda::put_value(pol, dst, v);     // one small kernel: *dst = v (v passed by value)
//
// A graph replays the launches it captured with the arguments they were passed: pointers,
// sizes and scalars are frozen. What changes from one replay to the next must be read from
// device memory by the kernels (step_value::read_at), written there before the launch, for
// instance by put_value, whose argument is copied at launch as every kernel argument is (no
// host buffer to keep alive, unlike an asynchronous copy from host memory).
//
// Capture runs on a stream of the graph's own, created non-blocking, so that work another
// thread puts on the legacy default stream neither joins the capture nor fails because of
// it; the capture mode is thread-local (a synchronising or allocating call of this thread
// during capture fails, and with it end(); other threads are free). Nothing captured runs
// until launch(). ssl::method's step graphs use it (ssl/method.hpp).
#pragma once

#include <cstddef>
#include <utility>

#include <cuda_runtime.h>

#include "dino/policy/cpu/reduce.hpp"
#include "dino/policy/cuda/policy.cuh"

namespace dino::cuda {

namespace graph_kernels {
template <class V>
__global__ void put_value_kernel(V* dst, V v) {
  *dst = v;
}
}  // namespace graph_kernels

/// *dst = v on the policy's stream (dst in device memory; v copied at launch).
template <class V>
inline void put_value(const cuda_policy& pol, V* dst, const V& v) {
  graph_kernels::put_value_kernel<V><<<1, 1, 0, pol.stream>>>(dst, v);
  DINO_CUDA_LAUNCHED("put_value");
}

/// One captured sequence of work, replayed by launch() (see the file comment). Move-only.
class stream_graph {
 public:
  stream_graph() = default;
  stream_graph(const stream_graph&) = delete;
  stream_graph& operator=(const stream_graph&) = delete;
  stream_graph(stream_graph&& o) noexcept { swap(o); }
  stream_graph& operator=(stream_graph&& o) noexcept {
    swap(o);
    return *this;
  }
  ~stream_graph() { reset(); }

  /// Starts capturing: returns pol on the graph's capture stream. A graph held before is
  /// dropped.
  cuda_policy begin(const cuda_policy& pol) {
    drop_graph();
    if (!capture_) DINO_CUDA_CHECK(cudaStreamCreateWithFlags(&capture_, cudaStreamNonBlocking));
    DINO_CUDA_CHECK(cudaStreamBeginCapture(capture_, cudaStreamCaptureModeThreadLocal));
    capturing_ = true;
    cuda_policy c = pol;
    c.stream = capture_;
    return c;
  }
  /// Ends the capture and instantiates the graph; throws cuda_error (holding nothing) when
  /// the capture failed, as a synchronising call inside it makes it.
  void end() {
    require<cuda_error>(capturing_, "stream_graph::end: not capturing");
    capturing_ = false;
    cudaGraph_t g = nullptr;
    const cudaError_t e = cudaStreamEndCapture(capture_, &g);
    if (e != cudaSuccess) {
      if (g) (void)cudaGraphDestroy(g);
      (void)cudaGetLastError();
      detail::check(e, "cudaStreamEndCapture", __FILE__, __LINE__);
    }
    graph_ = g;
    std::size_t n = 0;
    DINO_CUDA_CHECK(cudaGraphGetNodes(graph_, nullptr, &n));
    nodes_ = n;
    const cudaError_t ie = cudaGraphInstantiate(&exec_, graph_, 0);
    if (ie != cudaSuccess) {
      drop_graph();
      detail::check(ie, "cudaGraphInstantiate", __FILE__, __LINE__);
    }
  }
  /// Ends a capture that an exception interrupted and drops what it held (no-throw).
  void abort() noexcept {
    if (capturing_) {
      cudaGraph_t g = nullptr;
      (void)cudaStreamEndCapture(capture_, &g);
      if (g) (void)cudaGraphDestroy(g);
      capturing_ = false;
    }
    (void)cudaGetLastError();
    drop_graph();
  }
  /// Runs the graph on pol.stream (after what is queued there).
  void launch(const cuda_policy& pol) const {
    require<cuda_error>(exec_ != nullptr, "stream_graph::launch: no graph was captured");
    DINO_CUDA_CHECK(cudaGraphLaunch(exec_, pol.stream));
    detail::profile_mark("graph launch");
  }
  bool ready() const { return exec_ != nullptr; }
  bool capturing() const { return capturing_; }
  /// Nodes of the captured graph (kernels, copies, memsets): the launches one replay saves.
  std::size_t nodes() const { return nodes_; }
  /// Drops the graph and the capture stream.
  void reset() noexcept {
    abort();
    if (capture_) (void)cudaStreamDestroy(capture_);
    capture_ = nullptr;
  }

 private:
  void drop_graph() noexcept {
    if (exec_) (void)cudaGraphExecDestroy(exec_);
    if (graph_) (void)cudaGraphDestroy(graph_);
    exec_ = nullptr;
    graph_ = nullptr;
    nodes_ = 0;
  }
  void swap(stream_graph& o) noexcept {
    std::swap(capture_, o.capture_);
    std::swap(graph_, o.graph_);
    std::swap(exec_, o.exec_);
    std::swap(nodes_, o.nodes_);
    std::swap(capturing_, o.capturing_);
  }
  cudaStream_t capture_ = nullptr;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  std::size_t nodes_ = 0;
  bool capturing_ = false;
};

}  // namespace dino::cuda

namespace dino {
using cuda::put_value;
template <>
struct stream_graph_for<device_space> {
  using type = cuda::stream_graph;
};
}  // namespace dino
