// dino/train/trainer.hpp: the training loop around a method and a multi-crop loader.
//
// run() takes batches from the loader (data::multicrop_loader: crop-major image arrays), runs
// method::step on each until the schedules end, the time limit passes or run_config::stop is
// raised (dino-train raises it on SIGINT and SIGTERM), and around it:
//   - writes one JSON line per step to <out>/log.jsonl (appending when resuming, after dropping
//     the lines of steps from the checkpoint's on, which a stopped run may have logged): step, epoch,
//     loss, lr, weight decay, teacher momentum, tau_t, teacher entropy, KL, the ln K collapse
//     flag, whether the step was skipped and why, images/s, the loader's wait;
//   - saves the whole state (train/checkpoint.hpp) to <out>/checkpoint.safetensors every
//     save_every steps and at the end (a stop or time limit included), atomically;
//   - shows a progress bar with images/s and ETA on a terminal, plain lines every log_every
//     steps otherwise; says so when a step is skipped for a non-finite loss or gradient.
// The loader must start where the method is (loader_config start_epoch / start_batch from
// method.iteration()), which resume_position() computes.
//
// Gradient accumulation: with run_config::accumulate = N > 1 each optimizer step takes N
// consecutive loader batches as its micro-batches (method::step over a span: the losses scaled
// by 1 / N, one clip, AdamW, teacher and center update), so the step sees N x batch images.
// The micro-batches of a step come from one loader epoch: an epoch gives
// floor(batches_per_epoch / N) steps and its last batches_per_epoch % N batches are not used
// (drop_last at the level of steps), so epochs and resume positions stay aligned. The loader
// hands out a batch that is valid until its next next(): the first N - 1 batches of a step are
// copied into buffers the trainer allocates at its first step and reuses (nothing is
// allocated per step after that); the last is used in place.
//
// On the GPU a step's loss and the rest come back only when read (method::read_stats, one
// host wait): the trainer reads each step's stats after it has launched the next step, so
// the device always has a step queued, and writes that step's line then. A checkpoint is
// saved after the lines of the steps it holds, and the line of the last step is written at
// the end. With after_step set the stats are read at once (the callback sees the model
// after that step). On the CPU the stats are filled at return and everything happens
// right after each step, as it always has.
#pragma once

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <unistd.h>

#include "dino/io/atomic_file.hpp"
#include "dino/ssl/method.hpp"
#include "dino/train/checkpoint.hpp"

namespace dino::train {

struct run_config {
  std::string out_dir = "dino-run";
  std::int64_t save_every = 0;  ///< steps between checkpoints (0: only at the end)
  double time_limit_s = 0;      ///< stop after this much wall time (0: none); the state is saved
  std::int64_t log_every = 20;  ///< plain progress lines when stderr is not a terminal
  int progress = -1;            ///< 1 bar, 0 lines, -1 bar when stderr is a terminal
  std::uint64_t seed = 0;       ///< recorded in checkpoints
  /// Loader batches (micro-batches) per optimizer step, >= 1 and at most the loader's batches
  /// per epoch: the step's effective batch is batch_size x accumulate (see the file comment).
  std::int64_t accumulate = 1;
  /// When set: checked before each step; once true, the loop stops there and the state is
  /// saved as at a time limit (run_summary::stopped). A signal handler may set it.
  const std::atomic<bool>* stop = nullptr;
  /// Called after each step (for example to evaluate every epoch); may be empty.
  std::function<void(const ssl::step_stats&)> after_step;
};

struct run_summary {
  std::int64_t first_step = 0, steps = 0, skipped = 0;
  double wall_s = 0, images_per_s = 0, loader_wait_s = 0;
  bool finished = false;             ///< reached the end of the schedules
  bool stopped = false;              ///< ended by run_config::stop
  std::vector<double> loss;          ///< per step run here
  std::string checkpoint;
};

/// The optimizer steps an epoch of batches_per_epoch loader batches gives with `accumulate`
/// batches per step (config_error when accumulate < 1 or > batches_per_epoch).
inline std::int64_t steps_per_epoch(std::int64_t batches_per_epoch, std::int64_t accumulate = 1) {
  require<config_error>(accumulate >= 1, "train: accumulate must be >= 1, got ", accumulate);
  require<config_error>(accumulate <= batches_per_epoch, "train: accumulate ", accumulate,
                        " is larger than the loader's ", batches_per_epoch, " batches per epoch");
  return batches_per_epoch / accumulate;
}

/// Where a loader must start to feed the method's next step: {epoch, batch in epoch}, with
/// `accumulate` loader batches per step (the first batch of the step).
inline std::pair<std::int64_t, std::int64_t> resume_position(std::int64_t iteration, std::int64_t batches_per_epoch,
                                                             std::int64_t accumulate = 1) {
  const std::int64_t steps = steps_per_epoch(batches_per_epoch, accumulate);
  return {iteration / steps, (iteration % steps) * accumulate};
}

namespace detail {
inline std::string fmt_time(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const long t = long(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%02ld:%02ld", t / 60, t % 60);
  return buf;
}

// Drops the lines of steps >= first_step from an existing log (the steps a stopped run logged
// after its last checkpoint, which the resumed run logs again), written back atomically
// (io/atomic_file.hpp). Lines without a step number stay.
inline void truncate_log(const std::string& path, std::int64_t first_step) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  std::int64_t dropped = 0;
  while (std::getline(in, line)) {
    const auto p = line.find("\"step\": ");
    if (p != std::string::npos && std::strtoll(line.c_str() + p + 8, nullptr, 10) >= first_step) {
      ++dropped;
      continue;
    }
    kept += line + "\n";
  }
  in.close();
  if (dropped == 0) return;
  io::write_file_atomic(path, std::string_view(kept));
  std::fprintf(stderr, "train: %s: dropped %lld lines of steps from %lld on (logged after the last checkpoint)\n",
               path.c_str(), (long long)dropped, (long long)first_step);
}
}  // namespace detail

template <class Policy, class Method, class Loader>
run_summary run(const Policy& pol, Method& m, Loader& loader, const run_config& rc) {
  namespace fs = std::filesystem;
  const std::int64_t N = rc.accumulate;
  require<config_error>(N >= 1, "train::run: accumulate must be >= 1, got ", N);
  std::int64_t used_per_epoch = 0;  // loader batches of an epoch that steps use (N x steps per epoch)
  if constexpr (requires { loader.batches_per_epoch(); })
    used_per_epoch = steps_per_epoch(loader.batches_per_epoch(), N) * N;
  std::error_code ec;
  fs::create_directories(rc.out_dir, ec);
  if (ec) throw io_error("train: cannot create the output folder '" + rc.out_dir + "': " + ec.message());
  const std::string log_path = rc.out_dir + "/log.jsonl", ckpt = rc.out_dir + "/checkpoint.safetensors";
  detail::truncate_log(log_path, m.iteration());
  std::ofstream log(log_path, std::ios::app);
  if (!log) throw io_error("train: cannot open '" + log_path + "' for writing");
  const bool bar = rc.progress < 0 ? ::isatty(2) != 0 : rc.progress == 1;
  const std::int64_t total = m.schedules().total_iters(), B = loader.batch_size() * N;  // images per step
  run_summary sum;
  sum.first_step = m.iteration();
  sum.checkpoint = ckpt;
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  auto last = t0;
  double recent_ips = 0;
  struct launched {
    ssl::step_stats st;
    double loader_wait = 0;
  };
  // The step's line, progress and callback, once its stats are read.
  auto report = [&](launched l) {
    ssl::step_stats& st = l.st;
    if constexpr (requires { m.read_stats(pol, st); }) m.read_stats(pol, st);
    const auto now = clock::now();
    const double dt = std::chrono::duration<double>(now - last).count();
    last = now;
    const double ips = dt > 0 ? double(B) / dt : 0;
    recent_ips = recent_ips == 0 ? ips : 0.9 * recent_ips + 0.1 * ips;
    ++sum.steps;
    sum.loss.push_back(st.loss);
    if (st.skipped) {
      ++sum.skipped;
      std::fprintf(stderr, "%sstep %lld skipped: %s (parameters, optimizer, teacher and center unchanged)\n",
                   bar ? "\n" : "", (long long)st.iteration, st.skip_reason);
    }
    char line[640];
    std::snprintf(line, sizeof line,
                  "{\"step\": %lld, \"epoch\": %lld, \"loss\": %.8g, \"lr\": %.8g, \"weight_decay\": %.8g, "
                  "\"momentum\": %.8g, \"teacher_temp\": %.8g, \"teacher_entropy\": %.8g, \"kl\": %.8g, "
                  "\"ln_k\": %.8g, \"collapsed\": %s, \"skipped\": %s, \"skip_reason\": \"%s\", "
                  "\"clipped_tensors\": %d, \"images_per_s\": %.4g, \"loader_wait_s\": %.4g}\n",
                  (long long)st.iteration, (long long)st.epoch, st.loss, st.lr, st.weight_decay, st.momentum,
                  st.teacher_temp, st.teacher_entropy, st.kl, st.ln_k, st.collapsed ? "true" : "false",
                  st.skipped ? "true" : "false", st.skip_reason, st.clipped_tensors, ips, l.loader_wait);
    log << line;
    const std::int64_t done = st.iteration + 1;
    const double eta = recent_ips > 0 ? double(total - done) * double(B) / recent_ips : NAN;
    if (bar) {
      const int width = 30, fill = int(double(width) * double(done) / double(total));
      std::fprintf(stderr, "\r[%.*s%.*s] %lld/%lld  loss %.4f  H %.3f  %.0f img/s  ETA %s%s   ", fill,
                   "##############################", width - fill, "..............................",
                   (long long)done, (long long)total, st.loss, st.teacher_entropy, recent_ips,
                   detail::fmt_time(eta).c_str(), st.collapsed ? "  COLLAPSE?" : "");
    } else if (rc.log_every > 0 && (done % rc.log_every == 0 || done == total)) {
      std::fprintf(stderr, "step %lld/%lld epoch %lld  loss %.4f  teacher entropy %.3f  KL %.4f  lr %.3g  %.1f img/s  ETA %s%s\n",
                   (long long)done, (long long)total, (long long)st.epoch, st.loss, st.teacher_entropy, st.kl, st.lr,
                   recent_ips, detail::fmt_time(eta).c_str(), st.collapsed ? "  (loss at ln K: collapse?)" : "");
    }
    if (rc.after_step) rc.after_step(st);
  };
  // The micro-batches of a step: the first N - 1 copied (held), the last in the loader's buffer.
  std::vector<std::vector<float>> held_global(std::size_t(N - 1)), held_local(std::size_t(N - 1));
  std::vector<ssl::image_crops<float>> micro(static_cast<std::size_t>(N));
  std::optional<launched> pending;  // a GPU step whose stats are not read yet
  while (m.iteration() < total) {
    const double elapsed = std::chrono::duration<double>(clock::now() - t0).count();
    if (rc.time_limit_s > 0 && elapsed >= rc.time_limit_s) break;
    if (rc.stop && rc.stop->load(std::memory_order_relaxed)) {
      sum.stopped = true;
      break;
    }
    const double wait0 = loader.wait_seconds();
    for (std::int64_t k = 0; k < N; ++k) {
      auto b = loader.next();
      if constexpr (requires { loader.batches_per_epoch(); b.index; }) {
        if (N > 1) {
          while (b.index >= used_per_epoch) b = loader.next();  // an epoch's last batches_per_epoch % N
          require<config_error>(k > 0 || b.index % N == 0, "train::run: the loader is at batch ", b.index,
                                " of its epoch, not at the first batch of a step of ", N,
                                " batches (start it at resume_position(iteration, batches_per_epoch, accumulate))");
        }
      }
      if (k + 1 == N) {
        micro[std::size_t(k)] = {b.global, b.local};
        break;
      }
      const auto copy = [](std::vector<float>& to, const float* from, std::int64_t n) {
        to.assign(from, from + n);  // allocates at the first step only
        return to.data();
      };
      const std::int64_t px = b.batch_size * b.channels;
      micro[std::size_t(k)] = {
          copy(held_global[std::size_t(k)], b.global, b.n_global * px * b.global_size * b.global_size),
          b.local ? copy(held_local[std::size_t(k)], b.local, b.n_local * px * b.local_size * b.local_size) : nullptr};
    }
    launched cur{m.step(pol, std::span<const ssl::image_crops<float>>(micro)), 0.0};
    cur.loader_wait = loader.wait_seconds() - wait0;
    if (pending) report(*std::exchange(pending, std::nullopt));  // the previous step, while this one runs
    if (cur.st.ready() || rc.after_step) report(cur);
    else pending = cur;
    const std::int64_t done = m.iteration();
    if (rc.save_every > 0 && done % rc.save_every == 0 && done < total) {
      if (pending) report(*std::exchange(pending, std::nullopt));
      save_checkpoint(ckpt, m, rc.seed);
    }
  }
  if (pending) report(*std::exchange(pending, std::nullopt));
  if (bar) std::fprintf(stderr, "\n");
  log.flush();
  sum.wall_s = std::chrono::duration<double>(clock::now() - t0).count();
  sum.images_per_s = sum.wall_s > 0 ? double(sum.steps * B) / sum.wall_s : 0;
  sum.loader_wait_s = loader.wait_seconds();
  sum.finished = m.iteration() >= total;
  save_checkpoint(ckpt, m, rc.seed);
  return sum;
}

}  // namespace dino::train
