// dino/ssl/presets.hpp: named assemblies of dino::ssl::method (dino-spec §8.1, Table 7).
//
//   preset            alias (Backbone, T, Policy)          target          loss            teacher  predictor crops
//   dino              dino_method                          centering       cross-entropy   EMA      -         multi
//   dino_no_momentum  dino_no_momentum_method              centering       cross-entropy   copy     -         multi
//   dino_sinkhorn     dino_sinkhorn_method                 Sinkhorn-Knopp  cross-entropy   EMA      -         multi
//   dino_two_crops    dino_two_crops_method (= dino_method) centering      cross-entropy   EMA      -         2
//   dino_mse          dino_mse_method                      raw outputs     MSE             EMA      -         multi
//   dino_predictor    dino_predictor_method                centering       cross-entropy   EMA      MLP       multi
//   byol              byol_method                          raw outputs     MSE             EMA      MLP       2
//   mocov2            mocov2_method                        raw outputs     InfoNCE+queue   EMA      -         2
//   swav_like         swav_like_method                     Sinkhorn-Knopp  cross-entropy   copy     -         multi
//   simclr            simclr_method                        (none)          NT-Xent         none     -         2
//   dino_attention_mask dino_attention_mask_method         centering       cross-entropy   EMA      -         multi
//
// dino_attention_mask is DINO with an attention_mask StudentMask (ssl/student_mask.hpp): the
// student's view of each global crop drops the fraction dino_config::mask_ratio (0.3 by
// default) of its patches that the teacher's CLS attention ranks lowest. It needs an image
// backbone (nn::vit). Ratio 0 is DINO, bit for bit.
//
// Every preset has the DINO head as its projector. make_<preset>(backbone config, backbone
// output size, dino_config) builds one; preset_defaults(name) gives a dino_config with the
// reference-like defaults of that preset (the DINO ones, with BYOL's, MoCo v2's and SimCLR's
// output sizes, predictor width, queue, temperatures and momentum where they differ). The
// two-crop presets do not read c.local_crops. Every preset runs on either policy: the parts
// with state or scratch (centering, Sinkhorn-Knopp, InfoNCE's queue, NT-Xent) take the
// policy's memory space (docs/cuda.md).
#pragma once

#include <array>
#include <string>
#include <string_view>

#include "dino/ssl/centering.hpp"
#include "dino/ssl/dino_head.hpp"
#include "dino/ssl/distillation.hpp"
#include "dino/ssl/ema.hpp"
#include "dino/ssl/info_nce.hpp"
#include "dino/ssl/method.hpp"
#include "dino/ssl/mse_loss.hpp"
#include "dino/ssl/nt_xent.hpp"
#include "dino/ssl/predictor.hpp"
#include "dino/ssl/sinkhorn.hpp"
#include "dino/ssl/student_mask.hpp"
#include "dino/ssl/targets.hpp"

namespace dino::ssl {

template <class Policy, class T>
using center_of = centering<T, memory_space_t<Policy>>;
template <class Policy, class T>
using sinkhorn_of = sinkhorn_knopp<T, memory_space_t<Policy>>;
template <class Policy, class T>
using info_nce_of = info_nce<T, memory_space_t<Policy>>;
template <class Policy, class T>
using nt_xent_of = nt_xent<T, memory_space_t<Policy>>;

template <class Backbone, class T = float, class Policy = cpu_policy>
using dino_method = method<Backbone, dino_head, center_of<Policy, T>, cross_entropy_distillation, ema_update, T, Policy>;
template <class Backbone, class T = float, class Policy = cpu_policy>
using dino_no_momentum_method =
    method<Backbone, dino_head, center_of<Policy, T>, cross_entropy_distillation, copy_update, T, Policy>;
template <class Backbone, class T = float, class Policy = cpu_policy>
using dino_sinkhorn_method = method<Backbone, dino_head, sinkhorn_of<Policy, T>, cross_entropy_distillation, ema_update, T, Policy>;
template <class Backbone, class T = float, class Policy = cpu_policy>
using dino_two_crops_method = dino_method<Backbone, T, Policy>;
template <class Backbone, class T = float, class Policy = cpu_policy>
using dino_mse_method = method<Backbone, dino_head, raw_target<T>, mse_distillation, ema_update, T, Policy>;
template <class Backbone, class T = float, class Policy = cpu_policy>
using dino_predictor_method =
    method<Backbone, dino_head, center_of<Policy, T>, cross_entropy_distillation, ema_update, T, Policy, mlp_predictor>;
template <class Backbone, class T = float, class Policy = cpu_policy>
using byol_method = method<Backbone, dino_head, raw_target<T>, mse_distillation, ema_update, T, Policy, mlp_predictor>;
template <class Backbone, class T = float, class Policy = cpu_policy>
using mocov2_method = method<Backbone, dino_head, raw_target<T>, info_nce_of<Policy, T>, ema_update, T, Policy>;
template <class Backbone, class T = float, class Policy = cpu_policy>
using swav_like_method = method<Backbone, dino_head, sinkhorn_of<Policy, T>, cross_entropy_distillation, copy_update, T, Policy>;
template <class Backbone, class T = float, class Policy = cpu_policy>
using simclr_method = method<Backbone, dino_head, raw_target<T>, nt_xent_of<Policy, T>, no_teacher, T, Policy>;
template <class Backbone, class T = float, class Policy = cpu_policy>
using dino_attention_mask_method = method<Backbone, dino_head, center_of<Policy, T>, cross_entropy_distillation,
                                          ema_update, T, Policy, no_predictor, attention_mask>;

/// Hyper-parameters of a run beyond the backbone (reference defaults, dino-spec §3, §4.9),
/// with those of the variants after `train`.
struct dino_config {
  dino_head_config head{};      ///< head.in_dim is set from the backbone
  int local_crops = 8;          ///< M; n_crops = 2 + M (multi-crop presets)
  double student_temp = 0.1;
  double center_momentum = 0.9;
  train_config train{};
  std::int64_t predictor_hidden = 4096;  ///< the predictor's hidden width (BYOL: 4096)
  int sinkhorn_iterations = 3;           ///< DINOv2's n_iterations
  std::int64_t queue_size = 65536;       ///< MoCo's negatives (the queue holds queue_size x K values)
  double info_nce_temperature = 0.2;     ///< MoCo v2
  double nt_xent_temperature = 0.1;      ///< SimCLR
  /// dino_attention_mask: the fraction of each global crop's patches hidden from the student,
  /// in [0, 1). 0.3 hides the least-attended background of a centred object while the
  /// student keeps most of the crop (7 x 7 patches: 14 dropped, 35 kept).
  double mask_ratio = 0.3;
};

/// The preset names, as dino-train --method takes them.
inline constexpr std::array<std::string_view, 11> preset_names = {
    "dino", "dino_no_momentum", "dino_sinkhorn", "dino_two_crops", "dino_mse",
    "dino_predictor", "byol", "mocov2", "swav_like", "simclr", "dino_attention_mask"};

/// Whether a preset uses the two-crop plan (2 global crops, no local ones).
inline bool two_crop_preset(std::string_view name) {
  return name == "dino_two_crops" || name == "byol" || name == "mocov2" || name == "simclr";
}

/// A dino_config with the reference-like defaults of a preset (config_error for an unknown name).
inline dino_config preset_defaults(std::string_view name) {
  bool known = false;
  for (auto n : preset_names) known = known || n == name;
  require<config_error>(known, "preset_defaults: unknown preset '", std::string(name), "'");
  dino_config c;
  if (two_crop_preset(name)) c.local_crops = 0;
  if (name == "byol") {  // projection 256, predictor 4096 -> 256, tau 0.996 -> 1
    c.head.out_dim = 256;
    c.predictor_hidden = 4096;
    c.train.schedule.momentum_teacher = 0.996;
  } else if (name == "mocov2") {  // 128-d keys, 65536 negatives, T 0.2, m 0.999
    c.head.out_dim = 128;
    c.train.schedule.momentum_teacher = 0.999;
  } else if (name == "simclr") {  // 128-d projection, tau 0.1
    c.head.out_dim = 128;
  } else if (name == "swav_like") {  // 3000 prototypes, epsilon 0.05, 3 iterations
    c.head.out_dim = 3000;
    c.train.schedule.teacher_temp = c.train.schedule.warmup_teacher_temp = 0.05;
  }
  return c;
}

namespace detail {
inline int preset_crops(const dino_config& c, bool two) { return two ? 2 : 2 + c.local_crops; }
template <class M, class Target, class Loss, class Update>
M make_preset(typename M::backbone_type::config_type backbone, std::int64_t backbone_out_dim, dino_config c,
              Target target, Loss loss, Update update, typename M::mask_type mask = {}) {
  c.head.in_dim = backbone_out_dim;
  if constexpr (std::is_same_v<typename M::predictor_type, no_predictor>)
    return M(backbone, c.head, std::move(target), std::move(loss), update, c.train, std::move(mask));
  else
    return M(backbone, c.head, predictor_config(c.head.out_dim, c.predictor_hidden), std::move(target),
             std::move(loss), update, c.train, std::move(mask));
}
}  // namespace detail

template <class Backbone, class T = float, class Policy = cpu_policy>
inline dino_method<Backbone, T, Policy> make_dino(typename Backbone::config_type backbone,
                                                  std::int64_t backbone_out_dim, dino_config c) {
  return detail::make_preset<dino_method<Backbone, T, Policy>>(
      backbone, backbone_out_dim, c, center_of<Policy, T>({c.head.out_dim, c.center_momentum}),
      cross_entropy_distillation({detail::preset_crops(c, false), 2, c.student_temp}), ema_update{});
}
template <class Backbone, class T = float, class Policy = cpu_policy>
inline dino_no_momentum_method<Backbone, T, Policy> make_dino_no_momentum(typename Backbone::config_type backbone,
                                                                          std::int64_t backbone_out_dim,
                                                                          dino_config c) {
  return detail::make_preset<dino_no_momentum_method<Backbone, T, Policy>>(
      backbone, backbone_out_dim, c, center_of<Policy, T>({c.head.out_dim, c.center_momentum}),
      cross_entropy_distillation({detail::preset_crops(c, false), 2, c.student_temp}), copy_update{});
}
template <class Backbone, class T = float, class Policy = cpu_policy>
inline dino_sinkhorn_method<Backbone, T, Policy> make_dino_sinkhorn(typename Backbone::config_type backbone,
                                                                    std::int64_t backbone_out_dim, dino_config c) {
  return detail::make_preset<dino_sinkhorn_method<Backbone, T, Policy>>(
      backbone, backbone_out_dim, c, sinkhorn_of<Policy, T>({c.head.out_dim, c.sinkhorn_iterations}),
      cross_entropy_distillation({detail::preset_crops(c, false), 2, c.student_temp}), ema_update{});
}
template <class Backbone, class T = float, class Policy = cpu_policy>
inline dino_two_crops_method<Backbone, T, Policy> make_dino_two_crops(typename Backbone::config_type backbone,
                                                                      std::int64_t backbone_out_dim, dino_config c) {
  return detail::make_preset<dino_two_crops_method<Backbone, T, Policy>>(
      backbone, backbone_out_dim, c, center_of<Policy, T>({c.head.out_dim, c.center_momentum}),
      cross_entropy_distillation({2, 2, c.student_temp}), ema_update{});
}
template <class Backbone, class T = float, class Policy = cpu_policy>
inline dino_mse_method<Backbone, T, Policy> make_dino_mse(typename Backbone::config_type backbone,
                                                          std::int64_t backbone_out_dim, dino_config c) {
  return detail::make_preset<dino_mse_method<Backbone, T, Policy>>(
      backbone, backbone_out_dim, c, raw_target<T>({c.head.out_dim}),
      mse_distillation({detail::preset_crops(c, false), 2}), ema_update{});
}
template <class Backbone, class T = float, class Policy = cpu_policy>
inline dino_predictor_method<Backbone, T, Policy> make_dino_predictor(typename Backbone::config_type backbone,
                                                                      std::int64_t backbone_out_dim, dino_config c) {
  return detail::make_preset<dino_predictor_method<Backbone, T, Policy>>(
      backbone, backbone_out_dim, c, center_of<Policy, T>({c.head.out_dim, c.center_momentum}),
      cross_entropy_distillation({detail::preset_crops(c, false), 2, c.student_temp}), ema_update{});
}
template <class Backbone, class T = float, class Policy = cpu_policy>
inline byol_method<Backbone, T, Policy> make_byol(typename Backbone::config_type backbone,
                                                  std::int64_t backbone_out_dim, dino_config c) {
  return detail::make_preset<byol_method<Backbone, T, Policy>>(backbone, backbone_out_dim, c,
                                                               raw_target<T>({c.head.out_dim}),
                                                               mse_distillation({2, 2}), ema_update{});
}
/// MoCo v2: the queue starts as MoCo's, queue_size random unit vectors (seeded by train.seed).
template <class Backbone, class T = float, class Policy = cpu_policy>
inline mocov2_method<Backbone, T, Policy> make_mocov2(typename Backbone::config_type backbone,
                                                      std::int64_t backbone_out_dim, dino_config c) {
  info_nce_of<Policy, T> loss({2, 2, c.head.out_dim, c.queue_size, c.info_nce_temperature});
  loss.fill_random(c.train.seed);
  return detail::make_preset<mocov2_method<Backbone, T, Policy>>(backbone, backbone_out_dim, c,
                                                                 raw_target<T>({c.head.out_dim}), std::move(loss),
                                                                 ema_update{});
}
template <class Backbone, class T = float, class Policy = cpu_policy>
inline swav_like_method<Backbone, T, Policy> make_swav_like(typename Backbone::config_type backbone,
                                                            std::int64_t backbone_out_dim, dino_config c) {
  return detail::make_preset<swav_like_method<Backbone, T, Policy>>(
      backbone, backbone_out_dim, c, sinkhorn_of<Policy, T>({c.head.out_dim, c.sinkhorn_iterations}),
      cross_entropy_distillation({detail::preset_crops(c, false), 2, c.student_temp}), copy_update{});
}
template <class Backbone, class T = float, class Policy = cpu_policy>
inline simclr_method<Backbone, T, Policy> make_simclr(typename Backbone::config_type backbone,
                                                      std::int64_t backbone_out_dim, dino_config c) {
  return detail::make_preset<simclr_method<Backbone, T, Policy>>(backbone, backbone_out_dim, c,
                                                                 raw_target<T>({c.head.out_dim}),
                                                                 nt_xent_of<Policy, T>({2, 2, c.nt_xent_temperature}),
                                                                 no_teacher{});
}
/// DINO whose student sees each global crop without its c.mask_ratio least-attended patches
/// (config_error for a ratio outside [0, 1)); image backbones only.
template <class Backbone, class T = float, class Policy = cpu_policy>
inline dino_attention_mask_method<Backbone, T, Policy> make_dino_attention_mask(
    typename Backbone::config_type backbone, std::int64_t backbone_out_dim, dino_config c) {
  return detail::make_preset<dino_attention_mask_method<Backbone, T, Policy>>(
      backbone, backbone_out_dim, c, center_of<Policy, T>({c.head.out_dim, c.center_momentum}),
      cross_entropy_distillation({detail::preset_crops(c, false), 2, c.student_temp}), ema_update{},
      attention_mask({c.mask_ratio}));
}

}  // namespace dino::ssl
