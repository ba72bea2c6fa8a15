"""Contrastive InfoNCE across ranks: every rank's candidates gathered, column statistics merged by all-reduce.

Rank r holds n_r (q, p) pairs of the global batch of T = sum of n_r; its pairs are global rows and columns
offset_r + arange(n_r). The symmetric loss (`_GatheredInfoNCEFunction`) takes 4 passes over the n_r x T similarity
per rank, as the single-process fused kernel does (forward 1; backward 3: recomputation, dq, dp):
    forward:  p_all = all-gather(p); one tile q_local x p_all gives each local row's negatives' log-sum-exp (complete)
              and each of the T columns' log-sum-exp over the local rows only (partial). The partials are merged
              across ranks as a log-sum-exp (all-reduce MAX, then SUM of exp(partial - max), with the positive logits
              riding in the same SUM: zeros elsewhere add exactly). Rank r's loss covers its rows and the columns it
              owns (its own positives').
    backward: one pass over the same tile with the full row and column log-sum-exps gives dq_local (complete) and
              dp_all and the columns' negative softmax mass over the local rows (partial); one all-reduce SUM of
              (dp_all | mass) completes both, then each rank adds its own positive pairs in closed form.
Communication per step: an all-gather of T x D (p only) and an all-reduce of T x (D + 1), where gathering q and p
with gradient (open_clip's "local loss" layout, kept as `_gathered_infonce_two_calls`: one one-directional
`fused_infonce` per direction, 8 passes) moves twice that. The row-only (symmetric=False) loss needs no column
statistics and keeps that one-call path.

Scaling. With W ranks, rank r returns
    W / T * 0.5 * (sum of its row losses + sum of its owned columns' losses)
(= W * n_r / T * 0.5 * (mean + mean)), so the mean over ranks of the returned losses equals the single-process loss
on the concatenated global batch. Gradients: rank r's features receive W * d(global loss)/d(its features); DDP's
averaging of parameter gradients over ranks divides the W back out, which gives exactly the single-process gradient.
logit_scale is not gathered: each rank's gradient is its share, and DDP's average is the global gradient. When the
ranks back-propagate different upstream gradients g_r, the differentiated quantity is sum_r g_r * loss_r: a column's
softmax term belongs to the loss of the rank that owns the column, so the backward all-gathers the g_r (they must be
all equal, or all nonzero and of one sign).

Never call these on a subset of ranks: the gathers and all-reduces (forward and backward) are collectives. A rank
with no pairs still joins every one of them.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ville_kernels import (NO_NEGATIVE, fused_infonce, infonce_add_positive_grads, infonce_backward_from_lse,
                           infonce_negative_lse, infonce_positive_dots)


def _distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _gather_sizes(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's local row count (ranks may hold different batch sizes)."""
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(s) for s in torch.cat(sizes).tolist()]


def _gather_rows(x: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Concatenate every rank's rows (no autograd): pad to the largest size, all_gather, trim."""
    rows = max(sizes)
    padded = x.new_zeros((rows,) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all ranks' rows concatenated in rank order. Backward: the gradient of the concatenation is summed
    over ranks (every rank's loss depends on every rank's rows) and this rank's slice is returned."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        return _gather_rows(x.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd's buffer is not ours to change
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def all_gather_with_grad(x: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """(n_r, ...) on each rank -> (sum of n_r, ...) on every rank, rank order, differentiable.

    Like torch.distributed.nn.functional.all_gather followed by a cat, but ranks may hold different numbers of rows
    (sizes are gathered first unless given). Without an initialised process group, or with one rank, returns x.
    """
    if not _distributed(group):
        return x
    if sizes is None:
        sizes = _gather_sizes(x.shape[0], x.device, group)
    return _AllGatherWithGrad.apply(x, sizes, group)


def _check_pairs(q_local, p_local, groups):
    if q_local.dim() != 2 or p_local.dim() != 2 or q_local.shape[0] != p_local.shape[0]:
        raise ValueError(f"expected q_local and p_local of shape (n, D) with the same n (row i's positive is "
                         f"p_local[i]), got {tuple(q_local.shape)} and {tuple(p_local.shape)}")
    if groups is not None and (len(groups) != 2 or any(g.shape != (q_local.shape[0],) for g in groups)):
        raise ValueError(f"expected groups = (row_groups, col_groups) of shape ({q_local.shape[0]},) each (this "
                         f"rank's pairs), got {[tuple(g.shape) for g in groups]}")


class _GatheredInfoNCEFunction(torch.autograd.Function):
    """Symmetric gathered InfoNCE in one forward and one backward pass over this rank's n_r x T tile (module
    docstring). The backward runs its own collectives, so every rank must back-propagate its loss."""

    @staticmethod
    def forward(ctx, q_local, p_local, logit_scale, row_groups, col_groups, sizes, group):
        rank, world, total = dist.get_rank(group), len(sizes), sum(sizes)
        n, lo = q_local.shape[0], sum(sizes[:rank])
        f32 = dict(dtype=torch.float32, device=q_local.device)
        p_all = _gather_rows(p_local.contiguous(), sizes, group)
        col_groups_all = None if col_groups is None else _gather_rows(col_groups, sizes, group)
        groups = None if row_groups is None else (row_groups, col_groups_all)
        labels = torch.arange(lo, lo + n, device=q_local.device)
        scale = logit_scale.detach().to(torch.float32)
        if n:
            lse_row, lse_col_part = infonce_negative_lse(q_local, p_all, logit_scale, labels, groups=groups)
            x_pos = scale * infonce_positive_dots(q_local, p_all, labels)
        else:
            lse_row, x_pos = torch.empty(0, **f32), torch.empty(0, **f32)
            lse_col_part = torch.full((total,), NO_NEGATIVE, **f32)
        # Both providers leave a finite floor (NO_NEGATIVE) where a column has no negative among our rows, so the
        # merge below never forms -inf - (-inf).
        top = lse_col_part.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        stats = torch.zeros(2, total, **f32)
        stats[0] = torch.exp(lse_col_part - top)
        stats[1, lo : lo + n] = x_pos  # every column's positive logit, from its owner; the zeros add exactly
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        lse_col, x_pos_all = top + torch.log(stats[0]), stats[1]

        z_row, z_col = lse_row - x_pos, lse_col[lo : lo + n] - x_pos
        weight = world / (2.0 * total)
        loss = weight * (F.softplus(z_row).sum() + F.softplus(z_col).sum())
        # Full log-sum-exps (negatives and the positive) for the backward, as fused_infonce's _grads_from_stats.
        lse_row_full = x_pos + F.softplus(z_row)
        lse_col_full = x_pos_all + F.softplus(lse_col - x_pos_all)
        ctx.save_for_backward(q_local, p_all, logit_scale, row_groups, col_groups_all, lse_row_full, lse_col_full)
        ctx.sizes, ctx.group, ctx.weight, ctx.p_dtype = sizes, group, weight, p_local.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q_local, p_all, logit_scale, row_groups, col_groups_all, lse_row, lse_col = ctx.saved_tensors
        sizes, group, weight = ctx.sizes, ctx.group, ctx.weight
        rank, world, total = dist.get_rank(group), len(sizes), sum(sizes)
        (n, D), lo = q_local.shape, sum(sizes[:rank])
        f32 = dict(dtype=torch.float32, device=q_local.device)
        g = grad.detach().to(torch.float32).reshape(())
        upstream = torch.zeros(world, **f32)
        upstream[rank] = g
        dist.all_reduce(upstream, group=group)
        owners = torch.tensor(sizes, device=q_local.device)
        active = upstream[owners > 0]
        if not bool((active == active[0]).all()):
            # Column j's softmax term is weighted by its owner's g_b, not by ours: exp(x - (lse - log(g_b / g))) =
            # (g_b / g) * exp(x - lse), which needs every ratio positive.
            if not (bool((active > 0).all()) or bool((active < 0).all())):
                raise ValueError(f"gathered_infonce: the ranks' upstream gradients of the loss must be equal or all "
                                 f"nonzero and of one sign, got {upstream.tolist()}")
            if n:
                lse_col = lse_col - torch.log(upstream.repeat_interleave(owners, output_size=total) / g)
        if n:
            labels = torch.arange(lo, lo + n, device=q_local.device)
            groups = None if row_groups is None else (row_groups, col_groups_all)
            dq, dp_all, ds, neg_row, neg_col = infonce_backward_from_lse(
                q_local, p_all, logit_scale, g, labels, lse_row, lse_col, weight, weight, groups=groups)
            neg_col = neg_col * g  # = g_owner * (mass over our rows), whichever g this rank has
        else:
            dq, ds = torch.zeros(0, D, **f32), torch.zeros((), **f32)
            dp_all, neg_col = torch.zeros(total, D, **f32), torch.zeros(total, **f32)
        packed = torch.cat([dp_all, neg_col[:, None]], dim=1)
        dist.all_reduce(packed, group=group)
        dp_local, col_mass = packed[lo : lo + n, :D], packed[lo : lo + n, D]
        if n:
            # Positive pair (j, j): G = -(g * w * neg_row_j + w * g * column mass_j), the latter already g-weighted.
            ds = infonce_add_positive_grads(q_local, p_all[lo : lo + n], logit_scale, 1.0,
                                            torch.arange(n, device=q_local.device), weight * g, weight, neg_row,
                                            col_mass, dq, dp_local, ds)
        return (dq.to(q_local.dtype), dp_local.to(ctx.p_dtype), ds.to(logit_scale.dtype), None, None, None, None)


def gathered_infonce(q_local, p_local, logit_scale, symmetric=True, groups=None, group=None):
    """InfoNCE over the global batch of all ranks, computed as this rank's share (see the module docstring).

    Args:
        q_local: (n, D) this rank's queries (e.g. video embeddings); row i's positive is p_local[i]. n may be 0 on
            some ranks (they still join every collective).
        p_local: (n, D) this rank's candidates (e.g. caption embeddings).
        logit_scale: () the multiplier s (already exponentiated), replicated on every rank.
        symmetric: both directions (CLIP) or the q -> p direction only.
        groups: optional (row_groups (n,), col_groups (n,)) integer ids, global in meaning (e.g. video ids): a pair
            with equal ids that is not a positive is no negative, across ranks too.
        group: the process group (default: the world).
    Returns:
        () float32 loss; its mean over ranks is the single-process loss on the concatenated batch. Without an
        initialised process group, or with one rank, this is just `fused_infonce` on the local batch.
    The symmetric loss's backward runs collectives: every rank must back-propagate it, with upstream gradients that
    are equal across ranks or all nonzero and of one sign (else ValueError on every rank).
    """
    if not _distributed(group):
        return fused_infonce(q_local, p_local, logit_scale, groups=groups, symmetric=symmetric)
    if not symmetric:
        return _gathered_infonce_two_calls(q_local, p_local, logit_scale, symmetric=False, groups=groups, group=group)
    _check_pairs(q_local, p_local, groups)
    sizes = _gather_sizes(q_local.shape[0], q_local.device, group)
    if sum(sizes) == 0:
        raise ValueError("expected at least one (q, p) pair across ranks, got none")
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=q_local.device)
    row_groups, col_groups = (None, None) if groups is None else (groups[0].long(), groups[1].long())
    return _GatheredInfoNCEFunction.apply(q_local, p_local, logit_scale, row_groups, col_groups, sizes, group)


def _gathered_infonce_two_calls(q_local, p_local, logit_scale, symmetric=True, groups=None, group=None):
    """The open_clip layout: q and p gathered with gradient, one one-directional `fused_infonce` per direction
    (8 passes when symmetric). The row-only loss of `gathered_infonce`; for symmetric=True the reference the 4-pass
    function is tested and benchmarked against (tests/kernels/test_infonce_dist.py, bench/bench_infonce_dist.py)."""
    _check_pairs(q_local, p_local, groups)
    n = q_local.shape[0]
    sizes = _gather_sizes(n, q_local.device, group)
    rank, world, total = dist.get_rank(group), len(sizes), sum(sizes)
    if total == 0:
        raise ValueError("expected at least one (q, p) pair across ranks, got none")
    p_all = _AllGatherWithGrad.apply(p_local, sizes, group)
    q_all = _AllGatherWithGrad.apply(q_local, sizes, group) if symmetric else None
    row_groups = col_groups = row_groups_all = col_groups_all = None
    if groups is not None:
        row_groups, col_groups = groups
        row_groups_all = _gather_rows(row_groups.long(), sizes, group) if symmetric else None
        col_groups_all = _gather_rows(col_groups.long(), sizes, group)
    if n == 0:
        # Nothing of ours to score, but the other ranks' backward all-reduces need this rank's matching calls.
        zero = p_all.sum() * 0.0 + logit_scale * 0.0
        return zero + q_all.sum() * 0.0 if symmetric else zero

    labels = torch.arange(sum(sizes[:rank]), sum(sizes[:rank]) + n, device=q_local.device)
    weight = world * n / total
    row_loss = fused_infonce(q_local, p_all, logit_scale, labels=labels, symmetric=False,
                             groups=None if groups is None else (row_groups, col_groups_all))
    if not symmetric:
        return weight * row_loss
    col_loss = fused_infonce(p_local, q_all, logit_scale, labels=labels, symmetric=False,
                             groups=None if groups is None else (col_groups, row_groups_all))
    return weight * 0.5 * (row_loss + col_loss)


class GatheredInfoNCE(nn.Module):
    """`gathered_infonce` as a module: loss = module(q_local, p_local, logit_scale, groups=None)."""

    def __init__(self, symmetric: bool = True, group=None):
        super().__init__()
        self.symmetric = symmetric
        self.group = group

    def forward(self, q_local, p_local, logit_scale, groups=None):
        return gathered_infonce(q_local, p_local, logit_scale, symmetric=self.symmetric, groups=groups,
                                group=self.group)

    def extra_repr(self) -> str:
        return f"symmetric={self.symmetric}"
