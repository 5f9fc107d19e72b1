// dino-train: DINO self-supervised training of a ViT on the CPU, from image files.
//
//   dino-train --data fashion-mnist --output runs/fm [--epochs 100 --batch-size 64 ...]
//
// Every flag, its default (the reference's where it has one) and meaning: dino-train --help,
// and docs/tools.md. The run writes <output>/log.jsonl (one JSON line per step),
// <output>/checkpoint.safetensors (+ .json) every --save-every steps and at the end, and
// <output>/run.json (the configuration and a summary). --resume continues bit-identically from
// <output>/checkpoint.safetensors. SIGINT (Ctrl-C) or SIGTERM stops the run before its next
// step with the state saved (a second one ends it at once). Exit codes: 0 done (or stopped by
// --time-limit), 1 a bad file or value, 2 bad usage, 128 + the signal's number when a signal
// stopped it (130 for Ctrl-C, 143 for SIGTERM).
#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <dino/data/cifar.hpp>
#include <dino/data/idx.hpp>
#include <dino/data/image_folder.hpp>
#include <dino/data/loader.hpp>
#include <dino/data/multicrop.hpp>
#include <dino/dino.hpp>
#if defined(DINO_WITH_CUDA)
#include <dino/cuda.hpp>
#endif
#include <dino/train/checkpoint.hpp>
#include <dino/train/trainer.hpp>

#include "cli.hpp"
#include "presets.hpp"

namespace {

// SIGINT / SIGTERM: the trainer stops before its next step and saves the state; a second
// signal ends the process at once (the default action, restored by the first).
std::atomic<bool> g_stop{false};
volatile std::sig_atomic_t g_signal = 0;
extern "C" void on_stop_signal(int sig) {
  g_signal = sig;
  g_stop.store(true, std::memory_order_relaxed);
  std::signal(sig, SIG_DFL);
}

dino_cli::flags make_flags() {
  dino_cli::flags f("dino-train", "--data KIND [--data-path PATH] --output DIR [options]");
  f.add("data", "fashion-mnist", "data set kind: fashion-mnist, mnist (IDX files), cifar10, cifar100, folder (one sub-folder per class)")
      .add("data-path", "", "folder of the data set files [default for fashion-mnist: /usr/share/datasets/fashion-mnist]")
      .add("method", "dino", "the method (ssl/presets.hpp): dino, dino_no_momentum, dino_sinkhorn, dino_two_crops, "
           "dino_mse, dino_predictor, byol, mocov2, swav_like, simclr, dino_attention_mask (each on --device cpu or "
           "cuda)")
      .add("predictor-hidden", "4096", "with --method dino_predictor or byol: the predictor's hidden size")
      .add("mask-ratio", "0.3", "with --method dino_attention_mask: the fraction of each global crop's patches, those "
           "the teacher's CLS attention ranks lowest, that the student does not see; in [0, 1)")
      .add("output", "dino-run", "output folder: log.jsonl, checkpoint.safetensors, run.json")
      .add("resume", "false", "continue from <output>/checkpoint.safetensors")
      .add("arch", "", "vit_tiny, vit_small, vit_base (224 px), vit_small28, vit_tiny28 (28 px, 1 channel) [default: vit_small28 for 28-px data, else vit_small]")
      .add("patch", "0", "patch size (0: the preset's: 16, or 4 for the 28-px presets)")
      .add("drop-path", "0.1", "stochastic depth rate of the student's last block")
      .add("checkpoint-blocks", "0",
           "activation checkpointing: the student's first N blocks are recomputed in the backward instead of keeping "
           "their activations (0: none; the ViT's depth: all); the same results, less memory, one more forward of them")
      .add("recompute-pointwise", "false",
           "the student's LayerNorm and GELU outputs are recomputed in the backward instead of kept (a third of a "
           "block's activations); the same results, less memory, one more LayerNorm pair and GELU per block")
      .add("out-dim", "65536", "K, the head's output dimension (the preset's when not given: 256 byol, 128 mocov2 and simclr, 3000 swav_like)")
      .add("head-hidden", "2048", "the DINO head's hidden size")
      .add("head-bottleneck", "256", "the DINO head's bottleneck size")
      .add("norm-last-layer", "true", "keep the head's weight-norm g fixed at 1")
      .add("freeze-last-layer", "1", "epochs during which the head's last layer is not updated")
      .add("global-size", "0", "global crop size (0: 224, or 28 for 28-px data)")
      .add("local-size", "0", "local crop size (0: 96, or 12 for 28-px data)")
      .add("local-crops", "-1", "number of local crops (-1: 8, or 6 for 28-px data)")
      .add("global-scale", "0.4,1.0", "RandomResizedCrop scale range of the global crops")
      .add("local-scale", "0.05,0.4", "RandomResizedCrop scale range of the local crops")
      .add("epochs", "100", "training epochs")
      .add("batch-size", "64", "images per loader batch: per step, or per micro-batch with --accumulate")
      .add("accumulate", "1", "loader batches (micro-batches) per optimizer step: the step sees batch-size x N images "
           "(the lr scales with it), an epoch has floor(floor(images / batch-size) / N) steps")
      .add("lr", "5e-4", "learning rate for batch 256 (scaled by batch-size x accumulate / 256), reached after the warm-up")
      .add("min-lr", "1e-6", "final learning rate of the cosine schedule")
      .add("warmup-epochs", "10", "linear learning-rate warm-up")
      .add("weight-decay", "0.04", "initial weight decay")
      .add("weight-decay-end", "0.4", "final weight decay (cosine)")
      .add("momentum-teacher", "0.996", "initial teacher EMA momentum (cosine to 1)")
      .add("teacher-temp", "0.04", "teacher temperature after the warm-up")
      .add("warmup-teacher-temp", "0.04", "initial teacher temperature")
      .add("warmup-teacher-temp-epochs", "0", "epochs of the teacher-temperature warm-up")
      .add("student-temp", "0.1", "student temperature")
      .add("center-momentum", "0.9", "center EMA momentum")
      .add("clip-grad", "3.0", "per-tensor gradient clipping threshold (0: off)")
      .add("seed", "0", "seed of initialisation, data order, augmentation and DropPath")
      .add("threads", "2", "compute threads")
      .add("device", "cpu", "where the model trains: cpu, or cuda in a build with DINO_ENABLE_CUDA")
      .add("tf32", "false", "with --device cuda: fp32 GEMMs on TF32 tensor cores (default exact fp32)")
      .add("bf16", "false",
           "GEMM operands rounded to bf16, summed in fp32 (mixed precision; on the GPU: bf16 tensor cores for the GEMMs and the attention)")
      .add("bf16-operands", "false",
           "with --bf16: the ViT's qkv, fc1 and fc2 products read bf16 operands that their producers (LayerNorm, GELU, a "
           "weight copy) round as they store: the same values; on the GPU half the bytes (the teacher and inference "
           "always, the student with --recompute-pointwise)")
      .add("bf16-staged", "false",
           "with --bf16: on the GPU every product on fp32 operands first rounds them to bf16 (to nearest even) by a pass "
           "of its own, then runs on bf16 in memory (the fastest training mode measured, docs/benchmarks.md); the CPU's "
           "bf16 products already round this way, so on the CPU it changes nothing")
      .add("cuda-graphs", "false",
           "with --device cuda: each step (one micro-batch of --batch-size) replays a CUDA graph of it, one launch "
           "instead of hundreds: the same numbers; for the presets whose parts read their per-step values on the device "
           "(dino, dino_no_momentum, dino_two_crops); others are refused")
      .add("loader-threads", "1", "data loading threads")
      .add("prefetch", "2", "batches loaded ahead")
      .add("save-every", "0", "steps between checkpoints (0: at the end only)")
      .add("time-limit", "0", "stop after this many minutes (0: none); the state is saved and --resume continues")
      .add("log-every", "20", "steps between progress lines when not on a terminal");
  return f;
}

std::vector<double> pair_of(const std::string& flag, const std::string& s) {
  const std::vector<double> v = dino_cli::number_list(flag, s);
  if (v.size() != 2 || !(v[0] > 0) || !(v[1] >= v[0]) || v[1] > 1)
    throw dino_cli::usage_error("--" + flag + " must be two numbers lo,hi with 0 < lo <= hi <= 1, got '" + s + "'");
  return v;
}

// The run itself, on one policy (the CPU, or a GPU with --device cuda).
// The GEMM precision of a policy, for run.json and the start-up line.
inline const char* precision_name(const dino::cpu_policy& p) { return p.bf16 ? "bf16" : "fp32"; }
#if defined(DINO_WITH_CUDA)
inline const char* precision_name(const dino::cuda_policy& p) { return p.bf16 ? "bf16" : p.tf32 ? "tf32" : "fp32"; }
#endif

template <class Policy, class Dataset, class Make>
int train_on(const Policy& pol, const dino_cli::flags& f, const Dataset& ds, const dino::nn::vit_config& vc,
             const dino::data::multicrop_config& mc, dino::ssl::dino_config c, std::uint64_t seed, std::int64_t B,
             std::int64_t N, Make make) {
  const auto& s = c.train.schedule;
  auto model = make();
  model.plan_for(pol);  // the step's buffers for this policy (the bf16 attention keeps rows, not P)
  if (f.boolean("cuda-graphs")) {
    if constexpr (decltype(model)::step_graphs_supported)
      model.use_step_graphs(true);
    else
      throw dino_cli::usage_error("--cuda-graphs: --method " + f.str("method") +
                                  " has a part that decides on the host or takes its per-step values by value only "
                                  "(step graphs need DINO's centering, distillation loss and EMA teacher)");
  }
  const std::string out = f.str("output"), ckpt = out + "/checkpoint.safetensors";
  std::uint64_t run_seed = seed;
  if (f.boolean("resume")) {
    if (!std::filesystem::exists(ckpt)) throw dino::io_error("dino-train: --resume: no checkpoint at " + ckpt);
    const auto info = dino::train::restore_checkpoint(ckpt, model);
    if (info.seed != seed)
      throw dino::config_error("dino-train: --resume: the checkpoint was trained with --seed " + std::to_string(info.seed) +
                               "; give the same seed (and the same options) to continue it");
    std::fprintf(stderr, "dino-train: resuming %s at step %lld\n", ckpt.c_str(), (long long)info.iteration);
  }
  const auto [e0, b0] = dino::train::resume_position(model.iteration(), ds.size() / B, N);
  dino::data::loader_config lc;
  lc.batch_size = B;
  lc.threads = int(f.integer("loader-threads", 1));
  lc.prefetch = int(f.integer("prefetch"));
  lc.seed = seed;
  lc.start_epoch = e0;
  lc.start_batch = b0;
  dino::data::multicrop_loader<Dataset> loader(ds, mc, lc);

  std::fprintf(stderr,
               "dino-train: %lld images, ViT D %lld depth %lld heads %lld patch %lld, %zu parameters; K %lld; crops 2 x %d + "
               "%d x %d; batch %lld (%lld x --accumulate %lld); %lld epochs x %lld steps; GEMMs %s\n",
               (long long)ds.size(), (long long)vc.embed_dim, (long long)vc.depth, (long long)vc.heads, (long long)vc.patch,
               model.layout().numel(), (long long)c.head.out_dim, mc.global_size, mc.n_local, mc.local_size, (long long)(B * N),
               (long long)B, (long long)N,
               (long long)s.epochs, (long long)s.iters_per_epoch, precision_name(pol));
  {
    const auto mem = model.memory();
    const auto mib = [](std::size_t b) { return double(b) / double(1 << 20); };
    std::fprintf(stderr,
                 "dino-train: %s memory %.1f MiB, planned before the first step: parameters %.1f (student, teacher, "
                 "gradients), optimizer %.1f, step workspace %.1f (activations kept for the backward %.1f, scratch "
                 "%.1f)\n",
                 dino::policy_traits<Policy>::is_host ? "host" : "device", mib(mem.total()), mib(mem.parameters),
                 mib(mem.optimizer), mib(mem.workspace), mib(mem.activations), mib(mem.scratch));
  }
  // run.json: the architecture and configuration, written before the first step (so that
  // dino-eval --run reads the checkpoints of a run still going) and again with the summary at
  // the end; each time atomically (io/atomic_file.hpp).
  std::filesystem::create_directories(out);
  const auto write_run_json = [&](const dino::train::run_summary* sum) {
    std::ostringstream js;
    js << "{\"arch\": {\"embed_dim\": " << vc.embed_dim << ", \"depth\": " << vc.depth << ", \"heads\": " << vc.heads
       << ", \"patch\": " << vc.patch << ", \"img_size\": " << vc.img_size << ", \"in_chans\": " << vc.in_chans
       << "}, \"method\": \"" << f.str("method") << "\", \"out_dim\": " << c.head.out_dim << ", \"batch_size\": " << B
       << ", \"accumulate\": " << N << ", \"epochs\": " << s.epochs << ", \"steps_per_epoch\": " << s.iters_per_epoch
       << ", \"seed\": " << seed << ", \"precision\": \"" << precision_name(pol) << "\"";
    if (sum) {
      const double step_s = sum->steps ? sum->wall_s / double(sum->steps) : 0;
      js << ", \"steps_run\": " << sum->steps << ", \"next_step\": " << model.iteration() << ", \"wall_s\": "
         << sum->wall_s << ", \"images_per_s\": " << sum->images_per_s << ", \"step_s\": " << step_s
         << ", \"loader_wait_fraction\": " << (sum->wall_s > 0 ? sum->loader_wait_s / sum->wall_s : 0.0)
         << ", \"finished\": " << (sum->finished ? "true" : "false");
    } else {
      js << ", \"running\": true";
    }
    js << "}\n";
    dino::io::write_file_atomic(out + "/run.json", std::string_view(js.str()));
  };
  write_run_json(nullptr);
  dino::train::run_config rc;
  rc.out_dir = out;
  rc.save_every = f.integer("save-every");
  rc.time_limit_s = f.num("time-limit") * 60.0;
  rc.log_every = f.integer("log-every");
  rc.seed = run_seed;
  rc.accumulate = N;
  rc.stop = &g_stop;
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  const auto sum = dino::train::run(pol, model, loader, rc);
  std::fprintf(stderr,
               "dino-train: %lld steps in %.1f s (%.1f images/s, %lld skipped); the loader kept the model waiting "
               "%.1f %% of the time; %s; checkpoint %s\n",
               (long long)sum.steps, sum.wall_s, sum.images_per_s, (long long)sum.skipped,
               sum.wall_s > 0 ? 100.0 * sum.loader_wait_s / sum.wall_s : 0.0,
               sum.finished  ? "schedule finished"
               : sum.stopped ? "stopped by a signal before the end of the schedule (--resume continues)"
                             : "stopped before the end of the schedule (--resume continues)",
               sum.checkpoint.c_str());
  if (model.step_graphs()) {
    const auto gc = model.graph_counts();
    std::fprintf(stderr, "dino-train: CUDA step graphs: %llu captured (%zu nodes), %llu steps replayed%s%s\n",
                 (unsigned long long)gc.captures, gc.nodes, (unsigned long long)gc.replays,
                 *model.step_graph_refusal() ? "; the last step ran plain: " : "", model.step_graph_refusal());
    if (!model.step_graph_error().empty())
      std::fprintf(stderr, "dino-train: the graph capture failed, steps ran plain: %s\n", model.step_graph_error().c_str());
  }
  write_run_json(&sum);
  if (sum.stopped) return 128 + int(g_signal);  // the shell's code for a process ended by that signal
  return 0;
}

// Every preset runs on the CPU and, in a CUDA build, on the GPU (train/checkpoint.hpp saves
// a center or a queue where the method has one, from host or device memory).
void check_method(const std::string& m) {
  bool known = false;
  for (auto n : dino::ssl::preset_names) known = known || n == m;
  if (!known) {
    std::string names;
    for (auto n : dino::ssl::preset_names) names += (names.empty() ? "" : ", ") + std::string(n);
    throw dino_cli::usage_error("unknown --method '" + m + "' (presets: " + names + ")");
  }
}

// The method named by --method on the policy (cpu_policy, or cuda_policy with --device cuda).
template <class Policy, class Dataset>
int train_method(const Policy& pol, const dino_cli::flags& f, const Dataset& ds, const dino::nn::vit_config& vc,
                 const dino::data::multicrop_config& mc, const dino::ssl::dino_config& c, std::uint64_t seed,
                 std::int64_t B, std::int64_t N) {
  using dino::nn::vit;
  namespace ssl = dino::ssl;
  using P = Policy;
  const std::string m = f.str("method");
  if (m == "dino_no_momentum")
    return train_on(pol, f, ds, vc, mc, c, seed, B, N,
                    [&] { return ssl::make_dino_no_momentum<vit, float, P>(vc, vc.embed_dim, c); });
  if (m == "dino_two_crops")
    return train_on(pol, f, ds, vc, mc, c, seed, B, N,
                    [&] { return ssl::make_dino_two_crops<vit, float, P>(vc, vc.embed_dim, c); });
  if (m == "dino_predictor")
    return train_on(pol, f, ds, vc, mc, c, seed, B, N,
                    [&] { return ssl::make_dino_predictor<vit, float, P>(vc, vc.embed_dim, c); });
  if (m == "dino_sinkhorn")
    return train_on(pol, f, ds, vc, mc, c, seed, B, N,
                    [&] { return ssl::make_dino_sinkhorn<vit, float, P>(vc, vc.embed_dim, c); });
  if (m == "dino_mse")
    return train_on(pol, f, ds, vc, mc, c, seed, B, N, [&] { return ssl::make_dino_mse<vit, float, P>(vc, vc.embed_dim, c); });
  if (m == "byol")
    return train_on(pol, f, ds, vc, mc, c, seed, B, N, [&] { return ssl::make_byol<vit, float, P>(vc, vc.embed_dim, c); });
  if (m == "mocov2")
    return train_on(pol, f, ds, vc, mc, c, seed, B, N, [&] { return ssl::make_mocov2<vit, float, P>(vc, vc.embed_dim, c); });
  if (m == "swav_like")
    return train_on(pol, f, ds, vc, mc, c, seed, B, N,
                    [&] { return ssl::make_swav_like<vit, float, P>(vc, vc.embed_dim, c); });
  if (m == "simclr")
    return train_on(pol, f, ds, vc, mc, c, seed, B, N, [&] { return ssl::make_simclr<vit, float, P>(vc, vc.embed_dim, c); });
  if (m == "dino_attention_mask")
    return train_on(pol, f, ds, vc, mc, c, seed, B, N,
                    [&] { return ssl::make_dino_attention_mask<vit, float, P>(vc, vc.embed_dim, c); });
  return train_on(pol, f, ds, vc, mc, c, seed, B, N, [&] { return ssl::make_dino<vit, float, P>(vc, vc.embed_dim, c); });
}

template <class Dataset>
int train(const dino_cli::flags& f, const Dataset& ds) {
  const std::string method = f.str("method");
  check_method(method);
  const bool small = dino_tools::is_small_images(ds);
  dino::nn::vit_config vc = dino_tools::arch(f.str("arch").empty() ? (small ? "vit_small28" : "vit_small") : f.str("arch"),
                                             f.integer("patch"));
  vc.drop_path_rate = f.num("drop-path");
  vc.checkpoint_blocks = f.integer("checkpoint-blocks", 0);
  vc.recompute_pointwise = f.boolean("recompute-pointwise");
  if (vc.checkpoint_blocks > vc.depth)
    throw dino_cli::usage_error("--checkpoint-blocks " + std::to_string(vc.checkpoint_blocks) + " exceeds the ViT's depth " +
                                std::to_string(vc.depth));
  if (vc.in_chans != ds.channels())
    throw dino::config_error("dino-train: the data has " + std::to_string(ds.channels()) + " channels, --arch " +
                             f.str("arch") + " takes " + std::to_string(vc.in_chans));
  dino::data::multicrop_config mc = small ? dino::data::multicrop_28px() : dino::data::multicrop_imagenet();
  if (f.integer("global-size")) mc.global_size = int(f.integer("global-size", 1));
  if (f.integer("local-size")) mc.local_size = int(f.integer("local-size", 1));
  if (f.str("local-crops") != "-1") mc.n_local = int(f.integer("local-crops", 0));
  if (dino::ssl::two_crop_preset(method)) {
    if (f.str("local-crops") != "-1" && mc.n_local != 0)
      throw dino_cli::usage_error("--method " + method + " takes two crops: --local-crops must be 0 or left out");
    mc.n_local = 0;
  }
  const auto gs = pair_of("global-scale", f.str("global-scale")), ls = pair_of("local-scale", f.str("local-scale"));
  mc.global_scale_min = gs[0], mc.global_scale_max = gs[1], mc.local_scale_min = ls[0], mc.local_scale_max = ls[1];
  if (ds.channels() == 1 && mc.mean.size() != 1) mc.mean = {0.5f}, mc.std = {0.5f};

  const std::uint64_t seed = std::uint64_t(f.integer("seed"));
  const std::int64_t B = f.integer("batch-size", 1), N = f.integer("accumulate", 1);
  // The preset's own defaults (BYOL's, MoCo v2's, SimCLR's and SwAV's output sizes,
  // predictor width, teacher momentum and temperature), then the flags given.
  dino::ssl::dino_config c = dino::ssl::preset_defaults(method);
  const auto given_or = [&](const char* k, auto preset) {
    using V = decltype(preset);
    if (!f.has(k)) return preset;
    if constexpr (std::is_integral_v<V>) return V(f.integer(k, 1));
    else return V(f.num(k));
  };
  c.head.out_dim = given_or("out-dim", c.head.out_dim);
  c.head.hidden_dim = f.integer("head-hidden", 1);
  c.head.bottleneck_dim = f.integer("head-bottleneck", 1);
  c.head.norm_last_layer = f.boolean("norm-last-layer");
  c.local_crops = mc.n_local;
  c.student_temp = f.num("student-temp");
  c.center_momentum = f.num("center-momentum");
  c.predictor_hidden = given_or("predictor-hidden", c.predictor_hidden);
  if (f.has("mask-ratio") && method != "dino_attention_mask")
    throw dino_cli::usage_error("--mask-ratio applies to --method dino_attention_mask only");
  c.mask_ratio = given_or("mask-ratio", c.mask_ratio);
  if (!(c.mask_ratio >= 0 && c.mask_ratio < 1))
    throw dino::config_error("dino-train: --mask-ratio must be in [0, 1), got " + f.str("mask-ratio"));
  auto& t = c.train;
  t.max_batch = B;
  t.seed = seed;
  t.crops = {mc.global_size, mc.local_size};
  t.clip_grad = f.num("clip-grad");
  t.freeze_last_layer = f.integer("freeze-last-layer");
  auto& s = t.schedule;
  s.epochs = f.integer("epochs", 1);
  if (ds.size() / B < 1)
    throw dino::config_error("dino-train: " + std::to_string(ds.size()) + " images make no batch of " + std::to_string(B));
  if (N > ds.size() / B)
    throw dino::config_error("dino-train: --accumulate " + std::to_string(N) + " is larger than the " +
                             std::to_string(ds.size() / B) + " batches of " + std::to_string(B) +
                             " images in an epoch of " + std::to_string(ds.size()) + " images");
  s.iters_per_epoch = dino::train::steps_per_epoch(ds.size() / B, N);  // optimizer steps
  s.batch_size = B * N;  // the effective batch, for the lr scaling
  s.lr = f.num("lr");
  s.min_lr = f.num("min-lr");
  s.warmup_epochs = f.integer("warmup-epochs");
  s.weight_decay = f.num("weight-decay");
  s.weight_decay_end = f.num("weight-decay-end");
  s.momentum_teacher = given_or("momentum-teacher", s.momentum_teacher);
  s.teacher_temp = given_or("teacher-temp", s.teacher_temp);
  s.warmup_teacher_temp = given_or("warmup-teacher-temp", s.warmup_teacher_temp);
  s.warmup_teacher_temp_epochs = f.integer("warmup-teacher-temp-epochs");

  const std::string device = f.str("device");
  if (f.boolean("bf16-operands") && !f.boolean("bf16"))
    throw dino_cli::usage_error("--bf16-operands needs --bf16 (it stores the bf16 products' operands)");
  if (f.boolean("bf16-staged") && !f.boolean("bf16"))
    throw dino_cli::usage_error("--bf16-staged needs --bf16 (it rounds the bf16 products' operands by a pass)");
  if (f.boolean("cuda-graphs") && device != "cuda")
    throw dino_cli::usage_error("--cuda-graphs needs --device cuda (a step graph is a CUDA graph)");
  if (device == "cpu") {
    dino::cpu_policy pol{int(f.integer("threads", 1)), f.boolean("bf16")};
    pol.bf16_operands = f.boolean("bf16-operands");
    return train_method(pol, f, ds, vc, mc, c, seed, B, N);
  }
#if defined(DINO_WITH_CUDA)
  if (device == "cuda") {
    dino::cuda::context ctx;
    dino::cuda_policy pol = ctx.policy(f.boolean("tf32"), f.boolean("bf16"));
    pol.bf16_operands = f.boolean("bf16-operands");
    pol.bf16_staged = f.boolean("bf16-staged");
    return train_method(pol, f, ds, vc, mc, c, seed, B, N);
  }
  throw dino::config_error("dino-train: --device must be cpu or cuda, got '" + device + "'");
#else
  throw dino::config_error("dino-train: --device must be cpu (this build has no CUDA: configure with -DDINO_ENABLE_CUDA=ON), got '" +
                           device + "'");
#endif
}

int run(int argc, char** argv) {
  auto f = make_flags();
  if (!f.parse(argc, argv)) return 0;
  const std::string kind = f.str("data");
  const std::string path = f.str("data-path");
  if (kind == "fashion-mnist") return train(f, path.empty() ? dino::data::fashion_mnist() : dino::data::fashion_mnist(path));
  if (kind == "mnist") {
    if (path.empty()) throw dino_cli::usage_error("--data mnist needs --data-path (the folder of the IDX files)");
    return train(f, dino::data::fashion_mnist(path));  // the same file names
  }
  if (kind == "cifar10" || kind == "cifar100") {
    if (path.empty()) throw dino_cli::usage_error("--data " + kind + " needs --data-path");
    return train(f, kind == "cifar10" ? dino::data::cifar10(path) : dino::data::cifar100(path));
  }
  if (kind == "folder") {
    if (path.empty()) throw dino_cli::usage_error("--data folder needs --data-path");
    dino::data::image_folder ds(path);
    return train(f, ds);
  }
  throw dino_cli::usage_error("unknown --data '" + kind + "'");
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const dino_cli::usage_error& e) {
    std::fprintf(stderr, "dino-train: %s (see dino-train --help)\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
