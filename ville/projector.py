"""Projector: vision-tower width -> LLM width (linear, as in PaliGemma, or a 2-layer MLP as in LLaVA-1.5)."""
from __future__ import annotations

from torch import nn

from .config import ProjectorCfg  # noqa: F401  (this stage's config; torch-free home in config.py)


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorCfg, in_dim: int, out_dim: int):
        super().__init__()
        if cfg.kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif cfg.kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            raise ValueError(f"model.projector.kind: expected 'linear' or 'mlp', got {cfg.kind!r}")

    def forward(self, x):
        return self.net(x)
