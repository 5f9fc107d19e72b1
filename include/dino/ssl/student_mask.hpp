// dino/ssl/student_mask.hpp: the optional StudentMask part of a method: which patches of each
// global crop the student sees. Attention-conditioned masking (the APMask idea, used for
// anomaly detection on top of DINO): the teacher runs on the global crops first, and the
// student's view of each global crop drops the patches the teacher's CLS token attends to least.
//
//   no_student_mask   the default: the student sees every patch (nothing is planned or run)
//   attention_mask    attention_mask({ratio}): drops floor(ratio * N + 1e-9) of a crop's N
//                     patches, those with the lowest score; ratio in [0, 1) (config_error
//                     otherwise), at least one patch is always kept
//
// A StudentMask (concept student_mask_part) has
//   kept(N)        the patches the student keeps of a global crop of N patches (1 ... N; N:
//                  nothing is masked, and the method runs plain DINO: no attention output,
//                  the same packs, the same numbers bit for bit)
//   select(pol, cls_attention, heads, N, keep)
//                  keep [crops, kept(N)] (=) each crop's kept patch indices (0 ... N - 1,
//                  ascending: the tokens keep their raster order). cls_attention [crops,
//                  heads * (1 + N)] holds the teacher's last-block CLS attention rows, as
//                  nn::vit::infer's cls_attention output: per crop and head, the softmax row of
//                  the CLS query over [CLS, patch 0, ..., patch N - 1].
// The selection is not differentiated (indices only). Local crops are never masked.
//
// attention_mask's score of patch j is its attention summed over heads (in double, in head
// order: the mean over heads ranks the same); patches are ranked by score, higher first, and
// equal scores by patch index, lower first (a NaN score ranks last); the first kept(N) are kept.
// On the CPU its scratch grows on the first call, later calls allocate nothing, and one
// instance must not run two calls at once; on the GPU a kernel ranks each crop's patches in
// shared memory and writes the device table (nothing allocated, nothing read back).
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/core/tensor.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/ssl/concepts.hpp"

namespace dino::ssl {

/// No mask: the method's default.
struct no_student_mask {};

/// A part that can serve as a StudentMask (see the file comment).
template <class M, class T = float, class Policy = cpu_policy>
concept student_mask_part =
    std::is_same_v<M, no_student_mask> ||
    requires(const M& cm, M& m, const Policy& pol, view_in<const T, Policy> attn, std::int64_t* keep) {
      { cm.kept(std::int64_t{}) } -> std::convertible_to<std::int64_t>;
      m.select(pol, attn, std::int64_t{}, std::int64_t{}, keep);
    };

struct attention_mask_config {
  double ratio = 0.3;  ///< the fraction of each global crop's patches the student does not see
};

/// Drops the patches the teacher's CLS attention ranks lowest (see the file comment).
class attention_mask {
 public:
  using config_type = attention_mask_config;
  explicit attention_mask(attention_mask_config c = {}) : cfg_(c) {
    require<config_error>(c.ratio >= 0 && c.ratio < 1, "attention_mask: ratio must be in [0, 1), got ", c.ratio);
  }
  const attention_mask_config& config() const { return cfg_; }

  /// N - floor(ratio * N + 1e-9), at least 1 (the 1e-9 keeps 0.3 * 10 from rounding to 2).
  std::int64_t kept(std::int64_t n) const {
    const auto drop = static_cast<std::int64_t>(std::floor(cfg_.ratio * double(n) + 1e-9));
    return std::max<std::int64_t>(1, n - drop);
  }

  /// keep in the policy's memory (device memory on the GPU: select_kept_patches in
  /// policy/cuda/variants.cuh, a block per crop, the same ranking).
  template <class Policy, class T, class S>
  void select(const Policy& pol, tensor_view<const T, S> cls_attention, std::int64_t heads, std::int64_t n,
              std::int64_t* keep) {
    DINO_CHECK_SPACE(Policy, S);
    require<shape_error>(heads > 0 && n > 0 && cls_attention.shape.rank == 2 &&
                             cls_attention.cols() == heads * (1 + n),
                         "attention_mask::select: ", cls_attention.name, " must be [crops, heads * (1 + N)] = [*, ",
                         heads * (1 + n), "]");
    const std::int64_t k = kept(n);
    if constexpr (!policy_traits<Policy>::is_host) {
      select_kept_patches(pol, cls_attention.data, cls_attention.rows(), heads, n, k, keep);
    } else {
      (void)pol;
      host_select(cls_attention, heads, n, k, keep);
    }
  }

 private:
  template <class T>
  void host_select(host_view<const T> cls_attention, std::int64_t heads, std::int64_t n, std::int64_t k,
                   std::int64_t* keep) {
    score_.resize(std::size_t(n));
    order_.resize(std::size_t(n));
    const auto before = [this](std::int64_t a, std::int64_t b) {
      const double sa = score_[std::size_t(a)], sb = score_[std::size_t(b)];
      return sa > sb || (sa == sb && a < b);
    };
    for (std::int64_t c = 0; c < cls_attention.rows(); ++c) {
      const T* a = cls_attention.row(c);
      for (std::int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (std::int64_t h = 0; h < heads; ++h) s += double(a[h * (1 + n) + 1 + j]);
        score_[std::size_t(j)] = std::isnan(s) ? -std::numeric_limits<double>::infinity() : s;
        order_[std::size_t(j)] = j;
      }
      std::nth_element(order_.begin(), order_.begin() + k, order_.end(), before);
      std::sort(order_.begin(), order_.begin() + k);
      std::copy(order_.begin(), order_.begin() + k, keep + c * k);
    }
  }

  attention_mask_config cfg_;
  std::vector<double> score_;
  std::vector<std::int64_t> order_;
};

}  // namespace dino::ssl
