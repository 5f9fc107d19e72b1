// The method template assembled as DINO with an MLP stand-in backbone: it learns on
// synthetic clusters without collapsing, accumulates gradients exactly, skips non-finite
// steps, freezes the last layer during the first epoch, and allocates nothing per step.
#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <new>
#include <vector>

#include <dino/dino.hpp>

#include "gradcheck.hpp"

// Counts every C++ heap allocation of this test binary. aligned_alloc memory is released
// with free(), which GCC cannot see through:
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
static std::atomic<long> g_allocs{0};
void* operator new(std::size_t n) {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, std::align_val_t a) {
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  std::size_t al = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using namespace dino;

namespace {

constexpr int kIn = 16, kClusters = 8;

// Crops of `b` images drawn from kClusters Gaussian clusters, crop-major: crop v of image i
// is center[label_i] + noise (global crops sigma 0.3, local crops 0.6).
struct synthetic {
  std::vector<float> centers;
  explicit synthetic(std::uint64_t seed) : centers(std::size_t(kClusters * kIn)) {
    dino_test::fill_normal(centers, seed);
  }
  std::vector<int> labels(std::int64_t b, std::uint64_t step) const {
    std::vector<int> l(static_cast<std::size_t>(b));
    philox g(99, step);
    for (auto& x : l) x = int(g.next_u32() % kClusters);
    return l;
  }
  std::vector<float> crops(std::int64_t b, int n_crops, std::uint64_t step) const {
    auto l = labels(b, step);
    std::vector<float> x(std::size_t(n_crops * b * kIn));
    philox g(7, step);
    for (int v = 0; v < n_crops; ++v)
      for (std::int64_t i = 0; i < b; ++i)
        for (int d = 0; d < kIn; ++d)
          x[std::size_t((v * b + i) * kIn + d)] =
              centers[std::size_t(l[std::size_t(i)] * kIn + d)] + float(g.normal() * (v < 2 ? 0.3 : 0.6));
    return x;
  }
};

ssl::dino_config small_config(std::int64_t batch, std::int64_t epochs, std::int64_t iters) {
  ssl::dino_config c;
  c.head.out_dim = 64;
  c.head.hidden_dim = 64;
  c.head.bottleneck_dim = 16;
  c.local_crops = 4;
  c.train.max_batch = batch;
  c.train.schedule.epochs = epochs;
  c.train.schedule.iters_per_epoch = iters;
  c.train.schedule.batch_size = batch;
  c.train.schedule.lr = 0.05;
  c.train.schedule.min_lr = 1e-4;
  c.train.schedule.warmup_epochs = 1;
  c.train.schedule.momentum_teacher = 0.99;
  c.train.freeze_last_layer = 1;
  return c;
}
// PyTorch's default Linear init keeps the signal at unit scale through an MLP without
// normalisation layers (with std 0.02 the stand-in's output is ~1e-3 and DINO collapses,
// in the PyTorch reference too).
nn::mlp_config backbone_config() {
  nn::mlp_config c{{kIn, 64, 32}, false};
  c.weight_init = param_init::kaiming_uniform;
  return c;
}

// Fraction of images whose teacher prototype (argmax of the logits) is mostly used by
// images of their own cluster: 1/kClusters-ish for a constant output, 1 for a clustering.
template <class M>
double prototype_purity(M& m, const synthetic& data, const cpu_policy& pol) {
  const std::int64_t n = 512;
  auto x = data.crops(n, 1, 4242);
  auto labels = data.labels(n, 4242);
  const std::int64_t chunk = 64;  // the teacher's planned rows: 2 global crops x max_batch 32
  std::vector<int> proto(static_cast<std::size_t>(n));
  std::vector<std::vector<int>> votes;
  for (std::int64_t c0 = 0; c0 < n; c0 += chunk) {
    auto t = m.teacher_logits(pol, host_view<const float>{x.data() + c0 * kIn, {chunk, kIn}, "x"});
    const std::int64_t K = t.cols();
    votes.resize(static_cast<std::size_t>(K), std::vector<int>(kClusters, 0));
    for (std::int64_t i = 0; i < chunk; ++i) {
      // the prototype the target puts most mass on: argmax of the centered logits
      const float* c = m.target().center().data;
      int p = 0;
      for (std::int64_t k = 1; k < K; ++k)
        if (t.row(i)[k] - c[k] > t.row(i)[p] - c[p]) p = int(k);
      proto[std::size_t(c0 + i)] = p;
      votes[std::size_t(p)][std::size_t(labels[std::size_t(c0 + i)])]++;
    }
  }
  int pure = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const auto& v = votes[std::size_t(proto[std::size_t(i)])];
    pure += int(std::max_element(v.begin(), v.end()) - v.begin()) == labels[std::size_t(i)];
  }
  return double(pure) / double(n);
}

}  // namespace

TEST_CASE("DINO on an MLP learns synthetic clusters without collapsing") {
  const std::int64_t B = 32;
  auto m = ssl::make_dino<nn::mlp>(backbone_config(), 32, small_config(B, 10, 30));
  synthetic data(1);
  const cpu_policy pol{2};
  const double purity0 = prototype_purity(m, data, pol);
  double first = 0, last = 0, last_entropy = 0;
  int collapsed = 0;
  for (int it = 0; it < 300; ++it) {
    auto x = data.crops(B, 6, std::uint64_t(it));
    auto st = m.step(pol, host_view<const float>{x.data(), {6 * B, kIn}, "crops"});
    REQUIRE_FALSE(st.skipped);
    REQUIRE(std::isfinite(st.loss));
    if (it < 20) first += st.loss / 20;
    if (it >= 280) {
      last += st.loss / 20;
      last_entropy += st.teacher_entropy / 20;
      collapsed += st.collapsed;
    }
  }
  MESSAGE("loss first 20 steps " << first << ", last 20 " << last << ", teacher entropy " << last_entropy
                                 << " (ln K = " << std::log(64.0) << ")");
  CHECK(last < first);
  CHECK(collapsed == 0);
  CHECK(last_entropy > 0.1);                   // not a one-hot collapse
  CHECK(last_entropy < 0.9 * std::log(64.0));  // not a uniform collapse

  const double purity = prototype_purity(m, data, pol);
  MESSAGE("teacher prototype purity after training: " << purity << " (at initialisation: " << purity0 << ")");
  // A collapsed teacher (one prototype for everything) scores about 1/8 here; the random
  // initialisation already partitions these well-separated clusters, so this checks that
  // training kept a clustering, and the loss check above that it learned.
  CHECK(purity > 0.8);
}

TEST_CASE("gradient accumulation over two micro-batches equals one batch") {
  const std::int64_t B = 8;
  auto full = ssl::make_dino<nn::mlp>(backbone_config(), 32, small_config(B, 2, 4));
  auto half = small_config(B / 2, 2, 4);
  half.train.schedule.batch_size = B;  // the same images per optimizer step, so the same lr
  auto acc = ssl::make_dino<nn::mlp>(backbone_config(), 32, half);
  synthetic data(2);
  const cpu_policy pol{2};
  for (int it = 0; it < 6; ++it) {  // crosses into epoch 1, where the last layer trains too
    auto x = data.crops(B, 6, std::uint64_t(it));
    // split image-wise: each micro-batch is crop-major over its own 4 images
    std::vector<float> a(x.size() / 2), b(x.size() / 2);
    for (int v = 0; v < 6; ++v)
      for (std::int64_t i = 0; i < B; ++i) {
        auto* dst = (i < B / 2 ? a.data() : b.data()) + ((v * (B / 2) + i % (B / 2)) * kIn);
        std::copy_n(x.data() + (v * B + i) * kIn, kIn, dst);
      }
    auto s1 = full.step(pol, host_view<const float>{x.data(), {6 * B, kIn}, "crops"});
    host_view<const float> parts[2] = {{a.data(), {6 * B / 2, kIn}, "a"}, {b.data(), {6 * B / 2, kIn}, "b"}};
    auto s2 = acc.step(pol, std::span<const host_view<const float>>(parts, 2));
    CHECK(s2.loss == doctest::Approx(s1.loss).epsilon(1e-5));
  }
  const auto& L = full.layout();
  for (const auto& e : L.entries()) {
    std::vector<double> p1(full.student().data() + e.offset, full.student().data() + e.offset + e.numel());
    std::vector<double> p2(acc.student().data() + e.offset, acc.student().data() + e.offset + e.numel());
    CHECK_MESSAGE(dino_test::rel_error(p2, p1) < 1e-4, e.name);
  }
  std::vector<double> c1(full.target().center().data, full.target().center().data + 64);
  std::vector<double> c2(acc.target().center().data, acc.target().center().data + 64);
  CHECK(dino_test::rel_error(c2, c1) < 1e-5);
}

TEST_CASE("a non-finite input skips the step and changes nothing but the iteration") {
  const std::int64_t B = 4;
  auto m = ssl::make_dino<nn::mlp>(backbone_config(), 32, small_config(B, 2, 5));
  synthetic data(3);
  const cpu_policy pol{1};
  auto x = data.crops(B, 6, 0);
  m.step(pol, host_view<const float>{x.data(), {6 * B, kIn}, "crops"});
  std::vector<float> before(m.student().data(), m.student().data() + m.student().size());
  std::vector<float> teacher(m.teacher().data(), m.teacher().data() + m.teacher().size());
  std::vector<float> center(m.target().center().data, m.target().center().data + 64);
  x[17] = std::numeric_limits<float>::quiet_NaN();
  auto st = m.step(pol, host_view<const float>{x.data(), {6 * B, kIn}, "crops"});
  CHECK(st.skipped);
  CHECK(std::string(st.skip_reason) == "non-finite loss");
  CHECK(m.iteration() == 2);
  CHECK(std::equal(before.begin(), before.end(), m.student().data()));
  CHECK(std::equal(teacher.begin(), teacher.end(), m.teacher().data()));
  CHECK(std::equal(center.begin(), center.end(), m.target().center().data));
  x[17] = 0.0f;
  st = m.step(pol, host_view<const float>{x.data(), {6 * B, kIn}, "crops"});
  CHECK_FALSE(st.skipped);
  CHECK(std::isfinite(st.loss));
}

TEST_CASE("the last layer is frozen during the first epoch; g stays 1 with norm_last_layer") {
  const std::int64_t B = 4;
  auto m = ssl::make_dino<nn::mlp>(backbone_config(), 32, small_config(B, 3, 3));
  synthetic data(4);
  const cpu_policy pol{2};
  auto v0 = m.student().view("head.last_layer.weight_v");
  std::vector<float> v_init(v0.data, v0.data + v0.numel());
  auto w0 = m.student().view("head.mlp.0.weight");
  std::vector<float> w_init(w0.data, w0.data + w0.numel());
  for (int it = 0; it < 3; ++it) {
    auto x = data.crops(B, 6, std::uint64_t(it));
    auto st = m.step(pol, host_view<const float>{x.data(), {6 * B, kIn}, "crops"});
    CHECK(st.epoch == 0);
  }
  CHECK(std::equal(v_init.begin(), v_init.end(), m.student().view("head.last_layer.weight_v").data));
  CHECK_FALSE(std::equal(w_init.begin(), w_init.end(), m.student().view("head.mlp.0.weight").data));
  auto x = data.crops(B, 6, 3);
  CHECK(m.step(pol, host_view<const float>{x.data(), {6 * B, kIn}, "crops"}).epoch == 1);
  CHECK_FALSE(std::equal(v_init.begin(), v_init.end(), m.student().view("head.last_layer.weight_v").data));
  auto g = m.student().view("head.last_layer.weight_g");
  for (std::int64_t k = 0; k < g.numel(); ++k) REQUIRE(g[k] == 1.0f);
  CHECK(m.optimizer().steps()[m.layout().entries().size() - 1] == 1);  // weight_v: one step since epoch 1
}

TEST_CASE("a steady-state step makes no C++ heap allocation") {
  const std::int64_t B = 8;
  auto m = ssl::make_dino<nn::mlp>(backbone_config(), 32, small_config(B, 2, 10));
  synthetic data(5);
  const cpu_policy pol{2};
  auto x = data.crops(B, 6, 0);
  host_view<const float> xv{x.data(), {6 * B, kIn}, "crops"};
  for (int i = 0; i < 3; ++i) m.step(pol, xv);
  const long before = g_allocs.load();
  for (int i = 0; i < 5; ++i) m.step(pol, xv);
  const long during = g_allocs.load() - before;
  MESSAGE("operator new calls in 5 steady-state steps: " << during << "; planned workspace " << m.workspace_bytes()
                                                          << " bytes");
  CHECK(during == 0);
}

TEST_CASE("the memory report: parameters, optimizer, workspace and the activations kept for the backward") {
  const auto report = [](std::int64_t B) {
    auto m = ssl::make_dino<nn::mlp>(backbone_config(), 32, small_config(B, 2, 10));
    const auto r = m.memory();
    const std::size_t P = m.layout().size() * sizeof(float);
    CHECK(r.parameters == 3 * P);  // student, teacher, gradients
    CHECK(r.optimizer == 2 * P);   // AdamW's two moments
    CHECK(r.workspace == m.workspace_bytes());
    CHECK(r.activations > 0);
    CHECK(r.activations + r.scratch < r.workspace);
    CHECK(r.total() == r.parameters + r.optimizer + r.workspace);
    return r;
  };
  const auto a = report(4), b = report(8);
  CHECK(a.parameters == b.parameters);
  CHECK(b.activations > a.activations);  // rows kept per crop, plus a part that does not grow with the batch
  CHECK(b.activations < 2 * a.activations);
  MESSAGE("activations kept at batch 4 / 8: " << a.activations << " / " << b.activations << " bytes");
  CHECK(b.workspace > a.workspace);
}

TEST_CASE("plan_for: planning again for the policy, only before the first step") {
  const std::int64_t B = 4;
  auto m = ssl::make_dino<nn::mlp>(backbone_config(), 32, small_config(B, 2, 10));
  const cpu_policy pol{1};
  const auto before = m.memory();
  m.plan_for(pol);  // the CPU's attention keeps P: the same plan
  CHECK(m.memory().workspace == before.workspace);
  CHECK(m.memory().activations == before.activations);
  synthetic data(5);
  auto x = data.crops(B, 6, 0);
  const auto st = m.step(pol, host_view<const float>{x.data(), {6 * B, kIn}, "crops"});
  CHECK(std::isfinite(st.loss));
  CHECK_THROWS_AS(m.plan_for(pol), config_error);
}

// The example part of docs/api.md ("Writing a part"), verbatim.
template <class T>
struct sharpen_only {
  std::int64_t K;
  std::int64_t out_dim() const { return K; }
  double targets(const dino::cpu_policy& pol, dino::host_view<const T> t, double tau,
                 dino::host_view<T> q, dino::host_view<T> h) const {
    dino::for_each_row(pol, t.rows(), [&](std::int64_t r) {
      dino::math::softmax_row(t.row(r), static_cast<const T*>(nullptr), q.row(r), int(K), T(1 / tau));
      h[r] = dino::math::entropy_row(q.row(r), int(K));
    });
    double s = 0;
    for (std::int64_t r = 0; r < t.rows(); ++r) s += h[r];
    return s / double(t.rows());
  }
  void observe(const dino::cpu_policy&, dino::host_view<const T>) {}
  void commit() {}
  void discard() {}
};

TEST_CASE("a user's own part (docs/api.md) assembles and trains") {
  using my_method = dino::ssl::method<dino::nn::mlp, dino::ssl::dino_head, sharpen_only<float>,
                                      dino::ssl::cross_entropy_distillation, dino::ssl::ema_update>;
  static_assert(ssl::teacher_target<sharpen_only<float>>);
  auto c = small_config(4, 1, 5);
  my_method m(backbone_config(), ssl::dino_head_config{32, 64, 64, 16, 3, true}, sharpen_only<float>{64},
              ssl::cross_entropy_distillation({6, 2, 0.1}), ssl::ema_update{}, c.train);
  synthetic data(6);
  for (int it = 0; it < 5; ++it) {
    auto x = data.crops(4, 6, std::uint64_t(it));
    auto st = m.step(cpu_policy{1}, host_view<const float>{x.data(), {24, kIn}, "crops"});
    CHECK_FALSE(st.skipped);
    CHECK(std::isfinite(st.loss));
  }
}

TEST_CASE("per-step values read from memory (step_value::read_at) give what the values give") {
  // What a GPU step graph relies on, through the host's forms of the same parts.
  const cpu_policy pol{1};
  // EMA teacher update
  std::vector<float> s(37), t1(37), t2;
  dino_test::fill_normal(s, 1);
  dino_test::fill_normal(t1, 2);
  t2 = t1;
  const double m = 0.9731;
  ssl::ema(pol, host_view<float>{t1.data(), {37}, "t"}, host_view<const float>{s.data(), {37}, "s"}, m);
  ssl::ema(pol, host_view<float>{t2.data(), {37}, "t"}, host_view<const float>{s.data(), {37}, "s"},
           step_value<double>::read_at(&m));
  CHECK(t1 == t2);
  // centering targets at a temperature
  ssl::centering<float> cen({8, 0.9});
  std::vector<float> logits(3 * 8), q1(24), q2(24), e1(3), e2(3);
  dino_test::fill_normal(logits, 3);
  const double tau = 0.0613;
  const host_view<const float> tv{logits.data(), {3, 8}, "t"};
  const double h1 = cen.targets(pol, tv, tau, host_view<float>{q1.data(), {3, 8}, "q"}, host_view<float>{e1.data(), {3}, "e"});
  const double h2 = cen.targets(pol, tv, step_value<double>::read_at(&tau), host_view<float>{q2.data(), {3, 8}, "q"},
                                host_view<float>{e2.data(), {3}, "e"});
  CHECK(q1 == q2);
  CHECK(h1 == h2);
  // AdamW with the learning rate and weight decay read from memory (both or neither)
  param_layout L;
  L.add("w", {5, 3}, param_none, param_init::zeros);
  L.add("b", {5}, param_no_weight_decay, param_init::zeros);
  flat_params<float> p1(L), p2(L), g(L);
  for (std::size_t i = 0; i < p1.size(); ++i) p1.data()[i] = p2.data()[i] = 0.1f * float(i % 7) - 0.3f, g.data()[i] = 0.05f * float(i % 5);
  optim::adamw<float> o1(L), o2(L);
  const double lr = 3e-3, wd = 0.07;
  for (int k = 0; k < 3; ++k) {
    o1.step(pol, p1, g, lr, wd);
    o2.step(pol, p2, g, step_value<double>::read_at(&lr), step_value<double>::read_at(&wd));
  }
  CHECK(std::vector<float>(p1.data(), p1.data() + p1.size()) == std::vector<float>(p2.data(), p2.data() + p2.size()));
  CHECK_THROWS_AS(o2.step(pol, p2, g, step_value<double>::read_at(&lr), wd), config_error);
  // DropPath draws of a step
  const std::uint64_t step = 41;
  std::vector<float> d1(16), d2(16);
  const nn::detail::drop_path_fn<float> f1{d1.data(), 8, 0.4, 7, step, 1};
  const nn::detail::drop_path_fn<float> f2{d2.data(), 8, 0.4, 7, step_value<std::uint64_t>::read_at(&step), 1};
  for (std::int64_t r = 0; r < 16; ++r) f1(r), f2(r);
  CHECK(d1 == d2);
  const nn::detail::drop_path_fn<float> f3{d2.data(), 8, 0.4, 7, step + 1, 1};
  for (std::int64_t r = 0; r < 16; ++r) f3(r);
  CHECK(d1 != d2);  // another step draws other masks (what a frozen step would repeat)
}
