// The Vision Transformer over packed multi-crop batches: every parameter gradient against
// central differences in double (a pack of two resolutions, one of them non-square and
// interpolated, DropPath on; and the same with token dropping, crops that keep some of their
// patches), activation checkpointing against keeping every block's activations (the same
// bits), inference against the training forward, the optional outputs, a masked pack
// against the shortened patch sequence, the position-grid resize, presets and errors.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include <dino/dino.hpp>
#include <dino/nn/vit.hpp>

#include "gradcheck.hpp"

using namespace dino;
using dino_test::dot;
using dino_test::fd_gradient;
using dino_test::fill_normal;
using dino_test::rel_error;

namespace {
using crop_set_t = nn::crop_set;
nn::vit_config tiny(double drop = 0.0) {
  nn::vit_config c;
  c.img_size = 8;
  c.patch = 2;
  c.in_chans = 2;
  c.embed_dim = 8;
  c.depth = 2;
  c.heads = 2;
  c.drop_path_rate = drop;
  return c;
}

template <class T>
void perturb(flat_params<T>& P, std::uint64_t seed, double scale) {
  for (const auto& e : P.layout().entries()) {
    std::vector<double> noise(e.numel());
    fill_normal(noise, seed + e.offset, scale);
    for (std::size_t i = 0; i < e.numel(); ++i) P.data()[e.offset + i] += T(noise[i]);
  }
}

// tiny(0.5) at depth 3 with n blocks checkpointed and pointwise recomputation rp.
nn::vit_config tiny3(std::int64_t n, bool rp) {
  nn::vit_config c = tiny(0.5);
  c.depth = 3;
  c.checkpoint_blocks = n;
  c.recompute_pointwise = rp;
  return c;
}
// The kept patches of the masked two-set pack {{2, 8, 8, 9}, {3, 4, 6, 4}}.
std::int64_t pk_tokens(const nn::vit& v, const std::vector<nn::crop_set>& sets) { return v.make_pack<float>(sets).tokens; }
template <class Pack>
void keep_some(Pack& pk) {
  pk.keep[0] = {0, 2, 3, 5, 7, 8, 11, 13, 15, /**/ 1, 4, 5, 6, 9, 10, 12, 14, 15};
  pk.keep[1] = {0, 1, 3, 5, /**/ 1, 2, 3, 4, /**/ 0, 2, 4, 5};
}

// The tiny ViT with its parameters initialised (seed) and perturbed (seed + 1) by N(0, 0.3^2).
template <class T>
struct tiny_model {
  param_layout L;
  nn::vit v;
  flat_params<T> P;
  tiny_model(double drop, std::uint64_t seed) : v(tiny(drop), L), P(L) {
    nn::initialize(P, seed);
    perturb(P, seed + 1, 0.3);
  }
};
}  // namespace

TEST_CASE("vit: parameter names, shapes, flags and presets") {
  param_layout L;
  nn::vit v(tiny(), L);
  CHECK(L.at("patch_embed.proj.weight").shape == shape{8, 2, 2, 2});
  CHECK(L.at("cls_token").shape == shape{1, 1, 8});
  CHECK(L.at("pos_embed").shape == shape{1, 17, 8});
  CHECK(L.at("blocks.1.attn.qkv.weight").shape == shape{24, 8});
  CHECK(L.at("blocks.0.mlp.fc1.weight").shape == shape{32, 8});
  CHECK(L.at("norm.bias").shape == shape{8});
  CHECK((L.at("blocks.0.norm1.weight").flags & param_no_weight_decay) != 0);
  CHECK((L.at("cls_token").flags & param_no_weight_decay) == 0);  // 3-D: decayed, as the reference
  param_layout S;
  nn::vit small(nn::vit_small(16), S);
  CHECK(S.numel() == 21665664);  // timm's vit_small_patch16_224 without classifier
  param_layout B;
  nn::vit base(nn::vit_base(16), B);
  CHECK(B.numel() == 85798656);
  static_assert(nn::vit_small28().grid() == 7);
  param_layout E;
  CHECK_THROWS_AS(nn::vit(nn::vit_config{30, 16}, E), config_error);
  auto pk = small.make_pack<float>({{2, 224, 224}, {4, 96, 96}});
  CHECK(pk.tokens == 2 * 197 + 4 * 37);
  CHECK(pk.crops == 6);
  CHECK_THROWS_WITH_AS(small.make_pack<float>({{1, 100, 96}}),
                       "vit pack: crop set 0: 100 x 96 pixels is not a multiple of the patch size 16", shape_error);
}

TEST_CASE("position grid resize: PyTorch's bicubic with the +0.1 scale offset") {
  // 4 -> 2 along an axis: scale (2 + 0.1) / 4, src = (i + 0.5) / scale - 0.5
  auto ax = nn::bicubic_taps<double>(4, 2, 2.1 / 4.0);
  const double src0 = 0.5 / (2.1 / 4.0) - 0.5;  // 0.452...
  const double t = src0 - std::floor(src0);
  const double A = -0.75;
  auto cc1 = [&](double x) { return ((A + 2) * x - (A + 3)) * x * x + 1; };
  auto cc2 = [&](double x) { return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A; };
  CHECK(ax.index[0] == 0);  // floor(src) - 1 = -1, clamped
  CHECK(ax.index[1] == 0);
  CHECK(ax.index[2] == 1);
  CHECK(ax.index[3] == 2);
  CHECK(ax.weight[0] == doctest::Approx(cc2(t + 1)));
  CHECK(ax.weight[1] == doctest::Approx(cc1(t)));
  CHECK(ax.weight[2] == doctest::Approx(cc1(1 - t)));
  CHECK(ax.weight[3] == doctest::Approx(cc2(2 - t)));
  double wsum = 0;
  for (int a = 0; a < 4; ++a) wsum += ax.weight[std::size_t(a)];
  CHECK(wsum == doctest::Approx(1.0));
  // the stored grid is used as it is when the grid is square and the same size
  CHECK(nn::pos_resize<float>(14, 14, 14).identity);
  CHECK_FALSE(nn::pos_resize<float>(14, 6, 6).identity);
  CHECK_FALSE(nn::pos_resize<float>(4, 2, 8).identity);  // same count, not square: resized
  // a constant grid stays constant
  nn::pos_resize<double> r(4, 3, 5);
  std::vector<double> grid(16 * 2, 0.7), out(15 * 2);
  r.forward(grid.data(), out.data(), 2);
  for (double v : out) CHECK(v == doctest::Approx(0.7));
}

TEST_CASE("vit: every gradient against central differences (two resolutions, DropPath, dropped tokens)") {
  for (int variant : {0, 1, 2}) {
    const double drop = variant ? 0.5 : 0.0;
    const bool masked = variant == 2;
    CAPTURE(drop);
    CAPTURE(masked);
    tiny_model<double> m(drop, 3);
    const param_layout& L = m.L;
    const nn::vit& v = m.v;
    flat_params<double>& P = m.P;
    flat_params<double> G(L);
    // set 0: 2 crops of 8 x 8 (the stored 4 x 4 grid); set 1: 3 crops of 4 x 6 (2 x 3, resized);
    // masked: set 0 keeps 9 of 16 patches, set 1 4 of 6 (each crop its own)
    auto pk = masked ? v.make_pack<double>({{2, 8, 8, 9}, {3, 4, 6, 4}}) : v.make_pack<double>({{2, 8, 8}, {3, 4, 6}});
    if (masked) {
      pk.keep[0] = {0, 2, 3, 5, 7, 8, 11, 13, 15, /**/ 1, 4, 5, 6, 9, 10, 12, 14, 15};
      pk.keep[1] = {0, 1, 3, 5, /**/ 1, 2, 3, 4, /**/ 0, 2, 4, 5};
      CHECK(pk.tokens == 2 * 10 + 3 * 5);
    }
    std::vector<double> img0(2 * 2 * 8 * 8), img1(3 * 2 * 4 * 6);
    fill_normal(img0, 5);
    fill_normal(img1, 6);
    const double* imgs[2] = {img0.data(), img1.data()};
    const std::int64_t D = 8, n = pk.crops, Tn = pk.tokens;
    std::vector<double> R(std::size_t(n * D)), R2(std::size_t(Tn * D)), y(std::size_t(n * D)), saved(v.saved_elems(pk));
    fill_normal(R, 7);
    fill_normal(R2, 8);
    const cpu_policy pol{2};
    auto Pv = [&] { return host_view<const double>{P.data(), {std::int64_t(P.size())}, "P"}; };
    auto f = [&] {
      std::vector<double> yy(std::size_t(n * D)), ss(v.saved_elems(pk));
      v.forward(pol, Pv(), pk, std::span<const double* const>(imgs, 2), host_view<double>{yy.data(), {n, D}, "y"},
                host_view<double>{ss.data(), {std::int64_t(ss.size())}, "saved"}, 11, 3);
      const double* tok = v.saved_tokens(pk, host_view<const double>{ss.data(), {std::int64_t(ss.size())}, "saved"});
      return dot(yy.data(), R.data(), yy.size()) + dot(tok, R2.data(), R2.size());
    };
    v.forward(pol, Pv(), pk, std::span<const double* const>(imgs, 2), host_view<double>{y.data(), {n, D}, "y"},
              host_view<double>{saved.data(), {std::int64_t(saved.size())}, "saved"}, 11, 3);
    std::vector<double> dtok(std::size_t(Tn * D)), scratch(v.scratch_elems(pk));
    v.scatter_cls_grad(pk, R.data(), dtok.data());
    for (std::size_t i = 0; i < dtok.size(); ++i) dtok[i] += R2[i];
    for (std::size_t i = 0; i < G.size(); ++i) G.data()[i] = 0.25;  // gradients accumulate
    v.backward(pol, Pv(), pk, host_view<const double>{saved.data(), {std::int64_t(saved.size())}, "saved"},
               host_view<const double>{dtok.data(), {Tn, D}, "dtok"},
               host_view<double>{G.data(), {std::int64_t(G.size())}, "G"},
               host_view<double>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
    for (const auto& e : L.entries()) {
      std::vector<double> ga(e.numel());
      for (std::size_t i = 0; i < e.numel(); ++i) ga[i] = G.data()[e.offset + i] - 0.25;
      auto gf = fd_gradient(f, P.data() + e.offset, e.numel());
      CHECK_MESSAGE(rel_error(ga, gf) < 1e-6, e.name << " rel error " << rel_error(ga, gf));
    }
  }
}

TEST_CASE("vit: activation checkpointing and pointwise recomputation give the same bits with less saved memory") {
  for (bool masked : {false, true}) {
    CAPTURE(masked);
    // depth 3, DropPath on: checkpoint 0 (reference), 1, 2 and all 3 blocks; then the
    // LayerNorm and GELU outputs recomputed, alone and with 1 or 3 blocks checkpointed
    std::vector<float> y0, tok0, g0;
    std::size_t saved0 = 0, saved_ckpt1 = 0;
    const std::pair<std::int64_t, bool> runs[] = {{0, false}, {1, false}, {2, false}, {3, false},
                                                  {0, true},  {1, true},  {3, true}};
    for (const auto& [n, rp] : runs) {
      CAPTURE(n);
      CAPTURE(rp);
      param_layout L;
      nn::vit v(tiny3(n, rp), L);
      flat_params<float> P(L), G(L);
      nn::initialize(P, 21);
      perturb(P, 22, 0.3);
      auto pk = masked ? v.make_pack<float>({{2, 8, 8, 9}, {3, 4, 6, 4}}) : v.make_pack<float>({{2, 8, 8}, {3, 4, 6}});
      if (masked) keep_some(pk);
      std::vector<float> img0(2 * 2 * 8 * 8), img1(3 * 2 * 4 * 6);
      fill_normal(img0, 5);
      fill_normal(img1, 6);
      const float* imgs[2] = {img0.data(), img1.data()};
      const std::int64_t D = 8, nc = pk.crops, Tn = pk.tokens;
      std::vector<float> y(std::size_t(nc * D)), saved(v.saved_elems(pk), std::nanf("")), dtok(std::size_t(Tn * D)),
          scratch(v.scratch_elems(pk));
      const cpu_policy pol{2};
      host_view<const float> Pv{P.data(), {std::int64_t(P.size())}, "P"};
      v.forward(pol, Pv, pk, std::span<const float* const>(imgs, 2), host_view<float>{y.data(), {nc, D}, "y"},
                host_view<float>{saved.data(), {std::int64_t(saved.size())}, "saved"}, 11, 3);
      const float* tok = v.saved_tokens(pk, host_view<const float>{saved.data(), {std::int64_t(saved.size())}, "s"});
      std::vector<float> tokens(tok, tok + Tn * D);
      fill_normal(dtok, 9);
      v.backward(pol, Pv, pk, host_view<const float>{saved.data(), {std::int64_t(saved.size())}, "saved"},
                 host_view<const float>{dtok.data(), {Tn, D}, "dtok"},
                 host_view<float>{G.data(), {std::int64_t(G.size())}, "G"},
                 host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
      std::vector<float> g(G.data(), G.data() + G.size());
      if (n == 0) {
        y0 = y, tok0 = tokens, g0 = g, saved0 = saved.size();
        continue;
      }
      CHECK(y == y0);
      CHECK(tokens == tok0);
      CHECK(g == g0);
      const std::size_t pointwise = std::size_t(Tn * (2 * D + 4 * D));  // a, c [T, D] and g [T, 4D]
      if (rp) {
        // one shared area instead of one per block: (depth - 1) areas fewer without checkpointing,
        // fewer with 1 checkpointed block too, nothing gained when all blocks are recomputed
        if (n == 0) CHECK(saved0 - v.saved_elems(pk) == 2 * pointwise);
        if (n == 1) CHECK(saved_ckpt1 - v.saved_elems(pk) == pointwise);
        if (n == 3) CHECK(v.saved_elems(pk) < saved0);
        continue;
      }
      if (n == 1) saved_ckpt1 = v.saved_elems(pk);
      // each checkpointed block keeps its input and DropPath scales instead of all its activations
      const std::size_t per_block = (saved0 - v.saved_elems(pk)) / std::size_t(n < 3 ? n : n - 1);
      CHECK(v.saved_elems(pk) < saved0);
      CHECK((saved0 - v.saved_elems(pk)) % std::size_t(n < 3 ? n : n - 1) == 0);
      CHECK(per_block > std::size_t(Tn * (3 * D + 2 * 4 * D)));  // at least a, qkv and the MLP's h and g per token
    }
  }
  param_layout L;
  nn::vit_config c = tiny();
  c.checkpoint_blocks = 3;  // depth 2
  CHECK_THROWS_AS(nn::vit(c, L), config_error);
}

TEST_CASE("vit: bf16 operands in memory (bf16_operands) give the bits of the bf16 products, trained and inferred") {
  // A pack planned for cpu_policy::bf16_operands against one planned for plain bf16 products:
  // the training forward and backward (pointwise recomputation on, with 0, 1 and all 3 blocks
  // checkpointed, masked and not, DropPath on) and inference with every optional output must
  // be the same bits. Without recompute_pointwise the training forward keeps the fp32 path
  // (its a, c and g are read by the backward) and only inference changes.
  const cpu_policy plain{2, true};
  cpu_policy ops = plain;
  ops.bf16_operands = true;
  for (bool masked : {false, true})
    for (const auto& [n, rp] : std::vector<std::pair<std::int64_t, bool>>{{0, true}, {1, true}, {3, true}, {0, false}}) {
      CAPTURE(masked);
      CAPTURE(n);
      CAPTURE(rp);
      param_layout L;
      nn::vit v(tiny3(n, rp), L);
      flat_params<float> P(L);
      nn::initialize(P, 31);
      perturb(P, 32, 0.3);
      std::vector<crop_set_t> sets = masked ? std::vector<crop_set_t>{{2, 8, 8, 9}, {3, 4, 6, 4}}
                                            : std::vector<crop_set_t>{{2, 8, 8}, {3, 4, 6}};
      std::vector<float> img0(2 * 2 * 8 * 8), img1(3 * 2 * 4 * 6);
      fill_normal(img0, 15);
      fill_normal(img1, 16);
      const float* imgs[2] = {img0.data(), img1.data()};
      struct result {
        std::vector<float> y, tokens, g, yi, toki, attn, inter;
        std::size_t saved = 0, tail_written = 0, infer_tail_written = 0;
      };
      const auto run = [&](const cpu_policy& pol) {
        auto pk = v.make_pack(pol, sets);
        if (masked) keep_some(pk);
        const std::int64_t D = 8, nc = pk.crops, Tn = pk.tokens;
        result r;
        r.saved = v.saved_elems(pk);
        flat_params<float> G(L);
        std::vector<float> saved(r.saved, std::nanf("")), dtok(std::size_t(Tn * D)), scratch(v.scratch_elems(pk));
        r.y.resize(std::size_t(nc * D));
        host_view<const float> Pv{P.data(), {std::int64_t(P.size())}, "P"};
        v.forward(pol, Pv, pk, std::span<const float* const>(imgs, 2), host_view<float>{r.y.data(), {nc, D}, "y"},
                  host_view<float>{saved.data(), {std::int64_t(saved.size())}, "saved"}, 11, 3);
        const float* tok = v.saved_tokens(pk, host_view<const float>{saved.data(), {std::int64_t(saved.size())}, "s"});
        r.tokens.assign(tok, tok + Tn * D);
        // what the forward wrote past the plain pack's saved size (the weights' bf16 copies)
        const std::size_t plain_saved = v.saved_elems(v.make_pack<float>(sets));
        for (std::size_t i = plain_saved; i < saved.size(); ++i) r.tail_written += !std::isnan(saved[i]);
        fill_normal(dtok, 19);
        v.backward(pol, Pv, pk, host_view<const float>{saved.data(), {std::int64_t(saved.size())}, "saved"},
                   host_view<const float>{dtok.data(), {Tn, D}, "dtok"},
                   host_view<float>{G.data(), {std::int64_t(G.size())}, "G"},
                   host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
        r.g.assign(G.data(), G.data() + G.size());
        std::vector<float> iscratch(v.infer_scratch_elems(pk), std::nanf(""));
        r.yi.resize(std::size_t(nc * D));
        r.toki.resize(std::size_t(Tn * D));
        r.attn.resize(v.cls_attention_elems(pk));
        r.inter.resize(std::size_t(2 * Tn * D));
        nn::vit::infer_outputs<float> out{r.toki.data(), r.attn.data(), 2, r.inter.data()};
        v.infer(pol, Pv, pk, std::span<const float* const>(imgs, 2), host_view<float>{r.yi.data(), {nc, D}, "y"},
                host_view<float>{iscratch.data(), {std::int64_t(iscratch.size())}, "scratch"}, out);
        // what inference wrote past the plain pack's scratch (its bf16 operands and weights)
        for (std::size_t i = v.infer_scratch_elems(v.make_pack<float>(sets)); i < iscratch.size(); ++i)
          r.infer_tail_written += !std::isnan(iscratch[i]);
        return r;
      };
      const result a = run(plain), b = run(ops);
      CHECK(b.y == a.y);
      CHECK(b.tokens == a.tokens);
      CHECK(b.g == a.g);
      CHECK(b.yi == a.yi);
      CHECK(b.toki == a.toki);
      CHECK(b.attn == a.attn);
      CHECK(b.inter == a.inter);
      // inference took the bf16 path: its operand areas (a alone is T D / 2 floats) were written
      CHECK(b.infer_tail_written > std::size_t(pk_tokens(v, sets) * 8 / 2));
      if (rp) {  // the training forward took the bf16 path: its weight area was written
        CHECK(b.saved > a.saved);
        CHECK(b.tail_written > 0);
      } else {
        CHECK(b.saved == a.saved);
      }
    }
  // a pack planned for bf16 operands refuses a policy whose products are fp32
  param_layout L;
  nn::vit v(tiny(), L);
  flat_params<float> P(L);
  nn::initialize(P, 1);
  cpu_policy ops1{1, true};
  ops1.bf16_operands = true;
  auto pk = v.make_pack(ops1, std::vector<crop_set_t>{{1, 8, 8}});
  CHECK(pk.bf16_operands);
  CHECK_FALSE(v.make_pack(cpu_policy{1, false}, std::vector<crop_set_t>{{1, 8, 8}}).bf16_operands);
  std::vector<float> img(2 * 64), y(8), scratch(v.infer_scratch_elems(pk));
  const float* imgs[1] = {img.data()};
  CHECK_THROWS_AS(v.infer(cpu_policy{1}, host_view<const float>{P.data(), {std::int64_t(P.size())}, "P"}, pk,
                          std::span<const float* const>(imgs, 1), host_view<float>{y.data(), {1, 8}, "y"},
                          host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"}),
                  config_error);
}

namespace {
double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}
}  // namespace

TEST_CASE("vit: bf16 GEMM operands (cpu_policy::bf16) stay within bf16's bounds of fp32, then DINO steps") {
  // bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2 %). The embedding, every linear
  // layer and the head round their GEMM operands; LayerNorm, softmax, GELU, the loss and
  // the optimizer stay fp32. Bounds: 4x and 6x the errors measured on this model (output
  // 0.37 %, gradient 0.49 %); the lower bounds show the bf16 path really ran.
  nn::vit_config c = tiny(0.2);
  c.embed_dim = 32;
  c.heads = 2;
  param_layout L;
  nn::vit v(c, L);
  flat_params<float> P(L);
  nn::initialize(P, 31);
  perturb(P, 32, 0.1);
  auto pk = v.make_pack<float>({{2, 8, 8}, {3, 4, 6}});
  std::vector<float> img0(2 * 2 * 8 * 8), img1(3 * 2 * 4 * 6);
  fill_normal(img0, 7);
  fill_normal(img1, 8);
  const float* imgs[2] = {img0.data(), img1.data()};
  const std::int64_t D = c.embed_dim, nc = pk.crops, Tn = pk.tokens;
  std::vector<float> dtok(std::size_t(Tn * D));
  fill_normal(dtok, 9);
  host_view<const float> Pv{P.data(), {std::int64_t(P.size())}, "P"};
  auto run = [&](const cpu_policy& pol, std::vector<float>& y, std::vector<float>& g) {
    flat_params<float> G(L);
    y.assign(std::size_t(nc * D), 0.0f);
    std::vector<float> saved(v.saved_elems(pk)), scratch(v.scratch_elems(pk));
    v.forward(pol, Pv, pk, std::span<const float* const>(imgs, 2), host_view<float>{y.data(), {nc, D}, "y"},
              host_view<float>{saved.data(), {std::int64_t(saved.size())}, "saved"}, 11, 3);
    v.backward(pol, Pv, pk, host_view<const float>{saved.data(), {std::int64_t(saved.size())}, "saved"},
               host_view<const float>{dtok.data(), {Tn, D}, "dtok"},
               host_view<float>{G.data(), {std::int64_t(G.size())}, "G"},
               host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
    g.assign(G.data(), G.data() + G.size());
  };
  std::vector<float> y32, g32, y16, g16, y16b, g16b;
  run(cpu_policy{2}, y32, g32);
  run(cpu_policy{2, true}, y16, g16);
  run(cpu_policy{1, true}, y16b, g16b);
  const double ey = rel_l2(y16, y32), eg = rel_l2(g16, g32);
  MESSAGE("bf16 against fp32: output ", ey, ", gradient ", eg, " (relative L2)");
  CHECK(ey < 1.5e-2);
  CHECK(eg < 3e-2);
  CHECK(ey > 1e-4);
  CHECK(eg > 1e-4);
  CHECK(y16 == y16b);  // the same bits for any thread count
  CHECK(g16 == g16b);

  // DINO steps on the ViT: the same start and data, fp32 against bf16. Loss, teacher and
  // student stay close; the master weights, the optimizer and the EMA are fp32 either way.
  nn::vit_config vc = tiny(0.1);
  vc.in_chans = 1;
  vc.embed_dim = 16;
  ssl::dino_config dc;
  dc.head.out_dim = 64;
  dc.head.hidden_dim = 32;
  dc.head.bottleneck_dim = 16;
  dc.local_crops = 3;
  dc.train.max_batch = 4;
  dc.train.crops = {8, 4};
  dc.train.schedule.epochs = 2;
  dc.train.schedule.iters_per_epoch = 4;
  dc.train.schedule.warmup_epochs = 0;
  dc.train.schedule.lr = 0.002;
  auto m32 = ssl::make_dino<nn::vit>(vc, vc.embed_dim, dc);
  auto m16 = ssl::make_dino<nn::vit>(vc, vc.embed_dim, dc);
  // The loss is compared at the first and the last step only: in between, AdamW's first
  // updates (g / sqrt(v): a full lr step for any component, however small) turn bf16's
  // absolute rounding of the small gradient components into lr-sized differences, and the
  // centred teacher softmax at tau 0.04 magnifies them (step 2 differed by 8 %, step 6 by
  // 0.2 %; an fp32 run from a start perturbed by 0.2 % differed by 0.6 % at step 2).
  std::vector<float> gi(4 * 2 * 64), li(4 * 3 * 16);
  double first = 0, last = 0;
  for (int it = 0; it < 6; ++it) {
    fill_normal(gi, 300 + std::uint64_t(it));
    fill_normal(li, 400 + std::uint64_t(it));
    const auto a = m32.step(cpu_policy{2}, ssl::image_crops<float>{gi.data(), li.data()});
    const auto b = m16.step(cpu_policy{2, true}, ssl::image_crops<float>{gi.data(), li.data()});
    REQUIRE_FALSE(b.skipped);
    (it == 0 ? first : last) = std::fabs(b.loss - a.loss) / std::fabs(a.loss);
  }
  const std::vector<float> s32(m32.student().data(), m32.student().data() + m32.student().size()),
      s16(m16.student().data(), m16.student().data() + m16.student().size()),
      t32(m32.teacher().data(), m32.teacher().data() + m32.teacher().size()),
      t16(m16.teacher().data(), m16.teacher().data() + m16.teacher().size());
  MESSAGE("DINO steps, bf16 against fp32: loss at step 1 ", first, ", at step 6 ", last, "; after 6 steps student ",
          rel_l2(s16, s32), ", teacher ", rel_l2(t16, t32));
  CHECK(first < 1e-2);
  CHECK(first > 0);
  CHECK(last < 3e-2);
  CHECK(rel_l2(s16, s32) < 1e-2);
  CHECK(rel_l2(t16, t32) < 2e-4);
}

TEST_CASE("vit: inference equals the training forward without DropPath; optional outputs") {
  tiny_model<float> m(0.0, 9);
  const nn::vit& v = m.v;
  const flat_params<float>& P = m.P;
  auto pk = v.make_pack<float>({{2, 8, 8}, {2, 6, 4}});
  std::vector<float> img0(2 * 2 * 64), img1(2 * 2 * 24);
  fill_normal(img0, 12);
  fill_normal(img1, 13);
  const float* imgs[2] = {img0.data(), img1.data()};
  const std::int64_t D = 8, n = pk.crops, Tn = pk.tokens;
  const cpu_policy pol{2};
  host_view<const float> Pv{P.data(), {std::int64_t(P.size())}, "P"};
  std::vector<float> y1(std::size_t(n * D)), y2(y1.size()), saved(v.saved_elems(pk)), scratch(v.infer_scratch_elems(pk));
  v.forward(pol, Pv, pk, std::span<const float* const>(imgs, 2), host_view<float>{y1.data(), {n, D}, "y"},
            host_view<float>{saved.data(), {std::int64_t(saved.size())}, "saved"});
  std::vector<float> tokens(std::size_t(Tn * D)), attn(v.cls_attention_elems(pk)), inter(std::size_t(2 * Tn * D));
  nn::vit::infer_outputs<float> out{tokens.data(), attn.data(), 2, inter.data()};
  v.infer(pol, Pv, pk, std::span<const float* const>(imgs, 2), host_view<float>{y2.data(), {n, D}, "y"},
          host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"}, out);
  for (std::size_t i = 0; i < y1.size(); ++i) REQUIRE(y2[i] == doctest::Approx(y1[i]).epsilon(1e-5));
  const float* tok = v.saved_tokens(pk, host_view<const float>{saved.data(), {std::int64_t(saved.size())}, "s"});
  for (std::size_t i = 0; i < tokens.size(); ++i) REQUIRE(tokens[i] == doctest::Approx(tok[i]).epsilon(1e-5));
  // the last intermediate layer, normalised, is the final output
  for (std::size_t i = 0; i < tokens.size(); ++i) REQUIRE(inter[std::size_t(Tn * D) + i] == doctest::Approx(tokens[i]));
  // each CLS attention row is a distribution over its own crop's tokens
  for (std::size_t c = 0; c < pk.segs.size(); ++c)
    for (std::int64_t h = 0; h < 2; ++h) {
      double s = 0;
      for (std::int64_t j = 0; j < pk.segs[c].length; ++j) s += attn[std::size_t(pk.cls_attn_off[c] + h * pk.segs[c].length + j)];
      CHECK(s == doctest::Approx(1.0).epsilon(1e-5));
    }
  CHECK_THROWS_AS(v.infer(pol, Pv, pk, std::span<const float* const>(imgs, 1), host_view<float>{y2.data(), {n, D}, "y"},
                          host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"}),
                  shape_error);
}

TEST_CASE("vit: a crop set that keeps some patches equals the ViT on the shortened patch sequence") {
  // With zero position embeddings a token does not know where its patch was: the kept patches
  // of an 8 x 8 crop, laid side by side as a 2 x 2k strip, must give the same tokens.
  tiny_model<double> m(0.0, 21);
  const nn::vit& v = m.v;
  flat_params<double>& P = m.P;
  const auto& pe = m.L.at("pos_embed");
  std::fill(P.data() + pe.offset, P.data() + pe.offset + pe.numel(), 0.0);
  const std::int64_t C = 2, D = 8, k = 5;
  std::vector<double> img(2 * C * 64), strip(2 * C * 2 * 2 * k);
  fill_normal(img, 23);
  auto pk = v.make_pack<double>({{2, 8, 8, k}});
  pk.keep[0] = {1, 2, 6, 9, 15, /**/ 0, 3, 4, 10, 14};
  for (std::int64_t c = 0; c < 2; ++c)
    for (std::int64_t t = 0; t < k; ++t) {
      const std::int64_t patch = pk.keep[0][std::size_t(c * k + t)], i = patch / 4, j = patch % 4;
      for (std::int64_t ch = 0; ch < C; ++ch)
        for (std::int64_t di = 0; di < 2; ++di)
          for (std::int64_t dj = 0; dj < 2; ++dj)
            strip[std::size_t(((c * C + ch) * 2 + di) * 2 * k + t * 2 + dj)] =
                img[std::size_t(((c * C + ch) * 8 + i * 2 + di) * 8 + j * 2 + dj)];
    }
  auto ref = v.make_pack<double>({{2, 2, 2 * k}});
  REQUIRE(ref.tokens == pk.tokens);
  const cpu_policy pol{2};
  host_view<const double> Pv{P.data(), {std::int64_t(P.size())}, "P"};
  auto run = [&](const nn::vit_pack<double>& p, const double* x, std::vector<double>& tok) {
    std::vector<double> y(2 * D), saved(v.saved_elems(p));
    const double* imgs[1] = {x};
    v.forward(pol, Pv, p, std::span<const double* const>(imgs, 1), host_view<double>{y.data(), {2, D}, "y"},
              host_view<double>{saved.data(), {std::int64_t(saved.size())}, "saved"});
    const double* t = v.saved_tokens(p, host_view<const double>{saved.data(), {std::int64_t(saved.size())}, "s"});
    tok.assign(t, t + p.tokens * D);
  };
  std::vector<double> a, b;
  run(pk, img.data(), a);
  run(ref, strip.data(), b);
  CHECK(rel_error(a, b) < 1e-13);
  // the kept-patch table is checked when the pack is made
  CHECK_THROWS_AS(v.make_pack<double>({{2, 8, 8, 17}}), shape_error);
  CHECK(v.make_pack<double>({{2, 8, 8, 16}}).keep[0].empty());  // every patch kept: not masked
}

TEST_CASE("DINO with a ViT backbone: packed student, global-only teacher, steps run") {
  nn::vit_config vc = tiny(0.1);
  vc.in_chans = 1;
  ssl::dino_config c;
  c.head.out_dim = 32;
  c.head.hidden_dim = 16;
  c.head.bottleneck_dim = 8;
  c.local_crops = 3;
  c.train.max_batch = 2;
  c.train.crops = {8, 4};  // 2 x 8 px global, 3 x 4 px local crops
  c.train.schedule.epochs = 2;
  c.train.schedule.iters_per_epoch = 4;
  c.train.schedule.warmup_epochs = 0;
  c.train.schedule.lr = 0.5;
  auto m = ssl::make_dino<nn::vit>(vc, vc.embed_dim, c);
  using M = decltype(m);
  static_assert(std::is_same_v<M::input_type, ssl::image_crops<float>>);
  std::vector<float> g(2 * 2 * 64), l(3 * 2 * 16);
  const cpu_policy pol{2};
  std::vector<float> t0(m.teacher().data(), m.teacher().data() + m.teacher().size());
  for (int it = 0; it < 6; ++it) {
    fill_normal(g, 100 + std::uint64_t(it));
    fill_normal(l, 200 + std::uint64_t(it));
    auto st = m.step(pol, ssl::image_crops<float>{g.data(), l.data()});
    CHECK_FALSE(st.skipped);
    CHECK(std::isfinite(st.loss));
    CHECK(st.loss > 0);
  }
  CHECK_FALSE(std::equal(t0.begin(), t0.end(), m.teacher().data()));  // the EMA moved the teacher
  CHECK(m.layout().find("backbone.blocks.1.attn.qkv.weight") != nullptr);
  CHECK(m.layout().find("head.last_layer.weight_v") != nullptr);
  CHECK_THROWS_AS(m.step(pol, ssl::image_crops<float>{g.data(), nullptr}), shape_error);
}
