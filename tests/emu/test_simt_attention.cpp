// The bf16 tensor-core attention kernels (policy/cuda/attention_bf16.cuh), their very code,
// run on the CPU through the host SIMT emulation of tests/emu/simt.hpp, against double
// references built from the same bf16-rounded operands:
//   forward: the rows' lse2 (what training keeps) and the CLS rows within 1e-5 and 1e-4
//     normwise (the scores are exact products of bf16 values summed in fp32, the softmax is
//     fp32); out within 1e-2 (P V rounds the unnormalised P to bf16, 2^-9 relative per term),
//     and within the GPU test's 4e-2 of the CPU's fp32 attention (nn/attention.hpp);
//   backward (rows, then columns, from the forward's lse2 and out): D = rowsum(dO o O) in the
//     scratch within 1e-5; dqkv within 2e-3 of the reference that rounds P and dS to bf16
//     where the kernels do (a value a hair from a rounding boundary may round the other way:
//     a bf16 step on a few terms), and within 4e-2 of the CPU's fp32 backward.
// Head dims 32, 64 and 128; lengths 1, 2, 37 (one partial chunk), 64, 65, 97, 130 (chunk
// edges, three chunks), several segments, float4 and element-wise staging; segments grouped
// into launches by the dispatch's own attn::for_each_group, in a probs layout of n floats per
// (segment, head) (attention_store::rows) and in one that keeps P; without keep_probs
// (inference) nothing is written to probs and out and the CLS rows are the same bits; a NaN
// query makes its own row NaN and no other. An indexing, masking or fragment mistake in a
// kernel shows as an O(1) error. This checks the kernels against the PTX layouts as simt.hpp
// states them; the GPU test (tests/cuda/test_cuda_attention.cu) checks the hardware.
#define DINO_ATTN_BF16_HOST_PRIMITIVES
#include "simt.hpp"

#include <dino/nn/attention.hpp>
#include <dino/policy/cuda/attention_bf16.cuh>

#include "attention_layout.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using dino::nn::segment;
namespace attn = dino::cuda::detail::attn;

using dino_test::make_attention_layout;
using dino_test::random_vector;
using layout = dino_test::attention_layout;

float bf16_round(float f) { return emu_bf16_bits_to_float(emu_float_to_bf16_bits(f)); }

struct result {
  std::vector<float> out, probs, cls;  // probs: the rows' lse2 at poff[segment] + h*n
};

/// Calls launch(g, count) for each launch of the bf16 path over the layout's segments, grouped
/// as forward_hd and backward_hd group them (attn::for_each_group), g filled from `base`.
template <class F>
void for_each_launch(const layout& L, attn::group<float> base, bool cls, F&& launch) {
  attn::for_each_group(base.heads, L.segs, L.poff, cls ? L.cls_off.data() : nullptr, true,
                       [&](std::size_t a, std::int64_t count, std::int64_t pstride) {
                         attn::group<float> g = base;
                         g.n = L.segs[a].length;
                         g.row0 = L.segs[a].offset;
                         g.poff0 = std::int64_t(L.poff[a]);
                         g.pstride = pstride;
                         g.cls0 = cls ? L.cls_off[a] : 0;
                         g.tiles = (g.n + attn::bf::qrows - 1) / attn::bf::qrows;
                         launch(g, count);
                       });
}

/// forward_bf16_kernel<HD> over the layout, launched as forward_hd launches it.
template <int HD>
result run_kernel(const layout& L, std::int64_t heads, const std::vector<float>& qkv, bool keep, bool vec) {
  const std::int64_t D = heads * HD;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  result r{std::vector<float>(std::size_t(L.tokens * D), nan), std::vector<float>(L.probs, nan),
           std::vector<float>(L.cls, nan)};
  const attn::group<float> base{qkv.data(), nullptr, r.out.data(), r.probs.data(), r.cls.data(), nullptr, nullptr, D,
                                heads, HD, 0, 0, 0, 0, 0, float(1.0 / std::sqrt(double(HD)))};
  for_each_launch(L, base, true, [&](const attn::group<float>& g, std::int64_t count) {
    simt::launch(unsigned(count * g.tiles), unsigned(heads), [&] { attn::forward_bf16_kernel<HD>(g, keep, vec); });
  });
  return r;
}

/// The double reference from bf16-rounded Q, K, V: P = softmax(Q K^T / sqrt(hd)), out = P V,
/// lse2_i = log2 sum_j exp2(s_ij scale log2(e)) at poff[segment] + h*n + i of probs (the rest
/// NaN, as the kernel leaves it).
result reference(const layout& L, std::int64_t heads, std::int64_t hd, const std::vector<float>& qkv) {
  const std::int64_t D = heads * hd;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  result r{std::vector<float>(std::size_t(L.tokens * D)), std::vector<float>(L.probs, nan), std::vector<float>(L.cls)};
  const double scale = 1.0 / std::sqrt(double(hd));
  for (std::size_t s = 0; s < L.segs.size(); ++s) {
    const std::int64_t n = L.segs[s].length, off = L.segs[s].offset;
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < n; ++i) {
        std::vector<double> p(static_cast<std::size_t>(n));
        double mx = -INFINITY;
        for (std::int64_t j = 0; j < n; ++j) {
          double acc = 0;
          for (std::int64_t d = 0; d < hd; ++d)
            acc += double(bf16_round(qkv[std::size_t((off + i) * 3 * D + h * hd + d)])) *
                   double(bf16_round(qkv[std::size_t((off + j) * 3 * D + D + h * hd + d)]));
          p[std::size_t(j)] = acc * scale;
          mx = std::max(mx, p[std::size_t(j)]);
        }
        double sum = 0;
        for (auto& v : p) sum += (v = std::exp(v - mx));
        r.probs[L.poff[s] + std::size_t(h * n + i)] = float((mx + std::log(sum)) / std::log(2.0));
        for (std::int64_t j = 0; j < n; ++j)
          if (i == 0) r.cls[std::size_t(L.cls_off[s] + h * n + j)] = float(p[std::size_t(j)] / sum);
        for (std::int64_t d = 0; d < hd; ++d) {
          double acc = 0;
          for (std::int64_t j = 0; j < n; ++j)
            acc += p[std::size_t(j)] / sum * double(bf16_round(qkv[std::size_t((off + j) * 3 * D + 2 * D + h * hd + d)]));
          r.out[std::size_t((off + i) * D + h * hd + d)] = float(acc);
        }
      }
  }
  return r;
}

double normwise(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0, scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(double(a[i]) - double(b[i]));
    if (!(d <= worst)) worst = d;  // NaN fails
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return scale > 0 ? worst / scale : worst;
}

/// normwise over the elements where b is a number; a and b must be NaN at the same places.
double nan_aware_normwise(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  std::vector<float> x, y;
  for (std::size_t i = 0; i < a.size(); ++i) {
    REQUIRE(std::isnan(a[i]) == std::isnan(b[i]));
    if (!std::isnan(b[i])) {
      x.push_back(a[i]);
      y.push_back(b[i]);
    }
  }
  return normwise(x, y);
}

using store = dino::nn::attention_store;

template <int HD>
void check(const std::vector<std::int64_t>& lengths, std::int64_t heads, std::uint64_t seed, bool vec,
           store st = store::rows) {
  CAPTURE(HD);
  CAPTURE(lengths.front());
  CAPTURE(vec);
  CAPTURE(st == store::rows);
  const std::int64_t D = heads * HD;
  const layout L = make_attention_layout(lengths, heads, 0, false, st);
  const layout M = make_attention_layout(lengths, heads);  // the CPU's (P kept)
  const auto qkv = random_vector<float>(std::size_t(L.tokens * 3 * D), seed, -2.0, 2.0);
  const result k = run_kernel<HD>(L, heads, qkv, true, vec);
  const result ref = reference(L, heads, HD, qkv);
  const double e_out = normwise(k.out, ref.out), e_cls = normwise(k.cls, ref.cls);
  const double e_lse = nan_aware_normwise(k.probs, ref.probs);
  MESSAGE("head dim " << HD << ", n " << lengths.front() << ": normwise from the rounded reference: out " << e_out
                      << ", lse2 " << e_lse << ", CLS " << e_cls);
  CHECK(e_out <= 1e-2);
  CHECK(e_lse <= 1e-5);
  CHECK(e_cls <= 1e-4);

  std::vector<float> out32(std::size_t(M.tokens * D)), probs32(M.probs);  // the CPU's fp32 attention
  dino::nn::attention_forward(dino::cpu_policy{1}, heads, D, M.segs, M.poff, qkv.data(), out32.data(), probs32.data());
  CHECK(normwise(k.out, out32) <= 4e-2);

  // inference: P untouched, out and CLS rows the same bits
  const result inf = run_kernel<HD>(L, heads, qkv, false, vec);
  CHECK(inf.out == k.out);
  CHECK(inf.cls == k.cls);
  CHECK(std::all_of(inf.probs.begin(), inf.probs.end(), [](float v) { return std::isnan(v); }));
}

}  // namespace

struct grads {
  std::vector<float> dqkv, ds;
};

/// The backward kernels over the layout, as backward_hd launches them, from the forward's
/// probs (lse2) and out.
template <int HD>
grads run_backward(const layout& L, std::int64_t heads, const std::vector<float>& qkv, const result& fwd,
                   const std::vector<float>& dout, bool vec) {
  const std::int64_t D = heads * HD;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  grads r{std::vector<float>(std::size_t(L.tokens * 3 * D), nan), std::vector<float>(L.probs, nan)};
  const attn::group<float> base{qkv.data(), dout.data(), const_cast<float*>(fwd.out.data()),
                                const_cast<float*>(fwd.probs.data()), nullptr, r.dqkv.data(), r.ds.data(), D, heads, HD,
                                0, 0, 0, 0, 0, float(1.0 / std::sqrt(double(HD)))};
  for_each_launch(L, base, false, [&](const attn::group<float>& g, std::int64_t count) {
    simt::launch(unsigned(count * g.tiles), unsigned(heads), [&] { attn::backward_rows_bf16_kernel<HD>(g, vec); });
    simt::launch(unsigned(count * g.tiles), unsigned(heads), [&] { attn::backward_cols_bf16_kernel<HD>(g, vec); });
  });
  return r;
}

/// The double reference of the backward with the kernels' roundings, from the kernel forward's
/// lse2 and out: P = exp2(s c - lse2) (s from bf16 Q, K), dP from bf16 dO, V, D = rowsum(dO o O),
/// dS = P (dP - D); dQ, dK, dV from bf16-rounded dS, P, Q, K, dO. ds receives D at
/// poff[segment] + h*n + i (the rest NaN, as the kernels leave it).
grads reference_backward(const layout& L, std::int64_t heads, std::int64_t hd, const std::vector<float>& qkv,
                         const result& fwd, const std::vector<float>& dout) {
  const std::int64_t D = heads * hd;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  grads r{std::vector<float>(std::size_t(L.tokens * 3 * D), 0.0f), std::vector<float>(L.probs, nan)};
  const double scale = 1.0 / std::sqrt(double(hd)), c = double(float(scale) * 1.4426950408889634f);
  const auto b = [](float v) { return double(bf16_round(v)); };
  for (std::size_t s = 0; s < L.segs.size(); ++s) {
    const std::int64_t n = L.segs[s].length, off = L.segs[s].offset;
    for (std::int64_t h = 0; h < heads; ++h) {
      const auto q = [&](std::int64_t i, std::int64_t d) { return qkv[std::size_t((off + i) * 3 * D + h * hd + d)]; };
      const auto k = [&](std::int64_t i, std::int64_t d) { return qkv[std::size_t((off + i) * 3 * D + D + h * hd + d)]; };
      const auto v = [&](std::int64_t i, std::int64_t d) { return qkv[std::size_t((off + i) * 3 * D + 2 * D + h * hd + d)]; };
      const auto o = [&](std::int64_t i, std::int64_t d) { return dout[std::size_t((off + i) * D + h * hd + d)]; };
      const auto O = [&](std::int64_t i, std::int64_t d) { return fwd.out[std::size_t((off + i) * D + h * hd + d)]; };
      const std::size_t blk = L.poff[s] + std::size_t(h * n);
      std::vector<double> P(static_cast<std::size_t>(n * n)), ds(static_cast<std::size_t>(n * n));
      for (std::int64_t i = 0; i < n; ++i) {
        double Di = 0;
        for (std::int64_t d = 0; d < hd; ++d) Di += double(o(i, d)) * double(O(i, d));
        r.ds[blk + std::size_t(i)] = float(Di);
        const double lse = double(fwd.probs[blk + std::size_t(i)]);
        for (std::int64_t j = 0; j < n; ++j) {
          double sij = 0, dp = 0;
          for (std::int64_t d = 0; d < hd; ++d) {
            sij += b(q(i, d)) * b(k(j, d));
            dp += b(o(i, d)) * b(v(j, d));
          }
          const double p = std::exp2(sij * c - lse);
          P[std::size_t(i * n + j)] = p;
          ds[std::size_t(i * n + j)] = p * (dp - Di);
        }
      }
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t d = 0; d < hd; ++d) {
          double gq = 0, gk = 0, gv = 0;
          for (std::int64_t j = 0; j < n; ++j) {
            gq += b(float(ds[std::size_t(i * n + j)])) * b(k(j, d));
            gk += b(float(ds[std::size_t(j * n + i)])) * b(q(j, d));
            gv += b(float(P[std::size_t(j * n + i)])) * b(o(j, d));
          }
          r.dqkv[std::size_t((off + i) * 3 * D + h * hd + d)] = float(gq * scale);
          r.dqkv[std::size_t((off + i) * 3 * D + D + h * hd + d)] = float(gk * scale);
          r.dqkv[std::size_t((off + i) * 3 * D + 2 * D + h * hd + d)] = float(gv);
        }
    }
  }
  return r;
}

template <int HD>
void check_backward(const std::vector<std::int64_t>& lengths, std::int64_t heads, std::uint64_t seed, bool vec,
                    store st = store::rows) {
  CAPTURE(HD);
  CAPTURE(lengths.front());
  CAPTURE(vec);
  CAPTURE(st == store::rows);
  const std::int64_t D = heads * HD;
  const layout L = make_attention_layout(lengths, heads, 0, false, st);
  const layout M = make_attention_layout(lengths, heads);  // the CPU's (P kept)
  const auto qkv = random_vector<float>(std::size_t(L.tokens * 3 * D), seed, -2.0, 2.0);
  const auto dout = random_vector<float>(std::size_t(L.tokens * D), seed + 1000);
  std::vector<float> out32(std::size_t(M.tokens * D)), probs(M.probs), dqkv32(std::size_t(M.tokens * 3 * D)),
      ds32(M.probs);
  const dino::cpu_policy cpu{1};
  dino::nn::attention_forward(cpu, heads, D, M.segs, M.poff, qkv.data(), out32.data(), probs.data());
  dino::nn::attention_backward(cpu, heads, D, M.segs, M.poff, qkv.data(), probs.data(), dout.data(), dqkv32.data(),
                               ds32.data());
  const result fwd = run_kernel<HD>(L, heads, qkv, true, vec);
  const grads k = run_backward<HD>(L, heads, qkv, fwd, dout, vec);
  const grads ref = reference_backward(L, heads, HD, qkv, fwd, dout);
  const double e_d = nan_aware_normwise(k.ds, ref.ds), e_g = normwise(k.dqkv, ref.dqkv), e_32 = normwise(k.dqkv, dqkv32);
  MESSAGE("backward, head dim " << HD << ", n " << lengths.front() << ": normwise D " << e_d << ", dqkv " << e_g
                                << " from the rounded reference, dqkv " << e_32 << " from the CPU's fp32");
  CHECK(e_d <= 1e-5);
  CHECK(e_g <= 2e-3);
  CHECK(e_32 <= 4e-2);
}

TEST_CASE("emulated bf16 attention kernel: one segment per launch, chunk edges, head dims 32, 64, 128") {
  std::uint64_t seed = 1;
  for (std::int64_t n : {1, 2, 37, 64, 65, 130}) check<32>({n}, 2, seed++, true);
  check<32>({37}, 1, seed++, false);  // element-wise staging
  for (std::int64_t n : {17, 197}) check<64>({n}, 1, seed++, true);
  check<128>({70}, 1, seed++, true);
  check<32>({5, 40, 3}, 2, seed++, true);  // several segments, one launch each
  check<32>({37, 37, 37, 5}, 2, seed++, true);                // a group of three in one launch (rows layout)
  check<32>({37, 37, 37, 5}, 2, seed++, true, store::matrix);  // the same in a layout that keeps P
}

TEST_CASE("emulated bf16 attention kernel: a NaN query makes its own row NaN and no other") {
  constexpr int HD = 32;
  const std::int64_t heads = 2, D = heads * HD, tok = 3, h = 1;
  const layout L = make_attention_layout({40}, heads);
  auto qkv = random_vector<float>(std::size_t(L.tokens * 3 * D), 77, -2.0, 2.0);
  qkv[std::size_t(tok * 3 * D + h * HD + 5)] = std::numeric_limits<float>::quiet_NaN();
  const result k = run_kernel<HD>(L, heads, qkv, true, true);
  for (std::int64_t t = 0; t < L.tokens; ++t)
    for (std::int64_t c = 0; c < D; ++c) {
      const bool expect_nan = t == tok && c / HD == h;
      CHECK_MESSAGE(std::isnan(k.out[std::size_t(t * D + c)]) == expect_nan, "token " << t << " column " << c);
    }
  const std::int64_t n = L.tokens;  // lse2 of head h's rows at h*n
  CHECK(std::isnan(k.probs[std::size_t(h * n + tok)]));
  CHECK(!std::isnan(k.probs[std::size_t(h * n + tok + 1)]));
}

TEST_CASE("emulated bf16 attention backward kernels: chunk edges, head dims 32, 64, 128") {
  std::uint64_t seed = 100;
  for (std::int64_t n : {1, 2, 37, 64, 65, 130}) check_backward<32>({n}, 2, seed++, true);
  check_backward<32>({37}, 1, seed++, false);  // element-wise staging
  check_backward<64>({97}, 1, seed++, true);
  check_backward<64>({17}, 2, seed++, true);
  check_backward<128>({40}, 1, seed++, true);
  check_backward<32>({5, 40, 3}, 2, seed++, true);  // several segments
  check_backward<32>({37, 37, 37, 5}, 2, seed++, true);                // a group of three (rows layout)
  check_backward<32>({37, 37, 37, 5}, 2, seed++, true, store::matrix);  // in a layout that keeps P
}
