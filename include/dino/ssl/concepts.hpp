// dino/ssl/concepts.hpp: what each part of a method must provide.
//
// A method (ssl/method.hpp) is assembled from a backbone, a head, a teacher target, a loss
// and a teacher update. Each is checked with static_assert against the concept below when
// the method is instantiated, so a wrong assembly stops at one readable line naming the
// part and the concept, not deep inside a template. Each concept takes the policy the method
// runs on (cpu_policy by default): tensors are views in that policy's memory space.
#pragma once

#include <concepts>
#include <cstdint>
#include <string>
#include <vector>

#include "dino/core/param_store.hpp"
#include "dino/core/tensor.hpp"
#include "dino/nn/vit.hpp"
#include "dino/policy/policy.hpp"

namespace dino::ssl {

/// A network part: built from (config, layout, name prefix), it reports its sizes and runs a
/// training forward (saving for backward), an inference forward and a backward.
template <class V, class Policy>
using view_in = tensor_view<V, memory_space_t<Policy>>;

template <class M, class T = float, class Policy = cpu_policy>
concept network_module =
    requires(const M& m, typename M::config_type c, param_layout& layout, const std::string& prefix,
             const Policy& pol, view_in<const T, Policy> P, view_in<const T, Policy> x, view_in<T, Policy> y,
             view_in<T, Policy> buf, view_in<const T, Policy> cbuf, grad_mode mode, view_in<T, Policy> G) {
      M(c, layout, prefix);
      { m.in_dim() } -> std::convertible_to<std::int64_t>;
      { m.out_dim() } -> std::convertible_to<std::int64_t>;
      { m.saved_elems(std::int64_t{}) } -> std::convertible_to<std::size_t>;
      { m.scratch_elems(std::int64_t{}) } -> std::convertible_to<std::size_t>;
      m.forward(pol, P, x, y, buf);
      m.infer(pol, P, x, y, buf);
      m.backward(pol, P, x, cbuf, cbuf, y, mode, G, buf);
    };

/// A backbone over images (the ViT): crops come as sets of one resolution, planned as a
/// pack (nn/vit.hpp); it returns one feature row per crop.
template <class M, class T = float, class Policy = cpu_policy>
concept image_backbone = requires(const M& m, typename M::config_type c, param_layout& layout,
                                  const std::string& prefix, const Policy& pol) {
  M(c, layout, prefix);
  { m.out_dim() } -> std::convertible_to<std::int64_t>;
  { m.config().in_chans } -> std::convertible_to<std::int64_t>;
  m.template make_pack<T>(pol, std::vector<nn::crop_set>{});
};

/// Turns raw teacher logits into target distributions and keeps its own running state.
/// commit / discard take the policy, or nothing (a target whose state lives on the host).
template <class X, class T = float, class Policy = cpu_policy>
concept teacher_target = requires(X& x, const X& cx, const Policy& pol, view_in<const T, Policy> t, double tau,
                                  view_in<T, Policy> q, view_in<T, Policy> ent) {
  { cx.out_dim() } -> std::convertible_to<std::int64_t>;
  { cx.targets(pol, t, tau, q, ent) } -> std::convertible_to<double>;
  x.observe(pol, t);
  requires requires { x.commit(pol); } || requires { x.commit(); };
  requires requires { x.discard(pol); } || requires { x.discard(); };
};

/// A loss between student logits and teacher targets over a crop plan.
template <class L, class T = float, class Policy = cpu_policy>
concept distillation_loss = requires(const L& l, const Policy& pol, view_in<const T, Policy> s,
                                     view_in<const T, Policy> q, view_in<T, Policy> row_loss, view_in<T, Policy> ds) {
  { l.config().n_crops } -> std::convertible_to<int>;
  { l.config().n_global } -> std::convertible_to<int>;
  { l.forward_backward(pol, s, q, row_loss, ds, 1.0, false) } -> std::convertible_to<double>;
};

/// A loss that keeps running state (InfoNCE's queue), updated like the target's: observe(pol, t)
/// after each micro-batch with the raw teacher rows, commit after the teacher update, discard
/// when a step is skipped (each with the policy, or without).
template <class L, class T = float, class Policy = cpu_policy>
concept stateful_loss = distillation_loss<L, T, Policy> &&
                        requires(L& l, const Policy& pol, view_in<const T, Policy> t) {
                          l.observe(pol, t);
                          requires requires { l.commit(pol); } || requires { l.commit(); };
                          requires requires { l.discard(pol); } || requires { l.discard(); };
                        };

/// Whether a loss reads the teacher's rows: a loss with `static constexpr bool uses_teacher =
/// false` (NT-Xent) makes the method skip the teacher forward, the targets and the teacher update.
template <class L>
inline constexpr bool uses_teacher_v = [] {
  if constexpr (requires { L::uses_teacher; }) return bool(L::uses_teacher);
  else return true;
}();

/// Updates the teacher's parameters from the student's after each optimizer step.
template <class U, class T = float, class Policy = cpu_policy>
concept teacher_update = requires(const U& u, const Policy& pol, flat_params<T, memory_space_t<Policy>>& t,
                                  const flat_params<T, memory_space_t<Policy>>& s) {
  u(pol, t, s, 0.5);
};

/// A teacher update that can also run over a range of the buffers (as views): the method uses
/// it when a predictor's parameters, which the teacher does not follow, end the layout.
template <class U, class T = float, class Policy = cpu_policy>
concept ranged_teacher_update = teacher_update<U, T, Policy> &&
                                requires(const U& u, const Policy& pol, view_in<T, Policy> t, view_in<const T, Policy> s) {
                                  u(pol, t, s, 0.5, static_cast<const int*>(nullptr));
                                };

/// Whether the teacher shares the student's weights (`static constexpr bool shares_student =
/// true`, no_teacher): the teacher forward then reads the student's parameters.
template <class U>
inline constexpr bool shares_student_v = [] {
  if constexpr (requires { U::shares_student; }) return bool(U::shares_student);
  else return false;
}();

/// Sizes known at compile time: a part may declare `static constexpr std::int64_t static_in_dim`
/// and `static_out_dim` (fixed_dims in ssl/predictor.hpp adds them to any part); the method
/// static_asserts that known sizes fit. dynamic_dim: decided at run time (the usual case).
inline constexpr std::int64_t dynamic_dim = -1;
template <class M>
inline constexpr std::int64_t static_in_dim_v = [] {
  if constexpr (requires { M::static_in_dim; }) return std::int64_t(M::static_in_dim);
  else return dynamic_dim;
}();
template <class M>
inline constexpr std::int64_t static_out_dim_v = [] {
  if constexpr (requires { M::static_out_dim; }) return std::int64_t(M::static_out_dim);
  else return dynamic_dim;
}();
/// Whether two sizes can match (equal, or one of them decided at run time).
inline constexpr bool dims_fit(std::int64_t a, std::int64_t b) { return a == dynamic_dim || b == dynamic_dim || a == b; }

}  // namespace dino::ssl
