// The DINO objective and optimizer on the CUDA policy against their CPU twins, on fresh
// random data: teacher targets and centering (observe, commit, discard), the fused
// distillation loss (2 + 4 and 2 + 0 crops, write and accumulate, loss returned or left in
// device memory, the non-finite report), the head's row operations (l2 normalise, weight
// norm, forward and backward), the whole DINO head, EMA and copy teacher updates, AdamW
// (groups, per-tensor steps, frozen and skipped tensors) and per-tensor clipping.
//
// Bounds are normwise (max |gpu - cpu| / max |cpu|, cuda_test_support.cuh), per operation:
//   softmax targets, entropies, losses, gradients   1e-5  (exp and a different sum order)
//   head row operations                             1e-5  (sums in double on the GPU, in T on the CPU)
//   center, EMA                                     1e-6  (one FMA contraction per element)
//   AdamW                                           1e-6 fp32 (the GPU rounds each operation as the CPU
//                                                   does; expected equal), 1e-12 double
//   clipping                                        1e-6, same count of clipped tensors
#include "cuda_test_support.cuh"

#include <cstring>
#include <string>
#include <utility>

using namespace dino_test;
using dino::cpu_policy;
using dino::device_space;
using dino::device_view;
using dino::host_view;

namespace {

const cpu_policy cpu{2};

template <class T>
void upload_into(dino::flat_params<T, device_space>& d, const dino::flat_params<T>& h) {
  REQUIRE(d.size() == h.size());
  dino::cuda::synchronize(gpu().stream());
  DINO_CUDA_CHECK(cudaMemcpy(d.data(), h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
}
template <class T>
std::vector<T> flat_host(const dino::flat_params<T>& h) {
  return std::vector<T>(h.data(), h.data() + h.size());
}
template <class T>
std::vector<T> flat_host(const dino::flat_params<T, device_space>& d) {
  return to_host_vec(d.data(), d.size());
}
template <class T>
double max_abs_diff(const std::vector<T>& a, const std::vector<T>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(double(a[i]) - double(b[i]));
    if (!(d <= worst)) worst = d;
  }
  return worst;
}

}  // namespace

// ----------------------------------------------------------------- teacher targets

TEST_CASE("cuda centering: observe, commit, discard and targets match the CPU") {
  const auto pol = gpu().policy();
  for (auto [rows, K] : {std::pair{1, 1}, std::pair{3, 7}, std::pair{130, 4099}, std::pair{3, 65536}, std::pair{2, 8192}}) {
    CAPTURE(rows);
    CAPTURE(K);
    dino::ssl::centering<float> hc({K, 0.9});
    dino::ssl::centering<float, device_space> dc({K, 0.9});
    settle();
    // Two steps of center updates (the second after a discarded one), so the center is not zero.
    for (int step = 0; step < 2; ++step) {
      auto t0 = random_vector<float>(static_cast<std::size_t>(rows) * K, 100 + step, -1, 1);
      auto dt0 = upload(t0);
      host_view<const float> h0{t0.data(), {rows, K}, "t0"};
      device_view<const float> d0{dt0.data(), {rows, K}, "t0"};
      if (step == 1) {  // a skipped step: observed, then discarded
        hc.observe(cpu, h0);
        dc.observe(pol, d0);
        hc.discard();
        dc.discard(pol);
        CHECK(dc.pending_rows() == 0);
      }
      hc.observe(cpu, h0);
      dc.observe(pol, d0);
      hc.observe(cpu, h0);  // two micro-batches
      dc.observe(pol, d0);
      CHECK(dc.pending_rows() == hc.pending_rows());
      hc.commit();
      dc.commit(pol);
      DINO_CHECK_CLOSE(to_host_vec(dc.center()), std::vector<float>(hc.center().data, hc.center().data + K), 1e-6);
    }
    // Targets with that center, teacher temperature 0.04, logits in [-1, 1] (cosines, as the head's).
    auto t = random_vector<float>(static_cast<std::size_t>(rows) * K, 7, -1, 1);
    std::vector<float> q(t.size()), ent(static_cast<std::size_t>(rows));
    const double h_mean = hc.targets(cpu, host_view<const float>{t.data(), {rows, K}, "t"}, 0.04,
                                     host_view<float>{q.data(), {rows, K}, "q"}, host_view<float>{ent.data(), {rows}, "H"});
    auto dt = upload(t);
    dino::cuda::device_buffer<float> dq(q.size()), dent(ent.size());
    const double d_mean = dc.targets(pol, device_view<const float>{dt.data(), {rows, K}, "t"}, 0.04,
                                     device_view<float>{dq.data(), {rows, K}, "q"},
                                     device_view<float>{dent.data(), {rows}, "H"});
    const double hb = entropy_bound((1.0 + max_abs(to_host_vec(dc.center()))) / 0.04, K, max_abs(ent));
    CAPTURE(hb);
    DINO_CHECK_CLOSE(download(dq), q, 1e-5);
    CHECK(max_abs_diff(download(dent), ent) <= hb);
    CHECK(std::abs(d_mean - h_mean) <= hb);
    // The form that leaves the mean entropy on the device: *value = 1 + 0.5 * mean.
    auto dscalar = upload(std::vector<double>{1.0});
    dc.targets(pol, device_view<const float>{dt.data(), {rows, K}, "t"}, 0.04, device_view<float>{dq.data(), {rows, K}, "q"},
               device_view<float>{dent.data(), {rows}, "H"}, dino::scalar_out{dscalar.data(), 0.5, true});
    CHECK(std::abs(download(dscalar)[0] - (1.0 + 0.5 * h_mean)) <= hb);
  }
}

TEST_CASE("cuda softmax_targets without a center, and rows of very different scales") {
  const std::int64_t rows = 5, K = 4099;
  auto t = random_vector<float>(static_cast<std::size_t>(rows * K), 11, -40, 40);
  std::vector<float> q(t.size()), ent(static_cast<std::size_t>(rows));
  dino::softmax_targets(cpu, t.data(), static_cast<const float*>(nullptr), q.data(), ent.data(), rows, K, 1.0f / 0.07f);
  auto dt = upload(t);
  dino::cuda::device_buffer<float> dq(q.size()), dent(ent.size());
  dino::softmax_targets(gpu().policy(), dt.data(), static_cast<const float*>(nullptr), dq.data(), dent.data(), rows, K,
                        1.0f / 0.07f);
  // |z| = |t| / 0.07 reaches 570 here: one rounding of z moves p by |z| * 6e-8 relative,
  // so these rows get 3e-5 (the other softmax tests keep 1e-5).
  DINO_CHECK_CLOSE(download(dq), q, 3e-5);
  CHECK(max_abs_diff(download(dent), ent) <= entropy_bound(40.0 / 0.07, K, max_abs(ent)));
}

// ----------------------------------------------------------------- distillation loss

namespace {

/// Teacher targets: softmax rows of random logits (the CPU's), as the loss sees them.
std::vector<float> target_rows(std::int64_t rows, std::int64_t K, std::uint64_t seed) {
  auto t = random_vector<float>(static_cast<std::size_t>(rows * K), seed, -4, 4);
  std::vector<float> q(t.size()), ent(static_cast<std::size_t>(rows));
  dino::softmax_targets(cpu, t.data(), static_cast<const float*>(nullptr), q.data(), ent.data(), rows, K, 1.0f / 0.04f);
  return q;
}

void check_distillation(int n_crops, int n_global, std::int64_t B, std::int64_t K) {
  CAPTURE(n_crops);
  CAPTURE(n_global);
  CAPTURE(B);
  CAPTURE(K);
  const auto pol = gpu().policy();
  const dino::ssl::cross_entropy_distillation loss({n_crops, n_global, 0.1});
  const std::int64_t ns = n_crops * B, nt = n_global * B;
  auto s = random_vector<float>(static_cast<std::size_t>(ns * K), 21 + K, -8, 8);
  auto q = target_rows(nt, K, 22 + K);
  auto ds0 = random_vector<float>(s.size(), 23 + K);
  auto dS = upload(s), dQ = upload(q);
  host_view<const float> hs{s.data(), {ns, K}, "s"}, hq{q.data(), {nt, K}, "q"};
  device_view<const float> gs{dS.data(), {ns, K}, "s"}, gq{dQ.data(), {nt, K}, "q"};
  if (K == 1) {
    // One prototype: the loss and its gradient are exactly 0; both sides hold only the
    // rounding of lse * mass - q.s / tau (|s / tau| up to 80), so each is checked against 0.
    std::vector<float> row(static_cast<std::size_t>(ns)), ds(s.size());
    const double l_cpu = loss.forward_backward(cpu, hs, hq, host_view<float>{row.data(), {ns}, "row"},
                                               host_view<float>{ds.data(), {ns, K}, "ds"}, 0.5, false);
    dino::cuda::device_buffer<float> drow(row.size()), dds(ds.size());
    const double l_gpu = loss.forward_backward(pol, gs, gq, device_view<float>{drow.data(), {ns}, "row"},
                                               device_view<float>{dds.data(), {ns, K}, "ds"}, 0.5, false);
    CHECK(std::abs(l_cpu) <= 1e-4);
    CHECK(std::abs(l_gpu) <= 1e-4);
    CHECK(max_abs(download(dds)) <= 1e-5);
    CHECK(max_abs(ds) <= 1e-5);
    return;
  }
  for (bool accumulate : {false, true}) {
    CAPTURE(accumulate);
    const double dloss = 0.5;
    std::vector<float> row(static_cast<std::size_t>(ns)), ds = ds0;
    const double l_cpu = loss.forward_backward(cpu, hs, hq, host_view<float>{row.data(), {ns}, "row"},
                                               host_view<float>{ds.data(), {ns, K}, "ds"}, dloss, accumulate);
    dino::cuda::device_buffer<float> drow(row.size());
    auto dds = upload(ds0);
    const double l_gpu = loss.forward_backward(pol, gs, gq, device_view<float>{drow.data(), {ns}, "row"},
                                               device_view<float>{dds.data(), {ns, K}, "ds"}, dloss, accumulate);
    CHECK(rel(l_gpu, l_cpu) <= 1e-5);
    DINO_CHECK_CLOSE(download(drow), row, 1e-5);
    DINO_CHECK_CLOSE(download(dds), ds, 1e-5);
    // The loss left on the device (accumulated with a weight), the gradient again.
    auto dscalar = upload(std::vector<double>{2.0});
    auto dds2 = upload(ds0);
    loss.forward_backward(pol, gs, gq, device_view<float>{drow.data(), {ns}, "row"},
                          device_view<float>{dds2.data(), {ns, K}, "ds"}, dloss, accumulate,
                          dino::scalar_out{dscalar.data(), 0.25, true});
    CHECK(rel(download(dscalar)[0], 2.0 + 0.25 * l_cpu) <= 1e-5);
    DINO_CHECK_CLOSE(download(dds2), ds, 1e-5);
  }
  // Forward only, both forms.
  std::vector<float> row(static_cast<std::size_t>(ns));
  const double l_cpu = loss.forward(cpu, hs, hq, host_view<float>{row.data(), {ns}, "row"});
  dino::cuda::device_buffer<float> drow(row.size());
  CHECK(rel(loss.forward(pol, gs, gq, device_view<float>{drow.data(), {ns}, "row"}), l_cpu) <= 1e-5);
  DINO_CHECK_CLOSE(download(drow), row, 1e-5);
  dino::cuda::device_buffer<double> dscalar(1);
  loss.forward(pol, gs, gq, device_view<float>{drow.data(), {ns}, "row"}, dino::scalar_out{dscalar.data()});
  CHECK(rel(download(dscalar)[0], l_cpu) <= 1e-5);
}

}  // namespace

TEST_CASE("cuda distillation loss and gradient match the CPU: 2 + 4 crops") {
  for (std::int64_t K : {1, 7, 4099}) check_distillation(6, 2, 3, K);
  check_distillation(6, 2, 1, 65536);
}

TEST_CASE("cuda distillation loss and gradient match the CPU: 2 + 0 crops, one teacher, 130 rows") {
  for (std::int64_t K : {1, 7, 4099}) check_distillation(2, 2, 1, K);
  check_distillation(2, 2, 65, 4099);  // 130 student rows
  check_distillation(2, 2, 2, 65536);
  check_distillation(3, 1, 3, 7);  // crop 0 has no teacher: its row loss and gradient are 0
  check_distillation(10, 2, 1, 8192);
}

TEST_CASE("cuda distillation names the first non-finite input as the CPU does") {
  const dino::ssl::cross_entropy_distillation loss({2, 2, 0.1});
  const std::int64_t B = 3, K = 7, ns = 6, nt = 6;
  auto s = random_vector<float>(static_cast<std::size_t>(ns * K), 31);
  auto q = target_rows(nt, K, 32);
  s[static_cast<std::size_t>(4 * K + 5)] = std::nanf("");
  s[static_cast<std::size_t>(5 * K + 1)] = INFINITY;
  std::vector<float> row(static_cast<std::size_t>(ns));
  std::string cpu_msg, gpu_msg;
  try {
    loss.forward(cpu, host_view<const float>{s.data(), {ns, K}, "student logits"},
                 host_view<const float>{q.data(), {nt, K}, "teacher targets"}, host_view<float>{row.data(), {ns}, "row"});
  } catch (const dino::numeric_error& e) {
    cpu_msg = e.what();
  }
  auto dS = upload(s), dQ = upload(q);
  dino::cuda::device_buffer<float> drow(row.size());
  try {
    loss.forward(gpu().policy(), device_view<const float>{dS.data(), {ns, K}, "student logits"},
                 device_view<const float>{dQ.data(), {nt, K}, "teacher targets"},
                 device_view<float>{drow.data(), {ns}, "row"});
  } catch (const dino::numeric_error& e) {
    gpu_msg = e.what();
  }
  CHECK(!cpu_msg.empty());
  CHECK(gpu_msg == cpu_msg);
  CHECK(gpu_msg.find("row 4, column 5") != std::string::npos);
  (void)B;
}

TEST_CASE("cuda sum_to, sum_to_host and first_non_finite") {
  const auto pol = gpu().policy();
  for (std::int64_t n : {1, 7, 130, 4099, 100003}) {
    CAPTURE(n);
    auto x = random_vector<float>(static_cast<std::size_t>(n), 41 + n);
    double ref = 0;
    dino::sum_to(cpu, x.data(), n, 3.0, dino::scalar_out{&ref});
    auto dx = upload(x);
    CHECK(rel(dino::sum_to_host(pol, dx.data(), n, 3.0), ref) <= 1e-12);
    auto dv = upload(std::vector<double>{1.5});
    dino::sum_to(pol, dx.data(), n, 3.0, dino::scalar_out{dv.data(), -2.0, true});
    CHECK(rel(download(dv)[0], 1.5 - 2.0 * ref) <= 1e-12);
    CHECK(dino::first_non_finite(pol, dx.data(), n).index == -1);
    x[static_cast<std::size_t>(n - 1)] = -INFINITY;
    if (n > 3) x[static_cast<std::size_t>(n / 2)] = std::nanf("");
    auto dy = upload(x);
    const auto c = dino::first_non_finite(cpu, x.data(), n), g = dino::first_non_finite(pol, dy.data(), n);
    CHECK(g.index == c.index);
    CHECK(std::isnan(g.value) == std::isnan(c.value));
  }
}

// ----------------------------------------------------------------- the head's rows

namespace {
/// The rows of a [rows, n] matrix other than row r (all of them when r is out of range or rows <= 3).
std::vector<float> without_row(const std::vector<float>& x, std::int64_t r, std::int64_t n, std::int64_t rows) {
  if (rows <= 3 || r >= rows) return x;
  std::vector<float> out(x.begin(), x.begin() + r * n);
  out.insert(out.end(), x.begin() + (r + 1) * n, x.end());
  return out;
}
}  // namespace

TEST_CASE("cuda l2_normalize_rows forward and backward match the CPU") {
  const auto pol = gpu().policy();
  for (auto [rows, n] : {std::pair{1, 1}, std::pair{3, 7}, std::pair{130, 256}, std::pair{9, 385}}) {
    CAPTURE(rows);
    CAPTURE(n);
    auto x = random_vector<float>(static_cast<std::size_t>(rows) * n, 51 + n);
    if (rows > 3)
      for (int i = 0; i < n; ++i) x[static_cast<std::size_t>(2 * n + i)] = 1e-14f;  // ||x|| < eps: the constant-denominator branch
    std::vector<float> y(x.size()), norms(static_cast<std::size_t>(rows));
    dino::l2_normalize_rows(cpu, static_cast<const float*>(x.data()), y.data(), norms.data(), rows, n, 1e-12f);
    auto dx = upload(x);
    dino::cuda::device_buffer<float> dy(y.size()), dn(norms.size());
    dino::l2_normalize_rows(pol, static_cast<const float*>(dx.data()), dy.data(), dn.data(), rows, n, 1e-12f);
    DINO_CHECK_CLOSE(download(dy), y, 1e-5);
    DINO_CHECK_CLOSE(without_row(download(dn), 2, 1, rows), without_row(norms, 2, 1, rows), 1e-5);
    if (rows > 3) CHECK(rel(download(dn)[2], norms[2]) <= 1e-5);
    auto g = random_vector<float>(x.size(), 52 + n);
    auto dg = upload(g);
    for (bool accumulate : {false, true}) {
      CAPTURE(accumulate);
      auto gx = random_vector<float>(x.size(), 53 + n);
      auto dgx = upload(gx);
      dino::l2_normalize_rows_backward(cpu, static_cast<const float*>(y.data()), static_cast<const float*>(norms.data()),
                                       static_cast<const float*>(g.data()), gx.data(), rows, n, 1e-12f, accumulate);
      // The GPU backward from the CPU's forward outputs, so that only the backward is compared.
      auto hy = upload(y), hn = upload(norms);
      dino::l2_normalize_rows_backward(pol, static_cast<const float*>(hy.data()), static_cast<const float*>(hn.data()),
                                       static_cast<const float*>(dg.data()), dgx.data(), rows, n, 1e-12f, accumulate);
      // Row 2 (below eps: dy / eps, of size 1e12) is compared on its own, the others normwise.
      const auto got = download(dgx);
      DINO_CHECK_CLOSE(without_row(got, 2, n, rows), without_row(gx, 2, n, rows), 1e-5);
      if (rows > 3)
        DINO_CHECK_CLOSE(std::vector<float>(got.begin() + 2 * n, got.begin() + 3 * n),
                         std::vector<float>(gx.begin() + 2 * n, gx.begin() + 3 * n), 1e-6);
    }
  }
}

TEST_CASE("cuda weight_norm_rows forward and backward match the CPU, with and without dg") {
  const auto pol = gpu().policy();
  for (auto [K, n] : {std::pair{1, 7}, std::pair{7, 256}, std::pair{4099, 7}, std::pair{4099, 256}}) {
    CAPTURE(K);
    CAPTURE(n);
    auto g = random_vector<float>(static_cast<std::size_t>(K), 61, 0.5, 2.0);
    auto v = random_vector<float>(static_cast<std::size_t>(K) * n, 62 + n);
    std::vector<float> w(v.size()), vn(static_cast<std::size_t>(K));
    dino::weight_norm_rows(cpu, static_cast<const float*>(g.data()), static_cast<const float*>(v.data()), w.data(),
                           vn.data(), K, n);
    auto dg = upload(g), dv = upload(v);
    dino::cuda::device_buffer<float> dw(w.size()), dvn(vn.size());
    dino::weight_norm_rows(pol, static_cast<const float*>(dg.data()), static_cast<const float*>(dv.data()), dw.data(),
                           dvn.data(), K, n);
    DINO_CHECK_CLOSE(download(dw), w, 1e-5);
    DINO_CHECK_CLOSE(download(dvn), vn, 1e-5);
    auto gw = random_vector<float>(w.size(), 63 + n);
    auto dgw = upload(gw), hvn = upload(vn);
    for (bool with_dg : {false, true}) {
      CAPTURE(with_dg);
      auto gg = random_vector<float>(static_cast<std::size_t>(K), 64), gv = random_vector<float>(v.size(), 65);
      auto dgg = upload(gg), dgv = upload(gv);
      dino::weight_norm_rows_backward(cpu, static_cast<const float*>(g.data()), static_cast<const float*>(v.data()),
                                      static_cast<const float*>(vn.data()), static_cast<const float*>(gw.data()),
                                      with_dg ? gg.data() : nullptr, gv.data(), K, n);
      dino::weight_norm_rows_backward(pol, static_cast<const float*>(dg.data()), static_cast<const float*>(dv.data()),
                                      static_cast<const float*>(hvn.data()), static_cast<const float*>(dgw.data()),
                                      with_dg ? dgg.data() : nullptr, dgv.data(), K, n);
      DINO_CHECK_CLOSE(download(dgg), gg, 1e-5);  // untouched without dg
      DINO_CHECK_CLOSE(download(dgv), gv, 1e-5);
    }
  }
}

// The whole head needs nn::mlp on the CUDA policy: on with the nn operations' CUDA header.
#if __has_include(<dino/policy/cuda/nn_ops.cuh>) || defined(DINO_TEST_WHOLE_HEAD)
TEST_CASE("cuda dino_head forward, inference and backward match the CPU") {
  const auto pol = gpu().policy();
  for (bool norm_last : {true, false}) {
    CAPTURE(norm_last);
    dino::param_layout L;
    dino::ssl::dino_head head({24, 4099, 40, 16, 3, norm_last}, L);
    dino::flat_params<float> P(L), G(L);
    dino::nn::initialize(P, 71);
    dino::flat_params<float, device_space> dP(L), dG(L);
    settle();
    upload_into(dP, P);
    const std::int64_t n = 13;
    auto x = random_vector<float>(static_cast<std::size_t>(n * 24), 72);
    auto dy = random_vector<float>(static_cast<std::size_t>(n * 4099), 73);
    std::vector<float> y(static_cast<std::size_t>(n * 4099)), saved(head.saved_elems(n)), scratch(head.scratch_elems(n)),
        dx(static_cast<std::size_t>(n * 24));
    head.forward(cpu, std::as_const(P).all(), host_view<const float>{x.data(), {n, 24}}, host_view<float>{y.data(), {n, 4099}},
                 host_view<float>{saved.data(), {std::int64_t(saved.size())}});
    head.backward(cpu, std::as_const(P).all(), host_view<const float>{x.data(), {n, 24}},
                  host_view<const float>{saved.data(), {std::int64_t(saved.size())}},
                  host_view<const float>{dy.data(), {n, 4099}}, host_view<float>{dx.data(), {n, 24}},
                  dino::grad_mode::write, G.all(), host_view<float>{scratch.data(), {std::int64_t(scratch.size())}});
    auto gx = upload(x), gdy = upload(dy);
    dino::cuda::device_buffer<float> gy(y.size()), gsaved(saved.size()), gscratch(scratch.size()), gdx(dx.size());
    head.forward(pol, std::as_const(dP).all(), device_view<const float>{gx.data(), {n, 24}}, device_view<float>{gy.data(), {n, 4099}},
                 device_view<float>{gsaved.data(), {std::int64_t(saved.size())}});
    DINO_CHECK_CLOSE(download(gy), y, 1e-5);
    head.backward(pol, std::as_const(dP).all(), device_view<const float>{gx.data(), {n, 24}},
                  device_view<const float>{gsaved.data(), {std::int64_t(saved.size())}},
                  device_view<const float>{gdy.data(), {n, 4099}}, device_view<float>{gdx.data(), {n, 24}},
                  dino::grad_mode::write, dG.all(), device_view<float>{gscratch.data(), {std::int64_t(scratch.size())}});
    DINO_CHECK_CLOSE(download(gdx), dx, 1e-5);
    DINO_CHECK_CLOSE(flat_host(dG), flat_host(G), 1e-5);
    // Inference: no saved state, the same logits.
    dino::cuda::device_buffer<float> gy2(y.size());
    head.infer(pol, std::as_const(dP).all(), device_view<const float>{gx.data(), {n, 24}}, device_view<float>{gy2.data(), {n, 4099}},
               device_view<float>{gscratch.data(), {std::int64_t(scratch.size())}});
    DINO_CHECK_CLOSE(download(gy2), y, 1e-5);
  }
}
#endif

// ----------------------------------------------------------------- teacher update, optimizer

TEST_CASE("cuda ema and copy teacher updates match the CPU") {
  const auto pol = gpu().policy();
  for (std::int64_t n : {1, 7, 4099, (1 << 20) + 3}) {
    CAPTURE(n);
    auto t = random_vector<float>(static_cast<std::size_t>(n), 81), s = random_vector<float>(static_cast<std::size_t>(n), 82);
    auto dt = upload(t), ds = upload(s);
    for (double m : {0.996, 0.5, 1.0, 0.0}) {
      dino::ssl::ema(cpu, host_view<float>{t.data(), {n}}, host_view<const float>{s.data(), {n}}, m);
      dino::ssl::ema(pol, device_view<float>{dt.data(), {n}}, device_view<const float>{ds.data(), {n}}, m);
    }
    DINO_CHECK_CLOSE(download(dt), t, 1e-6);
  }
  dino::param_layout L;
  L.add("a", {7, 13}, dino::param_none, dino::param_init::zeros);
  L.add("b", {4099}, dino::param_frozen, dino::param_init::zeros);
  dino::flat_params<float> ht(L), hs(L);
  auto r1 = random_vector<float>(L.size(), 83), r2 = random_vector<float>(L.size(), 84);
  std::copy(r1.begin(), r1.end(), ht.data());
  std::copy(r2.begin(), r2.end(), hs.data());
  dino::flat_params<float, device_space> dt(L), ds(L);
  settle();
  upload_into(dt, ht);
  upload_into(ds, hs);
  dino::ssl::ema_update{}(cpu, ht, hs, 0.99);
  dino::ssl::ema_update{}(pol, dt, ds, 0.99);
  DINO_CHECK_CLOSE(flat_host(dt), flat_host(ht), 1e-6);
  dino::ssl::copy_update{}(pol, dt, ds, 0.0);
  CHECK(flat_host(dt) == flat_host(hs));
}

namespace {

dino::param_layout optimizer_layout() {
  dino::param_layout L;
  L.add("w", {7, 13}, dino::param_none, dino::param_init::zeros);
  L.add("b", {13}, dino::param_no_weight_decay, dino::param_init::zeros);
  L.add("frozen", {5, 3}, dino::param_frozen, dino::param_init::zeros);
  L.add("big", {70001}, dino::param_none, dino::param_init::zeros);
  for (int i = 0; i < 40; ++i)  // more tensors than one launch takes
    L.add("t" + std::to_string(i), {std::int64_t(1 + 37 * i)}, i % 3 ? dino::param_none : dino::param_no_weight_decay,
          dino::param_init::zeros);
  L.add("last_layer.weight_g", {4099, 1}, dino::param_last_layer | dino::param_frozen, dino::param_init::zeros);
  L.add("last_layer.weight_v", {4099, 5}, dino::param_last_layer, dino::param_init::zeros);
  return L;
}

template <class T>
void check_adamw(double bound) {
  const auto pol = gpu().policy();
  const dino::param_layout L = optimizer_layout();
  dino::flat_params<T> P(L), G(L);
  auto p0 = random_vector<T>(L.size(), 91);
  std::copy(p0.begin(), p0.end(), P.data());
  dino::flat_params<T, device_space> dP(L), dG(L);
  dino::optim::adamw<T> h(L);
  dino::optim::adamw<T, device_space> d(L);
  settle();
  upload_into(dP, P);
  for (int step = 0; step < 5; ++step) {
    CAPTURE(step);
    auto g = random_vector<T>(L.size(), 92 + step, -2, 2);
    std::copy(g.begin(), g.end(), G.data());
    upload_into(dG, G);
    const unsigned skip = step < 2 ? unsigned(dino::param_last_layer) : unsigned(dino::param_none);  // frozen last layer
    const double lr = 1e-3 * (step + 1), wd = 0.04 + 0.01 * step;
    h.step(cpu, P, G, lr, wd, skip);
    d.step(pol, dP, dG, lr, wd, skip);
    DINO_CHECK_CLOSE(flat_host(dP), flat_host(P), bound);
    DINO_CHECK_CLOSE(flat_host(d.exp_avg()), flat_host(h.exp_avg()), bound);
    DINO_CHECK_CLOSE(flat_host(d.exp_avg_sq()), flat_host(h.exp_avg_sq()), bound);
    CHECK(d.steps() == h.steps());
  }
  // Frozen tensors and padding never move.
  const auto after = flat_host(dP);
  const auto& fr = L.at("frozen");
  for (std::size_t i = fr.offset; i < fr.offset + fr.numel(); ++i) CHECK(after[i] == p0[i]);
  const auto& lg = L.at("last_layer.weight_g");
  for (std::size_t i = lg.offset; i < lg.offset + lg.numel(); ++i) CHECK(after[i] == p0[i]);
  CHECK(d.steps()[static_cast<std::size_t>(&L.at("last_layer.weight_v") - L.entries().data())] == 3);
}

}  // namespace

TEST_CASE("cuda AdamW matches the CPU over steps: groups, per-tensor steps, frozen and skipped tensors") {
  check_adamw<float>(1e-6);
  check_adamw<double>(1e-12);
}

TEST_CASE("cuda per-step values read on the device (step_value::read_at) give what the values give") {
  // What a step graph relies on (ssl::method::use_step_graphs): the same kernels, the value
  // read when they run instead of passed at launch.
  const auto pol = gpu().policy();
  const std::int64_t n = 4099;
  const auto s = random_vector<float>(std::size_t(n), 61), t = random_vector<float>(std::size_t(n), 62);
  auto dt1 = upload(t), dt2 = upload(t), ds = upload(s);
  auto dm = upload(std::vector<double>{0.9731});
  dino::ssl::ema(pol, device_view<float>{dt1.data(), {n}}, device_view<const float>{ds.data(), {n}}, 0.9731);
  dino::ssl::ema(pol, device_view<float>{dt2.data(), {n}}, device_view<const float>{ds.data(), {n}},
                 dino::step_value<double>::read_at(dm.data()));
  CHECK(download(dt1) == download(dt2));
  // centering targets at a temperature read on the device
  const std::int64_t rows = 5, K = 8192;
  dino::ssl::centering<float, device_space> dc({K, 0.9});
  const auto tl = random_vector<float>(std::size_t(rows * K), 63, -1, 1);
  auto dl = upload(tl);
  auto dtau = upload(std::vector<double>{0.0613});
  dino::cuda::device_buffer<float> q1(tl.size()), q2(tl.size()), e1(rows), e2(rows);
  auto h = upload(std::vector<double>{0.0, 0.0});
  const device_view<const float> lv{dl.data(), {rows, K}, "t"};
  dc.targets(pol, lv, 0.0613, device_view<float>{q1.data(), {rows, K}, "q"}, device_view<float>{e1.data(), {rows}, "H"},
             dino::scalar_out{h.data(), 1.0, false});
  dc.targets(pol, lv, dino::step_value<double>::read_at(dtau.data()), device_view<float>{q2.data(), {rows, K}, "q"},
             device_view<float>{e2.data(), {rows}, "H"}, dino::scalar_out{h.data() + 1, 1.0, false});
  CHECK(download(q1) == download(q2));
  CHECK(download(e1) == download(e2));
  const auto hh = download(h);
  CHECK(hh[0] == hh[1]);
  // AdamW: the learning rate and weight decay read on the device, the coefficients derived
  // from them and the device's step counts; a frozen last layer for the first two steps
  const dino::param_layout L = optimizer_layout();
  dino::flat_params<float> P(L), G(L);
  const auto p0 = random_vector<float>(L.size(), 64);
  std::copy(p0.begin(), p0.end(), P.data());
  dino::flat_params<float, device_space> dP1(L), dP2(L), dG(L);
  dino::optim::adamw<float, device_space> o1(L), o2(L);
  settle();
  upload_into(dP1, P);
  upload_into(dP2, P);
  auto dlr = upload(std::vector<double>{0.0, 0.0});
  for (int step = 0; step < 5; ++step) {
    CAPTURE(step);
    const auto g = random_vector<float>(L.size(), 65 + step, -2, 2);
    std::copy(g.begin(), g.end(), G.data());
    upload_into(dG, G);
    const unsigned skip = step < 2 ? unsigned(dino::param_last_layer) : unsigned(dino::param_none);
    const double lr = 1e-3 * (step + 1), wd = 0.04 + 0.01 * step;
    const std::vector<double> lw{lr, wd};
    dino::view_from_host(device_view<double>{dlr.data(), {2}, "lr, wd"}, lw.data());
    o1.step(pol, dP1, dG, lr, wd, skip);
    o2.step(pol, dP2, dG, dino::step_value<double>::read_at(dlr.data()),
            dino::step_value<double>::read_at(dlr.data() + 1), skip);
    DINO_CHECK_CLOSE(flat_host(dP2), flat_host(dP1), 1e-7);
    DINO_CHECK_CLOSE(flat_host(o2.exp_avg_sq()), flat_host(o1.exp_avg_sq()), 1e-7);
    CHECK(o2.steps() == o1.steps());
  }
}

TEST_CASE("cuda per-tensor gradient clipping matches the CPU") {
  const auto pol = gpu().policy();
  const dino::param_layout L = optimizer_layout();
  dino::flat_params<float> G(L);
  auto g = random_vector<float>(L.size(), 101, -1, 1);
  // Tensors of very different norms: some are clipped, some not.
  int j = 0;
  for (const auto& e : L.entries()) {
    const float scale = (j++ % 2) ? 1e-3f : 5.0f;
    for (std::size_t i = e.offset; i < e.offset + e.numel(); ++i) g[i] *= scale;
  }
  std::copy(g.begin(), g.end(), G.data());
  for (unsigned skip : {unsigned(dino::param_none), unsigned(dino::param_last_layer)}) {
    CAPTURE(skip);
    dino::flat_params<float> H(L);
    std::copy(g.begin(), g.end(), H.data());
    dino::flat_params<float, device_space> D(L);
    settle();
    upload_into(D, G);
    const int n_cpu = dino::optim::clip_gradients(cpu, H, 3.0, skip);
    const int n_gpu = dino::optim::clip_gradients(pol, D, 3.0, skip);
    CHECK(n_cpu > 0);
    CHECK(n_gpu == n_cpu);
    DINO_CHECK_CLOSE(flat_host(D), flat_host(H), 1e-6);
    // The form that leaves the count on the device.
    upload_into(D, G);
    dino::cuda::device_buffer<int> count(1);
    dino::optim::clip_gradients(pol, D, 3.0, skip, count.data());
    CHECK(download(count)[0] == n_cpu);
    DINO_CHECK_CLOSE(flat_host(D), flat_host(H), 1e-6);
  }
  // Tensors above clip_split_elems are summed and scaled by several blocks: one clipped, one
  // not, one of an odd size (a last chunk shorter than the others), between small ones.
  {
    dino::param_layout B;
    B.add("small", {1000}, dino::param_none, dino::param_init::zeros);
    B.add("head.last_layer", {2 * dino::cuda::optim_kernels::clip_split_elems + 12345}, dino::param_none,
          dino::param_init::zeros);
    B.add("quiet", {dino::cuda::optim_kernels::clip_split_elems + 1}, dino::param_none, dino::param_init::zeros);
    B.add("tail", {77}, dino::param_none, dino::param_init::zeros);
    auto gb = random_vector<float>(B.size(), 103, -1, 1);
    const auto& quiet = B.entries()[2];
    for (std::size_t i = quiet.offset; i < quiet.offset + quiet.numel(); ++i) gb[i] *= 1e-6f;  // norm about 1.2e-3
    dino::flat_params<float> H(B);
    std::copy(gb.begin(), gb.end(), H.data());
    dino::flat_params<float, device_space> D(B);
    upload_into(D, H);
    const int n_cpu = dino::optim::clip_gradients(cpu, H, 3.0, unsigned(dino::param_none));
    const int n_gpu = dino::optim::clip_gradients(pol, D, 3.0, unsigned(dino::param_none));
    CHECK(n_cpu == 3);  // all but "quiet"
    CHECK(n_gpu == n_cpu);
    DINO_CHECK_CLOSE(flat_host(D), flat_host(H), 1e-6);
  }
  for (std::int64_t n : {1, 4099, 100003}) {
    auto x = random_vector<float>(static_cast<std::size_t>(n), 102);
    auto dx = upload(x);
    CHECK(rel(dino::optim::l2_norm(pol, dx.data(), n), dino::optim::l2_norm(cpu, x.data(), n)) <= 1e-12);
  }
}
