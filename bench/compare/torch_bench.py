#!/usr/bin/env python3
"""The PyTorch side of bench/compare/run.sh: the same two workloads as bench/bench_vit.cpp,
eager fp32 on the CPU, with the thread count given (torch.set_num_threads).

  infer  ViT-S/16 inference (model.eval(), torch.no_grad()), batch 8 at 224 x 224.
  train  the SMALL DINO step: ViT D 192, depth 6, 3 heads, patch 4, 1 x 28 x 28 images,
         student drop_path_rate 0.1; 2 global crops of 28 px + 6 local crops of 12 px;
         DINOHead K 4096, hidden 512, bottleneck 128; batch 64. One iteration of
         main_dino.train_one_epoch without the data loader (the crops are drawn before timing,
         two sets alternate): schedules, teacher on the 2 global crops, student on all crops
         (MultiCropWrapper), DINOLoss with centering, zero_grad, backward, per-tensor
         clip_gradients (3.0), cancel_gradients_last_layer (freeze_last_layer 0: a no-op, as in
         bench_vit, so every step trains the whole model), AdamW with get_params_groups, EMA
         teacher update.

The model code restates the official facebookresearch/dino vision_transformer.py, utils.py
and main_dino.py (pre-norm blocks, qkv bias, LayerNorm eps 1e-6, exact GELU, bicubic position
resize by a scale factor with the +0.1 offset, DINOHead with nn.utils.weight_norm and a frozen
weight_g of 1, trunc_normal 0.02 init), as tests/golden/gen/gen_vit.py does for the golden
files.

Usage: torch_bench.py [--threads N] [--reps R] [--warmup W] [--only infer|train]
Prints one line per workload: "torch <workload> key=value ...", median of R timed calls.
"""
import argparse
import math
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")  # weight_norm deprecation, numpy not installed

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ----------------------------------------------------------------------------- the ViT
def drop_path(x, drop_prob: float = 0.0, training: bool = False):
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
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x, attn


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=act_layer, drop=drop)

    def forward(self, x, return_attention=False):
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = num_patches
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=(224,), patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, norm_layer=nn.LayerNorm, **kwargs):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size[0], patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        # we add a small number to avoid floating point error in the interpolation
        # see discussion at https://github.com/facebookresearch/dino/issues/8
        w0, h0 = w0 + 0.1, h0 + 0.1
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 0]


def vit_small(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
                             norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), **kwargs)


def vit_small28(patch_size=4, **kwargs):
    """dino::nn::vit_small28: D 192, depth 6, 3 heads, 1 x 28 x 28 images."""
    return VisionTransformer(img_size=[28], patch_size=patch_size, in_chans=1, embed_dim=192, depth=6, num_heads=3,
                             mlp_ratio=4, qkv_bias=True, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), **kwargs)


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        x = nn.functional.normalize(x, dim=-1, p=2)
        x = self.last_layer(x)
        return x


class MultiCropWrapper(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        # The official code takes the ends of the runs of equal crop sizes from
        # torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0); the same ends
        # as Python ints, so that torch.compile traces the loop without a Tensor.item() graph break.
        sizes = [inp.shape[-1] for inp in x]
        idx_crops = [i + 1 for i in range(len(sizes)) if i + 1 == len(sizes) or sizes[i + 1] != sizes[i]]
        start_idx, outputs = 0, []
        for end_idx in idx_crops:
            _out = self.backbone(torch.cat(x[start_idx:end_idx]))
            if isinstance(_out, tuple):
                _out = _out[0]
            outputs.append(_out)
            start_idx = end_idx
        return self.head(torch.cat(outputs))


class DINOLoss(nn.Module):
    """main_dino.DINOLoss, one process (update_center's all_reduce is the identity)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = [warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * i /
                                      max(1, warmup_teacher_temp_epochs - 1) for i in range(warmup_teacher_temp_epochs)]
        self.teacher_temp_schedule += [teacher_temp] * (nepochs - warmup_teacher_temp_epochs)

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
        batch_center = batch_center / len(teacher_output)  # world size 1
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


# ----------------------------------------------------------------------------- utils.py
def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    warmup_iters = warmup_epochs * niter_per_ep
    warm = [start_warmup_value + (base_value - start_warmup_value) * i / max(1, warmup_iters - 1)
            for i in range(warmup_iters)]
    n = epochs * niter_per_ep - warmup_iters
    return warm + [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / n)) for i in range(n)]


def get_params_groups(model):
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or len(param.shape) == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model, clip):
    norms = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


# ----------------------------------------------------------------------------- workloads
def timed(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms), min(ms), max(ms)


def autocast(args):
    """--precision bf16: CPU autocast to bfloat16 (matmuls and linear layers in bf16; softmax,
    LayerNorm and the loss in fp32 by autocast's own rules); fp32: no autocast."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")


def suffix(args):
    return "_bf16" if args.precision == "bf16" else ""


def bench_infer(args):
    torch.manual_seed(0)
    model = vit_small(16).eval()
    x = torch.randn(8, 3, 224, 224)

    def call():
        with torch.no_grad(), autocast(args):
            y = model(x)
        assert y.shape == (8, 384)

    med, lo, hi = timed(call, args.warmup, args.reps)
    print("torch infer vit_s16_224_b8" + suffix(args) + " threads=%d images_per_s=%.2f ms_per_step=%.2f min_ms=%.2f max_ms=%.2f reps=%d"
          % (args.threads, 8e3 / med, med, lo, hi, args.reps), flush=True)


def bench_train(args):
    B, n_local, K = 64, 6, 4096
    epochs, iters_per_epoch = 100, 100  # as bench_vit: a long schedule, warm-up 10 epochs
    torch.manual_seed(0)
    student = MultiCropWrapper(vit_small28(4, drop_path_rate=0.1),
                               DINOHead(192, K, use_bn=False, norm_last_layer=True, hidden_dim=512, bottleneck_dim=128))
    teacher = MultiCropWrapper(vit_small28(4), DINOHead(192, K, False, hidden_dim=512, bottleneck_dim=128))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = DINOLoss(K, n_local + 2, 0.04, 0.04, 0, epochs)
    params_groups = get_params_groups(student)
    optimizer = torch.optim.AdamW(params_groups)  # foreach left at PyTorch's default
    lr_schedule = cosine_scheduler(5e-4 * B / 256.0, 1e-6, epochs, iters_per_epoch, warmup_epochs=10)
    wd_schedule = cosine_scheduler(0.04, 0.4, epochs, iters_per_epoch)
    momentum_schedule = cosine_scheduler(0.996, 1.0, epochs, iters_per_epoch)
    g = torch.Generator().manual_seed(1)
    crop_sets = []
    for _ in range(2):
        crops = [torch.randn(B, 1, 28, 28, generator=g) for _ in range(2)]
        crops += [torch.randn(B, 1, 12, 12, generator=g) for _ in range(n_local)]
        crop_sets.append(crops)
    state = {"it": 0, "loss": float("nan")}

    def step():
        it = state["it"]
        epoch = it // iters_per_epoch
        images = crop_sets[it % 2]
        for i, param_group in enumerate(optimizer.param_groups):
            param_group["lr"] = lr_schedule[it]
            if i == 0:
                param_group["weight_decay"] = wd_schedule[it]
        with autocast(args):  # the official code's autocast block: both forwards and the loss
            teacher_output = teacher(images[:2])
            student_output = student(images)
            loss = dino_loss(student_output, teacher_output, epoch)
        if not math.isfinite(loss.item()):
            sys.exit("Loss is {}, stopping training".format(loss.item()))
        optimizer.zero_grad()
        loss.backward()
        clip_gradients(student, 3.0)
        cancel_gradients_last_layer(epoch, student, 0)
        optimizer.step()
        with torch.no_grad():
            m = momentum_schedule[it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        state["loss"] = loss.item()
        state["it"] = it + 1

    med, lo, hi = timed(step, args.warmup, args.reps)
    print("torch train small28_b64" + suffix(args) + " threads=%d images_per_s=%.2f ms_per_step=%.1f min_ms=%.1f max_ms=%.1f reps=%d "
          "loss=%.4f" % (args.threads, B * 1e3 / med, med, lo, hi, args.reps, state["loss"]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", choices=["infer", "train"], default=None)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "infer"):
        bench_infer(args)
    if args.only in (None, "train"):
        bench_train(args)


if __name__ == "__main__":
    main()
