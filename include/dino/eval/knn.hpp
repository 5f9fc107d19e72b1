// dino/eval/knn.hpp: k-nearest-neighbour classification of frozen features.
//
// knn_classify is the weighted k-NN of the reference's eval_knn.py (dino-spec §5.1):
//   1. train [N, D] and test [M, D] rows are L2-normalised (x / max(||x||, 1e-12), as
//      torch.nn.functional.normalize); the inputs are not modified (normalised copies).
//   2. s_ij = <test_i, train_j> (cosine similarity), computed with dino::gemm over chunks of
//      test rows (at most ~16M similarities at a time: the [M, N] matrix is never formed).
//   3. For each k: the k train rows of highest similarity vote, neighbour j adding
//      exp(s_ij / T) to the score of its class (T = 0.07 by default).
//   4. Classes are ranked by score; top-1 is correct when the first is the label, top-5 when
//      the label is among the first min(5, k) (the reference's correct.narrow(1, 0, min(5, k))).
// k is capped at N. Accuracies are fractions in [0, 1]; top-5 is reported only with at least
// 5 classes (has_top5; NaN otherwise: the reference's top-5 needs 5 ranked classes).
//
// Ties, which the reference leaves to torch.topk and torch.sort: a neighbour of equal
// similarity ranks before another when its train index is lower; a class of equal score ranks
// before another when its class index is lower (so the classes without votes rank by index).
//
// knn_raw_l1 is the plain baseline of the Fashion-MNIST benchmark (raw pixels, scikit-learn's
// KNeighborsClassifier(n_neighbors = 5, p = 1, weights = "uniform"), 85.4 % reported): the k
// train rows of smallest L1 distance sum_d |a_d - b_d| vote one each, the most votes win.
// Ties: equal distances rank by lower train index; equal vote counts go to the lower class
// index (scipy.stats.mode's choice, which scikit-learn uses). Exact: M * N * D operations
// (10,000 x 60,000 x 784 = 4.7e11 for Fashion-MNIST). On std::uint8_t pixels the inner loop
// is a plain integer reduction that compilers turn into sum-of-absolute-differences
// instructions: the whole test set takes ~7 s on two cores (float: ~70 s). max_test > 0
// evaluates only max_test test rows, evenly spaced (rows floor(i * M / max_test)), for quick
// checks. Blocks of 16 test rows share each pass over the train set.
//
// Both run on the CPU policy's threads (OpenMP over test rows, Eigen's GEMM); results do not
// depend on the thread count (the per-row work is independent and the threaded GEMM splits the
// output, not the dot products). Labels must lie in [0, num_classes) (shape_error otherwise).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/math/normalize.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::eval {

/// Accuracy of one k.
struct knn_accuracy {
  int k = 0;             ///< the k used (the requested k capped at N)
  int requested_k = 0;   ///< the k asked for
  double top1 = 0;       ///< fraction of test rows whose first class is the label
  double top5 = std::numeric_limits<double>::quiet_NaN();  ///< label among the first min(5, k); NaN if < 5 classes
  bool has_top5 = false;
};

struct knn_result {
  std::vector<knn_accuracy> per_k;  ///< in the order of the requested ks
  std::int64_t tested = 0;          ///< test rows evaluated

  /// The entry for a requested k (config_error if it was not requested).
  const knn_accuracy& at(int requested_k) const {
    for (const auto& a : per_k)
      if (a.requested_k == requested_k) return a;
    throw config_error(dino::detail::concat("knn_result: k = ", requested_k, " was not evaluated"));
  }
};

namespace detail {
inline void check_labels(const char* where, const char* what, const int* labels, std::int64_t n, int num_classes) {
  for (std::int64_t i = 0; i < n; ++i)
    require<shape_error>(labels[i] >= 0 && labels[i] < num_classes, where, ": ", what, "[", i, "] = ", labels[i],
                         " lies outside [0, ", num_classes, ")");
}

/// Rank of class t among scores: the number of classes ranked before it (higher score, or
/// equal score and lower index).
inline int class_rank(const double* score, int num_classes, int t) {
  int r = 0;
  for (int c = 0; c < num_classes; ++c) r += score[c] > score[t] || (score[c] == score[t] && c < t);
  return r;
}

/// (value, index) pairs ordered best first: higher value, then lower index.
struct best_first_desc {
  bool operator()(const std::pair<float, std::int64_t>& a, const std::pair<float, std::int64_t>& b) const {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }
};
}  // namespace detail

/// Weighted k-NN accuracy of test against train (see the header comment).
/// train [N, D], train_labels [N], test [M, D], test_labels [M], row-major float.
inline knn_result knn_classify(const cpu_policy& pol, const float* train, const int* train_labels, std::int64_t N,
                               const float* test, const int* test_labels, std::int64_t M, std::int64_t D,
                               int num_classes, std::vector<int> ks = {10, 20, 100, 200}, double T = 0.07) {
  const char* where = "knn_classify";
  require<shape_error>(N > 0 && M > 0 && D > 0 && num_classes > 0, where, ": needs N, M, D and num_classes > 0, got N = ",
                       N, ", M = ", M, ", D = ", D, ", num_classes = ", num_classes);
  require<config_error>(!ks.empty(), where, ": no k requested");
  for (int k : ks) require<config_error>(k >= 1, where, ": k must be >= 1, got ", k);
  require<config_error>(T > 0 && std::isfinite(T), where, ": the temperature must be positive, got ", T);
  detail::check_labels(where, "train_labels", train_labels, N, num_classes);
  detail::check_labels(where, "test_labels", test_labels, M, num_classes);

  const int kmax = static_cast<int>(std::min<std::int64_t>(N, *std::max_element(ks.begin(), ks.end())));
  // Normalised train copy; test rows are normalised chunk by chunk.
  std::vector<float> tr(static_cast<std::size_t>(N * D));
  cpu::for_each_row(pol, N, [&](std::int64_t r) {
    math::l2_normalize_row(train + r * D, tr.data() + r * D, static_cast<int>(D), 1e-12f);
  });
  const std::int64_t chunk = std::clamp<std::int64_t>((std::int64_t{1} << 24) / N, 1, M);
  std::vector<float> te(static_cast<std::size_t>(chunk * D)), sim(static_cast<std::size_t>(chunk * N));

  // Per test row: the rank of its label among the classes for each k (sorted ks, prefix votes).
  std::vector<int> order(ks.size());
  for (std::size_t i = 0; i < ks.size(); ++i) order[i] = static_cast<int>(i);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return ks[std::size_t(a)] < ks[std::size_t(b)]; });
  std::vector<std::int64_t> hit1(ks.size(), 0), hit5(ks.size(), 0);
  [[maybe_unused]] const int threads = std::max(1, pol.threads);
  const std::size_t nk = ks.size();
  std::vector<int> rank(static_cast<std::size_t>(chunk) * nk);  // [row, k]: the label's class rank

  for (std::int64_t c0 = 0; c0 < M; c0 += chunk) {
    const std::int64_t rows = std::min(chunk, M - c0);
    cpu::for_each_row(pol, rows, [&](std::int64_t r) {
      math::l2_normalize_row(test + (c0 + r) * D, te.data() + r * D, static_cast<int>(D), 1e-12f);
    });
    cpu::gemm(pol, cpu::gemm_desc{false, true, rows, N, D}, 1.0f, te.data(), tr.data(), 0.0f, sim.data());
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
      std::vector<std::pair<float, std::int64_t>> heap;  // the kmax best, top = the worst kept
      heap.reserve(static_cast<std::size_t>(kmax));
      std::vector<double> score(static_cast<std::size_t>(num_classes));
      const detail::best_first_desc better;
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
      for (std::int64_t r = 0; r < rows; ++r) {
        const float* s = sim.data() + r * N;
        heap.clear();
        for (std::int64_t j = 0; j < N; ++j) {
          const std::pair<float, std::int64_t> cand{s[j], j};
          if (static_cast<int>(heap.size()) < kmax) {
            heap.push_back(cand);
            std::push_heap(heap.begin(), heap.end(), better);
          } else if (better(cand, heap.front())) {
            std::pop_heap(heap.begin(), heap.end(), better);
            heap.back() = cand;
            std::push_heap(heap.begin(), heap.end(), better);
          }
        }
        std::sort(heap.begin(), heap.end(), better);
        std::fill(score.begin(), score.end(), 0.0);
        const int label = test_labels[c0 + r];
        int used = 0;
        for (int oi : order) {  // ks ascending: the votes of k extend those of the smaller k
          const int k = std::min(ks[std::size_t(oi)], kmax);
          for (; used < k; ++used)
            score[std::size_t(train_labels[heap[std::size_t(used)].second])] +=
                std::exp(double(heap[std::size_t(used)].first) / T);
          rank[std::size_t(r) * nk + std::size_t(oi)] = detail::class_rank(score.data(), num_classes, label);
        }
      }
    }
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::size_t i = 0; i < nk; ++i) {
        const int rk = rank[std::size_t(r) * nk + i];
        hit1[i] += rk == 0;
        hit5[i] += rk < std::min(5, std::min(ks[i], kmax));
      }
  }

  knn_result res;
  res.tested = M;
  for (std::size_t i = 0; i < ks.size(); ++i) {
    knn_accuracy a;
    a.requested_k = ks[i];
    a.k = std::min(ks[i], kmax);
    a.top1 = double(hit1[i]) / double(M);
    a.has_top5 = num_classes >= 5;
    if (a.has_top5) a.top5 = double(hit5[i]) / double(M);
    res.per_k.push_back(a);
  }
  return res;
}

/// Result of the raw L1 baseline.
struct knn_l1_result {
  int k = 0;                ///< the k used (capped at N)
  double top1 = 0;          ///< fraction of the evaluated test rows classified correctly
  std::int64_t tested = 0;  ///< test rows evaluated (M, or max_test when smaller)
};

namespace detail {
/// L1 distances from `rows` test rows (contiguous, [rows, D]) to one train row, into dist[rows].
template <class T>
inline void l1_block(const T* test_rows, int rows, const T* b, std::int64_t D, double* dist) {
  if constexpr (std::is_same_v<T, std::uint8_t>) {
    // A plain integer reduction: compilers turn it into sum-of-absolute-differences
    // instructions (psadbw), which an unrolled form would hide.
    for (int r = 0; r < rows; ++r) {
      const std::uint8_t* a = test_rows + r * D;
      std::int64_t s = 0;
      for (std::int64_t d0 = 0; d0 < D; d0 += std::int64_t{1} << 22) {  // 2^22 * 255 fits an int
        const std::int64_t d1 = std::min(D, d0 + (std::int64_t{1} << 22));
        int part = 0;
        for (std::int64_t d = d0; d < d1; ++d) part += std::abs(int(a[d]) - int(b[d]));
        s += part;
      }
      dist[r] = double(s);
    }
  } else {
    for (int r = 0; r < rows; ++r) {
      const T* a = test_rows + r * D;
      T acc[8] = {};
      std::int64_t d = 0;
      for (; d + 8 <= D; d += 8)
        for (int l = 0; l < 8; ++l) acc[l] += std::fabs(a[d + l] - b[d + l]);
      double s = 0;
      for (; d < D; ++d) s += std::fabs(double(a[d]) - double(b[d]));
      for (int l = 0; l < 8; ++l) s += double(acc[l]);
      dist[r] = s;
    }
  }
}
}  // namespace detail

/// Unweighted k-NN with the L1 distance on raw values (see the header comment).
/// T is float or std::uint8_t. max_test <= 0 evaluates all M test rows.
template <class T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, std::uint8_t>)
inline knn_l1_result knn_raw_l1(const cpu_policy& pol, const T* train, const int* train_labels, std::int64_t N,
                                const T* test, const int* test_labels, std::int64_t M, std::int64_t D, int num_classes,
                                int k = 5, std::int64_t max_test = 0) {
  const char* where = "knn_raw_l1";
  require<shape_error>(N > 0 && M > 0 && D > 0 && num_classes > 0, where, ": needs N, M, D and num_classes > 0, got N = ",
                       N, ", M = ", M, ", D = ", D, ", num_classes = ", num_classes);
  require<config_error>(k >= 1, where, ": k must be >= 1, got ", k);
  detail::check_labels(where, "train_labels", train_labels, N, num_classes);
  detail::check_labels(where, "test_labels", test_labels, M, num_classes);
  const int kk = static_cast<int>(std::min<std::int64_t>(k, N));
  const std::int64_t Mt = max_test > 0 && max_test < M ? max_test : M;
  auto test_row = [&](std::int64_t i) { return Mt == M ? i : i * M / Mt; };

  constexpr int block = 16;
  const std::int64_t blocks = (Mt + block - 1) / block;
  [[maybe_unused]] const int threads = std::max(1, pol.threads);
  std::vector<std::uint8_t> correct(static_cast<std::size_t>(Mt), 0);
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
    std::vector<T> a(static_cast<std::size_t>(block * D));  // a block's test rows, contiguous
    std::vector<std::pair<double, std::int64_t>> best(static_cast<std::size_t>(block * kk));
    std::vector<int> votes(static_cast<std::size_t>(num_classes));
    double dist[block];
#if defined(_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (std::int64_t bi = 0; bi < blocks; ++bi) {
      const int rows = static_cast<int>(std::min<std::int64_t>(block, Mt - bi * block));
      for (int r = 0; r < rows; ++r) {
        const T* src = test + test_row(bi * block + r) * D;
        std::copy(src, src + D, a.begin() + r * D);
      }
      // Per row, the kk best (distance, index), ascending by (distance, index).
      std::fill(best.begin(), best.end(), std::pair<double, std::int64_t>{std::numeric_limits<double>::infinity(), N});
      for (std::int64_t j = 0; j < N; ++j) {
        detail::l1_block(a.data(), rows, train + j * D, D, dist);
        for (int r = 0; r < rows; ++r) {
          auto* b = best.data() + std::size_t(r) * std::size_t(kk);
          if (!(dist[r] < b[kk - 1].first)) continue;  // j is later than every kept index: on a tie the kept stay
          int p = kk - 1;
          while (p > 0 && dist[r] < b[p - 1].first) {
            b[p] = b[p - 1];
            --p;
          }
          b[p] = {dist[r], j};
        }
      }
      for (int r = 0; r < rows; ++r) {
        std::fill(votes.begin(), votes.end(), 0);
        const auto* b = best.data() + std::size_t(r) * std::size_t(kk);
        for (int i = 0; i < kk; ++i) ++votes[std::size_t(train_labels[b[i].second])];
        const int pred = static_cast<int>(std::max_element(votes.begin(), votes.end()) - votes.begin());  // first max
        correct[std::size_t(bi * block + r)] = pred == test_labels[test_row(bi * block + r)];
      }
    }
  }
  std::int64_t hits = 0;
  for (auto c : correct) hits += c;
  return {kk, double(hits) / double(Mt), Mt};
}

}  // namespace dino::eval
