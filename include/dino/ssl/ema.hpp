// dino/ssl/ema.hpp: teacher updates over flat parameter buffers (dino-spec §4.6 step 9).
//
// ema_update: theta_t <- m theta_t + (1 - m) theta_s for every tensor, frozen ones included
// (the reference walks parameters(), so a frozen weight_g follows the student's). Student
// and teacher share one param_layout, so this is one pass over contiguous memory.
// copy_update: theta_t <- theta_s (the "no momentum" ablation).
// no_teacher: no teacher of its own: the teacher shares the student's weights (the method's
// teacher forward reads the student's parameters, with stop-gradient), nothing is updated.
// Each also has a form over views (a range of the buffers), which the method uses when a
// predictor's parameters, which the teacher does not follow, end the layout.
//
// Policy: for_each_chunk over a DINO_HD functor, so the same pass runs on the CPU (OpenMP
// over ranges, SIMD inside) and on the GPU (a thread per small range, on the policy's
// stream); flat_params and views must live in the policy's space. Each takes an optional
// skip flag (an int in the policy's memory, null: never): when it is nonzero the update
// changes nothing. On the GPU the kernel reads it, so a skipped step is decided there.
#pragma once

#include <cstdint>

#include "dino/config.hpp"
#include "dino/core/param_store.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::ssl {

namespace kernels {
/// t = t * a + b * s over [lo, hi) (a = m, b = 1 - m, rounded as PyTorch's lerp-free form).
template <class T>
struct ema_chunk {
  T* t;
  const T* s;
  T a, b;
  const int* skip = nullptr;  ///< nonzero: leave t as it is
  const double* m_at = nullptr;  ///< non-null: a = m, b = 1 - m from *m_at (a step graph's momentum)
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    if (skip && *skip) return;
    const T a2 = m_at ? T(*m_at) : a, b2 = m_at ? T(1.0 - *m_at) : b;
#if !defined(__CUDA_ARCH__)
#pragma omp simd
#endif
    for (std::int64_t i = lo; i < hi; ++i) t[i] = t[i] * a2 + b2 * s[i];
  }
};
/// dst = src over [lo, hi).
template <class T>
struct copy_chunk {
  T* dst;
  const T* src;
  const int* skip = nullptr;  ///< nonzero: leave dst as it is
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    if (skip && *skip) return;
    for (std::int64_t i = lo; i < hi; ++i) dst[i] = src[i];
  }
};
}  // namespace kernels

/// t = m t + (1 - m) s over n elements, rounded as PyTorch: t * m, then + (1 - m) * s in T.
/// m may be read from the policy's memory when the pass runs (step_value::read_at).
template <class Policy, class T, class S>
inline void ema(const Policy& pol, tensor_view<T, S> teacher, tensor_view<const T, S> student, step_value<double> m,
                const int* skip_flag = nullptr) {
  DINO_CHECK_SPACE(Policy, S);
  check_shape("ema", student, teacher.shape);
  if constexpr (policy_traits<Policy>::is_host) {
    if (skip_flag && *skip_flag) return;
    const double mv = m.get();
    for_each_chunk(pol, teacher.numel(), kernels::ema_chunk<T>{teacher.data, student.data, T(mv), T(1.0 - mv)});
  } else {
    for_each_chunk(pol, teacher.numel(),
                   kernels::ema_chunk<T>{teacher.data, student.data, T(m.value), T(1.0 - m.value), skip_flag, m.at});
  }
}

/// The reference teacher update: EMA with the momentum of the current iteration.
struct ema_update {
  static constexpr const char* name = "ema";
  template <class Policy, class T, class Space>
  void operator()(const Policy& pol, flat_params<T, Space>& teacher, const flat_params<T, Space>& student,
                  step_value<double> momentum, const int* skip_flag = nullptr) const {
    ema(pol, teacher.all("teacher parameters"), student.all("student parameters"), momentum, skip_flag);
  }
  template <class Policy, class T, class S>
  void operator()(const Policy& pol, tensor_view<T, S> teacher, tensor_view<const T, S> student,
                  step_value<double> momentum, const int* skip_flag = nullptr) const {
    ema(pol, teacher, student, momentum, skip_flag);
  }
};

/// The teacher is a copy of the student after every step (no momentum).
struct copy_update {
  static constexpr const char* name = "copy";
  template <class Policy, class T, class Space>
  void operator()(const Policy& pol, flat_params<T, Space>& teacher, const flat_params<T, Space>& student,
                  step_value<double>, const int* skip_flag = nullptr) const {
    DINO_CHECK_SPACE(Policy, Space);
    if constexpr (policy_traits<Policy>::is_host) {
      if (skip_flag && *skip_flag) return;
      teacher.copy_from(student);
    } else {  // on the policy's stream, ordered with the step's kernels
      require<shape_error>(teacher.size() == student.size(), "copy_update: sizes differ: ", student.size(), " vs ",
                           teacher.size());
      for_each_chunk(pol, std::int64_t(teacher.size()),
                     kernels::copy_chunk<T>{teacher.data(), student.data(), skip_flag});
    }
  }
  template <class Policy, class T, class S>
  void operator()(const Policy& pol, tensor_view<T, S> teacher, tensor_view<const T, S> student, step_value<double>,
                  const int* skip_flag = nullptr) const {
    DINO_CHECK_SPACE(Policy, S);
    check_shape("copy_update", student, teacher.shape);
    if constexpr (policy_traits<Policy>::is_host) {
      if (skip_flag && *skip_flag) return;
      for_each_chunk(pol, teacher.numel(), kernels::copy_chunk<T>{teacher.data, student.data, nullptr});
    } else {
      for_each_chunk(pol, teacher.numel(), kernels::copy_chunk<T>{teacher.data, student.data, skip_flag});
    }
  }
};

/// No teacher of its own (SimCLR's shared weights): the teacher forward, if the loss asks for
/// one, reads the student's parameters; the teacher's buffer is never updated.
struct no_teacher {
  static constexpr const char* name = "none";
  static constexpr bool shares_student = true;
  template <class Policy, class T, class Space>
  void operator()(const Policy&, flat_params<T, Space>&, const flat_params<T, Space>&, double,
                  const int* = nullptr) const {}
  template <class Policy, class T, class S>
  void operator()(const Policy&, tensor_view<T, S>, tensor_view<const T, S>, double, const int* = nullptr) const {}
};

}  // namespace dino::ssl
