#!/usr/bin/env python3
"""Golden data for the DINO ViT backbone and a short DINO training run, from a PyTorch reference.

Run with a Python that has PyTorch (1.13 was used) and numpy:

    /usr/bin/python3 tests/golden/gen/gen_vit.py [--out tests/golden/data]

The reference below restates the official facebookresearch/dino code (dino-spec sections 1,
2, 3, 4.2, 4.4-4.6): vision_transformer.VisionTransformer (PatchEmbed Conv2d, CLS token,
position embedding with interpolate_pos_encoding's bicubic resampling by a *scale factor*
(h0 + 0.1)/sqrt(N0), pre-norm Blocks with qkv bias, head_dim^-0.5 and exact GELU, DropPath,
final LayerNorm eps 1e-6, get_last_selfattention, get_intermediate_layers),
utils.MultiCropWrapper, DINOHead, main_dino.DINOLoss and one train_one_epoch iteration
(schedules, teacher on the 2 global crops, student on all crops, loss with the current
center, center update, backward, per-tensor clipping, last-layer cancelling, AdamW with
get_params_groups, teacher EMA over parameters()).

The file format and a few objective helpers (DINOHead, cosine_scheduler, get_params_groups,
clip_gradients, cancel_gradients_last_layer) come from gen_objective.py in this directory.

Files written (float32 unless said otherwise; tests/golden/gen/README.md documents every
entry):
  vit_small_model.bin  a tiny ViT (D 20, depth 2, 2 heads, patch 4, stored grid 4x4): its
                       parameters, and for four inputs ("a/" stored grid, "b/" downsampled
                       grid, "c/" non-square grid, "d/" 17x19 pixels = the stored 4x4 grid but
                       resampled because the image is not square) forward, tokens, last
                       self-attention, intermediate layers and the gradients of a scalar.
  vit_pack.bin         MultiCropWrapper on 2 global + 3 local crops of 2 images: CLS
                       features (crop-major) and the parameter gradients of (features * R).sum().
  vit_e2e.bin          10 DINO training iterations (student ViT + DINOHead, EMA teacher).

Self-checks (printed): the bicubic resampling against an independent numpy float64
implementation of the documented semantics, the grid sizes, the no-interpolation cases, the
ViT forward against a numpy float64 forward, float32 gradients against float64, the
multi-crop packing against per-crop calls, and the float32 training run against float64.
"""
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_objective import (DINOHead, cancel_gradients_last_layer, clip_gradients,  # noqa: E402
                           cosine_scheduler, f64, get_params_groups, golden_main, write_golden)

# ----------------------------------------------------------------------------- reference ViT
# vision_transformer.py (dino-spec section 1), the parts the factories use: qkv_bias True,
# LayerNorm eps 1e-6, drop_rate = attn_drop_rate = 0, qk_scale None, num_classes 0.


def drop_path(x, drop_prob=0.0, training=False):
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
    random_tensor.floor_()
    return x.div(keep_prob) * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()  # exact erf form
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return x, attn


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path_rate, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, return_attention=False):
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=(224,), patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0, eps=1e-6):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size[0], patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i], eps) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Identity()
        self.last_interp = None  # (interpolated?, output grid) of the last prepare_tokens, for the self-checks

    def interpolate_pos_encoding(self, x, w, h):
        # NB: as in the reference, w is the input's dim 2 (height) and h its dim 3 (width).
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            self.last_interp = (False, None)
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        w0, h0 = w0 + 0.1, h0 + 0.1  # dino issue 8
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
            align_corners=False,
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        self.last_interp = (True, (patch_pos_embed.shape[-2], patch_pos_embed.shape[-1]))
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return x  # pos_drop has p = 0

    def forward_tokens(self, x):
        """forward() before its final x[:, 0]: every token after the final norm."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x):
        return self.forward_tokens(x)[:, 0]

    def get_last_selfattention(self, x):
        x = self.prepare_tokens(x)
        for i, blk in enumerate(self.blocks):
            if i < len(self.blocks) - 1:
                x = blk(x)
            else:
                return blk(x, return_attention=True)

    def get_intermediate_layers(self, x, n=1):
        x = self.prepare_tokens(x)
        output = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                output.append(self.norm(x))
        return output


class MultiCropWrapper(nn.Module):
    """utils.MultiCropWrapper: consecutive crops of the same width share one backbone pass."""

    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        idx_crops = torch.cumsum(torch.unique_consecutive(
            torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0, dtype=x[0].dtype)
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx:end_idx]))
            if isinstance(_out, tuple):
                _out = _out[0]
            output = torch.cat((output, _out))
            start_idx = end_idx
        return self.head(output)


class DINOLoss(nn.Module):
    """main_dino.DINOLoss, one process (the all_reduce of update_center is the identity)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output, teacher_output, epoch):
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / (len(teacher_output) * 1)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


# ----------------------------------------------------------------------------- configuration
VIT = dict(D=20, depth=2, heads=2, mlp_ratio=4, patch=4, chans=3, img=16, eps=1e-6)
# vit_small_model.bin cases: (prefix, batch, H, W)
CASES = [("a/", 2, 16, 16), ("b/", 2, 8, 8), ("c/", 1, 12, 20), ("d/", 1, 17, 19)]
PARAM_SEED = 10


def make_vit(dtype=torch.float32):
    """The tiny ViT with test-friendly parameters (not the reference init, whose std 0.02
    weights and zero biases make every token nearly constant):
      Linear / Conv2d weights N(0, 1/fan_in), their biases N(0, 0.1^2);
      cls_token, pos_embed N(0, 0.5^2); LayerNorm weight 1 + N(0, 0.1^2), bias N(0, 0.1^2).
    Drawn from a private generator in named_parameters() order, so that every file gets the
    same values."""
    c = VIT
    m = VisionTransformer(img_size=[c["img"]], patch_size=c["patch"], in_chans=c["chans"], embed_dim=c["D"],
                          depth=c["depth"], num_heads=c["heads"], mlp_ratio=c["mlp_ratio"], qkv_bias=True,
                          drop_path_rate=0.0, eps=c["eps"])
    g = torch.Generator().manual_seed(PARAM_SEED)
    ln = {id(mod.weight) for mod in m.modules() if isinstance(mod, nn.LayerNorm)}
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name in ("cls_token", "pos_embed"):
                p.copy_(0.5 * r)
            elif id(p) in ln:
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith(".bias"):
                p.copy_(0.1 * r)
            else:
                fan_in = p[0].numel()
                p.copy_(r / math.sqrt(fan_in))
    return m.to(dtype)


def vit_config():
    c = VIT
    return f64([c["D"], c["depth"], c["heads"], c["D"] * c["mlp_ratio"], c["patch"], c["chans"], c["img"],
                1.0, c["eps"], 0.0])


def named(prefix, module):
    return [(prefix + k, v.detach().clone().float()) for k, v in module.state_dict().items()]


# ----------------------------------------------------------------------------- self-check helpers
def cubic_weights(t, A=-0.75):
    """PyTorch's cubic convolution weights for taps at offsets -1, 0, 1, 2 from floor(src)."""
    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(n_in, n_out, scale):
    """[n_out, n_in] resampling matrix of F.interpolate(mode='bicubic', align_corners=False,
    scale_factor=scale) along one axis: src = (dst + 0.5) / scale - 0.5 (the passed scale
    factor, not n_out / n_in), i0 = floor(src), t = src - i0, taps i0-1 .. i0+2 clamped to
    [0, n_in - 1] (clamped taps add up)."""
    M = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) / scale - 0.5
        i0 = math.floor(src)
        w = cubic_weights(src - i0)
        for k in range(4):
            M[o, min(max(i0 - 1 + k, 0), n_in - 1)] += w[k]
    return M


def np_pos_embed(pos, H, W, p, offset=0.1):
    """numpy float64 interpolate_pos_encoding: pos [1, N0+1, D] -> [1, h0*w0+1, D]. offset 0
    gives the sampling of an explicit output size (scale = out / in), for comparison."""
    N0 = pos.shape[1] - 1
    s = int(round(math.sqrt(N0)))
    h0, w0 = H // p, W // p
    if h0 * w0 == N0 and H == W:
        return pos
    grid = pos[0, 1:].reshape(s, s, -1)  # [s, s, D], row-major patches
    Mh = bicubic_matrix(s, h0, (h0 + offset) / math.sqrt(N0))
    Mw = bicubic_matrix(s, w0, (w0 + offset) / math.sqrt(N0))
    out = np.einsum("ai,bj,ijd->abd", Mh, Mw, grid).reshape(h0 * w0, -1)
    return np.concatenate([pos[0, :1], out], 0)[None]


def np_layernorm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_gelu(x):
    from math import erf
    return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))


def np_vit_forward(P, x, cfg):
    """numpy float64 forward from the state_dict P: final-normed tokens, last attention, and
    the normed outputs of every block."""
    D, heads, p, eps = cfg["D"], cfg["heads"], cfg["patch"], cfg["eps"]
    B, C, H, W = x.shape
    h0, w0 = H // p, W // p
    xc = x[:, :, :h0 * p, :w0 * p].reshape(B, C, h0, p, w0, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, h0 * w0, C * p * p)
    tok = xc @ P["patch_embed.proj.weight"].reshape(D, -1).T + P["patch_embed.proj.bias"]
    tok = np.concatenate([np.broadcast_to(P["cls_token"], (B, 1, D)), tok], 1)
    tok = tok + np_pos_embed(P["pos_embed"], H, W, p)
    hd = D // heads
    outs, attn = [], None
    for i in range(cfg["depth"]):
        pre = "blocks.%d." % i
        y = np_layernorm(tok, P[pre + "norm1.weight"], P[pre + "norm1.bias"], eps)
        qkv = y @ P[pre + "attn.qkv.weight"].T + P[pre + "attn.qkv.bias"]  # [B, N, 3D]: [q | k | v]
        N = qkv.shape[1]
        qkv = qkv.reshape(B, N, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = q @ k.transpose(0, 1, 3, 2) * hd ** -0.5
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        attn = a
        o = (a @ v).transpose(0, 2, 1, 3).reshape(B, N, D)
        tok = tok + o @ P[pre + "attn.proj.weight"].T + P[pre + "attn.proj.bias"]
        y = np_layernorm(tok, P[pre + "norm2.weight"], P[pre + "norm2.bias"], eps)
        hmid = np_gelu(y @ P[pre + "mlp.fc1.weight"].T + P[pre + "mlp.fc1.bias"])
        tok = tok + hmid @ P[pre + "mlp.fc2.weight"].T + P[pre + "mlp.fc2.bias"]
        outs.append(np_layernorm(tok, P["norm.weight"], P["norm.bias"], eps))
    return outs[-1], attn, outs


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)), float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ----------------------------------------------------------------------------- vit_small_model.bin
def gen_model(out_dir):
    torch.manual_seed(11)
    model = make_vit()
    model64 = make_vit(torch.float64)
    P64 = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    tensors = [("config", vit_config())]
    tensors += named("param/", model)
    print("vit: %d parameter tensors, %d values" % (len(list(model.parameters())), sum(p.numel() for p in model.parameters())))
    p = VIT["patch"]
    N0 = model.patch_embed.num_patches
    for prefix, B, H, W in CASES:
        x = torch.randn(B, VIT["chans"], H, W)
        h0, w0 = H // p, W // p
        N = h0 * w0
        R = torch.randn(B, VIT["D"])
        R2 = torch.randn(B, N + 1, VIT["D"])

        # forward pieces (no grad)
        with torch.no_grad():
            cls = model(x)
            attn = model.get_last_selfattention(x)
            inter = model.get_intermediate_layers(x, n=2)
            interp, grid = model.last_interp
        # the scalar f = sum(forward(x) * R) + sum(tokens * R2) and f_cls = sum(forward(x) * R)
        xg = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        tokens = model.forward_tokens(xg)
        f = (tokens[:, 0] * R).sum() + (tokens * R2).sum()
        f.backward()
        grads = {k: q.grad.clone() for k, q in model.named_parameters()}
        dx = xg.grad.clone()
        xg2 = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        f_cls = (model(xg2) * R).sum()
        f_cls.backward()
        grads_cls = {k: q.grad.clone() for k, q in model.named_parameters()}
        dx_cls = xg2.grad.clone()
        model.zero_grad(set_to_none=True)

        # ---- self-checks
        assert tokens.shape == (B, N + 1, VIT["D"]), tokens.shape
        assert torch.equal(tokens[:, 0].detach(), cls)
        assert len(inter) == 2 and torch.equal(inter[1], tokens.detach())
        assert attn.shape == (B, VIT["heads"], N + 1, N + 1)
        assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
        expect_interp = not (N == N0 and H == W)
        assert interp == expect_interp and (grid is None or grid == (h0, w0)), (prefix, interp, grid)
        with torch.no_grad():
            pe = model.interpolate_pos_encoding(model.patch_embed(x).new_zeros(1, N + 1, VIT["D"]), H, W)
            if not expect_interp:
                assert pe is model.pos_embed  # returned unchanged: no resampling at all
        pe_np = np_pos_embed(P64["pos_embed"], H, W, p)
        e_pe = rel_err(pe.detach().numpy(), pe_np)
        assert e_pe[0] < 1e-6, e_pe
        e_pe_size = rel_err(pe.detach().numpy(), np_pos_embed(P64["pos_embed"], H, W, p, offset=0.0))[0]
        ref_tok, ref_attn, ref_outs = np_vit_forward(P64, x.double().numpy(), VIT)
        e_tok, e_attn = rel_err(tokens.detach().numpy(), ref_tok), rel_err(attn.numpy(), ref_attn)
        e_inter0 = rel_err(inter[0].numpy(), ref_outs[0])
        assert max(e_tok + e_attn + e_inter0) < 2e-5, (e_tok, e_attn, e_inter0)
        # float32 gradients against the same computation in float64
        x64 = x.double().requires_grad_(True)
        model64.zero_grad(set_to_none=True)
        t64 = model64.forward_tokens(x64)
        ((t64[:, 0] * R.double()).sum() + (t64 * R2.double()).sum()).backward()
        g_err = max(rel_err(grads[k].numpy(), q.grad.numpy())[0] for k, q in model64.named_parameters())
        dx_err = rel_err(dx.numpy(), x64.grad.numpy())[0]
        changed = "" if not expect_interp else ", pos grid %dx%d -> %dx%d" % (math.isqrt(N0), math.isqrt(N0), h0, w0)
        if expect_interp and N == N0:
            changed += " (same grid, resampled: |new - stored| max %.3g)" % float(
                (pe[0, 1:] - model.pos_embed[0, 1:]).abs().max())
        print("vit %s x [%d,3,%d,%d]: %d patches (%dx%d), interpolated %s%s; pos vs numpy bicubic %.1e "
              "(with scale out/in instead: %.1e); "
              "tokens/attn/inter0 vs numpy f64 %.1e/%.1e/%.1e; grads f32 vs f64: params %.1e, dx %.1e; "
              "attn max %.3f, min %.2e" % (
                  prefix, B, H, W, N, h0, w0, interp, changed, e_pe[0], e_pe_size, e_tok[0], e_attn[0], e_inter0[0],
                  g_err, dx_err, float(attn.max()), float(attn.min())))

        tensors += [
            (prefix + "x", x), (prefix + "cls", cls), (prefix + "tokens", tokens.detach()),
            (prefix + "attn", attn), (prefix + "inter0", inter[0]), (prefix + "inter1", inter[1]),
            (prefix + "pos_embed", pe.detach()[0]),
            (prefix + "R", R), (prefix + "R2", R2), (prefix + "f", f.detach()), (prefix + "dx", dx),
        ]
        tensors += [(prefix + "grad/" + k, v) for k, v in grads.items()]
        if prefix == "a/":
            tensors += [(prefix + "f_cls", f_cls.detach()), (prefix + "dx_cls", dx_cls)]
            tensors += [(prefix + "grad_cls/" + k, v) for k, v in grads_cls.items()]
    write_golden(os.path.join(out_dir, "vit_small_model.bin"), tensors)


# ----------------------------------------------------------------------------- vit_pack.bin
def gen_pack(out_dir):
    torch.manual_seed(12)
    B, n_global, n_local, G, L = 2, 2, 3, VIT["img"], VIT["img"] // 2
    model = make_vit()
    wrapper = MultiCropWrapper(model, nn.Identity())
    crops = [torch.randn(B, VIT["chans"], G, G) for _ in range(n_global)] + \
            [torch.randn(B, VIT["chans"], L, L) for _ in range(n_local)]
    feats = wrapper(crops)
    R = torch.randn(*feats.shape)
    loss = (feats * R).sum()
    loss.backward()
    # self-check: the packed passes equal one backbone call per crop, stacked crop-major
    with torch.no_grad():
        per_crop = torch.cat([model(c) for c in crops])
    e = rel_err(feats.detach().numpy(), per_crop.numpy())
    print("pack: features %s, packed vs per-crop calls %.1e" % (tuple(feats.shape), e[0]))
    assert e[0] < 1e-5
    tensors = [("config", vit_config()), ("layout", f64([B, n_global, n_local, G, L]))]
    tensors += [("crop%d" % i, c) for i, c in enumerate(crops)]
    tensors += [("features", feats.detach()), ("R", R), ("f", loss.detach())]
    tensors += [("grad/" + k, q.grad) for k, q in model.named_parameters()]
    write_golden(os.path.join(out_dir, "vit_pack.bin"), tensors)


# ----------------------------------------------------------------------------- vit_e2e.bin
E2E = dict(B=2, n_local=4, K=64, hidden=48, bottleneck=16, nlayers=3, steps=10,
           lr=1e-3, min_lr=1e-4, warmup_steps=2, start_warmup_lr=1e-4, wd=0.04, wd_end=0.4,
           momentum=0.9, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
           student_temp=0.1, center_momentum=0.9, clip=3.0, freeze_last_layer=3, head_seed=20, crop_seed=1000)
SNAPSHOTS = (0, 4, 9)


def make_student(dtype):
    c = E2E
    torch.manual_seed(c["head_seed"])
    # DINOHead with the reference init: trunc_normal(std 0.02) / zero-bias MLP, default
    # (Kaiming-uniform) last layer split by weight norm, weight_g filled with 1 and frozen.
    head = DINOHead(VIT["D"], c["K"], norm_last_layer=True, nlayers=c["nlayers"], hidden_dim=c["hidden"],
                    bottleneck_dim=c["bottleneck"])
    return MultiCropWrapper(make_vit(), head).to(dtype)


def step_crops(s, dtype):
    c = E2E
    g = torch.Generator().manual_seed(c["crop_seed"] + s)
    G, L = VIT["img"], VIT["img"] // 2
    crops = [torch.randn(c["B"], VIT["chans"], G, G, generator=g) for _ in range(2)]
    crops += [torch.randn(c["B"], VIT["chans"], L, L, generator=g) for _ in range(c["n_local"])]
    return [x.to(dtype) for x in crops]


def run_e2e(dtype, record):
    """main_dino.train_one_epoch with one iteration per epoch (so "epoch" = step = it)."""
    c = E2E
    steps = c["steps"]
    ncrops = 2 + c["n_local"]
    student = make_student(dtype)
    teacher = make_student(dtype)
    teacher.load_state_dict(student.state_dict())
    for q in teacher.parameters():
        q.requires_grad = False
    dino_loss = DINOLoss(c["K"], ncrops, c["warmup_teacher_temp"], c["teacher_temp"], c["warmup_teacher_temp_epochs"],
                         steps, c["student_temp"], c["center_momentum"]).to(dtype)
    optimizer = torch.optim.AdamW(get_params_groups(student))  # betas (0.9, 0.999), eps 1e-8
    lr_schedule = cosine_scheduler(c["lr"], c["min_lr"], steps, 1, warmup_epochs=c["warmup_steps"],
                                   start_warmup_value=c["start_warmup_lr"])
    wd_schedule = cosine_scheduler(c["wd"], c["wd_end"], steps, 1)
    momentum_schedule = cosine_scheduler(c["momentum"], 1.0, steps, 1)
    record("lr", f64(lr_schedule))
    record("wd", f64(wd_schedule))
    record("momentum", f64(momentum_schedule))
    record("tau_t", f64(dino_loss.teacher_temp_schedule))
    for k, v in student.state_dict().items():
        record("init/student." + k, v)
    losses, clipped_per_step = [], []
    for it in range(steps):
        epoch = it
        for i, param_group in enumerate(optimizer.param_groups):
            param_group["lr"] = lr_schedule[it]
            if i == 0:
                param_group["weight_decay"] = wd_schedule[it]
        images = step_crops(it, dtype)
        for j, im in enumerate(images):
            record("step%d/crop%d" % (it, j), im)
        teacher_output = teacher(images[:2])
        student_output = student(images)
        if it == 0:
            student_output.retain_grad()
        loss = dino_loss(student_output, teacher_output, epoch)
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        loss.backward()
        if it == 0:
            record("step0/teacher_logits", teacher_output.detach())
            record("step0/student_logits", student_output.detach())
            record("step0/dlogits", student_output.grad)
            for k, q in student.named_parameters():
                if q.grad is not None:
                    record("step0/grad/student." + k, q.grad.clone())
        clipped = clip_gradients(student, c["clip"])
        cancel_gradients_last_layer(epoch, student, c["freeze_last_layer"])
        optimizer.step()
        with torch.no_grad():
            m = momentum_schedule[it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        record("step%d/loss" % it, loss.detach())
        record("step%d/center" % it, dino_loss.center.reshape(-1))
        record("step%d/clipped" % it, f64(len(clipped)))
        if it in SNAPSHOTS:
            for k, v in student.state_dict().items():
                record("step%d/student.%s" % (it, k), v)
            for k, v in teacher.state_dict().items():
                record("step%d/teacher.%s" % (it, k), v)
        losses.append(loss.item())
        clipped_per_step.append(clipped)
    return losses, clipped_per_step


def gen_e2e(out_dir):
    c = E2E
    tensors = []

    def record32(name, v):
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
        tensors.append((name, v))

    store64 = {}

    def record64(name, v):
        store64[name] = v.detach().clone() if isinstance(v, torch.Tensor) else v

    tensors.append(("config", vit_config()))
    tensors.append(("hyper", f64([c["B"], 2, c["n_local"], VIT["img"], VIT["img"] // 2, c["K"], c["hidden"], c["bottleneck"],
                                  c["nlayers"], 1.0, c["steps"], c["student_temp"], c["center_momentum"], c["clip"],
                                  c["freeze_last_layer"]])))
    losses, clipped = run_e2e(torch.float32, record32)
    losses64, _ = run_e2e(torch.float64, record64)
    print("e2e: losses %s" % " ".join("%.5f" % l for l in losses))
    print("e2e: clipped tensors per step %s" % [len(x) for x in clipped])
    print("e2e: first clipped names %s" % sorted({n for x in clipped for n in x})[:12])
    d32 = dict(tensors)
    D = VIT["D"]
    for s in SNAPSHOTS:
        for who in ("student", "teacher"):
            e_max, d_max, d_name, key_drift, dn2, n2 = 0.0, 0.0, "", 0.0, 0.0, 0.0
            for name, v in d32.items():
                if not name.startswith("step%d/%s." % (s, who)):
                    continue
                init = d32["init/student." + name.split("/", 1)[1].split(".", 1)[1]].double().numpy().copy()
                a, b = v.double().numpy().copy(), store64[name].numpy().copy()
                if name.endswith("attn.qkv.bias"):
                    # the key bias [D, 2D) has an exact zero gradient: see the README
                    key_drift = max(key_drift, float(np.abs(a[D:2 * D] - b[D:2 * D]).max()))
                    a[D:2 * D] = b[D:2 * D] = init[D:2 * D] = 0.0
                e_max = max(e_max, rel_err(a, b)[1])
                if np.linalg.norm(b - init) > 0:
                    d = rel_err(a - init, b - init)[0]
                    if d > d_max:
                        d_max, d_name = d, name
                dn2 += float(np.sum((b - init) ** 2))
                n2 += float(np.sum(b ** 2))
            print("e2e: step %d %s vs a float64 run: params elem err max %.1e, (param - init) rel-norm err max "
                  "%.1e (%s), key-bias |f32 - f64| max %.1e; all params ||param - init|| / ||param|| %.2e" % (
                      s, who, e_max, d_max, d_name, key_drift, math.sqrt(dn2 / n2)))
    print("e2e: loss f32 vs f64 max rel %.1e; center step 9 rel-norm %.1e" % (
        max(abs(a - b) / abs(b) for a, b in zip(losses, losses64)),
        rel_err(d32["step9/center"].numpy(), store64["step9/center"].numpy())[0]))
    write_golden(os.path.join(out_dir, "vit_e2e.bin"), tensors)


def main():
    golden_main(gen_model, gen_pack, gen_e2e)


if __name__ == "__main__":
    main()
