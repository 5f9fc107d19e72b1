// bench_vit: the ViT on the CPU, timed by a plain main (median of timed calls after warm-up),
// plus the heap allocations of a steady-state training step, counted by an interposer.
//
//   infer   ViT-S/16 (nn::vit_small(16)) inference, batch 8 at 224 x 224, random weights
//           (nn::initialize); images/s = 8 / median seconds per call.
//   train   the SMALL DINO step: make_dino<nn::vit> on nn::vit_small28(4) (D 192, depth 6,
//           3 heads, patch 4, 1 x 28 x 28), student DropPath 0.1, 2 global crops of 28 px and
//           6 local crops of 12 px, DINO head K 4096, hidden 512, bottleneck 128, batch 64;
//           no data loading (the crops are drawn once, before timing; two sets alternate).
//           freeze_last_layer = 0, so every step runs the whole backward. images/s = 64 /
//           median seconds per step.
//   allocs  heap allocations per steady-state step (after the warm-up steps), counted for
//           C++ operator new (every form) and for the C allocator (malloc, calloc, realloc,
//           posix_memalign, aligned_alloc, memalign, valloc) separately; the same for one
//           inference call. DINO_BENCH_ALLOC_TRACE=N prints the size and backtrace of the
//           first N counted allocations to stderr (addresses: resolve with addr2line -f -C).
//
// Usage: bench_vit [--threads N] [--reps R] [--warmup W] [--only infer|train|allocs] [--checkpoint-blocks N]
//                  [--recompute-pointwise] [--precision fp32|bf16|bf16_operands]
// --checkpoint-blocks N: the train workload with activation checkpointing of the student's
// first N blocks (vit_config::checkpoint_blocks; the name gets "_ckpt<N>").
// --recompute-pointwise: the train workload with the student's LayerNorm and GELU outputs
// recomputed in the backward (vit_config::recompute_pointwise; the name gets "_pointwise").
// --precision bf16: GEMM operands in bf16, summed in fp32 (cpu_policy::bf16; the names get
// "_bf16"); --precision bf16_operands: bf16 with the ViT's forward products reading bf16
// operands stored by their producers (cpu_policy::bf16_operands: the same results; the
// student's forward only with --recompute-pointwise; the names get "_bf16_operands"). Default fp32.
// Output: one line per workload, "dino <workload> <name> key=value ..." (numeric values).
// Google Benchmark flags are accepted, as scripts/bench passes them: --benchmark_out=FILE
// gets the same results as JSON, the others are ignored.
#include <execinfo.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include <dino/dino.hpp>
#include <dino/nn/vit.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

// ------------------------------------------------------------------ allocation counting
// The executable's definitions interpose the C allocator for the whole process (glibc's own
// entry points stay reachable as __libc_*). operator new is replaced too and calls
// __libc_malloc directly, so that each allocation is counted once, under its own API.
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
}

namespace alloc_count {
std::atomic<bool> on{false};
std::atomic<long> news{0}, mallocs{0};
std::atomic<long> trace_left{0};
thread_local bool in_trace = false;

inline void trace(std::size_t bytes) {
  if (in_trace || trace_left.load(std::memory_order_relaxed) <= 0) return;
  if (trace_left.fetch_sub(1) <= 0) return;
  in_trace = true;
  static std::atomic_flag lock = ATOMIC_FLAG_INIT;  // one backtrace at a time on stderr
  while (lock.test_and_set(std::memory_order_acquire)) {
  }
  void* frames[64];
  const int n = backtrace(frames, 64);
  char sep[64];
  const int len = std::snprintf(sep, sizeof sep, "---- allocation backtrace, %zu bytes\n", bytes);
  (void)!write(2, sep, std::size_t(len));
  backtrace_symbols_fd(frames, n, 2);
  lock.clear(std::memory_order_release);
  in_trace = false;
}
inline void count_new(std::size_t bytes) {
  if (on.load(std::memory_order_relaxed) && !in_trace) {  // not backtrace()'s own allocations
    news.fetch_add(1, std::memory_order_relaxed);
    trace(bytes);
  }
}
inline void count_malloc(std::size_t bytes) {
  if (on.load(std::memory_order_relaxed) && !in_trace) {
    mallocs.fetch_add(1, std::memory_order_relaxed);
    trace(bytes);
  }
}
}  // namespace alloc_count

extern "C" {
void* malloc(std::size_t n) {
  alloc_count::count_malloc(n);
  return __libc_malloc(n);
}
void* calloc(std::size_t a, std::size_t b) {
  alloc_count::count_malloc(a * b);
  return __libc_calloc(a, b);
}
void* realloc(void* p, std::size_t n) {
  alloc_count::count_malloc(n);
  return __libc_realloc(p, n);
}
void free(void* p) { __libc_free(p); }
void* memalign(std::size_t a, std::size_t n) {
  alloc_count::count_malloc(n);
  return __libc_memalign(a, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) {
  alloc_count::count_malloc(n);
  return __libc_memalign(a, n);
}
int posix_memalign(void** out, std::size_t a, std::size_t n) {
  alloc_count::count_malloc(n);
  void* p = __libc_memalign(a, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
void* valloc(std::size_t n) {
  alloc_count::count_malloc(n);
  return __libc_memalign(static_cast<std::size_t>(sysconf(_SC_PAGESIZE)), n);
}
}

namespace {
void* counted_new(std::size_t n) {
  alloc_count::count_new(n);
  if (void* p = __libc_malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* counted_new_aligned(std::size_t n, std::align_val_t a) {
  alloc_count::count_new(n);
  if (void* p = __libc_memalign(static_cast<std::size_t>(a), n ? n : 1)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(std::size_t n) { return counted_new(n); }
void* operator new[](std::size_t n) { return counted_new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  alloc_count::count_new(n);
  return __libc_malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  alloc_count::count_new(n);
  return __libc_malloc(n ? n : 1);
}
void* operator new(std::size_t n, std::align_val_t a) { return counted_new_aligned(n, a); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_new_aligned(n, a); }
void operator delete(void* p) noexcept { __libc_free(p); }
void operator delete[](void* p) noexcept { __libc_free(p); }
void operator delete(void* p, std::size_t) noexcept { __libc_free(p); }
void operator delete[](void* p, std::size_t) noexcept { __libc_free(p); }
void operator delete(void* p, std::align_val_t) noexcept { __libc_free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { __libc_free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { __libc_free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { __libc_free(p); }

// ------------------------------------------------------------------ the workloads
namespace {

using clk = std::chrono::steady_clock;

struct options {
  int threads = 2;
  int reps = 7;
  int warmup = 2;
  std::string only;
  std::string out;
  int checkpoint_blocks = 0;  // train: vit_config::checkpoint_blocks of the student
  bool pointwise = false;     // train: vit_config::recompute_pointwise of the student
  bool bf16 = false;          // --precision bf16: cpu_policy::bf16
  bool operands = false;      // --precision bf16_operands: and cpu_policy::bf16_operands
  std::string suffix() const { return operands ? "_bf16_operands" : bf16 ? "_bf16" : ""; }
  dino::cpu_policy policy() const {
    dino::cpu_policy pol{threads, bf16};
    pol.bf16_operands = operands;
    return pol;
  }
};

struct timing {
  double median_ms = 0, min_ms = 0, max_ms = 0;
};

template <class F>
timing time_calls(int warmup, int reps, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = clk::now();
    f();
    ms.push_back(std::chrono::duration<double, std::milli>(clk::now() - t0).count());
  }
  std::vector<double> s = ms;
  std::sort(s.begin(), s.end());
  const std::size_t n = s.size();
  timing t;
  t.median_ms = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
  t.min_ms = s.front();
  t.max_ms = s.back();
  return t;
}

void fill_normal(std::vector<float>& x, std::uint64_t seed) {
  dino::philox g(seed);
  for (auto& v : x) v = static_cast<float>(g.normal());
}

std::vector<std::string> g_lines;
void emit(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
  g_lines.push_back(line);
}
std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

struct alloc_window {
  long news = 0, mallocs = 0;
  void start() {
    alloc_count::news = 0;
    alloc_count::mallocs = 0;
    alloc_count::on = true;
  }
  void stop() {
    alloc_count::on = false;
    news = alloc_count::news.load();
    mallocs = alloc_count::mallocs.load();
  }
};

// ViT-S/16 inference, batch 8 at 224 x 224.
struct infer_case {
  static constexpr std::int64_t batch = 8, size = 224;
  dino::param_layout L;
  dino::nn::vit v;
  dino::flat_params<float> P;
  dino::nn::vit_pack<float> pk;
  std::vector<float> img, y, scratch;
  explicit infer_case(const dino::cpu_policy& pol) : v(dino::nn::vit_small(16), L), P(L) {
    dino::nn::initialize(P, 1);
    pk = v.make_pack<float>(pol, {{batch, size, size}});
    img.resize(static_cast<std::size_t>(batch * 3 * size * size));
    fill_normal(img, 2);
    y.resize(static_cast<std::size_t>(batch * v.out_dim()));
    scratch.resize(v.infer_scratch_elems(pk));
  }
  void run(const dino::cpu_policy& pol) {
    const float* sets[1] = {img.data()};
    v.infer(pol, dino::host_view<const float>{P.data(), {std::int64_t(P.size())}, "P"}, pk,
            std::span<const float* const>(sets, 1), dino::host_view<float>{y.data(), {batch, v.out_dim()}, "y"},
            dino::host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
  }
};

// The SMALL DINO step.
struct train_case {
  static constexpr std::int64_t batch = 64, global = 28, local = 12;
  static constexpr int n_local = 6;
  using method_t = dino::ssl::dino_method<dino::nn::vit>;
  method_t m;
  std::vector<float> g[2], l[2];
  int next = 0;
  double last_loss = 0;
  long skipped = 0;

  static dino::nn::vit_config vcfg(int checkpoint_blocks, bool pointwise = false) {
    dino::nn::vit_config c = dino::nn::vit_small28(4);
    c.drop_path_rate = 0.1;
    c.checkpoint_blocks = checkpoint_blocks;
    c.recompute_pointwise = pointwise;
    return c;
  }
  static dino::ssl::dino_config dcfg() {
    dino::ssl::dino_config c;
    c.head.out_dim = 4096;
    c.head.hidden_dim = 512;
    c.head.bottleneck_dim = 128;
    c.local_crops = n_local;
    c.train.max_batch = batch;
    c.train.crops = {global, local};
    c.train.freeze_last_layer = 0;  // every step runs the whole backward
    c.train.schedule.epochs = 100;
    c.train.schedule.iters_per_epoch = 100;
    c.train.schedule.batch_size = batch;
    return c;
  }
  // The step's buffers planned for pol (a bf16_operands policy needs its packs).
  train_case(int checkpoint_blocks, bool pointwise, const dino::cpu_policy& pol)
      : m(dino::ssl::make_dino<dino::nn::vit>(vcfg(checkpoint_blocks, pointwise), vcfg(0).embed_dim, dcfg())) {
    m.plan_for(pol);
    for (int s = 0; s < 2; ++s) {
      g[s].resize(static_cast<std::size_t>(2 * batch * global * global));
      l[s].resize(static_cast<std::size_t>(n_local * batch * local * local));
      fill_normal(g[s], 10 + std::uint64_t(s));
      fill_normal(l[s], 20 + std::uint64_t(s));
    }
  }
  void run(const dino::cpu_policy& pol) {
    const auto st = m.step(pol, dino::ssl::image_crops<float>{g[next].data(), l[next].data()});
    next ^= 1;
    last_loss = st.loss;
    skipped += st.skipped ? 1 : 0;
  }
};

void bench_infer(const options& o) {
  const dino::cpu_policy pol = o.policy();
  infer_case c(pol);
  const timing t = time_calls(o.warmup, o.reps, [&] { c.run(pol); });
  emit("dino infer vit_s16_224_b8" + o.suffix() + " threads=" + std::to_string(o.threads) + " images_per_s=" +
       fmt("%.2f", double(infer_case::batch) * 1e3 / t.median_ms) + " ms_per_step=" + fmt("%.2f", t.median_ms) +
       " min_ms=" + fmt("%.2f", t.min_ms) + " max_ms=" + fmt("%.2f", t.max_ms) + " reps=" + std::to_string(o.reps));
}

void bench_train(const options& o) {
  const dino::cpu_policy pol = o.policy();
  train_case c(o.checkpoint_blocks, o.pointwise, pol);
  const timing t = time_calls(o.warmup, o.reps, [&] { c.run(pol); });
  emit("dino train small28_b64" + std::string(o.checkpoint_blocks ? "_ckpt" + std::to_string(o.checkpoint_blocks) : "") +
       (o.pointwise ? "_pointwise" : "") + o.suffix() +
       " threads=" + std::to_string(o.threads) + " images_per_s=" +
       fmt("%.2f", double(train_case::batch) * 1e3 / t.median_ms) + " ms_per_step=" + fmt("%.1f", t.median_ms) +
       " min_ms=" + fmt("%.1f", t.min_ms) + " max_ms=" + fmt("%.1f", t.max_ms) + " reps=" + std::to_string(o.reps) +
       " loss=" + fmt("%.4f", c.last_loss) + " skipped=" + std::to_string(c.skipped) +
       " workspace_MiB=" + fmt("%.1f", double(c.m.workspace_bytes()) / (1 << 20)) +
       " activations_MiB=" + fmt("%.1f", double(c.m.memory().activations) / (1 << 20)));
}

void bench_allocs(const options& o) {
  const dino::cpu_policy pol = o.policy();
  const int steps = 3;
  {
    train_case c(0, false, pol);
    for (int i = 0; i < std::max(2, o.warmup); ++i) c.run(pol);
    alloc_window w;
    w.start();
    for (int i = 0; i < steps; ++i) c.run(pol);
    w.stop();
    emit("dino allocs small28_b64 threads=" + std::to_string(o.threads) + " new_per_step=" +
         fmt("%.2f", double(w.news) / steps) + " malloc_per_step=" + fmt("%.2f", double(w.mallocs) / steps) +
         " steps=" + std::to_string(steps));
  }
  {
    infer_case c(pol);
    for (int i = 0; i < 2; ++i) c.run(pol);
    alloc_window w;
    w.start();
    for (int i = 0; i < steps; ++i) c.run(pol);
    w.stop();
    emit("dino allocs vit_s16_224_b8 threads=" + std::to_string(o.threads) + " new_per_step=" +
         fmt("%.2f", double(w.news) / steps) + " malloc_per_step=" + fmt("%.2f", double(w.mallocs) / steps) +
         " steps=" + std::to_string(steps));
  }
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto val = [&](const char* name) -> const char* {
      const std::size_t n = std::strlen(name);
      if (a.compare(0, n, name) == 0 && a.size() > n && a[n] == '=') return argv[i] + n + 1;
      if (a == name && i + 1 < argc) return argv[++i];
      return nullptr;
    };
    if (const char* v = val("--threads")) o.threads = std::max(1, std::atoi(v));
    else if (const char* v = val("--reps")) o.reps = std::max(1, std::atoi(v));
    else if (const char* v = val("--warmup")) o.warmup = std::max(0, std::atoi(v));
    else if (const char* v = val("--only")) o.only = v;
    else if (const char* v = val("--checkpoint-blocks")) o.checkpoint_blocks = std::max(0, std::atoi(v));
    else if (a == "--recompute-pointwise") o.pointwise = true;
    else if (const char* v = val("--precision"); v && (std::strcmp(v, "fp32") == 0 || std::strcmp(v, "bf16") == 0 ||
                                                       std::strcmp(v, "bf16_operands") == 0)) {
      o.bf16 = std::strcmp(v, "fp32") != 0;
      o.operands = std::strcmp(v, "bf16_operands") == 0;
    }
    else if (const char* v = val("--benchmark_out")) o.out = v;
    else if (a.rfind("--benchmark_", 0) == 0) continue;  // other Google Benchmark flags: ignored
    else {
      std::fprintf(stderr, "usage: %s [--threads N] [--reps R] [--warmup W] [--only infer|train|allocs] [--checkpoint-blocks N] [--recompute-pointwise] [--precision fp32|bf16|bf16_operands]\n", argv[0]);
      return 2;
    }
  }
  if (const char* t = std::getenv("DINO_BENCH_ALLOC_TRACE")) {
    void* f[4];
    backtrace(f, 4);  // loads libgcc's unwinder before counting starts
    alloc_count::trace_left = std::atol(t);
  }
#if defined(_OPENMP)
  omp_set_num_threads(o.threads);
#endif
  try {
    if (o.only.empty() || o.only == "infer") bench_infer(o);
    if (o.only.empty() || o.only == "train") bench_train(o);
    if (o.only.empty() || o.only == "allocs") bench_allocs(o);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_vit: %s\n", e.what());
    return 1;
  }
  if (!o.out.empty()) {  // {"benchmarks": [{"name": "dino infer vit_s16_224_b8", "threads": 2, ...}, ...]}
    if (FILE* f = std::fopen(o.out.c_str(), "w")) {
      std::fprintf(f, "{\"benchmarks\": [");
      for (std::size_t i = 0; i < g_lines.size(); ++i) {
        const std::string& l = g_lines[i];
        std::size_t p = 0;
        for (int k = 0; k < 3 && p != std::string::npos; ++k) p = l.find(' ', p + 1);  // after "dino <kind> <name>"
        std::fprintf(f, "%s\n  {\"name\": \"%s\"", i ? "," : "", l.substr(0, p).c_str());
        while (p != std::string::npos) {
          const std::size_t q = l.find(' ', p + 1), eq = l.find('=', p + 1);
          std::fprintf(f, ", \"%s\": %s", l.substr(p + 1, eq - p - 1).c_str(), l.substr(eq + 1, q - eq - 1).c_str());
          p = q;
        }
        std::fprintf(f, "}");
      }
      std::fprintf(f, "\n]}\n");
      std::fclose(f);
    }
  }
  return 0;
}
