// dino/nn/vit.hpp: DINO's Vision Transformer over packed multi-crop batches (dino-spec §1).
//
//   patch embedding (a strided convolution as one GEMM over unfolded patches) -> CLS token
//   -> + position embedding (bicubically resized per resolution, +0.1 offset) -> depth x
//   pre-norm blocks [x += DropPath(attn(LN1 x)); x += DropPath(MLP(LN2 x))] -> final LN.
//
// A pack holds every crop of a step as one token matrix [T, D]: crop c is a segment of
// 1 + (H/p)(W/p) rows (CLS first, then patches row-major). Crops come in sets of one
// resolution (vit_pack::sets: count, height, width), each set's images one NCHW array, in
// the order the outputs are wanted (crop-major, as MultiCropWrapper concatenates). Every
// per-token operation (LayerNorm, the qkv/proj/fc GEMMs, GELU) runs once over the whole
// pack; attention runs per segment.
//
// Token dropping (the student's masked view, ssl/student_mask.hpp): a crop set with
// crop_set::keep = k (0 < k < patches) keeps k patches of each of its crops, those listed in
// vit_pack::keep[set] ([count, k], ascending per crop; the identity's first k until the
// caller writes it). Their segments are 1 + k rows: only the kept patches are unfolded and
// embedded, each with its own position row, and every block runs on the shorter sequence; the
// backward scatters the position gradient back to the kept rows. On a device policy the
// tables live in device memory (vit_pack::device.keep, uploaded with the pack: the identity
// until a StudentMask writes it there each step).
//
// Parameters, with the official state_dict names (prefix + ...): patch_embed.proj.weight
// [D, C, p, p], patch_embed.proj.bias, cls_token [1, 1, D], pos_embed [1, N0 + 1, D],
// blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias},
// norm.{weight, bias}. Initialisation as the reference: truncated normal 0.02 for Linear
// weights, cls_token and pos_embed; PyTorch's default init for the patch convolution; zero
// biases; LayerNorm 1 and 0.
//
// Activation checkpointing (vit_config::checkpoint_blocks = n): the first n blocks keep only
// their input and their DropPath scales in `saved`; backward() recomputes each one's forward
// into one block area (block n's, free by then) just before its backward, with the same
// arithmetic, so the outputs and gradients are the same bits as without checkpointing. It
// trades one more forward of those blocks for their activations: saved_elems shrinks by
// n x (one block's activations - T x D - 2 x crops), by (depth - 1) x that for n = depth.
//
// Pointwise recomputation (vit_config::recompute_pointwise): no block keeps its two LayerNorm
// outputs and its GELU output (2 T D + T H elements, a third of a block's activations at
// mlp_ratio 4); every block writes them into one shared area of `saved`, and backward()
// recomputes them there from what the block keeps (its input and x_mid, fc1's output)
// before they are read, with the same arithmetic: the same bits again, for one more
// LayerNorm pair and GELU forward per block. saved_elems shrinks by (depth - 1) x
// (2 T D + T H) without checkpointing. The CPU policy then keeps fc1's output rather than
// gelu'(fc1) (nn::gelu_saves_grad) and its backward evaluates GELU's derivative again.
//
// bf16 operands (vit_pack::bf16_operands, planned by make_pack(pol, sets) for a policy with
// bf16 and bf16_operands): the operands of the qkv, fc1 and fc2 products are written as bf16
// by their producers (LN1, LN2 and GELU round as they store; each block's three weights are
// rounded into a copy before its products) and the products read bf16 from memory. It is the
// rounding the bf16 products do to fp32 operands, moved to the producers: the same values on
// the CPU (the same bits, tested), half the bytes for the GPU's products to read. infer() runs
// so for such a pack; forward() with recompute_pointwise only, when nothing but those products
// reads a, c and g (the backward makes its own fp32 copies). proj reads the attention's fp32
// output as before.
//
// Forms: forward() (training: keeps what backward needs in `saved`, draws DropPath masks
// from Philox keyed by (seed, step, block, branch) and the crop index; step may be read where
// the masks are drawn, step_value::read_at, for a step replayed from a CUDA graph), infer() (no saved
// state, no DropPath; optionally the last block's CLS attention row and the normalised
// outputs of the last n blocks), backward() (parameter gradients accumulate; the input
// images get no gradient).
//
// Policies: any policy with the ops of linear, layer_norm, gelu and attention (CPU, CUDA).
// Images (the span holds pointers in the policy's memory), parameters, outputs, saved state,
// gradients and scratch live in the policy's memory space. A pack made by make_pack(sets)
// serves the CPU; the device path reads the pack's tables (segments, token-to-crop map,
// bicubic taps) from device memory uploaded once by make_pack(pol, sets) or upload(pol,
// pack) (one allocation, owned by the pack and its copies; a pack without them is refused
// with config_error); attention takes the plan's host tables as launch arguments. DropPath
// masks are drawn where they are kept, from the same Philox draws (the GPU drops the same
// crops as the CPU). scatter_cls_grad(pol, pack, dy, d_tokens) is the policy form of the
// CLS-gradient scatter. On the CPU the arithmetic and its order are those of the serial code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "dino/core/param_store.hpp"
#include "dino/core/rng.hpp"
#include "dino/nn/attention.hpp"
#include "dino/nn/gelu.hpp"
#include "dino/nn/layer_norm.hpp"
#include "dino/nn/linear.hpp"
#include "dino/nn/pos_embed.hpp"

namespace dino::nn {

struct vit_config {
  std::int64_t img_size = 224;  ///< fixes the stored position grid: (img_size / patch)^2 patches
  std::int64_t patch = 16;
  std::int64_t in_chans = 3;
  std::int64_t embed_dim = 384;
  std::int64_t depth = 12;
  std::int64_t heads = 6;
  double mlp_ratio = 4.0;
  bool qkv_bias = true;
  double ln_eps = 1e-6;
  double drop_path_rate = 0.0;  ///< student 0.1 in the reference, teacher 0
  /// Activation checkpointing: the first n blocks are recomputed in backward() instead of
  /// keeping their activations (0: none, depth: all). Training memory only; infer() ignores it.
  std::int64_t checkpoint_blocks = 0;
  /// Pointwise recomputation: the blocks' LayerNorm and GELU outputs are recomputed in
  /// backward() instead of kept (one shared area for all blocks). The same results, less
  /// training memory; infer() ignores it.
  bool recompute_pointwise = false;

  constexpr std::int64_t grid() const { return img_size / patch; }
  constexpr std::int64_t mlp_hidden() const { return static_cast<std::int64_t>(double(embed_dim) * mlp_ratio); }
};

/// The reference's factories (dino-spec §1.1).
constexpr vit_config vit_tiny(std::int64_t patch = 16) { return {224, patch, 3, 192, 12, 3}; }
constexpr vit_config vit_small(std::int64_t patch = 16) { return {224, patch, 3, 384, 12, 6}; }
constexpr vit_config vit_base(std::int64_t patch = 16) { return {224, patch, 3, 768, 12, 12}; }
/// For 28 x 28 grayscale images (MNIST, Fashion-MNIST): ViT with D 192, depth 6, 3 heads.
constexpr vit_config vit_small28(std::int64_t patch = 4) { return {28, patch, 1, 192, 6, 3}; }

/// One resolution of a pack: `count` images of height x width pixels.
struct crop_set {
  std::int64_t count = 0, height = 0, width = 0;
  std::int64_t keep = 0;  ///< patches kept per crop: 0 (or every patch) keeps all; which ones: vit_pack::keep
};

/// The token layout of a pack of crop sets, planned once (allocates; a step does not).
template <class T>
struct vit_pack {
  std::vector<crop_set> sets;
  std::vector<segment> segs;              ///< one per crop, in output order
  std::vector<std::int64_t> set_of;       ///< set index of each crop
  std::vector<std::int64_t> set_patches;  ///< patches per crop of each set (its position grid)
  std::vector<std::int64_t> set_kept;     ///< patches kept per crop of each set (= set_patches unless masked)
  std::vector<std::vector<std::int64_t>> keep;  ///< per set: [count, kept] kept patch indices, ascending per crop (masked sets; else empty)
  std::vector<std::int64_t> set_first;    ///< first crop of each set
  std::vector<pos_resize<T>> resize;      ///< position grid resize per set
  std::vector<std::size_t> probs_off;     ///< attention probs region offsets per segment
  attention_store store = attention_store::matrix;  ///< what the probs regions hold (make_pack)
  /// The forward products' operands stored as bf16 (make_pack(pol, sets) for a policy with
  /// bf16 and bf16_operands; see "bf16 operands" above): sizes the areas that hold them.
  bool bf16_operands = false;
  std::vector<std::int64_t> cls_attn_off; ///< [segment] offset into a CLS-attention output
  std::int64_t tokens = 0, crops = 0, patches = 0, max_set_patches = 0;
  std::size_t probs = 0;

  /// Device copies of the tables above (vit::upload); null pointers until uploaded.
  struct device_tables {
    const segment* segs = nullptr;               ///< [crops]
    const std::int64_t* token_crop = nullptr;    ///< [tokens] crop of each token
    std::vector<pos_resize_tables<T>> resize;    ///< per set, taps in device memory
    std::vector<std::int64_t*> keep;             ///< per set: its kept-patch table [count, kept] (null: unmasked)
    std::shared_ptr<void> owner;                 ///< the one device allocation
    bool ready = false;
  } device;
};

namespace detail {
// ---- functors of the ViT's glue, run by the policy's runners (host and device) ----------
// row [C p p] (=) patch (i, j) of one image im [C, H, W], in the conv weight's order
template <class T>
DINO_HD inline void unfold_patch(const T* im, T* row, std::int64_t C, std::int64_t H, std::int64_t W, std::int64_t p,
                                 std::int64_t i, std::int64_t j) {
  for (std::int64_t ch = 0; ch < C; ++ch)
    for (std::int64_t di = 0; di < p; ++di) {
      const T* src = im + (ch * H + i * p + di) * W + j * p;
      for (std::int64_t dj = 0; dj < p; ++dj) row[(ch * p + di) * p + dj] = src[dj];
    }
}
template <class T>
struct unfold_rows_fn {  // one (crop, patch row) per call: the CPU's loop
  const T* img;
  T* u;
  std::int64_t C, H, W, p, h0, w0, np, K;
  DINO_HD void operator()(std::int64_t ci) const {
    const std::int64_t c = ci / h0, i = ci % h0;
    const T* im = img + c * C * H * W;
    for (std::int64_t j = 0; j < w0; ++j) unfold_patch(im, u + ((c * np) + i * w0 + j) * K, C, H, W, p, i, j);
  }
};
template <class T>
struct unfold_kept_fn {  // CPU: one crop's kept patches per call (row c * nk + k: patch keep[c * nk + k])
  const T* img;
  T* u;
  const std::int64_t* keep;
  std::int64_t C, H, W, p, w0, nk, K;
  void operator()(std::int64_t c) const {
    const T* im = img + c * C * H * W;
    for (std::int64_t k = 0; k < nk; ++k) {
      const std::int64_t t = keep[c * nk + k];
      unfold_patch(im, u + (c * nk + k) * K, C, H, W, p, t / w0, t % w0);
    }
  }
};
template <class T>
struct unfold_elems_fn {  // one element of the unfolded matrix [count * np, K] per index
  static constexpr const char* profile_name = "patch unfolding";
  const T* img;
  T* u;
  std::int64_t C, H, W, p, w0, np, K;  // np: patch rows per crop (the kept ones of a masked set)
  const std::int64_t* keep = nullptr;  // a masked set: the grid index of each row [count, np]
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t e = lo; e < hi; ++e) {
      const std::int64_t row = e / K, k = e % K;
      const std::int64_t c = row / np, t = keep ? keep[row] : row % np, i = t / w0, j = t % w0;
      const std::int64_t ch = k / (p * p), di = (k % (p * p)) / p, dj = k % p;
      u[e] = img[c * C * H * W + (ch * H + i * p + di) * W + j * p + dj];
    }
  }
};
template <class T>
struct embed_crop_fn {  // CPU: one crop of a set per call (np: its patch tokens; keep: their grid rows, or null)
  const segment* segs;
  std::int64_t first, np, D;
  T* x;
  const T *tmp, *pr, *cls, *pe, *bp;
  const std::int64_t* keep;
  DINO_HD void operator()(std::int64_t c) const {
    T* xs = x + segs[first + c].offset * D;
    for (std::int64_t d = 0; d < D; ++d) xs[d] = cls[d] + pe[d];
    for (std::int64_t t = 0; t < np; ++t) {
      const T* e = tmp + (c * np + t) * D;
      const T* ps = pr + (keep ? keep[c * np + t] : t) * D;
      T* xt = xs + (1 + t) * D;
      for (std::int64_t d = 0; d < D; ++d) xt[d] = e[d] + bp[d] + ps[d];
    }
  }
};
template <class T>
struct embed_elems_fn {  // device: one element of a set's token rows x0 [count * (1 + np), D]
  static constexpr const char* profile_name = "token embedding";
  T* x0;
  const T *tmp, *pr, *cls, *pe, *bp;
  std::int64_t np, D;              // np: patch tokens per crop (the kept ones of a masked set)
  const std::int64_t* keep = nullptr;  // a masked set: the grid row of each kept patch [count, np]
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t e = lo; e < hi; ++e) {
      const std::int64_t d = e % D, rt = e / D, c = rt / (1 + np), t = rt % (1 + np);
      if (t == 0) {
        x0[e] = cls[d] + pe[d];
      } else {
        const std::int64_t g = keep ? keep[c * np + t - 1] : t - 1;
        x0[e] = tmp[(c * np + t - 1) * D + d] + bp[d] + pr[g * D + d];
      }
    }
  }
};
template <class T>
struct kept_pos_sum_fn {  // device: dpos[g, d] = sum over kept rows r in order with keep[r] == g of tmp[r, d]
  static constexpr const char* profile_name = "position gradient sum (kept patches)";
  const T* tmp;
  const std::int64_t* keep;
  T* dpos;
  std::int64_t n, D;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t e = lo; e < hi; ++e) {
      const std::int64_t g = e / D, d = e % D;
      T s = T(0);
      for (std::int64_t r = 0; r < n; ++r)
        if (keep[r] == g) s += tmp[r * D + d];
      dpos[e] = s;
    }
  }
};
template <class T>
struct gather_cls_elems_fn {  // device: y[c, d] = tokens[offset_c, d], one element per index
  static constexpr const char* profile_name = "CLS gather";
  const segment* segs;
  const T* tokens;
  T* y;
  std::int64_t D;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t e = lo; e < hi; ++e) y[e] = tokens[segs[e / D].offset * D + e % D];
  }
};
template <class T>
struct gather_cls_fn {  // y[c, :] = tokens[offset_c, :]
  static constexpr const char* profile_name = "CLS gather";
  const segment* segs;
  const T* tokens;
  T* y;
  std::int64_t D;
  DINO_HD void operator()(std::int64_t c) const {
    for (std::int64_t d = 0; d < D; ++d) y[c * D + d] = tokens[segs[c].offset * D + d];
  }
};
template <class T>
struct scatter_cls_fn {  // d_tokens[r, d] = r is crop c's CLS row ? dy[c, d] : 0
  static constexpr const char* profile_name = "CLS gradient scatter";
  const segment* segs;
  const std::int64_t* token_crop;
  const T* dy;
  T* d_tokens;
  std::int64_t D;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t e = lo; e < hi; ++e) {
      const std::int64_t r = e / D, c = token_crop[r];
      d_tokens[e] = segs[c].offset == r ? dy[c * D + e % D] : T(0);
    }
  }
};
template <class T>
struct residual_crop_fn {  // CPU: branch = base + dp[c] * branch over crop c
  const segment* segs;
  T* branch;
  const T* base;
  const T* dp;
  std::int64_t D;
  DINO_HD void operator()(std::int64_t c) const {
    const segment sg = segs[c];
    const T k = dp[c];
    T* o = branch + sg.offset * D;
    const T* x = base + sg.offset * D;
    for (std::int64_t i = 0; i < sg.length * D; ++i) o[i] = x[i] + k * o[i];
  }
};
template <class T>
struct residual_elems_fn {  // device: the same per element
  static constexpr const char* profile_name = "DropPath residual";
  static constexpr const char* profile_name_vec4 = "DropPath residual (float4)";
  const std::int64_t* token_crop;
  T* branch;
  const T* base;
  const T* dp;
  std::int64_t D;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t i = lo; i < hi; ++i) branch[i] = base[i] + dp[token_crop[i / D]] * branch[i];
  }
#if defined(__CUDACC__)
  // float4 form (policy/cuda/parallel.cuh, for_each_chunk): a quad stays in one token when D % 4 == 0
  bool vec4_ok() const
    requires std::is_same_v<T, float>
  {
    return D % 4 == 0 && ::dino::detail::aligned16(branch) && ::dino::detail::aligned16(base);
  }
  __device__ void vec4(std::int64_t q) const
    requires std::is_same_v<T, float>
  {
    const float k = dp[token_crop[4 * q / D]];
    const float4 x = reinterpret_cast<const float4*>(base)[q], o = reinterpret_cast<const float4*>(branch)[q];
    reinterpret_cast<float4*>(branch)[q] = float4{x.x + k * o.x, x.y + k * o.y, x.z + k * o.z, x.w + k * o.w};
  }
#endif
};
template <class T>
struct scale_crop_fn {  // CPU: dst = src * scale[c] over crop c
  const segment* segs;
  const T* src;
  const T* scale;
  T* dst;
  std::int64_t D;
  DINO_HD void operator()(std::int64_t c) const {
    const segment sg = segs[c];
    const T k = scale[c];
    const T* s = src + sg.offset * D;
    T* d = dst + sg.offset * D;
    for (std::int64_t i = 0; i < sg.length * D; ++i) d[i] = s[i] * k;
  }
};
template <class T>
struct scale_elems_fn {  // device: the same per element
  static constexpr const char* profile_name = "scaled branch gradient";
  static constexpr const char* profile_name_vec4 = "scaled branch gradient (float4)";
  const std::int64_t* token_crop;
  const T* src;
  const T* scale;
  T* dst;
  std::int64_t D;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t i = lo; i < hi; ++i) dst[i] = src[i] * scale[token_crop[i / D]];
  }
#if defined(__CUDACC__)
  bool vec4_ok() const
    requires std::is_same_v<T, float>
  {
    return D % 4 == 0 && ::dino::detail::aligned16(src) && ::dino::detail::aligned16(dst);
  }
  __device__ void vec4(std::int64_t q) const
    requires std::is_same_v<T, float>
  {
    const float k = scale[token_crop[4 * q / D]];
    const float4 s = reinterpret_cast<const float4*>(src)[q];
    reinterpret_cast<float4*>(dst)[q] = float4{s.x * k, s.y * k, s.z * k, s.w * k};
  }
#endif
};
template <class T>
struct drop_path_fn {  // dp[branch * crops + c]: 0 or 1 / keep (1 when off)
  static constexpr const char* profile_name = "DropPath draws";
  T* dp;
  std::int64_t crops;
  double rate;
  std::uint64_t seed;
  step_value<std::uint64_t> step;  // read where dp lives when step.at is set (a step graph's)
  std::int64_t layer;
  DINO_HD void operator()(std::int64_t row) const {
    constexpr std::uint32_t purpose = 2;
    if (rate <= 0) {
      dp[row] = T(1);
      return;
    }
    const std::int64_t branch = row / crops, c = row % crops;
    const double keep = 1.0 - rate;
    philox g(seed, rng_subsequence(purpose, std::uint32_t(step.get()), std::uint32_t(layer * 2 + branch)),
             static_cast<std::uint64_t>(c) * 2);
    const double u = 1.0 - g.uniform_double();  // [0, 1)
    dp[row] = std::floor(keep + u) > 0 ? T(1.0 / keep) : T(0);
  }
};
template <class T>
struct patch_grad_gather_fn {  // device: tmp [count * np, D] = the set's patch-token rows of dx
  static constexpr const char* profile_name = "patch gradient gather";
  const T* dx0;
  T* tmp;
  std::int64_t np, D;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t e = lo; e < hi; ++e) {
      const std::int64_t row = e / D, d = e % D, c = row / np, t = row % np;
      tmp[e] = dx0[(c * (1 + np) + 1 + t) * D + d];
    }
  }
};
template <class T>
struct cls_grad_fn {  // device: column d of the CLS and pos[0] gradients, crops in order
  static constexpr const char* profile_name = "CLS and position[0] gradient sums";
  const T* dx0;
  T* gcls;
  T* gpos;
  std::int64_t count, np, D;
  // The sums run in registers, the crops' values loaded 8 at a time ahead of their adds (a
  // thread per column is few threads); the adds keep the CPU's order, so the same bits.
  DINO_HD void operator()(std::int64_t d) const {
    T a = gcls[d], b = gpos[d];
    const std::int64_t stride = (1 + np) * D;
    std::int64_t c = 0;
    for (; c + 8 <= count; c += 8) {
      T v[8];
      for (int j = 0; j < 8; ++j) v[j] = dx0[(c + j) * stride + d];
      for (int j = 0; j < 8; ++j) {
        a += v[j];
        b += v[j];
      }
    }
    for (; c < count; ++c) {
      const T v = dx0[c * stride + d];
      a += v;
      b += v;
    }
    gcls[d] = a;
    gpos[d] = b;
  }
};
template <class T>
struct crop_sum_fn {  // device: dpos[t] = sum over crops c in order of tmp[c * n + t]
  static constexpr const char* profile_name = "position gradient sum over crops";
  const T* tmp;
  T* dpos;
  std::int64_t count, n;
  DINO_HD void operator()(std::int64_t lo, std::int64_t hi) const {
    for (std::int64_t t = lo; t < hi; ++t) {
      T s = T(0);
      for (std::int64_t c = 0; c < count; ++c) s += tmp[c * n + t];
      dpos[t] = s;
    }
  }
};
}  // namespace detail

/// patches [count * (H/p) * (W/p), C p p] (=) the unfolded images [count, C, H, W] (NCHW), rows
/// crop-major then patch row-major, columns in the conv weight's (C, p, p) order.
template <class Policy, class T>
void unfold_patches(const Policy& pol, const T* images, std::int64_t count, std::int64_t C, std::int64_t H,
                    std::int64_t W, std::int64_t p, T* patches) {
  const std::int64_t h0 = H / p, w0 = W / p, np = h0 * w0, K = C * p * p;
  if constexpr (policy_traits<Policy>::is_host)
    for_each_row(pol, count * h0, detail::unfold_rows_fn<T>{images, patches, C, H, W, p, h0, w0, np, K});
  else
    for_each_chunk(pol, count * np * K, detail::unfold_elems_fn<T>{images, patches, C, H, W, p, w0, np, K});
}

class vit {
 public:
  using config_type = vit_config;

  vit() = default;
  vit(vit_config c, param_layout& layout, const std::string& prefix = "") : cfg_(c) {
    require<config_error>(c.patch > 0 && c.img_size % c.patch == 0, "vit: img_size ", c.img_size,
                          " is not a multiple of the patch size ", c.patch);
    require<config_error>(c.heads > 0 && c.embed_dim % c.heads == 0, "vit: embed_dim ", c.embed_dim,
                          " is not a multiple of heads ", c.heads);
    require<config_error>(c.depth >= 1 && c.in_chans >= 1, "vit: depth and in_chans must be positive");
    require<config_error>(c.drop_path_rate >= 0 && c.drop_path_rate < 1, "vit: drop_path_rate must be in [0, 1), got ",
                          c.drop_path_rate);
    require<config_error>(c.checkpoint_blocks >= 0 && c.checkpoint_blocks <= c.depth,
                          "vit: checkpoint_blocks must lie in [0, depth = ", c.depth, "], got ", c.checkpoint_blocks);
    const std::int64_t D = c.embed_dim, fan_in = c.in_chans * c.patch * c.patch;
    patch_w_ = layout.add(prefix + "patch_embed.proj.weight", {D, c.in_chans, c.patch, c.patch}, param_none,
                          param_init::kaiming_uniform, double(fan_in));
    patch_b_ = layout.add(prefix + "patch_embed.proj.bias", {D}, param_no_weight_decay, param_init::kaiming_uniform,
                          double(fan_in));
    cls_ = layout.add(prefix + "cls_token", {1, 1, D}, param_none, param_init::trunc_normal, 0.02);
    pos_ = layout.add(prefix + "pos_embed", {1, c.grid() * c.grid() + 1, D}, param_none, param_init::trunc_normal, 0.02);
    for (std::int64_t i = 0; i < c.depth; ++i) {
      const std::string b = prefix + "blocks." + std::to_string(i) + ".";
      block blk;
      blk.norm1 = layer_norm({D, c.ln_eps}, layout, b + "norm1.");
      blk.qkv = linear({D, 3 * D, c.qkv_bias}, layout, b + "attn.qkv.");
      blk.proj = linear({D, D, true}, layout, b + "attn.proj.");
      blk.norm2 = layer_norm({D, c.ln_eps}, layout, b + "norm2.");
      blk.fc1 = linear({D, c.mlp_hidden(), true}, layout, b + "mlp.fc1.");
      blk.fc2 = linear({c.mlp_hidden(), D, true}, layout, b + "mlp.fc2.");
      blk.drop = c.depth > 1 ? c.drop_path_rate * double(i) / double(c.depth - 1) : 0.0;
      blocks_.push_back(blk);
    }
    norm_ = layer_norm({D, c.ln_eps}, layout, prefix + "norm.");
  }

  const vit_config& config() const { return cfg_; }
  std::int64_t out_dim() const { return cfg_.embed_dim; }

  /// Plans the token layout of a pack; throws shape_error for sizes the patch does not divide.
  /// store: what the attention keeps for the backward (nn/attention.hpp): matrix (P, any
  /// policy) or rows (the GPU's bf16 attention only; make_pack(pol, sets) picks it for pol).
  template <class T = float>
  vit_pack<T> make_pack(std::vector<crop_set> sets, attention_store store = attention_store::matrix) const {
    vit_pack<T> pk;
    pk.sets = std::move(sets);
    pk.store = store;
    const std::int64_t p = cfg_.patch;
    for (std::size_t si = 0; si < pk.sets.size(); ++si) {
      const crop_set& s = pk.sets[si];
      require<shape_error>(s.count > 0 && s.height > 0 && s.width > 0, "vit pack: crop set ", si, " is empty or has ",
                           "no pixels (", s.count, " x ", s.height, " x ", s.width, ")");
      require<shape_error>(s.height % p == 0 && s.width % p == 0, "vit pack: crop set ", si, ": ", s.height, " x ",
                           s.width, " pixels is not a multiple of the patch size ", p);
      const std::int64_t h0 = s.height / p, w0 = s.width / p, np = h0 * w0;
      require<shape_error>(s.keep >= 0 && s.keep <= np, "vit pack: crop set ", si, " keeps ", s.keep,
                           " patches of ", np);
      const std::int64_t nk = s.keep > 0 ? s.keep : np;  // patch tokens per crop
      pk.set_patches.push_back(np);
      pk.set_kept.push_back(nk);
      pk.keep.emplace_back();
      if (nk < np)  // the first nk patches of each crop until the caller writes the table
        for (std::int64_t c = 0; c < s.count; ++c)
          for (std::int64_t t = 0; t < nk; ++t) pk.keep.back().push_back(t);
      pk.set_first.push_back(pk.crops);
      pk.resize.emplace_back(cfg_.grid(), h0, w0);
      pk.max_set_patches = std::max(pk.max_set_patches, s.count * nk);
      for (std::int64_t c = 0; c < s.count; ++c) {
        pk.segs.push_back({pk.tokens, 1 + nk});
        pk.set_of.push_back(static_cast<std::int64_t>(si));
        pk.cls_attn_off.push_back(0);
        pk.tokens += 1 + nk;
        pk.patches += nk;
        ++pk.crops;
      }
    }
    pk.probs_off = detail::probs_offsets(pk.segs, cfg_.heads, store);
    pk.probs = attention_probs_elems(pk.segs, cfg_.heads, store);
    std::int64_t o = 0;
    for (std::size_t i = 0; i < pk.segs.size(); ++i) {
      pk.cls_attn_off[i] = o;
      o += cfg_.heads * pk.segs[i].length;
    }
    return pk;
  }

  /// make_pack(sets), planned for what pol's attention keeps (attention_store_for: one float
  /// per row instead of P on the GPU's bf16 path), with the tables a device path reads
  /// uploaded for `pol` (no upload on the CPU).
  template <class T = float, class Policy>
    requires execution_policy<Policy>
  vit_pack<T> make_pack(const Policy& pol, std::vector<crop_set> sets) const {
    vit_pack<T> pk = make_pack<T>(std::move(sets), store_for<T>(pol));
    if constexpr (std::is_same_v<T, float> && requires { pol.bf16_operands; })
      pk.bf16_operands = pol.bf16 && pol.bf16_operands;
    upload(pol, pk);
    return pk;
  }

  /// Copies the pack's tables into one device allocation owned by the pack (set-up; allocates
  /// and synchronises). A no-op for a host policy. Call again after changing the tables.
  template <class Policy, class T>
  void upload(const Policy& pol, vit_pack<T>& pk) const {
    if constexpr (!policy_traits<Policy>::is_host) {
      std::vector<std::byte> blob;
      const auto put = [&blob](const void* src, std::size_t bytes) {
        const std::size_t off = (blob.size() + 15) / 16 * 16;
        blob.resize(off + bytes);
        if (bytes) std::memcpy(blob.data() + off, src, bytes);
        return off;
      };
      std::vector<std::int64_t> token_crop(static_cast<std::size_t>(pk.tokens));
      for (std::size_t c = 0; c < pk.segs.size(); ++c)
        for (std::int64_t t = 0; t < pk.segs[c].length; ++t)
          token_crop[static_cast<std::size_t>(pk.segs[c].offset + t)] = static_cast<std::int64_t>(c);
      const std::size_t o_segs = put(pk.segs.data(), pk.segs.size() * sizeof(segment));
      const std::size_t o_tc = put(token_crop.data(), token_crop.size() * sizeof(std::int64_t));
      std::vector<std::size_t> o_keep;  // masked sets' kept-patch tables (written by a StudentMask)
      for (const auto& k : pk.keep) o_keep.push_back(k.empty() ? 0 : put(k.data(), k.size() * sizeof(std::int64_t)));
      std::vector<std::size_t> o_res;
      for (const auto& r : pk.resize) {
        o_res.push_back(put(r.y.index.data(), r.y.index.size() * sizeof(std::int64_t)));
        o_res.push_back(put(r.y.weight.data(), r.y.weight.size() * sizeof(T)));
        o_res.push_back(put(r.x.index.data(), r.x.index.size() * sizeof(std::int64_t)));
        o_res.push_back(put(r.x.weight.data(), r.x.weight.size() * sizeof(T)));
      }
      auto& dev = pk.device;
      dev.owner = upload_shared(pol, blob.data(), blob.size(), "vit pack tables");
      const std::byte* base = static_cast<const std::byte*>(dev.owner.get());
      dev.segs = reinterpret_cast<const segment*>(base + o_segs);
      dev.token_crop = reinterpret_cast<const std::int64_t*>(base + o_tc);
      dev.keep.clear();
      for (std::size_t si = 0; si < pk.keep.size(); ++si)
        dev.keep.push_back(pk.keep[si].empty() ? nullptr
                                               : reinterpret_cast<std::int64_t*>(
                                                     static_cast<std::byte*>(dev.owner.get()) + o_keep[si]));
      dev.resize.clear();
      for (std::size_t si = 0; si < pk.resize.size(); ++si) {
        const auto& r = pk.resize[si];
        dev.resize.push_back({r.g, r.h0, r.w0, r.identity, reinterpret_cast<const std::int64_t*>(base + o_res[4 * si]),
                              reinterpret_cast<const T*>(base + o_res[4 * si + 1]),
                              reinterpret_cast<const std::int64_t*>(base + o_res[4 * si + 2]),
                              reinterpret_cast<const T*>(base + o_res[4 * si + 3])});
      }
      dev.ready = true;
    } else {
      (void)pol;
      (void)pk;
    }
  }

  /// Elements of a CLS-attention output for a pack: sum over crops of heads * (1 + patches).
  template <class T>
  std::size_t cls_attention_elems(const vit_pack<T>& pk) const {
    std::size_t n = 0;
    for (const auto& s : pk.segs) n += static_cast<std::size_t>(cfg_.heads * s.length);
    return n;
  }

  // ---- memory queries ------------------------------------------------------------------
  template <class T>
  std::size_t saved_elems(const vit_pack<T>& pk) const {
    return static_cast<std::size_t>(pk.patches * patch_dim()) + pos_elems(pk) + blocks_elems(pk) +
           static_cast<std::size_t>(pk.tokens * (cfg_.embed_dim + 2)) + static_cast<std::size_t>(pk.tokens * cfg_.embed_dim) +
           (cfg_.checkpoint_blocks == cfg_.depth ? block_saved(pk) : 0) + pointwise_elems(pk) + fwd16_extra(pk);
  }
  template <class T>
  std::size_t scratch_elems(const vit_pack<T>& pk) const {
    const std::size_t TD = static_cast<std::size_t>(pk.tokens * cfg_.embed_dim);
    const std::size_t TH = static_cast<std::size_t>(pk.tokens * cfg_.mlp_hidden());
    // backward: two residual gradients, dz/dy, dc/da, do, dqkv, dg/dh, dP; inference reuses these
    const std::size_t a = 2 * TD + TD + TD + TD + 3 * TD + TH + pk.probs;
    const std::size_t embed = static_cast<std::size_t>(pk.max_set_patches * std::max(patch_dim(), cfg_.embed_dim));
    return std::max(a, embed + pos_elems(pk)) + TD;
  }
  /// Inference needs only scratch: the residual stream, one block's activations, attention.
  template <class T>
  std::size_t infer_scratch_elems(const vit_pack<T>& pk) const {
    const std::size_t TD = static_cast<std::size_t>(pk.tokens * cfg_.embed_dim);
    const std::size_t TH = static_cast<std::size_t>(pk.tokens * cfg_.mlp_hidden());
    const std::size_t embed = static_cast<std::size_t>(pk.max_set_patches * std::max(patch_dim(), cfg_.embed_dim));
    return 2 * TD + TD + 3 * TD + TD + TH + pk.probs + static_cast<std::size_t>(2 * pk.tokens) + embed + pos_elems(pk) +
           (pk.bf16_operands ? align_slack + op16_elems(pk) + w16_elems() : 0);
  }

  /// Which outputs infer() should write besides the CLS features.
  template <class T>
  struct infer_outputs {
    T* tokens = nullptr;        ///< [T, D] all final (normalised) tokens, pack order
    T* cls_attention = nullptr; ///< last block's CLS attention rows, cls_attention_elems(pack)
    std::int64_t n_last = 0;    ///< intermediate layers: the normalised outputs of the last n blocks
    T* intermediate = nullptr;  ///< [n_last, T, D], oldest first
  };

  // ---- forward -------------------------------------------------------------------------
  /// Training forward: y [crops, D] (=) normalised CLS features; `saved` keeps what backward needs.
  template <class Policy, class T, class S>
  void forward(const Policy& pol, tensor_view<const T, S> P, const vit_pack<T>& pk, std::span<const T* const> images,
               tensor_view<T, S> y, tensor_view<T, S> saved, std::uint64_t seed = 0,
               step_value<std::uint64_t> step = {}) const {
    DINO_CHECK_SPACE(Policy, S);
    check_io(pol, pk, images, y);
    require<shape_error>(static_cast<std::size_t>(saved.numel()) >= saved_elems(pk), "vit forward: saved: needs ",
                         saved_elems(pk), " elements, got ", saved.numel());
    const std::int64_t D = cfg_.embed_dim, Tn = pk.tokens;
    saved_parts<T> s = split_saved<T>(saved.data, pk);
    // The patch GEMM's output goes through block 0's saved area (not yet written) on its way into x0.
    embed(pol, P, pk, images, s.unfold, true, s.pos, s.x0, s.x0 + static_cast<std::size_t>(Tn * D));
    const T* x = s.x0;
    const bool b16 = fwd16(pk);  // bf16 operands: a, c and g as bf16 in the pointwise area
    const op16_parts o16 = b16 ? split_op16(s.pointwise, s.w16, pk) : op16_parts{};
    for (std::int64_t l = 0; l < cfg_.depth; ++l) {
      const block_saved_parts<T> b = block_parts(s, pk, l);
      T* x_out = l + 1 < cfg_.depth ? s.blocks + block_offset(pk, l + 1) : s.x_last;
      block_forward(pol, P, pk, blocks_[std::size_t(l)], x, b, x_out, seed, step, l, true, b16 ? &o16 : nullptr);
      x = x_out;
    }
    // final norm over all tokens, CLS rows out
    norm_.forward(pol, P, tensor_view<const T, S>{x, {Tn, D}, "tokens"}, tensor_view<T, S>{s.final_tok, {Tn, D}, "final tokens"},
                  tensor_view<T, S>{s.final_stats, {Tn, 2}, "final norm stats"});
    gather_cls(pol, pk, s.final_tok, y.data);
  }

  /// The final normalised tokens kept by the last forward() ([T, D], pack order).
  template <class T, class S>
  const T* saved_tokens(const vit_pack<T>& pk, tensor_view<const T, S> saved) const {
    return split_saved<T>(const_cast<T*>(saved.data), pk).final_tok;
  }

  /// Inference: y [crops, D] (=) CLS features, and the optional outputs.
  template <class Policy, class T, class S>
  void infer(const Policy& pol, tensor_view<const T, S> P, const vit_pack<T>& pk, std::span<const T* const> images,
             tensor_view<T, S> y, tensor_view<T, S> scratch, infer_outputs<T> out = {}) const {
    DINO_CHECK_SPACE(Policy, S);
    check_io(pol, pk, images, y);
    require<shape_error>(static_cast<std::size_t>(scratch.numel()) >= infer_scratch_elems(pk),
                         "vit infer: scratch: needs ", infer_scratch_elems(pk), " elements, got ", scratch.numel());
    require<config_error>(out.n_last >= 0 && out.n_last <= cfg_.depth, "vit infer: n_last must lie in [0, depth = ",
                          cfg_.depth, "], got ", out.n_last);
    const std::int64_t D = cfg_.embed_dim, Tn = pk.tokens, H = cfg_.mlp_hidden();
    const std::size_t TD = static_cast<std::size_t>(Tn * D);
    T* xa = scratch.data;
    T* xb = xa + TD;
    T* a = xb + TD;
    T* qkv = a + TD;
    T* o = qkv + 3 * TD;
    T* h = o + TD;
    T* probs = h + static_cast<std::size_t>(Tn * H);
    T* stats = probs + pk.probs;
    T* emb = stats + 2 * Tn;
    T* pos = emb + static_cast<std::size_t>(pk.max_set_patches * std::max(patch_dim(), D));
    embed(pol, P, pk, images, emb, false, pos, xa, xb);
    const auto hv = [&](T* p, std::int64_t cols, const char* n) { return tensor_view<T, S>{p, {Tn, cols}, n}; };
    const auto cv = [&](const T* p, std::int64_t cols, const char* n) { return tensor_view<const T, S>{p, {Tn, cols}, n}; };
    const tensor_view<T, S> st{stats, {Tn, 2}, "stats"};
    const bool b16 = pk.bf16_operands;  // bf16 operands: a, c, g and the weights' copies after pos
    T* o16_base = b16 ? align256(pos + pos_elems(pk)) : nullptr;
    const op16_parts o16 = b16 ? split_op16(o16_base, o16_base + op16_elems(pk), pk) : op16_parts{};
    for (std::int64_t l = 0; l < cfg_.depth; ++l) {
      const block& blk = blocks_[std::size_t(l)];
      const bool last = l + 1 == cfg_.depth;
      if (b16) round_block_weights(pol, P, blk, o16);
      norm_then_linear<S>(pol, P, blk.norm1, blk.qkv, xa, stats, a, o16.a, o16.wqkv, qkv, Tn);
      attention_forward(pol, cfg_.heads, D, pk.segs, pk.probs_off, qkv, o, probs,
                        last ? out.cls_attention : static_cast<T*>(nullptr), pk.cls_attn_off.data(),
                        /*keep_probs=*/false);
      // x_mid = x + proj(o), into xb
      blk.proj.forward_residual(pol, P, cv(o, D, "attn"), cv(xa, D, "x"), hv(xb, D, "x_mid"));
      norm_then_linear<S>(pol, P, blk.norm2, blk.fc1, xb, stats, a, o16.c, o16.wfc1, h, Tn);
      if constexpr (std::is_same_v<T, float>) {
        if (b16) {
          gelu_apply_bf16(pol, static_cast<const T*>(h), o16.g, Tn * H);
          blk.fc2.forward_bf16(pol, P, o16.g, o16.wfc2, hv(xa, D, "x"), static_cast<const T*>(xb));  // x_mid + mlp
        }
      }
      if (!b16) {
        gelu_forward(pol, tensor_view<const T, S>{h, {Tn, H}, "fc1"}, tensor_view<T, S>{h, {Tn, H}, "gelu"});
        blk.fc2.forward_residual(pol, P, cv(h, H, "gelu"), cv(xb, D, "x_mid"), hv(xa, D, "x"));  // x_mid + mlp
      }
      if (out.intermediate && l >= cfg_.depth - out.n_last) {
        T* dst = out.intermediate + static_cast<std::size_t>(l - (cfg_.depth - out.n_last)) * TD;
        norm_.forward(pol, P, cv(xa, D, "x"), hv(dst, D, "intermediate"), st);
      }
    }
    T* fin = out.tokens ? out.tokens : xb;
    norm_.forward(pol, P, cv(xa, D, "x"), hv(fin, D, "final tokens"), st);
    gather_cls(pol, pk, fin, y.data);
  }

  // ---- backward ------------------------------------------------------------------------
  /// From d_tokens [T, D] (the gradient of the final normalised tokens; use
  /// scatter_cls_grad() for a gradient of the CLS features only): parameter gradients (+=).
  template <class Policy, class T, class S>
  void backward(const Policy& pol, tensor_view<const T, S> P, const vit_pack<T>& pk, tensor_view<const T, S> saved,
                tensor_view<const T, S> d_tokens, tensor_view<T, S> G, tensor_view<T, S> scratch) const {
    DINO_CHECK_SPACE(Policy, S);
    check_pack(pol, pk);
    const std::int64_t D = cfg_.embed_dim, Tn = pk.tokens, H = cfg_.mlp_hidden();
    check_shape("vit backward", d_tokens, {Tn, D});
    require<shape_error>(static_cast<std::size_t>(scratch.numel()) >= scratch_elems(pk), "vit backward: scratch: needs ",
                         scratch_elems(pk), " elements, got ", scratch.numel());
    const std::size_t TD = static_cast<std::size_t>(Tn * D);
    saved_parts<T> s = split_saved<T>(const_cast<T*>(saved.data), pk);
    T* dx = scratch.data;       // gradient w.r.t. the residual stream
    T* dz = dx + 2 * TD;        // branch gradients (drop path applied)
    T* da = dz + TD;
    T* d_o = da + TD;
    T* dqkv = d_o + TD;
    T* dh = dqkv + 3 * TD;
    T* dP = dh + static_cast<std::size_t>(Tn * H);
    const auto hv = [&](T* p, std::int64_t cols, const char* n) { return tensor_view<T, S>{p, {Tn, cols}, n}; };
    const auto cv = [&](const T* p, std::int64_t cols, const char* n) { return tensor_view<const T, S>{p, {Tn, cols}, n}; };
    const T* x_last = s.x_last;
    norm_.backward(pol, P, cv(x_last, D, "tokens"), tensor_view<const T, S>{s.final_stats, {Tn, 2}, "stats"}, d_tokens,
                   hv(dx, D, "dx"), grad_mode::write, G, tensor_view<T, S>{});
    // bf16 operands in the backward (bwd16): the pointwise outputs recomputed straight into the
    // forward's bf16 operand area, and the branch gradients (dz) and GELU's (dh) written with a
    // bf16 copy by their producers; the products read those (linear_bf16_copies) instead of
    // rounding fp32 operands themselves: the same values. Where the products round operands as
    // they read them (bf16_backward_operands: on the GPU under bf16_staged).
    bool b16 = false;
    op16_parts o16{};
    if constexpr (std::is_same_v<T, float>) {
      b16 = fwd16(pk) && bf16_backward_operands(pol);
      if (b16) o16 = split_op16(s.pointwise, s.w16, pk);
    }
    for (std::int64_t l = cfg_.depth - 1; l >= 0; --l) {
      const block& blk = blocks_[std::size_t(l)];
      const block_saved_parts<T> b = block_parts(s, pk, l);
      const bool checkpointed = l < cfg_.checkpoint_blocks;
      const bool r16 = b16 && !checkpointed;  // this block's a, c and g as bf16 copies
      if (checkpointed)  // recompute: the same forward, the kept DropPath scales; x_out into b's spare rows
        block_forward(pol, P, pk, blk, static_cast<const T*>(b.x_in), b, s.recompute, 0, 0, l, false);
      else if (cfg_.recompute_pointwise) {  // LN2's output and GELU's, as the forward made them
        if constexpr (std::is_same_v<T, float>) {
          if (r16) {
            blk.norm2.forward_bf16(pol, P, cv(b.x_mid, D, "x_mid"), o16.c, tensor_view<T, S>{b.ln2, {Tn, 2}, "stats"});
            gelu_apply_bf16(pol, static_cast<const T*>(b.h), o16.g, Tn * H);
          }
        }
        if (!r16) {
          blk.norm2.forward(pol, P, cv(b.x_mid, D, "x_mid"), hv(b.c, D, "ln2"), tensor_view<T, S>{b.ln2, {Tn, 2}, "stats"});
          gelu_forward(pol, tensor_view<const T, S>{b.h, {Tn, H}, "fc1"}, tensor_view<T, S>{b.g, {Tn, H}, "gelu"});
        }
      }
      // MLP branch: x_out = x_mid + dp2 * fc2(gelu(fc1(LN2(x_mid))))
      // bwd16: dz's and dh's bf16 copies in scratch that is free until the attention branch
      // (d_o: T D floats for T D bf16; dqkv: 3 T D floats for T H bf16)
      auto* dz16 = r16 ? reinterpret_cast<std::uint16_t*>(d_o) : nullptr;
      auto* dh16 = r16 ? reinterpret_cast<std::uint16_t*>(dqkv) : nullptr;
      copy_scaled(pol, pk, dx, b.dp + pk.crops, dz, D, dz16);
      blk.fc2.backward(pol, P, cv(r16 ? nullptr : b.g, H, "gelu"), cv(dz, D, "dz"), hv(dh, H, "dg"), grad_mode::write, G,
                       linear_bf16_copies{dz16, r16 ? o16.g : nullptr});
      gelu_grad_of_block<S>(pol, b, dh, Tn, H, dh16);
      blk.fc1.backward(pol, P, cv(r16 ? nullptr : b.c, D, "ln2"), cv(dh, H, "dh"), hv(da, D, "dc"), grad_mode::write, G,
                       linear_bf16_copies{dh16, r16 ? o16.c : nullptr});
      // dx_mid = dx + LN2'(dc), in dx
      blk.norm2.backward(pol, P, cv(b.x_mid, D, "x_mid"), tensor_view<const T, S>{b.ln2, {Tn, 2}, "stats"}, cv(da, D, "dc"),
                         hv(dx, D, "dx_mid"), grad_mode::accumulate, G, tensor_view<T, S>{});
      // attention branch: x_mid = x + dp1 * proj(attn(qkv(LN1(x))))
      auto* dy16 = r16 ? reinterpret_cast<std::uint16_t*>(dqkv) : nullptr;  // free until the attention's backward
      copy_scaled(pol, pk, dx, b.dp, dz, D, dy16);
      blk.proj.backward(pol, P, cv(b.o, D, "attn"), cv(dz, D, "dy"), hv(d_o, D, "do"), grad_mode::write, G,
                        linear_bf16_copies{dy16, nullptr});
      attention_backward(pol, cfg_.heads, D, pk.segs, pk.probs_off, b.qkv, b.probs, d_o, dqkv, dP, b.o);
      if (cfg_.recompute_pointwise && !checkpointed) {  // LN1's output, as the forward made it
        if constexpr (std::is_same_v<T, float>) {
          if (r16) blk.norm1.forward_bf16(pol, P, cv(b.x_in, D, "x"), o16.a, tensor_view<T, S>{b.ln1, {Tn, 2}, "stats"});
        }
        if (!r16)
          blk.norm1.forward(pol, P, cv(b.x_in, D, "x"), hv(b.a, D, "ln1"), tensor_view<T, S>{b.ln1, {Tn, 2}, "stats"});
      }
      blk.qkv.backward(pol, P, cv(r16 ? nullptr : b.a, D, "ln1"), cv(dqkv, 3 * D, "dqkv"), hv(da, D, "da"),
                       grad_mode::write, G, linear_bf16_copies{nullptr, r16 ? o16.a : nullptr});
      blk.norm1.backward(pol, P, cv(b.x_in, D, "x"), tensor_view<const T, S>{b.ln1, {Tn, 2}, "stats"}, cv(da, D, "da"),
                         hv(dx, D, "dx"), grad_mode::accumulate, G, tensor_view<T, S>{});
    }
    embed_backward(pol, pk, s.unfold, dx, G, scratch.data + 2 * TD);
  }

  /// d_tokens [T, D] (=) zero except the CLS rows, which take dy [crops, D] (host memory).
  template <class T>
  void scatter_cls_grad(const vit_pack<T>& pk, const T* dy, T* d_tokens) const {
    const std::int64_t D = cfg_.embed_dim;
    for (std::int64_t i = 0; i < pk.tokens * D; ++i) d_tokens[i] = T(0);
    for (std::size_t c = 0; c < pk.segs.size(); ++c)
      for (std::int64_t d = 0; d < D; ++d) d_tokens[pk.segs[c].offset * D + d] = dy[std::int64_t(c) * D + d];
  }
  /// The same in the policy's memory (on the device from the uploaded pack tables).
  template <class Policy, class T>
    requires execution_policy<Policy>
  void scatter_cls_grad(const Policy& pol, const vit_pack<T>& pk, const T* dy, T* d_tokens) const {
    if constexpr (policy_traits<Policy>::is_host) {
      (void)pol;
      scatter_cls_grad(pk, dy, d_tokens);
    } else {
      check_pack(pol, pk);
      for_each_chunk(pol, pk.tokens * cfg_.embed_dim,
                     detail::scatter_cls_fn<T>{pk.device.segs, pk.device.token_crop, dy, d_tokens, cfg_.embed_dim});
    }
  }

 private:
  struct block {
    layer_norm norm1, norm2;
    linear qkv, proj, fc1, fc2;
    double drop = 0.0;
  };

  std::int64_t patch_dim() const { return cfg_.in_chans * cfg_.patch * cfg_.patch; }
  template <class T>
  std::size_t pos_elems(const vit_pack<T>& pk) const {
    std::size_t n = 0;
    for (std::size_t si = 0; si < pk.sets.size(); ++si) n += static_cast<std::size_t>(pk.set_patches[si] * cfg_.embed_dim);
    return n;
  }
  // per block: x_in [T,D] | ln1 stats [T,2] | a [T,D] | qkv [T,3D] | probs | o [T,D] | x_mid [T,D]
  //            | ln2 stats [T,2] | c [T,D] | h [T,H] | g [T,H] | drop-path scales [2 * crops]
  // h: fc1's output, or gelu'(fc1's output) where the policy keeps the GELU derivative
  // (nn::gelu_saves_grad, the CPU policy; gelu_of_block); g = gelu(fc1's output). With
  // recompute_pointwise, a, c and g live in the shared pointwise area instead [a | c | g].
  template <class T>
  std::size_t block_saved(const vit_pack<T>& pk) const {
    const std::size_t Tn = static_cast<std::size_t>(pk.tokens), D = static_cast<std::size_t>(cfg_.embed_dim),
                      H = static_cast<std::size_t>(cfg_.mlp_hidden());
    return Tn * D + 2 * Tn + Tn * D + 3 * Tn * D + pk.probs + Tn * D + Tn * D + 2 * Tn + Tn * D + 2 * Tn * H +
           2 * static_cast<std::size_t>(pk.crops) - pointwise_elems(pk);
  }
  // The shared area of a, c and g under recompute_pointwise (else nothing).
  template <class T>
  std::size_t pointwise_elems(const vit_pack<T>& pk) const {
    return cfg_.recompute_pointwise ? static_cast<std::size_t>(pk.tokens * (2 * cfg_.embed_dim + cfg_.mlp_hidden())) : 0;
  }
  template <class T>
  struct block_saved_parts {
    T *x_in, *ln1, *a, *qkv, *probs, *o, *x_mid, *ln2, *c, *h, *g, *dp;
  };
  // A block's parts at base (block_saved elements); a, c and g at pw when recompute_pointwise.
  template <class T, class VP>
  block_saved_parts<T> split_block(T* base, const VP& pk, T* pw) const {
    const std::size_t Tn = static_cast<std::size_t>(pk.tokens), D = static_cast<std::size_t>(cfg_.embed_dim),
                      H = static_cast<std::size_t>(cfg_.mlp_hidden());
    const bool shared = cfg_.recompute_pointwise;
    T* p = base;
    const auto take = [&p](std::size_t n) { T* q = p; p += n; return q; };
    block_saved_parts<T> b;
    b.x_in = take(Tn * D);
    b.ln1 = take(2 * Tn);
    b.a = shared ? pw : take(Tn * D);
    b.qkv = take(3 * Tn * D);
    b.probs = take(pk.probs);
    b.o = take(Tn * D);
    b.x_mid = take(Tn * D);
    b.ln2 = take(2 * Tn);
    b.c = shared ? pw + Tn * D : take(Tn * D);
    b.h = take(Tn * H);
    b.g = shared ? pw + 2 * Tn * D : take(Tn * H);
    b.dp = take(2 * static_cast<std::size_t>(pk.crops));
    return b;
  }
  // A block's GELU in the training forward: g = gelu(h). A policy with nn::gelu_saves_grad
  // (the CPU) keeps gelu'(h) in place of h, unless recompute_pointwise needs h to make g again.
  template <class S, class Policy, class T>
  void gelu_of_block(const Policy& pol, const block_saved_parts<T>& b, std::int64_t Tn, std::int64_t H) const {
    if constexpr (gelu_saves_grad<Policy, T>)
      if (!cfg_.recompute_pointwise) {
        gelu_forward_keep_grad(pol, tensor_view<T, S>{b.h, {Tn, H}, "fc1"}, tensor_view<T, S>{b.g, {Tn, H}, "gelu"});
        return;
      }
    gelu_forward(pol, tensor_view<const T, S>{b.h, {Tn, H}, "fc1"}, tensor_view<T, S>{b.g, {Tn, H}, "gelu"});
  }
  // dh (=) dh * gelu'(fc1's output), from what gelu_of_block left in b.h; dh16 (float; bwd16):
  // dh's bf16 copy too, in the same pass.
  template <class S, class Policy, class T>
  void gelu_grad_of_block(const Policy& pol, const block_saved_parts<T>& b, T* dh, std::int64_t Tn, std::int64_t H,
                          std::uint16_t* dh16 = nullptr) const {
    const tensor_view<const T, S> dg{dh, {Tn, H}, "dg"};
    const tensor_view<T, S> out{dh, {Tn, H}, "dh"};
    if constexpr (std::is_same_v<T, float>) {
      if (dh16) {  // recompute_pointwise (bwd16 needs it): b.h holds fc1's output
        gelu_backward_copy_bf16(pol, static_cast<const T*>(b.h), static_cast<const T*>(dh), dh, dh16, Tn * H);
        return;
      }
    }
    if constexpr (gelu_saves_grad<Policy, T>)
      if (!cfg_.recompute_pointwise) {  // b.h holds gelu'(fc1)
        gelu_backward_from_grad(pol, tensor_view<const T, S>{b.h, {Tn, H}, "gelu'"}, dg, out, false);
        return;
      }
    gelu_backward(pol, tensor_view<const T, S>{b.h, {Tn, H}, "fc1"}, dg, out, false);
  }
  // saved: unfolded patches [patches, C p p] | resized pos per set | blocks (x_in of block 0 is x0)
  //        | x_last [T, D] (the last block's output) and final norm stats [T, 2] | final tokens [T, D]
  //        | with checkpoint_blocks = depth, one block area where the blocks are recomputed
  //        | with recompute_pointwise, the shared area of the blocks' a, c and g.
  // A block's slot: block_saved elements, or for a checkpointed block x_in [T, D] and its
  // DropPath scales [2 * crops] only. The checkpointed blocks 0..n-1 run their forward in the
  // slot of block n (in backward() after block n's backward is done with it; in forward()
  // before block n writes there), or in the extra area when every block is checkpointed. So
  // checkpointing n blocks saves n x (block_saved - T D - 2 crops) elements (depth - 1 times
  // that for n = depth).
  template <class T>
  struct saved_parts {
    T *unfold, *pos, *blocks, *x0, *x_last, *final_stats, *final_tok, *recompute, *pointwise;
    T* w16 = nullptr;  // the blocks' bf16 weight copies (fwd16 only)
  };
  template <class T>
  std::size_t block_offset(const vit_pack<T>& pk, std::int64_t l) const {
    const std::int64_t n = cfg_.checkpoint_blocks, small = std::min(l, n), full = l - small;
    return static_cast<std::size_t>(small * (pk.tokens * cfg_.embed_dim + 2 * pk.crops)) +
           static_cast<std::size_t>(full) * block_saved(pk);
  }
  template <class T>
  std::size_t blocks_elems(const vit_pack<T>& pk) const { return block_offset(pk, cfg_.depth); }
  // Block l's parts: its own slot, or for a checkpointed block the recompute area with x_in
  // and dp pointing into its slot (the area's own x_in rows then take the recomputed x_out).
  template <class T>
  block_saved_parts<T> block_parts(const saved_parts<T>& s, const vit_pack<T>& pk, std::int64_t l) const {
    T* slot = s.blocks + block_offset(pk, l);
    if (l >= cfg_.checkpoint_blocks) return split_block<T>(slot, pk, s.pointwise);
    block_saved_parts<T> b = split_block<T>(s.recompute, pk, s.pointwise);
    b.x_in = slot;
    b.dp = slot + static_cast<std::size_t>(pk.tokens * cfg_.embed_dim);
    return b;
  }
  template <class T, class VP>
  saved_parts<T> split_saved(T* base, const VP& pk) const {
    const std::size_t TD = static_cast<std::size_t>(pk.tokens * cfg_.embed_dim);
    saved_parts<T> s;
    s.unfold = base;
    s.pos = s.unfold + static_cast<std::size_t>(pk.patches * patch_dim());
    s.blocks = s.pos + pos_elems(pk);
    s.x0 = s.blocks;  // block 0's x_in
    s.x_last = s.blocks + blocks_elems(pk);
    s.final_stats = s.x_last + TD;
    s.final_tok = s.final_stats + static_cast<std::size_t>(2 * pk.tokens);
    s.recompute = cfg_.checkpoint_blocks == cfg_.depth ? s.final_tok + TD : s.blocks + block_offset(pk, cfg_.checkpoint_blocks);
    s.pointwise = s.final_tok + TD + (cfg_.checkpoint_blocks == cfg_.depth ? block_saved(pk) : 0);
    if (fwd16(pk)) {  // the area aligned for the bf16 products; the weights' copies after it
      s.pointwise = align256(s.pointwise);
      s.w16 = align256(s.pointwise + std::max(pointwise_elems(pk), op16_elems(pk)));
    }
    return s;
  }

  // ---- bf16 operands (vit_pack::bf16_operands) ------------------------------------------
  // The forward writes the operands of its qkv, fc1 and fc2 products as bf16: a = LN1(x) and
  // c = LN2(x_mid) [T, D], g = gelu(h) [T, H], and a block's three weights rounded into one
  // area before its products (1.6 M values a block for ViT-S/16, one pass each). infer() keeps
  // them after its other scratch; forward() does so with recompute_pointwise only (fwd16),
  // in the pointwise area (the backward recomputes a, c and g in fp32 there) and an area for
  // the weights after it. Areas are whole multiples of 256 bytes from a 256-byte aligned
  // start (align_slack elements of room for it), as cuBLASLt's bf16 kernels want them.
  static constexpr std::size_t align_slack = 64;
  static std::size_t bf16_area(std::size_t n) { return (n + 127) / 128 * 64; }  // n bf16 in floats
  template <class T>
  static T* align256(T* p) {
    const auto u = reinterpret_cast<std::uintptr_t>(p);
    return p + ((256 - u % 256) % 256) / sizeof(T);
  }
  std::size_t w16_elems() const {
    const std::size_t D = static_cast<std::size_t>(cfg_.embed_dim), H = static_cast<std::size_t>(cfg_.mlp_hidden());
    return bf16_area(3 * D * D) + 2 * bf16_area(H * D);
  }
  template <class T>
  std::size_t op16_elems(const vit_pack<T>& pk) const {
    const std::size_t Tn = static_cast<std::size_t>(pk.tokens);
    return 2 * bf16_area(Tn * static_cast<std::size_t>(cfg_.embed_dim)) +
           bf16_area(Tn * static_cast<std::size_t>(cfg_.mlp_hidden()));
  }
  template <class T>
  bool fwd16(const vit_pack<T>& pk) const { return pk.bf16_operands && cfg_.recompute_pointwise; }
  // What fwd16 adds to saved_elems: the alignments, the operands past the pointwise area, the weights.
  template <class T>
  std::size_t fwd16_extra(const vit_pack<T>& pk) const {
    if (!fwd16(pk)) return 0;
    const std::size_t pw = pointwise_elems(pk), op = op16_elems(pk);
    return 2 * align_slack + (op > pw ? op - pw : 0) + w16_elems();
  }
  struct op16_parts {
    std::uint16_t *a = nullptr, *c = nullptr, *g = nullptr, *wqkv = nullptr, *wfc1 = nullptr, *wfc2 = nullptr;
  };
  // The parts of the operand area at ops (op16_elems) and the weight area at w (w16_elems).
  template <class T>
  op16_parts split_op16(T* ops, T* w, const vit_pack<T>& pk) const {
    const std::size_t TD = static_cast<std::size_t>(pk.tokens * cfg_.embed_dim);
    const std::size_t D = static_cast<std::size_t>(cfg_.embed_dim), H = static_cast<std::size_t>(cfg_.mlp_hidden());
    const auto at = [](T* base, std::size_t off) { return reinterpret_cast<std::uint16_t*>(base + off); };
    op16_parts o;
    o.a = at(ops, 0);
    o.c = at(ops, bf16_area(TD));
    o.g = at(ops, 2 * bf16_area(TD));
    o.wqkv = at(w, 0);
    o.wfc1 = at(w, bf16_area(3 * D * D));
    o.wfc2 = at(w, bf16_area(3 * D * D) + bf16_area(H * D));
    return o;
  }
  template <class Policy, class T, class S>
  static void round_block_weights(const Policy& pol, tensor_view<const T, S> P, const block& blk,
                                  const op16_parts& o) {
    if constexpr (std::is_same_v<T, float>) {  // float tensors only (fwd16 and infer's b16 need them)
      blk.qkv.round_weight(pol, P, o.wqkv);
      blk.fc1.round_weight(pol, P, o.wfc1);
      blk.fc2.round_weight(pol, P, o.wfc2);
    } else {
      (void)pol, (void)P, (void)blk, (void)o;
    }
  }

  // What pol's attention keeps for the backward at this ViT's head dim (nn/attention.hpp).
  template <class T, class Policy>
  attention_store store_for(const Policy& pol) const {
    return attention_store_for<T>(pol, cfg_.embed_dim / cfg_.heads);
  }
  template <class Policy, class T>
  void check_pack(const Policy& pol, const vit_pack<T>& pk) const {
    require<config_error>(pk.store == attention_store::matrix || pk.store == store_for<T>(pol),
                          "vit: the pack was planned for the bf16 attention's row statistics (attention_store::rows), "
                          "but this policy's attention keeps P: make the pack with make_pack(policy, sets) for it");
    if (pk.bf16_operands) {
      bool bf16 = false;
      if constexpr (requires { pol.bf16; }) bf16 = pol.bf16;
      require<config_error>(bf16, "vit: the pack was planned for bf16 operands (bf16_operands), but this policy's ",
                            "products are fp32: make the pack with make_pack(policy, sets) for it");
    }
    if constexpr (!policy_traits<Policy>::is_host)
      require<config_error>(pk.device.ready, "vit: the pack's tables are not in device memory: make the pack with "
                                             "make_pack(policy, sets) or call upload(policy, pack) once");
  }
  template <class Policy, class T, class S>
  void check_io(const Policy& pol, const vit_pack<T>& pk, std::span<const T* const> images, tensor_view<T, S> y) const {
    require<shape_error>(images.size() == pk.sets.size(), "vit: ", images.size(), " image arrays given for ",
                         pk.sets.size(), " crop sets");
    check_shape("vit", y, {pk.crops, cfg_.embed_dim});
    check_pack(pol, pk);
  }

  // dst = src scaled per crop by scale[crop] (drop path); dst16 (float; bwd16): dst's bf16
  // copy too, on the device in the same pass.
  template <class Policy, class T>
  static void copy_scaled(const Policy& pol, const vit_pack<T>& pk, const T* src, const T* scale, T* dst,
                          std::int64_t D, std::uint16_t* dst16 = nullptr) {
    if constexpr (policy_traits<Policy>::is_host) {  // crops dealt in turn: large ones come first
      for_each_row_cyclic(pol, pk.crops, detail::scale_crop_fn<T>{pk.segs.data(), src, scale, dst, D});
      if constexpr (std::is_same_v<T, float>)
        if (dst16) round_bf16_apply(pol, static_cast<const T*>(dst), dst16, pk.tokens * D);
    } else {
      if constexpr (std::is_same_v<T, float>) {
        if (dst16) {
          scaled_copy_bf16(pol, pk.device.token_crop, src, scale, dst, dst16, pk.tokens, D);
          return;
        }
      }
      for_each_chunk(pol, pk.tokens * D, detail::scale_elems_fn<T>{pk.device.token_crop, src, scale, dst, D});
    }
  }

  template <class Policy, class T>
  void gather_cls(const Policy& pol, const vit_pack<T>& pk, const T* tokens, T* y) const {
    if constexpr (policy_traits<Policy>::is_host)
      for_each_row(pol, pk.crops, detail::gather_cls_fn<T>{pk.segs.data(), tokens, y, cfg_.embed_dim});
    else  // coalesced: consecutive threads on consecutive columns of a CLS row
      for_each_chunk(pol, pk.crops * cfg_.embed_dim,
                     detail::gather_cls_elems_fn<T>{pk.device.segs, tokens, y, cfg_.embed_dim});
  }

  // Unfolds the patches of every set (all kept in `unfold` for the weight gradient when
  // keep_unfold, else one set at a time), runs the patch GEMM set by set through `tmp`, adds
  // CLS and (resized) position embeddings into x.
  template <class Policy, class T, class S>
  void embed(const Policy& pol, tensor_view<const T, S> P, const vit_pack<T>& pk, std::span<const T* const> images,
             T* unfold, bool keep_unfold, T* pos, T* x, T* tmp) const {
    const std::int64_t D = cfg_.embed_dim, p = cfg_.patch, C = cfg_.in_chans, K = patch_dim();
    const T* Wp = P.data + patch_w_;
    const T* bp = P.data + patch_b_;
    const T* cls = P.data + cls_;
    const T* pe = P.data + pos_;
    T* u = unfold;
    T* pr = pos;
    for (std::size_t si = 0; si < pk.sets.size(); ++si) {
      const crop_set& cs = pk.sets[si];
      const std::int64_t h0 = cs.height / p, w0 = cs.width / p, np = h0 * w0, nk = pk.set_kept[si];
      const std::int64_t n = cs.count * nk;
      const std::int64_t* keep = pk.keep[si].empty() ? nullptr : pk.keep[si].data();
      // unfold: row (c, i, j) -> [C, p, p] in the conv weight's order (a masked set: its kept patches)
      if constexpr (policy_traits<Policy>::is_host) {
        if (keep)
          for_each_row(pol, cs.count, detail::unfold_kept_fn<T>{images[si], u, keep, C, cs.height, cs.width, p, w0, nk, K});
        else
          unfold_patches(pol, images[si], cs.count, C, cs.height, cs.width, p, u);
      } else if (const std::int64_t* dkeep = pk.device.keep.empty() ? nullptr : pk.device.keep[si]) {
        for_each_chunk(pol, n * K, detail::unfold_elems_fn<T>{images[si], u, C, cs.height, cs.width, p, w0, nk, K, dkeep});
      } else {
        unfold_patches(pol, images[si], cs.count, C, cs.height, cs.width, p, u);
      }
      gemm(pol, gemm_desc{false, true, n, D, K}, T(1), static_cast<const T*>(u), Wp, T(0), tmp);
      const std::int64_t first = pk.set_first[si];
      if constexpr (policy_traits<Policy>::is_host) {
        pk.resize[si].forward(pe + D, pr, D);
        for_each_row(pol, cs.count,
                     detail::embed_crop_fn<T>{pk.segs.data(), first, nk, D, x, tmp, pr, cls, pe, bp, keep});
      } else {
        pos_resize_forward(pol, pk.device.resize[si], pe + D, pr, D);
        // a set's crops are consecutive segments of 1 + nk rows (make_pack)
        T* x0 = x + pk.segs[std::size_t(first)].offset * D;
        const std::int64_t* dkeep = pk.device.keep.empty() ? nullptr : pk.device.keep[si];
        for_each_chunk(pol, cs.count * (1 + nk) * D, detail::embed_elems_fn<T>{x0, tmp, pr, cls, pe, bp, nk, D, dkeep});
      }
      if (keep_unfold) u += n * K;
      pr += np * D;
    }
  }

  // Gradients of the embedding from dx [T, D]: cls, pos (through the resize), patch W and b.
  template <class Policy, class T, class S>
  void embed_backward(const Policy& pol, const vit_pack<T>& pk, const T* unfold, const T* dx, tensor_view<T, S> G,
                      T* tmp) const {
    const std::int64_t D = cfg_.embed_dim, K = patch_dim();
    T* gcls = G.data + cls_;
    T* gpos = G.data + pos_;
    const T* u = unfold;
    for (std::size_t si = 0; si < pk.sets.size(); ++si) {
      const crop_set& cs = pk.sets[si];
      const std::int64_t np = pk.set_patches[si], nk = pk.set_kept[si], n = cs.count * nk, first = pk.set_first[si];
      T* dpos = tmp + n * D;
      if constexpr (policy_traits<Policy>::is_host) {
        // gather the patch-token gradients of this set into tmp [n, D]; sum the CLS rows
        for (std::int64_t c = 0; c < cs.count; ++c) {
          const T* xs = dx + pk.segs[std::size_t(first + c)].offset * D;
          for (std::int64_t d = 0; d < D; ++d) {
            gcls[d] += xs[d];
            gpos[d] += xs[d];
          }
          for (std::int64_t t = 0; t < nk; ++t)
            for (std::int64_t d = 0; d < D; ++d) tmp[(c * nk + t) * D + d] = xs[(1 + t) * D + d];
        }
        // position grid: sum over the set's crops (a masked set: into its kept rows), then back through the resize
        for (std::int64_t t = 0; t < np * D; ++t) dpos[t] = T(0);
        if (pk.keep[si].empty()) {
          for (std::int64_t c = 0; c < cs.count; ++c)
            for (std::int64_t t = 0; t < np * D; ++t) dpos[t] += tmp[c * np * D + t];
        } else {
          const std::int64_t* keep = pk.keep[si].data();
          for (std::int64_t r = 0; r < n; ++r)
            for (std::int64_t d = 0; d < D; ++d) dpos[keep[r] * D + d] += tmp[r * D + d];
        }
        pk.resize[si].backward(dpos, gpos + D, D);
      } else {
        // the same sums, each column (or element) in the CPU's order of crops
        const T* dx0 = dx + pk.segs[std::size_t(first)].offset * D;
        for_each_chunk(pol, n * D, detail::patch_grad_gather_fn<T>{dx0, tmp, nk, D});
        for_each_row(pol, D, detail::cls_grad_fn<T>{dx0, gcls, gpos, cs.count, nk, D});
        if (const std::int64_t* dkeep = pk.device.keep.empty() ? nullptr : pk.device.keep[si])
          for_each_chunk(pol, np * D, detail::kept_pos_sum_fn<T>{tmp, dkeep, dpos, n, D});
        else
          for_each_chunk(pol, np * D, detail::crop_sum_fn<T>{tmp, dpos, cs.count, np * D});
        pos_resize_backward(pol, pk.device.resize[si], static_cast<const T*>(dpos), gpos + D, D);
      }
      // patch projection
      linear_param_grads(pol, static_cast<const T*>(tmp), u, n, D, K, G.data + patch_w_, G.data + patch_b_);
      u += n * K;
    }
  }

  template <class Policy, class T, class S>
  void block_forward(const Policy& pol, tensor_view<const T, S> P, const vit_pack<T>& pk, const block& blk, const T* x,
                     block_saved_parts<T> b, T* x_out, std::uint64_t seed, step_value<std::uint64_t> step,
                     std::int64_t l,
                     bool draw_dp, const op16_parts* o16 = nullptr) const {
    const std::int64_t D = cfg_.embed_dim, Tn = pk.tokens, H = cfg_.mlp_hidden();
    const auto hv = [&](T* p, std::int64_t cols, const char* n) { return tensor_view<T, S>{p, {Tn, cols}, n}; };
    const auto cv = [&](const T* p, std::int64_t cols, const char* n) { return tensor_view<const T, S>{p, {Tn, cols}, n}; };
    require<config_error>(b.x_in == x, "vit: block input must be the previous block's output in place");
    if (draw_dp) draw_drop_path(pol, pk, blk.drop, seed, step, l, b.dp);
    if (o16) round_block_weights(pol, P, blk, *o16);  // o16: bf16 operands (fwd16), the same values
    norm_then_linear<S>(pol, P, blk.norm1, blk.qkv, b.x_in, b.ln1, b.a, o16 ? o16->a : nullptr,
                        o16 ? o16->wqkv : nullptr, b.qkv, Tn);
    attention_forward(pol, cfg_.heads, D, pk.segs, pk.probs_off, static_cast<const T*>(b.qkv), b.o, b.probs);
    blk.proj.forward(pol, P, cv(b.o, D, "attn"), hv(b.x_mid, D, "proj"));
    residual(pol, pk, b.x_mid, b.x_in, b.dp, D);  // x_mid = x + dp1 * proj
    norm_then_linear<S>(pol, P, blk.norm2, blk.fc1, b.x_mid, b.ln2, b.c, o16 ? o16->c : nullptr,
                        o16 ? o16->wfc1 : nullptr, b.h, Tn);
    if constexpr (std::is_same_v<T, float>) {
      if (o16) {
        gelu_apply_bf16(pol, static_cast<const T*>(b.h), o16->g, Tn * H);
        blk.fc2.forward_bf16(pol, P, o16->g, o16->wfc2, hv(x_out, D, "fc2"));
      }
    }
    if (!o16) {
      gelu_of_block<S>(pol, b, Tn, H);
      blk.fc2.forward(pol, P, cv(b.g, H, "gelu"), hv(x_out, D, "fc2"));
    }
    residual(pol, pk, x_out, b.x_mid, b.dp + pk.crops, D);  // x_out = x_mid + dp2 * mlp
  }

  // y = lin(norm(x)) over the pack's Tn rows, norm's statistics in stats and its output in a;
  // with a16 (bf16 operands) norm's output is stored as bf16 there instead and lin reads it
  // and w16, the weight's bf16 copy: the same values.
  template <class S, class Policy, class T>
  void norm_then_linear(const Policy& pol, tensor_view<const T, S> P, const layer_norm& norm, const linear& lin,
                        const T* x, T* stats, T* a, std::uint16_t* a16, const std::uint16_t* w16, T* y,
                        std::int64_t Tn) const {
    const std::int64_t D = cfg_.embed_dim;
    const tensor_view<const T, S> xv{x, {Tn, D}, "layer_norm input"};
    const tensor_view<T, S> st{stats, {Tn, 2}, "layer_norm stats"}, yv{y, {Tn, lin.out_dim()}, "linear output"};
    if constexpr (std::is_same_v<T, float>) {
      if (a16) {
        norm.forward_bf16(pol, P, xv, a16, st);
        lin.forward_bf16(pol, P, a16, w16, yv);
        return;
      }
    }
    norm.forward(pol, P, xv, tensor_view<T, S>{a, {Tn, D}, "layer_norm output"}, st);
    lin.forward(pol, P, tensor_view<const T, S>{a, {Tn, D}, "layer_norm output"}, yv);
  }

  // branch = dp[crop] * branch + base, per crop
  template <class Policy, class T>
  static void residual(const Policy& pol, const vit_pack<T>& pk, T* branch, const T* base, const T* dp,
                       std::int64_t D) {
    if constexpr (policy_traits<Policy>::is_host)  // crops dealt in turn: large ones come first
      for_each_row_cyclic(pol, pk.crops, detail::residual_crop_fn<T>{pk.segs.data(), branch, base, dp, D});
    else
      for_each_chunk(pol, pk.tokens * D, detail::residual_elems_fn<T>{pk.device.token_crop, branch, base, dp, D});
  }

  // DropPath scales for both branches of block l: 0 or 1 / keep per crop (1 when off), drawn
  // where dp lives (the same Philox draws on the host and the device).
  template <class Policy, class T>
  static void draw_drop_path(const Policy& pol, const vit_pack<T>& pk, double rate, std::uint64_t seed,
                             step_value<std::uint64_t> step, std::int64_t l, T* dp) {
    const detail::drop_path_fn<T> f{dp, pk.crops, rate, seed, step, l};
    if constexpr (policy_traits<Policy>::is_host) {
      (void)pol;
      for (std::int64_t r = 0; r < 2 * pk.crops; ++r) f(r);
    } else {
      for_each_row(pol, 2 * pk.crops, f);
    }
  }

  vit_config cfg_{};
  std::size_t patch_w_ = 0, patch_b_ = 0, cls_ = 0, pos_ = 0;
  std::vector<block> blocks_;
  layer_norm norm_;
};

}  // namespace dino::nn
