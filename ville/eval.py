"""Evaluation: one model, every task, labelled protocols, cached embeddings; single process or torchrun.

    python -m ville.eval MODEL_DIR --data DIR [--out results.json] [--tasks retrieval rerank moment qa composed
        long_text adaptive] [--split test|compositional] [--max-clips N] [--num-frames T] [--batch-size B]
        [--dual-softmax] [--rerank-k 10]
    torchrun --nproc-per-node N -m ville.eval ...     (same code; CUDA -> nccl, CPU -> gloo)

In-process: `evaluate(model_or_dir, data_dir, tasks=..., split=..., **options) -> dict` (the results on rank 0,
None on the other ranks); options are the fields of `EvalCfg`.

Flow: the split's clips are listed from the tar indexes (JSON only). Work that needs the model -- video, text,
window and composed embeddings, QA answers, matching scores -- is looked up in the cache first; what is missing is
split across ranks in fixed batches (batch b on rank b % world_size, so every rank's batches are the ones a single
process would form, and the numbers do not depend on the world size), computed, all-gathered and written to the
cache by rank 0. Metrics are computed from the gathered results by rank 0 only (`ville.metrics`, which documents the
formulas and the tie rule). Cache files: `CACHE/{model identity}-{split}-{num_frames}-{what}-{frame size}px.pt`
(plus `CACHE/{identity}-texts.pt`); the identity is the hash of the weights and the config
(`ville.checkpoint.model_identity`) or, for an in-memory model, of its state dict and config, so neither a retrained
model nor an edited stop rule ever reads stale entries.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import metrics as M
from .data import QA_PROMPT, ClipStore, expand_shards, iter_eval_clips, read_shard_index
from .video import decode_clip, decode_windows, probe, sliding_windows

TASKS = ("retrieval", "rerank", "moment", "qa", "composed", "long_text", "adaptive")
KS = (1, 5, 10)


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class EvalCfg:
    """evaluate()'s options; each is also a command-line flag (`max_clips` -> `--max-clips`)."""
    tasks: tuple = TASKS
    split: str = _opt("test", "clip split: test, compositional, val, ...")
    max_clips: int | None = _opt(None, "only the first N clips of the split (and the first N composed triplets)")
    num_frames: int | None = _opt(None, "frames per clip / window (default: the model's max_frames)")
    batch_size: int = _opt(8, "clips (or texts, questions) per model call")
    window_batch_size: int = _opt(40, "moment windows per model call (a video's windows share their frames' tower "
                                      "pass; one call for the default 40 windows of a clip)")
    frame_size: int | None = _opt(None, "decode at this square size (default: the vision tower's input size)")
    dual_softmax: bool = _opt(False, "also report dual-softmax retrieval (labelled as such)")
    dual_softmax_scale: float | None = _opt(None, "dual-softmax temperature (default: the model's logit scale)")
    rerank_k: int = _opt(10, "the matching head re-ranks each query's top k")
    rerank_fusion: float | None = _opt(None, "stage 2 orders the top k by scale * cosine + W * logit(match "
                                             "probability) instead of the probability alone (choose W on val)")
    moment_scales: tuple = _opt((0.1, 0.2, 0.3, 0.5, 0.75, 1.0), "window lengths, fractions of the duration")
    moment_stride: float = _opt(0.5, "window step, fraction of the window length")
    nms_threshold: float = _opt(0.5, "temporal NMS: drop windows with IoU > this with a better one")
    moment_score: str = _opt("cosine", "window scores: 'cosine' (text-window), or 'zscale' (that cosine standardised "
                                       "among the query's windows of the same length; choose on val)")
    qa_max_new_tokens: int = _opt(8, "greedy answer length limit")
    qa_min_new_tokens: int = _opt(1, "<eos> is not allowed before this many answer tokens (every answer is a word)")
    composed_split: str = _opt("composed", "composed triplets; the gallery is <this>_gallery")
    out: str | None = _opt(None, "results JSON; the plot goes beside it (CLI default: eval_out/<model>-<split>.json)")
    cache_dir: str | None = _opt(None, "embedding cache (default: cache/ beside --out; '' disables caching)")
    progress: bool = True


# ------------------------------------------------------------------------------------------------ ranks and caching
def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(local: dict) -> dict:
    """Union of every rank's dict (values must be CPU objects)."""
    rank, world = _dist()
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged


def _my_batches(items: list, batch_size: int) -> list[list]:
    rank, world = _dist()
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    return batches[rank::world]


def _bar(iterable, desc: str, cfg: EvalCfg, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, disable=not cfg.progress or _dist()[0] != 0, leave=False)


class Cache:
    """Per-item results in one torch file per kind: a dict item id -> value, merged and rewritten atomically."""

    def __init__(self, root: str | None, identity: str):
        self.root, self.identity = root, identity

    def path(self, name: str) -> str:
        return os.path.join(self.root, f"{self.identity}-{name}.pt")

    def load(self, name: str) -> dict:
        if not self.root or not os.path.isfile(self.path(name)):
            return {}
        return torch.load(self.path(name), map_location="cpu", weights_only=False)

    def save(self, name: str, data: dict) -> None:
        """Called by every rank with the same (gathered) data; rank 0 writes, then all wait, so no rank ever loads a
        file another rank is about to change and every rank sees the same cache state (the work split relies on it)."""
        rank, world = _dist()
        if self.root and rank == 0:
            os.makedirs(self.root, exist_ok=True)
            tmp = self.path(name) + ".tmp"
            torch.save(data, tmp)
            os.replace(tmp, self.path(name))
        if world > 1:
            dist.barrier()


def state_identity(model: torch.nn.Module) -> str:
    """Content hash of an in-memory model's weights and config (for a saved model use
    `ville.checkpoint.model_identity`)."""
    from .config import to_yaml

    h = hashlib.sha256()
    if getattr(model, "cfg", None) is not None:
        h.update(to_yaml(model.cfg).encode() + b"\0")
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sd-" + h.hexdigest()[:16]


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


# ---------------------------------------------------------------------------------------------------------- clips
def split_shards(data_dir: str, split: str) -> list[str]:
    d = os.path.join(data_dir, split)
    if not os.path.isdir(d):
        raise ValueError(f"{data_dir!r} has no split folder {split!r}")
    return expand_shards(os.path.join(d, "*.tar"))


def list_clips(shards: list[str]) -> list[tuple[str, dict]]:
    """(key, JSON) of every clip with a non-empty video member, in the order `iter_eval_clips` yields them."""
    out = []
    for shard in shards:
        for s in read_shard_index(shard):
            member = "mp4" if "mp4" in s.members else (s.meta or {}).get("video_ext")
            if member in s.members and s.members[member][1] > 0:
                out.append((s.key, s.meta or {}))
    return out


def _captions(meta: dict) -> list[str]:
    caps = meta.get("captions")
    caps = [c for c in caps if isinstance(c, str) and c.strip()] if isinstance(caps, list) else []
    if not caps and isinstance(meta.get("caption"), str) and meta["caption"].strip():
        caps = [meta["caption"]]
    return caps


def _single_caption(meta: dict) -> str | None:
    cap = meta.get("caption")
    if isinstance(cap, str) and cap.strip():
        return cap
    caps = _captions(meta)
    return caps[0] if caps else None


def _qa_items(meta: dict) -> list[dict]:
    qa = meta.get("qa")
    return [q for q in qa if isinstance(q, dict) and isinstance(q.get("question"), str)
            and str(q.get("answer", "")).strip()] if isinstance(qa, list) else []


def _events(meta: dict) -> list[dict]:
    evs = meta.get("events")
    return [e for e in evs if isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"].strip()
            and isinstance(e.get("start"), (int, float)) and isinstance(e.get("end"), (int, float))
            and e["end"] > e["start"]] if isinstance(evs, list) else []


def _gt_windows(ev: dict) -> np.ndarray:
    wins = ev.get("windows")
    if isinstance(wins, list) and wins:
        return np.array(wins, dtype=np.float64).reshape(-1, 2)
    return np.array([[ev["start"], ev["end"]]], dtype=np.float64)


def _clip_pass(model, shards, order: dict, need_embed: set, need_qa: dict, cfg: EvalCfg, desc: str
               ) -> tuple[dict, dict]:
    """One ordered pass over clips: video embeddings (timed) for keys in `need_embed`, greedy answers for
    need_qa {key: [(qid, prompt)]}. `order` maps key -> position; the pass stops after the last needed one."""
    videos, answers = {}, {}
    wanted = [order[k] for k in set(need_embed) | set(need_qa) if k in order]
    if not wanted:
        return _gather(videos), _gather(answers)
    stop = max(wanted)
    rank, world = _dist()
    total = math.ceil((stop + 1) / cfg.batch_size / world)
    loader = iter_eval_clips(shards, cfg.num_frames, rank=rank, world_size=world, batch_size=cfg.batch_size,
                             frame_size=cfg.frame_size)
    for batch in _bar(loader, desc, cfg, total):
        keys, frames = batch["keys"], batch["frames"]
        if order.get(keys[0], -1) > stop:
            break
        idx = [i for i, k in enumerate(keys) if k in need_embed]
        if idx:
            _sync(model)
            t0 = time.perf_counter()
            out = model.embed_video(frames[idx].to(model.device))
            _sync(model)
            ms = 1000 * (time.perf_counter() - t0) / len(idx)
            for j, i in enumerate(idx):
                videos[keys[i]] = {"emb": out.embeddings[j].float().cpu(), "tokens": int(out.num_tokens[j]),
                                   "ms": ms, "batch": len(idx)}
        items = [(i, qid, prompt) for i, k in enumerate(keys) for qid, prompt in need_qa.get(k, [])]
        # One tower pass per clip, not per question (~14 per clip; the tower was most of QA's time).
        tokens = model.video_tokens(frames.to(model.device)) if items else None
        for chunk in [items[j:j + cfg.batch_size] for j in range(0, len(items), cfg.batch_size)]:
            sel = torch.tensor([c[0] for c in chunk], device=tokens.device)
            texts = model.generate(None, [c[2] for c in chunk], max_new_tokens=cfg.qa_max_new_tokens,
                                   min_new_tokens=cfg.qa_min_new_tokens, video=tokens[sel])
            answers.update({c[1]: t for c, t in zip(chunk, texts)})
    return _gather(videos), _gather(answers)


def _video_embeddings(model, shards, clips, cache: Cache, name: str, cfg: EvalCfg, need_qa: dict | None = None,
                      qa_name: str | None = None) -> tuple[dict, dict]:
    order = {k: i for i, (k, _) in enumerate(list_clips(shards))}
    videos = cache.load(name)
    answers = cache.load(qa_name) if qa_name else {}
    need_embed = {k for k, _ in clips if k not in videos}
    todo_qa = {k: [q for q in v if q[0] not in answers] for k, v in (need_qa or {}).items()}
    todo_qa = {k: v for k, v in todo_qa.items() if v}
    new_v, new_a = _clip_pass(model, shards, order, need_embed, todo_qa, cfg, f"clips {name}")
    if new_v:
        videos.update(new_v)
        cache.save(name, videos)
    if new_a:
        answers.update(new_a)
        cache.save(qa_name, answers)
    missing = [k for k, _ in clips if k not in videos] + [k for k, v in (need_qa or {}).items()
                                                         if any(q not in answers for q, _ in v)]
    if missing:
        raise RuntimeError(f"{len(missing)} clips could not be embedded (undecodable?), e.g. {missing[:3]}")
    return videos, answers


def _text_embeddings(model, texts: list[str], cache: Cache, cfg: EvalCfg) -> dict:
    done = cache.load("texts")
    missing = sorted(set(texts) - set(done))
    new = {}
    for batch in _bar(_my_batches(missing, cfg.batch_size), "texts", cfg):
        emb = model.embed_text(batch).float().cpu()
        new.update(zip(batch, emb))
    new = _gather(new)
    if new:
        done.update(new)
        cache.save("texts", done)
    return done


# -------------------------------------------------------------------------------------------------------- sections
def _pct(d: dict) -> dict:
    return {k: (round(v, 2) if isinstance(v, float) and k != "n" else v) for k, v in d.items()}


def _directions(scores: torch.Tensor, owner: list[int], num_videos: int, cfg_ks=KS) -> dict:
    """scores (num_texts, num_videos); owner[t] = the video of text t. T2V over texts, V2T over videos with text."""
    owner_t = torch.tensor(owner)
    pos = torch.zeros(scores.shape, dtype=torch.bool)
    pos[torch.arange(len(owner)), owner_t] = True
    t2v = M.retrieval_ranks(scores, pos)
    has = pos.any(0)
    v2t = M.retrieval_ranks(scores.T[has], pos.T[has])
    return {"t2v": _pct(M.recall_metrics(t2v, cfg_ks)), "v2t": _pct(M.recall_metrics(v2t, cfg_ks)),
            "chance": {"t2v": _pct(M.chance_recall(num_videos, np.ones(len(owner)), cfg_ks)),
                       "v2t": _pct(M.chance_recall(len(owner), pos.T[has].sum(1).numpy(), cfg_ks))}}


def _retrieval(clips, V: torch.Tensor, temb: dict, cfg: EvalCfg, dsl_scale: float) -> dict:
    tie = "ties pessimistic (a negative scoring >= the correct item ranks ahead of it)"
    out = {"protocol": f"zero-shot cosine similarity of L2-normalised embeddings; {tie}; R@k in %, MdR/MnR = "
                       f"median/mean rank of the best-ranked correct item", "num_videos": len(clips)}
    protocols = {"single_caption": ("one query per video: its `caption` field (MSR-VTT 1k-A style; the first of "
                                    "`captions` when `caption` is absent); V2T: the video's caption is the only "
                                    "correct text", [(i, _single_caption(m)) for i, (_, m) in enumerate(clips)])}
    if any(len(_captions(m)) > 1 for _, m in clips):
        protocols["all_captions"] = ("every caption in `captions` is a T2V query with its video as the answer; V2T: "
                                     "a video is correct at the rank of its best-ranked caption",
                                     [(i, c) for i, (_, m) in enumerate(clips) for c in _captions(m)])
    for name, (text, pairs) in protocols.items():
        pairs = [(i, c) for i, c in pairs if c]
        if not pairs:
            return {"protocol": "not available: no clip of the split has a caption", "num_videos": len(clips)}
        T = torch.stack([temb[c] for _, c in pairs]).double()
        S = T @ V.T
        owner = [i for i, _ in pairs]
        out[name] = {"protocol": text, "num_texts": len(pairs), **_directions(S, owner, len(clips))}
        if cfg.dual_softmax:
            dsl = {"t2v": M.dual_softmax(S, dsl_scale), "v2t": M.dual_softmax(S.T, dsl_scale).T}
            res_t = _directions(dsl["t2v"], owner, len(clips))
            res_v = _directions(dsl["v2t"], owner, len(clips))
            out[name + "_dual_softmax"] = {
                "protocol": f"{text}; DUAL-SOFTMAX inference (scores * softmax({dsl_scale:.4g} * scores) over the "
                            f"query set): uses all test queries at once, not comparable with plain numbers",
                "num_texts": len(pairs), "t2v": res_t["t2v"], "v2t": res_v["v2t"], "chance": res_t["chance"]}
    return out


def _rerank(model, clips, V, temb, store: ClipStore, cache: Cache, cfg: EvalCfg, scale: float) -> dict:
    k = cfg.rerank_k
    pairs = [(i, _single_caption(m)) for i, (_, m) in enumerate(clips) if _single_caption(m)]
    if not pairs:
        return {"protocol": "not available: no clip of the split has a caption", "num_queries": 0}
    T = torch.stack([temb[c] for _, c in pairs]).double()
    S = T @ V.T
    top = torch.from_numpy(np.argsort(-S.numpy(), axis=1, kind="stable")[:, :k])  # ties: lower gallery index first
    keys = [key for key, _ in clips]
    name = f"{cfg.split}-{cfg.num_frames}-match-{cfg.frame_size}px"
    done = cache.load(name)
    todo: dict[str, list[str]] = {}
    for q, (_, text) in enumerate(pairs):
        for j in top[q].tolist():
            if f"{keys[j]}\t{text}" not in done:
                todo.setdefault(keys[j], []).append(text)
    new = {}
    for batch in _bar(_my_batches(sorted(todo), 1), "rerank", cfg):
        key = batch[0]
        frames = torch.from_numpy(decode_clip(store.read(key), cfg.num_frames, size=cfg.frame_size)[0])[None]
        tokens = model.video_tokens(frames.to(model.device))  # once per video, not once per (video, text) pair
        texts = sorted(set(todo[key]))
        for c in range(0, len(texts), cfg.batch_size):
            chunk = texts[c:c + cfg.batch_size]
            probs = model.match(None, chunk, video=tokens.expand(len(chunk), -1, -1)).float().cpu()
            new.update({f"{key}\t{t}": float(p) for t, p in zip(chunk, probs)})
    new = _gather(new)
    if new:
        done.update(new)
        cache.save(name, done)
    if _dist()[0] != 0:  # metrics on rank 0 only
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
        score = torch.tensor([done[f"{keys[j]}\t{text}"] for j in cands], dtype=torch.float64)
        if cfg.rerank_fusion is not None:
            score = scale * S[q, cands] + cfg.rerank_fusion * torch.logit(score, eps=1e-6)
        second.append(int(M.retrieval_ranks(score[None], torch.tensor([j == owner for j in cands])[None])[0]))
    s1, s2 = _pct(M.recall_metrics(first, KS)), _pct(M.recall_metrics(second, KS))
    by = ("the matching head's probability (model.match)" if cfg.rerank_fusion is None else
          f"{scale:.4g} x cosine + {cfg.rerank_fusion:g} x logit(matching probability) (model.match)")
    return {"protocol": f"single-caption T2V; stage 1 ranks the gallery by embedding cosine, stage 2 re-orders each "
                        f"query's top-{k} (stable sort, ties to the lower gallery index) by {by}, ties pessimistic; "
                        f"items below the top-{k} keep their rank",
            "k": k, "num_queries": len(pairs), "fusion_weight": cfg.rerank_fusion, "stage1": s1, "stage2": s2,
            "gain": {f"R@{x}": round(s2[f"R@{x}"] - s1[f"R@{x}"], 2) for x in KS},
            "oracle_R@1": round(100.0 * float(np.mean(np.asarray(first) <= k)), 2)}


def _window_features(model, frames: np.ndarray, chunk: int = 64) -> torch.Tensor:
    """(W, T, H, W, 3) frames of one video's windows -> (W, T, N, C) `vision.frame_features`, one tower pass per
    distinct frame: overlapping windows share most of their frames (a clip's 40 windows x 8 frames hold ~40)."""
    W, T = frames.shape[:2]
    flat = frames.reshape(W * T, *frames.shape[2:])
    ids: dict[bytes, int] = {}  # pixels -> distinct-frame id (np.unique(axis=0) is ~100x slower)
    rows, inverse = [], []  # row of each distinct frame's first occurrence; each row's distinct id
    for r, f in enumerate(flat):
        key = f.tobytes()
        if key not in ids:
            ids[key] = len(rows)
            rows.append(r)
        inverse.append(ids[key])
    distinct = torch.from_numpy(flat[rows])[:, None]  # (U, 1, H, W, 3)
    inverse = torch.tensor(inverse)
    feats = torch.cat([model.vision.frame_features(distinct[i:i + chunk].to(model.device))
                       for i in range(0, len(distinct), chunk)])[:, 0]  # (U, N, C)
    return feats[inverse].reshape(W, T, *feats.shape[1:])


def _window_rows(windows: np.ndarray) -> list[tuple[float, float]]:
    return [(round(float(a), 6), round(float(b), 6)) for a, b in windows]


def _moment(model, clips, temb, store: ClipStore, cache: Cache, cfg: EvalCfg) -> dict:
    # Window embeddings are cached per window (a window's frames depend on that window alone), so another set of
    # scales reuses every window it shares with the cached ones (the demo chooses the scales on val).
    name = f"{cfg.split}-{cfg.num_frames}-windows-{cfg.frame_size}px"
    done = cache.load(name)
    with_events = [(k, m) for k, m in clips if _events(m)]
    if not with_events:
        return {"protocol": "not available: no clip of the split has `events`", "num_queries": 0}
    wanted = {}  # key -> (duration, the candidate windows of cfg's scales, those not cached yet)
    for key, _ in with_events:
        entry = done.get(key)
        duration = float(store.meta(key).get("duration") or (entry or {}).get("duration")
                         or probe(store.read(key)).duration)
        windows = sliding_windows(duration, cfg.moment_scales, cfg.moment_stride)
        have = set(_window_rows(entry["windows"])) if entry else set()
        wanted[key] = (duration, windows, windows[[r not in have for r in _window_rows(windows)]])
    todo = [k for k, (_, _, missing) in wanted.items() if len(missing)]
    new = {}
    for batch in _bar(_my_batches(todo, 1), "moment windows", cfg):
        key = batch[0]
        duration, _, missing = wanted[key]
        frames = decode_windows(store.read(key), missing, cfg.num_frames, size=cfg.frame_size)[0]
        features = _window_features(model, frames)
        embs = torch.cat([model.embed_video(None, features=features[i:i + cfg.window_batch_size]).embeddings.float()
                          .cpu() for i in range(0, len(missing), cfg.window_batch_size)])
        old = done.get(key)
        new[key] = {"duration": duration,
                    "windows": missing if old is None else np.concatenate([old["windows"], missing]),
                    "emb": embs if old is None else torch.cat([old["emb"], embs])}
    new = _gather(new)
    if new:
        done.update(new)
        cache.save(name, done)
    if _dist()[0] != 0:
        return {}
    preds, gts, top1, cands = [], [], [], []
    for key, meta in with_events:
        W = wanted[key][1]
        row = {r: i for i, r in enumerate(_window_rows(done[key]["windows"]))}
        E = done[key]["emb"][[row[r] for r in _window_rows(W)]].double()
        for ev in _events(meta):
            scores = (E @ temb[ev["text"]].double()).numpy()
            if cfg.moment_score == "zscale":
                scores = M.zscore_by_length(W, scores)
            keep = M.temporal_nms(W, scores, cfg.nms_threshold, max_keep=10)
            preds.append(np.concatenate([W[keep], scores[keep, None]], 1))
            top1.append(W[keep[0]])
            gts.append(_gt_windows(ev))
            cands.append(W)
    r1 = M.moment_r1(np.array(top1), gts)
    ap = M.moment_average_precision(preds, gts)
    zscale = ", standardised among the query's windows of the same length" if cfg.moment_score == "zscale" else ""
    return {"protocol": f"each event text of each clip is a query over that clip's candidate windows (lengths "
                        f"{list(cfg.moment_scales)} x duration, stride {cfg.moment_stride} x length, one window flush "
                        f"with the end; {cfg.num_frames} frames decoded per window), scored by text-window cosine"
                        f"{zscale}, "
                        f"temporal NMS (IoU > {cfg.nms_threshold} suppressed), top 10 kept; R1@t / mIoU / mAP as the "
                        f"QVHighlights standalone eval (best IoU over GT windows; VOC all-point interpolated AP per "
                        f"query, averaged over queries; mAP = mean over IoU 0.5:0.05:0.95)",
            "num_queries": len(gts), "num_clips": len(with_events),
            "windows_per_clip": round(float(np.mean([len(wanted[k][1]) for k, _ in with_events])), 2),
            **_pct({**r1, "mAP@0.5": ap["mAP@0.5"], "mAP@0.75": ap["mAP@0.75"], "mAP": ap["mAP"]}),
            "random_window": _pct(M.random_window_baseline(cands, gts))}


def _qa(clips, answers: dict, data_dir: str, cfg: EvalCfg) -> dict:
    gold, pred, kinds = [], [], []
    for key, meta in clips:
        for i, q in enumerate(_qa_items(meta)):
            gold.append(str(q["answer"]))
            pred.append(answers[f"{key}#{i}"])
            kinds.append(M.question_type(q))
    if not gold:
        return {"protocol": "not available: no clip of the split has `qa`", "num_questions": 0}
    train = os.path.join(data_dir, "train")
    source = "train" if os.path.isdir(train) and any(f.endswith(".tar") for f in os.listdir(train)) else cfg.split
    pool = list_clips(split_shards(data_dir, source)) if source != cfg.split else clips
    majority = M.majority_answers((M.question_type(q), str(q["answer"])) for _, m in pool for q in _qa_items(m))
    base = [majority.get(kd, majority.get("*", "")) for kd in kinds]
    hit, base_hit = M.exact_match(pred, gold), M.exact_match(base, gold)
    per_type = {kd: round(100.0 * float(hit[[x == kd for x in kinds]].mean()), 2) for kd in sorted(set(kinds))}
    return {"protocol": f"greedy generation ({cfg.qa_min_new_tokens} to {cfg.qa_max_new_tokens} new tokens: <eos> is "
                        f"masked before the first {cfg.qa_min_new_tokens}) with the training prompt "
                        f"{QA_PROMPT!r}; exact match after lowercasing, removing punctuation and the articles "
                        f"a/an/the; baseline: the most frequent answer per question type (`type`, else the first "
                        f"word) in the {source.upper()} split",
            "num_questions": len(gold), "accuracy": round(100.0 * float(hit.mean()), 2), "per_type": per_type,
            "majority_baseline": round(100.0 * float(base_hit.mean()), 2), "baseline_source": source,
            "examples": [{"pred": p, "answer": g} for p, g in list(zip(pred, gold))[:5]]}


def _composed(model, data_dir: str, cache: Cache, cfg: EvalCfg) -> dict:
    tdir, gdir = cfg.composed_split, cfg.composed_split + "_gallery"
    if not all(os.path.isdir(os.path.join(data_dir, d)) for d in (tdir, gdir)):
        return {"protocol": f"not available: {data_dir} has no {tdir}/ + {gdir}/ folders", "num_queries": 0}
    tstore = ClipStore(split_shards(data_dir, tdir))  # the source videos are read one batch at a time
    triplets = [(k, s.meta) for k, s in tstore.index.items() if "src.mp4" in s.members and s.meta
                and isinstance(s.meta.get("edit"), str) and s.meta.get("target_key")][: cfg.max_clips]
    gshards = split_shards(data_dir, gdir)
    gallery = list_clips(gshards)
    chosen = {k for k, _ in triplets}
    if cfg.max_clips is not None and all("triplet" in m for _, m in gallery):
        gallery = [(k, m) for k, m in gallery if m["triplet"] in chosen]
    gname = f"{cfg.composed_split}_gallery-{cfg.num_frames}-videos-{cfg.frame_size}px"
    gvid, _ = _video_embeddings(model, gshards, gallery, cache, gname, cfg)
    qname = f"{cfg.composed_split}-{cfg.num_frames}-queries-{cfg.frame_size}px"
    done = cache.load(qname)
    new = {}
    for batch in _bar(_my_batches([t for t in triplets if t[0] not in done], cfg.batch_size), "composed", cfg):
        frames = torch.from_numpy(np.stack([decode_clip(tstore.read(t[0], "src.mp4"), cfg.num_frames,
                                                        size=cfg.frame_size)[0] for t in batch])).to(model.device)
        feats = model.vision.frame_features(frames)  # one tower pass for both queries
        comp = model.embed_composed(None, [t[1]["edit"] for t in batch], features=feats).embeddings.float().cpu()
        src = model.embed_video(None, features=feats).embeddings.float().cpu()
        new.update({t[0]: {"composed": comp[j], "source": src[j]} for j, t in enumerate(batch)})
    new = _gather(new)
    if new:
        done.update(new)
        cache.save(qname, done)
    edits = _text_embeddings(model, [t[1]["edit"] for t in triplets], cache, cfg)
    if _dist()[0] != 0:
        return {}
    gkeys = [k for k, _ in gallery]
    G = torch.stack([gvid[k]["emb"] for k in gkeys]).double()
    pos = torch.tensor([[g == t[1]["target_key"] for g in gkeys] for t in triplets])
    if not bool(pos.any(1).all()):
        raise ValueError(f"some composed targets are not in {cfg.composed_split}_gallery")
    res = {}
    for name, q in (("composed", [done[t[0]]["composed"] for t in triplets]),
                    ("source_only", [done[t[0]]["source"] for t in triplets]),
                    ("edit_text_only", [edits[t[1]["edit"]] for t in triplets])):
        res[name] = _pct(M.recall_metrics(M.retrieval_ranks(torch.stack(q).double() @ G.T, pos), KS))
    return {"protocol": f"zero-shot (no composed triplet or target video is trained on; the tiny stage 3 trains the "
                        f"composed prefix on text-only edits of train clips); query = embed_composed(source video, "
                        f"edit text); gallery = every clip of "
                        f"{gdir} (targets + distractors{' of the evaluated triplets' if cfg.max_clips else ''}); "
                        f"the source itself is not in the gallery; ties pessimistic. Baselines: the source video's "
                        f"own embedding, the edit text's embedding, and chance",
            "num_queries": len(triplets), "gallery_size": len(gkeys), **res["composed"],
            "source_only": res["source_only"], "edit_text_only": res["edit_text_only"],
            "chance": _pct(M.chance_recall(len(gkeys), np.ones(len(triplets)), KS))}


def _long_text(clips, V, temb) -> dict:
    pairs = [(i, m["detailed_caption"]) for i, (_, m) in enumerate(clips)
             if isinstance(m.get("detailed_caption"), str) and m["detailed_caption"].strip()]
    if not pairs:
        return {"protocol": "no clip has `detailed_caption`", "num_texts": 0}
    S = torch.stack([temb[c] for _, c in pairs]).double() @ V.T
    return {"protocol": "zero-shot; each clip's `detailed_caption` (one long paragraph) is a query against every video "
                        "of the split (T2V) and vice versa (V2T); cosine; ties pessimistic",
            "num_texts": len(pairs), **_directions(S, [i for i, _ in pairs], len(clips))}


def _adaptive(model, clips, videos: dict, plot_path: str | None, cfg: EvalCfg) -> dict:
    tokens = [videos[k]["tokens"] for k, _ in clips]
    comp = [m.get("complexity") for _, m in clips]
    has_comp = all(isinstance(c, int) for c in comp)
    ms = np.array([videos[k]["ms"] for k, _ in clips])
    e = model.cfg.embed
    out = {"protocol": f"embed_video with stop threshold {e.stop_threshold}, min {e.min_embed_tokens} / max "
                       f"{e.max_embed_tokens} tokens; latency = wall time of each embed_video batch (batch size "
                       f"{cfg.batch_size}, {cfg.num_frames} frames, vision + prefill + decode + head, decoding "
                       f"excluded) / its videos, on {model.device}, measured when the embeddings were computed "
                       f"(cached results keep their measurement)",
           "num_videos": len(tokens), "mean_tokens": round(float(np.mean(tokens)), 3),
           "histogram": M.histogram(tokens, 1, e.max_embed_tokens),
           "latency_ms_per_video": {"median": round(float(np.median(ms)), 3), "mean": round(float(ms.mean()), 3)}}
    if has_comp:
        rho = M.spearman(comp, tokens)
        out.update(mean_tokens_by_complexity=M.mean_by_group(tokens, comp),
                   spearman_tokens_complexity=None if rho is None else round(rho, 4))
    if plot_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        if has_comp:  # jittered clips and the mean per complexity level
            means = out["mean_tokens_by_complexity"]
            ax.scatter(np.array(comp) + np.random.default_rng(0).uniform(-0.12, 0.12, len(comp)), tokens, s=10,
                       alpha=0.4, label="clip")
            ax.plot([int(c) for c in means], list(means.values()), "o-", color="C3", label="mean")
            ax.set(xlabel="complexity (events)", ylabel="embedding tokens",
                   title=f"Spearman rho = {out['spearman_tokens_complexity']}")
            ax.legend()
        else:
            ax.hist(tokens, bins=np.arange(0.5, e.max_embed_tokens + 1.5))
            ax.set(xlabel="embedding tokens", ylabel="videos")
        fig.tight_layout()
        fig.savefig(plot_path, dpi=120)
        plt.close(fig)
        out["plot"] = plot_path
    return out


# ------------------------------------------------------------------------------------------------------ the driver
def evaluate(model, data_dir: str, tasks=TASKS, split: str = "test", *, identity: str | None = None,
             model_dir: str | None = None, **options) -> dict | None:
    """Run `tasks` on `data_dir/split`; returns the results dict on rank 0 (None elsewhere) and writes
    `options["out"]` (JSON) and the adaptive plot beside it when `out` is given."""
    from .checkpoint import model_identity
    from .model import ViLLE

    unknown = set(options) - {f.name for f in fields(EvalCfg)}
    if unknown:
        raise TypeError(f"evaluate(): unknown option(s) {sorted(unknown)}; known: {[f.name for f in fields(EvalCfg)]}")
    cfg = EvalCfg(tasks=tuple(tasks), split=split, **options)
    bad = set(cfg.tasks) - set(TASKS)
    if bad:
        raise ValueError(f"unknown task(s) {sorted(bad)}; choose from {TASKS}")
    for name in ("batch_size", "window_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: expected >= 1, got {getattr(cfg, name)}")
    if cfg.moment_score not in ("cosine", "zscale"):
        raise ValueError(f"moment_score: expected 'cosine' or 'zscale', got {cfg.moment_score!r}")
    model_dir = os.path.abspath(model_dir) if model_dir else None
    if isinstance(model, (str, os.PathLike)):
        model_dir = os.path.abspath(model)
        identity = identity or model_identity(model_dir)
        model = ViLLE.from_pretrained(model_dir)
    model.eval()
    identity = identity or state_identity(model)
    size = model.vision.input_size
    cfg.frame_size = cfg.frame_size or (size[0] if size[0] == size[1] else None)
    cfg.num_frames = cfg.num_frames or model.cfg.vision.max_frames
    if not 1 <= cfg.num_frames <= model.cfg.vision.max_frames:
        raise ValueError(f"num_frames {cfg.num_frames} outside 1..{model.cfg.vision.max_frames} (model max_frames)")
    out_dir = os.path.dirname(os.path.abspath(cfg.out)) if cfg.out else None
    cache_root = cfg.cache_dir if cfg.cache_dir is not None else (os.path.join(out_dir, "cache") if out_dir else None)
    cache = Cache(cache_root or None, identity)
    rank, world = _dist()
    t_start = time.perf_counter()

    with torch.no_grad():
        results = _run(model, data_dir, cfg, cache, out_dir)
    if rank != 0:
        return None
    results["meta"] = {
        "model_identity": identity, "model_dir": model_dir, "data_dir": os.path.abspath(data_dir),
        "split": cfg.split, "tasks": list(cfg.tasks), "counts": results.pop("_counts"),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "device": str(model.device),
        "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
        "world_size": world, "torch": torch.__version__, "seconds": round(time.perf_counter() - t_start, 2),
        "cache_dir": cache_root or None, "config": {k: v for k, v in asdict(cfg).items() if k != "progress"}}
    results = json.loads(json.dumps(results))  # what the caller gets is exactly what the file holds
    if cfg.out:
        tmp = cfg.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, cfg.out)
    return results


def _run(model, data_dir: str, cfg: EvalCfg, cache: Cache, out_dir: str | None) -> dict:
    tasks = set(cfg.tasks)
    shards = split_shards(data_dir, cfg.split)
    clips = list_clips(shards)[: cfg.max_clips]
    counts = {"clips": len(clips)}
    results: dict = {}
    if tasks - {"composed"}:
        need_qa = {}
        if "qa" in tasks:
            need_qa = {k: [(f"{k}#{i}", QA_PROMPT.format(question=q["question"].strip()))
                           for i, q in enumerate(_qa_items(m))] for k, m in clips}
        name = f"{cfg.split}-{cfg.num_frames}-videos-{cfg.frame_size}px"
        videos, answers = _video_embeddings(model, shards, clips, cache, name, cfg, need_qa,
                                            f"{cfg.split}-{cfg.num_frames}-qa{cfg.qa_min_new_tokens}-"
                                            f"{cfg.qa_max_new_tokens}-{cfg.frame_size}px")
        V = torch.stack([videos[k]["emb"] for k, _ in clips]).double()
        texts = []
        if tasks & {"retrieval", "rerank"}:
            texts += [c for _, m in clips for c in _captions(m) + [_single_caption(m)] if c]
        if "long_text" in tasks:
            texts += [m["detailed_caption"] for _, m in clips if isinstance(m.get("detailed_caption"), str)]
        if "moment" in tasks:
            texts += [ev["text"] for _, m in clips for ev in _events(m)]
        temb = _text_embeddings(model, texts, cache, cfg)
        store = ClipStore(shards) if tasks & {"rerank", "moment"} else None
        lead = _dist()[0] == 0  # sections without model work run on rank 0 only
        model_scale = float(model.logit_scale.exp().clamp(max=model.cfg.embed.max_logit_scale))
        scale = cfg.dual_softmax_scale or model_scale
        if "retrieval" in tasks and lead:
            results["retrieval"] = _retrieval(clips, V, temb, cfg, scale)
        if "rerank" in tasks:
            results["rerank"] = _rerank(model, clips, V, temb, store, cache, cfg, model_scale)
        if "moment" in tasks:
            results["moment"] = _moment(model, clips, temb, store, cache, cfg)
        if "qa" in tasks and lead:
            results["qa"] = _qa(clips, answers, data_dir, cfg)
        if "long_text" in tasks and lead:
            results["long_text"] = _long_text(clips, V, temb)
        if "adaptive" in tasks:
            plot = os.path.join(out_dir, f"adaptive_tokens_{cfg.split}.png") if out_dir else None
            results["adaptive"] = _adaptive(model, clips, videos, plot, cfg) if lead else {}
        counts["texts"] = len(set(texts))
    if "composed" in tasks:
        results["composed"] = _composed(model, data_dir, cache, cfg)
    results["_counts"] = counts
    return results


# ------------------------------------------------------------------------------------------------------- reporting
def format_table(results: dict) -> str:
    """Plain-text table: section, metric, value, and the baseline beside it."""
    rows = [("section", "metric", "value", "baseline")]

    def add(section, metric, value, base=None, label=""):
        rows.append((section, metric, "-" if value is None else f"{value:.2f}",
                     "" if base is None else f"{base:.2f} ({label})"))

    for proto, r in results.get("retrieval", {}).items():
        for d in ("t2v", "v2t") if isinstance(r, dict) and "t2v" in r else ():
            for k in KS:
                add(f"retrieval/{proto}", f"{d.upper()} R@{k}", r[d][f"R@{k}"], r["chance"][d][f"R@{k}"], "chance")
            add(f"retrieval/{proto}", f"{d.upper()} MdR", r[d]["MdR"])
    if (r := results.get("rerank", {})).get("num_queries"):
        for k in KS:
            add(f"rerank (top-{r['k']})", f"T2V R@{k}", r["stage2"][f"R@{k}"], r["stage1"][f"R@{k}"], "stage 1")
    if (r := results.get("moment", {})).get("num_queries"):
        for m in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "mAP@0.5", "mAP@0.75", "mAP"):
            add("moment", m, r[m], r["random_window"].get(m), "random window")
    if (r := results.get("qa", {})).get("num_questions"):
        add("qa", "accuracy", r["accuracy"], r["majority_baseline"], f"majority, {r['baseline_source']}")
    if (r := results.get("composed", {})).get("num_queries"):
        for k in KS:
            add("composed", f"R@{k}", r[f"R@{k}"], r["chance"][f"R@{k}"], "chance")
        add("composed", "R@1 source video only", r["source_only"]["R@1"])
        add("composed", "R@1 edit text only", r["edit_text_only"]["R@1"])
    if (r := results.get("long_text", {})).get("num_texts"):
        for k in KS:
            add("long_text", f"T2V R@{k}", r["t2v"][f"R@{k}"], r["chance"]["t2v"][f"R@{k}"], "chance")
    if r := results.get("adaptive"):
        add("adaptive", "mean tokens", r["mean_tokens"])
        add("adaptive", "spearman(tokens, complexity)", r.get("spearman_tokens_complexity"))
        add("adaptive", "latency ms/video (median)", r["latency_ms_per_video"]["median"])
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m ville.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="model folder written by save_pretrained")
    p.add_argument("--data", required=True, help="dataset folder (DIR/<split>/shard-*.tar)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    for f in fields(EvalCfg):
        if "help" in f.metadata:
            flag, kind = "--" + f.name.replace("_", "-"), str(f.type).split(" |")[0]
            if kind == "bool":
                p.add_argument(flag, action="store_true", help=f.metadata["help"])
            else:
                p.add_argument(flag, type={"int": int, "float": float, "str": str, "tuple": float}[kind],
                               nargs="+" if kind == "tuple" else None, default=f.default, help=f.metadata["help"])
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--no-progress", action="store_true")
    a = vars(p.parse_args(argv))
    from .checkpoint import model_identity
    from .distributed import setup, teardown
    from .model import ViLLE

    owned = not dist.is_initialized()  # a caller's process group is left alone
    info = setup()  # torchrun: process group (nccl on CUDA, gloo on CPU); otherwise a single process
    device = a.pop("device") or str(info.device)
    model_dir, data = a.pop("model"), a.pop("data")
    name = os.path.basename(os.path.normpath(model_dir))
    a["out"] = a["out"] or os.path.join("eval_out", f"{name}-{a['split']}.json")
    a["moment_scales"], a["progress"] = tuple(a["moment_scales"]), not a.pop("no_progress")
    if _dist()[0] == 0:
        os.makedirs(os.path.dirname(os.path.abspath(a["out"])), exist_ok=True)
    try:
        model = ViLLE.from_pretrained(model_dir, map_location=device)
        results = evaluate(model, data, identity=model_identity(model_dir), model_dir=model_dir, **a)
        if results is not None:
            print(format_table(results))
            print(f"\nresults: {a['out']}")
        return results
    finally:
        if owned:
            teardown()


if __name__ == "__main__":
    main()
