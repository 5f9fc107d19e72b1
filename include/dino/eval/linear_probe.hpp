// dino/eval/linear_probe.hpp: a linear classifier trained on frozen features.
//
// The reference's eval_linear.py (dino-spec §5.2) reduced to its classifier: given features
// train [N, D] and test [M, D] (the caller chooses them: the final CLS token, the CLS tokens
// of the last n blocks concatenated, ...), train logits = x W^T + b, W [C, D], b [C], by
// minimising the mean cross-entropy over mini-batches:
//   - initialisation W ~ N(0, init_std^2) (0.01, the reference's), b = 0;
//   - SGD with momentum 0.9 as torch.optim.SGD (g += wd w; v = mu v + g; w -= lr v), or AdamW
//     as torch.optim.AdamW (decoupled weight decay, bias-corrected moments); weight decay 0
//     by default (the reference's); it applies to W and b alike, as in the reference;
//   - the learning rate follows CosineAnnealingLR stepped per epoch, as the reference:
//     lr_e = lr (1 + cos(pi e / epochs)) / 2 for epoch e = 0 .. epochs - 1;
//   - each epoch visits the train rows in a Philox-shuffled order keyed by (seed, epoch),
//     the last batch smaller when batch_size does not divide N (drop_last = False).
// Feature preprocessing, fitted on the train set and applied to both sets: none, L2
// normalisation of each row, or standardisation per feature ((x - mean) / sqrt(var + 1e-5),
// biased variance: BatchNorm1d(affine = False) in eval mode, the MAE linear probe's choice).
// Augmentation (the reference's RandomResizedCrop on images) is outside its scope.
//
// After the last epoch both sets are classified with the final weights: top-1 on train and
// test, top-5 on test with at least 5 classes (NaN otherwise). Ties in the logits go to the
// lower class index. In the gradient (not the loss) probabilities below 1e-30 count as 0: they
// change nothing measurable and would otherwise reach the GEMM as denormal floats, which made
// an SGD probe on Fashion-MNIST pixels 30 times slower. The same seed and sizes give the same
// result; the GEMMs run on the policy's threads (Eigen). Labels must lie in [0, num_classes)
// (shape_error).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <utility>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/core/rng.hpp"
#include "dino/math/normalize.hpp"
#include "dino/math/softmax.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::eval {

enum class probe_optimizer { sgd, adamw };
enum class probe_features { none, l2, standardize };

struct linear_probe_config {
  int epochs = 100;
  int batch_size = 256;
  double lr = 0.001;  ///< the reference's 0.001 x (batch 256) / 256; the paper sweeps it per model
  double momentum = 0.9;
  double weight_decay = 0.0;
  probe_optimizer optimizer = probe_optimizer::sgd;
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;  ///< AdamW only
  probe_features features = probe_features::none;
  double init_std = 0.01;
  std::uint64_t seed = 0;
};

/// The trained classifier with its feature preprocessing.
struct linear_classifier {
  std::int64_t dim = 0;
  int num_classes = 0;
  probe_features features = probe_features::none;
  std::vector<float> mean, inv_std;  ///< [D], standardize only
  std::vector<float> weight;         ///< [C, D]
  std::vector<float> bias;           ///< [C]

  /// Applies the preprocessing to rows [n, D] in place.
  void preprocess(const cpu_policy& pol, float* x, std::int64_t n) const {
    const std::int64_t D = dim;
    if (features == probe_features::l2)
      cpu::for_each_row(pol, n, [&](std::int64_t r) { math::l2_normalize_row(x + r * D, x + r * D, int(D), 1e-12f); });
    else if (features == probe_features::standardize)
      cpu::for_each_row(pol, n, [&](std::int64_t r) {
        for (std::int64_t d = 0; d < D; ++d) x[r * D + d] = (x[r * D + d] - mean[std::size_t(d)]) * inv_std[std::size_t(d)];
      });
  }
  /// logits [n, C] (=) of already preprocessed rows x [n, D].
  void logits(const cpu_policy& pol, const float* x, std::int64_t n, float* out) const {
    const std::int64_t C = num_classes;
    cpu::gemm(pol, cpu::gemm_desc{false, true, n, C, dim}, 1.0f, x, weight.data(), 0.0f, out);
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t c = 0; c < C; ++c) out[r * C + c] += bias[std::size_t(c)];
  }
  /// Predicted classes [n] of raw feature rows [n, D] (preprocessed on a copy).
  std::vector<int> predict(const cpu_policy& pol, const float* x, std::int64_t n) const {
    std::vector<int> pred(static_cast<std::size_t>(n));
    accuracy(pol, x, nullptr, n, pred.data());
    return pred;
  }
  /// Top-1 and top-5 accuracy of raw feature rows against labels (labels may be null when
  /// only `pred` is wanted); pred [n] receives the argmax when non-null.
  std::pair<double, double> accuracy(const cpu_policy& pol, const float* x, const int* labels, std::int64_t n,
                                     int* pred = nullptr) const {
    const std::int64_t C = num_classes, chunk = 4096;
    std::vector<float> xc(static_cast<std::size_t>(std::min(n, chunk) * dim)), lg(static_cast<std::size_t>(std::min(n, chunk) * C));
    std::int64_t top1 = 0, top5 = 0;
    for (std::int64_t r0 = 0; r0 < n; r0 += chunk) {
      const std::int64_t rows = std::min(chunk, n - r0);
      std::copy(x + r0 * dim, x + (r0 + rows) * dim, xc.begin());
      preprocess(pol, xc.data(), rows);
      logits(pol, xc.data(), rows, lg.data());
      for (std::int64_t r = 0; r < rows; ++r) {
        const float* l = lg.data() + r * C;
        const int best = static_cast<int>(std::max_element(l, l + C) - l);  // first max
        if (pred) pred[r0 + r] = best;
        if (!labels) continue;
        const int t = labels[r0 + r];
        int rank = 0;
        for (int c = 0; c < C; ++c) rank += l[c] > l[t] || (l[c] == l[t] && c < t);
        top1 += rank == 0;
        top5 += rank < 5;
      }
    }
    if (!labels || n == 0) return {0.0, 0.0};
    return {double(top1) / double(n), C >= 5 ? double(top5) / double(n) : std::numeric_limits<double>::quiet_NaN()};
  }
};

struct linear_probe_result {
  double train_top1 = 0, test_top1 = 0;
  double test_top5 = std::numeric_limits<double>::quiet_NaN();  ///< NaN with fewer than 5 classes
  std::vector<double> epoch_loss;                               ///< mean train cross-entropy per epoch
  linear_classifier classifier;
};

namespace detail {
inline constexpr std::uint32_t rng_purpose_probe_init = 0xE1, rng_purpose_probe_shuffle = 0xE2;

/// A random permutation of [0, n) (Fisher-Yates; the index from 64 random bits modulo i + 1,
/// whose bias is below 2^-40 for n < 2^24).
inline void philox_permutation(std::uint64_t seed, std::uint32_t epoch, std::vector<std::int64_t>& perm) {
  const std::int64_t n = static_cast<std::int64_t>(perm.size());
  for (std::int64_t i = 0; i < n; ++i) perm[std::size_t(i)] = i;
  philox g(seed, rng_subsequence(rng_purpose_probe_shuffle, epoch));
  for (std::int64_t i = n - 1; i > 0; --i) {
    const std::uint64_t r = (std::uint64_t(g.next_u32()) << 32) | g.next_u32();
    const auto j = static_cast<std::int64_t>(r % static_cast<std::uint64_t>(i + 1));
    std::swap(perm[std::size_t(i)], perm[std::size_t(j)]);
  }
}
}  // namespace detail

/// Trains a linear classifier on train [N, D] and reports its accuracy on train and test [M, D].
inline linear_probe_result linear_probe(const cpu_policy& pol, const float* train, const int* train_labels,
                                        std::int64_t N, const float* test, const int* test_labels, std::int64_t M,
                                        std::int64_t D, int num_classes, const linear_probe_config& cfg = {}) {
  const char* where = "linear_probe";
  require<shape_error>(N > 0 && M >= 0 && D > 0 && num_classes > 1, where,
                       ": needs N > 0, M >= 0, D > 0 and num_classes > 1, got N = ", N, ", M = ", M, ", D = ", D,
                       ", num_classes = ", num_classes);
  require<config_error>(cfg.epochs >= 1 && cfg.batch_size >= 1, where, ": epochs and batch_size must be >= 1");
  require<config_error>(cfg.lr > 0 && cfg.momentum >= 0 && cfg.momentum < 1 && cfg.weight_decay >= 0, where,
                        ": needs lr > 0, momentum in [0, 1) and weight_decay >= 0");
  for (std::int64_t i = 0; i < N; ++i)
    require<shape_error>(train_labels[i] >= 0 && train_labels[i] < num_classes, where, ": train_labels[", i, "] = ",
                         train_labels[i], " lies outside [0, ", num_classes, ")");
  for (std::int64_t i = 0; i < M; ++i)
    require<shape_error>(test_labels[i] >= 0 && test_labels[i] < num_classes, where, ": test_labels[", i, "] = ",
                         test_labels[i], " lies outside [0, ", num_classes, ")");

  const std::int64_t C = num_classes;
  linear_probe_result res;
  linear_classifier& clf = res.classifier;
  clf.dim = D;
  clf.num_classes = num_classes;
  clf.features = cfg.features;
  if (cfg.features == probe_features::standardize) {
    std::vector<double> s(std::size_t(D), 0.0), s2(std::size_t(D), 0.0);
    for (std::int64_t r = 0; r < N; ++r)
      for (std::int64_t d = 0; d < D; ++d) s[std::size_t(d)] += train[r * D + d];
    for (std::int64_t d = 0; d < D; ++d) s[std::size_t(d)] /= double(N);
    for (std::int64_t r = 0; r < N; ++r)
      for (std::int64_t d = 0; d < D; ++d) {
        const double e = train[r * D + d] - s[std::size_t(d)];
        s2[std::size_t(d)] += e * e;
      }
    clf.mean.resize(std::size_t(D));
    clf.inv_std.resize(std::size_t(D));
    for (std::int64_t d = 0; d < D; ++d) {
      clf.mean[std::size_t(d)] = float(s[std::size_t(d)]);
      clf.inv_std[std::size_t(d)] = float(1.0 / std::sqrt(s2[std::size_t(d)] / double(N) + 1e-5));
    }
  }
  std::vector<float> x(train, train + N * D);
  clf.preprocess(pol, x.data(), N);

  clf.weight.resize(std::size_t(C * D));
  clf.bias.assign(std::size_t(C), 0.0f);
  {
    philox g(cfg.seed, rng_subsequence(detail::rng_purpose_probe_init, 0));
    for (auto& w : clf.weight) w = float(cfg.init_std * g.normal());
  }
  const std::size_t nw = clf.weight.size(), nb = clf.bias.size();
  std::vector<float> m1(nw + nb, 0.0f), m2(cfg.optimizer == probe_optimizer::adamw ? nw + nb : 0, 0.0f);
  std::vector<float> grad(nw + nb, 0.0f);
  const std::int64_t B = std::min<std::int64_t>(cfg.batch_size, N);
  std::vector<float> xb(std::size_t(B * D)), lg(std::size_t(B * C)), dl(std::size_t(B * C));
  std::vector<double> row_loss(static_cast<std::size_t>(B));
  std::vector<std::int64_t> perm(static_cast<std::size_t>(N));
  std::int64_t step = 0;
  // A batch is small work (B x D x C); below ~4M multiply-adds threads only add OpenMP
  // synchronisation per batch (ruinous on a loaded machine), so it runs on one thread.
  const cpu_policy bpol{B * D * C >= (std::int64_t{1} << 22) ? pol.threads : 1};

  for (int e = 0; e < cfg.epochs; ++e) {
    const double lr = cfg.lr * 0.5 * (1.0 + std::cos(std::numbers::pi * double(e) / double(cfg.epochs)));
    detail::philox_permutation(cfg.seed, static_cast<std::uint32_t>(e), perm);
    double loss_sum = 0;
    for (std::int64_t b0 = 0; b0 < N; b0 += B) {
      const std::int64_t rows = std::min(B, N - b0);
      for (std::int64_t r = 0; r < rows; ++r) {
        const float* src = x.data() + perm[std::size_t(b0 + r)] * D;
        std::copy(src, src + D, xb.begin() + r * D);
      }
      clf.logits(bpol, xb.data(), rows, lg.data());
      const float inv_rows = 1.0f / float(rows);
      cpu::for_each_row(bpol, rows, [&](std::int64_t r) {
        const int y = train_labels[perm[std::size_t(b0 + r)]];
        float* d = dl.data() + r * C;
        const float lse = math::softmax_row(lg.data() + r * C, static_cast<const float*>(nullptr), d, int(C), 1.0f);
        row_loss[std::size_t(r)] = double(lse) - double(lg[std::size_t(r * C + y)]);
        // Probabilities below 1e-30 are flushed to 0: confident rows would otherwise feed
        // denormal floats to the gradient GEMM, which runs them tens of times slower.
        for (std::int64_t c = 0; c < C; ++c) d[c] = ((d[c] < 1e-30f ? 0.0f : d[c]) - (c == y ? 1.0f : 0.0f)) * inv_rows;
      });
      for (std::int64_t r = 0; r < rows; ++r) loss_sum += row_loss[std::size_t(r)];
      // dW = dl^T xb, db = column sums of dl
      cpu::gemm(bpol, cpu::gemm_desc{true, false, C, D, rows}, 1.0f, dl.data(), xb.data(), 0.0f, grad.data());
      for (std::int64_t c = 0; c < C; ++c) {
        float s = 0;
        for (std::int64_t r = 0; r < rows; ++r) s += dl[std::size_t(r * C + c)];
        grad[nw + std::size_t(c)] = s;
      }
      ++step;
      auto param = [&](std::size_t i) -> float& { return i < nw ? clf.weight[i] : clf.bias[i - nw]; };
      if (cfg.optimizer == probe_optimizer::sgd) {
        const float mu = float(cfg.momentum), wd = float(cfg.weight_decay), flr = float(lr);
        for (std::size_t i = 0; i < nw + nb; ++i) {
          float& p = param(i);
          const float g = grad[i] + wd * p;
          m1[i] = step == 1 ? g : mu * m1[i] + g;
          p -= flr * m1[i];
        }
      } else {
        const double bc1 = 1.0 - std::pow(cfg.beta1, double(step)), bc2 = 1.0 - std::pow(cfg.beta2, double(step));
        const float b1 = float(cfg.beta1), b2 = float(cfg.beta2), eps = float(cfg.adam_eps);
        const float step_size = float(lr / bc1), decay = float(1.0 - lr * cfg.weight_decay);
        const float inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
        for (std::size_t i = 0; i < nw + nb; ++i) {
          float& p = param(i);
          p *= decay;
          m1[i] = b1 * m1[i] + (1 - b1) * grad[i];
          m2[i] = b2 * m2[i] + (1 - b2) * grad[i] * grad[i];
          p -= step_size * m1[i] / (std::sqrt(m2[i]) * inv_sqrt_bc2 + eps);
        }
      }
    }
    res.epoch_loss.push_back(loss_sum / double(N));
  }

  res.train_top1 = clf.accuracy(pol, train, train_labels, N).first;
  if (M > 0) {
    const auto [t1, t5] = clf.accuracy(pol, test, test_labels, M);
    res.test_top1 = t1;
    res.test_top5 = t5;
  }
  return res;
}

}  // namespace dino::eval
