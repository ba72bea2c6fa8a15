"""The synthetic benchmark: determinism, schema, held-out combinations, composed triplets, pixels that match the
spec, and the shard writer."""
from __future__ import annotations

import ast
import hashlib
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_tools import synth
from data_tools.render import (COLOURS, DIRECTIONS, HELD_OUT_PAIRS, SHAPES, render, sample_spec, spec_valid)
from data_tools.shards import ShardWriter, decode_mp4, encode_mp4, read_tar, write_tar

COUNTS = {"train": 40, "val": 8, "test": 24, "compositional": 16, "composed": 6}
CLIP_KEYS = {"key", "split", "caption", "detailed_caption", "events", "qa", "complexity", "duration", "fps",
             "num_frames", "width", "height", "objects", "background", "spec"}


def _generate(out: Path, seed: int, workers: int, counts=COUNTS) -> dict:
    return synth.generate(out, seed=seed, counts=counts, shard_size=16, workers=workers, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_a")
    _generate(out, seed=0, workers=2)
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.tar"))}


def _samples(root: Path, split: str):
    for shard in sorted((root / split).glob("shard-*.tar")):
        for key, members in read_tar(shard):
            yield key, members


def _clips(root: Path, split: str) -> list[dict]:
    return [json.loads(m["json"]) for _, m in _samples(root, split)]


def test_same_seed_gives_identical_shards_and_another_seed_does_not(dataset, tmp_path):
    # A different worker count on purpose: a clip must not depend on which process rendered it.
    _generate(tmp_path / "again", seed=0, workers=1)
    first, again = _hashes(dataset), _hashes(tmp_path / "again")
    assert len(first) == 3 + 1 + 2 + 1 + 1 + 1  # train, val, test, compositional, composed, composed_gallery
    assert first == again


def test_different_seed_differs(dataset, tmp_path):
    _generate(tmp_path / "other", seed=1, workers=1, counts={"train": 16})
    other = _hashes(tmp_path / "other")
    assert other["train/shard-000000.tar"] != _hashes(dataset)["train/shard-000000.tar"]


def test_meta_and_schema_copy(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["seed"] == 0
    assert meta["counts"]["train"] == 40 and meta["counts"]["composed_gallery"] == 6 * 4
    assert meta["shards"]["train"] == str(dataset / "train" / "shard-{000000..000002}.tar")
    assert meta["shards"]["val"] == str(dataset / "val" / "shard-000000.tar")
    for split, n in [("train", 40), ("test", 24), ("compositional", 16)]:
        caps = [c["caption"] for c in _clips(dataset, split)]
        assert len(caps) == n
        assert meta["caption_collisions"][split]["caption"] == len(caps) - len(set(caps))
    assert sum(meta["complexity_histogram"]["train"].values()) == 40
    assert [tuple(p.values()) for p in meta["held_out_pairs"]] == HELD_OUT_PAIRS
    assert meta["generation_seconds"] > 0
    assert (dataset / "SCHEMA.md").read_text() == synth.SCHEMA_PATH.read_text()


@pytest.mark.parametrize("split", ["train", "val", "test", "compositional"])
def test_clip_schema(dataset, split):
    clips = _clips(dataset, split)
    assert len(clips) == COUNTS[split]
    for i, c in enumerate(clips):
        assert CLIP_KEYS <= set(c), CLIP_KEYS - set(c)
        assert c["split"] == split and c["key"] == f"{split}-{i:07d}"
        assert c["complexity"] == len(c["events"]) and 1 <= c["complexity"] <= 4
        assert c["duration"] == pytest.approx(c["num_frames"] / c["fps"])
        assert 3.0 <= c["duration"] <= 8.0
        assert c["width"] == c["height"] == 64
        prev_end = 0.0
        for ev in c["events"]:
            assert prev_end <= ev["start"] < ev["end"] <= c["duration"]
            prev_end = ev["end"]
        texts = [ev["text"] for ev in c["events"]]
        assert len(set(texts)) == len(texts)
        shapes = [o["shape"] for o in c["objects"]]
        colours = [o["colour"] for o in c["objects"]]
        assert len(set(shapes)) == len(shapes) and len(set(colours)) == len(colours)
        assert 1 <= len(c["objects"]) <= 3
        for qa in c["qa"]:
            assert qa["answer"] in synth.QA_ANSWERS[qa["type"]], qa
            assert " " not in qa["answer"]
        # The caption names every object and the background; the detailed caption walks every event in order.
        for o in c["objects"]:
            assert f"{o['size']} {o['colour']} {o['shape']}" in c["caption"]
        assert f"{c['background']['style']} {c['background']['colour']} background" in c["caption"]
        positions = [c["detailed_caption"].find(t[4:] if t.startswith("the ") else t) for t in texts
                     if " appears" not in t]
        assert all(p >= 0 for p in positions) and positions == sorted(positions)
        assert c["detailed_caption"].startswith("At the start")


def test_mp4s_decode_to_declared_frames(dataset):
    checked = 0
    for split in ("test", "compositional"):
        for key, members in _samples(dataset, split):
            meta = json.loads(members["json"])
            frames = decode_mp4(members["mp4"])
            assert frames.shape == (meta["num_frames"], meta["height"], meta["width"], 3)
            # The shard's video is the spec's video (up to lossy coding).
            diff = np.abs(frames.astype(np.int16) - render(meta["spec"]).astype(np.int16))
            assert diff.mean() < 4.0, key
            checked += 1
    assert checked == COUNTS["test"] + COUNTS["compositional"]


def _pairs(clip: dict) -> set[tuple[str, str]]:
    """Every shape×colour pair a clip ever shows (initial colours and colour changes)."""
    pairs = {(o["shape"], o["colour"]) for o in clip["objects"]}
    pairs |= {(clip["objects"][e["object"]]["shape"], e["value"]) for e in clip["events"] if e["type"] == "change"}
    return pairs


def test_compositional_split_holds_out_pairs(dataset):
    held = set(HELD_OUT_PAIRS)
    assert len(held) == len(COLOURS)
    assert {c for _, c in held} == set(COLOURS)  # one held-out shape per colour
    assert all(any((s, c) not in held for c in COLOURS) for s in SHAPES)
    seen_in_training = set()
    for split in ("train", "val", "test"):
        for clip in _clips(dataset, split):
            seen_in_training |= _pairs(clip)
            text = " ".join([clip["caption"], clip["detailed_caption"]] + [q["question"] for q in clip["qa"]])
            assert not any(f"{c} {s}" in text for s, c in held), text
    for trip in _clips(dataset, "composed"):
        seen_in_training |= _pairs(trip["source"]) | _pairs(trip["target"])
    assert not (seen_in_training & held)
    comp = _clips(dataset, "compositional")
    assert all(_pairs(c) & held for c in comp)
    assert {p for c in comp for p in _pairs(c) & held} == held  # balanced: 16 clips cover all 8 pairs


def _attributes(clip: dict) -> dict:
    attrs = {"background.style": clip["background"]["style"], "background.colour": clip["background"]["colour"]}
    for o in clip["objects"]:
        for k in ("shape", "colour", "size"):
            attrs[f"object{o['id']}.{k}"] = o[k]
    for k, e in enumerate(clip["events"]):
        attrs[f"event{k}"] = (e["object"], e["type"], e["value"], e["start"], e["end"])
    return attrs


def _one_difference(a: dict, b: dict) -> str:
    fa, fb = _attributes(a), _attributes(b)
    assert fa.keys() == fb.keys()
    diff = [k for k in fa if fa[k] != fb[k]]
    assert len(diff) == 1, diff
    return diff[0]


def test_composed_triplets(dataset):
    import webdataset as wds  # an independent reader of the format (ville reads its shards with ville/shards.py)

    gallery = {k: (json.loads(m["json"]), m["mp4"]) for k, m in _samples(dataset, "composed_gallery")}
    assert len(gallery) == COUNTS["composed"] * 4
    pattern = json.loads((dataset / "meta.json").read_text())["shards"]["composed"]
    triplets = list(wds.WebDataset(pattern, shardshuffle=False))
    assert len(triplets) == COUNTS["composed"]
    kind_of = {"shape": "shape", "colour": "colour", "size": "size", "style": "background_style"}
    for t in triplets:
        assert {"json", "src.mp4", "tgt.mp4"} <= set(t)
        meta = json.loads(t["json"])
        src, tgt = meta["source"], meta["target"]
        changed = _one_difference(src, tgt)
        if changed.startswith("event"):
            assert meta["edit_type"] in ("direction", "rotation")
        elif changed == "background.colour":
            assert meta["edit_type"] == "background_colour"
        else:
            assert meta["edit_type"] == kind_of[changed.split(".")[1]]
        assert meta["source_caption"] == src["caption"] and meta["target_caption"] == tgt["caption"]
        assert meta["source_caption"] != meta["target_caption"]
        g_meta, g_mp4 = gallery[meta["target_key"]]
        assert g_meta["role"] == "target" and g_mp4 == t["tgt.mp4"] and g_meta["caption"] == tgt["caption"]
        src_frames, tgt_frames = decode_mp4(t["src.mp4"]), decode_mp4(t["tgt.mp4"])
        assert src_frames.shape == tgt_frames.shape and not np.array_equal(src_frames, tgt_frames)
        assert len(meta["distractor_keys"]) == 3
        for dkey, dedit in zip(meta["distractor_keys"], meta["distractor_edits"]):
            d_meta, _ = gallery[dkey]
            assert d_meta["role"] == "distractor" and d_meta["edit"] == dedit != meta["edit"]
            _one_difference(src, d_meta)
            assert _attributes(d_meta) != _attributes(tgt)


def test_train_clips_carry_text_edits_with_the_edited_caption(dataset):
    types = Counter()
    for split in synth.CLIP_SPLITS:
        for c in _clips(dataset, split):
            if split != "train":
                assert "edits" not in c
                continue
            edits = c["edits"]
            assert 1 <= len(edits) <= synth.TRAIN_EDITS
            assert len({e["edit"] for e in edits}) == len(edits)
            for e in edits:
                types[e["type"]] += 1
                assert e["edit"].startswith("make ") and e["caption"] != c["caption"]
                # The edited caption is the clip's caption with the named attribute changed, nothing else.
                if e["type"] == "colour":
                    old, shape, new = re.fullmatch(r"make the (\w+) (\w+) (\w+)", e["edit"]).groups()
                    assert f"{old} {shape}" in c["caption"] and f"{new} {shape}" in e["caption"]
                    assert e["caption"].replace(f"{new} {shape}", f"{old} {shape}") == c["caption"]
                elif e["type"] == "background_colour":
                    new = e["edit"].split()[-1]
                    old = c["background"]["colour"]
                    assert e["caption"].replace(f"{new} background", f"{old} background") == c["caption"]
    assert {"colour", "shape", "size", "background_colour", "background_style"} <= set(types)


def test_captions_rarely_collide_among_1k():
    rng_cfg = dict(seed=7, size=64, fps=8, max_events=4, min_seconds=3.0, max_seconds=8.0)
    caps = [synth.describe(synth._clip_spec("test", i, rng_cfg)[0])["caption"] for i in range(1000)]
    assert len(caps) - len(set(caps)) <= 10  # ≤ 1 % exact duplicates


def _tokenizer_words() -> set[str]:
    # Read WORDS from the source instead of importing ville.tokenizer, which pulls in transformers (tens of
    # seconds on a busy 2-core machine) for one list of strings.
    tree = ast.parse((Path(__file__).parents[2] / "ville" / "tokenizer.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "WORDS" for t in node.targets):
            call = node.value
            assert isinstance(call, ast.Call) and isinstance(call.func.value, ast.Constant)
            return {w.lower() for w in call.func.value.value.split()}
    raise AssertionError("WORDS not found in ville/tokenizer.py")


def test_text_uses_tokenizer_words():
    cfg = dict(seed=3, size=64, fps=8, max_events=6, min_seconds=3.0, max_seconds=8.0)
    words = set()
    for split in ("train", "compositional"):
        for i in range(150):
            spec, _ = synth._clip_spec(split, i, cfg)
            clip = synth.clip_json(spec, "k", split)
            texts = [clip["caption"], clip["detailed_caption"]] + [e["text"] for e in clip["events"]]
            texts += [q["question"] + " " + q["answer"] for q in clip["qa"]]
            texts += [e[1] for e in synth._edit_candidates(spec)] if split == "train" else []
            for t in texts:
                words |= set(re.findall(r"[a-z]+", t.lower()))
    assert words - _tokenizer_words() == set()


def _spec(events, objects=None, num_frames=16, background=("plain", "black")):
    objects = objects or [{"shape": "square", "colour": "red", "size": "medium", "x": 0.5, "y": 0.5}]
    return {"size": 64, "fps": 8, "num_frames": num_frames, "text_seed": 0, "objects": objects,
            "background": {"style": background[0], "colour": background[1]}, "events": events}


def _mask(frame, colour, tol=60):
    return (np.abs(frame.astype(np.int16) - np.array(COLOURS[colour])).sum(-1) < tol)


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
def test_render_moves_the_object_the_named_way(direction):
    spec = _spec([{"object": 0, "type": "move", "value": direction, "amount": 0.25, "start": 2, "end": 12}])
    frames = render(spec)
    ys0, xs0 = np.nonzero(_mask(frames[0], "red"))
    ys1, xs1 = np.nonzero(_mask(frames[-1], "red"))
    dx, dy = DIRECTIONS[direction]
    moved = np.array([xs1.mean() - xs0.mean(), ys1.mean() - ys0.mean()])
    np.testing.assert_allclose(moved, np.array([dx, dy]) * 0.25 * 64, atol=1.0)


def test_render_appear_change_rotate_grow():
    appear = render(_spec([{"object": 0, "type": "appear", "value": "", "amount": 0.0, "start": 4, "end": 8}]))
    assert _mask(appear[0], "red").sum() == 0 and _mask(appear[-1], "red").sum() > 50
    change = render(_spec([{"object": 0, "type": "change", "value": "cyan", "amount": 0.0, "start": 0, "end": 8}]))
    assert _mask(change[0], "cyan").sum() == 0 and _mask(change[-1], "cyan").sum() > 50
    grow = render(_spec([{"object": 0, "type": "grow", "value": "", "amount": 1.5, "start": 0, "end": 8}]))
    area = (grow[..., 0].astype(float) - 18) / (230 - 18)  # red-channel coverage over the plain black background
    assert area[-1].sum() == pytest.approx(2.25 * area[0].sum(), rel=0.05)
    rot = render(_spec([{"object": 0, "type": "rotate", "value": "clockwise", "amount": 0.0, "start": 0,
                         "end": 16}]))
    mid = _mask(rot[7], "red")  # a square turned ~45°: a diamond, wider than the axis-aligned square
    assert np.ptp(np.nonzero(mid.any(0))[0]) > np.ptp(np.nonzero(_mask(rot[0], "red").any(0))[0]) + 3


def test_sampled_specs_are_valid_and_respect_pair_filter():
    rng = np.random.default_rng(0)
    for _ in range(200):
        spec = sample_spec(rng, max_events=6, pair_ok=synth.train_pair_ok)
        assert spec_valid(spec)
        assert 1 <= len(spec["events"]) <= 6
        clip = synth.clip_json(spec, "k", "train")
        assert not (_pairs(clip) & set(HELD_OUT_PAIRS))


def test_shard_writer_is_deterministic_and_webdataset_shaped(tmp_path):
    samples = [{"__key__": f"s{i}", "mp4": b"\x00" * i, "json": {"b": i, "a": [1, 2]}, "txt": "hé"}
               for i in range(5)]
    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, "shard", shard_size=2) as w:
            for s in samples:
                w.write(s)
        assert w.num_shards == 3 and w.pattern.endswith("shard-{000000..000002}.tar")
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["s0.json", "s0.mp4", "s0.txt", "s1.json", "s1.mp4", "s1.txt"]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(1_700_000_000, 0, 0, "",
                                                                                         "", 0o644)}
        assert json.loads(tar.extractfile("s1.json").read()) == {"a": [1, 2], "b": 1}
    got = [(k, m["txt"].decode()) for k, m in read_tar(tmp_path / "a" / "shard-000002.tar")]
    assert got == [("s4", "hé")]
    with pytest.raises(ValueError, match="not WebDataset-safe"):
        write_tar(tmp_path / "bad.tar", [{"__key__": "a.b", "txt": "x"}])


def test_encode_mp4_round_trip_and_checks():
    frames = np.zeros((5, 16, 24, 3), np.uint8)
    frames[:, 4:12, 6:18] = (200, 30, 30)
    data = encode_mp4(frames, fps=8)
    assert encode_mp4(frames, fps=8) == data
    back = decode_mp4(data)
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames).mean() < 4
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 15, 16, 3), np.uint8), fps=8)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 16, 16, 3), np.float32), fps=8)


def test_complexity_covers_one_to_k(dataset):
    hist = Counter(c["complexity"] for c in _clips(dataset, "train"))
    assert set(hist) == {1, 2, 3, 4}
