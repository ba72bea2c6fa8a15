"""Hub conventions offline: what a saved folder holds, the model card, push_to_hub through huggingface_hub's upload
API (patched to copy into a local folder) and from_pretrained of a hub id (patched snapshot_download)."""
from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch
from conftest import build, frames

from ville import ViLLE
from ville.checkpoint import model_identity


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_saved_folder_names_the_built_architecture(tmp_path):
    model = build("llama")
    model.save_pretrained(str(tmp_path / "m"))
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"model.safetensors", "config.yaml", "config.json", "README.md", "llm_config", "tokenizer"} <= names
    arch = json.loads((tmp_path / "m" / "config.json").read_text())
    assert arch["llm"]["architecture"] == "LlamaForCausalLM" and arch["llm"]["model_type"] == "llama"
    assert arch["vision"]["timm_model"] == "vit_base_patch16_siglip_224" and arch["vision"]["tokens_per_frame"] == 16
    for f in ("config.json", "config.yaml", "README.md"):
        assert "gemma" not in (tmp_path / "m" / f).read_text().lower(), f  # a tiny Llama names no Gemma checkpoint
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ville") and "LlamaForCausalLM" in card and "No results" in card


def test_card_holds_recipe_data_and_eval_table_of_this_model_only(tmp_path):
    from ville.hub import write_model_card

    model = build("llama")
    folder = tmp_path / "m"
    model.save_pretrained(str(folder))
    shutil.copy("recipes/tiny/stage1.yaml", folder / "recipe.yaml")
    results = {"retrieval": {"t2v": {"R@1": 0.25, "R@5": 0.5}}, "adaptive": {"mean_tokens": 3.5},
               "meta": {"model_identity": model_identity(str(folder)), "split": "test", "date": "2026-12-05"}}
    (tmp_path / "eval.json").write_text(json.dumps(results))
    card = write_model_card(str(folder), [str(tmp_path / "eval.json")], repo_id="me/tiny")
    assert "train_shards: data/synth/train/shard-*.tar" in card and "max_steps: 1000" in card
    assert "| retrieval | t2v.R@1 | 0.25 |" in card and "| adaptive | mean_tokens | 3.5 |" in card
    assert 'ViLLE.from_pretrained("me/tiny")' in card
    results["meta"]["model_identity"] = "0123456789abcdef"
    (tmp_path / "other.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="other.json: results of model 0123456789abcdef"):
        write_model_card(str(folder), [str(tmp_path / "other.json")])


def test_push_to_hub_then_load_by_hub_id(tmp_path, monkeypatch):
    remote = tmp_path / "hub"
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create", repo_id, kw.get("private")))

    def upload_folder(self, folder_path, repo_id, **kw):
        calls.append(("upload", repo_id))
        shutil.copytree(folder_path, remote / repo_id)
        return f"https://huggingface.co/{repo_id}/commit/local"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(remote / repo_id))
    model = build("gemma2", lora=True)
    url = model.push_to_hub("me/ville-tiny", private=True)
    assert url.endswith("/commit/local") and calls == [("create", "me/ville-tiny", True), ("upload", "me/ville-tiny")]
    assert 'ViLLE.from_pretrained("me/ville-tiny")' in (remote / "me/ville-tiny" / "README.md").read_text()
    loaded = ViLLE.from_pretrained("me/ville-tiny").eval()
    assert _same(model, loaded)
    fr = frames(1)
    assert torch.equal(model.embed_video(fr).embeddings, loaded.embed_video(fr).embeddings)


def test_unknown_hub_id_and_unfinished_run_say_what_is_wrong(tmp_path, monkeypatch):
    def offline(repo_id, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot reach the hub\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match=r"^nobody/nothing: not a local folder, and the hub has no model there "
                                         r"\(LocalEntryNotFoundError: Cannot reach the hub\)$"):
        ViLLE.from_pretrained("nobody/nothing")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"run/final when it finishes; its training state is in .*run/checkpoints"):
        ViLLE.from_pretrained(str(tmp_path / "run"))
