"""WebVid (video–caption csv) and WebVid-CoVR (composed video retrieval triplets)."""
from __future__ import annotations

import re
from pathlib import Path

from data_tools.converters.common import Output, Record, key_of, read_csv

_ISO_DURATION = re.compile(r"^P(?:T)?(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?$")


def parse_duration(text: str) -> float | None:
    """WebVid durations are ISO 8601 (`PT00H00M11S`); plain seconds are accepted too. None when unparseable."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    m = _ISO_DURATION.match(text)
    if not m or not any(m.groups()):
        return None
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def parse_webvid(annotations, split: str | None = None, **_) -> list[Output]:
    """WebVid csv (`videoid, contentUrl, duration, page_dir, name`); videos at `page_dir/videoid.*` (the layout of
    the original download script) or directly `videoid.*`."""
    name = split or "train"
    out, seen = Output(name), set()
    for row in read_csv(annotations, ["videoid", "name"]):
        vid = row["videoid"]
        if vid in seen:
            continue
        seen.add(vid)
        meta = {"key": key_of(vid), "video_id": vid, "split": name, "caption": row["name"]}
        duration = parse_duration(row.get("duration", ""))
        if duration is not None:
            meta["duration"] = duration
        if row.get("contentUrl"):
            meta["url"] = row["contentUrl"]
        page_dir = row.get("page_dir", "")
        candidates = ([f"{page_dir}/{vid}"] if page_dir else []) + [vid]
        out.records.append(Record(meta["key"], meta, {"mp4": candidates}))
    return [out]


def parse_covr(annotations, split: str | None = None, **_) -> list[Output]:
    """WebVid-CoVR csv (`pth1, pth2, edit, txt1, txt2`, and extra columns kept under `extra`); `pth*` are video
    paths relative to --videos, without extension. Writes triplets (`src.mp4`, `tgt.mp4`, json) to `<split>` and
    the unique targets, as ordinary clips, to `<split>_gallery`."""
    name = split or Path(annotations).stem
    base = ["pth1", "pth2", "edit", "txt1", "txt2"]
    triplets, gallery = Output(name), Output(f"{name}_gallery")
    seen_keys: dict[str, int] = {}
    in_gallery = set()
    for row in read_csv(annotations, base):
        src, tgt = row["pth1"], row["pth2"]
        key = f"{key_of(src)}-{key_of(tgt)}"
        # The same pair can come with several edit texts: later ones get a counter.
        n = seen_keys.get(key, 0)
        seen_keys[key] = n + 1
        if n:
            key = f"{key}-{n}"
        target_key = key_of(tgt)
        meta = {"key": key, "split": name, "edit": row["edit"], "source_caption": row["txt1"],
                "target_caption": row["txt2"], "source_id": src, "target_id": tgt, "source_key": key_of(src),
                "target_key": target_key}
        extra = {k: v for k, v in row.items() if k and k not in base}
        if extra:
            meta["extra"] = extra
        triplets.records.append(Record(key, meta, {"src.mp4": [src, Path(src).name],
                                                   "tgt.mp4": [tgt, Path(tgt).name]}))
        if target_key not in in_gallery:
            in_gallery.add(target_key)
            g = {"key": target_key, "video_id": tgt, "split": gallery.name, "caption": row["txt2"]}
            gallery.records.append(Record(target_key, g, {"mp4": [tgt, Path(tgt).name]}))
    return [triplets, gallery]
