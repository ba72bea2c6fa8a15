"""What ville opens never runs code: a crafted pickle in each of the three places ville reads from disk (search index,
evaluation cache, training checkpoint) is refused with one line naming the file, and its payload -- which would
create a file -- never runs. Plus the formats that replace pickle: round trips, checksums, the torch-free index."""
from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from ville import checkpoint as C
from ville import index as I
from ville import search as S
from ville.eval.common import Cache
from ville.trainer import _finite_state


class Payload:
    """Unpickling this calls open(marker, "w"): the file's existence proves the pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted(kind: str, path, marker) -> None:
    """`zip`: a torch.save file (the old formats of all three); `raw`: a bare pickle."""
    if kind == "zip":
        torch.save({"format": I.FORMAT, "embeddings": Payload(marker)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"payload": Payload(marker)}, f)


def one_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


def tiny_index() -> dict:
    emb = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    return {"format": I.FORMAT, "model_identity": "abcd", "model_dir": "/m", "embeddings": emb,
            "num_tokens": np.array([1, 2, 3]), "ids": ["a", "b", "c"], "num_frames": 2, "frame_size": 32,
            "sources": [{"path": f"/v/{x}.mp4", "size": 10, "mtime_ns": 5} for x in "abc"], "skipped": [],
            "stats": {"embedded": 3, "kept": 0, "dropped": 0}, "created": "2026-12-05T00:00:00+00:00"}


# ---------------------------------------------------------------------------------------------------- search index
@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_crafted_index_is_refused(tmp_path, kind, capsys):
    evil, marker = tmp_path / "evil.idx", tmp_path / "pwned"
    crafted(kind, evil, marker)
    with pytest.raises(ValueError, match="refused") as e:
        I.load_index(str(evil))
    assert str(evil) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as exit_:  # the CLI the issue probed: error before any model is loaded
        S.main([str(evil), "a red circle"])
    assert exit_.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and str(evil) in line and "re-create" in line.lower()
    assert not marker.exists()


def test_index_round_trip_and_readable_without_torch(tmp_path):
    index = tiny_index()
    path = tmp_path / "x.idx"
    I.save_index(index, str(path))
    back = I.load_index(str(path))
    assert np.array_equal(back["embeddings"], index["embeddings"]) and back["ids"] == index["ids"]
    assert back["sources"] == index["sources"] and back["model_identity"] == "abcd"
    # The documented format, read by a process where importing torch fails.
    code = ("import sys, json; sys.modules['torch'] = None\n"
            "from safetensors import safe_open\nfrom safetensors.numpy import load_file\n"
            f"arrays = load_file({str(path)!r})\n"
            f"with safe_open({str(path)!r}, 'np') as f: meta = f.metadata()\n"
            "info = json.loads(meta['index'])\n"
            "print(meta['format'], arrays['embeddings'].shape, info['ids'], info['model_identity'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [I.FORMAT, "(3,", "4)", "['a',", "'b',", "'c']", "abcd"]


def test_not_an_index(tmp_path):
    (tmp_path / "junk.idx").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a ville index"):
        I.load_index(str(tmp_path / "junk.idx"))
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a ville index"):
        I.load_index(str(tmp_path / "other.safetensors"))


# ---------------------------------------------------------------------------------------------- evaluation cache
def test_cache_round_trip(tmp_path):
    cache = Cache(str(tmp_path), "abcd")
    batch = torch.randn(3, 5)
    data = {"clip0": {"emb": batch[0], "tokens": 3, "ms": 1.25, "batch": 3},  # rows of one tensor share storage
            "clip1": {"emb": batch[1], "tokens": 1, "ms": 1.25, "batch": 3},
            "clip0\ta red circle": 0.125, "q1": "blue", "w": {"duration": 3.0, "windows": np.arange(6.0).reshape(3, 2),
                                                                "emb": batch}, "none": None, "list": [1, "x", 2.5]}
    cache.save("videos", data)
    assert os.listdir(tmp_path) == ["abcd-videos.safetensors"]
    back = cache.load("videos")
    assert back.keys() == data.keys()
    assert torch.equal(back["clip0"]["emb"], batch[0]) and back["clip0"]["tokens"] == 3
    assert back["w"]["windows"].dtype == np.float64 and np.array_equal(back["w"]["windows"], data["w"]["windows"])
    assert torch.equal(back["w"]["emb"], batch) and back["clip0\ta red circle"] == 0.125
    assert back["none"] is None and back["list"] == [1, "x", 2.5] and back["q1"] == "blue"


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_crafted_cache_is_refused_and_recomputed(tmp_path, kind, capsys):
    marker = tmp_path / "pwned"
    cache = Cache(str(tmp_path / "cache"), "abcd")
    os.makedirs(tmp_path / "cache")
    crafted(kind, cache.path("texts"), marker)
    assert cache.load("texts") == {}
    line = one_line(capsys.readouterr().err)
    assert line.startswith("warning: ") and cache.path("texts") in line and "refused" in line
    cache.save("texts", {"a": torch.ones(2)})  # the recomputed entries replace it
    assert torch.equal(cache.load("texts")["a"], torch.ones(2))
    assert not marker.exists()


def test_old_pickle_cache_is_not_opened(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cache = Cache(str(tmp_path), "abcd")
    old = str(tmp_path / "abcd-texts.pt")
    crafted("zip", old, marker)
    assert cache.load("texts") == {}
    line = one_line(capsys.readouterr().err)
    assert old in line and "old-format" in line
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- training state
def _state(step: int = 3) -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.98))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": [C.rng_state()], "step": step}


def test_rng_state_survives_a_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # a cached Gaussian in numpy's legacy state
    path = C.save_train_state(str(tmp_path), 3, _state(), keep_last=2)
    expected = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    state = C.load_train_state(path)  # weights_only=True inside
    C.set_rng_state(state["rng"][0])
    got = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
    assert state["step"] == 3 and state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)


def test_crafted_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = C.train_state_path(str(tmp_path), 4)
    os.makedirs(os.path.dirname(path))
    for kind in ("zip", "raw"):
        crafted(kind, path, marker)
        # Even with a checksum file that matches (whoever crafted it can write one), the load refuses.
        with open(path + ".json", "w") as f:
            json.dump({"bytes": os.path.getsize(path), "sha256": C._sha256(path)}, f)
        with pytest.raises(C.UnusableCheckpoint, match="refused") as e:
            C.load_train_state(path)
        assert str(e.value).startswith(path) and "\n" not in str(e.value)
        assert not marker.exists()


def test_checkpoint_checks_size_checksum_and_age(tmp_path):
    out = str(tmp_path)
    paths = [C.save_train_state(out, s, _state(s), keep_last=3) for s in (2, 4, 6)]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted(
        os.path.basename(p) + x for p in paths for x in ("", ".json"))
    with open(paths[2], "r+b") as f:  # same size, one byte changed
        f.seek(os.path.getsize(paths[2]) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with open(paths[1], "ab") as f:
        f.write(b"x")
    path, state, problems = C.resume_train_state(out)
    assert path == paths[0] and state["step"] == 2
    assert len(problems) == 2 and problems[0].startswith(paths[2]) and "SHA-256" in problems[0]
    assert problems[1].startswith(paths[1]) and "bytes" in problems[1]
    os.remove(paths[0] + ".json")  # a checkpoint from before checksums: named, with what to do
    with pytest.raises(C.UnusableCheckpoint, match="no usable checkpoint") as e:
        C.resume_train_state(out)
    assert "old-format" in str(e.value) and "re-create" in str(e.value) and paths[0] in str(e.value)
    assert C.resume_train_state(str(tmp_path / "fresh")) == (None, None, [])


def test_finite_state_checks_parameters_and_optimizer_state():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert _finite_state(model, opt)
    opt.state[model.weight]["exp_avg_sq"][0, 0] = float("inf")
    assert not _finite_state(model, opt)
    opt.state[model.weight]["exp_avg_sq"][0, 0] = 0.0
    with torch.no_grad():
        model.bias[1] = float("nan")
    assert not _finite_state(model, opt)
