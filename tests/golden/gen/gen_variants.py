#!/usr/bin/env python3
"""Golden data for the variant parts (dino-spec section 8), written from PyTorch references.

Run with a Python that has PyTorch (1.13 was used) and numpy:

    /usr/bin/python3 tests/golden/gen/gen_variants.py [--out tests/golden/data]

Writes variants.bin (format: see gen_objective.py / tests/golden/golden.hpp), all float32
unless said otherwise, torch.manual_seed fixed. Each reference restates the official code:

  sk/, sk_b/  DINOv2 DINOLoss.sinkhorn_knopp_teacher (world_size 1, n_iterations 3), verbatim.
  mse/        BYOL's loss_fn (2 - 2 * (F.normalize(x) * F.normalize(y)).sum(-1)) on the DINO
              crop pairs (student crop v against teacher global crop i != v), averaged over
              the pairs as DINOLoss averages its terms.
  infonce/    MoCo v2 (moco/builder.py): q = normalize(student), k = normalize(teacher),
              l_pos, l_neg against the queue (stored here as rows [M, K], MoCo keeps [K, M]),
              logits / T, cross-entropy with label 0; averaged over the crop pairs. Then
              _dequeue_and_enqueue with the normalised keys of both global crops (ptr 0).
  ntx2/       SimCLR's add_contrastive_loss (google-research/simclr, objective.py) restated:
              logits_ab = h1 h2^T / T, logits_aa = h1 h1^T / T - LARGE_NUM * I (and the same
              for b), loss_a + loss_b; stored as (loss_a + loss_b) / 2, the mean over the 2B
              anchors (dino's nt_xent averages the pairs).
  ntx4/       NT-Xent on 2 global + 2 local crops: anchor (v, b) against positive (i, b),
              i < 2, i != v, denominator over every other row; averaged over the pairs.

Entries per case: `hyper` (float64), inputs, `loss` (scalar), `dstudent` (d loss / d student
rows, autograd), and for sk `targets`; for infonce `queue` and `new_queue`.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_objective import golden_main, write_golden  # noqa: E402


# ---- DINOv2: dinov2/loss/dino_clstoken_loss.py, world_size 1 ----------------------------
@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output, teacher_temp, n_iterations=3):
    teacher_output = teacher_output.float()
    world_size = 1
    Q = torch.exp(teacher_output / teacher_temp).t()  # Q is K-by-B for consistency with notations from our paper
    B = Q.shape[1] * world_size  # number of samples to assign
    K = Q.shape[0]  # how many prototypes
    # make the matrix sums to 1
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for it in range(n_iterations):
        # normalize each row: total weight per prototype must be 1/K
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        # normalize each column: total weight per sample must be 1/B
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B  # the columns must sum to 1 so that Q is an assignment
    return Q.t()


def pairs(n_crops, n_global):
    return [(i, v) for i in range(n_global) for v in range(n_crops) if v != i]


# ---- BYOL: byol_pytorch loss_fn -----------------------------------------------------------
def byol_loss_fn(x, y):
    x = F.normalize(x, dim=-1, p=2)
    y = F.normalize(y, dim=-1, p=2)
    return 2 - 2 * (x * y).sum(dim=-1)


def mse_pairs(s, t, n_crops, n_global):
    sc, tc = s.chunk(n_crops), t.chunk(n_global)
    terms = [byol_loss_fn(sc[v], tc[i]).mean() for i, v in pairs(n_crops, n_global)]
    return sum(terms) / len(terms)


# ---- MoCo v2: moco/builder.py -------------------------------------------------------------
def moco_loss(q, k, queue_rows, T):
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1).detach()
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, queue_rows.t().clone().detach()])
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, labels)


def info_nce_pairs(s, t, queue_rows, n_crops, n_global, T):
    sc, tc = s.chunk(n_crops), t.chunk(n_global)
    terms = [moco_loss(sc[v], tc[i], queue_rows, T) for i, v in pairs(n_crops, n_global)]
    return sum(terms) / len(terms)


@torch.no_grad()
def dequeue_and_enqueue(queue_rows, ptr, keys):
    batch_size = keys.shape[0]
    K = queue_rows.shape[0]
    assert K % batch_size == 0  # as MoCo
    queue_rows = queue_rows.clone()
    queue_rows[ptr:ptr + batch_size, :] = keys  # MoCo: queue[:, ptr:ptr + bs] = keys.T
    return queue_rows, (ptr + batch_size) % K


# ---- SimCLR: objective.py add_contrastive_loss (one replica) ------------------------------
LARGE_NUM = 1e9


def simclr_loss(h1, h2, T):
    h1, h2 = F.normalize(h1, dim=-1), F.normalize(h2, dim=-1)
    B = h1.shape[0]
    labels = torch.arange(B)
    masks = torch.eye(B)
    logits_aa = h1 @ h1.t() / T - masks * LARGE_NUM
    logits_bb = h2 @ h2.t() / T - masks * LARGE_NUM
    logits_ab = h1 @ h2.t() / T
    logits_ba = h2 @ h1.t() / T
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


def nt_xent_pairs(s, n_crops, n_global, T):
    N = s.shape[0]
    B = N // n_crops
    z = F.normalize(s, dim=-1)
    S = z @ z.t() / T
    S = S.masked_fill(torch.eye(N, dtype=torch.bool), float("-inf"))
    logp = S.log_softmax(dim=1)  # over k != anchor
    terms = []
    for i, v in pairs(n_crops, n_global):
        rows = torch.arange(B)
        terms.append(-logp[v * B + rows, i * B + rows].mean())
    return sum(terms) / len(terms)


def f64(x):
    return np.asarray(x, dtype=np.float64)


def grad_of(fn, s):
    s = s.clone().requires_grad_(True)
    loss = fn(s)
    loss.backward()
    return loss.detach(), s.grad.detach()


def gen(out):
    T = []
    # Sinkhorn-Knopp
    for prefix, seed, R, K, tau, scale in [("sk/", 1, 8, 16, 0.05, 0.5), ("sk_b/", 2, 6, 5, 0.1, 1.0)]:
        torch.manual_seed(seed)
        t = torch.randn(R, K) * scale
        q = sinkhorn_knopp_teacher(t, tau)
        tq = t.double() / tau
        Q = torch.exp(tq).t()
        Q /= Q.sum()
        for _ in range(3):
            Q /= Q.sum(1, keepdim=True)
            Q /= K
            Q /= Q.sum(0, keepdim=True)
            Q /= R
        q64 = (Q * R).t()
        err = ((q.double() - q64).norm() / q64.norm()).item()
        print("%s fp32 vs fp64 SK: rel-norm %.2e; row sums - 1: max %.1e" % (prefix, err, (q.sum(1) - 1).abs().max().item()))
        assert err < 1e-5
        T += [(prefix + "hyper", f64([tau, 3])), (prefix + "teacher", t), (prefix + "targets", q)]

    # MSE on 2 global + 2 local crops
    torch.manual_seed(3)
    n_crops, n_global, B, K = 4, 2, 3, 16
    s = torch.randn(n_crops * B, K)
    t = torch.randn(n_global * B, K) * 2.0
    loss, ds = grad_of(lambda x: mse_pairs(x, t, n_crops, n_global), s)
    loss64, ds64 = grad_of(lambda x: mse_pairs(x, t.double(), n_crops, n_global), s.double())
    print("mse/ loss %.6f; fp32 vs fp64 grad rel-norm %.2e" % (loss.item(), ((ds.double() - ds64).norm() / ds64.norm()).item()))
    T += [("mse/hyper", f64([n_crops, n_global])), ("mse/student", s), ("mse/teacher", t), ("mse/loss", loss),
          ("mse/dstudent", ds)]

    # InfoNCE with a full queue (24 keys), 2 global + 1 local crop
    torch.manual_seed(4)
    n_crops, n_global, B, K, M, tau = 3, 2, 4, 16, 24, 0.2
    s = torch.randn(n_crops * B, K)
    t = torch.randn(n_global * B, K)
    queue = F.normalize(torch.randn(M, K), dim=1)  # MoCo: randn, normalize(dim=0) of [K, M]
    loss, ds = grad_of(lambda x: info_nce_pairs(x, t, queue, n_crops, n_global, tau), s)
    loss64, ds64 = grad_of(lambda x: info_nce_pairs(x, t.double(), queue.double(), n_crops, n_global, tau), s.double())
    print("infonce/ loss %.6f; fp32 vs fp64: loss %.1e, grad rel-norm %.2e" % (
        loss.item(), abs(loss.item() - loss64.item()) / loss64.item(), ((ds.double() - ds64).norm() / ds64.norm()).item()))
    new_queue, ptr = dequeue_and_enqueue(queue, 0, F.normalize(t, dim=1))
    assert ptr == 8
    T += [("infonce/hyper", f64([n_crops, n_global, M, tau])), ("infonce/student", s), ("infonce/teacher", t),
          ("infonce/queue", queue), ("infonce/loss", loss), ("infonce/dstudent", ds), ("infonce/new_queue", new_queue)]

    # NT-Xent: SimCLR with 2 views
    torch.manual_seed(5)
    B, K, tau = 6, 16, 0.1
    s = torch.randn(2 * B, K)
    loss, ds = grad_of(lambda x: simclr_loss(x[:B], x[B:], tau) / 2, s)
    generic = nt_xent_pairs(s, 2, 2, tau)
    print("ntx2/ loss %.6f (SimCLR (loss_a + loss_b) / 2); generic pair form %.6f" % (loss.item(), generic.item()))
    assert abs(generic.item() - loss.item()) < 1e-5 * loss.item()
    T += [("ntx2/hyper", f64([2, 2, tau])), ("ntx2/student", s), ("ntx2/loss", loss), ("ntx2/dstudent", ds)]

    # NT-Xent on 2 global + 2 local crops
    torch.manual_seed(6)
    n_crops, n_global, B, K, tau = 4, 2, 3, 16, 0.2
    s = torch.randn(n_crops * B, K)
    loss, ds = grad_of(lambda x: nt_xent_pairs(x, n_crops, n_global, tau), s)
    loss64, ds64 = grad_of(lambda x: nt_xent_pairs(x, n_crops, n_global, tau), s.double())
    print("ntx4/ loss %.6f; fp32 vs fp64 grad rel-norm %.2e" % (loss.item(), ((ds.double() - ds64).norm() / ds64.norm()).item()))
    T += [("ntx4/hyper", f64([n_crops, n_global, tau])), ("ntx4/student", s), ("ntx4/loss", loss), ("ntx4/dstudent", ds)]

    write_golden(os.path.join(out, "variants.bin"), T)


def main():
    golden_main(gen)


if __name__ == "__main__":
    main()
