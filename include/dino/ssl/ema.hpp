// dino/ssl/ema.hpp: teacher updates over flat parameter buffers (dino-spec §4.6 step 9).
//
// ema_update: theta_t <- m theta_t + (1 - m) theta_s for every tensor, frozen ones included
// (the reference walks parameters(), so a frozen weight_g follows the student's). Student
// and teacher share one param_layout, so this is one pass over contiguous memory.
// copy_update: theta_t <- theta_s (the "no momentum" ablation).
#pragma once

#include <cstdint>

#include "dino/core/param_store.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::ssl {

/// t = m t + (1 - m) s over n elements, rounded as PyTorch: t * m, then + (1 - m) * s in T.
template <class Policy, class T, class S>
inline void ema(const Policy& pol, tensor_view<T, S> teacher, tensor_view<const T, S> student, double m) {
  DINO_CHECK_SPACE(Policy, S);
  check_shape("ema", student, teacher.shape);
  const T a = T(m), b = T(1.0 - m);
  T* t = teacher.data;
  const T* s = student.data;
  for_each_chunk(pol, teacher.numel(), [&](std::int64_t lo, std::int64_t hi) {
#pragma omp simd
    for (std::int64_t i = lo; i < hi; ++i) t[i] = t[i] * a + b * s[i];
  });
}

/// The reference teacher update: EMA with the momentum of the current iteration.
struct ema_update {
  static constexpr const char* name = "ema";
  template <class Policy, class T>
  void operator()(const Policy& pol, flat_params<T>& teacher, const flat_params<T>& student, double momentum) const {
    ema(pol, host_view<T>{teacher.data(), {std::int64_t(teacher.size())}, "teacher parameters"},
        host_view<const T>{student.data(), {std::int64_t(student.size())}, "student parameters"}, momentum);
  }
};

/// The teacher is a copy of the student after every step (no momentum).
struct copy_update {
  static constexpr const char* name = "copy";
  template <class Policy, class T>
  void operator()(const Policy&, flat_params<T>& teacher, const flat_params<T>& student, double) const {
    teacher.copy_from(student);
  }
};

}  // namespace dino::ssl
