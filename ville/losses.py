"""Losses: next-token (LM), contrastive (InfoNCE, gathered across ranks), window-contrastive localisation, matching
(BCE) and halting supervision for adaptive-length embeddings.

Which embedding the contrastive losses train: the embedding pooled from the first t steps is what inference returns
when a sample stops at step t, so every prefix length must be a usable embedding. With `embed_steps: all` (default)
the contrastive loss is the mean over t = min..K of the InfoNCE of the step-t embeddings; `last` trains step K only.

Halting (the paper does not say how EOS is learned; ours): the stop target of step t is 1 when the embedding pooled
from steps 1..t already ranks its paired text first in the batch by at least `margin` in cosine similarity
(computed without gradient), else 0. The loss is BCE on the stop logits of steps >= min_embed_tokens plus
`token_cost` times the expected number of tokens under the model's own stopping rule,
E[n] = sum_t prod_{s<t} (1 - p_s), which is differentiable in the stop probabilities p_s. A task whose global batch
has fewer than `halting_min_batch` texts does not feed it: ranking first among three competitors says little about
a gallery, and such targets (almost all 1) taught the stop logit to fire at step 1 for everything.

Length targets from detailed captions (`halting_target: sentences`, ours): rank-first targets say whether a video is
easy to retrieve, not how much happens in it, and trained on them the stop probability did not follow the number of
events. With `sentences`, a detailed caption of S sentences (an opening scene sentence, then one per event) sets the
target of step t to 1 from t = min(S, K) on: one embedding token per described sentence, so the stop head must learn
from the pixels how much there is to describe. Only detailed captions feed halting then (rank-first targets from the
other tasks would contradict them), and `halting_min_batch` does not apply (the targets do not depend on the batch).
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import LossCfg  # noqa: F401  (this stage's config; torch-free home in config.py)
from .contrastive import _gather_rows, _gather_sizes, gathered_infonce


def lm_loss(model, batch) -> torch.Tensor:
    return model.lm_loss(batch["frames"], batch["prompt"], batch["target"])


def _steps(cfg: LossCfg, K: int, min_tokens: int) -> range:
    if cfg.embed_steps == "all":
        return range(min_tokens - 1, K)
    if cfg.embed_steps == "last":
        return range(K - 1, K)
    raise ValueError(f"loss.embed_steps: expected 'all' or 'last', got {cfg.embed_steps!r}")


def contrastive_loss(cfg: LossCfg, per_step: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     min_tokens: int = 1, groups: torch.Tensor | None = None) -> torch.Tensor:
    """per_step (B, K, D) video embeddings of every prefix length, text (B, D) -> symmetric InfoNCE (gathered)."""
    steps = _steps(cfg, per_step.shape[1], min_tokens)
    if torch.is_tensor(logit_scale):  # the model keeps it as a (1,) parameter (FSDP2 shards no 0-d ones)
        logit_scale = logit_scale.reshape(())
    losses = [gathered_infonce(per_step[:, t], text, logit_scale, groups=groups) for t in steps]
    return torch.stack(losses).mean()


_WORD = re.compile(r"[A-Za-z]+")


def swapped_texts(text: str, classes: list[list[str]]) -> list[str]:
    """One copy of `text` per word class in which two different words of the class occur: the first two such words
    (in reading order) exchanged everywhere they occur, each keeping the case of the word it replaces. "a red circle
    near a blue square" -> ["a blue circle near a red square", "a red square near a blue circle"] for the classes
    [colours, shapes]. A text with no such pair gives []."""
    out = []
    if not isinstance(text, str):  # token ids (the memory estimate's fake batches): no words to exchange
        return out
    for words in classes:
        vocab = {w.lower() for w in words}
        found: list[str] = []
        for m in _WORD.finditer(text):
            w = m.group(0).lower()
            if w in vocab and w not in found:
                found.append(w)
        if len(found) < 2:
            continue
        a, b = found[:2]

        def swap(m, a=a, b=b):
            w = m.group(0)
            low = w.lower()
            if low not in (a, b):
                return w
            other = b if low == a else a
            return other.capitalize() if w[0].isupper() else other

        out.append(_WORD.sub(swap, text))
    return out


def swap_loss(cfg: LossCfg, per_step: torch.Tensor, text: torch.Tensor, negatives: torch.Tensor, owner: torch.Tensor,
              logit_scale: torch.Tensor, min_tokens: int = 1, count: float | None = None) -> torch.Tensor:
    """per_step (B, K, D) video embeddings, text (B, D) their captions, negatives (N, D) swapped-word copies of the
    captions of videos `owner` (N,) -> the mean over the copies and the trained prefix lengths of
    softplus(scale * (cos(video, copy) - cos(video, caption))): the caption must outscore its own swapped copy. A
    pairwise term rather than extra columns of the InfoNCE, so the fused kernels' batch layout stays as it is.
    `count` replaces N as the number of copies the sum is divided by (multitask_loss: the global count / world size,
    so the mean over ranks is the mean over every rank's copies)."""
    steps = list(_steps(cfg, per_step.shape[1], min_tokens))
    v = per_step[owner][:, steps].float()  # (N, S, D)
    pos = torch.einsum("nsd,nd->ns", v, text[owner].float())
    neg = torch.einsum("nsd,nd->ns", v, negatives.float())
    terms = F.softplus(logit_scale.reshape(()).float() * (neg - pos))
    if count is None or count == owner.numel():
        return terms.mean()
    return terms.sum() / (len(steps) * count)


def localisation_loss(cfg: LossCfg, window_per_step: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                      min_tokens: int = 1, window_mask: torch.Tensor | None = None) -> torch.Tensor:
    """window_per_step (B, W, K, D): embeddings of W windows per query (index 0 = ground truth, the others IoU < 0.2
    hard negatives); text (B, D); window_mask (B, W) False for padding windows. Cross-entropy over each query's
    windows."""
    steps = _steps(cfg, window_per_step.shape[2], min_tokens)
    target = torch.zeros(text.shape[0], dtype=torch.long, device=text.device)
    losses = []
    for t in steps:
        logits = logit_scale * torch.einsum("bwd,bd->bw", window_per_step[:, :, t].float(), text.float())
        if window_mask is not None:
            logits = logits.masked_fill(~window_mask.to(logits.device), float("-inf"))
        losses.append(F.cross_entropy(logits, target))
    return torch.stack(losses).mean()


def matching_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float().to(logits.device))


@torch.no_grad()
def halting_targets(per_step: torch.Tensor, text: torch.Tensor, margin: float,
                    groups: torch.Tensor | None = None) -> torch.Tensor:
    """per_step (B, K, D), text (B, D) paired row by row -> (B, K) float targets in {0, 1}: 1 where the step-t
    embedding ranks its own text first among the (global, all ranks') batch's texts by at least `margin` (cosine).
    Texts of the same group (other captions of the same video) are not competitors."""
    B = text.shape[0]
    texts, offset = text.float(), 0
    all_groups = groups
    if dist.is_initialized() and dist.get_world_size() > 1:  # rank among the global batch, like the loss does
        sizes = _gather_sizes(B, text.device)
        offset = sum(sizes[: dist.get_rank()])
        texts = _gather_rows(texts.contiguous(), sizes)
        if groups is not None:
            all_groups = _gather_rows(groups.contiguous(), sizes)
    sims = torch.einsum("bkd,nd->bkn", per_step.float(), texts)
    idx = torch.arange(B, device=text.device)
    pos = sims[idx, :, idx + offset]  # (B, K)
    competitor = torch.ones(B, texts.shape[0], dtype=torch.bool, device=text.device)
    competitor[idx, idx + offset] = False
    if groups is not None:
        competitor &= groups[:, None] != all_groups[None, :]
    if not bool(competitor.any()):
        return torch.ones_like(pos)
    neg = sims.masked_fill(~competitor[:, None, :], float("-inf")).amax(-1)
    return (pos - neg >= margin).float()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def count_sentences(text: str) -> int:
    """Sentences of a caption: pieces ending in . ! or ? followed by white space (the last piece needs no end)."""
    return sum(1 for piece in _SENTENCE_END.split(text.strip()) if piece)


def length_targets(texts: list[str], k: int, device=None) -> torch.Tensor:
    """Detailed captions -> (B, k) halting targets: 1 from step min(S, k) on, S = the caption's sentence count."""
    n = torch.tensor([min(max(count_sentences(t), 1), k) for t in texts], device=device)
    return (torch.arange(k, device=device)[None] >= (n - 1)[:, None]).float()


def expected_tokens(stop_logits: torch.Tensor, min_tokens: int = 1) -> torch.Tensor:
    """(B, K) stop logits -> (B,) expected number of embedding tokens when stopping at step t with probability p_t
    (no stop before min_tokens, forced stop at K)."""
    p = torch.sigmoid(stop_logits.float())
    K = p.shape[1]
    t = torch.arange(K, device=p.device)
    p = torch.where(t[None] < min_tokens - 1, torch.zeros_like(p), p)
    survive = torch.cumprod(1 - p, dim=1)  # P(n > t + 1)
    return 1 + survive[:, : K - 1].sum(1)


def halting_loss(cfg: LossCfg, stop_logits: torch.Tensor, targets: torch.Tensor, min_tokens: int = 1):
    """-> (loss, stats). BCE over steps >= min_tokens (the last step included: stopping there is forced, but its
    target still says whether the full-length embedding is good) + token_cost * E[tokens]."""
    valid = slice(min_tokens - 1, None)
    bce = F.binary_cross_entropy_with_logits(stop_logits[:, valid].float(), targets[:, valid])
    exp_tokens = expected_tokens(stop_logits, min_tokens)
    loss = cfg.halting * bce + cfg.token_cost * exp_tokens.mean()
    stats = {"halting_bce": float(bce.detach()), "expected_tokens": float(exp_tokens.detach().mean()),
             "stop_target_rate": float(targets[:, valid].mean())}
    return loss, stats


def _global_batch(x: torch.Tensor) -> int:
    if dist.is_initialized() and dist.get_world_size() > 1:
        return sum(_gather_sizes(x.shape[0], x.device))
    return x.shape[0]


def _key_groups(keys: list[str], device) -> torch.Tensor:
    """Group ids that are equal exactly for equal strings (clip keys; the composed task's edited captions), on every
    rank (they are gathered across ranks)."""
    from .data import group_id

    return torch.tensor([group_id(k) for k in keys], dtype=torch.long, device=device)


def multitask_loss(model, batches: dict[str, dict], cfg: LossCfg, contrastive_chunk: int = 0,
                   grad_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """One batch per task -> (weighted total, components). Which losses each task feeds:
    caption / detailed_caption: LM + contrastive (+ halting) against the target caption; qa: LM;
    retrieval: contrastive (+ halting); localisation: window-contrastive; matching: BCE; composed: contrastive
    between the composed query (video + edit text) and the edited caption (no halting: its targets describe the
    source video, not the query).

    `contrastive_chunk` > 0 (`train.contrastive_chunk`): the caption / retrieval contrastive + halting terms go
    through gradient caching (ville/gradcache.py), the towers run that many samples at a time, and the caption
    tasks' LM term runs in chunks of that size too (`gradcache.lm_loss_cached`). Their gradients, times
    `grad_scale`, are accumulated into `.grad` here, so their value enters the total without gradient; the caller
    back-propagates the total (times `grad_scale`) for the rest. Same loss and gradients as 0 (without dropout: the
    LM chunks draw their own dropout masks)."""
    if cfg.halting_target not in ("rank", "sentences"):
        raise ValueError(f"loss.halting_target: expected 'rank' or 'sentences', got {cfg.halting_target!r}")
    e = model.cfg.embed
    kmin, scale = e.min_embed_tokens, model.logit_scale.exp().squeeze(0)
    total = model.logit_scale.new_zeros(())
    comps: dict[str, float] = {}
    samples = tokens = 0

    def add(name, weight, value):
        nonlocal total
        total = total + weight * value
        comps[name] = float(value.detach())

    def embed_and_contrast(task, b, text, groups, video=None):
        nonlocal total
        if contrastive_chunk > 0:
            from .gradcache import contrastive_loss_cached

            value, parts = contrastive_loss_cached(model, cfg, b["frames"], list(text), groups, contrastive_chunk,
                                                   grad_scale)
            total = total + value  # weighted already; its gradients are in .grad
            comps.update({f"{k}_{task}": v for k, v in parts.items()})
            return
        steps = model.video_embed_steps(b["frames"], video=video)
        text_emb = model.text_embed_train(text)
        add(f"contrastive_{task}", cfg.contrastive,
            contrastive_loss(cfg, steps.per_step, text_emb, scale, kmin, groups=(groups, groups)))
        if cfg.swap > 0:
            pairs = [(i, t) for i, caption in enumerate(text) for t in swapped_texts(caption, cfg.swap_classes)]
            # The mean over the global batch's copies (ranks may hold different numbers of them); every rank logs
            # the term (the logged components are all-reduced by name), zero without a copy.
            counts = [len(pairs)]
            if dist.is_initialized() and dist.get_world_size() > 1:
                counts = _gather_sizes(len(pairs), text_emb.device)
            value = total.new_zeros(())
            if pairs:
                owner = torch.tensor([i for i, _ in pairs], device=text_emb.device)
                value = swap_loss(cfg, steps.per_step, text_emb, model.text_embed_train([t for _, t in pairs]), owner,
                                  scale, kmin, count=sum(counts) / len(counts))
            add(f"swap_{task}", cfg.swap, value)
        if cfg.halting <= 0 and cfg.token_cost <= 0:
            return
        if cfg.halting_target == "sentences":
            if task != "detailed_caption":
                return
            targets = length_targets(text, steps.stop_logits.shape[1], text_emb.device)
        elif _global_batch(text_emb) >= cfg.halting_min_batch:
            targets = halting_targets(steps.per_step, text_emb, cfg.halting_margin, groups)
        else:
            return
        h, stats = halting_loss(cfg, steps.stop_logits, targets, kmin)
        add(f"halting_{task}", 1.0, h)
        comps.update({f"{k}_{task}": v for k, v in stats.items()})

    for task, b in batches.items():
        frames = b["frames"]
        samples += frames.shape[0]
        tokens += frames.shape[0] * frames.shape[-4] * model.vision.tokens_per_frame
        if task in ("caption", "detailed_caption") and contrastive_chunk > 0:
            # A contrastive batch cached in chunks: the LM term of the same captions runs in chunks too (each chunk
            # back-propagated at once), so no pass holds the whole batch's activations. No shared tower pass.
            from .gradcache import lm_loss_cached

            value = lm_loss_cached(model, frames, b["prompt"], b["target"], contrastive_chunk, cfg.lm * grad_scale)
            add(f"lm_{task}", cfg.lm, value.to(total.device))
            if cfg.contrastive > 0:
                embed_and_contrast(task, b, b["target"], _key_groups(b["keys"], frames.device))
        elif task in ("caption", "detailed_caption", "qa"):
            video = model.encode_video(frames)  # tokens + motion energy, shared by the LM and embedding passes
            add(f"lm_{task}", cfg.lm, model.lm_loss(frames, b["prompt"], b["target"], video=video))
            if task != "qa" and cfg.contrastive > 0:
                embed_and_contrast(task, b, b["target"], _key_groups(b["keys"], frames.device), video)
        elif task == "retrieval":
            embed_and_contrast(task, b, b["text"], b["group"].to(frames.device))
        elif task == "localisation":
            B, W = frames.shape[:2]
            steps = model.video_embed_steps(frames.flatten(0, 1), moment=True)
            per_step = steps.per_step.unflatten(0, (B, W))
            text_emb = model.text_embed_train(b["text"], moment=True)
            adapter = model.moment_adapter  # an isolating adapter is all that localisation trains (ville/adapter.py)
            loc_scale = scale.detach() if adapter is not None and adapter.cfg.isolate else scale
            add("localisation", cfg.localisation,
                localisation_loss(cfg, per_step, text_emb, loc_scale, kmin, b.get("window_mask")))
        elif task == "matching":
            add("matching", cfg.matching, matching_loss(model.match_logits(frames, b["text"]), b["label"]))
        elif task == "composed":
            steps = model.composed_embed_steps(frames, b["edit"])
            groups = _key_groups(b["text"], frames.device)  # two edits of one clip are negatives of each other
            add("contrastive_composed", cfg.composed, contrastive_loss(
                cfg, steps.per_step, model.text_embed_train(b["text"]), scale, kmin, groups=(groups, groups)))
        else:
            raise ValueError(f"train.tasks: unknown task {task!r}")
    comps["logit_scale"] = float(scale.detach())
    comps["samples"], comps["video_tokens"] = samples, tokens
    return total, comps
