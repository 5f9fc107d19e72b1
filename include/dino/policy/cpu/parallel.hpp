// dino/policy/cpu/parallel.hpp: row and element runners for the CPU policy.
//
// for_each_row runs a row functor from math/ over rows with OpenMP (static schedule, so
// the split of work, and thus every floating-point result, is the same for a given thread
// count; row functors never reduce across rows, so results do not depend on it at all).
// for_each_chunk hands contiguous index ranges to a functor, for element-wise passes over
// flat buffers that the compiler vectorises.
#pragma once

#include <algorithm>
#include <cstdint>

#include "dino/policy/policy.hpp"

namespace dino::cpu {

/// Calls f(r) for r in [0, rows).
///
/// One thread (or one row) runs the loop directly, outside any OpenMP region: libgomp
/// allocates (malloc) a fresh team for every region of one thread, even one whose `if`
/// clause is false, and frees it at the end; it keeps only teams of several threads.
template <class F>
inline void for_each_row(const cpu_policy& pol, std::int64_t rows, F&& f) {
  if (pol.threads <= 1 || rows <= 1) {
    for (std::int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(pol.threads)
#endif
  for (std::int64_t r = 0; r < rows; ++r) f(r);
}

/// Calls f(r) for r in [0, rows), the rows dealt to the threads in turn (a static schedule
/// of chunk 1): for rows of unequal cost that come sorted by cost, such as the crops of a
/// packed multi-crop batch (large crops first). Same contract as for_each_row.
template <class F>
inline void for_each_row_cyclic(const cpu_policy& pol, std::int64_t rows, F&& f) {
  if (pol.threads <= 1 || rows <= 1) {
    for (std::int64_t r = 0; r < rows; ++r) f(r);
    return;
  }
#if defined(_OPENMP)
#pragma omp parallel for schedule(static, 1) num_threads(pol.threads)
#endif
  for (std::int64_t r = 0; r < rows; ++r) f(r);
}

/// Calls f(begin, end) on contiguous ranges covering [0, n); ranges align to 16 elements.
template <class F>
inline void for_each_chunk(const cpu_policy& pol, std::int64_t n, F&& f) {
  const int t = std::max(1, pol.threads);
  if (t == 1 || n < 4096) {
    f(std::int64_t{0}, n);
    return;
  }
  const std::int64_t per = ((n + t - 1) / t + 15) / 16 * 16;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(t)
#endif
  for (int i = 0; i < t; ++i) {
    std::int64_t b = std::min<std::int64_t>(n, per * i), e = std::min<std::int64_t>(n, b + per);
    if (b < e) f(b, e);
  }
}

}  // namespace dino::cpu
