// dino/policy/cuda/gemm.cuh: row-major GEMM through cuBLASLt, the twin of policy/cpu/gemm.hpp.
//
//   C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C[m, n]       (same gemm_desc)
//
// cuBLASLt is column-major; a row-major X with leading dimension ld is the column-major X^T,
// so the call computes C^T = op(B)^T op(A)^T: A and B swap places, m and n swap, and each
// keeps its own transpose flag. beta == 0 never reads C. fp32 runs on exact fp32 arithmetic
// unless pol.bf16 asks for bf16 tensor cores (CUBLAS_COMPUTE_32F_FAST_16BF: operands rounded
// to bf16, fp32 sums) or pol.tf32 for TF32 tensor cores; double runs in double.
//
//   gemm_bias_rows(pol, d, A, B, bias, C[, R])  C = A op(B) + bias per row (+ R): cuBLASLt's bias
//                                           epilogue, R read as the GEMM's C operand
//   linear_param_grads(pol, dy, x, rows, out, in, dW, db)   dW += dy^T x, db += column sums of
//                                           dy: with tensor cores, db in the GEMM's epilogue
//   linear_backward(pol, dy, x, W, rows, out, in, dW, db, dx, beta)   the above, and
//                                           dx = dy W + beta dx: under bf16_staged dy is
//                                           rounded into the stage once for both products
//
// cuda_policy::bf16_staged (with bf16): single products round A and B to bf16 into the
// context's stage by a pass each, then run on bf16 operands in memory (COMPUTE_32F, fp32 C):
// the CPU's rounding (to nearest even) and cuBLASLt's native bf16 kernels. A shape with no
// such algorithm falls back to FAST_16BF.
//
// Descriptors and the chosen algorithm are cached per shape and operand alignment (host
// memory, made the first time a shape is seen, so a step's GEMMs allocate nothing after the
// first step). The heuristic is told each operand's real alignment (cuBLASLt assumes 256
// bytes otherwise, and may then refuse a pointer into the middle of a buffer).
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>

#include "dino/policy/cpu/gemm.hpp"  // gemm_desc (no Eigen type crosses into this file)
#include "dino/policy/cuda/memory.cuh"
#include "dino/policy/cuda/parallel.cuh"
#include "dino/policy/cuda/policy.cuh"
#include "dino/policy/cuda/reduce.cuh"

namespace dino::cuda {

using cpu::gemm_desc;
using cpu::linear_bf16_copies;

namespace detail {

struct lt_plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool found = false;  // false only for an epilogue or staged plan cuBLASLt has no algorithm for
};

// Key: handle, workspace size, dtype, fp32 mode (0 exact, 1 TF32, 2 bf16, 3 bf16 operands in
// memory: bf16_staged), transposes, sizes, leading dims, batch and strides, epilogue
// (lt_epilogue), the operands' pointer alignments.
using lt_key = std::tuple<void*, std::size_t, int, int, bool, bool, std::int64_t, std::int64_t, std::int64_t,
                          std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t,
                          std::int64_t, int, std::array<std::uint32_t, 4>>;

// What a plan's epilogue adds to the product.
enum lt_epilogue : int {
  epi_none = 0,
  epi_bias = 1,   // a bias per row of the row-major C (CUBLASLT_EPILOGUE_BIAS)
  epi_bgrad = 2,  // the column sums of the row-major A of a trans_a product (CUBLASLT_EPILOGUE_BGRADB)
};

// The largest power of two (up to 256) that divides the address. cuBLASLt's heuristic assumes
// 256-byte aligned operands unless told otherwise, and an algorithm chosen under that
// assumption may refuse a less aligned pointer at the call (CUBLAS_STATUS_NOT_SUPPORTED): the
// ViT's activations sit at offsets of 4 or 8 bytes inside its saved region.
inline std::uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t al = 256;
  while (al > 1 && (a & (al - 1)) != 0) al >>= 1;
  return al;
}
// The alignments of the call's operands in the order of the column-major call: B's memory (its
// "A"), A's memory (its "B"), C and D.
using operand_alignment = std::array<std::uint32_t, 4>;

inline std::map<lt_key, lt_plan>& lt_cache() {
  static std::map<lt_key, lt_plan> cache;  // plans live as long as the program
  return cache;
}
inline std::mutex& lt_mutex() {
  static std::mutex m;
  return m;
}

inline void set_batch(cublasLtMatrixLayout_t l, std::int64_t batch, std::int64_t stride) {
  if (batch <= 1) return;
  const int count = static_cast<int>(batch);
  DINO_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
  DINO_CUBLAS_CHECK(
      cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
}

// epilogue: epi_bias adds a bias per row of the row-major C (CUBLASLT_EPILOGUE_BIAS over the
// rows of the column-major C^T); epi_bgrad writes the column sums of a trans_a product's A (its
// sum over k: CUBLASLT_EPILOGUE_BGRADB, the call's B being A's memory). The bias pointer is
// set on the descriptor before each call. A plan with an epilogue, or a staged one, may come
// back with found false: the caller then takes another path.
// staged: A and B are bf16 in memory (cuda_policy::bf16_staged), C and D fp32, COMPUTE_32F.
template <class T>
inline const lt_plan& plan_for(const cuda_policy& pol, const gemm_desc& d, std::int64_t lda, std::int64_t ldb,
                               std::int64_t ldc, operand_alignment al, int epilogue = epi_none, bool staged = false) {
  constexpr bool dbl = std::is_same_v<T, double>;
  const int mode = dbl ? 0 : staged ? 3 : pol.bf16 ? 2 : pol.tf32 ? 1 : 0;
  const lt_key key{pol.lt,    pol.gemm_workspace_bytes, dbl ? 1 : 0, mode,       d.trans_a,  d.trans_b,
                   d.m,       d.n,                      d.k,         lda,        ldb,        ldc,
                   d.batch,   d.stride_a,               d.stride_b,  d.stride_c, epilogue,   al};
  std::lock_guard<std::mutex> lock(lt_mutex());
  auto& cache = lt_cache();
  if (auto it = cache.find(key); it != cache.end()) return it->second;

  const cudaDataType_t dt = dbl ? CUDA_R_64F : CUDA_R_32F, dt_ab = mode == 3 ? CUDA_R_16BF : dt;
  const cublasComputeType_t ct = dbl         ? CUBLAS_COMPUTE_64F
                                 : mode == 3 ? CUBLAS_COMPUTE_32F
                                 : mode == 2 ? CUBLAS_COMPUTE_32F_FAST_16BF
                                 : mode == 1 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                             : CUBLAS_COMPUTE_32F;
  lt_plan p;
  DINO_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, ct, dt));
  // Column-major view: C^T[n, m] = op(B)^T[n, k] op(A)^T[k, m]; "A" of the call is B's memory.
  const cublasOperation_t ta = d.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, tb = d.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  DINO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  DINO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (epilogue != epi_none) {
    const cublasLtEpilogue_t ep = epilogue == epi_bgrad ? CUBLASLT_EPILOGUE_BGRADB : CUBLASLT_EPILOGUE_BIAS;
    DINO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
  }
  // Stored column-major shapes: B's memory is [n, k] (or [k, n] when transposed), A's [k, m] (or [m, k]).
  DINO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.a, dt_ab, d.trans_b ? d.k : d.n, d.trans_b ? d.n : d.k, ldb));
  DINO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.b, dt_ab, d.trans_a ? d.m : d.k, d.trans_a ? d.k : d.m, lda));
  DINO_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.c, dt, d.n, d.m, ldc));
  set_batch(p.a, d.batch, d.stride_b);
  set_batch(p.b, d.batch, d.stride_a);
  set_batch(p.c, d.batch, d.stride_c);

  cublasLtMatmulPreference_t pref = nullptr;
  DINO_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  const std::size_t ws = pol.gemm_workspace_bytes;
  DINO_CUBLAS_CHECK(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, std::uint32_t> aligns[4] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, al[0]},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, al[1]},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, al[2]},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, al[3]}};
  for (const auto& [attr, v] : aligns)
    DINO_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &v, sizeof(v)));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(pol.lt, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  // found: false (the caller takes another path)
  if ((epilogue != epi_none || staged) && (s != CUBLAS_STATUS_SUCCESS || found == 0))
    return cache.emplace(key, p).first->second;
  if (s != CUBLAS_STATUS_SUCCESS || found == 0)
    throw cuda_error(::dino::detail::concat("cuBLASLt: no algorithm for gemm m=", d.m, " n=", d.n, " k=", d.k,
                                            " batch=", d.batch, " (status ", int(s), ")"));
  p.algo = result.algo;
  p.found = true;
  return cache.emplace(key, p).first->second;
}

template <class T>
struct scale_chunk {
  T* c;
  T beta;
  std::int64_t cols, ld;
  DINO_HD void operator()(std::int64_t b, std::int64_t e) const {
    for (std::int64_t i = b; i < e; ++i) {
      T& x = c[(i / cols) * ld + i % cols];
      x = beta == T(0) ? T(0) : beta * x;
    }
  }
};

template <class T>
struct bias_rows_fn {  // C[r, c] = bias[c] over the m x n block of C
  const T* bias;
  T* c;
  std::int64_t cols, ld;
  DINO_HD void operator()(std::int64_t b, std::int64_t e) const {
    for (std::int64_t i = b; i < e; ++i) c[(i / cols) * ld + i % cols] = bias[i % cols];
  }
};

template <class T>
struct add_rows_fn {  // C[r, c] += R[r, c] (R packed [m, n])
  const T* r;
  T* c;
  std::int64_t cols, ld;
  DINO_HD void operator()(std::int64_t b, std::int64_t e) const {
    for (std::int64_t i = b; i < e; ++i) c[(i / cols) * ld + i % cols] += r[i];
  }
};

// y[r, c] = x[r, c] rounded to bf16 (to nearest even), x [rows, cols] with leading dimension
// ld, y with leading dimension ldy: a GEMM operand staged for cuda_policy::bf16_staged.
struct stage_bf16_fn {
  const float* x;
  __nv_bfloat16* y;
  std::int64_t cols, ld, ldy;
  static constexpr const char* profile_name = "bf16 operand staging";
  static constexpr const char* profile_name_vec4 = "bf16 operand staging (float4)";
  __device__ void operator()(std::int64_t b, std::int64_t e) const {
    for (std::int64_t i = b; i < e; ++i) {
      const std::int64_t r = i / cols, c = i % cols;
      y[r * ldy + c] = __float2bfloat16_rn(x[r * ld + c]);
    }
  }
  __device__ void vec4(std::int64_t q) const {  // only when ld == ldy == cols (vec4_ok)
    const float4 v = reinterpret_cast<const float4*>(x)[q];
    __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 w;
    std::memcpy(&w.x, &lo, 4);
    std::memcpy(&w.y, &hi, 4);
    reinterpret_cast<uint2*>(y)[q] = w;
  }
  bool vec4_ok() const {
    return ld == cols && ldy == cols && alignment_of(x) >= 16 && alignment_of(y) >= 8;
  }
};

// The stage's bytes for n bf16 elements, 256-byte aligned (the start of the next operand).
inline std::size_t stage_span(std::int64_t n) { return (std::size_t(n) * 2 + 255) / 256 * 256; }

// The stage, grown to at least `bytes` (a host wait first: queued products may still read it).
inline void* stage_at_least(const cuda_policy& pol, std::size_t bytes) {
  bf16_stage& s = *pol.stage;
  if (s.bytes < bytes) {
    host_wait(pol, "bf16 stage: growing");
    device_free(s.data);
    s.data = nullptr;
    s.bytes = 0;
    s.data = device_allocate(bytes, "bf16 GEMM operand stage");
    s.bytes = bytes;
  }
  return s.data;
}

// d with A and B as stage_operands leaves them: each stored row's length rounded up to 8
// elements (16 bytes: every row aligned for cuBLASLt's bf16 kernels).
inline std::int64_t stage_ld(std::int64_t cols) { return (cols + 7) / 8 * 8; }
inline gemm_desc packed_desc(gemm_desc d) {
  d.lda = stage_ld(d.trans_a ? d.m : d.k);
  d.ldb = stage_ld(d.trans_b ? d.k : d.n);
  return d;
}

// A and B of d (leading dimensions lda, ldb) rounded to bf16 into the stage, laid out as
// packed_desc(d) says; the product then runs on them.
struct staged_operands {
  const __nv_bfloat16 *a = nullptr, *b = nullptr;
};
inline staged_operands stage_operands(const cuda_policy& pol, const gemm_desc& d, const float* A, std::int64_t lda,
                                      const float* B, std::int64_t ldb) {
  const std::int64_t ar = d.trans_a ? d.k : d.m, ac = d.trans_a ? d.m : d.k;
  const std::int64_t br = d.trans_b ? d.n : d.k, bc = d.trans_b ? d.k : d.n;
  const std::int64_t sla = stage_ld(ac), slb = stage_ld(bc);
  const std::size_t off_b = stage_span(ar * sla);
  auto* base = static_cast<unsigned char*>(stage_at_least(pol, off_b + stage_span(br * slb)));
  auto* sa = reinterpret_cast<__nv_bfloat16*>(base);
  auto* sb = reinterpret_cast<__nv_bfloat16*>(base + off_b);
  for_each_chunk(pol, ar * ac, stage_bf16_fn{A, sa, ac, lda, sla});
  for_each_chunk(pol, br * bc, stage_bf16_fn{B, sb, bc, ldb, slb});
  return {sa, sb};
}

// Runs a found plan p: C = alpha op(A) op(B) + beta c_in, A and B the row-major operands as
// the product's gemm_desc names them (cuBLASLt's column-major view takes B's memory as its A);
// epi: the epilogue's vector (the bias, or the bias gradient's output) for a plan that has one.
// Then marks the profile.
template <class S>
inline void lt_run(const cuda_policy& pol, const lt_plan& p, S alpha, const void* A, const void* B, S beta,
                   const void* c_in, void* C, const void* epi, const char* mark) {
  if (epi) DINO_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &epi, sizeof(epi)));
  DINO_CUBLAS_CHECK(cublasLtMatmul(pol.lt, p.op, &alpha, B, p.a, A, p.b, &beta, c_in, p.c, C, p.c, &p.algo,
                                   pol.gemm_workspace, pol.gemm_workspace_bytes, pol.stream));
  profile_mark(mark);
}

// Whether a float product takes the staged path (cuda_policy::bf16_staged).
inline bool use_stage(const cuda_policy& pol, const gemm_desc& d) {
  return pol.bf16 && pol.bf16_staged && pol.stage && d.batch == 1 && d.k > 0;
}

// The staged product (use_stage): D = alpha op(A) op(B) + beta C_in, with the plan's epilogue
// (epi_none, or epi_bias with `bias`), A and B rounded into the stage first. False, with
// nothing queued, when cuBLASLt has no such algorithm: the caller takes its FAST_16BF path.
inline bool staged_matmul(const cuda_policy& pol, const gemm_desc& d, std::int64_t lda, std::int64_t ldb,
                          std::int64_t ldc, float alpha, const float* A, const float* B, float beta, const float* c_in,
                          float* C, const float* bias, const char* mark) {
  const gemm_desc sd = packed_desc(d);
  const lt_plan& p = plan_for<float>(pol, sd, sd.lda, sd.ldb, ldc, {256, 256, alignment_of(c_in), alignment_of(C)},
                                     bias ? epi_bias : epi_none, true);
  if (!p.found) return false;
  const staged_operands st = stage_operands(pol, d, A, lda, B, ldb);
  lt_run(pol, p, alpha, st.a, st.b, beta, c_in, C, bias, mark);
  return true;
}

}  // namespace detail

/// Runs the (batched) product described by d on pol.stream (no synchronisation).
template <class T>
inline void gemm(const cuda_policy& pol, const gemm_desc& d, T alpha, const T* A, const T* B, T beta, T* C) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "dino::cuda::gemm: float or double");
  require<shape_error>(d.m >= 0 && d.n >= 0 && d.k >= 0 && d.batch >= 1, "gemm: invalid sizes m=", d.m, " n=", d.n,
                       " k=", d.k, " batch=", d.batch);
  if (d.m == 0 || d.n == 0) return;
  const std::int64_t lda = d.lda ? d.lda : (d.trans_a ? d.m : d.k);
  const std::int64_t ldb = d.ldb ? d.ldb : (d.trans_b ? d.k : d.n);
  const std::int64_t ldc = d.ldc ? d.ldc : d.n;
  if (d.k == 0) {  // empty product: C = beta * C, batch by batch
    for (std::int64_t i = 0; i < d.batch; ++i)
      for_each_chunk(pol, d.m * d.n, detail::scale_chunk<T>{C + i * d.stride_c, beta, d.n, ldc});
    return;
  }
  if constexpr (std::is_same_v<T, float>) {  // else (no algorithm): FAST_16BF over the fp32 operands, below
    if (detail::use_stage(pol, d) &&
        detail::staged_matmul(pol, d, lda, ldb, ldc, alpha, A, B, beta, C, C, nullptr, "gemm (bf16 operands)"))
      return;
  }
  const detail::lt_plan& p = detail::plan_for<T>(
      pol, d, lda, ldb, ldc,
      {detail::alignment_of(B), detail::alignment_of(A), detail::alignment_of(C), detail::alignment_of(C)});
  detail::lt_run(pol, p, alpha, A, B, beta, C, C, nullptr, d.batch > 1 ? "gemm (batched)" : "gemm");
}

/// C[m, n] = A op(B) + bias (the same bias row added to every row of C; d.batch 1), with the
/// bias added in cuBLASLt's epilogue: one pass over C instead of a bias pass and a GEMM that
/// reads C back. Where cuBLASLt has no bias-epilogue algorithm for the shape and type, or the
/// bias is less than 16-byte aligned, the bias rows are written first and the GEMM adds to
/// them (the CPU's order).
/// With residual (a packed [m, n] matrix, not C): C = A op(B) + bias + residual, the residual
/// read by the GEMM as its C operand (beta 1) and C written as its D.
template <class T>
inline void gemm_bias_rows(const cuda_policy& pol, const gemm_desc& d, const T* A, const T* B, const T* bias, T* C,
                           const T* residual = nullptr) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "dino::cuda::gemm_bias_rows: float or double");
  require<shape_error>(d.batch == 1, "gemm_bias_rows: one product only, got batch=", d.batch);
  require<shape_error>(d.m >= 0 && d.n >= 0 && d.k >= 0, "gemm_bias_rows: invalid sizes m=", d.m, " n=", d.n,
                       " k=", d.k);
  if (d.m == 0 || d.n == 0) return;
  const std::int64_t lda = d.lda ? d.lda : (d.trans_a ? d.m : d.k);
  const std::int64_t ldb = d.ldb ? d.ldb : (d.trans_b ? d.k : d.n);
  const std::int64_t ldc = d.ldc ? d.ldc : d.n;
  // cuBLASLt's bias epilogue needs a 16-byte aligned bias (a less aligned one can fail the call).
  // Staged bf16 operands first; without a bias-epilogue algorithm for them, the paths below.
  if constexpr (std::is_same_v<T, float>) {
    if (detail::use_stage(pol, d) && detail::alignment_of(bias) >= 16 &&
        detail::staged_matmul(pol, d, lda, ldb, ldc, 1.0f, A, B, residual ? 1.0f : 0.0f, residual ? residual : C, C,
                              bias,
                              residual ? "gemm + bias epilogue + residual (bf16 operands)"
                                       : "gemm + bias epilogue (bf16 operands)"))
      return;
  }
  if (d.k > 0 && detail::alignment_of(bias) >= 16) {
    const T* c_in = residual ? residual : C;
    const detail::lt_plan& p = detail::plan_for<T>(
        pol, d, lda, ldb, ldc,
        {detail::alignment_of(B), detail::alignment_of(A), detail::alignment_of(c_in), detail::alignment_of(C)},
        detail::epi_bias);
    if (p.found) {
      detail::lt_run(pol, p, T(1), A, B, T(residual ? 1 : 0), c_in, C, bias,
                     residual ? "gemm + bias epilogue + residual" : "gemm + bias epilogue");
      return;
    }
  }
  for_each_chunk(pol, d.m * d.n, detail::bias_rows_fn<T>{bias, C, d.n, ldc});
  gemm(pol, d, T(1), A, B, T(1), C);
  if (residual) for_each_chunk(pol, d.m * d.n, detail::add_rows_fn<T>{residual, C, d.n, ldc});
}

/// The parameter gradients of a linear layer (nn::linear): dW[out, in] += dy^T x over the
/// rows, and db[out] += the column sums of dy (db null: no bias). Twin of the CPU form. With
/// tensor cores (tf32 or bf16, not bf16_staged) and float, db is summed by the GEMM's
/// epilogue (CUBLASLT_EPILOGUE_BGRADB: dy is read once instead of twice, and no column_sums
/// launches), into pol.scratch and then added to db: fp32 sums, possibly of dy as the tensor
/// cores round it, where column_sums sums the exact dy in double, so exact fp32 keeps
/// column_sums. Where cuBLASLt has no such algorithm: the GEMM, then column_sums.
template <class T>
inline void linear_param_grads(const cuda_policy& pol, const T* dy, const T* x, std::int64_t rows, std::int64_t out,
                               std::int64_t in, T* dW, T* db) {
  const gemm_desc d{true, false, out, in, rows};
  if constexpr (std::is_same_v<T, float>) {
    const bool fast = (pol.tf32 || pol.bf16) && !detail::use_stage(pol, d);
    if (db && fast && rows > 0 && pol.scratch && pol.scratch_bytes >= std::size_t(out) * sizeof(T) &&
        detail::alignment_of(pol.scratch) >= 16) {
      const detail::lt_plan& p = detail::plan_for<T>(
          pol, d, out, in, in,
          {detail::alignment_of(x), detail::alignment_of(dy), detail::alignment_of(dW), detail::alignment_of(dW)},
          detail::epi_bgrad);
      if (p.found) {
        T* part = static_cast<T*>(pol.scratch);
        detail::lt_run(pol, p, T(1), dy, x, T(1), dW, dW, part, "gemm + bias gradient epilogue");
        for_each_chunk(pol, out, detail::add_rows_fn<T>{part, db, out, out});  // db += part (one row)
        return;
      }
    }
  }
  gemm(pol, d, T(1), dy, x, T(1), dW);
  if (db) column_sums(pol, dy, rows, out, db, true);
}

namespace detail {
// y[r, c] = x[r, c]: bf16 rows (packed, cols each) copied to leading dimension ldy, where a
// caller's bf16 copy is not laid out as cuBLASLt's bf16 kernels need (16-byte rows).
struct copy_bf16_fn {
  const __nv_bfloat16* x;
  __nv_bfloat16* y;
  std::int64_t cols, ldy;
  static constexpr const char* profile_name = "bf16 operand copy";
  __device__ void operator()(std::int64_t b, std::int64_t e) const {
    for (std::int64_t i = b; i < e; ++i) y[(i / cols) * ldy + i % cols] = x[i];
  }
};
// y[i] = float(x[i]) (exact).
struct widen_bf16_fn {
  const __nv_bfloat16* x;
  float* y;
  static constexpr const char* profile_name = "bf16 operand widening";
  __device__ void operator()(std::int64_t b, std::int64_t e) const {
    for (std::int64_t i = b; i < e; ++i) y[i] = __bfloat162float(x[i]);
  }
};

// linear_backward's staged path (use_stage): dy, x and W in bf16, then dW += dy^T x, db by
// column_sums (the staged single products' order) and, with dx, dx = dy W + beta dx, both
// products on the same dy. Each operand is rounded into the stage by a pass of its own, except
// a bf16 copy the caller gives (copies) whose rows are 16-byte aligned as they lie: that one is
// read where it is (an unaligned one is copied into the stage). The plans are the single
// staged products' (packed_desc of each; the operands' real alignments), so without copies the
// same bits as linear_param_grads then gemm under bf16_staged, with one pass over dy fewer.
// False, with nothing queued, when cuBLASLt has no algorithm for either product.
inline bool staged_linear_backward(const cuda_policy& pol, const float* dy, const float* x, const float* W,
                                   std::int64_t rows, std::int64_t out, std::int64_t in, float* dW, float* db,
                                   float* dx, float beta, linear_bf16_copies copies) {
  const gemm_desc dw{true, false, out, in, rows}, dd{false, false, rows, in, out};
  if (rows <= 0 || out <= 0 || in <= 0 || !use_stage(pol, dw)) return false;
  const std::int64_t ly = stage_ld(out), lx = stage_ld(in);  // dy [rows, out]; x [rows, in]; W [out, in]
  const auto* cy = reinterpret_cast<const __nv_bfloat16*>(copies.dy);
  const auto* cx = reinterpret_cast<const __nv_bfloat16*>(copies.x);
  const bool y_as_is = cy && ly == out && alignment_of(cy) >= 16;
  const bool x_as_is = cx && lx == in && alignment_of(cx) >= 16;
  const std::uint32_t ay = y_as_is ? alignment_of(cy) : 256u, ax = x_as_is ? alignment_of(cx) : 256u;
  const gemm_desc sw = packed_desc(dw), sd = packed_desc(dd);
  const lt_plan& pw = plan_for<float>(pol, sw, sw.lda, sw.ldb, in, {ax, ay, alignment_of(dW), alignment_of(dW)},
                                      epi_none, true);
  if (!pw.found) return false;
  const lt_plan* pd = nullptr;
  if (dx) {
    pd = &plan_for<float>(pol, sd, sd.lda, sd.ldb, in, {256, ay, alignment_of(dx), alignment_of(dx)}, epi_none, true);
    if (!pd->found) return false;
  }
  // the stage: [dy][x][W], each part only when it is staged
  const std::size_t oy = 0, ox = oy + (y_as_is ? 0 : stage_span(rows * ly));
  const std::size_t ow = ox + (x_as_is ? 0 : stage_span(rows * lx)), end = ow + (dx ? stage_span(out * lx) : 0);
  auto* base = end ? static_cast<unsigned char*>(stage_at_least(pol, end)) : nullptr;
  const __nv_bfloat16* sy = cy;
  const __nv_bfloat16* sx = cx;
  if (!y_as_is) {
    auto* t = reinterpret_cast<__nv_bfloat16*>(base + oy);
    if (cy) for_each_chunk(pol, rows * out, copy_bf16_fn{cy, t, out, ly});
    else for_each_chunk(pol, rows * out, stage_bf16_fn{dy, t, out, out, ly});
    sy = t;
  }
  if (!x_as_is) {
    auto* t = reinterpret_cast<__nv_bfloat16*>(base + ox);
    if (cx) for_each_chunk(pol, rows * in, copy_bf16_fn{cx, t, in, lx});
    else for_each_chunk(pol, rows * in, stage_bf16_fn{x, t, in, in, lx});
    sx = t;
  }
  lt_run(pol, pw, 1.0f, sy, sx, 1.0f, dW, dW, nullptr, "gemm (bf16 operands)");
  if (db) column_sums(pol, dy, rows, out, db, true);
  if (dx) {
    auto* sW = reinterpret_cast<__nv_bfloat16*>(base + ow);
    for_each_chunk(pol, out * in, stage_bf16_fn{W, sW, in, in, lx});
    lt_run(pol, *pd, 1.0f, sy, sW, beta, dx, dx, nullptr, "gemm (bf16 operands)");
  }
  return true;
}
}  // namespace detail

/// The backward products of a linear layer (nn::linear) with weight W [out, in]: dW += dy^T x
/// and db += the column sums of dy (linear_param_grads), then, with dx, dx[rows, in] = dy W +
/// beta dx (beta 0: dx is not read). Twin of the CPU form. Under bf16_staged (float) dy is
/// rounded to bf16 once for both products instead of once for each (the same bits as the two
/// single products, one pass over dy fewer), and the bf16 copies in `copies` are read instead
/// of rounding dy or x again (the same values when they are dy's and x's rounded to nearest
/// even). x may be null when copies.x is given (float): elsewhere than the staged path,
/// copies.x is then widened into the stage and the products run on fp32 operands.
template <class T>
inline void linear_backward(const cuda_policy& pol, const T* dy, const T* x, const T* W, std::int64_t rows,
                            std::int64_t out, std::int64_t in, T* dW, T* db, T* dx, T beta,
                            linear_bf16_copies copies = {}) {
  require<config_error>(x != nullptr || (std::is_same_v<T, float> && copies.x != nullptr),
                        "linear_backward: no x, and no bf16 copy of it (float only)");
  if constexpr (std::is_same_v<T, float>) {
    if ((dx || !x) && detail::staged_linear_backward(pol, dy, x, W, rows, out, in, dW, db, dx, beta, copies)) return;
    if (!x) {  // fp32 operands from the copy: widened into the stage, the products without it
      auto* xw = static_cast<float*>(detail::stage_at_least(pol, std::size_t(rows * in) * sizeof(float)));
      for_each_chunk(pol, rows * in, detail::widen_bf16_fn{reinterpret_cast<const __nv_bfloat16*>(copies.x), xw});
      cuda_policy unstaged = pol;
      unstaged.bf16_staged = false;
      linear_param_grads(unstaged, dy, xw, rows, out, in, dW, db);
      if (dx) gemm(unstaged, gemm_desc{false, false, rows, in, out}, T(1), dy, W, beta, dx);
      return;
    }
  }
  linear_param_grads(pol, dy, x, rows, out, in, dW, db);
  if (dx) gemm(pol, gemm_desc{false, false, rows, in, out}, T(1), dy, W, beta, dx);
}

/// Whether the ViT's backward passes its recomputed operands as bf16 copies
/// (linear_bf16_copies) instead of fp32: under bf16_staged, where the products read bf16 from
/// memory anyway. Twin of the CPU form (never there).
inline bool bf16_backward_operands(const cuda_policy& pol) { return pol.bf16 && pol.bf16_staged && pol.stage; }

}  // namespace dino::cuda

namespace dino {
using cuda::gemm;
using cuda::gemm_bias_rows;
using cuda::bf16_backward_operands;
using cuda::linear_backward;
using cuda::linear_param_grads;
}  // namespace dino
