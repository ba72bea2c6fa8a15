"""Moment retrieval: each event text of each clip is a query over that clip's sliding candidate windows, scored by
text-window cosine (optionally standardised among the query's windows of the same length), temporal NMS, top 10 kept;
R1@t / mIoU / mAP as the QVHighlights standalone eval. Window embeddings are cached per window, and a video's windows
share one tower pass per distinct frame.
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


def moment(model, clips, temb, store: ClipStore, cache: Cache, cfg: EvalCfg) -> dict:
    # Window embeddings are cached per window (a window's frames depend on that window alone), so another set of
    # scales reuses every window it shares with the cached ones (the demo chooses the scales on val).
    name = f"{cfg.split}-{cfg.num_frames}-windows-{cfg.frame_size}px"
    done = cache.load(name)
    with_events = [(k, m) for k, m in clips if events(m)]
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
    for batch in progress_bar(my_batches(todo, 1), "moment windows", cfg):
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
    new = gather(new)
    if new:
        done.update(new)
        cache.save(name, done)
    if rank_world()[0] != 0:
        return {}
    preds, gts, top1, cands = [], [], [], []
    for key, meta in with_events:
        W = wanted[key][1]
        row = {r: i for i, r in enumerate(_window_rows(done[key]["windows"]))}
        E = done[key]["emb"][[row[r] for r in _window_rows(W)]].double()
        for ev in events(meta):
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
            **pct({**r1, "mAP@0.5": ap["mAP@0.5"], "mAP@0.75": ap["mAP@0.75"], "mAP": ap["mAP"]}),
            "random_window": pct(M.random_window_baseline(cands, gts))}
