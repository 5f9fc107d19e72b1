// dino/train/checkpoint.hpp: the whole training state of a method, saved and restored.
//
// One safetensors file holds every tensor of a step's state, under the names of the
// reference's checkpoint.pth (dino-spec §4.8) where it has them:
//   student.<name>, teacher.<name>          parameters ("student.backbone.blocks.0...")
//   optimizer.exp_avg.<name>, optimizer.exp_avg_sq.<name>   AdamW moments
//   dino_loss.center                         the center [1, K] (centering targets only)
//   loss.queue                               the key queue [size, dim] (InfoNCE only; its
//                                            "queued,head" in the metadata "loss_queue")
// (a stateless target or loss adds nothing) and its metadata the scalars: "iteration" (the next step), "seed", "adamw_steps" (one
// count per tensor, comma-separated, in layout order), "format" = "dino-train-1". The file
// is written atomically, so a crash never leaves a half-written checkpoint in place of a
// good one; a small JSON beside it repeats the scalars for people (not read back).
//
// restore() checks everything (every tensor present with its shape, the counts) before it
// changes anything; resuming continues bit-identically when the data and DropPath are keyed
// by (seed, step), as they are in this library.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/core/param_store.hpp"
#include "dino/io/atomic_file.hpp"
#include "dino/io/safetensors.hpp"

namespace dino::train {

namespace detail {
inline std::vector<std::int64_t> dims_of(const shape& s) {
  std::vector<std::int64_t> d;
  for (int i = 0; i < s.rank; ++i) d.push_back(s[i]);
  return d;
}
inline void add_all(std::vector<io::tensor_entry>& out, const std::string& prefix, const flat_params<float>& p) {
  for (const auto& e : p.layout().entries()) out.push_back({prefix + e.name, dims_of(e.shape), p.data() + e.offset});
}
inline void read_all(const io::safetensors_file& f, const std::string& prefix, flat_params<float>& p, bool apply) {
  for (const auto& e : p.layout().entries()) {
    const auto* t = f.find(prefix + e.name);
    if (!t) throw io_error("checkpoint: " + f.name() + ": no tensor '" + prefix + e.name + "'");
    if (t->shape != dims_of(e.shape))
      throw io_error("checkpoint: " + f.name() + ": tensor '" + prefix + e.name + "': expected shape " + e.shape.str() +
                     ", found " + t->shape_str());
    if (apply) f.to_float(*t, p.data() + e.offset);
  }
}

/// The host form of a parameter buffer: itself on the host, a copy for device buffers.
template <class T, class S>
class host_params {
 public:
  explicit host_params(flat_params<T, S>& p) : p_(p) {
    if constexpr (!on_host) {
      copy_ = flat_params<T>(p.layout());
      assign_params(copy_, p);
    }
  }
  flat_params<T>& get() {
    if constexpr (on_host) return p_;
    else return copy_;
  }
  /// Writes the host form back (device buffers only).
  void store() {
    if constexpr (!on_host) assign_params(p_, copy_);
  }

 private:
  static constexpr bool on_host = std::is_same_v<S, host_space>;
  flat_params<T, S>& p_;
  flat_params<T> copy_;
};
}  // namespace detail

/// A method whose target keeps a center (saved as dino_loss.center), and one whose loss keeps
/// a queue of keys (saved as loss.queue, with "queued,head" in the metadata).
template <class Method>
concept has_center = requires(Method& m) { m.target().center(); };
template <class Method>
concept has_queue = requires(Method& m) {
  m.loss().queue();
  m.loss().queued();
  m.loss().head();
  m.loss().set_state(std::int64_t{}, std::int64_t{});
};

/// Writes `path` (atomically) and `path` + ".json" with the method's state (from host or
/// device memory alike: device buffers are copied to the host first).
template <class Method>
void save_checkpoint(const std::string& path, Method& m, std::uint64_t seed, const std::string& extra_json = "{}") {
  std::vector<io::tensor_entry> entries;
  using S = typename Method::space;
  detail::host_params<float, S> student(m.student()), teacher(m.teacher()), m1(m.optimizer().exp_avg()),
      m2(m.optimizer().exp_avg_sq());
  detail::add_all(entries, "student.", student.get());
  detail::add_all(entries, "teacher.", teacher.get());
  detail::add_all(entries, "optimizer.exp_avg.", m1.get());
  detail::add_all(entries, "optimizer.exp_avg_sq.", m2.get());
  std::vector<float> center;
  if constexpr (has_center<Method>) {  // targets with a running state (centering)
    auto c = m.target().center();
    center.resize(static_cast<std::size_t>(c.numel()));
    view_to_host(tensor_view<const float, S>(c), center.data());
    entries.push_back({"dino_loss.center", {1, c.numel()}, center.data()});
  }
  std::string queue_meta;
  std::vector<float> queue;
  if constexpr (has_queue<Method>) {  // losses with a queue of keys (InfoNCE), in host or device memory
    auto q = m.loss().queue();
    queue.resize(static_cast<std::size_t>(q.numel()));
    view_to_host(tensor_view<const float, S>(q), queue.data());
    entries.push_back({"loss.queue", {q.rows(), q.cols()}, queue.data()});
    queue_meta = std::to_string(m.loss().queued()) + "," + std::to_string(m.loss().head());
  }
  std::string steps;
  for (auto s : m.optimizer().steps()) {
    if (!steps.empty()) steps += ',';
    steps += std::to_string(s);
  }
  io::metadata_map meta{{"format", "dino-train-1"},
                        {"iteration", std::to_string(m.iteration())},
                        {"seed", std::to_string(seed)},
                        {"adamw_steps", steps}};
  if constexpr (has_queue<Method>) meta["loss_queue"] = queue_meta;
  io::write_safetensors(path, entries, meta);
  std::ostringstream js;
  js << "{\"checkpoint\": \"" << path << "\", \"iteration\": " << m.iteration() << ", \"seed\": " << seed
     << ", \"extra\": " << extra_json << "}\n";
  io::write_file_atomic(path + ".json", std::string_view(js.str()));
}

/// What restore_checkpoint found.
struct checkpoint_info {
  std::int64_t iteration = 0;
  std::uint64_t seed = 0;
};

/// Restores the method's state from `path`; throws io_error (naming the file and the tensor or
/// value) without changing anything when the file does not fit the method.
template <class Method>
checkpoint_info restore_checkpoint(const std::string& path, Method& m) {
  const auto f = io::safetensors_file::read(path);
  const auto& meta = f.metadata();
  auto get = [&](const char* k) -> const std::string& {
    auto it = meta.find(k);
    if (it == meta.end()) throw io_error("checkpoint: " + path + ": no '" + std::string(k) + "' in the metadata");
    return it->second;
  };
  if (get("format") != "dino-train-1")
    throw io_error("checkpoint: " + path + ": format '" + get("format") + "' is not a dino-train-1 checkpoint");
  checkpoint_info info;
  try {
    info.iteration = std::stoll(get("iteration"));
    info.seed = std::stoull(get("seed"));
  } catch (const std::logic_error&) {
    throw io_error("checkpoint: " + path + ": unreadable iteration or seed");
  }
  std::vector<std::int64_t> steps;
  {
    std::stringstream ss(get("adamw_steps"));
    std::string tok;
    while (std::getline(ss, tok, ',')) steps.push_back(std::stoll(tok));
  }
  if (steps.size() != m.optimizer().steps().size())
    throw io_error("checkpoint: " + path + ": " + std::to_string(steps.size()) + " AdamW step counts for " +
                   std::to_string(m.optimizer().steps().size()) + " tensors");
  const io::tensor_info* ct = nullptr;
  if constexpr (has_center<Method>) {
    ct = f.find("dino_loss.center");
    auto c = m.target().center();
    if (!ct || ct->numel() != c.numel())
      throw io_error("checkpoint: " + path + ": dino_loss.center missing or not of " + std::to_string(c.numel()) +
                     " values");
  }
  const io::tensor_info* qt = nullptr;
  std::int64_t queued = 0, head = 0;
  if constexpr (has_queue<Method>) {
    auto q = m.loss().queue();
    qt = f.find("loss.queue");
    if (!qt || qt->shape != std::vector<std::int64_t>{q.rows(), q.cols()})
      throw io_error("checkpoint: " + path + ": loss.queue missing or not of shape " + q.shape.str());
    const std::string& qm = get("loss_queue");
    const auto comma = qm.find(',');
    try {
      if (comma == std::string::npos) throw std::invalid_argument(qm);
      queued = std::stoll(qm.substr(0, comma));
      head = std::stoll(qm.substr(comma + 1));
    } catch (const std::logic_error&) {
      throw io_error("checkpoint: " + path + ": unreadable loss_queue '" + qm + "' (expected queued,head)");
    }
    if (queued < 0 || queued > q.rows() || head < 0 || head >= std::max<std::int64_t>(q.rows(), 1))
      throw io_error("checkpoint: " + path + ": loss_queue " + qm + " does not fit a queue of " +
                     std::to_string(q.rows()) + " rows");
  }
  using S = typename Method::space;
  detail::host_params<float, S> student(m.student()), teacher(m.teacher()), m1(m.optimizer().exp_avg()),
      m2(m.optimizer().exp_avg_sq());
  for (bool apply : {false, true}) {  // check everything, then write
    detail::read_all(f, "student.", student.get(), apply);
    detail::read_all(f, "teacher.", teacher.get(), apply);
    detail::read_all(f, "optimizer.exp_avg.", m1.get(), apply);
    detail::read_all(f, "optimizer.exp_avg_sq.", m2.get(), apply);
  }
  student.store();
  teacher.store();
  m1.store();
  m2.store();
  if constexpr (has_center<Method>) {
    auto c = m.target().center();
    std::vector<float> center(static_cast<std::size_t>(c.numel()));
    f.to_float(*ct, center.data());
    view_from_host(c, center.data());
  }
  if constexpr (has_queue<Method>) {
    auto q = m.loss().queue();
    std::vector<float> keys(static_cast<std::size_t>(q.numel()));
    f.to_float(*qt, keys.data());
    view_from_host(q, keys.data());
    m.loss().set_state(queued, head);
  }
  m.optimizer().steps() = steps;
  m.set_iteration(info.iteration);
  return info;
}

}  // namespace dino::train
