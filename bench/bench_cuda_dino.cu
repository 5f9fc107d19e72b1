// bench_cuda_dino: the CUDA issue's GPU benchmarks, timed by a plain main (median of timed
// steps after warm-up; steady_clock around each step followed by a stream synchronisation).
// bench/compare/torch_gpu_bench.py runs the same workloads in PyTorch eager on the same GPU.
//
//   train_vits16  the DINO ViT-S/16 step: make_dino<nn::vit, float, cuda_policy> on
//                 nn::vit_small(16), student DropPath 0.1, 2 global crops of 224 px and 10
//                 local crops of 96 px, head K 65536, hidden 2048, bottleneck 256, batch 64;
//                 clip 3.0, AdamW, EMA teacher, centering (the library's reference defaults).
//   train_vits16_ckpt  the same step with activation checkpointing of all 12 student
//                 blocks (vit_config::checkpoint_blocks = 12).
//   train_vits16_ckpt5  the same with the first 5 blocks checkpointed, in bf16 only: the
//                 fewest that the plan puts under PyTorch's bf16 peak (docs/perf-notes.md, v8).
//   train_vits16_pointwise  the same with no block checkpointed but the LayerNorm and GELU
//                 outputs recomputed in the backward (vit_config::recompute_pointwise), in
//                 bf16 only (docs/perf-notes.md, v10).
//   train_small   the SMALL step of bench/bench_vit.cpp: nn::vit_small28(4) (D 192, depth 6,
//                 3 heads, patch 4, 1 x 28 x 28), DropPath 0.1, 2 x 28 + 6 x 12 crops,
//                 K 4096, hidden 512, bottleneck 128, batch 64.
//   infer_vits16  ViT-S/16 inference (vit::infer, CLS features), batch 128 at 224 x 224,
//                 random weights (nn::initialize), the images already on the device.
//
// Both training steps: freeze_last_layer = 0 (every step runs the whole backward, as in
// bench_vit; the PyTorch side passes 0 to cancel_gradients_last_layer), a 100 x 100 iteration
// schedule. The crops are drawn once, before timing, into pinned host memory (two sets
// alternate, as a pin_memory DataLoader would hand them over); each step copies its crops to
// the device itself (method::step stages host input), so the copy is inside the timed step,
// as `.cuda(non_blocking=True)` is on the PyTorch side. images_per_s = batch / median step.
//
// Each workload runs at precision fp32 (exact fp32 GEMMs), tf32 (ctx.policy(true)), bf16
// (ctx.policy(false, true): bf16 tensor cores for the GEMMs and the attention) and
// bf16_staged (bf16 with every single GEMM's operands rounded to bf16 by a pass of their own
// and multiplied as bf16 in memory: cuda_policy::bf16_staged, docs/perf-notes.md v11; not the
// checkpointed workloads),
// bf16_operands (bf16 with the forward products' operands stored as bf16 by their producers:
// cuda_policy::bf16_operands, docs/perf-notes.md v13; in training it needs pointwise
// recomputation, so it runs train_vits16_pointwise, SMALL with recomputation and the
// inference; not parts_vits16, whose GEMMs read fp32),
// bf16_staged_operands (both: the forward's qkv, fc1 and fc2 and most of the backward's
// products read bf16 written by their producers, the rest is staged; docs/perf-notes.md v14
// and v15; the workloads of bf16_operands) and
// bf16_tf32attn (bf16 GEMMs, the TF32 attention kernels: the bf16 mode before the bf16
// attention kernels, so that one run shows what they change).
// peak_device_MiB: the device memory in use (cudaMemGetInfo: total - free) at its highest,
// sampled after set-up, after the warm-up and after every timed step, minus the use before
// the workload's set-up (the context and its cuBLASLt workspace are made before, so they are
// not counted). It counts whole cudaMalloc allocations, driver granularity included; PyTorch's
// max_memory_allocated counts the tensors of its caching allocator.
//
// Usage: bench_cuda_dino [--only train_vits16|train_vits16_ckpt|train_vits16_ckpt5|train_vits16_pointwise|train_vits16_pointwise_graph|train_small|train_small_pointwise|train_small_graph|infer_vits16|parts_vits16] [--precision fp32|tf32|bf16|bf16_staged|bf16_operands|bf16_staged_operands|bf16_tf32attn]
//                        [--batch N] [--reps R] [--warmup W] [--profile N]
// --profile N: after timing, N more calls under a cuda::op_profile (policy/cuda/profile.cuh)
// and the GPU time per operation, largest first ("profile ..." lines).
// Output: one line per workload and precision,
//   dino <workload> precision=<fp32|tf32|bf16|bf16_staged|bf16_operands|bf16_staged_operands|bf16_tf32attn> images_per_s=... ms_per_step=... peak_device_MiB=... batch=...
// Training rows add workspace_MiB (the step's planned workspace) and activations_MiB (the part
// of it the backward keeps: the activation memory per step, method::memory()).
// host_ms is the median time for a call to return before the stream is synchronised: the
// host's enqueueing. Close to ms_per_step, the step is bound by its launches, not the GPU.
// Exits 77 when there is no CUDA device.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <span>
#include <string>
#include <vector>

#include <dino/cuda.hpp>
#include <dino/nn/vit.hpp>

namespace {

using clk = std::chrono::steady_clock;

/// The precision of a run: exact fp32, TF32 or bf16 tensor cores (cuda_policy).
struct precision {
  // 0 fp32, 1 tf32, 2 bf16, 3 bf16 GEMMs with the TF32 attention kernels, 4 bf16 with the
  // GEMM operands staged in bf16 (cuda_policy::bf16_staged), 5 bf16 with the forward
  // products' operands stored as bf16 (cuda_policy::bf16_operands), 6 both
  static constexpr const char* names[] = {"fp32",        "tf32",          "bf16", "bf16_tf32attn",
                                          "bf16_staged", "bf16_operands", "bf16_staged_operands"};
  static constexpr int run_order[] = {0, 1, 2, 4, 5, 6, 3};  // the rows' order when all run
  int mode = 0;
  const char* name() const { return names[mode]; }
  bool staged() const { return mode == 4 || mode == 6; }
  bool operands() const { return mode == 5 || mode == 6; }  // training needs pointwise recomputation
  dino::cuda_policy policy(const dino::cuda::context& ctx) const {
    dino::cuda_policy pol = ctx.policy(mode == 1, mode >= 2);
    if (mode == 3) pol.bf16_attention = false;
    pol.bf16_staged = staged();
    pol.bf16_operands = operands();
    return pol;
  }
};

struct options {
  int reps = 10;
  int warmup = 3;
  std::int64_t batch = 0;  // 0: each workload's own
  std::string only;
  std::string precision;  // empty: all four
  int profile = 0;        // > 0: after timing, that many more calls under a cuda::op_profile
};

struct timing {
  double median_ms = 0, min_ms = 0, max_ms = 0;
  double host_ms = 0;  // median time for the call to return, before the synchronisation (the host's enqueueing)
};

// Device memory in use now (bytes), as the driver sees it.
std::size_t device_used() {
  std::size_t free_b = 0, total_b = 0;
  DINO_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return total_b - free_b;
}

struct peak_meter {
  std::size_t base = 0, peak = 0;
  peak_meter() : base(device_used()), peak(base) {}
  void sample() { peak = std::max(peak, device_used()); }
  double mib() const { return double(peak - std::min(peak, base)) / double(1 << 20); }
};

// warm-up calls, then reps timed calls; each call is followed by a synchronisation of the stream.
template <class F>
timing time_steps(const dino::cuda::context& ctx, const options& o, peak_meter& mem, F&& f) {
  for (int i = 0; i < o.warmup; ++i) f();
  ctx.synchronize();
  mem.sample();
  std::vector<double> ms, host;
  for (int i = 0; i < o.reps; ++i) {
    const auto t0 = clk::now();
    f();
    host.push_back(std::chrono::duration<double, std::milli>(clk::now() - t0).count());
    ctx.synchronize();
    ms.push_back(std::chrono::duration<double, std::milli>(clk::now() - t0).count());
    mem.sample();
  }
  const auto median = [](std::vector<double>& v) {  // sorts v
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  };
  timing t;
  t.median_ms = median(ms);
  t.min_ms = ms.front();
  t.max_ms = ms.back();
  t.host_ms = median(host);
  return t;
}

// Pinned host memory (the crops a pin_memory loader would hand over).
class pinned {
 public:
  explicit pinned(std::size_t n) { DINO_CUDA_CHECK(cudaMallocHost(&p_, n * sizeof(float))); }
  pinned(const pinned&) = delete;
  pinned& operator=(const pinned&) = delete;
  ~pinned() {
    if (p_) (void)cudaFreeHost(p_);
  }
  float* data() { return p_; }

 private:
  float* p_ = nullptr;
};

// Values uniform in [-2, 2) (normalised pixels), cheap enough for 10^8 of them (splitmix64).
void fill_uniform(float* x, std::size_t n, std::uint64_t seed) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (std::size_t i = 0; i < n; ++i) {
    std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    x[i] = float(double(z >> 40) * (4.0 / double(1ull << 24)) - 2.0);
  }
}

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

void emit(const std::string& workload, precision pr, std::int64_t batch, const timing& t, const peak_meter& mem,
          const options& o, const std::string& extra) {
  std::printf("dino %s precision=%s images_per_s=%s ms_per_step=%s peak_device_MiB=%s batch=%lld min_ms=%s max_ms=%s "
              "host_ms=%s reps=%d%s\n",
              workload.c_str(), pr.name(), fmt("%.2f", double(batch) * 1e3 / t.median_ms).c_str(),
              fmt("%.3f", t.median_ms).c_str(), fmt("%.1f", mem.mib()).c_str(), static_cast<long long>(batch),
              fmt("%.3f", t.min_ms).c_str(), fmt("%.3f", t.max_ms).c_str(), fmt("%.3f", t.host_ms).c_str(), o.reps,
              extra.c_str());
  std::fflush(stdout);
}

// --profile N: N more calls of f under a cuda::op_profile, then the GPU time per operation
// (per call), largest first, down to 1 % of the total:
//   profile <workload> precision=<p> op="<name>" ms_per_call=... launches_per_call=... share=...%
template <class F>
void profile_calls(const dino::cuda::context& ctx, const std::string& workload, precision pr, const options& o, F&& f) {
  if (o.profile <= 0) return;
  dino::cuda::op_profile prof(ctx.stream());
  prof.start();
  for (int i = 0; i < o.profile; ++i) f();
  prof.stop();
  const auto rows = prof.summary();
  double total = 0;
  for (const auto& r : rows) total += r.ms;
  const double k = 1.0 / o.profile;
  std::printf("profile %s precision=%s total_gpu_ms_per_call=%.3f ops_per_call=%.1f dropped=%zu\n", workload.c_str(),
              pr.name(), total * k, double(prof.marks()) * k, prof.dropped());
  for (const auto& r : rows) {
    if (r.ms < 0.01 * total) break;
    std::printf("profile %s precision=%s op=\"%s\" ms_per_call=%.3f launches_per_call=%.1f share=%.1f%%\n",
                workload.c_str(), pr.name(), r.name.c_str(), r.ms * k, double(r.count) * k,
                100.0 * r.ms / total);
  }
  std::fflush(stdout);
}

// ------------------------------------------------------------------ training steps
struct train_spec {
  const char* name;
  dino::nn::vit_config vit;
  std::int64_t batch, global, local;
  int n_local;
  std::int64_t K, hidden, bottleneck;
  bool graphs = false;  // steps replayed from a CUDA graph (method::use_step_graphs)
};

train_spec vits16_spec() {
  dino::nn::vit_config v = dino::nn::vit_small(16);
  v.drop_path_rate = 0.1;
  return {"train_vits16", v, 64, 224, 96, 10, 65536, 2048, 256};
}
// The same step with activation checkpointing of the first `blocks` blocks
// (vit_config::checkpoint_blocks): the activation memory against one more forward of them.
train_spec vits16_ckpt_spec(int blocks, const char* name) {
  train_spec s = vits16_spec();
  s.name = name;
  s.vit.checkpoint_blocks = blocks;
  return s;
}
// The same step with the LayerNorm and GELU outputs recomputed (vit_config::recompute_pointwise).
train_spec vits16_pointwise_spec() {
  train_spec s = vits16_spec();
  s.name = "train_vits16_pointwise";
  s.vit.recompute_pointwise = true;
  return s;
}
train_spec small_spec() {
  dino::nn::vit_config v = dino::nn::vit_small28(4);
  v.drop_path_rate = 0.1;
  return {"train_small", v, 64, 28, 12, 6, 4096, 512, 128};
}
// The same steps replayed from a CUDA graph (method::use_step_graphs): one launch per step
// instead of hundreds; SMALL is bound by launches, the ViT-S/16 step mostly by the GPU.
train_spec graph_spec(train_spec s, const char* name) {
  s.name = name;
  s.graphs = true;
  return s;
}
train_spec small_pointwise_spec() {
  train_spec s = small_spec();
  s.name = "train_small_pointwise";
  s.vit.recompute_pointwise = true;
  return s;
}

void bench_train(const dino::cuda::context& ctx, train_spec s, precision pr, const options& o) {
  if (o.batch > 0) s.batch = o.batch;
  const dino::cuda_policy pol = pr.policy(ctx);
  peak_meter mem;
  dino::ssl::dino_config c;
  c.head.out_dim = s.K;
  c.head.hidden_dim = s.hidden;
  c.head.bottleneck_dim = s.bottleneck;
  c.local_crops = s.n_local;
  c.train.max_batch = s.batch;
  c.train.crops = {s.global, s.local};
  c.train.freeze_last_layer = 0;  // every step runs the whole backward (as bench_vit and the PyTorch side)
  c.train.schedule.epochs = 100;
  c.train.schedule.iters_per_epoch = 100;
  c.train.schedule.batch_size = s.batch;
  auto m = dino::ssl::make_dino<dino::nn::vit, float, dino::cuda_policy>(s.vit, s.vit.embed_dim, c);
  m.plan_for(pol);  // the bf16 attention keeps rows, not P
  if (s.graphs) m.use_step_graphs(true);
  const std::int64_t C = s.vit.in_chans;
  const std::size_t ng = std::size_t(2 * s.batch * C * s.global * s.global);
  const std::size_t nl = std::size_t(s.n_local * s.batch * C * s.local * s.local);
  pinned g0(ng), g1(ng), l0(nl), l1(nl);
  fill_uniform(g0.data(), ng, 10);
  fill_uniform(g1.data(), ng, 11);
  fill_uniform(l0.data(), nl, 20);
  fill_uniform(l1.data(), nl, 21);
  const dino::ssl::image_crops<float> sets[2] = {{g0.data(), l0.data()}, {g1.data(), l1.data()}};
  ctx.synchronize();
  mem.sample();
  int next = 0;
  dino::ssl::step_stats last;
  const auto step = [&] {
    last = m.step(pol, sets[next]);
    next ^= 1;
  };
  const timing t = time_steps(ctx, o, mem, step);
  m.read_stats(pol, last);  // the last timed step's loss (a GPU step's stats are read later)
  emit(s.name, pr, s.batch, t, mem, o,
       " loss=" + fmt("%.4f", last.loss) + " skipped=" + std::to_string(last.skipped ? 1 : 0) +
           " workspace_MiB=" + fmt("%.1f", double(m.workspace_bytes()) / double(1 << 20)) +
           " activations_MiB=" + fmt("%.1f", double(m.memory().activations) / double(1 << 20)) +
           (s.graphs ? " graph_replays=" + std::to_string(m.graph_counts().replays) +
                           " graph_nodes=" + std::to_string(m.graph_counts().nodes) + " graph_refusal=\"" +
                           m.step_graph_refusal() + "\" graph_error=\"" + m.step_graph_error() + "\""
                     : std::string()));
  profile_calls(ctx, s.name, pr, o, step);
}

// ------------------------------------------------------------------ inference
void bench_infer(const dino::cuda::context& ctx, precision pr, const options& o) {
  const std::int64_t batch = o.batch > 0 ? o.batch : 128, size = 224;
  const dino::cuda_policy pol = pr.policy(ctx);
  peak_meter mem;
  dino::param_layout L;
  dino::nn::vit v(dino::nn::vit_small(16), L);
  dino::cuda::device_buffer<float> dP;
  {
    dino::flat_params<float> P(L);
    dino::nn::initialize(P, 1);
    dP = dino::cuda::to_device(std::span<const float>(P.data(), P.size()), "ViT-S/16 parameters");
  }
  auto pk = v.make_pack<float>(pol, {{batch, size, size}});
  dino::cuda::device_buffer<float> img;
  {
    std::vector<float> h(std::size_t(batch * 3 * size * size));
    fill_uniform(h.data(), h.size(), 2);
    img = dino::cuda::to_device(std::span<const float>(h), "images");
  }
  dino::cuda::device_buffer<float> y(std::size_t(batch * v.out_dim()), false, "features");
  dino::cuda::device_buffer<float> scratch(v.infer_scratch_elems(pk), false, "inference scratch");
  ctx.synchronize();
  mem.sample();
  const float* sets[1] = {img.data()};
  const auto call = [&] {
    v.infer(pol, dino::device_view<const float>{dP.data(), {std::int64_t(dP.size())}, "P"}, pk,
            std::span<const float* const>(sets, 1), dino::device_view<float>{y.data(), {batch, v.out_dim()}, "y"},
            dino::device_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
  };
  const timing t = time_steps(ctx, o, mem, call);
  const std::vector<float> out = dino::cuda::to_host(y.data(), 4);
  emit("infer_vits16", pr, batch, t, mem, o,
       " y0=" + fmt("%.5f", out[0]) + " scratch_MiB=" + fmt("%.1f", double(scratch.size() * 4) / double(1 << 20)));
  profile_calls(ctx, "infer_vits16", pr, o, call);
}


// Where the inference time goes: the GEMMs and the attention of ViT-S/16 at batch 128, timed
// alone with the shapes infer() runs (x 12 blocks), against the whole infer() above; the
// rest is LayerNorm, GELU, bias rows, the embedding and the final norm.
void bench_parts(const dino::cuda::context& ctx, precision pr, const options& o) {
  const std::int64_t batch = o.batch > 0 ? o.batch : 128, n = 197, D = 384, H = 1536, heads = 6, depth = 12;
  const std::int64_t T = batch * n;
  const dino::cuda_policy pol = pr.policy(ctx);
  peak_meter mem;
  std::vector<float> h(std::size_t(T * H));
  fill_uniform(h.data(), h.size(), 3);
  auto x = dino::cuda::to_device(std::span<const float>(h), "x");
  auto w = dino::cuda::to_device(std::span<const float>(h.data(), std::size_t(H * H)), "w");
  dino::cuda::device_buffer<float> y(std::size_t(T * 3 * D), false, "y"), out(std::size_t(T * D), false, "out"),
      z(std::size_t(T * H), false, "z");
  std::vector<dino::nn::segment> segs;
  for (std::int64_t i = 0; i < batch; ++i) segs.push_back({i * n, n});
  const auto poff = dino::nn::detail::probs_offsets(segs, heads);
  dino::cuda::device_buffer<float> probs(dino::nn::attention_probs_elems(segs, heads), false, "probs");
  const auto gemm_block = [&] {
    using dino::gemm_desc;
    dino::gemm(pol, gemm_desc{false, true, T, 3 * D, D}, 1.0f, x.data(), w.data(), 0.0f, y.data());  // qkv
    dino::gemm(pol, gemm_desc{false, true, T, D, D}, 1.0f, x.data(), w.data(), 0.0f, y.data());      // proj
    dino::gemm(pol, gemm_desc{false, true, T, H, D}, 1.0f, x.data(), w.data(), 0.0f, z.data());      // fc1
    dino::gemm(pol, gemm_desc{false, true, T, D, H}, 1.0f, x.data(), w.data(), 0.0f, y.data());      // fc2
  };
  const auto attention_block = [&] {
    dino::cuda::attention_forward(pol, heads, D, segs, poff, static_cast<const float*>(y.data()), out.data(),
                                  probs.data());
  };
  const timing g = time_steps(ctx, o, mem, [&] {
    for (int b = 0; b < depth; ++b) gemm_block();
  });
  const timing a = time_steps(ctx, o, mem, [&] {
    for (int b = 0; b < depth; ++b) attention_block();
  });
  std::printf("dino parts_vits16 precision=%s batch=%lld gemm_ms=%.3f attention_ms=%.3f (12 blocks each; compare "
              "infer_vits16 ms_per_step)\n",
              pr.name(), (long long)batch, g.median_ms, a.median_ms);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  const char* usage =
      "usage: bench_cuda_dino [--only train_vits16|train_vits16_ckpt|train_vits16_ckpt5|train_vits16_pointwise|"
      "train_vits16_pointwise_graph|train_small|train_small_pointwise|train_small_graph|infer_vits16|parts_vits16] "
      "[--precision fp32|tf32|bf16|bf16_staged|bf16_operands|bf16_staged_operands|bf16_tf32attn] "
      "[--batch N] [--reps R] [--warmup W] [--profile N]\n";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&](const char* name) -> const char* {
      const std::size_t n = std::strlen(name);
      if (a.compare(0, n, name) == 0 && a.size() > n && a[n] == '=') return argv[i] + n + 1;
      if (a == name && i + 1 < argc) return argv[++i];
      return nullptr;
    };
    if (const char* v = val("--reps")) o.reps = std::max(1, std::atoi(v));
    else if (const char* v = val("--warmup")) o.warmup = std::max(0, std::atoi(v));
    else if (const char* v = val("--batch")) o.batch = std::max(1, std::atoi(v));
    else if (const char* v = val("--only")) o.only = v;
    else if (const char* v = val("--precision")) o.precision = v;
    else if (const char* v = val("--profile")) o.profile = std::max(0, std::atoi(v));
    else {
      std::fprintf(stderr, "%s", usage);
      return 2;
    }
  }
  static const char* const workloads[] = {"train_vits16",           "train_vits16_ckpt",     "train_vits16_ckpt5",
                                          "train_vits16_pointwise", "train_vits16_pointwise_graph",
                                          "train_small",            "train_small_pointwise", "train_small_graph",
                                          "infer_vits16",           "parts_vits16"};
  if (!o.only.empty() && std::none_of(std::begin(workloads), std::end(workloads), [&](const char* w) { return o.only == w; })) {
    std::fprintf(stderr, "bench_cuda_dino: unknown workload '%s'\n%s", o.only.c_str(), usage);
    return 2;
  }
  if (!o.precision.empty() &&
      std::none_of(std::begin(precision::names), std::end(precision::names), [&](const char* n) { return o.precision == n; })) {
    std::fprintf(stderr, "bench_cuda_dino: unknown precision '%s'\n%s", o.precision.c_str(), usage);
    return 2;
  }
  if (!dino::cuda_device_available()) {
    std::printf("SKIPPED: bench_cuda_dino: no CUDA device on this machine; nothing was measured\n");
    return 77;
  }
  int failed = 0;
  try {
    dino::cuda::context ctx;
    cudaDeviceProp prop{};
    DINO_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("# bench_cuda_dino on %s, warmup %d, median of %d steps; peak_device_MiB: cudaMemGetInfo use above "
                "the level before each workload's set-up\n",
                prop.name, o.warmup, o.reps);
    std::vector<precision> precisions;
    for (int m : precision::run_order)
      if (o.precision.empty() || o.precision == precision::names[m]) precisions.push_back({m});
    // One workload's failure (out of device memory, say) is reported and the others still run.
    auto run = [&](const char* w, precision pr, auto&& f) {
      if (!o.only.empty() && o.only != w) return;
      try {
        f();
      } catch (const std::exception& e) {
        ++failed;
        std::printf("dino %s precision=%s failed\n", w, pr.name());
        std::fflush(stdout);
        std::fprintf(stderr, "bench_cuda_dino: %s (%s): %s\n", w, pr.name(), e.what());
      }
    };
    for (precision pr : precisions) {
      if (!pr.operands()) run("train_vits16", pr, [&] { bench_train(ctx, vits16_spec(), pr, o); });
      if (!pr.staged() && !pr.operands())
        run("train_vits16_ckpt", pr, [&] { bench_train(ctx, vits16_ckpt_spec(12, "train_vits16_ckpt"), pr, o); });
      if (pr.mode == 2)
        run("train_vits16_ckpt5", pr, [&] { bench_train(ctx, vits16_ckpt_spec(5, "train_vits16_ckpt5"), pr, o); });
      if (pr.mode == 2 || pr.staged() || pr.operands())
        run("train_vits16_pointwise", pr, [&] { bench_train(ctx, vits16_pointwise_spec(), pr, o); });
      if (!pr.operands()) run("train_small", pr, [&] { bench_train(ctx, small_spec(), pr, o); });
      if (pr.mode == 2 || pr.operands())
        run("train_small_pointwise", pr, [&] { bench_train(ctx, small_pointwise_spec(), pr, o); });
      if (pr.mode == 1 || pr.mode == 2)
        run("train_small_graph", pr, [&] { bench_train(ctx, graph_spec(small_spec(), "train_small_graph"), pr, o); });
      if (pr.mode == 6)
        run("train_vits16_pointwise_graph", pr, [&] {
          bench_train(ctx, graph_spec(vits16_pointwise_spec(), "train_vits16_pointwise_graph"), pr, o);
        });
      run("infer_vits16", pr, [&] { bench_infer(ctx, pr, o); });
      if (!pr.operands()) run("parts_vits16", pr, [&] { bench_parts(ctx, pr, o); });  // its GEMMs read fp32
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_dino: %s\n", e.what());
    return 1;
  }
  return failed ? 1 : 0;
}
