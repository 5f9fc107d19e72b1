// Evaluation: weighted k-NN and the raw L1 baseline against brute force written plainly here,
// the linear probe (one SGD step by hand, separable data, chance), the 60 %-mass masks and
// Jaccard index on hand-made attention, PNG files read back with stb_image, the line plot
// and the attention overlays.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <numeric>
#include <string>
#include <vector>

#include <unistd.h>

#include <dino/core/rng.hpp>
#include <dino/eval/attention.hpp>
#include <dino/eval/attention_png.hpp>
#include <dino/eval/knn.hpp>
#include <dino/eval/linear_probe.hpp>
#include <dino/io/plot.hpp>
#include <dino/io/png.hpp>

#define STB_IMAGE_IMPLEMENTATION
#define STB_IMAGE_STATIC
#include <stb/stb_image.h>

using namespace dino;
namespace fs = std::filesystem;

namespace {

// ---------------------------------------------------------------- brute-force references
// eval_knn.py's knn_classifier for one k, in double, with the documented tie rules: neighbours
// by (similarity desc, index asc), classes by (score desc, index asc).
struct bf_acc {
  double top1, top5;
};
bf_acc brute_knn(const std::vector<float>& train, const std::vector<int>& ytr, const std::vector<float>& test,
                 const std::vector<int>& yte, std::int64_t D, int C, int k, double T) {
  const std::int64_t N = std::int64_t(ytr.size()), M = std::int64_t(yte.size());
  auto norm = [&](const std::vector<float>& x, std::int64_t n) {
    std::vector<float> y(x.size());
    for (std::int64_t r = 0; r < n; ++r) math::l2_normalize_row(&x[std::size_t(r * D)], &y[std::size_t(r * D)], int(D), 1e-12f);
    return y;
  };
  const std::vector<float> a = norm(train, N), b = norm(test, M);
  k = int(std::min<std::int64_t>(k, N));
  std::int64_t h1 = 0, h5 = 0;
  for (std::int64_t i = 0; i < M; ++i) {
    std::vector<std::pair<float, std::int64_t>> s(static_cast<std::size_t>(N));
    for (std::int64_t j = 0; j < N; ++j) {
      float dot = 0;
      for (std::int64_t d = 0; d < D; ++d) dot += b[std::size_t(i * D + d)] * a[std::size_t(j * D + d)];
      s[std::size_t(j)] = {dot, j};
    }
    std::partial_sort(s.begin(), s.begin() + k, s.end(), [](auto& x, auto& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    });
    std::vector<double> score(std::size_t(C), 0.0);
    for (int n = 0; n < k; ++n) score[std::size_t(ytr[std::size_t(s[std::size_t(n)].second)])] += std::exp(double(s[std::size_t(n)].first) / T);
    std::vector<int> cls(static_cast<std::size_t>(C));
    std::iota(cls.begin(), cls.end(), 0);
    std::stable_sort(cls.begin(), cls.end(), [&](int x, int y) { return score[std::size_t(x)] > score[std::size_t(y)]; });
    const int t = yte[std::size_t(i)];
    h1 += cls[0] == t;
    for (int n = 0; n < std::min(5, k) && n < C; ++n) h5 += cls[std::size_t(n)] == t;
  }
  return {double(h1) / double(M), double(h5) / double(M)};
}

template <class T>
double brute_l1(const std::vector<T>& train, const std::vector<int>& ytr, const std::vector<T>& test,
                const std::vector<int>& yte, std::int64_t D, int C, int k, const std::vector<std::int64_t>& rows) {
  const std::int64_t N = std::int64_t(ytr.size());
  std::int64_t hits = 0;
  for (std::int64_t i : rows) {
    std::vector<std::pair<double, std::int64_t>> d(static_cast<std::size_t>(N));
    for (std::int64_t j = 0; j < N; ++j) {
      double s = 0;
      for (std::int64_t e = 0; e < D; ++e) s += std::fabs(double(test[std::size_t(i * D + e)]) - double(train[std::size_t(j * D + e)]));
      d[std::size_t(j)] = {s, j};
    }
    std::sort(d.begin(), d.end());  // (distance, index) ascending
    std::vector<int> votes(std::size_t(C), 0);
    for (int n = 0; n < std::min<std::int64_t>(k, N); ++n) ++votes[std::size_t(ytr[std::size_t(d[std::size_t(n)].second)])];
    int best = 0;
    for (int c = 1; c < C; ++c)
      if (votes[std::size_t(c)] > votes[std::size_t(best)]) best = c;
    hits += best == yte[std::size_t(i)];
  }
  return double(hits) / double(rows.size());
}

// Gaussian clusters: class c centred at `sep` * e_c (c < D), noise `noise`.
void clusters(std::int64_t n, std::int64_t D, int C, double sep, double noise, std::uint64_t seed,
              std::vector<float>& x, std::vector<int>& y) {
  philox g(seed, 7);
  x.resize(std::size_t(n * D));
  y.resize(std::size_t(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const int c = int(g.next_u32() % std::uint32_t(C));
    y[std::size_t(i)] = c;
    for (std::int64_t d = 0; d < D; ++d) x[std::size_t(i * D + d)] = float((d == c % D ? sep : 0.0) + noise * g.normal());
  }
}

// Features with entries +-1 (optionally 0): every norm and dot product is exact in float, so
// similarities tie exactly and both implementations see the same numbers.
void pm_one(std::int64_t n, std::int64_t D, int C, std::uint64_t seed, std::vector<float>& x, std::vector<int>& y) {
  philox g(seed, 3);
  x.resize(std::size_t(n * D));
  y.resize(std::size_t(n));
  for (auto& v : x) v = (g.next_u32() & 1) ? 1.0f : -1.0f;
  for (auto& c : y) c = int(g.next_u32() % std::uint32_t(C));
}

struct temp_dir {
  fs::path path;
  temp_dir() {
    path = fs::temp_directory_path() / ("dino_test_eval_" + std::to_string(::getpid()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

struct loaded_png {
  int w = 0, h = 0, c = 0;
  std::vector<std::uint8_t> px;
};
loaded_png load_png(const std::string& path, int want = 0) {
  loaded_png r;
  unsigned char* p = stbi_load(path.c_str(), &r.w, &r.h, &r.c, want);
  REQUIRE(p != nullptr);
  const int ch = want ? want : r.c;
  r.px.assign(p, p + std::size_t(r.w) * std::size_t(r.h) * std::size_t(ch));
  stbi_image_free(p);
  return r;
}

}  // namespace

// ---------------------------------------------------------------- k-NN
TEST_CASE("knn_classify equals brute force on Gaussian features, for every k, with 1 and 2 threads") {
  const std::int64_t N = 500, M = 150, D = 16;
  const int C = 7;
  std::vector<float> tr, te;
  std::vector<int> ytr, yte;
  clusters(N, D, C, 1.5, 1.0, 1, tr, ytr);
  clusters(M, D, C, 1.5, 1.0, 2, te, yte);
  const std::vector<int> ks = {20, 1, 5, 10, 100, 200, 1000};
  const double T = 0.07;
  const auto r1 = eval::knn_classify(cpu_policy{1}, tr.data(), ytr.data(), N, te.data(), yte.data(), M, D, C, ks, T);
  const auto r2 = eval::knn_classify(cpu_policy{2}, tr.data(), ytr.data(), N, te.data(), yte.data(), M, D, C, ks, T);
  REQUIRE(r1.per_k.size() == ks.size());
  CHECK(r1.tested == M);
  for (std::size_t i = 0; i < ks.size(); ++i) {
    const auto& a = r1.per_k[i];
    CAPTURE(ks[i]);
    CHECK(a.requested_k == ks[i]);
    CHECK(a.k == std::min<int>(ks[i], int(N)));
    CHECK(a.has_top5);
    const bf_acc b = brute_knn(tr, ytr, te, yte, D, C, ks[i], T);
    // Float similarities from two summation orders: allow one test row to flip on a near-tie.
    CHECK(std::fabs(a.top1 - b.top1) <= 1.0 / double(M) + 1e-12);
    CHECK(std::fabs(a.top5 - b.top5) <= 1.0 / double(M) + 1e-12);
    CHECK(a.top1 == r2.per_k[i].top1);
    CHECK(a.top5 == r2.per_k[i].top5);
    CHECK(a.top1 > 1.5 / C);  // well above chance on clustered data
  }
  CHECK(r1.at(20).top1 == r1.per_k[0].top1);
  CHECK_THROWS_AS((void)r1.at(3), config_error);
}

TEST_CASE("knn_classify: exact ties (+-1 features) follow the documented order, across test chunks") {
  // 17 possible similarities: thousands of exact ties at every k boundary. N = 40,000 makes
  // the test rows run in chunks of 2^24 / N = 419.
  const std::int64_t N = 40000, M = 900, D = 16;
  const int C = 10;
  std::vector<float> tr, te;
  std::vector<int> ytr, yte;
  pm_one(N, D, C, 11, tr, ytr);
  pm_one(M, D, C, 12, te, yte);
  const std::vector<int> ks = {1, 4, 10, 200};
  const auto r = eval::knn_classify(cpu_policy{2}, tr.data(), ytr.data(), N, te.data(), yte.data(), M, D, C, ks);
  for (std::size_t i = 0; i < ks.size(); ++i) {
    CAPTURE(ks[i]);
    const bf_acc b = brute_knn(tr, ytr, te, yte, D, C, ks[i], 0.07);
    CHECK(r.per_k[i].top1 == b.top1);
    CHECK(r.per_k[i].top5 == b.top5);
  }
}

TEST_CASE("knn_classify: hand-made neighbours, top-5 capped at k, no top-5 below 5 classes, errors") {
  // Train on the unit circle; the test point at angle 0 is nearest to class 1 (two points
  // close by) although class 0 holds the single nearest point.
  auto pt = [](double a) { return std::vector<float>{float(std::cos(a)), float(std::sin(a))}; };
  std::vector<float> tr;
  for (double a : {0.05, 0.08, -0.09, 2.0, 2.5}) {
    auto p = pt(a);
    tr.insert(tr.end(), p.begin(), p.end());
  }
  const std::vector<int> ytr = {0, 1, 1, 2, 2};
  const std::vector<float> te = {3.0f, 0.0f};  // not normalised: knn normalises
  const std::vector<int> yte = {1};
  auto r = eval::knn_classify(cpu_policy{1}, tr.data(), ytr.data(), 5, te.data(), yte.data(), 1, 2, 3, {1, 3});
  CHECK(r.at(1).top1 == 0.0);  // k = 1: class 0
  CHECK(r.at(3).top1 == 1.0);  // k = 3: exp(s/T) of two class-1 points beat one class-0 point
  CHECK_FALSE(r.at(3).has_top5);
  CHECK(std::isnan(r.at(3).top5));
  // With 6 classes top-5 counts the first min(5, k) ranks: at k = 1 only the first.
  const std::vector<int> ytr6 = {0, 1, 1, 2, 5};
  r = eval::knn_classify(cpu_policy{1}, tr.data(), ytr6.data(), 5, te.data(), yte.data(), 1, 2, 6, {1, 2});
  CHECK(r.at(1).top5 == 0.0);
  CHECK(r.at(2).top5 == 1.0);
  const std::vector<int> bad = {0, 1, 7, 2, 2};
  CHECK_THROWS_AS(eval::knn_classify(cpu_policy{1}, tr.data(), bad.data(), 5, te.data(), yte.data(), 1, 2, 3, {1}),
                  shape_error);
  CHECK_THROWS_AS(eval::knn_classify(cpu_policy{1}, tr.data(), ytr.data(), 5, te.data(), yte.data(), 1, 2, 3, {0}),
                  config_error);
}

TEST_CASE("knn_raw_l1 equals brute force (float and uint8, ties, subsampling)") {
  const std::int64_t N = 300, M = 70, D = 37;  // D not a multiple of the 8/16-lane blocks
  const int C = 4;
  philox g(5, 1);
  std::vector<float> trf(std::size_t(N * D)), tef(std::size_t(M * D));
  std::vector<int> ytr(static_cast<std::size_t>(N)), yte(static_cast<std::size_t>(M));
  for (auto& v : trf) v = float(g.next_u32() % 4);  // few values: many equal distances and votes
  for (auto& v : tef) v = float(g.next_u32() % 4);
  for (std::int64_t i = 0; i < N; ++i) ytr[std::size_t(i)] = int(i % C);
  for (auto& y : yte) y = int(g.next_u32() % C);
  // Make labels depend on the data a little so accuracy is not just chance.
  for (std::int64_t i = 0; i < N; ++i) ytr[std::size_t(i)] = int(trf[std::size_t(i * D)]);
  for (std::int64_t i = 0; i < M; ++i) yte[std::size_t(i)] = int(tef[std::size_t(i * D)]);
  std::vector<std::uint8_t> tru(trf.begin(), trf.end()), teu(tef.begin(), tef.end());
  std::vector<std::int64_t> all(static_cast<std::size_t>(M));
  std::iota(all.begin(), all.end(), 0);
  for (int k : {1, 5, 8}) {
    CAPTURE(k);
    const double b = brute_l1(trf, ytr, tef, yte, D, C, k, all);
    const auto rf = eval::knn_raw_l1(cpu_policy{2}, trf.data(), ytr.data(), N, tef.data(), yte.data(), M, D, C, k);
    const auto ru = eval::knn_raw_l1(cpu_policy{1}, tru.data(), ytr.data(), N, teu.data(), yte.data(), M, D, C, k);
    CHECK(rf.top1 == b);
    CHECK(ru.top1 == b);
    CHECK(rf.tested == M);
    CHECK(rf.k == k);
  }
  // max_test = 20 evaluates rows floor(i * 70 / 20).
  std::vector<std::int64_t> sub;
  for (std::int64_t i = 0; i < 20; ++i) sub.push_back(i * M / 20);
  const auto rs = eval::knn_raw_l1(cpu_policy{2}, tru.data(), ytr.data(), N, teu.data(), yte.data(), M, D, C, 5, 20);
  CHECK(rs.tested == 20);
  CHECK(rs.top1 == brute_l1(trf, ytr, tef, yte, D, C, 5, sub));
}

// ---------------------------------------------------------------- linear probe
TEST_CASE("linear_probe: one full-batch SGD step equals the hand-computed gradient step") {
  const std::int64_t N = 12, D = 5;
  const int C = 3;
  std::vector<float> x;
  std::vector<int> y;
  clusters(N, D, C, 1.0, 1.0, 4, x, y);
  eval::linear_probe_config cfg;
  cfg.epochs = 1;
  cfg.batch_size = int(N);
  cfg.lr = 0.5;
  cfg.seed = 9;
  const auto r = eval::linear_probe(cpu_policy{1}, x.data(), y.data(), N, x.data(), y.data(), N, D, C, cfg);
  // The initial weights: N(0, 0.01^2) from the documented stream; recompute them.
  std::vector<double> W(std::size_t(C * D)), b(std::size_t(C), 0.0);
  philox g(9, rng_subsequence(eval::detail::rng_purpose_probe_init, 0));
  for (auto& w : W) w = double(float(0.01 * g.normal()));
  std::vector<double> gW(W.size(), 0.0), gb(b.size(), 0.0);
  double loss = 0;
  for (std::int64_t i = 0; i < N; ++i) {
    std::vector<double> l(static_cast<std::size_t>(C));
    double mx = -1e300;
    for (int c = 0; c < C; ++c) {
      l[std::size_t(c)] = b[std::size_t(c)];
      for (std::int64_t d = 0; d < D; ++d) l[std::size_t(c)] += W[std::size_t(c * D + d)] * x[std::size_t(i * D + d)];
      mx = std::max(mx, l[std::size_t(c)]);
    }
    double z = 0;
    for (double v : l) z += std::exp(v - mx);
    loss += mx + std::log(z) - l[std::size_t(y[std::size_t(i)])];
    for (int c = 0; c < C; ++c) {
      const double p = std::exp(l[std::size_t(c)] - mx) / z - (c == y[std::size_t(i)] ? 1.0 : 0.0);
      gb[std::size_t(c)] += p / double(N);
      for (std::int64_t d = 0; d < D; ++d) gW[std::size_t(c * D + d)] += p * x[std::size_t(i * D + d)] / double(N);
    }
  }
  CHECK(r.epoch_loss.size() == 1);
  CHECK(r.epoch_loss[0] == doctest::Approx(loss / double(N)).epsilon(1e-5));
  for (std::size_t i = 0; i < W.size(); ++i)
    CHECK(r.classifier.weight[i] == doctest::Approx(W[i] - 0.5 * gW[i]).epsilon(1e-4));
  for (std::size_t i = 0; i < b.size(); ++i) CHECK(r.classifier.bias[i] == doctest::Approx(-0.5 * gb[i]).epsilon(1e-4));
}

TEST_CASE("linear_probe: near 100 % on separable data (SGD and AdamW, every preprocessing), deterministic") {
  const std::int64_t N = 600, M = 300, D = 10;
  const int C = 6;
  std::vector<float> tr, te;
  std::vector<int> ytr, yte;
  clusters(N, D, C, 4.0, 0.4, 21, tr, ytr);
  clusters(M, D, C, 4.0, 0.4, 22, te, yte);
  for (auto opt : {eval::probe_optimizer::sgd, eval::probe_optimizer::adamw})
    for (auto feat : {eval::probe_features::none, eval::probe_features::l2, eval::probe_features::standardize}) {
      CAPTURE(int(opt));
      CAPTURE(int(feat));
      eval::linear_probe_config cfg;
      cfg.epochs = 20;
      cfg.batch_size = 32;
      cfg.lr = opt == eval::probe_optimizer::sgd ? 0.05 : 0.01;
      cfg.optimizer = opt;
      cfg.features = feat;
      const auto r = eval::linear_probe(cpu_policy{2}, tr.data(), ytr.data(), N, te.data(), yte.data(), M, D, C, cfg);
      CHECK(r.train_top1 >= 0.99);
      CHECK(r.test_top1 >= 0.99);
      CHECK(r.test_top5 == 1.0);
      CHECK(r.epoch_loss.back() < 0.5 * r.epoch_loss.front());
      const auto again = eval::linear_probe(cpu_policy{2}, tr.data(), ytr.data(), N, te.data(), yte.data(), M, D, C, cfg);
      CHECK(again.classifier.weight == r.classifier.weight);
      const auto pred = r.classifier.predict(cpu_policy{1}, te.data(), M);
      std::int64_t ok = 0;
      for (std::int64_t i = 0; i < M; ++i) ok += pred[std::size_t(i)] == yte[std::size_t(i)];
      CHECK(double(ok) / double(M) == r.test_top1);
    }
}

TEST_CASE("linear_probe: overlapping classes beat chance; another seed changes the run; errors") {
  const std::int64_t N = 800, M = 400, D = 8;
  const int C = 4;
  std::vector<float> tr, te;
  std::vector<int> ytr, yte;
  clusters(N, D, C, 1.0, 1.0, 31, tr, ytr);
  clusters(M, D, C, 1.0, 1.0, 32, te, yte);
  eval::linear_probe_config cfg;
  cfg.epochs = 10;
  cfg.batch_size = 64;
  cfg.lr = 0.05;
  const auto r = eval::linear_probe(cpu_policy{1}, tr.data(), ytr.data(), N, te.data(), yte.data(), M, D, C, cfg);
  CHECK(r.test_top1 > 0.25 + 0.15);
  CHECK(std::isnan(r.test_top5));  // fewer than 5 classes
  cfg.seed = 1;
  const auto r2 = eval::linear_probe(cpu_policy{1}, tr.data(), ytr.data(), N, te.data(), yte.data(), M, D, C, cfg);
  CHECK(r2.classifier.weight != r.classifier.weight);
  std::vector<int> bad = ytr;
  bad[3] = C;
  CHECK_THROWS_AS(eval::linear_probe(cpu_policy{1}, tr.data(), bad.data(), N, te.data(), yte.data(), M, D, C, cfg),
                  shape_error);
  cfg.epochs = 0;
  CHECK_THROWS_AS(eval::linear_probe(cpu_policy{1}, tr.data(), ytr.data(), N, te.data(), yte.data(), M, D, C, cfg),
                  config_error);
}

// ---------------------------------------------------------------- attention
TEST_CASE("mass_mask: the reference's 60 % procedure on hand-made maps") {
  std::vector<std::uint8_t> m(4);
  // One dominant patch (70 % of the mass): it alone holds >= 60 %.
  const float dom[4] = {0.1f, 0.7f, 0.1f, 0.1f};
  eval::mass_mask(dom, 4, 0.6, m.data());
  CHECK(m == std::vector<std::uint8_t>{0, 1, 0, 0});
  // 0.35 + 0.3 reach 60 % only together; scaling does not matter (the map is renormalised).
  const float two[4] = {3.5f, 0.5f, 3.0f, 3.0f};  // 35 %, 5 %, 30 %, 30 %: ties at 30 %
  eval::mass_mask(two, 4, 0.6, m.data());
  // Ascending with ties by index: 0.5(1), 3.0(2), 3.0(3), 3.5(0); cumsum .05 .35 .65 1: > .4 keeps 3 and 0.
  CHECK(m == std::vector<std::uint8_t>{1, 0, 0, 1});
  // Uniform over 8 patches: cumsum k/8 > 0.4 for k >= 4: the 5 patches last in the ascending
  // order, i.e. the highest indices.
  std::vector<float> uni(8, 1.0f);
  std::vector<std::uint8_t> m8(8);
  eval::mass_mask(uni.data(), 8, 0.6, m8.data());
  CHECK(m8 == std::vector<std::uint8_t>{0, 0, 0, 1, 1, 1, 1, 1});
  // All zero: nothing kept.
  const float zero[4] = {0, 0, 0, 0};
  eval::mass_mask(zero, 4, 0.6, m.data());
  CHECK(m == std::vector<std::uint8_t>{0, 0, 0, 0});
  // Random maps: the kept set is the smallest top set holding >= 60 % of the mass.
  philox g(3, 3);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<float> a(49);
    double sum = 0;
    for (auto& v : a) sum += (v = float(g.uniform_double() * g.uniform_double()));
    std::vector<std::uint8_t> k(49);
    eval::mass_mask(a.data(), 49, 0.6, k.data());
    double kept = 0, min_kept = 1e9, max_dropped = -1;
    for (int i = 0; i < 49; ++i) {
      if (k[std::size_t(i)]) kept += a[std::size_t(i)], min_kept = std::min(min_kept, double(a[std::size_t(i)]));
      else max_dropped = std::max(max_dropped, double(a[std::size_t(i)]));
    }
    CHECK(kept / sum >= 0.6 - 1e-9);
    CHECK((kept - min_kept) / sum < 0.6);
    CHECK(min_kept >= max_dropped);
  }
  CHECK_THROWS_AS(eval::mass_mask(dom, 4, 0.0, m.data()), config_error);
}

TEST_CASE("cls_patch_attention, upsample_nearest, foreground_mask, jaccard") {
  const float rows[2 * 5] = {0.5f, 0.1f, 0.2f, 0.1f, 0.1f, 0.2f, 0.4f, 0.1f, 0.2f, 0.1f};
  float out[8];
  eval::cls_patch_attention(rows, 2, 4, out);
  CHECK(std::vector<float>(out, out + 8) == std::vector<float>{0.1f, 0.2f, 0.1f, 0.1f, 0.4f, 0.1f, 0.2f, 0.1f});
  const std::uint8_t in[2 * 3] = {1, 2, 3, 4, 5, 6};
  std::uint8_t up[4 * 6];
  eval::upsample_nearest(in, 2, 3, 2, up);
  const std::uint8_t want[24] = {1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 4, 4, 5, 5, 6, 6};
  CHECK(std::equal(up, up + 24, want));
  const std::uint8_t px[5] = {0, 10, 11, 200, 9};
  std::uint8_t fg[5];
  eval::foreground_mask(px, 5, eval::fashion_mnist_foreground_threshold, fg);
  CHECK(std::vector<std::uint8_t>(fg, fg + 5) == std::vector<std::uint8_t>{0, 0, 1, 1, 0});
  const std::uint8_t a[4] = {1, 1, 0, 0}, b[4] = {0, 1, 1, 0}, z[4] = {0, 0, 0, 0}, c[4] = {0, 0, 1, 1};
  CHECK(eval::jaccard(a, b, 4) == doctest::Approx(1.0 / 3.0));
  CHECK(eval::jaccard(a, a, 4) == 1.0);
  CHECK(eval::jaccard(a, c, 4) == 0.0);
  CHECK(eval::jaccard(z, z, 4) == 1.0);
  CHECK(eval::jaccard(a, z, 4) == 0.0);
}

TEST_CASE("attention_jaccard: hand-made attention against hand-made masks, mean over heads and images") {
  // 2 x 2 patch grid, patch 2: images are 4 x 4. Head 0 looks at patch 0 (top left), head 1
  // spreads over patches 0 and 1 (the top half). CLS column first.
  const int heads = 2, gh = 2, gw = 2, p = 2;
  const std::vector<float> att = {
      0.1f, 0.81f, 0.03f, 0.03f, 0.03f,  // image 0, head 0
      0.1f, 0.45f, 0.43f, 0.01f, 0.01f,  // image 0, head 1
      0.1f, 0.81f, 0.03f, 0.03f, 0.03f,  // image 1, head 0
      0.1f, 0.45f, 0.43f, 0.01f, 0.01f,  // image 1, head 1
  };
  std::vector<std::uint8_t> ref(2 * 16, 0);
  for (int y = 0; y < 2; ++y)
    for (int x = 0; x < 2; ++x) ref[std::size_t(y * 4 + x)] = 1;  // image 0: the top-left block
  for (int y = 0; y < 2; ++y)
    for (int x = 0; x < 4; ++x) ref[std::size_t(16 + y * 4 + x)] = 1;  // image 1: the top half
  const auto r = eval::attention_jaccard(att.data(), 2, heads, gh, gw, p, ref.data());
  // image 0: head 0 J = 1, head 1 J = 4/8; image 1: head 0 J = 4/8, head 1 J = 1.
  CHECK(r.images == 2);
  CHECK(r.per_head[0] == doctest::Approx(0.75));
  CHECK(r.per_head[1] == doctest::Approx(0.75));
  CHECK(r.mean == doctest::Approx(0.75));
  // The same through gray images and the Fashion-MNIST threshold.
  std::vector<std::uint8_t> gray(ref.size());
  for (std::size_t i = 0; i < ref.size(); ++i) gray[i] = ref[i] ? 180 : 7;  // 7: the faint halo
  const auto f = eval::attention_jaccard_foreground(att.data(), 2, heads, gh, gw, p, gray.data());
  CHECK(f.mean == doctest::Approx(0.75));
}

// ---------------------------------------------------------------- PNG files and plots
TEST_CASE("write_png round trip through stb_image (gray, RGB, RGBA), atomic, errors") {
  temp_dir tmp;
  philox g(17, 0);
  for (int ch : {1, 3, 4}) {
    CAPTURE(ch);
    const int w = 37, h = 23;
    std::vector<std::uint8_t> px(static_cast<std::size_t>(w * h * ch));
    for (auto& v : px) v = std::uint8_t(g.next_u32());
    const std::string path = tmp / ("img" + std::to_string(ch) + ".png");
    io::write_png(path, w, h, ch, px.data());
    const loaded_png r = load_png(path);
    CHECK(r.w == w);
    CHECK(r.h == h);
    CHECK(r.c == ch);
    CHECK(r.px == px);
  }
  // Only the targets are left (no temporary files).
  int files = 0;
  for (const auto& e : fs::directory_iterator(tmp.path)) files += e.path().extension() == ".png" ? 1 : 100;
  CHECK(files == 3);
  const std::uint8_t one = 0;
  CHECK_THROWS_AS(io::write_png(tmp / "no_such_dir/x.png", 1, 1, 1, &one), io_error);
  CHECK_THROWS_AS(io::write_png(tmp / "bad.png", 0, 1, 1, &one), io_error);
  CHECK_THROWS_AS(io::write_png(tmp / "bad.png", 1, 1, 5, &one), io_error);
}

TEST_CASE("heat_color runs dark to light; text draws the glyph bits") {
  auto lum = [](std::array<std::uint8_t, 3> c) { return 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]; };
  double prev = -1;
  for (int i = 0; i <= 20; ++i) {
    const double l = lum(io::heat_color(i / 20.0));
    CHECK(l > prev);
    prev = l;
  }
  CHECK(io::heat_color(-3.0) == io::heat_color(0.0));
  CHECK(io::heat_color(7.0) == io::heat_color(1.0));
  CHECK(io::heat_color(std::nan("")) == io::heat_color(0.0));
  io::image_u8 img(12, 9, 3, 255);
  io::draw_text(img, 0, 0, "T1", {0, 0, 0});
  // 'T': the top row is solid, then only the middle column.
  for (int x = 0; x < 5; ++x) CHECK(img.at(x, 0)[0] == 0);
  CHECK(img.at(2, 4)[0] == 0);
  CHECK(img.at(0, 4)[0] == 255);
  CHECK(img.at(5, 0)[0] == 255);  // the blank column between glyphs
  CHECK(io::text_width("T1", 2) == 22);
}

TEST_CASE("plot_png writes a readable PNG with the series colours; bad series throw") {
  temp_dir tmp;
  io::series loss{"loss", {}, {}}, knn{"k-NN top-1", {0, 10, 20, 30}, {0.3, 0.6, 0.7, 0.74}};
  for (int i = 0; i < 500; ++i) loss.y.push_back(11.0 * std::exp(-i / 120.0) + 0.2 * std::sin(i * 0.2));
  loss.y[250] = std::nan("");  // skipped
  const std::string path = tmp / "plot.png";
  io::plot_png(path, "DINO training", "iteration", "value", {loss, knn});
  CHECK(fs::file_size(path) > 1000);
  const loaded_png r = load_png(path, 3);
  CHECK(r.w == 800);
  CHECK(r.h == 500);
  auto count = [&](std::uint8_t R, std::uint8_t G, std::uint8_t B) {
    std::int64_t n = 0;
    for (std::size_t i = 0; i < r.px.size(); i += 3) n += r.px[i] == R && r.px[i + 1] == G && r.px[i + 2] == B;
    return n;
  };
  CHECK(count(31, 119, 180) > 200);  // series 0 (tab10 blue)
  CHECK(count(255, 127, 14) > 100);  // series 1 (tab10 orange)
  CHECK(count(0, 0, 0) > 300);       // text
  const auto small = io::plot_image("", "", "", {io::series{"", {}, {1.0, 1.0}}}, 200, 150);
  CHECK(small.width == 200);
  CHECK_THROWS_AS(io::plot_png(tmp / "bad.png", "t", "x", "y", {io::series{"s", {1, 2}, {1}}}), shape_error);
  CHECK_THROWS_AS(io::plot_image("t", "x", "y", {}, 100, 100), shape_error);
  // An empty plot still renders axes.
  CHECK(io::plot_image("empty", "x", "y", {}).width == 800);
}

TEST_CASE("attention overlays: one PNG per head and the grids, with the expected sizes") {
  temp_dir tmp;
  const int heads = 3, gh = 7, gw = 7, p = 4, H = 28, W = 28;
  const std::int64_t np = gh * gw;
  std::vector<std::uint8_t> gray(std::size_t(2 * H * W), 0);
  for (int i = 0; i < 2; ++i)
    for (int y = 6; y < 22; ++y)
      for (int x = 8 + 2 * i; x < 20 + 2 * i; ++x) gray[std::size_t(i * H * W + y * W + x)] = 200;
  std::vector<float> att(std::size_t(2 * heads * (1 + np)));
  philox g(8, 8);
  for (int i = 0; i < 2; ++i)
    for (int h = 0; h < heads; ++h) {
      float* row = att.data() + (i * heads + h) * (1 + np);
      double s = 0;
      for (std::int64_t j = 0; j <= np; ++j) {
        const int py = int(j - 1) / gw, px = int(j - 1) % gw;
        const bool fg = j > 0 && py >= 2 && py < 5 && px >= 2 + h % 2 && px < 5;
        s += (row[j] = float((fg ? 5.0 : 0.2) * g.uniform_double()));
      }
      for (std::int64_t j = 0; j <= np; ++j) row[j] = float(row[j] / s);
    }
  eval::write_attention_pngs(tmp / "img0", gray.data(), H, W, att.data(), heads, gh, gw, p);
  for (int h = 0; h < heads; ++h) {
    const loaded_png r = load_png(tmp / ("img0-head" + std::to_string(h) + ".png"));
    CHECK(r.w == 112);  // 28 x 4: the automatic display scale
    CHECK(r.h == 112);
    CHECK(r.c == 3);
  }
  const loaded_png grid = load_png(tmp / "img0-heads.png");
  CHECK(grid.w == 4 * 112 + 5 * 4);
  eval::write_attention_grid(tmp / "grid.png", gray.data(), 2, H, W, att.data(), heads, gh, gw, p);
  const loaded_png g2 = load_png(tmp / "grid.png");
  CHECK(g2.w == 4 * 112 + 5 * 4);
  CHECK(g2.h > 2 * 112);
  CHECK_THROWS_AS(eval::write_attention_pngs(tmp / "bad", gray.data(), 27, 28, att.data(), heads, gh, gw, p),
                  shape_error);
}
