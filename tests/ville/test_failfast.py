"""Fail fast: the real recipes check their data patterns, train.init_from and every hub source before the model is
built; offline (HF_HUB_OFFLINE=1, or the hub unreachable) the error is one line naming each key to set, at once."""
from __future__ import annotations

import time

import pytest

from ville import trainer
from ville.train import load_recipe, main


@pytest.fixture
def no_model(monkeypatch):
    """Building the model would be the slow part the checks must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the checks")

    monkeypatch.setattr(trainer, "ViLLE", refuse)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf" / "hub"


@pytest.fixture
def shards(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "shard-0.tar").write_bytes(b"")
    return f"{tmp_path}/d/shard-*.tar"


def run(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_offline_names_every_key_in_one_line(no_model, empty_cache, shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(trainer, "hub_reachable", lambda timeout=3.0: pytest.fail("offline: the hub is not asked"))
    t0 = time.perf_counter()
    rc, err = run(capsys, "recipes/stage1.yaml", f"data.train_shards={shards}", f"train.out_dir={tmp_path / 'o'}")
    assert rc == 2 and time.perf_counter() - t0 < 10
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: HF_HUB_OFFLINE=1 is set"), err
    for key in ("model.init_from_vlm=null", "'google/paligemma-3b-pt-224'", "model.vision.pretrained=false",
                "model.llm.pretrained=false", "model.llm.tokenizer=builtin", str(empty_cache)):
        assert key in lines[0], key


def test_unreachable_hub_says_to_go_offline(no_model, empty_cache, shards, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(trainer, "hub_reachable", lambda timeout=3.0: False)
    rc, err = run(capsys, "recipes/stage2.yaml", f"data.train_shards={shards}", f"train.out_dir={tmp_path / 'o'}",
                  "train.init_from=null")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE=1" in err and "model.llm.tokenizer=builtin" in err
    assert "model.llm.pretrained" not in err and "model.vision" not in err  # stage 2 downloads no weights


def test_cached_and_local_sources_pass(empty_cache, shards, tmp_path, monkeypatch):
    """A source in the hub cache or a local folder is not reported; nothing is left to download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (empty_cache / "models--google--paligemma-3b-pt-224" / "snapshots" / "abc").mkdir(parents=True)
    recipe = load_recipe("recipes/stage1.yaml", [f"data.train_shards={shards}"])
    trainer.check_sources(recipe)  # the PaliGemma checkpoint is cached
    local = tmp_path / "gemma"
    local.mkdir()
    recipe = load_recipe("recipes/stage1.yaml", [f"data.train_shards={shards}", "model.init_from_vlm=null",
                                                 "model.vision.pretrained=false", f"model.llm.name={local}",
                                                 f"model.llm.tokenizer={local}"])
    trainer.check_sources(recipe)


def test_missing_data_and_init_from_fail_before_the_model(no_model, tmp_path, capsys):
    off = ["model.init_from_vlm=null", "model.vision.pretrained=false", "model.llm.pretrained=false",
           "model.llm.tokenizer=builtin", f"train.out_dir={tmp_path / 'o'}"]
    rc, err = run(capsys, "recipes/stage1.yaml", *off, f"data.train_shards={tmp_path}/none-*.tar")
    assert rc == 2 and "data.train_shards" in err and "matches no file" in err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "shard-0.tar").write_bytes(b"")
    rc, err = run(capsys, "recipes/stage2.yaml", *off, f"data.train_shards={tmp_path}/d/shard-*.tar",
                  f"train.init_from={tmp_path / 'stage1' / 'final'}")
    assert rc == 2 and err.count("\n") == 1 and "train.init_from: no weights at" in err


def test_hub_reachable_gives_up_within_its_timeout(monkeypatch):
    import socket

    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")  # a name that never resolves
    assert trainer.hub_reachable(timeout=2.0) is False
    with socket.socket() as server:  # connects, never answers: the timeout decides
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        t0 = time.perf_counter()
        assert trainer.hub_reachable(timeout=0.5) is False
        assert time.perf_counter() - t0 < 1.5


def test_moment_adapter_under_fsdp_is_refused_before_the_model(no_model, shards, tmp_path, capsys):
    rc, err = run(capsys, "recipes/tiny/stage3.yaml", f"data.train_shards={shards}", "train.init_from=null",
                  f"train.out_dir={tmp_path / 'o'}", "train.parallel=fsdp", "model.moment_adapter.r=4")
    assert rc == 2 and err.count("\n") == 1 and "model.moment_adapter" in err and "train.parallel=fsdp" in err
