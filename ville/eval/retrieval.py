"""Text-video retrieval and its re-ranking.

`retrieval`: zero-shot cosine similarity of L2-normalised embeddings, T2V and V2T, ties pessimistic. One query per
video (its `caption`, labelled by the converter's `caption_source`: the MSR-VTT 1k-A csv sentence, or DiDeMo's /
ActivityNet's paragraph) and, where clips have several captions, every caption, with both video-to-text protocols
(all texts ranked; CLIP4Clip's per-video maximum); dual-softmax inference only on request and labelled as such.
`rerank`: single-caption T2V; stage 1 ranks the gallery by embedding cosine, stage 2 re-orders each query's top k by
a matching score (or its fusion with the cosine): the matching head's probability (`rerank_score: match`) or the
LM's mean log-probability per token of the caption given the video under the caption prompt (`lm`, generative
matching: the score the LM loss trains).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import metrics as M
from ..data import CAPTION_PROMPT, ClipStore
from ..video import decode_clip
from .common import Cache, captions, directions, gather, my_batches, pct, progress_bar, rank_world, single_caption
from .config import KS, EvalCfg


# What a clip's `caption` is, by the converter's `caption_source` (data_tools/SCHEMA.md).
CAPTION_SOURCES = {
    "paragraph": "paragraph-to-video: the video's descriptions joined in order (DiDeMo / ActivityNet Captions "
                 "paragraph protocol)",
    "msrvtt_1k_a": "MSR-VTT 1k-A: the video's one sentence of MSRVTT_JSFUSION_test.csv",
    "first_caption": "the first of the video's captions",
}


def _caption_label(clips) -> str:
    sources = sorted({str(m.get("caption_source", "")) for _, m in clips})
    return "; ".join(CAPTION_SOURCES.get(x, f"caption_source {x!r}") if x else
                     "its `caption` field (the first of `captions` when absent)" for x in sources)


def retrieval(clips, V: torch.Tensor, temb: dict, cfg: EvalCfg, dsl_scale: float) -> dict:
    tie = ("ties pessimistic (a negative scoring >= the correct item ranks ahead of it; CLIP4Clip's compute_metrics "
           "instead counts a tied query at every tied position)")
    out = {"protocol": f"zero-shot cosine similarity of L2-normalised embeddings; {tie}; R@k in %, MdR/MnR = "
                       f"median (numpy: mean of the two middle ranks when even)/mean rank of the best-ranked correct "
                       f"item", "num_videos": len(clips)}
    protocols = {"single_caption": (f"one query per video, its caption: {_caption_label(clips)}; V2T: the video's "
                                    f"caption is the only correct text among the videos' captions",
                                    [(i, single_caption(m)) for i, (_, m) in enumerate(clips)])}
    if any(len(captions(m)) > 1 for _, m in clips):
        protocols["all_captions"] = ("every caption in `captions` is a T2V query with its video as the answer "
                                     "(MdR_lower: the lower middle rank, CLIP4Clip's torch.median); v2t: each video "
                                     "ranks ALL texts of the split, correct at its best-ranked own caption; "
                                     "v2t_video_max: CLIP4Clip's multi-sentence V2T, each video's captions reduced to "
                                     "their maximum score and the per-video maxima ranked (one item per video)",
                                     [(i, c) for i, (_, m) in enumerate(clips) for c in captions(m)])
    for name, (text, pairs) in protocols.items():
        pairs = [(i, c) for i, c in pairs if c]
        if not pairs:
            return {"protocol": "not available: no clip of the split has a caption", "num_videos": len(clips)}
        T = torch.stack([temb[c] for _, c in pairs]).double()
        S = T @ V.T
        owner = [i for i, _ in pairs]
        out[name] = {"protocol": text, "num_texts": len(pairs), **directions(S, owner, len(clips))}
        if name == "all_captions":
            out[name]["t2v"]["MdR_lower"] = M.lower_median(M.retrieval_ranks(
                S, torch.nn.functional.one_hot(torch.tensor(owner), len(clips)).bool()))
            has = sorted(set(owner))  # videos with a caption: the per-video maxima gallery
            video_max = M.per_video_max(S, owner, len(clips))[has][:, has]
            ranks = M.retrieval_ranks(video_max, torch.eye(len(has), dtype=torch.bool))
            out[name]["v2t_video_max"] = pct(M.recall_metrics(ranks, KS))
            out[name]["chance"]["v2t_video_max"] = pct(M.chance_recall(len(has), np.ones(len(has)), KS))
        if cfg.dual_softmax:
            dsl = {"t2v": M.dual_softmax(S, dsl_scale), "v2t": M.dual_softmax(S.T, dsl_scale).T}
            res_t = directions(dsl["t2v"], owner, len(clips))
            res_v = directions(dsl["v2t"], owner, len(clips))
            out[name + "_dual_softmax"] = {
                "protocol": f"{text}; DUAL-SOFTMAX inference (scores * softmax({dsl_scale:.4g} * scores) over the "
                            f"query set): uses all test queries at once, not comparable with plain numbers",
                "num_texts": len(pairs), "t2v": res_t["t2v"], "v2t": res_v["v2t"], "chance": res_t["chance"]}
    return out


RERANK_SCORES = ("match", "lm")


def check_rerank_score(kind: str) -> None:
    if kind not in RERANK_SCORES:
        raise ValueError(f"rerank_score: expected 'match' or 'lm', got {kind!r}")


@torch.no_grad()
def pair_scores(model, frames, texts: list[str], kind: str, video: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float32 on the CPU: the re-ranking score of video i with text i. 'match': the matching head's probability
    (model.match); 'lm': the text's mean log-probability per token as the video's caption (model.target_logprob
    under the caption prompt). `frames` / `video` as in model.match."""
    if kind == "match":
        values = model.match(frames, texts, video=video)
    else:
        values = model.target_logprob(frames, [CAPTION_PROMPT] * len(texts), texts, video=video)
    return values.float().cpu()


def fused_scores(cosine: torch.Tensor, values: torch.Tensor, kind: str, scale: float,
                 weight: float | None) -> torch.Tensor:
    """The order of a query's candidates: `values` (pair_scores) alone when `weight` is None, else scale * cosine +
    weight * score, the score being logit(probability) for 'match' and the log-probability for 'lm'. float64."""
    values = values.double()
    if weight is None:
        return values
    return scale * cosine.double() + weight * (torch.logit(values, eps=1e-6) if kind == "match" else values)


def rerank(model, clips, V, temb, store: ClipStore, cache: Cache, cfg: EvalCfg, scale: float) -> dict:
    k = cfg.rerank_k
    check_rerank_score(cfg.rerank_score)
    pairs = [(i, single_caption(m)) for i, (_, m) in enumerate(clips) if single_caption(m)]
    if not pairs:
        return {"protocol": "not available: no clip of the split has a caption", "num_queries": 0}
    T = torch.stack([temb[c] for _, c in pairs]).double()
    S = T @ V.T
    top = torch.from_numpy(np.argsort(-S.numpy(), axis=1, kind="stable")[:, :k])  # ties: lower gallery index first
    keys = [key for key, _ in clips]
    name = f"{cfg.split}-{cfg.num_frames}-{'match' if cfg.rerank_score == 'match' else 'lm-score'}-{cfg.frame_size}px"
    done = cache.load(name)
    todo: dict[str, list[str]] = {}
    for q, (_, text) in enumerate(pairs):
        for j in top[q].tolist():
            if f"{keys[j]}\t{text}" not in done:
                todo.setdefault(keys[j], []).append(text)
    new = {}
    for batch in progress_bar(my_batches(sorted(todo), 1), "rerank", cfg):
        key = batch[0]
        frames = torch.from_numpy(decode_clip(store.read(key), cfg.num_frames, size=cfg.frame_size)[0])[None]
        tokens = model.video_tokens(frames.to(model.device))  # once per video, not once per (video, text) pair
        texts = sorted(set(todo[key]))
        for c in range(0, len(texts), cfg.batch_size):
            chunk = texts[c:c + cfg.batch_size]
            values = pair_scores(model, None, chunk, cfg.rerank_score, video=tokens.expand(len(chunk), -1, -1))
            new.update({f"{key}\t{t}": float(v) for t, v in zip(chunk, values)})
    new = gather(new)
    if new:
        done.update(new)
        cache.save(name, done)
    if rank_world()[0] != 0:  # metrics on rank 0 only
        return {}
    second = []
    pos = torch.zeros(S.shape, dtype=torch.bool)
    pos[torch.arange(len(pairs)), torch.tensor([i for i, _ in pairs])] = True
    first = M.retrieval_ranks(S, pos)
    for q, (owner, text) in enumerate(pairs):
        cands = top[q].tolist()
        if owner not in cands:
            second.append(int(first[q]))
            continue
        values = torch.tensor([done[f"{keys[j]}\t{text}"] for j in cands], dtype=torch.float64)
        score = fused_scores(S[q, cands], values, cfg.rerank_score, scale, cfg.rerank_fusion)
        second.append(int(M.retrieval_ranks(score[None], torch.tensor([j == owner for j in cands])[None])[0]))
    s1, s2 = pct(M.recall_metrics(first, KS)), pct(M.recall_metrics(second, KS))
    if cfg.rerank_score == "lm":
        what = (f"the caption's mean log-probability per token given the video and {CAPTION_PROMPT!r} "
                "(model.target_logprob)")
    elif cfg.rerank_fusion is None:
        what = "the matching head's probability (model.match)"
    else:
        what = "logit(matching probability) (model.match)"
    by = what if cfg.rerank_fusion is None else f"{scale:.4g} x cosine + {cfg.rerank_fusion:g} x {what}"
    return {"protocol": f"single-caption T2V; stage 1 ranks the gallery by embedding cosine, stage 2 re-orders each "
                        f"query's top-{k} (stable sort, ties to the lower gallery index) by {by}, ties pessimistic; "
                        f"items below the top-{k} keep their rank",
            "k": k, "num_queries": len(pairs), "score": cfg.rerank_score, "fusion_weight": cfg.rerank_fusion,
            "stage1": s1, "stage2": s2,
            "gain": {f"R@{x}": round(s2[f"R@{x}"] - s1[f"R@{x}"], 2) for x in KS},
            "oracle_R@1": round(100.0 * float(np.mean(np.asarray(first) <= k)), 2)}
