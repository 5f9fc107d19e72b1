// dino/ssl/schedules.hpp: the reference's per-iteration schedules (dino-spec §3.1, §4.5).
//
// cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs, warmup_start) is
// utils.cosine_scheduler value for value (computed in double, as numpy does):
//   warm-up: linspace(warmup_start, base, warmup_iters) (endpoint included)
//   then for i in [0, L), L = epochs * iters_per_epoch - warmup_iters:
//     final + 0.5 (base - final) (1 + cos(pi i / L))            (final is never reached)
// teacher_temp_schedule(warmup, final, warmup_epochs, epochs) is DINOLoss's per-epoch table:
//   linspace(warmup, final, warmup_epochs) followed by `final` for the remaining epochs.
// dino_schedules bundles lr (with the linear scaling rule lr * batch / 256), weight decay,
// teacher momentum and teacher temperature, looked up by global iteration.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "dino/core/error.hpp"

namespace dino::ssl {

/// numpy.linspace(start, stop, num) with endpoint=True.
inline std::vector<double> linspace(double start, double stop, std::int64_t num) {
  std::vector<double> y(static_cast<std::size_t>(num > 0 ? num : 0));
  if (num <= 0) return y;
  if (num == 1) {
    y[0] = start;
    return y;
  }
  const double step = (stop - start) / double(num - 1);
  for (std::int64_t i = 0; i < num; ++i) y[static_cast<std::size_t>(i)] = double(i) * step + start;
  y.back() = stop;
  return y;
}

inline std::vector<double> cosine_schedule(double base, double final_value, std::int64_t epochs,
                                           std::int64_t iters_per_epoch, std::int64_t warmup_epochs = 0,
                                           double warmup_start = 0.0) {
  require<config_error>(epochs > 0 && iters_per_epoch > 0, "cosine_schedule: epochs (", epochs,
                        ") and iterations per epoch (", iters_per_epoch, ") must be positive");
  require<config_error>(warmup_epochs >= 0 && warmup_epochs <= epochs, "cosine_schedule: warm-up epochs (",
                        warmup_epochs, ") must lie in [0, epochs = ", epochs, "]");
  const std::int64_t warm = warmup_epochs * iters_per_epoch, total = epochs * iters_per_epoch;
  std::vector<double> out = linspace(warmup_start, base, warm);
  const std::int64_t L = total - warm;
  out.reserve(static_cast<std::size_t>(total));
  const double pi = 3.141592653589793238462643383279502884;
  for (std::int64_t i = 0; i < L; ++i)
    out.push_back(final_value + 0.5 * (base - final_value) * (1.0 + std::cos(pi * double(i) / double(L))));
  return out;
}

inline std::vector<double> teacher_temp_schedule(double warmup_temp, double final_temp, std::int64_t warmup_epochs,
                                                 std::int64_t epochs) {
  require<config_error>(warmup_epochs >= 0 && warmup_epochs <= epochs, "teacher_temp_schedule: warm-up epochs (",
                        warmup_epochs, ") must lie in [0, epochs = ", epochs, "]");
  std::vector<double> out = linspace(warmup_temp, final_temp, warmup_epochs);
  for (std::int64_t e = warmup_epochs; e < epochs; ++e) out.push_back(final_temp);
  return out;
}

/// Hyper-parameters of the schedules, with the reference's defaults (dino-spec §4.9).
struct schedule_config {
  std::int64_t epochs = 100;
  std::int64_t iters_per_epoch = 1;
  std::int64_t batch_size = 64;  ///< total images per optimizer step (all GPUs)
  double lr = 5e-4;              ///< base lr for batch 256 (linear scaling rule)
  double min_lr = 1e-6;
  std::int64_t warmup_epochs = 10;
  double weight_decay = 0.04;
  double weight_decay_end = 0.4;
  double momentum_teacher = 0.996;
  double warmup_teacher_temp = 0.04;
  double teacher_temp = 0.04;
  std::int64_t warmup_teacher_temp_epochs = 0;
};

/// The four schedules of a run, by global iteration.
struct dino_schedules {
  std::vector<double> lr, wd, momentum, teacher_temp;
  std::int64_t iters_per_epoch = 1;

  dino_schedules() = default;
  explicit dino_schedules(const schedule_config& c)
      : lr(cosine_schedule(c.lr * double(c.batch_size) / 256.0, c.min_lr, c.epochs, c.iters_per_epoch, c.warmup_epochs)),
        wd(cosine_schedule(c.weight_decay, c.weight_decay_end, c.epochs, c.iters_per_epoch)),
        momentum(cosine_schedule(c.momentum_teacher, 1.0, c.epochs, c.iters_per_epoch)),
        teacher_temp(teacher_temp_schedule(c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs, c.epochs)),
        iters_per_epoch(c.iters_per_epoch) {}

  std::int64_t total_iters() const { return static_cast<std::int64_t>(lr.size()); }
  std::int64_t epoch_of(std::int64_t it) const { return it / iters_per_epoch; }

  struct values {
    double lr, wd, momentum, teacher_temp;
    std::int64_t epoch;
  };
  values at(std::int64_t it) const {
    require<config_error>(it >= 0 && it < total_iters(), "dino_schedules: iteration ", it, " outside [0, ",
                          total_iters(), ")");
    const std::int64_t e = epoch_of(it);
    return {lr[std::size_t(it)], wd[std::size_t(it)], momentum[std::size_t(it)], teacher_temp[std::size_t(e)], e};
  }
};

}  // namespace dino::ssl
