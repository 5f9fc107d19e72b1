// tests/support/attention_layout.hpp: packed attention inputs shared by the attention tests
// (tests/cuda/test_cuda_attention.cu on a GPU, tests/emu/test_simt_attention.cpp on the host
// SIMT emulation).
//
// make_attention_layout(lengths, heads, gap, reversed, store): segments of the given lengths
// back to back with `gap` unused rows after each, and the offsets of each segment's probs
// region (heads x n x n, or heads x n for attention_store::rows) and CLS rows (heads x n);
// reversed lays those regions out in reverse segment order.
// random_vector<T>(n, seed, lo, hi): n values uniform in [lo, hi) from Philox (seed, 0); the
// same arguments, the same values.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <dino/core/rng.hpp>
#include <dino/nn/attention.hpp>

namespace dino_test {

struct attention_layout {
  std::vector<dino::nn::segment> segs;
  std::vector<std::size_t> poff;       ///< each segment's probs region
  std::vector<std::int64_t> cls_off;   ///< each segment's CLS rows
  std::int64_t tokens = 0;             ///< rows of the packed token matrix, gaps included
  std::size_t probs = 0, cls = 0;      ///< elements of the probs and CLS buffers
  dino::nn::attention_store store = dino::nn::attention_store::matrix;  ///< what the probs regions hold
};

inline attention_layout make_attention_layout(const std::vector<std::int64_t>& lengths, std::int64_t heads,
                                              std::int64_t gap = 0, bool reversed = false,
                                              dino::nn::attention_store store = dino::nn::attention_store::matrix) {
  attention_layout L;
  L.store = store;
  for (std::int64_t n : lengths) {
    L.segs.push_back({L.tokens, n});
    L.tokens += n + gap;
  }
  const std::size_t ns = L.segs.size();
  L.poff.resize(ns);
  L.cls_off.resize(ns);
  std::size_t po = 0;
  std::int64_t co = 0;
  for (std::size_t k = 0; k < ns; ++k) {
    const std::size_t i = reversed ? ns - 1 - k : k;
    const std::int64_t n = L.segs[i].length;
    L.poff[i] = po;
    L.cls_off[i] = co;
    po += dino::nn::attention_probs_elems(heads, n, store);
    co += heads * n;
  }
  L.probs = po;
  L.cls = std::size_t(co);
  return L;
}

template <class T>
std::vector<T> random_vector(std::size_t n, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::vector<T> v(n);
  dino::philox rng(seed, 0);
  for (auto& x : v) x = static_cast<T>(lo + (hi - lo) * rng.uniform_double());
  return v;
}

}  // namespace dino_test
