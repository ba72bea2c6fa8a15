"""Moment retrieval: each event text of each clip is a query over that clip's candidate windows, scored by
text-window cosine (optionally standardised among the query's windows of the same length). Two protocols, chosen by
the annotations: events that carry DiDeMo's `times` (segment indices of each annotator) are scored by DiDeMo's own
rule over its 21 fixed segments (Rank@1, Rank@5, mIoU; `ville.metrics`); every other split uses sliding windows,
temporal NMS, top 10 kept, and R1@t / mIoU / mAP as the QVHighlights standalone eval. Window embeddings are cached
per window, and a video's windows share one tower pass per distinct frame.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import metrics as M
from ..data import ClipStore
from ..video import decode_windows, probe, sliding_windows
from .common import Cache, events, gather, my_batches, pct, progress_bar, rank_world
from .config import EvalCfg


def _gt_windows(ev: dict) -> np.ndarray:
    wins = ev.get("windows")
    if isinstance(wins, list) and wins:
        return np.array(wins, dtype=np.float64).reshape(-1, 2)
    return np.array([[ev["start"], ev["end"]]], dtype=np.float64)


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


def didemo_windows(duration: float) -> tuple[np.ndarray, np.ndarray]:
    """DiDeMo's 21 segments in seconds, [5s, 5(e+1)] clipped to the duration, and which of them start inside the
    video (the others cannot be embedded; they are ranked last)."""
    seconds = np.array([[5.0 * s, min(5.0 * (e + 1), duration)] for s, e in M.DIDEMO_SEGMENTS])
    return seconds, seconds[:, 0] < duration


def _is_didemo(with_events, split: str) -> bool:
    marked = [isinstance(ev.get("times"), list) and bool(ev["times"]) for _, m in with_events for ev in events(m)]
    if any(marked) and not all(marked):
        raise ValueError(f"split {split!r}: {sum(marked)} of {len(marked)} events carry DiDeMo `times`; a split is "
                         f"scored by one protocol, so convert DiDeMo and other moment datasets into separate splits")
    return all(marked)


def moment(model, clips, temb, store: ClipStore, cache: Cache, cfg: EvalCfg) -> dict:
    # Window embeddings are cached per window (a window's frames depend on that window alone), so another set of
    # scales reuses every window it shares with the cached ones (the demo chooses the scales on val).
    name = f"{cfg.split}-{cfg.num_frames}-windows-{cfg.frame_size}px"
    done = cache.load(name)
    with_events = [(k, m) for k, m in clips if events(m)]
    if not with_events:
        return {"protocol": "not available: no clip of the split has `events`", "num_queries": 0}
    didemo = _is_didemo(with_events, cfg.split)
    wanted = {}  # key -> (duration, the candidate windows, those not cached yet)
    for key, _ in with_events:
        entry = done.get(key)
        duration = float(store.meta(key).get("duration") or (entry or {}).get("duration")
                         or probe(store.read(key)).duration)
        if didemo:
            seconds, valid = didemo_windows(duration)
            windows = seconds[valid]
        else:
            windows = sliding_windows(duration, cfg.moment_scales, cfg.moment_stride)
        have = set(_window_rows(entry["windows"])) if entry else set()
        wanted[key] = (duration, windows, windows[[r not in have for r in _window_rows(windows)]])
    todo = [k for k, (_, _, missing) in wanted.items() if len(missing)]
    new = {}
    for batch in progress_bar(my_batches(todo, 1), "moment windows", cfg):
        key = batch[0]
        duration, _, missing = wanted[key]
        frames = decode_windows(store.read(key), missing, cfg.num_frames, size=cfg.frame_size)[0]
        features = _window_features(model, frames)
        embs = torch.cat([model.embed_video(None, features=features[i:i + cfg.window_batch_size], moment=True)
                          .embeddings.float().cpu() for i in range(0, len(missing), cfg.window_batch_size)])
        old = done.get(key)
        new[key] = {"duration": duration,
                    "windows": missing if old is None else np.concatenate([old["windows"], missing]),
                    "emb": embs if old is None else torch.cat([old["emb"], embs])}
    new = gather(new)
    if new:
        done.update(new)
        cache.save(name, done)
    if rank_world()[0] != 0:
        return {}
    if didemo:
        return _didemo(with_events, wanted, done, temb, cfg)
    preds, gts, top1, cands = [], [], [], []
    for key, meta in with_events:
        W = wanted[key][1]
        row = {r: i for i, r in enumerate(_window_rows(done[key]["windows"]))}
        E = done[key]["emb"][[row[r] for r in _window_rows(W)]].double()
        for ev in events(meta):
            scores = _scores(E, temb[ev["text"]], W, cfg)
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
                        f"QVHighlights standalone eval (Moment-DETR): R1@t counts top-1 IoU >= t (2D-TAN counts > t) "
                        f"with the best-matching GT window; VOC all-point interpolated AP per query, averaged over "
                        f"queries; mAP = mean over IoU 0.5:0.05:0.95",
            "num_queries": len(gts), "num_clips": len(with_events),
            "windows_per_clip": round(float(np.mean([len(wanted[k][1]) for k, _ in with_events])), 2),
            **pct({**r1, "mAP@0.5": ap["mAP@0.5"], "mAP@0.75": ap["mAP@0.75"], "mAP": ap["mAP"]}),
            "random_window": pct(M.random_window_baseline(cands, gts))}


def _scores(E: torch.Tensor, text: torch.Tensor, windows: np.ndarray, cfg: EvalCfg) -> np.ndarray:
    scores = (E @ text.double()).numpy()
    return M.zscore_by_length(windows, scores) if cfg.moment_score == "zscale" else scores


def _didemo(with_events, wanted: dict, done: dict, temb: dict, cfg: EvalCfg) -> dict:
    rankings, times, valid_sets = [], [], []
    for key, meta in with_events:
        seconds, valid = didemo_windows(wanted[key][0])
        row = {r: i for i, r in enumerate(_window_rows(done[key]["windows"]))}
        E = done[key]["emb"][[row[r] for r in _window_rows(seconds[valid])]].double()
        for ev in events(meta):
            full = np.full(len(M.DIDEMO_SEGMENTS), -np.inf)
            full[valid] = _scores(E, temb[ev["text"]], seconds[valid], cfg)
            order = np.argsort(-full, kind="stable")  # equal scores: lower segment index first; outside ones last
            rankings.append([M.DIDEMO_SEGMENTS[i] for i in order])
            times.append(ev["times"])
            valid_sets.append([M.DIDEMO_SEGMENTS[i] for i in np.flatnonzero(valid)])
    zscale = ", standardised among the query's segments of the same length" if cfg.moment_score == "zscale" else ""
    return {"protocol": f"DiDeMo's rule (LocalizingMoments utils/eval.py), not QVHighlights': each description ranks "
                        f"all 21 segments of its video (5-second chunks 0..5, [5s, 5(e+1)] s; segments starting past "
                        f"the video's end ranked last; {cfg.num_frames} frames decoded per segment) by text-segment "
                        f"cosine{zscale}, no NMS, equal scores to the lower segment index; per query, IoU = mean of "
                        f"the 3 best IoUs (inclusive segment indices) of the top-1 with the annotators' segments (4; a "
                        f"few queries have 5 or 7) and rank = mean of their 3 best ranks; Rank@k = % of queries with "
                        f"that mean rank <= k, mIoU = mean IoU. No mAP: the annotations are alternatives for one "
                        f"moment",
            "num_queries": len(rankings), "num_clips": len(with_events),
            **pct(M.didemo_metrics(rankings, times)),
            "random_ranking": pct(M.didemo_random_ranking(valid_sets, times))}
