// bench_cuda_gemm: the GEMMs of the DINO ViT-S/16 training step (bench_cuda_dino's
// train_vits16: batch 64, 2 x 224 + 10 x 96 crops) timed alone, in the operand and output
// types a bf16 step could give them, so that the bf16-activation work (docs/perf-notes.md,
// v11) knows what each choice buys before it is made.
//
// Shapes, row-major as dino::cuda::gemm sees them (T tokens, D 384, H 1536):
//   forward   qkv   [T, D] x [3D, D]^T + b        proj  [T, D] x [D, D]^T + b + residual
//             fc1   [T, D] x [H, D]^T + b         fc2   [T, H] x [D, H]^T + b + residual
//   backward  dX = dY W for each (dqkv W_qkv: [T, 3D] x [3D, D], ...)
//             dW = dY^T X for each ([3D, T] x [T, D], ...)
// T = 48,896 for the student (64 x (2 x 197 + 10 x 37)) and 25,216 for the teacher (its two
// global crops, forward only). A step runs each block's 4 forward GEMMs for the student and
// the teacher and the 8 backward ones for the student, 12 blocks.
//
// Modes (cuBLASLt, COMPUTE_32F sums in each):
//   tf32            fp32 operands and output, CUBLAS_COMPUTE_32F_FAST_TF32
//   fp32_fast16bf   fp32 operands and output, CUBLAS_COMPUTE_32F_FAST_16BF (today's bf16 mode)
//   bf16_in_fp32_out   bf16 operands in memory, fp32 output
//   bf16_in_bf16_out   bf16 operands and output (fp32 sums; PyTorch's bf16 autocast)
//   convert         a pass rounding one fp32 [rows, cols] matrix to bf16 (the cost of making a
//                   bf16 operand from an fp32 activation), per GEMM: its two operands
// The bias epilogue is used for the forward rows (bias and residual in the output type).
//
// Output: one line per shape and mode,
//   gemm <name> mode=<mode> m=.. n=.. k=.. ms=<median of reps> tflops=..
// and per mode the step's total (12 blocks; student forward + backward, teacher forward):
//   step mode=<mode> gemm_ms=.. convert_ms=..
// Usage: bench_cuda_gemm [--reps R]. Exits 77 without a CUDA device.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_bf16.h>

#include <dino/cuda.hpp>

namespace {

struct shape {
  const char* name;
  bool ta, tb;  // row-major transposes of A and B
  std::int64_t m, n, k;
  bool bias, residual;
  int per_step;  // how many times one step runs it (12 blocks)
};

enum mode { tf32, fast16bf, bf16_fp32, bf16_bf16, n_modes };
const char* mode_name(int m) {
  static const char* n[] = {"tf32", "fp32_fast16bf", "bf16_in_fp32_out", "bf16_in_bf16_out"};
  return n[m];
}

__global__ void fill_kernel(float* x, std::size_t n, std::uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x) {
    std::uint32_t h = std::uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = float(h & 0xffff) / 32768.0f - 1.0f;
  }
}
__global__ void to_bf16_kernel(const float* x, __nv_bfloat16* y, std::size_t n) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

struct events {
  cudaEvent_t a{}, b{};
  events() {
    DINO_CUDA_CHECK(cudaEventCreate(&a));
    DINO_CUDA_CHECK(cudaEventCreate(&b));
  }
  ~events() {
    (void)cudaEventDestroy(a);
    (void)cudaEventDestroy(b);
  }
};

// Median GPU time (ms) of reps calls of f, after two warm-up calls.
template <class F>
double time_ms(cudaStream_t s, int reps, F&& f) {
  events ev;
  f();
  f();
  std::vector<float> v;
  for (int i = 0; i < reps; ++i) {
    DINO_CUDA_CHECK(cudaEventRecord(ev.a, s));
    f();
    DINO_CUDA_CHECK(cudaEventRecord(ev.b, s));
    DINO_CUDA_CHECK(cudaEventSynchronize(ev.b));
    float ms = 0;
    DINO_CUDA_CHECK(cudaEventElapsedTime(&ms, ev.a, ev.b));
    v.push_back(ms);
  }
  std::sort(v.begin(), v.end());
  return double(v[v.size() / 2]);
}

// One cuBLASLt call of shape s in mode md: C[m, n] = op(A) op(B) (+ bias + residual), row-major,
// run as the column-major C^T = op(B)^T op(A)^T (as dino::cuda::gemm does).
struct lt_call {
  cublasLtMatmulDesc_t op{};
  cublasLtMatrixLayout_t la{}, lb{}, lc{}, ld{};
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;
  lt_call(const dino::cuda_policy& pol, const shape& s, int md, const void* bias) {
    const bool in16 = md == bf16_fp32 || md == bf16_bf16;
    const cudaDataType_t tin = in16 ? CUDA_R_16BF : CUDA_R_32F, tout = md == bf16_bf16 ? CUDA_R_16BF : CUDA_R_32F;
    const cublasComputeType_t ct = md == tf32       ? CUBLAS_COMPUTE_32F_FAST_TF32
                                   : md == fast16bf ? CUBLAS_COMPUTE_32F_FAST_16BF
                                                    : CUBLAS_COMPUTE_32F;
    DINO_CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, ct, CUDA_R_32F));
    const cublasOperation_t ta = s.tb ? CUBLAS_OP_T : CUBLAS_OP_N, tb = s.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    DINO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    DINO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    if (s.bias) {
      const cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
      DINO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
      DINO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    const std::int64_t lda = s.ta ? s.m : s.k, ldb = s.tb ? s.k : s.n;
    DINO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, tin, s.tb ? s.k : s.n, s.tb ? s.n : s.k, ldb));
    DINO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, tin, s.ta ? s.m : s.k, s.ta ? s.k : s.m, lda));
    DINO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lc, tout, s.n, s.m, s.n));
    DINO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&ld, tout, s.n, s.m, s.n));
    cublasLtMatmulPreference_t pref{};
    DINO_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const std::size_t ws = pol.gemm_workspace_bytes;
    DINO_CUBLAS_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    cublasLtMatmulHeuristicResult_t r{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(pol.lt, op, la, lb, lc, ld, pref, 1, &r, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
    if (ok) algo = r.algo;
  }
  ~lt_call() {
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatmulDescDestroy(op);
  }
  lt_call(const lt_call&) = delete;
  lt_call& operator=(const lt_call&) = delete;
};

}  // namespace

int main(int argc, char** argv) {
  int reps = 20;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: bench_cuda_gemm [--reps R]\n");
      return 2;
    }
  }
  if (!dino::cuda_device_available()) {
    std::fprintf(stderr, "bench_cuda_gemm: no CUDA device\n");
    return 77;
  }
  try {
    dino::cuda::context ctx;
    const dino::cuda_policy pol = ctx.policy();
    cudaDeviceProp prop{};
    DINO_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const std::int64_t D = 384, H = 1536, Ts = 64 * (2 * 197 + 10 * 37), Tt = 64 * 2 * 197;
    // per_step: 12 blocks; the forward shapes once for the student and once for the teacher.
    const std::vector<shape> shapes = {
        {"fwd_qkv_student", false, true, Ts, 3 * D, D, true, false, 12},
        {"fwd_proj_student", false, true, Ts, D, D, true, true, 12},
        {"fwd_fc1_student", false, true, Ts, H, D, true, false, 12},
        {"fwd_fc2_student", false, true, Ts, D, H, true, true, 12},
        {"fwd_qkv_teacher", false, true, Tt, 3 * D, D, true, false, 12},
        {"fwd_proj_teacher", false, true, Tt, D, D, true, true, 12},
        {"fwd_fc1_teacher", false, true, Tt, H, D, true, false, 12},
        {"fwd_fc2_teacher", false, true, Tt, D, H, true, true, 12},
        {"dx_qkv", false, false, Ts, D, 3 * D, false, false, 12},
        {"dx_proj", false, false, Ts, D, D, false, false, 12},
        {"dx_fc1", false, false, Ts, D, H, false, false, 12},
        {"dx_fc2", false, false, Ts, H, D, false, false, 12},
        {"dw_qkv", true, false, 3 * D, D, Ts, false, false, 12},
        {"dw_proj", true, false, D, D, Ts, false, false, 12},
        {"dw_fc1", true, false, H, D, Ts, false, false, 12},
        {"dw_fc2", true, false, D, H, Ts, false, false, 12},
    };
    std::size_t max_a = 0, max_b = 0, max_c = 0;
    for (const auto& s : shapes) {
      max_a = std::max<std::size_t>(max_a, std::size_t(s.m * s.k));
      max_b = std::max<std::size_t>(max_b, std::size_t(s.k * s.n));
      max_c = std::max<std::size_t>(max_c, std::size_t(s.m * s.n));
    }
    dino::cuda::device_buffer<float> a32(max_a), b32(max_b), c32(max_c), r32(max_c), bias32(std::size_t(4 * H));
    dino::cuda::device_buffer<__nv_bfloat16> a16(max_a), b16(max_b), c16(max_c), r16(max_c), bias16(std::size_t(4 * H));
    const auto fill = [&](float* p, std::size_t n, std::uint32_t seed) {
      fill_kernel<<<1024, 256, 0, pol.stream>>>(p, n, seed);
      DINO_CUDA_CHECK(cudaGetLastError());
    };
    const auto convert = [&](const float* x, __nv_bfloat16* y, std::size_t n) {
      to_bf16_kernel<<<int(std::min<std::size_t>((n + 255) / 256, 65535)), 256, 0, pol.stream>>>(x, y, n);
      DINO_CUDA_CHECK(cudaGetLastError());
    };
    fill(a32.data(), max_a, 1);
    fill(b32.data(), max_b, 2);
    fill(r32.data(), max_c, 3);
    fill(bias32.data(), std::size_t(4 * H), 4);
    convert(a32.data(), a16.data(), max_a);
    convert(b32.data(), b16.data(), max_b);
    convert(r32.data(), r16.data(), max_c);
    convert(bias32.data(), bias16.data(), std::size_t(4 * H));
    ctx.synchronize();

    std::printf("# bench_cuda_gemm on %s: the GEMMs of the ViT-S/16 DINO step (batch 64), median of %d calls\n",
                prop.name, reps);
    double step_ms[n_modes] = {}, convert_ms = 0;
    for (const auto& s : shapes) {
      const double flop = 2.0 * double(s.m) * double(s.n) * double(s.k);
      for (int md = 0; md < n_modes; ++md) {
        const bool in16 = md == bf16_fp32 || md == bf16_bf16, out16 = md == bf16_bf16;
        lt_call call(pol, s, md, out16 ? static_cast<const void*>(bias16.data()) : bias32.data());
        if (!call.ok) {
          std::printf("gemm %s mode=%s m=%lld n=%lld k=%lld no_algorithm\n", s.name, mode_name(md), (long long)s.m,
                      (long long)s.n, (long long)s.k);
          continue;
        }
        const void* A = in16 ? static_cast<const void*>(a16.data()) : a32.data();
        const void* B = in16 ? static_cast<const void*>(b16.data()) : b32.data();
        void* C = out16 ? static_cast<void*>(c16.data()) : c32.data();
        const void* R = s.residual ? (out16 ? static_cast<const void*>(r16.data()) : r32.data()) : C;
        const float one = 1.0f, beta = s.residual ? 1.0f : 0.0f;
        const double ms = time_ms(pol.stream, reps, [&] {
          DINO_CUBLAS_CHECK(cublasLtMatmul(pol.lt, call.op, &one, B, call.la, A, call.lb, &beta, R, call.lc, C,
                                           call.ld, &call.algo, pol.gemm_workspace, pol.gemm_workspace_bytes,
                                           pol.stream));
        });
        step_ms[md] += ms * s.per_step;
        std::printf("gemm %s mode=%s m=%lld n=%lld k=%lld ms=%.4f tflops=%.1f\n", s.name, mode_name(md),
                    (long long)s.m, (long long)s.n, (long long)s.k, ms, flop / (ms * 1e-3) / 1e12);
      }
      // What making both operands bf16 from fp32 costs, if nothing upstream wrote them in bf16.
      const std::size_t na = std::size_t(s.m * s.k), nb = std::size_t(s.k * s.n);
      const double cms = time_ms(pol.stream, reps, [&] {
        convert(a32.data(), a16.data(), na);
        convert(b32.data(), b16.data(), nb);
      });
      convert_ms += cms * s.per_step;
      std::printf("gemm %s mode=convert elements=%zu ms=%.4f GBps=%.0f\n", s.name, na + nb, cms,
                  double(na + nb) * 6.0 / (cms * 1e-3) / 1e9);
    }
    for (int md = 0; md < n_modes; ++md)
      std::printf("step mode=%s gemm_ms=%.2f (12 blocks: student forward and backward, teacher forward)\n",
                  mode_name(md), step_ms[md]);
    std::printf("step mode=convert convert_ms=%.2f (both operands of every GEMM made from fp32 by a pass)\n",
                convert_ms);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_gemm: %s\n", e.what());
    return 1;
  }
}
