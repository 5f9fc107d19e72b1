// The CUDA attention over packed segments against its CPU twin (nn/attention.hpp): forward
// output, every P, the CLS rows and the backward's dqkv, for head dims 32, 64 and 128 (the
// exact paths), packs of one segment, of two groups of equal-length segments, of odd lengths
// (1, 2, 37, 197), with unused rows between segments and with probability/CLS blocks in
// reverse order (the layouts that split launches), in float and double; for head dims 1, 10,
// 24, 48 and 100 (the padded paths: HD 32, 32, 32, 64, 128) on 2 x 17 + 4 x 5 tokens, one
// 197-token segment and odd lengths; head dim 129 is refused. With a TF32 policy, the
// tensor-core forward (float, head dims 32/64/128, segments up to 256 tokens) on the same
// packs and on 256/257-token segments, within 5e-3 (TF32 keeps 10 mantissa bits: about 5e-4
// per rounded operand; scores of 64-term dot products of values in [-2, 2]); its backward
// (dP, dQ, dK, dV on tensor cores too) within 1e-2 on dqkv and dS. With a bf16 policy, the
// flash-style bf16 kernels (float, head dims 32/64/128, any length: 300 tokens too), in the
// probs layout of rows that vit packs plan for them (attention_store::rows) and in layouts that
// keep P (gaps, reversed): the forward within 4e-2 on out and the CLS rows, the rows' lse2 it
// keeps (instead of P) within 4e-2 of a double reference, and the backward (from that lse2 and
// the GPU's out) within 8e-2 on dqkv, the D = rowsum(dout o out) it leaves in the scratch (instead of dS) within 4e-2:
// bf16 keeps 7 mantissa bits, a rounding 8 times TF32's, so the TF32 bounds times 8 (the
// host emulation of these kernels, tests/emu/, measured at most 6.9e-3 on dqkv against the
// CPU's fp32); its out and dqkv are further from the CPU's than the TF32 kernels' (the bf16
// paths are the ones that ran); without keep_probs it (and the TF32 forward) leaves probs
// alone and gives the same out and CLS rows bit for bit; a NaN query makes its own row NaN
// and no other.
//
// Bounds, normwise (max |gpu - cpu| / max |cpu|, cuda_test_support.cuh), per quantity:
//   fp32    out, probs, CLS rows, dqkv, dS (scratch): 1e-5 each. Measured on the CPU, a float
//           emulation of the kernels' summation order (sequential FMA dot products, 32
//           lane partial sums) differs from the CPU float path by at most 6.5e-7 on out,
//           4e-7 on P and the CLS rows, 2e-7 on dS and 2.6e-7 on dqkv for these shapes;
//           a host emulation of the kernels themselves (padded head dims included) differs
//           by at most 1.1e-6 on any quantity.
//   double  1e-12 each.
#include <dino/nn/attention.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace dino::nn::cuda_attention_probe {
// Defined before the CUDA overloads are declared and called unqualified from dino::nn, as
// vit.hpp calls them: instantiated with a cuda_policy, lookup must find the CUDA backend.
template <class Pol, class T>
void forward_like_vit(const Pol& pol, std::int64_t heads, std::int64_t D, const std::vector<segment>& segs,
                      const std::vector<std::size_t>& poff, const T* qkv, T* o, T* probs, T* cls,
                      const std::int64_t* cls_off) {
  attention_forward(pol, heads, D, segs, poff, qkv, o, probs, cls, cls_off);
}
template <class Pol, class T>
void train_forward_like_vit(const Pol& pol, std::int64_t heads, std::int64_t D, const std::vector<segment>& segs,
                            const std::vector<std::size_t>& poff, T* qkv, T* o, T* probs) {
  attention_forward(pol, heads, D, segs, poff, static_cast<const T*>(qkv), o, probs);
}
template <class Pol, class T>
void backward_like_vit(const Pol& pol, std::int64_t heads, std::int64_t D, const std::vector<segment>& segs,
                       const std::vector<std::size_t>& poff, const T* qkv, const T* probs, const T* d_o, T* dqkv,
                       T* dP, const T* o) {
  attention_backward(pol, heads, D, segs, poff, qkv, probs, d_o, dqkv, dP, o);
}
}  // namespace dino::nn::cuda_attention_probe

#include "cuda_test_support.cuh"

using namespace dino_test;
using dino::cpu_policy;
using dino::nn::segment;
namespace probe = dino::nn::cuda_attention_probe;

namespace {

using pack = attention_layout;

/// The rows of a [tokens, cols] matrix that the segments cover, concatenated.
template <class T>
std::vector<T> segment_rows(const std::vector<T>& m, const pack& p, std::int64_t cols) {
  std::vector<T> r;
  for (const auto& s : p.segs)
    r.insert(r.end(), m.begin() + s.offset * cols, m.begin() + (s.offset + s.length) * cols);
  return r;
}

template <class T>
std::vector<T> nan_vector(std::size_t n) {
  return std::vector<T>(n, std::numeric_limits<T>::quiet_NaN());
}

// mode 1 (tf32): the policy asks for TF32, so the forward of float packs with head dims
// 32/64/128 and segments of at most 256 tokens runs on tensor cores (bound fwd_tf32_bound for
// out, P and the CLS rows); the backward is the same kernel either way. mode 2 (bf16): the
// bf16 policy, whose forward runs forward_bf16_kernel for float head dims 32/64/128 at any
// length (fwd_bf16_bound) and whose backward runs the bf16 backward kernels (bwd_bf16_bound).
constexpr double fwd_tf32_bound = 5e-3;
constexpr double bwd_tf32_bound = 1e-2;  // dS and dqkv: one more TF32 product after dP
constexpr double fwd_bf16_bound = 8 * fwd_tf32_bound;  // unit roundoff 2^-8 against TF32's 2^-11
constexpr double bwd_bf16_bound = 8 * bwd_tf32_bound;

enum mode { exact = 0, tf32_mode = 1, bf16_mode = 2 };
dino::cuda_policy policy_for(int m) { return m == bf16_mode ? gpu().policy(false, true) : gpu().policy(m == tf32_mode); }

struct errors {
  double out = 0, probs = 0, dqkv = 0, ds = 0;
};

template <class T>
errors check_attention(const pack& p, std::int64_t heads, std::int64_t D, std::uint64_t seed, int m = exact) {
  constexpr bool fp32 = std::is_same_v<T, float>;
  const double bound = fp32 ? 1e-5 : 1e-12;  // normwise, every quantity
  const bool tc = fp32 && m != exact;        // a tensor-core mode (double ignores it)
  const double fwd_bound = !tc ? bound : m == bf16_mode ? fwd_bf16_bound : fwd_tf32_bound;
  const double bwd_bound = !tc ? bound : m == bf16_mode ? bwd_bf16_bound : bwd_tf32_bound;
  errors e;
  const std::int64_t Tn = p.tokens;
  const auto qkv = random_vector<T>(std::size_t(Tn * 3 * D), seed, -2.0, 2.0);
  const auto dout = random_vector<T>(std::size_t(Tn * D), seed + 1);

  // CPU reference (P kept: for a GPU layout of rows, the CPU's own matrix offsets)
  const bool rows = p.store == dino::nn::attention_store::rows;
  const auto cpu_poff = rows ? dino::nn::detail::probs_offsets(p.segs, heads) : p.poff;
  const std::size_t cpu_probs = rows ? dino::nn::attention_probs_elems(p.segs, heads) : p.probs;
  auto out = nan_vector<T>(std::size_t(Tn * D)), probs = nan_vector<T>(cpu_probs), cls = nan_vector<T>(p.cls);
  dino::nn::attention_forward(cpu_policy{1}, heads, D, p.segs, cpu_poff, qkv.data(), out.data(), probs.data(),
                              cls.data(), p.cls_off.data());
  auto dqkv = nan_vector<T>(std::size_t(Tn * 3 * D)), dP = nan_vector<T>(cpu_probs);
  dino::nn::attention_backward(cpu_policy{1}, heads, D, p.segs, cpu_poff, qkv.data(), probs.data(), dout.data(),
                               dqkv.data(), dP.data());

  // The bf16 (flash) path keeps each row's lse2 at poff[segment] + h*n + i of probs (in a
  // layout of rows or of matrices) and leaves D = rowsum(dout o out) at the same places of the
  // scratch; their references in double, from the CPU's inputs and output.
  const std::int64_t hd = D / heads;
  const bool flash = fp32 && m == bf16_mode && (hd == 32 || hd == 64 || hd == 128);
  REQUIRE((flash || !rows));  // only the bf16 path takes a layout of rows
  std::vector<std::size_t> at;
  std::vector<T> lse_ref, D_ref;
  if (flash)
    for (std::size_t s = 0; s < p.segs.size(); ++s) {
      const std::int64_t n = p.segs[s].length, off = p.segs[s].offset;
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t i = 0; i < n; ++i) {
          at.push_back(p.poff[s] + std::size_t(h * n + i));
          std::vector<double> sc(static_cast<std::size_t>(n));
          double mx = -INFINITY, sum = 0, d = 0;
          for (std::int64_t j = 0; j < n; ++j) {
            double acc = 0;
            for (std::int64_t c = 0; c < hd; ++c)
              acc += double(qkv[std::size_t((off + i) * 3 * D + h * hd + c)]) *
                     double(qkv[std::size_t((off + j) * 3 * D + D + h * hd + c)]);
            sc[std::size_t(j)] = acc / std::sqrt(double(hd));
            mx = std::max(mx, sc[std::size_t(j)]);
          }
          for (double v : sc) sum += std::exp(v - mx);
          lse_ref.push_back(T((mx + std::log(sum)) / std::log(2.0)));
          for (std::int64_t c = 0; c < hd; ++c)
            d += double(dout[std::size_t((off + i) * D + h * hd + c)]) * double(out[std::size_t((off + i) * D + h * hd + c)]);
          D_ref.push_back(T(d));
        }
    }
  const auto gather = [&](const std::vector<T>& v) {
    std::vector<T> r;
    for (std::size_t k : at) r.push_back(v[k]);
    return r;
  };

  // GPU: outputs start as NaN, so an element never written fails
  auto d_qkv = upload(qkv), d_dout = upload(dout), d_probs_cpu = upload(probs);
  auto d_out = upload(nan_vector<T>(out.size())), d_probs = upload(nan_vector<T>(p.probs)),
       d_cls = upload(nan_vector<T>(std::max<std::size_t>(p.cls, 1)));
  auto d_dqkv = upload(nan_vector<T>(dqkv.size())), d_scratch = upload(nan_vector<T>(std::max<std::size_t>(p.probs, 1)));
  const dino::cuda_policy pol = policy_for(m);  // the first gpu() makes the context: count after it
  const auto allocs = dino::cuda::device_allocations();
  probe::forward_like_vit(pol, heads, D, p.segs, p.poff, static_cast<const T*>(d_qkv.data()), d_out.data(),
                          d_probs.data(), d_cls.data(), p.cls_off.data());
  // the backward from the CPU's P, so that it is checked on its own (the flash path: from the
  // GPU forward's lse2 and out, what it needs)
  probe::backward_like_vit(pol, heads, D, p.segs, p.poff, static_cast<const T*>(d_qkv.data()),
                           static_cast<const T*>(flash ? d_probs.data() : d_probs_cpu.data()),
                           static_cast<const T*>(d_dout.data()), d_dqkv.data(), d_scratch.data(),
                           static_cast<const T*>(d_out.data()));
  CHECK(dino::cuda::device_allocations() == allocs);  // nothing allocated by the calls

  {
    INFO("out");
    e.out = max_rel_error(segment_rows(download(d_out), p, D), segment_rows(out, p, D));
    DINO_CHECK_CLOSE(segment_rows(download(d_out), p, D), segment_rows(out, p, D), fwd_bound);
  }
  if (flash) {
    INFO("probs holds the rows' lse2");
    e.probs = max_rel_error(gather(download(d_probs)), lse_ref);
    DINO_CHECK_CLOSE(gather(download(d_probs)), lse_ref, fwd_bound);
  } else {
    INFO("probs");
    e.probs = max_rel_error(download(d_probs), probs);
    DINO_CHECK_CLOSE(download(d_probs), probs, fwd_bound);
  }
  {
    INFO("CLS rows");
    auto g = download(d_cls);
    g.resize(p.cls);
    DINO_CHECK_CLOSE(g, cls, fwd_bound);
  }
  {
    INFO("dqkv");
    e.dqkv = max_rel_error(segment_rows(download(d_dqkv), p, 3 * D), segment_rows(dqkv, p, 3 * D));
    DINO_CHECK_CLOSE(segment_rows(download(d_dqkv), p, 3 * D), segment_rows(dqkv, p, 3 * D), bwd_bound);
  }
  if (flash) {
    INFO("scratch holds D = rowsum(dout o out)");
    auto g = gather(download(d_scratch));
    e.ds = max_rel_error(g, D_ref);
    DINO_CHECK_CLOSE(g, D_ref, fwd_bound);
  } else {
    INFO("scratch holds dS");
    auto g = download(d_scratch);
    g.resize(p.probs);
    e.ds = max_rel_error(g, dP);
    DINO_CHECK_CLOSE(g, dP, bwd_bound);
  }
  return e;
}

/// A tensor-core mode on the layouts that split launches and on the paths it does not take.
void check_layouts(std::uint64_t& seed, int m) {
  check_attention<float>(make_attention_layout({9, 9, 9, 40, 40}, 3, 3, false), 3, 192, seed++, m);  // gaps
  check_attention<float>(make_attention_layout({9, 9, 9, 9}, 3, 0, true), 3, 192, seed++, m);       // reversed
  check_attention<float>(make_attention_layout({17, 5, 5}, 3, 0, false), 3, 30, seed++, m);         // padded: fp32 path
  check_attention<double>(make_attention_layout({37, 3}, 3), 3, 192, seed++, m);                     // double: fp64 path
}

/// The forward on qkv one float past a 16-byte boundary (the kernels stage element by element),
/// 3 heads of 64, against the CPU within `bound`.
void check_misaligned_forward(const std::vector<std::int64_t>& lengths, std::uint64_t seed, int m, double bound) {
  const std::int64_t heads = 3, D = 192;
  const pack p = make_attention_layout(lengths, heads);
  const auto qkv = random_vector<float>(std::size_t(p.tokens * 3 * D), seed, -2.0, 2.0);
  std::vector<float> out(std::size_t(p.tokens * D)), probs(p.probs);
  dino::nn::attention_forward(cpu_policy{1}, heads, D, p.segs, p.poff, qkv.data(), out.data(), probs.data());
  std::vector<float> shifted(qkv.size() + 1, 0.0f);
  std::copy(qkv.begin(), qkv.end(), shifted.begin() + 1);
  auto d_shift = upload(shifted);
  auto d_out = upload(nan_vector<float>(out.size())), d_probs = upload(nan_vector<float>(p.probs));
  probe::train_forward_like_vit(policy_for(m), heads, D, p.segs, p.poff, d_shift.data() + 1, d_out.data(),
                                d_probs.data());
  DINO_CHECK_CLOSE(download(d_out), out, bound);
  if (m != bf16_mode) DINO_CHECK_CLOSE(download(d_probs), probs, bound);  // bf16 keeps lse2 (check_attention)
}

struct head_case {
  std::int64_t heads, D;
};
constexpr head_case head_cases[] = {{2, 64}, {3, 192}, {2, 256}};  // head dims 32, 64, 128
// padded paths: head dims 1, 10 (the tiny ViT of the golden test), 24, 48, 100
constexpr head_case padded_head_cases[] = {{3, 3}, {3, 30}, {4, 96}, {2, 96}, {2, 200}};

}  // namespace

TEST_CASE("cuda attention: one segment, two groups of equal lengths, odd lengths (head dims 32, 64, 128)") {
  const std::vector<std::vector<std::int64_t>> packs = {
      {197}, {17, 17, 17, 5, 5, 5, 5, 5}, {1}, {2}, {37}, {1, 2, 37, 197}, {33, 32, 31, 64, 65}};
  std::uint64_t seed = 100;
  for (const auto& hc : head_cases)
    for (const auto& lengths : packs) {
      CAPTURE(hc.D / hc.heads);
      CAPTURE(lengths.size());
      CAPTURE(lengths.front());
      const pack p = make_attention_layout(lengths, hc.heads);
      check_attention<float>(p, hc.heads, hc.D, seed++);
    }
}

TEST_CASE("cuda attention: gaps between segments and reversed probability/CLS layouts split launches") {
  std::uint64_t seed = 200;
  for (const auto& hc : head_cases) {
    CAPTURE(hc.D / hc.heads);
    check_attention<float>(make_attention_layout({9, 9, 9, 9}, hc.heads, 0, true), hc.heads, hc.D, seed++);
    check_attention<float>(make_attention_layout({9, 9, 9, 40, 40}, hc.heads, 3, false), hc.heads, hc.D, seed++);
    check_attention<float>(make_attention_layout({5, 5, 0, 5, 70}, hc.heads, 0, false), hc.heads, hc.D, seed++);
  }
}

TEST_CASE("cuda attention in double matches the CPU to rounding") {
  std::uint64_t seed = 300;
  for (const auto& hc : head_cases) {
    CAPTURE(hc.D / hc.heads);
    check_attention<double>(make_attention_layout({37, 37, 3, 3, 3}, hc.heads), hc.heads, hc.D, seed++);
    check_attention<double>(make_attention_layout({70}, hc.heads), hc.heads, hc.D, seed++);
  }
}

TEST_CASE("cuda attention: the training call without CLS rows, and DINO-sized groups") {
  // 2 crops of 197 tokens then 10 of 37 (ViT-S/16: 6 heads of 64)
  const std::int64_t heads = 6, D = 384;
  std::vector<std::int64_t> lengths(2, 197);
  lengths.insert(lengths.end(), 10, 37);
  const pack p = make_attention_layout(lengths, heads);
  const auto qkv = random_vector<float>(std::size_t(p.tokens * 3 * D), 400, -2.0, 2.0);
  std::vector<float> out(std::size_t(p.tokens * D)), probs(p.probs);
  dino::nn::attention_forward(cpu_policy{2}, heads, D, p.segs, p.poff, qkv.data(), out.data(), probs.data());
  auto d_qkv = upload(qkv), d_out = upload(nan_vector<float>(out.size())), d_probs = upload(nan_vector<float>(p.probs));
  probe::train_forward_like_vit(gpu().policy(), heads, D, p.segs, p.poff, d_qkv.data(), d_out.data(), d_probs.data());
  DINO_CHECK_CLOSE(download(d_out), out, 1e-5);
  DINO_CHECK_CLOSE(download(d_probs), probs, 1e-5);
  check_attention<float>(p, heads, D, 401);
}

TEST_CASE("cuda attention: head dims other than 32, 64, 128 run padded to the next of them") {
  const std::vector<std::vector<std::int64_t>> packs = {{17, 17, 5, 5, 5, 5}, {197}, {1, 2, 37}};
  std::uint64_t seed = 500;
  for (const auto& hc : padded_head_cases)
    for (const auto& lengths : packs) {
      CAPTURE(hc.D / hc.heads);
      CAPTURE(lengths.size());
      CAPTURE(lengths.front());
      check_attention<float>(make_attention_layout(lengths, hc.heads), hc.heads, hc.D, seed++);
    }
  for (const auto& hc : padded_head_cases) {
    CAPTURE(hc.D / hc.heads);  // launches split by gaps and reversed layouts
    check_attention<float>(make_attention_layout({9, 9, 9, 40, 40}, hc.heads, 3, false), hc.heads, hc.D, seed++);
    check_attention<float>(make_attention_layout({9, 9, 9, 9}, hc.heads, 0, true), hc.heads, hc.D, seed++);
  }
}

TEST_CASE("cuda attention in double with a padded head dim (10) matches the CPU to rounding") {
  const std::int64_t heads = 3, D = 30;
  check_attention<double>(make_attention_layout({17, 17, 5, 5, 5, 5}, heads), heads, D, 600);
  check_attention<double>(make_attention_layout({197}, heads), heads, D, 601);
}

TEST_CASE("cuda attention with TF32: the tensor-core forward within TF32 rounding, other shapes on the fp32 path") {
  const std::vector<std::vector<std::int64_t>> packs = {
      {197}, {17, 17, 17, 5, 5, 5, 5, 5}, {1}, {2}, {37}, {1, 2, 37, 197}, {256}, {257}, {63, 64, 65}};
  std::uint64_t seed = 700;
  for (const auto& hc : head_cases)
    for (const auto& lengths : packs) {
      CAPTURE(hc.D / hc.heads);
      CAPTURE(lengths.size());
      CAPTURE(lengths.front());
      const errors e = check_attention<float>(make_attention_layout(lengths, hc.heads), hc.heads, hc.D, seed++, true);
      if (lengths.size() == 1 && lengths[0] == 197)
        MESSAGE("TF32, one segment of 197, head dim " << hc.D / hc.heads << ": normwise errors out " << e.out
                                                      << ", P " << e.probs << ", dqkv " << e.dqkv << ", dS " << e.ds);
    }
  check_layouts(seed, tf32_mode);

  check_misaligned_forward({50, 10, 10}, 798, tf32_mode, fwd_tf32_bound);  // element-wise staging

  // The tensor-core path is the one that ran: its output is not the fp32 kernel's bit for bit
  // (TF32 rounds the operands), and it is close to it.
  const std::int64_t heads = 6, D = 384;
  const pack p = make_attention_layout({197, 197, 37}, heads);
  const auto qkv = random_vector<float>(std::size_t(p.tokens * 3 * D), 799, -2.0, 2.0);
  auto d_qkv = upload(qkv);
  std::vector<std::vector<float>> outs;
  for (bool tf32 : {false, true}) {
    auto d_out = upload(nan_vector<float>(std::size_t(p.tokens * D))), d_probs = upload(nan_vector<float>(p.probs));
    probe::train_forward_like_vit(gpu().policy(tf32), heads, D, p.segs, p.poff, d_qkv.data(), d_out.data(),
                                  d_probs.data());
    outs.push_back(download(d_out));
  }
  double diff = 0;
  for (std::size_t i = 0; i < outs[0].size(); ++i) diff = std::max(diff, double(std::fabs(outs[0][i] - outs[1][i])));
  MESSAGE("TF32 against fp32 attention output, max |difference|: " << diff);
  CHECK(diff > 0.0);
  DINO_CHECK_CLOSE(outs[1], outs[0], fwd_tf32_bound);
}

TEST_CASE("cuda attention with bf16: the flash-style forward and the backward on bf16 tensor cores, at any length") {
  const std::vector<std::vector<std::int64_t>> packs = {
      {197}, {17, 17, 17, 5, 5, 5, 5, 5}, {1}, {2}, {37}, {1, 2, 37, 197}, {256}, {257}, {63, 64, 65}, {300}};
  std::uint64_t seed = 900;
  for (const auto& hc : head_cases)
    for (const auto& lengths : packs) {
      CAPTURE(hc.D / hc.heads);
      CAPTURE(lengths.size());
      CAPTURE(lengths.front());
      // the layout of rows that vit packs planned for this path have (attention_store_for)
      const pack p = make_attention_layout(lengths, hc.heads, 0, false, dino::nn::attention_store::rows);
      const errors e = check_attention<float>(p, hc.heads, hc.D, seed, bf16_mode);
      if (lengths.size() == 1 && lengths[0] == 197) {
        // the bf16 kernel is the one that ran: further from the CPU than the TF32 kernel
        const errors t = check_attention<float>(make_attention_layout(lengths, hc.heads), hc.heads, hc.D, seed, tf32_mode);
        MESSAGE("bf16, one segment of 197, head dim " << hc.D / hc.heads << ": normwise errors out " << e.out
                                                      << ", lse2 " << e.probs << ", dqkv " << e.dqkv << ", D " << e.ds
                                                      << " (TF32: out " << t.out << ", P " << t.probs << ", dqkv "
                                                      << t.dqkv << ", dS " << t.ds << ")");
        CHECK(e.out > t.out);
        CHECK(e.dqkv > t.dqkv);
      }
      ++seed;
    }
  check_layouts(seed, bf16_mode);  // layouts that keep P (gaps, reversed blocks) serve the bf16 path too

  check_misaligned_forward({50, 10, 70}, 998, bf16_mode, fwd_bf16_bound);  // element-wise staging

  const std::int64_t heads = 6, D = 384;
  const pack p = make_attention_layout({197, 197, 37, 37}, heads);
  const auto qkv = random_vector<float>(std::size_t(p.tokens * 3 * D), 999, -2.0, 2.0);
  const dino::cuda_policy pol = policy_for(bf16_mode);
  for (const int m : {int(bf16_mode), int(tf32_mode)}) {  // inference (keep_probs false), both tensor-core forwards:
    CAPTURE(m);                                          // P left alone, the same out and CLS rows as with P kept
    auto d_qkv = upload(qkv);
    std::vector<std::vector<float>> outs, clss, probss;
    for (bool keep : {true, false}) {
      auto d_out = upload(nan_vector<float>(std::size_t(p.tokens * D))), d_probs = upload(nan_vector<float>(p.probs)),
           d_cls = upload(nan_vector<float>(p.cls));
      dino::cuda::attention_forward(policy_for(m), heads, D, p.segs, p.poff, static_cast<const float*>(d_qkv.data()),
                                    d_out.data(), d_probs.data(), d_cls.data(), p.cls_off.data(), keep);
      outs.push_back(download(d_out));
      clss.push_back(download(d_cls));
      probss.push_back(download(d_probs));
    }
    CHECK(outs[0] == outs[1]);  // bit for bit (no NaN: every row is written)
    CHECK(clss[0] == clss[1]);
    CHECK(std::all_of(probss[1].begin(), probss[1].end(), [](float v) { return std::isnan(v); }));
    if (m == tf32_mode)  // P kept whole; the bf16 path keeps the rows' lse2 only
      CHECK(std::none_of(probss[0].begin(), probss[0].end(), [](float v) { return std::isnan(v); }));
    else
      CHECK(!std::isnan(probss[0][p.poff[1] + 1]));
  }
  {  // a NaN query: its row of its head is NaN, every other output finite
    auto bad = qkv;
    const std::int64_t tok = 3, h = 2, hd = D / heads;  // token 3 of the first segment, head 2
    bad[std::size_t(tok * 3 * D + h * hd + 5)] = std::numeric_limits<float>::quiet_NaN();
    auto d_qkv = upload(bad);
    auto d_out = upload(nan_vector<float>(std::size_t(p.tokens * D))), d_probs = upload(nan_vector<float>(p.probs));
    probe::train_forward_like_vit(pol, heads, D, p.segs, p.poff, d_qkv.data(), d_out.data(), d_probs.data());
    const auto out = download(d_out);
    for (std::int64_t t = 0; t < p.tokens; ++t)
      for (std::int64_t c = 0; c < D; ++c) {
        const bool expect_nan = t == tok && c / hd == h;
        if (std::isnan(out[std::size_t(t * D + c)]) != expect_nan) {
          FAIL_CHECK("token " << t << " column " << c << (expect_nan ? " should be NaN" : " should be finite"));
          t = p.tokens;
          break;
        }
      }
  }
}

TEST_CASE("cuda attention refuses head dims over 128") {
  const pack p = make_attention_layout({5}, 2);
  const std::int64_t D = 2 * 129;  // 2 heads of 129
  dino::cuda::device_buffer<float> qkv(5 * 3 * D), out(5 * D), probs(p.probs), dqkv(5 * 3 * D);
  const dino::cuda_policy pol = gpu().policy();
  CHECK_THROWS_AS(dino::cuda::attention_forward(pol, 2, D, p.segs, p.poff, static_cast<const float*>(qkv.data()),
                                                out.data(), probs.data()),
                  dino::shape_error);
  CHECK_THROWS_AS(dino::cuda::attention_backward(pol, 2, D, p.segs, p.poff, static_cast<const float*>(qkv.data()),
                                                 static_cast<const float*>(probs.data()),
                                                 static_cast<const float*>(out.data()), dqkv.data(), probs.data()),
                  dino::shape_error);
  const pack p1 = make_attention_layout({5}, 1);
  CHECK_THROWS_AS(dino::cuda::attention_forward(pol, 1, 129, p1.segs, p1.poff, static_cast<const float*>(qkv.data()),
                                                out.data(), probs.data()),
                  dino::shape_error);  // one head of 129
}
