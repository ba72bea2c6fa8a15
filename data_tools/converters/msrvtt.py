"""MSR-VTT retrieval/captioning (`MSRVTT_data.json` + the 9k / 1k-A csvs) and MSRVTT-QA."""
from __future__ import annotations

from pathlib import Path

from data_tools.converters.common import Output, Record, group_in_order, key_of, read_csv, read_json

_SPLIT_ALIASES = {"val": "validate"}  # MSRVTT_data.json says "validate"


def _record(video_id: str, split: str, captions: list[str], test_sentence: str | None, category) -> Record:
    meta = {"key": key_of(video_id), "video_id": video_id, "split": split}
    if test_sentence is not None:
        # 1k-A: the one paired sentence is the query; the other 19 stay available as `captions`.
        meta["caption"] = test_sentence
        meta["captions"] = captions or [test_sentence]
    elif captions:
        meta["caption"], meta["captions"] = captions[0], captions
    if category is not None:
        meta["category"] = category
    return Record(meta["key"], meta, {"mp4": [video_id]})


def parse_msrvtt(annotations, split: str | None = None, split_csv=None, **_) -> list[Output]:
    """`annotations` is `MSRVTT_data.json` ({"videos": [{video_id, split, category, …}], "sentences": [{video_id,
    caption, sen_id}]}) or a split csv alone. With `split_csv` (`MSRVTT_train.9k.csv`: column video_id;
    `MSRVTT_JSFUSION_test.csv`: key, vid_key, video_id, sentence) the csv picks the videos; otherwise `split` picks
    the json's own split, and without either every json split becomes its own output."""
    annotations = Path(annotations)
    captions: dict[str, list[str]] = {}
    videos: list[dict] = []
    if annotations.suffix.lower() == ".csv":
        split_csv = annotations
    else:
        data = read_json(annotations)
        for s in data["sentences"]:
            captions.setdefault(s["video_id"], []).append(s["caption"].strip())
        videos = data["videos"]
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
