"""A long-caption set: json (or jsonl) list of {video, caption} where the caption is a detailed description."""
from __future__ import annotations

from pathlib import Path

from data_tools.converters.common import Output, Record, key_of, read_json, read_jsonl


def parse_longcap(annotations, split: str | None = None, **_) -> list[Output]:
    """One sample per video, the caption as `detailed_caption` (no short `caption`: the set has none). A video
    listed twice keeps its first caption."""
    path = Path(annotations)
    items = read_jsonl(path) if path.suffix.lower() == ".jsonl" else read_json(path)
    out, seen = Output(split or "train"), set()
    for n, item in enumerate(items):
        if "video" not in item or "caption" not in item:
            raise ValueError(f"{path}: item {n} lacks 'video' or 'caption': {sorted(item)}")
        video = str(item["video"])
        key = key_of(video)
        if key in seen:
            continue
        seen.add(key)
        meta = {"key": key, "video_id": video, "split": out.name, "detailed_caption": item["caption"].strip()}
        out.records.append(Record(key, meta, {"mp4": [video]}))
    return [out]
