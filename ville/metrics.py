"""Evaluation metrics: pure functions of scores and annotations (no model, no I/O).

Retrieval. A query's rank is the rank of its best-ranked correct item, 1-based. Ties are broken pessimistically by
default: every incorrect item scoring >= the best correct score is ranked ahead of it (a tie counts against the
query), so a constant similarity matrix gives rank = gallery size, never a free R@1. `ties="optimistic"` counts only
strictly higher scores (an upper bound; the gap between the two shows how much ties matter). CLIP4Clip's
`compute_metrics` does neither: a query whose correct score ties k other items counts once at each of the k + 1
tied positions. Recalls are percentages. MdR is numpy's median (the mean of the two middle ranks for an even count);
CLIP4Clip's multi-sentence T2V takes `torch.median`, the lower middle rank (`lower_median`).
Video-to-text with several captions per video has two protocols: every text of the split is ranked and a video's
rank is that of its best-ranked caption (`retrieval_ranks` with several positives), or, as CLIP4Clip's
multi-sentence evaluation, each video's captions are first reduced to their maximum score and those per-video
maxima are ranked (`per_video_max`). R@1 agrees; R@5 and beyond and the ranks do not.

Moment retrieval follows the QVHighlights / Moment-DETR standalone evaluation (`standalone_eval/eval.py`), rewritten
here from its definitions:
- IoU of [s1, e1] and [s2, e2] is |intersection| / |union| (0 when the union is empty).
- R1@t (`moment_r1`): the percentage of queries whose top-ranked window has IoU >= t with *some* ground-truth window
  (the official code picks the GT window of highest IoU with the top-1 prediction). mIoU: the mean of that IoU.
- AP (`moment_average_precision`): per query, its first `max_pred_windows` (10) predictions in the order given are
  sorted by descending score (a stable sort, so equal scores keep the given order). Walking down that list, a
  prediction is a true positive at threshold t when some ground-truth window not yet matched at t has IoU >= t with
  it (GT windows are tried in decreasing IoU; equal IoUs: the later-listed GT first, as ActivityNet's
  `argsort()[::-1]` does); otherwise a false positive. AP is the VOC-2011 all-point interpolated area under the
  precision/recall curve (precision made monotone from the right, summed over the recall steps), recall relative to
  the number of GT windows. mAP@t is the mean AP over queries; "average" is the mean over t in 0.5:0.05:0.95 (the
  thresholds are rounded to two decimals, as the official code does). It is not the COCO 101-point interpolation.
- R1@t counts IoU >= t, as Moment-DETR does; 2D-TAN-style code counts IoU > t (they differ only at exact ties).
- Temporal NMS (`temporal_nms`): highest score first; a later window is suppressed when its IoU with a kept window
  is > the threshold (strictly greater, as in Moment-DETR's post-processing).

DiDeMo moments follow DiDeMo's own evaluation (LocalizingMoments `utils/eval.py`), not the rule above: a video has
21 possible moments, the segment pairs (s, e), 0 <= s <= e <= 5, of its six 5-second chunks, and a query is answered
by a ranking of all 21. Each of the query's annotators (4; 26 of the 8,201 val/test queries have 5 or 7) gave one
pair. IoU is taken on the inclusive segment indices
(|overlap| / |hull| in chunks, which is the seconds IoU of unclipped segments). Per query: its IoU is the mean of the
3 largest IoUs of the top-ranked segment with the annotators' pairs, its rank the mean of the 3 smallest ranks of the
annotators' pairs in the ranking (so the worst-agreeing annotator is dropped). Rank@k is the percentage of queries
whose mean rank is <= k (Rank@1 needs 3 annotators to agree with the top-1 exactly), mIoU the mean IoU.
"""
from __future__ import annotations

import functools
import itertools
import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

IOU_THRESHOLDS_MAP = tuple(float(f"{t:.2f}") for t in np.linspace(0.5, 0.95, 10))
R1_THRESHOLDS = (0.3, 0.5, 0.7)


# --------------------------------------------------------------------------------------------------------- retrieval
def retrieval_ranks(scores: torch.Tensor | np.ndarray, positives: torch.Tensor | np.ndarray,
                    ties: str = "pessimistic") -> np.ndarray:
    """Ranks (Q,) int of each query's best-ranked positive, 1-based.

    scores (Q, G) similarities (higher = better); positives (Q, G) bool, at least one True per row.
    ties: "pessimistic" (a negative scoring >= the best positive ranks ahead of it) or "optimistic" (only > does).
    """
    s = torch.as_tensor(scores).double()
    pos = torch.as_tensor(positives).bool()
    if s.shape != pos.shape or s.ndim != 2:
        raise ValueError(f"scores {tuple(s.shape)} and positives {tuple(pos.shape)} must be the same (Q, G) shape")
    if not bool(pos.any(1).all()):
        raise ValueError("every query needs at least one positive")
    if torch.isnan(s).any():
        raise ValueError("scores contain NaN")
    best = s.masked_fill(~pos, -math.inf).max(1, keepdim=True).values
    if ties == "pessimistic":
        ahead = (s >= best) & ~pos
    elif ties == "optimistic":
        ahead = (s > best) & ~pos
    else:
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    return (ahead.sum(1) + 1).numpy().astype(np.int64)


def recall_metrics(ranks: Sequence[int] | np.ndarray, ks: Iterable[int] = (1, 5, 10)) -> dict:
    """{"R@k": % of ranks <= k, ..., "MdR": median rank, "MnR": mean rank, "n": queries}."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no ranks")
    out = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in ks}
    out.update(MdR=float(np.median(r)), MnR=float(np.mean(r)), n=int(r.size))
    return out


def chance_recall(gallery_size: int, num_positives: Sequence[int] | np.ndarray, ks: Iterable[int] = (1, 5, 10)
                  ) -> dict:
    """Expected R@k (%) of a uniformly random ranking: with m positives among G items the best positive lands in the
    top k with probability 1 - C(G-m, k) / C(G, k); averaged over the queries' m."""
    m = np.asarray(num_positives, dtype=np.int64).reshape(-1)
    out = {}
    for k in ks:
        kk = min(k, gallery_size)
        miss = np.array([math.comb(gallery_size - int(mi), kk) / math.comb(gallery_size, kk) for mi in m])
        out[f"R@{k}"] = float(100.0 * np.mean(1.0 - miss))
    return out


def per_video_max(scores: torch.Tensor | np.ndarray, owner: Sequence[int], num_videos: int) -> torch.Tensor:
    """CLIP4Clip's multi-sentence V2T scores: scores (T, V) text-video -> (V, V) where [i, j] is the maximum score of
    video j's captions for video i (-inf where video j has none). Rank row i with positive j = i."""
    s = torch.as_tensor(scores).double()
    owner_t = torch.as_tensor(list(owner), dtype=torch.long)
    out = torch.full((s.shape[1], num_videos), -math.inf, dtype=torch.float64)
    return out.scatter_reduce(1, owner_t[None].expand(s.shape[1], -1), s.T, reduce="amax")


def lower_median(ranks: Sequence[int] | np.ndarray) -> float:
    """The lower of the two middle values for an even count (`torch.median`), the middle one for an odd count."""
    r = np.sort(np.asarray(ranks, dtype=np.float64))
    return float(r[(len(r) - 1) // 2])


def dual_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """Dual-softmax inference (CAMoE): scores (Q, G) * softmax(scale * scores, dim=0), i.e. each gallery item's
    similarity re-weighted by how much it prefers this query over the other queries. It uses the whole query set,
    so numbers computed with it are not comparable with plain-similarity numbers and are labelled as such."""
    s = torch.as_tensor(scores).double()
    return s * torch.softmax(scale * s, dim=0)


# ------------------------------------------------------------------------------------------------ moment retrieval
def temporal_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU (N, M) of windows a (N, 2) and b (M, 2), [start, end] each; 0 where the union is empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 2)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 2)
    inter = np.clip(np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def zscore_by_length(windows: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each window's score standardised among the windows of the same length (lengths equal to 1e-6; population
    std); a length with one window, or with equal scores, gives 0. Raw cosines favour the lengths that have the most
    windows, whose maximum is taken over the most draws; after this each length competes on how far its best window
    stands out from its own kind."""
    windows = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64)
    lengths = np.round(windows[:, 1] - windows[:, 0], 6)
    out = np.zeros_like(scores)
    for length in np.unique(lengths):
        i = lengths == length
        sd = scores[i].std()
        if i.sum() > 1 and sd > 0:
            out[i] = (scores[i] - scores[i].mean()) / sd
    return out


def temporal_nms(windows: np.ndarray, scores: np.ndarray, threshold: float, max_keep: int | None = None
                 ) -> np.ndarray:
    """Indices of kept windows, by descending score (equal scores: input order). A window is dropped when its IoU
    with an already kept one is > threshold. threshold >= 1 keeps everything (just sorts)."""
    windows = np.asarray(windows, dtype=np.float64).reshape(-1, 2)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    for i in order:
        if max_keep is not None and len(keep) >= max_keep:
            break
        if keep and threshold < 1 and temporal_iou(windows[i:i + 1], windows[keep]).max() > threshold:
            continue
        keep.append(int(i))
    return np.array(keep, dtype=np.int64)


def moment_r1(top1: np.ndarray, ground_truths: Sequence[np.ndarray], thresholds: Iterable[float] = R1_THRESHOLDS
              ) -> dict:
    """top1 (Q, 2) the top-ranked window of each query; ground_truths: per query (M_q, 2) GT windows.
    -> {"R1@t": %, ..., "mIoU": %}: IoU is the best over the query's GT windows."""
    top1 = np.asarray(top1, dtype=np.float64).reshape(-1, 2)
    if len(top1) != len(ground_truths) or len(top1) == 0:
        raise ValueError(f"{len(top1)} predictions for {len(ground_truths)} queries")
    ious = np.array([temporal_iou(p[None], g).max() for p, g in zip(top1, ground_truths)])
    out = {f"R1@{t:g}": float(100.0 * np.mean(ious >= t)) for t in thresholds}
    out["mIoU"] = float(100.0 * ious.mean())
    return out


def _interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    p = np.concatenate([[0.0], precision, [0.0]])
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1]) + 1
    return float(np.sum((r[steps] - r[steps - 1]) * p[steps]))


def query_average_precision(predictions: np.ndarray, ground_truth: np.ndarray,
                            thresholds: Sequence[float] = IOU_THRESHOLDS_MAP, max_pred_windows: int | None = 10
                            ) -> np.ndarray:
    """AP (len(thresholds),) of one query. predictions (P, 3) [start, end, score] in ranked order; ground_truth
    (M, 2). See the module docstring for the matching rule."""
    preds = np.asarray(predictions, dtype=np.float64).reshape(-1, 3)
    gts = np.asarray(ground_truth, dtype=np.float64).reshape(-1, 2)
    if max_pred_windows is not None:
        preds = preds[:max_pred_windows]
    ap = np.zeros(len(thresholds))
    if len(preds) == 0 or len(gts) == 0:
        return ap
    preds = preds[np.argsort(-preds[:, 2], kind="stable")]
    ious = temporal_iou(preds[:, :2], gts)  # (P, M)
    tp = np.zeros((len(thresholds), len(preds)))
    for ti, t in enumerate(thresholds):
        matched = np.zeros(len(gts), dtype=bool)
        for pi in range(len(preds)):
            for gi in np.argsort(ious[pi], kind="stable")[::-1]:
                if ious[pi, gi] < t:
                    break
                if not matched[gi]:
                    matched[gi] = True
                    tp[ti, pi] = 1
                    break
    tp_cum = np.cumsum(tp, axis=1)
    precision = tp_cum / np.arange(1, len(preds) + 1)[None]
    recall = tp_cum / len(gts)
    for ti in range(len(thresholds)):
        ap[ti] = _interpolated_ap(precision[ti], recall[ti])
    return ap


def moment_average_precision(predictions: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray],
                             thresholds: Sequence[float] = IOU_THRESHOLDS_MAP, max_pred_windows: int | None = 10
                             ) -> dict:
    """Mean over queries of the per-query AP -> {"mAP@0.5": %, "mAP@0.75": %, ..., "mAP": % (average over the
    thresholds)}. predictions: per query (P, 3) [start, end, score]; ground_truths: per query (M, 2)."""
    if len(predictions) != len(ground_truths) or not predictions:
        raise ValueError(f"{len(predictions)} prediction lists for {len(ground_truths)} queries")
    aps = np.stack([query_average_precision(p, g, thresholds, max_pred_windows)
                    for p, g in zip(predictions, ground_truths)])
    per_t = aps.mean(0)
    out = {f"mAP@{t:g}": float(100.0 * v) for t, v in zip(thresholds, per_t)}
    out["mAP"] = float(100.0 * per_t.mean())
    return out


def random_window_baseline(candidates: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray],
                           thresholds: Iterable[float] = R1_THRESHOLDS) -> dict:
    """Expected R1@t and mIoU (%) when the top-1 is a uniformly random candidate window: for each query the exact
    fraction of its candidates whose best IoU with the GT is >= t (and their mean IoU), averaged over queries."""
    best = [temporal_iou(c, g).max(1) for c, g in zip(candidates, ground_truths)]
    out = {f"R1@{t:g}": float(100.0 * np.mean([np.mean(b >= t) for b in best])) for t in thresholds}
    out["mIoU"] = float(100.0 * np.mean([b.mean() for b in best]))
    return out


# ---------------------------------------------------------------------------------------------------------- DiDeMo
DIDEMO_SEGMENTS = tuple((s, e) for s in range(6) for e in range(s, 6))  # the 21 possible moments, index pairs


def didemo_iou(a: Sequence[int], b: Sequence[int]) -> float:
    """IoU of two inclusive segment-index pairs, as DiDeMo's eval: overlap / hull, in chunks."""
    inter = max(0, min(a[1], b[1]) + 1 - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) + 1 - min(a[0], b[0]))


def didemo_query(ranking: Sequence[Sequence[int]], times: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(mean of the 3 best ranks, mean of the 3 best IoUs) of one query. ranking: the 21 segment pairs, best first;
    times: the annotators' pairs."""
    order = {tuple(int(x) for x in seg): r for r, seg in enumerate(ranking, 1)}
    gts = [tuple(int(x) for x in t) for t in times]
    missing = [t for t in gts if t not in order]
    if missing or not gts:
        raise ValueError(f"annotated segment(s) {missing or times} not in the ranking {list(ranking)}")
    ranks = sorted(order[t] for t in gts)[:3]
    ious = sorted((didemo_iou(ranking[0], t) for t in gts), reverse=True)[:3]
    return float(np.mean(ranks)), float(np.mean(ious))


def didemo_metrics(rankings: Sequence[Sequence[Sequence[int]]], times: Sequence[Sequence[Sequence[int]]]) -> dict:
    """{"Rank@1": %, "Rank@5": %, "mIoU": %, "n"} by DiDeMo's rule (module docstring)."""
    if len(rankings) != len(times) or not rankings:
        raise ValueError(f"{len(rankings)} rankings for {len(times)} queries")
    ranks, ious = np.array([didemo_query(r, t) for r, t in zip(rankings, times)]).T
    return {"Rank@1": float(100 * np.mean(ranks <= 1)), "Rank@5": float(100 * np.mean(ranks <= 5)),
            "mIoU": float(100 * np.mean(ious)), "n": len(ranks)}


@functools.lru_cache(maxsize=None)
def _random_rank_hits(num_valid: int, free: tuple, fixed: tuple) -> tuple[float, float]:
    """Exact (P(Rank@1), P(Rank@5)) when `num_valid` segments are ranked in a uniformly random order: `free` holds the
    annotator counts of the annotated valid segments, `fixed` (rank, count) pairs of annotated segments placed after
    the valid ones. Only the 3 best ranks count, so every random order is classified by which free segments come
    first (m = min(3, len(free)) of them, in order) and at which positions; the other free segments fill positions
    after those in perm(num_valid - last position, len(free) - m) ways."""
    n, d = num_valid, len(free)
    m = min(d, 3)
    tail = np.repeat(np.array([r for r, _ in fixed], dtype=np.int64), [c for _, c in fixed])
    pos = np.array(list(itertools.combinations(range(1, n + 1), m)), dtype=np.int64).reshape(-1, m)
    last = pos[:, -1] if m else np.zeros(len(pos), dtype=np.int64)
    ways = np.array([math.perm(n - x, d - m) for x in range(n + 1)], dtype=np.float64)[last]
    hit1 = hit5 = 0.0
    for first in itertools.permutations(range(d), m):
        ranks = np.concatenate([np.repeat(pos, [free[i] for i in first], axis=1),
                                np.broadcast_to(tail, (len(pos), len(tail)))], 1)
        mean = np.sort(ranks, axis=1)[:, :3].mean(1)
        hit1 += float(ways[mean <= 1].sum())
        hit5 += float(ways[mean <= 5].sum())
    total = math.perm(n, d)
    return hit1 / total, hit5 / total


def didemo_random_ranking(valid: Sequence[Sequence[Sequence[int]]], times: Sequence[Sequence[Sequence[int]]]) -> dict:
    """Expected DiDeMo Rank@1 / Rank@5 / mIoU (%) when each query's valid segments (those inside its video) are
    ranked uniformly at random and the others follow in index order; exact."""
    rows = []
    for v, t in zip(valid, times):
        v = {tuple(int(x) for x in s) for s in v}
        t = [tuple(int(x) for x in s) for s in t]
        if not v:
            raise ValueError("a query has no valid segment")
        rest = [s for s in DIDEMO_SEGMENTS if s not in v]
        counts = {s: t.count(s) for s in set(t)}
        free = tuple(sorted(c for s, c in counts.items() if s in v))
        fixed = tuple(sorted((len(v) + 1 + rest.index(s), c) for s, c in counts.items() if s not in v))
        r1, r5 = _random_rank_hits(len(v), free, fixed)
        iou = np.mean([np.mean(sorted((didemo_iou(top, g) for g in t), reverse=True)[:3]) for top in v])
        rows.append((r1, r5, iou))
    r1, r5, iou = np.array(rows).T
    return {"Rank@1": float(100 * r1.mean()), "Rank@5": float(100 * r5.mean()), "mIoU": float(100 * iou.mean())}


# --------------------------------------------------------------------------------------------------------------- QA
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation -> spaces, drop the articles a/an/the, collapse whitespace."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """(N,) bool: normalised prediction == normalised answer."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    return np.array([normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers)], dtype=bool)


def majority_answers(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """(question type, answer) pairs -> the most frequent normalised answer per type; ties go to the alphabetically
    first answer so the baseline does not depend on data order. Key "*" holds the overall majority."""
    by_type: dict[str, Counter] = {}
    overall: Counter = Counter()
    for kind, answer in pairs:
        a = normalize_answer(answer)
        by_type.setdefault(kind, Counter())[a] += 1
        overall[a] += 1

    def top(c: Counter) -> str:
        return min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]

    out = {k: top(c) for k, c in by_type.items()}
    if overall:
        out["*"] = top(overall)
    return out


def question_type(qa: Mapping) -> str:
    """The item's `type`, else the question's first word (the MSRVTT-QA what/who/how/... breakdown)."""
    kind = qa.get("type")
    if isinstance(kind, str) and kind:
        return kind
    words = normalize_answer(qa.get("question", "")).split()
    return words[0] if words else "?"


# ------------------------------------------------------------------------------------------------- adaptive length
def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho, or None when it is undefined (fewer than 2 points or a constant input)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    rho = spearmanr(x, y).statistic
    return None if not np.isfinite(rho) else float(rho)


def histogram(values: Sequence[int], lo: int, hi: int) -> dict[str, int]:
    """Counts of each integer in lo..hi (JSON-friendly string keys; every bin present)."""
    c = Counter(int(v) for v in values)
    return {str(k): c.get(k, 0) for k in range(lo, hi + 1)}


def mean_by_group(values: Sequence[float], groups: Sequence[int]) -> dict[str, float]:
    out: dict[int, list[float]] = {}
    for v, g in zip(values, groups):
        out.setdefault(int(g), []).append(float(v))
    return {str(g): float(np.mean(v)) for g, v in sorted(out.items())}
