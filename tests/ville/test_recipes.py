"""Recipes: every shipped recipe builds its model; bad keys and types fail naming the key and the file."""
from __future__ import annotations

import glob

import pytest
import torch

from ville import ModelCfg, ViLLE
from ville.config import load_section

OFFLINE = ["model.vision.pretrained=false", "model.llm.pretrained=false", "model.llm.tokenizer=builtin"]


@pytest.mark.parametrize("path", sorted(glob.glob("recipes/stage*.yaml")))
def test_real_recipes_build_offline_on_meta(path):
    """The real-scale model (So400m + Gemma-2-2B) builds from config with random weights without the hub; on the
    meta device, so no memory is spent on its ~3B parameters."""
    with torch.device("meta"):
        model = ViLLE.from_recipe(path, OFFLINE)
    n = sum(p.numel() for p in model.parameters())
    # ~0.43B tower + ~2.0B decoder body (the builtin tokenizer shrinks Gemma's 256k-row embedding table)
    assert 2.3e9 < n < 3.5e9, n
    assert model.vision.tokens_per_frame == 256 and model.hidden == 2304


@pytest.mark.parametrize("path", sorted(glob.glob("recipes/tiny/stage*.yaml")))
def test_tiny_recipes_build(path):
    torch.manual_seed(0)
    model = ViLLE.from_recipe(path)
    assert model.cfg.vision.max_frames >= 8
    out = model.eval().embed_video(torch.randint(0, 256, (1, 8, 64, 64, 3), dtype=torch.uint8))
    assert out.embeddings.shape == (1, model.cfg.head.dim)


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open("recipes/tiny/stage1.yaml").read().replace("max_frames: 8", "max_frame: 8"))
    with pytest.raises(ValueError, match=r"bad\.yaml.*model\.vision\.max_frame"):
        load_section(str(bad), "model", ModelCfg)


def test_wrong_type_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open("recipes/tiny/stage1.yaml").read().replace("max_frames: 8", "max_frames: eight"))
    with pytest.raises(ValueError, match=r"bad\.yaml.*model\.vision\.max_frames"):
        load_section(str(bad), "model", ModelCfg)


def test_override_typo_fails():
    with pytest.raises(ValueError, match="model.vision.max_framez"):
        load_section("recipes/tiny/stage1.yaml", "model", ModelCfg, ["model.vision.max_framez=3"])
    cfg = load_section("recipes/tiny/stage1.yaml", "model", ModelCfg, ["model.embed.max_embed_tokens=3"])
    assert cfg.embed.max_embed_tokens == 3


def test_missing_recipe():
    with pytest.raises(ValueError, match="does not exist"):
        load_section("recipes/nope.yaml", "model", ModelCfg)
