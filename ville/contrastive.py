"""Contrastive InfoNCE across ranks: all-gather with gradient, then the local loss with rank-offset labels.

This is open_clip's "local loss" layout ("the only option that scales"): rank r holds n_r (q, p) pairs, gathers every
rank's features with gradient, and computes
    rows:    its own q against all p (positives at global columns offset_r + arange(n_r)),
    columns: its own p against all q (the p -> q direction of its own columns),
each with one one-directional `fused_infonce` call. A single-process symmetric call would compute the local rows'
column LSEs over local rows only, which is not the global column loss, hence two calls (the similarity is computed
twice per rank, once per direction; the fused kernel still never materialises it).

Scaling. With T = sum of n_r and W ranks, rank r returns
    W * n_r / T * 0.5 * (mean of its row losses + mean of its column losses)
so the mean over ranks of the returned losses equals the single-process loss on the concatenated global batch (for
equal n_r the factor is 1). Gradients: the all-gather's backward all-reduce-sums the incoming gradients, so rank r's
features receive d(sum of all ranks' losses)/d(its features) = W * d(global loss)/d(its features); DDP's averaging
of parameter gradients over ranks divides the W back out, which gives exactly the single-process gradient. logit_scale
is not gathered: each rank's gradient is that of its own share, and DDP's average is the global gradient.

Never call these on a subset of ranks: the gathers (forward) and all-reduces (backward) are collectives.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ville_kernels import fused_infonce


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


def gathered_infonce(q_local, p_local, logit_scale, symmetric=True, groups=None, group=None):
    """InfoNCE over the global batch of all ranks, computed as this rank's share (see the module docstring).

    Args:
        q_local: (n, D) this rank's queries (e.g. video embeddings); row i's positive is p_local[i].
        p_local: (n, D) this rank's candidates (e.g. caption embeddings).
        logit_scale: () the multiplier s (already exponentiated), replicated on every rank.
        symmetric: both directions (CLIP) or the q -> p direction only.
        groups: optional (row_groups (n,), col_groups (n,)) integer ids, global in meaning (e.g. video ids): a pair
            with equal ids that is not a positive is no negative, across ranks too.
        group: the process group (default: the world).
    Returns:
        () float32 loss; its mean over ranks is the single-process loss on the concatenated batch. Without an
        initialised process group, or with one rank, this is just `fused_infonce` on the local batch.
    """
    if not _distributed(group):
        return fused_infonce(q_local, p_local, logit_scale, groups=groups, symmetric=symmetric)
    if q_local.dim() != 2 or p_local.dim() != 2 or q_local.shape[0] != p_local.shape[0]:
        raise ValueError(f"expected q_local and p_local of shape (n, D) with the same n (row i's positive is "
                         f"p_local[i]), got {tuple(q_local.shape)} and {tuple(p_local.shape)}")
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
        row_groups_all = _gather_rows(row_groups.long(), sizes, group)
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
