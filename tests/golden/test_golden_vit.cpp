// tests/golden/test_golden_vit.cpp: the Vision Transformer and a short DINO run against a
// PyTorch reference.
//
// The golden files (tests/golden/data/vit_*.bin) come from tests/golden/gen/gen_vit.py, which
// restates facebookresearch/dino's vision_transformer.py, MultiCropWrapper, DINOLoss and
// train_one_epoch in PyTorch (see the README there, section "ViT backbone and a short
// training run"). Cases:
//   vit_small_model.bin  a tiny ViT (D 20, depth 2, 2 heads, patch 4, stored grid 4 x 4) on
//                        four inputs: a/ 16 x 16 (stored position rows), b/ 8 x 8 and c/ 12 x 20
//                        (bicubic resize, +0.1 scale offset), d/ 17 x 19 (truncated conv; 4 x 4
//                        grid resampled onto itself). Training forward and inference: CLS
//                        features, all tokens, the last block's CLS attention row, the last two
//                        intermediate layers, the position rows; every parameter gradient of
//                        f = sum(cls * R) + sum(tokens * R2) (and of sum(cls * R) alone in a/).
//                        The images get no gradient in the library, so dx is not checked.
//   vit_pack.bin         2 global (16 x 16) + 3 local (8 x 8) crops of 2 images in one pack,
//                        crop-major: features and gradients.
//   attention_mask.bin   (gen_attention_mask.py) the student's masked view: ssl::attention_mask's
//                        selection from CLS attention rows (ties included; exact), and the ViT on
//                        a pack whose crops keep only the selected patches (a/ the stored grid,
//                        b/ an interpolated 3 x 3 grid): the teacher's CLS attention, the kept
//                        indices, CLS and tokens of the shorter sequences, every gradient.
//   vit_e2e.bin          10 DINO iterations (ssl::method with the ViT, DINO head, centering,
//                        multi-crop loss, AdamW with groups, per-tensor clipping, the last layer
//                        frozen for 3 epochs, EMA teacher) with the reference's explicit
//                        schedules: loss and center per step; step 0's teacher and student
//                        logits, dlogits and raw gradients; the method's clipped gradients of
//                        step 0; every student and teacher parameter after steps 0, 4 and 9.
//
// Tolerances (per tensor: relative-norm error and max element error relative to the tensor's
// max |b|): 1e-5 for forwards and everything of step 0 of the run, 1e-4 for the backbone
// gradients (the issue's bound), 5e-5 for the run's later steps (float32 against float64 drifts
// by up to 9e-6 there, README). The key-bias elements [D, 2D) of every blocks.N.attn.qkv.bias
// are checked apart with an absolute tolerance of 3e-3 in the run: their exact gradient is 0
// and Adam turns float32 rounding noise into updates (README).
//
// Case d/ (17 x 19 pixels): the library's packs take only multiples of the patch (make_pack
// throws otherwise), while the reference's Conv2d floors and, since H != W, resamples the
// 4 x 4 grid at scale 4.1 / 4. The test feeds the top-left 16 x 16 pixels (what the floored
// conv reads) and replaces the pack's position resize by a non-identity one at 4.1 / 4, built
// with the library's own nn::pos_resize pieces.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include <dino/dino.hpp>
#include <dino/nn/vit.hpp>
#include <dino/ssl/student_mask.hpp>

#include "golden.hpp"
#include "golden_vit.hpp"

using dino_golden::load_params;
using dino_golden::vit_config_of;

namespace {

using dino::cpu_policy;
using dino::flat_params;
using dino::host_view;
using dino::param_entry;
using dino::param_layout;

constexpr double kTolFwd = 1e-5;    // forwards, step 0 of the run
constexpr double kTolGrad = 1e-4;   // backbone gradients
constexpr double kTolRun = 5e-5;    // the run after step 0
constexpr double kKeyBiasAbs = 3e-3;
constexpr double kAbsFloor = 1e-7;  // relative to the tensor's max |b|

/// Worst errors of one test case, printed when it ends.
struct worst {
  std::string label;
  double rel_norm = 0, elem = 0;
  std::string rel_name, elem_name;
  int checked = 0;
  double key_bias_abs = -1;  // max |a - b| over the masked key-bias elements, when any
  explicit worst(std::string l) : label(std::move(l)) {}
  ~worst() {
    std::printf("[golden] %-34s %3d tensors  worst rel-norm %.3e (%s)  worst elem %.3e (%s)", label.c_str(), checked,
                rel_norm, rel_name.c_str(), elem, elem_name.c_str());
    if (key_bias_abs >= 0) std::printf("  key bias max abs %.3e", key_bias_abs);
    std::printf("\n");
  }
};

void record(worst& w, const std::string& what, const dino_golden::error& e, double tol) {
  ++w.checked;
  if (e.rel_norm >= w.rel_norm) w.rel_norm = e.rel_norm, w.rel_name = what;
  if (e.elem >= w.elem) w.elem = e.elem, w.elem_name = what;
  INFO(what, ": rel-norm ", e.rel_norm, ", elem ", e.elem, ", worst index ", e.worst, " (", e.worst_actual, " vs ",
       e.worst_expected, ")");
  CHECK(e.rel_norm <= tol);
  CHECK(e.elem <= tol);
}

template <class A>
void check_close(worst& w, const std::string& what, const A* actual, std::size_t n, const std::vector<double>& expected,
                 double tol) {
  REQUIRE_MESSAGE(n == expected.size(), what, ": size ", n, " but the golden tensor has ", expected.size());
  record(w, what, dino_golden::compare(actual, expected, kAbsFloor), tol);
}
template <class A>
void check_close(worst& w, const std::string& what, const A* actual, std::size_t n, const dino_golden::tensor& expected,
                 double tol) {
  REQUIRE_MESSAGE(static_cast<std::int64_t>(n) == expected.numel(), what, ": size ", n, " but the golden tensor ",
                  expected.name, " has shape ", expected.shape_str());
  check_close(w, what, actual, n, expected.values, tol);
}

/// Elements [lo, hi) compared with an absolute tolerance, the others as check_close.
void check_masked(worst& w, const std::string& what, const float* actual, const dino_golden::tensor& expected,
                  std::size_t lo, std::size_t hi, double tol) {
  REQUIRE(expected.values.size() > hi);
  std::vector<float> a;
  std::vector<double> b;
  double key = 0;
  for (std::size_t i = 0; i < expected.values.size(); ++i) {
    if (i >= lo && i < hi) {
      key = std::max(key, std::abs(double(actual[i]) - expected.values[i]));
    } else {
      a.push_back(actual[i]);
      b.push_back(expected.values[i]);
    }
  }
  check_close(w, what + " (key bias masked)", a.data(), a.size(), b, tol);
  w.key_bias_abs = std::max(w.key_bias_abs, key);
  INFO(what, ": key-bias elements [", lo, ", ", hi, ") max abs error ", key);
  CHECK(key <= kKeyBiasAbs);
}


double dot(const float* a, const float* b, std::size_t n) {
  double s = 0;
  for (std::size_t i = 0; i < n; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

/// Every parameter gradient of `G` against "<prefix><name>", but those named in `skip`.
void check_grads(worst& w, const dino_golden::file& g, const std::string& prefix, const flat_params<float>& G,
                 const std::string& label, double tol, const std::string& skip = "") {
  for (const param_entry& e : G.layout().entries())
    if (e.name != skip) check_close(w, label + e.name, G.data() + e.offset, e.numel(), g[prefix + e.name], tol);
}

/// Makes a one-set pack resample the g x g position grid to h0 x w0 at the reference's scales
/// (h0 + 0.1) / g, (w0 + 0.1) / g, as the reference does for a crop that is not square in
/// pixels even when h0 = w0 = g (case d/).
template <class T>
void force_resize(dino::nn::vit_pack<T>& pk, std::int64_t g, std::int64_t h0, std::int64_t w0) {
  auto& r = pk.resize[0];
  r.identity = false;
  r.y = dino::nn::bicubic_taps<T>(g, h0, (double(h0) + 0.1) / double(g));
  r.x = dino::nn::bicubic_taps<T>(g, w0, (double(w0) + 0.1) / double(g));
}

}  // namespace

TEST_CASE("golden ViT: forward, inference, optional outputs and gradients (vit_small_model.bin)") {
  const dino_golden::file g(dino_golden::data_path("vit_small_model.bin"));
  const cpu_policy pol{2};
  const dino::nn::vit_config vc = vit_config_of(g["config"]);
  param_layout layout;
  const dino::nn::vit v(vc, layout);
  flat_params<float> P(layout), G(layout);
  load_params(g, "param/", P);
  const host_view<const float> Pv{P.data(), {std::int64_t(P.size())}, "parameters"};
  const std::int64_t D = vc.embed_dim, heads = vc.heads, p = vc.patch;
  const std::size_t pos_off = layout.at("pos_embed").offset;

  for (const std::string prefix : {"a/", "b/", "c/", "d/"}) {
    CAPTURE(prefix);
    worst w("vit model " + prefix);
    const dino_golden::tensor& xg = g[prefix + "x"];
    REQUIRE(xg.dims.size() == 4);
    const std::int64_t B = xg.dims[0], C = xg.dims[1], H = xg.dims[2], W = xg.dims[3];
    REQUIRE(C == vc.in_chans);
    // The pixels the reference's floored convolution reads.
    const std::int64_t Hc = H / p * p, Wc = W / p * p, h0 = H / p, w0 = W / p, N = h0 * w0;
    std::vector<float> x(std::size_t(B * C * Hc * Wc));
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t i = 0; i < Hc; ++i)
          for (std::int64_t j = 0; j < Wc; ++j)
            x[std::size_t(((b * C + c) * Hc + i) * Wc + j)] = xg.f32[std::size_t(((b * C + c) * H + i) * W + j)];
    auto pk = v.make_pack<float>({{B, Hc, Wc}});
    // The reference resamples unless N == N0 and H == W in pixels; with Hc, Wc the library
    // would take the stored grid when the crop was not square in pixels (case d/).
    const bool ref_identity = N == vc.grid() * vc.grid() && H == W;
    if (!ref_identity) force_resize(pk, vc.grid(), h0, w0);
    CHECK(pk.resize[0].identity == ref_identity);
    REQUIRE(pk.tokens == B * (N + 1));
    const std::int64_t Tn = pk.tokens;
    const float* imgs[1] = {x.data()};
    const std::span<const float* const> images(imgs, 1);

    // Position rows added to the tokens: the stored CLS row, then the (resized) grid.
    std::vector<float> pos(std::size_t((N + 1) * D));
    std::copy(P.data() + pos_off, P.data() + pos_off + D, pos.begin());
    pk.resize[0].forward(P.data() + pos_off + D, pos.data() + D, D);
    check_close(w, "pos_embed rows", pos.data(), pos.size(), g[prefix + "pos_embed"], kTolFwd);

    // Training forward.
    std::vector<float> y(std::size_t(B * D)), saved(v.saved_elems(pk));
    const host_view<float> sv{saved.data(), {std::int64_t(saved.size())}, "saved"};
    v.forward(pol, Pv, pk, images, host_view<float>{y.data(), {B, D}, "y"}, sv);
    const float* tok = v.saved_tokens(pk, host_view<const float>(sv));
    check_close(w, "cls (forward)", y.data(), y.size(), g[prefix + "cls"], kTolFwd);
    check_close(w, "tokens (forward)", tok, std::size_t(Tn * D), g[prefix + "tokens"], kTolFwd);

    // Inference with every optional output.
    std::vector<float> y2(y.size()), tokens(std::size_t(Tn * D)), attn(v.cls_attention_elems(pk)),
        inter(std::size_t(2 * Tn * D)), scratch(v.infer_scratch_elems(pk));
    dino::nn::vit::infer_outputs<float> out{tokens.data(), attn.data(), 2, inter.data()};
    v.infer(pol, Pv, pk, images, host_view<float>{y2.data(), {B, D}, "y"},
            host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"}, out);
    check_close(w, "cls (infer)", y2.data(), y2.size(), g[prefix + "cls"], kTolFwd);
    check_close(w, "tokens (infer)", tokens.data(), tokens.size(), g[prefix + "tokens"], kTolFwd);
    check_close(w, "inter0", inter.data(), std::size_t(Tn * D), g[prefix + "inter0"], kTolFwd);
    check_close(w, "inter1", inter.data() + Tn * D, std::size_t(Tn * D), g[prefix + "inter1"], kTolFwd);
    // CLS attention: row 0 of the reference's [B, heads, N+1, N+1], against [crop][head][n].
    const dino_golden::tensor& ag = g[prefix + "attn"];
    REQUIRE(ag.numel() == B * heads * (N + 1) * (N + 1));
    std::vector<double> row0;
    std::vector<float> ours;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t j = 0; j < N + 1; ++j) {
          row0.push_back(ag.values[std::size_t(((b * heads + h) * (N + 1) + 0) * (N + 1) + j)]);
          ours.push_back(attn[std::size_t(pk.cls_attn_off[std::size_t(b)] + h * (N + 1) + j)]);
        }
    check_close(w, "last-block CLS attention", ours.data(), ours.size(), row0, kTolFwd);

    // f = sum(cls * R) + sum(tokens * R2): its value and every parameter gradient.
    const dino_golden::tensor& R = g[prefix + "R"];
    const dino_golden::tensor& R2 = g[prefix + "R2"];
    REQUIRE(R.numel() == B * D);
    REQUIRE(R2.numel() == Tn * D);
    const double f = dot(y.data(), R.f32.data(), y.size()) + dot(tok, R2.f32.data(), std::size_t(Tn * D));
    check_close(w, "f", &f, 1, g[prefix + "f"], kTolFwd);
    std::vector<float> dtok(std::size_t(Tn * D)), bscratch(v.scratch_elems(pk));
    const host_view<float> Gv{G.data(), {std::int64_t(G.size())}, "gradients"};
    const host_view<float> bs{bscratch.data(), {std::int64_t(bscratch.size())}, "scratch"};
    v.scatter_cls_grad(pk, R.f32.data(), dtok.data());
    for (std::size_t i = 0; i < dtok.size(); ++i) dtok[i] += R2.f32[i];
    G.fill_zero();
    v.backward(pol, Pv, pk, host_view<const float>(sv), host_view<const float>{dtok.data(), {Tn, D}, "d tokens"}, Gv, bs);
    // PyTorch 1.13's CPU bicubic backward (upsample_bicubic2d_backward_out_frame) copies the
    // gradient through unchanged when the input and output grids have the same size, while its
    // forward resamples at the given scales: case d/'s reference pos_embed gradient is not the
    // gradient of its own forward (which the library matches). There the test checks that the
    // reference equals the library's backward through an identity resize (what PyTorch does),
    // and the library's own pos_embed gradient against central differences in double.
    const bool torch_same_size_copy = !ref_identity && h0 == vc.grid() && w0 == vc.grid();
    check_grads(w, g, prefix + "grad/", G, "grad ", kTolGrad, torch_same_size_copy ? "pos_embed" : "");
    if (torch_same_size_copy) {
      const param_entry& pe = layout.at("pos_embed");
      auto pk_copy = pk;
      pk_copy.resize[0] = dino::nn::pos_resize<float>(vc.grid(), vc.grid(), vc.grid());  // identity
      REQUIRE(pk_copy.resize[0].identity);
      flat_params<float> G2(layout);
      G2.fill_zero();
      v.backward(pol, Pv, pk_copy, host_view<const float>(sv), host_view<const float>{dtok.data(), {Tn, D}, "d tokens"},
                 host_view<float>{G2.data(), {std::int64_t(G2.size())}, "gradients"}, bs);
      check_close(w, "grad pos_embed (PyTorch's same-size copy)", G2.data() + pe.offset, pe.numel(),
                  g[prefix + "grad/pos_embed"], kTolGrad);
      // The library's gradient, in double, against central differences along a direction.
      flat_params<double> Pd(layout), Gd(layout);
      for (std::size_t i = 0; i < P.size(); ++i) Pd.data()[i] = double(P.data()[i]);
      auto pkd = v.make_pack<double>({{B, Hc, Wc}});
      force_resize(pkd, vc.grid(), h0, w0);
      std::vector<double> xd(x.begin(), x.end()), Rd(R.values), R2d(R2.values), sd(v.saved_elems(pkd));
      const double* imd[1] = {xd.data()};
      const host_view<double> sdv{sd.data(), {std::int64_t(sd.size())}, "saved"};
      auto fd = [&] {
        std::vector<double> yd(std::size_t(B * D));
        const host_view<const double> Pdv{Pd.data(), {std::int64_t(Pd.size())}, "P"};
        v.forward(pol, Pdv, pkd, std::span<const double* const>(imd, 1), host_view<double>{yd.data(), {B, D}, "y"}, sdv);
        const double* td = v.saved_tokens(pkd, host_view<const double>(sdv));
        double r = 0;
        for (std::size_t i = 0; i < yd.size(); ++i) r += yd[i] * Rd[i];
        for (std::size_t i = 0; i < R2d.size(); ++i) r += td[i] * R2d[i];
        return r;
      };
      fd();
      std::vector<double> dtd(std::size_t(Tn * D)), bsd(v.scratch_elems(pkd));
      v.scatter_cls_grad(pkd, Rd.data(), dtd.data());
      for (std::size_t i = 0; i < dtd.size(); ++i) dtd[i] += R2d[i];
      Gd.fill_zero();
      v.backward(pol, host_view<const double>{Pd.data(), {std::int64_t(Pd.size())}, "P"}, pkd,
                 host_view<const double>(sdv), host_view<const double>{dtd.data(), {Tn, D}, "d tokens"},
                 host_view<double>{Gd.data(), {std::int64_t(Gd.size())}, "G"},
                 host_view<double>{bsd.data(), {std::int64_t(bsd.size())}, "scratch"});
      // the float gradient agrees with the double one
      const std::vector<double> gpd(Gd.data() + pe.offset, Gd.data() + pe.offset + pe.numel());
      check_close(w, "grad pos_embed (library, float vs double)", G.data() + pe.offset, pe.numel(), gpd, kTolGrad);
      // and the double one with central differences along each of a few directions
      for (int dir = 0; dir < 3; ++dir) {
        std::vector<double> u(pe.numel());
        for (std::size_t i = 0; i < u.size(); ++i) u[i] = std::sin(double(i * 7 + 3 + dir * 101));
        const double h = 1e-4;
        double* q = Pd.data() + pe.offset;
        for (std::size_t i = 0; i < u.size(); ++i) q[i] += h * u[i];
        const double fp = fd();
        for (std::size_t i = 0; i < u.size(); ++i) q[i] -= 2 * h * u[i];
        const double fm = fd();
        for (std::size_t i = 0; i < u.size(); ++i) q[i] += h * u[i];
        const double num = (fp - fm) / (2 * h);
        double ana = 0;
        for (std::size_t i = 0; i < u.size(); ++i) ana += gpd[i] * u[i];
        INFO("pos_embed directional derivative ", dir, ": analytic ", ana, ", central differences ", num);
        CHECK(std::abs(ana - num) <= 1e-7 * std::max(1.0, std::abs(num)));
      }
    }

    if (g.has(prefix + "f_cls")) {  // f_cls = sum(cls * R): the CLS rows only
      const double fc = dot(y.data(), R.f32.data(), y.size());
      check_close(w, "f_cls", &fc, 1, g[prefix + "f_cls"], kTolFwd);
      v.scatter_cls_grad(pk, R.f32.data(), dtok.data());
      G.fill_zero();
      v.backward(pol, Pv, pk, host_view<const float>(sv), host_view<const float>{dtok.data(), {Tn, D}, "d tokens"}, Gv,
                 bs);
      check_grads(w, g, prefix + "grad_cls/", G, "grad_cls ", kTolGrad);
    }
  }
}

TEST_CASE("golden ViT: a two-resolution multi-crop pack (vit_pack.bin)") {
  const dino_golden::file g(dino_golden::data_path("vit_pack.bin"));
  const cpu_policy pol{2};
  const dino::nn::vit_config vc = vit_config_of(g["config"]);
  param_layout layout;
  const dino::nn::vit v(vc, layout);
  flat_params<float> P(layout), G(layout);
  // The parameters are vit_small_model.bin's (README: all three files use the same values).
  const dino_golden::file gm(dino_golden::data_path("vit_small_model.bin"));
  load_params(gm, "param/", P);
  const host_view<const float> Pv{P.data(), {std::int64_t(P.size())}, "parameters"};
  worst w("vit pack");

  // layout = [B, n_global, n_local, global size, local size]
  const auto& L = g["layout"].values;
  const std::int64_t B = std::int64_t(L[0]), ng = std::int64_t(L[1]), nl = std::int64_t(L[2]);
  const std::int64_t Gs = std::int64_t(L[3]), Ls = std::int64_t(L[4]), D = vc.embed_dim, C = vc.in_chans;
  // Crop-major NCHW arrays: crop 0 of every image, then crop 1, ...
  std::vector<float> glob, loc;
  for (std::int64_t c = 0; c < ng + nl; ++c) {
    const dino_golden::tensor& t = g["crop" + std::to_string(c)];
    const std::int64_t s = c < ng ? Gs : Ls;
    REQUIRE(t.numel() == B * C * s * s);
    auto& dst = c < ng ? glob : loc;
    dst.insert(dst.end(), t.f32.begin(), t.f32.end());
  }
  auto pk = v.make_pack<float>({{ng * B, Gs, Gs}, {nl * B, Ls, Ls}});
  const std::int64_t n = pk.crops, Tn = pk.tokens;
  REQUIRE(n == (ng + nl) * B);
  const float* imgs[2] = {glob.data(), loc.data()};
  const std::span<const float* const> images(imgs, 2);

  std::vector<float> y(std::size_t(n * D)), y2(y.size()), saved(v.saved_elems(pk)), scratch(v.infer_scratch_elems(pk));
  const host_view<float> sv{saved.data(), {std::int64_t(saved.size())}, "saved"};
  v.forward(pol, Pv, pk, images, host_view<float>{y.data(), {n, D}, "y"}, sv);
  check_close(w, "features (forward)", y.data(), y.size(), g["features"], kTolFwd);
  v.infer(pol, Pv, pk, images, host_view<float>{y2.data(), {n, D}, "y"},
          host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"});
  check_close(w, "features (infer)", y2.data(), y2.size(), g["features"], kTolFwd);

  const dino_golden::tensor& R = g["R"];
  REQUIRE(R.numel() == n * D);
  const double f = dot(y.data(), R.f32.data(), y.size());
  check_close(w, "f", &f, 1, g["f"], kTolFwd);
  std::vector<float> dtok(std::size_t(Tn * D)), bscratch(v.scratch_elems(pk));
  v.scatter_cls_grad(pk, R.f32.data(), dtok.data());
  G.fill_zero();
  v.backward(pol, Pv, pk, host_view<const float>(sv), host_view<const float>{dtok.data(), {Tn, D}, "d tokens"},
             host_view<float>{G.data(), {std::int64_t(G.size())}, "gradients"},
             host_view<float>{bscratch.data(), {std::int64_t(bscratch.size())}, "scratch"});
  check_grads(w, g, "grad/", G, "grad ", kTolGrad);
}

TEST_CASE("golden ViT: 10 DINO iterations (vit_e2e.bin)") {
  const dino_golden::file g(dino_golden::data_path("vit_e2e.bin"));
  const cpu_policy pol{2};
  const dino_golden::e2e_run run = dino_golden::e2e_setup(g);
  const dino::nn::vit_config& vc = run.vc;
  const std::int64_t B = run.B, ng = run.ng, nl = run.nl, Gs = run.Gs, Ls = run.Ls;
  const int steps = run.steps;
  dino::ssl::dino_config c = run.c;
  // The schedules of the file: lr = cosine_scheduler(1e-3, 1e-4, 10, 1, warmup_epochs=2,
  // start_warmup_value=1e-4) (batch 256: lr * batch / 256 = lr), wd cosine 0.04 -> 0.4,
  // momentum cosine 0.9 -> 1, tau_t 0.04. schedule_config reproduces all but the lr warm-up's
  // start (the reference's main_dino warms up from 0), so the explicit tables replace them below.
  auto& sc = c.train.schedule;
  sc.lr = 1e-3;
  sc.min_lr = 1e-4;
  sc.warmup_epochs = 2;
  sc.weight_decay = 0.04;
  sc.weight_decay_end = 0.4;
  sc.momentum_teacher = 0.9;
  sc.warmup_teacher_temp = 0.04;
  sc.teacher_temp = 0.04;
  sc.warmup_teacher_temp_epochs = 0;
  auto m = dino::ssl::make_dino<dino::nn::vit>(vc, vc.embed_dim, c);
  const param_layout& layout = m.layout();
  const auto& lr = g["lr"].values;
  const auto& wd = g["wd"].values;
  const auto& mom = g["momentum"].values;
  const auto& tt = g["tau_t"].values;
  REQUIRE(lr.size() == std::size_t(steps));
  {
    worst w("vit e2e schedules (config)");
    const auto& s = m.schedules();
    check_close(w, "wd", s.wd.data(), s.wd.size(), wd, 1e-12);
    check_close(w, "momentum", s.momentum.data(), s.momentum.size(), mom, 1e-12);
    check_close(w, "tau_t", s.teacher_temp.data(), s.teacher_temp.size(), tt, 1e-12);
    // lr: equal after the warm-up; the warm-up's first value is 0 here and 1e-4 in the file
    for (int i = 1; i < steps; ++i) CHECK(s.lr[std::size_t(i)] == doctest::Approx(lr[std::size_t(i)]).epsilon(1e-12));
    CHECK(s.lr[0] == 0.0);
    CHECK(lr[0] == doctest::Approx(1e-4).epsilon(1e-12));
  }
  dino::ssl::dino_schedules sch;
  sch.lr = lr;
  sch.wd = wd;
  sch.momentum = mom;
  sch.teacher_temp = tt;
  sch.iters_per_epoch = 1;
  m.set_schedules(sch);

  // The initial student = the initial teacher; the method's names are the reference's
  // "backbone.*" / "head.*" after "student.".
  load_params(g, "init/student.", m.student());
  load_params(g, "init/student.", m.teacher());
  CHECK(!layout.at("head.last_layer.weight_g").trainable());  // norm_last_layer: g frozen

  const std::int64_t D = vc.embed_dim, K = c.head.out_dim;
  const std::int64_t nt = ng * B, ns = (ng + nl) * B;
  const std::size_t key_lo = std::size_t(D), key_hi = std::size_t(2 * D);
  auto is_qkv_bias = [](const std::string& name) {
    return name.size() > 14 && name.compare(name.size() - 14, 14, ".attn.qkv.bias") == 0;
  };
  auto crops_of = [&](int s, std::vector<float>& glob, std::vector<float>& loc) { dino_golden::e2e_crops(g, run, s, glob, loc); };

  // ---- step 0 outside the method, with its parts: logits, dlogits, raw gradients ----------
  {
    worst w("vit e2e step 0 (parts)");
    std::vector<float> glob, loc;
    crops_of(0, glob, loc);
    const auto& bb = m.backbone();
    const auto& head = m.head();
    const host_view<const float> Ps{m.student().data(), {std::int64_t(m.student().size())}, "student"};
    const host_view<const float> Pt{m.teacher().data(), {std::int64_t(m.teacher().size())}, "teacher"};
    // teacher: inference on the global crops
    auto tpk = bb.make_pack<float>({{nt, Gs, Gs}});
    const float* timgs[1] = {glob.data()};
    std::vector<float> tf(std::size_t(nt * D)), tl(std::size_t(nt * K));
    std::vector<float> scr(std::max({bb.infer_scratch_elems(tpk), head.scratch_elems(ns), std::size_t(1)}));
    const host_view<float> scv{scr.data(), {std::int64_t(scr.size())}, "scratch"};
    bb.infer(pol, Pt, tpk, std::span<const float* const>(timgs, 1), host_view<float>{tf.data(), {nt, D}, "tf"}, scv);
    head.infer(pol, Pt, host_view<const float>{tf.data(), {nt, D}, "tf"}, host_view<float>{tl.data(), {nt, K}, "tl"},
               scv);
    check_close(w, "teacher logits", tl.data(), tl.size(), g["step0/teacher_logits"], kTolFwd);
    // student: forward on all crops, one pack of both resolutions
    auto spk = bb.make_pack<float>({{nt, Gs, Gs}, {ns - nt, Ls, Ls}});
    const float* simgs[2] = {glob.data(), loc.data()};
    std::vector<float> sf(std::size_t(ns * D)), sl(std::size_t(ns * K)), bsaved(bb.saved_elems(spk)),
        hsaved(head.saved_elems(ns));
    bb.forward(pol, Ps, spk, std::span<const float* const>(simgs, 2), host_view<float>{sf.data(), {ns, D}, "sf"},
               host_view<float>{bsaved.data(), {std::int64_t(bsaved.size())}, "bsaved"});
    head.forward(pol, Ps, host_view<const float>{sf.data(), {ns, D}, "sf"}, host_view<float>{sl.data(), {ns, K}, "sl"},
                 host_view<float>{hsaved.data(), {std::int64_t(hsaved.size())}, "hsaved"});
    check_close(w, "student logits", sl.data(), sl.size(), g["step0/student_logits"], kTolFwd);
    // targets with the initial (zero) center, loss and dloss/dlogits
    std::vector<float> q(std::size_t(nt * K)), ent(static_cast<std::size_t>(nt)), row(static_cast<std::size_t>(ns)), ds(std::size_t(ns * K));
    m.target().targets(pol, host_view<const float>{tl.data(), {nt, K}, "tl"}, tt[0],
                       host_view<float>{q.data(), {nt, K}, "q"}, host_view<float>{ent.data(), {nt}, "ent"});
    const double l = m.loss().forward_backward(pol, host_view<const float>{sl.data(), {ns, K}, "sl"},
                                               host_view<const float>{q.data(), {nt, K}, "q"},
                                               host_view<float>{row.data(), {ns}, "row"},
                                               host_view<float>{ds.data(), {ns, K}, "ds"}, 1.0, false);
    check_close(w, "loss", &l, 1, g["step0/loss"], kTolFwd);
    check_close(w, "dlogits", ds.data(), ds.size(), g["step0/dlogits"], kTolFwd);
    // raw gradients (before clipping and the last layer's cancelling)
    flat_params<float> G(layout);
    G.fill_zero();
    const host_view<float> Gv{G.data(), {std::int64_t(G.size())}, "G"};
    std::vector<float> dfeat(std::size_t(ns * D)), dtok(std::size_t(spk.tokens * D));
    std::vector<float> hscr(head.scratch_elems(ns)), bscr(bb.scratch_elems(spk));
    head.backward(pol, Ps, host_view<const float>{sf.data(), {ns, D}, "sf"},
                  host_view<const float>{hsaved.data(), {std::int64_t(hsaved.size())}, "hsaved"},
                  host_view<const float>{ds.data(), {ns, K}, "ds"}, host_view<float>{dfeat.data(), {ns, D}, "dfeat"},
                  dino::grad_mode::write, Gv, host_view<float>{hscr.data(), {std::int64_t(hscr.size())}, "hscr"});
    bb.scatter_cls_grad(spk, dfeat.data(), dtok.data());
    bb.backward(pol, Ps, spk, host_view<const float>{bsaved.data(), {std::int64_t(bsaved.size())}, "bsaved"},
                host_view<const float>{dtok.data(), {spk.tokens, D}, "dtok"}, Gv,
                host_view<float>{bscr.data(), {std::int64_t(bscr.size())}, "bscr"});
    for (const param_entry& e : layout.entries()) {
      const std::string key = "step0/grad/student." + e.name;
      if (!e.trainable()) {
        CHECK_MESSAGE(!g.has(key), key);
        continue;
      }
      // The key bias's exact gradient is 0: both sides hold rounding noise (~1e-8); the
      // relative check runs on the q and v parts.
      if (is_qkv_bias(e.name)) check_masked(w, "grad " + e.name, G.data() + e.offset, g[key], key_lo, key_hi, kTolFwd);
      else check_close(w, "grad " + e.name, G.data() + e.offset, e.numel(), g[key], kTolFwd);
    }
  }

  // ---- the run ------------------------------------------------------------------------------
  std::vector<float> glob, loc;
  for (int s = 0; s < steps; ++s) {
    CAPTURE(s);
    const std::string sp = "step" + std::to_string(s) + "/";
    const double tol = s == 0 ? kTolFwd : kTolRun;
    worst w("vit e2e step " + std::to_string(s));
    crops_of(s, glob, loc);
    const auto st = m.step(pol, dino::ssl::image_crops<float>{glob.data(), loc.data()});
    REQUIRE_FALSE(st.skipped);
    CHECK(st.epoch == s);
    CHECK(st.lr == doctest::Approx(lr[std::size_t(s)]).epsilon(1e-12));
    CHECK(st.weight_decay == doctest::Approx(wd[std::size_t(s)]).epsilon(1e-12));
    CHECK(st.momentum == doctest::Approx(mom[std::size_t(s)]).epsilon(1e-12));
    CHECK(st.teacher_temp == doctest::Approx(tt[std::size_t(s)]).epsilon(1e-12));
    check_close(w, "loss", &st.loss, 1, g[sp + "loss"], tol);
    check_close(w, "center", m.target().center().data, std::size_t(K), g[sp + "center"], tol);

    // Clipped tensors: the reference clips before cancelling the last layer, so while it is
    // frozen its count may include head.last_layer.weight_v, whose gradient the method does
    // not compute. Step 0 stores the raw gradient, so the count is exact there.
    const int ref_clipped = int(g.scalar(sp + "clipped"));
    const bool frozen = s < c.train.freeze_last_layer;
    if (s == 0) {
      const auto& gv = g["step0/grad/student.head.last_layer.weight_v"].values;
      double nrm = 0;
      for (double v : gv) nrm += v * v;
      const bool v_clipped = c.train.clip_grad / (std::sqrt(nrm) + 1e-6) < 1;
      CHECK(st.clipped_tensors == ref_clipped - int(v_clipped));
    } else if (frozen) {
      CHECK(st.clipped_tensors <= ref_clipped);
      CHECK(st.clipped_tensors >= ref_clipped - 1);
    } else {
      CHECK(st.clipped_tensors == ref_clipped);
    }

    if (s == 0) {
      // The method's step-0 gradients after clipping: the raw reference gradients scaled per
      // tensor by min(1, clip / (||g|| + 1e-6)); the frozen last layer has none.
      for (const param_entry& e : layout.entries()) {
        const float* a = m.grads().data() + e.offset;
        if (!e.trainable() || (e.flags & dino::param_last_layer)) {
          for (std::size_t i = 0; i < e.numel(); ++i) CHECK(a[i] == 0.0f);
          continue;
        }
        dino_golden::tensor t = g["step0/grad/student." + e.name];
        double nrm = 0;
        for (double v : t.values) nrm += v * v;
        const double k = c.train.clip_grad / (std::sqrt(nrm) + 1e-6);
        if (k < 1)
          for (double& v : t.values) v *= k;
        if (is_qkv_bias(e.name)) check_masked(w, "clipped grad " + e.name, a, t, key_lo, key_hi, kTolFwd);
        else check_close(w, "clipped grad " + e.name, a, e.numel(), t, kTolFwd);
      }
    }

    if (g.has(sp + "student.backbone.cls_token")) {
      for (const char* who : {"student.", "teacher."}) {
        const flat_params<float>& P = std::string(who) == "student." ? m.student() : m.teacher();
        for (const param_entry& e : layout.entries()) {
          const dino_golden::tensor& t = g[sp + who + e.name];
          const std::string what = std::string(who) + e.name;
          if (is_qkv_bias(e.name)) check_masked(w, what, P.data() + e.offset, t, key_lo, key_hi, tol);
          else check_close(w, what, P.data() + e.offset, e.numel(), t, tol);
        }
      }
    }
  }
}

TEST_CASE("golden: attention-conditioned masking: the selection and the ViT on the kept patches (attention_mask.bin)") {
  const dino_golden::file g(dino_golden::data_path("attention_mask.bin"));
  const cpu_policy pol{2};
  // the selection on the reference's rows (ties: the lower patch index wins): exact
  {
    const auto& hp = g["select/hyper"].values;
    const auto& a = g["select/attn"];
    const std::int64_t heads = std::int64_t(hp[2]), N = std::int64_t(hp[3]), crops = a.dims[0];
    for (const auto& [key, ratio] : {std::pair{"select/keep_a", hp[0]}, std::pair{"select/keep_b", hp[1]}}) {
      CAPTURE(key);
      dino::ssl::attention_mask m({ratio});
      const std::int64_t k = m.kept(N);
      REQUIRE(g[key].numel() == crops * k);
      std::vector<std::int64_t> keep(std::size_t(crops * k), -1);
      m.select(pol, host_view<const float>{a.f32.data(), {crops, heads * (1 + N)}, "attention"}, heads, N, keep.data());
      for (std::size_t i = 0; i < keep.size(); ++i) CHECK(double(keep[i]) == g[key].values[i]);
    }
  }
  const dino::nn::vit_config vc = vit_config_of(g["config"]);
  param_layout L;
  dino::nn::vit v(vc, L);
  flat_params<float> P(L), G(L);
  load_params(g, "param/", P);
  const host_view<const float> Pv{P.data(), {std::int64_t(P.size())}, "P"};
  const std::int64_t D = vc.embed_dim;
  for (const std::string prefix : {"a/", "b/"}) {
    CAPTURE(prefix);
    worst w("attention mask " + prefix);
    const auto& x = g[prefix + "x"];
    const std::int64_t B = x.dims[0], H = x.dims[2], W = x.dims[3], N = (H / vc.patch) * (W / vc.patch);
    const float* imgs[1] = {x.f32.data()};
    // the teacher: inference on the full crops with the last block's CLS attention
    auto full = v.make_pack<float>({{B, H, W}});
    std::vector<float> y(std::size_t(B * D)), attn(v.cls_attention_elems(full)), scratch(v.infer_scratch_elems(full));
    dino::nn::vit::infer_outputs<float> out;
    out.cls_attention = attn.data();
    v.infer(pol, Pv, full, std::span<const float* const>(imgs, 1), host_view<float>{y.data(), {B, D}, "y"},
            host_view<float>{scratch.data(), {std::int64_t(scratch.size())}, "scratch"}, out);
    check_close(w, "teacher CLS attention", attn.data(), attn.size(), g[prefix + "attn_cls"], kTolFwd);
    // the selection from the library's own attention rows equals the reference's
    dino::ssl::attention_mask mask({g[prefix + "hyper"].values[0]});
    const std::int64_t k = mask.kept(N);
    REQUIRE(g[prefix + "keep"].numel() == B * k);
    auto pk = v.make_pack<float>({{B, H, W, k}});
    REQUIRE(pk.tokens == B * (1 + k));
    mask.select(pol, host_view<const float>{attn.data(), {B, vc.heads * (1 + N)}, "attention"}, vc.heads, N,
                pk.keep[0].data());
    for (std::size_t i = 0; i < pk.keep[0].size(); ++i) CHECK(double(pk.keep[0][i]) == g[prefix + "keep"].values[i]);
    // the student: training forward and backward on the kept patches
    const std::int64_t Tn = pk.tokens;
    std::vector<float> saved(v.saved_elems(pk)), s2(v.scratch_elems(pk)), dtok(std::size_t(Tn * D));
    v.forward(pol, Pv, pk, std::span<const float* const>(imgs, 1), host_view<float>{y.data(), {B, D}, "y"},
              host_view<float>{saved.data(), {std::int64_t(saved.size())}, "saved"});
    check_close(w, "cls", y.data(), y.size(), g[prefix + "cls"], kTolFwd);
    const host_view<const float> sv{saved.data(), {std::int64_t(saved.size())}, "saved"};
    check_close(w, "tokens", v.saved_tokens(pk, sv), std::size_t(Tn * D), g[prefix + "tokens"], kTolFwd);
    const auto& R = g[prefix + "R"];
    const auto& R2 = g[prefix + "R2"];
    v.scatter_cls_grad(pk, R.f32.data(), dtok.data());
    for (std::size_t i = 0; i < dtok.size(); ++i) dtok[i] += R2.f32[i];
    G.fill_zero();
    v.backward(pol, Pv, pk, sv, host_view<const float>{dtok.data(), {Tn, D}, "dtok"},
               host_view<float>{G.data(), {std::int64_t(G.size())}, "G"},
               host_view<float>{s2.data(), {std::int64_t(s2.size())}, "scratch"});
    check_grads(w, g, prefix + "grad/", G, "grad ", kTolGrad);
  }
}
