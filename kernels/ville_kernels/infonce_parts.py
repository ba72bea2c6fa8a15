"""The passes of the fused InfoNCE as separate calls, for callers that merge statistics between them.

`fused_infonce` runs its forward (negatives' log-sum-exps) and its backward (gradients from the full log-sum-exps) in
one autograd.Function. A distributed loss needs to stop in between: rank r's tile q_local x p_all gives complete row
statistics but only partial column statistics, which are merged across ranks (ville.contrastive) before the loss and
the backward. These functions expose exactly those two passes plus the O(N * D) positive-pair parts.

Shape letters: N rows (queries q), M columns (candidates p), D features; s = logit_scale (already exponentiated).

Dispatch follows `fused_infonce`: CUDA tensors -> the Triton kernels; TRITON_INTERPRET=1 (set before import) -> the
Triton kernels on CPU; CPU otherwise, and VILLE_KERNELS=torch everywhere -> the chunked PyTorch path. The native csrc
kernels are never used here: their custom op returns only the labelled columns' statistics (z_col), not the
log-sum-exp of every column that a partial tile needs.
"""
from __future__ import annotations

import torch

from . import infonce as _infonce
from .dispatch import use_triton
from .infonce_ref import check_infonce_inputs

__all__ = ["infonce_negative_lse", "infonce_backward_from_lse", "infonce_positive_dots", "infonce_add_positive_grads",
           "NO_NEGATIVE"]

# A row or column without any negative gets this (finite) log-sum-exp from infonce_negative_lse, whichever provider
# ran: merging partials across tiles then never forms -inf - (-inf) = NaN, and softplus(NO_NEGATIVE - x) is 0.
NO_NEGATIVE = -1.0e30


def infonce_negative_lse(q, p, logit_scale, labels, groups=None, columns=True):
    """Forward pass: log-sum-exp over the *negatives* of every row and (columns=True) of every column.

    Args:
        q: (N, D), p: (M, D) float16 / bfloat16 / float32, same device; logit_scale () the multiplier s.
        labels: (N,) integer, row i's positive column; distinct when columns=True.
        groups: optional (row_groups (N,), col_groups (M,)): a pair with equal ids that is not a positive is no
            negative (fused_infonce's rule).
        columns: also return the column statistics (one pass either way).
    Returns:
        lse_row (N,) and lse_col (M,) or None, fp32, natural log, of s * q_i . p_j over the negative pairs; a row or
        column with no negative gets a value <= NO_NEGATIVE * ln 2 (finite). Column j's value covers only these N
        rows, so tiles over disjoint row sets merge by log-sum-exp.
    """
    logit_scale, labels, row_groups, col_groups = check_infonce_inputs(q, p, logit_scale, labels, groups, columns)
    fwd = _infonce._infonce_fwd if use_triton(q, p) else _infonce._infonce_fwd_torch
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        lse_row, lse_col = fwd(q, p, logit_scale, labels, row_groups, col_groups, bool(columns))
    # The torch path leaves -inf where the Triton path leaves about -1e30 * ln 2: one convention for both.
    return lse_row.clamp_min_(NO_NEGATIVE), (None if lse_col is None else lse_col.clamp_min_(NO_NEGATIVE))


def infonce_backward_from_lse(q, p, logit_scale, grad, labels, lse_row, lse_col, w_row, w_col, groups=None):
    """Backward pass over the negative pairs, from *full* log-sum-exps (negatives and positive).

    G_ij = grad * (w_row * exp(x_ij - lse_row_i) + w_col * exp(x_ij - lse_col_j)) on every negative pair (i, j),
    x = s * q @ p.T, recomputed tile by tile. The positive pairs are left to `infonce_add_positive_grads`.

    Args:
        q (N, D), p (M, D), logit_scale (), labels (N,) (distinct when lse_col is given), groups: as in
            `infonce_negative_lse`.
        grad: () the upstream gradient, any sign.
        lse_row: (N,) fp32 full row log-sum-exps. lse_col: (M,) fp32 full column log-sum-exps, +inf for a column
            that carries no loss (its softmax is then exactly 0); None for the row direction only.
        w_row, w_col: python floats, w_row != 0 (the kernels use the ratio w_col / w_row).
    Returns:
        dq (N, D), dp (M, D), ds () fp32: the negative pairs' contributions to d/dq, d/dp and d/ds of the loss;
        neg_row (N,), neg_col (M,) or None: each row's / column's negative softmax mass (sum of exp(x - lse)),
        unweighted by grad and w.
    """
    symmetric = lse_col is not None
    logit_scale, labels, row_groups, col_groups = check_infonce_inputs(q, p, logit_scale, labels, groups, symmetric)
    N, M = q.shape[0], p.shape[0]
    if lse_row.shape != (N,) or (symmetric and lse_col.shape != (M,)):
        got = (tuple(lse_row.shape), None if lse_col is None else tuple(lse_col.shape))
        raise ValueError(f"expected lse_row ({N},) and lse_col ({M},) or None, got {got}")
    if w_row == 0:
        raise ValueError("expected w_row != 0 (the backward kernels scale the column term by w_col / w_row)")
    bwd = _infonce._infonce_bwd if use_triton(q, p) else _infonce._infonce_bwd_torch
    if not isinstance(grad, torch.Tensor):
        grad = torch.tensor(float(grad), dtype=torch.float32, device=q.device)
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        return bwd(q, p, logit_scale, grad, labels, row_groups, col_groups, lse_row.to(torch.float32),
                   None if lse_col is None else lse_col.to(torch.float32), float(w_row), float(w_col), symmetric)


def infonce_positive_dots(q, p, labels):
    """(N,) fp32 unscaled q_i . p_labels[i], products of the inputs accumulated in fp32 (the positive logits / s)."""
    with torch.no_grad():
        return _infonce._positive_dots(q, p, labels.long())


def infonce_add_positive_grads(q, p, logit_scale, grad, labels, w_row, w_col, neg_row, neg_col, dq, dp, ds):
    """Add the positive pairs' gradients to fp32 dq (N, D) / dp (M, D) in place and return ds with theirs added.

    The positive pair (i, labels[i]) has G = -grad * (w_row * neg_row_i + w_col * neg_col[labels[i]]): softmax - 1
    is minus the negatives' mass, taken from the very probabilities the backward used so every row and column of G
    sums to zero. neg_col (M,) or None (row direction only); pass a merged mass when the columns' rows were split.
    """
    with torch.no_grad():
        if not isinstance(grad, torch.Tensor):
            grad = torch.tensor(float(grad), dtype=torch.float32, device=q.device)
        return _infonce._add_positive_grads(q, p, logit_scale, grad, labels.long(), float(w_row), float(w_col),
                                            neg_row, neg_col, dq, dp, ds, neg_col is not None)
