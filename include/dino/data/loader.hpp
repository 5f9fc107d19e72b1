// dino/data/loader.hpp: a threaded multi-crop loader, the reference's DataLoader with
// DataAugmentationDINO (shuffle, drop_last) on std::threads.
//
//   data::multicrop_loader<Dataset> loader(ds, data::multicrop_imagenet(), {.batch_size = 64});
//   auto b = loader.next();   // blocks until the batch is ready
//   ssl::image_crops<float> x{b.global, b.local};
//
// Batches follow one another across epochs: epoch e has batches_per_epoch() = size / B
// batches (drop_last), batch i of epoch e holding samples perm_e[i * B .. i * B + B) of a
// Philox-keyed permutation (seed, epoch) of the dataset (the identity when shuffle is off).
// Each batch is
//   global   [n_global * B, C, G, G]   crop-major: row v * B + b is crop v of image b
//   local    [n_local * B, C, L, L]    (nullptr when n_local == 0), the same order
//   labels   [B]  the dataset's labels; samples [B]  the dataset indices
// the layout of ssl::image_crops. Crop v of sample s in epoch e is keyed (seed, e, s, v)
// (multicrop.hpp), so the same seed gives the same batches whatever the thread count.
//
// Worker threads take images one at a time and prefetch up to `prefetch` batches beyond the
// one the consumer holds, into prefetch + 1 batch buffers allocated at construction (nothing
// is allocated per batch beyond what the dataset's load() and the scratch growth need). The
// view next() returns stays valid until the following next() call, which hands its buffer
// back to the workers. An exception thrown while making a batch (a corrupt file, say) is
// rethrown by the next() that would have returned that batch; the following next() goes on
// with the batch after it. wait_seconds() is the time the consumer spent blocked in next(),
// work_seconds() the time workers spent loading and augmenting, summed over workers. The
// destructor stops and joins the workers. The dataset must outlive the loader, and its
// load() must be thread-safe (dino/data/image.hpp).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <utility>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/core/rng.hpp"
#include "dino/data/image.hpp"
#include "dino/data/multicrop.hpp"

namespace dino::data {

struct loader_config {
  std::int64_t batch_size = 64;
  int threads = 2;          ///< worker threads (>= 1)
  int prefetch = 2;         ///< batches made ahead of the one the consumer holds (>= 0)
  std::uint64_t seed = 0;   ///< permutations and augmentation
  bool shuffle = true;
  std::int64_t start_epoch = 0;  ///< where to start (resuming)
  std::int64_t start_batch = 0;  ///< batch within start_epoch to start at
};

/// One batch, as next() returns it: views into the loader's buffer, valid until the next next().
struct multicrop_batch {
  std::int64_t epoch = 0, index = 0;  ///< index: the batch within its epoch
  std::int64_t batch_size = 0, channels = 0, global_size = 0, local_size = 0;
  int n_global = 0, n_local = 0;
  const float* global = nullptr;          ///< [n_global * B, C, G, G]
  const float* local = nullptr;           ///< [n_local * B, C, L, L], nullptr when n_local == 0
  const int* labels = nullptr;            ///< [B]
  const std::int64_t* samples = nullptr;  ///< [B] dataset indices
};

/// The permutation of [0, n) used for `epoch`: Fisher-Yates driven by Philox (seed, epoch).
inline std::vector<std::int64_t> epoch_permutation(std::int64_t n, std::uint64_t seed, std::int64_t epoch) {
  std::vector<std::int64_t> p(static_cast<std::size_t>(n));
  std::iota(p.begin(), p.end(), std::int64_t(0));
  philox g(seed, rng_subsequence(rng_purpose_shuffle, static_cast<std::uint32_t>(epoch)));
  for (std::int64_t i = n - 1; i > 0; --i) {
    const double u = 1.0 - g.uniform_double();  // [0, 1)
    const std::int64_t j = std::min<std::int64_t>(static_cast<std::int64_t>(u * double(i + 1)), i);
    std::swap(p[std::size_t(i)], p[std::size_t(j)]);
  }
  return p;
}

template <dataset Dataset>
class multicrop_loader {
 public:
  multicrop_loader(const Dataset& ds, multicrop_config mc, loader_config lc)
      : ds_(ds), aug_(std::move(mc)), lc_(lc) {
    const std::int64_t n = ds_.size();
    require<config_error>(lc_.batch_size > 0, "multicrop_loader: batch_size must be positive, found ",
                          lc_.batch_size);
    require<config_error>(n >= lc_.batch_size, "multicrop_loader: the dataset's ", n,
                          " samples make no full batch of ", lc_.batch_size, " (drop_last)");
    require<config_error>(lc_.threads >= 1 && lc_.prefetch >= 0, "multicrop_loader: need threads >= 1 and prefetch >= 0, found ",
                          lc_.threads, " and ", lc_.prefetch);
    bpe_ = n / lc_.batch_size;
    require<config_error>(lc_.start_epoch >= 0 && lc_.start_batch >= 0 && lc_.start_batch < bpe_,
                          "multicrop_loader: start batch ", lc_.start_batch, " of epoch ", lc_.start_epoch,
                          " outside an epoch of ", bpe_, " batches");
    C_ = ds_.channels();
    aug_.check_channels(C_);
    first_ = lc_.start_epoch * bpe_ + lc_.start_batch;
    const auto& c = aug_.config();
    gsz_ = C_ * c.global_size * c.global_size;
    lsz_ = C_ * c.local_size * c.local_size;
    slots_.resize(static_cast<std::size_t>(lc_.prefetch) + 1);
    for (auto& s : slots_) {
      s.global.resize(static_cast<std::size_t>(c.n_global * lc_.batch_size * gsz_));
      s.local.resize(static_cast<std::size_t>(c.n_local * lc_.batch_size * lsz_));
      s.labels.resize(static_cast<std::size_t>(lc_.batch_size));
      s.samples.resize(static_cast<std::size_t>(lc_.batch_size));
    }
    workers_.reserve(static_cast<std::size_t>(lc_.threads));
    try {
      for (int i = 0; i < lc_.threads; ++i) workers_.emplace_back([this] { work(); });
    } catch (...) {
      shutdown();
      throw;
    }
  }
  multicrop_loader(const Dataset&&, multicrop_config, loader_config) = delete;  // would dangle
  multicrop_loader(const multicrop_loader&) = delete;
  multicrop_loader& operator=(const multicrop_loader&) = delete;
  ~multicrop_loader() { shutdown(); }

  std::int64_t batches_per_epoch() const { return bpe_; }
  std::int64_t batch_size() const { return lc_.batch_size; }
  const multicrop& augmentation() const { return aug_; }
  const loader_config& config() const { return lc_; }

  /// The next batch (blocking). Rethrows a worker's exception for that batch.
  multicrop_batch next() {
    const auto t0 = std::chrono::steady_clock::now();
    std::unique_lock lk(m_);
    if (current_ >= 0) {
      released_ = current_ + 1;
      cv_work_.notify_all();
    }
    const std::int64_t t = current_ + 1;
    slot& s = slots_[static_cast<std::size_t>(t % nslots())];
    cv_ready_.wait(lk, [&] { return s.batch == t && s.done == lc_.batch_size; });
    current_ = t;
    wait_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s.error) std::rethrow_exception(s.error);
    const auto& c = aug_.config();
    multicrop_batch b;
    b.epoch = (first_ + t) / bpe_;
    b.index = (first_ + t) % bpe_;
    b.batch_size = lc_.batch_size;
    b.channels = C_;
    b.global_size = c.global_size;
    b.local_size = c.local_size;
    b.n_global = c.n_global;
    b.n_local = c.n_local;
    b.global = s.global.data();
    b.local = c.n_local > 0 ? s.local.data() : nullptr;
    b.labels = s.labels.data();
    b.samples = s.samples.data();
    return b;
  }

  /// Seconds the consumer spent blocked in next().
  double wait_seconds() const {
    std::lock_guard lk(m_);
    return wait_s_;
  }
  /// Seconds workers spent loading and augmenting, summed over workers.
  double work_seconds() const {
    std::lock_guard lk(m_);
    return work_s_;
  }
  void reset_timers() {
    std::lock_guard lk(m_);
    wait_s_ = work_s_ = 0;
  }

 private:
  struct slot {
    std::vector<float> global, local;
    std::vector<int> labels;
    std::vector<std::int64_t> samples;
    std::int64_t batch = -1;  // batch number (relative to the start) it holds or is being filled with
    std::int64_t done = 0;    // images finished
    std::exception_ptr error;
  };

  std::int64_t nslots() const { return static_cast<std::int64_t>(slots_.size()); }

  // Called with m_ held.
  std::shared_ptr<const std::vector<std::int64_t>> permutation_for(std::int64_t epoch) {
    auto it = perms_.find(epoch);
    if (it != perms_.end()) return it->second;
    const std::int64_t oldest = (first_ + released_) / bpe_;
    for (auto e = perms_.begin(); e != perms_.end();) e = e->first < oldest ? perms_.erase(e) : std::next(e);
    auto p = std::make_shared<const std::vector<std::int64_t>>(epoch_permutation(ds_.size(), lc_.seed, epoch));
    perms_.emplace(epoch, p);
    return p;
  }

  void work() {
    image img;
    augment_scratch scratch;
    const std::int64_t B = lc_.batch_size;
    const auto& c = aug_.config();
    for (;;) {
      std::int64_t t = 0, b = 0;
      slot* s = nullptr;
      std::shared_ptr<const std::vector<std::int64_t>> perm;
      {
        std::unique_lock lk(m_);
        cv_work_.wait(lk, [&] { return stop_ || next_item_ / B < released_ + nslots(); });
        if (stop_) return;
        const std::int64_t item = next_item_++;
        t = item / B;
        b = item % B;
        s = &slots_[static_cast<std::size_t>(t % nslots())];
        if (b == 0) {
          s->batch = t;
          s->done = 0;
          s->error = nullptr;
        }
        if (lc_.shuffle) perm = permutation_for((first_ + t) / bpe_);
      }
      const auto t0 = std::chrono::steady_clock::now();
      std::exception_ptr err;
      try {
        const std::int64_t epoch = (first_ + t) / bpe_, pos = ((first_ + t) % bpe_) * B + b;
        const std::int64_t sample = perm ? (*perm)[static_cast<std::size_t>(pos)] : pos;
        ds_.load(sample, img);
        require<shape_error>(img.channels == C_ && img.height > 0 && img.width > 0, "multicrop_loader: sample ",
                             sample, " loaded as ", img.height, " x ", img.width, " x ", img.channels,
                             ", expected ", C_, " channels");
        const augment_key key{lc_.seed, static_cast<std::uint64_t>(epoch), static_cast<std::uint64_t>(sample)};
        for (int v = 0; v < aug_.n_crops(); ++v) {
          float* out = v < c.n_global ? s->global.data() + (v * B + b) * gsz_
                                      : s->local.data() + ((v - c.n_global) * B + b) * lsz_;
          aug_(img, key, v, out, scratch);
        }
        s->labels[static_cast<std::size_t>(b)] = ds_.label(sample);
        s->samples[static_cast<std::size_t>(b)] = sample;
      } catch (...) {
        err = std::current_exception();
      }
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::lock_guard lk(m_);
      work_s_ += dt;
      if (err && !s->error) s->error = err;
      if (++s->done == B) cv_ready_.notify_all();
    }
  }

  void shutdown() {
    {
      std::lock_guard lk(m_);
      stop_ = true;
    }
    cv_work_.notify_all();
    for (auto& w : workers_)
      if (w.joinable()) w.join();
    workers_.clear();
  }

  const Dataset& ds_;
  multicrop aug_;
  loader_config lc_;
  std::int64_t bpe_ = 0, C_ = 0, first_ = 0, gsz_ = 0, lsz_ = 0;
  std::vector<slot> slots_;
  std::map<std::int64_t, std::shared_ptr<const std::vector<std::int64_t>>> perms_;
  mutable std::mutex m_;
  std::condition_variable cv_work_, cv_ready_;
  std::int64_t next_item_ = 0, released_ = 0, current_ = -1;
  bool stop_ = false;
  double wait_s_ = 0, work_s_ = 0;
  std::vector<std::thread> workers_;
};

}  // namespace dino::data
