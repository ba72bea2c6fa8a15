"""Moment datasets: DiDeMo, ActivityNet Captions, Charades-STA, QVHighlights. One sample per video, every query
of that video in `events` (start/end in seconds)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from data_tools.converters.common import (Output, Record, group_in_order, key_of, make_event, read_json,
                                          read_jsonl)

DIDEMO_SEGMENT = 5.0  # seconds per DiDeMo segment; a video has at most 6 (30 s)
DIDEMO_SPAN = 30.0  # only a video's first 30 s were annotated


def _name(split, annotations, strip=("_data", "_release")) -> str:
    if split:
        return split
    stem = Path(annotations).stem
    for s in strip:
        stem = stem.replace(s, "")
    return stem


def didemo_seconds(times) -> list[float]:
    """[s, e] segment indices (inclusive) → [5s, 5(e+1)] seconds."""
    s, e = sorted(int(t) for t in times)
    return [s * DIDEMO_SEGMENT, (e + 1) * DIDEMO_SEGMENT]


def didemo_stem(video: str) -> str:
    """The video name without its extension, whatever it is: the release names files `….mov`, `….wmv`, `….mts`,
    `….3g2`, `….m2ts` or `….` (a bare dot), and re-encoded copies are usually `<stem>.mp4`. Flickr-based names
    hold no other dot."""
    head, dot, tail = video.rpartition(".")
    return head if dot and head and "/" not in tail and len(tail) <= 5 else video


def parse_didemo(annotations, split: str | None = None, **_) -> list[Output]:
    """DiDeMo `{train,val,test}_data.json`: a list of {annotation_id, description, video, times: [[s, e] × 4
    annotators], …}. An event's start/end is the most-agreed annotation (most frequent [s, e], earliest-listed on
    ties); all annotations go to `windows` (seconds) and, as given, to `times` (segment indices: DiDeMo's own
    evaluation rule uses them). The paragraph (descriptions in file order) is `caption` (`caption_source`
    "paragraph"), as in the standard paragraph-to-video retrieval protocol. Videos are looked up by their name, then
    by its stem with any video extension; the key is the stem. Durations are probed and capped at the annotated
    30 s; ends are clipped to them."""
    name = _name(split, annotations)
    out = Output(name)
    for video, items in group_in_order(read_json(annotations), lambda a: a["video"]).items():
        events, texts = [], []
        for a in items:
            times = [tuple(int(x) for x in t) for t in a["times"]]
            best = Counter(times).most_common(1)[0][0]  # most_common is stable: earliest-listed wins ties
            s, e = didemo_seconds(best)
            extra = {"windows": [didemo_seconds(t) for t in times], "times": [sorted(t) for t in times]}
            if "annotation_id" in a:
                extra["annotation_id"] = a["annotation_id"]
            events.append(make_event(s, e, a["description"], **extra))
            texts.append(a["description"].strip())
        stem = didemo_stem(video)
        key = key_of(stem)
        meta = {"key": key, "video_id": video, "split": name, "caption": " ".join(texts), "captions": texts,
                "caption_source": "paragraph", "events": events}
        out.records.append(Record(key, meta, {"mp4": [video, stem]}, probe_duration=True,
                                  max_duration=DIDEMO_SPAN))
    return [out]


def parse_activitynet(annotations, split: str | None = None, **_) -> list[Output]:
    """ActivityNet Captions `train.json` / `val_1.json` / `val_2.json`: {video_id: {duration, timestamps: [[s, e],
    …], sentences: […]}}. Paragraph (sentences joined) as `caption`; files may drop the `v_` prefix."""
    name = _name(split, annotations)
    out = Output(name)
    for vid, ann in read_json(annotations).items():
        duration = float(ann["duration"])
        sentences = [s.strip() for s in ann["sentences"]]
        events = [make_event(s, e, text, duration) for (s, e), text in zip(ann["timestamps"], sentences)]
        key = key_of(vid)
        meta = {"key": key, "video_id": vid, "split": name, "duration": duration, "caption": " ".join(sentences),
                "captions": sentences, "caption_source": "paragraph", "events": events}
        candidates = [vid] + ([vid[2:]] if vid.startswith("v_") else [])
        out.records.append(Record(key, meta, {"mp4": candidates}))
    return [out]


def parse_charades_sta(annotations, split: str | None = None, **_) -> list[Output]:
    """Charades-STA `charades_sta_{train,test}.txt`: lines `VID start end##sentence`. Durations are probed."""
    name = split or Path(annotations).stem.replace("charades_sta_", "")
    rows = []
    with open(annotations, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            head, sep, sentence = line.partition("##")
            parts = head.split()
            if not sep or len(parts) != 3:
                raise ValueError(f"{annotations}:{n}: expected 'VID start end##sentence', got {line!r}")
            rows.append((parts[0], float(parts[1]), float(parts[2]), sentence))
    out = Output(name)
    for vid, items in group_in_order(rows, lambda r: r[0]).items():
        key = key_of(vid)
        meta = {"key": key, "video_id": vid, "split": name,
                "events": [make_event(s, e, text) for _, s, e, text in items]}
        out.records.append(Record(key, meta, {"mp4": [vid]}, probe_duration=True))
    return [out]


def parse_qvhighlights(annotations, split: str | None = None, **_) -> list[Output]:
    """QVHighlights `highlight_{train,val,test}_release.jsonl`: {qid, query, vid, duration, relevant_windows,
    saliency_scores, relevant_clip_ids}. One event per query with all its windows in `windows` (start/end = the
    first); queries without windows (the hidden test set) go to `queries`."""
    name = _name(split, annotations, strip=("highlight_", "_release"))
    out = Output(name)
    for vid, items in group_in_order(read_jsonl(annotations), lambda q: q["vid"]).items():
        duration = float(items[0]["duration"])
        events, queries = [], []
        for q in items:
            windows = q.get("relevant_windows") or []
            if windows:
                extra = {"qid": q["qid"], "windows": [[float(s), float(e)] for s, e in windows]}
                for k in ("relevant_clip_ids", "saliency_scores"):
                    if k in q:
                        extra[k] = q[k]
                events.append(make_event(windows[0][0], windows[0][1], q["query"], duration, **extra))
            else:
                queries.append({"qid": q["qid"], "text": q["query"].strip()})
        key = key_of(vid)
        meta = {"key": key, "video_id": vid, "split": name, "duration": duration}
        if events:
            meta["events"] = events
        if queries:
            meta["queries"] = queries
        out.records.append(Record(key, meta, {"mp4": [vid]}))
    return [out]
