// bench_objective: the per-step passes of the DINO objective on the CPU, against the copy
// bandwidth of the same machine, measured by the same binary.
//
//   BM_dino_loss    centering targets (tau_t 0.04) on the teacher logits [2B, K], cross-entropy
//                   distillation forward + backward on the student logits [(2 + 10) B, K]
//                   writing ds, then observe(teacher logits) and commit(). B = 64, K = 65,536.
//   BM_dino_loss_part  the same three parts timed alone (part 0 targets, 1 distillation,
//                   2 observe + commit), to show where the loss step's time goes.
//   BM_adamw        one AdamW step over a ViT-S/16 parameter layout (150 tensors, 21.67 M).
//   BM_ema          the EMA teacher update over the same layout.
//   BM_copy_memcpy  std::memcpy of a 21.67 M-float buffer, split over the threads.
//   BM_copy_loop    dst[i] = src[i] over the same buffer, split over the threads.
//   BM_triad        a[i] = b[i] + s c[i] (read 2, write 1), for reference.
//
// Every benchmark takes the thread count as its argument (dino::cpu_policy{threads}) and
// reports "GB/s": compulsory bytes per iteration / time, in decimal GB (1e9 bytes). The
// byte formulas are in the comments below and in docs/benchmarks.md.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "dino/core/buffer.hpp"
#include "dino/core/param_store.hpp"
#include "dino/core/rng.hpp"
#include "dino/optim/adamw.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/ssl/centering.hpp"
#include "dino/ssl/distillation.hpp"
#include "dino/ssl/ema.hpp"

namespace {

constexpr std::int64_t kBatch = 64;        // images per step
constexpr int kGlobal = 2, kLocal = 10;    // crops per image: teachers see the global ones
constexpr std::int64_t kProtos = 65536;    // K, the DINO head's output dimension
constexpr double kTeacherTemp = 0.04, kStudentTemp = 0.1;

void fill_uniform(float* x, std::size_t n, std::uint64_t seed, float lo, float hi) {
  dino::philox g(seed);
  for (std::size_t i = 0; i < n; ++i) x[i] = lo + (hi - lo) * g.uniform();
}

void set_gbs(benchmark::State& state, double bytes_per_iter) {
  state.counters["GB/s"] = benchmark::Counter(bytes_per_iter * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = static_cast<double>(state.range(0));
}

// For passes whose destination is not read: the bytes the memory system really moves, the
// destination's read for ownership (write-allocate) included. Shown next to GB/s.
void set_gbs_with_rfo(benchmark::State& state, double bytes_per_iter) {
  state.counters["GB/s+RFO"] = benchmark::Counter(bytes_per_iter * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// ------------------------------------------------------------------ the ViT-S/16 layout
// timm vit_small_patch16_224 without its classifier: patch embedding, cls token, position
// embedding, 12 blocks of (norm1, qkv, proj, norm2, fc1, fc2), final norm. 21,665,664 elements
// in 150 tensors, biases and norms flagged no-weight-decay as in the reference's groups.
dino::param_layout vit_small16_layout() {
  using dino::param_init;
  constexpr std::int64_t D = 384, H = 4 * D, P = 16, C = 3, tokens = 197;
  const unsigned nwd = dino::param_no_weight_decay;
  dino::param_layout L;
  L.add("cls_token", {1, 1, D}, nwd, param_init::zeros);
  L.add("pos_embed", {1, tokens, D}, nwd, param_init::zeros);
  L.add("patch_embed.proj.weight", {D, C, P, P}, 0, param_init::zeros);
  L.add("patch_embed.proj.bias", {D}, nwd, param_init::zeros);
  for (int b = 0; b < 12; ++b) {
    const std::string p = "blocks." + std::to_string(b) + ".";
    L.add(p + "norm1.weight", {D}, nwd, param_init::ones);
    L.add(p + "norm1.bias", {D}, nwd, param_init::zeros);
    L.add(p + "attn.qkv.weight", {3 * D, D}, 0, param_init::zeros);
    L.add(p + "attn.qkv.bias", {3 * D}, nwd, param_init::zeros);
    L.add(p + "attn.proj.weight", {D, D}, 0, param_init::zeros);
    L.add(p + "attn.proj.bias", {D}, nwd, param_init::zeros);
    L.add(p + "norm2.weight", {D}, nwd, param_init::ones);
    L.add(p + "norm2.bias", {D}, nwd, param_init::zeros);
    L.add(p + "mlp.fc1.weight", {H, D}, 0, param_init::zeros);
    L.add(p + "mlp.fc1.bias", {H}, nwd, param_init::zeros);
    L.add(p + "mlp.fc2.weight", {D, H}, 0, param_init::zeros);
    L.add(p + "mlp.fc2.bias", {D}, nwd, param_init::zeros);
  }
  L.add("norm.weight", {D}, nwd, param_init::ones);
  L.add("norm.bias", {D}, nwd, param_init::zeros);
  return L;
}

const dino::param_layout& layout() {
  static const dino::param_layout L = vit_small16_layout();
  return L;
}

// ------------------------------------------------------------------ the DINO loss
// Bytes: the teacher logits read once (R_t K), the targets written and read back (2 R_t K),
// the student logits read (R_s K), the student gradient written (R_s K), 4 bytes each:
//   bytes = 4 K (3 R_t + 2 R_s),  R_t = 2 B = 128, R_s = 12 B = 768  ->  503.3 MB per step.
void BM_dino_loss(benchmark::State& state) {
  const dino::cpu_policy pol{static_cast<int>(state.range(0))};
  const std::int64_t K = kProtos, Rt = kGlobal * kBatch, Rs = (kGlobal + kLocal) * kBatch;
  dino::buffer<float> t(Rt * K, false), q(Rt * K, false), s(Rs * K, false), ds(Rs * K, false);
  dino::buffer<float> entropy(Rt, false), row_loss(Rs, false);
  // Logits of an l2-normalised head: cosines in [-1, 1].
  fill_uniform(t.data(), t.size(), 1, -1.f, 1.f);
  fill_uniform(s.data(), s.size(), 2, -1.f, 1.f);
  q.fill_zero();
  ds.fill_zero();

  dino::ssl::centering<float> center(dino::ssl::centering_config{K, 0.9});
  const dino::ssl::cross_entropy_distillation loss(
      dino::ssl::distillation_config{kGlobal + kLocal, kGlobal, kStudentTemp});
  const dino::host_view<const float> tv{t.data(), {Rt, K}, "teacher logits"};
  const dino::host_view<float> qv{q.data(), {Rt, K}, "teacher targets"};
  const dino::host_view<const float> sv{s.data(), {Rs, K}, "student logits"};
  const dino::host_view<float> dsv{ds.data(), {Rs, K}, "student gradient"};
  for (auto _ : state) {
    const double h = center.targets(pol, tv, kTeacherTemp, qv, entropy.view({Rt}, "entropy"));
    const double l = loss.forward_backward(pol, sv, dino::host_view<const float>(qv), row_loss.view({Rs}, "row loss"),
                                           dsv, 1.0, false);
    center.observe(pol, tv);
    center.commit();
    benchmark::DoNotOptimize(h);
    benchmark::DoNotOptimize(l);
    benchmark::ClobberMemory();
  }
  set_gbs(state, 4.0 * double(K) * double(3 * Rt + 2 * Rs));
  state.counters["elements/s"] =
      benchmark::Counter(double((Rt + Rs) * K), benchmark::Counter::kIsIterationInvariantRate);
}

// The three parts of the loss step, to see where its time goes. Bytes as above, per part:
// targets: t read, q written (2 R_t K); distillation: s read, q read, ds written
// (2 R_s K + R_t K); observe: t read (R_t K).
void BM_dino_loss_part(benchmark::State& state) {
  const dino::cpu_policy pol{static_cast<int>(state.range(0))};
  const int part = static_cast<int>(state.range(1));
  const std::int64_t K = kProtos, Rt = kGlobal * kBatch, Rs = (kGlobal + kLocal) * kBatch;
  dino::buffer<float> t(Rt * K, false), q(Rt * K, false), s(part == 1 ? Rs * K : 1, false),
      ds(part == 1 ? Rs * K : 1, false);
  dino::buffer<float> entropy(Rt, false), row_loss(Rs, false);
  fill_uniform(t.data(), t.size(), 1, -1.f, 1.f);
  fill_uniform(s.data(), s.size(), 2, -1.f, 1.f);
  ds.fill_zero();
  dino::ssl::centering<float> center(dino::ssl::centering_config{K, 0.9});
  const dino::ssl::cross_entropy_distillation loss(
      dino::ssl::distillation_config{kGlobal + kLocal, kGlobal, kStudentTemp});
  const dino::host_view<const float> tv{t.data(), {Rt, K}, "teacher logits"};
  const dino::host_view<float> qv{q.data(), {Rt, K}, "teacher targets"};
  center.targets(pol, tv, kTeacherTemp, qv, entropy.view({Rt}, "entropy"));
  double bytes = 0;
  if (part == 0) {
    state.SetLabel("centering targets");
    bytes = 4.0 * double(K) * double(2 * Rt);
    for (auto _ : state) {
      benchmark::DoNotOptimize(center.targets(pol, tv, kTeacherTemp, qv, entropy.view({Rt}, "entropy")));
      benchmark::ClobberMemory();
    }
  } else if (part == 1) {
    state.SetLabel("distillation forward_backward");
    bytes = 4.0 * double(K) * double(2 * Rs + Rt);
    const dino::host_view<const float> sv{s.data(), {Rs, K}, "student logits"};
    const dino::host_view<float> dsv{ds.data(), {Rs, K}, "student gradient"};
    for (auto _ : state) {
      benchmark::DoNotOptimize(loss.forward_backward(pol, sv, dino::host_view<const float>(qv),
                                                     row_loss.view({Rs}, "row loss"), dsv, 1.0, false));
      benchmark::ClobberMemory();
    }
  } else {
    state.SetLabel("centering observe + commit");
    bytes = 4.0 * double(K) * double(Rt);
    for (auto _ : state) {
      center.observe(pol, tv);
      center.commit();
      benchmark::ClobberMemory();
    }
  }
  set_gbs(state, bytes);
}

// ------------------------------------------------------------------ AdamW
// Bytes: read p, g, m, v and write p, m, v: 7 x 4 x N, N the tensor elements (no padding).
void BM_adamw(benchmark::State& state) {
  const dino::cpu_policy pol{static_cast<int>(state.range(0))};
  const auto& L = layout();
  dino::flat_params<float> p(L), g(L);
  fill_uniform(p.data(), p.size(), 3, -0.05f, 0.05f);
  fill_uniform(g.data(), g.size(), 4, -1e-3f, 1e-3f);
  dino::optim::adamw<float> opt(L);
  for (auto _ : state) {
    opt.step(pol, p, g, 5e-4, 0.04);
    benchmark::ClobberMemory();
  }
  set_gbs(state, 7.0 * 4.0 * double(L.numel()));
  state.counters["params"] = double(L.numel());
}

// ------------------------------------------------------------------ EMA
// Bytes: read teacher and student, write teacher: 3 x 4 x N (the flat buffer, padding included).
void BM_ema(benchmark::State& state) {
  const dino::cpu_policy pol{static_cast<int>(state.range(0))};
  const auto& L = layout();
  dino::flat_params<float> teacher(L), student(L);
  fill_uniform(teacher.data(), teacher.size(), 5, -0.05f, 0.05f);
  fill_uniform(student.data(), student.size(), 6, -0.05f, 0.05f);
  const dino::ssl::ema_update update;
  for (auto _ : state) {
    update(pol, teacher, student, 0.996);
    benchmark::ClobberMemory();
  }
  set_gbs(state, 3.0 * 4.0 * double(teacher.size()));
}

// ------------------------------------------------------------------ copy bandwidth
// A flat buffer of the same size as the parameters, split into one contiguous range per
// thread by the library's own element runner, so the reference uses the same threading.
std::size_t copy_elems() { return layout().size(); }

// Bytes: read src, write dst: 2 x 4 x N. (memcpy of large blocks uses non-temporal stores,
// so its real traffic is these bytes; a loop of ordinary stores also reads dst for ownership:
// GB/s+RFO counts 3 x 4 x N for it.)
void BM_copy_memcpy(benchmark::State& state) {
  const dino::cpu_policy pol{static_cast<int>(state.range(0))};
  const std::size_t n = copy_elems();
  dino::buffer<float> src(n, false), dst(n, true);
  fill_uniform(src.data(), n, 7, -1.f, 1.f);
  for (auto _ : state) {
    dino::for_each_chunk(pol, std::int64_t(n), [&](std::int64_t lo, std::int64_t hi) {
      std::memcpy(dst.data() + lo, src.data() + lo, std::size_t(hi - lo) * sizeof(float));
    });
    benchmark::ClobberMemory();
  }
  set_gbs(state, 2.0 * 4.0 * double(n));
}

// GCC turns a plain copy loop into a memcpy call; keep it a loop of vector loads and stores.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-loop-distribute-patterns")))
#endif
void copy_loop(float* __restrict dst, const float* __restrict src, std::int64_t lo, std::int64_t hi) {
  for (std::int64_t i = lo; i < hi; ++i) dst[i] = src[i];
}

void BM_copy_loop(benchmark::State& state) {
  const dino::cpu_policy pol{static_cast<int>(state.range(0))};
  const std::size_t n = copy_elems();
  dino::buffer<float> src(n, false), dst(n, true);
  fill_uniform(src.data(), n, 7, -1.f, 1.f);
  for (auto _ : state) {
    dino::for_each_chunk(pol, std::int64_t(n),
                         [&](std::int64_t lo, std::int64_t hi) { copy_loop(dst.data(), src.data(), lo, hi); });
    benchmark::ClobberMemory();
  }
  set_gbs(state, 2.0 * 4.0 * double(n));
  set_gbs_with_rfo(state, 3.0 * 4.0 * double(n));
}

// Bytes: read b and c, write a: 3 x 4 x N (GB/s+RFO: 4 x 4 x N, a read for ownership).
void BM_triad(benchmark::State& state) {
  const dino::cpu_policy pol{static_cast<int>(state.range(0))};
  const std::size_t n = copy_elems();
  dino::buffer<float> a(n, true), b(n, false), c(n, false);
  fill_uniform(b.data(), n, 8, -1.f, 1.f);
  fill_uniform(c.data(), n, 9, -1.f, 1.f);
  const float scale = 0.5f;
  for (auto _ : state) {
    float* __restrict pa = a.data();
    const float* __restrict pb = b.data();
    const float* __restrict pc = c.data();
    dino::for_each_chunk(pol, std::int64_t(n), [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t i = lo; i < hi; ++i) pa[i] = pb[i] + scale * pc[i];
    });
    benchmark::ClobberMemory();
  }
  set_gbs(state, 3.0 * 4.0 * double(n));
  set_gbs_with_rfo(state, 4.0 * 4.0 * double(n));
}

void thread_args(benchmark::internal::Benchmark* b) {
  b->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_copy_memcpy)->Apply(thread_args);
BENCHMARK(BM_copy_loop)->Apply(thread_args);
BENCHMARK(BM_triad)->Apply(thread_args);
BENCHMARK(BM_ema)->Apply(thread_args);
BENCHMARK(BM_adamw)->Apply(thread_args);
BENCHMARK(BM_dino_loss)->Apply(thread_args);
BENCHMARK(BM_dino_loss_part)
    ->ArgNames({"threads", "part"})
    ->ArgsProduct({{1, 2}, {0, 1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
