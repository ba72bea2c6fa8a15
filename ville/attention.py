"""Prefix-LM attention that never builds an (L x L) score tensor: FlexAttention, SDPA and a query-chunked path.

ville's attention (ville/llm.py) masks each sample's sequence as a prefix-LM: key j is visible to query i of sample b
iff j is valid (j < lens[b]) and either in b's prefix (j < prefix_lens[b]) or not after i; a padded query sees
itself (no empty row); a layer with a sliding window also needs |i - j| < window. The reference (`eager`, ville/llm.py
`_full_attention`) writes this mask and, for Gemma-2's logit soft-capping, the fp32 scores of every head out in full:
at batch 256 x 3k tokens that is ~78 GB per layer. The paths here compute the same function:

- `flex`: `torch.nn.attention.flex_attention` with the mask as a BlockMask (fully masked 128 x 128 tiles are
  skipped) and the soft-cap as a `score_mod`; GQA by `enable_gqa` (K/V are never repeated). On CUDA it is compiled
  (fused kernel: O(L) memory, forward and backward); on CPU flex runs eagerly, materialising scores internally, and
  torch has no CPU backward for it, so on CPU it serves no-grad passes only (prefill of embedding and generation).
- `sdpa`: `F.scaled_dot_product_attention` with the boolean mask (one byte per pair, shared by heads and layers);
  it cannot soft-cap, so it serves decoders without `attn_logit_softcapping` (Llama, Qwen2, Gemma-1).
- `chunked`: plain PyTorch over blocks of `CHUNK` queries, each block checkpointed so backward recomputes its scores;
  at most (B, Hq, CHUNK, keys) fp32 scores live at once, keys limited to the window where there is one. Any device,
  gradients included: the CPU path for soft-capped decoders.
- `auto`: flex on CUDA (falls back to `chunked` when attention dropout is active: flex has none), else `sdpa` without
  soft-cap, else `chunked`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IMPLS = ("auto", "flex", "sdpa", "chunked", "eager")
CHUNK = 256  # queries per block of the chunked path

_compiled_flex = None


def check_impl(name: str) -> str:
    if name not in IMPLS:
        raise ValueError(f"model.llm.attention: expected one of {list(IMPLS)}, got {name!r}")
    return name


def choose(name: str, query: torch.Tensor, softcap, dropout: float) -> str:
    """The path `name` (model.llm.attention) resolves to for this call."""
    if check_impl(name) != "auto":
        return name
    if query.is_cuda and not dropout:
        return "flex"
    return "sdpa" if softcap is None else "chunked"


def visible(q_idx: torch.Tensor, kv_idx: torch.Tensor, prefix_len, length, window: int | None) -> torch.Tensor:
    """The prefix-LM mask as a broadcasting expression of query / key positions and the sample's lengths (the one
    definition both the chunked path and flex's `mask_mod` evaluate)."""
    same = q_idx == kv_idx
    vis = ((kv_idx < length) & ((kv_idx < prefix_len) | (kv_idx <= q_idx))) | same
    if window:
        vis = vis & (((q_idx - kv_idx).abs() < window) | same)
    return vis


# --------------------------------------------------------------------------------------------------------- chunked
def _chunk(q, k, v, q_pos, kv_pos, prefix_lens, lens, scaling: float, softcap, window, dropout: float):
    """q (B, Hkv, G, Lq, Dh) of queries at q_pos (Lq,); k/v (B, Hkv, 1, Lk, Dh) at kv_pos (Lk,)."""
    # Scores at least fp32 (bf16/fp16 models), fp64 kept in fp64 (reference checks).
    scores = torch.matmul(q, k.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = visible(q_pos[None, :, None], kv_pos[None, None, :], prefix_lens[:, None, None], lens[:, None, None],
                   window)  # (B, Lq, Lk)
    probs = scores.masked_fill(~mask[:, None, None], float("-inf")).softmax(-1).to(q.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v)


def chunked_attention(q, k, v, prefix_lens, lens, scaling: float, softcap=None, window: int | None = None,
                      dropout: float = 0.0, chunk: int | None = None) -> torch.Tensor:
    """q (B, Hq, L, Dh), k/v (B, Hkv, L, Dh), prefix_lens/lens (B,) -> (B, Hq, L, Dh); `chunk` queries per block
    (default: the module's CHUNK, read at call time)."""
    chunk = chunk or CHUNK
    B, Hq, L, Dh = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, L, Dh)  # query heads grouped under their K/V head: no K/V repeat
    kg, vg = k[:, :, None], v[:, :, None]
    pos = torch.arange(L, device=q.device)
    prefix_lens, lens = prefix_lens.to(q.device), lens.to(q.device)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for s in range(0, L, chunk):
        e = min(L, s + chunk)
        lo, hi = (max(0, s - window + 1), min(L, e + window - 1)) if window else (0, L)
        args = (qg[:, :, :, s:e], kg[:, :, :, lo:hi], vg[:, :, :, lo:hi], pos[s:e], pos[lo:hi], prefix_lens, lens,
                scaling, softcap, window, dropout)
        # Checkpointing keeps only the block's inputs for backward, so one block's scores live at a time.
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if grad else _chunk(*args))
    return torch.cat(outs, dim=3).view(B, Hq, L, Dh)


# ------------------------------------------------------------------------------------------------------------ flex
def _flex_fn(device: torch.device):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def block_mask(prefix_lens, lens, L: int, window: int | None, device):
    from torch.nn.attention.flex_attention import create_block_mask

    prefix_lens, lens = prefix_lens.to(device), lens.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx, kv_idx, prefix_lens[b], lens[b], window)

    # Compiled on CUDA so the mask is evaluated tile by tile, never as a (B, L, L) tensor.
    return create_block_mask(mask_mod, lens.shape[0], None, L, L, device=device, _compile=device.type == "cuda")


def flex_prefix_attention(q, k, v, mask, scaling: float, softcap=None) -> torch.Tensor:
    """q (B, Hq, L, Dh), k/v (B, Hkv, L, Dh), mask from `block_mask` -> (B, Hq, L, Dh)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("model.llm.attention=flex: torch has no FlexAttention backward on CPU; use chunked (or auto)")
    score_mod = None
    if softcap is not None:
        # A captured tensor, not a Python float: flex traces score_mod with dynamo, which would recompile for each
        # new float and then fail on it as a symbolic float.
        cap = torch.tensor(float(softcap), device=q.device)

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
    return _flex_fn(q.device)(q, k, v, score_mod=score_mod, block_mask=mask, scale=scaling,
                              enable_gqa=q.shape[1] != k.shape[1])


# ---------------------------------------------------------------------------------------------------------- public
def prefix_lm_attention(impl: str, q, k, v, state, scaling: float, softcap=None, window: int | None = None,
                        dropout: float = 0.0) -> torch.Tensor:
    """One of the non-reference paths (`choose`) for ville's full-mode attention; `state` is the call's AttnState
    (its prefix_lens / lens; flex keeps one BlockMask per (L, window) on it for all layers)."""
    if impl == "chunked":
        return chunked_attention(q, k, v, state.prefix_lens, state.lens, scaling, softcap, window, dropout)
    if impl == "sdpa":
        if softcap is not None:
            raise ValueError("model.llm.attention=sdpa: this decoder soft-caps attention logits, which SDPA cannot; "
                             "use flex, chunked or auto")
        mask = state.full_mask(q.shape[2], q.device)
        if window:
            pos = torch.arange(q.shape[2], device=q.device)
            mask = mask & (((pos[:, None] - pos[None, :]).abs() < window) | (pos[:, None] == pos[None, :]))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if impl == "flex":
        if dropout:
            raise ValueError("model.llm.attention=flex: FlexAttention has no attention dropout; use chunked or auto")
        if state._block_masks is None:
            state._block_masks = {}
        key = (q.shape[2], window)
        if key not in state._block_masks:
            state._block_masks[key] = block_mask(state.prefix_lens, state.lens, q.shape[2], window, q.device)
        return flex_prefix_attention(q, k, v, state._block_masks[key], scaling, softcap)
    raise ValueError(f"prefix_lm_attention: no path {impl!r} here (eager is ville.llm._full_attention)")
