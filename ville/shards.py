"""Shards: patterns -> tar files, a tar's index (member offsets and sizes, the parsed JSON) read without touching the
video bytes, skip counting, and reading samples by key. The first stage of the pipeline in `ville.data` (which
re-exports these names); it knows nothing of tasks, plans or batches.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- shards

def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar a-001.tar a-002.tar (zero padding kept); `{x,y}` lists; several groups."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.groups()
        padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # neither a range nor a list: a literal brace pair
        return [head + "{" + body + "}" + t for t in expand_braces(tail)]
    return [head + item + t for item in items for t in expand_braces(tail)]


def expand_shards(patterns: str | Sequence[str], key: str | None = None) -> list[str]:
    """Shard paths of one or several patterns (braces, then globs), in pattern order. A pattern that matches no file
    raises ValueError naming it (and the config key)."""
    where = f" (config key {key!r})" if key else ""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError(f"no shard pattern given{where}")
    out: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"shard pattern must be a non-empty string, got {pattern!r}{where}")
        for p in expand_braces(os.path.expanduser(pattern)):
            if glob.has_magic(p):
                found = sorted(glob.glob(p))
                if not found:
                    raise ValueError(f"shard pattern {pattern!r}{where} matches no file ({p!r})")
                out.extend(found)
            elif os.path.isfile(p):
                out.append(p)
            else:
                raise ValueError(f"shard pattern {pattern!r}{where} matches no file ({p!r} does not exist)")
    return out


def parse_sources(spec: Any, key: str = "train_shards") -> list[tuple[list[str], float]]:
    """A shards config value -> [(shard paths, weight)], one entry per source."""
    if spec is None or (isinstance(spec, (str, Sequence)) and len(spec) == 0):
        raise ValueError(f"{key} is empty: give a shard pattern, a list of them, or a list of {{pattern, weight}}")
    if isinstance(spec, str):
        return [(expand_shards(spec, key), 1.0)]
    if not isinstance(spec, Sequence):
        raise ValueError(f"{key} must be a pattern string or a list, got {type(spec).__name__}")
    sources = []
    for i, item in enumerate(spec):
        if isinstance(item, str):
            sources.append((expand_shards(item, f"{key}[{i}]"), 1.0))
            continue
        if not isinstance(item, Mapping) or "pattern" not in item or set(item) - {"pattern", "weight"}:
            raise ValueError(f"{key}[{i}] must be a pattern or a mapping with keys pattern, weight; got {item!r}")
        weight = float(item.get("weight", 1.0))
        if not weight > 0:
            raise ValueError(f"{key}[{i}].weight must be > 0, got {weight}")
        pattern = item["pattern"]
        sources.append((expand_shards(pattern if isinstance(pattern, str) else list(pattern), f"{key}[{i}]"), weight))
    return sources


class NoUsableData(ValueError):
    """A stream found nothing it can use; the message is one line naming the shards and the reasons."""


def notable(n: int) -> bool:
    """Warn on the 1st-5th occurrence, then on the 10th, 100th, 1000th, ... (a running count, not a flood)."""
    return n <= 5 or str(n).rstrip("0") == "1"


def _names(paths: Sequence[str], limit: int = 3) -> str:
    paths = sorted(set(paths))
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


class SkipCounter:
    """Skipped samples per reason, counted two ways: `counts` / `total` count encounters (a resampled stream meets
    the same bad sample again on every pass), `distinct` counts different (reason, shard, key). Only a sample's
    first encounter warns (with shard + key), for the first five of each reason and then at every power of ten,
    with the running count; keeps up to `max_examples` (shard, key, detail) per reason for inspection."""

    def __init__(self, max_examples: int = 100, keep_events: bool = False, warn: bool = True):
        self.counts: Counter[str] = Counter()
        self.distinct_counts: Counter[str] = Counter()
        self.examples: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
        self.shards: dict[str, set[str]] = defaultdict(set)
        self.max_examples, self.warn = max_examples, warn
        self._seen: set[tuple[str, str, str]] = set()
        self._events: list[tuple[str, str, str, str]] | None = [] if keep_events else None

    def skip(self, reason: str, shard: str, key: str, detail: str = "", warn: bool = True) -> None:
        self.counts[reason] += 1
        if self._events is not None:
            self._events.append((reason, shard, key, detail))
        if (reason, shard, key) in self._seen:
            return
        self._seen.add((reason, shard, key))
        self.distinct_counts[reason] += 1
        self.shards[reason].add(shard)
        n = self.distinct_counts[reason]
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append((shard, key, detail))
        if warn and self.warn and notable(n):
            what = f"key {key!r} in shard {shard}" if key else f"shard {shard}"
            log.warning("skipped %s: %s%s (%d distinct so far)", reason, what, f": {detail}" if detail else "", n)

    def absorb(self, events: Sequence[Sequence[str]]) -> None:
        for reason, shard, key, detail in events:
            self.skip(reason, shard, key, detail, warn=False)

    def drain(self) -> list[tuple[str, str, str, str]]:
        events, self._events = self._events or [], []
        return events

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def distinct(self) -> int:
        return len(self._seen)

    def summary(self) -> str:
        return ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items())) or "nothing skipped"

    def report(self) -> str:
        """One line: per reason, distinct samples, encounters, the shards and one example."""
        parts = []
        for reason in sorted(self.counts):
            shard, key, detail = self.examples[reason][0]
            example = f"e.g. {'key ' + repr(key) + ': ' if key else ''}{detail}" if key or detail else ""
            parts.append(f"{reason}: {self.distinct_counts[reason]} distinct ({self.counts[reason]} encounters) in "
                         f"{_names(self.shards[reason])}{' (' + example + ')' if example else ''}")
        return "; ".join(parts) or "nothing skipped"


@dataclass
class IndexedSample:
    shard: str
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset in the tar, size)
    meta: Optional[dict] = None  # the parsed `json` member (None when the sample has none)


def read_shard_index(path: str, skips: SkipCounter | None = None) -> list[IndexedSample]:
    """The samples of one tar, in member order: members by extension (offset, size) and the parsed JSON; video
    bytes are not read. Truncated members, bad JSON and unreadable tars are skipped and counted."""
    skips = skips if skips is not None else SkipCounter()
    samples: dict[str, IndexedSample] = {}
    bad: dict[str, tuple[str, str]] = {}
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                try:
                    for m in tar:
                        base = os.path.basename(m.name)
                        if not m.isfile() or "." not in base or base.startswith("."):
                            continue
                        stem, ext = base.split(".", 1)
                        key = os.path.join(os.path.dirname(m.name), stem)
                        sample = samples.setdefault(key, IndexedSample(path, key, {}))
                        if m.offset_data + m.size > size:
                            bad[key] = ("truncated tar", f"member {m.name} ends past the end of the file")
                            break
                        sample.members[ext.lower()] = (m.offset_data, m.size)
                except (tarfile.TarError, EOFError) as e:
                    last = next(reversed(samples), "")
                    bad.setdefault(last, ("truncated tar", f"tar ends inside a header: {e}"))
            for key, sample in samples.items():
                if key in bad or "json" not in sample.members:
                    continue
                offset, n = sample.members["json"]
                f.seek(offset)
                try:
                    meta = json.loads(f.read(n))
                except (ValueError, UnicodeDecodeError) as e:
                    bad[key] = ("bad json", str(e)[:200])
                    continue
                if not isinstance(meta, dict):
                    bad[key] = ("bad json", f"top level is {type(meta).__name__}, not an object")
                    continue
                sample.meta = meta
    except (OSError, tarfile.TarError) as e:
        skips.skip("unreadable shard", path, "", str(e)[:200])
        return []
    for key, (reason, detail) in bad.items():
        skips.skip(reason, path, key, detail)
    if not samples and not bad:
        skips.skip("empty shard", path, "", "a readable tar without any sample")
    return [s for k, s in samples.items() if k not in bad]


class _ShardReader:
    """Reads members by offset, keeping a few shard files open (a shuffle buffer mixes a handful of shards)."""

    def __init__(self, max_open: int = 8):
        self.files: OrderedDict[str, Any] = OrderedDict()
        self.max_open = max_open

    def read(self, shard: str, location: tuple[int, int]) -> bytes:
        f = self.files.pop(shard, None) or open(shard, "rb")
        self.files[shard] = f
        if len(self.files) > self.max_open:
            self.files.popitem(last=False)[1].close()
        offset, size = location
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes at offset {offset}")
        return data

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def _video_member(sample: IndexedSample, ext: str) -> str | None:
    if ext in sample.members:
        return ext
    other = (sample.meta or {}).get("video_ext")
    return other if isinstance(other, str) and other in sample.members else None


def _usable_video(sample: IndexedSample, ext: str, skips: SkipCounter) -> str | None:
    member = _video_member(sample, ext)
    if member is None:
        skips.skip("missing video", sample.shard, sample.key, f"no .{ext} member")
    elif sample.members[member][1] == 0:
        skips.skip("empty video", sample.shard, sample.key, f".{member} has 0 bytes")
        member = None
    return member


def iter_samples(shards: str | Sequence[str], *, rank: int = 0, world_size: int = 1,
                 skips: SkipCounter | None = None) -> Iterator[dict]:
    """Raw samples of any layout, in order, each once, sample i of the pass on rank i % world_size: dicts with
    `__key__`, `__shard__`, `json` (parsed) and the bytes of every other member by extension (`mp4`, `src.mp4`, ...)."""
    skips = skips if skips is not None else SkipCounter()
    reader, i = _ShardReader(), 0
    try:
        for shard in expand_shards(shards):
            for s in read_shard_index(shard, skips if rank == 0 else SkipCounter(warn=False)):
                i += 1
                if (i - 1) % world_size != rank:
                    continue
                out = {"__key__": s.key, "__shard__": s.shard}
                if s.meta is not None:
                    out["json"] = s.meta
                try:
                    out.update({ext: reader.read(s.shard, loc) for ext, loc in s.members.items() if ext != "json"})
                except OSError as e:
                    skips.skip("truncated tar", s.shard, s.key, str(e))
                    continue
                yield out
    finally:
        reader.close()


class ClipStore:
    """Clips by key across shards (evaluation: decode a localisation window, fetch a composed-retrieval target)."""

    def __init__(self, shards: str | Sequence[str], skips: SkipCounter | None = None):
        self.skips = skips if skips is not None else SkipCounter()
        self.index: dict[str, IndexedSample] = {}
        for shard in expand_shards(shards):
            for s in read_shard_index(shard, self.skips):
                if s.key in self.index:
                    self.skips.skip("duplicate key", shard, s.key, f"first seen in {self.index[s.key].shard}")
                else:
                    self.index[s.key] = s
        self._reader = _ShardReader()

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def meta(self, key: str) -> dict:
        return self.index[key].meta or {}

    def read(self, key: str, ext: str = "mp4") -> bytes:
        s = self.index[key]
        if ext not in s.members:
            raise KeyError(f"clip {key!r} ({s.shard}) has no .{ext} member (has {sorted(s.members)})")
        return self._reader.read(s.shard, s.members[ext])
