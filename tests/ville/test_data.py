"""The data pipeline on tiny real shards: shard lists, seeking decode, skipping bad input, splitting, resume, tasks."""
from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch

from ville import data as D
from ville import video as V

# Loaded by path under its own name: a bare `import fixtures` could pick up another test folder's fixtures.py.
_spec = importlib.util.spec_from_file_location("ville_data_fixtures", os.path.join(os.path.dirname(__file__),
                                                                                    "fixtures.py"))
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    pattern, keys = F.make_dataset(str(root), num_shards=3, per_shard=4)
    return pattern, keys


def cfg_for(pattern, **kw) -> D.DataCfg:
    base = dict(train_shards=pattern, num_frames=4, shuffle_buffer=4, seed=0, num_window_negatives=3)
    base.update(kw)
    return D.DataCfg(**base)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError(f"stream ended after {len(out)} batches")


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for name in x:
            if isinstance(x[name], torch.Tensor):
                assert torch.equal(x[name], y[name]), name
            else:
                assert x[name] == y[name], name


# ------------------------------------------------------------------------------------------------------- shard lists

def test_expand_braces():
    assert D.expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert D.expand_braces("a-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar"]
    assert D.expand_braces("{x,y}/s-{0..1}.tar") == ["x/s-0.tar", "x/s-1.tar", "y/s-0.tar", "y/s-1.tar"]
    assert D.expand_braces("a-{0..10}.tar")[:2] == ["a-0.tar", "a-1.tar"]
    assert D.expand_braces("{09..10}") == ["09", "10"]
    assert D.expand_braces("plain.tar") == ["plain.tar"] and D.expand_braces("{x}-{1..2}") == ["{x}-1", "{x}-2"]


def test_expand_shards_globs_and_no_match(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    assert D.expand_shards(str(tmp_path / "s-{000..001}.tar")) == [str(tmp_path / "s-000.tar"),
                                                                    str(tmp_path / "s-001.tar")]
    assert len(D.expand_shards([str(tmp_path / "s-*.tar"), str(tmp_path / "s-000.tar")])) == 4
    with pytest.raises(ValueError, match=r"nothing-\*\.tar.*val_shards"):
        D.expand_shards(str(tmp_path / "nothing-*.tar"), key="val_shards")
    with pytest.raises(ValueError, match=r"s-\{000\.\.003\}\.tar.*s-003\.tar"):
        D.expand_shards(str(tmp_path / "s-{000..003}.tar"))


def test_parse_sources_and_structured_config(tmp_path):
    from omegaconf import OmegaConf

    for name in ("a", "b"):
        (tmp_path / f"{name}-0.tar").write_bytes(b"")
    spec = [{"pattern": str(tmp_path / "a-*.tar"), "weight": 3}, str(tmp_path / "b-0.tar")]
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(D.DataCfg), {"train_shards": spec}))
    assert D.parse_sources(cfg.train_shards) == [([str(tmp_path / "a-0.tar")], 3.0), ([str(tmp_path / "b-0.tar")], 1.0)]
    with pytest.raises(ValueError, match="train_shards"):
        D.parse_sources(None)
    with pytest.raises(ValueError, match="weight"):
        D.parse_sources([{"pattern": str(tmp_path / "a-0.tar"), "weight": 0}])
    with pytest.raises(ValueError, match="pattern, weight"):
        D.parse_sources([{"patern": str(tmp_path / "a-0.tar")}])
    with pytest.raises(Exception, match="num_frames"):
        OmegaConf.merge(OmegaConf.structured(D.DataCfg), {"num_frames": "many"})


# -------------------------------------------------------------------------------------------------------- decoding

def test_sample_times():
    assert np.allclose(V.sample_times(2.0, 6.0, 4), [2.5, 3.5, 4.5, 5.5])
    rng = np.random.default_rng(0)
    t = V.sample_times(2.0, 6.0, 4, rng)
    assert np.all((t >= [2, 3, 4, 5]) & (t < [3, 4, 5, 6])) and not np.allclose(t, [2.5, 3.5, 4.5, 5.5])


@pytest.mark.parametrize("bframes,gop", [(False, 5), (True, 4), (False, 100)], ids=["gop5", "bframes-gop4", "gop100"])
def test_seek_matches_full_decode(tmp_path, bframes, gop):
    mp4 = F.encode_mp4(F.moving_square(60, size=32, seed=3), fps=10, gop=gop, bframes=bframes)
    path = tmp_path / "clip.mp4"
    path.write_bytes(mp4)
    all_frames, all_times = V.decode_all(mp4)
    assert all_frames.shape == (60, 32, 32, 3) and np.allclose(np.diff(all_times), 0.1)
    rng = np.random.default_rng(1)
    for trial in range(12):
        times = rng.uniform(-0.3, 6.3, size=rng.integers(1, 17))
        expect = np.clip(np.searchsorted(all_times, times, side="right") - 1, 0, len(all_times) - 1)
        for source in (mp4, str(path)):
            frames, got = V.decode_frames(source, times, seek=True)
            assert np.array_equal(got, all_times[expect])
            assert np.array_equal(frames, all_frames[expect])  # exact pixels
        frames, got = V.decode_frames(mp4, times, seek=False)
        assert np.array_equal(frames, all_frames[expect])
    small, _ = V.decode_all(mp4, size=16)
    frames, _ = V.decode_frames(mp4, [0.55, 3.0], size=16)
    assert np.array_equal(frames, small[[5, 30]])


def test_seek_landing_after_target_falls_back(monkeypatch):
    """A demuxer whose seek lands past the target (imprecise index) must still give the exact frames."""
    mp4 = F.encode_mp4(F.moving_square(60, size=32, seed=4), fps=10, gop=5)
    all_frames, all_times = V.decode_all(mp4)
    real = V._Video._run_from
    late = []

    def run_from_late(self, target):
        late.append(target)
        return real(self, None if target is None else target + self.ticks(0.6) - self.start)

    monkeypatch.setattr(V._Video, "_run_from", run_from_late)
    times = np.array([0.25, 2.05, 2.1, 4.77, 5.5])
    frames, got = V.decode_frames(mp4, times)
    expect = np.searchsorted(all_times, times, side="right") - 1
    assert any(t is not None for t in late) and None in late  # it seeked, landed late, restarted from the start
    assert np.array_equal(got, all_times[expect]) and np.array_equal(frames, all_frames[expect])


def test_decode_window_and_clip():
    mp4 = F.encode_mp4(F.moving_square(50, size=32), fps=10, gop=10)
    info = V.probe(mp4)
    assert (info.duration, info.fps, info.num_frames, info.width, info.height) == (5.0, 10.0, 50, 32, 32)
    frames, times = V.decode_window(mp4, 1.0, 3.0, 4)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert np.allclose(times, [1.2, 1.7, 2.2, 2.7])
    frames, times = V.decode_clip(mp4, 8, rng=np.random.default_rng(0), size=24)
    assert frames.shape == (8, 24, 24, 3) and np.all(np.diff(times) > 0) and times[-1] < 5.0


def test_bad_videos_raise(tmp_path):
    mp4 = F.encode_mp4(F.moving_square(20), gop=5)
    (tmp_path / "empty.mp4").write_bytes(b"")
    for bad in (b"", os.urandom(3000), mp4[: len(mp4) // 3], str(tmp_path / "empty.mp4"), str(tmp_path / "no.mp4")):
        with pytest.raises(V.VideoDecodeError):
            V.decode_frames(bad, [0.5, 1.5])


# -------------------------------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory):
    """One clean shard, one shard of bad members among good ones, one truncated shard."""
    root = tmp_path_factory.mktemp("corrupt")
    clean_pattern, clean_keys = F.make_dataset(str(root), num_shards=1, per_shard=4, prefix="clean")
    good = {key: F.make_clip(key, seed=50 + i) for i, key in enumerate(["ok0", "ok1", "ok2", "cut"])}
    nocap = F.make_clip("nocap", seed=60)
    nocap[1].pop("caption")
    bad_samples = [
        ("ok0", {"mp4": good["ok0"][0], "json": good["ok0"][1]}),
        ("garbage", {"mp4": os.urandom(4000), "json": F.clip_meta("garbage", 3.0, 1)}),
        ("zerolen", {"mp4": b"", "json": F.clip_meta("zerolen", 3.0, 2)}),
        ("badjson", {"mp4": good["ok1"][0], "json": '{"caption": "unterminated'}),
        ("nocap", {"mp4": nocap[0], "json": nocap[1]}),
        ("novideo", {"json": F.clip_meta("novideo", 3.0, 3)}),
        ("ok1", {"mp4": good["ok1"][0], "json": good["ok1"][1]}),
    ]
    bad_shard = F.write_shard(str(root / "bad-000000.tar"), bad_samples)
    trunc = F.write_shard(str(root / "trunc-000000.tar"),
                          [(k, {"mp4": good[k][0], "json": good[k][1]}) for k in ("ok2", "cut")])
    raw = open(trunc, "rb").read()
    cut = raw.index(b"cut.mp4")  # cut the last clip's video in half
    with open(trunc, "wb") as f:
        f.write(raw[: cut + 512 + 3000])
    patterns = [clean_pattern, bad_shard, trunc]
    return patterns, set(clean_keys) | {"ok0", "ok1", "ok2"}, bad_shard, trunc


def check_skips(skips: D.SkipCounter, bad_shard, trunc, eval_pass: bool):
    expected = {"undecodable video": "garbage", "empty video": "zerolen", "bad json": "badjson",
                "missing video": "novideo", "truncated tar": "cut"}
    if not eval_pass:
        expected["missing key"] = "nocap"
    for reason, key in expected.items():
        assert skips.counts[reason] >= 1, (reason, skips.summary())
        shard = trunc if key == "cut" else bad_shard
        assert any(s == shard and k == key for s, k, _ in skips.examples[reason]), (reason, skips.examples[reason])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_members_are_skipped_and_counted(corrupt_dataset, num_workers, caplog):
    patterns, good_keys, bad_shard, trunc = corrupt_dataset
    cfg = cfg_for(patterns, num_workers=num_workers, shuffle_buffer=2)
    loader = D.make_train_loader(cfg, "caption", 4)
    seen = set()
    for batch in take(loader, 16):
        assert len(batch["keys"]) == 4 and batch["frames"].shape == (4, 4, 32, 32, 3)
        assert batch["frames"].float().std() > 0  # real pixels, never zeros in place of a bad clip
        seen |= set(batch["keys"])
        for key, target in zip(batch["keys"], batch["target"]):
            assert f"({key})" in target or key.startswith("ok")
    assert seen <= good_keys and {"ok0", "ok1", "ok2"} & seen
    check_skips(loader.skips, bad_shard, trunc, eval_pass=False)
    if num_workers == 0:
        assert "garbage" in caplog.text and bad_shard in caplog.text  # the warning names key and shard

    evals = D.iter_eval_clips(patterns, 4, batch_size=3, num_workers=num_workers)
    keys = [k for batch in evals for k in batch["keys"]]
    assert sorted(keys) == sorted(good_keys | {"nocap"})  # eval keeps clips without a caption (no task)
    check_skips(evals.skips, bad_shard, trunc, eval_pass=True)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_nothing_valid_raises(tmp_path, num_workers):
    """One line naming the shard and the reason, raised in the main process (not a worker's traceback)."""
    shard = F.write_shard(str(tmp_path / "bad.tar"), [(f"g{i}", {"mp4": b"", "json": {"caption": "x"}})
                                                      for i in range(3)])
    with pytest.raises(D.NoUsableData, match="no usable caption sample") as e:
        take(D.make_train_loader(cfg_for(shard, num_workers=num_workers), "caption", 2), 1)
    assert str(e.value).count("\n") == 0 and f"empty video: 3 distinct (3 encounters) in {shard}" in str(e.value)
    garbage = F.write_shard(str(tmp_path / "garbage.tar"),
                            [(f"g{i}", {"mp4": os.urandom(2000), "json": {"caption": "x"}}) for i in range(3)])
    with pytest.raises(D.NoUsableData, match="in a row failed to decode") as e:
        take(D.make_train_loader(cfg_for(garbage, max_consecutive_failures=20, num_workers=num_workers), "caption",
                                 2), 1)
    assert "Traceback" not in str(e.value) and f"undecodable video: 3 distinct (20 encounters) in {garbage}" in str(
        e.value)
    with pytest.raises(ValueError, match="matches no file"):
        D.make_train_loader(cfg_for(str(tmp_path / "missing-{0..3}.tar")), "caption", 2)


def test_skips_count_distinct_samples_and_warn_rate_limited(caplog):
    skips = D.SkipCounter()
    with caplog.at_level("WARNING"):
        for _ in range(50):  # a resampled stream meets the same bad sample again and again
            skips.skip("bad json", "s.tar", "k0", "oops")
        for i in range(1, 30):
            skips.skip("bad json", "s.tar", f"k{i}", "oops")
    assert skips.total == 79 and skips.distinct == 30 and skips.counts["bad json"] == 79
    counts = [int(m.group(1)) for m in map(re.compile(r"\((\d+) distinct so far\)").search, caplog.messages) if m]
    assert counts == [1, 2, 3, 4, 5, 10]  # the first five, then powers of ten, with the running count
    assert skips.report() == "bad json: 30 distinct (79 encounters) in s.tar (e.g. key 'k0': oops)"


def test_empty_shard_reported_once(tmp_path, dataset, caplog):
    pattern, _ = dataset
    empty = F.write_shard(str(tmp_path / "empty.tar"), [])
    loader = D.make_train_loader(cfg_for([pattern, empty], shuffle_buffer=2), "caption", 2)
    with caplog.at_level("WARNING"):
        take(loader, 30)
    assert loader.skips.counts["empty shard"] >= 2 and loader.skips.distinct == 1  # drawn often, counted once
    assert sum("empty shard" in m for m in caplog.messages) == 1 and empty in caplog.text


def test_undecodable_clip_replaced_by_batch_duplicate(tmp_path):
    mp4, meta = F.make_clip("good", seed=1)
    broken = {"mp4": os.urandom(3000), "json": F.clip_meta("broken", 3, 2)}
    shard = F.write_shard(str(tmp_path / "s.tar"), [("good", {"mp4": mp4, "json": meta}), ("broken", broken)])
    loader = D.make_train_loader(cfg_for(shard, shuffle_buffer=0), "retrieval", 2)
    for batch in take(loader, 4):
        assert batch["keys"] == ["good", "good"] and batch["group"][0] == batch["group"][1]
    assert loader.skips.counts["undecodable video"] >= 4
    for rank in range(2):  # one row per rank: the rank whose row fails borrows the other rank's clip
        loader = D.make_train_loader(cfg_for(shard, shuffle_buffer=0), "retrieval", 2, rank=rank, world_size=2)
        assert all(b["keys"] == ["good"] for b in take(loader, 4))


# ------------------------------------------------------------------------------------------ splitting and resume

@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (2, 2), (3, 2)])
def test_eval_split_reads_every_sample_once(dataset, world_size, num_workers):
    pattern, keys = dataset
    per_rank = []
    for rank in range(world_size):
        loader = D.iter_eval_clips(pattern, 3, rank=rank, world_size=world_size, batch_size=2,
                                   num_workers=num_workers)
        got = [k for batch in loader for k in batch["keys"]]
        assert got == sorted(got, key=keys.index)  # each rank in order
        per_rank.append(got)
    everything = [k for got in per_rank for k in got]
    assert sorted(everything) == sorted(keys)  # every sample exactly once
    if world_size == 1:
        assert everything == keys
        batch = next(iter(D.iter_eval_clips(pattern, 3, batch_size=2)))
        assert batch["frames"].shape == (2, 3, 32, 32, 3) and batch["meta"][0]["key"] == keys[0]
        assert torch.allclose(batch["times"][0], torch.tensor([0.5, 1.5, 2.5]))


def test_train_stream_deterministic_per_seed(dataset):
    pattern, _ = dataset
    run = lambda **kw: take(D.make_train_loader(cfg_for(pattern), "caption", 3, **kw), 5)  # noqa: E731
    a, b = run(seed=7), run(seed=7)
    same_batches(a, b)
    keys = lambda bs: [k for x in bs for k in x["keys"]]  # noqa: E731
    assert keys(a) != keys(run(seed=8))
    assert keys(a) != keys(take(D.make_train_loader(cfg_for(pattern), "qa", 3, seed=7), 5))  # tasks decorrelated
    frames = [x["times"] for x in a]
    assert not all(torch.equal(f, frames[0]) for f in frames[1:])  # random offsets in training


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("task", ["caption", "localisation"])
def test_resume_equals_uninterrupted(dataset, num_workers, task):
    pattern, _ = dataset
    cfg = cfg_for(pattern, num_workers=num_workers)
    full = take(D.make_train_loader(cfg, task, 2), 7)
    for start in (3, 4):
        resumed = take(D.make_train_loader(cfg, task, 2, start_step=start), 7 - start)
        same_batches(full[start:], resumed)


def test_hard_negative_order_groups_by_shared_words():
    texts = ["red circle on blue", "green square on gray", "red circle on blue", "red square on blue",
             "green square on black", "yellow star", "red circle on gray", "green star on gray"]
    stream = iter([D.Plan(f"k{i}", "s", (0, 0), {"text": t}, i) for i, t in enumerate(texts)] * 3)
    order = D._hard_negative_order(stream, 4, 2, 3, "text")
    got = [next(order).key for _ in range(8)]
    # k0 ("red circle on blue"): among k1..k3, k2 is the identical text (never chosen) and k3 shares {red, blue}.
    # k1 ("green square on gray"): among k2, k4, k5, k4 shares {green, square}.
    # batch 2: k2 with k6 (shares {red, circle}; k5 and k7 share none), then k5 with k7 ({star}).
    assert got == ["k0", "k3", "k1", "k4", "k2", "k6", "k5", "k7"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_hard_negative_batches_resume_exactly(dataset, num_workers):
    pattern, _ = dataset
    cfg = cfg_for(pattern, num_workers=num_workers, hard_negative_group=2, hard_negative_pool=5)
    full = take(D.make_train_loader(cfg, "caption", 4), 6)
    assert [k for b in full for k in b["keys"]] != [k for b in take(D.make_train_loader(cfg_for(
        pattern, num_workers=num_workers), "caption", 4), 6) for k in b["keys"]]  # the option changes the batches
    same_batches(full[3:], take(D.make_train_loader(cfg, "caption", 4, start_step=3), 3))
    with pytest.raises(ValueError, match="hard_negative_group=0"):
        D.make_train_loader(cfg_for(pattern, hard_negative_group=0), "caption", 4)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_get_slices_of_the_same_global_batches(dataset, num_workers):
    pattern, _ = dataset
    cfg = cfg_for(pattern, num_workers=num_workers)
    full = take(D.make_train_loader(cfg, "retrieval", 4), 4)
    parts = [take(D.make_train_loader(cfg, "retrieval", 4, rank=r, world_size=2), 4) for r in range(2)]
    for k, batch in enumerate(full):
        assert parts[0][k]["keys"] + parts[1][k]["keys"] == batch["keys"]
        assert torch.equal(torch.cat([parts[0][k]["frames"], parts[1][k]["frames"]]), batch["frames"])
        assert torch.equal(torch.cat([parts[0][k]["group"], parts[1][k]["group"]]), batch["group"])
    same_batches(parts[1][1:], take(D.make_train_loader(cfg, "retrieval", 4, rank=1, world_size=2, start_step=1), 3))
    with pytest.raises(ValueError, match="divisible by world_size"):
        D.make_train_loader(cfg, "retrieval", 3, rank=0, world_size=2)


def test_resume_skips_without_reading_video(dataset, monkeypatch):
    pattern, _ = dataset
    calls = []
    real = D._realise
    monkeypatch.setattr(D, "_realise", lambda plan, data, cfg: calls.append(plan.key) or real(plan, data, cfg))
    batch = take(D.make_train_loader(cfg_for(pattern), "caption", 3, start_step=20), 1)[0]
    assert calls == batch["keys"]  # only the returned batch was decoded
    calls.clear()
    batch = take(D.make_train_loader(cfg_for(pattern), "caption", 4, rank=1, world_size=2, start_step=5), 1)[0]
    assert calls == batch["keys"] and len(calls) == 2  # ... and only this rank's rows of it


# ---------------------------------------------------------------------------------------------------------- tasks

def plans(pattern, task, n, **kw):
    cfg = cfg_for(pattern, **kw)
    stream = D.TrainBatches(cfg, task, 1)
    rng = np.random.default_rng(0)
    it = stream._plans(rng, D.SkipCounter())
    return [next(it) for _ in range(n)]


def test_caption_detailed_qa_builders(dataset):
    pattern, _ = dataset
    caps = plans(pattern, "caption", 40)
    assert all(p.fields["prompt"] == D.CAPTION_PROMPT for p in caps)
    multi = [p for p in caps if p.fields["target"].startswith("a ")]  # the second of `captions`
    assert multi and len(multi) < len(caps)
    assert all(p.fields["prompt"] == D.DETAILED_CAPTION_PROMPT and p.fields["target"].startswith("First, ")
               for p in plans(pattern, "detailed_caption", 10))
    qa = plans(pattern, "qa", 40)
    assert all(p.fields["prompt"].startswith("Question: ") and p.fields["prompt"].endswith(" Answer:") for p in qa)
    assert {p.fields["target"] for p in qa} & set(F.COLOURS) and {p.fields["target"] for p in qa} & {"1", "2", "3"}


def test_retrieval_and_matching_builders(dataset):
    pattern, _ = dataset
    loader = D.make_train_loader(cfg_for(pattern), "retrieval", 6)
    for batch in take(loader, 3):
        for i, key in enumerate(batch["keys"]):
            same = [j for j, k in enumerate(batch["keys"]) if k == key]
            assert all(batch["group"][j] == batch["group"][i] for j in same)
            assert sum(batch["group"] == batch["group"][i]) == len(same)
    matching = plans(pattern, "matching", 400)
    labels = np.array([p.fields["label"] for p in matching])
    assert 0.4 < labels.mean() < 0.6
    for p in matching:
        own = f"({p.key})" in p.fields["text"]
        assert own == (p.fields["label"] == 1.0)
    hard = [p for p in matching if p.fields["label"] == 0.0
            and D._content_words(p.fields["text"]) & {"red", "green", "blue", "yellow", "purple", "circle",
                                                      "square", "triangle", "star", "grows", "shrinks", "rotates"}]
    assert len(hard) > 0.8 * (labels == 0).sum()


def test_localisation_builder(dataset):
    pattern, _ = dataset
    for p in plans(pattern, "localisation", 30, num_window_negatives=5):
        f = p.fields
        assert f["windows"].shape == (6, 2) and f["ious"].shape == (6,) and f["window_mask"].shape == (6,)
        assert f["ious"][0] == 1.0 and f["window_mask"][0]
        assert np.all(f["ious"][1:] < 0.2)
        assert np.allclose(V.window_iou(f["windows"][1:], f["windows"][0]), f["ious"][1:], atol=1e-5)
        real = f["windows"][f["window_mask"]]
        assert len(np.unique(real, axis=0)) == len(real)  # distinct negatives; repeats are masked
        assert np.all(f["windows"][:, 0] >= 0) and np.all(f["windows"][:, 1] <= 3.0 + 1e-6)
    batch = take(D.make_train_loader(cfg_for(pattern, num_window_negatives=3), "localisation", 2), 1)[0]
    assert batch["frames"].shape == (2, 4, 4, 32, 32, 3) and batch["times"].shape == (2, 4, 4)
    assert batch["windows"].dtype == torch.float32 and batch["window_mask"].dtype == torch.bool
    inside = (batch["times"] >= batch["windows"][..., :1] - 0.1) & (batch["times"] <= batch["windows"][..., 1:])
    assert inside.all()  # each window's frames come from that window (up to one frame period)


def test_composed_builder_and_batches(dataset):
    """An edit of the clip's `edits` and its edited caption; hard-negative groups work on the edited captions."""
    pattern, _ = dataset
    seen = set()
    for p in plans(pattern, "composed", 40):
        assert p.fields["edit"].startswith("make the ") and f"({p.key})" in p.fields["text"]
        seen.add(p.fields["edit"].split()[-1] == "large")
    assert seen == {True, False}  # both edits of a clip get drawn
    for batch in take(D.make_train_loader(cfg_for(pattern, hard_negative_group=2), "composed", 4), 2):
        assert batch["frames"].shape[:2] == (4, 4) and len(batch["edit"]) == len(batch["text"]) == 4
        for e, t, k in zip(batch["edit"], batch["text"], batch["keys"]):
            assert f"({k})" in t and (("large" in t) == (e.split()[-1] == "large"))


def test_sliding_windows():
    w = V.sliding_windows(10.0, [0.2, 0.5], 0.5)
    assert {tuple(r) for r in w} >= {(0.0, 2.0), (1.0, 3.0), (8.0, 10.0), (0.0, 5.0), (5.0, 10.0)}
    assert np.allclose(V.window_iou(np.array([[0, 2], [1, 3], [4, 6]]), (0, 2)), [1.0, 1 / 3, 0.0])


def test_tasks_skip_clips_missing_keys(tmp_path):
    mp4, meta = F.make_clip("full", seed=2)
    bare = {"key": "bare", "caption": "just a caption"}
    shard = F.write_shard(str(tmp_path / "s.tar"), [("full", {"mp4": mp4, "json": meta}),
                                                    ("bare", {"mp4": mp4, "json": bare})])
    for task in ("detailed_caption", "qa", "localisation", "composed"):
        loader = D.make_train_loader(cfg_for(shard, shuffle_buffer=0), task, 2)
        assert all(b["keys"] == ["full", "full"] for b in take(loader, 2))
        assert loader.skips.counts["missing key"] >= 1
        assert loader.skips.examples["missing key"][0][:2] == (shard, "bare")


# -------------------------------------------------------------------------------------------------------- collate

def test_collate_shapes_dtypes_and_tokens(dataset):
    from ville.tokenizer import build_builtin_tokenizer

    pattern, _ = dataset
    tok = build_builtin_tokenizer()
    expected = {"caption": ["prompt", "target"], "qa": ["prompt", "target"], "retrieval": ["text"],
                "matching": ["text"], "localisation": ["text"]}
    for task, fields in expected.items():
        batch = take(D.make_train_loader(cfg_for(pattern, frame_size=16), task, 3, tokenizer=tok), 1)[0]
        assert batch["task"] == task and len(batch["keys"]) == 3
        assert batch["frames"].dtype == torch.uint8 and batch["frames"].shape[-3:] == (16, 16, 3)
        assert batch["frames"].shape[:-3] == ((3, 4, 4) if task == "localisation" else (3, 4))  # W = 1 + 3
        assert batch["complexity"].dtype == torch.int64 and (batch["complexity"] >= 1).all()
        for name in fields:
            assert all(isinstance(t, str) for t in batch[name])
            ids = batch[name + "_ids"]
            assert ids == [tok.encode(t, add_special_tokens=False) for t in batch[name]]
            assert tok.bos_token_id not in ids[0] and tok.eos_token_id not in ids[0]
        if task == "retrieval":
            assert batch["group"].dtype == torch.int64
        if task == "matching":
            assert batch["label"].dtype == torch.float32


def test_collate_rejects_mixed_sizes_and_frame_size_fixes_it(tmp_path):
    small, meta_s = F.make_clip("small", size=32, seed=1)
    big, meta_b = F.make_clip("big", size=48, seed=2)
    ex = [{"key": "small", "frames": np.zeros((2, 32, 32, 3), np.uint8), "times": np.zeros(2), "text": "a",
           "group": 1},
          {"key": "big", "frames": np.zeros((2, 48, 48, 3), np.uint8), "times": np.zeros(2), "text": "b", "group": 2}]
    with pytest.raises(ValueError, match="small: 32x32, big: 48x48"):
        D.collate(ex, "retrieval")
    shard = F.write_shard(str(tmp_path / "mixed.tar"), [("small", {"mp4": small, "json": meta_s}),
                                                        ("big", {"mp4": big, "json": meta_b})])
    with pytest.raises(ValueError, match="frame_size"):
        list(D.iter_eval_clips(shard, 2, batch_size=2))
    batch = next(iter(D.iter_eval_clips(shard, 2, batch_size=2, frame_size=24)))
    assert batch["frames"].shape == (2, 2, 24, 24, 3)


# ---------------------------------------------------------------------------------------- other layouts, by key

def test_iter_samples_any_extension_and_clip_store(tmp_path):
    src, _ = F.make_clip("src", seed=1)
    tgt, _ = F.make_clip("tgt", seed=2)
    shard = F.write_shard(str(tmp_path / "triplets.tar"),
                          [(f"t{i}", {"src.mp4": src, "tgt.mp4": tgt, "json": {"edit": f"edit {i}"}})
                           for i in range(4)])
    samples = list(D.iter_samples(shard))
    assert [s["__key__"] for s in samples] == ["t0", "t1", "t2", "t3"]
    assert samples[2]["json"]["edit"] == "edit 2" and samples[2]["src.mp4"] == src and samples[2]["tgt.mp4"] == tgt
    assert [s["__key__"] for s in D.iter_samples(shard, rank=1, world_size=2)] == ["t1", "t3"]
    store = D.ClipStore(shard)
    assert len(store) == 4 and "t3" in store and store.meta("t3")["edit"] == "edit 3"
    frames, times = V.decode_window(store.read("t1", "tgt.mp4"), 1.0, 2.0, 2)
    assert frames.shape == (2, 32, 32, 3) and np.allclose(times, [1.2, 1.7])
    with pytest.raises(KeyError, match="no .mp4 member"):
        store.read("t1")


def test_our_reader_and_webdataset_read_the_same_samples(dataset):
    """ville reads its shards itself (exact resume by position, per-sample skip counting: docs/design.md); webdataset,
    an independent reader of the same format, must see the same samples, members and bytes."""
    import webdataset as wds

    pattern, keys = dataset
    ours = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in D.iter_samples(pattern)]
    theirs = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
              for s in wds.WebDataset(pattern, shardshuffle=False)]
    assert [k for k, _ in ours] == [k for k, _ in theirs] == list(keys)
    for (_, a), (_, b) in zip(ours, theirs):
        assert set(a) == set(b)
        for ext in a:
            assert (json.loads(b[ext]) if ext == "json" else b[ext]) == a[ext], ext
