"""Attribute-binding pairs: same seed -> same bytes, the two clips of a pair differ only by two swapped colours (in
the spec, the captions and the pixels), and no pair holds a held-out shape x colour pair or a colour change."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from data_tools import binding
from data_tools.render import HELD_OUT_PAIRS, render, simulate
from data_tools.shards import decode_mp4, read_tar

NUM_PAIRS = 5


def _read(root: Path) -> list[tuple[str, dict, bytes]]:
    return [(key, json.loads(g["json"]), g["mp4"]) for shard in sorted(root.glob("shard-*.tar"))
            for key, g in read_tar(shard)]


def _pairs(root: Path) -> list[tuple[dict, dict]]:
    clips = _read(root)
    return [(clips[i][1], clips[i + 1][1]) for i in range(0, len(clips), 2)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("binding") / "binding"
    binding.main(["--out", str(out), "--seed", "0", "--num-pairs", str(NUM_PAIRS), "--pairs-per-shard", "2"])
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_same_seed_same_bytes(dataset, tmp_path):
    again = binding.generate(tmp_path / "again", seed=0, num_pairs=NUM_PAIRS, pairs_per_shard=2)
    assert again["shards"] == "shard-{000000..000002}.tar"
    assert _hashes(tmp_path / "again") == _hashes(dataset)
    assert set(_hashes(dataset)) == {"meta.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"}
    # A pair is drawn from its own generator: the shard size moves no byte of any sample; another seed moves all.
    binding.generate(tmp_path / "one_shard", seed=0, num_pairs=NUM_PAIRS, pairs_per_shard=10)
    assert _read(tmp_path / "one_shard") == _read(dataset)
    binding.generate(tmp_path / "seed1", seed=1, num_pairs=NUM_PAIRS, pairs_per_shard=10)
    assert not {mp4 for _, _, mp4 in _read(tmp_path / "seed1")} & {mp4 for _, _, mp4 in _read(dataset)}


def test_pair_layout_and_only_two_colours_swapped(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["num_pairs"] == NUM_PAIRS and sum(meta["swapped_colour_pairs"].values()) == NUM_PAIRS
    pairs = _pairs(dataset)
    assert len(pairs) == NUM_PAIRS
    for p, (a, b) in enumerate(pairs):
        assert (a["key"], b["key"]) == (f"binding-{p:07d}-a", f"binding-{p:07d}-b")
        assert (a["binding_pair"], a["binding_side"], b["binding_pair"], b["binding_side"]) == (p, "a", p, "b")
        assert a["split"] == b["split"] == "binding"
        sa, sb = a["spec"], b["spec"]
        assert {k: v for k, v in sa.items() if k != "objects"} == {k: v for k, v in sb.items() if k != "objects"}
        (oa1, oa2), (ob1, ob2) = sa["objects"], sb["objects"]
        assert oa1["colour"] != oa2["colour"]
        assert (ob1["colour"], ob2["colour"]) == (oa2["colour"], oa1["colour"])
        for x, y in ((oa1, ob1), (oa2, ob2)):
            assert {k: v for k, v in x.items() if k != "colour"} == {k: v for k, v in y.items() if k != "colour"}


def test_no_held_out_pair_and_no_colour_change(dataset):
    held_out = set(HELD_OUT_PAIRS)
    for pair in _pairs(dataset):
        for clip in pair:
            assert len(clip["objects"]) == 2
            assert not {(o["shape"], o["colour"]) for o in clip["objects"]} & held_out
            assert all(ev["type"] != "change" for ev in clip["spec"]["events"])


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_captions_differ_exactly_in_the_swapped_colour_words(dataset):
    for a, b in _pairs(dataset):
        c1, c2 = (o["colour"] for o in a["objects"])
        wa, wb = _words(a["caption"]), _words(b["caption"])
        assert len(wa) == len(wb)
        diff = [(x, y) for x, y in zip(wa, wb) if x != y]
        assert sorted(diff) == sorted([(c1, c2), (c2, c1)]), (a["caption"], b["caption"])
        # The long caption and the event texts name each object by its colour wherever they name it.
        for ta, tb in [(a["detailed_caption"], b["detailed_caption"])] + [
                (x["text"], y["text"]) for x, y in zip(a["events"], b["events"])]:
            wa, wb = _words(ta), _words(tb)
            assert len(wa) == len(wb)
            assert {(x, y) for x, y in zip(wa, wb) if x != y} <= {(c1, c2), (c2, c1)}


def test_pixels_differ_only_where_the_objects_are(dataset):
    clips = _read(dataset)
    for i in range(0, len(clips), 2):
        (_, a, mp4_a), (_, b, mp4_b) = clips[i], clips[i + 1]
        fa, fb = render(a["spec"]), render(b["spec"])
        size = a["spec"]["size"]
        centre = np.arange(size) + 0.5
        near = np.zeros(fa.shape[:3], dtype=bool)
        for tr in simulate(a["spec"]):
            # Every shape lies within 1.2 radii of its centre (the triangle's base corners reach ~1.08); +1.5 px for
            # the anti-aliased edge.
            reach = 1.2 * tr["radius"][:, None, None] * size + 1.5
            dy = centre[None, :, None] - tr["y"][:, None, None] * size
            dx = centre[None, None, :] - tr["x"][:, None, None] * size
            near |= np.hypot(dx, dy) <= reach
        differ = (fa != fb).any(-1)
        assert differ.any()
        assert not (differ & ~near).any()
        # The encoded clips differ too, and by much more where the objects are than elsewhere.
        va, vb = decode_mp4(mp4_a).astype(int), decode_mp4(mp4_b).astype(int)
        assert va.shape == fa.shape
        gap = np.abs(va - vb).max(-1)
        assert gap[near].mean() > 4 * gap[~near].mean()
