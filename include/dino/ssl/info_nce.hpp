// dino/ssl/info_nce.hpp: the InfoNCE loss of MoCo v2 against a queue of negatives
// (dino-spec §8.1 row 8), over the crop pairs of cross_entropy_distillation.
//
// Rows are crop-major: student s [n_crops * B, K] (the queries), teacher rows q
// [n_global * B, K] (the keys: the teacher's *raw* outputs, from raw_target; they are
// normalised here). With x^ = x / max(||x||, 1e-12) and the queue N [n_queued, K] of
// normalised keys from earlier steps, for each pair (student crop v, teacher crop i != v)
// and image b, with a = s^_{v,b}:
//
//   l_pos = a . q^_{i,b} / tau,   l_neg,j = a . N_j / tau
//   term  = -log( exp(l_pos) / (exp(l_pos) + sum_j exp(l_neg,j)) )     (MoCo: CE with label 0)
//   loss  = 1 / (n_terms B) sum_{i < n_global} sum_{v != i} sum_b term
//
// tau = 0.2 (MoCo v2). With 2 crops, loss = mean of MoCo's loss over both directions
// (MoCo v2's official code has one direction, query crop 0 against key crop 1). Gradient to
// the student only, with P_pos = exp(l_pos - lse) and P_j = exp(l_neg,j - lse) per pair:
//
//   d term / d a = ((P_pos - 1) q^_{i,b} + sum_j P_j N_j) / tau,  then through the normalisation
//
// The queue logits of a student row are shared by its pairs: one GEMM S^ N^T [rows, n_queued]
// and one GEMM W N [rows, K] per call (the policy's gemm, in T); the rest is in double.
//
// The queue is state, updated like the center (ssl/centering.hpp): observe(pol, t) takes the
// step's raw teacher rows t [R, K] (normalised, kept pending), commit() enqueues every pending
// row in order (a ring of queue_size rows; the oldest are overwritten), discard() drops them.
// Every micro-batch of a step therefore sees the queue from before the step, and a skipped
// step leaves it alone. MoCo starts from a queue of random unit vectors: fill_random(seed);
// a queue that starts empty holds only what has been committed, and with no negatives the
// loss is 0 with a zero gradient. The scratch (normalised rows, logits) grows on first use
// (reserve(rows) plans it on the GPU; the method calls it at construction), so one instance
// must not run two forwards at once.
//
// info_nce<T, Space>: the queue lives in Space. On the GPU (device_space, cuda_policy) the
// same GEMMs run through cuBLASLt over the whole queue storage and the row work is a block
// per row in double (policy/cuda/variants.cuh), with the negatives past queued() masked;
// observe normalises into a pending ring of queue_size rows in device memory; queued and head
// live in device memory too, and commit(pol, skip_flag) is decided by the kernel, so a
// skipped step leaves the queue as it was. queued(), head() and set_state() then read or
// write device memory (a counted wait: for checkpoints and tests, not in a step). The forms
// taking a scalar_out leave the loss in device memory. A non-finite teacher row is not
// reported by observe on the GPU: it makes the loss NaN and the step is skipped.
#pragma once

#include <algorithm>
#include <array>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dino/core/buffer.hpp"
#include "dino/core/error.hpp"
#include "dino/core/rng.hpp"
#include "dino/core/tensor.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/ssl/variant_detail.hpp"

namespace dino::ssl {

struct info_nce_config {
  int n_crops = 2;                  ///< 2 global + M local
  int n_global = 2;                 ///< crops that have teacher rows (the first n_global)
  std::int64_t dim = 128;           ///< K, the output width (MoCo's feature dim)
  std::int64_t queue_size = 65536;  ///< MoCo's K: negatives kept
  double temperature = 0.2;         ///< MoCo v2's T
};

template <class T, class Space = host_space>
class info_nce : public detail::pair_loss_forms<info_nce<T, Space>> {
  static constexpr bool on_host = std::is_same_v<Space, host_space>;
  friend struct detail::pair_loss_forms<info_nce>;

 public:
  static constexpr const char* backward_name = "info_nce backward";
  using space = Space;
  info_nce() = default;
  explicit info_nce(info_nce_config c) : cfg_(c) {
    detail::crop_pairs::check("info_nce", c.n_crops, c.n_global);
    require<config_error>(c.dim > 0, "info_nce: dim must be positive, got ", c.dim);
    require<config_error>(c.queue_size > 0, "info_nce: queue_size must be positive, got ", c.queue_size);
    require<config_error>(c.temperature > 0, "info_nce: temperature must be positive, got ", c.temperature);
    queue_.resize(static_cast<std::size_t>(c.queue_size * c.dim), true);
    if constexpr (!on_host) {
      pending_d_.resize(static_cast<std::size_t>(c.queue_size * c.dim));
      state_d_.resize(2);
      put_state(0, 0);
    }
  }
  /// Plans the scratch for N student rows of K = dim (device memory; nothing on the host).
  void reserve(std::int64_t N, std::int64_t /*K*/) {
    if constexpr (!on_host) grow_scratch(N);
  }
  const info_nce_config& config() const { return cfg_; }
  int n_terms() const { return detail::crop_pairs::n_terms(cfg_.n_crops, cfg_.n_global); }

  // ---- the queue -------------------------------------------------------------------------

  /// Keeps the normalised rows of raw teacher outputs t [R, K] for the next commit().
  template <class Policy, class S>
  void observe(const Policy& pol, tensor_view<const T, S> t) {
    DINO_CHECK_SPACE(Policy, S);
    static_assert(std::is_same_v<S, Space>, "info_nce::observe: the rows are not in the queue's memory space");
    check_matrix("info_nce observe", t, cfg_.dim);
    const std::int64_t K = cfg_.dim;
    if constexpr (!on_host) {  // into the pending ring, after the rows observed so far
      l2_rows_stats(pol, t.data, pending_d_.data(), static_cast<double*>(nullptr), t.rows(), K,
                    pending_n_ % cfg_.queue_size, cfg_.queue_size);
      pending_n_ += t.rows();
    } else {
      (void)pol;
      const std::size_t at = pending_.size();
      pending_.resize(at + static_cast<std::size_t>(t.rows() * K));
      for (std::int64_t r = 0; r < t.rows(); ++r) {
        const T* x = t.data + r * K;
        const auto st = detail::l2_row(x, K);
        require<numeric_error>(std::isfinite(st.norm), "info_nce observe: row ", r, " of ", t.name,
                               " is not finite");
        T* y = pending_.data() + at + static_cast<std::size_t>(r * K);
        for (std::int64_t k = 0; k < K; ++k) y[k] = T(double(x[k]) * st.inv);
      }
    }
  }
  /// Enqueues the pending rows in order (the oldest queued rows are overwritten).
  void commit()
    requires on_host
  {
    const std::int64_t K = cfg_.dim, n = std::int64_t(pending_.size()) / K;
    for (std::int64_t r = 0; r < n; ++r) {
      std::copy_n(pending_.data() + r * K, K, queue_.data() + head_ * K);
      head_ = (head_ + 1) % cfg_.queue_size;
    }
    queued_ = std::min(cfg_.queue_size, queued_ + n);
    pending_.clear();  // keeps its capacity: later steps do not allocate
  }
  template <class Policy>
  void commit(const Policy& pol) {
    commit(pol, nullptr);
  }
  /// commit(pol), or discard when *skip_flag (an int in the queue's memory) is nonzero: on the
  /// GPU the kernels read the flag.
  template <class Policy>
  void commit(const Policy& pol, const int* skip_flag) {
    DINO_CHECK_SPACE(Policy, Space);
    if constexpr (on_host) {
      (void)pol;
      if (skip_flag && *skip_flag) discard();
      else commit();
    } else {
      queue_commit(pol, queue_.data(), static_cast<const T*>(pending_d_.data()), state_d_.data(), pending_n_,
                   cfg_.queue_size, cfg_.queue_size, cfg_.dim, skip_flag);
      pending_n_ = 0;
    }
  }
  void discard()
    requires on_host
  {
    pending_.clear();
  }
  template <class Policy>
  void discard(const Policy&) {
    if constexpr (on_host) discard();
    else pending_n_ = 0;
  }

  /// MoCo's initial queue: queue_size random unit vectors (normal draws, normalised).
  void fill_random(std::uint64_t seed) {
    philox g(seed, 0x9e3779b9ull);
    const std::int64_t K = cfg_.dim;
    std::vector<T> staged;  // the device's queue is written from the host
    if constexpr (!on_host) staged.resize(queue_.size());
    T* dst = on_host ? queue_.data() : staged.data();
    for (std::int64_t j = 0; j < cfg_.queue_size; ++j) {
      T* y = dst + j * K;
      for (std::int64_t k = 0; k < K; ++k) y[k] = T(g.normal());
      const auto st = detail::l2_row(y, K);
      for (std::int64_t k = 0; k < K; ++k) y[k] = T(double(y[k]) * st.inv);
    }
    if constexpr (!on_host) view_from_host(queue(), static_cast<const T*>(dst));
    set_counts(cfg_.queue_size, 0);
  }
  /// Empties the queue and the pending rows.
  void clear() {
    queue_.fill_zero();
    pending_.clear();
    pending_n_ = 0;
    set_counts(0, 0);
  }

  /// The queue storage [queue_size, K]: rows [0, queued()) hold keys (in ring order, the next
  /// write at head()); for checkpoints, with queued() and head().
  tensor_view<T, Space> queue() { return {queue_.data(), {cfg_.queue_size, cfg_.dim}, "info_nce queue"}; }
  tensor_view<const T, Space> queue() const { return {queue_.data(), {cfg_.queue_size, cfg_.dim}, "info_nce queue"}; }
  /// Keys held (on the GPU: read from device memory, one wait).
  std::int64_t queued() const { return counts()[0]; }
  /// The next row written (on the GPU: read from device memory, one wait).
  std::int64_t head() const { return counts()[1]; }
  std::int64_t pending_rows() const {
    if constexpr (on_host) return std::int64_t(pending_.size()) / cfg_.dim;
    else return pending_n_;
  }
  /// Restores a queue state (a checkpoint): queued in [0, queue_size], head in [0, queue_size).
  void set_state(std::int64_t queued, std::int64_t head) {
    require<config_error>(queued >= 0 && queued <= cfg_.queue_size && head >= 0 && head < cfg_.queue_size,
                          "info_nce: bad queue state queued=", queued, " head=", head, " for queue_size ",
                          cfg_.queue_size);
    require<config_error>(queued == cfg_.queue_size || head == queued,
                          "info_nce: a queue that is not full fills from row 0, so head must equal queued (got head=",
                          head, ", queued=", queued, ")");
    set_counts(queued, head);
  }

 private:
  // queued and head: host members, or the device's state [2].
  std::array<std::int64_t, 2> counts() const {
    if constexpr (on_host) {
      return {queued_, head_};
    } else {
      std::array<std::int64_t, 2> c{};
      view_to_host(tensor_view<const std::int64_t, Space>{state_d_.data(), {2}, "info_nce state"}, c.data());
      return c;
    }
  }
  void set_counts(std::int64_t queued, std::int64_t head) {
    queued_ = queued;
    head_ = head;
    if constexpr (!on_host) put_state(queued, head);
  }
  void put_state(std::int64_t queued, std::int64_t head) {
    const std::int64_t c[2] = {queued, head};
    view_from_host(tensor_view<std::int64_t, Space>{state_d_.data(), {2}, "info_nce state"}, c);
  }
  void grow_scratch(std::int64_t N) const {
    const auto n = [](std::int64_t v) { return static_cast<std::size_t>(v); };
    detail::grow(shat_d_, n(N * cfg_.dim));
    detail::grow(logits_d_, n(N * cfg_.queue_size));
    detail::grow(dhat_d_, n(N * cfg_.dim));
    detail::grow(stats_d_, n(2 * N));
    detail::grow(pc_d_, n(N * cfg_.n_global));
  }
  // The GPU's forward: the same steps as the CPU's (see run), over the whole queue storage.
  template <class Policy, class S>
  double device_run(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q,
                    tensor_view<T, S> row_loss, T* ds, double dloss, bool accumulate, const scalar_out* out,
                    std::int64_t B) const {
    const std::int64_t K = cfg_.dim, N = s.rows(), Q = cfg_.queue_size;
    const double inv_tau = 1.0 / cfg_.temperature, divisor = double(n_terms()) * double(B);
    grow_scratch(N);
    l2_rows_stats(pol, s.data, shat_d_.data(), stats_d_.data(), N, K);
    gemm_desc d;
    d.trans_b = true;
    d.m = N;
    d.n = Q;
    d.k = K;
    gemm(pol, d, T(inv_tau), static_cast<const T*>(shat_d_.data()), static_cast<const T*>(queue_.data()), T(0),
         logits_d_.data());
    const pair_rows_desc<T> pd{s.data, q.data, row_loss.data, ds, B, K, cfg_.n_crops, cfg_.n_global,
                               dloss / divisor, inv_tau, accumulate};
    info_nce_rows(pol, pd, static_cast<const double*>(stats_d_.data()), logits_d_.data(),
                  static_cast<const std::int64_t*>(state_d_.data()), Q, pc_d_.data());
    const double loss = detail::loss_total(pol, "info_nce", row_loss, divisor, out, {s, q});
    if (ds) {
      gemm_desc g;
      g.m = N;
      g.n = K;
      g.k = Q;
      gemm(pol, g, T(1), static_cast<const T*>(logits_d_.data()), static_cast<const T*>(queue_.data()), T(0),
           dhat_d_.data());
      l2_grad_rows(pol, pd, static_cast<const double*>(stats_d_.data()), static_cast<const T*>(dhat_d_.data()),
                   static_cast<const double*>(pc_d_.data()));
    }
    return loss;
  }

  template <class Policy, class S>
  double run(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q, tensor_view<T, S> row_loss,
             T* ds, double dloss, bool accumulate, const scalar_out* out) const {
    DINO_CHECK_SPACE(Policy, S);
    static_assert(std::is_same_v<S, Space>, "info_nce: the rows are not in the queue's memory space");
    const int V = cfg_.n_crops, G = cfg_.n_global;
    const std::int64_t B = detail::pair_batch("info_nce", V, G, s, q, true);
    require<shape_error>(s.shape[1] == cfg_.dim, "info_nce: ", s.name, " has K = ", s.shape[1],
                         " but the queue holds keys of dim ", cfg_.dim);
    check_shape("info_nce", row_loss, {s.rows()});
    if constexpr (!on_host) {
      return device_run(pol, s, q, row_loss, ds, dloss, accumulate, out, B);
    } else {
      (void)out;
      return host_run(pol, s, q, row_loss, ds, dloss, accumulate, B);
    }
  }
  template <class Policy, class S>
  double host_run(const Policy& pol, tensor_view<const T, S> s, tensor_view<const T, S> q, tensor_view<T, S> row_loss,
                  T* ds, double dloss, bool accumulate, std::int64_t B) const {
    const int G = cfg_.n_global;
    const std::int64_t K = cfg_.dim, N = s.rows(), M = queued_;
    const double inv_tau = 1.0 / cfg_.temperature;
    const double gscale = dloss / (double(n_terms()) * double(B));
    // normalised student rows (T, for the GEMMs) and their norms
    shat_.resize(static_cast<std::size_t>(N * K));
    snorm_.resize(static_cast<std::size_t>(N));
    for_each_row(pol, N, [&](std::int64_t r) {
      const auto st = detail::l2_row(s.data + r * K, K);
      snorm_[std::size_t(r)] = st;
      for (std::int64_t k = 0; k < K; ++k) shat_[std::size_t(r * K + k)] = T(double(s.data[r * K + k]) * st.inv);
    });
    // queue logits L = S^ N^T / tau  [N, M]
    logits_.resize(static_cast<std::size_t>(N * std::max<std::int64_t>(M, 1)));
    if (M > 0) {
      gemm_desc d;
      d.trans_b = true;
      d.m = N;
      d.n = M;
      d.k = K;
      gemm(pol, d, T(inv_tau), shat_.data(), queue_.data(), T(0), logits_.data());
    }
    // per row: loss, and the negatives' weights (in place of the logits) and positives' coefficients
    pos_coef_.resize(static_cast<std::size_t>(N * G));
    for_each_row(pol, N, [&](std::int64_t row) {
      const int v = int(row / B);
      const std::int64_t b = row % B;
      const double sinv = snorm_[std::size_t(row)].inv;
      const T* sr = s.data + row * K;
      T* L = logits_.data() + row * M;
      double* pc = pos_coef_.data() + row * G;
      double pos[8];
      double mx = -INFINITY;
      for (std::int64_t j = 0; j < M; ++j) mx = std::max(mx, double(L[j]));
      for (int i = 0; i < G; ++i) {
        pc[i] = 0;
        if (i == v) continue;
        const T* qr = q.data + (std::int64_t(i) * B + b) * K;
        const auto qs = detail::l2_row(qr, K);
        double dot = 0;
        for (std::int64_t k = 0; k < K; ++k) dot += double(sr[k]) * double(qr[k]);
        pos[i] = dot * sinv * qs.inv * inv_tau;
        pc[i] = qs.inv;  // kept for the gradient
        mx = std::max(mx, pos[i]);
      }
      double sneg = 0;  // sum_j exp(l_neg,j - mx)
      for (std::int64_t j = 0; j < M; ++j) sneg += std::exp(double(L[j]) - mx);
      double loss = 0, wsum = 0;  // wsum = sum_i exp(mx - lse_i)
      for (int i = 0; i < G; ++i) {
        if (i == v) continue;
        const double lse = mx + std::log(std::exp(pos[i] - mx) + sneg);
        loss += lse - pos[i];
        wsum += std::exp(mx - lse);
        // d term / d a along q^_i: (P_pos - 1) / tau, times gscale; times 1 / ||q_i|| for q_i raw
        pc[i] *= gscale * inv_tau * (std::exp(pos[i] - lse) - 1.0);
      }
      row_loss.data[row] = T(loss);
      if (ds)
        for (std::int64_t j = 0; j < M; ++j) L[j] = T(gscale * inv_tau * std::exp(double(L[j]) - mx) * wsum);
    });
    double total = 0;
    for (std::int64_t r = 0; r < N; ++r) total += double(row_loss.data[r]);
    if (!std::isfinite(total)) detail::throw_non_finite<T>("info_nce", {s, q});
    if (ds) {
      // d a = W N + sum_i coef_i q_i  (into shat_'s place, then through the normalisation)
      dhat_.resize(static_cast<std::size_t>(N * K));
      if (M > 0) {
        gemm_desc d;
        d.m = N;
        d.n = K;
        d.k = M;
        gemm(pol, d, T(1), logits_.data(), queue_.data(), T(0), dhat_.data());
      } else {
        std::fill(dhat_.begin(), dhat_.end(), T(0));
      }
      for_each_row(pol, N, [&](std::int64_t row) {
        const int v = int(row / B);
        const std::int64_t b = row % B;
        thread_local std::vector<double> buf;
        buf.resize(static_cast<std::size_t>(2 * K));
        double* y = buf.data();
        double* g = y + K;
        const double* pc = pos_coef_.data() + row * G;
        const T* dh = dhat_.data() + row * K;
        const auto st = snorm_[std::size_t(row)];
        for (std::int64_t k = 0; k < K; ++k) {
          y[k] = double(s.data[row * K + k]) * st.inv;
          g[k] = double(dh[k]);
        }
        for (int i = 0; i < G; ++i) {
          if (i == v) continue;
          const T* qr = q.data + (std::int64_t(i) * B + b) * K;
          for (std::int64_t k = 0; k < K; ++k) g[k] += pc[i] * double(qr[k]);
        }
        detail::l2_row_backward(y, st, g, ds + row * K, K, 1.0, accumulate);
      });
    }
    return total / (double(n_terms()) * double(B));
  }

  info_nce_config cfg_{};
  typename storage_for<T, Space>::type queue_;
  std::int64_t queued_ = 0, head_ = 0;
  std::vector<T> pending_;
  // scratch, grown on first use
  mutable std::vector<T> shat_, logits_, dhat_;
  mutable std::vector<detail::l2_stats> snorm_;
  mutable std::vector<double> pos_coef_;
  // device memory (GPU only): the pending ring [queue_size, K], the state {queued, head}, scratch
  detail::scratch_for<T, Space> pending_d_;
  detail::scratch_for<std::int64_t, Space> state_d_;
  std::int64_t pending_n_ = 0;
  mutable detail::scratch_for<T, Space> shat_d_, logits_d_, dhat_d_;
  mutable detail::scratch_for<double, Space> stats_d_, pc_d_;
};

}  // namespace dino::ssl
