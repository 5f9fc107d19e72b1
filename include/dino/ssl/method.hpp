// dino/ssl/method.hpp: a self-distillation method assembled at compile time from its parts.
//
//   method<Backbone, Head, Target, Loss, TeacherUpdate, T>
//
// owns a student and a teacher (one param_layout, flat buffers with the official state_dict
// names "backbone.*" and "head.*"), the student's gradients, AdamW state, the schedules and
// every activation buffer, planned at construction for the largest micro-batch: a step
// allocates nothing. One optimizer step (dino-spec §4.6), over one or more micro-batches:
//
//   1. lr, wd, teacher momentum and tau_t from the schedules at the current iteration
//   2. per micro-batch: teacher inference on the n_global global crops; student forward on
//      all crops; targets q = Target(teacher logits, tau_t); loss and dloss/dlogits (scaled
//      by 1 / micro-batches); head and backbone backward (gradients accumulate);
//      Target.observe(raw teacher logits)
//   3. a non-finite loss or gradient skips the step (nothing changes but the iteration
//      counter; the pending target update is discarded) and says so in the stats
//   4. per-tensor clipping (clip_grad > 0); the last layer is left alone while
//      epoch < freeze_last_layer; AdamW with the parameter groups; TeacherUpdate(momentum);
//      Target.commit()
//
// Crops are rows of `crops` [n_crops * b, in_dim], crop-major (all images' crop 0, then
// crop 1, ...), the first n_global crops being the global ones, as MultiCropWrapper orders them.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <type_traits>

#include "dino/core/param_store.hpp"
#include "dino/core/workspace.hpp"
#include "dino/nn/init.hpp"
#include "dino/optim/adamw.hpp"
#include "dino/optim/clip.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/ssl/concepts.hpp"
#include "dino/ssl/diagnostics.hpp"
#include "dino/ssl/schedules.hpp"

namespace dino::ssl {

struct train_config {
  schedule_config schedule{};
  optim::adamw_config adamw{};
  double clip_grad = 3.0;               ///< per-tensor clipping threshold; 0 disables
  std::int64_t freeze_last_layer = 1;   ///< epochs during which the head's last layer is not updated
  std::int64_t max_batch = 64;          ///< images per micro-batch (buffers are planned for it)
  std::uint64_t seed = 0;               ///< initialisation seed
};

/// What one optimizer step did.
struct step_stats {
  std::int64_t iteration = 0, epoch = 0;
  double loss = 0, teacher_entropy = 0, kl = 0, ln_k = 0;
  bool collapsed = false;
  double lr = 0, weight_decay = 0, momentum = 0, teacher_temp = 0;
  bool skipped = false;
  const char* skip_reason = "";  ///< why a step was skipped (static string)
  int clipped_tensors = 0;
};

template <class Backbone, class Head, class Target, class Loss, class TeacherUpdate, class T = float>
class method {
  static_assert(network_module<Backbone, T>,
                "dino::ssl::method: the Backbone does not satisfy dino::ssl::network_module (see ssl/concepts.hpp)");
  static_assert(network_module<Head, T>,
                "dino::ssl::method: the Head does not satisfy dino::ssl::network_module (see ssl/concepts.hpp)");
  static_assert(teacher_target<Target, T>,
                "dino::ssl::method: the Target does not satisfy dino::ssl::teacher_target (see ssl/concepts.hpp)");
  static_assert(distillation_loss<Loss, T>,
                "dino::ssl::method: the Loss does not satisfy dino::ssl::distillation_loss (see ssl/concepts.hpp)");
  static_assert(teacher_update<TeacherUpdate, T>,
                "dino::ssl::method: the TeacherUpdate does not satisfy dino::ssl::teacher_update (see ssl/concepts.hpp)");

 public:
  using value_type = T;
  using backbone_type = Backbone;
  using head_type = Head;

  method(typename Backbone::config_type bcfg, typename Head::config_type hcfg, Target target, Loss loss,
         TeacherUpdate update, train_config tc)
      : tc_(tc), backbone_(bcfg, layout_, "backbone."), head_(hcfg, layout_, "head."), target_(std::move(target)),
        loss_(std::move(loss)), update_(std::move(update)) {
    require<config_error>(backbone_.out_dim() == head_.in_dim(), "method: the backbone's output size ",
                          backbone_.out_dim(), " differs from the head's input size ", head_.in_dim());
    require<config_error>(head_.out_dim() == target_.out_dim(), "method: the head's output size (K = ", head_.out_dim(),
                          ") differs from the target's (K = ", target_.out_dim(), ")");
    require<config_error>(tc.max_batch > 0, "method: max_batch must be positive, got ", tc.max_batch);
    sched_ = dino_schedules(tc_.schedule);
    student_ = flat_params<T>(layout_);
    teacher_ = flat_params<T>(layout_);
    grads_ = flat_params<T>(layout_);
    nn::initialize(student_, tc.seed);
    teacher_.copy_from(student_);
    opt_ = optim::adamw<T>(layout_, tc.adamw);
    plan(tc.max_batch);
  }
  method(const method&) = delete;
  method& operator=(const method&) = delete;

  /// One optimizer step on one micro-batch.
  step_stats step(const cpu_policy& pol, host_view<const T> crops) { return step(pol, std::span(&crops, 1)); }

  /// One optimizer step accumulated over several micro-batches (each crop-major).
  step_stats step(const cpu_policy& pol, std::span<const host_view<const T>> micro) {
    require<config_error>(!micro.empty(), "method::step: no micro-batch given");
    require<config_error>(iteration_ < sched_.total_iters(), "method::step: iteration ", iteration_,
                          " is past the end of the schedules (", sched_.total_iters(), " iterations)");
    const auto sv = sched_.at(iteration_);
    step_stats st;
    st.iteration = iteration_;
    st.epoch = sv.epoch;
    st.lr = sv.lr;
    st.weight_decay = sv.wd;
    st.momentum = sv.momentum;
    st.teacher_temp = sv.teacher_temp;
    grads_.fill_zero();
    const double scale = 1.0 / double(micro.size());
    const bool freeze = sv.epoch < tc_.freeze_last_layer;
    try {
      for (const auto& x : micro) {
        double ent = 0;
        const double l = micro_step(pol, x, sv.teacher_temp, scale, freeze, ent);
        st.loss += scale * l;
        st.teacher_entropy += scale * ent;
      }
    } catch (const numeric_error&) {
      return skip(st, "non-finite loss");
    }
    if (!all_finite(pol, grads_.data(), static_cast<std::int64_t>(grads_.size()))) return skip(st, "non-finite gradient");
    const auto d = diagnose(st.loss, st.teacher_entropy, head_.out_dim());
    st.kl = d.kl;
    st.ln_k = d.ln_k;
    st.collapsed = d.collapsed;
    const unsigned skip_flags = freeze ? unsigned(param_last_layer) : unsigned(param_none);
    if (tc_.clip_grad > 0) st.clipped_tensors = optim::clip_gradients(pol, grads_, tc_.clip_grad);
    opt_.step(pol, student_, grads_, sv.lr, sv.wd, skip_flags);
    update_(pol, teacher_, student_, sv.momentum);
    target_.commit();
    ++iteration_;
    return st;
  }

  /// Teacher logits [b, K] for inputs [b, in_dim] (inference; the method's own buffers).
  host_view<const T> teacher_logits(const cpu_policy& pol, host_view<const T> x) {
    run_teacher(pol, x);
    return {r_.t_logits, {x.rows(), head_.out_dim()}, "teacher logits"};
  }

  const param_layout& layout() const { return layout_; }
  flat_params<T>& student() { return student_; }
  flat_params<T>& teacher() { return teacher_; }
  flat_params<T>& grads() { return grads_; }
  optim::adamw<T>& optimizer() { return opt_; }
  Target& target() { return target_; }
  const Backbone& backbone() const { return backbone_; }
  const Head& head() const { return head_; }
  const Loss& loss() const { return loss_; }
  const dino_schedules& schedules() const { return sched_; }
  std::int64_t iteration() const { return iteration_; }
  void set_iteration(std::int64_t it) { iteration_ = it; }
  /// Bytes of activation and scratch memory planned at construction (one allocation).
  std::size_t workspace_bytes() const { return ws_.capacity(); }

 private:
  int crops() const { return loss_.config().n_crops; }
  int globals() const { return loss_.config().n_global; }

  // Every buffer of a step, sized by the parts' queries for the largest micro-batch and taken
  // from one workspace allocated here: the step itself allocates nothing.
  void plan(std::int64_t b) {
    const std::int64_t ns = crops() * b, nt = globals() * b, D = backbone_.out_dim(), K = head_.out_dim();
    const auto n = [](std::int64_t v) { return static_cast<std::size_t>(v); };
    r_.saved_n = backbone_.saved_elems(ns) + head_.saved_elems(ns);
    r_.scratch_n = std::max({backbone_.scratch_elems(ns), head_.scratch_elems(ns), backbone_.scratch_elems(nt),
                             head_.scratch_elems(nt)});
    workspace_plan p;
    for (std::size_t elems : {r_.saved_n, r_.scratch_n,
                              n(ns * D), n(ns * D), n(ns * K), n(ns * K),  // features, their grad, logits, grad
                              n(nt * D), n(nt * K), n(nt * K),             // teacher features, logits, targets
                              n(ns), n(nt)})                               // per-row loss and entropy
      p.add_bytes(elems * sizeof(T));
    ws_ = workspace(p);
    r_.saved = ws_.take<T>(r_.saved_n, "saved activations");
    r_.scratch = ws_.take<T>(r_.scratch_n, "scratch");
    r_.s_feat = ws_.take<T>(n(ns * D), "student features");
    r_.d_feat = ws_.take<T>(n(ns * D), "d student features");
    r_.s_logits = ws_.take<T>(n(ns * K), "student logits");
    r_.ds = ws_.take<T>(n(ns * K), "d student logits");
    r_.t_feat = ws_.take<T>(n(nt * D), "teacher features");
    r_.t_logits = ws_.take<T>(n(nt * K), "teacher logits");
    r_.q = ws_.take<T>(n(nt * K), "teacher targets");
    r_.row = ws_.take<T>(n(ns), "row loss");
    r_.ent = ws_.take<T>(n(nt), "teacher entropy");
    max_rows_ = ns;
  }

  host_view<T> scratch() { return {r_.scratch, {std::int64_t(r_.scratch_n)}, "scratch"}; }

  void run_teacher(const cpu_policy& pol, host_view<const T> x) {
    const std::int64_t n = x.rows();
    require<shape_error>(n <= globals() * tc_.max_batch, "method: teacher input has ", n, " rows, more than planned (",
                         globals() * tc_.max_batch, ")");
    const std::int64_t D = backbone_.out_dim(), K = head_.out_dim();
    host_view<const T> P{teacher_.data(), {std::int64_t(teacher_.size())}, "teacher parameters"};
    host_view<T> f{r_.t_feat, {n, D}, "teacher features"};
    backbone_.infer(pol, P, x, f, scratch());
    head_.infer(pol, P, host_view<const T>(f), host_view<T>{r_.t_logits, {n, K}, "teacher logits"}, scratch());
  }

  double micro_step(const cpu_policy& pol, host_view<const T> x, double tau, double scale, bool freeze, double& ent) {
    const std::int64_t ns = x.rows();
    require<shape_error>(ns % crops() == 0, "method::step: crops has ", ns, " rows, not a multiple of the crop count ",
                         crops());
    require<shape_error>(ns <= max_rows_, "method::step: crops has ", ns, " rows, more than planned (", max_rows_,
                         " = ", crops(), " crops x max_batch ", tc_.max_batch, ")");
    check_matrix("method::step", x, backbone_.in_dim());
    const std::int64_t b = ns / crops(), nt = globals() * b, D = backbone_.out_dim(), K = head_.out_dim();
    // Teacher on the global crops (the first n_global * b rows).
    run_teacher(pol, x.slice_rows(0, nt));
    host_view<const T> t{r_.t_logits, {nt, K}, "teacher logits"};
    // Student on all crops.
    host_view<const T> P{student_.data(), {std::int64_t(student_.size())}, "student parameters"};
    host_view<T> G{grads_.data(), {std::int64_t(grads_.size())}, "student gradients"};
    const std::size_t bsaved = backbone_.saved_elems(ns);
    host_view<T> sb{r_.saved, {std::int64_t(bsaved)}, "backbone saved"};
    host_view<T> sh{r_.saved + bsaved, {std::int64_t(head_.saved_elems(ns))}, "head saved"};
    host_view<T> feat{r_.s_feat, {ns, D}, "student features"};
    host_view<T> logits{r_.s_logits, {ns, K}, "student logits"};
    backbone_.forward(pol, P, x, feat, sb);
    head_.forward(pol, P, host_view<const T>(feat), logits, sh);
    // Targets and loss.
    host_view<T> q{r_.q, {nt, K}, "teacher targets"};
    ent = target_.targets(pol, t, tau, q, host_view<T>{r_.ent, {nt}, "teacher entropy"});
    host_view<T> ds{r_.ds, {ns, K}, "d student logits"};
    const double l = loss_.forward_backward(pol, host_view<const T>(logits), host_view<const T>(q),
                                            host_view<T>{r_.row, {ns}, "row loss"}, ds, scale, false);
    // Backward (parameter gradients accumulate across micro-batches).
    host_view<T> dfeat{r_.d_feat, {ns, D}, "d student features"};
    if constexpr (requires { head_.backward(pol, P, host_view<const T>(feat), host_view<const T>(sh), host_view<const T>(ds), dfeat, grad_mode::write, G, scratch(), freeze); })
      head_.backward(pol, P, host_view<const T>(feat), host_view<const T>(sh), host_view<const T>(ds), dfeat,
                     grad_mode::write, G, scratch(), freeze);
    else
      head_.backward(pol, P, host_view<const T>(feat), host_view<const T>(sh), host_view<const T>(ds), dfeat,
                     grad_mode::write, G, scratch());
    backbone_.backward(pol, P, x, host_view<const T>(sb), host_view<const T>(dfeat), host_view<T>{}, grad_mode::skip, G,
                       scratch());
    target_.observe(pol, t);
    return l;
  }

  step_stats skip(step_stats st, const char* why) {
    target_.discard();
    grads_.fill_zero();
    st.skipped = true;
    st.skip_reason = why;
    ++iteration_;
    return st;
  }

  train_config tc_;
  param_layout layout_;
  Backbone backbone_;
  Head head_;
  Target target_;
  Loss loss_;
  TeacherUpdate update_;
  dino_schedules sched_;
  flat_params<T> student_, teacher_, grads_;
  optim::adamw<T> opt_;
  struct regions {
    T *saved = nullptr, *scratch = nullptr, *s_feat = nullptr, *d_feat = nullptr, *s_logits = nullptr, *ds = nullptr;
    T *t_feat = nullptr, *t_logits = nullptr, *q = nullptr, *row = nullptr, *ent = nullptr;
    std::size_t saved_n = 0, scratch_n = 0;
  };
  workspace ws_;
  regions r_;
  std::int64_t max_rows_ = 0;
  std::int64_t iteration_ = 0;
};

}  // namespace dino::ssl
