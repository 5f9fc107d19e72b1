// The variant parts on the CUDA policy against their CPU twins, on fresh random data with odd
// sizes: Sinkhorn-Knopp targets, the raw and sharpen-only targets, the MSE distillation loss,
// InfoNCE with its queue (observe, commit, a skipped commit, a queue that wraps, an empty
// queue), NT-Xent, and the copy / no-teacher updates. Each loss: forward, forward_backward
// writing and accumulating, and the form that leaves the loss in device memory.
// (test_cuda_variant_presets.cu runs every preset on a tiny ViT, GPU against CPU.)
//
// Bounds are normwise (max |gpu - cpu| / max |cpu|, cuda_test_support.cuh), per part:
//   Sinkhorn-Knopp q, entropies, mean       1e-6  (double on both sides; the per-prototype sums
//                                                  in the CPU's order, the per-sample ones not)
//   MSE loss, rows, gradients               1e-6  (double on both sides, rounded to fp32 once)
//   InfoNCE, NT-Xent loss, rows, gradients  1e-5  (fp32 GEMMs of another summation order, then
//                                                  exp of logits / tau: tau 0.2 and 0.1 scale
//                                                  their rounding by 5 and 10)
//   queue rows after commits                1e-6  (the normalisation in double, rounded once)
//   raw targets                             exact (a copy); their entropies as softmax_targets'
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


/// A pair loss's CPU and GPU runs on the same random inputs: student s [V B, K], teacher
/// rows q [G B, K] (q unused by NT-Xent).
struct pair_data {
  std::int64_t ns, nt, K;
  std::vector<float> s, q, ds0;
  dino::cuda::device_buffer<float> dS, dQ;
  pair_data(int V, int G, std::int64_t B, std::int64_t K_, std::uint64_t seed, double lo = -3, double hi = 3)
      : ns(V * B), nt(G * B), K(K_) {
    s = random_vector<float>(std::size_t(ns * K), seed, lo, hi);
    q = random_vector<float>(std::size_t(nt * K), seed + 1, lo, hi);
    ds0 = random_vector<float>(s.size(), seed + 2);
    dS = upload(s);
    dQ = upload(q);
  }
  host_view<const float> hs() const { return {s.data(), {ns, K}, "s"}; }
  host_view<const float> hq() const { return {q.data(), {nt, K}, "q"}; }
  device_view<const float> gs() const { return {dS.data(), {ns, K}, "s"}; }
  device_view<const float> gq() const { return {dQ.data(), {nt, K}, "q"}; }
};

/// forward, forward_backward (write, accumulate) and the scalar_out forms of a loss whose
/// CPU object is cl and GPU object gl, under the bound.
template <class CL, class GL>
void check_pair_loss(const CL& cl, const GL& gl, const pair_data& d, double bound) {
  const auto pol = gpu().policy(false);
  const std::int64_t ns = d.ns, K = d.K;
  std::vector<float> row(static_cast<std::size_t>(ns));
  dino::cuda::device_buffer<float> drow(row.size()), dds(d.s.size());
  const double f_cpu = cl.forward(cpu, d.hs(), d.hq(), host_view<float>{row.data(), {ns}, "row"});
  const double f_gpu = gl.forward(pol, d.gs(), d.gq(), device_view<float>{drow.data(), {ns}, "row"});
  CHECK(rel(f_gpu, f_cpu) <= bound);
  DINO_CHECK_CLOSE(download(drow), row, bound);
  for (bool accumulate : {false, true}) {
    CAPTURE(accumulate);
    const double dloss = 0.75;
    std::vector<float> ds = d.ds0;
    DINO_CUDA_CHECK(cudaMemcpy(dds.data(), d.ds0.data(), ds.size() * sizeof(float), cudaMemcpyHostToDevice));
    const double l_cpu = cl.forward_backward(cpu, d.hs(), d.hq(), host_view<float>{row.data(), {ns}, "row"},
                                             host_view<float>{ds.data(), {ns, K}, "ds"}, dloss, accumulate);
    const double l_gpu = gl.forward_backward(pol, d.gs(), d.gq(), device_view<float>{drow.data(), {ns}, "row"},
                                             device_view<float>{dds.data(), {ns, K}, "ds"}, dloss, accumulate);
    CHECK(rel(l_gpu, l_cpu) <= bound);
    CHECK(rel(l_cpu, f_cpu) <= 1e-12);
    DINO_CHECK_CLOSE(download(drow), row, bound);
    DINO_CHECK_CLOSE(download(dds), ds, bound);
    // The loss left on the device: *value = 2 + 0.5 * loss (accumulating).
    auto dval = upload(std::vector<double>{2.0});
    gl.forward_backward(pol, d.gs(), d.gq(), device_view<float>{drow.data(), {ns}, "row"},
                        device_view<float>{dds.data(), {ns, K}, "ds"}, dloss, false,
                        dino::scalar_out{dval.data(), 0.5, true});
    CHECK(rel(download(dval)[0], 2.0 + 0.5 * l_cpu) <= bound);
    auto fval = upload(std::vector<double>{0.0});
    gl.forward(pol, d.gs(), d.gq(), device_view<float>{drow.data(), {ns}, "row"},
               dino::scalar_out{fval.data(), 1.0, false});
    CHECK(rel(download(fval)[0], l_cpu) <= bound);
  }
}

}  // namespace

// ----------------------------------------------------------------- targets

TEST_CASE("cuda sinkhorn_knopp: targets and entropies match the CPU") {
  const auto pol = gpu().policy(false);
  for (auto [R, K] : {std::pair{1, 1}, std::pair{3, 7}, std::pair{37, 1001}, std::pair{6, 8193}, std::pair{129, 3000}}) {
    for (double tau : {0.05, 0.1}) {
      CAPTURE(R);
      CAPTURE(K);
      CAPTURE(tau);
      dino::ssl::sinkhorn_knopp<float> hs({K, 3});
      dino::ssl::sinkhorn_knopp<float, device_space> gs({K, 3});
      gs.reserve(R, K);
      settle();
      auto t = random_vector<float>(std::size_t(R) * K, 40 + K, -1, 1);
      std::vector<float> q(t.size()), ent(static_cast<std::size_t>(R));
      const double h_cpu = hs.targets(cpu, host_view<const float>{t.data(), {R, K}, "t"}, tau,
                                      host_view<float>{q.data(), {R, K}, "q"}, host_view<float>{ent.data(), {R}, "H"});
      auto dt = upload(t);
      dino::cuda::device_buffer<float> dq(q.size()), dent(ent.size());
      device_view<const float> gt{dt.data(), {R, K}, "t"};
      const double h_gpu = gs.targets(pol, gt, tau, device_view<float>{dq.data(), {R, K}, "q"},
                                      device_view<float>{dent.data(), {R}, "H"});
      DINO_CHECK_CLOSE(download(dq), q, 1e-6);
      DINO_CHECK_CLOSE(download(dent), ent, 1e-6);
      CHECK(std::abs(h_gpu - h_cpu) <= 1e-6 * std::max(1.0, std::abs(h_cpu)));
      // The mean left on the device, and no allocation once reserved.
      const auto allocs = dino::cuda::device_allocations();
      auto dval = upload(std::vector<double>{1.0});
      const auto allocs_after_upload = dino::cuda::device_allocations();
      CHECK(allocs_after_upload == allocs + 1);
      gs.targets(pol, gt, tau, device_view<float>{dq.data(), {R, K}, "q"}, device_view<float>{dent.data(), {R}, "H"},
                 dino::scalar_out{dval.data(), 0.5, true});
      CHECK(dino::cuda::device_allocations() == allocs_after_upload);
      CHECK(std::abs(download(dval)[0] - (1.0 + 0.5 * h_cpu)) <= 1e-6 * std::max(1.0, std::abs(h_cpu)));
    }
  }
}

TEST_CASE("cuda sinkhorn_knopp: a non-finite logit is reported by the form that returns the entropy") {
  const std::int64_t R = 4, K = 33;
  dino::ssl::sinkhorn_knopp<float, device_space> gs({K, 3});
  auto t = random_vector<float>(std::size_t(R * K), 5);
  t[std::size_t(2 * K + 5)] = std::nanf("");
  auto dt = upload(t);
  dino::cuda::device_buffer<float> dq(t.size()), dent(static_cast<std::size_t>(R));
  settle();
  try {
    gs.targets(gpu().policy(), device_view<const float>{dt.data(), {R, K}, "t"}, 0.05,
               device_view<float>{dq.data(), {R, K}, "q"}, device_view<float>{dent.data(), {R}, "H"});
    FAIL("no numeric_error");
  } catch (const dino::numeric_error& e) {
    CHECK(std::string(e.what()).find("row 2, column 5") != std::string::npos);
  }
}

TEST_CASE("cuda raw_target and sharpen_only match the CPU") {
  const auto pol = gpu().policy(false);
  const std::int64_t R = 11, K = 129;
  auto t = random_vector<float>(std::size_t(R * K), 61, -2, 2);
  auto dt = upload(t);
  host_view<const float> ht{t.data(), {R, K}, "t"};
  device_view<const float> gt{dt.data(), {R, K}, "t"};
  std::vector<float> q(t.size()), ent(static_cast<std::size_t>(R));
  dino::cuda::device_buffer<float> dq(q.size()), dent(ent.size());
  const double hb = entropy_bound(2.0 / 0.04, K, std::log(double(K)));  // softmax_targets' (test_cuda_ssl.cu)
  {
    dino::ssl::raw_target<float> target({K});
    const double h_cpu = target.targets(cpu, ht, 0.04, host_view<float>{q.data(), {R, K}, "q"},
                                        host_view<float>{ent.data(), {R}, "H"});
    const double h_gpu = target.targets(pol, gt, 0.04, device_view<float>{dq.data(), {R, K}, "q"},
                                        device_view<float>{dent.data(), {R}, "H"});
    const auto gq = download(dq);
    CHECK(std::memcmp(gq.data(), t.data(), t.size() * sizeof(float)) == 0);  // q = t
    CHECK(std::abs(h_gpu - h_cpu) <= hb);
    auto dval = upload(std::vector<double>{0.0});
    target.targets(pol, gt, 0.04, device_view<float>{dq.data(), {R, K}, "q"}, device_view<float>{dent.data(), {R}, "H"},
                   dino::scalar_out{dval.data(), 1.0, false});
    CHECK(std::abs(download(dval)[0] - h_cpu) <= hb);
  }
  {
    dino::ssl::sharpen_only<float> target({K});
    const double h_cpu = target.targets(cpu, ht, 0.04, host_view<float>{q.data(), {R, K}, "q"},
                                        host_view<float>{ent.data(), {R}, "H"});
    const double h_gpu = target.targets(pol, gt, 0.04, device_view<float>{dq.data(), {R, K}, "q"},
                                        device_view<float>{dent.data(), {R}, "H"});
    DINO_CHECK_CLOSE(download(dq), q, 1e-5);
    CHECK(std::abs(h_gpu - h_cpu) <= hb);
  }
}

// ----------------------------------------------------------------- losses

TEST_CASE("cuda mse_distillation matches the CPU (2 crops, 2 + 3 crops, 1 + 2 crops with a near-zero row)") {
  for (auto [V, G, B, K] : {std::tuple{2, 2, 5, 37}, std::tuple{5, 2, 3, 257}, std::tuple{3, 1, 7, 9000}}) {
    CAPTURE(V);
    CAPTURE(G);
    CAPTURE(B);
    CAPTURE(K);
    pair_data d(V, G, B, K, 70 + K);
    if (G == 1) {  // crop 0 has no partner; a crop-1 row under F.normalize's eps (its gradient dominates)
      for (std::int64_t k = 0; k < K; ++k) d.s[std::size_t((B + 1) * K + k)] = 1e-14f;
      d.dS = upload(d.s);
    }
    const dino::ssl::mse_distillation loss({V, G});
    check_pair_loss(loss, loss, d, 1e-6);
  }
}

TEST_CASE("cuda nt_xent matches the CPU (2 crops, 4 crops with 2 positives)") {
  for (auto [V, G, B, K] : {std::tuple{2, 2, 5, 33}, std::tuple{4, 2, 3, 129}, std::tuple{2, 2, 2, 7}}) {
    CAPTURE(V);
    CAPTURE(G);
    CAPTURE(B);
    CAPTURE(K);
    pair_data d(V, G, B, K, 90 + K);
    const dino::ssl::nt_xent<float> cl({V, G, 0.1});
    const dino::ssl::nt_xent<float, device_space> gl({V, G, 0.1});
    gl.reserve(V * B, K);
    check_pair_loss(cl, gl, d, 1e-5);
  }
}

namespace {

template <class T>
std::vector<T> queue_of(const dino::ssl::info_nce<T, device_space>& l) {
  const auto q = l.queue();
  return to_host_vec(q.data, std::size_t(q.numel()));
}
template <class T>
std::vector<T> queue_of(const dino::ssl::info_nce<T>& l) {
  const auto q = l.queue();
  return std::vector<T>(q.data, q.data + q.numel());
}

}  // namespace

TEST_CASE("cuda info_nce: the loss against the queue, observe and commit, a skipped commit, wrapping") {
  const auto pol = gpu().policy(false);
  const int V = 2, G = 2;
  const std::int64_t B = 5, K = 37, Q = 23;  // 10 teacher rows per step: the ring wraps on the third
  dino::ssl::info_nce<float> cl({V, G, K, Q, 0.2});
  dino::ssl::info_nce<float, device_space> gl({V, G, K, Q, 0.2});
  gl.reserve(V * B, K);
  settle();
  CHECK(gl.queued() == 0);
  CHECK(gl.head() == 0);
  auto flag = upload(std::vector<int>{0});
  for (int step = 0; step < 5; ++step) {
    CAPTURE(step);
    pair_data d(V, G, B, K, 200 + 10 * step);
    check_pair_loss(cl, gl, d, 1e-5);  // step 0: an empty queue (no negatives)
    // Two micro-batches observed, then committed; step 2 is skipped (the flag set on the device).
    for (int micro = 0; micro < 2; ++micro) {
      cl.observe(cpu, d.hq());
      gl.observe(pol, d.gq());
    }
    CHECK(gl.pending_rows() == cl.pending_rows());
    const bool skip = step == 2;
    const int skip_int = skip ? 1 : 0;
    DINO_CUDA_CHECK(cudaMemcpy(flag.data(), &skip_int, sizeof(int), cudaMemcpyHostToDevice));
    const auto before = queue_of(gl);
    if (skip) cl.discard();
    else cl.commit();
    gl.commit(pol, flag.data());
    CHECK(gl.pending_rows() == 0);
    const auto after = queue_of(gl);
    if (skip) {
      CHECK(std::memcmp(after.data(), before.data(), before.size() * sizeof(float)) == 0);
    }
    CHECK(gl.queued() == cl.queued());
    CHECK(gl.head() == cl.head());
    DINO_CHECK_CLOSE(after, queue_of(cl), 1e-6);
  }
  CHECK(cl.queued() == Q);  // the ring is full and has wrapped
  // A discarded observation, and a restored state (a checkpoint's).
  pair_data d(V, G, B, K, 300);
  gl.observe(pol, d.gq());
  gl.discard(pol);
  CHECK(gl.pending_rows() == 0);
  gl.set_state(Q, 4);
  CHECK(gl.head() == 4);
  CHECK(gl.queued() == Q);
}

TEST_CASE("cuda info_nce: MoCo's random queue and a large one match the CPU") {
  const int V = 2, G = 2;
  const std::int64_t B = 3, K = 128, Q = 8200;  // the row kernel's wide form
  dino::ssl::info_nce<float> cl({V, G, K, Q, 0.2});
  dino::ssl::info_nce<float, device_space> gl({V, G, K, Q, 0.2});
  cl.fill_random(9);
  gl.fill_random(9);
  settle();
  CHECK(gl.queued() == Q);
  CHECK(std::memcmp(queue_of(gl).data(), queue_of(cl).data(), std::size_t(Q * K) * sizeof(float)) == 0);
  pair_data d(V, G, B, K, 400);
  check_pair_loss(cl, gl, d, 1e-5);
  gl.clear();
  CHECK(gl.queued() == 0);
}

// ----------------------------------------------------------------- teacher updates

TEST_CASE("cuda copy_update and no_teacher: with and without the skip flag") {
  const auto pol = gpu().policy();
  dino::param_layout layout;
  layout.add("w", {5, 7}, dino::param_none, dino::param_init::zeros);
  layout.add("b", {3}, dino::param_none, dino::param_init::zeros);
  dino::flat_params<float> hs(layout), ht(layout);
  auto s = random_vector<float>(hs.size(), 1), t = random_vector<float>(ht.size(), 2);
  std::copy(s.begin(), s.end(), hs.data());
  std::copy(t.begin(), t.end(), ht.data());
  dino::flat_params<float, device_space> ds(layout), dt(layout);
  settle();
  dino::assign_params(ds, hs);
  dino::assign_params(dt, ht);
  auto flag = upload(std::vector<int>{1});
  dino::ssl::no_teacher{}(pol, dt, ds, 0.5, flag.data());
  dino::ssl::no_teacher{}(pol, dt, ds, 0.5);
  CHECK(to_host_vec(dt.data(), dt.size()) == t);
  dino::ssl::copy_update{}(pol, dt, ds, 0.5, flag.data());  // skipped
  CHECK(to_host_vec(dt.data(), dt.size()) == t);
  const int zero = 0;
  DINO_CUDA_CHECK(cudaMemcpy(flag.data(), &zero, sizeof(int), cudaMemcpyHostToDevice));
  dino::ssl::copy_update{}(pol, dt, ds, 0.5, flag.data());
  CHECK(to_host_vec(dt.data(), dt.size()) == s);
}

TEST_CASE("cuda attention_mask: the kept patches of each crop equal the CPU's (ties, NaN, every ratio)") {
  const auto pol = gpu().policy();
  const std::int64_t crops = 7, heads = 3;
  for (std::int64_t n : {1, 16, 49, 196}) {
    for (double ratio : {0.0, 0.3, 0.5, 0.9}) {
      CAPTURE(n);
      CAPTURE(ratio);
      dino::ssl::attention_mask cpu_mask({ratio}), gpu_mask({ratio});
      const std::int64_t k = cpu_mask.kept(n);
      auto a = random_vector<float>(std::size_t(crops * heads * (1 + n)), 40 + std::uint64_t(n), 0, 1);
      // crop 1: every score equal (ties by index); crop 2: a NaN score; crop 3: pairs of equal scores
      for (std::int64_t i = 0; i < heads * (1 + n); ++i) a[std::size_t(1 * heads * (1 + n) + i)] = 0.25f;
      if (n > 3) a[std::size_t(2 * heads * (1 + n) + 1 + 3)] = std::nanf("");
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t j = 1; j < n; j += 2)
          a[std::size_t((3 * heads + h) * (1 + n) + 1 + j)] = a[std::size_t((3 * heads + h) * (1 + n) + j)];
      std::vector<std::int64_t> want(std::size_t(crops * k));
      cpu_mask.select(cpu, host_view<const float>{a.data(), {crops, heads * (1 + n)}, "attn"}, heads, n, want.data());
      auto da = upload(a);
      auto dkeep = upload(std::vector<std::int64_t>(want.size(), -1));
      gpu_mask.select(pol, device_view<const float>{da.data(), {crops, heads * (1 + n)}, "attn"}, heads, n,
                      dkeep.data());
      CHECK(to_host_vec(dkeep.data(), dkeep.size()) == want);
    }
  }
}
