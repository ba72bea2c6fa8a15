"""The ops as PyTorch custom ops (`torch.ops.ville_kernels.*`): schemas here, CPU kernels from the native extension
`ville_kernels._C` (csrc/), CUDA kernels from the Triton launchers, fake (meta) kernels and InfoNCE's autograd, so
`torch.compile(fullgraph=True)` traces straight through them.

The schemas are defined whether or not the extension was built; `LOADED` says whether the CPU kernels exist (when
they do not, `fused_infonce` / `decode_attention` use their PyTorch paths on CPU, see dispatch.backends()).
`LOAD_ERROR` keeps the reason, e.g. "not built" or an import error.

Shape letters as in kernels/ville_kernels/infonce.py and kernels/ville_kernels/decode_attention.py.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

_lib = torch.library.Library("ville_kernels", "DEF")
_lib.define("infonce_fwd(Tensor q, Tensor p, Tensor logit_scale, Tensor labels, Tensor? row_groups, "
            "Tensor? col_groups, bool symmetric) -> (Tensor loss, Tensor x_pos, Tensor z_row, Tensor z_col)")
_lib.define("infonce_bwd(Tensor grad, Tensor q, Tensor p, Tensor logit_scale, Tensor labels, Tensor? row_groups, "
            "Tensor? col_groups, Tensor x_pos, Tensor z_row, Tensor z_col, bool symmetric) "
            "-> (Tensor dq, Tensor dp, Tensor dscale)")
_lib.define("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_lens, Tensor? batch_idx, "
            "float scale, float? softcap, int? window) -> Tensor")


def _load() -> tuple[bool, str]:
    if os.environ.get("VILLE_NO_EXT", "0") == "1":
        return False, "VILLE_NO_EXT=1"
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return False, "not built"
    try:
        from . import _C  # registers the CPU kernels
    except Exception as exc:  # built against another torch, missing symbols, ...: fall back, but say so once
        warnings.warn(f"ville_kernels: native CPU kernels failed to load ({exc}); using the PyTorch paths")
        return False, f"{type(exc).__name__}: {exc}"
    if _C.torch_version != torch.__version__:
        why = f"built for torch {_C.torch_version}, running {torch.__version__}; reinstall to rebuild"
        warnings.warn(f"ville_kernels: native CPU kernels not used ({why}); using the PyTorch paths")
        return False, why
    return True, ""


LOADED, LOAD_ERROR = _load()


# ---- InfoNCE -----------------------------------------------------------------------------------------------------
@torch.library.register_fake("ville_kernels::infonce_fwd", lib=_lib)
def _infonce_fwd_fake(q, p, logit_scale, labels, row_groups, col_groups, symmetric):
    N = q.shape[0]
    f32 = dict(dtype=torch.float32, device=q.device)
    return (q.new_empty((), **f32), q.new_empty((N,), **f32), q.new_empty((N,), **f32),
            q.new_empty((N if symmetric else 0,), **f32))


@torch.library.register_fake("ville_kernels::infonce_bwd", lib=_lib)
def _infonce_bwd_fake(grad, q, p, logit_scale, labels, row_groups, col_groups, x_pos, z_row, z_col, symmetric):
    return torch.empty_like(q), torch.empty_like(p), torch.empty_like(logit_scale)


@torch.library.impl("ville_kernels::infonce_fwd", "CUDA", lib=_lib)
def _infonce_fwd_cuda(q, p, logit_scale, labels, row_groups, col_groups, symmetric):
    """The Triton launchers of kernels/ville_kernels/infonce.py plus InfoNCEFunction.forward's closed-form positive pairs."""
    from .infonce import _infonce_fwd, _positive_dots
    with torch.no_grad(), torch.autocast("cuda", enabled=False):
        lse_row, lse_col = _infonce_fwd(q, p, logit_scale, labels, row_groups, col_groups, symmetric)
        x_pos = logit_scale.to(torch.float32) * _positive_dots(q, p, labels)
        z_row = lse_row - x_pos
        loss = F.softplus(z_row).mean()
        z_col = x_pos.new_empty((0,))
        if symmetric:
            z_col = lse_col[labels] - x_pos
            loss = 0.5 * (loss + F.softplus(z_col).mean())
    return loss, x_pos, z_row, z_col


@torch.library.impl("ville_kernels::infonce_bwd", "CUDA", lib=_lib)
def _infonce_bwd_cuda(grad, q, p, logit_scale, labels, row_groups, col_groups, x_pos, z_row, z_col, symmetric):
    """InfoNCEFunction.backward on the Triton backward kernel, without the autograd.Function around it."""
    from .infonce import _add_positive_grads, _infonce_bwd
    N, M = q.shape[0], p.shape[0]
    w_row = 0.5 / N if symmetric else 1.0 / N
    w_col = 0.5 / N if symmetric else 0.0
    with torch.no_grad(), torch.autocast("cuda", enabled=False):
        lse_row = x_pos + F.softplus(z_row)
        lse_col = None
        if symmetric:
            lse_col = torch.full((M,), float("inf"), dtype=torch.float32, device=q.device)
            lse_col[labels] = x_pos + F.softplus(z_col)
        dq, dp, ds, neg_row, neg_col = _infonce_bwd(q, p, logit_scale, grad, labels, row_groups, col_groups,
                                                    lse_row, lse_col, w_row, w_col, symmetric)
        ds = _add_positive_grads(q, p, logit_scale, grad, labels, w_row, w_col, neg_row, neg_col, dq, dp, ds,
                                 symmetric)
    return dq.to(q.dtype), dp.to(p.dtype), ds.to(logit_scale.dtype)


def _infonce_setup_context(ctx, inputs, output):
    q, p, logit_scale, labels, row_groups, col_groups, symmetric = inputs
    _, x_pos, z_row, z_col = output
    ctx.mark_non_differentiable(x_pos, z_row, z_col)
    ctx.save_for_backward(q, p, logit_scale, labels, x_pos, z_row, z_col)
    # Optional tensors cannot go through save_for_backward as None; groups never need gradients.
    ctx.groups = (row_groups, col_groups)
    ctx.symmetric = symmetric


def _infonce_backward(ctx, grad_loss, _grad_x_pos, _grad_z_row, _grad_z_col):
    q, p, logit_scale, labels, x_pos, z_row, z_col = ctx.saved_tensors
    dq, dp, ds = torch.ops.ville_kernels.infonce_bwd(grad_loss, q, p, logit_scale, labels, *ctx.groups, x_pos, z_row,
                                                     z_col, ctx.symmetric)
    return dq, dp, ds, None, None, None, None


torch.library.register_autograd("ville_kernels::infonce_fwd", _infonce_backward,
                                setup_context=_infonce_setup_context, lib=_lib)


def fused_infonce(q, p, logit_scale, labels=None, groups=None, symmetric=True):
    """`ville_kernels.fused_infonce` through the custom op (same arguments and result). Eager calls validate with
    check_infonce_inputs (ValueError); under torch.compile the value checks that would need a host sync
    (label range, distinct labels) run inside the CPU kernel instead (RuntimeError)."""
    from .infonce_ref import check_infonce_inputs
    if torch.compiler.is_compiling():
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=q.device)
        labels = torch.arange(q.shape[0], device=q.device) if labels is None else labels.long()
        row_groups, col_groups = (None, None) if groups is None else (groups[0].long(), groups[1].long())
    else:
        logit_scale, labels, row_groups, col_groups = check_infonce_inputs(q, p, logit_scale, labels, groups,
                                                                           symmetric)
    loss, _, _, _ = torch.ops.ville_kernels.infonce_fwd(q, p, logit_scale, labels, row_groups, col_groups,
                                                        bool(symmetric))
    return loss


# ---- decode attention --------------------------------------------------------------------------------------------
@torch.library.register_fake("ville_kernels::decode_attention", lib=_lib)
def _decode_attention_fake(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.impl("ville_kernels::decode_attention", "CUDA", lib=_lib)
def _decode_attention_cuda(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window):
    from .decode_attention import _decode_attention_fwd
    return _decode_attention_fwd(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window)


def decode_attention(q, k_cache, v_cache, cache_lens, batch_idx=None, scale=None, softcap=None, window=None,
                     check=False):
    """`ville_kernels.decode_attention` through the custom op (forward only; same arguments and result). Eager
    calls validate with decode_attention's checks (ValueError); under torch.compile the CPU kernel checks values."""
    if not torch.compiler.is_compiling():
        from .decode_attention import _check
        _check(q, k_cache, v_cache, cache_lens, batch_idx, softcap, window, check)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    softcap = float(softcap) if softcap is not None else None
    window = int(window) if window is not None else None
    return torch.ops.ville_kernels.decode_attention(q, k_cache, v_cache, cache_lens, batch_idx, scale, softcap, window)
