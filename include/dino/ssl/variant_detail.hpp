// dino/ssl/variant_detail.hpp: helpers shared by the variant parts (targets.hpp, sinkhorn.hpp,
// mse_loss.hpp, info_nce.hpp, nt_xent.hpp). Not a public interface.
//
// - crop_pairs: the crop-pair structure of cross_entropy_distillation (student crop v against
//   teacher global crop i != v, i < n_global), its checks and n_terms;
// - pair_batch: the shape checks every pair loss makes, returning the batch size B;
// - l2_row: ||x|| and 1 / max(||x||, eps) of one row in double (F.normalize, eps 1e-12);
// - throw_non_finite / report_non_finite: the numeric_error naming the first non-finite input
//   (host memory / either space);
// - loss_total: a pair loss from its row losses on either policy (returned, or left in device
//   memory as a scalar_out);
// - no_running_state: the observe / commit / discard of a target without state;
// - pair_loss_forms: forward and forward_backward of a pair loss over its run(), returning the
//   loss or (GPU) leaving it in device memory;
// - grow: the device scratch of a part, planned by reserve() (a method calls it at
//   construction) or grown on first use.
#pragma once

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "dino/core/buffer.hpp"
#include "dino/core/error.hpp"
#include "dino/core/tensor.hpp"
#include "dino/policy/cpu/reduce.hpp"
#include "dino/policy/pair_rows.hpp"
#include "dino/policy/policy.hpp"

namespace dino::ssl::detail {

/// F.normalize's eps: y = x / max(||x||, eps).
inline constexpr double l2_eps = 1e-12;

struct l2_stats {
  double norm;  ///< ||x||
  double inv;   ///< 1 / max(||x||, eps)
};
template <class T>
inline l2_stats l2_row(const T* x, std::int64_t n) {
  double s = 0;
  for (std::int64_t k = 0; k < n; ++k) s += double(x[k]) * double(x[k]);
  const double norm = std::sqrt(s);
  return {norm, 1.0 / (norm > l2_eps ? norm : l2_eps)};
}

/// dx (=|+=) scale * d y / d x applied to g, for y = x / max(||x||, eps) given y (double):
///   ||x|| > eps: (g - y (y . g)) / ||x||;   otherwise g / eps.
template <class T>
inline void l2_row_backward(const double* y, l2_stats st, const double* g, T* dx, std::int64_t n, double scale,
                            bool accumulate) {
  if (st.norm > l2_eps) {
    double yg = 0;
    for (std::int64_t k = 0; k < n; ++k) yg += y[k] * g[k];
    const double c = scale / st.norm;
    for (std::int64_t k = 0; k < n; ++k) {
      const double v = c * (g[k] - y[k] * yg);
      dx[k] = accumulate ? T(double(dx[k]) + v) : T(v);
    }
  } else {
    const double c = scale / l2_eps;
    for (std::int64_t k = 0; k < n; ++k) {
      const double v = c * g[k];
      dx[k] = accumulate ? T(double(dx[k]) + v) : T(v);
    }
  }
}

/// The crop-pair structure of cross_entropy_distillation (dino-spec §3.2).
struct crop_pairs {
  int n_crops = 2;
  int n_global = 2;

  static void check(const char* who, int n_crops, int n_global) {
    require<config_error>(n_global >= 1 && n_global <= 8 && n_crops >= 2 && n_global <= n_crops, who,
                          ": need 1 <= n_global <= min(8, n_crops) and n_crops >= 2, got n_global=", n_global,
                          " n_crops=", n_crops);
  }
  static int n_terms(int n_crops, int n_global) { return n_global * (n_crops - 1); }
  /// Teachers paired with student crop v: every i < n_global with i != v.
  static int partners(int v, int n_global) { return v < n_global ? n_global - 1 : n_global; }
};

/// Checks student s [n_crops * B, K] and, when check_q, teacher rows q [n_global * B, K];
/// returns B.
template <class T, class S>
inline std::int64_t pair_batch(const char* where, int n_crops, int n_global, tensor_view<const T, S> s,
                               tensor_view<const T, S> q, bool check_q) {
  require<shape_error>(s.shape.rank == 2, where, ": student outputs must be a matrix, found ", s.name, " ",
                       s.shape.str());
  require<shape_error>(s.rows() % n_crops == 0, where, ": ", s.name, " has ", s.rows(),
                       " rows, which is not a multiple of the crop count ", n_crops);
  const std::int64_t B = s.rows() / n_crops;
  require<shape_error>(B > 0 && s.shape[1] > 0, where, ": ", s.name, " ", s.shape.str(), " is empty");
  if (check_q) {
    require<shape_error>(q.shape.rank == 2, where, ": teacher outputs must be a matrix, found ", q.name, " ",
                         q.shape.str());
    require<shape_error>(s.shape[1] == q.shape[1], where, ": ", s.name, " has K = ", s.shape[1], " but ", q.name,
                         " has K = ", q.shape[1], " (student and teacher outputs must have the same width)");
    require<shape_error>(q.rows() == n_global * B, where, ": ", q.name, ": expected ", n_global * B, " rows (",
                         n_global, " global crops x batch ", B, "), found ", q.rows());
  }
  return B;
}

/// Throws numeric_error naming the first non-finite value of the views (host memory), or
/// saying that the inputs are finite.
template <class T>
[[noreturn]] inline void throw_non_finite(const char* who, std::initializer_list<tensor_view<const T, host_space>> views) {
  for (const auto& t : views) {
    if (!t.data) continue;
    for (std::int64_t i = 0; i < t.numel(); ++i)
      if (!std::isfinite(double(t.data[i])))
        throw numeric_error(dino::detail::concat(who, ": ", t.name, " ", t.shape.str(), " holds a non-finite value (", double(t.data[i]),
                                   ") at row ", i / t.cols(), ", column ", i % t.cols()));
  }
  throw numeric_error(dino::detail::concat(who, ": the loss is not finite although its inputs are"));
}

/// Throws numeric_error naming the first non-finite value of the views, in the policy's
/// memory (on the GPU: a few counted waits), or saying that the inputs are finite.
template <class Policy, class T, class S>
[[noreturn]] inline void report_non_finite(const Policy& pol, const char* who,
                                           std::initializer_list<tensor_view<const T, S>> views) {
  if constexpr (policy_traits<Policy>::is_host) {
    (void)pol;
    throw_non_finite<T>(who, views);
  } else {
    for (const auto& t : views) {
      if (!t.data || all_finite(pol, t.data, t.numel())) continue;
      const non_finite_at at = first_non_finite(pol, t.data, t.numel());
      throw numeric_error(dino::detail::concat(who, ": ", t.name, " ", t.shape.str(), " holds a non-finite value (",
                                               at.value, ") at row ", at.index / t.cols(), ", column ",
                                               at.index % t.cols()));
    }
    throw numeric_error(dino::detail::concat(who, ": the loss is not finite although its inputs are"));
  }
}

/// The loss sum(row_loss) / divisor on a device: left in *out (no read-back) when out is
/// given (returns 0), else read back (one wait) and checked (numeric_error when not finite).
template <class Policy, class T, class S>
inline double loss_total(const Policy& pol, const char* who, tensor_view<T, S> row_loss, double divisor,
                         const scalar_out* out, std::initializer_list<tensor_view<const T, S>> inputs) {
  if (out) {
    sum_to(pol, static_cast<const T*>(row_loss.data), row_loss.numel(), divisor, *out);
    return 0.0;
  }
  const double total = sum_to_host(pol, static_cast<const T*>(row_loss.data), row_loss.numel(), 1.0);
  if (!std::isfinite(total)) report_non_finite(pol, who, inputs);
  return total / divisor;
}

/// The device scratch of a part: storage in Space, nothing on the host (whose parts keep
/// their own vectors), so the host parts stay copyable.
template <class U>
struct no_scratch {
  std::size_t size() const { return 0; }
  void resize(std::size_t) {}
  U* data() const { return nullptr; }
};
template <class U, class Space>
using scratch_for = std::conditional_t<std::is_same_v<Space, host_space>, no_scratch<U>,
                                       typename storage_for<U, Space>::type>;

/// The running-state hooks of a teacher target that keeps none: nothing to observe, commit
/// (with or without the skip flag) or discard.
struct no_running_state {
  template <class Policy, class View>
  void observe(const Policy&, View) {}
  void commit() {}
  void discard() {}
  template <class Policy>
  void commit(const Policy&, const int*) {}
};

/// The public forms of a pair loss (mse_distillation, info_nce, nt_xent) over the loss's
/// run(pol, s, q, row_loss, ds, dloss, accumulate, out) and its backward_name:
///   forward(pol, s, q, row_loss)                       the loss; row_loss [n_crops * B] gets
///                                                      each student row's summed terms
///   forward_backward(pol, s, q, row_loss, ds, dloss, accumulate)
///                                                      the loss, and ds (=|+=) dloss * d loss / d s
/// and on the GPU the same with a last scalar_out argument: the loss left in device memory
/// (*value (=|+=) weight * loss), nothing read back, nothing waited for.
template <class Derived>
struct pair_loss_forms {
  template <class Policy, class T, class S>
  double forward(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q,
                 tensor_view<T, S> row_loss) const {
    return self().run(pol, s, q, row_loss, static_cast<T*>(nullptr), 0.0, false, nullptr);
  }
  template <class Policy, class T, class S>
    requires(!policy_traits<Policy>::is_host)
  void forward(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q, tensor_view<T, S> row_loss,
               scalar_out loss) const {
    self().run(pol, s, q, row_loss, static_cast<T*>(nullptr), 0.0, false, &loss);
  }
  template <class Policy, class T, class S>
  double forward_backward(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q,
                          tensor_view<T, S> row_loss, tensor_view<T, S> ds, double dloss, bool accumulate) const {
    check_shape(Derived::backward_name, ds, s.shape);
    return self().run(pol, s, q, row_loss, ds.data, dloss, accumulate, nullptr);
  }
  template <class Policy, class T, class S>
    requires(!policy_traits<Policy>::is_host)
  void forward_backward(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q,
                        tensor_view<T, S> row_loss, tensor_view<T, S> ds, double dloss, bool accumulate,
                        scalar_out loss) const {
    check_shape(Derived::backward_name, ds, s.shape);
    self().run(pol, s, q, row_loss, ds.data, dloss, accumulate, &loss);
  }

 private:
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

/// Storage of at least n elements (reallocated, contents lost, when smaller).
template <class Storage>
inline void grow(Storage& b, std::size_t n) {
  if (b.size() < n) b.resize(n);
}

}  // namespace dino::ssl::detail
