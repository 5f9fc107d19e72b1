// dino/nn/attention.hpp: multi-head self-attention over packed variable-length segments.
//
// A pack is one token matrix [T, D] holding several sequences (one per crop) back to back;
// segment s covers rows [offset_s, offset_s + n_s). qkv [T, 3D] is the output of the qkv
// Linear, its columns [all Q | all K | all V], each split into `heads` contiguous blocks of
// head_dim = D / heads (the reference's reshape(B, N, 3, heads, hd)). Per segment and head:
//
//   P = softmax(Q K^T * head_dim^-0.5)   [n, n]      O = P V   [n, hd] -> out[:, h*hd : (h+1)*hd]
//
// Attention never crosses segments. Training keeps every P (attention_probs_elems()
// elements) for the backward; inference uses the same amount of scratch and can return each
// segment's CLS row of P ([segments, heads, n_s], the reference's
// get_last_selfattention()[:, :, 0, :]). The GPU's bf16 path keeps one float per row instead
// (attention_store::rows), in a probs buffer planned for it or in a matrix one.
// Backward, from dO = dout:
//   dP = dO V^T;  dV = P^T dO;  dS = P o (dP - rowsum(dP o P));  dQ = dS K s;  dK = dS^T Q s
// dqkv is written (every element). Work runs in parallel over (segment, head) pairs, dealt to
// the threads in turn (a pack lists its large crops first).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "dino/core/error.hpp"
#include "dino/math/softmax.hpp"
#include "dino/policy/cpu.hpp"

namespace dino::nn {

struct segment {
  std::int64_t offset = 0, length = 0;
};

/// What the forward keeps for the backward in its probs buffer, per (segment, head) of n
/// tokens. matrix: P itself, n x n (the CPU; the GPU's fp32 and TF32 paths). rows: one float
/// per row, the log2-sum-exp of its scaled scores (the GPU's bf16 path, which recomputes P in
/// the backward). A matrix layout serves every path; a rows layout only the bf16 path.
/// attention_store_for<T>(pol, head_dim) says which one a policy's attention needs.
enum class attention_store { matrix, rows };

/// Elements of one segment's probs region: heads * n^2 (matrix) or heads * n (rows).
inline std::size_t attention_probs_elems(std::int64_t heads, std::int64_t n,
                                         attention_store store = attention_store::matrix) {
  return static_cast<std::size_t>(heads * n * (store == attention_store::matrix ? n : 1));
}
/// Elements of the probs buffer of a pack of segments: the sum of their regions.
inline std::size_t attention_probs_elems(const std::vector<segment>& segs, std::int64_t heads,
                                         attention_store store = attention_store::matrix) {
  std::size_t n = 0;
  for (const auto& s : segs) n += attention_probs_elems(heads, s.length, store);
  return n;
}

/// The host's attention keeps P: matrix.
template <class T>
constexpr attention_store attention_store_for(const cpu_policy&, std::int64_t) {
  return attention_store::matrix;
}

namespace detail {
/// Offsets of each segment's probs region, back to back.
inline std::vector<std::size_t> probs_offsets(const std::vector<segment>& segs, std::int64_t heads,
                                              attention_store store = attention_store::matrix) {
  std::vector<std::size_t> off(segs.size());
  std::size_t o = 0;
  for (std::size_t i = 0; i < segs.size(); ++i) {
    off[i] = o;
    o += attention_probs_elems(heads, segs[i].length, store);
  }
  return off;
}
/// The paths that keep P (the CPU's, the GPU's fp32 and TF32) need heads*n*n floats per
/// segment: a layout in which a segment's region reaches into the next one's (of consecutive
/// segments, in offset order) is refused, as a probs buffer planned for the GPU's bf16 path
/// (attention_store::rows) would be.
inline void check_matrix_room(const char* name, std::int64_t heads, const std::vector<segment>& segs,
                              const std::vector<std::size_t>& poff) {
  for (std::size_t s = 0; s + 1 < segs.size(); ++s) {
    const bool up = poff[s] <= poff[s + 1];
    const std::size_t lo = up ? s : s + 1, hi = up ? s + 1 : s;
    const std::size_t need = attention_probs_elems(heads, segs[lo].length);
    require<shape_error>(poff[hi] - poff[lo] >= need || (poff[hi] == poff[lo] && need == 0), name,
                         ": the probs regions of segments ", lo, " and ", hi, " overlap (offsets ", poff[lo], " and ",
                         poff[hi], "; this path keeps P, heads x n x n = ", need,
                         " floats per segment): is the buffer planned for the bf16 path's rows "
                         "(attention_store::rows) under a policy without bf16 attention?");
  }
}

}  // namespace detail

/// out [T, D] (=) attention of qkv [T, 3D]; probs receives every P (training) or is scratch
/// (inference). cls_attn, when non-null, receives P[0, :] per segment and head, packed as
/// [segment][head][n_s] at cls_offsets[segment] (cls_offsets from the caller). keep_probs
/// false says probs is scratch (inference): the CPU still works in it, the GPU's tensor-core
/// kernels leave it alone.
template <class T>
inline void attention_forward(const cpu_policy& pol, std::int64_t heads, std::int64_t D, const std::vector<segment>& segs,
                              const std::vector<std::size_t>& poff, const T* qkv, T* out, T* probs, T* cls_attn = nullptr,
                              const std::int64_t* cls_offsets = nullptr, bool keep_probs = true) {
  (void)keep_probs;
  detail::check_matrix_room("attention_forward", heads, segs, poff);
  const std::int64_t hd = D / heads;
  const T scale = T(1.0 / std::sqrt(double(hd)));
  const std::int64_t pairs = static_cast<std::int64_t>(segs.size()) * heads;
  for_each_row_cyclic(pol, pairs, [&](std::int64_t ph) {
    const std::size_t si = static_cast<std::size_t>(ph / heads);
    const std::int64_t h = ph % heads;
    const std::int64_t n = segs[si].length, off = segs[si].offset;
    T* Pm = probs + poff[si] + static_cast<std::size_t>(h * n * n);
    const T* base = qkv + off * 3 * D;
    cpu::gemm_serial(gemm_desc{false, true, n, n, hd, 3 * D, 3 * D, n}, scale, base + h * hd, base + D + h * hd, T(0), Pm);
    for (std::int64_t r = 0; r < n; ++r) cpu::softmax_row_inplace(Pm + r * n, n);
    cpu::gemm_serial(gemm_desc{false, false, n, hd, n, n, 3 * D, D}, T(1), Pm, base + 2 * D + h * hd, T(0),
                     out + off * D + h * hd);
    if (cls_attn)
      for (std::int64_t j = 0; j < n; ++j) cls_attn[cls_offsets[si] + h * n + j] = Pm[j];
  });
}

/// dqkv [T, 3D] (=) from dout [T, D], with the P kept by attention_forward. scratch: probs_elems.
/// out (the forward's output) is for the GPU's bf16 path (policy/cuda/attention.cuh); the CPU
/// ignores it.
template <class T>
inline void attention_backward(const cpu_policy& pol, std::int64_t heads, std::int64_t D, const std::vector<segment>& segs,
                               const std::vector<std::size_t>& poff, const T* qkv, const T* probs, const T* dout, T* dqkv,
                               T* scratch, const T* out = nullptr) {
  (void)out;
  detail::check_matrix_room("attention_backward", heads, segs, poff);
  const std::int64_t hd = D / heads;
  const T scale = T(1.0 / std::sqrt(double(hd)));
  const std::int64_t pairs = static_cast<std::int64_t>(segs.size()) * heads;
  for_each_row_cyclic(pol, pairs, [&](std::int64_t ph) {
    const std::size_t si = static_cast<std::size_t>(ph / heads);
    const std::int64_t h = ph % heads;
    const std::int64_t n = segs[si].length, off = segs[si].offset;
    const T* Pm = probs + poff[si] + static_cast<std::size_t>(h * n * n);
    T* dP = scratch + poff[si] + static_cast<std::size_t>(h * n * n);
    const T* base = qkv + off * 3 * D;
    T* dbase = dqkv + off * 3 * D;
    const T* dO = dout + off * D + h * hd;
    // dP = dO V^T
    cpu::gemm_serial(gemm_desc{false, true, n, n, hd, D, 3 * D, n}, T(1), dO, base + 2 * D + h * hd, T(0), dP);
    // dV = P^T dO
    cpu::gemm_serial(gemm_desc{true, false, n, hd, n, n, D, 3 * D}, T(1), Pm, dO, T(0), dbase + 2 * D + h * hd);
    // dS = P o (dP - rowsum(dP o P)), in place
    for (std::int64_t r = 0; r < n; ++r) {
      T* d = dP + r * n;
      const T* p = Pm + r * n;
      T dot = 0;
      for (std::int64_t j = 0; j < n; ++j) dot += d[j] * p[j];
      for (std::int64_t j = 0; j < n; ++j) d[j] = p[j] * (d[j] - dot);
    }
    // dQ = dS K * scale;  dK = dS^T Q * scale
    cpu::gemm_serial(gemm_desc{false, false, n, hd, n, n, 3 * D, 3 * D}, scale, dP, base + D + h * hd, T(0),
                     dbase + h * hd);
    cpu::gemm_serial(gemm_desc{true, false, n, hd, n, n, 3 * D, 3 * D}, scale, dP, base + h * hd, T(0),
                     dbase + D + h * hd);
  });
}

}  // namespace dino::nn
