"""Tiny model configs shared by the model tests (CPU, random weights, built-in tokenizer)."""
from __future__ import annotations

import copy

import pytest
import torch

from ville.head import HeadCfg
from ville.llm import LLMCfg, LoRACfg
from ville.model import EmbedCfg, ModelCfg
from ville.vision import VisionCfg

LLM_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512),
    # Gemma2 keeps its logit soft-capping (attention 50, final 30) and gets a sliding window shorter than the
    # sequences below, so both code paths are exercised.
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=24,
                   max_position_embeddings=512),
}


def tiny_cfg(family: str = "llama", lora: bool = False, max_frames: int = 8) -> ModelCfg:
    return ModelCfg(
        vision=VisionCfg(name="vit_base_patch16_siglip_224", pretrained=False, max_frames=max_frames,
                         overrides=dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                        mlp_ratio=2.0)),
        llm=LLMCfg(pretrained=False, tokenizer="builtin", config=copy.deepcopy(LLM_CONFIGS[family]),
                   lora=LoRACfg(enabled=lora, r=4, alpha=8, dropout=0.0)),
        head=HeadCfg(num_pool_tokens=8, width=32, num_heads=4, mlp_ratio=2.0, dim=24),
        embed=EmbedCfg(max_embed_tokens=6, min_embed_tokens=1, stop_threshold=0.5),
    )


def build(family: str = "llama", seed: int = 0, **kw):
    from ville import ViLLE

    torch.manual_seed(seed)
    return ViLLE(tiny_cfg(family, **kw)).eval()


@pytest.fixture(params=list(LLM_CONFIGS))
def family(request):
    return request.param


def frames(batch: int, t: int = 2, h: int = 40, w: int = 52, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, t, h, w, 3), dtype=torch.uint8, generator=g)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls run faster without intra-op threads on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
