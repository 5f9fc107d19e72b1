// dino/ssl/presets.hpp: named assemblies of dino::ssl::method.
//
//   dino_method<Backbone, T, Policy>: the paper's recipe: DINO head, centering + sharpening teacher
//   targets, cross-entropy distillation over multi-crop pairs, EMA teacher.
// make_dino() builds one with the reference's defaults for everything it is not told.
#pragma once

#include "dino/ssl/centering.hpp"
#include "dino/ssl/dino_head.hpp"
#include "dino/ssl/distillation.hpp"
#include "dino/ssl/ema.hpp"
#include "dino/ssl/method.hpp"

namespace dino::ssl {

template <class Backbone, class T = float, class Policy = cpu_policy>
using dino_method = method<Backbone, dino_head, centering<T, memory_space_t<Policy>>, cross_entropy_distillation,
                           ema_update, T, Policy>;

/// Hyper-parameters of a DINO run beyond the backbone (reference defaults, dino-spec §3, §4.9).
struct dino_config {
  dino_head_config head{};      ///< head.in_dim is set from the backbone
  int local_crops = 8;          ///< M; n_crops = 2 + M
  double student_temp = 0.1;
  double center_momentum = 0.9;
  train_config train{};
};

template <class Backbone, class T = float, class Policy = cpu_policy>
inline dino_method<Backbone, T, Policy> make_dino(typename Backbone::config_type backbone,
                                                  std::int64_t backbone_out_dim, dino_config c) {
  c.head.in_dim = backbone_out_dim;
  return dino_method<Backbone, T, Policy>(backbone, c.head,
                                          centering<T, memory_space_t<Policy>>({c.head.out_dim, c.center_momentum}),
                                  cross_entropy_distillation({2 + c.local_crops, 2, c.student_temp}), ema_update{},
                                  c.train);
}

}  // namespace dino::ssl
