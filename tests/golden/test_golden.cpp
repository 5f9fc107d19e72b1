// tests/golden/test_golden.cpp: the DINO objective against a PyTorch reference.
//
// The golden files (tests/golden/data/*.bin) come from tests/golden/gen/gen_objective.py,
// which restates the official facebookresearch/dino code in PyTorch (see the README there).
// Cases: the DINO head forward/backward with weight norm, the DINO loss with centering, the
// teacher EMA, the schedules, and AdamW steps with parameter groups, clipping and the
// frozen last layer.
//
// Tolerances: fp32 tensors pass when the relative-norm error ||a - b|| / ||b|| <= 1e-5 and
// every element has |a_i - b_i| <= 1e-5 * max_j |b_j| (plus a 1e-12 absolute floor for an
// all-zero reference); float64 schedules within 1e-12 relative. Each case prints its worst
// errors.
#include <doctest/doctest.h>

#include <cstdio>
#include <string>
#include <vector>

#include <dino/dino.hpp>

#include "golden.hpp"

using dino_golden::load_params;

namespace {

using dino::buffer;
using dino::cpu_policy;
using dino::flat_params;
using dino::host_view;
using dino::param_entry;
using dino::param_layout;

constexpr double kTol32 = 1e-5;
constexpr double kTol64 = 1e-12;
constexpr double kAbsFloor = 1e-7;  // relative to the tensor's max |b|: 1e-12 absolute for a zero tensor

/// Worst errors of one test case, printed when it ends.
struct worst {
  std::string label;
  double rel_norm = 0, elem = 0;
  std::string rel_name, elem_name;
  int checked = 0;
  explicit worst(std::string l) : label(std::move(l)) {}
  ~worst() {
    std::printf("[golden] %-34s %3d tensors  worst rel-norm %.3e (%s)  worst elem %.3e (%s)\n", label.c_str(), checked,
                rel_norm, rel_name.c_str(), elem, elem_name.c_str());
  }
};

template <class A>
void check_close(worst& w, const std::string& what, const A* actual, std::size_t n, const dino_golden::tensor& expected,
                 double tol = kTol32) {
  REQUIRE_MESSAGE(static_cast<std::int64_t>(n) == expected.numel(), what, ": size ", n, " but the golden tensor ",
                  expected.name, " has shape ", expected.shape_str());
  const dino_golden::error e = dino_golden::compare(actual, expected.values, kAbsFloor);
  ++w.checked;
  if (e.rel_norm >= w.rel_norm) w.rel_norm = e.rel_norm, w.rel_name = what;
  if (e.elem >= w.elem) w.elem = e.elem, w.elem_name = what;
  INFO(what, ": rel-norm ", e.rel_norm, ", elem ", e.elem, ", worst index ", e.worst, " (", e.worst_actual, " vs ",
       e.worst_expected, ")");
  CHECK(e.rel_norm <= tol);
  CHECK(e.elem <= tol);
}


/// Compares every tensor of `P` with "<prefix><name>".
void check_params(worst& w, const dino_golden::file& g, const std::string& prefix, const flat_params<float>& P,
                  const std::string& label) {
  for (const param_entry& e : P.layout().entries())
    check_close(w, label + e.name, P.data() + e.offset, e.numel(), g[prefix + e.name]);
}

dino::ssl::dino_head_config head_config(const dino_golden::tensor& c) {
  // config = [in_dim, hidden, bottleneck, K, nlayers, norm_last_layer]
  dino::ssl::dino_head_config h;
  h.in_dim = std::int64_t(c.values[0]);
  h.hidden_dim = std::int64_t(c.values[1]);
  h.bottleneck_dim = std::int64_t(c.values[2]);
  h.out_dim = std::int64_t(c.values[3]);
  h.nlayers = int(c.values[4]);
  h.norm_last_layer = c.values[5] != 0;
  return h;
}

template <class T>
host_view<const T> cview(const T* p, dino::shape s, const char* name) {
  return {p, s, name};
}

}  // namespace

TEST_CASE("golden: DINO head forward and backward (weight norm)") {
  const dino_golden::file g(dino_golden::data_path("head.bin"));
  const cpu_policy pol{2};
  for (const std::string prefix : {"nll1/", "nll0/", "nl1/"}) {
    CAPTURE(prefix);
    worst w("head " + prefix);
    const auto cfg = head_config(g[prefix + "config"]);
    param_layout layout;
    const dino::ssl::dino_head head(cfg, layout);
    flat_params<float> P(layout), G(layout);
    load_params(g, prefix + "param/", P);

    const dino_golden::tensor& xg = g[prefix + "x"];
    const std::int64_t n = xg.dims[0], in = cfg.in_dim, K = cfg.out_dim;
    REQUIRE(xg.dims[1] == in);
    const host_view<const float> Pv{P.data(), {std::int64_t(P.size())}, "parameters"};
    const host_view<float> Gv{G.data(), {std::int64_t(G.size())}, "gradients"};
    const auto x = cview(xg.f32.data(), {n, in}, "x");
    const auto dy = cview(g[prefix + "dy"].f32.data(), {n, K}, "dy");
    buffer<float> y(std::size_t(n * K)), y2(std::size_t(n * K)), dx(std::size_t(n * in));
    buffer<float> saved(head.saved_elems(n)), scratch(head.scratch_elems(n));
    const host_view<float> sv{saved.data(), {std::int64_t(saved.size())}, "saved"};
    const host_view<float> sc{scratch.data(), {std::int64_t(scratch.size())}, "scratch"};

    head.forward(pol, Pv, x, host_view<float>{y.data(), {n, K}, "y"}, sv);
    check_close(w, "y", y.data(), y.size(), g[prefix + "y"]);
    head.infer(pol, Pv, x, host_view<float>{y2.data(), {n, K}, "y (infer)"}, sc);
    check_close(w, "y (infer)", y2.data(), y2.size(), g[prefix + "y"]);

    G.fill_zero();
    head.backward(pol, Pv, x, host_view<const float>(sv), dy, host_view<float>{dx.data(), {n, in}, "dx"},
                  dino::grad_mode::write, Gv, sc);
    check_close(w, "dx", dx.data(), dx.size(), g[prefix + "dx"]);
    for (const param_entry& e : layout.entries()) {
      const std::string key = prefix + "grad/" + e.name;
      if (e.trainable()) {
        REQUIRE_MESSAGE(g.has(key), "no golden gradient ", key);
        check_close(w, "grad " + e.name, G.data() + e.offset, e.numel(), g[key]);
      } else {
        // Frozen (weight_g with norm_last_layer): PyTorch has no gradient; the library writes none.
        CHECK_MESSAGE(!g.has(key), key);
        for (std::size_t i = 0; i < e.numel(); ++i) CHECK(G.data()[e.offset + i] == 0.0f);
      }
    }

    // Backward with the last layer frozen: the MLP gradients and dx are the same, the last
    // layer's gradient is not computed.
    G.fill_zero();
    head.backward(pol, Pv, x, host_view<const float>(sv), dy, host_view<float>{dx.data(), {n, in}, "dx"},
                  dino::grad_mode::write, Gv, sc, /*last_layer_frozen=*/true);
    check_close(w, "dx (last layer frozen)", dx.data(), dx.size(), g[prefix + "dx"]);
    for (const param_entry& e : layout.entries()) {
      if (e.flags & dino::param_last_layer) {
        for (std::size_t i = 0; i < e.numel(); ++i) CHECK(G.data()[e.offset + i] == 0.0f);
      } else {
        check_close(w, "grad " + e.name + " (last layer frozen)", G.data() + e.offset, e.numel(),
                    g[prefix + "grad/" + e.name]);
      }
    }
  }
}

TEST_CASE("golden: DINO loss with centering") {
  const dino_golden::file g(dino_golden::data_path("loss.bin"));
  const cpu_policy pol{2};
  for (const std::string prefix : {"mc/", "g2/"}) {
    CAPTURE(prefix);
    worst w("loss " + prefix);
    // hyper = [n_crops, n_global, tau_s, tau_t, center momentum]
    const auto& hp = g[prefix + "hyper"].values;
    const int n_crops = int(hp[0]), n_global = int(hp[1]);
    const double tau_s = hp[2], tau_t = hp[3], m_c = hp[4];
    const dino_golden::tensor& tg = g[prefix + "teacher"];
    const dino_golden::tensor& sg = g[prefix + "student"];
    const std::int64_t K = tg.dims[1], nt = tg.dims[0], ns = sg.dims[0];
    REQUIRE(ns == n_crops * (nt / n_global));

    dino::ssl::centering<float> cent(dino::ssl::centering_config{K, m_c});
    const auto& c0 = g[prefix + "center"].f32;
    REQUIRE(std::int64_t(c0.size()) == K);
    std::copy(c0.begin(), c0.end(), cent.center().data);

    const auto t = cview(tg.f32.data(), {nt, K}, "teacher logits");
    const auto s = cview(sg.f32.data(), {ns, K}, "student logits");
    buffer<float> q{std::size_t(nt * K)}, ent{std::size_t(nt)}, row{std::size_t(ns)}, ds{std::size_t(ns * K)};
    const double h = cent.targets(pol, t, tau_t, host_view<float>{q.data(), {nt, K}, "q"},
                                  host_view<float>{ent.data(), {nt}, "entropy"});
    check_close(w, "targets", q.data(), q.size(), g[prefix + "targets"]);
    check_close(w, "teacher entropy", &h, 1, g[prefix + "teacher_entropy"]);

    const dino::ssl::cross_entropy_distillation loss(dino::ssl::distillation_config{n_crops, n_global, tau_s});
    const double l = loss.forward_backward(pol, s, cview(q.data(), {nt, K}, "q"), host_view<float>{row.data(), {ns}, "row"},
                                           host_view<float>{ds.data(), {ns, K}, "ds"}, 1.0, false);
    check_close(w, "loss", &l, 1, g[prefix + "loss"]);
    check_close(w, "d student", ds.data(), ds.size(), g[prefix + "dstudent"]);
    const double l2 = loss.forward(pol, s, cview(q.data(), {nt, K}, "q"), host_view<float>{row.data(), {ns}, "row"});
    check_close(w, "loss (forward only)", &l2, 1, g[prefix + "loss"]);

    // The center moves after the loss, from the raw teacher logits.
    cent.observe(pol, t);
    cent.commit();
    check_close(w, "new center", cent.center().data, std::size_t(K), g[prefix + "new_center"]);
  }
}

TEST_CASE("golden: teacher EMA") {
  const dino_golden::file g(dino_golden::data_path("ema.bin"));
  const cpu_policy pol{2};
  worst w("ema");
  for (const std::string prefix : {"vec_a/", "vec_b/"}) {
    const double m = g.scalar(prefix + "m");
    std::vector<float> t = g[prefix + "teacher"].f32;
    const std::vector<float>& s = g[prefix + "student"].f32;
    const std::int64_t n = std::int64_t(t.size());
    dino::ssl::ema(pol, host_view<float>{t.data(), {n}, "teacher"}, cview(s.data(), {n}, "student"), m);
    check_close(w, prefix + "out", t.data(), t.size(), g[prefix + "out"]);
  }
  // A whole head through ema_update, the frozen-in-the-teacher weight_g included.
  param_layout layout;
  dino::ssl::dino_head_config cfg;
  const auto& v = g["head/student/mlp.0.weight"];
  cfg.in_dim = v.dims[1];
  cfg.hidden_dim = v.dims[0];
  cfg.bottleneck_dim = g["head/student/mlp.4.weight"].dims[0];
  cfg.out_dim = g["head/student/last_layer.weight_v"].dims[0];
  cfg.norm_last_layer = true;  // the teacher's head: g frozen, still EMA'd
  const dino::ssl::dino_head head(cfg, layout);
  flat_params<float> T(layout), S(layout);
  load_params(g, "head/teacher/", T);
  load_params(g, "head/student/", S);
  dino::ssl::ema_update{}(pol, T, S, g.scalar("head/m"));
  check_params(w, g, "head/out/", T, "head ");
}

TEST_CASE("golden: schedules") {
  const dino_golden::file g(dino_golden::data_path("schedules.bin"));
  for (const std::string p : {"a/", "b/", "c/"}) {
    CAPTURE(p);
    worst w("schedules " + p);
    // config = [epochs, iters/epoch, batch, lr, min_lr, warmup, wd, wd_end, m_teacher, warm_tt, tt, warm_tt_epochs]
    const auto& c = g[p + "config"].values;
    dino::ssl::schedule_config sc;
    sc.epochs = std::int64_t(c[0]);
    sc.iters_per_epoch = std::int64_t(c[1]);
    sc.batch_size = std::int64_t(c[2]);
    sc.lr = c[3];
    sc.min_lr = c[4];
    sc.warmup_epochs = std::int64_t(c[5]);
    sc.weight_decay = c[6];
    sc.weight_decay_end = c[7];
    sc.momentum_teacher = c[8];
    sc.warmup_teacher_temp = c[9];
    sc.teacher_temp = c[10];
    sc.warmup_teacher_temp_epochs = std::int64_t(c[11]);

    const auto lr = dino::ssl::cosine_schedule(sc.lr * double(sc.batch_size) / 256.0, sc.min_lr, sc.epochs,
                                               sc.iters_per_epoch, sc.warmup_epochs);
    const auto wd = dino::ssl::cosine_schedule(sc.weight_decay, sc.weight_decay_end, sc.epochs, sc.iters_per_epoch);
    const auto mom = dino::ssl::cosine_schedule(sc.momentum_teacher, 1.0, sc.epochs, sc.iters_per_epoch);
    const auto tt = dino::ssl::teacher_temp_schedule(sc.warmup_teacher_temp, sc.teacher_temp,
                                                     sc.warmup_teacher_temp_epochs, sc.epochs);
    REQUIRE(g[p + "lr"].dtype == 1);
    check_close(w, "cosine lr", lr.data(), lr.size(), g[p + "lr"], kTol64);
    check_close(w, "cosine wd", wd.data(), wd.size(), g[p + "wd"], kTol64);
    check_close(w, "cosine momentum", mom.data(), mom.size(), g[p + "momentum"], kTol64);
    check_close(w, "teacher temp", tt.data(), tt.size(), g[p + "teacher_temp"], kTol64);

    const dino::ssl::dino_schedules all(sc);
    REQUIRE(all.total_iters() == g[p + "lr"].numel());
    check_close(w, "dino_schedules lr", all.lr.data(), all.lr.size(), g[p + "lr"], kTol64);
    check_close(w, "dino_schedules wd", all.wd.data(), all.wd.size(), g[p + "wd"], kTol64);
    check_close(w, "dino_schedules momentum", all.momentum.data(), all.momentum.size(), g[p + "momentum"], kTol64);
    check_close(w, "dino_schedules teacher temp", all.teacher_temp.data(), all.teacher_temp.size(),
                g[p + "teacher_temp"], kTol64);
    // Look-ups by global iteration: the temperature is per epoch.
    std::vector<double> at_lr, at_tt;
    for (std::int64_t it = 0; it < all.total_iters(); ++it) {
      const auto v = all.at(it);
      at_lr.push_back(v.lr);
      at_tt.push_back(v.teacher_temp);
      CHECK(v.epoch == it / sc.iters_per_epoch);
    }
    check_close(w, "at(it).lr", at_lr.data(), at_lr.size(), g[p + "lr"], kTol64);
    std::vector<double> tt_per_iter;
    for (std::int64_t it = 0; it < all.total_iters(); ++it)
      tt_per_iter.push_back(g[p + "teacher_temp"].values[std::size_t(it / sc.iters_per_epoch)]);
    const dino_golden::tensor tt_it{"teacher temp per iteration", 1, {std::int64_t(tt_per_iter.size())}, tt_per_iter, {}};
    check_close(w, "at(it).teacher_temp", at_tt.data(), at_tt.size(), tt_it, kTol64);
  }
}

TEST_CASE("golden: AdamW with parameter groups, clipping and a frozen last layer") {
  const dino_golden::file g(dino_golden::data_path("adamw.bin"));
  const cpu_policy pol{2};
  const auto& lrs = g["lr"].values;
  const auto& wds = g["wd"].values;
  const auto& hp = g["hyper"].values;  // [clip, freeze steps, steps]
  const double clip = hp[0];
  const int freeze = int(hp[1]), steps = int(hp[2]);
  for (const std::string prefix : {"nll0/", "nll1/"}) {
    CAPTURE(prefix);
    worst w("adamw " + prefix);
    dino::ssl::dino_head_config cfg;
    const auto& w0 = g[prefix + "init/mlp.0.weight"];
    cfg.in_dim = w0.dims[1];
    cfg.hidden_dim = w0.dims[0];
    cfg.bottleneck_dim = g[prefix + "init/mlp.4.weight"].dims[0];
    cfg.out_dim = g[prefix + "init/last_layer.weight_v"].dims[0];
    cfg.norm_last_layer = prefix == "nll1/";
    param_layout layout;
    const dino::ssl::dino_head head(cfg, layout);
    // The reference groups: biases (1-D) undecayed, weight matrices and a learned weight_g decayed.
    for (const param_entry& e : layout.entries()) {
      CAPTURE(e.name);
      const bool one_d = e.shape.rank == 1;
      CHECK(bool(e.flags & dino::param_no_weight_decay) == one_d);
      CHECK(bool(e.flags & dino::param_last_layer) == (e.name.rfind("last_layer.", 0) == 0));
      if (e.name == "last_layer.weight_g") CHECK(e.trainable() == !cfg.norm_last_layer);
    }
    flat_params<float> P(layout), G(layout);
    load_params(g, prefix + "init/", P);
    dino::optim::adamw<float> opt(layout);
    for (int s = 0; s < steps; ++s) {
      CAPTURE(s);
      const std::string sp = prefix + "step" + std::to_string(s) + "/";
      G.fill_zero();
      for (const param_entry& e : layout.entries()) {
        const std::string key = sp + "grad/" + e.name;
        if (!e.trainable()) {
          CHECK_MESSAGE(!g.has(key), key);
          continue;
        }
        const auto& gv = g[key].f32;
        REQUIRE(gv.size() == e.numel());
        std::copy(gv.begin(), gv.end(), G.data() + e.offset);
      }
      const int clipped = dino::optim::clip_gradients(pol, G, clip);
      CHECK(clipped == int(g.scalar(sp + "clipped")));
      opt.step(pol, P, G, lrs[std::size_t(s)], wds[std::size_t(s)],
               s < freeze ? unsigned(dino::param_last_layer) : unsigned(dino::param_none));
      check_params(w, g, sp + "param/", P, "step" + std::to_string(s) + " ");
    }
  }
}
