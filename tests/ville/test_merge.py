"""LoRA adapters: an adapter folder loads onto its base as the trained model, tensor for tensor; merging writes an
ordinary model with the same embeddings; a changed base is refused."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import build, frames, tiny_cfg

from ville import ViLLE
from ville.merge import main as merge_main


def _trained_lora_stage(tmp_path):
    """A base saved without LoRA, and a LoRA stage started from it whose adapters and heads then moved."""
    base = build("gemma2", lora=False, seed=0)
    base.save_pretrained(str(tmp_path / "base"))
    torch.manual_seed(1)
    stage = ViLLE(tiny_cfg("gemma2", lora=True)).eval()
    stage.load_weights(str(tmp_path / "base"))
    with torch.no_grad():  # stands in for training: LoRA B, the projector, the head and the stop biases move
        for name, p in stage.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return stage


def test_adapter_on_its_base_is_the_trained_model(tmp_path):
    stage = _trained_lora_stage(tmp_path)
    stage.save_adapter(str(tmp_path / "adapter"), base=str(tmp_path / "base"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_model.safetensors", "adapter_config.json", "trainable.safetensors", "base.json", "config.yaml",
            "README.md"} <= files and "model.safetensors" not in files
    loaded = ViLLE.from_pretrained(str(tmp_path / "adapter")).eval()
    a, b = stage.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fr = frames(2)
    assert torch.equal(stage.embed_video(fr).embeddings, loaded.embed_video(fr).embeddings)
    assert torch.equal(stage.embed_text(["a red circle", "two squares"]),
                       loaded.embed_text(["a red circle", "two squares"]))


def test_merge_writes_an_ordinary_model_with_the_same_embeddings(tmp_path):
    stage = _trained_lora_stage(tmp_path)
    stage.save_adapter(str(tmp_path / "adapter"), base=str(tmp_path / "base"))
    assert merge_main([str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = ViLLE.from_pretrained(str(tmp_path / "merged")).eval()
    assert not merged.cfg.llm.lora.enabled and not any("lora_" in k for k in merged.state_dict())
    fr = frames(2)
    torch.testing.assert_close(merged.embed_video(fr).embeddings, stage.embed_video(fr).embeddings,
                               rtol=1e-5, atol=1e-5)


def test_adapter_refuses_a_changed_base_and_a_model_without_lora(tmp_path):
    stage = _trained_lora_stage(tmp_path)
    stage.save_adapter(str(tmp_path / "adapter"), base=str(tmp_path / "base"))
    build("gemma2", lora=False, seed=7).save_pretrained(str(tmp_path / "base"))
    with pytest.raises(ValueError, match="is not the model it was trained on"):
        ViLLE.from_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="has no LoRA"):
        build("llama").save_adapter(str(tmp_path / "a2"), base=str(tmp_path / "base"))


def test_a_lora_training_stage_saves_its_adapter_beside_final(tmp_path):
    from fixtures import make_dataset

    from ville.train import main

    pattern, _ = make_dataset(str(tmp_path / "shards"), num_shards=1, per_shard=4)
    torch.manual_seed(0)
    ViLLE.from_recipe("recipes/tiny/stage1.yaml").save_pretrained(str(tmp_path / "base"))
    run = tmp_path / "run"
    assert main(["recipes/tiny/stage1.yaml", f"data.train_shards={pattern}", f"train.out_dir={run}",
                 "train.max_steps=1", "train.tasks.caption=2", "data.num_frames=4", "model.embed.max_embed_tokens=3",
                 "data.num_workers=0", "train.tensorboard=false", "data.shuffle_buffer=4",
                 "data.hard_negative_group=1", "model.llm.lora.enabled=true", f"train.init_from={tmp_path / 'base'}"]) == 0
    final, adapter = (ViLLE.from_pretrained(str(run / name)) for name in ("final", "adapter"))
    a, b = final.state_dict(), adapter.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    size = sum(f.stat().st_size for f in (run / "adapter").iterdir() if f.suffix == ".safetensors")
    assert size < (run / "final" / "model.safetensors").stat().st_size
