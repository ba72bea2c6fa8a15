"""gathered_infonce on 2 real gloo processes (CPU) against the single-process loss on the concatenated batch.

Each rank projects its local inputs with a replicated linear layer (the "model"), computes its share of the loss and
backpropagates; gradients are then averaged over ranks exactly as DDP does. Checked: the mean over ranks of the
returned losses equals the global loss, each rank's feature gradients divided by the world size equal the global
feature gradients of its slice, and the rank-averaged gradients of the projection and of logit_scale equal the
single-process ones. Local batch sizes are unequal (5 and 8) and equal (6 and 6).

The symmetric loss runs in 4 passes (one forward and one backward tile per rank, column statistics all-reduced):
`_worker_4pass` checks it on 2 and 3 ranks against an fp64 reference of every rank's share, with uneven batches, a
rank with no pairs, groups shared across ranks, columns without negatives, unequal upstream gradients per rank (and
the error for mixed signs), counts the kernel calls of the 4-pass and the two-call layouts, and once runs the Triton
kernels under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import ville_kernels.infonce as infonce_module
from ville.contrastive import GatheredInfoNCE, _gathered_infonce_two_calls, all_gather_with_grad, gathered_infonce
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


def _terms_ref(q, p, logit_scale, groups):
    """fp64, from the definition: each global pair i's row CE plus its column CE, with the logits of removed pairs
    (same group, not the positive) at -inf. (T,)"""
    logits = logit_scale * q @ p.T
    if groups is not None:
        removed = (groups[0][:, None] == groups[1][None, :]) & ~torch.eye(q.shape[0], dtype=torch.bool)
        logits = logits.masked_fill(removed, float("-inf"))
    return logits.logsumexp(1) + logits.logsumexp(0) - 2 * logits.diagonal()


# (sizes, groups: None / "random" / "one" (no pair is a negative), upstream gradient per rank)
CASES = {
    2: [([5, 8], None, [1.0, 1.0]), ([5, 8], "random", [1.0, 1.0]), ([0, 7], "random", [1.0, 1.0]),
        ([4, 9], "random", [0.5, 2.0]), ([6, 6], "random", [-1.0, -3.0]), ([1, 2], "one", [1.0, 1.0])],
    3: [([3, 0, 5], "random", [1.0, 1.0, 1.0]), ([4, 6, 2], "random", [1.0, 2.0, 3.0]),
        ([2, 5, 3], None, [2.0, 1.0, 0.25])],
}


def _check_4pass(rank, world, index, sizes, groups_kind, upstream, tol=2e-5):
    what = f"world={world} sizes={sizes} groups={groups_kind} upstream={upstream} rank={rank}"
    total, lo, hi = sum(sizes), sum(sizes[:rank]), sum(sizes[: rank + 1])
    video, text, proj, log_scale, groups = _global_batch(2000 + index, total)
    if groups_kind is None:
        groups = None
    elif groups_kind == "one":
        groups = (torch.zeros(total, dtype=torch.long), torch.zeros(total, dtype=torch.long))

    # Expected: rank r's share W / T * 0.5 * (its rows' + its columns' CE); the objective sum_r g_r * share_r.
    proj_g = proj.double().requires_grad_()
    log_scale_g = log_scale.double().requires_grad_()
    loss_g, q_g, p_g = _forward(proj_g, log_scale_g, video.double(), text.double(),
                                lambda q, p, s: _terms_ref(q, p, s, groups))
    shares = torch.stack([loss_g[sum(sizes[:r]): sum(sizes[: r + 1])].sum() for r in range(world)])
    shares = shares * world / total / 2
    _close(shares.sum().detach() / world, infonce_ref(q_g.detach(), p_g.detach(), log_scale.double().exp(),
                                                       groups=groups), f"{what}: shares vs infonce_ref")
    (shares * torch.tensor(upstream, dtype=torch.float64)).sum().backward()

    proj_l = proj.clone().requires_grad_()
    log_scale_l = log_scale.clone().requires_grad_()
    local_groups = None if groups is None else (groups[0][lo:hi], groups[1][lo:hi])
    loss_l, q_l, p_l = _forward(proj_l, log_scale_l, video[lo:hi], text[lo:hi], gathered_infonce,
                                groups=local_groups)
    (loss_l * upstream[rank]).backward()
    assert torch.isfinite(loss_l), what
    _close(loss_l.detach().double(), shares[rank].detach(), f"{what}: this rank's loss", tol)
    if hi > lo:
        _close(q_l.grad.double(), q_g.grad[lo:hi], f"{what}: d objective / d q (local slice)", tol)
        _close(p_l.grad.double(), p_g.grad[lo:hi], f"{what}: d objective / d p (local slice)", tol)
    for name, local, single in (("projection", proj_l.grad, proj_g.grad),
                                ("log logit_scale", log_scale_l.grad, log_scale_g.grad)):
        summed = local.clone()
        dist.all_reduce(summed)
        _close(summed.double(), single, f"{what}: summed d objective / d {name}", tol)


def _count_tile_calls(rank, world, loss_fn):
    """(forward, backward) calls of the chunked kernels for one loss + backward on this rank."""
    counts = [0, 0]
    fwd, bwd = infonce_module._infonce_fwd_torch, infonce_module._infonce_bwd_torch

    def counted_fwd(*args):
        counts[0] += 1
        return fwd(*args)

    def counted_bwd(*args):
        counts[1] += 1
        return bwd(*args)

    infonce_module._infonce_fwd_torch, infonce_module._infonce_bwd_torch = counted_fwd, counted_bwd
    try:
        video, text, proj, log_scale, _ = _global_batch(7, 4 * world)
        lo, hi = 4 * rank, 4 * rank + 4
        loss, _, _ = _forward(proj.clone().requires_grad_(), log_scale.clone().requires_grad_(), video[lo:hi],
                              text[lo:hi], loss_fn)
        loss.backward()
    finally:
        infonce_module._infonce_fwd_torch, infonce_module._infonce_bwd_torch = fwd, bwd
    return tuple(counts)


def _worker_4pass(rank: int, world: int, port: int, interpret: bool):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        if interpret:  # the Triton kernels through the interpreter: one small case with groups and unequal g
            assert os.environ.get("TRITON_INTERPRET") == "1" and infonce_module._kernels_interpreted()
            _check_4pass(rank, world, 0, [3, 6], "random", [1.0, 2.0], tol=1e-4)
            return
        for index, (sizes, groups_kind, upstream) in enumerate(CASES[world]):
            _check_4pass(rank, world, index, sizes, groups_kind, upstream)
        assert _count_tile_calls(rank, world, gathered_infonce) == (1, 1)
        assert _count_tile_calls(rank, world, _gathered_infonce_two_calls) == (2, 2)

        # Upstream gradients of both signs cannot be folded into the column statistics: one clear error, every rank.
        video, text, proj, log_scale, _ = _global_batch(9, 3 * world)
        loss, _, _ = _forward(proj.clone().requires_grad_(), log_scale.clone(), video[3 * rank: 3 * rank + 3],
                              text[3 * rank: 3 * rank + 3], gathered_infonce)
        with pytest.raises(ValueError, match="upstream gradients of the loss must be equal or all nonzero"):
            (loss * (1.0 if rank == 0 else -1.0)).backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_gathered_infonce_4pass_matches_fp64_reference(monkeypatch, world):
    monkeypatch.setenv("VILLE_KERNELS", "torch")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mp.start_processes(_worker_4pass, args=(world, _free_port(), False), nprocs=world, join=True,
                       start_method="fork")


@pytest.mark.timeout(300)
def test_gathered_infonce_4pass_triton_interpreted(monkeypatch):
    pytest.importorskip("triton")
    # spawn: triton reads TRITON_INTERPRET when ville_kernels is imported, so the children need fresh interpreters.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("VILLE_KERNELS", raising=False)
    mp.start_processes(_worker_4pass, args=(2, _free_port(), True), nprocs=2, join=True, start_method="spawn")


def test_single_process_falls_back_to_fused_infonce():
    assert not dist.is_initialized()
    q = F.normalize(torch.randn(9, 16), dim=-1)
    p = F.normalize(torch.randn(9, 16), dim=-1)
    s = torch.tensor(20.0)
    assert torch.equal(gathered_infonce(q, p, s), fused_infonce(q, p, s))
    assert torch.equal(GatheredInfoNCE(symmetric=False)(q, p, s), fused_infonce(q, p, s, symmetric=False))
    assert all_gather_with_grad(q) is q
