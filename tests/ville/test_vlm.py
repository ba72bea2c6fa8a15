"""PaliGemma -> ville: tiny random PaliGemma 1 (Gemma, multi-query) and 2 (Gemma-2, soft-capping) checkpoints written
by transformers' own save_pretrained load into ville with transformers' image features and prefix-LM logits."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_cfg

from ville import ViLLE
from ville.tokenizer import EMBED_MODE_TOKENS, build_builtin_tokenizer
from ville.vlm import vision_arch

transformers = pytest.importorskip("transformers")

VOCAB = 700  # > the builtin tokenizer's 636: ville keeps the first 636 rows
IMAGE_TOKEN = VOCAB - 1
VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=80, num_hidden_layers=2,
              num_attention_heads=2, patch_size=8, image_size=32, vision_use_head=False)
TEXT = {
    1: dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, vocab_size=VOCAB),
    # Caps small enough that tanh bends random-weight scores and logits (the real ones are 50 and 30).
    2: dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, sliding_window=256, attn_logit_softcapping=1.0,
            final_logit_softcapping=2.0),
}


def _paligemma(folder, version: int, tokenizer: bool = False, seed: int = 0):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    cfg = PaliGemmaConfig(vision_config=dict(VISION), text_config=dict(TEXT[version]), image_token_index=IMAGE_TOKEN,
                          vocab_size=VOCAB, projection_dim=64, hidden_size=64)
    torch.manual_seed(seed)
    pg = PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers zero-initialises norms and biases: give every mapped tensor content
        for name, p in pg.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    pg.save_pretrained(str(folder))
    if tokenizer:
        build_builtin_tokenizer().save_pretrained(str(folder))
    return pg


def _cfg(motion: bool = False):
    cfg = tiny_cfg("llama")
    cfg.projector.kind = "linear"
    cfg.vision.motion = motion
    return cfg


def _rel(a, b) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def _frames(t: int, seed: int = 0):
    return torch.rand(1, t, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("version", [1, 2], ids=["paligemma1-gemma", "paligemma2-gemma2-softcap"])
def test_video_tokens_and_prefix_lm_logits_equal_paligemma(tmp_path, version):
    pg = _paligemma(tmp_path / "pg", version, tokenizer=version == 1)
    model = ViLLE.from_vlm(str(tmp_path / "pg"), _cfg()).eval()
    assert model.cfg.llm.config["model_type"] == TEXT[version]["model_type"]
    assert model.cfg.llm.tokenizer == (str(tmp_path / "pg") if version == 1 else "builtin")
    fr = _frames(1)
    with torch.no_grad():
        ours = model.video_tokens(fr)[0]
        ref = pg.get_image_features((fr[:, 0] - 0.5) / 0.5).pooler_output[0]
        assert ours.shape == ref.shape == (16, 64)
        assert _rel(ours, ref) <= 1e-5, _rel(ours, ref)

        # PaliGemma's prefix-LM: [image tokens, <bos>, prompt] attended both ways (token_type 0), the suffix causally.
        prompt, suffix = [31, 207, 45, 99, 12], [88, 301, 17, 250]
        ids = [IMAGE_TOKEN] * 16 + [2] + prompt + suffix
        types = [0] * (17 + len(prompt)) + [1] * len(suffix)
        ref_logits = pg(input_ids=torch.tensor([ids]), pixel_values=(fr[:, 0] - 0.5) / 0.5,
                        token_type_ids=torch.tensor([types]), attention_mask=torch.ones(1, len(ids))).logits[0]
        h, _, _ = model._full([[ours, model._embed_ids([2] + prompt)]], [model._embed_ids(suffix)])
        logits = model.lm_logits(h)[0]
    # ville's own token rows (<emb> <eoe> <match>) are new: compare every other column of PaliGemma's vocabulary
    keep = [i for i in range(len(model.tokenizer)) if i not in model.embed_mode_ids]
    err = _rel(logits[:, keep], ref_logits[:, keep])
    assert err <= 1e-5, err
    # the check has teeth: the suffix seeing itself bidirectionally changes PaliGemma's logits well beyond it
    bidir = pg(input_ids=torch.tensor([ids]), pixel_values=(fr[:, 0] - 0.5) / 0.5,
               token_type_ids=torch.zeros(1, len(ids), dtype=torch.long)).logits[0]
    assert _rel(bidir[:, keep], ref_logits[:, keep]) > 1e-3


def test_motion_and_temporal_position_start_at_paligemma(tmp_path):
    """With change channels and two frames, each frame's tokens are still PaliGemma's features of that frame."""
    pg = _paligemma(tmp_path / "pg", 2)
    model = ViLLE.from_vlm(str(tmp_path / "pg"), _cfg(motion=True)).eval()
    fr = _frames(2, seed=1)
    with torch.no_grad():
        ours = model.video_tokens(fr)[0].reshape(2, 16, 64)
        for t in range(2):
            ref = pg.get_image_features((fr[:, t] - 0.5) / 0.5).pooler_output[0]
            assert _rel(ours[t], ref) <= 1e-5
    rows = model.base_llm().get_input_embeddings().weight
    new = [model.tokenizer.convert_tokens_to_ids(t) for t in EMBED_MODE_TOKENS]
    assert torch.equal(model.emb_query.detach(), rows[model.emb_id].detach().float())
    assert (rows[new] - rows[:600].mean(0)).abs().max() < 1e-2  # mean rows (+ mean-resizing noise)


def test_recipe_key_and_saved_model_need_no_checkpoint(tmp_path):
    _paligemma(tmp_path / "pg", 1)
    over = [f"model.init_from_vlm={tmp_path / 'pg'}", "model.projector.kind=linear"]
    torch.manual_seed(3)
    model = ViLLE.from_recipe("recipes/tiny/stage1.yaml", over).eval()
    assert model.cfg.vision.overrides["act_layer"] == "gelu_tanh" and model.hidden == 64
    model.save_pretrained(str(tmp_path / "saved"))
    shutil.rmtree(tmp_path / "pg")  # the saved model carries its architecture; the checkpoint is not read again
    loaded = ViLLE.from_pretrained(str(tmp_path / "saved")).eval()
    fr = torch.randint(0, 256, (1, 2, 40, 40, 3), dtype=torch.uint8)
    torch.testing.assert_close(loaded.embed_video(fr).embeddings, model.embed_video(fr).embeddings, rtol=0, atol=0)


def test_so400m_at_any_resolution_builds_on_meta(tmp_path):
    """Real sizes (config only, on the meta device): timm's So400m at 224 / 448 px, PaliGemma 1's Gemma-2B."""
    from transformers import PaliGemmaConfig

    for size, name, tokens in [(224, "vit_so400m_patch14_siglip_224", 256), (448, "vit_so400m_patch14_siglip_224",
                                                                              1024)]:
        vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, patch_size=14,
                      num_hidden_layers=27, num_attention_heads=16, image_size=size, vision_use_head=False)
        cfg = PaliGemmaConfig(vision_config=vision, projection_dim=2048)
        assert vision_arch(cfg.vision_config)[0] == name
        cfg.save_pretrained(str(tmp_path / f"pg{size}"))
        with torch.device("meta"):
            model = ViLLE.from_vlm(str(tmp_path / f"pg{size}"), _cfg())
        assert model.vision.tokens_per_frame == tokens and model.hidden == 2048
        assert sum(p.numel() for p in model.vision.trunk.parameters()) > 4e8  # So400m


def test_bad_checkpoints_are_named(tmp_path):
    _paligemma(tmp_path / "pg", 1)
    mlp = _cfg()
    mlp.projector.kind = "mlp"
    with pytest.raises(ValueError, match="model.projector.kind: PaliGemma's projector is linear"):
        ViLLE.from_vlm(str(tmp_path / "pg"), mlp)
    (tmp_path / "pg" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        ViLLE.from_vlm(str(tmp_path / "pg"), _cfg())
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64).save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match="'llama' checkpoint; only PaliGemma"):
        ViLLE.from_vlm(str(tmp_path / "llama"), _cfg())


def test_every_checkpoint_layout_maps_to_the_same_weights(tmp_path):
    """What transformers 5.25 writes, 4.x hub checkpoints (`vision_tower.vision_model.`) and 5.x module names
    (`model.` + `language_model.` without `.model`) give the same ville tensors."""
    from safetensors.torch import load_file

    from ville.vlm import map_state_dict

    _paligemma(tmp_path / "pg", 2)
    saved = load_file(str(tmp_path / "pg" / "model.safetensors"))
    hub = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in saved.items()}
    modules = {"model." + k.replace("language_model.model.", "language_model."): v for k, v in saved.items()}
    ref = map_state_dict(saved, "pg")
    assert "vision.trunk.blocks.1.attn.qkv.weight" in ref and ref["vision.trunk.pos_embed"].shape == (1, 16, 32)
    for other in (hub, modules):
        got = map_state_dict(other, "pg")
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="1 keys not in PaliGemma's layout: \\['extra.weight'\\]"):
        map_state_dict({**saved, "extra.weight": torch.zeros(1)}, "pg")
