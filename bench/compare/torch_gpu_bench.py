#!/usr/bin/env python3
"""The PyTorch side of bench/bench_cuda_dino.cu: the same three workloads in PyTorch eager on
the same GPU, fp32 (TF32 off) and TF32. The model code, DINOLoss and the utils.py helpers are
imported from bench/compare/torch_bench.py (its restatement of the official
facebookresearch/dino code); the training step below is main_dino.train_one_epoch's loop
body, as torch_bench.bench_train states it, with the crops moved to the device.

  train_vits16  DINO ViT-S/16 (student drop_path_rate 0.1), 2 x 224 + 10 x 96 crops, batch 64,
                DINOHead K 65536, hidden 2048, bottleneck 256; clip_gradients(3.0), AdamW with
                get_params_groups, EMA teacher, DINOLoss with centering.
  train_small   the SMALL step of torch_bench.py: ViT D 192, depth 6, 3 heads, patch 4,
                1 x 28 x 28, 2 x 28 + 6 x 12 crops, K 4096, hidden 512, bottleneck 128, batch 64.
  infer_vits16  ViT-S/16 inference (eval(), no_grad), batch 128 at 224 x 224, images on the device.

Both training steps: freeze_last_layer 0 (every step trains the whole model, as bench_cuda_dino),
schedules over 100 epochs x 100 iterations. The crops are drawn once before timing into pinned
host memory (two sets alternate) and each step copies them with .cuda(non_blocking=True), as
main_dino does with its pin_memory DataLoader. cudnn.benchmark = True, as main_dino sets it.
As in the official code, clip_gradients reads every gradient norm back (.item()) and the loss
is read back each step: those synchronisations are part of the step.

fp32: torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False;
tf32: both True. Each workload: 3 warm-up steps, then the median of 10 timed steps, each
followed by torch.cuda.synchronize(). peak_device_MiB = torch.cuda.max_memory_allocated
(after reset_peak_memory_stats before the model is built: parameters, optimizer state,
activations, cuBLAS workspaces that go through the caching allocator); peak_reserved_MiB is
max_memory_reserved. Neither counts the CUDA context.

--compile MODE wraps the student and the teacher (training) or the model (inference) in
torch.compile(mode=MODE) (default, reduce-overhead: CUDA graphs, max-autotune); the step
around them stays eager, as the official code's. With reduce-overhead each training step
first calls torch.compiler.cudagraph_mark_step_begin() and clones the teacher's output before
the student runs: CUDA graph trees may start a new generation at the student's forward and
reuse the memory of the teacher's output, which the loss still reads ("accessing tensor
output of CUDAGraphs that has been overwritten by a subsequent run", seen on an H200 with
torch 2.11). The clone copies batch x 2 x K values once a step. The workload is then printed as
<workload>+compile_<mode> (compile_default, compile_reduce-overhead, ...), and the warm-up
steps, which run the compilation, are not timed.

Usage: torch_gpu_bench.py [--device cuda|cpu] [--only NAME] [--precision fp32|tf32|bf16]
                          [--batch N] [--reps R] [--warmup W] [--compile MODE]
  --device cpu is a smoke test of the script's logic (no timings worth reading), e.g.
  torch_gpu_bench.py --device cpu --batch 2 --reps 1 --warmup 1 --only train_small
Prints one line per workload and precision:
  torch <workload> precision=<fp32|tf32|bf16> images_per_s=... ms_per_step=... peak_device_MiB=... batch=...
Exits 77 when --device cuda and no CUDA device is available.
"""
import argparse
import gc
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import torch_bench as tb  # noqa: E402  (also silences the weight_norm deprecation warnings)

WORKLOADS = ("train_vits16", "train_small", "infer_vits16")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    sync(device)
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms), min(ms), max(ms)


def set_precision(precision, device):
    tf32 = precision == "tf32"  # bf16: autocast's bf16 GEMMs, TF32 off for anything left in fp32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if device.type == "cuda":  # the flags as PyTorch reads them back
        print("# %s: torch.backends.cuda.matmul.allow_tf32=%s torch.backends.cudnn.allow_tf32=%s"
              % (precision, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
              flush=True)


def autocast(precision, device):
    """bf16: autocast to bfloat16 around the forwards and the loss (the official code's
    autocast block; the reference table's "bf16 autocast"); otherwise no autocast."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device):
    if device.type != "cuda":
        return 0.0, 0.0
    return (torch.cuda.max_memory_allocated(device) / 2.0 ** 20, torch.cuda.max_memory_reserved(device) / 2.0 ** 20)


def compiled(module, args):
    """module, or torch.compile(module, mode=args.compile) with --compile."""
    return torch.compile(module, mode=args.compile) if args.compile else module


def label(name, args):
    return name + ("+compile_" + args.compile if args.compile else "")


def emit(name, precision, batch, timing, device, args, extra=""):
    med, lo, hi = timing
    alloc, reserved = peak_mib(device)
    print("torch %s precision=%s images_per_s=%.2f ms_per_step=%.3f peak_device_MiB=%.1f batch=%d min_ms=%.3f "
          "max_ms=%.3f reps=%d peak_reserved_MiB=%.1f%s"
          % (name, precision, batch * 1e3 / med, med, alloc, batch, lo, hi, args.reps, reserved, extra), flush=True)


# ----------------------------------------------------------------------------- training steps
SPECS = {
    # name: (backbone factory, embed dim, batch, global px, local px, n_local, K, hidden, bottleneck, channels)
    "train_vits16": (lambda **kw: tb.vit_small(16, **kw), 384, 64, 224, 96, 10, 65536, 2048, 256, 3),
    "train_small": (lambda **kw: tb.vit_small28(4, **kw), 192, 64, 28, 12, 6, 4096, 512, 128, 1),
}


def bench_train(name, precision, device, args):
    make_backbone, D, B, G, L, n_local, K, hidden, bottleneck, C = SPECS[name]
    if args.batch:
        B = args.batch
    epochs, iters_per_epoch = 100, 100
    reset_memory(device)
    torch.manual_seed(0)
    student = tb.MultiCropWrapper(make_backbone(drop_path_rate=0.1),
                                  tb.DINOHead(D, K, use_bn=False, norm_last_layer=True, hidden_dim=hidden,
                                              bottleneck_dim=bottleneck))
    teacher = tb.MultiCropWrapper(make_backbone(), tb.DINOHead(D, K, False, hidden_dim=hidden,
                                                               bottleneck_dim=bottleneck))
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    # the optimizer, the clipping and the EMA read the modules' own parameters
    student_fwd, teacher_fwd = compiled(student, args), compiled(teacher, args)
    dino_loss = tb.DINOLoss(K, n_local + 2, 0.04, 0.04, 0, epochs).to(device)
    params_groups = tb.get_params_groups(student)
    optimizer = torch.optim.AdamW(params_groups)  # foreach left at PyTorch's default
    lr_schedule = tb.cosine_scheduler(5e-4 * B / 256.0, 1e-6, epochs, iters_per_epoch, warmup_epochs=10)
    wd_schedule = tb.cosine_scheduler(0.04, 0.4, epochs, iters_per_epoch)
    momentum_schedule = tb.cosine_scheduler(0.996, 1.0, epochs, iters_per_epoch)
    g = torch.Generator().manual_seed(1)
    pin = device.type == "cuda"
    crop_sets = []
    for _ in range(2):
        crops = [torch.randn(B, C, G, G, generator=g) for _ in range(2)]
        crops += [torch.randn(B, C, L, L, generator=g) for _ in range(n_local)]
        crop_sets.append([c.pin_memory() if pin else c for c in crops])
    state = {"it": 0, "loss": float("nan")}
    graphs = args.compile == "reduce-overhead"

    def step():
        it = state["it"]
        epoch = it // iters_per_epoch
        images = [im.to(device, non_blocking=True) for im in crop_sets[it % 2]]
        for i, param_group in enumerate(optimizer.param_groups):
            param_group["lr"] = lr_schedule[it]
            if i == 0:
                param_group["weight_decay"] = wd_schedule[it]
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(precision, device):
            teacher_output = teacher_fwd(images[:2])
            if graphs:
                teacher_output = teacher_output.clone()
            student_output = student_fwd(images)
            loss = dino_loss(student_output, teacher_output, epoch)
        if not math.isfinite(loss.item()):
            sys.exit("Loss is {}, stopping training".format(loss.item()))
        optimizer.zero_grad()
        loss.backward()
        tb.clip_gradients(student, 3.0)
        tb.cancel_gradients_last_layer(epoch, student, 0)
        optimizer.step()
        with torch.no_grad():
            m = momentum_schedule[it]
            for param_q, param_k in zip(student.parameters(), teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        state["loss"] = loss.item()
        state["it"] = it + 1

    t = timed(step, device, args.warmup, args.reps)
    emit(label(name, args), precision, B, t, device, args, " loss=%.4f" % state["loss"])


# ----------------------------------------------------------------------------- inference
def bench_infer(name, precision, device, args):
    B = args.batch or 128
    reset_memory(device)
    torch.manual_seed(0)
    model = tb.vit_small(16).to(device).eval()
    fwd = compiled(model, args)
    x = torch.randn(B, 3, 224, 224, device=device)

    def call():
        with torch.no_grad(), autocast(precision, device):
            y = fwd(x)
        assert y.shape == (B, 384)

    t = timed(call, device, args.warmup, args.reps)
    emit(label(name, args), precision, B, t, device, args)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of the logic)")
    ap.add_argument("--only", choices=WORKLOADS, default=None)
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default=None, help="default: all three")
    ap.add_argument("--batch", type=int, default=0, help="override every workload's batch")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU smoke test; 0: default)")
    ap.add_argument("--compile", choices=["default", "reduce-overhead", "max-autotune"], default=None,
                    help="torch.compile the models with this mode (default: eager)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("SKIPPED: torch_gpu_bench.py: torch %s sees no CUDA device; nothing was measured" % torch.__version__)
            sys.exit(77)
        torch.backends.cudnn.benchmark = True  # as main_dino
        print("# torch %s on %s, warmup %d, median of %d steps"
              % (torch.__version__, torch.cuda.get_device_name(device), args.warmup, args.reps), flush=True)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    precisions = [args.precision] if args.precision else ["fp32", "tf32", "bf16"]
    failed = 0
    for precision in precisions:
        set_precision(precision, device)
        for name in WORKLOADS:
            if args.only and args.only != name:
                continue
            try:
                if name.startswith("train"):
                    bench_train(name, precision, device, args)
                else:
                    bench_infer(name, precision, device, args)
            except RuntimeError as e:  # out of memory, say: report it and go on
                failed += 1
                print("torch %s precision=%s failed" % (name, precision), flush=True)
                print("torch_gpu_bench.py: %s (%s): %s" % (name, precision, e), file=sys.stderr, flush=True)
                if args.compile:  # torch.compile's own errors say little without their stack
                    traceback.print_exc(file=sys.stderr)
            reset_memory(device)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
