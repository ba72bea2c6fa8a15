"""Recipes: every shipped recipe builds its model; bad keys and types fail naming the key and the file."""
from __future__ import annotations

import glob

import pytest
import torch

from ville import ModelCfg, ViLLE
from ville.config import load_section

OFFLINE = ["model.init_from_vlm=null", "model.vision.pretrained=false", "model.llm.pretrained=false",
           "model.llm.tokenizer=builtin"]


@pytest.mark.parametrize("path", sorted(glob.glob("recipes/stage*.yaml")))
def test_real_recipes_build_offline_on_meta(path):
    """The real-scale model (So400m + Gemma-2B, PaliGemma-3B's parts) builds from config with random weights without the hub; on the
    meta device, so no memory is spent on its ~3B parameters."""
    with torch.device("meta"):
        model = ViLLE.from_recipe(path, OFFLINE)
    n = sum(p.numel() for p in model.parameters())
    # ~0.43B tower + ~2.0B decoder body (the builtin tokenizer shrinks Gemma's 257k-row embedding table)
    assert 2.3e9 < n < 3.5e9, n
    assert model.vision.tokens_per_frame == 256 and model.hidden == 2048


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


def test_stage1_starts_from_paligemma_and_later_stages_share_its_architecture(tmp_path):
    """Stage 1 names PaliGemma-3B; what ville/vlm.py resolves from that checkpoint's config (its hub config.json
    values, config only, on the meta device) is the tower and decoder that stages 2 and 3 spell out."""
    from transformers import AutoConfig, PaliGemmaConfig

    stage1 = load_section("recipes/stage1.yaml", "model", ModelCfg)
    assert stage1.init_from_vlm == "google/paligemma-3b-pt-224" and stage1.projector.kind == "linear"
    PaliGemmaConfig.from_dict({  # google/paligemma-3b-pt-224's config.json (the keys it sets)
        "image_token_index": 257152, "projection_dim": 2048, "hidden_size": 2048,
        "text_config": {"hidden_size": 2048, "intermediate_size": 16384, "model_type": "gemma",
                        "num_attention_heads": 8, "num_hidden_layers": 18, "num_image_tokens": 256,
                        "num_key_value_heads": 1, "vocab_size": 257216},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_vision_model",
                          "num_attention_heads": 16, "num_hidden_layers": 27, "num_image_tokens": 256,
                          "patch_size": 14, "projection_dim": 2048, "vision_use_head": False},
    }).save_pretrained(str(tmp_path / "pg"))
    offline = [f"model.init_from_vlm={tmp_path / 'pg'}", "model.llm.tokenizer=builtin"]
    with torch.device("meta"):
        model = ViLLE.from_recipe("recipes/stage1.yaml", offline)
    resolved = model.cfg
    for later in ("recipes/stage2.yaml", "recipes/stage3.yaml"):
        cfg = load_section(later, "model", ModelCfg)
        assert (cfg.vision.name, cfg.vision.overrides) == (resolved.vision.name, resolved.vision.overrides), later
        ours, theirs = (AutoConfig.for_model(**c.llm.config).to_dict() for c in (cfg, resolved))
        runtime = {"use_bidirectional_attention", "transformers_version", "dtype", "use_cache"}
        assert {k: v for k, v in ours.items() if k not in runtime} == \
            {k: v for k, v in theirs.items() if k not in runtime}, later
        assert cfg.llm.tokenizer == "google/paligemma-3b-pt-224" and not cfg.llm.pretrained, later


def test_batch_size_zero_turns_a_task_off():
    """Overrides merge into train.tasks, so 0 is how one drops a recipe's task; negative or all-zero is one line."""
    from ville.config import load_recipe

    assert set(load_recipe("recipes/tiny/stage1.yaml", ["train.tasks.qa=0"]).train.tasks) == {"caption"}
    with pytest.raises(ValueError, match=r"stage1.yaml: train.tasks must map tasks to batch sizes >= 0"):
        load_recipe("recipes/tiny/stage1.yaml", ["train.tasks.qa=-1"])
    with pytest.raises(ValueError, match=r"at least one >= 1"):
        load_recipe("recipes/tiny/stage1.yaml", ["train.tasks.qa=0", "train.tasks.caption=0"])
