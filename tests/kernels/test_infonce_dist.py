"""gathered_infonce on 2 real gloo processes (CPU) against the single-process loss on the concatenated batch.

Each rank projects its local inputs with a replicated linear layer (the "model"), computes its share of the loss and
backpropagates; gradients are then averaged over ranks exactly as DDP does. Checked: the mean over ranks of the
returned losses equals the global loss, each rank's feature gradients divided by the world size equal the global
feature gradients of its slice, and the rank-averaged gradients of the projection and of logit_scale equal the
single-process ones. Local batch sizes are unequal (5 and 8) and equal (6 and 6).
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ville.contrastive import GatheredInfoNCE, all_gather_with_grad, gathered_infonce
from ville_kernels import fused_infonce, infonce_ref

WORLD = 2
D_IN, D = 12, 24


def _global_batch(seed: int, total: int):
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(total, D_IN, generator=gen)
    text = video + 0.8 * torch.randn(total, D_IN, generator=gen)
    proj = torch.randn(D, D_IN, generator=gen) / D_IN ** 0.5
    log_scale = torch.tensor(2.3)
    row_groups = torch.randint(0, 4, (total,), generator=gen)
    col_groups = row_groups.clone()
    col_groups[::3] = torch.randint(0, 4, (len(col_groups[::3]),), generator=gen)
    return video, text, proj, log_scale, (row_groups, col_groups)


def _forward(proj, log_scale, video, text, loss_fn, **kw):
    q = F.normalize(video @ proj.T, dim=-1)
    p = F.normalize(text @ proj.T, dim=-1)
    q.retain_grad()
    p.retain_grad()
    loss = loss_fn(q, p, log_scale.exp(), **kw)
    return loss, q, p


def _close(a, b, what, tol=2e-5):
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    assert err <= tol * max(scale, 1e-3), f"{what}: max err {err:.3e} (max |expected| {scale:.3e})"


def _worker(rank: int, port: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        cases = [([5, 8], True, False), ([5, 8], False, False), ([5, 8], True, True), ([6, 6], True, True),
                 ([6, 6], False, True)]
        for index, (sizes, symmetric, use_groups) in enumerate(cases):
            what = f"sizes={sizes} symmetric={symmetric} groups={use_groups} rank={rank}"
            total = sum(sizes)
            video, text, proj, log_scale, groups = _global_batch(1000 + index, total)
            lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])

            # Single process, global batch (every rank computes it; it is the expected value).
            proj_g = proj.clone().requires_grad_()
            log_scale_g = log_scale.clone().requires_grad_()
            loss_g, q_g, p_g = _forward(proj_g, log_scale_g, video, text, fused_infonce, symmetric=symmetric,
                                        groups=groups if use_groups else None)
            loss_g.backward()
            loss_ref = infonce_ref((q_g.detach()).double(), p_g.detach().double(), log_scale.exp().double(),
                                   symmetric=symmetric, groups=groups if use_groups else None)
            _close(loss_g.detach().double(), loss_ref, f"{what}: fused vs reference on the global batch")

            # Distributed: local slice, replicated parameters, DDP-style gradient averaging.
            proj_l = proj.clone().requires_grad_()
            log_scale_l = log_scale.clone().requires_grad_()
            local_groups = (groups[0][lo:hi], groups[1][lo:hi]) if use_groups else None
            loss_fn = GatheredInfoNCE(symmetric=symmetric) if index % 2 else gathered_infonce
            kw = {} if index % 2 else {"symmetric": symmetric}
            loss_l, q_l, p_l = _forward(proj_l, log_scale_l, video[lo:hi], text[lo:hi], loss_fn,
                                        groups=local_groups, **kw)
            loss_l.backward()

            mean_loss = loss_l.detach().clone()
            dist.all_reduce(mean_loss)
            _close(mean_loss / WORLD, loss_g.detach(), f"{what}: mean over ranks of the loss")
            _close(q_l.grad / WORLD, q_g.grad[lo:hi], f"{what}: d loss / d q (local slice)")
            _close(p_l.grad / WORLD, p_g.grad[lo:hi], f"{what}: d loss / d p (local slice)")
            for name, local, single in (("projection", proj_l.grad, proj_g.grad),
                                        ("log logit_scale", log_scale_l.grad, log_scale_g.grad)):
                averaged = local.clone()
                dist.all_reduce(averaged)
                _close(averaged / WORLD, single, f"{what}: DDP-averaged d loss / d {name}")

        # all_gather_with_grad on its own: values in rank order, gradient = sum over ranks of the incoming grads.
        x = torch.full((rank + 1, 3), float(rank + 1), requires_grad=True)
        gathered = all_gather_with_grad(x)
        assert gathered.shape == (3, 3) and gathered[0].eq(1).all() and gathered[1:].eq(2).all(), gathered
        (gathered * torch.arange(1.0, 4.0)[:, None] * (rank + 1)).sum().backward()
        expected = torch.arange(1.0, 4.0)[sum(range(1, rank + 1)): sum(range(1, rank + 2))] * 3  # (1 + 2) ranks
        assert torch.equal(x.grad, expected[:, None].expand(rank + 1, 3)), x.grad
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_gathered_infonce_matches_single_process_on_two_gloo_ranks(monkeypatch):
    monkeypatch.setenv("VILLE_KERNELS", "torch")  # the children inherit it: the chunked CPU path on both ranks
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # fork, not spawn: the children inherit the imported modules (importing `ville` costs seconds per process) and
    # set one intra-op thread before any parallel region, so the parent's thread pool is never touched after fork.
    mp.start_processes(_worker, args=(_free_port(),), nprocs=WORLD, join=True, start_method="fork")


def test_single_process_falls_back_to_fused_infonce():
    assert not dist.is_initialized()
    q = F.normalize(torch.randn(9, 16), dim=-1)
    p = F.normalize(torch.randn(9, 16), dim=-1)
    s = torch.tensor(20.0)
    assert torch.equal(gathered_infonce(q, p, s), fused_infonce(q, p, s))
    assert torch.equal(GatheredInfoNCE(symmetric=False)(q, p, s), fused_infonce(q, p, s, symmetric=False))
    assert all_gather_with_grad(q) is q
