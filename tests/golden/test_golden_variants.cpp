// tests/golden/test_golden_variants.cpp: the variant parts against PyTorch references.
//
// tests/golden/data/variants.bin comes from tests/golden/gen/gen_variants.py, which restates
// DINOv2's sinkhorn_knopp_teacher, BYOL's loss_fn, MoCo v2's InfoNCE and queue update and
// SimCLR's add_contrastive_loss (see the docstring there). Everything runs in float32.
//
// Tolerances as test_golden.cpp: relative-norm error <= 1e-5 and every element within
// 1e-5 of the tensor's max |b|. Each case prints its worst errors.
#include <doctest/doctest.h>

#include <cstdio>
#include <string>
#include <vector>

#include <dino/dino.hpp>
#include <dino/ssl/info_nce.hpp>
#include <dino/ssl/mse_loss.hpp>
#include <dino/ssl/nt_xent.hpp>
#include <dino/ssl/sinkhorn.hpp>

#include "golden.hpp"

namespace {

using dino::cpu_policy;
using dino::host_view;

constexpr double kTol32 = 1e-5;
constexpr double kAbsFloor = 1e-7;

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
void check_close(worst& w, const std::string& what, const A* actual, std::size_t n, const dino_golden::tensor& expected) {
  REQUIRE_MESSAGE(static_cast<std::int64_t>(n) == expected.numel(), what, ": size ", n, " but the golden tensor ",
                  expected.name, " has shape ", expected.shape_str());
  const dino_golden::error e = dino_golden::compare(actual, expected.values, kAbsFloor);
  ++w.checked;
  if (e.rel_norm >= w.rel_norm) w.rel_norm = e.rel_norm, w.rel_name = what;
  if (e.elem >= w.elem) w.elem = e.elem, w.elem_name = what;
  INFO(what, ": rel-norm ", e.rel_norm, ", elem ", e.elem, ", worst index ", e.worst, " (", e.worst_actual, " vs ",
       e.worst_expected, ")");
  CHECK(e.rel_norm <= kTol32);
  CHECK(e.elem <= kTol32);
}

host_view<const float> cview(const dino_golden::tensor& t, const char* name) {
  REQUIRE(t.dtype == 0);
  REQUIRE(t.dims.size() == 2);
  return {t.f32.data(), {t.dims[0], t.dims[1]}, name};
}

/// Runs a pair loss in float: loss and d loss / d student.
template <class L>
double run_loss(const L& loss, host_view<const float> s, host_view<const float> q, std::vector<float>& ds) {
  std::vector<float> row(static_cast<std::size_t>(s.rows()));
  ds.assign(static_cast<std::size_t>(s.numel()), 0.f);
  return loss.forward_backward(cpu_policy{2}, s, q, host_view<float>{row.data(), {s.rows()}, "row loss"},
                               host_view<float>{ds.data(), s.shape, "ds"}, 1.0, false);
}

}  // namespace

TEST_CASE("golden: Sinkhorn-Knopp targets (DINOv2, 3 iterations)") {
  const dino_golden::file g(dino_golden::data_path("variants.bin"));
  worst w("sinkhorn-knopp");
  for (const std::string prefix : {"sk/", "sk_b/"}) {
    CAPTURE(prefix);
    const double tau = g[prefix + "hyper"].values[0];
    const int iters = int(g[prefix + "hyper"].values[1]);
    const auto t = cview(g[prefix + "teacher"], "teacher logits");
    const std::int64_t R = t.rows(), K = t.cols();
    std::vector<float> q(static_cast<std::size_t>(R * K)), ent(static_cast<std::size_t>(R));
    dino::ssl::sinkhorn_knopp<float> sk({K, iters});
    sk.targets(cpu_policy{2}, t, tau, host_view<float>{q.data(), {R, K}, "q"}, host_view<float>{ent.data(), {R}, "H"});
    check_close(w, prefix + "targets", q.data(), q.size(), g[prefix + "targets"]);
  }
}

TEST_CASE("golden: MSE distillation (BYOL's 2 - 2 cos) on 2 + 2 crops") {
  const dino_golden::file g(dino_golden::data_path("variants.bin"));
  worst w("mse");
  const auto& hp = g["mse/hyper"].values;
  const dino::ssl::mse_distillation loss({int(hp[0]), int(hp[1])});
  std::vector<float> ds;
  const double l = run_loss(loss, cview(g["mse/student"], "student"), cview(g["mse/teacher"], "teacher"), ds);
  check_close(w, "loss", &l, 1, g["mse/loss"]);
  check_close(w, "d student", ds.data(), ds.size(), g["mse/dstudent"]);
}

TEST_CASE("golden: InfoNCE (MoCo v2) against a full queue, and the queue update") {
  const dino_golden::file g(dino_golden::data_path("variants.bin"));
  worst w("info_nce");
  const auto& hp = g["infonce/hyper"].values;
  const auto queue = cview(g["infonce/queue"], "queue");
  const std::int64_t K = queue.cols(), M = std::int64_t(hp[2]);
  REQUIRE(queue.rows() == M);
  dino::ssl::info_nce<float> loss({int(hp[0]), int(hp[1]), K, M, hp[3]});
  // fill the queue with the reference's keys: one commit of M rows leaves head at 0, as MoCo's ptr
  loss.observe(cpu_policy{1}, queue);
  loss.commit();
  REQUIRE(loss.queued() == M);
  REQUIRE(loss.head() == 0);
  check_close(w, "queue (as loaded)", loss.queue().data, std::size_t(M * K), g["infonce/queue"]);
  const auto t = cview(g["infonce/teacher"], "teacher");
  std::vector<float> ds;
  const double l = run_loss(loss, cview(g["infonce/student"], "student"), t, ds);
  check_close(w, "loss", &l, 1, g["infonce/loss"]);
  check_close(w, "d student", ds.data(), ds.size(), g["infonce/dstudent"]);
  // after the step: both global crops' keys, enqueued at MoCo's ptr
  loss.observe(cpu_policy{1}, t);
  loss.commit();
  CHECK(loss.head() == t.rows());
  check_close(w, "queue after the step", loss.queue().data, std::size_t(M * K), g["infonce/new_queue"]);
}

TEST_CASE("golden: NT-Xent (SimCLR with 2 views; 2 + 2 crops)") {
  const dino_golden::file g(dino_golden::data_path("variants.bin"));
  for (const std::string prefix : {"ntx2/", "ntx4/"}) {
    CAPTURE(prefix);
    worst w("nt_xent " + prefix);
    const auto& hp = g[prefix + "hyper"].values;
    const dino::ssl::nt_xent<float> loss({int(hp[0]), int(hp[1]), hp[2]});
    std::vector<float> ds;
    const double l = run_loss(loss, cview(g[prefix + "student"], "student"), host_view<const float>{}, ds);
    check_close(w, "loss", &l, 1, g[prefix + "loss"]);
    check_close(w, "d student (all rows)", ds.data(), ds.size(), g[prefix + "dstudent"]);
  }
}
