"""The attribute-binding task: the trial rule on hand-built scores and embeddings (ties wrong, chance from every
ordering), and an end-to-end run of a tiny model on generated pairs, recomputed from independently embedded clips."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_cfg

from ville import ViLLE
from ville import demo as D
from ville import eval as E
from ville.data import ClipStore, read_shard_index
from ville.eval.binding import CHANCE, binding_pairs, binding_scores, trial_accuracy
from ville.video import decode_clip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FRAMES = 4
OPTS = dict(batch_size=4, progress=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_ordering_of_four_scores_gives_chance():
    # 24 pairs whose scores (aa, ab, ba, bb) take every ordering of 1 < 2 < 3 < 4: each trial holds in half of them,
    # all four only where aa and bb are the two largest (4 of 24).
    scores = torch.tensor(list(itertools.permutations([1.0, 2.0, 3.0, 4.0])), dtype=torch.float64)
    got = trial_accuracy(*scores.T)
    assert got == {"t2v": 50.0, "v2t": 50.0, "pair_both": round(100 * 4 / 24, 2)} == CHANCE


def test_hand_built_embeddings():
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    pairs = [  # (caption a, caption b, clip a, clip b), and the trials right: t2v, v2t
        (e1, e2, 3 * e1, e2),  # bound: all 4 right (the scale of an embedding does not matter)
        (e1, e2, e2, e1),  # bound the wrong way round: all 4 wrong
        (e1, e2, e1 + e2, e1 + e2),  # the clips embed alike: every score ties, all 4 wrong
        # aa = .894 > ab = .447 and bb = 1/3 > ba = -2/3 (t2v 2/2); clip b prefers caption a (.447 > 1/3): v2t 1/2
        (2 * e1 + e2, -2 * e1 + e2 + 2 * e3, e1, e2),
        # caption a prefers clip b (.8 > .6); bb = .96 beats ab = .8 and aa = .6 beats ba = 0: t2v 1/2, v2t 2/2
        (0.6 * e1 + 0.8 * e2, 0.96 * e2 + 0.28 * e3, e1, e2),
    ]
    ta, tb, va, vb = (torch.stack(x) for x in zip(*pairs))
    got = binding_scores(ta, tb, va, vb)
    assert got["t2v"] == pytest.approx(100 * (2 + 0 + 0 + 2 + 1) / 10)
    assert got["v2t"] == pytest.approx(100 * (2 + 0 + 0 + 1 + 2) / 10)
    assert got["pair_both"] == pytest.approx(100 * 1 / 5)
    assert got["video_pair_cosine"] == pytest.approx((0 + 0 + 1 + 0 + 0) / 5, abs=1e-4)
    assert got["caption_pair_cosine"] == pytest.approx((0 + 0 + 0 - 3 / (5 ** 0.5 * 3) + 0.8 * 0.96) / 5, abs=1e-4)
    matched = [1, 1, 0, 0, 2 ** -0.5, 2 ** -0.5, 2 / 5 ** 0.5, 1 / 3, 0.6, 0.96]
    swapped = [0, 0, 1, 1, 2 ** -0.5, 2 ** -0.5, 1 / 5 ** 0.5, -2 / 3, 0.8, 0.0]
    assert got["matched_cosine"] == pytest.approx(sum(matched) / 10, abs=1e-4)
    assert got["swapped_cosine"] == pytest.approx(sum(swapped) / 10, abs=1e-4)


def test_broken_pairs_fail_naming_the_pair():
    a = ("binding-0-a", {"binding_pair": 0, "binding_side": "a", "caption": "A red circle."})
    b = ("binding-0-b", {"binding_pair": 0, "binding_side": "b", "caption": "A blue circle."})
    assert binding_pairs([b, a]) == [(("binding-0-a", "A red circle."), ("binding-0-b", "A blue circle."))]
    with pytest.raises(ValueError, match="binding pair 0: only side"):
        binding_pairs([a])
    with pytest.raises(ValueError, match="binding pair 0: the two sides need two different captions"):
        binding_pairs([a, (b[0], {**b[1], "caption": "A red circle."})])
    with pytest.raises(ValueError, match="binding clip 'x'"):
        binding_pairs([("x", {"caption": "A red circle."})])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("binding_eval") / "data"
    subprocess.run([sys.executable, "-m", "data_tools.binding", "--out", str(root / "binding"), "--seed", "2",
                    "--num-pairs", "3"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    # The runner lists the evaluated split even for split-independent tasks; any clip shard serves.
    (root / "test").mkdir()
    shutil.copy(root / "binding" / "shard-000000.tar", root / "test" / "shard-000000.tar")
    return root


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ViLLE(tiny_cfg("llama", max_frames=FRAMES)).eval()


def test_end_to_end_matches_independent_embeddings(data, model, tmp_path):
    out = tmp_path / "res.json"
    res = E.evaluate(model, str(data), tasks=["binding"], out=str(out), **OPTS)
    r = res["binding"]
    assert json.loads(out.read_text())["binding"] == r
    assert r["num_pairs"] == 3 and r["chance"] == CHANCE and r["protocol"].startswith("zero-shot")
    for key in ("t2v", "v2t", "pair_both"):
        assert 0 <= r[key] <= 100
    for key in ("video_pair_cosine", "caption_pair_cosine", "matched_cosine", "swapped_cosine"):
        assert -1 <= r[key] <= 1
    assert "binding" in E.format_table(res) and "T2V acc" in E.format_table(res)

    # By hand: decode and embed every clip, embed both captions, count the trials.
    shard = str(data / "binding" / "shard-000000.tar")
    clips = [(s.key, s.meta) for s in read_shard_index(shard)]
    store = ClipStore(shard)
    frames = torch.stack([torch.from_numpy(decode_clip(store.read(k), FRAMES, size=32)[0]) for k, _ in clips])
    with torch.no_grad():
        v = torch.nn.functional.normalize(model.embed_video(frames).embeddings.double(), dim=-1)
        t = torch.nn.functional.normalize(model.embed_text([m["caption"] for _, m in clips]).double(), dim=-1)
    t2v = v2t = both = 0
    for p in range(3):
        a, b = 2 * p, 2 * p + 1  # clips are stored a, b, a, b, ...
        assert (clips[a][1]["binding_side"], clips[b][1]["binding_side"]) == ("a", "b")
        s = {(i, j): float(t[i] @ v[j]) for i in (a, b) for j in (a, b)}  # (caption, clip)
        right = [s[a, a] > s[a, b], s[b, b] > s[b, a], s[a, a] > s[b, a], s[b, b] > s[a, b]]
        t2v, v2t, both = t2v + sum(right[:2]), v2t + sum(right[2:]), both + all(right)
    assert r["t2v"] == pytest.approx(100 * t2v / 6, abs=0.01)
    assert r["v2t"] == pytest.approx(100 * v2t / 6, abs=0.01)
    assert r["pair_both"] == pytest.approx(100 * both / 3, abs=0.01)
    cos_v = sum(float(v[2 * p] @ v[2 * p + 1]) for p in range(3)) / 3
    assert r["video_pair_cosine"] == pytest.approx(cos_v, abs=2e-4)

    # max_clips keeps the first pairs; a folder without binding/ is reported, not an error.
    assert E.evaluate(model, str(data), tasks=["binding"], max_clips=1, cache_dir="", **OPTS)["binding"][
        "num_pairs"] == 1
    shutil.move(str(data / "binding"), str(data / "elsewhere"))
    try:
        r = E.evaluate(model, str(data), tasks=["binding"], cache_dir="", **OPTS)["binding"]
    finally:
        shutil.move(str(data / "elsewhere"), str(data / "binding"))
    assert r["num_pairs"] == 0 and r["protocol"].startswith("not available")


def test_demo_generates_pairs_and_reports_them(tmp_path, monkeypatch):
    assert all("binding" in tasks for tasks in D.STAGE_TASKS.values())
    calls = []
    monkeypatch.setattr(D.subprocess, "run", lambda cmd, check: calls.append(cmd))
    D.generate_binding(str(tmp_path))
    assert calls[0][1:] == ["-m", "data_tools.binding", "--out", str(tmp_path / "binding"), "--seed", "0",
                            "--num-pairs", "100"]
    (tmp_path / "binding").mkdir()
    (tmp_path / "binding" / "meta.json").write_text("{}")
    D.generate_binding(str(tmp_path))  # there already: not regenerated
    assert len(calls) == 1
    picked = D._pick({"binding": {"num_pairs": 100, "t2v": 61.5, "v2t": 55.0, "chance": CHANCE}})
    assert picked == {"binding T2V acc": (61.5, 50.0), "binding V2T acc": (55.0, 50.0)}
