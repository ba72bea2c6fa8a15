"""A real-width slice on CPU: Gemma-2-2B's width (2 of its 26 layers; soft-capped, sliding-window, GQA attention)
behind SigLIP-So400m's width (2 of its 27 blocks), LoRA and gradient checkpointing on, one multi-task training step
and one adaptive embedding. Reduced where width does not matter: 112 px frames (64 tokens each, not 256) and the
built-in tokenizer's vocabulary (docs/experiments.md has the timing)."""
from __future__ import annotations

import time

import torch
from conftest import frames

from ville import ViLLE
from ville.config import EmbedCfg, HeadCfg, LLMCfg, LoRACfg, ModelCfg, VisionCfg
from ville.losses import LossCfg

GEMMA2_2B = dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=96, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                 max_position_embeddings=8192)
SO400M = dict(img_size=112, patch_size=14, embed_dim=1152, depth=2, num_heads=16, mlp_ratio=3.7362)


def test_real_width_step_and_embedding():
    torch.manual_seed(0)
    cfg = ModelCfg(
        vision=VisionCfg(name="vit_so400m_patch14_siglip_224", pretrained=False, max_frames=2, overrides=SO400M,
                         freeze=True, grad_checkpointing=True),
        llm=LLMCfg(pretrained=False, tokenizer="builtin", config=GEMMA2_2B, grad_checkpointing=True,
                   lora=LoRACfg(enabled=True, r=8, alpha=16, dropout=0.05)),
        head=HeadCfg(num_pool_tokens=8, width=256, num_heads=4, mlp_ratio=2.0, dim=256),
        embed=EmbedCfg(max_embed_tokens=3, min_embed_tokens=1), projector=ModelCfg().projector)
    model = ViLLE(cfg).train()
    assert model.hidden == 2304 and model.vision.width == 1152 and model.vision.tokens_per_frame == 64
    fr = frames(2, t=2, h=112, w=112, seed=1)
    batches = {"caption": {"frames": fr, "prompt": ["Describe the video."] * 2,
                           "target": ["a red square moves right", "a blue circle grows"], "keys": ["a", "b"]},
               "matching": {"frames": fr, "text": ["a red square", "a green star"], "label": torch.tensor([1., 0.])}}
    start = time.perf_counter()
    loss, comps = model(batches, LossCfg(halting_min_batch=2))
    loss.backward()
    step = time.perf_counter() - start
    assert torch.isfinite(loss) and {"lm_caption", "contrastive_caption", "matching"} <= comps.keys()
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n and ".llm." in f".{n}")
    model.eval()
    with torch.no_grad():
        out = model.embed_video(fr)
    assert out.embeddings.shape == (2, 256) and torch.isfinite(out.embeddings).all()
    assert ((out.num_tokens >= 1) & (out.num_tokens <= 3)).all()
    print(f"real-width step {step:.1f} s, total {time.perf_counter() - start:.1f} s")
