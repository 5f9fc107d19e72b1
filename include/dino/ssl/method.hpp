// dino/ssl/method.hpp: a self-distillation method assembled at compile time from its parts.
//
//   method<Backbone, Head, Target, Loss, TeacherUpdate, T, Policy, Predictor = no_predictor,
//          StudentMask = no_student_mask>
//
// Policy is cpu_policy (the default) or, with <dino/cuda.hpp>, cuda_policy: parameters,
// gradients, optimizer state and every buffer then live in device memory, and step() takes
// the same host input, which it copies into a planned device buffer on the policy's stream.
// owns a student and a teacher (one param_layout, flat buffers with the official state_dict
// names "backbone.*" and "head.*"), the student's gradients, AdamW state, the schedules and
// every activation buffer, planned at construction for the largest micro-batch: a step
// allocates nothing. One optimizer step (dino-spec §4.6), over one or more micro-batches:
//
//   1. lr, wd, teacher momentum and tau_t from the schedules at the current iteration
//      (built from train_config::schedule, or given explicitly with set_schedules())
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
// On the CPU step() returns filled stats, as it always has. On the GPU a step never waits
// for the device (no allocation, no host synchronisation: cuda::host_waits() does not
// move): the loss and the mean teacher entropy are summed into a planned device slot (the
// scalar_out forms of the Loss and the Target), the non-finite checks set device flags
// (flag_non_finite on the loss and on the gradients), clipping counts into the slot, and
// step 3's skip is decided on the device: AdamW, TeacherUpdate(pol, t, s, m, skip_flag) and
// Target.commit(pol, skip_flag) read the flag in their kernels and change nothing when it
// is set (the center's pending sums are cleared). The schedules and the iteration counter
// stay on the host; a skipped step still counts. step() then returns stats whose
// device-dependent fields (loss, teacher_entropy, kl, ln_k, collapsed, skipped,
// skip_reason, clipped_tensors) are pending: stats.ready() is false until
// read_stats(pol, stats) fills them, which waits for that step (one counted host wait).
// The slots form a ring of step_result_slots steps; reading older stats throws. A part
// without those device forms still works, at the cost of one host wait per step (or per
// micro-batch for the loss and the entropy). On the GPU, after a skipped step the
// gradients hold what that step computed (the CPU zeroes them); AdamW's step counts stay
// exact (optim/adamw.hpp). A step skipped for a non-finite loss reports loss and teacher
// entropy 0 on the GPU (the CPU reports the micro-batches summed before the failing one).
//
// Step graphs (GPU, use_step_graphs(true); off by default): a step of one full micro-batch
// replays a CUDA graph of it (policy/cuda/graph.cuh), one launch instead of hundreds. What
// changes each step is read by the kernels from device memory (step_scalars, written by one
// small kernel before the replay: lr, wd, teacher momentum and temperature, the DropPath
// step; the parts take them as step_value), the input is uploaded before the replay and the
// graph's own result slot is read back after it into the step's host mirror. The graph is
// captured on a step that follows a plain step of the same policy and freeze of the last
// layer (the first step, and the first after either changes, run plain); a replayed step
// computes what a plain one computes. Parts that decide on the host or take a per-step value
// by value only make graph_capable false (use_step_graphs then throws); a step the graph
// cannot hold runs plain (step_graph_refusal()); a capture that fails is undone on the host
// and leaves graphs off (step_graph_error()).
//
// Optional parts and traits (each costs nothing when absent; the GPU step of DINO is unchanged):
// - a stateful loss (concept stateful_loss: InfoNCE's queue) is observed, committed and
//   discarded where the target is;
// - a loss with uses_teacher = false (NT-Xent) skips the teacher forward, the targets, their
//   observe and the teacher update;
// - a TeacherUpdate with shares_student = true (no_teacher) makes the teacher forward read the
//   student's parameters (shared weights, stop-gradient); copy_update makes the teacher the
//   student after each step (no momentum);
// - a Predictor (ssl/predictor.hpp) runs on the student after the head; its parameters
//   ("predictor.*") end the layout and the teacher update covers the layout before them
//   (the update's view form: ranged_teacher_update), so the teacher never follows them;
// - the crop plan is the loss's: n_crops = n_global (2) is the two-crop plan, no local crops;
// - a StudentMask (ssl/student_mask.hpp; image backbones, CPU or GPU, a loss that uses the
//   teacher) masks the student's view of each global crop: the teacher forward also returns
//   its last-block CLS attention, the mask picks each global crop's kept patches from it, and
//   the student's global crops run as shorter segments of the kept patches only (nn/vit.hpp,
//   crop_set::keep). Local crops are not masked. A mask that keeps every patch (kept(N) = N)
//   changes nothing: the method is then plain DINO, bit for bit.
//
// Crops are rows of `crops` [n_crops * b, in_dim], crop-major (all images' crop 0, then
// crop 1, ...), the first n_global crops being the global ones, as MultiCropWrapper orders them.
#pragma once

#include <array>
#include <cmath>
#include <limits>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <utility>

#include "dino/core/param_store.hpp"
#include "dino/core/workspace.hpp"
#include "dino/nn/init.hpp"
#include "dino/optim/adamw.hpp"
#include "dino/optim/clip.hpp"
#include "dino/policy/cpu.hpp"
#include "dino/ssl/concepts.hpp"
#include "dino/ssl/diagnostics.hpp"
#include "dino/ssl/predictor.hpp"
#include "dino/ssl/schedules.hpp"
#include "dino/ssl/student_mask.hpp"

namespace dino::ssl {

/// Crop sizes for image backbones (the counts come from the loss: n_global, n_crops - n_global).
struct crop_plan {
  std::int64_t global_size = 224;
  std::int64_t local_size = 96;
};

/// One micro-batch of images for an image backbone: NCHW arrays, crop-major (all images'
/// crop 0, then crop 1, ...), global crops [n_global * b, C, G, G], local [n_local * b, C, L, L].
template <class T>
struct image_crops {
  const T* global = nullptr;
  const T* local = nullptr;
};

struct train_config {
  schedule_config schedule{};
  optim::adamw_config adamw{};
  double clip_grad = 3.0;               ///< per-tensor clipping threshold; 0 disables
  std::int64_t freeze_last_layer = 1;   ///< epochs during which the head's last layer is not updated
  std::int64_t max_batch = 64;          ///< images per micro-batch (buffers are planned for it)
  std::uint64_t seed = 0;               ///< initialisation and DropPath seed
  crop_plan crops{};                    ///< crop sizes (image backbones only)
};

/// What one optimizer step did. iteration, epoch and the schedule values are known at once;
/// on the GPU the others (loss, teacher_entropy, kl, ln_k, collapsed, skipped, skip_reason,
/// clipped_tensors) stay on the device until method::read_stats fills them (ready()); until
/// then the numbers are NaN and clipped_tensors is -1.
struct step_stats {
  std::int64_t iteration = 0, epoch = 0;
  double loss = 0, teacher_entropy = 0, kl = 0, ln_k = 0;
  bool collapsed = false;
  double lr = 0, weight_decay = 0, momentum = 0, teacher_temp = 0;
  bool skipped = false;
  const char* skip_reason = "";  ///< why a step was skipped (static string)
  int clipped_tensors = 0;
  bool pending = false;      ///< device-dependent fields not read yet (GPU): see method::read_stats
  std::uint64_t ticket = 0;  ///< the method's result slot of this step (GPU)
  /// Whether every field is filled (always on the CPU).
  bool ready() const { return !pending; }
};

/// The per-step values a GPU step graph reads (method::use_step_graphs): written to device
/// memory before each replay, read by the kernels that take them as step_value.
struct step_scalars {
  double lr = 0, wd = 0, momentum = 0, teacher_temp = 0;
  std::uint64_t micro_index = 0;  ///< the DropPath step
};

template <class Backbone, class Head, class Target, class Loss, class TeacherUpdate, class T = float,
          class Policy = cpu_policy, class Predictor = no_predictor, class StudentMask = no_student_mask>
class method {
  static constexpr bool images = image_backbone<Backbone, T, Policy>;
  static constexpr bool on_host = std::is_same_v<memory_space_t<Policy>, host_space>;
  static constexpr bool has_predictor = !std::is_same_v<Predictor, no_predictor>;
  static constexpr bool with_teacher = uses_teacher_v<Loss>;
  static constexpr bool loss_state = stateful_loss<Loss, T, Policy>;
  static constexpr bool shared_teacher = shares_student_v<TeacherUpdate>;
  static constexpr bool has_mask = !std::is_same_v<StudentMask, no_student_mask>;
  static_assert(network_module<Backbone, T, Policy> || images,
                "dino::ssl::method: the Backbone satisfies neither dino::ssl::network_module nor "
                "dino::ssl::image_backbone (see ssl/concepts.hpp)");
  static_assert(network_module<Head, T, Policy>,
                "dino::ssl::method: the Head does not satisfy dino::ssl::network_module (see ssl/concepts.hpp)");
  static_assert(teacher_target<Target, T, Policy>,
                "dino::ssl::method: the Target does not satisfy dino::ssl::teacher_target (see ssl/concepts.hpp)");
  static_assert(distillation_loss<Loss, T, Policy>,
                "dino::ssl::method: the Loss does not satisfy dino::ssl::distillation_loss (see ssl/concepts.hpp)");
  static_assert(teacher_update<TeacherUpdate, T, Policy>,
                "dino::ssl::method: the TeacherUpdate does not satisfy dino::ssl::teacher_update (see ssl/concepts.hpp)");
  static_assert(predictor_part<Predictor, T, Policy>,
                "dino::ssl::method: the Predictor does not satisfy dino::ssl::network_module (see ssl/concepts.hpp)");
  static_assert(!has_predictor || ranged_teacher_update<TeacherUpdate, T, Policy>,
                "dino::ssl::method: with a Predictor, the TeacherUpdate needs the view form of "
                "dino::ssl::ranged_teacher_update (the teacher must not follow the predictor)");
  static_assert(!has_mask || images,
                "dino::ssl::method: a StudentMask needs an image backbone (nn::vit): it drops patch tokens");
  static_assert(!has_mask || with_teacher,
                "dino::ssl::method: a StudentMask ranks patches by the teacher's attention: the Loss must use the teacher");
  static_assert(student_mask_part<StudentMask, T, Policy>,
                "dino::ssl::method: the StudentMask does not satisfy dino::ssl::student_mask_part (see ssl/student_mask.hpp)");
  static_assert(dims_fit(static_out_dim_v<Backbone>, static_in_dim_v<Head>),
                "dino::ssl::method: the Backbone's output size differs from the Head's input size "
                "(static_out_dim != static_in_dim)");
  static_assert(!has_predictor || dims_fit(static_out_dim_v<Head>, static_in_dim_v<Predictor>),
                "dino::ssl::method: the Predictor's input size differs from the Head's output size "
                "(Predictor::static_in_dim != Head::static_out_dim)");
  static_assert(!has_predictor || dims_fit(static_out_dim_v<Head>, static_out_dim_v<Predictor>),
                "dino::ssl::method: the Predictor's output size differs from the Head's output size "
                "(the loss compares it with the teacher's head output)");

 public:
  using value_type = T;
  using policy_type = Policy;
  using space = memory_space_t<Policy>;
  using view = tensor_view<T, space>;
  using cview = tensor_view<const T, space>;
  using backbone_type = Backbone;
  using head_type = Head;
  using predictor_type = Predictor;
  using target_type = Target;
  using loss_type = Loss;
  using update_type = TeacherUpdate;
  using mask_type = StudentMask;
  /// What step() takes per micro-batch: a crop-major matrix of rows, or image arrays.
  using input_type = std::conditional_t<images, image_crops<T>, host_view<const T>>;
  /// GPU: how many steps' results the device keeps for read_stats (a ring).
  static constexpr std::uint64_t step_result_slots = 64;

 private:
  // The device forms a GPU step uses (see the file comment); without them it waits.
  static constexpr bool target_in_place =
      requires(const Target& x, const Policy& pol, cview t, double tau, view q, view e, scalar_out o) {
        x.targets(pol, t, tau, q, e, o);
      };
  static constexpr bool loss_in_place =
      requires(const Loss& l, const Policy& pol, cview s, cview q, view r, view ds, scalar_out o) {
        l.forward_backward(pol, s, q, r, ds, 1.0, false, o);
      };
  static constexpr bool update_flagged =
      requires(const TeacherUpdate& u, const Policy& pol, flat_params<T, space>& t, const flat_params<T, space>& s,
               const int* f) { u(pol, t, s, 0.5, f); };
  static constexpr bool commit_flagged = requires(Target& x, const Policy& pol, const int* f) { x.commit(pol, f); };
  static constexpr bool loss_commit_flagged =
      !stateful_loss<Loss, T, Policy> || requires(Loss& l, const Policy& pol, const int* f) { l.commit(pol, f); };
  // What a step replayed from a CUDA graph needs of the parts (use_step_graphs): the values
  // that change each step taken as step_value, read on the device when the kernels run.
  static constexpr bool target_reads_tau =
      requires(const Target& x, const Policy& pol, cview t, view q, view e, scalar_out o) {
        x.targets(pol, t, step_value<double>{}, q, e, o);
      };
  static constexpr bool update_reads_momentum =
      requires(const TeacherUpdate& u, const Policy& pol, flat_params<T, space>& t, const flat_params<T, space>& s,
               const int* f) { u(pol, t, s, step_value<double>{}, f); };
  static constexpr bool backbone_reads_step =
      !images || requires(const Backbone& b, const Policy& pol, cview P, const nn::vit_pack<T>& pk,
                          std::span<const T* const> sets, view y) {
        b.forward(pol, P, pk, sets, y, y, std::uint64_t(0), step_value<std::uint64_t>{});
      };
  /// Whether GPU steps can replay a CUDA graph (use_step_graphs): every part decides on the
  /// device and reads its per-step values there; no predictor, StudentMask or stateful loss.
  static constexpr bool graph_capable = !on_host && with_teacher && !has_predictor && !has_mask && !loss_state &&
                                        target_in_place && loss_in_place && update_flagged && commit_flagged &&
                                        target_reads_tau && update_reads_momentum && backbone_reads_step;

  /// One step's results in device memory (GPU).
  struct step_slot {
    double loss = 0, teacher_entropy = 0;  // summed over micro-batches, each weighted 1 / micro-batches
    int loss_non_finite = 0;               // the loss is NaN or infinite
    int skip = 0;                          // the loss or a gradient is: the updates are no-ops
    int clipped = 0;                       // tensors clipped
    int unused = 0;
  };
  /// What the host keeps of a slot: whose it is, and values a part returned to the host.
  struct slot_host {
    std::uint64_t ticket = ~std::uint64_t(0);
    double loss = 0, teacher_entropy = 0;
  };

 public:

  /// The StudentMask, when the method has one, comes last.
  method(typename Backbone::config_type bcfg, typename Head::config_type hcfg, Target target, Loss loss,
         TeacherUpdate update, train_config tc, StudentMask mask = StudentMask{})
    requires(!has_predictor)
      : method(std::move(bcfg), std::move(hcfg), typename Predictor::config_type{}, std::move(target), std::move(loss),
               std::move(update), tc, std::move(mask)) {}
  /// With a predictor: its configuration after the head's.
  method(typename Backbone::config_type bcfg, typename Head::config_type hcfg, typename Predictor::config_type pcfg,
         Target target, Loss loss, TeacherUpdate update, train_config tc, StudentMask mask = StudentMask{})
      : tc_(tc), backbone_(bcfg, layout_, "backbone."), head_(hcfg, layout_, "head."),
        teacher_elems_(layout_.size()), predictor_(std::move(pcfg), layout_, "predictor."),
        target_(std::move(target)), loss_(std::move(loss)), update_(std::move(update)), mask_(std::move(mask)) {
    if constexpr (has_predictor) {
      require<config_error>(predictor_.in_dim() == head_.out_dim(), "method: the predictor's input size ",
                            predictor_.in_dim(), " differs from the head's output size ", head_.out_dim());
      require<config_error>(predictor_.out_dim() == head_.out_dim(), "method: the predictor's output size ",
                            predictor_.out_dim(), " differs from the head's output size ", head_.out_dim(),
                            " (the loss compares it with the teacher's)");
    }
    require<config_error>(backbone_.out_dim() == head_.in_dim(), "method: the backbone's output size ",
                          backbone_.out_dim(), " differs from the head's input size ", head_.in_dim());
    require<config_error>(head_.out_dim() == target_.out_dim(), "method: the head's output size (K = ", head_.out_dim(),
                          ") differs from the target's (K = ", target_.out_dim(), ")");
    require<config_error>(tc.max_batch > 0, "method: max_batch must be positive, got ", tc.max_batch);
    sched_ = dino_schedules(tc_.schedule);
    student_ = flat_params<T, space>(layout_);
    teacher_ = flat_params<T, space>(layout_);
    grads_ = flat_params<T, space>(layout_);
    if constexpr (std::is_same_v<space, host_space>) {
      nn::initialize(student_, tc.seed);
    } else {  // the same numbers as on the host: initialise there, then copy
      flat_params<T> init(layout_);
      nn::initialize(init, tc.seed);
      assign_params(student_, init);
    }
    teacher_.copy_from(student_);
    opt_ = optim::adamw<T, space>(layout_, tc.adamw);
    plan(tc.max_batch);
  }
  method(const method&) = delete;
  method& operator=(const method&) = delete;

  /// Plans the step's buffers again for `pol` (set-up: allocates; before the first step). A
  /// method is planned at construction for a default policy, whose plan serves every policy;
  /// on the GPU with pol.bf16_attention the ViT's attention keeps one float per row instead
  /// of P (nn::attention_store), and planning for it shrinks the saved activations and the
  /// scratch by the n x n blocks (memory() tells by how much).
  void plan_for(const Policy& pol) {
    require<config_error>(!stepped_, "method::plan_for: plan before the first step");
    plan(tc_.max_batch, pol);
  }

  /// One optimizer step on one micro-batch.
  step_stats step(const Policy& pol, input_type crops) { return step(pol, std::span<const input_type>(&crops, 1)); }

  /// One optimizer step accumulated over several micro-batches (each crop-major).
  step_stats step(const Policy& pol, std::span<const input_type> micro) {
    require<config_error>(!micro.empty(), "method::step: no micro-batch given");
    stepped_ = true;
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
    const double scale = 1.0 / double(micro.size());
    const bool freeze = sv.epoch < tc_.freeze_last_layer;
    if constexpr (!on_host) {
      return device_step(pol, micro, st, scale, freeze);
    } else {
      fill_zero(pol, grads_.data(), grads_.size());
      try {
        for (std::size_t mi = 0; mi < micro.size(); ++mi) {
          double ent = 0;
          const double l = micro_step(pol, micro[mi], sv.teacher_temp, scale, freeze, ent,
                                      std::uint64_t(iteration_) * micro.size() + mi);
          st.loss += scale * l;
          st.teacher_entropy += scale * ent;
        }
      } catch (const numeric_error&) {
        return skip(pol, st, "non-finite loss");
      }
      if (!all_finite(pol, grads_.data(), static_cast<std::int64_t>(grads_.size())))
        return skip(pol, st, "non-finite gradient");
      const auto d = diagnose(st.loss, st.teacher_entropy, head_.out_dim());
      st.kl = d.kl;
      st.ln_k = d.ln_k;
      st.collapsed = d.collapsed;
      const unsigned skip_flags = freeze ? unsigned(param_last_layer) : unsigned(param_none);
      if (tc_.clip_grad > 0) st.clipped_tensors = optim::clip_gradients(pol, grads_, tc_.clip_grad);
      opt_.step(pol, student_, grads_, sv.lr, sv.wd, skip_flags);
      update_teacher(pol, sv.momentum);
      commit_target(pol);
      ++iteration_;
      return st;
    }
  }

  /// Whether this method's GPU steps can replay a CUDA graph (use_step_graphs).
  static constexpr bool step_graphs_supported = graph_capable;
  /// GPU: runs each step (one micro-batch of max_batch images or rows) by replaying a CUDA
  /// graph of it: one launch instead of hundreds (see the file comment). The graph is captured
  /// on the step after a plain step of the same policy and freeze of the last layer (the first
  /// step, and the first after either changes, run plain); the steps compute what plain steps
  /// compute (the same kernels in the same order). A step the graph cannot hold runs plain
  /// (step_graph_refusal() says why). Off by default. Throws config_error on the CPU or for
  /// parts that do not read their per-step values on the device.
  void use_step_graphs(bool on) {
    require<config_error>(!on || !on_host, "method::use_step_graphs: step graphs are CUDA graphs: the CPU policy has none");
    require<config_error>(!on || graph_capable, "method::use_step_graphs: a part of this method decides on the host or "
                          "takes a per-step value only by value (step graphs need DINO's parts: centering, the "
                          "distillation loss, ema_update; no predictor, StudentMask or stateful loss)");
    graphs_.on = on;
    graphs_.refusal = "";
  }
  bool step_graphs() const { return graphs_.on; }
  /// Step graph counts: captures, replays (steps run from a graph) and the captured graph's nodes.
  struct step_graph_counts {
    std::uint64_t captures = 0, replays = 0;
    std::size_t nodes = 0;
  };
  step_graph_counts graph_counts() const {
    step_graph_counts c{graphs_.captures, graphs_.replays, 0};
    if constexpr (!on_host) c.nodes = graphs_.graph.nodes();
    return c;
  }
  /// With step graphs on: why the latest step ran plain ("" when it replayed the graph).
  const char* step_graph_refusal() const { return graphs_.refusal; }
  /// The error of a failed capture ("" when none): the steps since have run plain.
  const std::string& step_graph_error() const { return graphs_.error; }

  /// Fills the device-dependent fields of a GPU step's stats (see step_stats): waits for that
  /// step (one counted host wait). Nothing to do when st.ready() (always on the CPU). Throws
  /// config_error when the step is more than step_result_slots steps old.
  void read_stats(const Policy& pol, step_stats& st) {
    (void)pol;
    if (st.ready()) return;
    if constexpr (!on_host) {
      const std::size_t slot = std::size_t(st.ticket % step_result_slots);
      require<config_error>(slots_host_[slot].ticket == st.ticket, "method::read_stats: the results of step ",
                            st.iteration, " are gone: the device keeps those of the last ", step_result_slots,
                            " steps");
      step_slot h;
      std::memcpy(static_cast<void*>(&h), readback_.wait(slot, "method::read_stats"), sizeof h);
      fill_stats(st, h, slots_host_[slot]);
      if (st.skipped) (void)opt_.steps();  // AdamW's host step counts from the device's again
    }
    st.pending = false;
  }
  /// Teacher logits [b, K] for inputs [b, in_dim] (row backbones; the method's own buffers).
  cview teacher_logits(const Policy& pol, host_view<const T> x)
    requires(!images)
  {
    run_teacher(pol, stage_rows(pol, x, x.rows()));
    return {r_.t_logits, {x.rows(), head_.out_dim()}, "teacher logits"};
  }

  const param_layout& layout() const { return layout_; }
  flat_params<T, space>& student() { return student_; }
  flat_params<T, space>& teacher() { return teacher_; }
  flat_params<T, space>& grads() { return grads_; }
  optim::adamw<T, space>& optimizer() { return opt_; }
  Target& target() { return target_; }
  Loss& loss() { return loss_; }
  const Predictor& predictor() const { return predictor_; }
  const StudentMask& mask() const { return mask_; }
  /// Patches of a global crop when the student's view is masked (0: nothing is masked).
  std::int64_t masked_patches() const { return mask_patches_; }
  /// The patches the student kept of each global crop in the last micro-batch: [n_global *
  /// max_batch, kept], crop-major, ascending per crop (empty when nothing is masked).
  /// On the GPU the table lives in device memory: kept_patches_device() (same layout).
  std::span<const std::int64_t> kept_patches() const
    requires(on_host)
  {
    if constexpr (has_mask) {
      if (mask_patches_) return student_pack_.keep[0];
    }
    return {};
  }
  const std::int64_t* kept_patches_device() const
    requires(!on_host)
  {
    if constexpr (has_mask) {
      if (mask_patches_) return student_pack_.device.keep[0];
    }
    return nullptr;
  }
  /// Elements of the parameter buffers the teacher follows: the whole layout, or the part
  /// before the predictor's parameters.
  std::size_t teacher_elems() const { return has_predictor ? teacher_elems_ : student_.size(); }
  const Backbone& backbone() const { return backbone_; }
  const Head& head() const { return head_; }
  const Loss& loss() const { return loss_; }
  const dino_schedules& schedules() const { return sched_; }
  /// Replaces the schedules with explicit per-iteration values, for a run that
  /// schedule_config cannot express (a warm-up that starts above 0, as utils.cosine_scheduler's
  /// start_warmup_value; tables read from elsewhere). lr, wd and momentum are per iteration and
  /// of one length, the run's; teacher_temp is per epoch of s.iters_per_epoch iterations and
  /// covers every epoch of the run. freeze_last_layer then counts epochs of s.iters_per_epoch.
  /// The iteration counter, the optimizer and the parameters are left as they are.
  void set_schedules(dino_schedules s) {
    require<config_error>(s.iters_per_epoch > 0, "method::set_schedules: iters_per_epoch must be positive, got ",
                          s.iters_per_epoch);
    require<config_error>(!s.lr.empty() && s.wd.size() == s.lr.size() && s.momentum.size() == s.lr.size(),
                          "method::set_schedules: lr, wd and momentum need one common, non-zero length (got ",
                          s.lr.size(), ", ", s.wd.size(), ", ", s.momentum.size(), ")");
    require<config_error>(std::int64_t(s.teacher_temp.size()) > s.epoch_of(s.total_iters() - 1),
                          "method::set_schedules: teacher_temp has ", s.teacher_temp.size(), " epochs, the run needs ",
                          s.epoch_of(s.total_iters() - 1) + 1);
    sched_ = std::move(s);
  }
  std::int64_t iteration() const { return iteration_; }
  void set_iteration(std::int64_t it) { iteration_ = it; }
  /// Bytes of activation and scratch memory planned at construction (one allocation).
  std::size_t workspace_bytes() const { return ws_.capacity(); }

  /// What the method holds in its policy's memory, in bytes, all planned at construction
  /// (nothing grows during steps): the parameter buffers (student, teacher, gradients), the
  /// optimizer's moments, and the step workspace, of which `activations` are the activations
  /// the backward keeps (backbone, head and predictor at max_batch) and `scratch` the largest
  /// temporary region; the rest of the workspace holds the features, logits, targets and their
  /// gradients (and, on the GPU, the staged input and the step results).
  struct memory_report {
    std::size_t parameters = 0, optimizer = 0, workspace = 0, activations = 0, scratch = 0;
    std::size_t total() const { return parameters + optimizer + workspace; }
  };
  memory_report memory() const {
    memory_report r;
    r.parameters = (student_.size() + teacher_.size() + grads_.size()) * sizeof(T);
    r.optimizer = 2 * student_.size() * sizeof(T);
    r.workspace = ws_.capacity();
    r.activations = r_.saved_n * sizeof(T);
    r.scratch = r_.scratch_n * sizeof(T);
    return r;
  }

 private:
  int crops() const { return loss_.config().n_crops; }
  int globals() const { return loss_.config().n_global; }

  // Every buffer of a step, sized by the parts' queries for the largest micro-batch and taken
  // from one workspace allocated here: the step itself allocates nothing.
  void plan(std::int64_t b, const Policy& pol = Policy{}) {
    const std::int64_t ns = crops() * b, nt = globals() * b, D = backbone_.out_dim(), K = head_.out_dim();
    const auto n = [](std::int64_t v) { return static_cast<std::size_t>(v); };
    std::size_t bb_saved = 0, bb_scratch = 0;
    if constexpr (images) {
      const auto& cp = tc_.crops;
      nn::crop_set global{nt, cp.global_size, cp.global_size};
      if constexpr (has_mask) {  // the student's global crops keep mask_.kept(N) patches each
        const std::int64_t p = backbone_.config().patch, np = (cp.global_size / p) * (cp.global_size / p);
        const std::int64_t k = mask_.kept(np);
        require<config_error>(k >= 1 && k <= np, "method: the StudentMask keeps ", k, " of ", np,
                              " patches (it must keep 1 to ", np, ")");
        if (k < np) global.keep = k, mask_patches_ = np;
      }
      // planned for pol's attention, the tables in device memory on the GPU (set-up)
      const auto pack = [&](std::vector<nn::crop_set> sets) {
        return backbone_.template make_pack<T>(pol, std::move(sets));
      };
      student_pack_ = pack({global});
      if (ns > nt) student_pack_ = pack({global, {ns - nt, cp.local_size, cp.local_size}});
      teacher_pack_ = pack({{nt, cp.global_size, cp.global_size}});
      bb_saved = backbone_.saved_elems(student_pack_);
      bb_scratch = std::max({backbone_.scratch_elems(student_pack_), backbone_.infer_scratch_elems(teacher_pack_),
                             static_cast<std::size_t>(student_pack_.tokens * D)});
    } else {
      bb_saved = backbone_.saved_elems(ns);
      bb_scratch = std::max(backbone_.scratch_elems(ns), backbone_.scratch_elems(nt));
    }
    r_.saved_n = bb_saved + head_.saved_elems(ns);
    r_.scratch_n = std::max({bb_scratch, head_.scratch_elems(ns), head_.scratch_elems(nt)});
    if constexpr (has_predictor) {  // its saved activations after the head's; its output and d logits
      r_.pred_saved_n = predictor_.saved_elems(ns);
      r_.saved_n += r_.pred_saved_n;
      r_.scratch_n = std::max(r_.scratch_n, predictor_.scratch_elems(ns));
    }
    r_.dtok_n = 0;
    if constexpr (images) r_.dtok_n = static_cast<std::size_t>(student_pack_.tokens * D);
    bsaved_ = bb_saved;
    workspace_plan p;
    // features, their grad, logits, grad; teacher features, logits, targets; per-row loss
    // and entropy, token grads (a named array: nvcc's front end rejects a braced range-for)
    const std::size_t regions_elems[] = {r_.saved_n, r_.scratch_n, n(ns * D), n(ns * D), n(ns * K), n(ns * K),
                                         n(nt * D), n(nt * K), n(nt * K), n(ns), n(nt), r_.dtok_n};
    for (std::size_t elems : regions_elems) p.add_bytes(elems * sizeof(T));
    if constexpr (has_predictor) {
      p.add_bytes(n(ns * K) * sizeof(T));
      p.add_bytes(n(ns * K) * sizeof(T));
    }
    if constexpr (has_mask) {  // the teacher's CLS attention rows (when something is masked)
      r_.cls_attn_n = mask_patches_ ? backbone_.cls_attention_elems(teacher_pack_) : 0;
      p.add_bytes(r_.cls_attn_n * sizeof(T));
    }
    // Host input copied to the device (GPU only): the crops of one micro-batch.
    if constexpr (!on_host) {
      if constexpr (images) {
        const auto& cp = tc_.crops;
        const std::int64_t C = backbone_.config().in_chans;
        r_.input_n = n(nt * C * cp.global_size * cp.global_size + (ns - nt) * C * cp.local_size * cp.local_size);
      } else {
        r_.input_n = n(ns * backbone_.in_dim());
      }
      p.add_bytes(r_.input_n * sizeof(T));
      p.add_bytes((step_result_slots + 1) * sizeof(step_slot));  // the steps' results and a step graph's (GPU)
      p.add_bytes(sizeof(step_scalars));                          // a step graph's per-step values
    }
    ws_ = decltype(ws_)();  // a plan again (plan_for): the old buffers go first
    ws_ = decltype(ws_)(p);
    r_.saved = ws_.template take<T>(r_.saved_n, "saved activations");
    r_.scratch = ws_.template take<T>(r_.scratch_n, "scratch");
    r_.s_feat = ws_.template take<T>(n(ns * D), "student features");
    r_.d_feat = ws_.template take<T>(n(ns * D), "d student features");
    r_.s_logits = ws_.template take<T>(n(ns * K), "student logits");
    r_.ds = ws_.template take<T>(n(ns * K), "d student logits");
    r_.t_feat = ws_.template take<T>(n(nt * D), "teacher features");
    r_.t_logits = ws_.template take<T>(n(nt * K), "teacher logits");
    r_.q = ws_.template take<T>(n(nt * K), "teacher targets");
    r_.row = ws_.template take<T>(n(ns), "row loss");
    r_.ent = ws_.template take<T>(n(nt), "teacher entropy");
    r_.dtok = ws_.template take<T>(r_.dtok_n, "d tokens");
    if constexpr (has_predictor) {
      r_.p_out = ws_.template take<T>(n(ns * K), "predictor output");
      r_.d_logits = ws_.template take<T>(n(ns * K), "d student head logits");
    }
    if constexpr (has_mask)
      if (r_.cls_attn_n) r_.cls_attn = ws_.template take<T>(r_.cls_attn_n, "teacher CLS attention");
    if constexpr (!on_host) {
      r_.input = ws_.template take<T>(r_.input_n, "input crops");
      r_.slots = ws_.template take<step_slot>(step_result_slots + 1, "step results");
      r_.scalars = ws_.template take<step_scalars>(1, "step graph values");
      readback_ = typename readback_ring_for<space>::type(step_result_slots, sizeof(step_slot));
    }
    max_rows_ = ns;
    // The parts' own scratch (on the GPU device memory, planned here and never in a step).
    if constexpr (requires { target_.reserve(nt, K); }) target_.reserve(nt, K);
    if constexpr (requires { loss_.reserve(ns, K); }) loss_.reserve(ns, K);
  }

  view scratch() { return {r_.scratch, {std::int64_t(r_.scratch_n)}, "scratch"}; }
  // The parameters the teacher forward reads: its own, or the student's (shared weights).
  cview teacher_params() const {
    if constexpr (shared_teacher) return cview{student_.data(), {std::int64_t(student_.size())}, "teacher parameters"};
    else return cview{teacher_.data(), {std::int64_t(teacher_.size())}, "teacher parameters"};
  }
  // The teacher update after an optimizer step (none when the loss ignores the teacher).
  // momentum.at is set only for a step graph, whose update reads it (update_reads_momentum).
  void update_teacher(const Policy& pol, step_value<double> momentum, const int* skip_flag = nullptr) {
    if constexpr (!with_teacher) {
      (void)pol, (void)momentum, (void)skip_flag;
    } else if constexpr (has_predictor) {
      const auto n = std::int64_t(teacher_elems_);
      update_(pol, view{teacher_.data(), {n}, "teacher parameters"}, cview{student_.data(), {n}, "student parameters"},
              momentum.value, skip_flag);
    } else if constexpr (update_flagged && update_reads_momentum) {
      update_(pol, teacher_, student_, momentum, skip_flag);
    } else if constexpr (update_flagged) {
      update_(pol, teacher_, student_, momentum.value, skip_flag);
    } else {
      update_(pol, teacher_, student_, momentum.value);
    }
  }
  void commit_loss(const Policy& pol, const int* skip_flag = nullptr) {
    if constexpr (loss_state) {
      if constexpr (requires { loss_.commit(pol, skip_flag); }) loss_.commit(pol, skip_flag);
      else if constexpr (requires { loss_.commit(pol); }) loss_.commit(pol);
      else loss_.commit();
    } else {
      (void)pol, (void)skip_flag;
    }
  }
  void discard_loss(const Policy& pol) {
    if constexpr (loss_state) {
      if constexpr (requires { loss_.discard(pol); }) loss_.discard(pol);
      else loss_.discard();
    } else {
      (void)pol;
    }
  }

  // Teacher inference into r_.t_feat and r_.t_logits (rows: n_global * b crops).
  void run_teacher(const Policy& pol, cview x)
    requires(!images)
  {
    const std::int64_t n = x.rows();
    require<shape_error>(n <= globals() * tc_.max_batch, "method: teacher input has ", n, " rows, more than planned (",
                         globals() * tc_.max_batch, ")");
    cview P = teacher_params();
    view f{r_.t_feat, {n, backbone_.out_dim()}, "teacher features"};
    backbone_.infer(pol, P, x, f, scratch());
    teacher_head(pol, n);
  }
  void run_teacher(const Policy& pol, const image_crops<T>& x)
    requires(images)
  {
    const std::int64_t n = teacher_pack_.crops;
    cview P = teacher_params();
    const T* sets[1] = {x.global};
    const view feat{r_.t_feat, {n, backbone_.out_dim()}, "teacher features"};
    if constexpr (has_mask) {  // with the last block's CLS attention (null: nothing is masked)
      typename Backbone::template infer_outputs<T> out{};
      out.cls_attention = r_.cls_attn;
      backbone_.infer(pol, P, teacher_pack_, std::span<const T* const>(sets, 1), feat, scratch(), out);
    } else {
      backbone_.infer(pol, P, teacher_pack_, std::span<const T* const>(sets, 1), feat, scratch());
    }
    teacher_head(pol, n);
  }
  // The student's kept patches of each global crop from the teacher's CLS attention.
  void select_patches(const Policy& pol) {
    if (!mask_patches_) return;
    const std::int64_t H = backbone_.config().heads, N = mask_patches_;
    std::int64_t* keep = nullptr;  // the student pack's first set: its table in the policy's memory
    if constexpr (on_host) keep = student_pack_.keep[0].data();
    else keep = student_pack_.device.keep[0];
    mask_.select(pol, cview{r_.cls_attn, {teacher_pack_.crops, H * (1 + N)}, "teacher CLS attention"}, H, N, keep);
  }
  void teacher_head(const Policy& pol, std::int64_t n) {
    cview P = teacher_params();
    head_.infer(pol, P, cview{r_.t_feat, {n, backbone_.out_dim()}, "teacher features"},
                view{r_.t_logits, {n, head_.out_dim()}, "teacher logits"}, scratch());
  }

  // Images per micro-batch, checked against the plan.
  std::int64_t batch_of(const input_type& x) const {
    if constexpr (images) {
      require<shape_error>(x.global != nullptr && (crops() == globals() || x.local != nullptr),
                           "method::step: the micro-batch lacks its ", x.global ? "local" : "global", " crops");
      return tc_.max_batch;  // packs are planned for max_batch images
    } else {
      const std::int64_t ns = x.rows();
      require<shape_error>(ns % crops() == 0, "method::step: crops has ", ns,
                           " rows, not a multiple of the crop count ", crops());
      require<shape_error>(ns <= max_rows_, "method::step: crops has ", ns, " rows, more than planned (", max_rows_,
                           " = ", crops(), " crops x max_batch ", tc_.max_batch, ")");
      check_matrix("method::step", x, backbone_.in_dim());
      return ns / crops();
    }
  }

  // Host rows as a view in the policy's space (rows that the caller keeps on the host).
  static cview as_space(host_view<const T> x) {
    if constexpr (on_host) return x;
    else return cview{x.data, x.shape, x.name};  // already staged: x.data points to device memory
  }
  // The host input in the policy's memory: on the CPU the input itself; on the GPU a copy
  // into the planned input region, on the stream. Rows: the first `rows` rows of x.
  input_type stage(const Policy& pol, const input_type& x, std::int64_t rows) {
    if constexpr (on_host) {
      return x;
    } else if constexpr (images) {
      const std::size_t ng = global_input_elems(), nl = r_.input_n - ng;
      upload(pol, r_.input, x.global, ng);
      if (nl) upload(pol, r_.input + ng, x.local, nl);
      return staged(rows);
    } else {
      upload(pol, r_.input, x.data, std::size_t(rows * backbone_.in_dim()));
      return staged(rows);
    }
  }
  // The planned input region as stage() leaves it (GPU): the input of a step graph, which
  // is uploaded before each replay (its host address changes) and read where it lies.
  input_type staged(std::int64_t rows) const {
    if constexpr (images) {
      const std::size_t ng = global_input_elems();
      return image_crops<T>{r_.input, r_.input_n > ng ? r_.input + ng : nullptr};
    } else {
      return host_view<const T>{r_.input, {rows, backbone_.in_dim()}, "input (device)"};
    }
  }
  std::size_t global_input_elems() const {
    const auto& cp = tc_.crops;
    const std::int64_t C = backbone_.config().in_chans;
    return std::size_t(globals() * tc_.max_batch * C * cp.global_size * cp.global_size);
  }
  cview stage_rows(const Policy& pol, host_view<const T> x, std::int64_t rows)
    requires(!images)
  {
    require<shape_error>(rows <= max_rows_, "method: input has ", rows, " rows, more than planned (", max_rows_, ")");
    return as_space(stage(pol, x, rows));
  }

  // One micro-batch: returns the loss and sets ent to the mean teacher entropy; on the GPU,
  // with parts that have the in-place forms, both go to slot R instead (+= scale * value
  // when accumulate, = otherwise) and the function returns 0 and sets ent to 0.
  // tau and micro_index (the DropPath step) are read on the device when a step graph sets
  // their `at`; upload = false: the input was staged before (a step graph's capture).
  double micro_step(const Policy& pol, const input_type& x, step_value<double> tau, double scale, bool freeze,
                    double& ent, step_value<std::uint64_t> micro_index, step_slot* R = nullptr,
                    bool accumulate = false, bool upload = true) {
    const std::int64_t b = batch_of(x), ns = crops() * b, nt = globals() * b;
    const std::int64_t D = backbone_.out_dim(), K = head_.out_dim();
    input_type dx = x;  // the input in the policy's memory (on the CPU: x itself)
    if constexpr (!on_host) dx = upload ? stage(pol, x, ns) : staged(ns);
    // Teacher on the global crops (unless the loss ignores it).
    if constexpr (with_teacher) {
      if constexpr (images) run_teacher(pol, dx);
      else run_teacher(pol, as_space(dx).slice_rows(0, nt));
      if constexpr (has_mask) select_patches(pol);
    }
    cview t{r_.t_logits, {nt, K}, "teacher logits"};
    // Student on all crops.
    cview P{student_.data(), {std::int64_t(student_.size())}, "student parameters"};
    view G{grads_.data(), {std::int64_t(grads_.size())}, "student gradients"};
    view sb{r_.saved, {std::int64_t(bsaved_)}, "backbone saved"};
    view sh{r_.saved + bsaved_, {std::int64_t(head_.saved_elems(ns))}, "head saved"};
    view feat{r_.s_feat, {ns, D}, "student features"};
    view logits{r_.s_logits, {ns, K}, "student logits"};
    if constexpr (images) {
      const T* sets[2] = {dx.global, dx.local};
      const std::span<const T* const> in(sets, student_pack_.sets.size());
      if constexpr (backbone_reads_step) backbone_.forward(pol, P, student_pack_, in, feat, sb, tc_.seed, micro_index);
      else backbone_.forward(pol, P, student_pack_, in, feat, sb, tc_.seed, micro_index.value);
    } else {
      backbone_.forward(pol, P, as_space(dx), feat, sb);
    }
    head_.forward(pol, P, cview(feat), logits, sh);
    // The predictor (student only): the loss then sees its output.
    view pred_saved{r_.saved + bsaved_ + head_.saved_elems(ns), {std::int64_t(r_.pred_saved_n)}, "predictor saved"};
    view out = logits;
    if constexpr (has_predictor) {
      out = view{r_.p_out, {ns, K}, "predictor output"};
      predictor_.forward(pol, P, cview(logits), out, pred_saved);
    }
    // Targets and loss.
    view q{r_.q, {nt, K}, "teacher targets"};
    if constexpr (!with_teacher) {
      ent = 0;  // no teacher: no targets (the loss does not read q)
    } else if constexpr (!on_host && target_in_place) {
      const scalar_out out{&R->teacher_entropy, scale, accumulate};
      if constexpr (target_reads_tau) target_.targets(pol, t, tau, q, view{r_.ent, {nt}, "teacher entropy"}, out);
      else target_.targets(pol, t, tau.value, q, view{r_.ent, {nt}, "teacher entropy"}, out);
      ent = 0;
    } else {
      ent = target_.targets(pol, t, tau.value, q, view{r_.ent, {nt}, "teacher entropy"});
    }
    view ds{r_.ds, {ns, K}, "d student logits"};
    double l = 0;
    if constexpr (!on_host && loss_in_place)
      loss_.forward_backward(pol, cview(out), cview(q), view{r_.row, {ns}, "row loss"}, ds, scale, false,
                             scalar_out{&R->loss, scale, accumulate});
    else
      l = loss_.forward_backward(pol, cview(out), cview(q), view{r_.row, {ns}, "row loss"}, ds, scale, false);
    if constexpr (has_predictor) {  // d head output through the predictor (its gradients accumulate)
      view dl{r_.d_logits, {ns, K}, "d student head logits"};
      predictor_.backward(pol, P, cview(logits), cview(pred_saved), cview(ds), dl, grad_mode::write, G, scratch());
      ds = dl;
    }
    // Backward (parameter gradients accumulate across micro-batches).
    view dfeat{r_.d_feat, {ns, D}, "d student features"};
    if constexpr (requires { head_.backward(pol, P, cview(feat), cview(sh), cview(ds), dfeat, grad_mode::write, G, scratch(), freeze); })
      head_.backward(pol, P, cview(feat), cview(sh), cview(ds), dfeat,
                     grad_mode::write, G, scratch(), freeze);
    else
      head_.backward(pol, P, cview(feat), cview(sh), cview(ds), dfeat,
                     grad_mode::write, G, scratch());
    if constexpr (images) {
      backbone_.scatter_cls_grad(pol, student_pack_, r_.d_feat, r_.dtok);
      backbone_.backward(pol, P, student_pack_, cview(sb),
                         cview{r_.dtok, {student_pack_.tokens, D}, "d tokens"}, G, scratch());
    } else {
      backbone_.backward(pol, P, as_space(dx), cview(sb), cview(dfeat), view{}, grad_mode::skip,
                         G, scratch());
    }
    if constexpr (with_teacher) {
      target_.observe(pol, t);
      if constexpr (loss_state) loss_.observe(pol, t);
    }
    return l;
  }

  step_stats skip(const Policy& pol, step_stats st, const char* why) {
    discard_target(pol);
    fill_zero(pol, grads_.data(), grads_.size());
    st.skipped = true;
    st.skip_reason = why;
    ++iteration_;
    return st;
  }
  // A step's pending target (and stateful loss) state dropped: the twin of commit_target.
  void discard_target(const Policy& pol) {
    if constexpr (requires { target_.discard(pol); }) target_.discard(pol);
    else target_.discard();
    discard_loss(pol);
  }
  void commit_target(const Policy& pol) {
    if constexpr (requires { target_.commit(pol); }) target_.commit(pol);
    else target_.commit();
    commit_loss(pol);
  }

  // The GPU step (see the file comment): everything is queued on pol.stream, and the host
  // waits only for a part that lacks a device form.
  step_stats device_step(const Policy& pol, std::span<const input_type> micro, step_stats st, double scale,
                         bool freeze) {
    if constexpr (graph_capable) {
      if (graphs_.on) {
        graphs_.refusal = graph_refusal(pol, micro, freeze);
        if (!*graphs_.refusal) {
          if (graph_step(pol, micro[0], st, freeze)) return st;
          graphs_.refusal = capture_failed;
        }
      }
    }
    const std::size_t slot = std::size_t(ticket_ % step_result_slots);
    step_slot* R = r_.slots + slot;
    slot_host& H = slots_host_[slot];
    H = slot_host{};
    fill_zero(pol, R, 1);
    fill_zero(pol, grads_.data(), grads_.size());
    for (std::size_t mi = 0; mi < micro.size(); ++mi) {
      double ent = 0, l = 0;
      try {
        l = micro_step(pol, micro[mi], st.teacher_temp, scale, freeze, ent,
                       std::uint64_t(iteration_) * micro.size() + mi, R, mi > 0);
      } catch (const numeric_error&) {  // a Loss that returns the loss found it not finite
        return skip(pol, st, "non-finite loss");
      }
      if (!loss_in_place && !std::isfinite(l)) return skip(pol, st, "non-finite loss");
      H.loss += scale * l;
      H.teacher_entropy += scale * ent;
    }
    flag_skip(pol, R);
    if constexpr (!(update_flagged && commit_flagged && loss_commit_flagged)) {
      // A part that cannot read the flag on the device: the host decides (one wait).
      step_slot h;
      read_to_host(pol, &h, static_cast<const step_slot*>(R), 1, "method::step (a part without a skip-flag form)");
      if (h.skip) {
        fill_stats(st, h, H);
        discard_target(pol);
        ++iteration_;
        return st;
      }
    }
    flagged_updates(pol, R, st.lr, st.weight_decay, st.momentum, freeze);
    readback_.queue(pol, slot, R);  // the slot to its host mirror once the step has run (no wait)
    if constexpr (graph_capable) {  // what a capture may follow: a plain step of its policy and freeze
      graphs_.plain_seen = true;
      graphs_.plain_pol = pol;
      graphs_.plain_freeze = freeze;
    }
    return queued(st, H);
  }

  // The skip flag of slot R: a non-finite loss (checked here when it stayed on the device) or gradient.
  void flag_skip(const Policy& pol, step_slot* R) {
    if constexpr (loss_in_place) {
      flag_non_finite(pol, static_cast<const double*>(&R->loss), 1, &R->loss_non_finite);
      flag_non_finite(pol, static_cast<const double*>(&R->loss), 1, &R->skip);
    }
    flag_non_finite(pol, static_cast<const T*>(grads_.data()), static_cast<std::int64_t>(grads_.size()), &R->skip);
  }
  // After the micro-batches (GPU): clipping, AdamW, the teacher update and the target's
  // commit, each reading slot R's skip flag in its kernels.
  void flagged_updates(const Policy& pol, step_slot* R, step_value<double> lr, step_value<double> wd,
                       step_value<double> momentum, bool freeze) {
    const int* skip_flag = &R->skip;
    const unsigned skip_tensors = freeze ? unsigned(param_last_layer) : unsigned(param_none);
    if (tc_.clip_grad > 0) optim::clip_gradients(pol, grads_, tc_.clip_grad, param_none, &R->clipped);
    opt_.step(pol, student_, grads_, lr, wd, skip_tensors, skip_flag);
    update_teacher(pol, momentum, skip_flag);
    if constexpr (commit_flagged) {
      target_.commit(pol, skip_flag);
      commit_loss(pol, skip_flag);
    } else {
      commit_target(pol);
    }
  }
  // A queued GPU step's stats and host bookkeeping (slot H's ticket, the counters).
  step_stats queued(step_stats st, slot_host& H) {
    H.ticket = ticket_;
    st.ticket = ticket_++;
    st.pending = true;
    // Not known yet: NaN, so that a caller who forgets read_stats sees no plausible value.
    st.loss = st.teacher_entropy = st.kl = st.ln_k = std::numeric_limits<double>::quiet_NaN();
    st.clipped_tensors = -1;
    ++iteration_;
    return st;
  }

  static constexpr const char* capture_failed = "the capture failed (see step_graph_error())";
  // Whether the graph held was captured for this policy and freeze (a step replays it as it is).
  bool graph_fits(const Policy& pol, bool freeze) const {
    return graphs_.graph.ready() && graphs_.pol == pol && graphs_.freeze == freeze;
  }
  // Why this step cannot replay a graph ("" when it can).
  const char* graph_refusal(const Policy& pol, std::span<const input_type> micro, bool freeze) const {
    if (micro.size() != 1) return "several micro-batches (a graph holds one)";
    if constexpr (!images) {
      if (micro[0].rows() != max_rows_) return "a micro-batch of fewer images than planned (max_batch)";
    }
    if (profiling(pol)) return "an op_profile is active (it times each operation)";
    if (!graphs_.error.empty()) return capture_failed;
    if (graph_fits(pol, freeze)) return "";  // a replay
    // A capture follows a plain step of the same policy and freeze: buffers that grow on first
    // use (the bf16 stage) have their size then, and a capture must not allocate.
    if (!(graphs_.plain_seen && graphs_.plain_pol == pol && graphs_.plain_freeze == freeze))
      return "the first step of a policy and freeze of the last layer runs plain (buffers that grow on first use take "
             "their size)";
    return "";
  }

  // A step replayed from the CUDA graph (captured first when there is none for this policy
  // and freeze). Returns false, with nothing changed, when the capture failed: the step then
  // runs plain and graphs stay off (step_graph_error() says why).
  bool graph_step(const Policy& pol, const input_type& x, step_stats& st, bool freeze) {
    if constexpr (graph_capable) {
      const std::size_t slot = std::size_t(ticket_ % step_result_slots);
      step_slot* G = r_.slots + step_result_slots;  // the graph's own slot, read back into the step's mirror
      // What changes each step, where the graph reads it; the input where the graph reads it.
      put_value(pol, r_.scalars,
                step_scalars{st.lr, st.weight_decay, st.momentum, st.teacher_temp, std::uint64_t(iteration_)});
      (void)stage(pol, x, max_rows_);
      opt_.sync_steps(pol);  // step counts written through steps() since the capture
      if (!graph_fits(pol, freeze)) {
        try {
          const Policy cap = graphs_.graph.begin(pol);
          capture_body(cap, x, freeze);
          graphs_.graph.end();
        } catch (const std::exception& e) {
          graphs_.graph.abort();
          graphs_.error = e.what();
          // The host's side of the captured step is undone (nothing ran on the device).
          discard_target(pol);
          (void)opt_.steps();  // the device's step counts are the truth (the next step uploads them)
          return false;
        }
        graphs_.pol = pol;
        graphs_.freeze = freeze;
        graphs_.captures += 1;
      }
      graphs_.graph.launch(pol);
      readback_.queue(pol, slot, G);
      graphs_.replays += 1;
      slot_host& H = slots_host_[slot];
      H = slot_host{};
      st = queued(st, H);
      return true;
    } else {
      (void)pol, (void)x, (void)st, (void)freeze;
      return false;
    }
  }
  // What a step graph holds: one micro-batch into the graph's slot, every per-step value read
  // from r_.scalars, then the flagged updates.
  void capture_body(const Policy& cap, const input_type& x, bool freeze) {
    step_slot* G = r_.slots + step_result_slots;
    const step_scalars* S = r_.scalars;
    fill_zero(cap, G, 1);
    fill_zero(cap, grads_.data(), grads_.size());
    double ent = 0;
    (void)micro_step(cap, x, step_value<double>::read_at(&S->teacher_temp), 1.0, freeze, ent,
                     step_value<std::uint64_t>::read_at(&S->micro_index), G, false, false);
    flag_skip(cap, G);
    flagged_updates(cap, G, step_value<double>::read_at(&S->lr), step_value<double>::read_at(&S->wd),
                    step_value<double>::read_at(&S->momentum), freeze);
  }

  // The device-dependent fields of st from its slot h and the host's part of it.
  void fill_stats(step_stats& st, const step_slot& h, const slot_host& H) const {
    st.skipped = h.skip != 0;
    st.clipped_tensors = 0;
    st.kl = 0;
    st.ln_k = 0;
    st.collapsed = false;
    if (st.skipped) {
      st.skip_reason = h.loss_non_finite ? "non-finite loss" : "non-finite gradient";
      st.loss = h.loss_non_finite ? 0.0 : h.loss + H.loss;
      st.teacher_entropy = h.loss_non_finite ? 0.0 : h.teacher_entropy + H.teacher_entropy;
      return;
    }
    st.skip_reason = "";
    st.loss = h.loss + H.loss;  // one of the two is 0 (the part's form decides which)
    st.teacher_entropy = h.teacher_entropy + H.teacher_entropy;
    const auto d = diagnose(st.loss, st.teacher_entropy, head_.out_dim());
    st.kl = d.kl;
    st.ln_k = d.ln_k;
    st.collapsed = d.collapsed;
    st.clipped_tensors = h.clipped;
  }

  train_config tc_;
  param_layout layout_;
  Backbone backbone_;
  Head head_;
  std::size_t teacher_elems_ = 0;  // parameters before the predictor's (the layout's size after the head)
  [[no_unique_address]] Predictor predictor_;
  Target target_;
  Loss loss_;
  TeacherUpdate update_;
  [[no_unique_address]] StudentMask mask_;
  std::int64_t mask_patches_ = 0;  // N of a global crop when the student's view is masked, else 0
  dino_schedules sched_;
  flat_params<T, space> student_, teacher_, grads_;
  optim::adamw<T, space> opt_;
  struct regions {
    T *saved = nullptr, *scratch = nullptr, *s_feat = nullptr, *d_feat = nullptr, *s_logits = nullptr, *ds = nullptr;
    T *t_feat = nullptr, *t_logits = nullptr, *q = nullptr, *row = nullptr, *ent = nullptr;
    T* dtok = nullptr;
    T* input = nullptr;  // device copy of the host input (GPU only)
    step_slot* slots = nullptr;  // the steps' results, a ring of step_result_slots, then a step graph's (GPU only)
    step_scalars* scalars = nullptr;  // the per-step values a step graph reads (GPU only)
    T *p_out = nullptr, *d_logits = nullptr;  // the predictor's output, d head output (with a predictor)
    T* cls_attn = nullptr;  // the teacher's last-block CLS attention (with a StudentMask that masks)
    std::size_t saved_n = 0, scratch_n = 0, dtok_n = 0, input_n = 0, pred_saved_n = 0, cls_attn_n = 0;
  };
  std::size_t bsaved_ = 0;
  struct no_pack {};
  [[no_unique_address]] std::conditional_t<images, nn::vit_pack<T>, no_pack> student_pack_{}, teacher_pack_{};
  typename workspace_for<space>::type ws_;
  regions r_;
  std::int64_t max_rows_ = 0;
  std::int64_t iteration_ = 0;
  bool stepped_ = false;  // a step was taken (plan_for refuses from then on)
  std::uint64_t ticket_ = 0;                           // GPU steps so far (the slot ring's position)
  std::array<slot_host, step_result_slots> slots_host_{};  // GPU only
  typename readback_ring_for<space>::type readback_{};      // GPU: the slots' host mirrors and events
  // GPU step graphs (use_step_graphs): the graph, what it was captured for, and counts.
  struct graph_state {
    bool on = false, freeze = false;  // freeze (and pol): what the graph was captured for
    const char* refusal = "";
    std::string error;
    typename stream_graph_for<space>::type graph{};
    Policy pol{};
    bool plain_seen = false, plain_freeze = false;  // the latest plain step's freeze and policy
    Policy plain_pol{};
    std::uint64_t captures = 0, replays = 0;
  };
  graph_state graphs_;
};

}  // namespace dino::ssl
