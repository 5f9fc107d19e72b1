#!/usr/bin/env python3
"""Golden data for the DINO objective, written from a PyTorch reference.

Run with a Python that has PyTorch (1.13 was used) and numpy:

    /usr/bin/python3 tests/golden/gen/gen_objective.py [--out tests/golden/data]

The reference below restates the official facebookresearch/dino code (dino-spec sections
2, 3, 4.4-4.6): DINOHead (nn.utils.weight_norm on last_layer, weight_g filled with 1 and
frozen when norm_last_layer), F.normalize (eps 1e-12), DINOLoss with the multi-crop pairing
and a single-process update_center (sum / (2B), then EMA), utils.cosine_scheduler (numpy),
the teacher temperature schedule, the EMA update, torch.optim.AdamW with the two parameter
groups of utils.get_params_groups, utils.clip_gradients (per tensor) and
utils.cancel_gradients_last_layer.

File format (".bin", little endian; tests/golden/golden.hpp reads it):

    char[4]  magic "DGLD"
    u32      version (1)
    u32      number of tensors
    per tensor:
      u32    name length, then the name bytes (UTF-8, no terminator)
      u32    dtype: 0 = float32, 1 = float64
      u32    ndim (0 for a scalar)
      i64    dims[ndim]
      data   prod(dims) values of the dtype, row-major

Files written (all cases fp32 unless said otherwise, torch.manual_seed fixed):
  head.bin       DINOHead forward + backward, loss = (out * R).sum(); three heads under
                 prefixes "nll1/" (norm_last_layer True), "nll0/" (False, learned g != 1),
                 "nl1/" (nlayers 1, norm_last_layer True).
  loss.bin       DINOLoss with centering: "mc/" 2 global + 4 local crops, "g2/" 2 + 0.
  ema.bin        teacher EMA: "vec_a/" (m 0.996), "vec_b/" (m 0.9), "head/" (a whole head).
  schedules.bin  cosine schedules and the teacher temperature table, float64.
  adamw.bin      5 AdamW steps with parameter groups, clipping and last-layer freezing:
                 "nll0/" (norm_last_layer False) and "nll1/" (True).
"""
import argparse
import math
import os
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MAGIC = b"DGLD"
VERSION = 1
DT_F32, DT_F64 = 0, 1


def write_golden(path, tensors):
    """tensors: list of (name, array-like); float64 numpy arrays are stored as f64, all else f32."""
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<II", VERSION, len(tensors)))
        seen = set()
        for name, value in tensors:
            assert name not in seen, name
            seen.add(name)
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float32, (name, value.dtype)
                arr = value.detach().cpu().numpy()
            else:
                arr = np.asarray(value)
            if arr.dtype == np.float64:
                dt, arr = DT_F64, arr.astype("<f8")
            else:
                assert arr.dtype == np.float32, (name, arr.dtype)
                dt, arr = DT_F32, arr.astype("<f4")
            nb = name.encode("utf-8")
            f.write(struct.pack("<I", len(nb)))
            f.write(nb)
            f.write(struct.pack("<II", dt, arr.ndim))
            f.write(struct.pack("<%dq" % arr.ndim, *arr.shape))
            f.write(np.ascontiguousarray(arr).tobytes())
    print("wrote %s (%d tensors, %d bytes)" % (path, len(tensors), os.path.getsize(path)))


def f32(x):
    return np.asarray(x, dtype=np.float32)


def f64(x):
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- reference
class DINOHead(nn.Module):
    """vision_transformer.DINOHead, use_bn = False (dino-spec section 2)."""

    def __init__(self, in_dim, out_dim, norm_last_layer=True, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def make_head(cfg, norm_last_layer, nlayers, perturb_g):
    """A head with test-friendly parameters: the reference init gives tiny activations (std
    0.02, zero biases), so the MLP weights are redrawn N(0, 1/fan_in) and the biases N(0, 0.1^2)
    (forward exercises the GELU nonlinearity and the biases). weight_v keeps its default init.
    With perturb_g, the learned g is drawn U(0.5, 1.5) instead of 1."""
    h = DINOHead(cfg["in_dim"], cfg["K"], norm_last_layer=norm_last_layer, nlayers=nlayers,
                 hidden_dim=cfg["hidden"], bottleneck_dim=cfg["bn"])
    with torch.no_grad():
        for m in h.mlp.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features))
                m.bias.normal_(0.0, 0.1)
        if perturb_g:
            h.last_layer.weight_g.uniform_(0.5, 1.5)
    return h


def state(h):
    # state_dict names: mlp.0.weight ... last_layer.weight_g, last_layer.weight_v
    return [(k, v.detach().clone()) for k, v in h.state_dict().items()]


def dino_loss(student_output, teacher_output, center, ncrops, student_temp, teacher_temp, center_momentum):
    """main_dino.DINOLoss.forward + update_center (one process: world_size 1)."""
    student_out = student_output / student_temp
    student_out = student_out.chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1)
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
    with torch.no_grad():
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / (len(teacher_output) * 1)
        new_center = center * center_momentum + batch_center * (1 - center_momentum)
    return total_loss, new_center


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """utils.cosine_scheduler."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
    """DINOLoss.__init__'s per-epoch table."""
    return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                           np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))


def get_params_groups(model):
    """utils.get_params_groups."""
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
    """utils.clip_gradients: per tensor. Returns the names of the clipped tensors."""
    clipped = []
    for name, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
                clipped.append(name)
    return clipped


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """utils.cancel_gradients_last_layer."""
    if epoch >= freeze_last_layer:
        return
    for n, p in model.named_parameters():
        if "last_layer" in n:
            p.grad = None


# ----------------------------------------------------------------------------- cases
CFG = dict(in_dim=24, hidden=32, bn=16, K=64, B=3, n_local=4)


def gen_head(out_dir):
    torch.manual_seed(1)
    cfg = CFG
    n = cfg["B"] * (2 + cfg["n_local"])  # every crop of the batch through the head at once
    tensors = []
    for prefix, nll, nlayers, perturb in (("nll1/", True, 3, False), ("nll0/", False, 3, True), ("nl1/", True, 1, False)):
        h = make_head(cfg, nll, nlayers, perturb)
        x = torch.randn(n, cfg["in_dim"], requires_grad=True)
        R = torch.randn(n, cfg["K"])
        y = h(x)
        loss = (y * R).sum()
        loss.backward()
        tensors.append((prefix + "config", f64([cfg["in_dim"], cfg["hidden"], cfg["bn"], cfg["K"], nlayers, int(nll)])))
        for k, v in state(h):
            tensors.append((prefix + "param/" + k, v))
        tensors += [(prefix + "x", x.detach()), (prefix + "y", y.detach()), (prefix + "dy", R), (prefix + "dx", x.grad)]
        for k, p in h.named_parameters():
            if p.requires_grad:
                tensors.append((prefix + "grad/" + k, p.grad))
            else:
                assert p.grad is None
    write_golden(os.path.join(out_dir, "head.bin"), tensors)


def gen_loss(out_dir):
    torch.manual_seed(2)
    B, K = CFG["B"], CFG["K"]
    tensors = []
    for prefix, n_local, tau_t in (("mc/", CFG["n_local"], 0.05), ("g2/", 0, 0.04)):
        ncrops = 2 + n_local
        tau_s, m_c = 0.1, 0.9
        # Head outputs with norm_last_layer are cosines: keep the logits in about [-1, 1].
        teacher = (torch.rand(2 * B, K) * 2 - 1)
        student = (torch.rand(ncrops * B, K) * 2 - 1).requires_grad_(True)
        center = torch.randn(1, K) * 0.2
        loss, new_center = dino_loss(student, teacher, center, ncrops, tau_s, tau_t, m_c)
        loss.backward()
        q = F.softmax((teacher - center) / tau_t, dim=-1)
        entropy = (-(q * F.log_softmax((teacher - center) / tau_t, dim=-1)).sum(-1)).mean()
        tensors += [
            (prefix + "hyper", f64([ncrops, 2, tau_s, tau_t, m_c])),
            (prefix + "teacher", teacher), (prefix + "student", student.detach()),
            (prefix + "center", center.reshape(K)),
            (prefix + "targets", q), (prefix + "teacher_entropy", entropy.detach()),
            (prefix + "loss", loss.detach()), (prefix + "dstudent", student.grad),
            (prefix + "new_center", new_center.reshape(K)),
        ]
    write_golden(os.path.join(out_dir, "loss.bin"), tensors)


def ema_(teacher_params, student_params, m):
    # main_dino.train_one_epoch, EMA update for the teacher
    with torch.no_grad():
        for param_q, param_k in zip(student_params, teacher_params):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def gen_ema(out_dir):
    torch.manual_seed(3)
    tensors = []
    for prefix, m in (("vec_a/", 0.996), ("vec_b/", 0.9)):
        t = torch.randn(1000)
        s = t + 0.1 * torch.randn(1000)
        t0 = t.clone()
        ema_([t], [s], m)
        tensors += [(prefix + "m", f64(m)), (prefix + "teacher", t0), (prefix + "student", s), (prefix + "out", t)]
    # A whole head: the EMA walks parameters(), frozen weight_g included. Student with a learned
    # g (norm_last_layer False); the teacher is a head of the same shapes with other values.
    cfg = CFG
    m = 0.9991
    student = make_head(cfg, False, 3, True)
    teacher = make_head(cfg, False, 3, True)
    for k, v in state(teacher):
        tensors.append(("head/teacher/" + k, v))
    for k, v in state(student):
        tensors.append(("head/student/" + k, v))
    ema_(list(teacher.parameters()), list(student.parameters()), m)
    for k, v in state(teacher):
        tensors.append(("head/out/" + k, v))
    tensors.append(("head/m", f64(m)))
    write_golden(os.path.join(out_dir, "ema.bin"), tensors)


def gen_schedules(out_dir):
    tensors = []
    # (name, epochs, iters/epoch, batch, lr, min_lr, warmup, wd, wd_end, m_teacher, warm_tt, tt, warm_tt_epochs)
    configs = [
        ("a/", 10, 30, 64, 5e-4, 1e-6, 2, 0.04, 0.4, 0.996, 0.04, 0.07, 3),
        ("b/", 7, 13, 1024, 3e-4, 2e-6, 0, 0.04, 0.04, 0.9995, 0.04, 0.04, 0),
        ("c/", 5, 1, 32, 5e-4, 1e-6, 1, 0.1, 0.2, 0.99, 0.05, 0.06, 1),
    ]
    for (p, ep, ipe, bs, lr, min_lr, warm, wd, wd_end, mt, wtt, tt, wtte) in configs:
        tensors += [
            (p + "config", f64([ep, ipe, bs, lr, min_lr, warm, wd, wd_end, mt, wtt, tt, wtte])),
            (p + "lr", f64(cosine_scheduler(lr * bs / 256.0, min_lr, ep, ipe, warmup_epochs=warm))),
            (p + "wd", f64(cosine_scheduler(wd, wd_end, ep, ipe))),
            (p + "momentum", f64(cosine_scheduler(mt, 1.0, ep, ipe))),
            (p + "teacher_temp", f64(teacher_temp_schedule(wtt, tt, wtte, ep))),
        ]
    write_golden(os.path.join(out_dir, "schedules.bin"), tensors)


def gen_adamw(out_dir):
    torch.manual_seed(4)
    cfg = CFG
    clip, freeze_steps, n_steps = 3.0, 2, 5
    lrs = [1e-2, 2e-2, 1.5e-2, 8e-3, 4e-3]
    wds = [0.04, 0.1, 0.2, 0.3, 0.4]
    tensors = [("lr", f64(lrs)), ("wd", f64(wds)), ("hyper", f64([clip, freeze_steps, n_steps]))]
    for prefix, nll in (("nll0/", False), ("nll1/", True)):
        h = make_head(cfg, nll, 3, not nll)
        opt = torch.optim.AdamW(get_params_groups(h))  # betas (0.9, 0.999), eps 1e-8
        for k, v in state(h):
            tensors.append((prefix + "init/" + k, v))
        n_clipped = 0
        for step in range(n_steps):
            for i, g in enumerate(opt.param_groups):
                g["lr"] = lrs[step]
                if i == 0:
                    g["weight_decay"] = wds[step]
            opt.zero_grad(set_to_none=True)
            for k, p in h.named_parameters():
                if not p.requires_grad:
                    continue
                # Per-tensor scales so that clip 3.0 fires on some tensors and not on others.
                scale = [0.02, 0.3, 1.0][int(torch.randint(0, 3, ()).item())]
                p.grad = torch.randn_like(p) * scale
                tensors.append((prefix + "step%d/grad/%s" % (step, k), p.grad.clone()))
            clipped = clip_gradients(h, clip)
            n_clipped += len(clipped)
            cancel_gradients_last_layer(step, h, freeze_steps)  # "epoch" = step: frozen for steps 0, 1
            opt.step()
            for k, v in state(h):
                tensors.append((prefix + "step%d/param/%s" % (step, k), v))
            tensors.append((prefix + "step%d/clipped" % step, f64(len(clipped))))
        print("adamw %s: %d tensor clips over %d steps" % (prefix, n_clipped, n_steps))
    write_golden(os.path.join(out_dir, "adamw.bin"), tensors)


def golden_main(*gens):
    """The generators' command line: --out DIR (default tests/golden/data), one thread, float32;
    then each gen(out_dir) in turn."""
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.normpath(os.path.join(here, "..", "data")))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    print("torch", torch.__version__, "numpy", np.__version__)
    for gen in gens:
        gen(args.out)


def main():
    golden_main(gen_head, gen_loss, gen_ema, gen_schedules, gen_adamw)


if __name__ == "__main__":
    main()
