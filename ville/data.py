"""Data: WebDataset shards -> frames + text -> per-task batches that the model consumes directly.

Stages, in the order a sample passes them:
  shards   brace/glob patterns -> tar files; a tar's index (member offsets and sizes, the parsed JSON) is read
           without touching the video bytes (`read_shard_index`; in `ville/shards.py`, re-exported here).
  plan     a task builder turns an indexed clip into a `Plan`: texts, group / label / windows and the seed of its
           frame sampling -- everything but the pixels, from the JSON alone; clips lacking what the task needs are
           skipped here. Plans pass a shuffle buffer (metadata only, so it is cheap to make large).
  realise  read the video member by offset and decode the planned frames (`ville.video`, seeking).
  collate  frames -> uint8 tensors, texts stay list[str], token ids if a tokenizer is given (in the workers).

Training stream and resume contract. A train loader yields global batches 0, 1, 2, ... of B clips (infinite,
resampled); rank r of world_size R receives and decodes rows [r*B/R, (r+1)*B/R) of each. With W = max(1,
num_workers), global batch k is batch k // W of *logical stream* k % W. A logical stream is a pure function of (seed,
task, stream index, DataCfg, B, shard files) -- not of rank or world size: its own RNG draws shards (a source by
weight, then one of its shards uniformly), visits each shard's samples in a random order, plans them and mixes the
plans in the shuffle buffer; its batch j is plans [j*B, (j+1)*B). Decoding never changes which plans form a batch.
DataLoader worker d runs logical stream (d + start_step) % W, so the DataLoader's round-robin order delivers batches
start_step, start_step + 1, ...; to get there a stream replays only its plan stage (tar headers + JSON; no video
read or decoded) and drops the plans -- about B * start_step / W JSON parses per worker. Hence `start_step=s` yields
exactly batches s, s+1, ... of an uninterrupted run with the same seed, task, num_workers and B, for any world size
(other num_workers or B give a different, equally valid stream). A clip whose video fails to decode is replaced by
a copy of the nearest decodable clip of the rank's rows (or, if all of them fail, of the other rows): same key and
group, so never a false negative; every batch keeps its size and later batches stay in place. Only when a whole
global batch fails are new plans drawn, which shifts that rank's stream (a warning says so).

Evaluation (`iter_eval_clips`, `iter_samples`): the shards' samples in order (shards as listed, members in tar
order), each once per pass, no shuffling. Batch b goes to rank b % world_size, and a rank's r-th batch to worker
r % num_workers; each rank yields its batches in order. Workers all read the tar indexes; each video is read and
decoded once per pass.

Bad input (unreadable or truncated tars, bad JSON, missing or empty video members, undecodable videos, clips
lacking the task's keys) is skipped, never replaced by zeros, and counted per reason in a `SkipCounter` (warnings
name shard + key). A stream raises when nothing valid remains: `max_consecutive_failures` failures in a row, or a
whole pass over the shards without one usable sample.
"""
from __future__ import annotations

import hashlib
import logging
import re
import signal
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataCfg  # noqa: F401  (this stage's config; torch-free home in config.py)
from .shards import (ClipStore, IndexedSample, NoUsableData, SkipCounter, _ShardReader, _usable_video,  # noqa: F401
                     expand_braces, expand_shards, iter_samples, notable, parse_sources, read_shard_index)
from .video import VideoDecodeError, decode_clip, decode_windows, sliding_windows, window_iou

log = logging.getLogger(__name__)

TASKS = ("caption", "detailed_caption", "qa", "retrieval", "localisation", "matching", "composed")
# Prompt templates of the generative tasks (the model appends the target after the prompt).
CAPTION_PROMPT = "Describe the video briefly."
DETAILED_CAPTION_PROMPT = "Describe the video in detail."
QA_PROMPT = "Question: {question} Answer:"
# The text fields of each task's batch (each also gets `{field}_ids` when collate is given a tokenizer).
TEXT_FIELDS = {"caption": ("prompt", "target"), "detailed_caption": ("prompt", "target"), "qa": ("prompt", "target"),
               "retrieval": ("text",), "localisation": ("text",), "matching": ("text",), "composed": ("edit", "text")}
_STOPWORDS = frozenset("the and with from into onto near are was were its this that then than over under on in of "
                       "at to by for".split())


def check_cfg(cfg: DataCfg) -> None:
    rules = {"num_frames": cfg.num_frames >= 1, "frame_size": cfg.frame_size is None or cfg.frame_size >= 1,
             "num_workers": cfg.num_workers >= 0, "shuffle_buffer": cfg.shuffle_buffer >= 0,
             "window_scales": len(cfg.window_scales) > 0 and all(0 < s <= 1 for s in cfg.window_scales),
             "window_stride": cfg.window_stride > 0, "num_window_negatives": cfg.num_window_negatives >= 1,
             "matching_buffer": cfg.matching_buffer >= 1,
             "matching_negative_fraction": 0 <= cfg.matching_negative_fraction <= 1,
             "max_consecutive_failures": cfg.max_consecutive_failures >= 1,
             "hard_negative_group": cfg.hard_negative_group >= 1, "hard_negative_pool": cfg.hard_negative_pool >= 1}
    bad = [f"{name}={getattr(cfg, name)!r}" for name, ok in rules.items() if not ok]
    if bad:
        raise ValueError(f"DataCfg: invalid {', '.join(bad)} (see the comments on DataCfg for valid values)")


# ----------------------------------------------------------------------------------------------------- task builders

def group_id(key: str) -> int:
    """A stable 63-bit id of a clip key: equal across workers, ranks and runs (Python's hash() is not)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


class _Unusable(Exception):
    """A clip cannot serve the task (counted under `reason`)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _captions(meta: dict) -> list[str]:
    """`captions` when present (multi-caption datasets), else [`caption`]."""
    caps = meta.get("captions")
    if isinstance(caps, list):
        caps = [c for c in caps if isinstance(c, str) and c.strip()]
        if caps:
            return caps
    cap = meta.get("caption")
    if not isinstance(cap, str) or not cap.strip():
        raise _Unusable("missing key", "no 'caption'")
    return [cap]


def _content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2 and w not in _STOPWORDS)


@dataclass
class Plan:
    """Everything about one training example except its pixels."""

    key: str
    shard: str
    video: tuple[int, int]  # (offset, size) of the video member
    fields: dict  # the example's texts / labels (see `collate`)
    seed: int  # frame-sampling seed of the realise stage
    windows: Optional[np.ndarray] = None  # localisation: distinct windows (U, 2) to decode
    window_index: Optional[np.ndarray] = None  # localisation: (W,) row of `windows` each slot shows


class _Planner:
    """Task builders: one indexed clip -> a Plan, or None (skipped and counted). Uses only the stream's RNG."""

    def __init__(self, task: str, cfg: DataCfg):
        self.task, self.cfg = task, cfg
        self.recent: deque = deque(maxlen=cfg.matching_buffer)  # (key, captions, normalised captions, words)

    def __call__(self, s: IndexedSample, rng: np.random.Generator, skips: SkipCounter) -> Plan | None:
        member = _usable_video(s, self.cfg.video_ext, skips)
        if member is None:
            return None
        meta = s.meta
        if meta is None:
            skips.skip("missing key", s.shard, s.key, "no .json member")
            return None
        try:
            made = getattr(self, "_" + self.task)(meta, rng, s.key)
        except _Unusable as e:
            skips.skip(e.reason, s.shard, s.key, e.detail)
            return None
        fields, windows, index = made if isinstance(made, tuple) else (made, None, None)
        if isinstance(meta.get("complexity"), int):
            fields["complexity"] = meta["complexity"]
        return Plan(s.key, s.shard, s.members[member], fields, int(rng.integers(2**63)), windows, index)

    # Each builder returns the example's fields or raises _Unusable.
    def _caption(self, meta, rng, key):
        caps = _captions(meta)
        return {"prompt": CAPTION_PROMPT, "target": caps[rng.integers(len(caps))]}

    def _detailed_caption(self, meta, rng, key):
        text = meta.get("detailed_caption")
        if not isinstance(text, str) or not text.strip():
            raise _Unusable("missing key", "no 'detailed_caption'")
        return {"prompt": DETAILED_CAPTION_PROMPT, "target": text}

    def _qa(self, meta, rng, key):
        pairs = meta.get("qa")
        if not isinstance(pairs, list) or not pairs:
            raise _Unusable("missing key", "no 'qa'")
        pairs = [p for p in pairs if isinstance(p, dict) and isinstance(p.get("question"), str)
                 and isinstance(p.get("answer"), (str, int, float)) and str(p["answer"]).strip()]
        if not pairs:
            raise _Unusable("bad annotation", "'qa' has no {question, answer} pair")
        pair = pairs[rng.integers(len(pairs))]
        return {"prompt": QA_PROMPT.format(question=pair["question"].strip()), "target": str(pair["answer"])}

    def _retrieval(self, meta, rng, key):
        caps = _captions(meta)
        return {"text": caps[rng.integers(len(caps))], "group": group_id(key)}

    def _matching(self, meta, rng, key):
        caps = _captions(meta)
        own = caps[rng.integers(len(caps))]
        normalised = frozenset(" ".join(c.lower().split()) for c in caps)
        others = [r for r in self.recent if r[0] != key and not (r[2] & normalised)]
        text, label = own, 1.0
        if others and rng.random() < self.cfg.matching_negative_fraction:
            # Hard negatives: the more content words a recent clip's captions share with ours, the likelier it is
            # drawn (a clip sharing none keeps a small chance).
            words = _content_words(own)
            weight = np.array([len(r[3] & words) + 0.1 for r in others])
            other = others[rng.choice(len(others), p=weight / weight.sum())]
            text, label = other[1][rng.integers(len(other[1]))], 0.0
        self.recent.append((key, caps, normalised, frozenset().union(*map(_content_words, caps))))
        return {"text": text, "label": label}

    def _composed(self, meta, rng, key):
        """A text-only edit of the clip ("make the red circle blue") and the caption of the edited clip."""
        edits = meta.get("edits")
        if not isinstance(edits, list) or not edits:
            raise _Unusable("missing key", "no 'edits'")
        edits = [e for e in edits if isinstance(e, dict) and all(isinstance(e.get(f), str) and e[f].strip()
                                                                 for f in ("edit", "caption"))]
        if not edits:
            raise _Unusable("bad annotation", "'edits' has no {edit, caption} pair")
        e = edits[rng.integers(len(edits))]
        return {"edit": e["edit"], "text": e["caption"]}

    def _localisation(self, meta, rng, key):
        cfg = self.cfg
        duration, events = meta.get("duration"), meta.get("events")
        if not isinstance(duration, (int, float)) or duration <= 0:
            raise _Unusable("missing key", "no 'duration'")
        if not isinstance(events, list) or not events:
            raise _Unusable("missing key", "no 'events'")
        candidates = sliding_windows(float(duration), cfg.window_scales, cfg.window_stride)
        options = []
        for e in events:
            if not (isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"].strip()
                    and isinstance(e.get("start"), (int, float)) and isinstance(e.get("end"), (int, float))):
                continue
            gt = (max(float(e["start"]), 0.0), min(float(e["end"]), float(duration)))
            if gt[1] <= gt[0]:
                continue
            ious = window_iou(candidates, gt)
            negatives = np.flatnonzero(ious < cfg.window_negative_iou - 1e-6)  # IoU exactly at the bound is not < it
            if len(negatives):
                options.append((e["text"], gt, ious, negatives))
        if not options:
            raise _Unusable("no negative window", f"no event has a window with IoU < {cfg.window_negative_iou}")
        text, gt, ious, negatives = options[rng.integers(len(options))]
        k = min(cfg.num_window_negatives, len(negatives))
        chosen = rng.choice(negatives, size=k, replace=False)
        windows = np.concatenate([np.array([gt]), candidates[chosen]])
        # Fewer negatives than asked: repeat them so every example has 1 + num_window_negatives slots, and mark the
        # repeats in `window_mask` so a loss can ignore them.
        index = np.array(list(range(k + 1)) + [1 + i % k for i in range(cfg.num_window_negatives - k)])
        all_ious = np.concatenate([[1.0], ious[chosen]])
        fields = {"text": text, "windows": windows[index].astype(np.float32),
                  "ious": all_ious[index].astype(np.float32),
                  "window_mask": np.arange(len(index)) <= k}
        return fields, windows, index


def _realise(plan: Plan, data: bytes, cfg: DataCfg) -> dict:
    """Decode the planned frames: the whole clip, or each localisation window (one seeking pass over the file)."""
    rng = np.random.default_rng(plan.seed)
    if plan.windows is None:
        frames, times = decode_clip(data, cfg.num_frames, rng=rng, size=cfg.frame_size, seek=cfg.seek)
    else:
        frames, times = decode_windows(data, plan.windows, cfg.num_frames, rng=rng, size=cfg.frame_size,
                                       seek=cfg.seek)
        frames, times = frames[plan.window_index], times[plan.window_index]
    return {"key": plan.key, "frames": frames, "times": times, **plan.fields}


# --------------------------------------------------------------------------------------------------------- collate

def collate(examples: Sequence[dict], task: str, tokenizer=None) -> dict:
    """Examples -> one batch (B examples; localisation has W windows of T frames each):

    task str; keys list[str]; frames uint8 (B, T, H, W, 3) (localisation (B, W, T, H, W, 3)); times float32 (B, T)
    (localisation (B, W, T)) seconds of the frames shown; texts as list[str]: prompt + target (caption,
    detailed_caption, qa), text (retrieval, localisation, matching) or edit + text (composed: an edit of the clip and
    the caption of the edited clip); group int64 (B,) (retrieval: equal for
    texts of the same clip); label float32 (B,) (matching: 1 = the clip's own caption); windows float32 (B, W, 2)
    seconds, ious float32 (B, W), window_mask bool (B, W) (localisation: index 0 is the ground truth, False marks
    repeated negatives); complexity int64 (B,) when any example has it (-1 where missing). With a tokenizer, also
    `{field}_ids` list[list[int]] for each text field, without special tokens.
    """
    if task not in TEXT_FIELDS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if not examples:
        raise ValueError("collate needs at least one example")
    keys = [e["key"] for e in examples]
    shapes = {e["frames"].shape for e in examples}
    if len(shapes) > 1:
        sizes = ", ".join(f"{k}: {e['frames'].shape[-3]}x{e['frames'].shape[-2]}" for k, e in zip(keys, examples))
        raise ValueError(f"frames of different sizes in one batch ({sizes}); set DataCfg.frame_size to resize them")
    batch = {"task": task, "keys": keys,
             "frames": torch.from_numpy(np.stack([e["frames"] for e in examples])),
             "times": torch.from_numpy(np.stack([e["times"] for e in examples]).astype(np.float32))}
    for name in TEXT_FIELDS[task]:
        batch[name] = [e[name] for e in examples]
    if task == "retrieval":
        batch["group"] = torch.tensor([e["group"] for e in examples], dtype=torch.int64)
    if task == "matching":
        batch["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.float32)
    if task == "localisation":
        for name in ("windows", "ious", "window_mask"):
            batch[name] = torch.from_numpy(np.stack([e[name] for e in examples]))
    if any("complexity" in e for e in examples):
        batch["complexity"] = torch.tensor([e.get("complexity", -1) for e in examples], dtype=torch.int64)
    if tokenizer is not None:
        for name in TEXT_FIELDS[task]:
            # One string at a time: batch encoding starts the tokenizer's thread pool, which breaks under fork.
            batch[name + "_ids"] = [tokenizer.encode(t, add_special_tokens=False) for t in batch[name]]
    return batch


# --------------------------------------------------------------------------------------------------------- streams

def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainBatches(IterableDataset):
    """The resampled training stream of one task: this rank's rows of each global batch (see the module
    docstring for the contract)."""

    def __init__(self, cfg: DataCfg, task: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 start_step: int = 0, tokenizer=None, seed: int | None = None):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        if batch_size < 1 or start_step < 0 or not 0 <= rank < world_size or batch_size % world_size:
            raise ValueError(f"need batch_size >= 1 divisible by world_size, 0 <= rank < world_size, start_step >= 0;"
                             f" got batch_size {batch_size}, rank {rank}, world_size {world_size}, start_step "
                             f"{start_step}")
        check_cfg(cfg)
        self.cfg, self.task, self.batch_size, self.start_step = cfg, task, batch_size, start_step
        self.rows = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.tokenizer, self.seed = tokenizer, cfg.seed if seed is None else seed
        self.sources = parse_sources(cfg.train_shards, "train_shards")

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        stream = (worker + self.start_step) % num_workers
        first = max(0, -(-(self.start_step - stream) // num_workers))  # first j with j*W + stream >= start_step
        yield from self.batches(stream, first)

    def batches(self, stream: int, first: int = 0) -> Iterator[dict]:
        """This rank's rows of global batches first, first + 1, ... of logical stream `stream`, each a collated
        dict plus `skipped` (the skip events since the previous batch: (reason, shard, key, detail))."""
        cfg, size, rows = self.cfg, self.batch_size, self.rows
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, stream, zlib.crc32(self.task.encode())]))
        skips, reader = SkipCounter(keep_events=True), _ShardReader()
        plans, failures = self._plans(rng, skips), [0]
        if cfg.hard_negative_group > 1 and self.task in _GROUP_TEXT:
            plans = _hard_negative_order(plans, size, cfg.hard_negative_group, cfg.hard_negative_pool,
                                         _GROUP_TEXT[self.task])

        def realise(plan: Plan) -> dict | None:
            try:
                example = _realise(plan, reader.read(plan.shard, plan.video), cfg)
                failures[0] = 0
                return example
            except (VideoDecodeError, OSError) as e:
                skips.skip("undecodable video", plan.shard, plan.key, str(e)[:200])
                failures[0] += 1
                if failures[0] >= cfg.max_consecutive_failures:
                    raise NoUsableData(f"no usable {self.task} sample: {failures[0]} videos in a row failed to "
                                       f"decode; skipped: {skips.report()}") from e
                return None

        redraws = 0
        try:
            for _ in range(first * size):
                next(plans)
            while True:
                chunk = [next(plans) for _ in range(size)]
                mine = list(range(size))[rows]
                examples = {i: realise(chunk[i]) for i in mine}
                if not any(examples.values()):
                    # Every clip of our rows failed: borrow the nearest decodable clip of the other ranks' rows.
                    for i in sorted(set(range(size)) - set(mine), key=lambda j: (min(abs(j - m) for m in mine), j)):
                        examples[i] = realise(chunk[i])
                        if examples[i] is not None:
                            break
                good = [i for i, e in examples.items() if e is not None]
                if not good:
                    redraws += 1
                    if notable(redraws):
                        log.warning("every clip of a %s batch failed to decode; drawing new ones shifts the rest of "
                                    "stream %d, so resuming past this point is no longer exact (%d such batches so "
                                    "far)", self.task, stream, redraws)
                    continue
                batch = collate([examples[i] if examples[i] is not None
                                 else examples[min(good, key=lambda j: (abs(j - i), j))] for i in mine],
                                self.task, self.tokenizer)
                batch["skipped"] = skips.drain()
                yield batch
        except NoUsableData as e:
            # Raised here it would cross the DataLoader as a traceback; as a batch it reaches the main process intact.
            yield {"error": str(e), "skipped": skips.drain()}
        finally:
            plans.close()
            reader.close()

    def _plans(self, rng: np.random.Generator, skips: SkipCounter) -> Iterator[Plan]:
        cfg, planner = self.cfg, _Planner(self.task, self.cfg)
        weights = np.array([w for _, w in self.sources])
        all_shards = {s for shards, _ in self.sources for s in shards}
        buffer: list[Plan] = []
        seen, accepted, failures = set(), 0, 0
        while True:
            shards = self.sources[rng.choice(len(self.sources), p=weights / weights.sum())][0]
            shard = shards[rng.integers(len(shards))]
            before = skips.total
            index = read_shard_index(shard, skips)
            failures += skips.total - before
            seen.add(shard)
            for i in rng.permutation(len(index)):
                plan = planner(index[i], rng, skips)
                if plan is None:
                    failures += 1
                    continue
                failures, accepted = 0, accepted + 1
                if len(buffer) < cfg.shuffle_buffer:
                    buffer.append(plan)
                    continue
                if buffer:
                    j = rng.integers(len(buffer))
                    plan, buffer[j] = buffer[j], plan
                yield plan
            if failures >= cfg.max_consecutive_failures:
                raise NoUsableData(f"no usable {self.task} sample in the last {failures} candidates; skipped: "
                                   f"{skips.report()}")
            if accepted == 0 and seen >= all_shards:
                raise NoUsableData(f"no usable {self.task} sample in a whole pass over {len(all_shards)} shards; "
                                   f"skipped: {skips.report()}")


# The text each contrastive task contrasts (hard-negative groups are formed over it).
_GROUP_TEXT = {"caption": "target", "detailed_caption": "target", "retrieval": "text", "composed": "text"}


def _hard_negative_order(plans: Iterator[Plan], size: int, group: int, pool: int, field_name: str
                         ) -> Iterator[Plan]:
    """Reorder a plan stream so that every `size` consecutive plans (one batch) are groups of `group`: the oldest
    waiting plan, then the `group - 1` plans among the next `pool` waiting ones whose `field_name` text shares the
    most content words with it (the earlier plan wins ties; an identical text is never chosen, since it would be a
    false negative). A pure function of the plan stream, so resuming (which replays plans) stays exact."""
    waiting: deque = deque()  # (plan, content words, normalised text)
    try:
        while True:
            batch: list[Plan] = []
            while len(batch) < size:
                while len(waiting) < pool + 1:
                    plan = next(plans)
                    text = str(plan.fields[field_name])
                    waiting.append((plan, _content_words(text), " ".join(text.lower().split())))
                anchor, words, norm = waiting.popleft()
                want = min(group, size - len(batch)) - 1
                scored = sorted((-len(words & w), i) for i, (_, w, n) in enumerate(waiting)
                                if i < pool and n != norm)
                picked = sorted(i for _, i in scored[:want])
                batch.append(anchor)
                batch.extend(waiting[i][0] for i in picked)
                for i in reversed(picked):
                    del waiting[i]
            yield from batch
    finally:
        getattr(plans, "close", lambda: None)()


class EvalClips(IterableDataset):
    """One ordered pass over evaluation shards: batches of clips with frames at segment centres."""

    def __init__(self, shards: str | Sequence[str], num_frames: int, *, rank: int = 0, world_size: int = 1,
                 batch_size: int = 8, frame_size: int | None = None, video_ext: str = "mp4", seek: bool = True):
        if not 0 <= rank < world_size or batch_size < 1 or num_frames < 1:
            raise ValueError(f"need 0 <= rank < world_size, batch_size >= 1, num_frames >= 1; got rank {rank}, "
                             f"world_size {world_size}, batch_size {batch_size}, num_frames {num_frames}")
        self.shards = expand_shards(shards)
        self.num_frames, self.rank, self.world_size, self.batch_size = num_frames, rank, world_size, batch_size
        self.frame_size, self.video_ext, self.seek = frame_size, video_ext, seek

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        skips, reader = SkipCounter(keep_events=True), _ShardReader()
        # Index-level problems are seen by every worker of every rank; one of them reports them.
        index_skips = skips if (self.rank == 0 and worker == 0) else SkipCounter(warn=False)
        position, mine = 0, []
        try:
            for shard in self.shards:
                for s in read_shard_index(shard, index_skips):
                    member = _usable_video(s, self.video_ext, index_skips)
                    if member is None:
                        continue
                    b, position = position // self.batch_size, position + 1
                    if b % self.world_size == self.rank and (b // self.world_size) % num_workers == worker:
                        mine.append((s, member))
                    if position % self.batch_size == 0 and mine:
                        yield self._batch(mine, reader, skips)
                        mine = []
            if mine or skips.has_events:
                yield self._batch(mine, reader, skips)
        finally:
            reader.close()

    def _batch(self, items: list, reader: _ShardReader, skips: SkipCounter) -> dict:
        keys, frames, times, metas = [], [], [], []
        for s, member in items:
            try:
                f, t = decode_clip(reader.read(s.shard, s.members[member]), self.num_frames, size=self.frame_size,
                                   seek=self.seek)
            except (VideoDecodeError, OSError) as e:
                skips.skip("undecodable video", s.shard, s.key, str(e)[:200])
                continue
            keys.append(s.key)
            frames.append(f)
            times.append(t)
            metas.append(s.meta or {})
        if len({f.shape for f in frames}) > 1:
            sizes = ", ".join(f"{k}: {f.shape[1]}x{f.shape[2]}" for k, f in zip(keys, frames))
            raise ValueError(f"frames of different sizes in one batch ({sizes}); pass frame_size to resize them")
        # An empty batch (every clip failed) still goes out, carrying its skip events, so the DataLoader's
        # round-robin order stays aligned; BatchLoader drops it.
        return {"keys": keys,
                "frames": torch.from_numpy(np.stack(frames)) if frames else torch.zeros(0, dtype=torch.uint8),
                "times": torch.from_numpy(np.stack(times).astype(np.float32)) if times else torch.zeros(0),
                "meta": metas, "skipped": skips.drain()}


def _identity(batch):
    return batch


# Schedulers signal the whole process group (and torchrun the worker's group): the main process decides what a stop
# signal means and shuts the workers down itself, so the workers must not die of it first.
_IGNORED_IN_WORKERS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _worker_ignores_signals(worker_id: int) -> None:
    for sig in _IGNORED_IN_WORKERS:
        signal.signal(sig, signal.SIG_IGN)


class BatchLoader:
    """An iterable of batches from a DataLoader over a stream (batch_size None: workers yield whole batches).
    Collects the workers' skip events in `skips` and removes them (and empty evaluation batches) from the batches.
    A stream that finds nothing usable raises NoUsableData here, in the main process. Workers ignore SIGTERM,
    SIGINT and SIGUSR1; closing the iterator (or its end) shuts them down."""

    def __init__(self, dataset: IterableDataset, num_workers: int = 0, pin_memory: bool = False):
        self.dataset, self.skips = dataset, SkipCounter()
        self.dataloader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                     collate_fn=_identity,
                                     worker_init_fn=_worker_ignores_signals if num_workers > 0 else None)

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self.dataloader)
        try:
            for batch in batches:
                self.skips.absorb(batch.pop("skipped", ()))
                if "error" in batch:
                    raise NoUsableData(batch["error"])
                if batch["keys"]:
                    yield batch
        finally:
            # Stop and join the workers now, not whenever the iterator is garbage-collected (torch's own shutdown).
            getattr(batches, "_shutdown_workers", lambda: None)()


def make_train_loader(cfg: DataCfg, task: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                      start_step: int = 0, tokenizer=None, seed: int | None = None) -> BatchLoader:
    """Infinite resampled batches of `task`, starting at global batch `start_step` (resume). `batch_size` is the
    global batch size: this rank gets rows [rank * n, (rank + 1) * n) of each global batch, n = batch_size //
    world_size, and decodes only those. Batch format: `collate`; resume contract: the module docstring."""
    dataset = TrainBatches(cfg, task, batch_size, rank=rank, world_size=world_size, start_step=start_step,
                           tokenizer=tokenizer, seed=seed)
    return BatchLoader(dataset, cfg.num_workers, cfg.pin_memory)


def iter_eval_clips(shards: str | Sequence[str], num_frames: int, *, rank: int = 0, world_size: int = 1,
                    batch_size: int = 8, num_workers: int = 0, frame_size: int | None = None,
                    video_ext: str = "mp4", seek: bool = True) -> BatchLoader:
    """One ordered pass per iteration over evaluation clips. Batches: keys list[str]; frames uint8 (B, T, H, W, 3)
    at segment centres; times float32 (B, T) seconds; meta list[dict] (the clips' JSON). The last batch of a rank
    may be smaller, and ranks may differ by one batch."""
    dataset = EvalClips(shards, num_frames, rank=rank, world_size=world_size, batch_size=batch_size,
                        frame_size=frame_size, video_ext=video_ext, seek=seek)
    return BatchLoader(dataset, num_workers)
