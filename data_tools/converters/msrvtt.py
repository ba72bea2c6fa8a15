"""MSR-VTT retrieval/captioning (`MSRVTT_data.json` + the 9k / 1k-A csvs) and MSRVTT-QA."""
from __future__ import annotations

import warnings
from pathlib import Path

from data_tools.converters.common import Output, Record, group_in_order, key_of, read_csv, read_json

_SPLIT_ALIASES = {"val": "validate"}  # MSRVTT_data.json says "validate"


def _record(video_id: str, split: str, captions: list[str], test_sentence: str | None, category) -> Record:
    meta = {"key": key_of(video_id), "video_id": video_id, "split": split}
    if test_sentence is not None:
        # 1k-A: the one paired sentence is the single-caption query; the video's 20 json sentences are `captions`
        # (the all-captions protocol).
        meta["caption"], meta["caption_source"] = test_sentence, "msrvtt_1k_a"
        meta["captions"] = captions or [test_sentence]
    elif captions:
        meta["caption"], meta["captions"], meta["caption_source"] = captions[0], captions, "first_caption"
    if category is not None:
        meta["category"] = category
    return Record(meta["key"], meta, {"mp4": [video_id]})


def parse_msrvtt(annotations, split: str | None = None, split_csv=None, **_) -> list[Output]:
    """`annotations` is `MSRVTT_data.json` ({"videos": [{video_id, split, category, …}], "sentences": [{video_id,
    caption, sen_id}]}), the official pair `train_val_videodatainfo.json` + `test_videodatainfo.json` (same layout;
    a list of paths is merged), or a split csv alone. With `split_csv` (`MSRVTT_train.9k.csv`: column video_id;
    `MSRVTT_JSFUSION_test.csv`: key, vid_key, video_id, sentence) the csv picks the videos; otherwise `split` picks
    the json's own split, and without either every json split becomes its own output. The 1k-A test videos are in
    the official test split: without `test_videodatainfo.json` they only have their csv sentence (warned)."""
    paths = [Path(a) for a in annotations] if isinstance(annotations, (list, tuple)) else [Path(annotations)]
    captions: dict[str, list[str]] = {}
    videos: list[dict] = []
    if len(paths) == 1 and paths[0].suffix.lower() == ".csv":
        split_csv = paths[0]
        paths = []
    for path in paths:
        data = read_json(path)
        if not isinstance(data, dict) or "videos" not in data or "sentences" not in data:
            raise ValueError(f"{path}: expected an MSR-VTT json with 'videos' and 'sentences'")
        for s in data["sentences"]:
            captions.setdefault(s["video_id"], []).append(s["caption"].strip())
        videos += data["videos"]
    annotations = paths[0] if len(paths) == 1 else ", ".join(map(str, paths))
    category = {v["video_id"]: v.get("category") for v in videos}

    if split_csv is not None:
        rows = read_csv(split_csv, ["video_id"])
        has_sentence = bool(rows) and "sentence" in rows[0]
        name = split or ("test" if has_sentence else "train")
        out, seen = Output(name), set()
        for row in rows:
            vid = row["video_id"]
            if vid in seen:
                continue
            seen.add(vid)
            out.records.append(_record(vid, name, captions.get(vid, []), row["sentence"] if has_sentence else None,
                                       category.get(vid)))
        bare = sum(r.meta["video_id"] not in captions for r in out.records)
        if paths and bare:
            warnings.warn(f"{bare} of {len(out.records)} {split_csv} video(s) have no sentence in {annotations}: "
                          f"they keep only the csv sentence (pass test_videodatainfo.json too for the all-captions "
                          f"protocol)")
        return [out]

    wanted = _SPLIT_ALIASES.get(split, split)
    by_split = group_in_order([v for v in videos if wanted is None or v["split"] == wanted], lambda v: v["split"])
    if split is not None and not by_split:
        raise ValueError(f"{annotations}: no video has split {wanted!r}")
    outputs = []
    for json_split, vs in by_split.items():
        name = split or json_split
        outputs.append(Output(name, [_record(v["video_id"], name, captions.get(v["video_id"], []), None,
                                             v.get("category")) for v in vs]))
    return outputs


def parse_msrvtt_qa(annotations, split: str | None = None, **_) -> list[Output]:
    """MSRVTT-QA `{train,val,test}_qa.json`: a list of {question, answer, video_id (int), id, category_id}; one
    sample per video with every question in `qa`."""
    annotations = Path(annotations)
    name = split or annotations.stem.removesuffix("_qa")
    items = read_json(annotations)

    def video_name(item):
        vid = item["video_id"]
        return f"video{vid}" if isinstance(vid, int) or str(vid).isdigit() else str(vid)

    out = Output(name)
    for vid, qs in group_in_order(items, video_name).items():
        qa = []
        for q in qs:
            entry = {"question": q["question"].strip(), "answer": str(q["answer"]).strip()}
            for extra in ("id", "category_id"):
                if extra in q:
                    entry[extra] = q[extra]
            qa.append(entry)
        meta = {"key": key_of(vid), "video_id": vid, "split": name, "qa": qa}
        out.records.append(Record(meta["key"], meta, {"mp4": [vid]}))
    return [out]
