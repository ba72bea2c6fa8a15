"""The synthetic benchmark: procedurally rendered clips with known objects, events, captions, QA and moments.

    python -m data_tools.synth --out DIR --seed 0 --num-train 10000 --num-test 1000 \
        [--num-val 500] [--num-compositional 1000] [--num-composed 500] [--shard-size 1000] [--workers 2]

Writes DIR/{train,val,test,compositional}/shard-*.tar (clips), DIR/composed/shard-*.tar (composed-retrieval
triplets), DIR/composed_gallery/shard-*.tar (their targets and distractors as ordinary clips), DIR/meta.json and
DIR/SCHEMA.md (the schema of every JSON key; the source is data_tools/SCHEMA.md).

Every clip is drawn from its own generator `np.random.default_rng([seed, split_id, index])`, so a clip does not
depend on the shard size, the worker count or the order the shards finish in: same seed → byte-identical shards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import Counter
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.render import (BG_COLOURS, BG_STYLES, COLOURS, DIRECTIONS, EVENT_TYPES, HELD_OUT_PAIRS, ROTATIONS,
                               SHAPES, SIZES, pair_held_out, render, sample_spec, spec_valid)
from data_tools.shards import brace_pattern, encode_mp4, shard_name, write_tar

SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "compositional": 3, "composed": 4}
CLIP_SPLITS = ["train", "val", "test", "compositional"]
MAX_EVENTS_LIMIT = 6
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six"]
ACTION_BASE = {"move": "move", "grow": "grow", "shrink": "shrink", "rotate": "rotate", "change": "change colour",
               "appear": "appear", "disappear": "disappear"}
ACTION_THIRD = {"move": "moves", "grow": "grows", "shrink": "shrinks", "rotate": "rotates",
                "change": "changes colour", "appear": "appears", "disappear": "disappears"}
# The closed answer set of every QA type; answers are single words from these lists.
QA_ANSWERS = {
    "colour": sorted(COLOURS),
    "shape": sorted(SHAPES),
    "size": sorted(SIZES),
    "count": NUMBER_WORDS[1:],
    "direction": sorted(DIRECTIONS) + sorted(ROTATIONS),
    "order": sorted(EVENT_TYPES) + sorted(SHAPES) + ["no", "yes"],
    "background": sorted(BG_COLOURS) + sorted(BG_STYLES),
    "existence": ["no", "yes"],
}
SCHEMA_PATH = Path(__file__).with_name("SCHEMA.md")


def train_pair_ok(shape: str, colour: str) -> bool:
    return not pair_held_out(shape, colour)


def any_pair_ok(shape: str, colour: str) -> bool:
    return True


# ------------------------------------------------------------------------------------------------------------ text
def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _colour_timeline(spec: dict) -> list[list[str]]:
    """colours[k][i]: the colour of object i when event k starts."""
    current = [o["colour"] for o in spec["objects"]]
    out = []
    for ev in spec["events"]:
        out.append(list(current))
        if ev["type"] == "change":
            current[ev["object"]] = ev["value"]
    return out


def _verb_phrase(ev: dict) -> str:
    if ev["type"] in ("move", "rotate"):
        return f"{ACTION_THIRD[ev['type']]} {ev['value']}"
    if ev["type"] == "change":
        return f"turns {ev['value']}"
    return ACTION_THIRD[ev["type"]]


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _full_name(obj: dict) -> str:
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def _background_phrase(spec: dict) -> str:
    return f"a {spec['background']['style']} {spec['background']['colour']} background"


def describe(spec: dict) -> dict:
    """caption, detailed_caption, events (seconds + text) and qa of a spec. Text choices come from the spec's
    text_seed, so a composed-retrieval edit (same text_seed) words its target the way it words the source."""
    rng = np.random.default_rng(spec["text_seed"])
    objects, events, fps = spec["objects"], spec["events"], spec["fps"]
    colours_at = _colour_timeline(spec)
    event_texts = [f"the {colours_at[k][ev['object']]} {objects[ev['object']]['shape']} {_verb_phrase(ev)}"
                   for k, ev in enumerate(events)]

    # Short caption: every object (first-event subject first, the rest in a canonical shape order), the
    # background and the first event — what makes two clips differ in a gallery of ~1k.
    subject = events[0]["object"]
    others = sorted((i for i in range(len(objects)) if i != subject), key=lambda i: SHAPES.index(objects[i]["shape"]))
    caption = f"{_full_name(objects[subject])} {_verb_phrase(events[0])}"
    if others:
        caption += " near " + _join_and([_full_name(objects[i]) for i in others])
    caption = _sentence(caption + f" on {_background_phrase(spec)}")

    appear_first = {ev["object"] for ev in events if ev["type"] == "appear"}
    at_start = [i for i in sorted(range(len(objects)), key=lambda i: SHAPES.index(objects[i]["shape"]))
                if i not in appear_first]
    if at_start:
        verb = "is" if len(at_start) == 1 else "are"
        intro = f"at the start, {_join_and([_full_name(objects[i]) for i in at_start])} {verb} on " \
                f"{_background_phrase(spec)}"
    else:
        intro = f"at the start, there is only {_background_phrase(spec)}"
    n = len(events)
    if n == 1:
        connectives = ["then"]
    else:
        middle = ["then", "next", "after that"]
        connectives = ["first"] + [middle[int(rng.integers(3))] for _ in range(n - 2)] + ["finally"]
    parts = [_sentence(intro)]
    for k, ev in enumerate(events):
        text = event_texts[k]
        if ev["type"] == "appear":
            text = f"{_full_name(objects[ev['object']])} appears"
        parts.append(_sentence(f"{connectives[k]}, {text}"))
    detailed = " ".join(parts)

    ev_json = [{"start": round(ev["start"] / fps, 4), "end": round(ev["end"] / fps, 4), "text": event_texts[k],
                "object": ev["object"], "type": ev["type"], "value": ev["value"]} for k, ev in enumerate(events)]
    return {"caption": caption, "detailed_caption": detailed, "events": ev_json, "qa": _qa(spec, rng)}


def _qa(spec: dict, rng: np.random.Generator) -> list[dict]:
    objects, events = spec["objects"], spec["events"]
    qa = []

    def add(kind, question, answer):
        assert answer in QA_ANSWERS[kind], (kind, answer)
        qa.append({"question": question, "answer": answer, "type": kind})

    changes = {ev["object"] for ev in events if ev["type"] == "change"}
    resized = {ev["object"] for ev in events if ev["type"] in ("grow", "shrink")}
    for i, obj in enumerate(objects):
        when = " at the start" if i in changes else ""
        add("colour", f"what colour is the {obj['shape']}{when}?", obj["colour"])
    # Colours are distinct across a clip at every moment (changes only go to unused colours), so an initial
    # colour names one object.
    i = int(rng.integers(len(objects)))
    add("shape", f"what shape is the {objects[i]['colour']} object?", objects[i]["shape"])
    i = int(rng.integers(len(objects)))
    when = " at the start" if i in resized else ""
    add("size", f"what size is the {objects[i]['colour']} {objects[i]['shape']}{when}?", objects[i]["size"])
    add("count", "how many objects are there?", NUMBER_WORDS[len(objects)])
    add("count", "how many events happen in the video?", NUMBER_WORDS[len(events)])

    for kind in ("move", "rotate"):
        by_object: dict[int, list[str]] = {}
        for ev in events:
            if ev["type"] == kind:
                by_object.setdefault(ev["object"], []).append(ev["value"])
        if by_object:
            i = sorted(by_object)[int(rng.integers(len(by_object)))]
            first = " first" if len(by_object[i]) > 1 else ""
            add("direction", f"which direction does the {objects[i]['shape']} {kind}{first}?", by_object[i][0])

    add("order", "what happens first?", events[0]["type"])
    add("order", "which object does something first?", objects[events[0]["object"]]["shape"])
    if len(events) > 1:
        add("order", "what happens last?", events[-1]["type"])
        add("order", "which object does something last?", objects[events[-1]["object"]]["shape"])
        # "does the A <verb> before the B <verb>?" only where each (object, type) happens once, so it has one answer.
        counts = Counter((ev["object"], ev["type"]) for ev in events)
        pairs = [(a, b) for a in range(len(events)) for b in range(len(events))
                 if a != b and events[a]["object"] != events[b]["object"]
                 and counts[(events[a]["object"], events[a]["type"])] == 1
                 and counts[(events[b]["object"], events[b]["type"])] == 1]
        if pairs:
            a, b = pairs[int(rng.integers(len(pairs)))]
            ea, eb = events[a], events[b]
            add("order", f"does the {objects[ea['object']]['shape']} {ACTION_BASE[ea['type']]} before the "
                         f"{objects[eb['object']]['shape']} {ACTION_THIRD[eb['type']]}?", "yes" if a < b else "no")

    add("background", "what colour is the background?", spec["background"]["colour"])
    add("background", "what pattern is the background?", spec["background"]["style"])

    present = {(o["shape"], o["colour"]) for o in objects}
    present |= {(objects[ev["object"]]["shape"], ev["value"]) for ev in events if ev["type"] == "change"}
    if rng.random() < 0.5:
        i = int(rng.integers(len(objects)))
        add("existence", f"is there {_a(objects[i]['colour'])} {objects[i]['shape']}?", "yes")
    else:
        # Held-out pairs are never named in text outside the compositional split.
        absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present and not pair_held_out(s, c)]
        s, c = absent[int(rng.integers(len(absent)))]
        add("existence", f"is there {_a(c)} {s}?", "no")
    return qa


def clip_json(spec: dict, key: str, split: str) -> dict:
    text = describe(spec)
    appear = {ev["object"] for ev in spec["events"] if ev["type"] == "appear"}
    objects = [{"id": i, "shape": o["shape"], "colour": o["colour"], "size": o["size"], "x": o["x"], "y": o["y"],
                "visible_at_start": i not in appear} for i, o in enumerate(spec["objects"])]
    return {
        "key": key, "split": split, **text,
        "complexity": len(spec["events"]),
        "duration": round(spec["num_frames"] / spec["fps"], 4), "fps": spec["fps"],
        "num_frames": spec["num_frames"], "width": spec["size"], "height": spec["size"],
        "objects": objects, "background": dict(spec["background"]), "spec": spec,
    }


# ---------------------------------------------------------------------------------------------- composed retrieval
def _with(spec: dict, part: str, index: int | None, **changes) -> dict:
    """spec with `spec[part][index]` (or `spec[part]`) updated; shares the unchanged parts (specs are never mutated
    after sampling, and a deep copy per candidate edit was most of the generation time)."""
    new = dict(spec)
    if index is None:
        new[part] = {**spec[part], **changes}
    else:
        new[part] = [{**x, **changes} if j == index else x for j, x in enumerate(spec[part])]
    return new


def _edit_candidates(spec: dict) -> list[tuple[str, str, dict]]:
    """Every valid single-attribute edit of a spec: (edit_type, edit text, edited spec). Edits keep the scene
    within the train distribution (no held-out pair, colours and shapes still distinct) and inside the frame."""
    return [c for c in _edit_options(spec) if spec_valid(c[2])]


def _edit_options(spec: dict) -> list[tuple[str, str, dict]]:
    """`_edit_candidates` before the (costly) in-frame check."""
    objects, events = spec["objects"], spec["events"]
    used_colours = {o["colour"] for o in objects} | {ev["value"] for ev in events if ev["type"] == "change"}
    used_shapes = {o["shape"] for o in objects}
    out = []
    for i, obj in enumerate(objects):
        name = f"the {obj['colour']} {obj['shape']}"
        own = [ev for ev in events if ev["object"] == i]
        colours_shown = [obj["colour"]] + [ev["value"] for ev in own if ev["type"] == "change"]
        rotates = any(ev["type"] == "rotate" for ev in own)
        for c in COLOURS:
            if c not in used_colours and train_pair_ok(obj["shape"], c):
                out.append(("colour", f"make {name} {c}", _with(spec, "objects", i, colour=c)))
        for shp in SHAPES:
            if (shp not in used_shapes and all(train_pair_ok(shp, c) for c in colours_shown)
                    and not (shp == "circle" and rotates)):  # a rotating circle would look still
                out.append(("shape", f"make {name} {_a(shp)}", _with(spec, "objects", i, shape=shp)))
        for z in SIZES:
            if z != obj["size"]:
                out.append(("size", f"make {name} {z}", _with(spec, "objects", i, size=z)))
    # Only the first event's direction: it is the one the short caption names, so every edit shows in the target
    # caption.
    first = events[0]
    if first["type"] in ("move", "rotate"):
        obj = objects[first["object"]]
        taken = {ev["value"] for ev in events if ev["object"] == first["object"] and ev["type"] == first["type"]}
        kind = "direction" if first["type"] == "move" else "rotation"
        for value in (DIRECTIONS if first["type"] == "move" else ROTATIONS):
            if value not in taken:
                out.append((kind, f"make the {obj['colour']} {obj['shape']} {first['type']} {value} instead of "
                                  f"{first['value']}", _with(spec, "events", 0, value=value)))
    for c in BG_COLOURS:
        if c != spec["background"]["colour"]:
            out.append(("background_colour", f"make the background {c}", _with(spec, "background", None, colour=c)))
    for style in BG_STYLES:
        if style != spec["background"]["style"]:
            out.append(("background_style", f"make the background {style}",
                        _with(spec, "background", None, style=style)))
    return out


def _draw_by_type(rng: np.random.Generator, edits: list[tuple[str, str, dict]]) -> int:
    """Index of an edit drawn with its type uniform over the types present, then uniform within the type."""
    types = sorted({e[0] for e in edits})
    kind = types[int(rng.integers(len(types)))]
    of_kind = [j for j, e in enumerate(edits) if e[0] == kind]
    return of_kind[int(rng.integers(len(of_kind)))]


def composed_sample(rng: np.random.Generator, spec: dict, num_distractors: int) -> list[tuple[str, str, dict]]:
    """Target edit first, then distractor edits of the same source. The target's edit type is drawn uniformly over
    the types available (so background edits are not swamped by the many object edits); distractors are drawn
    from all the other edits, which keeps them one attribute away from the source, like the target."""
    cands = _edit_candidates(spec)
    target = _draw_by_type(rng, cands)
    rest = [j for j in range(len(cands)) if j != target]
    picks = rng.choice(len(rest), size=min(num_distractors, len(rest)), replace=False)
    return [cands[target]] + [cands[rest[int(j)]] for j in picks]


TRAIN_EDITS = 3  # text-only edits stored per train clip (the tiny stage 3 draws ~0.5 composed examples per clip)


def text_edits(spec: dict, seed: int, index: int) -> list[dict]:
    """Edits of a train clip with the caption the edited clip would have, and no rendered target: what stage 3's
    `composed` task trains on (video + edit text -> the edited caption's text embedding), so the composed-video
    benchmark, whose targets are videos, stays zero-shot. Drawn like a triplet's target and distractors, from a
    generator of their own (the clip's own stream, and so every other byte of the split, is unchanged). Each edit's
    type is drawn uniformly, like a triplet target's, and only drawn edits pay for the in-frame check."""
    rng = np.random.default_rng([seed, SPLIT_IDS["train"], index, 1])
    options, out = _edit_options(spec), []
    while options and len(out) < TRAIN_EDITS:
        kind, text, new = options.pop(_draw_by_type(rng, options))
        if spec_valid(new):
            out.append({"type": kind, "edit": text, "caption": describe(new)["caption"]})
    return out


# --------------------------------------------------------------------------------------------------------- workers
def _clip_spec(split: str, index: int, cfg: dict) -> tuple[dict, np.random.Generator]:
    rng = np.random.default_rng([cfg["seed"], SPLIT_IDS[split], index])
    kwargs = dict(size=cfg["size"], fps=cfg["fps"], max_events=cfg["max_events"], min_seconds=cfg["min_seconds"],
                  max_seconds=cfg["max_seconds"])
    if split == "compositional":
        # Balanced over the held-out pairs; other objects and colour changes are unconstrained.
        return sample_spec(rng, pair_ok=any_pair_ok, forced_pair=HELD_OUT_PAIRS[index % len(HELD_OUT_PAIRS)],
                           **kwargs), rng
    return sample_spec(rng, pair_ok=train_pair_ok, **kwargs), rng


def _write_clip_shard(job: dict) -> dict:
    cfg, split, shard, start, stop = job["cfg"], job["split"], job["shard"], job["start"], job["stop"]
    captions, detailed, complexity = [], [], Counter()
    samples = []
    for index in range(start, stop):
        spec, _ = _clip_spec(split, index, cfg)
        key = f"{split}-{index:07d}"
        meta = clip_json(spec, key, split)
        if split == "train":
            meta["edits"] = text_edits(spec, cfg["seed"], index)
        samples.append({"__key__": key, "mp4": encode_mp4(render(spec), spec["fps"]), "json": meta})
        captions.append(meta["caption"])
        detailed.append(meta["detailed_caption"])
        complexity[meta["complexity"]] += 1
    write_tar(Path(cfg["out"]) / split / shard_name("shard", shard), samples)
    return {"split": split, "n": stop - start, "captions": captions, "detailed": detailed,
            "complexity": dict(complexity)}


def _write_composed_shard(job: dict) -> dict:
    cfg, shard, start, stop = job["cfg"], job["shard"], job["start"], job["stop"]
    triplets, gallery, captions = [], [], []
    for index in range(start, stop):
        spec, rng = _clip_spec("composed", index, cfg)
        key = f"composed-{index:07d}"
        edits = composed_sample(rng, spec, cfg["distractors"])
        src_json = clip_json(spec, key, "composed")
        src_mp4 = encode_mp4(render(spec), spec["fps"])
        members = []
        for j, (kind, text, new_spec) in enumerate(edits):
            gkey = f"{key}-t" if j == 0 else f"{key}-d{j}"
            g_json = clip_json(new_spec, gkey, "composed_gallery")
            g_json.update({"triplet": key, "role": "target" if j == 0 else "distractor", "edit": text,
                           "edit_type": kind})
            members.append((gkey, g_json, encode_mp4(render(new_spec), new_spec["fps"])))
        tkey, t_json, t_mp4 = members[0]
        triplets.append({"__key__": key, "src.mp4": src_mp4, "tgt.mp4": t_mp4, "json": {
            "key": key, "split": "composed", "edit": edits[0][1], "edit_type": edits[0][0],
            "source_caption": src_json["caption"], "target_caption": t_json["caption"],
            "source": src_json, "target": t_json, "target_key": tkey,
            "distractor_keys": [m[0] for m in members[1:]],
            "distractor_edits": [e[1] for e in edits[1:]]}})
        for gkey, g_json, mp4 in members:
            gallery.append({"__key__": gkey, "mp4": mp4, "json": g_json})
            captions.append(g_json["caption"])
    out = Path(cfg["out"])
    write_tar(out / "composed" / shard_name("shard", shard), triplets)
    write_tar(out / "composed_gallery" / shard_name("shard", shard), gallery)
    return {"split": "composed", "n": stop - start, "captions": captions, "detailed": [], "complexity": {}}


def _clean(directory: Path) -> None:
    # Stale shards from an earlier, larger run would otherwise sit beside the new ones under the same pattern.
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("shard-*.tar*"):
        old.unlink()


def generate(out: str | os.PathLike, *, seed: int = 0, counts: dict[str, int], shard_size: int = 1000,
             workers: int = 1, size: int = 64, fps: int = 8, max_events: int = 4, min_seconds: float = 3.0,
             max_seconds: float = 8.0, distractors: int = 3, progress: bool = True) -> dict:
    """Generate every split with a count > 0 into `out` and return the meta dict (also written to out/meta.json)."""
    if size % 2:
        raise ValueError(f"--size must be even (yuv420p), got {size}")
    if not 1 <= max_events <= MAX_EVENTS_LIMIT:
        raise ValueError(f"--max-events must be in 1..{MAX_EVENTS_LIMIT}, got {max_events}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(out=str(out), seed=seed, size=size, fps=fps, max_events=max_events, min_seconds=min_seconds,
               max_seconds=max_seconds, distractors=distractors)
    jobs, num_shards = [], {}
    for split in CLIP_SPLITS + ["composed"]:
        n = counts.get(split, 0)
        dirs = [split] + (["composed_gallery"] if split == "composed" else [])
        for d in dirs:
            if n or (out / d).exists():
                _clean(out / d)
        num_shards[split] = (n + shard_size - 1) // shard_size
        for shard in range(num_shards[split]):
            jobs.append({"cfg": cfg, "split": split, "shard": shard, "start": shard * shard_size,
                         "stop": min(n, (shard + 1) * shard_size)})
    # Biggest first so a short split never waits alone at the end.
    jobs.sort(key=lambda j: -(j["stop"] - j["start"]) * (1 + distractors if j["split"] == "composed" else 1))

    t0 = time.perf_counter()
    results = []
    bar = tqdm(total=sum(j["stop"] - j["start"] for j in jobs), unit="clip", disable=not progress)

    if workers <= 1:
        for job in jobs:
            results.append(_run_job(job))
            bar.update(results[-1]["n"])
    else:
        # spawn, not fork: workers start clean (no inherited threads or open files) on every platform.
        with get_context("spawn").Pool(workers) as pool:
            for res in pool.imap_unordered(_run_job, jobs):
                results.append(res)
                bar.update(res["n"])
    bar.close()
    seconds = time.perf_counter() - t0

    collisions, complexity = {}, {}
    for split in CLIP_SPLITS + ["composed"]:
        rs = [r for r in results if r["split"] == split]
        caps = [c for r in rs for c in r["captions"]]
        det = [c for r in rs for c in r["detailed"]]
        name = "composed_gallery" if split == "composed" else split
        if caps:
            collisions[name] = {"clips": len(caps), "caption": len(caps) - len(set(caps))}
            if det:
                collisions[name]["detailed_caption"] = len(det) - len(set(det))
        hist = Counter()
        for r in rs:
            hist.update({int(k): v for k, v in r["complexity"].items()})
        if hist:
            complexity[split] = {str(k): hist[k] for k in sorted(hist)}
    shards = {}
    for split in CLIP_SPLITS + ["composed"]:
        if num_shards[split]:
            shards[split] = brace_pattern(out / split, "shard", num_shards[split])
            if split == "composed":
                shards["composed_gallery"] = brace_pattern(out / "composed_gallery", "shard", num_shards[split])
    total = sum(counts.get(s, 0) for s in CLIP_SPLITS) + counts.get("composed", 0) * (2 + distractors)
    meta = {
        "format": "ville-synth-v1", "seed": seed, "size": size, "fps": fps, "max_events": max_events,
        "seconds_range": [min_seconds, max_seconds], "distractors_per_triplet": distractors,
        "counts": {s: counts.get(s, 0) for s in CLIP_SPLITS + ["composed"]}
        | {"composed_gallery": counts.get("composed", 0) * (1 + distractors)},
        "shard_size": shard_size, "shards": shards,
        "caption_collisions": collisions,
        "complexity_histogram": complexity,
        "held_out_pairs": [{"shape": s, "colour": c} for s, c in HELD_OUT_PAIRS],
        "qa_answers": QA_ANSWERS,
        "generation_seconds": round(seconds, 2), "workers": workers,
        "videos_encoded": total, "videos_per_second": round(total / max(seconds, 1e-9), 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copyfile(SCHEMA_PATH, out / "SCHEMA.md")
    return meta


def _run_job(job: dict) -> dict:
    return (_write_composed_shard if job["split"] == "composed" else _write_clip_shard)(job)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data_tools.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (split folders, meta.json, SCHEMA.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=10000)
    p.add_argument("--num-val", type=int, default=500)
    p.add_argument("--num-test", type=int, default=1000)
    p.add_argument("--num-compositional", type=int, default=1000, help="test clips with held-out shape×colour pairs")
    p.add_argument("--num-composed", type=int, default=500, help="composed-retrieval triplets")
    p.add_argument("--distractors", type=int, default=3, help="gallery distractors per composed triplet")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--max-events", type=int, default=4, help=f"events per clip are 1..K (K <= {MAX_EVENTS_LIMIT})")
    p.add_argument("--min-seconds", type=float, default=3.0)
    p.add_argument("--max-seconds", type=float, default=8.0)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    counts = {"train": a.num_train, "val": a.num_val, "test": a.num_test, "compositional": a.num_compositional,
              "composed": a.num_composed}
    meta = generate(a.out, seed=a.seed, counts=counts, shard_size=a.shard_size, workers=a.workers, size=a.size,
                    fps=a.fps, max_events=a.max_events, min_seconds=a.min_seconds, max_seconds=a.max_seconds,
                    distractors=a.distractors, progress=not a.no_progress)
    print(json.dumps({k: meta[k] for k in ("counts", "shards", "caption_collisions", "generation_seconds",
                                           "videos_per_second")}, indent=2))
    return meta


if __name__ == "__main__":
    main()
