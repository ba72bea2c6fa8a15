"""What every annotation parser shares: the record it returns and small readers of json/jsonl/csv files."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.shards import safe_key

# Extensions tried, in order, when an annotation names a video without one (or with one that is not on disk).
# DiDeMo's Flickr videos add .wmv, .mts, .m2ts and .3g2 (and names that end in a bare ".").
VIDEO_EXTS = [".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".wmv", ".mts",
              ".m2ts", ".3g2"]
# ISO-BMFF family: copied byte for byte under `.mp4` (one demuxer reads them all); everything else is transcoded.
MP4_FAMILY = {".mp4", ".m4v", ".mov"}


@dataclass
class Record:
    """One sample to write. `videos` maps the member name (`mp4`, or `src.mp4`/`tgt.mp4` for triplets) to the
    candidate video names (relative to --videos, with or without extension) tried in order."""
    key: str
    meta: dict
    videos: dict[str, list[str]]
    probe_duration: bool = False  # the annotations lack the duration: read it from the video's header
    max_duration: float | None = None  # the annotated span (DiDeMo: 30 s): a longer probed duration is capped to it


@dataclass
class Output:
    """A split folder to write: `OUT/<name>/shard-*.tar`."""
    name: str
    records: list[Record] = field(default_factory=list)


def read_json(path) -> object:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_csv(path, required: list[str]) -> list[dict]:
    """Rows as dicts. A leading unnamed index column (pandas' `to_csv` default, as in `MSRVTT_JSFUSION_test.csv`)
    is fine; a missing required column fails naming the file and the columns it has."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {columns}")
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def key_of(name: str) -> str:
    """Sample key from a video id or file name: a known video extension is dropped, then made WebDataset-safe."""
    p = Path(name)
    stem = str(p.with_suffix("")) if p.suffix.lower() in VIDEO_EXTS else name
    return safe_key(stem)


def group_in_order(items, key_fn) -> dict:
    """Group items by key_fn, groups in order of first appearance, items in file order."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key_fn(item), []).append(item)
    return groups


def make_event(start, end, text: str, duration: float | None = None, **extra) -> dict:
    """A moment in seconds with 0 <= start <= end (<= duration when known): reversed pairs are swapped and
    out-of-range times clipped, because every official release has a few of each."""
    s, e = sorted((float(start), float(end)))
    s = max(0.0, s)
    if duration is not None:
        s, e = min(s, float(duration)), min(e, float(duration))
    return {"start": round(s, 3), "end": round(e, 3), "text": text.strip(), **extra}
