#!/usr/bin/env python3
"""Golden data for attention-conditioned masking of the student's view (ssl/student_mask.hpp).

Run with a Python that has PyTorch (1.13 was used) and numpy:

    /usr/bin/python3 tests/golden/gen/gen_attention_mask.py [--out tests/golden/data]

Writes attention_mask.bin (format: gen_objective.py / tests/golden/golden.hpp), float32 unless
said otherwise, torch.manual_seed fixed. The model is gen_vit.py's tiny ViT (D 20, depth 2,
2 heads, patch 4, stored grid 4x4, the same parameter values, `param/<name>`).

The masking (the APMask idea on top of DINO), restated:
  1. the teacher's last-block CLS attention of a crop: get_last_selfattention(x)[:, :, 0, :],
     [crops, heads, 1 + N] (column 0: the CLS token itself);
  2. score of patch j = sum over heads of attn[:, h, 1 + j], in float64 (the mean over heads
     ranks the same);
  3. drop = floor(ratio * N + 1e-9) patches, keep k = max(1, N - drop): the k patches first in
     the order (score descending, patch index ascending), listed in ascending index order;
  4. the student's tokens: prepare_tokens(x) (patch embedding + CLS + interpolated position
     embedding) gathered to [CLS, kept patches], then the blocks and the final norm on that
     shorter sequence.

Cases:
  select/      hyper (f64) [ratio_a, ratio_b, heads, N]; attn [4, 3, 17] (crop 2 has ties: every
               patch equal; crop 3 ties in pairs); keep_a, keep_b (f64 [4, k]) for both ratios.
  a/, b/       hyper (f64) [ratio]; x [B, 3, H, W] (a/: 3 x 16 x 16, the stored grid, ratio 0.3;
               b/: 2 x 12 x 12, a 3 x 3 grid with an interpolated position embedding, ratio 0.5);
               attn_cls [B, 2, 1 + N] (the selection's input); keep (f64 [B, k]); cls [B, 20] and
               tokens [B, 1 + k, 20] of the masked forward; R [B, 20], R2 [B, 1 + k, 20]
               cotangents; f = sum(cls * R) + sum(tokens * R2); grad/<name> = df/dparam.

Self-checks (asserted): the kept set against a brute force over all (score, index) pairs, a
margin between the last kept and the first dropped score in a/ and b/ (so that float32 noise in
another implementation cannot flip the choice), the masked forward with keep = every patch
against forward_tokens, the masked forward against the full sequence with the dropped keys
masked out of every attention (equal on the kept tokens), and float32 against float64.
"""
import math
import os
import sys

import numpy as np
import torch

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_objective import f64, golden_main, write_golden  # noqa: E402
from gen_vit import VIT, make_vit, named, vit_config  # noqa: E402


def kept_count(ratio, n):
    return max(1, n - int(math.floor(ratio * n + 1e-9)))


def select(attn_cls, ratio):
    """attn_cls [B, heads, 1 + N] -> kept patch indices [B, k], ascending."""
    n = attn_cls.shape[-1] - 1
    k = kept_count(ratio, n)
    score = attn_cls[:, :, 1:].double().sum(1)
    # stable sort on -score: equal scores keep the index order
    order = torch.sort(-score, dim=1, stable=True).indices
    return torch.sort(order[:, :k], dim=1).values


def select_brute(attn_cls, ratio):
    n = attn_cls.shape[-1] - 1
    k = kept_count(ratio, n)
    out = []
    for row in attn_cls.double().numpy():
        s = row[:, 1:].sum(0)
        ranked = sorted(range(n), key=lambda j: (-s[j], j))
        out.append(sorted(ranked[:k]))
    return torch.tensor(out)


def masked_tokens(model, x, keep):
    """The student's view: [CLS, kept patches] with their position rows, through the blocks."""
    t = model.prepare_tokens(x)
    idx = torch.cat([torch.zeros(keep.shape[0], 1, dtype=torch.long), keep + 1], dim=1)
    t = torch.gather(t, 1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
    for blk in model.blocks:
        t = blk(t)
    return model.norm(t)


def key_masked_tokens(model, x, keep):
    """The full sequence with the dropped patches masked out of every attention's keys: the kept
    tokens' outputs equal masked_tokens' (an independent restatement of token dropping)."""
    t = model.prepare_tokens(x)
    B, L, D = t.shape
    allowed = torch.zeros(B, L, dtype=torch.bool)
    allowed[:, 0] = True
    allowed.scatter_(1, keep + 1, True)
    for blk in model.blocks:
        a = blk.attn
        y = blk.norm1(t)
        qkv = a.qkv(y).reshape(B, L, 3, a.num_heads, D // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        s = (q @ k.transpose(-2, -1)) * a.scale
        s = s.masked_fill(~allowed[:, None, None, :], float("-inf"))
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
        t = t + a.proj(o)
        t = t + blk.mlp(blk.norm2(t))
    out = model.norm(t)
    idx = torch.cat([torch.zeros(B, 1, dtype=torch.long), keep + 1], dim=1)
    return torch.gather(out, 1, idx.unsqueeze(-1).expand(-1, -1, D))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def gen_select():
    torch.manual_seed(21)
    heads, n, ra, rb = 3, 16, 0.3, 0.75
    attn = torch.randn(4, heads, 1 + n).softmax(-1)
    attn[2] = 1.0 / (1 + n)  # every patch tied: the lowest indices win
    pairs = torch.randn(4, heads, 1 + n // 2).softmax(-1) / 2
    attn[3, :, 0] = pairs[3, :, 0]
    attn[3, :, 1:] = pairs[3, :, 1:].repeat_interleave(2, dim=1)  # patches 2i and 2i + 1 tied
    T = [("select/hyper", f64([ra, rb, heads, n])), ("select/attn", attn)]
    for name, r in (("keep_a", ra), ("keep_b", rb)):
        keep = select(attn, r)
        assert torch.equal(keep, select_brute(attn, r)), name
        assert keep.shape == (4, kept_count(r, n))
        print("select/%s ratio %.2f: keep %d of %d; crop 2 (all tied) keeps %s" % (
            name, r, keep.shape[1], n, keep[2].tolist()))
        T.append(("select/" + name, f64(keep.numpy())))
    assert kept_count(0.3, 10) == 7 and kept_count(0.29, 100) == 71 and kept_count(0.99, 3) == 1
    return T


def gen_case(prefix, seed, B, H, W, ratio, model, model64):
    torch.manual_seed(seed)
    x = torch.randn(B, VIT["chans"], H, W)
    with torch.no_grad():
        attn_cls = model.get_last_selfattention(x)[:, :, 0, :]
    n = attn_cls.shape[-1] - 1
    keep = select(attn_cls, ratio)
    assert torch.equal(keep, select_brute(attn_cls, ratio))
    k = keep.shape[1]
    score = attn_cls[:, :, 1:].double().sum(1)
    margin = min(float(score[b, keep[b]].min() - np.delete(score[b].numpy(), keep[b].numpy()).max()) for b in range(B))
    assert margin > 1e-4, (prefix, margin)
    R = torch.randn(B, VIT["D"])
    R2 = torch.randn(B, 1 + k, VIT["D"])
    model.zero_grad(set_to_none=True)
    tokens = masked_tokens(model, x, keep)
    f = (tokens[:, 0] * R).sum() + (tokens * R2).sum()
    f.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        all_kept = masked_tokens(model, x, torch.arange(n).repeat(B, 1))
        e_all = rel(all_kept, model.forward_tokens(x))
        e_key = rel(tokens.detach(), key_masked_tokens(model, x, keep))
    assert e_all < 1e-6 and e_key < 2e-6, (e_all, e_key)
    model64.zero_grad(set_to_none=True)
    t64 = masked_tokens(model64, x.double(), keep)
    ((t64[:, 0] * R.double()).sum() + (t64 * R2.double()).sum()).backward()
    e_fwd = rel(tokens.detach(), t64.detach())
    e_grad = max(rel(grads[name], p.grad) for name, p in model64.named_parameters())
    print("%s x [%d,3,%d,%d]: ratio %.2f keeps %d of %d patches (score margin %.1e); keep-all vs forward %.1e; "
          "vs key-masked full sequence %.1e; f32 vs f64: tokens %.1e, grads %.1e" % (
              prefix, B, H, W, ratio, k, n, margin, e_all, e_key, e_fwd, e_grad))
    T = [(prefix + "hyper", f64([ratio])), (prefix + "x", x), (prefix + "attn_cls", attn_cls),
         (prefix + "keep", f64(keep.numpy())), (prefix + "cls", tokens[:, 0].detach().clone()),
         (prefix + "tokens", tokens.detach()), (prefix + "R", R), (prefix + "R2", R2), (prefix + "f", f.detach())]
    T += [(prefix + "grad/" + name, g) for name, g in grads.items()]
    return T


def gen(out_dir):
    model, model64 = make_vit(), make_vit(torch.float64)
    T = [("config", vit_config())] + named("param/", model) + gen_select()
    T += gen_case("a/", 31, 3, 16, 16, 0.3, model, model64)
    T += gen_case("b/", 32, 2, 12, 12, 0.5, model, model64)
    write_golden(os.path.join(out_dir, "attention_mask.bin"), T)


def main():
    golden_main(gen)


if __name__ == "__main__":
    main()
