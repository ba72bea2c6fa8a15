"""Gradient caching (GradCache; Gao et al. 2021, as used by Tevatron and VLM2Vec): a contrastive batch larger than
activation memory, with the loss and every gradient of the whole batch.

A contrastive loss couples all rows of the batch through the similarity matrix, so it cannot be split into
independent micro-batches. It is cheap on the embeddings (the fused InfoNCE never materialises the similarity), and
expensive only in the encoders. GradCache splits the two:

1. embed every chunk of the batch without a graph (activation memory of one chunk);
2. make the embeddings leaves, compute the loss on the whole batch and its gradient w.r.t. each embedding (and the
   loss's own parameters, e.g. logit_scale, which receive their gradients here);
3. re-embed each chunk with a graph and back-propagate the cached embedding gradients into the encoder.

Step 3 must reproduce step 1's embeddings exactly, so each chunk's RNG state (CPU and the model's accelerator) is
saved before step 1 and restored before step 3: dropout draws the same masks in both passes. The result equals
encoding the chunks one after another with graphs and back-propagating the loss through the concatenation
(tests/ville/test_gradcache.py), and, without dropout, the unchunked computation.

Distributed: the loss of step 2 may gather negatives across ranks (ville.contrastive); its backward returns each
rank's share of the embedding gradients. The trainer (`distributed.forward_with_backward`) runs the step past DDP's
wrapper and averages the accumulated gradients once per step by hand; under FSDP2 it runs the step as one forward of
the root module, and each of steps 2-3's backward calls reduce-scatters its gradients into the sharded `.grad`, where
the chunks accumulate. Unsynced chunks (`set_requires_gradient_sync(False)`) would hold every layer's unsharded
gradient until the last one, the memory FSDP exists to save; per-chunk reduce-scatters add one gradient reduction
to the two parameter all-gathers every chunk's re-run pays anyway (docs/design.md).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .config import LossCfg  # noqa: F401  (the loss weights read by `contrastive_loss_cached`)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _tensors(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def grad_cache(encoders: Sequence[Callable[[Any], Any]], chunks: Sequence[Sequence[Any]],
               loss_fn: Callable[..., torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """encoders[i](chunk) -> a tensor or a tuple of tensors with the chunk's rows first; chunks[i] the chunks of
    encoder i's input, in batch order; loss_fn(*reps) -> scalar loss, where reps[i] is encoder i's output for the
    whole batch (chunk outputs concatenated along dim 0; a tuple stays a tuple). Accumulates into `.grad` the
    gradients of loss_fn w.r.t. every parameter the encoders and the loss use; returns the loss (detached)."""
    device = device if device is not None else torch.device("cpu")
    states: list[list[tuple]] = []
    reps: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for encode, parts in zip(encoders, chunks):
            states.append([])
            outs = []
            for part in parts:
                states[-1].append(_rng_state(device))
                outs.append(_tensors(encode(part)))
            reps.append(tuple(torch.cat(col).detach().requires_grad_() for col in zip(*outs)))
    after = _rng_state(device)  # the stream continues as if the batch had been embedded once
    loss = loss_fn(*(r if len(r) > 1 else r[0] for r in reps))
    loss.backward()
    for encode, parts, chunk_states, rep in zip(encoders, chunks, states, reps):
        start = 0
        for part, state in zip(parts, chunk_states):
            _set_rng_state(state, device)
            outs = _tensors(encode(part))
            n = outs[0].shape[0]
            pairs = [(o, r.grad[start:start + n]) for o, r in zip(outs, rep) if r.grad is not None]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            start += n
    _set_rng_state(after, device)
    return loss.detach()


def split(x, size: int) -> list:
    """Rows 0..n of a tensor or a list in chunks of `size`."""
    if size < 1:
        raise ValueError(f"train.contrastive_chunk: must be >= 1, got {size}")
    return [x[s:s + size] for s in range(0, len(x), size)]


def contrastive_loss_cached(model, cfg: LossCfg, frames: torch.Tensor, texts: list, groups: torch.Tensor,
                            chunk: int, grad_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The contrastive (+ halting) part of a caption / retrieval task (ville.losses.multitask_loss's
    `embed_and_contrast`) with the video and text towers run `chunk` samples at a time through `grad_cache`.
    Returns the weighted loss (gradients already accumulated, times `grad_scale`: 1 / grad_accum in training) and
    its components."""
    from .losses import _global_batch, contrastive_loss, halting_loss, halting_targets

    if cfg.halting_target == "sentences":
        raise ValueError("train.contrastive_chunk: halting_target=sentences is not supported with gradient caching")
    if cfg.swap > 0:
        raise ValueError("train.contrastive_chunk: loss.swap (swapped-word negatives) is not supported with gradient "
                         "caching; set loss.swap=0 or train.contrastive_chunk=0")
    e = model.cfg.embed
    comps: dict[str, float] = {}

    def video(fr):
        steps = model.video_embed_steps(fr)
        return steps.per_step, steps.stop_logits

    def loss_fn(video_reps, text_emb):
        per_step, stop_logits = video_reps
        scale = model.logit_scale.exp()
        con = contrastive_loss(cfg, per_step, text_emb, scale, e.min_embed_tokens, groups=(groups, groups))
        comps["contrastive"] = float(con.detach())
        total = cfg.contrastive * con
        if (cfg.halting > 0 or cfg.token_cost > 0) and _global_batch(text_emb) >= cfg.halting_min_batch:
            targets = halting_targets(per_step, text_emb, cfg.halting_margin, groups)
            h, stats = halting_loss(cfg, stop_logits, targets, e.min_embed_tokens)
            comps["halting"] = float(h.detach())
            comps.update(stats)
            total = total + h
        return total * grad_scale

    loss = grad_cache([video, model.text_embed_train], [split(frames, chunk), split(list(texts), chunk)], loss_fn,
                      model.device)
    return loss / grad_scale, comps


def lm_loss_cached(model, frames: torch.Tensor, prompts: list, targets: list, chunk: int,
                   weight: float = 1.0) -> torch.Tensor:
    """`model.lm_loss(frames, prompts, targets)` taken `chunk` samples at a time, each chunk back-propagated at once
    (gradients of `weight` times the loss accumulated into `.grad`), so the LM pass holds one chunk's activations.
    Exact without dropout: the loss is a mean over samples, so chunk c counts n_c / n. Returns the loss (no graph).
    Meant for the caption branch of `losses.multitask_loss` under `train.contrastive_chunk`, where the LM term of a
    caption task otherwise holds the whole batch's activations beside the cached contrastive term."""
    n, total = len(targets), 0.0
    for fr, pr, tg in zip(split(frames, chunk), split(list(prompts), chunk), split(list(targets), chunk)):
        part = model.lm_loss(fr, pr, tg) * (len(tg) / n)
        (part * weight).backward()
        total += float(part.detach())
    return torch.tensor(total)
