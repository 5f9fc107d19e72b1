// dino-eval: evaluations of a DINO ViT trained by dino-train (or any checkpoint with the
// official names). The model runs on the CPU or, with --device cuda in a build with
// DINO_ENABLE_CUDA, on the GPU; the k-NN classifier and the linear probe run on the CPU.
//
//   dino-eval knn       --run DIR [--data fashion-mnist ...]   weighted k-NN of the CLS features
//   dino-eval linear    --run DIR                              linear probe on frozen CLS features
//   dino-eval attention --run DIR [--images 16] [--pictures 16]  attention maps, 60 % masks, Jaccard
//   dino-eval curves    --run DIR                              loss.png (and knn.png) from the logs
//
// The model comes from --run DIR (DIR/run.json for the architecture, DIR/checkpoint.safetensors)
// or --checkpoint FILE (the architecture from --arch, a run.json beside the file, or the file's
// shapes); --random-init SEED evaluates the same architecture at the reference's
// initialisation (the untrained baseline) and --raw-pixels the pixels themselves. Test images
// get ToTensor + Normalize with the statistics the training used (Fashion-MNIST's 0.2860 /
// 0.3530 for 28-px gray images, ImageNet's for RGB). Results are JSON files (written
// atomically) plus a short table on stdout. Every flag: dino-eval --help, and docs/tools.md.
// Exit codes: 0 success, 1 a bad file or value (the message names it), 2 bad usage.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <dino/data/cifar.hpp>
#include <dino/data/idx.hpp>
#include <dino/data/image_folder.hpp>
#include <dino/data/image_ops.hpp>
#include <dino/data/multicrop.hpp>
#include <dino/dino.hpp>
#if defined(DINO_WITH_CUDA)
#include <dino/cuda.hpp>
#endif
#include <dino/eval/attention.hpp>
#include <dino/eval/attention_png.hpp>
#include <dino/eval/knn.hpp>
#include <dino/eval/linear_probe.hpp>
#include <dino/io/atomic_file.hpp>
#include <dino/io/checkpoint.hpp>
#include <dino/io/plot.hpp>
#include <dino/io/safetensors.hpp>
#include <dino/nn/init.hpp>
#include <dino/nn/vit.hpp>
#include <dino/train/features.hpp>

#include "cli.hpp"
#include "presets.hpp"

namespace {

namespace fs = std::filesystem;
using dino_cli::usage_error;

const char* kModes = "knn, linear, attention, curves";

dino_cli::flags make_flags() {
  dino_cli::flags f("dino-eval", "MODE [options]   (MODE: knn, linear, attention, curves)");
  // the model
  f.add("run", "", "run folder of dino-train: run.json (architecture), checkpoint.safetensors; default output folder")
      .add("checkpoint", "", "safetensors checkpoint [default: <run>/checkpoint.safetensors]")
      .add("checkpoint-key", "teacher", "tensor group to evaluate: teacher or student")
      .add("arch", "", "vit_tiny, vit_small, vit_base, vit_small28, vit_tiny28 [default: <run>/run.json, a run.json beside the checkpoint, or the checkpoint's shapes]")
      .add("patch", "0", "patch size with --arch (0: the preset's)")
      .add("heads", "0", "attention heads when the architecture comes from the checkpoint's shapes (0: D / 64)")
      .add("random-init", "", "SEED: evaluate the architecture at the reference's initialisation (dino-train --seed SEED at step 0) instead of a checkpoint")
      .add("raw-pixels", "false", "knn/linear: use the raw pixels (flattened, / 255) instead of a model; knn adds the L1 k = 5 baseline")
      // the data
      .add("data", "fashion-mnist", "fashion-mnist, mnist (IDX files), cifar10, cifar100, folder")
      .add("data-path", "", "folder of the data set files [default for fashion-mnist: /usr/share/datasets/fashion-mnist]")
      .add("train-path", "", "--data folder: the train split (one sub-folder per class)")
      .add("test-path", "", "--data folder: the test split (the same class folders)")
      .add("train-samples", "0", "use the first N train images (0: all)")
      .add("test-samples", "0", "use the first N test images (0: all)")
      .add("image-size", "0", "evaluation size S: images of another size get Resize(R, bicubic) + CenterCrop(S) (0: the model's img_size)")
      .add("resize", "0", "R, the short side before the centre crop (0: S * 256 / 224, the reference's 256 for 224)")
      .add("mean", "", "Normalize mean, comma-separated per channel [default: the training's: 0.2860 for 28-px gray, 0.5 other gray, ImageNet's for RGB]")
      .add("std", "", "Normalize std, comma-separated per channel [default: 0.3530 / 0.5 / ImageNet's, as --mean]")
      // knn
      .add("k", "10,20,100,200", "knn: the k values, comma-separated")
      .add("temperature", "0.07", "knn: T of the exp(s / T) vote weights")
      .add("append-curve", "false", "knn: also append {step, epoch, top1_k<k>...} to <run>/knn_curve.jsonl (curves plots it)")
      // linear
      .add("probe-epochs", "100", "linear: epochs")
      .add("probe-lr", "0.001", "linear: learning rate (cosine to 0 over the epochs)")
      .add("probe-batch", "256", "linear: batch size")
      .add("probe-optimizer", "sgd", "linear: sgd (momentum 0.9, the reference's) or adamw")
      .add("probe-weight-decay", "0", "linear: weight decay")
      .add("probe-features", "none", "linear: feature preprocessing: none, l2, standardize")
      .add("n-last-blocks", "1", "linear: concatenate the CLS tokens of the last n blocks (the reference: 4 for ViT-S)")
      .add("seed", "0", "linear: seed of the classifier's initialisation and batch order")
      // attention
      .add("images", "16", "attention: the first N test images")
      .add("pictures", "16", "attention: PNGs of the first N of those images (0: none); the Jaccard covers all of them")
      .add("out-dir", "", "attention: folder of the PNGs and attention.json [default: <run or .>/attention, attention-random-init]; curves: [default: <run>]")
      .add("mass", "0.6", "attention: the attention mass the masks keep")
      .add("threshold", "10", "attention: foreground = gray pixel > threshold (the Fashion-MNIST mask)")
      .add("scale", "0", "attention: display enlargement of the PNGs (0: short side >= 96 pixels)")
      // common
      .add("out", "", "JSON result [default: <run or .>/knn.json, knn-random-init.json, knn-raw-pixels.json, linear*.json; <out-dir>/attention.json]")
      .add("threads", "2", "compute threads")
      .add("device", "cpu", "where the model runs (features, attention): cpu, or cuda in a build with DINO_ENABLE_CUDA; k-NN and the linear probe run on the CPU")
      .add("tf32", "false", "with --device cuda: fp32 GEMMs on TF32 tensor cores (default exact fp32)")
      .add("batch", "64", "images per forward pass");
  return f;
}

// ---------------------------------------------------------------- small helpers


std::string read_text(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw dino::io_error("dino-eval: " + path + ": cannot open for reading");
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

/// The numbers of a JSON text, by key, nesting ignored (keys of run.json and of the log lines
/// are unique); strings and arrays are skipped, true/false read as 1/0, nan/inf as such.
std::map<std::string, double> json_numbers(const std::string& s) {
  std::map<std::string, double> out;
  std::size_t i = 0;
  auto skip_ws = [&] {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  };
  auto read_string = [&] {
    std::string r;
    for (++i; i < s.size() && s[i] != '"'; ++i) {
      if (s[i] == '\\' && i + 1 < s.size()) ++i;
      r += s[i];
    }
    ++i;
    return r;
  };
  while (i < s.size()) {
    if (s[i] == '[') {  // arrays hold no keys we read
      int depth = 0;
      for (; i < s.size(); ++i) {
        if (s[i] == '"') {
          read_string();
          --i;
        } else if (s[i] == '[') {
          ++depth;
        } else if (s[i] == ']' && --depth == 0) {
          break;
        }
      }
      ++i;
      continue;
    }
    if (s[i] != '"') {
      ++i;
      continue;
    }
    const std::string key = read_string();
    skip_ws();
    if (i >= s.size() || s[i] != ':') continue;  // a string value, not a key
    ++i;
    skip_ws();
    if (i >= s.size()) break;
    if (s.compare(i, 4, "true") == 0) {
      out[key] = 1;
    } else if (s.compare(i, 5, "false") == 0) {
      out[key] = 0;
    } else if (s[i] == '-' || s[i] == '+' || (s[i] >= '0' && s[i] <= '9') || s[i] == 'n' || s[i] == 'i' ||
               s[i] == 'N' || s[i] == 'I') {
      char* end = nullptr;
      const double v = std::strtod(s.c_str() + i, &end);
      if (end != s.c_str() + i) {
        out[key] = v;
        i = std::size_t(end - s.c_str());
      }
    }
  }
  return out;
}

/// A small JSON writer: objects and arrays of numbers and strings (NaN as null).
class json {
 public:
  json& key(const std::string& k) {
    if (comma_) o_ << ", ";
    quoted(k);
    o_ << ": ";
    after_key_ = true;
    return *this;
  }
  json& num(double v) {
    if (!std::isfinite(v)) return raw("null");
    char b[40];
    std::snprintf(b, sizeof b, "%.10g", v);
    return raw(b);
  }
  json& integer(long long v) { return raw(std::to_string(v)); }
  json& null() { return raw("null"); }
  json& str(const std::string& v) {
    value();
    quoted(v);
    return *this;
  }
  json& open(char c) {
    value();
    o_ << c;
    comma_ = false;
    return *this;
  }
  json& close(char c) {
    o_ << c;
    comma_ = true;
    return *this;
  }
  std::string text() const { return o_.str() + "\n"; }

 private:
  void value() {
    if (!after_key_ && comma_) o_ << ", ";
    after_key_ = false;
    comma_ = true;
  }
  json& raw(const std::string& t) {
    value();
    o_ << t;
    return *this;
  }
  void quoted(const std::string& v) {
    o_ << '"';
    for (char c : v) {
      if (c == '"' || c == '\\') o_ << '\\' << c;
      else if (static_cast<unsigned char>(c) < 0x20) o_ << ' ';
      else o_ << c;
    }
    o_ << '"';
  }
  std::ostringstream o_;
  bool comma_ = false, after_key_ = false;
};

void write_text_atomic(const std::string& path, const std::string& text) {
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    fs::create_directories(parent, ec);
    if (ec) throw dino::io_error("dino-eval: cannot create the folder '" + parent.string() + "': " + ec.message());
  }
  dino::io::write_file_atomic(path, std::string_view(text));
}

std::string in_dir(const std::string& dir, const std::string& name) {
  return dir.empty() ? name : (fs::path(dir) / name).string();
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---------------------------------------------------------------- the model

struct model_info {
  std::string source;  ///< "checkpoint", "random-init", "raw-pixels"
  std::string checkpoint, key, arch_from;
  long long step = -1;  ///< the checkpoint's "iteration" (the next step), -1 unknown
  long long seed = -1;  ///< random-init seed
  double steps_per_epoch = 0;
};

struct model_t {
  dino::param_layout layout;
  dino::nn::vit vit;
  dino::flat_params<float> params;
  explicit model_t(const dino::nn::vit_config& c) : vit(c, layout), params(layout) {}
  dino::host_view<const float> view() const {
    return {params.data(), {std::int64_t(params.size())}, "parameters"};
  }
};

/// Where the model runs (--device, --tf32); the k-NN classifier and the linear probe use cpu().
class model_device {
 public:
  explicit model_device(const dino_cli::flags& f)
      : cpu_{int(f.integer("threads", 1))}, device_(f.str("device")), tf32_(f.boolean("tf32")) {
#if defined(DINO_WITH_CUDA)
    if (device_ != "cpu" && device_ != "cuda")
      throw dino::config_error("dino-eval: --device must be cpu or cuda, got '" + device_ + "'");
#else
    if (device_ != "cpu")
      throw dino::config_error("dino-eval: --device must be cpu (this build has no CUDA: configure with -DDINO_ENABLE_CUDA=ON), got '" +
                               device_ + "'");
#endif
  }
  const dino::cpu_policy& cpu() const { return cpu_; }
  /// fn(policy, parameters): m's parameters in the policy's memory (uploaded once per model).
  template <class Fn>
  auto with(const model_t& m, Fn&& fn) {
#if defined(DINO_WITH_CUDA)
    if (device_ == "cuda") {
      if (!ctx_) ctx_ = std::make_unique<dino::cuda::context>();
      if (on_device_ != &m) {
        params_ = dino::cuda::to_device(std::span<const float>(m.params.data(), m.params.size()), "ViT parameters");
        on_device_ = &m;
      }
      return fn(ctx_->policy(tf32_), dino::device_view<const float>{params_.data(), {std::int64_t(params_.size())}, "parameters"});
    }
#endif
    return fn(cpu_, m.view());
  }

 private:
  dino::cpu_policy cpu_;
  std::string device_;
  bool tf32_;
#if defined(DINO_WITH_CUDA)
  std::unique_ptr<dino::cuda::context> ctx_;
  dino::cuda::device_buffer<float> params_;
  const model_t* on_device_ = nullptr;
#endif
};

/// The architecture from a run.json.
dino::nn::vit_config config_from_run_json(const std::string& path) {
  const auto v = json_numbers(read_text(path));
  dino::nn::vit_config c;
  auto need = [&](const char* k) {
    auto it = v.find(k);
    if (it == v.end() || !(it->second >= 1))
      throw dino::io_error("dino-eval: " + path + ": no positive \"" + std::string(k) + "\" (expected run.json of dino-train)");
    return std::int64_t(it->second);
  };
  c.embed_dim = need("embed_dim");
  c.depth = need("depth");
  c.heads = need("heads");
  c.patch = need("patch");
  c.img_size = need("img_size");
  c.in_chans = need("in_chans");
  return c;
}


/// Builds the model the flags ask for (nullptr with --raw-pixels) and says where it came from.
std::unique_ptr<model_t> load_model(const dino_cli::flags& f, model_info& info) {
  const std::string run = f.str("run");
  const bool raw = f.boolean("raw-pixels"), rnd = f.has("random-init");
  if (raw && (rnd || f.has("checkpoint")))
    throw usage_error("--raw-pixels evaluates the pixels: it takes no --checkpoint or --random-init");
  if (rnd && f.has("checkpoint")) throw usage_error("--random-init and --checkpoint exclude each other");
  if (raw) {
    info.source = "raw-pixels";
    return nullptr;
  }
  std::string ckpt = f.str("checkpoint");
  if (!rnd && ckpt.empty()) {
    if (run.empty())
      throw usage_error("give --run DIR or --checkpoint FILE (or --random-init SEED with --run/--arch, or --raw-pixels)");
    ckpt = in_dir(run, "checkpoint.safetensors");
  }
  const std::string key = f.str("checkpoint-key");
  if (key != "teacher" && key != "student") throw usage_error("--checkpoint-key must be teacher or student, got '" + key + "'");

  std::unique_ptr<dino::io::safetensors_file> file;
  if (!rnd) file = std::make_unique<dino::io::safetensors_file>(dino::io::safetensors_file::read(ckpt));
  // The architecture: --arch, then run.json (the run's, else beside the checkpoint), then the shapes.
  std::string run_json = run.empty() ? "" : in_dir(run, "run.json");
  if (run_json.empty() && !ckpt.empty()) run_json = (fs::path(ckpt).parent_path() / "run.json").string();
  dino::nn::vit_config cfg;
  if (!f.str("arch").empty()) {
    cfg = dino_tools::arch(f.str("arch"), f.integer("patch"));
    info.arch_from = "--arch " + f.str("arch");
  } else if (!run_json.empty() && fs::exists(run_json)) {
    cfg = config_from_run_json(run_json);
    info.arch_from = run_json;
  } else if (file) {
    cfg = dino_tools::config_from_file(*file, key, f.integer("heads"), "dino-eval", "--arch or --run");
    info.arch_from = "the checkpoint's shapes";
  } else {
    throw usage_error("--random-init needs the architecture: give --arch or --run DIR (with run.json)");
  }
  if (!run_json.empty() && fs::exists(run_json)) {
    const auto v = json_numbers(read_text(run_json));
    if (auto it = v.find("steps_per_epoch"); it != v.end()) info.steps_per_epoch = it->second;
  }
  auto m = std::make_unique<model_t>(cfg);
  if (rnd) {
    info.source = "random-init";
    info.seed = f.integer("random-init");
    dino::nn::initialize(m->params, std::uint64_t(info.seed));  // the tensors of dino-train's backbone, in order
  } else {
    info.source = "checkpoint";
    info.checkpoint = ckpt;
    info.key = key;
    dino::io::load_options opt;
    opt.checkpoint_key = key;
    dino::io::load_params(*file, m->params, opt);
    if (auto it = file->metadata().find("iteration"); it != file->metadata().end()) info.step = std::atoll(it->second.c_str());
  }
  return m;
}

std::string describe(const model_info& info, const model_t* m) {
  std::string s;
  if (info.source == "raw-pixels") return "raw pixels";
  if (info.source == "random-init") s = "random init (seed " + std::to_string(info.seed) + ")";
  else s = info.checkpoint + " (" + info.key + (info.step >= 0 ? ", step " + std::to_string(info.step) : "") + ")";
  const auto& c = m->vit.config();
  return s + ", ViT D " + std::to_string(c.embed_dim) + " depth " + std::to_string(c.depth) + " heads " +
         std::to_string(c.heads) + " patch " + std::to_string(c.patch);
}

void model_json(json& j, const model_info& info, const model_t* m) {
  j.key("source").str(info.source);
  if (info.source == "checkpoint") {
    j.key("checkpoint").str(info.checkpoint).key("checkpoint_key").str(info.key);
    if (info.step >= 0) j.key("step").integer(info.step);
    else j.key("step").null();
  }
  if (info.source == "random-init") j.key("seed").integer(info.seed);
  if (m) {
    const auto& c = m->vit.config();
    j.key("arch").open('{');
    j.key("embed_dim").integer(c.embed_dim).key("depth").integer(c.depth).key("heads").integer(c.heads);
    j.key("patch").integer(c.patch).key("img_size").integer(c.img_size).key("in_chans").integer(c.in_chans);
    j.key("from").str(info.arch_from);
    j.close('}');
  }
}

// ---------------------------------------------------------------- the data

/// A data set seen at the evaluation size: images of size x size pass unchanged, others get
/// Resize(short side to `resize`, bicubic, as PIL) then CenterCrop(size), as the reference's
/// evaluation transforms. size 0: unchanged.
template <class D>
class eval_view {
 public:
  eval_view(const D& ds, std::int64_t size, std::int64_t resize) : ds_(ds), size_(size), resize_(resize) {}
  std::int64_t size() const { return ds_.size(); }
  int label(std::int64_t i) const { return ds_.label(i); }
  int num_classes() const { return ds_.num_classes(); }
  std::int64_t channels() const { return ds_.channels(); }
  void load(std::int64_t i, dino::data::image& out) const {
    if (size_ == 0) return ds_.load(i, out);
    dino::data::image src;
    ds_.load(i, src);
    if (src.height == size_ && src.width == size_) {
      out = std::move(src);
      return;
    }
    // torchvision Resize(int): the short side to resize_, the long side int(resize_ * long / short).
    std::int64_t h = resize_, w = resize_;
    if (src.height < src.width) w = std::int64_t(double(resize_) * double(src.width) / double(src.height));
    else if (src.width < src.height) h = std::int64_t(double(resize_) * double(src.height) / double(src.width));
    dino::data::image big;
    dino::data::resample_scratch s;
    dino::data::resize_bicubic(src, dino::data::crop_box{0, 0, src.height, src.width}, h, w, big, s);
    const std::int64_t top = std::llround(double(h - size_) / 2.0), left = std::llround(double(w - size_) / 2.0);
    if (top < 0 || left < 0)
      throw dino::config_error("dino-eval: --resize " + std::to_string(resize_) + " is smaller than --image-size " +
                               std::to_string(size_));
    out.resize(size_, size_, src.channels);
    for (std::int64_t y = 0; y < size_; ++y)
      std::copy(big.data() + ((top + y) * w + left) * src.channels,
                big.data() + ((top + y) * w + left + size_) * src.channels, out.data() + y * size_ * src.channels);
  }

 private:
  const D& ds_;
  std::int64_t size_, resize_;
};

struct data_opts {
  std::string name;
  std::int64_t size = 0, resize = 0;
  std::vector<float> mean, stdev;
};

/// Evaluation size, resize and the Normalize statistics (those dino-train used unless given).
template <class D>
data_opts data_options(const dino_cli::flags& f, const D& ds, const model_t* m) {
  data_opts o;
  o.name = f.str("data");
  o.size = f.integer("image-size");
  if (o.size == 0 && m) o.size = m->vit.config().img_size;
  o.resize = f.integer("resize");
  if (o.resize == 0) o.resize = std::max<std::int64_t>(o.size, std::llround(double(o.size) * 256.0 / 224.0));
  const bool small = dino_tools::is_small_images(ds);
  const auto mc = small ? dino::data::multicrop_28px() : dino::data::multicrop_imagenet();
  o.mean = mc.mean;
  o.stdev = mc.std;
  if (ds.channels() == 1 && o.mean.size() != 1) o.mean = {0.5f}, o.stdev = {0.5f};
  auto floats = [&](const char* k) {
    std::vector<float> v;
    for (double x : dino_cli::number_list(k, f.str(k))) v.push_back(float(x));
    if (std::int64_t(v.size()) != ds.channels())
      throw usage_error(std::string("--") + k + " needs " + std::to_string(ds.channels()) + " values (one per channel)");
    return v;
  };
  if (!f.str("mean").empty()) o.mean = floats("mean");
  if (!f.str("std").empty()) o.stdev = floats("std");
  for (float s : o.stdev)
    if (!(s > 0)) throw usage_error("--std values must be positive");
  return o;
}

/// Calls fn(train, test) with the data set the flags name (train may be empty when !need_train
/// for folder data).
template <class Fn>
int with_data(const dino_cli::flags& f, bool need_train, Fn&& fn) {
  const std::string kind = f.str("data"), path = f.str("data-path");
  if (kind == "fashion-mnist" || kind == "mnist") {
    if (kind == "mnist" && path.empty()) throw usage_error("--data mnist needs --data-path (the folder of the IDX files)");
    const fs::path dir = path.empty() ? fs::path("/usr/share/datasets/fashion-mnist") : fs::path(path);
    const auto test = dino::data::fashion_mnist(dir, false);
    const auto train = need_train ? dino::data::fashion_mnist(dir, true) : dino::data::array_dataset{};
    return fn(train, test);
  }
  if (kind == "cifar10" || kind == "cifar100") {
    if (path.empty()) throw usage_error("--data " + kind + " needs --data-path");
    auto load = [&](bool train) {
      return kind == "cifar10" ? dino::data::cifar10(path, train) : dino::data::cifar100(path, train);
    };
    const auto test = load(false);
    const auto train = need_train ? load(true) : dino::data::array_dataset{};
    return fn(train, test);
  }
  if (kind == "folder") {
    const std::string tp = f.str("test-path"), rp = f.str("train-path");
    if (tp.empty() || (need_train && rp.empty()))
      throw usage_error(std::string("--data folder needs ") + (need_train ? "--train-path and " : "") + "--test-path");
    const dino::data::image_folder test(tp);
    const dino::data::image_folder train(need_train ? rp : tp);
    if (need_train && train.classes() != test.classes())
      throw dino::config_error("dino-eval: the class folders of " + rp + " and " + tp + " differ (" +
                               std::to_string(train.num_classes()) + " and " + std::to_string(test.num_classes()) +
                               " classes): the labels would not match");
    return fn(train, test);
  }
  throw usage_error("unknown --data '" + kind + "' (fashion-mnist, mnist, cifar10, cifar100, folder)");
}

std::int64_t limit(const dino_cli::flags& f, const char* flag, std::int64_t available, const std::string& what) {
  const std::int64_t n = f.integer(flag);
  if (available == 0) throw dino::config_error("dino-eval: the " + what + " split has no images");
  return n == 0 ? available : std::min(n, available);
}

template <class D>
std::vector<int> labels_of(const D& ds, std::int64_t n) {
  std::vector<int> l(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) l[std::size_t(i)] = ds.label(i);
  return l;
}

/// The first n images as bytes [n, H * W * C] (HWC; all the same size).
template <class D>
std::vector<std::uint8_t> pixels_of(const D& ds, std::int64_t n, std::int64_t& dim, dino::data::image* first = nullptr) {
  dino::data::image img;
  ds.load(0, img);
  dim = img.numel();
  if (first) *first = img;
  std::vector<std::uint8_t> px(std::size_t(n * dim));
  for (std::int64_t i = 0; i < n; ++i) {
    if (i) ds.load(i, img);
    if (img.numel() != dim)
      throw dino::shape_error("dino-eval: image " + std::to_string(i) + " is " + std::to_string(img.height) + " x " +
                              std::to_string(img.width) + " x " + std::to_string(img.channels) + ", image 0 has " +
                              std::to_string(dim) + " values: give --image-size to resize them to one size");
    std::copy(img.pixels.begin(), img.pixels.end(), px.begin() + i * dim);
  }
  return px;
}

/// CLS features [n, D * n_last] of the first n images (n_last > 1: the CLS tokens of the last
/// n blocks, oldest first, as the reference's linear probe), on the model's device.
template <class D>
std::vector<float> features_of(model_device& dev, const model_t& m, const D& ds, std::int64_t n, const data_opts& o,
                               std::int64_t batch, std::int64_t n_last, const char* label, float* cls_attention = nullptr) {
  std::vector<float> feats(std::size_t(n * m.vit.out_dim() * n_last));
  dev.with(m, [&](const auto& pol, auto P) {
    dino::train::extract_features(pol, m.vit, P, ds, n, o.mean, o.stdev, batch, feats.data(), cls_attention, label, n_last);
  });
  return feats;
}

/// Train and test features of the model (or the pixels / 255 with --raw-pixels).
struct feature_sets {
  std::vector<float> train, test;
  std::vector<int> train_labels, test_labels;
  std::int64_t N = 0, M = 0, dim = 0;
  int classes = 0;
  double seconds = 0;
  data_opts opts;
  std::vector<std::uint8_t> train_px, test_px;  ///< raw pixels only
};

template <class Train, class Test>
feature_sets make_features(const dino_cli::flags& f, model_device& dev, const model_t* m, const Train& train_ds,
                           const Test& test_ds, std::int64_t n_last) {
  feature_sets s;
  const auto t0 = std::chrono::steady_clock::now();
  s.opts = data_options(f, test_ds, m);
  if (m && test_ds.channels() != m->vit.config().in_chans)
    throw dino::config_error("dino-eval: the data (" + f.str("data") + ") has " + std::to_string(test_ds.channels()) +
                             " channels, the model takes " + std::to_string(m->vit.config().in_chans));
  const eval_view<Train> train(train_ds, s.opts.size, s.opts.resize);
  const eval_view<Test> test(test_ds, s.opts.size, s.opts.resize);
  s.N = limit(f, "train-samples", train.size(), "train");
  s.M = limit(f, "test-samples", test.size(), "test");
  s.train_labels = labels_of(train, s.N);
  s.test_labels = labels_of(test, s.M);
  s.classes = std::max(train.num_classes(), test.num_classes());
  if (m) {
    const std::int64_t batch = f.integer("batch", 1);
    const bool tty = ::isatty(2) != 0;  // a progress line on a terminal, a summary otherwise
    s.train = features_of(dev, *m, train, s.N, s.opts, batch, n_last, tty ? "dino-eval: train features" : nullptr);
    s.test = features_of(dev, *m, test, s.M, s.opts, batch, n_last, tty ? "dino-eval: test features" : nullptr);
    s.dim = m->vit.out_dim() * n_last;
  } else {
    std::int64_t d2 = 0;
    dino::data::image first;
    s.train_px = pixels_of(train, s.N, s.dim, &first);
    if (s.opts.size == 0) s.opts.size = first.height;
    s.test_px = pixels_of(test, s.M, d2);
    if (d2 != s.dim)
      throw dino::shape_error("dino-eval: train images have " + std::to_string(s.dim) + " values, test images " +
                              std::to_string(d2) + ": give --image-size");
    s.train.resize(s.train_px.size());
    s.test.resize(s.test_px.size());
    for (std::size_t i = 0; i < s.train_px.size(); ++i) s.train[i] = float(s.train_px[i]) / 255.0f;
    for (std::size_t i = 0; i < s.test_px.size(); ++i) s.test[i] = float(s.test_px[i]) / 255.0f;
  }
  s.seconds = seconds_since(t0);
  std::fprintf(stderr, "dino-eval: %s of %lld + %lld images in %.1f s\n", m ? "features" : "pixels", (long long)s.N,
               (long long)s.M, s.seconds);
  return s;
}

void data_json(json& j, const dino_cli::flags& f, const feature_sets& s) {
  j.key("data").open('{');
  j.key("kind").str(f.str("data"));
  j.key("path").str(f.str("data") == "folder" ? f.str("train-path") + " | " + f.str("test-path") : f.str("data-path"));
  j.key("train_samples").integer(s.N).key("test_samples").integer(s.M).key("classes").integer(s.classes);
  j.key("image_size").integer(s.opts.size);
  auto r6 = [](float v) { return std::round(double(v) * 1e6) / 1e6; };  // 0.286, not 0.2860000134
  j.key("mean").open('[');
  for (float v : s.opts.mean) j.num(r6(v));
  j.close(']').key("std").open('[');
  for (float v : s.opts.stdev) j.num(r6(v));
  j.close(']').close('}');
}

std::string default_out(const dino_cli::flags& f, const model_info& info, const std::string& stem) {
  if (!f.str("out").empty()) return f.str("out");
  const std::string suffix = info.source == "checkpoint" ? "" : "-" + info.source;
  return in_dir(f.str("run"), stem + suffix + ".json");
}

// ---------------------------------------------------------------- modes

int mode_knn(const dino_cli::flags& f) {
  model_device dev(f);
  const dino::cpu_policy& pol = dev.cpu();
  std::vector<int> ks;
  for (double k : dino_cli::number_list("k", f.str("k"))) {
    if (k < 1 || k != std::floor(k)) throw usage_error("--k values must be positive integers, got '" + f.str("k") + "'");
    ks.push_back(int(k));
  }
  const double T = f.num("temperature");
  if (!(T > 0)) throw usage_error("--temperature must be positive");
  const bool curve = f.boolean("append-curve");
  if (curve && f.boolean("raw-pixels")) throw usage_error("--append-curve records a model's accuracy, not --raw-pixels");
  if (curve && f.str("run").empty()) throw usage_error("--append-curve needs --run DIR (it appends to DIR/knn_curve.jsonl)");
  model_info info;
  const auto model = load_model(f, info);
  const std::string out = default_out(f, info, "knn");
  return with_data(f, true, [&](const auto& train_ds, const auto& test_ds) {
    const feature_sets s = make_features(f, dev, model.get(), train_ds, test_ds, 1);
    const auto t1 = std::chrono::steady_clock::now();
    const auto r = dino::eval::knn_classify(pol, s.train.data(), s.train_labels.data(), s.N, s.test.data(),
                                            s.test_labels.data(), s.M, s.dim, s.classes, ks, T);
    const double knn_s = seconds_since(t1);
    dino::eval::knn_l1_result l1;
    double l1_s = 0;
    if (!model) {
      const auto t2 = std::chrono::steady_clock::now();
      l1 = dino::eval::knn_raw_l1(pol, s.train_px.data(), s.train_labels.data(), s.N, s.test_px.data(),
                                  s.test_labels.data(), s.M, s.dim, s.classes, 5);
      l1_s = seconds_since(t2);
    }
    json j;
    j.open('{').key("mode").str("knn");
    model_json(j, info, model.get());
    data_json(j, f, s);
    j.key("feature_dim").integer(s.dim).key("temperature").num(T);
    j.key("knn").open('[');
    for (const auto& a : r.per_k) {
      j.open('{').key("k").integer(a.requested_k).key("k_used").integer(a.k).key("top1").num(a.top1);
      j.key("top5").num(a.has_top5 ? a.top5 : NAN).close('}');
    }
    j.close(']');
    if (!model) j.key("raw_l1").open('{').key("k").integer(l1.k).key("top1").num(l1.top1).key("tested").integer(l1.tested).close('}');
    j.key("seconds").open('{').key("features").num(s.seconds).key("knn").num(knn_s);
    if (!model) j.key("raw_l1").num(l1_s);
    j.close('}').close('}');
    write_text_atomic(out, j.text());

    std::printf("dino-eval knn: %s\n  %s: %lld train (memory bank) / %lld test images, %d classes, features D %lld, T %g\n",
                describe(info, model.get()).c_str(), f.str("data").c_str(), (long long)s.N, (long long)s.M, s.classes,
                (long long)s.dim, T);
    std::printf("  %6s  %8s  %8s\n", "k", "top-1 %", "top-5 %");
    for (const auto& a : r.per_k) {
      char t5[16] = "-";
      if (a.has_top5) std::snprintf(t5, sizeof t5, "%.2f", 100 * a.top5);
      std::printf("  %6d  %8.2f  %8s\n", a.requested_k, 100 * a.top1, t5);
    }
    if (!model) std::printf("  raw pixels, L1 k = %d (unweighted): top-1 %.2f %% of %lld\n", l1.k, 100 * l1.top1, (long long)l1.tested);
    std::printf("  features %.1f s, k-NN %.1f s; wrote %s\n", s.seconds, knn_s + l1_s, out.c_str());

    if (curve) {
      json c;
      c.open('{').key("step").integer(info.step >= 0 ? info.step : 0);
      if (info.steps_per_epoch > 0) c.key("epoch").num(double(std::max(0LL, info.step)) / info.steps_per_epoch);
      c.key("source").str(info.source).key("test_samples").integer(s.M);
      for (const auto& a : r.per_k) c.key("top1_k" + std::to_string(a.requested_k)).num(a.top1);
      c.close('}');
      const std::string path = in_dir(f.str("run"), "knn_curve.jsonl");
      std::ofstream cf(path, std::ios::app);
      if (!(cf << c.text())) throw dino::io_error("dino-eval: cannot append to " + path);
      std::printf("  appended to %s\n", path.c_str());
    }
    return 0;
  });
}

int mode_linear(const dino_cli::flags& f) {
  model_device dev(f);
  const dino::cpu_policy& pol = dev.cpu();
  dino::eval::linear_probe_config pc;
  pc.epochs = int(f.integer("probe-epochs", 1));
  pc.lr = f.num("probe-lr");
  pc.batch_size = int(f.integer("probe-batch", 1));
  pc.weight_decay = f.num("probe-weight-decay");
  pc.seed = std::uint64_t(f.integer("seed"));
  const std::string opt = f.str("probe-optimizer"), feat = f.str("probe-features");
  if (opt == "sgd") pc.optimizer = dino::eval::probe_optimizer::sgd;
  else if (opt == "adamw") pc.optimizer = dino::eval::probe_optimizer::adamw;
  else throw usage_error("--probe-optimizer must be sgd or adamw, got '" + opt + "'");
  if (feat == "none") pc.features = dino::eval::probe_features::none;
  else if (feat == "l2") pc.features = dino::eval::probe_features::l2;
  else if (feat == "standardize") pc.features = dino::eval::probe_features::standardize;
  else throw usage_error("--probe-features must be none, l2 or standardize, got '" + feat + "'");
  if (!(pc.lr > 0)) throw usage_error("--probe-lr must be positive");
  const std::int64_t n_last = f.integer("n-last-blocks", 1);
  model_info info;
  const auto model = load_model(f, info);
  if (model && n_last > model->vit.config().depth)
    throw usage_error("--n-last-blocks " + std::to_string(n_last) + " exceeds the depth " +
                      std::to_string(model->vit.config().depth));
  const std::string out = default_out(f, info, "linear");
  return with_data(f, true, [&](const auto& train_ds, const auto& test_ds) {
    const feature_sets s = make_features(f, dev, model.get(), train_ds, test_ds, model ? n_last : 1);
    const auto t1 = std::chrono::steady_clock::now();
    const auto r = dino::eval::linear_probe(pol, s.train.data(), s.train_labels.data(), s.N, s.test.data(),
                                            s.test_labels.data(), s.M, s.dim, s.classes, pc);
    const double probe_s = seconds_since(t1);
    json j;
    j.open('{').key("mode").str("linear");
    model_json(j, info, model.get());
    data_json(j, f, s);
    j.key("feature_dim").integer(s.dim).key("n_last_blocks").integer(model ? n_last : 0);
    j.key("probe").open('{').key("epochs").integer(pc.epochs).key("lr").num(pc.lr).key("batch_size").integer(pc.batch_size);
    j.key("optimizer").str(opt).key("weight_decay").num(pc.weight_decay).key("features").str(feat).key("seed").integer(
        (long long)pc.seed);
    j.close('}');
    j.key("train_top1").num(r.train_top1).key("test_top1").num(r.test_top1).key("test_top5").num(r.test_top5);
    j.key("epoch_loss").open('[');
    for (double v : r.epoch_loss) j.num(v);
    j.close(']');
    j.key("seconds").open('{').key("features").num(s.seconds).key("probe").num(probe_s).close('}').close('}');
    write_text_atomic(out, j.text());
    std::printf("dino-eval linear: %s\n  %s: %lld train / %lld test images, %d classes, features D %lld%s\n",
                describe(info, model.get()).c_str(), f.str("data").c_str(), (long long)s.N, (long long)s.M, s.classes,
                (long long)s.dim, model && n_last > 1 ? (" (CLS of the last " + std::to_string(n_last) + " blocks)").c_str() : "");
    std::printf("  probe: %s lr %g, %d epochs, batch %d, features %s; loss %.4f -> %.4f\n", opt.c_str(), pc.lr, pc.epochs,
                pc.batch_size, feat.c_str(), r.epoch_loss.front(), r.epoch_loss.back());
    std::printf("  top-1 train %.2f %%, test %.2f %%; test top-5 %s\n", 100 * r.train_top1, 100 * r.test_top1,
                std::isfinite(r.test_top5) ? (std::to_string(100 * r.test_top5).substr(0, 5) + " %").c_str() : "-");
    std::printf("  features %.1f s, probe %.1f s; wrote %s\n", s.seconds, probe_s, out.c_str());
    return 0;
  });
}

int mode_attention(const dino_cli::flags& f) {
  model_device dev(f);
  if (f.boolean("raw-pixels")) throw usage_error("attention needs a model: --raw-pixels does not apply");
  const std::int64_t want = f.integer("images", 1);
  const std::int64_t pictures = f.integer("pictures", 0);
  const double mass = f.num("mass");
  if (!(mass > 0 && mass <= 1)) throw usage_error("--mass must lie in (0, 1]");
  const int threshold = int(f.integer("threshold"));
  model_info info;
  const auto model = load_model(f, info);
  const std::string dir = !f.str("out-dir").empty()
                              ? f.str("out-dir")
                              : in_dir(f.str("run"), info.source == "checkpoint" ? "attention" : "attention-" + info.source);
  const std::string out = f.str("out").empty() ? in_dir(dir, "attention.json") : f.str("out");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw dino::io_error("dino-eval: cannot create the folder '" + dir + "': " + ec.message());
  return with_data(f, false, [&](const auto&, const auto& test_ds) {
    using Test = std::decay_t<decltype(test_ds)>;
    const auto& cfg = model->vit.config();
    if (test_ds.channels() != cfg.in_chans)
      throw dino::config_error("dino-eval: the data (" + f.str("data") + ") has " + std::to_string(test_ds.channels()) +
                               " channels, the model takes " + std::to_string(cfg.in_chans));
    const data_opts o = data_options(f, test_ds, model.get());
    const eval_view<Test> test(test_ds, o.size, o.resize);
    const std::int64_t n = std::min<std::int64_t>(want, test.size());
    std::int64_t dim = 0;
    dino::data::image first;
    const std::vector<std::uint8_t> px = pixels_of(test, n, dim, &first);
    const int H = int(first.height), W = int(first.width), C = int(first.channels), p = int(cfg.patch);
    if (H % p || W % p)
      throw dino::shape_error("dino-eval: images of " + std::to_string(H) + " x " + std::to_string(W) +
                              " pixels are not a multiple of the patch size " + std::to_string(p) + " (give --image-size)");
    const int gh = H / p, gw = W / p, heads = int(cfg.heads);
    const std::int64_t per = std::int64_t(heads) * (1 + gh * gw);
    std::vector<float> att(std::size_t(n * per));
    const auto t0 = std::chrono::steady_clock::now();
    features_of(dev, *model, test, n, o, f.integer("batch", 1), 1, nullptr, att.data());
    const double feat_s = seconds_since(t0);
    // Gray images: the pixels themselves, or PIL's luma of RGB.
    std::vector<std::uint8_t> gray(std::size_t(n) * std::size_t(H * W));
    for (std::size_t i = 0; i < gray.size(); ++i)
      gray[i] = C == 1 ? px[i] : dino::data::detail::pil_luma(px.data() + 3 * i);
    dino::eval::overlay_options ov;
    ov.scale = int(f.integer("scale"));
    ov.mass = mass;
    std::vector<std::string> files;
    const std::int64_t np = std::min(n, pictures);  // images drawn (the Jaccard takes all n)
    for (std::int64_t i = 0; i < np; ++i) {
      char name[32];
      std::snprintf(name, sizeof name, "img%03lld", (long long)i);
      dino::eval::write_attention_pngs(in_dir(dir, name), gray.data() + i * H * W, H, W, att.data() + i * per, heads, gh, gw,
                                       p, ov);
      files.push_back(in_dir(dir, std::string(name) + "-heads.png"));
    }
    const std::string grid = np > 0 ? in_dir(dir, "grid.png") : std::string();
    if (np > 0) dino::eval::write_attention_grid(grid, gray.data(), int(np), H, W, att.data(), heads, gh, gw, p, ov);
    // The Jaccard index of the mass masks against the foreground (gray pixel > threshold).
    dino::eval::attention_jaccard_result jr, jm;
    std::vector<double> per_image(static_cast<std::size_t>(n));
    if (C == 1) {
      jr = dino::eval::attention_jaccard_foreground(att.data(), n, heads, gh, gw, p, gray.data(), threshold, mass);
      std::vector<float> mean(std::size_t(n * (1 + gh * gw)), 0.0f);  // the map averaged over heads
      for (std::int64_t i = 0; i < n; ++i)
        for (int h = 0; h < heads; ++h)
          for (int t = 0; t < 1 + gh * gw; ++t)
            mean[std::size_t(i * (1 + gh * gw) + t)] += att[std::size_t(i * per + h * (1 + gh * gw) + t)] / float(heads);
      jm = dino::eval::attention_jaccard_foreground(mean.data(), n, 1, gh, gw, p, gray.data(), threshold, mass);
      for (std::int64_t i = 0; i < n; ++i)
        per_image[std::size_t(i)] =
            dino::eval::attention_jaccard_foreground(att.data() + i * per, 1, heads, gh, gw, p, gray.data() + i * H * W,
                                                     threshold, mass)
                .mean;
    }
    json j;
    j.open('{').key("mode").str("attention");
    model_json(j, info, model.get());
    j.key("data").open('{').key("kind").str(f.str("data")).key("images").integer(n).key("image_size").integer(H);
    j.close('}');
    j.key("grid").open('[').integer(gh).integer(gw).close(']').key("heads").integer(heads).key("mass").num(mass);
    if (C == 1) {
      j.key("foreground_threshold").integer(threshold);
      j.key("jaccard").open('{').key("mean").num(jr.mean).key("per_head").open('[');
      for (double v : jr.per_head) j.num(v);
      j.close(']').key("head_mean_map").num(jm.mean).key("per_image").open('[');
      for (double v : per_image) j.num(v);
      j.close(']').close('}');
    } else {
      j.key("jaccard").null().key("jaccard_note").str("no foreground masks for RGB data (only gray images: pixel > threshold)");
    }
    j.key("files").open('{').key("pictures").integer(np).key("grid");
    if (np > 0) j.str(grid);
    else j.null();
    j.key("per_image").open('[');
    for (const auto& s : files) j.str(s);
    j.close(']').key("per_head_pattern").str(in_dir(dir, "img<i>-head<h>.png")).close('}');
    j.key("seconds").open('{').key("features").num(feat_s).close('}').close('}');
    write_text_atomic(out, j.text());
    std::printf("dino-eval attention: %s\n  %lld test images of %s, %d x %d patches, %d heads\n",
                describe(info, model.get()).c_str(), (long long)n, f.str("data").c_str(), gh, gw, heads);
    if (C == 1) {
      std::printf("  Jaccard of the %.0f %% mass masks vs the foreground (pixel > %d): mean over heads and images %.3f",
                  100 * mass, threshold, jr.mean);
      std::printf("; per head");
      for (double v : jr.per_head) std::printf(" %.3f", v);
      std::printf("; head-mean map %.3f\n", jm.mean);
    }
    if (np > 0)
      std::printf("  wrote %s, %s and %lld x (1 + %d) PNGs in %s\n", out.c_str(), grid.c_str(), (long long)np, heads,
                  dir.c_str());
    else
      std::printf("  wrote %s (no PNGs: --pictures 0)\n", out.c_str());
    return 0;
  });
}

/// Bins of at most `max_points` means (x and y), so that long runs plot readably.
dino::io::series binned(const std::string& name, const std::vector<double>& x, const std::vector<double>& y,
                        std::size_t max_points) {
  dino::io::series s{name, {}, {}};
  const std::size_t n = x.size(), per = std::max<std::size_t>(1, (n + max_points - 1) / max_points);
  for (std::size_t b = 0; b < n; b += per) {
    double sx = 0, sy = 0;
    std::size_t c = 0;
    for (std::size_t i = b; i < std::min(n, b + per); ++i)
      if (std::isfinite(y[i])) sx += x[i], sy += y[i], ++c;
    if (c) s.x.push_back(sx / double(c)), s.y.push_back(sy / double(c));
  }
  return s;
}

int mode_curves(const dino_cli::flags& f) {
  const std::string run = f.str("run");
  if (run.empty()) throw usage_error("curves needs --run DIR (the folder with log.jsonl)");
  const std::string dir = f.str("out-dir").empty() ? run : f.str("out-dir");
  const std::string log = in_dir(run, "log.jsonl");
  if (!fs::exists(log)) throw dino::io_error("dino-eval: " + log + ": no such file (is " + run + " a dino-train run folder?)");
  std::map<long long, std::map<std::string, double>> steps;  // the last line of each step (a resumed run may repeat)
  {
    std::ifstream in(log);
    std::string line;
    long long lineno = 0;
    while (std::getline(in, line)) {
      ++lineno;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      auto v = json_numbers(line);
      if (!v.count("step") || !v.count("loss"))
        throw dino::io_error("dino-eval: " + log + ":" + std::to_string(lineno) + ": no \"step\" and \"loss\" in the line");
      steps[(long long)v["step"]] = std::move(v);
    }
  }
  if (steps.empty()) throw dino::io_error("dino-eval: " + log + ": no steps logged");
  std::vector<double> x, loss, ent, kl;
  double lnk = NAN;
  for (auto& [s, v] : steps) {
    x.push_back(double(s));
    loss.push_back(v["loss"]);
    ent.push_back(v.count("teacher_entropy") ? v["teacher_entropy"] : NAN);
    kl.push_back(v.count("kl") ? v["kl"] : NAN);
    if (v.count("ln_k")) lnk = v["ln_k"];
  }
  std::vector<dino::io::series> series{binned("loss", x, loss, 1500), binned("teacher entropy", x, ent, 1500),
                                       binned("KL", x, kl, 1500)};
  // ln K, the loss of a collapsed (uniform) teacher, as a reference line when it does not squash the curves.
  double top = 0;
  for (const auto& s : series)
    for (double v : s.y) top = std::max(top, v);
  const bool show_lnk = std::isfinite(lnk) && top >= 0.5 * lnk;
  if (show_lnk) series.push_back({"ln K (collapse)", {x.front(), x.back()}, {lnk, lnk}});
  const std::string loss_png = in_dir(dir, "loss.png");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw dino::io_error("dino-eval: cannot create the folder '" + dir + "': " + ec.message());
  const std::size_t per = (x.size() + 1499) / 1500;
  char lnk_note[48] = "";
  if (std::isfinite(lnk) && !show_lnk) std::snprintf(lnk_note, sizeof lnk_note, ", ln K = %.2f", lnk);
  dino::io::plot_png(loss_png, "DINO training: " + fs::path(run).filename().string() +
                                   (per > 1 ? " (means of " + std::to_string(per) + " steps" + lnk_note + ")"
                                            : (*lnk_note ? std::string(" (") + (lnk_note + 2) + ")" : std::string())),
                     "step", "nats", series, 1000, 600);
  std::printf("dino-eval curves: %s: %zu steps (%lld to %lld), loss %.4f -> %.4f; wrote %s\n", log.c_str(), x.size(),
              (long long)x.front(), (long long)x.back(), loss.front(), loss.back(), loss_png.c_str());

  const std::string curve = in_dir(run, "knn_curve.jsonl");
  if (fs::exists(curve)) {
    std::map<std::string, std::map<double, double>> by_k;  // "k = 20" -> step -> top-1 %
    bool epochs = true;
    std::vector<std::map<std::string, double>> rows;
    std::ifstream in(curve);
    std::string line;
    while (std::getline(in, line)) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      rows.push_back(json_numbers(line));
      epochs = epochs && rows.back().count("epoch");
    }
    for (const auto& v : rows) {
      auto it = v.find(epochs ? "epoch" : "step");
      if (it == v.end()) continue;
      for (const auto& [k, val] : v)
        if (k.rfind("top1_k", 0) == 0) by_k["k = " + k.substr(6)][it->second] = 100 * val;
    }
    if (by_k.empty()) throw dino::io_error("dino-eval: " + curve + ": no \"top1_k<k>\" values");
    std::vector<dino::io::series> ks;
    for (const auto& [name, pts] : by_k) {
      dino::io::series s{name, {}, {}};
      for (const auto& [px, py] : pts) s.x.push_back(px), s.y.push_back(py);
      ks.push_back(std::move(s));
    }
    std::sort(ks.begin(), ks.end(), [](const auto& a, const auto& b) {
      return std::atoi(a.name.c_str() + 4) < std::atoi(b.name.c_str() + 4);
    });
    const std::string knn_png = in_dir(dir, "knn.png");
    dino::io::plot_png(knn_png, "weighted k-NN top-1: " + fs::path(run).filename().string(), epochs ? "epoch" : "step",
                       "top-1 accuracy (%)", ks, 1000, 600);
    std::printf("dino-eval curves: %s: %zu evaluations; wrote %s\n", curve.c_str(), rows.size(), knn_png.c_str());
  }
  return 0;
}

int run(int argc, char** argv) {
  auto f = make_flags();
  if (argc < 2) throw usage_error(std::string("no MODE given (") + kModes + ")");
  const std::string mode = argv[1];
  if (mode == "-h" || mode == "--help") {
    f.help(stdout);
    return 0;
  }
  if (mode.rfind("--", 0) == 0) throw usage_error("the MODE (" + std::string(kModes) + ") comes first, before " + mode);
  if (mode != "knn" && mode != "linear" && mode != "attention" && mode != "curves")
    throw usage_error("unknown mode '" + mode + "' (" + kModes + ")");
  if (!f.parse(argc, argv, 2)) return 0;
  if (mode == "knn") return mode_knn(f);
  if (mode == "linear") return mode_linear(f);
  if (mode == "attention") return mode_attention(f);
  return mode_curves(f);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const usage_error& e) {
    std::fprintf(stderr, "dino-eval: %s (see dino-eval --help)\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    std::fprintf(stderr, "%s%s\n", msg.rfind("dino-eval", 0) == 0 ? "" : "dino-eval: ", msg.c_str());
    return 1;
  }
}
