"""Reference (the specification) of contrastive InfoNCE, and the input checks shared with the fused op.

It materialises the N x M logits on purpose: it is meant to be obviously correct, not fast. Never edit it to agree
with `fused_infonce`; when they disagree, the kernel is wrong.

Shape letters: N rows (queries `q`), M columns (candidates `p`, M >= N when hard negatives are appended), D features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_D = 4096
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_infonce_inputs(q, p, logit_scale, labels=None, groups=None, symmetric=True, dtypes=SUPPORTED_DTYPES):
    """Validate the arguments of `infonce_ref` / `fused_infonce`; return (logit_scale, labels, row_groups, col_groups).

    `labels` comes back as a long tensor (arange(N) when None); groups come back as (None, None) when not given.
    Raises ValueError naming what was expected and what was given.
    """
    if not isinstance(q, torch.Tensor) or not isinstance(p, torch.Tensor):
        raise ValueError(f"expected q and p to be tensors, got {type(q).__name__} and {type(p).__name__}")
    if q.dim() != 2:
        raise ValueError(f"expected q of shape (N, D), got shape {_shape(q)}")
    if p.dim() != 2:
        raise ValueError(f"expected p of shape (M, D), got shape {_shape(p)}")
    (N, D), (M, Dp) = q.shape, p.shape
    if D != Dp:
        raise ValueError(f"expected q (N, D) and p (M, D) to share D, got q {_shape(q)} and p {_shape(p)}")
    if N < 1 or M < 1 or D < 1:
        raise ValueError(f"expected N, M, D >= 1, got q {_shape(q)} and p {_shape(p)}")
    if D > MAX_D:
        raise ValueError(f"expected D <= {MAX_D}, got D = {D}")
    if q.dtype != p.dtype:
        raise ValueError(f"expected q and p of the same dtype, got q {q.dtype} and p {p.dtype}")
    if q.dtype not in dtypes:
        raise ValueError(f"expected q and p of dtype {', '.join(str(d) for d in dtypes)}, got {q.dtype}")
    if q.device != p.device:
        raise ValueError(f"expected q and p on one device, got q on {q.device} and p on {p.device}")

    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=q.device)
    if logit_scale.dim() != 0 or not logit_scale.is_floating_point():
        raise ValueError(f"expected logit_scale to be a 0-dim floating tensor (the multiplier s, already "
                         f"exponentiated), got shape {_shape(logit_scale)} and dtype {logit_scale.dtype}")
    if logit_scale.device != q.device:
        raise ValueError(f"expected logit_scale on {q.device}, got {logit_scale.device}")

    if labels is None:
        if M != N:
            raise ValueError(f"expected M == N when labels is None (row i's positive is column i), got N = {N}, "
                             f"M = {M}; pass labels (N,) to give each row's positive column")
        labels = torch.arange(N, device=q.device)
    else:
        if not isinstance(labels, torch.Tensor) or labels.shape != (N,):
            got = _shape(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"expected labels of shape (N,) = ({N},), got {got}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"expected integer labels, got dtype {labels.dtype}")
        if labels.device != q.device:
            raise ValueError(f"expected labels on {q.device}, got {labels.device}")
        labels = labels.long()
        lo, hi = torch.stack([labels.min(), labels.max()]).tolist()  # one device sync for both bounds
        if lo < 0 or hi >= M:
            raise ValueError(f"expected labels in [0, M) = [0, {M}), got values in [{lo}, {hi}]")
        if symmetric and torch.unique(labels).numel() != N:
            # With two rows sharing a positive column, "the column's positive row" is not defined; rather than pick
            # a rule silently (first row? all rows as a multi-positive target?) the symmetric loss refuses.
            raise ValueError("expected distinct labels in symmetric mode (each labelled column has exactly one "
                             "positive row), got duplicate labels; use symmetric=False or deduplicate")

    row_groups = col_groups = None
    if groups is not None:
        if not isinstance(groups, (tuple, list)) or len(groups) != 2:
            raise ValueError(f"expected groups = (row_groups (N,), col_groups (M,)), got {type(groups).__name__}")
        row_groups, col_groups = groups
        for name, g, n in (("row_groups", row_groups, N), ("col_groups", col_groups, M)):
            if not isinstance(g, torch.Tensor) or g.shape != (n,):
                got = _shape(g) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"expected {name} of shape ({n},), got {got}")
            if g.dtype.is_floating_point or g.dtype.is_complex:
                raise ValueError(f"expected integer {name}, got dtype {g.dtype}")
            if g.device != q.device:
                raise ValueError(f"expected {name} on {q.device}, got {g.device}")
        row_groups, col_groups = row_groups.long(), col_groups.long()
    return logit_scale, labels, row_groups, col_groups


def infonce_ref(q, p, logit_scale, labels=None, groups=None, symmetric=True, upcast=True):
    """Contrastive InfoNCE with materialised logits: the specification of `fused_infonce`.

    q (N, D), p (M, D), logit_scale () the multiplier s (already exponentiated), labels (N,) long: row i's positive
    column (default arange(N), needs M == N), groups = (row_groups (N,), col_groups (M,)): pair (i, j) with equal group
    ids that is not row i's positive is left out of both softmax denominators.

    Row loss: mean over the N rows of CE(s * q_i . p^T, labels[i]).
    Column loss (symmetric): for each labelled column j = labels[i] (labels must be distinct), CE over the N rows of
    s * q . p_j with row i as the positive; columns that are no row's label contribute nothing; mean over those N
    columns. Loss = 0.5 * (row + column) when symmetric, else the row loss.
    upcast=True computes in float64, else in float32. Returns a 0-dim tensor of that dtype.
    """
    logit_scale, labels, row_groups, col_groups = check_infonce_inputs(
        q, p, logit_scale, labels, groups, symmetric, dtypes=SUPPORTED_DTYPES + (torch.float64,))
    dt = torch.float64 if upcast else torch.float32
    logits = logit_scale.to(dt) * (q.to(dt) @ p.to(dt).T)
    N, M = logits.shape
    if row_groups is not None:
        is_positive = torch.arange(M, device=q.device)[None, :] == labels[:, None]
        removed = (row_groups[:, None] == col_groups[None, :]) & ~is_positive
        logits = logits.masked_fill(removed, float("-inf"))
    row_loss = F.cross_entropy(logits, labels)
    if not symmetric:
        return row_loss
    # Row k of logits.T[labels] is column labels[k] over all N rows; its positive is row k.
    col_loss = F.cross_entropy(logits.T[labels], torch.arange(N, device=q.device))
    return 0.5 * (row_loss + col_loss)
