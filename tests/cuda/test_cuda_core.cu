// The CUDA policy's core against its CPU twin: GEMM (every transpose, alpha/beta, leading
// dimensions, strided batches, odd sizes, TF32, bf16 against the CPU's bf16), column sums, the non-finite check, the row
// and chunk runners, device memory and the allocation counter.
#include "cuda_test_support.cuh"

using namespace dino_test;
using dino::cpu_policy;
using dino::gemm_desc;

namespace {

template <class T>
void check_gemm(gemm_desc d, T alpha, T beta, double bound, bool tf32 = false, bool bf16 = false) {
  const std::int64_t ar = d.trans_a ? d.k : d.m, ac = d.trans_a ? d.m : d.k;
  const std::int64_t br = d.trans_b ? d.n : d.k, bc = d.trans_b ? d.k : d.n;
  const std::int64_t lda = d.lda ? d.lda : ac, ldb = d.ldb ? d.ldb : bc, ldc = d.ldc ? d.ldc : d.n;
  const std::int64_t sa = d.batch > 1 ? d.stride_a : 0, sb = d.batch > 1 ? d.stride_b : 0,
                     sc = d.batch > 1 ? d.stride_c : 0;
  const std::size_t na = std::size_t(sa * (d.batch - 1) + ar * lda), nb = std::size_t(sb * (d.batch - 1) + br * ldb),
                    nc = std::size_t(sc * (d.batch - 1) + d.m * ldc);
  auto A = random_vector<T>(na, 1 + d.m), B = random_vector<T>(nb, 2 + d.n), C = random_vector<T>(nc, 3 + d.k);
  auto C_cpu = C;
  dino::cpu::gemm(cpu_policy{1, bf16}, d, alpha, A.data(), B.data(), beta, C_cpu.data());
  auto dA = upload(A), dB = upload(B), dC = upload(C);
  dino::gemm(gpu().policy(tf32, bf16), d, alpha, dA.data(), dB.data(), beta, dC.data());
  DINO_CHECK_CLOSE(download(dC), C_cpu, bound);
}

}  // namespace

TEST_CASE("cuda gemm matches the CPU for every transpose, odd sizes and alpha/beta") {
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (auto [m, n, k] : {std::tuple{1, 1, 1}, std::tuple{7, 13, 5}, std::tuple{65, 33, 129}, std::tuple{200, 97, 384}}) {
        CAPTURE(ta);
        CAPTURE(tb);
        CAPTURE(m);
        CAPTURE(n);
        CAPTURE(k);
        gemm_desc d{bool(ta), bool(tb), m, n, k};
        check_gemm<float>(d, 1.0f, 0.0f, 1e-5);
        check_gemm<float>(d, 0.5f, 1.0f, 1e-5);
        check_gemm<float>(d, -2.0f, 0.25f, 1e-5);
        check_gemm<double>(d, 1.5, 1.0, 1e-12);
      }
}

TEST_CASE("cuda gemm: leading dimensions, strided batches, k = 0 and TF32") {
  gemm_desc ld{false, true, 10, 12, 8, 11, 9, 15};
  check_gemm<float>(ld, 1.0f, 1.0f, 1e-5);
  gemm_desc batched{false, true, 17, 17, 64, 0, 0, 0, 6, 17 * 64, 17 * 64, 17 * 17};  // attention scores
  check_gemm<float>(batched, 0.125f, 0.0f, 1e-5);
  check_gemm<double>(batched, 0.125, 0.0, 1e-12);
  gemm_desc empty{false, false, 5, 6, 0};
  check_gemm<float>(empty, 1.0f, 0.5f, 0.0);
  check_gemm<float>(empty, 1.0f, 0.0f, 0.0);
  // TF32 rounds operands to 10 mantissa bits: a looser, separate bound (never applied to fp32).
  check_gemm<float>(gemm_desc{false, false, 128, 96, 256}, 1.0f, 0.0f, 5e-3, true);
}

TEST_CASE("cuda gemm in bf16 (cuda_policy::bf16) matches the CPU's bf16 product") {
  // Both sides round the operands to bf16 and sum the products in fp32 (cpu_policy::bf16 on
  // the CPU, CUBLAS_COMPUTE_32F_FAST_16BF on the GPU), so they differ by the order of the
  // fp32 sums only: the fp32 bound, not a bf16 one. Odd depths, every transpose, a batch.
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (auto [m, n, k] : {std::tuple{7, 13, 5}, std::tuple{65, 33, 129}, std::tuple{200, 97, 384}}) {
        CAPTURE(ta);
        CAPTURE(tb);
        CAPTURE(m);
        CAPTURE(k);
        check_gemm<float>(gemm_desc{bool(ta), bool(tb), m, n, k}, 1.0f, 0.0f, 2e-5, false, true);
        check_gemm<float>(gemm_desc{bool(ta), bool(tb), m, n, k}, -0.5f, 0.25f, 2e-5, false, true);
      }
  check_gemm<float>(gemm_desc{false, true, 17, 17, 64, 0, 0, 0, 6, 17 * 64, 17 * 64, 17 * 17}, 0.125f, 0.0f, 2e-5,
                    false, true);
  // and the rounding is real: against the CPU's fp32 product the GPU's bf16 one is off by
  // bf16's rounding (2^-9 relative per operand), far more than fp32 sums
  const gemm_desc d{false, false, 128, 96, 256};
  auto A = random_vector<float>(128 * 256, 5), B = random_vector<float>(256 * 96, 6);
  std::vector<float> C(128 * 96);
  dino::cpu::gemm(cpu_policy{1}, d, 1.0f, A.data(), B.data(), 0.0f, C.data());
  auto dA = upload(A), dB = upload(B);
  dino::cuda::device_buffer<float> dC(C.size());
  dino::gemm(gpu().policy(false, true), d, 1.0f, dA.data(), dB.data(), 0.0f, dC.data());
  const double err = max_rel_error(download(dC), C);
  CHECK(err > 1e-4);
  CHECK(err < 2e-2);
}

TEST_CASE("cuda gemm with beta = 0 never reads C") {
  gemm_desc d{false, false, 9, 7, 5};
  auto A = random_vector<float>(45, 1), B = random_vector<float>(35, 2);
  std::vector<float> C(63, std::nanf("")), ref(63);
  dino::cpu::gemm(cpu_policy{1}, d, 1.0f, A.data(), B.data(), 0.0f, ref.data());
  auto dA = upload(A), dB = upload(B), dC = upload(C);
  dino::gemm(gpu().policy(), d, 1.0f, dA.data(), dB.data(), 0.0f, dC.data());
  DINO_CHECK_CLOSE(download(dC), ref, 1e-5);
}

TEST_CASE("cuda column_sums matches the CPU, written and accumulated") {
  // Rows above 256 are summed in chunks (partial sums in the policy's scratch, then added in
  // chunk order); a policy without scratch sums them in one stage.
  auto no_scratch = gpu().policy();
  no_scratch.scratch = nullptr;
  no_scratch.scratch_bytes = 0;
  auto small_scratch = gpu().policy();
  small_scratch.scratch_bytes = 3 * 384 * sizeof(double);  // at most 3 chunks of 384 columns
  for (auto [rows, cols] : {std::pair{1, 1}, std::pair{3, 31}, std::pair{257, 33}, std::pair{1000, 384},
                            std::pair{8, 4099}, std::pair{20000, 97}}) {
    CAPTURE(rows);
    CAPTURE(cols);
    auto x = random_vector<float>(std::size_t(rows) * cols, 7);
    auto out = random_vector<float>(std::size_t(cols), 8);
    for (bool acc : {false, true}) {
      auto ref = out;
      dino::cpu::column_sums(cpu_policy{1}, x.data(), rows, cols, ref.data(), acc);
      for (const auto& pol : {gpu().policy(), no_scratch, small_scratch}) {
        auto dx = upload(x), dout = upload(out);
        dino::column_sums(pol, dx.data(), rows, cols, dout.data(), acc);
        DINO_CHECK_CLOSE(download(dout), ref, 1e-6);
      }
    }
  }
}

TEST_CASE("cuda all_finite finds a NaN or an infinity anywhere") {
  auto x = random_vector<float>(100003, 9);
  auto dx = upload(x);
  CHECK(dino::all_finite(gpu().policy(), dx.data(), std::int64_t(x.size())));
  for (std::size_t at : {std::size_t(0), std::size_t(4097), x.size() - 1}) {
    for (float bad : {std::nanf(""), INFINITY, -INFINITY}) {
      auto y = x;
      y[at] = bad;
      auto dy = upload(y);
      CHECK_FALSE(dino::all_finite(gpu().policy(), dy.data(), std::int64_t(y.size())));
    }
  }
}

namespace {
struct square_row {
  const float* x;
  float* y;
  std::int64_t cols;
  DINO_HD void operator()(std::int64_t r) const {
    for (std::int64_t c = 0; c < cols; ++c) y[r * cols + c] = x[r * cols + c] * x[r * cols + c] + float(r);
  }
};
struct axpy_chunk {
  const float* x;
  float* y;
  float a;
  DINO_HD void operator()(std::int64_t b, std::int64_t e) const {
    for (std::int64_t i = b; i < e; ++i) y[i] += a * x[i];
  }
};
}  // namespace

TEST_CASE("cuda row and chunk runners call the functor once per row and element") {
  const std::int64_t rows = 70001, cols = 3;
  auto x = random_vector<float>(std::size_t(rows * cols), 10);
  std::vector<float> y(x.size()), yc(x.size(), 1.0f);
  dino::cuda::device_buffer<float> dy(x.size());
  auto dx = upload(x), dyc = upload(yc);
  const square_row f{dx.data(), dy.data(), cols};
  dino::for_each_row(gpu().policy(), rows, f);
  dino::for_each_row(cpu_policy{1}, rows, square_row{x.data(), y.data(), cols});
  DINO_CHECK_CLOSE(download(dy), y, 1e-7);  // x * x + r: one FMA on the GPU
  dino::for_each_chunk(gpu().policy(), std::int64_t(x.size()), axpy_chunk{dx.data(), dyc.data(), 2.0f});
  dino::for_each_chunk(cpu_policy{1}, std::int64_t(x.size()), axpy_chunk{x.data(), yc.data(), 2.0f});
  DINO_CHECK_CLOSE(download(dyc), yc, 1e-7);  // nvcc contracts y + a x into one FMA; the CPU build does not
}

TEST_CASE("device memory: counted allocations, workspaces that refuse to overflow") {
  const auto before = dino::cuda::device_allocations();
  dino::workspace_plan plan;
  plan.add<float>(100).add<double>(7);
  dino::cuda::device_workspace ws(plan);
  CHECK(dino::cuda::device_allocations() == before + 1);
  CHECK(ws.take<float>(100, "a") != nullptr);
  CHECK(ws.take<double>(7, "b") != nullptr);
  CHECK_THROWS_AS(ws.take<float>(1, "one too many"), dino::config_error);
  // GEMMs of a shape seen before allocate nothing on the device.
  gemm_desc d{false, false, 33, 17, 9};
  auto A = upload(random_vector<float>(33 * 9, 1)), B = upload(random_vector<float>(9 * 17, 2));
  dino::cuda::device_buffer<float> C(33 * 17);
  dino::gemm(gpu().policy(), d, 1.0f, A.data(), B.data(), 0.0f, C.data());
  const auto steady = dino::cuda::device_allocations();
  for (int i = 0; i < 3; ++i) dino::gemm(gpu().policy(), d, 1.0f, A.data(), B.data(), 1.0f, C.data());
  CHECK(dino::cuda::device_allocations() == steady);
}
