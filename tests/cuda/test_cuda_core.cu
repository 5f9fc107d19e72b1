// The CUDA policy's core against its CPU twin: GEMM (every transpose, alpha/beta, leading
// dimensions, strided batches, odd sizes, TF32, bf16 against bf16-rounded products), column
// sums, the non-finite check, the row and chunk runners, device memory and the allocation
// counter.
#include <bit>
#include <cstdint>
#include <tuple>

#include "cuda_test_support.cuh"
#include "naive_gemm.hpp"

using namespace dino_test;
using dino::cpu_policy;
using dino::gemm_desc;

namespace {

template <class T>
void check_gemm(gemm_desc d, T alpha, T beta, double bound, bool tf32 = false) {
  const std::int64_t ar = d.trans_a ? d.k : d.m, ac = d.trans_a ? d.m : d.k;
  const std::int64_t br = d.trans_b ? d.n : d.k, bc = d.trans_b ? d.k : d.n;
  const std::int64_t lda = d.lda ? d.lda : ac, ldb = d.ldb ? d.ldb : bc, ldc = d.ldc ? d.ldc : d.n;
  const std::int64_t sa = d.batch > 1 ? d.stride_a : 0, sb = d.batch > 1 ? d.stride_b : 0,
                     sc = d.batch > 1 ? d.stride_c : 0;
  const std::size_t na = std::size_t(sa * (d.batch - 1) + ar * lda), nb = std::size_t(sb * (d.batch - 1) + br * ldb),
                    nc = std::size_t(sc * (d.batch - 1) + d.m * ldc);
  auto A = random_vector<T>(na, 1 + d.m), B = random_vector<T>(nb, 2 + d.n), C = random_vector<T>(nc, 3 + d.k);
  auto C_cpu = C;
  dino::cpu::gemm(cpu_policy{1}, d, alpha, A.data(), B.data(), beta, C_cpu.data());
  auto dA = upload(A), dB = upload(B), dC = upload(C);
  dino::gemm(gpu().policy(tf32), d, alpha, dA.data(), dB.data(), beta, dC.data());
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

namespace {
// op(A) op(B) in double from operands rounded to bf16 by `round` (row-major, no batch).
template <class Round>
std::vector<float> product_of_rounded(const gemm_desc& d, const std::vector<float>& A, const std::vector<float>& B,
                                      Round round) {
  std::vector<float> C(std::size_t(d.m * d.n));
  naive_gemm(d, 1.0f, A.data(), B.data(), 0.0f, C.data(), round);
  return C;
}
// f(ta, tb, m, n, k) over the four transposes and the bf16 tests' three shapes (captured).
template <class F>
void for_bf16_cases(F&& f) {
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb)
      for (auto [m, n, k] : {std::tuple{7, 13, 5}, std::tuple{65, 33, 129}, std::tuple{200, 97, 384}}) {
        CAPTURE(ta);
        CAPTURE(tb);
        CAPTURE(m);
        CAPTURE(k);
        f(ta, tb, std::int64_t(m), std::int64_t(n), std::int64_t(k));
      }
}
}  // namespace

TEST_CASE("cuda gemm in bf16 (cuda_policy::bf16): operands rounded to bf16, fp32 sums") {
  // CUBLAS_COMPUTE_32F_FAST_16BF does not say how cuBLASLt rounds the fp32 operands to bf16.
  // Measured on an H100 (cuBLAS 13): 2e-3 to 3.4e-3 from the CPU's round-to-nearest-even
  // product, far above fp32 sums (2e-5) and within one bf16 step. So the bound here is bf16's
  // (a product off by up to about 2^-8 relative), not the CPU's; the distances to a
  // round-to-nearest-even and to a truncating reference are printed for docs/cuda.md.
  const auto rne = [](float x) { return dino::cpu::bf16_round(x); };
  const auto trunc = [](float x) { return std::bit_cast<float>(std::bit_cast<std::uint32_t>(x) & 0xFFFF0000u); };
  for_bf16_cases([&](int ta, int tb, std::int64_t m, std::int64_t n, std::int64_t k) {
    const gemm_desc d{bool(ta), bool(tb), m, n, k};
    const auto A = random_vector<float>(std::size_t(m * k), 1 + m);
    const auto B = random_vector<float>(std::size_t(k * n), 2 + n);
    auto dA = upload(A), dB = upload(B);
    dino::cuda::device_buffer<float> dC(std::size_t(m * n));
    dino::gemm(gpu().policy(false, true), d, 1.0f, dA.data(), dB.data(), 0.0f, dC.data());
    const auto C = download(dC);
    const double e_rne = max_rel_error(C, product_of_rounded(d, A, B, rne));
    const double e_trunc = max_rel_error(C, product_of_rounded(d, A, B, trunc));
    const double e_fp32 = max_rel_error(C, product_of_rounded(d, A, B, [](float x) { return x; }));
    MESSAGE("bf16 gemm m=" << m << " k=" << k << " ta=" << ta << " tb=" << tb << ": from the RNE product " << e_rne
                           << ", from the truncating one " << e_trunc << ", from fp32 " << e_fp32);
    CHECK(e_rne <= 1.5e-2);
    CHECK(e_fp32 <= 2e-2);
    if (k >= 129) CHECK(e_fp32 > 1e-4);  // the rounding is real (a few products may round exactly when k is 5)
    // alpha and beta: the same product scaled and added to C
    const auto C0 = random_vector<float>(C.size(), 3 + k);
    auto dC2 = upload(C0);
    dino::gemm(gpu().policy(false, true), d, -0.5f, dA.data(), dB.data(), 0.25f, dC2.data());
    std::vector<float> ref(C.size());
    for (std::size_t i = 0; i < C.size(); ++i) ref[i] = -0.5f * C[i] + 0.25f * C0[i];
    DINO_CHECK_CLOSE(download(dC2), ref, 2e-5);
  });
  // a strided batch (the attention scores' shape) against the unbatched products
  const gemm_desc bd{false, true, 17, 17, 64, 0, 0, 0, 6, 17 * 64, 17 * 64, 17 * 17};
  const auto A = random_vector<float>(6 * 17 * 64, 5), B = random_vector<float>(6 * 17 * 64, 6);
  auto dA = upload(A), dB = upload(B);
  dino::cuda::device_buffer<float> dC(6 * 17 * 17);
  dino::gemm(gpu().policy(false, true), bd, 0.125f, dA.data(), dB.data(), 0.0f, dC.data());
  const auto C = download(dC);
  for (int b = 0; b < 6; ++b) {
    CAPTURE(b);
    const gemm_desc one{false, true, 17, 17, 64};
    auto ref = product_of_rounded(one, slice(A, b * 17 * 64, 17 * 64), slice(B, b * 17 * 64, 17 * 64), rne);
    for (auto& v : ref) v *= 0.125f;
    DINO_CHECK_CLOSE(slice(C, b * 17 * 17, 17 * 17), ref, 1.5e-2);
  }
}

TEST_CASE("cuda gemm with staged bf16 operands (cuda_policy::bf16_staged): the CPU's rounding, fp32 sums") {
  // The operands are rounded to nearest even by a pass of their own, as the CPU rounds them:
  // the product is the RNE product up to the order of fp32 sums, unlike FAST_16BF above
  // (2e-3 from it on an H100).
  const auto rne = [](float x) { return dino::cpu::bf16_round(x); };
  dino::cuda_policy pol = gpu().policy(false, true);
  pol.bf16_staged = true;
  REQUIRE(pol.stage != nullptr);
  for_bf16_cases([&](int ta, int tb, std::int64_t m, std::int64_t n, std::int64_t k) {
    // leading dimensions past the rows' lengths: the stage packs them
    const std::int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 5, ldc = n + 2;
    const gemm_desc d{bool(ta), bool(tb), m, n, k, lda, ldb, ldc};
    const auto A = random_vector<float>(std::size_t((ta ? k : m) * lda), 11 + m);
    const auto B = random_vector<float>(std::size_t((tb ? n : k) * ldb), 12 + n);
    const auto C0 = random_vector<float>(std::size_t(m * ldc), 13 + k);
    std::vector<float> ref = C0;
    naive_gemm(d, -0.5f, A.data(), B.data(), 0.25f, ref.data(), rne);
    auto dA = upload(A), dB = upload(B), dC = upload(C0);
    dino::gemm(pol, d, -0.5f, dA.data(), dB.data(), 0.25f, dC.data());
    DINO_CHECK_CLOSE(download(dC), ref, 2e-5);
    // the bias epilogue, with and without a residual
    const gemm_desc p{bool(ta), bool(tb), m, n, k, lda, ldb};
    const auto bias = random_vector<float>(std::size_t(n), 14 + n);
    const auto R = random_vector<float>(std::size_t(m * n), 15 + m);
    std::vector<float> with_bias(std::size_t(m * n)), with_res(std::size_t(m * n));
    naive_gemm(p, 1.0f, A.data(), B.data(), 0.0f, with_bias.data(), rne);
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        with_bias[std::size_t(i * n + j)] += bias[std::size_t(j)];
        with_res[std::size_t(i * n + j)] = with_bias[std::size_t(i * n + j)] + R[std::size_t(i * n + j)];
      }
    auto dbias = upload(bias), dR = upload(R);
    dino::cuda::device_buffer<float> dY(std::size_t(m * n));
    dino::cuda::gemm_bias_rows(pol, p, dA.data(), dB.data(), dbias.data(), dY.data());
    DINO_CHECK_CLOSE(download(dY), with_bias, 2e-5);
    dino::cuda::gemm_bias_rows(pol, p, dA.data(), dB.data(), dbias.data(), dY.data(), dR.data());
    DINO_CHECK_CLOSE(download(dY), with_res, 2e-5);
  });
  // The stage has grown to the largest pair above; products that fit allocate nothing and
  // wait for nothing.
  const auto allocs = dino::cuda::device_allocations();
  const auto waits = dino::cuda::host_waits();
  const gemm_desc d{false, true, 64, 48, 96};
  const auto A = random_vector<float>(64 * 96, 21), B = random_vector<float>(48 * 96, 22);
  auto dA = upload(A), dB = upload(B);
  dino::cuda::device_buffer<float> dC(64 * 48);
  const auto allocs_after_upload = dino::cuda::device_allocations();
  const auto waits_after_upload = dino::cuda::host_waits();
  for (int i = 0; i < 3; ++i) dino::gemm(pol, d, 1.0f, dA.data(), dB.data(), 0.0f, dC.data());
  CHECK(dino::cuda::device_allocations() == allocs_after_upload);
  CHECK(dino::cuda::host_waits() == waits_after_upload);
  CHECK(allocs_after_upload >= allocs);
  CHECK(waits_after_upload >= waits);
  std::vector<float> ref(64 * 48);
  naive_gemm(d, 1.0f, A.data(), B.data(), 0.0f, ref.data(), rne);
  DINO_CHECK_CLOSE(download(dC), ref, 2e-5);
}

TEST_CASE("cuda linear_backward under bf16_staged: dy staged once, bf16 copies read as they lie, the single products' bits") {
  // linear_backward stages dy, x and W once and runs both products on them; the single
  // products (linear_param_grads, then gemm) stage dy twice. Same plans, same staged values:
  // the same bits, one staging pass fewer.
  dino::cuda_policy pol = gpu().policy(false, true);
  pol.bf16_staged = true;
  REQUIRE(pol.stage != nullptr);
  const auto staging_passes = [](const dino::cuda::op_profile& prof) {
    std::int64_t n = 0;
    for (const auto& r : prof.summary())
      if (r.name.rfind("bf16 operand staging", 0) == 0) n += r.count;
    return n;
  };
  // out 37 and in 29: rows of the stage padded to 8 elements; 197 rows: not a multiple of 8
  for (auto [rows, out, in] : {std::tuple<std::int64_t, std::int64_t, std::int64_t>{197, 96, 64}, {197, 192, 64},
                               {131, 37, 29}}) {
    for (const bool bias : {true, false})
      for (const float beta : {0.0f, 1.0f}) {
        CAPTURE(rows);
        CAPTURE(out);
        CAPTURE(in);
        CAPTURE(bias);
        CAPTURE(beta);
        const auto dy = random_vector<float>(std::size_t(rows * out), 31 + out);
        const auto x = random_vector<float>(std::size_t(rows * in), 32 + in);
        const auto W = random_vector<float>(std::size_t(out * in), 33);
        const auto dW0 = random_vector<float>(std::size_t(out * in), 34);
        const auto db0 = random_vector<float>(std::size_t(out), 35);
        const auto dx0 = random_vector<float>(std::size_t(rows * in), 36);
        auto ddy = upload(dy), dx_in = upload(x), dWt = upload(W);
        auto rW = upload(dW0), rb = upload(db0), rx = upload(dx0);  // the single products
        auto nW = upload(dW0), nb = upload(db0), nx = upload(dx0);  // linear_backward
        dino::cuda::op_profile prof(pol.stream);
        prof.start();
        dino::cuda::linear_param_grads(pol, ddy.data(), dx_in.data(), rows, out, in, rW.data(),
                                       bias ? rb.data() : nullptr);
        dino::gemm(pol, gemm_desc{false, false, rows, in, out}, 1.0f, ddy.data(), dWt.data(), beta, rx.data());
        prof.stop();
        const auto single = staging_passes(prof);
        prof.start();
        dino::cuda::linear_backward(pol, ddy.data(), dx_in.data(), dWt.data(), rows, out, in, nW.data(),
                                    bias ? nb.data() : nullptr, nx.data(), beta);
        prof.stop();
        const auto once = staging_passes(prof);
        CHECK(single == 4);
        CHECK(once == 3);
        CHECK(download(nW) == download(rW));
        CHECK(download(nb) == download(rb));
        CHECK(download(nx) == download(rx));
        // bf16 copies of dy and x (rounded to nearest even, as the stage rounds them), x itself
        // not given: read where they lie when their rows are 16-byte aligned (else copied into
        // the stage), so only W is staged; the same bits.
        std::vector<std::uint16_t> dy16(dy.size()), x16(x.size());
        for (std::size_t i = 0; i < dy.size(); ++i) dy16[i] = dino::cpu::bf16_bits(dy[i]);
        for (std::size_t i = 0; i < x.size(); ++i) x16[i] = dino::cpu::bf16_bits(x[i]);
        auto ddy16 = upload(dy16), dx16 = upload(x16);
        auto kW = upload(dW0), kb = upload(db0), kx = upload(dx0);
        prof.start();
        dino::cuda::linear_backward(pol, ddy.data(), static_cast<const float*>(nullptr), dWt.data(), rows, out, in,
                                    kW.data(), bias ? kb.data() : nullptr, kx.data(), beta,
                                    dino::linear_bf16_copies{ddy16.data(), dx16.data()});
        prof.stop();
        CHECK(staging_passes(prof) == 1);
        CHECK(download(kW) == download(rW));
        CHECK(download(kb) == download(rb));
        CHECK(download(kx) == download(rx));
        // and the CPU's products on the same RNE operands, up to the order of fp32 sums
        std::vector<float> cW = dW0, cx = dx0;
        const auto rne = [](float v) { return dino::cpu::bf16_round(v); };
        naive_gemm(gemm_desc{true, false, out, in, rows}, 1.0f, dy.data(), x.data(), 1.0f, cW.data(), rne);
        naive_gemm(gemm_desc{false, false, rows, in, out}, 1.0f, dy.data(), W.data(), beta, cx.data(), rne);
        DINO_CHECK_CLOSE(download(nW), cW, 2e-5);
        DINO_CHECK_CLOSE(download(nx), cx, 2e-5);
      }
  }
  // No dx (grad_mode::skip): the parameter gradients alone, as linear_param_grads gives them.
  const std::int64_t rows = 64, out = 48, in = 32;
  const auto dy = random_vector<float>(std::size_t(rows * out), 41), x = random_vector<float>(std::size_t(rows * in), 42);
  const auto dW0 = random_vector<float>(std::size_t(out * in), 43);
  auto ddy = upload(dy), dxin = upload(x), rW = upload(dW0), nW = upload(dW0);
  dino::cuda::linear_param_grads(pol, ddy.data(), dxin.data(), rows, out, in, rW.data(), static_cast<float*>(nullptr));
  dino::cuda::linear_backward(pol, ddy.data(), dxin.data(), static_cast<const float*>(nullptr), rows, out, in, nW.data(),
                              static_cast<float*>(nullptr), static_cast<float*>(nullptr), 0.0f);
  CHECK(download(nW) == download(rW));
  // Without staging, a bf16 copy standing for x is widened (exactly) and the products run on
  // fp32 operands: the bits of x given as those widened values.
  const dino::cuda_policy fast = gpu().policy(false, true);
  std::vector<std::uint16_t> x16(x.size());
  std::vector<float> xw(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    x16[i] = dino::cpu::bf16_bits(x[i]);
    xw[i] = dino::cpu::bf16_round(x[i]);
  }
  const auto W = random_vector<float>(std::size_t(out * in), 44);
  auto dx16 = upload(x16);
  auto dxw = upload(xw), dWt = upload(W), fW = upload(dW0), gW = upload(dW0);
  dino::cuda::device_buffer<float> fx(std::size_t(rows * in)), gx(std::size_t(rows * in));
  dino::cuda::linear_backward(fast, ddy.data(), dxw.data(), dWt.data(), rows, out, in, fW.data(),
                              static_cast<float*>(nullptr), fx.data(), 0.0f);
  dino::cuda::linear_backward(fast, ddy.data(), static_cast<const float*>(nullptr), dWt.data(), rows, out, in,
                              gW.data(), static_cast<float*>(nullptr), gx.data(), 0.0f,
                              dino::linear_bf16_copies{nullptr, dx16.data()});
  CHECK(download(gW) == download(fW));
  CHECK(download(gx) == download(fx));
  // neither x nor a copy of it: refused
  CHECK_THROWS_AS(dino::cuda::linear_backward(fast, ddy.data(), static_cast<const float*>(nullptr), dWt.data(), rows,
                                              out, in, gW.data(), static_cast<float*>(nullptr), gx.data(), 0.0f),
                  dino::config_error);
}

TEST_CASE("cuda bf16 operands in memory (cuda_policy::bf16_operands ops) match the CPU's") {
  // gemm_bias_rows_bf16 on the bits the CPU rounds: the same bf16 operands, so the CPU's
  // product up to the order of fp32 sums (2e-5), with the bias in the epilogue, with a
  // residual, without a bias, and with a bias too little aligned for the epilogue (the bias
  // rows path). The producers: LayerNorm's and GELU's fp32 values differ from the CPU's in
  // their last bits (double sums here, another erf there), so a value near a rounding
  // boundary may round to the other bf16 neighbour: within one bf16 step (2^-8 relative).
  const dino::cuda_policy pol = gpu().policy(false, true);
  const cpu_policy cpol{1, true};
  const auto widen = [](const std::vector<std::uint16_t>& h) {
    std::vector<float> f(h.size());
    for (std::size_t i = 0; i < h.size(); ++i) f[i] = dino::cpu::bf16_value(h[i]);
    return f;
  };
  for (auto [m, n, k] : std::vector<std::tuple<std::int64_t, std::int64_t, std::int64_t>>{
           {37, 24, 16}, {300, 96, 64}, {1100, 192, 384}}) {
    CAPTURE(m);
    CAPTURE(n);
    CAPTURE(k);
    const auto X = random_vector<float>(std::size_t(m * k), 31 + m), W = random_vector<float>(std::size_t(n * k), 32 + n);
    const auto bias = random_vector<float>(std::size_t(n + 1), 33), R = random_vector<float>(std::size_t(m * n), 34);
    std::vector<std::uint16_t> X16(X.size()), W16(W.size());
    dino::cpu::round_bf16_apply(cpol, X.data(), X16.data(), std::int64_t(X.size()));
    dino::cpu::round_bf16_apply(cpol, W.data(), W16.data(), std::int64_t(W.size()));
    auto dX = upload(X), dW = upload(W), dbias = upload(bias), dR = upload(R);
    dino::cuda::device_buffer<std::uint16_t> dX16(X.size()), dW16(W.size());
    dino::cuda::round_bf16_apply(pol, dX.data(), dX16.data(), std::int64_t(X.size()));
    dino::cuda::round_bf16_apply(pol, dW.data(), dW16.data(), std::int64_t(W.size()));
    dino::cuda::synchronize(gpu().stream());
    CHECK(dino::cuda::to_host(dX16.data(), X16.size()) == X16);  // the same rounding
    CHECK(dino::cuda::to_host(dW16.data(), W16.size()) == W16);
    for (int variant = 0; variant < 4; ++variant) {  // bias, bias + residual, none, an 4-byte aligned bias
      CAPTURE(variant);
      const float* hb = variant == 2 ? nullptr : variant == 3 ? bias.data() + 1 : bias.data();
      const float* db = variant == 2 ? nullptr : variant == 3 ? dbias.data() + 1 : dbias.data();
      const float* hr = variant == 1 ? R.data() : nullptr;
      const float* dr = variant == 1 ? dR.data() : nullptr;
      std::vector<float> ref(std::size_t(m * n));
      dino::cpu::gemm_bias_rows_bf16(cpol, m, n, k, X16.data(), W16.data(), hb, ref.data(), hr);
      dino::cuda::device_buffer<float> dY(ref.size());
      dino::cuda::gemm_bias_rows_bf16(pol, m, n, k, dX16.data(), dW16.data(), db, dY.data(), dr);
      DINO_CHECK_CLOSE(download(dY), ref, 2e-5);
    }
  }
  const std::int64_t rows = 257, D = 384;
  const auto x = random_vector<float>(std::size_t(rows * D), 41, -3.0, 3.0);
  const auto w = random_vector<float>(std::size_t(D), 42, 0.5, 1.5), b = random_vector<float>(std::size_t(D), 43);
  std::vector<std::uint16_t> y16(x.size()), g16(x.size());
  std::vector<float> st(std::size_t(2 * rows));
  dino::cpu::layer_norm_rows_bf16(cpol, x.data(), w.data(), b.data(), y16.data(), st.data(), rows, D, 1e-6f);
  dino::cpu::gelu_apply_bf16(cpol, x.data(), g16.data(), std::int64_t(x.size()));
  auto dx = upload(x), dw = upload(w), db = upload(b);
  dino::cuda::device_buffer<std::uint16_t> dy16(x.size()), dg16(x.size());
  dino::cuda::device_buffer<float> dst(st.size());
  dino::cuda::layer_norm_rows_bf16(pol, dx.data(), dw.data(), db.data(), dy16.data(), dst.data(), rows, D, 1e-6f);
  dino::cuda::gelu_apply_bf16(pol, dx.data(), dg16.data(), std::int64_t(x.size()));
  dino::cuda::synchronize(gpu().stream());
  DINO_CHECK_CLOSE(widen(dino::cuda::to_host(dy16.data(), y16.size())), widen(y16), 4e-3);
  DINO_CHECK_CLOSE(widen(dino::cuda::to_host(dg16.data(), g16.size())), widen(g16), 4e-3);
  DINO_CHECK_CLOSE(download(dst), st, 1e-5);
  // The backward's producers with a bf16 copy (bf16_backward_operands): GELU's gradient is
  // gelu_backward_apply's, in place, and the copy its rounding; the scaled branch gradient is
  // the product src * scale of the token's crop, and the copy its rounding. n odd: the
  // scalar tail after the float4 body.
  const std::int64_t n = std::int64_t(x.size()) - 3;
  const auto g = random_vector<float>(x.size(), 44);
  auto dg_ref = upload(g), dg_in = upload(g);
  dino::cuda::device_buffer<std::uint16_t> dh16(x.size());
  dino::cuda::gelu_backward_apply(pol, dx.data(), dg_ref.data(), dg_ref.data(), n, false);
  dino::cuda::gelu_backward_copy_bf16(pol, dx.data(), dg_in.data(), dg_in.data(), dh16.data(), n);
  const auto dh_ref = download(dg_ref), dh = download(dg_in);
  CHECK(dh == dh_ref);
  const auto h16 = dino::cuda::to_host(dh16.data(), x.size());
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(h16[std::size_t(i)] == dino::cpu::bf16_bits(dh[std::size_t(i)]));
  const std::int64_t tokens = 37, Dz = 12;
  std::vector<std::int64_t> token_crop(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) token_crop[std::size_t(t)] = t % 3;
  const std::vector<float> scale{0.0f, 1.25f, 0.8f};
  const auto src = random_vector<float>(std::size_t(tokens * Dz), 45);
  auto dtc = upload(token_crop);
  auto dscale = upload(scale), dsrc = upload(src);
  dino::cuda::device_buffer<float> dz(src.size());
  dino::cuda::device_buffer<std::uint16_t> dz16(src.size());
  dino::cuda::scaled_copy_bf16(pol, dtc.data(), dsrc.data(), dscale.data(), dz.data(), dz16.data(), tokens, Dz);
  const auto z = download(dz);
  const auto z16 = dino::cuda::to_host(dz16.data(), src.size());
  for (std::size_t i = 0; i < src.size(); ++i) {
    REQUIRE(z[i] == src[i] * scale[std::size_t(token_crop[i / std::size_t(Dz)])]);
    REQUIRE(z16[i] == dino::cpu::bf16_bits(z[i]));
  }
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

TEST_CASE("cuda element-wise passes: the float4 form gives the bits of the one-element form") {
  // for_each_chunk runs a functor's vec4 form when the pointers are 16-byte aligned and n is
  // a multiple of 4; the same values one float further on (4-byte aligned) take the
  // one-element form. Both must give the same bits: GELU, its gradient (written and
  // accumulated), and the ViT's DropPath residual and scaled copy (a crop scale per token).
  const std::int64_t D = 64, tokens = 1003, n = tokens * D;
  const auto x = random_vector<float>(std::size_t(n), 21, -4.0, 4.0), g = random_vector<float>(std::size_t(n), 22);
  const auto shifted = [](const std::vector<float>& v) {  // [0, v...]: v at a 4-byte offset
    std::vector<float> w(v.size() + 1, 0.0f);
    std::copy(v.begin(), v.end(), w.begin() + 1);
    return w;
  };
  const auto pol = gpu().policy();
  auto xa = upload(x), ga = upload(g), xs = upload(shifted(x)), gs = upload(shifted(g));
  REQUIRE(dino::detail::aligned16(xa.data()));
  REQUIRE(!dino::detail::aligned16(xs.data() + 1));
  dino::cuda::device_buffer<float> ya(static_cast<std::size_t>(n)), ys(static_cast<std::size_t>(n + 1));
  const auto same_bits = [&] {
    const auto a = download(ya), b = download(ys);
    std::size_t diff = 0;
    for (std::int64_t i = 0; i < n; ++i) diff += std::bit_cast<std::uint32_t>(a[std::size_t(i)]) !=
                                                 std::bit_cast<std::uint32_t>(b[std::size_t(i + 1)]);
    return diff;
  };
  dino::cuda::gelu_apply(pol, static_cast<const float*>(xa.data()), ya.data(), n);
  dino::cuda::gelu_apply(pol, static_cast<const float*>(xs.data() + 1), ys.data() + 1, n);
  CHECK(same_bits() == 0);
  for (bool acc : {false, true}) {
    CAPTURE(acc);
    dino::cuda::gelu_backward_apply(pol, static_cast<const float*>(xa.data()), static_cast<const float*>(ga.data()),
                                    ya.data(), n, acc);
    dino::cuda::gelu_backward_apply(pol, static_cast<const float*>(xs.data() + 1),
                                    static_cast<const float*>(gs.data() + 1), ys.data() + 1, n, acc);
    CHECK(same_bits() == 0);
  }
  std::vector<std::int64_t> token_crop(static_cast<std::size_t>(tokens));
  for (std::int64_t t = 0; t < tokens; ++t) token_crop[std::size_t(t)] = t % 5;
  const std::vector<float> dp{0.0f, 1.25f, 1.0f, 0.5f, 1.25f};
  auto dtc = upload(token_crop);
  auto ddp = upload(dp);
  using residual = dino::nn::detail::residual_elems_fn<float>;
  using scaled = dino::nn::detail::scale_elems_fn<float>;
  dino::cuda::for_each_chunk(pol, n, residual{dtc.data(), ya.data(), xa.data(), ddp.data(), D});
  dino::cuda::for_each_chunk(pol, n, residual{dtc.data(), ys.data() + 1, xs.data() + 1, ddp.data(), D});
  CHECK(same_bits() == 0);
  dino::cuda::for_each_chunk(pol, n, scaled{dtc.data(), ga.data(), ddp.data(), ya.data(), D});
  dino::cuda::for_each_chunk(pol, n, scaled{dtc.data(), gs.data() + 1, ddp.data(), ys.data() + 1, D});
  CHECK(same_bits() == 0);
  // and the scaled copy against the host (one product per element: exact)
  std::vector<float> ref(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i)
    ref[std::size_t(i)] = g[std::size_t(i)] * dp[std::size_t(token_crop[std::size_t(i / D)])];
  DINO_CHECK_CLOSE(download(ya), ref, 0.0);
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
